//! Behaviour across mappings: deterministic and distinct ids, references that meet the
//! ids their targets get, unsupported and invalid records, and error reasons free of values.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::collections::{BTreeMap, BTreeSet};

use canonization::mapping::{
    map_record, patient_id, resource_id, shared_id, Input, MapError, Mapped, ResourceType,
};
use serde_json::{json, Value};

use common::{
    assert_valid_r4, find_case, fixtures_dir, generate_all, read_json, Owned, Source, CASES,
};

/// The built-in mapping tables.
fn tables() -> &'static canonization::mapping::Tables {
    canonization::mapping::Tables::embedded().unwrap_or_else(|e| panic!("{e}"))
}

fn golden_input(name: &str) -> Owned {
    Owned::from_json(&read_json(&fixtures_dir().join(format!("{name}.in.json"))))
}

fn map(owned: &Owned) -> Vec<Mapped> {
    map_record(tables(), &owned.input()).unwrap_or_else(|e| panic!("{e}"))
}

fn one(owned: &Owned) -> Mapped {
    let mut out = map(owned);
    assert_eq!(out.len(), 1);
    out.remove(0)
}

fn reference(resource: &Value, element: &str) -> String {
    resource[element]["reference"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn input<'a>(format: &'a str, record_type: &'a str, content: &'a Value) -> Input<'a> {
    Input {
        source_format: format,
        record_type,
        patient_pseudonym: "0f".repeat(32).leak(),
        content,
        batch_id: "b1",
        position: 1,
    }
}

#[test]
fn ids_are_deterministic_and_independent_of_batch_and_position() {
    for case in CASES {
        let owned = golden_input(case.name);
        let first = map_record(tables(), &owned.input());
        let mut moved = golden_input(case.name);
        moved.batch_id = "another-batch".into();
        moved.position = 9_999;
        assert_eq!(first, map_record(tables(), &moved.input()), "{}", case.name);
        assert_eq!(first, map_record(tables(), &owned.input()), "{}", case.name);
    }
}

#[test]
fn ids_are_distinct_across_types_and_within_a_record() {
    let ids: BTreeSet<String> = ResourceType::ALL
        .iter()
        .map(|&t| resource_id(t, "p", "same-source-id"))
        .collect();
    assert_eq!(ids.len(), ResourceType::ALL.len());
    assert_ne!(
        resource_id(ResourceType::Observation, "p", "x"),
        resource_id(ResourceType::Observation, "q", "x")
    );

    // Over every golden: an id belongs to one type, and one record never repeats an id.
    let mut owner: BTreeMap<String, &str> = BTreeMap::new();
    for case in CASES {
        let Ok(out) = map_record(tables(), &golden_input(case.name).input()) else {
            continue;
        };
        let mut seen = BTreeSet::new();
        for m in &out {
            assert!(
                seen.insert(m.resource_id.clone()),
                "{}: repeated id",
                case.name
            );
            let previous = owner.insert(m.resource_id.clone(), m.resource_type.fhir_name());
            assert!(
                previous.is_none_or(|t| m.resource_type == t),
                "{}",
                case.name
            );
        }
    }
}

#[test]
fn synthea_rows_and_fhir_resources_of_one_encounter_meet() {
    let encounter = one(&golden_input("csv-encounter"));
    let target = format!("Encounter/{}", encounter.resource_id);
    for name in [
        "csv-observation",
        "csv-observation-text",
        "csv-condition",
        "csv-medication",
        "csv-procedure",
        "csv-immunization",
        "csv-allergy",
        // The FHIR export of the same Synthea data references the same encounter id.
        "fhir-observation",
    ] {
        let m = one(&golden_input(name));
        assert_eq!(reference(&m.resource, "encounter"), target, "{name}");
    }
    // One patient across formats: the CSV and FHIR Patients are one resource.
    let csv_patient = one(&golden_input("csv-patient"));
    let fhir_patient = one(&golden_input("fhir-patient"));
    assert_eq!(csv_patient.resource_id, fhir_patient.resource_id);
    assert_eq!(
        reference(&encounter.resource, "subject"),
        format!("Patient/{}", csv_patient.resource_id)
    );
}

