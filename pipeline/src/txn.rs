//! The one way medpipe commits to Kafka transactionally: the runner's batches,
//! ingestion's chunks and auditing's publication all go through [`Transactions`], so they
//! share one commit, abort and unknown-outcome policy.
//!
//! The policy:
//! - a commit that fails with a retriable error (a timeout, the coordinator moving) is
//!   retried, since librdkafka resumes the same commit;
//! - if it still has not completed, its outcome is unknown: the transaction may or may not
//!   be committed. [`Transactions::recover`] then replaces the producer. The new
//!   producer's `init_transactions` fences the old one and waits for the coordinator to
//!   finish or abort the old transaction, so afterwards the committed state is definite;
//! - a commit refused because messages of the transaction failed delivery (an abortable
//!   error) also replaces the producer in `recover`: the old one, aborted and reused,
//!   was seen to fail every later transaction the same way;
//! - any other failure of an open transaction is aborted by `recover`;
//! - a fatal error (the producer was fenced by a newer instance with the same
//!   transactional id, or librdkafka gave up on it) is returned as fatal: the process
//!   exits and its restart starts clean.
//!
//! After `recover`, the caller must bring its input position and its own state back to
//! what is committed (the "rewind rule" in ARCHITECTURE.md): the runner rewinds its
//! consumer and reloads its state topic, ingestion re-reads its ledger, auditing re-reads
//! its published position. Only then does it process anything again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::TopicPartitionList;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::error::{kafka_err, ErrorClass, PipelineError};
use crate::kafka::{retry_until, send_record};
use crate::telemetry::StageMetrics;

/// How many times a commit is tried before its outcome counts as unknown.
const COMMIT_ATTEMPTS: u32 = 3;

/// How long past its own timeout `send_offsets_to_transaction` may take before it counts
/// as stuck.
const SEND_OFFSETS_GRACE: Duration = Duration::from_secs(10);

/// Who commits, and how long a transaction and each blocking call may take.
#[derive(Debug, Clone)]
pub struct TxnSettings {
    pub kafka: crate::kafka::Connection,
    /// Stable per replica: a restarted replica fences its previous incarnation.
    pub transactional_id: String,
    pub transaction_timeout: Duration,
}

impl TxnSettings {
    pub fn new(
        kafka: &crate::kafka::Connection,
        transactional_id: &str,
        transaction_timeout: Duration,
    ) -> Self {
        TxnSettings {
            kafka: kafka.clone(),
            transactional_id: transactional_id.to_owned(),
            transaction_timeout,
        }
    }
}

/// A transactional producer with medpipe's commit policy. Blocking: use it from a
/// blocking thread.
pub struct Transactions {
    settings: TxnSettings,
    /// Shared only with a `send_offsets_to_transaction` call that did not return (see
    /// [`Transactions::send_offsets`]).
    producer: Arc<BaseProducer>,
    metrics: StageMetrics,
    /// When the open transaction began.
    open: Option<Instant>,
    /// The producer's last transaction has an unknown outcome, or could not be aborted:
    /// `recover` must replace the producer.
    replace: bool,
}

impl Transactions {
    /// Creates the producer and runs `init_transactions`, which fences a previous
    /// incarnation and completes or aborts its open transaction. State read after this
    /// returns is what is committed downstream.
    pub fn connect(
        settings: TxnSettings,
        metrics: StageMetrics,
        shutdown: &CancellationToken,
    ) -> Result<Self, PipelineError> {
        let producer = Arc::new(init(&settings, shutdown)?);
        Ok(Transactions {
            settings,
            producer,
            metrics,
            open: None,
            replace: false,
        })
    }

    /// The producer, for sends inside the open transaction.
    pub fn producer(&self) -> &BaseProducer {
        &self.producer
    }

    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Begins a transaction unless one is open.
    pub fn begin(&mut self) -> Result<(), PipelineError> {
        if self.open.is_none() {
            if let Err(e) = self.producer.begin_transaction() {
                let err = PipelineError::kafka("begin transaction", e);
                return Err(self.explain(err));
            }
            self.open = Some(Instant::now());
        }
        Ok(())
    }

