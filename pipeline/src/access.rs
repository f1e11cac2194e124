//! Who may do what on the brokers: one principal per stage, allowed to read and write
//! only its own topics, consumer group and transactional ids. The Strimzi `KafkaUser`s
//! (`medpipe k8s users`) and the dev stack's ACLs (the ACL end-to-end test) are both
//! rendered from [`grants`], so the cluster's ACLs cannot drift from what the code reads
//! and writes.

use serde::Serialize;

use crate::readback::READBACK_GROUP_PREFIX;
use crate::topics::{TopicKind, Topics};

/// What a principal may do to a resource (Kafka's ACL operation names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Operation {
    Read,
    Write,
    Describe,
}

/// The kinds of resource medpipe's ACLs name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    Topic,
    Group,
    TransactionalId,
}

/// Whether the name is a whole name or a prefix of names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PatternType {
    Literal,
    Prefixed,
}

/// One ACL: allow `operations` on the resources `name` matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Acl {
    pub kind: ResourceKind,
    pub name: String,
    pub pattern: PatternType,
    pub operations: Vec<Operation>,
}

/// A stage's principal and everything it is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub stage: &'static str,
    /// The SASL user name (and the `KafkaUser`'s name): `<prefix>-<stage>`.
    pub principal: String,
    pub acls: Vec<Acl>,
}

fn topic(name: String, operations: &[Operation]) -> Acl {
    Acl {
        kind: ResourceKind::Topic,
        name,
        pattern: PatternType::Literal,
        operations: operations.to_vec(),
    }
}

/// The ACLs every stage needs besides its topics: its consumer group and transactional
/// ids (named as the stages name them: `<prefix>-<stage>` and `<prefix>-<stage>-<instance>`)
/// and the throwaway groups of one-off reads (state reloads).
fn stage_common(topics: &Topics, stage: &str) -> Vec<Acl> {
    use Operation::*;
    vec![
        Acl {
            kind: ResourceKind::Group,
            name: format!("{}-{stage}", topics.prefix),
            pattern: PatternType::Literal,
            operations: vec![Read, Describe],
        },
        Acl {
            kind: ResourceKind::TransactionalId,
            name: format!("{}-{stage}-", topics.prefix),
            pattern: PatternType::Prefixed,
            operations: vec![Write, Describe],
        },
        Acl {
            kind: ResourceKind::Group,
            name: format!("{READBACK_GROUP_PREFIX}-"),
            pattern: PatternType::Prefixed,
            operations: vec![Read, Describe],
        },
    ]
}

