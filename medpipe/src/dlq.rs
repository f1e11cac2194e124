//! `medpipe dlq`: what each stage dead-lettered, and why. A dead letter keeps the input's
//! original bytes (which may hold PHI, or a sealed record) and says in its headers which
//! stage refused it, the error, and where it came from. These commands print the headers
//! and, when the bytes decode as an event, its type and batch; the payload itself only as
//! its size and SHA-256, never in clear.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use pipeline::config::KafkaArgs;
use pipeline::readback::Record;
use pipeline::runner::dlq_headers;
use pipeline::topics::DLQ_STAGES;
use rdkafka::message::{Headers, Message};
use serde_json::{json, Value};

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List a stage's dead letters (position, error type and message, source, batch) and
    /// count them by error type. Never prints a payload.
    List {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// ingestion, anonymization, canonization or auditing.
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(DLQ_STAGES))]
        stage: String,
        /// Only dead letters of this error type (`decode`, `no_patient_link`, ...).
        #[arg(long)]
        error_type: Option<String>,
        /// Only dead letters of this batch.
        #[arg(long)]
        batch: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// One dead letter, by its position on the stage's dead-letter topic
    /// (`<partition>:<offset>`): every header, and the payload's size and SHA-256.
    Show {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(DLQ_STAGES))]
        stage: String,
        /// `<partition>:<offset>`, as `dlq list` prints it.
        position: String,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Put dead letters back on the topic they came from (after fixing what made the
    /// stage refuse them), each at most once, in transactions; the dead letters stay.
    Redrive(crate::redrive::RedriveArgs),
}

/// What a dead letter says about itself, without its payload.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the epoch, when the broker gave one.
    pub timestamp_ms: Option<i64>,
    /// The medpipe headers (`medpipe.dlq.*`) and any others, by name.
    pub headers: BTreeMap<String, String>,
    /// The batch and the event type, when the payload decodes as an event.
    pub batch: Option<String>,
    pub event_type: Option<String>,
    pub payload_bytes: usize,
    pub payload_sha256: String,
}

impl DeadLetter {
    pub fn of(r: &Record) -> DeadLetter {
        let m = &r.message;
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let payload = m.payload().unwrap_or_default();
        DeadLetter {
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            headers,
            batch: r.event.as_ref().map(|e| e.header.correlation_id.clone()),
            event_type: r.event.as_ref().map(|e| e.event_type().to_string()),
            payload_bytes: payload.len(),
            payload_sha256: pipeline::crypto::sha256_hex(payload),
        }
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }

    pub fn error_type(&self) -> &str {
        self.header(dlq_headers::ERROR_TYPE)
    }

    /// The batch, when the payload decodes as an event.
    fn batch(&self) -> Option<&str> {
        self.batch.as_deref()
    }

    fn to_json(&self) -> Value {
        json!({
            "position": format!("{}:{}", self.partition, self.offset),
            "partition": self.partition,
            "offset": self.offset,
            "timestamp_ms": self.timestamp_ms,
            "stage": self.header(dlq_headers::STAGE),
            "error_class": self.header(dlq_headers::ERROR_CLASS),
            "error_type": self.error_type(),
            "error_message": self.header(dlq_headers::ERROR_MESSAGE),
            "source_topic": self.header(dlq_headers::SOURCE_TOPIC),
            "source_partition": self.header(dlq_headers::SOURCE_PARTITION),
            "source_offset": self.header(dlq_headers::SOURCE_OFFSET),
            "batch": self.batch,
            "event_type": self.event_type,
            "payload_bytes": self.payload_bytes,
            "payload_sha256": self.payload_sha256,
        })
    }
}

/// Reads every committed dead letter of a stage.
async fn read(
    kafka: &KafkaArgs,
    stage: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<DeadLetter>> {
    let topics = kafka.topics();
    let codec = kafka.codec(&topics)?;
    let rt = tokio::runtime::Handle::current();
    let topic = topics.dlq(stage);
    let bootstrap = kafka.connection()?;
    let records = tokio::task::block_in_place(|| {
        pipeline::readback::read_all(&bootstrap, &[topic], Some((&codec, &rt)), timeout)
    })
    .with_context(|| format!("reading the {stage} dead-letter topic"))?;
    let mut out: Vec<DeadLetter> = records.iter().map(DeadLetter::of).collect();
    out.sort_by_key(|d| (d.partition, d.offset));
    Ok(out)
}

pub async fn run(command: DlqCommand, out: &mut impl Write) -> anyhow::Result<()> {
    match command {
        DlqCommand::Redrive(args) => crate::redrive::run(args, out).await?,
        DlqCommand::List {
            kafka,
            stage,
            error_type,
            batch,
            json,
            timeout,
        } => {
            let all = read(&kafka, &stage, timeout).await?;
            let chosen: Vec<&DeadLetter> = all
                .iter()
                .filter(|d| error_type.as_deref().is_none_or(|t| d.error_type() == t))
                .filter(|d| batch.as_deref().is_none_or(|b| d.batch() == Some(b)))
                .collect();
            let mut by_type: BTreeMap<&str, usize> = BTreeMap::new();
            for d in &chosen {
                *by_type.entry(d.error_type()).or_default() += 1;
            }
            if json {
                let list: Vec<Value> = chosen.iter().map(|d| d.to_json()).collect();
                writeln!(
                    out,
                    "{}",
                    json!({"stage": stage, "dead_letters": list, "by_error_type": by_type})
                )?;
                return Ok(());
            }
            writeln!(
                out,
                "{} dead letter(s) on {} ({} in all)",
                chosen.len(),
                kafka.topics().dlq(&stage),
                all.len()
            )?;
            for d in &chosen {
                writeln!(
                    out,
                    "{}:{}  {}  batch {}  from {}  {}",
                    d.partition,
                    d.offset,
                    d.error_type(),
                    d.batch().unwrap_or("-"),
                    d.header(dlq_headers::SOURCE_TOPIC),
                    d.header(dlq_headers::ERROR_MESSAGE)
                )?;
            }
            for (t, n) in by_type {
                writeln!(out, "  {t}: {n}")?;
            }
        }
        DlqCommand::Show {
            kafka,
            stage,
            position,
            json,
            timeout,
        } => {
            let Some((partition, offset)) = position
                .split_once(':')
                .and_then(|(p, o)| Some((p.parse::<i32>().ok()?, o.parse::<i64>().ok()?)))
            else {
                bail!("position `{position}` is not <partition>:<offset> (for example 0:17)");
            };
            let all = read(&kafka, &stage, timeout).await?;
            let Some(d) = all
                .iter()
                .find(|d| d.partition == partition && d.offset == offset)
            else {
                bail!(
                    "no dead letter at {partition}:{offset} on {} ({} there; `medpipe dlq list {stage}` lists them)",
                    kafka.topics().dlq(&stage),
                    all.len()
                );
            };
            if json {
                writeln!(out, "{}", d.to_json())?;
                return Ok(());
            }
            writeln!(out, "dead letter {partition}:{offset} of {stage}")?;
            for (k, v) in &d.headers {
                writeln!(out, "  {k}: {v}")?;
            }
            writeln!(out, "  batch: {}", d.batch().unwrap_or("-"))?;
            writeln!(
                out,
                "  event type: {}",
                d.event_type.as_deref().unwrap_or("-")
            )?;
            writeln!(
                out,
                "  payload: {} bytes, SHA-256 {} (not shown)",
                d.payload_bytes, d.payload_sha256
            )?;
        }
    }
    Ok(())
}
