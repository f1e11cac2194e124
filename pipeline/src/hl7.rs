//! The JSON shape in which an HL7 v2 message travels between stages, with its one writer
//! and its one reader. Ingestion writes it, anonymization reads and rewrites it,
//! canonization reads it:
//!
//! ```json
//! {"message_type": "ADT^A01", "control_id": "MSG00001", "version": "2.5.1",
//!  "segments": [{"id": "MSH", "fields": [[[["|"]]], [[["^~\\&"]]], ...]}, ...]}
//! ```
//!
//! `fields[n-1]` is field n; a field is a list of repetitions (`[]` when empty), a
//! repetition a list of components, a component a list of subcomponent strings with escape
//! sequences decoded. For MSH, field 1 is the field separator and field 2 the encoding
//! characters, stored literally. The summary keys are derived from MSH by [`message`]
//! (MSH-9.1`^`MSH-9.2, MSH-10, MSH-12.1; `null` when empty), so they never say more than
//! MSH does.

use std::str::FromStr;

use serde_json::{json, Value};

/// Builds one segment.
pub fn segment(id: &str, fields: Vec<Value>) -> Value {
    json!({"id": id, "fields": fields})
}

/// Builds a message from its segments, deriving the summary keys from its MSH.
pub fn message(segments: Vec<Value>) -> Value {
    let summary = Summary::of(segments.first().filter(|s| segment_id(s) == Some("MSH")));
    json!({
        "message_type": summary.message_type,
        "control_id": summary.control_id,
        "version": summary.version,
        "segments": segments,
    })
}

/// What MSH says about its message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Summary {
    /// MSH-9.1`^`MSH-9.2, or MSH-9.1 alone without a trigger event.
    pub message_type: Option<String>,
    pub control_id: Option<String>,
    pub version: Option<String>,
}

impl Summary {
    pub fn of(msh: Option<&Value>) -> Summary {
        let get = |f: usize, c: usize| {
            msh.and_then(|m| field(m, f, 1, c, 1))
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        Summary {
            message_type: get(9, 1).map(|code| match get(9, 2) {
                Some(event) => format!("{code}^{event}"),
                None => code,
            }),
            control_id: get(10, 1),
            version: get(12, 1),
        }
    }
}

/// Why content is not a message of this shape. Names the place, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct ShapeError {
    /// Where, as `segments[3].fields[2]` (0-based, like the JSON).
    pub path: String,
    pub problem: &'static str,
}

/// A message read back: its segments in order, borrowed from the content.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    pub segments: Vec<Segment<'a>>,
    /// The content's summary keys, as written (use [`Summary::of`] to derive them anew).
    pub control_id: Option<&'a str>,
}

/// One segment, with its 1-based position in the message.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub id: &'a str,
    pub position: usize,
    /// `fields[n-1]` is field n.
    pub fields: &'a [Value],
    /// The segment as it is in the content.
    pub raw: &'a Value,
}

impl<'a> Message<'a> {
    /// Reads the shape: an object with a `segments` list of objects, each with a segment
    /// id and a `fields` list (absent means no fields). Nothing deeper is checked here.
    pub fn read(content: &'a Value) -> Result<Message<'a>, ShapeError> {
        let shape = |path: String, problem| ShapeError { path, problem };
        let object = content
            .as_object()
            .ok_or_else(|| shape(String::new(), "HL7 content is not a JSON object"))?;
        let list = object
            .get("segments")
            .and_then(Value::as_array)
            .ok_or_else(|| shape("segments".into(), "missing or not an array"))?;
        let mut segments = Vec::with_capacity(list.len());
        for (i, raw) in list.iter().enumerate() {
            if !raw.is_object() {
                return Err(shape(
                    format!("segments[{i}]"),
                    "a segment is not a JSON object",
                ));
            }
            let id = segment_id(raw)
                .filter(|id| is_segment_id(id))
                .ok_or_else(|| shape(format!("segments[{i}].id"), "missing or not a segment id"))?;
            let fields = match raw.get("fields") {
                None => &[][..],
                Some(Value::Array(f)) => f.as_slice(),
                Some(_) => return Err(shape(format!("segments[{i}].fields"), "not an array")),
            };
            segments.push(Segment {
                id,
                position: i + 1,
                fields,
                raw,
            });
        }
        Ok(Message {
            segments,
            control_id: object.get("control_id").and_then(Value::as_str),
        })
    }

    /// The first segment with this id.
    pub fn first(&self, id: &str) -> Option<Segment<'a>> {
        self.segments.iter().copied().find(|s| s.id == id)
    }

