//! The consume-transform-produce loop every Kafka-fed stage runs on.
//!
//! Exactly-once works like this: the runner polls a batch of input messages with no
//! transaction open, then begins a transaction, produces every output (and every dead
//! letter) of the batch and the stage's changed state, adds the batch's input offsets
//! with `send_offsets_to_transaction`, and commits ([`crate::txn::Transactions`]). Input
//! is read with `isolation.level=read_committed`.
//!
//! The rewind rule: the consumer's fetch position runs ahead of what is committed, so
//! whenever work is thrown away the runner brings position and state back to what is
//! committed before it processes anything else:
//! - a rebalance (revoke, lost assignment or assign) only happens inside poll, when no
//!   transaction is open. Everything collected before it is dropped; partitions assigned
//!   afterwards start at the group's committed offsets, and the stage's state is reloaded
//!   from its state topic;
//! - a failed batch (an abort, an unknown commit outcome, a broker gone away) is ended by
//!   `Transactions::recover`, every partition still owned is sought back to its committed
//!   offset (or the consumer is recreated if a seek fails), and the state is reloaded.
//!
//! librdkafka's transaction calls block, so the loop runs on a blocking thread, never on
//! an async worker; the async codec is driven from it with `Handle::block_on`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Header as KHeader, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn};

use crate::codec::Codec;
use crate::error::{kafka_err, ErrorClass, PipelineError};
use crate::events::Event;
use crate::kafka::{consumer_config, rewind_to_committed, ConsumerRole, FetchWatch, STUCK_AFTER};
use crate::telemetry::StageMetrics;
use crate::topics::Topics;
use crate::txn::{Transactions, TxnSettings};

pub use crate::kafka::{retry_until, send_record};

/// One decoded input message, as a stage sees it.
#[derive(Debug)]
pub struct Input<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub event: &'a Event,
    /// The message was a dead letter that `medpipe dlq redrive` put back: it may belong
    /// to a batch the stage already closed.
    pub redriven: bool,
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

/// Which input partitions this instance owns right now.
pub type Owns<'a> = &'a dyn Fn(&str, i32) -> bool;

/// A stage's pure logic. It must do no IO. State that spans messages lives in the object
/// `state` returns (a `state::KeyedState`): the runner may call `process` again for the
/// same input after an abort, and rolls the state back first. Only what a stage really
/// varies is here: its name, `process`, `tick`, its metrics and its state.
pub trait Stage: Send + 'static {
    /// Short stage name, e.g. `anonymization`; names the DLQ and metrics.
    fn name(&self) -> &'static str;
    fn process(&mut self, input: &Input<'_>) -> Outcome;

    /// Time-based decisions, called about once a second with the wall clock (micros since
    /// the epoch): for example a batch whose counts never added up fails after a timeout.
    /// `owns` says whether this instance owns an input partition, so that of several
    /// instances only the owner of a batch acts on it. The outputs and state changes
    /// commit in a transaction of their own.
    fn tick(&mut self, _now_micros: i64, _owns: Owns<'_>) -> Vec<Output> {
        Vec::new()
    }

    /// Work the stage carries over to later transactions, for example the rest of a large
    /// batch's withdrawal: called before each transaction, whose outputs and state changes
    /// it joins. `owns` as for `tick`.
    fn resume(&mut self, _owns: Owns<'_>) -> Vec<Output> {
        Vec::new()
    }

    /// Whether `resume` has work on partitions this instance owns (`owns`): the runner then
    /// does not wait for input to arrive. Work another instance owns must not count, or
    /// this instance would spin on it.
    fn has_work(&self, _owns: Owns<'_>) -> bool {
        false
    }

    /// Registers the stage's own metrics beside the runner's, on the /metrics registry.
    fn register_metrics(&mut self, _registry: &prometheus::Registry) -> Result<(), PipelineError> {
        Ok(())
    }

    /// The stage's durable state, kept in `<prefix>-internal.<name>-state.v1`, if any
    /// (`state::KeyedState` implements it). The runner commits, rolls back and reloads it
    /// with the stage's transactions.
    fn state(&mut self) -> Option<&mut dyn crate::state::DurableState> {
        None
    }
}

