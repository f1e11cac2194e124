//! Normalises a mapped FHIR resource in place: its main code through the versioned concept
//! maps (at the record's own clinical date), and an Observation's quantities to UCUM.
//! The source code is kept as a second coding, and the source value and unit on the
//! canonical record, so nothing the source said is lost.

use pipeline::events::Code;
use pipeline::ResourceType;
use serde_json::{json, Value};

use crate::concept_map::{system_uri, ConceptMaps, Translation};
use crate::units::{self, UnitStatus};

/// What normalisation did, for the record's typed fields and the batch's counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// `standard`, `mapped`, `unmapped` or `none`.
    pub code_status: &'static str,
    /// The source code, when a concept map replaced it.
    pub original_code: Option<Code>,
    /// `map-id@version` of the concept map used.
    pub map_version: Option<String>,
    /// The quantity as the source gave it, and what was done to its unit.
    pub original_value: Option<(f64, String)>,
    pub unit_status: Option<&'static str>,
}

fn main_coding<'a>(resource: &'a mut Value, element: &str) -> Option<&'a mut Vec<Value>> {
    let cc = resource.get_mut(element)?;
    // Encounter.type is a list of CodeableConcepts; the first is the main one.
    let cc = if cc.is_array() { cc.get_mut(0)? } else { cc };
    cc.get_mut("coding")?.as_array_mut()
}

fn code_of(coding: &Value) -> Code {
    let s = |k: &str| coding.get(k).and_then(Value::as_str).map(str::to_string);
    Code {
        system: s("system"),
        code: s("code"),
        display: s("display"),
    }
}

/// Normalises `resource` (of `resource_type`) in place.
pub fn normalize(
    resource_type: ResourceType,
    code_element: Option<&str>,
    resource: &mut Value,
    maps: &ConceptMaps,
    clinical_date: &str,
) -> Report {
    let mut report = Report {
        code_status: "none",
        original_code: None,
        map_version: None,
        original_value: None,
        unit_status: None,
    };
    if let Some(element) = code_element {
        if let Some(codings) = main_coding(resource, element) {
            if let Some(first) = codings.first_mut() {
                let source = code_of(first);
                let system = source.system.clone().unwrap_or_default();
                let code = source.code.clone().unwrap_or_default();
                report.code_status = match maps.translate(&system, &code, clinical_date) {
                    Translation::Standard { system } => {
                        first["system"] = json!(system);
                        "standard"
                    }
                    Translation::Mapped {
                        target_system,
                        target_code,
                        target_display,
                        map_id,
                        map_version,
                    } => {
                        let standard = json!({
                            "system": target_system,
                            "code": target_code,
                            "display": target_display,
                        });
                        if let Some(uri) = system_uri(&system) {
                            first["system"] = json!(uri);
                        }
                        codings.insert(0, standard);
                        report.original_code = Some(source);
                        report.map_version = Some(format!("{map_id}@{map_version}"));
                        "mapped"
                    }
                    Translation::Unmapped { .. } => {
                        if let Some(uri) = system_uri(&system) {
                            first["system"] = json!(uri);
                        }
                        "unmapped"
                    }
                };
            }
        }
    }
    if resource_type == ResourceType::Observation {
        normalize_quantities(resource, &mut report);
    }
    report
}

