//! Typed analytics columns read from a final canonical FHIR resource.
//!
//! The full resource stays the source of truth; these are the few fields analytics
//! filters and joins on, extracted one way for every source format. Reads never fail:
//! a missing or oddly shaped element gives `None`.

use pipeline::ResourceType;
use serde::Serialize;
use serde_json::Value;

/// A code with its system and display (a FHIR Coding, flattened), as on the wire.
pub use pipeline::events::Code;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Typed {
    /// `status`; for Condition and AllergyIntolerance (which have none) the code of
    /// `clinicalStatus`.
    pub status: Option<String>,
    /// First coding of `code` / `vaccineCode` / `medicationCodeableConcept`, for an
    /// Encounter of its first `type` (a concept with text only gives just `display`).
    pub code: Option<Code>,
    /// The canonical Encounter id from `encounter.reference`.
    pub encounter_id: Option<String>,
    /// When it happened, as FHIR text: effective[x] / onset / performed / occurrence /
    /// authoredOn / period.start / recordedDate, the first present (a Period gives its start).
    pub effective: Option<String>,
    /// `valueQuantity.value` when it is exact. A quantity with a comparator (`<5`) is not a
    /// number to aggregate: it is given as `value_string` ("<5") with its unit instead.
    pub value_number: Option<f64>,
    pub value_unit: Option<String>,
    pub value_string: Option<String>,
    /// First coding of `valueCodeableConcept`.
    pub value_code: Option<Code>,
    /// First `category` code (the category's first coding, or the code itself for
    /// AllergyIntolerance, whose categories are codes).
    pub category: Option<String>,
    pub gender: Option<String>,
    /// Year of `birthDate`.
    pub birth_year: Option<i32>,
    /// `Encounter.class.code`.
    pub class_code: Option<String>,
    /// Canonical Observation ids of `DiagnosticReport.result`, in order.
    pub result_ids: Vec<String>,
    /// The end of `period` / `performedPeriod` / `abatementDateTime`.
    pub period_end: Option<String>,
    /// First code of `interpretation`.
    pub interpretation: Option<String>,
    /// Code of `clinicalStatus` (Condition, AllergyIntolerance).
    pub clinical_status: Option<String>,
    /// `MedicationRequest.intent`.
    pub intent: Option<String>,
    /// `AllergyIntolerance.criticality`.
    pub criticality: Option<String>,
    /// `Immunization.primarySource`.
    pub primary_source: Option<bool>,
}

/// Elements giving "when", in the order tried (types only have some of them). Strings
/// and timings are not points in time, and `issued` is not when it happened.
const EFFECTIVE: [&str; 11] = [
    "effectiveDateTime",
    "effectiveInstant",
    "effectivePeriod",
    "onsetDateTime",
    "onsetPeriod",
    "performedDateTime",
    "performedPeriod",
    "occurrenceDateTime",
    "authoredOn",
    "period",
    "recordedDate",
];

/// When it happened, as FHIR text (the first of [`EFFECTIVE`] present; a Period gives its
/// start). The clinical date that picks a concept-map version.
pub fn effective(resource: &Value) -> Option<String> {
    EFFECTIVE.iter().find_map(|k| match resource.get(*k) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(p @ Value::Object(_)) => p.get("start").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    })
}