    /// A fatal error as librdkafka explains it, rather than the bare "Fatal" a produce
    /// call returns; and a fence that the transaction's own age explains.
    ///
    /// librdkafka reports "fenced by a newer instance" in two cases: another live
    /// instance with the same transactional id called `init_transactions`, or the
    /// coordinator aborted this transaction because it stayed open past
    /// `transaction.timeout.ms` (a broker that was down or frozen for that long), which
    /// bumps the producer epoch. The coordinator can only do the second to a transaction
    /// at least that old, so a fence of such a transaction is handled like an unknown
    /// outcome: `recover` replaces the producer and the work is redone. A younger
    /// transaction can only have been fenced by a live twin, and that stays fatal.
    fn explain(&mut self, e: PipelineError) -> PipelineError {
        if e.class() != ErrorClass::Fatal {
            return e;
        }
        let Some((code, reason)) = self.producer.client().fatal_error() else {
            return e;
        };
        let timed_out = self
            .open
            .is_some_and(|t| t.elapsed() >= self.settings.transaction_timeout);
        // INVALID_TXN_STATE too: seen once in a game day, when the abort of a transaction
        // stuck past its timeout behind a broker restart reached a coordinator that had
        // already aborted it on its own.
        if timed_out
            && matches!(
                code,
                RDKafkaErrorCode::Fenced
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::InvalidTransactionalState
            )
        {
            warn!(%reason, "The coordinator aborted a transaction open past its timeout; the producer will be replaced.");
            self.replace = true;
            return PipelineError::TransactionTimedOut { reason };
        }
        PipelineError::ProducerFatal {
            code: format!("{code:?}"),
            reason,
        }
    }

