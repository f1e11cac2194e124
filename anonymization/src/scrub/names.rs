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
//!   (`common-words.txt`), three letters or more;
//! - a **soft label** before it (`Patient`, `Pt`, `husband`, `daughter`, ...): the next
//!   capitalised word when it is a listed name, and the capitalised words joined to it;
//! - a **reporting verb** after a listed name (`Frank reports`, `Grace denies`);
//! - a listed name that **opens a line** and is followed by a bracket (`Smith (MRN ...)`);
//! - a listed first name that is not an ordinary word, next to an unlisted capitalised word
//!   that is not one either (`Billy Okafor`, `Okafor, Maria`);
//! - a capitalised word that is in no list at all: no listed name, and no word of the
//!   English vocabulary (`data/words/english.txt`), the drug names (`drugs.txt`) or the
//!   clinical words (`clinical.txt`), even inflected (`Sturkenboom`, `Okafor`).
//!
//! A surname alone, without any of these, is not taken: too many are ordinary words. A
//! listed name followed by a noun such as `sign`, `test` or `disease` is an eponym and is
//! taken only with a label, a title, a credential or a neighbouring name.

/// Look-ups in the name and word sets are the name finder's inner loop: a fast hasher
/// (the sets hold public word lists, so hash flooding is no concern).
type HashSet<T> = foldhash::HashSet<T>;

use super::{push_cand, Cand, Kind};

const FIRST: &str = include_str!("../../data/names/first.txt");
const LAST: &str = include_str!("../../data/names/last.txt");
const COMMON: &str = include_str!("../../data/names/common-words.txt");
const ENGLISH: &str = include_str!("../../data/words/english.txt");
const CLINICAL: &str = include_str!("../../data/words/clinical.txt");
const DRUGS: &str = include_str!("../../data/words/drugs.txt");

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

/// Words after which a capitalised word that is a listed name is a name: `Patient Brown`,
/// `her husband Grace`. Compared as whole words, ignoring case.
const SOFT_LABELS: &[&str] = &[
    "Patient",
    "Pt",
    "husband",
    "wife",
    "spouse",
    "partner",
    "son",
    "daughter",
    "mother",
    "father",
    "brother",
    "sister",
    "friend",
    "caregiver",
    "guardian",
    "niece",
    "nephew",
    "aunt",
    "uncle",
    "grandson",
    "granddaughter",
    "grandmother",
    "grandfather",
    "fiance",
    "fiancee",
    "neighbor",
    "neighbour",
];

/// Nouns that, right after a listed name, make it an eponym (`Allen test`, `Barrett
/// esophagus`): then it is not taken on its own, only with stronger context.
const EPONYM_NOUNS: &[&str] = &[
    "sign",
    "signs",
    "test",
    "tests",
    "disease",
    "syndrome",
    "palsy",
    "esophagus",
    "cyst",
    "catheter",
    "procedure",
    "operation",
    "score",
    "scale",
    "classification",
    "criteria",
    "stain",
    "monitor",
    "maneuver",
    "manoeuvre",
    "point",
    "reflex",
    "fracture",
    "lymphoma",
    "thyroiditis",
    "tube",
    "needle",
    "forceps",
    "position",
    "ulcer",
    "phenomenon",
    "law",
    "line",
    "block",
    "shunt",
    "fundoplication",
    "triad",
    "node",
    "nodes",
    "tumor",
    "tumour",
    "sarcoma",
    "ratio",
    "formula",
    "equation",
];

/// Verbs that, right after a listed name, make it a person (`Frank reports ...`).
/// Lower-case particles inside surnames.
const SURNAME_PARTICLES: &[&str] = &[
    "van", "von", "de", "den", "der", "ten", "ter", "da", "di", "del", "della", "du", "dos", "das",
    "le", "la", "bin", "ibn", "al", "el",
];

/// Capitalised words that come before names inside sentences without being first names:
/// days, months, places of care, roles and salutations.
const NOT_FIRST_NAMES: &[&str] = &[
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
    "patient",
    "pt",
    "nurse",
    "doctor",
    "professor",
    "dear",
    "hi",
    "hello",
    "dr",
    "mr",
    "mrs",
    "ms",
    "st",
    "saint",
    "mount",
    "lake",
    "fort",
    "port",
    "new",
    "north",
    "south",
    "east",
    "west",
    "upper",
    "lower",
    "the",
    "and",
    "or",
    "of",
    "for",
    "with",
    "from",
    "to",
    "at",
    "by",
    "in",
    "on",
    "an",
];

