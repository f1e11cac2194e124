//! `medpipe bench pipeline`: the whole pipeline end to end on the real broker, with the
//! four release stage binaries running as processes on a fresh topic prefix.
//!
//! What it measures:
//! - **Throughput.** K generated FHIR NDJSON files (Patients and Observations, synthetic)
//!   are moved into ingestion's landing folder at once. The clock runs from the move until
//!   a `read_committed` reader has seen every input record's canonical record. A FHIR
//!   Patient or Observation maps to exactly one canonical resource (`map_record` in
//!   canonization), so N records mean N canonical records, counted once each by their
//!   provenance (batch, position).
//! - **Each process's cost** over that window: CPU seconds (utime + stime from
//!   `/proc/<pid>/stat`, sampled every 500 ms, with the busiest 500 ms), resident memory
//!   when 10% of the records were through and at the end, and the peak (`VmHWM`) over the
//!   whole run. The reader itself (this process) is listed too: it decodes every
//!   canonical record on the same cores.
//! - **Auditing's catch-up** afterwards: when its committed offsets reach the ends of the
//!   audited topics (a hint, as in the end-to-end tests; the store is the truth).
//! - **Latency.** One-record Patient files dropped one at a time into the idle pipeline,
//!   each timed from its move into landing until its canonical record is readable.
//! - **The yardstick.** `bench passthrough` at the stages' transaction size, for the ratio
//!   of end-to-end records/s to a raw exactly-once copy's messages/s.
//!
//! A benchmark, not a test: it asserts nothing about time. The stages get a clean
//! `MEDPIPE_*` environment (only what is set here), so a stray variable in the operator's
//! shell cannot change what is measured.

use std::collections::{HashMap, HashSet};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use ingestion::synthetic::{observation_resource, patient_resource, Person};
use pipeline::config::KafkaArgs;
use pipeline::events::Payload;
use pipeline::kafka::{consumer_config, ConsumerRole};
use pipeline::topics::{TopicKind, DLQ_STAGES};
use pipeline::{Codec, Topics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::runtime::Handle;

use crate::bench::{self, BENCH_KEY};
use crate::bench_passthrough::{self, PassthroughBench, PassthroughResult};

/// The kinds of FHIR record the generated files hold.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Patient,
    Observation,
}

/// What to run: `medpipe bench pipeline`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct PipelineBench {
    /// The broker and registry; the topic prefix is replaced by a fresh one.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Input records in all, split evenly over the files.
    #[arg(long, default_value_t = 100_000)]
    pub records: usize,
    /// FHIR NDJSON files (one batch each), moved into landing together.
    #[arg(long, default_value_t = 4)]
    pub files: usize,
    /// Record types, cycled through in each file; must start with patient (each
    /// Observation refers to the Patient before it).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "patient,observation"
    )]
    pub mix: Vec<RecordKind>,
    /// Messages per transaction in the stages (MEDPIPE_BATCH_MAX_MESSAGES); default:
    /// the stages' own. The yardstick runs at the same size.
    #[arg(long)]
    pub txn_messages: Option<usize>,
    /// One-record Patient files dropped one at a time, for the latency figures.
    #[arg(long, default_value_t = 20)]
    pub latency_files: usize,
    /// Generated files, stage folders and logs go here (removed afterwards, kept when
    /// the run fails).
    #[arg(long, default_value = "/tmp/medpipe-bench")]
    pub work_dir: PathBuf,
    /// Leave the benchmark's topics on the broker.
    #[arg(long)]
    pub keep_topics: bool,
    /// Give up (stopping the stages and keeping their logs) after this long.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

impl PipelineBench {
    fn validate(&self) -> anyhow::Result<()> {
        if self.records == 0 || self.files == 0 {
            bail!("--records and --files must be at least 1");
        }
        if self.files > self.records {
            bail!(
                "--files ({}) must not exceed --records ({}): a file needs a record",
                self.files,
                self.records
            );
        }
        if self.mix.first() != Some(&RecordKind::Patient) {
            bail!("--mix must start with patient: each Observation refers to the Patient before it in its file");
        }
        if self.txn_messages == Some(0) {
            bail!("--txn-messages must be at least 1");
        }
        Ok(())
    }
}

/// Every stage, in pipeline order.
pub(crate) const ALL_STAGES: [&str; 4] = ["ingestion", "anonymization", "canonization", "auditing"];

/// The stages, in pipeline order, with the log line that says each is consuming.
const STAGES: [(&str, &str); 4] = [
    ("ingestion", "Ingestion started."),
    ("anonymization", "Partitions assigned."),
    ("canonization", "Partitions assigned."),
    ("auditing", "Auditing started."),
];

/// How often each process's CPU and memory are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// How long the throughput phase waits for missing canonical records once canonization
/// has closed every batch, before it calls them lost.
const CLOSED_GRACE: Duration = Duration::from_secs(10);

/// Auditing's catch-up is abandoned when its lag has not fallen for this long.
const AUDIT_STALL: Duration = Duration::from_secs(30);

/// What one run measured.
#[derive(Debug)]
pub struct PipelineReport {
    pub prefix: String,
    pub records: usize,
    pub patients: usize,
    pub observations: usize,
    pub files: usize,
    pub partitions: i32,
    /// Messages per transaction in the runner stages, and whether `--txn-messages` set it.
    pub txn_messages: usize,
    pub txn_from_flag: bool,
    /// From the move into landing to the last canonical record.
    pub seconds: f64,
    /// Canonical messages read in the throughput phase (more than `records` if any was
    /// seen twice).
    pub canonical_messages: usize,
    pub processes: Vec<ProcessRow>,
    pub audit: AuditWait,
    pub latency_ms: Vec<f64>,
    pub passthrough: anyhow::Result<PassthroughResult>,
}

