//! End-to-end tests of the ingestion stage on the real broker: every format, duplicates,
//! SIGKILL mid-file, bad rows, unreadable files, commands and two instances sharing a
//! landing folder. Start the stack first: `scripts/devstack.sh start`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::Duration;

use ingestion::formats::SourceFormat;
use ingestion::synthetic;
use pipeline::events::{Payload, StartDataIntakeCommand};
use pipeline::topics::TopicKind;
use pipeline::Event;
use rdkafka::message::Message;
use tests::{fresh_tag, in_clear, Pipeline};

/// Fast chunks so a small file spans several transactions.
const SMALL_CHUNKS: [(&str, &str); 3] = [
    ("MEDPIPE_CHUNK_RECORDS", "50"),
    ("MEDPIPE_CHUNK_INTERVAL", "200ms"),
    ("MEDPIPE_POLL_INTERVAL", "100ms"),
];

fn synthetic_file(format: SourceFormat, records: usize, tag: &str) -> Vec<u8> {
    let mut out = Vec::new();
    synthetic::write(format, &mut out, records, tag).expect("write");
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).expect("gzip");
    gz.finish().expect("gzip")
}

/// The ingestion topic's events, grouped by batch, in partition (= batch) order.
fn batches(p: &Pipeline) -> BTreeMap<String, Vec<Event>> {
    let topic = p.topics.name(TopicKind::Ingestion);
    let mut out: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for r in p.read(&[topic]) {
        let e = r.event.expect("every ingestion message decodes");
        assert_eq!(
            r.message.key(),
            Some(e.header.correlation_id.as_bytes()),
            "events are keyed by batch"
        );
        out.entry(e.header.correlation_id.clone())
            .or_default()
            .push(e);
    }
    out
}

fn finished_count(tail: &tests::Tail, p: &Pipeline) -> usize {
    tail.count(
        &p.topics.name(TopicKind::Ingestion),
        "DataIngestionFinished",
    )
}

/// Checks one batch's events: Created, Started, the records with positions 1..=n each
/// once, then Finished with matching counts. Returns (file name, emitted, rejected).
fn check_batch(events: &[Event]) -> (String, i64, i64) {
    let types: Vec<&str> = events.iter().map(|e| e.event_type()).collect();
    assert_eq!(
        &types[..2],
        ["DataIngestionCreated", "DataIngestionStarted"],
        "{types:?}"
    );
    assert_eq!(types.last(), Some(&"DataIngestionFinished"), "{types:?}");
    let Payload::DataIngestionCreated(created) = &events[0].payload else {
        unreachable!()
    };
    let Payload::DataIngestionFinished(f) = &events[events.len() - 1].payload else {
        unreachable!()
    };
    let mut positions = Vec::new();
    let (mut emitted, mut rejected) = (0, 0);
    for e in &events[2..events.len() - 1] {
        match &e.payload {
            Payload::SourceRecordIngested(r) => {
                emitted += 1;
                positions.push(r.position);
                assert_eq!(r.source_format, created.format);
            }
            Payload::RecordRejected(r) => {
                rejected += 1;
                positions.push(r.position);
            }
            other => panic!("unexpected {} inside a batch", other.event_type()),
        }
    }
    let mut sorted = positions.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        positions.len(),
        "a position was emitted twice"
    );
    assert_eq!(positions, sorted, "records are in file order");
    assert_eq!((f.records_emitted, f.records_rejected), (emitted, rejected));
    assert_eq!(f.file_sha256, created.file_sha256);
    assert!(
        std::path::Path::new(&f.archive_location).exists(),
        "archive exists"
    );
    (created.file_name.clone(), emitted, rejected)
}

