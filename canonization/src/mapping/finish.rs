//! The last step of every mapping: makes a draft resource valid FHIR R4 by the rules of
//! `data/fhir.toml` and the R4 structure (`data/fhir-r4-structure.json`), whatever format
//! it came from.
//!
//! In order: drop narrative, meta and contained resources; set `id` and the patient
//! reference; move or remove `instant`s that de-identification cut to a year; repair
//! quantities; drop codes outside a required value set; prune everything to the R4
//! structure (`structure.rs`); then supply the R4 "unknown" value of each required
//! element still missing, or reject the record where R4 has none. Code system names,
//! data-absent reasons, string whitespace and the invariants source records break are
//! `invariants.rs`'s, whose repairs are tagged.

use serde_json::{json, Map, Value};

use super::datatypes::{decimal, is_instant, iso_date_time, reference};
use super::invariants;
use super::tables::{Tables, TypeRules};
use super::{patient_id, MapError};
use pipeline::ResourceType;

/// Identifier system of the patient pseudonym on every canonical Patient.
pub(crate) const PSEUDONYM_SYSTEM: &str = "urn:medpipe:pseudonym";

/// Elements of type Quantity (or a profile of it) in the nine types and their data types.
const QUANTITY_ELEMENTS: [&str; 19] = [
    "valueQuantity",
    "valueAge",
    "valueDuration",
    "doseQuantity",
    "rateQuantity",
    "onsetAge",
    "abatementAge",
    "performedAge",
    "low",
    "high",
    "numerator",
    "denominator",
    "length",
    "quantity",
    "expectedSupplyDuration",
    "dispenseInterval",
    "boundsDuration",
    "maxDosePerAdministration",
    "maxDosePerLifetime",
];

/// Of those, the SimpleQuantity ones, which may not have a comparator (sqty-1).
const SIMPLE_QUANTITY_ELEMENTS: [&str; 6] = [
    "low",
    "high",
    "doseQuantity",
    "rateQuantity",
    "quantity",
    "maxDosePerAdministration",
];

const COMPARATORS: [&str; 4] = ["<", "<=", ">=", ">"];

pub(crate) fn finish(
    tables: &Tables,
    kind: ResourceType,
    id: &str,
    pseudonym: &str,
    draft: Value,
) -> Result<Value, MapError> {
    let resource_type = kind.fhir_name();
    let rules = tables
        .fhir
        .types
        .get(resource_type)
        .ok_or_else(|| MapError::unsupported(resource_type))?;
    let Value::Object(mut r) = draft else {
        return Err(MapError::invalid("the resource is not a JSON object"));
    };

    // Narrative may repeat identifiers the structured data no longer has; meta's dates are
    // instants; contained resources were removed by de-identification (references to
    // them would dangle).
    for gone in ["text", "meta", "contained"] {
        r.remove(gone);
    }
    r.insert("resourceType".into(), json!(resource_type));
    r.insert("id".into(), json!(id));
    if let Some(element) = &rules.patient {
        r.insert(
            element.clone(),
            reference(ResourceType::Patient, &patient_id(pseudonym)),
        );
    }
    if kind == ResourceType::Patient {
        add_pseudonym_identifier(&mut r, pseudonym);
    }

    let mut repairs = Vec::new();
    invariants::terminology(&mut r, &tables.fhir.terminology, &mut repairs);
    fix_instants(rules, &mut r);
    for (key, value) in r.iter_mut() {
        fix_quantities(value, key);
    }
    for (path, allowed) in &rules.codes {
        keep_allowed_codes(&mut r, path, allowed);
    }
    tables.structure.conform_resource(&mut r, resource_type);
    fix_invariants(resource_type, &mut r);
    invariants::invariants(resource_type, &mut r, &mut repairs)?;

    for (element, default) in &rules.defaults {
        if !r.contains_key(element) {
            r.insert(element.clone(), default.clone());
        }
    }
    for choice in &rules.choices {
        let present = r.keys().any(|k| {
            let name = k.strip_prefix('_').unwrap_or(k);
            choice.variants.iter().any(|v| v == name)
        });
        if !present {
            r.insert(choice.default_variant.clone(), choice.default.clone());
        }
    }
    for element in &rules.required_without_unknown {
        if !r.contains_key(element) {
            return Err(MapError::invalid(format!(
                "{resource_type}.{element} is missing or not an R4 code, and R4 has no \
                 \"unknown\" code for it"
            )));
        }
    }
    invariants::tag(&mut r, &repairs);
    Ok(Value::Object(r))
}

