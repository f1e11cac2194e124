//! `medpipe replay`: reprocess a time window of a stage's input in isolation. The batches
//! whose start event falls in the window (`DataIngestionStarted` for anonymization,
//! `AnonymizationStarted` for canonization) are copied whole, every message of theirs in
//! order, from the stage's input topic to the same topic and partition under a fresh
//! prefix. A stage then started on that prefix (`MEDPIPE_TOPIC_PREFIX`, with its own
//! consumer group and state) processes them into that prefix's topics, never into the
//! live ones. Whole batches, so that each closes with counts that add up.
//!
//! The copy is one Kafka transaction per chunk. It refuses a prefix whose input topic
//! already holds messages, so a replay is never mixed with another (or with a half-done
//! copy of itself: start again under a new prefix).

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use pipeline::config::KafkaArgs;
use pipeline::events::Payload;
use pipeline::telemetry::StageMetrics;
use pipeline::topics::TopicKind;
use pipeline::txn::{Transactions, TxnSettings};
use pipeline::Topics;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Where `medpipe.replay.from` says a replayed message came from.
pub const REPLAY_FROM: &str = "medpipe.replay.from";

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The stage to replay: anonymization (its input is the ingestion topic) or
    /// canonization (the anonymization topic). Ingestion reads files: retry its batches
    /// instead (`medpipe batch retry`).
    #[arg(long, value_parser = ["anonymization", "canonization"])]
    pub stage: String,
    /// Start of the window (RFC 3339), inclusive.
    #[arg(long)]
    pub from: chrono::DateTime<chrono::FixedOffset>,
    /// End of the window (RFC 3339), exclusive.
    #[arg(long)]
    pub to: chrono::DateTime<chrono::FixedOffset>,
    /// The fresh topic prefix to replay into.
    #[arg(long)]
    pub prefix: String,
    /// The consumer group the replaying stage should use (default `<prefix>-<stage>`).
    #[arg(long)]
    pub group: Option<String>,
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Serialize)]
pub struct Replayed {
    pub stage: String,
    pub prefix: String,
    pub group: String,
    pub batches: Vec<String>,
    pub messages: usize,
    /// How to run the stage on the replay.
    pub run: String,
}

pub async fn run(args: ReplayArgs, out: &mut impl Write) -> anyhow::Result<()> {
    anyhow::ensure!(args.from < args.to, "--from must be before --to");
    let source = args.kafka.topics();
    anyhow::ensure!(
        args.prefix != source.prefix && !args.prefix.is_empty(),
        "--prefix must be a fresh prefix, not the live one ({})",
        source.prefix
    );
    let (input, start_type) = match args.stage.as_str() {
        "anonymization" => (TopicKind::Ingestion, "DataIngestionStarted"),
        _ => (TopicKind::Anonymization, "AnonymizationStarted"),
    };
    let target = Topics::new(args.prefix.clone());
    let (from_topic, to_topic) = (source.name(input), target.name(input));
    let bootstrap = args.kafka.connection()?;
    pipeline::topics::ensure_topics(&bootstrap, &target.all(), &args.kafka.topic_layout()).await?;
    let codec = args.kafka.codec(&source)?;
    let rt = tokio::runtime::Handle::current();
    let (existing, records) = tokio::task::block_in_place(|| {
        let existing = pipeline::readback::read_all(
            &bootstrap,
            std::slice::from_ref(&to_topic),
            None,
            args.timeout,
        )?
        .len();
        let records = pipeline::readback::read_all(
            &bootstrap,
            std::slice::from_ref(&from_topic),
            Some((&codec, &rt)),
            args.timeout,
        )?;
        Ok::<_, pipeline::PipelineError>((existing, records))
    })
    .with_context(|| format!("reading {from_topic}"))?;
    if existing > 0 {
        bail!("{to_topic} already holds {existing} message(s): replay under a fresh prefix");
    }
    let (from, to) = (args.from.timestamp_micros(), args.to.timestamp_micros());
    let batches: BTreeSet<String> = records
        .iter()
        .filter_map(|r| r.event.as_ref())
        .filter(|e| e.event_type() == start_type)
        .filter(|e| (from..to).contains(&e.header.occurred_at))
        .map(|e| e.header.correlation_id.clone())
        .collect();
    let mut chosen: Vec<&pipeline::readback::Record> = records
        .iter()
        .filter(|r| {
            r.event.as_ref().is_some_and(|e| {
                batches.contains(&e.header.correlation_id)
                    && !matches!(e.payload, Payload::BatchHeld(_))
            })
        })
        .collect();
    chosen.sort_by_key(|r| (r.message.partition(), r.message.offset()));

    let group = args
        .group
        .clone()
        .unwrap_or_else(|| format!("{}-{}", args.prefix, args.stage));
    if !chosen.is_empty() {
        let shutdown = CancellationToken::new();
        let settings = TxnSettings::new(
            &bootstrap,
            &format!("{}-replay-{}", args.prefix, args.stage),
            Duration::from_secs(60),
        );
        let metrics = StageMetrics::new("replay")?;
        let mut txn =
            tokio::task::block_in_place(|| Transactions::connect(settings, metrics, &shutdown))?;
        let bar = ProgressBar::new(chosen.len() as u64).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} copied ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        for chunk in chosen.chunks(1000) {
            tokio::task::block_in_place(|| {
                txn.begin()?;
                for r in chunk {
                    let m = &r.message;
                    let origin = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
                    let headers = OwnedHeaders::new().insert(Header {
                        key: REPLAY_FROM,
                        value: Some(&origin),
                    });
                    let mut copy: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&to_topic)
                        .partition(m.partition())
                        .headers(headers);
                    if let Some(k) = m.key() {
                        copy = copy.key(k);
                    }
                    if let Some(p) = m.payload() {
                        copy = copy.payload(p);
                    }
                    txn.send(copy)?;
                }
                txn.commit(None)
            })?;
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
    }
    let replayed = Replayed {
        stage: args.stage.clone(),
        prefix: args.prefix.clone(),
        group: group.clone(),
        batches: batches.into_iter().collect(),
        messages: chosen.len(),
        run: format!(
            "MEDPIPE_TOPIC_PREFIX={} MEDPIPE_GROUP_ID={group} medpipe-{}",
            args.prefix, args.stage
        ),
    };
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&replayed)?)?;
    } else {
        writeln!(
            out,
            "Copied {} message(s) of {} batch(es) from {from_topic} to {to_topic}.\nRun the stage on them with:\n  {}",
            replayed.messages,
            replayed.batches.len(),
            replayed.run
        )?;
    }
    Ok(())
}
