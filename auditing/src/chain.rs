//! The append-only, hash-chained audit log: one JSON entry per line, each carrying the
//! hash of the one before. Verification recomputes every hash from the first line.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The hash the first entry chains to.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audited event. Holds ids, positions and a digest, never payload values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    pub seq: u64,
    pub recorded_at: i64,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_id: Option<String>,
    pub event_type: String,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub source_service: Option<String>,
    pub occurred_at: Option<i64>,
    /// SHA-256 of the message value as it was on the topic.
    pub digest_sha256: String,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditEntry {
    /// The entry's hash: SHA-256 over the previous hash and every other field.
    pub fn compute_hash(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash = String::new();
        let body = serde_json::to_vec(&unhashed).unwrap_or_default();
        let mut h = Sha256::new();
        h.update(self.prev_hash.as_bytes());
        h.update(b"\n");
        h.update(&body);
        hex::encode(h.finalize())
    }
}

/// What an entry is made from, before it is chained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_id: Option<String>,
    pub event_type: String,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub source_service: Option<String>,
    pub occurred_at: Option<i64>,
    pub digest_sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("audit entry at line {line}{} is broken: {reason}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
    Broken {
        line: usize,
        seq: Option<u64>,
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ChainError + '_ {
    move |source| ChainError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The result of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    pub entries: u64,
    pub head: String,
}

/// Checks every line: it parses, its seq follows, it chains to the previous hash, and
/// its own hash is right. Reports the first bad entry.
pub fn verify(path: &Path) -> Result<VerifySummary, ChainError> {
    let mut entries = 0;
    let mut head = GENESIS.to_string();
    read_entries(path, |line, e| {
        check_link(line, entries, &head, &e)?;
        head = e.hash;
        entries += 1;
        Ok(())
    })?;
    Ok(VerifySummary { entries, head })
}

fn check_link(
    line: usize,
    expected_seq: u64,
    prev: &str,
    e: &AuditEntry,
) -> Result<(), ChainError> {
    let broken = |reason: String| ChainError::Broken {
        line,
        seq: Some(e.seq),
        reason,
    };
    if e.seq != expected_seq {
        return Err(broken(format!(
            "sequence is {}, expected {expected_seq}",
            e.seq
        )));
    }
    if e.prev_hash != prev {
        return Err(broken("does not chain to the previous entry".into()));
    }
    if e.compute_hash() != e.hash {
        return Err(broken("hash does not match the entry's content".into()));
    }
    Ok(())
}

fn read_entries(
    path: &Path,
    mut f: impl FnMut(usize, AuditEntry) -> Result<(), ChainError>,
) -> Result<(), ChainError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(path)(e)),
    };
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io(path))?;
        let entry: AuditEntry = serde_json::from_str(&line).map_err(|e| ChainError::Broken {
            line: i + 1,
            seq: None,
            reason: format!("not a valid entry: {e}"),
        })?;
        // The hash covers the parsed entry, so the line must also be exactly the entry's
        // canonical serialisation: otherwise an edit that parses to the same entry (a
        // renamed key of a null field, say) would go unnoticed.
        if serde_json::to_string(&entry).ok().as_deref() != Some(line.as_str()) {
            return Err(ChainError::Broken {
                line: i + 1,
                seq: Some(entry.seq),
                reason: "line is not in canonical form (edited by hand?)".into(),
            });
        }
        f(i + 1, entry)?;
    }
    Ok(())
}

/// The chain file, opened for appending.
pub struct ChainStore {
    path: PathBuf,
    file: File,
    next_seq: u64,
    head: String,
    /// Highest offset recorded per (topic, partition): the store's own consumed positions.
    positions: HashMap<(String, i32), i64>,
}

impl ChainStore {
    pub const FILE: &'static str = "chain.jsonl";

