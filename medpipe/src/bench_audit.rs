//! `medpipe bench audit`: the audit store alone (no Kafka). Builds entries the way the
//! stage does (SHA-256 digest of the message, AES-256-GCM sealing of details), chains and
//! appends them with an fsync per batch and a signed checkpoint every 1,000 entries, then
//! times `verify`, indexed trace lookups and the activity report over the whole store.
//! A benchmark, not a test: it asserts nothing about time.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use auditing::store::{Key, Store};
use auditing::{keys, query, record, store};
use ed25519_dalek::SigningKey;
use pipeline::crypto::KeyRef;
use pipeline::events::{Payload, RecordRejected};
use pipeline::Event;
use rdkafka::message::{OwnedMessage, Timestamp};

pub struct AuditBench {
    pub entries: u64,
    pub batch: usize,
    pub work_dir: PathBuf,
}

fn message(i: u64, payload: &[u8]) -> OwnedMessage {
    OwnedMessage::new(
        Some(payload.to_vec()),
        None,
        "bench.ingestion.v1".into(),
        Timestamp::NotAvailable,
        (i % 3) as i32,
        (i / 3) as i64,
        None,
    )
}

pub fn run(b: &AuditBench, out: &mut impl Write) -> anyhow::Result<()> {
    let dir = b.work_dir.join(format!(
        "audit-bench-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir)?;
    let seal = KeyRef::from_hex("audit-bench", &"42".repeat(32))?;
    let signing = SigningKey::from_bytes(&[42u8; 32]);
    let key_id = keys::key_id(&signing.verifying_key());
    let mut s = Store::open(&dir, 65_536, &signing.verifying_key(), |_| {})?;
    // A message value of a typical size (600 bytes), and an event whose details are
    // sealed, so every entry pays for the digest, the sealing and the chaining.
    let payload = vec![b'x'; 600];
    let batches = 1000u64;
    let started = Instant::now();
    let mut i = 0u64;
    let mut last_event = String::new();
    while i < b.entries {
        let mut entries = Vec::with_capacity(b.batch);
        for _ in 0..b.batch.min((b.entries - i) as usize) {
            let batch_id = format!("batch-{}", i % batches);
            let ev = Event::new(
                "medpipe-ingestion",
                &batch_id,
                None,
                Payload::RecordRejected(RecordRejected {
                    batch_id: batch_id.clone(),
                    file_name: format!("file-{}.csv", i % batches),
                    position: (i / batches) as i64,
                    error_kind: "field_count".into(),
                    reason: "line 3: expected 25 fields, found 3".into(),
                }),
            );
            last_event.clone_from(&ev.header.event_id);
            entries.push(record::entry_for(&message(i, &payload), Some(&ev), &seal)?);
            i += 1;
        }
        s.append(entries, chrono::Utc::now().timestamp_micros())?;
        if s.unsigned() >= 1000 {
            s.checkpoint(&signing, &key_id, chrono::Utc::now().timestamp_micros())?;
        }
    }
    s.checkpoint(&signing, &key_id, chrono::Utc::now().timestamp_micros())?;
    let append = started.elapsed().as_secs_f64();
    drop(s);
    let bytes: u64 = store::segments(&dir)?
        .iter()
        .filter_map(|(_, p)| std::fs::metadata(p).ok().map(|m| m.len()))
        .sum();

    let t = Instant::now();
    let v = store::verify(&dir, &signing.verifying_key(), &[])?;
    let verify = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let by_batch = query::trace(&dir, "batch-7")?;
    let trace_batch = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let by_event = store::lookup(&dir, Key::Event, &last_event)?;
    let lookup_event = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let rows = query::report(&dir, 0, i64::MAX)?;
    let report = t.elapsed().as_secs_f64();

    writeln!(
        out,
        "entries: {} in {} segments, {:.1} MB",
        v.entries,
        store::segments(&dir)?.len(),
        bytes as f64 / 1e6
    )?;
    writeln!(
        out,
        "append (digest + seal + chain + fsync per {} + checkpoint per 1000): {:.2} s, {:.0} entries/s",
        b.batch,
        append,
        b.entries as f64 / append
    )?;
    writeln!(
        out,
        "verify (chain + Merkle + {} signed checkpoints): {:.2} s, {:.0} entries/s",
        v.checkpoints,
        verify,
        v.entries as f64 / verify
    )?;
    writeln!(
        out,
        "trace of one batch ({} entries): {:.3} s",
        by_batch.len(),
        trace_batch
    )?;
    writeln!(
        out,
        "lookup of one event id ({} entry): {:.3} s",
        by_event.len(),
        lookup_event
    )?;
    writeln!(
        out,
        "report over every entry ({} rows): {:.2} s",
        rows.len(),
        report
    )?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
