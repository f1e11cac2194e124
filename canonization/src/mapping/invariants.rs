//! What the reference validator (HAPI FHIR's instance validator, tools/fhir-validator)
//! checks beyond the R4 structure, made to hold before a resource is published: code
//! system names, data-absent reasons, string whitespace, and the R4 invariants that
//! source records break.
//!
//! A broken invariant is either repaired with a documented default or a removal, and the
//! resource then carries a `meta.tag` of system [`REPAIR_TAG_SYSTEM`] whose code names the
//! rule (`ait-1`, `con-4`, `tim-10`, `data-absent-reason`) and whose display says what was
//! changed; or, where no repair is honest, the record is rejected (dead-lettered) with the
//! invariant named. Nothing is changed silently, except renaming a code system to its R4
//! URI and trimming a string, which change no meaning.
//!
//! | rule | when | what the mapping does |
//! |---|---|---|
//! | ait-1 | AllergyIntolerance without clinicalStatus, not entered in error | clinicalStatus `active` (a recorded allergy is taken as current), tagged |
//! | con-4 | Condition with abatement[x] and no clinicalStatus | clinicalStatus `inactive` (the parent of resolved and remission), tagged |
//! | con-4 | Condition with abatement[x] and clinicalStatus active, recurrence or relapse, or not in condition-clinical | rejected: the record contradicts itself |
//! | con-4 | Condition entered in error with abatement[x] | abatement removed (con-5 already removed clinicalStatus), tagged |
//! | tim-10 | Timing.repeat with both timeOfDay and when | `when` and `offset` removed, timeOfDay kept (the exact time), tagged with the removed codes |
//! | org-1 | Organization with neither name nor identifier (de-identification removes names) | rejected |
//! | data-absent-reason | a dataAbsentReason code outside the R4 code system | replaced by `unknown`, tagged |

use serde_json::{json, Map, Value};

use super::datatypes::{string, DATA_ABSENT_REASON};
use super::tables::Terminology;
use super::MapError;

/// `meta.tag` system of the tags saying what the mapping repaired.
pub const REPAIR_TAG_SYSTEM: &str = "urn:medpipe:mapping-repair";

const CONDITION_CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";
const CONDITION_VERIFICATION: &str = "http://terminology.hl7.org/CodeSystem/condition-ver-status";
const ALLERGY_CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical";
const ALLERGY_VERIFICATION: &str =
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification";

/// One repair: the rule it satisfies (the tag's code) and what was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Repair {
    pub code: &'static str,
    pub display: String,
}

/// Before the structure is enforced, anywhere in the resource: code systems under their R4
/// names, `valueString`s without surrounding whitespace (an empty one goes), and
/// data-absent-reason codes of the R4 code system.
pub(crate) fn terminology(r: &mut Map<String, Value>, t: &Terminology, repairs: &mut Vec<Repair>) {
    if let Some(Value::String(system)) = r.get("system") {
        if let Some(r4) = t.system(system) {
            r.insert("system".into(), json!(r4));
        }
    }
    let trimmed = match r.get("valueString") {
        Some(Value::String(s)) if string(s).as_deref() != Some(s.as_str()) => Some(string(s)),
        _ => None,
    };
    match trimmed {
        Some(Some(s)) => {
            r.insert("valueString".into(), json!(s));
        }
        Some(None) => {
            r.remove("valueString");
        }
        None => {}
    }
    for child in r.values_mut() {
        match child {
            Value::Object(map) => terminology(map, t, repairs),
            Value::Array(items) => {
                for item in items.iter_mut().filter_map(Value::as_object_mut) {
                    terminology(item, t, repairs);
                }
            }
            _ => {}
        }
    }
    if let Some(Value::Object(reason)) = r.get_mut("dataAbsentReason") {
        data_absent_reason(reason, t, repairs);
    }
}

