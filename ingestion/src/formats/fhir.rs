//! FHIR R4 ingestion: streams Bulk Data `$export` NDJSON and Bundles (JSON) into a [`Sink`], one resource at a time.
//!
//! Both parsers keep memory bounded by one record: NDJSON is read line by line into a
//! reused buffer, and a Bundle is walked with a serde visitor that materialises one
//! `entry` at a time, so a 2 GB Bundle never sits in memory whole.
//!
//! Nothing read from a file ever reaches a rejection reason or a [`FileError`]: reasons
//! are built from positions and from a fixed list of serde_json messages, because the
//! text of a FHIR resource is PHI.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read};

use serde::de::{
    self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde_json::error::Category;
use serde_json::value::RawValue;
use serde_json::Value;

use super::{FileError, Item, ParseError, ParsedRecord, Rejected, Sink, SourceRecordBody};

/// The largest NDJSON line or Bundle entry accepted, in bytes. It bounds the memory one
/// record may take; the largest real resources (Binary, DocumentReference with inline
/// attachments) stay well below it.
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

/// A UTF-8 byte order mark, which Windows tools put in front of JSON files.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Bundle types that carry a set of independent resources. `document`, `message` and
/// `history` Bundles mean something else and are refused rather than half-understood.
const BUNDLE_TYPES: [&str; 4] = ["collection", "transaction", "batch", "searchset"];

/// Reference elements that point at the patient a resource belongs to, in the order
/// they are tried: `subject` (Observation, Encounter, Condition...), `patient`
/// (Immunization, AllergyIntolerance, Claim...), `beneficiary` (Coverage).
const PATIENT_REFERENCE_ELEMENTS: [&str; 3] = ["subject", "patient", "beneficiary"];

/// Every message serde_json 1.x can produce for a syntax or EOF error. They are fixed
/// strings without file content, so a rejection reason may quote them; any other
/// message (for example a future one that quotes input) is replaced by its category.
const SERDE_JSON_MESSAGES: [&str; 23] = [
    "EOF while parsing a list",
    "EOF while parsing an object",
    "EOF while parsing a string",
    "EOF while parsing a value",
    "expected `:`",
    "expected `,` or `]`",
    "expected `,` or `}`",
    "expected ident",
    "expected value",
    "expected `\"`",
    "invalid escape",
    "invalid number",
    "number out of range",
    "invalid unicode code point",
    "control character (\\u0000-\\u001F) found while parsing a string",
    "key must be a string",
    "invalid value: expected key to be a number in quotes",
    "float key must be finite (got NaN or +/-inf)",
    "lone leading surrogate in hex escape",
    "trailing comma",
    "trailing characters",
    "unexpected end of hex escape",
    "recursion limit exceeded",
];

/// The patient a resource belongs to, so records can be grouped per patient before any
/// matching: a Patient's own `id`; for other resources the id in the first
/// `subject`/`patient`/`beneficiary` reference that points at a Patient
/// (`"Patient/123"` → `"123"`, `"https://x/fhir/Patient/123/_history/2"` → `"123"`,
/// `"urn:uuid:abc"` → `"abc"`). References to a Group, a contained resource (`#p1`) or
/// by identifier only give `None`, as does a resource without any of these elements.
pub fn patient_link(resource: &Value) -> Option<String> {
    let resource = resource.as_object()?;
    if resource.get("resourceType").and_then(Value::as_str) == Some("Patient") {
        return resource
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .map(str::to_owned);
    }
    PATIENT_REFERENCE_ELEMENTS
        .iter()
        .filter_map(|element| resource.get(*element))
        .find_map(patient_in_reference)
}

/// A Reference (or a list of them, as in `Account.subject`) to a Patient → its id.
fn patient_in_reference(reference: &Value) -> Option<String> {
    match reference {
        Value::Array(references) => references.iter().find_map(patient_in_reference),
        Value::Object(reference) => {
            // An explicit `type` wins: `urn:uuid:` references do not name the type.
            if let Some(kind) = reference.get("type").and_then(Value::as_str) {
                if kind != "Patient" {
                    return None;
                }
            }
            reference
                .get("reference")
                .and_then(Value::as_str)
                .and_then(patient_id_in_url)
        }
        _ => None,
    }
}

/// The Patient id in a reference or a `fullUrl`: `urn:uuid:<id>`, or a relative or
/// absolute URL whose last segments are `Patient/<id>` (a version suffix is dropped).
fn patient_id_in_url(url: &str) -> Option<String> {
    let url = url.trim();
    let id = match url.strip_prefix("urn:uuid:") {
        Some(uuid) => uuid,
        None => {
            let path = url.split(['?', '#']).next().unwrap_or_default();
            let path = path.split_once("/_history/").map_or(path, |(path, _)| path);
            let mut segments = path.rsplit('/');
            let id = segments.next()?;
            if segments.next()? != "Patient" {
                return None;
            }
            id
        }
    };
    (!id.is_empty()).then(|| id.to_owned())
}

// ---------------------------------------------------------------------------------
// NDJSON
// ---------------------------------------------------------------------------------

/// Parses FHIR NDJSON (one resource per line), pushing one item per non-blank line.
///
/// `position` is the 1-based line number, `content` the resource and `original` the line
/// without its terminator. Bad lines become [`Item::Rejected`] (`invalid_utf8`,
/// `json_syntax`, `not_a_resource`, `missing_resource_type`, `record_too_large`) and
/// parsing goes on, because one bad line in a million-line export must not cost the rest.
/// A file with no non-blank line is [`FileError::Empty`].
pub fn parse_ndjson<R: BufRead>(reader: R, sink: &mut Sink<'_>) -> Result<(), ParseError> {
    parse_ndjson_with_limit(reader, sink, MAX_RECORD_BYTES)
}

/// [`parse_ndjson`] with the record size limit as a parameter, so tests can exercise
/// it without 16 MB inputs.
fn parse_ndjson_with_limit<R: BufRead>(
    reader: R,
    sink: &mut Sink<'_>,
    limit: usize,
) -> Result<(), ParseError> {
    let mut lines = LineReader::new(reader, limit);
    let mut line_number: u64 = 0;
    let mut saw_record = false;
    while let Some(line) = lines.next_line().map_err(|e| FileError::io(&e))? {
        line_number += 1;
        let item = match line {
            Line::Blank => continue,
            Line::TooLarge => rejected(
                line_number,
                "record_too_large",
                format!("line {line_number}: longer than {limit} bytes"),
            ),
            Line::Text => ndjson_item(line_number, &lines.buf),
        };
        saw_record = true;
        sink(item)?;
    }
    if saw_record {
        Ok(())
    } else {
        Err(FileError::Empty.into())
    }
}

/// What [`LineReader::next_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// A line with content, now in the reader's buffer.
    Text,
    /// Empty or only whitespace: no record.
    Blank,
    /// Longer than the limit; it was skipped without being kept.
    TooLarge,
}

