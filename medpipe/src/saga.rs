//! `medpipe batch retry`, `release` and `withdraw`: an operator's request is an event on
//! the saga topic (`BatchRetryRequested`, `BatchReleaseRequested`,
//! `BatchWithdrawalRequested`), which the stage that owns the step carries out, once per
//! request, and answers with an event of its own. There is no orchestrator: the CLI only
//! asks, then (with `--wait`) reads the answer back from the topics.
//!
//! - A retry: ingestion re-reads the batch's file from its encrypted archive as a new
//!   batch and answers `BatchRetried` (old and new batch ids), or refuses with
//!   `DataIngestionRejected` whose `command_id` is the request id.
//! - A release: the same, but the new batch is accepted partial (no failure threshold
//!   fails it, its canonical records are tagged `partial`), and canonization answers
//!   `BatchReleased` when it completes.
//! - A withdrawal: canonization withdraws every canonical record of the batch it
//!   published and answers `CanonicalBatchWithdrawn`, caused by the request.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use pipeline::config::KafkaArgs;
use pipeline::events::{
    BatchReleaseRequested, BatchReprocessRequested, BatchRetryRequested, BatchWithdrawalRequested,
    Payload,
};
use pipeline::topics::TopicKind;
use pipeline::Event;
use serde::Serialize;

pub const SERVICE: &str = "medpipe-cli";

/// What an operator's request says, besides the batch.
#[derive(clap::Args, Debug)]
pub struct RequestArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The batch id (a UUID).
    pub batch: String,
    /// Why, in your words. Sealed in the audit trail; never put on a data topic.
    #[arg(long)]
    pub reason: String,
    #[arg(long, env = "USER", default_value = "medpipe-cli")]
    pub requested_by: String,
    /// Send this request id instead of a new one: the stage carries a request out once,
    /// so re-sending one whose answer you missed is safe.
    #[arg(long)]
    pub request_id: Option<uuid::Uuid>,
    /// Wait this long for the stage's answer (0 to only send the request).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Retry,
    Release,
    Withdraw,
    /// Under a policy version and/or concept maps (`id@version`, comma-separated).
    Reprocess {
        policy: Option<String>,
        concept_maps: Option<String>,
    },
}

/// The stage's answer, as printed.
#[derive(Debug, Serialize)]
pub struct Answer {
    pub batch: String,
    pub request_id: String,
    /// `sent` (not waited for), `retried`, `withdrawn` or `refused`.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_batch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records_withdrawn: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records_kept: Option<i64>,
    /// Why a request was refused: a kind and ids, never values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

pub async fn run(kind: Request, args: RequestArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let batch = uuid::Uuid::parse_str(&args.batch)
        .with_context(|| format!("{:?} is not a batch id (a UUID)", args.batch))?
        .to_string();
    let request_id = args
        .request_id
        .unwrap_or_else(uuid::Uuid::new_v4)
        .to_string();
    let topics = args.kafka.topics();
    let codec = args.kafka.codec(&topics)?;
    let payload = match &kind {
        Request::Reprocess {
            policy,
            concept_maps,
        } => {
            anyhow::ensure!(
                policy.is_some() || concept_maps.is_some(),
                "name the policy version (--policy) or the concept maps (--concept-maps) to reprocess under"
            );
            Payload::BatchReprocessRequested(BatchReprocessRequested {
                batch_id: batch.clone(),
                request_id: request_id.clone(),
                requested_by: args.requested_by.clone(),
                reason: args.reason.clone(),
                policy_version: policy.clone(),
                concept_map_version: concept_maps.clone(),
            })
        }
        Request::Retry => Payload::BatchRetryRequested(BatchRetryRequested {
            batch_id: batch.clone(),
            request_id: request_id.clone(),
            requested_by: args.requested_by.clone(),
            reason: args.reason.clone(),
        }),
        Request::Release => Payload::BatchReleaseRequested(BatchReleaseRequested {
            batch_id: batch.clone(),
            request_id: request_id.clone(),
            requested_by: args.requested_by.clone(),
            reason: args.reason.clone(),
        }),
        Request::Withdraw => Payload::BatchWithdrawalRequested(BatchWithdrawalRequested {
            batch_id: batch.clone(),
            request_id: request_id.clone(),
            requested_by: args.requested_by.clone(),
            reason: args.reason.clone(),
        }),
    };
    let event = Event::new(SERVICE, &batch, None, payload);
    send(&args.kafka, &codec, &event).await?;
    let mut answer = Answer {
        batch: batch.clone(),
        request_id: request_id.clone(),
        outcome: "sent",
        new_batch: None,
        records_withdrawn: None,
        records_kept: None,
        refusal: None,
        note: None,
    };
    if !args.wait.is_zero() {
        answer = wait_for_answer(&args.kafka, &codec, &kind, &event, answer, args.wait).await?;
    }
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&answer)?)?;
    } else {
        match answer.outcome {
            "sent" => writeln!(out, "Request {request_id} sent for batch {batch}.")?,
            "retried" => writeln!(
                out,
                "Batch {batch} is being retried as batch {} (request {request_id}).",
                answer.new_batch.as_deref().unwrap_or("?")
            )?,
            "reprocessing" => writeln!(
                out,
                "Batch {batch} is being reprocessed as batch {} (request {request_id}); its canonical records get new versions, tagged reprocessed.",
                answer.new_batch.as_deref().unwrap_or("?")
            )?,
            "releasing" => writeln!(
                out,
                "Batch {batch} is being released as partial batch {} (request {request_id}); `medpipe batch status` follows it.",
                answer.new_batch.as_deref().unwrap_or("?")
            )?,
            "withdrawn" => writeln!(
                out,
                "Batch {batch} withdrawn: {} canonical records withdrawn, {} kept (patients and shared resources).",
                answer.records_withdrawn.unwrap_or(0),
                answer.records_kept.unwrap_or(0)
            )?,
            _ => writeln!(
                out,
                "Request {request_id} for batch {batch} was refused: {}.",
                answer.refusal.as_deref().unwrap_or("no reason given")
            )?,
        }
    }
    if answer.outcome == "refused" {
        bail!("the request was refused");
    }
    Ok(())
}

