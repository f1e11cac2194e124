//! The consume-transform-produce loop every Kafka-fed stage runs on.
//!
//! Exactly-once works like this: the runner polls a batch of input messages with no
//! transaction open, then begins a transaction, produces every output (and every
//! dead letter) of the batch, adds the batch's input offsets with
//! `send_offsets_to_transaction`, and commits. Input is read with
//! `isolation.level=read_committed`. Because no transaction is ever open while the
//! consumer polls, a rebalance (which only happens inside poll) never finds one open:
//! whatever was committed is committed, and buffered input from revoked or lost
//! partitions is dropped before the next transaction, to be re-read by the new owner
//! from the committed offsets. An aborted transaction rewinds the consumer to the
//! batch's first offsets, so the batch is redone.
//!
//! librdkafka's transaction calls block, so the loop runs on a blocking thread, never on
//! an async worker; the async codec is driven from it with `Handle::block_on`.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header as KHeader, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn};

use crate::codec::Codec;
use crate::error::{kafka_err, ErrorClass, PipelineError};
use crate::events::Event;
use crate::telemetry::StageMetrics;
use crate::topics::Topics;

/// The delivery guarantee a stage runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Outputs and input offsets commit in one Kafka transaction.
    ExactlyOnce,
    /// Outputs are flushed, then offsets committed; a crash in between redelivers.
    AtLeastOnce,
}

/// One decoded input message, as a stage sees it.
#[derive(Debug)]
pub struct Input<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub event: &'a Event,
}

/// One event to produce. Its topic follows from the event type.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub key: String,
    pub event: Event,
}

/// What a stage decided about one input.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Produce these events (none is fine: the input is simply consumed).
    Emit(Vec<Output>),
    /// The input cannot be processed; send it to the stage's DLQ with this reason.
    /// The reason must name fields and positions, never values.
    DeadLetter {
        error_type: &'static str,
        reason: String,
    },
    /// Dead-letter the input, and still produce these events (for example a batch's
    /// closing event, when the dead-lettered record was its last).
    DeadLetterAndEmit {
        error_type: &'static str,
        reason: String,
        outputs: Vec<Output>,
    },
}

/// A stage's pure logic. It must do no IO. State that spans messages goes through the
/// state hooks (backed by `state::KeyedState`): the runner may call `process` again for
/// the same input after an abort, and rolls the state back first.
pub trait Stage: Send + 'static {
    /// Short stage name, e.g. `anonymization`; names the DLQ and metrics.
    fn name(&self) -> &'static str;
    fn process(&mut self, input: &Input<'_>) -> Outcome;

    /// Registers the stage's own metrics beside the runner's, on the /metrics registry.
    fn register_metrics(&mut self, _registry: &prometheus::Registry) -> Result<(), PipelineError> {
        Ok(())
    }

    /// The stage's durable state, kept in `<prefix>-internal.<name>-state.v1`, if any.
    /// A stateful stage implements these two; the hooks below then work on their own.
    fn state(&self) -> Option<&dyn crate::state::DurableState> {
        None
    }
    fn state_mut(&mut self) -> Option<&mut dyn crate::state::DurableState> {
        None
    }

    /// True if the stage keeps durable state.
    fn stateful(&self) -> bool {
        self.state().is_some()
    }
    /// State entries changed by the current batch (`None` deletes).
    fn state_changes(&self) -> Result<Vec<crate::state::StateEntry>, PipelineError> {
        self.state().map_or(Ok(vec![]), |s| s.changes())
    }
    /// The batch's transaction committed.
    fn state_committed(&mut self) {
        if let Some(s) = self.state_mut() {
            s.commit();
        }
    }
    /// The batch's transaction aborted; the batch will be redone.
    fn state_rolled_back(&mut self) {
        if let Some(s) = self.state_mut() {
            s.rollback();
        }
    }
    /// Replaces the state with the committed entries of the state topic, in topic order.
    fn state_restore(
        &mut self,
        entries: Vec<crate::state::StateEntry>,
    ) -> Result<(), PipelineError> {
        self.state_mut().map_or(Ok(()), |s| s.restore(entries))
    }
}

