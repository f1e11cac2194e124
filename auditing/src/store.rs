//! The audit store: append-only segment files of hash-chained entries, a Merkle tree over
//! all entries with signed checkpoints, and a per-segment index for queries.
//!
//! Layout of the data directory:
//! - `segments/<first seq, 20 digits>.jsonl`: one entry per line, fsynced per append.
//!   A new segment starts with the first append after `segment_entries` entries (an
//!   append never spans two segments, so a failed one can be cut back); the chain runs
//!   across them.
//! - `segments/<first seq>.idx`: 16-byte records (key hash, byte offset of the line), for
//!   lookups by batch, event id, cause, pseudonym and event type. Derived data: rebuilt
//!   on open when it does not match its segment.
//! - `checkpoints.jsonl`: signed tree heads, one per line, fsynced.
//! - `keys/`: the Ed25519 signing key, when the store generated it (see `keys.rs`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::entry::{AuditEntry, GENESIS};
use crate::merkle::{leaf_hash, CompactTree, Hash, TreeHead};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("audit entry at {segment} line {line}{} is broken: {reason}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
    Broken {
        segment: String,
        line: usize,
        seq: Option<u64>,
        reason: String,
    },
    #[error("checkpoint {what} is invalid: {reason}")]
    Checkpoint { what: String, reason: String },
    #[error("the store was truncated: a checkpoint covers {checkpoint_size} entries, the store holds {entries}")]
    Truncated { checkpoint_size: u64, entries: u64 },
    #[error("{0}")]
    Query(String),
}

