//! Picks a file's format from its first bytes, with the file name as a tie-breaker,
//! and opens files transparently whether or not they are gzip-compressed.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use super::{FileError, SourceFormat};

/// How many decompressed bytes the sniffer looks at.
pub const SNIFF_BYTES: usize = 64 * 1024;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const MLLP_START: u8 = 0x0b;

/// True if the file starts with the gzip magic bytes.
pub fn is_gzip(path: &Path) -> Result<bool, FileError> {
    let mut magic = Vec::with_capacity(2);
    File::open(path)
        .and_then(|f| f.take(2).read_to_end(&mut magic))
        .map_err(|e| FileError::io(&e))?;
    Ok(magic == GZIP_MAGIC)
}

/// Opens a file for streaming, decompressing it when it starts with the gzip magic.
/// A truncated or corrupt gzip stream surfaces later as an IO error from `read`.
pub fn open(path: &Path) -> Result<Box<dyn BufRead + Send>, FileError> {
    let gz = is_gzip(path)?;
    let file = File::open(path).map_err(|e| FileError::io(&e))?;
    if gz {
        let gz = flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 16, file));
        Ok(Box::new(BufReader::with_capacity(1 << 16, gz)))
    } else {
        Ok(Box::new(BufReader::with_capacity(1 << 16, file)))
    }
}

/// Reads the first [`SNIFF_BYTES`] of a file's (decompressed) content.
pub fn head(path: &Path) -> Result<Vec<u8>, FileError> {
    let mut reader = open(path)?.take(SNIFF_BYTES as u64);
    let mut buf = Vec::with_capacity(SNIFF_BYTES);
    reader
        .read_to_end(&mut buf)
        .map_err(|e| FileError::io(&e))?;
    Ok(buf)
}

/// Picks the format from the content. The name (`.ndjson`, `.json`, `.hl7`, `.csv`,
/// with or without `.gz`) only breaks ties the content leaves open.
pub fn detect(head: &[u8], file_name: &str) -> Result<SourceFormat, FileError> {
    let text = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(head);
    let start = text.iter().position(|b| !b.is_ascii_whitespace());
    let Some(start) = start else {
        return Err(FileError::Empty);
    };
    let text = &text[start..];
    if text[0] == MLLP_START
        || ["MSH", "FHS", "BHS"]
            .iter()
            .any(|s| text.starts_with(s.as_bytes()))
    {
        return Ok(SourceFormat::Hl7v2);
    }
    if looks_binary(text) {
        return Err(FileError::UnknownFormat(
            "the content is binary, not text".into(),
        ));
    }
    let ext = extension(file_name);
    if text[0] == b'{' {
        return Ok(json_kind(text, head.len() >= SNIFF_BYTES, &ext));
    }
    let first_line = text.split(|&b| b == b'\n').next().unwrap_or(text);
    if first_line.iter().any(|b| b",;\t|".contains(b)) || ext == "csv" {
        return Ok(SourceFormat::Csv);
    }
    Err(FileError::UnknownFormat(
        "no CSV header, JSON object or HL7 MSH/FHS/BHS segment at the start".into(),
    ))
}

/// NDJSON when the first line is a complete JSON object (and it is not a lone
/// one-line Bundle), a Bundle when the first object spans several lines.
fn json_kind(text: &[u8], head_cut: bool, ext: &str) -> SourceFormat {
    let mut lines = text.split(|&b| b == b'\n');
    let first = lines.next().unwrap_or(text);
    let first_complete = text.contains(&b'\n') || !head_cut;
    match serde_json::from_slice::<serde_json::Value>(first) {
        Ok(v) if v.is_object() => {
            let more = lines.any(|l| !l.iter().all(u8::is_ascii_whitespace));
            let is_bundle = v.get("resourceType").and_then(|t| t.as_str()) == Some("Bundle");
            if is_bundle && (!more || ext == "json") {
                SourceFormat::FhirBundle
            } else {
                SourceFormat::FhirNdjson
            }
        }
        _ if !first_complete && ext == "ndjson" => SourceFormat::FhirNdjson,
        _ => SourceFormat::FhirBundle,
    }
}

