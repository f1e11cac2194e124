//! End-to-end test of compensation on the real broker and registry: a batch that
//! canonization fails at its close (too many records it cannot map) after it published
//! the batch's good records. Canonization, SIGKILLed while it works through the batch and
//! restarted, withdraws every record it published exactly once: a new version under the
//! same key and id with status `entered-in-error` and a tag, so the latest version of each
//! is withdrawn; nothing is deleted; the batch gets one `CanonicalBatchWithdrawn` whose
//! counts match what was published; and the audit trace of the batch lists the chain in
//! causal order.
//!
//! A large batch is withdrawn over many transactions; canonization SIGKILLed in the middle
//! of them and restarted withdraws each record exactly once all the same.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use pipeline::events::Payload;
use pipeline::readback::Record;
use pipeline::topics::TopicKind;
use pipeline::ResourceType;
use rdkafka::message::Message;
use serde_json::{json, Value};
use tests::Pipeline;

/// One Patient, `good` Observations of it and `bad` MedicationRequests whose `intent` is
/// not an R4 code, which canonization dead-letters, failing the batch over its threshold.
fn ndjson(good: usize, bad: usize, tag: &str) -> Vec<u8> {
    let subject = json!({"reference": format!("Patient/p-{tag}")});
    let mut lines = vec![json!({"resourceType": "Patient", "id": format!("p-{tag}"),
        "gender": "female", "birthDate": "1970-01-01"})];
    for i in 0..good {
        lines.push(
            json!({"resourceType": "Observation", "id": format!("o-{tag}-{i}"),
            "status": "final", "subject": subject,
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "valueQuantity": {"value": 60 + (i % 40), "unit": "/min",
                              "system": "http://unitsofmeasure.org", "code": "/min"}}),
        );
    }
    for i in 0..bad {
        lines.push(
            json!({"resourceType": "MedicationRequest", "id": format!("m-{tag}-{i}"),
            "status": "active", "intent": "whenever", "subject": subject,
            "medicationCodeableConcept": {"coding": [{
                "system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361"}]}}),
        );
    }
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    (text.join("\n") + "\n").into_bytes()
}

/// Every version of every canonical Observation of the batch, in topic order per
/// partition: (key, id) -> [withdrawn?, ...]. Each withdrawal is checked: tagged and
/// valid FHIR R4.
fn observation_versions(
    records: &[Record],
    observations: &str,
    batch: &str,
) -> HashMap<(String, String), Vec<bool>> {
    let validator = canonization::validate::FhirValidator::new().unwrap();
    let mut versions: HashMap<(String, String), Vec<bool>> = HashMap::new();
    let mut by_partition: BTreeMap<(i32, i64), (String, String, bool)> = BTreeMap::new();
    for r in records.iter().filter(|r| r.message.topic() == observations) {
        let Some(Payload::CanonicalObservation(o)) = r.event.as_ref().map(|e| &e.payload) else {
            continue;
        };
        if o.provenance.batch_id != batch {
            continue;
        }
        let fhir: Value = serde_json::from_str(&o.fhir_json).unwrap();
        let withdrawn = fhir["status"] == "entered-in-error";
        if withdrawn {
            assert_eq!(fhir["meta"]["tag"][0]["code"], "withdrawn", "{fhir}");
            validator
                .validate(&fhir)
                .expect("a withdrawal is valid FHIR R4");
        }
        let key = String::from_utf8(r.message.key().unwrap().to_vec()).unwrap();
        by_partition.insert(
            (r.message.partition(), r.message.offset()),
            (key, o.resource_id.clone(), withdrawn),
        );
    }
    for (_, (key, id, withdrawn)) in by_partition {
        versions.entry((key, id)).or_default().push(withdrawn);
    }
    versions
}

/// The batch's closing events at canonization, in topic order.
fn closing_events<'a>(records: &'a [Record], batch: &str) -> Vec<&'a Payload> {
    records
        .iter()
        .filter_map(|r| r.event.as_ref())
        .filter(|e| e.header.correlation_id == batch)
        .map(|e| &e.payload)
        .filter(|p| {
            matches!(
                p,
                Payload::CanonicalBatchWithdrawn(_)
                    | Payload::CanonizationFailed(_)
                    | Payload::EventDataCanonizationCompleted(_)
            )
        })
        .collect()
}

