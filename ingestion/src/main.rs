//! medpipe-ingestion: claims landing files and emits their records, exactly once.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ingestion::{Folders, IngestConfig, Ingestor};
use pipeline::config::{KafkaArgs, MasterKeyArgs, TelemetryArgs};

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
    #[command(flatten)]
    master: MasterKeyArgs,
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pipeline::telemetry::init_tracing(args.telemetry.log_format);
    let master = args.master.load()?;
    let svc =
        pipeline::stage::start_service("ingestion", &args.kafka, &args.telemetry, 9101).await?;
    let config = IngestConfig {
        bootstrap_servers: args.kafka.bootstrap_servers.clone(),
        transactional_id: format!("{}-ingestion-{}", args.kafka.topic_prefix, args.instance_id),
        topics: args.kafka.topics(),
        folders: Folders::under(&args.data_dir),
        poll_interval: args.poll_interval,
        transaction_timeout: args.transaction_timeout,
    };
    Ingestor::run(config, svc.codec, master, svc.metrics, svc.shutdown)
        .await
        .context("ingestion stage failed")
}
