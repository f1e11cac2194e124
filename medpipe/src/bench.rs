//! `medpipe bench ingest`: ingests a generated synthetic file through the real broker
//! with the real `medpipe-ingestion` binary, and reports throughput and the process's
//! peak memory. A benchmark, not a test: it asserts nothing about time.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ingestion::formats::SourceFormat;
use pipeline::config::KafkaArgs;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

/// A throwaway master key for benchmark data (synthetic, deleted afterwards).
pub(crate) const BENCH_KEY: &str =
    "4242424242424242424242424242424242424242424242424242424242424242";

pub struct IngestBench {
    pub kafka: KafkaArgs,
    pub format: SourceFormat,
    pub records: usize,
    pub work_dir: PathBuf,
    pub keep_topics: bool,
    pub timeout: Duration,
}

pub struct IngestResult {
    pub file_bytes: u64,
    pub seconds: f64,
    pub peak_rss_kib: u64,
    pub emitted: u64,
}

impl IngestResult {
    pub fn row(&self, format: SourceFormat, records: usize) -> String {
        format!(
            "| {format} | {records} | {:.1} | {:.2} | {:.0} | {:.1} | {:.1} |",
            self.file_bytes as f64 / 1e6,
            self.seconds,
            self.emitted as f64 / self.seconds,
            self.file_bytes as f64 / 1e6 / self.seconds,
            self.peak_rss_kib as f64 / 1024.0
        )
    }
}

pub const HEADER: &str = "| format | records | file MB | seconds | records/s | MB/s | peak RSS MiB |\n|---|---|---|---|---|---|---|";

pub async fn ingest(b: IngestBench) -> anyhow::Result<IngestResult> {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let mut kafka = b.kafka.clone();
    kafka.topic_prefix = format!("bench{tag}");
    pipeline::stage::prepare(&kafka, Duration::from_secs(30)).await?;
    let dir = b.work_dir.join(&kafka.topic_prefix);
    let landing = dir.join("landing");
    std::fs::create_dir_all(&landing)?;
    let ext = b.format.extension();
    let staged = dir.join(format!("bench.{ext}"));
    eprintln!(
        "Generating {} {} records in {} ...",
        b.records,
        b.format,
        staged.display()
    );
    {
        let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&staged)?);
        ingestion::synthetic::write(b.format, &mut w, b.records, &tag)?;
        w.flush()?;
    }
    let file_bytes = std::fs::metadata(&staged)?.len();
    let log = dir.join("ingestion.log");
    let mut child = spawn_ingestion(&kafka, &dir, &log)?;
    let result = measure(&kafka, &mut child, &staged, &landing, &log, b.timeout);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    if !b.keep_topics {
        delete_topics(&kafka).await;
        let _ = std::fs::remove_dir_all(&dir);
    }
    let (seconds, peak_rss_kib, emitted) = result?;
    Ok(IngestResult {
        file_bytes,
        seconds,
        peak_rss_kib,
        emitted,
    })
}

