//! The stage's durable state: each batch's counts, and each patient's known identifiers.
//!
//! The names and identifiers of a patient's `Patient` record (or HL7 ADT message) are
//! remembered by pseudonym, so that a later note about the patient is scrubbed of them
//! even when the note's own record names nobody. They are PHI, so they are kept sealed
//! (AES-256-GCM under a fresh data key wrapped by the master key, the pseudonym as
//! associated data) on the stage's state topic, beside the batch counts and in the same
//! transactions, and survive a restart. In memory they are cached opened.
//!
//! The memory is bounded: past [`KNOWN_PATIENTS`] patients the oldest is forgotten (a
//! tombstone on the state topic), so the state a restart reloads stays bounded too.

use std::collections::{BTreeMap, HashMap};

use pipeline::crypto::{open_record, KeyRef};
use pipeline::events::SealedPayload;
use pipeline::state::{DurableState, KeyedState, StateEntry};
use pipeline::PipelineError;
use serde::{Deserialize, Serialize};

use crate::scrub::Known;
use crate::BatchCounts;

/// How many patients' known identifiers the stage remembers.
pub const KNOWN_PATIENTS: usize = 100_000;

/// State-topic keys of known identifiers start with this; batch ids (UUIDs) never do.
const KNOWN_PREFIX: &str = "known/";
/// Source pseudonym -> the pseudonym of the patient's trusted identifier (see `identity`).
const ALIAS_PREFIX: &str = "alias/";
/// Merged patient pseudonym -> the surviving patient's pseudonym.
const MERGED_PREFIX: &str = "merged/";
/// Source pseudonyms that records were published under before any trusted identifier was
/// known for them; when one becomes known, the two are linked by a merge.
const PROVISIONAL_PREFIX: &str = "provisional/";

/// How many merges are followed from a pseudonym before giving up (a loop guard).
const MAX_MERGE_HOPS: usize = 16;

/// One patient's known identifiers, sealed, with the order in which they were stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedKnown {
    /// Larger is newer; the smallest is forgotten first.
    pub seq: u64,
    pub key_id: String,
    /// Hex: the data key wrapped by the master key, the nonce, the ciphertext.
    pub wrapped_key: String,
    pub nonce: String,
    pub ciphertext: String,
}

/// Batch counts by batch id and sealed known identifiers by pseudonym, committed, rolled
/// back and reloaded together by the runner.
pub struct StageState {
    master: KeyRef,
    pub batches: KeyedState<BatchCounts>,
    known: KeyedState<SealedKnown>,
    aliases: KeyedState<String>,
    merged: KeyedState<String>,
    provisional: KeyedState<bool>,
    /// Opened known identifiers, by pseudonym: a cache of `known`.
    opened: HashMap<String, Known>,
    /// Pseudonyms by `seq`, oldest first, for the bound.
    order: BTreeMap<u64, String>,
    next_seq: u64,
}

impl StageState {
    pub fn new(master: KeyRef) -> Self {
        StageState {
            master,
            batches: KeyedState::default(),
            known: KeyedState::default(),
            aliases: KeyedState::default(),
            merged: KeyedState::default(),
            provisional: KeyedState::default(),
            opened: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
        }
    }

    /// Remembers `known` for `patient`, replacing what was remembered, and forgets the
    /// oldest patient past the bound.
    pub fn remember(&mut self, patient: &str, known: Known) -> Result<(), PipelineError> {
        // The same identifiers again (an ADT feed repeats them): nothing to write.
        if self.known(patient).ok().flatten() == Some(&known) {
            return Ok(());
        }
        if let Some(old) = self.known.get(patient) {
            self.order.remove(&old.seq);
        }
        let plain =
            serde_json::to_vec(&known).map_err(PipelineError::serialize("known identifiers"))?;
        let data_key = pipeline::crypto::DataKey::generate(&self.master)?;
        let sealed = data_key.seal_record(&plain, patient.as_bytes())?;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.known.put(
            patient,
            SealedKnown {
                seq,
                key_id: sealed.key_id,
                wrapped_key: hex::encode(sealed.wrapped_key),
                nonce: hex::encode(sealed.nonce),
                ciphertext: hex::encode(sealed.ciphertext),
            },
        );
        self.order.insert(seq, patient.to_string());
        self.opened.insert(patient.to_string(), known);
        while self.order.len() > KNOWN_PATIENTS {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.known.delete(&oldest);
            self.opened.remove(&oldest);
        }
        Ok(())
    }

