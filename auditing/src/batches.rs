//! Where each batch stands, per stage, folded from the audit trail (which records every
//! event of every stage), kept as an index that is updated one entry at a time. The
//! auditing stage feeds it as it replays and appends, and serves it (`api.rs`); `medpipe
//! batch list|status` feeds it from the store on disk. One fold, so both say the same.
//!
//! A batch is `in_progress`, `published` (every stage finished it), `held` (a stage failed
//! it, the step and reason say why; or it stalled and has not finished since),
//! `withdrawn` (canonization withdrew what it had published: after a failure or an
//! operator's request), `retry_requested` (an operator asked for a retry or a release,
//! not carried out yet), `retried` (a new attempt runs as `retried_as`), `released` (a
//! release, `released_as`, was published as partial) or `rejected` (ingestion refused
//! the file, e.g. a duplicate). A new attempt names its origin in `retry_of` (and
//! `release_of` once the release is published).
//!
//! Holds ids, counts, states and times only: the sealed reasons stay in the trail, and
//! only the CLI opens them (with the audit key).

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::entry::AuditEntry;

/// A batch's state as a whole. The names (`as_str`, the JSON and the `?state=` of the
/// API) are snake_case; the CLI's `--state` also takes the kebab-case clap derives.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    #[value(alias = "in_progress")]
    InProgress,
    Published,
    Held,
    Withdrawn,
    #[value(alias = "retry_requested")]
    RetryRequested,
    Retried,
    Released,
    Rejected,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::InProgress => "in_progress",
            State::Published => "published",
            State::Held => "held",
            State::Withdrawn => "withdrawn",
            State::RetryRequested => "retry_requested",
            State::Retried => "retried",
            State::Released => "released",
            State::Rejected => "rejected",
        }
    }

    /// Every state, in declaration order (clap's derive lists them, so a new variant is
    /// in here without a second list to keep).
    pub fn all() -> &'static [State] {
        <State as clap::ValueEnum>::value_variants()
    }

    /// The state named by its snake_case name.
    pub fn parse(name: &str) -> Option<State> {
        State::all().iter().copied().find(|s| s.as_str() == name)
    }
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
    /// Later files with the same content, refused as duplicates of this batch (ingestion).
    #[serde(skip_serializing_if = "is_zero")]
    pub rejected_duplicates: u64,
    /// What the stage's closing event says it produced.
    pub expected: Option<i64>,
    /// Audit sequence number of the failing event, whose sealed reason `--unseal` opens.
    pub failed_entry: Option<u64>,
    /// The opened reason; only `medpipe batch status --unseal` fills it, never the index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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
    /// When canonization withdrew the batch's canonical records, if it did.
    pub withdrawn_at: Option<i64>,
    /// When a stage (or the stall monitor) last held the batch.
    pub held_at: Option<i64>,
    /// Held because it stalled, not because a step failed it.
    pub stalled: bool,
    /// When an operator last asked for a retry or a release.
    pub retry_requested_at: Option<i64>,
    /// When an operator asked for a withdrawal.
    pub withdrawal_requested_at: Option<i64>,
    /// The new attempts of this batch (retries and releases), oldest first.
    pub retried_as: Vec<String>,
    /// The release of this batch that canonization published as partial.
    pub released_as: Option<String>,
    /// For a new attempt: the batch it retries or releases.
    pub retry_of: Option<String>,
    /// For a published release: the held batch it released as partial.
    pub release_of: Option<String>,
    /// Completed reprocessings of this batch under new versions, oldest first. The batch
    /// keeps its state: its records were published; newer versions of them exist.
    pub reprocessed_as: Vec<String>,
    /// For a completed reprocessing: the batch it reprocessed.
    pub reprocess_of: Option<String>,
}

/// The stages a batch goes through, in order: the first failed one is the failed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Ingestion,
    Anonymization,
    Canonization,
}