#[test]
fn every_format_gives_exact_counts_ordered_lifecycles_and_no_clear_phi() {
    let mut p = Pipeline::new();
    p.start("ingestion", &SMALL_CHUNKS);
    let tag = fresh_tag();
    let files: Vec<(&str, Vec<u8>, i64)> = vec![
        (
            "patients.csv",
            synthetic_file(SourceFormat::Csv, 120, &tag),
            120,
        ),
        (
            "export.ndjson",
            synthetic_file(SourceFormat::FhirNdjson, 101, &tag),
            101,
        ),
        (
            "bundle.json",
            synthetic_file(SourceFormat::FhirBundle, 90, &tag),
            90,
        ),
        (
            "messages.hl7",
            synthetic_file(SourceFormat::Hl7v2, 80, &tag),
            80,
        ),
        (
            "export2.ndjson.gz",
            gzip(&synthetic_file(
                SourceFormat::FhirNdjson,
                60,
                &format!("{tag}gz"),
            )),
            60,
        ),
        (
            "adt_a01.hl7",
            include_bytes!("../../ingestion/fixtures/hl7/sample_adt_a01.hl7").to_vec(),
            1,
        ),
        (
            "synthea_bundle.json",
            include_bytes!("../../ingestion/fixtures/fhir/bundle_transaction.json").to_vec(),
            5,
        ),
    ];
    for (name, bytes, _) in &files {
        p.drop_file(name, bytes);
    }
    let tail = p.tail();
    tail.wait_until("every file finished", Duration::from_secs(120), |t| {
        finished_count(t, &p) >= files.len()
    });
    p.stop("ingestion");
    let expected: HashMap<&str, i64> = files.iter().map(|(n, _, c)| (*n, *c)).collect();
    let got: HashMap<String, (i64, i64)> = batches(&p)
        .values()
        .map(|events| {
            let (name, emitted, rejected) = check_batch(events);
            (name, (emitted, rejected))
        })
        .collect();
    assert_eq!(got.len(), files.len(), "{got:?}");
    for (name, count) in expected {
        assert_eq!(got.get(name), Some(&(count, 0)), "{name}");
    }
    // The clear-text parts of every message hold none of the input's identifiers.
    let mut topics = p.topics.all();
    topics.push(p.topics.ingestion_ledger());
    let records = p.read(&topics);
    let log = p.log("ingestion");
    let mut identifiers = Vec::new();
    for format in [
        SourceFormat::Csv,
        SourceFormat::FhirNdjson,
        SourceFormat::FhirBundle,
        SourceFormat::Hl7v2,
    ] {
        for person in synthetic::people(format, 120, &tag) {
            identifiers.extend(person.identifiers());
        }
    }
    let leaked = in_clear(&records, &identifiers);
    assert!(
        leaked.is_empty(),
        "identifiers found in clear on a topic: {leaked:?}"
    );
    for id in &identifiers {
        assert!(
            !log.contains(id.as_str()),
            "identifier {id} found in the log"
        );
    }
    // The landing and processing folders are empty; the raw bytes live in the archive.
    assert!(std::fs::read_dir(p.landing()).unwrap().next().is_none());
}

#[test]
fn the_same_content_dropped_again_is_rejected_as_a_duplicate() {
    let mut p = Pipeline::new();
    p.start("ingestion", &SMALL_CHUNKS);
    let bytes = synthetic_file(SourceFormat::Csv, 30, &fresh_tag());
    p.drop_file("first.csv", &bytes);
    let tail = p.tail();
    tail.wait_until("first batch", Duration::from_secs(60), |t| {
        finished_count(t, &p) >= 1
    });
    p.drop_file("second-name.csv", &bytes);
    let topic = p.topics.name(TopicKind::Ingestion);
    tail.wait_until("the duplicate's rejection", Duration::from_secs(60), |t| {
        t.count(&topic, "DataIngestionRejected") >= 1
    });
    p.stop("ingestion");
    let batches = batches(&p);
    assert_eq!(
        batches.len(),
        1,
        "the duplicate shares the batch id and adds no batch"
    );
    let events = batches.values().next().unwrap();
    let rejected: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.payload {
            Payload::DataIngestionRejected(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].reason, "duplicate");
    assert_eq!(rejected[0].file_name, "second-name.csv");
    let q = rejected[0]
        .quarantine_location
        .as_deref()
        .expect("quarantined");
    assert_eq!(std::fs::read(q).expect("quarantined file kept"), bytes);
    let records = events
        .iter()
        .filter(|e| e.event_type() == "SourceRecordIngested")
        .count();
    assert_eq!(records, 30, "the duplicate emitted no records");
}

