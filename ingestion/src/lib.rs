//! The ingestion stage: claims batch files from a landing folder, archives them
//! encrypted, and emits the batch's lifecycle events and one sealed event per record,
//! all in one Kafka transaction per file.
//!
//! Crash safety: a file is claimed by renaming it into `processing/`. Its events commit
//! in one transaction whose `DataIngestionFinished` carries the file's SHA-256. At
//! start-up the stage reads the committed `DataIngestionFinished` events to learn which
//! files are done; a file left in `processing/` by a crash is redone if its transaction
//! never committed (the new producer's `init_transactions` has aborted it) and only
//! cleaned up if it did.

pub mod csv_format;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use pipeline::crypto::{sha256_hex, DataKey, KeyRef};
use pipeline::error::kafka_err;
use pipeline::events::{
    DataIngestionCreated, DataIngestionFailed, DataIngestionFinished, DataIngestionStarted,
    Payload, RecordRejected, SourceRecordIngested,
};
use pipeline::runner::send_record;
use pipeline::telemetry::StageMetrics;
use pipeline::{Codec, Event, PipelineError, Topics};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::csv_format::Row;

pub const SERVICE: &str = "medpipe-ingestion";

/// Namespace for batch ids: a batch id is derived from the file's SHA-256.
const BATCH_NAMESPACE: Uuid = Uuid::from_u128(0x6d65_6470_6970_6549_8000_0000_0000_0002);

/// The folders ingestion works in, all below one data directory.
#[derive(Debug, Clone)]
pub struct Folders {
    pub landing: PathBuf,
    pub processing: PathBuf,
    pub archive: PathBuf,
    pub quarantine: PathBuf,
}

impl Folders {
    pub fn under(root: &Path) -> Self {
        Folders {
            landing: root.join("landing"),
            processing: root.join("processing"),
            archive: root.join("archive"),
            quarantine: root.join("quarantine"),
        }
    }

    pub fn create(&self) -> Result<(), PipelineError> {
        for d in [
            &self.landing,
            &self.processing,
            &self.archive,
            &self.quarantine,
        ] {
            std::fs::create_dir_all(d)
                .map_err(|e| PipelineError::io(d.display().to_string(), e))?;
        }
        Ok(())
    }
}

pub fn batch_id_for(sha256: &str) -> String {
    Uuid::new_v5(&BATCH_NAMESPACE, sha256.as_bytes()).to_string()
}

