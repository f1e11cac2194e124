//! Turns one consumed message into an audit entry: ids, positions, policy and key ids in
//! the clear; anything that could be sensitive (file names, paths, reasons, requesters)
//! sealed with AES-256-GCM under the audit key.

use base64::Engine;
use pipeline::crypto::{seal, sha256_hex, KeyRef};
use pipeline::events::{
    BatchReleaseRequested, BatchRetryRequested, BatchWithdrawalRequested, Control, Payload,
};
use pipeline::runner::dlq_headers;
use pipeline::{Event, PipelineError};
use rdkafka::message::{Headers, Message, OwnedMessage};

use crate::entry::{AuditEntry, Sealed};

/// What an event says that the trail keeps, beyond its envelope.
#[derive(Debug, Default, PartialEq)]
pub struct Facts {
    pub subject: Option<String>,
    pub related_subject: Option<String>,
    pub policy: Option<String>,
    pub key_ids: Vec<String>,
    pub record_position: Option<i64>,
    pub records_expected: Option<i64>,
    pub records_in: Option<i64>,
    pub records_upstream: Option<i64>,
    /// Another batch the event links this one to: the new attempt of a `BatchRetried`.
    pub related_batch: Option<String>,
    /// What a saga transition says in the clear: kinds, stages and counts, never values.
    pub detail: Option<String>,
    /// (name, value) pairs to seal: they may name people (file names) or places.
    pub sensitive: Vec<(&'static str, String)>,
}

fn policy(version: &str, hash: Option<&String>) -> Option<String> {
    Some(match hash {
        Some(h) => format!("{version}#{}", h.get(..12).unwrap_or(h)),
        None => version.to_string(),
    })
}

/// The facts of each payload type. Canonical records, of whatever resource type, share
/// theirs; every other event type is matched exhaustively, so a new one fails to compile
/// here until its facts (and what of it to seal) are decided.
pub fn facts(p: &Payload) -> Facts {
    let mut f = Facts::default();
    if let Some((key, _, provenance)) = p.canonical() {
        // A shared resource's key is its own id, not a patient.
        let shared = p
            .resource_type()
            .is_some_and(pipeline::ResourceType::is_shared);
        f.subject = (!shared).then(|| key.to_string());
        f.policy = Some(provenance.policy_version.clone());
        f.record_position = Some(provenance.source_position);
        return f;
    }
    let Some(control) = p.control() else {
        return f;
    };
    match control {
        Control::StartDataIntakeCommand(c) => {
            f.sensitive = vec![
                ("file_path", c.file_path.clone()),
                ("requested_by", c.requested_by.clone()),
            ];
        }
        Control::DataIngestionCreated(c) => f.sensitive = vec![("file_name", c.file_name.clone())],
        Control::DataIngestionStarted(_) => {}
        Control::SourceRecordIngested(r) => {
            f.record_position = Some(r.position);
            f.key_ids = vec![r.sealed.key_id.clone()];
        }
        Control::RecordRejected(r) => {
            f.record_position = Some(r.position);
            f.sensitive = vec![
                ("file_name", r.file_name.clone()),
                ("reason", r.reason.clone()),
            ];
        }
        Control::DataIngestionFinished(d) => {
            f.records_expected = Some(d.records_emitted);
            f.sensitive = vec![("archive_location", d.archive_location.clone())];
        }
        Control::DataIngestionFailed(d) => {
            f.sensitive = vec![
                ("file_name", d.file_name.clone()),
                ("reason", d.reason.clone()),
                ("quarantine_location", d.quarantine_location.clone()),
            ];
        }
        Control::DataIngestionRejected(d) => {
            f.sensitive = vec![
                ("file_name", d.file_name.clone()),
                ("reason", d.reason.clone()),
                ("detail", d.detail.clone()),
            ];
            if let Some(q) = &d.quarantine_location {
                f.sensitive.push(("quarantine_location", q.clone()));
            }
        }
        Control::AnonymizationStarted(a) => {
            f.policy = policy(&a.policy_version, a.policy_hash.as_ref());
            f.key_ids = vec![a.key_id.clone()];
        }
        Control::RecordAnonymized(r) => {
            // A shared resource (a practitioner, a medication) has no patient.
            f.subject = (!r.patient_pseudonym.is_empty()).then(|| r.patient_pseudonym.clone());
            f.policy = policy(&r.policy_version, r.policy_hash.as_ref());
            f.key_ids = vec![r.key_id.clone()];
            f.record_position = Some(r.position);
        }
        Control::PatientMerged(m) => {
            f.subject = Some(m.surviving_pseudonym.clone());
            f.related_subject = Some(m.merged_pseudonym.clone());
            f.policy = Some(m.policy_version.clone());
            f.key_ids = vec![m.key_id.clone()];
            f.record_position = Some(m.position);
        }
        Control::AnonymizationFinished(a) => {
            f.policy = policy(&a.policy_version, a.policy_hash.as_ref());
            f.records_expected = a.records_anonymized;
            f.records_in = a
                .records_anonymized
                .zip(a.records_dead_lettered)
                .map(|(x, d)| x + d);
            f.records_upstream = Some(a.upstream_records_emitted);
        }
        Control::AnonymizationFailed(a) => {
            f.policy = policy(&a.policy_version, a.policy_hash.as_ref());
            f.sensitive = vec![("reason", a.reason.clone())];
        }
        Control::EventDataCanonizationCreated(c) => f.policy = Some(c.policy_version.clone()),
        Control::EventDataCanonizationStarted(_) => {}
        Control::EventDataCanonizationCompleted(c) => {
            f.records_expected = Some(c.resources_by_type.values().sum());
            f.records_in = Some(c.records_in);
        }
        Control::CanonizationFailed(c) => f.sensitive = vec![("reason", c.reason.clone())],
        Control::CanonicalBatchWithdrawn(c) => f.sensitive = vec![("reason", c.reason.clone())],
        Control::BatchRetried(r) => {
            f.related_batch = Some(r.new_batch_id.clone());
            f.detail = Some(r.mode.clone());
        }
        // An operator's request: who asked and why are sealed.
        Control::BatchRetryRequested(BatchRetryRequested {
            requested_by,
            reason,
            ..
        })
        | Control::BatchReleaseRequested(BatchReleaseRequested {
            requested_by,
            reason,
            ..
        })
        | Control::BatchWithdrawalRequested(BatchWithdrawalRequested {
            requested_by,
            reason,
            ..
        }) => f.sensitive = operator(requested_by, reason),
        Control::BatchReprocessRequested(r) => {
            f.policy.clone_from(&r.policy_version);
            f.sensitive = operator(&r.requested_by, &r.reason);
        }
        Control::BatchReprocessed(r) => {
            f.related_batch = Some(r.new_batch_id.clone());
            f.policy = Some(r.policy_version.clone());
            f.records_expected = Some(r.records_published);
        }
        Control::BatchReleased(r) => {
            f.related_batch = Some(r.new_batch_id.clone());
            f.records_expected = Some(r.records_published);
        }
        Control::BatchHeld(h) => {
            f.detail = Some(format!(
                "{} holds the batch: {} failed it ({}); {} records forwarded before",
                h.stage, h.failed_step, h.reason_kind, h.records_forwarded
            ));
            f.sensitive = vec![("reason", h.reason.clone())];
        }
        Control::AuditEntryRecorded(_) | Control::AuditCheckpoint(_) => {}
        Control::ComplianceAlert(_) => {}
    }
    f
}

/// The sealed part of an operator's request.
fn operator(requested_by: &str, reason: &str) -> Vec<(&'static str, String)> {
    vec![
        ("requested_by", requested_by.to_string()),
        ("reason", reason.to_string()),
    ]
}

fn header(msg: &OwnedMessage, name: &str) -> Option<String> {
    let hs = msg.headers()?;
    hs.iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Builds the (unchained) entry for one message. Messages that do not decode (dead
/// letters, poison) are still recorded, with what their headers say, sealed.
pub fn entry_for(
    msg: &OwnedMessage,
    decoded: Option<&Event>,
    key: &KeyRef,
) -> Result<AuditEntry, PipelineError> {
    let mut e = AuditEntry {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
        digest_sha256: sha256_hex(msg.payload().unwrap_or_default()),
        ..Default::default()
    };
    let sensitive = match decoded {
        Some(ev) => {
            let h = &ev.header;
            let f = facts(&ev.payload);
            e.event_id = Some(h.event_id.clone());
            e.event_type.clone_from(&h.event_type);
            e.correlation_id = Some(h.correlation_id.clone());
            e.causation_id.clone_from(&h.causation_id);
            e.source_service = Some(h.source_service.clone());
            e.occurred_at = Some(h.occurred_at);
            e.subject = f.subject;
            e.related_subject = f.related_subject;
            e.policy = f.policy;
            e.key_ids = f.key_ids;
            e.record_position = f.record_position;
            e.records_expected = f.records_expected;
            e.records_in = f.records_in;
            e.records_upstream = f.records_upstream;
            e.related_batch = f.related_batch;
            if f.detail.is_some() {
                e.detail = f.detail;
            }
            f.sensitive
        }
        None => {
            let stage = header(msg, dlq_headers::STAGE);
            e.event_type = if stage.is_some() {
                "DeadLetter".into()
            } else {
                "Undecodable".into()
            };
            e.source_service = stage.map(|s| format!("medpipe-{s}"));
            [
                ("error_type", dlq_headers::ERROR_TYPE),
                ("error_message", dlq_headers::ERROR_MESSAGE),
                ("source_topic", dlq_headers::SOURCE_TOPIC),
                ("source_partition", dlq_headers::SOURCE_PARTITION),
                ("source_offset", dlq_headers::SOURCE_OFFSET),
            ]
            .into_iter()
            .filter_map(|(name, h)| header(msg, h).map(|v| (name, v)))
            .collect()
        }
    };
    if !sensitive.is_empty() {
        let map: serde_json::Map<String, serde_json::Value> = sensitive
            .into_iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v)))
            .collect();
        let plain = serde_json::to_vec(&map).map_err(PipelineError::serialize("sealed details"))?;
        let aad = AuditEntry::seal_aad(&e.topic, e.partition, e.offset);
        let (nonce, ct) = seal(key, &plain, &aad)?;
        e.sealed = Some(Sealed {
            key_id: key.id.clone(),
            nonce_hex: hex::encode(nonce),
            ciphertext_b64: base64::engine::general_purpose::STANDARD.encode(ct),
        });
    }
    Ok(e)
}

