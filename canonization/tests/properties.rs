//! Properties over generated records: mapping never panics, is deterministic, and whatever
//! it emits is structurally valid R4 with canonical references; error reasons never carry
//! record values.
//!
//! Generators produce arbitrary JSON, and JSON shaped like each source format (FHIR
//! resources with real element names, Synthea rows with real columns, HL7 messages with
//! real segment ids) filled with hostile values, so the interesting paths are reached.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use canonization::mapping::{map_record, Input};
use canonization::typed::typed;
use pipeline::SourceFormat;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

use common::assert_valid_r4;

/// The built-in mapping tables.
fn tables() -> &'static canonization::mapping::Tables {
    canonization::mapping::Tables::embedded().unwrap_or_else(|e| panic!("{e}"))
}

/// Marks values; an error reason containing it would leak record content.
const MARK: &str = "LEAKMARK";

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(" ".to_owned()),
        Just(MARK.to_owned()),
        Just("2019".to_owned()),
        Just("2019-02-30".to_owned()),
        Just("2019-06-03T09:00:00Z".to_owned()),
        Just("20240312091500-0500".to_owned()),
        Just("90+".to_owned()),
        Just("-0.5".to_owned()),
        Just("1e999".to_owned()),
        Just("NaN".to_owned()),
        Just("<".to_owned()),
        Just("F".to_owned()),
        Just("numeric".to_owned()),
        Just("Encounter/x".to_owned()),
        Just("urn:uuid:abc".to_owned()),
        Just("#c".to_owned()),
        Just("\\H\\x\\N\\".to_owned()),
        "[ -~]{0,12}".prop_map(|s| format!("{MARK}{s}")),
        "\\PC{0,8}",
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let keys = prop_oneof![
            Just("reference".to_owned()),
            Just("resource".to_owned()),
            Just("value".to_owned()),
            Just("coding".to_owned()),
            Just("extension".to_owned()),
            Just("url".to_owned()),
            "[a-z]{1,6}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(keys, inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const FHIR_ELEMENTS: [&str; 40] = [
    "id",
    "status",
    "intent",
    "code",
    "vaccineCode",
    "medicationCodeableConcept",
    "medicationReference",
    "subject",
    "patient",
    "encounter",
    "effectiveDateTime",
    "effectiveInstant",
    "issued",
    "valueQuantity",
    "valueString",
    "valueRange",
    "valueRatio",
    "dataAbsentReason",
    "category",
    "class",
    "period",
    "participant",
    "location",
    "result",
    "component",
    "referenceRange",
    "note",
    "extension",
    "modifierExtension",
    "contained",
    "text",
    "meta",
    "identifier",
    "gender",
    "birthDate",
    "contact",
    "link",
    "reaction",
    "occurrenceDateTime",
    "performer",
];

fn fhir_resource() -> impl Strategy<Value = (String, Value)> {
    // The canonical types, and one outside the model.
    let mut names: Vec<&str> = canonization::mapping::ResourceType::ALL
        .iter()
        .map(|t| t.fhir_name())
        .collect();
    names.push("Coverage");
    let types = prop::sample::select(names);
    let fields = prop::collection::btree_map(
        prop::sample::select(FHIR_ELEMENTS.to_vec()),
        any_json(),
        0..10,
    );
    (types, fields, any::<bool>(), text()).prop_map(|(t, fields, entry, url)| {
        let mut r: Map<String, Value> =
            fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        r.insert("resourceType".into(), json!(t));
        let content = if entry {
            json!({"fullUrl": url, "resource": Value::Object(r)})
        } else {
            Value::Object(r)
        };
        (t.to_owned(), content)
    })
}

const CSV_COLUMNS: [&str; 24] = [
    "Id",
    "PATIENT",
    "ENCOUNTER",
    "DATE",
    "START",
    "STOP",
    "CODE",
    "SYSTEM",
    "DESCRIPTION",
    "VALUE",
    "UNITS",
    "TYPE",
    "CATEGORY",
    "GENDER",
    "BIRTHDATE",
    "DEATHDATE",
    "MARITAL",
    "RACE",
    "ETHNICITY",
    "ENCOUNTERCLASS",
    "REASONCODE",
    "REACTION1",
    "SEVERITY1",
    "STATE",
];

fn csv_row() -> impl Strategy<Value = (String, Value)> {
    let types = prop::sample::select(vec![
        "Patient",
        "Encounter",
        "Observation",
        "MedicationRequest",
        "AllergyIntolerance",
        "Procedure",
        "Immunization",
        "Condition",
        "Claim",
    ]);
    let row =
        prop::collection::btree_map(prop::sample::select(CSV_COLUMNS.to_vec()), text(), 0..14);
    (types, row).prop_map(|(t, row)| {
        let content: Map<String, Value> = row
            .into_iter()
            .map(|(k, v)| (k.to_owned(), json!(v)))
            .collect();
        (t.to_owned(), Value::Object(content))
    })
}

fn hl7_field() -> impl Strategy<Value = Value> {
    // repetitions → components → subcomponents
    prop::collection::vec(
        prop::collection::vec(prop::collection::vec(text(), 0..3), 0..7),
        0..3,
    )
    .prop_map(|reps| json!(reps))
}

