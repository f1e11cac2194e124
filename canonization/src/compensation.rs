//! Compensation: what canonization published for a batch that then failed is withdrawn,
//! never deleted.
//!
//! While a batch is open the stage remembers, per batch, each canonical record it
//! published that belongs to the batch alone (`Published`: type, canonical id, key, source
//! position and format). When the batch fails (anonymization failed it, or canonization's
//! own threshold or counts did), every one of them gets a new version under the same key
//! and id whose status is `entered-in-error` (the type's equivalent for Condition and
//! AllergyIntolerance) with a `meta.tag` saying why, and the batch gets a
//! `CanonicalBatchWithdrawn`. A consumer that keeps the latest version per id then holds
//! none of the batch's records; the earlier versions stay on the topics and in the audit
//! trail. Records of the batch that arrive after it was withdrawn are held: not published.
//!
//! Not withdrawn: Patients and shared resources (practitioners, organisations, ...). Their
//! canonical id names the person or the resource, not the batch, and other batches'
//! records reference them; withdrawing them would withdraw those too. The batch event
//! counts them as kept.
//!
//! An operator can also withdraw a batch that completed (`BatchWithdrawalRequested`, for
//! example a file sent to the wrong tenant): a completed batch's records are remembered
//! for a retention period (`closed/<batch>` says when it closed), after which a
//! withdrawal finds nothing left to withdraw and says so.
//!
//! The remembered records are durable stage state, committed with the outputs that
//! published them: appended in one chunk per transaction (`published/<batch>/<n>`), and
//! tombstoned when the batch is withdrawn or its retention after closing ends.
//!
//! A withdrawal goes out over as many transactions as the batch needs, each with at most
//! the stage's withdrawal budget of records (`Withdrawn::progress`): a transaction
//! withdraws the next records, moves the progress cursor and tombstones the chunks it
//! finished, all or nothing, so a crash in the middle neither loses nor repeats one. A
//! record published twice (a batch replayed after it completed) is withdrawn once, at its
//! last occurrence, which every restart finds the same. `CanonicalBatchWithdrawn`
//! follows the last part, with the counts.

use std::collections::{BTreeMap, HashMap};

use pipeline::state::{KeyedState, StateEntry};
use pipeline::{PipelineError, ResourceType};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// `meta.tag` system of the saga's tags: `withdrawn` on a withdrawn canonical record,
/// `partial` on a record of a released partial batch.
pub const WITHDRAWAL_TAG_SYSTEM: &str = "urn:medpipe:compensation";

const PUBLISHED_PREFIX: &str = "published/";
const WITHDRAWN_PREFIX: &str = "withdrawn/";
const CLOSED_PREFIX: &str = "closed/";

/// One canonical record a batch published, as much as its withdrawal needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub resource_type: String,
    pub resource_id: String,
    /// The Kafka key: the patient pseudonym.
    pub key: String,
    pub position: i64,
    pub source_format: String,
    /// `MedicationRequest.intent`, required and without an "unknown".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
}

/// A withdrawn batch: why, and how many of its records arrived after and were held.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withdrawn {
    pub reason: String,
    pub held: i64,
    /// Set while the batch's records are still being withdrawn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

/// A withdrawal under way: what its remaining parts and its batch event need.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The event that started it (the failure or the operator's request): the cause of
    /// every withdrawal and of `CanonicalBatchWithdrawn`.
    pub cause_event_id: String,
    pub trigger: String,
    pub policy_version: String,
    /// Patients and shared resources the batch published, which stay.
    pub kept: i64,
    /// The next remembered record to look at: chunk number and index in it.
    pub chunk: u32,
    pub index: usize,
    /// Withdrawn so far, by type.
    pub by_type: BTreeMap<String, i64>,
    /// Where the starting event was read: only that partition's owner carries it on.
    pub topic: String,
    pub partition: i32,
}

/// The next part of a withdrawal.
#[derive(Debug, PartialEq, Eq)]
pub struct Part {
    /// The records to withdraw in this transaction.
    pub records: Vec<Published>,
    /// Where the next part starts; `None` once every record has been looked at.
    pub next: Option<(u32, usize)>,
}

/// A batch that completed, whose records are remembered until its retention ends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closed {
    /// When it completed, microseconds since the epoch.
    pub at: i64,
    pub policy_version: String,
    /// Patients and shared resources it published, which a withdrawal keeps.
    pub kept: i64,
    /// Where its closing event was read (topic, partition): only that partition's owner
    /// forgets the batch when its retention ends. Absent in entries written before it was
    /// kept; any instance may forget those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<(String, i32)>,
}