/// Everything the runner needs besides the stage.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub kafka: crate::kafka::Connection,
    pub group_id: String,
    /// Stable per replica: a restarted replica fences its previous incarnation.
    pub transactional_id: String,
    /// Topic names, or librdkafka regexes starting with `^`.
    pub input_topics: Vec<String>,
    pub topics: Topics,
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
    /// On a message `medpipe dlq redrive` put back on its source topic: how many times it
    /// was redriven. Kept on a dead letter of a redriven message.
    pub const REDRIVE_COUNT: &str = "medpipe.redrive.count";
    /// On a redriven message: the dead letter it came from, `<topic>/<partition>/<offset>`.
    pub const REDRIVE_FROM: &str = "medpipe.redrive.from";

    /// How many times a message was redriven (0 for one that never was).
    pub fn redrive_count(msg: &impl rdkafka::message::Message) -> u32 {
        use rdkafka::message::Headers;
        msg.headers()
            .and_then(|hs| {
                hs.iter()
                    .find(|h| h.key == REDRIVE_COUNT)
                    .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
            })
            .unwrap_or(0)
    }
}

/// Consumer context: notes rebalances for the loop, exports lag from statistics, and
/// watches for assigned partitions that never start fetching.
pub struct RunnerContext {
    /// Set by every rebalance event; the loop drops what it collected before it.
    rebalanced: AtomicBool,
    watch: FetchWatch,
    metrics: StageMetrics,
}

impl ClientContext for RunnerContext {
    /// Exports lag as last stable offset minus the consumer's position. librdkafka's own
    /// `consumer_lag` is measured against offsets the consumer committed itself, and ours
    /// are committed by the transactional producer, so it would always read -1.
    fn stats(&self, statistics: Statistics) {
        self.watch.observe(&statistics);
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
                    lost, "Partitions revoked; dropping uncommitted input."
                );
                self.metrics.rewinds.with_label_values(&["rebalance"]).inc();
            }
            Rebalance::Assign(tpl) => {
                info!(partitions = tpl.count(), "Partitions assigned.");
            }
            Rebalance::Error(e) => warn!(error = %e, "Rebalance error."),
        }
        self.watch.clear();
        self.rebalanced.store(true, Ordering::SeqCst);
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
        Runner::new(stage, config, codec, metrics, handle, &shutdown)?.run(&shutdown)
    })
    .await
    .map_err(|e| PipelineError::Thread(format!("runner thread failed: {e}")))?
}

struct Runner<S> {
    stage: S,
    config: RunnerConfig,
    codec: Arc<Codec>,
    metrics: StageMetrics,
    rt: Handle,
    consumer: StageConsumer,
    txn: Transactions,
    dlq_topic: String,
    /// The stage's state must be reloaded from its topic before the next batch.
    reload_state: bool,
    last_tick: Instant,
}

/// What one round of polling brought.
struct Collected {
    batch: Vec<OwnedMessage>,
    /// A rebalance happened: what was collected before it was dropped.
    rebalanced: bool,
}

/// How long a rewind waits for the committed offsets before recreating the consumer.
const REWIND_WITHIN: Duration = Duration::from_secs(30);

/// How long a transaction that has input waits for more before it commits.
const LINGER_FOR_MORE: Duration = Duration::from_millis(2);

/// How often `Stage::tick` runs.
const TICK_EVERY: Duration = Duration::from_secs(1);

impl<S: Stage> Runner<S> {
    fn new(
        stage: S,
        config: RunnerConfig,
        codec: Arc<Codec>,
        metrics: StageMetrics,
        rt: Handle,
        shutdown: &CancellationToken,
    ) -> Result<Self, PipelineError> {
        let consumer = subscribed_consumer(&config, &metrics)?;
        check_co_partitioned(&consumer, &config.input_topics, shutdown)?;
        let txn = Transactions::connect(
            TxnSettings::new(
                &config.kafka,
                &config.transactional_id,
                config.transaction_timeout,
            ),
            metrics.clone(),
            shutdown,
        )?;
        let dlq_topic = config.topics.dlq(stage.name());
        Ok(Runner {
            stage,
            config,
            codec,
            metrics,
            rt,
            consumer,
            txn,
            dlq_topic,
            reload_state: true,
            last_tick: Instant::now(),
        })
    }