#[test]
fn every_synthea_row_points_at_a_mapped_encounter_and_patient() {
    let encounters: BTreeSet<String> = generate_all(Source::Csv("synthea/encounters.csv"))
        .iter()
        .map(|v| one(&Owned::from_json(v)).resource_id)
        .collect();
    for file in [
        "observations",
        "conditions",
        "medications",
        "procedures",
        "immunizations",
        "allergies",
    ] {
        let path: &'static str = format!("synthea/{file}.csv").leak();
        for v in generate_all(Source::Csv(path)) {
            let owned = Owned::from_json(&v);
            let m = one(&owned);
            let enc = reference(&m.resource, "encounter");
            assert!(
                encounters.contains(enc.trim_start_matches("Encounter/")),
                "{file}: encounter reference"
            );
            let patient_element = match m.resource_type.fhir_name() {
                "AllergyIntolerance" | "Immunization" => "patient",
                _ => "subject",
            };
            assert_eq!(
                reference(&m.resource, patient_element),
                format!("Patient/{}", patient_id(&owned.patient_pseudonym))
            );
        }
    }
}

#[test]
fn bundle_entries_resolve_urn_uuid_references_by_element() {
    let encounter = one(&golden_input("fhir-bundle-encounter"));
    let observation = one(&golden_input("fhir-bundle-observation"));
    let patient = one(&golden_input("fhir-bundle-patient"));
    assert_eq!(
        reference(&observation.resource, "encounter"),
        format!("Encounter/{}", encounter.resource_id)
    );
    assert_eq!(
        reference(&observation.resource, "subject"),
        format!("Patient/{}", patient.resource_id)
    );
    assert_eq!(
        reference(&encounter.resource, "subject"),
        format!("Patient/{}", patient.resource_id)
    );
    // Location and Organization are shared: their references name the ids their own
    // mappings give them, with no patient in them. The participant's untyped `urn:uuid:`
    // could be a Practitioner, a PractitionerRole or a RelatedPerson: it goes.
    let source = &golden_input("fhir-bundle-encounter").content["resource"];
    let id_of = |element: &Value| {
        element["reference"]
            .as_str()
            .and_then(|r| r.split_once('/'))
            .map(|(_, id)| id.to_owned())
            .unwrap_or_default()
    };
    assert_eq!(
        reference(&encounter.resource["location"][0], "location"),
        format!(
            "Location/{}",
            shared_id(
                ResourceType::Location,
                &id_of(&source["location"][0]["location"])
            )
        )
    );
    assert_eq!(
        reference(&encounter.resource, "serviceProvider"),
        format!(
            "Organization/{}",
            shared_id(
                ResourceType::Organization,
                &id_of(&source["serviceProvider"])
            )
        )
    );
    assert!(!encounter.resource.to_string().contains("urn:uuid"));
    assert!(encounter.resource["participant"][0]
        .get("individual")
        .is_none());
}

#[test]
fn hl7_results_link_to_their_report_and_the_admission() {
    let adt = map(&golden_input("hl7-adt-a01"));
    let oru = map(&golden_input("hl7-oru-r01"));
    let encounter = adt.iter().find(|m| m.resource_type == "Encounter").unwrap();
    let patient = adt
        .iter()
        .find(|m| m.resource_type == ResourceType::Patient)
        .unwrap();
    let mut reports = 0;
    for m in &oru {
        assert_eq!(
            reference(&m.resource, "encounter"),
            format!("Encounter/{}", encounter.resource_id)
        );
        assert_eq!(
            reference(&m.resource, "subject"),
            format!("Patient/{}", patient.resource_id)
        );
        if m.resource_type == "DiagnosticReport" {
            reports += 1;
            for r in m.resource["result"].as_array().unwrap() {
                let id = r["reference"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("Observation/");
                assert!(oru
                    .iter()
                    .any(|o| o.resource_type == "Observation" && o.resource_id == id));
            }
        }
    }
    assert_eq!(reports, 2);
    assert_eq!(oru.len(), 2 + 12);
    // An update of the same visit (A08) is the same Encounter.
    let a01 = map(&golden_input("hl7-sample-adt-a01"));
    let a08 = map(&golden_input("hl7-sample-adt-a08"));
    assert_eq!(a01[1].resource_id, a08[1].resource_id);
}

#[test]
fn a_corrected_result_replaces_the_preliminary_one() {
    let mut owned = golden_input("hl7-oru-r01");
    let before = map(&owned);
    // A re-sent message: new control id, result status corrected.
    owned.content["control_id"] = json!("another-control-id");
    let after = map(&owned);
    let ids = |v: &[Mapped]| v.iter().map(|m| m.resource_id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&before), ids(&after));
}

