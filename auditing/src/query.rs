//! Answers for compliance officers: the timeline of a batch, a pseudonym or an event
//! (through the store's index), and the activity report over a time range.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::entry::AuditEntry;
use crate::store::{self, lookup, Key, StoreError};

/// The most entries a trace follows through causes and effects, so a query on a huge
/// batch stays bounded.
const MAX_TRACE: usize = 1_000_000;

/// Every entry about `id`: a batch id, a patient pseudonym or an event id, with the causes
/// and batch lifecycle events that lead to it, in causal order.
pub fn trace(dir: &Path, id: &str) -> Result<Vec<AuditEntry>, StoreError> {
    let mut found: BTreeMap<u64, AuditEntry> = BTreeMap::new();
    let add = |v: Vec<AuditEntry>, found: &mut BTreeMap<u64, AuditEntry>| {
        for e in v {
            found.entry(e.seq).or_insert(e);
        }
    };
    // A batch: everything it correlates.
    add(lookup(dir, Key::Correlation, id)?, &mut found);
    // A pseudonym: its records, what caused them, and their batches' lifecycle.
    let subject = lookup(dir, Key::Subject, id)?;
    let subject_found = !subject.is_empty();
    add(subject, &mut found);
    // An event: itself, its causes, and everything it caused.
    let event = lookup(dir, Key::Event, id)?;
    let mut frontier: Vec<String> = event.iter().filter_map(|e| e.event_id.clone()).collect();
    add(event, &mut found);
    let mut seen: HashSet<String> = frontier.iter().cloned().collect();
    while let Some(eid) = frontier.pop() {
        if found.len() >= MAX_TRACE {
            break;
        }
        for e in lookup(dir, Key::Cause, &eid)? {
            if let Some(x) = &e.event_id {
                if seen.insert(x.clone()) {
                    frontier.push(x.clone());
                }
            }
            found.entry(e.seq).or_insert(e);
        }
    }
    if subject_found || !seen.is_empty() {
        add_ancestors(dir, &mut found)?;
        let batches: BTreeSet<String> = found
            .values()
            .filter_map(|e| e.correlation_id.clone())
            .collect();
        if subject_found {
            for b in batches {
                let lifecycle = lookup(dir, Key::Correlation, &b)?
                    .into_iter()
                    .filter(|e| e.record_position.is_none())
                    .collect();
                add(lifecycle, &mut found);
            }
        }
    }
    Ok(causal_order(found.into_values().collect()))
}

/// Adds every cause of the entries found, up the chain.
fn add_ancestors(dir: &Path, found: &mut BTreeMap<u64, AuditEntry>) -> Result<(), StoreError> {
    let have: HashSet<String> = found.values().filter_map(|e| e.event_id.clone()).collect();
    let mut wanted: Vec<String> = found
        .values()
        .filter_map(|e| e.causation_id.clone())
        .filter(|c| !have.contains(c))
        .collect();
    let mut asked: HashSet<String> = HashSet::new();
    while let Some(c) = wanted.pop() {
        if !asked.insert(c.clone()) || found.len() >= MAX_TRACE {
            continue;
        }
        for e in lookup(dir, Key::Event, &c)? {
            if let Some(up) = &e.causation_id {
                wanted.push(up.clone());
            }
            found.entry(e.seq).or_insert(e);
        }
    }
    Ok(())
}

/// Orders entries so every event comes after its cause; otherwise by the event's own time,
/// then by chain position.
pub fn causal_order(entries: Vec<AuditEntry>) -> Vec<AuditEntry> {
    let by_id: HashMap<&str, usize> = entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.event_id.as_deref().map(|id| (id, i)))
        .collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); entries.len()];
    let mut waiting = vec![0usize; entries.len()];
    for (i, e) in entries.iter().enumerate() {
        if let Some(&p) = e.causation_id.as_deref().and_then(|c| by_id.get(c)) {
            if p != i {
                children[p].push(i);
                waiting[i] += 1;
            }
        }
    }
    let time = |e: &AuditEntry| e.occurred_at.unwrap_or(e.recorded_at);
    let mut ready: BinaryHeap<Reverse<(i64, u64, usize)>> = entries
        .iter()
        .enumerate()
        .filter(|(i, _)| waiting[*i] == 0)
        .map(|(i, e)| Reverse((time(e), e.seq, i)))
        .collect();
    let mut order = Vec::with_capacity(entries.len());
    while let Some(Reverse((_, _, i))) = ready.pop() {
        order.push(i);
        for &c in &children[i] {
            waiting[c] -= 1;
            if waiting[c] == 0 {
                let e = &entries[c];
                ready.push(Reverse((time(e), e.seq, c)));
            }
        }
    }
    let mut slots: Vec<Option<AuditEntry>> = entries.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

