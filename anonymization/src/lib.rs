//! The anonymization stage: opens each sealed source record, de-identifies it with the
//! policy engine (`engine`, `policy`, `scrub`; pure, no IO), and emits de-identified
//! records keyed by batch id (like every other event of the batch, so that one instance of
//! the next stage owns a whole batch), with per-batch counts kept as durable state.

pub mod engine;
pub mod eval;
pub mod gold;
pub mod identity;
pub mod memory;
pub mod policy;
pub mod scrub;

pub use engine::{
    Anonymized, Context, Engine, EngineError, Identified, Keys, Merge, Report, Subject,
};
pub use policy::{Policy, PolicyError};

use pipeline::crypto::{open_record, KeyRef};
use pipeline::events::{
    AnonymizationFailed, AnonymizationFinished, AnonymizationStarted, BatchHeld, PatientMerged,
    Payload, RecordAnonymized, SourceRecordBody, SourceRecordIngested,
};
use pipeline::runner::Owns;
use pipeline::state::PendingClose;
use pipeline::{Event, Input, Outcome, Output, Stage};
use serde::{Deserialize, Serialize};

pub const SERVICE: &str = "medpipe-anonymization";

/// Why a record could not be de-identified safely. It is dead-lettered, never passed on
/// partly de-identified.
#[derive(Debug, thiserror::Error)]
pub enum AnonymizeError {
    #[error("cannot open the sealed record: {0}")]
    Decrypt(String),
    #[error("the opened record is not valid JSON: {0}")]
    Body(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot remember the patient's identifiers: {0}")]
    Memory(String),
}

impl AnonymizeError {
    fn error_type(&self) -> &'static str {
        match self {
            AnonymizeError::Decrypt(_) => "decrypt",
            AnonymizeError::Body(_) => "record_body",
            AnonymizeError::Engine(EngineError::NoPatientLink) => "no_patient_link",
            AnonymizeError::Engine(EngineError::NoResourceId(_)) => "no_resource_id",
            AnonymizeError::Engine(_) => "policy",
            AnonymizeError::Memory(_) => "known_memory",
        }
    }
}

/// A batch's counts so far: durable stage state, keyed by batch id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchCounts {
    pub anonymized: u64,
    pub dead_lettered: u64,
    /// Ingestion's closing event, held while the counts do not add up yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closing: Option<PendingClose>,
    /// Set once the batch failed (here or upstream): the batch is held, and this counts
    /// its records that arrived after and were not forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<u64>,
    /// The held batch this batch releases as partial: no failure threshold fails it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_of: Option<String>,
    /// For a reprocessing: the batch it reprocesses and the concept maps canonization
    /// must have (passed on with each record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprocess_of: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_concept_maps: Option<String>,
}

pub struct Anonymizer {
    master: KeyRef,
    engine: Engine,
    /// A batch fails as a whole when more than this share of its records is dead-lettered.
    max_failure_ratio: f64,
    /// How long a batch whose counts do not add up waits for its missing records.
    close_timeout_micros: i64,
    /// Batch counts, and the identifiers (names above all) of each patient's Patient
    /// record by pseudonym, sealed, so that a later note about the patient is scrubbed of
    /// them too, also after a restart (`memory`).
    state: memory::StageState,
    /// Merges found while resolving the current record's patient, published after it.
    pending_merges: Vec<PatientMerged>,
}

