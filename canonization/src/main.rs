//! medpipe-canonization: maps anonymized records to canonical topics, exactly once.

use anyhow::Context;
use clap::Parser;
use pipeline::stage::{run_stage, CommonArgs};
use pipeline::topics::TopicKind;

#[derive(Parser, Debug)]
#[command(
    name = "medpipe-canonization",
    version,
    about = "Maps anonymized records to the canonical model."
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pipeline::telemetry::init_tracing(args.common.telemetry.log_format);
    let input = vec![args.common.kafka.topics().name(TopicKind::Anonymization)];
    run_stage(canonization::Canonizer, input, &args.common, 9103)
        .await
        .context("canonization stage failed")
}
