//! End-to-end test of canonization on the real broker and registry: a Synthea-style FHIR
//! Bundle, Synthea's providers Bundle (practitioners, organisations, locations: resources
//! of no patient) and an HL7 ORU go through every stage; nothing is dead-lettered; the
//! canonical topics hold exactly the expected records, each a valid FHIR R4 resource whose
//! references resolve; a standard Python Confluent client reads them all; and replaying the
//! anonymized events gives the same resource ids.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use pipeline::events::Payload;
use pipeline::readback::Record;
use pipeline::topics::TopicKind;
use pipeline::ResourceType;
use rdkafka::message::Message;
use serde_json::Value;
use tests::Pipeline;

fn fixture(name: &str) -> Vec<u8> {
    // The demo's samples: synthetic, in Synthea's and HL7's public sample formats.
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../samples")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// What the fixtures should give, counted from the fixtures themselves: one resource per
/// Bundle entry of a canonical type; per HL7 ORU, one DiagnosticReport per OBR and one
/// Observation per OBX (an ORU carries no Patient of its own: ADT messages do).
const BUNDLES: [&str; 2] = ["synthea_bundle.json", "synthea_providers.json"];

fn expected_counts() -> BTreeMap<&'static str, usize> {
    let mut want: BTreeMap<&'static str, usize> = BTreeMap::new();
    for file in BUNDLES {
        let bundle: Value = serde_json::from_slice(&fixture(file)).unwrap();
        for e in bundle["entry"].as_array().unwrap() {
            let t = e["resource"]["resourceType"].as_str().unwrap();
            if let Some(t) = ResourceType::parse(t) {
                *want.entry(t.fhir_name()).or_default() += 1;
            }
        }
    }
    let hl7 = String::from_utf8(fixture("oru_mixed.hl7")).unwrap();
    for seg in hl7.split('\r').filter(|s| !s.is_empty()) {
        let t = match &seg[..3] {
            "OBR" => "DiagnosticReport",
            "OBX" => "Observation",
            _ => continue,
        };
        *want.entry(t).or_default() += 1;
    }
    want
}

fn canonical_topics(p: &Pipeline) -> HashMap<String, &'static str> {
    ResourceType::ALL
        .iter()
        .map(|&t| (p.topics.name(TopicKind::Canonical(t)), t.fhir_name()))
        .collect()
}

/// (resource type, resource id, FHIR JSON) of every canonical record read back.
fn canonical(p: &Pipeline, records: &[Record]) -> Vec<(&'static str, String, Value)> {
    let topics = canonical_topics(p);
    records
        .iter()
        .filter_map(|r| {
            let t = topics.get(r.message.topic())?;
            let (pseudonym, fhir, _) = r.event.as_ref()?.payload.canonical()?;
            assert_eq!(
                r.message.key(),
                Some(pseudonym.as_bytes()),
                "canonical records are keyed by patient pseudonym, shared ones by their own id"
            );
            let fhir: Value = serde_json::from_str(fhir).unwrap();
            Some((*t, fhir["id"].as_str().unwrap().to_string(), fhir))
        })
        .collect()
}

/// Every `reference` below a value.
fn references(v: &Value) -> Vec<String> {
    match v {
        Value::Object(m) => m
            .iter()
            .flat_map(|(k, v)| match (k.as_str(), v) {
                ("reference", Value::String(r)) => vec![r.clone()],
                _ => references(v),
            })
            .collect(),
        Value::Array(items) => items.iter().flat_map(references).collect(),
        _ => Vec::new(),
    }
}

