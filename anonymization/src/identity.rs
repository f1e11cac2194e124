//! One pseudonym per human per tenant: which identifiers of a record the tenant trusts to
//! name the same person across sources and formats, and which records announce that two
//! patient records are one person (merges).
//!
//! A policy lists identity systems in priority order (`[[identity]]`). Each system names
//! where its identifiers appear in each format: FHIR `Identifier.system` URIs, HL7 v2
//! assigning authorities (CX.4 of PID-3 and MRG-1), CSV columns. A record's patient is then
//! keyed by the first system, in policy order, that has a value in the record; a record
//! without any trusted identifier is keyed by its source link, as before. This module is
//! pure: it reads a record's content and says what it found. The engine turns what it found
//! into pseudonyms, and the stage keeps the aliases and merges (see `memory`).

use pipeline::formats::{RecordShape, SourceFormat};
use serde::Deserialize;
use serde_json::Value;

/// One trusted identifier system, as the policy's `[[identity]]` table declares it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySystem {
    /// Stable name; part of the pseudonym input, so renaming a system changes pseudonyms.
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// FHIR `Identifier.system` values of this system.
    #[serde(default)]
    pub fhir_systems: Vec<String>,
    /// HL7 v2 assigning authorities (CX.4, its namespace id or universal id).
    #[serde(default)]
    pub hl7_authorities: Vec<String>,
    /// CSV columns that hold this system's identifiers, as the record names them (after a
    /// layout's renames).
    #[serde(default)]
    pub csv_columns: Vec<String>,
    /// When not empty, an identifier also needs one of these type codes (v2 table 0203:
    /// `MR`, `SS`, ...) in FHIR `Identifier.type.coding.code` or HL7 CX.5.
    #[serde(default)]
    pub type_codes: Vec<String>,
}

impl IdentitySystem {
    /// Why the declaration cannot work, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("name must not be empty".into());
        }
        if self.fhir_systems.is_empty()
            && self.hl7_authorities.is_empty()
            && self.csv_columns.is_empty()
        {
            return Err(
                "names no fhir_systems, hl7_authorities or csv_columns, so it matches nothing"
                    .into(),
            );
        }
        let blank = |v: &[String]| v.iter().any(|s| s.trim().is_empty());
        if blank(&self.fhir_systems) || blank(&self.hl7_authorities) || blank(&self.csv_columns) {
            return Err("a system, authority or column name is blank".into());
        }
        Ok(())
    }

    fn type_ok<'a>(&self, mut codes: impl Iterator<Item = &'a str>) -> bool {
        self.type_codes.is_empty() || codes.any(|c| self.type_codes.iter().any(|t| t == c))
    }
}

/// A trusted identifier found in a record: the system's name and the value, trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedId {
    pub system: String,
    pub value: String,
}

/// Another patient record that a record names: by a trusted identifier, or by the id the
/// source uses for it (a FHIR Patient id, an HL7 or CSV patient link).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OtherPatient {
    Trusted(TrustedId),
    SourceId(String),
}

/// What a record says about a merge of two patient records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeClaim {
    /// The other patient was merged into this record's patient (HL7 A40 and kin: MRG names
    /// the prior patient; FHIR `Patient.link` of type `replaces`).
    Absorbed {
        other: OtherPatient,
        trigger: &'static str,
    },
    /// This record's patient was replaced by the other (FHIR `Patient.link` of type
    /// `replaced-by`).
    ReplacedBy { other: OtherPatient },
}

/// HL7 v2 trigger events that merge patient records and carry the prior patient in MRG.
pub const HL7_MERGE_EVENTS: [&str; 6] = ["A18", "A30", "A34", "A36", "A39", "A40"];

/// The highest-priority trusted identifier of the record's own patient, if any.
pub fn patient_identity(
    systems: &[IdentitySystem],
    format: SourceFormat,
    record_type: &str,
    content: &Value,
) -> Option<TrustedId> {
    if systems.is_empty() {
        return None;
    }
    match format.shape() {
        RecordShape::CsvRow => systems.iter().find_map(|s| {
            s.csv_columns.iter().find_map(|column| {
                let value = content.get(column)?.as_str()?.trim();
                (!value.is_empty()).then(|| TrustedId {
                    system: s.name.clone(),
                    value: value.to_owned(),
                })
            })
        }),
        RecordShape::FhirResource | RecordShape::FhirBundleEntry => {
            if record_type != "Patient" {
                return None;
            }
            let resource = content.get("resource").unwrap_or(content);
            let identifiers = resource.get("identifier")?.as_array()?;
            systems
                .iter()
                .find_map(|s| identifiers.iter().find_map(|i| fhir_identifier(s, i)))
        }
        RecordShape::Hl7Message => {
            let message = pipeline::hl7::Message::read(content).ok()?;
            let pid = message.first("PID")?;
            systems
                .iter()
                .find_map(|s| (1..=pid.reps(3).len()).find_map(|r| hl7_cx(s, &pid, 3, r)))
        }
    }
}