/// A stage binary (`medpipe-ingestion`, ...) in the directory of this executable, where
/// `cargo build --release --workspace --bins` puts them all.
pub(crate) fn stage_exe(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?
        .parent()
        .map(|d| d.join(name))
        .with_context(|| format!("cannot locate {name}"))?;
    if !exe.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release --workspace --bins`",
            exe.display()
        );
    }
    Ok(exe)
}

fn spawn_ingestion(kafka: &KafkaArgs, dir: &Path, log: &Path) -> anyhow::Result<Child> {
    let exe = stage_exe("medpipe-ingestion")?;
    let out = std::fs::File::create(log)?;
    Ok(Command::new(exe)
        .env("MEDPIPE_BOOTSTRAP_SERVERS", &kafka.bootstrap_servers)
        .env("MEDPIPE_SCHEMA_REGISTRY_URL", &kafka.schema_registry_url)
        .env("MEDPIPE_TOPIC_PREFIX", &kafka.topic_prefix)
        .env("MEDPIPE_MASTER_KEY", BENCH_KEY)
        .env("MEDPIPE_INGESTION_DIR", dir)
        .env("MEDPIPE_METRICS_ADDR", "127.0.0.1:0")
        .env("MEDPIPE_POLL_INTERVAL", "50ms")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?)
}

/// Waits for the stage to be up, drops the file, and waits for the ledger to say the
/// batch finished. Returns (seconds, peak RSS KiB, records emitted).
fn measure(
    kafka: &KafkaArgs,
    child: &mut Child,
    staged: &Path,
    landing: &Path,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<(f64, u64, u64)> {
    let deadline = Instant::now() + timeout;
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("Ingestion started.")
    {
        if let Some(status) = child.try_wait()? {
            bail!(
                "medpipe-ingestion exited with {status}; see {}",
                log.display()
            );
        }
        if Instant::now() > deadline {
            bail!("medpipe-ingestion did not start; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let consumer: BaseConsumer =
        pipeline::kafka::readback_config(&kafka.connection()?, "bench").create()?;
    let ledger = kafka.topics().ingestion_ledger();
    let mut tpl = TopicPartitionList::new();
    for p in 0..kafka.topic_partitions {
        tpl.add_partition_offset(&ledger, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let start = Instant::now();
    let name = staged.file_name().context("staged file has no name")?;
    std::fs::rename(staged, landing.join(name))?;
    loop {
        if Instant::now() > deadline {
            bail!(
                "the batch did not finish within {timeout:?}; see {}",
                log.display()
            );
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "medpipe-ingestion exited with {status}; see {}",
                log.display()
            );
        }
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) else {
            continue;
        };
        let entry: ingestion::ledger::Entry = match m.payload().map(serde_json::from_slice) {
            Some(Ok(e)) => e,
            _ => continue,
        };
        match entry.status {
            ingestion::ledger::Status::Finished => {
                let seconds = start.elapsed().as_secs_f64();
                return Ok((seconds, peak_rss_kib(child.id())?, entry.emitted));
            }
            ingestion::ledger::Status::Failed => bail!("the batch failed; see {}", log.display()),
            ingestion::ledger::Status::InProgress => {}
        }
    }
}

/// The process's high-water mark of resident memory (`VmHWM`), in KiB.
pub(crate) fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    proc_status_kib(pid, "VmHWM")
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM`, `VmRSS`), in KiB.
pub(crate) fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Deletes every topic `pipeline::stage::prepare` created for the prefix: the event
/// topics, the ingestion and redrive ledgers and the stages' state topics.
pub(crate) async fn delete_topics(kafka: &KafkaArgs) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let Ok(connection) = kafka.connection() else {
        return;
    };
    let admin: Result<AdminClient<rdkafka::client::DefaultClientContext>, _> =
        pipeline::kafka::admin_config(&connection).create();
    if let Ok(admin) = admin {
        let topics = kafka.topics();
        let mut names = topics.all();
        names.push(topics.ingestion_ledger());
        names.push(topics.redrive_ledger());
        names.extend(
            pipeline::topics::STATE_STAGES
                .iter()
                .map(|s| topics.state(s)),
        );
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        if let Err(e) = admin.delete_topics(&refs, &AdminOptions::new()).await {
            eprintln!("warning: could not delete the benchmark topics: {e}");
        }
    }
}

/// One de-identification benchmark case: a record in the shape ingestion produces.
struct AnonCase {
    name: &'static str,
    format: &'static str,
    record_type: String,
    bodies: Vec<pipeline::events::SourceRecordBody>,
}

fn anon_cases(n: usize) -> anyhow::Result<Vec<AnonCase>> {
    use ingestion::synthetic::{observation_resource, patient_resource, Person};
    use pipeline::events::SourceRecordBody;
    let people: Vec<Person> = (0..n).map(|i| Person::new(i, "bench")).collect();
    let patients = people
        .iter()
        .map(|p| SourceRecordBody {
            patient_link: Some(p.id.clone()),
            content: patient_resource(p),
            original: String::new(),
        })
        .collect();
    let observations = people
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut obs = observation_resource(p, i, &format!("Patient/{}", p.id));
            obs["text"] = serde_json::json!({"status": "generated", "div": format!(
                "<div xmlns=\"http://www.w3.org/1999/xhtml\">Glucose {} mg/dL on {}</div>", 70 + i % 60, p.birth_date)});
            obs["note"] = serde_json::json!([{"text": format!(
                "Fasting sample. Call back on {} or {}; MRN {}; seen 2020-03-0{}.", p.phone, p.email, p.mrn, 1 + i % 9)}]);
            SourceRecordBody {
                patient_link: Some(p.id.clone()),
                content: obs,
                original: String::new(),
            }
        })
        .collect();
    // HL7 ORU messages, parsed by ingestion's own parser into the content it emits.
    let mut hl7 = Vec::new();
    ingestion::synthetic::write(SourceFormat::Hl7v2, &mut hl7, 2 * n, "bench")?;
    let items = ingestion::formats::collect(|s| ingestion::formats::hl7::parse(&hl7[..], s))
        .map_err(|e| anyhow::anyhow!("synthetic HL7 does not parse: {e}"))?;
    let oru = items
        .into_iter()
        .filter_map(|i| match i {
            ingestion::formats::Item::Record(r) if r.record_type == "ORU^R01" => Some(r.body),
            _ => None,
        })
        .collect();
    Ok(vec![
        AnonCase {
            name: "FHIR Patient",
            format: "fhir-ndjson",
            record_type: "Patient".into(),
            bodies: patients,
        },
        AnonCase {
            name: "FHIR Observation with narrative and note",
            format: "fhir-ndjson",
            record_type: "Observation".into(),
            bodies: observations,
        },
        AnonCase {
            name: "HL7 ORU^R01 (3 OBX)",
            format: "hl7v2",
            record_type: "ORU^R01".into(),
            bodies: oru,
        },
    ])
}