const REPORTING_VERBS: &[&str] = &[
    "reports",
    "reported",
    "states",
    "stated",
    "denies",
    "denied",
    "complains",
    "complained",
    "presents",
    "presented",
    "endorses",
    "endorsed",
    "notes",
    "noted",
    "says",
    "said",
    "describes",
    "admits",
    "tolerated",
    "returns",
    "returned",
    "underwent",
];

/// After these labels a lower-case name is taken too (`Dr smith`, `cc: jones`).
const LOWERCASE_LABELS: &[&str] = &["cc:", "CC:", "Cc:", "Dr.", "Dr", "DR.", "dr.", "dr"];

/// The names the scrubber looks for without being told.
pub(super) struct NameFinder {
    first: HashSet<String>,
    last: HashSet<String>,
    common: HashSet<String>,
    /// English, clinical and drug words, lower case.
    vocabulary: HashSet<&'static str>,
}

#[derive(Debug, Clone, Copy)]
struct Tok<'t> {
    start: usize,
    end: usize,
    text: &'t str,
    /// `text` in lower case (see [`lower_in_place`]).
    lower: &'t str,
    /// Whether it is a listed first name, surname or common word: looked up once per
    /// token by [`NameFinder::classify`], since the rules ask again and again.
    first: bool,
    last: bool,
    common: bool,
    /// Capital then some lower case (`Smith`, `McDonald`).
    titlecase: bool,
    /// Two letters or more, none lower case (`SMITH`).
    upper: bool,
}

/// Titles: never part of the name they introduce (`Dr. [NAME]`).
const TITLES: &[&str] = &[
    "Dr", "DR", "dr", "Mr", "MR", "Mrs", "MRS", "Ms", "MS", "Miss", "Mx", "Prof", "Doctor",
];

impl Tok<'_> {
    fn title(&self) -> bool {
        self.text.len() <= 6 && TITLES.contains(&self.text)
    }

    fn titlecase(&self) -> bool {
        self.titlecase
    }

    fn upper(&self) -> bool {
        self.upper
    }

    fn capitalised(&self) -> bool {
        self.titlecase() || self.upper()
    }

    /// A one-letter initial (`Q` or `Q.` is handled by the caller).
    fn initial(&self) -> bool {
        self.text.chars().count() == 1 && self.text.chars().all(char::is_uppercase)
    }
}

/// `text` in lower case, byte for byte at the same offsets: a character whose lower case
/// has another length (rare outside Turkish `İ`) is kept as it is.
fn lower_in_place(text: &str) -> String {
    if text.is_ascii() {
        return text.to_ascii_lowercase();
    }
    text.chars()
        .map(|c| {
            let mut l = c.to_lowercase();
            match (l.next(), l.next()) {
                (Some(lc), None) if lc.len_utf8() == c.len_utf8() => lc,
                _ => c,
            }
        })
        .collect()
}

fn words<'t>(text: &'t str, lower: &'t str) -> Vec<Tok<'t>> {
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
            out.push(tok(text, lower, s, i));
        }
    }
    if let Some(s) = start {
        out.push(tok(text, lower, s, text.len()));
    }
    out
}