    /// The known identifiers remembered for `patient`, opened.
    pub fn known(&mut self, patient: &str) -> Result<Option<&Known>, PipelineError> {
        if !self.opened.contains_key(patient) {
            let Some(sealed) = self.known.get(patient) else {
                return Ok(None);
            };
            let known = self.open(patient, sealed)?;
            self.opened.insert(patient.to_string(), known);
        }
        Ok(self.opened.get(patient))
    }

    /// The known identifiers of `patient` if [`StageState::known`] opened them already.
    pub fn opened(&self, patient: &str) -> Option<&Known> {
        self.opened.get(patient)
    }

    fn open(&self, patient: &str, s: &SealedKnown) -> Result<Known, PipelineError> {
        let bytes =
            |h: &str| hex::decode(h).map_err(|e| PipelineError::storage("a sealed known entry", e));
        let sealed = SealedPayload {
            key_id: s.key_id.clone(),
            wrapped_key: bytes(&s.wrapped_key)?,
            nonce: bytes(&s.nonce)?,
            ciphertext: bytes(&s.ciphertext)?,
        };
        let plain = open_record(&self.master, &sealed, patient.as_bytes())?;
        serde_json::from_slice(&plain)
            .map_err(|e| PipelineError::storage("opened known identifiers", e))
    }

    /// Rebuilds the order and the sequence from what `known` holds, and empties the cache.
    fn reindex(&mut self) {
        self.opened.clear();
        self.order = self
            .known
            .keys()
            .into_iter()
            .filter_map(|k| self.known.get(&k).map(|s| (s.seq, k)))
            .collect();
        self.next_seq = self.order.keys().next_back().map_or(0, |s| s + 1);
    }

    /// The pseudonym a source pseudonym stands for, if a trusted identifier was seen for it.
    pub fn alias(&self, source: &str) -> Option<&str> {
        self.aliases.get(source).map(String::as_str)
    }

    /// Where a patient named by `pseudonym` stands now: through its alias when it is a
    /// source pseudonym (`is_source`), then through any merge to the survivor.
    pub fn current<'a>(&'a self, pseudonym: &'a str, is_source: bool) -> &'a str {
        let known = if is_source {
            self.alias(pseudonym).unwrap_or(pseudonym)
        } else {
            pseudonym
        };
        self.survivor(known)
    }

    /// Records that `source` stands for `identity`. Returns whether records were already
    /// published under `source` alone (provisionally), which the caller links by a merge.
    pub fn set_alias(&mut self, source: &str, identity: &str) -> bool {
        if source == identity || self.alias(source) == Some(identity) {
            return false;
        }
        self.aliases.put(source, identity.to_owned());
        let provisional = self.provisional.get(source).is_some();
        if provisional {
            self.provisional.delete(source);
        }
        provisional
    }

    /// Notes that a record was published under `source` with no trusted identifier known.
    pub fn mark_provisional(&mut self, source: &str) {
        if self.provisional.get(source).is_none() {
            self.provisional.put(source, true);
        }
    }

    /// Follows merges from `patient` to the surviving pseudonym.
    pub fn survivor<'a>(&'a self, patient: &'a str) -> &'a str {
        let mut at = patient;
        for _ in 0..MAX_MERGE_HOPS {
            match self.merged.get(at) {
                Some(next) if next != patient => at = next,
                _ => break,
            }
        }
        at
    }

    /// Records that `merged` was merged into `survivor`; false when that is already known or
    /// would close a loop (the survivor was itself merged into `merged`).
    pub fn set_merged(&mut self, merged: &str, survivor: &str) -> bool {
        if merged == survivor
            || self.merged.get(merged).map(String::as_str) == Some(survivor)
            || self.survivor(survivor) == merged
        {
            return false;
        }
        self.merged.put(merged, survivor.to_owned());
        true
    }

    /// How many patients are remembered (committed).
    pub fn known_len(&self) -> usize {
        self.known.len()
    }
}

impl DurableState for StageState {
    fn changes(&self) -> Result<Vec<StateEntry>, PipelineError> {
        let mut out = self.batches.changes()?;
        let prefixed = |prefix: &str, changes: Vec<StateEntry>| {
            changes
                .into_iter()
                .map(move |(k, v)| (format!("{prefix}{k}"), v))
                .collect::<Vec<_>>()
        };
        out.extend(prefixed(KNOWN_PREFIX, self.known.changes()?));
        out.extend(prefixed(ALIAS_PREFIX, self.aliases.changes()?));
        out.extend(prefixed(MERGED_PREFIX, self.merged.changes()?));
        out.extend(prefixed(PROVISIONAL_PREFIX, self.provisional.changes()?));
        Ok(out)
    }