async fn send(kafka: &KafkaArgs, codec: &pipeline::Codec, event: &Event) -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let bytes = codec.encode(event).await?;
    let producer: FutureProducer = pipeline::kafka::producer_config(&kafka.connection()?)
        .set("enable.idempotence", "true")
        .create()?;
    let topic = kafka.topics().name(TopicKind::Saga);
    producer
        .send(
            FutureRecord::to(&topic)
                .key(event.header.correlation_id.as_str())
                .payload(&bytes),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .context("cannot send the request")?;
    Ok(())
}

/// Reads the topics back until the stage's answer to `request` is committed.
async fn wait_for_answer(
    kafka: &KafkaArgs,
    codec: &pipeline::Codec,
    kind: &Request,
    request: &Event,
    mut answer: Answer,
    wait: Duration,
) -> anyhow::Result<Answer> {
    let topics = kafka.topics();
    let names: Vec<String> = [
        TopicKind::Saga,
        TopicKind::Ingestion,
        TopicKind::Canonization,
    ]
    .into_iter()
    .map(|k| topics.name(k))
    .collect();
    let spinner = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spinner.set_message(match kind {
        Request::Retry | Request::Release | Request::Reprocess { .. } => {
            "waiting for ingestion to start the new attempt"
        }
        Request::Withdraw => "waiting for canonization to withdraw the batch",
    });
    spinner.enable_steady_tick(Duration::from_millis(200));
    let rt = tokio::runtime::Handle::current();
    let deadline = Instant::now() + wait;
    let request_event = request.header.event_id.as_str();
    loop {
        let records = tokio::task::block_in_place(|| {
            pipeline::readback::read_all(
                &kafka.connection()?,
                &names,
                Some((codec, &rt)),
                Duration::from_secs(60),
            )
        })?;
        for ev in records.iter().filter_map(|r| r.event.as_ref()) {
            match (&ev.payload, kind) {
                (
                    Payload::BatchRetried(r),
                    Request::Retry | Request::Release | Request::Reprocess { .. },
                ) if r.request_id == answer.request_id => {
                    answer.outcome = match r.mode.as_str() {
                        "release" => "releasing",
                        "reprocess" => "reprocessing",
                        _ => "retried",
                    };
                    answer.new_batch = Some(r.new_batch_id.clone());
                }
                (
                    Payload::DataIngestionRejected(r),
                    Request::Retry | Request::Release | Request::Reprocess { .. },
                ) if r.command_id.as_deref() == Some(answer.request_id.as_str()) => {
                    answer.outcome = "refused";
                    answer.refusal = Some(format!("{}: {}", r.reason, r.detail));
                }
                (Payload::CanonicalBatchWithdrawn(w), Request::Withdraw)
                    if w.batch_id == answer.batch =>
                {
                    // Ours, or an earlier withdrawal that made ours a no-op.
                    answer.outcome = "withdrawn";
                    answer.records_withdrawn = Some(w.records_withdrawn);
                    answer.records_kept = Some(w.records_kept);
                    if ev.header.causation_id.as_deref() != Some(request_event) {
                        answer.note = Some("withdrawn before this request".into());
                    }
                }
                _ => {}
            }
        }
        if answer.outcome != "sent" {
            spinner.finish_and_clear();
            return Ok(answer);
        }
        if Instant::now() >= deadline {
            spinner.finish_and_clear();
            bail!(
                "no answer to request {} within {wait:?}; the request stays on the saga topic and is carried out once its stage runs",
                answer.request_id
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
