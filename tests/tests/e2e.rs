//! End-to-end tests on the real Kafka broker and Schema Registry, with the real stage
//! binaries as separate processes. Start the stack first: `scripts/devstack.sh start`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use pipeline::events::Payload;
use pipeline::runner::dlq_headers;
use pipeline::topics::TopicKind;
use pipeline::ResourceType;
use rdkafka::message::{Headers, Message};
use tests::{assert_exactly_once, canonical_positions, synthetic_patients, Pipeline};

const ALL: [&str; 4] = ["ingestion", "anonymization", "canonization", "auditing"];

#[test]
fn every_record_reaches_the_canonical_topic_exactly_once_with_no_phi_in_clear() {
    let mut p = Pipeline::new();
    for s in ALL {
        p.start(s, &[]);
    }
    let n = 200;
    let (csv, identifiers) = synthetic_patients(n);
    p.drop_file("patients.csv", &csv);
    let canonical = p.topics.name(TopicKind::Canonical(ResourceType::Patient));
    let tail = p.tail();
    tail.wait_until("all canonical patients", Duration::from_secs(180), |t| {
        t.count(&canonical, "CanonicalPatient") >= n
    });
    let anon = p.topics.name(TopicKind::Anonymization);
    tail.wait_until("AnonymizationFinished", Duration::from_secs(60), |t| {
        t.count(&anon, "AnonymizationFinished") >= 1
    });
    // Stop the producing stages cleanly; auditing keeps running until it has caught up.
    for s in ["ingestion", "anonymization", "canonization"] {
        p.stop(s);
    }
    drop(tail);
    let records = p.read_all();
    assert_exactly_once("canonical patients", &canonical_positions(&records), n);

    // Lifecycle order within the batch on the ingestion topic (one partition per batch).
    let ingestion = p.topics.name(TopicKind::Ingestion);
    let types: Vec<&str> = records
        .iter()
        .filter(|r| r.message.topic() == ingestion)
        .filter_map(|r| r.event.as_ref().map(|e| e.event_type()))
        .collect();
    assert_eq!(types.first(), Some(&"DataIngestionCreated"));
    assert_eq!(types.get(1), Some(&"DataIngestionStarted"));
    assert_eq!(types.last(), Some(&"DataIngestionFinished"));
    assert_eq!(
        types
            .iter()
            .filter(|t| **t == "SourceRecordIngested")
            .count(),
        n
    );

    // No input identifier appears in the raw bytes of any topic.
    let leaked = tests::in_clear(&records, &identifiers);
    assert!(
        leaked.is_empty(),
        "input identifiers in clear on a topic: {leaked:?}"
    );
    for s in ALL {
        let log = p.log(s);
        assert!(
            !identifiers.iter().any(|id| log.contains(id.as_str())),
            "{s}'s log contains an input identifier"
        );
        // Every event type a stage wrote was serialized straight into Avro with the
        // registry client's bytes (`Codec::encode`'s check on first use).
        assert!(
            !log.contains("stays on the registry client's encoder"),
            "{s} fell back to the registry client's encoder for an event type; see its log"
        );
    }
    // The audit trail of this run is checked in tests/auditing.rs.
}

