//! End-to-end tests of the batch saga's operator transitions on the real broker and
//! registry: a batch that ingestion fails mid-way (too many bad lines) is held and
//! withdrawn downstream, then retried from its encrypted archive after the operator
//! raised the threshold, once per request; and an operator withdraws a batch that
//! completed. Each checks what was published against what was withdrawn, that nothing
//! was deleted, and the compensation chain in the audit trail, in causal order.

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

/// One Patient, `good` Observations of it, and `bad` lines that are not JSON, which
/// ingestion rejects (one after every tenth Observation, so the file breaks mid-way).
fn ndjson(good: usize, bad: usize, tag: &str) -> Vec<u8> {
    let subject = json!({"reference": format!("Patient/p-{tag}")});
    let mut lines = vec![json!({"resourceType": "Patient", "id": format!("p-{tag}"),
        "gender": "male", "birthDate": "1960-05-05"})
    .to_string()];
    let mut bad_left = bad;
    for i in 0..good {
        lines.push(
            json!({"resourceType": "Observation", "id": format!("o-{tag}-{i}"),
            "status": "final", "subject": subject,
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "valueQuantity": {"value": 60 + (i % 40), "unit": "/min",
                              "system": "http://unitsofmeasure.org", "code": "/min"}})
            .to_string(),
        );
        if i % 10 == 9 && bad_left > 0 {
            lines.push(format!(
                "{{\"resourceType\": \"Observation\", \"id\": \"bad-{i}\""
            ));
            bad_left -= 1;
        }
    }
    (lines.join("\n") + "\n").into_bytes()
}

/// Versions of each canonical Observation of `batches`, in topic order per partition:
/// (key, id) -> [(batch, withdrawn?), ...].
fn versions(
    records: &[Record],
    topic: &str,
    batches: &[&str],
) -> HashMap<(String, String), Vec<(String, bool)>> {
    let mut ordered: BTreeMap<(i32, i64), (String, String, String, bool)> = BTreeMap::new();
    for r in records.iter().filter(|r| r.message.topic() == topic) {
        let Some(Payload::CanonicalObservation(o)) = r.event.as_ref().map(|e| &e.payload) else {
            continue;
        };
        if !batches.contains(&o.provenance.batch_id.as_str()) {
            continue;
        }
        let fhir: Value = serde_json::from_str(&o.fhir_json).unwrap();
        let withdrawn = fhir["status"] == "entered-in-error";
        if withdrawn {
            assert_eq!(fhir["meta"]["tag"][0]["code"], "withdrawn", "{fhir}");
        }
        let key = String::from_utf8(r.message.key().unwrap().to_vec()).unwrap();
        ordered.insert(
            (r.message.partition(), r.message.offset()),
            (
                key,
                o.resource_id.clone(),
                o.provenance.batch_id.clone(),
                withdrawn,
            ),
        );
    }
    let mut out: HashMap<(String, String), Vec<(String, bool)>> = HashMap::new();
    for (_, (key, id, batch, withdrawn)) in ordered {
        out.entry((key, id)).or_default().push((batch, withdrawn));
    }
    out
}

/// Checks the versions of every record of a failed batch that a new attempt published
/// again: published and withdrawn by the failed batch (when it published it before the
/// failure reached canonization; otherwise held, never published), then published by the
/// new attempt, last. Returns how many the failed batch published.
fn withdrawn_then_republished(
    v: &HashMap<(String, String), Vec<(String, bool)>>,
    failed: &str,
    again: &str,
) -> i64 {
    let mut first_published = 0;
    for ((key, id), list) in v {
        let (last, earlier) = list.split_last().unwrap();
        assert_eq!(
            last,
            &(again.to_string(), false),
            "{id} under {key}: {list:?}"
        );
        match earlier {
            [] => {}
            [a, b] => {
                assert_eq!(
                    (a, b),
                    (&(failed.to_string(), false), &(failed.to_string(), true)),
                    "{id}: {list:?}"
                );
                first_published += 1;
            }
            _ => panic!("{id} under {key}: {list:?}"),
        }
    }
    first_published
}

fn events<'a>(
    records: &'a [Record],
    pred: impl Fn(&Payload) -> bool + 'a,
) -> Vec<&'a pipeline::Event> {
    records
        .iter()
        .filter_map(|r| r.event.as_ref())
        .filter(|e| pred(&e.payload))
        .collect()
}

