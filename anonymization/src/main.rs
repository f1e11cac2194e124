//! medpipe-anonymization: de-identifies ingested records, exactly once.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use pipeline::config::{parse_secret, KeySource, MasterKeyArgs};
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
    #[command(flatten)]
    master: MasterKeyArgs,
    #[arg(long, env = "MEDPIPE_PSEUDONYM_KEY_ID", default_value = "pseudonym-1")]
    pseudonym_key_id: String,
    /// HMAC key for patient pseudonyms (64 hex characters).
    #[arg(long, env = "MEDPIPE_PSEUDONYM_KEY", value_parser = parse_secret, hide_env_values = true)]
    pseudonym_key: Option<Secret<String>>,
    #[arg(long, env = "MEDPIPE_PSEUDONYM_KEY_FILE")]
    pseudonym_key_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pipeline::telemetry::init_tracing(args.common.telemetry.log_format);
    let master = args.master.load()?;
    let pseudonym = KeySource {
        id: args.pseudonym_key_id,
        hex: args.pseudonym_key,
        file: args.pseudonym_key_file,
    }
    .load("--pseudonym-key")?;
    let stage = anonymization::Anonymizer::new(master, pseudonym);
    let input = vec![args.common.kafka.topics().name(TopicKind::Ingestion)];
    run_stage(stage, input, &args.common, 9102)
        .await
        .context("anonymization stage failed")
}
