//! `medpipe bench stages`: each stage measured alone on input that is already there,
//! beside the raw exactly-once passthrough at the same transaction size.
//!
//! On a fresh topic prefix: generated FHIR NDJSON files go into landing with only
//! ingestion running, timed until every file's `DataIngestionFinished` is committed.
//! Then anonymization runs alone over the full ingestion topic, canonization alone over
//! the full anonymization topic, and auditing alone over everything; each is timed from
//! its log's "consuming" line until its consumer group's committed offsets reach the ends
//! of its input topics, polled every 200 ms. Its rate is its input messages (counted
//! with a `read_committed` reader before it starts) over that time. Then
//! `bench passthrough` copies 700-byte messages (as many, at least 500,000) at the same
//! transaction size; the ratio of each stage's rate to the passthrough's is what the
//! stage's own work costs against a copy that does none.
//!
//! A benchmark, not a test: it asserts nothing about time.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use pipeline::config::KafkaArgs;
use pipeline::kafka::{consumer_config, ConsumerRole};
use pipeline::topics::TopicKind;
use pipeline::Codec;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::runtime::Handle;

use crate::bench;
use crate::bench_passthrough::PassthroughResult;
use crate::bench_pipeline::{
    clock_ticks_per_second, fresh, generate, usage, yardstick, GroupLag, RecordKind, Stages,
};

