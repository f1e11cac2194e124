//! Scale-out on the real dev stack: two anonymization and two canonization instances (each
//! pair one consumer group, distinct transactional ids) split the batches between them. One
//! of each pair is SIGKILLed while records flow and restarted, so its partitions move to
//! the other and back. Every record must still be anonymized and canonical exactly once,
//! every batch closed once per stage, and an operator's withdrawal must reach the instance
//! that owns the batch. Runs one at a time like the rest of the suite (`--test-threads=1`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use pipeline::events::Payload;
use pipeline::topics::TopicKind;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tests::{Flow, Pipeline};

const FILES: usize = 6;
const PER_FILE: usize = 1500;

/// The partition each key lands on, found by producing it to a scratch topic with as many
/// partitions as the pipeline's topics, with the pipeline's own producer settings.
fn partitions_of(p: &Pipeline, keys: &[String]) -> Vec<i32> {
    let probe = format!("{}-partition-probe", p.prefix);
    p.rt.block_on(pipeline::topics::ensure_topics(
        &tests::broker(),
        std::slice::from_ref(&probe),
        &pipeline::topics::TopicLayout::with_partitions(3),
    ))
    .expect("probe topic");
    let producer: FutureProducer = pipeline::kafka::producer_config(&tests::broker())
        .create()
        .expect("producer");
    keys.iter()
        .map(|k| {
            p.rt.block_on(producer.send(
                FutureRecord::to(&probe).key(k.as_str()).payload(""),
                Duration::from_secs(30),
            ))
            .map_err(|(e, _)| e)
            .expect("probe")
            .partition
        })
        .collect()
}

/// Synthetic NDJSON files whose batches cover every partition, so that both instances of
/// each stage get batches whichever partitions the group gives each.
fn files_on_every_partition(p: &Pipeline) -> Vec<(String, Vec<u8>)> {
    for _ in 0..20 {
        let files = tests::ndjson_files(FILES, PER_FILE);
        let ids: Vec<String> = files.iter().map(|(b, _)| b.clone()).collect();
        let on: BTreeSet<i32> = partitions_of(p, &ids).into_iter().collect();
        if on.len() == 3 {
            return files;
        }
    }
    panic!("no set of files covered the three partitions in 20 tries");
}

/// Records this instance produced, from its `events_out_total` counter (0 until it
/// serves its metrics).
fn produced(p: &Pipeline, instance: &str, event_types: &[&str]) -> u64 {
    if !p.log(instance).contains("Serving /metrics") {
        return 0;
    }
    let stage = instance.split('-').next().unwrap();
    let prefix = format!("medpipe_{stage}_events_out_total{{event_type=\"");
    p.metrics(instance)
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| l.split_once("\"} "))
        .filter(|(t, _)| event_types.contains(t))
        .map(|(_, n)| n.trim().parse::<u64>().unwrap_or(0))
        .sum()
}