/// Reads lines into one reused buffer that never grows beyond the limit: `BufRead::
/// read_until` would buffer a 2 GB line whole before we could look at its length.
struct LineReader<R> {
    reader: R,
    /// The current line without its terminator (and without a BOM on line 1).
    buf: Vec<u8>,
    limit: usize,
    first: bool,
}

impl<R: BufRead> LineReader<R> {
    fn new(reader: R, limit: usize) -> Self {
        LineReader {
            reader,
            buf: Vec::new(),
            limit,
            first: true,
        }
    }

    /// The next line, `None` at the end of the input.
    fn next_line(&mut self) -> io::Result<Option<Line>> {
        self.buf.clear();
        let mut started = false;
        let mut overflow = false;
        let mut overflow_blank = true;
        loop {
            let (used, done) = {
                let available = match self.reader.fill_buf() {
                    Ok(available) => available,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                if available.is_empty() {
                    break;
                }
                started = true;
                let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
                    Some(end) => (available.get(..end).unwrap_or_default(), true),
                    None => (available, false),
                };
                if overflow {
                    overflow_blank = overflow_blank && is_blank(chunk);
                } else {
                    // One byte over the limit leaves room for the `\r` of a `\r\n`.
                    let room = self.limit.saturating_add(1).saturating_sub(self.buf.len());
                    if chunk.len() <= room {
                        self.buf.extend_from_slice(chunk);
                    } else {
                        overflow = true;
                        overflow_blank = is_blank(&self.buf) && is_blank(chunk);
                        self.buf.clear();
                    }
                }
                (chunk.len().saturating_add(usize::from(done)), done)
            };
            self.reader.consume(used);
            if done {
                break;
            }
        }
        if !started {
            return Ok(None);
        }
        let first = std::mem::replace(&mut self.first, false);
        if overflow {
            return Ok(Some(if overflow_blank {
                Line::Blank
            } else {
                Line::TooLarge
            }));
        }
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        if first && self.buf.starts_with(BOM) {
            self.buf.drain(..BOM.len());
        }
        if is_blank(&self.buf) {
            Ok(Some(Line::Blank))
        } else if self.buf.len() > self.limit {
            self.buf.clear();
            Ok(Some(Line::TooLarge))
        } else {
            Ok(Some(Line::Text))
        }
    }
}

/// JSON whitespace only (space, tab, CR, LF), or nothing.
fn is_blank(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

/// One non-blank NDJSON line → a record or a rejection.
fn ndjson_item(line: u64, bytes: &[u8]) -> Item {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let byte = e.valid_up_to().saturating_add(1);
            return rejected(
                line,
                "invalid_utf8",
                format!("line {line}, byte {byte}: not valid UTF-8"),
            );
        }
    };
    let resource: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => {
            let column = e.column();
            let what = json_error_text(&e);
            return rejected(
                line,
                "json_syntax",
                format!("line {line}, column {column}: {what}"),
            );
        }
    };
    if !resource.is_object() {
        let kind = json_kind(&resource);
        return rejected(
            line,
            "not_a_resource",
            format!("line {line}: a JSON {kind} is not a resource object"),
        );
    }
    let Some(record_type) = resource_type_of(&resource) else {
        return rejected(
            line,
            "missing_resource_type",
            format!("line {line}: the object has no string resourceType"),
        );
    };
    Item::Record(ParsedRecord {
        position: line,
        record_type,
        body: SourceRecordBody {
            patient_link: patient_link(&resource),
            content: resource,
            original: text.to_owned(),
        },
    })
}

// ---------------------------------------------------------------------------------
// Bundle
// ---------------------------------------------------------------------------------

/// Parses one FHIR Bundle, pushing one item per `entry` while the file is still being
/// read, so memory stays bounded by the largest entry however big the Bundle is.
///
/// `position` is the 1-based entry index, `content` the entry object as it appears
/// (`fullUrl`, `resource`, `request`...: `urn:uuid:` references stay resolvable) and
/// `original` the entry's JSON text exactly as in the file.
///
/// The top level must have `resourceType` `Bundle` and a `type` among `collection`,
/// `transaction`, `batch` and `searchset`, else [`FileError::NotABundle`]. Both are
/// checked as soon as they are read; when they come after `entry` the entries have
/// already been pushed by the time the error is returned, and stay pushed (the caller
/// discards the batch on a file error).
///
/// Bad entries become [`Item::Rejected`] (`bundle_entry_no_resource`,
/// `missing_resource_type`, `record_too_large`, `json_syntax` for nesting deeper than
/// serde_json's recursion limit). An entry over [`MAX_RECORD_BYTES`] is detected once
/// it has been read, so it is held in memory briefly before being dropped. Malformed
/// JSON (including invalid UTF-8 and a truncated file) cannot be resynchronised inside
/// one document and is a [`FileError::Json`]; items pushed before it stay pushed.
pub fn parse_bundle<R: Read>(reader: R, sink: &mut Sink<'_>) -> Result<(), ParseError> {
    parse_bundle_with_limit(reader, sink, MAX_RECORD_BYTES)
}

/// [`parse_bundle`] with the record size limit as a parameter, for tests.
fn parse_bundle_with_limit<R: Read>(
    reader: R,
    sink: &mut Sink<'_>,
    limit: usize,
) -> Result<(), ParseError> {
    let reader = skip_bom(reader).map_err(|e| FileError::io(&e))?;
    let mut probe = ContentProbe {
        inner: reader,
        saw_content: false,
    };
    let mut state = BundleState {
        sink,
        limit,
        entries: 0,
        stop: None,
        in_object: false,
        saw_resource_type: false,
        saw_type: false,
    };
    let result = {
        // Positions in errors count from after a BOM, which is at most one column off.
        let mut de = serde_json::Deserializer::from_reader(BufReader::new(&mut probe));
        (&mut de)
            .deserialize_map(BundleVisitor { state: &mut state })
            .and_then(|()| de.end())
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) => Err(state.into_error(e, probe.saw_content)),
    }
}

/// Why the visitor stopped serde, kept beside the serde error: serde_json's error type
/// can only carry a message, and matching on message text would confuse a sink's Halt
/// with a file that happens to contain the same words.
#[derive(Debug)]
enum Stop {
    Halted,
    NotABundle(String),
}

/// What the visitors share while walking the Bundle.
struct BundleState<'s, 'a> {
    sink: &'s mut Sink<'a>,
    limit: usize,
    /// Entries seen so far, i.e. the position of the last one.
    entries: u64,
    stop: Option<Stop>,
    /// Whether the top level turned out to be an object: a type mismatch before that
    /// means "not a Bundle" rather than malformed JSON.
    in_object: bool,
    saw_resource_type: bool,
    saw_type: bool,
}

