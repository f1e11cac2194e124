//! Pure pieces of a batch: its id, its lifecycle events, the event for each parsed item
//! and the error-threshold rule. No IO, so they are tested without a broker.

use pipeline::crypto::DataKey;
use pipeline::events::{
    DataIngestionCreated, DataIngestionFailed, DataIngestionFinished, DataIngestionStarted,
    Payload, RecordRejected, SourceRecordIngested,
};
use pipeline::{Event, PipelineError};
use uuid::Uuid;

use crate::formats::{Item, SourceFormat};
use crate::SERVICE;

/// Namespace for batch ids: a batch id is derived from the file's SHA-256.
const BATCH_NAMESPACE: Uuid = Uuid::from_u128(0x6d65_6470_6970_6549_8000_0000_0000_0002);

pub fn batch_id_for(sha256: &str) -> String {
    Uuid::new_v5(&BATCH_NAMESPACE, sha256.as_bytes()).to_string()
}

/// What ingestion knows about a claimed file before parsing it. No PHI: the name is
/// the data engineer's file name, the rest is derived from bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFacts {
    pub batch_id: String,
    pub file_name: String,
    pub sha256: String,
    pub size_bytes: u64,
    pub format: SourceFormat,
    /// For an operator's release: the held batch this one releases as partial. No
    /// threshold fails a release.
    pub release_of: Option<String>,
    /// For an operator's reprocessing: the batch, and the versions it must run under.
    pub reprocess: Option<Reprocess>,
}

/// A reprocessing: the batch it reprocesses and the versions the stages must run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reprocess {
    pub of: String,
    pub policy: Option<String>,
    pub concept_maps: Option<String>,
}

/// `DataIngestionCreated` then `DataIngestionStarted`, caused by a command if any.
pub fn opening_events(facts: &FileFacts, command_event_id: Option<&str>) -> (Event, Event) {
    let created = Event::new(
        SERVICE,
        &facts.batch_id,
        command_event_id,
        Payload::DataIngestionCreated(DataIngestionCreated {
            batch_id: facts.batch_id.clone(),
            file_name: facts.file_name.clone(),
            file_sha256: facts.sha256.clone(),
            file_size_bytes: facts.size_bytes as i64,
            format: facts.format.as_str().into(),
        }),
    );
    let started = Event::caused_by(
        &created,
        SERVICE,
        Payload::DataIngestionStarted(DataIngestionStarted {
            batch_id: facts.batch_id.clone(),
            format: facts.format.as_str().into(),
            file_sha256: facts.sha256.clone(),
            release_of: facts.release_of.clone(),
            reprocess_of: facts.reprocess.as_ref().map(|r| r.of.clone()),
            expected_policy: facts.reprocess.as_ref().and_then(|r| r.policy.clone()),
            expected_concept_maps: facts
                .reprocess
                .as_ref()
                .and_then(|r| r.concept_maps.clone()),
        }),
    );
    (created, started)
}

/// The event for one parsed item: a sealed `SourceRecordIngested`, or a
/// `RecordRejected`. Returns whether it counts as emitted (true) or rejected (false).
pub fn item_event(
    facts: &FileFacts,
    started_event_id: &str,
    item: Item,
    data_key: &DataKey,
) -> (Event, bool) {
    let batch_id = &facts.batch_id;
    let rejected = |position: u64, error_kind: &str, reason: String| RecordRejected {
        batch_id: batch_id.clone(),
        file_name: facts.file_name.clone(),
        position: position as i64,
        error_kind: error_kind.into(),
        reason,
    };
    let (payload, emitted) = match item {
        Item::Record(r) => {
            let position = r.position as i64;
            // A body that cannot be serialised or sealed is rejected, never sent empty.
            let sealed = serde_json::to_vec(&r.body)
                .map_err(PipelineError::serialize("a record"))
                .and_then(|plain| {
                    data_key.seal_record(&plain, &SourceRecordIngested::aad(batch_id, position))
                });
            match sealed {
                Ok(sealed) => (
                    Payload::SourceRecordIngested(SourceRecordIngested {
                        batch_id: batch_id.clone(),
                        position,
                        source_format: facts.format.as_str().into(),
                        record_type: r.record_type,
                        sealed,
                    }),
                    true,
                ),
                Err(e) => (
                    Payload::RecordRejected(rejected(r.position, "seal", e.to_string())),
                    false,
                ),
            }
        }
        Item::Rejected(r) => (
            Payload::RecordRejected(rejected(r.position, r.error_kind, r.reason)),
            false,
        ),
    };
    (
        Event::new(SERVICE, batch_id, Some(started_event_id), payload),
        emitted,
    )
}

pub fn finished_event(
    facts: &FileFacts,
    started_event_id: &str,
    emitted: u64,
    rejected: u64,
    archive_location: &str,
) -> Event {
    Event::new(
        SERVICE,
        &facts.batch_id,
        Some(started_event_id),
        Payload::DataIngestionFinished(DataIngestionFinished {
            batch_id: facts.batch_id.clone(),
            records_emitted: emitted as i64,
            records_rejected: rejected as i64,
            file_size_bytes: facts.size_bytes as i64,
            file_sha256: facts.sha256.clone(),
            archive_location: archive_location.into(),
        }),
    )
}

