//! FHIR pass-through: a de-identified R4 resource (an NDJSON line, or a Bundle entry's
//! `resource`) keeps its content and gets canonical ids and references.
//!
//! References are rewritten by what their text says:
//! - to one of the canonical types (`Encounter/x`, an absolute URL ending in it, or
//!   `urn:uuid:x` with a `type`): `Type/<resource_id(Type, pseudonym, x)>`, the id that
//!   type's own mapping gives the resource with id `x`; to a shared type (Practitioner,
//!   Organization, Location, ...), `Type/<shared_id(Type, x)>`, which has no patient in it;
//! - to a Patient: `Patient/<patient_id(x)>` (the referenced id *is* a patient pseudonym:
//!   de-identification pseudonymizes Patient ids and patient links alike); a bare
//!   `urn:uuid:` equal to the record's pseudonym is read as its Patient;
//! - anything else (a type outside the canonical model, a contained `#x`, an unresolvable
//!   `urn:uuid:`, a conditional `Type?identifier=...` reference) is removed: the reference
//!   would dangle. Backbone elements left without their required reference go
//!   too (`[[constraint]]` in data/fhir.toml and the schema's required elements).

use serde_json::{Map, Value};

use super::datatypes::{digest, reference};
use super::tables::Tables;
use super::{canonical_type, patient_id, resource_id, shared_id, Draft, Input, MapError};
use pipeline::ResourceType;

pub(crate) fn map(input: &Input<'_>, tables: &Tables) -> Result<Draft, MapError> {
    let content = input.content;
    // A Bundle entry is `{fullUrl, request?, resource}`; an NDJSON line is the resource.
    let (resource, full_url) = match content.get("resource") {
        Some(resource) if content.get("resourceType").is_none() => {
            (resource, content.get("fullUrl").and_then(Value::as_str))
        }
        _ => (content, None),
    };
    let Some(fields) = resource.as_object() else {
        return Err(MapError::invalid("the resource is not a JSON object"));
    };
    let Some(declared) = fields.get("resourceType").and_then(Value::as_str) else {
        return Err(MapError::invalid("the resource has no string resourceType"));
    };
    if declared != input.record_type {
        return Err(MapError::invalid(
            "the resource's resourceType differs from the record's record_type",
        ));
    }
    let resource_type = canonical_type(declared).ok_or_else(|| MapError::unsupported(declared))?;

    let pseudonym = input.patient_pseudonym;
    let id = if resource_type == ResourceType::Patient {
        patient_id(pseudonym)
    } else {
        let own = fields
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.trim().is_empty());
        // A shared resource created under a condition (a transaction entry's
        // `request.ifNoneExist`, pseudonymized) is known by it: Synthea references its
        // practitioners, organisations and locations by that condition only.
        let condition = content
            .get("request")
            .and_then(|r| r.get("ifNoneExist"))
            .and_then(Value::as_str)
            .filter(|c| resource_type.is_shared() && !c.trim().is_empty());
        let identity = match (condition, own, full_url.and_then(id_in_url)) {
            (Some(c), _, _) => c.to_owned(),
            (None, Some(id), _) => id.to_owned(),
            (None, None, Some(id)) => id,
            (None, None, None) => digest(resource),
        };
        if resource_type.is_shared() {
            shared_id(resource_type, &identity)
        } else {
            resource_id(resource_type, pseudonym, &identity)
        }
    };

    let mut draft = resource.clone();
    let rewriter = Rewriter {
        tables,
        resource_type: resource_type.fhir_name(),
        pseudonym,
    };
    rewriter.rewrite(&mut draft, "");
    Ok((resource_type, id, draft))
}

/// The id in a `fullUrl` or reference: `urn:uuid:<id>`, or the last segment of a URL
/// (after dropping `_history`, query and fragment).
fn id_in_url(url: &str) -> Option<String> {
    parse_reference(url).map(|(_, id)| id)
}

/// A reference text → (type as written, id). `urn:uuid:` gives no type.
fn parse_reference(text: &str) -> Option<(Option<String>, String)> {
    let text = text.trim();
    if let Some(uuid) = text.strip_prefix("urn:uuid:") {
        return (!uuid.is_empty()).then(|| (None, uuid.to_owned()));
    }
    if text.starts_with('#') || text.starts_with("urn:") {
        return None;
    }
    let path = text.split(['?', '#']).next().unwrap_or_default();
    let path = path.split_once("/_history/").map_or(path, |(p, _)| p);
    let mut segments = path.rsplit('/').filter(|s| !s.is_empty());
    let id = segments.next()?.to_owned();
    let kind = segments.next().filter(|t| {
        t.starts_with(|c: char| c.is_ascii_uppercase())
            && t.chars().all(|c| c.is_ascii_alphanumeric())
    });
    Some((kind.map(str::to_owned), id))
}

/// Rewrites the references of one resource.
struct Rewriter<'a> {
    tables: &'a Tables,
    resource_type: &'static str,
    pseudonym: &'a str,
}

