//! `medpipe dlq redrive`: puts a stage's dead letters back on the topics they came from,
//! after the operator fixed what made the stage refuse them, so the stage processes them
//! again. Each dead letter is redriven at most once, even if the command is killed half
//! way and run again:
//!
//! - The redriven copies and, for each, an entry in the compacted redrive ledger
//!   (`<p>-internal.dlq-redrive.v1`, keyed `<dlq topic>/<partition>/<offset>`) are written
//!   in one Kafka transaction. A transaction that a kill interrupted is aborted when the
//!   next run's producer (the same transactional id) fences it, so neither its copies
//!   nor its ledger entries are ever read.
//! - A run reads the ledger to its end first and skips every dead letter it names.
//!
//! A redriven copy keeps the dead letter's key and bytes, and gets two headers:
//! `medpipe.redrive.count` (1, or one more than the dead letter said) and
//! `medpipe.redrive.from`. The dead letters stay on their topic: nothing is deleted.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use pipeline::config::KafkaArgs;
use pipeline::readback::Record;
use pipeline::runner::dlq_headers;
use pipeline::telemetry::StageMetrics;
use pipeline::txn::{Transactions, TxnSettings};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// What to redrive.
#[derive(clap::Args, Debug)]
pub struct RedriveArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The stage whose dead letters to redrive.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(pipeline::topics::DLQ_STAGES))]
    pub stage: String,
    /// Only dead letters of this error type (`medpipe dlq list` counts them by type).
    #[arg(long)]
    pub error_type: Option<String>,
    /// Only dead letters of this batch.
    #[arg(long)]
    pub batch: Option<String>,
    /// Dead letters per transaction.
    #[arg(long, default_value_t = 200)]
    pub per_transaction: usize,
    /// List what would be redriven, and redrive nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub stage: String,
    /// Dead letters on the stage's topic.
    pub dead_letters: usize,
    /// Those the filters chose.
    pub chosen: usize,
    /// Chosen ones an earlier run already redrove (skipped).
    pub already_redriven: usize,
    /// Redriven by this run.
    pub redriven: usize,
    /// Chosen ones without a source topic header, which cannot be redriven.
    pub without_source: usize,
}

/// A dead letter's key in the redrive ledger.
fn ledger_key(r: &Record) -> String {
    format!(
        "{}/{}/{}",
        r.message.topic(),
        r.message.partition(),
        r.message.offset()
    )
}

fn header<'a>(r: &'a Record, name: &str) -> Option<&'a str> {
    r.message.headers().and_then(|hs| {
        hs.iter()
            .find(|h| h.key == name)
            .and_then(|h| std::str::from_utf8(h.value?).ok())
    })
}

