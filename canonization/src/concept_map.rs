//! Versioned concept maps from local code systems to standard ones, chosen by the record's own clinical date.
//!
//! Each file in `concept-maps/` is one version of one map (see `local-lab.v1.toml`).
//! A record is translated with the version in effect on its *clinical* date, not on
//! the day the pipeline runs, so replaying old data gives the answer it gave then.
//!
//! # Effective ranges
//!
//! `effective_from` and `effective_to` are calendar dates, both inclusive;
//! `effective_to` absent means open-ended. Versions of one map id may leave gaps but
//! may not overlap. A dateTime (`2019-05-12T23:30:00-05:00`) counts by the calendar
//! date written in it, in its own offset: that is the local clinical day, and
//! converting to UTC could move it to the next day.
//!
//! # Partial dates
//!
//! FHIR dates may be `2019` or `2019-05`. Such a date is the whole period, and the
//! record happened on some day in it. Every version in effect on at least one day of
//! the period is consulted:
//!
//! * one version: it decides;
//! * several versions that all give the same target (or all lack the code): that
//!   answer, reported under the latest of them;
//! * several versions that disagree: [`UnmappedReason::AmbiguousDate`].
//!
//! Picking the version in effect on the first (or last) day instead would silently
//! guess for records near a version boundary; this rule only answers when the answer
//! does not depend on the unknown day, which for most codes (unchanged between
//! versions) is always.
//!
//! # What this module never does
//!
//! It never guesses a target. A code it cannot map comes back as
//! [`Translation::Unmapped`] and the caller keeps the original coding and system.
//! Codes in standard systems pass through as [`Translation::Standard`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chrono::{Datelike, NaiveDate};
use serde::Deserialize;

pub const LOINC: &str = "http://loinc.org";
pub const SNOMED_CT: &str = "http://snomed.info/sct";
pub const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
pub const ICD_10_CM: &str = "http://hl7.org/fhir/sid/icd-10-cm";
pub const ICD_10: &str = "http://hl7.org/fhir/sid/icd-10";
pub const CVX: &str = "http://hl7.org/fhir/sid/cvx";
pub const UCUM: &str = "http://unitsofmeasure.org";
/// The local lab code system: HL7 v2 "L" and "99zzz" coding systems land here.
pub const LOCAL_LAB: &str = "urn:medpipe:local-lab";

/// Systems whose codes are already canonical: [`ConceptMaps::translate`] passes them through.
pub const STANDARD_SYSTEMS: [&str; 7] = [LOINC, SNOMED_CT, RXNORM, ICD_10_CM, ICD_10, CVX, UCUM];

/// The shipped maps, embedded at compile time. A test checks that every file in
/// `concept-maps/` is listed here.
const EMBEDDED: &[(&str, &str)] = &[
    (
        "local-lab.v1.toml",
        include_str!("../concept-maps/local-lab.v1.toml"),
    ),
    (
        "local-lab.v2.toml",
        include_str!("../concept-maps/local-lab.v2.toml"),
    ),
];

/// Normalises a coding-system name to its URI.
///
/// Accepts the URIs themselves, HL7 v2 table 0396 ids and Synthea CSV spellings;
/// names are matched ignoring case and surrounding space, URIs exactly. Returns
/// `None` for anything else, which callers keep as given.
///
/// Two mappings are deliberate simplifications and worth knowing:
/// * v2 `SNM` is SNOMED (the older SNOMED International), not SNOMED CT; sources in
///   this project send SNOMED CT codes under it, so it maps to SNOMED CT.
/// * v2 `I10` is WHO ICD-10 (`I10C` is ICD-10-CM); US feeds send ICD-10-CM codes
///   under `I10`, so both map to ICD-10-CM.
///
/// Every v2 local system (`L`, `99zzz`) maps to the one local lab system.
pub fn system_uri(name: &str) -> Option<&'static str> {
    let name = name.trim();
    if let Some(uri) = STANDARD_SYSTEMS
        .iter()
        .chain(&[LOCAL_LAB])
        .find(|uri| **uri == name)
    {
        return Some(uri);
    }
    let upper = name.to_ascii_uppercase();
    let uri = match upper.as_str() {
        "LN" | "LOINC" => LOINC,
        "SNM" | "SCT" | "SNOMED" | "SNOMED-CT" | "SNOMED CT" | "SNOMEDCT" => SNOMED_CT,
        "RXNORM" | "RXN" => RXNORM,
        "I10" | "I10C" | "ICD10" | "ICD10CM" | "ICD-10-CM" => ICD_10_CM,
        "CVX" => CVX,
        "UCUM" => UCUM,
        "L" | "LOCAL" => LOCAL_LAB,
        // HL7 v2 table 0396: "99zzz or L: Local general code (z is alphanumeric)".
        v2 if v2.len() == 5
            && v2.starts_with("99")
            && v2[2..].chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            LOCAL_LAB
        }
        _ => return None,
    };
    Some(uri)
}