fn loinc_code(resource: &Value) -> Option<String> {
    resource
        .get("code")?
        .get("coding")?
        .as_array()?
        .iter()
        .find(|c| c.get("system").and_then(Value::as_str) == Some(crate::concept_map::LOINC))
        .and_then(|c| c.get("code"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

fn status_label(s: UnitStatus) -> &'static str {
    match s {
        UnitStatus::Unchanged => "unchanged",
        UnitStatus::Respelled => "respelled",
        UnitStatus::Converted => "converted",
        UnitStatus::NoConversion => "no_conversion",
        UnitStatus::Unknown => "unknown",
    }
}

/// Rewrites one FHIR Quantity to UCUM; returns the unit outcome when it had a value.
fn normalize_quantity(
    q: &mut Value,
    loinc: Option<&str>,
) -> Option<(units::Normalized, &'static str)> {
    let value = q.get("value")?.as_f64()?;
    let unit = q
        .get("unit")
        .or_else(|| q.get("code"))
        .and_then(Value::as_str)?
        .to_string();
    let n = units::normalize(loinc, value, &unit);
    let label = status_label(n.status);
    match n.system {
        Some(system) => {
            q["value"] = json!(n.value);
            q["unit"] = json!(n.unit);
            q["system"] = json!(system);
            q["code"] = json!(n.unit);
        }
        None => {
            // Not UCUM: keep what the source said, and claim no code system for it.
            if let Some(o) = q.as_object_mut() {
                o.remove("system");
                o.remove("code");
            }
        }
    }
    Some((n, label))
}

fn normalize_quantities(resource: &mut Value, report: &mut Report) {
    let loinc = loinc_code(resource);
    let Some(q) = resource.get_mut("valueQuantity") else {
        return;
    };
    let Some((n, label)) = normalize_quantity(q, loinc.as_deref()) else {
        return;
    };
    report.original_value = Some((n.original_value, n.original_unit.clone()));
    report.unit_status = Some(label);
    if n.status == UnitStatus::Converted {
        // A mass code no longer describes a molar value: use the code for the new unit.
        if let (Some(new), Some(old)) = (&n.recoded_loinc, &loinc) {
            if let Some(codings) = main_coding(resource, "code") {
                for c in codings.iter_mut() {
                    if c.get("code").and_then(Value::as_str) == Some(old.as_str()) {
                        c["code"] = json!(new);
                        if let Some(o) = c.as_object_mut() {
                            o.remove("display");
                        }
                    }
                }
            }
        }
        // Reference ranges are converted the same way, so one resource has one unit.
        if let Some(ranges) = resource
            .get_mut("referenceRange")
            .and_then(Value::as_array_mut)
        {
            for r in ranges {
                for bound in ["low", "high"] {
                    if let Some(b) = r.get_mut(bound) {
                        normalize_quantity(b, loinc.as_deref());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Normalises an Observation (main code at `code`) as of 2019.
    fn observation(obs: &mut Value) -> Report {
        normalize(
            ResourceType::Observation,
            Some("code"),
            obs,
            &maps(),
            "2019",
        )
    }

    fn maps() -> ConceptMaps {
        ConceptMaps::load_embedded().expect("maps")
    }

    #[test]
    fn a_local_lab_code_is_mapped_and_the_source_kept_as_a_second_coding() {
        let mut obs = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "urn:medpipe:local-lab", "code": "GLU"}]}});
        let r = observation(&mut obs);
        assert_eq!(r.code_status, "mapped");
        assert_eq!(obs["code"]["coding"][0]["system"], "http://loinc.org");
        assert_eq!(obs["code"]["coding"][1]["code"], "GLU");
        assert_eq!(r.original_code.and_then(|c| c.code).as_deref(), Some("GLU"));
        assert!(r.map_version.is_some_and(|v| v.starts_with("local-lab@")));
    }

    #[test]
    fn an_unknown_local_code_is_kept_and_flagged_never_guessed() {
        let mut obs = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "urn:example:lab", "code": "XYZ"}]}});
        let before = obs.clone();
        let r = observation(&mut obs);
        assert_eq!(r.code_status, "unmapped");
        assert_eq!(obs, before);
    }

    #[test]
    fn glucose_in_mg_per_dl_becomes_mmol_per_l_with_range_and_code() {
        let mut obs = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}]},
            "valueQuantity": {"value": 90, "unit": "mg/dL"},
            "referenceRange": [{"low": {"value": 70, "unit": "mg/dL"}, "high": {"value": 99, "unit": "mg/dL"}}]});
        let r = observation(&mut obs);
        assert_eq!(r.code_status, "standard");
        assert_eq!(r.unit_status, Some("converted"));
        assert_eq!(r.original_value, Some((90.0, "mg/dL".to_string())));
        assert_eq!(obs["valueQuantity"]["unit"], "mmol/L");
        assert_eq!(obs["valueQuantity"]["system"], "http://unitsofmeasure.org");
        let v = obs["valueQuantity"]["value"].as_f64().expect("number");
        assert!((v - 4.996).abs() < 0.01, "{v}");
        assert_eq!(obs["referenceRange"][0]["high"]["unit"], "mmol/L");
        assert_ne!(
            obs["code"]["coding"][0]["code"], "2345-7",
            "mass code replaced"
        );
    }
}
