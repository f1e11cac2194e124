//! The event envelope and every event type medpipe emits. The set is closed: one
//! `Payload` variant per Avro schema in `schemas/`, declared once in `catalogue!`.

use chrono::Utc;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::topics::TopicKind;

/// The envelope fields every event carries (see `schemas/envelope.avsc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub event_id: String,
    pub event_type: String,
    /// Microseconds since the Unix epoch, UTC.
    pub occurred_at: i64,
    /// The batch id.
    pub correlation_id: String,
    /// The event that caused this one, if any.
    pub causation_id: Option<String>,
    pub source_service: String,
    pub schema_version: i32,
}

/// One medpipe event: the envelope plus a payload that needs no further lookup.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub header: Header,
    pub payload: Payload,
}

impl Event {
    /// A new event with a fresh id and the current time.
    pub fn new(
        source_service: &str,
        correlation_id: &str,
        causation_id: Option<&str>,
        payload: Payload,
    ) -> Self {
        Event {
            header: Header {
                event_id: Uuid::new_v4().to_string(),
                event_type: payload.event_type().to_string(),
                occurred_at: Utc::now().timestamp_micros(),
                correlation_id: correlation_id.to_string(),
                causation_id: causation_id.map(str::to_string),
                source_service: source_service.to_string(),
                schema_version: payload.schema_version(),
            },
            payload,
        }
    }

    /// A new event caused by `cause`, in the same batch.
    pub fn caused_by(cause: &Event, source_service: &str, payload: Payload) -> Self {
        Event::new(
            source_service,
            &cause.header.correlation_id,
            Some(&cause.header.event_id),
            payload,
        )
    }

    pub fn event_type(&self) -> &'static str {
        self.payload.event_type()
    }
}

/// How an event looks on the wire, borrowed for encoding.
#[derive(Serialize)]
pub(crate) struct WireOut<'a, P> {
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub occurred_at: i64,
    pub correlation_id: &'a str,
    pub causation_id: Option<&'a str>,
    pub source_service: &'a str,
    pub schema_version: i32,
    pub payload: &'a P,
}

/// How an event looks on the wire, owned for decoding.
#[derive(Deserialize)]
pub(crate) struct WireIn<P> {
    pub event_id: String,
    pub event_type: String,
    pub occurred_at: i64,
    pub correlation_id: String,
    pub causation_id: Option<String>,
    pub source_service: String,
    pub schema_version: i32,
    pub payload: P,
}

impl<P> WireIn<P> {
    pub(crate) fn split(self) -> (Header, P) {
        (
            Header {
                event_id: self.event_id,
                event_type: self.event_type,
                occurred_at: self.occurred_at,
                correlation_id: self.correlation_id,
                causation_id: self.causation_id,
                source_service: self.source_service,
                schema_version: self.schema_version,
            },
            self.payload,
        )
    }
}

pub(crate) fn wire_out<'a, P>(h: &'a Header, payload: &'a P) -> WireOut<'a, P> {
    WireOut {
        event_id: &h.event_id,
        event_type: &h.event_type,
        occurred_at: h.occurred_at,
        correlation_id: &h.correlation_id,
        causation_id: h.causation_id.as_deref(),
        source_service: &h.source_service,
        schema_version: h.schema_version,
        payload,
    }
}

/// Static description of one event type.
#[derive(Debug)]
pub struct EventSpec {
    /// Record name, also the `event_type` string.
    pub name: &'static str,
    /// Avro namespace; the registered record's full name is `namespace.name`.
    pub namespace: &'static str,
    /// The topic the event lives on.
    pub topic: TopicKind,
    /// Version of the schema file, carried in `schema_version`.
    pub version: i32,
    /// Path below `schemas/`.
    pub file: &'static str,
    /// The payload record schema, as written in `schemas/`.
    pub payload_schema: &'static str,
}

impl EventSpec {
    pub fn full_name(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }
}