/// The outcome of translating one code. Borrowed from the [`ConceptMaps`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Translation<'a> {
    Mapped {
        target_system: &'a str,
        target_code: &'a str,
        target_display: &'a str,
        map_id: &'a str,
        map_version: &'a str,
    },
    /// The code is in a standard system already: keep it, with this system URI.
    Standard { system: &'static str },
    /// Keep the original code and system; never guess.
    Unmapped { reason: UnmappedReason<'a> },
}

/// Why a code was not mapped. No variant carries the code or the date.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnmappedReason<'a> {
    /// No map has this source system (and it is not a standard system).
    UnknownSystem,
    /// The clinical date is not a FHIR date or dateTime.
    InvalidDate,
    /// The map has no version in effect on the clinical date.
    NoVersionInEffect { map_id: &'a str },
    /// The version in effect does not list the code.
    CodeNotInMap {
        map_id: &'a str,
        map_version: &'a str,
    },
    /// A partial date spans versions that map the code differently.
    AmbiguousDate {
        map_id: &'a str,
        first_version: &'a str,
        last_version: &'a str,
    },
}

impl UnmappedReason<'_> {
    /// A short, bounded label, fit for a metric label or a dead-letter reason code.
    pub fn label(&self) -> &'static str {
        match self {
            Self::UnknownSystem => "unknown_system",
            Self::InvalidDate => "invalid_date",
            Self::NoVersionInEffect { .. } => "no_version_in_effect",
            Self::CodeNotInMap { .. } => "code_not_in_map",
            Self::AmbiguousDate { .. } => "ambiguous_date",
        }
    }
}

