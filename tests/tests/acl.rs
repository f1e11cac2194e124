//! Least privilege on the real broker: each stage runs as its own SCRAM-SHA-512 principal
//! on the dev stack's SASL_SSL listener (127.0.0.1:9095, trusting the dev stack's CA), held
//! to the ACLs `pipeline::access` renders (the same ones the Strimzi `KafkaUser`s carry).
//! The whole pipeline must work exactly once with them, and the broker must refuse
//! canonization's principal when it reads the ingestion topic (where PHI is sealed) or
//! writes the audit topic, while the same principal reads its own input. The operator CLI
//! runs as its own principal too: its intake command and redrive work, and it may not
//! write the audit or canonical topics. A stage with the wrong password, or trusting
//! another CA, stops at start and says so. Runs one at a time like the rest of the suite.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use pipeline::access::grants;
use pipeline::crypto::Secret;
use pipeline::kafka::{consumer_config, producer_config, Connection, ConsumerRole, SaslAuth};
use pipeline::resources::ResourceType;
use pipeline::topics::TopicKind;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use tests::{dev_ca, Flow, Pipeline, SASL_BOOTSTRAP, SASL_SSL_BOOTSTRAP};

const FILES: usize = 2;
const PER_FILE: usize = 300;

/// Creates every stage's user and ACLs through the Admin API (as the super user on the
/// plaintext listener), and returns each stage's password file.
fn provision(p: &Pipeline) -> BTreeMap<&'static str, (String, PathBuf)> {
    let mut plan = Vec::new();
    let mut out = BTreeMap::new();
    for g in grants(&p.topics) {
        let password = uuid::Uuid::new_v4().simple().to_string();
        let file = p.dir.path().join(format!("{}.password", g.stage));
        std::fs::write(&file, format!("{password}\n")).expect("password file");
        let mut v = serde_json::to_value(&g).expect("grant as JSON");
        v["password"] = serde_json::Value::String(password);
        plan.push(v);
        out.insert(g.stage, (g.principal.clone(), file));
    }
    let python = std::env::var("MEDPIPE_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/grant.py");
    let mut child = std::process::Command::new(&python)
        .arg(&script)
        .args(["--bootstrap", tests::BOOTSTRAP])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run grant.py (set MEDPIPE_PYTHON to a Python with confluent-kafka)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&plan).unwrap().as_bytes())
        .unwrap();
    let o = child.wait_with_output().expect("grant.py");
    assert!(
        o.status.success(),
        "grant.py failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn sasl(principal: &str, password_file: &Path) -> Connection {
    let password = std::fs::read_to_string(password_file).unwrap();
    Connection {
        bootstrap: SASL_BOOTSTRAP.into(),
        auth: Some(SaslAuth {
            mechanism: "SCRAM-SHA-512".into(),
            username: principal.into(),
            password: Secret::new(password.trim().to_string()),
            tls_ca: None,
        }),
    }
}

/// Subscribes to `topic` as `kafka`'s principal, in a throwaway group of the kind its
/// grant allows, and reads from the beginning: the number of messages read, or the first
/// error the consumer reports, within 30 s.
fn read_as(kafka: &Connection, topic: &str) -> Result<usize, KafkaError> {
    let group = format!(
        "{}-{}",
        pipeline::readback::READBACK_GROUP_PREFIX,
        uuid::Uuid::new_v4()
    );
    let consumer: BaseConsumer = consumer_config(kafka, &group, ConsumerRole::Readback)
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(_)) => n += 1,
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => return Err(e),
            None if n > 0 => return Ok(n),
            None => {}
        }
    }
    Ok(n)
}