#[test]
fn sigkill_mid_file_then_restart_gives_every_record_exactly_once() {
    let mut p = Pipeline::new();
    let env = [
        ("MEDPIPE_CHUNK_RECORDS", "200"),
        ("MEDPIPE_CHUNK_INTERVAL", "100ms"),
    ];
    p.start("ingestion", &env);
    let n = 20_000;
    p.drop_file(
        "big.ndjson",
        &synthetic_file(SourceFormat::FhirNdjson, n, &fresh_tag()),
    );
    let topic = p.topics.name(TopicKind::Ingestion);
    let tail = p.tail();
    tail.wait_until("some committed records", Duration::from_secs(120), |t| {
        t.count(&topic, "SourceRecordIngested") >= 1000
    });
    assert_eq!(
        finished_count(&tail, &p),
        0,
        "the file must still be in progress when killed"
    );
    p.kill("ingestion");
    let before = tail.count(&topic, "SourceRecordIngested");
    p.start("ingestion", &env);
    tail.wait_until(
        "the batch to finish after restart",
        Duration::from_secs(180),
        |t| finished_count(t, &p) >= 1,
    );
    p.stop("ingestion");
    assert!(before < n, "killed mid-file ({before} of {n} committed)");
    let batches = batches(&p);
    assert_eq!(batches.len(), 1);
    let events = batches.values().next().unwrap();
    let (_, emitted, rejected) = check_batch(events);
    assert_eq!((emitted, rejected), (n as i64, 0));
    assert!(
        p.log("ingestion").contains("Resuming a batch"),
        "the restart resumed"
    );
}

/// A second instance with the same transactional id (a replica restarted while its old
/// process still runs) fences the first mid-file, with its chunk possibly mid-commit: the
/// broker returns the fence, the first instance exits saying so, and the second resumes
/// from the committed ledger, so every record is downstream exactly once.
#[test]
fn a_fenced_ingestion_mid_file_exits_and_its_twin_resumes_with_no_duplicate() {
    let mut p = Pipeline::new();
    let env = [
        ("MEDPIPE_CHUNK_RECORDS", "200"),
        ("MEDPIPE_CHUNK_INTERVAL", "100ms"),
    ];
    p.start("ingestion", &env);
    let n = 20_000;
    p.drop_file(
        "big.ndjson",
        &synthetic_file(SourceFormat::FhirNdjson, n, &fresh_tag()),
    );
    let topic = p.topics.name(TopicKind::Ingestion);
    let tail = p.tail();
    tail.wait_until("some committed records", Duration::from_secs(120), |t| {
        t.count(&topic, "SourceRecordIngested") >= 1000
    });
    assert_eq!(
        finished_count(&tail, &p),
        0,
        "the file must still be in progress"
    );
    p.start_named("ingestion-twin", "ingestion", &env);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = p.exited("ingestion") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the fenced ingestion instance is still running"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!status.success(), "a fenced instance exits with an error");
    assert!(
        p.log("ingestion")
            .contains("the producer cannot go on (Fenced)"),
        "the fenced instance says why it stopped"
    );
    tail.wait_until(
        "the twin to finish the batch",
        Duration::from_secs(180),
        |t| finished_count(t, &p) >= 1,
    );
    p.stop("ingestion-twin");
    let batches = batches(&p);
    assert_eq!(batches.len(), 1);
    let (_, emitted, rejected) = check_batch(batches.values().next().unwrap());
    assert_eq!((emitted, rejected), (n as i64, 0));
    assert!(
        p.log("ingestion-twin").contains("Resuming a batch"),
        "the twin resumed the batch"
    );
}