/// Positions of event types in the audit trace of a batch; panics on a missing one.
fn trace_order(p: &Pipeline, batch: &str, types: &[&str]) -> Vec<usize> {
    let trail = auditing::query::trace(&p.audit_dir(), batch).unwrap();
    types
        .iter()
        .map(|t| {
            trail
                .iter()
                .position(|e| e.event_type == *t)
                .unwrap_or_else(|| panic!("{t} not in the trace of {batch}"))
        })
        .collect()
}

/// The four stages running one dropped file, and the topics the tests watch.
struct Run {
    p: Pipeline,
    tail: tests::Tail,
    batch: String,
    lifecycle: String,
    saga: String,
    observations: String,
}

/// Starts the stages (canonization with `canonization_env`) and drops `file` as `name`.
fn run_file(name: &str, file: &[u8], canonization_env: &[(&str, &str)]) -> Run {
    let mut p = Pipeline::new();
    for s in ["auditing", "ingestion", "anonymization"] {
        p.start(s, &[]);
    }
    p.start("canonization", canonization_env);
    let tail = p.tail();
    let run = Run {
        batch: tests::batch_of(file),
        lifecycle: p.topics.name(TopicKind::Canonization),
        saga: p.topics.name(TopicKind::Saga),
        observations: p
            .topics
            .name(TopicKind::Canonical(ResourceType::Observation)),
        tail,
        p,
    };
    run.p.drop_file(name, file);
    run
}

