//! The one place medpipe builds its Kafka clients: one set of defaults, and named
//! overrides per role, so every consumer reads `read_committed` with manual offsets and
//! every producer batches the same way.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use rdkafka::{ClientConfig, Offset};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::crypto::Secret;
use crate::error::{kafka_err, ErrorClass, PipelineError};

/// How a client reaches the brokers and who it is there: every client medpipe builds
/// starts from one of these, so a stage's credentials apply to its consumers, producers
/// and admin clients alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub bootstrap: String,
    /// `None`: plaintext without authentication (the dev stack's default listener).
    pub auth: Option<SaslAuth>,
}

/// A SASL principal, over TLS when `tls_ca` is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslAuth {
    /// `SCRAM-SHA-512`, `SCRAM-SHA-256` or `PLAIN`.
    pub mechanism: String,
    pub username: String,
    pub password: Secret<String>,
    /// The CA that signed the brokers' certificates (PEM); with it the client speaks
    /// SASL_SSL, without it SASL_PLAINTEXT.
    pub tls_ca: Option<std::path::PathBuf>,
}

impl Connection {
    /// No authentication.
    pub fn plaintext(bootstrap: impl Into<String>) -> Self {
        Connection {
            bootstrap: bootstrap.into(),
            auth: None,
        }
    }

    /// `bootstrap.servers` and the security settings every client shares.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        if let Some(a) = &self.auth {
            let protocol = if a.tls_ca.is_some() {
                "sasl_ssl"
            } else {
                "sasl_plaintext"
            };
            c.set("security.protocol", protocol)
                .set("sasl.mechanism", &a.mechanism)
                .set("sasl.username", &a.username)
                .set("sasl.password", a.password.expose());
            if let Some(ca) = &a.tls_ca {
                c.set("ssl.ca.location", ca.to_string_lossy());
            }
        }
        c
    }

    /// Who the brokers see: the SASL user, or `ANONYMOUS`.
    pub fn principal(&self) -> &str {
        self.auth
            .as_ref()
            .map_or("ANONYMOUS", |a| a.username.as_str())
    }
}

/// What a consumer is for; each role names its departures from the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumerRole {
    /// A consume-transform-produce stage: offsets only ever move through transactions
    /// (`enable.auto.offset.store=false`), its prefetch is bounded by `queued_max_kbytes`,
    /// and it exports statistics for the lag gauge.
    Stage { queued_max_kbytes: u32 },
    /// Ingestion's command consumer: a whole file is ingested between two polls, so the
    /// group must tolerate an hour between them.
    Commands,
    /// Auditing: subscribes by regex, so it refreshes metadata often to pick up new topics.
    Audit,
    /// A one-off reader of whole topics (read-back, state reload) with a throwaway group.
    Readback,
}

/// Keeps the last error librdkafka reported on its own (not as an answer to a call), such
/// as a refused SASL handshake.
#[derive(Debug, Default)]
struct LastError(Mutex<Option<(Option<rdkafka::types::RDKafkaErrorCode>, String)>>);

impl ClientContext for LastError {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Ok(mut last) = self.0.lock() {
            *last = Some((error.rdkafka_error_code(), reason.to_string()));
        }
    }
}

impl ConsumerContext for LastError {}