/// Builds a batch's events from its file. Pure apart from fresh nonces and ids.
pub fn batch_events(
    file_name: &str,
    bytes: &[u8],
    data_key: &DataKey,
    archive_location: &str,
) -> Result<Vec<Event>, (String, csv_format::FileError)> {
    let sha = sha256_hex(bytes);
    let batch_id = batch_id_for(&sha);
    let parsed = csv_format::parse(file_name, bytes).map_err(|e| (batch_id.clone(), e))?;
    let ev = |p: Payload| Event::new(SERVICE, &batch_id, None, p);
    let created = ev(Payload::DataIngestionCreated(DataIngestionCreated {
        batch_id: batch_id.clone(),
        file_name: file_name.to_string(),
        file_sha256: sha.clone(),
        file_size_bytes: bytes.len() as i64,
        format: "csv".into(),
    }));
    let caused = |cause: &Event, p: Payload| Event::caused_by(cause, SERVICE, p);
    let started = caused(
        &created,
        Payload::DataIngestionStarted(DataIngestionStarted {
            batch_id: batch_id.clone(),
            format: "csv".into(),
            file_sha256: sha.clone(),
        }),
    );
    let mut events = Vec::with_capacity(parsed.rows.len() + 3);
    let (mut emitted, mut rejected) = (0i64, 0i64);
    let mut records = Vec::with_capacity(parsed.rows.len());
    for (i, row) in parsed.rows.into_iter().enumerate() {
        let position = i as i64 + 1;
        let payload = match row {
            Row::Record(body) => {
                // A body that cannot be serialised is rejected, never sealed empty.
                let sealed = serde_json::to_vec(&body)
                    .map_err(|e| {
                        PipelineError::Crypto(format!("cannot serialise the record body: {e}"))
                    })
                    .and_then(|plain| {
                        data_key
                            .seal_record(&plain, &SourceRecordIngested::aad(&batch_id, position))
                    });
                match sealed {
                    Ok(sealed) => {
                        emitted += 1;
                        Payload::SourceRecordIngested(SourceRecordIngested {
                            batch_id: batch_id.clone(),
                            position,
                            source_format: "csv".into(),
                            record_type: parsed.record_type.clone(),
                            sealed,
                        })
                    }
                    Err(e) => {
                        rejected += 1;
                        Payload::RecordRejected(RecordRejected {
                            batch_id: batch_id.clone(),
                            file_name: file_name.to_string(),
                            position,
                            error_kind: "seal".into(),
                            reason: e.to_string(),
                        })
                    }
                }
            }
            Row::Rejected { error_kind, reason } => {
                rejected += 1;
                Payload::RecordRejected(RecordRejected {
                    batch_id: batch_id.clone(),
                    file_name: file_name.to_string(),
                    position,
                    error_kind: error_kind.into(),
                    reason,
                })
            }
        };
        records.push(caused(&started, payload));
    }
    let finished = caused(
        &started,
        Payload::DataIngestionFinished(DataIngestionFinished {
            batch_id: batch_id.clone(),
            records_emitted: emitted,
            records_rejected: rejected,
            file_size_bytes: bytes.len() as i64,
            file_sha256: sha,
            archive_location: archive_location.to_string(),
        }),
    );
    events.push(created);
    events.push(started);
    events.extend(records);
    events.push(finished);
    Ok(events)
}

/// Runtime settings of the ingestion loop.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub bootstrap_servers: String,
    pub transactional_id: String,
    pub topics: Topics,
    pub folders: Folders,
    pub poll_interval: Duration,
    pub transaction_timeout: Duration,
}

pub struct Ingestor {
    config: IngestConfig,
    codec: Arc<Codec>,
    master: KeyRef,
    metrics: StageMetrics,
    rt: Handle,
    producer: BaseProducer,
    /// SHA-256 of every file whose batch has committed.
    completed: HashSet<String>,
}

impl Ingestor {
    /// Runs until shutdown on a blocking thread (librdkafka's transaction calls block).
    pub async fn run(
        config: IngestConfig,
        codec: Arc<Codec>,
        master: KeyRef,
        metrics: StageMetrics,
        shutdown: CancellationToken,
    ) -> Result<(), PipelineError> {
        let rt = Handle::current();
        tokio::task::spawn_blocking(move || {
            config.folders.create()?;
            let producer: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", &config.bootstrap_servers)
                .set("transactional.id", &config.transactional_id)
                .set("transaction.timeout.ms", config.transaction_timeout.as_millis().to_string())
                .set("linger.ms", "5")
                .set("compression.type", "lz4")
                .create()
                .map_err(kafka_err("create producer"))?;
            pipeline::runner::retry_until(&shutdown, "init transactions", || {
                producer.init_transactions(Duration::from_secs(30)).map_err(kafka_err("init transactions"))
            })?;
            let completed = completed_files(&config, &codec, &rt)?;
            let mut me = Ingestor { config, codec, master, metrics, rt, producer, completed };
            me.metrics.set_ready(true);
            info!(landing = %me.config.folders.landing.display(), done = me.completed.len(), "Ingestion started.");
            me.recover()?;
            while !shutdown.is_cancelled() {
                me.scan_landing()?;
                std::thread::sleep(me.config.poll_interval);
            }
            info!("Ingestion stopped cleanly.");
            Ok(())
        })
        .await
        .map_err(|e| PipelineError::Config(format!("ingestion thread failed: {e}")))?
    }

