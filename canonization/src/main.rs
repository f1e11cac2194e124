//! medpipe-canonization: maps anonymized records to canonical topics, exactly once.

use std::path::PathBuf;

use anyhow::Context;
use canonization::concept_map::ConceptMaps;
use clap::Parser;
use pipeline::stage::{run_stage, CommonArgs};
use pipeline::topics::TopicKind;

#[derive(Parser, Debug)]
#[command(
    name = "medpipe-canonization",
    version,
    about = "Maps anonymized records to canonical FHIR R4 records on per-resource topics."
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// A directory of concept-map TOML files to use instead of the shipped starter maps.
    #[arg(long, env = "MEDPIPE_CONCEPT_MAP_DIR")]
    concept_map_dir: Option<PathBuf>,
    /// Past this share of dead-lettered records, a batch ends in CanonizationFailed.
    #[arg(long, env = "MEDPIPE_MAX_FAILURE_RATIO", default_value_t = 0.05)]
    max_failure_ratio: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pipeline::telemetry::init_tracing(args.common.telemetry.log_format);
    let maps = match &args.concept_map_dir {
        Some(dir) => ConceptMaps::load_dir(dir),
        None => ConceptMaps::load_embedded(),
    }
    .context("cannot load the concept maps")?;
    canonization::units::embedded_table().context("the unit table is invalid")?;
    let stage = canonization::Canonizer::new(
        maps,
        args.max_failure_ratio,
        args.common.runner.batch_close_timeout,
    )?;
    tracing::info!(concept_maps = stage.maps_version(), "Concept maps loaded.");
    let input = vec![args.common.kafka.topics().name(TopicKind::Anonymization)];
    run_stage(stage, input, &args.common, 9103)
        .await
        .context("canonization stage failed")
}