    fn commit(&mut self) {
        self.batches.commit();
        self.known.commit();
        self.aliases.commit();
        self.merged.commit();
        self.provisional.commit();
    }

    fn rollback(&mut self) {
        let changed = self.known.has_changes();
        self.batches.rollback();
        self.known.rollback();
        self.aliases.rollback();
        self.merged.rollback();
        self.provisional.rollback();
        if changed {
            self.reindex();
        }
    }

    fn restore(&mut self, entries: Vec<StateEntry>) -> Result<(), PipelineError> {
        let mut known = Vec::new();
        let mut aliases = Vec::new();
        let mut merged = Vec::new();
        let mut provisional = Vec::new();
        let mut batches = Vec::new();
        for (k, v) in entries {
            let strip = |p: &str| k.strip_prefix(p).map(str::to_string);
            if let Some(k) = strip(KNOWN_PREFIX) {
                known.push((k, v));
            } else if let Some(k) = strip(ALIAS_PREFIX) {
                aliases.push((k, v));
            } else if let Some(k) = strip(MERGED_PREFIX) {
                merged.push((k, v));
            } else if let Some(k) = strip(PROVISIONAL_PREFIX) {
                provisional.push((k, v));
            } else {
                batches.push((k, v));
            }
        }
        self.batches.restore(batches)?;
        self.known.restore(known)?;
        self.aliases.restore(aliases)?;
        self.merged.restore(merged)?;
        self.provisional.restore(provisional)?;
        self.reindex();
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn master() -> KeyRef {
        KeyRef::from_hex("m1", &"11".repeat(32)).expect("key")
    }

    fn known(name: &str) -> Known {
        Known {
            names: vec![name.to_string()],
            identifiers: vec!["MRN-0042".to_string()],
        }
    }

    #[test]
    fn known_identifiers_survive_a_restart_sealed_and_roll_back_with_the_transaction() {
        let mut s = StageState::new(master());
        s.remember("pA", known("Okafor")).unwrap();
        let changes = s.changes().unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].0, "known/pA");
        let stored = String::from_utf8(changes[0].1.clone().unwrap()).unwrap();
        assert!(
            !stored.contains("Okafor") && !stored.contains("MRN-0042"),
            "{stored}"
        );
        s.commit();

        // An aborted transaction forgets what it remembered.
        s.remember("pB", known("Sturkenboom")).unwrap();
        s.rollback();
        assert!(s.known("pB").unwrap().is_none());
        assert_eq!(s.known("pA").unwrap().unwrap().names, vec!["Okafor"]);

        // A new process reads the committed entries back and opens them.
        let mut restarted = StageState::new(master());
        restarted.restore(changes.clone()).unwrap();
        assert_eq!(
            restarted.known("pA").unwrap().unwrap().names,
            vec!["Okafor"]
        );
        // Batch entries are not taken for known identifiers, nor the other way round.
        assert!(restarted.batches.keys().is_empty());

        // Another master key cannot open them, nor can another pseudonym's slot.
        let mut other = StageState::new(KeyRef::from_hex("m2", &"33".repeat(32)).unwrap());
        other.restore(changes.clone()).unwrap();
        assert!(other.known("pA").is_err());
        let moved = vec![("known/pZ".to_string(), changes[0].1.clone())];
        let mut swapped = StageState::new(master());
        swapped.restore(moved).unwrap();
        assert!(swapped.known("pZ").is_err());
    }

    #[test]
    fn the_oldest_patient_is_forgotten_past_the_bound_and_the_order_survives_a_restart() {
        let mut s = StageState::new(master());
        for i in 0..KNOWN_PATIENTS + 2 {
            s.known.put(
                &format!("p{i}"),
                SealedKnown {
                    seq: i as u64,
                    key_id: "m1".into(),
                    wrapped_key: String::new(),
                    nonce: String::new(),
                    ciphertext: String::new(),
                },
            );
        }
        s.commit();
        s.reindex();
        assert_eq!(s.next_seq, KNOWN_PATIENTS as u64 + 2);
        s.remember("new", known("Okafor")).unwrap();
        // Three over the bound: the three oldest go.
        let deletes: Vec<String> = s
            .changes()
            .unwrap()
            .into_iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k)
            .collect();
        assert_eq!(deletes, vec!["known/p0", "known/p1", "known/p2"]);
        s.commit();
        assert_eq!(s.known_len(), KNOWN_PATIENTS);
        assert!(s.known("new").unwrap().is_some());
    }
}
