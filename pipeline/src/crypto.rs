//! AES-256-GCM sealing, envelope encryption with per-batch data keys, SHA-256 helpers,
//! and `Secret`, which keeps key material out of `Debug` and logs.

use aes_gcm::aead::{Aead, KeyInit, OsRng};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};
use sha2::{Digest, Sha256};

use crate::error::PipelineError;
use crate::events::SealedPayload;

/// A value that must never be printed. `Debug` shows only a placeholder.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(v: T) -> Self {
        Secret(v)
    }
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A 256-bit key with the id it is known by (ids are recorded in events; keys never are).
#[derive(Clone, Debug)]
pub struct KeyRef {
    pub id: String,
    pub key: Secret<[u8; 32]>,
}

impl KeyRef {
    /// Parses a key given as 64 hex characters.
    pub fn from_hex(id: &str, hex_key: &str) -> Result<Self, PipelineError> {
        let bytes = hex::decode(hex_key.trim()).map_err(|_| {
            PipelineError::Config(format!(
                "key {id} is not valid hex (expected 64 hex characters)"
            ))
        })?;
        let key: [u8; 32] = bytes.try_into().map_err(|v: Vec<u8>| {
            PipelineError::Config(format!(
                "key {id} has {} bytes; AES-256 and HMAC keys need exactly 32",
                v.len()
            ))
        })?;
        if id.is_empty() {
            return Err(PipelineError::Config("a key id must not be empty".into()));
        }
        Ok(KeyRef {
            id: id.to_string(),
            key: Secret::new(key),
        })
    }

    /// The AES-256-GCM cipher of this key (for `seal`/`open` and the archive's stream).
    pub(crate) fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(self.key.expose()))
    }
}

/// Seals `plaintext` with `key`; returns (nonce, ciphertext). `aad` binds context.
pub fn seal(
    key: &KeyRef,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), PipelineError> {
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let ct = key
        .cipher()
        .encrypt(
            &nonce,
            aes_gcm::aead::Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| PipelineError::Crypto("AES-GCM encryption failed".into()))?;
    Ok((nonce.to_vec(), ct))
}