/// Everything the runner needs besides the stage.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub bootstrap_servers: String,
    pub group_id: String,
    /// Stable per replica: a restarted replica fences its previous incarnation.
    pub transactional_id: String,
    /// Topic names, or librdkafka regexes starting with `^`.
    pub input_topics: Vec<String>,
    pub topics: Topics,
    pub delivery: Delivery,
    pub batch_max_messages: usize,
    pub batch_max_wait: Duration,
    pub transaction_timeout: Duration,
    pub queued_max_kbytes: u32,
}

/// Header names on dead-lettered messages.
pub mod dlq_headers {
    pub const STAGE: &str = "medpipe.dlq.stage";
    pub const ERROR_CLASS: &str = "medpipe.dlq.error_class";
    pub const ERROR_TYPE: &str = "medpipe.dlq.error_type";
    pub const ERROR_MESSAGE: &str = "medpipe.dlq.error_message";
    pub const SOURCE_TOPIC: &str = "medpipe.dlq.source_topic";
    pub const SOURCE_PARTITION: &str = "medpipe.dlq.source_partition";
    pub const SOURCE_OFFSET: &str = "medpipe.dlq.source_offset";
}

/// Consumer context: remembers revoked partitions and exports lag from statistics.
pub struct RunnerContext {
    revoked: Mutex<Vec<(String, i32)>>,
    /// Set when partitions are assigned, so a stateful stage reloads its state.
    assigned: std::sync::atomic::AtomicBool,
    metrics: StageMetrics,
}

impl ClientContext for RunnerContext {
    /// Exports lag as last stable offset minus the consumer's position. librdkafka's own
    /// `consumer_lag` is measured against offsets the consumer committed itself, and ours
    /// are committed by the transactional producer, so it would always read -1.
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if let Some(lag) = position_lag(*partition, p.app_offset, p.ls_offset) {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[topic.as_str(), &partition.to_string()])
                        .set(lag);
                }
            }
        }
    }
}

/// Lag of one partition, or `None` when it is not known yet (no position, or librdkafka's
/// internal partition -1).
fn position_lag(partition: i32, position: i64, last_stable: i64) -> Option<i64> {
    (partition >= 0 && position >= 0 && last_stable >= 0).then(|| (last_stable - position).max(0))
}

impl ConsumerContext for RunnerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let lost = consumer.assignment_lost();
                info!(
                    partitions = tpl.count(),
                    lost, "Partitions revoked; dropping their uncommitted input."
                );
                if let Ok(mut r) = self.revoked.lock() {
                    r.extend(
                        tpl.elements()
                            .iter()
                            .map(|e| (e.topic().to_string(), e.partition())),
                    );
                }
            }
            Rebalance::Assign(tpl) => {
                info!(partitions = tpl.count(), "Partitions assigned.");
                self.assigned
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Rebalance::Error(e) => warn!(error = %e, "Rebalance error."),
        }
    }
}

type StageConsumer = BaseConsumer<RunnerContext>;

/// Runs `stage` until `shutdown` is cancelled or a fatal error occurs.
pub async fn run<S: Stage>(
    stage: S,
    config: RunnerConfig,
    codec: Arc<Codec>,
    metrics: StageMetrics,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    let handle = Handle::current();
    tokio::task::spawn_blocking(move || {
        Runner::new(stage, config, codec, metrics, handle)?.run(&shutdown)
    })
    .await
    .map_err(|e| PipelineError::Config(format!("runner thread failed: {e}")))?
}

struct Runner<S> {
    stage: S,
    config: RunnerConfig,
    codec: Arc<Codec>,
    metrics: StageMetrics,
    rt: Handle,
    consumer: StageConsumer,
    producer: BaseProducer,
    dlq_topic: String,
}

