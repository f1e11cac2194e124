//! The auditing stage: records every event on every pipeline topic in an append-only,
//! hash-chained store, signs Merkle checkpoints over it, watches for compliance problems,
//! and publishes entries, checkpoints and alerts on the audit topic.
//!
//! The store is the source of truth for what was consumed: each entry records its
//! (topic, partition, offset), so redelivery after a crash is skipped and Kafka's committed
//! offsets are only a starting hint. Publishing is exactly once on its own: each
//! transaction carries entries, checkpoints and alerts together with the publisher's
//! position (a compacted state topic), so a restart resumes after the last committed one.
//!
//! Every entry also goes into the batch index (`batches.rs`), which the stage serves as
//! the batch status API (`api.rs`) on its telemetry address.

pub mod api;
pub mod batches;
pub mod entry;
pub mod keys;
pub mod merkle;
pub mod monitors;
pub mod proof;
pub mod query;
pub mod record;
pub mod sentinel;
pub mod store;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use pipeline::crypto::{sha256_hex, KeyRef};
use pipeline::error::kafka_err;
use pipeline::events::{AuditCheckpoint, AuditEntryRecorded, BatchHeld, ComplianceAlert, Payload};
use pipeline::kafka::{retry_until, watched_consumer, ConsumerRole, WatchedConsumer, STUCK_AFTER};
use pipeline::telemetry::StageMetrics;
use pipeline::topics::TopicKind;
use pipeline::txn::{Transactions, TxnSettings};
use pipeline::{Codec, Event, PipelineError, Topics};
use prometheus::{IntCounterVec, IntGauge, Opts};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::BaseRecord;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::batches::{BatchIndex, SharedIndex};
use crate::entry::AuditEntry;
use crate::merkle::TreeHead;
use crate::monitors::{Alert, AlertKind, CauseLookup, MonitorConfig, Monitors, Observation};
use crate::sentinel::Sentinel;
use crate::store::{Key, Store, StoreError};

pub const SERVICE: &str = "medpipe-auditing";

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub kafka: pipeline::kafka::Connection,
    pub group_id: String,
    pub transactional_id: String,
    pub topics: Topics,
    pub audit_dir: PathBuf,
    pub batch_max_messages: usize,
    pub batch_max_wait: Duration,
    pub segment_entries: u64,
    /// A checkpoint is signed after this many new entries...
    pub checkpoint_entries: u64,
    /// ...or this long after the last one, whichever comes first.
    pub checkpoint_interval: Duration,
    pub seal_key: KeyRef,
    pub signing_key_file: Option<PathBuf>,
    pub monitors: MonitorConfig,
    /// Share of anonymized and canonical payloads the PHI sentinel scans (0.0 to 1.0).
    pub sentinel_sample_rate: f64,
    pub transaction_timeout: Duration,
}

fn store_err(e: StoreError) -> PipelineError {
    if e.is_disk_full() {
        return PipelineError::DiskFull {
            what: "audit store".into(),
            message: e.to_string(),
        };
    }
    PipelineError::storage("audit store", e)
}

/// How often a write that failed on a full disk is tried again.
const DISK_FULL_RETRY: Duration = Duration::from_secs(2);

/// Where an alert points, stored in its entry's `detail` as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertDetail {
    pub kind: String,
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub detail: String,
}

/// The entry that records an alert; the audit topic name marks it as the stage's own.
pub fn alert_entry(alert: &Alert, own_topic: &str, now: i64) -> Result<AuditEntry, PipelineError> {
    let detail = AlertDetail {
        kind: alert.kind.as_str().to_string(),
        topic: alert.topic.clone(),
        partition: alert.partition,
        offset: alert.offset,
        detail: alert.detail.clone(),
    };
    let detail = serde_json::to_string(&detail).map_err(PipelineError::serialize("an alert"))?;
    Ok(AuditEntry {
        topic: own_topic.to_string(),
        partition: -1,
        offset: -1,
        event_id: Some(alert.id.clone()),
        event_type: crate::monitors::ALERT_EVENT_TYPE.into(),
        correlation_id: alert.correlation_id.clone(),
        source_service: Some(SERVICE.into()),
        occurred_at: Some(now),
        digest_sha256: sha256_hex(detail.as_bytes()),
        detail: Some(detail),
        ..Default::default()
    })
}