/// Opens an entry's sealed details (for `medpipe audit trace --unseal`).
pub fn unseal(e: &AuditEntry, key: &KeyRef) -> Result<Option<serde_json::Value>, PipelineError> {
    let Some(s) = &e.sealed else {
        return Ok(None);
    };
    if s.key_id != key.id {
        return Err(PipelineError::Crypto(format!(
            "entry {} is sealed with key {}, not {}",
            e.seq, s.key_id, key.id
        )));
    }
    let bad = |what: &str| PipelineError::Crypto(format!("entry {}: {what}", e.seq));
    let nonce = hex::decode(&s.nonce_hex).map_err(|_| bad("nonce is not hex"))?;
    let ct = base64::engine::general_purpose::STANDARD
        .decode(&s.ciphertext_b64)
        .map_err(|_| bad("ciphertext is not base64"))?;
    let plain = pipeline::crypto::open(
        key,
        &nonce,
        &ct,
        &AuditEntry::seal_aad(&e.topic, e.partition, e.offset),
    )?;
    serde_json::from_slice(&plain)
        .map(Some)
        .map_err(|_| bad("sealed details are not JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline::events::{DataIngestionCreated, DataIngestionFinished};
    use rdkafka::message::{Header, OwnedHeaders, Timestamp};

    fn key() -> KeyRef {
        KeyRef::from_hex("audit-1", &"11".repeat(32)).expect("key")
    }

    fn msg(payload: &[u8], headers: Option<OwnedHeaders>) -> OwnedMessage {
        OwnedMessage::new(
            Some(payload.to_vec()),
            None,
            "medpipe.ingestion.v1".into(),
            Timestamp::NotAvailable,
            1,
            42,
            headers,
        )
    }

    #[test]
    fn file_names_are_sealed_and_open_again_with_the_key() {
        let ev = Event::new(
            "medpipe-ingestion",
            "batch-1",
            None,
            Payload::DataIngestionCreated(DataIngestionCreated {
                batch_id: "batch-1".into(),
                file_name: "smith_john_labs.csv".into(),
                file_size_bytes: 10,
                format: "csv".into(),
                file_sha256: "00".into(),
            }),
        );
        let e = entry_for(&msg(b"bytes", None), Some(&ev), &key()).expect("entry");
        let line = e.to_line().expect("line");
        assert!(!line.contains("smith"), "{line}");
        assert_eq!(e.event_type, "DataIngestionCreated");
        assert_eq!(e.digest_sha256, sha256_hex(b"bytes"));
        let open = unseal(&e, &key()).expect("open").expect("sealed");
        assert_eq!(open["file_name"], "smith_john_labs.csv");
        // Bound to the message position: moved elsewhere it no longer opens.
        let mut moved = e.clone();
        moved.offset = 43;
        assert!(unseal(&moved, &key()).is_err());
    }

    #[test]
    fn closing_events_carry_their_expected_counts() {
        let ev = Event::new(
            "medpipe-ingestion",
            "b",
            None,
            Payload::DataIngestionFinished(DataIngestionFinished {
                batch_id: "b".into(),
                records_emitted: 7,
                records_rejected: 1,
                file_size_bytes: 1,
                archive_location: "archive/b.enc".into(),
                file_sha256: "00".into(),
            }),
        );
        let e = entry_for(&msg(b"x", None), Some(&ev), &key()).expect("entry");
        assert_eq!(e.records_expected, Some(7));
    }

    #[test]
    fn a_shared_resource_has_no_subject_and_a_patient_record_its_pseudonym() {
        let anonymized = |pseudonym: &str| {
            Payload::RecordAnonymized(pipeline::events::RecordAnonymized {
                batch_id: "b".into(),
                position: 1,
                source_format: "fhir-bundle".into(),
                record_type: "Practitioner".into(),
                patient_pseudonym: pseudonym.into(),
                policy_version: "p".into(),
                key_id: "k".into(),
                content_json: "{}".into(),
                fields_redacted: 0,
                policy_hash: None,
                report_json: None,
                release_of: None,
                expected_concept_maps: None,
                reprocess_of: None,
            })
        };
        assert_eq!(facts(&anonymized("")).subject, None);
        assert_eq!(facts(&anonymized("abc")).subject.as_deref(), Some("abc"));
    }

    #[test]
    fn a_merge_names_the_survivor_as_subject_and_the_merged_patient_as_related() {
        let f = facts(&Payload::PatientMerged(pipeline::events::PatientMerged {
            batch_id: "b".into(),
            position: 4,
            source_format: "hl7v2".into(),
            record_type: "ADT^A40".into(),
            surviving_pseudonym: "survivor".into(),
            merged_pseudonym: "merged".into(),
            trigger: "hl7-merge".into(),
            merged_record_has_link: false,
            policy_version: "p".into(),
            key_id: "k".into(),
        }));
        assert_eq!(f.subject.as_deref(), Some("survivor"));
        assert_eq!(f.related_subject.as_deref(), Some("merged"));
        assert_eq!(f.record_position, Some(4));
        assert!(f.sensitive.is_empty());
    }

    #[test]
    fn dead_letters_are_recorded_with_sealed_reasons() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: dlq_headers::STAGE,
                value: Some("anonymization"),
            })
            .insert(Header {
                key: dlq_headers::ERROR_MESSAGE,
                value: Some("field PID-5 could not be parsed"),
            });
        let e = entry_for(&msg(b"poison", Some(headers)), None, &key()).expect("entry");
        assert_eq!(e.event_type, "DeadLetter");
        assert_eq!(e.source_service.as_deref(), Some("medpipe-anonymization"));
        assert!(!e.to_line().expect("line").contains("PID-5"));
        let open = unseal(&e, &key()).expect("open").expect("sealed");
        assert_eq!(open["error_message"], "field PID-5 could not be parsed");
    }
}
