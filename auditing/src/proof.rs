//! Inclusion proofs a third party can check: an entry, its audit path, and the signed
//! checkpoint it leads to. Checking needs only this document and the public key:
//! 1. the entry's line is canonical and its hash is SHA-256(prev_hash ‖ "\n" ‖ the line
//!    with `"hash":""`);
//! 2. the leaf is SHA-256(0x00 ‖ hash bytes), and the audit path leads from it to the
//!    root as in RFC 9162 section 2.1.3.2;
//! 3. the checkpoint's Ed25519 signature over that root verifies.

use std::path::Path;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::entry::AuditEntry;
use crate::merkle::{inclusion_proof, leaf_hash, verify_inclusion, Hash, TreeHead};
use crate::store::{self, read_checkpoints, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InclusionProof {
    /// The entry's canonical line, exactly as stored.
    pub entry: String,
    pub leaf_index: u64,
    pub tree_size: u64,
    /// Sibling hashes from the leaf up, lowercase hex.
    pub audit_path: Vec<String>,
    pub checkpoint: TreeHead,
}

/// Proves entry `seq` against the earliest local checkpoint that covers it.
pub fn prove(dir: &Path, seq: u64) -> Result<InclusionProof, StoreError> {
    let heads = read_checkpoints(dir)?;
    let checkpoint = heads
        .into_iter()
        .filter(|h| h.tree_size > seq)
        .min_by_key(|h| h.tree_size)
        .ok_or_else(|| {
            StoreError::Query(format!(
                "entry {seq} is not covered by a checkpoint yet; wait for the next one"
            ))
        })?;
    let leaves = store::leaves(dir, checkpoint.tree_size)?;
    let path = inclusion_proof(&leaves, seq as usize)
        .map_err(|e| StoreError::Query(format!("cannot build the proof: {e}")))?;
    let entry = store::segments(dir)?
        .iter()
        .rev()
        .find(|(first, _)| *first <= seq)
        .map(|(_, p)| p.clone())
        .ok_or_else(|| StoreError::Query(format!("entry {seq} is not in the store")))?;
    let line = std::fs::read_to_string(&entry)
        .map_err(|source| StoreError::Io {
            path: entry.display().to_string(),
            source,
        })?
        .lines()
        .find(|l| serde_json::from_str::<AuditEntry>(l).is_ok_and(|e| e.seq == seq))
        .map(str::to_string)
        .ok_or_else(|| StoreError::Query(format!("entry {seq} is not in the store")))?;
    Ok(InclusionProof {
        entry: line,
        leaf_index: seq,
        tree_size: checkpoint.tree_size,
        audit_path: path.iter().map(hex::encode).collect(),
        checkpoint,
    })
}

/// Checks a proof with nothing but the public key. Returns the proven entry.
pub fn check(proof: &InclusionProof, key: &VerifyingKey) -> Result<AuditEntry, String> {
    let entry: AuditEntry =
        serde_json::from_str(&proof.entry).map_err(|e| format!("entry is not valid: {e}"))?;
    if entry.to_line().ok().as_deref() != Some(proof.entry.as_str()) {
        return Err("entry is not in canonical form".into());
    }
    if entry.seq != proof.leaf_index {
        return Err(format!(
            "entry has seq {}, the proof is for leaf {}",
            entry.seq, proof.leaf_index
        ));
    }
    let computed = entry.compute_hash().map_err(|e| e.to_string())?;
    if computed != entry.hash {
        return Err("the entry's hash does not match its content".into());
    }
    let bytes = entry.hash_bytes().ok_or("the entry's hash is not hex")?;
    if proof.checkpoint.tree_size != proof.tree_size {
        return Err("the proof's tree size differs from its checkpoint's".into());
    }
    let root = proof
        .checkpoint
        .verify(key)
        .map_err(|e| format!("checkpoint: {e}"))?;
    let path: Vec<Hash> = proof
        .audit_path
        .iter()
        .map(|h| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(h, &mut out).map(|()| out)
        })
        .collect::<Result<_, _>>()
        .map_err(|_| "the audit path holds a value that is not a 32-byte hex hash")?;
    verify_inclusion(
        &leaf_hash(&bytes),
        proof.leaf_index,
        proof.tree_size,
        &path,
        &root,
    )
    .map_err(|e| format!("inclusion: {e}"))?;
    Ok(entry)
}