    /// Finishes files a crash left in `processing/`.
    fn recover(&mut self) -> Result<(), PipelineError> {
        for path in files_in(&self.config.folders.processing)? {
            info!(file = %file_name(&path), "Recovering a file claimed before a restart.");
            self.ingest(&path, true)?;
        }
        Ok(())
    }

    fn scan_landing(&mut self) -> Result<(), PipelineError> {
        for path in files_in(&self.config.folders.landing)? {
            let claimed = self.config.folders.processing.join(file_name(&path));
            match std::fs::rename(&path, &claimed) {
                Ok(()) => self.ingest(&claimed, false)?,
                // Another instance claimed it first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(PipelineError::io(path.display().to_string(), e)),
            }
        }
        Ok(())
    }

    /// Ingests one claimed file in one transaction.
    fn ingest(&mut self, path: &Path, recovering: bool) -> Result<(), PipelineError> {
        let name = file_name(path);
        let bytes =
            std::fs::read(path).map_err(|e| PipelineError::io(path.display().to_string(), e))?;
        let sha = sha256_hex(&bytes);
        let batch_id = batch_id_for(&sha);
        if self.completed.contains(&sha) {
            if recovering {
                info!(
                    batch_id,
                    "File's batch had committed before the restart; cleaning up."
                );
                return remove(path);
            }
            return self.fail(
                path,
                &Uuid::new_v4().to_string(),
                "duplicate",
                &format!("same content as batch {batch_id}, which already committed"),
            );
        }
        let archive = self.config.folders.archive.join(format!("{batch_id}.enc"));
        let data_key = DataKey::generate(&self.master)?;
        let events = match batch_events(&name, &bytes, &data_key, &archive.display().to_string()) {
            Ok(ev) => ev,
            Err((batch_id, e)) => {
                return self.fail(path, &batch_id, "unreadable_file", &e.to_string())
            }
        };
        write_archive(&archive, &data_key, &batch_id, &bytes)?;
        self.commit(&batch_id, &events)?;
        self.completed.insert(sha);
        for e in &events {
            self.metrics
                .events_out
                .with_label_values(&[e.event_type()])
                .inc();
        }
        info!(batch_id, records = events.len() - 3, "Batch committed.");
        remove(path)
    }

    /// Moves the file to quarantine and emits `DataIngestionFailed`. Never deletes it.
    fn fail(
        &mut self,
        path: &Path,
        batch_id: &str,
        kind: &str,
        reason: &str,
    ) -> Result<(), PipelineError> {
        let dest = self
            .config
            .folders
            .quarantine
            .join(format!("{batch_id}-{}", file_name(path)));
        warn!(batch_id, error_kind = kind, reason, "File quarantined.");
        let event = Event::new(
            SERVICE,
            batch_id,
            None,
            Payload::DataIngestionFailed(DataIngestionFailed {
                batch_id: batch_id.to_string(),
                file_name: file_name(path),
                error_kind: kind.to_string(),
                reason: reason.to_string(),
                quarantine_location: dest.display().to_string(),
            }),
        );
        std::fs::rename(path, &dest)
            .map_err(|e| PipelineError::io(path.display().to_string(), e))?;
        self.commit(batch_id, &[event])
    }

    fn commit(&self, batch_id: &str, events: &[Event]) -> Result<(), PipelineError> {
        let topic = self
            .config
            .topics
            .name(pipeline::topics::TopicKind::Ingestion);
        let mut encoded = Vec::with_capacity(events.len());
        for e in events {
            encoded.push(self.rt.block_on(self.codec.encode(e))?);
        }
        self.producer
            .begin_transaction()
            .map_err(kafka_err("begin transaction"))?;
        let sent: Result<(), PipelineError> = encoded.iter().try_for_each(|b| {
            send_record(
                &self.producer,
                BaseRecord::to(&topic).key(batch_id).payload(b),
            )
        });
        let result = sent.and_then(|()| {
            self.producer
                .commit_transaction(self.config.transaction_timeout)
                .map_err(kafka_err("commit transaction"))
        });
        if let Err(e) = result {
            self.metrics.transactions_aborted.inc();
            let _ = self
                .producer
                .abort_transaction(self.config.transaction_timeout);
            return Err(e);
        }
        self.metrics.transactions_committed.inc();
        Ok(())
    }
}

