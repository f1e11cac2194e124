//! FHIR R4 primitive and small complex values built from source text: dates, decimals,
//! codes, codings, references and content digests.
//!
//! Every builder returns `None` for text that would not be a valid value of the type,
//! so mappers can write `if let Some(..)` and never publish an invalid primitive.

use serde_json::{json, Map, Number, Value};
use uuid::Uuid;

/// Namespace of content digests (a sibling of the id namespace, never used for ids).
const DIGEST_NAMESPACE: Uuid = Uuid::from_u128(0x6d65_6470_6970_6545_8000_0000_0000_0002);

pub(crate) const DATA_ABSENT_REASON: &str =
    "http://terminology.hl7.org/CodeSystem/data-absent-reason";
pub(crate) const UCUM: &str = "http://unitsofmeasure.org";

/// Whitespace as FHIR's JSON schema patterns see it (`\s` of both ECMAScript and Python
/// regular expressions): Unicode white space, the byte order mark and the information
/// separators U+001C..U+001F.
pub(crate) fn is_fhir_space(c: char) -> bool {
    c.is_whitespace() || c == '\u{feff}' || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A FHIR `code`: trimmed, inner whitespace runs collapsed to one space; `None` if empty.
pub(crate) fn code(text: &str) -> Option<String> {
    let joined = text
        .split(is_fhir_space)
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    (!joined.is_empty()).then_some(joined)
}

/// A FHIR `string` from source text: trimmed; `None` if nothing is left.
pub(crate) fn string(text: &str) -> Option<String> {
    let trimmed = text.trim_matches(is_fhir_space);
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

/// A FHIR `decimal` (JSON number) from decimal text such as `-1.50`, `+7`, `.5` or `1e3`.
/// Integers stay integers. Words that Rust would read as floats (`inf`, `NaN`) are refused.
pub(crate) fn decimal(text: &str) -> Option<Number> {
    let t = text.trim();
    let unsigned = t.strip_prefix(['+', '-']).unwrap_or(t);
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (unsigned, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = digits(int)
        && frac.is_none_or(digits)
        && !(int.is_empty() && frac.is_none_or(str::is_empty));
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    if !mantissa_ok || !exponent_ok {
        return None;
    }
    if frac.is_none() && exponent.is_none() {
        if let Ok(i) = t.trim_start_matches('+').parse::<i64>() {
            return Some(Number::from(i));
        }
    }
    t.trim_start_matches('+')
        .parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
}

// ---------------------------------------------------------------------------------------------
// Dates
// ---------------------------------------------------------------------------------------------

/// The parts of a date/time, validated. Only what the source gave is set.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct DateParts {
    year: u32,
    month: Option<u32>,
    day: Option<u32>,
    /// (hour, minute, second, fraction digits)
    time: Option<(u32, u32, u32, String)>,
    /// Offset as `Z` or `+hh:mm`.
    zone: Option<String>,
    /// Whether the source gave seconds (an `instant` needs them).
    seconds: bool,
}

impl DateParts {
    fn valid(&self) -> bool {
        if self.year == 0 || self.year > 9999 {
            return false;
        }
        if let Some(m) = self.month {
            if !(1..=12).contains(&m) {
                return false;
            }
            if let Some(d) = self.day {
                if d == 0 || d > days_in_month(self.year, m) {
                    return false;
                }
            }
        } else if self.day.is_some() {
            return false;
        }
        if let Some((h, mi, s, _)) = &self.time {
            if self.day.is_none() || *h > 23 || *mi > 59 || *s > 60 {
                return false;
            }
        }
        true
    }

    fn date_text(&self) -> String {
        let mut out = format!("{:04}", self.year);
        if let Some(m) = self.month {
            out.push_str(&format!("-{m:02}"));
            if let Some(d) = self.day {
                out.push_str(&format!("-{d:02}"));
            }
        }
        out
    }

    /// As a FHIR `dateTime`: a time is only kept with its zone (R4 requires one), else the
    /// value is cut to its date.
    fn date_time_text(&self) -> String {
        let mut out = self.date_text();
        if let (Some((h, mi, s, frac)), Some(zone)) = (&self.time, &self.zone) {
            out.push_str(&format!("T{h:02}:{mi:02}:{s:02}"));
            if !frac.is_empty() {
                out.push('.');
                out.push_str(frac);
            }
            out.push_str(zone);
        }
        out
    }

    fn is_instant(&self) -> bool {
        self.time.is_some() && self.zone.is_some() && self.seconds
    }
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        2 => 28,
        _ => 31,
    }
}

fn number(digits: &str) -> Option<u32> {
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Parses a zone `Z`, `+hh:mm`, `+hhmm` or `+hh` into FHIR's `Z` / `+hh:mm`.
fn zone(text: &str) -> Option<String> {
    if text == "Z" {
        return Some("Z".to_owned());
    }
    let sign = text.get(..1).filter(|s| *s == "+" || *s == "-")?;
    let rest = text.get(1..)?.replace(':', "");
    let (h, m) = match rest.len() {
        2 => (number(&rest)?, 0),
        4 => (number(rest.get(..2)?)?, number(rest.get(2..)?)?),
        _ => return None,
    };
    // R4: -13:59 .. +14:00
    if m > 59 || h > 14 || (h == 14 && m != 0) {
        return None;
    }
    Some(format!("{sign}{h:02}:{m:02}"))
}

/// ISO 8601 as Synthea and FHIR write it: `YYYY`, `YYYY-MM`, `YYYY-MM-DD`, optionally
/// `Thh:mm[:ss[.f]]` and a zone.
fn parse_iso(text: &str) -> Option<DateParts> {
    let text = text.trim();
    let (date, time) = match text.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (text, None),
    };
    let mut parts = date.split('-');
    let year = parts.next().filter(|y| y.len() == 4).and_then(number)?;
    let month = match parts.next() {
        Some(m) if m.len() == 2 => Some(number(m)?),
        Some(_) => return None,
        None => None,
    };
    let day = match parts.next() {
        Some(d) if d.len() == 2 => Some(number(d)?),
        Some(_) => return None,
        None => None,
    };
    if parts.next().is_some() {
        return None;
    }
    let mut out = DateParts {
        year,
        month,
        day,
        ..DateParts::default()
    };
    if let Some(time) = time {
        let zone_at = time.find(['Z', '+', '-']).unwrap_or(time.len());
        let (clock, zone_text) = time.split_at(zone_at);
        let (clock, frac) = match clock.split_once('.') {
            Some((c, f)) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => {
                (c, f.to_owned())
            }
            Some(_) => return None,
            None => (clock, String::new()),
        };
        let mut hms = clock.split(':');
        let h = hms.next().filter(|s| s.len() == 2).and_then(number)?;
        let mi = hms.next().filter(|s| s.len() == 2).and_then(number)?;
        let s = match hms.next() {
            Some(s) if s.len() == 2 => number(s)?,
            Some(_) => return None,
            None if frac.is_empty() => 0,
            None => return None,
        };
        if hms.next().is_some() {
            return None;
        }
        out.seconds = clock.matches(':').count() == 2;
        out.time = Some((h, mi, s, frac));
        if !zone_text.is_empty() {
            out.zone = Some(zone(zone_text)?);
        }
    }
    out.valid().then_some(out)
}

/// HL7 v2 TS/DTM/DT: `YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]` (the degree of
/// precision component of old TS is ignored).
fn parse_hl7(text: &str) -> Option<DateParts> {
    let text = text.trim();
    let zone_at = text
        .char_indices()
        .find(|(i, c)| *i > 0 && (*c == '+' || *c == '-'))
        .map_or(text.len(), |(i, _)| i);
    let (stamp, zone_text) = text.split_at(zone_at);
    let (digits, frac) = match stamp.split_once('.') {
        Some((d, f)) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => (d, f.to_owned()),
        Some(_) => return None,
        None => (stamp, String::new()),
    };
    if !digits.bytes().all(|b| b.is_ascii_digit())
        || !matches!(digits.len(), 4 | 6 | 8 | 10 | 12 | 14)
    {
        return None;
    }
    let at = |from: usize, to: usize| digits.get(from..to).and_then(number);
    let mut out = DateParts {
        year: at(0, 4)?,
        month: at(4, 6),
        day: at(6, 8),
        ..DateParts::default()
    };
    if digits.len() >= 10 {
        let h = at(8, 10)?;
        let mi = at(10, 12).unwrap_or(0);
        let s = at(12, 14).unwrap_or(0);
        // A fraction only means something after the seconds.
        let frac = if digits.len() == 14 {
            frac
        } else {
            String::new()
        };
        out.seconds = digits.len() == 14;
        out.time = Some((h, mi, s, frac));
        if !zone_text.is_empty() {
            out.zone = Some(zone(zone_text)?);
        }
    } else if !frac.is_empty() {
        return None;
    }
    out.valid().then_some(out)
}

/// A FHIR `date` from ISO text (a date-time is cut to its date).
pub(crate) fn iso_date(text: &str) -> Option<String> {
    parse_iso(text).map(|p| p.date_text())
}

/// A FHIR `dateTime` from ISO text; a time without zone is cut to the date.
pub(crate) fn iso_date_time(text: &str) -> Option<String> {
    parse_iso(text).map(|p| p.date_time_text())
}

/// Whether `text` is a FHIR `instant`: a full date and time with zone.
pub(crate) fn is_instant(text: &str) -> bool {
    text.trim() == text && parse_iso(text).is_some_and(|p| p.is_instant())
}

/// A FHIR `date` from an HL7 v2 DT/TS.
pub(crate) fn hl7_date(text: &str) -> Option<String> {
    parse_hl7(text).map(|p| p.date_text())
}

/// A FHIR `dateTime` from an HL7 v2 TS/DTM/DT.
pub(crate) fn hl7_date_time(text: &str) -> Option<String> {
    parse_hl7(text).map(|p| p.date_time_text())
}

/// A FHIR `time` (`hh:mm:ss[.f]`) from an HL7 v2 TM (`HH[MM[SS[.S+]]][+/-ZZZZ]`; the
/// zone is dropped, R4 times have none).
pub(crate) fn hl7_time(text: &str) -> Option<String> {
    let text = text.trim();
    let clock = text.split(['+', '-']).next().unwrap_or_default();
    let (digits, frac) = match clock.split_once('.') {
        Some((d, f)) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => (d, f),
        Some(_) => return None,
        None => (clock, ""),
    };
    if !matches!(digits.len(), 2 | 4 | 6) {
        return None;
    }
    let at = |from: usize, to: usize| digits.get(from..to).and_then(number);
    let h = at(0, 2)?;
    let m = if digits.len() >= 4 { at(2, 4)? } else { 0 };
    let s = if digits.len() == 6 { at(4, 6)? } else { 0 };
    if h > 23 || m > 59 || s > 60 {
        return None;
    }
    let mut out = format!("{h:02}:{m:02}:{s:02}");
    if digits.len() == 6 && !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Codings and references
// ---------------------------------------------------------------------------------------------

/// A name made safe for a URN: ASCII letters, digits, `-`, `.` and `_`; others become `_`.
pub(crate) fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A Coding, or `None` without a code. An empty `system` means "no system".
pub(crate) fn coding(
    system: Option<&str>,
    code_text: &str,
    display: Option<&str>,
) -> Option<Value> {
    let code = code(code_text)?;
    let mut c = Map::new();
    if let Some(s) = system.filter(|s| !s.is_empty()) {
        c.insert("system".into(), json!(s));
    }
    c.insert("code".into(), json!(code));
    if let Some(d) = display.and_then(string) {
        c.insert("display".into(), json!(d));
    }
    Some(Value::Object(c))
}

/// A CodeableConcept with one coding, or `None` without a code.
pub(crate) fn concept(
    system: Option<&str>,
    code_text: &str,
    display: Option<&str>,
) -> Option<Value> {
    coding(system, code_text, display).map(|c| json!({ "coding": [c] }))
}

/// The R4 "unknown" CodeableConcept (data-absent-reason), for required concepts.
pub(crate) fn data_absent(reason: &str) -> Value {
    json!({ "coding": [{ "system": DATA_ABSENT_REASON, "code": reason }] })
}

/// A literal reference to a canonical resource.
pub(crate) fn reference(resource_type: pipeline::ResourceType, id: &str) -> Value {
    json!({ "reference": format!("{}/{id}", resource_type.fhir_name()) })
}

// ---------------------------------------------------------------------------------------------
// Digests
// ---------------------------------------------------------------------------------------------

/// JSON with object keys sorted at every level, whatever the map order of the build (so a
/// digest does not change if serde_json's `preserve_order` gets enabled somewhere).
pub(crate) fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(key) {
                    write_canonical(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A stable, position-independent source identity for content that has no id of its own.
pub(crate) fn digest(value: &Value) -> String {
    let uuid = Uuid::new_v5(&DIGEST_NAMESPACE, canonical_json(value).as_bytes());
    format!("digest:{uuid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_strict() {
        let cases: [(&str, Option<Value>); 14] = [
            ("178.2", Some(json!(178.2))),
            ("82", Some(json!(82))),
            ("+7", Some(json!(7))),
            ("-1.50", Some(json!(-1.5))),
            (".5", Some(json!(0.5))),
            ("5.", Some(json!(5.0))),
            ("1e3", Some(json!(1000.0))),
            (" 3 ", Some(json!(3))),
            ("inf", None),
            ("NaN", None),
            ("13,9", None),
            ("", None),
            (".", None),
            ("1e", None),
        ];
        for (text, want) in cases {
            assert_eq!(decimal(text).map(Value::Number), want, "{text:?}");
        }
    }

    #[test]
    fn iso_dates_keep_their_precision_and_need_a_zone_for_a_time() {
        let cases = [
            ("2019", Some("2019"), Some("2019")),
            ("2019-02", Some("2019-02"), Some("2019-02")),
            ("2019-02-17", Some("2019-02-17"), Some("2019-02-17")),
            (
                "2019-02-17T10:15:00Z",
                Some("2019-02-17"),
                Some("2019-02-17T10:15:00Z"),
            ),
            (
                "2019-02-17T10:15:00.25-05:00",
                Some("2019-02-17"),
                Some("2019-02-17T10:15:00.25-05:00"),
            ),
            ("2019-02-17T10:15", Some("2019-02-17"), Some("2019-02-17")),
            ("2019-02-29", None, None),
            ("2020-02-29", Some("2020-02-29"), Some("2020-02-29")),
            ("0000", None, None),
            ("19", None, None),
            ("90+", None, None),
            ("2019-13", None, None),
            ("2019-02-17T25:00:00Z", None, None),
        ];
        for (text, date, date_time) in cases {
            assert_eq!(iso_date(text).as_deref(), date, "{text}");
            assert_eq!(iso_date_time(text).as_deref(), date_time, "{text}");
        }
        assert!(is_instant("2025-05-25T09:00:00.000-05:00"));
        assert!(is_instant("2025-05-25T09:00:00Z"));
        assert!(!is_instant("2025"));
        assert!(!is_instant("2025-05-25T09:00Z"));
        assert!(!is_instant("2025-05-25T09:00:00"));
    }

    #[test]
    fn hl7_timestamps_become_fhir_dates() {
        let cases = [
            ("2025", Some("2025"), Some("2025")),
            ("202501", Some("2025-01"), Some("2025-01")),
            ("20250131", Some("2025-01-31"), Some("2025-01-31")),
            ("202501311230", Some("2025-01-31"), Some("2025-01-31")),
            (
                "20250131123045-0500",
                Some("2025-01-31"),
                Some("2025-01-31T12:30:45-05:00"),
            ),
            (
                "20250131123045.12+0100",
                Some("2025-01-31"),
                Some("2025-01-31T12:30:45.12+01:00"),
            ),
            (
                "2025013112+0000",
                Some("2025-01-31"),
                Some("2025-01-31T12:00:00+00:00"),
            ),
            ("20250230", None, None),
            ("2025013", None, None),
            ("abc", None, None),
        ];
        for (text, date, date_time) in cases {
            assert_eq!(hl7_date(text).as_deref(), date, "{text}");
            assert_eq!(hl7_date_time(text).as_deref(), date_time, "{text}");
        }
        assert_eq!(hl7_time("1230").as_deref(), Some("12:30:00"));
        assert_eq!(hl7_time("123045.5+0100").as_deref(), Some("12:30:45.5"));
        assert_eq!(hl7_time("2460"), None);
    }

    #[test]
    fn codes_and_digests() {
        assert_eq!(code("  a   b "), Some("a b".to_owned()));
        assert_eq!(code(" \t"), None);
        assert_eq!(coding(Some(""), "x", Some(" ")), Some(json!({"code": "x"})));
        let a = json!({"b": 1, "a": [{"y": 2, "x": 1}]});
        assert_eq!(canonical_json(&a), r#"{"a":[{"x":1,"y":2}],"b":1}"#);
        assert_eq!(digest(&a), digest(&a.clone()));
        assert_ne!(digest(&a), digest(&json!({"b": 2})));
    }
}