/// One process's cost over the throughput window.
#[derive(Debug, Clone)]
pub struct ProcessRow {
    pub name: String,
    pub cpu_seconds: f64,
    /// The highest share of one core it used over any 500 ms sample, in percent.
    pub peak_core_percent: f64,
    pub rss_tenth_kib: u64,
    pub rss_end_kib: u64,
    pub peak_rss_kib: u64,
}

/// How auditing's catch-up after the throughput phase ended.
#[derive(Debug, Clone, Copy)]
pub enum AuditWait {
    /// Its committed offsets reached the ends this long after the last canonical record.
    CaughtUp { seconds: f64 },
    /// The lag stopped falling at this many messages.
    Stalled { lag: i64 },
}

/// What a benchmark on a fresh topic prefix starts from.
pub(crate) struct Fresh {
    /// The stages' transaction size (`--txn-messages`, else the runner's default) and
    /// collecting time (the runner's default): the yardstick runs with them too.
    pub(crate) txn_messages: usize,
    pub(crate) txn_wait: Duration,
    /// The broker and registry, on the fresh prefix `<word><tag>`.
    pub(crate) kafka: KafkaArgs,
    pub(crate) tag: String,
    pub(crate) codec: Arc<Codec>,
    /// `<work dir>/<prefix>`: files, stage folders and logs.
    pub(crate) dir: PathBuf,
}

/// Registers the schemas and creates the topics of a fresh prefix `<word><tag>`.
pub(crate) async fn fresh(
    kafka: &KafkaArgs,
    word: &str,
    txn_messages: Option<usize>,
    work_dir: &Path,
) -> anyhow::Result<Fresh> {
    let txn_messages = match txn_messages {
        Some(0) => bail!("--txn-messages must be at least 1"),
        Some(n) => n,
        None => runner_default("batch_max_messages")?
            .parse()
            .context("the runner's default batch_max_messages is not a number")?,
    };
    let txn_wait = humantime::parse_duration(&runner_default("batch_max_wait")?)
        .context("the runner's default batch_max_wait is not a duration")?;
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let mut kafka = kafka.clone();
    kafka.topic_prefix = format!("{word}{tag}");
    let codec = pipeline::stage::prepare(&kafka, Duration::from_secs(30))
        .await
        .context("cannot register the schemas and create the benchmark topics")?;
    let dir = work_dir.join(&kafka.topic_prefix);
    Ok(Fresh {
        txn_messages,
        txn_wait,
        kafka,
        tag,
        codec,
        dir,
    })
}

/// The passthrough yardstick: `messages` 700-byte messages copied exactly once at the
/// stages' transaction size, on topics of its own.
pub(crate) async fn yardstick(f: &Fresh, messages: usize) -> anyhow::Result<PassthroughResult> {
    eprintln!(
        "Running the passthrough yardstick ({} messages per transaction) ...",
        f.txn_messages
    );
    bench_passthrough::run(PassthroughBench {
        bootstrap: f.kafka.connection()?,
        messages,
        size: 700,
        partitions: f.kafka.topic_partitions,
        txn_messages: f.txn_messages,
        txn_wait: f.txn_wait,
        debug: None,
        producer_set: Vec::new(),
        naive_flush: false,
    })
    .await
}

/// Runs the benchmark: topics, files, stages, the three measurements, the yardstick,
/// clean-up. The work directory (with the stages' logs) is kept when a measurement fails.
pub async fn run(b: PipelineBench) -> anyhow::Result<PipelineReport> {
    b.validate()?;
    let f = fresh(&b.kafka, "benchpipe", b.txn_messages, &b.work_dir).await?;
    let measured = {
        let (b, kafka, dir, rt) = (b.clone(), f.kafka.clone(), f.dir.clone(), Handle::current());
        let (codec, tag) = (f.codec.clone(), f.tag.clone());
        tokio::task::spawn_blocking(move || measure(&b, &kafka, &dir, codec, rt, &tag))
            .await
            .context("the benchmark thread failed")?
    };
    let passthrough = match &measured {
        Ok(_) => yardstick(&f, b.records.min(1_000_000)).await,
        Err(_) => Err(anyhow!("not run")),
    };
    if !b.keep_topics {
        bench::delete_topics(&f.kafka).await;
    }
    let m = measured.with_context(|| format!("logs are kept in {}", f.dir.display()))?;
    if let Err(e) = std::fs::remove_dir_all(&f.dir) {
        eprintln!("warning: could not remove {}: {e}", f.dir.display());
    }
    Ok(PipelineReport {
        prefix: f.kafka.topic_prefix,
        records: b.records,
        patients: m.generated.patients,
        observations: m.generated.observations,
        files: b.files,
        partitions: f.kafka.topic_partitions,
        txn_messages: f.txn_messages,
        txn_from_flag: b.txn_messages.is_some(),
        seconds: m.seconds,
        canonical_messages: m.canonical_messages,
        processes: m.processes,
        audit: m.audit,
        latency_ms: m.latency_ms,
        passthrough,
    })
}

/// A default of the stage runner's flags (`pipeline::config::RunnerArgs`): what a stage
/// runs with when its environment does not set the flag.
fn runner_default(id: &str) -> anyhow::Result<String> {
    use clap::Args as _;
    let cmd = pipeline::config::RunnerArgs::augment_args(clap::Command::new("runner"));
    let value = cmd
        .get_arguments()
        .find(|a| a.get_id().as_str() == id)
        .and_then(|a| a.get_default_values().first())
        .and_then(|v| v.to_str())
        .map(str::to_owned);
    value.with_context(|| format!("the stage runner has no default for {id}"))
}

