//! Streaming parser for CSV batch files with a header row: Synthea's CSV export plus layouts mapped in config.
//!
//! The file is read once, record by record, through the `csv` crate with one reused
//! [`ByteRecord`](::csv::ByteRecord), so memory stays bounded whatever the file size. The
//! header decides the layout (record type, patient-link column, column renames); each data
//! record becomes an [`Item`]. Reasons and errors name lines, column numbers and column
//! names, never values, because values are patient data.
//!
//! Line numbers are computed here rather than taken from `Reader::position().line()` before
//! a read: that position lags by one line after a CRLF record and does not see blank lines
//! the reader skips. Records are therefore split on `\n` only (a trailing `\r` is dropped
//! from the last field), and a record's first line is its end line minus the newlines it
//! contains. A file that uses bare `\r` line ends (classic Mac) is read as one line.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};

use serde_json::{Map, Value};

use super::{FileError, Item, ParseError, ParsedRecord, Rejected, Sink, SourceRecordBody};

/// Largest record accepted, in bytes of the raw text. A larger one is almost always an
/// unbalanced quote that swallows the rest of the file; refusing it bounds memory.
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

/// Buffer of the `csv` reader. The record-size guard is exact to within one buffer.
const BUFFER_CAPACITY: usize = 64 * 1024;

/// Delimiters tried when none is forced, in tie-break order.
const SNIFF_CANDIDATES: [u8; 4] = [b',', b';', b'\t', b'|'];

const NO_LAYOUT: &str = "CSV header matches no known layout; add a [[layout]] mapping";

/// How to read CSV files; the binary loads it from its TOML config.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvOptions {
    /// Forced delimiter; None = sniff from the header line among ',', ';', '\t', '|'.
    pub delimiter: Option<char>,
    /// Extra layouts from config, tried BEFORE the built-in Synthea ones.
    #[serde(default, rename = "layout")]
    pub layouts: Vec<CsvLayout>,
}

/// A mapping for a CSV export that is not Synthea's, e.g. a lab system's result file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvLayout {
    pub name: String,
    /// FHIR resource type the rows become, e.g. "Observation".
    pub record_type: String,
    /// Column holding the patient link (MRN / patient id); None if the layout has none.
    /// A source column name (before `rename`); the header must contain it.
    pub patient_column: Option<String>,
    /// Matches when the file name matches this simple glob (`*` and `?` only, case-insensitive) ...
    /// The glob is matched against the base name, with and without a `.gz` suffix.
    pub file_pattern: Option<String>,
    /// ... and/or when the header contains all of these columns. At least one of the two must be set (validate).
    /// When both are set, both must match. Names are compared exactly (headers are trimmed).
    #[serde(default)]
    pub required_columns: Vec<String>,
    /// Renames source columns to the names downstream expects (source → target), applied to content keys.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
}

/// The layout a header matched, as reported by [`detect_layout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutMatch {
    pub name: String,
    pub record_type: String,
    pub patient_column: Option<String>,
}

impl CsvOptions {
    /// Checks the options once at startup, so a bad config fails loudly instead of
    /// silently matching nothing (or everything). The message names the bad layout.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(d) = self.delimiter {
            delimiter_byte(d).map_err(|e| format!("CSV delimiter: {e}"))?;
        }
        let mut names = BTreeSet::new();
        for (i, layout) in self.layouts.iter().enumerate() {
            let which = format!("CSV layout {} ({:?})", i + 1, layout.name);
            layout.validate().map_err(|e| format!("{which}: {e}"))?;
            if !names.insert(layout.name.as_str()) {
                return Err(format!("{which}: an earlier layout has the same name"));
            }
        }
        Ok(())
    }
}

impl CsvLayout {
    fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("name is empty".into());
        }
        let rt = &self.record_type;
        let is_type = rt.starts_with(|c: char| c.is_ascii_uppercase())
            && rt.chars().all(|c| c.is_ascii_alphanumeric());
        if !is_type {
            return Err(format!(
                "record_type {rt:?} is not a FHIR resource type such as \"Observation\""
            ));
        }
        if self.file_pattern.is_none() && self.required_columns.is_empty() {
            return Err("set file_pattern, required_columns or both; \
                 otherwise the layout would match every file"
                .into());
        }
        if let Some(p) = &self.file_pattern {
            if p.trim().is_empty() {
                return Err("file_pattern is empty".into());
            }
        }
        let mut columns: Vec<(&str, &str)> = self
            .required_columns
            .iter()
            .map(|c| ("required_columns", c.as_str()))
            .collect();
        if let Some(c) = &self.patient_column {
            columns.push(("patient_column", c));
        }
        for (source, target) in &self.rename {
            columns.push(("rename", source));
            columns.push(("rename", target));
        }
        for (field, column) in columns {
            if column.is_empty() {
                return Err(format!("{field} has an empty column name"));
            }
            if column.trim() != column {
                return Err(format!(
                    "{field} column {column:?} has surrounding spaces; header names are trimmed"
                ));
            }
        }
        let mut targets = BTreeSet::new();
        for target in self.rename.values() {
            if !targets.insert(target) {
                return Err(format!("rename maps two columns to {target:?}"));
            }
        }
        Ok(())
    }

    fn matches(&self, file_name: &str, header: &[String]) -> bool {
        if self.file_pattern.is_none() && self.required_columns.is_empty() {
            return false; // never valid; do not let it swallow every file
        }
        let name_ok = self.file_pattern.as_deref().is_none_or(|p| {
            let base = base_name(file_name);
            glob_match(p, base) || base.strip_suffix(".gz").is_some_and(|b| glob_match(p, b))
        });
        name_ok && self.required_columns.iter().all(|c| header.contains(c))
    }
}

/// A built-in layout for one file of Synthea's CSV export.
#[derive(Debug)]
struct Builtin {
    /// File stems start with this, e.g. `observations` for `observations_2.csv.gz`.
    stem: &'static str,
    record_type: &'static str,
    link: &'static str,
    /// The header signature: all of these present ...
    required: &'static [&'static str],
    /// ... and none of these, which belong to sibling Synthea files with otherwise the same
    /// columns (careplans, devices, supplies, imaging_studies are not ingested).
    absent: &'static [&'static str],
}