/// How the monitors see an entry.
pub fn observation(e: &AuditEntry) -> Observation<'_> {
    Observation {
        seq: e.seq,
        recorded_at: e.recorded_at,
        topic: &e.topic,
        partition: e.partition,
        offset: e.offset,
        event_id: e.event_id.as_deref(),
        event_type: &e.event_type,
        correlation_id: e.correlation_id.as_deref(),
        causation_id: e.causation_id.as_deref(),
        source_service: e.source_service.as_deref(),
        occurred_at: e.occurred_at,
        record_position: e.record_position,
        records_expected: e.records_expected,
        records_in: e.records_in,
        records_upstream: e.records_upstream,
    }
}

/// Resolves causes the monitors no longer hold through the store's index.
struct StoreLookup<'a>(&'a std::path::Path);

impl CauseLookup for StoreLookup<'_> {
    fn source_of(&self, event_id: &str) -> Option<(String, Option<String>, Option<String>)> {
        let found = store::lookup(self.0, Key::Event, event_id).ok()?;
        let e = found.into_iter().next()?;
        Some((e.event_type, e.source_service, e.causation_id))
    }
}

/// The JSON a payload carries that the PHI sentinel scans: de-identified data only.
fn scannable(p: &Payload) -> Option<&str> {
    match p {
        Payload::RecordAnonymized(r) => Some(&r.content_json),
        _ => p.canonical().map(|(_, fhir, _)| fhir),
    }
}

/// The publisher's committed position, kept in its state topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Published {
    entries: u64,
    checkpoints: u64,
}

const PUBLISHED_KEY: &str = "publisher";

/// Runs the audit loop on a blocking thread until shutdown. `batches` is filled from the
/// store as it is replayed (replacing what it held) and kept up to date with every entry
/// appended afterwards; share it with [`api::router`] to serve it.
pub async fn run(
    config: AuditConfig,
    batches: SharedIndex,
    codec: Arc<Codec>,
    metrics: StageMetrics,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    let rt = Handle::current();
    tokio::task::spawn_blocking(move || {
        Auditor::start(config, batches, codec, metrics, rt, &shutdown)?.run(&shutdown)
    })
    .await
    .map_err(|e| PipelineError::Thread(format!("audit thread failed: {e}")))?
}

struct Auditor {
    config: AuditConfig,
    codec: Arc<Codec>,
    metrics: StageMetrics,
    alerts: IntCounterVec,
    rt: Handle,
    store: Store,
    signing: SigningKey,
    key_id: String,
    monitors: Monitors,
    /// Where each batch stands, for the status API.
    batches: SharedIndex,
    sentinel: Sentinel,
    consumer: WatchedConsumer,
    txn: Transactions,
    own_topic: String,
    published: Published,
    /// Entries durable in the store but not yet published.
    unpublished: VecDeque<AuditEntry>,
    /// Checkpoints signed but not yet published.
    unpublished_heads: VecDeque<TreeHead>,
    last_checkpoint: Instant,
    /// Alerts raised but not yet in the store (its disk was full).
    owed_alerts: Vec<Alert>,
    /// 1 while consuming is paused because the store's disk is full.
    store_full: IntGauge,
}