/// The topic of a catalogue entry: a lifecycle topic, or the canonical topic of a
/// resource type.
macro_rules! topic_of {
    (topic $kind:ident) => {
        TopicKind::$kind
    };
    (resource $t:ident) => {
        TopicKind::Canonical(ResourceType::$t)
    };
}

/// `Control`: the catalogue's events that are not canonical records, filtered out of the
/// entries (`topic`/`resource` tags) one by one.
macro_rules! control_view {
    ([$($done:ident)*]) => {
        /// Every event that is not a canonical record, by reference. A consumer that treats
        /// all canonical records alike (through [`Payload::canonical`]) matches on this,
        /// exhaustively, so a new lifecycle event fails to compile there until handled, and
        /// a new resource type needs no change there at all.
        #[derive(Debug, Clone, Copy)]
        pub enum Control<'a> {
            $( $done(&'a $done), )*
        }

        impl Payload {
            /// The event as a [`Control`], or `None` for a canonical record.
            pub fn control(&self) -> Option<Control<'_>> {
                match self {
                    $( Payload::$done(p) => Some(Control::$done(p)), )*
                    _ => None,
                }
            }
        }
    };
    ([$($done:ident)*] topic $v:ident $($rest:ident)*) => {
        control_view!([$($done)* $v] $($rest)*);
    };
    ([$($done:ident)*] resource $v:ident $($rest:ident)*) => {
        control_view!([$($done)*] $($rest)*);
    };
}

macro_rules! catalogue {
    ($( $variant:ident { ns: $ns:literal, $tag:ident: $target:ident, version: $version:literal, file: $file:literal } )*) => {
        control_view!([] $( $tag $variant )*);

        /// Every event payload. Adding a variant means adding a schema file too.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Payload {
            $( $variant($variant), )*
        }

        /// Every event type, as a value: what an audit entry's `event_type` names. Match
        /// on this, not on strings, so that renaming an event fails to compile where it is
        /// recognised.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EventType {
            $( $variant, )*
        }

        impl EventType {
            pub const fn as_str(self) -> &'static str {
                match self { $( EventType::$variant => stringify!($variant), )* }
            }

            /// The event type a name names, if it is one of the catalogue's.
            pub fn parse(name: &str) -> Option<EventType> {
                match name {
                    $( stringify!($variant) => Some(EventType::$variant), )*
                    _ => None,
                }
            }

            pub fn topic_kind(self) -> TopicKind {
                match self { $( EventType::$variant => topic_of!($tag $target), )* }
            }

            /// The canonical resource type of a canonical record type.
            pub fn resource_type(self) -> Option<ResourceType> {
                match self.topic_kind() {
                    TopicKind::Canonical(t) => Some(t),
                    _ => None,
                }
            }
        }

        impl Payload {
            pub fn kind(&self) -> EventType {
                match self { $( Payload::$variant(_) => EventType::$variant, )* }
            }

            pub fn event_type(&self) -> &'static str {
                self.kind().as_str()
            }

            pub fn schema_version(&self) -> i32 {
                match self { $( Payload::$variant(_) => $version, )* }
            }

            pub fn topic_kind(&self) -> TopicKind {
                self.kind().topic_kind()
            }

            /// The canonical resource type of a canonical record (from its topic).
            pub fn resource_type(&self) -> Option<ResourceType> {
                self.kind().resource_type()
            }
        }

        /// Every event type, in the fixed order schemas are registered in. New types go at
        /// the end so the ids of existing ones stay the same in an in-memory registry.
        pub static CATALOGUE: &[EventSpec] = &[
            $( EventSpec {
                name: stringify!($variant),
                namespace: $ns,
                topic: topic_of!($tag $target),
                version: $version,
                file: $file,
                payload_schema: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/", $file)),
            }, )*
        ];

        /// Serializes an event with the payload's concrete type.
        pub(crate) fn with_wire<R>(
            event: &Event,
            f: impl FnOnce(&dyn erased::ErasedWire) -> R,
        ) -> R {
            match &event.payload {
                $( Payload::$variant(p) => f(&wire_out(&event.header, p)), )*
            }
        }

        /// Rebuilds an event from a decoded Avro value, dispatching on the record name.
        pub(crate) fn from_avro(
            name: &str,
            value: apache_avro::types::Value,
        ) -> Result<Event, String> {
            match name {
                $( stringify!($variant) => {
                    let wire: WireIn<$variant> =
                        apache_avro::from_value(&value).map_err(|e| format!("{} does not match its schema: {e}", name))?;
                    let (header, payload) = wire.split();
                    Ok(Event { header, payload: Payload::$variant(payload) })
                } )*
                other => Err(format!("unknown event type {other}")),
            }
        }
    };
}