/// In signature order: layouts with a column no other file has come first, so the weaker
/// signatures below are only tried on what is left.
static BUILTINS: [Builtin; 8] = [
    Builtin {
        stem: "patients",
        record_type: "Patient",
        link: "Id",
        required: &["Id", "BIRTHDATE", "SSN", "FIRST", "LAST"],
        absent: &[],
    },
    Builtin {
        stem: "encounters",
        record_type: "Encounter",
        link: "PATIENT",
        required: &["Id", "START", "PATIENT", "ENCOUNTERCLASS"],
        absent: &[],
    },
    Builtin {
        stem: "observations",
        record_type: "Observation",
        link: "PATIENT",
        required: &["DATE", "PATIENT", "ENCOUNTER", "CODE", "VALUE", "UNITS"],
        absent: &[],
    },
    Builtin {
        stem: "medications",
        record_type: "MedicationRequest",
        link: "PATIENT",
        required: &["START", "PATIENT", "ENCOUNTER", "CODE", "DISPENSES"],
        absent: &[],
    },
    Builtin {
        stem: "allergies",
        record_type: "AllergyIntolerance",
        link: "PATIENT",
        // Before REACTION1 existed, allergies.csv had the columns of conditions.csv;
        // such files are only recognised by name.
        required: &["START", "PATIENT", "ENCOUNTER", "CODE", "REACTION1"],
        absent: &[],
    },
    Builtin {
        stem: "procedures",
        record_type: "Procedure",
        link: "PATIENT",
        required: &["PATIENT", "ENCOUNTER", "CODE", "DESCRIPTION", "REASONCODE"],
        absent: &["Id", "DISPENSES", "VALUE", "UDI", "QUANTITY", "REACTION1"],
    },
    Builtin {
        stem: "immunizations",
        record_type: "Immunization",
        link: "PATIENT",
        required: &["DATE", "PATIENT", "ENCOUNTER", "CODE", "DESCRIPTION"],
        absent: &["Id", "START", "STOP", "REASONCODE", "VALUE", "QUANTITY"],
    },
    Builtin {
        stem: "conditions",
        record_type: "Condition",
        link: "PATIENT",
        required: &[
            "START",
            "STOP",
            "PATIENT",
            "ENCOUNTER",
            "CODE",
            "DESCRIPTION",
        ],
        absent: &[
            "Id",
            "DATE",
            "PAYER",
            "DISPENSES",
            "REASONCODE",
            "REACTION1",
            "UDI",
        ],
    },
];

impl Builtin {
    fn matches_header(&self, header: &[String]) -> bool {
        let has = |c: &&str| header.iter().any(|h| h == c);
        self.required.iter().all(has) && !self.absent.iter().any(has)
    }
}

/// A matched layout, borrowed from the options or the built-in table.
#[derive(Clone, Copy)]
enum Layout<'a> {
    Custom(&'a CsvLayout),
    Builtin(&'static Builtin),
}

impl Layout<'_> {
    fn name(&self) -> &str {
        match self {
            Layout::Custom(l) => &l.name,
            Layout::Builtin(b) => b.stem,
        }
    }

    fn record_type(&self) -> &str {
        match self {
            Layout::Custom(l) => &l.record_type,
            Layout::Builtin(b) => b.record_type,
        }
    }

    fn patient_column(&self) -> Option<&str> {
        match self {
            Layout::Custom(l) => l.patient_column.as_deref(),
            Layout::Builtin(b) => Some(b.link),
        }
    }

    /// The content key of a source column.
    fn key<'h>(&'h self, column: &'h str) -> &'h str {
        match self {
            Layout::Custom(l) => l.rename.get(column).map_or(column, String::as_str),
            Layout::Builtin(_) => column,
        }
    }
}

/// The layout a header matches (for tests/diagnostics).
///
/// Order: config layouts first, so a site can override Synthea's; then Synthea by file
/// name; then Synthea by header signature, so renamed files like `batch-0042.csv` still work.
pub fn detect_layout(file_name: &str, header: &[String], opts: &CsvOptions) -> Option<LayoutMatch> {
    find_layout(file_name, header, opts).map(|l| LayoutMatch {
        name: l.name().to_owned(),
        record_type: l.record_type().to_owned(),
        patient_column: l.patient_column().map(str::to_owned),
    })
}

fn find_layout<'a>(file_name: &str, header: &[String], opts: &'a CsvOptions) -> Option<Layout<'a>> {
    if let Some(l) = opts.layouts.iter().find(|l| l.matches(file_name, header)) {
        return Some(Layout::Custom(l));
    }
    let base = base_name(file_name).to_ascii_lowercase();
    let stem = base.strip_suffix(".gz").unwrap_or(&base);
    BUILTINS
        .iter()
        .find(|b| stem.starts_with(b.stem))
        .or_else(|| BUILTINS.iter().find(|b| b.matches_header(header)))
        .map(Layout::Builtin)
}

/// The no-layout error, with the few columns the closest layout still needs. Those names
/// come from layout definitions, not from the file.
fn no_layout(header: &[String], opts: &CsvOptions) -> FileError {
    let candidates = opts
        .layouts
        .iter()
        .map(|l| {
            (
                l.name.as_str(),
                l.required_columns.iter().map(String::as_str).collect(),
            )
        })
        .chain(BUILTINS.iter().map(|b| (b.stem, b.required.to_vec())));
    let mut closest: Option<(&str, Vec<&str>)> = None;
    for (name, required) in candidates {
        let missing: Vec<&str> = required
            .iter()
            .copied()
            .filter(|c| !header.iter().any(|h| h == c))
            .collect();
        let useful = !missing.is_empty() && missing.len() < required.len() && missing.len() <= 3;
        if useful
            && closest
                .as_ref()
                .is_none_or(|(_, m)| missing.len() < m.len())
        {
            closest = Some((name, missing));
        }
    }
    FileError::UnknownFormat(match closest {
        Some((name, missing)) => {
            format!(
                "{NO_LAYOUT} (closest: {name}, which lacks {})",
                missing.join(", ")
            )
        }
        None => NO_LAYOUT.to_owned(),
    })
}

/// Parses a CSV file with a header row, pushing one item per data record to `sink`.
///
/// `file_name` only selects the layout. Blank (whitespace-only) lines are skipped and not
/// counted as records. A record over [`MAX_RECORD_BYTES`] is rejected as
/// `record_too_large` and parsing goes on. A record that outgrows the limit while still
/// being read (usually an unbalanced quote) is cut off there to bound memory: it is
/// rejected and the parse ends with [`FileError::Io`], since where the next record would
/// start cannot be known.
pub fn parse<R: Read>(
    reader: R,
    file_name: &str,
    opts: &CsvOptions,
    sink: &mut Sink<'_>,
) -> Result<(), ParseError> {
    parse_limited(reader, file_name, opts, sink, MAX_RECORD_BYTES as u64)
}