    fn run(mut self, shutdown: &CancellationToken) -> Result<(), PipelineError> {
        let stage = self.stage.name();
        self.metrics.set_ready(true);
        info!(stage, topics = ?self.config.input_topics, transactional_id = %self.config.transactional_id, "Stage runner started.");

        while !shutdown.is_cancelled() {
            if let Some(why) = self.consumer.context().watch.stuck(STUCK_AFTER) {
                warn!(
                    stage,
                    why, "The consumer has been stuck for 30s; recreating it."
                );
                self.metrics
                    .rewinds
                    .with_label_values(&["stuck_fetch"])
                    .inc();
                let new = subscribed_consumer(&self.config, &self.metrics)?;
                let old = std::mem::replace(&mut self.consumer, new);
                crate::kafka::drop_aside("consumer", old, &self.metrics.calls_abandoned);
                self.reload_state = true;
            }
            let busy = self.owned_work();
            let collected = self.collect(shutdown, busy)?;
            if collected.rebalanced {
                self.reload_state = true;
            }
            if self.reload_state {
                self.reload_state(shutdown)?;
            }
            let mut ticked = if self.last_tick.elapsed() >= TICK_EVERY {
                self.last_tick = Instant::now();
                self.with_owns(|stage, now, owns| stage.tick(now, owns))
            } else {
                Vec::new()
            };
            if self.owned_work() {
                ticked.extend(self.with_owns(|stage, _, owns| stage.resume(owns)));
            }
            if collected.batch.is_empty() && ticked.is_empty() {
                continue;
            }
            if let Err(e) = self.process_batch(&collected.batch, ticked) {
                if e.class() == ErrorClass::Fatal {
                    error!(stage, error = %e, "Fatal error; exiting so a restart gets a clean producer.");
                    self.metrics.set_ready(false);
                    return Err(e);
                }
                warn!(stage, error = %e, class = e.class().as_str(), "Batch failed; rewinding to the committed state to redo it.");
                if e.class() == ErrorClass::Retry {
                    self.codec.clear_cached_errors();
                }
                self.rewind(shutdown)?;
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        self.metrics.set_ready(false);
        info!(stage, "Stage runner stopped cleanly.");
        Ok(())
    }

    /// Whether the stage has carried-over work on partitions this instance owns.
    fn owned_work(&mut self) -> bool {
        let mut busy = false;
        self.with_owns(|stage, _, owns| {
            busy = stage.has_work(owns);
            Vec::new()
        });
        busy
    }

    /// Runs `f` (the stage's time-based decisions, or its carried-over work) with the wall
    /// clock and the partitions this instance owns.
    fn with_owns(&mut self, f: impl FnOnce(&mut S, i64, Owns<'_>) -> Vec<Output>) -> Vec<Output> {
        let assignment = match self.consumer.assignment() {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "Cannot read the assignment; skipping the stage's own work this round.");
                return Vec::new();
            }
        };
        let owns =
            |topic: &str, partition: i32| assignment.find_partition(topic, partition).is_some();
        let now = chrono::Utc::now().timestamp_micros();
        f(&mut self.stage, now, &owns)
    }

    /// The rewind rule after a failed batch: end the transaction so the committed state is
    /// definite, move every owned partition back to its committed offset, reload state.
    fn rewind(&mut self, shutdown: &CancellationToken) -> Result<(), PipelineError> {
        self.metrics
            .rewinds
            .with_label_values(&["failed_batch"])
            .inc();
        self.txn.recover(shutdown)?;
        if let Some(s) = self.stage.state() {
            s.rollback();
        }
        if let Err(e) = rewind_to_committed(&self.consumer, REWIND_WITHIN, shutdown) {
            if e.class() == ErrorClass::Fatal {
                return Err(e);
            }
            warn!(error = %e, "Cannot seek to the committed offsets; recreating the consumer.");
            // The new member's partitions start at the committed offsets.
            let new = subscribed_consumer(&self.config, &self.metrics)?;
            let old = std::mem::replace(&mut self.consumer, new);
            crate::kafka::drop_aside("consumer", old, &self.metrics.calls_abandoned);
        }
        self.reload_state = true;
        Ok(())
    }

    /// Replaces a stateful stage's state with what its state topic holds committed. No
    /// transaction of this instance is open here, and a previous owner's last one
    /// completed before the assignment did.
    fn reload_state(&mut self, shutdown: &CancellationToken) -> Result<(), PipelineError> {
        match self.stage.state() {
            Some(s) => s.rollback(),
            None => {
                self.reload_state = false;
                return Ok(());
            }
        }
        let topic = self.config.topics.state(self.stage.name());
        let kafka = self.config.kafka.clone();
        let entries = retry_until(shutdown, "reload stage state", || {
            crate::readback::read_entries(&kafka, &topic, Duration::from_secs(120))
        })?;
        info!(entries = entries.len(), "Stage state reloaded.");
        if let Some(s) = self.stage.state() {
            s.restore(entries)?;
        }
        self.reload_state = false;
        Ok(())
    }

    /// Polls up to `batch_max_messages` or `batch_max_wait`, whichever comes first, and
    /// stops early when no more input arrives within `LINGER_FOR_MORE`. A
    /// rebalance ends the round: what was collected before it is dropped (its partitions
    /// were revoked, or are re-read from the committed offsets), and a message the same
    /// poll returned after the rebalance is kept, since it comes from the new assignment.
    fn collect(
        &self,
        shutdown: &CancellationToken,
        busy: bool,
    ) -> Result<Collected, PipelineError> {
        // Carried-over work goes on without waiting for input.
        let wait_at_most = if busy {
            LINGER_FOR_MORE
        } else {
            self.config.batch_max_wait
        };
        let deadline = Instant::now() + wait_at_most;
        let mut batch = Vec::new();
        while batch.len() < self.config.batch_max_messages && !shutdown.is_cancelled() {
            let now = Instant::now();
            // An idle round ends too, so that `Stage::tick` runs while no input arrives.
            if now >= deadline {
                break;
            }
            // Once a transaction has input, it takes only what arrives without a pause:
            // under load the prefetch queue keeps it growing to its limits, and a lone
            // record goes out at once instead of waiting out `batch_max_wait`.
            let wait = if batch.is_empty() {
                deadline
                    .saturating_duration_since(now)
                    .min(Duration::from_millis(100))
            } else {
                deadline.saturating_duration_since(now).min(LINGER_FOR_MORE)
            };
            let polled = self.consumer.poll(wait);
            let rebalanced = self
                .consumer
                .context()
                .rebalanced
                .swap(false, Ordering::SeqCst);
            if rebalanced {
                batch.clear();
            }
            let idle = match polled {
                None => true,
                Some(Ok(m)) => {
                    batch.push(m.detach());
                    false
                }
                Some(Err(e)) => match crate::error::classify_kafka(&e) {
                    ErrorClass::Fatal => return Err(PipelineError::kafka("poll", e)),
                    _ => {
                        warn!(error = %e, "Consumer error; continuing.");
                        false
                    }
                },
            };
            if rebalanced {
                return Ok(Collected {
                    batch,
                    rebalanced: true,
                });
            }
            if idle && !batch.is_empty() {
                break;
            }
        }
        Ok(Collected {
            batch,
            rebalanced: false,
        })
    }

    fn process_batch(
        &mut self,
        batch: &[OwnedMessage],
        ticked: Vec<Output>,
    ) -> Result<(), PipelineError> {
        self.txn.begin()?;
        let mut produced: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut dead: BTreeMap<&'static str, u64> = BTreeMap::new();
        for out in ticked {
            self.produce(out, &mut produced)?;
        }
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
        let topic = self.config.topics.state(self.stage.name());
        if let Some(state) = self.stage.state() {
            for (key, value) in state.changes()? {
                let record: BaseRecord<'_, str, [u8]> = BaseRecord::to(&topic).key(key.as_str());
                let record = match &value {
                    Some(v) => record.payload(v.as_slice()),
                    None => record,
                };
                self.txn.send(record)?;
            }
        }
        if batch.is_empty() {
            self.txn.commit(None)?;
        } else {
            let offsets = next_offsets(batch)?;
            let group = self
                .consumer
                .group_metadata()
                .ok_or(PipelineError::Invariant(
                    "the consumer has no group metadata",
                ))?;
            self.txn.commit(Some((offsets, group)))?;
        }
        if let Some(s) = self.stage.state() {
            s.commit();
        }
        for (t, n) in produced {
            self.metrics.events_out.with_label_values(&[t]).inc_by(n);
        }
        for (t, n) in dead {
            self.metrics.dead_letters.with_label_values(&[t]).inc_by(n);
        }
        Ok(())
    }

    fn produce(
        &mut self,
        out: Output,
        produced: &mut BTreeMap<&'static str, u64>,
    ) -> Result<(), PipelineError> {
        let bytes = self.rt.block_on(self.codec.encode(&out.event))?;
        let topic = self.config.topics.name(out.event.payload.topic_kind());
        self.txn.send(
            BaseRecord::to(&topic)
                .key(out.key.as_bytes())
                .payload(&bytes),
        )?;
        *produced.entry(out.event.event_type()).or_default() += 1;
        Ok(())
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
            redriven: dlq_headers::redrive_count(msg) > 0,
        };
        let (dead_letter, outputs) = match process_guarded(&mut self.stage, &input) {
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
            self.produce(out, produced)?;
        }
        Ok(())
    }