/// One row of the activity report: what one service did with one batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActivityRow {
    pub batch_id: String,
    pub service: String,
    /// The service handled identifiable data (raw files, or sealed raw records).
    pub phi_access: bool,
    pub first_event_at: String,
    pub last_event_at: String,
    pub events: u64,
    pub records: u64,
    /// The service's closing event for the batch, or `open`.
    pub outcome: String,
    pub policy_versions: String,
    pub key_ids: String,
    /// Kinds of the compliance alerts raised about the batch (on the auditing row),
    /// `;`-separated.
    pub alerts: String,
}

/// The services that see identifiable data.
const PHI_SERVICES: [&str; 2] = ["medpipe-ingestion", "medpipe-anonymization"];

/// True for the event types that close a service's work on a batch. Typed, so renaming
/// a closing event fails to compile here rather than silently emptying the report.
fn is_closing(event_type: &str) -> bool {
    use pipeline::events::EventType as E;
    matches!(
        E::parse(event_type),
        Some(
            E::DataIngestionFinished
                | E::DataIngestionFailed
                | E::DataIngestionRejected
                | E::AnonymizationFinished
                | E::AnonymizationFailed
                | E::EventDataCanonizationCompleted
                | E::CanonizationFailed
        )
    )
}

/// The fields the report reads, borrowed from the line (no canonical re-check: the
/// report is a view; `audit verify` is the integrity check).
#[derive(Deserialize)]
struct Lite<'a> {
    recorded_at: i64,
    #[serde(borrow, default)]
    event_type: Cow<'a, str>,
    #[serde(borrow, default)]
    correlation_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    source_service: Option<Cow<'a, str>>,
    #[serde(default)]
    occurred_at: Option<i64>,
    #[serde(borrow, default)]
    policy: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    key_ids: Vec<Cow<'a, str>>,
    #[serde(default)]
    record_position: Option<i64>,
    #[serde(borrow, default)]
    detail: Option<Cow<'a, str>>,
}

/// The part of an alert entry's detail the report shows.
#[derive(Deserialize)]
struct AlertKindOnly {
    kind: String,
}

/// What one service did with one batch, summed over some entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Acc {
    first: i64,
    last: i64,
    events: u64,
    records: u64,
    /// The closing event, and when it occurred (the latest one wins).
    outcome: Option<(i64, String)>,
    policies: BTreeSet<String>,
    keys: BTreeSet<String>,
    #[serde(default)]
    alerts: BTreeSet<String>,
}

impl Acc {
    fn add(&mut self, e: &Lite, t: i64) {
        if self.events == 0 {
            self.first = t;
            self.last = t;
        }
        self.first = self.first.min(t);
        self.last = self.last.max(t);
        self.events += 1;
        self.records += u64::from(e.record_position.is_some());
        if is_closing(&e.event_type) && self.outcome.as_ref().is_none_or(|(at, _)| *at <= t) {
            self.outcome = Some((t, e.event_type.to_string()));
        }
        if let Some(p) = &e.policy {
            if !self.policies.contains(p.as_ref()) {
                self.policies.insert(p.to_string());
            }
        }
        for k in &e.key_ids {
            if !self.keys.contains(k.as_ref()) {
                self.keys.insert(k.to_string());
            }
        }
        if e.event_type == crate::monitors::ALERT_EVENT_TYPE {
            if let Some(a) = e
                .detail
                .as_deref()
                .and_then(|d| serde_json::from_str::<AlertKindOnly>(d).ok())
            {
                self.alerts.insert(a.kind);
            }
        }
    }

