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
    /// A directory whose fhir.toml, fhir-r4-structure.json, synthea.toml or hl7v2.toml
    /// replace the built-in mapping tables of the same name (the others stay built in).
    #[arg(long, env = "MEDPIPE_MAPPING_DIR")]
    mapping_dir: Option<PathBuf>,
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
    let tables = canonization::mapping::Tables::load(args.mapping_dir.as_deref())?;
    let stage = canonization::Canonizer::new(
        maps,
        tables,
        args.max_failure_ratio,
        args.common.runner.batch_close_timeout,
    )?;
    tracing::info!(concept_maps = stage.maps_version(), "Concept maps loaded.");
    let input = vec![args.common.kafka.topics().name(TopicKind::Anonymization)];
    run_stage(stage, input, &args.common, 9103)
        .await
        .context("canonization stage failed")
}
