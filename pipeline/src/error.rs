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
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl PipelineError {
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
            PipelineError::Decode(_) => ErrorClass::DeadLetter,
            PipelineError::Encode { .. } => ErrorClass::Fatal,
            PipelineError::Schema { .. } | PipelineError::Config(_) => ErrorClass::Fatal,
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
        Some(RDKafkaErrorCode::QueueFull)
        | Some(RDKafkaErrorCode::OperationTimedOut)
        | Some(RDKafkaErrorCode::RequestTimedOut)
        | Some(RDKafkaErrorCode::BrokerTransportFailure)
        | Some(RDKafkaErrorCode::AllBrokersDown)
        | Some(RDKafkaErrorCode::NotCoordinator)
        | Some(RDKafkaErrorCode::CoordinatorNotAvailable)
        | Some(RDKafkaErrorCode::CoordinatorLoadInProgress) => ErrorClass::Retry,
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
    }

    #[test]
    fn decode_errors_dead_letter_and_config_errors_are_fatal() {
        assert_eq!(
            PipelineError::Decode("x".into()).class(),
            ErrorClass::DeadLetter
        );
        assert_eq!(PipelineError::Config("x".into()).class(), ErrorClass::Fatal);
    }
}