    fn merge(&mut self, o: Acc) {
        if self.events == 0 {
            *self = o;
            return;
        }
        self.first = self.first.min(o.first);
        self.last = self.last.max(o.last);
        self.events += o.events;
        self.records += o.records;
        if let Some((t, x)) = o.outcome {
            if self.outcome.as_ref().is_none_or(|(at, _)| *at <= t) {
                self.outcome = Some((t, x));
            }
        }
        self.policies.extend(o.policies);
        self.keys.extend(o.keys);
        self.alerts.extend(o.alerts);
    }
}

/// A sealed segment's report rows, kept beside it (`<first>.sum.json`) so a report over a
/// long range reads one small file per segment instead of every line. Derived data: it
/// records the segment's length and is rebuilt when that no longer matches.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Summary {
    segment_bytes: u64,
    /// Earliest and latest event time in the segment.
    min_t: i64,
    max_t: i64,
    rows: Vec<((String, String), Acc)>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads a segment's lines in `[from, to)` into `acc`; returns the event time range seen.
fn scan_segment(
    path: &Path,
    from: i64,
    to: i64,
    acc: &mut BTreeMap<(String, String), Acc>,
) -> Result<(i64, i64), StoreError> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let (mut min_t, mut max_t) = (i64::MAX, i64::MIN);
    for line in std::io::BufReader::with_capacity(1 << 20, file).lines() {
        let line = line.map_err(io_err(path))?;
        let Ok(e) = serde_json::from_str::<Lite>(&line) else {
            return Err(StoreError::Query(format!(
                "{} holds a line that is not an entry; run `medpipe audit verify`",
                path.display()
            )));
        };
        let t = e.occurred_at.unwrap_or(e.recorded_at);
        min_t = min_t.min(t);
        max_t = max_t.max(t);
        if t < from || t >= to {
            continue;
        }
        let (Some(batch), Some(service)) = (&e.correlation_id, &e.source_service) else {
            continue;
        };
        let key = (batch.to_string(), service.to_string());
        acc.entry(key).or_default().add(&e, t);
    }
    Ok((min_t, max_t))
}

/// Writes (or refreshes) the summary of a sealed segment.
pub fn summarize_segment(path: &Path) -> Result<(), StoreError> {
    let bytes = std::fs::metadata(path).map_err(io_err(path))?.len();
    let mut acc = BTreeMap::new();
    let (min_t, max_t) = scan_segment(path, i64::MIN, i64::MAX, &mut acc)?;
    let s = Summary {
        segment_bytes: bytes,
        min_t,
        max_t,
        rows: acc.into_iter().collect(),
    };
    let sum = path.with_extension("sum.json");
    let text = serde_json::to_vec(&s).map_err(|e| StoreError::Query(e.to_string()))?;
    std::fs::write(&sum, text).map_err(io_err(&sum))
}

fn read_summary(path: &Path) -> Option<Summary> {
    let bytes = std::fs::metadata(path).ok()?.len();
    let s: Summary =
        serde_json::from_slice(&std::fs::read(path.with_extension("sum.json")).ok()?).ok()?;
    (s.segment_bytes == bytes).then_some(s)
}

fn iso(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_else(|| micros.to_string())
}