/// Runs the pure de-identification engine (no Kafka, no crypto of the envelope) over
/// `n` records of each case, single-threaded, and returns (case, records/s) rows.
pub fn anonymize(n: usize, rounds: usize) -> anyhow::Result<Vec<(String, f64)>> {
    use anonymization::{Context, Engine, Keys, Policy};
    let engine = Engine::new(
        Policy::safe_harbor(),
        Keys {
            pseudonym: pipeline::crypto::KeyRef::from_hex("bench", BENCH_KEY)?,
            reidentify: None,
        },
        Context {
            tenant: "bench".into(),
            reference_date: chrono_today(),
        },
    )?;
    let known = anonymization::scrub::Known::default();
    let mut rows = Vec::new();
    for case in anon_cases(n)? {
        let mut best = 0f64;
        for _ in 0..rounds.max(1) {
            let start = Instant::now();
            for body in &case.bodies {
                let out = engine.anonymize(case.format, &case.record_type, body, &known)?;
                std::hint::black_box(out);
            }
            best = best.max(case.bodies.len() as f64 / start.elapsed().as_secs_f64());
        }
        rows.push((
            format!("{} ({} records)", case.name, case.bodies.len()),
            best,
        ));
    }
    Ok(rows)
}

fn chrono_today() -> chrono::NaiveDate {
    chrono::Utc::now().date_naive()
}

/// `medpipe bench canonize`: the canonization stage's logic alone (no Kafka): mapping,
/// concept maps, units, FHIR JSON Schema validation and building the canonical records,
/// over golden anonymized inputs of each source format, one core, best of `rounds`.
pub fn canonize(n: usize, rounds: usize) -> anyhow::Result<Vec<(String, f64, f64)>> {
    use pipeline::events::{Payload, RecordAnonymized};
    use pipeline::{Input, Outcome, Stage};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../canonization/fixtures/canonical");
    let cases = [
        ("FHIR Bundle Observation", "fhir-bundle-observation"),
        ("Synthea CSV Observation", "csv-observation"),
        (
            "HL7 ORU^R01 (DiagnosticReport + Observations)",
            "hl7-oru-r01",
        ),
    ];
    let mut stage = canonization::Canonizer::new(
        canonization::concept_map::ConceptMaps::load_embedded()?,
        canonization::mapping::Tables::load(None)?,
        1.0,
        std::time::Duration::from_secs(300),
    )?;
    let mut rows = Vec::new();
    for (name, file) in cases {
        let input: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(format!("{file}.in.json")))?)?;
        let s = |k: &str| input[k].as_str().unwrap_or_default().to_string();
        let events: Vec<pipeline::Event> = (0..n)
            .map(|i| {
                pipeline::Event::new(
                    "bench",
                    "bench-batch",
                    None,
                    Payload::RecordAnonymized(RecordAnonymized {
                        batch_id: "bench-batch".into(),
                        position: i as i64,
                        source_format: s("source_format"),
                        record_type: s("record_type"),
                        // The record's own pseudonym: an HL7 message's PID must match it.
                        patient_pseudonym: s("patient_pseudonym"),
                        policy_version: "bench".into(),
                        key_id: "bench".into(),
                        content_json: input["content"].to_string(),
                        fields_redacted: 0,
                        policy_hash: None,
                        report_json: None,
                        release_of: None,
                        expected_concept_maps: None,
                        reprocess_of: None,
                    }),
                )
            })
            .collect();
        let (mut best, mut resources) = (0f64, 0usize);
        for _ in 0..rounds.max(1) {
            let start = Instant::now();
            resources = 0;
            for ev in &events {
                let out = stage.process(&Input {
                    topic: "bench",
                    partition: 0,
                    offset: 0,
                    event: ev,
                    redriven: false,
                });
                match out {
                    Outcome::Emit(o) => {
                        resources += o
                            .iter()
                            .filter(|o| o.event.payload.canonical().is_some())
                            .count()
                    }
                    other => bail!("{name}: the golden input did not map: {other:?}"),
                }
            }
            if let Some(s) = stage.state() {
                s.rollback();
            }
            best = best.max(events.len() as f64 / start.elapsed().as_secs_f64());
        }
        let per_record = resources as f64 / events.len() as f64;
        rows.push((format!("{name} ({n} records)"), best, best * per_record));
    }
    Ok(rows)
}