fn cli_json(p: &Pipeline, args: &[&str]) -> Value {
    let o = p.medpipe(args);
    assert!(
        o.status.success(),
        "medpipe {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("json")
}

#[test]
fn a_batch_ingestion_fails_mid_way_is_held_withdrawn_and_retried_once_after_the_fix() {
    // 20 bad lines in 221: 9%, over ingestion's default 5%.
    let Run {
        mut p,
        tail,
        batch,
        lifecycle,
        saga,
        observations,
    } = run_file("vitals.ndjson", &ndjson(200, 20, &tests::fresh_tag()), &[]);
    p.wait_for(&tail, "the withdrawal", Duration::from_secs(180), |t| {
        t.count(&lifecycle, "CanonicalBatchWithdrawn") >= 1 && t.count(&saga, "BatchHeld") >= 1
    });

    // The operator fixes the cause (a higher threshold) and asks for a retry.
    p.stop("ingestion");
    p.start("ingestion", &[("MEDPIPE_MAX_REJECT_RATIO", "0.2")]);
    let request = uuid::Uuid::new_v4().to_string();
    let answer = cli_json(
        &p,
        &[
            "batch",
            "retry",
            &batch,
            "--reason",
            "raised the reject threshold to 20%",
            "--request-id",
            &request,
            "--json",
        ],
    );
    assert_eq!(answer["outcome"], "retried", "{answer}");
    let retry = answer["new_batch"].as_str().expect("new batch").to_string();
    assert_ne!(retry, batch);
    p.wait_for(&tail, "the retried batch", Duration::from_secs(180), |t| {
        t.count(&lifecycle, "EventDataCanonizationCompleted") >= 1
    });
    // The same request again is carried out once: no second attempt.
    let again = cli_json(
        &p,
        &[
            "batch",
            "retry",
            &batch,
            "--reason",
            "again",
            "--request-id",
            &request,
            "--json",
        ],
    );
    assert_eq!(again["new_batch"].as_str(), Some(retry.as_str()));
    p.wait_for(
        &tail,
        "the repeated request",
        Duration::from_secs(60),
        |t| t.count(&saga, "BatchRetryRequested") >= 2,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !p
        .log("ingestion")
        .contains("Retry request already carried out.")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the repeated request was not handled"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    p.wait_for_audit_catch_up(Duration::from_secs(120));
    let records = p.read_all();

    // The first attempt: failed by ingestion, held by anonymization, withdrawn downstream.
    let of = |b: &str, t: &str| {
        records
            .iter()
            .filter_map(|r| r.event.as_ref())
            .filter(|e| e.header.correlation_id == b && e.event_type() == t)
            .count()
    };
    assert_eq!(of(&batch, "DataIngestionFailed"), 1);
    let held = events(
        &records,
        |p| matches!(p, Payload::BatchHeld(h) if h.batch_id == batch),
    );
    let [held] = &held[..] else {
        panic!("{held:?}")
    };
    let Payload::BatchHeld(h) = &held.payload else {
        unreachable!()
    };
    assert_eq!(
        (h.stage.as_str(), h.failed_step.as_str()),
        ("anonymization", "ingestion")
    );
    assert_eq!(h.reason_kind, "upstream_failed");
    // Ingestion emitted every good record before it saw the threshold crossed.
    assert_eq!(h.records_forwarded, 201);
    let withdrawn = events(
        &records,
        |p| matches!(p, Payload::CanonicalBatchWithdrawn(w) if w.batch_id == batch),
    );
    let [withdrawn] = &withdrawn[..] else {
        panic!("{withdrawn:?}")
    };
    let Payload::CanonicalBatchWithdrawn(w) = &withdrawn.payload else {
        unreachable!()
    };
    assert_eq!(w.trigger, "AnonymizationFailed");
    // Only the Patient is kept, if it was published before the failure reached
    // canonization (its records and the failure travel on different partitions).
    assert!(w.records_kept <= 1, "{w:?}");

    // The retry: one new attempt, linked to the old batch and caused by the request.
    let retried = events(&records, |p| matches!(p, Payload::BatchRetried(_)));
    let [retried] = &retried[..] else {
        panic!("{retried:?}")
    };
    let Payload::BatchRetried(r) = &retried.payload else {
        unreachable!()
    };
    assert_eq!(
        (r.batch_id.as_str(), r.new_batch_id.as_str()),
        (batch.as_str(), retry.as_str())
    );
    let requests = events(&records, |p| matches!(p, Payload::BatchRetryRequested(_)));
    assert_eq!(requests.len(), 2, "sent twice");
    assert_eq!(
        retried.header.causation_id.as_deref(),
        Some(requests[0].header.event_id.as_str())
    );
    assert_eq!(of(&retry, "DataIngestionStarted"), 1);
    assert_eq!(of(&retry, "DataIngestionFinished"), 1);
    assert_eq!(of(&retry, "EventDataCanonizationCompleted"), 1);
    assert_eq!(of(&retry, "SourceRecordIngested"), 201);

    // Every Observation the first attempt published before the failure reached
    // canonization was withdrawn, once; the rest of it was held (never published). The
    // retry published every one again. Nothing deleted; the latest version of each is
    // live.
    let v = versions(&records, &observations, &[&batch, &retry]);
    assert_eq!(v.len(), 200);
    assert_eq!(
        w.records_withdrawn,
        withdrawn_then_republished(&v, &batch, &retry)
    );

    // The trail tells the story of each attempt in causal order.
    let old = trace_order(
        &p,
        &batch,
        &[
            "DataIngestionFailed",
            "AnonymizationFailed",
            "BatchHeld",
            "CanonizationFailed",
            "CanonicalBatchWithdrawn",
            "BatchRetryRequested",
            "BatchRetried",
        ],
    );
    // Held and the canonization failure both follow the anonymization failure, in either
    // order; the rest is a chain.
    assert!(old[0] < old[1] && old[1] < old[2], "{old:?}");
    assert!(
        old[1] < old[3] && old[3] < old[4] && old[4] < old[5] && old[5] < old[6],
        "{old:?}"
    );
    // The new attempt's trace starts with the link (same transaction as its opening).
    let new = trace_order(
        &p,
        &retry,
        &[
            "BatchRetried",
            "DataIngestionCreated",
            "EventDataCanonizationCompleted",
        ],
    );
    assert!(new[0] < new[2] && new[1] < new[2], "{new:?}");

    // The operator sees both attempts.
    let status = cli_json(&p, &["batch", "status", &retry, "--json"]);
    assert_eq!(status["state"], "published", "{status}");
    let status = cli_json(&p, &["batch", "status", &batch, "--json"]);
    assert_eq!(status["state"], "retried", "{status}");
    assert_eq!(status["failed_step"], "ingestion", "{status}");
    assert_eq!(status["retried_as"], json!([retry]), "{status}");
    assert!(status["withdrawn_at"].is_i64(), "{status}");
    // And so does the status API the auditing stage serves.
    let body = api_json(&p, &format!("/batches/{retry}"));
    assert_eq!(
        (body["state"].as_str(), body["retry_of"].as_str()),
        (Some("published"), Some(batch.as_str())),
        "{body}"
    );
    let retried = api_json(&p, "/batches?state=retried");
    assert_eq!(retried.as_array().map(Vec::len), Some(1), "{retried}");
    assert_eq!(retried[0]["batch"], batch.as_str());
}

/// The JSON body of a 200 answer of the auditing stage's batch status API.
fn api_json(p: &Pipeline, path: &str) -> Value {
    let response = p.http_get("auditing", path);
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{path}: {head}"
    );
    serde_json::from_str(body).expect("json")
}

#[test]
fn an_operator_withdraws_a_completed_batch_once() {
    let Run {
        mut p,
        tail,
        batch,
        lifecycle,
        saga,
        observations,
    } = run_file("vitals.ndjson", &ndjson(60, 0, &tests::fresh_tag()), &[]);
    p.wait_for(&tail, "the batch", Duration::from_secs(180), |t| {
        t.count(&lifecycle, "EventDataCanonizationCompleted") >= 1
    });
    let answer = cli_json(
        &p,
        &[
            "batch",
            "withdraw",
            &batch,
            "--reason",
            "sent to the wrong tenant",
            "--json",
        ],
    );
    assert_eq!(answer["outcome"], "withdrawn", "{answer}");
    assert_eq!(answer["records_withdrawn"], 60, "{answer}");
    assert_eq!(answer["records_kept"], 1, "{answer}");
    assert!(answer.get("note").is_none(), "{answer}");
    // A second request finds it withdrawn: nothing more is published.
    let again = cli_json(
        &p,
        &["batch", "withdraw", &batch, "--reason", "again", "--json"],
    );
    assert_eq!(again["note"], "withdrawn before this request", "{again}");
    p.wait_for(&tail, "the second request", Duration::from_secs(60), |t| {
        t.count(&saga, "BatchWithdrawalRequested") >= 2
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !p.log("canonization").contains("already withdrawn") {
        assert!(
            std::time::Instant::now() < deadline,
            "the second request was not handled"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    p.wait_for_audit_catch_up(Duration::from_secs(120));
    let records = p.read_all();

    let v = versions(&records, &observations, &[&batch]);
    assert_eq!(v.len(), 60);
    for ((key, id), list) in &v {
        assert_eq!(
            list,
            &vec![(batch.clone(), false), (batch.clone(), true)],
            "{id} under {key}"
        );
    }
    let withdrawn = events(&records, |p| {
        matches!(p, Payload::CanonicalBatchWithdrawn(_))
    });
    assert_eq!(withdrawn.len(), 1);
    // No operator words on a data topic.
    let canonical: Vec<String> = TopicKind::canonical().map(|k| p.topics.name(k)).collect();
    assert!(records
        .iter()
        .filter(|r| canonical.contains(&r.message.topic().to_string()))
        .all(|r| !tests::contains_word(r.message.payload().unwrap_or_default(), "tenant")));

    let order = trace_order(
        &p,
        &batch,
        &[
            "EventDataCanonizationCompleted",
            "BatchWithdrawalRequested",
            "CanonicalBatchWithdrawn",
        ],
    );
    assert!(order[0] < order[1] && order[1] < order[2], "{order:?}");
    let status = cli_json(&p, &["batch", "status", &batch, "--json"]);
    assert_eq!(status["state"], "withdrawn", "{status}");
}

/// One Patient, `good` Observations of it and `orphans` Observations that name no patient,
/// which anonymization dead-letters (it cannot key them), failing the batch over its
/// threshold.
fn with_orphans(good: usize, orphans: usize, tag: &str) -> Vec<u8> {
    let mut text = String::from_utf8(ndjson(good, 0, tag)).unwrap();
    for i in 0..orphans {
        text.push_str(
            &json!({"resourceType": "Observation", "id": format!("orphan-{tag}-{i}"),
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "valueQuantity": {"value": 70, "unit": "/min",
                              "system": "http://unitsofmeasure.org", "code": "/min"}})
            .to_string(),
        );
        text.push('\n');
    }
    text.into_bytes()
}

#[test]
fn a_batch_anonymization_fails_is_held_withdrawn_and_released_partial() {
    // 10 of 111 records cannot be keyed: 9%, over anonymization's default 5%.
    let Run {
        mut p,
        tail,
        batch,
        lifecycle,
        saga,
        observations,
    } = run_file(
        "orphans.ndjson",
        &with_orphans(100, 10, &tests::fresh_tag()),
        &[],
    );
    p.wait_for(&tail, "the withdrawal", Duration::from_secs(180), |t| {
        t.count(&lifecycle, "CanonicalBatchWithdrawn") >= 1 && t.count(&saga, "BatchHeld") >= 1
    });
    let answer = cli_json(
        &p,
        &[
            "batch",
            "release",
            &batch,
            "--reason",
            "the 10 unkeyed vitals are not needed",
            "--json",
        ],
    );
    assert_eq!(answer["outcome"], "releasing", "{answer}");
    let release = answer["new_batch"].as_str().expect("new batch").to_string();
    p.wait_for(&tail, "the release", Duration::from_secs(180), |t| {
        t.count(&saga, "BatchReleased") >= 1
    });
    std::thread::sleep(Duration::from_secs(2));
    p.wait_for_audit_catch_up(Duration::from_secs(120));
    let records = p.read_all();

    // Held by anonymization, its own step having failed it.
    let held = events(
        &records,
        |p| matches!(p, Payload::BatchHeld(h) if h.batch_id == batch),
    );
    let [held] = &held[..] else {
        panic!("{held:?}")
    };
    let Payload::BatchHeld(h) = &held.payload else {
        unreachable!()
    };
    assert_eq!(
        (h.failed_step.as_str(), h.reason_kind.as_str()),
        ("anonymization", "failure_threshold")
    );
    let withdrawn = events(
        &records,
        |p| matches!(p, Payload::CanonicalBatchWithdrawn(w) if w.batch_id == batch),
    );
    let [withdrawn] = &withdrawn[..] else {
        panic!("{withdrawn:?}")
    };
    let Payload::CanonicalBatchWithdrawn(w) = &withdrawn.payload else {
        unreachable!()
    };
    assert_eq!(w.trigger, "AnonymizationFailed");

    let v = versions(&records, &observations, &[&batch, &release]);
    assert_eq!(
        v.len(),
        100,
        "every good Observation is published by the release"
    );
    // What the first attempt published before the failure reached canonization was
    // withdrawn, each once; what came after was held (never published). Then the
    // release published every one, tagged partial: the latest version of each is live.
    assert_eq!(
        w.records_withdrawn,
        withdrawn_then_republished(&v, &batch, &release)
    );
    for r in records.iter().filter(|r| r.message.topic() == observations) {
        let Some(Payload::CanonicalObservation(o)) = r.event.as_ref().map(|e| &e.payload) else {
            continue;
        };
        if o.provenance.batch_id == release {
            let fhir: Value = serde_json::from_str(&o.fhir_json).unwrap();
            let tags = fhir["meta"]["tag"].as_array().expect("tags");
            assert!(tags.iter().any(|t| t["code"] == "partial"), "{fhir}");
        }
    }
    let released = events(&records, |p| matches!(p, Payload::BatchReleased(_)));
    let [released] = &released[..] else {
        panic!("{released:?}")
    };
    let Payload::BatchReleased(r) = &released.payload else {
        unreachable!()
    };
    assert_eq!(
        (r.batch_id.as_str(), r.new_batch_id.as_str()),
        (batch.as_str(), release.as_str())
    );
    assert_eq!((r.records_published, r.records_left_out), (101, 0));
    // The release's bad records are dead-lettered again, not dropped: 10 per attempt.
    let finished = events(
        &records,
        |p| matches!(p, Payload::AnonymizationFinished(f) if f.batch_id == release),
    );
    let [finished] = &finished[..] else {
        panic!("{finished:?}")
    };
    let Payload::AnonymizationFinished(f) = &finished.payload else {
        unreachable!()
    };
    assert_eq!(
        (f.records_anonymized, f.records_dead_lettered),
        (Some(101), Some(10))
    );
    assert_eq!(f.release_of.as_deref(), Some(batch.as_str()));
    let dlq = p.read(&[p.topics.dlq("anonymization")]);
    assert_eq!(dlq.len(), 20);

    let order = trace_order(
        &p,
        &batch,
        &[
            "AnonymizationFailed",
            "BatchHeld",
            "CanonicalBatchWithdrawn",
            "BatchReleaseRequested",
            "BatchRetried",
            "BatchReleased",
        ],
    );
    assert!(order[0] < order[1] && order[0] < order[2], "{order:?}");
    assert!(
        order[2] < order[3] && order[3] < order[4] && order[4] < order[5],
        "{order:?}"
    );
    let status = cli_json(&p, &["batch", "status", &batch, "--json"]);
    assert_eq!(
        (status["state"].as_str(), status["released_as"].as_str()),
        (Some("released"), Some(release.as_str())),
        "{status}"
    );
    let body = api_json(&p, &format!("/batches/{release}"));
    assert_eq!(body["release_of"].as_str(), Some(batch.as_str()), "{body}");
}

/// One Patient, `observations` Observations and `orders` MedicationRequests of it.
fn with_orders(observations: usize, orders: usize, tag: &str) -> Vec<u8> {
    let mut text = String::from_utf8(ndjson(observations, 0, tag)).unwrap();
    for i in 0..orders {
        text.push_str(
            &json!({"resourceType": "MedicationRequest", "id": format!("m-{tag}-{i}"),
            "status": "active", "intent": "order",
            "subject": {"reference": format!("Patient/p-{tag}")},
            "medicationCodeableConcept": {"coding": [{
                "system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361"}]}})
            .to_string(),
        );
        text.push('\n');
    }
    text.into_bytes()
}

#[test]
fn dead_letters_are_redriven_once_after_the_fix_even_across_a_sigkill() {
    use std::io::BufRead;
    // A broken mapping table: MedicationRequest's intent codes lack "order", so
    // canonization dead-letters every order (40 of 841, under its 5% threshold).
    let broken = std::env::temp_dir().join(format!("medpipe-broken-maps-{}", tests::fresh_tag()));
    std::fs::create_dir_all(&broken).unwrap();
    let table = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../canonization/data/fhir.toml"),
    )
    .unwrap();
    let good = "intent = [\"proposal\", \"plan\", \"order\", ";
    assert!(
        table.contains(good),
        "the built-in table changed: update this test"
    );
    let bad = table.replace(good, "intent = [\"proposal\", \"plan\", ");
    std::fs::write(broken.join("fhir.toml"), bad).unwrap();
    let broken_dir = broken.display().to_string();
    let Run {
        mut p,
        tail,
        batch,
        lifecycle,
        ..
    } = run_file(
        "orders.ndjson",
        &with_orders(800, 40, &tests::fresh_tag()),
        &[("MEDPIPE_MAPPING_DIR", broken_dir.as_str())],
    );
    let orders = p
        .topics
        .name(TopicKind::Canonical(ResourceType::MedicationRequest));
    p.wait_for(&tail, "the batch", Duration::from_secs(240), |t| {
        t.count(&lifecycle, "EventDataCanonizationCompleted") >= 1
    });
    let listed = cli_json(&p, &["dlq", "list", "canonization", "--json"]);
    assert_eq!(
        listed["dead_letters"].as_array().map(Vec::len),
        Some(40),
        "{listed}"
    );

    // The operator fixes the table (back to the built-in one) and redrives; the first
    // run is SIGKILLed after its first transaction committed.
    p.stop("canonization");
    p.start("canonization", &[]);
    let mut first = p
        .medpipe_command(&["dlq", "redrive", "canonization", "--per-transaction", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(first.stderr.take().unwrap()).lines();
    let progress = lines
        .find_map(|l| l.ok().filter(|l| l.starts_with("redriven ")))
        .expect("the first run's progress");
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(progress.starts_with("redriven 1/40"), "{progress}");
    let second = cli_json(&p, &["dlq", "redrive", "canonization", "--json"]);
    let before = second["already_redriven"].as_u64().unwrap();
    assert!((1..40).contains(&before), "killed mid-way: {second}");
    assert_eq!(
        second["redriven"].as_u64().unwrap() + before,
        40,
        "{second}"
    );
    p.wait_for(
        &tail,
        "the redriven orders",
        Duration::from_secs(120),
        |t| t.count(&orders, "CanonicalMedicationRequest") >= 40,
    );
    let third = cli_json(&p, &["dlq", "redrive", "canonization", "--json"]);
    assert_eq!(
        (
            third["redriven"].as_u64(),
            third["already_redriven"].as_u64()
        ),
        (Some(0), Some(40)),
        "{third}"
    );
    std::thread::sleep(Duration::from_secs(3));

    // Each dead letter reached the canonical topic exactly once.
    let records = p.read_all();
    let mut ids: HashMap<String, usize> = HashMap::new();
    for r in records.iter().filter(|r| r.message.topic() == orders) {
        if let Some(Payload::CanonicalMedicationRequest(m)) = r.event.as_ref().map(|e| &e.payload) {
            assert_eq!(m.provenance.batch_id, batch);
            *ids.entry(m.resource_id.clone()).or_default() += 1;
        }
    }
    assert_eq!(ids.len(), 40);
    assert!(ids.values().all(|n| *n == 1), "{ids:?}");
    let anonymized = p.topics.name(TopicKind::Anonymization);
    let copies = records
        .iter()
        .filter(|r| r.message.topic() == anonymized)
        .filter(|r| pipeline::runner::dlq_headers::redrive_count(&r.message) == 1)
        .count();
    assert_eq!(copies, 40, "one redriven copy per dead letter");
    // Nothing deleted, and nothing more dead-lettered.
    assert_eq!(p.read(&[p.topics.dlq("canonization")]).len(), 40);
    // The batch closed once; a withdrawal of it now withdraws the late records too.
    assert_eq!(tail.count(&lifecycle, "EventDataCanonizationCompleted"), 1);
    let answer = cli_json(
        &p,
        &["batch", "withdraw", &batch, "--reason", "test", "--json"],
    );
    assert_eq!(answer["records_withdrawn"], 840, "{answer}");
    let _ = std::fs::remove_dir_all(&broken);
}

#[test]
fn a_batch_reprocessed_under_a_new_policy_gets_new_versions_linked_to_the_old() {
    let Run {
        mut p,
        tail,
        batch,
        lifecycle,
        saga,
        observations,
    } = run_file("vitals.ndjson", &ndjson(50, 0, &tests::fresh_tag()), &[]);
    p.wait_for(&tail, "the batch", Duration::from_secs(180), |t| {
        t.count(&lifecycle, "EventDataCanonizationCompleted") >= 1
    });

    // A new policy version is deployed, then the batch is reprocessed under it.
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../anonymization/policies/safe-harbor.toml"),
    )
    .unwrap();
    let old_version = "version = \"2026.12.2\"";
    assert!(
        shipped.contains(old_version),
        "the shipped policy changed: update this test"
    );
    let policy = std::env::temp_dir().join(format!("medpipe-policy-{}.toml", tests::fresh_tag()));
    std::fs::write(
        &policy,
        shipped.replace(old_version, "version = \"2026.12.2-r1\""),
    )
    .unwrap();
    p.stop("anonymization");
    let policy_path = policy.display().to_string();
    p.start(
        "anonymization",
        &[("MEDPIPE_POLICY_FILE", policy_path.as_str())],
    );
    let answer = cli_json(
        &p,
        &[
            "reprocess",
            &batch,
            "--policy",
            "2026.12.2-r1",
            "--reason",
            "policy 2026.12.2-r1",
            "--json",
        ],
    );
    assert_eq!(answer["outcome"], "reprocessing", "{answer}");
    let again = answer["new_batch"].as_str().expect("new batch").to_string();
    p.wait_for(&tail, "the reprocessing", Duration::from_secs(180), |t| {
        t.count(&saga, "BatchReprocessed") >= 1
    });
    // Asked for a version no stage runs: the attempt is held, nothing is published.
    let wrong = cli_json(
        &p,
        &[
            "reprocess",
            &batch,
            "--policy",
            "1999.1.1",
            "--reason",
            "typo",
            "--json",
        ],
    );
    let wrong_batch = wrong["new_batch"].as_str().expect("new batch").to_string();
    p.wait_for(&tail, "the hold", Duration::from_secs(120), |t| {
        t.count(&saga, "BatchHeld") >= 1
    });
    std::thread::sleep(Duration::from_secs(3));
    p.wait_for_audit_catch_up(Duration::from_secs(120));
    let records = p.read_all();

    let mut by_id: HashMap<String, Vec<(String, String, bool)>> = HashMap::new();
    for r in records.iter().filter(|r| r.message.topic() == observations) {
        let Some(Payload::CanonicalObservation(o)) = r.event.as_ref().map(|e| &e.payload) else {
            continue;
        };
        let fhir: Value = serde_json::from_str(&o.fhir_json).unwrap();
        let tagged = fhir["meta"]["tag"].as_array().is_some_and(|t| {
            t.iter().any(|t| {
                t["code"] == "reprocessed"
                    && t["display"].as_str().is_some_and(|d| d.contains(&batch))
            })
        });
        by_id.entry(o.resource_id.clone()).or_default().push((
            o.provenance.batch_id.clone(),
            o.provenance.policy_version.clone(),
            tagged,
        ));
    }
    assert_eq!(by_id.len(), 50);
    for (id, v) in &by_id {
        assert_eq!(
            v,
            &vec![
                (batch.clone(), "2026.12.2".to_string(), false),
                (again.clone(), "2026.12.2-r1".to_string(), true),
            ],
            "versions of {id}"
        );
    }
    let done = events(&records, |p| matches!(p, Payload::BatchReprocessed(_)));
    let [done] = &done[..] else {
        panic!("{done:?}")
    };
    let Payload::BatchReprocessed(r) = &done.payload else {
        unreachable!()
    };
    assert_eq!(
        (r.batch_id.as_str(), r.new_batch_id.as_str()),
        (batch.as_str(), again.as_str())
    );
    assert_eq!(
        (r.policy_version.as_str(), r.records_published),
        ("2026.12.2-r1", 51)
    );
    let held = events(
        &records,
        |p| matches!(p, Payload::BatchHeld(h) if h.batch_id == wrong_batch),
    );
    let [held] = &held[..] else {
        panic!("{held:?}")
    };
    let Payload::BatchHeld(h) = &held.payload else {
        unreachable!()
    };
    assert_eq!(h.reason_kind, "policy_version_mismatch");
    assert!(records.iter().filter_map(|r| r.event.as_ref()).all(|e| {
        e.payload
            .canonical()
            .is_none_or(|(_, _, prov)| prov.batch_id != wrong_batch)
    }));

    // The old versions stay in the trail; the batch stays published, with its newer version.
    let trail = auditing::query::trace(&p.audit_dir(), &batch).unwrap();
    let old_versions = trail
        .iter()
        .filter(|e| e.event_type == "CanonicalObservation")
        .count();
    assert_eq!(old_versions, 50);
    let order = trace_order(
        &p,
        &batch,
        &[
            "EventDataCanonizationCompleted",
            "BatchReprocessRequested",
            "BatchReprocessed",
        ],
    );
    assert!(order[0] < order[1] && order[1] < order[2], "{order:?}");
    let status = cli_json(&p, &["batch", "status", &batch, "--json"]);
    assert_eq!(status["state"], "published", "{status}");
    assert_eq!(status["reprocessed_as"], json!([again]), "{status}");
    let _ = std::fs::remove_file(&policy);
}

#[test]
fn a_time_window_is_replayed_whole_batches_into_a_fresh_prefix() {
    let before = chrono::Utc::now();
    let Run {
        mut p,
        tail,
        batch,
        lifecycle,
        ..
    } = run_file("vitals.ndjson", &ndjson(30, 0, &tests::fresh_tag()), &[]);
    p.wait_for(&tail, "the batch", Duration::from_secs(180), |t| {
        t.count(&lifecycle, "EventDataCanonizationCompleted") >= 1
    });
    // The live topics the replay must not touch (the audit topic grows on its own, as
    // auditing catches up).
    let audit = p.topics.name(TopicKind::Audit);
    let live_topics: Vec<String> = p.topics.all().into_iter().filter(|t| *t != audit).collect();
    let live_before = p.read(&live_topics).len();

    let replay = format!("{}-r1", p.topics.prefix);
    let from = before.to_rfc3339();
    let to = chrono::Utc::now().to_rfc3339();
    let out = cli_json(
        &p,
        &[
            "replay",
            "--stage",
            "anonymization",
            "--from",
            &from,
            "--to",
            &to,
            "--prefix",
            &replay,
            "--json",
        ],
    );
    assert_eq!(out["batches"], json!([batch]), "{out}");
    // Created, Started, 31 records, Finished.
    assert_eq!(out["messages"], 34, "{out}");
    // The same stage, on the replay prefix, with its own group and state.
    let group = out["group"].as_str().unwrap().to_string();
    p.start_named(
        "anonymization-replay",
        "anonymization",
        &[
            ("MEDPIPE_TOPIC_PREFIX", replay.as_str()),
            ("MEDPIPE_GROUP_ID", group.as_str()),
        ],
    );
    let replayed = pipeline::Topics::new(replay.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let outputs = loop {
        let outputs = p.read(&[replayed.name(TopicKind::Anonymization)]);
        let done = outputs.iter().any(|r| {
            matches!(
                r.event.as_ref().map(|e| &e.payload),
                Some(Payload::AnonymizationFinished(_))
            )
        });
        if done {
            break outputs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replay did not finish"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let pseudonyms = |records: &[Record]| -> Vec<(i64, String)> {
        let mut v: Vec<(i64, String)> = records
            .iter()
            .filter_map(|r| match r.event.as_ref().map(|e| &e.payload) {
                Some(Payload::RecordAnonymized(a)) if a.batch_id == batch => {
                    Some((a.position, a.patient_pseudonym.clone()))
                }
                _ => None,
            })
            .collect();
        v.sort();
        v
    };
    let live = p.read(&[p.topics.name(TopicKind::Anonymization)]);
    assert_eq!(pseudonyms(&outputs).len(), 31);
    assert_eq!(
        pseudonyms(&outputs),
        pseudonyms(&live),
        "the replay gives what the live run gave"
    );
    // The live topics got nothing from the replay.
    assert_eq!(p.read(&live_topics).len(), live_before);
    // A prefix already used is refused.
    let again = p.medpipe(&[
        "replay",
        "--stage",
        "anonymization",
        "--from",
        &from,
        "--to",
        &to,
        "--prefix",
        &replay,
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("fresh prefix"));
}