/// The partitions an instance holds, from its log's last assignment, if nothing was
/// revoked after it.
fn held(p: &Pipeline, instance: &str) -> usize {
    let log = p.log(instance);
    let Some(last) = log
        .lines()
        .rev()
        .find(|l| l.contains("Partitions assigned") || l.contains("Partitions revoked"))
    else {
        return 0;
    };
    if last.contains("revoked") {
        return 0;
    }
    last.rsplit("partitions=")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until both instances of `stage` hold partitions and together hold all `total`
/// (input partitions of every input topic).
fn wait_for_split(p: &Pipeline, stage: &str, total: usize) {
    let two = format!("{stage}-two");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (a, b) = (held(p, stage), held(p, &two));
        if a > 0 && b > 0 && a + b == total {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the two {stage} instances did not split the partitions within 120 s ({a} and {b} of {total})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

const ANONYMIZED: &[&str] = &["RecordAnonymized"];
const CANONICAL: &[&str] = &["CanonicalPatient", "CanonicalObservation"];

#[test]
fn two_anonymization_and_two_canonization_instances_split_batches_and_lose_or_double_nothing() {
    let mut p = Pipeline::new();
    let tail = p.tail();
    let files = files_on_every_partition(&p);
    let batches: BTreeMap<String, usize> =
        files.iter().map(|(b, _)| (b.clone(), PER_FILE)).collect();
    let total = FILES * PER_FILE;

    p.start("ingestion", &[]);
    for stage in ["anonymization", "canonization"] {
        p.start(stage, &[("MEDPIPE_INSTANCE_ID", "0")]);
        p.start_named(
            &format!("{stage}-two"),
            stage,
            &[("MEDPIPE_INSTANCE_ID", "1")],
        );
    }
    // The files go in once each pair has split its partitions: an instance that joined
    // the group late would find the batches already done by the other.
    wait_for_split(&p, "anonymization", 3);
    wait_for_split(&p, "canonization", 6);
    for (i, (_, body)) in files.iter().enumerate() {
        p.drop_file(&format!("export-{i}.ndjson"), body);
    }

    // Both instances of each stage work: each publishes records of its own batches.
    let canonical_topics = [
        p.topics
            .name(TopicKind::Canonical(pipeline::ResourceType::Patient)),
        p.topics
            .name(TopicKind::Canonical(pipeline::ResourceType::Observation)),
    ];
    let canonical = |t: &tests::Tail| {
        t.count(&canonical_topics[0], "CanonicalPatient")
            + t.count(&canonical_topics[1], "CanonicalObservation")
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let working = ["anonymization", "anonymization-two"]
            .iter()
            .all(|i| produced(&p, i, ANONYMIZED) > 0)
            && ["canonization", "canonization-two"]
                .iter()
                .all(|i| produced(&p, i, CANONICAL) > 0);
        if working {
            break;
        }
        assert!(
            canonical(&tail) < total,
            "every record was canonical before both instances of each stage had published"
        );
        assert!(
            Instant::now() < deadline,
            "both instances of each stage did not start publishing within 300 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // One instance of each pair dies mid-stream: its partitions, with the state of their
    // batches, move to the other; then it comes back and the group splits them again.
    p.kill("anonymization-two");
    p.kill("canonization-two");
    let at = canonical(&tail);
    assert!(
        at < total,
        "all {total} records were canonical before the kill"
    );
    eprintln!("killed the second instances after {at} of {total} canonical records");
    std::thread::sleep(Duration::from_secs(12));
    for stage in ["anonymization", "canonization"] {
        p.start_named(
            &format!("{stage}-two"),
            stage,
            &[("MEDPIPE_INSTANCE_ID", "1")],
        );
    }

    let lifecycle = p.topics.name(TopicKind::Canonization);
    p.wait_for(
        &tail,
        "every batch closed by canonization",
        Duration::from_secs(600),
        |t| {
            t.count(&lifecycle, "EventDataCanonizationCompleted")
                + t.count(&lifecycle, "CanonizationFailed")
                >= FILES
        },
    );
    let flow = Flow::of(&p.read_all());
    flow.assert_exactly_once(&batches);

    // An operator withdraws two batches on different partitions: whichever instance owns
    // each (the saga topic's partition goes to the owner of the anonymization topic's
    // partition of the same number) withdraws every Observation of it, once.
    let ids: Vec<String> = files.iter().map(|(b, _)| b.clone()).collect();
    let parts = partitions_of(&p, &ids);
    let mut chosen: BTreeMap<i32, &String> = BTreeMap::new();
    for (id, part) in ids.iter().zip(&parts) {
        chosen.entry(*part).or_insert(id);
    }
    for batch in chosen.values().take(2) {
        let observations = flow
            .canonization_completed
            .iter()
            .find(|c| &&c.batch_id == batch)
            .and_then(|c| c.resources_by_type.get("Observation").copied())
            .expect("the batch's Observations");
        let o = p.medpipe(&["batch", "withdraw", batch, "--reason", "test", "--json"]);
        assert!(
            o.status.success(),
            "medpipe batch withdraw: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let answer: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        assert_eq!(
            answer["records_withdrawn"], observations,
            "batch {batch}: {answer}"
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    p.stop_all();
    drop(tail);
    let withdrawn: Vec<String> = p
        .read(std::slice::from_ref(&lifecycle))
        .into_iter()
        .filter_map(|r| r.event)
        .filter_map(|e| match e.payload {
            Payload::CanonicalBatchWithdrawn(w) => Some(w.batch_id),
            _ => None,
        })
        .collect();
    let mut expected: Vec<String> = chosen.values().take(2).map(|b| (*b).clone()).collect();
    let mut got = withdrawn.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "each withdrawn batch answered once");
}
