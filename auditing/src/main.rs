//! medpipe-auditing: appends every pipeline event to a hash-chained audit log.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use pipeline::config::{KafkaArgs, TelemetryArgs};

#[derive(Parser, Debug)]
#[command(
    name = "medpipe-auditing",
    version,
    about = "Records every pipeline event in a hash-chained log."
)]
struct Args {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    #[arg(
        long,
        env = "MEDPIPE_AUDIT_DIR",
        default_value = "./medpipe-data/audit"
    )]
    audit_dir: PathBuf,
    #[arg(long, env = "MEDPIPE_GROUP_ID")]
    group_id: Option<String>,
    #[arg(long, env = "MEDPIPE_BATCH_MAX_MESSAGES", default_value_t = 500)]
    batch_max_messages: usize,
    #[arg(long, env = "MEDPIPE_BATCH_MAX_WAIT", default_value = "200ms", value_parser = humantime::parse_duration)]
    batch_max_wait: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pipeline::telemetry::init_tracing(args.telemetry.log_format);
    let svc =
        pipeline::stage::start_service("auditing", &args.kafka, &args.telemetry, 9104).await?;
    let config = auditing::AuditConfig {
        bootstrap_servers: args.kafka.bootstrap_servers.clone(),
        group_id: args
            .group_id
            .unwrap_or_else(|| format!("{}-auditing", args.kafka.topic_prefix)),
        topics: args.kafka.topics(),
        audit_dir: args.audit_dir,
        batch_max_messages: args.batch_max_messages,
        batch_max_wait: args.batch_max_wait,
    };
    auditing::run(config, svc.codec, svc.metrics, svc.shutdown)
        .await
        .context("auditing stage failed")
}
