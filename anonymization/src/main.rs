//! medpipe-anonymization: de-identifies ingested records, exactly once.

use anyhow::Context;
use clap::Parser;
use pipeline::config::{parse_secret, KeySource};
use pipeline::crypto::Secret;
use pipeline::stage::{run_stage, CommonArgs};
use pipeline::topics::TopicKind;

#[derive(Parser, Debug)]
#[command(
    name = "medpipe-anonymization",
    version,
    about = "De-identifies ingested records."
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[arg(long, env = "MEDPIPE_MASTER_KEY_ID", default_value = "master-1")]
    master_key_id: String,
    /// Master key that unwraps ingestion's per-batch data keys (64 hex characters).
    #[arg(long, env = "MEDPIPE_MASTER_KEY", value_parser = parse_secret, hide_env_values = true)]
    master_key: Option<Secret<String>>,
    #[arg(long, env = "MEDPIPE_MASTER_KEY_FILE")]
    master_key_file: Option<std::path::PathBuf>,
    #[arg(long, env = "MEDPIPE_PSEUDONYM_KEY_ID", default_value = "pseudonym-1")]
    pseudonym_key_id: String,
    /// HMAC key for patient pseudonyms (64 hex characters).
    #[arg(long, env = "MEDPIPE_PSEUDONYM_KEY", value_parser = parse_secret, hide_env_values = true)]
    pseudonym_key: Option<Secret<String>>,
    #[arg(long, env = "MEDPIPE_PSEUDONYM_KEY_FILE")]
    pseudonym_key_file: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pipeline::telemetry::init_tracing(args.common.telemetry.log_format);
    let master = KeySource {
        id: args.master_key_id,
        hex: args.master_key,
        file: args.master_key_file,
    }
    .load("--master-key")?;
    let pseudonym = KeySource {
        id: args.pseudonym_key_id,
        hex: args.pseudonym_key,
        file: args.pseudonym_key_file,
    }
    .load("--pseudonym-key")?;
    let stage = anonymization::Anonymizer::new(master, pseudonym);
    let input = vec![args.common.kafka.topics().name(TopicKind::Ingestion)];
    let shutdown = pipeline::shutdown::on_signals();
    run_stage(stage, input, &args.common, 9102, shutdown)
        .await
        .context("anonymization stage failed")
}