/// Why concept maps cannot be loaded. Messages name the file and field.
#[derive(Debug, thiserror::Error)]
pub enum ConceptMapError {
    #[error("cannot read concept maps from {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no concept map files (*.toml) in {0}")]
    NoMaps(PathBuf),
    #[error("concept map {file}: {message}")]
    Parse { file: String, message: String },
    #[error("concept map {file}: effective_to {to} is before effective_from {from}")]
    InvalidRange {
        file: String,
        from: NaiveDate,
        to: NaiveDate,
    },
    #[error("concept map {file}: {field} {value:?} is not an absolute URI")]
    InvalidSystem {
        file: String,
        field: &'static str,
        value: String,
    },
    #[error("concept map {file}: source_system {system} is a standard system; its codes pass through and need no map")]
    StandardSourceSystem { file: String, system: String },
    #[error("concept map {file}: source_code {code:?} appears more than once")]
    DuplicateSourceCode { file: String, code: String },
    #[error("concept map {file}: an entry has an empty source_code or target_code")]
    EmptyCode { file: String },
    #[error(
        "concept map {map_id}: version {version:?} is defined twice ({first_file}, {second_file})"
    )]
    DuplicateVersion {
        map_id: String,
        version: String,
        first_file: String,
        second_file: String,
    },
    #[error(
        "concept map {map_id}: versions {first:?} and {second:?} have overlapping effective ranges"
    )]
    OverlappingVersions {
        map_id: String,
        first: String,
        second: String,
    },
    #[error("concept map {map_id}: versions disagree on source_system ({first} vs {second})")]
    MixedSourceSystems {
        map_id: String,
        first: String,
        second: String,
    },
    #[error("source_system {system} is claimed by two map ids ({first} and {second}); a translation must have one map")]
    SourceSystemClaimedTwice {
        system: String,
        first: String,
        second: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapFile {
    id: String,
    version: String,
    effective_from: DateField,
    #[serde(default)]
    effective_to: Option<DateField>,
    source_system: String,
    target_system: String,
    #[serde(default)]
    map: Vec<MapEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapEntry {
    source_code: String,
    target_code: String,
    target_display: String,
}

/// A TOML local date (`2015-01-01`) or the same as a string (`"2015-01-01"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DateField {
    Toml(toml::value::Datetime),
    Text(String),
}

impl DateField {
    fn to_date(&self) -> Option<NaiveDate> {
        match self {
            Self::Toml(dt) => match (dt.date, dt.time, dt.offset) {
                (Some(d), None, None) => {
                    NaiveDate::from_ymd_opt(i32::from(d.year), u32::from(d.month), u32::from(d.day))
                }
                _ => None,
            },
            Self::Text(s) => NaiveDate::parse_from_str(s, "%Y-%m-%d").ok(),
        }
    }
}

#[derive(Debug)]
struct Target {
    code: String,
    display: String,
}

#[derive(Debug)]
struct MapVersion {
    version: String,
    from: NaiveDate,
    to: Option<NaiveDate>,
    target_system: String,
    entries: HashMap<String, Target>,
    file: String,
}

impl MapVersion {
    /// `(target system, target code)` for a source code, for comparing versions.
    fn target_of(&self, code: &str) -> Option<(&str, &str)> {
        self.entries
            .get(code)
            .map(|t| (self.target_system.as_str(), t.code.as_str()))
    }

    fn overlaps(&self, start: NaiveDate, end: NaiveDate) -> bool {
        self.from <= end && self.to.is_none_or(|to| to >= start)
    }
}

#[derive(Debug)]
struct MapFamily {
    id: String,
    /// Sorted by `from`; ranges do not overlap.
    versions: Vec<MapVersion>,
}

/// All loaded concept maps, keyed by source system. Immutable after loading.
#[derive(Debug)]
pub struct ConceptMaps {
    by_source: HashMap<String, MapFamily>,
}

impl ConceptMaps {
    /// The maps shipped in `concept-maps/`, embedded at compile time.
    pub fn load_embedded() -> Result<Self, ConceptMapError> {
        Self::from_toml_files(EMBEDDED.iter().copied())
    }

    /// Every `*.toml` file directly in `dir` (not recursive). An empty directory is
    /// an error: a stage configured with no maps would silently map nothing.
    pub fn load_dir(dir: impl AsRef<Path>) -> Result<Self, ConceptMapError> {
        let dir = dir.as_ref();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ConceptMapError::Io { path, source }
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            if path.is_file() && path.extension().is_some_and(|e| e == "toml") {
                paths.push(path);
            }
        }
        if paths.is_empty() {
            return Err(ConceptMapError::NoMaps(dir.to_path_buf()));
        }
        paths.sort();
        let mut files = Vec::with_capacity(paths.len());
        for path in &paths {
            let text = std::fs::read_to_string(path).map_err(io(path))?;
            files.push((path.display().to_string(), text));
        }
        Self::from_toml_files(files.iter().map(|(n, t)| (n.as_str(), t.as_str())))
    }

    /// Parses and validates `(file name, TOML text)` pairs, one map version each.
    pub fn from_toml_files<'a>(
        files: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ConceptMapError> {
        let mut families: HashMap<String, (String, Vec<MapVersion>)> = HashMap::new();
        for (file, text) in files {
            let (id, source_system, version) = parse_version(file, text)?;
            let family = families
                .entry(id.clone())
                .or_insert_with(|| (source_system.clone(), Vec::new()));
            if family.0 != source_system {
                return Err(ConceptMapError::MixedSourceSystems {
                    map_id: id,
                    first: family.0.clone(),
                    second: source_system,
                });
            }
            if let Some(first) = family.1.iter().find(|v| v.version == version.version) {
                return Err(ConceptMapError::DuplicateVersion {
                    map_id: id,
                    version: version.version,
                    first_file: first.file.clone(),
                    second_file: version.file,
                });
            }
            family.1.push(version);
        }

        let mut by_source: HashMap<String, MapFamily> = HashMap::new();
        let mut ids: Vec<_> = families.into_iter().collect();
        ids.sort_by(|a, b| a.0.cmp(&b.0));
        for (id, (source_system, mut versions)) in ids {
            versions.sort_by_key(|v| v.from);
            for pair in versions.windows(2) {
                let (earlier, later) = (&pair[0], &pair[1]);
                if earlier.to.is_none_or(|to| to >= later.from) {
                    return Err(ConceptMapError::OverlappingVersions {
                        map_id: id,
                        first: earlier.version.clone(),
                        second: later.version.clone(),
                    });
                }
            }
            if let Some(other) = by_source.get(&source_system) {
                return Err(ConceptMapError::SourceSystemClaimedTwice {
                    system: source_system,
                    first: other.id.clone(),
                    second: id,
                });
            }
            by_source.insert(source_system, MapFamily { id, versions });
        }
        Ok(Self { by_source })
    }

    /// `(map id, version, effective_from, effective_to)` of every loaded version,
    /// for a startup log line.
    pub fn versions(&self) -> Vec<(&str, &str, NaiveDate, Option<NaiveDate>)> {
        let mut all: Vec<_> = self
            .by_source
            .values()
            .flat_map(|f| {
                f.versions
                    .iter()
                    .map(|v| (f.id.as_str(), v.version.as_str(), v.from, v.to))
            })
            .collect();
        all.sort();
        all
    }

    /// Translates `code` from `system` (a URI or any name [`system_uri`] knows) with
    /// the map version in effect on `clinical_date` (FHIR date or dateTime). See the
    /// module docs for the partial-date rule. Source codes match exactly, after
    /// trimming surrounding space.
    pub fn translate(&self, system: &str, code: &str, clinical_date: &str) -> Translation<'_> {
        let uri = system_uri(system).unwrap_or(system.trim());
        if let Some(standard) = STANDARD_SYSTEMS.iter().find(|s| **s == uri) {
            return Translation::Standard { system: standard };
        }
        let unmapped = |reason| Translation::Unmapped { reason };
        let Some(family) = self.by_source.get(uri) else {
            return unmapped(UnmappedReason::UnknownSystem);
        };
        let Some((start, end)) = clinical_period(clinical_date) else {
            return unmapped(UnmappedReason::InvalidDate);
        };
        let code = code.trim();
        let in_effect: Vec<&MapVersion> = family
            .versions
            .iter()
            .filter(|v| v.overlaps(start, end))
            .collect();
        let (Some(first), Some(last)) = (in_effect.first(), in_effect.last()) else {
            return unmapped(UnmappedReason::NoVersionInEffect { map_id: &family.id });
        };
        let answer = last.target_of(code);
        if in_effect.iter().any(|v| v.target_of(code) != answer) {
            return unmapped(UnmappedReason::AmbiguousDate {
                map_id: &family.id,
                first_version: &first.version,
                last_version: &last.version,
            });
        }
        match last.entries.get(code) {
            Some(target) => Translation::Mapped {
                target_system: &last.target_system,
                target_code: &target.code,
                target_display: &target.display,
                map_id: &family.id,
                map_version: &last.version,
            },
            None => unmapped(UnmappedReason::CodeNotInMap {
                map_id: &family.id,
                map_version: &last.version,
            }),
        }
    }
}

