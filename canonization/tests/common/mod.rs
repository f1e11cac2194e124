//! Shared test setup: golden cases, realistic inputs made by the real ingestion parsers and
//! the real de-identification engine, and a structural R4 check of mapped resources.
//!
//! Inputs are produced exactly like in the pipeline: a source file under
//! `fixtures/canonical/sources/` (or an ingestion fixture) is parsed by ingestion, one
//! record is de-identified by the anonymization engine with the shipped Safe Harbor policy
//! and the anonymization goldens' setup (pseudonym key of 32 bytes 0x22, tenant
//! `tenant-a`, reference date 2026-01-01), and becomes a golden input. All data is
//! synthetic.

#![allow(dead_code)] // each test crate uses a different subset
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::fs;
use std::io::{BufReader, Cursor};
use std::path::{Path, PathBuf};

use anonymization::engine::{Context, Engine, Keys};
use anonymization::policy::{DateMode, Policy};
use anonymization::scrub::Known;
use canonization::mapping::{Input, ResourceType};
use chrono::NaiveDate;
use ingestion::formats::{self, csv::CsvOptions, Item, ParsedRecord};
use pipeline::crypto::{KeyRef, Secret};
use serde_json::{json, Value};

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/canonical")
}

/// ingestion's own fixtures, beside this crate in the workspace.
pub fn ingestion_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ingestion/fixtures")
}

pub fn updating() -> bool {
    std::env::var_os("UPDATE_GOLDEN").is_some()
}

