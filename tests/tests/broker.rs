//! Broker failures on the real dev stack: the Kafka broker is SIGKILLed, paused or
//! restarted while records flow through the real stage binaries, and every record is
//! counted at every stage afterwards (lost, duplicated, or exactly once). These tests
//! stop and start the shared dev-stack broker, so they run one at a time like the rest
//! of the suite (`--test-threads=1`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pipeline::topics::TopicKind;
use pipeline::ResourceType;
use pipeline::Topics;
use tests::faults::Broker;
use tests::{Flow, Pipeline, Tail};

const STAGES: [&str; 3] = ["ingestion", "anonymization", "canonization"];

/// Drops `files` NDJSON files (Patient and Observation pairs) of `per_file` records each
/// and returns batch id → record count.
fn drop_files(p: &Pipeline, files: usize, per_file: usize) -> BTreeMap<String, usize> {
    let mut batches = BTreeMap::new();
    for (i, (batch, body)) in tests::ndjson_files(files, per_file).into_iter().enumerate() {
        batches.insert(batch, per_file);
        p.drop_file(&format!("export-{i}.ndjson"), &body);
    }
    batches
}

fn canonical_count(t: &Tail, topics: &Topics) -> usize {
    t.count(
        &topics.name(TopicKind::Canonical(ResourceType::Patient)),
        "CanonicalPatient",
    ) + t.count(
        &topics.name(TopicKind::Canonical(ResourceType::Observation)),
        "CanonicalObservation",
    )
}

fn closed_count(t: &Tail, topics: &Topics) -> usize {
    t.count(
        &topics.name(TopicKind::Canonization),
        "EventDataCanonizationCompleted",
    ) + t.count(&topics.name(TopicKind::Canonization), "CanonizationFailed")
}

/// Starts the three stages with `env`, drops two files, and waits until canonical
/// records flow. Returns the batches and the total record count.
fn start_flowing(p: &mut Pipeline, tail: &Tail, env: &[(&str, &str)]) -> BTreeMap<String, usize> {
    for s in STAGES {
        p.start(s, env);
    }
    let batches = drop_files(p, 2, 4000);
    let topics = p.topics.clone();
    p.wait_for(
        tail,
        "canonical records flowing",
        Duration::from_secs(300),
        |t| canonical_count(t, &topics) >= 300,
    );
    batches
}

/// Asserts the fault landed while records were still flowing.
fn assert_mid_stream(tail: &Tail, p: &Pipeline, batches: &BTreeMap<String, usize>, fault: &str) {
    let at = canonical_count(tail, &p.topics);
    let total: usize = batches.values().sum();
    assert!(
        at < total,
        "all {total} records were canonical before the {fault}; the test did not test it"
    );
    eprintln!("{fault} after {at} of {total} canonical records");
}

/// Waits for every batch to close downstream, stops the stages, and checks every record.
fn settle_and_check(p: &mut Pipeline, tail: Tail, batches: &BTreeMap<String, usize>) {
    let topics = p.topics.clone();
    let lifecycle = topics.name(TopicKind::Canonization);
    // The tail's own consumer can stall after a broker fault (it has no stage's stuck-fetch
    // watch), so every 15 s the closings are also counted from a fresh read.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        // Returns within 15 s (a round), or as soon as the tail has seen every closing;
        // it still fails at once if a stage exits.
        let round = Instant::now();
        p.wait_for(
            &tail,
            "every batch closed by canonization",
            Duration::from_secs(660),
            |t| {
                closed_count(t, &topics) >= batches.len()
                    || round.elapsed() >= Duration::from_secs(15)
            },
        );
        if closed_count(&tail, &topics) >= batches.len() {
            break;
        }
        let read = p.read(std::slice::from_ref(&lifecycle));
        let closed = read
            .iter()
            .filter_map(|r| r.event.as_ref())
            .filter(|e| {
                matches!(
                    e.event_type(),
                    "EventDataCanonizationCompleted" | "CanonizationFailed"
                )
            })
            .count();
        if closed >= batches.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for every batch closed by canonization ({closed} of {})",
            batches.len()
        );
    }
    p.stop_all();
    drop(tail);
    Flow::of(&p.read_all()).assert_exactly_once(batches);
}