/// Runs the operator CLI as the operator's principal on the SASL listener.
fn as_operator(
    p: &Pipeline,
    users: &BTreeMap<&'static str, (String, PathBuf)>,
    args: &[&str],
) -> std::process::Output {
    let (principal, file) = &users["operator"];
    p.medpipe_command(args)
        .env("MEDPIPE_BOOTSTRAP_SERVERS", SASL_BOOTSTRAP)
        .env("MEDPIPE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
        .env("MEDPIPE_KAFKA_SASL_USERNAME", principal)
        .env("MEDPIPE_KAFKA_SASL_PASSWORD_FILE", file)
        .output()
        .expect("run medpipe")
}

/// Produces one message to `topic` as `kafka`'s principal: the broker must refuse it.
fn assert_write_refused(p: &Pipeline, kafka: &Connection, who: &str, topic: &str) {
    let producer: FutureProducer = producer_config(kafka)
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");
    let sent = p.rt.block_on(
        producer.send(
            FutureRecord::to(topic)
                .key("forged")
                .payload("forged entry"),
            Duration::from_secs(30),
        ),
    );
    match sent {
        Err((e, _)) if authorization_refused(&e) => {}
        other => panic!("the broker did not refuse {who}'s write to {topic}: {other:?}"),
    }
}

fn authorization_refused(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::TopicAuthorizationFailed)
    )
}

