//! The pipeline crate's error type and the retry / abort / fatal classification.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// What the caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Transient: try the same thing again after a pause.
    Retry,
    /// The open transaction is doomed: abort it, rewind the input and redo the batch.
    Abort,
    /// The input itself is bad: send it to the dead-letter topic and move on.
    DeadLetter,
    /// The process cannot go on safely; exit so a restart gets a clean producer.
    Fatal,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Retry => "retry",
            ErrorClass::Abort => "abort",
            ErrorClass::DeadLetter => "dead_letter",
            ErrorClass::Fatal => "fatal",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("Kafka {operation} failed: {source}")]
    Kafka {
        operation: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("Schema Registry call failed ({context}): {message}")]
    SchemaRegistry {
        context: String,
        message: String,
        retriable: bool,
    },
    /// The registry answered 401 or 403: our credentials are wrong, missing or not allowed
    /// this call. Fatal: retrying cannot fix it, and a message must not be dead-lettered
    /// for it. Names the user, never the password.
    #[error("{}", registry_refusal(context, user.as_deref(), *status))]
    SchemaRegistryAuth {
        context: String,
        /// `None`: the call carried no credentials.
        user: Option<String>,
        status: u16,
    },
    #[error("cannot decode message: {0}")]
    Decode(String),
    #[error("cannot encode {event_type}: {message}")]
    Encode { event_type: String, message: String },
    #[error("schema {file} is invalid: {message}")]
    Schema { file: String, message: String },
    #[error("crypto failure: {0}")]
    Crypto(String),
    #[error("configuration error: {0}")]
    Config(String),
    /// A commit did not complete after retries: it may or may not have committed. The
    /// producer is replaced (which makes the outcome definite) and the work is redone
    /// from what is committed.
    #[error("transaction commit outcome unknown after {attempts} attempts: {message}")]
    CommitOutcomeUnknown { attempts: u32, message: String },
    /// A value of ours could not be serialised; a bug, not bad input.
    #[error("cannot serialise {what}: {message}")]
    Serialize { what: &'static str, message: String },
    /// librdkafka gave up on the transactional producer, for example because a newer
    /// instance with the same transactional id fenced it.
    #[error("the producer cannot go on ({code}): {reason}")]
    ProducerFatal { code: String, reason: String },
    /// The coordinator aborted a transaction that stayed open past its timeout (the
    /// broker was unreachable for that long); the producer is replaced and the work redone.
    #[error("the transaction was aborted by its coordinator after its timeout: {reason}")]
    TransactionTimedOut { reason: String },
    /// Something did not finish in time; trying again later may work.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Durable data of ours (a state entry, a ledger entry, a claim, the audit store)
    /// cannot be read or written. Fatal: going on would act on a wrong picture.
    #[error("storage: {what}: {message}")]
    Storage { what: String, message: String },
    /// Our durable data cannot be written because its disk is full (or over quota). What
    /// failed was undone; the same write can be tried again once space returns.
    #[error("storage: {what}: the disk is full: {message}")]
    DiskFull { what: String, message: String },
    /// A metric could not be created or registered; a bug, not bad input.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The broker refused to create a topic.
    #[error("cannot create topic {topic}: {code}")]
    TopicSetup {
        topic: String,
        code: RDKafkaErrorCode,
    },
    /// A worker thread panicked or was cancelled.
    #[error("{0}")]
    Thread(String),
    /// Something that must always hold did not; a bug, not bad input.
    #[error("invariant broken: {0}")]
    Invariant(&'static str),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The message of [`PipelineError::SchemaRegistryAuth`]: who was refused, and what to fix.
fn registry_refusal(context: &str, user: Option<&str>, status: u16) -> String {
    match user {
        Some(u) => format!(
            "the Schema Registry refused the credentials of user {u} (HTTP {status}) while \
             trying to {context}; check --schema-registry-username and the password in \
             --schema-registry-password-file, and the user's rights in the registry"
        ),
        None => format!(
            "the Schema Registry wants credentials (HTTP {status}) while trying to {context}, \
             and none are configured: set --schema-registry-username and \
             --schema-registry-password-file"
        ),
    }
}

impl PipelineError {
    /// A serialisation failure of one of our own values (`what`), for `map_err`.
    pub fn serialize<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> Self {
        move |e| PipelineError::Serialize {
            what,
            message: e.to_string(),
        }
    }

    /// Durable data that cannot be read or written.
    pub fn storage(what: impl Into<String>, message: impl std::fmt::Display) -> Self {
        PipelineError::Storage {
            what: what.into(),
            message: message.to_string(),
        }
    }

    pub fn kafka(operation: &'static str, source: KafkaError) -> Self {
        PipelineError::Kafka { operation, source }
    }

    pub fn io(path: impl Into<String>, source: std::io::Error) -> Self {
        PipelineError::Io {
            path: path.into(),
            source,
        }
    }

    /// Classifies the error the way the runner must react to it.
    pub fn class(&self) -> ErrorClass {
        match self {
            PipelineError::Kafka { source, .. } => classify_kafka(source),
            PipelineError::SchemaRegistry { retriable, .. } => {
                if *retriable {
                    ErrorClass::Retry
                } else {
                    ErrorClass::Fatal
                }
            }
            PipelineError::SchemaRegistryAuth { .. } => ErrorClass::Fatal,
            PipelineError::Decode(_) => ErrorClass::DeadLetter,
            PipelineError::Encode { .. } => ErrorClass::Fatal,
            PipelineError::Schema { .. } | PipelineError::Config(_) => ErrorClass::Fatal,
            PipelineError::CommitOutcomeUnknown { .. }
            | PipelineError::TransactionTimedOut { .. } => ErrorClass::Abort,
            PipelineError::Timeout(_) | PipelineError::DiskFull { .. } => ErrorClass::Retry,
            PipelineError::Thread(_)
            | PipelineError::ProducerFatal { .. }
            | PipelineError::Invariant(_)
            | PipelineError::Serialize { .. }
            | PipelineError::Storage { .. }
            | PipelineError::Metrics(_) => ErrorClass::Fatal,
            // No transaction is involved: what is not transient is fatal.
            PipelineError::TopicSetup { code, .. } => {
                match classify_kafka(&KafkaError::Global(*code)) {
                    ErrorClass::Retry => ErrorClass::Retry,
                    _ => ErrorClass::Fatal,
                }
            }
            PipelineError::Crypto(_) => ErrorClass::DeadLetter,
            PipelineError::Io { .. } => ErrorClass::Retry,
        }
    }
}

/// `map_err` adapter naming the Kafka operation that failed.
pub fn kafka_err(operation: &'static str) -> impl FnOnce(KafkaError) -> PipelineError {
    move |source| PipelineError::Kafka { operation, source }
}

/// Maps a librdkafka error to the runner's reaction. Transactional errors carry
/// their own flags (fatal, abortable, retriable); the rest are judged by code.
pub fn classify_kafka(err: &KafkaError) -> ErrorClass {
    if let KafkaError::Transaction(e) = err {
        if e.is_fatal() {
            return ErrorClass::Fatal;
        }
        if e.txn_requires_abort() {
            return ErrorClass::Abort;
        }
        if e.is_retriable() {
            return ErrorClass::Retry;
        }
        return ErrorClass::Abort;
    }
    match err.rdkafka_error_code() {
        Some(RDKafkaErrorCode::Fatal)
        | Some(RDKafkaErrorCode::ProducerFenced)
        | Some(RDKafkaErrorCode::InvalidProducerEpoch)
        | Some(RDKafkaErrorCode::TransactionalIdAuthorizationFailed) => ErrorClass::Fatal,
        // Transient: a broker restarting, leadership or coordinators moving, a request
        // timing out. Seen on the dev stack while the broker restarts.
        Some(
            RDKafkaErrorCode::QueueFull
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::TimedOutQueue
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::Resolve
            | RDKafkaErrorCode::WaitingForCoordinator
            | RDKafkaErrorCode::NotCoordinator
            | RDKafkaErrorCode::CoordinatorNotAvailable
            | RDKafkaErrorCode::CoordinatorLoadInProgress
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::NotLeaderForPartition
            | RDKafkaErrorCode::BrokerNotAvailable
            | RDKafkaErrorCode::ReplicaNotAvailable
            | RDKafkaErrorCode::NetworkException
            | RDKafkaErrorCode::NotEnoughReplicas
            | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
            | RDKafkaErrorCode::NotController
            | RDKafkaErrorCode::KafkaStorageError
            | RDKafkaErrorCode::FencedLeaderEpoch
            | RDKafkaErrorCode::UnknownLeaderEpoch
            | RDKafkaErrorCode::StaleBrokerEpoch
            | RDKafkaErrorCode::RebalanceInProgress
            | RDKafkaErrorCode::ConcurrentTransactions
            // A request whose broker handle was replaced as the broker came back (seen
            // in a game day, on a metadata request after the broker stalled for 20 s).
            | RDKafkaErrorCode::DestroyBroker
            // Topics exist before a stage starts (it creates them); right after a broker
            // restart its metadata can still say otherwise.
            | RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition,
        ) => ErrorClass::Retry,
        _ => ErrorClass::Abort,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fenced_producer_is_fatal_and_queue_full_is_retry() {
        let fenced = KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced);
        assert_eq!(classify_kafka(&fenced), ErrorClass::Fatal);
        let full = KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull);
        assert_eq!(classify_kafka(&full), ErrorClass::Retry);
        let other = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(classify_kafka(&other), ErrorClass::Abort);
        // Seen while the broker restarts: a read-back must wait, not give up.
        let moving = KafkaError::MetadataFetch(RDKafkaErrorCode::NotLeaderForPartition);
        assert_eq!(classify_kafka(&moving), ErrorClass::Retry);
        let replaced = KafkaError::MetadataFetch(RDKafkaErrorCode::DestroyBroker);
        assert_eq!(classify_kafka(&replaced), ErrorClass::Retry);
    }

    #[test]
    fn decode_errors_dead_letter_and_config_errors_are_fatal() {
        assert_eq!(
            PipelineError::Decode("x".into()).class(),
            ErrorClass::DeadLetter
        );
        assert_eq!(PipelineError::Config("x".into()).class(), ErrorClass::Fatal);
    }

    #[test]
    fn a_refused_registry_credential_is_fatal_and_names_the_user_and_status() {
        let e = PipelineError::SchemaRegistryAuth {
            context: "register t.ingestion.v1-medpipe.ingestion.RecordIngested".into(),
            user: Some("medpipe-ingestion".into()),
            status: 401,
        };
        assert_eq!(e.class(), ErrorClass::Fatal);
        assert!(e.to_string().starts_with(
            "the Schema Registry refused the credentials of user medpipe-ingestion (HTTP 401)"
        ));
        let anonymous = PipelineError::SchemaRegistryAuth {
            context: "decode".into(),
            user: None,
            status: 403,
        };
        assert!(anonymous.to_string().contains("none are configured"));
        assert!(anonymous.to_string().contains("(HTTP 403)"));
    }

    #[test]
    fn broken_durable_data_is_fatal_and_a_topic_the_broker_cannot_place_yet_is_retried() {
        assert_eq!(
            PipelineError::storage("ledger", "bad json").class(),
            ErrorClass::Fatal
        );
        let e = PipelineError::serialize("a claim")("boom");
        assert_eq!(e.to_string(), "cannot serialise a claim: boom");
        assert_eq!(e.class(), ErrorClass::Fatal);
        let setup = |code| PipelineError::TopicSetup {
            topic: "t".into(),
            code,
        };
        assert_eq!(
            setup(RDKafkaErrorCode::TopicAuthorizationFailed).class(),
            ErrorClass::Fatal
        );
        assert_eq!(
            setup(RDKafkaErrorCode::NotController).class(),
            ErrorClass::Retry
        );
    }
}
