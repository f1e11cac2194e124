//! HTTP Basic authentication to the Schema Registry, against the dev stack's real registry
//! behind an authenticating reverse proxy that each test starts: with the right
//! credentials the codec registers, encodes and decodes through it; with a wrong password,
//! or none, start-up stops at once with a fatal error naming the user and the HTTP status,
//! never the password; a registry that does not answer stays a retriable failure. Needs
//! only the registry (`scripts/devstack.sh start`), not the broker: the Kafka address
//! given is one nothing listens on.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use clap::Parser;
use pipeline::config::KafkaArgs;
use pipeline::{ErrorClass, Event, PipelineError};

const USER: &str = "medpipe-ingestion";
const PASSWORD: &str = "Pw-7Qk2-registry-secret";
const WRONG_PASSWORD: &str = "Wrong-9Zx4-registry-secret";
/// What a stage must say when the registry refuses [`USER`].
const REFUSED: &str =
    "the Schema Registry refused the credentials of user medpipe-ingestion (HTTP 401)";
/// Nothing listens there: should a test ever get past the registry, it cannot reach the
/// dev stack's broker.
const NO_BROKER: &str = "127.0.0.1:1";

/// A reverse proxy to the dev stack's registry that wants `Authorization: Basic` with
/// [`USER`] and [`PASSWORD`], as Confluent Schema Registry, Karapace or Apicurio would.
struct Proxy {
    url: String,
    expected: String,
    upstream: reqwest::Client,
    /// The `Authorization` header of every request received, in order.
    seen: Mutex<Vec<Option<String>>>,
}

impl Proxy {
    async fn start() -> Arc<Proxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let credentials = format!("{USER}:{PASSWORD}");
        let proxy = Arc::new(Proxy {
            url: format!("http://{}", listener.local_addr().unwrap()),
            expected: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(credentials)
            ),
            // Longer than the codec's own 10 s, so that a stopped registry shows as the
            // codec's (retriable) timeout.
            upstream: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            seen: Mutex::default(),
        });
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(proxy.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        proxy
    }

    fn seen(&self) -> Vec<Option<String>> {
        self.seen.lock().unwrap().clone()
    }
}

async fn forward(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    proxy.seen.lock().unwrap().push(authorization.clone());
    if authorization.as_deref() != Some(proxy.expected.as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            [
                (header::WWW_AUTHENTICATE, "Basic realm=\"schema-registry\""),
                (header::CONTENT_TYPE, "application/json"),
            ],
            r#"{"error_code":401,"message":"Unauthorized"}"#,
        )
            .into_response();
    }
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 16 << 20).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &parts.headers {
        if ![
            header::HOST,
            header::AUTHORIZATION,
            header::CONTENT_LENGTH,
            header::CONNECTION,
            header::TRANSFER_ENCODING,
        ]
        .contains(name)
        {
            headers.insert(name, value.clone());
        }
    }
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let answer = async {
        let r = proxy
            .upstream
            .request(parts.method, format!("{}{path}", tests::REGISTRY))
            .headers(headers)
            .body(body)
            .send()
            .await?;
        let status = r.status();
        let content_type = r.headers().get(header::CONTENT_TYPE).cloned();
        Ok::<_, reqwest::Error>((status, content_type, r.bytes().await?))
    };
    match answer.await {
        Ok((status, content_type, bytes)) => {
            let mut response = Response::builder().status(status);
            if let Some(ct) = content_type {
                response = response.header(header::CONTENT_TYPE, ct);
            }
            response.body(Body::from(bytes)).unwrap()
        }
        // The registry is stopped or gone: what a gateway answers (the codec retries it).
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,
}

/// The stages' own flags, parsed as a stage parses them.
fn kafka_args(registry: &str, credentials: Option<(&str, &Path)>) -> KafkaArgs {
    let mut args = vec![
        "medpipe-test".to_string(),
        "--bootstrap-servers".into(),
        NO_BROKER.into(),
        "--schema-registry-url".into(),
        registry.into(),
        "--topic-prefix".into(),
        format!("t{}", tests::fresh_tag()),
    ];
    if let Some((user, file)) = credentials {
        args.extend([
            "--schema-registry-username".into(),
            user.into(),
            "--schema-registry-password-file".into(),
            file.display().to_string(),
        ]);
    }
    Cli::try_parse_from(args).unwrap().kafka
}

/// A password file as a secret mount gives it, with a trailing newline.
fn password_file(dir: &tempfile::TempDir, password: &str) -> PathBuf {
    let path = dir.path().join("registry-password");
    std::fs::write(&path, format!("{password}\n")).unwrap();
    path
}

fn started_event() -> Event {
    let batch = format!("registry-auth-{}", tests::fresh_tag());
    tests::ingestion_started("medpipe-ingestion", &batch)
}

