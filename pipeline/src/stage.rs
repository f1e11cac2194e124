//! Start-up shared by the Kafka-fed stage binaries: config, schemas, topics, metrics
//! endpoint, then the transactional runner.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::codec::Codec;
use crate::config::{KafkaArgs, RunnerArgs, TelemetryArgs};
use crate::error::PipelineError;
use crate::runner::{self, RunnerConfig, Stage};
use crate::telemetry::{self, StageMetrics};
use crate::topics;

/// The flags every stage binary shares.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub runner: RunnerArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Connects to the registry, registers every schema and creates missing topics.
/// Retries for up to `wait` so a stage started alongside the stack does not fail at once,
/// but stops at once when the registry refuses its credentials: waiting cannot fix that.
pub async fn prepare(kafka: &KafkaArgs, wait: Duration) -> Result<Arc<Codec>, PipelineError> {
    kafka.validate()?;
    let topics = kafka.topics();
    let codec = kafka.codec(&topics)?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match codec.register_all().await {
            Ok(()) => break,
            Err(e @ PipelineError::SchemaRegistryAuth { .. }) => return Err(e),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, registry = %kafka.schema_registry_url, "Schema Registry not ready; retrying.");
                codec.clear_cached_errors();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
    let connection = kafka.connection()?;
    {
        let connection = connection.clone();
        tokio::task::spawn_blocking(move || crate::kafka::check_credentials(&connection, wait))
            .await
            .map_err(|e| PipelineError::Thread(e.to_string()))??;
    }
    topics::ensure_topics(&connection, &topics.all(), &kafka.topic_layout()).await?;
    // Internal state: the ingestion ledger and the stages' state topics, compacted.
    let mut compact = kafka.topic_layout();
    compact.configs.retain(|(k, _)| k != "cleanup.policy");
    compact
        .configs
        .push(("cleanup.policy".into(), "compact".into()));
    let internal = topics.internal();
    topics::ensure_topics(&connection, &internal, &compact).await?;
    Ok(Arc::new(codec))
}

/// Starts the metrics endpoint, with the stage's own `routes` beside it, on the
/// configured address, or on 127.0.0.1:`default_port`.
pub async fn serve_metrics(
    telemetry_args: &TelemetryArgs,
    default_port: u16,
    metrics: &StageMetrics,
    routes: Router,
    shutdown: &CancellationToken,
) -> Result<SocketAddr, PipelineError> {
    let addr = telemetry_args
        .metrics_addr
        .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::LOCALHOST, default_port)));
    telemetry::serve_with(addr, metrics.clone(), routes, shutdown.clone()).await
}

/// What a service needs once it is connected: the codec, its metrics (already served),
/// and the shutdown token.
pub struct Service {
    pub codec: Arc<Codec>,
    pub metrics: StageMetrics,
    pub shutdown: CancellationToken,
}

/// The start-up every binary shares: signals, registry and topics, metrics endpoint.
pub async fn start_service(
    name: &str,
    kafka: &KafkaArgs,
    telemetry_args: &TelemetryArgs,
    default_metrics_port: u16,
) -> Result<Service, PipelineError> {
    start_service_with(
        name,
        kafka,
        telemetry_args,
        default_metrics_port,
        Router::new(),
    )
    .await
}

/// [`start_service`] for a stage that serves `routes` of its own beside /metrics.
pub async fn start_service_with(
    name: &str,
    kafka: &KafkaArgs,
    telemetry_args: &TelemetryArgs,
    default_metrics_port: u16,
    routes: Router,
) -> Result<Service, PipelineError> {
    let shutdown = crate::shutdown::on_signals();
    let codec = prepare(kafka, Duration::from_secs(60)).await?;
    let metrics = StageMetrics::new(name)?;
    serve_metrics(
        telemetry_args,
        default_metrics_port,
        &metrics,
        routes,
        &shutdown,
    )
    .await?;
    Ok(Service {
        codec,
        metrics,
        shutdown,
    })
}

/// Runs a Kafka-fed stage end to end: prepare, serve metrics, run the runner.
pub async fn run_stage<S: Stage>(
    mut stage: S,
    input_topics: Vec<String>,
    args: &CommonArgs,
    default_metrics_port: u16,
) -> Result<(), PipelineError> {
    args.runner.validate()?;
    let name = stage.name();
    let Service {
        codec,
        metrics,
        shutdown,
    } = start_service(name, &args.kafka, &args.telemetry, default_metrics_port).await?;
    stage.register_metrics(&metrics.registry)?;
    let prefix = &args.kafka.topic_prefix;
    let config = RunnerConfig {
        kafka: args.kafka.connection()?,
        group_id: args
            .runner
            .group_id
            .clone()
            .unwrap_or_else(|| format!("{prefix}-{name}")),
        transactional_id: format!("{prefix}-{name}-{}", args.runner.instance_id),
        input_topics,
        topics: args.kafka.topics(),
        batch_max_messages: args.runner.batch_max_messages,
        batch_max_wait: args.runner.batch_max_wait,
        transaction_timeout: args.runner.transaction_timeout,
        queued_max_kbytes: args.runner.queued_max_kbytes,
    };
    runner::run(stage, config, codec, metrics, shutdown).await
}
