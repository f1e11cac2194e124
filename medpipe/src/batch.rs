//! `medpipe batch`: where each batch stands, per stage, from the audit trail (which
//! records every event of every stage). A batch is `in_progress`, `published` (every stage
//! finished it), `held` (a stage failed it: the step and reason say why), `withdrawn`
//! (held, and canonization withdrew what it had published) or `rejected` (ingestion
//! refused the file, e.g. a duplicate).

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::bail;
use auditing::entry::AuditEntry;
use auditing::store;
use clap::Subcommand;
use pipeline::crypto::KeyRef;
use serde::Serialize;

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

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    InProgress,
    Published,
    Held,
    Withdrawn,
    Rejected,
}

/// One stage's view of a batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StageView {
    /// `not_started`, `in_progress`, `finished` or `failed`.
    pub state: &'static str,
    pub started_at: Option<i64>,
    pub ended_at: Option<i64>,
    /// Per-record events of the stage seen in the trail (canonical records for
    /// canonization, withdrawals included).
    pub records: u64,
    /// Records rejected (ingestion) as the trail shows them.
    pub rejected: u64,
    /// What the stage's closing event says it produced.
    pub expected: Option<i64>,
    /// Audit sequence number of the failing event, whose sealed reason `--unseal` opens.
    pub failed_entry: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A batch as the trail shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchView {
    pub batch: String,
    pub state: State,
    /// The stage that failed the batch first, for a held or withdrawn one.
    pub failed_step: Option<&'static str>,
    pub first_seen: i64,
    pub last_seen: i64,
    pub ingestion: StageView,
    pub anonymization: StageView,
    pub canonization: StageView,
    /// Withdrawals canonization published for the batch, when it withdrew it.
    pub withdrawn_at: Option<i64>,
}

const STAGES: [&str; 3] = ["ingestion", "anonymization", "canonization"];

impl BatchView {
    fn new(batch: &str, at: i64) -> Self {
        let stage = || StageView {
            state: "not_started",
            ..StageView::default()
        };
        BatchView {
            batch: batch.to_string(),
            state: State::InProgress,
            failed_step: None,
            first_seen: at,
            last_seen: at,
            ingestion: stage(),
            anonymization: stage(),
            canonization: stage(),
            withdrawn_at: None,
        }
    }

    fn stage(&mut self, name: &str) -> &mut StageView {
        match name {
            "ingestion" => &mut self.ingestion,
            "anonymization" => &mut self.anonymization,
            _ => &mut self.canonization,
        }
    }

    /// Folds one audit entry of the batch in.
    fn add(&mut self, e: &AuditEntry) {
        let at = e.occurred_at.unwrap_or(e.recorded_at);
        self.first_seen = self.first_seen.min(at);
        self.last_seen = self.last_seen.max(at);
        let t = e.event_type.as_str();
        let (stage, role) = match t {
            "DataIngestionCreated" | "DataIngestionStarted" => ("ingestion", Role::Start),
            "SourceRecordIngested" => ("ingestion", Role::Record),
            "RecordRejected" => ("ingestion", Role::Rejected),
            "DataIngestionFinished" => ("ingestion", Role::Finish),
            "DataIngestionFailed" => ("ingestion", Role::Fail),
            "DataIngestionRejected" => ("ingestion", Role::Refused),
            "AnonymizationStarted" => ("anonymization", Role::Start),
            "RecordAnonymized" => ("anonymization", Role::Record),
            "AnonymizationFinished" => ("anonymization", Role::Finish),
            "AnonymizationFailed" => ("anonymization", Role::Fail),
            "EventDataCanonizationCreated" | "EventDataCanonizationStarted" => {
                ("canonization", Role::Start)
            }
            "EventDataCanonizationCompleted" => ("canonization", Role::Finish),
            "CanonizationFailed" => ("canonization", Role::Fail),
            "CanonicalBatchWithdrawn" => ("canonization", Role::Withdrawn),
            _ if e.source_service.as_deref() == Some("medpipe-canonization")
                && t.starts_with("Canonical") =>
            {
                ("canonization", Role::Record)
            }
            _ => return,
        };
        let s = self.stage(stage);
        match role {
            Role::Start => {
                s.started_at = Some(s.started_at.map_or(at, |v| v.min(at)));
                if s.state == "not_started" {
                    s.state = "in_progress";
                }
            }
            Role::Record => {
                s.records += 1;
                if s.state == "not_started" {
                    s.state = "in_progress";
                }
            }
            Role::Rejected => s.rejected += 1,
            Role::Finish => {
                s.ended_at = Some(at);
                s.expected = e.records_expected;
                if s.state != "failed" {
                    s.state = "finished";
                }
            }
            Role::Fail => {
                s.ended_at = Some(at);
                s.state = "failed";
                s.failed_entry = Some(e.seq);
            }
            Role::Refused => {
                s.ended_at = Some(at);
                s.state = "failed";
                s.failed_entry = Some(e.seq);
                self.state = State::Rejected;
            }
            Role::Withdrawn => self.withdrawn_at = Some(at),
        }
    }

    /// The batch's state once every entry is in.
    fn settle(&mut self) {
        if self.state == State::Rejected {
            self.failed_step = Some("ingestion");
            return;
        }
        let views = [&self.ingestion, &self.anonymization, &self.canonization];
        self.failed_step = STAGES
            .iter()
            .zip(views)
            .find(|(_, v)| v.state == "failed")
            .map(|(name, _)| *name);
        self.state = if self.withdrawn_at.is_some() {
            State::Withdrawn
        } else if self.failed_step.is_some() {
            State::Held
        } else if self.canonization.state == "finished" {
            State::Published
        } else {
            State::InProgress
        };
    }
}

