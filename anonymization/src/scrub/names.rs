//! Person names no structured field announced: found with the public-domain 1990 US
//! Census name lists (`data/names/`) and the context notes put around names.
//!
//! A dictionary word alone proves little (the surname list holds `In`, `To`, `Rule`), so a
//! hit needs one of these:
//! - a **pair**: a first name then a surname (`John Smith`, `JOHN SMITH`, `John Q. Smith`),
//!   or `Last, First` (`Smith, John`, `SMITH, JOHN`), both capitalised alike;
//! - a **label** before it (`Patient:`, `Name:`, `cc:`, `Signed:`, `Attending:`, `Dr`):
//!   the next one to three capitalised words, and after `Dr` or `cc:` a lower-case one;
//! - a **credential** after it (`, M.D.`, `MD`, `RN`, `NP`, `PA-C`, `DO`, `PhD`): the one to
//!   three capitalised words before it;
//! - an **initial** before a surname (`J. Smith`);
//! - a capitalised **first name** on its own that is not an ordinary word
//!   (`common-words.txt`), three letters or more.
//!
//! A surname alone, without a label or title, is not taken: too many are ordinary words.

use std::collections::HashSet;

use super::{push_cand, Cand, Kind};

const FIRST: &str = include_str!("../../data/names/first.txt");
const LAST: &str = include_str!("../../data/names/last.txt");
const COMMON: &str = include_str!("../../data/names/common-words.txt");

/// Labels after which the next words are a name. Compared case-sensitively, ending right
/// before the name (after optional spaces).
const LABELS: &[&str] = &[
    "Patient:",
    "PATIENT:",
    "Patient Name:",
    "Name:",
    "NAME:",
    "Pt:",
    "cc:",
    "CC:",
    "Cc:",
    "Signed:",
    "Signed by",
    "Electronically signed by",
    "Attending:",
    "Resident:",
    "Physician:",
    "Provider:",
    "Nurse:",
    "Dictated by",
    "Dictated by:",
    "Referred by",
    "Referring physician:",
    "Dr.",
    "Dr",
    "DR.",
    "dr.",
    "dr",
];

/// After these labels a lower-case name is taken too (`Dr smith`, `cc: jones`).
const LOWERCASE_LABELS: &[&str] = &["cc:", "CC:", "Cc:", "Dr.", "Dr", "DR.", "dr.", "dr"];

/// The names the scrubber looks for without being told.
pub(super) struct NameFinder {
    first: HashSet<String>,
    last: HashSet<String>,
    common: HashSet<String>,
}

#[derive(Debug, Clone, Copy)]
struct Tok<'t> {
    start: usize,
    end: usize,
    text: &'t str,
}

/// Titles: never part of the name they introduce (`Dr. [NAME]`).
const TITLES: &[&str] = &[
    "Dr", "DR", "dr", "Mr", "MR", "Mrs", "MRS", "Ms", "MS", "Miss", "Mx", "Prof", "Doctor",
];

impl Tok<'_> {
    fn title(&self) -> bool {
        TITLES.contains(&self.text)
    }

    fn titlecase(&self) -> bool {
        let mut cs = self.text.chars();
        cs.next().is_some_and(char::is_uppercase) && cs.any(char::is_lowercase)
    }

    fn upper(&self) -> bool {
        self.text.chars().filter(|c| c.is_alphabetic()).count() >= 2
            && !self.text.chars().any(char::is_lowercase)
    }

    fn capitalised(&self) -> bool {
        self.titlecase() || self.upper()
    }

    /// A one-letter initial (`Q` or `Q.` is handled by the caller).
    fn initial(&self) -> bool {
        self.text.chars().count() == 1 && self.text.chars().all(char::is_uppercase)
    }
}