/// Kills `victim` with SIGKILL while records are flowing through it, restarts it, and
/// checks every record downstream exactly once.
fn crash_and_restart(victim: &str, progress_topic: TopicKind, progress_type: &str) {
    let mut p = Pipeline::new();
    // Small transactions, so the kill lands between and inside many of them.
    let small = [
        ("MEDPIPE_BATCH_MAX_MESSAGES", "5"),
        ("MEDPIPE_BATCH_MAX_WAIT", "20ms"),
    ];
    for s in ["ingestion", "anonymization", "canonization"] {
        p.start(s, &small);
    }
    let n = 3000;
    let (csv, _) = synthetic_patients(n);
    let tail = p.tail();
    p.drop_file("patients.csv", &csv);
    let topic = p.topics.name(progress_topic);
    tail.wait_until(
        "first output of the victim",
        Duration::from_secs(180),
        |t| t.count(&topic, progress_type) >= 50,
    );
    p.kill(victim);
    let at_kill = tail.count(&topic, progress_type);
    assert!(
        at_kill < n,
        "{victim} finished all {n} records before the kill; the test did not test a crash"
    );
    p.start(victim, &small);
    let canonical = p.topics.name(TopicKind::Canonical(ResourceType::Patient));
    tail.wait_until(
        "all canonical patients after restart",
        Duration::from_secs(300),
        |t| t.count(&canonical, "CanonicalPatient") >= n,
    );
    let anon_topic = p.topics.name(TopicKind::Anonymization);
    tail.wait_until("AnonymizationFinished", Duration::from_secs(60), |t| {
        t.count(&anon_topic, "AnonymizationFinished") >= 1
    });
    std::thread::sleep(Duration::from_secs(2));
    p.stop_all();
    drop(tail);
    let records = p.read_all();
    assert_exactly_once("canonical patients", &canonical_positions(&records), n);
    let mut anonymized: HashMap<i64, usize> = HashMap::new();
    for r in &records {
        if let Some(Payload::RecordAnonymized(a)) = r.event.as_ref().map(|e| &e.payload) {
            *anonymized.entry(a.position).or_default() += 1;
        }
    }
    assert_exactly_once("anonymized records", &anonymized, n);
    // The batch's counts are durable stage state: a crash neither loses nor doubles them.
    let finished: Vec<_> = records
        .iter()
        .filter_map(|r| match r.event.as_ref().map(|e| &e.payload) {
            Some(Payload::AnonymizationFinished(f)) => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!(finished.len(), 1);
    assert_eq!(
        (
            finished[0].records_anonymized,
            finished[0].records_dead_lettered
        ),
        (Some(n as i64), Some(0))
    );
    eprintln!("{victim} killed after {at_kill} of {n} {progress_type} events");
}

#[test]
fn sigkill_of_anonymization_mid_stream_loses_and_duplicates_nothing() {
    crash_and_restart(
        "anonymization",
        TopicKind::Anonymization,
        "RecordAnonymized",
    );
}

#[test]
fn sigkill_of_canonization_mid_stream_loses_and_duplicates_nothing() {
    crash_and_restart(
        "canonization",
        TopicKind::Canonical(ResourceType::Patient),
        "CanonicalPatient",
    );
}

#[test]
fn a_poison_message_goes_to_the_dlq_with_context_and_later_records_flow() {
    let mut p = Pipeline::new();
    p.start("anonymization", &[]);
    let ingestion = p.topics.name(TopicKind::Ingestion);
    let producer: rdkafka::producer::BaseProducer =
        pipeline::kafka::producer_config(&tests::broker())
            .create()
            .expect("producer");
    use rdkafka::producer::{BaseRecord, Producer};
    // Same key as the good event, so both land on one partition, poison first.
    producer
        .send(
            BaseRecord::to(&ingestion)
                .key("b-poison")
                .payload(&b"\x00\x00\x00\x00\x07not avro at all"[..]),
        )
        .map_err(|(e, _)| e)
        .expect("send poison");
    let good = tests::ingestion_started("test", "b-poison");
    let bytes = p.rt.block_on(p.codec.encode(&good)).expect("encode");
    producer
        .send(BaseRecord::to(&ingestion).key("b-poison").payload(&bytes))
        .map_err(|(e, _)| e)
        .expect("send good");
    producer.flush(Duration::from_secs(10)).expect("flush");

    let tail = p.tail();
    let anon = p.topics.name(TopicKind::Anonymization);
    let dlq = p.topics.dlq("anonymization");
    tail.wait_until("the good event's output", Duration::from_secs(120), |t| {
        t.count(&anon, "AnonymizationStarted") >= 1
    });
    tail.wait_until("the dead letter", Duration::from_secs(30), |t| {
        t.count(&dlq, "(raw)") >= 1
    });
    p.stop_all();
    drop(tail);
    let records = p.read_all();
    let dead: Vec<_> = records
        .iter()
        .filter(|r| r.message.topic() == dlq)
        .collect();
    assert_eq!(dead.len(), 1);
    let m = &dead[0].message;
    assert_eq!(
        m.payload(),
        Some(&b"\x00\x00\x00\x00\x07not avro at all"[..]),
        "the original bytes are kept"
    );
    let headers: HashMap<String, String> = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    (
                        h.key.to_string(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        headers.get(dlq_headers::STAGE).map(String::as_str),
        Some("anonymization")
    );
    assert_eq!(
        headers.get(dlq_headers::ERROR_CLASS).map(String::as_str),
        Some("dead_letter")
    );
    assert_eq!(
        headers.get(dlq_headers::ERROR_TYPE).map(String::as_str),
        Some("decode")
    );
    assert_eq!(headers.get(dlq_headers::SOURCE_TOPIC), Some(&ingestion));
    assert!(
        headers.contains_key(dlq_headers::SOURCE_PARTITION)
            && headers.contains_key(dlq_headers::SOURCE_OFFSET)
    );
    assert!(!headers
        .get(dlq_headers::ERROR_MESSAGE)
        .map(String::is_empty)
        .unwrap_or(true));
    let started = records
        .iter()
        .filter(|r| {
            matches!(
                r.event.as_ref().map(|e| &e.payload),
                Some(Payload::AnonymizationStarted(_))
            )
        })
        .count();
    assert_eq!(
        started, 1,
        "the record after the poison was processed exactly once"
    );

    // The operator sees it with `medpipe dlq`: the error and the source, never the payload.
    let stdout = |o: &std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout.clone()).expect("utf-8")
    };
    let listed = stdout(&p.medpipe(&["dlq", "list", "anonymization", "--json"]));
    assert!(!listed.contains("not avro"), "{listed}");
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("json");
    let letters = listed["dead_letters"].as_array().expect("list");
    assert_eq!(letters.len(), 1, "{listed}");
    let d = &letters[0];
    assert_eq!(d["error_type"], "decode");
    assert_eq!(d["source_topic"], ingestion.as_str());
    assert_eq!(d["offset"], m.offset());
    assert_eq!(d["payload_bytes"], 20);
    assert_eq!(listed["by_error_type"]["decode"], 1);
    let none = stdout(&p.medpipe(&[
        "dlq",
        "list",
        "anonymization",
        "--json",
        "--error-type",
        "no_patient_link",
    ]));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&none).expect("json")["dead_letters"],
        serde_json::json!([])
    );
    let position = d["position"].as_str().expect("position");
    let shown = stdout(&p.medpipe(&["dlq", "show", "anonymization", position]));
    assert!(shown.contains("medpipe.dlq.error_type: decode"), "{shown}");
    assert!(shown.contains("payload: 20 bytes"), "{shown}");
    assert!(!shown.contains("not avro"), "{shown}");
    let missing = p.medpipe(&["dlq", "show", "anonymization", "0:999999"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no dead letter at 0:999999"));
}

/// Clinical notes with names, dates, identifiers, phones, addresses and ages in many
/// surface forms (the seeded gold generator of `medpipe eval gold`, at a seed the
/// scrubber's own tests do not use), sent as Observations whose `valueString` the policy
/// scrubs: a byte scan of every downstream topic finds none of the annotated PHI, whole
/// or word by word.
#[test]
fn free_text_notes_reach_no_downstream_topic_with_their_phi() {
    let mut p = Pipeline::new();
    for s in ["ingestion", "anonymization", "canonization"] {
        p.start(s, &[]);
    }
    let notes = anonymization::gold::notes(60, 4242);
    let tag = tests::fresh_tag();
    let mut ndjson = Vec::new();
    let mut phi: Vec<String> = Vec::new();
    let mut name_words: Vec<String> = Vec::new();
    // Words of the notes' text outside every span (`Bell palsy`, `Grace period`): a name
    // that is also one of these cannot be told apart from it by a byte scan.
    let mut plain_words = std::collections::HashSet::new();
    for (i, note) in notes.iter().enumerate() {
        let observation = serde_json::json!({
            "resourceType": "Observation",
            "id": format!("note-{tag}-{i}"),
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "11506-3", "display": "Progress note"}]},
            "subject": {"reference": format!("Patient/pt-{tag}-{i}")},
            "effectiveDateTime": "2021-03-04T10:00:00Z",
            "valueString": note.text,
        });
        serde_json::to_writer(&mut ndjson, &observation).unwrap();
        ndjson.push(b'\n');
        let mut chars: Vec<char> = note.text.chars().collect();
        for span in &note.spans {
            let text: String = chars[span.start..span.end].iter().collect();
            phi.push(text.clone());
            // A name must not survive in part either: each of its words of three
            // letters or more (a lone initial is no identifier).
            if span.kind == "NAME" {
                name_words.extend(
                    text.split(|c: char| !c.is_alphabetic() && c != '\'')
                        .filter(|w| w.chars().count() >= 3)
                        .map(str::to_string),
                );
            }
        }
        for span in &note.spans {
            chars[span.start..span.end].fill(' ');
        }
        let rest: String = chars.into_iter().collect();
        plain_words.extend(
            rest.split(|c: char| !c.is_alphanumeric())
                .map(str::to_string)
                .collect::<Vec<_>>(),
        );
    }
    phi.extend(name_words);
    phi.retain(|w| !plain_words.contains(w));
    phi.sort();
    phi.dedup();
    // Spans shorter than four characters (`5/3`, `AB1`) say too little to scan for.
    phi.retain(|s| s.chars().count() >= 4);
    assert!(
        phi.len() > 500,
        "only {} PHI strings to look for",
        phi.len()
    );
    p.drop_file("notes.ndjson", &ndjson);
    let canonical = p
        .topics
        .name(TopicKind::Canonical(ResourceType::Observation));
    let tail = p.tail();
    tail.wait_until("every note canonized", Duration::from_secs(180), |t| {
        t.count(&canonical, "CanonicalObservation") >= notes.len()
    });
    p.stop_all();
    drop(tail);
    let records = p.read_all();
    // The notes arrived with their text (scrubbed, not removed), so the scan below looks
    // at free text and not at an empty field.
    let scrubbed = records
        .iter()
        .filter(|r| r.message.topic() == canonical)
        .filter(|r| {
            let payload = r.message.payload().unwrap_or_default();
            payload.windows(6).any(|w| w == b"[NAME]")
        })
        .count();
    assert_eq!(scrubbed, notes.len(), "canonical notes with [NAME] in them");
    let leaked = tests::in_clear_as_words(&records, &phi);
    assert!(
        leaked.is_empty(),
        "{} PHI strings in clear on a topic: {leaked:?}\n{}",
        leaked.len(),
        tests::leak_report(&records, &leaked)
    );
    for s in ["ingestion", "anonymization", "canonization"] {
        let log = p.log(s);
        assert!(
            !phi.iter()
                .any(|id| tests::contains_word(log.as_bytes(), id)),
            "{s}'s log contains PHI from a note"
        );
    }
}
