//! The PHI sentinel: a sampled tripwire that scans de-identified events for values that
//! still look like direct identifiers (SSNs, phone numbers, e-mail addresses, MRNs, full
//! dates) and says where they are, never what they are.
//!
//! The sentinel is a second line of defence behind the anonymization policy, so it prefers
//! precision: pseudonyms (64 hex characters), UUIDs, year-only dates, decimals, LOINC codes
//! and UCUM units must stay silent, or every alert would be noise. A `Finding` carries the
//! pattern name and a JSON path; object keys that could themselves hold an identifier are
//! replaced in the path by their index, so a path can be logged and stored in the audit
//! trail as is.

use std::collections::HashSet;

use regex::Regex;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::monitors::{alert_id, Alert, AlertKind};

/// The identifier shapes the sentinel looks for. A closed set, so alert labels stay bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pattern {
    Ssn,
    Phone,
    Email,
    MrnLike,
    FullDate,
}

impl Pattern {
    pub const ALL: [Pattern; 5] = [
        Pattern::Ssn,
        Pattern::Phone,
        Pattern::Email,
        Pattern::MrnLike,
        Pattern::FullDate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Pattern::Ssn => "ssn",
            Pattern::Phone => "phone",
            Pattern::Email => "email",
            Pattern::MrnLike => "mrn_like",
            Pattern::FullDate => "full_date",
        }
    }
}

/// One suspicious value: which pattern matched and where. Never the matched text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Finding {
    pub pattern: Pattern,
    /// JSON path such as `$.note[0].text`. Keys that are not plain identifiers, or that
    /// match a pattern themselves, appear as `[#i]`: their index among the object's keys in
    /// sorted order.
    pub path: String,
}

/// Month and day pairs that exist (February 29 allowed), shared by both date shapes.
/// `SEP` is the separator between month and day.
fn month_day(sep: &str) -> String {
    format!(
        "(?:(?:0[13578]|1[02]){sep}(?:0[1-9]|[12][0-9]|3[01])\
         |(?:0[469]|11){sep}(?:0[1-9]|[12][0-9]|30)\
         |02{sep}(?:0[1-9]|1[0-9]|2[0-9]))"
    )
}

/// The compiled patterns. Built once per `Sentinel`; scanning only reads them.
#[derive(Debug, Clone)]
pub struct Sentinel {
    /// `None` samples everything; otherwise an event is sampled when the first 8 bytes of
    /// SHA-256(event id), read as a big-endian integer, fall below this threshold.
    threshold: Option<u64>,
    /// UUIDs are blanked before matching: an all-digit UUID segment can look like an HL7
    /// timestamp, and UUIDs are ids we mint, not PHI.
    uuid: Regex,
    ssn: Regex,
    phone: Regex,
    email: Regex,
    mrn_text: Regex,
    /// A value under an `*mrn*` key that is nothing but 5+ digits.
    mrn_value: Regex,
    iso_date: Regex,
    hl7_date: Regex,
    /// Patterns switched off by `ignoring`, e.g. `FullDate` under a date-shift policy.
    ignored: Vec<Pattern>,
    /// Keys that can be shown in a path as they are.
    plain_key: Regex,
    /// A run of 4+ digits in a key could be part of an identifier: such keys are redacted.
    digit_run: Regex,
}