impl Rewriter<'_> {
    /// The canonical reference for a Reference object at `path`, or `None` to remove it.
    fn canonical(&self, r: &Map<String, Value>, path: &str) -> Option<Value> {
        let text = r.get("reference")?.as_str()?;
        let (written, id) = parse_reference(text)?;
        let declared = r.get("type").and_then(Value::as_str);
        let implied = self.tables.fhir.reference_target(self.resource_type, path);
        let kind = match (written, declared, implied) {
            (Some(t), _, _) => t,
            (None, Some(t), _) => t.to_owned(),
            (None, None, Some(t)) => t.to_owned(),
            (None, None, None) if id == self.pseudonym => "Patient".to_owned(),
            (None, None, None) => return None,
        };
        let kind = canonical_type(&kind)?;
        let target = if kind == ResourceType::Patient {
            patient_id(&id)
        } else if kind.is_shared() {
            shared_id(kind, &id)
        } else {
            resource_id(kind, self.pseudonym, &id)
        };
        Some(reference(kind, &target))
    }

    /// Rewrites every Reference (an object with a `reference`) below `value`, whose
    /// element path is `path`, removing those that cannot point at a canonical resource.
    fn rewrite(&self, value: &mut Value, path: &str) {
        let is_reference = |v: &Value| v.as_object().is_some_and(|m| m.contains_key("reference"));
        match value {
            Value::Object(map) => {
                let keys: Vec<String> = map.keys().cloned().collect();
                for key in keys {
                    let child_path = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    let Some(child) = map.get_mut(&key) else {
                        continue;
                    };
                    if is_reference(child) {
                        match child
                            .as_object()
                            .and_then(|r| self.canonical(r, &child_path))
                        {
                            Some(new) => *child = new,
                            None => {
                                map.remove(&key);
                            }
                        }
                    } else {
                        self.rewrite(child, &child_path);
                    }
                }
            }
            Value::Array(items) => {
                items.retain_mut(|item| {
                    if !is_reference(item) {
                        self.rewrite(item, path);
                        return true;
                    }
                    match item.as_object().and_then(|r| self.canonical(r, path)) {
                        Some(new) => {
                            *item = new;
                            true
                        }
                        None => false,
                    }
                });
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_are_read_from_their_text() {
        let cases = [
            ("Encounter/abc", Some((Some("Encounter"), "abc"))),
            (
                "https://x/fhir/Encounter/abc/_history/2",
                Some((Some("Encounter"), "abc")),
            ),
            ("Encounter/abc?x=1", Some((Some("Encounter"), "abc"))),
            ("urn:uuid:abc", Some((None, "abc"))),
            ("#p1", None),
            ("urn:oid:1.2.3", None),
            ("", None),
        ];
        for (text, want) in cases {
            let got = parse_reference(text);
            let got = got.as_ref().map(|(t, id)| (t.as_deref(), id.as_str()));
            assert_eq!(got, want, "{text}");
        }
    }

    #[test]
    fn references_point_at_canonical_ids_or_go() {
        let Ok(tables) = crate::mapping::Tables::embedded() else {
            panic!("tables")
        };
        let rewriter = Rewriter {
            tables,
            resource_type: "Observation",
            pseudonym: "pseudo",
        };
        let mut v = json!({
            "encounter": {"reference": "Encounter/e1", "display": "x"},
            "performer": [{"reference": "Practitioner/p"}, {"reference": "urn:uuid:o", "type": "Observation"}],
            "subject": {"reference": "urn:uuid:pseudo"},
            "location": [{"location": {"reference": "Location/l"}, "status": "active"}],
            "partOf": [{"reference": "#c"}],
            "hasMember": [{"reference": "urn:uuid:m"}],
            "basedOn": [{"reference": "Practitioner?identifier=x|1"}],
        });
        rewriter.rewrite(&mut v, "");
        let enc = resource_id(ResourceType::Encounter, "pseudo", "e1");
        let mut typed_by_element = json!({"encounter": {"reference": "urn:uuid:e1"}});
        rewriter.rewrite(&mut typed_by_element, "");
        assert_eq!(
            typed_by_element,
            json!({"encounter": {"reference": format!("Encounter/{enc}")}})
        );
        let obs = resource_id(ResourceType::Observation, "pseudo", "o");
        assert_eq!(
            v,
            json!({
                "encounter": {"reference": format!("Encounter/{enc}")},
                "performer": [
                    {"reference": format!("Practitioner/{}", shared_id(ResourceType::Practitioner, "p"))},
                    {"reference": format!("Observation/{obs}")},
                ],
                "subject": {"reference": format!("Patient/{}", patient_id("pseudo"))},
                "location": [{"location": {"reference": format!("Location/{}", shared_id(ResourceType::Location, "l"))}, "status": "active"}],
                "partOf": [],
                "hasMember": [],
                "basedOn": [],
            })
        );
        // A shared resource's id has no patient in it: the same from every patient.
        assert_eq!(
            shared_id(ResourceType::Practitioner, "p"),
            resource_id(ResourceType::Practitioner, "", "p")
        );
        assert_ne!(
            shared_id(ResourceType::Practitioner, "p"),
            resource_id(ResourceType::Practitioner, "pseudo", "p")
        );
    }
}