/// The merges a record announces.
pub fn merge_claims(
    systems: &[IdentitySystem],
    format: SourceFormat,
    record_type: &str,
    content: &Value,
) -> Vec<MergeClaim> {
    match format.shape() {
        RecordShape::CsvRow => Vec::new(),
        RecordShape::FhirResource | RecordShape::FhirBundleEntry => {
            if record_type != "Patient" {
                return Vec::new();
            }
            let resource = content.get("resource").unwrap_or(content);
            let Some(links) = resource.get("link").and_then(Value::as_array) else {
                return Vec::new();
            };
            links
                .iter()
                .filter_map(|link| {
                    let other = fhir_other(systems, link.get("other")?)?;
                    match link.get("type").and_then(Value::as_str)? {
                        "replaced-by" => Some(MergeClaim::ReplacedBy { other }),
                        "replaces" => Some(MergeClaim::Absorbed {
                            other,
                            trigger: "fhir-patient-link-replaces",
                        }),
                        // `refer` and `seealso` link records of one person without merging.
                        _ => None,
                    }
                })
                .collect()
        }
        RecordShape::Hl7Message => {
            let event = record_type.split_once('^');
            if !matches!(event, Some(("ADT", e)) if HL7_MERGE_EVENTS.contains(&e)) {
                return Vec::new();
            }
            let Ok(message) = pipeline::hl7::Message::read(content) else {
                return Vec::new();
            };
            message
                .all("MRG")
                .filter_map(|mrg| {
                    let reps = mrg.reps(1).len();
                    let other = systems
                        .iter()
                        .find_map(|s| (1..=reps).find_map(|r| hl7_cx(s, &mrg, 1, r)))
                        .map(OtherPatient::Trusted)
                        .or_else(|| {
                            // As ingestion reads PID-3 for the link: the first value.
                            mrg.sub(1, 1, 1, 1)
                                .map(str::trim)
                                .filter(|v| !v.is_empty())
                                .map(|v| OtherPatient::SourceId(v.to_owned()))
                        })?;
                    Some(MergeClaim::Absorbed {
                        other,
                        trigger: "hl7-merge",
                    })
                })
                .collect()
        }
    }
}