/// Why a batch failed as a whole, with the counts emitted before the failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchFailure {
    pub error_kind: String,
    pub reason: String,
    pub counts: Option<(u64, u64)>,
}

impl BatchFailure {
    /// The file could not be read (as a whole, or from some point on).
    pub fn file(e: &crate::formats::FileError, counts: Option<(u64, u64)>) -> Self {
        BatchFailure {
            error_kind: e.kind().into(),
            reason: e.to_string(),
            counts,
        }
    }
}

pub fn failed_event(
    batch_id: &str,
    file_name: &str,
    cause: Option<&str>,
    failure: &BatchFailure,
    quarantine_location: &str,
) -> Event {
    Event::new(
        SERVICE,
        batch_id,
        cause,
        Payload::DataIngestionFailed(DataIngestionFailed {
            batch_id: batch_id.into(),
            file_name: file_name.into(),
            error_kind: failure.error_kind.clone(),
            reason: failure.reason.clone(),
            quarantine_location: quarantine_location.into(),
            records_emitted: failure.counts.map(|c| c.0 as i64),
            records_rejected: failure.counts.map(|c| c.1 as i64),
        }),
    )
}

/// The batch fails as a whole when more than `max_ratio` of its records were rejected.
pub fn over_threshold(emitted: u64, rejected: u64, max_ratio: f64) -> Option<BatchFailure> {
    let total = emitted + rejected;
    if total == 0 || (rejected as f64) <= max_ratio * total as f64 {
        return None;
    }
    Some(BatchFailure {
        error_kind: "error_threshold".into(),
        reason: format!(
            "{rejected} of {total} records rejected ({:.1}%), above the {:.1}% threshold",
            100.0 * rejected as f64 / total as f64,
            100.0 * max_ratio
        ),
        counts: Some((emitted, rejected)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::{ParsedRecord, Rejected, SourceRecordBody};
    use pipeline::crypto::{open_record, KeyRef};

    fn facts() -> FileFacts {
        FileFacts {
            batch_id: batch_id_for("abc"),
            file_name: "patients.csv".into(),
            sha256: "abc".into(),
            size_bytes: 10,
            format: SourceFormat::Csv,
            release_of: None,
            reprocess: None,
        }
    }

    #[test]
    fn batch_ids_are_stable_per_content() {
        assert_eq!(batch_id_for("abc"), batch_id_for("abc"));
        assert_ne!(batch_id_for("abc"), batch_id_for("abd"));
    }

    #[test]
    fn lifecycle_events_chain_by_causation() {
        let (c, s) = opening_events(&facts(), Some("cmd-event"));
        assert_eq!(c.header.causation_id.as_deref(), Some("cmd-event"));
        assert_eq!(
            s.header.causation_id.as_deref(),
            Some(c.header.event_id.as_str())
        );
        let f = finished_event(&facts(), &s.header.event_id, 2, 1, "/a");
        assert_eq!(f.header.causation_id, Some(s.header.event_id.clone()));
        assert!([&c, &s, &f]
            .iter()
            .all(|e| e.header.correlation_id == facts().batch_id));
    }

    #[test]
    fn records_are_sealed_and_rejections_keep_their_reason() {
        let master = KeyRef::from_hex("m1", &"11".repeat(32)).expect("key");
        let dk = DataKey::generate(&master).expect("dek");
        let body = SourceRecordBody {
            patient_link: Some("p1".into()),
            content: serde_json::json!({"FIRST": "Ann"}),
            original: "p1,Ann".into(),
        };
        let item = Item::Record(ParsedRecord {
            position: 3,
            record_type: "Patient".into(),
            body: body.clone(),
        });
        let (e, emitted) = item_event(&facts(), "s", item, &dk);
        assert!(emitted);
        let Payload::SourceRecordIngested(r) = &e.payload else {
            panic!("{e:?}")
        };
        assert_eq!(
            (r.position, r.record_type.as_str(), r.source_format.as_str()),
            (3, "Patient", "csv")
        );
        assert!(!format!("{e:?}").contains("Ann"));
        let plain = open_record(
            &master,
            &r.sealed,
            &SourceRecordIngested::aad(&facts().batch_id, 3),
        )
        .expect("open");
        assert_eq!(
            serde_json::from_slice::<SourceRecordBody>(&plain).expect("json"),
            body
        );
        let bad = Item::Rejected(Rejected {
            position: 4,
            error_kind: "csv_field_count",
            reason: "line 5: expected 2 fields, found 1".into(),
        });
        let (e, emitted) = item_event(&facts(), "s", bad, &dk);
        assert!(!emitted);
        let Payload::RecordRejected(r) = &e.payload else {
            panic!("{e:?}")
        };
        assert_eq!(
            (r.position, r.error_kind.as_str(), r.file_name.as_str()),
            (4, "csv_field_count", "patients.csv")
        );
    }

    #[test]
    fn the_error_threshold_is_a_strict_ratio() {
        assert_eq!(over_threshold(0, 0, 0.05), None);
        assert_eq!(over_threshold(95, 5, 0.05), None);
        let f = over_threshold(94, 6, 0.05).expect("fails");
        assert_eq!(
            f.reason,
            "6 of 100 records rejected (6.0%), above the 5.0% threshold"
        );
        assert_eq!(f.counts, Some((94, 6)));
        assert!(over_threshold(0, 1, 1.0).is_none());
    }
}
