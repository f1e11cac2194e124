//! Reads whole topics back with `read_committed`, from the beginning to their current
//! end. Used by the operator CLI, ingestion's start-up scan and the end-to-end tests.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::runtime::Handle;

use crate::codec::Codec;
use crate::error::{kafka_err, PipelineError};
use crate::events::Event;

/// One message read back, with its decoded event when it is one.
#[derive(Debug)]
pub struct Record {
    pub message: OwnedMessage,
    pub event: Option<Event>,
}

/// Reads a keyed (compacted) topic as (key, value) entries in topic order; a `None` value
/// is a tombstone. Messages without a key are skipped: state topics always have one.
pub fn read_entries(
    kafka: &crate::kafka::Connection,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<crate::state::StateEntry>, PipelineError> {
    Ok(read_all(kafka, &[topic.to_string()], None, timeout)?
        .into_iter()
        .filter_map(|r| {
            let key = String::from_utf8_lossy(r.message.key()?).into_owned();
            Some((key, r.message.payload().map(<[u8]>::to_vec)))
        })
        .collect())
}

/// A partition's watermarks. Retriable errors are retried until `deadline`: a topic
/// created a moment ago answers NOT_LEADER_FOR_PARTITION until its leader is elected.
fn watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    deadline: Instant,
) -> Result<(i64, i64), PipelineError> {
    loop {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok(w) => return Ok(w),
            Err(e) => {
                let err = PipelineError::kafka("fetch watermarks", e);
                if err.class() != crate::error::ErrorClass::Retry || Instant::now() >= deadline {
                    return Err(err);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// The throwaway consumer groups of one-off reads are `<this>-<uuid>`; they assign
/// partitions and never commit, so they hold nothing (every stage may use them).
pub const READBACK_GROUP_PREFIX: &str = "medpipe-readback";

/// Reads every committed message of `topics` that exists now. Blocking: call it from a
/// blocking thread when inside a runtime. Topics that do not exist are skipped.
pub fn read_all(
    kafka: &crate::kafka::Connection,
    topics: &[String],
    codec: Option<(&Codec, &Handle)>,
    timeout: Duration,
) -> Result<Vec<Record>, PipelineError> {
    let consumer: BaseConsumer = crate::kafka::readback_config(kafka, READBACK_GROUP_PREFIX)
        .create()
        .map_err(kafka_err("create consumer"))?;
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    let deadline = Instant::now() + timeout;
    for topic in topics {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(kafka_err("fetch metadata"))?;
        for t in md.topics() {
            for p in t.partitions() {
                let (_, high) = watermarks(&consumer, topic, p.id(), deadline)?;
                if high > 0 {
                    tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                        .map_err(kafka_err("assign"))?;
                    ends.insert((topic.clone(), p.id()), high);
                }
            }
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl).map_err(kafka_err("assign"))?;
    let mut idle_since = Instant::now();
    while !ends.is_empty() {
        if Instant::now() > deadline {
            return Err(PipelineError::Timeout(format!(
                "reading back {} partition(s) did not reach their end within {timeout:?}",
                ends.len()
            )));
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                idle_since = Instant::now();
                let m = m.detach();
                let event = match (codec, m.payload()) {
                    (Some((c, rt)), Some(b)) => rt.block_on(c.decode(b)).ok(),
                    _ => None,
                };
                out.push(Record { message: m, event });
            }
            Some(Err(e)) => tracing::warn!(error = %e, "Read-back consumer error."),
            None => {}
        }
        // Positions move past transaction markers and aborted data, so a partition is
        // done once its position reaches the end seen at the start.
        let pos = consumer.position().map_err(kafka_err("position"))?;
        for e in pos.elements() {
            if let Offset::Offset(o) = e.offset() {
                let key = (e.topic().to_string(), e.partition());
                if ends.get(&key).is_some_and(|&end| o >= end) {
                    ends.remove(&key);
                }
            }
        }
        // A commit marker as the very last offset can leave the position one short.
        if idle_since.elapsed() > Duration::from_secs(3) {
            let near: Vec<_> = pos
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                    _ => None,
                })
                .filter(|(k, o)| ends.get(k).is_some_and(|&end| *o + 1 >= end))
                .map(|(k, _)| k)
                .collect();
            for k in near {
                ends.remove(&k);
            }
        }
    }
    Ok(out)
}