pub async fn run(args: RedriveArgs, out: &mut impl Write) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.per_transaction > 0,
        "--per-transaction must be at least 1"
    );
    let topics = args.kafka.topics();
    let codec = args.kafka.codec(&topics)?;
    let rt = tokio::runtime::Handle::current();
    let dlq = topics.dlq(&args.stage);
    let ledger_topic = topics.redrive_ledger();
    let bootstrap = args.kafka.connection()?;
    let mut compact = args.kafka.topic_layout();
    compact.configs.retain(|(k, _)| k != "cleanup.policy");
    compact
        .configs
        .push(("cleanup.policy".into(), "compact".into()));
    pipeline::topics::ensure_topics(&bootstrap, std::slice::from_ref(&ledger_topic), &compact)
        .await?;

    // The transactional producer first: it fences an earlier run that was killed, so the
    // ledger read next holds everything that run committed, and nothing it did not.
    let shutdown = CancellationToken::new();
    let metrics = StageMetrics::new("redrive")?;
    let transactional_id = format!("{}-dlq-redrive-{}", topics.prefix, args.stage);
    let mut txn = if args.dry_run {
        None
    } else {
        let settings = TxnSettings::new(&bootstrap, &transactional_id, Duration::from_secs(60));
        Some(tokio::task::block_in_place(|| {
            Transactions::connect(settings, metrics, &shutdown)
        })?)
    };
    let (done, letters) = tokio::task::block_in_place(|| {
        let done: HashSet<String> =
            pipeline::readback::read_entries(&bootstrap, &ledger_topic, args.timeout)?
                .into_iter()
                .filter(|(_, v)| v.is_some())
                .map(|(k, _)| k)
                .collect();
        let letters = pipeline::readback::read_all(
            &bootstrap,
            std::slice::from_ref(&dlq),
            Some((&codec, &rt)),
            args.timeout,
        )?;
        Ok::<_, pipeline::PipelineError>((done, letters))
    })
    .with_context(|| format!("reading {dlq} and the redrive ledger"))?;

    let mut summary = Summary {
        stage: args.stage.clone(),
        dead_letters: letters.len(),
        ..Summary::default()
    };
    let mut todo: Vec<&Record> = Vec::new();
    for r in &letters {
        let type_ok = args
            .error_type
            .as_deref()
            .is_none_or(|t| header(r, dlq_headers::ERROR_TYPE) == Some(t));
        let batch_ok = args.batch.as_deref().is_none_or(|b| {
            r.event
                .as_ref()
                .is_some_and(|e| e.header.correlation_id == b)
        });
        if !(type_ok && batch_ok) {
            continue;
        }
        summary.chosen += 1;
        if done.contains(&ledger_key(r)) {
            summary.already_redriven += 1;
        } else if header(r, dlq_headers::SOURCE_TOPIC).is_none_or(str::is_empty) {
            summary.without_source += 1;
        } else {
            todo.push(r);
        }
    }

    if let Some(txn) = txn.as_mut() {
        let bar = ProgressBar::new(todo.len() as u64).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} redriven ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        for chunk in todo.chunks(args.per_transaction) {
            tokio::task::block_in_place(|| redrive_chunk(txn, chunk, &ledger_topic))?;
            summary.redriven += chunk.len();
            bar.inc(chunk.len() as u64);
            if bar.is_hidden() {
                // No terminal: one line per committed transaction, for logs.
                eprintln!("redriven {}/{}", summary.redriven, todo.len());
            }
        }
        bar.finish_and_clear();
    }

    if args.json {
        let chosen: Vec<String> = todo.iter().map(|r| ledger_key(r)).collect();
        let mut v = serde_json::to_value(&summary)?;
        if args.dry_run {
            v["would_redrive"] = serde_json::json!(chosen);
        }
        writeln!(out, "{v}")?;
    } else if args.dry_run {
        writeln!(
            out,
            "{} dead letter(s) of {} would be redriven ({} chosen, {} redriven before, {} without a source topic):",
            todo.len(),
            args.stage,
            summary.chosen,
            summary.already_redriven,
            summary.without_source
        )?;
        for r in &todo {
            writeln!(
                out,
                "  {}  {}  -> {}",
                ledger_key(r),
                header(r, dlq_headers::ERROR_TYPE).unwrap_or("-"),
                header(r, dlq_headers::SOURCE_TOPIC).unwrap_or("-")
            )?;
        }
    } else {
        writeln!(
            out,
            "Redrove {} dead letter(s) of {} ({} chosen of {}, {} redriven before, {} without a source topic).",
            summary.redriven,
            args.stage,
            summary.chosen,
            summary.dead_letters,
            summary.already_redriven,
            summary.without_source
        )?;
    }
    if summary.without_source > 0 {
        bail!(
            "{} chosen dead letter(s) do not name their source topic and were left where they are",
            summary.without_source
        );
    }
    Ok(())
}

/// One transaction: each dead letter's copy on its source topic, and its ledger entry.
fn redrive_chunk(
    txn: &mut Transactions,
    chunk: &[&Record],
    ledger_topic: &str,
) -> Result<(), pipeline::PipelineError> {
    txn.begin()?;
    for r in chunk {
        let from = ledger_key(r);
        let source = header(r, dlq_headers::SOURCE_TOPIC).unwrap_or_default();
        let count = (dlq_headers::redrive_count(&r.message) + 1).to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: dlq_headers::REDRIVE_COUNT,
                value: Some(&count),
            })
            .insert(Header {
                key: dlq_headers::REDRIVE_FROM,
                value: Some(&from),
            });
        let mut copy: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(source).headers(headers);
        if let Some(k) = r.message.key() {
            copy = copy.key(k);
        }
        if let Some(p) = r.message.payload() {
            copy = copy.payload(p);
        }
        txn.send(copy)?;
        let entry = serde_json::json!({
            "redriven_to": source,
            "redrive_count": count,
            "at": chrono::Utc::now().to_rfc3339(),
        })
        .to_string();
        txn.send(
            BaseRecord::to(ledger_topic)
                .key(from.as_str())
                .payload(entry.as_str()),
        )?;
    }
    txn.commit(None)
}