/// Lets the codec encode any `WireOut<P>` without knowing `P`.
pub(crate) mod erased {
    pub trait ErasedWire {
        fn to_avro_value(&self) -> Result<apache_avro::types::Value, apache_avro::Error>;
        /// Serializes straight into Avro with `writer`'s schema, appending to `out`.
        fn write_avro(
            &self,
            writer: &apache_avro::writer::datum::GenericDatumWriter<'_>,
            out: &mut Vec<u8>,
        ) -> Result<usize, apache_avro::Error>;
    }

    impl<T: serde::Serialize> ErasedWire for T {
        fn to_avro_value(&self) -> Result<apache_avro::types::Value, apache_avro::Error> {
            apache_avro::to_value(self)
        }

        fn write_avro(
            &self,
            writer: &apache_avro::writer::datum::GenericDatumWriter<'_>,
            out: &mut Vec<u8>,
        ) -> Result<usize, apache_avro::Error> {
            writer.write_ser(out, self)
        }
    }
}

// The canonical resource types (see `resources.rs`): a new one also needs its
// `Canonical<Type>` entry in the catalogue below, its details struct and its schema file.
crate::resources::resource_types! {
    Patient => "patient",
    Encounter => "encounter",
    Observation => "observation",
    Condition => "condition",
    MedicationRequest => "medicationrequest",
    Procedure => "procedure",
    DiagnosticReport => "diagnosticreport",
    AllergyIntolerance => "allergyintolerance",
    Immunization => "immunization",
    Practitioner => "practitioner",
    PractitionerRole => "practitionerrole",
    Organization => "organization",
    Location => "location",
    Medication => "medication",
    Device => "device",
}