/// Checks a refusal: fatal, saying `what` (who was refused, with the status), and no
/// password anywhere.
fn assert_refused(e: &PipelineError, what: &str) {
    assert!(
        matches!(e, PipelineError::SchemaRegistryAuth { status: 401, .. }),
        "expected a refused credential, got {e:?}"
    );
    assert_eq!(e.class(), ErrorClass::Fatal, "{e}");
    let text = e.to_string();
    eprintln!("As a stage would say it: {text}");
    assert!(text.contains(what), "{text}");
    for shown in [text, format!("{e:?}")] {
        assert!(
            !shown.contains(PASSWORD) && !shown.contains(WRONG_PASSWORD),
            "a password leaked: {shown}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_credentials_register_encode_and_decode_through_the_authenticating_proxy() {
    let proxy = Proxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kafka = kafka_args(&proxy.url, Some((USER, &password_file(&dir, PASSWORD))));
    let codec = kafka.codec(&kafka.topics()).unwrap();
    let event = started_event();
    // The registry can be stopped for up to 15 s at a time (a game day shares the dev
    // stack): a retriable failure is tried again, anything else fails the test at once.
    let deadline = Instant::now() + Duration::from_secs(60);
    let decoded = loop {
        let round_trip = async {
            let bytes = codec.encode(&event).await?;
            codec.decode(&bytes).await
        };
        match round_trip.await {
            Ok(decoded) => break decoded,
            Err(e) if e.class() == ErrorClass::Retry && Instant::now() < deadline => {
                eprintln!("The registry did not answer ({e}); trying again.");
                codec.clear_cached_errors();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("with the right credentials, through the proxy: {e}"),
        }
    };
    assert_eq!(decoded, event);
    let seen = proxy.seen();
    // At least the schema's registration and the decoder's look-up of its id.
    assert!(seen.len() >= 2, "the proxy saw {} requests", seen.len());
    assert!(
        seen.iter()
            .all(|a| a.as_deref() == Some(proxy.expected.as_str())),
        "a request reached the proxy without the right Basic credentials: {:?}",
        seen.iter().map(|a| a.is_some()).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_stops_start_up_at_once_naming_the_user_and_the_status() {
    let proxy = Proxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kafka = kafka_args(
        &proxy.url,
        Some((USER, &password_file(&dir, WRONG_PASSWORD))),
    );
    let t0 = Instant::now();
    // The stages' own start-up, with a minute to wait for a registry that is not ready.
    let e = pipeline::stage::prepare(&kafka, Duration::from_secs(60))
        .await
        .expect_err("a wrong password must stop start-up");
    assert_refused(&e, REFUSED);
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "start-up went on trying a refused credential for {:?}",
        t0.elapsed()
    );
    // One request: refused, not asked again.
    assert_eq!(proxy.seen().len(), 1, "{:?}", proxy.seen().len());

    // Past start-up, a refusal is the stage's problem, never the message's: fatal, not a
    // dead letter (a framed message naming schema id 1) and not an encoding error.
    let codec = kafka.codec(&kafka.topics()).unwrap();
    let e = codec.decode(&[0, 0, 0, 0, 1, 2]).await.unwrap_err();
    assert_refused(&e, REFUSED);
    let e = codec.encode(&started_event()).await.unwrap_err();
    assert_refused(&e, REFUSED);
    assert!(proxy.seen().iter().all(Option::is_some));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credentials_stop_start_up_at_once_saying_none_were_given() {
    let proxy = Proxy::start().await;
    let kafka = kafka_args(&proxy.url, None);
    let t0 = Instant::now();
    let e = pipeline::stage::prepare(&kafka, Duration::from_secs(60))
        .await
        .expect_err("a registry that wants credentials must stop start-up without them");
    assert_refused(
        &e,
        "the Schema Registry wants credentials (HTTP 401) while trying to register",
    );
    assert!(e.to_string().contains("none are configured"), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "start-up went on asking without credentials for {:?}",
        t0.elapsed()
    );
    assert_eq!(proxy.seen(), vec![None]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_does_not_answer_is_retried_not_taken_for_a_refusal() {
    // Accepts connections and never answers, as a stopped (SIGSTOP) registry does.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let kafka = kafka_args(&url, Some((USER, &password_file(&dir, PASSWORD))));
    let codec = kafka.codec(&kafka.topics()).unwrap();
    let e = codec.register_all().await.unwrap_err();
    assert!(
        matches!(
            e,
            PipelineError::SchemaRegistry {
                retriable: true,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.class(), ErrorClass::Retry, "{e}");
    assert!(!e.to_string().contains(PASSWORD), "{e}");
    held.abort();
}