impl BundleState<'_, '_> {
    /// Records why parsing stops and returns the serde error that unwinds serde.
    fn stop<E: de::Error>(&mut self, stop: Stop) -> E {
        self.stop = Some(stop);
        E::custom("parsing stopped by the FHIR Bundle parser")
    }

    /// Maps the error serde returned to the real reason parsing stopped.
    fn into_error(self, e: serde_json::Error, saw_content: bool) -> ParseError {
        match self.stop {
            Some(Stop::Halted) => return ParseError::Halted,
            Some(Stop::NotABundle(why)) => return FileError::NotABundle(why).into(),
            None => {}
        }
        match e.classify() {
            Category::Io => FileError::io(&io::Error::from(e)).into(),
            Category::Eof if !saw_content => FileError::Empty.into(),
            Category::Data if !self.in_object => {
                FileError::NotABundle("the top-level JSON value is not an object".to_owned()).into()
            }
            category => FileError::Json {
                line: e.line(),
                column: e.column(),
                kind: category_name(category).to_owned(),
            }
            .into(),
        }
    }
}

/// The top-level object: checks `resourceType` and `type`, streams `entry`, skips the rest.
struct BundleVisitor<'v, 's, 'a> {
    state: &'v mut BundleState<'s, 'a>,
}

impl<'de> Visitor<'de> for BundleVisitor<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a FHIR Bundle object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let state = self.state;
        state.in_object = true;
        while let Some(key) = map.next_key::<BundleKey>()? {
            match key {
                BundleKey::ResourceType => {
                    state.saw_resource_type = true;
                    let StringOrOther(found) = map.next_value()?;
                    if found.as_deref() != Some("Bundle") {
                        let why = describe_resource_type(found.as_deref());
                        return Err(state.stop(Stop::NotABundle(why)));
                    }
                }
                BundleKey::Type => {
                    state.saw_type = true;
                    let StringOrOther(found) = map.next_value()?;
                    if !found.as_deref().is_some_and(|t| BUNDLE_TYPES.contains(&t)) {
                        let why = describe_bundle_type(found.as_deref());
                        return Err(state.stop(Stop::NotABundle(why)));
                    }
                }
                BundleKey::Entry => map.next_value_seed(EntriesSeed { state: &mut *state })?,
                BundleKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !state.saw_resource_type {
            let why = "resourceType is missing".to_owned();
            return Err(state.stop(Stop::NotABundle(why)));
        }
        if !state.saw_type {
            let why = "type is missing".to_owned();
            return Err(state.stop(Stop::NotABundle(why)));
        }
        Ok(())
    }
}

/// The top-level keys the parser looks at; reading keys this way allocates nothing.
enum BundleKey {
    ResourceType,
    Type,
    Entry,
    Other,
}

impl<'de> de::Deserialize<'de> for BundleKey {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_identifier(BundleKeyVisitor)
    }
}

struct BundleKeyVisitor;

impl Visitor<'_> for BundleKeyVisitor {
    type Value = BundleKey;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Bundle element name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<BundleKey, E> {
        Ok(match key {
            "resourceType" => BundleKey::ResourceType,
            "type" => BundleKey::Type,
            "entry" => BundleKey::Entry,
            _ => BundleKey::Other,
        })
    }
}

/// A string, or `None` for any other JSON value (which is consumed without being kept,
/// so a huge non-string `resourceType` costs no memory).
struct StringOrOther(Option<String>);

impl<'de> de::Deserialize<'de> for StringOrOther {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StringOrOtherVisitor)
    }
}

struct StringOrOtherVisitor;