/// Binary if it has NUL bytes or is not UTF-8 (ignoring a character cut at the end).
fn looks_binary(text: &[u8]) -> bool {
    if text.contains(&0) {
        return true;
    }
    match std::str::from_utf8(text) {
        Ok(_) => false,
        Err(e) => {
            e.error_len().is_some() && e.valid_up_to() < text.len().saturating_sub(4) && {
                // Allow a few stray bytes (a bad row is the CSV parser's job), not a binary blob.
                let bad = text.iter().filter(|b| !b.is_ascii()).count();
                bad * 4 > text.len()
            }
        }
    }
}

fn extension(file_name: &str) -> String {
    let lower = file_name.to_ascii_lowercase();
    let lower = lower.strip_suffix(".gz").unwrap_or(&lower);
    lower.rsplit('.').next().unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn check(content: &[u8], name: &str, expected: Result<SourceFormat, &str>) {
        let got = detect(content, name).map_err(|e| e.kind());
        assert_eq!(
            got,
            expected,
            "{name}: {:?}",
            String::from_utf8_lossy(content)
        );
    }

    #[test]
    fn formats_come_from_the_content() {
        use SourceFormat::*;
        check(b"Id,FIRST\np1,Ann\n", "x.txt", Ok(Csv));
        check(b"\xEF\xBB\xBFMRN;TEST\r\n1;2\r\n", "labs.dat", Ok(Csv));
        check(b"MSH|^~\\&|A|B\rPID|||1\r", "x.csv", Ok(Hl7v2));
        check(b"\x0bMSH|^~\\&|A\r\x1c\r", "x", Ok(Hl7v2));
        check(b"FHS|^~\\&\rBHS|^~\\&\r", "x", Ok(Hl7v2));
        check(b"{\"resourceType\":\"Patient\",\"id\":\"1\"}\n{\"resourceType\":\"Patient\",\"id\":\"2\"}\n", "x.json", Ok(FhirNdjson));
        check(
            b"{\n  \"resourceType\": \"Bundle\",\n  \"entry\": []\n}\n",
            "x.ndjson",
            Ok(FhirBundle),
        );
        check(
            b"{\"resourceType\":\"Bundle\",\"type\":\"batch\",\"entry\":[]}",
            "b.json",
            Ok(FhirBundle),
        );
        check(
            b"{\"resourceType\":\"Bundle\",\"type\":\"batch\"}\n{\"resourceType\":\"Bundle\"}\n",
            "b.ndjson",
            Ok(FhirNdjson),
        );
        check(
            b"{\"resourceType\":\"Observation\"}",
            "one.ndjson",
            Ok(FhirNdjson),
        );
    }

    #[test]
    fn unreadable_content_is_named() {
        check(b"", "x.csv", Err("empty_file"));
        check(b" \n\t\r\n", "x.csv", Err("empty_file"));
        check(b"\x00\x01\x02binary", "x.csv", Err("unknown_format"));
        check(b"just some words\n", "notes.txt", Err("unknown_format"));
        check(&[0xff; 64], "x", Err("unknown_format"));
    }

    #[test]
    fn gzip_is_opened_transparently_and_truncation_is_an_io_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.csv.gz");
        let body = b"Id,FIRST\np1,Ann\n".repeat(1000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&body).expect("gzip");
        let bytes = gz.finish().expect("gzip");
        std::fs::write(&path, &bytes).expect("write");
        assert_eq!(&head(&path).expect("head")[..8], b"Id,FIRST");
        let mut all = Vec::new();
        open(&path)
            .expect("open")
            .read_to_end(&mut all)
            .expect("read");
        assert_eq!(all, body);
        std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
        let mut out = Vec::new();
        assert!(open(&path).expect("open").read_to_end(&mut out).is_err());
    }
}