impl StoreError {
    /// The file system is out of space (or of quota): a condition that goes away, after
    /// which a failed append or checkpoint can simply be tried again.
    pub fn is_disk_full(&self) -> bool {
        const ENOSPC: i32 = 28;
        const EDQUOT: i32 = 122;
        match self {
            StoreError::Io { source, .. } => {
                source.kind() == std::io::ErrorKind::StorageFull
                    || source.kind() == std::io::ErrorKind::QuotaExceeded
                    || matches!(source.raw_os_error(), Some(ENOSPC | EDQUOT))
            }
            _ => false,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub const SEGMENTS: &str = "segments";
pub const CHECKPOINTS: &str = "checkpoints.jsonl";

/// Which field an index key is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Correlation,
    Event,
    Cause,
    Subject,
    Type,
}

impl Key {
    const ALL: [Key; 5] = [
        Key::Correlation,
        Key::Event,
        Key::Cause,
        Key::Subject,
        Key::Type,
    ];

    fn tag(self) -> u8 {
        match self {
            Key::Correlation => b'c',
            Key::Event => b'e',
            Key::Cause => b'x',
            Key::Subject => b's',
            Key::Type => b't',
        }
    }

    /// Whether the entry has `value` for this key: a merge is found under either patient,
    /// and a retry under both batches.
    pub fn matches(self, e: &AuditEntry, value: &str) -> bool {
        self.of(e) == Some(value)
            || (self == Key::Subject && e.related_subject.as_deref() == Some(value))
            || (self == Key::Correlation && e.related_batch.as_deref() == Some(value))
    }

    /// The entry's value for this key.
    pub fn of(self, e: &AuditEntry) -> Option<&str> {
        match self {
            Key::Correlation => e.correlation_id.as_deref(),
            Key::Event => e.event_id.as_deref(),
            Key::Cause => e.causation_id.as_deref(),
            Key::Subject => e.subject.as_deref(),
            Key::Type => Some(e.event_type.as_str()),
        }
    }
}

/// The first 8 bytes of SHA-256(tag ‖ value). Collisions only add candidates, which
/// lookups filter by comparing the entry's real value.
fn key_hash(key: Key, value: &str) -> u64 {
    let mut h = Sha256::new();
    h.update([key.tag()]);
    h.update(value.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

fn index_records(e: &AuditEntry, byte_offset: u64, out: &mut Vec<u8>) {
    for k in Key::ALL {
        if let Some(v) = k.of(e) {
            out.extend_from_slice(&key_hash(k, v).to_le_bytes());
            out.extend_from_slice(&byte_offset.to_le_bytes());
        }
    }
    let related = [
        (Key::Subject, e.related_subject.as_deref()),
        (Key::Correlation, e.related_batch.as_deref()),
    ];
    for (k, v) in related {
        if let Some(v) = v {
            out.extend_from_slice(&key_hash(k, v).to_le_bytes());
            out.extend_from_slice(&byte_offset.to_le_bytes());
        }
    }
}

/// Where a line is.
#[derive(Debug, Clone)]
pub struct Loc {
    pub segment: String,
    pub line: usize,
    pub byte_offset: u64,
}

/// The segment files in `dir`, in chain order, with the first seq each one claims.
pub fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let sdir = dir.join(SEGMENTS);
    let rd = match std::fs::read_dir(&sdir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&sdir)(e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let p = ent.map_err(io(&sdir))?.path();
        if p.extension().and_then(|x| x.to_str()) != Some("jsonl") {
            continue;
        }
        let first = p
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| StoreError::Broken {
                segment: p.display().to_string(),
                line: 0,
                seq: None,
                reason: "segment file name is not a sequence number".into(),
            })?;
        out.push((first, p));
    }
    out.sort();
    Ok(out)
}

fn segment_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads every line of every segment in order, parsing each into an entry and checking
/// it is in canonical form. Stops at the first error.
///
/// An unterminated last line of the last segment is not an entry: it is an append in
/// progress (the store may be live) or a write torn by a crash, never acknowledged. It is
/// skipped here and cut by the stage when it next opens the store.
pub fn scan(
    dir: &Path,
    mut f: impl FnMut(&Loc, &str, AuditEntry) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let segs = segments(dir)?;
    let last = segs.len().saturating_sub(1);
    for (i, (_, path)) in segs.into_iter().enumerate() {
        let name = segment_name(&path);
        let file = File::open(&path).map_err(io(&path))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut line = String::new();
        let mut byte_offset = 0u64;
        let mut n = 0usize;
        loop {
            line.clear();
            let read = reader.read_line(&mut line).map_err(io(&path))?;
            if read == 0 || (i == last && !line.ends_with('\n')) {
                break;
            }
            n += 1;
            let loc = Loc {
                segment: name.clone(),
                line: n,
                byte_offset,
            };
            if !line.ends_with('\n') {
                return Err(StoreError::Broken {
                    segment: loc.segment,
                    line: n,
                    seq: None,
                    reason: "a sealed segment must end with a complete line".into(),
                });
            }
            byte_offset += read as u64;
            let text = line.strip_suffix('\n').unwrap_or(&line);
            let entry = parse_line(&loc, text)?;
            f(&loc, text, entry)?;
        }
    }
    Ok(())
}

fn parse_line(loc: &Loc, text: &str) -> Result<AuditEntry, StoreError> {
    let broken = |seq, reason: String| StoreError::Broken {
        segment: loc.segment.clone(),
        line: loc.line,
        seq,
        reason,
    };
    let entry: AuditEntry =
        serde_json::from_str(text).map_err(|e| broken(None, format!("not a valid entry: {e}")))?;
    // The hash covers the parsed entry, so the line must also be exactly the entry's
    // canonical serialisation: otherwise an edit that parses to the same entry (extra
    // whitespace, a reordered key) would go unnoticed.
    if entry.to_line().ok().as_deref() != Some(text) {
        return Err(broken(
            Some(entry.seq),
            "line is not in canonical form (edited by hand?)".into(),
        ));
    }
    Ok(entry)
}

/// Checks links one entry at a time: sequence, chain, own hash, segment boundaries, and
/// the Merkle root at every checkpoint size.
pub struct ChainCheck {
    next_seq: u64,
    head: String,
    tree: CompactTree,
    /// Checkpoint sizes still to reach, largest last → smallest popped first.
    pending: Vec<(u64, Hash, String)>,
    pub checkpoints_matched: usize,
}

impl ChainCheck {
    /// `checkpoints` are (tree size, signed root, where the head came from).
    pub fn new(mut checkpoints: Vec<(u64, Hash, String)>) -> Self {
        checkpoints.sort_by_key(|c| std::cmp::Reverse(c.0));
        ChainCheck {
            next_seq: 0,
            head: GENESIS.to_string(),
            tree: CompactTree::new(),
            pending: checkpoints,
            checkpoints_matched: 0,
        }
    }

    pub fn step(&mut self, loc: &Loc, e: &AuditEntry) -> Result<(), StoreError> {
        let broken = |reason: String| StoreError::Broken {
            segment: loc.segment.clone(),
            line: loc.line,
            seq: Some(e.seq),
            reason,
        };
        if loc.line == 1 && segment_name_seq(&loc.segment) != Some(e.seq) {
            return Err(broken(
                "the segment's name does not match its first entry (a segment is missing or renamed)".into(),
            ));
        }
        if e.seq != self.next_seq {
            return Err(broken(format!(
                "sequence is {}, expected {}",
                e.seq, self.next_seq
            )));
        }
        if e.prev_hash != self.head {
            return Err(broken("does not chain to the previous entry".into()));
        }
        let computed = e
            .compute_hash()
            .map_err(|err| broken(format!("cannot hash the entry: {err}")))?;
        if computed != e.hash {
            return Err(broken("hash does not match the entry's content".into()));
        }
        let bytes = e
            .hash_bytes()
            .ok_or_else(|| broken("hash is not 64 hex characters".into()))?;
        self.tree.push(leaf_hash(&bytes));
        self.next_seq += 1;
        self.head.clone_from(&e.hash);
        while let Some((size, root, from)) = self.pending.last() {
            if *size > self.tree.size() {
                break;
            }
            if self.tree.root() != *root {
                return Err(broken(format!(
                    "the Merkle root over the first {size} entries does not match the signed checkpoint ({from})"
                )));
            }
            self.checkpoints_matched += 1;
            self.pending.pop();
        }
        Ok(())
    }

    /// Checkpoints the store did not reach: it was truncated behind them.
    pub fn finish(&self) -> Result<(), StoreError> {
        match self.pending.first() {
            Some((size, _, _)) => Err(StoreError::Truncated {
                checkpoint_size: *size,
                entries: self.next_seq,
            }),
            None => Ok(()),
        }
    }

    pub fn entries(&self) -> u64 {
        self.next_seq
    }
}

fn segment_name_seq(name: &str) -> Option<u64> {
    name.strip_suffix(".jsonl")?.parse().ok()
}

/// Reads the checkpoints file (missing = none).
pub fn read_checkpoints(dir: &Path) -> Result<Vec<TreeHead>, StoreError> {
    let path = dir.join(CHECKPOINTS);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&path)(e)),
    };
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| StoreError::Checkpoint {
                what: format!("{CHECKPOINTS} line {}", i + 1),
                reason: format!("not a tree head: {e}"),
            })
        })
        .collect()
}