/// Codings of the data-absent-reason system (or of none) with a code it does not define
/// become `unknown`.
fn data_absent_reason(reason: &mut Map<String, Value>, t: &Terminology, repairs: &mut Vec<Repair>) {
    let Some(Value::Array(codings)) = reason.get_mut("coding") else {
        return;
    };
    for coding in codings {
        let system = coding.get("system").and_then(Value::as_str);
        let code = coding.get("code").and_then(Value::as_str);
        let ours = system.is_none_or(|s| s == DATA_ABSENT_REASON);
        let known = code.is_some_and(|c| t.data_absent_reasons.iter().any(|k| k == c));
        if ours && !known {
            *coding =
                json!({ "system": DATA_ABSENT_REASON, "code": "unknown", "display": "Unknown" });
            repairs.push(Repair {
                code: "data-absent-reason",
                display: "A dataAbsentReason code outside the R4 data-absent-reason code system \
                          was replaced by unknown"
                    .into(),
            });
        }
    }
}

/// After the structure is enforced: the invariants of the table above.
pub(crate) fn invariants(
    resource_type: &str,
    r: &mut Map<String, Value>,
    repairs: &mut Vec<Repair>,
) -> Result<(), MapError> {
    match resource_type {
        "AllergyIntolerance" => allergy_status(r, repairs),
        "Condition" => condition_abatement(r, repairs)?,
        "Organization" if !r.contains_key("name") && !r.contains_key("identifier") => {
            return Err(MapError::invalid(
                "Organization breaks FHIR invariant org-1: it has neither name nor \
                 identifier (after de-identification)",
            ));
        }
        _ => {}
    }
    for value in r.values_mut() {
        timing(value, repairs);
    }
    Ok(())
}

/// Whether a CodeableConcept has a coding of `system` with one of `codes`.
fn has_code(concept: Option<&Value>, system: &str, codes: &[&str]) -> bool {
    concept
        .and_then(|c| c.get("coding"))
        .and_then(Value::as_array)
        .is_some_and(|codings| {
            codings.iter().any(|c| {
                c.get("system").and_then(Value::as_str) == Some(system)
                    && c.get("code")
                        .and_then(Value::as_str)
                        .is_some_and(|code| codes.contains(&code))
            })
        })
}

/// ait-1: clinicalStatus is required unless the record was entered in error.
fn allergy_status(r: &mut Map<String, Value>, repairs: &mut Vec<Repair>) {
    let in_error = has_code(
        r.get("verificationStatus"),
        ALLERGY_VERIFICATION,
        &["entered-in-error"],
    );
    if in_error || r.contains_key("clinicalStatus") {
        return;
    }
    r.insert(
        "clinicalStatus".into(),
        json!({ "coding": [{ "system": ALLERGY_CLINICAL, "code": "active", "display": "Active" }] }),
    );
    repairs.push(Repair {
        code: "ait-1",
        display: "The source has no clinicalStatus: set to active (medpipe default for a \
                  recorded allergy)"
            .into(),
    });
}

/// con-4: an abated condition is resolved, in remission or inactive.
fn condition_abatement(
    r: &mut Map<String, Value>,
    repairs: &mut Vec<Repair>,
) -> Result<(), MapError> {
    let abatement: Vec<String> = r
        .keys()
        .filter(|k| k.trim_start_matches('_').starts_with("abatement"))
        .cloned()
        .collect();
    if abatement.is_empty() {
        return Ok(());
    }
    if has_code(
        r.get("verificationStatus"),
        CONDITION_VERIFICATION,
        &["entered-in-error"],
    ) {
        for k in &abatement {
            r.remove(k);
        }
        repairs.push(Repair {
            code: "con-4",
            display: "Entered in error: abatement removed along with clinicalStatus".into(),
        });
        return Ok(());
    }
    let clinical = r.get("clinicalStatus");
    if has_code(
        clinical,
        CONDITION_CLINICAL,
        &["resolved", "remission", "inactive"],
    ) {
        return Ok(());
    }
    if clinical.is_some() {
        return Err(MapError::invalid(
            "Condition breaks FHIR invariant con-4: abatement[x] is present but clinicalStatus \
             is not resolved, remission or inactive",
        ));
    }
    r.insert(
        "clinicalStatus".into(),
        json!({ "coding": [{ "system": CONDITION_CLINICAL, "code": "inactive", "display": "Inactive" }] }),
    );
    repairs.push(Repair {
        code: "con-4",
        display: "The source has an abatement and no clinicalStatus: set to inactive".into(),
    });
    Ok(())
}