/// With credentials configured, asks the brokers for their metadata once, so that
/// credentials they refuse, or a TLS handshake that fails (brokers whose certificate the
/// configured CA did not sign), stop the process at start with an error that says so (librdkafka
/// would otherwise retry the handshake quietly until some later call timed out). A broker
/// that is merely unreachable or slow is left to the callers' own retries.
pub fn check_credentials(kafka: &Connection, within: Duration) -> Result<(), PipelineError> {
    let Some(auth) = &kafka.auth else {
        return Ok(());
    };
    let client: BaseConsumer<LastError> = kafka
        .client_config()
        .create_with_context(LastError::default())
        .map_err(kafka_err("create client"))?;
    let refused = |reason: &str| {
        PipelineError::Config(format!(
            "the brokers at {} refused the {} credentials of user {:?} ({reason}); check \
             MEDPIPE_KAFKA_SASL_USERNAME and the password file",
            kafka.bootstrap, auth.mechanism, auth.username
        ))
    };
    let untrusted = |reason: &str| {
        PipelineError::Config(format!(
            "the TLS handshake with the brokers at {} failed ({reason}); check that \
             MEDPIPE_KAFKA_TLS_CA_FILE holds the CA that signed the brokers' certificates \
             and that they are issued for the bootstrap host name",
            kafka.bootstrap
        ))
    };
    let fatal = |code: Option<RDKafkaErrorCode>, reason: &str| match code {
        Some(RDKafkaErrorCode::Authentication) => Some(refused(reason)),
        Some(RDKafkaErrorCode::SSL) if auth.tls_ca.is_some() => Some(untrusted(reason)),
        _ => None,
    };
    let deadline = Instant::now() + within;
    loop {
        if client.fetch_metadata(None, Duration::from_secs(2)).is_ok() {
            return Ok(());
        }
        // librdkafka reports a refused or failed handshake as an error event, which only a
        // poll delivers (to the poll's result or to the context).
        if let Some(Err(e)) = client.poll(Duration::from_millis(100)) {
            if let Some(err) = fatal(e.rdkafka_error_code(), &e.to_string()) {
                return Err(err);
            }
        }
        if let Some((code, reason)) = client.context().0.lock().ok().and_then(|l| l.clone()) {
            if let Some(err) = fatal(code, &reason) {
                return Err(err);
            }
        }
        if Instant::now() >= deadline {
            return Ok(());
        }
    }
}

/// The consumer defaults, then the role's overrides.
///
/// Defaults: no auto-commit, `read_committed`, start from the earliest offset when the
/// group has none, a 10 s session (so a dead member is noticed quickly), 10 ms fetch wait
/// (see KAFKA-NOTES: 500 ms made round trips six times slower), and a 16 MiB prefetch.
pub fn consumer_config(kafka: &Connection, group_id: &str, role: ConsumerRole) -> ClientConfig {
    let mut c = kafka.client_config();
    c.set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "2000")
        .set("fetch.wait.max.ms", "10")
        .set("queued.max.messages.kbytes", "16384")
        .set("queued.min.messages", "1000")
        // Once a partition's prefetch queue is over these limits, librdkafka waits this
        // long before fetching it again; its default of 1 s capped a busy partition at
        // about one queue's worth per second (the auditing stage fell a minute behind).
        .set("fetch.queue.backoff.ms", "10")
        .set("topic.metadata.refresh.interval.ms", "5000")
        // Statistics feed `FetchWatch` (and the runner's lag gauge).
        .set("statistics.interval.ms", "5000");
    match role {
        ConsumerRole::Stage { queued_max_kbytes } => {
            // Enough prefetched for a transaction of `batch_max_messages` (5,000), the
            // memory still bounded by `queued_max_kbytes`.
            c.set("enable.auto.offset.store", "false")
                // Range gives the same partition number of every input topic to one
                // member: a batch keyed alike on each input is one instance's (see
                // `runner::check_co_partitioned`).
                .set("partition.assignment.strategy", "range")
                .set("queued.min.messages", "10000")
                .set("max.poll.interval.ms", "120000")
                .set("queued.max.messages.kbytes", queued_max_kbytes.to_string());
        }
        ConsumerRole::Commands => {
            c.set("max.poll.interval.ms", "3600000");
        }
        ConsumerRole::Audit => {
            c.set("topic.metadata.refresh.interval.ms", "2000");
        }
        ConsumerRole::Readback => {}
    }
    c
}

/// How long an assigned partition may go without fetching before its consumer is
/// recreated. Statistics come every 5 s.
pub const STUCK_AFTER: Duration = Duration::from_secs(30);

/// Watches a group consumer's statistics for two ways librdkafka was seen to stall
/// after a broker restart, neither of which it recovers from on its own:
/// - an assigned partition that never starts fetching: an offset query answered with
///   NOT_COORDINATOR is never retried (librdkafka issue 5586);
/// - a group membership that never settles again (not `up`/`steady`, so no assignment).
///
/// The owner recreates the consumer when `stuck` says so; the new member's assignment
/// starts at the committed offsets.
#[derive(Debug, Default)]
pub struct FetchWatch {
    not_fetching: Mutex<HashMap<(String, i32), Instant>>,
    /// Since when the group membership has not been `up` and `steady`, with its state.
    unsettled: Mutex<Option<(Instant, String)>>,
}