/// What the blocking part measured.
struct Measured {
    generated: Generated,
    seconds: f64,
    canonical_messages: usize,
    processes: Vec<ProcessRow>,
    audit: AuditWait,
    latency_ms: Vec<f64>,
}

/// Generates the files, starts the reader and the stages, measures, stops the stages.
fn measure(
    b: &PipelineBench,
    kafka: &KafkaArgs,
    dir: &Path,
    codec: Arc<Codec>,
    rt: Handle,
    tag: &str,
) -> anyhow::Result<Measured> {
    let staging = dir.join("staging");
    let ingestion_dir = dir.join("ingestion");
    // Instance "0" is the stage's default; landing is shared by every instance anyway.
    let landing = ingestion::claims::Folders::under(&ingestion_dir, "0").landing;
    for d in [&staging, &landing] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    eprintln!(
        "Generating {} FHIR NDJSON records in {} files under {} ...",
        b.records,
        b.files,
        staging.display()
    );
    let input = Input {
        generated: generate(&staging, b.records, b.files, &b.mix, tag)?,
        staging,
        landing,
        tag,
    };
    let reader = Reader::start(kafka, codec, rt)?;
    let mut stages = Stages::start(kafka, dir, &ingestion_dir, b.txn_messages, &ALL_STAGES)?;
    let result = drive(b, kafka, &mut stages, &reader, input);
    stages.stop();
    result
}

/// The generated files, and the folders files go through.
struct Input<'a> {
    generated: Generated,
    staging: PathBuf,
    landing: PathBuf,
    /// Names this run's synthetic people.
    tag: &'a str,
}

/// The measurements proper, with the stages running and the reader reading.
fn drive(
    b: &PipelineBench,
    kafka: &KafkaArgs,
    stages: &mut Stages,
    reader: &Reader,
    input: Input<'_>,
) -> anyhow::Result<Measured> {
    let Input {
        generated,
        staging,
        landing,
        tag,
    } = input;
    let deadline = Instant::now() + b.timeout;
    stages.wait_ready(deadline)?;
    let mut names: Vec<String> = stages
        .procs
        .iter()
        .map(|p| format!("medpipe-{}", p.name))
        .collect();
    names.push("medpipe (this reader)".into());
    let mut pids: Vec<u32> = stages.procs.iter().map(|p| p.child.id()).collect();
    pids.push(std::process::id());
    let mut watch = Watch {
        stages,
        reader,
        deadline,
        timeout: b.timeout,
        next_tick: Instant::now(),
        last: (Instant::now(), Vec::new()),
        peak: None,
        pids,
        ticks_per_second: clock_ticks_per_second(),
    };

    eprintln!(
        "Stages ready; moving {} files into {} ...",
        b.files,
        landing.display()
    );
    let t = throughput(&mut watch, b.records, &generated.files, &landing)?;
    eprintln!("Waiting for auditing to catch up ...");
    let audit = wait_for_audit(&mut watch, &GroupLag::auditing(kafka)?, t.end)?;
    if b.latency_files > 0 {
        eprintln!(
            "Dropping {} one-record files, one at a time ...",
            b.latency_files
        );
    }
    // New people after the throughput files' own, so every file's content is new.
    let people = (generated.people..).map(|i| Person::new(i, tag));
    let latency_ms = people
        .take(b.latency_files)
        .enumerate()
        .map(|(i, person)| latency(&mut watch, i, &person, &staging, &landing))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let processes = names
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let of = |s: &[Usage]| s.get(i).copied().unwrap_or_default();
            Ok(ProcessRow {
                name,
                cpu_seconds: of(&t.after)
                    .cpu_ticks
                    .saturating_sub(of(&t.before).cpu_ticks) as f64
                    / watch.ticks_per_second,
                peak_core_percent: t.peak.get(i).copied().unwrap_or_default(),
                rss_tenth_kib: of(&t.rss_tenth).rss_kib,
                rss_end_kib: of(&t.after).rss_kib,
                // The kernel updates VmHWM lazily: a sample of VmRSS can be above it.
                peak_rss_kib: bench::peak_rss_kib(watch.pids[i])?
                    .max(of(&t.rss_tenth).rss_kib)
                    .max(of(&t.after).rss_kib),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Measured {
        generated,
        seconds: (t.end - t.start).as_secs_f64(),
        canonical_messages: t.messages,
        processes,
        audit,
        latency_ms,
    })
}

/// What the throughput phase measured.
struct Throughput {
    /// When the files were moved into landing, and when the last canonical record was read.
    start: Instant,
    end: Instant,
    /// Canonical messages read (more than the records if any was read twice).
    messages: usize,
    /// Every process's usage at the start, at 10% of the records, and at the end.
    before: Vec<Usage>,
    rss_tenth: Vec<Usage>,
    after: Vec<Usage>,
    /// The highest share of a core (percent) each process used between two samples.
    peak: Vec<f64>,
}

/// Moves every file into landing at once and reads until each of the `records` input
/// records has its canonical record and every batch has closed.
fn throughput(
    watch: &mut Watch<'_>,
    records: usize,
    files: &[PathBuf],
    landing: &Path,
) -> anyhow::Result<Throughput> {
    let before = watch.sample()?;
    watch.last = (Instant::now(), before.clone());
    watch.peak = Some(vec![0.0; before.len()]);
    let start = Instant::now();
    for f in files {
        let name = f.file_name().context("a generated file has no name")?;
        std::fs::rename(f, landing.join(name))
            .with_context(|| format!("cannot move {} into landing", f.display()))?;
    }
    let mut tally = Tally::new(records);
    let mut closed: HashSet<String> = HashSet::new();
    let mut all_closed_at: Option<Instant> = None;
    let mut rss_tenth = None;
    let mut end = start;
    while tally.distinct < records {
        match watch.next("every canonical record")? {
            Some(Seen::Canonical {
                batch,
                position,
                at,
            }) => {
                if tally.add(&batch, position)? {
                    end = at;
                }
                if rss_tenth.is_none() && tally.distinct * 10 >= records {
                    rss_tenth = Some(watch.sample()?);
                }
            }
            Some(Seen::Closed { batch }) => {
                closed.insert(batch);
                if closed.len() >= files.len() {
                    all_closed_at.get_or_insert_with(Instant::now);
                }
            }
            None => {}
        }
        if all_closed_at.is_some_and(|t| t.elapsed() > CLOSED_GRACE) {
            bail!(
                "canonization closed all {} batches, but only {} of {records} records have a canonical record",
                files.len(),
                tally.distinct,
            );
        }
    }
    let after = watch.sample()?;
    let peak = watch.peak.take().unwrap_or_default();
    eprintln!(
        "{records} canonical records in {:.2} s; waiting for every batch to close ...",
        (end - start).as_secs_f64()
    );
    while closed.len() < files.len() {
        if let Some(Seen::Closed { batch }) = watch.next("every batch to close")? {
            closed.insert(batch);
        }
    }
    Ok(Throughput {
        start,
        end,
        messages: tally.messages,
        rss_tenth: rss_tenth.unwrap_or_else(|| after.clone()),
        before,
        after,
        peak,
    })
}

/// Drops a one-record file of `person`'s Patient into the idle pipeline and returns the
/// milliseconds from its move into landing until its canonical record was read. Returns
/// once its batch has closed too, so the pipeline is idle again for the next file.
fn latency(
    watch: &mut Watch<'_>,
    i: usize,
    person: &Person,
    staging: &Path,
    landing: &Path,
) -> anyhow::Result<f64> {
    let mut bytes = serde_json::to_vec(&patient_resource(person))?;
    bytes.push(b'\n');
    let batch = ingestion::batch_id_for(&pipeline::crypto::sha256_hex(&bytes));
    let name = format!("latency-{i:04}.ndjson");
    let staged = staging.join(&name);
    std::fs::write(&staged, &bytes)
        .with_context(|| format!("cannot write {}", staged.display()))?;
    let dropped = Instant::now();
    std::fs::rename(&staged, landing.join(&name))
        .with_context(|| format!("cannot move {} into landing", staged.display()))?;
    let (mut seen_at, mut closed): (Option<Instant>, bool) = (None, false);
    loop {
        match (seen_at, closed) {
            (Some(at), true) => {
                return Ok(at.saturating_duration_since(dropped).as_secs_f64() * 1e3);
            }
            _ => match watch.next("a latency file's canonical record")? {
                Some(Seen::Canonical { batch: of, at, .. }) if of == batch => seen_at = Some(at),
                Some(Seen::Closed { batch: of }) if of == batch => closed = true,
                _ => {}
            },
        }
    }
}

/// Waits until auditing's committed offsets reach the ends of the audited topics, or
/// until its lag stops falling.
fn wait_for_audit(
    watch: &mut Watch<'_>,
    lag: &GroupLag,
    last_canonical: Instant,
) -> anyhow::Result<AuditWait> {
    let (mut best, mut best_at) = (i64::MAX, Instant::now());
    loop {
        let now = lag.lag()?;
        if now == 0 {
            return Ok(AuditWait::CaughtUp {
                seconds: last_canonical.elapsed().as_secs_f64(),
            });
        }
        if now < best {
            (best, best_at) = (now, Instant::now());
        } else if best_at.elapsed() > AUDIT_STALL {
            return Ok(AuditWait::Stalled { lag: now });
        }
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            watch.next("auditing to catch up")?;
        }
    }
}

