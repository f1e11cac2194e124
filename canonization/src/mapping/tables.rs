//! The mapping's data tables (`data/*.toml`), compiled in and parsed once.
//!
//! They are data rather than code so that a terminologist can review and extend them
//! (a new encounter class, an HL7 status code) without reading the mappers. A table that
//! fails to parse is a build defect caught by the unit test below; at run time it turns
//! every record into a `MapError::Invalid` instead of a panic.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde::Deserialize;
use serde_json::Value;

use super::structure::Structure;
use super::MapError;

const FHIR_TOML: &str = include_str!("../../data/fhir.toml");
const STRUCTURE_JSON: &str = include_str!("../../data/fhir-r4-structure.json");
const SYNTHEA_TOML: &str = include_str!("../../data/synthea.toml");
const HL7_TOML: &str = include_str!("../../data/hl7v2.toml");

#[derive(Debug)]
pub(crate) struct Tables {
    pub fhir: FhirRules,
    pub structure: Structure,
    pub synthea: Synthea,
    pub hl7: Hl7Tables,
}

/// The tables, parsed on first use.
pub(crate) fn get() -> Result<&'static Tables, MapError> {
    static TABLES: LazyLock<Result<Tables, String>> = LazyLock::new(load);
    TABLES.as_ref().map_err(|e| {
        MapError::invalid(format!(
            "the built-in mapping tables do not load ({e}); this is a build defect"
        ))
    })
}

fn load() -> Result<Tables, String> {
    let fhir: FhirRules =
        toml::from_str(FHIR_TOML).map_err(|e| format!("data/fhir.toml: {}", e.message()))?;
    let structure = Structure::parse(STRUCTURE_JSON, &fhir.constraint)
        .map_err(|e| format!("data/fhir-r4-structure.json: {e}"))?;
    let synthea: Synthea =
        toml::from_str(SYNTHEA_TOML).map_err(|e| format!("data/synthea.toml: {}", e.message()))?;
    let hl7: Hl7Tables =
        toml::from_str(HL7_TOML).map_err(|e| format!("data/hl7v2.toml: {}", e.message()))?;
    for name in fhir.types.keys() {
        if super::canonical_type(name).is_none() {
            return Err(format!("data/fhir.toml: {name} is not a canonical type"));
        }
    }
    for name in super::ResourceType::ALL.iter().map(|t| t.fhir_name()) {
        if !fhir.types.contains_key(name) {
            return Err(format!("data/fhir.toml: no rules for {name}"));
        }
        if !structure.has(name) {
            return Err(format!("data/fhir-r4-structure.json: no {name}"));
        }
    }
    for record in &synthea.record {
        if super::canonical_type(&record.resource_type).is_none() {
            return Err(format!(
                "data/synthea.toml: record {} maps to a non-canonical type",
                record.record_type
            ));
        }
        for rule in &record.element {
            if let ElementRule::Lookup { table, .. } = rule {
                if !synthea.tables.contains_key(table) {
                    return Err(format!("data/synthea.toml: no table {table}"));
                }
            }
        }
    }
    Ok(Tables {
        fhir,
        structure,
        synthea,
        hl7,
    })
}

// ---------------------------------------------------------------------------------------------
// data/fhir.toml
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FhirRules {
    pub types: BTreeMap<String, TypeRules>,
    /// `Type.path` (or `*.path`) → the one canonical type that element can reference.
    pub reference_targets: BTreeMap<String, String>,
    pub constraint: Vec<Constraint>,
}