catalogue! {
    DataIngestionCreated { ns: "medpipe.ingestion", topic: Ingestion, version: 1, file: "ingestion/DataIngestionCreated.avsc" }
    DataIngestionStarted { ns: "medpipe.ingestion", topic: Ingestion, version: 2, file: "ingestion/DataIngestionStarted.avsc" }
    SourceRecordIngested { ns: "medpipe.ingestion", topic: Ingestion, version: 1, file: "ingestion/SourceRecordIngested.avsc" }
    RecordRejected { ns: "medpipe.ingestion", topic: Ingestion, version: 1, file: "ingestion/RecordRejected.avsc" }
    DataIngestionFinished { ns: "medpipe.ingestion", topic: Ingestion, version: 1, file: "ingestion/DataIngestionFinished.avsc" }
    DataIngestionFailed { ns: "medpipe.ingestion", topic: Ingestion, version: 2, file: "ingestion/DataIngestionFailed.avsc" }
    AnonymizationStarted { ns: "medpipe.anonymization", topic: Anonymization, version: 2, file: "anonymization/AnonymizationStarted.avsc" }
    RecordAnonymized { ns: "medpipe.anonymization", topic: Anonymization, version: 3, file: "anonymization/RecordAnonymized.avsc" }
    AnonymizationFinished { ns: "medpipe.anonymization", topic: Anonymization, version: 3, file: "anonymization/AnonymizationFinished.avsc" }
    CanonicalPatient { ns: "medpipe.canonical", resource: Patient, version: 1, file: "canonical/CanonicalPatient.avsc" }
    StartDataIntakeCommand { ns: "medpipe.ingestion", topic: IngestionCommands, version: 1, file: "ingestion/StartDataIntakeCommand.avsc" }
    DataIngestionRejected { ns: "medpipe.ingestion", topic: Ingestion, version: 1, file: "ingestion/DataIngestionRejected.avsc" }
    AnonymizationFailed { ns: "medpipe.anonymization", topic: Anonymization, version: 1, file: "anonymization/AnonymizationFailed.avsc" }
    AuditEntryRecorded { ns: "medpipe.audit", topic: Audit, version: 1, file: "audit/AuditEntryRecorded.avsc" }
    AuditCheckpoint { ns: "medpipe.audit", topic: Audit, version: 1, file: "audit/AuditCheckpoint.avsc" }
    ComplianceAlert { ns: "medpipe.audit", topic: Audit, version: 1, file: "audit/ComplianceAlert.avsc" }
    EventDataCanonizationCreated { ns: "medpipe.canonization", topic: Canonization, version: 1, file: "canonization/EventDataCanonizationCreated.avsc" }
    EventDataCanonizationStarted { ns: "medpipe.canonization", topic: Canonization, version: 1, file: "canonization/EventDataCanonizationStarted.avsc" }
    EventDataCanonizationCompleted { ns: "medpipe.canonization", topic: Canonization, version: 1, file: "canonization/EventDataCanonizationCompleted.avsc" }
    CanonizationFailed { ns: "medpipe.canonization", topic: Canonization, version: 1, file: "canonization/CanonizationFailed.avsc" }
    CanonicalEncounter { ns: "medpipe.canonical", resource: Encounter, version: 1, file: "canonical/CanonicalEncounter.avsc" }
    CanonicalObservation { ns: "medpipe.canonical", resource: Observation, version: 1, file: "canonical/CanonicalObservation.avsc" }
    CanonicalCondition { ns: "medpipe.canonical", resource: Condition, version: 1, file: "canonical/CanonicalCondition.avsc" }
    CanonicalMedicationRequest { ns: "medpipe.canonical", resource: MedicationRequest, version: 1, file: "canonical/CanonicalMedicationRequest.avsc" }
    CanonicalProcedure { ns: "medpipe.canonical", resource: Procedure, version: 1, file: "canonical/CanonicalProcedure.avsc" }
    CanonicalDiagnosticReport { ns: "medpipe.canonical", resource: DiagnosticReport, version: 1, file: "canonical/CanonicalDiagnosticReport.avsc" }
    CanonicalAllergyIntolerance { ns: "medpipe.canonical", resource: AllergyIntolerance, version: 1, file: "canonical/CanonicalAllergyIntolerance.avsc" }
    CanonicalImmunization { ns: "medpipe.canonical", resource: Immunization, version: 1, file: "canonical/CanonicalImmunization.avsc" }
    CanonicalPractitioner { ns: "medpipe.canonical", resource: Practitioner, version: 1, file: "canonical/CanonicalPractitioner.avsc" }
    CanonicalPractitionerRole { ns: "medpipe.canonical", resource: PractitionerRole, version: 1, file: "canonical/CanonicalPractitionerRole.avsc" }
    CanonicalOrganization { ns: "medpipe.canonical", resource: Organization, version: 1, file: "canonical/CanonicalOrganization.avsc" }
    CanonicalLocation { ns: "medpipe.canonical", resource: Location, version: 1, file: "canonical/CanonicalLocation.avsc" }
    CanonicalMedication { ns: "medpipe.canonical", resource: Medication, version: 1, file: "canonical/CanonicalMedication.avsc" }
    CanonicalDevice { ns: "medpipe.canonical", resource: Device, version: 1, file: "canonical/CanonicalDevice.avsc" }
    PatientMerged { ns: "medpipe.anonymization", topic: Anonymization, version: 1, file: "anonymization/PatientMerged.avsc" }
    CanonicalBatchWithdrawn { ns: "medpipe.canonization", topic: Canonization, version: 1, file: "canonization/CanonicalBatchWithdrawn.avsc" }
    BatchRetryRequested { ns: "medpipe.saga", topic: Saga, version: 1, file: "saga/BatchRetryRequested.avsc" }
    BatchWithdrawalRequested { ns: "medpipe.saga", topic: Saga, version: 1, file: "saga/BatchWithdrawalRequested.avsc" }
    BatchRetried { ns: "medpipe.saga", topic: Saga, version: 1, file: "saga/BatchRetried.avsc" }
    BatchHeld { ns: "medpipe.saga", topic: Saga, version: 1, file: "saga/BatchHeld.avsc" }
    BatchReleaseRequested { ns: "medpipe.saga", topic: Saga, version: 1, file: "saga/BatchReleaseRequested.avsc" }
    BatchReleased { ns: "medpipe.saga", topic: Saga, version: 1, file: "saga/BatchReleased.avsc" }
    BatchReprocessRequested { ns: "medpipe.saga", topic: Saga, version: 1, file: "saga/BatchReprocessRequested.avsc" }
    BatchReprocessed { ns: "medpipe.saga", topic: Saga, version: 1, file: "saga/BatchReprocessed.avsc" }
}