    /// Produces the original key and bytes to the DLQ, with the error context in headers.
    fn dead_letter(
        &mut self,
        msg: &OwnedMessage,
        class: ErrorClass,
        error_type: &str,
        reason: &str,
    ) -> Result<(), PipelineError> {
        self.txn.begin()?;
        dead_letter(
            self.txn.producer(),
            &self.dlq_topic,
            self.stage.name(),
            msg,
            class,
            error_type,
            reason,
        )
    }
}

/// The DLQ `error_type` of a record whose processing panicked.
pub const STAGE_PANICKED: &str = "stage_panicked";

/// `stage.process`, with a panic turned into a dead letter: a record that meets a defect
/// must not crash the stage, since the restarted stage would read the same record, crash
/// again and stall its partition. The record is kept on the DLQ for a redrive once the
/// defect is fixed; its batch then cannot add up, so it fails at its deadline and is held,
/// as after any loss. The panic's message is not in the reason, since it can quote the
/// record (the panic hook, `telemetry::init_tracing`, logs where it happened).
fn process_guarded<S: Stage>(stage: &mut S, input: &Input<'_>) -> Outcome {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| stage.process(input))) {
        Ok(outcome) => outcome,
        Err(_) => Outcome::DeadLetter {
            error_type: STAGE_PANICKED,
            reason: format!(
                "medpipe-{} panicked processing this {} event (a defect in medpipe; its log says where); kept for a redrive once it is fixed",
                stage.name(),
                input.event.event_type()
            ),
        },
    }
}