/// Every stage's grant, and the operator CLI's ([`operator`]), for a pipeline under
/// `topics.prefix`.
///
/// - ingestion reads intake commands and the saga, writes the ingestion topic (where
///   PHI is sealed), the saga and its dead letters, and owns its ledger;
/// - anonymization reads only the ingestion topic, and writes the anonymization topic,
///   the saga and its dead letters, and owns its state;
/// - canonization reads the anonymization topic and the saga, writes the canonical and
///   canonization topics, the saga and its dead letters, and owns its state; it cannot
///   read the ingestion topic;
/// - auditing reads every topic of the pipeline and writes only the audit topic, its
///   dead letters and its state.
pub fn grants(topics: &Topics) -> Vec<Grant> {
    use Operation::*;
    let rw: &[Operation] = &[Read, Write, Describe];
    let r: &[Operation] = &[Read, Describe];
    let w: &[Operation] = &[Write, Describe];
    let saga = topics.name(TopicKind::Saga);
    let grant = |stage: &'static str, mut acls: Vec<Acl>| {
        acls.extend(stage_common(topics, stage));
        Grant {
            stage,
            principal: format!("{}-{stage}", topics.prefix),
            acls,
        }
    };
    let ingestion = grant(
        "ingestion",
        vec![
            topic(topics.name(TopicKind::IngestionCommands), r),
            topic(saga.clone(), rw),
            topic(topics.name(TopicKind::Ingestion), w),
            topic(topics.dlq("ingestion"), w),
            topic(topics.ingestion_ledger(), rw),
        ],
    );
    let anonymization = grant(
        "anonymization",
        vec![
            topic(topics.name(TopicKind::Ingestion), r),
            topic(topics.name(TopicKind::Anonymization), w),
            topic(saga.clone(), w),
            topic(topics.dlq("anonymization"), w),
            topic(topics.state("anonymization"), rw),
        ],
    );
    let mut canonization_topics = vec![
        topic(topics.name(TopicKind::Anonymization), r),
        topic(saga.clone(), rw),
        topic(topics.name(TopicKind::Canonization), w),
        topic(topics.dlq("canonization"), w),
        topic(topics.state("canonization"), rw),
    ];
    canonization_topics.extend(TopicKind::canonical().map(|k| topic(topics.name(k), w)));
    let canonization = grant("canonization", canonization_topics);
    let auditing = grant(
        "auditing",
        vec![
            // Every topic of the pipeline (it subscribes to `<prefix>\..*`).
            Acl {
                kind: ResourceKind::Topic,
                name: format!("{}.", topics.prefix),
                pattern: PatternType::Prefixed,
                operations: r.to_vec(),
            },
            topic(topics.name(TopicKind::Audit), w),
            topic(topics.dlq("auditing"), w),
            topic(topics.state("auditing"), rw),
        ],
    );
    vec![
        ingestion,
        anonymization,
        canonization,
        auditing,
        operator(topics),
    ]
}

