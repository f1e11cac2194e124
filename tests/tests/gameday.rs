//! The game day: many records through all four real stages while the broker is SIGKILLed
//! and restarted at a random moment, the Schema Registry stops answering for a while,
//! stages are SIGKILLed and restarted at random, and an extra stage instance starts with
//! the wrong Kafka credentials; afterwards every record is counted at every stage and the
//! audit trail is verified.
//!
//! It is long, so it is ignored by the suite (which runs the short broker tests in
//! `broker.rs`); `scripts/gameday.sh` runs it in release mode:
//!
//! ```sh
//! GAMEDAY_RUNS=20 GAMEDAY_RECORDS=100000 bash scripts/gameday.sh
//! ```
//!
//! Settings (environment): `GAMEDAY_RUNS` (1), `GAMEDAY_RECORDS` per run (100000),
//! `GAMEDAY_FILES` per run (4), `GAMEDAY_STAGE_KILLS` per run (4),
//! `GAMEDAY_REGISTRY_OUTAGES` per run (1), `GAMEDAY_BAD_CREDENTIALS` per run (1),
//! `GAMEDAY_SEED` (from
//! the clock; printed, so a run can be repeated), `GAMEDAY_REPORT` (a Markdown table is
//! appended to this file).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use pipeline::topics::TopicKind;
use pipeline::ResourceType;
use pipeline::Topics;
use tests::faults::{Broker, Registry};
use tests::{Flow, Pipeline, Tail};

