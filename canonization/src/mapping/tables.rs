//! The mapping's data tables (`data/*.toml` and the R4 structure), compiled in, or read
//! from a directory that overrides them file by file.
//!
//! They are data rather than code so that a terminologist can review and extend them
//! (a new encounter class, an HL7 status code) without reading the mappers. They are
//! loaded and cross-checked when the stage starts: a broken table stops it with an error
//! naming the file (and line), rather than dead-lettering every record.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde::Deserialize;
use serde_json::Value;

use super::structure::Structure;
use std::path::Path;

/// The four table files, by name, with their built-in text.
const FILES: [(&str, &str); 4] = [
    ("fhir.toml", include_str!("../../data/fhir.toml")),
    (
        "fhir-r4-structure.json",
        include_str!("../../data/fhir-r4-structure.json"),
    ),
    ("synthea.toml", include_str!("../../data/synthea.toml")),
    ("hl7v2.toml", include_str!("../../data/hl7v2.toml")),
];

/// The mapping's tables, loaded and cross-checked as a whole.
#[derive(Debug)]
pub struct Tables {
    pub(crate) fhir: FhirRules,
    pub(crate) structure: Structure,
    pub(crate) synthea: Synthea,
    pub(crate) hl7: Hl7Tables,
}

/// A table that does not load: the file, and what is wrong (with its line and column
/// where the parser gives them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mapping table {file}: {message}")]
pub struct TablesError {
    pub file: String,
    pub message: String,
}

impl Tables {
    /// The built-in tables, parsed once. A failure is a build defect (the unit test below
    /// catches it); the stage reports it at start.
    pub fn embedded() -> Result<&'static Tables, TablesError> {
        static TABLES: LazyLock<Result<Tables, TablesError>> = LazyLock::new(|| Tables::load(None));
        TABLES.as_ref().map_err(Clone::clone)
    }

    /// The tables, each file taken from `dir` where it holds one (so a terminologist can
    /// try a changed table without a rebuild), else built in. Everything is validated here,
    /// so a broken table stops the stage at start instead of failing every record.
    pub fn load(dir: Option<&Path>) -> Result<Tables, TablesError> {
        let mut texts = Vec::with_capacity(FILES.len());
        for (name, builtin) in FILES {
            let path = dir.map(|d| d.join(name)).filter(|p| p.exists());
            texts.push(match path {
                Some(path) => {
                    let file = path.display().to_string();
                    let text = std::fs::read_to_string(&path).map_err(|e| TablesError {
                        file: file.clone(),
                        message: e.to_string(),
                    })?;
                    (file, std::borrow::Cow::Owned(text))
                }
                None => (
                    format!("canonization/data/{name} (built in)"),
                    std::borrow::Cow::Borrowed(builtin),
                ),
            });
        }
        let [fhir, structure, synthea, hl7] = &texts[..] else {
            unreachable!("FILES has four entries")
        };
        let err = |file: &String, message: String| TablesError {
            file: file.clone(),
            message,
        };
        let toml_err =
            |file: &String, e: toml::de::Error| err(file, e.to_string().trim().to_owned());
        let fhir_rules: FhirRules = toml::from_str(&fhir.1).map_err(|e| toml_err(&fhir.0, e))?;
        let structure_t = Structure::parse(&structure.1, &fhir_rules.constraint)
            .map_err(|e| err(&structure.0, e.to_string()))?;
        let synthea_t: Synthea = toml::from_str(&synthea.1).map_err(|e| toml_err(&synthea.0, e))?;
        let hl7_t: Hl7Tables = toml::from_str(&hl7.1).map_err(|e| toml_err(&hl7.0, e))?;
        for name in fhir_rules.types.keys() {
            if super::canonical_type(name).is_none() {
                return Err(err(&fhir.0, format!("{name} is not a canonical type")));
            }
        }
        for name in super::ResourceType::ALL.iter().map(|t| t.fhir_name()) {
            if !fhir_rules.types.contains_key(name) {
                return Err(err(&fhir.0, format!("no rules for {name}")));
            }
            if !structure_t.has(name) {
                return Err(err(&structure.0, format!("no {name}")));
            }
        }
        for record in &synthea_t.record {
            if super::canonical_type(&record.resource_type).is_none() {
                return Err(err(
                    &synthea.0,
                    format!("record {} maps to a non-canonical type", record.record_type),
                ));
            }
            for rule in &record.element {
                if let ElementRule::Lookup { table, .. } = rule {
                    if !synthea_t.tables.contains_key(table) {
                        return Err(err(&synthea.0, format!("no table {table}")));
                    }
                }
            }
        }
        Ok(Tables {
            fhir: fhir_rules,
            structure: structure_t,
            synthea: synthea_t,
            hl7: hl7_t,
        })
    }

    /// Where a resource type keeps its main CodeableConcept (`data/fhir.toml`).
    pub fn code_element(&self, resource_type: super::ResourceType) -> Option<&str> {
        self.fhir
            .types
            .get(resource_type.fhir_name())
            .and_then(|t| t.code.as_deref())
    }

    /// The version of the code-mapping tables, e.g. `synthea-3+hl7v2-2`.
    pub fn version(&self) -> String {
        format!(
            "synthea-{}+hl7v2-{}",
            self.synthea.version, self.hl7.version
        )
    }
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
    pub terminology: Terminology,
    pub constraint: Vec<Constraint>,
}

/// Code systems under other names, and the data-absent-reason codes (data/fhir.toml).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Terminology {
    pub system_prefixes: BTreeMap<String, String>,
    pub systems: BTreeMap<String, String>,
    pub data_absent_reasons: Vec<String>,
}

impl Terminology {
    /// The R4 name of a code system URI, when it has another.
    pub fn system(&self, uri: &str) -> Option<String> {
        if let Some(r4) = self.systems.get(uri) {
            return Some(r4.clone());
        }
        self.system_prefixes.iter().find_map(|(old, new)| {
            uri.strip_prefix(old.as_str())
                .map(|rest| format!("{new}{rest}"))
        })
    }
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
    /// The element holding the type's main CodeableConcept, if it has one.
    pub code: Option<String>,
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
    pub diagnostic_service_sections: Vec<String>,
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
        let tables = Tables::load(None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            tables.fhir.types.len(),
            super::super::ResourceType::ALL.len()
        );
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

    #[test]
    fn a_broken_table_in_the_override_directory_is_named_with_its_line() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let broken = dir.path().join("synthea.toml");
        std::fs::write(&broken, "version = \"9\"\n[[record]]\nrecord_type = \n")
            .unwrap_or_else(|e| panic!("{e}"));
        let err = Tables::load(Some(dir.path())).expect_err("a broken table must not load");
        assert_eq!(err.file, broken.display().to_string());
        assert!(err.message.contains("line 3"), "{}", err.message);
        // The files the directory does not hold stay built in.
        std::fs::remove_file(&broken).unwrap_or_else(|e| panic!("{e}"));
        assert!(Tables::load(Some(dir.path())).is_ok());
    }
}
