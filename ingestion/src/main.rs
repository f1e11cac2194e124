//! medpipe-ingestion: claims landing files and emits their records, exactly once.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ingestion::{Folders, IngestConfig, Ingestor};
use pipeline::config::{parse_secret, KafkaArgs, KeySource, TelemetryArgs};
use pipeline::crypto::Secret;
use pipeline::telemetry::StageMetrics;

#[derive(Parser, Debug)]
#[command(
    name = "medpipe-ingestion",
    version,
    about = "Claims batch files and emits their records."
)]
struct Args {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    /// Holds landing/, processing/, archive/ and quarantine/.
    #[arg(
        long,
        env = "MEDPIPE_INGESTION_DIR",
        default_value = "./medpipe-data/ingestion"
    )]
    data_dir: PathBuf,
    #[arg(long, env = "MEDPIPE_INSTANCE_ID", default_value = "0")]
    instance_id: String,
    #[arg(long, env = "MEDPIPE_POLL_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    #[arg(long, env = "MEDPIPE_TRANSACTION_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    transaction_timeout: Duration,
    #[arg(long, env = "MEDPIPE_MASTER_KEY_ID", default_value = "master-1")]
    master_key_id: String,
    /// Master key that wraps each batch's data key (64 hex characters).
    #[arg(long, env = "MEDPIPE_MASTER_KEY", value_parser = parse_secret, hide_env_values = true)]
    master_key: Option<Secret<String>>,
    #[arg(long, env = "MEDPIPE_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pipeline::telemetry::init_tracing(args.telemetry.log_format);
    let master = KeySource {
        id: args.master_key_id,
        hex: args.master_key,
        file: args.master_key_file,
    }
    .load("--master-key")?;
    let shutdown = pipeline::shutdown::on_signals();
    let codec = pipeline::stage::prepare(&args.kafka, Duration::from_secs(60)).await?;
    let metrics = StageMetrics::new("ingestion")?;
    pipeline::stage::serve_metrics(&args.telemetry, 9101, &metrics, &shutdown).await?;
    let config = IngestConfig {
        bootstrap_servers: args.kafka.bootstrap_servers.clone(),
        transactional_id: format!("{}-ingestion-{}", args.kafka.topic_prefix, args.instance_id),
        topics: args.kafka.topics(),
        folders: Folders::under(&args.data_dir),
        poll_interval: args.poll_interval,
        transaction_timeout: args.transaction_timeout,
    };
    Ingestor::run(config, codec, master, metrics, shutdown)
        .await
        .context("ingestion stage failed")
}
