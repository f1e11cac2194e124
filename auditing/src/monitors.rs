//! Compliance monitors for the auditing stage: stalled batches, gaps (duplicated or
//! missing records) and broken lineage, computed from audit entries alone. Pure and
//! synchronous: the stage feeds entries in with `observe` and the clock in with `tick`,
//! and records every returned `Alert` as a `ComplianceAlert` entry.
//!
//! # Firing once
//!
//! Alert ids are UUID v5 over the alert kind and its key, so the same condition always
//! has the same id. An id fires once per process (the `fired` table), and after a restart
//! the store replays every entry, past `ComplianceAlert`s included, so their ids are known
//! again before the live stream resumes. Replayed entries can trigger an alert *before*
//! the replay reaches the entry that recorded it, so replay is bracketed by
//! `begin_replay`/`end_replay`: alerts raised in between are held back, cancelled by a
//! later `ComplianceAlert` entry with their id, and the rest (raised but never recorded,
//! e.g. because of a crash) are returned by `end_replay`. Without the brackets, `observe`
//! returns replayed alerts like live ones and the caller must drop them.
//!
//! # Memory
//!
//! Everything is bounded by `max_tracked_events` or by the batches that are open:
//!
//! - `events`: id, type, service, cause and location of the last `max_tracked_events`
//!   events, evicted oldest first. Used for duplicated ids and lineage; `CauseLookup`
//!   answers for what was evicted. About 83 bytes an event at the default million (it
//!   was about 400 with owned strings): a 72-byte entry in the FIFO's ring (ids as
//!   `EventKey`s, 16 bytes inline for a UUID; types, services and topics interned) and
//!   a 4-byte position in its hash table, whose 2^21 buckets of 5 bytes (with the control
//!   byte) come to about 10.5 bytes an event (84 measured by the ignored `events_memory`
//!   test). An id that is not a lowercase hyphenated UUID adds its own allocation.
//! - `strings`: the distinct event types, services and topics of the tracked events
//!   (tens), each dropped with the last tracked event that used it.
//! - `fired`: the last `max_tracked_events` alert ids, evicted oldest first. A stall keeps
//!   its own "alerted" flag too, so eviction cannot re-fire a stall.
//! - `clocks`: one per open (batch, stage), dropped at the stage's closing event. A stage
//!   that never closes keeps its clock (a few dozen bytes) after its stall alert.
//! - `records`: per open (batch, stage), one entry per record (its position, or a 64-bit
//!   hash of its id; a few dozen bytes with the map's overhead). Dropped `gap_grace` after
//!   the stage closes, once the count is checked. During replay these checks run on the
//!   entries' own `recorded_at`, so replaying a long log does not hold every batch at once.
//! - `closed`: the last `max_tracked_events` (batch, stage) pairs that closed, so a late
//!   start or record does not reopen state that would never be closed again.
//! - `settles` and `lineage`: pending checks, each dropped once due (after `gap_grace` or
//!   `lineage_grace`), so bounded by the event rate times the grace.
//! - `owed`: alerts raised during replay and not yet matched by their recorded entry.

use std::borrow::{Borrow, Cow};
use std::collections::hash_map::{DefaultHasher, Entry, RandomState};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::num::NonZeroU32;
use std::time::Duration;

use hashbrown::HashTable;
use pipeline::events::EventType;
use uuid::Uuid;

/// One audit entry as the monitors see it: ids, types, positions and counts, no payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation<'a> {
    /// Audit entry sequence number.
    pub seq: u64,
    /// Micros since epoch, auditor clock.
    pub recorded_at: i64,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub event_id: Option<&'a str>,
    pub event_type: &'a str,
    pub correlation_id: Option<&'a str>,
    pub causation_id: Option<&'a str>,
    pub source_service: Option<&'a str>,
    /// Micros, the event's own time.
    pub occurred_at: Option<i64>,
    /// For per-record events.
    pub record_position: Option<i64>,
    /// From Finished / Completed events: records the stage produced.
    pub records_expected: Option<i64>,
    /// From Finished / Completed events: input records the stage accounted for.
    pub records_in: Option<i64>,
    /// From Finished events: records the stage before said it emitted.
    pub records_upstream: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlertKind {
    StalledBatch,
    BrokenLineage,
    PhiSentinel,
    Gap,
    /// Auditing paused consuming because the audit store's disk was full.
    AuditStorePaused,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::StalledBatch => "stalled_batch",
            AlertKind::BrokenLineage => "broken_lineage",
            AlertKind::PhiSentinel => "phi_sentinel",
            AlertKind::Gap => "gap",
            AlertKind::AuditStorePaused => "audit_store_paused",
        }
    }
}

/// The alert that puts a pause of the audit stage on the record: its store's disk was
/// full from `since` to `until` (microseconds since the epoch). Nothing was lost: what was
/// not recorded was read again from Kafka.
pub fn store_paused_alert(since: i64, until: i64) -> Alert {
    let secs = (until - since).max(0) as f64 / 1e6;
    Alert {
        id: alert_id(AlertKind::AuditStorePaused, &["paused", &since.to_string()]),
        kind: AlertKind::AuditStorePaused,
        correlation_id: None,
        topic: None,
        partition: None,
        offset: None,
        detail: format!(
            "auditing paused consuming for {secs:.1} s because the audit store's disk was full; every event consumed meanwhile was read again and recorded after space returned"
        ),
    }
}

/// A compliance alert. `detail` names event types, counts, positions, stages and
/// durations only, never payload values, so it can go to logs and the audit log as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// UUID v5 over kind and key: the same condition always gets the same id.
    pub id: String,
    pub kind: AlertKind,
    /// The batch.
    pub correlation_id: Option<String>,
    /// Where the event that raised the alert sits.
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorConfig {
    /// How long a stage may stay open between its Started and its closing event.
    pub stall_sla: Duration,
    /// How long after a closing event records from other partitions may still arrive
    /// before the count is checked.
    pub gap_grace: Duration,
    /// How long a canonical record's cause may take to arrive before `CauseLookup` is
    /// asked and the lineage is judged.
    pub lineage_grace: Duration,
    /// Size of each FIFO table (recent events, fired alert ids, closed stages).
    pub max_tracked_events: usize,
}

/// Resolves an event id the monitors no longer (or not yet) hold, usually from the store.
pub trait CauseLookup {
    /// `(event_type, source_service, causation_id)` of the event, if known.
    fn source_of(&self, event_id: &str) -> Option<(String, Option<String>, Option<String>)>;
}

/// A lookup that knows nothing: lineage is judged from memory alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLookup;

impl CauseLookup for NoLookup {
    fn source_of(&self, _event_id: &str) -> Option<(String, Option<String>, Option<String>)> {
        None
    }
}

/// Sizes of the monitors' tables, for tests and gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tracked {
    pub events: usize,
    pub fired_alerts: usize,
    pub open_clocks: usize,
    pub record_stages: usize,
    pub record_entries: usize,
    pub closed_stages: usize,
    pub pending_gap_checks: usize,
    pub pending_lineage_checks: usize,
    pub owed_alerts: usize,
}

/// The event type under which the stage records its own alerts.
pub const ALERT_EVENT_TYPE: &str = EventType::ComplianceAlert.as_str();
const ANONYMIZATION_SERVICE: &str = "medpipe-anonymization";
const MAX_LINEAGE_HOPS: usize = 8;
/// Namespace of alert ids. Changing it changes every id, and so re-fires every alert.
const ALERT_NAMESPACE: Uuid = Uuid::from_u128(0x3f1c_9a2e_6b7d_5e40_8a11_6d65_6470_6970);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Stage {
    Ingestion,
    Anonymization,
    Canonization,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::Ingestion => "ingestion",
            Stage::Anonymization => "anonymization",
            Stage::Canonization => "canonization",
        }
    }

    /// What the stage's closing count counts, for alert details.
    fn counted_label(self) -> &'static str {
        match self {
            Stage::Ingestion => "SourceRecordIngested",
            Stage::Anonymization => "RecordAnonymized",
            Stage::Canonization => "canonical records",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Starts the stage's clock.
    Start,
    /// Stops the clock; its `records_expected` is checked against the records seen.
    Complete,
    /// Stops the clock; nothing to count.
    Fail,
    /// One record, counted by the stage's `Complete`.
    Record,
    /// One record, checked for duplicated positions but not counted.
    Rejected,
    /// One record, counted by event id: its position is its source record's, which can
    /// yield several (a patient and its observations), so positions repeat by design.
    Derived,
}

/// The batch lifecycle: what each event type means to the monitors. Matched on the typed
/// `EventType`, so renaming or removing a lifecycle event fails to compile here. Canonical
/// records of every resource type are `(Canonization, Derived)`; any other event type (and
/// a name the catalogue does not know) plays no part in the lifecycle.
fn lifecycle(t: EventType) -> Option<(Stage, Role)> {
    use EventType as E;
    if t.resource_type().is_some() {
        return Some((Stage::Canonization, Role::Derived));
    }
    Some(match t {
        E::DataIngestionStarted => (Stage::Ingestion, Role::Start),
        E::SourceRecordIngested => (Stage::Ingestion, Role::Record),
        E::RecordRejected => (Stage::Ingestion, Role::Rejected),
        E::DataIngestionFinished => (Stage::Ingestion, Role::Complete),
        E::DataIngestionFailed => (Stage::Ingestion, Role::Fail),
        E::AnonymizationStarted => (Stage::Anonymization, Role::Start),
        E::RecordAnonymized => (Stage::Anonymization, Role::Record),
        E::AnonymizationFinished => (Stage::Anonymization, Role::Complete),
        E::AnonymizationFailed => (Stage::Anonymization, Role::Fail),
        E::EventDataCanonizationStarted => (Stage::Canonization, Role::Start),
        E::EventDataCanonizationCompleted => (Stage::Canonization, Role::Complete),
        E::CanonizationFailed => (Stage::Canonization, Role::Fail),
        _ => return None,
    })
}

