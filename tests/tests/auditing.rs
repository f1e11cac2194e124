//! End-to-end tests of the audit trail on the real broker and registry: trace, verify,
//! tamper detection, crash safety of the store and its publication, and the monitors.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use auditing::entry::AuditEntry;
use pipeline::events::{CanonicalPatient, Payload, Provenance};
use pipeline::topics::TopicKind;
use pipeline::Event;
use pipeline::ResourceType;
use rdkafka::message::Message;
use tests::{synthetic_patients, Pipeline};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn trace_json(p: &Pipeline, id: &str) -> Vec<AuditEntry> {
    let dir = p.audit_dir();
    let o = p.medpipe(&[
        "audit",
        "trace",
        id,
        "--json",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "trace failed: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).expect("trace JSON")
}

/// Every event in `trace` comes after its cause, when the cause is in the trace too.
fn assert_causal(trace: &[AuditEntry]) {
    let at: HashMap<&str, usize> = trace
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.event_id.as_deref().map(|id| (id, i)))
        .collect();
    for (i, e) in trace.iter().enumerate() {
        if let Some(&c) = e.causation_id.as_deref().and_then(|c| at.get(c)) {
            assert!(
                c < i,
                "{} at {i} comes before its cause at {c}",
                e.event_type
            );
        }
    }
}

fn verify(p: &Pipeline, published: bool) -> std::process::Output {
    let dir = p.audit_dir();
    let mut args = vec!["audit", "verify", "--dir", dir.to_str().unwrap()];
    if published {
        args.push("--published");
    }
    p.medpipe(&args)
}

fn segments(p: &Pipeline) -> Vec<PathBuf> {
    auditing::store::segments(&p.audit_dir())
        .expect("segments")
        .into_iter()
        .map(|(_, path)| path)
        .collect()
}

#[test]
fn a_batch_is_traced_in_causal_order_verified_and_tampering_is_named() {
    let mut p = Pipeline::new();
    let audit_env = [
        ("MEDPIPE_AUDIT_SEGMENT_ENTRIES", "25"),
        // One append never spans two segments: small appends, so there are several.
        ("MEDPIPE_BATCH_MAX_MESSAGES", "10"),
        ("MEDPIPE_AUDIT_CHECKPOINT_INTERVAL", "500ms"),
        ("MEDPIPE_AUDIT_CHECKPOINT_ENTRIES", "40"),
        // A healthy run raises no alert, even with every payload scanned and short graces.
        ("MEDPIPE_SENTINEL_SAMPLE_RATE", "1.0"),
        ("MEDPIPE_GAP_GRACE", "1s"),
        ("MEDPIPE_LINEAGE_GRACE", "1s"),
    ];
    p.start("auditing", &audit_env);
    for s in ["ingestion", "anonymization", "canonization"] {
        p.start(s, &[]);
    }
    let n = 30;
    let (csv, _) = synthetic_patients(n);
    p.drop_file("patients.csv", &csv);
    let tail = p.tail();
    let canonical = p.topics.name(TopicKind::Canonical(ResourceType::Patient));
    let anon = p.topics.name(TopicKind::Anonymization);
    tail.wait_until("canonical patients", Duration::from_secs(180), |t| {
        t.count(&canonical, "CanonicalPatient") >= n
    });
    tail.wait_until("AnonymizationFinished", Duration::from_secs(60), |t| {
        t.count(&anon, "AnonymizationFinished") >= 1
    });
    for s in ["ingestion", "anonymization", "canonization"] {
        p.stop(s);
    }
    let audited = p.wait_for_audit_catch_up(Duration::from_secs(60));
    // Let a checkpoint cover the last entries and go out, then stop.
    let audit = p.topics.name(TopicKind::Audit);
    let entries = p.audit_entries().len();
    tail.wait_until(
        "a checkpoint over every entry",
        Duration::from_secs(30),
        |_| {
            p.read(std::slice::from_ref(&audit)).iter().any(|r| {
                matches!(r.event.as_ref().map(|e| &e.payload),
                Some(Payload::AuditCheckpoint(c)) if c.tree_size as usize >= entries)
            })
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    p.stop("auditing");
    drop(tail);
    assert!(segments(&p).len() >= 4, "the store spans several segments");
    let alerts: Vec<_> = p
        .audit_entries()
        .into_iter()
        .filter(|e| e.is_own())
        .collect();
    assert!(alerts.is_empty(), "a healthy run raised alerts: {alerts:?}");

    // The batch's trace holds every event of the batch, causes before effects.
    let records = p.read_all();
    let batch = records
        .iter()
        .find_map(|r| match r.event.as_ref().map(|e| &e.payload) {
            Some(Payload::DataIngestionFinished(f)) => Some(f.batch_id.clone()),
            _ => None,
        })
        .expect("a finished batch");
    let batch_events: HashSet<String> = records
        .iter()
        .filter(|r| r.message.topic() != audit)
        .filter_map(|r| r.event.as_ref())
        .filter(|e| e.header.correlation_id == batch)
        .map(|e| e.header.event_id.clone())
        .collect();
    let trace = trace_json(&p, &batch);
    let traced: HashSet<String> = trace.iter().filter_map(|e| e.event_id.clone()).collect();
    assert_eq!(
        traced, batch_events,
        "the trace is exactly the batch's events"
    );
    assert_causal(&trace);
    let pos = |t: &str| trace.iter().position(|e| e.event_type == t).expect(t);
    assert!(pos("DataIngestionCreated") < pos("DataIngestionStarted"));
    assert!(pos("DataIngestionStarted") < pos("SourceRecordIngested"));
    assert!(pos("RecordAnonymized") < pos("CanonicalPatient"));

    // A pseudonym's trace goes from the drop to its canonical record.
    let pseudonym = trace
        .iter()
        .find(|e| e.event_type == "CanonicalPatient")
        .and_then(|e| e.subject.clone())
        .expect("a canonical patient's pseudonym");
    let patient = trace_json(&p, &pseudonym);
    let types: Vec<&str> = patient.iter().map(|e| e.event_type.as_str()).collect();
    for t in [
        "DataIngestionCreated",
        "SourceRecordIngested",
        "RecordAnonymized",
        "CanonicalPatient",
    ] {
        assert!(
            types.contains(&t),
            "{t} missing from the pseudonym's trace {types:?}"
        );
    }
    assert_causal(&patient);

    // The table view names services and topics.
    let dir = p.audit_dir();
    let table = stdout(&p.medpipe(&["audit", "trace", &batch, "--dir", dir.to_str().unwrap()]));
    assert!(table.contains("medpipe-anonymization") && table.contains(&canonical));

    // Verify passes, against the local and the published checkpoints.
    let ok = verify(&p, true);
    assert!(ok.status.success(), "verify failed: {}", stderr(&ok));
    assert!(
        stdout(&ok).contains(&format!("{} entries", p.audit_entries().len())),
        "{}",
        stdout(&ok)
    );
    assert!(p.audit_entries().len() >= audited.len());

    // An inclusion proof checks out with only the public key, and a forged one fails.
    let seq = "7";
    let proof = p.medpipe(&["audit", "prove", seq, "--dir", dir.to_str().unwrap()]);
    assert!(proof.status.success(), "prove failed: {}", stderr(&proof));
    let proof_path = p.dir.path().join("proof.json");
    std::fs::write(&proof_path, &proof.stdout).unwrap();
    let public = std::fs::read_to_string(dir.join(auditing::keys::PUBLIC_KEY)).unwrap();
    let check = |path: &PathBuf| {
        p.medpipe(&[
            "audit",
            "check-proof",
            path.to_str().unwrap(),
            "--public-key",
            public.trim(),
        ])
    };
    assert!(check(&proof_path).status.success());
    let mut forged: serde_json::Value = serde_json::from_slice(&proof.stdout).unwrap();
    forged["entry"] = forged["entry"]
        .as_str()
        .unwrap()
        .replace("\"seq\":7", "\"seq\":7,\"x\":1")
        .into();
    let forged_path = p.dir.path().join("forged.json");
    std::fs::write(&forged_path, forged.to_string()).unwrap();
    assert!(!check(&forged_path).status.success());

    // One byte edited in a segment: verify fails and names the entry.
    let segs = segments(&p);
    let victim = &segs[1];
    let original = std::fs::read(victim).unwrap();
    let text = String::from_utf8(original.clone()).unwrap();
    let line_no = 3;
    let line_start: usize = text.lines().take(line_no - 1).map(|l| l.len() + 1).sum();
    let line = text.lines().nth(line_no - 1).unwrap();
    let seq: u64 = serde_json::from_str::<AuditEntry>(line).unwrap().seq;
    let at = line_start + line.find("\"digest_sha256\":\"").unwrap() + 17;
    let mut edited = original.clone();
    edited[at] = if edited[at] == b'0' { b'1' } else { b'0' };
    std::fs::write(victim, &edited).unwrap();
    let bad = verify(&p, false);
    assert!(!bad.status.success(), "verify passed an edited segment");
    let name = victim.file_name().unwrap().to_str().unwrap();
    let msg = stderr(&bad);
    assert!(
        msg.contains(name)
            && msg.contains(&format!("line {line_no}"))
            && msg.contains(&format!("seq {seq}")),
        "verify must name the edited entry: {msg}"
    );
    std::fs::write(victim, &original).unwrap();
    assert!(verify(&p, false).status.success());

    // Truncated behind a checkpoint: the last segment removed. The local checkpoints
    // catch it...
    let last = segs.last().unwrap();
    let kept_last = std::fs::read(last).unwrap();
    std::fs::remove_file(last).unwrap();
    let bad = verify(&p, false);
    assert!(!bad.status.success(), "verify passed a truncated store");
    assert!(stderr(&bad).contains("truncated"), "{}", stderr(&bad));
    // ...and when the local checkpoints are cut back too, the published copy does.
    let cps = dir.join(auditing::store::CHECKPOINTS);
    let kept_cps = std::fs::read_to_string(&cps).unwrap();
    let remaining = p.audit_entries().len() as u64;
    let consistent: String = kept_cps
        .lines()
        .filter(|l| {
            serde_json::from_str::<auditing::merkle::TreeHead>(l)
                .unwrap()
                .tree_size
                <= remaining
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&cps, consistent).unwrap();
    assert!(
        verify(&p, false).status.success(),
        "a consistently truncated store passes on its own checkpoints alone"
    );
    let bad = verify(&p, true);
    assert!(
        !bad.status.success(),
        "the published checkpoints must catch the truncation"
    );
    assert!(stderr(&bad).contains("truncated"), "{}", stderr(&bad));
    std::fs::write(last, kept_last).unwrap();
    std::fs::write(&cps, kept_cps).unwrap();
    assert!(verify(&p, true).status.success());
}

#[test]
fn sigkill_of_auditing_mid_stream_loses_and_duplicates_no_entry() {
    let mut p = Pipeline::new();
    let small = [
        ("MEDPIPE_BATCH_MAX_MESSAGES", "20"),
        ("MEDPIPE_BATCH_MAX_WAIT", "20ms"),
        ("MEDPIPE_AUDIT_CHECKPOINT_ENTRIES", "100"),
    ];
    p.start("auditing", &small);
    for s in ["ingestion", "anonymization", "canonization"] {
        p.start(s, &[]);
    }
    let n = 2000;
    let (csv, _) = synthetic_patients(n);
    p.drop_file("patients.csv", &csv);
    let total_events = 3 * n; // at least: ingested, anonymized, canonical
    let mut kills = 0;
    for threshold in [300, 1500] {
        let deadline = Instant::now() + Duration::from_secs(180);
        while p.audit_entries().len() < threshold {
            assert!(Instant::now() < deadline, "auditing made no progress");
            std::thread::sleep(Duration::from_millis(100));
        }
        p.kill("auditing");
        let at_kill = p.audit_entries().len();
        assert!(
            at_kill < total_events,
            "auditing had recorded everything before the kill; the test did not test a crash"
        );
        eprintln!("auditing killed at {at_kill} entries");
        kills += 1;
        if kills == 1 {
            p.start("auditing", &small);
        } else {
            // Kafka's committed offsets are only a hint: restarted under a new consumer
            // group, auditing re-reads every topic from the start, and the store's own
            // positions must skip everything already recorded.
            let group = format!("{}-auditing-fresh", p.prefix);
            let txn = format!("{}-auditing-publisher", p.prefix);
            let mut env = small.to_vec();
            env.push(("MEDPIPE_GROUP_ID", &group));
            env.push(("MEDPIPE_TRANSACTIONAL_ID", &txn));
            p.start("auditing", &env);
        }
    }
    let tail = p.tail();
    let canonical = p.topics.name(TopicKind::Canonical(ResourceType::Patient));
    let anon = p.topics.name(TopicKind::Anonymization);
    tail.wait_until("canonical patients", Duration::from_secs(300), |t| {
        t.count(&canonical, "CanonicalPatient") >= n
    });
    tail.wait_until("AnonymizationFinished", Duration::from_secs(60), |t| {
        t.count(&anon, "AnonymizationFinished") >= 1
    });
    for s in ["ingestion", "anonymization", "canonization"] {
        p.stop(s);
    }
    let audited = p.wait_for_audit_catch_up(Duration::from_secs(120));
    // Every published entry went out too: wait for the audit topic to hold them all.
    let audit = p.topics.name(TopicKind::Audit);
    let stored = p.audit_entries().len();
    tail.wait_until("every entry published", Duration::from_secs(60), |t| {
        t.count(&audit, "AuditEntryRecorded") >= stored
    });
    p.stop("auditing");
    drop(tail);

    // Exactly one entry per message: none lost, none duplicated.
    let mut per_position: HashMap<(String, i32, i64), usize> = HashMap::new();
    for e in p.audit_entries().iter().filter(|e| !e.is_own()) {
        *per_position
            .entry((e.topic.clone(), e.partition, e.offset))
            .or_default() += 1;
    }
    let duplicated: Vec<_> = per_position.iter().filter(|(_, &c)| c > 1).collect();
    assert!(duplicated.is_empty(), "duplicated entries: {duplicated:?}");
    let recorded: HashSet<_> = per_position.into_keys().collect();
    assert_eq!(recorded, audited, "entries vs committed messages");
    assert!(
        verify(&p, true).status.success(),
        "the store verifies after {kills} kills"
    );

    // Publication is exactly once as well: each seq once on the audit topic.
    let mut published: HashMap<i64, usize> = HashMap::new();
    for r in p.read(&[audit]) {
        if let Some(Payload::AuditEntryRecorded(a)) = r.event.map(|e| e.payload) {
            *published.entry(a.seq).or_default() += 1;
        }
    }
    assert_eq!(published.len(), stored, "every entry published");
    assert!(
        published.values().all(|&c| c == 1),
        "an entry was published twice"
    );
}

#[test]
fn the_phi_sentinel_and_the_stall_monitor_alert_without_values() {
    let mut p = Pipeline::new();
    p.start(
        "auditing",
        &[
            ("MEDPIPE_SENTINEL_SAMPLE_RATE", "1.0"),
            ("MEDPIPE_STALL_SLA", "2s"),
        ],
    );
    let tag = tests::fresh_tag();
    let planted_ssn = "999-41-5823";
    let pseudonym = "a".repeat(64);
    let fhir = serde_json::json!({
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": planted_ssn}],
    });
    p.send(&Event::new(
        "medpipe-canonization",
        &format!("leak-{tag}"),
        None,
        Payload::CanonicalPatient(CanonicalPatient {
            resource_id: "p1".into(),
            patient_pseudonym: pseudonym,
            gender: None,
            birth_year: None,
            fhir_json: fhir.to_string(),
            provenance: Provenance {
                source_format: "fhir-ndjson".into(),
                batch_id: format!("leak-{tag}"),
                source_position: 0,
                policy_version: "test".into(),
                concept_map_version: "none".into(),
            },
        }),
    ));
    let stalled = format!("stall-{tag}");
    p.send(&tests::ingestion_started("medpipe-ingestion", &stalled));
    let audit = p.topics.name(TopicKind::Audit);
    let deadline = Instant::now() + Duration::from_secs(60);
    let alerts = loop {
        let alerts: Vec<_> = p
            .read(std::slice::from_ref(&audit))
            .into_iter()
            .filter_map(|r| match r.event.map(|e| e.payload) {
                Some(Payload::ComplianceAlert(a)) => Some(a),
                _ => None,
            })
            .collect();
        let kinds: HashSet<&str> = alerts.iter().map(|a| a.kind.as_str()).collect();
        if kinds.contains("phi_sentinel") && kinds.contains("stalled_batch") {
            break alerts;
        }
        assert!(Instant::now() < deadline, "alerts so far: {alerts:?}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let phi = alerts.iter().find(|a| a.kind == "phi_sentinel").unwrap();
    assert_eq!(
        phi.topic.as_deref(),
        Some(
            p.topics
                .name(TopicKind::Canonical(ResourceType::Patient))
                .as_str()
        )
    );
    assert!(phi.detail.contains("ssn"), "{phi:?}");
    let stall = alerts.iter().find(|a| a.kind == "stalled_batch").unwrap();
    assert_eq!(stall.batch_id.as_deref(), Some(stalled.as_str()));
    // An alert fires once, however long the condition lasts.
    std::thread::sleep(Duration::from_secs(3));
    p.stop("auditing");
    let audit_records = p.read(&[audit]);
    let stall_alerts = audit_records
        .iter()
        .filter(|r| matches!(r.event.as_ref().map(|e| &e.payload), Some(Payload::ComplianceAlert(a)) if a.kind == "stalled_batch"))
        .count();
    assert_eq!(stall_alerts, 1);
    // The stalled batch is held, once, caused by the alert, so an operator can act on it.
    let saga = p.read(&[p.topics.name(TopicKind::Saga)]);
    let held: Vec<&pipeline::Event> = saga
        .iter()
        .filter_map(|r| r.event.as_ref())
        .filter(|e| matches!(&e.payload, Payload::BatchHeld(h) if h.batch_id == stalled))
        .collect();
    let [held] = &held[..] else {
        panic!("{held:?}")
    };
    let Payload::BatchHeld(h) = &held.payload else {
        unreachable!()
    };
    assert_eq!(
        (
            h.stage.as_str(),
            h.failed_step.as_str(),
            h.reason_kind.as_str()
        ),
        ("auditing", "ingestion", "stalled")
    );
    assert_eq!(
        held.header.causation_id.as_deref(),
        Some(stall.alert_id.as_str())
    );
    // The SSN is nowhere in the alerts, the audit topic or the store.
    for r in &audit_records {
        let bytes = r.message.payload().unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(bytes).contains(planted_ssn),
            "the audit topic holds the planted SSN"
        );
    }
    for s in segments(&p) {
        assert!(!std::fs::read_to_string(s).unwrap().contains(planted_ssn));
    }
    assert!(!p.log("auditing").contains(planted_ssn));
}

/// A batch whose closing events do not add up (one record removed on purpose: the
/// closing events are written by hand with anonymization one record short) raises a
/// `gap` alert, counted in the metric and shown by `audit report`.
#[test]
fn closing_counts_that_do_not_add_up_raise_a_gap_alert() {
    use pipeline::events::{AnonymizationFinished, AnonymizationStarted, DataIngestionFinished};
    let mut p = Pipeline::new();
    p.start("auditing", &[]);
    let batch = format!("gap-{}", tests::fresh_tag());
    let started = tests::ingestion_started("medpipe-ingestion", &batch);
    let finished = Event::caused_by(
        &started,
        "medpipe-ingestion",
        Payload::DataIngestionFinished(DataIngestionFinished {
            batch_id: batch.clone(),
            records_emitted: 3,
            records_rejected: 0,
            file_size_bytes: 10,
            file_sha256: "00".into(),
            archive_location: "archive".into(),
        }),
    );
    let anon_started = Event::caused_by(
        &started,
        "medpipe-anonymization",
        Payload::AnonymizationStarted(AnonymizationStarted {
            batch_id: batch.clone(),
            policy_version: "test".into(),
            key_id: "k".into(),
            policy_hash: None,
        }),
    );
    let anon_finished = Event::caused_by(
        &finished,
        "medpipe-anonymization",
        Payload::AnonymizationFinished(AnonymizationFinished {
            batch_id: batch.clone(),
            upstream_records_emitted: 3,
            policy_version: "test".into(),
            records_anonymized: Some(2),
            records_dead_lettered: Some(0),
            policy_hash: None,
            release_of: None,
        }),
    );
    for e in [&started, &finished, &anon_started, &anon_finished] {
        p.send(e);
    }
    let audit = p.topics.name(TopicKind::Audit);
    let deadline = Instant::now() + Duration::from_secs(60);
    let gaps = loop {
        let gaps: Vec<_> = p
            .read(std::slice::from_ref(&audit))
            .into_iter()
            .filter_map(|r| match r.event.map(|e| e.payload) {
                Some(Payload::ComplianceAlert(a)) if a.kind == "gap" => Some(a),
                _ => None,
            })
            .collect();
        if gaps.len() >= 2 {
            break gaps;
        }
        assert!(Instant::now() < deadline, "gap alerts so far: {gaps:?}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let details: Vec<&str> = gaps.iter().map(|a| a.detail.as_str()).collect();
    assert!(gaps
        .iter()
        .all(|a| a.batch_id.as_deref() == Some(batch.as_str())));
    assert!(
        details.contains(&"AnonymizationFinished does not add up: the stage before emitted 3 records, anonymization accounted for 2"),
        "{details:?}"
    );
    assert!(
        details.contains(
            &"anonymization closed the batch with 2 records in, but ingestion emitted 3: 1 missing"
        ),
        "{details:?}"
    );
    assert_eq!(
        p.metric("auditing", "medpipe_compliance_alerts_total{kind=\"gap\"}"),
        Some(2.0),
        "{}",
        p.metrics("auditing")
    );
    p.stop("auditing");
    let report = p.medpipe(&[
        "audit",
        "report",
        "--from",
        "2000-01-01",
        "--to",
        "2100-01-01",
        "--format",
        "csv",
    ]);
    assert!(report.status.success(), "{}", stderr(&report));
    let row = stdout(&report)
        .lines()
        .find(|l| l.starts_with(&format!("{batch},medpipe-auditing")))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no auditing row for the batch:\n{}", stdout(&report)));
    assert!(row.ends_with(",gap"), "{row}");
}

#[test]
fn auditing_waits_out_a_schema_registry_outage_and_loses_nothing() {
    let mut p = Pipeline::new();
    p.start("auditing", &[]);
    p.start("ingestion", &[]);
    let (csv, _) = synthetic_patients(50);
    p.drop_file("patients.csv", &csv);
    p.wait_for_audit_catch_up(Duration::from_secs(120));
    // The registry stops answering; ingestion, which has its schemas, rejects the same
    // file dropped again: an event type auditing has not seen, whose schema it must look
    // up by id.
    let registry = tests::faults::Registry::new();
    registry.pause();
    p.drop_file("patients-again.csv", &csv);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p
        .log("auditing")
        .contains("Could not record a batch for now")
    {
        assert!(
            Instant::now() < deadline,
            "auditing never met the outage:\n{}",
            p.log("auditing")
        );
        assert!(
            p.exited("auditing").is_none(),
            "auditing exited during the registry outage:\n{}",
            p.log("auditing")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        p.exited("auditing").is_none(),
        "auditing exited during the registry outage:\n{}",
        p.log("auditing")
    );
    registry.resume();
    let recorded = p.wait_for_audit_catch_up(Duration::from_secs(120));
    let rejected = p
        .audit_entries()
        .iter()
        .filter(|e| e.event_type == "DataIngestionRejected")
        .count();
    assert_eq!(rejected, 1, "{} positions recorded", recorded.len());
    let v = verify(&p, false);
    assert!(v.status.success(), "{}", stderr(&v));
    p.stop_all();
}

/// The audit store's disk fills up (a real ENOSPC, on a tmpfs): auditing must stop
/// consuming and say so on /metrics, lose nothing, stay up, and resume by itself when
/// space returns, with every event recorded exactly once, the chain intact, and the pause
/// itself on the record as a compliance alert.
#[test]
fn auditing_pauses_on_a_full_disk_and_resumes_losing_nothing() {
    let mut p = Pipeline::new();
    let disk = tests::faults::SmallDisk::mount(&p.audit_dir(), 64);
    p.start("auditing", &[]);
    p.start("ingestion", &[]);
    let tail = p.tail();
    let ingestion = p.topics.name(TopicKind::Ingestion);
    let finished = |n: usize| {
        let ingestion = ingestion.clone();
        move |t: &tests::Tail| t.count(&ingestion, "DataIngestionFinished") >= n
    };
    let (csv, _) = synthetic_patients(50);
    p.drop_file("patients.csv", &csv);
    tail.wait_until("the first batch", Duration::from_secs(120), finished(1));
    p.wait_for_audit_catch_up(Duration::from_secs(120));

    let filled = disk.fill();
    assert!(filled > 0, "the filler took no space");
    let (more, _) = synthetic_patients(80);
    p.drop_file("patients-more.csv", &more);
    let deadline = Instant::now() + Duration::from_secs(60);
    let store_full = |p: &Pipeline| p.metric("auditing", "medpipe_auditing_store_full");
    while store_full(&p) != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "auditing never reported a full store:\n{}",
            p.log("auditing")
        );
        assert!(
            p.exited("auditing").is_none(),
            "auditing exited on a full disk:\n{}",
            p.log("auditing")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // (Appends that fit in the slack of a page already allocated may have gone in first.)
    let at_pause = p.audit_entries().len();
    // Paused, not gone: it stays up and records nothing while the disk is full, and the
    // pipeline goes on without it.
    tail.wait_until("the second batch", Duration::from_secs(120), finished(2));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        p.exited("auditing").is_none(),
        "auditing exited on a full disk:\n{}",
        p.log("auditing")
    );
    assert_eq!(store_full(&p), Some(1.0), "the full-store gauge went down");
    assert_eq!(
        p.audit_entries().len(),
        at_pause,
        "entries appeared while paused on a full disk"
    );

    disk.free();
    let recorded = p.wait_for_audit_catch_up(Duration::from_secs(120));
    let deadline = Instant::now() + Duration::from_secs(30);
    while store_full(&p) != Some(0.0) {
        assert!(Instant::now() < deadline, "the full-store gauge stayed up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let entries = p.audit_entries();
    let mut per_position: HashMap<(String, i32, i64), usize> = HashMap::new();
    for e in entries.iter().filter(|e| !e.is_own()) {
        *per_position
            .entry((e.topic.clone(), e.partition, e.offset))
            .or_default() += 1;
    }
    let twice: Vec<_> = per_position.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "recorded more than once: {twice:?}");
    assert_eq!(per_position.len(), recorded.len());
    assert_eq!(
        p.alerts_recorded(auditing::monitors::AlertKind::AuditStorePaused),
        1,
        "the pause is on the record once"
    );
    let v = verify(&p, false);
    assert!(v.status.success(), "{}", stderr(&v));
    p.stop_all();
    drop(disk);
}
