//! `medpipe bench ingest`: ingests a generated synthetic file through the real broker
//! with the real `medpipe-ingestion` binary, and reports throughput and the process's
//! peak memory. A benchmark, not a test: it asserts nothing about time.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ingestion::formats::SourceFormat;
use pipeline::config::KafkaArgs;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// A throwaway master key for benchmark data (synthetic, deleted afterwards).
const BENCH_KEY: &str = "4242424242424242424242424242424242424242424242424242424242424242";

pub struct IngestBench {
    pub kafka: KafkaArgs,
    pub format: SourceFormat,
    pub records: usize,
    pub work_dir: PathBuf,
    pub keep_topics: bool,
    pub timeout: Duration,
}

pub struct IngestResult {
    pub file_bytes: u64,
    pub seconds: f64,
    pub peak_rss_kib: u64,
    pub emitted: u64,
}

impl IngestResult {
    pub fn row(&self, format: SourceFormat, records: usize) -> String {
        format!(
            "| {format} | {records} | {:.1} | {:.2} | {:.0} | {:.1} | {:.1} |",
            self.file_bytes as f64 / 1e6,
            self.seconds,
            self.emitted as f64 / self.seconds,
            self.file_bytes as f64 / 1e6 / self.seconds,
            self.peak_rss_kib as f64 / 1024.0
        )
    }
}

pub const HEADER: &str = "| format | records | file MB | seconds | records/s | MB/s | peak RSS MiB |\n|---|---|---|---|---|---|---|";

pub async fn ingest(b: IngestBench) -> anyhow::Result<IngestResult> {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let mut kafka = b.kafka.clone();
    kafka.topic_prefix = format!("bench{tag}");
    pipeline::stage::prepare(&kafka, Duration::from_secs(30)).await?;
    let dir = b.work_dir.join(&kafka.topic_prefix);
    let landing = dir.join("landing");
    std::fs::create_dir_all(&landing)?;
    let ext = match b.format {
        SourceFormat::Csv => "csv",
        SourceFormat::FhirNdjson => "ndjson",
        SourceFormat::FhirBundle => "json",
        SourceFormat::Hl7v2 => "hl7",
    };
    let staged = dir.join(format!("bench.{ext}"));
    eprintln!(
        "Generating {} {} records in {} ...",
        b.records,
        b.format,
        staged.display()
    );
    {
        let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&staged)?);
        ingestion::synthetic::write(b.format, &mut w, b.records, &tag)?;
        w.flush()?;
    }
    let file_bytes = std::fs::metadata(&staged)?.len();
    let log = dir.join("ingestion.log");
    let mut child = spawn_ingestion(&kafka, &dir, &log)?;
    let result = measure(&kafka, &mut child, &staged, &landing, &log, b.timeout);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    if !b.keep_topics {
        delete_topics(&kafka).await;
        let _ = std::fs::remove_dir_all(&dir);
    }
    let (seconds, peak_rss_kib, emitted) = result?;
    Ok(IngestResult {
        file_bytes,
        seconds,
        peak_rss_kib,
        emitted,
    })
}

fn spawn_ingestion(kafka: &KafkaArgs, dir: &Path, log: &Path) -> anyhow::Result<Child> {
    let exe = std::env::current_exe()?
        .parent()
        .map(|d| d.join("medpipe-ingestion"))
        .context("cannot locate medpipe-ingestion")?;
    if !exe.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release --bins`",
            exe.display()
        );
    }
    let out = std::fs::File::create(log)?;
    Ok(Command::new(exe)
        .env("MEDPIPE_BOOTSTRAP_SERVERS", &kafka.bootstrap_servers)
        .env("MEDPIPE_SCHEMA_REGISTRY_URL", &kafka.schema_registry_url)
        .env("MEDPIPE_TOPIC_PREFIX", &kafka.topic_prefix)
        .env("MEDPIPE_MASTER_KEY", BENCH_KEY)
        .env("MEDPIPE_INGESTION_DIR", dir)
        .env("MEDPIPE_METRICS_ADDR", "127.0.0.1:0")
        .env("MEDPIPE_POLL_INTERVAL", "50ms")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?)
}

/// Waits for the stage to be up, drops the file, and waits for the ledger to say the
/// batch finished. Returns (seconds, peak RSS KiB, records emitted).
fn measure(
    kafka: &KafkaArgs,
    child: &mut Child,
    staged: &Path,
    landing: &Path,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<(f64, u64, u64)> {
    let deadline = Instant::now() + timeout;
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("Ingestion started.")
    {
        if let Some(status) = child.try_wait()? {
            bail!(
                "medpipe-ingestion exited with {status}; see {}",
                log.display()
            );
        }
        if Instant::now() > deadline {
            bail!("medpipe-ingestion did not start; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("group.id", format!("bench-{}", uuid::Uuid::new_v4()))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let ledger = kafka.topics().ingestion_ledger();
    let mut tpl = TopicPartitionList::new();
    for p in 0..kafka.topic_partitions {
        tpl.add_partition_offset(&ledger, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let start = Instant::now();
    let name = staged.file_name().context("staged file has no name")?;
    std::fs::rename(staged, landing.join(name))?;
    loop {
        if Instant::now() > deadline {
            bail!(
                "the batch did not finish within {timeout:?}; see {}",
                log.display()
            );
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "medpipe-ingestion exited with {status}; see {}",
                log.display()
            );
        }
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) else {
            continue;
        };
        let entry: ingestion::ledger::Entry = match m.payload().map(serde_json::from_slice) {
            Some(Ok(e)) => e,
            _ => continue,
        };
        match entry.status {
            ingestion::ledger::Status::Finished => {
                let seconds = start.elapsed().as_secs_f64();
                return Ok((seconds, peak_rss_kib(child.id())?, entry.emitted));
            }
            ingestion::ledger::Status::Failed => bail!("the batch failed; see {}", log.display()),
            ingestion::ledger::Status::InProgress => {}
        }
    }
}

/// The process's high-water mark of resident memory (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc status")
}

async fn delete_topics(kafka: &KafkaArgs) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: Result<AdminClient<rdkafka::client::DefaultClientContext>, _> = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .create();
    if let Ok(admin) = admin {
        let topics = kafka.topics();
        let mut names = topics.all();
        names.push(topics.ingestion_ledger());
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        if let Err(e) = admin.delete_topics(&refs, &AdminOptions::new()).await {
            eprintln!("warning: could not delete the benchmark topics: {e}");
        }
    }
}
