//! HL7 v2 messages: read through `pipeline::hl7`, every subcomponent a leaf governed by the
//! best matching segment/field/component pattern; the positional layout is kept and removed
//! subcomponents are emptied.

use pipeline::hl7;
use serde_json::Value;

use super::rules::{better, Governing};
use super::{unexpected, EngineError, Run};

impl<'e> Run<'e> {
    pub(super) fn hl7(&mut self, content: &Value) -> Result<Option<Value>, EngineError> {
        let message = hl7::Message::read(content).map_err(|e| unexpected(e.path, e.problem))?;
        let mut out_segments = Vec::with_capacity(message.segments.len());
        for segment in &message.segments {
            out_segments.push(self.hl7_segment(segment)?);
        }
        for (key, value) in content.as_object().into_iter().flatten() {
            if !matches!(
                key.as_str(),
                "segments" | "message_type" | "control_id" | "version"
            ) {
                self.drop_subtree(value, key);
            }
        }
        // The summary keys are re-derived from the de-identified MSH, as ingestion derives
        // them from the original, so they can never say more than MSH does.
        Ok(Some(hl7::message(out_segments)))
    }

    fn hl7_segment(&mut self, segment: &hl7::Segment<'_>) -> Result<Value, EngineError> {
        let index = segment.position - 1;
        let at = |what: &str| format!("segments[{index}]{what}");
        let (id, fields) = (segment.id, segment.fields);
        for (key, value) in segment.raw.as_object().into_iter().flatten() {
            if key != "id" && key != "fields" {
                self.drop_subtree(value, &format!("{id}.{key}"));
            }
        }
        // OBX-2, the value type, for `when_type` rules.
        let value_type = segment.sub(2, 1, 1, 1).map(str::to_owned);

        let mut out_fields = Vec::with_capacity(fields.len());
        for (f, field) in fields.iter().enumerate() {
            let number = f + 1;
            if id == "MSH" && number <= 2 {
                // The delimiters, stored literally: structure, not data.
                out_fields.push(field.clone());
                continue;
            }
            let bad = || {
                unexpected(
                    at(&format!(".fields[{f}]")),
                    "not a list of repetitions of components of subcomponent strings",
                )
            };
            let repetitions = field.as_array().ok_or_else(bad)?;
            let mut out_reps = Vec::new();
            for repetition in repetitions {
                let components = repetition.as_array().ok_or_else(bad)?;
                let mut out_comps = Vec::with_capacity(components.len());
                for (c, component) in components.iter().enumerate() {
                    let subs = component.as_array().ok_or_else(bad)?;
                    let mut out_subs = Vec::with_capacity(subs.len());
                    for (s, sub) in subs.iter().enumerate() {
                        if !sub.is_string() {
                            return Err(bad());
                        }
                        let governing =
                            self.hl7_governing(id, number, c + 1, s + 1, value_type.as_deref());
                        let path = if s == 0 {
                            format!("{id}-{number}.{}", c + 1)
                        } else {
                            format!("{id}-{number}.{}.{}", c + 1, s + 1)
                        };
                        let text = match self.leaf(sub, &path, governing)? {
                            Some(Value::String(t)) => t,
                            Some(other) => other.to_string(),
                            None => String::new(),
                        };
                        out_subs.push(text);
                    }
                    while out_subs.last().is_some_and(String::is_empty) {
                        out_subs.pop();
                    }
                    out_comps.push(out_subs);
                }
                while out_comps.last().is_some_and(Vec::is_empty) {
                    out_comps.pop();
                }
                if !out_comps.is_empty() {
                    let comps = out_comps
                        .into_iter()
                        .map(|subs| {
                            let subs = if subs.is_empty() {
                                vec![String::new()]
                            } else {
                                subs
                            };
                            Value::Array(subs.into_iter().map(Value::String).collect())
                        })
                        .collect();
                    out_reps.push(Value::Array(comps));
                }
            }
            out_fields.push(Value::Array(out_reps));
        }
        while out_fields
            .last()
            .is_some_and(|f| f.as_array().is_some_and(Vec::is_empty))
        {
            out_fields.pop();
        }
        Ok(hl7::segment(id, out_fields))
    }

    fn hl7_governing(
        &self,
        segment: &str,
        field: usize,
        component: usize,
        subcomponent: usize,
        value_type: Option<&str>,
    ) -> Option<Governing<'e>> {
        let mut governing = None;
        for (c, p) in self.index.hl7(segment) {
            let matches = p.segment.as_deref().is_none_or(|s| s == segment)
                && p.field.is_none_or(|f| f == field)
                && p.component.is_none_or(|x| x == component)
                && p.subcomponent.is_none_or(|x| x == subcomponent)
                && c.rule
                    .when_type
                    .as_ref()
                    .is_none_or(|types| value_type.is_some_and(|t| types.contains(t)));
            if matches {
                governing = better(governing, c);
            }
        }
        governing
    }
}