/// Opens what `seal` produced. Fails on a wrong key, wrong aad or any altered byte.
pub fn open(
    key: &KeyRef,
    nonce: &[u8],
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, PipelineError> {
    if nonce.len() != 12 {
        return Err(PipelineError::Crypto(format!(
            "nonce has {} bytes, expected 12",
            nonce.len()
        )));
    }
    key.cipher()
        .decrypt(
            Nonce::from_slice(nonce),
            aes_gcm::aead::Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map_err(|_| {
            PipelineError::Crypto(format!(
                "AES-GCM authentication failed (wrong key {} or altered data)",
                key.id
            ))
        })
}

/// 32 bytes from the operating system's CSPRNG (for new keys and seeds).
pub fn random_key_bytes() -> Secret<[u8; 32]> {
    Secret::new(Aes256Gcm::generate_key(&mut OsRng).into())
}

/// A fresh per-batch data key, plus its wrapped form (nonce ‖ sealed key) under `master`.
pub struct DataKey {
    pub(crate) key: KeyRef,
    wrapped: Vec<u8>,
    master_id: String,
}

impl DataKey {
    pub fn generate(master: &KeyRef) -> Result<Self, PipelineError> {
        let raw: [u8; 32] = *random_key_bytes().expose();
        let (nonce, sealed) = seal(master, &raw, b"medpipe-data-key")?;
        let mut wrapped = nonce;
        wrapped.extend_from_slice(&sealed);
        Ok(DataKey {
            key: KeyRef {
                id: "data-key".into(),
                key: Secret::new(raw),
            },
            wrapped,
            master_id: master.id.clone(),
        })
    }

    /// The id of the master key that wrapped this data key.
    pub fn master_id(&self) -> &str {
        &self.master_id
    }

    /// The data key wrapped by the master key (nonce ‖ sealed key).
    pub fn wrapped(&self) -> &[u8] {
        &self.wrapped
    }

    /// Seals one record; `aad` should name the record (batch id and position).
    pub fn seal_record(
        &self,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<SealedPayload, PipelineError> {
        let (nonce, ciphertext) = seal(&self.key, plaintext, aad)?;
        Ok(SealedPayload {
            key_id: self.master_id.clone(),
            wrapped_key: self.wrapped.clone(),
            nonce,
            ciphertext,
        })
    }
}

/// Unwraps a data key sealed by [`DataKey::generate`].
pub(crate) fn unwrap_data_key(
    master: &KeyRef,
    key_id: &str,
    wrapped: &[u8],
) -> Result<KeyRef, PipelineError> {
    if key_id != master.id {
        return Err(PipelineError::Crypto(format!(
            "data was sealed under master key {key_id} but this process holds {}",
            master.id
        )));
    }
    if wrapped.len() < 12 {
        return Err(PipelineError::Crypto(
            "wrapped data key is truncated".into(),
        ));
    }
    let (nonce, sealed) = wrapped.split_at(12);
    let raw = open(master, nonce, sealed, b"medpipe-data-key")?;
    let raw: [u8; 32] = raw
        .try_into()
        .map_err(|_| PipelineError::Crypto("unwrapped data key is not 32 bytes".into()))?;
    Ok(KeyRef {
        id: "data-key".into(),
        key: Secret::new(raw),
    })
}

/// Opens a sealed record with the master key it names.
pub fn open_record(
    master: &KeyRef,
    sealed: &SealedPayload,
    aad: &[u8],
) -> Result<Vec<u8>, PipelineError> {
    let dek = unwrap_data_key(master, &sealed.key_id, &sealed.wrapped_key)?;
    open(&dek, &sealed.nonce, &sealed.ciphertext, aad)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn master() -> KeyRef {
        KeyRef::from_hex("m1", &"11".repeat(32)).expect("valid key")
    }

    #[test]
    fn secret_debug_hides_the_key() {
        let k = master();
        let shown = format!("{k:?}");
        assert!(!shown.contains("11111111"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn bad_keys_are_rejected_with_a_reason() {
        let e = KeyRef::from_hex("k", "abcd").unwrap_err().to_string();
        assert!(e.contains("2 bytes"), "{e}");
        let e = KeyRef::from_hex("k", "zz").unwrap_err().to_string();
        assert!(e.contains("not valid hex"), "{e}");
    }

    #[test]
    fn wrong_master_or_aad_fails() {
        let dk = DataKey::generate(&master()).expect("dek");
        let sealed = dk.seal_record(b"hello", b"b1:1").expect("seal");
        assert!(open_record(&master(), &sealed, b"b1:2").is_err());
        let other = KeyRef::from_hex("m1", &"22".repeat(32)).expect("key");
        assert!(open_record(&other, &sealed, b"b1:1").is_err());
    }

    proptest! {
        #[test]
        fn seal_then_open_round_trips(data in proptest::collection::vec(any::<u8>(), 0..2048), aad in proptest::collection::vec(any::<u8>(), 0..64)) {
            let dk = DataKey::generate(&master()).expect("dek");
            let sealed = dk.seal_record(&data, &aad).expect("seal");
            prop_assert_eq!(open_record(&master(), &sealed, &aad).expect("open"), data);
        }

        #[test]
        fn any_flipped_ciphertext_byte_is_detected(data in proptest::collection::vec(any::<u8>(), 1..256), idx in any::<prop::sample::Index>()) {
            let dk = DataKey::generate(&master()).expect("dek");
            let mut sealed = dk.seal_record(&data, b"").expect("seal");
            let i = idx.index(sealed.ciphertext.len());
            sealed.ciphertext[i] ^= 0x01;
            prop_assert!(open_record(&master(), &sealed, b"").is_err());
        }
    }
}
