//! `medpipe bench passthrough`: the yardstick for every stage. A plain rdkafka program
//! copies messages from one topic to another exactly once (consume `read_committed`,
//! produce, `send_offsets_to_transaction`, commit), with medpipe's own client settings
//! and no work per message. A stage's throughput at the same transaction size is
//! compared against it: the gap is the stage's own work.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use pipeline::kafka::{consumer_config, producer_config, send_record, ConsumerRole};
use pipeline::topics::{ensure_topics, TopicLayout};

/// What to copy, and how big each transaction is.
#[derive(Debug, Clone)]
pub struct PassthroughBench {
    pub bootstrap: pipeline::kafka::Connection,
    pub messages: usize,
    pub size: usize,
    pub partitions: i32,
    /// A transaction ends after this many messages ...
    pub txn_messages: usize,
    /// ... or after it has been collecting this long.
    pub txn_wait: Duration,
    /// librdkafka `debug` contexts for the transactional producer (stderr).
    pub debug: Option<String>,
    /// Extra librdkafka settings for the transactional producer.
    pub producer_set: Vec<(String, String)>,
    /// Commit without serving delivery reports first, as a plain rdkafka program does
    /// (each commit then waits out rdkafka's 100 ms flush poll).
    pub naive_flush: bool,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct PassthroughResult {
    pub messages: usize,
    pub seconds: f64,
    pub transactions: usize,
    /// Mean milliseconds per transaction of each phase.
    pub phases: BTreeMap<&'static str, f64>,
}

impl PassthroughResult {
    pub fn per_second(&self) -> f64 {
        self.messages as f64 / self.seconds
    }
}

/// Creates two fresh topics, fills the first, copies it to the second, deletes both.
pub async fn run(b: PassthroughBench) -> anyhow::Result<PassthroughResult> {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let input = format!("benchpass{tag}.in");
    let output = format!("benchpass{tag}.out");
    ensure_topics(
        &b.bootstrap,
        &[input.clone(), output.clone()],
        &TopicLayout::with_partitions(b.partitions),
    )
    .await?;
    let result = {
        let (b, input, output) = (b.clone(), input.clone(), output.clone());
        tokio::task::spawn_blocking(move || {
            fill(&b, &input)?;
            copy(&b, &input, &output, &tag)
        })
        .await?
    };
    delete(&b.bootstrap, &[&input, &output]).await;
    result
}

fn fill(b: &PassthroughBench, topic: &str) -> anyhow::Result<()> {
    let producer: BaseProducer = producer_config(&b.bootstrap)
        .set("enable.idempotence", "true")
        .create()?;
    let payload = vec![b'x'; b.size];
    for i in 0..b.messages {
        let key = i.to_string();
        send_record(
            &producer,
            BaseRecord::to(topic).key(key.as_bytes()).payload(&payload),
        )?;
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(())
}

fn copy(
    b: &PassthroughBench,
    input: &str,
    output: &str,
    tag: &str,
) -> anyhow::Result<PassthroughResult> {
    let consumer: BaseConsumer = consumer_config(
        &b.bootstrap,
        &format!("benchpass{tag}"),
        ConsumerRole::Stage {
            queued_max_kbytes: 65536,
        },
    )
    .set("statistics.interval.ms", "0")
    .create()?;
    consumer.subscribe(&[input])?;
    let mut config = pipeline::txn::transactional_config(
        &b.bootstrap,
        &format!("benchpass{tag}"),
        Duration::from_secs(60),
    );
    if let Some(d) = &b.debug {
        config.set("debug", d);
    }
    for (k, v) in &b.producer_set {
        config.set(k, v);
    }
    let producer: BaseProducer = config.create()?;
    producer.init_transactions(Duration::from_secs(30))?;

    let mut copied = 0usize;
    let mut transactions = 0usize;
    let mut phases: BTreeMap<&'static str, Duration> = BTreeMap::new();
    let mut started: Option<Instant> = None;
    let idle_limit = Duration::from_secs(60);
    let mut last_progress = Instant::now();
    while copied < b.messages {
        if last_progress.elapsed() > idle_limit {
            bail!("no progress for {idle_limit:?} after {copied} messages");
        }
        let t0 = Instant::now();
        let mut batch = Vec::with_capacity(b.txn_messages);
        let deadline = t0 + b.txn_wait;
        while batch.len() < b.txn_messages {
            let now = Instant::now();
            if now >= deadline && !batch.is_empty() {
                break;
            }
            match consumer.poll(
                deadline
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(10)),
            ) {
                Some(Ok(m)) => batch.push(m.detach()),
                Some(Err(e)) => bail!("consume: {e}"),
                None if !batch.is_empty() => break,
                None => {}
            }
        }
        if batch.is_empty() {
            continue;
        }
        started.get_or_insert(t0);
        last_progress = Instant::now();
        let t1 = Instant::now();
        producer.begin_transaction()?;
        for m in &batch {
            // The stages' own send: a full queue is waited out by serving reports.
            send_record(
                &producer,
                BaseRecord::to(output)
                    .key(m.key().unwrap_or_default())
                    .payload(m.payload().unwrap_or_default()),
            )?;
        }
        let t2 = Instant::now();
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        for m in &batch {
            let e = next.entry(m.partition()).or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in next {
            tpl.add_partition_offset(input, p, Offset::Offset(o))?;
        }
        let group = consumer.group_metadata().context("no group metadata")?;
        producer.send_offsets_to_transaction(&tpl, &group, Duration::from_secs(30))?;
        let t3 = Instant::now();
        if !b.naive_flush {
            pipeline::kafka::drain_deliveries(&producer, Duration::from_secs(30));
        }
        producer.commit_transaction(Duration::from_secs(30))?;
        let t4 = Instant::now();
        *phases.entry("collect").or_default() += t1 - t0;
        *phases.entry("produce").or_default() += t2 - t1;
        *phases.entry("send_offsets").or_default() += t3 - t2;
        *phases.entry("commit").or_default() += t4 - t3;
        transactions += 1;
        copied += batch.len();
    }
    let seconds = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    Ok(PassthroughResult {
        messages: copied,
        seconds,
        transactions,
        phases: phases
            .into_iter()
            .map(|(k, d)| (k, d.as_secs_f64() * 1e3 / transactions.max(1) as f64))
            .collect(),
    })
}

async fn delete(bootstrap: &pipeline::kafka::Connection, topics: &[&str]) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: Result<AdminClient<rdkafka::client::DefaultClientContext>, _> =
        pipeline::kafka::admin_config(bootstrap).create();
    if let Ok(admin) = admin {
        if let Err(e) = admin.delete_topics(topics, &AdminOptions::new()).await {
            eprintln!("warning: could not delete the benchmark topics: {e}");
        }
    }
}
