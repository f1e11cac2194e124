//! medpipe: the operator CLI. Creates topics and registers schemas, sends intake
//! commands, opens archives, summarises what the pipeline holds, lists dead letters,
//! verifies and queries the audit trail, and runs benchmarks.

/// mimalloc instead of glibc's malloc: the stages allocate many small, short-lived
/// values per record (JSON trees, Avro values), and glibc's allocator took about 40% of
/// the de-identification engine's time (BENCHMARKS.md, "The allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod audit;
mod batch;
mod bench;
mod bench_audit;
mod bench_passthrough;
mod bench_pipeline;
mod bench_stages;
mod bench_status;
mod dlq;
mod k8s;
mod redrive;
mod replay;
mod saga;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use ingestion::formats::SourceFormat;
use pipeline::config::KafkaArgs;
use pipeline::events::Payload;
use pipeline::topics::TopicKind;
use rdkafka::Message;

#[derive(Parser, Debug)]
#[command(name = "medpipe", version, about = "Operate a medpipe pipeline.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Register every event schema and create missing topics.
    Setup {
        #[command(flatten)]
        kafka: KafkaArgs,
    },
    /// Kubernetes manifests derived from the code (see k8s/README.md).
    K8s {
        #[command(subcommand)]
        command: K8sCommand,
    },
    /// Count committed events per topic and type, and show a few canonical records.
    Summary {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Canonical records to print.
        #[arg(long, default_value_t = 3)]
        show: usize,
        /// Wait until at least this many canonical Patient records are committed and every
        /// started batch has closed in ingestion and anonymization.
        #[arg(long)]
        wait_canonical: Option<usize>,
        #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Ask ingestion to ingest a file from its intake folder (a StartDataIntakeCommand).
    Intake {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Path relative to the ingestion intake folder.
        file_path: String,
        /// Force a format instead of sniffing: csv, fhir-ndjson, fhir-bundle or hl7v2.
        #[arg(long)]
        format: Option<SourceFormat>,
        #[arg(long, env = "USER", default_value = "medpipe-cli")]
        requested_by: String,
    },
    /// Decrypt an ingestion archive (`archive/<batch>.enc`) with the master key.
    ArchiveOpen {
        #[command(flatten)]
        master: pipeline::config::MasterKeyArgs,
        archive: PathBuf,
        /// Where to write the raw file; it holds PHI, so choose a protected place.
        #[arg(long)]
        out: PathBuf,
    },
    /// Benchmarks on the real broker; figures go into BENCHMARKS.md.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Where each batch stands, per stage, from the audit trail.
    Batch {
        #[command(subcommand)]
        command: batch::BatchCommand,
    },
    /// Run a batch again under a new policy or concept-map version, already deployed:
    /// ingestion re-reads it from its archive; its canonical records get new versions
    /// (same keys and ids) tagged reprocessed; the old ones stay in the trail. A stage that
    /// runs another version holds the batch instead. Once per request.
    Reprocess {
        #[command(flatten)]
        request: saga::RequestArgs,
        /// The de-identification policy version anonymization must run.
        #[arg(long)]
        policy: Option<String>,
        /// The concept maps canonization must have loaded (`id@version`, comma-separated).
        #[arg(long)]
        concept_maps: Option<String>,
    },
    /// Reprocess a time window of a stage's input in isolation: the batches that started
    /// in it are copied whole to a fresh topic prefix, for the stage to run on there.
    Replay(replay::ReplayArgs),
    /// What each stage dead-lettered, and why (never the payload in clear).
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Measure de-identification against gold annotations.
    Eval {
        #[command(subcommand)]
        command: EvalCommand,
    },
}