/// The principal of the `medpipe` operator CLI (`<prefix>-operator`), for the commands an
/// operator runs against a live pipeline:
///
/// - `summary`, `dlq list`/`show`, `audit verify` and the waits of `batch retry|release|
///   withdraw|reprocess` read the pipeline's topics (`<prefix>.`, as auditing does);
/// - `intake` writes an intake command; the `batch` requests write the saga topic;
/// - `dlq redrive` puts dead letters back on the topics the first three stages read
///   (intake commands, saga, ingestion, anonymization), under its own transactional ids
///   (`<prefix>-dlq-redrive-<stage>`) and redrive ledger.
///
/// It may not write the audit, canonical or lifecycle topics, and owns no stage's group,
/// transactional ids or state. `setup` (creating topics and registering schemas) and
/// `replay` (copying batches to a new topic prefix) are platform work, not granted here.
pub fn operator(topics: &Topics) -> Grant {
    use Operation::*;
    let r: &[Operation] = &[Read, Describe];
    let w: &[Operation] = &[Write, Describe];
    let mut acls = vec![Acl {
        kind: ResourceKind::Topic,
        name: format!("{}.", topics.prefix),
        pattern: PatternType::Prefixed,
        operations: r.to_vec(),
    }];
    acls.extend(
        [
            TopicKind::IngestionCommands,
            TopicKind::Saga,
            TopicKind::Ingestion,
            TopicKind::Anonymization,
        ]
        .map(|k| topic(topics.name(k), w)),
    );
    acls.extend([
        topic(topics.redrive_ledger(), &[Read, Write, Describe]),
        Acl {
            kind: ResourceKind::TransactionalId,
            name: format!("{}-dlq-redrive-", topics.prefix),
            pattern: PatternType::Prefixed,
            operations: w.to_vec(),
        },
        Acl {
            kind: ResourceKind::Group,
            name: format!("{READBACK_GROUP_PREFIX}-"),
            pattern: PatternType::Prefixed,
            operations: r.to_vec(),
        },
    ]);
    Grant {
        stage: "operator",
        principal: format!("{}-operator", topics.prefix),
        acls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(g: &Grant, kind: ResourceKind, name: &str, op: Operation) -> bool {
        g.acls.iter().any(|a| {
            a.kind == kind
                && a.operations.contains(&op)
                && match a.pattern {
                    PatternType::Literal => a.name == name,
                    PatternType::Prefixed => name.starts_with(&a.name),
                }
        })
    }

    #[test]
    fn each_stage_reads_its_inputs_and_no_stage_but_auditing_writes_the_audit_topic() {
        let t = Topics::new("medpipe");
        let gs = grants(&t);
        let by = |s: &str| gs.iter().find(|g| g.stage == s).expect("grant");
        let ingestion_topic = t.name(TopicKind::Ingestion);
        let audit = t.name(TopicKind::Audit);
        assert!(allows(
            by("anonymization"),
            ResourceKind::Topic,
            &ingestion_topic,
            Operation::Read
        ));
        assert!(!allows(
            by("canonization"),
            ResourceKind::Topic,
            &ingestion_topic,
            Operation::Read
        ));
        assert!(allows(
            by("auditing"),
            ResourceKind::Topic,
            &ingestion_topic,
            Operation::Read
        ));
        for g in &gs {
            assert_eq!(
                allows(g, ResourceKind::Topic, &audit, Operation::Write),
                g.stage == "auditing",
                "{} may write the audit topic",
                g.stage
            );
            // Only ingestion writes the topic where PHI is sealed (and the operator, whose
            // redrive puts anonymization's dead letters back there).
            assert_eq!(
                allows(g, ResourceKind::Topic, &ingestion_topic, Operation::Write),
                g.stage == "ingestion" || g.stage == "operator"
            );
            // A stage's transactional ids are its own.
            for other in ["ingestion", "anonymization", "canonization", "auditing"] {
                assert_eq!(
                    allows(
                        g,
                        ResourceKind::TransactionalId,
                        &format!("medpipe-{other}-0"),
                        Operation::Write
                    ),
                    g.stage == other
                );
            }
        }
        for k in TopicKind::canonical() {
            assert!(allows(
                by("canonization"),
                ResourceKind::Topic,
                &t.name(k),
                Operation::Write
            ));
            assert!(!allows(
                by("anonymization"),
                ResourceKind::Topic,
                &t.name(k),
                Operation::Write
            ));
        }
    }

    #[test]
    fn the_operator_writes_only_requests_and_redriven_inputs() {
        let t = Topics::new("medpipe");
        let op = operator(&t);
        assert_eq!(op.principal, "medpipe-operator");
        for k in [
            TopicKind::IngestionCommands,
            TopicKind::Saga,
            TopicKind::Ingestion,
            TopicKind::Anonymization,
        ] {
            assert!(allows(
                &op,
                ResourceKind::Topic,
                &t.name(k),
                Operation::Write
            ));
        }
        let mut forbidden: Vec<String> = TopicKind::canonical().map(|k| t.name(k)).collect();
        forbidden.push(t.name(TopicKind::Audit));
        forbidden.push(t.name(TopicKind::Canonization));
        forbidden.extend(crate::topics::DLQ_STAGES.iter().map(|s| t.dlq(s)));
        forbidden.push(t.ingestion_ledger());
        for name in &forbidden {
            assert!(
                !allows(&op, ResourceKind::Topic, name, Operation::Write),
                "the operator may write {name}"
            );
        }
        for stage in ["ingestion", "anonymization", "canonization", "auditing"] {
            let state = t.state(stage);
            assert!(!allows(&op, ResourceKind::Topic, &state, Operation::Read));
            assert!(!allows(&op, ResourceKind::Topic, &state, Operation::Write));
            assert!(!allows(
                &op,
                ResourceKind::Group,
                &format!("medpipe-{stage}"),
                Operation::Read
            ));
            assert!(!allows(
                &op,
                ResourceKind::TransactionalId,
                &format!("medpipe-{stage}-0"),
                Operation::Write
            ));
        }
        assert!(allows(
            &op,
            ResourceKind::TransactionalId,
            "medpipe-dlq-redrive-anonymization",
            Operation::Write
        ));
        assert!(allows(
            &op,
            ResourceKind::Topic,
            &t.redrive_ledger(),
            Operation::Read
        ));
    }
}
