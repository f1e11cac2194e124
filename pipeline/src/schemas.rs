//! Composes each event's registered Avro schema from `schemas/envelope.avsc` and the
//! event's payload schema, so the envelope is written once.

use serde_json::{json, Value};

use crate::error::PipelineError;
use crate::events::{EventSpec, CATALOGUE};

const ENVELOPE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../schemas/envelope.avsc"
));

/// The full schema of one event type, as registered in the Schema Registry.
pub fn event_schema(spec: &EventSpec) -> Result<String, PipelineError> {
    let bad = |file: &str, message: String| PipelineError::Schema {
        file: file.to_string(),
        message,
    };
    let envelope: Value =
        serde_json::from_str(ENVELOPE).map_err(|e| bad("envelope.avsc", e.to_string()))?;
    let payload: Value =
        serde_json::from_str(spec.payload_schema).map_err(|e| bad(spec.file, e.to_string()))?;
    let mut fields = envelope
        .get("fields")
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| bad("envelope.avsc", "has no fields array".into()))?;
    fields.push(json!({ "name": "payload", "type": payload }));
    let schema = json!({
        "type": "record",
        "name": spec.name,
        "namespace": spec.namespace,
        "doc": format!("medpipe event {} (schema version {}).", spec.name, spec.version),
        "fields": fields,
    });
    // Parse it once here so a broken schema file fails at start-up, not at first send.
    apache_avro::Schema::parse_str(&schema.to_string())
        .map_err(|e| bad(spec.file, e.to_string()))?;
    Ok(schema.to_string())
}

/// Looks an event type up by its record name.
pub fn spec(event_type: &str) -> Option<&'static EventSpec> {
    CATALOGUE.iter().find(|s| s.name == event_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_catalogued_schema_composes_and_parses() {
        for spec in CATALOGUE {
            let s = event_schema(spec).unwrap_or_else(|e| panic!("{}: {e}", spec.name));
            let parsed = apache_avro::Schema::parse_str(&s).expect("parses");
            match parsed {
                apache_avro::Schema::Record(r) => {
                    assert_eq!(r.name.fullname(None), spec.full_name());
                    assert_eq!(r.fields.last().map(|f| f.name.as_str()), Some("payload"));
                }
                other => panic!("{} is not a record: {other:?}", spec.name),
            }
        }
    }

    use crate::events::{
        self, erased::ErasedWire, CanonicalPatient, Event, Payload, Provenance, SealedPayload,
        SourceRecordIngested,
    };
    use apache_avro::schema_compatibility::SchemaCompatibility;
    use apache_avro::Schema;
    use std::collections::BTreeMap;

    const RELEASED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/released.json");

    /// Encodes with the composed schema and decodes again, without a registry.
    fn round_trip(event: &Event) -> Event {
        let spec = spec(event.event_type()).expect("catalogued");
        let schema = Schema::parse_str(&event_schema(spec).expect("schema")).expect("parses");
        let value =
            events::with_wire(event, |w: &dyn ErasedWire| w.to_avro_value()).expect("to value");
        let bytes = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .expect("writer")
            .write_value_to_vec(value)
            .expect("encodes against its schema");
        let back = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .expect("reader")
            .read_value(&mut bytes.as_slice())
            .expect("decodes");
        events::from_avro(spec.name, back).expect("maps back")
    }

    #[test]
    fn events_round_trip_through_their_avro_schemas() {
        let sealed = Event::new(
            "s",
            "b",
            Some("c"),
            Payload::SourceRecordIngested(SourceRecordIngested {
                batch_id: "b".into(),
                position: 9,
                source_format: "csv".into(),
                record_type: "Patient".into(),
                sealed: SealedPayload {
                    key_id: "k".into(),
                    wrapped_key: vec![0, 1, 255],
                    nonce: vec![7; 12],
                    ciphertext: vec![],
                },
            }),
        );
        assert_eq!(round_trip(&sealed), sealed);
        let patient = Event::new(
            "s",
            "b",
            None,
            Payload::CanonicalPatient(CanonicalPatient {
                resource_id: "r".into(),
                patient_pseudonym: "p".into(),
                gender: None,
                birth_year: Some(1970),
                fhir_json: "{}".into(),
                provenance: Provenance {
                    source_format: "csv".into(),
                    batch_id: "b".into(),
                    source_position: 1,
                    policy_version: "v".into(),
                    concept_map_version: "m".into(),
                },
            }),
        );
        assert_eq!(round_trip(&patient), patient);
    }

    /// Every schema must stay readable by the readers of its released version, and read
    /// data the released version wrote. `MEDPIPE_BLESS_SCHEMAS=1` records a new release.
    #[test]
    fn schemas_stay_compatible_with_the_released_snapshot() {
        let current: BTreeMap<String, serde_json::Value> = CATALOGUE
            .iter()
            .map(|s| {
                (
                    s.name.to_string(),
                    serde_json::from_str(&event_schema(s).expect("schema")).expect("json"),
                )
            })
            .collect();
        if std::env::var_os("MEDPIPE_BLESS_SCHEMAS").is_some() {
            let text = serde_json::to_string_pretty(&current).expect("json");
            std::fs::write(RELEASED, text + "\n").expect("write released.json");
            return;
        }
        let released: BTreeMap<String, serde_json::Value> = serde_json::from_str(
            &std::fs::read_to_string(RELEASED).expect("schemas/released.json exists"),
        )
        .expect("json");
        for (name, old) in &released {
            let new = current
                .get(name)
                .unwrap_or_else(|| panic!("{name} was released and must not be removed"));
            let old = Schema::parse_str(&old.to_string()).expect("released schema parses");
            let new = Schema::parse_str(&new.to_string()).expect("schema parses");
            SchemaCompatibility::mutual_read(&old, &new).unwrap_or_else(|e| {
                panic!("{name} is not compatible with its released version: {e}")
            });
        }
        for name in current.keys() {
            assert!(released.contains_key(name), "{name} is new: record it with MEDPIPE_BLESS_SCHEMAS=1 cargo test -p pipeline schemas");
        }
    }

    #[test]
    fn the_compatibility_check_rejects_a_field_added_without_default() {
        let spec = spec("DataIngestionStarted").expect("spec");
        let old = Schema::parse_str(&event_schema(spec).expect("schema")).expect("parses");
        let mut v: serde_json::Value =
            serde_json::from_str(&event_schema(spec).expect("schema")).expect("json");
        v["fields"]
            .as_array_mut()
            .expect("fields")
            .push(serde_json::json!({"name": "extra", "type": "string"}));
        let new = Schema::parse_str(&v.to_string()).expect("parses");
        assert!(SchemaCompatibility::mutual_read(&old, &new).is_err());
        v["fields"]
            .as_array_mut()
            .expect("fields")
            .last_mut()
            .expect("last")["default"] = serde_json::json!("");
        let new = Schema::parse_str(&v.to_string()).expect("parses");
        assert!(SchemaCompatibility::mutual_read(&old, &new).is_ok());
    }

    #[test]
    fn event_type_names_are_unique() {
        let mut names: Vec<_> = CATALOGUE.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CATALOGUE.len());
    }
}
