//! The batch status API over real TCP, wired as the stage wires it: entries made from
//! pipeline events by `record::entry_for`, appended to a store, replayed into the index,
//! and the router merged into the telemetry server. No Kafka.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::sync::{Arc, RwLock};

use auditing::batches::{BatchIndex, SharedIndex};
use auditing::entry::AuditEntry;
use auditing::record;
use auditing::store::Store;
use ed25519_dalek::SigningKey;
use pipeline::crypto::KeyRef;
use pipeline::events::{
    AnonymizationFailed, AnonymizationFinished, AnonymizationStarted, DataIngestionCreated,
    DataIngestionFinished, DataIngestionStarted, EventDataCanonizationCompleted,
    EventDataCanonizationStarted, Payload,
};
use pipeline::telemetry::StageMetrics;
use pipeline::Event;
use rdkafka::message::{OwnedMessage, Timestamp};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const PUBLISHED: &str = "2f0d7a4e-5b1c-5e8a-9d3f-6a7b8c9d0e1f";
const HELD: &str = "7c3e9b1a-0d2f-5a4b-8c6d-1e2f3a4b5c6d";
const RUNNING: &str = "a1b2c3d4-e5f6-5789-8abc-def012345678";
/// Sealed in the trail; must never come out of the API.
const FILE_NAME: &str = "ward-7-jane-doe.csv";
const REASON: &str = "policy rule name.given failed on record 3";

const ING: &str = "medpipe-ingestion";
const ANON: &str = "medpipe-anonymization";
const CAN: &str = "medpipe-canonization";

/// The entry the stage would record for `payload`, at `second` past an arbitrary epoch.
fn entry(offset: i64, service: &str, batch: &str, second: i64, payload: Payload) -> AuditEntry {
    let mut ev = Event::new(service, batch, None, payload);
    ev.header.occurred_at = 1_800_000_000_000_000 + second * 1_000_000;
    let msg = OwnedMessage::new(
        Some(format!("bytes of {offset}").into_bytes()),
        Some(batch.as_bytes().to_vec()),
        format!("test.{}.v1", &service["medpipe-".len()..]),
        Timestamp::NotAvailable,
        0,
        offset,
        None,
    );
    let key = KeyRef::from_hex("audit-test", &"42".repeat(32)).expect("key");
    record::entry_for(&msg, Some(&ev), &key).expect("entry")
}

fn entries() -> Vec<AuditEntry> {
    let created = |b: &str| {
        Payload::DataIngestionCreated(DataIngestionCreated {
            batch_id: b.into(),
            file_name: FILE_NAME.into(),
            file_sha256: "ab".repeat(32),
            file_size_bytes: 100,
            format: "csv".into(),
        })
    };
    let started = |b: &str| {
        Payload::DataIngestionStarted(DataIngestionStarted {
            batch_id: b.into(),
            format: "csv".into(),
            file_sha256: "ab".repeat(32),
            release_of: None,
            expected_concept_maps: None,
            expected_policy: None,
            reprocess_of: None,
        })
    };
    let finished = |b: &str| {
        Payload::DataIngestionFinished(DataIngestionFinished {
            batch_id: b.into(),
            records_emitted: 2,
            records_rejected: 0,
            file_size_bytes: 100,
            file_sha256: "ab".repeat(32),
            archive_location: format!("archive/{b}.enc"),
        })
    };
    let anon_started = |b: &str| {
        Payload::AnonymizationStarted(AnonymizationStarted {
            batch_id: b.into(),
            policy_version: "2026.12.2".into(),
            key_id: "pseudonym-1".into(),
            policy_hash: None,
        })
    };
    vec![
        // Published, the oldest.
        entry(1, ING, PUBLISHED, 10, created(PUBLISHED)),
        entry(2, ING, PUBLISHED, 11, started(PUBLISHED)),
        entry(3, ING, PUBLISHED, 12, finished(PUBLISHED)),
        entry(4, ANON, PUBLISHED, 13, anon_started(PUBLISHED)),
        entry(
            5,
            ANON,
            PUBLISHED,
            14,
            Payload::AnonymizationFinished(AnonymizationFinished {
                batch_id: PUBLISHED.into(),
                upstream_records_emitted: 2,
                policy_version: "2026.12.2".into(),
                records_anonymized: Some(2),
                records_dead_lettered: Some(0),
                policy_hash: None,
                release_of: None,
            }),
        ),
        entry(
            6,
            CAN,
            PUBLISHED,
            15,
            Payload::EventDataCanonizationStarted(EventDataCanonizationStarted {
                batch_id: PUBLISHED.into(),
            }),
        ),
        entry(
            7,
            CAN,
            PUBLISHED,
            16,
            Payload::EventDataCanonizationCompleted(EventDataCanonizationCompleted {
                batch_id: PUBLISHED.into(),
                records_in: 2,
                resources_by_type: [("Patient".to_string(), 2)].into(),
                records_dead_lettered: 0,
                records_unsupported: 0,
                codes_unmapped: 0,
                concept_map_version: "1".into(),
            }),
        ),
        // Held by anonymization.
        entry(8, ING, HELD, 20, created(HELD)),
        entry(9, ING, HELD, 21, finished(HELD)),
        entry(10, ANON, HELD, 22, anon_started(HELD)),
        entry(
            11,
            ANON,
            HELD,
            23,
            Payload::AnonymizationFailed(AnonymizationFailed {
                batch_id: HELD.into(),
                error_kind: "failure_threshold".into(),
                reason: REASON.into(),
                policy_version: "2026.12.2".into(),
                records_anonymized: 0,
                records_dead_lettered: 2,
                policy_hash: None,
            }),
        ),
        // Still in ingestion, the newest.
        entry(12, ING, RUNNING, 30, started(RUNNING)),
    ]
}