impl Anonymizer {
    pub fn new(
        master: KeyRef,
        engine: Engine,
        max_failure_ratio: f64,
        close_timeout: std::time::Duration,
    ) -> Self {
        Anonymizer {
            state: memory::StageState::new(master.clone()),
            pending_merges: Vec::new(),
            master,
            engine,
            max_failure_ratio,
            close_timeout_micros: i64::try_from(close_timeout.as_micros()).unwrap_or(i64::MAX),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The de-identified record and the merges it announced.
    fn anonymize(
        &mut self,
        rec: &SourceRecordIngested,
    ) -> Result<(RecordAnonymized, Vec<PatientMerged>), AnonymizeError> {
        self.pending_merges.clear();
        let aad = SourceRecordIngested::aad(&rec.batch_id, rec.position);
        let plain = open_record(&self.master, &rec.sealed, &aad)
            .map_err(|e| AnonymizeError::Decrypt(e.to_string()))?;
        let body: SourceRecordBody =
            serde_json::from_slice(&plain).map_err(|e| AnonymizeError::Body(e.to_string()))?;
        let who = self
            .engine
            .identify(&rec.source_format, &rec.record_type, &body)?;
        let patient = self.patient_of(&who, rec);
        // A patient's own record: its identifiers are remembered for the patient's later
        // records, and are exactly what the scrubber needs for this one.
        let mut own = None;
        if rec.record_type == "Patient" || rec.record_type.starts_with("ADT") {
            let known = self.engine.known_identifiers(
                &rec.source_format,
                &rec.record_type,
                &body,
                &scrub::Known::default(),
            )?;
            self.state
                .remember(&patient, known.clone())
                .map_err(|e| AnonymizeError::Memory(e.to_string()))?;
            own = Some(known);
        }
        let empty = scrub::Known::default();
        if let Err(e) = self.state.known(&patient) {
            // Sealed under a master key this process does not hold (rotated) or damaged:
            // the note is scrubbed by its own record and the rules only.
            tracing::warn!(error = %e, "Cannot open a patient's remembered identifiers.");
        }
        let state = &self.state;
        let extra = state.opened(&patient).unwrap_or(&empty);
        let engine = &self.engine;
        // Another Patient named by its source id: its trusted identity if one was seen, and
        // the survivor if it was merged.
        let resolve = |id: &str| {
            let source = engine.pseudonym(id);
            let now = state.current(&source, true);
            (now != source).then(|| now.to_owned())
        };
        let out = self.engine.anonymize_as(
            &rec.source_format,
            &rec.record_type,
            &body,
            &who,
            &patient,
            &resolve,
            match own {
                Some(known) => engine::Scrub::Known(known),
                None => engine::Scrub::Collect(extra),
            },
        )?;
        let merges = self.merges(&who, &patient, rec);
        let policy = self.engine.policy();
        // Fields removed: by the allow-list default, by `redact` rules, and values a
        // method could not handle (which are removed instead of passed on).
        let by_rules: u64 = out
            .report
            .rules
            .iter()
            .filter(|(id, _)| {
                policy
                    .rules
                    .iter()
                    .any(|r| &r.id == *id && r.method == policy::Method::Redact)
            })
            .flat_map(|(_, paths)| paths.values())
            .sum();
        let invalid: u64 = out.report.invalid.values().flat_map(|p| p.values()).sum();
        let redacted = out.report.default_redactions.values().sum::<u64>() + by_rules + invalid;
        let batch = self.state.batches.get(&rec.batch_id);
        let record = RecordAnonymized {
            batch_id: rec.batch_id.clone(),
            position: rec.position,
            source_format: rec.source_format.clone(),
            record_type: rec.record_type.clone(),
            // A shared resource (a practitioner, a medication) names no patient.
            patient_pseudonym: match out.subject {
                Subject::Patient => out.patient_pseudonym.clone(),
                Subject::Shared => String::new(),
            },
            policy_version: policy.version.clone(),
            key_id: self.engine.key_id().to_string(),
            content_json: out.content.to_string(),
            fields_redacted: redacted as i64,
            policy_hash: Some(policy.hash.clone()),
            report_json: serde_json::to_string(&out.report).ok(),
            release_of: batch.and_then(|c| c.release_of.clone()),
            reprocess_of: batch.and_then(|c| c.reprocess_of.clone()),
            expected_concept_maps: batch.and_then(|c| c.expected_concept_maps.clone()),
        };
        Ok((record, merges))
    }

    /// The pseudonym a record is published under: its trusted identity's, else the one an
    /// earlier record's trusted identity gave its source id, else its source id's; then the
    /// survivor of any merge. Remembers the alias a trusted identity gives, and publishes a
    /// merge when records already went out under the source id alone.
    fn patient_of(&mut self, who: &Identified, rec: &SourceRecordIngested) -> String {
        if who.subject == Subject::Shared {
            return who.source_pseudonym.clone();
        }
        let source = &who.source_pseudonym;
        let base = match &who.identity_pseudonym {
            Some(identity) => {
                if self.state.set_alias(source, identity) {
                    self.pending_merges.push(self.merge_event(
                        rec,
                        identity,
                        source,
                        "identity-resolved",
                        false,
                    ));
                }
                identity.clone()
            }
            None => match self.state.alias(source) {
                Some(alias) => alias.to_owned(),
                None => {
                    if !self.engine.policy().identity.is_empty() {
                        self.state.mark_provisional(source);
                    }
                    source.clone()
                }
            },
        };
        self.state.survivor(&base).to_owned()
    }

    /// The merges a record announces that are new, as events; remembered so that later
    /// records of the merged patient go to the survivor.
    fn merges(
        &mut self,
        who: &Identified,
        patient: &str,
        rec: &SourceRecordIngested,
    ) -> Vec<PatientMerged> {
        let mut out = std::mem::take(&mut self.pending_merges);
        for merge in &who.merges {
            let (survivor, merged, trigger, has_link) = match merge {
                Merge::Absorbed {
                    other,
                    other_is_source_id,
                    trigger,
                } => {
                    let other = match other_is_source_id {
                        true => self.state.alias(other).unwrap_or(other),
                        false => other,
                    };
                    (patient.to_owned(), other.to_owned(), *trigger, false)
                }
                Merge::ReplacedBy {
                    other,
                    other_is_source_id,
                } => (
                    self.state.current(other, *other_is_source_id).to_owned(),
                    patient.to_owned(),
                    "fhir-patient-link-replaced-by",
                    true,
                ),
            };
            if self.state.set_merged(&merged, &survivor) {
                out.push(self.merge_event(rec, &survivor, &merged, trigger, has_link));
            }
        }
        out
    }

    fn merge_event(
        &self,
        rec: &SourceRecordIngested,
        survivor: &str,
        merged: &str,
        trigger: &str,
        merged_record_has_link: bool,
    ) -> PatientMerged {
        PatientMerged {
            batch_id: rec.batch_id.clone(),
            position: rec.position,
            source_format: rec.source_format.clone(),
            record_type: rec.record_type.clone(),
            surviving_pseudonym: survivor.to_owned(),
            merged_pseudonym: merged.to_owned(),
            trigger: trigger.to_owned(),
            merged_record_has_link,
            policy_version: self.engine.policy().version.clone(),
            key_id: self.engine.key_id().to_string(),
        }
    }

    fn counts(&self, batch: &str) -> BatchCounts {
        self.state.batches.get(batch).cloned().unwrap_or_default()
    }

    /// Closes a batch whose upstream closing event is held, if its counts allow: as
    /// finished (or failed over the threshold) when every emitted record is accounted
    /// for, as failed when there are more than were emitted (duplicates), or when `now`
    /// is past the deadline and some are still missing. Otherwise it keeps waiting.
    fn try_close(&mut self, batch: &str, now: Option<i64>) -> Vec<Output> {
        let c = self.counts(batch);
        let Some(closing) = c.closing.clone() else {
            return Vec::new();
        };
        let done = c.anonymized + c.dead_lettered;
        let emitted = u64::try_from(closing.upstream).unwrap_or(0);
        let verdict = match done.cmp(&emitted) {
            std::cmp::Ordering::Equal => Ok(closing.upstream),
            std::cmp::Ordering::Greater => Err((
                "counts_mismatch",
                format!(
                    "ingestion emitted {emitted} records, but {} were anonymized and {} dead-lettered: {} more than emitted",
                    c.anonymized,
                    c.dead_lettered,
                    done - emitted
                ),
            )),
            std::cmp::Ordering::Less if now.is_some_and(|n| n >= closing.deadline) => Err((
                "counts_mismatch",
                format!(
                    "ingestion emitted {emitted} records, but only {} were anonymized and {} dead-lettered: {} missing after waiting {}s",
                    c.anonymized,
                    c.dead_lettered,
                    emitted - done,
                    self.close_timeout_micros / 1_000_000
                ),
            )),
            std::cmp::Ordering::Less => return Vec::new(),
        };
        let payload = self.close(batch, verdict);
        let event = Event::new(SERVICE, batch, Some(&closing.cause_event_id), payload);
        let held = held(&event, "anonymization");
        let mut out = vec![Output {
            key: batch.to_string(),
            event,
        }];
        out.extend(held);
        out
    }

    /// Ends a batch and forgets its counts: `Ok` holds ingestion's emitted count and
    /// finishes it unless too many records were dead-lettered; `Err` fails it with an
    /// error kind and reason.
    fn close(&mut self, batch: &str, verdict: Result<i64, (&str, String)>) -> Payload {
        let c = self.counts(batch);
        self.state.batches.delete(batch);
        let hold = |state: &mut memory::StageState| {
            state.batches.put(
                batch,
                BatchCounts {
                    held: Some(0),
                    ..BatchCounts::default()
                },
            )
        };
        let policy = self.engine.policy();
        let total = c.anonymized + c.dead_lettered;
        let upstream = verdict.as_ref().map_or(0, |n| *n);
        let failure = match verdict {
            Err((kind, reason)) => Some((kind.to_string(), reason)),
            Ok(_)
                if c.release_of.is_none()
                    && total > 0
                    && c.dead_lettered as f64 > self.max_failure_ratio * total as f64 =>
            {
                Some((
                    "failure_threshold".to_string(),
                    format!(
                        "{} of {total} records could not be de-identified ({:.1}%), above the {:.1}% threshold",
                        c.dead_lettered,
                        100.0 * c.dead_lettered as f64 / total as f64,
                        100.0 * self.max_failure_ratio
                    ),
                ))
            }
            Ok(_) => None,
        };
        if let Some((error_kind, reason)) = failure {
            hold(&mut self.state);
            return Payload::AnonymizationFailed(AnonymizationFailed {
                batch_id: batch.into(),
                error_kind,
                reason,
                policy_version: policy.version.clone(),
                records_anonymized: c.anonymized as i64,
                records_dead_lettered: c.dead_lettered as i64,
                policy_hash: Some(policy.hash.clone()),
            });
        }
        Payload::AnonymizationFinished(AnonymizationFinished {
            batch_id: batch.into(),
            upstream_records_emitted: upstream,
            policy_version: policy.version.clone(),
            records_anonymized: Some(c.anonymized as i64),
            records_dead_lettered: Some(c.dead_lettered as i64),
            policy_hash: Some(policy.hash.clone()),
            release_of: c.release_of,
        })
    }
}

impl Anonymizer {
    /// Fails the batch at once, caused by `cause`: `AnonymizationFailed` and the
    /// `BatchHeld` naming `failed_step`; its later records are held.
    fn fail_and_hold(
        &mut self,
        cause: &Event,
        batch: &str,
        failure: (&str, String),
        failed_step: &str,
    ) -> Vec<Output> {
        let payload = self.close(batch, Err(failure));
        let event = Event::caused_by(cause, SERVICE, payload);
        let held = held(&event, failed_step);
        let mut out = vec![Output {
            key: batch.to_string(),
            event,
        }];
        out.extend(held);
        out
    }
}

/// A de-identified record's outputs: the record, then the merges it announced, all keyed
/// by the batch like its lifecycle events, so that they stay in order behind them.
fn anonymized(cause: &Event, record: RecordAnonymized, merges: Vec<PatientMerged>) -> Vec<Output> {
    let mut outputs = vec![Output {
        key: record.batch_id.clone(),
        event: Event::caused_by(cause, SERVICE, Payload::RecordAnonymized(record)),
    }];
    outputs.extend(merged(cause, merges));
    outputs
}

/// Merges as outputs, keyed by the batch whose record announced them, so a merge follows
/// that record on the topic.
fn merged(cause: &Event, merges: Vec<PatientMerged>) -> Vec<Output> {
    merges
        .into_iter()
        .map(|m| Output {
            key: m.batch_id.clone(),
            event: Event::caused_by(cause, SERVICE, Payload::PatientMerged(m)),
        })
        .collect()
}

/// The `BatchHeld` that goes with an `AnonymizationFailed` (caused by it), if `failed` is
/// one: `failed_step` is the stage whose step failed the batch.
fn held(failed: &Event, failed_step: &str) -> Option<Output> {
    let Payload::AnonymizationFailed(f) = &failed.payload else {
        return None;
    };
    Some(Output {
        key: f.batch_id.clone(),
        event: Event::caused_by(
            failed,
            SERVICE,
            Payload::BatchHeld(BatchHeld {
                batch_id: f.batch_id.clone(),
                stage: "anonymization".into(),
                failed_step: failed_step.into(),
                reason_kind: f.error_kind.clone(),
                reason: f.reason.clone(),
                records_forwarded: f.records_anonymized,
            }),
        ),
    })
}

impl Stage for Anonymizer {
    fn name(&self) -> &'static str {
        "anonymization"
    }

    fn process(&mut self, input: &Input<'_>) -> Outcome {
        let ev = input.event;
        let emit = |key: &str, payload: Payload| {
            Outcome::Emit(vec![Output {
                key: key.to_string(),
                event: Event::caused_by(ev, SERVICE, payload),
            }])
        };
        match &ev.payload {
            Payload::DataIngestionStarted(s) => {
                let mut c = self.counts(&s.batch_id);
                c.release_of.clone_from(&s.release_of);
                c.reprocess_of.clone_from(&s.reprocess_of);
                c.expected_concept_maps.clone_from(&s.expected_concept_maps);
                self.state.batches.put(&s.batch_id, c);
                // A reprocessing under a policy this stage does not run is held at once.
                let running = &self.engine.policy().version;
                if let Some(expected) = s.expected_policy.as_ref().filter(|v| *v != running) {
                    let reason = format!(
                        "the batch must be reprocessed under policy {expected}, but this stage runs policy {running}"
                    );
                    return Outcome::Emit(self.fail_and_hold(
                        ev,
                        &s.batch_id,
                        ("policy_version_mismatch", reason),
                        "anonymization",
                    ));
                }
                let policy = self.engine.policy();
                emit(
                    &s.batch_id,
                    Payload::AnonymizationStarted(AnonymizationStarted {
                        batch_id: s.batch_id.clone(),
                        policy_version: policy.version.clone(),
                        key_id: self.engine.key_id().to_string(),
                        policy_hash: Some(policy.hash.clone()),
                    }),
                )
            }
            Payload::SourceRecordIngested(rec)
                if input.redriven && self.state.batches.get(&rec.batch_id).is_none() =>
            {
                // A redriven dead letter of a batch that closed: forwarded, not counted.
                tracing::info!(correlation_id = %rec.batch_id, position = rec.position, "A redriven record of a closed batch: anonymized, not counted.");
                match self.anonymize(rec) {
                    Ok((out, merges)) => Outcome::Emit(anonymized(ev, out, merges)),
                    Err(e) => {
                        let merges = merged(ev, std::mem::take(&mut self.pending_merges));
                        Outcome::DeadLetterAndEmit {
                            error_type: e.error_type(),
                            reason: format!(
                                "batch {} position {}: {e}",
                                rec.batch_id, rec.position
                            ),
                            outputs: merges,
                        }
                    }
                }
            }
            Payload::SourceRecordIngested(rec) => {
                let mut c = self.counts(&rec.batch_id);
                if let Some(n) = c.held {
                    // The batch failed: its records stay upstream, counted, not forwarded.
                    c.held = Some(n + 1);
                    self.state.batches.put(&rec.batch_id, c);
                    tracing::info!(
                        correlation_id = %rec.batch_id,
                        position = rec.position,
                        "Held a record of a held batch: not forwarded."
                    );
                    return Outcome::Emit(vec![]);
                }
                let result = self.anonymize(rec);
                match &result {
                    Ok(_) => c.anonymized += 1,
                    Err(_) => c.dead_lettered += 1,
                }
                self.state.batches.put(&rec.batch_id, c);
                // A record that was missing when ingestion's closing event came.
                let closed = self.try_close(&rec.batch_id, None);
                match result {
                    Ok((out, merges)) => {
                        let mut outputs = anonymized(ev, out, merges);
                        outputs.extend(closed);
                        Outcome::Emit(outputs)
                    }
                    Err(e) => {
                        let error_type = e.error_type();
                        let reason =
                            format!("batch {} position {}: {e}", rec.batch_id, rec.position);
                        // A merge found before the record failed is a fact all the same.
                        let mut outputs = merged(ev, std::mem::take(&mut self.pending_merges));
                        outputs.extend(closed);
                        if outputs.is_empty() {
                            Outcome::DeadLetter { error_type, reason }
                        } else {
                            Outcome::DeadLetterAndEmit {
                                error_type,
                                reason,
                                outputs,
                            }
                        }
                    }
                }
            }
            Payload::DataIngestionFinished(f) => {
                let mut c = self.counts(&f.batch_id);
                if c.held.is_some() {
                    return Outcome::Emit(vec![]);
                }
                c.closing = Some(PendingClose {
                    upstream: f.records_emitted,
                    cause_event_id: ev.header.event_id.clone(),
                    deadline: ev
                        .header
                        .occurred_at
                        .saturating_add(self.close_timeout_micros),
                    topic: input.topic.to_string(),
                    partition: input.partition,
                });
                self.state.batches.put(&f.batch_id, c);
                Outcome::Emit(self.try_close(&f.batch_id, None))
            }
            // Ingestion gave up on the batch: pass the compensation trigger downstream.
            Payload::DataIngestionFailed(f) => {
                if self.counts(&f.batch_id).held.is_some() {
                    return Outcome::Emit(vec![]);
                }
                let reason = format!("ingestion failed the batch ({})", f.error_kind);
                Outcome::Emit(self.fail_and_hold(
                    ev,
                    &f.batch_id,
                    ("upstream_failed", reason),
                    "ingestion",
                ))
            }
            _ => Outcome::Emit(vec![]),
        }
    }

    /// Fails the batches whose missing records did not arrive before their deadline.
    fn tick(&mut self, now_micros: i64, owns: Owns<'_>) -> Vec<Output> {
        let due: Vec<String> = self
            .state
            .batches
            .keys()
            .into_iter()
            .filter(|b| {
                self.state
                    .batches
                    .get(b)
                    .and_then(|c| c.closing.as_ref())
                    .is_some_and(|c| c.due(now_micros, owns))
            })
            .collect();
        due.iter()
            .flat_map(|b| self.try_close(b, Some(now_micros)))
            .collect()
    }

    fn state(&mut self) -> Option<&mut dyn pipeline::state::DurableState> {
        Some(&mut self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline::crypto::DataKey;
    use pipeline::events::{DataIngestionFinished, DataIngestionStarted};
    use pipeline::state::DurableState;
    use serde_json::{json, Value};

    fn master() -> KeyRef {
        KeyRef::from_hex("m1", &"11".repeat(32)).expect("key")
    }

    fn stage(max_failure_ratio: f64) -> Anonymizer {
        let engine = Engine::new(
            Policy::safe_harbor(),
            Keys {
                pseudonym: KeyRef::from_hex("p1", &"22".repeat(32)).expect("key"),
                reidentify: None,
            },
            Context {
                tenant: "t".into(),
                reference_date: chrono::NaiveDate::from_ymd_opt(2026, 1, 1).expect("date"),
            },
        )
        .expect("engine");
        Anonymizer::new(
            master(),
            engine,
            max_failure_ratio,
            std::time::Duration::from_secs(60),
        )
    }

    /// A `SourceRecordIngested` of batch `b1`, sealed as ingestion seals it.
    fn sealed(
        position: i64,
        link: Option<&str>,
        format: &str,
        record_type: &str,
        content: Value,
    ) -> Event {
        let body = SourceRecordBody {
            patient_link: link.map(str::to_string),
            content,
            original: "raw".into(),
        };
        let dk = DataKey::generate(&master()).expect("dek");
        let sealed = dk
            .seal_record(
                &serde_json::to_vec(&body).expect("json"),
                &SourceRecordIngested::aad("b1", position),
            )
            .expect("seal");
        Event::new(
            "medpipe-ingestion",
            "b1",
            None,
            Payload::SourceRecordIngested(SourceRecordIngested {
                batch_id: "b1".into(),
                position,
                source_format: format.into(),
                record_type: record_type.into(),
                sealed,
            }),
        )
    }

    fn record(position: i64, link: Option<&str>) -> Event {
        let content = json!({"Id": link, "FIRST": "Ann", "SSN": "999-11-2222", "GENDER": "F", "BIRTHDATE": "1980-05-06"});
        sealed(position, link, "csv", "Patient", content)
    }

    fn lifecycle(finished: bool) -> Event {
        closing_after(if finished { 3 } else { -1 })
    }

    /// `DataIngestionStarted` for a negative count, else `DataIngestionFinished` saying
    /// `emitted` records were emitted.
    fn closing_after(emitted: i64) -> Event {
        let payload = if emitted >= 0 {
            Payload::DataIngestionFinished(DataIngestionFinished {
                batch_id: "b1".into(),
                records_emitted: emitted,
                records_rejected: 0,
                file_size_bytes: 1,
                file_sha256: "x".into(),
                archive_location: "a".into(),
            })
        } else {
            Payload::DataIngestionStarted(DataIngestionStarted {
                batch_id: "b1".into(),
                format: "csv".into(),
                file_sha256: "x".into(),
                release_of: None,
                expected_concept_maps: None,
                expected_policy: None,
                reprocess_of: None,
            })
        };
        Event::new("medpipe-ingestion", "b1", None, payload)
    }

    fn run(a: &mut Anonymizer, ev: &Event) -> Outcome {
        a.process(&Input {
            topic: "t",
            partition: 0,
            offset: 0,
            event: ev,
            redriven: false,
        })
    }

    /// A batch's closing event; a failure comes with the `BatchHeld` it causes.
    fn closing(o: Outcome) -> Payload {
        match o {
            Outcome::Emit(mut outs) if outs.len() == 1 => outs.remove(0).event.payload,
            Outcome::Emit(outs) if outs.len() == 2 => {
                let (first, second) = (&outs[0].event, &outs[1].event);
                let (Payload::AnonymizationFailed(f), Payload::BatchHeld(h)) =
                    (&first.payload, &second.payload)
                else {
                    panic!("{outs:?}")
                };
                assert_eq!(h.batch_id, f.batch_id);
                assert_eq!(h.reason_kind, f.error_kind);
                assert_eq!(h.records_forwarded, f.records_anonymized);
                assert_eq!(
                    second.header.causation_id.as_deref(),
                    Some(first.header.event_id.as_str())
                );
                first.payload.clone()
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn records_are_deidentified_with_policy_and_report_and_counted() {
        let mut a = stage(0.5);
        run(&mut a, &lifecycle(false));
        let Outcome::Emit(outs) = run(&mut a, &record(1, Some("p-1"))) else {
            panic!()
        };
        let Payload::RecordAnonymized(r) = &outs[0].event.payload else {
            panic!()
        };
        assert_eq!(
            outs[0].key, r.batch_id,
            "keyed by its batch, like its lifecycle"
        );
        assert_eq!(r.patient_pseudonym, a.engine().pseudonym("p-1"));
        assert!(!r.content_json.contains("Ann") && !r.content_json.contains("999-11-2222"));
        assert!(!r.content_json.contains("1980-05-06"));
        assert!(r.fields_redacted >= 2, "{r:?}");
        assert_eq!(
            r.policy_hash.as_deref(),
            Some(a.engine().policy().hash.as_str())
        );
        let report = r.report_json.as_deref().expect("report");
        assert!(
            !report.contains("Ann") && !report.contains("999-"),
            "{report}"
        );
        assert!(matches!(
            run(&mut a, &record(2, None)),
            Outcome::DeadLetter {
                error_type: "no_patient_link",
                ..
            }
        ));
        let Payload::AnonymizationFinished(f) = closing(run(&mut a, &closing_after(2))) else {
            panic!()
        };
        assert_eq!(
            (f.records_anonymized, f.records_dead_lettered),
            (Some(1), Some(1))
        );
    }

    /// The key and the `RecordAnonymized` of a record's outcome.
    fn anonymized(o: Outcome) -> (String, RecordAnonymized) {
        match o {
            Outcome::Emit(mut outs) if !outs.is_empty() => {
                let out = outs.remove(0);
                match out.event.payload {
                    Payload::RecordAnonymized(r) => (out.key, r),
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shared_resources_need_no_patient_and_get_their_own_pseudonym() {
        let mut a = stage(0.5);
        run(&mut a, &lifecycle(false));
        let practitioner = json!({
            "fullUrl": "urn:uuid:pr-1",
            "resource": {
                "resourceType": "Practitioner", "id": "pr-1", "active": true, "gender": "female",
                "name": [{"family": "Quigley", "given": ["Zelda"], "prefix": ["Dr."]}],
                "identifier": [
                    {"system": "http://hl7.org/fhir/sid/us-npi", "value": "9999912345"},
                    {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "999-12-3456"}
                ],
                "telecom": [{"system": "phone", "value": "555-0142"}],
                "address": [{"line": ["12 Elm St"], "city": "Springfield", "state": "MA", "postalCode": "01101"}]
            }
        });
        let (key, r) = anonymized(run(
            &mut a,
            &sealed(1, None, "fhir-bundle", "Practitioner", practitioner),
        ));
        assert_eq!(
            r.patient_pseudonym, "",
            "a practitioner is nobody's patient"
        );
        assert_eq!(key, r.batch_id);
        let content: Value = serde_json::from_str(&r.content_json).expect("json");
        let resource = &content["resource"];
        assert_eq!(resource["id"], a.engine().pseudonym("pr-1"));
        assert_eq!(
            resource["identifier"],
            json!([{"system": "http://hl7.org/fhir/sid/us-npi", "value": a.engine().pseudonym("9999912345")}])
        );
        for phi in [
            "Quigley",
            "Zelda",
            "999-12-3456",
            "9999912345",
            "555-0142",
            "Elm",
            "Springfield",
            "01101",
        ] {
            assert!(!r.content_json.contains(phi), "{phi} in {}", r.content_json);
        }
        assert_eq!(resource["address"][0]["state"], "MA");

        // Synthea creates providers under a condition and references them by it: both
        // sides get the same pseudonym, and the reference keeps its type.
        let npi = "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|9999912345";
        let created = json!({
            "fullUrl": "urn:uuid:pr-3",
            "request": {"method": "POST", "url": "Practitioner", "ifNoneExist": "identifier=http://hl7.org/fhir/sid/us-npi|9999912345"},
            "resource": {"resourceType": "Practitioner", "id": "pr-3"}
        });
        let (_, r) = anonymized(run(
            &mut a,
            &sealed(4, None, "fhir-bundle", "Practitioner", created),
        ));
        let content: Value = serde_json::from_str(&r.content_json).expect("json");
        assert_eq!(content["request"]["ifNoneExist"], a.engine().pseudonym(npi));
        let encounter = json!({"resource": {
            "resourceType": "Encounter", "id": "e-1", "subject": {"reference": "Patient/p-1"},
            "participant": [{"individual": {"reference": npi, "display": "Dr. Zelda Quigley"}}],
            "serviceProvider": {"reference": "Organization?identifier=https://github.com/synthetichealth/synthea|org-9"},
        }});
        let (_, r) = anonymized(run(
            &mut a,
            &sealed(5, Some("p-1"), "fhir-bundle", "Encounter", encounter),
        ));
        let content: Value = serde_json::from_str(&r.content_json).expect("json");
        assert_eq!(
            content["resource"]["participant"][0]["individual"],
            json!({"reference": format!("Practitioner/{}", a.engine().pseudonym(npi))})
        );
        assert!(!r.content_json.contains("org-9") && !r.content_json.contains("9999912345"));

        // An organisation without an id or fullUrl cannot be referenced: a real error.
        let nameless = json!({"resource": {"resourceType": "Organization", "name": "X"}});
        assert!(matches!(
            run(
                &mut a,
                &sealed(2, None, "fhir-bundle", "Organization", nameless)
            ),
            Outcome::DeadLetter {
                error_type: "no_resource_id",
                ..
            }
        ));
        // Only FHIR resources of a shared type stand alone: a CSV row still needs a patient.
        let row = json!({"Id": "pr-2", "NAME": "Zelda Quigley"});
        assert!(matches!(
            run(&mut a, &sealed(3, None, "csv", "Practitioner", row)),
            Outcome::DeadLetter {
                error_type: "no_patient_link",
                ..
            }
        ));
    }

    #[test]
    fn a_batch_over_the_failure_threshold_fails_and_counts_survive_only_commits() {
        let mut a = stage(0.2);
        run(&mut a, &lifecycle(false));
        run(&mut a, &record(1, Some("p-1")));
        a.state.batches.commit();
        // A redone batch after an abort must not count twice.
        run(&mut a, &record(2, None));
        a.state.batches.rollback();
        run(&mut a, &record(2, None));
        run(&mut a, &record(3, Some("p-3")));
        let Payload::AnonymizationFailed(f) = closing(run(&mut a, &lifecycle(true))) else {
            panic!()
        };
        assert_eq!((f.records_anonymized, f.records_dead_lettered), (2, 1));
        assert_eq!(f.error_kind, "failure_threshold");
        assert_eq!(
            f.reason,
            "1 of 3 records could not be de-identified (33.3%), above the 20.0% threshold"
        );
        // The failed batch is held: its counts go, a hold stays.
        let held = BatchCounts {
            held: Some(0),
            ..BatchCounts::default()
        };
        assert_eq!(a.state.batches.get("b1"), Some(&held));
        // A record that comes after is held, not forwarded; a later failure adds nothing.
        assert_eq!(run(&mut a, &record(4, Some("p-4"))), Outcome::Emit(vec![]));
        assert_eq!(a.state.batches.get("b1").and_then(|c| c.held), Some(1));
        assert_eq!(run(&mut a, &lifecycle(true)), Outcome::Emit(vec![]));
    }

    #[test]
    fn restored_state_continues_the_count() {
        let mut a = stage(0.5);
        let saved = serde_json::to_vec(&BatchCounts {
            anonymized: 7,
            dead_lettered: 0,
            closing: None,
            held: None,
            release_of: None,
            expected_concept_maps: None,
            reprocess_of: None,
        })
        .expect("json");
        a.state
            .batches
            .restore(vec![("b1".into(), Some(saved))])
            .expect("restore");
        run(&mut a, &record(8, Some("p-8")));
        let Payload::AnonymizationFinished(f) = closing(run(&mut a, &closing_after(8))) else {
            panic!()
        };
        assert_eq!(f.records_anonymized, Some(8));
    }

    #[test]
    fn a_batch_closes_only_when_its_counts_add_up() {
        let mut a = stage(0.5);
        run(&mut a, &lifecycle(false));
        run(&mut a, &record(1, Some("p-1")));
        // Ingestion says 2 records; one is missing so far: nothing closes.
        let early = closing_after(2);
        assert_eq!(run(&mut a, &early), Outcome::Emit(vec![]));
        let never = |_: &str, _: i32| true;
        assert!(a.tick(early.header.occurred_at + 1, &never).is_empty());
        // The missing record arrives: the batch finishes with it, caused by the close.
        let Outcome::Emit(outs) = run(&mut a, &record(2, Some("p-2"))) else {
            panic!()
        };
        assert_eq!(outs.len(), 2, "{outs:?}");
        assert_eq!(
            outs[1].event.header.causation_id.as_deref(),
            Some(early.header.event_id.as_str())
        );
        let Payload::AnonymizationFinished(f) = &outs[1].event.payload else {
            panic!("{outs:?}")
        };
        assert_eq!(
            (
                f.upstream_records_emitted,
                f.records_anonymized,
                f.records_dead_lettered
            ),
            (2, Some(2), Some(0))
        );
    }

    #[test]
    fn a_batch_missing_records_fails_at_its_deadline_on_the_owning_instance_only() {
        let mut a = stage(0.5);
        run(&mut a, &lifecycle(false));
        run(&mut a, &record(1, Some("p-1")));
        let fin = closing_after(3);
        assert_eq!(run(&mut a, &fin), Outcome::Emit(vec![]));
        let deadline = fin.header.occurred_at + 60_000_000;
        let owns_all = |_: &str, _: i32| true;
        let owns_none = |_: &str, _: i32| false;
        assert!(
            a.tick(deadline - 1, &owns_all).is_empty(),
            "before the deadline"
        );
        assert!(
            a.tick(deadline, &owns_none).is_empty(),
            "not this instance's"
        );
        let Payload::AnonymizationFailed(f) = closing(Outcome::Emit(a.tick(deadline, &owns_all)))
        else {
            panic!()
        };
        assert_eq!(f.error_kind, "counts_mismatch");
        assert_eq!(
            f.reason,
            "ingestion emitted 3 records, but only 1 were anonymized and 0 dead-lettered: 2 missing after waiting 60s"
        );
        assert!(a.tick(deadline + 1, &owns_all).is_empty(), "closed once");
    }

    #[test]
    fn more_records_than_emitted_fail_the_batch_at_once() {
        let mut a = stage(0.5);
        run(&mut a, &lifecycle(false));
        run(&mut a, &record(1, Some("p-1")));
        run(&mut a, &record(2, Some("p-2")));
        let Payload::AnonymizationFailed(f) = closing(run(&mut a, &closing_after(1))) else {
            panic!()
        };
        assert_eq!(f.error_kind, "counts_mismatch");
        assert!(f.reason.contains("1 more than emitted"), "{}", f.reason);
    }

    #[test]
    fn names_from_a_patients_record_are_scrubbed_from_their_later_notes_also_after_a_restart() {
        use pipeline::state::DurableState;
        let seal = |position: i64, record_type: &str, content: Value| {
            sealed(position, Some("p-9"), "fhir-ndjson", record_type, content)
        };
        let patient = seal(
            1,
            "Patient",
            json!({"resourceType": "Patient", "id": "p-9", "name": [{"family": "Bishop", "given": ["Alonso"]}]}),
        );
        // A lower-case surname that is also a word: no rule of the scrubber finds it.
        let note = |position: i64| {
            seal(
                position,
                "Observation",
                json!({"resourceType": "Observation", "id": "o1", "status": "final",
                    "subject": {"reference": "Patient/p-9"},
                    "note": [{"text": "Plan discussed with bishop at the bedside."}]}),
            )
        };
        let text_of = |o: Outcome| {
            let Outcome::Emit(outs) = o else { panic!() };
            let Payload::RecordAnonymized(r) = &outs[0].event.payload else {
                panic!()
            };
            r.content_json.clone()
        };
        // Without the patient's record the name stays: the memory is what removes it.
        let mut fresh = stage(0.5);
        assert!(text_of(run(&mut fresh, &note(2))).contains("bishop"));

        let mut a = stage(0.5);
        run(&mut a, &patient);
        let scrubbed = text_of(run(&mut a, &note(2)));
        assert!(
            !scrubbed.contains("bishop") && scrubbed.contains("[NAME]"),
            "{scrubbed}"
        );

        // The memory is committed with the stage's state, sealed, and a new process that
        // reloads the state scrubs the name too.
        let entries = a.state.changes().expect("changes");
        let stored: Vec<u8> = entries
            .iter()
            .flat_map(|(_, v)| v.clone().unwrap_or_default())
            .collect();
        assert!(!String::from_utf8_lossy(&stored).contains("Bishop"));
        a.state.commit();
        let mut restarted = stage(0.5);
        restarted.state.restore(entries).expect("restore");
        let scrubbed = text_of(run(&mut restarted, &note(3)));
        assert!(
            !scrubbed.contains("bishop") && scrubbed.contains("[NAME]"),
            "{scrubbed}"
        );
    }

    /// What one record's processing published: the record pseudonym per anonymized record
    /// and (merged, survivor, trigger) per merge. Every one is keyed by its batch.
    #[allow(clippy::type_complexity)]
    fn published(o: Outcome) -> (Vec<String>, Vec<(String, String, String)>) {
        let Outcome::Emit(outs) = o else {
            panic!("{o:?}")
        };
        let mut records = Vec::new();
        let mut merges = Vec::new();
        for out in outs {
            match out.event.payload {
                Payload::RecordAnonymized(r) => {
                    assert_eq!(out.key, r.batch_id);
                    records.push(r.patient_pseudonym)
                }
                Payload::PatientMerged(m) => {
                    assert_eq!(out.key, m.batch_id);
                    merges.push((m.merged_pseudonym, m.surviving_pseudonym, m.trigger))
                }
                other => panic!("{other:?}"),
            }
        }
        (records, merges)
    }

    const MRN_SYSTEM: &str = "urn:oid:2.16.840.1.113883.19.5.99.1";

    fn fhir_patient(position: i64, id: &str, mrn: Option<&str>, link: Value) -> Event {
        let mut identifier = vec![json!({"system": "urn:other", "value": format!("X-{id}")})];
        if let Some(mrn) = mrn {
            identifier.push(json!({"system": MRN_SYSTEM, "value": mrn}));
        }
        let resource = json!({"resourceType": "Patient", "id": id, "identifier": identifier,
                              "name": [{"family": "Okafor"}], "link": link});
        sealed(position, Some(id), "fhir-ndjson", "Patient", resource)
    }

    fn fhir_observation(position: i64, patient_id: &str) -> Event {
        let resource = json!({"resourceType": "Observation", "id": format!("o{position}"),
            "status": "final", "subject": {"reference": format!("Patient/{patient_id}")}});
        sealed(
            position,
            Some(patient_id),
            "fhir-ndjson",
            "Observation",
            resource,
        )
    }

    fn hl7(position: i64, event: &str, segments: &[&str]) -> Event {
        let mut lines = vec![format!(
            "MSH|^~\\&|A|SYNTH_HOSP|B|SYNTH_HOSP|20240101||ADT^{event}|C{position}|P|2.5.1"
        )];
        lines.extend(segments.iter().map(|s| s.to_string()));
        let segments: Vec<Value> = lines
            .iter()
            .map(|line| {
                let mut parts = line.split('|');
                let id = parts.next().unwrap_or_default().to_string();
                let mut fields: Vec<Value> = parts
                    .map(|f| {
                        let reps: Vec<Value> = f
                            .split('~')
                            .filter(|r| !r.is_empty())
                            .map(|r| {
                                json!(r
                                    .split('^')
                                    .map(|c| json!(c.split('&').collect::<Vec<_>>()))
                                    .collect::<Vec<_>>())
                            })
                            .collect();
                        json!(reps)
                    })
                    .collect();
                if id == "MSH" {
                    fields.insert(0, json!([[["|"]]]));
                }
                pipeline::hl7::segment(&id, fields)
            })
            .collect();
        let content = pipeline::hl7::message(segments);
        let link = pipeline::hl7::get(&content, "PID-3");
        sealed(
            position,
            link.as_deref(),
            "hl7v2",
            &format!("ADT^{event}"),
            content,
        )
    }

    #[test]
    fn one_human_gets_one_pseudonym_across_formats_by_the_trusted_mrn() {
        let mut a = stage(0.5);
        run(&mut a, &lifecycle(false));
        let identity = a.engine.identity_pseudonym(&identity::TrustedId {
            system: "synth-hosp-mrn".into(),
            value: "MRN-4242".into(),
        });
        // FHIR: the Patient carries the MRN; its Observation names it by the source id.
        let (p, merges) = published(run(
            &mut a,
            &fhir_patient(1, "fhir-7", Some("MRN-4242"), json!([])),
        ));
        assert_eq!(p, vec![identity.clone()]);
        assert!(merges.is_empty());
        let (o, _) = published(run(&mut a, &fhir_observation(2, "fhir-7")));
        assert_eq!(o, vec![identity.clone()]);
        // HL7: PID-3 repetitions; the MRN of SYNTH_HOSP is the second.
        let (h, _) = published(run(
            &mut a,
            &hl7(
                3,
                "A01",
                &["PID|1||V-1^^^OTHER^PI~MRN-4242^^^SYNTH_HOSP^MR||Okafor^Ann"],
            ),
        ));
        assert_eq!(h, vec![identity.clone()]);
        // CSV: a row with the MRN column.
        let row = json!({"Id": "csv-9", "MRN": "MRN-4242", "FIRST": "Ann", "GENDER": "F"});
        let (c, _) = published(run(
            &mut a,
            &sealed(4, Some("csv-9"), "csv", "Patient", row),
        ));
        assert_eq!(c, vec![identity.clone()]);
        // Another human, no trusted identifier: keyed by the source id, as before.
        let (x, _) = published(run(&mut a, &fhir_observation(5, "fhir-8")));
        assert_eq!(x[0], a.engine.pseudonym("fhir-8"));
        // The reference in the Observation's content is the patient's pseudonym too.
        let Outcome::Emit(outs) = run(&mut a, &fhir_observation(6, "fhir-7")) else {
            panic!()
        };
        let Payload::RecordAnonymized(r) = &outs[0].event.payload else {
            panic!()
        };
        assert!(
            r.content_json.contains(&format!("Patient/{identity}")),
            "{}",
            r.content_json
        );
    }

    #[test]
    fn records_before_their_patient_are_linked_by_a_merge_once_the_mrn_is_known() {
        let mut a = stage(0.5);
        run(&mut a, &lifecycle(false));
        let source = a.engine.pseudonym("fhir-7");
        let (o, _) = published(run(&mut a, &fhir_observation(1, "fhir-7")));
        assert_eq!(o[0], source);
        let (p, merges) = published(run(
            &mut a,
            &fhir_patient(2, "fhir-7", Some("MRN-1"), json!([])),
        ));
        let identity = p[0].clone();
        assert_ne!(identity, source);
        assert_eq!(
            merges,
            vec![(source.clone(), identity.clone(), "identity-resolved".into())]
        );
        // Once: the same Patient again merges nothing new.
        let (_, again) = published(run(
            &mut a,
            &fhir_patient(3, "fhir-7", Some("MRN-1"), json!([])),
        ));
        assert!(again.is_empty());
        let (later, _) = published(run(&mut a, &fhir_observation(4, "fhir-7")));
        assert_eq!(later[0], identity);
    }

    #[test]
    fn an_hl7_merge_is_announced_once_and_later_records_of_the_merged_patient_go_to_the_survivor() {
        let mut a = stage(0.5);
        run(&mut a, &lifecycle(false));
        let (old, _) = published(run(
            &mut a,
            &hl7(1, "A01", &["PID|1||MRN-OLD^^^SYNTH_HOSP^MR"]),
        ));
        let (new, _) = published(run(
            &mut a,
            &hl7(2, "A01", &["PID|1||MRN-NEW^^^SYNTH_HOSP^MR"]),
        ));
        let (old, new) = (old[0].clone(), new[0].clone());
        assert_ne!(old, new);
        let a40 = hl7(
            3,
            "A40",
            &[
                "PID|1||MRN-NEW^^^SYNTH_HOSP^MR",
                "MRG|MRN-OLD^^^SYNTH_HOSP^MR",
            ],
        );
        let (r, merges) = published(run(&mut a, &a40));
        assert_eq!(r[0], new);
        assert_eq!(merges, vec![(old.clone(), new.clone(), "hl7-merge".into())]);
        // A redelivered merge announces nothing new.
        let (_, again) = published(run(&mut a, &a40));
        assert!(again.is_empty());
        // A later message under the old MRN belongs to the survivor.
        let (late, _) = published(run(
            &mut a,
            &hl7(4, "A08", &["PID|1||MRN-OLD^^^SYNTH_HOSP^MR"]),
        ));
        assert_eq!(late[0], new);

        // The merge survives a restart (the runner reloads the committed state).
        let entries = a.state.changes().expect("changes");
        let mut b = stage(0.5);
        b.state.restore(entries).expect("restore");
        let (late, _) = published(run(
            &mut b,
            &hl7(5, "A08", &["PID|1||MRN-OLD^^^SYNTH_HOSP^MR"]),
        ));
        assert_eq!(late[0], new);
        // A reverse merge would close a loop: refused, nothing announced.
        let back = hl7(
            6,
            "A40",
            &[
                "PID|1||MRN-OLD^^^SYNTH_HOSP^MR",
                "MRG|MRN-NEW^^^SYNTH_HOSP^MR",
            ],
        );
        let (_, none) = published(run(&mut b, &back));
        assert!(none.is_empty());
    }

    #[test]
    fn a_fhir_patient_replaced_by_another_stays_under_its_own_pseudonym_and_links_to_it() {
        let mut a = stage(0.5);
        run(&mut a, &lifecycle(false));
        let (survivor, _) = published(run(
            &mut a,
            &fhir_patient(1, "new", Some("MRN-2"), json!([])),
        ));
        let survivor = survivor[0].clone();
        let link = json!([{"other": {"reference": "Patient/new"}, "type": "replaced-by"}]);
        let Outcome::Emit(outs) = run(&mut a, &fhir_patient(2, "old", None, link)) else {
            panic!()
        };
        let Payload::RecordAnonymized(r) = &outs[0].event.payload else {
            panic!()
        };
        let old = a.engine.pseudonym("old");
        assert_eq!(r.patient_pseudonym, old);
        let content: Value = serde_json::from_str(&r.content_json).expect("json");
        assert_eq!(
            content["link"],
            json!([{"other": {"reference": format!("Patient/{survivor}")}, "type": "replaced-by"}])
        );
        let Payload::PatientMerged(m) = &outs[1].event.payload else {
            panic!("{outs:?}")
        };
        assert_eq!(
            (m.merged_pseudonym.as_str(), m.surviving_pseudonym.as_str()),
            (old.as_str(), survivor.as_str())
        );
        assert!(m.merged_record_has_link);
        // The old patient's later records go to the survivor.
        let (later, _) = published(run(&mut a, &fhir_observation(3, "old")));
        assert_eq!(later[0], survivor);
    }
}