/// Verifies signatures and merges checkpoints from several sources into (size, root,
/// source). Two heads of the same size with different roots are a fork.
pub fn signed_roots(
    heads: &[(TreeHead, String)],
    key: &VerifyingKey,
) -> Result<Vec<(u64, Hash, String)>, StoreError> {
    let mut by_size: HashMap<u64, (Hash, String)> = HashMap::new();
    for (h, from) in heads {
        let root = h.verify(key).map_err(|e| StoreError::Checkpoint {
            what: format!("at tree size {} ({from})", h.tree_size),
            reason: e.to_string(),
        })?;
        match by_size.get(&h.tree_size) {
            Some((r, other)) if *r != root => {
                return Err(StoreError::Checkpoint {
                    what: format!("at tree size {}", h.tree_size),
                    reason: format!("{from} and {other} sign different roots (a fork)"),
                })
            }
            Some(_) => {}
            None => {
                by_size.insert(h.tree_size, (root, from.clone()));
            }
        }
    }
    Ok(by_size.into_iter().map(|(s, (r, f))| (s, r, f)).collect())
}

/// What a successful verification saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    pub entries: u64,
    pub head: String,
    pub checkpoints: usize,
}

/// Verifies the whole store: every entry's chain link and hash, segment continuity, every
/// checkpoint's signature and Merkle root, and that no checkpoint (local or `published`)
/// covers more entries than the store holds.
pub fn verify(
    dir: &Path,
    key: &VerifyingKey,
    published: &[TreeHead],
) -> Result<VerifySummary, StoreError> {
    let mut heads: Vec<(TreeHead, String)> = read_checkpoints(dir)?
        .into_iter()
        .map(|h| (h, "local checkpoints.jsonl".to_string()))
        .collect();
    heads.extend(
        published
            .iter()
            .map(|h| (h.clone(), "published on the audit topic".to_string())),
    );
    let mut check = ChainCheck::new(signed_roots(&heads, key)?);
    let mut head = GENESIS.to_string();
    scan(dir, |loc, _, e| {
        check.step(loc, &e)?;
        head = e.hash;
        Ok(())
    })?;
    check.finish()?;
    Ok(VerifySummary {
        entries: check.entries(),
        head,
        checkpoints: check.checkpoints_matched,
    })
}

struct Active {
    first_seq: u64,
    path: PathBuf,
    file: File,
    idx: File,
    bytes: u64,
    /// Length of the segment's index file after the last successful append.
    idx_bytes: u64,
}

/// What a failed append restores.
struct Saved {
    next_seq: u64,
    head: String,
    tree: CompactTree,
    /// Each position the append moved, with its value before (in order).
    positions: Vec<((String, i32), Option<i64>)>,
}

/// The store, open for appending. One process at a time (the auditing stage).
pub struct Store {
    dir: PathBuf,
    segment_entries: u64,
    active: Option<Active>,
    next_seq: u64,
    head: String,
    tree: CompactTree,
    last_checkpoint: u64,
    /// Highest offset recorded per (topic, partition): the store's own consumed positions.
    positions: HashMap<(String, i32), i64>,
    /// A failed write could not be undone: no more appends (see `roll_back`).
    poisoned: bool,
    /// Tests: the next segment write puts only this many bytes down, then fails as a full
    /// disk does.
    #[cfg(test)]
    fail_write_after: Option<usize>,
}

impl Store {
    /// Opens (or creates) the store in `dir`, verifying every entry and the local
    /// checkpoints. `replay` sees each entry in order (to rebuild monitors' state).
    /// A torn last line, left by a crash mid-write before its fsync, is cut off: that
    /// entry was never acknowledged and its message is read again.
    pub fn open(
        dir: &Path,
        segment_entries: u64,
        key: &VerifyingKey,
        mut replay: impl FnMut(&AuditEntry),
    ) -> Result<Self, StoreError> {
        let sdir = dir.join(SEGMENTS);
        std::fs::create_dir_all(&sdir).map_err(io(&sdir))?;
        if let Some((_, last)) = segments(dir)?.last() {
            cut_torn_tail(last)?;
        }
        let heads: Vec<(TreeHead, String)> = read_checkpoints(dir)?
            .into_iter()
            .map(|h| (h, "local checkpoints.jsonl".to_string()))
            .collect();
        let last_checkpoint = heads.iter().map(|(h, _)| h.tree_size).max().unwrap_or(0);
        let mut check = ChainCheck::new(signed_roots(&heads, key)?);
        let mut positions: HashMap<(String, i32), i64> = HashMap::new();
        let mut head = GENESIS.to_string();
        // Index records per segment, to compare with (and if need be rebuild) its .idx.
        let mut idx: Vec<u8> = Vec::new();
        let mut current: Option<String> = None;
        let mut last_bytes = 0u64;
        scan(dir, |loc, text, e| {
            check.step(loc, &e)?;
            if current.as_deref() != Some(loc.segment.as_str()) {
                if let Some(prev) = current.take() {
                    sync_index(&sdir, &prev, &idx)?;
                }
                idx.clear();
                current = Some(loc.segment.clone());
            }
            index_records(&e, loc.byte_offset, &mut idx);
            last_bytes = loc.byte_offset + text.len() as u64 + 1;
            if !e.is_own() {
                let p = positions
                    .entry((e.topic.clone(), e.partition))
                    .or_insert(e.offset);
                *p = (*p).max(e.offset);
            }
            replay(&e);
            head.clone_from(&e.hash);
            Ok(())
        })?;
        check.finish()?;
        if let Some(seg) = &current {
            sync_index(&sdir, seg, &idx)?;
        }
        let mut store = Store {
            dir: dir.to_path_buf(),
            segment_entries: segment_entries.max(1),
            active: None,
            next_seq: check.entries(),
            head,
            tree: check.tree.clone(),
            last_checkpoint,
            positions,
            poisoned: false,
            #[cfg(test)]
            fail_write_after: None,
        };
        if let Some((first, path)) = segments(dir)?.last() {
            store.active = Some(store.open_segment(*first, path, last_bytes)?);
        }
        Ok(store)
    }