/// The batch's canonization closing: exactly one `CanonizationFailed` (over the failure
/// threshold), then exactly one `CanonicalBatchWithdrawn` that it triggered.
fn failed_then_withdrawn<'a>(
    records: &'a [Record],
    batch: &str,
) -> &'a pipeline::events::CanonicalBatchWithdrawn {
    let closing = closing_events(records, batch);
    let [Payload::CanonizationFailed(failed), Payload::CanonicalBatchWithdrawn(w)] = &closing[..]
    else {
        panic!("expected one CanonizationFailed and one CanonicalBatchWithdrawn: {closing:?}")
    };
    assert_eq!(failed.error_kind, "failure_threshold");
    assert_eq!(w.trigger, "CanonizationFailed");
    w
}

#[test]
fn a_failed_batch_is_withdrawn_exactly_once_across_a_sigkill_of_canonization() {
    let mut p = Pipeline::new();
    for s in ["auditing", "ingestion", "anonymization", "canonization"] {
        p.start(s, &[]);
    }
    let file = ndjson(400, 40, &tests::fresh_tag());
    let batch = tests::batch_of(&file);
    let tail = p.tail();
    let lifecycle = p.topics.name(TopicKind::Canonization);
    let observations = p
        .topics
        .name(TopicKind::Canonical(ResourceType::Observation));
    p.drop_file("observations.ndjson", &file);
    // SIGKILL canonization in the middle of the batch; its restart redoes what was not
    // committed, fails the batch at its close and withdraws what it published.
    p.wait_for(&tail, "canonical records", Duration::from_secs(180), |t| {
        t.count(&observations, "CanonicalObservation") >= 100
    });
    p.kill("canonization");
    p.start("canonization", &[]);
    p.wait_for(
        &tail,
        "CanonicalBatchWithdrawn",
        Duration::from_secs(180),
        |t| t.count(&lifecycle, "CanonicalBatchWithdrawn") >= 1,
    );
    // Let anything late arrive (it must not).
    std::thread::sleep(Duration::from_secs(3));
    p.wait_for_audit_catch_up(Duration::from_secs(120));
    let records = p.read_all();

    let w = failed_then_withdrawn(&records, &batch);

    let versions = observation_versions(&records, &observations, &batch);
    let published = versions.len();
    // The batch closes only once all its records are in: every good one was published.
    assert_eq!(published, 400);
    for ((key, id), v) in &versions {
        // Published once, withdrawn once, and the withdrawal is the latest version.
        assert_eq!(v, &vec![false, true], "versions of {id} under {key}: {v:?}");
    }
    assert_eq!(w.records_withdrawn, published as i64);
    assert_eq!(
        w.withdrawn_by_type.get("Observation").copied(),
        Some(published as i64)
    );
    // The batch's Patient is kept: other batches' records may reference it.
    let patients = records
        .iter()
        .filter(|r| {
            matches!(r.event.as_ref().map(|e| &e.payload),
                Some(Payload::CanonicalPatient(c)) if c.provenance.batch_id == batch)
        })
        .count();
    assert_eq!(w.records_kept, patients as i64);

    // The audit trail holds the chain in causal order.
    let trail = auditing::query::trace(&p.audit_dir(), &batch).unwrap();
    let at = |t: &str| {
        trail
            .iter()
            .position(|e| e.event_type == t)
            .unwrap_or_else(|| panic!("{t} not in the trace of the batch"))
    };
    assert!(at("AnonymizationFinished") < at("CanonizationFailed"));
    assert!(at("CanonizationFailed") < at("CanonicalBatchWithdrawn"));
    let withdrawals_audited = trail
        .iter()
        .filter(|e| e.event_type == "CanonicalObservation")
        .count();
    assert_eq!(
        withdrawals_audited,
        2 * published,
        "originals and withdrawals"
    );

    // The operator sees the batch withdrawn, the step that failed it and why.
    let run = |args: &[&str]| {
        let o = p.medpipe(args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<Value>(&o.stdout).expect("json")
    };
    let status = run(&["batch", "status", &batch, "--json", "--unseal"]);
    assert_eq!(status["state"], "withdrawn", "{status}");
    assert_eq!(status["failed_step"], "canonization");
    assert_eq!(status["ingestion"]["state"], "finished");
    assert_eq!(status["anonymization"]["state"], "finished");
    assert_eq!(status["canonization"]["state"], "failed");
    assert_eq!(status["ingestion"]["records"], 441);
    let reason = status["canonization"]["reason"].as_str().expect("reason");
    assert!(reason.contains("40 of 441"), "{reason}");
    let held = run(&["batch", "list", "--state", "withdrawn", "--json"]);
    let ids: Vec<&str> = held
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|b| b["batch"].as_str())
        .collect();
    assert_eq!(ids, vec![batch.as_str()]);
    let unknown = p.medpipe(&["batch", "status", "no-such-batch"]);
    assert!(!unknown.status.success());
}