fn parse_limited<R: Read>(
    mut reader: R,
    file_name: &str,
    opts: &CsvOptions,
    sink: &mut Sink<'_>,
    limit: u64,
) -> Result<(), ParseError> {
    let forced = match opts.delimiter {
        Some(d) => Some(delimiter_byte(d).map_err(|e| {
            FileError::UnknownFormat(format!("invalid CSV delimiter in options: {e}"))
        })?),
        None => None,
    };
    let start = read_start(&mut reader, limit)?;
    let delimiter = forced.unwrap_or_else(|| sniff(&start.prefix));
    let source = Source {
        inner: io::Cursor::new(start.prefix).chain(reader),
        total: 0,
        mark: 0,
        limit,
        tripped: false,
        eof: false,
        last: None,
    };
    let mut rdr = ::csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(delimiter)
        .terminator(::csv::Terminator::Any(b'\n'))
        .buffer_capacity(BUFFER_CAPACITY)
        .from_reader(source);
    let mut record = ::csv::ByteRecord::new();

    match rdr.read_byte_record(&mut record) {
        Ok(true) => {}
        Ok(false) => return Err(FileError::NoHeader.into()),
        Err(_) if rdr.get_ref().tripped => {
            return Err(FileError::UnknownFormat(format!(
                "CSV header row is larger than {limit} bytes"
            ))
            .into())
        }
        Err(e) => return Err(file_error(e, FileError::NoHeader).into()),
    }
    let header = header_names(&record)?;
    let layout = find_layout(file_name, &header, opts).ok_or_else(|| no_layout(&header, opts))?;
    let rows = Rows::new(layout, header, delimiter)?;

    let mut position = 0u64;
    loop {
        let before = rdr.position().clone();
        let total = rdr.get_ref().total;
        rdr.get_mut().mark = total;
        match rdr.read_byte_record(&mut record) {
            Ok(false) => return Ok(()),
            Ok(true) => {
                if is_blank(&record) {
                    continue;
                }
                position += 1;
                let after = rdr.position();
                let src = rdr.get_ref();
                // Only the last record of a file can end without a newline.
                let at_end = src.eof && after.byte() == src.total && src.last != Some(b'\n');
                let newlines = record.as_slice().iter().filter(|&&b| b == b'\n').count() as u64;
                let line = after
                    .line()
                    .saturating_sub(newlines + u64::from(!at_end))
                    .max(1)
                    + start.lines_skipped;
                let item = if after.byte().saturating_sub(before.byte()) > limit {
                    reject(
                        position,
                        "record_too_large",
                        format!("line {line}: record is larger than {limit} bytes"),
                    )
                } else {
                    rows.item(position, line, &record)
                };
                sink(item)?;
            }
            Err(_) if rdr.get_ref().tripped => {
                position += 1;
                // Blank lines just before the record would make this line too small;
                // the record's own text is not available to count from.
                let line = before.line() + start.lines_skipped;
                sink(reject(position, "record_too_large", format!(
                    "line {line}: record is larger than {limit} bytes; the rest of the file was not read"
                )))?;
                return Err(FileError::Io(format!(
                    "CSV record at line {line} is larger than {limit} bytes (an unbalanced quote?)"
                ))
                .into());
            }
            Err(e) => {
                if let ::csv::ErrorKind::Io(io) = e.kind() {
                    return Err(FileError::io(io).into());
                }
                // Not expected with byte records and `flexible`; kept so a future csv
                // version's new error still rejects one row instead of failing the file.
                position += 1;
                let line = before.line() + start.lines_skipped;
                sink(reject(
                    position,
                    "csv_row",
                    format!("line {line}: malformed CSV row"),
                ))?;
                if rdr.position().byte() == before.byte() {
                    return Err(FileError::Io("CSV reader stopped making progress".into()).into());
                }
            }
        }
    }
}

/// Maps a csv error: IO errors (e.g. a truncated gzip stream underneath) fail the file.
fn file_error(e: ::csv::Error, otherwise: FileError) -> FileError {
    match e.into_kind() {
        ::csv::ErrorKind::Io(io) => FileError::io(&io),
        _ => otherwise,
    }
}

fn reject(position: u64, error_kind: &'static str, reason: String) -> Item {
    Item::Rejected(Rejected {
        position,
        error_kind,
        reason,
    })
}

/// Whatever turns one data record into an item, fixed once the header is known.
struct Rows {
    header: Vec<String>,
    /// Content key per column, after `rename`.
    keys: Vec<String>,
    link: Option<usize>,
    record_type: String,
    delimiter: char,
}

impl Rows {
    fn new(layout: Layout<'_>, header: Vec<String>, delimiter: u8) -> Result<Self, FileError> {
        let keys: Vec<String> = header.iter().map(|h| layout.key(h).to_owned()).collect();
        let mut seen = BTreeMap::new();
        for (i, key) in keys.iter().enumerate() {
            if let Some(first) = seen.insert(key, i) {
                // Two columns under one key would lose one value silently.
                return Err(FileError::UnknownFormat(format!(
                    "CSV header repeats a column name (columns {} and {}, after renames)",
                    first + 1,
                    i + 1
                )));
            }
        }
        let link = match layout.patient_column() {
            Some(col) => Some(header.iter().position(|h| h == col).ok_or_else(|| {
                FileError::UnknownFormat(format!(
                    "CSV header lacks column {col}, the patient link of layout {}",
                    layout.name()
                ))
            })?),
            None => None,
        };
        Ok(Rows {
            header,
            keys,
            link,
            record_type: layout.record_type().to_owned(),
            delimiter: char::from(delimiter),
        })
    }

    fn item(&self, position: u64, line: u64, record: &::csv::ByteRecord) -> Item {
        if record.len() != self.header.len() {
            return reject(
                position,
                "csv_field_count",
                format!(
                    "line {line}: expected {} fields, found {}",
                    self.header.len(),
                    record.len()
                ),
            );
        }
        let last = record.len().saturating_sub(1);
        let mut content = Map::new();
        let mut original = String::new();
        let mut patient_link = None;
        for (i, raw) in record.iter().enumerate() {
            let raw = if i == last {
                raw.strip_suffix(b"\r").unwrap_or(raw)
            } else {
                raw
            };
            let Ok(value) = std::str::from_utf8(raw) else {
                let name = self.header.get(i).map_or("", String::as_str);
                return reject(
                    position,
                    "invalid_utf8",
                    format!("line {line}: column {} ({name}) is not valid UTF-8", i + 1),
                );
            };
            if i > 0 {
                original.push(self.delimiter);
            }
            write_field(&mut original, value, self.delimiter, record.len() == 1);
            if Some(i) == self.link && !value.trim().is_empty() {
                patient_link = Some(value.to_owned());
            }
            if let Some(key) = self.keys.get(i) {
                content.insert(key.clone(), Value::String(value.to_owned()));
            }
        }
        Item::Record(ParsedRecord {
            position,
            record_type: self.record_type.clone(),
            body: SourceRecordBody {
                patient_link,
                content: Value::Object(content),
                original,
            },
        })
    }
}