/// A word, without a possessive `'s` (`Brown's` -> `Brown`).
fn tok<'t>(text: &'t str, lower: &'t str, start: usize, end: usize) -> Tok<'t> {
    let word = &text[start..end];
    let word = word
        .strip_suffix("'s")
        .or_else(|| word.strip_suffix("\u{2019}s"))
        .filter(|w| !w.is_empty())
        .unwrap_or(word);
    let end = start + word.len();
    let mut cs = word.chars();
    let titlecase = cs.next().is_some_and(char::is_uppercase) && cs.any(char::is_lowercase);
    let upper = word.chars().filter(|c| c.is_alphabetic()).count() >= 2
        && !word.chars().any(char::is_lowercase);
    Tok {
        titlecase,
        upper,
        start,
        end,
        text: word,
        lower: lower.get(start..end).unwrap_or(word),
        first: false,
        last: false,
        common: false,
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
            vocabulary: [ENGLISH, CLINICAL, DRUGS]
                .iter()
                .flat_map(|l| l.lines())
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .collect(),
        }
    }

    /// Whether `word` is an English or clinical word, itself or by a regular inflection
    /// (`Patients`, `Collected`, `Stopping`); every part of a hyphenated word must be.
    /// `lower` is the word in lower case (a token's `lower`).
    fn is_word(&self, lower: &str) -> bool {
        let lower: std::borrow::Cow<'_, str> = if lower.contains('\u{2019}') {
            lower.replace('\u{2019}', "'").into()
        } else {
            lower.into()
        };
        if self.vocabulary.contains(lower.as_ref()) {
            return true;
        }
        lower
            .split(['-', '\''])
            .filter(|p| !p.is_empty())
            .all(|p| self.is_word_part(p))
    }

    fn is_word_part(&self, w: &str) -> bool {
        if self.vocabulary.contains(w) {
            return true;
        }
        let known = |stem: &str| stem.len() >= 2 && self.vocabulary.contains(stem);
        // A doubled final consonant before `-ed`/`-ing`/`-er` (`stopped` -> `stop`). Compared
        // as characters: two equal final bytes can be the inside of one multi-byte character.
        let undouble = |stem: &str| {
            let mut last = stem.chars().rev();
            match (last.next(), last.next(), last.next()) {
                (Some(a), Some(b), Some(_)) if a == b => known(&stem[..stem.len() - a.len_utf8()]),
                _ => false,
            }
        };
        for suffix in [
            "s", "es", "ed", "d", "ing", "er", "ers", "est", "ly", "ness", "ment",
        ] {
            if let Some(stem) = w.strip_suffix(suffix) {
                if known(stem) || undouble(stem) || known(&format!("{stem}e")) {
                    return true;
                }
            }
        }
        if ["ies", "ied", "ier", "iest", "ily"].iter().any(|suffix| {
            w.strip_suffix(suffix)
                .is_some_and(|stem| known(&format!("{stem}y")))
        }) {
            return true;
        }
        // A compound of two words of four letters or more (`workstation`).
        w.char_indices().skip(4).any(|(at, _)| {
            w.len() - at >= 4
                && self.vocabulary.contains(&w[..at])
                && self.vocabulary.contains(&w[at..])
        })
    }

    /// Looks a token up in the name and common-word lists.
    fn classify(&self, t: &mut Tok<'_>) {
        t.first = self.first.contains(t.lower);
        t.last = self.last.contains(t.lower)
            || t.lower
                .split(['-', '\'', '\u{2019}'])
                .filter(|p| p.len() > 1)
                .any(|p| self.last.contains(p));
        t.common = self.common.contains(t.lower);
    }

    fn is_first(&self, t: &Tok<'_>) -> bool {
        t.first
    }

    fn is_last(&self, t: &Tok<'_>) -> bool {
        t.last
    }

    fn is_common(&self, t: &Tok<'_>) -> bool {
        t.common
    }

    /// Pushes a `NAME` candidate for every name it finds in `text`.
    pub(super) fn candidates(&self, text: &str, rank: u8, out: &mut Vec<Cand>) {
        let lower = lower_in_place(text);
        let mut toks = words(text, &lower);
        for t in &mut toks {
            self.classify(t);
        }
        // The text between word `a` and word `b` (to the end when there is no `b`).
        let gap = |a: usize, b: usize| {
            let from = toks.get(a).map_or(text.len(), |t| t.end);
            let to = toks.get(b).map_or(text.len(), |t| t.start);
            text.get(from..to).unwrap_or("")
        };
        // Found names, as ranges of words; widened and pushed at the end.
        let mut found: Vec<(usize, usize)> = Vec::new();
        let mut push = |s: usize, e: usize| found.push((s, e));
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
                    // A middle initial makes two ordinary words a name (`Mark H. Ward`).
                    let middle = next > i + 1;
                    if same_case
                        && spaced
                        && gap(i, i + 1) == " "
                        && self.is_first(&t)
                        && self.is_last(n)
                        && (middle || !(self.is_common(&t) && self.is_common(n)))
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
            // An initial and a surname: `J. Smith`; after `by`, `per` or `with` any
            // capitalised word (`requested by A. Okafor`).
            let introduced = i > 0
                && gap(i - 1, i) == " "
                && matches!(toks[i - 1].text, "by" | "per" | "with" | "from" | "to");
            if t.initial()
                && gap(i, i + 1) == ". "
                && toks.get(i + 1).is_some_and(|n| {
                    n.titlecase()
                        && ((self.is_last(n) && !(self.is_common(n) && n.text.contains('-')))
                            || (introduced && n.text.chars().count() >= 2))
                })
            {
                push(i, i + 1);
            }
            // Labels.
            let before = text[..t.start].trim_end();
            let last_byte = before.as_bytes().last().copied();
            let label = LABELS
                .iter()
                .find(|l| {
                    l.as_bytes().last().copied() == last_byte
                        && before.ends_with(*l)
                        && before[..before.len() - l.len()]
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
            let listed = self.is_first(&t) || self.is_last(&t);
            let rare_first = |k: &Tok<'_>| {
                k.capitalised()
                    && k.text.chars().count() >= 3
                    && self.is_first(k)
                    && !self.is_common(k)
            };
            let unlisted = |k: &Tok<'_>| {
                k.capitalised()
                    && k.text.chars().count() >= 3
                    && !self.is_first(k)
                    && !self.is_last(k)
                    && !self.is_common(k)
            };
            // Soft labels: the word before, whole.
            let soft = i > 0
                && SOFT_LABELS
                    .iter()
                    .any(|l| l.eq_ignore_ascii_case(toks[i - 1].text))
                && gap(i - 1, i) == " ";
            let eponym = gap(i, i + 1) == " "
                && toks
                    .get(i + 1)
                    .is_some_and(|n| EPONYM_NOUNS.contains(&n.lower));
            if soft
                && t.capitalised()
                && !t.title()
                && listed
                && !eponym
                && !text[t.end..].starts_with(':')
            {
                let mut end = i;
                for (j, next) in toks.iter().enumerate().skip(i + 1).take(3) {
                    let joined = matches!(gap(j - 1, j), " " | ", " | ". ");
                    if joined && (next.capitalised() || next.initial()) {
                        end = j;
                    } else {
                        break;
                    }
                }
                push(i, end);
            }
            // A listed name and a reporting verb.
            if t.titlecase()
                && listed
                && gap(i, i + 1) == " "
                && toks
                    .get(i + 1)
                    .is_some_and(|v| REPORTING_VERBS.contains(&v.text))
            {
                push(i, i);
            }
            // A listed name that opens a line, then a bracket. (The line's start is looked
            // for last: it scans back over the line.)
            let line_start = || {
                text[..t.start]
                    .rsplit('\n')
                    .next()
                    .is_some_and(|l| l.trim().is_empty())
            };
            if t.capitalised()
                && listed
                && !eponym
                && text[t.end..].trim_start_matches(' ').starts_with('(')
                && line_start()
            {
                push(i, i);
            }
            // A rare first name next to an unlisted capitalised word, in the same case
            // (`Billy Okafor`, `Billy O. Okafor`, `OKAFOR, BILLY`).
            let alike = |a: &Tok<'_>, b: &Tok<'_>| {
                (a.titlecase() && b.titlecase()) || (a.upper() && b.upper())
            };
            let next = after_initial(i + 1).unwrap_or(i + 1);
            if let Some(n) = toks.get(next) {
                if rare_first(&t)
                    && gap(i, i + 1) == " "
                    && matches!(gap(next - 1, next), " " | ". ")
                    && unlisted(n)
                    && alike(&t, n)
                {
                    push(i, next);
                }
            }
            if let Some(n) = toks.get(i + 1) {
                if unlisted(&t) && gap(i, i + 1) == ", " && rare_first(n) && alike(&t, n) {
                    push(i, i + 1);
                }
            }
            // A capitalised word that is no English or clinical word: an unlisted name
            // (`Sturkenboom`, `Okafor`) or a listed one that is no word (`Olsen`).
            let alone = !text[..t.start]
                .chars()
                .next_back()
                .is_some_and(char::is_alphanumeric)
                && !text[t.end..]
                    .chars()
                    .next()
                    .is_some_and(char::is_alphanumeric);
            // `MRNs`, `HbA` are abbreviations: the second letter must be lower case.
            let proper = t.text.chars().nth(1).is_some_and(char::is_lowercase);
            if t.titlecase()
                && !t.title()
                && proper
                && alone
                && !eponym
                && t.text.chars().count() >= 3
                && !self.is_common(&t)
                && !self.is_word(t.lower)
            {
                push(i, i);
            }
            // A first name alone.
            if t.titlecase()
                && !eponym
                && t.text.chars().count() >= 3
                && self.is_first(&t)
                && !self.is_common(&t)
            {
                push(i, i);
            }
        }
        // Widen each name over the initials and name-like words right next to it, so that
        // no part of `Anastasie M. Cressac` is left when one part was found.
        let namelike = |k: &Tok<'_>| {
            !k.title()
                && !NOT_FIRST_NAMES.contains(&k.lower)
                && (k.initial()
                    || (k.capitalised()
                        && (self.is_first(k) || self.is_last(k) || !self.is_word(k.lower))))
        };
        // Surname particles: `Frits van den Heuvel`, `Cinthia van Lint`.
        let particle = |k: &Tok<'_>| SURNAME_PARTICLES.contains(&k.text);
        // A capitalised word inside a sentence, right before a name, is its first name even
        // when it is also an English word (`add Liam Avery`, `with Aster Bodelier`); at the
        // start of a sentence it may be any word, so it is left.
        let mid_sentence = |j: usize| {
            j > 0
                && !text[..toks[j].start]
                    .trim_end_matches([' ', '\t'])
                    .ends_with(['.', '!', '?', '\n', ':', '"', '“', '(', '>', '/'])
        };
        let first_before = |k: &Tok<'_>| {
            k.titlecase()
                && !k.title()
                && k.text.chars().count() >= 2
                && !EPONYM_NOUNS.contains(&k.lower)
                && !NOT_FIRST_NAMES.contains(&k.lower)
        };
        for (mut s, mut e) in found {
            loop {
                if s > 0
                    && namelike(&toks[s - 1])
                    && (gap(s - 1, s) == " " || (gap(s - 1, s) == ". " && toks[s - 1].initial()))
                {
                    s -= 1;
                    continue;
                }
                // Particles, then the word before them.
                let mut p = s;
                while p > 0 && particle(&toks[p - 1]) && gap(p - 1, p) == " " {
                    p -= 1;
                }
                if p > 0
                    && gap(p - 1, p) == " "
                    && first_before(&toks[p - 1])
                    && mid_sentence(p - 1)
                {
                    s = p - 1;
                    continue;
                }
                break;
            }
            // Particles and the surname after them: `<first name> van Lint`.
            let mut p = e;
            while p + 1 < toks.len() && particle(&toks[p + 1]) && gap(p, p + 1) == " " {
                p += 1;
            }
            if p > e
                && p + 1 < toks.len()
                && gap(p, p + 1) == " "
                && toks[p + 1].titlecase()
                && !EPONYM_NOUNS.contains(&toks[p + 1].lower)
            {
                e = p + 1;
            }
            while e + 1 < toks.len()
                && namelike(&toks[e + 1])
                && (gap(e, e + 1) == " " || (gap(e, e + 1) == ". " && toks[e].initial()))
            {
                e += 1;
            }
            push_cand(text, out, toks[s].start, toks[e].end, Kind::Name, rank);
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
        assert_eq!(found("seen with John Smith today"), ["John Smith"]);
        assert_eq!(found("SMITH, JOHN was admitted"), ["SMITH, JOHN"]);
        assert_eq!(
            found("Smith, John Q. was admitted"),
            ["Smith, John Q", "John Q"]
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
    fn soft_labels_verbs_unknown_words_and_widening() {
        assert_eq!(found("home with her husband Grace."), ["Grace"]);
        assert_eq!(found("Frank reports pain"), ["Frank"]);
        assert_eq!(found("seen by Sturkenboom today"), ["Sturkenboom"]);
        assert_eq!(
            found("My name is Anastasie M. Cressac."),
            ["Anastasie M. Cressac"]
        );
        assert_eq!(found("requested by A. Okafor."), ["A. Okafor"]);
        assert_eq!(found("Patient Brown, ref 1"), ["Brown"]);
        assert_eq!(found("Okafor (MRN 1)"), ["Okafor"]);
    }

    #[test]
    fn eponyms_drugs_and_known_words_are_kept() {
        assert!(found("Allen test normal. Babinski absent.").is_empty());
        assert!(found("Barrett esophagus on endoscopy").is_empty());
        assert!(found("Workstation 4. Patients were seen.").is_empty());
        assert!(found("Started Lasix and Coumadin.").is_empty());
        assert!(found("Patient Education given; MRNs reviewed").is_empty());
    }

    #[test]
    fn first_names_that_are_words_and_particles_join_a_found_name_inside_a_sentence() {
        assert_eq!(
            found("I want to add Liam Bodelier as a beneficiary"),
            ["Liam Bodelier"]
        );
        assert_eq!(
            found("Follow up with Frits van den Okafor, and ask Cinthia van Sturkenboom."),
            ["Frits van den Okafor", "Cinthia van Sturkenboom"]
        );
        // At a sentence's start, and after days and roles, the word before is kept.
        assert_eq!(found("Liam Bodelier called."), ["Bodelier"]);
        assert_eq!(
            found("seen on Monday Okafor and Patient Okafor"),
            ["Okafor", "Okafor"]
        );
    }

    #[test]
    fn ordinary_words_that_are_names_need_context() {
        assert!(found("Will continue to monitor. May need a bed in Ward 4.").is_empty());
        assert!(found("Rule out infection in the left lung.").is_empty());
        assert!(found("The patient is stable; glucose 5.4 mmol/L.").is_empty());
    }
}