impl Sentinel {
    /// `sample_rate` is the share of events to scan, from 0.0 (none) to 1.0 (all).
    pub fn new(sample_rate: f64) -> Result<Self, String> {
        if !(0.0..=1.0).contains(&sample_rate) {
            return Err(format!(
                "sentinel sample rate must be between 0.0 and 1.0, got {sample_rate}"
            ));
        }
        let threshold = if sample_rate >= 1.0 {
            None
        } else {
            // 2^64 as f64 is exact; the cast saturates, and rate < 1.0 keeps it below 2^64.
            Some((sample_rate * 18_446_744_073_709_551_616.0) as u64)
        };
        let compile = |name: &str, re: &str| {
            Regex::new(re).map_err(|e| format!("sentinel pattern {name} does not compile: {e}"))
        };
        let iso_md = month_day("-");
        let hl7_md = month_day("");
        Ok(Sentinel {
            threshold,
            ignored: Vec::new(),
            uuid: compile(
                "uuid",
                r"\b[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\b",
            )?,
            ssn: compile("ssn", r"\b\d{3}-\d{2}-\d{4}\b")?,
            // NANP: the area code never starts with 0 or 1, which keeps runs of small
            // numbers ("100 200 3000") out.
            phone: compile(
                "phone",
                r"(?:\+1[-. ]?)?(?:\([2-9]\d{2}\)[-. ]?|\b[2-9]\d{2}[-. ])\d{3}[-. ]\d{4}\b",
            )?,
            email: compile(
                "email",
                r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
            )?,
            mrn_text: compile("mrn_like", r"(?i)mrn[\s:#=._-]*\d{5,}")?,
            mrn_value: compile("mrn_like value", r"^\s*\d{5,}\s*$")?,
            // YYYY-MM-DD, optionally followed by a time: anything but another digit.
            iso_date: compile(
                "full_date iso",
                &format!(r"(?:^|[^0-9])(?:19|20)[0-9]{{2}}-{iso_md}(?:$|[^0-9])"),
            )?,
            // HL7 DT/DTM: YYYYMMDD[HH[MM[SS[.S{1,4}]]]][+/-ZZZZ], or ISO basic with a T,
            // as a token of its own. Letters around it mean a hex string or a code; a dot
            // before it or a dot and digit after it mean a decimal number.
            hl7_date: compile(
                "full_date hl7",
                &format!(
                    r"(?:^|[^0-9A-Za-z.])(?:19|20)[0-9]{{2}}{hl7_md}(?:(?:[01][0-9]|2[0-3])(?:[0-5][0-9](?:[0-5][0-9](?:\.[0-9]{{1,4}})?)?)?|T[0-9]{{2,6}})?(?:[+-][0-9]{{4}})?(?:$|[^0-9A-Za-z.]|\.(?:$|[^0-9]))"
                ),
            )?,
            plain_key: compile("plain key", r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")?,
            digit_run: compile("digit run", r"[0-9]{4}")?,
        })
    }

    /// Switches patterns off. An anonymization policy with `dates = "shift"` emits full
    /// (shifted) dates on purpose, so there `FullDate` would flag every event.
    pub fn ignoring(mut self, patterns: &[Pattern]) -> Self {
        self.ignored.extend_from_slice(patterns);
        self
    }

    /// Deterministic sampling by SHA-256 of the event id, so a replay samples the same
    /// events and two auditor replicas agree.
    pub fn sampled(&self, event_id: &str) -> bool {
        let Some(threshold) = self.threshold else {
            return true;
        };
        let digest = Sha256::digest(event_id.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_be_bytes(first) < threshold
    }

    /// Walks every string value of a JSON document (objects, arrays, nested) and reports
    /// each (pattern, path) once, in document order (object keys sorted). Text that is not
    /// JSON is scanned as one value at path `$`.
    pub fn scan_json(&self, json: &str) -> Vec<Finding> {
        let mut out = Findings::default();
        match serde_json::from_str::<Value>(json) {
            Ok(doc) => {
                let mut path = String::from("$");
                self.walk(&doc, &mut path, false, &mut out);
            }
            Err(_) => {
                for pattern in self.scan_text(json) {
                    out.push(pattern, "$");
                }
            }
        }
        out.list
    }

    /// The patterns one string matches, in `Pattern::ALL` order.
    fn scan_text(&self, text: &str) -> Vec<Pattern> {
        let text = self.uuid.replace_all(text, " ");
        let text = text.as_ref();
        let mut found = Vec::new();
        let checks = [
            (Pattern::Ssn, &self.ssn),
            (Pattern::Phone, &self.phone),
            (Pattern::Email, &self.email),
            (Pattern::MrnLike, &self.mrn_text),
            (Pattern::FullDate, &self.iso_date),
            (Pattern::FullDate, &self.hl7_date),
        ];
        for (pattern, re) in checks {
            if !found.contains(&pattern) && !self.ignored.contains(&pattern) && re.is_match(text) {
                found.push(pattern);
            }
        }
        found
    }

    /// `under_mrn_key` is true for values (and array elements) held by a key whose name
    /// contains "mrn": there a bare 5+ digit value is an MRN even without the label.
    fn walk(&self, value: &Value, path: &mut String, under_mrn_key: bool, out: &mut Findings) {
        match value {
            Value::String(s) => {
                for pattern in self.scan_text(s) {
                    out.push(pattern, path);
                }
                if under_mrn_key && self.mrn_enabled() && self.mrn_value.is_match(s) {
                    out.push(Pattern::MrnLike, path);
                }
            }
            Value::Number(n) => {
                // Only integers: a float under an mrn key is a measurement, not an id.
                let digits = n
                    .as_u64()
                    .map(|u| u.to_string())
                    .or_else(|| n.as_i64().map(|i| i.unsigned_abs().to_string()));
                if under_mrn_key && self.mrn_enabled() && digits.is_some_and(|d| d.len() >= 5) {
                    out.push(Pattern::MrnLike, path);
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    self.walk(item, path, under_mrn_key, out);
                    path.truncate(len);
                }
            }
            Value::Object(members) => {
                for (i, (key, item)) in members.iter().enumerate() {
                    let len = path.len();
                    let key_findings = self.scan_text(key);
                    if key_findings.is_empty() && self.is_showable_key(key) {
                        if key.contains('-') {
                            path.push_str(&format!("['{key}']"));
                        } else {
                            path.push('.');
                            path.push_str(key);
                        }
                    } else {
                        path.push_str(&format!("[#{i}]"));
                    }
                    for pattern in key_findings {
                        out.push(pattern, path);
                    }
                    let mrn_key = key.to_ascii_lowercase().contains("mrn");
                    self.walk(item, path, mrn_key, out);
                    path.truncate(len);
                }
            }
            Value::Null | Value::Bool(_) => {}
        }
    }

    fn mrn_enabled(&self) -> bool {
        !self.ignored.contains(&Pattern::MrnLike)
    }

    fn is_showable_key(&self, key: &str) -> bool {
        self.plain_key.is_match(key) && !self.digit_run.is_match(key)
    }
}

/// The alert for one scanned event, or `None` when nothing was found. The id is UUID v5
/// over `phi_sentinel|event_id`, so the monitors' dedupe (a `ComplianceAlert` entry with
/// this id, observed live or replayed) keeps it from firing twice. The detail names the
/// event's position and counts per pattern; paths stay with the caller, since they are
/// built from the payload's keys.
pub fn alert(
    topic: &str,
    partition: i32,
    offset: i64,
    batch_id: &str,
    event_id: &str,
    findings: &[Finding],
) -> Option<Alert> {
    if findings.is_empty() {
        return None;
    }
    let counts: Vec<String> = Pattern::ALL
        .iter()
        .filter_map(|p| {
            let n = findings.iter().filter(|f| f.pattern == *p).count();
            (n > 0).then(|| format!("{} x{n}", p.as_str()))
        })
        .collect();
    Some(Alert {
        id: alert_id(AlertKind::PhiSentinel, &[event_id]),
        kind: AlertKind::PhiSentinel,
        correlation_id: Some(batch_id.to_string()),
        topic: Some(topic.to_string()),
        partition: Some(partition),
        offset: Some(offset),
        detail: format!(
            "PHI-like values in a sampled payload: {} field finding(s): {}",
            findings.len(),
            counts.join(", ")
        ),
    })
}

/// Findings in discovery order, each (pattern, path) once.
#[derive(Default)]
struct Findings {
    seen: HashSet<(Pattern, String)>,
    list: Vec<Finding>,
}

impl Findings {
    fn push(&mut self, pattern: Pattern, path: &str) {
        if self.seen.insert((pattern, path.to_string())) {
            self.list.push(Finding {
                pattern,
                path: path.to_string(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Compiled once for the whole test run: proptest calls it thousands of times.
    fn sentinel() -> &'static Sentinel {
        static SENTINEL: std::sync::LazyLock<Sentinel> =
            std::sync::LazyLock::new(|| Sentinel::new(1.0).unwrap());
        &SENTINEL
    }

    /// Scans `json` and compares the findings as (pattern name, path) pairs.
    fn check(json: &str, expected: &[(&str, &str)]) {
        let got: Vec<(&str, String)> = sentinel()
            .scan_json(json)
            .into_iter()
            .map(|f| (f.pattern.as_str(), f.path))
            .collect();
        let expected: Vec<(&str, String)> = expected
            .iter()
            .map(|(p, path)| (*p, path.to_string()))
            .collect();
        assert_eq!(got, expected, "scanning {json}");
    }

    /// One string value at `$.v`.
    fn check_value(value: &str, expected: &[&str]) {
        let doc = serde_json::json!({ "v": value }).to_string();
        let expected: Vec<(&str, &str)> = expected.iter().map(|p| (*p, "$.v")).collect();
        check(&doc, &expected);
    }

    #[test]
    fn ssn() {
        check_value("123-45-6789", &["ssn"]);
        check_value("patient ssn 123-45-6789, verified", &["ssn"]);
        check_value("1123-45-67890", &[]);
    }

    #[test]
    fn phones() {
        for phone in [
            "(555) 123-4567",
            "(555)123-4567",
            "555-123-4567",
            "555.123.4567",
            "+1 555 123 4567",
            "+1-555-123-4567",
            "call 555-123-4567 today",
        ] {
            check_value(phone, &["phone"]);
        }
        check_value("100 200 3000", &[]);
        check_value("5551234567", &[]);
    }

    #[test]
    fn emails() {
        check_value("jane.doe+test@example.org", &["email"]);
        check_value("write to j_doe@mail.example.co.uk.", &["email"]);
        check_value("user at example dot org", &[]);
    }

    #[test]
    fn mrn_in_text() {
        check_value("MRN 1234567", &["mrn_like"]);
        check_value("mrn:00012345", &["mrn_like"]);
        check_value("Mrn# 55555", &["mrn_like"]);
        check_value("MRN1234567", &["mrn_like"]);
        check_value("MRN 1234", &[]);
    }

    #[test]
    fn mrn_by_key() {
        check(r#"{"mrn": "0012345"}"#, &[("mrn_like", "$.mrn")]);
        check(
            r#"{"patient_MRN": 7654321}"#,
            &[("mrn_like", "$.patient_MRN")],
        );
        check(
            r#"{"mrns": ["12345", "abc"]}"#,
            &[("mrn_like", "$.mrns[0]")],
        );
        check(r#"{"mrn": "1234"}"#, &[]);
        check(r#"{"mrn": 12.5}"#, &[]);
        check(r#"{"id": "1234567"}"#, &[]);
        // A pseudonymized MRN field holds a 64-hex digest with digit runs: silent.
        check(
            r#"{"mrn": "8ec66f72d65aeb7a3da9302a1c0a9561c842721c4fa0f7daf9b1264dd58c99da"}"#,
            &[],
        );
    }

    #[test]
    fn full_dates() {
        for date in [
            "1980-01-31",
            "2019-05-14T10:20:30Z",
            "2019-05-14 10:20",
            "born 2000-02-29.",
            "19800131",
            "PID|1||x||DOE^JANE||19800131|F",
            "201905141030",
            "20190514103000.1234+0100",
            "20190514T1030",
            "on 19800131.",
        ] {
            check_value(date, &["full_date"]);
        }
    }

    #[test]
    fn not_dates() {
        for value in [
            "2019",
            "2019-05",
            "201905",
            "1980-13-01",
            "1980-02-30",
            "19800230",
            "18991231",
            "21000101",
            "x19800131",
            "19800131x",
            "3.19800131",
            "19800131.5",
            "1234567890123",
        ] {
            check_value(value, &[]);
        }
    }

    #[test]
    fn silent_on_ids_codes_and_numbers() {
        for value in [
            "8ec66f72d65aeb7a3da9302a1c0a9561c842721c4fa0f7daf9b1264dd58c99da",
            "0b6b7e8e-1f2a-5c3d-9e4f-123456789abc",
            // A UUID whose segments are all digits: no HL7 timestamp inside.
            "19800101-1234-5123-8123-201905141030",
            "178.2",
            "72.5 kg",
            "8302-2",
            "2345-7",
            "LOINC 8302-2 Body height",
            "mm[Hg]",
            "kg/m2",
            "10*3/uL",
            "mg/dL",
            "Cel",
            "2019",
            "2019-05",
        ] {
            check_value(value, &[]);
        }
    }

    #[test]
    fn paths_through_nesting() {
        check(
            r#"{"note": [{"text": "seen 2019-05-14"}, {"text": "ok"}],
                "CONTENT": {"FIELD": "555-123-4567", "first-name": "a@b.io"}}"#,
            &[
                ("phone", "$.CONTENT.FIELD"),
                ("email", "$.CONTENT['first-name']"),
                ("full_date", "$.note[0].text"),
            ],
        );
        check(r#"["ok", ["123-45-6789"]]"#, &[("ssn", "$[1][0]")]);
        check(r#""123-45-6789""#, &[("ssn", "$")]);
    }

    #[test]
    fn each_pattern_and_path_once() {
        check(
            r#"{"v": "123-45-6789 and 987-65-4321, 555-123-4567"}"#,
            &[("ssn", "$.v"), ("phone", "$.v")],
        );
    }

    #[test]
    fn keys_that_hold_identifiers_are_redacted() {
        // Keys sort as "123-45-6789" < "note" < "x 1".
        check(
            r#"{"note": "fine", "123-45-6789": "2019-05-14", "x 1": "555-123-4567"}"#,
            &[("ssn", "$[#0]"), ("full_date", "$[#0]"), ("phone", "$[#2]")],
        );
        check(r#"{"field12345": "555-123-4567"}"#, &[("phone", "$[#0]")]);
    }

    #[test]
    fn invalid_json_is_scanned_as_text() {
        check("not json: 123-45-6789", &[("ssn", "$")]);
        check("{\"broken\": \"jane@example.org\"", &[("email", "$")]);
        check("", &[]);
    }

    #[test]
    fn ignored_patterns_stay_silent() {
        let s = Sentinel::new(1.0)
            .unwrap()
            .ignoring(&[Pattern::FullDate, Pattern::MrnLike]);
        let found =
            s.scan_json(r#"{"birthDate": "1980-01-31", "mrn": "1234567", "t": "123-45-6789"}"#);
        assert_eq!(
            found,
            vec![Finding {
                pattern: Pattern::Ssn,
                path: "$.t".into()
            }]
        );
    }

    #[test]
    fn alert_counts_patterns_and_never_names_values() {
        let findings = sentinel().scan_json(
            r#"{"a": "123-45-6789", "b": ["987-65-4321", "1980-01-31"], "mrn": "0012345"}"#,
        );
        let a = alert(
            "medpipe.canonical.patient.v1",
            2,
            40,
            "b-1",
            "evt-1",
            &findings,
        )
        .unwrap();
        assert_eq!(a.kind, AlertKind::PhiSentinel);
        assert_eq!(a.id, alert_id(AlertKind::PhiSentinel, &["evt-1"]));
        assert_eq!(
            a.detail,
            "PHI-like values in a sampled payload: 4 field finding(s): ssn x2, mrn_like x1, full_date x1"
        );
        assert_eq!(
            (a.correlation_id.as_deref(), a.partition, a.offset),
            (Some("b-1"), Some(2), Some(40))
        );
        assert!(alert("t", 0, 0, "b", "e", &[]).is_none());
    }

    #[test]
    fn sample_rate_is_validated() {
        assert!(Sentinel::new(-0.1).is_err());
        assert!(Sentinel::new(1.01).is_err());
        assert!(Sentinel::new(f64::NAN).is_err());
        assert!(Sentinel::new(0.0).is_ok());
    }

    #[test]
    fn sampling_is_deterministic_and_near_the_rate() {
        let s = Sentinel::new(0.25).unwrap();
        let ids: Vec<String> = (0..4000).map(|i| format!("event-{i}")).collect();
        let first: Vec<bool> = ids.iter().map(|id| s.sampled(id)).collect();
        let again: Vec<bool> = ids.iter().map(|id| s.sampled(id)).collect();
        assert_eq!(first, again);
        let share = first.iter().filter(|b| **b).count() as f64 / ids.len() as f64;
        assert!((0.2..0.3).contains(&share), "sampled share {share}");
        let none = Sentinel::new(0.0).unwrap();
        let all = Sentinel::new(1.0).unwrap();
        assert!(ids.iter().all(|id| !none.sampled(id) && all.sampled(id)));
    }

    fn ssn_strategy() -> impl Strategy<Value = String> {
        (100u32..1000, 10u32..100, 1000u32..10000).prop_map(|(a, b, c)| format!("{a}-{b}-{c}"))
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_text(text in any::<String>()) {
            for f in sentinel().scan_json(&text) {
                prop_assert!(f.path.starts_with('$'));
            }
        }

        #[test]
        fn never_panics_on_arbitrary_json(
            doc in proptest::collection::btree_map("\\PC{0,12}", "\\PC{0,40}", 0..6)
        ) {
            let json = serde_json::to_string(&doc).unwrap();
            for f in sentinel().scan_json(&json) {
                prop_assert!(f.path.starts_with('$'));
            }
        }

        #[test]
        fn paths_never_hold_the_matched_value(
            ssn in ssn_strategy(),
            key in "[a-zA-Z0-9 _-]{0,10}",
            before in "[a-z ]{0,10}",
            after in "[a-z ]{0,10}",
            in_key in any::<bool>(),
        ) {
            let text = format!("{before} {ssn} {after}");
            let doc = if in_key {
                serde_json::json!({ "outer": [{ text.clone(): { key.clone(): "x" } }] })
            } else {
                serde_json::json!({ "outer": [{ key.clone(): text.clone() }] })
            };
            let findings = sentinel().scan_json(&doc.to_string());
            prop_assert!(findings.iter().any(|f| f.pattern == Pattern::Ssn));
            let digits: String = ssn.chars().filter(char::is_ascii_digit).collect();
            for f in &findings {
                prop_assert!(!f.path.contains(&ssn), "path {} holds {}", f.path, ssn);
                prop_assert!(!f.path.contains(&digits), "path {} holds {}", f.path, digits);
                prop_assert!(!f.path.contains(&ssn[..6]), "path {} holds part of {}", f.path, ssn);
            }
        }
    }
}