/// The generated input, in the staging folder.
#[derive(Debug, Default)]
pub(crate) struct Generated {
    pub(crate) files: Vec<PathBuf>,
    pub(crate) patients: usize,
    pub(crate) observations: usize,
    /// People invented so far (`Person::new(0..people, tag)`).
    pub(crate) people: usize,
}

/// Writes `records` records as `files` NDJSON files, split evenly.
pub(crate) fn generate(
    staging: &Path,
    records: usize,
    files: usize,
    mix: &[RecordKind],
    tag: &str,
) -> anyhow::Result<Generated> {
    let mut g = Generated::default();
    let mut first_record = 0;
    for (i, count) in split(records, files).into_iter().enumerate() {
        let path = staging.join(format!("export-{i:04}.ndjson"));
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write_ndjson(&mut w, mix, count, first_record, tag, &mut g)
            .and_then(|()| w.flush())
            .with_context(|| format!("cannot write {}", path.display()))?;
        first_record += count;
        g.files.push(path);
    }
    Ok(g)
}

/// How `records` split over `files`: as evenly as possible, the first files one larger.
fn split(records: usize, files: usize) -> Vec<usize> {
    (0..files)
        .map(|i| records / files + usize::from(i < records % files))
        .collect()
}

/// Writes `count` FHIR NDJSON records, cycling through `mix`. Each Patient is a new
/// person; each Observation is about the person of the Patient before it, so its subject
/// is in the same file. Observation ids embed the record's index over all files.
fn write_ndjson(
    out: &mut impl Write,
    mix: &[RecordKind],
    count: usize,
    first_record: usize,
    tag: &str,
    g: &mut Generated,
) -> std::io::Result<()> {
    let mut person: Option<Person> = None;
    for (j, kind) in mix.iter().cycle().take(count).enumerate() {
        let resource = match kind {
            RecordKind::Patient => {
                let p = Person::new(g.people, tag);
                g.people += 1;
                g.patients += 1;
                patient_resource(person.insert(p))
            }
            RecordKind::Observation => {
                let p = person.as_ref().ok_or_else(|| {
                    std::io::Error::other("an Observation came before any Patient")
                })?;
                g.observations += 1;
                observation_resource(p, first_record + j, &format!("Patient/{}", p.id))
            }
        };
        serde_json::to_writer(&mut *out, &resource)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Which input records have had a canonical record, by batch and position (1-based).
struct Tally {
    /// Positions above this are not ours: every batch has at most `records` records.
    records: usize,
    seen: HashMap<String, Vec<bool>>,
    distinct: usize,
    messages: usize,
}

impl Tally {
    fn new(records: usize) -> Self {
        Tally {
            records,
            seen: HashMap::new(),
            distinct: 0,
            messages: 0,
        }
    }

    /// Counts one canonical record; true when its input record is new.
    fn add(&mut self, batch: &str, position: i64) -> anyhow::Result<bool> {
        let index = usize::try_from(position)
            .ok()
            .and_then(|p| p.checked_sub(1))
            .filter(|&i| i < self.records)
            .with_context(|| {
                format!(
                    "a canonical record of batch {batch} has position {position}, outside 1..={}",
                    self.records
                )
            })?;
        self.messages += 1;
        let seen = self.seen.entry(batch.to_owned()).or_default();
        if seen.len() <= index {
            seen.resize(index + 1, false);
        }
        let new = !std::mem::replace(&mut seen[index], true);
        self.distinct += usize::from(new);
        Ok(new)
    }
}

/// The `p`th percentile (nearest rank) of `values`, which need not be sorted.
fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

/// What the reader saw.
#[derive(Debug)]
enum Seen {
    /// The canonical record of input record `position` of `batch`, read at `at`.
    Canonical {
        batch: String,
        position: i64,
        at: Instant,
    },
    /// Canonization completed a batch.
    Closed { batch: String },
}

/// A `read_committed` reader of the canonical topics, canonization's lifecycle topic and
/// the dead-letter topics, on a thread of its own. A dead letter or a failed batch ends
/// the benchmark (it would never see all its records).
struct Reader {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    rx: mpsc::Receiver<anyhow::Result<Seen>>,
}

impl Reader {
    fn start(kafka: &KafkaArgs, codec: Arc<Codec>, rt: Handle) -> anyhow::Result<Reader> {
        let topics = kafka.topics();
        let consumer: BaseConsumer = consumer_config(
            &kafka.connection()?,
            &format!("{}-bench-reader", kafka.topic_prefix),
            ConsumerRole::Readback,
        )
        .set("statistics.interval.ms", "0")
        .create()
        .context("cannot create the canonical reader")?;
        let mut names: Vec<String> = TopicKind::canonical()
            .chain([TopicKind::Canonization])
            .map(|k| topics.name(k))
            .collect();
        names.extend(DLQ_STAGES.iter().map(|s| topics.dlq(s)));
        let mut tpl = TopicPartitionList::new();
        for name in &names {
            let md = consumer
                .fetch_metadata(Some(name), Duration::from_secs(10))
                .with_context(|| format!("cannot read the metadata of {name}"))?;
            for p in md.topics().iter().flat_map(|t| t.partitions()) {
                tpl.add_partition_offset(name, p.id(), Offset::Beginning)?;
            }
        }
        // Assigned, not subscribed: no group join between the drop and the first fetch.
        consumer
            .assign(&tpl)
            .context("cannot assign the reader's partitions")?;
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("bench-reader".into())
                .spawn(move || read(&consumer, &topics, &codec, &rt, &stop, &tx))
                .context("cannot start the reader thread")?
        };
        Ok(Reader {
            stop,
            thread: Some(thread),
            rx,
        })
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The reader thread's loop: one `Seen` (or the error that ends the run) per message
/// that matters, stamped when polled.
fn read(
    consumer: &BaseConsumer,
    topics: &Topics,
    codec: &Codec,
    rt: &Handle,
    stop: &AtomicBool,
    tx: &mpsc::Sender<anyhow::Result<Seen>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let m = match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                eprintln!("warning: the benchmark reader's consumer: {e}; continuing");
                continue;
            }
            None => continue,
        };
        let at = Instant::now();
        let seen = classify(&m, topics, codec, rt, at);
        let failed = seen.is_err();
        if let Some(seen) = seen.transpose() {
            if tx.send(seen).is_err() || failed {
                return;
            }
        }
    }
}