enum Role {
    Start,
    Record,
    Rejected,
    Finish,
    Fail,
    Refused,
    Withdrawn,
}

/// Every batch in these entries.
pub fn batches<'a>(entries: impl IntoIterator<Item = &'a AuditEntry>) -> Vec<BatchView> {
    let mut out: BTreeMap<String, BatchView> = BTreeMap::new();
    for e in entries {
        let Some(batch) = e.correlation_id.as_deref() else {
            continue;
        };
        let at = e.occurred_at.unwrap_or(e.recorded_at);
        out.entry(batch.to_string())
            .or_insert_with(|| BatchView::new(batch, at))
            .add(e);
    }
    let mut list: Vec<BatchView> = out.into_values().collect();
    for b in &mut list {
        b.settle();
    }
    list.sort_by_key(|b| std::cmp::Reverse(b.first_seen));
    list
}

/// Opens the sealed reason of each failed stage.
fn unseal_reasons(b: &mut BatchView, entries: &[AuditEntry], key: &KeyRef) -> anyhow::Result<()> {
    for name in STAGES {
        let s = b.stage(name);
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

fn state_name(s: State) -> &'static str {
    match s {
        State::InProgress => "in_progress",
        State::Published => "published",
        State::Held => "held",
        State::Withdrawn => "withdrawn",
        State::Rejected => "rejected",
    }
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
            let mut entries = Vec::new();
            store::scan(&dir.dir, |_, _, e| {
                if e.correlation_id.is_some() {
                    entries.push(e);
                }
                Ok(())
            })?;
            let list: Vec<BatchView> = batches(&entries)
                .into_iter()
                .filter(|b| state.is_none_or(|s| b.state == s))
                .collect();
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
                    state_name(b.state),
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
            // The lookup also finds the link of a retry, which belongs to the other batch.
            let Some(mut b) = batches(&entries).into_iter().find(|b| b.batch == batch) else {
                bail!("no audit entries for batch {batch}");
            };
            if let Some(key) = unseal.key()? {
                unseal_reasons(&mut b, &entries, &key)?;
            }
            if json {
                writeln!(out, "{}", serde_json::to_string(&b)?)?;
                return Ok(());
            }
            writeln!(out, "batch {}: {}", b.batch, state_name(b.state))?;
            if let Some(step) = b.failed_step {
                writeln!(out, "  failed at: {step}")?;
            }
            if let Some(at) = b.withdrawn_at {
                writeln!(out, "  withdrawn at: {}", time(Some(at)))?;
            }
            for (name, s) in [
                ("ingestion", &b.ingestion),
                ("anonymization", &b.anonymization),
                ("canonization", &b.canonization),
            ] {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn e(seq: u64, batch: &str, t: &str, service: &str) -> AuditEntry {
        AuditEntry {
            seq,
            topic: "t".into(),
            offset: seq as i64,
            event_type: t.into(),
            correlation_id: Some(batch.into()),
            source_service: Some(service.into()),
            occurred_at: Some(seq as i64 * 1_000_000),
            digest_sha256: "d".into(),
            ..Default::default()
        }
    }

    #[test]
    fn states_follow_each_stage_closing_event() {
        let ing = "medpipe-ingestion";
        let anon = "medpipe-anonymization";
        let can = "medpipe-canonization";
        let mut entries = vec![
            // a: published
            e(1, "a", "DataIngestionStarted", ing),
            e(2, "a", "SourceRecordIngested", ing),
            e(3, "a", "DataIngestionFinished", ing),
            e(4, "a", "AnonymizationStarted", anon),
            e(5, "a", "RecordAnonymized", anon),
            e(6, "a", "AnonymizationFinished", anon),
            e(7, "a", "EventDataCanonizationStarted", can),
            e(8, "a", "CanonicalObservation", can),
            e(9, "a", "EventDataCanonizationCompleted", can),
            // b: canonization failed and withdrew
            e(10, "b", "DataIngestionFinished", ing),
            e(11, "b", "AnonymizationFinished", anon),
            e(12, "b", "CanonicalObservation", can),
            e(13, "b", "CanonizationFailed", can),
            e(14, "b", "CanonicalObservation", can),
            e(15, "b", "CanonicalBatchWithdrawn", can),
            // c: ingestion failed, nothing else yet
            e(16, "c", "DataIngestionStarted", ing),
            e(17, "c", "DataIngestionFailed", ing),
            // d: refused as a duplicate
            e(18, "d", "DataIngestionRejected", ing),
            // e: still going
            e(19, "e", "DataIngestionStarted", ing),
        ];
        entries[2].records_expected = Some(1);
        let list = batches(&entries);
        let state = |id: &str| {
            let b = list.iter().find(|b| b.batch == id).unwrap();
            (b.state, b.failed_step)
        };
        assert_eq!(state("a"), (State::Published, None));
        assert_eq!(state("b"), (State::Withdrawn, Some("canonization")));
        assert_eq!(state("c"), (State::Held, Some("ingestion")));
        assert_eq!(state("d"), (State::Rejected, Some("ingestion")));
        assert_eq!(state("e"), (State::InProgress, None));
        let a = list.iter().find(|b| b.batch == "a").unwrap();
        assert_eq!(
            (
                a.ingestion.records,
                a.ingestion.expected,
                a.canonization.records
            ),
            (1, Some(1), 1)
        );
        let b = list.iter().find(|b| b.batch == "b").unwrap();
        assert_eq!(b.canonization.records, 2, "the original and its withdrawal");
        assert_eq!(b.canonization.failed_entry, Some(13));
        // Newest first.
        assert_eq!(list[0].batch, "e");
    }
}
