//! medpipe: the operator CLI. Creates topics and registers schemas, summarises what the
//! pipeline holds, and verifies and queries the audit trail.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand};
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
    /// Count committed events per topic and type, and show a few canonical records.
    Summary {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Canonical records to print.
        #[arg(long, default_value_t = 3)]
        show: usize,
        /// Wait until at least this many canonical Patient records are committed.
        #[arg(long)]
        wait_canonical: Option<usize>,
        #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Check every entry's hash chain; exits non-zero naming the first bad entry.
    Verify {
        #[arg(
            long,
            env = "MEDPIPE_AUDIT_DIR",
            default_value = "./medpipe-data/audit"
        )]
        dir: PathBuf,
    },
    /// Print the timeline of a batch (or one event id) in chain order.
    Trace {
        id: String,
        #[arg(
            long,
            env = "MEDPIPE_AUDIT_DIR",
            default_value = "./medpipe-data/audit"
        )]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
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
        Command::Audit {
            command: AuditCommand::Verify { dir },
        } => {
            let path = dir.join(auditing::chain::ChainStore::FILE);
            match auditing::chain::verify(&path) {
                Ok(s) => writeln!(
                    out,
                    "Audit chain verified: {} entries, head {}.",
                    s.entries, s.head
                )?,
                Err(e) => bail!("audit chain verification failed: {e}"),
            }
        }
        Command::Audit {
            command: AuditCommand::Trace { id, dir, json },
        } => {
            let entries =
                auditing::chain::trace(&dir.join(auditing::chain::ChainStore::FILE), &id)?;
            if entries.is_empty() {
                bail!("no audit entries for {id}");
            }
            for e in entries {
                if json {
                    writeln!(out, "{}", serde_json::to_string(&e)?)?;
                } else {
                    writeln!(
                        out,
                        "{:>6}  {:<28} {:<24} {}",
                        e.seq,
                        e.event_type,
                        e.source_service.as_deref().unwrap_or("-"),
                        e.event_id.as_deref().unwrap_or("-")
                    )?;
                }
            }
        }
    }
    Ok(())
}

async fn summary(
    kafka: KafkaArgs,
    show: usize,
    wait: Option<usize>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let topics = kafka.topics();
    let codec = pipeline::Codec::new(&kafka.schema_registry_url, &topics)?;
    let rt = tokio::runtime::Handle::current();
    let deadline = tokio::time::Instant::now() + timeout;
    let records = loop {
        let (bootstrap, names) = (kafka.bootstrap_servers.clone(), topics.all());
        let codec_ref = &codec;
        let records = tokio::task::block_in_place(|| {
            pipeline::readback::read_all(&bootstrap, &names, Some((codec_ref, &rt)), timeout)
        })?;
        let canonical = records
            .iter()
            .filter(|r| {
                matches!(
                    r.event.as_ref().map(|e| &e.payload),
                    Some(Payload::CanonicalPatient(_))
                )
            })
            .count();
        match wait {
            Some(n) if canonical < n => {
                if tokio::time::Instant::now() > deadline {
                    bail!("only {canonical} of {n} canonical records arrived within {timeout:?}");
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
    let canonical_topic = topics.name(TopicKind::CanonicalPatient);
    writeln!(
        out,
        "\nFirst {show} canonical records on {canonical_topic}:"
    )?;
    for r in records
        .iter()
        .filter(|r| r.message.topic() == canonical_topic)
        .take(show)
    {
        if let Some(Payload::CanonicalPatient(p)) = r.event.as_ref().map(|e| &e.payload) {
            writeln!(out, "  key={} {}", p.patient_pseudonym, p.fhir_json)?;
        }
    }
    Ok(())
}