    fn open_segment(&self, first_seq: u64, path: &Path, bytes: u64) -> Result<Active, StoreError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io(path))?;
        let idx_path = path.with_extension("idx");
        let idx = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&idx_path)
            .map_err(io(&idx_path))?;
        let idx_bytes = idx.metadata().map_err(io(&idx_path))?.len();
        Ok(Active {
            first_seq,
            path: path.to_path_buf(),
            file,
            idx,
            bytes,
            idx_bytes,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
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

    /// Entries appended since the last checkpoint.
    pub fn unsigned(&self) -> u64 {
        self.next_seq - self.last_checkpoint
    }

    /// Chains and appends entries, then fsyncs. Messages already recorded (same topic,
    /// partition and offset) are skipped, so redelivery never duplicates an entry.
    /// Returns the entries as stored.
    ///
    /// All or nothing: when the write or its fsync fails (the disk is full, say), the
    /// segment and its index are cut back to where they were and the store's state is
    /// restored, so the same entries can be appended again once the cause is gone. A
    /// segment is only started before the first entry of an append, so one append never
    /// spans two segments (a segment may exceed `segment_entries` by up to one append).
    pub fn append(
        &mut self,
        new: Vec<AuditEntry>,
        recorded_at: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.usable()?;
        let mut saved = Saved {
            next_seq: self.next_seq,
            head: self.head.clone(),
            tree: self.tree.clone(),
            positions: Vec::new(),
        };
        match self.append_entries(new, recorded_at, &mut saved) {
            Ok(out) => Ok(out),
            Err(e) => {
                self.roll_back(saved);
                Err(e)
            }
        }
    }

    fn append_entries(
        &mut self,
        new: Vec<AuditEntry>,
        recorded_at: i64,
        saved: &mut Saved,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        let mut idx = Vec::new();
        for mut e in new {
            if !e.is_own() && self.contains(&e.topic, e.partition, e.offset) {
                continue;
            }
            let full = match &self.active {
                None => true,
                Some(a) => self.next_seq - a.first_seq >= self.segment_entries,
            };
            if out.is_empty() && full {
                self.start_segment()?;
            }
            e.seq = self.next_seq;
            e.recorded_at = recorded_at;
            e.prev_hash.clone_from(&self.head);
            e.hash.clear();
            let broken = |reason: String| StoreError::Broken {
                segment: "(new entry)".into(),
                line: 0,
                seq: Some(e.seq),
                reason,
            };
            e.hash = e
                .compute_hash()
                .map_err(|err| broken(format!("cannot hash the new entry: {err}")))?;
            let line = e
                .to_line()
                .map_err(|err| broken(format!("cannot serialise the new entry: {err}")))?;
            let bytes = e
                .hash_bytes()
                .ok_or_else(|| broken("hash is not hex".into()))?;
            let active_bytes = self.active.as_ref().map_or(0, |a| a.bytes);
            index_records(&e, active_bytes + buf.len() as u64, &mut idx);
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
            self.tree.push(leaf_hash(&bytes));
            if !e.is_own() {
                let key = (e.topic.clone(), e.partition);
                let before = self.positions.insert(key.clone(), e.offset);
                saved.positions.push((key, before));
            }
            self.head.clone_from(&e.hash);
            self.next_seq += 1;
            out.push(e);
        }
        self.flush(&buf, &idx)?;
        Ok(out)
    }

    /// Seals the active segment (if any) and opens a new, empty one at `next_seq`.
    fn start_segment(&mut self) -> Result<(), StoreError> {
        if let Some(done) = &self.active {
            // The segment is sealed now: summarise it for reports. Derived data, rebuilt
            // on demand, so a failure here only costs a later report time.
            if let Err(e) = crate::query::summarize_segment(&done.path) {
                tracing::warn!(error = %e, "Could not summarise a sealed audit segment.");
            }
        }
        let path = self
            .dir
            .join(SEGMENTS)
            .join(format!("{:020}.jsonl", self.next_seq));
        self.active = Some(self.open_segment(self.next_seq, &path, 0)?);
        Ok(())
    }

    /// Writes and fsyncs the lines, then the index records. `bytes` (and so the next
    /// entry's byte offset) only moves once both are written.
    fn flush(&mut self, buf: &[u8], idx: &[u8]) -> Result<(), StoreError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        if buf.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        if let Some(n) = self.fail_write_after.take() {
            a.file
                .write_all(&buf[..n.min(buf.len())])
                .map_err(io(&a.path))?;
            return Err(io(&a.path)(std::io::Error::from_raw_os_error(28)));
        }
        a.file.write_all(buf).map_err(io(&a.path))?;
        a.file.sync_data().map_err(io(&a.path))?;
        // The index is derived: rebuilt on open if a crash left it short.
        let p = a.path.with_extension("idx");
        a.idx.write_all(idx).map_err(io(&p))?;
        a.bytes += buf.len() as u64;
        a.idx_bytes += idx.len() as u64;
        Ok(())
    }

    /// Undoes a failed append: the segment and its index are cut back to what the last
    /// successful append left (a write that failed may have put part of its bytes on
    /// disk), and the chain, tree and positions are restored. If the files cannot be cut
    /// back, the store refuses further appends: the process must restart, and opening
    /// the store then cuts the torn tail.
    fn roll_back(&mut self, saved: Saved) {
        self.next_seq = saved.next_seq;
        self.head = saved.head;
        self.tree = saved.tree;
        for (key, before) in saved.positions.into_iter().rev() {
            match before {
                Some(offset) => self.positions.insert(key, offset),
                None => self.positions.remove(&key),
            };
        }
        if let Some(a) = &self.active {
            let cut = a
                .file
                .set_len(a.bytes)
                .and_then(|()| a.file.sync_all())
                .and_then(|()| a.idx.set_len(a.idx_bytes));
            if let Err(e) = cut {
                tracing::error!(error = %e, segment = %a.path.display(), "Could not cut a failed append back; the store takes no more appends until the stage restarts.");
                self.poisoned = true;
            }
        }
    }

    /// Refuses appends after a failed write that could not be undone.
    fn usable(&self) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Broken {
                segment: "(active segment)".into(),
                line: 0,
                seq: Some(self.next_seq),
                reason: "a failed append could not be cut back; restart to recover the store"
                    .into(),
            });
        }
        Ok(())
    }

    /// Signs the current tree head and appends it to the checkpoints file (fsynced).
    pub fn checkpoint(
        &mut self,
        key: &SigningKey,
        key_id: &str,
        now: i64,
    ) -> Result<TreeHead, StoreError> {
        self.usable()?;
        let head = TreeHead::sign(self.tree.size(), &self.tree.root(), now, key_id, key);
        let path = self.dir.join(CHECKPOINTS);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let line = serde_json::to_string(&head).map_err(|e| StoreError::Checkpoint {
            what: format!("at tree size {}", head.tree_size),
            reason: e.to_string(),
        })?;
        let before = f.metadata().map_err(io(&path))?.len();
        let written = f
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| f.sync_data());
        if let Err(source) = written {
            // A torn line would make the checkpoints file unreadable: cut it back.
            if let Err(e) = f.set_len(before).and_then(|()| f.sync_all()) {
                tracing::error!(error = %e, "Could not cut a failed checkpoint back; the store takes no more appends until the stage restarts.");
                self.poisoned = true;
            }
            return Err(io(&path)(source));
        }
        self.last_checkpoint = head.tree_size;
        Ok(head)
    }

    /// Reads entries with `seq` in `from..` back from the segments (for publishing).
    pub fn read_from(
        &self,
        from: u64,
        max: usize,
    ) -> Result<Vec<(AuditEntry, String)>, StoreError> {
        let mut out = Vec::new();
        let segs = segments(&self.dir)?;
        let start = segs
            .iter()
            .rposition(|(first, _)| *first <= from)
            .unwrap_or(0);
        for (_, path) in &segs[start..] {
            let file = File::open(path).map_err(io(path))?;
            let name = segment_name(path);
            for (i, line) in BufReader::new(file).lines().enumerate() {
                let line = line.map_err(io(path))?;
                let loc = Loc {
                    segment: name.clone(),
                    line: i + 1,
                    byte_offset: 0,
                };
                let e = parse_line(&loc, &line)?;
                if e.seq >= from {
                    out.push((e, line));
                    if out.len() >= max {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Makes a segment's .idx match the records computed from its entries.
fn sync_index(sdir: &Path, segment: &str, records: &[u8]) -> Result<(), StoreError> {
    let path = sdir.join(segment).with_extension("idx");
    let same_len = std::fs::metadata(&path).is_ok_and(|m| m.len() == records.len() as u64);
    if !same_len {
        std::fs::write(&path, records).map_err(io(&path))?;
    }
    Ok(())
}

fn cut_torn_tail(path: &Path) -> Result<(), StoreError> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(path))?;
    let len = f.metadata().map_err(io(path))?.len();
    if len == 0 {
        return Ok(());
    }
    // Find the last newline, reading backwards in chunks.
    let mut end = len;
    let mut keep = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start)).map_err(io(path))?;
        f.read_exact(&mut buf[..n]).map_err(io(path))?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            keep = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if keep != len {
        f.set_len(keep).map_err(io(path))?;
        f.sync_all().map_err(io(path))?;
    }
    Ok(())
}

/// Every entry whose `key` field equals `value`, in chain order, found through the index.
pub fn lookup(dir: &Path, key: Key, value: &str) -> Result<Vec<AuditEntry>, StoreError> {
    let want = key_hash(key, value);
    let mut out = Vec::new();
    for (_, path) in segments(dir)? {
        let idx_path = path.with_extension("idx");
        let idx = std::fs::read(&idx_path).map_err(io(&idx_path))?;
        let mut offsets: Vec<u64> = idx
            .chunks_exact(16)
            .filter(|r| r[..8] == want.to_le_bytes())
            .map(|r| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&r[8..]);
                u64::from_le_bytes(b)
            })
            .collect();
        if offsets.is_empty() {
            continue;
        }
        offsets.sort_unstable();
        offsets.dedup();
        let mut reader = BufReader::new(File::open(&path).map_err(io(&path))?);
        let name = segment_name(&path);
        for off in offsets {
            reader.seek(SeekFrom::Start(off)).map_err(io(&path))?;
            let mut line = String::new();
            reader.read_line(&mut line).map_err(io(&path))?;
            let loc = Loc {
                segment: name.clone(),
                line: 0,
                byte_offset: off,
            };
            let e = parse_line(&loc, line.strip_suffix('\n').unwrap_or(&line))?;
            if key.matches(&e, value) {
                out.push(e);
            }
        }
    }
    Ok(out)
}