fn words(text: &str) -> Vec<Tok<'_>> {
    let mut out = Vec::new();
    let mut start = None;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let inner = (c == '\'' || c == '\u{2019}' || c == '-')
            && start.is_some()
            && chars.peek().is_some_and(|(_, n)| n.is_alphabetic());
        if c.is_alphabetic() || inner {
            start.get_or_insert(i);
        } else if let Some(s) = start.take() {
            out.push(tok(text, s, i));
        }
    }
    if let Some(s) = start {
        out.push(tok(text, s, text.len()));
    }
    out
}

/// A word, without a possessive `'s` (`Brown's` -> `Brown`).
fn tok(text: &str, start: usize, end: usize) -> Tok<'_> {
    let word = &text[start..end];
    let word = word
        .strip_suffix("'s")
        .or_else(|| word.strip_suffix("\u{2019}s"))
        .filter(|w| !w.is_empty())
        .unwrap_or(word);
    Tok {
        start,
        end: start + word.len(),
        text: word,
    }
}

fn set(list: &str) -> HashSet<String> {
    list.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_lowercase)
        .collect()
}

/// A credential right after a name, from `rest` (the text after the name).
fn credential_follows(rest: &str) -> bool {
    let r = rest.trim_start_matches([',', ' ']);
    let r = r.strip_prefix(' ').unwrap_or(r);
    [
        "M.D.", "MD", "M.D", "RN", "R.N.", "NP", "N.P.", "PA-C", "PA", "DO", "D.O.", "PhD",
        "Ph.D.", "MBBS", "DNP", "CNM", "LPN",
    ]
    .iter()
    .any(|c| {
        r.strip_prefix(c)
            .is_some_and(|after| !after.starts_with(|ch: char| ch.is_alphanumeric()))
    })
}

impl NameFinder {
    pub(super) fn new() -> NameFinder {
        NameFinder {
            first: set(FIRST),
            last: set(LAST),
            common: set(COMMON),
        }
    }

    fn is_first(&self, t: &Tok<'_>) -> bool {
        self.first.contains(&t.text.to_lowercase())
    }

    fn is_last(&self, t: &Tok<'_>) -> bool {
        let lower = t.text.to_lowercase();
        self.last.contains(&lower)
            || lower
                .split(['-', '\'', '\u{2019}'])
                .filter(|p| p.len() > 1)
                .any(|p| self.last.contains(p))
    }

    fn is_common(&self, t: &Tok<'_>) -> bool {
        self.common.contains(&t.text.to_lowercase())
    }