#[test]
fn each_stage_runs_as_its_own_principal_and_the_broker_refuses_what_it_may_not_do() {
    let mut p = Pipeline::new();
    let users = provision(&p);
    let files = tests::ndjson_files(FILES, PER_FILE);
    let batches: BTreeMap<String, usize> =
        files.iter().map(|(b, _)| (b.clone(), PER_FILE)).collect();

    // The stages speak SASL_SSL, trusting the dev stack's CA, as on a cluster.
    let ca = dev_ca();
    assert!(ca.is_file(), "no dev CA at {}", ca.display());
    let ca = ca.to_string_lossy().into_owned();
    let tail = p.tail();
    for stage in ["ingestion", "anonymization", "canonization", "auditing"] {
        let (principal, file) = &users[stage];
        let file = file.to_string_lossy().into_owned();
        p.start(
            stage,
            &[
                ("MEDPIPE_BOOTSTRAP_SERVERS", SASL_SSL_BOOTSTRAP),
                ("MEDPIPE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
                ("MEDPIPE_KAFKA_SASL_USERNAME", principal),
                ("MEDPIPE_KAFKA_SASL_PASSWORD_FILE", &file),
                ("MEDPIPE_KAFKA_TLS_CA_FILE", &ca),
            ],
        );
    }
    // The first file is dropped in landing; the second is named by an intake command the
    // operator CLI sends as the operator's principal.
    p.drop_file("export-0.ndjson", &files[0].1);
    let intake = p.ingestion_dir().join("intake");
    std::fs::create_dir_all(&intake).unwrap();
    std::fs::write(intake.join("export-1.ndjson"), &files[1].1).unwrap();
    let sent = as_operator(&p, &users, &["intake", "export-1.ndjson"]);
    assert!(
        sent.status.success(),
        "the operator's intake command failed:\n{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let lifecycle = p.topics.name(TopicKind::Canonization);
    p.wait_for(
        &tail,
        "every batch closed by canonization",
        Duration::from_secs(300),
        |t| {
            t.count(&lifecycle, "EventDataCanonizationCompleted")
                + t.count(&lifecycle, "CanonizationFailed")
                >= FILES
        },
    );
    let recorded = p.wait_for_audit_catch_up(Duration::from_secs(180));
    assert!(
        !recorded.is_empty(),
        "auditing recorded nothing as its own principal"
    );
    Flow::of(&p.read_all()).assert_exactly_once(&batches);
    for stage in ["ingestion", "anonymization", "canonization", "auditing"] {
        let log = p.log(stage);
        assert!(
            !log.contains("uthorization"),
            "{stage} ran into an authorization error with its own grant:\n{log}"
        );
    }

    // Canonization's principal reads its own input...
    let (principal, file) = &users["canonization"];
    let canonization = sasl(principal, file);
    let own = read_as(&canonization, &p.topics.name(TopicKind::Anonymization))
        .expect("canonization reads the anonymization topic");
    assert!(own > 0, "canonization read nothing of its own input");
    // ...but not the ingestion topic, where PHI is sealed.
    match read_as(&canonization, &p.topics.name(TopicKind::Ingestion)) {
        Err(e) if authorization_refused(&e) => {}
        other => panic!(
            "the broker did not refuse canonization's read of the ingestion topic: {other:?}"
        ),
    }
    // Nor may it write the audit topic, which only auditing writes.
    let audit = p.topics.name(TopicKind::Audit);
    assert_write_refused(&p, &canonization, "canonization", &audit);

    // The operator's principal: its redrive (dead-letter and ledger reads, its own
    // transactional id) works; it may not write the audit topic or a canonical topic.
    // The redrive ledger is the platform's to create: the super user's dry run does it.
    assert!(p
        .medpipe(&["dlq", "redrive", "ingestion", "--dry-run"])
        .status
        .success());
    let redrive = as_operator(&p, &users, &["dlq", "redrive", "ingestion", "--json"]);
    assert!(
        redrive.status.success(),
        "the operator's redrive failed:\n{}",
        String::from_utf8_lossy(&redrive.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&redrive.stdout).expect("JSON");
    assert_eq!(summary["redriven"], 0, "{summary}");
    let (principal, file) = &users["operator"];
    let operator = sasl(principal, file);
    assert_write_refused(&p, &operator, "the operator", &audit);
    let patients = p.topics.name(TopicKind::Canonical(ResourceType::Patient));
    assert_write_refused(&p, &operator, "the operator", &patients);

    // A stage given the wrong password stops at start, saying the brokers refused its
    // credentials (and not which password it tried).
    let wrong = p.dir.path().join("wrong.password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let wrong = wrong.to_string_lossy().into_owned();
    let log = stops_at_start(
        &mut p,
        "anonymization-wrong-password",
        &[
            ("MEDPIPE_BOOTSTRAP_SERVERS", SASL_BOOTSTRAP),
            ("MEDPIPE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("MEDPIPE_KAFKA_SASL_USERNAME", &users["anonymization"].0),
            ("MEDPIPE_KAFKA_SASL_PASSWORD_FILE", &wrong),
        ],
        "refused the SCRAM-SHA-512 credentials of user",
    );
    assert!(!log.contains("not-the-password"), "{log}");

    // A stage that trusts another CA than the one that signed the brokers' certificate
    // stops at start, saying the TLS handshake failed.
    let other_ca = p.dir.path().join("other-ca");
    std::fs::create_dir_all(&other_ca).unwrap();
    let made = std::process::Command::new("openssl")
        .current_dir(&other_ca)
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=not the dev stack CA",
        ])
        .output()
        .expect("run openssl");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let other = other_ca.join("ca.crt").to_string_lossy().into_owned();
    let (principal, file) = &users["canonization"];
    let file = file.to_string_lossy().into_owned();
    stops_at_start(
        &mut p,
        "canonization-other-ca",
        &[
            ("MEDPIPE_BOOTSTRAP_SERVERS", SASL_SSL_BOOTSTRAP),
            ("MEDPIPE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("MEDPIPE_KAFKA_SASL_USERNAME", principal),
            ("MEDPIPE_KAFKA_SASL_PASSWORD_FILE", &file),
            ("MEDPIPE_KAFKA_TLS_CA_FILE", &other),
        ],
        "TLS handshake with the brokers at 127.0.0.1:9095 failed",
    );
    p.stop_all();
}

/// Starts an extra instance `<stage>-<why>` with `env`: it must exit with an error whose
/// log says `expected`, within 90 s. Returns its log.
fn stops_at_start(p: &mut Pipeline, name: &str, env: &[(&str, &str)], expected: &str) -> String {
    let stage = name.split('-').next().expect("stage name");
    let mut env = env.to_vec();
    env.push(("MEDPIPE_INSTANCE_ID", "9"));
    p.start_named(name, stage, &env);
    let status = p.wait_exit(
        name,
        Duration::from_secs(90),
        &format!("{name} was still running after 90 s"),
    );
    let log = p.log(name);
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(expected),
        "{name}: the error does not say {expected:?}:\n{log}"
    );
    log
}