/// A store holding `entries()`, reopened and replayed into an index as the stage does.
fn replayed_index(dir: &std::path::Path) -> BatchIndex {
    let signing = SigningKey::from_bytes(&[7u8; 32]);
    let mut store = Store::open(dir, 65_536, &signing.verifying_key(), |_| {}).expect("open");
    store.append(entries(), 1).expect("append");
    drop(store);
    let mut index = BatchIndex::default();
    Store::open(dir, 65_536, &signing.verifying_key(), |e| index.observe(e)).expect("reopen");
    index
}

struct Server {
    base: String,
    client: reqwest::Client,
    shutdown: CancellationToken,
}

impl Server {
    async fn start(index: SharedIndex) -> Server {
        let shutdown = CancellationToken::new();
        let metrics = StageMetrics::new("auditing").expect("metrics");
        let addr = pipeline::telemetry::serve_with(
            "127.0.0.1:0".parse().expect("addr"),
            metrics,
            auditing::api::router(index),
            shutdown.clone(),
        )
        .await
        .expect("serve");
        Server {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            shutdown,
        }
    }

    /// Status, `X-Total-Count` if any, and the body as JSON.
    async fn get(&self, path: &str) -> (u16, Option<usize>, Value) {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        let total = r
            .headers()
            .get("x-total-count")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        assert_eq!(
            r.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "{path}"
        );
        let text = r.text().await.expect("body");
        assert!(
            !text.contains(FILE_NAME) && !text.contains(REASON) && !text.contains("sealed"),
            "{path} answered sealed details: {text}"
        );
        let body = serde_json::from_str(&text).expect("JSON body");
        (status, total, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn ids(list: &Value) -> Vec<&str> {
    list.as_array()
        .expect("a list")
        .iter()
        .map(|b| b["batch"].as_str().expect("batch id"))
        .collect()
}

#[tokio::test]
async fn batches_are_served_from_the_replayed_index() {
    let dir = tempfile::tempdir().expect("dir");
    let index = replayed_index(dir.path());
    let held_seq = 10; // the 11th entry appended, counting from 0
    let server = Server::start(Arc::new(RwLock::new(index))).await;

    let (status, _, b) = server.get(&format!("/batches/{PUBLISHED}")).await;
    assert_eq!(status, 200);
    assert_eq!(b["batch"], PUBLISHED);
    assert_eq!(b["state"], "published");
    assert_eq!(b["failed_step"], Value::Null);
    assert_eq!(b["ingestion"]["state"], "finished");
    assert_eq!(b["ingestion"]["expected"], 2);
    assert_eq!(b["anonymization"]["state"], "finished");
    assert_eq!(b["canonization"]["state"], "finished");
    assert_eq!(b["first_seen"], 1_800_000_010_000_000i64);
    assert_eq!(b["last_seen"], 1_800_000_016_000_000i64);

    let (status, _, b) = server.get(&format!("/batches/{HELD}")).await;
    assert_eq!(status, 200);
    assert_eq!(b["state"], "held");
    assert_eq!(b["failed_step"], "anonymization");
    assert_eq!(b["anonymization"]["state"], "failed");
    assert_eq!(b["anonymization"]["failed_entry"], held_seq);
    assert_eq!(b["canonization"]["state"], "not_started");
    assert!(b["anonymization"].get("reason").is_none());

    // The id in upper case is the same UUID.
    let (status, _, b) = server
        .get(&format!("/batches/{}", HELD.to_uppercase()))
        .await;
    assert_eq!((status, b["batch"].as_str()), (200, Some(HELD)));
}

#[tokio::test]
async fn unknown_and_malformed_ids_are_404_and_400() {
    let dir = tempfile::tempdir().expect("dir");
    let server = Server::start(Arc::new(RwLock::new(replayed_index(dir.path())))).await;

    let (status, _, b) = server
        .get("/batches/00000000-0000-5000-8000-000000000000")
        .await;
    assert_eq!(status, 404);
    assert!(b["error"].as_str().is_some_and(|m| m.contains("no batch")));

    for bad in [
        "not-a-batch",
        "2f0d7a4e5b1c5e8a9d3f6a7b8c9d0e1f",
        "2f0d7a4e-5b1c-5e8a-9d3f-6a7b8c9d0e1",
        "2f0d7a4e-5b1c-5e8a-9d3f-6a7b8c9d0e1fz",
        "%7B2f0d7a4e-5b1c-5e8a-9d3f-6a7b8c9d0e1f%7D",
    ] {
        let (status, _, b) = server.get(&format!("/batches/{bad}")).await;
        assert_eq!(status, 400, "{bad}");
        let message = b["error"].as_str().expect("error message");
        assert!(message.contains("hyphenated UUID"), "{bad}: {message}");
        assert!(!message.contains("not-a-batch"), "the id is echoed");
    }
}

#[tokio::test]
async fn lists_filter_by_state_newest_first_with_a_limit() {
    let dir = tempfile::tempdir().expect("dir");
    let server = Server::start(Arc::new(RwLock::new(replayed_index(dir.path())))).await;

    let (status, total, list) = server.get("/batches?state=held").await;
    assert_eq!((status, total), (200, Some(1)));
    assert_eq!(ids(&list), [HELD]);
    assert!(list
        .as_array()
        .expect("list")
        .iter()
        .all(|b| b["state"] == "held"));

    let (status, total, list) = server.get("/batches").await;
    assert_eq!((status, total), (200, Some(3)));
    assert_eq!(ids(&list), [RUNNING, HELD, PUBLISHED]);

    let (_, total, list) = server.get("/batches?state=in_progress").await;
    assert_eq!((total, ids(&list)), (Some(1), vec![RUNNING]));
    let (_, total, list) = server.get("/batches?state=withdrawn").await;
    assert_eq!((total, ids(&list).len()), (Some(0), 0));

    let (status, total, list) = server.get("/batches?limit=2").await;
    assert_eq!((status, total), (200, Some(3)));
    assert_eq!(ids(&list), [RUNNING, HELD]);

    for bad in [
        "/batches?state=stuck",
        "/batches?state=Held",
        "/batches?limit=0",
        "/batches?limit=10001",
        "/batches?status=held",
    ] {
        let (status, total, b) = server.get(bad).await;
        assert_eq!((status, total), (400, None), "{bad}");
        assert!(b["error"].is_string(), "{bad}");
    }
    let (_, _, b) = server.get("/batches?state=stuck").await;
    assert_eq!(
        b["error"],
        "Unknown state: expected one of in_progress, published, held, withdrawn, retry_requested, retried, released, rejected."
    );
}

#[tokio::test]
async fn a_loading_index_answers_503_and_the_telemetry_routes_stay() {
    let index = BatchIndex::loading();
    let server = Server::start(index.clone()).await;
    let (status, _, _) = server.get(&format!("/batches/{HELD}")).await;
    assert_eq!(status, 503);
    let (status, _, _) = server.get("/batches?state=held").await;
    assert_eq!(status, 503);

    // The stage swaps the replayed index in.
    let dir = tempfile::tempdir().expect("dir");
    *index.write().expect("lock") = replayed_index(dir.path());
    let (status, _, b) = server.get(&format!("/batches/{HELD}")).await;
    assert_eq!((status, b["state"].as_str()), (200, Some("held")));

    let health = server
        .client
        .get(format!("{}/healthz", server.base))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(health.text().await.expect("body"), "ok");
}