fn is_absolute_uri(s: &str) -> bool {
    match s.split_once(':') {
        Some((scheme, rest)) => {
            !rest.is_empty()
                && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                && !s.chars().any(char::is_whitespace)
        }
        None => false,
    }
}

/// Parses one file into `(map id, source system, version)` and checks it alone.
fn parse_version(file: &str, text: &str) -> Result<(String, String, MapVersion), ConceptMapError> {
    let parse = |message: String| ConceptMapError::Parse {
        file: file.to_string(),
        message,
    };
    let raw: MapFile = toml::from_str(text).map_err(|e| parse(e.to_string()))?;
    let from = raw
        .effective_from
        .to_date()
        .ok_or_else(|| parse("effective_from is not a date (YYYY-MM-DD)".into()))?;
    let to = match &raw.effective_to {
        Some(d) => Some(
            d.to_date()
                .ok_or_else(|| parse("effective_to is not a date (YYYY-MM-DD)".into()))?,
        ),
        None => None,
    };
    if let Some(to) = to.filter(|to| *to < from) {
        return Err(ConceptMapError::InvalidRange {
            file: file.to_string(),
            from,
            to,
        });
    }
    for (field, value) in [
        ("source_system", &raw.source_system),
        ("target_system", &raw.target_system),
    ] {
        if !is_absolute_uri(value) {
            return Err(ConceptMapError::InvalidSystem {
                file: file.to_string(),
                field,
                value: value.clone(),
            });
        }
    }
    if STANDARD_SYSTEMS.contains(&raw.source_system.as_str()) {
        return Err(ConceptMapError::StandardSourceSystem {
            file: file.to_string(),
            system: raw.source_system,
        });
    }
    if raw.id.trim().is_empty() || raw.version.trim().is_empty() {
        return Err(parse("id and version must not be empty".into()));
    }
    let mut entries = HashMap::with_capacity(raw.map.len());
    for entry in raw.map {
        let source = entry.source_code.trim().to_string();
        if source.is_empty() || entry.target_code.trim().is_empty() {
            return Err(ConceptMapError::EmptyCode {
                file: file.to_string(),
            });
        }
        let target = Target {
            code: entry.target_code.trim().to_string(),
            display: entry.target_display,
        };
        if entries.insert(source.clone(), target).is_some() {
            return Err(ConceptMapError::DuplicateSourceCode {
                file: file.to_string(),
                code: source,
            });
        }
    }
    let version = MapVersion {
        version: raw.version,
        from,
        to,
        target_system: raw.target_system,
        entries,
        file: file.to_string(),
    };
    Ok((raw.id, raw.source_system, version))
}