/// Appends one field as CSV, quoting only when needed (as the `csv` writer does), so the
/// original round-trips with the file's delimiter.
fn write_field(out: &mut String, value: &str, delimiter: char, only_field: bool) {
    let needs_quotes =
        (only_field && value.is_empty()) || value.contains([delimiter, '"', '\n', '\r']);
    if needs_quotes {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

/// A record that is one whitespace-only field: a blank line (CRLF blank lines and lines of
/// spaces reach us as such), not a record.
fn is_blank(record: &::csv::ByteRecord) -> bool {
    record.len() == 1 && record.as_slice().iter().all(u8::is_ascii_whitespace)
}

fn header_names(record: &::csv::ByteRecord) -> Result<Vec<String>, FileError> {
    let header = record
        .iter()
        .map(|f| std::str::from_utf8(f).map(|s| s.trim().to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| FileError::HeaderEncoding)?;
    if header.iter().all(String::is_empty) {
        return Err(FileError::NoHeader);
    }
    // Records are split on '\n' only, so a file with bare CR line ends arrives as one long
    // header; say so rather than parse it as a header with no rows.
    let bare_cr = |name: &String| name.split('\r').skip(1).any(|rest| !rest.starts_with('\n'));
    if header.iter().any(bare_cr) {
        return Err(FileError::UnknownFormat(
            "CSV file uses bare CR line ends; convert it to LF or CRLF".into(),
        ));
    }
    Ok(header)
}

/// The start of the file, read before the `csv` reader exists so the delimiter can be
/// sniffed from the header line and empty files told apart.
struct Start {
    /// From the header line on (BOM and leading blank lines removed): at least the whole
    /// header line, unless the file or the limit ends first.
    prefix: Vec<u8>,
    /// Blank lines dropped before the header, added back to line numbers.
    lines_skipped: u64,
}

fn read_start(reader: &mut impl Read, limit: u64) -> Result<Start, FileError> {
    let mut prefix = Vec::new();
    let mut chunk = vec![0u8; 8 * 1024];
    let mut lines_skipped = 0u64;
    let mut bom_checked = false;
    let mut eof = false;
    loop {
        let n = read_retrying(reader, &mut chunk).map_err(|e| FileError::io(&e))?;
        eof = eof || n == 0;
        prefix.extend_from_slice(chunk.get(..n).unwrap_or(&chunk));
        if !bom_checked && (prefix.len() >= 3 || eof) {
            bom_checked = true;
            if prefix.starts_with(b"\xEF\xBB\xBF") {
                prefix.drain(..3);
            }
        }
        if !bom_checked {
            continue;
        }
        match prefix.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(first) => {
                // Drop whole blank lines before the header; keep its own indentation.
                if let Some(nl) = prefix
                    .get(..first)
                    .and_then(|p| p.iter().rposition(|&b| b == b'\n'))
                {
                    lines_skipped += prefix.get(..=nl).map_or(0, count_newlines);
                    prefix.drain(..=nl);
                }
                let header_done = prefix.contains(&b'\n');
                if header_done || eof || prefix.len() as u64 > limit {
                    return Ok(Start {
                        prefix,
                        lines_skipped,
                    });
                }
            }
            None if eof => return Err(FileError::Empty),
            None => {
                // Whitespace so far: keep only the unfinished line, so memory stays bounded.
                if let Some(nl) = prefix.iter().rposition(|&b| b == b'\n') {
                    lines_skipped += count_newlines(prefix.get(..=nl).unwrap_or(&[]));
                    prefix.drain(..=nl);
                }
            }
        }
    }
}

fn count_newlines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

fn read_retrying(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match reader.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(n) => return Ok(n.min(buf.len())),
            Err(e) => return Err(e),
        }
    }
}

/// The candidate delimiter seen most often outside quotes on the header line; ',' when
/// none appears (a one-column file).
fn sniff(prefix: &[u8]) -> u8 {
    let line = prefix.split(|&b| b == b'\n').next().unwrap_or(prefix);
    let mut counts = [0usize; SNIFF_CANDIDATES.len()];
    let mut quoted = false;
    for &b in line {
        if b == b'"' {
            quoted = !quoted;
        } else if !quoted {
            if let Some(i) = SNIFF_CANDIDATES.iter().position(|&c| c == b) {
                counts[i] += 1;
            }
        }
    }
    let mut best = 0;
    for (i, &n) in counts.iter().enumerate() {
        if n > counts[best] {
            best = i;
        }
    }
    SNIFF_CANDIDATES[best]
}

fn delimiter_byte(d: char) -> Result<u8, String> {
    match u8::try_from(d) {
        Ok(b) if d.is_ascii() && !matches!(b, b'"' | b'\n' | b'\r') => Ok(b),
        _ => Err(format!("{d:?} cannot separate fields; use one ASCII character other than a quote or line break")),
    }
}

fn base_name(file_name: &str) -> &str {
    file_name.rsplit(['/', '\\']).next().unwrap_or(file_name)
}

/// Case-insensitive glob with `*` (any run) and `?` (one character).
fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().flat_map(char::to_lowercase).collect();
    let n: Vec<char> = name.chars().flat_map(char::to_lowercase).collect();
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was and how much of the name it has taken so far.
    let mut star: Option<(usize, usize)> = None;
    while let Some(&c) = n.get(ni) {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&q) if q == '?' || q == c => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..).unwrap_or(&[]).iter().all(|&c| c == '*')
}

