//! medpipe-auditing: appends every pipeline event to the hash-chained audit store, signs
//! checkpoints, runs the compliance monitors and publishes on the audit topic.

/// mimalloc instead of glibc's malloc: the stages allocate many small, short-lived
/// values per record (JSON trees, Avro values), and glibc's allocator took about 40% of
/// the de-identification engine's time (BENCHMARKS.md, "The allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use pipeline::config::{AuditKeyArgs, KafkaArgs, TelemetryArgs};

#[derive(Parser, Debug)]
#[command(
    name = "medpipe-auditing",
    version,
    about = "Records every pipeline event in a tamper-evident, encrypted audit trail."
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
    #[arg(long, env = "MEDPIPE_TRANSACTIONAL_ID")]
    transactional_id: Option<String>,
    #[arg(long, env = "MEDPIPE_BATCH_MAX_MESSAGES", default_value_t = 5000)]
    batch_max_messages: usize,
    #[arg(long, env = "MEDPIPE_BATCH_MAX_WAIT", default_value = "200ms", value_parser = humantime::parse_duration)]
    batch_max_wait: Duration,
    #[arg(long, env = "MEDPIPE_TRANSACTION_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    transaction_timeout: Duration,
    /// Entries per segment file (a segment may run over by up to one batch).
    #[arg(long, env = "MEDPIPE_AUDIT_SEGMENT_ENTRIES", default_value_t = 65_536)]
    segment_entries: u64,
    /// Sign a checkpoint after this many new entries...
    #[arg(long, env = "MEDPIPE_AUDIT_CHECKPOINT_ENTRIES", default_value_t = 1000)]
    checkpoint_entries: u64,
    /// ...or this long after the last one, whichever comes first.
    #[arg(long, env = "MEDPIPE_AUDIT_CHECKPOINT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    checkpoint_interval: Duration,
    /// The AES-256-GCM key that seals sensitive entry details.
    #[command(flatten)]
    audit_key: AuditKeyArgs,
    /// The Ed25519 checkpoint signing key (a file holding the 32-byte seed in hex).
    /// Without it, one is generated into <audit-dir>/keys on first start.
    #[arg(long, env = "MEDPIPE_AUDIT_SIGNING_KEY_FILE")]
    signing_key_file: Option<PathBuf>,
    /// A batch started but not finished or failed within this long raises an alert.
    #[arg(long, env = "MEDPIPE_STALL_SLA", default_value = "15m", value_parser = humantime::parse_duration)]
    stall_sla: Duration,
    /// How long after a batch closes its record counts are compared.
    #[arg(long, env = "MEDPIPE_GAP_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    gap_grace: Duration,
    /// How long a canonical record's cause may take to arrive before lineage is judged.
    #[arg(long, env = "MEDPIPE_LINEAGE_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    lineage_grace: Duration,
    /// Event ids the lineage monitor keeps in memory; older ones are looked up on disk.
    #[arg(long, env = "MEDPIPE_LINEAGE_MAX_TRACKED", default_value_t = 1_000_000)]
    lineage_max_tracked: usize,
    /// Share of anonymized and canonical payloads the PHI sentinel scans, 0.0 to 1.0.
    #[arg(long, env = "MEDPIPE_SENTINEL_SAMPLE_RATE", default_value_t = 0.1)]
    sentinel_sample_rate: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // First, so a SIGTERM during start-up stops the stage cleanly (see pipeline::shutdown).
    let _ = pipeline::shutdown::on_signals();
    let args = Args::parse();
    pipeline::telemetry::init_tracing(args.telemetry.log_format);
    let seal_key = args.audit_key.load()?;
    // The batch status API shares the telemetry address; it answers 503 until the store
    // has been replayed into the index.
    let batches = auditing::batches::BatchIndex::loading();
    let svc = pipeline::stage::start_service_with(
        "auditing",
        &args.kafka,
        &args.telemetry,
        9104,
        auditing::api::router(batches.clone()),
    )
    .await?;
    let group_id = args
        .group_id
        .unwrap_or_else(|| format!("{}-auditing", args.kafka.topic_prefix));
    let config = auditing::AuditConfig {
        kafka: args.kafka.connection()?,
        transactional_id: args
            .transactional_id
            .unwrap_or_else(|| format!("{group_id}-publisher")),
        group_id,
        topics: args.kafka.topics(),
        audit_dir: args.audit_dir,
        batch_max_messages: args.batch_max_messages,
        batch_max_wait: args.batch_max_wait,
        segment_entries: args.segment_entries,
        checkpoint_entries: args.checkpoint_entries,
        checkpoint_interval: args.checkpoint_interval,
        seal_key,
        signing_key_file: args.signing_key_file,
        monitors: auditing::monitors::MonitorConfig {
            stall_sla: args.stall_sla,
            gap_grace: args.gap_grace,
            lineage_grace: args.lineage_grace,
            max_tracked_events: args.lineage_max_tracked,
        },
        sentinel_sample_rate: args.sentinel_sample_rate,
        transaction_timeout: args.transaction_timeout,
    };
    auditing::run(config, batches, svc.codec, svc.metrics, svc.shutdown)
        .await
        .context("auditing stage failed")
}