impl<S: Stage> Runner<S> {
    fn new(
        stage: S,
        config: RunnerConfig,
        codec: Arc<Codec>,
        metrics: StageMetrics,
        rt: Handle,
    ) -> Result<Self, PipelineError> {
        let ctx = RunnerContext {
            revoked: Mutex::new(Vec::new()),
            assigned: std::sync::atomic::AtomicBool::new(false),
            metrics: metrics.clone(),
        };
        let consumer: StageConsumer = ClientConfig::new()
            .set("bootstrap.servers", &config.bootstrap_servers)
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "2000")
            .set("max.poll.interval.ms", "120000")
            .set("fetch.wait.max.ms", "10")
            .set(
                "queued.max.messages.kbytes",
                config.queued_max_kbytes.to_string(),
            )
            .set("queued.min.messages", "1000")
            .set("statistics.interval.ms", "5000")
            .set("topic.metadata.refresh.interval.ms", "5000")
            .create_with_context(ctx)
            .map_err(kafka_err("create consumer"))?;
        let mut pc = ClientConfig::new();
        pc.set("bootstrap.servers", &config.bootstrap_servers)
            .set("linger.ms", "5")
            .set("compression.type", "lz4");
        if config.delivery == Delivery::ExactlyOnce {
            pc.set("transactional.id", &config.transactional_id).set(
                "transaction.timeout.ms",
                config.transaction_timeout.as_millis().to_string(),
            );
        } else {
            pc.set("enable.idempotence", "true");
        }
        let producer: BaseProducer = pc.create().map_err(kafka_err("create producer"))?;
        let dlq_topic = config.topics.dlq(stage.name());
        Ok(Runner {
            stage,
            config,
            codec,
            metrics,
            rt,
            consumer,
            producer,
            dlq_topic,
        })
    }

    fn run(mut self, shutdown: &CancellationToken) -> Result<(), PipelineError> {
        let stage = self.stage.name();
        if self.config.delivery == Delivery::ExactlyOnce {
            retry_until(shutdown, "init transactions", || {
                self.producer
                    .init_transactions(Duration::from_secs(30))
                    .map_err(kafka_err("init transactions"))
            })?;
        }
        let topics: Vec<&str> = self
            .config
            .input_topics
            .iter()
            .map(String::as_str)
            .collect();
        self.consumer
            .subscribe(&topics)
            .map_err(kafka_err("subscribe"))?;
        self.metrics.set_ready(true);
        info!(stage, topics = ?self.config.input_topics, transactional_id = %self.config.transactional_id, "Stage runner started.");

        while !shutdown.is_cancelled() {
            let batch = self.collect(shutdown)?;
            self.reload_state_if_assigned()?;
            if batch.is_empty() {
                continue;
            }
            let started = Instant::now();
            match self.process_batch(&batch) {
                Ok(()) => {
                    self.metrics.transactions_committed.inc();
                    self.metrics
                        .processing_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
                Err(e) => match e.class() {
                    ErrorClass::Fatal => {
                        error!(stage, error = %e, "Fatal error; exiting so a restart gets a clean producer.");
                        self.metrics.set_ready(false);
                        return Err(e);
                    }
                    class => {
                        warn!(stage, error = %e, class = class.as_str(), "Batch failed; aborting and redoing it.");
                        self.abort_and_rewind(&batch)?;
                        if class == ErrorClass::Retry {
                            self.codec.clear_cached_errors();
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                },
            }
        }
        self.metrics.set_ready(false);
        info!(stage, "Stage runner stopped cleanly.");
        Ok(())
    }

    /// After a partition assignment, reloads a stateful stage's committed state: another
    /// instance may have advanced it while it owned the partitions. No transaction is open
    /// here, and the previous owner's last one completed before the assignment did.
    fn reload_state_if_assigned(&mut self) -> Result<(), PipelineError> {
        let assigned = self
            .consumer
            .context()
            .assigned
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        if !assigned || !self.stage.stateful() {
            return Ok(());
        }
        let topic = self.config.topics.state(self.stage.name());
        let entries = crate::readback::read_entries(
            &self.config.bootstrap_servers,
            &topic,
            Duration::from_secs(120),
        )?;
        info!(
            entries = entries.len(),
            "Stage state reloaded after assignment."
        );
        self.stage.state_restore(entries)
    }

    /// Polls up to `batch_max_messages` or `batch_max_wait`, whichever comes first, then
    /// drops messages from partitions revoked meanwhile.
    fn collect(&self, shutdown: &CancellationToken) -> Result<Vec<OwnedMessage>, PipelineError> {
        let deadline = Instant::now() + self.config.batch_max_wait;
        let mut batch = Vec::new();
        while batch.len() < self.config.batch_max_messages && !shutdown.is_cancelled() {
            let now = Instant::now();
            if now >= deadline && !batch.is_empty() {
                break;
            }
            let wait = if batch.is_empty() {
                Duration::from_millis(100)
            } else {
                deadline.saturating_duration_since(now)
            };
            match self.consumer.poll(wait) {
                None => {
                    if !batch.is_empty() {
                        break;
                    }
                }
                Some(Ok(m)) => batch.push(m.detach()),
                Some(Err(e)) => match crate::error::classify_kafka(&e) {
                    ErrorClass::Fatal => return Err(PipelineError::kafka("poll", e)),
                    _ => warn!(error = %e, "Consumer error; continuing."),
                },
            }
        }
        let revoked: HashSet<(String, i32)> = match self.consumer.context().revoked.lock() {
            Ok(mut r) => r.drain(..).collect(),
            Err(_) => HashSet::new(),
        };
        if !revoked.is_empty() {
            let before = batch.len();
            batch.retain(|m| !revoked.contains(&(m.topic().to_string(), m.partition())));
            debug!(
                dropped = before - batch.len(),
                "Dropped input of revoked partitions."
            );
        }
        Ok(batch)
    }

    fn process_batch(&mut self, batch: &[OwnedMessage]) -> Result<(), PipelineError> {
        let exactly_once = self.config.delivery == Delivery::ExactlyOnce;
        if exactly_once {
            self.producer
                .begin_transaction()
                .map_err(kafka_err("begin transaction"))?;
        }
        let mut produced: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut dead: BTreeMap<&'static str, u64> = BTreeMap::new();
        for msg in batch {
            let span = info_span!(
                "message",
                stage = self.stage.name(),
                topic = msg.topic(),
                partition = msg.partition(),
                offset = msg.offset(),
                correlation_id = tracing::field::Empty,
                event_type = tracing::field::Empty,
            );
            let _g = span.enter();
            self.handle_message(msg, &mut produced, &mut dead)?;
        }
        if self.stage.stateful() {
            let topic = self.config.topics.state(self.stage.name());
            for (key, value) in self.stage.state_changes()? {
                let record: BaseRecord<'_, str, [u8]> = BaseRecord::to(&topic).key(key.as_str());
                let record = match &value {
                    Some(v) => record.payload(v.as_slice()),
                    None => record,
                };
                send_record(&self.producer, record)?;
            }
        }
        let offsets = next_offsets(batch)?;
        let timeout = self.config.transaction_timeout;
        if exactly_once {
            let group = self
                .consumer
                .group_metadata()
                .ok_or_else(|| PipelineError::Config("consumer has no group metadata".into()))?;
            self.producer
                .send_offsets_to_transaction(&offsets, &group, timeout)
                .map_err(kafka_err("send offsets to transaction"))?;
            self.commit_with_retries(timeout)?;
        } else {
            self.producer.flush(timeout).map_err(kafka_err("flush"))?;
            self.consumer
                .commit(&offsets, CommitMode::Sync)
                .map_err(kafka_err("commit offsets"))?;
        }
        self.stage.state_committed();
        for (t, n) in produced {
            self.metrics.events_out.with_label_values(&[t]).inc_by(n);
        }
        for (t, n) in dead {
            self.metrics.dead_letters.with_label_values(&[t]).inc_by(n);
        }
        Ok(())
    }

    /// A commit that times out may be retried; anything else is classified by the caller.
    fn commit_with_retries(&self, timeout: Duration) -> Result<(), PipelineError> {
        let mut attempt = 0;
        loop {
            match self.producer.commit_transaction(timeout) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let err = PipelineError::kafka("commit transaction", e);
                    if err.class() == ErrorClass::Retry && attempt < 3 {
                        attempt += 1;
                        warn!(attempt, error = %err, "Commit did not complete; retrying it.");
                        continue;
                    }
                    if err.class() == ErrorClass::Retry {
                        // An indefinite commit outcome: restart with a fresh producer.
                        return Err(PipelineError::Config(format!(
                            "transaction commit outcome unknown after retries: {err}"
                        )));
                    }
                    return Err(err);
                }
            }
        }
    }

    fn handle_message(
        &mut self,
        msg: &OwnedMessage,
        produced: &mut BTreeMap<&'static str, u64>,
        dead: &mut BTreeMap<&'static str, u64>,
    ) -> Result<(), PipelineError> {
        let Some(bytes) = msg.payload() else {
            self.dead_letter(
                msg,
                ErrorClass::DeadLetter,
                "empty_message",
                "message has no value",
            )?;
            *dead.entry("empty_message").or_default() += 1;
            return Ok(());
        };
        let event = match self.rt.block_on(self.codec.decode(bytes)) {
            Ok(ev) => ev,
            Err(e) if e.class() == ErrorClass::DeadLetter => {
                self.metrics
                    .events_in
                    .with_label_values(&["undecodable"])
                    .inc();
                self.dead_letter(msg, ErrorClass::DeadLetter, "decode", &e.to_string())?;
                *dead.entry("decode").or_default() += 1;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let span = tracing::Span::current();
        span.record("correlation_id", event.header.correlation_id.as_str());
        span.record("event_type", event.event_type());
        self.metrics
            .events_in
            .with_label_values(&[event.event_type()])
            .inc();
        let input = Input {
            topic: msg.topic(),
            partition: msg.partition(),
            offset: msg.offset(),
            event: &event,
        };
        let (dead_letter, outputs) = match self.stage.process(&input) {
            Outcome::Emit(outputs) => (None, outputs),
            Outcome::DeadLetter { error_type, reason } => (Some((error_type, reason)), vec![]),
            Outcome::DeadLetterAndEmit {
                error_type,
                reason,
                outputs,
            } => (Some((error_type, reason)), outputs),
        };
        if let Some((error_type, reason)) = dead_letter {
            self.dead_letter(msg, ErrorClass::DeadLetter, error_type, &reason)?;
            *dead.entry(error_type).or_default() += 1;
        }
        for out in outputs {
            let bytes = self.rt.block_on(self.codec.encode(&out.event))?;
            let topic = self.config.topics.name(out.event.payload.topic_kind());
            send_record(
                &self.producer,
                BaseRecord::to(&topic)
                    .key(out.key.as_bytes())
                    .payload(&bytes),
            )?;
            *produced.entry(out.event.event_type()).or_default() += 1;
        }
        Ok(())
    }

    /// Produces the original key and bytes to the DLQ, with the error context in headers.
    fn dead_letter(
        &self,
        msg: &OwnedMessage,
        class: ErrorClass,
        error_type: &str,
        reason: &str,
    ) -> Result<(), PipelineError> {
        dead_letter(
            &self.producer,
            &self.dlq_topic,
            self.stage.name(),
            msg,
            class,
            error_type,
            reason,
        )
    }

    /// Aborts the open transaction and seeks every batch partition back to its first
    /// offset, so the batch is read again. Partitions no longer assigned are skipped:
    /// their new owner reads from the committed offsets.
    fn abort_and_rewind(&mut self, batch: &[OwnedMessage]) -> Result<(), PipelineError> {
        self.metrics.transactions_aborted.inc();
        self.stage.state_rolled_back();
        if self.config.delivery == Delivery::ExactlyOnce {
            if let Err(e) = self
                .producer
                .abort_transaction(self.config.transaction_timeout)
            {
                let err = PipelineError::kafka("abort transaction", e);
                if err.class() == ErrorClass::Fatal {
                    return Err(err);
                }
                warn!(error = %err, "Abort did not complete cleanly.");
            }
        }
        let mut first: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for m in batch {
            first
                .entry((m.topic(), m.partition()))
                .or_insert(m.offset());
        }
        let assigned = self
            .consumer
            .assignment()
            .map_err(kafka_err("assignment"))?;
        for ((topic, partition), offset) in first {
            if assigned.find_partition(topic, partition).is_none() {
                continue;
            }
            if let Err(e) = self.consumer.seek(
                topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            ) {
                warn!(topic, partition, error = %e, "Cannot rewind partition; it will resume from the committed offset.");
            }
        }
        Ok(())
    }
}

/// Produces one record, waiting while librdkafka's queue is full instead of failing.
/// Produces a message's original key and bytes to a dead-letter topic, with the error
/// context in `dlq_headers`. Call it inside the transaction that consumes the message.
pub fn dead_letter(
    producer: &BaseProducer,
    dlq_topic: &str,
    stage: &str,
    msg: &OwnedMessage,
    class: ErrorClass,
    error_type: &str,
    reason: &str,
) -> Result<(), PipelineError> {
    warn!(error_type, reason, "Dead-lettering input message.");
    let partition = msg.partition().to_string();
    let offset = msg.offset().to_string();
    let headers = OwnedHeaders::new()
        .insert(KHeader {
            key: dlq_headers::STAGE,
            value: Some(stage),
        })
        .insert(KHeader {
            key: dlq_headers::ERROR_CLASS,
            value: Some(class.as_str()),
        })
        .insert(KHeader {
            key: dlq_headers::ERROR_TYPE,
            value: Some(error_type),
        })
        .insert(KHeader {
            key: dlq_headers::ERROR_MESSAGE,
            value: Some(reason),
        })
        .insert(KHeader {
            key: dlq_headers::SOURCE_TOPIC,
            value: Some(msg.topic()),
        })
        .insert(KHeader {
            key: dlq_headers::SOURCE_PARTITION,
            value: Some(&partition),
        })
        .insert(KHeader {
            key: dlq_headers::SOURCE_OFFSET,
            value: Some(&offset),
        });
    let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(dlq_topic).headers(headers);
    if let Some(k) = msg.key() {
        record = record.key(k);
    }
    if let Some(p) = msg.payload() {
        record = record.payload(p);
    }
    send_record(producer, record)
}

pub fn send_record<K, P>(
    producer: &BaseProducer,
    mut record: BaseRecord<'_, K, P>,
) -> Result<(), PipelineError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => {
                producer.poll(Duration::ZERO);
                return Ok(());
            }
            Err((
                KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                r,
            )) => {
                record = r;
                producer.poll(Duration::from_millis(50));
            }
            Err((e, _)) => return Err(PipelineError::kafka("produce", e)),
        }
    }
}

