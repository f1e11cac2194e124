//! R4 structure conformance: prunes a resource to what the FHIR R4 JSON schema allows,
//! driven by `data/fhir-r4-structure.json` (the schema's definitions for every R4 type
//! and every data type and backbone element they reach).
//!
//! FHIR input passes through mostly unchanged, and neither ingestion nor de-identification
//! checks it against R4: a source may have an element R4 does not define, a list where one
//! value belongs, a code outside its required value set, a date that is no date. Instead
//! of publishing that (and failing every consumer's validator), each element is checked
//! against its type: unknown elements and wrong shapes are removed, a lone value where a
//! list belongs is wrapped, primitives are normalized where that keeps their meaning
//! (a dateTime with a time but no zone is cut to its date, whitespace in a code is
//! collapsed) and removed otherwise, and an object that loses a required child goes with
//! it. The rules of `[[constraint]]` in data/fhir.toml (required primitives and
//! invariants the schema cannot express) are applied at the same time.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::datatypes::{code, is_fhir_space, is_instant, iso_date, iso_date_time};
use super::tables::Constraint;

/// How the value of one property is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Primitive(Primitive),
    Complex(String),
    Enum(Vec<String>),
    Const(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Primitive {
    String,
    Code,
    Id,
    Uri,
    Oid,
    Uuid,
    Base64Binary,
    Boolean,
    Integer,
    PositiveInt,
    UnsignedInt,
    Decimal,
    Date,
    DateTime,
    Instant,
    Time,
}

impl Primitive {
    fn named(name: &str) -> Option<Primitive> {
        Some(match name {
            "string" | "markdown" | "xhtml" => Primitive::String,
            "code" => Primitive::Code,
            "id" => Primitive::Id,
            "uri" | "url" | "canonical" => Primitive::Uri,
            "oid" => Primitive::Oid,
            "uuid" => Primitive::Uuid,
            "base64Binary" => Primitive::Base64Binary,
            "boolean" => Primitive::Boolean,
            "integer" => Primitive::Integer,
            "positiveInt" => Primitive::PositiveInt,
            "unsignedInt" => Primitive::UnsignedInt,
            "decimal" => Primitive::Decimal,
            "date" => Primitive::Date,
            "dateTime" => Primitive::DateTime,
            "instant" => Primitive::Instant,
            "time" => Primitive::Time,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
struct Property {
    list: bool,
    kind: Kind,
}

#[derive(Debug, Clone, Default)]
struct Definition {
    properties: BTreeMap<String, Property>,
    required: Vec<String>,
}

/// The R4 structure of the canonical types.
#[derive(Debug, Clone, Default)]
pub(crate) struct Structure {
    definitions: BTreeMap<String, Definition>,
    constraints: BTreeMap<String, Vec<Constraint>>,
}

impl Structure {
    /// Reads data/fhir-r4-structure.json; `constraints` come from data/fhir.toml.
    pub(crate) fn parse(json: &str, constraints: &[Constraint]) -> Result<Structure, String> {
        let root: Map<String, Value> =
            serde_json::from_str(json).map_err(|e| format!("not a JSON object: {e}"))?;
        let mut definitions = BTreeMap::new();
        for (name, props) in root.iter().filter(|(k, _)| !k.starts_with('$')) {
            let props = props
                .as_object()
                .ok_or_else(|| format!("{name} is not an object"))?;
            let mut def = Definition::default();
            for (key, spec) in props {
                if key == "$required" {
                    def.required = spec
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(Value::as_str)
                                .map(str::to_owned)
                                .collect()
                        })
                        .unwrap_or_default();
                    continue;
                }
                let spec = spec
                    .as_str()
                    .ok_or_else(|| format!("{name}.{key}: type is not a string"))?;
                let (list, base) = match spec.strip_prefix('[') {
                    Some(rest) => (true, rest),
                    None => (false, spec),
                };
                let kind = if let Some(codes) = base.strip_prefix("enum:") {
                    Kind::Enum(codes.split('|').map(str::to_owned).collect())
                } else if let Some(c) = base.strip_prefix("const:") {
                    Kind::Const(c.to_owned())
                } else if let Some(p) = Primitive::named(base) {
                    Kind::Primitive(p)
                } else if base.starts_with(|c: char| c.is_ascii_uppercase()) {
                    Kind::Complex(base.to_owned())
                } else {
                    return Err(format!("{name}.{key}: unknown type {base}"));
                };
                def.properties.insert(key.clone(), Property { list, kind });
            }
            definitions.insert(name.clone(), def);
        }
        for def in definitions.values() {
            for p in def.properties.values() {
                if let Kind::Complex(target) = &p.kind {
                    if !definitions.contains_key(target) && target != "ResourceList" {
                        return Err(format!("no definition {target}"));
                    }
                }
            }
        }
        let mut by_definition: BTreeMap<String, Vec<Constraint>> = BTreeMap::new();
        for c in constraints {
            if !definitions.contains_key(&c.definition) {
                return Err(format!("constraint on unknown definition {}", c.definition));
            }
            by_definition
                .entry(c.definition.clone())
                .or_default()
                .push(c.clone());
        }
        Ok(Structure {
            definitions,
            constraints: by_definition,
        })
    }

    pub(crate) fn has(&self, definition: &str) -> bool {
        self.definitions.contains_key(definition)
    }

    /// The required value set of `definition.property`, when the schema enumerates it.
    #[cfg(test)]
    pub(crate) fn enum_codes(&self, definition: &str, property: &str) -> Option<Vec<String>> {
        match &self
            .definitions
            .get(definition)?
            .properties
            .get(property)?
            .kind
        {
            Kind::Enum(codes) => Some(codes.clone()),
            _ => None,
        }
    }

    /// Prunes a resource of type `resource_type` in place. The root is never removed,
    /// whatever it lacks: required root elements are the caller's business.
    pub(crate) fn conform_resource(&self, resource: &mut Map<String, Value>, resource_type: &str) {
        if let Some(def) = self.definitions.get(resource_type) {
            self.conform_object(resource, resource_type, def);
        }
    }

    /// Returns whether the object is still a valid, non-empty instance of `name`.
    fn conform_object(&self, map: &mut Map<String, Value>, name: &str, def: &Definition) -> bool {
        let keys: Vec<String> = map.keys().cloned().collect();
        for key in keys {
            let keep = match map.get_mut(&key) {
                Some(value) => self.conform_property(def, &key, value),
                None => false,
            };
            if !keep {
                map.remove(&key);
            }
        }
        let required_ok = def.required.iter().all(|r| map.contains_key(r));
        let constraints_ok = self.constraints.get(name).is_none_or(|cs| {
            cs.iter().all(|c| {
                c.all_of.iter().all(|k| map.contains_key(k))
                    && (c.any_of.is_empty() || c.any_of.iter().any(|k| map.contains_key(k)))
            })
        });
        let extension_ok = name != "Extension" || valid_extension(map);
        required_ok && constraints_ok && extension_ok && !map.is_empty()
    }

    fn conform_property(&self, def: &Definition, key: &str, value: &mut Value) -> bool {
        // `_x`: the id/extensions of primitive `x`. Kept for single primitives only (a list
        // of them needs nulls to stay aligned, which the schema does not allow).
        if let Some(base) = key.strip_prefix('_') {
            let primitive = def
                .properties
                .get(base)
                .is_some_and(|p| !p.list && matches!(p.kind, Kind::Primitive(_) | Kind::Enum(_)));
            return primitive && self.conform_value(value, &Kind::Complex("Element".into()));
        }
        let Some(property) = def.properties.get(key) else {
            return false;
        };
        if property.list {
            if !value.is_array() {
                *value = Value::Array(vec![value.take()]);
            }
            let Value::Array(items) = value else {
                return false;
            };
            items.retain_mut(|item| self.conform_value(item, &property.kind));
            !items.is_empty()
        } else {
            !value.is_array() && self.conform_value(value, &property.kind)
        }
    }

    fn conform_value(&self, value: &mut Value, kind: &Kind) -> bool {
        match kind {
            Kind::Primitive(p) => primitive(*p, value),
            Kind::Enum(codes) => value.as_str().is_some_and(|v| codes.iter().any(|c| c == v)),
            Kind::Const(c) => value.as_str() == Some(c.as_str()),
            Kind::Complex(name) => match (self.definitions.get(name), value.as_object_mut()) {
                (Some(def), Some(map)) => self.conform_object(map, name, def),
                _ => false,
            },
        }
    }
}

/// ext-1: an extension has a url and either nested extensions or exactly one value.
fn valid_extension(m: &Map<String, Value>) -> bool {
    let has_url = m.get("url").and_then(Value::as_str).is_some();
    let values = m.keys().filter(|k| k.starts_with("value")).count();
    let nested = m.contains_key("extension");
    has_url && ((values == 1 && !nested) || (values == 0 && nested))
}

/// Checks (and where meaning allows, normalizes) one primitive value.
fn primitive(p: Primitive, value: &mut Value) -> bool {
    let replace = |value: &mut Value, s: Option<String>| match s {
        Some(s) => {
            *value = Value::String(s);
            true
        }
        None => false,
    };
    match p {
        Primitive::Boolean => value.is_boolean(),
        Primitive::Decimal => value.is_number(),
        Primitive::Integer => value.as_i64().is_some_and(|n| i32::try_from(n).is_ok()),
        Primitive::PositiveInt => value
            .as_i64()
            .is_some_and(|n| (1..=i64::from(i32::MAX)).contains(&n)),
        Primitive::UnsignedInt => value
            .as_i64()
            .is_some_and(|n| (0..=i64::from(i32::MAX)).contains(&n)),
        _ => {
            let Some(text) = value.as_str().map(str::to_owned) else {
                return false;
            };
            let fixed = match p {
                Primitive::String => string(&text),
                Primitive::Code => code(&text),
                Primitive::Id => is_id(&text).then_some(text),
                Primitive::Uri => {
                    (!text.is_empty() && !text.chars().any(is_fhir_space)).then_some(text)
                }
                Primitive::Oid => is_oid(&text).then_some(text),
                Primitive::Uuid => is_uuid(&text).then_some(text),
                Primitive::Base64Binary => is_base64(&text).then_some(text),
                Primitive::Date => iso_date(&text),
                Primitive::DateTime => iso_date_time(&text),
                Primitive::Instant => is_instant(&text).then_some(text),
                Primitive::Time => is_time(&text).then_some(text),
                _ => None,
            };
            replace(value, fixed)
        }
    }
}

/// A FHIR string: at least one non-whitespace character; whitespace other than space,
/// tab, CR and LF (which the R4 pattern forbids) becomes a space.
fn string(text: &str) -> Option<String> {
    if text.chars().all(is_fhir_space) {
        return None;
    }
    Some(
        text.chars()
            .map(|c| {
                if is_fhir_space(c) && !matches!(c, ' ' | '\t' | '\r' | '\n') {
                    ' '
                } else {
                    c
                }
            })
            .collect(),
    )
}

fn is_id(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn is_oid(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("urn:oid:") else {
        return false;
    };
    let arcs: Vec<&str> = rest.split('.').collect();
    arcs.len() >= 2
        && matches!(arcs[0], "0" | "1" | "2")
        && arcs[1..].iter().all(|a| {
            !a.is_empty()
                && a.bytes().all(|b| b.is_ascii_digit())
                && (a.len() == 1 || !a.starts_with('0'))
        })
}

fn is_uuid(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("urn:uuid:") else {
        return false;
    };
    let groups: Vec<&str> = rest.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| {
            g.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

fn is_base64(text: &str) -> bool {
    let chars: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    !chars.is_empty()
        && chars.len().is_multiple_of(4)
        && chars
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
}

/// `hh:mm:ss[.f+]`.
fn is_time(text: &str) -> bool {
    let (clock, frac) = match text.split_once('.') {
        Some((c, f)) => (c, Some(f)),
        None => (text, None),
    };
    let parts: Vec<&str> = clock.split(':').collect();
    let num = |s: &str, max: u32| {
        s.len() == 2
            && s.bytes().all(|b| b.is_ascii_digit())
            && s.parse::<u32>().is_ok_and(|n| n <= max)
    };
    parts.len() == 3
        && num(parts[0], 23)
        && num(parts[1], 59)
        && num(parts[2], 60)
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn primitives() {
        let check = |p, v: Value| {
            let mut v = v;
            primitive(p, &mut v).then_some(v)
        };
        assert_eq!(check(Primitive::Code, json!(" a  b ")), Some(json!("a b")));
        assert_eq!(
            check(Primitive::String, json!("a\u{a0}b")),
            Some(json!("a b"))
        );
        assert_eq!(check(Primitive::String, json!(" \u{feff}")), None);
        assert_eq!(
            check(Primitive::DateTime, json!("2019-06-03T10:15")),
            Some(json!("2019-06-03"))
        );
        assert_eq!(
            check(Primitive::Date, json!("2019-06-03T10:15:00Z")),
            Some(json!("2019-06-03"))
        );
        assert_eq!(check(Primitive::Instant, json!("2019")), None);
        assert_eq!(check(Primitive::Integer, json!(5.0)), None);
        assert_eq!(check(Primitive::PositiveInt, json!(0)), None);
        assert_eq!(check(Primitive::Uri, json!("a b")), None);
        assert_eq!(
            check(Primitive::Oid, json!("urn:oid:2.16.840.1")),
            Some(json!("urn:oid:2.16.840.1"))
        );
        assert_eq!(check(Primitive::Oid, json!("urn:oid:2.016")), None);
        assert_eq!(
            check(Primitive::Time, json!("12:30:00.5")),
            Some(json!("12:30:00.5"))
        );
        assert_eq!(check(Primitive::Time, json!("12:30")), None);
        assert_eq!(
            check(Primitive::Base64Binary, json!("JVBE Ri0x")),
            Some(json!("JVBE Ri0x"))
        );
        assert!(is_uuid("urn:uuid:6e5d4c3b-2a19-4087-b6a5-000000000e02"));
        assert!(!is_uuid("urn:uuid:6E5D4C3B-2a19-4087-b6a5-000000000e02"));
    }
}