fn classify(event_type: &str) -> Option<(Stage, Role)> {
    EventType::parse(event_type).and_then(lifecycle)
}

/// The id of the alert of `kind` for `key` (e.g. `[batch, stage]` for a stall,
/// `[event_id]` for lineage or the sentinel): UUID v5 over `kind|key[0]|key[1]...`.
pub fn alert_id(kind: AlertKind, key: &[&str]) -> String {
    let mut name = String::from(kind.as_str());
    for part in key {
        name.push('|');
        name.push_str(part);
    }
    Uuid::new_v5(&ALERT_NAMESPACE, name.as_bytes()).to_string()
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn secs(micros: i64) -> i64 {
    micros / 1_000_000
}

/// Records are told apart by a 64-bit hash of their event id rather than the id itself,
/// which keeps a million-record batch in tens of megabytes.
fn id_hash(id: &str) -> u64 {
    let mut h = DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// A map that keeps its newest `cap` keys. Each entry is stored once, in a ring in
/// arrival order; the hash table holds only its sequence number, so the key is not
/// stored twice and the table costs 4 bytes a bucket. Keys are never removed otherwise,
/// so the ring and the table always hold the same entries.
#[derive(Debug)]
struct Fifo<K, V> {
    /// Oldest first: `ring[i]` has sequence number `base + i` (wrapping).
    ring: VecDeque<(K, V)>,
    /// Sequence numbers of the ring's entries, hashed by key.
    index: HashTable<u32>,
    base: u32,
    hasher: RandomState,
    cap: usize,
}

/// Sequence numbers wrap at 2^32, so the ring (at most `cap + 1` entries) must stay
/// shorter than that. A larger cap would need hundreds of gigabytes anyway.
const MAX_FIFO_CAP: usize = 1 << 30;

impl<K: Hash + Eq, V> Fifo<K, V> {
    fn new(cap: usize) -> Self {
        Fifo {
            ring: VecDeque::new(),
            index: HashTable::new(),
            base: 0,
            hasher: RandomState::new(),
            cap: cap.min(MAX_FIFO_CAP),
        }
    }

    /// Inserts unless present. Returns the oldest entry if it was evicted to make room.
    fn insert(&mut self, key: K, value: V) -> Option<(K, V)> {
        if self.position(&key).is_some() {
            return None;
        }
        if self.ring.len() == self.ring.capacity() {
            // Doubling, but never past the cap: a full ring wastes no slots.
            let room = self.ring.len().max(4).min(self.cap + 1 - self.ring.len());
            self.ring.reserve_exact(room);
        }
        let hash = self.hasher.hash_one(&key);
        // Fits: the ring holds at most `cap + 1` entries and cap is at most 2^30.
        let seq = self.base.wrapping_add(self.ring.len() as u32);
        self.ring.push_back((key, value));
        let (ring, hasher, base) = (&self.ring, &self.hasher, self.base);
        self.index.insert_unique(hash, seq, |&s| {
            ring.get(s.wrapping_sub(base) as usize)
                .map_or(0, |(k, _)| hasher.hash_one(k))
        });
        if self.ring.len() <= self.cap {
            return None;
        }
        let old = self.ring.pop_front()?;
        let base = self.base;
        if let Ok(entry) = self
            .index
            .find_entry(self.hasher.hash_one(&old.0), |&s| s == base)
        {
            entry.remove();
        }
        self.base = self.base.wrapping_add(1);
        Some(old)
    }

    /// Where `key` sits in the ring.
    fn position<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<usize>
    where
        K: Borrow<Q>,
    {
        let slot = |s: u32| s.wrapping_sub(self.base) as usize;
        self.index
            .find(self.hasher.hash_one(key), |&s| {
                self.ring
                    .get(slot(s))
                    .is_some_and(|(k, _)| k.borrow() == key)
            })
            .map(|&s| slot(s))
    }

    fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        let i = self.position(key)?;
        self.ring.get(i).map(|(_, v)| v)
    }

    fn get_mut<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        let i = self.position(key)?;
        self.ring.get_mut(i).map(|(_, v)| v)
    }

    fn contains<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.position(key).is_some()
    }

    fn len(&self) -> usize {
        self.ring.len()
    }
}

/// An event id, compact but exact. A UUID written the way the pipeline writes them
/// (lowercase, hyphenated) is kept as its 16 bytes; any other id, including a UUID in
/// another form, as written. So two distinct ids never compare equal (which would raise
/// a false duplicate alert), and `to_string` gives back the id exactly as it came.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum EventKey {
    Uuid(Uuid),
    Other(Box<str>),
}

impl EventKey {
    fn of(id: &str) -> Self {
        if id.len() == uuid::fmt::Hyphenated::LENGTH {
            if let Ok(u) = Uuid::try_parse(id) {
                let mut buf = Uuid::encode_buffer();
                if u.hyphenated().encode_lower(&mut buf) == id {
                    return EventKey::Uuid(u);
                }
            }
        }
        EventKey::Other(id.into())
    }
}

impl fmt::Display for EventKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventKey::Uuid(u) => fmt::Display::fmt(&u.hyphenated(), f),
            EventKey::Other(id) => f.write_str(id),
        }
    }
}

/// An interned string in `Strings`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sym(NonZeroU32);

impl Sym {
    fn index(self) -> usize {
        self.0.get() as usize - 1
    }
}

/// The event types, services and topics of the tracked events, each stored once: they
/// repeat across millions of events but take tens of values. Counted, so a value goes
/// with the last tracked event that used it and a producer sending ever new values
/// cannot grow this table past the events table.
#[derive(Debug, Default)]
struct Strings {
    syms: HashMap<Box<str>, Sym>,
    /// By `Sym::index`: the value and how many tracked events use it (0: a free slot).
    values: Vec<(Box<str>, u32)>,
    free: Vec<Sym>,
}

impl Strings {
    fn intern(&mut self, s: &str) -> Sym {
        if let Some(&sym) = self.syms.get(s) {
            if let Some((_, uses)) = self.values.get_mut(sym.index()) {
                *uses += 1;
            }
            return sym;
        }
        let sym = match self.free.pop() {
            Some(sym) => {
                if let Some(slot) = self.values.get_mut(sym.index()) {
                    *slot = (s.into(), 1);
                }
                sym
            }
            None => {
                self.values.push((s.into(), 1));
                // At most three values an event for at most 2^30 + 1 events: never saturates.
                let index = u32::try_from(self.values.len() - 1).unwrap_or(u32::MAX);
                Sym(NonZeroU32::MIN.saturating_add(index))
            }
        };
        self.syms.insert(s.into(), sym);
        sym
    }

    fn get(&self, sym: Sym) -> &str {
        self.values.get(sym.index()).map_or("", |(s, _)| s)
    }