/// A stage consumer in the group, subscribed to the stage's input.
fn subscribed_consumer(
    config: &RunnerConfig,
    metrics: &StageMetrics,
) -> Result<StageConsumer, PipelineError> {
    let ctx = RunnerContext {
        rebalanced: AtomicBool::new(false),
        watch: FetchWatch::default(),
        metrics: metrics.clone(),
    };
    let consumer: StageConsumer = consumer_config(
        &config.kafka,
        &config.group_id,
        ConsumerRole::Stage {
            queued_max_kbytes: config.queued_max_kbytes,
        },
    )
    .create_with_context(ctx)
    .map_err(kafka_err("create consumer"))?;
    let topics: Vec<&str> = config.input_topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(kafka_err("subscribe"))?;
    Ok(consumer)
}

/// Refuses to run a stage whose input topics have different partition counts.
///
/// A stage that reads several topics keyed by batch id (canonization: the anonymization
/// topic and the saga topic) relies on each batch's events of every input landing on the
/// same partition number, and on the range assignor (`ConsumerRole::Stage`) giving that
/// partition number of every input to the same instance: that instance alone holds the
/// batch's state. Both hold only when the topics have as many partitions.
fn check_co_partitioned(
    consumer: &StageConsumer,
    topics: &[String],
    shutdown: &CancellationToken,
) -> Result<(), PipelineError> {
    if topics.len() < 2 {
        return Ok(());
    }
    let mut counts = Vec::with_capacity(topics.len());
    for topic in topics {
        let md = retry_until(shutdown, "read the input topics' partitions", || {
            consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .map_err(kafka_err("fetch metadata"))
        })?;
        let n = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len());
        counts.push((topic.as_str(), n));
    }
    co_partitioned(&counts).map_err(PipelineError::Config)
}