impl Auditor {
    fn start(
        config: AuditConfig,
        batches: SharedIndex,
        codec: Arc<Codec>,
        metrics: StageMetrics,
        rt: Handle,
        shutdown: &CancellationToken,
    ) -> Result<Self, PipelineError> {
        let signing = keys::load_or_create(config.signing_key_file.as_deref(), &config.audit_dir)
            .map_err(store_err)?;
        let key_id = keys::key_id(&signing.verifying_key());
        let mut monitors = Monitors::new(config.monitors.clone());
        // Replayed entries rebuild the monitors' state; alerts that fired before a crash
        // but were never recorded come back from end_replay.
        monitors.begin_replay();
        // The batch index is built aside and swapped in whole, so the API never answers
        // from a half-replayed index (it says 503 until then).
        let mut replayed = BatchIndex::default();
        let started = Instant::now();
        let store = Store::open(
            &config.audit_dir,
            config.segment_entries,
            &signing.verifying_key(),
            |e| {
                monitors.observe(&observation(e));
                replayed.observe(e);
            },
        )
        .map_err(store_err)?;
        info!(
            entries = store.len(),
            batches = replayed.count(None),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Audit store opened and verified."
        );
        *batches
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = replayed;
        let owed = monitors.end_replay();
        let sentinel = Sentinel::new(config.sentinel_sample_rate).map_err(PipelineError::Config)?;
        let alerts = IntCounterVec::new(
            Opts::new(
                "medpipe_compliance_alerts_total",
                "Compliance alerts raised by the auditing stage, by kind.",
            ),
            &["kind"],
        )
        .map_err(PipelineError::Metrics)?;
        metrics
            .registry
            .register(Box::new(alerts.clone()))
            .map_err(PipelineError::Metrics)?;
        let store_full = IntGauge::new(
            "medpipe_auditing_store_full",
            "1 while auditing has paused consuming because the audit store's disk is full.",
        )
        .map_err(PipelineError::Metrics)?;
        metrics
            .registry
            .register(Box::new(store_full.clone()))
            .map_err(PipelineError::Metrics)?;

        // At least once into the store, which skips what it already holds.
        let consumer = audit_consumer(&config)?;
        // Fences a previous incarnation, so the state topic read next holds the last
        // committed position.
        let txn = Transactions::connect(
            TxnSettings::new(
                &config.kafka,
                &config.transactional_id,
                config.transaction_timeout,
            ),
            metrics.clone(),
            shutdown,
        )?;
        let (published, unpublished, unpublished_heads) =
            publisher_position(&config, &store, shutdown)?;
        let own_topic = config.topics.name(TopicKind::Audit);
        let mut auditor = Auditor {
            config,
            codec,
            metrics,
            alerts,
            rt,
            store,
            signing,
            key_id,
            monitors,
            batches,
            sentinel,
            consumer,
            txn,
            own_topic,
            published,
            unpublished,
            unpublished_heads,
            last_checkpoint: Instant::now(),
            owed_alerts: Vec::new(),
            store_full,
        };
        auditor.raise(owed, chrono::Utc::now().timestamp_micros())?;
        Ok(auditor)
    }

    fn run(mut self, shutdown: &CancellationToken) -> Result<(), PipelineError> {
        self.metrics.set_ready(true);
        info!(entries = self.store.len(), pattern = %self.config.topics.all_regex(), key_id = %self.key_id, "Auditing started.");
        while !shutdown.is_cancelled() {
            if let Some(why) = self.consumer.context().watch.stuck(STUCK_AFTER) {
                warn!(why, "The consumer has been stuck for 30s; recreating it.");
                self.replace_consumer()?;
            }
            let batch = self.poll_batch();
            if !batch.is_empty() {
                let recorded = self.record(&batch);
                self.or_wait_for_space(recorded, shutdown, |a| a.record(&batch))?;
            }
            let now = chrono::Utc::now().timestamp_micros();
            let alerts = self
                .monitors
                .tick(now, &StoreLookup(&self.config.audit_dir));
            let raised = self.raise(alerts, now);
            self.or_wait_for_space(raised, shutdown, |a| a.raise(Vec::new(), now))?;
            let signed = self.maybe_checkpoint(now);
            self.or_wait_for_space(signed, shutdown, |a| a.maybe_checkpoint(now))?;
            self.publish(shutdown)?;
        }
        // A clean stop signs and publishes what is left, so the trail ends on a checkpoint.
        if self.store.unsigned() > 0 {
            let now = chrono::Utc::now().timestamp_micros();
            match self.store.checkpoint(&self.signing, &self.key_id, now) {
                Ok(head) => self.unpublished_heads.push_back(head),
                // Stopping while the disk is full: the next start signs the tail.
                Err(e) if e.is_disk_full() => {
                    warn!(error = %e, "Stopping without a final checkpoint: the disk is full.");
                }
                Err(e) => return Err(store_err(e)),
            }
        }
        self.publish(shutdown)?;
        info!(entries = self.store.len(), "Auditing stopped cleanly.");
        Ok(())
    }