/// Asks ingestion to claim and ingest one file. Sent by data engineers' tooling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartDataIntakeCommand {
    pub command_id: String,
    /// Path of the file, relative to ingestion's intake folder.
    pub file_path: String,
    /// Forces a format (`csv`, `fhir-ndjson`, `fhir-bundle`, `hl7v2`) instead of sniffing.
    pub format: Option<String>,
    pub requested_by: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIngestionCreated {
    pub batch_id: String,
    pub file_name: String,
    pub file_sha256: String,
    pub file_size_bytes: i64,
    pub format: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIngestionStarted {
    pub batch_id: String,
    pub format: String,
    pub file_sha256: String,
    /// The held batch this one releases as partial, for an operator's release.
    #[serde(default)]
    pub release_of: Option<String>,
    /// The batch this one reprocesses under new versions, for an operator's reprocessing.
    #[serde(default)]
    pub reprocess_of: Option<String>,
    #[serde(default)]
    pub expected_policy: Option<String>,
    #[serde(default)]
    pub expected_concept_maps: Option<String>,
}

/// An AES-256-GCM sealed blob with its wrapped data key (see `crypto`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedPayload {
    pub key_id: String,
    #[serde(with = "apache_avro::serde::bytes")]
    pub wrapped_key: Vec<u8>,
    #[serde(with = "apache_avro::serde::bytes")]
    pub nonce: Vec<u8>,
    #[serde(with = "apache_avro::serde::bytes")]
    pub ciphertext: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRecordIngested {
    pub batch_id: String,
    pub position: i64,
    pub source_format: String,
    pub record_type: String,
    pub sealed: SealedPayload,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordRejected {
    pub batch_id: String,
    pub file_name: String,
    pub position: i64,
    pub error_kind: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIngestionFinished {
    pub batch_id: String,
    pub records_emitted: i64,
    pub records_rejected: i64,
    pub file_size_bytes: i64,
    pub file_sha256: String,
    pub archive_location: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIngestionFailed {
    pub batch_id: String,
    pub file_name: String,
    pub error_kind: String,
    pub reason: String,
    pub quarantine_location: String,
    /// Records already emitted before the batch failed (null when none were parsed).
    #[serde(default)]
    pub records_emitted: Option<i64>,
    #[serde(default)]
    pub records_rejected: Option<i64>,
}

/// A file was refused before any of its records were emitted, e.g. a duplicate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIngestionRejected {
    /// For a duplicate, the batch id of the content's first ingestion.
    pub batch_id: String,
    pub file_name: String,
    pub file_sha256: Option<String>,
    /// `duplicate`, `not_found` or `outside_intake`.
    pub reason: String,
    pub detail: String,
    /// Where the refused file now is; null when there was no file.
    pub quarantine_location: Option<String>,
    pub command_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnonymizationStarted {
    pub batch_id: String,
    pub policy_version: String,
    pub key_id: String,
    #[serde(default)]
    pub policy_hash: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordAnonymized {
    pub batch_id: String,
    pub position: i64,
    pub source_format: String,
    pub record_type: String,
    pub patient_pseudonym: String,
    pub policy_version: String,
    pub key_id: String,
    pub content_json: String,
    pub fields_redacted: i64,
    #[serde(default)]
    pub policy_hash: Option<String>,
    #[serde(default)]
    pub report_json: Option<String>,
    /// The held batch this record's batch releases as partial.
    #[serde(default)]
    pub release_of: Option<String>,
    /// The batch this record's batch reprocesses.
    #[serde(default)]
    pub reprocess_of: Option<String>,
    /// The concept maps canonization must have loaded, for a reprocessing.
    #[serde(default)]
    pub expected_concept_maps: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnonymizationFinished {
    pub batch_id: String,
    pub upstream_records_emitted: i64,
    pub policy_version: String,
    #[serde(default)]
    pub records_anonymized: Option<i64>,
    #[serde(default)]
    pub records_dead_lettered: Option<i64>,
    #[serde(default)]
    pub policy_hash: Option<String>,
    /// The held batch this batch releases as partial.
    #[serde(default)]
    pub release_of: Option<String>,
}

/// Two patient records are one person (see the schema's doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatientMerged {
    pub batch_id: String,
    pub position: i64,
    pub source_format: String,
    pub record_type: String,
    pub surviving_pseudonym: String,
    pub merged_pseudonym: String,
    pub trigger: String,
    pub merged_record_has_link: bool,
    pub policy_version: String,
    pub key_id: String,
}

/// The compensation trigger of anonymization (see the schema's doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnonymizationFailed {
    pub batch_id: String,
    pub error_kind: String,
    pub reason: String,
    pub policy_version: String,
    pub records_anonymized: i64,
    pub records_dead_lettered: i64,
    #[serde(default)]
    pub policy_hash: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub source_format: String,
    pub batch_id: String,
    pub source_position: i64,
    pub policy_version: String,
    pub concept_map_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanonicalPatient {
    pub resource_id: String,
    pub patient_pseudonym: String,
    pub gender: Option<String>,
    pub birth_year: Option<i32>,
    pub fhir_json: String,
    pub provenance: Provenance,
}

/// One audit entry, published on the audit topic once it is durable in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntryRecorded {
    pub seq: i64,
    pub audited_event_type: String,
    pub audited_event_id: Option<String>,
    pub prev_hash: String,
    pub hash: String,
    /// The entry's exact canonical line in the store.
    pub entry_json: String,
}

/// A signed Merkle tree head over the first `tree_size` audit entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditCheckpoint {
    pub tree_size: i64,
    pub root_hex: String,
    pub timestamp_micros: i64,
    pub key_id: String,
    pub signature_hex: String,
    pub public_key_hex: String,
}

/// A compliance monitor fired. Locations and counts only, never values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComplianceAlert {
    pub alert_id: String,
    pub kind: String,
    pub batch_id: Option<String>,
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub detail: String,
    pub audit_seq: i64,
}

/// Canonization has seen a batch and will map its records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventDataCanonizationCreated {
    pub batch_id: String,
    pub policy_version: String,
    pub concept_map_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventDataCanonizationStarted {
    pub batch_id: String,
}

/// Every anonymized record of a batch was mapped, skipped as unsupported, or dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventDataCanonizationCompleted {
    pub batch_id: String,
    pub records_in: i64,
    pub resources_by_type: std::collections::BTreeMap<String, i64>,
    pub records_dead_lettered: i64,
    pub records_unsupported: i64,
    pub codes_unmapped: i64,
    pub concept_map_version: String,
}

/// The compensation trigger for analytics consumers: the batch is not whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanonizationFailed {
    pub batch_id: String,
    pub error_kind: String,
    pub reason: String,
    pub records_in: i64,
    pub records_dead_lettered: i64,
}

