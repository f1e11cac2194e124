//! Durable keyed state for stages that must count across messages (for example a batch's
//! records), kept exactly once with the stage's outputs.
//!
//! The runner writes a stage's changed entries to the compacted topic
//! `<prefix>-internal.<stage>-state.v1` inside the transaction that carries the batch's
//! outputs and offsets. An aborted transaction rolls the changes back in memory, so a
//! redone batch does not count twice; a restart or a partition assignment reloads the
//! committed entries from the topic.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::PipelineError;

/// One state entry as stored on the state topic: key and JSON value, `None` deletes.
pub type StateEntry = (String, Option<Vec<u8>>);

/// Keyed values with pending (uncommitted) changes layered over committed ones.
#[derive(Debug, Clone)]
pub struct KeyedState<T> {
    committed: HashMap<String, T>,
    /// `None` is a pending delete.
    pending: HashMap<String, Option<T>>,
}

impl<T> Default for KeyedState<T> {
    fn default() -> Self {
        KeyedState {
            committed: HashMap::new(),
            pending: HashMap::new(),
        }
    }
}

impl<T: Clone + Serialize + DeserializeOwned> KeyedState<T> {
    pub fn get(&self, key: &str) -> Option<&T> {
        match self.pending.get(key) {
            Some(v) => v.as_ref(),
            None => self.committed.get(key),
        }
    }

    pub fn put(&mut self, key: &str, value: T) {
        self.pending.insert(key.to_string(), Some(value));
    }

    pub fn delete(&mut self, key: &str) {
        self.pending.insert(key.to_string(), None);
    }

    /// The pending changes, serialised: `None` is a tombstone.
    pub fn changes(&self) -> Result<Vec<StateEntry>, PipelineError> {
        let mut out = Vec::with_capacity(self.pending.len());
        for (k, v) in &self.pending {
            let bytes = match v {
                Some(v) => {
                    Some(serde_json::to_vec(v).map_err(PipelineError::serialize("a state entry"))?)
                }
                None => None,
            };
            out.push((k.clone(), bytes));
        }
        out.sort();
        Ok(out)
    }

    /// Whether anything changed since the last commit or rollback.
    pub fn has_changes(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The transaction carrying the changes committed.
    pub fn commit(&mut self) {
        for (k, v) in self.pending.drain() {
            match v {
                Some(v) => {
                    self.committed.insert(k, v);
                }
                None => {
                    self.committed.remove(&k);
                }
            }
        }
    }

    /// The transaction aborted: forget what it changed.
    pub fn rollback(&mut self) {
        self.pending.clear();
    }

    /// Replaces everything with the committed entries read back from the state topic.
    /// Entries that do not parse are reported, not silently skipped.
    pub fn restore(
        &mut self,
        entries: impl IntoIterator<Item = StateEntry>,
    ) -> Result<(), PipelineError> {
        self.pending.clear();
        self.committed.clear();
        for (k, v) in entries {
            match v {
                Some(bytes) => {
                    let value = serde_json::from_slice(&bytes)
                        .map_err(|e| PipelineError::storage(format!("state entry {k}"), e))?;
                    self.committed.insert(k, value);
                }
                None => {
                    self.committed.remove(&k);
                }
            }
        }
        Ok(())
    }

    /// Whether any value, pending changes included, satisfies `f`.
    pub fn any(&self, f: impl Fn(&T) -> bool) -> bool {
        self.committed
            .iter()
            .filter(|(k, _)| !self.pending.contains_key(*k))
            .any(|(_, v)| f(v))
            || self.pending.values().flatten().any(f)
    }

    /// Keys with a value, pending changes included, in no particular order.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .committed
            .keys()
            .filter(|k| !self.pending.contains_key(*k))
            .chain(
                self.pending
                    .iter()
                    .filter(|(_, v)| v.is_some())
                    .map(|(k, _)| k),
            )
            .cloned()
            .collect();
        keys.sort_unstable();
        keys
    }

    pub fn len(&self) -> usize {
        self.committed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.committed.is_empty()
    }
}

/// An upstream closing event a stage holds, in its durable state, while the batch's
/// counts do not add up yet: the batch closes as finished only once every record the
/// upstream stage emitted is accounted for, and fails if that has not happened by the
/// deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PendingClose {
    /// How many records the upstream stage says it emitted for the batch.
    pub upstream: i64,
    /// The closing event, the cause of the stage's own.
    pub cause_event_id: String,
    /// Micros since the epoch (the closing event's time plus the stage's timeout).
    pub deadline: i64,
    /// Where the closing event was read: only that partition's owner acts on the deadline.
    pub topic: String,
    pub partition: i32,
}

impl PendingClose {
    /// True once the deadline has passed and this instance owns the closing partition.
    pub fn due(&self, now_micros: i64, owns: crate::runner::Owns<'_>) -> bool {
        now_micros >= self.deadline && owns(&self.topic, self.partition)
    }
}

/// What the runner needs of a stage's durable state, whatever its value type.
pub trait DurableState {
    fn changes(&self) -> Result<Vec<StateEntry>, PipelineError>;
    fn commit(&mut self);
    fn rollback(&mut self);
    fn restore(&mut self, entries: Vec<StateEntry>) -> Result<(), PipelineError>;
}

impl<T: Clone + Serialize + DeserializeOwned> DurableState for KeyedState<T> {
    fn changes(&self) -> Result<Vec<StateEntry>, PipelineError> {
        KeyedState::changes(self)
    }
    fn commit(&mut self) {
        KeyedState::commit(self);
    }
    fn rollback(&mut self) {
        KeyedState::rollback(self);
    }
    fn restore(&mut self, entries: Vec<StateEntry>) -> Result<(), PipelineError> {
        KeyedState::restore(self, entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_changes_commit_or_roll_back() {
        let mut s: KeyedState<u32> = KeyedState::default();
        s.put("a", 1);
        assert_eq!(s.get("a"), Some(&1));
        s.rollback();
        assert_eq!(s.get("a"), None);
        s.put("a", 2);
        s.put("b", 3);
        assert_eq!(s.changes().expect("changes").len(), 2);
        s.commit();
        s.delete("b");
        assert_eq!(s.get("b"), None);
        assert_eq!(s.changes().expect("changes"), vec![("b".to_string(), None)]);
        s.rollback();
        assert_eq!(s.get("b"), Some(&3));
        s.put("c", 4);
        s.delete("a");
        assert_eq!(s.keys(), vec!["b".to_string(), "c".to_string()]);
    }

    #[test]
    fn restore_replays_the_topic_in_order() {
        let mut s: KeyedState<u32> = KeyedState::default();
        s.put("stale", 9);
        s.restore(vec![
            ("a".into(), Some(b"1".to_vec())),
            ("a".into(), Some(b"2".to_vec())),
            ("b".into(), Some(b"5".to_vec())),
            ("b".into(), None),
        ])
        .expect("restore");
        assert_eq!(
            (s.get("a"), s.get("b"), s.get("stale")),
            (Some(&2), None, None)
        );
        assert!(s
            .restore(vec![("x".into(), Some(b"not json".to_vec()))])
            .is_err());
    }
}