fn hl7_message(pseudonym: &'static str) -> impl Strategy<Value = (String, Value)> {
    let ids = prop::sample::select(vec!["PID", "PV1", "ORC", "OBR", "OBX", "NTE", "EVN", "ZZZ"]);
    let segment = (
        ids,
        prop::collection::vec(hl7_field(), 0..46),
        any::<bool>(),
    )
        .prop_map(move |(id, mut fields, own_patient)| {
            if id == "PID" && own_patient && fields.len() >= 3 {
                fields[2] = json!([[[pseudonym]]]);
            }
            json!({"id": id, "fields": fields})
        });
    let types = prop::sample::select(vec!["ADT^A01", "ADT^A04", "ADT^A08", "ORU^R01", "ORM^O01"]);
    (
        types,
        prop::collection::vec(segment, 0..12),
        prop::option::of(text()),
    )
        .prop_map(|(t, segments, control)| {
            let mut all = vec![json!({"id": "MSH", "fields": [[[["|"]]], [[["^~\\&"]]]]})];
            all.extend(segments);
            (
                t.to_owned(),
                json!({"control_id": control, "segments": all}),
            )
        })
}

const PSEUDONYM: &str = "7e57000000000000000000000000000000000000000000000000000000000001";

fn check(format: &str, record_type: &str, content: &Value) -> Result<(), TestCaseError> {
    let input = Input {
        source_format: format,
        record_type,
        patient_pseudonym: PSEUDONYM,
        content,
        batch_id: "b",
        position: 3,
    };
    let first = map_record(tables(), &input);
    prop_assert_eq!(&first, &map_record(tables(), &input));
    match first {
        Ok(resources) => {
            let mut ids = std::collections::BTreeSet::new();
            for m in &resources {
                prop_assert!(ids.insert(m.resource_id.clone()), "repeated id");
                assert_valid_r4(m.resource_type.fhir_name(), &m.resource, record_type);
                let _ = typed(
                    m.resource_type,
                    tables().code_element(m.resource_type),
                    &m.resource,
                );
            }
        }
        Err(e) => {
            prop_assert!(!e.to_string().contains(MARK), "{}", e);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_json_never_panics(
        format in prop::sample::select(SourceFormat::ALL.iter().map(|f| f.as_str()).chain(["other"]).collect::<Vec<_>>()),
        record_type in prop_oneof![Just("Observation".to_owned()), Just("ORU^R01".to_owned()), "[A-Za-z^]{0,10}"],
        content in any_json(),
    ) {
        check(format, &record_type, &content)?;
    }

    #[test]
    fn fhir_shaped_records((record_type, content) in fhir_resource(), bundle in any::<bool>()) {
        let format = if bundle { "fhir-bundle" } else { "fhir-ndjson" };
        check(format, &record_type, &content)?;
    }

    #[test]
    fn csv_shaped_records((record_type, content) in csv_row()) {
        check("csv", &record_type, &content)?;
    }

    #[test]
    fn hl7_shaped_records((record_type, content) in hl7_message(PSEUDONYM)) {
        check("hl7v2", &record_type, &content)?;
    }

    #[test]
    fn typed_never_panics(
        resource_type in prop::sample::select(canonization::mapping::ResourceType::ALL.to_vec()),
        resource in any_json(),
    ) {
        let _ = typed(resource_type, tables().code_element(resource_type), &resource);
    }
}

/// Writes what mapping makes of many generated and mutated records to the JSON-lines file
/// named by `FHIR_DUMP`, for validation with the official FHIR R4 JSON schema outside Rust
/// (e.g. `python3 -m jsonschema` against fhir.schema.json):
/// `FHIR_DUMP=/tmp/out.jsonl cargo test --test properties -- --ignored`.
#[test]
#[ignore = "writes a file for an external schema validator"]
fn dump_outputs_for_schema_validation() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::io::Write;

    let Some(path) = std::env::var_os("FHIR_DUMP") else {
        return;
    };
    let mut out = std::fs::File::create(path).unwrap();
    let mut emit = |format: &str, record_type: &str, content: &Value| {
        let input = Input {
            source_format: format,
            record_type,
            patient_pseudonym: PSEUDONYM,
            content,
            batch_id: "b",
            position: 1,
        };
        if let Ok(resources) = map_record(tables(), &input) {
            for m in resources {
                writeln!(out, "{}", m.resource).unwrap();
            }
        }
    };
    let mut runner = TestRunner::deterministic();
    for _ in 0..3000 {
        let (t, c) = fhir_resource().new_tree(&mut runner).unwrap().current();
        emit("fhir-ndjson", &t, &c);
        let (t, c) = csv_row().new_tree(&mut runner).unwrap().current();
        emit("csv", &t, &c);
        let (t, c) = hl7_message(PSEUDONYM)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        emit("hl7v2", &t, &c);
    }
    // Golden inputs with random leaves replaced or removed: realistic shapes, odd values.
    let dir = common::fixtures_dir();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for case in common::CASES {
        let golden = common::read_json(&dir.join(format!("{}.in.json", case.name)));
        for _ in 0..200 {
            let mut content = golden["content"].clone();
            let leaves = text().new_tree(&mut runner).unwrap().current();
            mutate(&mut content, &mut next, &leaves);
            let owned = common::Owned::from_json(&json!({
                "source_format": golden["source_format"],
                "record_type": golden["record_type"],
                "patient_pseudonym": PSEUDONYM,
                "content": content,
            }));
            emit(&owned.source_format, &owned.record_type, &owned.content);
        }
    }
}

/// Replaces or removes about one leaf in eight.
fn mutate(value: &mut Value, next: &mut dyn FnMut() -> u64, replacement: &str) {
    match value {
        Value::Object(map) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                match next() % 16 {
                    0 if k != "resourceType" => {
                        map.remove(&k);
                    }
                    1 if k != "resourceType" => {
                        map.insert(k, json!(replacement));
                    }
                    _ => {
                        if let Some(v) = map.get_mut(&k) {
                            mutate(v, next, replacement);
                        }
                    }
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| mutate(v, next, replacement)),
        leaf => {
            if next().is_multiple_of(8) {
                *leaf = json!(replacement);
            }
        }
    }
}
