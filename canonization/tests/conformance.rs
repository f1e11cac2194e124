//! Conformance with the reference FHIR validator: every canonical resource the mapping makes
//! of the repository's test inputs passes HAPI FHIR's offline instance validator
//! (`scripts/fhir-validate.sh`, tools/fhir-validator) with no error, and the check is shown
//! to fail on a resource that breaks an R4 invariant.
//!
//! The inputs are every record of every source file the tests use, without a broker: the
//! golden sources (`fixtures/canonical/sources`), ingestion's fixtures and `samples/` (the
//! end-to-end inputs), each parsed by ingestion, de-identified by the anonymization engine
//! and mapped, exactly like the golden tests do; plus the golden cases themselves (one is
//! de-identified in date-shift mode). `MEDPIPE_CONFORMANCE_DIR=<dir>` keeps the resources
//! and the validator's report there, to read or to validate again by hand.
//!
//! Needs Java 17+ and Maven; the first run builds the validator, resolving HAPI FHIR from
//! Maven Central (see scripts/fhir-validate.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufReader, Cursor};
use std::path::{Path, PathBuf};
use std::process::Command;

use canonization::mapping::{map_record, Tables};
use ingestion::formats::{self, csv::CsvOptions, Item, ParsedRecord};
use serde_json::{json, Value};

use common::{deidentify, fixtures_dir, generate, read_json, write_json, Owned, CASES};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tables() -> &'static Tables {
    Tables::embedded().unwrap_or_else(|e| panic!("{e}"))
}

/// Directories whose source files (CSV, NDJSON, Bundles, HL7 v2) make the corpus.
const SOURCE_DIRS: [&str; 3] = [
    "canonization/fixtures/canonical/sources",
    "ingestion/fixtures",
    "samples",
];

/// The CSV layouts of `samples/` (lab exports that are not Synthea's).
fn csv_options() -> CsvOptions {
    let text = fs::read_to_string(workspace().join("samples/csv-layouts.toml")).unwrap();
    toml::from_str(&text).unwrap()
}

fn source_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("csv" | "ndjson" | "json" | "hl7")
            ) {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    for dir in SOURCE_DIRS {
        walk(&workspace().join(dir), &mut files);
    }
    files.sort();
    files
}

/// A source file's records as ingestion parses them, with its source format; `None` for a
/// JSON file that is not a Bundle. Records ingestion rejects are not canonical input.
fn parse(path: &Path) -> Option<(&'static str, Vec<ParsedRecord>)> {
    let bytes = fs::read(path).unwrap();
    let name = path.file_name().unwrap().to_str().unwrap();
    let (format, items) = match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => (
            "csv",
            formats::collect(|sink| {
                formats::csv::parse(bytes.as_slice(), name, &csv_options(), sink)
            }),
        ),
        Some("ndjson") => (
            "fhir-ndjson",
            formats::collect(|sink| {
                formats::fhir::parse_ndjson(BufReader::new(Cursor::new(bytes.clone())), sink)
            }),
        ),
        Some("hl7") => (
            "hl7v2",
            formats::collect(|sink| {
                formats::hl7::parse(BufReader::new(Cursor::new(bytes.clone())), sink)
            }),
        ),
        _ => {
            let v: Value = serde_json::from_slice(&bytes).ok()?;
            if v["resourceType"] != "Bundle" {
                return None;
            }
            (
                "fhir-bundle",
                formats::collect(|sink| formats::fhir::parse_bundle(bytes.as_slice(), sink)),
            )
        }
    };
    let records = items
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .filter_map(|item| match item {
            Item::Record(r) => Some(r),
            Item::Rejected(_) => None,
        })
        .collect();
    Some((format, records))
}

/// What the corpus holds: resources by file name, and the records that were dead-lettered.
struct Corpus {
    resources: BTreeMap<String, Value>,
    dead_letters: BTreeMap<String, usize>,
}

impl Corpus {
    fn add(&mut self, origin: &str, input: &Value) {
        let owned = Owned::from_json(input);
        match map_record(tables(), &owned.input()) {
            Ok(mapped) => {
                for (i, m) in mapped.iter().enumerate() {
                    let name = format!("{origin}-{i}-{}.json", m.resource_type.fhir_name());
                    self.resources.insert(name, m.resource.clone());
                }
            }
            Err(e) => {
                *self
                    .dead_letters
                    .entry(e.error_type().to_owned())
                    .or_default() += 1
            }
        }
    }
}

/// Every canonical resource of the corpus (the same resource reached twice is kept once).
fn corpus() -> Corpus {
    let mut corpus = Corpus {
        resources: BTreeMap::new(),
        dead_letters: BTreeMap::new(),
    };
    for path in source_files() {
        let Some((format, records)) = parse(&path) else {
            continue;
        };
        let relative = path.strip_prefix(workspace()).unwrap_or(&path);
        let origin = relative.to_string_lossy().replace(['/', '.'], "_");
        for record in &records {
            if let Ok(input) = deidentify(format, record, false) {
                corpus.add(&format!("{origin}-{}", record.position), &input);
            }
        }
    }
    for case in CASES {
        corpus.add(&format!("golden-{}", case.name), &generate(case));
    }
    let mut seen = BTreeSet::new();
    corpus
        .resources
        .retain(|_, r| seen.insert(serde_json::to_string(r).unwrap()));
    corpus
}

