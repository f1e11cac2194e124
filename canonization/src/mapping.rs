//! Maps one de-identified record (FHIR, Synthea CSV or HL7 v2) to canonical FHIR R4 resources.
//!
//! [`map_record`] is pure: no IO, no clock, no randomness. The same input gives the same
//! resources with the same ids on every replay, which is what lets the stage publish with
//! upsert semantics and lets a re-run of a batch overwrite rather than duplicate.
//!
//! # Ids
//!
//! Every resource id is [`resource_id`]`(type, patient pseudonym, source identity)`, a
//! UUID v5. The source identity is what identifies the record in its source:
//!
//! | source | source identity |
//! |---|---|
//! | FHIR | the resource's own (pseudonymized) id, else its entry's `fullUrl` id, else a digest of its content |
//! | Synthea CSV | the `Id` column (patients, encounters), else the row's identifying columns (`data/synthea.toml`) |
//! | HL7 v2 | the visit number (PV1-19), the filler/placer order number (OBR-3/OBR-2) with the OBR-4 code, then OBX set ids; else message control id + segment position |
//!
//! A shared resource (a practitioner, an organisation, a location, a medication, a device)
//! belongs to no patient: its id is [`shared_id`]`(type, source identity)`, the same from
//! every record that references it.
//!
//! A Patient's id is always `resource_id(ResourceType::Patient, pseudonym, "")`: one Patient per
//! patient, whatever the source. References use the same scheme, so an Observation's
//! `encounter` points at exactly the id the Encounter's own mapping produces, across
//! formats too (Synthea's CSV `Id` and its FHIR resource ids are the same value, and both
//! are pseudonymized alike).
//!
//! # Validity
//!
//! Every resource goes through one `finish` step (in `mapping/finish.rs`, driven by
//! `data/fhir.toml` and `data/fhir-r4-structure.json`, the latter extracted from the R4
//! JSON schema) that prunes what R4 forbids (unknown elements, wrong shapes, invalid
//! primitives, codes outside required value sets, `instant`s cut to a year) and supplies
//! the R4 "unknown" value of a required element the source lacks. Where R4 has no such
//! value (Immunization.status, MedicationRequest.intent) the record is rejected instead.
//! Outputs are checked against the official R4 JSON schema in development (see
//! tests/properties.rs, `dump_outputs_for_schema_validation`).
//!
//! Error reasons name fields, columns, segments and positions, never values.

mod csv;
mod datatypes;
mod fhir;
mod finish;
mod hl7;
mod invariants;
mod structure;
mod tables;

use pipeline::formats::{Family, SourceFormat};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

pub use invariants::REPAIR_TAG_SYSTEM;
pub use pipeline::ResourceType;
pub use tables::{Tables, TablesError};

/// Namespace for deterministic resource ids (UUID v5), fixed forever. Must stay equal to
/// the one in the canonization crate's `resource_id`.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6d65_6470_6970_6545_8000_0000_0000_0001);

/// The deterministic id of a resource: the same inputs give the same id on every replay.
pub fn resource_id(resource_type: ResourceType, pseudonym: &str, source_identity: &str) -> String {
    Uuid::new_v5(
        &ID_NAMESPACE,
        format!(
            "{}|{pseudonym}|{source_identity}",
            resource_type.fhir_name()
        )
        .as_bytes(),
    )
    .to_string()
}

/// The id of a resource many patients share ([`ResourceType::is_shared`]): its source id
/// alone, with no patient in it, so every record that references it finds it.
pub fn shared_id(resource_type: ResourceType, source_identity: &str) -> String {
    resource_id(resource_type, "", source_identity)
}

/// The id of the one canonical Patient of a pseudonym.
pub fn patient_id(pseudonym: &str) -> String {
    resource_id(ResourceType::Patient, pseudonym, "")
}

/// One de-identified record, as carried by `RecordAnonymized`.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub source_format: &'a str,
    pub record_type: &'a str,
    pub patient_pseudonym: &'a str,
    /// The de-identified content (`content_json`, parsed).
    pub content: &'a Value,
    /// Not used for mapping (ids must not depend on where a record sat in a batch); kept so
    /// callers can pass the whole record and errors can be placed.
    pub batch_id: &'a str,
    pub position: i64,
}

/// One canonical resource.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mapped {
    pub resource_type: ResourceType,
    pub resource_id: String,
    /// The FHIR R4 resource, `id` equal to `resource_id`.
    pub resource: Value,
}

/// Why a record has no canonical form. Reasons never contain record values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// A record type (FHIR resource type, CSV record type, HL7 message type) outside the
    /// canonical model.
    #[error("no canonical mapping for record type {record_type}")]
    Unsupported { record_type: String },
    /// The record cannot be mapped to valid FHIR; the reason names the field or position.
    #[error("record cannot be mapped: {reason}")]
    Invalid { reason: String },
}

impl MapError {
    /// The dead-letter `error_type` (both kinds are permanent: replaying cannot help).
    pub fn error_type(&self) -> &'static str {
        match self {
            MapError::Unsupported { .. } => "unsupported_record_type",
            MapError::Invalid { .. } => "mapping",
        }
    }

    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        MapError::Invalid {
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(record_type: &str) -> Self {
        MapError::Unsupported {
            record_type: record_type.to_owned(),
        }
    }
}

/// Maps one de-identified record to its canonical resources: one for FHIR and CSV records,
/// Patient + Encounter for an HL7 ADT message, DiagnosticReports + Observations for ORU.
pub fn map_record(tables: &Tables, input: &Input<'_>) -> Result<Vec<Mapped>, MapError> {
    let shared = ResourceType::parse(input.record_type).is_some_and(ResourceType::is_shared);
    if input.patient_pseudonym.is_empty() && !shared {
        return Err(MapError::invalid("the record has no patient pseudonym"));
    }
    let format = SourceFormat::parse(input.source_format).ok_or_else(|| {
        MapError::invalid("unknown source_format (expected csv, fhir-ndjson, fhir-bundle or hl7v2)")
    })?;
    let resources = match format.family() {
        Family::Fhir => vec![fhir::map(input, tables)?],
        Family::Csv => vec![csv::map(input, tables)?],
        Family::Hl7 => hl7::map(input, tables)?,
    };
    resources
        .into_iter()
        .map(|(resource_type, resource_id, resource)| {
            let resource = finish::finish(
                tables,
                resource_type,
                &resource_id,
                input.patient_pseudonym,
                resource,
            )?;
            Ok(Mapped {
                resource_type,
                resource_id,
                resource,
            })
        })
        .collect()
}

/// A resource as a format mapper hands it to `finish`: type, id, draft resource.
type Draft = (ResourceType, String, Value);

/// The canonical type a FHIR resource type name names, or `None` for any other type.
fn canonical_type(name: &str) -> Option<ResourceType> {
    ResourceType::parse(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_ids_keep_the_canonization_scheme() {
        // Pinned: a change here would re-key every published resource.
        assert_eq!(
            resource_id(ResourceType::Patient, "abc", ""),
            Uuid::new_v5(&ID_NAMESPACE, b"Patient|abc|").to_string()
        );
        assert_eq!(
            resource_id(ResourceType::Patient, "abc", ""),
            "f188ebb5-8388-55dd-86da-9bd78c19898f"
        );
        assert_ne!(
            resource_id(ResourceType::Encounter, "abc", "x"),
            resource_id(ResourceType::Observation, "abc", "x")
        );
        assert_eq!(
            patient_id("abc"),
            resource_id(ResourceType::Patient, "abc", "")
        );
    }
}
