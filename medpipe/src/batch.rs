//! `medpipe batch`: where each batch stands, per stage, from the audit trail (which
//! records every event of every stage), through the same index the auditing stage serves
//! (`auditing::batches`). A batch is `in_progress`, `published` (every stage finished it),
//! `held` (a stage failed it: the step and reason say why), `withdrawn` (held, and
//! canonization withdrew what it had published) or `rejected` (ingestion refused the file,
//! e.g. a duplicate).

use std::io::Write;

use anyhow::bail;
use auditing::batches::{BatchIndex, BatchView, State};
use auditing::entry::AuditEntry;
use auditing::store;
use clap::Subcommand;
use pipeline::crypto::KeyRef;

use crate::audit::{DirArg, UnsealArgs};

#[derive(Subcommand, Debug)]
pub enum BatchCommand {
    /// Every batch in the audit trail with its state, newest first.
    List {
        /// Only batches in this state.
        #[arg(long, value_enum)]
        state: Option<State>,
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        json: bool,
    },
    /// One batch per stage: state, records seen, expected counts, times, and (with
    /// --unseal and the audit key) the reason it failed.
    Status {
        batch: String,
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        unseal: UnsealArgs,
    },
    /// Ask ingestion for a new attempt of a batch from its encrypted archive, after you
    /// fixed what failed it (a layout, a threshold, a policy): a new batch, linked to the
    /// old one. Carried out once per request.
    Retry(crate::saga::RequestArgs),
    /// Accept a held batch as partial: ingestion re-reads it from its archive as a new
    /// batch that no failure threshold fails; its good records are published tagged
    /// `partial`, its bad ones stay rejected or dead-lettered. Once per request.
    Release(crate::saga::RequestArgs),
    /// Ask canonization to withdraw a batch, finished or not: every canonical record of it
    /// gets a new version marked entered-in-error. Nothing is deleted.
    Withdraw(crate::saga::RequestArgs),
}

/// Opens the sealed reason of each failed stage.
fn unseal_reasons(b: &mut BatchView, entries: &[AuditEntry], key: &KeyRef) -> anyhow::Result<()> {
    for (_, s) in b.stages_mut() {
        let Some(seq) = s.failed_entry else { continue };
        let Some(e) = entries.iter().find(|e| e.seq == seq) else {
            continue;
        };
        let opened = auditing::record::unseal(e, key)?;
        s.reason = opened
            .as_ref()
            .and_then(|v| v.get("reason").or_else(|| v.get("detail")))
            .and_then(|v| v.as_str())
            .map(str::to_owned);
    }
    Ok(())
}

fn time(micros: Option<i64>) -> String {
    micros
        .and_then(chrono::DateTime::from_timestamp_micros)
        .map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

pub async fn run(command: BatchCommand, out: &mut impl Write) -> anyhow::Result<()> {
    match command {
        BatchCommand::Retry(args) => {
            crate::saga::run(crate::saga::Request::Retry, args, out).await?
        }
        BatchCommand::Release(args) => {
            crate::saga::run(crate::saga::Request::Release, args, out).await?
        }
        BatchCommand::Withdraw(args) => {
            crate::saga::run(crate::saga::Request::Withdraw, args, out).await?
        }
        BatchCommand::List { state, dir, json } => {
            let mut index = BatchIndex::default();
            store::scan(&dir.dir, |_, _, e| {
                index.observe(&e);
                Ok(())
            })?;
            let list = index.list(state);
            if json {
                writeln!(out, "{}", serde_json::to_string(&list)?)?;
                return Ok(());
            }
            writeln!(out, "{} batch(es)", list.len())?;
            for b in &list {
                writeln!(
                    out,
                    "{}  {:<11}  {}  ingested {}  anonymized {}  canonical {}{}",
                    b.batch,
                    b.state.as_str(),
                    time(Some(b.first_seen)),
                    b.ingestion.records,
                    b.anonymization.records,
                    b.canonization.records,
                    b.failed_step
                        .map(|s| format!("  failed at {s}"))
                        .unwrap_or_default()
                )?;
            }
        }
        BatchCommand::Status {
            batch,
            dir,
            json,
            unseal,
        } => {
            let entries = store::lookup(&dir.dir, store::Key::Correlation, &batch)?;
            let Some(mut b) = BatchIndex::from_entries(&entries).get(&batch) else {
                bail!("no audit entries for batch {batch}");
            };
            if let Some(key) = unseal.key()? {
                unseal_reasons(&mut b, &entries, &key)?;
            }
            if json {
                writeln!(out, "{}", serde_json::to_string(&b)?)?;
                return Ok(());
            }
            writeln!(out, "batch {}: {}", b.batch, b.state.as_str())?;
            if let Some(step) = b.failed_step {
                writeln!(out, "  failed at: {step}")?;
            }
            if let Some(at) = b.withdrawn_at {
                writeln!(out, "  withdrawn at: {}", time(Some(at)))?;
            }
            for (name, s) in b.stages() {
                writeln!(
                    out,
                    "  {name:<13} {:<11} records {}{}{}  started {}  ended {}",
                    s.state,
                    s.records,
                    if s.rejected > 0 {
                        format!(" (rejected {})", s.rejected)
                    } else {
                        String::new()
                    },
                    s.expected
                        .map(|n| format!(" of {n} expected"))
                        .unwrap_or_default(),
                    time(s.started_at),
                    time(s.ended_at)
                )?;
                if let Some(r) = &s.reason {
                    writeln!(out, "    reason: {r}")?;
                }
            }
        }
    }
    Ok(())
}