/// A directory to write resources into: `MEDPIPE_CONFORMANCE_DIR/<name>` when set (kept),
/// else a temporary one.
fn out_dir(name: &str) -> (PathBuf, Option<tempfile::TempDir>) {
    match std::env::var_os("MEDPIPE_CONFORMANCE_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir).join(name);
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("resources")).unwrap();
            (dir, None)
        }
        None => {
            let tmp = tempfile::tempdir().unwrap();
            fs::create_dir_all(tmp.path().join("resources")).unwrap();
            (tmp.path().to_owned(), Some(tmp))
        }
    }
}

/// Runs scripts/fhir-validate.sh over `dir/resources` (its summary goes to this test's
/// stderr); returns whether it passed and its JSON report.
fn validate(dir: &Path) -> (bool, Value) {
    let report = dir.join("report.json");
    let status = Command::new(workspace().join("scripts/fhir-validate.sh"))
        .arg("--report")
        .arg(&report)
        .arg(dir.join("resources"))
        .status()
        .unwrap_or_else(|e| panic!("scripts/fhir-validate.sh: {e}"));
    assert!(
        matches!(status.code(), Some(0 | 1)),
        "scripts/fhir-validate.sh could not validate ({status}); see its output above"
    );
    (status.success(), read_json(&report))
}

/// Every message of a class in a report, as `Type/id at location: message [id]` lines.
fn messages(report: &Value, class: &str) -> Vec<String> {
    let mut out = Vec::new();
    for r in report["resources"].as_array().unwrap() {
        for m in r["messages"].as_array().unwrap() {
            if m["class"] == class {
                out.push(format!(
                    "{}/{} ({}) at {}: {} [{}]",
                    r["resourceType"].as_str().unwrap(),
                    r["id"].as_str().unwrap(),
                    r["file"].as_str().unwrap(),
                    m["location"].as_str().unwrap(),
                    m["message"].as_str().unwrap(),
                    m["messageId"].as_str().unwrap()
                ));
            }
        }
    }
    out
}

#[test]
fn the_reference_validator_accepts_every_canonical_resource() {
    let corpus = corpus();
    let (dir, _keep) = out_dir("corpus");
    for (name, resource) in &corpus.resources {
        write_json(&dir.join("resources").join(name), resource);
    }
    eprintln!(
        "Conformance corpus: {} canonical resources; dead-lettered records by reason: {:?}",
        corpus.resources.len(),
        corpus.dead_letters
    );
    let (passed, report) = validate(&dir);
    let summary = &report["summary"];
    assert_eq!(
        summary["resources"],
        corpus.resources.len(),
        "every resource"
    );
    eprintln!(
        "Reference validator: {} errors, {} warnings {}, {} terminology not checkable offline",
        summary["errors"],
        summary["warnings"],
        summary["warningsByKind"],
        summary["offlineTerminology"]
    );
    let errors = messages(&report, "error");
    assert!(
        passed && errors.is_empty(),
        "the reference validator reports errors:\n{}",
        errors.join("\n")
    );
}

/// The check fails on an invariant broken (ait-1: a canonical AllergyIntolerance without
/// clinicalStatus), and it does not fail on a code that is only uncheckable offline.
#[test]
fn the_reference_validator_catches_a_broken_invariant() {
    let golden = read_json(&fixtures_dir().join("csv-allergy.out.json"));
    let mut allergy = golden["resources"][0]["resource"].clone();
    let fields = allergy.as_object_mut().unwrap();
    assert!(fields.remove("clinicalStatus").is_some());
    fields.remove("verificationStatus");
    let loinc_only = json!({
        "resourceType": "Observation",
        "id": "loinc-only",
        "status": "final",
        "code": { "coding": [{ "system": "http://loinc.org", "code": "2345-7" }] },
        "valueQuantity": { "value": 90, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL" }
    });
    let (dir, _keep) = out_dir("known-bad");
    write_json(
        &dir.join("resources/allergy-without-clinical-status.json"),
        &allergy,
    );
    write_json(&dir.join("resources/observation-loinc.json"), &loinc_only);

    let (passed, report) = validate(&dir);
    assert!(!passed, "the validator must fail on a broken invariant");
    let errors = messages(&report, "error");
    assert!(
        errors.iter().all(|e| e.starts_with("AllergyIntolerance/"))
            && errors.iter().any(|e| e.contains("ait-1")),
        "expected ait-1 on the AllergyIntolerance only, got:\n{}",
        errors.join("\n")
    );
    let offline = messages(&report, "offline-terminology");
    assert!(
        offline
            .iter()
            .any(|m| m.starts_with("Observation/loinc-only")),
        "a LOINC code is terminology not checkable offline: {offline:?}"
    );
}