impl Step {
    const ALL: [Step; 3] = [Step::Ingestion, Step::Anonymization, Step::Canonization];

    fn name(self) -> &'static str {
        match self {
            Step::Ingestion => "ingestion",
            Step::Anonymization => "anonymization",
            Step::Canonization => "canonization",
        }
    }
}

/// What an event means for one stage's view.
#[derive(Debug, Clone, Copy)]
enum Role {
    Start,
    Record,
    Rejected,
    Finish,
    Fail,
    Refused,
}

/// What an event does to a batch: to one stage's view, or to the batch as a whole.
#[derive(Debug, Clone, Copy)]
enum Effect {
    Stage(Step, Role),
    Withdrawn,
    Held,
    RetryRequested,
    WithdrawalRequested,
    /// A new attempt began: the entry's related batch.
    Retried,
    /// A release was published: the entry's related batch.
    Released,
    /// A reprocessing completed: the entry's related batch.
    Reprocessed,
}

/// The one table from event type to effect. A new event is an arm here; one that moves
/// the batch to a new state is also a field of [`BatchView`], an arm in
/// [`BatchView::add`] and a line in [`BatchView::settle`].
fn effect(e: &AuditEntry) -> Option<Effect> {
    use Effect::Stage;
    use Step::{Anonymization, Canonization, Ingestion};
    let t = e.event_type.as_str();
    Some(match t {
        "DataIngestionCreated" | "DataIngestionStarted" => Stage(Ingestion, Role::Start),
        "SourceRecordIngested" => Stage(Ingestion, Role::Record),
        "RecordRejected" => Stage(Ingestion, Role::Rejected),
        "DataIngestionFinished" => Stage(Ingestion, Role::Finish),
        "DataIngestionFailed" => Stage(Ingestion, Role::Fail),
        "DataIngestionRejected" => Stage(Ingestion, Role::Refused),
        "AnonymizationStarted" => Stage(Anonymization, Role::Start),
        "RecordAnonymized" => Stage(Anonymization, Role::Record),
        "AnonymizationFinished" => Stage(Anonymization, Role::Finish),
        "AnonymizationFailed" => Stage(Anonymization, Role::Fail),
        "EventDataCanonizationCreated" | "EventDataCanonizationStarted" => {
            Stage(Canonization, Role::Start)
        }
        "EventDataCanonizationCompleted" => Stage(Canonization, Role::Finish),
        "CanonizationFailed" => Stage(Canonization, Role::Fail),
        "CanonicalBatchWithdrawn" => Effect::Withdrawn,
        "BatchHeld" => Effect::Held,
        "BatchRetryRequested" | "BatchReleaseRequested" => Effect::RetryRequested,
        // A reprocessing is a new version of a batch, not a new attempt: no state change.
        "BatchReprocessRequested" => return None,
        "BatchRetried" if e.detail.as_deref() == Some("reprocess") => return None,
        "BatchWithdrawalRequested" => Effect::WithdrawalRequested,
        "BatchRetried" => Effect::Retried,
        "BatchReleased" => Effect::Released,
        "BatchReprocessed" => Effect::Reprocessed,
        _ if e.source_service.as_deref() == Some("medpipe-canonization")
            && t.starts_with("Canonical") =>
        {
            Stage(Canonization, Role::Record)
        }
        _ => return None,
    })
}

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
            held_at: None,
            stalled: false,
            retry_requested_at: None,
            withdrawal_requested_at: None,
            retried_as: Vec::new(),
            released_as: None,
            retry_of: None,
            release_of: None,
            reprocessed_as: Vec::new(),
            reprocess_of: None,
        }
    }

    fn stage(&self, step: Step) -> &StageView {
        match step {
            Step::Ingestion => &self.ingestion,
            Step::Anonymization => &self.anonymization,
            Step::Canonization => &self.canonization,
        }
    }

    fn stage_mut(&mut self, step: Step) -> &mut StageView {
        match step {
            Step::Ingestion => &mut self.ingestion,
            Step::Anonymization => &mut self.anonymization,
            Step::Canonization => &mut self.canonization,
        }
    }

    /// The stages in order, by name.
    pub fn stages(&self) -> [(&'static str, &StageView); 3] {
        [
            ("ingestion", &self.ingestion),
            ("anonymization", &self.anonymization),
            ("canonization", &self.canonization),
        ]
    }

    /// The stages in order, by name, to fill in what the index does not hold (`reason`).
    pub fn stages_mut(&mut self) -> [(&'static str, &mut StageView); 3] {
        [
            ("ingestion", &mut self.ingestion),
            ("anonymization", &mut self.anonymization),
            ("canonization", &mut self.canonization),
        ]
    }

    /// Folds one audit entry of the batch in. Any entry of the batch moves its times,
    /// including alerts and events the fold does not know.
    fn add(&mut self, e: &AuditEntry) {
        let at = e.occurred_at.unwrap_or(e.recorded_at);
        self.first_seen = self.first_seen.min(at);
        self.last_seen = self.last_seen.max(at);
        let related = e.related_batch.clone();
        let (step, role) = match effect(e) {
            None => return,
            Some(Effect::Withdrawn) => {
                self.withdrawn_at = Some(at);
                return;
            }
            Some(Effect::Held) => {
                self.held_at = Some(at);
                // The detail (in the clear) names the kind: "... failed it (stalled); ...".
                self.stalled = e.detail.as_deref().is_some_and(|d| d.contains("(stalled)"));
                return;
            }
            Some(Effect::RetryRequested) => {
                self.retry_requested_at = Some(at);
                return;
            }
            Some(Effect::WithdrawalRequested) => {
                self.withdrawal_requested_at = Some(at);
                return;
            }
            Some(Effect::Retried) => {
                if let Some(new) = related {
                    if !self.retried_as.contains(&new) {
                        self.retried_as.push(new);
                    }
                }
                return;
            }
            Some(Effect::Released) => {
                self.released_as = related;
                return;
            }
            Some(Effect::Reprocessed) => {
                if let Some(new) = related {
                    if !self.reprocessed_as.contains(&new) {
                        self.reprocessed_as.push(new);
                    }
                }
                return;
            }
            Some(Effect::Stage(step, role)) => (step, role),
        };
        let s = self.stage_mut(step);
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
            // A later file with the same content, refused under this batch's id: the
            // batch itself stands as it was.
            Role::Refused if s.started_at.is_some() => s.rejected_duplicates += 1,
            Role::Refused => {
                s.ended_at = Some(at);
                s.state = "failed";
                s.failed_entry = Some(e.seq);
                self.state = State::Rejected;
            }
        }
    }

    /// Folds in an entry of another batch that names this one as its related batch: the
    /// link from a retry or release back to the batch it came from.
    fn add_link(&mut self, e: &AuditEntry) {
        let at = e.occurred_at.unwrap_or(e.recorded_at);
        self.first_seen = self.first_seen.min(at);
        self.last_seen = self.last_seen.max(at);
        match effect(e) {
            Some(Effect::Retried) => self.retry_of.clone_from(&e.correlation_id),
            Some(Effect::Released) => self.release_of.clone_from(&e.correlation_id),
            Some(Effect::Reprocessed) => self.reprocess_of.clone_from(&e.correlation_id),
            _ => {}
        }
    }

    /// The batch's state from what has been folded in so far. It depends only on the
    /// folded fields (a refusal is the one thing `add` sets directly, and it sticks), so
    /// settling after every entry gives what settling once at the end would.
    fn settle(&mut self) {
        if self.state == State::Rejected {
            self.failed_step = Some(Step::Ingestion.name());
            return;
        }
        self.failed_step = Step::ALL
            .into_iter()
            .find(|&step| self.stage(step).state == "failed")
            .map(Step::name);
        let finished = self.canonization.state == "finished";
        self.state = if self.released_as.is_some() {
            State::Released
        } else if !self.retried_as.is_empty() {
            State::Retried
        } else if self.retry_requested_at.is_some() {
            State::RetryRequested
        } else if self.withdrawn_at.is_some() {
            State::Withdrawn
        } else if self.failed_step.is_some() || (self.held_at.is_some() && !finished) {
            State::Held
        } else if self.canonization.state == "finished" {
            State::Published
        } else {
            State::InProgress
        };
    }

    /// Where the batch sits in the ordered sets: newest first, then by id.
    fn order(&self) -> (Reverse<i64>, State) {
        (Reverse(self.first_seen), self.state)
    }
}

