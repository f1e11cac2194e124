//! End-to-end test of de-identification on the real broker: files in every format with
//! known identifiers flow through ingestion and anonymization, and a byte scan of every
//! topic finds none of them. Start the stack first: `scripts/devstack.sh start`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use ingestion::formats::SourceFormat;
use ingestion::synthetic;
use pipeline::events::Payload;
use pipeline::topics::TopicKind;
use tests::{fresh_tag, in_clear, Pipeline};

const FORMATS: [(SourceFormat, &str); 4] = [
    (SourceFormat::Csv, "patients.csv"),
    (SourceFormat::FhirNdjson, "export.ndjson"),
    (SourceFormat::FhirBundle, "bundle.json"),
    (SourceFormat::Hl7v2, "messages.hl7"),
];

#[test]
fn no_input_identifier_survives_anonymization_in_any_format() {
    let mut p = Pipeline::new();
    p.start("ingestion", &[("MEDPIPE_POLL_INTERVAL", "100ms")]);
    p.start("anonymization", &[]);
    let tag = fresh_tag();
    let n = 40;
    let mut identifiers = Vec::new();
    for (format, name) in FORMATS {
        let mut bytes = Vec::new();
        synthetic::write(format, &mut bytes, n, &tag).unwrap();
        p.drop_file(name, &bytes);
        for person in synthetic::people(format, n, &tag) {
            identifiers.extend(person.identifiers());
            // Full dates, in the ISO and HL7 forms the files use.
            identifiers.push(person.birth_date.clone());
            identifiers.push(person.birth_date.replace('-', ""));
        }
    }
    identifiers.sort();
    identifiers.dedup();
    let anon = p.topics.name(TopicKind::Anonymization);
    let tail = p.tail();
    tail.wait_until("every batch anonymized", Duration::from_secs(120), |t| {
        t.count(&anon, "AnonymizationFinished") >= FORMATS.len()
    });
    p.stop_all();
    let records = p.read_all();
    let mut anonymized = 0;
    for r in &records {
        match r.event.as_ref().map(|e| &e.payload) {
            Some(Payload::AnonymizationStarted(s)) => assert!(s.policy_hash.is_some()),
            Some(Payload::RecordAnonymized(a)) => {
                anonymized += 1;
                assert!(a.policy_hash.is_some() && a.report_json.is_some());
            }
            Some(Payload::AnonymizationFinished(f)) => {
                assert_eq!(f.records_anonymized, Some(n as i64), "{f:?}");
                assert_eq!(f.records_dead_lettered, Some(0), "{f:?}");
                assert!(
                    f.policy_hash.is_some(),
                    "the policy hash travels in every event"
                );
            }
            _ => {}
        }
    }
    assert_eq!(anonymized, n * FORMATS.len());
    let leaked = in_clear(&records, &identifiers);
    assert!(
        leaked.is_empty(),
        "identifiers found in clear on a topic: {leaked:?}"
    );
    let log = p.log("anonymization");
    assert!(
        identifiers.iter().all(|id| !log.contains(id.as_str())),
        "an identifier reached the log"
    );
}

/// Ingestion's closing event says a record was emitted that never arrives (written by
/// hand, as a broker fault would leave it): anonymization does not finish the batch; once
/// `MEDPIPE_BATCH_CLOSE_TIMEOUT` has passed it fails it with `counts_mismatch`, once.
#[test]
fn a_batch_whose_records_never_all_arrive_fails_at_its_deadline_instead_of_finishing() {
    use pipeline::events::DataIngestionFinished;
    let mut p = Pipeline::new();
    p.start("anonymization", &[("MEDPIPE_BATCH_CLOSE_TIMEOUT", "3s")]);
    let batch = format!("short-{}", fresh_tag());
    let started = tests::ingestion_started("medpipe-ingestion", &batch);
    let finished = pipeline::Event::caused_by(
        &started,
        "medpipe-ingestion",
        Payload::DataIngestionFinished(DataIngestionFinished {
            batch_id: batch.clone(),
            records_emitted: 1,
            records_rejected: 0,
            file_size_bytes: 10,
            file_sha256: "00".into(),
            archive_location: "archive".into(),
        }),
    );
    p.send(&started);
    p.send(&finished);
    let anon = p.topics.name(TopicKind::Anonymization);
    let tail = p.tail();
    tail.wait_until("the batch to fail", Duration::from_secs(60), |t| {
        t.count(&anon, "AnonymizationFailed") >= 1
    });
    // Ticks go on; the batch must not close a second time.
    std::thread::sleep(Duration::from_secs(3));
    p.stop_all();
    drop(tail);
    let closings: Vec<Payload> = p
        .read(&[anon])
        .into_iter()
        .filter_map(|r| r.event.map(|e| e.payload))
        .filter(|e| {
            matches!(
                e,
                Payload::AnonymizationFailed(_) | Payload::AnonymizationFinished(_)
            )
        })
        .collect();
    let [Payload::AnonymizationFailed(f)] = &closings[..] else {
        panic!("{closings:?}")
    };
    assert_eq!(f.error_kind, "counts_mismatch");
    assert_eq!(
        f.reason,
        "ingestion emitted 1 records, but only 0 were anonymized and 0 dead-lettered: 1 missing after waiting 3s"
    );
}
