//! The anonymization stage: opens each sealed source record, removes identifiers with
//! keyed pseudonyms and generalisation, and emits de-identified records.
//!
//! This is the walking-skeleton policy: a fixed allow-list for Synthea `patients.csv`
//! rows. Everything not on the allow-list is removed and counted.

use chrono::Datelike;
use hmac::{Hmac, Mac};
use pipeline::crypto::{open_record, KeyRef};
use pipeline::events::{
    AnonymizationFinished, AnonymizationStarted, Payload, RecordAnonymized, SourceRecordBody,
    SourceRecordIngested,
};
use pipeline::{Event, Input, Outcome, Output, Stage};
use serde_json::{Map, Value};
use sha2::Sha256;

pub const SERVICE: &str = "medpipe-anonymization";
pub const POLICY_VERSION: &str = "skeleton-1";

/// Columns kept as they are: none of them is a Safe Harbor identifier.
const KEEP: &[&str] = &["GENDER", "RACE", "ETHNICITY", "MARITAL", "STATE"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnonymizeError {
    #[error("cannot open the sealed record: {0}")]
    Decrypt(String),
    #[error("the opened record is not valid JSON: {0}")]
    Body(String),
    #[error("record has no patient link, so no pseudonym can be derived")]
    NoPatientLink,
}

impl AnonymizeError {
    fn error_type(&self) -> &'static str {
        match self {
            AnonymizeError::Decrypt(_) => "decrypt",
            AnonymizeError::Body(_) => "record_body",
            AnonymizeError::NoPatientLink => "no_patient_link",
        }
    }
}

pub struct Anonymizer {
    master: KeyRef,
    pseudonym_key: KeyRef,
    /// Year the age-over-89 rule is judged against.
    current_year: i32,
}

impl Anonymizer {
    pub fn new(master: KeyRef, pseudonym_key: KeyRef) -> Self {
        Anonymizer {
            master,
            pseudonym_key,
            current_year: chrono::Utc::now().year(),
        }
    }