    /// Sends one record inside the open transaction (beginning one if needed).
    pub fn send<K, P>(&mut self, record: BaseRecord<'_, K, P>) -> Result<(), PipelineError>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        self.begin()?;
        match send_record(&self.producer, record) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.explain(e)),
        }
    }

    /// Adds the consumed offsets (if any) and commits. On an error the transaction is
    /// still open or in doubt: call [`Transactions::recover`], then rewind.
    pub fn commit(
        &mut self,
        offsets: Option<(TopicPartitionList, ConsumerGroupMetadata)>,
    ) -> Result<(), PipelineError> {
        let Some(started) = self.open else {
            return Ok(());
        };
        let _in_flight = InFlight::enter(&self.metrics.commit_in_flight);
        let timeout = self.settings.transaction_timeout;
        if let Some((tpl, group)) = offsets {
            self.send_offsets(tpl, group)?;
        }
        // Whatever is still in flight after `timeout` is left to the commit's own flush.
        crate::kafka::drain_deliveries(&self.producer, timeout);
        let mut attempt = 1;
        loop {
            match self.producer.commit_transaction(timeout) {
                Ok(()) => {
                    self.open = None;
                    self.metrics.transactions_committed.inc();
                    self.metrics
                        .processing_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(());
                }
                Err(e) => {
                    let err = PipelineError::kafka("commit transaction", e);
                    if err.class() != ErrorClass::Retry {
                        if err.class() == ErrorClass::Abort {
                            // Messages of the transaction failed delivery (they timed out,
                            // "N message(s) failed delivery", or the broker refused them).
                            // Aborting and producing again on the same producer was seen to
                            // fail that way every transaction timeout, forever, after the
                            // broker stalled (a game day, RELIABILITY.md): the producer kept
                            // a stale view of a partition. A new producer starts afresh.
                            warn!(error = %err, "The transaction cannot commit; the producer will be replaced.");
                            self.replace = true;
                        }
                        return Err(self.explain(err));
                    }
                    if attempt < COMMIT_ATTEMPTS {
                        attempt += 1;
                        warn!(attempt, error = %err, "Commit did not complete; retrying it.");
                        continue;
                    }
                    self.replace = true;
                    return Err(PipelineError::CommitOutcomeUnknown {
                        attempts: attempt,
                        message: err.to_string(),
                    });
                }
            }
        }
    }

    /// `send_offsets_to_transaction`, with a deadline of our own. librdkafka's call can
    /// block past its timeout, forever, when the group coordinator it has cached went away
    /// (seen in a game day: the controller fenced its own broker for a few seconds and the
    /// canonization stage hung inside this call for good; librdkafka issues 5456 and
    /// 5511). The call therefore runs on a thread of its own. If it has not returned a
    /// little after its timeout, its outcome is unknown: the producer is replaced (the new
    /// one fences it), and the stuck call keeps the old producer alive until it returns,
    /// if ever, on that thread.
    fn send_offsets(
        &mut self,
        tpl: TopicPartitionList,
        group: ConsumerGroupMetadata,
    ) -> Result<(), PipelineError> {
        let timeout = self.settings.transaction_timeout;
        let producer = Arc::clone(&self.producer);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("send-offsets".into())
            .spawn(move || {
                let r = producer.send_offsets_to_transaction(&tpl, &group, timeout);
                let _ = tx.send(r);
            })
            .map_err(|e| PipelineError::Thread(format!("cannot start a thread: {e}")))?;
        match rx.recv_timeout(timeout + SEND_OFFSETS_GRACE) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                let err = PipelineError::kafka("send offsets to transaction", e);
                Err(self.explain(err))
            }
            Err(_) => {
                warn!(
                    timeout_s = timeout.as_secs(),
                    "send_offsets_to_transaction did not return within its timeout; the producer will be replaced."
                );
                self.metrics.calls_abandoned.inc();
                self.replace = true;
                Err(PipelineError::CommitOutcomeUnknown {
                    attempts: 1,
                    message: "send_offsets_to_transaction did not return".into(),
                })
            }
        }
    }

    /// Ends whatever the last failure left behind, so that the committed state is
    /// definite: aborts the open transaction, or replaces the producer when the commit's
    /// outcome is unknown or the abort itself failed. Waits for the broker while it is
    /// unreachable. Fatal errors are returned.
    pub fn recover(&mut self, shutdown: &CancellationToken) -> Result<(), PipelineError> {
        if self.open.is_some() && !self.replace {
            match self
                .producer
                .abort_transaction(self.settings.transaction_timeout)
            {
                Ok(()) => {
                    self.open = None;
                    self.metrics.transactions_aborted.inc();
                    return Ok(());
                }
                Err(e) => {
                    let err = PipelineError::kafka("abort transaction", e);
                    if err.class() == ErrorClass::Fatal {
                        // A transaction open past its timeout was already aborted by its
                        // coordinator, which fenced this producer's epoch: `explain` then
                        // asks for a new producer. Any other fatal error ends the process.
                        let err = self.explain(err);
                        if !self.replace {
                            return Err(err);
                        }
                    } else {
                        warn!(error = %err, "Abort did not complete; replacing the producer.");
                        self.replace = true;
                    }
                }
            }
        }
        if self.replace {
            warn!("Replacing the producer so the last transaction's outcome becomes definite.");
            // The new producer's init fences the old one; only then is the old dropped.
            self.producer = Arc::new(init(&self.settings, shutdown)?);
            self.replace = false;
            self.metrics.producers_replaced.inc();
            if self.open.take().is_some() {
                self.metrics.transactions_aborted.inc();
            }
        }
        Ok(())
    }
}

/// Holds the commit-in-flight gauge at 1 for its lifetime, whichever way the commit
/// ends.
struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn enter(gauge: &prometheus::IntGauge) -> Self {
        gauge.set(1);
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.set(0);
    }
}

