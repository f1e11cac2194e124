//! `medpipe audit ...`: verify the trail, prove an entry, trace, report.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use auditing::entry::AuditEntry;
use auditing::merkle::TreeHead;
use auditing::{keys, proof, query, store};
use clap::Subcommand;
use pipeline::config::{AuditKeyArgs, KafkaArgs};
use pipeline::events::Payload;
use pipeline::topics::TopicKind;

#[derive(clap::Args, Debug, Clone)]
pub struct DirArg {
    #[arg(
        long,
        env = "MEDPIPE_AUDIT_DIR",
        default_value = "./medpipe-data/audit"
    )]
    pub dir: PathBuf,
}

/// `--unseal` and the audit key that opens sealed details (file names, reasons).
#[derive(clap::Args, Debug, Clone)]
pub struct UnsealArgs {
    /// Open sealed details (file names, reasons) with the audit key.
    #[arg(long)]
    pub unseal: bool,
    #[command(flatten)]
    pub audit_key: AuditKeyArgs,
}

impl UnsealArgs {
    /// The audit key when `--unseal` was given.
    pub fn key(&self) -> anyhow::Result<Option<pipeline::crypto::KeyRef>> {
        Ok(if self.unseal {
            Some(self.audit_key.load()?)
        } else {
            None
        })
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct PublicKeyArg {
    /// The checkpoint signing public key, 64 hex characters. Default: the key file in
    /// <dir>/keys/audit-signing.pub (trust it only if the directory is trusted).
    #[arg(long, env = "MEDPIPE_AUDIT_PUBLIC_KEY")]
    pub public_key: Option<String>,
}

impl PublicKeyArg {
    fn load(&self, dir: &Path) -> anyhow::Result<ed25519_dalek::VerifyingKey> {
        Ok(match &self.public_key {
            Some(h) => keys::public_key_from_hex(h)?,
            None => keys::read_public_key(&dir.join(keys::PUBLIC_KEY))
                .context("no --public-key given and none found in the audit directory")?,
        })
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFormat {
    Csv,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the chain, the Merkle checkpoints and their signatures; exits non-zero
    /// naming the first bad entry, or if the store was truncated behind a checkpoint.
    Verify {
        #[command(flatten)]
        dir: DirArg,
        #[command(flatten)]
        key: PublicKeyArg,
        /// Also check against the checkpoints published on the audit topic (a copy held
        /// outside this directory, so truncating both the store and its local
        /// checkpoints is still caught).
        #[arg(long)]
        published: bool,
        #[command(flatten)]
        kafka: KafkaArgs,
    },
    /// Print an inclusion proof of one entry (by seq or event id) against the earliest
    /// checkpoint covering it, as JSON a third party can check with `check-proof`.
    Prove {
        entry: String,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Check an inclusion proof with nothing but the public key.
    CheckProof {
        /// The proof JSON file (`-` for stdin).
        proof: PathBuf,
        /// The checkpoint signing public key, 64 hex characters.
        #[arg(long, env = "MEDPIPE_AUDIT_PUBLIC_KEY")]
        public_key: String,
    },
    /// The timeline of a batch id, patient pseudonym or event id, in causal order.
    Trace {
        id: String,
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        unseal: UnsealArgs,
    },
    /// HIPAA activity report: which service processed which batches when, under which
    /// policy and key versions.
    Report {
        /// Start (inclusive): RFC 3339 time or a date (YYYY-MM-DD, UTC midnight).
        #[arg(long)]
        from: String,
        /// End (exclusive), same forms.
        #[arg(long)]
        to: String,
        #[arg(long, value_enum, default_value_t = ReportFormat::Csv)]
        format: ReportFormat,
        /// Write here instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        dir: DirArg,
    },
}

/// Parses an RFC 3339 time or a plain date into microseconds since the epoch.
pub fn parse_time(s: &str) -> anyhow::Result<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_micros());
    }
    let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .with_context(|| format!("{s:?} is neither an RFC 3339 time nor a YYYY-MM-DD date"))?;
    Ok(d.and_hms_opt(0, 0, 0)
        .context("midnight exists")?
        .and_utc()
        .timestamp_micros())
}

fn iso(micros: Option<i64>) -> String {
    micros
        .and_then(chrono::DateTime::from_timestamp_micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".into())
}

/// Every checkpoint published on the audit topic.
fn published_heads(kafka: &KafkaArgs) -> anyhow::Result<Vec<TreeHead>> {
    let topics = kafka.topics();
    let codec = kafka.codec(&topics)?;
    let rt = tokio::runtime::Handle::current();
    let records = tokio::task::block_in_place(|| {
        pipeline::readback::read_all(
            &kafka.connection()?,
            &[topics.name(TopicKind::Audit)],
            Some((&codec, &rt)),
            Duration::from_secs(120),
        )
    })?;
    Ok(records
        .into_iter()
        .filter_map(|r| match r.event?.payload {
            Payload::AuditCheckpoint(c) => Some(TreeHead {
                tree_size: u64::try_from(c.tree_size).ok()?,
                root_hex: c.root_hex,
                timestamp_micros: c.timestamp_micros,
                key_id: c.key_id,
                signature_hex: c.signature_hex,
            }),
            _ => None,
        })
        .collect())
}

pub async fn run(command: AuditCommand, out: &mut impl Write) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify {
            dir,
            key,
            published,
            kafka,
        } => {
            let public = key.load(&dir.dir)?;
            let heads = if published {
                published_heads(&kafka)?
            } else {
                Vec::new()
            };
            match store::verify(&dir.dir, &public, &heads) {
                Ok(s) => writeln!(
                    out,
                    "Audit chain verified: {} entries, {} checkpoints matched{}, key {}, head {}.",
                    s.entries,
                    s.checkpoints,
                    if published {
                        format!(" (including {} published)", heads.len())
                    } else {
                        String::new()
                    },
                    keys::key_id(&public),
                    s.head
                )?,
                Err(e) => bail!("audit verification failed: {e}"),
            }
        }
        AuditCommand::Prove { entry, dir } => {
            let seq = match entry.parse::<u64>() {
                Ok(s) => s,
                Err(_) => store::lookup(&dir.dir, store::Key::Event, &entry)?
                    .first()
                    .map(|e| e.seq)
                    .with_context(|| format!("no audit entry for event {entry}"))?,
            };
            let p = proof::prove(&dir.dir, seq)?;
            writeln!(out, "{}", serde_json::to_string_pretty(&p)?)?;
        }
        AuditCommand::CheckProof { proof, public_key } => {
            let text = if proof.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&proof)
                    .with_context(|| format!("cannot read {}", proof.display()))?
            };
            let p: proof::InclusionProof = serde_json::from_str(&text)?;
            let key = keys::public_key_from_hex(&public_key)?;
            match proof::check(&p, &key) {
                Ok(e) => writeln!(
                    out,
                    "Proof verified: entry {} ({}) is in the tree of {} entries signed by key {}.",
                    e.seq,
                    e.event_type,
                    p.tree_size,
                    keys::key_id(&key)
                )?,
                Err(e) => bail!("proof does not verify: {e}"),
            }
        }
        AuditCommand::Trace {
            id,
            dir,
            json,
            unseal,
        } => {
            let key = unseal.key()?;
            let entries = query::trace(&dir.dir, &id)?;
            if entries.is_empty() {
                bail!("no audit entries for {id}");
            }
            print_trace(&entries, json, key.as_ref(), out)?;
        }
        AuditCommand::Report {
            from,
            to,
            format,
            output,
            dir,
        } => {
            let rows = query::report(&dir.dir, parse_time(&from)?, parse_time(&to)?)?;
            let mut buf = Vec::new();
            match format {
                ReportFormat::Json => {
                    serde_json::to_writer_pretty(&mut buf, &rows)?;
                    buf.push(b'\n');
                }
                ReportFormat::Csv => {
                    let mut w = csv::Writer::from_writer(&mut buf);
                    for r in &rows {
                        w.serialize(r)?;
                    }
                    w.flush()?;
                }
            }
            match output {
                Some(p) => std::fs::write(&p, &buf)
                    .with_context(|| format!("cannot write {}", p.display()))?,
                None => out.write_all(&buf)?,
            }
        }
    }
    Ok(())
}