impl FetchWatch {
    /// Notes which assigned partitions are not fetching, and whether the group membership
    /// is settled, from one statistics report.
    pub fn observe(&self, statistics: &Statistics) {
        if let (Some(g), Ok(mut unsettled)) = (&statistics.cgrp, self.unsettled.lock()) {
            if g.state == "up" && g.join_state == "steady" {
                *unsettled = None;
            } else if unsettled.is_none() {
                *unsettled = Some((Instant::now(), format!("{}/{}", g.state, g.join_state)));
            }
        }
        let Ok(mut m) = self.not_fetching.lock() else {
            return;
        };
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                let key = (topic.clone(), *partition);
                if *partition < 0 || !p.desired || p.fetch_state == "active" {
                    m.remove(&key);
                } else {
                    m.entry(key).or_insert_with(Instant::now);
                }
            }
        }
    }

    /// The assignment changed: start watching afresh.
    pub fn clear(&self) {
        if let Ok(mut m) = self.not_fetching.lock() {
            m.clear();
        }
    }

    /// Why the consumer looks stuck, if an assigned partition has not been fetching, or
    /// the group membership has not settled, for `after`.
    pub fn stuck(&self, after: Duration) -> Option<String> {
        if let Ok(m) = self.not_fetching.lock() {
            if let Some(((topic, partition), _)) =
                m.iter().find(|(_, since)| since.elapsed() >= after)
            {
                return Some(format!("{topic} [{partition}] has not started fetching"));
            }
        }
        if let Ok(u) = self.unsettled.lock() {
            if let Some((_, state)) = u.as_ref().filter(|(since, _)| since.elapsed() >= after) {
                return Some(format!("the group membership has stayed {state}"));
            }
        }
        None
    }
}

/// The context of a group consumer that needs nothing but the `FetchWatch`.
#[derive(Debug, Default)]
pub struct WatchedContext {
    pub watch: FetchWatch,
}

impl ClientContext for WatchedContext {
    fn stats(&self, statistics: Statistics) {
        self.watch.observe(&statistics);
    }
}

impl ConsumerContext for WatchedContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, _rebalance: &Rebalance<'_>) {
        self.watch.clear();
    }
}

/// A group consumer with a `FetchWatch`.
pub type WatchedConsumer = BaseConsumer<WatchedContext>;

/// A `WatchedConsumer` of `role` in `group_id`, subscribed to `topics` (names or `^`
/// regexes).
pub fn watched_consumer(
    kafka: &Connection,
    group_id: &str,
    role: ConsumerRole,
    topics: &[&str],
) -> Result<WatchedConsumer, PipelineError> {
    let consumer: WatchedConsumer = consumer_config(kafka, group_id, role)
        .create_with_context(WatchedContext::default())
        .map_err(kafka_err("create consumer"))?;
    consumer.subscribe(topics).map_err(kafka_err("subscribe"))?;
    Ok(consumer)
}

/// How long a replaced client may take to close before it is left to close on its own.
const CLOSE_WITHIN: Duration = Duration::from_secs(10);

/// Drops a Kafka client that is being replaced (a stuck consumer, say) on a thread of its
/// own, and waits at most [`CLOSE_WITHIN`] for it. Closing a consumer leaves its group
/// through the group coordinator, and librdkafka was seen to wait for that forever when
/// the coordinator it had cached went away: a game day's auditing hung for good in the
/// drop of the consumer it was replacing, after the controller fenced its own broker. A
/// client that does not close in time is left to its thread and counted in `abandoned`.
pub fn drop_aside<T: Send + 'static>(
    what: &'static str,
    client: T,
    abandoned: &prometheus::IntCounter,
) {
    drop_aside_within(what, client, abandoned, CLOSE_WITHIN);
}

fn drop_aside_within<T: Send + 'static>(
    what: &'static str,
    client: T,
    abandoned: &prometheus::IntCounter,
    within: Duration,
) {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name("drop-aside".into())
        .spawn(move || {
            drop(client);
            let _ = tx.send(());
        });
    if let Err(e) = spawned {
        // The closure, and the client with it, was dropped here already.
        warn!(what, error = %e, "Cannot start a thread to close a replaced client; it was closed in place.");
        return;
    }
    if rx.recv_timeout(within).is_err() {
        warn!(
            what,
            within_ms = within.as_millis() as u64,
            "A replaced Kafka client did not close in time; it is left to close on its own thread."
        );
        abandoned.inc();
    }
}

/// A consumer for one-off reads of whole topics, in a throwaway group of its own
/// (`<prefix>-<uuid>`), so it neither joins nor disturbs any stage's group.
pub fn readback_config(kafka: &Connection, prefix: &str) -> ClientConfig {
    let group = format!("{prefix}-{}", uuid::Uuid::new_v4());
    consumer_config(kafka, &group, ConsumerRole::Readback)
}