#[test]
fn unsupported_record_types() {
    let coverage = golden_input("fhir-bundle-coverage");
    assert_eq!(
        map_record(tables(), &coverage.input()),
        Err(MapError::Unsupported {
            record_type: "Coverage".into()
        })
    );
    let specimen = json!({"resourceType": "Specimen", "id": "d"});
    let cases = [
        ("fhir-ndjson", "Specimen", &specimen),
        ("csv", "Claim", &json!({"Id": "x"})),
        ("hl7v2", "ORM^O01", &json!({"segments": []})),
        ("hl7v2", "ADT^A03", &json!({"segments": []})),
        ("hl7v2", "HL7", &json!({"segments": []})),
    ];
    for (format, record_type, content) in cases {
        let got = map_record(tables(), &input(format, record_type, content));
        assert!(
            matches!(got, Err(MapError::Unsupported { .. })),
            "{record_type}: {got:?}"
        );
        assert_eq!(got.unwrap_err().error_type(), "unsupported_record_type");
    }
}

#[test]
fn invalid_records_are_rejected_with_reasons_free_of_values() {
    let secret = "SECRET-999-31-4159";
    let other_pid = json!({"control_id": secret, "segments": [
        {"id": "MSH", "fields": [[[["|"]]], [[["^~\\&"]]]]},
        {"id": "PID", "fields": [[[["1"]]], [], [[[secret]]]]},
    ]});
    let cases = [
        (
            "fhir-ndjson",
            "Observation",
            json!({"resourceType": "Condition", "id": secret}),
        ),
        ("fhir-ndjson", "Observation", json!([secret])),
        (
            "fhir-bundle",
            "Immunization",
            json!({"resource": {"resourceType": "Immunization", "id": secret, "vaccineCode": {"text": secret}}}),
        ),
        (
            "fhir-ndjson",
            "MedicationRequest",
            json!({"resourceType": "MedicationRequest", "intent": secret}),
        ),
        ("csv", "Observation", json!(secret)),
        ("hl7v2", "ORU^R01", other_pid),
        (
            "hl7v2",
            "ADT^A01",
            json!({"segments": [{"fields": [secret]}]}),
        ),
        ("hl7v2", "ADT^A01", json!({"segments": secret})),
        ("xml", "Observation", json!({"a": secret})),
    ];
    for (format, record_type, content) in &cases {
        let got = map_record(tables(), &input(format, record_type, content));
        let Err(e @ MapError::Invalid { .. }) = &got else {
            panic!("{format} {record_type}: expected Invalid, got {got:?}");
        };
        assert_eq!(e.error_type(), "mapping");
        assert!(!e.to_string().contains("SECRET"), "{e}");
        assert!(!format!("{e:?}").contains("SECRET"), "{e:?}");
    }
}

#[test]
fn csv_observations_without_an_id_are_identified_by_content_not_position() {
    let owned = golden_input("csv-observation");
    let base = one(&owned);
    let mut other_value = golden_input("csv-observation");
    other_value.content["VALUE"] = json!("71.4");
    assert_ne!(one(&other_value).resource_id, base.resource_id);
    let mut other_description = golden_input("csv-observation");
    other_description.content["DESCRIPTION"] = json!("Body weight (renamed)");
    assert_eq!(one(&other_description).resource_id, base.resource_id);
}