#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// A Synthea CSV file under sources/ (its name selects the layout, as in ingestion).
    Csv(&'static str),
    Ndjson(&'static str),
    Bundle(&'static str),
    Hl7(&'static str),
    /// An HL7 file of ingestion's fixtures (public sample messages).
    IngestionHl7(&'static str),
}

#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub name: &'static str,
    pub source: Source,
    /// 1-based position of the record in its file.
    pub position: u64,
    /// De-identify in date-shift mode (full dates survive, shifted).
    pub shift: bool,
}

const fn case(name: &'static str, source: Source, position: u64) -> Case {
    Case {
        name,
        source,
        position,
        shift: false,
    }
}

pub const CASES: [Case; 38] = [
    case("fhir-patient", Source::Ndjson("fhir/patient.ndjson"), 1),
    case(
        "fhir-observation",
        Source::Ndjson("fhir/observations.ndjson"),
        1,
    ),
    case(
        "fhir-observation-age",
        Source::Ndjson("fhir/observations.ndjson"),
        2,
    ),
    Case {
        name: "fhir-observation-shift",
        source: Source::Ndjson("fhir/observations.ndjson"),
        position: 1,
        shift: true,
    },
    case("fhir-bundle-patient", Source::Bundle("fhir/bundle.json"), 1),
    case(
        "fhir-bundle-encounter",
        Source::Bundle("fhir/bundle.json"),
        2,
    ),
    case(
        "fhir-bundle-observation",
        Source::Bundle("fhir/bundle.json"),
        3,
    ),
    case(
        "fhir-bundle-coverage",
        Source::Bundle("fhir/bundle.json"),
        4,
    ),
    // Shared resources (Synthea's providers Bundle, a Medication, a Device).
    case(
        "fhir-organization",
        Source::Bundle("fhir/providers.json"),
        1,
    ),
    case("fhir-location", Source::Bundle("fhir/providers.json"), 2),
    case(
        "fhir-practitioner",
        Source::Bundle("fhir/providers.json"),
        3,
    ),
    case(
        "fhir-practitioner-role",
        Source::Bundle("fhir/providers.json"),
        4,
    ),
    case("fhir-medication", Source::Bundle("fhir/providers.json"), 5),
    case("fhir-device", Source::Bundle("fhir/providers.json"), 6),
    case("csv-patient", Source::Csv("synthea/patients.csv"), 1),
    case("csv-encounter", Source::Csv("synthea/encounters.csv"), 1),
    case(
        "csv-observation",
        Source::Csv("synthea/observations.csv"),
        1,
    ),
    case(
        "csv-observation-text",
        Source::Csv("synthea/observations.csv"),
        2,
    ),
    case("csv-condition", Source::Csv("synthea/conditions.csv"), 1),
    case("csv-medication", Source::Csv("synthea/medications.csv"), 1),
    case("csv-procedure", Source::Csv("synthea/procedures.csv"), 1),
    case(
        "csv-immunization",
        Source::Csv("synthea/immunizations.csv"),
        1,
    ),
    case("csv-allergy", Source::Csv("synthea/allergies.csv"), 1),
    case("hl7-adt-a01", Source::Hl7("hl7/adt_a01.hl7"), 1),
    case("hl7-oru-r01", Source::Hl7("hl7/oru_r01.hl7"), 1),
    case(
        "hl7-sample-adt-a01",
        Source::IngestionHl7("sample_adt_a01.hl7"),
        1,
    ),
    case(
        "hl7-sample-adt-a08",
        Source::IngestionHl7("sample_adt_a08.hl7"),
        1,
    ),
    case(
        "hl7-sample-oru-r01-lab",
        Source::IngestionHl7("sample_oru_r01_lab.hl7"),
        1,
    ),
    case(
        "hl7-sample-oru-r01-generic",
        Source::IngestionHl7("sample_oru_r01_generic.hl7"),
        1,
    ),
    case(
        "csv-ingestion-observation",
        Source::Csv("INGESTION:csv/observations.csv"),
        1,
    ),
    // What the reference validator checks beyond the structure (src/mapping/invariants.rs).
    case(
        "fhir-allergy-no-status",
        Source::Ndjson("fhir/conformance.ndjson"),
        1,
    ),
    case(
        "fhir-condition-abated-active",
        Source::Ndjson("fhir/conformance.ndjson"),
        2,
    ),
    case(
        "fhir-condition-abated-no-status",
        Source::Ndjson("fhir/conformance.ndjson"),
        3,
    ),
    case(
        "fhir-medication-request-timing",
        Source::Ndjson("fhir/conformance.ndjson"),
        4,
    ),
    case(
        "fhir-observation-component-absent",
        Source::Ndjson("fhir/conformance.ndjson"),
        5,
    ),
    case(
        "fhir-observation-string",
        Source::Ndjson("fhir/conformance.ndjson"),
        6,
    ),
    case(
        "fhir-patient-marital-status",
        Source::Ndjson("fhir/conformance.ndjson"),
        7,
    ),
    case(
        "hl7-oru-r01-sections",
        Source::Hl7("hl7/oru_r01_sections.hl7"),
        1,
    ),
];

pub fn find_case(name: &str) -> Case {
    CASES
        .iter()
        .copied()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no golden case {name}"))
}

/// The de-identification engine of the anonymization goldens.
pub fn engine(shift: bool) -> Engine {
    let mut policy = Policy::safe_harbor();
    if shift {
        policy.settings.dates = DateMode::Shift;
    }
    let key = |id: &str, byte: u8| KeyRef {
        id: id.to_owned(),
        key: Secret::new([byte; 32]),
    };
    Engine::new(
        policy,
        Keys {
            pseudonym: key("pseudonym-test", 0x22),
            reidentify: Some(key("reid-test", 0x33)),
        },
        Context {
            tenant: "tenant-a".to_owned(),
            reference_date: NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
        },
    )
    .unwrap()
}

/// Parses a source file with ingestion's parser: (source_format, records).
pub fn parse(source: Source) -> (&'static str, Vec<ParsedRecord>) {
    let read = |p: PathBuf| fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let (format, items) = match source {
        Source::Csv(path) => {
            let (bytes, name) = match path.strip_prefix("INGESTION:") {
                Some(p) => (read(ingestion_fixtures().join(p)), p),
                None => (read(fixtures_dir().join("sources").join(path)), path),
            };
            let file_name = Path::new(name).file_name().unwrap().to_str().unwrap();
            let items = formats::collect(|sink| {
                formats::csv::parse(bytes.as_slice(), file_name, &CsvOptions::default(), sink)
            });
            ("csv", items)
        }
        Source::Ndjson(path) => {
            let bytes = read(fixtures_dir().join("sources").join(path));
            let items = formats::collect(|sink| {
                formats::fhir::parse_ndjson(BufReader::new(Cursor::new(bytes)), sink)
            });
            ("fhir-ndjson", items)
        }
        Source::Bundle(path) => {
            let bytes = read(fixtures_dir().join("sources").join(path));
            let items =
                formats::collect(|sink| formats::fhir::parse_bundle(bytes.as_slice(), sink));
            ("fhir-bundle", items)
        }
        Source::Hl7(path) | Source::IngestionHl7(path) => {
            let file = match source {
                Source::Hl7(_) => fixtures_dir().join("sources").join(path),
                _ => ingestion_fixtures().join("hl7").join(path),
            };
            let bytes = read(file);
            let items = formats::collect(|sink| {
                formats::hl7::parse(BufReader::new(Cursor::new(bytes)), sink)
            });
            ("hl7v2", items)
        }
    };
    let records = items
        .unwrap_or_else(|e| panic!("{source:?}: {e}"))
        .into_iter()
        .map(|item| match item {
            Item::Record(r) => r,
            Item::Rejected(r) => panic!("{source:?}: rejected: {}", r.reason),
        })
        .collect();
    (format, records)
}

/// The golden input of a case: one record, parsed and de-identified, as `RecordAnonymized`
/// carries it.
pub fn generate(case: Case) -> Value {
    let (format, records) = parse(case.source);
    let record = records
        .iter()
        .find(|r| r.position == case.position)
        .unwrap_or_else(|| panic!("{}: no record at position {}", case.name, case.position));
    deidentify(format, record, case.shift).unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

/// A parsed record, de-identified as a golden input (`RecordAnonymized`'s fields), or why
/// the engine refuses it.
pub fn deidentify(format: &str, record: &ParsedRecord, shift: bool) -> Result<Value, String> {
    let out = engine(shift)
        .anonymize(format, &record.record_type, &record.body, &Known::default())
        .map_err(|e| e.to_string())?;
    Ok(json!({
        "source_format": format,
        "record_type": record.record_type,
        "patient_pseudonym": out.patient_pseudonym,
        "batch_id": "golden",
        "position": record.position,
        "content": out.content,
    }))
}

/// All records of a source, de-identified, as golden-style inputs.
pub fn generate_all(source: Source) -> Vec<Value> {
    let (_, records) = parse(source);
    records
        .iter()
        .map(|r| {
            generate(Case {
                name: "all",
                source,
                position: r.position,
                shift: false,
            })
        })
        .collect()
}

pub fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn write_json(path: &Path, value: &Value) {
    let mut text = serde_json::to_string_pretty(value).unwrap();
    text.push('\n');
    fs::write(path, text).unwrap();
}

/// The fields of a golden input, owned, lending an [`Input`].
pub struct Owned {
    pub source_format: String,
    pub record_type: String,
    pub patient_pseudonym: String,
    pub batch_id: String,
    pub position: i64,
    pub content: Value,
}

impl Owned {
    pub fn from_json(v: &Value) -> Owned {
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        Owned {
            source_format: s("source_format"),
            record_type: s("record_type"),
            patient_pseudonym: s("patient_pseudonym"),
            batch_id: s("batch_id"),
            position: v["position"].as_i64().unwrap_or_default(),
            content: v["content"].clone(),
        }
    }

    pub fn input(&self) -> Input<'_> {
        Input {
            source_format: &self.source_format,
            record_type: &self.record_type,
            patient_pseudonym: &self.patient_pseudonym,
            content: &self.content,
            batch_id: &self.batch_id,
            position: self.position,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A structural R4 check: what the FHIR JSON schema and the R4 cardinalities demand of the
// nine types, kept small and independent of the mapping code.
// ---------------------------------------------------------------------------------------------

/// Required elements per type; `x*` means one variant of choice `x[x]` (or its `_x` form).
const REQUIRED: [(&str, &[&str]); 15] = [
    ("Patient", &[]),
    ("Encounter", &["status", "class"]),
    ("Observation", &["status", "code"]),
    ("Condition", &["subject"]),
    (
        "MedicationRequest",
        &["status", "intent", "medication*", "subject"],
    ),
    ("Procedure", &["status", "subject"]),
    ("DiagnosticReport", &["status", "code"]),
    ("AllergyIntolerance", &["patient"]),
    (
        "Immunization",
        &["status", "vaccineCode", "patient", "occurrence*"],
    ),
    // R4 requires no element of the shared types.
    ("Practitioner", &[]),
    ("PractitionerRole", &[]),
    ("Organization", &[]),
    ("Location", &[]),
    ("Medication", &[]),
    ("Device", &[]),
];

/// Panics with a path when `resource` breaks a structural R4 rule.
pub fn assert_valid_r4(resource_type: &str, resource: &Value, context: &str) {
    assert!(
        ResourceType::parse(resource_type).is_some(),
        "{context}: type"
    );
    assert_eq!(resource["resourceType"], resource_type, "{context}");
    let id = resource["id"].as_str().unwrap_or_default();
    assert!(
        !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'),
        "{context}: id"
    );
    let (_, required) = REQUIRED.iter().find(|(t, _)| *t == resource_type).unwrap();
    for element in *required {
        let present = match element.strip_suffix('*') {
            Some(prefix) => resource
                .as_object()
                .unwrap()
                .keys()
                .any(|k| k.trim_start_matches('_').starts_with(prefix)),
            None => resource.get(*element).is_some(),
        };
        assert!(present, "{context}: {resource_type}.{element} is required");
    }
    walk(resource, "", context);
}

fn walk(v: &Value, path: &str, context: &str) {
    match v {
        Value::Null => panic!("{context}: null at {path}"),
        Value::String(s) => assert!(!s.trim().is_empty(), "{context}: empty string at {path}"),
        Value::Array(items) => {
            assert!(!items.is_empty(), "{context}: empty list at {path}");
            for (i, item) in items.iter().enumerate() {
                walk(item, &format!("{path}[{i}]"), context);
            }
        }
        Value::Object(map) => {
            assert!(!map.is_empty(), "{context}: empty object at {path}");
            if let Some(r) = map.get("reference") {
                let r = r.as_str().unwrap_or_default();
                let (kind, id) = r.split_once('/').unwrap_or(("", ""));
                assert!(
                    ResourceType::parse(kind).is_some() && id.len() == 36,
                    "{context}: reference at {path} is not canonical"
                );
            }
            if map.contains_key("code") && map.contains_key("value") && !map.contains_key("system")
            {
                panic!("{context}: quantity code without system at {path}");
            }
            if let Some(value) = map.get("value") {
                if path.ends_with("Quantity") || path.ends_with(".low") || path.ends_with(".high") {
                    assert!(value.is_number(), "{context}: quantity value at {path}");
                }
            }
            for (k, child) in map {
                let date_like = !k.starts_with('_') && k.ends_with("DateTime")
                    || matches!(
                        k.as_str(),
                        "start" | "end" | "birthDate" | "authoredOn" | "recordedDate" | "issued"
                    );
                if date_like {
                    let s = child.as_str().unwrap_or_default();
                    assert!(
                        s.len() >= 4 && s[..4].bytes().all(|b| b.is_ascii_digit()),
                        "{context}: date at {path}.{k}"
                    );
                    if s.contains('T') {
                        assert!(
                            s.ends_with('Z') || s[s.len() - 6..].starts_with(['+', '-']),
                            "{context}: dateTime without zone at {path}.{k}"
                        );
                    }
                }
                walk(child, &format!("{path}.{k}"), context);
            }
        }
        Value::Bool(_) | Value::Number(_) => {}
    }
}