/// A failed batch's canonical records were withdrawn (see the schema's doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanonicalBatchWithdrawn {
    pub batch_id: String,
    pub trigger: String,
    pub reason: String,
    pub records_withdrawn: i64,
    pub withdrawn_by_type: std::collections::BTreeMap<String, i64>,
    pub records_kept: i64,
}

/// An operator asks for a new attempt of a batch (see the schema's doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRetryRequested {
    pub batch_id: String,
    pub request_id: String,
    pub requested_by: String,
    pub reason: String,
}

/// An operator withdraws a batch (see the schema's doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchWithdrawalRequested {
    pub batch_id: String,
    pub request_id: String,
    pub requested_by: String,
    pub reason: String,
}

/// Ingestion started a new attempt of a batch from its archive (see the schema's doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRetried {
    pub batch_id: String,
    pub new_batch_id: String,
    pub request_id: String,
    pub file_sha256: String,
    /// `retry` or `release`.
    pub mode: String,
}

/// An operator accepts a held batch as partial (see the schema's doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchReleaseRequested {
    pub batch_id: String,
    pub request_id: String,
    pub requested_by: String,
    pub reason: String,
}

/// An operator asks for a batch to run again under new versions (see the schema's doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchReprocessRequested {
    pub batch_id: String,
    pub request_id: String,
    pub requested_by: String,
    pub reason: String,
    #[serde(default)]
    pub policy_version: Option<String>,
    #[serde(default)]
    pub concept_map_version: Option<String>,
}