/// Events that occurred in `[from, to)` (microseconds), grouped by batch and service.
/// Sealed segments wholly inside or outside the range are answered from their
/// summaries (built on first use when missing); the others are read line by line.
pub fn report(dir: &Path, from: i64, to: i64) -> Result<Vec<ActivityRow>, StoreError> {
    let segs = store::segments(dir)?;
    let mut acc: BTreeMap<(String, String), Acc> = BTreeMap::new();
    for (i, (_, path)) in segs.iter().enumerate() {
        let sealed = i + 1 < segs.len();
        let summary = if sealed {
            read_summary(path).or_else(|| {
                // A read-only copy of the store still answers, just more slowly.
                summarize_segment(path).ok()?;
                read_summary(path)
            })
        } else {
            None
        };
        match summary {
            Some(s) if s.max_t < from || s.min_t >= to => {}
            Some(s) if s.min_t >= from && s.max_t < to => {
                for (k, a) in s.rows {
                    acc.entry(k).or_default().merge(a);
                }
            }
            _ => {
                scan_segment(path, from, to, &mut acc)?;
            }
        }
    }
    Ok(acc
        .into_iter()
        .map(|((batch_id, service), a)| ActivityRow {
            phi_access: PHI_SERVICES.contains(&service.as_str()),
            batch_id,
            service,
            first_event_at: iso(a.first),
            last_event_at: iso(a.last),
            events: a.events,
            records: a.records,
            outcome: a.outcome.map_or_else(|| "open".into(), |(_, o)| o),
            policy_versions: a.policies.into_iter().collect::<Vec<_>>().join(";"),
            key_ids: a.keys.into_iter().collect::<Vec<_>>().join(";"),
            alerts: a.alerts.into_iter().collect::<Vec<_>>().join(";"),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{entry, store};

    fn with_ids(seqs: &[AuditEntry]) -> Vec<&str> {
        seqs.iter().filter_map(|e| e.event_id.as_deref()).collect()
    }

    #[test]
    fn causes_come_first_even_when_recorded_later() {
        let mut a = entry(0);
        a.event_id = Some("effect".into());
        a.causation_id = Some("cause".into());
        a.occurred_at = Some(1);
        a.seq = 0;
        let mut b = entry(1);
        b.event_id = Some("cause".into());
        b.causation_id = None;
        b.occurred_at = Some(5);
        b.seq = 1;
        let ordered = causal_order(vec![a, b]);
        assert_eq!(with_ids(&ordered), vec!["cause", "effect"]);
    }

    #[test]
    fn an_event_trace_follows_causes_and_effects() {
        let (dir, s) = store(6, 4, 100);
        drop(s);
        // entry(n) is caused by entry(n-1): e3's trace is the whole line e0..e5.
        let t = trace(dir.path(), "e3").expect("trace");
        assert_eq!(with_ids(&t), vec!["e0", "e1", "e2", "e3", "e4", "e5"]);
        let b1 = trace(dir.path(), "b1").expect("trace");
        assert_eq!(with_ids(&b1), vec!["e1", "e3", "e5"]);
        assert!(trace(dir.path(), "nothing").expect("trace").is_empty());
    }

    #[test]
    fn the_report_groups_by_batch_and_service_within_the_range() {
        let (dir, s) = store(6, 4, 100);
        drop(s);
        // occurred_at = offset: [1, 5) holds e1..e4.
        let rows = report(dir.path(), 1, 5).expect("report");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].batch_id, "b0");
        assert_eq!((rows[0].events, rows[0].records), (2, 2));
        assert_eq!(rows[1].batch_id, "b1");
        assert!(rows.iter().all(|r| r.phi_access && r.outcome == "open"));
    }

    #[test]
    fn segment_summaries_give_the_same_report_as_reading_every_line() {
        let (dir, s) = store(40, 8, 100);
        drop(s);
        let sums = |d: &Path| {
            std::fs::read_dir(d.join(store::SEGMENTS))
                .expect("dir")
                .filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".sum.json"))
                })
                .count()
        };
        // The store wrote a summary for each segment it sealed (all but the last).
        assert_eq!(sums(dir.path()), 4);
        for (from, to) in [(0, 40), (3, 37), (8, 16), (100, 200)] {
            let with = report(dir.path(), from, to).expect("report");
            let mut by_line = BTreeMap::new();
            for (_, p) in store::segments(dir.path()).expect("segs") {
                scan_segment(&p, from, to, &mut by_line).expect("scan");
            }
            assert_eq!(with.len(), by_line.len(), "range {from}..{to}");
            for (row, ((b, _), a)) in with.iter().zip(by_line) {
                assert_eq!(
                    (&row.batch_id, row.events, row.records),
                    (&b, a.events, a.records)
                );
            }
        }
        // A stale summary (the segment changed since) is not trusted.
        let (_, first) = store::segments(dir.path()).expect("segs").remove(0);
        let sum = first.with_extension("sum.json");
        let mut stale: Summary =
            serde_json::from_slice(&std::fs::read(&sum).expect("sum")).expect("json");
        stale.rows.clear();
        stale.segment_bytes += 1;
        std::fs::write(&sum, serde_json::to_vec(&stale).expect("json")).expect("write");
        let rows = report(dir.path(), 0, 40).expect("report");
        assert_eq!(rows.iter().map(|r| r.events).sum::<u64>(), 40);
    }
}