impl FhirRules {
    /// The only type a reference at `path` (dotted, from the resource root) can point at.
    pub fn reference_target(&self, resource_type: &str, path: &str) -> Option<&str> {
        self.reference_targets
            .get(&format!("{resource_type}.{path}"))
            .or_else(|| self.reference_targets.get(&format!("*.{path}")))
            .map(String::as_str)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TypeRules {
    /// The element referencing the record's patient (`subject` or `patient`).
    pub patient: Option<String>,
    /// Element path (`status`, `reaction.severity`) → codes of its required value set.
    #[serde(default)]
    pub codes: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub defaults: BTreeMap<String, Value>,
    #[serde(default)]
    pub choices: Vec<Choice>,
    #[serde(default)]
    pub required_without_unknown: Vec<String>,
    /// Elements of type instant (see data/fhir.toml).
    #[serde(default)]
    pub instants: Vec<String>,
    #[serde(default)]
    pub instant_fallback: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Choice {
    pub variants: Vec<String>,
    pub default_variant: String,
    pub default: Value,
}

/// Children an element needs beyond the schema's required ones (data/fhir.toml).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Constraint {
    /// A definition of data/fhir-r4-structure.json, e.g. `Annotation`, `Patient_Contact`.
    pub definition: String,
    #[serde(default)]
    pub all_of: Vec<String>,
    #[serde(default)]
    pub any_of: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// data/synthea.toml
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Synthea {
    pub version: String,
    pub code_systems: BTreeMap<String, String>,
    pub tables: BTreeMap<String, BTreeMap<String, Value>>,
    pub record: Vec<CsvRecord>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CsvRecord {
    pub record_type: String,
    pub resource_type: String,
    pub id_column: Option<String>,
    #[serde(default)]
    pub identity: Vec<String>,
    #[serde(default)]
    pub fixed: serde_json::Map<String, Value>,
    #[serde(default)]
    pub element: Vec<ElementRule>,
}

/// One column → element rule; the kinds are described in data/synthea.toml.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) enum ElementRule {
    Text {
        element: String,
        column: String,
    },
    Date {
        element: String,
        column: String,
    },
    DateTime {
        element: String,
        column: String,
        choice: Option<String>,
    },
    Period {
        element: String,
        start: String,
        end: String,
        choice: Option<String>,
    },
    Concept {
        element: String,
        code: String,
        display: Option<String>,
        system: String,
        system_column: Option<String>,
        #[serde(default)]
        array: bool,
        choice: Option<String>,
    },
    Code {
        element: String,
        column: String,
        allowed: Vec<String>,
        #[serde(default)]
        array: bool,
    },
    Lookup {
        element: String,
        column: String,
        table: String,
        #[serde(default)]
        append: bool,
    },
    IfPresent {
        element: String,
        column: String,
        then: Value,
        otherwise: Value,
    },
    Encounter {
        element: String,
        column: String,
    },
    ObservationValue {
        column: String,
        units: String,
        type_column: String,
    },
    Reaction {
        code: String,
        display: String,
        severity: String,
        system: String,
    },
    Address {
        state: String,
        postal_code: String,
    },
}

// ---------------------------------------------------------------------------------------------
// data/hl7v2.toml
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Hl7Tables {
    pub version: String,
    pub adt_events: Vec<String>,
    pub hospital_services: Vec<String>,
    pub coding_systems: BTreeMap<String, String>,
    pub local_system: String,
    pub local_names: Vec<String>,
    pub local_prefix: String,
    pub value_types: BTreeMap<String, ValueKind>,
    pub sn_comparators: BTreeMap<String, String>,
    pub observation_status: BTreeMap<String, String>,
    pub report_status: BTreeMap<String, String>,
    pub patient_class: BTreeMap<String, Value>,
    pub class_status: BTreeMap<String, String>,
    pub gender: BTreeMap<String, String>,
    pub marital_status: BTreeMap<String, Value>,
    pub abnormal_flags: BTreeMap<String, String>,
}

/// How an OBX-5 of a value type becomes `Observation.value[x]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum ValueKind {
    Quantity,
    StructuredNumeric,
    Range,
    String,
    Concept,
    DateTime,
    Time,
    CodeString,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_load_and_cover_every_canonical_type() {
        let tables = load().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tables.fhir.types.len(), 9);
        assert_eq!(tables.synthea.record.len(), 8);
        assert!(!tables.synthea.version.is_empty());
        assert!(!tables.hl7.version.is_empty());
        // Every status a table produces is in the R4 value set the finish step enforces.
        let allowed = |t: &str| tables.structure.enum_codes(t, "status").unwrap_or_default();
        for status in tables.hl7.observation_status.values() {
            assert!(allowed("Observation").contains(status), "{status}");
        }
        for status in tables.hl7.report_status.values() {
            assert!(allowed("DiagnosticReport").contains(status), "{status}");
        }
        for status in tables.hl7.class_status.values() {
            assert!(allowed("Encounter").contains(status), "{status}");
        }
        let genders = tables
            .structure
            .enum_codes("Patient", "gender")
            .unwrap_or_default();
        for gender in tables.hl7.gender.values() {
            assert!(genders.contains(gender));
        }
    }
}
