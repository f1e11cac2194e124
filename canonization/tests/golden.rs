//! Golden tests: `fixtures/canonical/NAME.in.json` (a de-identified record) maps to
//! `NAME.out.json` (its canonical resources with their typed columns, or the error).
//!
//! Inputs are made from `fixtures/canonical/sources/` (and ingestion's fixtures) by the
//! real parsers and de-identification engine (see tests/common). `UPDATE_GOLDEN=1 cargo
//! test --test golden` regenerates inputs and outputs; review the diff before committing,
//! since a golden is only as good as that review. Without it, a further test checks that
//! the committed inputs are still what the engine produces.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use canonization::mapping::map_record;
use canonization::typed::typed;
use serde_json::{json, Value};

use common::{
    assert_valid_r4, find_case, fixtures_dir, generate, read_json, updating, write_json, Owned,
    CASES,
};

/// The built-in mapping tables.
fn tables() -> &'static canonization::mapping::Tables {
    canonization::mapping::Tables::embedded().unwrap_or_else(|e| panic!("{e}"))
}

/// What a golden output holds for a mapping result.
fn render(input: &Owned) -> Value {
    match map_record(tables(), &input.input()) {
        Ok(resources) => json!({
            "resources": resources.iter().map(|m| json!({
                "resource_type": m.resource_type,
                "resource_id": m.resource_id,
                "typed": serde_json::to_value(typed(m.resource_type, tables().code_element(m.resource_type), &m.resource)).unwrap(),
                "resource": m.resource,
            })).collect::<Vec<_>>()
        }),
        Err(e) => json!({ "error": { "type": e.error_type(), "message": e.to_string() } }),
    }
}

fn check(name: &str) {
    let case = find_case(name);
    let dir = fixtures_dir();
    let in_path = dir.join(format!("{name}.in.json"));
    let out_path = dir.join(format!("{name}.out.json"));
    let input_json = if updating() {
        let generated = generate(case);
        write_json(&in_path, &generated);
        generated
    } else {
        read_json(&in_path)
    };
    let input = Owned::from_json(&input_json);
    let actual = render(&input);
    if let Some(resources) = actual["resources"].as_array() {
        for (i, r) in resources.iter().enumerate() {
            let kind = r["resource_type"].as_str().unwrap();
            assert_valid_r4(kind, &r["resource"], &format!("{name} resource {i}"));
            assert_eq!(r["resource"]["id"], r["resource_id"]);
        }
    }
    if updating() {
        write_json(&out_path, &actual);
        return;
    }
    let expected = read_json(&out_path);
    if actual != expected {
        panic!(
            "{name}: output differs from {}\n--- actual ---\n{}",
            out_path.display(),
            serde_json::to_string_pretty(&actual).unwrap()
        );
    }
}

macro_rules! golden {
    ($($test:ident => $name:literal,)*) => {
        $(
            #[test]
            fn $test() {
                check($name);
            }
        )*

        #[test]
        fn every_case_has_a_test() {
            let tested = [$($name),*];
            for case in CASES {
                assert!(tested.contains(&case.name), "no #[test] for golden case {}", case.name);
            }
        }
    };
}

golden! {
    fhir_patient => "fhir-patient",
    fhir_observation => "fhir-observation",
    fhir_observation_age => "fhir-observation-age",
    fhir_observation_shift => "fhir-observation-shift",
    fhir_bundle_patient => "fhir-bundle-patient",
    fhir_bundle_encounter => "fhir-bundle-encounter",
    fhir_bundle_observation => "fhir-bundle-observation",
    fhir_bundle_coverage => "fhir-bundle-coverage",
    fhir_organization => "fhir-organization",
    fhir_location => "fhir-location",
    fhir_practitioner => "fhir-practitioner",
    fhir_practitioner_role => "fhir-practitioner-role",
    fhir_medication => "fhir-medication",
    fhir_device => "fhir-device",
    csv_patient => "csv-patient",
    csv_encounter => "csv-encounter",
    csv_observation => "csv-observation",
    csv_observation_text => "csv-observation-text",
    csv_condition => "csv-condition",
    csv_medication => "csv-medication",
    csv_procedure => "csv-procedure",
    csv_immunization => "csv-immunization",
    csv_allergy => "csv-allergy",
    csv_ingestion_observation => "csv-ingestion-observation",
    hl7_adt_a01 => "hl7-adt-a01",
    hl7_oru_r01 => "hl7-oru-r01",
    hl7_sample_adt_a01 => "hl7-sample-adt-a01",
    hl7_sample_adt_a08 => "hl7-sample-adt-a08",
    hl7_sample_oru_r01_lab => "hl7-sample-oru-r01-lab",
    hl7_sample_oru_r01_generic => "hl7-sample-oru-r01-generic",
    fhir_allergy_no_status => "fhir-allergy-no-status",
    fhir_condition_abated_active => "fhir-condition-abated-active",
    fhir_condition_abated_no_status => "fhir-condition-abated-no-status",
    fhir_medication_request_timing => "fhir-medication-request-timing",
    fhir_observation_component_absent => "fhir-observation-component-absent",
    fhir_observation_string => "fhir-observation-string",
    fhir_patient_marital_status => "fhir-patient-marital-status",
    hl7_oru_r01_sections => "hl7-oru-r01-sections",
}

/// The committed inputs are what ingestion + de-identification make of the sources today.
#[test]
fn inputs_are_what_the_engine_produces() {
    if updating() {
        return;
    }
    for case in CASES {
        let path = fixtures_dir().join(format!("{}.in.json", case.name));
        assert_eq!(
            generate(case),
            read_json(&path),
            "{}: regenerate with UPDATE_GOLDEN=1 and review the diff",
            case.name
        );
    }
}
