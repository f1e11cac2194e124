//! medpipe-canonization: maps anonymized records to canonical topics, exactly once.

/// mimalloc instead of glibc's malloc: the stages allocate many small, short-lived
/// values per record (JSON trees, Avro values), and glibc's allocator took about 40% of
/// the de-identification engine's time (BENCHMARKS.md, "The allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// How long a completed batch's canonical records are remembered so that an operator
    /// can withdraw the batch (`medpipe batch withdraw`).
    #[arg(long, env = "MEDPIPE_WITHDRAW_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    withdraw_retention: std::time::Duration,
    /// At most this many records of a withdrawn batch per transaction: a large batch is
    /// withdrawn over several transactions, each all or nothing.
    #[arg(long, env = "MEDPIPE_WITHDRAW_PER_TXN", default_value_t = 5_000)]
    withdraw_per_txn: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // First, so a SIGTERM during start-up stops the stage cleanly (see pipeline::shutdown).
    let _ = pipeline::shutdown::on_signals();
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
    )?
    .with_withdraw_retention(args.withdraw_retention)
    .with_withdraw_per_txn(args.withdraw_per_txn);
    tracing::info!(concept_maps = stage.maps_version(), "Concept maps loaded.");
    // Operators' withdrawal requests come on the saga topic.
    let topics = args.common.kafka.topics();
    let input = vec![
        topics.name(TopicKind::Anonymization),
        topics.name(TopicKind::Saga),
    ];
    run_stage(stage, input, &args.common, 9103)
        .await
        .context("canonization stage failed")
}
