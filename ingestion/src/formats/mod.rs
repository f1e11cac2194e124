//! Streaming parsers for every batch format ingestion accepts, behind one interface.
//!
//! A parser reads a `BufRead` and pushes one [`Item`] per record to a sink, in file order,
//! so a file of any size is parsed in bounded memory. Parsers are pure: they do no IO
//! beyond reading the reader they are given. A bad record becomes an [`Item::Rejected`]
//! and parsing goes on; only a file that cannot be read as a whole stops with a
//! [`FileError`]. Reasons name positions, lines and columns, never values (no PHI).

pub use pipeline::events::SourceRecordBody;

pub use pipeline::formats::SourceFormat;

/// One record parsed from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRecord {
    /// 1-based, strictly increasing within a file: the data row for CSV, the line for
    /// NDJSON, the entry index for a Bundle, the message index for HL7.
    pub position: u64,
    /// Resource or message type, e.g. `Patient`, `Observation`, `ADT^A01`.
    pub record_type: String,
    /// Patient link as found, the structured content and the original text.
    pub body: SourceRecordBody,
}

/// One record that could not be parsed; the batch goes on without it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Same numbering as [`ParsedRecord::position`].
    pub position: u64,
    /// A short, stable machine-readable kind, e.g. `csv_field_count`, `json_syntax`.
    pub error_kind: &'static str,
    /// Human-readable, with line/column/field where known. Never contains a value.
    pub reason: String,
}

/// What a parser pushes to its sink.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Record(ParsedRecord),
    Rejected(Rejected),
}

impl Item {
    pub fn position(&self) -> u64 {
        match self {
            Item::Record(r) => r.position,
            Item::Rejected(r) => r.position,
        }
    }
}

/// Why a whole file could not be read. Messages never contain values from the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("file is empty")]
    Empty,
    #[error("cannot read the file: {0}")]
    Io(String),
    #[error("cannot tell the file's format: {0}")]
    UnknownFormat(String),
    #[error("CSV file has no header row")]
    NoHeader,
    #[error("CSV header row is not valid UTF-8")]
    HeaderEncoding,
    #[error("not a FHIR Bundle: {0}")]
    NotABundle(String),
    #[error("malformed JSON at line {line}, column {column}: {kind}")]
    Json {
        line: usize,
        column: usize,
        kind: String,
    },
    #[error("not an HL7 v2 file: {0}")]
    NotHl7(String),
}

impl FileError {
    /// A short, stable kind for events and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            FileError::Empty => "empty_file",
            FileError::Io(_) => "unreadable_file",
            FileError::UnknownFormat(_) => "unknown_format",
            FileError::NoHeader | FileError::HeaderEncoding => "csv_header",
            FileError::NotABundle(_) => "not_a_bundle",
            FileError::Json { .. } => "json_structure",
            FileError::NotHl7(_) => "not_hl7",
        }
    }

    /// An IO error while reading, e.g. a truncated gzip stream. Only the error kind
    /// and message of the reader are kept, which carry no file content.
    pub fn io(e: &std::io::Error) -> Self {
        FileError::Io(e.to_string())
    }
}

/// The sink asked the parser to stop; the sink's owner keeps the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Halt;

/// Why a parser stopped before the end of its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("stopped by the sink")]
    Halted,
    #[error(transparent)]
    File(#[from] FileError),
}

impl From<Halt> for ParseError {
    fn from(_: Halt) -> Self {
        ParseError::Halted
    }
}

/// Receives a parser's items in file order.
pub type Sink<'a> = dyn FnMut(Item) -> Result<(), Halt> + 'a;

/// Collects every item of a parse, for tests and small files.
pub fn collect(
    parse: impl FnOnce(&mut Sink<'_>) -> Result<(), ParseError>,
) -> Result<Vec<Item>, FileError> {
    let mut items = Vec::new();
    let result = parse(&mut |item| {
        items.push(item);
        Ok(())
    });
    match result {
        Ok(()) => Ok(items),
        Err(ParseError::File(e)) => Err(e),
        Err(ParseError::Halted) => Ok(items),
    }
}

pub mod csv;
pub mod detect;
pub mod fhir;
pub mod hl7;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_layout_file_loads_and_maps_a_lab_export() {
        let opts: csv::CsvOptions =
            toml::from_str(include_str!("../../../samples/csv-layouts.toml")).expect("toml");
        opts.validate().expect("valid");
        let labs = include_bytes!("../../fixtures/csv/labs_semicolon.csv");
        let items = collect(|s| csv::parse(&labs[..], "labs_2024.csv", &opts, s)).expect("parses");
        let Some(Item::Record(first)) = items.first() else {
            panic!("{items:?}")
        };
        assert_eq!(first.record_type, "Observation");
        assert_eq!(first.body.patient_link.as_deref(), Some("MRN-900001"));
        assert_eq!(first.body.content["CODE"], "2345-7");
        assert_eq!(items.len(), 4);
    }
}