/// A FHIR Identifier of system `s`, if it is one.
fn fhir_identifier(s: &IdentitySystem, identifier: &Value) -> Option<TrustedId> {
    let system = identifier.get("system")?.as_str()?;
    if !s.fhir_systems.iter().any(|f| f == system) {
        return None;
    }
    let codes = identifier
        .get("type")
        .and_then(|t| t.get("coding"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("code").and_then(Value::as_str));
    if !s.type_ok(codes) {
        return None;
    }
    let value = identifier.get("value")?.as_str()?.trim();
    (!value.is_empty()).then(|| TrustedId {
        system: s.name.clone(),
        value: value.to_owned(),
    })
}

/// The patient a `Patient.link.other` names: by a trusted identifier, else by the id in
/// its reference (`Patient/123`, `urn:uuid:abc`).
fn fhir_other(systems: &[IdentitySystem], other: &Value) -> Option<OtherPatient> {
    if let Some(identifier) = other.get("identifier") {
        if let Some(id) = systems.iter().find_map(|s| fhir_identifier(s, identifier)) {
            return Some(OtherPatient::Trusted(id));
        }
    }
    let reference = other.get("reference")?.as_str()?.trim();
    let id = match reference.strip_prefix("urn:uuid:") {
        Some(id) => id,
        None => {
            let mut parts = reference.rsplit('/');
            let last = parts.next()?;
            let before = parts.next();
            // `.../Patient/123/_history/2` names version 2 of Patient 123.
            match (before, parts.next(), parts.next()) {
                (Some("_history"), Some(id), Some("Patient")) => id,
                (Some("Patient"), ..) => last,
                _ => return None,
            }
        }
    };
    (!id.is_empty()).then(|| OtherPatient::SourceId(id.to_owned()))
}

/// Repetition `r` of CX field `n` of a segment, if system `s` assigned it: CX.4 (namespace
/// id or universal id) names one of its authorities, and CX.5 fits its type codes.
fn hl7_cx(
    s: &IdentitySystem,
    seg: &pipeline::hl7::Segment<'_>,
    n: usize,
    r: usize,
) -> Option<TrustedId> {
    let authority = [seg.sub(n, r, 4, 1), seg.sub(n, r, 4, 2)]
        .into_iter()
        .flatten()
        .map(str::trim)
        .any(|a| !a.is_empty() && s.hl7_authorities.iter().any(|h| h == a));
    if !authority || !s.type_ok(seg.sub(n, r, 5, 1).map(str::trim).into_iter()) {
        return None;
    }
    let value = seg.sub(n, r, 1, 1)?.trim();
    (!value.is_empty()).then(|| TrustedId {
        system: s.name.clone(),
        value: value.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn systems() -> Vec<IdentitySystem> {
        vec![
            IdentitySystem {
                name: "mrn".into(),
                description: None,
                fhir_systems: vec!["urn:example:mrn".into()],
                hl7_authorities: vec!["HOSP".into(), "1.2.3".into()],
                csv_columns: vec!["MRN".into()],
                type_codes: vec![],
            },
            IdentitySystem {
                name: "ssn".into(),
                description: None,
                fhir_systems: vec!["http://hl7.org/fhir/sid/us-ssn".into()],
                hl7_authorities: vec!["SSA".into()],
                csv_columns: vec!["SSN".into()],
                type_codes: vec!["SS".into()],
            },
        ]
    }

    fn id(system: &str, value: &str) -> Option<TrustedId> {
        Some(TrustedId {
            system: system.into(),
            value: value.into(),
        })
    }

    /// An HL7 message in ingestion's JSON shape from pipe-delimited segment lines.
    fn hl7(lines: &[&str]) -> Value {
        let segments = lines
            .iter()
            .map(|line| {
                let mut fields = line.split('|');
                let name = fields.next().unwrap_or_default();
                let fields: Vec<Value> = fields
                    .map(|f| {
                        Value::Array(
                            f.split('~')
                                .filter(|r| !r.is_empty())
                                .map(|r| {
                                    Value::Array(
                                        r.split('^')
                                            .map(|c| {
                                                Value::Array(
                                                    c.split('&').map(|s| json!(s)).collect(),
                                                )
                                            })
                                            .collect(),
                                    )
                                })
                                .collect(),
                        )
                    })
                    .collect();
                pipeline::hl7::segment(name, fields)
            })
            .collect();
        pipeline::hl7::message(segments)
    }

    #[test]
    fn the_first_system_in_policy_order_that_has_a_value_wins() {
        let s = systems();
        let fhir = SourceFormat::FhirNdjson;
        let patient =
            |ids: Value| json!({"resourceType": "Patient", "id": "p1", "identifier": ids});
        let ssn = json!({"system": "http://hl7.org/fhir/sid/us-ssn", "value": "999-11-2222",
                         "type": {"coding": [{"code": "SS"}]}});
        let mrn = json!({"system": "urn:example:mrn", "value": " M-77 "});
        let cases: Vec<(Value, Option<TrustedId>)> = vec![
            (patient(json!([ssn, mrn])), id("mrn", "M-77")),
            (patient(json!([ssn])), id("ssn", "999-11-2222")),
            // The SSN system requires its type code.
            (
                patient(json!([{"system": "http://hl7.org/fhir/sid/us-ssn", "value": "1"}])),
                None,
            ),
            (
                patient(json!([{"system": "urn:other", "value": "M-77"}])),
                None,
            ),
            (
                patient(json!([{"system": "urn:example:mrn", "value": " "}])),
                None,
            ),
        ];
        for (content, expected) in cases {
            assert_eq!(
                patient_identity(&s, fhir, "Patient", &content),
                expected,
                "{content}"
            );
        }
        // Only a Patient says who its patient is; an Observation's identifiers are its own.
        let obs = json!({"resourceType": "Observation", "identifier": [mrn]});
        assert_eq!(patient_identity(&s, fhir, "Observation", &obs), None);
        // A Bundle entry carries the resource under `resource`.
        let entry = json!({"fullUrl": "urn:uuid:x", "resource": patient(json!([mrn]))});
        assert_eq!(
            patient_identity(&s, SourceFormat::FhirBundle, "Patient", &entry),
            id("mrn", "M-77")
        );
        // No systems: nothing is trusted.
        assert_eq!(
            patient_identity(&[], fhir, "Patient", &patient(json!([mrn]))),
            None
        );
    }

    #[test]
    fn hl7_and_csv_identifiers_are_found_by_authority_and_column() {
        let s = systems();
        let cases = [
            ("PID|1||X1^^^OTHER^MR~M-77^^^HOSP^MR", id("mrn", "M-77")),
            ("PID|1||M-78^^^ACME&1.2.3&ISO^MR", id("mrn", "M-78")),
            ("PID|1||123-45-6789^^^SSA^SS", id("ssn", "123-45-6789")),
            ("PID|1||123-45-6789^^^SSA^MR", None),
            ("PID|1||M-77^^^OTHER^MR", None),
        ];
        for (pid, expected) in cases {
            let msg = hl7(&["MSH|^~\\&|A|B|C|D|20200101||ADT^A01|1|P|2.5", pid]);
            assert_eq!(
                patient_identity(&s, SourceFormat::Hl7v2, "ADT^A01", &msg),
                expected,
                "{pid}"
            );
        }
        let row = json!({"Id": "u-1", "SSN": "999-11-2222", "MRN": ""});
        assert_eq!(
            patient_identity(&s, SourceFormat::Csv, "Patient", &row),
            id("ssn", "999-11-2222")
        );
    }

    #[test]
    fn merges_come_from_hl7_mrg_and_fhir_patient_links() {
        let s = systems();
        let a40 = hl7(&[
            "MSH|^~\\&|A|B|C|D|20200101||ADT^A40|1|P|2.5",
            "PID|1||M-77^^^HOSP^MR",
            "MRG|M-12^^^HOSP^MR",
        ]);
        assert_eq!(
            merge_claims(&s, SourceFormat::Hl7v2, "ADT^A40", &a40),
            vec![MergeClaim::Absorbed {
                other: OtherPatient::Trusted(TrustedId {
                    system: "mrn".into(),
                    value: "M-12".into()
                }),
                trigger: "hl7-merge"
            }]
        );
        // An untrusted prior id is still a merge, by the source's own id.
        let a18 = hl7(&[
            "MSH|^~\\&|A|B|C|D|20200101||ADT^A18|1|P|2.5",
            "PID|1||M-77",
            "MRG|OLD-1",
        ]);
        assert_eq!(
            merge_claims(&s, SourceFormat::Hl7v2, "ADT^A18", &a18),
            vec![MergeClaim::Absorbed {
                other: OtherPatient::SourceId("OLD-1".into()),
                trigger: "hl7-merge"
            }]
        );
        // An A01 with a stray MRG merges nothing.
        assert!(merge_claims(&s, SourceFormat::Hl7v2, "ADT^A01", &a18).is_empty());

        let patient = json!({"resourceType": "Patient", "id": "old", "link": [
            {"other": {"reference": "Patient/new"}, "type": "replaced-by"},
            {"other": {"reference": "https://x/fhir/Patient/9/_history/2"}, "type": "replaces"},
            {"other": {"reference": "urn:uuid:abc"}, "type": "seealso"},
            {"other": {"reference": "RelatedPerson/r"}, "type": "replaces"},
            {"other": {"identifier": {"system": "urn:example:mrn", "value": "M-5"}}, "type": "replaces"}
        ]});
        assert_eq!(
            merge_claims(&s, SourceFormat::FhirNdjson, "Patient", &patient),
            vec![
                MergeClaim::ReplacedBy {
                    other: OtherPatient::SourceId("new".into())
                },
                MergeClaim::Absorbed {
                    other: OtherPatient::SourceId("9".into()),
                    trigger: "fhir-patient-link-replaces"
                },
                MergeClaim::Absorbed {
                    other: OtherPatient::Trusted(TrustedId {
                        system: "mrn".into(),
                        value: "M-5".into()
                    }),
                    trigger: "fhir-patient-link-replaces"
                },
            ]
        );
    }

    #[test]
    fn a_system_that_matches_nothing_is_refused() {
        let mut s = systems().remove(0);
        assert!(s.check().is_ok());
        s.fhir_systems.clear();
        s.hl7_authorities.clear();
        s.csv_columns.clear();
        assert!(s.check().is_err());
    }
}