/// An admin client's configuration (topic creation and deletion).
pub fn admin_config(kafka: &Connection) -> ClientConfig {
    kafka.client_config()
}

/// The producer defaults: a short linger and lz4, which batch well at medpipe's rates.
pub fn producer_config(kafka: &Connection) -> ClientConfig {
    let mut c = kafka.client_config();
    c.set("linger.ms", "5").set("compression.type", "lz4");
    c
}

/// Moves every partition the consumer owns back to the group's committed offset (the
/// earliest offset where the group has none), so input read since the last committed
/// transaction is read again. Waits up to `within` for the group coordinator to answer,
/// then gives up with a `Timeout` error: the caller then recreates the consumer, whose
/// assignment starts at the committed offsets too. (A consumer whose coordinator went
/// away can stop answering offset queries for good; see `FetchWatch`.)
///
/// The consumer is polled (with no wait) before each attempt: after a broker failure a
/// rebalance callback may be pending, and the group answers no offset query until the
/// application has served it. A message such a poll returns is dropped, since every
/// owned partition is sought back to its committed offset right after.
///
/// The committed-offsets list is dropped before seeking: a live list returned by
/// `committed_offsets` was seen to hang the consumer's destruction (KAFKA-NOTES).
pub fn rewind_to_committed<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    within: Duration,
    shutdown: &CancellationToken,
) -> Result<usize, PipelineError> {
    let deadline = Instant::now() + within;
    let targets = loop {
        let _ = consumer.poll(Duration::ZERO);
        match committed_targets(consumer) {
            Ok(t) => break t,
            Err(e) if e.class() == ErrorClass::Retry => {
                if shutdown.is_cancelled() || Instant::now() >= deadline {
                    return Err(PipelineError::Timeout(format!(
                        "the committed offsets could not be read within {within:?}: {e}"
                    )));
                }
                warn!(error = %e, "Cannot read the committed offsets yet; retrying.");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    };
    for (topic, partition, to) in &targets {
        consumer
            .seek(topic, *partition, *to, Duration::from_secs(10))
            .map_err(kafka_err("seek to the committed offset"))?;
    }
    info!(
        partitions = targets.len(),
        "Rewound to the committed offsets."
    );
    Ok(targets.len())
}

/// Where each owned partition must be read from again: its committed offset.
fn committed_targets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
) -> Result<Vec<(String, i32, Offset)>, PipelineError> {
    let assignment = consumer.assignment().map_err(kafka_err("assignment"))?;
    if assignment.count() == 0 {
        return Ok(Vec::new());
    }
    let committed = consumer
        .committed_offsets(assignment, Duration::from_secs(5))
        .map_err(kafka_err("read committed offsets"))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| {
            let to = match e.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            (e.topic().to_string(), e.partition(), to)
        })
        .collect())
}

/// Produces one record, waiting while librdkafka's queue is full instead of failing.
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
                serve_or_sleep(producer);
            }
            Err((e, _)) => return Err(PipelineError::kafka("produce", e)),
        }
    }
}

/// Serves the delivery reports that are ready, and sleeps a little when there were none.
///
/// rdkafka's `BaseProducer::poll(t)` does not return at the first event: it serves
/// events until `t` has passed, and below 1 ms it spins (librdkafka's wait is in whole
/// milliseconds). So a short `poll` burns a core and a long one always waits it out; a
/// zero-time `poll` and a short sleep do neither.
fn serve_or_sleep(producer: &BaseProducer) {
    use rdkafka::producer::Producer;
    let before = producer.in_flight_count();
    producer.poll(Duration::ZERO);
    if producer.in_flight_count() == before {
        std::thread::sleep(Duration::from_micros(250));
    }
}