/// Which types are withdrawn with their batch.
pub fn withdrawable(t: ResourceType) -> bool {
    !t.is_shared() && t != ResourceType::Patient
}

/// The withdrawal of one published record: a valid FHIR R4 resource with the same id, the
/// status that says it was entered in error, the required elements as "unknown", the
/// patient reference, and a tag with the reason.
pub fn withdrawal_resource(p: &Published, patient_id: &str, reason: &str) -> Option<Value> {
    let t = ResourceType::parse(&p.resource_type)?;
    let unknown = json!({"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
        "code": "unknown", "display": "Unknown"
    }]});
    let subject = json!({"reference": format!("Patient/{patient_id}")});
    let mut r = json!({
        "resourceType": t.fhir_name(),
        "id": p.resource_id,
        "meta": {"tag": [{
            "system": WITHDRAWAL_TAG_SYSTEM,
            "code": "withdrawn",
            "display": format!("Withdrawn with its batch: {reason}")
        }]}
    });
    let fields: Vec<(&str, Value)> = match t {
        ResourceType::Encounter => vec![
            ("status", json!("entered-in-error")),
            (
                "class",
                json!({"system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor",
                       "code": "UNK", "display": "unknown"}),
            ),
            ("subject", subject),
        ],
        ResourceType::Observation | ResourceType::DiagnosticReport => vec![
            ("status", json!("entered-in-error")),
            ("code", unknown),
            ("subject", subject),
        ],
        ResourceType::Condition => vec![
            (
                "verificationStatus",
                entered_in_error("condition-ver-status"),
            ),
            ("subject", subject),
        ],
        ResourceType::MedicationRequest => vec![
            ("status", json!("entered-in-error")),
            ("intent", json!(p.intent.as_deref()?)),
            ("medicationCodeableConcept", unknown),
            ("subject", subject),
        ],
        ResourceType::Procedure => {
            vec![("status", json!("entered-in-error")), ("subject", subject)]
        }
        ResourceType::AllergyIntolerance => vec![
            (
                "verificationStatus",
                entered_in_error("allergyintolerance-verification"),
            ),
            ("patient", subject),
        ],
        ResourceType::Immunization => vec![
            ("status", json!("entered-in-error")),
            ("vaccineCode", unknown),
            ("patient", subject),
            (
                "_occurrenceDateTime",
                json!({"extension": [{
                    "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                    "valueCode": "unknown"
                }]}),
            ),
        ],
        _ => return None,
    };
    if let Value::Object(map) = &mut r {
        for (k, v) in fields {
            map.insert(k.to_string(), v);
        }
    }
    Some(r)
}

/// Tags a canonical resource of an operator's release as partial: its batch was accepted
/// without the records that failed (`meta.tag` code `partial`, naming the held batch).
pub fn tag_partial(resource: &mut Value, held_batch: &str) {
    add_tag(
        resource,
        json!({
            "system": WITHDRAWAL_TAG_SYSTEM,
            "code": "partial",
            "display": format!("Released partial: batch {held_batch} accepted without its failed records")
        }),
    );
}

/// Appends `tag` to the resource's `meta.tag`, keeping what is there.
fn add_tag(resource: &mut Value, tag: Value) {
    let Value::Object(r) = resource else {
        return;
    };
    let meta = r.entry("meta").or_insert_with(|| json!({}));
    if let Value::Object(m) = meta {
        match m.entry("tag").or_insert_with(|| json!([])) {
            Value::Array(tags) => tags.push(tag),
            other => *other = json!([tag]),
        }
    }
}

/// Tags a canonical resource of an operator's reprocessing: a new version of the record
/// `old_batch` published, made under the versions named (`meta.tag` code `reprocessed`).
pub fn tag_reprocessed(resource: &mut Value, old_batch: &str, policy: &str, maps: &str) {
    add_tag(
        resource,
        json!({
            "system": WITHDRAWAL_TAG_SYSTEM,
            "code": "reprocessed",
            "display": format!("Reprocessed from batch {old_batch} under policy {policy}, concept maps {maps}")
        }),
    );
}

/// A verification status of `entered-in-error` in a terminology.hl7.org code system.
fn entered_in_error(code_system: &str) -> Value {
    json!({"coding": [{
        "system": format!("http://terminology.hl7.org/CodeSystem/{code_system}"),
        "code": "entered-in-error"
    }]})
}