/// The leaf hashes of the first `n` entries (for inclusion proofs).
pub fn leaves(dir: &Path, n: u64) -> Result<Vec<Hash>, StoreError> {
    let mut out = Vec::with_capacity(n as usize);
    scan(dir, |loc, _, e| {
        if (out.len() as u64) < n {
            let b = e.hash_bytes().ok_or_else(|| StoreError::Broken {
                segment: loc.segment.clone(),
                line: loc.line,
                seq: Some(e.seq),
                reason: "hash is not hex".into(),
            })?;
            out.push(leaf_hash(&b));
        }
        Ok(())
    })?;
    if (out.len() as u64) < n {
        return Err(StoreError::Truncated {
            checkpoint_size: n,
            entries: out.len() as u64,
        });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn entry(offset: i64) -> AuditEntry {
        AuditEntry {
            topic: "medpipe.ingestion.v1".into(),
            partition: 0,
            offset,
            event_id: Some(format!("e{offset}")),
            event_type: "SourceRecordIngested".into(),
            correlation_id: Some(format!("b{}", offset % 2)),
            causation_id: (offset > 0).then(|| format!("e{}", offset - 1)),
            source_service: Some("medpipe-ingestion".into()),
            occurred_at: Some(offset),
            record_position: Some(offset),
            digest_sha256: "d".into(),
            ..Default::default()
        }
    }

    pub(crate) fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    /// A store of `n` entries in segments of `seg`, with a checkpoint after every `every`.
    pub(crate) fn store(n: i64, seg: u64, every: i64) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Store::open(dir.path(), seg, &key().verifying_key(), |_| {}).expect("open");
        for o in 0..n {
            s.append(vec![entry(o)], 42).expect("append");
            if (o + 1) % every == 0 {
                s.checkpoint(&key(), "k", 1).expect("checkpoint");
            }
        }
        (dir, s)
    }

    fn verify_dir(dir: &Path) -> Result<VerifySummary, StoreError> {
        verify(dir, &key().verifying_key(), &[])
    }

    fn seg_path(dir: &Path, first: u64) -> PathBuf {
        dir.join(SEGMENTS).join(format!("{first:020}.jsonl"))
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

    fn broken_at(r: Result<VerifySummary, StoreError>) -> (String, usize) {
        match r {
            Err(StoreError::Broken { segment, line, .. }) => (segment, line),
            other => panic!("expected a broken chain, got {other:?}"),
        }
    }

    #[test]
    fn appends_span_segments_verify_and_reopen_skips_recorded_positions() {
        let (dir, s) = store(10, 4, 5);
        drop(s);
        assert_eq!(segments(dir.path()).expect("segments").len(), 3);
        let v = verify_dir(dir.path()).expect("verifies");
        assert_eq!((v.entries, v.checkpoints), (10, 2));
        let mut s = Store::open(dir.path(), 4, &key().verifying_key(), |_| {}).expect("reopen");
        let added = s
            .append(vec![entry(8), entry(9), entry(10)], 43)
            .expect("append");
        assert_eq!(added.len(), 1);
        assert_eq!(added[0].seq, 10);
        assert_eq!(verify_dir(dir.path()).expect("verifies").entries, 11);
    }

    #[test]
    fn an_append_that_fails_on_a_full_disk_leaves_nothing_behind_and_can_be_redone() {
        // Segments of 4 and 6 entries so far: the failing append starts segment 2.
        for (before, half) in [(5i64, 10usize), (6, 700), (8, 1)] {
            let (dir, mut s) = store(before, 4, 3);
            let seg = segments(dir.path()).expect("segments");
            let (_, last) = seg.last().expect("a segment");
            let bytes = std::fs::metadata(last).expect("segment").len();
            let batch = || (before..before + 3).map(entry).collect::<Vec<_>>();

            s.fail_write_after = Some(half);
            let err = s.append(batch(), 43).expect_err("the write fails");
            assert!(err.is_disk_full(), "{err}");
            assert_eq!(s.len(), before as u64);
            assert!(!s.contains("medpipe.ingestion.v1", 0, before));
            let now_last = segments(dir.path()).expect("segments");
            let (_, now_path) = now_last.last().expect("a segment");
            let now_len = std::fs::metadata(now_path).expect("segment").len();
            if now_path == last {
                assert_eq!(now_len, bytes, "the torn write was cut back");
            } else {
                assert_eq!(now_len, 0, "the new segment holds nothing");
            }

            // Space returns: the same batch goes in whole, once, and the chain verifies.
            let added = s.append(batch(), 44).expect("append again");
            assert_eq!(added.len(), 3);
            assert_eq!(added[0].seq, before as u64);
            s.checkpoint(&key(), "k", 2).expect("checkpoint");
            drop(s);
            let v = verify_dir(dir.path()).expect("verifies");
            assert_eq!(v.entries, before as u64 + 3);
            let mut seen = Vec::new();
            let reopened = Store::open(dir.path(), 4, &key().verifying_key(), |e| {
                seen.push(e.offset);
            })
            .expect("reopen");
            assert_eq!(seen, (0..before + 3).collect::<Vec<_>>());
            assert_eq!(
                lookup(dir.path(), Key::Event, &format!("e{before}"))
                    .expect("lookup")
                    .len(),
                1,
                "the index holds the redone entry once"
            );
            drop(reopened);
        }
    }

    #[test]
    fn own_entries_are_never_deduplicated_by_position() {
        let (dir, mut s) = store(1, 10, 100);
        let alert = AuditEntry {
            topic: "medpipe.audit.v1".into(),
            partition: -1,
            offset: -1,
            event_type: crate::monitors::ALERT_EVENT_TYPE.into(),
            ..entry(0)
        };
        assert_eq!(
            s.append(vec![alert.clone(), alert], 1)
                .expect("append")
                .len(),
            2
        );
        assert_eq!(verify_dir(dir.path()).expect("verifies").entries, 3);
    }

    #[test]
    fn deleted_swapped_and_rewritten_entries_are_named() {
        let (dir, s) = store(4, 100, 100);
        drop(s);
        let p = seg_path(dir.path(), 0);
        let orig = lines(&p);
        let mut l = orig.clone();
        l.remove(1);
        write_lines(&p, &l);
        assert_eq!(
            broken_at(verify_dir(dir.path())),
            (format!("{:020}.jsonl", 0), 2)
        );
        let mut l = orig.clone();
        l.swap(1, 2);
        write_lines(&p, &l);
        assert_eq!(broken_at(verify_dir(dir.path())).1, 2);
        let l: Vec<String> = orig
            .iter()
            .map(|s| {
                s.replace(
                    "\"event_type\":\"SourceRecordIngested\"",
                    "\"event_type\":\"X\"",
                )
            })
            .collect();
        write_lines(&p, &l);
        assert_eq!(broken_at(verify_dir(dir.path())).1, 1);
        // Appending an entry that does not chain.
        let mut l = orig.clone();
        l.push(orig[1].clone());
        write_lines(&p, &l);
        assert_eq!(broken_at(verify_dir(dir.path())).1, 5);
    }

    #[test]
    fn a_missing_segment_is_detected() {
        let (dir, s) = store(9, 3, 100);
        drop(s);
        std::fs::remove_file(seg_path(dir.path(), 3)).expect("rm");
        assert_eq!(
            broken_at(verify_dir(dir.path())).0,
            format!("{:020}.jsonl", 6)
        );
    }

    #[test]
    fn truncation_behind_a_checkpoint_is_detected_even_at_a_segment_boundary() {
        let (dir, s) = store(8, 4, 4);
        drop(s);
        // Cut the whole last segment: the chain that remains is internally perfect.
        std::fs::remove_file(seg_path(dir.path(), 4)).expect("rm");
        match verify_dir(dir.path()) {
            Err(StoreError::Truncated {
                checkpoint_size: 8,
                entries: 4,
            }) => {}
            other => panic!("expected truncation, got {other:?}"),
        }
        // Also cut the local checkpoint: only a published copy can tell now.
        let cps = read_checkpoints(dir.path()).expect("checkpoints");
        let first = serde_json::to_string(&cps[0]).expect("json");
        std::fs::write(dir.path().join(CHECKPOINTS), format!("{first}\n")).expect("write");
        assert_eq!(
            verify_dir(dir.path()).expect("locally consistent").entries,
            4
        );
        assert!(matches!(
            verify(dir.path(), &key().verifying_key(), &cps),
            Err(StoreError::Truncated {
                checkpoint_size: 8,
                ..
            })
        ));
    }

    #[test]
    fn a_rewritten_chain_fails_the_signed_root() {
        // An attacker who rewrites an entry and recomputes every hash after it still
        // cannot match the signed Merkle root.
        let (dir, s) = store(4, 100, 4);
        drop(s);
        let p = seg_path(dir.path(), 0);
        let mut entries: Vec<AuditEntry> = lines(&p)
            .iter()
            .map(|l| serde_json::from_str(l).expect("entry"))
            .collect();
        entries[1].event_type = "Forged".into();
        let mut prev = GENESIS.to_string();
        for e in &mut entries {
            e.prev_hash = prev.clone();
            e.hash = e.compute_hash().expect("hash");
            prev = e.hash.clone();
        }
        let l: Vec<String> = entries.iter().map(|e| e.to_line().expect("line")).collect();
        write_lines(&p, &l);
        let err = broken_at(verify_dir(dir.path()));
        assert_eq!(err.1, 4, "named at the entry that completes the checkpoint");
        // And a checkpoint signed by another key is refused.
        let other = SigningKey::from_bytes(&[9u8; 32]);
        assert!(matches!(
            verify(dir.path(), &other.verifying_key(), &[]),
            Err(StoreError::Checkpoint { .. })
        ));
    }

    #[test]
    fn an_append_in_progress_is_not_read_as_an_entry() {
        let (dir, s) = store(3, 100, 100);
        drop(s);
        let p = seg_path(dir.path(), 0);
        let mut bytes = std::fs::read(&p).expect("read");
        bytes.extend_from_slice(b"{\"seq\":3,\"rec");
        std::fs::write(&p, bytes).expect("write");
        assert_eq!(verify_dir(dir.path()).expect("verifies").entries, 3);
        // In a segment that is not the last, the same bytes are damage.
        let mut s = Store::open(dir.path(), 4, &key().verifying_key(), |_| {}).expect("open");
        // One append never spans two segments: the second one starts segment 4.
        s.append(vec![entry(3)], 1).expect("append");
        s.append(vec![entry(4)], 1).expect("append");
        assert_eq!(segments(dir.path()).expect("segments").len(), 2);
        drop(s);
        let mut bytes = std::fs::read(&p).expect("read");
        bytes.truncate(bytes.len() - 1);
        std::fs::write(&p, bytes).expect("write");
        assert!(verify_dir(dir.path()).is_err());
    }

    #[test]
    fn a_torn_tail_is_cut_on_open_and_the_index_rebuilt() {
        let (dir, s) = store(3, 100, 100);
        drop(s);
        let p = seg_path(dir.path(), 0);
        let mut bytes = std::fs::read(&p).expect("read");
        bytes.extend_from_slice(b"{\"seq\":3,\"rec");
        std::fs::write(&p, bytes).expect("write");
        std::fs::write(p.with_extension("idx"), b"junk").expect("idx");
        let s = Store::open(dir.path(), 100, &key().verifying_key(), |_| {}).expect("reopen");
        assert_eq!(s.len(), 3);
        assert_eq!(verify_dir(dir.path()).expect("verifies").entries, 3);
        assert_eq!(
            lookup(dir.path(), Key::Event, "e2").expect("lookup").len(),
            1
        );
    }

    #[test]
    fn lookups_find_exactly_the_matching_entries() {
        let (dir, s) = store(9, 4, 100);
        drop(s);
        let b0: Vec<u64> = lookup(dir.path(), Key::Correlation, "b0")
            .expect("lookup")
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(b0, vec![0, 2, 4, 6, 8]);
        let caused: Vec<u64> = lookup(dir.path(), Key::Cause, "e4")
            .expect("lookup")
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(caused, vec![5]);
        assert!(lookup(dir.path(), Key::Subject, "nobody")
            .expect("lookup")
            .is_empty());
    }

    #[test]
    fn a_merge_is_found_under_either_patient() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Store::open(dir.path(), 10, &key().verifying_key(), |_| {}).expect("open");
        let merge = AuditEntry {
            event_type: "PatientMerged".into(),
            subject: Some("survivor".into()),
            related_subject: Some("merged".into()),
            ..entry(0)
        };
        let other = AuditEntry {
            subject: Some("merged".into()),
            ..entry(1)
        };
        s.append(vec![merge, other], 42).expect("append");
        drop(s);
        let seqs = |who: &str| -> Vec<u64> {
            lookup(dir.path(), Key::Subject, who)
                .expect("lookup")
                .iter()
                .map(|e| e.seq)
                .collect()
        };
        assert_eq!(seqs("survivor"), vec![0]);
        assert_eq!(seqs("merged"), vec![0, 1]);
        assert!(verify_dir(dir.path()).is_ok());
    }

    #[test]
    fn replay_sees_every_entry_in_order() {
        let (dir, s) = store(5, 2, 100);
        drop(s);
        let mut seen = Vec::new();
        Store::open(dir.path(), 2, &key().verifying_key(), |e| seen.push(e.seq)).expect("open");
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_single_byte_change_is_detected(n in 1i64..8, pick in any::<prop::sample::Index>(), byte in any::<u8>()) {
            // Checkpointed at the end, as the stage does on a clean stop: an edit of the
            // last newline then reads as truncation behind the checkpoint.
            let (dir, s) = store(n, 3, n);
            drop(s);
            let segs = segments(dir.path()).expect("segments");
            let (_, p) = &segs[pick.index(segs.len())];
            let mut bytes = std::fs::read(p).expect("read");
            let i = pick.index(bytes.len());
            prop_assume!(bytes[i] != byte);
            bytes[i] = byte;
            std::fs::write(p, &bytes).expect("write");
            prop_assert!(verify_dir(dir.path()).is_err());
        }

        #[test]
        fn any_truncated_tail_behind_the_last_checkpoint_is_detected(n in 2i64..12, cut in 1usize..12) {
            let (dir, s) = store(n, 4, n);
            drop(s);
            // Drop the last `cut` entries (capped), wherever the segments split.
            let cut = cut.min(n as usize);
            let mut all: Vec<(PathBuf, Vec<String>)> = segments(dir.path()).expect("segs")
                .into_iter().map(|(_, p)| { let l = lines(&p); (p, l) }).collect();
            let mut left = cut;
            while left > 0 {
                let (p, l) = all.last_mut().expect("segment");
                let take = left.min(l.len());
                l.truncate(l.len() - take);
                left -= take;
                if l.is_empty() { std::fs::remove_file(&*p).expect("rm"); all.pop(); } else { write_lines(p, l); }
            }
            let truncated = matches!(verify_dir(dir.path()), Err(StoreError::Truncated { .. }));
            prop_assert!(truncated);
        }
    }
}