fn print_trace(
    entries: &[AuditEntry],
    json: bool,
    key: Option<&pipeline::crypto::KeyRef>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    if json {
        let mut list = Vec::with_capacity(entries.len());
        for e in entries {
            let mut v = serde_json::to_value(e)?;
            if let Some(k) = key {
                v["unsealed"] = auditing::record::unseal(e, k)?.unwrap_or_default();
            }
            list.push(v);
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:>8}  {:<24}  {:<22}  {:<32}  {:<36}  WHERE",
        "SEQ", "OCCURRED", "SERVICE", "EVENT", "EVENT ID"
    )?;
    for e in entries {
        let place = if e.is_own() {
            e.detail.clone().unwrap_or_default()
        } else {
            format!("{}[{}]@{}", e.topic, e.partition, e.offset)
        };
        writeln!(
            out,
            "{:>8}  {:<24}  {:<22}  {:<32}  {:<36}  {}",
            e.seq,
            iso(e.occurred_at),
            e.source_service.as_deref().unwrap_or("-"),
            e.event_type,
            e.event_id.as_deref().unwrap_or("-"),
            place
        )?;
        if let Some(k) = key {
            if let Some(v) = auditing::record::unseal(e, k)? {
                writeln!(out, "{:>8}  sealed: {v}", "")?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339_or_dates() {
        assert_eq!(parse_time("1970-01-02").expect("date"), 86_400_000_000);
        assert_eq!(parse_time("1970-01-01T00:00:01Z").expect("time"), 1_000_000);
        assert!(parse_time("yesterday").is_err());
    }
}