/// The published records of open batches, and the withdrawn batches.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Committed, by batch and chunk number.
    committed: HashMap<String, BTreeMap<u32, Vec<Published>>>,
    /// Published in the open transaction, by batch.
    pending: BTreeMap<String, Vec<Published>>,
    /// Chunks on the state topic, by batch (the next chunk's number).
    chunks: HashMap<String, u32>,
    /// Batches whose chunks go in the open transaction.
    forgetting: BTreeMap<String, u32>,
    /// Chunks a withdrawal finished in the open transaction, by batch.
    spent: BTreeMap<String, Vec<u32>>,
    /// Per batch under withdrawal, where each of its records occurs last (chunk, index).
    /// Derived from `committed`, whose chunks of such a batch only go away.
    last_seen: HashMap<String, HashMap<String, (u32, usize)>>,
    pub withdrawn: KeyedState<Withdrawn>,
    pub closed: KeyedState<Closed>,
}

impl Ledger {
    pub fn publish(&mut self, batch: &str, p: Published) {
        self.pending.entry(batch.to_string()).or_default().push(p);
    }

    /// Everything the batch published, committed and pending, in order.
    pub fn published(&self, batch: &str) -> Vec<Published> {
        if self.forgetting.contains_key(batch) {
            return Vec::new();
        }
        let mut out: Vec<Published> = self
            .committed
            .get(batch)
            .map(|c| c.values().flatten().cloned().collect())
            .unwrap_or_default();
        out.extend(self.pending.get(batch).cloned().unwrap_or_default());
        out
    }

    /// The batches whose withdrawal is under way.
    pub fn withdrawing(&self) -> Vec<String> {
        self.withdrawn
            .keys()
            .into_iter()
            .filter(|b| self.withdrawn.get(b).is_some_and(|w| w.progress.is_some()))
            .collect()
    }

