//! Measures the free-text scrubber against gold PHI annotations (`medpipe eval deid`).
//!
//! A gold file has one note per line: `{"text": "...", "spans": [{"start": 0, "end": 5,
//! "type": "NAME"}]}`, offsets in characters (Unicode scalar values, as Python counts
//! them), `end` exclusive. Any file in that shape works, whoever wrote it.
//!
//! What counts:
//! - a gold span is **removed** when every letter and digit in it lies inside something
//!   the scrubber replaced (a partial removal leaves a fragment, so it counts as missed);
//! - **recall** per type and overall: removed gold spans / gold spans;
//! - **precision**: replaced spans that touch a gold span / all replaced spans (a replaced
//!   span of ordinary text is a false positive);
//! - **clinical tokens kept**: numbers with units and code-like tokens outside every gold
//!   span, and how many of them survived, so over-redaction shows.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::scrub::{Known, Scrubber};

/// One annotated PHI span of a gold note, in characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoldSpan {
    pub start: usize,
    pub end: usize,
    #[serde(rename = "type")]
    pub kind: String,
}

/// One gold note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoldNote {
    pub text: String,
    pub spans: Vec<GoldSpan>,
}

/// A gold file that cannot be used, with the line at fault.
#[derive(Debug, thiserror::Error)]
pub enum GoldError {
    #[error("cannot read the gold file: {0}")]
    Io(#[from] std::io::Error),
    #[error("line {line}: not a gold note ({message})")]
    Parse { line: usize, message: String },
    #[error("line {line}: span {start}..{end} is not inside the text of {chars} characters")]
    Span {
        line: usize,
        start: usize,
        end: usize,
        chars: usize,
    },
}

/// Reads a gold JSONL file; blank lines are skipped.
pub fn read_gold(reader: impl BufRead) -> Result<Vec<GoldNote>, GoldError> {
    let mut notes = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let note: GoldNote = serde_json::from_str(&line).map_err(|e| GoldError::Parse {
            line: i + 1,
            message: e.to_string(),
        })?;
        let chars = note.text.chars().count();
        if let Some(s) = note
            .spans
            .iter()
            .find(|s| s.start >= s.end || s.end > chars)
        {
            return Err(GoldError::Span {
                line: i + 1,
                start: s.start,
                end: s.end,
                chars,
            });
        }
        notes.push(note);
    }
    Ok(notes)
}

/// Counts for one PHI type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TypeTally {
    pub gold: u64,
    pub removed: u64,
}

impl TypeTally {
    pub fn recall(&self) -> f64 {
        ratio(self.removed, self.gold)
    }
}

/// The result of one evaluation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Evaluation {
    pub notes: u64,
    pub bytes: u64,
    pub by_type: BTreeMap<String, TypeTally>,
    /// Spans the scrubber replaced, and how many of them touch a gold span.
    pub replaced: u64,
    pub replaced_phi: u64,
    pub clinical_tokens: u64,
    pub clinical_tokens_kept: u64,
    /// Missed gold spans by type and surface form (letters as `a`, digits as `9`, runs
    /// collapsed): where the scrubber falls short, without printing what it missed.
    pub missed_forms: BTreeMap<String, u64>,
}

impl Evaluation {
    pub fn overall(&self) -> TypeTally {
        self.by_type
            .values()
            .fold(TypeTally::default(), |a, t| TypeTally {
                gold: a.gold + t.gold,
                removed: a.removed + t.removed,
            })
    }

