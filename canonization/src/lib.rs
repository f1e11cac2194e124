//! The canonization stage: maps de-identified records of every source format to canonical
//! FHIR R4 resources, normalises codes (versioned concept maps) and units (UCUM), validates
//! each resource against the FHIR R4 JSON Schema, and publishes it on its resource type's
//! topic, keyed by patient pseudonym. It keeps per-batch counts as durable stage state and
//! closes each batch with `EventDataCanonizationCompleted` or `CanonizationFailed`. Its
//! input is keyed by batch, so several instances split the batches between them (see
//! ARCHITECTURE.md, "How each stage scales").

pub mod compensation;
pub mod concept_map;
pub mod mapping;
pub mod normalize;
pub mod typed;
pub mod units;
pub mod validate;

use std::collections::BTreeMap;

use pipeline::events::{
    AllergyIntoleranceDetails, BatchReleased, BatchReprocessed, BatchWithdrawalRequested,
    CanonicalBatchWithdrawn, CanonicalPatient, CanonicalRecord, CanonicalSharedRecord,
    CanonizationFailed, ConditionDetails, DiagnosticReportDetails, EncounterDetails,
    EventDataCanonizationCompleted, EventDataCanonizationCreated, EventDataCanonizationStarted,
    ImmunizationDetails, MedicationRequestDetails, ObservationDetails, PatientMerged, Payload,
    ProcedureDetails, Provenance, RecordAnonymized,
};
use pipeline::runner::Owns;
use pipeline::state::{KeyedState, PendingClose};
use pipeline::{Event, Input, Outcome, Output, PipelineError, ResourceType, Stage};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::concept_map::ConceptMaps;
use crate::mapping::{map_record, MapError, Mapped};
use crate::normalize::Report;
use crate::typed::Typed;
use crate::validate::FhirValidator;

pub const SERVICE: &str = "medpipe-canonization";

const DEFAULT_WITHDRAW_RETENTION_MICROS: i64 = 7 * 24 * 3600 * 1_000_000;
/// Records looked at per withdrawal transaction, as many as the runner's default batch.
const DEFAULT_WITHDRAW_PER_TXN: usize = 5_000;

pub use crate::mapping::resource_id;

/// A batch's progress, durable in `<p>-internal.canonization-state.v1`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchState {
    pub policy_version: String,
    pub records_in: i64,
    /// `AnonymizationFinished`, held until `records_in` reaches its count of anonymized
    /// records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closing: Option<PendingClose>,
    pub by_type: BTreeMap<String, i64>,
    pub dead_lettered: i64,
    pub unsupported: i64,
    pub codes_unmapped: i64,
    /// The held batch this batch releases as partial: its records are tagged partial,
    /// no failure threshold fails it, and its completion comes with `BatchReleased`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_of: Option<String>,
    /// The batch this batch reprocesses under new versions: its records are tagged
    /// reprocessed, and its completion comes with `BatchReprocessed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprocess_of: Option<String>,
}

/// The stage's durable state: batch counts by batch id, and the compensation ledger.
#[derive(Default)]
pub struct StageState {
    pub batches: KeyedState<BatchState>,
    pub ledger: compensation::Ledger,
}

impl pipeline::state::DurableState for StageState {
    fn changes(&self) -> Result<Vec<pipeline::state::StateEntry>, PipelineError> {
        let mut out = self.batches.changes()?;
        out.extend(self.ledger.changes()?);
        Ok(out)
    }

    fn commit(&mut self) {
        self.batches.commit();
        self.ledger.commit();
    }

    fn rollback(&mut self) {
        self.batches.rollback();
        self.ledger.rollback();
    }

    fn restore(&mut self, entries: Vec<pipeline::state::StateEntry>) -> Result<(), PipelineError> {
        let rest = self.ledger.restore(entries)?;
        self.batches.restore(rest)
    }
}

/// Why a record did not become canonical records.
enum Refused {
    /// A record type outside the canonical model: consumed and counted.
    Unsupported,
    /// Cannot be mapped safely, or maps to an invalid resource: dead-lettered.
    Dead {
        error_type: &'static str,
        reason: String,
    },
}

pub struct Canonizer {
    maps: ConceptMaps,
    tables: mapping::Tables,
    validator: FhirValidator,
    /// `id@version` of every loaded map, for lifecycle events.
    maps_version: String,
    max_failure_ratio: f64,
    /// How long a batch whose counts do not add up waits for its missing records.
    close_timeout_micros: i64,
    /// How long a completed batch's records are remembered, so an operator can withdraw it.
    withdraw_retention_micros: i64,
    /// At most this many remembered records are looked at per withdrawal transaction.
    withdraw_per_txn: usize,
    /// Batch counts, and what each open batch published (for its withdrawal).
    state: StageState,
    /// Codes no concept map covered. A metric, so a redone batch may count twice; the
    /// exact count per batch is in `EventDataCanonizationCompleted.codes_unmapped`.
    unmapped: prometheus::IntCounter,
}

impl Canonizer {
    /// A stage with its concept maps and mapping tables (loaded and validated by the
    /// caller) and the built-in unit table and FHIR schema (validated here), so that
    /// nothing that can be broken is first noticed on a record.
    pub fn new(
        maps: ConceptMaps,
        tables: mapping::Tables,
        max_failure_ratio: f64,
        close_timeout: std::time::Duration,
    ) -> Result<Self, PipelineError> {
        let validator = FhirValidator::new().map_err(|e| PipelineError::Schema {
            file: "the bundled FHIR R4 JSON schema".into(),
            message: e.to_string(),
        })?;
        let maps_version = maps
            .versions()
            .iter()
            .map(|(id, v, _, _)| format!("{id}@{v}"))
            .collect::<Vec<_>>()
            .join(",");
        units::embedded_table().map_err(|e| PipelineError::Schema {
            file: "canonization/units/ucum.toml (built in)".into(),
            message: e.to_string(),
        })?;
        Ok(Canonizer {
            maps,
            tables,
            validator,
            maps_version,
            max_failure_ratio,
            close_timeout_micros: i64::try_from(close_timeout.as_micros()).unwrap_or(i64::MAX),
            withdraw_retention_micros: DEFAULT_WITHDRAW_RETENTION_MICROS,
            withdraw_per_txn: DEFAULT_WITHDRAW_PER_TXN,
            state: StageState::default(),
            unmapped: prometheus::IntCounter::new(
                "medpipe_canonization_codes_unmapped_total",
                "Codes kept as the source gave them because no concept map covered them.",
            )
            .map_err(PipelineError::Metrics)?,
        })
    }

    /// Whether every `id@version` of `expected` (comma-separated) is loaded.
    fn has_maps(&self, expected: &str) -> bool {
        let loaded: Vec<&str> = self.maps_version.split(',').collect();
        expected
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .all(|m| loaded.contains(&m))
    }

    /// How long a completed batch stays withdrawable by an operator (default 7 days).
    pub fn with_withdraw_retention(mut self, retention: std::time::Duration) -> Self {
        self.withdraw_retention_micros = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
        self
    }

    /// How many remembered records one withdrawal transaction looks at, at most (default
    /// 5,000): a large batch is withdrawn over several transactions.
    pub fn with_withdraw_per_txn(mut self, records: usize) -> Self {
        self.withdraw_per_txn = records.max(1);
        self
    }

    /// The loaded concept maps, as `id@version` list.
    pub fn maps_version(&self) -> &str {
        &self.maps_version
    }

