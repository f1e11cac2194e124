//! Topic names, derived from one prefix so tests can run isolated pipelines side by side,
//! and explicit topic creation.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::error::PipelineError;
use crate::resources::ResourceType;

/// The kinds of topic an event can live on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// `StartDataIntakeCommand`s that name a file for ingestion to claim.
    IngestionCommands,
    Ingestion,
    Anonymization,
    Audit,
    /// Canonization's batch lifecycle (created, started, completed, failed).
    Canonization,
    /// The batch saga: operators' requests (retry, withdraw) and the stages' transitions
    /// of a batch between states (held, retried), keyed by batch.
    Saga,
    /// One canonical resource type's records, which analytics teams read.
    Canonical(ResourceType),
}

impl TopicKind {
    /// The per-resource canonical topics, Patient first.
    pub fn canonical() -> impl Iterator<Item = TopicKind> {
        ResourceType::ALL.iter().map(|&t| TopicKind::Canonical(t))
    }
}

/// Every topic name of one pipeline, all under `prefix` (default `medpipe`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub prefix: String,
}

/// The stages that keep durable state in a compacted state topic.
pub const STATE_STAGES: [&str; 3] = ["anonymization", "auditing", "canonization"];

/// The stages that own a dead-letter topic.
pub const DLQ_STAGES: [&str; 4] = ["ingestion", "anonymization", "canonization", "auditing"];

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Topics {
            prefix: prefix.into(),
        }
    }

    pub fn name(&self, kind: TopicKind) -> String {
        let suffix = match kind {
            TopicKind::IngestionCommands => "ingestion.commands.v1",
            TopicKind::Ingestion => "ingestion.v1",
            TopicKind::Anonymization => "anonymization.v1",
            TopicKind::Audit => "audit.v1",
            TopicKind::Canonization => "canonization.v1",
            TopicKind::Saga => "saga.v1",
            TopicKind::Canonical(t) => {
                return format!("{}.canonical.{}.v1", self.prefix, t.topic_suffix())
            }
        };
        format!("{}.{suffix}", self.prefix)
    }

    pub fn dlq(&self, stage: &str) -> String {
        format!("{}.dlq.{stage}.v1", self.prefix)
    }

    /// True for this pipeline's dead-letter topics, whose messages are raw input bytes.
    pub fn is_dlq(&self, topic: &str) -> bool {
        topic
            .strip_prefix(&format!("{}.dlq.", self.prefix))
            .is_some_and(|rest| rest.ends_with(".v1"))
    }

    /// Ingestion's internal progress ledger: a compacted topic keyed by file SHA-256,
    /// written in the same transactions as the records. It is named outside the
    /// `<prefix>.` namespace because it is state, not an event stream to audit.
    pub fn ingestion_ledger(&self) -> String {
        format!("{}-internal.ingestion-ledger.v1", self.prefix)
    }

    /// The dead letters `medpipe dlq redrive` put back, compacted, keyed by
    /// `<dlq topic>/<partition>/<offset>`: written in the transaction that redrives them,
    /// so each is redriven at most once.
    pub fn redrive_ledger(&self) -> String {
        format!("{}-internal.dlq-redrive.v1", self.prefix)
    }

    /// A stage's durable state (see `state.rs`): compacted, keyed by the stage's own keys,
    /// and outside the `<prefix>.` namespace like the ingestion ledger.
    pub fn state(&self, stage: &str) -> String {
        format!("{}-internal.{stage}-state.v1", self.prefix)
    }

    /// The compacted state topics outside the `<prefix>.` namespace: ingestion's ledger,
    /// the redrive ledger and each stateful stage's state.
    pub fn internal(&self) -> Vec<String> {
        let mut v = vec![self.ingestion_ledger(), self.redrive_ledger()];
        v.extend(STATE_STAGES.iter().map(|s| self.state(s)));
        v
    }

    /// The regex that matches every topic of this pipeline (librdkafka regex syntax).
    pub fn all_regex(&self) -> String {
        format!("^{}\\..*", self.prefix.replace('.', "\\."))
    }

    /// Every topic of the pipeline, in a fixed order.
    pub fn all(&self) -> Vec<String> {
        let mut v: Vec<String> = [
            TopicKind::IngestionCommands,
            TopicKind::Ingestion,
            TopicKind::Anonymization,
            TopicKind::Canonization,
            TopicKind::Saga,
        ]
        .into_iter()
        .chain(TopicKind::canonical())
        .chain([TopicKind::Audit])
        .map(|k| self.name(k))
        .collect();
        v.extend(DLQ_STAGES.iter().map(|s| self.dlq(s)));
        v
    }
}

