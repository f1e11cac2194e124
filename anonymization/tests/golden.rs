//! Golden tests: every `fixtures/NAME.in.json` is de-identified with fixed keys and reference
//! date and compared with `fixtures/NAME.out.json`; the per-category test proves each of the
//! 18 Safe Harbor identifier kinds removed by a rule of that category.
//!
//! Input fixture: `{source_format, record_type, body: {patient_link, content, original},
//! dates?, extra_known?: {names, identifiers}, scrubbed?: [JSON pointers into the output
//! content], must_not_contain: [values]}`. Output fixture: `{patient_pseudonym, content,
//! report}`. Values produced by the free-text scrubber (still a stub) are masked as
//! `"<scrubbed>"` after checking that no known identifier survived, and the report's
//! `scrubbed` counts as `"<scrubber>"`, so these goldens stay valid when the real scrubber
//! lands. Run with `UPDATE_GOLDEN=1` to rewrite the outputs (then review the diff!).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use common::{anonymize_fixture, fixtures_dir, Fixture};

const HASH_MASK: &str = "<policy-hash>";
const SCRUBBED_MASK: &str = "<scrubbed>";
const SCRUBBER_MASK: &str = "<scrubber>";

/// De-identifies `fixture_in` and compares the result with `fixture_out`.
fn check(fixture_in: &Path, fixture_out: &Path) -> Result<(), String> {
    let fixture = Fixture::load(fixture_in);
    let (engine, out) = anonymize_fixture(&fixture);
    let mut actual = json!({
        "patient_pseudonym": out.patient_pseudonym,
        "content": out.content,
        "report": serde_json::to_value(&out.report).unwrap(),
    });

    // Privacy checks before any masking.
    let text = serde_json::to_string(&actual).unwrap();
    for value in &fixture.must_not_contain {
        if text.contains(value.as_str()) {
            return Err(format!("output contains the identifier {value:?}"));
        }
    }
    if text.contains(&fixture.body.original) {
        return Err("output contains the original record text".into());
    }
    if out.patient_pseudonym != engine.pseudonym(fixture.body.patient_link.as_deref().unwrap()) {
        return Err("patient pseudonym is not pseudonym(patient_link)".into());
    }

    let known = fixture.all_known();
    for pointer in &fixture.scrubbed {
        let slot = actual["content"]
            .pointer_mut(pointer)
            .ok_or_else(|| format!("scrubbed pointer {pointer} is not in the output"))?;
        let value = slot
            .as_str()
            .ok_or_else(|| format!("scrubbed value at {pointer} is not a string"))?;
        if let Some(k) = known.iter().find(|k| value.contains(k.as_str())) {
            return Err(format!("scrubbed value at {pointer} still contains {k:?}"));
        }
        *slot = json!(SCRUBBED_MASK);
    }
    let report = &mut actual["report"];
    if report["policy_hash"] != json!(engine.policy().hash) {
        return Err("report.policy_hash is not the policy's hash".into());
    }
    report["policy_hash"] = json!(HASH_MASK);
    if !report["scrubbed"].is_object() {
        return Err("report.scrubbed is missing".into());
    }
    if !fixture.scrubbed.is_empty() {
        report["scrubbed"] = json!(SCRUBBER_MASK);
    }

    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        let mut pretty = serde_json::to_string_pretty(&actual).unwrap();
        pretty.push('\n');
        fs::write(fixture_out, pretty).unwrap();
        return Ok(());
    }
    let expected: Value = serde_json::from_str(
        &fs::read_to_string(fixture_out)
            .map_err(|e| format!("cannot read {}: {e}", fixture_out.display()))?,
    )
    .map_err(|e| format!("{} is not JSON: {e}", fixture_out.display()))?;
    if actual != expected {
        return Err(format!(
            "output differs from {}\n--- actual ---\n{}",
            fixture_out.display(),
            serde_json::to_string_pretty(&actual).unwrap()
        ));
    }
    Ok(())
}

fn inputs() -> Vec<PathBuf> {
    let mut inputs: Vec<PathBuf> = fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".in.json"))
        .collect();
    inputs.sort();
    inputs
}