const STAGES: [&str; 4] = ["ingestion", "anonymization", "canonization", "auditing"];

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: enough randomness to place faults, and repeatable from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[lo, hi)`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL the broker, keep it down this many ms, start it again.
    Broker { down_ms: u64 },
    /// SIGKILL a stage and start it again a second later.
    Stage(&'static str),
    /// SIGSTOP the Schema Registry for this many ms, then SIGCONT.
    Registry { down_ms: u64 },
    /// Start one more instance of a stage with the wrong Kafka password on the SCRAM
    /// listener: it must stop at start, saying its credentials were refused, and the
    /// pipeline must not notice.
    BadCredentials(&'static str),
}

const SASL_BOOTSTRAP: &str = "127.0.0.1:9094";

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

/// One run; returns its report row.
fn run(rng: &mut Rng, run_no: u64, records: usize, files: usize, stage_kills: u64) -> String {
    let started = Instant::now();
    let broker = Broker::new();
    let registry = Registry::new();
    let mut p = Pipeline::new();
    for s in STAGES {
        p.start(s, &[]);
    }
    let tail = p.tail();
    let topics = p.topics.clone();
    let per_file = records / files;
    let mut batches = BTreeMap::new();
    for (i, (batch, body)) in tests::ndjson_files(files, per_file).into_iter().enumerate() {
        batches.insert(batch, per_file);
        p.drop_file(&format!("export-{i}.ndjson"), &body);
    }
    let total = per_file * files;

    // Faults at random points of the stream, by how many canonical records are out.
    let mut plan: Vec<(usize, Fault)> = vec![(
        rng.between(total as u64 / 20, total as u64 * 8 / 10) as usize,
        Fault::Broker {
            down_ms: rng.between(0, 5000),
        },
    )];
    for _ in 0..stage_kills {
        let at = rng.between(total as u64 / 50, total as u64 * 9 / 10) as usize;
        let stage = STAGES[rng.between(0, STAGES.len() as u64) as usize];
        plan.push((at, Fault::Stage(stage)));
    }
    for _ in 0..env_or("GAMEDAY_REGISTRY_OUTAGES", 1) {
        let at = rng.between(total as u64 / 50, total as u64 * 9 / 10) as usize;
        plan.push((
            at,
            Fault::Registry {
                down_ms: rng.between(1000, 15000),
            },
        ));
    }
    for _ in 0..env_or("GAMEDAY_BAD_CREDENTIALS", 1) {
        let at = rng.between(total as u64 / 50, total as u64 * 9 / 10) as usize;
        let stage = STAGES[rng.between(0, STAGES.len() as u64) as usize];
        plan.push((at, Fault::BadCredentials(stage)));
    }
    plan.sort_by_key(|(at, _)| *at);
    let wrong_password = p.dir.path().join("wrong.password");
    std::fs::write(&wrong_password, "not-the-password\n").expect("password file");
    let wrong_password = wrong_password.to_string_lossy().into_owned();
    let mut impostors = 0;
    let mut faults = Vec::new();
    for (at, fault) in &plan {
        p.wait_for(
            &tail,
            "the next fault point",
            Duration::from_secs(1800),
            |t| canonical_count(t, &topics) >= *at,
        );
        let out = canonical_count(&tail, &topics);
        match *fault {
            Fault::Broker { down_ms } => {
                broker.crash();
                std::thread::sleep(Duration::from_millis(down_ms));
                broker.start();
                faults.push(format!("broker@{out} ({down_ms} ms down)"));
            }
            Fault::Stage(stage) => {
                // The restarted stage is waited for until it serves its endpoints (its
                // signal handlers are set by then): a SIGTERM at the end of the run that
                // reached a stage still starting ended it before it could stop cleanly.
                let served = |p: &Pipeline| p.log(stage).matches("Serving /metrics").count();
                let before = served(&p);
                p.kill(stage);
                std::thread::sleep(Duration::from_secs(1));
                p.start(stage, &[]);
                let deadline = Instant::now() + Duration::from_secs(120);
                while served(&p) == before {
                    assert!(Instant::now() < deadline, "{stage} did not start again");
                    std::thread::sleep(Duration::from_millis(100));
                }
                faults.push(format!("{stage}@{out}"));
            }
            Fault::Registry { down_ms } => {
                registry.pause();
                std::thread::sleep(Duration::from_millis(down_ms));
                registry.resume();
                faults.push(format!("registry@{out} ({down_ms} ms unanswered)"));
            }
            Fault::BadCredentials(stage) => {
                let name = format!("{stage}-bad-credentials-{}", impostors);
                let user = format!("{}-{stage}", p.prefix);
                p.start_named(
                    &name,
                    stage,
                    &[
                        ("MEDPIPE_BOOTSTRAP_SERVERS", SASL_BOOTSTRAP),
                        ("MEDPIPE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
                        ("MEDPIPE_KAFKA_SASL_USERNAME", &user),
                        ("MEDPIPE_KAFKA_SASL_PASSWORD_FILE", &wrong_password),
                        ("MEDPIPE_INSTANCE_ID", "99"),
                    ],
                );
                // It stops at start, saying why, and the pipeline goes on.
                let status = p.wait_exit(
                    &name,
                    Duration::from_secs(120),
                    &format!("{name} still runs"),
                );
                let log = p.log(&name);
                assert!(
                    !status.success() && log.contains("refused the SCRAM-SHA-512 credentials"),
                    "{name} did not stop on its refused credentials:\n{log}"
                );
                impostors += 1;
                faults.push(format!("{stage} with wrong credentials@{out}"));
            }
        }
        eprintln!("run {run_no}: {}", faults.last().unwrap());
    }
    p.wait_for(
        &tail,
        "every batch closed by canonization",
        Duration::from_secs(3600),
        |t| closed_count(t, &topics) >= files,
    );
    let elapsed = started.elapsed();
    for s in ["ingestion", "anonymization", "canonization"] {
        p.stop(s);
    }
    drop(tail);
    let counted: Vec<String> = [
        TopicKind::Ingestion,
        TopicKind::Anonymization,
        TopicKind::Canonization,
        TopicKind::Canonical(ResourceType::Patient),
        TopicKind::Canonical(ResourceType::Observation),
    ]
    .iter()
    .map(|k| topics.name(*k))
    .collect();
    // Counting reads and decodes every record on one core while auditing, single
    // threaded, catches up on the other.
    let phase = Instant::now();
    let ((flow, counted_in), audited_in) = std::thread::scope(|s| {
        let counting = s.spawn(|| (Flow::of(&p.read(&counted)), phase.elapsed()));
        p.wait_for_audit_lag_hint(Duration::from_secs(1800));
        p.wait_for_audit_catch_up(Duration::from_secs(1800));
        let audited_in = phase.elapsed();
        (counting.join().expect("counting"), audited_in)
    });
    let (lost, duplicated) = flow.losses(&batches);
    p.stop("auditing");
    let phase = Instant::now();
    let verify = p.medpipe(&["audit", "verify", "--published"]);
    let verified = verify.status.success();
    eprintln!(
        "run {run_no}: counted in {:.0} s, auditing caught up in {:.0} s, chain verified in {:.0} s",
        counted_in.as_secs_f64(),
        audited_in.as_secs_f64(),
        phase.elapsed().as_secs_f64()
    );
    let row = format!(
        "| {run_no} | {total} | {} | {lost} | {duplicated} | {} | {} | {:.0} s |",
        faults.join(", "),
        flow.closed_once(&batches),
        if verified { "verified" } else { "FAILED" },
        elapsed.as_secs_f64()
    );
    flow.assert_exactly_once(&batches);
    assert!(
        verified,
        "audit verify failed: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    row
}

#[test]
#[ignore = "long: run by scripts/gameday.sh"]
fn gameday() {
    let runs = env_or("GAMEDAY_RUNS", 1);
    let records = env_or("GAMEDAY_RECORDS", 100_000) as usize;
    let files = env_or("GAMEDAY_FILES", 4) as usize;
    let stage_kills = env_or("GAMEDAY_STAGE_KILLS", 4);
    let seed = env_or(
        "GAMEDAY_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    )
    .max(1);
    eprintln!("game day: {runs} runs of {records} records, seed {seed}");
    let mut rng = Rng(seed);
    let header = format!(
        "\nGame day, seed {seed}: {runs} runs of {records} records in {files} files; per run one broker SIGKILL, {stage_kills} stage SIGKILLs, {} registry outages and {} stage instances started with wrong Kafka credentials.\n\n\
         | run | records | faults (at canonical records out) | lost | duplicated | batches closed once | audit chain | time |\n\
         |---|---|---|---|---|---|---|---|\n",
        env_or("GAMEDAY_REGISTRY_OUTAGES", 1),
        env_or("GAMEDAY_BAD_CREDENTIALS", 1),
    );
    let mut report = std::env::var("GAMEDAY_REPORT").ok().map(|path| {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("report file");
        f.write_all(header.as_bytes()).expect("write report");
        f
    });
    eprint!("{header}");
    for run_no in 1..=runs {
        let row = run(&mut rng, run_no, records, files, stage_kills);
        eprintln!("{row}");
        if let Some(f) = report.as_mut() {
            writeln!(f, "{row}").expect("write report");
        }
    }
}
