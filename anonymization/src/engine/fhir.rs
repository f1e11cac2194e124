//! FHIR resources (NDJSON lines and Bundle entries): elements are walked from the resource
//! root, each leaf governed by the best matching FHIR path; references keep their shape
//! with pseudonymized ids.

use serde_json::{Map, Value};

use super::rules::{better, filter_holds, Governing, Mode};
use super::{bump_rule, join, unexpected, EngineError, Run, BUNDLE_ENTRY_RULE, FHIR_METADATA};
use crate::policy::glob_match;

/// Whether a FHIR leaf is datatype metadata rather than data: a [`FHIR_METADATA`] element,
/// anything in a Coding (type codes), or an extension's `url`.
pub(super) fn fhir_metadata(path: &str) -> bool {
    let mut segments = path.rsplit('.');
    let last = segments.next().unwrap_or_default();
    let parent = segments.next();
    FHIR_METADATA.contains(&last)
        || path.split('.').any(|s| s == "coding")
        || (last == "url" && parent.is_some_and(|p| p.ends_with("xtension")))
}

fn is_resource_type(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_uppercase()) && bytes.all(|b| b.is_ascii_alphabetic())
}

/// A conditional reference, `Type?query` (Synthea's `Practitioner?identifier=<system>|<npi>`)
/// -> its type. Its pseudonym is that of the whole text, which a Bundle entry created with
/// the same condition (`request.ifNoneExist`) also gets, so the reference still resolves.
/// Only references to shared types (practitioners, organisations, ...) are kept this way: a
/// patient is always referenced by the id its pseudonym derives from.
pub(super) fn conditional_reference(text: &str) -> Option<&str> {
    let (kind, query) = text.split_once('?')?;
    let shared = pipeline::ResourceType::parse(kind).is_some_and(|t| t.is_shared());
    (shared && !query.is_empty()).then_some(kind)
}

/// `[base/]Type/id[/_history/version]` -> (Type, id, version).
pub(super) fn split_reference(text: &str) -> Option<(&str, &str, Option<&str>)> {
    if text.contains(['?', '#']) {
        return None;
    }
    let parts: Vec<&str> = text.split('/').collect();
    let (core, version) = match parts.as_slice() {
        [core @ .., "_history", v] if core.len() >= 2 && !v.is_empty() => (core, Some(*v)),
        all => (all, None),
    };
    match core {
        [.., kind, id] if is_resource_type(kind) && !id.is_empty() => Some((kind, id, version)),
        _ => None,
    }
}

/// One FHIR element on the path from the resource root: its name and value (one array item).
struct Frame<'v> {
    name: &'v str,
    value: &'v Value,
}

impl<'e> Run<'e> {
    /// A Bundle entry: the resource goes through the rules; `fullUrl` and `request` are the
    /// engine's (their ids pseudonymized like references); anything else is dropped.
    pub(super) fn fhir_entry(&mut self, content: &Value) -> Result<Option<Value>, EngineError> {
        let entry = content
            .as_object()
            .ok_or_else(|| unexpected("entry", "a Bundle entry is not a JSON object"))?;
        let resource = entry
            .get("resource")
            .ok_or_else(|| unexpected("entry.resource", "missing"))?;
        let mut out = Map::new();
        if let Some(r) = self.fhir_resource(resource, "entry.resource")? {
            out.insert("resource".to_owned(), r);
        }
        for (key, value) in entry {
            match (key.as_str(), value) {
                ("resource", _) => {}
                ("fullUrl", Value::String(url)) => {
                    let p = self.pseudonymize(url);
                    if let Some(v) = self.engine_leaf("entry.fullUrl", p) {
                        out.insert(key.clone(), v);
                    }
                }
                ("request", Value::Object(request)) => {
                    let mut req = Map::new();
                    for (k, v) in request {
                        let path = join("entry.request", k);
                        let handled = match (k.as_str(), v) {
                            ("method", Value::String(m)) => Some(m.clone()),
                            ("url", Value::String(u)) => Some(self.request_url(u)),
                            // The condition a shared resource was created under, as the
                            // pseudonym conditional references to it get.
                            ("ifNoneExist", Value::String(q)) => request
                                .get("url")
                                .and_then(Value::as_str)
                                .map(|u| format!("{u}?{q}"))
                                .filter(|c| conditional_reference(c).is_some())
                                .map(|c| self.engine.pseudonym(&c)),
                            _ => None,
                        };
                        match handled {
                            Some(text) => {
                                if let Some(v) = self.engine_leaf(&path, text) {
                                    req.insert(k.clone(), v);
                                }
                            }
                            None => self.drop_subtree(v, &path),
                        }
                    }
                    if !req.is_empty() {
                        out.insert(key.clone(), Value::Object(req));
                    }
                }
                _ => self.drop_subtree(value, &join("entry", key)),
            }
        }
        Ok((!out.is_empty()).then_some(Value::Object(out)))
    }