#[test]
fn a_broker_crash_mid_stream_loses_and_duplicates_nothing() {
    let broker = Broker::new();
    let mut p = Pipeline::new();
    let tail = p.tail();
    let batches = start_flowing(&mut p, &tail, &[]);
    broker.crash();
    assert_mid_stream(&tail, &p, &batches, "broker crash");
    std::thread::sleep(Duration::from_secs(2));
    broker.start();
    settle_and_check(&mut p, tail, &batches);
}

/// The broker stops answering (SIGSTOP) for longer than the consumers' session timeout
/// (10 s) and the stages' transaction timeout (set to 10 s here): sessions expire and the
/// coordinator aborts the open transactions when it wakes up.
#[test]
fn a_broker_stopped_past_the_session_and_transaction_timeouts_loses_and_duplicates_nothing() {
    let broker = Broker::new();
    let mut p = Pipeline::new();
    let tail = p.tail();
    let batches = start_flowing(&mut p, &tail, &[("MEDPIPE_TRANSACTION_TIMEOUT", "10s")]);
    broker.pause();
    assert_mid_stream(&tail, &p, &batches, "broker pause");
    std::thread::sleep(Duration::from_secs(25));
    broker.resume();
    settle_and_check(&mut p, tail, &batches);
}

/// Small transactions keep every stage committing almost all the time; the broker is
/// frozen first, so each busy stage is left blocked inside `send_offsets_to_transaction`
/// or `commit_transaction`, and then killed and restarted: the transaction coordinator
/// restarts while those commits are in flight. With a 10 s transaction timeout the
/// blocked calls time out before the broker is back, so the stages take the
/// retry-the-commit or unknown-outcome path, not only librdkafka's internal retries.
#[test]
fn a_coordinator_restart_during_in_flight_commits_loses_and_duplicates_nothing() {
    let broker = Broker::new();
    let mut p = Pipeline::new();
    let tail = p.tail();
    let env = [
        ("MEDPIPE_BATCH_MAX_MESSAGES", "5"),
        ("MEDPIPE_BATCH_MAX_WAIT", "20ms"),
        ("MEDPIPE_TRANSACTION_TIMEOUT", "10s"),
    ];
    let batches = start_flowing(&mut p, &tail, &env);
    broker.pause();
    assert_mid_stream(&tail, &p, &batches, "coordinator freeze");
    // Long enough for every busy stage to reach its blocking commit call.
    std::thread::sleep(Duration::from_secs(2));
    broker.crash();
    broker.start();
    settle_and_check(&mut p, tail, &batches);
    let interrupted = ["anonymization", "canonization"]
        .iter()
        .filter(|s| {
            let log = p.log(s);
            log.contains("Commit did not complete") || log.contains("Batch failed; rewinding")
        })
        .count();
    assert!(
        interrupted > 0,
        "no stage saw a commit fail or time out; the restart did not hit a commit in flight"
    );
}

/// A stage's `commit_in_flight` gauge, from its /metrics.
fn commit_in_flight(p: &Pipeline, stage: &str) -> bool {
    p.metric(stage, &format!("medpipe_{stage}_commit_in_flight")) == Some(1.0)
}