/// R4 invariants a source can break and removing an element repairs without inventing
/// anything: obs-6 (no dataAbsentReason beside a value), con-5 and ait-2 (no clinical
/// status on a record entered in error).
fn fix_invariants(resource_type: &str, r: &mut Map<String, Value>) {
    match resource_type {
        "Observation" if r.keys().any(|k| k.starts_with("value")) => {
            r.remove("dataAbsentReason");
        }
        "Condition" | "AllergyIntolerance" => {
            let in_error = r
                .get("verificationStatus")
                .and_then(|v| v.get("coding"))
                .and_then(Value::as_array)
                .is_some_and(|codings| {
                    codings
                        .iter()
                        .any(|c| c.get("code").and_then(Value::as_str) == Some("entered-in-error"))
                });
            if in_error {
                r.remove("clinicalStatus");
            }
        }
        _ => {}
    }
}

/// Puts the pseudonym identifier first, once.
fn add_pseudonym_identifier(r: &mut Map<String, Value>, pseudonym: &str) {
    let ours = json!({ "system": PSEUDONYM_SYSTEM, "value": pseudonym });
    let mut identifiers = match r.remove("identifier") {
        Some(Value::Array(items)) => items,
        _ => Vec::new(),
    };
    identifiers.retain(|i| i.get("system").and_then(Value::as_str) != Some(PSEUDONYM_SYSTEM));
    identifiers.insert(0, ours);
    r.insert("identifier".into(), Value::Array(identifiers));
}

/// An `instant` that is no longer one (de-identification keeps only a year) moves to its
/// dateTime fallback if the type has one, and is removed otherwise.
fn fix_instants(rules: &TypeRules, r: &mut Map<String, Value>) {
    for element in &rules.instants {
        let ok = r
            .get(element)
            .is_none_or(|v| v.as_str().is_some_and(is_instant));
        if ok {
            continue;
        }
        let Some(old) = r.remove(element) else {
            continue;
        };
        let fallback = rules.instant_fallback.get(element);
        if let (Some(fallback), Some(text)) = (fallback, old.as_str()) {
            if let Some(date_time) = iso_date_time(text) {
                if !r.contains_key(fallback) {
                    r.insert(fallback.clone(), json!(date_time));
                }
            }
        }
    }
}

/// Repairs Quantity values: decimals given as text become numbers; "90+" (an age over 89,
/// as de-identification writes it) becomes `>= 90` where a comparator is allowed; anything
/// else that is not a number is removed. Also enforces qty-3 (a unit code needs a system)
/// and sqty-1 (no comparator on a SimpleQuantity).
fn fix_quantities(value: &mut Value, key: &str) {
    match value {
        Value::Object(map) => {
            if QUANTITY_ELEMENTS.contains(&key) {
                fix_quantity(map, SIMPLE_QUANTITY_ELEMENTS.contains(&key));
            }
            for (k, child) in map.iter_mut() {
                fix_quantities(child, k);
            }
        }
        Value::Array(items) => {
            for item in items {
                fix_quantities(item, key);
            }
        }
        _ => {}
    }
}

fn fix_quantity(q: &mut Map<String, Value>, simple: bool) {
    let comparator_ok = q
        .get("comparator")
        .and_then(Value::as_str)
        .is_some_and(|c| COMPARATORS.contains(&c));
    if !comparator_ok || simple {
        q.remove("comparator");
    }
    match q.get("value") {
        Some(Value::Number(_)) | None => {}
        Some(Value::String(text)) => {
            let text = text.trim().to_owned();
            let at_least = text.strip_suffix('+').and_then(decimal);
            if let Some(n) = decimal(&text) {
                q.insert("value".into(), Value::Number(n));
            } else if let (Some(n), false, false) = (at_least, simple, q.contains_key("comparator"))
            {
                q.insert("value".into(), Value::Number(n));
                q.insert("comparator".into(), json!(">="));
            } else {
                q.remove("value");
            }
        }
        Some(_) => {
            q.remove("value");
        }
    }
    if q.contains_key("code") && !q.contains_key("system") {
        q.remove("code");
    }
}

