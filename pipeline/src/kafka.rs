//! The one place medpipe builds its Kafka clients: one set of defaults, and named
//! overrides per role, so every consumer reads `read_committed` with manual offsets and
//! every producer batches the same way.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord};
use rdkafka::{ClientConfig, Offset};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::{kafka_err, ErrorClass, PipelineError};

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

/// The consumer defaults, then the role's overrides.
///
/// Defaults: no auto-commit, `read_committed`, start from the earliest offset when the
/// group has none, a 10 s session (so a dead member is noticed quickly), 10 ms fetch wait
/// (see KAFKA-NOTES: 500 ms made round trips six times slower), and a 16 MiB prefetch.
pub fn consumer_config(bootstrap: &str, group_id: &str, role: ConsumerRole) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "2000")
        .set("fetch.wait.max.ms", "10")
        .set("queued.max.messages.kbytes", "16384")
        .set("queued.min.messages", "1000")
        .set("topic.metadata.refresh.interval.ms", "5000");
    match role {
        ConsumerRole::Stage { queued_max_kbytes } => {
            c.set("enable.auto.offset.store", "false")
                .set("max.poll.interval.ms", "120000")
                .set("queued.max.messages.kbytes", queued_max_kbytes.to_string())
                .set("statistics.interval.ms", "5000");
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

/// The producer defaults: a short linger and lz4, which batch well at medpipe's rates.
pub fn producer_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    c
}

/// Moves every partition the consumer owns back to the group's committed offset (the
/// earliest offset where the group has none), so input read since the last committed
/// transaction is read again. Waits for the group coordinator while it is unreachable.
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
    shutdown: &CancellationToken,
) -> Result<usize, PipelineError> {
    let targets: Vec<(String, i32, Offset)> =
        retry_until(shutdown, "read committed offsets", || {
            let _ = consumer.poll(Duration::ZERO);
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
        })?;
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
                producer.poll(Duration::from_millis(50));
            }
            Err((e, _)) => return Err(PipelineError::kafka("produce", e)),
        }
    }
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
            let c = consumer_config("b:9092", "g", role);
            assert_eq!(
                get(&c, "isolation.level").as_deref(),
                Some("read_committed")
            );
            assert_eq!(get(&c, "enable.auto.commit").as_deref(), Some("false"));
        }
        let stage = consumer_config(
            "b:9092",
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
        let commands = consumer_config("b:9092", "g", ConsumerRole::Commands);
        assert_eq!(
            get(&commands, "max.poll.interval.ms").as_deref(),
            Some("3600000")
        );
    }
}
