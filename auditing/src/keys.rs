//! The Ed25519 key that signs checkpoints. Given as a file holding the 32-byte seed in
//! hex (production: a mounted secret), or generated on first start into the data
//! directory with mode 0600, next to its public key for `medpipe audit verify`.

use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::store::StoreError;

pub const SIGNING_KEY: &str = "keys/audit-signing.key";
pub const PUBLIC_KEY: &str = "keys/audit-signing.pub";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A key's id: hex of the first 8 bytes of SHA-256 of the public key.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

fn parse<const N: usize>(what: &str, text: &str) -> Result<[u8; N], StoreError> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text.trim(), &mut out).map_err(|_| StoreError::Checkpoint {
        what: what.to_string(),
        reason: format!("expected {} hex characters", N * 2),
    })?;
    Ok(out)
}

/// Parses a public key given as 64 hex characters.
pub fn public_key_from_hex(text: &str) -> Result<VerifyingKey, StoreError> {
    let bytes: [u8; 32] = parse("public key", text)?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| StoreError::Checkpoint {
        what: "public key".into(),
        reason: e.to_string(),
    })
}

/// Reads a public key file (64 hex characters).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, StoreError> {
    public_key_from_hex(&std::fs::read_to_string(path).map_err(io(path))?)
}

/// Loads the signing key from `file`, or from (creating if absent) the data directory.
pub fn load_or_create(file: Option<&Path>, dir: &Path) -> Result<SigningKey, StoreError> {
    let path: PathBuf = match file {
        Some(f) => f.to_path_buf(),
        None => dir.join(SIGNING_KEY),
    };
    let key = match std::fs::read_to_string(&path) {
        Ok(text) => SigningKey::from_bytes(&parse::<32>("signing key", &text)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && file.is_none() => {
            let seed = pipeline::crypto::random_key_bytes();
            let key = SigningKey::from_bytes(seed.expose());
            write_private(&path, &hex::encode(seed.expose()))?;
            key
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let public = dir.join(PUBLIC_KEY);
    if let Some(parent) = public.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::write(&public, hex::encode(key.verifying_key().as_bytes())).map_err(io(&public))?;
    Ok(key)
}

fn write_private(path: &Path, text: &str) -> Result<(), StoreError> {
    use std::io::Write;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io(path))?;
    f.write_all(text.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_is_kept_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_create(None, dir.path()).expect("create");
        let b = load_or_create(None, dir.path()).expect("reload");
        assert_eq!(a.to_bytes(), b.to_bytes());
        let public = read_public_key(&dir.path().join(PUBLIC_KEY)).expect("public");
        assert_eq!(public, a.verifying_key());
        assert_eq!(key_id(&public).len(), 16);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(SIGNING_KEY))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_named_key_file_must_exist() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load_or_create(Some(&dir.path().join("nope")), dir.path()).is_err());
    }
}
