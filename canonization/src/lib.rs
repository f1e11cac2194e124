//! The canonization stage: maps de-identified records to the canonical FHIR R4-shaped
//! model and publishes them on per-resource topics keyed by patient pseudonym.
//!
//! Walking skeleton: Patient records only. Other record types are dead-lettered with a
//! clear reason rather than dropped.

use pipeline::events::{CanonicalPatient, Payload, Provenance, RecordAnonymized};
use pipeline::{Event, Input, Outcome, Output, Stage};
use serde_json::{json, Value};
use uuid::Uuid;

pub const SERVICE: &str = "medpipe-canonization";
pub const CONCEPT_MAP_VERSION: &str = "none";

/// Namespace for deterministic resource ids (UUID v5), fixed forever.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6d65_6470_6970_6545_8000_0000_0000_0001);

/// The deterministic id of a resource: the same inputs give the same id on every replay.
pub fn resource_id(resource_type: &str, pseudonym: &str, source_identity: &str) -> String {
    Uuid::new_v5(
        &ID_NAMESPACE,
        format!("{resource_type}|{pseudonym}|{source_identity}").as_bytes(),
    )
    .to_string()
}

#[derive(Debug, Default)]
pub struct Canonizer;

fn fhir_gender(g: Option<&str>) -> Option<&'static str> {
    match g.map(str::to_ascii_uppercase).as_deref() {
        Some("M") | Some("MALE") => Some("male"),
        Some("F") | Some("FEMALE") => Some("female"),
        Some("O") | Some("OTHER") => Some("other"),
        Some(_) => Some("unknown"),
        None => None,
    }
}

/// Maps one anonymized Patient to its canonical form.
pub fn canonical_patient(rec: &RecordAnonymized) -> Result<CanonicalPatient, String> {
    let content: Value = serde_json::from_str(&rec.content_json)
        .map_err(|e| format!("content_json is not valid JSON: {e}"))?;
    // A FHIR resource arrives as itself, or as a Bundle entry around it; CSV as columns.
    let resource = content.get("resource").unwrap_or(&content);
    let field = |names: &[&str]| names.iter().find_map(|n| resource.get(*n)).cloned();
    let gender = fhir_gender(
        field(&["GENDER", "gender"])
            .as_ref()
            .and_then(Value::as_str),
    );
    // Anonymization leaves a year (or a clamped year for ages over 89) in the date field.
    let birth_year = field(&["BIRTH_YEAR", "BIRTHDATE", "birthDate"]).and_then(|v| match v {
        Value::Number(n) => n.as_i64().and_then(|y| i32::try_from(y).ok()),
        Value::String(s) => s.get(..4).and_then(|y| y.parse().ok()),
        _ => None,
    });
    // One Patient per pseudonym: the source identity of a Patient is the patient itself.
    let id = resource_id("Patient", &rec.patient_pseudonym, "");
    let mut fhir = json!({
        "resourceType": "Patient",
        "id": id,
        "identifier": [{"system": "urn:medpipe:pseudonym", "value": rec.patient_pseudonym}],
    });
    if let Some(g) = gender {
        fhir["gender"] = json!(g);
    }
    if let Some(y) = birth_year {
        fhir["birthDate"] = json!(format!("{y:04}"));
    }
    Ok(CanonicalPatient {
        resource_id: id,
        patient_pseudonym: rec.patient_pseudonym.clone(),
        gender: gender.map(str::to_string),
        birth_year,
        fhir_json: fhir.to_string(),
        provenance: Provenance {
            source_format: rec.source_format.clone(),
            batch_id: rec.batch_id.clone(),
            source_position: rec.position,
            policy_version: rec.policy_version.clone(),
            concept_map_version: CONCEPT_MAP_VERSION.into(),
        },
    })
}

impl Stage for Canonizer {
    fn name(&self) -> &'static str {
        "canonization"
    }

    fn process(&mut self, input: &Input<'_>) -> Outcome {
        let ev = input.event;
        match &ev.payload {
            Payload::RecordAnonymized(rec) if rec.record_type == "Patient" => {
                match canonical_patient(rec) {
                    Ok(p) => Outcome::Emit(vec![Output {
                        key: p.patient_pseudonym.clone(),
                        event: Event::caused_by(ev, SERVICE, Payload::CanonicalPatient(p)),
                    }]),
                    Err(reason) => Outcome::DeadLetter {
                        error_type: "mapping",
                        reason: format!(
                            "batch {} position {}: {reason}",
                            rec.batch_id, rec.position
                        ),
                    },
                }
            }
            Payload::RecordAnonymized(rec) => Outcome::DeadLetter {
                error_type: "unsupported_record_type",
                reason: format!(
                    "batch {} position {}: no canonical mapping for record type {} yet",
                    rec.batch_id, rec.position, rec.record_type
                ),
            },
            _ => Outcome::Emit(vec![]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anonymized(record_type: &str, content: Value) -> Event {
        Event::new(
            "medpipe-anonymization",
            "b1",
            Some("e0"),
            Payload::RecordAnonymized(RecordAnonymized {
                batch_id: "b1".into(),
                position: 7,
                source_format: "csv".into(),
                record_type: record_type.into(),
                patient_pseudonym: "abc".into(),
                policy_version: "p1".into(),
                key_id: "k1".into(),
                content_json: content.to_string(),
                fields_redacted: 3,
                policy_hash: None,
                report_json: None,
            }),
        )
    }

    fn run(ev: &Event) -> Outcome {
        Canonizer.process(&Input {
            topic: "t",
            partition: 0,
            offset: 0,
            event: ev,
        })
    }

    #[test]
    fn patient_maps_to_a_fhir_patient_with_a_deterministic_id() {
        let ev = anonymized("Patient", json!({"GENDER": "F", "BIRTH_YEAR": 1980}));
        let Outcome::Emit(outs) = run(&ev) else {
            panic!("expected Emit")
        };
        let Payload::CanonicalPatient(p) = &outs[0].event.payload else {
            panic!("not a patient")
        };
        assert_eq!(outs[0].key, "abc");
        assert_eq!(p.gender.as_deref(), Some("female"));
        assert_eq!(p.birth_year, Some(1980));
        assert_eq!(p.provenance.source_position, 7);
        let fhir: Value = serde_json::from_str(&p.fhir_json).expect("json");
        assert_eq!(fhir["resourceType"], "Patient");
        assert_eq!(fhir["birthDate"], "1980");
        assert_eq!(fhir["id"], p.resource_id.as_str());
        // Replaying the same input gives the same id.
        let Outcome::Emit(again) = run(&ev) else {
            panic!("expected Emit")
        };
        let Payload::CanonicalPatient(q) = &again[0].event.payload else {
            panic!("not a patient")
        };
        assert_eq!(p.resource_id, q.resource_id);
    }

    #[test]
    fn unknown_record_types_are_dead_lettered_not_dropped() {
        match run(&anonymized("Observation", json!({}))) {
            Outcome::DeadLetter { error_type, .. } => {
                assert_eq!(error_type, "unsupported_record_type")
            }
            other => panic!("expected DeadLetter, got {other:?}"),
        }
    }

    #[test]
    fn lifecycle_events_produce_nothing() {
        let ev = Event::new(
            "x",
            "b1",
            None,
            Payload::AnonymizationFinished(pipeline::events::AnonymizationFinished {
                batch_id: "b1".into(),
                upstream_records_emitted: 1,
                policy_version: "p".into(),
                records_anonymized: None,
                records_dead_lettered: None,
                policy_hash: None,
            }),
        );
        assert_eq!(run(&ev), Outcome::Emit(vec![]));
    }
}