/// Newest first (by first seen), ties by batch id: the order of every list.
type Order = (Reverse<i64>, Arc<str>);

/// Every batch the trail shows, settled as each entry comes in, with an ordered set per
/// state so that listing one state does not walk the others.
#[derive(Debug, Default)]
pub struct BatchIndex {
    batches: HashMap<Arc<str>, BatchView>,
    newest: BTreeSet<Order>,
    by_state: HashMap<State, BTreeSet<Order>>,
    /// The stage has not finished replaying its store into the index yet, so a batch
    /// missing from it may still come (the API answers 503 meanwhile).
    loading: bool,
}

/// The index as the auditing stage and its HTTP API share it.
pub type SharedIndex = Arc<RwLock<BatchIndex>>;

impl BatchIndex {
    /// An index the entries of `entries` are folded into.
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = &'a AuditEntry>) -> Self {
        let mut index = BatchIndex::default();
        for e in entries {
            index.observe(e);
        }
        index
    }

    /// An empty index marked as loading, for the stage to share before its store is
    /// replayed; the replayed index replaces it.
    pub fn loading() -> SharedIndex {
        Arc::new(RwLock::new(BatchIndex {
            loading: true,
            ..BatchIndex::default()
        }))
    }

    pub fn is_loading(&self) -> bool {
        self.loading
    }

    /// Folds one entry in: a hash lookup, the fold, and when the batch's state or first
    /// time changed, a move between the ordered sets. Entries without a batch are ignored.
    pub fn observe(&mut self, e: &AuditEntry) {
        // An intake command is correlated by its command id, not a batch: the batch it
        // starts names it as its cause.
        if e.event_type == "StartDataIntakeCommand" {
            return;
        }
        if let Some(id) = e.correlation_id.as_deref() {
            self.fold(id, e, BatchView::add);
        }
        // A retry or release also links the new attempt back to its batch.
        if let Some(other) = e.related_batch.as_deref() {
            self.fold(other, e, BatchView::add_link);
        }
    }

    fn fold(&mut self, id: &str, e: &AuditEntry, add: fn(&mut BatchView, &AuditEntry)) {
        let (before, after) = match self.batches.get_mut(id) {
            Some(b) => {
                let before = b.order();
                add(b, e);
                b.settle();
                (Some(before), b.order())
            }
            None => {
                let mut b = BatchView::new(id, e.occurred_at.unwrap_or(e.recorded_at));
                add(&mut b, e);
                b.settle();
                let after = b.order();
                self.batches.insert(Arc::from(id), b);
                (None, after)
            }
        };
        if before == Some(after) {
            return;
        }
        let Some((key, _)) = self.batches.get_key_value(id) else {
            return;
        };
        let key = Arc::clone(key);
        if let Some((first, state)) = before {
            let old = (first, Arc::clone(&key));
            self.newest.remove(&old);
            if let Some(set) = self.by_state.get_mut(&state) {
                set.remove(&old);
            }
        }
        let (first, state) = after;
        self.newest.insert((first, Arc::clone(&key)));
        self.by_state.entry(state).or_default().insert((first, key));
    }

    /// The batch, settled.
    pub fn get(&self, batch: &str) -> Option<BatchView> {
        self.view(batch).cloned()
    }

    /// The batch, settled, without a copy.
    pub fn view(&self, batch: &str) -> Option<&BatchView> {
        self.batches.get(batch)
    }

    /// Every batch (in `state`, when given), newest first.
    pub fn list(&self, state: Option<State>) -> Vec<BatchView> {
        self.newest(state).cloned().collect()
    }

    /// Every batch (in `state`, when given), newest first, lazily: `.take(n)` costs n.
    pub fn newest(&self, state: Option<State>) -> impl Iterator<Item = &BatchView> + '_ {
        let set = match state {
            None => Some(&self.newest),
            Some(s) => self.by_state.get(&s),
        };
        set.into_iter()
            .flatten()
            .filter_map(|(_, id)| self.batches.get(id))
    }

    /// How many batches there are (in `state`, when given).
    pub fn count(&self, state: Option<State>) -> usize {
        match state {
            None => self.batches.len(),
            Some(s) => self.by_state.get(&s).map_or(0, BTreeSet::len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    const ING: &str = "medpipe-ingestion";
    const ANON: &str = "medpipe-anonymization";
    const CAN: &str = "medpipe-canonization";

    #[test]
    fn states_follow_each_stage_closing_event() {
        let mut entries = vec![
            // a: published
            e(1, "a", "DataIngestionStarted", ING),
            e(2, "a", "SourceRecordIngested", ING),
            e(3, "a", "DataIngestionFinished", ING),
            e(4, "a", "AnonymizationStarted", ANON),
            e(5, "a", "RecordAnonymized", ANON),
            e(6, "a", "AnonymizationFinished", ANON),
            e(7, "a", "EventDataCanonizationStarted", CAN),
            e(8, "a", "CanonicalObservation", CAN),
            e(9, "a", "EventDataCanonizationCompleted", CAN),
            // b: canonization failed and withdrew
            e(10, "b", "DataIngestionFinished", ING),
            e(11, "b", "AnonymizationFinished", ANON),
            e(12, "b", "CanonicalObservation", CAN),
            e(13, "b", "CanonizationFailed", CAN),
            e(14, "b", "CanonicalObservation", CAN),
            e(15, "b", "CanonicalBatchWithdrawn", CAN),
            // c: ingestion failed, nothing else yet
            e(16, "c", "DataIngestionStarted", ING),
            e(17, "c", "DataIngestionFailed", ING),
            // d: refused as a duplicate
            e(18, "d", "DataIngestionRejected", ING),
            // e: still going
            e(19, "e", "DataIngestionStarted", ING),
        ];
        entries[2].records_expected = Some(1);
        let list = BatchIndex::from_entries(&entries).list(None);
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

    #[test]
    fn a_batch_moves_between_state_lists_as_its_entries_arrive() {
        let mut index = BatchIndex::default();
        let ids = |index: &BatchIndex, s: State| -> Vec<String> {
            index.newest(Some(s)).map(|b| b.batch.clone()).collect()
        };
        index.observe(&e(1, "x", "DataIngestionStarted", ING));
        index.observe(&e(2, "y", "DataIngestionStarted", ING));
        assert_eq!(ids(&index, State::InProgress), ["y", "x"]);
        index.observe(&e(3, "x", "AnonymizationFailed", ANON));
        assert_eq!(ids(&index, State::InProgress), ["y"]);
        assert_eq!(ids(&index, State::Held), ["x"]);
        assert_eq!(
            index.get("x").map(|b| b.failed_step),
            Some(Some("anonymization"))
        );
        index.observe(&e(4, "x", "CanonicalBatchWithdrawn", CAN));
        assert!(ids(&index, State::Held).is_empty());
        assert_eq!(ids(&index, State::Withdrawn), ["x"]);
        // An entry dated before everything else makes y the oldest, so x now comes first.
        let mut early = e(5, "y", "SourceRecordIngested", ING);
        early.occurred_at = Some(0);
        index.observe(&early);
        assert_eq!(index.list(None)[0].batch, "x");
        assert_eq!(
            (index.count(None), index.count(Some(State::Withdrawn))),
            (2, 1)
        );
        // Entries without a batch are not batches.
        let mut none = e(6, "z", "ComplianceAlert", "medpipe-auditing");
        none.correlation_id = None;
        index.observe(&none);
        assert_eq!(index.count(None), 2);
        assert!(index.get("z").is_none());
    }

    #[test]
    fn the_saga_moves_a_batch_from_held_to_retried_or_released_and_links_the_attempts() {
        let mut index = BatchIndex::default();
        let state = |i: &BatchIndex, b: &str| i.get(b).map(|v| v.state);
        index.observe(&e(1, "a", "DataIngestionStarted", ING));
        index.observe(&e(2, "a", "DataIngestionFailed", ING));
        index.observe(&e(3, "a", "AnonymizationFailed", ANON));
        index.observe(&e(4, "a", "BatchHeld", ANON));
        assert_eq!(state(&index, "a"), Some(State::Held));
        index.observe(&e(5, "a", "CanonicalBatchWithdrawn", CAN));
        assert_eq!(state(&index, "a"), Some(State::Withdrawn));
        index.observe(&e(6, "a", "BatchRetryRequested", "medpipe-cli"));
        assert_eq!(state(&index, "a"), Some(State::RetryRequested));
        let mut retried = e(7, "a", "BatchRetried", ING);
        retried.related_batch = Some("a2".into());
        index.observe(&retried);
        index.observe(&e(8, "a2", "DataIngestionStarted", ING));
        let a = index.get("a").unwrap();
        assert_eq!(
            (a.state, a.retried_as.clone()),
            (State::Retried, vec!["a2".to_string()])
        );
        assert_eq!(a.failed_step, Some("ingestion"));
        let a2 = index.get("a2").unwrap();
        assert_eq!(
            (a2.state, a2.retry_of.as_deref()),
            (State::InProgress, Some("a"))
        );
        assert_eq!(index.list(Some(State::Retried)).len(), 1);

        // A release: published partial, both ends linked.
        index.observe(&e(9, "b", "AnonymizationFailed", ANON));
        index.observe(&e(10, "b", "BatchReleaseRequested", "medpipe-cli"));
        let mut released = e(11, "b", "BatchReleased", CAN);
        released.related_batch = Some("b2".into());
        index.observe(&released);
        let b = index.get("b").unwrap();
        assert_eq!(
            (b.state, b.released_as.as_deref()),
            (State::Released, Some("b2"))
        );
        assert_eq!(index.get("b2").unwrap().release_of.as_deref(), Some("b"));

        // A stall holds a batch until it finishes.
        let mut stalled = e(12, "c", "BatchHeld", "medpipe-auditing");
        stalled.detail = Some(
            "auditing holds the batch: ingestion failed it (stalled); 0 records forwarded before"
                .into(),
        );
        index.observe(&e(11, "c", "DataIngestionStarted", ING));
        index.observe(&stalled);
        let c = index.get("c").unwrap();
        assert_eq!(
            (c.state, c.stalled, c.failed_step),
            (State::Held, true, None)
        );
        index.observe(&e(13, "c", "EventDataCanonizationCompleted", CAN));
        assert_eq!(state(&index, "c"), Some(State::Published));
    }

    #[test]
    fn a_duplicate_refused_under_a_published_batch_leaves_it_published_and_commands_are_not_batches(
    ) {
        let mut index = BatchIndex::default();
        index.observe(&e(1, "a", "DataIngestionStarted", ING));
        index.observe(&e(2, "a", "EventDataCanonizationCompleted", CAN));
        index.observe(&e(3, "a", "DataIngestionRejected", ING));
        let a = index.get("a").unwrap();
        assert_eq!(
            (a.state, a.ingestion.rejected_duplicates),
            (State::Published, 1)
        );
        // Refused before anything started: the file itself was refused.
        index.observe(&e(4, "r", "DataIngestionRejected", ING));
        assert_eq!(index.get("r").map(|b| b.state), Some(State::Rejected));
        index.observe(&e(5, "cmd-1", "StartDataIntakeCommand", "medpipe-cli"));
        assert!(index.get("cmd-1").is_none());
    }

    #[test]
    fn state_names_round_trip_and_match_the_json() {
        for &s in State::all() {
            assert_eq!(State::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::from(s.as_str())
            );
        }
        assert_eq!(State::all().len(), 8);
        assert_eq!(State::parse("retry_requested"), Some(State::RetryRequested));
        assert_eq!(State::parse("held"), Some(State::Held));
        assert_eq!(State::parse("Held"), None);
        assert_eq!(State::parse("in-progress"), None);
    }

    const TYPES: [(&str, &str); 25] = [
        ("DataIngestionCreated", ING),
        ("DataIngestionStarted", ING),
        ("SourceRecordIngested", ING),
        ("RecordRejected", ING),
        ("DataIngestionFinished", ING),
        ("DataIngestionFailed", ING),
        ("DataIngestionRejected", ING),
        ("AnonymizationStarted", ANON),
        ("RecordAnonymized", ANON),
        ("AnonymizationFinished", ANON),
        ("AnonymizationFailed", ANON),
        ("EventDataCanonizationStarted", CAN),
        ("CanonicalObservation", CAN),
        ("EventDataCanonizationCompleted", CAN),
        ("CanonizationFailed", CAN),
        ("CanonicalBatchWithdrawn", CAN),
        ("ComplianceAlert", "medpipe-auditing"),
        ("BatchHeld", ANON),
        ("BatchRetryRequested", "medpipe-cli"),
        ("BatchReleaseRequested", "medpipe-cli"),
        ("BatchWithdrawalRequested", "medpipe-cli"),
        ("BatchRetried", ING),
        ("BatchReleased", CAN),
        ("BatchReprocessRequested", "medpipe-cli"),
        ("BatchReprocessed", CAN),
    ];

    proptest! {
        /// Settling after every entry gives what one fold and one settle at the end
        /// give, and the per-state lists are exactly the full list filtered, in order.
        #[test]
        fn the_incremental_index_matches_a_fold_of_every_entry(
            steps in proptest::collection::vec((0usize..6, 0usize..TYPES.len(), 0i64..50), 0..80)
        ) {
            let entries: Vec<AuditEntry> = steps
                .iter()
                .enumerate()
                .map(|(i, &(b, t, at))| {
                    let mut x = e(i as u64, &format!("b{b}"), TYPES[t].0, TYPES[t].1);
                    x.occurred_at = Some(at);
                    x
                })
                .collect();
            let index = BatchIndex::from_entries(&entries);

            let mut folded: HashMap<String, BatchView> = HashMap::new();
            for x in &entries {
                let id = x.correlation_id.clone().unwrap_or_default();
                let at = x.occurred_at.unwrap_or(x.recorded_at);
                folded.entry(id.clone()).or_insert_with(|| BatchView::new(&id, at)).add(x);
            }
            let mut expected: Vec<BatchView> = folded.into_values().collect();
            for b in &mut expected {
                b.settle();
            }
            expected.sort_by(|x, y| (Reverse(x.first_seen), &x.batch).cmp(&(Reverse(y.first_seen), &y.batch)));

            let all = index.list(None);
            prop_assert_eq!(&all, &expected);
            for &s in State::all() {
                let want: Vec<BatchView> = expected.iter().filter(|b| b.state == s).cloned().collect();
                prop_assert_eq!(index.list(Some(s)), want.clone());
                prop_assert_eq!(index.count(Some(s)), want.len());
            }
            for b in &expected {
                prop_assert_eq!(index.view(&b.batch), Some(b));
            }
        }
    }
}
