//! End-to-end test of identity on the real broker and registry: one synthetic human arrives
//! as Synthea CSV, a FHIR Bundle and an HL7 feed that share an enterprise MRN, is then
//! registered a second time under another MRN, and an ADT^A40 merges the two. Every
//! canonical record of the human carries one pseudonym; the merge is a `PatientMerged`
//! event and a canonical Patient linked `replaced-by` to the survivor; nothing published
//! before the merge is deleted; the audit trail finds the merge under both pseudonyms; and
//! no identifier reaches a downstream topic.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use pipeline::events::{PatientMerged, Payload};
use pipeline::topics::TopicKind;
use pipeline::ResourceType;
use rdkafka::message::Message;
use serde_json::Value;
use tests::Pipeline;

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../samples/identity")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// In the order they are dropped; each batch completes before the next is dropped, so the
/// observations follow the patient row and the merge follows both registrations.
const FILES: [&str; 5] = [
    "patients.csv",
    "observations.csv",
    "bundle.json",
    "feed.hl7",
    "merge.hl7",
];

/// One canonical record: its Kafka key, type, batch, source position and FHIR JSON.
struct Canonical {
    key: String,
    resource_type: &'static str,
    batch: String,
    position: i64,
    fhir: Value,
}

#[test]
fn one_human_in_csv_fhir_and_hl7_gets_one_pseudonym_and_an_a40_merge_links_two_records() {
    let mut p = Pipeline::new();
    for s in ["auditing", "ingestion", "anonymization", "canonization"] {
        p.start(s, &[]);
    }
    let tail = p.tail();
    let lifecycle = p.topics.name(TopicKind::Canonization);
    for (i, file) in FILES.iter().enumerate() {
        p.drop_file(file, &fixture(file));
        tail.wait_until(file, Duration::from_secs(180), |t| {
            t.count(&lifecycle, "EventDataCanonizationCompleted") > i
        });
    }
    // The merge's own canonical Patient is published beside the batch, not counted in it.
    let patients = p.topics.name(TopicKind::Canonical(ResourceType::Patient));
    tail.wait_until("the merged Patient", Duration::from_secs(60), |t| {
        t.count(&patients, "CanonicalPatient") >= 7
    });
    let batches: BTreeMap<String, &str> = FILES
        .iter()
        .map(|f| (tests::batch_of(&fixture(f)), *f))
        .collect();
    let records = p.read_all();

    // Nothing was dead-lettered anywhere.
    for stage in pipeline::topics::DLQ_STAGES {
        let dlq = p.topics.dlq(stage);
        let dead = records.iter().filter(|r| r.message.topic() == dlq).count();
        assert_eq!(dead, 0, "dead letters on {dlq}");
    }

    let topics: BTreeMap<String, &'static str> = ResourceType::ALL
        .iter()
        .map(|&t| (p.topics.name(TopicKind::Canonical(t)), t.fhir_name()))
        .collect();
    let canonical: Vec<Canonical> = records
        .iter()
        .filter_map(|r| {
            let t = topics.get(r.message.topic())?;
            let (_, fhir, prov) = r.event.as_ref()?.payload.canonical()?;
            Some(Canonical {
                key: String::from_utf8(r.message.key()?.to_vec()).unwrap(),
                resource_type: t,
                batch: batches[&prov.batch_id].to_string(),
                position: prov.source_position,
                fhir: serde_json::from_str(fhir).unwrap(),
            })
        })
        .collect();
    let of = |file: &str| -> Vec<&Canonical> {
        let mut v: Vec<&Canonical> = canonical.iter().filter(|c| c.batch == file).collect();
        v.sort_by_key(|c| c.position);
        v
    };

    // One pseudonym for every record of the human from CSV, FHIR and HL7.
    let keys: BTreeSet<&str> = FILES[..4]
        .iter()
        .flat_map(|f| of(f))
        .map(|c| c.key.as_str())
        .collect();
    assert_eq!(keys.len(), 1, "pseudonyms across the four files: {keys:?}");
    let survivor = keys.into_iter().next().unwrap().to_string();
    for f in &FILES[..4] {
        assert!(!of(f).is_empty(), "{f} gave no canonical record");
    }
    let types: BTreeSet<&str> = FILES[..4]
        .iter()
        .flat_map(|f| of(f))
        .map(|c| c.resource_type)
        .collect();
    for t in ["Patient", "Observation", "Encounter", "DiagnosticReport"] {
        assert!(types.contains(t), "no {t} among {types:?}");
    }
    // Their references to the patient all name one canonical Patient.
    let survivor_ref = format!("Patient/{}", canonization::mapping::patient_id(&survivor));
    for c in FILES[..4].iter().flat_map(|f| of(f)) {
        if let Some(subject) = c.fhir.get("subject") {
            assert_eq!(subject["reference"], survivor_ref.as_str(), "{}", c.fhir);
        }
    }

    // The merge: one PatientMerged, keyed by the batch that announced it.
    let merges: Vec<(String, PatientMerged)> = records
        .iter()
        .filter_map(|r| match r.event.as_ref().map(|e| &e.payload) {
            Some(Payload::PatientMerged(m)) => Some((
                String::from_utf8(r.message.key().unwrap().to_vec()).unwrap(),
                m.clone(),
            )),
            _ => None,
        })
        .collect();
    let [(merge_key, merge)] = &merges[..] else {
        panic!("expected one PatientMerged, got {merges:?}")
    };
    assert_eq!(merge.surviving_pseudonym, survivor);
    assert_eq!(merge.trigger, "hl7-merge");
    assert_eq!(merge.record_type, "ADT^A40");
    let merged = merge.merged_pseudonym.clone();
    assert_eq!(merge_key, &merge.batch_id);
    assert_ne!(merged, survivor);

    // merge.hl7: the second registration (A04) under the merged pseudonym, still on the
    // topics (nothing deleted); the A40 under the survivor; the merged patient's Patient
    // again, inactive and replaced-by the survivor; the late A08 under the old MRN goes to
    // the survivor.
    let m = of("merge.hl7");
    let positions: BTreeSet<i64> = m.iter().map(|c| c.position).collect();
    let [a04, a40, a08] = positions.iter().copied().collect::<Vec<_>>()[..] else {
        panic!("expected three messages in merge.hl7, got positions {positions:?}")
    };
    let at = |pos: i64| -> Vec<&&Canonical> { m.iter().filter(|c| c.position == pos).collect() };
    let registration = at(a04);
    assert!(registration.iter().any(|c| c.resource_type == "Patient"));
    assert!(registration.iter().any(|c| c.resource_type == "Encounter"));
    assert!(registration.iter().all(|c| c.key == merged));
    let merge_records = at(a40);
    let replaced: Vec<&&&Canonical> = merge_records.iter().filter(|c| c.key == merged).collect();
    let [stub] = &replaced[..] else {
        panic!("expected one replaced-by Patient at the A40's position")
    };
    assert_eq!(stub.resource_type, "Patient");
    assert_eq!(
        stub.fhir["id"],
        canonization::mapping::patient_id(&merged).as_str()
    );
    assert_eq!(stub.fhir["active"], false);
    assert_eq!(stub.fhir["link"][0]["type"], "replaced-by");
    assert_eq!(
        stub.fhir["link"][0]["other"]["reference"],
        survivor_ref.as_str()
    );
    assert!(merge_records
        .iter()
        .any(|c| c.key == survivor && c.resource_type == "Patient"));
    assert!(at(a08).iter().all(|c| c.key == survivor));

    // The audit trail finds the merge under either pseudonym.
    p.wait_for_audit_catch_up(Duration::from_secs(120));
    for pseudonym in [&survivor, &merged] {
        let trail = auditing::query::trace(&p.audit_dir(), pseudonym).unwrap();
        let found: Vec<_> = trail
            .iter()
            .filter(|e| e.event_type == "PatientMerged")
            .collect();
        assert_eq!(found.len(), 1, "PatientMerged in the trail of {pseudonym}");
        assert_eq!(found[0].subject.as_deref(), Some(survivor.as_str()));
        assert_eq!(found[0].related_subject.as_deref(), Some(merged.as_str()));
    }

    // No identifier of the human reaches the anonymization or canonical topics.
    let mut downstream_topics: Vec<String> = topics.into_keys().collect();
    downstream_topics.push(p.topics.name(TopicKind::Anonymization));
    let downstream = p.read(&downstream_topics);
    let phi: Vec<String> = [
        "SH-0042817",
        "SH-0099301",
        "0042817",
        "Vantongeren",
        "Rosalind",
        "Rosalyn",
        "999-52-6613",
        "555-318-4472",
        "Quillfeather",
        "01609",
        "1968-03-14",
        "19680314",
        "4f0c9a3e-5d1b-4c62-9e7a-0b8d2f6a1c33",
        "b7d2e1c4-8a6f-4f1e-93d0-5c2a7e9b4d18",
        "VIS4417",
    ]
    .map(String::from)
    .to_vec();
    let leaked = tests::in_clear(&downstream, &phi);
    assert!(
        leaked.is_empty(),
        "in clear downstream: {leaked:?}\n{}",
        tests::leak_report(&downstream, &leaked)
    );
}