#[test]
fn hl7_edge_cases_still_give_valid_resources() {
    let pseudonym = "ab".repeat(32);
    let msh = json!({"id": "MSH", "fields": [[[["|"]]], [[["^~\\&"]]]]});
    let obx = |set: &str, vt: &str, value: Value| json!({"id": "OBX", "fields": [[[[set]]], [[[vt]]], [[["X1"], ["Thing"], ["L"]]], [], value, [], [], [], [], [], [[["F"]]]]});
    let content = json!({"control_id": null, "segments": [
        msh,
        {"id": "PID", "fields": [[[["1"]]], [], [[[pseudonym]]]]},
        // Results before any OBR, with repeated set ids.
        obx("1", "NM", json!([[["12.5"]]])),
        obx("1", "SN", json!([[["<>"], ["3"]]])),
        obx("2", "SN", json!([[[""], ["2"], ["+"]]])),
        obx("3", "TM", json!([[["1230"]]])),
        obx("4", "DT", json!([[["20240230"]]])),
        obx("5", "NR", json!([[["1"], ["9"]]])),
        obx("6", "ZZ", json!([[["?"]]])),
        obx("7", "", json!([[["plain words"]]])),
        obx("8", "FT", json!([[["line one\\.br\\"]], [["line two \\H\\bold\\N\\"]]])),
        obx("9", "CWE", json!([[[""], ["Text only"]]])),
        {"id": "OBR", "fields": []},
        {"id": "OBX"},
    ]});
    let owned = Owned {
        source_format: "hl7v2".into(),
        record_type: "ORU^R01".into(),
        patient_pseudonym: pseudonym.clone(),
        batch_id: "b".into(),
        position: 1,
        content,
    };
    let out = map(&owned);
    for (i, m) in out.iter().enumerate() {
        assert_valid_r4(
            m.resource_type.fhir_name(),
            &m.resource,
            &format!("resource {i}"),
        );
    }
    let value = |i: usize, k: &str| out[i].resource[k].clone();
    assert_eq!(value(0, "valueQuantity"), json!({"value": 12.5}));
    assert_eq!(value(1, "valueString"), json!("<>3"));
    assert_eq!(value(2, "valueString"), json!("2+"));
    assert_eq!(value(3, "valueTime"), json!("12:30:00"));
    assert_eq!(value(4, "dataAbsentReason")["coding"][0]["code"], "error");
    assert_eq!(
        value(5, "valueRange"),
        json!({"low": {"value": 1}, "high": {"value": 9}})
    );
    assert_eq!(
        value(6, "dataAbsentReason")["coding"][0]["code"],
        "unsupported"
    );
    assert_eq!(value(7, "valueString"), json!("plain words"));
    assert_eq!(value(8, "valueString"), json!("line one\n\nline two bold"));
    assert_eq!(
        value(9, "valueCodeableConcept"),
        json!({"text": "Text only"})
    );
    // The empty OBR is still a report (code and status unknown) with its empty OBX.
    assert_eq!(out[10].resource_type, "DiagnosticReport");
    assert_eq!(out[10].resource["status"], "unknown");
    assert_eq!(
        out[11].resource["dataAbsentReason"]["coding"][0]["code"],
        "unknown"
    );
    let ids: BTreeSet<&String> = out.iter().map(|m| &m.resource_id).collect();
    assert_eq!(ids.len(), out.len());
}

#[test]
fn goldens_cover_every_type_and_format() {
    let mut types = BTreeSet::new();
    let mut formats = BTreeSet::new();
    for case in CASES {
        let owned = golden_input(case.name);
        formats.insert(owned.source_format.clone());
        if let Ok(out) = map_record(tables(), &owned.input()) {
            types.extend(out.iter().map(|m| m.resource_type));
        }
    }
    assert_eq!(types.len(), ResourceType::ALL.len(), "{types:?}");
    assert_eq!(formats.len(), 4, "{formats:?}");
    let _ = find_case("hl7-oru-r01");
}