    /// Opens (or creates) the chain in `dir`, verifying it. A torn last line, left by a
    /// crash mid-write before its fsync, is cut off: that entry was never acknowledged.
    pub fn open(dir: &Path) -> Result<Self, ChainError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(Self::FILE);
        cut_torn_tail(&path)?;
        let mut positions = HashMap::new();
        let mut next_seq = 0;
        let mut head = GENESIS.to_string();
        read_entries(&path, |line, e| {
            check_link(line, next_seq, &head, &e)?;
            let p = positions
                .entry((e.topic.clone(), e.partition))
                .or_insert(e.offset);
            *p = (*p).max(e.offset);
            head = e.hash;
            next_seq += 1;
            Ok(())
        })?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        Ok(ChainStore {
            path,
            file,
            next_seq,
            head,
            positions,
        })
    }

    /// True when the message at this position is already in the chain.
    pub fn contains(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.positions
            .get(&(topic.to_string(), partition))
            .is_some_and(|&max| offset <= max)
    }

    pub fn len(&self) -> u64 {
        self.next_seq
    }

    pub fn is_empty(&self) -> bool {
        self.next_seq == 0
    }

    /// Chains and appends entries, then fsyncs. Entries already present are skipped.
    pub fn append(&mut self, new: Vec<NewEntry>, recorded_at: i64) -> Result<usize, ChainError> {
        let mut buf = Vec::new();
        let mut added = 0;
        for n in new {
            if self.contains(&n.topic, n.partition, n.offset) {
                continue;
            }
            let mut e = AuditEntry {
                seq: self.next_seq,
                recorded_at,
                topic: n.topic,
                partition: n.partition,
                offset: n.offset,
                event_id: n.event_id,
                event_type: n.event_type,
                correlation_id: n.correlation_id,
                causation_id: n.causation_id,
                source_service: n.source_service,
                occurred_at: n.occurred_at,
                digest_sha256: n.digest_sha256,
                prev_hash: self.head.clone(),
                hash: String::new(),
            };
            e.hash = e.compute_hash();
            let line = serde_json::to_string(&e).map_err(|err| ChainError::Broken {
                line: 0,
                seq: Some(e.seq),
                reason: format!("cannot serialise the new entry: {err}"),
            })?;
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
            self.positions
                .insert((e.topic.clone(), e.partition), e.offset);
            self.head = e.hash;
            self.next_seq += 1;
            added += 1;
        }
        if added > 0 {
            self.file.write_all(&buf).map_err(io(&self.path))?;
            self.file.sync_data().map_err(io(&self.path))?;
        }
        Ok(added)
    }
}

fn cut_torn_tail(path: &Path) -> Result<(), ChainError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(path)(e)),
    };
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(());
    }
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io(path))?;
    f.set_len(keep as u64).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Every entry of the chain whose correlation id is `batch`, in chain order.
pub fn trace(path: &Path, batch: &str) -> Result<Vec<AuditEntry>, ChainError> {
    let mut out = Vec::new();
    read_entries(path, |_, e| {
        if e.correlation_id.as_deref() == Some(batch) || e.event_id.as_deref() == Some(batch) {
            out.push(e);
        }
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(offset: i64) -> NewEntry {
        NewEntry {
            topic: "t".into(),
            partition: 0,
            offset,
            event_id: Some(format!("e{offset}")),
            event_type: "X".into(),
            correlation_id: Some("b1".into()),
            causation_id: None,
            source_service: Some("s".into()),
            occurred_at: Some(1),
            digest_sha256: "d".into(),
        }
    }

    fn chain(n: i64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = ChainStore::open(dir.path()).expect("open");
        s.append((0..n).map(entry).collect(), 42).expect("append");
        let p = dir.path().join(ChainStore::FILE);
        (dir, p)
    }

    fn lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .expect("read")
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(p: &Path, l: &[String]) {
        std::fs::write(p, l.iter().map(|s| format!("{s}\n")).collect::<String>()).expect("write");
    }

    fn broken_line(p: &Path) -> usize {
        match verify(p) {
            Err(ChainError::Broken { line, .. }) => line,
            other => panic!("expected a broken chain, got {other:?}"),
        }
    }

    #[test]
    fn appends_verify_and_reopen_skips_recorded_positions() {
        let (dir, p) = chain(5);
        assert_eq!(verify(&p).expect("verifies").entries, 5);
        let mut s = ChainStore::open(dir.path()).expect("reopen");
        assert_eq!(
            s.append(vec![entry(3), entry(4), entry(5)], 43)
                .expect("append"),
            1
        );
        assert_eq!(verify(&p).expect("verifies").entries, 6);
    }

    #[test]
    fn deleted_swapped_and_rewritten_entries_are_detected() {
        let (_d, p) = chain(4);
        let orig = lines(&p);
        let mut l = orig.clone();
        l.remove(1);
        write_lines(&p, &l);
        assert_eq!(broken_line(&p), 2);
        let mut l = orig.clone();
        l.swap(1, 2);
        write_lines(&p, &l);
        assert_eq!(broken_line(&p), 2);
        let l: Vec<String> = orig
            .iter()
            .map(|s| s.replace("\"event_type\":\"X\"", "\"event_type\":\"Y\""))
            .collect();
        write_lines(&p, &l);
        assert_eq!(broken_line(&p), 1);
    }

    #[test]
    fn a_torn_tail_is_cut_on_open() {
        let (dir, p) = chain(3);
        let mut bytes = std::fs::read(&p).expect("read");
        bytes.extend_from_slice(b"{\"seq\":3,\"rec");
        std::fs::write(&p, bytes).expect("write");
        let s = ChainStore::open(dir.path()).expect("reopen");
        assert_eq!(s.len(), 3);
        assert_eq!(verify(&p).expect("verifies").entries, 3);
    }

    proptest! {
        #[test]
        fn any_single_byte_change_is_detected(n in 1i64..6, pick in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let (_d, p) = chain(n);
            let mut bytes = std::fs::read(&p).expect("read");
            let i = pick.index(bytes.len());
            prop_assume!(bytes[i] != byte);
            bytes[i] = byte;
            std::fs::write(&p, &bytes).expect("write");
            prop_assert!(verify(&p).is_err());
        }
    }
}