/// The first and last calendar day a FHIR date or dateTime can denote: the whole
/// year for `YYYY`, the month for `YYYY-MM`, the day otherwise. A dateTime counts
/// by the date written in it, in its own offset.
fn clinical_period(date: &str) -> Option<(NaiveDate, NaiveDate)> {
    let date = date.trim();
    let year = |s: &str| -> Option<i32> {
        (s.len() == 4 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match date.len() {
        4 => {
            let y = year(date)?;
            Some((
                NaiveDate::from_ymd_opt(y, 1, 1)?,
                NaiveDate::from_ymd_opt(y, 12, 31)?,
            ))
        }
        7 => {
            let (y, m) = date.split_once('-')?;
            let (y, m): (i32, u32) = (year(y)?, two_digits(m)?);
            let first = NaiveDate::from_ymd_opt(y, m, 1)?;
            let next = if m == 12 {
                NaiveDate::from_ymd_opt(y + 1, 1, 1)?
            } else {
                NaiveDate::from_ymd_opt(y, m + 1, 1)?
            };
            Some((first, next.pred_opt()?))
        }
        10 => {
            let day = NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
            // chrono's %Y also takes signs and short years; FHIR wants exactly YYYY-MM-DD.
            let b = date.as_bytes();
            let shape = b.iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                _ => c.is_ascii_digit(),
            });
            (shape && day.year() >= 1).then_some((day, day))
        }
        _ => {
            // FHIR requires seconds and an offset once a time is given, which is RFC 3339.
            let day = chrono::DateTime::parse_from_rfc3339(date)
                .ok()?
                .date_naive();
            Some((day, day))
        }
    }
}