/// The offsets to commit for a batch: one past the last message of each partition.
fn next_offsets(batch: &[OwnedMessage]) -> Result<TopicPartitionList, PipelineError> {
    let mut last: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for m in batch {
        let e = last.entry((m.topic(), m.partition())).or_insert(m.offset());
        *e = (*e).max(m.offset());
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in last {
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset + 1))
            .map_err(kafka_err("build offsets"))?;
    }
    Ok(tpl)
}

/// A transactional producer for a loop of its own (not the runner): created, then
/// `init_transactions`, which fences a previous incarnation with the same id and aborts its
/// open transaction. State read after this returns is what is committed downstream.
pub fn transactional_producer(
    bootstrap_servers: &str,
    transactional_id: &str,
    transaction_timeout: Duration,
    shutdown: &CancellationToken,
) -> Result<BaseProducer, PipelineError> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("transactional.id", transactional_id)
        .set(
            "transaction.timeout.ms",
            transaction_timeout.as_millis().to_string(),
        )
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .create()
        .map_err(kafka_err("create producer"))?;
    retry_until(shutdown, "init transactions", || {
        producer
            .init_transactions(Duration::from_secs(30))
            .map_err(kafka_err("init transactions"))
    })?;
    Ok(producer)
}

/// Retries a blocking call on retriable errors until it succeeds or shutdown.
pub fn retry_until<T>(
    shutdown: &CancellationToken,
    what: &str,
    mut f: impl FnMut() -> Result<T, PipelineError>,
) -> Result<T, PipelineError> {
    let mut delay = Duration::from_millis(200);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if e.class() == ErrorClass::Retry && !shutdown.is_cancelled() => {
                warn!(what, error = %e, "Retrying.");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Timestamp;

    fn msg(topic: &str, partition: i32, offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            None,
            None,
            topic.into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    #[test]
    fn lag_is_known_only_with_a_position() {
        assert_eq!(position_lag(0, 10, 15), Some(5));
        assert_eq!(position_lag(0, 15, 15), Some(0));
        assert_eq!(position_lag(0, -1001, 15), None);
        assert_eq!(position_lag(-1, 10, 15), None);
    }

    #[test]
    fn next_offsets_are_one_past_the_last_per_partition() {
        let batch = vec![
            msg("a", 0, 5),
            msg("a", 1, 9),
            msg("a", 0, 7),
            msg("b", 0, 0),
        ];
        let tpl = next_offsets(&batch).expect("offsets");
        let get = |t: &str, p: i32| tpl.find_partition(t, p).map(|e| e.offset());
        assert_eq!(get("a", 0), Some(Offset::Offset(8)));
        assert_eq!(get("a", 1), Some(Offset::Offset(10)));
        assert_eq!(get("b", 0), Some(Offset::Offset(1)));
        assert_eq!(tpl.count(), 3);
    }
}