/// tim-10: a Timing.repeat has timeOfDay or when, not both; timeOfDay (exact times) stays.
fn timing(value: &mut Value, repairs: &mut Vec<Repair>) {
    match value {
        Value::Object(map) => {
            if map.contains_key("timeOfDay") {
                if let Some(when) = map.remove("when") {
                    map.remove("offset");
                    let codes: Vec<&str> = when
                        .as_array()
                        .map(|w| w.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    repairs.push(Repair {
                        code: "tim-10",
                        display: format!(
                            "Timing had both timeOfDay and when: when ({}) removed",
                            codes.join(", ")
                        ),
                    });
                }
            }
            for child in map.values_mut() {
                timing(child, repairs);
            }
        }
        Value::Array(items) => {
            for item in items {
                timing(item, repairs);
            }
        }
        _ => {}
    }
}

/// Appends one `meta.tag` per repair (a rule once), keeping the resource's other tags.
pub(crate) fn tag(r: &mut Map<String, Value>, repairs: &[Repair]) {
    if repairs.is_empty() {
        return;
    }
    let meta = r.entry("meta").or_insert_with(|| json!({}));
    let Value::Object(meta) = meta else {
        return;
    };
    let tags = meta.entry("tag").or_insert_with(|| json!([]));
    let Value::Array(tags) = tags else {
        return;
    };
    let mut seen = Vec::new();
    for repair in repairs {
        if seen.contains(&repair.code) {
            continue;
        }
        seen.push(repair.code);
        tags.push(json!({
            "system": REPAIR_TAG_SYSTEM,
            "code": repair.code,
            "display": repair.display,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{MapError, ResourceType, Tables};

    fn run(resource_type: &str, draft: Value) -> Result<Value, MapError> {
        let tables = Tables::embedded().map_err(|e| MapError::invalid(e.to_string()))?;
        let kind =
            ResourceType::parse(resource_type).ok_or(MapError::unsupported(resource_type))?;
        super::super::finish::finish(tables, kind, "the-id", "pseudo", draft)
    }

    /// Maps `draft`, then checks `element` of the result and the repair tags' codes.
    fn check(resource_type: &str, draft: Value, element: &str, want: Value, tags: &[&str]) {
        let out = run(resource_type, draft).unwrap_or_else(|e| panic!("{resource_type}: {e}"));
        assert_eq!(
            out.pointer(element).cloned().unwrap_or(Value::Null),
            want,
            "{out}"
        );
        let got: Vec<&str> = out
            .pointer("/meta/tag")
            .and_then(Value::as_array)
            .map(|t| {
                t.iter()
                    .filter(|t| t["system"] == REPAIR_TAG_SYSTEM)
                    .filter_map(|t| t["code"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(got, tags, "{out}");
    }

    fn concept(system: &str, code: &str) -> Value {
        json!({"coding": [{"system": system, "code": code}]})
    }

    #[test]
    fn an_allergy_without_clinical_status_is_active_and_tagged_ait_1() {
        check(
            "AllergyIntolerance",
            json!({"code": {"text": "peanut"}}),
            "/clinicalStatus/coding/0/code",
            json!("active"),
            &["ait-1"],
        );
        check(
            "AllergyIntolerance",
            json!({"clinicalStatus": concept(ALLERGY_CLINICAL, "resolved")}),
            "/clinicalStatus/coding/0/code",
            json!("resolved"),
            &[],
        );
        // Entered in error: no clinical status (ait-2), nothing to repair.
        check(
            "AllergyIntolerance",
            json!({"verificationStatus": concept(ALLERGY_VERIFICATION, "entered-in-error")}),
            "/clinicalStatus",
            Value::Null,
            &[],
        );
        // The STU3 system of the status is renamed first, so it counts.
        check(
            "AllergyIntolerance",
            json!({"clinicalStatus": concept("http://hl7.org/fhir/allergy-clinical-status", "inactive")}),
            "/clinicalStatus/coding/0/system",
            json!(ALLERGY_CLINICAL),
            &[],
        );
    }

    #[test]
    fn an_abated_condition_is_inactive_or_rejected_con_4() {
        check(
            "Condition",
            json!({"abatementDateTime": "2020"}),
            "/clinicalStatus/coding/0/code",
            json!("inactive"),
            &["con-4"],
        );
        check(
            "Condition",
            json!({"abatementDateTime": "2020", "clinicalStatus": concept(CONDITION_CLINICAL, "remission")}),
            "/clinicalStatus/coding/0/code",
            json!("remission"),
            &[],
        );
        check(
            "Condition",
            json!({"abatementDateTime": "2020", "clinicalStatus": concept(CONDITION_CLINICAL, "active"),
                   "verificationStatus": concept(CONDITION_VERIFICATION, "entered-in-error")}),
            "/abatementDateTime",
            Value::Null,
            &["con-4"],
        );
        check(
            "Condition",
            json!({"clinicalStatus": concept(CONDITION_CLINICAL, "active")}),
            "/clinicalStatus/coding/0/code",
            json!("active"),
            &[],
        );
        for status in ["active", "recurrence", "relapse"] {
            let err = run(
                "Condition",
                json!({"abatementString": "gone", "clinicalStatus": concept(CONDITION_CLINICAL, status)}),
            )
            .expect_err("an abated active condition contradicts itself");
            assert!(err.to_string().contains("con-4"), "{err}");
        }
    }

    #[test]
    fn a_timing_with_time_of_day_loses_when_tim_10() {
        let draft = json!({"intent": "order", "dosageInstruction": [{"timing": {"repeat": {
            "frequency": 1, "period": 1, "periodUnit": "d",
            "timeOfDay": ["08:00:00"], "when": ["MORN"], "offset": 30}}}]});
        check(
            "MedicationRequest",
            draft,
            "/dosageInstruction/0/timing/repeat",
            json!({"frequency": 1, "period": 1, "periodUnit": "d", "timeOfDay": ["08:00:00"]}),
            &["tim-10"],
        );
        let when_only = json!({"intent": "order", "dosageInstruction": [{"timing": {"repeat": {"when": ["HS"]}}}]});
        check(
            "MedicationRequest",
            when_only,
            "/dosageInstruction/0/timing/repeat/when",
            json!(["HS"]),
            &[],
        );
    }

    #[test]
    fn an_organization_without_name_or_identifier_is_rejected_org_1() {
        let err = run("Organization", json!({"active": true})).expect_err("org-1");
        assert!(err.to_string().contains("org-1"), "{err}");
        check(
            "Organization",
            json!({"name": "Clinic"}),
            "/name",
            json!("Clinic"),
            &[],
        );
    }

    #[test]
    fn code_systems_get_their_r4_names() {
        check(
            "Patient",
            json!({"maritalStatus": concept("http://hl7.org/fhir/v3/MaritalStatus", "M")}),
            "/maritalStatus/coding/0/system",
            json!("http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"),
            &[],
        );
        check(
            "MedicationRequest",
            json!({"intent": "order", "statusReason": concept("http://hl7.org/fhir/ValueSet/medicationrequest-status-reason", "altchoice")}),
            "/statusReason/coding/0/system",
            json!("http://terminology.hl7.org/CodeSystem/medicationrequest-status-reason"),
            &[],
        );
        check(
            "Observation",
            json!({"interpretation": [concept("http://hl7.org/fhir/v2/0078", "H")]}),
            "/interpretation/0/coding/0/system",
            json!("http://terminology.hl7.org/CodeSystem/v2-0078"),
            &[],
        );
    }

    #[test]
    fn value_strings_are_trimmed_and_absent_reasons_known() {
        check(
            "Observation",
            json!({"valueString": "  Specimen hemolyzed.\n"}),
            "/valueString",
            json!("Specimen hemolyzed."),
            &[],
        );
        check(
            "Observation",
            json!({"component": [{"code": {"text": "a"}, "valueString": " \t"}]}),
            "/component/0/valueString",
            Value::Null,
            &[],
        );
        check(
            "Observation",
            json!({"component": [{"code": {"text": "a"}, "dataAbsentReason": concept(DATA_ABSENT_REASON, "1")}]}),
            "/component/0/dataAbsentReason/coding/0/code",
            json!("unknown"),
            &["data-absent-reason"],
        );
        check(
            "Observation",
            json!({"component": [{"code": {"text": "a"}, "dataAbsentReason": concept(DATA_ABSENT_REASON, "masked")}]}),
            "/component/0/dataAbsentReason/coding/0/code",
            json!("masked"),
            &[],
        );
    }
}
