//! `medpipe bench status-api`: the auditing stage's batch status API alone (no Kafka, no
//! store). Folds the entries synthetic batches leave in the trail into the stage's index,
//! serves it with the stage's router on the telemetry server over loopback TCP, and times
//! requests from one keep-alive client while a writer appends entries as the stage does.
//! A benchmark, not a test: it asserts nothing about time.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use auditing::batches::{BatchIndex, SharedIndex, State};
use auditing::entry::AuditEntry;
use pipeline::telemetry::StageMetrics;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub struct StatusApiBench {
    pub batches: usize,
    pub requests: usize,
    pub lists: usize,
    /// Entries per second a background writer folds in under the write lock, in chunks
    /// of 500 (the stage's poll batch); 0 for none.
    pub append_rate: u64,
}

const NAMESPACE: Uuid = Uuid::from_u128(0x6d65_6470_6970_6562_656e_6368_7374_6174);
const UNKNOWN: Uuid = Uuid::from_u128(0x6d65_6470_6970_6562_656e_6368_6d69_7373);
const BASE_MICROS: i64 = 1_800_000_000_000_000;

fn batch_id(i: usize) -> String {
    Uuid::new_v5(&NAMESPACE, &(i as u64).to_le_bytes()).to_string()
}

/// What happens to synthetic batch `i` of `n`: most are published, some held, withdrawn or
/// rejected, and the newest 2% are still in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Published,
    HeldInIngestion,
    HeldInAnonymization,
    Withdrawn,
    Rejected,
    InProgress,
}

fn fate(i: usize, n: usize) -> Fate {
    if i >= n - n / 50 {
        return Fate::InProgress;
    }
    match i % 100 {
        0 | 1 => Fate::Rejected,
        2..=4 => Fate::HeldInIngestion,
        5..=9 => Fate::HeldInAnonymization,
        10..=12 => Fate::Withdrawn,
        _ => Fate::Published,
    }
}

/// The entries batch `i` leaves in the trail, in order, as `record::entry_for` would
/// describe them (the fields the fold reads); `seq` is the next sequence number.
fn batch_entries(i: usize, n: usize, seq: &mut u64, out: &mut Vec<AuditEntry>) {
    let id = batch_id(i);
    let records = 1 + i % 5;
    let mut t = BASE_MICROS + i as i64 * 1_000_000;
    let mut push = |event_type: &str, service: &str, expected: Option<i64>| {
        out.push(AuditEntry {
            seq: *seq,
            recorded_at: t,
            topic: format!("medpipe.{service}.v1"),
            partition: (i % 3) as i32,
            offset: *seq as i64,
            event_type: event_type.into(),
            correlation_id: Some(id.clone()),
            source_service: Some(format!("medpipe-{service}")),
            occurred_at: Some(t),
            records_expected: expected,
            digest_sha256: "0".repeat(64),
            ..Default::default()
        });
        *seq += 1;
        t += 1_000;
    };
    let fate = fate(i, n);
    push("DataIngestionCreated", "ingestion", None);
    if fate == Fate::Rejected {
        push("DataIngestionRejected", "ingestion", None);
        return;
    }
    push("DataIngestionStarted", "ingestion", None);
    for _ in 0..records {
        push("SourceRecordIngested", "ingestion", None);
    }
    if i.is_multiple_of(10) {
        push("RecordRejected", "ingestion", None);
    }
    if fate == Fate::InProgress && i.is_multiple_of(2) {
        return;
    }
    if fate == Fate::HeldInIngestion {
        push("DataIngestionFailed", "ingestion", None);
        push("AnonymizationFailed", "anonymization", None);
        return;
    }
    push("DataIngestionFinished", "ingestion", Some(records as i64));
    push("AnonymizationStarted", "anonymization", None);
    for _ in 0..records {
        push("RecordAnonymized", "anonymization", None);
    }
    if fate == Fate::HeldInAnonymization {
        push("AnonymizationFailed", "anonymization", None);
        push("CanonizationFailed", "canonization", None);
        return;
    }
    push(
        "AnonymizationFinished",
        "anonymization",
        Some(records as i64),
    );
    if fate == Fate::InProgress {
        return;
    }
    push("EventDataCanonizationStarted", "canonization", None);
    for _ in 0..records {
        push("CanonicalObservation", "canonization", None);
    }
    if fate == Fate::Withdrawn {
        push("CanonizationFailed", "canonization", None);
        for _ in 0..records {
            push("CanonicalObservation", "canonization", None);
        }
        push("CanonicalBatchWithdrawn", "canonization", None);
        return;
    }
    push(
        "EventDataCanonizationCompleted",
        "canonization",
        Some(records as i64),
    );
}