#[derive(Subcommand, Debug)]
enum EvalCommand {
    /// Run the free-text scrubber of the shipped policy over a gold JSONL file (one
    /// `{"text": ..., "spans": [{"start", "end", "type"}]}` per line, character offsets)
    /// and print recall per type, precision, F1 and the clinical tokens kept.
    Deid {
        #[arg(long)]
        gold: PathBuf,
        /// Print the counts as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write the synthetic gold set (invented notes with gold spans) as JSONL.
    Gold {
        #[arg(long, default_value_t = 400)]
        notes: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// The audit store alone: append with sealing and chaining, verify, trace, report.
    Audit {
        #[arg(long, default_value_t = 1_000_000)]
        entries: u64,
        /// Entries per append (one fsync each), as the stage's poll batch.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// The store is built here and removed afterwards.
        #[arg(long, default_value = "/tmp/medpipe-bench")]
        work_dir: PathBuf,
    },
    /// The yardstick: a plain rdkafka exactly-once copy (consume `read_committed`,
    /// produce, send offsets, commit) of generated messages between two fresh topics,
    /// with medpipe's client settings and no work per message; per-phase times.
    Passthrough {
        #[arg(
            long,
            env = "MEDPIPE_BOOTSTRAP_SERVERS",
            default_value = "127.0.0.1:9092"
        )]
        bootstrap_servers: String,
        #[arg(long, default_value_t = 100_000)]
        messages: usize,
        /// Bytes per message.
        #[arg(long, default_value_t = 700)]
        size: usize,
        #[arg(long, default_value_t = 3)]
        partitions: i32,
        /// Messages per transaction, at most (comma-separated for several runs).
        #[arg(long, value_delimiter = ',', default_value = "500,5000")]
        txn_messages: Vec<usize>,
        /// A transaction also ends after collecting this long.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        txn_wait: Duration,
        /// librdkafka debug contexts for the transactional producer, to stderr.
        #[arg(long)]
        debug: Option<String>,
        /// Extra librdkafka setting for the transactional producer, `key=value`.
        #[arg(long = "set", value_parser = parse_key_value)]
        producer_set: Vec<(String, String)>,
        /// Commit without serving delivery reports first (rdkafka's flush then waits
        /// 100 ms per commit): what a plain program gets.
        #[arg(long)]
        naive_flush: bool,
    },
    /// The auditing stage's batch status API (no Kafka, no store): an index of synthetic
    /// batches served over loopback TCP; latency of lookups (known, unknown, malformed
    /// ids) and of `?state=held` lists while a writer folds entries in.
    StatusApi {
        #[arg(long, default_value_t = 100_000)]
        batches: usize,
        /// Lookups by id; the lists come on top.
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
        #[arg(long, default_value_t = 50)]
        lists: usize,
        /// Entries per second folded into the index meanwhile, as the stage appends
        /// them (500 per write lock); 0 for none.
        #[arg(long, default_value_t = 2500)]
        append_rate: u64,
    },
    /// Run the canonization stage's logic (no Kafka) on golden anonymized FHIR, CSV and
    /// HL7 records; report input records/s and canonical resources/s on one core.
    Canonize {
        #[arg(long, default_value_t = 20000)]
        records: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Run the pure de-identification engine (no Kafka) on FHIR Patients, Observations
    /// with narrative, and HL7 ORU messages; report records/s on one core (best of rounds).
    Anonymize {
        #[arg(long, default_value_t = 20000)]
        records: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The whole pipeline end to end: the four release stage binaries on a fresh topic
    /// prefix; generated FHIR NDJSON files (Patients and Observations) moved into
    /// landing at once and timed until every canonical record is committed; each stage's
    /// CPU and memory, auditing's catch-up, one-record latency, and the passthrough
    /// yardstick at the stages' transaction size.
    Pipeline(bench_pipeline::PipelineBench),
    /// Each stage alone over input already on the broker (ingestion over files), timed
    /// until its committed offsets reach the ends of its inputs, beside the passthrough
    /// yardstick at the same transaction size: the ratio is the cost of the stage's work.
    Stages(bench_stages::StagesBench),
    /// Generate a synthetic file, ingest it with medpipe-ingestion, report records/s
    /// and the process's peak resident memory.
    Ingest {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long, value_delimiter = ',', default_value = "fhir-ndjson,csv,hl7v2")]
        formats: Vec<SourceFormat>,
        #[arg(long, value_delimiter = ',', default_value = "100000")]
        records: Vec<usize>,
        /// Generated files and ingestion folders go here (removed afterwards).
        #[arg(long, default_value = "/tmp/medpipe-bench")]
        work_dir: PathBuf,
        #[arg(long)]
        keep_topics: bool,
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(Subcommand, Debug)]
enum K8sCommand {
    /// A Strimzi `KafkaTopic` for every topic the stages use, to stdout.
    Topics(k8s::TopicsArgs),
    /// A Strimzi `KafkaUser` with least-privilege ACLs for every stage and the registry,
    /// to stdout.
    Users(k8s::UsersArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pipeline::telemetry::init_tracing(pipeline::config::LogFormat::Text);
    match run(Cli::parse()).await {
        // A closed pipe (`medpipe audit trace X | head`) is not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        other => other,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::K8s {
            command: K8sCommand::Topics(args),
        } => out.write_all(k8s::render(&args).as_bytes())?,
        Command::K8s {
            command: K8sCommand::Users(args),
        } => out.write_all(k8s::render_users(&args).as_bytes())?,
        Command::Setup { kafka } => {
            pipeline::stage::prepare(&kafka, Duration::from_secs(30)).await?;
            writeln!(
                out,
                "Schemas registered and topics present under prefix {}.",
                kafka.topic_prefix
            )?;
        }
        Command::Summary {
            kafka,
            show,
            wait_canonical,
            timeout,
        } => {
            drop(out);
            summary(kafka, show, wait_canonical, timeout).await?
        }
        Command::Intake {
            kafka,
            file_path,
            format,
            requested_by,
        } => {
            let id = uuid::Uuid::new_v4().to_string();
            send_command(&kafka, &id, &file_path, format, &requested_by).await?;
            writeln!(out, "Intake command {id} sent for {file_path}.")?;
        }
        Command::ArchiveOpen {
            master,
            archive,
            out: dest,
        } => {
            let key = master.load()?;
            let mut file = std::fs::File::create(&dest)
                .with_context(|| format!("cannot create {}", dest.display()))?;
            let n = pipeline::archive::open_archive(&archive, &key, &mut file)?;
            file.sync_all()?;
            writeln!(out, "Decrypted {n} bytes to {}.", dest.display())?;
        }
        Command::Eval {
            command: EvalCommand::Deid { gold, json },
        } => {
            let file = std::fs::File::open(&gold)
                .with_context(|| format!("cannot open {}", gold.display()))?;
            let notes = anonymization::eval::read_gold(std::io::BufReader::new(file))
                .with_context(|| format!("gold file {}", gold.display()))?;
            let scrubber = anonymization::scrub::Scrubber::shared()?;
            let started = Instant::now();
            let ev = anonymization::eval::evaluate(scrubber, &notes);
            let seconds = started.elapsed().as_secs_f64();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&ev)?)?;
            } else {
                write!(out, "{}", ev.table())?;
                writeln!(
                    out,
                    "{:.0} notes/s, {:.2} MB/s on one core (evaluation included)",
                    ev.notes as f64 / seconds,
                    ev.bytes as f64 / seconds / 1e6
                )?;
            }
        }
        Command::Eval {
            command:
                EvalCommand::Gold {
                    notes,
                    seed,
                    out: dest,
                },
        } => {
            let mut file = std::io::BufWriter::new(
                std::fs::File::create(&dest)
                    .with_context(|| format!("cannot create {}", dest.display()))?,
            );
            let set = anonymization::gold::notes(notes, seed);
            for note in &set {
                writeln!(file, "{}", serde_json::to_string(note)?)?;
            }
            file.flush()?;
            let spans: usize = set.iter().map(|n| n.spans.len()).sum();
            writeln!(
                out,
                "Wrote {} notes with {spans} gold spans to {}.",
                set.len(),
                dest.display()
            )?;
        }
        Command::Bench {
            command:
                BenchCommand::Audit {
                    entries,
                    batch,
                    work_dir,
                },
        } => bench_audit::run(
            &bench_audit::AuditBench {
                entries,
                batch,
                work_dir,
            },
            &mut out,
        )?,
        Command::Bench {
            command:
                BenchCommand::StatusApi {
                    batches,
                    requests,
                    lists,
                    append_rate,
                },
        } => {
            bench_status::run(
                &bench_status::StatusApiBench {
                    batches,
                    requests,
                    lists,
                    append_rate,
                },
                &mut out,
            )
            .await?
        }
        Command::Bench {
            command:
                BenchCommand::Passthrough {
                    bootstrap_servers,
                    messages,
                    size,
                    partitions,
                    txn_messages,
                    txn_wait,
                    debug,
                    producer_set,
                    naive_flush,
                },
        } => {
            writeln!(
                out,
                "| messages per txn | messages | seconds | messages/s | txns | collect ms | produce ms | send_offsets ms | commit ms |\n|---|---|---|---|---|---|---|---|---|"
            )?;
            for n in txn_messages {
                let r = bench_passthrough::run(bench_passthrough::PassthroughBench {
                    bootstrap: pipeline::kafka::Connection::plaintext(bootstrap_servers.clone()),
                    messages,
                    size,
                    partitions,
                    txn_messages: n,
                    txn_wait,
                    debug: debug.clone(),
                    producer_set: producer_set.clone(),
                    naive_flush,
                })
                .await?;
                let ms = |k: &str| r.phases.get(k).copied().unwrap_or(0.0);
                writeln!(
                    out,
                    "| {n} | {} | {:.2} | {:.0} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    r.messages,
                    r.seconds,
                    r.per_second(),
                    r.transactions,
                    ms("collect"),
                    ms("produce"),
                    ms("send_offsets"),
                    ms("commit")
                )?;
                out.flush()?;
            }
        }
        Command::Bench {
            command: BenchCommand::Canonize { records, rounds },
        } => {
            writeln!(out, "| case | records/s | resources/s |\n|---|---|---|")?;
            for (case, rate, resources) in bench::canonize(records, rounds)? {
                writeln!(out, "| {case} | {rate:.0} | {resources:.0} |")?;
            }
        }
        Command::Bench {
            command: BenchCommand::Anonymize { records, rounds },
        } => {
            writeln!(out, "| case | records/s |\n|---|---|")?;
            for (case, rate) in bench::anonymize(records, rounds)? {
                writeln!(out, "| {case} | {rate:.0} |")?;
            }
        }
        Command::Bench {
            command:
                BenchCommand::Ingest {
                    kafka,
                    formats,
                    records,
                    work_dir,
                    keep_topics,
                    timeout,
                },
        } => {
            writeln!(out, "{}", bench::HEADER)?;
            for n in &records {
                for f in &formats {
                    let b = bench::IngestBench {
                        kafka: kafka.clone(),
                        format: *f,
                        records: *n,
                        work_dir: work_dir.clone(),
                        keep_topics,
                        timeout,
                    };
                    let r = bench::ingest(b).await?;
                    writeln!(out, "{}", r.row(*f, *n))?;
                    out.flush()?;
                }
            }
        }
        Command::Bench {
            command: BenchCommand::Pipeline(args),
        } => {
            let report = bench_pipeline::run(args).await?;
            report.write(&mut out)?;
            report
                .passthrough
                .context("the passthrough yardstick failed")?;
        }
        Command::Bench {
            command: BenchCommand::Stages(args),
        } => {
            let report = bench_stages::run(args).await?;
            report.write(&mut out)?;
            report
                .passthrough
                .context("the passthrough yardstick failed")?;
        }
        Command::Audit { command } => audit::run(command, &mut out).await?,
        Command::Dlq { command } => dlq::run(command, &mut out).await?,
        Command::Batch { command } => batch::run(command, &mut out).await?,
        Command::Replay(args) => replay::run(args, &mut out).await?,
        Command::Reprocess {
            request,
            policy,
            concept_maps,
        } => {
            let kind = saga::Request::Reprocess {
                policy,
                concept_maps,
            };
            saga::run(kind, request, &mut out).await?
        }
    }
    Ok(())
}

