//! The ingestion stage: claims batch files (dropped in a landing folder or named by a
//! `StartDataIntakeCommand`), archives them encrypted, and streams their records to
//! Kafka as sealed events, exactly once.
//!
//! Exactly-once, in short (ARCHITECTURE.md has the long form): a file is claimed by an
//! atomic rename into this instance's `processing/` folder, and its content by an
//! atomic `claims/<sha256>.json`. Records go out in chunked transactions; each one
//! also writes the batch's progress to the compacted ledger topic. A restart fences
//! the old producer, reads the ledger and resumes after the last committed position.

pub mod batch;
pub mod claims;
pub mod formats;
pub mod ledger;
pub mod synthetic;
pub mod watch;

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipeline::archive::ArchiveWriter;
use pipeline::crypto::{DataKey, KeyRef};
use pipeline::error::{kafka_err, ErrorClass};
use pipeline::events::{
    BatchRetried, BatchRetryRequested, DataIngestionRejected, Header as EventHeader, Payload,
    StartDataIntakeCommand,
};
use pipeline::kafka::{watched_consumer, ConsumerRole, WatchedConsumer, STUCK_AFTER};
use pipeline::runner::dead_letter;
use pipeline::telemetry::StageMetrics;
use pipeline::topics::TopicKind;
use pipeline::txn::{Transactions, TxnSettings};
use pipeline::{Codec, Event, PipelineError, Topics};
use rdkafka::consumer::Consumer;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::BaseRecord;
use rdkafka::{Offset, TopicPartitionList};
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn};

use crate::batch::{BatchFailure, FileFacts};
use crate::claims::{io, ContentClaim, ContentClaimed, Folders};
use crate::formats::{FileError, Item, ParseError, SourceFormat};

pub use crate::batch::batch_id_for;

pub const SERVICE: &str = "medpipe-ingestion";

/// Runtime settings of the ingestion loop.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub kafka: pipeline::kafka::Connection,
    pub transactional_id: String,
    /// Consumer group for the command topic.
    pub group_id: String,
    pub instance_id: String,
    pub topics: Topics,
    pub folders: Folders,
    pub poll_interval: Duration,
    pub transaction_timeout: Duration,
    /// A transaction closes after this many records ...
    pub chunk_records: usize,
    /// ... or after this long, whichever comes first.
    pub chunk_interval: Duration,
    /// A batch with a larger share of rejected records fails as a whole.
    pub max_reject_ratio: f64,
    pub csv: formats::csv::CsvOptions,
}

/// How a batch ended.
enum BatchEnd {
    Finished,
    Failed,
    /// Shutdown was requested mid-file; progress is committed and the file stays claimed.
    Stopped,
}

pub struct Ingestor {
    config: IngestConfig,
    codec: Arc<Codec>,
    master: KeyRef,
    metrics: StageMetrics,
    shutdown: CancellationToken,
    rt: Handle,
    txn: Transactions,
    commands: WatchedConsumer,
    /// Committed ledger entries, by file SHA-256 (or `rejected:<claimed name>`).
    ledger: HashMap<String, ledger::Entry>,
    chunk: Chunk,
    /// Wakes the idle loop when a file lands.
    watch: watch::LandingWatch,
}