/// `medpipe bench stages`' flags.
#[derive(clap::Args, Debug, Clone)]
pub struct StagesBench {
    /// The broker and registry; the topic prefix is replaced by a fresh one.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Input records in all (Patients and Observations, alternately).
    #[arg(long, default_value_t = 100_000)]
    pub records: usize,
    /// FHIR NDJSON files (one batch each).
    #[arg(long, default_value_t = 4)]
    pub files: usize,
    /// Messages per transaction in the stages (MEDPIPE_BATCH_MAX_MESSAGES) and the
    /// passthrough; default: the stages' own.
    #[arg(long)]
    pub txn_messages: Option<usize>,
    /// Generated files, stage folders and logs go here (removed afterwards, kept when
    /// the run fails).
    #[arg(long, default_value = "/tmp/medpipe-bench")]
    pub work_dir: PathBuf,
    /// Give up after this long.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// One stage's run alone.
#[derive(Debug, Clone)]
pub struct StageRow {
    pub stage: &'static str,
    /// What it consumed: records from files for ingestion, messages otherwise.
    pub input: usize,
    pub seconds: f64,
    pub cpu_seconds: f64,
    pub peak_rss_kib: u64,
}

impl StageRow {
    pub fn per_second(&self) -> f64 {
        self.input as f64 / self.seconds
    }
}

/// What a run measured.
#[derive(Debug)]
pub struct StagesReport {
    pub prefix: String,
    pub records: usize,
    pub files: usize,
    pub partitions: i32,
    pub txn_messages: usize,
    pub rows: Vec<StageRow>,
    pub passthrough: anyhow::Result<PassthroughResult>,
}

/// How long a reader of topics nothing writes to any more waits for another message
/// before it calls the count complete.
const QUIET: Duration = Duration::from_secs(2);

pub async fn run(b: StagesBench) -> anyhow::Result<StagesReport> {
    if b.records == 0 || b.files == 0 || b.files > b.records {
        bail!("--records and --files must be at least 1, and --files at most --records");
    }
    let f = fresh(&b.kafka, "benchstages", b.txn_messages, &b.work_dir).await?;
    let measured = {
        let (b, kafka, dir, rt) = (b.clone(), f.kafka.clone(), f.dir.clone(), Handle::current());
        let (codec, tag) = (f.codec.clone(), f.tag.clone());
        tokio::task::spawn_blocking(move || measure(&b, &kafka, &dir, &codec, &rt, &tag))
            .await
            .context("the benchmark thread failed")?
    };
    let passthrough = match &measured {
        // At least 500,000: a copy of fewer takes under 2 s and varies by a third.
        Ok(_) => yardstick(&f, b.records.clamp(500_000, 1_000_000)).await,
        Err(_) => Err(anyhow!("not run")),
    };
    bench::delete_topics(&f.kafka).await;
    let rows = measured.with_context(|| format!("logs are kept in {}", f.dir.display()))?;
    if let Err(e) = std::fs::remove_dir_all(&f.dir) {
        eprintln!("warning: could not remove {}: {e}", f.dir.display());
    }
    Ok(StagesReport {
        prefix: f.kafka.topic_prefix,
        records: b.records,
        files: b.files,
        partitions: f.kafka.topic_partitions,
        txn_messages: f.txn_messages,
        rows,
        passthrough,
    })
}

/// The four phases, one stage process at a time.
fn measure(
    b: &StagesBench,
    kafka: &KafkaArgs,
    dir: &Path,
    codec: &Codec,
    rt: &Handle,
    tag: &str,
) -> anyhow::Result<Vec<StageRow>> {
    let deadline = Instant::now() + b.timeout;
    let staging = dir.join("staging");
    let ingestion_dir = dir.join("ingestion");
    let landing = ingestion::claims::Folders::under(&ingestion_dir, "0").landing;
    for d in [&staging, &landing] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    eprintln!(
        "Generating {} FHIR NDJSON records in {} files ...",
        b.records, b.files
    );
    let generated = generate(
        &staging,
        b.records,
        b.files,
        &[RecordKind::Patient, RecordKind::Observation],
        tag,
    )?;
    let topics = kafka.topics();
    let ticks = clock_ticks_per_second();
    let start = |stage: &str| {
        let mut s = Stages::start(kafka, dir, &ingestion_dir, b.txn_messages, &[stage])?;
        s.wait_ready(deadline)?;
        anyhow::Ok(s)
    };
    let mut rows = Vec::new();

    // Ingestion: from the move into landing to the last batch's DataIngestionFinished.
    eprintln!("ingestion alone ...");
    let mut stages = start("ingestion")?;
    let pid = stages.procs[0].child.id();
    let before = usage(pid)?;
    let t0 = Instant::now();
    for f in &generated.files {
        let name = f.file_name().context("a generated file has no name")?;
        std::fs::rename(f, landing.join(name))
            .with_context(|| format!("cannot move {} into landing", f.display()))?;
    }
    let ingested = vec![topics.name(TopicKind::Ingestion)];
    let finished = count(
        kafka,
        codec,
        rt,
        &ingested,
        Some(("DataIngestionFinished", b.files)),
        deadline,
        &mut stages,
    )?;
    let t1 = finished.last_at.unwrap_or_else(Instant::now);
    rows.push(row("ingestion", b.records, t0, t1, pid, before, ticks)?);
    stages.stop();

    // Each Kafka-fed stage alone over its full input.
    let audit = topics.name(TopicKind::Audit);
    let phases: [(&'static str, Vec<String>); 3] = [
        ("anonymization", ingested),
        (
            "canonization",
            vec![
                topics.name(TopicKind::Anonymization),
                topics.name(TopicKind::Saga),
            ],
        ),
        (
            "auditing",
            topics.all().into_iter().filter(|t| *t != audit).collect(),
        ),
    ];
    for (stage, inputs) in phases {
        let mut idle = Stages { procs: Vec::new() };
        let input = count(kafka, codec, rt, &inputs, None, deadline, &mut idle)?.total;
        eprintln!("{stage} alone, over {input} input messages ...");
        let mut stages = start(stage)?;
        let pid = stages.procs[0].child.id();
        let before = usage(pid)?;
        let t0 = Instant::now();
        let lag = GroupLag::new(kafka, stage, &inputs)?;
        while lag.lag()? > 0 {
            stages.check_alive()?;
            if Instant::now() > deadline {
                bail!("timed out waiting for {stage} to consume its input");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        rows.push(row(stage, input, t0, Instant::now(), pid, before, ticks)?);
        stages.stop();
    }
    Ok(rows)
}

fn row(
    stage: &'static str,
    input: usize,
    t0: Instant,
    t1: Instant,
    pid: u32,
    before: crate::bench_pipeline::Usage,
    ticks: f64,
) -> anyhow::Result<StageRow> {
    let after = usage(pid)?;
    Ok(StageRow {
        stage,
        input,
        seconds: (t1 - t0).as_secs_f64(),
        cpu_seconds: after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / ticks,
        peak_rss_kib: bench::peak_rss_kib(pid)?.max(after.rss_kib),
    })
}

/// What a reader counted.
struct Counted {
    total: usize,
    /// When the message that met `until` was read.
    last_at: Option<Instant>,
}

/// Counts the committed messages of `topics` from their beginnings: until `until`'s event
/// type has been seen that many times, or, without `until`, until nothing more arrives
/// for `QUIET` (the topics are complete: no stage writes to them any more).
fn count(
    kafka: &KafkaArgs,
    codec: &Codec,
    rt: &Handle,
    topics: &[String],
    until: Option<(&str, usize)>,
    deadline: Instant,
    stages: &mut Stages,
) -> anyhow::Result<Counted> {
    let consumer: BaseConsumer = consumer_config(
        &kafka.connection()?,
        &format!("{}-bench-counter", kafka.topic_prefix),
        ConsumerRole::Readback,
    )
    .set("statistics.interval.ms", "0")
    .create()
    .context("cannot create the benchmark's counter")?;
    let mut tpl = TopicPartitionList::new();
    for name in topics {
        let md = consumer
            .fetch_metadata(Some(name), Duration::from_secs(10))
            .with_context(|| format!("cannot read the metadata of {name}"))?;
        for p in md.topics().iter().flat_map(|t| t.partitions()) {
            tpl.add_partition_offset(name, p.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl).context("cannot assign the counter")?;
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    let mut total = 0;
    let mut last_message = Instant::now();
    loop {
        if Instant::now() > deadline {
            bail!("timed out counting {}", topics.join(", "));
        }
        stages.check_alive()?;
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let at = Instant::now();
                last_message = at;
                total += 1;
                let Some((wanted, n)) = until else {
                    continue;
                };
                let Some(bytes) = m.payload() else {
                    continue;
                };
                let event = rt.block_on(codec.decode(bytes)).with_context(|| {
                    format!(
                        "cannot decode {} [{}] at {}",
                        m.topic(),
                        m.partition(),
                        m.offset()
                    )
                })?;
                let seen = by_type.entry(event.event_type().to_string()).or_default();
                *seen += 1;
                if event.event_type() == wanted && *seen >= n {
                    return Ok(Counted {
                        total,
                        last_at: Some(at),
                    });
                }
            }
            Some(Err(e)) => eprintln!("warning: the benchmark's counter: {e}; continuing"),
            None if until.is_none() && last_message.elapsed() >= QUIET => {
                return Ok(Counted {
                    total,
                    last_at: None,
                });
            }
            None => {}
        }
    }
}

impl StagesReport {
    pub fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(out, "## medpipe bench stages ({})\n", self.prefix)?;
        writeln!(
            out,
            "{} FHIR NDJSON records (Patients and Observations) in {} files, {} partitions per \
             topic, up to {} input messages per transaction. Each stage ran alone over input \
             already on the broker (ingestion over the files), timed from its \"consuming\" log \
             line until its committed offsets reached the ends of its inputs (polled every \
             200 ms).\n",
            self.records, self.files, self.partitions, self.txn_messages
        )?;
        let pass = self.passthrough.as_ref().map(PassthroughResult::per_second);
        writeln!(
            out,
            "| stage | input | seconds | input/s | CPU s | peak RSS MB | of the passthrough |\n|---|---|---|---|---|---|---|"
        )?;
        for r in &self.rows {
            let ratio = match &pass {
                Ok(p) => format!("{:.0}%", r.per_second() / p * 100.0),
                Err(_) => "–".into(),
            };
            writeln!(
                out,
                "| {} | {} {} | {:.2} | {:.0} | {:.1} | {:.0} | {ratio} |",
                r.stage,
                r.input,
                if r.stage == "ingestion" {
                    "records"
                } else {
                    "messages"
                },
                r.seconds,
                r.per_second(),
                r.cpu_seconds,
                r.peak_rss_kib as f64 / 1024.0,
            )?;
        }
        match &self.passthrough {
            Ok(p) => writeln!(
                out,
                "\nPassthrough (`medpipe bench passthrough`, 700-byte messages, the same \
                 transaction size): {} messages in {:.2} s = {:.0} messages/s, {} transactions.",
                p.messages,
                p.seconds,
                p.per_second(),
                p.transactions
            )?,
            Err(e) => writeln!(out, "\nThe passthrough did not run: {e:#}")?,
        }
        Ok(())
    }
}
