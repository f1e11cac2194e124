//! Broker-level check that read_committed consumers never see aborted output. This holds
//! only on a broker that enforces transactions, which is why it runs on real Kafka.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

fn read(topic: &str, isolation: &str) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", tests::BOOTSTRAP)
        .set("group.id", format!("txn-test-{}", uuid::Uuid::new_v4()))
        .set("isolation.level", isolation)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            out.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
            if out.iter().any(|v| v == "end") {
                break;
            }
        }
    }
    out
}

#[test]
fn read_committed_consumers_never_see_aborted_transactions() {
    let topic = format!("txn-{}", uuid::Uuid::new_v4().simple());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(pipeline::topics::ensure_topics(
        &tests::broker(),
        std::slice::from_ref(&topic),
        &pipeline::topics::TopicLayout::with_partitions(1),
    ))
    .expect("create topic (is the dev stack running? scripts/devstack.sh start)");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", tests::BOOTSTRAP)
        .set(
            "transactional.id",
            format!("txn-test-{}", uuid::Uuid::new_v4()),
        )
        .create()
        .expect("producer");
    let t = Duration::from_secs(30);
    producer.init_transactions(t).expect("init");
    for (values, commit) in [
        (vec!["c1", "c2"], true),
        (vec!["a1", "a2"], false),
        (vec!["c3", "end"], true),
    ] {
        producer.begin_transaction().expect("begin");
        for v in values {
            producer
                .send(BaseRecord::<(), _>::to(&topic).payload(v))
                .map_err(|(e, _)| e)
                .expect("send");
        }
        producer.flush(t).expect("flush");
        if commit {
            producer.commit_transaction(t).expect("commit");
        } else {
            producer.abort_transaction(t).expect("abort");
        }
    }
    assert_eq!(
        read(&topic, "read_committed"),
        vec!["c1", "c2", "c3", "end"]
    );
    // The aborted records really are in the log: read_uncommitted sees them. Without
    // this the test above could pass on a broker that silently dropped them.
    assert_eq!(
        read(&topic, "read_uncommitted"),
        vec!["c1", "c2", "a1", "a2", "c3", "end"]
    );
}