    /// Reacts to the outcome of a step that writes to the store: a full disk pauses
    /// consuming until `retry` succeeds (see [`Auditor::wait_for_space`]), a transient
    /// failure reads the batch again, anything else ends the stage.
    fn or_wait_for_space(
        &mut self,
        outcome: Result<(), PipelineError>,
        shutdown: &CancellationToken,
        retry: impl FnMut(&mut Self) -> Result<(), PipelineError>,
    ) -> Result<(), PipelineError> {
        match outcome {
            Ok(()) => Ok(()),
            Err(e @ PipelineError::DiskFull { .. }) => self.wait_for_space(e, shutdown, retry),
            Err(e) if e.class() == pipeline::ErrorClass::Retry => self.read_again(&e, shutdown),
            Err(e) => Err(e),
        }
    }

    /// The store's disk is full. The failed write was undone, so nothing is half
    /// recorded, and what was consumed but not recorded is still in Kafka, uncommitted.
    /// Consuming pauses (the consumer keeps polling, so it keeps its group membership),
    /// `medpipe_auditing_store_full` reads 1 for the alert rule, and what is already
    /// durable keeps being published. The write is tried again every few seconds; when it
    /// succeeds, consuming resumes, and an `audit_store_paused` compliance alert puts the
    /// pause itself on the record.
    fn wait_for_space(
        &mut self,
        cause: PipelineError,
        shutdown: &CancellationToken,
        mut retry: impl FnMut(&mut Self) -> Result<(), PipelineError>,
    ) -> Result<(), PipelineError> {
        let since = Instant::now();
        let since_micros = chrono::Utc::now().timestamp_micros();
        error!(error = %cause, "The audit store's disk is full: consuming is paused until space returns. Nothing is lost: what was not recorded is read again.");
        self.store_full.set(1);
        self.set_input_paused(true);
        // Messages polled while paused (a rebalance assigns partitions unpaused) are not
        // recorded: the input is read again from the committed offsets afterwards.
        let mut strays = false;
        let mut next_try = Instant::now() + DISK_FULL_RETRY;
        let outcome = loop {
            if shutdown.is_cancelled() {
                break Err(cause);
            }
            if let Some(Ok(_)) = self.consumer.poll(Duration::from_millis(200)) {
                strays = true;
                self.set_input_paused(true);
            }
            self.publish(shutdown)?;
            if Instant::now() < next_try {
                continue;
            }
            match retry(self) {
                Ok(()) => break Ok(()),
                Err(PipelineError::DiskFull { .. }) => {
                    next_try = Instant::now() + DISK_FULL_RETRY;
                }
                Err(e) if e.class() == pipeline::ErrorClass::Retry => {
                    strays = true;
                    warn!(error = %e, "Could not record for now; reading the input again.");
                    break Ok(());
                }
                Err(e) => break Err(e),
            }
        };
        self.store_full.set(0);
        self.set_input_paused(false);
        outcome?;
        let paused = since.elapsed();
        info!(
            paused_ms = paused.as_millis() as u64,
            "The audit store can be written again; consuming resumed."
        );
        if strays {
            if let Err(e) = pipeline::kafka::rewind_to_committed(
                &self.consumer,
                Duration::from_secs(30),
                shutdown,
            ) {
                warn!(error = %e, "Could not rewind the consumer; recreating it.");
                self.replace_consumer()?;
            }
        }
        let now = chrono::Utc::now().timestamp_micros();
        let alert = crate::monitors::store_paused_alert(since_micros, now);
        match self.raise(vec![alert], now) {
            // Still owed: the next step that writes tries again.
            Ok(()) | Err(PipelineError::DiskFull { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A new consumer in place of the current one, which is closed aside (see
    /// `pipeline::kafka::drop_aside`): the new member's partitions start at the committed
    /// offsets.
    fn replace_consumer(&mut self) -> Result<(), PipelineError> {
        let new = audit_consumer(&self.config)?;
        let old = std::mem::replace(&mut self.consumer, new);
        pipeline::kafka::drop_aside("audit consumer", old, &self.metrics.calls_abandoned);
        Ok(())
    }

    /// Pauses or resumes every partition the consumer owns.
    fn set_input_paused(&self, paused: bool) {
        let owned = match self.consumer.assignment() {
            Ok(tpl) => tpl,
            Err(e) => {
                warn!(error = %e, "Could not read the consumer's assignment.");
                return;
            }
        };
        let done = if paused {
            self.consumer.pause(&owned)
        } else {
            self.consumer.resume(&owned)
        };
        if let Err(e) = done {
            warn!(error = %e, paused, "Could not pause or resume the input partitions.");
        }
    }

    /// A batch that could not be recorded for now (the Schema Registry did not answer a
    /// lookup, say) changed nothing durable: its messages are read again from the group's
    /// committed offsets after a pause, and those already in the store are skipped.
    fn read_again(
        &mut self,
        e: &PipelineError,
        shutdown: &CancellationToken,
    ) -> Result<(), PipelineError> {
        warn!(error = %e, "Could not record a batch for now; reading it again from the committed offsets.");
        self.metrics
            .rewinds
            .with_label_values(&["failed_batch"])
            .inc();
        // The registry client keeps failed lookups; forget them so the next try asks again.
        self.codec.clear_cached_errors();
        std::thread::sleep(Duration::from_secs(1));
        if let Err(e) =
            pipeline::kafka::rewind_to_committed(&self.consumer, Duration::from_secs(30), shutdown)
        {
            warn!(error = %e, "Could not rewind the consumer; recreating it.");
            self.replace_consumer()?;
        }
        Ok(())
    }

    fn poll_batch(&self) -> Vec<OwnedMessage> {
        let deadline = Instant::now() + self.config.batch_max_wait;
        let mut batch = Vec::new();
        while batch.len() < self.config.batch_max_messages && Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => batch.push(m.detach()),
                Some(Err(e)) => warn!(error = %e, "Consumer error; continuing."),
                None => {
                    if !batch.is_empty() {
                        break;
                    }
                }
            }
        }
        batch
    }

    /// Appends one entry per new message (fsynced), then feeds the monitors.
    fn record(&mut self, batch: &[OwnedMessage]) -> Result<(), PipelineError> {
        let mut entries = Vec::with_capacity(batch.len());
        let mut scans = Vec::new();
        // The next offset per partition: one entry each (a list with an entry per message
        // was searched linearly per message, quadratic in the batch).
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for m in batch {
            let at = next.entry((m.topic(), m.partition())).or_default();
            *at = (*at).max(m.offset() + 1);
            if m.topic() == self.own_topic
                || self.store.contains(m.topic(), m.partition(), m.offset())
            {
                continue;
            }
            let decoded = match m.payload() {
                Some(b) if !self.config.topics.is_dlq(m.topic()) => {
                    match self.rt.block_on(self.codec.decode(b)) {
                        Ok(ev) => Some(ev),
                        // Only an undecodable message is recorded undecoded; a registry
                        // that does not answer or refuses our credentials is not the
                        // message's fault.
                        Err(e) if e.class() != pipeline::ErrorClass::DeadLetter => return Err(e),
                        Err(_) => None,
                    }
                }
                _ => None,
            };
            if let Some(ev) = &decoded {
                if let Some(json) = scannable(&ev.payload) {
                    if self.sentinel.sampled(&ev.header.event_id) {
                        scans.push((
                            m.topic().to_string(),
                            m.partition(),
                            m.offset(),
                            ev.header.correlation_id.clone(),
                            ev.header.event_id.clone(),
                            self.sentinel.scan_json(json),
                        ));
                    }
                }
            }
            entries.push(record::entry_for(
                m,
                decoded.as_ref(),
                &self.config.seal_key,
            )?);
        }
        let now = chrono::Utc::now().timestamp_micros();
        // All or nothing: after a failure the batch can be recorded again.
        let added = self.store.append(entries, now).map_err(store_err)?;
        for e in &added {
            self.metrics
                .events_in
                .with_label_values(&[e.event_type.as_str()])
                .inc();
        }
        self.index(&added);
        let mut alerts = Vec::new();
        for e in &added {
            alerts.extend(self.monitors.observe(&observation(e)));
        }
        for (topic, partition, offset, batch_id, event_id, findings) in scans {
            if let Some(a) =
                sentinel::alert(&topic, partition, offset, &batch_id, &event_id, &findings)
            {
                alerts.push(a);
            }
        }
        self.metrics
            .events_out
            .with_label_values(&["AuditEntry"])
            .inc_by(added.len() as u64);
        self.unpublished.extend(added);
        self.raise(alerts, now)?;
        // The store is durable now; the commit only saves re-reading on restart.
        let mut offsets = TopicPartitionList::with_capacity(next.len());
        for ((topic, partition), offset) in next {
            offsets
                .add_partition_offset(topic, partition, Offset::Offset(offset))
                .map_err(kafka_err("offsets"))?;
        }
        if let Err(e) = self.consumer.commit(&offsets, CommitMode::Async) {
            warn!(error = %e, "Offset commit failed; entries are deduplicated on restart.");
        }
        Ok(())
    }

    /// Records alerts as entries of their own; they are published with the entries.
    /// Alerts that cannot be stored yet (the disk is full) stay owed and go first the
    /// next time.
    fn raise(&mut self, alerts: Vec<Alert>, now: i64) -> Result<(), PipelineError> {
        for a in &alerts {
            warn!(kind = a.kind.as_str(), alert_id = %a.id, batch = a.correlation_id.as_deref().unwrap_or("-"), detail = %a.detail, "Compliance alert.");
            self.alerts.with_label_values(&[a.kind.as_str()]).inc();
        }
        self.owed_alerts.extend(alerts);
        if self.owed_alerts.is_empty() {
            return Ok(());
        }
        let mut entries = Vec::with_capacity(self.owed_alerts.len());
        for a in &self.owed_alerts {
            entries.push(alert_entry(a, &self.own_topic, now)?);
        }
        let added = self.store.append(entries, now).map_err(store_err)?;
        self.owed_alerts.clear();
        // An alert's entry names its batch, so it moves the batch's last-seen time, as it
        // does when the store is replayed.
        self.index(&added);
        for e in &added {
            // Marks the alert as fired, as a replay after a restart would.
            self.monitors.observe(&observation(e));
        }
        self.unpublished.extend(added);
        Ok(())
    }

    /// Folds appended entries into the batch index, under one write lock per append.
    fn index(&self, added: &[AuditEntry]) {
        let mut index = self
            .batches
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for e in added {
            index.observe(e);
        }
    }

    fn maybe_checkpoint(&mut self, now: i64) -> Result<(), PipelineError> {
        let unsigned = self.store.unsigned();
        let due = unsigned >= self.config.checkpoint_entries
            || (unsigned > 0 && self.last_checkpoint.elapsed() >= self.config.checkpoint_interval);
        if due {
            let head = self
                .store
                .checkpoint(&self.signing, &self.key_id, now)
                .map_err(store_err)?;
            self.unpublished_heads.push_back(head);
            self.last_checkpoint = Instant::now();
        }
        Ok(())
    }

    /// Publishes what is durable but unpublished, in transactions of bounded size, each
    /// with the publisher's new position.
    fn publish(&mut self, shutdown: &CancellationToken) -> Result<(), PipelineError> {
        const MAX_PER_TXN: usize = 5000;
        while !self.unpublished.is_empty() || !self.unpublished_heads.is_empty() {
            let n = self.unpublished.len().min(MAX_PER_TXN);
            // A checkpoint goes out only once the entries it covers have.
            let covered = self.published.entries + n as u64;
            let heads: Vec<TreeHead> = self
                .unpublished_heads
                .iter()
                .take_while(|h| h.tree_size <= covered)
                .cloned()
                .collect();
            if n == 0 && heads.is_empty() {
                break;
            }
            // Taken out, not cloned: a failed transaction rewinds the publisher, which
            // queues everything unpublished from the store again.
            let entries: Vec<AuditEntry> = self.unpublished.drain(..n).collect();
            let next = Published {
                entries: covered,
                checkpoints: self.published.checkpoints + heads.len() as u64,
            };
            match self.publish_txn(&entries, &heads, next) {
                Ok(()) => {
                    self.unpublished_heads.drain(..heads.len());
                    self.published = next;
                    self.metrics.transactions_committed.inc();
                }
                Err(e) => {
                    let class = e.class();
                    if class == pipeline::ErrorClass::Fatal {
                        return Err(e);
                    }
                    warn!(error = %e, "Publishing failed; resuming from the committed position.");
                    self.rewind_publisher(shutdown)?;
                    if shutdown.is_cancelled() {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        Ok(())
    }

    /// The rewind rule for the publisher: end the transaction so the committed state is
    /// definite, then take the published position from the state topic again and queue
    /// everything after it from the store.
    fn rewind_publisher(&mut self, shutdown: &CancellationToken) -> Result<(), PipelineError> {
        self.metrics
            .rewinds
            .with_label_values(&["failed_batch"])
            .inc();
        self.txn.recover(shutdown)?;
        let (published, unpublished, heads) =
            publisher_position(&self.config, &self.store, shutdown)?;
        self.published = published;
        self.unpublished = unpublished;
        self.unpublished_heads = heads;
        Ok(())
    }

    fn publish_txn(
        &mut self,
        entries: &[AuditEntry],
        heads: &[TreeHead],
        next: Published,
    ) -> Result<(), PipelineError> {
        self.txn.begin()?;
        for e in entries {
            let batch = e.correlation_id.as_deref().unwrap_or("audit");
            let line = e
                .to_line()
                .map_err(PipelineError::serialize("an audit entry"))?;
            let recorded = Payload::AuditEntryRecorded(AuditEntryRecorded {
                seq: e.seq as i64,
                audited_event_type: e.event_type.clone(),
                audited_event_id: e.event_id.clone(),
                prev_hash: e.prev_hash.clone(),
                hash: e.hash.clone(),
                entry_json: line,
            });
            self.send(
                Event::new(SERVICE, batch, e.event_id.as_deref(), recorded),
                batch,
            )?;
            if e.is_own() {
                if let Some(alert) = self.alert_event(e)? {
                    // A stalled batch becomes held, so the operator can act on it (retry
                    // or withdraw), in the transaction that publishes the alert.
                    let held = stalled_hold(&alert);
                    self.send(alert, batch)?;
                    if let Some(held) = held {
                        let saga = self.config.topics.name(TopicKind::Saga);
                        let bytes = self.rt.block_on(self.codec.encode(&held))?;
                        self.txn
                            .send(BaseRecord::to(&saga).key(batch).payload(&bytes))?;
                    }
                }
            }
        }
        for h in heads {
            let cp = Payload::AuditCheckpoint(AuditCheckpoint {
                tree_size: h.tree_size as i64,
                root_hex: h.root_hex.clone(),
                timestamp_micros: h.timestamp_micros,
                key_id: h.key_id.clone(),
                signature_hex: h.signature_hex.clone(),
                public_key_hex: hex::encode(self.signing.verifying_key().as_bytes()),
            });
            self.send(Event::new(SERVICE, "audit", None, cp), "checkpoint")?;
        }
        let state = serde_json::to_vec(&next).map_err(|e| PipelineError::Serialize {
            what: "the publisher position",
            message: e.to_string(),
        })?;
        let topic = self.config.topics.state("auditing");
        self.txn
            .send(BaseRecord::to(&topic).key(PUBLISHED_KEY).payload(&state))?;
        self.txn.commit(None)
    }

    fn alert_event(&self, e: &AuditEntry) -> Result<Option<Event>, PipelineError> {
        let (Some(id), Some(detail)) = (&e.event_id, &e.detail) else {
            return Ok(None);
        };
        let d: AlertDetail = serde_json::from_str(detail)
            .map_err(|err| PipelineError::storage(format!("alert entry {}", e.seq), err))?;
        let payload = Payload::ComplianceAlert(ComplianceAlert {
            alert_id: id.clone(),
            kind: d.kind,
            batch_id: e.correlation_id.clone(),
            topic: d.topic,
            partition: d.partition,
            offset: d.offset,
            detail: d.detail,
            audit_seq: e.seq as i64,
        });
        let batch = e.correlation_id.as_deref().unwrap_or("audit");
        Ok(Some(Event::new(SERVICE, batch, None, payload)))
    }

    fn send(&mut self, event: Event, key: &str) -> Result<(), PipelineError> {
        let bytes = self.rt.block_on(self.codec.encode(&event))?;
        let topic = self.own_topic.clone();
        self.txn
            .send(BaseRecord::to(&topic).key(key).payload(&bytes))
    }
}

/// The `BatchHeld` a stalled-batch alert puts its batch in, caused by the alert (its id is
/// the alert's audit entry's event id).
fn stalled_hold(alert: &Event) -> Option<Event> {
    let Payload::ComplianceAlert(a) = &alert.payload else {
        return None;
    };
    if a.kind != AlertKind::StalledBatch.as_str() {
        return None;
    }
    let batch = a.batch_id.as_deref()?;
    // The monitor's detail names the stage first ("<stage> stage open for ...").
    let stage = ["ingestion", "anonymization", "canonization"]
        .into_iter()
        .find(|s| a.detail.starts_with(&format!("{s} stage")))?;
    Some(Event::new(
        SERVICE,
        batch,
        Some(&a.alert_id),
        Payload::BatchHeld(BatchHeld {
            batch_id: batch.to_string(),
            stage: "auditing".into(),
            failed_step: stage.into(),
            reason_kind: "stalled".into(),
            reason: a.detail.clone(),
            records_forwarded: 0,
        }),
    ))
}

/// The audit consumer, subscribed to every pipeline topic: at least once into the store,
/// which skips what it already holds.
fn audit_consumer(config: &AuditConfig) -> Result<WatchedConsumer, PipelineError> {
    watched_consumer(
        &config.kafka,
        &config.group_id,
        ConsumerRole::Audit,
        &[&config.topics.all_regex()],
    )
}

/// What the publisher has committed (from its state topic), and what the store holds
/// beyond it: the entries and checkpoints still to publish.
#[allow(clippy::type_complexity)]
fn publisher_position(
    config: &AuditConfig,
    store: &Store,
    shutdown: &CancellationToken,
) -> Result<(Published, VecDeque<AuditEntry>, VecDeque<TreeHead>), PipelineError> {
    let state_topic = config.topics.state("auditing");
    let published = retry_until(shutdown, "read the publisher position", || {
        pipeline::readback::read_entries(&config.kafka, &state_topic, Duration::from_secs(60))
    })?
    .into_iter()
    .filter(|(k, _)| k == PUBLISHED_KEY)
    .filter_map(|(_, v)| serde_json::from_slice::<Published>(&v?).ok())
    .next_back()
    .unwrap_or_default();
    let unpublished: VecDeque<AuditEntry> = store
        .read_from(published.entries, usize::MAX)
        .map_err(store_err)?
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    let heads: VecDeque<TreeHead> = store::read_checkpoints(&config.audit_dir)
        .map_err(store_err)?
        .into_iter()
        .skip(published.checkpoints as usize)
        .collect();
    info!(
        published_entries = published.entries,
        to_publish = unpublished.len(),
        "Audit publisher position read."
    );
    Ok((published, unpublished, heads))
}