    /// The next part of the batch's withdrawal, from `from`: at most `budget` records
    /// looked at, each canonical id withdrawn at its last occurrence only. The chunks it
    /// finishes are tombstoned with the open transaction. Committed records only: a
    /// withdrawal starts in the transaction after the one that marked it.
    pub fn next_part(&mut self, batch: &str, from: (u32, usize), budget: usize) -> Part {
        let Some(chunks) = self.committed.get(batch) else {
            return Part {
                records: Vec::new(),
                next: None,
            };
        };
        let last = self.last_seen.entry(batch.to_string()).or_insert_with(|| {
            let mut last = HashMap::new();
            for (c, list) in chunks {
                for (i, p) in list.iter().enumerate() {
                    last.insert(identity(p), (*c, i));
                }
            }
            last
        });
        let budget = budget.max(1);
        let mut records = Vec::new();
        let mut looked = 0;
        let mut spent = Vec::new();
        let mut next = None;
        'chunks: for (&c, list) in chunks.range(from.0..) {
            let start = if c == from.0 { from.1 } else { 0 };
            for (i, p) in list.iter().enumerate().skip(start) {
                if looked == budget {
                    next = Some((c, i));
                    break 'chunks;
                }
                looked += 1;
                if last.get(&identity(p)) == Some(&(c, i)) {
                    records.push(p.clone());
                }
            }
            spent.push(c);
        }
        if !spent.is_empty() {
            self.spent
                .entry(batch.to_string())
                .or_default()
                .extend(spent);
        }
        Part { records, next }
    }

    /// The completed batches whose retention ended before `now`.
    pub fn expired(
        &self,
        now: i64,
        retention_micros: i64,
        owns: pipeline::runner::Owns<'_>,
    ) -> Vec<String> {
        self.closed
            .keys()
            .into_iter()
            .filter(|b| {
                self.closed.get(b).is_some_and(|c| {
                    c.at.saturating_add(retention_micros) <= now
                        && c.origin.as_ref().is_none_or(|(t, p)| owns(t, *p))
                })
            })
            .collect()
    }

    /// Whether a withdrawal is under way that starts from a partition `owns` says is this
    /// instance's.
    pub fn is_withdrawing_on(&self, owns: pipeline::runner::Owns<'_>) -> bool {
        self.withdrawn.any(|w| {
            w.progress
                .as_ref()
                .is_some_and(|p| owns(&p.topic, p.partition))
        })
    }

    /// Drops the batch's records, on the state topic too (with the open transaction).
    pub fn forget(&mut self, batch: &str) {
        if self.closed.get(batch).is_some() {
            self.closed.delete(batch);
        }
        self.pending.remove(batch);
        let n = self.chunks.get(batch).copied().unwrap_or(0);
        self.forgetting.insert(batch.to_string(), n);
    }

    fn chunk_key(batch: &str, n: u32) -> String {
        format!("{PUBLISHED_PREFIX}{batch}/{n:08}")
    }

    pub fn changes(&self) -> Result<Vec<StateEntry>, PipelineError> {
        let mut out = Vec::new();
        for (batch, n) in &self.forgetting {
            out.extend((0..*n).map(|i| (Self::chunk_key(batch, i), None)));
        }
        for (batch, spent) in &self.spent {
            if !self.forgetting.contains_key(batch) {
                out.extend(spent.iter().map(|i| (Self::chunk_key(batch, *i), None)));
            }
        }
        for (batch, list) in &self.pending {
            if list.is_empty() || self.forgetting.contains_key(batch) {
                continue;
            }
            let n = self.chunks.get(batch).copied().unwrap_or(0);
            let bytes =
                serde_json::to_vec(list).map_err(PipelineError::serialize("published records"))?;
            out.push((Self::chunk_key(batch, n), Some(bytes)));
        }
        out.extend(
            self.withdrawn
                .changes()?
                .into_iter()
                .map(|(k, v)| (format!("{WITHDRAWN_PREFIX}{k}"), v)),
        );
        out.extend(
            self.closed
                .changes()?
                .into_iter()
                .map(|(k, v)| (format!("{CLOSED_PREFIX}{k}"), v)),
        );
        Ok(out)
    }

    pub fn commit(&mut self) {
        for (batch, _) in std::mem::take(&mut self.forgetting) {
            self.committed.remove(&batch);
            self.chunks.remove(&batch);
            self.last_seen.remove(&batch);
        }
        for (batch, spent) in std::mem::take(&mut self.spent) {
            let Some(chunks) = self.committed.get_mut(&batch) else {
                continue;
            };
            for c in spent {
                chunks.remove(&c);
            }
            if chunks.is_empty() {
                self.committed.remove(&batch);
                self.last_seen.remove(&batch);
            }
        }
        for (batch, list) in std::mem::take(&mut self.pending) {
            if list.is_empty() {
                continue;
            }
            let next = self.chunks.entry(batch.clone()).or_default();
            let n = *next;
            *next += 1;
            self.committed.entry(batch).or_default().insert(n, list);
        }
        self.withdrawn.commit();
        self.closed.commit();
    }

    pub fn rollback(&mut self) {
        self.pending.clear();
        self.forgetting.clear();
        self.spent.clear();
        self.withdrawn.rollback();
        self.closed.rollback();
    }

    /// Takes this ledger's entries out of a restored state; returns the others.
    pub fn restore(&mut self, entries: Vec<StateEntry>) -> Result<Vec<StateEntry>, PipelineError> {
        self.committed.clear();
        self.chunks.clear();
        self.pending.clear();
        self.forgetting.clear();
        self.spent.clear();
        self.last_seen.clear();
        let mut chunks: BTreeMap<(String, u32), Vec<Published>> = BTreeMap::new();
        let mut withdrawn = Vec::new();
        let mut closed = Vec::new();
        let mut rest = Vec::new();
        for (k, v) in entries {
            if let Some(tail) = k.strip_prefix(PUBLISHED_PREFIX) {
                let Some((batch, n)) = tail.rsplit_once('/') else {
                    continue;
                };
                let (Ok(n), Some(bytes)) = (n.parse::<u32>(), v) else {
                    continue;
                };
                let list: Vec<Published> = serde_json::from_slice(&bytes)
                    .map_err(|e| PipelineError::storage(format!("state entry {k}"), e))?;
                chunks.insert((batch.to_string(), n), list);
            } else if let Some(batch) = k.strip_prefix(WITHDRAWN_PREFIX) {
                withdrawn.push((batch.to_string(), v));
            } else if let Some(batch) = k.strip_prefix(CLOSED_PREFIX) {
                closed.push((batch.to_string(), v));
            } else {
                rest.push((k, v));
            }
        }
        for ((batch, n), list) in chunks {
            let next = self.chunks.entry(batch.clone()).or_default();
            *next = (*next).max(n + 1);
            self.committed.entry(batch).or_default().insert(n, list);
        }
        self.withdrawn.restore(withdrawn)?;
        self.closed.restore(closed)?;
        Ok(rest)
    }
}