impl<'de> Visitor<'de> for StringOrOtherVisitor {
    type Value = StringOrOther;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<StringOrOther, E> {
        Ok(StringOrOther(Some(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<StringOrOther, E> {
        Ok(StringOrOther(Some(v)))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<StringOrOther, E> {
        Ok(StringOrOther(None))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<StringOrOther, E> {
        Ok(StringOrOther(None))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<StringOrOther, E> {
        Ok(StringOrOther(None))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<StringOrOther, E> {
        Ok(StringOrOther(None))
    }

    fn visit_unit<E: de::Error>(self) -> Result<StringOrOther, E> {
        Ok(StringOrOther(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StringOrOther, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(StringOrOther(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StringOrOther, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(StringOrOther(None))
    }
}

/// The value of `entry`: must be an array, walked one element at a time.
struct EntriesSeed<'v, 's, 'a> {
    state: &'v mut BundleState<'s, 'a>,
}

impl<'de> DeserializeSeed<'de> for EntriesSeed<'_, '_, '_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl EntriesSeed<'_, '_, '_> {
    fn not_an_array<E: de::Error>(self) -> Result<(), E> {
        let why = "entry is not an array".to_owned();
        Err(self.state.stop(Stop::NotABundle(why)))
    }
}

impl<'de> Visitor<'de> for EntriesSeed<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of Bundle entries")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let state = self.state;
        // Each entry is read as raw text (no tree yet), handed on, then dropped.
        while let Some(raw) = seq.next_element::<Box<RawValue>>()? {
            state.entries += 1;
            let item = bundle_item(state.entries, raw, state.limit);
            if (state.sink)(item).is_err() {
                return Err(state.stop(Stop::Halted));
            }
        }
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.not_an_array()
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.not_an_array()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.not_an_array()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.not_an_array()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.not_an_array()
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.not_an_array()
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.not_an_array()
    }
}

/// One Bundle entry's raw JSON → a record or a rejection.
fn bundle_item(position: u64, raw: Box<RawValue>, limit: usize) -> Item {
    let size = raw.get().len();
    if size > limit {
        return rejected(
            position,
            "record_too_large",
            format!("entry {position}: {size} bytes, more than {limit}"),
        );
    }
    let entry: Value = match serde_json::from_str(raw.get()) {
        Ok(entry) => entry,
        // The raw text is valid JSON, so only the nesting limit can fail here.
        Err(e) => {
            let what = json_error_text(&e);
            return rejected(position, "json_syntax", format!("entry {position}: {what}"));
        }
    };
    let Some(fields) = entry.as_object() else {
        let kind = json_kind(&entry);
        return rejected(
            position,
            "bundle_entry_no_resource",
            format!("entry {position}: a JSON {kind} is not a Bundle entry object"),
        );
    };
    let Some(resource) = fields.get("resource") else {
        return rejected(
            position,
            "bundle_entry_no_resource",
            format!("entry {position}: the entry has no resource"),
        );
    };
    if !resource.is_object() {
        let kind = json_kind(resource);
        return rejected(
            position,
            "bundle_entry_no_resource",
            format!("entry {position}: the resource is a JSON {kind}, not an object"),
        );
    }
    let Some(record_type) = resource_type_of(resource) else {
        return rejected(
            position,
            "missing_resource_type",
            format!("entry {position}: the resource has no string resourceType"),
        );
    };
    // In a transaction Bundle a new Patient often has no id yet; other entries then
    // reference it by its `urn:uuid:` fullUrl, so that is its link too.
    let patient_link = patient_link(resource).or_else(|| {
        if record_type == "Patient" {
            fields
                .get("fullUrl")
                .and_then(Value::as_str)
                .and_then(patient_id_in_url)
        } else {
            None
        }
    });
    let original: Box<str> = raw.into();
    Item::Record(ParsedRecord {
        position,
        record_type,
        body: SourceRecordBody {
            patient_link,
            content: entry,
            original: original.into_string(),
        },
    })
}

/// Drops a leading UTF-8 BOM, which serde_json would otherwise reject as a syntax error.
/// Reads up to three bytes itself, since a reader may hand them over one at a time.
fn skip_bom<R: Read>(mut reader: R) -> io::Result<io::Chain<io::Cursor<Vec<u8>>, R>> {
    let mut head = [0u8; 3];
    let mut filled = 0;
    while let Some(rest) = head.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        match reader.read(rest) {
            Ok(0) => break,
            Ok(n) => filled = filled.saturating_add(n).min(BOM.len()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let head = head.get(..filled).unwrap_or_default();
    let kept = if head == BOM {
        Vec::new()
    } else {
        head.to_vec()
    };
    Ok(io::Cursor::new(kept).chain(reader))
}

/// Notes whether anything but whitespace went through, to tell an empty file (a
/// [`FileError::Empty`]) from a truncated one (malformed JSON) when serde hits EOF.
struct ContentProbe<R> {
    inner: R,
    saw_content: bool,
}

impl<R: Read> Read for ContentProbe<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if !self.saw_content {
            self.saw_content = buf.get(..n).is_some_and(|read| !is_blank(read));
        }
        Ok(n)
    }
}

/// A Bundle's `resourceType` for an error message. Only a value shaped like a resource
/// type name is quoted, so a stray value from a non-FHIR file is never echoed.
fn describe_resource_type(found: Option<&str>) -> String {
    match found {
        None => "resourceType is not a string".to_owned(),
        Some(name)
            if (1..=64).contains(&name.len())
                && name.starts_with(|c: char| c.is_ascii_uppercase())
                && name.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            format!("resourceType is {name}")
        }
        Some(_) => "resourceType is not a FHIR resource type name".to_owned(),
    }
}

/// A Bundle's `type` for an error message; quoted only when shaped like a type code.
fn describe_bundle_type(found: Option<&str>) -> String {
    let expected = "expected collection, transaction, batch or searchset";
    match found {
        None => format!("type is not a string; {expected}"),
        Some(code)
            if (1..=40).contains(&code.len())
                && code.chars().all(|c| c.is_ascii_lowercase() || c == '-') =>
        {
            format!("type is {code}; {expected}")
        }
        Some(_) => format!("type is not a Bundle type code; {expected}"),
    }
}

// ---------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------

/// A resource's non-empty string `resourceType`.
fn resource_type_of(resource: &Value) -> Option<String> {
    resource
        .get("resourceType")
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
}

fn rejected(position: u64, error_kind: &'static str, reason: String) -> Item {
    Item::Rejected(Rejected {
        position,
        error_kind,
        reason,
    })
}

/// A serde_json error's message without its position, if it is one of the known fixed
/// messages; otherwise only its category (a data error may quote the input).
fn json_error_text(e: &serde_json::Error) -> &'static str {
    let text = e.to_string();
    let message = text
        .rsplit_once(" at line ")
        .map_or(text.as_str(), |(m, _)| m);
    SERDE_JSON_MESSAGES
        .iter()
        .copied()
        .find(|known| *known == message)
        .unwrap_or_else(|| category_name(e.classify()))
}

fn category_name(category: Category) -> &'static str {
    match category {
        Category::Io => "io",
        Category::Syntax => "syntax",
        Category::Data => "data",
        Category::Eof => "eof",
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::super::Halt;
    use super::*;
    use proptest::prelude::*;

    const TRANSACTION: &[u8] = include_bytes!("../../fixtures/fhir/bundle_transaction.json");
    const COLLECTION: &[u8] = include_bytes!("../../fixtures/fhir/bundle_collection.json");
    const EXPORT_PATIENT: &[u8] = include_bytes!("../../fixtures/fhir/export_patient.ndjson");
    const EXPORT_OBSERVATION: &[u8] =
        include_bytes!("../../fixtures/fhir/export_observation.ndjson");

    /// The Patient in the transaction fixture; every entry links to it.
    const TX_PATIENT: &str = "5cbc121b-cd71-4428-b8b7-31e53eba8184";
    /// A small valid Patient and an Observation about it.
    const P1: &str = r#"{"resourceType":"Patient","id":"p1","name":[{"family":"Brekke496","given":["Aaron697"]}]}"#;
    const OBS: &str = r#"{"resourceType":"Observation","subject":{"reference":"Patient/p1"}}"#;

    #[derive(Clone, Copy, Debug)]
    enum Format {
        Ndjson,
        Bundle,
    }
    use Format::{Bundle, Ndjson};

    type Outcome = (Vec<Item>, Result<(), ParseError>);

    /// A reader that hands out at most `step` bytes per read, to move chunk boundaries.
    struct Trickle<'d> {
        data: &'d [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            let (head, rest) = self.data.split_at(n);
            buf[..n].copy_from_slice(head);
            self.data = rest;
            Ok(n)
        }
    }

    /// Hands out `data`, then fails like a truncated gzip stream would.
    struct FailingReader<'d> {
        data: &'d [u8],
    }

    impl Read for FailingReader<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.data.is_empty() {
                return Err(io::Error::other("corrupt deflate stream"));
            }
            self.data.read(buf)
        }
    }

    fn parse_with<R: Read>(
        format: Format,
        reader: R,
        buffer: usize,
        limit: usize,
        halt_after: Option<usize>,
    ) -> Outcome {
        let mut items = Vec::new();
        let result = {
            let mut sink = |item: Item| {
                items.push(item);
                match halt_after {
                    Some(n) if items.len() >= n => Err(Halt),
                    _ => Ok(()),
                }
            };
            match format {
                Ndjson => parse_ndjson_with_limit(
                    BufReader::with_capacity(buffer, reader),
                    &mut sink,
                    limit,
                ),
                Bundle => parse_bundle_with_limit(reader, &mut sink, limit),
            }
        };
        (items, result)
    }

    /// One line per outcome: `position type link` for a record, `position !kind` for a
    /// rejection, then how parsing ended.
    fn summary((items, result): &Outcome) -> String {
        let mut parts: Vec<String> = items
            .iter()
            .map(|item| match item {
                Item::Record(r) => format!(
                    "{} {} {}",
                    r.position,
                    r.record_type,
                    r.body.patient_link.as_deref().unwrap_or("-")
                ),
                Item::Rejected(r) => format!("{} !{}", r.position, r.error_kind),
            })
            .collect();
        parts.push(match result {
            Ok(()) => "ok".to_owned(),
            Err(ParseError::Halted) => "halted".to_owned(),
            Err(ParseError::File(FileError::Json { kind, .. })) => format!("json {kind}"),
            Err(ParseError::File(FileError::NotABundle(why))) => format!("not_a_bundle: {why}"),
            Err(ParseError::File(e)) => e.kind().to_owned(),
        });
        parts.join("; ")
    }

    /// Words of the input that look like PHI in the fixtures: Synthea names and ids mix
    /// letters and digits, and fake SSNs start with `999-`.
    fn phi_tokens(input: &[u8]) -> Vec<String> {
        let text = String::from_utf8_lossy(input);
        let mut tokens: Vec<String> = text
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|t| {
                t.len() >= 5
                    && t.chars().any(|c| c.is_ascii_digit())
                    && t.chars().any(|c| c.is_ascii_alphabetic())
            })
            .map(str::to_owned)
            .collect();
        tokens.push("999-".to_owned());
        tokens
    }

    /// Parses `input` with several read chunkings, checks that they agree, that no
    /// reason or file error quotes the input, that positions increase and that every
    /// record's `original` is text of the input whose JSON is its `content`; then
    /// compares the summary with `expected`.
    fn check_with(format: Format, input: &[u8], limit: usize, halt: Option<usize>, expected: &str) {
        let outcome = parse_with(
            format,
            Trickle {
                data: input,
                step: usize::MAX,
            },
            8192,
            limit,
            halt,
        );
        for (step, buffer) in [(1, 1), (3, 2), (7, 5)] {
            let other = parse_with(format, Trickle { data: input, step }, buffer, limit, halt);
            assert_eq!(
                other, outcome,
                "chunking {step}/{buffer} differs for {expected}"
            );
        }
        let tokens = phi_tokens(input);
        let mut messages: Vec<String> = outcome
            .0
            .iter()
            .filter_map(|item| match item {
                Item::Rejected(r) => Some(r.reason.clone()),
                Item::Record(_) => None,
            })
            .collect();
        if let Err(e) = &outcome.1 {
            messages.push(e.to_string());
        }
        for message in &messages {
            for token in &tokens {
                assert!(
                    !message.contains(token.as_str()),
                    "{message:?} quotes {token:?}"
                );
            }
        }
        let positions: Vec<u64> = outcome.0.iter().map(Item::position).collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "positions {positions:?}"
        );
        for item in &outcome.0 {
            if let Item::Record(r) = item {
                let reparsed: Value = serde_json::from_str(&r.body.original).unwrap();
                assert_eq!(reparsed, r.body.content);
                assert!(
                    input
                        .windows(r.body.original.len())
                        .any(|w| w == r.body.original.as_bytes()),
                    "original of {} is not input text",
                    r.position
                );
            }
        }
        assert_eq!(summary(&outcome), expected);
    }

