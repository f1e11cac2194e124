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
}

/// A batch that completed, whose records are remembered until its retention ends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closed {
    /// When it completed, microseconds since the epoch.
    pub at: i64,
    pub policy_version: String,
    /// Patients and shared resources it published, which a withdrawal keeps.
    pub kept: i64,
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
    /// Committed, by batch.
    committed: HashMap<String, Vec<Published>>,
    /// Published in the open transaction, by batch.
    pending: BTreeMap<String, Vec<Published>>,
    /// Chunks on the state topic, by batch (the next chunk's number).
    chunks: HashMap<String, u32>,
    /// Batches whose chunks go in the open transaction.
    forgetting: BTreeMap<String, u32>,
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
        let mut out = self.committed.get(batch).cloned().unwrap_or_default();
        out.extend(self.pending.get(batch).cloned().unwrap_or_default());
        out
    }

    /// The completed batches whose retention ended before `now`.
    pub fn expired(&self, now: i64, retention_micros: i64) -> Vec<String> {
        self.closed
            .keys()
            .into_iter()
            .filter(|b| {
                self.closed
                    .get(b)
                    .is_some_and(|c| c.at.saturating_add(retention_micros) <= now)
            })
            .collect()
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
        }
        for (batch, list) in std::mem::take(&mut self.pending) {
            if list.is_empty() {
                continue;
            }
            *self.chunks.entry(batch.clone()).or_default() += 1;
            self.committed.entry(batch).or_default().extend(list);
        }
        self.withdrawn.commit();
        self.closed.commit();
    }

    pub fn rollback(&mut self) {
        self.pending.clear();
        self.forgetting.clear();
        self.withdrawn.rollback();
        self.closed.rollback();
    }

    /// Takes this ledger's entries out of a restored state; returns the others.
    pub fn restore(&mut self, entries: Vec<StateEntry>) -> Result<Vec<StateEntry>, PipelineError> {
        self.committed.clear();
        self.chunks.clear();
        self.pending.clear();
        self.forgetting.clear();
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
            self.committed.entry(batch).or_default().extend(list);
        }
        self.withdrawn.restore(withdrawn)?;
        self.closed.restore(closed)?;
        Ok(rest)
    }
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
