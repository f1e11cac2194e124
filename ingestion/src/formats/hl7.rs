//! HL7 v2.x ingestion: splits a file into messages in bounded memory and turns each into a record.
//!
//! A file may hold back-to-back messages, FHS/BHS batches or MLLP frames, with `\r`, `\n` or
//! `\r\n` segment terminators. The reader works one segment line at a time and holds at most one
//! message (bounded by [`MAX_MESSAGE_BYTES`]), so a 2 GB feed costs no more memory than its
//! largest message. Each message becomes a [`ParsedRecord`] whose `content` is
//!
//! ```json
//! {"message_type": "ADT^A01", "control_id": "MSG00001", "version": "2.5.1",
//!  "segments": [{"id": "MSH", "fields": [[[["|"]]], [[["^~\\&"]]], ...]}, ...]}
//! ```
//!
//! where `fields[n-1]` is field n, a field is a list of repetitions (`[]` when empty), a
//! repetition a list of components and a component a list of subcomponent strings with escape
//! sequences decoded. The shape is declared once, in `pipeline::hl7`, with its writer (used
//! here) and its reader (used downstream), so that `PID-5.1` means the same thing everywhere.
//!
//! `message_type` (and the record type) is MSH-9.1`^`MSH-9.2, just MSH-9.1 when there is no
//! trigger event; when MSH-9 is empty it is `null` and the record type is `HL7`. `control_id`
//! (MSH-10) and `version` (MSH-12.1) are `null` when empty. The patient link is PID-3.1 of the
//! first repetition in the first PID. `original` is the message's segment lines with their own
//! terminators exactly as in the file; blank lines and MLLP framing bytes are not part of it.
//!
//! Splitting one segment into fields, repetitions, components and subcomponents is done by the
//! `hl7-parser` crate (with the delimiters of the message being parsed). Framing, MSH-1/MSH-2
//! handling and escape decoding are written here, because the crate's own versions do not fit
//! (see the comments on `Delimiters` and `Delimiters::decode`).

use std::io::{BufRead, ErrorKind};

use serde_json::{json, Value};

use super::{FileError, Item, ParseError, ParsedRecord, Rejected, Sink, SourceRecordBody};

/// The largest message (its segment lines with their terminators) that is parsed. A bigger one
/// is rejected as `record_too_large` and skipped without being buffered, which is what bounds
/// memory on a corrupt feed that never starts a new message.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// MLLP start-of-block byte.
const START_BLOCK: u8 = 0x0B;
/// MLLP end-of-block byte (followed by a carriage return, which is read as a blank line).
const END_BLOCK: u8 = 0x1C;
/// A UTF-8 byte-order mark, which Windows tools put at the start of text files.
const BOM: &[u8] = b"\xEF\xBB\xBF";
/// Batch and file envelope segments: legal, but not records.
const ENVELOPES: [&[u8]; 4] = [b"FHS", b"BHS", b"BTS", b"FTS"];

const KIND_BEFORE_MSH: &str = "hl7_segment_before_msh";
const KIND_UTF8: &str = "invalid_utf8";
const KIND_MESSAGE: &str = "hl7_message";
const KIND_TOO_LARGE: &str = "record_too_large";