    fn check(format: Format, input: &[u8], expected: &str) {
        check_with(format, input, MAX_RECORD_BYTES, None, expected);
    }

    fn run(format: Format, input: &[u8]) -> Vec<Item> {
        let (items, result) = parse_with(format, input, 8192, MAX_RECORD_BYTES, None);
        assert_eq!(result, Ok(()));
        items
    }

    fn records(items: &[Item]) -> Vec<&ParsedRecord> {
        items
            .iter()
            .filter_map(|item| match item {
                Item::Record(r) => Some(r),
                Item::Rejected(_) => None,
            })
            .collect()
    }

    fn reasons(items: &[Item]) -> Vec<&str> {
        items
            .iter()
            .filter_map(|item| match item {
                Item::Rejected(r) => Some(r.reason.as_str()),
                Item::Record(_) => None,
            })
            .collect()
    }

    fn bundle(kind: &str, entries: &[&str]) -> Vec<u8> {
        format!(
            r#"{{"resourceType":"Bundle","type":"{kind}","entry":[{}]}}"#,
            entries.join(",")
        )
        .into_bytes()
    }

    fn entry(resource: &str) -> String {
        format!(r#"{{"fullUrl":"urn:uuid:e-1","resource":{resource}}}"#)
    }

    // ----- NDJSON -----

    #[test]
    fn ndjson_fixtures_with_bom_crlf_and_blank_line() {
        let a = "a1b2c3d4-0001-4000-8000-000000000001";
        let b = "a1b2c3d4-0002-4000-8000-000000000002";
        let c = "a1b2c3d4-0003-4000-8000-000000000003";
        check(
            Ndjson,
            EXPORT_PATIENT,
            &format!("1 Patient {a}; 2 Patient {b}; 4 Patient {c}; ok"),
        );
        check(
            Ndjson,
            EXPORT_OBSERVATION,
            &format!(
                "1 Observation {a}; 2 Observation {a}; 3 Observation {b}; 4 Observation {c}; ok"
            ),
        );
        let items = run(Ndjson, EXPORT_PATIENT);
        for record in records(&items) {
            assert!(record.body.original.starts_with('{'), "BOM kept");
            assert!(record.body.original.ends_with('}'), "CR kept");
            assert_eq!(record.body.content["resourceType"], "Patient");
        }
    }

    #[test]
    fn ndjson_blank_lines_and_empty_files() {
        let cases: [(&[u8], &str); 8] = [
            (
                b"\n\n{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n \t\r\n",
                "3 Patient p1; ok",
            ),
            (
                b"{\"resourceType\":\"Patient\",\"id\":\"p1\"}",
                "1 Patient p1; ok",
            ),
            (
                b"{\"resourceType\":\"Patient\",\"id\":\"p1\"}\r\n\r\n",
                "1 Patient p1; ok",
            ),
            (b"", "empty_file"),
            (b" \n\r\n\t\n", "empty_file"),
            (b"\xEF\xBB\xBF", "empty_file"),
            (b"\xEF\xBB\xBF\r\n\n", "empty_file"),
            (b"\n\xEF\xBB\xBF{}\n", "2 !json_syntax; ok"),
        ];
        for (input, expected) in cases {
            check(Ndjson, input, expected);
        }
    }

    #[test]
    fn ndjson_bad_lines_are_rejected_without_quoting_them() {
        let input = [
            P1.as_bytes(),
            b"{\"resourceType\":\"Patient\",\"name\":\"Aaron697\xFF\"}",
            br#"{"resourceType":"Patient","name":Aaron697 Brekke496}"#,
            br#"["Aaron697","999-41-7321"]"#,
            br#""Aaron697""#,
            br#"{"name":"Brekke496","ssn":"999-41-7321"}"#,
            br#"{"resourceType":{"text":"Aaron697"}}"#,
            br#"{"resourceType":"","id":"Aaron697"}"#,
            br#"{"resourceType":"Patient","id":"p1"} "Aaron697""#,
            OBS.as_bytes(),
        ]
        .join(&b"\r\n"[..]);
        check(
            Ndjson,
            &input,
            "1 Patient p1; 2 !invalid_utf8; 3 !json_syntax; 4 !not_a_resource; \
             5 !not_a_resource; 6 !missing_resource_type; 7 !missing_resource_type; \
             8 !missing_resource_type; 9 !json_syntax; 10 Observation p1; ok",
        );
        let items = run(Ndjson, &input);
        let reasons = reasons(&items);
        assert_eq!(reasons[0], "line 2, byte 43: not valid UTF-8");
        assert_eq!(reasons[1], "line 3, column 34: expected value");
        assert_eq!(reasons[2], "line 4: a JSON array is not a resource object");
        assert_eq!(reasons[3], "line 5: a JSON string is not a resource object");
        assert_eq!(reasons[4], "line 6: the object has no string resourceType");
        assert_eq!(reasons[7], "line 9, column 38: trailing characters");
    }

    #[test]
    fn ndjson_oversized_lines_are_skipped_and_parsing_goes_on() {
        let line = r#"{"resourceType":"Patient","id":"p1"}"#;
        let input = format!(
            "{line}\r\n{line}x{line}\n{line}\n{}\n{line}",
            " ".repeat(200)
        );
        // Exactly at the limit (a CR does not count), then one byte over.
        check_with(
            Ndjson,
            input.as_bytes(),
            line.len(),
            None,
            "1 Patient p1; 2 !record_too_large; 3 Patient p1; 5 Patient p1; ok",
        );
        check_with(Ndjson, input.as_bytes(), line.len() - 1, None, "1 !record_too_large; 2 !record_too_large; 3 !record_too_large; 5 !record_too_large; ok");
        let items = run_limited(Ndjson, input.as_bytes(), line.len());
        assert_eq!(
            reasons(&items),
            [format!("line 2: longer than {} bytes", line.len())]
        );
    }

    fn run_limited(format: Format, input: &[u8], limit: usize) -> Vec<Item> {
        parse_with(format, input, 8192, limit, None).0
    }

    #[test]
    fn ndjson_line_over_16_mib_is_streamed_past() {
        let huge = io::repeat(b'x').take(MAX_RECORD_BYTES as u64 + 10);
        let (head, tail) = (format!("{P1}\n"), format!("\n{OBS}\n"));
        let reader = head.as_bytes().chain(huge).chain(tail.as_bytes());
        let outcome = parse_with(Ndjson, reader, 8192, MAX_RECORD_BYTES, None);
        assert_eq!(
            summary(&outcome),
            "1 Patient p1; 2 !record_too_large; 3 Observation p1; ok"
        );
    }

    #[test]
    fn line_reader_never_buffers_more_than_the_limit() {
        let mut input = vec![b'x'; 1 << 20];
        input.extend_from_slice(b"\n{}\n");
        let mut lines = LineReader::new(BufReader::new(&input[..]), 100);
        assert_eq!(lines.next_line().unwrap(), Some(Line::TooLarge));
        assert!(
            lines.buf.capacity() <= 1024,
            "capacity {}",
            lines.buf.capacity()
        );
        assert_eq!(lines.next_line().unwrap(), Some(Line::Text));
        assert_eq!(lines.buf, b"{}");
        assert_eq!(lines.next_line().unwrap(), None);
    }

    // ----- Bundle -----

    #[test]
    fn bundle_transaction_fixture() {
        let p = TX_PATIENT;
        check(
            Bundle,
            TRANSACTION,
            &format!(
                "1 Patient {p}; 2 Encounter {p}; 3 Observation {p}; 4 Condition {p}; \
                 5 MedicationRequest {p}; ok"
            ),
        );
        let items = run(Bundle, TRANSACTION);
        let records = records(&items);
        let observation = &records[2].body.content;
        assert_eq!(
            observation["fullUrl"],
            "urn:uuid:1f6b0c7e-8a2d-4e55-a1b3-2c4d5e6f7a80"
        );
        assert_eq!(
            observation["resource"]["subject"]["reference"],
            format!("urn:uuid:{p}")
        );
        assert_eq!(
            observation["resource"]["encounter"]["reference"],
            "urn:uuid:9e3f1a52-3f0e-4c41-9d3c-7b1e0a6c2d11"
        );
        assert_eq!(observation["request"]["method"], "POST");
        assert!(records[0].body.original.starts_with("{\n      \"fullUrl\""));
        assert!(records[4].body.original.ends_with('}'));
    }

    #[test]
    fn bundle_collection_fixture() {
        let p = "7d1e3c55-2b9a-4f0e-9c61-8a2b3c4d5e6f";
        check(
            Bundle,
            COLLECTION,
            &format!("1 Patient {p}; 2 Immunization {p}; 3 Coverage {p}; 4 Organization -; ok"),
        );
    }

    #[test]
    fn bundle_header_checks() {
        let e1 = entry(P1);
        let e2 = entry(OBS);
        let expected_types = "expected collection, transaction, batch or searchset";
        let cases: Vec<(Vec<u8>, String)> = vec![
            (format!(r#"{{"resourceType":"Bundle","entry":[{e1},{e2}],"type":"batch"}}"#).into_bytes(), "1 Patient p1; 2 Observation p1; ok".into()),
            (bundle("searchset", &[&e1]), "1 Patient p1; ok".into()),
            (format!(r#"{{"entry":[{e1}],"resourceType":"Bundle","type":"document"}}"#).into_bytes(), format!("1 Patient p1; not_a_bundle: type is document; {expected_types}")),
            (format!(r#"{{"entry":[{e1}],"type":"collection","resourceType":"Patient"}}"#).into_bytes(), "1 Patient p1; not_a_bundle: resourceType is Patient".into()),
            (br#"{"resourceType":"Patient","id":"p1","entry":[]}"#.to_vec(), "not_a_bundle: resourceType is Patient".into()),
            (bundle("message", &[&e1]), format!("not_a_bundle: type is message; {expected_types}")),
            (br#"{"type":"collection","entry":[]}"#.to_vec(), "not_a_bundle: resourceType is missing".into()),
            (br#"{"resourceType":"Bundle","entry":[]}"#.to_vec(), "not_a_bundle: type is missing".into()),
            (br#"{"resourceType":"Bundle","type":{"x":"Aaron697"}}"#.to_vec(), format!("not_a_bundle: type is not a string; {expected_types}")),
            (br#"{"resourceType":"Bundle","type":"Aaron697"}"#.to_vec(), format!("not_a_bundle: type is not a Bundle type code; {expected_types}")),
            (br#"{"resourceType":"Aaron697 Brekke496"}"#.to_vec(), "not_a_bundle: resourceType is not a FHIR resource type name".into()),
            (br#"{"resourceType":[1,2]}"#.to_vec(), "not_a_bundle: resourceType is not a string".into()),
            (br#"["Aaron697"]"#.to_vec(), "not_a_bundle: the top-level JSON value is not an object".into()),
            (br#""Aaron697""#.to_vec(), "not_a_bundle: the top-level JSON value is not an object".into()),
            (b"null".to_vec(), "not_a_bundle: the top-level JSON value is not an object".into()),
            (br#"{"resourceType":"Bundle","type":"collection","entry":{"resource":{}}}"#.to_vec(), "not_a_bundle: entry is not an array".into()),
            (br#"{"resourceType":"Bundle","type":"collection","entry":null}"#.to_vec(), "not_a_bundle: entry is not an array".into()),
            (br#"{"resourceType":"Bundle","type":"collection"}"#.to_vec(), "ok".into()),
            (bundle("transaction", &[]), "ok".into()),
            ([b"\xEF\xBB\xBF".as_slice(), &bundle("collection", &[&e1])].concat(), "1 Patient p1; ok".into()),
            (format!(r#"{{"id":"Aaron697","meta":{{"tag":[[[[1]]],{{"a":null}}]}},"resourceType":"Bundle","type":"batch","entry":[{e1}],"link":[],"total":3}}"#).into_bytes(), "1 Patient p1; ok".into()),
            (b"".to_vec(), "empty_file".into()),
            (b" \r\n\t ".to_vec(), "empty_file".into()),
            (b"\xEF\xBB\xBF\n".to_vec(), "empty_file".into()),
        ];
        for (input, expected) in cases {
            check(Bundle, &input, &expected);
        }
    }

    #[test]
    fn bundle_bad_entries_are_rejected() {
        let deep = format!(
            r#"{{"resource":{{"resourceType":"Basic","x":{}{}}}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let input = bundle(
            "collection",
            &[
                r#"{"fullUrl":"urn:uuid:Aaron697"}"#,
                "5",
                r#"{"resource":"Aaron697 Brekke496"}"#,
                r#"{"resource":{"name":"Brekke496"}}"#,
                r#"{"resource":{"resourceType":7}}"#,
                "null",
                &deep,
                &entry(P1),
            ],
        );
        check(
            Bundle,
            &input,
            "1 !bundle_entry_no_resource; 2 !bundle_entry_no_resource; \
             3 !bundle_entry_no_resource; 4 !missing_resource_type; 5 !missing_resource_type; \
             6 !bundle_entry_no_resource; 7 !json_syntax; 8 Patient p1; ok",
        );
        let items = run(Bundle, &input);
        let reasons = reasons(&items);
        assert_eq!(reasons[0], "entry 1: the entry has no resource");
        assert_eq!(
            reasons[1],
            "entry 2: a JSON number is not a Bundle entry object"
        );
        assert_eq!(
            reasons[2],
            "entry 3: the resource is a JSON string, not an object"
        );
        assert_eq!(
            reasons[3],
            "entry 4: the resource has no string resourceType"
        );
        assert_eq!(reasons[6], "entry 7: recursion limit exceeded");
    }

    #[test]
    fn bundle_oversized_entry_is_rejected_and_parsing_goes_on() {
        let big = entry(&format!(
            r#"{{"resourceType":"Basic","text":"{}"}}"#,
            "x".repeat(300)
        ));
        let input = bundle("batch", &[&entry(P1), &big, &entry(OBS)]);
        check_with(
            Bundle,
            &input,
            200,
            None,
            "1 Patient p1; 2 !record_too_large; 3 Observation p1; ok",
        );
    }

    #[test]
    fn bundle_patient_without_id_links_by_full_url() {
        let input = bundle(
            "transaction",
            &[
                r#"{"fullUrl":"urn:uuid:f00d-1","resource":{"resourceType":"Patient"}}"#,
                r#"{"fullUrl":"http://example.org/fhir/Patient/77","resource":{"resourceType":"Patient"}}"#,
                r#"{"fullUrl":"urn:uuid:f00d-2","resource":{"resourceType":"Patient","id":"own-id"}}"#,
                r#"{"fullUrl":"urn:uuid:f00d-3","resource":{"resourceType":"Location"}}"#,
                r#"{"resource":{"resourceType":"Patient"}}"#,
            ],
        );
        check(
            Bundle,
            &input,
            "1 Patient f00d-1; 2 Patient 77; 3 Patient own-id; 4 Location -; 5 Patient -; ok",
        );
    }

    #[test]
    fn bundle_malformed_json_is_a_file_error_after_earlier_items() {
        let text = std::str::from_utf8(TRANSACTION).unwrap();
        let cut = text.find("\"Observation\"").unwrap();
        let p = TX_PATIENT;
        let e1 = entry(P1);
        let cases: Vec<(Vec<u8>, String)> = vec![
            (TRANSACTION[..cut].to_vec(), format!("1 Patient {p}; 2 Encounter {p}; json eof")),
            (TRANSACTION[..TRANSACTION.len() - 3].to_vec(), format!("1 Patient {p}; 2 Encounter {p}; 3 Observation {p}; 4 Condition {p}; 5 MedicationRequest {p}; json eof")),
            (format!(r#"{{"resourceType":"Bundle","type":"batch","entry":[{e1},{{"resource":Aaron697}}]}}"#).into_bytes(), "1 Patient p1; json syntax".into()),
            (format!(r#"{{"resourceType":"Bundle","type":"batch","entry":[{e1} {e1}]}}"#).into_bytes(), "1 Patient p1; json syntax".into()),
            ([bundle("batch", &[&e1]), b" Aaron697".to_vec()].concat(), "1 Patient p1; json syntax".into()),
            ([&bundle("batch", &[&e1])[..60], b"\"Aaron697\xFF\"}]}"].concat(), "json syntax".into()),
            (br#"{"resourceType":"Bundle" "type":"batch"}"#.to_vec(), "json syntax".into()),
            (b"{".to_vec(), "json eof".into()),
            (b"\xEF\xBB".to_vec(), "json syntax".into()),
        ];
        for (input, expected) in cases {
            check(Bundle, &input, &expected);
        }
        let (_, result) = parse_with(
            Bundle,
            &b"{\n  \"resourceType\": \"Bundle\",\n  \"type\": x"[..],
            8192,
            MAX_RECORD_BYTES,
            None,
        );
        assert_eq!(
            result,
            Err(FileError::Json {
                line: 3,
                column: 11,
                kind: "syntax".into()
            }
            .into())
        );
    }

    // ----- both formats -----

    #[test]
    fn halt_stops_parsing_at_once() {
        let p = TX_PATIENT;
        check_with(
            Bundle,
            TRANSACTION,
            MAX_RECORD_BYTES,
            Some(1),
            &format!("1 Patient {p}; halted"),
        );
        check_with(
            Bundle,
            TRANSACTION,
            MAX_RECORD_BYTES,
            Some(3),
            &format!("1 Patient {p}; 2 Encounter {p}; 3 Observation {p}; halted"),
        );
        let a = "a1b2c3d4-0001-4000-8000-000000000001";
        check_with(
            Ndjson,
            EXPORT_OBSERVATION,
            MAX_RECORD_BYTES,
            Some(2),
            &format!("1 Observation {a}; 2 Observation {a}; halted"),
        );
        let rejected_first = bundle("batch", &["5", &entry(P1)]);
        check_with(
            Bundle,
            &rejected_first,
            MAX_RECORD_BYTES,
            Some(1),
            "1 !bundle_entry_no_resource; halted",
        );
        check_with(
            Ndjson,
            b"[]\n{}\n",
            MAX_RECORD_BYTES,
            Some(1),
            "1 !not_a_resource; halted",
        );
    }

    #[test]
    fn io_errors_are_file_errors_after_earlier_items() {
        let ndjson = format!("{P1}\n{OBS}\n{{\"resourceType\":");
        let outcome = parse_with(
            Ndjson,
            FailingReader {
                data: ndjson.as_bytes(),
            },
            8192,
            MAX_RECORD_BYTES,
            None,
        );
        assert_eq!(
            summary(&outcome),
            "1 Patient p1; 2 Observation p1; unreadable_file"
        );
        let bundle = format!(
            r#"{{"resourceType":"Bundle","type":"batch","entry":[{},"#,
            entry(P1)
        );
        let outcome = parse_with(
            Bundle,
            FailingReader {
                data: bundle.as_bytes(),
            },
            8192,
            MAX_RECORD_BYTES,
            None,
        );
        assert_eq!(summary(&outcome), "1 Patient p1; unreadable_file");
        assert_eq!(
            outcome.1,
            Err(FileError::Io("corrupt deflate stream".into()).into())
        );
        let outcome = parse_with(
            Bundle,
            FailingReader { data: b"" },
            8192,
            MAX_RECORD_BYTES,
            None,
        );
        assert_eq!(summary(&outcome), "unreadable_file");
    }

    #[test]
    fn public_entry_points_and_collect() {
        let items = super::super::collect(|sink| parse_ndjson(EXPORT_OBSERVATION, sink)).unwrap();
        assert_eq!(items.len(), 4);
        let items = super::super::collect(|sink| parse_bundle(COLLECTION, sink)).unwrap();
        assert_eq!(items.len(), 4);
    }

    #[test]
    fn patient_link_cases() {
        let cases: [(&str, Option<&str>); 19] = [
            (r#"{"resourceType":"Patient","id":"123"}"#, Some("123")),
            (r#"{"resourceType":"Patient"}"#, None),
            (r#"{"resourceType":"Patient","id":""}"#, None),
            (
                r#"{"resourceType":"Patient","id":"1","subject":{"reference":"Patient/2"}}"#,
                Some("1"),
            ),
            (
                r#"{"resourceType":"Observation","subject":{"reference":"Patient/123"}}"#,
                Some("123"),
            ),
            (
                r#"{"resourceType":"Observation","subject":{"reference":"https://x.org/fhir/Patient/123/_history/2"}}"#,
                Some("123"),
            ),
            (
                r#"{"resourceType":"Encounter","subject":{"reference":"urn:uuid:abc"}}"#,
                Some("abc"),
            ),
            (
                r#"{"resourceType":"Encounter","subject":{"reference":"urn:uuid:abc","type":"Patient"}}"#,
                Some("abc"),
            ),
            (
                r#"{"resourceType":"Encounter","subject":{"reference":"urn:uuid:abc","type":"Group"}}"#,
                None,
            ),
            (
                r#"{"resourceType":"Observation","subject":{"reference":"Group/9"}}"#,
                None,
            ),
            (
                r##"{"resourceType":"Observation","subject":{"reference":"#p1"}}"##,
                None,
            ),
            (
                r#"{"resourceType":"Observation","subject":{"identifier":{"value":"MRN-1"}}}"#,
                None,
            ),
            (
                r#"{"resourceType":"Observation","subject":"Patient/1"}"#,
                None,
            ),
            (
                r#"{"resourceType":"Immunization","patient":{"reference":"Patient/5"}}"#,
                Some("5"),
            ),
            (
                r#"{"resourceType":"Coverage","beneficiary":{"reference":"Patient/6"}}"#,
                Some("6"),
            ),
            (
                r#"{"resourceType":"Account","subject":[{"reference":"Group/1"},{"reference":"Patient/7"}]}"#,
                Some("7"),
            ),
            (
                r#"{"resourceType":"Claim","subject":{"reference":"Group/1"},"patient":{"reference":"Patient/8"}}"#,
                Some("8"),
            ),
            (r#"{"resourceType":"Organization","id":"o1"}"#, None),
            (r#"["Patient/1"]"#, None),
        ];
        for (resource, expected) in cases {
            let value: Value = serde_json::from_str(resource).unwrap();
            assert_eq!(patient_link(&value).as_deref(), expected, "{resource}");
        }
    }

    fn json_ish() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop::sample::select(b"{}[]\":,ab0e.-\\ \n\r\xEF\xBB\xBF\xFF".to_vec()),
            0..300,
        )
    }

    proptest! {
        #[test]
        fn ndjson_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), limit in 1usize..64, step in 1usize..9) {
            let _ = parse_with(Ndjson, Trickle { data: &bytes, step }, step, limit, None);
            let _ = parse_with(Ndjson, &bytes[..], 8192, MAX_RECORD_BYTES, None);
        }

        #[test]
        fn bundle_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), step in 1usize..9) {
            let _ = parse_with(Bundle, Trickle { data: &bytes, step }, 8192, MAX_RECORD_BYTES, None);
        }

        #[test]
        fn parsers_never_panic_on_json_like_bytes(bytes in json_ish(), limit in 1usize..64) {
            let _ = parse_with(Ndjson, &bytes[..], 8192, limit, None);
            let _ = parse_with(Bundle, &bytes[..], 8192, limit, None);
        }

        #[test]
        fn bundle_never_panics_on_a_valid_prefix_with_garbage(
            cut in 0usize..=TRANSACTION.len(),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
            json_tail in json_ish(),
        ) {
            for tail in [&tail, &json_tail] {
                let input = [&TRANSACTION[..cut], tail.as_slice()].concat();
                let (items, _) = parse_with(Bundle, &input[..], 8192, MAX_RECORD_BYTES, None);
                prop_assert!(items.len() <= 5 + tail.len());
            }
        }
    }
}