/// Why topics with these partition counts cannot be read by several instances of one
/// stage, if they cannot.
fn co_partitioned(counts: &[(&str, usize)]) -> Result<(), String> {
    let Some((first, n)) = counts.first() else {
        return Ok(());
    };
    match counts.iter().find(|(_, m)| m != n) {
        None => Ok(()),
        Some((other, m)) => Err(format!(
            "the input topics {first} ({n} partitions) and {other} ({m} partitions) must have as \
             many partitions: the stage keeps each batch's state on the instance that owns the \
             batch's partition of every input. Add partitions to the smaller one"
        )),
    }
}

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
    // A redriven message that fails again says so on its new dead letter.
    let redriven = dlq_headers::redrive_count(msg);
    let count = redriven.to_string();
    let headers = if redriven > 0 {
        headers.insert(KHeader {
            key: dlq_headers::REDRIVE_COUNT,
            value: Some(&count),
        })
    } else {
        headers
    };
    let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(dlq_topic).headers(headers);
    if let Some(k) = msg.key() {
        record = record.key(k);
    }
    if let Some(p) = msg.payload() {
        record = record.payload(p);
    }
    send_record(producer, record)
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

    /// A stage that panics with a record's contents in the message, or dead-letters.
    struct Fragile;

    impl Stage for Fragile {
        fn name(&self) -> &'static str {
            "fragile"
        }
        fn process(&mut self, input: &Input<'_>) -> Outcome {
            let crate::events::Payload::SourceRecordIngested(r) = &input.event.payload else {
                return Outcome::Emit(Vec::new());
            };
            if r.record_type == "Patient" {
                panic!("cannot cut {:?}", r.sealed.ciphertext);
            }
            Outcome::DeadLetter {
                error_type: "other",
                reason: "r".into(),
            }
        }
    }

    #[test]
    fn a_panic_in_process_dead_letters_the_record_without_its_message() {
        use crate::events::{Payload, SealedPayload, SourceRecordIngested};
        let event = |record_type: &str| {
            Event::new(
                "s",
                "b",
                None,
                Payload::SourceRecordIngested(SourceRecordIngested {
                    batch_id: "b".into(),
                    position: 1,
                    source_format: "csv".into(),
                    record_type: record_type.into(),
                    sealed: SealedPayload {
                        key_id: "k".into(),
                        wrapped_key: vec![],
                        nonce: vec![],
                        ciphertext: b"Jane Doe".to_vec(),
                    },
                }),
            )
        };
        let input = |event| Input {
            topic: "t",
            partition: 0,
            offset: 3,
            event,
            redriven: false,
        };
        let panicking = event("Patient");
        match process_guarded(&mut Fragile, &input(&panicking)) {
            Outcome::DeadLetter { error_type, reason } => {
                assert_eq!(error_type, STAGE_PANICKED);
                assert!(reason.contains("medpipe-fragile panicked"), "{reason}");
                assert!(!reason.contains("74, 97"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // A stage that does not panic keeps its own outcome.
        let calm = event("Observation");
        assert!(matches!(
            process_guarded(&mut Fragile, &input(&calm)),
            Outcome::DeadLetter {
                error_type: "other",
                ..
            }
        ));
    }

    #[test]
    fn lag_is_known_only_with_a_position() {
        assert_eq!(position_lag(0, 10, 15), Some(5));
        assert_eq!(position_lag(0, 15, 15), Some(0));
        assert_eq!(position_lag(0, -1001, 15), None);
        assert_eq!(position_lag(-1, 10, 15), None);
    }

    #[test]
    fn inputs_must_have_as_many_partitions() {
        assert!(co_partitioned(&[("a", 3)]).is_ok());
        assert!(co_partitioned(&[("a", 3), ("b", 3)]).is_ok());
        let e = co_partitioned(&[("a", 3), ("b", 3), ("c", 6)]).unwrap_err();
        assert!(e.contains("a (3 partitions) and c (6 partitions)"), "{e}");
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
