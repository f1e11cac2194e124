//! medpipe-anonymization: de-identifies ingested records under a versioned policy,
//! exactly once.

/// mimalloc instead of glibc's malloc: the stages allocate many small, short-lived
/// values per record (JSON trees, Avro values), and glibc's allocator took about 40% of
/// the de-identification engine's time (BENCHMARKS.md, "The allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use pipeline::config::{parse_secret, KeySource, MasterKeyArgs};
use pipeline::crypto::Secret;
use pipeline::stage::{run_stage, CommonArgs};
use pipeline::topics::TopicKind;

use anonymization::engine::{Context, Engine, Keys};
use anonymization::policy::Policy;

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
    /// Policy file (TOML). Default: the shipped Safe Harbor policy
    /// (anonymization/policies/safe-harbor.toml, compiled in).
    #[arg(long, env = "MEDPIPE_POLICY_FILE")]
    policy_file: Option<PathBuf>,
    /// Pseudonyms and date shifts are per tenant.
    #[arg(long, env = "MEDPIPE_TENANT", default_value = "default")]
    tenant: String,
    /// Day ages are computed at (YYYY-MM-DD). Default: today, UTC.
    #[arg(long, env = "MEDPIPE_REFERENCE_DATE")]
    reference_date: Option<chrono::NaiveDate>,
    /// A batch fails (AnonymizationFailed) when more than this share of its records
    /// cannot be de-identified safely.
    #[arg(long, env = "MEDPIPE_MAX_FAILURE_RATIO", default_value_t = 0.05)]
    max_failure_ratio: f64,
    #[arg(long, env = "MEDPIPE_PSEUDONYM_KEY_ID", default_value = "pseudonym-1")]
    pseudonym_key_id: String,
    /// HMAC key for pseudonyms and date shifts (64 hex characters).
    #[arg(long, env = "MEDPIPE_PSEUDONYM_KEY", value_parser = parse_secret, hide_env_values = true)]
    pseudonym_key: Option<Secret<String>>,
    #[arg(long, env = "MEDPIPE_PSEUDONYM_KEY_FILE")]
    pseudonym_key_file: Option<PathBuf>,
    #[arg(
        long,
        env = "MEDPIPE_REIDENTIFY_KEY_ID",
        default_value = "reidentify-1"
    )]
    reidentify_key_id: String,
    /// AES-256 key for `encrypt` rules (64 hex characters); only needed if the policy has one.
    #[arg(long, env = "MEDPIPE_REIDENTIFY_KEY", value_parser = parse_secret, hide_env_values = true)]
    reidentify_key: Option<Secret<String>>,
    #[arg(long, env = "MEDPIPE_REIDENTIFY_KEY_FILE")]
    reidentify_key_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // First, so a SIGTERM during start-up stops the stage cleanly (see pipeline::shutdown).
    let _ = pipeline::shutdown::on_signals();
    let args = Args::parse();
    pipeline::telemetry::init_tracing(args.common.telemetry.log_format);
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.max_failure_ratio),
        "--max-failure-ratio must be between 0 and 1"
    );
    let master = args.master.load()?;
    let pseudonym = KeySource {
        id: args.pseudonym_key_id,
        hex: args.pseudonym_key,
        file: args.pseudonym_key_file,
    }
    .load("--pseudonym-key")?;
    let reidentify = if args.reidentify_key.is_some() || args.reidentify_key_file.is_some() {
        Some(
            KeySource {
                id: args.reidentify_key_id,
                hex: args.reidentify_key,
                file: args.reidentify_key_file,
            }
            .load("--reidentify-key")?,
        )
    } else {
        None
    };
    let policy = match &args.policy_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read policy {}", path.display()))?;
            Policy::from_toml(&text)
                .with_context(|| format!("policy {} is invalid", path.display()))?
        }
        None => Policy::safe_harbor(),
    };
    let context = Context {
        tenant: args.tenant,
        reference_date: args
            .reference_date
            .unwrap_or_else(|| chrono::Utc::now().date_naive()),
    };
    tracing::info!(policy = %policy.name, version = %policy.version, hash = %policy.hash, "Policy loaded.");
    let engine = Engine::new(
        policy,
        Keys {
            pseudonym,
            reidentify,
        },
        context,
    )?;
    let stage = anonymization::Anonymizer::new(
        master,
        engine,
        args.max_failure_ratio,
        args.common.runner.batch_close_timeout,
    );
    let input = vec![args.common.kafka.topics().name(TopicKind::Ingestion)];
    run_stage(stage, input, &args.common, 9102)
        .await
        .context("anonymization stage failed")
}
