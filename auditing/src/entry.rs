//! One audit entry: what the trail records about one message (or one compliance alert).
//! It holds ids, positions, versions and a digest; details that could be sensitive are
//! sealed with AES-256-GCM. It never holds plaintext PHI.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The hash the first entry chains to.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Details sealed with AES-256-GCM under the audit key `key_id`. The additional
/// authenticated data is [`AuditEntry::seal_aad`], which binds them to the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    pub key_id: String,
    pub nonce_hex: String,
    pub ciphertext_b64: String,
}

/// One entry of the chain, as stored (one JSON line per entry, fields in this order).
///
/// `seq`, `recorded_at`, `prev_hash` and `hash` are set by the store when it appends; the
/// rest describes the message. Alerts raised by the auditing stage itself are entries too,
/// with `partition` -1 and `offset` -1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    pub seq: u64,
    /// Microseconds since the epoch, by the auditor's clock.
    pub recorded_at: i64,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    pub event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_service: Option<String>,
    /// The event's own time, microseconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<i64>,
    /// The patient pseudonym a record event is about (keyed, never an identifier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// A second patient pseudonym the event is about: the merged patient of a
    /// `PatientMerged` (whose `subject` is the survivor). Indexed like `subject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub related_subject: Option<String>,
    /// Another batch the event links its batch to: a `BatchRetried`'s new attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub related_batch: Option<String>,
    /// The de-identification policy version (and hash) the event was produced under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Ids of the keys the event's data was sealed or pseudonymized with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_ids: Vec<String>,
    /// A per-record event's position in its batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_position: Option<i64>,
    /// How many records a closing event says the batch produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_expected: Option<i64>,
    /// How many input records a closing event says the stage accounted for (processed,
    /// dead-lettered or otherwise counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_in: Option<i64>,
    /// How many records a closing event says the stage before it emitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_upstream: Option<i64>,
    /// For alerts: what fired and where (stages, counts, locations; never values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<Sealed>,
    /// SHA-256 of the message value as it was on the topic.
    pub digest_sha256: String,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditEntry {
    /// The entry's hash: SHA-256 over the previous hash, a newline, and the entry's
    /// canonical JSON with `hash` empty.
    pub fn compute_hash(&self) -> Result<String, serde_json::Error> {
        let mut h = Sha256::new();
        h.update(self.prev_hash.as_bytes());
        h.update(b"\n");
        let mut unhashed = self.clone();
        unhashed.hash.clear();
        serde_json::to_writer(HashWriter(&mut h), &unhashed)?;
        Ok(hex::encode(h.finalize()))
    }

    /// The entry's canonical line (without the newline).
    pub fn to_line(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    /// The entry's hash as the 32 bytes the Merkle leaf is built from.
    pub fn hash_bytes(&self) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(&self.hash, &mut out).ok()?;
        Some(out)
    }

    /// Additional authenticated data for the sealed details: the message's position.
    pub fn seal_aad(topic: &str, partition: i32, offset: i64) -> Vec<u8> {
        format!("medpipe-audit-v1:{topic}:{partition}:{offset}").into_bytes()
    }

    /// True for entries the auditing stage wrote about itself (alerts).
    pub fn is_own(&self) -> bool {
        self.partition < 0
    }
}

struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AuditEntry {
        AuditEntry {
            seq: 7,
            recorded_at: 1,
            topic: "medpipe.ingestion.v1".into(),
            partition: 2,
            offset: 9,
            event_id: Some("e".into()),
            event_type: "SourceRecordIngested".into(),
            correlation_id: Some("b".into()),
            key_ids: vec!["master-1".into()],
            record_position: Some(3),
            sealed: Some(Sealed {
                key_id: "audit-1".into(),
                nonce_hex: "00".into(),
                ciphertext_b64: "AA==".into(),
            }),
            digest_sha256: "d".into(),
            prev_hash: GENESIS.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_hash_is_over_the_previous_hash_and_the_canonical_line() {
        let e = sample();
        let mut h = Sha256::new();
        h.update(e.prev_hash.as_bytes());
        h.update(b"\n");
        h.update(e.to_line().expect("line").as_bytes());
        assert_eq!(e.compute_hash().expect("hash"), hex::encode(h.finalize()));
    }

    #[test]
    fn the_hash_covers_every_field() {
        let base = sample().compute_hash().expect("hash");
        let mut e = sample();
        e.subject = Some("p".into());
        assert_ne!(e.compute_hash().expect("hash"), base);
        let mut e = sample();
        e.key_ids.clear();
        assert_ne!(e.compute_hash().expect("hash"), base);
        let mut e = sample();
        e.prev_hash = "1".repeat(64);
        assert_ne!(e.compute_hash().expect("hash"), base);
    }
}
