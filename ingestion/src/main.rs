//! medpipe-ingestion: claims batch files and emits their records, exactly once.

/// mimalloc instead of glibc's malloc: the stages allocate many small, short-lived
/// values per record (JSON trees, Avro values), and glibc's allocator took about 40% of
/// the de-identification engine's time (BENCHMARKS.md, "The allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ingestion::claims::Folders;
use ingestion::formats::csv::CsvOptions;
use ingestion::{IngestConfig, Ingestor};
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
    /// Holds landing/, intake/, processing/, archive/, quarantine/ and claims/.
    #[arg(
        long,
        env = "MEDPIPE_INGESTION_DIR",
        default_value = "./medpipe-data/ingestion"
    )]
    data_dir: PathBuf,
    /// Names this instance: its transactional id and its processing/ folder.
    #[arg(long, env = "MEDPIPE_INSTANCE_ID", default_value = "0")]
    instance_id: String,
    #[arg(long, env = "MEDPIPE_POLL_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    #[arg(long, env = "MEDPIPE_TRANSACTION_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    transaction_timeout: Duration,
    /// Records per transaction; each transaction also commits the batch's progress.
    #[arg(long, env = "MEDPIPE_CHUNK_RECORDS", default_value_t = 5000)]
    chunk_records: usize,
    /// Longest time a transaction stays open while records flow.
    #[arg(long, env = "MEDPIPE_CHUNK_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    chunk_interval: Duration,
    /// A batch fails as a whole when more than this share of its records is rejected.
    #[arg(long, env = "MEDPIPE_MAX_REJECT_RATIO", default_value_t = 0.05)]
    max_reject_ratio: f64,
    /// TOML file with a CSV delimiter and `[[layout]]` column mappings for non-Synthea CSV.
    #[arg(long, env = "MEDPIPE_CSV_LAYOUTS")]
    csv_layouts: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // First, so a SIGTERM during start-up stops the stage cleanly (see pipeline::shutdown).
    let _ = pipeline::shutdown::on_signals();
    let args = Args::parse();
    pipeline::telemetry::init_tracing(args.telemetry.log_format);
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.max_reject_ratio),
        "--max-reject-ratio must be between 0 and 1, got {}",
        args.max_reject_ratio
    );
    anyhow::ensure!(
        !args.instance_id.is_empty()
            && args
                .instance_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "--instance-id must be letters, digits, '-' or '_' (it names a folder and a transactional id)"
    );
    anyhow::ensure!(args.chunk_records > 0, "--chunk-records must be at least 1");
    anyhow::ensure!(
        args.chunk_interval < args.transaction_timeout,
        "--chunk-interval must be shorter than --transaction-timeout"
    );
    let csv = match &args.csv_layouts {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let opts: CsvOptions = toml::from_str(&text)
                .with_context(|| format!("{} is not a valid CSV layout file", path.display()))?;
            opts.validate()
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            opts
        }
        None => CsvOptions::default(),
    };
    let master = args.master.load()?;
    let svc =
        pipeline::stage::start_service("ingestion", &args.kafka, &args.telemetry, 9101).await?;
    let prefix = &args.kafka.topic_prefix;
    let config = IngestConfig {
        kafka: args.kafka.connection()?,
        transactional_id: format!("{prefix}-ingestion-{}", args.instance_id),
        group_id: format!("{prefix}-ingestion"),
        instance_id: args.instance_id.clone(),
        topics: args.kafka.topics(),
        folders: Folders::under(&args.data_dir, &args.instance_id),
        poll_interval: args.poll_interval,
        transaction_timeout: args.transaction_timeout,
        chunk_records: args.chunk_records,
        chunk_interval: args.chunk_interval,
        max_reject_ratio: args.max_reject_ratio,
        csv,
    };
    Ingestor::run(config, svc.codec, master, svc.metrics, svc.shutdown)
        .await
        .context("ingestion stage failed")
}
