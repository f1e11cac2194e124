//! Synthea CSV rows (column → value) to FHIR resources, by the rules of data/synthea.toml.
//!
//! The mapping itself is data; this file only knows how to apply each kind of rule.

use pipeline::ResourceType;
use serde_json::{json, Map, Value};

use super::datatypes::{
    code, concept, decimal, digest, iso_date, iso_date_time, reference, sanitize, UCUM,
};
use super::tables::{CsvRecord, ElementRule, Tables};
use super::{canonical_type, patient_id, resource_id, Draft, Input, MapError};

pub(crate) fn map(input: &Input<'_>, tables: &Tables) -> Result<Draft, MapError> {
    let Some(row) = input.content.as_object() else {
        return Err(MapError::invalid(
            "CSV content is not an object of column values",
        ));
    };
    let spec = tables
        .synthea
        .record
        .iter()
        .find(|r| r.record_type == input.record_type)
        .ok_or_else(|| MapError::unsupported(input.record_type))?;
    let resource_type = canonical_type(&spec.resource_type)
        .ok_or_else(|| MapError::unsupported(input.record_type))?;
    let ctx = Row {
        row,
        pseudonym: input.patient_pseudonym,
        tables,
    };
    let id = if resource_type == ResourceType::Patient {
        patient_id(ctx.pseudonym)
    } else {
        resource_id(resource_type, ctx.pseudonym, &ctx.identity(spec))
    };
    let mut draft: Map<String, Value> = spec.fixed.clone();
    for rule in &spec.element {
        ctx.apply(rule, &mut draft);
    }
    Ok((resource_type, id, Value::Object(draft)))
}

struct Row<'a> {
    row: &'a Map<String, Value>,
    pseudonym: &'a str,
    tables: &'a Tables,
}