    /// Every segment with this id, in message order.
    pub fn all<'s>(&'s self, id: &'s str) -> impl Iterator<Item = Segment<'a>> + 's {
        self.segments.iter().copied().filter(move |s| s.id == id)
    }
}

impl<'a> Segment<'a> {
    /// Repetitions of field `n` (1-based).
    pub fn reps(&self, n: usize) -> &'a [Value] {
        n.checked_sub(1)
            .and_then(|i| self.fields.get(i))
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice)
    }

    /// Components of repetition `r` of field `n` (both 1-based).
    pub fn comps(&self, n: usize, r: usize) -> &'a [Value] {
        r.checked_sub(1)
            .and_then(|i| self.reps(n).get(i))
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice)
    }

    /// Subcomponent `s` of component `c` of repetition `r` of field `n` (all 1-based).
    pub fn sub(&self, n: usize, r: usize, c: usize, s: usize) -> Option<&'a str> {
        field(self.raw, n, r, c, s)
    }

    /// Component `c` of repetition `r` of field `n`, subcomponents joined with `&`; `None`
    /// when blank.
    pub fn text(&self, n: usize, r: usize, c: usize) -> Option<String> {
        let subs = c
            .checked_sub(1)
            .and_then(|i| self.comps(n, r).get(i))
            .and_then(Value::as_array)?;
        let parts: Vec<&str> = subs.iter().filter_map(Value::as_str).collect();
        let joined = parts.join("&");
        (!joined.trim().is_empty()).then_some(joined)
    }

    /// The first component of the first repetition, trimmed: the usual "value" of a field.
    pub fn value(&self, n: usize) -> Option<String> {
        self.text(n, 1, 1).map(|s| s.trim().to_owned())
    }
}

/// `PID-5.1.2`, `MSH-9.2`, `OBX-5`, from the first segment with that id.
///
/// Repetition, component and subcomponent all default to 1, so `PID-5` is the same as
/// `PID-5[1].1.1` (the family name): callers always get one decoded string. A present but
/// empty component is `Some("")`; anything absent is `None`. An address that does not parse
/// is also `None`; use [`Address::from_str`] to catch typos in configuration.
pub fn get(content: &Value, address: &str) -> Option<String> {
    let address: Address = address.parse().ok()?;
    address.lookup(content).map(str::to_owned)
}

/// All segments with this id, in message order (e.g. every `OBX`).
pub fn segments<'a>(content: &'a Value, id: &str) -> impl Iterator<Item = &'a Value> {
    let id = id.to_owned();
    content
        .get("segments")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(move |segment| segment_id(segment) == Some(id.as_str()))
}

/// The id of one segment, e.g. `PID`.
pub fn segment_id(segment: &Value) -> Option<&str> {
    segment.get("id").and_then(Value::as_str)
}

/// One subcomponent of one segment; `field`, `repetition`, `component` and `subcomponent` are
/// 1-based as in the standard (a 0 yields `None`).
pub fn field(
    segment: &Value,
    field: usize,
    repetition: usize,
    component: usize,
    subcomponent: usize,
) -> Option<&str> {
    segment
        .get("fields")?
        .get(field.checked_sub(1)?)?
        .get(repetition.checked_sub(1)?)?
        .get(component.checked_sub(1)?)?
        .get(subcomponent.checked_sub(1)?)?
        .as_str()
}

/// How many repetitions field `field` (1-based) of `segment` has: 0 when empty or absent.
pub fn repetitions(segment: &Value, field: usize) -> usize {
    field
        .checked_sub(1)
        .and_then(|i| segment.get("fields")?.get(i)?.as_array())
        .map_or(0, Vec::len)
}

