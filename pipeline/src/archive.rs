//! The encrypted claim-check archive of raw batch files, written and read as streams.
//!
//! A file of any size is encrypted in 64 KiB chunks with AES-256-GCM in the STREAM
//! construction (`aead::stream`, big-endian 32-bit counter plus a last-chunk flag in
//! each nonce), under a fresh data key wrapped by the master key. Reordering, dropping
//! or appending chunks, and truncating the file, all fail authentication.
//!
//! Layout: the line `medpipe-archive-v2`, one JSON header line (key id, wrapped data
//! key, nonce prefix, chunk size), then chunks as a 4-byte big-endian length and the
//! ciphertext.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use aes_gcm::aead::stream::{DecryptorBE32, EncryptorBE32};
use aes_gcm::aead::{rand_core::RngCore, OsRng};
use aes_gcm::Aes256Gcm;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::crypto::{unwrap_data_key, DataKey, KeyRef};
use crate::error::PipelineError;

const MAGIC: &str = "medpipe-archive-v2";
const CHUNK: usize = 64 * 1024;
/// Nonce prefix: 12-byte GCM nonce minus STREAM's 4-byte counter and 1-byte flag.
const PREFIX: usize = 7;

#[derive(Serialize, Deserialize)]
struct Header {
    key_id: String,
    wrapped_key: String,
    nonce_prefix: String,
    chunk_bytes: usize,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn crypto(msg: &str) -> PipelineError {
    PipelineError::Crypto(msg.to_string())
}

/// Writes an archive to `<path>.tmp` and renames it into place on [`finish`].
///
/// [`finish`]: ArchiveWriter::finish
pub struct ArchiveWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    enc: EncryptorBE32<Aes256Gcm>,
    buf: Vec<u8>,
}

impl ArchiveWriter {
    pub fn create(path: &Path, master: &KeyRef) -> Result<Self, PipelineError> {
        let key = DataKey::generate(master)?;
        let mut prefix = [0u8; PREFIX];
        OsRng.fill_bytes(&mut prefix);
        let header = Header {
            key_id: key.master_id().to_string(),
            wrapped_key: b64().encode(key.wrapped()),
            nonce_prefix: b64().encode(prefix),
            chunk_bytes: CHUNK,
        };
        let tmp = path.with_extension("tmp");
        let io = |e| PipelineError::io(tmp.display().to_string(), e);
        let mut out = BufWriter::new(File::create(&tmp).map_err(io)?);
        let header = serde_json::to_string(&header)
            .map_err(|e| PipelineError::Crypto(format!("cannot write archive header: {e}")))?;
        writeln!(out, "{MAGIC}\n{header}").map_err(io)?;
        let enc = EncryptorBE32::from_aead(key.key.cipher(), prefix.as_slice().into());
        Ok(ArchiveWriter {
            path: path.to_path_buf(),
            tmp,
            out,
            enc,
            buf: Vec::with_capacity(CHUNK),
        })
    }

    pub fn write_all(&mut self, mut data: &[u8]) -> Result<(), PipelineError> {
        while !data.is_empty() {
            let take = (CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK {
                let ct = self
                    .enc
                    .encrypt_next(self.buf.as_slice())
                    .map_err(|_| crypto("archive encryption failed"))?;
                self.buf.clear();
                put(&mut self.out, &self.tmp, &ct)?;
            }
        }
        Ok(())
    }

    /// Seals the last chunk, fsyncs, and renames the archive into place.
    pub fn finish(self) -> Result<PathBuf, PipelineError> {
        let ArchiveWriter {
            path,
            tmp,
            mut out,
            enc,
            buf,
        } = self;
        let ct = enc
            .encrypt_last(buf.as_slice())
            .map_err(|_| crypto("archive encryption failed"))?;
        put(&mut out, &tmp, &ct)?;
        let io = |e| PipelineError::io(tmp.display().to_string(), e);
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| PipelineError::io(path.display().to_string(), e))?;
        Ok(path)
    }