/// What makes two remembered records the same canonical record.
fn identity(p: &Published) -> String {
    format!("{}/{}", p.resource_type, p.resource_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: &str) -> Published {
        Published {
            resource_type: "Observation".into(),
            resource_id: id.into(),
            key: "k".into(),
            position: 1,
            source_format: "fhir-ndjson".into(),
            intent: None,
        }
    }

    #[test]
    fn published_records_append_per_transaction_roll_back_restore_and_are_forgotten() {
        let mut l = Ledger::default();
        l.publish("b", p("1"));
        l.publish("b", p("2"));
        let first = l.changes().unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].0, "published/b/00000000");
        l.commit();
        // An aborted transaction forgets what it published.
        l.publish("b", p("3"));
        l.rollback();
        assert_eq!(l.published("b").len(), 2);
        l.publish("b", p("4"));
        let second = l.changes().unwrap();
        assert_eq!(second[0].0, "published/b/00000001");
        l.commit();

        let mut restored = Ledger::default();
        let mut entries = first.clone();
        entries.extend(second.clone());
        entries.push(("other".into(), Some(b"{}".to_vec())));
        let rest = restored.restore(entries).unwrap();
        assert_eq!(rest.len(), 1);
        let ids: Vec<String> = restored
            .published("b")
            .into_iter()
            .map(|p| p.resource_id)
            .collect();
        assert_eq!(ids, vec!["1", "2", "4"]);

        // Forgetting tombstones every chunk, and a new chunk starts after a restart.
        restored.forget("b");
        let gone = restored.changes().unwrap();
        assert_eq!(
            gone,
            vec![
                ("published/b/00000000".to_string(), None),
                ("published/b/00000001".to_string(), None)
            ]
        );
        restored.commit();
        assert!(restored.published("b").is_empty());
    }

    /// The ledger's committed entries, as a restart reads them back (latest per key).
    fn committed_entries(log: &[StateEntry]) -> Vec<StateEntry> {
        let mut latest: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        for (k, v) in log {
            latest.insert(k.clone(), v.clone());
        }
        latest.into_iter().collect()
    }

    #[test]
    fn a_withdrawal_goes_in_parts_each_id_once_at_its_last_occurrence_across_restarts() {
        let mut log: Vec<StateEntry> = Vec::new();
        let mut l = Ledger::default();
        // Three transactions published ids; 2 and 5 twice (a replay).
        for chunk in [&["1", "2", "3"][..], &["4", "2", "5"], &["5", "6"]] {
            for id in chunk {
                l.publish("b", p(id));
            }
            log.extend(l.changes().unwrap());
            l.commit();
        }
        let mut withdrawn = Vec::new();
        let mut from = (0, 0);
        let mut parts = 0;
        loop {
            // An aborted part changes nothing.
            let aborted = l.next_part("b", from, 2);
            assert!(!aborted.records.is_empty() || aborted.next.is_none());
            l.rollback();
            let part = l.next_part("b", from, 2);
            assert_eq!(part, aborted, "the same part again after an abort");
            withdrawn.extend(part.records.iter().map(|r| r.resource_id.clone()));
            log.extend(l.changes().unwrap());
            l.commit();
            parts += 1;
            match part.next {
                Some(next) => from = next,
                None => break,
            }
            // A restart after every part: the rest comes from what is committed.
            l = Ledger::default();
            l.restore(committed_entries(&log)).unwrap();
        }
        withdrawn.sort();
        assert_eq!(withdrawn, vec!["1", "2", "3", "4", "5", "6"]);
        assert_eq!(parts, 4, "8 records looked at, 2 per part");
        // Every chunk is tombstoned by the part that finished it.
        assert!(committed_entries(&log)
            .iter()
            .all(|(k, v)| !k.starts_with("published/") || v.is_none()));
        assert!(l.published("b").is_empty());
    }

    #[test]
    fn a_partial_tag_joins_the_tags_a_resource_has() {
        let mut bare = json!({"resourceType": "Observation"});
        tag_partial(&mut bare, "b0");
        assert_eq!(bare["meta"]["tag"][0]["code"], "partial");
        let mut tagged = json!({"meta": {"tag": [{"code": "x"}], "source": "s"}});
        tag_partial(&mut tagged, "b0");
        assert_eq!(tagged["meta"]["tag"][0]["code"], "x");
        assert_eq!(tagged["meta"]["tag"][1]["code"], "partial");
        assert_eq!(tagged["meta"]["source"], "s");
        assert!(tagged["meta"]["tag"][1]["display"]
            .as_str()
            .unwrap()
            .contains("b0"));
    }

    #[test]
    fn every_withdrawable_type_has_a_withdrawal_and_patients_and_shared_ones_do_not() {
        for t in ResourceType::ALL {
            let mut rec = p("1");
            rec.resource_type = t.fhir_name().into();
            rec.intent = Some("order".into());
            let r = withdrawal_resource(&rec, "pid", "why");
            assert_eq!(r.is_some(), withdrawable(*t), "{t:?}");
        }
        let mut mr = p("1");
        mr.resource_type = "MedicationRequest".into();
        assert!(
            withdrawal_resource(&mr, "pid", "why").is_none(),
            "no intent, no valid withdrawal"
        );
    }
}
