//! CSV rows: every cell is a leaf, governed by the best rule whose column glob matches it.

use serde_json::{Map, Value};

use super::rules::better;
use super::{unexpected, EngineError, Run};
use crate::policy::{glob_match, Pattern};

impl<'e> Run<'e> {
    pub(super) fn csv(&mut self, content: &Value) -> Result<Option<Value>, EngineError> {
        let row = content
            .as_object()
            .ok_or_else(|| unexpected("", "CSV content is not a JSON object"))?;
        let mut out = Map::new();
        for (column, value) in row {
            if value.is_object() || value.is_array() {
                return Err(unexpected(
                    "column",
                    "a CSV cell is an object or array, not a scalar",
                ));
            }
            let mut governing = None;
            for c in &self.index.candidates {
                if let Pattern::Csv(glob) = &c.path.pattern {
                    if glob_match(glob, column) {
                        governing = better(governing, c);
                    }
                }
            }
            if let Some(v) = self.leaf(value, column, governing)? {
                out.insert(column.clone(), v);
            }
        }
        Ok((!out.is_empty()).then_some(Value::Object(out)))
    }
}