    /// Drops the unfinished archive (for example when the file turns out a duplicate).
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Writes one chunk: its 4-byte big-endian length, then the ciphertext.
fn put(out: &mut BufWriter<File>, tmp: &Path, ct: &[u8]) -> Result<(), PipelineError> {
    let io = |e| PipelineError::io(tmp.display().to_string(), e);
    let len = u32::try_from(ct.len()).map_err(|_| crypto("archive chunk too large"))?;
    out.write_all(&len.to_be_bytes()).map_err(io)?;
    out.write_all(ct).map_err(io)
}

/// Decrypts an archive to `out`, failing on any altered, reordered or missing byte.
pub fn open_archive(
    path: &Path,
    master: &KeyRef,
    out: &mut impl Write,
) -> Result<u64, PipelineError> {
    let io = |e| PipelineError::io(path.display().to_string(), e);
    let mut r = BufReader::new(File::open(path).map_err(io)?);
    let mut line = String::new();
    r.read_line(&mut line).map_err(io)?;
    if line.trim_end() != MAGIC {
        return Err(crypto("not a medpipe archive (bad magic line)"));
    }
    line.clear();
    r.read_line(&mut line).map_err(io)?;
    let header: Header =
        serde_json::from_str(&line).map_err(|_| crypto("archive header is not valid"))?;
    let wrapped = b64()
        .decode(&header.wrapped_key)
        .map_err(|_| crypto("archive wrapped key is not base64"))?;
    let prefix = b64()
        .decode(&header.nonce_prefix)
        .map_err(|_| crypto("archive nonce prefix is not base64"))?;
    if prefix.len() != PREFIX {
        return Err(crypto("archive nonce prefix has the wrong length"));
    }
    let key = unwrap_data_key(master, &header.key_id, &wrapped)?;
    let mut dec = DecryptorBE32::from_aead(key.cipher(), prefix.as_slice().into());
    let limit = header.chunk_bytes + 16;
    let mut next = read_chunk(&mut r, limit).map_err(io)?;
    let mut total = 0u64;
    loop {
        let Some(ct) = next else {
            return Err(crypto("archive is truncated: no last chunk"));
        };
        next = read_chunk(&mut r, limit).map_err(io)?;
        if next.is_none() {
            let plain = dec
                .decrypt_last(ct.as_slice())
                .map_err(|_| crypto("archive authentication failed (altered or truncated)"))?;
            out.write_all(&plain).map_err(io)?;
            return Ok(total + plain.len() as u64);
        }
        let plain = dec
            .decrypt_next(ct.as_slice())
            .map_err(|_| crypto("archive authentication failed (altered or reordered)"))?;
        out.write_all(&plain).map_err(io)?;
        total += plain.len() as u64;
    }
}

fn read_chunk(r: &mut impl Read, limit: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "archive chunk longer than its header allows",
        ));
    }
    let mut ct = vec![0u8; len];
    r.read_exact(&mut ct)?;
    Ok(Some(ct))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn master() -> KeyRef {
        KeyRef::from_hex("m1", &"11".repeat(32)).expect("key")
    }

    fn write(dir: &Path, data: &[u8], pieces: usize) -> PathBuf {
        let mut w = ArchiveWriter::create(&dir.join("a.enc"), &master()).expect("create");
        for part in data.chunks(data.len().div_ceil(pieces.max(1)).max(1)) {
            w.write_all(part).expect("write");
        }
        w.finish().expect("finish")
    }

    #[test]
    fn round_trips_across_chunk_boundaries() {
        let dir = tempfile::tempdir().expect("dir");
        for size in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let path = write(dir.path(), &data, 7);
            let mut out = Vec::new();
            assert_eq!(
                open_archive(&path, &master(), &mut out).expect("open"),
                size as u64
            );
            assert_eq!(out, data, "size {size}");
            assert!(!dir.path().join("a.tmp").exists());
        }
    }

    #[test]
    fn truncation_at_a_chunk_boundary_and_wrong_keys_are_detected() {
        let dir = tempfile::tempdir().expect("dir");
        let data = vec![7u8; 2 * CHUNK + 5];
        let path = write(dir.path(), &data, 1);
        let bytes = std::fs::read(&path).expect("read");
        // Cut the last chunk off entirely: the previous one is not marked last.
        let last_len = 4 + 5 + 16;
        std::fs::write(&path, &bytes[..bytes.len() - last_len]).expect("write");
        let e = open_archive(&path, &master(), &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("authentication failed"), "{e}");
        std::fs::write(&path, &bytes).expect("write");
        let other = KeyRef::from_hex("m2", &"22".repeat(32)).expect("key");
        assert!(open_archive(&path, &other, &mut Vec::new()).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn any_flipped_byte_after_the_header_is_detected(idx in any::<prop::sample::Index>()) {
            let dir = tempfile::tempdir().expect("dir");
            let data = vec![3u8; CHUNK + 100];
            let path = write(dir.path(), &data, 3);
            let mut bytes = std::fs::read(&path).expect("read");
            let body = bytes.iter().enumerate().filter(|(_, &b)| b == b'\n').nth(1).map(|(i, _)| i + 1).expect("header");
            let i = body + idx.index(bytes.len() - body);
            bytes[i] ^= 0x40;
            std::fs::write(&path, &bytes).expect("write");
            prop_assert!(open_archive(&path, &master(), &mut Vec::new()).is_err());
        }
    }
}