/// Removes codes outside a required value set: at `element` or `element.child` (one
/// level into a backbone element or list of them).
fn keep_allowed_codes(r: &mut Map<String, Value>, path: &str, allowed: &[String]) {
    let ok = |v: &Value| v.as_str().is_some_and(|c| allowed.iter().any(|a| a == c));
    let filter = |map: &mut Map<String, Value>, key: &str| match map.get_mut(key) {
        Some(Value::Array(items)) => items.retain(ok),
        Some(v) if !ok(v) => {
            map.remove(key);
        }
        _ => {}
    };
    match path.split_once('.') {
        None => filter(r, path),
        Some((parent, child)) => match r.get_mut(parent) {
            Some(Value::Object(map)) => filter(map, child),
            Some(Value::Array(items)) => {
                for item in items {
                    if let Value::Object(map) = item {
                        filter(map, child);
                    }
                }
            }
            _ => {}
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::Tables;

    fn run(resource_type: &'static str, draft: Value) -> Result<Value, MapError> {
        let tables = Tables::embedded().map_err(|e| MapError::invalid(e.to_string()))?;
        let kind =
            ResourceType::parse(resource_type).ok_or(MapError::unsupported(resource_type))?;
        finish(tables, kind, "the-id", "pseudo", draft)
    }

    #[test]
    fn required_elements_get_their_unknown_value() {
        let obs = run("Observation", json!({})).unwrap_or_default();
        assert_eq!(obs["status"], "unknown");
        assert_eq!(obs["code"]["coding"][0]["code"], "unknown");
        assert_eq!(obs["id"], "the-id");
        assert_eq!(
            obs["subject"]["reference"],
            format!("Patient/{}", patient_id("pseudo"))
        );
        let enc = run("Encounter", json!({"status": "bogus"})).unwrap_or_default();
        assert_eq!(enc["status"], "unknown");
        assert_eq!(enc["class"]["code"], "UNK");
        let imm = run("Immunization", json!({"status": "completed"})).unwrap_or_default();
        assert_eq!(
            imm["_occurrenceDateTime"]["extension"][0]["valueCode"],
            "unknown"
        );
        assert!(matches!(
            run("Immunization", json!({})),
            Err(MapError::Invalid { .. })
        ));
        assert!(matches!(
            run("MedicationRequest", json!({"intent": "wish"})),
            Err(MapError::Invalid { .. })
        ));
        let med = run("MedicationRequest", json!({"intent": "order"})).unwrap_or_default();
        assert_eq!(
            med["medicationCodeableConcept"]["coding"][0]["code"],
            "unknown"
        );
        assert_eq!(med["status"], "unknown");
    }

    #[test]
    fn instants_quantities_and_empties_are_repaired() {
        let obs = run(
            "Observation",
            json!({
                "status": "final", "code": {"text": "x"},
                "issued": "2025", "effectiveInstant": "2025",
                "valueQuantity": {"value": "90+", "unit": "a", "code": "a"},
                "referenceRange": [{"low": {"value": "70", "comparator": "<"}}, {"text": " "}],
                "component": [{"valueQuantity": {"value": 1}}],
                "note": [{"text": ""}],
                "extension": [{"url": "x"}, {"url": "y", "valueString": "v"}],
                "bogus": 1,
                "text": {"div": "<div/>"},
            }),
        )
        .unwrap_or_default();
        assert_eq!(obs.get("issued"), None);
        assert_eq!(obs["effectiveDateTime"], "2025");
        assert_eq!(
            obs["valueQuantity"],
            json!({"value": 90, "comparator": ">=", "unit": "a"})
        );
        assert_eq!(obs["referenceRange"], json!([{"low": {"value": 70}}]));
        assert_eq!(obs.get("component"), None);
        assert_eq!(obs.get("note"), None);
        assert_eq!(obs["extension"], json!([{"url": "y", "valueString": "v"}]));
        assert_eq!(obs.get("bogus"), None);
        assert_eq!(obs.get("text"), None);
        let kept = run("Observation", json!({"issued": "2025-05-25T09:00:00Z"}));
        assert_eq!(kept.unwrap_or_default()["issued"], "2025-05-25T09:00:00Z");
    }

    #[test]
    fn invariants_that_removal_repairs() {
        let obs = run(
            "Observation",
            json!({"valueString": "x", "dataAbsentReason": {"text": "masked"}}),
        )
        .unwrap_or_default();
        assert_eq!(obs.get("dataAbsentReason"), None);
        let cond = run(
            "Condition",
            json!({
                "clinicalStatus": {"coding": [{"code": "active"}]},
                "verificationStatus": {"coding": [{"code": "entered-in-error"}]},
            }),
        )
        .unwrap_or_default();
        assert_eq!(cond.get("clinicalStatus"), None);
    }

    #[test]
    fn patients_carry_their_pseudonym_and_valid_contacts_only() {
        let p = run(
            "Patient",
            json!({
                "gender": "F",
                "contact": [{"gender": "male"}, {"gender": "female", "organization": {"reference": "Organization/1"}}],
                "communication": [{"preferred": true}],
            }),
        )
        .unwrap_or_default();
        assert_eq!(
            p["identifier"],
            json!([{"system": PSEUDONYM_SYSTEM, "value": "pseudo"}])
        );
        assert_eq!(p.get("gender"), None);
        assert_eq!(p["contact"].as_array().map(Vec::len), Some(1));
        assert_eq!(p.get("communication"), None);
        assert_eq!(p.get("subject"), None);
    }
}