pub fn typed(resource_type: ResourceType, code_element: Option<&str>, resource: &Value) -> Typed {
    let str_at = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
    let status = str_at(resource, "status").or_else(|| {
        matches!(
            resource_type,
            ResourceType::Condition | ResourceType::AllergyIntolerance
        )
        .then(|| first_coding(resource.get("clinicalStatus")).and_then(|c| c.code))
        .flatten()
        // Practitioners, roles and organisations have an active flag instead.
        .or_else(|| {
            resource
                .get("active")
                .and_then(Value::as_bool)
                .map(|a| a.to_string())
        })
    });
    // The type's main CodeableConcept (data/fhir.toml `code`); of a list (Encounter.type),
    // the first is the main one.
    let code = code_element
        .and_then(|k| resource.get(k))
        .and_then(|c| if c.is_array() { c.get(0) } else { Some(c) })
        .and_then(|c| first_coding(Some(c)));
    let encounter_id = resource
        .get("encounter")
        .and_then(|e| e.get("reference"))
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("Encounter/"))
        .map(str::to_owned);
    let effective = effective(resource);

    let mut out = Typed {
        status,
        code,
        encounter_id,
        effective,
        ..Typed::default()
    };
    if let Some(q) = resource.get("valueQuantity") {
        out.value_unit = str_at(q, "unit").or_else(|| str_at(q, "code"));
        let number = q.get("value").and_then(Value::as_f64);
        match (str_at(q, "comparator"), number) {
            (None, n) => out.value_number = n,
            (Some(c), Some(_)) => {
                let text = q.get("value").map(Value::to_string).unwrap_or_default();
                out.value_string = Some(format!("{c}{text}"));
            }
            (Some(_), None) => {}
        }
    }
    if let Some(s) = resource.get("valueString").and_then(Value::as_str) {
        out.value_string = Some(s.to_owned());
    }
    out.value_code = first_coding(resource.get("valueCodeableConcept"));
    out.category = match resource.get("category") {
        Some(Value::Array(items)) => items.iter().find_map(|c| match c {
            Value::String(s) => Some(s.clone()),
            other => first_coding(Some(other)).and_then(|c| c.code),
        }),
        Some(Value::String(s)) => Some(s.clone()),
        Some(other @ Value::Object(_)) => first_coding(Some(other)).and_then(|c| c.code),
        _ => None,
    };
    if resource_type == ResourceType::Patient {
        out.gender = str_at(resource, "gender");
        out.birth_year = resource
            .get("birthDate")
            .and_then(Value::as_str)
            .and_then(|d| d.get(..4))
            .and_then(|y| y.parse().ok());
    }
    out.class_code = resource
        .get("class")
        .filter(|_| resource_type == ResourceType::Encounter)
        .and_then(|c| str_at(c, "code"));
    out.result_ids = resource
        .get("result")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("reference").and_then(Value::as_str))
                .filter_map(|r| r.strip_prefix("Observation/"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    out.period_end = ["period", "performedPeriod"]
        .iter()
        .find_map(|k| resource.get(*k).and_then(|p| str_at(p, "end")))
        .or_else(|| str_at(resource, "abatementDateTime"));
    out.interpretation = resource
        .get("interpretation")
        .and_then(|i| first_coding(i.get(0)))
        .and_then(|c| c.code);
    out.clinical_status = first_coding(resource.get("clinicalStatus")).and_then(|c| c.code);
    out.intent = str_at(resource, "intent");
    out.criticality = str_at(resource, "criticality");
    out.primary_source = resource.get("primarySource").and_then(Value::as_bool);
    out
}

/// The first coding of a CodeableConcept; a concept with only text gives its text as
/// display.
fn first_coding(concept: Option<&Value>) -> Option<Code> {
    let concept = concept?;
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    if let Some(c) = concept
        .get("coding")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
    {
        return Some(Code {
            system: s(c, "system"),
            code: s(c, "code"),
            display: s(c, "display"),
        });
    }
    s(concept, "text").map(|text| Code {
        display: Some(text),
        ..Code::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(t: ResourceType) -> Option<&'static str> {
        crate::mapping::Tables::embedded()
            .ok()
            .and_then(|tables| tables.code_element(t))
    }
    use serde_json::json;

    #[test]
    fn observation_fields() {
        let obs = json!({
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose"}]},
            "encounter": {"reference": "Encounter/e-1"},
            "effectivePeriod": {"start": "2025"},
            "valueQuantity": {"value": 105, "unit": "mg/dL"},
            "category": [{"coding": [{"code": "laboratory"}]}],
        });
        let t = typed(
            ResourceType::Observation,
            code_of(ResourceType::Observation),
            &obs,
        );
        assert_eq!(t.status.as_deref(), Some("final"));
        assert_eq!(t.code.and_then(|c| c.code).as_deref(), Some("2339-0"));
        assert_eq!(t.encounter_id.as_deref(), Some("e-1"));
        assert_eq!(t.effective.as_deref(), Some("2025"));
        assert_eq!(t.value_number, Some(105.0));
        assert_eq!(t.value_unit.as_deref(), Some("mg/dL"));
        assert_eq!(t.category.as_deref(), Some("laboratory"));

        let below = json!({"valueQuantity": {"value": 5, "comparator": "<", "unit": "mg/L"}});
        let t = typed(
            ResourceType::Observation,
            code_of(ResourceType::Observation),
            &below,
        );
        assert_eq!(t.value_number, None);
        assert_eq!(t.value_string.as_deref(), Some("<5"));
    }

    #[test]
    fn other_types() {
        let cond =
            json!({"clinicalStatus": {"coding": [{"code": "active"}]}, "onsetDateTime": "2019"});
        let t = typed(
            ResourceType::Condition,
            code_of(ResourceType::Condition),
            &cond,
        );
        assert_eq!(t.status.as_deref(), Some("active"));
        assert_eq!(t.effective.as_deref(), Some("2019"));
        let allergy = json!({"category": ["food"]});
        assert_eq!(
            typed(
                ResourceType::AllergyIntolerance,
                code_of(ResourceType::AllergyIntolerance),
                &allergy
            )
            .category
            .as_deref(),
            Some("food")
        );
        let p = json!({"gender": "female", "birthDate": "1936"});
        let t = typed(ResourceType::Patient, code_of(ResourceType::Patient), &p);
        assert_eq!(
            (t.gender.as_deref(), t.birth_year),
            (Some("female"), Some(1936))
        );
        let e = json!({"class": {"code": "AMB"}, "period": {"start": "2019"}});
        let t = typed(
            ResourceType::Encounter,
            code_of(ResourceType::Encounter),
            &e,
        );
        assert_eq!(
            (t.class_code.as_deref(), t.effective.as_deref()),
            (Some("AMB"), Some("2019"))
        );
        let dr =
            json!({"result": [{"reference": "Observation/a"}, {"reference": "Observation/b"}]});
        assert_eq!(
            typed(
                ResourceType::DiagnosticReport,
                code_of(ResourceType::DiagnosticReport),
                &dr
            )
            .result_ids,
            ["a", "b"]
        );
        let med = json!({"medicationCodeableConcept": {"text": "aspirin"}});
        assert_eq!(
            typed(
                ResourceType::MedicationRequest,
                code_of(ResourceType::MedicationRequest),
                &med
            )
            .code
            .and_then(|c| c.display)
            .as_deref(),
            Some("aspirin")
        );
        assert_eq!(
            typed(
                ResourceType::Patient,
                code_of(ResourceType::Patient),
                &json!(null)
            ),
            Typed::default()
        );
    }
}