fn classify(
    m: &rdkafka::message::BorrowedMessage<'_>,
    topics: &Topics,
    codec: &Codec,
    rt: &Handle,
    at: Instant,
) -> anyhow::Result<Option<Seen>> {
    let topic = m.topic();
    if topics.is_dlq(topic) {
        bail!("a message was dead-lettered on {topic}; see `medpipe dlq` and the stage logs");
    }
    let Some(bytes) = m.payload() else {
        return Ok(None);
    };
    let event = rt.block_on(codec.decode(bytes)).with_context(|| {
        format!(
            "cannot decode the message at {topic} [{}] offset {}",
            m.partition(),
            m.offset()
        )
    })?;
    Ok(match &event.payload {
        Payload::EventDataCanonizationCompleted(c) => Some(Seen::Closed {
            batch: c.batch_id.clone(),
        }),
        Payload::CanonizationFailed(f) => bail!(
            "canonization failed batch {} ({}): {}",
            f.batch_id,
            f.error_kind,
            f.reason
        ),
        p => p.canonical().map(|(_, _, provenance)| Seen::Canonical {
            batch: provenance.batch_id.clone(),
            position: provenance.source_position,
            at,
        }),
    })
}

/// One stage process and its log.
pub(crate) struct StageProcess {
    pub(crate) name: &'static str,
    ready: &'static str,
    pub(crate) child: Child,
    log: PathBuf,
}