/// A batch of 3,000 published Observations, withdrawn 10 records per transaction: the
/// withdrawal takes about 300 transactions. Canonization is stopped (SIGSTOP) once the
/// first withdrawals are committed, the test checks that some but not all are, then
/// SIGKILLs it and starts it again. Every record ends with exactly one withdrawal, the
/// latest version, and the batch with one `CanonicalBatchWithdrawn` counting 3,000.
#[test]
fn a_withdrawal_killed_between_its_transactions_withdraws_every_record_once() {
    const GOOD: usize = 3_000;
    let slow = [("MEDPIPE_WITHDRAW_PER_TXN", "10")];
    let mut p = Pipeline::new();
    for s in ["auditing", "ingestion", "anonymization"] {
        p.start(s, &[]);
    }
    p.start("canonization", &slow);
    let file = ndjson(GOOD, GOOD / 10, &tests::fresh_tag());
    let batch = tests::batch_of(&file);
    let tail = p.tail();
    let lifecycle = p.topics.name(TopicKind::Canonization);
    let observations = p
        .topics
        .name(TopicKind::Canonical(ResourceType::Observation));
    p.drop_file("observations.ndjson", &file);
    // Every version on the topic past the first GOOD is a withdrawal.
    p.wait_for(
        &tail,
        "the first withdrawals",
        Duration::from_secs(300),
        |t| t.count(&observations, "CanonicalObservation") > GOOD,
    );
    p.pause("canonization");
    // What the paused stage committed, once the tail has read it all.
    std::thread::sleep(Duration::from_secs(3));
    let before = tail.count(&observations, "CanonicalObservation") - GOOD;
    assert!(
        before > 0 && before < GOOD,
        "the stage was paused in the middle of the withdrawal: {before} of {GOOD} withdrawn"
    );
    assert_eq!(tail.count(&lifecycle, "CanonicalBatchWithdrawn"), 0);
    p.kill("canonization");
    p.start("canonization", &slow);
    p.wait_for(
        &tail,
        "CanonicalBatchWithdrawn",
        Duration::from_secs(300),
        |t| t.count(&lifecycle, "CanonicalBatchWithdrawn") >= 1,
    );
    std::thread::sleep(Duration::from_secs(3));
    let records = p.read_all();

    let w = failed_then_withdrawn(&records, &batch);
    let versions = observation_versions(&records, &observations, &batch);
    assert_eq!(versions.len(), GOOD);
    let wrong: Vec<_> = versions
        .iter()
        .filter(|(_, v)| *v != &vec![false, true])
        .take(5)
        .collect();
    assert!(
        wrong.is_empty(),
        "not published once then withdrawn once (first 5): {wrong:?}"
    );
    assert_eq!(w.records_withdrawn, GOOD as i64);
    assert_eq!(
        w.withdrawn_by_type.get("Observation").copied(),
        Some(GOOD as i64)
    );
    // The operator sees it withdrawn.
    p.wait_for_audit_catch_up(Duration::from_secs(120));
    let o = p.medpipe(&["batch", "status", &batch, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let status: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(status["state"], "withdrawn", "{status}");
}