    pub fn precision(&self) -> f64 {
        ratio(self.replaced_phi, self.replaced)
    }

    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.overall().recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }

    /// The report `medpipe eval deid` prints.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} notes, {} bytes\n\n| type | gold spans | removed | recall |\n|---|---:|---:|---:|\n",
            self.notes, self.bytes
        );
        for (kind, t) in &self.by_type {
            out.push_str(&format!(
                "| {kind} | {} | {} | {:.4} |\n",
                t.gold,
                t.removed,
                t.recall()
            ));
        }
        let all = self.overall();
        out.push_str(&format!(
            "| **all** | {} | {} | {:.4} |\n\nprecision {:.4} ({} of {} replaced spans touch PHI), F1 {:.4}\n\
             clinical tokens kept: {} of {} ({:.4})\n",
            all.gold,
            all.removed,
            all.recall(),
            self.precision(),
            self.replaced_phi,
            self.replaced,
            self.f1(),
            self.clinical_tokens_kept,
            self.clinical_tokens,
            ratio(self.clinical_tokens_kept, self.clinical_tokens),
        ));
        let mut missed: Vec<(&String, &u64)> = self.missed_forms.iter().collect();
        missed.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        if !missed.is_empty() {
            out.push_str("\nmost missed surface forms (letters a/A, digits 9):\n");
            for (form, n) in missed.into_iter().take(25) {
                out.push_str(&format!("  {n:>5}  {form}\n"));
            }
        }
        out
    }
}

/// The shape of a text: letters as `a` (`A` for a capital), digits as `9`, each run
/// collapsed to one, other characters kept. `Smith, John` -> `Aa, Aa`.
pub fn surface_form(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let class = match c {
            c if c.is_ascii_digit() => '9',
            c if c.is_uppercase() => 'A',
            c if c.is_alphabetic() => 'a',
            c => c,
        };
        let repeat = out.ends_with(class) && matches!(class, '9' | 'a');
        let upper_run = class == 'A' && (out.ends_with('A') || out.ends_with('a'));
        if repeat {
            continue;
        }
        if upper_run {
            // `SMITH` -> `A`, `Smith` -> `Aa`: only the first capital of a run counts.
            if out.ends_with('A') {
                continue;
            }
        }
        out.push(class);
    }
    out
}

fn ratio(n: u64, d: u64) -> f64 {
    if d == 0 {
        1.0
    } else {
        n as f64 / d as f64
    }
}

/// Numbers with a unit, code-like tokens (ICD-10, LOINC), common drug names, and
/// eponyms that are also surnames (`Foley`, `Parkinson`): clinical content the scrubber
/// should leave alone.
static CLINICAL: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(&format!(
        r"\b\d+(?:\.\d+)?\s?(?:mg/dL|mmol/L|mmHg|mg|mcg|mL|kg|cm|bpm|units|IU|%)|\b[A-TV-Z]\d{{2}}\.\d{{1,2}}\b|\b\d{{4,5}}-\d\b|(?i)\b(?:{})\b",
        CLINICAL_WORDS.join("|")
    ))
    .ok()
});

/// Drug names and eponymous clinical terms counted as clinical tokens.
pub const CLINICAL_WORDS: &[&str] = &[
    "metformin",
    "insulin",
    "lisinopril",
    "amlodipine",
    "atorvastatin",
    "simvastatin",
    "metoprolol",
    "warfarin",
    "apixaban",
    "heparin",
    "furosemide",
    "prednisone",
    "ceftriaxone",
    "azithromycin",
    "amoxicillin",
    "vancomycin",
    "albuterol",
    "omeprazole",
    "acetaminophen",
    "ibuprofen",
    "gabapentin",
    "sertraline",
    "levothyroxine",
    "Foley",
    "Parkinson",
    "Crohn",
    "Graves",
    "Hodgkin",
    "Bell",
    "Murphy",
    "Homans",
    "Gram",
    "Glasgow",
    "Wells",
    "Apgar",
    "Down",
    "Cushing",
    "Addison",
    "Barrett",
    "Baker",
    "Holter",
    "Doppler",
    "Babinski",
    "Romberg",
    "Kernig",
    "Brudzinski",
    "McBurney",
    "Virchow",
    "Wernicke",
    "Korsakoff",
    "Alzheimer",
    "Huntington",
    "Hashimoto",
    "Bowman",
    "Tinel",
    "Phalen",
    "Lachman",
    "Allen",
    "Mallampati",
    "Whipple",
    "Nissen",
    "Hartmann",
];