/// The four stage processes. Dropping kills what is still running.
pub(crate) struct Stages {
    pub(crate) procs: Vec<StageProcess>,
}

impl Stages {
    /// Starts the stages named in `which` (all four: `ALL_STAGES`) on `kafka`'s prefix
    /// with throwaway keys, folders under `dir` and a log each in `dir`.
    pub(crate) fn start(
        kafka: &KafkaArgs,
        dir: &Path,
        ingestion_dir: &Path,
        txn_messages: Option<usize>,
        which: &[&str],
    ) -> anyhow::Result<Stages> {
        let topic_configs = kafka
            .topic_configs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut env: Vec<(&str, String)> = vec![
            ("MEDPIPE_BOOTSTRAP_SERVERS", kafka.bootstrap_servers.clone()),
            (
                "MEDPIPE_SCHEMA_REGISTRY_URL",
                kafka.schema_registry_url.clone(),
            ),
            ("MEDPIPE_TOPIC_PREFIX", kafka.topic_prefix.clone()),
            (
                "MEDPIPE_TOPIC_PARTITIONS",
                kafka.topic_partitions.to_string(),
            ),
            (
                "MEDPIPE_TOPIC_REPLICATION",
                kafka.topic_replication.to_string(),
            ),
            ("MEDPIPE_METRICS_ADDR", "127.0.0.1:0".into()),
            // Synthetic data, deleted afterwards: one throwaway key serves every role.
            ("MEDPIPE_MASTER_KEY", BENCH_KEY.into()),
            ("MEDPIPE_PSEUDONYM_KEY", BENCH_KEY.into()),
            ("MEDPIPE_AUDIT_KEY", BENCH_KEY.into()),
            ("MEDPIPE_INGESTION_DIR", ingestion_dir.display().to_string()),
            ("MEDPIPE_AUDIT_DIR", dir.join("audit").display().to_string()),
        ];
        if !topic_configs.is_empty() {
            env.push(("MEDPIPE_TOPIC_CONFIGS", topic_configs));
        }
        if let Some(n) = txn_messages {
            env.push(("MEDPIPE_BATCH_MAX_MESSAGES", n.to_string()));
        }
        let inherited: Vec<_> = std::env::vars_os()
            .map(|(k, _)| k)
            .filter(|k| k.to_string_lossy().starts_with("MEDPIPE_"))
            .collect();
        let mut stages = Stages { procs: Vec::new() };
        for (name, ready) in STAGES.into_iter().filter(|(n, _)| which.contains(n)) {
            let exe = bench::stage_exe(&format!("medpipe-{name}"))?;
            let log = dir.join(format!("{name}.log"));
            let out = std::fs::File::create(&log)
                .with_context(|| format!("cannot create {}", log.display()))?;
            let mut cmd = Command::new(&exe);
            for k in &inherited {
                cmd.env_remove(k);
            }
            let child = cmd
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .env("RUST_LOG", "info")
                .env("RUST_BACKTRACE", "0")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
                .with_context(|| format!("cannot start {}", exe.display()))?;
            stages.procs.push(StageProcess {
                name,
                ready,
                child,
                log,
            });
        }
        Ok(stages)
    }