async fn send_command(
    kafka: &KafkaArgs,
    id: &str,
    file_path: &str,
    format: Option<SourceFormat>,
    requested_by: &str,
) -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let topics = kafka.topics();
    let codec = kafka.codec(&topics)?;
    let event = pipeline::Event::new(
        "medpipe-cli",
        id,
        None,
        Payload::StartDataIntakeCommand(pipeline::events::StartDataIntakeCommand {
            command_id: id.into(),
            file_path: file_path.into(),
            format: format.map(|f| f.as_str().to_string()),
            requested_by: requested_by.into(),
        }),
    );
    let bytes = codec.encode(&event).await?;
    let producer: FutureProducer = pipeline::kafka::producer_config(&kafka.connection()?)
        .set("enable.idempotence", "true")
        .create()?;
    let topic = topics.name(TopicKind::IngestionCommands);
    producer
        .send(
            FutureRecord::to(&topic).key(id).payload(&bytes),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .context("cannot send the intake command")?;
    Ok(())
}

async fn summary(
    kafka: KafkaArgs,
    show: usize,
    wait: Option<usize>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let topics = kafka.topics();
    let codec = kafka.codec(&topics)?;
    let rt = tokio::runtime::Handle::current();
    let deadline = tokio::time::Instant::now() + timeout;
    let records = loop {
        let (bootstrap, names) = (kafka.connection()?, topics.all());
        let codec_ref = &codec;
        let records = tokio::task::block_in_place(|| {
            pipeline::readback::read_all(&bootstrap, &names, Some((codec_ref, &rt)), timeout)
        })?;
        let canonical = records
            .iter()
            .filter(|r| {
                r.event
                    .as_ref()
                    .is_some_and(|e| e.payload.canonical().is_some())
            })
            .count();
        // Settled: every started batch has closed in ingestion and in anonymization, so
        // the snapshot is not taken between a batch's records and its closing events.
        let count = |pred: fn(&Payload) -> bool| {
            records
                .iter()
                .filter(|r| r.event.as_ref().is_some_and(|e| pred(&e.payload)))
                .count()
        };
        let started = count(|p| matches!(p, Payload::DataIngestionStarted(_)));
        let ingested = count(|p| {
            matches!(
                p,
                Payload::DataIngestionFinished(_) | Payload::DataIngestionFailed(_)
            )
        });
        let anonymized = count(|p| {
            matches!(
                p,
                Payload::AnonymizationFinished(_) | Payload::AnonymizationFailed(_)
            )
        });
        let canonized = count(|p| {
            matches!(
                p,
                Payload::EventDataCanonizationCompleted(_) | Payload::CanonizationFailed(_)
            )
        });
        let settled = ingested >= started && anonymized >= ingested && canonized >= anonymized;
        match wait {
            Some(n) if canonical < n || !settled => {
                if tokio::time::Instant::now() > deadline {
                    bail!("only {canonical} of {n} canonical records arrived (and {ingested} of {started} batches closed) within {timeout:?}");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            _ => break records,
        }
    };
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for r in &records {
        let t = r.event.as_ref().map_or("(not an event)".to_string(), |e| {
            e.header.event_type.clone()
        });
        *counts
            .entry((r.message.topic().to_string(), t))
            .or_default() += 1;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "Committed events per topic:")?;
    for ((topic, t), n) in &counts {
        writeln!(out, "  {topic:<48} {t:<28} {n:>7}")?;
    }
    writeln!(out, "\nUp to {show} canonical records per resource topic:")?;
    for kind in TopicKind::canonical() {
        let topic = topics.name(kind);
        for r in records
            .iter()
            .filter(|r| r.message.topic() == topic)
            .take(show)
        {
            if let Some((pseudonym, fhir, _)) = r.event.as_ref().and_then(|e| e.payload.canonical())
            {
                writeln!(out, "  {topic} key={pseudonym}\n    {fhir}")?;
            }
        }
    }
    Ok(())
}

/// `key=value`, for a librdkafka setting.
fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}