fn counts(c: &[(&'static str, String, Value)]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for (t, _, _) in c {
        *m.entry(*t).or_default() += 1;
    }
    m
}

#[test]
fn a_bundle_and_an_oru_become_valid_canonical_records_read_by_the_python_client() {
    let python = std::env::var("MEDPIPE_PYTHON").expect(
        "MEDPIPE_PYTHON must name a Python with confluent-kafka installed; scripts/test.sh sets it up",
    );
    let mut p = Pipeline::new();
    for s in ["ingestion", "anonymization", "canonization"] {
        p.start(s, &[]);
    }
    for file in BUNDLES {
        p.drop_file(file, &fixture(file));
    }
    p.drop_file("oru_mixed.hl7", &fixture("oru_mixed.hl7"));
    let tail = p.tail();
    let lifecycle = p.topics.name(TopicKind::Canonization);
    let batches = BUNDLES.len() + 1;
    tail.wait_until("every batch completed", Duration::from_secs(180), |t| {
        t.count(&lifecycle, "EventDataCanonizationCompleted") >= batches
    });
    p.stop("canonization");
    let records = p.read_all();
    let first = canonical(&p, &records);
    let want = expected_counts();
    assert_eq!(counts(&first), want, "records per canonical topic");

    // The closing events count the same, per type.
    let mut completed: BTreeMap<String, i64> = BTreeMap::new();
    for r in &records {
        if let Some(Payload::EventDataCanonizationCompleted(c)) =
            r.event.as_ref().map(|e| &e.payload)
        {
            assert_eq!(c.records_dead_lettered, 0);
            for (t, n) in &c.resources_by_type {
                *completed.entry(t.clone()).or_default() += n;
            }
        }
    }
    let want_i64: BTreeMap<String, i64> = want
        .iter()
        .map(|(t, n)| (t.to_string(), *n as i64))
        .collect();
    assert_eq!(completed, want_i64);

    // Every resource is valid FHIR R4, and ids are unique.
    let validator = canonization::validate::FhirValidator::new().unwrap();
    for (t, id, fhir) in &first {
        if let Err(e) = validator.validate(fhir) {
            panic!("{t} {id} is not valid FHIR R4: {e:?}");
        }
    }
    let mut ids: Vec<&String> = first.iter().map(|(_, id, _)| id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), first.len(), "resource ids are unique");

    // Nothing was dead-lettered: resources of no patient are data, not errors.
    for stage in ["ingestion", "anonymization", "canonization"] {
        let dlq = p.topics.dlq(stage);
        let dead: Vec<_> = records
            .iter()
            .filter(|r| r.message.topic() == dlq)
            .collect();
        assert!(dead.is_empty(), "{} dead letters on {dlq}", dead.len());
    }

    // The providers' identifying values reach no anonymization or canonical topic, in any
    // part of any message (key, headers, payload).
    let mut downstream_topics: Vec<String> = canonical_topics(&p).into_keys().collect();
    downstream_topics.push(p.topics.name(TopicKind::Anonymization));
    let downstream = p.read(&downstream_topics);
    let provider_phi: Vec<String> = [
        "Hoppe518",
        "Jacquelyn64",
        "9999977593",
        "BROCKTON",
        "63 MAIN ST",
        "508-559-6699",
        "Jacquelyn64.Hoppe518@example.com",
        "02301",
        "42.083",
        "12843391",
        "9512731",
        "14413218384931",
        "b1ddf812-1fdd-3adf-b1d5-32cc8bd07ebb",
    ]
    .map(String::from)
    .to_vec();
    let leaked = tests::in_clear(&downstream, &provider_phi);
    assert!(
        leaked.is_empty(),
        "in clear downstream: {leaked:?}\n{}",
        tests::leak_report(&downstream, &leaked)
    );

    // Every reference of the Bundles' records resolves to a record on a canonical topic:
    // patient records to the shared practitioner, organisation, location and medication,
    // and those to each other. (The ORU's name a patient whose ADT is not in this test.)
    let known: std::collections::HashSet<String> =
        first.iter().map(|(t, id, _)| format!("{t}/{id}")).collect();
    let mut resolved: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        let Some((_, fhir, prov)) = r.event.as_ref().and_then(|e| e.payload.canonical()) else {
            continue;
        };
        if prov.source_format != "fhir-bundle" {
            continue;
        }
        let fhir: Value = serde_json::from_str(fhir).unwrap();
        for reference in references(&fhir) {
            assert!(
                known.contains(&reference),
                "{reference} (from {}) is on no canonical topic",
                fhir["resourceType"]
            );
            let kind = reference.split('/').next().unwrap_or_default().to_string();
            *resolved.entry(kind).or_default() += 1;
        }
    }
    for kind in [
        "Practitioner",
        "Organization",
        "Location",
        "Medication",
        "Patient",
        "Encounter",
    ] {
        assert!(
            resolved.contains_key(kind),
            "no reference to a {kind} resolved: {resolved:?}"
        );
    }

    // Codes and units are normalised: the local cholesterol code is mapped to LOINC, the
    // glucose in mg/dL is in mmol/L, and the source value is kept on the record.
    let obs: Vec<_> = records
        .iter()
        .filter_map(|r| match r.event.as_ref().map(|e| &e.payload) {
            Some(Payload::CanonicalObservation(o)) => Some(o),
            _ => None,
        })
        .collect();
    assert!(obs.iter().any(|o| o.code_status == "mapped"
        && o.original_code.as_ref().and_then(|c| c.code.as_deref()) == Some("CHOL")
        && o.code.as_ref().and_then(|c| c.system.as_deref()) == Some("http://loinc.org")));
    assert!(obs
        .iter()
        .any(|o| o.details.value_unit.as_deref() == Some("mmol/L")
            && o.details.original_unit.as_deref() == Some("mg/dL")
            && o.details.original_value == Some(90.0)));
    // References point at the canonical ids: the Bundle's Observations name its Encounter.
    // (The ORU's name the visit of PV1-19, whose Encounter comes with the patient's ADT.)
    let encounter_ids: Vec<&String> = first
        .iter()
        .filter(|(t, _, _)| *t == "Encounter")
        .map(|(_, id, _)| id)
        .collect();
    let from_bundle: Vec<_> = obs
        .iter()
        .filter(|o| o.provenance.source_format == "fhir-bundle")
        .collect();
    assert_eq!(from_bundle.len(), 3);
    assert!(from_bundle
        .iter()
        .filter_map(|o| o.encounter_id.as_ref())
        .all(|e| encounter_ids.contains(&e)));
    assert_eq!(
        from_bundle
            .iter()
            .filter(|o| o.encounter_id.is_some())
            .count(),
        2,
        "the two Observations with an encounter reference keep it"
    );

    // A real client: confluent-kafka's Consumer, SchemaRegistryClient and
    // AvroDeserializer read and decode every record of every canonical topic.
    let mut topics: Vec<String> = canonical_topics(&p).into_keys().collect();
    topics.sort();
    let expect: Vec<String> = topics
        .iter()
        .map(|t| {
            want.get(canonical_topics(&p)[t])
                .copied()
                .unwrap_or(0)
                .to_string()
        })
        .collect();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/read_canonical.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args([
            "--bootstrap",
            tests::BOOTSTRAP,
            "--registry",
            tests::REGISTRY,
        ])
        .args(["--topics", &topics.join(","), "--expect", &expect.join(",")])
        .output()
        .expect("run the Python client");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "Python client output is not JSON ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "Python client: {report}");
    let mut py_ids: Vec<String> = report["ids"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_str().unwrap().to_string())
        })
        .collect();
    py_ids.sort();
    assert_eq!(
        py_ids.iter().collect::<Vec<_>>(),
        ids,
        "the Python client saw every record"
    );

    // Replaying the same anonymized events (a new consumer group reads them all again)
    // yields the same resource ids: a replay updates rows, it never invents new ones.
    let group = format!("{}-canonization-replay", p.prefix);
    p.start_named(
        "canonization-replay",
        "canonization",
        &[
            ("MEDPIPE_GROUP_ID", group.as_str()),
            ("MEDPIPE_INSTANCE_ID", "1"),
        ],
    );
    tail.wait_until(
        "the replay's completed batches",
        Duration::from_secs(180),
        |t| t.count(&lifecycle, "EventDataCanonizationCompleted") >= 2 * batches,
    );
    p.stop_all();
    drop(tail);
    let replayed = canonical(&p, &p.read_all());
    let mut by_id: HashMap<&str, Vec<&Value>> = HashMap::new();
    for (_, id, fhir) in &replayed {
        by_id.entry(id.as_str()).or_default().push(fhir);
    }
    assert_eq!(by_id.len(), first.len(), "the replay created no new ids");
    for (id, versions) in by_id {
        assert_eq!(versions.len(), 2, "{id} once per run");
        assert_eq!(
            versions[0], versions[1],
            "{id} is the same resource both times"
        );
    }
}