    /// Waits until every stage's log says it is consuming.
    pub(crate) fn wait_ready(&mut self, deadline: Instant) -> anyhow::Result<()> {
        let mut waiting: Vec<usize> = (0..self.procs.len()).collect();
        while !waiting.is_empty() {
            self.check_alive()?;
            waiting.retain(|&i| {
                let p = &self.procs[i];
                !std::fs::read_to_string(&p.log)
                    .unwrap_or_default()
                    .contains(p.ready)
            });
            if Instant::now() > deadline {
                let names: Vec<&str> = waiting.iter().map(|&i| self.procs[i].name).collect();
                bail!("stages not ready in time: {}", names.join(", "));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Fails, with the end of its log, if a stage has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            if let Some(status) = p.child.try_wait()? {
                let log = std::fs::read_to_string(&p.log).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                bail!(
                    "medpipe-{} exited ({status}); its log ends:\n{}",
                    p.name,
                    lines[lines.len().saturating_sub(10)..].join("\n")
                );
            }
        }
        Ok(())
    }

    /// SIGTERM to every stage, then up to 30 s for them all to exit; SIGKILL after that.
    pub(crate) fn stop(&mut self) {
        for p in &self.procs {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(p.child.id().to_string())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for mut p in self.procs.drain(..) {
            loop {
                match p.child.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() {
                            eprintln!(
                                "warning: medpipe-{} exited with {status} after SIGTERM",
                                p.name
                            );
                        }
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    _ => {
                        eprintln!(
                            "warning: medpipe-{} did not stop within 30 s; killed",
                            p.name
                        );
                        let _ = p.child.kill();
                        let _ = p.child.wait();
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for Stages {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// CPU and memory of one process at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    pub(crate) cpu_ticks: u64,
    pub(crate) rss_kib: u64,
}

pub(crate) fn usage(pid: u32) -> anyhow::Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    Ok(Usage {
        cpu_ticks: cpu_ticks(&stat).with_context(|| format!("cannot parse /proc/{pid}/stat"))?,
        rss_kib: bench::proc_status_kib(pid, "VmRSS")?,
    })
}

/// utime + stime of every thread, in clock ticks, from a `/proc/<pid>/stat` line. The
/// command name (field 2) is in parentheses and may hold spaces, so fields are counted
/// from the last `)`: the state (field 3) comes first, utime and stime are fields 14, 15.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `getconf CLK_TCK`, the unit of `/proc/<pid>/stat` times; 100 where it cannot be read.
pub(crate) fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .filter(|&t: &f64| t > 0.0)
        .unwrap_or(100.0)
}

/// The measurement loop's view: the reader's news, with the stages checked, the deadline
/// enforced and every process sampled every `SAMPLE_EVERY` in between.
struct Watch<'a> {
    stages: &'a mut Stages,
    reader: &'a Reader,
    deadline: Instant,
    timeout: Duration,
    next_tick: Instant,
    /// The last sample, and when it was taken.
    last: (Instant, Vec<Usage>),
    /// The highest share of a core (percent) each process used between two samples,
    /// while tracked.
    peak: Option<Vec<f64>>,
    /// The stages, then this process.
    pids: Vec<u32>,
    ticks_per_second: f64,
}

impl Watch<'_> {
    /// What the reader saw next, or `None` when a sampling tick came first; `what` names
    /// what is being waited for, for the timeout's error.
    fn next(&mut self, what: &str) -> anyhow::Result<Option<Seen>> {
        if Instant::now() >= self.next_tick {
            self.tick(what)?;
        }
        let wait = self.next_tick.saturating_duration_since(Instant::now());
        match self.reader.rx.recv_timeout(wait) {
            Ok(seen) => seen.map(Some),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => bail!("the benchmark reader stopped"),
        }
    }

    fn tick(&mut self, what: &str) -> anyhow::Result<()> {
        self.stages.check_alive()?;
        if Instant::now() > self.deadline {
            bail!("timed out after {:?} waiting for {what}", self.timeout);
        }
        let now = Instant::now();
        let usage = self.sample()?;
        if let Some(peak) = &mut self.peak {
            let (then, last) = &self.last;
            let seconds = (now - *then).as_secs_f64();
            for ((peak, u), l) in peak.iter_mut().zip(&usage).zip(last) {
                let cpu = u.cpu_ticks.saturating_sub(l.cpu_ticks) as f64 / self.ticks_per_second;
                if seconds > 0.0 {
                    *peak = peak.max(cpu / seconds * 100.0);
                }
            }
        }
        self.last = (now, usage);
        self.next_tick = now + SAMPLE_EVERY;
        Ok(())
    }

    fn sample(&self) -> anyhow::Result<Vec<Usage>> {
        self.pids.iter().map(|&pid| usage(pid)).collect()
    }
}

/// How far a stage's committed offsets trail the ends of its input topics, allowing one
/// transaction marker per partition, as the end-to-end tests read auditing's. Only a
/// hint: for auditing, the audit store is the truth.
pub(crate) struct GroupLag {
    /// In the stage's group (`<prefix>-<stage>`, its default), to read its commits; it
    /// never subscribes, so it never joins the group.
    consumer: BaseConsumer,
    partitions: Vec<(String, i32)>,
}

impl GroupLag {
    /// Auditing's lag over every topic but its own audit topic.
    fn auditing(kafka: &KafkaArgs) -> anyhow::Result<GroupLag> {
        let topics = kafka.topics();
        let audit = topics.name(TopicKind::Audit);
        let inputs: Vec<String> = topics.all().into_iter().filter(|t| *t != audit).collect();
        GroupLag::new(kafka, "auditing", &inputs)
    }

    /// `stage`'s lag over `inputs`.
    pub(crate) fn new(
        kafka: &KafkaArgs,
        stage: &str,
        inputs: &[String],
    ) -> anyhow::Result<GroupLag> {
        let consumer: BaseConsumer = consumer_config(
            &kafka.connection()?,
            &format!("{}-{stage}", kafka.topic_prefix),
            ConsumerRole::Readback,
        )
        .set("statistics.interval.ms", "0")
        .create()
        .with_context(|| format!("cannot create the lag reader of {stage}"))?;
        let mut partitions = Vec::new();
        for topic in inputs {
            let md = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .with_context(|| format!("cannot read the metadata of {topic}"))?;
            for p in md.topics().iter().flat_map(|t| t.partitions()) {
                partitions.push((topic.clone(), p.id()));
            }
        }
        Ok(GroupLag {
            consumer,
            partitions,
        })
    }

    pub(crate) fn lag(&self) -> anyhow::Result<i64> {
        let mut tpl = TopicPartitionList::new();
        let mut ends = HashMap::new();
        for (topic, p) in &self.partitions {
            let (_, high) = self
                .consumer
                .fetch_watermarks(topic, *p, Duration::from_secs(10))
                .with_context(|| format!("cannot read the end of {topic} [{p}]"))?;
            ends.insert((topic.as_str(), *p), high);
            tpl.add_partition(topic, *p);
        }
        let committed = self
            .consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .context("cannot read the stage's committed offsets")?;
        Ok(committed
            .elements()
            .iter()
            .map(|e| {
                let at = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                };
                let high = ends.get(&(e.topic(), e.partition())).copied().unwrap_or(0);
                (high - at - 1).max(0)
            })
            .sum())
    }
}

impl PipelineReport {
    /// The report, in markdown.
    pub fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        let per_second = self.records as f64 / self.seconds;
        writeln!(out, "## medpipe bench pipeline ({})\n", self.prefix)?;
        writeln!(
            out,
            "{} FHIR NDJSON records ({} Patient, {} Observation) in {} files, {} partitions per topic. \
             Stage transactions take up to {} input messages ({}); ingestion's follow its own \
             MEDPIPE_CHUNK_RECORDS instead. Ingestion runs with its defaults: it watches the \
             landing folder and lists it every 500 ms besides.\n",
            self.records,
            self.patients,
            self.observations,
            self.files,
            self.partitions,
            self.txn_messages,
            if self.txn_from_flag { "--txn-messages" } else { "the runner's default" },
        )?;
        writeln!(
            out,
            "| records | files | seconds | records/s end to end |\n|---|---|---|---|"
        )?;
        writeln!(
            out,
            "| {} | {} | {:.2} | {per_second:.0} |\n",
            self.records, self.files, self.seconds
        )?;
        if self.canonical_messages != self.records {
            writeln!(
                out,
                "{} canonical messages were read for {} records: some were seen more than once.\n",
                self.canonical_messages, self.records
            )?;
        }
        writeln!(
            out,
            "| process | CPU s | peak % of a core (500 ms) | RSS MiB at 10% | RSS MiB at end | peak RSS MiB |\n|---|---|---|---|---|---|"
        )?;
        let mib = |kib: u64| kib as f64 / 1024.0;
        for p in &self.processes {
            writeln!(
                out,
                "| {} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} |",
                p.name,
                p.cpu_seconds,
                p.peak_core_percent,
                mib(p.rss_tenth_kib),
                mib(p.rss_end_kib),
                mib(p.peak_rss_kib)
            )?;
        }
        writeln!(
            out,
            "\nCPU and RSS over the throughput window; peak RSS (VmHWM) over the whole run.\n"
        )?;
        match self.audit {
            AuditWait::CaughtUp { seconds } => writeln!(
                out,
                "Auditing caught up {seconds:.1} s after the last canonical record (its committed offsets reached the topics' ends).\n"
            )?,
            AuditWait::Stalled { lag } => writeln!(
                out,
                "Auditing had not caught up: its lag stopped falling at {lag} messages.\n"
            )?,
        }
        let ms = |p: f64| percentile(&self.latency_ms, p).unwrap_or(f64::NAN);
        if !self.latency_ms.is_empty() {
            writeln!(
                out,
                "Latency of {} one-record Patient files, one at a time into the idle pipeline (move into landing → canonical record readable): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms.\n",
                self.latency_ms.len(),
                ms(50.0),
                ms(99.0),
                ms(100.0)
            )?;
        }
        match &self.passthrough {
            Ok(r) => {
                writeln!(
                    out,
                    "Passthrough yardstick (plain rdkafka exactly-once copy, {} messages of 700 B, {} per transaction): {:.0} messages/s.\n",
                    r.messages,
                    self.txn_messages,
                    r.per_second()
                )?;
                writeln!(
                    out,
                    "End-to-end records/s ÷ passthrough messages/s: {:.2}. One end-to-end run through four \
                     chained stages sharing the machine's cores cannot say which stage costs what, so this \
                     is a ratio for the whole pipeline; `medpipe bench stages` measures each stage alone.",
                    per_second / r.per_second()
                )?;
            }
            Err(e) => writeln!(out, "Passthrough yardstick: failed ({e:#}).")?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_split_evenly_over_files() {
        assert_eq!(split(10, 3), vec![4, 3, 3]);
        assert_eq!(split(2000, 2), vec![1000, 1000]);
        assert_eq!(split(5, 5), vec![1, 1, 1, 1, 1]);
        assert_eq!(split(7, 1), vec![7]);
        assert_eq!(split(1001, 4).iter().sum::<usize>(), 1001);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v = [30.0, 10.0, 20.0, 40.0];
        assert_eq!(percentile(&v, 50.0), Some(20.0));
        assert_eq!(percentile(&v, 99.0), Some(40.0));
        assert_eq!(percentile(&v, 100.0), Some(40.0));
        assert_eq!(percentile(&v, 0.0), Some(10.0));
        assert_eq!(percentile(&[7.0], 50.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces_and_parentheses() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        let stat = "4242 (medpipe (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9";
        assert_eq!(cpu_ticks(stat), Some(325));
        assert_eq!(cpu_ticks("4242 (short) S 1"), None);
        assert_eq!(cpu_ticks(""), None);
    }

    #[test]
    fn the_tally_counts_each_input_record_once() {
        let mut t = Tally::new(3);
        assert!(t.add("b1", 1).unwrap());
        assert!(!t.add("b1", 1).unwrap());
        assert!(t.add("b2", 1).unwrap());
        assert!(t.add("b1", 3).unwrap());
        assert_eq!((t.distinct, t.messages), (3, 4));
        assert!(t.add("b1", 0).is_err());
        assert!(t.add("b1", 4).is_err());
    }

    #[test]
    fn files_cycle_the_mix_and_observations_follow_their_patient() {
        let mix = [
            RecordKind::Patient,
            RecordKind::Observation,
            RecordKind::Observation,
        ];
        let mut g = Generated::default();
        let mut out = Vec::new();
        write_ndjson(&mut out, &mix, 5, 0, "t", &mut g).unwrap();
        let lines: Vec<serde_json::Value> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        let types: Vec<&str> = lines
            .iter()
            .map(|l| l["resourceType"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            [
                "Patient",
                "Observation",
                "Observation",
                "Patient",
                "Observation"
            ]
        );
        assert_eq!((g.patients, g.observations, g.people), (2, 3, 2));
        assert_eq!(
            lines[4]["subject"]["reference"],
            format!("Patient/{}", lines[3]["id"].as_str().unwrap())
        );
        // The next file goes on with new people.
        write_ndjson(&mut Vec::new(), &mix, 1, 5, "t", &mut g).unwrap();
        assert_eq!(g.people, 3);
        // An Observation first has no Patient to refer to.
        let mut g = Generated::default();
        assert!(write_ndjson(
            &mut Vec::new(),
            &[RecordKind::Observation],
            1,
            0,
            "t",
            &mut g
        )
        .is_err());
    }
}
