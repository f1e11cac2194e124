//! The auditing stage: records every event on every pipeline topic in a hash-chained,
//! append-only log. The log is the source of truth for what was consumed: each entry
//! records its (topic, partition, offset), so redelivery after a crash is skipped and
//! Kafka's committed offsets are only a starting hint.

pub mod chain;
pub mod merkle;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipeline::crypto::sha256_hex;
use pipeline::error::kafka_err;
use pipeline::runner::dlq_headers;
use pipeline::telemetry::StageMetrics;
use pipeline::topics::TopicKind;
use pipeline::{Codec, PipelineError, Topics};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::chain::{ChainStore, NewEntry};

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub bootstrap_servers: String,
    pub group_id: String,
    pub topics: Topics,
    pub audit_dir: PathBuf,
    pub batch_max_messages: usize,
    pub batch_max_wait: Duration,
}

/// Builds the entry for one message. Undecodable messages (dead letters, poison) are
/// still recorded, with what the headers say.
pub fn entry_for(msg: &OwnedMessage, decoded: Option<&pipeline::Event>) -> NewEntry {
    let digest = sha256_hex(msg.payload().unwrap_or_default());
    match decoded {
        Some(ev) => NewEntry {
            topic: msg.topic().to_string(),
            partition: msg.partition(),
            offset: msg.offset(),
            event_id: Some(ev.header.event_id.clone()),
            event_type: ev.header.event_type.clone(),
            correlation_id: Some(ev.header.correlation_id.clone()),
            causation_id: ev.header.causation_id.clone(),
            source_service: Some(ev.header.source_service.clone()),
            occurred_at: Some(ev.header.occurred_at),
            digest_sha256: digest,
        },
        None => {
            let stage = header(msg, dlq_headers::STAGE);
            NewEntry {
                topic: msg.topic().to_string(),
                partition: msg.partition(),
                offset: msg.offset(),
                event_id: None,
                event_type: if stage.is_some() {
                    "DeadLetter".into()
                } else {
                    "Undecodable".into()
                },
                correlation_id: None,
                causation_id: None,
                source_service: stage.map(|s| format!("medpipe-{s}")),
                occurred_at: None,
                digest_sha256: digest,
            }
        }
    }
}

fn header(msg: &OwnedMessage, name: &str) -> Option<String> {
    let hs = msg.headers()?;
    hs.iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Runs the audit loop on a blocking thread until shutdown.
pub async fn run(
    config: AuditConfig,
    codec: Arc<Codec>,
    metrics: StageMetrics,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    let rt = Handle::current();
    tokio::task::spawn_blocking(move || run_blocking(config, codec, metrics, rt, shutdown))
        .await
        .map_err(|e| PipelineError::Config(format!("audit thread failed: {e}")))?
}

fn run_blocking(
    config: AuditConfig,
    codec: Arc<Codec>,
    metrics: StageMetrics,
    rt: Handle,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    let chain_err = |e: chain::ChainError| PipelineError::Config(e.to_string());
    let mut store = ChainStore::open(&config.audit_dir).map_err(chain_err)?;
    let own_topic = config.topics.name(TopicKind::Audit);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap_servers)
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("fetch.wait.max.ms", "10")
        .set("queued.max.messages.kbytes", "16384")
        .set("topic.metadata.refresh.interval.ms", "2000")
        .create()
        .map_err(kafka_err("create consumer"))?;
    consumer
        .subscribe(&[&config.topics.all_regex()])
        .map_err(kafka_err("subscribe"))?;
    metrics.set_ready(true);
    info!(entries = store.len(), pattern = %config.topics.all_regex(), "Auditing started.");
    while !shutdown.is_cancelled() {
        let deadline = Instant::now() + config.batch_max_wait;
        let mut batch = Vec::new();
        while batch.len() < config.batch_max_messages && Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => batch.push(m.detach()),
                Some(Err(e)) => warn!(error = %e, "Consumer error; continuing."),
                None => {
                    if !batch.is_empty() {
                        break;
                    }
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        let mut entries = Vec::with_capacity(batch.len());
        let mut offsets = TopicPartitionList::new();
        for m in &batch {
            offsets
                .add_partition_offset(m.topic(), m.partition(), Offset::Offset(m.offset() + 1))
                .map_err(kafka_err("offsets"))?;
            if m.topic() == own_topic || store.contains(m.topic(), m.partition(), m.offset()) {
                continue;
            }
            let decoded = match m.payload() {
                Some(b) if !config.topics.is_dlq(m.topic()) => match rt.block_on(codec.decode(b)) {
                    Ok(ev) => Some(ev),
                    Err(e) if e.class() == pipeline::ErrorClass::Retry => return Err(e),
                    Err(_) => None,
                },
                _ => None,
            };
            let e = entry_for(m, decoded.as_ref());
            metrics
                .events_in
                .with_label_values(&[e.event_type.as_str()])
                .inc();
            entries.push(e);
        }
        let now = chrono::Utc::now().timestamp_micros();
        let added = store.append(entries, now).map_err(chain_err)?;
        metrics
            .events_out
            .with_label_values(&["AuditEntry"])
            .inc_by(added as u64);
        // The chain is durable now; the commit only saves re-reading on restart.
        if let Err(e) = consumer.commit(&offsets, CommitMode::Async) {
            warn!(error = %e, "Offset commit failed; entries are deduplicated on restart.");
        }
    }
    info!(entries = store.len(), "Auditing stopped cleanly.");
    Ok(())
}
