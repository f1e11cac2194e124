//! Ingestion's progress ledger: one entry per file content (keyed by SHA-256) on a
//! compacted topic, written in the same Kafka transaction as the records it counts.
//! After a crash the committed entry says exactly which positions are downstream, so
//! a restart resumes after them: nothing is emitted twice and nothing is skipped.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use pipeline::PipelineError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    InProgress,
    Finished,
    Failed,
}

/// The committed state of one file's batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub batch_id: String,
    pub file_name: String,
    pub format: String,
    pub status: Status,
    /// The last position whose item (record or rejection) has committed; 0 for none.
    pub committed_position: u64,
    pub emitted: u64,
    pub rejected: u64,
    /// Event id of the batch's `DataIngestionStarted`, the cause of its record events.
    pub started_event_id: String,
    pub instance_id: String,
}

impl Entry {
    /// A batch with nothing committed yet.
    pub fn new(batch_id: &str, file_name: &str, instance_id: &str) -> Self {
        Entry {
            batch_id: batch_id.into(),
            file_name: file_name.into(),
            format: String::new(),
            status: Status::InProgress,
            committed_position: 0,
            emitted: 0,
            rejected: 0,
            started_event_id: String::new(),
            instance_id: instance_id.into(),
        }
    }

    pub fn to_json(&self) -> Result<Vec<u8>, PipelineError> {
        serde_json::to_vec(self).map_err(PipelineError::serialize("a ledger entry"))
    }
}

/// Reads the committed ledger: the last entry per file SHA-256.
pub fn read(
    kafka: &pipeline::kafka::Connection,
    topic: &str,
    timeout: Duration,
) -> Result<HashMap<String, Entry>, PipelineError> {
    let mut ledger = HashMap::new();
    for (key, value) in pipeline::readback::read_entries(kafka, topic, timeout)? {
        let Some(value) = value else {
            ledger.remove(&key);
            continue;
        };
        let entry = serde_json::from_slice::<Entry>(&value)
            .map_err(|e| PipelineError::storage(format!("ledger topic {topic}, entry {key}"), e))?;
        ledger.insert(key, entry);
    }
    Ok(ledger)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_as_json() {
        let e = Entry {
            batch_id: "b".into(),
            file_name: "f.csv".into(),
            format: "csv".into(),
            status: Status::InProgress,
            committed_position: 7,
            emitted: 6,
            rejected: 1,
            started_event_id: "s".into(),
            instance_id: "0".into(),
        };
        let json = e.to_json().expect("json");
        assert!(String::from_utf8_lossy(&json).contains("\"in_progress\""));
        assert_eq!(serde_json::from_slice::<Entry>(&json).expect("back"), e);
    }
}