/// Stages are SIGKILLed while their commit is in flight: the broker is frozen, so each
/// busy stage blocks inside its commit (its `commit_in_flight` gauge reads 1, its outputs
/// are produced but not acknowledged), and those stages are killed there. The broker then
/// resumes and the stages restart: each new incarnation's `init_transactions` fences the
/// killed one and aborts its transaction, and the input is redone from the committed
/// offsets.
#[test]
fn a_stage_killed_while_its_commit_is_in_flight_loses_and_duplicates_nothing() {
    let broker = Broker::new();
    let mut p = Pipeline::new();
    let tail = p.tail();
    let env = [("MEDPIPE_BATCH_MAX_MESSAGES", "50")];
    let batches = start_flowing(&mut p, &tail, &env);
    broker.pause();
    assert_mid_stream(&tail, &p, &batches, "broker freeze");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut in_commit: Vec<&str> = Vec::new();
    while Instant::now() < deadline && in_commit.len() < STAGES.len() {
        for s in STAGES {
            if !in_commit.contains(&s) && commit_in_flight(&p, s) {
                in_commit.push(s);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        in_commit.contains(&"anonymization") || in_commit.contains(&"canonization"),
        "neither anonymization nor canonization reached a commit while the broker was \
         frozen (in a commit: {in_commit:?}); the test did not test it"
    );
    for s in &in_commit {
        p.kill(s);
    }
    eprintln!("killed while committing: {in_commit:?}");
    broker.resume();
    for s in &in_commit {
        p.start(s, &env);
    }
    settle_and_check(&mut p, tail, &batches);
}

/// A second anonymization instance with the same transactional id (a misconfigured
/// replica, or a zombie coming back) fences the first: the first must stop writing and
/// exit, and the records stay exactly once.
#[test]
fn a_stage_fenced_by_a_second_instance_with_its_transactional_id_exits_and_loses_nothing() {
    let mut p = Pipeline::new();
    let tail = p.tail();
    let mut batches = start_flowing(&mut p, &tail, &[]);
    p.start_named("anonymization-twin", "anonymization", &[]);
    // The first instance finds out it was fenced only when it next commits. On a fast run
    // it had processed every record before the twin started, and stayed up with nothing
    // to commit; so more records arrive once the twin (which fenced it at start) owns its
    // partitions. Each file is one batch on one partition: twenty of them miss the first
    // instance's partitions only if all land on the twin's (at worst (2/3)^20, 1 in 3,300).
    let deadline = Instant::now() + Duration::from_secs(120);
    while !p.log("anonymization-twin").contains("Partitions assigned") {
        assert!(Instant::now() < deadline, "the twin never got partitions");
        std::thread::sleep(Duration::from_millis(200));
    }
    for (i, (batch, body)) in tests::ndjson_files(20, 150).into_iter().enumerate() {
        batches.insert(batch, 150);
        p.drop_file(&format!("more-{i}.ndjson"), &body);
    }
    let status = p.wait_exit(
        "anonymization",
        Duration::from_secs(120),
        "the fenced anonymization instance is still running",
    );
    assert!(!status.success(), "a fenced instance exits with an error");
    assert!(
        p.log("anonymization").to_lowercase().contains("fenced"),
        "the fenced instance says why it stopped"
    );
    settle_and_check(&mut p, tail, &batches);
}

/// A transaction left open past its timeout is aborted by its coordinator, which bumps
/// the producer's epoch; librdkafka then reports the producer "fenced". That is not a
/// zombie: `recover` must replace the producer so the work can be redone, not end the
/// process. (The game day found auditing's publisher exiting here after a broker restart.)
#[test]
fn a_transaction_its_coordinator_aborted_after_the_timeout_is_recovered_not_fatal() {
    use pipeline::txn::{Transactions, TxnSettings};
    use rdkafka::message::Message;
    use rdkafka::producer::{BaseRecord, Producer};

    let p = Pipeline::new();
    let topic = p.topics.name(TopicKind::Ingestion);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let timeout = Duration::from_secs(2);
    let settings = TxnSettings {
        kafka: tests::broker(),
        transactional_id: format!("{}-timed-out", p.prefix),
        transaction_timeout: timeout,
    };
    let metrics = pipeline::telemetry::StageMetrics::new("txn_probe").expect("metrics");
    let mut txn = Transactions::connect(settings, metrics, &shutdown).expect("connect");
    txn.send(
        BaseRecord::to(&topic)
            .key("k")
            .payload("aborted by the coordinator"),
    )
    .expect("send");
    txn.producer()
        .flush(Duration::from_secs(10))
        .expect("flush");
    // The broker aborts timed-out transactions on a 10 s sweep
    // (transaction.abort.timed.out.transaction.cleanup.interval.ms).
    std::thread::sleep(timeout + Duration::from_secs(14));
    txn.recover(&shutdown)
        .expect("a coordinator-aborted transaction is recovered by a new producer");
    txn.send(BaseRecord::to(&topic).key("k").payload("committed"))
        .expect("send after recovery");
    txn.commit(None).expect("commit after recovery");
    let payloads: Vec<String> = p
        .read(&[topic])
        .iter()
        .filter_map(|r| r.message.payload())
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert_eq!(payloads, vec!["committed".to_string()]);
}