/// Serves delivery reports until nothing is in flight, or `within` passed. Returns
/// whether everything was delivered (or failed) in time.
///
/// Call it before `commit_transaction`. rdkafka's `BaseProducer::commit_transaction`
/// first flushes, and its flush serves delivery reports with `poll(100 ms)`, which blocks
/// for the full 100 ms even when the reports are already there: every commit cost at
/// least 100 ms that way (BENCHMARKS.md, "Why a commit cost 100 ms"). Once the reports
/// are served here, that flush returns at once.
pub fn drain_deliveries(producer: &BaseProducer, within: Duration) -> bool {
    use rdkafka::producer::Producer;
    let deadline = std::time::Instant::now() + within;
    while producer.in_flight_count() > 0 {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        serve_or_sleep(producer);
    }
    true
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

    /// A replaced client whose drop blocks (as librdkafka's consumer close did when its
    /// cached group coordinator went away, which the mock cluster does not reproduce) is
    /// left to its thread: `drop_aside` comes back on time and counts it. One whose drop
    /// returns is not counted.
    #[test]
    fn a_client_that_does_not_close_in_time_is_left_aside_and_counted() {
        struct Stuck(std::sync::mpsc::Receiver<()>);
        impl Drop for Stuck {
            fn drop(&mut self) {
                let _ = self.0.recv();
            }
        }
        let abandoned = prometheus::IntCounter::new("abandoned", "test").expect("counter");
        let (release, rx) = std::sync::mpsc::channel();
        let within = Duration::from_millis(300);
        let started = Instant::now();
        drop_aside_within("stuck", Stuck(rx), &abandoned, within);
        let took = started.elapsed();
        assert!(took >= within && took < within * 10, "took {took:?}");
        assert_eq!(abandoned.get(), 1);
        drop(release);
        drop_aside_within("fine", 5u8, &abandoned, within);
        assert_eq!(abandoned.get(), 1);
    }

    fn get(c: &ClientConfig, k: &str) -> Option<String> {
        c.get(k).map(str::to_string)
    }

    #[test]
    fn every_role_reads_committed_with_manual_offsets() {
        for role in [
            ConsumerRole::Stage {
                queued_max_kbytes: 100,
            },
            ConsumerRole::Commands,
            ConsumerRole::Audit,
            ConsumerRole::Readback,
        ] {
            let c = consumer_config(&Connection::plaintext("b:9092"), "g", role);
            assert_eq!(
                get(&c, "isolation.level").as_deref(),
                Some("read_committed")
            );
            assert_eq!(get(&c, "enable.auto.commit").as_deref(), Some("false"));
        }
        let stage = consumer_config(
            &Connection::plaintext("b:9092"),
            "g",
            ConsumerRole::Stage {
                queued_max_kbytes: 100,
            },
        );
        assert_eq!(
            get(&stage, "queued.max.messages.kbytes").as_deref(),
            Some("100")
        );
        assert_eq!(
            get(&stage, "enable.auto.offset.store").as_deref(),
            Some("false")
        );
        let commands = consumer_config(
            &Connection::plaintext("b:9092"),
            "g",
            ConsumerRole::Commands,
        );
        assert_eq!(
            get(&commands, "max.poll.interval.ms").as_deref(),
            Some("3600000")
        );
    }

    #[test]
    fn credentials_reach_every_kind_of_client() {
        let plain = Connection::plaintext("b:9092");
        assert_eq!(get(&producer_config(&plain), "security.protocol"), None);
        assert_eq!(plain.principal(), "ANONYMOUS");
        let mut sasl = Connection {
            bootstrap: "b:9094".into(),
            auth: Some(SaslAuth {
                mechanism: "SCRAM-SHA-512".into(),
                username: "medpipe-canonization".into(),
                password: Secret::new("pw".into()),
                tls_ca: None,
            }),
        };
        for c in [
            producer_config(&sasl),
            admin_config(&sasl),
            consumer_config(&sasl, "g", ConsumerRole::Audit),
            crate::txn::transactional_config(&sasl, "t", Duration::from_secs(10)),
        ] {
            assert_eq!(
                get(&c, "security.protocol").as_deref(),
                Some("sasl_plaintext")
            );
            assert_eq!(get(&c, "sasl.mechanism").as_deref(), Some("SCRAM-SHA-512"));
            assert_eq!(
                get(&c, "sasl.username").as_deref(),
                Some("medpipe-canonization")
            );
            assert_eq!(get(&c, "sasl.password").as_deref(), Some("pw"));
        }
        assert!(
            !format!("{sasl:?}").contains("pw\""),
            "Debug shows no password"
        );
        if let Some(a) = sasl.auth.as_mut() {
            a.tls_ca = Some("/etc/medpipe/ca.crt".into());
        }
        let c = producer_config(&sasl);
        assert_eq!(get(&c, "security.protocol").as_deref(), Some("sasl_ssl"));
        assert_eq!(
            get(&c, "ssl.ca.location").as_deref(),
            Some("/etc/medpipe/ca.crt")
        );
    }
}