/// Parses an HL7 v2 file and pushes one item per message (or per run of stray segments) to
/// `sink`, in file order, with positions 1, 2, 3, ...
///
/// A bad message is rejected and parsing goes on with the next one; only an unreadable, empty
/// or clearly non-HL7 file is a [`FileError`]. If the sink halts, parsing stops at once with
/// [`ParseError::Halted`].
pub fn parse<R: BufRead>(reader: R, sink: &mut Sink<'_>) -> Result<(), ParseError> {
    let mut lines = LineReader::new(reader);
    let mut out = Emitter { sink, position: 0 };
    let mut open = Open::Nothing;
    // Any non-blank line at all: tells an empty file from one without messages.
    let mut saw_content = false;
    // An MSH, an envelope segment or a line shaped like `ABC|...`. Until one is seen, stray
    // lines are not reported, so that a file that is not HL7 fails as a whole instead.
    let mut looks_hl7 = false;

    loop {
        match lines.next().map_err(|e| FileError::io(&e))? {
            Event::Eof => break,
            Event::FrameStart | Event::FrameEnd => {
                // A frame holds one message. Stray lines of a file not yet known to be HL7 stay
                // one run, so that binary data with stray 0x0B bytes still fails as not HL7.
                if looks_hl7 || !matches!(open, Open::Orphans { .. }) {
                    out.close(&mut open)?;
                }
            }
            Event::Line => {
                let line = &lines.line;
                let number = lines.number;
                if line.blank {
                    continue;
                }
                saw_content = true;
                match classify(&line.data) {
                    LineKind::Msh => {
                        looks_hl7 = true;
                        out.close(&mut open)?;
                        let mut message = MessageBuilder::new(number);
                        message.push(line, number);
                        open = Open::Message(message);
                    }
                    LineKind::Envelope => {
                        looks_hl7 = true;
                        out.close(&mut open)?;
                    }
                    LineKind::Other { segment_like } => {
                        looks_hl7 |= segment_like;
                        match &mut open {
                            Open::Message(message) => message.push(line, number),
                            Open::Orphans { last, count, .. } => {
                                *last = number;
                                *count += 1;
                            }
                            Open::Nothing => {
                                open = Open::Orphans {
                                    first: number,
                                    last: number,
                                    count: 1,
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    if !saw_content {
        return Err(FileError::Empty.into());
    }
    if !looks_hl7 {
        return Err(FileError::NotHl7(
            "no MSH segment and no line that looks like an HL7 segment".to_owned(),
        )
        .into());
    }
    out.close(&mut open)
}

// ---------------------------------------------------------------------------------------------
// Reading content back
// ---------------------------------------------------------------------------------------------

/// Reads one value from a message's content by address, e.g. `PID-5.1`, `PID-3[2].1`,
pub use pipeline::hl7::{field, get, repetitions, segment_id, segments, Address, InvalidAddress};

// ---------------------------------------------------------------------------------------------
// Framing: lines and MLLP blocks
// ---------------------------------------------------------------------------------------------

/// How a line ended, kept so that `original` reproduces the file byte for byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Cr,
    Lf,
    CrLf,
    /// End of file, or an MLLP block byte right after the line.
    Missing,
}

impl Ending {
    fn bytes(self) -> &'static [u8] {
        match self {
            Ending::Cr => b"\r",
            Ending::Lf => b"\n",
            Ending::CrLf => b"\r\n",
            Ending::Missing => b"",
        }
    }
}

/// The current line. Only its first `MAX_MESSAGE_BYTES + 1` bytes are kept: anything longer
/// makes its message too large anyway, and keeping the rest would unbound memory.
struct LineBuf {
    data: Vec<u8>,
    /// Full length of the line without its terminator, including bytes not kept.
    len: usize,
    /// Empty or only ASCII whitespace.
    blank: bool,
    ending: Ending,
}

impl LineBuf {
    const KEEP: usize = MAX_MESSAGE_BYTES + 1;

    fn clear(&mut self) {
        self.data.clear();
        self.len = 0;
        self.blank = true;
        self.ending = Ending::Missing;
    }

    fn append(&mut self, chunk: &[u8]) {
        let room = Self::KEEP.saturating_sub(self.data.len()).min(chunk.len());
        self.data
            .extend_from_slice(chunk.get(..room).unwrap_or_default());
        self.len = self.len.saturating_add(chunk.len());
        if self.blank {
            self.blank = chunk.iter().all(u8::is_ascii_whitespace);
        }
    }

    fn truncated(&self) -> bool {
        self.len > self.data.len()
    }

    /// Bytes the line takes in the file, terminator included.
    fn wire_len(&self) -> usize {
        self.len.saturating_add(self.ending.bytes().len())
    }
}

enum Event {
    /// A line is in `LineReader::line`, numbered `LineReader::number`.
    Line,
    FrameStart,
    FrameEnd,
    Eof,
}

/// Splits the input into lines at `\r`, `\n` or `\r\n`, and reports MLLP block bytes, which
/// may sit at any point of a line, as events of their own.
struct LineReader<R> {
    reader: R,
    line: LineBuf,
    /// 1-based number of the current line; every line counts, blank ones included.
    number: u64,
    /// A block byte that ended a non-empty line, reported after that line.
    pending: Option<Event>,
}

impl<R: BufRead> LineReader<R> {
    fn new(reader: R) -> Self {
        LineReader {
            reader,
            line: LineBuf {
                data: Vec::new(),
                len: 0,
                blank: true,
                ending: Ending::Missing,
            },
            number: 0,
            pending: None,
        }
    }

    fn next(&mut self) -> std::io::Result<Event> {
        if let Some(event) = self.pending.take() {
            return Ok(event);
        }
        self.line.clear();
        loop {
            let buf = fill(&mut self.reader)?;
            if buf.is_empty() {
                return Ok(if self.line.len > 0 {
                    self.line_done()
                } else {
                    Event::Eof
                });
            }
            let stop = buf
                .iter()
                .position(|&b| matches!(b, b'\r' | b'\n' | START_BLOCK | END_BLOCK));
            let chunk_len = stop.unwrap_or(buf.len());
            let stop_byte = stop.and_then(|i| buf.get(i).copied());
            self.line.append(buf.get(..chunk_len).unwrap_or_default());
            self.reader
                .consume(chunk_len + usize::from(stop_byte.is_some()));
            match stop_byte {
                None => {}
                Some(b'\n') => {
                    self.line.ending = Ending::Lf;
                    return Ok(self.line_done());
                }
                Some(b'\r') => {
                    let crlf = fill(&mut self.reader)?.first() == Some(&b'\n');
                    if crlf {
                        self.reader.consume(1);
                    }
                    self.line.ending = if crlf { Ending::CrLf } else { Ending::Cr };
                    return Ok(self.line_done());
                }
                Some(byte) => {
                    let event = if byte == START_BLOCK {
                        Event::FrameStart
                    } else {
                        Event::FrameEnd
                    };
                    if self.line.len == 0 {
                        return Ok(event);
                    }
                    self.pending = Some(event);
                    return Ok(self.line_done());
                }
            }
        }
    }

    fn line_done(&mut self) -> Event {
        self.number += 1;
        if self.number == 1 && self.line.data.starts_with(BOM) {
            self.line.data.drain(..BOM.len());
            self.line.len = self.line.len.saturating_sub(BOM.len());
            self.line.blank =
                !self.line.truncated() && self.line.data.iter().all(u8::is_ascii_whitespace);
        }
        Event::Line
    }
}

/// `fill_buf`, retrying on `Interrupted` as `read_exact` would.
fn fill<R: BufRead>(reader: &mut R) -> std::io::Result<&[u8]> {
    loop {
        match reader.fill_buf() {
            // Returning the buffer from inside the loop does not pass the borrow checker; the
            // second call below only hands back what this one buffered.
            Ok(_) => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    reader.fill_buf()
}

enum LineKind {
    Msh,
    Envelope,
    Other {
        /// Shaped like `ABC|...`: evidence that the file is HL7 even without an MSH.
        segment_like: bool,
    },
}

fn classify(data: &[u8]) -> LineKind {
    let id = data.get(..3).unwrap_or_default();
    let after = data.get(3).copied();
    if id == b"MSH" {
        // Any line starting with MSH opens a message; a malformed one is rejected as such.
        LineKind::Msh
    } else if ENVELOPES.contains(&id) && !after.is_some_and(|b| b.is_ascii_alphanumeric()) {
        LineKind::Envelope
    } else {
        LineKind::Other {
            segment_like: is_segment_id(id) && after == Some(b'|'),
        }
    }
}

/// Three upper-case ASCII letters or digits.
fn is_segment_id(id: &[u8]) -> bool {
    std::str::from_utf8(id).is_ok_and(pipeline::hl7::is_segment_id)
}

// ---------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------

/// What the parser has open: nothing, a run of segments outside any message, or a message.
enum Open {
    Nothing,
    Orphans { first: u64, last: u64, count: u64 },
    Message(MessageBuilder),
}

/// Hands items to the sink with consecutive positions.
struct Emitter<'s, 'k> {
    sink: &'s mut Sink<'k>,
    position: u64,
}

impl Emitter<'_, '_> {
    fn close(&mut self, open: &mut Open) -> Result<(), ParseError> {
        let position = self.position + 1;
        let item = match std::mem::replace(open, Open::Nothing) {
            Open::Nothing => return Ok(()),
            Open::Orphans { first, last, count } => Item::Rejected(Rejected {
                position,
                error_kind: KIND_BEFORE_MSH,
                reason: if count == 1 {
                    format!("line {first}: segment before MSH")
                } else {
                    format!("lines {first}-{last}: {count} segments before MSH")
                },
            }),
            Open::Message(message) => message.finish(position),
        };
        self.position = position;
        (self.sink)(item)?;
        Ok(())
    }
}

/// One message being read, parsed segment by segment as its lines arrive.
struct MessageBuilder {
    first_line: u64,
    /// Bytes seen so far, counted even after a failure.
    size: usize,
    /// The segment lines with their terminators; dropped on failure.
    original: Vec<u8>,
    /// Set by the MSH, which is always the first line.
    delimiters: Option<Delimiters>,
    segments: Vec<Value>,
    /// The first problem found; later lines are then only skipped.
    failure: Option<(&'static str, String)>,
}

impl MessageBuilder {
    fn new(first_line: u64) -> Self {
        MessageBuilder {
            first_line,
            size: 0,
            original: Vec::new(),
            delimiters: None,
            segments: Vec::new(),
            failure: None,
        }
    }

    fn push(&mut self, line: &LineBuf, number: u64) {
        if self.failure.is_some() {
            return;
        }
        self.size = self.size.saturating_add(line.wire_len());
        if line.truncated() || self.size > MAX_MESSAGE_BYTES {
            let reason = format!(
                "line {}: message is larger than {MAX_MESSAGE_BYTES} bytes",
                self.first_line
            );
            return self.fail(KIND_TOO_LARGE, reason);
        }
        let Ok(text) = std::str::from_utf8(&line.data) else {
            let reason = self.at(number, "message is not valid UTF-8");
            return self.fail(KIND_UTF8, reason);
        };
        let parsed = match self.delimiters {
            None => parse_msh(text).map(|(delimiters, segment)| {
                self.delimiters = Some(delimiters);
                segment
            }),
            Some(delimiters) => parse_segment(text, delimiters),
        };
        match parsed {
            Ok(segment) => {
                self.segments.push(segment);
                self.original.extend_from_slice(&line.data);
                self.original.extend_from_slice(line.ending.bytes());
            }
            Err(problem) => {
                let reason = self.at(number, &problem);
                self.fail(KIND_MESSAGE, reason);
            }
        }
    }

    /// A reason naming the line, and the message's first line when that is another one.
    fn at(&self, number: u64, problem: &str) -> String {
        if number == self.first_line {
            format!("line {number}: {problem}")
        } else {
            format!(
                "line {number}: {problem} (message starting at line {})",
                self.first_line
            )
        }
    }

    fn fail(&mut self, kind: &'static str, reason: String) {
        self.failure = Some((kind, reason));
        self.original = Vec::new();
        self.segments = Vec::new();
    }

    fn finish(self, position: u64) -> Item {
        if let Some((error_kind, reason)) = self.failure {
            return Item::Rejected(Rejected {
                position,
                error_kind,
                reason,
            });
        }
        let patient_link = self
            .segments
            .iter()
            .find(|s| segment_id(s) == Some("PID"))
            .and_then(|pid| field(pid, 3, 1, 1, 1))
            .filter(|id| !id.trim().is_empty())
            .map(str::to_owned);
        let content = pipeline::hl7::message(self.segments);
        let record_type = content["message_type"].as_str().unwrap_or("HL7").to_owned();
        let original = String::from_utf8(self.original)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        Item::Record(ParsedRecord {
            position,
            record_type,
            body: SourceRecordBody {
                patient_link,
                content,
                original,
            },
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Segments
// ---------------------------------------------------------------------------------------------

/// The delimiters of one message, from its MSH-1 and MSH-2.
///
/// Read here rather than by `hl7-parser`'s MSH parser, which assumes exactly four encoding
/// characters: it would read a v2.7 truncation character (`^~\&#`) as the start of MSH-3, and
/// it does not check that the characters are distinct. An encoding character that MSH-2 leaves
/// out is `None` (unused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Delimiters {
    field: char,
    component: Option<char>,
    repetition: Option<char>,
    escape: Option<char>,
    subcomponent: Option<char>,
    truncation: Option<char>,
}

impl Delimiters {
    /// The crate's separators. An unused one becomes `\r`, which never occurs inside a line.
    fn for_crate(self) -> hl7_parser::message::Separators {
        let unused = '\r';
        hl7_parser::message::Separators {
            field: self.field,
            component: self.component.unwrap_or(unused),
            repetition: self.repetition.unwrap_or(unused),
            escape: self.escape.unwrap_or(unused),
            subcomponent: self.subcomponent.unwrap_or(unused),
            lenient_newlines: false,
        }
    }

    /// Decodes escape sequences: `\F\ \S\ \T\ \R\ \E\` (and `\P\`, truncation, v2.7) to the
    /// delimiter, `\Xhh..\` to the bytes it names when they are UTF-8, and `\.br\` to a line
    /// break (`\n`). Other sequences (highlighting `\H\ \N\`, formatting such as `\.sp\`,
    /// character-set switches `\C..\ \M..\`, local `\Z..\`) and an escape character without a
    /// closing one are kept as written, so nothing is lost.
    ///
    /// Written here because `hl7-parser`'s decoder slices the text by char index as if it were
    /// a byte index (it panics on `é\F\`) and only knows `\X0A\` and `\X0D\`.
    fn decode(self, raw: &str) -> String {
        let Some(escape) = self.escape else {
            return raw.to_owned();
        };
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw;
        while let Some((before, after)) = rest.split_once(escape) {
            out.push_str(before);
            let Some((sequence, tail)) = after.split_once(escape) else {
                out.push(escape);
                rest = after;
                break;
            };
            if !self.decode_sequence(sequence, &mut out) {
                out.push(escape);
                out.push_str(sequence);
                out.push(escape);
            }
            rest = tail;
        }
        out.push_str(rest);
        out
    }

    /// Appends what one sequence (between escape characters) stands for, or returns false.
    fn decode_sequence(self, sequence: &str, out: &mut String) -> bool {
        let char = match sequence {
            "F" => Some(self.field),
            "S" => self.component,
            "T" => self.subcomponent,
            "R" => self.repetition,
            "E" => self.escape,
            "P" => self.truncation,
            ".br" => Some('\n'),
            _ => None,
        };
        if let Some(c) = char {
            out.push(c);
            return true;
        }
        match sequence.strip_prefix('X').and_then(decode_hex) {
            Some(text) => {
                out.push_str(&text);
                true
            }
            None => false,
        }
    }
}

/// `41` → `A`, `C3A9` → `é`; `None` unless an even number of hex digits making UTF-8.
fn decode_hex(hex: &str) -> Option<String> {
    if hex.is_empty() || !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return None;
    }
    let bytes = hex
        .as_bytes()
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// A character that can delimit: printable ASCII punctuation.
fn is_delimiter(c: char) -> bool {
    c.is_ascii_graphic() && !c.is_ascii_alphanumeric()
}

/// Parses an MSH line (which starts with `MSH`) into its delimiters and segment JSON.
fn parse_msh(text: &str) -> Result<(Delimiters, Value), String> {
    let after_id = text.get(3..).unwrap_or_default();
    let mut chars = after_id.chars();
    let field = chars
        .next()
        .ok_or("MSH segment too short: no field separator (MSH-1)")?;
    if !is_delimiter(field) {
        return Err("MSH-1 is not a valid field separator".to_owned());
    }
    let after_fs = chars.as_str();
    let encoding = after_fs.split(field).next().unwrap_or_default();
    let count = encoding.chars().count();
    if count == 0 {
        return Err("MSH-2 is empty: no encoding characters".to_owned());
    }
    if count > 5 {
        return Err("MSH-2 has more than 5 encoding characters".to_owned());
    }
    let mut seen = vec![field];
    for c in encoding.chars() {
        if !is_delimiter(c) || seen.contains(&c) {
            return Err(
                "MSH-2 encoding characters must be distinct punctuation, other than MSH-1"
                    .to_owned(),
            );
        }
        seen.push(c);
    }
    let mut enc = encoding.chars();
    let delimiters = Delimiters {
        field,
        component: enc.next(),
        repetition: enc.next(),
        escape: enc.next(),
        subcomponent: enc.next(),
        truncation: enc.next(),
    };
    let literal = |s: &str| json!([[[s]]]);
    let mut fields = vec![literal(&field.to_string()), literal(encoding)];
    // What follows MSH-2 is empty or starts with the field separator, like any other segment
    // after its id; give it an id so that the crate splits it the same way.
    let tail = after_fs.get(encoding.len()..).unwrap_or_default();
    if !tail.is_empty() {
        fields.extend(split_fields(&format!("MSH{tail}"), delimiters)?);
    }
    Ok((delimiters, pipeline::hl7::segment("MSH", fields)))
}

/// Parses a non-MSH segment line with its message's delimiters.
fn parse_segment(text: &str, delimiters: Delimiters) -> Result<Value, String> {
    let id = text
        .get(..3)
        .filter(|id| is_segment_id(id.as_bytes()))
        .ok_or("segment id is not 3 upper-case letters or digits")?;
    let after_id = text.get(3..).unwrap_or_default();
    let fields = if after_id.is_empty() {
        Vec::new()
    } else if after_id.starts_with(delimiters.field) {
        split_fields(text, delimiters).map_err(|problem| format!("segment {id}: {problem}"))?
    } else {
        return Err(format!(
            "segment {id}: id is not followed by the field separator"
        ));
    };
    Ok(pipeline::hl7::segment(id, fields))
}

/// Splits `ID|f1|f2...` into fields (after the id) with `hl7-parser`, decoding every value.
fn split_fields(text: &str, delimiters: Delimiters) -> Result<Vec<Value>, String> {
    let segment = hl7_parser::parser::parse_segment_with_separators(text, delimiters.for_crate())
        .map_err(|_| "cannot be split into fields".to_owned())?;
    if segment.raw_value().len() != text.len() {
        return Err("cannot be split into fields".to_owned());
    }
    Ok(segment
        .fields
        .iter()
        .map(|field| field_json(field, delimiters))
        .collect())
}

fn field_json(field: &hl7_parser::message::Field<'_>, delimiters: Delimiters) -> Value {
    if field.raw_value().is_empty() {
        return Value::Array(Vec::new());
    }
    Value::Array(
        field
            .repeats
            .iter()
            .map(|repetition| {
                Value::Array(
                    repetition
                        .components
                        .iter()
                        .map(|component| {
                            Value::Array(
                                component
                                    .subcomponents
                                    .iter()
                                    .map(|sub| Value::String(delimiters.decode(sub.value)))
                                    .collect(),
                            )
                        })
                        .collect(),
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::{collect, Halt};
    use proptest::prelude::*;
    use std::io::{BufReader, Cursor, Read};

    const ADT_A01: &[u8] = include_bytes!("../../fixtures/hl7/sample_adt_a01.hl7");
    const ADT_A04: &[u8] = include_bytes!("../../fixtures/hl7/sample_adt_a04.hl7");
    const ADT_A08: &[u8] = include_bytes!("../../fixtures/hl7/sample_adt_a08.hl7");
    const ORU_GENERIC: &[u8] = include_bytes!("../../fixtures/hl7/sample_oru_r01_generic.hl7");
    const ORU_LAB: &[u8] = include_bytes!("../../fixtures/hl7/sample_oru_r01_lab.hl7");

    /// What one item should be.
    enum Want<'a> {
        /// A record: its type, patient link and some `get` addresses with their values
        /// (`None` = the address must be absent).
        Record {
            record_type: &'a str,
            link: Option<&'a str>,
            values: &'a [(&'a str, Option<&'a str>)],
        },
        /// A rejection: its kind and its exact reason.
        Rejected { kind: &'static str, reason: &'a str },
    }

    fn rec<'a>(
        record_type: &'a str,
        link: Option<&'a str>,
        values: &'a [(&'a str, Option<&'a str>)],
    ) -> Want<'a> {
        Want::Record {
            record_type,
            link,
            values,
        }
    }

    fn rej<'a>(kind: &'static str, reason: &'a str) -> Want<'a> {
        Want::Rejected { kind, reason }
    }

    fn run(input: &[u8]) -> Result<Vec<Item>, FileError> {
        collect(|sink| parse(input, sink))
    }

    /// Parses `input` and checks every item in order (positions must be 1, 2, 3, ...), or
    /// the file error. Also parses it again one byte per read, which must give the same.
    fn check(input: &[u8], want: Result<&[Want<'_>], FileError>) -> Vec<Item> {
        let got = run(input);
        let slow = collect(|sink| parse(BufReader::with_capacity(1, input), sink));
        assert_eq!(got, slow, "one byte per read gives the same result");
        let want = match (got.clone(), want) {
            (Err(got), Err(want)) => {
                assert_eq!(got, want);
                return Vec::new();
            }
            (Ok(_), Ok(want)) => want,
            (got, want) => panic!("got {got:?}, want error {:?}", want.err()),
        };
        let items = got.unwrap_or_default();
        assert_eq!(items.len(), want.len(), "item count; items: {items:#?}");
        for (i, (item, want)) in items.iter().zip(want).enumerate() {
            assert_eq!(item.position(), i as u64 + 1, "position of item {i}");
            match (item, want) {
                (
                    Item::Record(r),
                    Want::Record {
                        record_type,
                        link,
                        values,
                    },
                ) => {
                    assert_eq!(r.record_type, *record_type, "record type of item {i}");
                    assert_eq!(r.body.patient_link.as_deref(), *link, "link of item {i}");
                    for (address, value) in values.iter() {
                        assert_eq!(
                            get(&r.body.content, address).as_deref(),
                            *value,
                            "{address} of item {i}"
                        );
                    }
                }
                (Item::Rejected(r), Want::Rejected { kind, reason }) => {
                    assert_eq!(r.error_kind, *kind, "kind of item {i}");
                    assert_eq!(r.reason, *reason, "reason of item {i}");
                }
                (item, _) => panic!("item {i} is not what was wanted: {item:?}"),
            }
        }
        items
    }

    fn record(item: &Item) -> &ParsedRecord {
        match item {
            Item::Record(r) => r,
            Item::Rejected(r) => panic!("expected a record, got {r:?}"),
        }
    }

    const MSH: &str = "MSH|^~\\&|APP|FAC|RCV|RFAC|20240101120000||ADT^A01|MSG00001|P|2.5.1\r";

    #[test]
    fn adt_a01_fixture() {
        check(
            ADT_A01,
            Ok(&[rec(
                "ADT^A01",
                Some("10006579"),
                &[
                    ("PID-5.1", Some("DUCK")),
                    ("PID-5", Some("DUCK")),
                    ("PID-5.2", Some("DONALD")),
                    ("PID-3.5", Some("MRN")),
                    ("PID-11.3", Some("FOWL")),
                    ("MSH-9.2", Some("A01")),
                    ("MSH-10", Some("599102")),
                    ("MSH-12", Some("2.3")),
                    ("IN1-2", Some("MEDICARE")),
                    ("PV1-7.2", Some("DISNEY")),
                ],
            )]),
        );
    }

    #[test]
    fn adt_a04_and_a08_fixtures() {
        let items = check(
            ADT_A04,
            Ok(&[rec(
                "ADT^A04",
                Some("PATID1234"),
                &[
                    ("PID-5.1", Some("JONES")),
                    ("PID-5.4", Some("III")),
                    ("PID-14", Some("(919)271-3434")),
                    ("PID-14[2]", Some("(919)277-3114")),
                    ("PID-14[3]", None),
                    ("AL1-5[2]", Some("RASH")),
                    ("NK1-2.2", Some("BARBARA")),
                ],
            )]),
        );
        let content = &record(&items[0]).body.content;
        let nk1: Vec<_> = segments(content, "NK1").collect();
        assert_eq!(nk1.len(), 2);
        assert_eq!(field(nk1[1], 2, 1, 2, 1), Some("MICHAEL"));
        assert_eq!(content["control_id"], "MSG00001");
        assert_eq!(content["version"], "2.4");
        check(ADT_A08, Ok(&[rec("ADT^A08", Some("10006579"), &[])]));
    }

    #[test]
    fn oru_r01_with_several_obx() {
        let items = check(
            ORU_GENERIC,
            Ok(&[rec(
                "ORU^R01",
                Some("12345"),
                &[
                    ("OBX-5", Some("7.0")),
                    ("OBX-3.2", Some("Wbc")),
                    ("PID-3.4.1", Some("MIE")),
                    ("PID-3.4.2", Some("1.2.840.114398.1.100")),
                    ("PID-3.4.3", Some("ISO")),
                    ("PID-3.4.4", None),
                ],
            )]),
        );
        let content = &record(&items[0]).body.content;
        let obx: Vec<_> = segments(content, "OBX").collect();
        assert_eq!(obx.len(), 14);
        assert_eq!(field(obx[3], 5, 1, 1, 1), Some("16"));
        assert_eq!(field(obx[3], 8, 1, 1, 1), Some("H"));
        assert_eq!(field(obx[13], 3, 1, 2, 1), Some("Platelets"));
        // Escaped delimiters in the lab sample are decoded.
        check(
            ORU_LAB,
            Ok(&[rec(
                "ORU^R01",
                Some("AND234DA_PID3"),
                &[
                    ("OBX-6", Some("10^9/L")),
                    ("OBX-10", Some("A")),
                    ("OBX-10[2]", Some("S")),
                    ("OBR-4.5", Some("CBC & Auto Differential")),
                    ("ZDR-2.8", Some("XAVS")),
                    ("ZPR-1", None),
                ],
            )]),
        );
    }

    #[test]
    fn back_to_back_fixtures_make_one_record_each() {
        let file = [ADT_A01, ADT_A04, ADT_A08, ORU_GENERIC, ORU_LAB].concat();
        let items = check(
            &file,
            Ok(&[
                rec("ADT^A01", Some("10006579"), &[]),
                rec("ADT^A04", Some("PATID1234"), &[]),
                rec("ADT^A08", Some("10006579"), &[]),
                rec("ORU^R01", Some("12345"), &[]),
                rec("ORU^R01", Some("AND234DA_PID3"), &[]),
            ]),
        );
        // Each message's original text is exactly its slice of the file.
        for (item, fixture) in items.iter().zip([ADT_A01, ADT_A04, ADT_A08]) {
            assert_eq!(record(item).body.original.as_bytes(), fixture);
        }
    }

    #[test]
    fn content_layout() {
        let input = format!("{MSH}PID|1||123^^^HOSP^MR~456||DOE^JANE^^^^||19800101|F|||A&B^^X\r");
        let items = check(input.as_bytes(), Ok(&[rec("ADT^A01", Some("123"), &[])]));
        let r = record(&items[0]);
        let want = json!({
            "message_type": "ADT^A01",
            "control_id": "MSG00001",
            "version": "2.5.1",
            "segments": [
                {"id": "MSH", "fields": [
                    [[["|"]]], [[["^~\\&"]]], [[["APP"]]], [[["FAC"]]], [[["RCV"]]],
                    [[["RFAC"]]], [[["20240101120000"]]], [], [[["ADT"], ["A01"]]],
                    [[["MSG00001"]]], [[["P"]]], [[["2.5.1"]]],
                ]},
                {"id": "PID", "fields": [
                    [[["1"]]], [],
                    [[["123"], [""], [""], ["HOSP"], ["MR"]], [["456"]]],
                    [], [[["DOE"], ["JANE"], [""], [""], [""], [""]]], [],
                    [[["19800101"]]], [[["F"]]], [], [],
                    [[["A", "B"], [""], ["X"]]],
                ]},
            ],
        });
        assert_eq!(r.body.content, want);
        assert_eq!(r.body.original, input);
        assert_eq!(get(&r.body.content, "MSH-1").as_deref(), Some("|"));
        assert_eq!(get(&r.body.content, "MSH-2").as_deref(), Some("^~\\&"));
        assert_eq!(get(&r.body.content, "PID-11.1.2").as_deref(), Some("B"));
        assert_eq!(get(&r.body.content, "PID-11.2").as_deref(), Some(""));
        assert_eq!(get(&r.body.content, "PID-2"), None);
        assert_eq!(repetitions(&r.body.content["segments"][1], 3), 2);
        assert_eq!(repetitions(&r.body.content["segments"][1], 2), 0);
    }

    #[test]
    fn custom_encoding_characters_per_message() {
        let input = concat!(
            "MSH#$*@%#APP#FAC#####ADT$A01#C1#P#2.5\r",
            "PID#1##ID9$$$X%Y*ID8##DOE$JANE@F@X@S@Y\r",
            // The next message goes back to the default characters...
            "MSH|^~\\&|APP|FAC|||||ORU^R01|C2|P|2.3\r",
            "PID|||ID7^^^A&B||ROE^RICHARD\\T\\SON\r",
            // ...and this one has a v2.7 truncation character.
            "MSH|^~\\&#|APP|FAC|||||ADT^A08|C3|P|2.7\r",
            "PID|||ID6||LONG\\P\\NAME#\r",
        );
        check(
            input.as_bytes(),
            Ok(&[
                rec(
                    "ADT^A01",
                    Some("ID9"),
                    &[
                        ("MSH-1", Some("#")),
                        ("MSH-2", Some("$*@%")),
                        ("MSH-3", Some("APP")),
                        ("MSH-10", Some("C1")),
                        ("PID-3.4.2", Some("Y")),
                        ("PID-3[2]", Some("ID8")),
                        ("PID-5.2", Some("JANE#X$Y")),
                    ],
                ),
                rec(
                    "ORU^R01",
                    Some("ID7"),
                    &[("PID-3.4.2", Some("B")), ("PID-5.2", Some("RICHARD&SON"))],
                ),
                rec(
                    "ADT^A08",
                    Some("ID6"),
                    &[
                        ("MSH-2", Some("^~\\&#")),
                        ("MSH-3", Some("APP")),
                        ("MSH-12", Some("2.7")),
                        ("PID-5", Some("LONG#NAME#")),
                    ],
                ),
            ]),
        );
    }

    #[test]
    fn escape_sequences() {
        let cases: &[(&str, &str)] = &[
            (r"a\F\b", "a|b"),
            (r"a\S\b", "a^b"),
            (r"a\T\b", "a&b"),
            (r"a\R\b", "a~b"),
            (r"a\E\b", "a\\b"),
            (r"\X41\\X4142\", "AAB"),
            (r"caf\XC3A9\", "café"),
            (r"é\F\ü\S\", "é|ü^"),
            (r"line1\.br\line2", "line1\nline2"),
            (r"\X0D\\X0A\", "\r\n"),
            // Not decoded, kept as written: highlighting, odd hex, non-UTF-8 hex, unterminated.
            (r"\H\bold\N\", r"\H\bold\N\"),
            (r"\X4\", r"\X4\"),
            (r"\XFF\", r"\XFF\"),
            (r"tail\", r"tail\"),
            (r"a\Fb", r"a\Fb"),
        ];
        for (raw, decoded) in cases {
            let input = format!("{MSH}OBX|1|TX|CODE||{raw}\r");
            check(
                input.as_bytes(),
                Ok(&[rec("ADT^A01", None, &[("OBX-5", Some(decoded))])]),
            );
        }
    }

    #[test]
    fn line_endings_cr_lf_crlf_and_blank_lines() {
        let body = ["PID|||42||DOE^JOHN", "OBX|1|NM|X||7"];
        let mut contents = Vec::new();
        for ending in ["\r", "\n", "\r\n"] {
            let msh = MSH.trim_end_matches('\r');
            let text = format!("{msh}{ending}{}{ending}{}{ending}", body[0], body[1]);
            // Blank and whitespace-only lines between and after messages are skipped.
            let input = format!("{ending}{text}{ending} \t{ending}{text}{ending}{ending}");
            let items = check(
                input.as_bytes(),
                Ok(&[
                    rec("ADT^A01", Some("42"), &[("OBX-5", Some("7"))]),
                    rec("ADT^A01", Some("42"), &[("PID-5.2", Some("JOHN"))]),
                ]),
            );
            assert_eq!(record(&items[0]).body.original, text);
            contents.push(record(&items[0]).body.content.clone());
        }
        assert_eq!(contents[0], contents[1]);
        assert_eq!(contents[0], contents[2]);
        // No terminator after the last segment, and a byte-order mark on the first line.
        let input = format!("\u{feff}{MSH}PID|||42");
        let items = check(input.as_bytes(), Ok(&[rec("ADT^A01", Some("42"), &[])]));
        assert_eq!(record(&items[0]).body.original, format!("{MSH}PID|||42"));
    }

    #[test]
    fn batch_file_with_three_messages() {
        let input = concat!(
            "FHS#$*@%#SENDER\r",
            "BHS|^~\\&|SENDER\r",
            "MSH|^~\\&|A|B|||||ADT^A01|1|P|2.5\rPID|||M1\r",
            "MSH|^~\\&|A|B|||||ADT^A04|2|P|2.5\rPID|||M2\rPV1|1|I\r",
            "MSH|^~\\&|A|B|||||ADT^A08|3|P|2.5\rPID|||M3\r",
            "BTS|3\r",
            "FTS|1\r",
        );
        let items = check(
            input.as_bytes(),
            Ok(&[
                rec("ADT^A01", Some("M1"), &[]),
                rec("ADT^A04", Some("M2"), &[("PV1-2", Some("I"))]),
                rec("ADT^A08", Some("M3"), &[]),
            ]),
        );
        assert_eq!(
            record(&items[2]).body.original,
            "MSH|^~\\&|A|B|||||ADT^A08|3|P|2.5\rPID|||M3\r"
        );
        // A file that is only an envelope is HL7 with no messages.
        check(b"FHS|^~\\&\rFTS|0\r", Ok(&[]));
    }

    #[test]
    fn mllp_framed_file() {
        let m1 = "MSH|^~\\&|A|B|||||ADT^A01|1|P|2.5\rPID|||M1\r";
        let m2 = "MSH|^~\\&|A|B|||||ORU^R01|2|P|2.5\rPID|||M2\rOBX|1|NM|X||5\r";
        let input = format!("\x0b{m1}\x1c\r\n \n\x0b{m2}\x1c\r");
        let items = check(
            input.as_bytes(),
            Ok(&[
                rec("ADT^A01", Some("M1"), &[]),
                rec("ORU^R01", Some("M2"), &[("OBX-5", Some("5"))]),
            ]),
        );
        assert_eq!(record(&items[0]).body.original, m1);
        assert_eq!(record(&items[1]).body.original, m2);
        // The last segment may run straight into the end-of-block byte.
        let input = "\x0bMSH|^~\\&|A||||||ADT^A01|1|P|2.5\rPID|||M1\x1c\r\x0bPID|||X\x1c\r";
        check(
            input.as_bytes(),
            Ok(&[
                rec("ADT^A01", Some("M1"), &[]),
                rej(KIND_BEFORE_MSH, "line 4: segment before MSH"),
            ]),
        );
    }

    #[test]
    fn segments_before_msh_are_rejected_and_parsing_goes_on() {
        let input = format!("EVN|A01\r\rPID|||SECRET\r{MSH}PID|||42\r");
        let items = check(
            input.as_bytes(),
            Ok(&[
                rej(KIND_BEFORE_MSH, "lines 1-3: 2 segments before MSH"),
                rec("ADT^A01", Some("42"), &[]),
            ]),
        );
        assert!(!format!("{items:?}").contains("SECRET\""));
        let input = format!("PID|||1\r{MSH}BTS|1\rNTE|1\r");
        check(
            input.as_bytes(),
            Ok(&[
                rej(KIND_BEFORE_MSH, "line 1: segment before MSH"),
                rec("ADT^A01", None, &[]),
                rej(KIND_BEFORE_MSH, "line 4: segment before MSH"),
            ]),
        );
        // A stray non-segment line before the first message is rejected the same way.
        check(
            format!("exported by tool\n{MSH}").as_bytes(),
            Ok(&[
                rej(KIND_BEFORE_MSH, "line 1: segment before MSH"),
                rec("ADT^A01", None, &[]),
            ]),
        );
    }

    #[test]
    fn invalid_utf8_message_is_rejected() {
        let mut input = MSH.as_bytes().to_vec();
        input.extend_from_slice(b"PID|||42||D\xffE^JOHN\r");
        input.extend_from_slice(MSH.as_bytes());
        input.extend_from_slice(b"PID|||43\r");
        check(
            &input,
            Ok(&[
                rej(
                    KIND_UTF8,
                    "line 2: message is not valid UTF-8 (message starting at line 1)",
                ),
                rec("ADT^A01", Some("43"), &[]),
            ]),
        );
    }

    #[test]
    fn malformed_messages_are_rejected() {
        let next = format!("{MSH}PID|||OK\r");
        let cases: &[(&str, &str)] = &[
            (
                "MSH\r",
                "line 1: MSH segment too short: no field separator (MSH-1)",
            ),
            (
                "MSH||A|B\r",
                "line 1: MSH-2 is empty: no encoding characters",
            ),
            (
                "MSHA^~\\&\r",
                "line 1: MSH-1 is not a valid field separator",
            ),
            (
                "MSH|^~\\\\&|A\r",
                "line 1: MSH-2 encoding characters must be distinct punctuation, other than MSH-1",
            ),
            (
                "MSH|^~\\&^~|A\r",
                "line 1: MSH-2 has more than 5 encoding characters",
            ),
            (
                "MSH|^~\\&|A\rpid|1\r",
                "line 2: segment id is not 3 upper-case letters or digits \
                 (message starting at line 1)",
            ),
            (
                "MSH|^~\\&|A\rPID|1\rcontinued text|x\r",
                "line 3: segment id is not 3 upper-case letters or digits \
                 (message starting at line 1)",
            ),
            (
                "MSH|^~\\&|A\rPIDX|1\r",
                "line 2: segment PID: id is not followed by the field separator \
                 (message starting at line 1)",
            ),
        ];
        for (bad, reason) in cases {
            check(
                format!("{bad}{next}").as_bytes(),
                Ok(&[rej(KIND_MESSAGE, reason), rec("ADT^A01", Some("OK"), &[])]),
            );
        }
        // A segment with no fields at all is legal, and so is an MSH without MSH-9.
        check(
            b"MSH|^~\\&\rZZZ\rPID|||7\r",
            Ok(&[rec("HL7", Some("7"), &[("ZZZ-1", None)])]),
        );
        check(
            b"MSH|^~\\&|||||||ACK\r",
            Ok(&[rec("ACK", None, &[("MSH-9", Some("ACK"))])]),
        );
    }

    #[test]
    fn oversized_message_is_skipped_without_buffering() {
        /// A 20 MB OBX-5 value between two messages, generated as it is read.
        fn big_input() -> impl BufRead {
            let head = format!("{MSH}PID|||1\rOBX|1|TX|X||");
            let tail = format!("\rOBX|2|TX|X||small\r{MSH}PID|||2\r");
            BufReader::new(
                Cursor::new(head)
                    .chain(std::io::repeat(b'A').take(20 * 1024 * 1024))
                    .chain(Cursor::new(tail)),
            )
        }
        let items = collect(|sink| parse(big_input(), sink)).unwrap_or_default();
        assert_eq!(items.len(), 2);
        match &items[0] {
            Item::Rejected(r) => {
                assert_eq!(r.position, 1);
                assert_eq!(r.error_kind, KIND_TOO_LARGE);
                assert_eq!(r.reason, "line 1: message is larger than 16777216 bytes");
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert_eq!(items[1].position(), 2);
        assert_eq!(record(&items[1]).body.patient_link.as_deref(), Some("2"));
    }

    #[test]
    fn file_errors() {
        check(b"", Err(FileError::Empty));
        check(b" \r\n\t\n\r", Err(FileError::Empty));
        check(b"\x0b\x1c\r\n", Err(FileError::Empty));
        let not_hl7 = FileError::NotHl7(
            "no MSH segment and no line that looks like an HL7 segment".to_owned(),
        );
        check(b"id,name\n1,x\n", Err(not_hl7.clone()));
        check(b"{\"resourceType\": \"Patient\"}\n", Err(not_hl7.clone()));
        check(b"\x1f\x8b\x08\x00\x0b\xff\x1c", Err(not_hl7));

        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk on fire"))
            }
        }
        let got = collect(|sink| parse(BufReader::new(Broken), sink));
        assert_eq!(got, Err(FileError::Io("disk on fire".to_owned())));
    }

    #[test]
    fn halt_stops_parsing_at_once() {
        let input = [ADT_A01, ADT_A04, ADT_A08].concat();
        let mut seen = Vec::new();
        let result = parse(&input[..], &mut |item| {
            seen.push(item.position());
            Err(Halt)
        });
        assert_eq!(result, Err(ParseError::Halted));
        assert_eq!(seen, [1]);
    }

    #[test]
    fn addresses() {
        let items = check(ADT_A04, Ok(&[rec("ADT^A04", Some("PATID1234"), &[])]));
        let content = &record(&items[0]).body.content;
        for (address, value) in [
            ("PID-3[1].1", Some("PATID1234")),
            ("PID-3.2", Some("5")),
            ("PID-3[2]", None),
            ("PID-11.5", Some("27401-1020")),
            ("PID-5.1.1", Some("JONES")),
            ("PID-5.1.2", None),
            ("PID-99", None),
            ("MSH-9.1", Some("ADT")),
            ("XYZ-1", None),
            // Not addresses.
            ("PID-0", None),
            ("PID-3[0]", None),
            ("PID-3[x]", None),
            ("PID-+3", None),
            ("pid-3", None),
            ("PID", None),
            ("PID-3.1.1.1", None),
            ("PID-3[2", None),
        ] {
            assert_eq!(get(content, address).as_deref(), value, "{address}");
        }
        let address: Address = "PID-3[2].4.2".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            address,
            Address {
                segment: "PID".to_owned(),
                field: 3,
                repetition: 2,
                component: 4,
                subcomponent: 2,
            }
        );
        assert!("PID.3".parse::<Address>().is_err());
        assert_eq!(segments(content, "ZZZ").count(), 0);
        assert_eq!(segments(&Value::Null, "PID").count(), 0);
        assert_eq!(field(&Value::Null, 1, 1, 1, 1), None);
    }

    fn positions_are_consecutive(items: &[Item]) -> bool {
        items
            .iter()
            .enumerate()
            .all(|(i, item)| item.position() == i as u64 + 1)
    }

    /// Bytes biased towards what the parser cares about.
    fn hl7ish_bytes() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"MSH|^~\\&|".to_vec()),
            Just(b"MSH#$*@%#".to_vec()),
            Just(b"PID|".to_vec()),
            Just(b"BHS|".to_vec()),
            Just(b"\r".to_vec()),
            Just(b"\n".to_vec()),
            Just(vec![START_BLOCK]),
            Just(vec![END_BLOCK]),
            Just(b"\\X".to_vec()),
            Just(b"\\".to_vec()),
            Just("é".as_bytes().to_vec()),
            Just(b"^~&|".to_vec()),
            prop::collection::vec(any::<u8>(), 0..8),
        ];
        prop::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(items) = run(&bytes) {
                prop_assert!(positions_are_consecutive(&items));
            }
        }

        #[test]
        fn never_panics_after_a_valid_msh(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let input = [MSH.as_bytes(), &bytes].concat();
            let items = run(&input);
            prop_assert!(items.is_ok());
            prop_assert!(positions_are_consecutive(&items.unwrap_or_default()));
        }

        #[test]
        fn never_panics_on_hl7ish_bytes(bytes in hl7ish_bytes()) {
            let got = run(&bytes);
            let slow = collect(|sink| parse(BufReader::with_capacity(1, &bytes[..]), sink));
            prop_assert_eq!(&got, &slow);
            if let Ok(items) = got {
                prop_assert!(positions_are_consecutive(&items));
            }
        }
    }
}