#[test]
fn bad_records_are_rejected_precisely_and_thresholds_fail_the_batch() {
    let mut p = Pipeline::new();
    p.start("ingestion", &SMALL_CHUNKS);
    // 40 rows, 2 bad (5%): the batch finishes with exact counts.
    let mut csv = synthetic_file(SourceFormat::Csv, 38, &fresh_tag());
    csv.extend_from_slice(b"only,three,fields\n");
    csv.extend_from_slice(b"pat-x,1970-01-01,,999-00-0000,S,,Mx.,Bad\xff\xfeName,Last,,,S,white,nonhispanic,F,Here,\"1 Road\",Town,State,County,01000,1,1,1,1\n");
    p.drop_file("patients.csv", &csv);
    // NDJSON with two bad lines of 10: 20% is over the 5% threshold, so the batch fails.
    let mut nd = synthetic_file(SourceFormat::FhirNdjson, 8, &fresh_tag());
    nd.extend_from_slice(b"{\"id\": \"no-type\"}\n{not json at all\n");
    p.drop_file("export.ndjson", &nd);
    let topic = p.topics.name(TopicKind::Ingestion);
    let tail = p.tail();
    tail.wait_until("both batches closed", Duration::from_secs(60), |t| {
        finished_count(t, &p) >= 1 && t.count(&topic, "DataIngestionFailed") >= 1
    });
    p.stop("ingestion");
    let all = batches(&p);
    let mut seen_csv = false;
    let mut seen_ndjson = false;
    for events in all.values() {
        let rejections: Vec<(i64, String, String)> = events
            .iter()
            .filter_map(|e| match &e.payload {
                Payload::RecordRejected(r) => {
                    Some((r.position, r.error_kind.clone(), r.reason.clone()))
                }
                _ => None,
            })
            .collect();
        match events.last().map(|e| &e.payload) {
            Some(Payload::DataIngestionFinished(f)) => {
                seen_csv = true;
                check_batch(events);
                assert_eq!((f.records_emitted, f.records_rejected), (38, 2));
                assert_eq!(rejections[0].0, 39);
                assert_eq!(rejections[0].1, "csv_field_count");
                assert_eq!(rejections[0].2, "line 40: expected 25 fields, found 3");
                assert_eq!(rejections[1].0, 40);
                assert_eq!(rejections[1].1, "invalid_utf8");
                assert!(
                    rejections[1].2.starts_with("line 41: column 8 (FIRST)"),
                    "{}",
                    rejections[1].2
                );
                assert!(!rejections[1].2.contains("Bad"), "no values in reasons");
            }
            Some(Payload::DataIngestionFailed(f)) => {
                seen_ndjson = true;
                assert_eq!(f.error_kind, "error_threshold");
                assert_eq!((f.records_emitted, f.records_rejected), (Some(8), Some(2)));
                assert_eq!(
                    rejections
                        .iter()
                        .map(|r| (r.0, r.1.as_str()))
                        .collect::<Vec<_>>(),
                    vec![(9, "missing_resource_type"), (10, "json_syntax")]
                );
                assert!(
                    std::path::Path::new(&f.quarantine_location).exists(),
                    "kept in quarantine"
                );
            }
            other => panic!("unexpected batch end {other:?}"),
        }
    }
    assert!(seen_csv && seen_ndjson);
}

