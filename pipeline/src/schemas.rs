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

    #[test]
    fn event_type_names_are_unique() {
        let mut names: Vec<_> = CATALOGUE.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CATALOGUE.len());
    }
}