    /// Keyed HMAC-SHA256 of the source patient link: stable per key, unlinkable without it.
    pub fn pseudonym(&self, patient_link: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.pseudonym_key.key.expose())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(b"patient:");
        mac.update(patient_link.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    fn anonymize(&self, rec: &SourceRecordIngested) -> Result<RecordAnonymized, AnonymizeError> {
        let aad = SourceRecordIngested::aad(&rec.batch_id, rec.position);
        let plain = open_record(&self.master, &rec.sealed, &aad)
            .map_err(|e| AnonymizeError::Decrypt(e.to_string()))?;
        let body: SourceRecordBody =
            serde_json::from_slice(&plain).map_err(|e| AnonymizeError::Body(e.to_string()))?;
        let link = body
            .patient_link
            .as_deref()
            .filter(|l| !l.is_empty())
            .ok_or(AnonymizeError::NoPatientLink)?;
        let (content, redacted) = self.deidentify(&body.content);
        Ok(RecordAnonymized {
            batch_id: rec.batch_id.clone(),
            position: rec.position,
            source_format: rec.source_format.clone(),
            record_type: rec.record_type.clone(),
            patient_pseudonym: self.pseudonym(link),
            policy_version: POLICY_VERSION.into(),
            key_id: self.pseudonym_key.id.clone(),
            content_json: Value::Object(content).to_string(),
            fields_redacted: redacted,
            policy_hash: None,
            report_json: None,
        })
    }

    /// Applies the allow-list: keeps safe columns, reduces BIRTHDATE to the year (or to
    /// "90 or older"), and removes everything else.
    fn deidentify(&self, content: &Value) -> (Map<String, Value>, i64) {
        let mut out = Map::new();
        let mut redacted = 0;
        let Some(fields) = content.as_object() else {
            return (out, 1);
        };
        for (name, value) in fields {
            if KEEP.contains(&name.as_str()) {
                out.insert(name.clone(), value.clone());
            } else if name == "BIRTHDATE" {
                match value
                    .as_str()
                    .and_then(|d| d.get(..4))
                    .and_then(|y| y.parse::<i32>().ok())
                {
                    Some(year) if self.current_year - year > 89 => {
                        out.insert("AGE_OVER_89".into(), Value::Bool(true));
                    }
                    Some(year) => {
                        out.insert("BIRTH_YEAR".into(), Value::from(year));
                    }
                    None => redacted += 1,
                }
            } else {
                redacted += 1;
            }
        }
        (out, redacted)
    }
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
            Payload::DataIngestionStarted(s) => emit(
                &s.batch_id,
                Payload::AnonymizationStarted(AnonymizationStarted {
                    batch_id: s.batch_id.clone(),
                    policy_version: POLICY_VERSION.into(),
                    key_id: self.pseudonym_key.id.clone(),
                    policy_hash: None,
                }),
            ),
            Payload::SourceRecordIngested(rec) => match self.anonymize(rec) {
                Ok(out) => emit(
                    &out.patient_pseudonym.clone(),
                    Payload::RecordAnonymized(out),
                ),
                Err(e) => Outcome::DeadLetter {
                    error_type: e.error_type(),
                    reason: format!("batch {} position {}: {e}", rec.batch_id, rec.position),
                },
            },
            Payload::DataIngestionFinished(f) => emit(
                &f.batch_id,
                Payload::AnonymizationFinished(AnonymizationFinished {
                    batch_id: f.batch_id.clone(),
                    upstream_records_emitted: f.records_emitted,
                    policy_version: POLICY_VERSION.into(),
                    records_anonymized: None,
                    records_dead_lettered: None,
                }),
            ),
            _ => Outcome::Emit(vec![]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline::crypto::DataKey;
    use serde_json::json;

    fn keys() -> (KeyRef, KeyRef) {
        (
            KeyRef::from_hex("m1", &"11".repeat(32)).expect("key"),
            KeyRef::from_hex("p1", &"22".repeat(32)).expect("key"),
        )
    }

    fn sealed_event(body: &SourceRecordBody) -> Event {
        let (master, _) = keys();
        let dk = DataKey::generate(&master).expect("dek");
        let plain = serde_json::to_vec(body).expect("json");
        let sealed = dk
            .seal_record(&plain, &SourceRecordIngested::aad("b1", 1))
            .expect("seal");
        Event::new(
            "medpipe-ingestion",
            "b1",
            None,
            Payload::SourceRecordIngested(SourceRecordIngested {
                batch_id: "b1".into(),
                position: 1,
                source_format: "csv".into(),
                record_type: "Patient".into(),
                sealed,
            }),
        )
    }

    fn check(content: Value, expected: Value, expected_redacted: i64) {
        let (master, pk) = keys();
        let mut a = Anonymizer::new(master, pk);
        a.current_year = 2026;
        let body = SourceRecordBody {
            patient_link: Some("patient-123".into()),
            content,
            original: "raw".into(),
        };
        let ev = sealed_event(&body);
        let input = Input {
            topic: "t",
            partition: 0,
            offset: 0,
            event: &ev,
        };
        match a.process(&input) {
            Outcome::Emit(outs) => {
                assert_eq!(outs.len(), 1);
                let Payload::RecordAnonymized(r) = &outs[0].event.payload else {
                    panic!("not RecordAnonymized: {:?}", outs[0].event.payload)
                };
                let got: Value = serde_json::from_str(&r.content_json).expect("json");
                assert_eq!(got, expected);
                assert_eq!(r.fields_redacted, expected_redacted);
                assert_eq!(outs[0].key, r.patient_pseudonym);
                assert_eq!(
                    outs[0].event.header.causation_id.as_deref(),
                    Some(ev.header.event_id.as_str())
                );
                assert!(!r.content_json.contains("patient-123"));
            }
            other => panic!("expected Emit, got {other:?}"),
        }
    }

    #[test]
    fn identifiers_are_removed_and_safe_fields_kept() {
        check(
            json!({"Id": "patient-123", "FIRST": "Jane", "LAST": "Doe", "SSN": "999-12-3456",
                   "ADDRESS": "1 Main St", "ZIP": "02139", "BIRTHDATE": "1980-04-02", "GENDER": "F", "STATE": "Massachusetts"}),
            json!({"GENDER": "F", "STATE": "Massachusetts", "BIRTH_YEAR": 1980}),
            6,
        );
    }

    #[test]
    fn ages_over_89_become_one_category() {
        check(
            json!({"BIRTHDATE": "1920-01-01"}),
            json!({"AGE_OVER_89": true}),
            0,
        );
        check(json!({"BIRTHDATE": "not a date"}), json!({}), 1);
    }

    #[test]
    fn pseudonyms_are_stable_per_key_and_differ_across_keys() {
        let (m, p) = keys();
        let a = Anonymizer::new(m.clone(), p);
        let b = Anonymizer::new(m, KeyRef::from_hex("p2", &"33".repeat(32)).expect("key"));
        assert_eq!(a.pseudonym("x"), a.pseudonym("x"));
        assert_ne!(a.pseudonym("x"), a.pseudonym("y"));
        assert_ne!(a.pseudonym("x"), b.pseudonym("x"));
    }

    #[test]
    fn a_record_sealed_under_another_key_is_dead_lettered_without_values() {
        let ev = sealed_event(&SourceRecordBody {
            patient_link: Some("patient-123".into()),
            content: json!({"FIRST": "Jane"}),
            original: "Jane".into(),
        });
        let mut a = Anonymizer::new(
            KeyRef::from_hex("m1", &"44".repeat(32)).expect("key"),
            keys().1,
        );
        let input = Input {
            topic: "t",
            partition: 0,
            offset: 0,
            event: &ev,
        };
        match a.process(&input) {
            Outcome::DeadLetter { error_type, reason } => {
                assert_eq!(error_type, "decrypt");
                assert!(!reason.contains("Jane"));
                assert!(reason.contains("position 1"), "{reason}");
            }
            other => panic!("expected DeadLetter, got {other:?}"),
        }
    }
}