/// The client settings of every transactional producer (also `medpipe bench
/// passthrough`'s, so that its yardstick runs on the same settings).
///
/// `retry.backoff.ms` is 10 instead of librdkafka's 100: right after a commit the
/// coordinator is still writing the previous transaction's markers for a few
/// milliseconds, and answers the next transaction's `AddOffsetsToTxn` and
/// `AddPartitionsToTxn` with CONCURRENT_TRANSACTIONS; librdkafka retries after the
/// backoff, so the default cost every transaction about 100 ms more (BENCHMARKS.md).
/// Retries still back off exponentially up to `retry.backoff.max.ms` (1 s).
pub fn transactional_config(
    kafka: &crate::kafka::Connection,
    transactional_id: &str,
    transaction_timeout: Duration,
) -> rdkafka::ClientConfig {
    let mut c = crate::kafka::producer_config(kafka);
    c.set("transactional.id", transactional_id)
        .set(
            "transaction.timeout.ms",
            transaction_timeout.as_millis().to_string(),
        )
        .set("retry.backoff.ms", "10");
    c
}

fn init(
    settings: &TxnSettings,
    shutdown: &CancellationToken,
) -> Result<BaseProducer, PipelineError> {
    let producer: BaseProducer = transactional_config(
        &settings.kafka,
        &settings.transactional_id,
        settings.transaction_timeout,
    )
    .create()
    .map_err(kafka_err("create producer"))?;
    retry_until(shutdown, "init transactions", || {
        producer
            .init_transactions(Duration::from_secs(30))
            .map_err(kafka_err("init transactions"))
    })?;
    Ok(producer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::{MockCluster, MockCoordinator};
    use rdkafka::Offset;

    /// librdkafka's `send_offsets_to_transaction` can block far past its timeout when the
    /// group coordinator does not answer (librdkafka issue 5456). The mock cluster stands
    /// in for the broker here only to make the group coordinator unresponsive on demand
    /// (a round trip of ten minutes); no exactly-once claim rests on it. The commit must
    /// come back soon after the transaction timeout with an unknown outcome, count the
    /// abandoned call, and `recover` must replace the producer.
    #[test]
    fn a_send_offsets_call_that_does_not_return_is_abandoned_and_the_producer_replaced() {
        let mock = MockCluster::new(3).expect("mock cluster");
        mock.create_topic("in", 1, 1).expect("topic");
        mock.create_topic("out", 1, 1).expect("topic");
        mock.coordinator(MockCoordinator::Group("g".into()), 3)
            .expect("group coordinator");
        mock.coordinator(MockCoordinator::Transaction("tx".into()), 1)
            .expect("transaction coordinator");
        let kafka = crate::kafka::Connection::plaintext(mock.bootstrap_servers());
        let metrics = StageMetrics::new("txnunit").expect("metrics");
        let shutdown = CancellationToken::new();
        let timeout = Duration::from_secs(2);
        let mut txn = Transactions::connect(
            TxnSettings::new(&kafka, "tx", timeout),
            metrics.clone(),
            &shutdown,
        )
        .expect("init");
        let consumer: BaseConsumer = crate::kafka::consumer_config(
            &kafka,
            "g",
            crate::kafka::ConsumerRole::Stage {
                queued_max_kbytes: 1024,
            },
        )
        .create()
        .expect("consumer");
        let group = consumer.group_metadata().expect("group metadata");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("in", 0, Offset::Offset(1))
            .expect("offsets");

        txn.send(BaseRecord::<(), _>::to("out").payload("x"))
            .expect("send");
        mock.broker_round_trip_time(3, Duration::from_secs(600))
            .expect("slow coordinator");
        let started = Instant::now();
        let err = txn
            .commit(Some((tpl, group)))
            .expect_err("the commit cannot complete");
        let took = started.elapsed();
        assert!(
            matches!(err, PipelineError::CommitOutcomeUnknown { .. }),
            "{err}"
        );
        assert_eq!(metrics.calls_abandoned.get(), 1);
        assert!(
            took < timeout + SEND_OFFSETS_GRACE + Duration::from_secs(5),
            "the commit took {took:?}"
        );
        txn.recover(&shutdown).expect("recover");
        assert_eq!(metrics.producers_replaced.get(), 1);
        assert!(!txn.is_open());
        // The abandoned call still holds the old producer, which holds the mock cluster's
        // brokers: leave them to the end of the process.
        std::mem::forget(consumer);
        std::mem::forget(txn);
        std::mem::forget(mock);
    }
}