    fn release(&mut self, sym: Sym) {
        let Some((value, uses)) = self.values.get_mut(sym.index()) else {
            return;
        };
        *uses = uses.saturating_sub(1);
        if *uses == 0 {
            self.syms.remove(&**value);
            *value = Box::default();
            self.free.push(sym);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Location {
    topic: String,
    partition: i32,
    offset: i64,
}

impl Location {
    fn of(o: &Observation) -> Self {
        Location {
            topic: o.topic.to_string(),
            partition: o.partition,
            offset: o.offset,
        }
    }
}

/// What duplicate and lineage checks need of a tracked event, in 48 bytes.
#[derive(Debug)]
struct EventInfo {
    causation_id: Option<EventKey>,
    offset: i64,
    partition: i32,
    topic: Sym,
    event_type: Sym,
    source_service: Option<Sym>,
}

type StageKey = (String, Stage);

#[derive(Debug)]
struct Clock {
    start: i64,
    alerted: bool,
    at: Location,
}

/// Whether a closed stage still accepts records (within `gap_grace`) or has been settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    Settling,
    Settled,
}

#[derive(Debug, Default)]
struct RecordState {
    /// Record event types seen in this stage; positions refer to them by index.
    types: Vec<String>,
    /// (type index, position) → id hash of the first event seen there.
    positions: HashMap<(usize, i64), u64>,
    /// Id hashes of counted records without a (unique) position.
    unpositioned: HashSet<u64>,
    /// Distinct positions of counted records.
    counted_positions: usize,
}

impl RecordState {
    fn type_index(&mut self, event_type: &str) -> usize {
        match self.types.iter().position(|t| t == event_type) {
            Some(i) => i,
            None => {
                self.types.push(event_type.to_string());
                self.types.len() - 1
            }
        }
    }

    fn seen(&self) -> usize {
        self.counted_positions + self.unpositioned.len()
    }

    fn entries(&self) -> usize {
        self.positions.len() + self.unpositioned.len()
    }
}

/// The counts each stage's closing event gave for one batch, indexed by `Stage`.
#[derive(Debug, Default)]
struct BatchCounts {
    produced: [Option<i64>; 3],
    consumed: [Option<i64>; 3],
}

/// A count check due `gap_grace` after a stage closed.
#[derive(Debug)]
struct Settle {
    key: StageKey,
    expected: Option<i64>,
    due: i64,
    at: Location,
}

/// A canonical record whose lineage could not be judged when it arrived.
#[derive(Debug)]
struct LineageCheck {
    event_id: String,
    event_type: String,
    causation_id: Option<String>,
    correlation_id: Option<String>,
    due: i64,
    at: Location,
}

enum Lineage {
    Ok,
    Broken(String),
    Unresolved(String),
}

/// The compliance monitors. See the module docs for what is kept and for how long.
#[derive(Debug)]
pub struct Monitors {
    stall_sla: i64,
    gap_grace: i64,
    lineage_grace: i64,
    events: Fifo<EventKey, EventInfo>,
    /// The strings `events` refers to.
    strings: Strings,
    fired: Fifo<String, ()>,
    clocks: BTreeMap<StageKey, Clock>,
    closed: Fifo<StageKey, Closed>,
    records: HashMap<StageKey, RecordState>,
    settles: VecDeque<Settle>,
    lineage: VecDeque<LineageCheck>,
    replaying: bool,
    owed: Vec<Alert>,
    /// Closing counts per batch, to compare each stage's input with its upstream's output.
    batch_counts: Fifo<String, BatchCounts>,
    /// Checks that came due during replay but failed: judged again, live, at the next tick.
    deferred_settles: Vec<Settle>,
    deferred_lineage: Vec<LineageCheck>,
}

impl Monitors {
    pub fn new(cfg: MonitorConfig) -> Self {
        let cap = cfg.max_tracked_events;
        Monitors {
            stall_sla: micros(cfg.stall_sla),
            gap_grace: micros(cfg.gap_grace),
            lineage_grace: micros(cfg.lineage_grace),
            events: Fifo::new(cap),
            strings: Strings::default(),
            fired: Fifo::new(cap),
            clocks: BTreeMap::new(),
            closed: Fifo::new(cap),
            batch_counts: Fifo::new(cap),
            records: HashMap::new(),
            settles: VecDeque::new(),
            lineage: VecDeque::new(),
            replaying: false,
            owed: Vec::new(),
            deferred_settles: Vec::new(),
            deferred_lineage: Vec::new(),
        }
    }

    /// Starts replaying the store. Until `end_replay` (or the next `tick`), `observe`
    /// returns nothing: alerts are held until the replay shows whether they were recorded,
    /// and count checks run on the entries' own `recorded_at` so replay memory stays bounded.
    pub fn begin_replay(&mut self) {
        self.replaying = true;
    }

    /// Ends replay and returns the alerts replayed entries raised that the store has no
    /// `ComplianceAlert` entry for. The stage records them like any other alert.
    pub fn end_replay(&mut self) -> Vec<Alert> {
        self.replaying = false;
        std::mem::take(&mut self.owed)
    }

    /// Feed one entry (live, or replayed from the store at startup). Returns alerts that
    /// fire immediately (e.g. a duplicated event id).
    pub fn observe(&mut self, o: &Observation) -> Vec<Alert> {
        let mut out = Vec::new();
        if o.event_type == ALERT_EVENT_TYPE {
            if let Some(id) = o.event_id {
                self.fired.insert(id.to_string(), ());
                self.owed.retain(|a| a.id != id);
            }
            return out;
        }
        if self.replaying {
            self.sweep(o.recorded_at, None, &mut out);
        }
        if let Some(id) = o.event_id {
            let key = EventKey::of(id);
            match self.events.get(&key) {
                // The same entry fed twice: nothing new.
                Some(first)
                    if self.strings.get(first.topic) == o.topic
                        && first.partition == o.partition
                        && first.offset == o.offset =>
                {
                    return out
                }
                Some(first) => {
                    let alert = Alert {
                        id: alert_id(AlertKind::Gap, &["event", id]),
                        kind: AlertKind::Gap,
                        correlation_id: o.correlation_id.map(str::to_string),
                        topic: Some(o.topic.to_string()),
                        partition: Some(o.partition),
                        offset: Some(o.offset),
                        detail: format!(
                            "duplicated event id: {} also at partition {} offset {}",
                            o.event_type, first.partition, first.offset
                        ),
                    };
                    self.emit(alert, &mut out);
                    // A copy adds nothing to counts, clocks or lineage.
                    return out;
                }
                None => self.track(key, o),
            }
        }
        let Some((stage, role)) = classify(o.event_type) else {
            return out;
        };
        if let Some(batch) = o.correlation_id {
            let key = (batch.to_string(), stage);
            match role {
                Role::Start => self.start(key, o),
                Role::Complete => {
                    self.check_counts(batch, stage, o, &mut out);
                    self.close(key, o.records_expected, o);
                }
                Role::Fail => self.close(key, None, o),
                Role::Record | Role::Rejected | Role::Derived => {
                    self.record(key, role, o, &mut out)
                }
            }
        }
        if role == Role::Derived {
            self.check_lineage(o, &mut out);
        }
        out
    }

    /// Remembers a new event, and forgets the oldest one if it is over the cap.
    fn track(&mut self, key: EventKey, o: &Observation) {
        let info = EventInfo {
            causation_id: o.causation_id.map(EventKey::of),
            offset: o.offset,
            partition: o.partition,
            topic: self.strings.intern(o.topic),
            event_type: self.strings.intern(o.event_type),
            source_service: o.source_service.map(|s| self.strings.intern(s)),
        };
        if let Some((_, old)) = self.events.insert(key, info) {
            self.strings.release(old.topic);
            self.strings.release(old.event_type);
            if let Some(service) = old.source_service {
                self.strings.release(service);
            }
        }
    }

    /// Time-based checks. `now` in micros. `lookup` resolves causes no longer (or not
    /// yet) in memory. Ends a replay that `end_replay` did not.
    pub fn tick(&mut self, now: i64, lookup: &dyn CauseLookup) -> Vec<Alert> {
        let mut out = if self.replaying {
            self.end_replay()
        } else {
            Vec::new()
        };
        let mut stalled = Vec::new();
        for ((batch, stage), clock) in self.clocks.iter_mut() {
            let open = now.saturating_sub(clock.start);
            if clock.alerted || open <= self.stall_sla {
                continue;
            }
            clock.alerted = true;
            stalled.push(Alert {
                id: alert_id(AlertKind::StalledBatch, &[batch, stage.as_str()]),
                kind: AlertKind::StalledBatch,
                correlation_id: Some(batch.clone()),
                topic: Some(clock.at.topic.clone()),
                partition: Some(clock.at.partition),
                offset: Some(clock.at.offset),
                detail: format!(
                    "{} stage open for {}s, over the {}s SLA",
                    stage.as_str(),
                    secs(open),
                    secs(self.stall_sla)
                ),
            });
        }
        for alert in stalled {
            self.emit(alert, &mut out);
        }
        for settle in std::mem::take(&mut self.deferred_settles) {
            self.settle(settle, &mut out);
        }
        for check in std::mem::take(&mut self.deferred_lineage) {
            self.judge_lineage(check, Some(lookup), &mut out);
        }
        self.sweep(now, Some(lookup), &mut out);
        out
    }

    /// Sizes of the tables, for tests and gauges.
    pub fn tracked(&self) -> Tracked {
        Tracked {
            events: self.events.len(),
            fired_alerts: self.fired.len(),
            open_clocks: self.clocks.len(),
            record_stages: self.records.len(),
            record_entries: self.records.values().map(RecordState::entries).sum(),
            closed_stages: self.closed.len(),
            pending_gap_checks: self.settles.len() + self.deferred_settles.len(),
            pending_lineage_checks: self.lineage.len() + self.deferred_lineage.len(),
            owed_alerts: self.owed.len(),
        }
    }

    /// Fires `alert` unless its id already fired (in this process or, per the replayed
    /// store, before). During replay it is owed rather than returned.
    fn emit(&mut self, alert: Alert, out: &mut Vec<Alert>) {
        if self.fired.contains(&alert.id) {
            return;
        }
        self.fired.insert(alert.id.clone(), ());
        if self.replaying {
            self.owed.push(alert);
        } else {
            out.push(alert);
        }
    }

    fn start(&mut self, key: StageKey, o: &Observation) {
        // A start after the close (a redelivered or reordered event) must not open a clock
        // that nothing would stop.
        if self.closed.contains(&key) {
            return;
        }
        let start = o.occurred_at.unwrap_or(o.recorded_at);
        let clock = self.clocks.entry(key).or_insert_with(|| Clock {
            start,
            alerted: false,
            at: Location::of(o),
        });
        clock.start = clock.start.min(start);
    }

    /// A stage's closing event: its own counts must add up (every record its upstream
    /// emitted accounted for), and, once both neighbours have closed the batch, no stage
    /// may have taken in fewer records than the stage before it emitted.
    fn check_counts(&mut self, batch: &str, stage: Stage, o: &Observation, out: &mut Vec<Alert>) {
        let mut alerts = Vec::new();
        if let (Some(upstream), Some(accounted)) = (o.records_upstream, o.records_in) {
            if upstream != accounted {
                alerts.push((
                    "counts",
                    stage,
                    format!(
                        "{} does not add up: the stage before emitted {upstream} records, {} accounted for {accounted}",
                        o.event_type,
                        stage.as_str()
                    ),
                ));
            }
        }
        if !self.batch_counts.contains(batch) {
            self.batch_counts
                .insert(batch.to_string(), BatchCounts::default());
        }
        if let Some(counts) = self.batch_counts.get_mut(&batch.to_string()) {
            let i = stage as usize;
            counts.produced[i] = o.records_expected;
            counts.consumed[i] = o.records_in;
            for (up, down) in [
                (Stage::Ingestion, Stage::Anonymization),
                (Stage::Anonymization, Stage::Canonization),
            ] {
                if let (Some(emitted), Some(taken)) =
                    (counts.produced[up as usize], counts.consumed[down as usize])
                {
                    if taken < emitted {
                        alerts.push((
                            "downstream",
                            down,
                            format!(
                                "{} closed the batch with {taken} records in, but {} emitted {emitted}: {} missing",
                                down.as_str(),
                                up.as_str(),
                                emitted - taken
                            ),
                        ));
                    }
                }
            }
        }
        for (what, stage, detail) in alerts {
            let alert = Alert {
                id: alert_id(AlertKind::Gap, &[what, batch, stage.as_str()]),
                kind: AlertKind::Gap,
                correlation_id: Some(batch.to_string()),
                topic: Some(o.topic.to_string()),
                partition: Some(o.partition),
                offset: Some(o.offset),
                detail,
            };
            self.emit(alert, out);
        }
    }

    fn close(&mut self, key: StageKey, expected: Option<i64>, o: &Observation) {
        if self.closed.contains(&key) {
            return;
        }
        self.clocks.remove(&key);
        self.closed.insert(key.clone(), Closed::Settling);
        self.settles.push_back(Settle {
            key,
            expected,
            due: o.recorded_at.saturating_add(self.gap_grace),
            at: Location::of(o),
        });
    }

    fn record(&mut self, key: StageKey, role: Role, o: &Observation, out: &mut Vec<Alert>) {
        let Some(id) = o.event_id else { return };
        if self.closed.get(&key) == Some(&Closed::Settled) {
            return;
        }
        let counted = matches!(role, Role::Record | Role::Derived);
        let hash = id_hash(id);
        let state = self.records.entry(key).or_default();
        let position = match (role, o.record_position) {
            (Role::Derived, _) => None,
            (_, position) => position,
        };
        let Some(position) = position else {
            if counted {
                state.unpositioned.insert(hash);
            }
            return;
        };
        let ix = state.type_index(o.event_type);
        match state.positions.entry((ix, position)) {
            Entry::Vacant(v) => {
                v.insert(hash);
                if counted {
                    state.counted_positions += 1;
                }
            }
            Entry::Occupied(first) if *first.get() != hash => {
                let batch = o.correlation_id.unwrap_or_default();
                let alert = Alert {
                    id: alert_id(
                        AlertKind::Gap,
                        &["position", batch, o.event_type, &position.to_string()],
                    ),
                    kind: AlertKind::Gap,
                    correlation_id: o.correlation_id.map(str::to_string),
                    topic: Some(o.topic.to_string()),
                    partition: Some(o.partition),
                    offset: Some(o.offset),
                    detail: format!(
                        "duplicated record at position {position}: two {} events",
                        o.event_type
                    ),
                };
                self.emit(alert, out);
            }
            Entry::Occupied(_) => {}
        }
    }

    /// Judges a canonical record's lineage from memory at once; what memory cannot settle
    /// waits `lineage_grace` for the cause to arrive.
    fn check_lineage(&mut self, o: &Observation, out: &mut Vec<Alert>) {
        let Some(id) = o.event_id else { return };
        let check = LineageCheck {
            event_id: id.to_string(),
            event_type: o.event_type.to_string(),
            causation_id: o.causation_id.map(str::to_string),
            correlation_id: o.correlation_id.map(str::to_string),
            due: o.recorded_at.saturating_add(self.lineage_grace),
            at: Location::of(o),
        };
        match self.resolve(&check, None) {
            Lineage::Ok => {}
            Lineage::Broken(detail) => self.fire_lineage(&check, detail, out),
            Lineage::Unresolved(_) => self.lineage.push_back(check),
        }
    }

    /// Runs the checks due at `now`. Without a lookup (during replay) a failing count or
    /// an unresolved lineage is deferred to the first live tick rather than fired, since
    /// the live stage may have seen more before it judged.
    fn sweep(&mut self, now: i64, lookup: Option<&dyn CauseLookup>, out: &mut Vec<Alert>) {
        while self.settles.front().is_some_and(|s| s.due < now) {
            if let Some(settle) = self.settles.pop_front() {
                self.settle(settle, out);
            }
        }
        while self.lineage.front().is_some_and(|c| c.due < now) {
            if let Some(check) = self.lineage.pop_front() {
                self.judge_lineage(check, lookup, out);
            }
        }
    }

    fn settle(&mut self, settle: Settle, out: &mut Vec<Alert>) {
        let seen = self.records.get(&settle.key).map_or(0, RecordState::seen);
        let seen = i64::try_from(seen).unwrap_or(i64::MAX);
        if let Some(expected) = settle.expected.filter(|e| *e > seen) {
            if self.replaying {
                self.deferred_settles.push(settle);
                return;
            }
            let (batch, stage) = &settle.key;
            let alert = Alert {
                id: alert_id(AlertKind::Gap, &["missing", batch, stage.as_str()]),
                kind: AlertKind::Gap,
                correlation_id: Some(batch.clone()),
                topic: Some(settle.at.topic.clone()),
                partition: Some(settle.at.partition),
                offset: Some(settle.at.offset),
                detail: format!("expected {expected} {}, saw {seen}", stage.counted_label()),
            };
            self.emit(alert, out);
        }
        self.records.remove(&settle.key);
        match self.closed.get_mut(&settle.key) {
            Some(state) => *state = Closed::Settled,
            None => {
                self.closed.insert(settle.key, Closed::Settled);
            }
        }
    }

    fn judge_lineage(
        &mut self,
        check: LineageCheck,
        lookup: Option<&dyn CauseLookup>,
        out: &mut Vec<Alert>,
    ) {
        match self.resolve(&check, lookup) {
            Lineage::Ok => {}
            Lineage::Broken(detail) => self.fire_lineage(&check, detail, out),
            Lineage::Unresolved(_) if lookup.is_none() => self.deferred_lineage.push(check),
            Lineage::Unresolved(detail) => self.fire_lineage(&check, detail, out),
        }
    }

    fn fire_lineage(&mut self, check: &LineageCheck, detail: String, out: &mut Vec<Alert>) {
        let alert = Alert {
            id: alert_id(AlertKind::BrokenLineage, &[&check.event_id]),
            kind: AlertKind::BrokenLineage,
            correlation_id: check.correlation_id.clone(),
            topic: Some(check.at.topic.clone()),
            partition: Some(check.at.partition),
            offset: Some(check.at.offset),
            detail,
        };
        self.emit(alert, out);
    }

    /// Walks the causation chain, from memory first and then from `lookup`, for at most
    /// `MAX_LINEAGE_HOPS` hops, looking for an event of the anonymization stage.
    fn resolve(&self, check: &LineageCheck, lookup: Option<&dyn CauseLookup>) -> Lineage {
        let Some(mut cause) = check.causation_id.as_deref().map(EventKey::of) else {
            return Lineage::Broken(format!("{} has no causation id", check.event_type));
        };
        for hop in 1..=MAX_LINEAGE_HOPS {
            let known = match self.events.get(&cause) {
                Some(e) => Some((
                    Cow::Borrowed(self.strings.get(e.event_type)),
                    e.source_service
                        .is_some_and(|s| self.strings.get(s) == ANONYMIZATION_SERVICE),
                    e.causation_id.clone(),
                )),
                None => lookup.and_then(|l| l.source_of(&cause.to_string())).map(
                    |(event_type, service, next)| {
                        (
                            Cow::Owned(event_type),
                            service.as_deref() == Some(ANONYMIZATION_SERVICE),
                            next.as_deref().map(EventKey::of),
                        )
                    },
                ),
            };
            let Some((event_type, anonymized, next)) = known else {
                return Lineage::Unresolved(format!(
                    "cause {hop} hop(s) up from {} not found after {}s",
                    check.event_type,
                    secs(self.lineage_grace)
                ));
            };
            if anonymized {
                return Lineage::Ok;
            }
            match next {
                Some(next) => cause = next,
                None => {
                    return Lineage::Broken(format!(
                        "{} traces back to {event_type} after {hop} hop(s) without passing anonymization",
                        check.event_type
                    ))
                }
            }
        }
        Lineage::Broken(format!(
            "{} has no anonymization cause within {MAX_LINEAGE_HOPS} hops",
            check.event_type
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::AuditEntry;
    use crate::observation;

    const SEC: i64 = 1_000_000;
    const BATCH: &str = "b-1";

    fn cfg(cap: usize) -> MonitorConfig {
        MonitorConfig {
            stall_sla: Duration::from_secs(60),
            gap_grace: Duration::from_secs(10),
            lineage_grace: Duration::from_secs(30),
            max_tracked_events: cap,
        }
    }

    /// An owned audit entry, built with defaults that follow the event type's stage.
    #[derive(Debug, Clone)]
    /// An entry under construction; `offset` stays unset until fed, unless `loc` sets it.
    struct Ev {
        entry: AuditEntry,
        offset: Option<i64>,
    }

    fn ev(event_type: &str, id: &str) -> Ev {
        let (topic, service) = if EventType::parse(event_type)
            .is_some_and(|t| t.resource_type().is_some())
            || event_type.contains("Canoniz")
        {
            ("medpipe.canonical.patient.v1", "medpipe-canonization")
        } else if event_type.contains("Anonymiz") {
            ("medpipe.anonymization.v1", ANONYMIZATION_SERVICE)
        } else {
            ("medpipe.ingestion.v1", "medpipe-ingestion")
        };
        Ev {
            entry: AuditEntry {
                topic: topic.into(),
                event_id: Some(id.into()),
                event_type: event_type.into(),
                correlation_id: Some(BATCH.into()),
                source_service: Some(service.into()),
                ..AuditEntry::default()
            },
            offset: None,
        }
    }

    impl Ev {
        fn at(mut self, secs: i64) -> Self {
            self.entry.recorded_at = secs * SEC;
            self
        }
        fn occurred(mut self, secs: i64) -> Self {
            self.entry.occurred_at = Some(secs * SEC);
            self
        }
        fn pos(mut self, p: i64) -> Self {
            self.entry.record_position = Some(p);
            self
        }
        fn expect(mut self, n: i64) -> Self {
            self.entry.records_expected = Some(n);
            self
        }
        /// A closing event's input counts: what the stage before emitted, and what this
        /// stage accounted for.
        fn took(mut self, upstream: Option<i64>, accounted: i64) -> Self {
            self.entry.records_upstream = upstream;
            self.entry.records_in = Some(accounted);
            self
        }
        fn cause(mut self, id: &str) -> Self {
            self.entry.causation_id = Some(id.into());
            self
        }
        fn batch(mut self, b: &str) -> Self {
            self.entry.correlation_id = Some(b.into());
            self
        }
        fn loc(mut self, partition: i32, offset: i64) -> Self {
            self.entry.partition = partition;
            self.offset = Some(offset);
            self
        }
    }

    /// Feeds entries in order, giving each the next offset unless it has one, and keeps
    /// the log (alerts included, as the stage would record them) for replay tests.
    struct Harness {
        m: Monitors,
        log: Vec<AuditEntry>,
    }

    impl Harness {
        fn new(cap: usize) -> Self {
            Harness {
                m: Monitors::new(cfg(cap)),
                log: Vec::new(),
            }
        }

        fn feed(&mut self, e: Ev) -> Vec<Alert> {
            let seq = self.log.len() as u64;
            let mut entry = e.entry;
            entry.seq = seq;
            entry.offset = e.offset.unwrap_or(seq as i64);
            let alerts = self.m.observe(&observation(&entry));
            self.log.push(entry);
            self.record(&alerts);
            alerts
        }

        fn tick(&mut self, secs: i64) -> Vec<Alert> {
            self.tick_with(secs, &NoLookup)
        }

        fn tick_with(&mut self, secs: i64, lookup: &dyn CauseLookup) -> Vec<Alert> {
            let alerts = self.m.tick(secs * SEC, lookup);
            self.record(&alerts);
            alerts
        }

        /// Appends alerts to the log as the stage does, on its own audit topic.
        fn record(&mut self, alerts: &[Alert]) {
            for a in alerts {
                let seq = self.log.len() as u64;
                let mut e = ev(ALERT_EVENT_TYPE, &a.id).entry;
                e.topic = "medpipe.audit.v1".into();
                e.correlation_id = a.correlation_id.clone();
                e.seq = seq;
                e.offset = seq as i64;
                self.log.push(e);
            }
        }

        /// A fresh monitor fed the whole log, as after a restart.
        fn restart(&self, cap: usize) -> (Monitors, Vec<Alert>) {
            let mut m = Monitors::new(cfg(cap));
            m.begin_replay();
            for e in &self.log {
                assert!(m.observe(&observation(e)).is_empty());
            }
            let owed = m.end_replay();
            (m, owed)
        }
    }

    fn kinds(alerts: &[Alert]) -> Vec<(AlertKind, String)> {
        alerts.iter().map(|a| (a.kind, a.detail.clone())).collect()
    }

    /// A CauseLookup backed by a fixed table, counting its calls.
    #[derive(Default)]
    struct Table {
        rows: HashMap<String, (String, Option<String>, Option<String>)>,
        calls: std::cell::Cell<usize>,
    }

    impl CauseLookup for Table {
        fn source_of(&self, id: &str) -> Option<(String, Option<String>, Option<String>)> {
            self.calls.set(self.calls.get() + 1);
            self.rows.get(id).cloned()
        }
    }

    /// Ingestion, anonymization and one canonical record with proper causes.
    fn happy_lineage(h: &mut Harness) {
        h.feed(ev("DataIngestionStarted", "ds").at(0));
        h.feed(ev("SourceRecordIngested", "s0").at(1).pos(0).cause("ds"));
        h.feed(ev("AnonymizationStarted", "as").at(2).cause("ds"));
        h.feed(ev("RecordAnonymized", "r0").at(3).pos(0).cause("s0"));
    }

    /// Feeds a whole healthy-looking batch of `n` records whose closing events carry the
    /// given counts, and returns every alert raised, ticks included.
    fn close_batch(ingested: i64, anonymization: (i64, i64, i64), canonized_in: i64) -> Vec<Alert> {
        let (upstream, accounted, produced) = anonymization;
        let mut h = Harness::new(1000);
        let mut alerts = Vec::new();
        alerts.extend(h.feed(ev("DataIngestionStarted", "ds").at(0)));
        for i in 0..ingested {
            alerts.extend(
                h.feed(
                    ev("SourceRecordIngested", &format!("si{i}"))
                        .at(0)
                        .pos(i + 1),
                ),
            );
        }
        alerts.extend(h.feed(ev("DataIngestionFinished", "df").at(1).expect(ingested)));
        alerts.extend(h.feed(ev("AnonymizationStarted", "as").at(1).cause("ds")));
        for i in 0..produced {
            alerts.extend(h.feed(ev("RecordAnonymized", &format!("ra{i}")).at(1).pos(i + 1)));
        }
        alerts.extend(
            h.feed(
                ev("AnonymizationFinished", "af")
                    .at(2)
                    .expect(produced)
                    .took(Some(upstream), accounted),
            ),
        );
        alerts.extend(
            h.feed(
                ev("EventDataCanonizationCompleted", "cc")
                    .at(3)
                    .expect(0)
                    .took(None, canonized_in),
            ),
        );
        alerts.extend(h.tick(100));
        alerts
    }

    #[test]
    fn closing_counts_that_add_up_raise_nothing() {
        assert_eq!(close_batch(5, (5, 5, 5), 5), vec![]);
    }

    #[test]
    fn a_closing_event_whose_counts_do_not_add_up_is_a_gap() {
        // The broker-failure loss: anonymization closed with one record fewer than
        // ingestion emitted, and its own count agreed with what it emitted.
        let alerts = close_batch(5, (5, 4, 4), 4);
        let details: Vec<&str> = alerts.iter().map(|a| a.detail.as_str()).collect();
        assert!(
            alerts.iter().all(|a| a.kind == AlertKind::Gap),
            "{alerts:?}"
        );
        assert!(
            details.contains(
                &"AnonymizationFinished does not add up: the stage before emitted 5 records, anonymization accounted for 4"
            ),
            "{details:?}"
        );
        assert!(
            details.contains(
                &"anonymization closed the batch with 4 records in, but ingestion emitted 5: 1 missing"
            ),
            "{details:?}"
        );
    }

    #[test]
    fn a_downstream_stage_taking_in_fewer_records_than_upstream_emitted_is_a_gap() {
        let alerts = close_batch(5, (5, 5, 5), 3);
        assert_eq!(
            alerts.iter().map(|a| a.detail.as_str()).collect::<Vec<_>>(),
            vec!["canonization closed the batch with 3 records in, but anonymization emitted 5: 2 missing"]
        );
        assert_eq!(alerts[0].kind, AlertKind::Gap);
    }

    #[test]
    fn stall_fires_after_sla_and_not_before() {
        let mut h = Harness::new(100);
        h.feed(ev("DataIngestionStarted", "ds").at(5));
        assert!(h.tick(65).is_empty(), "exactly at the SLA is not over it");
        let alerts = h.tick(66);
        assert_eq!(
            kinds(&alerts),
            vec![(
                AlertKind::StalledBatch,
                "ingestion stage open for 61s, over the 60s SLA".to_string()
            )]
        );
        let a = &alerts[0];
        assert_eq!(a.correlation_id.as_deref(), Some(BATCH));
        assert_eq!(
            (a.topic.as_deref(), a.partition, a.offset),
            (Some("medpipe.ingestion.v1"), Some(0), Some(0))
        );
        assert!(h.tick(500).is_empty(), "fires once per process");
    }

    #[test]
    fn stall_clock_uses_the_events_own_time() {
        let mut h = Harness::new(100);
        h.feed(ev("AnonymizationStarted", "as").at(100).occurred(0));
        assert_eq!(kinds(&h.tick(61))[0].0, AlertKind::StalledBatch);
    }

    #[test]
    fn stall_does_not_fire_when_closed() {
        for closing in ["DataIngestionFinished", "DataIngestionFailed"] {
            let mut h = Harness::new(100);
            h.feed(ev("DataIngestionStarted", "ds").at(0));
            h.feed(ev(closing, "df").at(30));
            assert!(h.tick(1000).is_empty(), "{closing}");
            assert_eq!(h.m.tracked().open_clocks, 0);
        }
        let mut h = Harness::new(100);
        h.feed(ev("EventDataCanonizationStarted", "cs").at(0));
        h.feed(ev("CanonizationFailed", "cf").at(1));
        assert!(h.tick(1000).is_empty());
    }

    #[test]
    fn stages_and_batches_have_their_own_clocks() {
        let mut h = Harness::new(100);
        h.feed(ev("DataIngestionStarted", "ds").at(0));
        h.feed(ev("DataIngestionFinished", "df").at(5).expect(0));
        h.feed(ev("AnonymizationStarted", "as").at(6));
        h.feed(ev("DataIngestionStarted", "ds2").at(7).batch("b-2"));
        let alerts = h.tick(100);
        let mut keys: Vec<_> = alerts
            .iter()
            .map(|a| (a.correlation_id.clone().unwrap(), a.detail.clone()))
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            vec![
                (
                    "b-1".into(),
                    "anonymization stage open for 94s, over the 60s SLA".into()
                ),
                (
                    "b-2".into(),
                    "ingestion stage open for 93s, over the 60s SLA".into()
                ),
            ]
        );
    }

    #[test]
    fn closing_without_start_and_start_after_close_are_quiet() {
        let mut h = Harness::new(100);
        h.feed(ev("DataIngestionFinished", "df").at(0).expect(0));
        h.feed(ev("DataIngestionStarted", "ds").at(1));
        assert!(h.tick(1000).is_empty());
        assert_eq!(h.m.tracked().open_clocks, 0);
    }

    #[test]
    fn alert_ids_are_deterministic() {
        let mut a = Harness::new(100);
        let mut b = Harness::new(100);
        for h in [&mut a, &mut b] {
            h.feed(ev("DataIngestionStarted", "ds").at(0));
        }
        let (x, y) = (a.tick(100), b.tick(100));
        assert_eq!(x[0].id, y[0].id);
        let expected = Uuid::new_v5(&ALERT_NAMESPACE, b"stalled_batch|b-1|ingestion");
        assert_eq!(x[0].id, expected.to_string());
    }

    #[test]
    fn alert_not_refired_after_replaying_its_entry() {
        let mut h = Harness::new(100);
        h.feed(ev("DataIngestionStarted", "ds").at(0));
        h.feed(ev("SourceRecordIngested", "s0").at(1).pos(0));
        h.feed(ev("SourceRecordIngested", "s0").at(2).pos(0).loc(1, 7));
        h.feed(ev("RecordAnonymized", "r0").at(3).pos(0).cause("s0"));
        h.feed(ev("CanonicalPatient", "c0").at(4).cause("s0"));
        h.feed(ev("SourceRecordIngested", "s1").at(4).pos(1));
        h.feed(ev("SourceRecordIngested", "s1b").at(5).pos(1));
        h.feed(ev("DataIngestionFinished", "df").at(6).expect(4));
        assert_eq!(h.tick(100).len(), 1, "the missing-records gap");
        let before = h.log.iter().filter(|e| e.event_type == ALERT_EVENT_TYPE);
        assert_eq!(
            before.count(),
            4,
            "duplicate id, lineage, position, missing"
        );

        let (mut m, owed) = h.restart(100);
        assert!(owed.is_empty(), "all four were recorded: {owed:?}");
        assert!(m.tick(100 * SEC, &NoLookup).is_empty());
        assert!(m.tick(1000 * SEC, &NoLookup).is_empty());
    }

    #[test]
    fn stall_not_refired_after_replay() {
        let mut h = Harness::new(100);
        h.feed(ev("DataIngestionStarted", "ds").at(0));
        assert_eq!(h.tick(100).len(), 1);
        let (mut m, owed) = h.restart(100);
        assert!(owed.is_empty());
        assert_eq!(m.tracked().open_clocks, 1);
        assert!(m.tick(200 * SEC, &NoLookup).is_empty());
    }

    #[test]
    fn replay_returns_alerts_that_were_never_recorded() {
        let mut h = Harness::new(100);
        h.feed(ev("SourceRecordIngested", "s0").at(0).pos(0));
        h.feed(ev("SourceRecordIngested", "s0").at(1).pos(0).loc(1, 9));
        // A crash before the alert was recorded.
        h.log.retain(|e| e.event_type != ALERT_EVENT_TYPE);
        let (mut m, owed) = h.restart(100);
        assert_eq!(owed.len(), 1);
        assert_eq!(owed[0].kind, AlertKind::Gap);
        assert!(m.tick(5 * SEC, &NoLookup).is_empty());
    }

    #[test]
    fn replay_judges_failing_counts_live_and_keeps_memory_bounded() {
        let mut h = Harness::new(1000);
        for b in 0..50 {
            let batch = format!("b{b}");
            let t = b * 100;
            h.feed(
                ev("DataIngestionStarted", &format!("ds{b}"))
                    .at(t)
                    .batch(&batch),
            );
            for p in 0..3 {
                h.feed(
                    ev("SourceRecordIngested", &format!("s{b}-{p}"))
                        .at(t + 1)
                        .pos(p)
                        .batch(&batch),
                );
            }
            // Batch 7 lost a record.
            let expected = if b == 7 { 4 } else { 3 };
            h.feed(
                ev("DataIngestionFinished", &format!("df{b}"))
                    .at(t + 2)
                    .expect(expected)
                    .batch(&batch),
            );
        }
        let mut m = Monitors::new(cfg(1000));
        m.begin_replay();
        for e in &h.log {
            m.observe(&observation(e));
        }
        let t = m.tracked();
        assert!(t.record_stages <= 2, "settled during replay: {t:?}");
        assert!(
            m.end_replay().is_empty(),
            "failing counts wait for a live tick"
        );
        let alerts = m.tick(10_000 * SEC, &NoLookup);
        assert_eq!(
            kinds(&alerts),
            vec![(
                AlertKind::Gap,
                "expected 4 SourceRecordIngested, saw 3".to_string()
            )]
        );
        assert_eq!(alerts[0].correlation_id.as_deref(), Some("b7"));
        assert_eq!(m.tracked().record_stages, 0);
    }

    #[test]
    fn duplicated_event_id() {
        let mut h = Harness::new(100);
        assert!(h
            .feed(ev("RecordAnonymized", "r0").at(0).pos(0).loc(0, 4))
            .is_empty());
        let alerts = h.feed(ev("RecordAnonymized", "r0").at(1).pos(0).loc(2, 9));
        assert_eq!(
            kinds(&alerts),
            vec![(
                AlertKind::Gap,
                "duplicated event id: RecordAnonymized also at partition 0 offset 4".to_string()
            )]
        );
        assert_eq!((alerts[0].partition, alerts[0].offset), (Some(2), Some(9)));
        assert!(h
            .feed(ev("RecordAnonymized", "r0").at(2).pos(0).loc(3, 1))
            .is_empty());
    }

    #[test]
    fn same_entry_twice_is_not_a_duplicate() {
        let mut h = Harness::new(100);
        h.feed(ev("SourceRecordIngested", "s0").pos(0).loc(0, 4));
        assert!(h
            .feed(ev("SourceRecordIngested", "s0").pos(0).loc(0, 4))
            .is_empty());
        assert_eq!(h.m.tracked().record_entries, 1);
    }

    #[test]
    fn duplicated_position() {
        let mut h = Harness::new(100);
        h.feed(ev("SourceRecordIngested", "s0").pos(3));
        h.feed(ev("RecordRejected", "x0").pos(4));
        let alerts = h.feed(ev("SourceRecordIngested", "s0b").pos(3));
        assert_eq!(
            kinds(&alerts),
            vec![(
                AlertKind::Gap,
                "duplicated record at position 3: two SourceRecordIngested events".to_string()
            )]
        );
        let alerts = h.feed(ev("RecordRejected", "x0b").pos(4));
        assert_eq!(alerts.len(), 1);
        assert!(
            h.feed(ev("SourceRecordIngested", "s0c").pos(3)).is_empty(),
            "same id as before"
        );
        assert!(
            h.feed(ev("RecordAnonymized", "r3").pos(3)).is_empty(),
            "other stage"
        );
        assert!(h
            .feed(ev("SourceRecordIngested", "s9").pos(3).batch("b-2"))
            .is_empty());
    }

    #[test]
    fn missing_records_after_grace_and_not_before() {
        let mut h = Harness::new(100);
        h.feed(ev("DataIngestionStarted", "ds").at(0));
        h.feed(ev("SourceRecordIngested", "s0").at(1).pos(0));
        h.feed(ev("SourceRecordIngested", "s1").at(1).pos(1));
        h.feed(
            ev("DataIngestionFinished", "df")
                .at(20)
                .expect(3)
                .loc(0, 50),
        );
        assert!(h.tick(30).is_empty(), "inside the grace");
        let alerts = h.tick(31);
        assert_eq!(
            kinds(&alerts),
            vec![(
                AlertKind::Gap,
                "expected 3 SourceRecordIngested, saw 2".to_string()
            )]
        );
        assert_eq!(alerts[0].offset, Some(50));
        assert!(h.tick(40).is_empty());
    }

    #[test]
    fn records_within_the_grace_count() {
        let mut h = Harness::new(100);
        h.feed(ev("AnonymizationStarted", "as").at(0));
        h.feed(ev("RecordAnonymized", "r0").at(1).pos(0));
        h.feed(ev("AnonymizationFinished", "af").at(2).expect(2));
        h.feed(ev("RecordAnonymized", "r1").at(5).pos(1).loc(1, 0));
        assert!(h.tick(100).is_empty());
    }

    #[test]
    fn duplicates_and_rejections_do_not_inflate_the_count() {
        let mut h = Harness::new(100);
        h.feed(ev("SourceRecordIngested", "s0").at(0).pos(0));
        h.feed(ev("SourceRecordIngested", "s0b").at(0).pos(0));
        h.feed(ev("RecordRejected", "x1").at(0).pos(1));
        h.feed(ev("DataIngestionFinished", "df").at(1).expect(2));
        let alerts = h.tick(100);
        assert_eq!(
            kinds(&alerts),
            vec![(
                AlertKind::Gap,
                "expected 2 SourceRecordIngested, saw 1".to_string()
            )]
        );
    }

    #[test]
    fn canonical_records_are_counted_by_completed() {
        let mut h = Harness::new(100);
        happy_lineage(&mut h);
        h.feed(ev("EventDataCanonizationStarted", "cs").at(4));
        h.feed(ev("CanonicalPatient", "c0").at(5).cause("r0"));
        let mut obs = ev("CanonicalObservation", "c1").at(5).cause("r0");
        obs.entry.topic = "medpipe.canonical.observation.v1".into();
        h.feed(obs);
        h.feed(ev("EventDataCanonizationCompleted", "cc").at(6).expect(3));
        let alerts: Vec<Alert> = h
            .tick(100)
            .into_iter()
            .filter(|a| a.kind == AlertKind::Gap)
            .collect();
        assert_eq!(
            kinds(&alerts),
            vec![(
                AlertKind::Gap,
                "expected 3 canonical records, saw 2".to_string()
            )]
        );
    }

    #[test]
    fn canonical_records_from_one_source_position_are_not_duplicates() {
        let mut h = Harness::new(100);
        happy_lineage(&mut h);
        let mut all = Vec::new();
        all.extend(h.feed(ev("CanonicalPatient", "c0").at(5).pos(0).cause("r0")));
        for i in 1..4 {
            let id = format!("c{i}");
            all.extend(h.feed(ev("CanonicalObservation", &id).at(5).pos(0).cause("r0")));
        }
        all.extend(h.feed(ev("EventDataCanonizationCompleted", "cc").at(6).expect(4)));
        all.extend(h.tick(30));
        assert!(all.is_empty(), "{all:?}");
    }

    #[test]
    fn lineage_ok_via_anonymization() {
        let mut h = Harness::new(100);
        happy_lineage(&mut h);
        assert!(h
            .feed(ev("CanonicalPatient", "c0").at(4).cause("r0"))
            .is_empty());
        // By topic alone, and through a longer chain.
        let mut e = ev("PatientUpserted", "c1").at(4).cause("c0");
        e.entry.topic = "medpipe.canonical.patient.v1".into();
        assert!(h.feed(e).is_empty());
        assert_eq!(h.m.tracked().pending_lineage_checks, 0);
        assert!(h
            .tick(1000)
            .iter()
            .all(|a| a.kind != AlertKind::BrokenLineage));
    }

    #[test]
    fn lineage_broken_when_caused_by_ingestion() {
        let mut h = Harness::new(100);
        happy_lineage(&mut h);
        let alerts = h.feed(ev("CanonicalPatient", "c0").at(4).cause("s0").loc(0, 77));
        assert_eq!(
            kinds(&alerts),
            vec![(
                AlertKind::BrokenLineage,
                "CanonicalPatient traces back to DataIngestionStarted after 2 hop(s) without passing anonymization".to_string()
            )]
        );
        assert_eq!(alerts[0].id, alert_id(AlertKind::BrokenLineage, &["c0"]));
        assert_eq!(alerts[0].offset, Some(77));
        let alerts = h.feed(ev("CanonicalPatient", "c1").at(4));
        assert_eq!(
            kinds(&alerts),
            vec![(
                AlertKind::BrokenLineage,
                "CanonicalPatient has no causation id".to_string()
            )]
        );
    }

    #[test]
    fn lineage_loops_stop_after_eight_hops() {
        let mut h = Harness::new(100);
        h.feed(ev("SourceRecordIngested", "a").cause("b"));
        h.feed(ev("SourceRecordIngested", "b").cause("a"));
        let alerts = h.feed(ev("CanonicalPatient", "c").cause("a"));
        assert_eq!(
            kinds(&alerts),
            vec![(
                AlertKind::BrokenLineage,
                "CanonicalPatient has no anonymization cause within 8 hops".to_string()
            )]
        );
    }

    #[test]
    fn lineage_cause_arriving_later_is_ok() {
        let mut h = Harness::new(100);
        assert!(h
            .feed(ev("CanonicalPatient", "c0").at(0).cause("r0"))
            .is_empty());
        assert_eq!(h.m.tracked().pending_lineage_checks, 1);
        assert!(h.tick(10).is_empty(), "not due yet");
        h.feed(ev("RecordAnonymized", "r0").at(12).cause("s0"));
        assert!(h.tick(31).is_empty());
        assert_eq!(h.m.tracked().pending_lineage_checks, 0);
    }

    #[test]
    fn lineage_unresolved_after_grace_fires() {
        let mut h = Harness::new(100);
        h.feed(ev("CanonicalPatient", "c0").at(0).cause("r-missing"));
        assert!(h.tick(30).is_empty(), "exactly at the grace");
        let alerts = h.tick(31);
        assert_eq!(
            kinds(&alerts),
            vec![(
                AlertKind::BrokenLineage,
                "cause 1 hop(s) up from CanonicalPatient not found after 30s".to_string()
            )]
        );
    }

    #[test]
    fn lineage_falls_back_to_lookup_after_eviction() {
        let mut h = Harness::new(3);
        h.feed(ev("SourceRecordIngested", "s0").at(0));
        h.feed(ev("RecordAnonymized", "r0").at(0).cause("s0"));
        for i in 0..5 {
            h.feed(
                ev("DataIngestionCreated", &format!("x{i}"))
                    .at(0)
                    .batch("b-9"),
            );
        }
        assert_eq!(h.m.tracked().events, 3);
        h.feed(ev("CanonicalPatient", "c0").at(1).cause("r0"));
        h.feed(ev("CanonicalPatient", "c1").at(1).cause("r0"));

        let mut table = Table::default();
        table.rows.insert(
            "r0".into(),
            (
                "RecordAnonymized".into(),
                Some(ANONYMIZATION_SERVICE.into()),
                Some("s0".into()),
            ),
        );
        assert!(h.tick_with(20, &table).is_empty());
        assert_eq!(table.calls.get(), 0, "not asked before the grace");
        assert!(h.tick_with(40, &table).is_empty());
        assert_eq!(table.calls.get(), 2);

        // Without the store the same record is judged broken.
        h.feed(ev("CanonicalPatient", "c2").at(50).cause("r0"));
        let alerts = h.tick_with(100, &NoLookup);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].kind, AlertKind::BrokenLineage);
    }

    #[test]
    fn lookup_chain_without_anonymization_is_broken() {
        let mut h = Harness::new(100);
        h.feed(ev("CanonicalPatient", "c0").at(0).cause("s0"));
        let mut table = Table::default();
        table.rows.insert(
            "s0".into(),
            (
                "SourceRecordIngested".into(),
                Some("medpipe-ingestion".into()),
                None,
            ),
        );
        let alerts = h.tick_with(100, &table);
        assert_eq!(
            kinds(&alerts),
            vec![(
                AlertKind::BrokenLineage,
                "CanonicalPatient traces back to SourceRecordIngested after 1 hop(s) without passing anonymization".to_string()
            )]
        );
    }

    #[test]
    fn memory_is_pruned_after_checks() {
        let mut h = Harness::new(1000);
        h.feed(ev("DataIngestionStarted", "ds").at(0));
        for p in 0..20 {
            h.feed(ev("SourceRecordIngested", &format!("s{p}")).at(1).pos(p));
        }
        h.feed(ev("CanonicalPatient", "c0").at(1).cause("unknown"));
        let t = h.m.tracked();
        assert_eq!(
            (
                t.open_clocks,
                t.record_stages,
                t.record_entries,
                t.pending_lineage_checks
            ),
            (1, 2, 21, 1)
        );
        h.feed(ev("DataIngestionFinished", "df").at(2).expect(20));
        h.feed(ev("EventDataCanonizationCompleted", "cc").at(2).expect(1));
        assert_eq!(h.m.tracked().pending_gap_checks, 2);
        h.tick(100);
        let t = h.m.tracked();
        assert_eq!(
            (
                t.open_clocks,
                t.record_stages,
                t.record_entries,
                t.pending_gap_checks,
                t.pending_lineage_checks
            ),
            (0, 0, 0, 0, 0),
            "{t:?}"
        );
        // A record after the check does not rebuild state that nothing would drop.
        h.feed(ev("SourceRecordIngested", "s99").at(101).pos(99));
        assert_eq!(h.m.tracked().record_stages, 0);
    }

    #[test]
    fn tables_are_bounded_by_max_tracked_events() {
        let mut h = Harness::new(10);
        for i in 0..100 {
            let b = format!("b{i}");
            h.feed(
                ev("DataIngestionStarted", &format!("ds{i}"))
                    .at(0)
                    .batch(&b),
            );
            h.feed(ev("DataIngestionFailed", &format!("df{i}")).at(0).batch(&b));
            h.feed(
                ev("RecordAnonymized", &format!("r{i}"))
                    .at(0)
                    .pos(0)
                    .batch(&b),
            );
            h.feed(
                ev("AnonymizationFinished", &format!("af{i}"))
                    .at(0)
                    .expect(2)
                    .batch(&b),
            );
        }
        h.tick(1000);
        let t = h.m.tracked();
        assert!(
            t.events <= 10 && t.fired_alerts <= 10 && t.closed_stages <= 10,
            "{t:?}"
        );
        assert_eq!(
            (t.open_clocks, t.record_stages, t.pending_gap_checks),
            (0, 0, 0)
        );
    }

    #[test]
    fn details_never_carry_ids() {
        let mut h = Harness::new(100);
        let b = "batch-7f3a";
        let mut all = Vec::new();
        all.extend(h.feed(ev("DataIngestionStarted", "evt-ds").at(0).batch(b)));
        all.extend(h.feed(ev("SourceRecordIngested", "evt-s0").pos(0).batch(b)));
        all.extend(
            h.feed(
                ev("SourceRecordIngested", "evt-s0")
                    .pos(0)
                    .batch(b)
                    .loc(1, 1),
            ),
        );
        all.extend(h.feed(ev("SourceRecordIngested", "evt-s0x").pos(0).batch(b)));
        all.extend(h.feed(ev("CanonicalPatient", "evt-c0").cause("evt-s0").batch(b)));
        all.extend(h.tick(65));
        all.extend(
            h.feed(
                ev("DataIngestionFinished", "evt-df")
                    .at(70)
                    .expect(5)
                    .batch(b),
            ),
        );
        all.extend(h.tick(1000));
        let kinds: HashSet<AlertKind> = all.iter().map(|a| a.kind).collect();
        assert_eq!(all.len(), 5, "{all:?}");
        assert_eq!(kinds.len(), 3);
        for a in &all {
            assert!(!a.detail.contains(b), "{}", a.detail);
            assert!(!a.detail.contains("evt-"), "{}", a.detail);
        }
    }

    #[test]
    fn event_keys_are_exact_and_round_trip() {
        let lower = "6f9619ff-8b86-d011-b42d-00c04fc964ff";
        assert_eq!(
            EventKey::of(lower),
            EventKey::Uuid(Uuid::from_u128(0x6f9619ff_8b86_d011_b42d_00c04fc964ff))
        );
        for other in [
            "e1",
            "",
            "6F9619FF-8B86-D011-B42D-00C04FC964FF",
            "6f9619ff-8b86-d011-b42d-00C04FC964FF",
            "6f9619ff8b86d011b42d00c04fc964ff",
            "{6f9619ff-8b86-d011-b42d-00c04fc964ff}",
            "urn:uuid:6f9619ff-8b86-d011-b42d-00c04fc964ff",
            "6f9619ff-8b86-d011-b42d-00c04fc964fg",
        ] {
            assert_eq!(
                EventKey::of(other),
                EventKey::Other(other.into()),
                "{other}"
            );
        }
        for id in [lower, "e1", "6F9619FF-8B86-D011-B42D-00C04FC964FF"] {
            assert_eq!(EventKey::of(id).to_string(), id);
        }
        assert_ne!(EventKey::of(lower), EventKey::of(&lower.to_uppercase()));
    }

    #[test]
    fn ids_are_told_apart_exactly() {
        let lower = "6f9619ff-8b86-d011-b42d-00c04fc964ff";
        let upper = lower.to_uppercase();
        let braced = format!("{{{lower}}}");
        let mut h = Harness::new(100);
        let ids = ["e1", "e2", "E1", lower, &upper, &braced];
        for (i, id) in ids.into_iter().enumerate() {
            assert!(
                h.feed(ev("SourceRecordIngested", id).loc(0, i as i64))
                    .is_empty(),
                "{id}"
            );
        }
        assert_eq!(h.m.tracked().events, ids.len());
        for (i, id) in ids.into_iter().enumerate() {
            let alerts = h.feed(ev("SourceRecordIngested", id).loc(1, 0));
            assert_eq!(
                kinds(&alerts),
                vec![(
                    AlertKind::Gap,
                    format!(
                        "duplicated event id: SourceRecordIngested also at partition 0 offset {i}"
                    )
                )],
                "{id}"
            );
        }
    }

    #[test]
    fn causes_are_looked_up_by_their_exact_id() {
        let upper = "6F9619FF-8B86-D011-B42D-00C04FC964FF";
        let lower = upper.to_lowercase();
        let mut h = Harness::new(100);
        // In memory, with a cause that only the lookup knows, by its uppercase id.
        h.feed(ev("SourceRecordIngested", "s0").cause(upper));
        h.feed(ev("CanonicalPatient", "c0").at(0).cause("s0"));
        h.feed(ev("CanonicalPatient", "c1").at(0).cause(upper));
        h.feed(ev("CanonicalPatient", "c2").at(0).cause(&lower));
        let mut table = Table::default();
        table.rows.insert(
            upper.into(),
            (
                "RecordAnonymized".into(),
                Some(ANONYMIZATION_SERVICE.into()),
                None,
            ),
        );
        let alerts = h.tick_with(100, &table);
        assert_eq!(
            kinds(&alerts),
            vec![(
                AlertKind::BrokenLineage,
                "cause 1 hop(s) up from CanonicalPatient not found after 30s".to_string()
            )]
        );
        assert_eq!(alerts[0].id, alert_id(AlertKind::BrokenLineage, &["c2"]));
        assert_eq!(table.calls.get(), 3);
    }

    #[test]
    fn interned_strings_go_with_their_last_event() {
        let mut h = Harness::new(2);
        for i in 0..50 {
            let mut e = ev("SourceRecordIngested", &format!("s{i}"));
            e.entry.source_service = Some(format!("service-{i}"));
            h.feed(e);
        }
        let s = &h.m.strings;
        // One type, one topic, and the services of the two tracked events.
        assert_eq!(s.syms.len(), 4, "{s:?}");
        assert!(s.values.len() <= 5, "{s:?}");
        let e = h.m.events.get(&EventKey::of("s49")).expect("tracked");
        assert_eq!(s.get(e.source_service.expect("a service")), "service-49");
        assert_eq!(s.get(e.topic), "medpipe.ingestion.v1");
    }

    #[test]
    fn fifo_keeps_the_newest_and_survives_sequence_wrap() {
        let mut f: Fifo<String, usize> = Fifo::new(3);
        f.base = u32::MAX - 4;
        let mut evicted = Vec::new();
        for i in 0..10 {
            evicted.extend(f.insert(format!("k{i}"), i));
            assert!(f.insert(format!("k{i}"), 99).is_none(), "present");
        }
        assert_eq!(
            evicted,
            (0..7).map(|i| (format!("k{i}"), i)).collect::<Vec<_>>()
        );
        assert_eq!(f.len(), 3);
        assert!(!f.contains("k6"));
        if let Some(v) = f.get_mut("k8") {
            *v += 100;
        }
        let kept: Vec<_> = (7..10).map(|i| f.get(format!("k{i}").as_str())).collect();
        assert_eq!(kept, vec![Some(&7), Some(&108), Some(&9)]);
        assert_eq!(f.ring.capacity(), 4, "grows no further than the cap");
        let mut none: Fifo<u8, ()> = Fifo::new(0);
        assert_eq!(none.insert(1, ()), Some((1, ())));
        assert_eq!(none.len(), 0);
    }

    #[test]
    fn tracked_events_are_small() {
        use std::mem::size_of;
        assert_eq!(size_of::<EventKey>(), 24);
        assert_eq!(size_of::<EventInfo>(), 48);
        assert!(size_of::<(EventKey, EventInfo)>() <= 72);
    }

    /// The events table's memory. Run alone, in one thread:
    /// `cargo test -p auditing --lib -- --ignored --exact --nocapture monitors::tests::events_memory`
    #[test]
    #[ignore = "measures the process's memory; run alone"]
    fn events_memory() {
        fn rss_kib() -> i64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        }
        const N: usize = 1_000_000;
        let kinds = [
            (
                "SourceRecordIngested",
                "medpipe.ingestion.v1",
                "medpipe-ingestion",
            ),
            (
                "RecordAnonymized",
                "medpipe.anonymization.v1",
                ANONYMIZATION_SERVICE,
            ),
        ];
        let id = |i: usize| {
            Uuid::from_u128((i as u128 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835))
                .to_string()
        };
        let mut m = Monitors::new(cfg(N));
        let before = rss_kib();
        for i in 0..N {
            let (event_type, topic, service) = kinds[i % 2];
            let (event_id, cause) = (id(i), id(i.saturating_sub(1)));
            m.observe(&Observation {
                seq: i as u64,
                recorded_at: 0,
                topic,
                partition: (i % 12) as i32,
                offset: i as i64,
                event_id: Some(&event_id),
                event_type,
                correlation_id: None,
                causation_id: Some(&cause),
                source_service: Some(service),
                occurred_at: None,
                record_position: Some(i as i64),
                records_expected: None,
                records_in: None,
                records_upstream: None,
            });
        }
        let grown = rss_kib() - before;
        assert_eq!(m.tracked().events, N);
        eprintln!(
            "{N} events: RSS grew {} MiB, {} bytes an event",
            grown / 1024,
            grown * 1024 / N as i64
        );
    }
}