/// The reader under the `csv` reader: counts bytes so the parser can tell where the file
/// ends and stop a record that outgrows the limit before it is held in memory.
struct Source<R> {
    inner: R,
    /// Bytes handed out so far.
    total: u64,
    /// `total` when the current record's read began.
    mark: u64,
    limit: u64,
    /// Set when a read was refused because the current record outgrew the limit.
    tripped: bool,
    eof: bool,
    last: Option<u8>,
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // The csv reader only asks for more when its buffer is used up, so everything
        // handed out since the mark already belongs to the current record.
        if self.total.saturating_sub(self.mark) > self.limit {
            self.tripped = true;
            return Err(io::Error::other("CSV record too large"));
        }
        let n = read_retrying(&mut self.inner, buf)?;
        match buf.get(..n).and_then(<[u8]>::last) {
            Some(&b) => {
                self.last = Some(b);
                self.total += n as u64;
            }
            None => self.eof = true,
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::collect;
    use proptest::prelude::*;

    const P1: &str = "3f2a9c1e-5b7d-4e8a-9c0b-1a2b3c4d5e01";
    const P2: &str = "3f2a9c1e-5b7d-4e8a-9c0b-1a2b3c4d5e02";
    const P3: &str = "3f2a9c1e-5b7d-4e8a-9c0b-1a2b3c4d5e03";
    /// Strings only ever used as values in test inputs; no reason may contain one.
    const VALUES: [&str; 5] = ["SECRET", "999-", "Aaron", "MRN-", "3f2a9c1e"];

    /// What one item should be.
    #[derive(Debug)]
    enum W {
        /// A record of this type with this patient link.
        Rec(&'static str, Option<&'static str>),
        /// A rejection of this kind with exactly this reason.
        Rej(&'static str, &'static str),
    }

    /// Every item of a parse, or the file error.
    type Want = Result<Vec<W>, FileError>;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/fixtures/csv/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn run(
        file: &str,
        input: &[u8],
        opts: &CsvOptions,
        limit: u64,
    ) -> Result<Vec<Item>, FileError> {
        collect(|sink| parse_limited(input, file, opts, sink, limit))
    }

    /// Parses `input` as `file` and compares every item (in order, positions 1..) or the
    /// file error; also checks that no reason or error repeats a value. Returns the items.
    fn check(file: &str, input: &[u8], opts: &CsvOptions, want: Want) -> Vec<Item> {
        let got = run(file, input, opts, MAX_RECORD_BYTES as u64);
        if let Err(e) = &got {
            let text = e.to_string();
            assert!(
                VALUES.iter().all(|v| !text.contains(v)),
                "{file}: value in error {text}"
            );
        }
        match (got, want) {
            (Err(got), Err(want)) => {
                assert_eq!(got, want, "{file}");
                vec![]
            }
            (Ok(items), Ok(want)) => {
                assert_eq!(items.len(), want.len(), "{file}: {items:#?}");
                for (i, (item, w)) in items.iter().zip(&want).enumerate() {
                    assert_eq!(item.position(), i as u64 + 1, "{file}: item {i}");
                    match (item, w) {
                        (Item::Record(r), W::Rec(rt, link)) => {
                            assert_eq!(r.record_type, *rt, "{file}: item {i}");
                            assert_eq!(r.body.patient_link.as_deref(), *link, "{file}: item {i}");
                        }
                        (Item::Rejected(r), W::Rej(kind, reason)) => {
                            assert_eq!(
                                (r.error_kind, r.reason.as_str()),
                                (*kind, *reason),
                                "{file}: item {i}"
                            );
                            assert!(
                                VALUES.iter().all(|v| !r.reason.contains(v)),
                                "{file}: {r:?}"
                            );
                        }
                        (got, want) => panic!("{file}: item {i}: got {got:?}, want {want:?}"),
                    }
                }
                items
            }
            (got, want) => panic!("{file}: got {got:?}, want {want:?}"),
        }
    }

    fn record(item: &Item) -> &ParsedRecord {
        match item {
            Item::Record(r) => r,
            other => panic!("not a record: {other:?}"),
        }
    }

    fn no_opts() -> CsvOptions {
        CsvOptions::default()
    }

    fn labs_layout() -> CsvLayout {
        CsvLayout {
            name: "lab-results".into(),
            record_type: "Observation".into(),
            patient_column: Some("MRN".into()),
            file_pattern: Some("labs_*.csv".into()),
            required_columns: vec!["MRN".into(), "TEST_CODE".into(), "RESULT".into()],
            rename: [
                ("TEST_CODE", "CODE"),
                ("RESULT", "VALUE"),
                ("UNIT", "UNITS"),
                ("COLLECTED", "DATE"),
            ]
            .into_iter()
            .map(|(s, t)| (s.to_owned(), t.to_owned()))
            .collect(),
        }
    }

    fn with_layout(layout: CsvLayout) -> CsvOptions {
        CsvOptions {
            delimiter: None,
            layouts: vec![layout],
        }
    }

    fn header(line: &str) -> Vec<String> {
        line.split(',').map(str::to_owned).collect()
    }

    const SYNTHEA: [(&str, &str, &[&str]); 5] = [
        ("patients.csv", "Patient", &[P1, P2, P3]),
        ("encounters.csv", "Encounter", &[P1, P2, P3, P1]),
        ("observations.csv", "Observation", &[P1, P1, P2, P3, P1]),
        ("conditions.csv", "Condition", &[P2, P3, P1]),
        ("medications.csv", "MedicationRequest", &[P2, P3, P1]),
    ];

    #[test]
    fn synthea_fixtures_parse_by_name_and_by_header_signature() {
        for (file, record_type, links) in SYNTHEA {
            let want = || {
                Ok(links
                    .iter()
                    .map(|&l| W::Rec(record_type, Some(l)))
                    .collect())
            };
            let bytes = fixture(file);
            let items = check(file, &bytes, &no_opts(), want());
            check(&format!("/in/2024/{file}.gz"), &bytes, &no_opts(), want());
            check("batch-0042.csv", &bytes, &no_opts(), want());
            for item in &items {
                let body = &record(item).body;
                let content = body.content.as_object().unwrap_or_else(|| panic!("{file}"));
                // Every column is a key, and the original parses back to the same values.
                let values: Vec<String> = ::csv::ReaderBuilder::new()
                    .has_headers(false)
                    .from_reader(body.original.as_bytes())
                    .records()
                    .next()
                    .and_then(Result::ok)
                    .map(|r| r.iter().map(str::to_owned).collect())
                    .unwrap_or_default();
                assert_eq!(content.len(), values.len(), "{file}");
                let got: Vec<&str> = content.values().filter_map(Value::as_str).collect();
                for v in &values {
                    assert!(got.contains(&v.as_str()), "{file}: {v}");
                }
            }
        }
        let patients = check(
            "patients.csv",
            &fixture("patients.csv"),
            &no_opts(),
            Ok(vec![
                W::Rec("Patient", Some(P1)),
                W::Rec("Patient", Some(P2)),
                W::Rec("Patient", Some(P3)),
            ]),
        );
        let p2 = &record(&patients[1]).body;
        assert_eq!(p2.content["FIRST"], "Zelda43");
        assert_eq!(p2.content["ADDRESS"], "45 Sample Avenue, Apt 2");
        assert!(
            p2.original.contains(",\"45 Sample Avenue, Apt 2\","),
            "{}",
            p2.original
        );
    }

    #[test]
    fn header_signatures_tell_synthea_files_apart() {
        let cases: [(&str, Option<&str>); 11] = [
            ("Id,BIRTHDATE,DEATHDATE,SSN,DRIVERS,PASSPORT,PREFIX,FIRST,LAST,GENDER", Some("Patient")),
            ("START,STOP,PATIENT,ENCOUNTER,SYSTEM,CODE,DESCRIPTION,BASE_COST,REASONCODE,REASONDESCRIPTION", Some("Procedure")),
            ("DATE,PATIENT,ENCOUNTER,CODE,DESCRIPTION,BASE_COST,REASONCODE,REASONDESCRIPTION", Some("Procedure")),
            ("DATE,PATIENT,ENCOUNTER,CODE,DESCRIPTION,BASE_COST", Some("Immunization")),
            ("START,STOP,PATIENT,ENCOUNTER,CODE,SYSTEM,DESCRIPTION,TYPE,CATEGORY,REACTION1,DESCRIPTION1,SEVERITY1", Some("AllergyIntolerance")),
            ("START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION", Some("Condition")),
            ("START,STOP,PATIENT,PAYER,ENCOUNTER,CODE,DESCRIPTION,BASE_COST,PAYER_COVERAGE,DISPENSES,TOTALCOST", Some("MedicationRequest")),
            // Synthea files that are not ingested must not pass for one that is.
            ("Id,START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION,REASONCODE,REASONDESCRIPTION", None),
            ("START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION,UDI", None),
            ("DATE,PATIENT,ENCOUNTER,CODE,DESCRIPTION,QUANTITY", None),
            ("Id,NAME,ADDRESS,CITY,STATE,ZIP,LAT,LON,PHONE", None),
        ];
        for (line, want) in cases {
            let got = detect_layout("export.csv", &header(line), &no_opts());
            assert_eq!(
                got.map(|m| m.record_type),
                want.map(str::to_owned),
                "{line}"
            );
        }
        // The name decides first, whatever the header.
        let m = detect_layout("data/Procedures_2.CSV.GZ", &header("A,B"), &no_opts());
        assert_eq!(
            m,
            Some(LayoutMatch {
                name: "procedures".into(),
                record_type: "Procedure".into(),
                patient_column: Some("PATIENT".into()),
            })
        );
        assert_eq!(
            detect_layout("immunizations.csv", &header("A"), &no_opts()).map(|m| m.record_type),
            Some("Immunization".into())
        );
        assert_eq!(
            detect_layout("allergies.csv", &header("A"), &no_opts()).map(|m| m.record_type),
            Some("AllergyIntolerance".into())
        );
    }

    #[test]
    fn bom_crlf_blank_lines_and_quoted_newlines_keep_line_numbers() {
        let input = "\u{FEFF}\r\n  \r\nId , BIRTHDATE,SSN,FIRST,LAST,ADDRESS\r\n\
            p1,1990-01-01,999-00-0001,Ann1,Lee1,\"1 Example St\r\nApt 2\"\r\n\
            \r\n\
            p2,1990-01-02,999-00-0002,Bob1,\"Kay \"\"Jr\"\"\",x\r\n\
            p3,SECRET\r\n\
            \n\
            p4,1990-01-04,999-00-0004,Dee1,Lee1,\"a\nb\nc\"\n\
            p5,SECRET";
        let items = check(
            "batch.csv",
            input.as_bytes(),
            &no_opts(),
            Ok(vec![
                W::Rec("Patient", Some("p1")),
                W::Rec("Patient", Some("p2")),
                W::Rej("csv_field_count", "line 8: expected 6 fields, found 2"),
                W::Rec("Patient", Some("p4")),
                W::Rej("csv_field_count", "line 13: expected 6 fields, found 2"),
            ]),
        );
        let p1 = &record(&items[0]).body;
        assert_eq!(p1.content["Id"], "p1", "header names are trimmed");
        assert_eq!(p1.content["ADDRESS"], "1 Example St\r\nApt 2");
        assert_eq!(
            p1.original,
            "p1,1990-01-01,999-00-0001,Ann1,Lee1,\"1 Example St\r\nApt 2\""
        );
        let p2 = &record(&items[1]).body;
        assert_eq!(p2.content["LAST"], "Kay \"Jr\"");
        assert_eq!(
            p2.content["ADDRESS"], "x",
            "the CR of CRLF is not part of the value"
        );
        assert_eq!(
            p2.original,
            "p2,1990-01-02,999-00-0002,Bob1,\"Kay \"\"Jr\"\"\",x"
        );
    }

    #[test]
    fn delimiters_are_sniffed_or_forced() {
        let forced = |d| CsvOptions {
            delimiter: Some(d),
            layouts: vec![],
        };
        // (input, options, FIRST, original)
        let cases: [(&str, CsvOptions, &str, &str); 6] = [
            (
                "Id;BIRTHDATE;SSN;FIRST;LAST\np1;d;s;\"a,b\";l\n",
                no_opts(),
                "a,b",
                "p1;d;s;a,b;l",
            ),
            (
                "Id\tBIRTHDATE\tSSN\tFIRST\tLAST\np1\td\ts\ta;b\tl\n",
                no_opts(),
                "a;b",
                "p1\td\ts\ta;b\tl",
            ),
            (
                "Id|BIRTHDATE|SSN|FIRST|LAST\np1|d|s|\"a|b\"|l\n",
                no_opts(),
                "a|b",
                "p1|d|s|\"a|b\"|l",
            ),
            // A delimiter inside a quoted header name does not count.
            (
                "\"Id,x\";BIRTHDATE;SSN;FIRST;LAST;Id\np1;d;s;a,b;l;p1\n",
                no_opts(),
                "a,b",
                "p1;d;s;a,b;l;p1",
            ),
            (
                "Id;BIRTHDATE;SSN;FIRST;LAST\np1;d;s;a,b;l\n",
                forced(';'),
                "a,b",
                "p1;d;s;a,b;l",
            ),
            // Forcing wins over sniffing: the header has more ',' than '|'.
            (
                "Id|BIRTHDATE|SSN|FIRST|LAST,X,Y,Z\np1|d|s|a|l,x,y,z\n",
                forced('|'),
                "a",
                "p1|d|s|a|l,x,y,z",
            ),
        ];
        for (input, opts, first, original) in cases {
            let items = check(
                "patients.csv",
                input.as_bytes(),
                &opts,
                Ok(vec![W::Rec("Patient", Some("p1"))]),
            );
            let body = &record(&items[0]).body;
            assert_eq!(body.content["FIRST"], first, "{input:?}");
            assert_eq!(body.original, original, "{input:?}");
        }
    }

    #[test]
    fn custom_layouts_match_by_pattern_and_columns_and_rename() {
        let labs = fixture("labs_semicolon.csv");
        let obs = |link| W::Rec("Observation", link);
        let want = || {
            Ok(vec![
                obs(Some("MRN-900001")),
                obs(Some("MRN-900002")),
                obs(None),
                obs(Some("MRN-900001")),
            ])
        };
        let items = check(
            "in/LABS_2024-01.csv",
            &labs,
            &with_layout(labs_layout()),
            want(),
        );
        let first = &record(&items[0]).body;
        assert_eq!(
            first.content,
            serde_json::json!({"MRN": "MRN-900001", "CODE": "2345-7", "VALUE": "5.4", "UNITS": "mmol/L", "DATE": "2024-01-15T07:30:00"})
        );
        assert_eq!(
            first.original,
            "MRN-900001;2345-7;5.4;mmol/L;2024-01-15T07:30:00"
        );
        assert_eq!(
            record(&items[3]).body.original,
            "MRN-900001;2093-3;\"see note; repeat\";;2024-01-17T06:55:00"
        );
        check("labs_2.csv.gz", &labs, &with_layout(labs_layout()), want());

        // Pattern and columns both set: both must match.
        let no_layout = Err(FileError::UnknownFormat(format!(
            "{NO_LAYOUT} (closest: lab-results, which lacks RESULT)"
        )));
        check(
            "other.csv",
            &labs,
            &with_layout(labs_layout()),
            Err(FileError::UnknownFormat(NO_LAYOUT.into())),
        );
        check(
            "labs_1.csv",
            b"MRN;TEST_CODE;VALUE\nMRN-1;a;b\n",
            &with_layout(labs_layout()),
            no_layout,
        );
        // Columns only: any file name.
        let by_columns = CsvLayout {
            file_pattern: None,
            ..labs_layout()
        };
        check("export.txt", &labs, &with_layout(by_columns), want());
        // Pattern only; no patient column.
        let by_name = CsvLayout {
            required_columns: vec![],
            patient_column: None,
            file_pattern: Some("L?BS_*".into()),
            ..labs_layout()
        };
        check(
            "labs_x.csv",
            &labs,
            &with_layout(by_name),
            Ok((0..4).map(|_| obs(None)).collect()),
        );
        // Config layouts are tried before Synthea's, even for Synthea file names.
        let mine = CsvLayout {
            file_pattern: Some("patients*".into()),
            required_columns: vec![],
            patient_column: Some("SSN".into()),
            ..labs_layout()
        };
        let items = check(
            "patients.csv",
            &fixture("patients.csv"),
            &with_layout(mine),
            Ok(vec![
                W::Rec("Observation", Some("999-12-3456")),
                W::Rec("Observation", Some("999-45-6789")),
                W::Rec("Observation", Some("999-78-9012")),
            ]),
        );
        assert_eq!(items.len(), 3);
        // The matched layout's patient column must exist.
        let lacking = CsvLayout {
            patient_column: Some("PATIENT_ID".into()),
            ..labs_layout()
        };
        check(
            "labs_1.csv",
            &labs,
            &with_layout(lacking),
            Err(FileError::UnknownFormat(
                "CSV header lacks column PATIENT_ID, the patient link of layout lab-results".into(),
            )),
        );
        // A rename onto an existing column would lose values.
        let clash = CsvLayout {
            rename: [("RESULT".to_owned(), "UNIT".to_owned())].into(),
            ..labs_layout()
        };
        check(
            "labs_1.csv",
            &labs,
            &with_layout(clash),
            Err(FileError::UnknownFormat(
                "CSV header repeats a column name (columns 3 and 4, after renames)".into(),
            )),
        );
    }

    #[test]
    fn unknown_and_broken_files_fail_as_a_whole() {
        let unknown = |s: &str| Err(FileError::UnknownFormat(s.to_owned()));
        let cases: [(&str, &[u8], Want); 14] = [
            ("a.csv", b"", Err(FileError::Empty)),
            ("a.csv", b" \r\n\t\n  ", Err(FileError::Empty)),
            ("a.csv", b"\xEF\xBB\xBF", Err(FileError::Empty)),
            ("a.csv", b"\xEF\xBB\xBF\n\n", Err(FileError::Empty)),
            ("patients.csv", b",,,\n1,2,3,4\n", Err(FileError::NoHeader)),
            (
                "patients.csv",
                b"\xEF\xBB\xBF\xEF\xBB\xBF",
                Err(FileError::NoHeader),
            ),
            (
                "patients.csv",
                b"Id,FIRST\xff\n1,2\n",
                Err(FileError::HeaderEncoding),
            ),
            (
                "batch.csv",
                b"SECRET,999-11-2222,Aaron1\n",
                unknown(NO_LAYOUT),
            ),
            (
                "batch.csv",
                b"DATE,PATIENT,ENCOUNTER,CODE,VALUE\n",
                unknown(&format!(
                    "{NO_LAYOUT} (closest: observations, which lacks UNITS)"
                )),
            ),
            (
                "patients.csv",
                b"ID,NAME\nx,y\n",
                unknown("CSV header lacks column Id, the patient link of layout patients"),
            ),
            (
                "encounters.csv",
                b"Id,PATIENT,PATIENT\n",
                unknown("CSV header repeats a column name (columns 2 and 3, after renames)"),
            ),
            (
                "patients.csv",
                b"Id,FIRST\rp1,Aaron1\r",
                unknown("CSV file uses bare CR line ends; convert it to LF or CRLF"),
            ),
            (
                "patients.csv",
                b"Id,\"FIRST\r\nNAME\"\np1,x\n",
                Ok(vec![W::Rec("Patient", Some("p1"))]),
            ),
            // Header only: a valid, empty batch.
            (
                "conditions.csv",
                b"START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION\r\n",
                Ok(vec![]),
            ),
        ];
        for (file, input, want) in cases {
            check(file, input, &no_opts(), want);
        }
        let bad = CsvOptions {
            delimiter: Some('é'),
            layouts: vec![],
        };
        check("patients.csv", b"Id\n", &bad, Err(FileError::UnknownFormat(
            "invalid CSV delimiter in options: 'é' cannot separate fields; use one ASCII character other than a quote or line break".into(),
        )));
    }

    #[test]
    fn bad_records_are_rejected_with_their_line_and_no_values() {
        let mut input = b"Id,BIRTHDATE,SSN,FIRST,LAST\n\
            p1,d,999-00-0001,Aaron1,SECRET\n\
            p2,SECRET,\"999-\n00\"\n\
            p3,d,999-00-0003,"
            .to_vec();
        input.extend_from_slice(b"SECRET\xff\xfe,l\n");
        input.extend_from_slice(b"p4,d,s,\"f\",\"SECRET\n\"\"x\"\n");
        input.extend_from_slice(b",d,s,f,l\n   ,d,s,f,l\n");
        check(
            "patients.csv",
            &input,
            &no_opts(),
            Ok(vec![
                W::Rec("Patient", Some("p1")),
                W::Rej("csv_field_count", "line 3: expected 5 fields, found 3"),
                W::Rej(
                    "invalid_utf8",
                    "line 5: column 4 (FIRST) is not valid UTF-8",
                ),
                W::Rec("Patient", Some("p4")),
                W::Rec("Patient", None),
                W::Rec("Patient", None),
            ]),
        );
        let tail = run(
            "patients.csv",
            &[&input[..], b"p7,SECRET\n"].concat(),
            &no_opts(),
            1 << 20,
        );
        let last = tail.unwrap_or_default().pop();
        assert_eq!(
            last,
            Some(reject(
                7,
                "csv_field_count",
                "line 10: expected 5 fields, found 2".into()
            ))
        );
    }

    #[test]
    fn oversized_records_are_rejected() {
        let header = "Id,BIRTHDATE,SSN,FIRST,LAST\n";
        // Small enough to be read whole: rejected, and parsing goes on.
        let big = format!(
            "{header}p1,d,s,f,l\np2,d,s,{},l\np3,d,s,f,l\n",
            "SECRET".repeat(50)
        );
        let items = run("patients.csv", big.as_bytes(), &no_opts(), 200).unwrap_or_default();
        let kinds: Vec<_> = items
            .iter()
            .map(|i| match i {
                Item::Record(r) => r.body.patient_link.clone().unwrap_or_default(),
                Item::Rejected(r) => format!("{}: {}", r.error_kind, r.reason),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "p1",
                "record_too_large: line 3: record is larger than 200 bytes",
                "p3"
            ]
        );

        // An unbalanced quote swallowing the file: stopped before it is held in memory.
        let mut huge = format!("{header}p1,d,s,f,l\np2,d,s,\"SECRET,l\n").into_bytes();
        huge.resize(MAX_RECORD_BYTES + 3 * BUFFER_CAPACITY, b'x');
        let mut items = vec![];
        let result = parse(huge.as_slice(), "patients.csv", &no_opts(), &mut |i| {
            items.push(i);
            Ok(())
        });
        assert_eq!(items.len(), 2);
        assert_eq!(items[1], Item::Rejected(Rejected {
            position: 2,
            error_kind: "record_too_large",
            reason: "line 3: record is larger than 16777216 bytes; the rest of the file was not read".into(),
        }));
        assert_eq!(
            result,
            Err(ParseError::File(FileError::Io(
                "CSV record at line 3 is larger than 16777216 bytes (an unbalanced quote?)".into()
            )))
        );
    }

    #[test]
    fn halt_stops_at_once() {
        let mut seen = vec![];
        let result = parse(
            fixture("observations.csv").as_slice(),
            "observations.csv",
            &no_opts(),
            &mut |item| {
                seen.push(item.position());
                if seen.len() == 2 {
                    Err(crate::formats::Halt)
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!(result, Err(ParseError::Halted));
        assert_eq!(seen, [1, 2]);
    }

    /// Hands out `good` in small pieces, then fails like a truncated stream.
    struct Failing {
        good: Vec<u8>,
        at: usize,
    }

    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let rest = self.good.get(self.at..).unwrap_or(&[]);
            if rest.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "stream ended early",
                ));
            }
            let n = rest.len().min(buf.len()).min(100);
            buf[..n].copy_from_slice(&rest[..n]);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn read_errors_fail_the_file_not_a_row() {
        let want = FileError::Io("stream ended early".into());
        let patients = fixture("patients.csv");
        for cut in [0, 50, patients.len() / 2, patients.len()] {
            let reader = Failing {
                good: patients[..cut].to_vec(),
                at: 0,
            };
            let mut items = 0;
            let result = parse(reader, "patients.csv", &no_opts(), &mut |_| {
                items += 1;
                Ok(())
            });
            assert_eq!(result, Err(ParseError::File(want.clone())), "cut {cut}");
            // Records wholly before the failure are delivered; none is made up from a part.
            let complete = patients[..cut]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                .saturating_sub(1);
            assert_eq!(items, complete, "cut {cut}");
        }
        // A truncated gzip stream underneath.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        io::Write::write_all(&mut gz, &fixture("encounters.csv").repeat(20)).unwrap_or_default();
        let gz = gz.finish().unwrap_or_default();
        let truncated = flate2::read::GzDecoder::new(&gz[..gz.len() * 2 / 3]);
        let got = collect(|sink| parse(truncated, "encounters.csv.gz", &no_opts(), sink));
        assert!(matches!(got, Err(FileError::Io(_))), "{got:?}");
    }

    #[test]
    fn options_deserialize_and_validate() {
        let json = serde_json::json!({
            "delimiter": ";",
            "layout": [{
                "name": "lab-results", "record_type": "Observation", "patient_column": "MRN",
                "file_pattern": "labs_*.csv", "rename": {"RESULT": "VALUE"}
            }]
        });
        let opts: CsvOptions = serde_json::from_value(json).unwrap_or_default();
        assert_eq!(opts.delimiter, Some(';'));
        assert_eq!(opts.layouts.len(), 1);
        assert_eq!(opts.layouts[0].rename["RESULT"], "VALUE");
        assert_eq!(opts.validate(), Ok(()));
        assert!(
            serde_json::from_value::<CsvOptions>(serde_json::json!({"delimeter": ","})).is_err()
        );
        assert!(serde_json::from_value::<CsvOptions>(serde_json::json!({"layout": [{"name": "x", "record_type": "Patient", "patient": "Id"}]})).is_err());

        let one = |l: CsvLayout| CsvOptions {
            delimiter: None,
            layouts: vec![labs_layout(), l],
        };
        let cases: [(CsvOptions, &str); 9] = [
            (CsvOptions { delimiter: Some('"'), layouts: vec![] }, "CSV delimiter: '\"' cannot separate fields; use one ASCII character other than a quote or line break"),
            (one(CsvLayout { file_pattern: None, required_columns: vec![], name: "wide".into(), ..labs_layout() }),
                "CSV layout 2 (\"wide\"): set file_pattern, required_columns or both; otherwise the layout would match every file"),
            (one(labs_layout()), "CSV layout 2 (\"lab-results\"): an earlier layout has the same name"),
            (one(CsvLayout { name: " ".into(), ..labs_layout() }), "CSV layout 2 (\" \"): name is empty"),
            (one(CsvLayout { name: "b".into(), record_type: "lab result".into(), ..labs_layout() }),
                "CSV layout 2 (\"b\"): record_type \"lab result\" is not a FHIR resource type such as \"Observation\""),
            (one(CsvLayout { name: "b".into(), file_pattern: Some("".into()), ..labs_layout() }), "CSV layout 2 (\"b\"): file_pattern is empty"),
            (one(CsvLayout { name: "b".into(), patient_column: Some(" MRN".into()), ..labs_layout() }),
                "CSV layout 2 (\"b\"): patient_column column \" MRN\" has surrounding spaces; header names are trimmed"),
            (one(CsvLayout { name: "b".into(), required_columns: vec!["".into()], ..labs_layout() }), "CSV layout 2 (\"b\"): required_columns has an empty column name"),
            (one(CsvLayout { name: "b".into(), rename: [("A".to_owned(), "X".to_owned()), ("B".to_owned(), "X".to_owned())].into(), ..labs_layout() }),
                "CSV layout 2 (\"b\"): rename maps two columns to \"X\""),
        ];
        for (opts, want) in cases {
            assert_eq!(opts.validate(), Err(want.to_owned()));
        }
    }

    #[test]
    fn globs_match_star_and_question_mark_case_insensitively() {
        let cases = [
            ("labs_*.csv", "LABS_2024.CSV", true),
            ("labs_*.csv", "labs_.csv", true),
            ("labs_*.csv", "labs_2024.csv.bak", false),
            ("l?bs*", "labs", true),
            ("l?bs*", "lbs", false),
            ("*a*b*", "xxaxxbxx", true),
            ("*a*b", "xxaxxbxxc", false),
            ("*", "", true),
            ("?", "é", true),
        ];
        for (p, n, want) in cases {
            assert_eq!(glob_match(p, n), want, "{p} {n}");
        }
    }

    fn synthea_header() -> Vec<u8> {
        fixture("patients.csv")
            .split(|&b| b == b'\n')
            .next()
            .unwrap_or_default()
            .to_vec()
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600), limit in 1u64..400) {
            let _ = run("patients.csv", &bytes, &no_opts(), MAX_RECORD_BYTES as u64);
            let _ = run("x.csv", &bytes, &with_layout(labs_layout()), limit);
        }

        #[test]
        fn never_panics_after_a_synthea_header(
            tail in proptest::collection::vec(prop_oneof![any::<u8>(), Just(b','), Just(b'"'), Just(b'\n'), Just(b'\r')], 0..600),
            limit in 1u64..400,
        ) {
            let mut input = synthea_header();
            input.push(b'\n');
            input.extend_from_slice(&tail);
            let items = run("batch.csv", &input, &no_opts(), MAX_RECORD_BYTES as u64);
            let items = items.unwrap_or_default();
            for (i, item) in items.iter().enumerate() {
                prop_assert_eq!(item.position(), i as u64 + 1);
            }
            let _ = run("batch.csv", &input, &no_opts(), limit);
        }
    }
}