/// Canonization completed a reprocessing (see the schema's doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchReprocessed {
    pub batch_id: String,
    pub new_batch_id: String,
    pub policy_version: String,
    pub concept_map_version: String,
    pub records_published: i64,
}

/// Canonization published the release of a held batch (see the schema's doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchReleased {
    pub batch_id: String,
    pub new_batch_id: String,
    pub records_published: i64,
    pub records_left_out: i64,
}

/// A stage holds a batch that a step failed or that stalled (see the schema's doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHeld {
    pub batch_id: String,
    pub stage: String,
    pub failed_step: String,
    pub reason_kind: String,
    pub reason: String,
    pub records_forwarded: i64,
}

/// A code in some system: `{system, code, display}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Code {
    pub system: Option<String>,
    pub code: Option<String>,
    pub display: Option<String>,
}

/// One canonical record of any type but Patient: the typed fields every type shares, the
/// type's own `details`, the full FHIR resource and provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanonicalRecord<D> {
    pub resource_id: String,
    pub patient_pseudonym: String,
    pub patient_id: String,
    pub encounter_id: Option<String>,
    pub status: Option<String>,
    pub code: Option<Code>,
    /// `standard`, `mapped`, `unmapped` or `none`.
    pub code_status: String,
    pub original_code: Option<Code>,
    pub effective: Option<String>,
    pub details: D,
    pub fhir_json: String,
    pub provenance: Provenance,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EncounterDetails {
    pub class_code: Option<String>,
    pub period_start: Option<String>,
    pub period_end: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ObservationDetails {
    pub category: Option<String>,
    pub value_number: Option<f64>,
    pub value_unit: Option<String>,
    pub value_string: Option<String>,
    pub value_code: Option<Code>,
    pub original_value: Option<f64>,
    pub original_unit: Option<String>,
    pub unit_status: Option<String>,
    pub interpretation: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConditionDetails {
    pub clinical_status: Option<String>,
    pub abatement: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MedicationRequestDetails {
    pub intent: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcedureDetails {
    pub performed_end: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiagnosticReportDetails {
    pub category: Option<String>,
    pub result_ids: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AllergyIntoleranceDetails {
    pub criticality: Option<String>,
    pub category: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImmunizationDetails {
    pub primary_source: Option<bool>,
}

/// One canonical record of a resource that many patients share (a practitioner, an
/// organisation, a location, a medication, a device): no patient fields, keyed by its own
/// canonical id, which patient records reference. Its id depends on its (pseudonymized)
/// source id only, so every record that references it finds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanonicalSharedRecord {
    pub resource_id: String,
    /// `active` or `status`, as the type has it (`true`/`false` for `active`).
    pub status: Option<String>,
    /// The type's main code (Medication.code, Device.type, a role's or a place's first
    /// type), when it has one.
    pub code: Option<Code>,
    pub fhir_json: String,
    pub provenance: Provenance,
}

impl<D> CanonicalRecord<D> {
    fn shared(&self) -> (&str, &str, &Provenance) {
        (&self.patient_pseudonym, &self.fhir_json, &self.provenance)
    }
}

impl CanonicalSharedRecord {
    fn shared(&self) -> (&str, &str, &Provenance) {
        (&self.resource_id, &self.fhir_json, &self.provenance)
    }
}

impl Payload {
    /// For a canonical record of any type: its key (the patient pseudonym, or a shared
    /// resource's own canonical id), FHIR JSON and provenance.
    pub fn canonical(&self) -> Option<(&str, &str, &Provenance)> {
        match self {
            Payload::CanonicalPatient(c) => {
                Some((&c.patient_pseudonym, &c.fhir_json, &c.provenance))
            }
            Payload::CanonicalEncounter(c) => Some(c.shared()),
            Payload::CanonicalObservation(c) => Some(c.shared()),
            Payload::CanonicalCondition(c) => Some(c.shared()),
            Payload::CanonicalMedicationRequest(c) => Some(c.shared()),
            Payload::CanonicalProcedure(c) => Some(c.shared()),
            Payload::CanonicalDiagnosticReport(c) => Some(c.shared()),
            Payload::CanonicalAllergyIntolerance(c) => Some(c.shared()),
            Payload::CanonicalImmunization(c) => Some(c.shared()),
            Payload::CanonicalPractitioner(c)
            | Payload::CanonicalPractitionerRole(c)
            | Payload::CanonicalOrganization(c)
            | Payload::CanonicalLocation(c)
            | Payload::CanonicalMedication(c)
            | Payload::CanonicalDevice(c) => Some(c.shared()),
            _ => None,
        }
    }
}

pub type CanonicalPractitioner = CanonicalSharedRecord;
pub type CanonicalPractitionerRole = CanonicalSharedRecord;
pub type CanonicalOrganization = CanonicalSharedRecord;
pub type CanonicalLocation = CanonicalSharedRecord;
pub type CanonicalMedication = CanonicalSharedRecord;
pub type CanonicalDevice = CanonicalSharedRecord;

pub type CanonicalEncounter = CanonicalRecord<EncounterDetails>;
pub type CanonicalObservation = CanonicalRecord<ObservationDetails>;
pub type CanonicalCondition = CanonicalRecord<ConditionDetails>;
pub type CanonicalMedicationRequest = CanonicalRecord<MedicationRequestDetails>;
pub type CanonicalProcedure = CanonicalRecord<ProcedureDetails>;
pub type CanonicalDiagnosticReport = CanonicalRecord<DiagnosticReportDetails>;
pub type CanonicalAllergyIntolerance = CanonicalRecord<AllergyIntoleranceDetails>;
pub type CanonicalImmunization = CanonicalRecord<ImmunizationDetails>;

/// The clear-text body of a `SourceRecordIngested`, as sealed by ingestion and opened by
/// anonymization. It holds PHI and exists in clear only inside those two processes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRecordBody {
    /// The patient link as found in the source (MRN, Patient id or PID-3), if any.
    pub patient_link: Option<String>,
    /// Structured content: column name → value for CSV, the resource for FHIR, and so on.
    pub content: serde_json::Value,
    /// The record's original text.
    pub original: String,
}

impl SourceRecordIngested {
    /// Additional authenticated data binding a sealed body to its batch and position.
    pub fn aad(batch_id: &str, position: i64) -> Vec<u8> {
        format!("{batch_id}:{position}").into_bytes()
    }
}