    /// Pushes a `NAME` candidate for every name it finds in `text`.
    pub(super) fn candidates(&self, text: &str, rank: u8, out: &mut Vec<Cand>) {
        let toks = words(text);
        // The text between word `a` and word `b` (to the end when there is no `b`).
        let gap = |a: usize, b: usize| {
            let from = toks.get(a).map_or(text.len(), |t| t.end);
            let to = toks.get(b).map_or(text.len(), |t| t.start);
            text.get(from..to).unwrap_or("")
        };
        let mut push =
            |s: usize, e: usize| push_cand(text, out, toks[s].start, toks[e].end, Kind::Name, rank);
        for i in 0..toks.len() {
            let t = toks[i];
            // A middle initial between i and the next word: `John Q. Smith`, `John Q Smith`.
            let after_initial = |j: usize| -> Option<usize> {
                let m = toks.get(j)?;
                let g = gap(j - 1, j);
                (m.initial() && g == " " && matches!(gap(j, j + 1), ". " | " ")).then_some(j + 1)
            };
            // Pairs.
            if t.capitalised() && i + 1 < toks.len() {
                let next = after_initial(i + 1).unwrap_or(i + 1);
                if let Some(n) = toks.get(next) {
                    let same_case = (t.titlecase() && n.titlecase()) || (t.upper() && n.upper());
                    let g = gap(next - 1, next);
                    let spaced = g == " " || (next > i + 1 && matches!(g, " " | ". "));
                    if same_case
                        && spaced
                        && gap(i, i + 1) == " "
                        && self.is_first(&t)
                        && self.is_last(n)
                        && !(self.is_common(&t) && self.is_common(n))
                    {
                        push(i, next);
                    }
                    if same_case
                        && gap(i, i + 1) == ", "
                        && self.is_last(&t)
                        && self.is_first(&toks[i + 1])
                        && !(self.is_common(&t) && self.is_common(&toks[i + 1]))
                    {
                        let end = after_initial(i + 2).map_or(i + 1, |m| m - 1);
                        push(i, end);
                    }
                }
            }
            // An initial and a surname: `J. Smith`.
            if t.initial()
                && gap(i, i + 1) == ". "
                && toks
                    .get(i + 1)
                    .is_some_and(|n| n.titlecase() && self.is_last(n) && !self.is_common(n))
            {
                push(i, i + 1);
            }
            // Labels.
            let before = &text[..t.start];
            let label = LABELS
                .iter()
                .find(|l| {
                    before.trim_end().ends_with(*l)
                        && before[..before.trim_end().len() - l.len()]
                            .chars()
                            .next_back()
                            .is_none_or(|c| !c.is_alphanumeric())
                })
                .copied();
            if let Some(label) = label {
                let lower_ok = LOWERCASE_LABELS.contains(&label);
                if !t.title() && (t.capitalised() || (lower_ok && t.text.len() > 1)) {
                    let mut end = i;
                    for (j, next) in toks.iter().enumerate().skip(i + 1).take(3) {
                        if credential_follows(&text[toks[j - 1].end..]) {
                            break;
                        }
                        let g = gap(j - 1, j);
                        let joined = matches!(g, " " | ", " | ". ");
                        if joined && (next.capitalised() || next.initial()) {
                            end = j;
                        } else {
                            break;
                        }
                    }
                    push(i, end);
                }
            }
            // Credentials: walk back over up to three capitalised words and initials.
            if t.capitalised() && credential_follows(&text[t.end..]) {
                let mut s = i;
                while s > 0 && i - s < 3 {
                    let g = gap(s - 1, s);
                    let p = toks[s - 1];
                    if matches!(g, " " | ". ") && !p.title() && (p.capitalised() || p.initial()) {
                        s -= 1;
                    } else {
                        break;
                    }
                }
                push(s, i);
            }
            // A first name alone.
            if t.titlecase()
                && t.text.chars().count() >= 3
                && self.is_first(&t)
                && !self.is_common(&t)
            {
                push(i, i);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn found(text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        NameFinder::new().candidates(text, 1, &mut out);
        out.sort_by_key(|c| (c.start, c.end));
        out.dedup_by_key(|c| (c.start, c.end));
        out.iter().map(|c| &text[c.start..c.end]).collect()
    }

    #[test]
    fn pairs_labels_credentials_and_first_names_are_found() {
        assert_eq!(found("seen with John Smith today"), ["John", "John Smith"]);
        assert_eq!(found("SMITH, JOHN was admitted"), ["SMITH, JOHN"]);
        assert_eq!(
            found("Smith, John Q. was admitted"),
            ["Smith, John Q", "John"]
        );
        assert!(found("Signed: Qwerty Zxcv").contains(&"Qwerty Zxcv"));
        assert!(found("discussed with dr zxcvb").contains(&"zxcvb"));
        assert!(found("Qwerty P Zxcv, M.D.").contains(&"Qwerty P Zxcv"));
        assert!(found("cc: Zxcv, Qwerty").contains(&"Zxcv, Qwerty"));
        assert_eq!(found("cc: Dr. Zxcv"), ["Zxcv"]);
        assert_eq!(found("seen by Dr Zxcv, MD"), ["Zxcv"]);
        assert_eq!(
            found("requested by J. Okonkwo-Smith."),
            ["J. Okonkwo-Smith"]
        );
    }

    #[test]
    fn ordinary_words_that_are_names_need_context() {
        assert!(found("Will continue to monitor. May need a bed in Ward 4.").is_empty());
        assert!(found("Rule out infection in the left lung.").is_empty());
        assert!(found("The patient is stable; glucose 5.4 mmol/L.").is_empty());
    }
}