#[test]
fn golden_fixtures() {
    let inputs = inputs();
    assert!(inputs.len() >= 15, "fixtures missing: {inputs:?}");
    let mut failures = Vec::new();
    for input in &inputs {
        let output = PathBuf::from(input.to_string_lossy().replace(".in.json", ".out.json"));
        if let Err(e) = check(input, &output) {
            failures.push(format!("{}: {e}", input.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// One row per Safe Harbor category: a fixture, a value of that kind in its input, and the
/// path the shipped policy handles it under. The test checks that the value is gone and that
/// a rule of that category counted the path.
const CATEGORIES: &[(u8, &str, &str, &str)] = &[
    (1, "fhir-patient", "Quigley111", "name.family"),
    (1, "hl7-adt-a01", "Otto12", "NK1-2.2"),
    (2, "fhir-patient", "45 Sample Avenue", "address.line"),
    (2, "fhir-patient", "Claremont", "address.city"),
    (2, "csv-patient", "Sullivan County", "COUNTY"),
    (2, "hl7-adt-a01", "03601", "PID-11.5"),
    (3, "fhir-patient", "1930-06-15", "birthDate"),
    (3, "csv-observation", "2019-02-17T10:15:00Z", "DATE"),
    (3, "hl7-adt-a01", "20250301113000", "PV1-44.1"),
    (4, "fhir-patient", "555-0142-1234", "telecom.value"),
    (4, "hl7-adt-a01", "555-0177-4321", "NK1-5.1"),
    (5, "fhir-patient", "555-0199-8765", "telecom.value"),
    (5, "csv-other-identifiers", "555-0199-8765", "FAX"),
    (
        6,
        "fhir-patient",
        "zelda.quigley@example.org",
        "telecom.value",
    ),
    (6, "hl7-adt-a01", "zelda.quigley@example.org", "PID-13.4"),
    (7, "fhir-patient", "999-45-6789", "identifier.value"),
    (7, "csv-patient", "999-45-6789", "SSN"),
    (7, "hl7-adt-a01", "999-11-2222", "NK1-37.1"),
    (8, "fhir-patient", "MRN0004242", "identifier.value"),
    (8, "hl7-adt-a01", "MRN0004242", "PID-3.1"),
    (9, "fhir-patient", "MBR-7788-1122", "identifier.value"),
    (9, "fhir-coverage", "SUB-55443322", "subscriberId"),
    (9, "hl7-adt-a01", "POL-99887766", "IN1-36.1"),
    (10, "fhir-patient", "ACCT-5566", "identifier.value"),
    (10, "hl7-adt-a01", "ACCT-5566", "PID-18.1"),
    (11, "fhir-patient", "S99945678", "identifier.value"),
    (11, "csv-patient", "X45678901X", "PASSPORT"),
    (11, "hl7-adt-a01", "S99945678", "PID-20.1"),
    (12, "csv-other-identifiers", "1HGCM82633A004352", "VIN"),
    (12, "csv-other-identifiers", "7ABC123", "LICENSE_PLATE"),
    (13, "fhir-device", "SN-10987654D321", "serialNumber"),
    (13, "fhir-device", "ASSET-000991", "identifier.value"),
    (
        13,
        "csv-other-identifiers",
        "(01)00844588003288(21)10987654d321",
        "UDI",
    ),
    (
        14,
        "fhir-patient",
        "https://portal.example.org/patients/zquigley",
        "extension.valueUrl",
    ),
    (
        14,
        "fhir-patient",
        "https://zelda.example.net/blog",
        "telecom.value",
    ),
    (
        14,
        "fhir-device",
        "https://devices.example.org/pm/10987654",
        "url",
    ),
    (15, "csv-other-identifiers", "192.0.2.44", "IP_ADDRESS"),
    (
        16,
        "fhir-observation-attachment",
        "iVBORw0KGgoAAAANSUhEUg==",
        "valueAttachment.data",
    ),
    (
        16,
        "csv-other-identifiers",
        "9f86d081884c7d65",
        "FINGERPRINT_HASH",
    ),
    (17, "fhir-patient", "/9j/4AAQSkZJRgABAQ==", "photo.data"),
    (
        17,
        "csv-other-identifiers",
        "https://photos.example.org/zq.jpg",
        "PHOTO_URL",
    ),
    (18, "fhir-patient", "OTHER-3141", "identifier.value"),
    (18, "fhir-patient", "192.0.2.44", "extension.valueString"),
    (
        18,
        "fhir-observation",
        "ACC-2025-000017",
        "identifier.value",
    ),
    (18, "hl7-adt-a01", "VN-123456", "PV1-19.1"),
];

#[test]
fn every_category_is_proven_removed() {
    for category in 1..=18u8 {
        assert!(
            CATEGORIES.iter().any(|(c, ..)| *c == category),
            "no fixture proves category {category}"
        );
    }
    for (category, name, value, path) in CATEGORIES {
        let fixture = Fixture::load(&fixtures_dir().join(format!("{name}.in.json")));
        assert!(
            serde_json::to_string(&fixture.body.content)
                .unwrap()
                .contains(value),
            "{name}: input does not contain {value:?}"
        );
        let (engine, out) = anonymize_fixture(&fixture);
        let text = serde_json::to_string(&out.content).unwrap();
        assert!(!text.contains(value), "{name}: {value:?} survived");
        let counted_by_category = out.report.rules.iter().any(|(rule, paths)| {
            paths.contains_key(*path)
                && engine
                    .policy()
                    .rule(rule)
                    .is_some_and(|r| r.category == *category)
        });
        assert!(
            counted_by_category,
            "{name}: no category-{category} rule counted `{path}`; report: {:?}",
            out.report.rules
        );
    }
}

/// The same person in FHIR, CSV and Bundle records gets the same pseudonym everywhere.
#[test]
fn patient_links_across_formats() {
    let load =
        |n: &str| anonymize_fixture(&Fixture::load(&fixtures_dir().join(format!("{n}.in.json"))));
    let (_, fhir) = load("fhir-patient");
    let (_, csv) = load("csv-patient");
    let (_, csv_obs) = load("csv-observation");
    let (_, obs) = load("fhir-observation");
    let (_, entry) = load("fhir-bundle-encounter");
    let p = &fhir.patient_pseudonym;
    assert_eq!(fhir.content["id"], json!(p));
    assert_eq!(csv.content["Id"], json!(p));
    assert_eq!(csv_obs.content["PATIENT"], json!(p));
    assert_eq!(
        obs.content["subject"]["reference"],
        json!(format!("Patient/{p}"))
    );
    assert_eq!(
        entry.content["resource"]["subject"]["reference"],
        json!(format!("urn:uuid:{p}"))
    );
    for out in [&csv, &csv_obs, &obs, &entry] {
        assert_eq!(&out.patient_pseudonym, p);
    }
    let (_, adt) = load("hl7-adt-a01");
    let (_, oru) = load("hl7-oru-r01");
    assert_eq!(adt.patient_pseudonym, oru.patient_pseudonym);
    assert_eq!(
        adt.content["segments"][2]["fields"][2][0][0][0],
        json!(adt.patient_pseudonym)
    );
}
