//! Which rule governs a leaf: the candidates of a record's format and type, their ranking,
//! `where` filters, and an index that compares each element only with the patterns that
//! can match it.

use std::cmp::Reverse;
use std::collections::HashMap;

use serde_json::Value;

use super::scalar_text;
use crate::policy::{FhirSegment, Filter, Hl7Pattern, Pattern, Rule, RulePath, Specificity};

/// Whether a `where(path='value')` filter holds for an element: any value at the relative
/// path (arrays iterated) equals the literal.
pub(super) fn filter_holds(filter: &Filter, node: &Value) -> bool {
    pub(super) fn any_at(node: &Value, path: &[String], want: &str) -> bool {
        match node {
            Value::Array(items) => items.iter().any(|i| any_at(i, path, want)),
            _ => match path.split_first() {
                None => scalar_text(node).is_some_and(|t| t == want),
                Some((head, rest)) => node
                    .get(head.as_str())
                    .is_some_and(|child| any_at(child, rest, want)),
            },
        }
    }
    any_at(node, &filter.path, &filter.value)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Rank {
    pub(super) typed: bool,
    pub(super) specificity: Specificity,
    pub(super) conditional: bool,
    pub(super) order: Reverse<usize>,
}

#[derive(Clone, Copy)]
pub(super) struct Candidate<'e> {
    pub(super) rule: &'e Rule,
    pub(super) path: &'e RulePath,
    pub(super) rank: Rank,
}

#[derive(Clone, Copy)]
pub(super) struct Governing<'e> {
    pub(super) rule: &'e Rule,
    pub(super) rank: Rank,
}

pub(super) fn better<'e>(
    current: Option<Governing<'e>>,
    c: &Candidate<'e>,
) -> Option<Governing<'e>> {
    match current {
        Some(g) if g.rank >= c.rank => Some(g),
        _ => Some(Governing {
            rule: c.rule,
            rank: c.rank,
        }),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// First pass: gather identifier values for the scrubber; output is discarded.
    Collect,
    /// Second pass: transform and count.
    Apply,
}

/// The candidates of one format and record type, and their FHIR and HL7 patterns indexed
/// so that each element or subcomponent is compared only with patterns that can match it:
/// FHIR patterns by depth (they match at exactly their depth) and literal last name, HL7
/// patterns by segment id. By position in the policy, so that it is computed once per
/// format and type and shared by every record of them (`Engine::prepared`).
#[derive(Debug, Default)]
pub(super) struct Prepared {
    /// Each candidate: its rule's and path's positions in the policy, and its rank.
    pub(super) candidates: Vec<(usize, usize, Rank)>,
    /// By depth, then by the literal last name: positions in `candidates`.
    fhir_named: Vec<HashMap<String, Vec<usize>>>,
    /// By depth: patterns whose last segment is a glob.
    fhir_glob: Vec<Vec<usize>>,
    hl7_named: HashMap<String, Vec<usize>>,
    /// Patterns for any segment (`*-...`).
    hl7_any: Vec<usize>,
}

impl Prepared {
    /// Indexes `candidates`, whose positions in the policy are `positions`.
    pub(super) fn new(candidates: &[Candidate<'_>], positions: Vec<(usize, usize, Rank)>) -> Self {
        let mut index = Prepared {
            candidates: positions,
            ..Prepared::default()
        };
        for (i, c) in candidates.iter().enumerate() {
            match &c.path.pattern {
                Pattern::Fhir(segments) => {
                    let depth = segments.len();
                    if index.fhir_glob.len() <= depth {
                        index.fhir_glob.resize_with(depth + 1, Vec::new);
                        index.fhir_named.resize_with(depth + 1, HashMap::new);
                    }
                    match segments.last().map(|s| s.name.as_str()) {
                        Some(name) if !name.contains('*') => {
                            if let Some(map) = index.fhir_named.get_mut(depth) {
                                map.entry(name.to_owned()).or_default().push(i);
                            }
                        }
                        _ => {
                            if let Some(list) = index.fhir_glob.get_mut(depth) {
                                list.push(i);
                            }
                        }
                    }
                }
                Pattern::Hl7(p) => match p.segment.as_deref() {
                    Some(id) => index.hl7_named.entry(id.to_owned()).or_default().push(i),
                    None => index.hl7_any.push(i),
                },
                Pattern::Csv(_) => {}
            }
        }
        index
    }
}

/// A record's view of its `Prepared` index: the candidates as references into the policy.
pub(super) struct PatternIndex<'e> {
    prepared: std::sync::Arc<Prepared>,
    pub(super) candidates: Vec<Candidate<'e>>,
}

impl<'e> PatternIndex<'e> {
    pub(super) fn new(prepared: std::sync::Arc<Prepared>, candidates: Vec<Candidate<'e>>) -> Self {
        PatternIndex {
            prepared,
            candidates,
        }
    }

    fn fhir_of(&self, i: usize) -> Option<(&Candidate<'e>, &'e [FhirSegment])> {
        let c = self.candidates.get(i)?;
        match &c.path.pattern {
            Pattern::Fhir(segments) => Some((c, segments.as_slice())),
            _ => None,
        }
    }

    fn hl7_of(&self, i: usize) -> Option<(&Candidate<'e>, &'e Hl7Pattern)> {
        let c = self.candidates.get(i)?;
        match &c.path.pattern {
            Pattern::Hl7(p) => Some((c, p)),
            _ => None,
        }
    }

    pub(super) fn fhir(
        &self,
        depth: usize,
        name: &str,
    ) -> impl Iterator<Item = (&Candidate<'e>, &'e [FhirSegment])> + '_ {
        self.prepared
            .fhir_named
            .get(depth)
            .and_then(|map| map.get(name))
            .into_iter()
            .flatten()
            .chain(self.prepared.fhir_glob.get(depth).into_iter().flatten())
            .filter_map(|&i| self.fhir_of(i))
    }

    pub(super) fn hl7(
        &self,
        segment: &str,
    ) -> impl Iterator<Item = (&Candidate<'e>, &'e Hl7Pattern)> + '_ {
        self.prepared
            .hl7_named
            .get(segment)
            .into_iter()
            .flatten()
            .chain(&self.prepared.hl7_any)
            .filter_map(|&i| self.hl7_of(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let f = Filter {
            path: vec!["type".into(), "coding".into(), "code".into()],
            value: "MR".into(),
        };
        let id =
            serde_json::json!({"type": {"coding": [{"code": "XX"}, {"code": "MR"}]}, "value": "1"});
        assert!(filter_holds(&f, &id));
        let other = serde_json::json!({"type": {"coding": [{"code": "SS"}]}});
        assert!(!filter_holds(&f, &other));
    }
}