#[test]
fn unreadable_files_fail_with_a_reason_and_are_quarantined() {
    let mut p = Pipeline::new();
    p.start("ingestion", &SMALL_CHUNKS);
    let big = gzip(&synthetic_file(SourceFormat::Csv, 5000, &fresh_tag()));
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("empty.csv", vec![], "empty_file"),
        (
            "image.png",
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00".to_vec(),
            "unknown_format",
        ),
        (
            "cut.csv.gz",
            big[..big.len() / 2].to_vec(),
            "unreadable_file",
        ),
        (
            "prose.txt",
            b"Dear colleague\nplease find attached\n".to_vec(),
            "unknown_format",
        ),
    ];
    for (name, bytes, _) in &cases {
        p.drop_file(name, bytes);
    }
    let topic = p.topics.name(TopicKind::Ingestion);
    let tail = p.tail();
    tail.wait_until("every file failed", Duration::from_secs(60), |t| {
        t.count(&topic, "DataIngestionFailed") >= cases.len()
    });
    p.stop("ingestion");
    let failures: HashMap<String, (String, String)> = batches(&p)
        .values()
        .flatten()
        .filter_map(|e| match &e.payload {
            Payload::DataIngestionFailed(f) => {
                assert!(
                    std::path::Path::new(&f.quarantine_location).exists(),
                    "{} kept",
                    f.file_name
                );
                Some((
                    f.file_name.clone(),
                    (f.error_kind.clone(), f.reason.clone()),
                ))
            }
            Payload::SourceRecordIngested(_) => panic!("an unreadable file emitted a record"),
            _ => None,
        })
        .collect();
    for (name, _, kind) in cases {
        assert_eq!(
            failures.get(name).map(|f| f.0.as_str()),
            Some(kind),
            "{name}: {failures:?}"
        );
    }
}