/// Partitions, replication and configs of topics medpipe creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicLayout {
    pub partitions: i32,
    pub replication: i32,
    pub configs: Vec<(String, String)>,
}

impl TopicLayout {
    pub fn with_partitions(partitions: i32) -> Self {
        TopicLayout {
            partitions,
            replication: 1,
            configs: vec![],
        }
    }
}

/// Creates the topics that do not exist yet. Existing topics are left alone, and so are
/// topics the principal may not create.
pub async fn ensure_topics(
    kafka: &crate::kafka::Connection,
    names: &[String],
    layout: &TopicLayout,
) -> Result<(), PipelineError> {
    let admin: AdminClient<DefaultClientContext> = crate::kafka::admin_config(kafka)
        .create()
        .map_err(|e| PipelineError::kafka("create admin client", e))?;
    let new: Vec<NewTopic> = names
        .iter()
        .map(|n| {
            layout.configs.iter().fold(
                NewTopic::new(
                    n,
                    layout.partitions,
                    TopicReplication::Fixed(layout.replication),
                ),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(|e| PipelineError::kafka("create topics", e))?;
    let mut not_allowed = 0;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            // A principal held to its own topics (see `access`) may create none: on a
            // secured cluster the platform creates them (`medpipe k8s topics`). A topic
            // that is really missing fails later, where the stage reads or writes it.
            Err((_, RDKafkaErrorCode::TopicAuthorizationFailed)) => not_allowed += 1,
            Err((topic, code)) => {
                return Err(PipelineError::TopicSetup { topic, code });
            }
        }
    }
    if not_allowed > 0 {
        tracing::info!(
            topics = not_allowed,
            principal = kafka.principal(),
            "Not allowed to create topics; expecting the platform to have created them."
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let t = Topics::new("medpipe");
        assert_eq!(t.name(TopicKind::Ingestion), "medpipe.ingestion.v1");
        assert_eq!(
            t.name(TopicKind::Canonical(ResourceType::Patient)),
            "medpipe.canonical.patient.v1"
        );
        assert_eq!(t.dlq("anonymization"), "medpipe.dlq.anonymization.v1");
        assert_eq!(t.all_regex(), "^medpipe\\..*");
        assert_eq!(
            t.name(TopicKind::Canonical(ResourceType::MedicationRequest)),
            "medpipe.canonical.medicationrequest.v1"
        );
        assert_eq!(
            t.name(TopicKind::Canonical(ResourceType::Practitioner)),
            "medpipe.canonical.practitioner.v1"
        );
        // 4 stage topics, the saga, 15 canonical topics, the audit topic and 4 DLQs; all
        // distinct.
        let mut all = t.all();
        assert_eq!(all.len(), 25);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 25);
        assert_eq!(t.name(TopicKind::Saga), "medpipe.saga.v1");
        assert_eq!(t.ingestion_ledger(), "medpipe-internal.ingestion-ledger.v1");
        assert!(!t.ingestion_ledger().starts_with("medpipe."));
        assert!(t.is_dlq("medpipe.dlq.canonization.v1"));
        assert!(!t.is_dlq("medpipe.ingestion.v1"));
        assert!(!t.is_dlq("other.dlq.canonization.v1"));
    }
}
