//! Harness for the end-to-end tests: an isolated pipeline (own topic prefix, groups,
//! transactional ids, folders and keys) on the real Kafka and Schema Registry, with the
//! real stage binaries started and killed as processes.

// This crate is test code: failing loudly on a broken precondition is what it is for.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::new_without_default)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pipeline::events::Payload;
use pipeline::readback::Record;
use pipeline::{Codec, Topics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

pub const BOOTSTRAP: &str = "127.0.0.1:9092";

/// The dev stack's plaintext listener, where clients need no credentials.
pub fn broker() -> pipeline::kafka::Connection {
    pipeline::kafka::Connection::plaintext(BOOTSTRAP)
}
pub const REGISTRY: &str = "http://127.0.0.1:8081";

/// The dev stack's SASL listeners: SCRAM-SHA-512 over plaintext, and over TLS with a
/// certificate signed by [`dev_ca`].
pub const SASL_BOOTSTRAP: &str = "127.0.0.1:9094";
pub const SASL_SSL_BOOTSTRAP: &str = "127.0.0.1:9095";

/// The CA the dev stack made for its TLS listener (`scripts/devstack.sh`: `$MEDPIPE_STATE/tls`).
pub fn dev_ca() -> PathBuf {
    let state = std::env::var_os("MEDPIPE_STATE").map_or_else(
        || {
            std::env::var_os("MEDPIPE_CACHE")
                .map_or_else(
                    || {
                        PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                            .join(".cache/medpipe")
                    },
                    PathBuf::from,
                )
                .join("devstack")
        },
        PathBuf::from,
    );
    state.join("tls/ca.crt")
}
pub const MASTER_KEY: &str = "1111111111111111111111111111111111111111111111111111111111111111";
pub const PSEUDONYM_KEY: &str = "2222222222222222222222222222222222222222222222222222222222222222";
pub const AUDIT_KEY: &str = "3333333333333333333333333333333333333333333333333333333333333333";

/// Directory holding the stage binaries: the test executable lives in `<target>/debug/deps`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// One isolated pipeline.
pub struct Pipeline {
    pub prefix: String,
    pub topics: Topics,
    pub dir: tempfile::TempDir,
    pub rt: tokio::runtime::Runtime,
    pub codec: Codec,
    children: HashMap<String, Child>,
    /// Whether a canonization stage ran here (its output is dumped on drop, see
    /// [`Pipeline::dump_canonical`]).
    ran_canonization: bool,
}

impl Pipeline {
    /// Registers schemas and creates topics for a fresh prefix. Fails with a clear message
    /// when the dev stack is not running.
    pub fn new() -> Pipeline {
        let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let topics = Topics::new(prefix.clone());
        let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
        let kafka = pipeline::config::KafkaArgs {
            bootstrap_servers: BOOTSTRAP.into(),
            schema_registry_url: REGISTRY.into(),
            schema_registry_username: None,
            schema_registry_password_file: None,
            topic_prefix: prefix.clone(),
            topic_partitions: 3,
            topic_replication: 1,
            topic_configs: vec![],
            kafka_sasl_mechanism: None,
            kafka_sasl_username: None,
            kafka_sasl_password_file: None,
            kafka_tls_ca_file: None,
        };
        rt.block_on(pipeline::stage::prepare(&kafka, Duration::from_secs(5)))
            .unwrap_or_else(|e| {
                panic!(
                    "the dev stack is not reachable ({e}); start it with scripts/devstack.sh start"
                )
            });
        let codec = Codec::new(REGISTRY, &topics).expect("codec");
        let dir = tempfile::Builder::new()
            .prefix(&format!("medpipe-{prefix}-"))
            .tempdir()
            .expect("tempdir");
        eprintln!(
            "pipeline {prefix}: logs and data in {}",
            dir.path().display()
        );
        Pipeline {
            prefix,
            topics,
            dir,
            rt,
            codec,
            children: HashMap::new(),
            ran_canonization: false,
        }
    }

    pub fn ingestion_dir(&self) -> PathBuf {
        self.dir.path().join("ingestion")
    }

    pub fn landing(&self) -> PathBuf {
        self.ingestion_dir().join("landing")
    }

    pub fn audit_dir(&self) -> PathBuf {
        self.dir.path().join("audit")
    }

    /// Starts a stage binary (`ingestion`, `anonymization`, ...) with extra env.
    pub fn start(&mut self, stage: &str, extra_env: &[(&str, &str)]) {
        self.start_named(stage, stage, extra_env);
    }

    /// Starts a stage binary under its own name, so one stage can run as several
    /// processes (each with its own log, `<name>.log`).
    pub fn start_named(&mut self, name: &str, stage: &str, extra_env: &[(&str, &str)]) {
        self.ran_canonization |= stage == "canonization";
        let exe = bin_dir().join(format!("medpipe-{stage}"));
        assert!(
            exe.exists(),
            "{} is missing: run `cargo build --workspace --bins` first",
            exe.display()
        );
        let log_path = self.dir.path().join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("log file");
        let mut cmd = Command::new(exe);
        cmd.env("MEDPIPE_BOOTSTRAP_SERVERS", BOOTSTRAP)
            .env("MEDPIPE_SCHEMA_REGISTRY_URL", REGISTRY)
            .env("MEDPIPE_TOPIC_PREFIX", &self.prefix)
            .env("MEDPIPE_MASTER_KEY", MASTER_KEY)
            .env("MEDPIPE_PSEUDONYM_KEY", PSEUDONYM_KEY)
            .env("MEDPIPE_METRICS_ADDR", "127.0.0.1:0")
            .env("MEDPIPE_INGESTION_DIR", self.dir.path().join("ingestion"))
            .env("MEDPIPE_AUDIT_DIR", self.audit_dir())
            .env("MEDPIPE_AUDIT_KEY", AUDIT_KEY)
            .env("RUST_LOG", "info")
            // An error's chain, not a backtrace, ends a failed stage's log.
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LIB_BACKTRACE", "0")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn stage");
        self.children.insert(name.to_string(), child);
    }

    /// Runs the operator CLI against this pipeline and its audit directory.
    pub fn medpipe(&self, args: &[&str]) -> std::process::Output {
        self.medpipe_command(args).output().expect("run medpipe")
    }

    /// The operator CLI as a command, to spawn (and kill) it.
    pub fn medpipe_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin_dir().join("medpipe"));
        cmd.args(args)
            .env("MEDPIPE_BOOTSTRAP_SERVERS", BOOTSTRAP)
            .env("MEDPIPE_SCHEMA_REGISTRY_URL", REGISTRY)
            .env("MEDPIPE_TOPIC_PREFIX", &self.prefix)
            .env("MEDPIPE_AUDIT_DIR", self.audit_dir())
            .env("MEDPIPE_AUDIT_KEY", AUDIT_KEY)
            .env("NO_COLOR", "1");
        cmd
    }

    /// Every entry in the audit store, in chain order (without verifying it).
    pub fn audit_entries(&self) -> Vec<auditing::entry::AuditEntry> {
        let mut out = Vec::new();
        auditing::store::scan(&self.audit_dir(), |_, _, e| {
            out.push(e);
            Ok(())
        })
        .expect("read the audit store");
        out
    }

    /// How many compliance alerts of this kind the audit store holds.
    pub fn alerts_recorded(&self, kind: auditing::monitors::AlertKind) -> usize {
        let needle = format!("\"kind\":\"{}\"", kind.as_str());
        self.audit_entries()
            .iter()
            .filter(|e| {
                e.event_type == auditing::monitors::ALERT_EVENT_TYPE
                    && e.detail.as_deref().is_some_and(|d| d.contains(&needle))
            })
            .count()
    }

    /// Messages on every audited topic (all but the audit topic), by position.
    pub fn audited_positions(&self) -> std::collections::HashSet<(String, i32, i64)> {
        let audit = self.topics.name(pipeline::topics::TopicKind::Audit);
        let audited: Vec<String> = self
            .topics
            .all()
            .into_iter()
            .filter(|t| *t != audit)
            .collect();
        pipeline::readback::read_all(&broker(), &audited, None, Duration::from_secs(120))
            .expect("read back")
            .iter()
            .map(|r| {
                (
                    r.message.topic().to_string(),
                    r.message.partition(),
                    r.message.offset(),
                )
            })
            .collect()
    }

    /// How far auditing's committed offsets trail the ends of the audited topics, allowing
    /// one transaction marker per partition. Only a hint: the audit store is the truth.
    pub fn audit_lag(&self) -> i64 {
        let audit = self.topics.name(pipeline::topics::TopicKind::Audit);
        let consumer: BaseConsumer = pipeline::kafka::consumer_config(
            &broker(),
            &format!("{}-auditing", self.prefix),
            pipeline::kafka::ConsumerRole::Readback,
        )
        .create()
        .expect("consumer");
        let mut ends = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for topic in self.topics.all().into_iter().filter(|t| *t != audit) {
            let Ok(md) = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)) else {
                return i64::MAX;
            };
            for p in md.topics().iter().flat_map(|t| t.partitions()) {
                let Ok((_, high)) =
                    consumer.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))
                else {
                    return i64::MAX;
                };
                ends.insert((topic.clone(), p.id()), high);
                tpl.add_partition(&topic, p.id());
            }
        }
        let Ok(committed) = consumer.committed_offsets(tpl, Duration::from_secs(10)) else {
            return i64::MAX;
        };
        committed
            .elements()
            .iter()
            .map(|e| {
                let at = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                };
                let high = ends[&(e.topic().to_string(), e.partition())];
                (high - at - 1).max(0)
            })
            .sum()
    }

    /// Waits, cheaply, until auditing's committed offsets are close to the ends of the
    /// audited topics, or until they stop falling for 30 s. Scanning the store decrypts
    /// every entry and competes with auditing for the CPU, so a long run waits here first.
    pub fn wait_for_audit_lag_hint(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (mut best, mut since) = (i64::MAX, Instant::now());
        loop {
            let lag = self.audit_lag();
            if lag == 0 || since.elapsed() > Duration::from_secs(30) || Instant::now() > deadline {
                return;
            }
            if lag < best {
                (best, since) = (lag, Instant::now());
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Waits until the audit store holds an entry for every message on the audited
    /// topics, and returns those messages' positions.
    pub fn wait_for_audit_catch_up(
        &self,
        timeout: Duration,
    ) -> std::collections::HashSet<(String, i32, i64)> {
        let deadline = Instant::now() + timeout;
        let mut want = self.audited_positions();
        let mut confirmed = false;
        loop {
            let mut have = std::collections::HashSet::new();
            auditing::store::scan(&self.audit_dir(), |_, _, e| {
                if !e.is_own() {
                    have.insert((e.topic, e.partition, e.offset));
                }
                Ok(())
            })
            .expect("read the audit store");
            if want.is_subset(&have) {
                if confirmed {
                    return want;
                }
                // Messages may have arrived meanwhile: look once more.
                want = self.audited_positions();
                confirmed = true;
                continue;
            }
            confirmed = false;
            assert!(
                Instant::now() < deadline,
                "auditing did not catch up: {} of {} messages recorded",
                have.len(),
                want.len()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// SIGKILL: no chance to finish or abort the open transaction.
    pub fn kill(&mut self, stage: &str) {
        if let Some(mut c) = self.children.remove(stage) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The exit status of a stage process that has exited on its own, if it has; it is
    /// then no longer one of the pipeline's processes.
    pub fn exited(&mut self, name: &str) -> Option<std::process::ExitStatus> {
        let status = self.children.get_mut(name)?.try_wait().ok().flatten()?;
        self.children.remove(name);
        Some(status)
    }

    /// Waits up to `timeout` for the process `name` to exit on its own, and returns its
    /// exit status; fails, saying `what`, if it is still running then.
    pub fn wait_exit(
        &mut self,
        name: &str,
        timeout: Duration,
        what: &str,
    ) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited(name) {
                return status;
            }
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until `f` holds, like `Tail::wait_until`, but fails at once, with the end
    /// of its log, when a stage process exits on its own meanwhile.
    pub fn wait_for(
        &mut self,
        tail: &Tail,
        what: &str,
        timeout: Duration,
        f: impl Fn(&Tail) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !f(tail) {
            let names: Vec<String> = self.children.keys().cloned().collect();
            for name in names {
                if let Some(status) = self.exited(&name) {
                    let log = self.log(&name);
                    let tail_lines: Vec<&str> = log.lines().rev().take(15).collect();
                    panic!(
                        "{name} exited ({status}) while waiting for {what}; its log ends:\n{}",
                        tail_lines.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGSTOP: the stage stops where it is, in the middle of whatever it was doing; a
    /// `kill` afterwards ends it there.
    pub fn pause(&self, stage: &str) {
        let c = self
            .children
            .get(stage)
            .unwrap_or_else(|| panic!("{stage} is not running"));
        let status = Command::new("kill")
            .arg("-STOP")
            .arg(c.id().to_string())
            .status()
            .expect("kill -STOP");
        assert!(status.success(), "kill -STOP {stage}");
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self, stage: &str) {
        if let Some(mut c) = self.children.remove(stage) {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = c.try_wait() {
                    assert!(
                        status.success(),
                        "{stage} exited with {status} after SIGTERM; see its log"
                    );
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            panic!("{stage} did not stop within 30s of SIGTERM");
        }
    }

    pub fn stop_all(&mut self) {
        let names: Vec<String> = self.children.keys().cloned().collect();
        for n in names {
            self.stop(&n);
        }
    }

    /// Drops a file atomically: written under a dot-name, then renamed into place.
    pub fn drop_file(&self, name: &str, contents: &[u8]) {
        let landing = self.landing();
        std::fs::create_dir_all(&landing).expect("landing dir");
        let tmp = landing.join(format!(".{name}.part"));
        std::fs::write(&tmp, contents).expect("write");
        std::fs::rename(&tmp, landing.join(name)).expect("rename");
    }

    /// Every committed message on every topic of this pipeline, decoded where possible.
    pub fn read_all(&self) -> Vec<Record> {
        self.read(&self.topics.all())
    }

    /// Every committed message of some topics, decoded where possible.
    pub fn read(&self, topics: &[String]) -> Vec<Record> {
        pipeline::readback::read_all(
            &broker(),
            topics,
            Some((&self.codec, self.rt.handle())),
            Duration::from_secs(120),
        )
        .expect("read back")
    }

    /// Sends an event as a plain (non-transactional) producer would, e.g. a command.
    pub fn send(&self, event: &pipeline::Event) {
        let bytes = self.rt.block_on(self.codec.encode(event)).expect("encode");
        self.send_raw(&self.topics.name(event.payload.topic_kind()), &bytes);
    }

    /// Sends raw bytes, e.g. a poison message.
    pub fn send_raw(&self, topic: &str, bytes: &[u8]) {
        use rdkafka::producer::{BaseRecord, Producer};
        let producer: rdkafka::producer::BaseProducer = pipeline::kafka::producer_config(&broker())
            .create()
            .expect("producer");
        producer
            .send(BaseRecord::to(topic).key("k").payload(bytes))
            .map_err(|(e, _)| e)
            .expect("send");
        producer.flush(Duration::from_secs(10)).expect("flush");
    }

    /// A live read_committed view of every topic, for waiting on progress.
    pub fn tail(&self) -> Tail {
        Tail::start(&self.topics)
    }

    /// The stage's /metrics page, from the address it logged at start-up.
    pub fn metrics(&self, stage: &str) -> String {
        self.http_get(stage, "/metrics")
    }

    /// One sample of the stage's /metrics page (see [`metric_value`]).
    pub fn metric(&self, stage: &str, sample: &str) -> Option<f64> {
        metric_value(&self.metrics(stage), sample)
    }

    /// The raw HTTP/1.0 response (status line, headers, body) to `GET path` on a stage's
    /// telemetry address (which auditing's batch status API shares).
    pub fn http_get(&self, stage: &str, path: &str) -> String {
        use std::io::{Read, Write};
        let log = self.log(stage);
        // The latest address: a restarted stage appends to its log and binds anew.
        let addr = log
            .lines()
            .rev()
            .find_map(|l| {
                l.contains("Serving /metrics")
                    .then(|| l.split("bound=").nth(1))
                    .flatten()
                    .and_then(|rest| rest.split_whitespace().next())
            })
            .unwrap_or_else(|| panic!("{stage} has not logged its metrics address"))
            .to_string();
        let mut conn = std::net::TcpStream::connect(&addr).expect("connect to the stage");
        write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
        let mut body = String::new();
        conn.read_to_string(&mut body).expect("read the response");
        body
    }

    pub fn log(&self, stage: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{stage}.log"))).unwrap_or_default()
    }
}

impl Pipeline {
    /// With `MEDPIPE_CANONICAL_DUMP` set to a folder, writes the distinct canonical
    /// resources this pipeline committed there, as `<prefix>.ndjson`, for the reference
    /// FHIR validator: `scripts/test.sh` sets it for the broker tests and then runs
    /// `scripts/fhir-validate.sh` over the folder. At most `MEDPIPE_CANONICAL_DUMP_PER_TYPE`
    /// (default 100) of each resource type per pipeline, the first on the topics: the
    /// validator takes tens of milliseconds per resource, and the large tests repeat a
    /// few generated shapes thousands of times. Called on drop; a failure to read only
    /// warns (the folder then lacks this pipeline's resources, which the script's count
    /// shows).
    fn dump_canonical(&self) {
        let Some(dir) = std::env::var_os("MEDPIPE_CANONICAL_DUMP") else {
            return;
        };
        if !self.ran_canonization {
            return;
        }
        let topics: Vec<String> = pipeline::topics::TopicKind::canonical()
            .map(|k| self.topics.name(k))
            .collect();
        let records = match pipeline::readback::read_all(
            &broker(),
            &topics,
            Some((&self.codec, self.rt.handle())),
            Duration::from_secs(60),
        ) {
            Ok(r) => r,
            Err(e) => {
                eprintln!(
                    "warning: canonical resources of {} not dumped: {e}",
                    self.prefix
                );
                return;
            }
        };
        let per_type: usize = std::env::var("MEDPIPE_CANONICAL_DUMP_PER_TYPE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100);
        let mut by_type: HashMap<String, usize> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        let mut out = String::new();
        for r in &records {
            let Some((_, json, _)) = r.event.as_ref().and_then(|e| e.payload.canonical()) else {
                continue;
            };
            // One line per resource, whatever the spacing on the topic; what is not JSON
            // goes in as it is, for the validator to refuse.
            let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
                out.push_str(&json.replace('\n', " "));
                out.push('\n');
                continue;
            };
            let kind = v["resourceType"].as_str().unwrap_or("").to_string();
            let n = by_type.entry(kind).or_default();
            if *n >= per_type {
                continue;
            }
            let line = v.to_string();
            if seen.insert(line.clone()) {
                *n += 1;
                out.push_str(&line);
                out.push('\n');
            }
        }
        if out.is_empty() {
            return;
        }
        let dir = PathBuf::from(dir);
        let written = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(dir.join(format!("{}.ndjson", self.prefix)), out));
        if let Err(e) = written {
            eprintln!(
                "warning: canonical resources of {} not dumped: {e}",
                self.prefix
            );
        }
    }
}

impl Pipeline {
    /// Deletes every topic of this pipeline's prefix (its event topics, dead letters,
    /// ledgers and state), so that a long sequence of runs (the game day) does not pile up
    /// partitions that a restarted broker must load. Failures only warn.
    pub fn delete_topics(&self) {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        let mut names = self.topics.all();
        names.extend(self.topics.internal());
        let admin: AdminClient<DefaultClientContext> =
            match pipeline::kafka::admin_config(&broker()).create() {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("warning: topics of {} not deleted: {e}", self.prefix);
                    return;
                }
            };
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(60)));
        match self.rt.block_on(admin.delete_topics(&refs, &options)) {
            Ok(results) => {
                let failed = results.iter().filter(|r| r.is_err()).count();
                if failed > 0 {
                    eprintln!(
                        "warning: {failed} of {} topics of {} not deleted",
                        refs.len(),
                        self.prefix
                    );
                }
            }
            Err(e) => eprintln!("warning: topics of {} not deleted: {e}", self.prefix),
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for (_, mut c) in self.children.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.dump_canonical();
        if std::thread::panicking() {
            // Keep logs of a failed test for inspection.
            let kept = self.dir.path().to_path_buf();
            let _ = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")).keep();
            eprintln!("test failed; logs kept in {}", kept.display());
        }
    }
}

/// Counts committed messages per (topic, event type) as they arrive.
pub struct Tail {
    counts: Arc<Mutex<HashMap<(String, String), usize>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Tail {
    fn start(topics: &Topics) -> Tail {
        let counts = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, s, names) = (counts.clone(), stop.clone(), topics.all());
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            let codec = Codec::new(REGISTRY, &Topics::new("unused")).expect("codec");
            // Where to go on from, per partition: a consumer that stops receiving is
            // replaced (after the broker fenced itself, a tail kept a stale view of the
            // partitions' leaders and never received again) and resumes here.
            let mut next: HashMap<(String, i32), Offset> = HashMap::new();
            for n in &names {
                for p in 0..3 {
                    next.insert((n.clone(), p), Offset::Beginning);
                }
            }
            let assigned = |next: &HashMap<(String, i32), Offset>| {
                let consumer: BaseConsumer = pipeline::kafka::readback_config(&broker(), "tail")
                    .create()
                    .expect("tail consumer");
                let mut tpl = TopicPartitionList::new();
                for ((t, p), o) in next {
                    tpl.add_partition_offset(t, *p, *o).expect("tpl");
                }
                consumer.assign(&tpl).expect("assign");
                consumer
            };
            let mut consumer = assigned(&next);
            let mut last = Instant::now();
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                    if last.elapsed() > Duration::from_secs(20) {
                        // Quiet for 20 s: most likely nothing to read, but a fresh
                        // consumer costs little and cannot miss anything.
                        let old = std::mem::replace(&mut consumer, assigned(&next));
                        std::thread::spawn(move || drop(old));
                        last = Instant::now();
                    }
                    continue;
                };
                last = Instant::now();
                next.insert(
                    (m.topic().to_string(), m.partition()),
                    Offset::Offset(m.offset() + 1),
                );
                // A registry that does not answer is waited for, so no record is
                // miscounted as undecodable during an outage.
                let t = match m.payload() {
                    None => "(raw)".to_string(),
                    Some(b) => loop {
                        match rt.block_on(codec.decode(b)) {
                            Ok(e) => break e.header.event_type,
                            Err(e)
                                if e.class() == pipeline::ErrorClass::Retry
                                    && !s.load(std::sync::atomic::Ordering::SeqCst) =>
                            {
                                codec.clear_cached_errors();
                                std::thread::sleep(Duration::from_millis(200));
                            }
                            Err(_) => break "(raw)".to_string(),
                        }
                    },
                };
                if let Ok(mut c) = c.lock() {
                    *c.entry((m.topic().to_string(), t)).or_default() += 1;
                }
            }
        });
        Tail {
            counts,
            stop,
            handle: Some(handle),
        }
    }

    pub fn count(&self, topic: &str, event_type: &str) -> usize {
        self.counts
            .lock()
            .map(|c| {
                c.get(&(topic.to_string(), event_type.to_string()))
                    .copied()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    }

    /// Waits until `f` holds; panics with `what` after `timeout`.
    pub fn wait_until(&self, what: &str, timeout: Duration, f: impl Fn(&Tail) -> bool) {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// `files` synthetic FHIR NDJSON files (Patient and Observation pairs) of `per_file`
/// records each, fresh content every call, with their batch ids.
pub fn ndjson_files(files: usize, per_file: usize) -> Vec<(String, Vec<u8>)> {
    (0..files)
        .map(|_| {
            let mut body = Vec::new();
            ingestion::synthetic::write(
                ingestion::formats::SourceFormat::FhirNdjson,
                &mut body,
                per_file,
                &fresh_tag(),
            )
            .expect("write");
            (batch_of(&body), body)
        })
        .collect()
}

/// A synthetic Synthea-style patients.csv with `n` patients, and the identifiers in it.
/// Every identifier is unique and recognisable (`Given<i>`, `999-..`), so tests can look
/// for leaks. A fresh tag per call gives every file different content.
pub fn synthetic_patients(n: usize) -> (Vec<u8>, Vec<String>) {
    let tag = fresh_tag();
    let mut csv = Vec::new();
    ingestion::synthetic::write_patients_csv(&mut csv, n, &tag).expect("write csv");
    let ids = (0..n)
        .flat_map(|i| ingestion::synthetic::Person::new(i, &tag).identifiers())
        .collect();
    (csv, ids)
}

/// The identifiers that appear in clear in any message: in its key, its value or a
/// header value. Sealed payloads are ciphertext, so a hit is a real leak.
pub fn in_clear<'a>(records: &[Record], identifiers: &'a [String]) -> Vec<&'a str> {
    let has = |hay: &[u8], id: &str| hay.windows(id.len()).any(|w| w == id.as_bytes());
    identifiers
        .iter()
        .map(String::as_str)
        .filter(|id| {
            records
                .iter()
                .any(|r| message_parts(r).iter().any(|(_, hay)| has(hay, id)))
        })
        .collect()
}

/// The identifiers that appear in clear as whole words: like [`in_clear`], but a hit must
/// have no ASCII letter or digit right before or after it. For short strings taken from
/// free text (`54106`, `Bell`), which otherwise match inside hashes, UUIDs or longer words.
pub fn in_clear_as_words<'a>(records: &[Record], identifiers: &'a [String]) -> Vec<&'a str> {
    identifiers
        .iter()
        .map(String::as_str)
        .filter(|id| {
            records.iter().any(|r| {
                message_parts(r)
                    .iter()
                    .any(|(_, hay)| contains_word(hay, id))
            })
        })
        .collect()
}

/// A message's key, value and header values, each named.
fn message_parts(r: &Record) -> Vec<(&'static str, &[u8])> {
    use rdkafka::message::Headers;
    let m = &r.message;
    let mut parts = vec![
        ("key", m.key().unwrap_or_default()),
        ("value", m.payload().unwrap_or_default()),
    ];
    if let Some(h) = m.headers() {
        parts.extend(h.iter().map(|hd| ("header", hd.value.unwrap_or_default())));
    }
    parts
}

/// Whether `id` occurs in `hay` with no ASCII letter or digit right before or after it.
pub fn contains_word(hay: &[u8], id: &str) -> bool {
    let n = id.len();
    hay.windows(n).enumerate().any(|(at, w)| {
        w == id.as_bytes()
            && !(at > 0 && hay[at - 1].is_ascii_alphanumeric())
            && !hay.get(at + n).is_some_and(u8::is_ascii_alphanumeric)
    })
}

/// Where each of `leaked` appears in clear, one line per hit: a failing test's message.
pub fn leak_report(records: &[Record], leaked: &[&str]) -> String {
    leaked
        .iter()
        .flat_map(|id| where_in_clear(records, id))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Where `id` appears in clear: the topic and the bytes around each hit, for a failing
/// test's message (test data are synthetic, so printing them is safe).
pub fn where_in_clear(records: &[Record], id: &str) -> Vec<String> {
    let mut found = Vec::new();
    for r in records {
        for (part, hay) in message_parts(r) {
            for (at, _) in hay
                .windows(id.len())
                .enumerate()
                .filter(|(_, w)| *w == id.as_bytes())
            {
                let around = &hay[at.saturating_sub(40)..(at + id.len() + 40).min(hay.len())];
                found.push(format!(
                    "{} {part}: {:?}",
                    r.message.topic(),
                    String::from_utf8_lossy(around)
                ));
            }
        }
    }
    found
}

/// A short random tag for synthetic file contents.
pub fn fresh_tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

/// Positions (1-based record index) of canonical patients, with how often each occurs.
pub fn canonical_positions(records: &[Record]) -> HashMap<i64, usize> {
    let mut seen = HashMap::new();
    for r in records {
        if let Some(Payload::CanonicalPatient(p)) = r.event.as_ref().map(|e| &e.payload) {
            *seen.entry(p.provenance.source_position).or_default() += 1;
        }
    }
    seen
}

/// Asserts that positions 1..=n each occur exactly once, naming lost and duplicated ones.
pub fn assert_exactly_once(what: &str, seen: &HashMap<i64, usize>, n: usize) {
    let lost: Vec<i64> = (1..=n as i64).filter(|p| !seen.contains_key(p)).collect();
    let dup: Vec<(i64, usize)> = seen
        .iter()
        .filter(|(_, &c)| c > 1)
        .map(|(&p, &c)| (p, c))
        .collect();
    let extra: Vec<i64> = seen
        .keys()
        .filter(|&&p| p < 1 || p > n as i64)
        .copied()
        .collect();
    assert!(
        lost.is_empty() && dup.is_empty() && extra.is_empty(),
        "{what}: {} lost (first {:?}), {} duplicated (first {:?}), {} unexpected",
        lost.len(),
        &lost[..lost.len().min(5)],
        dup.len(),
        &dup[..dup.len().min(5)],
        extra.len()
    );
}

pub mod faults;

/// The batch id ingestion gives a file's content.
pub fn batch_of(contents: &[u8]) -> String {
    use sha2::Digest;
    ingestion::batch_id_for(&hex::encode(sha2::Sha256::digest(contents)))
}

/// Records lost and duplicated in `stages` (each: how often each (batch, position) was
/// seen), for batches of `1..=n` positions.
fn losses_in(
    stages: &[&HashMap<(String, i64), usize>],
    batches: &std::collections::BTreeMap<String, usize>,
) -> (usize, usize) {
    let (mut lost, mut duplicated) = (0, 0);
    for seen in stages {
        for (batch, &n) in batches {
            for p in 1..=n as i64 {
                match seen.get(&(batch.clone(), p)).copied().unwrap_or(0) {
                    0 => lost += 1,
                    1 => {}
                    c => duplicated += c - 1,
                }
            }
        }
    }
    (lost, duplicated)
}

/// A `DataIngestionStarted` of a CSV batch with no release, reprocess or expectations, as
/// `source` would send it: for tests that feed a stage events by hand.
pub fn ingestion_started(source: &str, batch: &str) -> pipeline::Event {
    pipeline::Event::new(
        source,
        batch,
        None,
        Payload::DataIngestionStarted(pipeline::events::DataIngestionStarted {
            batch_id: batch.to_string(),
            format: "csv".into(),
            file_sha256: "00".into(),
            release_of: None,
            expected_concept_maps: None,
            expected_policy: None,
            reprocess_of: None,
        }),
    )
}

/// A batch's closing events when every stage finished it exactly once, sorted.
const FINISHED_ONCE: [&str; 3] = [
    "AnonymizationFinished",
    "DataIngestionFinished",
    "EventDataCanonizationCompleted",
];

/// How often each record of each batch appears at each stage, by (batch, position), and
/// every closing event, as read back with `read_committed`.
#[derive(Debug, Default)]
pub struct Flow {
    pub ingested: HashMap<(String, i64), usize>,
    pub anonymized: HashMap<(String, i64), usize>,
    /// Canonical records by their source record: one per record in the tests' files.
    pub canonical: HashMap<(String, i64), usize>,
    /// Closing (finished or failed) events of every stage, as (event type, batch).
    pub closings: Vec<(String, String)>,
    pub ingestion_finished: Vec<pipeline::events::DataIngestionFinished>,
    pub anonymization_finished: Vec<pipeline::events::AnonymizationFinished>,
    pub canonization_completed: Vec<pipeline::events::EventDataCanonizationCompleted>,
}

impl Flow {
    pub fn of(records: &[Record]) -> Flow {
        let mut f = Flow::default();
        for r in records {
            let Some(ev) = &r.event else { continue };
            let batch = ev.header.correlation_id.clone();
            match &ev.payload {
                Payload::SourceRecordIngested(s) => {
                    *f.ingested
                        .entry((s.batch_id.clone(), s.position))
                        .or_default() += 1;
                }
                Payload::RecordAnonymized(a) => {
                    *f.anonymized
                        .entry((a.batch_id.clone(), a.position))
                        .or_default() += 1;
                }
                Payload::DataIngestionFinished(d) => {
                    f.closings.push((ev.event_type().into(), batch));
                    f.ingestion_finished.push(d.clone());
                }
                Payload::AnonymizationFinished(a) => {
                    f.closings.push((ev.event_type().into(), batch));
                    f.anonymization_finished.push(a.clone());
                }
                Payload::EventDataCanonizationCompleted(c) => {
                    f.closings.push((ev.event_type().into(), batch));
                    f.canonization_completed.push(c.clone());
                }
                Payload::DataIngestionFailed(_)
                | Payload::AnonymizationFailed(_)
                | Payload::CanonizationFailed(_) => {
                    f.closings.push((ev.event_type().into(), batch));
                }
                p => {
                    if let Some((_, _, prov)) = p.canonical() {
                        *f.canonical
                            .entry((prov.batch_id.clone(), prov.source_position))
                            .or_default() += 1;
                    }
                }
            }
        }
        f
    }

    /// Records lost and duplicated at any stage, summed over the stages.
    pub fn losses(&self, batches: &std::collections::BTreeMap<String, usize>) -> (usize, usize) {
        losses_in(
            &[&self.ingested, &self.anonymized, &self.canonical],
            batches,
        )
    }

    /// Records lost and duplicated by ingestion and anonymization only, for batches whose
    /// records map to several canonical resources each (HL7 v2 messages).
    pub fn upstream_losses(
        &self,
        batches: &std::collections::BTreeMap<String, usize>,
    ) -> (usize, usize) {
        losses_in(&[&self.ingested, &self.anonymized], batches)
    }

    /// Forgets every record and closing of these batches, so that the exactly-once checks
    /// of the other batches see nothing unexpected.
    pub fn forget(&mut self, batches: &std::collections::BTreeMap<String, usize>) {
        for seen in [
            &mut self.ingested,
            &mut self.anonymized,
            &mut self.canonical,
        ] {
            seen.retain(|(b, _), _| !batches.contains_key(b));
        }
        self.closings.retain(|(_, b)| !batches.contains_key(b));
    }

    /// The closing events of one batch, sorted.
    fn closings_of(&self, batch: &str) -> Vec<&str> {
        let mut c: Vec<&str> = self
            .closings
            .iter()
            .filter(|(_, b)| b == batch)
            .map(|(t, _)| t.as_str())
            .collect();
        c.sort_unstable();
        c
    }

    /// How many batches closed exactly once at every stage, as finished: `n/total`.
    pub fn closed_once(&self, batches: &std::collections::BTreeMap<String, usize>) -> String {
        let ok = batches
            .keys()
            .filter(|b| self.closings_of(b) == FINISHED_ONCE)
            .count();
        format!("{ok}/{}", batches.len())
    }

    /// Asserts that every record of every batch (batch id → record count) went through
    /// every stage exactly once, and that each batch closed exactly once per stage, as
    /// finished, with counts that add up. Names what was lost and what was duplicated.
    pub fn assert_exactly_once(&self, batches: &std::collections::BTreeMap<String, usize>) {
        let mut problems = Vec::new();
        for (stage, seen) in [
            ("ingested", &self.ingested),
            ("anonymized", &self.anonymized),
            ("canonical", &self.canonical),
        ] {
            let mut lost = Vec::new();
            let mut dup = Vec::new();
            for (batch, &n) in batches {
                for p in 1..=n as i64 {
                    match seen.get(&(batch.clone(), p)).copied().unwrap_or(0) {
                        1 => {}
                        0 => lost.push((batch.clone(), p)),
                        c => dup.push((batch.clone(), p, c)),
                    }
                }
            }
            let expected: usize = batches.values().sum();
            let unexpected = seen.len().saturating_sub(expected - lost.len());
            if !lost.is_empty() || !dup.is_empty() || unexpected > 0 {
                problems.push(format!(
                    "{stage}: {} lost (first {:?}), {} duplicated (first {:?}), {unexpected} unexpected",
                    lost.len(),
                    &lost[..lost.len().min(3)],
                    dup.len(),
                    &dup[..dup.len().min(3)],
                ));
            }
        }
        for batch in batches.keys() {
            let closings = self.closings_of(batch);
            if closings != FINISHED_ONCE {
                problems.push(format!("batch {batch} closed as {closings:?}"));
            }
        }
        for (batch, &n) in batches {
            let n = n as i64;
            for d in self
                .ingestion_finished
                .iter()
                .filter(|d| &d.batch_id == batch)
            {
                if d.records_emitted != n {
                    problems.push(format!(
                        "batch {batch}: ingestion says {} emitted of {n}",
                        d.records_emitted
                    ));
                }
            }
            for a in self
                .anonymization_finished
                .iter()
                .filter(|a| &a.batch_id == batch)
            {
                let done = a.records_anonymized.unwrap_or(0) + a.records_dead_lettered.unwrap_or(0);
                if a.upstream_records_emitted != n || done != n {
                    problems.push(format!(
                        "batch {batch}: anonymization closed with upstream {} and {done} done, of {n}",
                        a.upstream_records_emitted
                    ));
                }
            }
            for c in self
                .canonization_completed
                .iter()
                .filter(|c| &c.batch_id == batch)
            {
                if c.records_in != n {
                    problems.push(format!(
                        "batch {batch}: canonization closed with {} in, of {n}",
                        c.records_in
                    ));
                }
            }
        }
        assert!(
            problems.is_empty(),
            "exactly once broken:\n{}",
            problems.join("\n")
        );
    }
}

/// The value of one sample in a Prometheus text exposition: `sample` is the metric's name
/// with its labels as exposed (`medpipe_x_total{kind="gap"}`), matched whole. `# HELP` and
/// `# TYPE` lines are not samples: a substring search for "name 1" also matches a help text
/// that starts with "1 while ...".
pub fn metric_value(exposition: &str, sample: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(name, _)| *name == sample)
        .and_then(|(_, value)| value.trim().parse().ok())
}

#[cfg(test)]
mod metric_tests {
    use super::metric_value;

    #[test]
    fn a_help_text_is_not_a_sample() {
        let page = "# HELP medpipe_auditing_store_full 1 while paused.\n\
                    # TYPE medpipe_auditing_store_full gauge\n\
                    medpipe_auditing_store_full 0\n\
                    medpipe_alerts_total{kind=\"gap\"} 2\n";
        assert_eq!(metric_value(page, "medpipe_auditing_store_full"), Some(0.0));
        assert_eq!(
            metric_value(page, "medpipe_alerts_total{kind=\"gap\"}"),
            Some(2.0)
        );
        assert_eq!(metric_value(page, "medpipe_alerts_total"), None);
        assert_eq!(metric_value(page, "medpipe_auditing_store"), None);
    }
}