impl Row<'_> {
    /// A column's value, trimmed; `None` when absent or blank.
    fn col(&self, name: &str) -> Option<&str> {
        self.row
            .get(name)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }

    /// The source identity: the id column, else the identifying columns (a row without
    /// identifying columns at all is identified by its whole content). Never the position.
    fn identity(&self, spec: &CsvRecord) -> String {
        if let Some(id) = spec.id_column.as_deref().and_then(|c| self.col(c)) {
            return id.to_owned();
        }
        if spec.identity.is_empty() {
            return digest(&Value::Object(self.row.clone()));
        }
        let pairs: Vec<(&str, &str)> = spec
            .identity
            .iter()
            .map(|c| (c.as_str(), self.col(c).unwrap_or("")))
            .collect();
        format!("row:{}", json!(pairs))
    }

    /// A system given in a column: a URI as is, a name through [code_systems]; an unknown
    /// name gets a medpipe URN so codes of unrelated systems are never merged.
    fn system(&self, given: Option<&str>, default: &str) -> String {
        let Some(name) = given else {
            return default.to_owned();
        };
        if name.contains(':') {
            return name.to_owned();
        }
        let systems = &self.tables.synthea.code_systems;
        systems
            .get(name)
            .or_else(|| {
                systems
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v)
            })
            .cloned()
            .unwrap_or_else(|| format!("urn:medpipe:csv-system:{}", sanitize(name)))
    }

    fn apply(&self, rule: &ElementRule, draft: &mut Map<String, Value>) {
        let taken = |draft: &Map<String, Value>, choice: &Option<String>| {
            choice
                .as_deref()
                .is_some_and(|c| draft.keys().any(|k| k.starts_with(c)))
        };
        match rule {
            ElementRule::Text { element, column } => {
                if let Some(v) = self.col(column) {
                    draft.insert(element.clone(), json!(v));
                }
            }
            ElementRule::Date { element, column } => {
                if let Some(d) = self.col(column).and_then(iso_date) {
                    draft.insert(element.clone(), json!(d));
                }
            }
            ElementRule::DateTime {
                element,
                column,
                choice,
            } => {
                if taken(draft, choice) {
                    return;
                }
                if let Some(d) = self.col(column).and_then(iso_date_time) {
                    draft.insert(element.clone(), json!(d));
                }
            }
            ElementRule::Period {
                element,
                start,
                end,
                choice,
            } => {
                if taken(draft, choice) {
                    return;
                }
                let mut period = Map::new();
                if let Some(s) = self.col(start).and_then(iso_date_time) {
                    period.insert("start".into(), json!(s));
                }
                if let Some(e) = self.col(end).and_then(iso_date_time) {
                    period.insert("end".into(), json!(e));
                }
                if !period.is_empty() {
                    draft.insert(element.clone(), Value::Object(period));
                }
            }
            ElementRule::Concept {
                element,
                code: code_column,
                display,
                system,
                system_column,
                array,
                choice,
            } => {
                if taken(draft, choice) {
                    return;
                }
                let Some(code_text) = self.col(code_column) else {
                    return;
                };
                let system =
                    self.system(system_column.as_deref().and_then(|c| self.col(c)), system);
                let display = display.as_deref().and_then(|c| self.col(c));
                if let Some(cc) = concept(Some(&system), code_text, display) {
                    let value = if *array { json!([cc]) } else { cc };
                    draft.insert(element.clone(), value);
                }
            }
            ElementRule::Code {
                element,
                column,
                allowed,
                array,
            } => {
                let Some(v) = self.col(column).map(str::to_ascii_lowercase) else {
                    return;
                };
                if allowed.contains(&v) {
                    let value = if *array { json!([v]) } else { json!(v) };
                    draft.insert(element.clone(), value);
                }
            }
            ElementRule::Lookup {
                element,
                column,
                table,
                append,
            } => {
                let Some(v) = self.col(column) else {
                    return;
                };
                let Some(entries) = self.tables.synthea.tables.get(table) else {
                    return;
                };
                let found = entries.get(v).or_else(|| {
                    entries
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(v))
                        .map(|(_, x)| x)
                });
                let Some(found) = found.cloned() else {
                    return;
                };
                if *append {
                    push(draft, element, found);
                } else {
                    draft.insert(element.clone(), found);
                }
            }
            ElementRule::IfPresent {
                element,
                column,
                then,
                otherwise,
            } => {
                let value = if self.col(column).is_some() {
                    then
                } else {
                    otherwise
                };
                draft.insert(element.clone(), value.clone());
            }
            ElementRule::Encounter { element, column } => {
                if let Some(v) = self.col(column) {
                    let id = resource_id(ResourceType::Encounter, self.pseudonym, v);
                    draft.insert(element.clone(), reference(ResourceType::Encounter, &id));
                }
            }
            ElementRule::ObservationValue {
                column,
                units,
                type_column,
            } => {
                if let Some((element, value)) = self.observation_value(column, units, type_column) {
                    if !draft.keys().any(|k| k.starts_with("value")) {
                        draft.insert(element.into(), value);
                    }
                }
            }
            ElementRule::Reaction {
                code: code_column,
                display,
                severity,
                system,
            } => {
                let Some(code_text) = self.col(code_column) else {
                    return;
                };
                let Some(manifestation) = concept(Some(system), code_text, self.col(display))
                else {
                    return;
                };
                let mut reaction = Map::new();
                reaction.insert("manifestation".into(), json!([manifestation]));
                if let Some(s) = self.col(severity).map(str::to_ascii_lowercase) {
                    if ["mild", "moderate", "severe"].contains(&s.as_str()) {
                        reaction.insert("severity".into(), json!(s));
                    }
                }
                push(draft, "reaction", Value::Object(reaction));
            }
            ElementRule::Address { state, postal_code } => {
                let mut address = Map::new();
                if let Some(s) = self.col(state) {
                    address.insert("state".into(), json!(s));
                }
                if let Some(z) = self.col(postal_code) {
                    address.insert("postalCode".into(), json!(z));
                }
                if !address.is_empty() {
                    push(draft, "address", Value::Object(address));
                }
            }
        }
    }

    /// Observation.value[x]: TYPE `numeric` (or no TYPE and a number) → valueQuantity with
    /// UNITS (Synthea writes UCUM units; a unit with spaces is kept as text only);
    /// anything else → valueString.
    fn observation_value(
        &self,
        column: &str,
        units: &str,
        type_column: &str,
    ) -> Option<(&'static str, Value)> {
        let value = self.col(column)?;
        let kind = self.col(type_column).map(str::to_ascii_lowercase);
        let number = match kind.as_deref() {
            Some("numeric") | None => decimal(value),
            Some(_) => None,
        };
        let Some(number) = number else {
            return Some(("valueString", json!(value)));
        };
        let mut quantity = Map::new();
        quantity.insert("value".into(), Value::Number(number));
        if let Some(unit) = self.col(units) {
            quantity.insert("unit".into(), json!(unit));
            if let Some(ucum) = code(unit).filter(|u| !u.contains(' ')) {
                quantity.insert("system".into(), json!(UCUM));
                quantity.insert("code".into(), json!(ucum));
            }
        }
        Some(("valueQuantity", Value::Object(quantity)))
    }
}

/// Appends to a list element, creating it.
fn push(draft: &mut Map<String, Value>, element: &str, value: Value) {
    match draft.get_mut(element) {
        Some(Value::Array(items)) => items.push(value),
        _ => {
            draft.insert(element.to_owned(), json!([value]));
        }
    }
}