    /// An engine-handled Bundle entry field: counted under [`BUNDLE_ENTRY_RULE`].
    fn engine_leaf(&mut self, path: &str, text: String) -> Option<Value> {
        if self.mode != Mode::Apply {
            return None;
        }
        bump_rule(&mut self.report.rules, BUNDLE_ENTRY_RULE, path);
        Some(Value::String(text))
    }

    /// `Patient` stays; `Patient/123` -> `Patient/<p>`; a conditional query
    /// (`Patient?identifier=...`) holds identifiers and is cut off.
    fn request_url(&self, url: &str) -> String {
        let base = url.split_once('?').map_or(url, |(b, _)| b);
        if is_resource_type(base) {
            base.to_owned()
        } else {
            self.pseudonymize(base)
        }
    }

    pub(super) fn fhir_resource(
        &mut self,
        resource: &Value,
        location: &str,
    ) -> Result<Option<Value>, EngineError> {
        let object = resource
            .as_object()
            .ok_or_else(|| unexpected(location, "the FHIR resource is not a JSON object"))?;
        match object.get("resourceType").and_then(Value::as_str) {
            Some(t) if t == self.record_type => {}
            Some(_) => {
                return Err(unexpected(
                    join(location, "resourceType"),
                    "does not match the record type",
                ))
            }
            None => {
                return Err(unexpected(
                    join(location, "resourceType"),
                    "missing or not a string",
                ))
            }
        }
        let mut stack = Vec::new();
        self.fhir_object(object, &mut stack, None)
    }

    fn fhir_object<'v>(
        &mut self,
        object: &'v Map<String, Value>,
        stack: &mut Vec<Frame<'v>>,
        governing: Option<Governing<'e>>,
    ) -> Result<Option<Value>, EngineError> {
        let mut out = Map::new();
        for (name, value) in object {
            let result = match value {
                Value::Array(items) => {
                    let mut kept = Vec::new();
                    for item in items {
                        if let Some(v) = self.fhir_element(name, item, stack, governing)? {
                            kept.push(v);
                        }
                    }
                    (!kept.is_empty()).then_some(Value::Array(kept))
                }
                _ => self.fhir_element(name, value, stack, governing)?,
            };
            if let Some(v) = result {
                out.insert(name.clone(), v);
            }
        }
        Ok((!out.is_empty()).then_some(Value::Object(out)))
    }

    /// One element (or one item of a repeating element): finds the best rule matching the
    /// path exactly here; a deeper match outranks the inherited one unless that is typed.
    fn fhir_element<'v>(
        &mut self,
        name: &'v str,
        value: &'v Value,
        stack: &mut Vec<Frame<'v>>,
        inherited: Option<Governing<'e>>,
    ) -> Result<Option<Value>, EngineError> {
        stack.push(Frame { name, value });
        let mut governing = inherited;
        for (c, segments) in self.index.fhir(stack.len(), name) {
            let matches = segments.iter().zip(stack.iter()).all(|(s, f)| {
                glob_match(&s.name, f.name)
                    && s.filter
                        .as_ref()
                        .is_none_or(|flt| filter_holds(flt, f.value))
            });
            if matches {
                governing = better(governing, c);
            }
        }
        let result = self.fhir_value(value, stack, governing);
        stack.pop();
        result
    }

    fn fhir_value<'v>(
        &mut self,
        value: &'v Value,
        stack: &mut Vec<Frame<'v>>,
        governing: Option<Governing<'e>>,
    ) -> Result<Option<Value>, EngineError> {
        match value {
            Value::Object(object) => self.fhir_object(object, stack, governing),
            Value::Array(items) => {
                // Arrays of arrays are not FHIR JSON; handled like one repeating element.
                let mut kept = Vec::new();
                for item in items {
                    if let Some(v) = self.fhir_value(item, stack, governing)? {
                        kept.push(v);
                    }
                }
                Ok((!kept.is_empty()).then_some(Value::Array(kept)))
            }
            _ => {
                let path = stack.iter().map(|f| f.name).collect::<Vec<_>>().join(".");
                self.leaf(value, &path, governing)
            }
        }
    }
}
