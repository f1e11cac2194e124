//! Logging setup, the per-stage Prometheus metrics, and the /metrics, /healthz and
//! /readyz endpoints every binary serves.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

use crate::config::LogFormat;
use crate::error::PipelineError;

/// Installs the global tracing subscriber. `RUST_LOG` overrides the default `info`.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless, so the error is ignored.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    std::panic::set_hook(Box::new(log_panic));
}

/// The panic hook of every binary. The default hook prints the panic's message, and a
/// formatted message can quote a record (a slice out of a clinical note, say): here the
/// message is logged only when it is a fixed string, with where the panic happened.
fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    let location = info
        .location()
        .map(|l| format!("{}:{}", l.file(), l.line()))
        .unwrap_or_default();
    let message = panic_message(info.payload());
    let thread = std::thread::current();
    tracing::error!(
        location,
        thread = thread.name().unwrap_or("unnamed"),
        message,
        "A panic: a defect in medpipe."
    );
}

/// A panic's message if it is a fixed string; a formatted one is withheld.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &'static str {
    payload
        .downcast_ref::<&'static str>()
        .copied()
        .unwrap_or("(withheld: a formatted panic message may quote record contents)")
}

/// The metrics every stage exports, named `medpipe_<stage>_<noun>_<unit>`.
#[derive(Clone)]
pub struct StageMetrics {
    pub registry: Registry,
    pub events_in: IntCounterVec,
    pub events_out: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub transactions_committed: IntCounter,
    pub transactions_aborted: IntCounter,
    /// 1 while the stage is inside a commit (serving delivery reports, sending offsets,
    /// `commit_transaction`): a stage stuck at 1 waits on its broker.
    pub commit_in_flight: IntGauge,
    /// Times the transactional producer was replaced to make a transaction's outcome
    /// definite or to recover from failed deliveries.
    pub producers_replaced: IntCounter,
    /// Blocking Kafka calls given up on because they did not return in time (their
    /// thread and client are left behind).
    pub calls_abandoned: IntCounter,
    pub processing_seconds: Histogram,
    /// Times input was re-read from the committed offsets (and state reloaded), by
    /// reason: `rebalance` or `failed_batch`.
    pub rewinds: IntCounterVec,
    pub consumer_lag: IntGaugeVec,
    /// Set once the stage is connected and consuming; drives /readyz.
    pub ready: Arc<AtomicBool>,
}

impl StageMetrics {
    pub fn new(stage: &str) -> Result<Self, PipelineError> {
        let registry = Registry::new();
        let name = |noun: &str| format!("medpipe_{stage}_{noun}");
        let m = PipelineError::Metrics;
        let events_in = IntCounterVec::new(
            Opts::new(
                name("events_in_total"),
                "Input messages consumed, by event type.",
            ),
            &["event_type"],
        )
        .map_err(m)?;
        let events_out = IntCounterVec::new(
            Opts::new(
                name("events_out_total"),
                "Events produced in committed transactions, by event type.",
            ),
            &["event_type"],
        )
        .map_err(m)?;
        let dead_letters = IntCounterVec::new(
            Opts::new(
                name("dead_letters_total"),
                "Input messages sent to the dead-letter topic, by error type.",
            ),
            &["error_type"],
        )
        .map_err(m)?;
        let transactions_committed = IntCounter::new(
            name("transactions_committed_total"),
            "Kafka transactions committed.",
        )
        .map_err(m)?;
        let transactions_aborted = IntCounter::new(
            name("transactions_aborted_total"),
            "Kafka transactions aborted.",
        )
        .map_err(m)?;
        let commit_in_flight = IntGauge::new(
            name("commit_in_flight"),
            "1 while a transaction commit is in progress.",
        )
        .map_err(m)?;
        let producers_replaced = IntCounter::new(
            name("producers_replaced_total"),
            "Times the transactional producer was replaced (unknown commit outcome, failed deliveries, a transaction aborted by its coordinator).",
        )
        .map_err(m)?;
        let calls_abandoned = IntCounter::new(
            name("kafka_calls_abandoned_total"),
            "Blocking Kafka client calls given up on because they did not return in time (each leaves a thread and a client behind).",
        )
        .map_err(m)?;
        let processing_seconds = Histogram::with_opts(HistogramOpts::new(
            name("batch_processing_seconds"),
            "Time from the first message of a batch to its committed transaction.",
        ))
        .map_err(m)?;
        let rewinds = IntCounterVec::new(
            Opts::new(
                name("rewinds_total"),
                "Times uncommitted input was dropped and re-read from the committed offsets, by reason.",
            ),
            &["reason"],
        )
        .map_err(m)?;
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                name("consumer_lag_messages"),
                "High watermark minus position, per input partition.",
            ),
            &["topic", "partition"],
        )
        .map_err(m)?;
        for c in [&events_in, &events_out, &dead_letters] {
            registry.register(Box::new(c.clone())).map_err(m)?;
        }
        registry
            .register(Box::new(transactions_committed.clone()))
            .map_err(m)?;
        registry
            .register(Box::new(transactions_aborted.clone()))
            .map_err(m)?;
        registry
            .register(Box::new(commit_in_flight.clone()))
            .map_err(m)?;
        registry
            .register(Box::new(producers_replaced.clone()))
            .map_err(m)?;
        registry
            .register(Box::new(calls_abandoned.clone()))
            .map_err(m)?;
        registry
            .register(Box::new(processing_seconds.clone()))
            .map_err(m)?;
        registry
            .register(Box::new(consumer_lag.clone()))
            .map_err(m)?;
        registry.register(Box::new(rewinds.clone())).map_err(m)?;
        Ok(StageMetrics {
            registry,
            events_in,
            events_out,
            dead_letters,
            transactions_committed,
            transactions_aborted,
            commit_in_flight,
            producers_replaced,
            calls_abandoned,
            processing_seconds,
            rewinds,
            consumer_lag,
            ready: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

async fn metrics(State(m): State<StageMetrics>) -> (StatusCode, String) {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&m.registry.gather(), &mut buf) {
        Ok(()) => (StatusCode::OK, String::from_utf8_lossy(&buf).into_owned()),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn readyz(State(m): State<StageMetrics>) -> StatusCode {
    if m.ready.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Serves the endpoints until `shutdown` is cancelled. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics_state: StageMetrics,
    shutdown: CancellationToken,
) -> Result<SocketAddr, PipelineError> {
    serve_with(addr, metrics_state, Router::new(), shutdown).await
}

/// [`serve`], with a stage's own routes beside the common ones on the same address (the
/// auditing stage's batch status API), so a stage adds an endpoint without a second port.
pub async fn serve_with(
    addr: SocketAddr,
    metrics_state: StageMetrics,
    routes: Router,
    shutdown: CancellationToken,
) -> Result<SocketAddr, PipelineError> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(metrics_state)
        .merge(routes);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| PipelineError::io(format!("metrics address {addr}"), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| PipelineError::io("metrics listener", e))?;
    tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "Metrics server stopped.");
        }
    });
    tracing::info!(%bound, "Serving /metrics, /healthz, /readyz and the stage's routes.");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::panic_message;

    #[test]
    fn only_a_fixed_panic_message_is_logged() {
        let fixed: Box<dyn std::any::Any + Send> = Box::new("the store is poisoned");
        assert_eq!(panic_message(fixed.as_ref()), "the store is poisoned");
        let formatted: Box<dyn std::any::Any + Send> = Box::new(format!("cut {}", "Jane Doe"));
        assert!(!panic_message(formatted.as_ref()).contains("Jane"));
    }
}