fn two_digits(s: &str) -> Option<u32> {
    (s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps() -> ConceptMaps {
        ConceptMaps::load_embedded().expect("shipped maps load")
    }

    /// `(code, clinical date)` on the local lab map gives `(target code, map version)`.
    fn check(code: &str, date: &str, want: Option<(&str, &str)>) {
        let maps = maps();
        let got = match maps.translate("urn:medpipe:local-lab", code, date) {
            Translation::Mapped {
                target_code,
                map_version,
                ..
            } => Some((target_code, map_version)),
            _ => None,
        };
        assert_eq!(got, want, "translate({code:?}, {date:?})");
    }

    fn reason(maps: &ConceptMaps, system: &str, code: &str, date: &str) -> &'static str {
        match maps.translate(system, code, date) {
            Translation::Unmapped { reason } => reason.label(),
            other => panic!("expected Unmapped, got {other:?}"),
        }
    }

    #[test]
    fn same_code_on_two_dates_maps_with_two_versions() {
        let maps = maps();
        let Translation::Mapped {
            target_system,
            target_code,
            target_display,
            map_id,
            map_version,
        } = maps.translate("L", "LDL", "2019-05-12")
        else {
            panic!("LDL in 2019 should map");
        };
        assert_eq!(
            (target_system, target_code, map_id, map_version),
            (LOINC, "13457-7", "local-lab", "1")
        );
        assert!(target_display.contains("by calculation"));
        check("LDL", "2022-03-01", Some(("18262-6", "2")));
    }

    #[test]
    fn effective_bounds_are_inclusive() {
        check("LDL", "2015-01-01", Some(("13457-7", "1")));
        check("LDL", "2020-12-31", Some(("13457-7", "1")));
        check("LDL", "2021-01-01", Some(("18262-6", "2")));
        check("GLU", "2099-06-30", Some(("2345-7", "2")));
    }

    #[test]
    fn datetimes_count_by_their_own_calendar_date() {
        // 23:30 at -05:00 is 04:30 UTC on 2021-01-01, but the clinical day is 2020-12-31.
        check("LDL", "2020-12-31T23:30:00-05:00", Some(("13457-7", "1")));
        check("LDL", "2021-01-01T00:10:00+01:00", Some(("18262-6", "2")));
        check("LDL", "2021-01-01T00:10:00.123Z", Some(("18262-6", "2")));
    }

    #[test]
    fn partial_dates_use_every_version_in_effect_during_the_period() {
        // Wholly inside one version.
        check("LDL", "2019", Some(("13457-7", "1")));
        check("LDL", "2020-12", Some(("13457-7", "1")));
        check("LDL", "2021", Some(("18262-6", "2")));
        check("A1C", "2021-01", Some(("4548-4", "2")));
        // A year before any version: nothing in effect.
        let maps = maps();
        assert_eq!(
            reason(&maps, LOCAL_LAB, "GLU", "2014"),
            "no_version_in_effect"
        );
        assert_eq!(
            reason(&maps, LOCAL_LAB, "GLU", "2014-12-31"),
            "no_version_in_effect"
        );
    }

    #[test]
    fn partial_date_spanning_versions_answers_only_if_they_agree() {
        let files = [
            (
                "a.toml",
                r#"id = "m"
                version = "1"
                effective_from = 2020-01-01
                effective_to = 2020-06-30
                source_system = "urn:x"
                target_system = "http://loinc.org"
                [[map]]
                source_code = "SAME"
                target_code = "1-1"
                target_display = "one"
                [[map]]
                source_code = "DIFF"
                target_code = "2-2"
                target_display = "two""#,
            ),
            (
                "b.toml",
                r#"id = "m"
                version = "2"
                effective_from = "2020-07-01"
                source_system = "urn:x"
                target_system = "http://loinc.org"
                [[map]]
                source_code = "SAME"
                target_code = "1-1"
                target_display = "one (renamed)"
                [[map]]
                source_code = "DIFF"
                target_code = "3-3"
                target_display = "three"
                [[map]]
                source_code = "ONLY2"
                target_code = "4-4"
                target_display = "four""#,
            ),
        ];
        let maps = ConceptMaps::from_toml_files(files).unwrap();
        // Agreeing versions: answered, reported under the latest version.
        assert!(matches!(
            maps.translate("urn:x", "SAME", "2020"),
            Translation::Mapped {
                target_code: "1-1",
                map_version: "2",
                target_display: "one (renamed)",
                ..
            }
        ));
        // Disagreeing versions across the year: not guessed.
        assert_eq!(
            maps.translate("urn:x", "DIFF", "2020"),
            Translation::Unmapped {
                reason: UnmappedReason::AmbiguousDate {
                    map_id: "m",
                    first_version: "1",
                    last_version: "2"
                }
            }
        );
        // Month precision inside one version is unambiguous.
        assert!(matches!(
            maps.translate("urn:x", "DIFF", "2020-06"),
            Translation::Mapped {
                target_code: "2-2",
                ..
            }
        ));
        assert!(matches!(
            maps.translate("urn:x", "DIFF", "2020-07"),
            Translation::Mapped {
                target_code: "3-3",
                ..
            }
        ));
        // A code in only one of the versions is ambiguous too; one in neither is not in the map.
        assert_eq!(reason(&maps, "urn:x", "ONLY2", "2020"), "ambiguous_date");
        assert!(matches!(
            maps.translate("urn:x", "ONLY2", "2020-07-15"),
            Translation::Mapped {
                target_code: "4-4",
                ..
            }
        ));
        assert_eq!(reason(&maps, "urn:x", "NONE", "2020"), "code_not_in_map");
    }

    #[test]
    fn code_added_in_v2_is_unmapped_before() {
        check("A1C", "2022-01-01", Some(("4548-4", "2")));
        let maps = maps();
        assert_eq!(
            maps.translate(LOCAL_LAB, "A1C", "2019-01-01"),
            Translation::Unmapped {
                reason: UnmappedReason::CodeNotInMap {
                    map_id: "local-lab",
                    map_version: "1"
                }
            }
        );
        // 2020-12 to 2021-01 is not a single partial date, but the year 2020 is v1 only.
        assert_eq!(reason(&maps, LOCAL_LAB, "A1C", "2020"), "code_not_in_map");
    }

    #[test]
    fn unmapped_codes_and_systems_are_never_guessed() {
        let maps = maps();
        assert_eq!(
            reason(&maps, LOCAL_LAB, "XYZ", "2019-05-12"),
            "code_not_in_map"
        );
        assert_eq!(
            reason(&maps, LOCAL_LAB, "glu", "2019-05-12"),
            "code_not_in_map"
        );
        assert_eq!(
            reason(&maps, "urn:other", "GLU", "2019-05-12"),
            "unknown_system"
        );
        assert_eq!(
            reason(&maps, "LOCALX", "GLU", "2019-05-12"),
            "unknown_system"
        );
        for bad in [
            "",
            "19",
            "2019-5",
            "2019-13",
            "+019-05-12",
            "2019-5-012",
            "2019-02-30",
            "2019-05-12T10:00",
            "May 2019",
        ] {
            assert_eq!(
                reason(&maps, LOCAL_LAB, "GLU", bad),
                "invalid_date",
                "{bad:?}"
            );
        }
        // v2 local system ids and padded codes reach the local map.
        check("GLU", "2019-05-12", Some(("2345-7", "1")));
        assert!(matches!(
            maps.translate("99LAB", " GLU ", "2019-05-12"),
            Translation::Mapped {
                target_code: "2345-7",
                ..
            }
        ));
    }

    #[test]
    fn standard_systems_pass_through() {
        let maps = maps();
        for (system, uri) in [
            ("http://loinc.org", LOINC),
            ("LN", LOINC),
            ("SNOMED-CT", SNOMED_CT),
            ("http://snomed.info/sct", SNOMED_CT),
            ("RxNorm", RXNORM),
            ("I10", ICD_10_CM),
            ("http://hl7.org/fhir/sid/icd-10-cm", ICD_10_CM),
            ("CVX", CVX),
            ("http://unitsofmeasure.org", UCUM),
        ] {
            assert_eq!(
                maps.translate(system, "anything", "not-even-a-date"),
                Translation::Standard { system: uri },
                "{system}"
            );
        }
    }

    #[test]
    fn system_spellings() {
        let cases = [
            ("LN", Some(LOINC)),
            ("loinc", Some(LOINC)),
            (" http://loinc.org ", Some(LOINC)),
            ("SNM", Some(SNOMED_CT)),
            ("SCT", Some(SNOMED_CT)),
            ("SNOMED-CT", Some(SNOMED_CT)),
            ("RXNORM", Some(RXNORM)),
            ("RXN", Some(RXNORM)),
            ("I10", Some(ICD_10_CM)),
            ("ICD10", Some(ICD_10_CM)),
            ("ICD-10-CM", Some(ICD_10_CM)),
            ("CVX", Some(CVX)),
            ("L", Some(LOCAL_LAB)),
            ("99ABC", Some(LOCAL_LAB)),
            ("99zz1", Some(LOCAL_LAB)),
            ("urn:medpipe:local-lab", Some(LOCAL_LAB)),
            ("99", None),
            ("99ABCD", None),
            ("99A-C", None),
            ("HTTP://LOINC.ORG", None),
            ("", None),
            ("ICD9", None),
        ];
        for (name, want) in cases {
            assert_eq!(system_uri(name), want, "{name:?}");
        }
    }

    const V1: &str = r#"
        id = "m"
        version = "1"
        effective_from = 2015-01-01
        effective_to = 2020-12-31
        source_system = "urn:x"
        target_system = "http://loinc.org"
        [[map]]
        source_code = "A"
        target_code = "1-1"
        target_display = "one"
    "#;

    fn load_error(files: &[(&str, &str)]) -> ConceptMapError {
        match ConceptMaps::from_toml_files(files.iter().copied()) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    #[test]
    fn overlapping_ranges_are_rejected() {
        let v2 = V1
            .replace(r#"version = "1""#, r#"version = "2""#)
            .replace("effective_from = 2015-01-01", "effective_from = 2020-12-31")
            .replace("effective_to = 2020-12-31\n", "");
        let err = load_error(&[("v1.toml", V1), ("v2.toml", &v2)]);
        assert!(
            matches!(err, ConceptMapError::OverlappingVersions { .. }),
            "{err}"
        );
        // An open-ended earlier version overlaps anything after it.
        let open = V1.replace("effective_to = 2020-12-31\n", "");
        let later = V1
            .replace(r#"version = "1""#, r#"version = "2""#)
            .replace("effective_from = 2015-01-01", "effective_from = 2030-01-01")
            .replace("effective_to = 2020-12-31", "effective_to = 2031-01-01");
        let err = load_error(&[("open.toml", &open), ("later.toml", &later)]);
        assert!(
            matches!(err, ConceptMapError::OverlappingVersions { .. }),
            "{err}"
        );
        // Adjacent ranges are fine.
        let next = V1
            .replace(r#"version = "1""#, r#"version = "2""#)
            .replace("effective_from = 2015-01-01", "effective_from = 2021-01-01")
            .replace("effective_to = 2020-12-31\n", "");
        assert!(
            ConceptMaps::from_toml_files([("v1.toml", V1), ("v2.toml", next.as_str())]).is_ok()
        );
    }

    #[test]
    fn invalid_files_are_rejected_with_the_file_named() {
        let dup = format!(
            "{V1}\n[[map]]\nsource_code = \"A\"\ntarget_code = \"2-2\"\ntarget_display = \"two\"\n"
        );
        let err = load_error(&[("dup.toml", &dup)]);
        assert!(
            matches!(err, ConceptMapError::DuplicateSourceCode { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("dup.toml"));

        let unknown_key = V1.replace(
            "target_display = \"one\"",
            "target_display = \"one\"\nnote = \"x\"",
        );
        let err = load_error(&[("key.toml", &unknown_key)]);
        assert!(matches!(err, ConceptMapError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("unknown field"), "{err}");

        let top_key = format!("owner = \"lab\"\n{V1}");
        assert!(matches!(
            load_error(&[("top.toml", &top_key)]),
            ConceptMapError::Parse { .. }
        ));

        let backwards = V1.replace("effective_to = 2020-12-31", "effective_to = 2014-12-31");
        assert!(matches!(
            load_error(&[("b.toml", &backwards)]),
            ConceptMapError::InvalidRange { .. }
        ));

        let datetime = V1.replace(
            "effective_from = 2015-01-01",
            "effective_from = 2015-01-01T00:00:00Z",
        );
        assert!(matches!(
            load_error(&[("dt.toml", &datetime)]),
            ConceptMapError::Parse { .. }
        ));

        let bad_system = V1.replace(r#"source_system = "urn:x""#, r#"source_system = "L""#);
        assert!(matches!(
            load_error(&[("s.toml", &bad_system)]),
            ConceptMapError::InvalidSystem { .. }
        ));

        let standard = V1.replace(
            r#"source_system = "urn:x""#,
            r#"source_system = "http://loinc.org""#,
        );
        assert!(matches!(
            load_error(&[("s.toml", &standard)]),
            ConceptMapError::StandardSourceSystem { .. }
        ));

        let err = load_error(&[("a.toml", V1), ("b.toml", V1)]);
        assert!(
            matches!(err, ConceptMapError::DuplicateVersion { .. }),
            "{err}"
        );

        let other_id = V1.replace(r#"id = "m""#, r#"id = "n""#);
        let err = load_error(&[("a.toml", V1), ("b.toml", &other_id)]);
        assert!(
            matches!(err, ConceptMapError::SourceSystemClaimedTwice { .. }),
            "{err}"
        );

        let mixed = V1
            .replace(r#"version = "1""#, r#"version = "2""#)
            .replace(r#"source_system = "urn:x""#, r#"source_system = "urn:y""#);
        let err = load_error(&[("a.toml", V1), ("b.toml", &mixed)]);
        assert!(
            matches!(err, ConceptMapError::MixedSourceSystems { .. }),
            "{err}"
        );
    }

    #[test]
    fn load_dir_reads_toml_files_and_rejects_an_empty_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            ConceptMaps::load_dir(dir.path()),
            Err(ConceptMapError::NoMaps(_))
        ));
        std::fs::write(dir.path().join("m.v1.toml"), V1).unwrap();
        std::fs::write(dir.path().join("README.md"), "not a map").unwrap();
        let maps = ConceptMaps::load_dir(dir.path()).unwrap();
        assert!(matches!(
            maps.translate("urn:x", "A", "2016"),
            Translation::Mapped {
                target_code: "1-1",
                ..
            }
        ));
        assert!(matches!(
            ConceptMaps::load_dir(dir.path().join("missing")),
            Err(ConceptMapError::Io { .. })
        ));
    }

    #[test]
    fn shipped_directory_matches_embedded_maps() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("concept-maps");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".toml"))
            .collect();
        on_disk.sort();
        let embedded: Vec<&str> = EMBEDDED.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            on_disk, embedded,
            "list every concept-maps/*.toml in EMBEDDED"
        );
        let from_dir = ConceptMaps::load_dir(&dir).unwrap();
        assert_eq!(from_dir.versions(), maps().versions());
        assert_eq!(maps().versions().len(), 2);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn translate_never_panics(system in "\\PC{0,24}", code in "\\PC{0,8}", date in "\\PC{0,30}") {
                let maps = ConceptMaps::load_embedded().unwrap();
                let _ = maps.translate(&system, &code, &date);
                let _ = system_uri(&system);
            }

            #[test]
            fn full_dates_are_single_days(y in 1i32..9999, m in 1u32..=12, d in 1u32..=31) {
                let text = format!("{y:04}-{m:02}-{d:02}");
                let expected = NaiveDate::from_ymd_opt(y, m, d).map(|day| (day, day));
                prop_assert_eq!(clinical_period(&text), expected);
            }

            #[test]
            fn months_cover_their_days(y in 1i32..9999, m in 1u32..=12) {
                let (start, end) = clinical_period(&format!("{y:04}-{m:02}")).unwrap();
                prop_assert_eq!((start.year(), start.month(), start.day()), (y, m, 1));
                prop_assert_eq!(end.month(), m);
                prop_assert!(end.succ_opt().is_none_or(|next| next.month() != m));
            }
        }
    }
}