/// Runs `scrubber` over every note (with no structured names known, as for a note that
/// arrives alone) and counts.
pub fn evaluate(scrubber: &Scrubber, notes: &[GoldNote]) -> Evaluation {
    let mut ev = Evaluation::default();
    let none = Known::default();
    for note in notes {
        ev.notes += 1;
        ev.bytes += note.text.len() as u64;
        let out = scrubber.scrub(&note.text, &none);
        // Character offset -> byte offset, for the gold spans.
        let mut at: Vec<usize> = note.text.char_indices().map(|(b, _)| b).collect();
        at.push(note.text.len());
        let gold: Vec<(usize, usize, &str)> = note
            .spans
            .iter()
            .map(|s| (at[s.start], at[s.end], s.kind.as_str()))
            .collect();
        let replaced = |b: usize| out.spans.iter().any(|(s, e, _)| *s <= b && b < *e);
        for (start, end, kind) in &gold {
            let tally = ev.by_type.entry((*kind).to_owned()).or_default();
            tally.gold += 1;
            let gone = note.text[*start..*end]
                .char_indices()
                .filter(|(_, c)| c.is_alphanumeric())
                .all(|(i, _)| replaced(start + i));
            tally.removed += u64::from(gone);
            if !gone {
                let form = format!("{kind} {}", surface_form(&note.text[*start..*end]));
                *ev.missed_forms.entry(form).or_default() += 1;
            }
        }
        for (s, e, _) in &out.spans {
            ev.replaced += 1;
            ev.replaced_phi += u64::from(gold.iter().any(|(gs, ge, _)| s < ge && gs < e));
        }
        if let Some(re) = CLINICAL.as_ref() {
            for m in re.find_iter(&note.text) {
                if gold
                    .iter()
                    .any(|(gs, ge, _)| m.start() < *ge && *gs < m.end())
                {
                    continue;
                }
                ev.clinical_tokens += 1;
                ev.clinical_tokens_kept += u64::from(!(m.start()..m.end()).any(replaced));
            }
        }
    }
    ev
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn note(text: &str, spans: &[(usize, usize, &str)]) -> GoldNote {
        GoldNote {
            text: text.into(),
            spans: spans
                .iter()
                .map(|(s, e, k)| GoldSpan {
                    start: *s,
                    end: *e,
                    kind: (*k).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn removed_found_and_missed_spans_are_counted_in_characters() {
        let scrubber = Scrubber::new().unwrap();
        // "é" makes byte and character offsets differ.
        let text = "Pé seen 03/14/2019 by rose, glucose 5.4 mmol/L, SSN 123-45-6789.";
        let date = text.find("03/14").unwrap();
        let ssn = text.find("123-45").unwrap();
        let name = text.find("rose").unwrap();
        // Byte offsets of ASCII after "é" are one more than character offsets.
        let ev = evaluate(
            &scrubber,
            &[note(
                text,
                &[
                    (date - 1, date - 1 + 10, "DATE"),
                    (ssn - 1, ssn - 1 + 11, "ID"),
                    (name - 1, name - 1 + 4, "NAME"),
                ],
            )],
        );
        assert_eq!(
            ev.by_type["DATE"],
            TypeTally {
                gold: 1,
                removed: 1
            }
        );
        assert_eq!(
            ev.by_type["ID"],
            TypeTally {
                gold: 1,
                removed: 1
            }
        );
        // A name in lower case that is also a word, with no context: missed.
        assert_eq!(
            ev.by_type["NAME"],
            TypeTally {
                gold: 1,
                removed: 0
            }
        );
        assert_eq!((ev.replaced, ev.replaced_phi), (2, 2));
        assert_eq!((ev.clinical_tokens, ev.clinical_tokens_kept), (1, 1));
        assert!((ev.overall().recall() - 2.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn a_gold_file_with_a_span_outside_its_text_names_the_line() {
        let file = "{\"text\":\"abc\",\"spans\":[]}\n\n{\"text\":\"abc\",\"spans\":[{\"start\":1,\"end\":9,\"type\":\"NAME\"}]}\n";
        let err = read_gold(file.as_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 3: span 1..9 is not inside the text of 3 characters"
        );
        let bad = read_gold("{\"text\":1}".as_bytes()).unwrap_err();
        assert!(
            bad.to_string().starts_with("line 1: not a gold note"),
            "{bad}"
        );
    }
}