/// Three upper-case ASCII letters or digits.
pub fn is_segment_id(id: &str) -> bool {
    id.len() == 3
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// A parsed field address such as `PID-3[2].1`: `SEG-FIELD[REPETITION].COMPONENT.SUBCOMPONENT`,
/// all numbers 1-based, repetition, component and subcomponent defaulting to 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub segment: String,
    pub field: usize,
    pub repetition: usize,
    pub component: usize,
    pub subcomponent: usize,
}

impl Address {
    /// The addressed value in the first segment with this id, as [`get`] describes.
    pub fn lookup<'a>(&self, content: &'a Value) -> Option<&'a str> {
        let segment = segments(content, &self.segment).next()?;
        field(
            segment,
            self.field,
            self.repetition,
            self.component,
            self.subcomponent,
        )
    }
}

/// An address that is not of the form `SEG-F[R].C.S`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid HL7 address {0:?}: expected e.g. PID-5, PID-3[2].1 or PID-5.1.2")]
pub struct InvalidAddress(pub String);

impl FromStr for Address {
    type Err = InvalidAddress;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidAddress(s.to_owned());
        let (segment, rest) = s.split_once('-').ok_or_else(bad)?;
        if !is_segment_id(segment) {
            return Err(bad());
        }
        let mut parts = rest.split('.');
        let first = parts.next().unwrap_or_default();
        let (field, repetition) = match first.split_once('[') {
            None => (number(first), Some(1)),
            Some((f, r)) => (number(f), r.strip_suffix(']').and_then(number)),
        };
        let component = parts.next().map_or(Some(1), number);
        let subcomponent = parts.next().map_or(Some(1), number);
        if parts.next().is_some() {
            return Err(bad());
        }
        match (field, repetition, component, subcomponent) {
            (Some(field), Some(repetition), Some(component), Some(subcomponent)) => Ok(Address {
                segment: segment.to_owned(),
                field,
                repetition,
                component,
                subcomponent,
            }),
            _ => Err(bad()),
        }
    }
}

/// A 1-based index written with digits only (no sign, no spaces).
fn number(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|&n| n >= 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(s: &str) -> Value {
        json!([[[s]]])
    }

    #[test]
    fn what_the_writer_writes_the_reader_reads() {
        let msh = segment(
            "MSH",
            vec![
                sub("|"),
                sub("^~\\&"),
                json!([]),
                json!([]),
                json!([]),
                json!([]),
                json!([]),
                json!([]),
                json!([[["ADT"], ["A01"]]]),
                sub("C1"),
                json!([]),
                sub("2.5.1"),
            ],
        );
        let pid = segment(
            "PID",
            vec![json!([]), json!([]), json!([[["id-1"]], [["id-2"]]])],
        );
        let m = message(vec![msh, pid]);
        assert_eq!(m["message_type"], "ADT^A01");
        assert_eq!(m["control_id"], "C1");
        assert_eq!(m["version"], "2.5.1");
        let read = Message::read(&m).expect("shape");
        assert_eq!(read.segments.len(), 2);
        let pid = read.first("PID").expect("PID");
        assert_eq!((pid.position, pid.reps(3).len()), (2, 2));
        assert_eq!(pid.sub(3, 2, 1, 1), Some("id-2"));
        assert_eq!(get(&m, "PID-3[2]"), Some("id-2".into()));
        assert_eq!(read.control_id, Some("C1"));
    }

    #[test]
    fn a_wrong_shape_is_named_by_place_not_value() {
        let err = Message::read(&json!({"segments": [{"id": "pid", "fields": []}]})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "segments[0].id: missing or not a segment id"
        );
        assert!(Message::read(&json!({"segments": 3})).is_err());
        assert!(Message::read(&json!({"segments": [{"id": "OBX", "fields": "x"}]})).is_err());
        let m = json!({"segments": [{"id": "NTE"}]});
        assert!(Message::read(&m).unwrap().segments[0].fields.is_empty());
    }

    #[test]
    fn addresses_parse_strictly() {
        assert_eq!(
            "PID-5.1.2".parse::<Address>(),
            Ok(Address {
                segment: "PID".into(),
                field: 5,
                repetition: 1,
                component: 1,
                subcomponent: 2
            })
        );
        for bad in [
            "PID5",
            "pid-5",
            "PID-0",
            "PID-5.x",
            "PID-5.1.1.1",
            "PID-5[0]",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
    }
}