/// Reads every committed `DataIngestionFinished` to learn which files are done.
fn completed_files(
    config: &IngestConfig,
    codec: &Codec,
    rt: &Handle,
) -> Result<HashSet<String>, PipelineError> {
    let topic = config.topics.name(pipeline::topics::TopicKind::Ingestion);
    let records = pipeline::readback::read_all(
        &config.bootstrap_servers,
        &[topic],
        Some((codec, rt)),
        Duration::from_secs(300),
    )?;
    Ok(records
        .into_iter()
        .filter_map(|r| match r.event.map(|e| e.payload) {
            Some(Payload::DataIngestionFinished(f)) => Some(f.file_sha256),
            _ => None,
        })
        .collect())
}

fn write_archive(
    path: &Path,
    key: &DataKey,
    batch_id: &str,
    bytes: &[u8],
) -> Result<(), PipelineError> {
    let sealed = key.seal_record(bytes, batch_id.as_bytes())?;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let doc = serde_json::json!({
        "format": "medpipe-archive-v1",
        "batch_id": batch_id,
        "key_id": sealed.key_id,
        "wrapped_key": b64(&sealed.wrapped_key),
        "nonce": b64(&sealed.nonce),
        "ciphertext": b64(&sealed.ciphertext),
    });
    let tmp = path.with_extension("tmp");
    let io = |e| PipelineError::io(path.display().to_string(), e);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(doc.to_string().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

fn files_in(dir: &Path) -> Result<Vec<PathBuf>, PipelineError> {
    let rd = std::fs::read_dir(dir).map_err(|e| PipelineError::io(dir.display().to_string(), e))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.path())
        .filter(|p| !file_name(p).starts_with('.'))
        .collect();
    files.sort();
    Ok(files)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn remove(path: &Path) -> Result<(), PipelineError> {
    // The raw bytes live on in the encrypted archive; only the clear copy goes.
    std::fs::remove_file(path).map_err(|e| PipelineError::io(path.display().to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline::crypto::open_record;

    #[test]
    fn a_batch_is_created_started_records_finished_with_counts() {
        let master = KeyRef::from_hex("m1", &"11".repeat(32)).expect("key");
        let dk = DataKey::generate(&master).expect("dek");
        let csv = b"Id,FIRST\np1,Ann\np2\np3,Cy\n";
        let events = batch_events("patients.csv", csv, &dk, "/a").expect("events");
        let types: Vec<_> = events.iter().map(|e| e.event_type()).collect();
        assert_eq!(
            types,
            vec![
                "DataIngestionCreated",
                "DataIngestionStarted",
                "SourceRecordIngested",
                "RecordRejected",
                "SourceRecordIngested",
                "DataIngestionFinished"
            ]
        );
        let batch = batch_id_for(&sha256_hex(csv));
        assert!(events.iter().all(|e| e.header.correlation_id == batch));
        let Payload::DataIngestionFinished(f) = &events[5].payload else {
            panic!()
        };
        assert_eq!((f.records_emitted, f.records_rejected), (2, 1));
        // The sealed body opens with the master key and holds the row.
        let Payload::SourceRecordIngested(r) = &events[4].payload else {
            panic!()
        };
        let plain =
            open_record(&master, &r.sealed, &SourceRecordIngested::aad(&batch, 3)).expect("open");
        let body: pipeline::events::SourceRecordBody =
            serde_json::from_slice(&plain).expect("json");
        assert_eq!(body.patient_link.as_deref(), Some("p3"));
        // No clear-text field of any event holds the names.
        let dbg = format!("{events:?}");
        assert!(!dbg.contains("Ann") && !dbg.contains("Cy\""));
    }
}