    /// Maps, normalises and validates one anonymized record.
    fn canonize(&self, rec: &RecordAnonymized) -> Result<Vec<(Payload, i64)>, Refused> {
        let content: Value =
            serde_json::from_str(&rec.content_json).map_err(|e| Refused::Dead {
                error_type: "invalid_content",
                reason: format!(
                    "content_json is not JSON (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            })?;
        let mapped = map_record(
            &self.tables,
            &mapping::Input {
                source_format: &rec.source_format,
                record_type: &rec.record_type,
                patient_pseudonym: &rec.patient_pseudonym,
                content: &content,
                batch_id: &rec.batch_id,
                position: rec.position,
            },
        )
        .map_err(|e| match e {
            MapError::Unsupported { .. } => Refused::Unsupported,
            MapError::Invalid { reason } => Refused::Dead {
                error_type: "mapping",
                reason,
            },
        })?;
        let mut out = Vec::with_capacity(mapped.len());
        for m in mapped {
            out.push(self.finish(rec, m)?);
        }
        Ok(out)
    }

    /// Normalises and validates one mapped resource and builds its canonical record.
    /// Returns the record and how many of its codes no map covered.
    fn finish(&self, rec: &RecordAnonymized, m: Mapped) -> Result<(Payload, i64), Refused> {
        let Mapped {
            resource_type,
            resource_id,
            mut resource,
        } = m;
        if let Some(held) = &rec.release_of {
            compensation::tag_partial(&mut resource, held);
        }
        if let Some(old) = &rec.reprocess_of {
            compensation::tag_reprocessed(
                &mut resource,
                old,
                &rec.policy_version,
                &self.maps_version,
            );
        }
        let date = typed::effective(&resource).unwrap_or_default();
        let report = normalize::normalize(
            resource_type,
            self.tables.code_element(resource_type),
            &mut resource,
            &self.maps,
            &date,
        );
        self.validator
            .validate(&resource)
            .map_err(|inv| Refused::Dead {
                error_type: "fhir_invalid",
                reason: format!(
                    "{} at {}: {} (schema {})",
                    inv.resource_type,
                    if inv.path.is_empty() { "/" } else { &inv.path },
                    inv.message,
                    inv.schema_path
                ),
            })?;
        let unmapped = i64::from(report.code_status == "unmapped");
        let t = typed::typed(
            resource_type,
            self.tables.code_element(resource_type),
            &resource,
        );
        let provenance = Provenance {
            source_format: rec.source_format.clone(),
            batch_id: rec.batch_id.clone(),
            source_position: rec.position,
            policy_version: rec.policy_version.clone(),
            concept_map_version: report.map_version.clone().unwrap_or_else(|| "none".into()),
        };
        let fhir_json = resource.to_string();
        let payload = build(
            resource_type,
            resource_id,
            rec,
            t,
            report,
            fhir_json,
            provenance,
        );
        Ok((payload, unmapped))
    }

    fn batch(&self, batch: &str) -> BatchState {
        self.state.batches.get(batch).cloned().unwrap_or_default()
    }

    /// Created and Started, the first time a batch is seen (by its start or a record).
    fn open(&mut self, batch: &str, policy_version: &str, cause: &Event) -> Vec<Output> {
        if self.state.batches.get(batch).is_some()
            || self.state.ledger.withdrawn.get(batch).is_some()
        {
            return vec![];
        }
        self.state.batches.put(
            batch,
            BatchState {
                policy_version: policy_version.to_string(),
                ..BatchState::default()
            },
        );
        vec![
            lifecycle(
                cause,
                batch,
                Payload::EventDataCanonizationCreated(EventDataCanonizationCreated {
                    batch_id: batch.to_string(),
                    policy_version: policy_version.to_string(),
                    concept_map_version: self.maps_version.clone(),
                }),
            ),
            lifecycle(
                cause,
                batch,
                Payload::EventDataCanonizationStarted(EventDataCanonizationStarted {
                    batch_id: batch.to_string(),
                }),
            ),
        ]
    }

    /// Completed (or Failed past the threshold) once every expected record is in. A
    /// batch's records and lifecycle are all keyed by the batch, so they arrive in order on
    /// one partition, whose owner alone keeps the batch's state; a redriven dead letter can
    /// still come after the close, so the close waits for both. More records than
    /// anonymization counted (duplicates) fail the batch at once; fewer fail it once `now`
    /// is past the deadline.
    fn maybe_close(&mut self, batch: &str, now: Option<i64>) -> Vec<Output> {
        let s = self.batch(batch);
        let Some(closing) = s.closing.clone() else {
            return vec![];
        };
        let expected = closing.upstream;
        let mismatch = match s.records_in.cmp(&expected) {
            std::cmp::Ordering::Equal => None,
            std::cmp::Ordering::Greater => Some(format!(
                "anonymization counted {expected} records, but {} arrived: {} more",
                s.records_in,
                s.records_in - expected
            )),
            std::cmp::Ordering::Less if now.is_some_and(|n| n >= closing.deadline) => {
                Some(format!(
                    "anonymization counted {expected} records, but only {} arrived: {} missing after waiting {}s",
                    s.records_in,
                    expected - s.records_in,
                    self.close_timeout_micros / 1_000_000
                ))
            }
            std::cmp::Ordering::Less => return vec![],
        };
        self.state.batches.delete(batch);
        let kept = kept(&s.by_type);
        let ratio = if s.records_in == 0 {
            0.0
        } else {
            s.dead_lettered as f64 / s.records_in as f64
        };
        let payload = if let Some(reason) = mismatch {
            Payload::CanonizationFailed(CanonizationFailed {
                batch_id: batch.to_string(),
                error_kind: "counts_mismatch".into(),
                reason,
                records_in: s.records_in,
                records_dead_lettered: s.dead_lettered,
            })
        } else if ratio > self.max_failure_ratio && s.release_of.is_none() {
            Payload::CanonizationFailed(CanonizationFailed {
                batch_id: batch.to_string(),
                error_kind: "failure_threshold".into(),
                reason: format!(
                    "{} of {} records dead-lettered, over the threshold of {:.1}%",
                    s.dead_lettered,
                    s.records_in,
                    self.max_failure_ratio * 100.0
                ),
                records_in: s.records_in,
                records_dead_lettered: s.dead_lettered,
            })
        } else {
            Payload::EventDataCanonizationCompleted(EventDataCanonizationCompleted {
                batch_id: batch.to_string(),
                records_in: s.records_in,
                resources_by_type: s.by_type,
                records_dead_lettered: s.dead_lettered,
                records_unsupported: s.unsupported,
                codes_unmapped: s.codes_unmapped,
                concept_map_version: self.maps_version.clone(),
            })
        };
        let withdrawal_reason = match &payload {
            Payload::CanonizationFailed(f) => {
                Some(format!("canonization failed the batch ({})", f.error_kind))
            }
            _ => None,
        };
        let event = Event::new(SERVICE, batch, Some(&closing.cause_event_id), payload);
        match withdrawal_reason {
            Some(reason) => self.withdraw(
                batch,
                &reason,
                &s.policy_version,
                &event,
                kept,
                (&closing.topic, closing.partition),
            ),
            None => {
                // Remembered for its retention, so that an operator can still withdraw it.
                self.state.ledger.closed.put(
                    batch,
                    compensation::Closed {
                        at: now.unwrap_or_else(|| chrono::Utc::now().timestamp_micros()),
                        policy_version: s.policy_version.clone(),
                        kept,
                        origin: Some((closing.topic.clone(), closing.partition)),
                    },
                );
            }
        }
        let released = match (&event.payload, &s.release_of) {
            (Payload::EventDataCanonizationCompleted(c), Some(held)) => Some(Output {
                key: held.clone(),
                // Correlated by the held batch, like the BatchRetried that began it.
                event: Event::new(
                    SERVICE,
                    held,
                    Some(&event.header.event_id),
                    Payload::BatchReleased(BatchReleased {
                        batch_id: held.clone(),
                        new_batch_id: batch.to_string(),
                        records_published: c.resources_by_type.values().sum(),
                        records_left_out: c.records_dead_lettered,
                    }),
                ),
            }),
            (Payload::EventDataCanonizationCompleted(c), None) => {
                s.reprocess_of.as_ref().map(|old| Output {
                    key: old.clone(),
                    event: Event::new(
                        SERVICE,
                        old,
                        Some(&event.header.event_id),
                        Payload::BatchReprocessed(BatchReprocessed {
                            batch_id: old.clone(),
                            new_batch_id: batch.to_string(),
                            policy_version: s.policy_version.clone(),
                            concept_map_version: self.maps_version.clone(),
                            records_published: c.resources_by_type.values().sum(),
                        }),
                    ),
                })
            }
            _ => None,
        };
        let mut out = Vec::with_capacity(2);
        out.push(Output {
            key: batch.to_string(),
            event,
        });
        out.extend(released);
        out
    }

    /// Starts the withdrawal of every record the batch published (see `compensation`), as
    /// effects of `cause` read at `origin`, and marks the batch withdrawn so that later
    /// records of it are held. The withdrawals go out from the next transaction on, in
    /// parts (`withdraw_part`), then `CanonicalBatchWithdrawn`.
    fn withdraw(
        &mut self,
        batch: &str,
        reason: &str,
        policy_version: &str,
        cause: &Event,
        kept: i64,
        origin: (&str, i32),
    ) {
        // Not forgotten at the end of its retention while it is withdrawn.
        if self.state.ledger.closed.get(batch).is_some() {
            self.state.ledger.closed.delete(batch);
        }
        self.state.ledger.withdrawn.put(
            batch,
            compensation::Withdrawn {
                reason: reason.to_string(),
                held: 0,
                progress: Some(compensation::Progress {
                    cause_event_id: cause.header.event_id.clone(),
                    trigger: cause.event_type().to_string(),
                    policy_version: policy_version.to_string(),
                    kept,
                    chunk: 0,
                    index: 0,
                    by_type: BTreeMap::new(),
                    topic: origin.0.to_string(),
                    partition: origin.1,
                }),
            },
        );
    }

    /// The next part of a batch's withdrawal: at most `withdraw_per_txn` remembered
    /// records looked at, their withdrawals, the progress moved on; after the last part,
    /// `CanonicalBatchWithdrawn` with the counts.
    fn withdraw_part(&mut self, batch: &str) -> Vec<Output> {
        let Some(mut w) = self.state.ledger.withdrawn.get(batch).cloned() else {
            return Vec::new();
        };
        let Some(mut progress) = w.progress.take() else {
            return Vec::new();
        };
        let part = self.state.ledger.next_part(
            batch,
            (progress.chunk, progress.index),
            self.withdraw_per_txn,
        );
        let mut out = Vec::with_capacity(part.records.len() + 1);
        for p in &part.records {
            match self.withdrawal(batch, p, &w.reason, &progress.policy_version) {
                Some(payload) => {
                    *progress.by_type.entry(p.resource_type.clone()).or_default() += 1;
                    out.push(Output {
                        key: p.key.clone(),
                        event: Event::new(SERVICE, batch, Some(&progress.cause_event_id), payload),
                    });
                }
                None => tracing::error!(
                    correlation_id = batch,
                    position = p.position,
                    resource_type = %p.resource_type,
                    "Cannot build the withdrawal of a published record; it stays published."
                ),
            }
        }
        match part.next {
            Some((chunk, index)) => {
                progress.chunk = chunk;
                progress.index = index;
                w.progress = Some(progress);
            }
            None => {
                out.push(Output {
                    key: batch.to_string(),
                    event: Event::new(
                        SERVICE,
                        batch,
                        Some(&progress.cause_event_id),
                        Payload::CanonicalBatchWithdrawn(CanonicalBatchWithdrawn {
                            batch_id: batch.to_string(),
                            trigger: progress.trigger,
                            reason: w.reason.clone(),
                            records_withdrawn: progress.by_type.values().sum(),
                            withdrawn_by_type: progress.by_type,
                            records_kept: progress.kept,
                        }),
                    ),
                });
            }
        }
        self.state.ledger.withdrawn.put(batch, w);
        out
    }

    /// The withdrawal of one published record: its canonical record with the withdrawn
    /// resource, validated like any other.
    fn withdrawal(
        &self,
        batch: &str,
        p: &compensation::Published,
        reason: &str,
        policy_version: &str,
    ) -> Option<Payload> {
        let t = ResourceType::parse(&p.resource_type)?;
        let resource = compensation::withdrawal_resource(p, &mapping::patient_id(&p.key), reason)?;
        self.validator.validate(&resource).ok()?;
        let typed = typed::typed(t, self.tables.code_element(t), &resource);
        let rec = RecordAnonymized {
            batch_id: batch.to_string(),
            position: p.position,
            source_format: p.source_format.clone(),
            record_type: p.resource_type.clone(),
            patient_pseudonym: p.key.clone(),
            policy_version: String::new(),
            key_id: String::new(),
            content_json: String::new(),
            fields_redacted: 0,
            policy_hash: None,
            report_json: None,
            release_of: None,
            expected_concept_maps: None,
            reprocess_of: None,
        };
        let report = Report {
            code_status: "none",
            original_code: None,
            map_version: None,
            original_value: None,
            unit_status: None,
        };
        let provenance = Provenance {
            source_format: p.source_format.clone(),
            batch_id: batch.to_string(),
            source_position: p.position,
            policy_version: policy_version.to_string(),
            concept_map_version: "none".into(),
        };
        Some(build(
            t,
            p.resource_id.clone(),
            &rec,
            typed,
            report,
            resource.to_string(),
            provenance,
        ))
    }

    fn record(&mut self, input: &Input<'_>, rec: &RecordAnonymized) -> Outcome {
        let (ev, redriven) = (input.event, input.redriven);
        let batch = rec.batch_id.as_str();
        // A record of a withdrawn batch that arrived after the withdrawal: held.
        if let Some(mut w) = self.state.ledger.withdrawn.get(batch).cloned() {
            w.held += 1;
            self.state.ledger.withdrawn.put(batch, w);
            tracing::info!(
                correlation_id = batch,
                position = rec.position,
                "Held a record of a withdrawn batch: not published."
            );
            return Outcome::Emit(vec![]);
        }
        // A redriven dead letter of a batch that completed: published with the batch (a
        // withdrawal of the batch withdraws it too), without reopening it. (Anything else
        // of a completed batch is a replay, which reopens and closes it again.)
        if redriven
            && self.state.batches.get(batch).is_none()
            && self.state.ledger.closed.get(batch).is_some()
        {
            return self.late_record(ev, rec);
        }
        // A reprocessing that needs concept maps this stage has not loaded is held.
        if let Some(expected) = rec
            .expected_concept_maps
            .as_deref()
            .filter(|e| !self.has_maps(e))
        {
            let s = self.batch(batch);
            self.state.batches.delete(batch);
            let reason = format!(
                "the batch must be reprocessed with concept maps {expected}, but this stage has {}",
                self.maps_version
            );
            let outputs = vec![lifecycle(
                ev,
                batch,
                Payload::CanonizationFailed(CanonizationFailed {
                    batch_id: batch.to_string(),
                    error_kind: "concept_map_version_mismatch".into(),
                    reason,
                    records_in: s.records_in,
                    records_dead_lettered: s.dead_lettered,
                }),
            )];
            let why = "canonization failed the batch (concept_map_version_mismatch)";
            self.withdraw(
                batch,
                why,
                &rec.policy_version,
                ev,
                kept(&s.by_type),
                (input.topic, input.partition),
            );
            return Outcome::Emit(outputs);
        }
        let mut outputs = self.open(batch, &rec.policy_version, ev);
        let result = self.canonize(rec);
        let mut s = self.batch(batch);
        s.records_in += 1;
        if s.release_of.is_none() {
            s.release_of.clone_from(&rec.release_of);
        }
        if s.reprocess_of.is_none() {
            s.reprocess_of.clone_from(&rec.reprocess_of);
        }
        let mut dead = None;
        match result {
            Ok(records) => {
                for (payload, unmapped) in records {
                    *s.by_type
                        .entry(
                            payload
                                .resource_type()
                                .map_or("Unknown", ResourceType::fhir_name)
                                .to_string(),
                        )
                        .or_default() += 1;
                    s.codes_unmapped += unmapped;
                    outputs.push(self.publish(ev, rec, payload, unmapped));
                }
            }
            Err(Refused::Unsupported) => s.unsupported += 1,
            Err(Refused::Dead { error_type, reason }) => {
                s.dead_lettered += 1;
                dead = Some((
                    error_type,
                    format!("batch {} position {}: {reason}", rec.batch_id, rec.position),
                ));
            }
        }
        self.state.batches.put(batch, s);
        outputs.extend(self.maybe_close(batch, None));
        match dead {
            None => Outcome::Emit(outputs),
            Some((error_type, reason)) => Outcome::DeadLetterAndEmit {
                error_type,
                reason,
                outputs,
            },
        }
    }
}

impl Canonizer {
    /// One canonical record of `rec` to publish: keyed, remembered for its batch's
    /// withdrawal, its unmapped codes counted.
    fn publish(
        &mut self,
        ev: &Event,
        rec: &RecordAnonymized,
        payload: Payload,
        unmapped: i64,
    ) -> Output {
        self.unmapped.inc_by(unmapped.unsigned_abs());
        let key = key_of(&payload, rec);
        if let Some(p) = published(&payload, &key) {
            self.state.ledger.publish(&rec.batch_id, p);
        }
        Output {
            key,
            event: Event::caused_by(ev, SERVICE, payload),
        }
    }

    /// A record of a completed batch (see `record`): mapped and published like any other,
    /// remembered for the batch's withdrawal, not counted (the batch's counts closed).
    fn late_record(&mut self, ev: &Event, rec: &RecordAnonymized) -> Outcome {
        let batch = rec.batch_id.as_str();
        tracing::info!(
            correlation_id = batch,
            position = rec.position,
            "A record of a completed batch (a redriven dead letter): published with the batch."
        );
        match self.canonize(rec) {
            Ok(records) => {
                let outputs = records
                    .into_iter()
                    .map(|(payload, unmapped)| self.publish(ev, rec, payload, unmapped))
                    .collect();
                Outcome::Emit(outputs)
            }
            Err(Refused::Unsupported) => Outcome::Emit(vec![]),
            Err(Refused::Dead { error_type, reason }) => Outcome::DeadLetter {
                error_type,
                reason: format!("batch {batch} position {}: {reason}", rec.position),
            },
        }
    }

    /// An operator withdraws a batch: whatever canonization published for it, open or
    /// completed within its retention, is withdrawn like a failed batch's; an open batch
    /// is also closed as failed (`withdrawn`). Once per batch: a second request, or a
    /// redelivered one, finds the batch withdrawn and does nothing. The operator's reason
    /// stays in the audit trail (sealed); the records' tag names the request only.
    fn operator_withdrawal(
        &mut self,
        input: &Input<'_>,
        r: &BatchWithdrawalRequested,
    ) -> Vec<Output> {
        let ev = input.event;
        let batch = r.batch_id.as_str();
        if self.state.ledger.withdrawn.get(batch).is_some() {
            tracing::info!(
                correlation_id = batch,
                "Withdrawal requested for a batch already withdrawn; nothing to do."
            );
            return vec![];
        }
        let reason = match uuid::Uuid::parse_str(&r.request_id) {
            Ok(id) => format!("withdrawn by an operator (request {id})"),
            Err(_) => "withdrawn by an operator".to_string(),
        };
        let mut out = Vec::new();
        let (policy_version, kept_count) = if let Some(s) = self.state.batches.get(batch).cloned() {
            self.state.batches.delete(batch);
            out.push(lifecycle(
                ev,
                batch,
                Payload::CanonizationFailed(CanonizationFailed {
                    batch_id: batch.to_string(),
                    error_kind: "withdrawn".into(),
                    reason: format!(
                        "an operator withdrew the batch while open; {} records were mapped before",
                        s.records_in
                    ),
                    records_in: s.records_in,
                    records_dead_lettered: s.dead_lettered,
                }),
            ));
            (s.policy_version.clone(), kept(&s.by_type))
        } else if let Some(c) = self.state.ledger.closed.get(batch).cloned() {
            (c.policy_version, c.kept)
        } else {
            tracing::warn!(
                correlation_id = batch,
                "Withdrawal requested for a batch canonization does not remember (unknown, or past its retention); its later records will be held."
            );
            (String::new(), 0)
        };
        self.withdraw(
            batch,
            &reason,
            &policy_version,
            ev,
            kept_count,
            (input.topic, input.partition),
        );
        out
    }

    /// A merge: the merged patient's canonical Patient becomes inactive and links to the
    /// survivor (`replaced-by`), as a new version under the same id and key; earlier
    /// versions and the merged patient's other records stay as they were. Not counted in
    /// the batch (a merge is not a record of it). A merged patient whose own record carries
    /// the link already has it and gets nothing more.
    fn merged(&self, ev: &Event, m: &PatientMerged) -> Outcome {
        if m.merged_record_has_link {
            return Outcome::Emit(vec![]);
        }
        // Built as the de-identified FHIR Patient it stands for, so it goes through the
        // same mapping, normalisation and validation as any other.
        let content = serde_json::json!({
            "resourceType": "Patient",
            "id": m.merged_pseudonym,
            "active": false,
            "link": [{
                "other": {"reference": format!("Patient/{}", m.surviving_pseudonym)},
                "type": "replaced-by"
            }]
        });
        let rec = RecordAnonymized {
            batch_id: m.batch_id.clone(),
            position: m.position,
            source_format: "fhir-ndjson".into(),
            record_type: "Patient".into(),
            patient_pseudonym: m.merged_pseudonym.clone(),
            policy_version: m.policy_version.clone(),
            key_id: m.key_id.clone(),
            content_json: content.to_string(),
            fields_redacted: 0,
            policy_hash: None,
            report_json: None,
            release_of: None,
            expected_concept_maps: None,
            reprocess_of: None,
        };
        match self.canonize(&rec) {
            Ok(records) => Outcome::Emit(
                records
                    .into_iter()
                    .map(|(mut payload, _)| {
                        if let Payload::CanonicalPatient(p) = &mut payload {
                            p.provenance.source_format = m.source_format.clone();
                        }
                        Output {
                            key: m.merged_pseudonym.clone(),
                            event: Event::caused_by(ev, SERVICE, payload),
                        }
                    })
                    .collect(),
            ),
            Err(Refused::Dead { error_type, reason }) => Outcome::DeadLetter {
                error_type,
                reason: format!(
                    "batch {} position {}: the merged Patient: {reason}",
                    m.batch_id, m.position
                ),
            },
            Err(Refused::Unsupported) => Outcome::DeadLetter {
                error_type: "mapping",
                reason: format!(
                    "batch {} position {}: the merged Patient could not be mapped",
                    m.batch_id, m.position
                ),
            },
        }
    }
}

/// The Kafka key of a canonical record: the patient pseudonym; a shared resource's own
/// canonical id.
fn key_of(payload: &Payload, rec: &RecordAnonymized) -> String {
    match payload.resource_type() {
        Some(t) if t.is_shared() => payload
            .canonical()
            .map_or_else(String::new, |(key, _, _)| key.to_string()),
        _ => rec.patient_pseudonym.clone(),
    }
}

/// What a canonical record's withdrawal needs, for a record its batch alone owns.
fn published(payload: &Payload, key: &str) -> Option<compensation::Published> {
    let t = payload.resource_type()?;
    if !compensation::withdrawable(t) {
        return None;
    }
    let (_, _, provenance) = payload.canonical()?;
    let (resource_id, intent) = match payload {
        Payload::CanonicalEncounter(c) => (&c.resource_id, None),
        Payload::CanonicalObservation(c) => (&c.resource_id, None),
        Payload::CanonicalCondition(c) => (&c.resource_id, None),
        Payload::CanonicalMedicationRequest(c) => (&c.resource_id, c.details.intent.clone()),
        Payload::CanonicalProcedure(c) => (&c.resource_id, None),
        Payload::CanonicalDiagnosticReport(c) => (&c.resource_id, None),
        Payload::CanonicalAllergyIntolerance(c) => (&c.resource_id, None),
        Payload::CanonicalImmunization(c) => (&c.resource_id, None),
        _ => return None,
    };
    Some(compensation::Published {
        resource_type: t.fhir_name().to_string(),
        resource_id: resource_id.clone(),
        key: key.to_string(),
        position: provenance.source_position,
        source_format: provenance.source_format.clone(),
        intent,
    })
}

/// How many of a batch's canonical records are Patients or shared resources, which a
/// withdrawal keeps.
fn kept(by_type: &BTreeMap<String, i64>) -> i64 {
    by_type
        .iter()
        .filter(|(t, _)| ResourceType::parse(t).is_some_and(|t| !compensation::withdrawable(t)))
        .map(|(_, n)| *n)
        .sum()
}

fn lifecycle(cause: &Event, batch: &str, payload: Payload) -> Output {
    Output {
        key: batch.to_string(),
        event: Event::caused_by(cause, SERVICE, payload),
    }
}

/// The canonical record of one resource: shared typed fields, the type's details.
fn build(
    resource_type: ResourceType,
    resource_id: String,
    rec: &RecordAnonymized,
    t: Typed,
    report: Report,
    fhir_json: String,
    provenance: Provenance,
) -> Payload {
    let base = CanonicalRecord {
        resource_id,
        patient_pseudonym: rec.patient_pseudonym.clone(),
        patient_id: mapping::patient_id(&rec.patient_pseudonym),
        encounter_id: t.encounter_id,
        status: t.status,
        code: t.code,
        code_status: report.code_status.to_string(),
        original_code: report.original_code,
        effective: t.effective.clone(),
        details: (),
        fhir_json,
        provenance,
    };
    // Shared resources keep the fields that need no patient.
    let shared = |base: CanonicalRecord<()>| CanonicalSharedRecord {
        resource_id: base.resource_id,
        status: base.status,
        code: base.code,
        fhir_json: base.fhir_json,
        provenance: base.provenance,
    };
    match resource_type {
        ResourceType::Patient => Payload::CanonicalPatient(CanonicalPatient {
            resource_id: base.resource_id,
            patient_pseudonym: base.patient_pseudonym,
            gender: t.gender,
            birth_year: t.birth_year,
            fhir_json: base.fhir_json,
            provenance: base.provenance,
        }),
        ResourceType::Encounter => Payload::CanonicalEncounter(with_details(
            base,
            EncounterDetails {
                class_code: t.class_code,
                period_start: t.effective.clone(),
                period_end: t.period_end,
            },
        )),
        ResourceType::Observation => Payload::CanonicalObservation(with_details(
            base,
            ObservationDetails {
                category: t.category,
                value_number: t.value_number,
                value_unit: t.value_unit,
                value_string: t.value_string,
                value_code: t.value_code,
                original_value: report.original_value.as_ref().map(|(v, _)| *v),
                original_unit: report.original_value.as_ref().map(|(_, u)| u.clone()),
                unit_status: report.unit_status.map(str::to_string),
                interpretation: t.interpretation,
            },
        )),
        ResourceType::Condition => Payload::CanonicalCondition(with_details(
            base,
            ConditionDetails {
                clinical_status: t.clinical_status,
                abatement: t.period_end,
            },
        )),
        ResourceType::MedicationRequest => Payload::CanonicalMedicationRequest(with_details(
            base,
            MedicationRequestDetails { intent: t.intent },
        )),
        ResourceType::Procedure => Payload::CanonicalProcedure(with_details(
            base,
            ProcedureDetails {
                performed_end: t.period_end,
            },
        )),
        ResourceType::DiagnosticReport => Payload::CanonicalDiagnosticReport(with_details(
            base,
            DiagnosticReportDetails {
                category: t.category,
                result_ids: t.result_ids,
            },
        )),
        ResourceType::AllergyIntolerance => Payload::CanonicalAllergyIntolerance(with_details(
            base,
            AllergyIntoleranceDetails {
                criticality: t.criticality,
                category: t.category,
            },
        )),
        ResourceType::Immunization => Payload::CanonicalImmunization(with_details(
            base,
            ImmunizationDetails {
                primary_source: t.primary_source,
            },
        )),
        ResourceType::Practitioner => Payload::CanonicalPractitioner(shared(base)),
        ResourceType::PractitionerRole => Payload::CanonicalPractitionerRole(shared(base)),
        ResourceType::Organization => Payload::CanonicalOrganization(shared(base)),
        ResourceType::Location => Payload::CanonicalLocation(shared(base)),
        ResourceType::Medication => Payload::CanonicalMedication(shared(base)),
        ResourceType::Device => Payload::CanonicalDevice(shared(base)),
    }
}

fn with_details<D>(base: CanonicalRecord<()>, details: D) -> CanonicalRecord<D> {
    CanonicalRecord {
        resource_id: base.resource_id,
        patient_pseudonym: base.patient_pseudonym,
        patient_id: base.patient_id,
        encounter_id: base.encounter_id,
        status: base.status,
        code: base.code,
        code_status: base.code_status,
        original_code: base.original_code,
        effective: base.effective,
        details,
        fhir_json: base.fhir_json,
        provenance: base.provenance,
    }
}

impl Stage for Canonizer {
    fn name(&self) -> &'static str {
        "canonization"
    }

    fn process(&mut self, input: &Input<'_>) -> Outcome {
        let ev = input.event;
        match &ev.payload {
            Payload::AnonymizationStarted(a) => {
                Outcome::Emit(self.open(&a.batch_id, &a.policy_version, ev))
            }
            Payload::RecordAnonymized(rec) => self.record(input, rec),
            Payload::PatientMerged(m) => self.merged(ev, m),
            Payload::AnonymizationFinished(f) => {
                let batch = f.batch_id.as_str();
                if self.state.ledger.withdrawn.get(batch).is_some() {
                    return Outcome::Emit(vec![]);
                }
                let mut outputs = self.open(batch, &f.policy_version, ev);
                let mut s = self.batch(batch);
                if s.release_of.is_none() {
                    s.release_of.clone_from(&f.release_of);
                }
                s.closing = Some(PendingClose {
                    upstream: f.records_anonymized.unwrap_or(f.upstream_records_emitted),
                    cause_event_id: ev.header.event_id.clone(),
                    deadline: ev
                        .header
                        .occurred_at
                        .saturating_add(self.close_timeout_micros),
                    topic: input.topic.to_string(),
                    partition: input.partition,
                });
                self.state.batches.put(batch, s);
                outputs.extend(self.maybe_close(batch, None));
                Outcome::Emit(outputs)
            }
            Payload::AnonymizationFailed(f) => {
                if self.state.ledger.withdrawn.get(&f.batch_id).is_some() {
                    return Outcome::Emit(vec![]);
                }
                let s = self.batch(&f.batch_id);
                self.state.batches.delete(&f.batch_id);
                let outputs = vec![lifecycle(
                    ev,
                    &f.batch_id,
                    Payload::CanonizationFailed(CanonizationFailed {
                        batch_id: f.batch_id.clone(),
                        error_kind: "upstream_failed".into(),
                        reason: format!(
                            "anonymization failed the batch ({}); {} records were mapped before",
                            f.error_kind, s.records_in
                        ),
                        records_in: s.records_in,
                        records_dead_lettered: s.dead_lettered,
                    }),
                )];
                let reason = format!("anonymization failed the batch ({})", f.error_kind);
                self.withdraw(
                    &f.batch_id,
                    &reason,
                    &f.policy_version,
                    ev,
                    kept(&s.by_type),
                    (input.topic, input.partition),
                );
                Outcome::Emit(outputs)
            }
            Payload::BatchWithdrawalRequested(r) => {
                Outcome::Emit(self.operator_withdrawal(input, r))
            }
            _ => Outcome::Emit(vec![]),
        }
    }

    /// Fails the batches whose missing records did not arrive before their deadline, and
    /// forgets the records of completed batches whose withdrawal retention ended.
    fn tick(&mut self, now_micros: i64, owns: Owns<'_>) -> Vec<Output> {
        for batch in self
            .state
            .ledger
            .expired(now_micros, self.withdraw_retention_micros, owns)
        {
            self.state.ledger.forget(&batch);
        }
        let due: Vec<String> = self
            .state
            .batches
            .keys()
            .into_iter()
            .filter(|b| {
                self.state
                    .batches
                    .get(b)
                    .and_then(|s| s.closing.as_ref())
                    .is_some_and(|c| c.due(now_micros, owns))
            })
            .collect();
        due.iter()
            .flat_map(|b| self.maybe_close(b, Some(now_micros)))
            .collect()
    }

    /// Carries on the withdrawals under way whose starting event this instance owns.
    fn resume(&mut self, owns: Owns<'_>) -> Vec<Output> {
        let mut out = Vec::new();
        for batch in self.state.ledger.withdrawing() {
            let mine = self
                .state
                .ledger
                .withdrawn
                .get(&batch)
                .and_then(|w| w.progress.as_ref())
                .is_some_and(|p| owns(&p.topic, p.partition));
            if mine {
                out.extend(self.withdraw_part(&batch));
            }
        }
        out
    }

    fn has_work(&self, owns: Owns<'_>) -> bool {
        self.state.ledger.is_withdrawing_on(owns)
    }

    fn register_metrics(&mut self, registry: &prometheus::Registry) -> Result<(), PipelineError> {
        registry
            .register(Box::new(self.unmapped.clone()))
            .map_err(PipelineError::Metrics)
    }

    fn state(&mut self) -> Option<&mut dyn pipeline::state::DurableState> {
        Some(&mut self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline::events::{AnonymizationFinished, AnonymizationStarted};
    use std::time::Duration;

    fn stage() -> Canonizer {
        Canonizer::new(
            ConceptMaps::load_embedded().expect("maps"),
            mapping::Tables::load(None).expect("tables"),
            0.5,
            Duration::from_secs(60),
        )
        .expect("stage")
    }

    fn event(payload: Payload) -> Event {
        Event::new("medpipe-anonymization", "b1", None, payload)
    }

    fn started() -> Event {
        event(Payload::AnonymizationStarted(AnonymizationStarted {
            batch_id: "b1".into(),
            policy_version: "p1".into(),
            key_id: "k1".into(),
            policy_hash: None,
        }))
    }

    fn patient(position: i64) -> Event {
        let pseudonym = format!("{position:064x}");
        let content = serde_json::json!({
            "resourceType": "Patient", "id": pseudonym, "gender": "female", "birthDate": "1980"
        });
        anonymized(position, "fhir-ndjson", "Patient", &pseudonym, content)
    }

    /// A `RecordAnonymized` of batch `b1`.
    fn anonymized(
        position: i64,
        source_format: &str,
        record_type: &str,
        pseudonym: &str,
        content: serde_json::Value,
    ) -> Event {
        event(Payload::RecordAnonymized(RecordAnonymized {
            batch_id: "b1".into(),
            position,
            source_format: source_format.into(),
            record_type: record_type.into(),
            patient_pseudonym: pseudonym.into(),
            policy_version: "p1".into(),
            key_id: "k1".into(),
            content_json: content.to_string(),
            fields_redacted: 0,
            policy_hash: None,
            report_json: None,
            release_of: None,
            expected_concept_maps: None,
            reprocess_of: None,
        }))
    }

    fn finished(anonymized: i64) -> Event {
        event(Payload::AnonymizationFinished(AnonymizationFinished {
            batch_id: "b1".into(),
            upstream_records_emitted: anonymized,
            policy_version: "p1".into(),
            records_anonymized: Some(anonymized),
            records_dead_lettered: Some(0),
            policy_hash: None,
            release_of: None,
        }))
    }

    /// Processes an event and returns the payloads it emitted.
    fn run(c: &mut Canonizer, ev: &Event) -> Vec<Payload> {
        outputs(c, ev)
            .into_iter()
            .map(|o| o.event.payload)
            .collect()
    }

    fn closings(out: &[Payload]) -> Vec<&Payload> {
        out.iter()
            .filter(|p| {
                matches!(
                    p,
                    Payload::EventDataCanonizationCompleted(_) | Payload::CanonizationFailed(_)
                )
            })
            .collect()
    }

    /// A Bundle entry's `RecordAnonymized`, its record type read from the resource.
    fn bundle_entry(position: i64, pseudonym: &str, content: serde_json::Value) -> Event {
        let record_type = content["resource"]["resourceType"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        anonymized(position, "fhir-bundle", &record_type, pseudonym, content)
    }

    #[test]
    fn shared_resources_are_keyed_by_their_own_id_and_patient_records_reference_it() {
        let mut c = stage();
        run(&mut c, &started());
        let practitioner = serde_json::json!({
            "fullUrl": "urn:uuid:pr1",
            "resource": {"resourceType": "Practitioner", "id": "pr1", "active": true, "gender": "male"}
        });
        let outs = match c.process(&Input {
            topic: "t",
            partition: 0,
            offset: 1,
            event: &bundle_entry(1, "", practitioner),
            redriven: false,
        }) {
            Outcome::Emit(outs) => outs,
            other => panic!("{other:?}"),
        };
        let record = outs
            .iter()
            .find_map(|o| match &o.event.payload {
                Payload::CanonicalPractitioner(p) => Some((o.key.clone(), p.clone())),
                _ => None,
            })
            .expect("a canonical Practitioner");
        let id = mapping::shared_id(ResourceType::Practitioner, "pr1");
        assert_eq!(record.0, id, "keyed by its own id");
        assert_eq!(record.1.resource_id, id);
        assert_eq!(record.1.status.as_deref(), Some("true"));
        assert!(
            !record.1.fhir_json.contains("Patient"),
            "{}",
            record.1.fhir_json
        );

        // Two patients' encounters name the same practitioner and organisation.
        for (position, pseudonym) in [(2, "a".repeat(64)), (3, "b".repeat(64))] {
            let encounter = serde_json::json!({
                "fullUrl": format!("urn:uuid:e{position}"),
                "resource": {
                    "resourceType": "Encounter", "id": format!("e{position}"), "status": "finished",
                    "class": {"code": "AMB"},
                    "subject": {"reference": format!("Patient/{pseudonym}")},
                    "participant": [{"individual": {"reference": "Practitioner/pr1"}}],
                    "serviceProvider": {"reference": "urn:uuid:org1"},
                }
            });
            let payloads = run(&mut c, &bundle_entry(position, &pseudonym, encounter));
            let Some(Payload::CanonicalEncounter(e)) = payloads.first() else {
                panic!("{payloads:?}")
            };
            let fhir: serde_json::Value = serde_json::from_str(&e.fhir_json).expect("json");
            assert_eq!(
                fhir["participant"][0]["individual"]["reference"],
                format!("Practitioner/{id}")
            );
            assert_eq!(
                fhir["serviceProvider"]["reference"],
                format!(
                    "Organization/{}",
                    mapping::shared_id(ResourceType::Organization, "org1")
                )
            );
        }
    }

    #[test]
    fn a_batch_completes_once_its_records_and_its_close_are_both_in_whatever_the_order() {
        let mut c = stage();
        run(&mut c, &started());
        run(&mut c, &patient(1));
        assert!(
            closings(&run(&mut c, &finished(2))).is_empty(),
            "one record missing"
        );
        let out = run(&mut c, &patient(2));
        let [Payload::EventDataCanonizationCompleted(done)] = closings(&out)[..] else {
            panic!("{out:?}")
        };
        assert_eq!(done.records_in, 2);
    }

    #[test]
    fn a_batch_missing_records_fails_at_its_deadline_and_duplicates_fail_at_once() {
        let mut c = stage();
        run(&mut c, &started());
        run(&mut c, &patient(1));
        let fin = finished(2);
        run(&mut c, &fin);
        let deadline = fin.header.occurred_at + 60_000_000;
        assert!(tick(&mut c, deadline - 1).is_empty());
        let outs = tick(&mut c, deadline);
        let [Output {
            event:
                Event {
                    payload: Payload::CanonizationFailed(f),
                    ..
                },
            ..
        }, Output {
            event:
                Event {
                    payload: Payload::CanonicalBatchWithdrawn(w),
                    ..
                },
            ..
        }] = &outs[..]
        else {
            panic!("{outs:?}")
        };
        // Only a Patient was published, which a withdrawal keeps.
        assert_eq!((w.records_withdrawn, w.records_kept), (0, 1));
        assert_eq!(f.error_kind, "counts_mismatch");
        assert_eq!(
            f.reason,
            "anonymization counted 2 records, but only 1 arrived: 1 missing after waiting 60s"
        );

        let mut c = stage();
        run(&mut c, &patient(1));
        run(&mut c, &patient(2));
        let out = run(&mut c, &finished(1));
        let [Payload::CanonizationFailed(f)] = closings(&out)[..] else {
            panic!("{out:?}")
        };
        assert_eq!(f.error_kind, "counts_mismatch");
    }

    #[test]
    fn a_merge_publishes_the_merged_patient_inactive_and_linked_to_the_survivor() {
        let mut c = stage();
        let (merged, survivor) = ("a".repeat(64), "b".repeat(64));
        let merge = |has_link: bool| {
            event(Payload::PatientMerged(PatientMerged {
                batch_id: "b1".into(),
                position: 3,
                source_format: "hl7v2".into(),
                record_type: "ADT^A40".into(),
                surviving_pseudonym: survivor.clone(),
                merged_pseudonym: merged.clone(),
                trigger: "hl7-merge".into(),
                merged_record_has_link: has_link,
                policy_version: "p1".into(),
                key_id: "k1".into(),
            }))
        };
        let out = run(&mut c, &merge(false));
        let [Payload::CanonicalPatient(p)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(p.resource_id, mapping::patient_id(&merged));
        assert_eq!(p.patient_pseudonym, merged);
        assert_eq!(p.provenance.source_format, "hl7v2");
        assert_eq!(p.provenance.source_position, 3);
        let fhir: Value = serde_json::from_str(&p.fhir_json).expect("json");
        assert_eq!(fhir["active"], false);
        assert_eq!(
            fhir["link"],
            serde_json::json!([{
                "other": {"reference": format!("Patient/{}", mapping::patient_id(&survivor))},
                "type": "replaced-by"
            }])
        );
        // Not a record of the batch: nothing opened, nothing counted.
        assert!(c.state.batches.get("b1").is_none());
        // The merged patient's own Patient already carries the link.
        assert!(run(&mut c, &merge(true)).is_empty());
    }

    fn observation(position: i64, pseudonym: &str) -> Event {
        let content = serde_json::json!({
            "resourceType": "Observation", "id": format!("o{position}"), "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": format!("Patient/{pseudonym}")},
            "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}
        });
        anonymized(position, "fhir-ndjson", "Observation", pseudonym, content)
    }

    fn anonymization_failed() -> Event {
        event(Payload::AnonymizationFailed(
            pipeline::events::AnonymizationFailed {
                batch_id: "b1".into(),
                error_kind: "failure_threshold".into(),
                reason: "r".into(),
                policy_version: "p1".into(),
                records_anonymized: 3,
                records_dead_lettered: 5,
                policy_hash: None,
            },
        ))
    }

    /// Every output of processing `ev`, with its key.
    fn outputs(c: &mut Canonizer, ev: &Event) -> Vec<Output> {
        outputs_of(c, ev, false)
    }

    /// Every output of processing `ev`, redriven from a dead letter or not.
    fn outputs_of(c: &mut Canonizer, ev: &Event, redriven: bool) -> Vec<Output> {
        let input = Input {
            topic: "t",
            partition: 0,
            offset: 0,
            event: ev,
            redriven,
        };
        let outs = match c.process(&input) {
            Outcome::Emit(outs) => outs,
            other => panic!("{other:?}"),
        };
        with_carried_over(c, outs)
    }

    /// As the runner goes on after `outs`: a withdrawal started commits, then its parts go
    /// out, each in a transaction of its own.
    fn with_carried_over(c: &mut Canonizer, mut outs: Vec<Output>) -> Vec<Output> {
        use pipeline::state::DurableState;
        let owns = |_: &str, _: i32| true;
        while c.has_work(&owns) {
            c.state.commit();
            outs.extend(c.resume(&owns));
        }
        outs
    }

    /// `tick`, and what it starts.
    fn tick(c: &mut Canonizer, now: i64) -> Vec<Output> {
        let outs = c.tick(now, &|_: &str, _: i32| true);
        with_carried_over(c, outs)
    }

    #[test]
    fn a_failed_batch_withdraws_what_it_published_once_and_holds_what_comes_later() {
        use pipeline::state::DurableState;
        let mut c = stage();
        let p = format!("{:064x}", 1);
        run(&mut c, &started());
        run(&mut c, &patient(1));
        let published: Vec<(String, String)> = [observation(2, &p), observation(3, &p)]
            .iter()
            .flat_map(|ev| outputs(&mut c, ev))
            .filter_map(|o| match &o.event.payload {
                Payload::CanonicalObservation(r) => Some((o.key.clone(), r.resource_id.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(published.len(), 2);
        // The runner commits; a restart reloads the committed state.
        let committed = c.state.changes().unwrap();
        c.state.commit();
        let mut c = stage();
        c.state.restore(committed).unwrap();

        let outs = outputs(&mut c, &anonymization_failed());
        let withdrawn: Vec<(String, String)> = outs
            .iter()
            .filter_map(|o| match &o.event.payload {
                Payload::CanonicalObservation(r) => {
                    let fhir: Value = serde_json::from_str(&r.fhir_json).unwrap();
                    assert_eq!(fhir["status"], "entered-in-error");
                    assert_eq!(
                        fhir["meta"]["tag"][0]["system"],
                        compensation::WITHDRAWAL_TAG_SYSTEM
                    );
                    assert_eq!(r.status.as_deref(), Some("entered-in-error"));
                    assert_eq!(r.provenance.batch_id, "b1");
                    Some((o.key.clone(), r.resource_id.clone()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(withdrawn, published, "same keys and ids, in order");
        let batch: Vec<&Payload> = outs
            .iter()
            .map(|o| &o.event.payload)
            .filter(|p| {
                matches!(
                    p,
                    Payload::CanonicalBatchWithdrawn(_) | Payload::CanonizationFailed(_)
                )
            })
            .collect();
        let [Payload::CanonizationFailed(_), Payload::CanonicalBatchWithdrawn(w)] = &batch[..]
        else {
            panic!("{batch:?}")
        };
        assert_eq!((w.records_withdrawn, w.records_kept), (2, 1));
        assert_eq!(w.withdrawn_by_type.get("Observation"), Some(&2));
        assert_eq!(w.trigger, "AnonymizationFailed");
        c.state.commit();

        // A late record of the batch is held; a redelivered failure withdraws nothing twice.
        assert!(outputs(&mut c, &observation(4, &p)).is_empty());
        assert!(outputs(&mut c, &anonymization_failed()).is_empty());
        // The batch's published records are forgotten on the state topic.
        let changes = c.state.changes().unwrap();
        assert!(
            changes.iter().all(|(k, _)| !k.starts_with("published/")),
            "{changes:?}"
        );
    }

    fn withdrawal_requested(request_id: &str) -> Event {
        event(Payload::BatchWithdrawalRequested(
            pipeline::events::BatchWithdrawalRequested {
                batch_id: "b1".into(),
                request_id: request_id.into(),
                requested_by: "ops".into(),
                reason: "sent to the wrong tenant".into(),
            },
        ))
    }

    #[test]
    fn an_operator_withdraws_a_completed_batch_once_within_its_retention() {
        use pipeline::state::DurableState;
        let mut c = stage().with_withdraw_retention(std::time::Duration::from_secs(3600));
        let p = format!("{:064x}", 1);
        run(&mut c, &started());
        run(&mut c, &observation(1, &p));
        let out = run(&mut c, &finished(1));
        assert!(matches!(
            closings(&out)[..],
            [Payload::EventDataCanonizationCompleted(_)]
        ));
        // Completed: its records stay remembered (nothing tombstoned), with when it closed.
        let committed = c.state.changes().unwrap();
        assert!(
            committed
                .iter()
                .all(|(k, v)| v.is_some() || !k.starts_with("published/")),
            "{committed:?}"
        );
        assert!(committed.iter().any(|(k, _)| k == "closed/b1"));
        c.state.commit();
        let mut c = stage().with_withdraw_retention(std::time::Duration::from_secs(3600));
        c.state.restore(committed.clone()).unwrap();

        let request = "3f1c0a56-8a3e-4c55-9d7e-0a1b2c3d4e5f";
        // The withdrawal is marked; its parts go out from the instance that owns the
        // partition the request was read from, and another instance does not spin on it.
        let input = Input {
            topic: "t",
            partition: 0,
            offset: 0,
            event: &withdrawal_requested(request),
            redriven: false,
        };
        assert!(matches!(c.process(&input), Outcome::Emit(o) if o.is_empty()));
        c.state.commit();
        let owns_other = |t: &str, p: i32| (t, p) != ("t", 0);
        assert!(!c.has_work(&owns_other));
        assert!(c.resume(&owns_other).is_empty());
        assert!(c.has_work(&|_: &str, _: i32| true));
        let outs = with_carried_over(&mut c, Vec::new());
        let [first, second] = &outs[..] else {
            panic!("{outs:?}")
        };
        let Payload::CanonicalObservation(r) = &first.event.payload else {
            panic!("{first:?}")
        };
        assert_eq!(first.key, p);
        assert_eq!(r.status.as_deref(), Some("entered-in-error"));
        // The tag names the request, never the operator's words.
        assert!(r.fhir_json.contains(request), "{}", r.fhir_json);
        assert!(!r.fhir_json.contains("tenant"));
        let Payload::CanonicalBatchWithdrawn(w) = &second.event.payload else {
            panic!("{second:?}")
        };
        assert_eq!(
            (w.records_withdrawn, w.trigger.as_str()),
            (1, "BatchWithdrawalRequested")
        );
        assert!(c
            .state
            .changes()
            .unwrap()
            .iter()
            .any(|(k, v)| k == "published/b1/00000000" && v.is_none()));
        c.state.commit();
        // Once per batch.
        assert!(outputs(&mut c, &withdrawal_requested(request)).is_empty());

        // Past its retention a completed batch's records are forgotten by the tick.
        let mut c = stage().with_withdraw_retention(std::time::Duration::from_secs(3600));
        c.state.restore(committed).unwrap();
        let closed_at = c.state.ledger.closed.get("b1").unwrap().at;
        // Only the instance that owns the batch's partition forgets it (another instance
        // holds a copy of the state from its last reload, and must not act on it).
        let owns_other = |t: &str, p: i32| (t, p) != ("t", 0);
        c.tick(closed_at + 3_600_000_000, &owns_other);
        assert!(c.state.changes().unwrap().is_empty(), "not this instance's");
        let owns = |_: &str, _: i32| true;
        assert!(c.tick(closed_at + 3_599_000_000, &owns).is_empty());
        assert!(c.state.changes().unwrap().is_empty(), "not yet");
        c.tick(closed_at + 3_600_000_000, &owns);
        let changes = c.state.changes().unwrap();
        assert!(changes.contains(&("published/b1/00000000".to_string(), None)));
        assert!(changes.contains(&("closed/b1".to_string(), None)));
    }

    #[test]
    fn a_reprocessing_is_tagged_and_one_needing_maps_not_loaded_is_held() {
        let mut c = stage();
        let p = format!("{:064x}", 1);
        let with = |ev: Event, maps: Option<&str>| {
            let mut ev = ev;
            if let Payload::RecordAnonymized(r) = &mut ev.payload {
                r.reprocess_of = Some("b0".into());
                r.expected_concept_maps = maps.map(str::to_string);
            }
            ev
        };
        let loaded = c.maps_version().to_string();
        let first = loaded.split(',').next().unwrap().to_string();
        let out = run(&mut c, &with(observation(1, &p), Some(&first)));
        let Some(Payload::CanonicalObservation(o)) = out
            .iter()
            .find(|p| matches!(p, Payload::CanonicalObservation(_)))
        else {
            panic!("{out:?}")
        };
        let fhir: Value = serde_json::from_str(&o.fhir_json).unwrap();
        assert_eq!(fhir["meta"]["tag"][0]["code"], "reprocessed", "{fhir}");

        let mut c = stage();
        let out = run(&mut c, &with(observation(1, &p), Some("local-lab@99")));
        let [Payload::CanonizationFailed(f), Payload::CanonicalBatchWithdrawn(w)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(f.error_kind, "concept_map_version_mismatch");
        assert_eq!(w.records_withdrawn, 0);
        // Its later records are held.
        assert!(run(&mut c, &with(observation(2, &p), Some("local-lab@99"))).is_empty());
    }

    #[test]
    fn a_redriven_record_of_a_completed_batch_joins_it_and_a_replay_reopens_it() {
        let mut c = stage();
        let p = format!("{:064x}", 1);
        run(&mut c, &started());
        run(&mut c, &observation(1, &p));
        run(&mut c, &finished(1));
        // Redriven: published, remembered for the batch's withdrawal, no lifecycle.
        let late = outputs_of(&mut c, &observation(2, &p), true);
        let kinds: Vec<&str> = late.iter().map(|o| o.event.event_type()).collect();
        assert_eq!(kinds, vec!["CanonicalObservation"]);
        assert_eq!(c.state.ledger.published("b1").len(), 2);
        // Read again by a fresh consumer (a replay): the batch opens and closes again,
        // and a withdrawal still withdraws each id once.
        let again = run(&mut c, &observation(1, &p));
        assert!(
            matches!(again[0], Payload::EventDataCanonizationCreated(_)),
            "{again:?}"
        );
        let out = run(&mut c, &finished(1));
        assert!(matches!(
            closings(&out)[..],
            [Payload::EventDataCanonizationCompleted(_)]
        ));
        let request = withdrawal_requested("3f1c0a56-8a3e-4c55-9d7e-0a1b2c3d4e5f");
        let withdrawn = run(&mut c, &request);
        let Some(Payload::CanonicalBatchWithdrawn(w)) = withdrawn.last() else {
            panic!("{withdrawn:?}")
        };
        assert_eq!(w.records_withdrawn, 2, "o1 once, o2 once");
    }

    #[test]
    fn every_withdrawal_is_valid_fhir() {
        let c = stage();
        for t in ResourceType::ALL
            .iter()
            .filter(|t| compensation::withdrawable(**t))
        {
            let p = compensation::Published {
                resource_type: t.fhir_name().into(),
                resource_id: "00000000-0000-5000-8000-000000000000".into(),
                key: "a".repeat(64),
                position: 1,
                source_format: "fhir-ndjson".into(),
                intent: Some("order".into()),
            };
            assert!(
                c.withdrawal("b1", &p, "why", "p1").is_some(),
                "{t:?} has no valid withdrawal"
            );
        }
    }
}
