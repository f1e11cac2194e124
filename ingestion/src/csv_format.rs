//! Parses CSV batch files (Synthea's export layout) into source records. Pure: no IO.

use pipeline::events::SourceRecordBody;
use serde_json::{Map, Value};

/// One parsed record, or why a row was rejected.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    Record(SourceRecordBody),
    Rejected {
        error_kind: &'static str,
        reason: String,
    },
}

/// A whole file's parse result.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedFile {
    pub record_type: String,
    /// One entry per data row, in file order; position = index + 1.
    pub rows: Vec<Row>,
}

/// Why a file could not be read at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("file is empty")]
    Empty,
    #[error("file has no header row")]
    NoHeader,
    #[error("header row is not valid UTF-8")]
    HeaderEncoding,
}

/// Record type of a Synthea CSV file, from its name.
pub fn record_type_for(file_name: &str) -> &'static str {
    let stem = file_name
        .rsplit('/')
        .next()
        .unwrap_or(file_name)
        .to_ascii_lowercase();
    let stem = stem.trim_end_matches(".gz").trim_end_matches(".csv");
    match stem {
        s if s.starts_with("patients") => "Patient",
        s if s.starts_with("encounters") => "Encounter",
        s if s.starts_with("observations") => "Observation",
        s if s.starts_with("conditions") => "Condition",
        s if s.starts_with("medications") => "MedicationRequest",
        _ => "Unknown",
    }
}

/// The column that links a row to its patient: `Id` in patients.csv, `PATIENT` elsewhere.
fn patient_column(record_type: &str) -> &'static str {
    if record_type == "Patient" {
        "Id"
    } else {
        "PATIENT"
    }
}

/// Parses a CSV file with a header row. A bad row is rejected with its line number and
/// the problem; values never appear in reasons.
pub fn parse(file_name: &str, bytes: &[u8]) -> Result<ParsedFile, FileError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(FileError::Empty);
    }
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(bytes);
    let headers: Vec<String> = match reader.byte_headers() {
        Ok(h) if !h.is_empty() => h
            .iter()
            .map(|f| std::str::from_utf8(f).map(|s| s.trim().to_string()))
            .collect::<Result<_, _>>()
            .map_err(|_| FileError::HeaderEncoding)?,
        _ => return Err(FileError::NoHeader),
    };
    let record_type = record_type_for(file_name);
    let link_col = patient_column(record_type);
    let mut rows = Vec::new();
    let mut record = csv::ByteRecord::new();
    loop {
        // The reader sits at the start of the next record, so this is its first line.
        let line = reader.position().line();
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => rows.push(row(&headers, &record, line, link_col)),
            Err(e) => {
                let reason = match e.kind() {
                    csv::ErrorKind::Utf8 { .. } => format!("line {line}: invalid UTF-8"),
                    _ => format!("line {line}: malformed CSV row"),
                };
                rows.push(Row::Rejected {
                    error_kind: "csv_row",
                    reason,
                });
            }
        }
    }
    Ok(ParsedFile {
        record_type: record_type.into(),
        rows,
    })
}

fn row(headers: &[String], record: &csv::ByteRecord, line: u64, link_col: &str) -> Row {
    if record.len() != headers.len() {
        return Row::Rejected {
            error_kind: "csv_field_count",
            reason: format!(
                "line {line}: expected {} fields, found {}",
                headers.len(),
                record.len()
            ),
        };
    }
    let mut content = Map::new();
    for (i, (name, field)) in headers.iter().zip(record.iter()).enumerate() {
        match std::str::from_utf8(field) {
            Ok(v) => {
                content.insert(name.clone(), Value::String(v.to_string()));
            }
            Err(_) => {
                return Row::Rejected {
                    error_kind: "invalid_utf8",
                    reason: format!("line {line}: column {} ({name}) is not valid UTF-8", i + 1),
                }
            }
        }
    }
    let patient_link = content
        .get(link_col)
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(vec![]);
    let original = match w
        .write_byte_record(record)
        .ok()
        .and_then(|_| w.into_inner().ok())
    {
        Some(b) => String::from_utf8_lossy(&b).trim_end().to_string(),
        None => String::new(),
    };
    Row::Record(SourceRecordBody {
        patient_link,
        content: Value::Object(content),
        original,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kinds(p: &ParsedFile) -> Vec<&'static str> {
        p.rows
            .iter()
            .map(|r| match r {
                Row::Record(_) => "ok",
                Row::Rejected { error_kind, .. } => error_kind,
            })
            .collect()
    }

    #[test]
    fn synthea_patients_parse_with_bom_crlf_and_quoted_newlines() {
        let csv =
            "\u{FEFF}Id,FIRST,ADDRESS\r\np1,Ann,\"1 Main St\r\nApt 2\"\r\np2,Bob,\"x, y\"\r\n";
        let p = parse("patients.csv", csv.as_bytes()).expect("parses");
        assert_eq!(p.record_type, "Patient");
        assert_eq!(kinds(&p), vec!["ok", "ok"]);
        let Row::Record(r) = &p.rows[0] else { panic!() };
        assert_eq!(r.patient_link.as_deref(), Some("p1"));
        assert_eq!(r.content["ADDRESS"], "1 Main St\r\nApt 2");
    }

    #[test]
    fn bad_rows_are_rejected_with_line_numbers_and_no_values() {
        let mut csv = b"Id,FIRST\np1,Ann\np2\np3,".to_vec();
        csv.extend_from_slice(&[0xff, 0xfe]);
        csv.extend_from_slice(b"\np4,Dee\n");
        let p = parse("patients.csv", &csv).expect("parses");
        assert_eq!(
            kinds(&p),
            vec!["ok", "csv_field_count", "invalid_utf8", "ok"]
        );
        let Row::Rejected { reason, .. } = &p.rows[1] else {
            panic!()
        };
        assert_eq!(reason, "line 3: expected 2 fields, found 1");
        let Row::Rejected { reason, .. } = &p.rows[2] else {
            panic!()
        };
        assert_eq!(reason, "line 4: column 2 (FIRST) is not valid UTF-8");
    }

    #[test]
    fn empty_files_fail_as_a_whole() {
        assert_eq!(parse("patients.csv", b""), Err(FileError::Empty));
        assert_eq!(parse("patients.csv", b"  \n"), Err(FileError::Empty));
    }

    #[test]
    fn record_types_follow_synthea_file_names() {
        assert_eq!(record_type_for("patients.csv"), "Patient");
        assert_eq!(record_type_for("x/observations.csv.gz"), "Observation");
        assert_eq!(record_type_for("other.csv"), "Unknown");
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse("patients.csv", &bytes);
        }
    }
}