/// The process's resident memory (`VmRSS`), in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Hit,
    Miss,
    Malformed,
    ListHeld,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Hit => "GET /batches/{id}, known (200)",
            Kind::Miss => "GET /batches/{id}, unknown (404)",
            Kind::Malformed => "GET /batches/{id}, malformed (400)",
            Kind::ListHeld => "GET /batches?state=held (200, default limit 1000)",
        }
    }

    fn status(self) -> u16 {
        match self {
            Kind::Hit | Kind::ListHeld => 200,
            Kind::Miss => 404,
            Kind::Malformed => 400,
        }
    }
}

/// Folds entries of new batches in at `rate` entries/s, 500 under each write lock, until
/// `stop`; returns how many it folded.
fn writer(index: SharedIndex, first: usize, rate: u64, stop: Arc<AtomicBool>) -> u64 {
    const CHUNK: usize = 500;
    let every = Duration::from_secs_f64(CHUNK as f64 / rate as f64);
    let (mut seq, mut next, mut folded) = (u64::MAX / 2, first, 0u64);
    let mut pending = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        while pending.len() < CHUNK {
            batch_entries(next, usize::MAX, &mut seq, &mut pending);
            next += 1;
        }
        let chunk: Vec<AuditEntry> = pending.drain(..CHUNK).collect();
        {
            let mut ix = index
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for e in &chunk {
                ix.observe(e);
            }
        }
        folded += CHUNK as u64;
        std::thread::sleep(every.saturating_sub(started.elapsed()));
    }
    folded
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub async fn run(b: &StatusApiBench, out: &mut impl Write) -> anyhow::Result<()> {
    if b.batches < 100 {
        bail!("--batches must be at least 100");
    }
    let rss_before = rss_kib();
    let started = Instant::now();
    let mut index = BatchIndex::default();
    let (mut seq, mut entries, mut buf) = (0u64, 0usize, Vec::new());
    for i in 0..b.batches {
        buf.clear();
        batch_entries(i, b.batches, &mut seq, &mut buf);
        entries += buf.len();
        for e in &buf {
            index.observe(e);
        }
    }
    let build = started.elapsed().as_secs_f64();
    let rss_grown = rss_kib().saturating_sub(rss_before);
    let counts: Vec<String> = State::all()
        .iter()
        .map(|&s| format!("{} {}", s.as_str(), index.count(Some(s))))
        .collect();
    writeln!(
        out,
        "index: {} batches ({}) from {entries} entries in {build:.2} s ({:.0} entries/s), resident memory +{:.0} MiB",
        index.count(None),
        counts.join(", "),
        entries as f64 / build,
        rss_grown as f64 / 1024.0
    )?;
    let held = index.count(Some(State::Held));

    let shared: SharedIndex = Arc::new(RwLock::new(index));
    let shutdown = CancellationToken::new();
    let addr = pipeline::telemetry::serve_with(
        "127.0.0.1:0".parse()?,
        StageMetrics::new("auditing")?,
        auditing::api::router(shared.clone()),
        shutdown.clone(),
    )
    .await?;
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();

    // The plan: mostly known ids, a tenth unknown, a hundredth malformed, and the lists
    // spread evenly through them.
    // A fixed seed: every run asks for the same targets.
    let mut rng = fastrand::Rng::with_seed(0x9E37_79B9_7F4A_7C15);
    let mut plan = Vec::with_capacity(b.requests + b.lists);
    let every = (b.requests / b.lists.max(1)).max(1);
    let mut lists = 0;
    for r in 0..b.requests {
        if lists < b.lists && r % every == 0 {
            plan.push((Kind::ListHeld, "/batches?state=held".to_string()));
            lists += 1;
        }
        let roll = rng.u32(0..100);
        let (kind, path) = if roll == 0 {
            (Kind::Malformed, format!("/batches/batch-{r}"))
        } else if roll <= 10 {
            let unknown = Uuid::new_v5(&UNKNOWN, &(r as u64).to_le_bytes());
            (Kind::Miss, format!("/batches/{unknown}"))
        } else {
            let i = rng.usize(0..b.batches.max(1));
            (Kind::Hit, format!("/batches/{}", batch_id(i)))
        };
        plan.push((kind, path));
    }

    // Warm the connection and the allocator, untimed.
    for (_, path) in plan.iter().take(1000) {
        client
            .get(format!("{base}{path}"))
            .send()
            .await?
            .bytes()
            .await?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let appender = (b.append_rate > 0).then(|| {
        let (ix, stop, first, rate) = (shared.clone(), stop.clone(), b.batches, b.append_rate);
        std::thread::spawn(move || writer(ix, first, rate, stop))
    });
    let kinds = [Kind::Hit, Kind::Miss, Kind::Malformed, Kind::ListHeld];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); kinds.len()];
    let (mut list_len, mut list_bytes) = (0usize, 0usize);
    let run_started = Instant::now();
    for (kind, path) in &plan {
        let t = Instant::now();
        let r = client.get(format!("{base}{path}")).send().await?;
        let status = r.status().as_u16();
        let body = r.bytes().await?;
        let took = t.elapsed();
        if status != kind.status() {
            bail!("{} answered {status}", kind.label());
        }
        if *kind == Kind::Hit {
            let b: serde_json::Value = serde_json::from_slice(&body).context("a batch is JSON")?;
            if !b["batch"].as_str().is_some_and(|id| path.ends_with(id)) {
                bail!("a known id answered another batch");
            }
        }
        if *kind == Kind::ListHeld {
            list_bytes = body.len();
            list_len = serde_json::from_slice::<Vec<serde_json::Value>>(&body)
                .context("a list is a JSON array")?
                .len();
        }
        let slot = kinds.iter().position(|k| k == kind).unwrap_or_default();
        times[slot].push(took);
    }
    let wall = run_started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let appended = match appender {
        Some(h) => h
            .join()
            .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?,
        None => 0,
    };
    shutdown.cancel();

    writeln!(
        out,
        "{} requests in {wall:.2} s from one keep-alive client ({:.0} requests/s); {appended} entries folded in meanwhile ({} per second, 500 per write lock); {held} held batches at the start, the last list returned {list_len} ({list_bytes} bytes)",
        plan.len(),
        plan.len() as f64 / wall,
        b.append_rate
    )?;
    writeln!(
        out,
        "| request | count | p50 ms | p99 ms | max ms | requests/s |\n|---|---:|---:|---:|---:|---:|"
    )?;
    for (kind, mut t) in kinds.into_iter().zip(times) {
        if t.is_empty() {
            continue;
        }
        t.sort_unstable();
        let busy: f64 = t.iter().map(Duration::as_secs_f64).sum();
        writeln!(
            out,
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.0} |",
            kind.label(),
            t.len(),
            ms(percentile(&t, 50)),
            ms(percentile(&t, 99)),
            ms(t[t.len() - 1]),
            t.len() as f64 / busy
        )?;
    }
    Ok(())
}