/// What the open transaction holds: when the chunk closes, and metrics once it commits.
#[derive(Default)]
struct Chunk {
    started: Option<Instant>,
    records: usize,
    events: HashMap<&'static str, u64>,
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
            let mut me = Ingestor::connect(config, codec, master, metrics, shutdown, rt)?;
            me.metrics.set_ready(true);
            info!(
                landing = %me.config.folders.landing.display(),
                ledger_entries = me.ledger.len(),
                watching = me.watch.is_watching(),
                "Ingestion started."
            );
            me.main_loop()?;
            info!("Ingestion stopped cleanly.");
            Ok(())
        })
        .await
        .map_err(|e| PipelineError::Thread(format!("ingestion thread failed: {e}")))?
    }

    fn connect(
        config: IngestConfig,
        codec: Arc<Codec>,
        master: KeyRef,
        metrics: StageMetrics,
        shutdown: CancellationToken,
        rt: Handle,
    ) -> Result<Self, PipelineError> {
        config.folders.create()?;
        // Fences a previous incarnation, so the ledger read below is exactly what is
        // downstream.
        let txn = Transactions::connect(
            TxnSettings::new(
                &config.kafka,
                &config.transactional_id,
                config.transaction_timeout,
            ),
            metrics.clone(),
            &shutdown,
        )?;
        let ledger = read_ledger(&config, &shutdown)?;
        let commands = command_consumer(&config)?;
        let watch = watch::LandingWatch::new(&config.folders.landing);
        Ok(Ingestor {
            config,
            codec,
            master,
            metrics,
            shutdown,
            rt,
            txn,
            commands,
            ledger,
            chunk: Chunk::default(),
            watch,
        })
    }

    /// The rewind rule after a failed step: end the transaction so the committed state is
    /// definite, re-read the ledger (what is committed downstream, where each batch
    /// resumes), and start the command consumer again from its committed offset.
    fn rewind(&mut self) -> Result<(), PipelineError> {
        self.metrics
            .rewinds
            .with_label_values(&["failed_batch"])
            .inc();
        self.chunk = Chunk::default();
        self.txn.recover(&self.shutdown)?;
        self.ledger = read_ledger(&self.config, &self.shutdown)?;
        // Commands are rare, so the command consumer is simply recreated: the new
        // member's assignment starts at the committed offsets.
        self.replace_command_consumer()?;
        info!(
            ledger_entries = self.ledger.len(),
            "Resuming from the committed ledger."
        );
        Ok(())
    }

    /// A new command consumer; the old one is closed aside (`pipeline::kafka::drop_aside`).
    fn replace_command_consumer(&mut self) -> Result<(), PipelineError> {
        let new = command_consumer(&self.config)?;
        let old = std::mem::replace(&mut self.commands, new);
        pipeline::kafka::drop_aside("command consumer", old, &self.metrics.calls_abandoned);
        Ok(())
    }

    /// Finishes this instance's claimed files, then claims one file at a time so that
    /// several instances share a landing folder.
    fn main_loop(&mut self) -> Result<(), PipelineError> {
        while !self.shutdown.is_cancelled() {
            match self.step() {
                Ok(true) => continue,
                Ok(false) => {
                    self.watch.wait(self.config.poll_interval);
                }
                Err(e) => {
                    if e.class() == ErrorClass::Fatal {
                        return Err(e);
                    }
                    warn!(error = %e, "Ingestion step failed; rewinding to the committed state.");
                    self.rewind()?;
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        Ok(())
    }

    /// One round: finish claimed files, take commands, claim a landing file. True if
    /// there was anything to do, so the loop goes on without sleeping.
    fn step(&mut self) -> Result<bool, PipelineError> {
        self.process_claimed()?;
        let commands = self.poll_commands()?;
        let landing = self.claim_one_landing_file()?;
        Ok(commands || landing)
    }

    /// Ingests every file in this instance's `processing/` folder, oldest claim first.
    fn process_claimed(&mut self) -> Result<(), PipelineError> {
        for path in claims::files_in(&self.config.folders.processing)? {
            if self.shutdown.is_cancelled() {
                break;
            }
            self.ingest_claimed(&path)?;
        }
        Ok(())
    }

    /// Claims the first file in the landing folder. True if it claimed one.
    fn claim_one_landing_file(&mut self) -> Result<bool, PipelineError> {
        for path in claims::files_in(&self.config.folders.landing)? {
            if claims::claim(&path, &self.config.folders.processing)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn ingest_claimed(&mut self, path: &Path) -> Result<(), PipelineError> {
        let claimed = claims::file_name(path);
        let name = claims::original_name(&claimed).to_string();
        let sidecar = claims::read_sidecar(path)?;
        let command_event = sidecar.as_ref().map(|s| s.command_event_id.clone());
        let rejected_key = format!("rejected:{claimed}");
        if self.ledger.contains_key(&rejected_key) {
            // Refused before a restart; only the move to quarantine was left to do.
            return self.move_to_quarantine(path).map(drop);
        }
        let (sha, size) = hash_file(path)?;
        // A retry is a new batch of the same content: its own content claim, ledger key
        // and batch id, all derived from the request.
        let retry_of = sidecar.as_ref().and_then(|s| s.retry_of.clone());
        let key = match (&retry_of, &sidecar) {
            (Some(_), Some(s)) => retry_key(&sha, &s.command_id),
            _ => sha.clone(),
        };
        let batch_id = batch_id_for(&key);
        let span = info_span!("batch", correlation_id = %batch_id);
        let _enter = span.enter();
        let mine = ContentClaim {
            batch_id: batch_id.clone(),
            instance_id: self.config.instance_id.clone(),
            claimed_as: claimed.clone(),
        };
        let resumed = match claims::claim_content(&self.config.folders.claims, &key, &mine)? {
            ContentClaimed::New => false,
            ContentClaimed::Existing(c) if c == mine => true,
            ContentClaimed::Existing(first) => {
                return self.reject_duplicate(path, &name, &sha, &first, sidecar.as_ref())
            }
        };
        match self.ledger.get(&key).map(|e| e.status) {
            Some(ledger::Status::Finished) if resumed => {
                info!("Batch had committed before a restart; removing the clear copy.");
                return remove(path);
            }
            Some(ledger::Status::Failed) if resumed => {
                return self.move_to_quarantine(path).map(drop);
            }
            Some(ledger::Status::Finished | ledger::Status::Failed) => {
                // The claims folder lost this content's claim, but the ledger has it.
                let first = ContentClaim {
                    batch_id: batch_id.clone(),
                    instance_id: "unknown".into(),
                    claimed_as: String::new(),
                };
                return self.reject_duplicate(path, &name, &sha, &first, sidecar.as_ref());
            }
            _ => {}
        }
        let archive = self.config.folders.archive.join(format!("{batch_id}.enc"));
        let forced = sidecar.as_ref().and_then(|s| s.format.as_deref());
        let prepared = match pick_format(path, &name, forced) {
            Ok(format) if archive.exists() => Ok(format),
            Ok(format) => write_archive(path, &archive, &self.master)?.map(|()| format),
            Err(e) => Err(e),
        };
        let format = match prepared {
            Ok(format) => format,
            Err(e) => {
                let entry = ledger::Entry::new(&batch_id, &name, &self.config.instance_id);
                let cause = command_event.as_deref();
                return self.fail_file(path, &key, entry, cause, &BatchFailure::file(&e, None));
            }
        };
        let release = sidecar.as_ref().is_some_and(|s| s.release);
        let facts = FileFacts {
            batch_id: batch_id.clone(),
            file_name: name.clone(),
            sha256: sha.clone(),
            size_bytes: size,
            format,
            release_of: retry_of.clone().filter(|_| release),
            reprocess: sidecar.as_ref().and_then(|s| s.reprocess.clone()),
        };
        let archive_location = archive.display().to_string();
        let work = match self.ledger.get(&key) {
            Some(e) if e.status == ledger::Status::InProgress => {
                info!(
                    position = e.committed_position,
                    "Resuming a batch after its last committed position."
                );
                e.clone()
            }
            _ => {
                let (created, started) = batch::opening_events(&facts, command_event.as_deref());
                let entry = ledger::Entry {
                    format: format.as_str().into(),
                    started_event_id: started.header.event_id.clone(),
                    ..ledger::Entry::new(&batch_id, &name, &self.config.instance_id)
                };
                self.send_event(&created)?;
                self.send_event(&started)?;
                if let (Some(old), Some(s)) = (&retry_of, &sidecar) {
                    // The link between the attempts, in the same transaction.
                    self.send_event(&Event::new(
                        SERVICE,
                        old,
                        Some(&s.command_event_id),
                        Payload::BatchRetried(BatchRetried {
                            batch_id: old.clone(),
                            new_batch_id: batch_id.clone(),
                            request_id: s.command_id.clone(),
                            file_sha256: sha.clone(),
                            mode: s.attempt().into(),
                        }),
                    ))?;
                    info!(retry_of = %old, release, "Retrying a batch from its archive.");
                }
                self.checkpoint(&key, &entry)?;
                info!(format = %format, "Batch started.");
                entry
            }
        };
        match self.stream_records(path, &facts, &key, work, &archive_location)? {
            BatchEnd::Finished => remove(path),
            BatchEnd::Failed | BatchEnd::Stopped => Ok(()),
        }
    }

    /// Parses the file and emits every item after the committed position, in chunked
    /// transactions, then the batch's closing event.
    fn stream_records(
        &mut self,
        path: &Path,
        facts: &FileFacts,
        key: &str,
        mut work: ledger::Entry,
        archive_location: &str,
    ) -> Result<BatchEnd, PipelineError> {
        let data_key = DataKey::generate(&self.master)?;
        let resume_after = work.committed_position;
        let started_id = work.started_event_id.clone();
        let mut failure: Option<PipelineError> = None;
        let mut stopped = false;
        let csv = self.config.csv.clone();
        let parsed = {
            let mut sink = |item: Item| -> Result<(), formats::Halt> {
                let position = item.position();
                if position <= resume_after {
                    return Ok(());
                }
                if self.shutdown.is_cancelled() {
                    stopped = true;
                    return Err(formats::Halt);
                }
                let (event, emitted) = batch::item_event(facts, &started_id, item, &data_key);
                let step = self.send_event(&event).and_then(|()| {
                    work.committed_position = position;
                    if emitted {
                        work.emitted += 1;
                    } else {
                        work.rejected += 1;
                    }
                    if self.chunk_due() {
                        self.checkpoint(key, &work)
                    } else {
                        Ok(())
                    }
                });
                step.map_err(|e| {
                    failure = Some(e);
                    formats::Halt
                })
            };
            parse_file(facts.format, path, &facts.file_name, &csv, &mut sink)
        };
        let ending = match parsed {
            // A release is accepted partial: its rejected records are rejected, no more.
            Ok(()) if facts.release_of.is_some() => None,
            Ok(()) => {
                batch::over_threshold(work.emitted, work.rejected, self.config.max_reject_ratio)
            }
            Err(ParseError::File(e)) => {
                Some(BatchFailure::file(&e, Some((work.emitted, work.rejected))))
            }
            Err(ParseError::Halted) => {
                if let Some(e) = failure {
                    return Err(e);
                }
                debug_assert!(stopped);
                self.checkpoint(key, &work)?;
                info!(
                    position = work.committed_position,
                    "Stopping mid-batch; progress committed."
                );
                return Ok(BatchEnd::Stopped);
            }
        };
        match ending {
            None => {
                let finished = batch::finished_event(
                    facts,
                    &started_id,
                    work.emitted,
                    work.rejected,
                    archive_location,
                );
                work.status = ledger::Status::Finished;
                self.send_event(&finished)?;
                self.checkpoint(key, &work)?;
                info!(
                    emitted = work.emitted,
                    rejected = work.rejected,
                    "Batch finished."
                );
                Ok(BatchEnd::Finished)
            }
            Some(f) => {
                self.fail_file(path, key, work, Some(&started_id), &f)?;
                Ok(BatchEnd::Failed)
            }
        }
    }

    /// Commits `DataIngestionFailed` and the ledger's failed state (with the batch's
    /// counts and position as they stand), then moves the file to quarantine (a crash in
    /// between is finished by the restart).
    fn fail_file(
        &mut self,
        path: &Path,
        sha: &str,
        mut entry: ledger::Entry,
        cause: Option<&str>,
        failure: &BatchFailure,
    ) -> Result<(), PipelineError> {
        let dest = self.quarantine_path(path);
        warn!(error_kind = %failure.error_kind, reason = %failure.reason, "Batch failed; file quarantined.");
        let location = dest.display().to_string();
        let event =
            batch::failed_event(&entry.batch_id, &entry.file_name, cause, failure, &location);
        entry.status = ledger::Status::Failed;
        self.send_event(&event)?;
        self.checkpoint(sha, &entry)?;
        self.move_to_quarantine(path).map(drop)
    }

    fn reject_duplicate(
        &mut self,
        path: &Path,
        name: &str,
        sha: &str,
        first: &ContentClaim,
        sidecar: Option<&claims::CommandSidecar>,
    ) -> Result<(), PipelineError> {
        let dest = self.quarantine_path(path);
        info!(first_batch = %first.batch_id, "Duplicate content refused; file quarantined.");
        let event = Event::new(
            SERVICE,
            &first.batch_id,
            sidecar.map(|s| s.command_event_id.as_str()),
            Payload::DataIngestionRejected(DataIngestionRejected {
                batch_id: first.batch_id.clone(),
                file_name: name.into(),
                file_sha256: Some(sha.into()),
                reason: "duplicate".into(),
                detail: format!(
                    "same content (SHA-256) as batch {}, already claimed by ingestion instance {}",
                    first.batch_id, first.instance_id
                ),
                quarantine_location: Some(dest.display().to_string()),
                command_id: sidecar.map(|s| s.command_id.clone()),
            }),
        );
        let key = format!("rejected:{}", claims::file_name(path));
        let entry = ledger::Entry {
            status: ledger::Status::Failed,
            ..ledger::Entry::new(&first.batch_id, name, &self.config.instance_id)
        };
        self.send_event(&event)?;
        self.checkpoint(&key, &entry)?;
        self.move_to_quarantine(path).map(drop)
    }

    fn quarantine_path(&self, path: &Path) -> std::path::PathBuf {
        self.config.folders.quarantine.join(claims::file_name(path))
    }

    /// Moves a claimed file (and its command sidecar) to quarantine. Never deletes it.
    fn move_to_quarantine(&self, path: &Path) -> Result<std::path::PathBuf, PipelineError> {
        let dest = self.quarantine_path(path);
        if path.exists() {
            std::fs::rename(path, &dest).map_err(|e| io(path, e))?;
        }
        let sidecar = claims::sidecar_path(path);
        if sidecar.exists() {
            std::fs::rename(&sidecar, claims::sidecar_path(&dest)).map_err(|e| io(&sidecar, e))?;
        }
        Ok(dest)
    }

    /// Reads up to a few commands and claims the files they name.
    fn poll_commands(&mut self) -> Result<bool, PipelineError> {
        if let Some(why) = self.commands.context().watch.stuck(STUCK_AFTER) {
            warn!(
                why,
                "The command consumer has been stuck for 30s; recreating it."
            );
            self.replace_command_consumer()?;
        }
        let mut handled = false;
        for _ in 0..16 {
            let msg = match self.commands.poll(Duration::ZERO) {
                None => break,
                Some(Err(e)) => {
                    warn!(error = %e, "Command consumer error.");
                    break;
                }
                Some(Ok(m)) => m.detach(),
            };
            self.handle_command(&msg)?;
            handled = true;
        }
        Ok(handled)
    }

    /// Claims the file a command names, or refuses the command. The command's offset
    /// commits in the same transaction as the refusal; a redelivered command whose file
    /// was already claimed is recognised by its marker and skipped.
    fn handle_command(&mut self, msg: &OwnedMessage) -> Result<(), PipelineError> {
        let decoded = match msg.payload() {
            Some(b) => self.rt.block_on(self.codec.decode(b)),
            None => Err(PipelineError::Decode("command message has no value".into())),
        };
        let saga = msg.topic() == self.config.topics.name(TopicKind::Saga);
        let (event, cmd) = match decoded {
            Ok(Event {
                header,
                payload: Payload::StartDataIntakeCommand(c),
            }) if !saga => (header, c),
            Ok(Event {
                header,
                payload: Payload::BatchRetryRequested(r),
            }) if saga => return self.handle_retry(msg, &header, &r, Attempt::Retry),
            Ok(Event {
                header,
                payload: Payload::BatchReprocessRequested(r),
            }) if saga => {
                let attempt = Attempt::Reprocess(batch::Reprocess {
                    of: r.batch_id.clone(),
                    policy: r.policy_version,
                    concept_maps: r.concept_map_version,
                });
                let r = BatchRetryRequested {
                    batch_id: r.batch_id,
                    request_id: r.request_id,
                    requested_by: r.requested_by,
                    reason: r.reason,
                };
                return self.handle_retry(msg, &header, &r, attempt);
            }
            Ok(Event {
                header,
                payload: Payload::BatchReleaseRequested(r),
            }) if saga => {
                let r = BatchRetryRequested {
                    batch_id: r.batch_id,
                    request_id: r.request_id,
                    requested_by: r.requested_by,
                    reason: r.reason,
                };
                return self.handle_retry(msg, &header, &r, Attempt::Release);
            }
            // Another stage's business on the saga topic.
            Ok(_) if saga => return self.commit_command_offset(msg),
            Ok(other) => {
                let reason = format!(
                    "expected StartDataIntakeCommand, got {}",
                    other.event_type()
                );
                return self.dead_letter_command(msg, "unexpected_event_type", &reason);
            }
            // Only a message that cannot be decoded is dead-lettered. A registry that does
            // not answer (retried after a rewind) or refuses our credentials (fatal) says
            // nothing about the command, which must not be lost to the DLQ for it.
            Err(e) if e.class() != ErrorClass::DeadLetter => return Err(e),
            Err(e) => return self.dead_letter_command(msg, "undecodable", &e.to_string()),
        };
        let refusal = match self.claim_for_command(&event.event_id, &cmd)? {
            Ok(()) => None,
            Err((reason, detail)) => Some(Event::new(
                SERVICE,
                &cmd.command_id,
                Some(&event.event_id),
                Payload::DataIngestionRejected(DataIngestionRejected {
                    batch_id: cmd.command_id.clone(),
                    file_name: cmd.file_path.clone(),
                    file_sha256: None,
                    reason: reason.into(),
                    detail,
                    quarantine_location: None,
                    command_id: Some(cmd.command_id.clone()),
                }),
            )),
        };
        if let Some(e) = &refusal {
            warn!(command_id = %cmd.command_id, "Intake command refused.");
            self.send_event(e)?;
        }
        self.commit_command_offset(msg)
    }

    /// A retry (or release) request: the old batch's file comes back from its encrypted archive into
    /// `processing/` as a new claimed file, under a name fixed by the request, and is
    /// ingested from there as a new batch (see `ingest_claimed`). At most once per request:
    /// a marker per request is written first, and a redelivered request whose copy or new
    /// batch exists does nothing more. A request that cannot be carried out is refused
    /// with `DataIngestionRejected` (correlated by the request id), never dropped.
    fn handle_retry(
        &mut self,
        msg: &OwnedMessage,
        header: &EventHeader,
        r: &BatchRetryRequested,
        attempt: Attempt,
    ) -> Result<(), PipelineError> {
        let span = info_span!("retry", correlation_id = %r.batch_id, attempt = attempt.name());
        let _enter = span.enter();
        if let Err((reason, detail)) = self.prepare_retry(&header.event_id, r, attempt)? {
            warn!(reason, "Retry request refused.");
            let refusal = Event::new(
                SERVICE,
                &r.request_id,
                Some(&header.event_id),
                Payload::DataIngestionRejected(DataIngestionRejected {
                    batch_id: r.request_id.clone(),
                    file_name: String::new(),
                    file_sha256: None,
                    reason: reason.into(),
                    detail,
                    quarantine_location: None,
                    command_id: Some(r.request_id.clone()),
                }),
            );
            self.send_event(&refusal)?;
        }
        self.commit_command_offset(msg)
    }

    #[allow(clippy::type_complexity)]
    fn prepare_retry(
        &mut self,
        request_event_id: &str,
        r: &BatchRetryRequested,
        attempt: Attempt,
    ) -> Result<Result<(), (&'static str, String)>, PipelineError> {
        let request = sanitize(&r.request_id);
        if request.is_empty() {
            return Ok(Err(("retry_invalid", "the request has no id".into())));
        }
        let found = self
            .ledger
            .iter()
            .find(|(k, e)| e.batch_id == r.batch_id && !k.starts_with("rejected:"));
        let Some((old_key, old)) = found else {
            return Ok(Err((
                "retry_unknown_batch",
                format!("ingestion has no batch {}", r.batch_id),
            )));
        };
        if old.status == ledger::Status::InProgress {
            return Ok(Err((
                "retry_in_progress",
                format!("batch {} is still being ingested", r.batch_id),
            )));
        }
        let sha = content_sha(old_key).to_string();
        let (name, format) = (old.file_name.clone(), old.format.clone());
        let key = retry_key(&sha, &r.request_id);
        let folders = &self.config.folders;
        let dest = folders
            .processing
            .join(claims::retry_claimed_name(&request, &name));
        let marker = folders.claims.join("retries").join(&request);
        if marker.exists() && (dest.exists() || self.ledger.contains_key(&key)) {
            info!("Retry request already carried out.");
            return Ok(Ok(()));
        }
        let archive = folders.archive.join(format!("{}.enc", r.batch_id));
        if !archive.exists() {
            return Ok(Err((
                "retry_no_archive",
                format!("the archive of batch {} is missing", r.batch_id),
            )));
        }
        claims::write_atomic(&marker, request_event_id.as_bytes())?;
        let sidecar = claims::CommandSidecar {
            command_id: r.request_id.clone(),
            command_event_id: request_event_id.into(),
            format: (!format.is_empty()).then_some(format),
            retry_of: Some(r.batch_id.clone()),
            release: matches!(attempt, Attempt::Release),
            reprocess: match attempt {
                Attempt::Reprocess(v) => Some(v),
                _ => None,
            },
        };
        let body = serde_json::to_vec(&sidecar).map_err(PipelineError::serialize("a sidecar"))?;
        claims::write_atomic(&claims::sidecar_path(&dest), &body)?;
        // Decrypted beside its destination (a temporary name is never claimed), then
        // renamed into place.
        let tmp = folders.processing.join(format!(".retry-{request}.tmp"));
        {
            let mut out = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
            pipeline::archive::open_archive(&archive, &self.master, &mut out)?;
            out.sync_all().map_err(|e| io(&tmp, e))?;
        }
        std::fs::rename(&tmp, &dest).map_err(|e| io(&dest, e))?;
        Ok(Ok(()))
    }

    /// `Ok(Err((reason, detail)))` is a refusal to report, not a failure of ingestion.
    #[allow(clippy::type_complexity)]
    fn claim_for_command(
        &mut self,
        command_event_id: &str,
        cmd: &StartDataIntakeCommand,
    ) -> Result<Result<(), (&'static str, String)>, PipelineError> {
        if let Some(f) = &cmd.format {
            if let Err(e) = f.parse::<SourceFormat>() {
                return Ok(Err(("invalid_format", e)));
            }
        }
        let marker = self
            .config
            .folders
            .claims
            .join("commands")
            .join(sanitize(&cmd.command_id));
        let seen = marker.exists();
        let source = match claims::resolve_intake(&self.config.folders.intake, &cmd.file_path) {
            Ok(p) => p,
            // Claimed before a crash that lost the offset commit: nothing left to do.
            Err("not_found") if seen => return Ok(Ok(())),
            Err(reason) => {
                let detail = format!("{} is not a file inside the intake folder", cmd.file_path);
                return Ok(Err((reason, detail)));
            }
        };
        if !seen {
            claims::write_atomic(&marker, command_event_id.as_bytes())?;
        }
        let dest = self
            .config
            .folders
            .processing
            .join(claims::claimed_name(&claims::file_name(&source)));
        let sidecar = claims::CommandSidecar {
            command_id: cmd.command_id.clone(),
            command_event_id: command_event_id.into(),
            format: cmd.format.clone(),
            retry_of: None,
            release: false,
            reprocess: None,
        };
        let body = serde_json::to_vec(&sidecar).map_err(|e| PipelineError::Serialize {
            what: "a command sidecar",
            message: e.to_string(),
        })?;
        claims::write_atomic(&claims::sidecar_path(&dest), &body)?;
        match std::fs::rename(&source, &dest) {
            Ok(()) => Ok(Ok(())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let _ = std::fs::remove_file(claims::sidecar_path(&dest));
                Ok(Err((
                    "not_found",
                    format!("{} disappeared before it could be claimed", cmd.file_path),
                )))
            }
            Err(e) => Err(io(&source, e)),
        }
    }

    fn dead_letter_command(
        &mut self,
        msg: &OwnedMessage,
        kind: &str,
        reason: &str,
    ) -> Result<(), PipelineError> {
        self.begin()?;
        dead_letter(
            self.txn.producer(),
            &self.config.topics.dlq("ingestion"),
            "ingestion",
            msg,
            ErrorClass::DeadLetter,
            kind,
            reason,
        )?;
        self.metrics.dead_letters.with_label_values(&[kind]).inc();
        self.commit_command_offset(msg)
    }

    fn commit_command_offset(&mut self, msg: &OwnedMessage) -> Result<(), PipelineError> {
        self.begin()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            msg.topic(),
            msg.partition(),
            Offset::Offset(msg.offset() + 1),
        )
        .map_err(kafka_err("build offsets"))?;
        let group = self
            .commands
            .group_metadata()
            .ok_or(PipelineError::Invariant(
                "the command consumer has no group metadata",
            ))?;
        self.txn.commit(Some((tpl, group)))?;
        self.chunk_committed();
        Ok(())
    }

    fn begin(&mut self) -> Result<(), PipelineError> {
        self.txn.begin()?;
        self.chunk.started.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Sends one event inside the open transaction, keyed by its batch so a batch's
    /// lifecycle events and records share a partition and stay in order.
    fn send_event(&mut self, event: &Event) -> Result<(), PipelineError> {
        self.begin()?;
        let bytes = self.rt.block_on(self.codec.encode(event))?;
        let topic = self.config.topics.name(event.payload.topic_kind());
        self.txn.send(
            BaseRecord::to(&topic)
                .key(event.header.correlation_id.as_str())
                .payload(&bytes),
        )?;
        self.chunk.records += 1;
        *self.chunk.events.entry(event.event_type()).or_default() += 1;
        Ok(())
    }

    fn chunk_due(&self) -> bool {
        self.chunk.records >= self.config.chunk_records
            || self
                .chunk
                .started
                .is_some_and(|t| t.elapsed() >= self.config.chunk_interval)
    }

    /// Writes the ledger entry into the open transaction and commits it.
    fn checkpoint(&mut self, key: &str, entry: &ledger::Entry) -> Result<(), PipelineError> {
        self.begin()?;
        let value = entry.to_json()?;
        self.txn.send(
            BaseRecord::to(&self.config.topics.ingestion_ledger())
                .key(key)
                .payload(&value),
        )?;
        self.txn.commit(None)?;
        self.chunk_committed();
        self.ledger.insert(key.to_string(), entry.clone());
        Ok(())
    }

    fn chunk_committed(&mut self) {
        for (t, n) in std::mem::take(&mut self.chunk).events {
            self.metrics.events_out.with_label_values(&[t]).inc_by(n);
        }
    }
}

/// The committed ledger, read to its end (after the producer fenced any predecessor).
fn read_ledger(
    config: &IngestConfig,
    shutdown: &CancellationToken,
) -> Result<HashMap<String, ledger::Entry>, PipelineError> {
    pipeline::kafka::retry_until(shutdown, "read the ledger", || {
        ledger::read(
            &config.kafka,
            &config.topics.ingestion_ledger(),
            Duration::from_secs(300),
        )
    })
}

/// The command consumer, of intake commands and the saga topic (retry requests): a
/// whole file is ingested between two polls.
fn command_consumer(config: &IngestConfig) -> Result<WatchedConsumer, PipelineError> {
    watched_consumer(
        &config.kafka,
        &config.group_id,
        ConsumerRole::Commands,
        &[
            &config.topics.name(TopicKind::IngestionCommands),
            &config.topics.name(TopicKind::Saga),
        ],
    )
}

/// What kind of new attempt of a batch an operator asked for.
#[derive(Debug, Clone)]
enum Attempt {
    Retry,
    /// Accepted partial.
    Release,
    /// Under the given versions.
    Reprocess(batch::Reprocess),
}

impl Attempt {
    fn name(&self) -> &'static str {
        match self {
            Attempt::Retry => "retry",
            Attempt::Release => "release",
            Attempt::Reprocess(_) => "reprocess",
        }
    }
}

/// The ledger and content-claim key of a retry: the content's hash and the request.
fn retry_key(sha256: &str, request_id: &str) -> String {
    format!("{sha256}.retry.{}", sanitize(request_id))
}

/// The content hash a ledger key names (a retry's key starts with it).
fn content_sha(key: &str) -> &str {
    key.split_once(".retry.").map_or(key, |(sha, _)| sha)
}

/// Keeps a command id usable as a file name.
fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The format forced by a command, or the one the content shows.
fn pick_format(path: &Path, name: &str, forced: Option<&str>) -> Result<SourceFormat, FileError> {
    if let Some(f) = forced {
        return f.parse().map_err(FileError::UnknownFormat);
    }
    let head = formats::detect::head(path)?;
    formats::detect::detect(&head, name)
}

fn parse_file(
    format: SourceFormat,
    path: &Path,
    name: &str,
    csv: &formats::csv::CsvOptions,
    sink: &mut formats::Sink<'_>,
) -> Result<(), ParseError> {
    let reader = formats::detect::open(path)?;
    match format {
        SourceFormat::Csv => formats::csv::parse(reader, name, csv, sink),
        SourceFormat::FhirNdjson => formats::fhir::parse_ndjson(reader, sink),
        SourceFormat::FhirBundle => formats::fhir::parse_bundle(reader, sink),
        SourceFormat::Hl7v2 => formats::hl7::parse(reader, sink),
    }
}

/// SHA-256 and size of a file, read in 1 MiB blocks.
fn hash_file(path: &Path) -> Result<(String, u64), PipelineError> {
    let mut f = std::fs::File::open(path).map_err(|e| io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// Encrypts the raw file into the archive. For gzip input it also inflates the whole
/// stream on the way, so a truncated or corrupt file fails before any record is sent.
/// The outer error is the archive's own IO; the inner one is the input's.
fn write_archive(
    path: &Path,
    archive: &Path,
    master: &KeyRef,
) -> Result<Result<(), FileError>, PipelineError> {
    struct Tee<'a> {
        file: std::fs::File,
        out: &'a mut ArchiveWriter,
        failed: Option<PipelineError>,
    }
    impl Read for Tee<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.file.read(buf)?;
            if let Err(e) = self.out.write_all(&buf[..n]) {
                self.failed = Some(e);
                return Err(std::io::Error::other("archive write failed"));
            }
            Ok(n)
        }
    }
    let gz = match formats::detect::is_gzip(path) {
        Ok(gz) => gz,
        Err(e) => return Ok(Err(e)),
    };
    let mut writer = ArchiveWriter::create(archive, master)?;
    let mut tee = Tee {
        file: std::fs::File::open(path).map_err(|e| io(path, e))?,
        out: &mut writer,
        failed: None,
    };
    let copied = if gz {
        std::io::copy(
            &mut flate2::read::MultiGzDecoder::new(&mut tee),
            &mut std::io::sink(),
        )
        .and_then(|_| std::io::copy(&mut tee, &mut std::io::sink()))
    } else {
        std::io::copy(&mut tee, &mut std::io::sink())
    };
    if let Some(e) = tee.failed.take() {
        writer.discard();
        return Err(e);
    }
    if let Err(e) = copied {
        writer.discard();
        return Ok(Err(FileError::io(&e)));
    }
    writer.finish()?;
    Ok(Ok(()))
}

fn remove(path: &Path) -> Result<(), PipelineError> {
    // The raw bytes live on in the encrypted archive; only the clear copy goes.
    std::fs::remove_file(path).map_err(|e| io(path, e))?;
    let sidecar = claims::sidecar_path(path);
    if sidecar.exists() {
        std::fs::remove_file(&sidecar).map_err(|e| io(&sidecar, e))?;
    }
    Ok(())
}
