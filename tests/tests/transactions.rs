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

/// How a message of a transaction fails delivery in [`failed_delivery_scenario`].
enum Poison {
    /// Larger than the topic's `max.message.bytes`: the broker refuses the produce, an
    /// abortable error.
    TooLarge,
    /// To a topic that does not exist (the dev broker does not auto-create): the message
    /// times out, and librdkafka refuses the commit with "1 message(s) failed delivery"
    /// (`_INCONSISTENT`), the error seen in the game day.
    TimedOut,
}

/// A transaction whose messages failed delivery cannot commit. After a broker stall in a
/// game day, aborting and producing again on the same producer failed that way every
/// transaction timeout, forever. `Transactions::recover` must therefore replace the
/// producer, and the work redone on the new producer must commit, with nothing of the
/// failed transaction visible to `read_committed`.
fn failed_delivery_scenario(poison: Poison, expected_error: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;

    let topic = format!("txn-dr-{}", uuid::Uuid::new_v4().simple());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", tests::BOOTSTRAP)
        .create()
        .expect("admin");
    let created = rt
        .block_on(
            admin.create_topics(
                &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))
                    .set("max.message.bytes", "2000")],
                &AdminOptions::new(),
            ),
        )
        .expect("create topic (is the dev stack running? scripts/devstack.sh start)");
    assert!(created.iter().all(Result::is_ok), "{created:?}");

    let metrics = pipeline::telemetry::StageMetrics::new("txntest").expect("metrics");
    let shutdown = tokio_util::sync::CancellationToken::new();
    // Short, so that a message to a missing topic times out quickly (librdkafka caps
    // `message.timeout.ms` at the transaction timeout).
    let settings = pipeline::txn::TxnSettings::new(
        &tests::broker(),
        &format!("txn-dr-{}", uuid::Uuid::new_v4()),
        Duration::from_secs(5),
    );
    let mut txn =
        pipeline::txn::Transactions::connect(settings, metrics.clone(), &shutdown).expect("init");

    txn.send(BaseRecord::<(), _>::to(&topic).payload("lost-with-the-abort"))
        .expect("send");
    // Random, so that compression cannot bring it under the limit.
    let too_big: String = (0..300)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    let missing = format!("txn-missing-{}", uuid::Uuid::new_v4().simple());
    let poisoned = match poison {
        Poison::TooLarge => BaseRecord::<(), _>::to(&topic).payload(too_big.as_str()),
        Poison::TimedOut => BaseRecord::<(), _>::to(&missing).payload("never-delivered"),
    };
    txn.send(poisoned).expect("send is accepted locally");
    let err = txn
        .commit(None)
        .expect_err("a failed delivery must fail the commit");
    assert!(
        err.to_string().contains(expected_error),
        "unexpected commit error: {err}"
    );
    assert_eq!(metrics.producers_replaced.get(), 0);
    txn.recover(&shutdown).expect("recover");
    assert_eq!(
        metrics.producers_replaced.get(),
        1,
        "the producer whose messages failed delivery must be replaced"
    );
    assert!(!txn.is_open());

    for v in ["redone", "end"] {
        txn.send(BaseRecord::<(), _>::to(&topic).payload(v))
            .expect("send on the new producer");
    }
    txn.commit(None)
        .expect("the redo commits on the new producer");
    assert_eq!(metrics.transactions_committed.get(), 1);
    assert_eq!(read(&topic, "read_committed"), vec!["redone", "end"]);
}

#[test]
fn a_transaction_with_a_message_the_broker_refused_gets_a_new_producer_and_the_redo_commits() {
    failed_delivery_scenario(Poison::TooLarge, "Message size too large");
}

#[test]
fn a_transaction_with_a_message_that_timed_out_gets_a_new_producer_and_the_redo_commits() {
    failed_delivery_scenario(Poison::TimedOut, "failed delivery");
}