#[test]
fn a_command_names_a_file_in_the_intake_folder_with_a_format_override() {
    let mut p = Pipeline::new();
    p.start("ingestion", &SMALL_CHUNKS);
    let intake = p.ingestion_dir().join("intake");
    std::fs::create_dir_all(intake.join("sub")).unwrap();
    // An NDJSON file with a misleading name; the command forces the format.
    std::fs::write(
        intake.join("sub/export.txt"),
        synthetic_file(SourceFormat::FhirNdjson, 12, &fresh_tag()),
    )
    .unwrap();
    let command = |path: &str, format: Option<&str>| {
        let id = uuid::Uuid::new_v4().to_string();
        Event::new(
            "test-operator",
            &id,
            None,
            Payload::StartDataIntakeCommand(StartDataIntakeCommand {
                command_id: id.clone(),
                file_path: path.into(),
                format: format.map(str::to_string),
                requested_by: "svc-test".into(),
            }),
        )
    };
    let good = command("sub/export.txt", Some("fhir-ndjson"));
    p.send(&good);
    p.send(&command("missing.csv", None));
    p.send(&command("../../etc/passwd", None));
    p.send_raw(
        &p.topics.name(TopicKind::IngestionCommands),
        b"not avro at all",
    );
    let topic = p.topics.name(TopicKind::Ingestion);
    let dlq = p.topics.dlq("ingestion");
    let tail = p.tail();
    tail.wait_until(
        "batch, refusals and dead letter",
        Duration::from_secs(60),
        |t| {
            finished_count(t, &p) >= 1
                && t.count(&topic, "DataIngestionRejected") >= 2
                && t.count(&dlq, "(raw)") >= 1
        },
    );
    p.stop("ingestion");
    let all = batches(&p);
    let batch = all
        .values()
        .find(|ev| ev.iter().any(|e| e.event_type() == "DataIngestionFinished"))
        .expect("the commanded batch");
    let (name, emitted, _) = check_batch(batch);
    assert_eq!((name.as_str(), emitted), ("export.txt", 12));
    assert_eq!(
        batch[0].header.causation_id.as_deref(),
        Some(good.header.event_id.as_str())
    );
    let Payload::DataIngestionCreated(c) = &batch[0].payload else {
        unreachable!()
    };
    assert_eq!(c.format, "fhir-ndjson");
    let reasons: Vec<String> = all
        .values()
        .flatten()
        .filter_map(|e| match &e.payload {
            Payload::DataIngestionRejected(r) => Some(r.reason.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons.contains(&"not_found".to_string())
            && reasons.contains(&"outside_intake".to_string())
    );
    assert!(
        !intake.join("sub/export.txt").exists(),
        "the file was claimed"
    );
}

#[test]
fn two_instances_share_a_landing_folder_without_claiming_a_file_twice() {
    let mut p = Pipeline::new();
    for name in ["a", "b"] {
        let mut env = SMALL_CHUNKS.to_vec();
        env.push(("MEDPIPE_INSTANCE_ID", name));
        p.start_named(&format!("ingestion-{name}"), "ingestion", &env);
    }
    let files = 12;
    for i in 0..files {
        p.drop_file(
            &format!("batch-{i:02}.csv"),
            &synthetic_file(SourceFormat::Csv, 400, &fresh_tag()),
        );
    }
    let tail = p.tail();
    tail.wait_until("every file finished", Duration::from_secs(180), |t| {
        finished_count(t, &p) >= files
    });
    std::thread::sleep(Duration::from_secs(1));
    p.stop_all();
    let all = batches(&p);
    assert_eq!(all.len(), files, "each file is one batch");
    for events in all.values() {
        assert_eq!(check_batch(events).1, 400);
        assert_eq!(
            events
                .iter()
                .filter(|e| e.event_type() == "DataIngestionCreated")
                .count(),
            1
        );
    }
    // Both instances did some of the work: count the content claims per instance.
    let mut per_instance: HashMap<String, usize> = HashMap::new();
    for entry in std::fs::read_dir(p.ingestion_dir().join("claims")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let claim: serde_json::Value =
                serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
            *per_instance
                .entry(claim["instance_id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert_eq!(per_instance.values().sum::<usize>(), files);
    assert!(
        per_instance.len() == 2,
        "both instances claimed files: {per_instance:?}"
    );
}

/// An intake command that arrives while the Schema Registry does not answer (ingestion
/// has never decoded a command, so it must look the schema up) is not dead-lettered: it
/// waits for the registry and is carried out once it answers.
#[test]
fn a_command_met_during_a_registry_outage_is_carried_out_afterwards_not_dead_lettered() {
    let mut p = Pipeline::new();
    p.start("ingestion", &SMALL_CHUNKS);
    let intake = p.ingestion_dir().join("intake");
    std::fs::create_dir_all(&intake).unwrap();
    std::fs::write(
        intake.join("export.ndjson"),
        synthetic_file(SourceFormat::FhirNdjson, 10, &fresh_tag()),
    )
    .unwrap();
    let id = uuid::Uuid::new_v4().to_string();
    let command = Event::new(
        "test-operator",
        &id,
        None,
        Payload::StartDataIntakeCommand(StartDataIntakeCommand {
            command_id: id.clone(),
            file_path: "export.ndjson".into(),
            format: None,
            requested_by: "svc-test".into(),
        }),
    );
    // Encoded while the registry answers; ingestion has not seen the schema yet.
    let bytes = p.rt.block_on(p.codec.encode(&command)).expect("encode");
    let served = std::time::Instant::now() + Duration::from_secs(60);
    while !p.log("ingestion").contains("Ingestion started") {
        assert!(
            std::time::Instant::now() < served,
            "ingestion did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let registry = tests::faults::Registry::new();
    registry.pause();
    p.send_raw(&p.topics.name(TopicKind::IngestionCommands), &bytes);
    let met = std::time::Instant::now() + Duration::from_secs(60);
    while !p
        .log("ingestion")
        .contains("rewinding to the committed state")
    {
        assert!(
            std::time::Instant::now() < met,
            "ingestion never met the outage:\n{}",
            p.log("ingestion")
        );
        assert!(p.exited("ingestion").is_none(), "ingestion exited");
        std::thread::sleep(Duration::from_millis(200));
    }
    registry.resume();
    let tail = p.tail();
    tail.wait_until("the commanded batch", Duration::from_secs(120), |t| {
        finished_count(t, &p) >= 1
    });
    p.stop("ingestion");
    let dead = p.read(&[p.topics.dlq("ingestion")]);
    assert!(dead.is_empty(), "{} dead letters", dead.len());
    let all = batches(&p);
    let batch = all.values().next().expect("the commanded batch");
    let (_, emitted, _) = check_batch(batch);
    assert_eq!(emitted, 10);
    assert_eq!(
        batch[0].header.causation_id.as_deref(),
        Some(command.header.event_id.as_str())
    );
}
