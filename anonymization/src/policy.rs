//! The de-identification policy: its TOML file format, the typed model the engine runs, and
//! the validation that turns a bad file into an error naming the rule and field at fault.
//!
//! A policy is data, not code, so that a compliance officer can review what happens to every
//! field and so that each output can name the exact policy (version and SHA-256 of the file)
//! that produced it. Validation is strict (unknown fields, methods and path syntax are errors)
//! because a typo in an allow-list policy silently removes data at best and, in a `keep`
//! rule, silently keeps the wrong data at worst. See `docs/SAFE-HARBOR.md` for the format.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The highest Safe Harbor identifier category (45 CFR 164.514(b)(2)(i)(A)–(R)).
pub const MAX_CATEGORY: u8 = 18;

/// The highest age Safe Harbor lets through unchanged; older ages are aggregated.
const SAFE_HARBOR_AGE_CUTOFF: u32 = 89;

/// The default policy shipped with the engine.
const SAFE_HARBOR_TOML: &str = include_str!("../policies/safe-harbor.toml");

/// Why a policy file was refused. Messages quote the policy text (never record data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Not TOML, a wrong type, an unknown or a missing key.
    #[error("policy file does not parse: {0}")]
    Syntax(String),
    /// A top-level or `[settings]` value is wrong.
    #[error("policy field `{field}`: {reason}")]
    Field { field: String, reason: String },
    /// A rule is wrong; `rule` is its id (or `#n`, its position, when the id itself is bad).
    #[error("rule `{rule}`, field `{field}`: {reason}")]
    Rule {
        rule: String,
        field: String,
        reason: String,
    },
}

/// A validated policy. `hash` identifies the exact file that was parsed.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub version: String,
    /// Hex SHA-256 of the policy file's bytes, recorded in every report.
    pub hash: String,
    pub settings: Settings,
    pub rules: Vec<Rule>,
    /// Trusted identity systems, highest priority first (`[[identity]]`, see `identity`).
    pub identity: Vec<crate::identity::IdentitySystem>,
}

/// What the `date`, `age` and `generalize-zip` methods do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub dates: DateMode,
    /// Bound of the per-patient shift when `dates = "shift"`, in days (the shift is never 0).
    pub date_shift_max_days: u32,
    /// Ages above this are aggregated into "cutoff + 1 or older".
    pub age_cutoff: u32,
    /// Three-digit ZIP prefixes whose area has 20,000 people or fewer; they become `000`.
    pub restricted_zip3: BTreeSet<String>,
}

/// How dates are de-identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateMode {
    /// Keep the year only (Safe Harbor).
    Year,
    /// Shift every date of a patient by the same number of days (needs Expert Determination).
    Shift,
}

/// One source format, as named in `SourceRecordIngested.source_format`.
pub use pipeline::formats::{Family, SourceFormat};

/// What a rule does to every leaf value it governs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Keep,
    Redact,
    Substitute(String),
    Pseudonymize,
    Date,
    Age,
    GeneralizeZip,
    Encrypt,
    Scrub,
}

impl Method {
    /// The method names accepted in a policy file.
    pub const NAMES: [&'static str; 9] = [
        "keep",
        "redact",
        "substitute",
        "pseudonymize",
        "date",
        "age",
        "generalize-zip",
        "encrypt",
        "scrub",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Method::Keep => "keep",
            Method::Redact => "redact",
            Method::Substitute(_) => "substitute",
            Method::Pseudonymize => "pseudonymize",
            Method::Date => "date",
            Method::Age => "age",
            Method::GeneralizeZip => "generalize-zip",
            Method::Encrypt => "encrypt",
            Method::Scrub => "scrub",
        }
    }

    /// Whether the method takes the original value out of the record (so the scrubber must
    /// look for it in the record's free text). Exhaustive on purpose: a new method must
    /// say here whether it removes the value, or scrubbing silently weakens.
    pub fn removes_original(&self) -> bool {
        match self {
            Method::Redact
            | Method::Substitute(_)
            | Method::Pseudonymize
            | Method::GeneralizeZip
            | Method::Encrypt => true,
            // Dates are shifted or generalised, not names or ids; kept and scrubbed values
            // stay in the record.
            Method::Keep | Method::Date | Method::Age | Method::Scrub => false,
        }
    }
}

/// One rule: which leaves (format, record type, path) and what happens to them.
#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    /// Safe Harbor identifier category 1..=18, or 0 for data that is not an identifier.
    pub category: u8,
    pub description: Option<String>,
    pub formats: BTreeSet<SourceFormat>,
    /// Record types the rule is limited to (globs with `*`); `None` means any.
    pub resource_types: Option<Vec<String>>,
    pub paths: Vec<RulePath>,
    pub method: Method,
    /// HL7 only: the rule applies only to segments whose field 2 (OBX-2, the value type) is
    /// one of these.
    pub when_type: Option<BTreeSet<String>>,
}

impl Rule {
    /// Whether this rule applies to records of `record_type`.
    pub fn applies_to_type(&self, record_type: &str) -> bool {
        self.resource_types
            .as_ref()
            .is_none_or(|types| types.iter().any(|t| glob_match(t, record_type)))
    }
}

/// A rule path as written, with its parsed form.
#[derive(Debug, Clone)]
pub struct RulePath {
    pub text: String,
    pub(crate) pattern: Pattern,
    pub(crate) specificity: Specificity,
}

/// A parsed path, one variant per format family.
#[derive(Debug, Clone)]
pub(crate) enum Pattern {
    /// A column-name glob.
    Csv(String),
    Fhir(Vec<FhirSegment>),
    Hl7(Hl7Pattern),
}

/// One dotted segment of a FHIR path: an element-name glob and an optional `where` filter.
#[derive(Debug, Clone)]
pub(crate) struct FhirSegment {
    pub(crate) name: String,
    pub(crate) filter: Option<Filter>,
}

/// `where(a.b='literal')`: true when any value at the relative path `a.b` equals `literal`.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pub(crate) path: Vec<String>,
    pub(crate) value: String,
}

/// `SEG-F[.C[.S]]`; `None` stands for `*`.
#[derive(Debug, Clone)]
pub(crate) struct Hl7Pattern {
    pub(crate) segment: Option<String>,
    pub(crate) field: Option<usize>,
    pub(crate) component: Option<usize>,
    pub(crate) subcomponent: Option<usize>,
}

/// How specific a path is; a larger value wins. Compared field by field: depth first (a rule
/// on `address.state` beats one on `address`), then literal segments from the left (`name.*`
/// beats `*.given`), then filters, then the literal characters of globs (`deceasedBoolean`
/// beats `deceased*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Specificity {
    pub(crate) depth: u8,
    pub(crate) literal_mask: u32,
    pub(crate) filters: u8,
    pub(crate) literal_chars: u32,
}

// ---------------------------------------------------------------------------------------------
// The file format
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: String,
    version: String,
    #[serde(default)]
    #[allow(dead_code)] // documentation for reviewers; not used by the engine
    description: Option<String>,
    settings: RawSettings,
    #[serde(default, rename = "rule")]
    rules: Vec<RawRule>,
    #[serde(default)]
    identity: Vec<crate::identity::IdentitySystem>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    dates: String,
    date_shift_max_days: Option<i64>,
    age_cutoff: Option<i64>,
    restricted_zip3: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: String,
    category: i64,
    description: Option<String>,
    formats: Vec<String>,
    resource_types: Option<Vec<String>>,
    paths: Vec<String>,
    method: String,
    value: Option<String>,
    when_type: Option<Vec<String>>,
}

impl Policy {
    /// Parses and validates a policy file.
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let raw: RawPolicy =
            toml::from_str(text).map_err(|e| PolicyError::Syntax(e.to_string()))?;
        let hash = hex::encode(Sha256::digest(text.as_bytes()));
        validate(raw, hash)
    }

    /// The shipped Safe Harbor policy (`policies/safe-harbor.toml`).
    ///
    /// A unit test proves the file valid. Should it ever be broken anyway, this fails closed
    /// rather than panicking: the fallback has no rules, so the allow-list redacts everything.
    pub fn safe_harbor() -> Policy {
        Policy::from_toml(SAFE_HARBOR_TOML).unwrap_or_else(|_| Policy {
            name: "safe-harbor-invalid".to_owned(),
            version: "invalid".to_owned(),
            hash: hex::encode(Sha256::digest(SAFE_HARBOR_TOML.as_bytes())),
            settings: Settings {
                dates: DateMode::Year,
                date_shift_max_days: 365,
                age_cutoff: SAFE_HARBOR_AGE_CUTOFF,
                restricted_zip3: BTreeSet::new(),
            },
            rules: Vec::new(),
            identity: Vec::new(),
        })
    }

    /// The rule with this id.
    pub fn rule(&self, id: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.id == id)
    }
}

fn field_error(field: &str, reason: impl Into<String>) -> PolicyError {
    PolicyError::Field {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

fn rule_error(rule: &str, field: &str, reason: impl Into<String>) -> PolicyError {
    PolicyError::Rule {
        rule: rule.to_owned(),
        field: field.to_owned(),
        reason: reason.into(),
    }
}

fn validate(raw: RawPolicy, hash: String) -> Result<Policy, PolicyError> {
    if raw.name.trim().is_empty() {
        return Err(field_error("name", "must not be empty"));
    }
    if raw.version.trim().is_empty() {
        return Err(field_error("version", "must not be empty"));
    }
    let settings = validate_settings(raw.settings)?;

    let mut rules: Vec<Rule> = Vec::with_capacity(raw.rules.len());
    let mut ids = BTreeSet::new();
    for (i, r) in raw.rules.into_iter().enumerate() {
        let rule = validate_rule(i, r)?;
        if !ids.insert(rule.id.clone()) {
            return Err(rule_error(&rule.id, "id", "duplicate rule id"));
        }
        rules.push(rule);
    }
    check_ambiguity(&rules)?;
    if settings.restricted_zip3.is_empty() {
        if let Some(r) = rules.iter().find(|r| r.method == Method::GeneralizeZip) {
            return Err(rule_error(
                &r.id,
                "method",
                "generalize-zip needs settings.restricted_zip3 (the HHS list of small ZIP3 areas)",
            ));
        }
    }
    let mut names = BTreeSet::new();
    for system in &raw.identity {
        let field = format!("identity.{}", system.name);
        system
            .check()
            .map_err(|reason| field_error(&field, reason))?;
        if !names.insert(system.name.clone()) {
            return Err(field_error(&field, "duplicate identity system name"));
        }
    }
    Ok(Policy {
        name: raw.name,
        version: raw.version,
        hash,
        settings,
        rules,
        identity: raw.identity,
    })
}

fn validate_settings(raw: RawSettings) -> Result<Settings, PolicyError> {
    let dates = match raw.dates.as_str() {
        "year" => DateMode::Year,
        "shift" => DateMode::Shift,
        _ => {
            return Err(field_error(
                "settings.dates",
                format!("unknown mode `{}` (expected `year` or `shift`)", raw.dates),
            ))
        }
    };
    let max = raw.date_shift_max_days.unwrap_or(365);
    let date_shift_max_days = u32::try_from(max)
        .ok()
        .filter(|m| (1..=3650).contains(m))
        .ok_or_else(|| {
            field_error(
                "settings.date_shift_max_days",
                format!("{max} is out of range (1 to 3650 days)"),
            )
        })?;
    let cutoff = raw.age_cutoff.unwrap_or(i64::from(SAFE_HARBOR_AGE_CUTOFF));
    let age_cutoff = u32::try_from(cutoff)
        .ok()
        .filter(|c| (1..=SAFE_HARBOR_AGE_CUTOFF).contains(c))
        .ok_or_else(|| {
            field_error(
                "settings.age_cutoff",
                format!("{cutoff} is out of range (1 to 89; Safe Harbor allows no higher)"),
            )
        })?;
    let mut restricted_zip3 = BTreeSet::new();
    for z in raw.restricted_zip3 {
        if z.len() != 3 || !z.bytes().all(|b| b.is_ascii_digit()) {
            return Err(field_error(
                "settings.restricted_zip3",
                format!("`{z}` is not three digits"),
            ));
        }
        if !restricted_zip3.insert(z.clone()) {
            return Err(field_error(
                "settings.restricted_zip3",
                format!("`{z}` is listed twice"),
            ));
        }
    }
    Ok(Settings {
        dates,
        date_shift_max_days,
        age_cutoff,
        restricted_zip3,
    })
}

fn valid_id(id: &str) -> bool {
    id.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn validate_rule(position: usize, raw: RawRule) -> Result<Rule, PolicyError> {
    if !valid_id(&raw.id) {
        return Err(rule_error(
            &format!("#{}", position + 1),
            "id",
            format!(
                "`{}` is not a valid id (lowercase letters, digits and `-`, starting with a letter)",
                raw.id
            ),
        ));
    }
    let id = raw.id;
    let category = u8::try_from(raw.category)
        .ok()
        .filter(|c| *c <= MAX_CATEGORY)
        .ok_or_else(|| {
            rule_error(
                &id,
                "category",
                format!(
                    "{} is out of range (1 to 18 for a Safe Harbor identifier category, 0 for data that is not an identifier)",
                    raw.category
                ),
            )
        })?;

    if raw.formats.is_empty() {
        return Err(rule_error(&id, "formats", "must list at least one format"));
    }
    let mut formats = BTreeSet::new();
    for f in &raw.formats {
        let format = SourceFormat::parse(f).ok_or_else(|| {
            rule_error(
                &id,
                "formats",
                format!("unknown format `{f}` (expected csv, fhir-ndjson, fhir-bundle or hl7v2)"),
            )
        })?;
        if !formats.insert(format) {
            return Err(rule_error(&id, "formats", format!("`{f}` is listed twice")));
        }
    }
    let mut families = formats.iter().map(|f| f.family());
    let family = families
        .next()
        .ok_or_else(|| rule_error(&id, "formats", "must list at least one format"))?;
    if families.any(|f| f != family) {
        return Err(rule_error(
            &id,
            "formats",
            "formats with different path syntaxes (csv, fhir-*, hl7v2) need separate rules",
        ));
    }

    let resource_types = match raw.resource_types {
        None => None,
        Some(types) if types.is_empty() => {
            return Err(rule_error(
                &id,
                "resource_types",
                "an empty list matches nothing; leave the field out to match any type",
            ))
        }
        Some(types) => {
            if let Some(t) = types.iter().find(|t| !valid_record_type(t)) {
                return Err(rule_error(
                    &id,
                    "resource_types",
                    format!("`{t}` is not a record type (letters, digits, `^`, `_` or `*`)"),
                ));
            }
            Some(types)
        }
    };

    if raw.paths.is_empty() {
        return Err(rule_error(&id, "paths", "must list at least one path"));
    }
    let mut paths = Vec::with_capacity(raw.paths.len());
    let mut seen = BTreeSet::new();
    for text in raw.paths {
        let (pattern, specificity) = parse_path(family, &text)
            .map_err(|reason| rule_error(&id, "paths", format!("path `{text}`: {reason}")))?;
        if !seen.insert(text.clone()) {
            return Err(rule_error(
                &id,
                "paths",
                format!("path `{text}` is listed twice"),
            ));
        }
        paths.push(RulePath {
            text,
            pattern,
            specificity,
        });
    }

    let method = match (raw.method.as_str(), raw.value) {
        ("substitute", Some(v)) => Method::Substitute(v),
        ("substitute", None) => {
            return Err(rule_error(
                &id,
                "value",
                "method `substitute` needs a `value` to put in place of the original",
            ))
        }
        (m, Some(_)) if Method::NAMES.contains(&m) => {
            return Err(rule_error(
                &id,
                "value",
                format!("only method `substitute` takes a value, not `{m}`"),
            ))
        }
        ("keep", None) => Method::Keep,
        ("redact", None) => Method::Redact,
        ("pseudonymize", None) => Method::Pseudonymize,
        ("date", None) => Method::Date,
        ("age", None) => Method::Age,
        ("generalize-zip", None) => Method::GeneralizeZip,
        ("encrypt", None) => Method::Encrypt,
        ("scrub", None) => Method::Scrub,
        (m, _) => {
            return Err(rule_error(
                &id,
                "method",
                format!(
                    "unknown method `{m}` (expected one of {})",
                    Method::NAMES.join(", ")
                ),
            ))
        }
    };

    let when_type = match raw.when_type {
        None => None,
        Some(_) if family != Family::Hl7 => {
            return Err(rule_error(
                &id,
                "when_type",
                "only HL7 rules can depend on the OBX value type",
            ))
        }
        Some(types) if types.is_empty() => {
            return Err(rule_error(&id, "when_type", "must list at least one type"))
        }
        Some(types) => {
            let obx_only = paths.iter().all(
                |p| matches!(&p.pattern, Pattern::Hl7(h) if h.segment.as_deref() == Some("OBX")),
            );
            if !obx_only {
                return Err(rule_error(
                    &id,
                    "when_type",
                    "reads OBX-2, so every path of the rule must be in the OBX segment",
                ));
            }
            Some(types.into_iter().collect())
        }
    };

    Ok(Rule {
        id,
        category,
        description: raw.description,
        formats,
        resource_types,
        paths,
        method,
        when_type,
    })
}

fn valid_record_type(t: &str) -> bool {
    !t.is_empty()
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'^' | b'_' | b'*'))
}

/// Two rules with the same path for overlapping formats, record types and OBX value types
/// would leave the outcome to their order in the file; that is almost always a mistake.
fn check_ambiguity(rules: &[Rule]) -> Result<(), PolicyError> {
    type Key<'a> = (&'a str, Option<&'a BTreeSet<String>>);
    let mut by_path: BTreeMap<Key<'_>, Vec<&Rule>> = BTreeMap::new();
    for rule in rules {
        for path in &rule.paths {
            by_path
                .entry((path.text.as_str(), rule.when_type.as_ref()))
                .or_default()
                .push(rule);
        }
    }
    for ((path, _), group) in by_path {
        for (i, a) in group.iter().enumerate() {
            for b in group.iter().skip(i + 1) {
                let formats_overlap = !a.formats.is_disjoint(&b.formats);
                let types_overlap = match (&a.resource_types, &b.resource_types) {
                    (None, None) => true,
                    (Some(x), Some(y)) => x.iter().any(|t| y.contains(t)),
                    _ => false,
                };
                if formats_overlap && types_overlap {
                    return Err(rule_error(
                        &b.id,
                        "paths",
                        format!(
                            "path `{path}` is also in rule `{}` for the same formats and record types",
                            a.id
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------

fn parse_path(family: Family, text: &str) -> Result<(Pattern, Specificity), String> {
    match family {
        Family::Csv => parse_csv_path(text),
        Family::Fhir => parse_fhir_path(text),
        Family::Hl7 => parse_hl7_path(text),
    }
}

fn parse_csv_path(text: &str) -> Result<(Pattern, Specificity), String> {
    if text.is_empty() {
        return Err("a column name must not be empty".to_owned());
    }
    if text.chars().any(char::is_control) {
        return Err("a column name must not contain control characters".to_owned());
    }
    let literal = !text.contains('*');
    let spec = Specificity {
        depth: 1,
        literal_mask: u32::from(literal),
        filters: 0,
        literal_chars: literal_chars(text),
    };
    Ok((Pattern::Csv(text.to_owned()), spec))
}

fn literal_chars(glob: &str) -> u32 {
    u32::try_from(glob.chars().filter(|c| *c != '*').count()).unwrap_or(u32::MAX)
}

/// The most segments a FHIR path may have; keeps the literal mask within 32 bits.
const MAX_FHIR_DEPTH: usize = 16;

fn parse_fhir_path(text: &str) -> Result<(Pattern, Specificity), String> {
    let mut segments: Vec<FhirSegment> = Vec::new();
    let mut rest = text;
    loop {
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '*'))
            .unwrap_or(rest.len());
        let (name, after) = rest.split_at(end);
        if name.is_empty() {
            return Err(format!(
                "expected an element name at character {}",
                text.len() - rest.len() + 1
            ));
        }
        if name == "where" {
            return Err(
                "`where(...)` must follow an element name, as in `telecom.where(system='phone')`"
                    .to_owned(),
            );
        }
        let mut segment = FhirSegment {
            name: name.to_owned(),
            filter: None,
        };
        rest = after;
        if let Some(f) = rest.strip_prefix(".where(") {
            let (filter, after) = parse_filter(f)?;
            segment.filter = Some(filter);
            rest = after;
        }
        segments.push(segment);
        if rest.is_empty() {
            break;
        }
        rest = rest.strip_prefix('.').ok_or_else(|| {
            format!(
                "unexpected character at {} (segments are separated by `.`)",
                text.len() - rest.len() + 1
            )
        })?;
    }
    if segments.len() > MAX_FHIR_DEPTH {
        return Err(format!("more than {MAX_FHIR_DEPTH} segments"));
    }
    let mut spec = Specificity {
        depth: u8::try_from(segments.len()).unwrap_or(u8::MAX),
        literal_mask: 0,
        filters: 0,
        literal_chars: 0,
    };
    for (i, s) in segments.iter().enumerate() {
        if !s.name.contains('*') {
            spec.literal_mask |= 1 << (31 - i);
        }
        spec.literal_chars += literal_chars(&s.name);
        if s.filter.is_some() {
            spec.filters += 1;
        }
    }
    Ok((Pattern::Fhir(segments), spec))
}

/// Parses `field.path='literal')` (what follows `.where(`); returns the rest of the text.
fn parse_filter(text: &str) -> Result<(Filter, &str), String> {
    let (lhs, rest) = text
        .split_once("='")
        .ok_or("a filter must look like `where(element='value')`")?;
    let path: Vec<String> = lhs.split('.').map(str::to_owned).collect();
    if path
        .iter()
        .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    {
        return Err(format!(
            "`{lhs}` in a filter is not an element path such as `system` or `type.coding.code`"
        ));
    }
    let (value, rest) = rest
        .split_once("')")
        .ok_or("a filter value must be closed by `')`")?;
    if value.contains('\'') {
        return Err("a filter value must not contain `'`".to_owned());
    }
    Ok((
        Filter {
            path,
            value: value.to_owned(),
        },
        rest,
    ))
}

fn parse_hl7_path(text: &str) -> Result<(Pattern, Specificity), String> {
    let (segment, rest) = text
        .split_once('-')
        .ok_or("an HL7 path looks like `PID-5`, `PID-11.5`, `PV1-*` or `*-*`")?;
    let segment = match segment {
        "*" => None,
        s if s.len() == 3
            && s.bytes().next().is_some_and(|b| b.is_ascii_uppercase())
            && s.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()) =>
        {
            Some(s.to_owned())
        }
        s => {
            return Err(format!(
                "`{s}` is not a segment id (three upper-case letters or digits, or `*`)"
            ))
        }
    };
    let mut numbers = rest.split('.');
    let field = match numbers.next() {
        Some("*") => None,
        Some(n) => Some(position(n, "field")?),
        None => return Err("missing field number".to_owned()),
    };
    let component = numbers
        .next()
        .map(|n| position(n, "component"))
        .transpose()?;
    let subcomponent = numbers
        .next()
        .map(|n| position(n, "subcomponent"))
        .transpose()?;
    if numbers.next().is_some() {
        return Err("at most field, component and subcomponent".to_owned());
    }
    if field.is_none() && component.is_some() {
        return Err("a component needs a field number, not `*`".to_owned());
    }
    if segment.as_deref() == Some("MSH") && matches!(field, Some(1 | 2)) {
        return Err(
            "MSH-1 and MSH-2 are the message delimiters; the engine always keeps them".to_owned(),
        );
    }
    let depth = 1 + u8::from(component.is_some()) + u8::from(subcomponent.is_some());
    let spec = Specificity {
        depth,
        literal_mask: (u32::from(segment.is_some()) << 31) | (u32::from(field.is_some()) << 30),
        filters: 0,
        literal_chars: 0,
    };
    Ok((
        Pattern::Hl7(Hl7Pattern {
            segment,
            field,
            component,
            subcomponent,
        }),
        spec,
    ))
}

fn position(text: &str, what: &str) -> Result<usize, String> {
    text.parse::<usize>()
        .ok()
        .filter(|n| (1..=999).contains(n))
        .ok_or_else(|| format!("`{text}` is not a {what} number (1 to 999)"))
}

/// `*` matches any run of characters (including none); everything else matches itself.
pub(crate) fn glob_match(pattern: &str, text: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let Some(mut remaining) = text.strip_prefix(first) else {
        return false;
    };
    let mut parts: Vec<&str> = rest.split('*').collect();
    let last = parts.pop().unwrap_or("");
    for part in parts {
        match remaining
            .find(part)
            .and_then(|i| remaining.get(i + part.len()..))
        {
            Some(rest) => remaining = rest,
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last)
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = r#"
name = "t"
version = "1"
[settings]
dates = "year"
restricted_zip3 = ["036"]
"#;

    fn parse(rules: &str) -> Result<Policy, PolicyError> {
        Policy::from_toml(&format!("{HEADER}{rules}"))
    }

    fn rule_err(rules: &str) -> (String, String, String) {
        match parse(rules) {
            Err(PolicyError::Rule {
                rule,
                field,
                reason,
            }) => (rule, field, reason),
            other => panic!("expected a rule error, got {other:?}"),
        }
    }

    #[test]
    fn shipped_policy_is_valid() {
        let text = include_str!("../policies/safe-harbor.toml");
        let policy = Policy::from_toml(text).unwrap();
        assert_eq!(policy.name, "safe-harbor");
        assert_eq!(Policy::safe_harbor().hash, policy.hash);
        assert_eq!(policy.hash.len(), 64);
        assert!(policy.rules.len() > 50);
        assert_eq!(policy.settings.dates, DateMode::Year);
        assert_eq!(policy.settings.age_cutoff, 89);
        assert_eq!(policy.settings.restricted_zip3.len(), 17);
        // No rule of the shipped policy needs the re-identification key.
        assert!(policy.rules.iter().all(|r| r.method != Method::Encrypt));
    }

    #[test]
    fn shipped_policy_covers_every_category() {
        let policy = Policy::safe_harbor();
        for category in 1..=MAX_CATEGORY {
            assert!(
                policy.rules.iter().any(|r| r.category == category),
                "no rule for category {category}"
            );
        }
    }

    #[test]
    fn unknown_method() {
        let (rule, field, reason) = rule_err(
            r#"[[rule]]
id = "r1"
category = 1
formats = ["csv"]
paths = ["FIRST"]
method = "obliterate"
"#,
        );
        assert_eq!((rule.as_str(), field.as_str()), ("r1", "method"));
        assert!(reason.contains("unknown method `obliterate`"), "{reason}");
        assert!(reason.contains("generalize-zip"), "{reason}");
    }

    #[test]
    fn substitute_needs_a_value_and_others_take_none() {
        let (rule, field, reason) = rule_err(
            r#"[[rule]]
id = "r1"
category = 1
formats = ["csv"]
paths = ["FIRST"]
method = "substitute"
"#,
        );
        assert_eq!((rule.as_str(), field.as_str()), ("r1", "value"));
        assert!(reason.contains("needs a `value`"), "{reason}");

        let (_, field, reason) = rule_err(
            r#"[[rule]]
id = "r1"
category = 1
formats = ["csv"]
paths = ["FIRST"]
method = "redact"
value = "X"
"#,
        );
        assert_eq!(field, "value");
        assert!(reason.contains("only method `substitute`"), "{reason}");
    }

    #[test]
    fn bad_path_syntax_names_rule_and_path() {
        for (format, path, expect) in [
            ("fhir-ndjson", "name..given", "expected an element name"),
            ("fhir-ndjson", "name.where(system=phone)", "filter"),
            ("fhir-ndjson", "telecom.where(system='phone'", "closed"),
            ("fhir-ndjson", "name-given", "unexpected character"),
            ("fhir-ndjson", "where(system='x')", "must follow"),
            ("hl7v2", "PID5", "looks like"),
            ("hl7v2", "pid-5", "segment id"),
            ("hl7v2", "PID-0", "field number"),
            ("hl7v2", "PID-5.x", "component number"),
            ("hl7v2", "PID-5.1.1.1", "at most"),
            ("hl7v2", "PID-*.1", "needs a field number"),
            ("hl7v2", "MSH-2", "delimiters"),
            ("csv", "", "empty"),
        ] {
            let (rule, field, reason) = rule_err(&format!(
                "[[rule]]\nid = \"r1\"\ncategory = 0\nformats = [\"{format}\"]\npaths = [\"{path}\"]\nmethod = \"keep\"\n"
            ));
            assert_eq!((rule.as_str(), field.as_str()), ("r1", "paths"), "{path}");
            assert!(reason.contains(path), "{reason}");
            assert!(reason.contains(expect), "{path}: {reason}");
        }
    }

    #[test]
    fn duplicate_rule_id() {
        let rule = "[[rule]]\nid = \"same\"\ncategory = 0\nformats = [\"csv\"]\npaths = [\"A\"]\nmethod = \"keep\"\n";
        let other = rule.replace("[\"A\"]", "[\"B\"]");
        let (id, field, reason) = rule_err(&format!("{rule}{other}"));
        assert_eq!((id.as_str(), field.as_str()), ("same", "id"));
        assert!(reason.contains("duplicate"));
    }

    #[test]
    fn category_out_of_range() {
        for category in ["19", "-1", "300"] {
            let (id, field, reason) = rule_err(&format!(
                "[[rule]]\nid = \"r\"\ncategory = {category}\nformats = [\"csv\"]\npaths = [\"A\"]\nmethod = \"keep\"\n"
            ));
            assert_eq!((id.as_str(), field.as_str()), ("r", "category"));
            assert!(reason.contains("out of range"), "{reason}");
        }
    }

    #[test]
    fn other_rule_errors() {
        let base = |extra: &str, formats: &str, paths: &str| {
            format!("[[rule]]\nid = \"r\"\ncategory = 0\nformats = {formats}\npaths = {paths}\nmethod = \"keep\"\n{extra}")
        };
        let cases = [
            (
                base("", r#"["fhir"]"#, r#"["a"]"#),
                "formats",
                "unknown format",
            ),
            (
                base("", r#"["csv", "hl7v2"]"#, r#"["A"]"#),
                "formats",
                "separate rules",
            ),
            (base("", r#"[]"#, r#"["A"]"#), "formats", "at least one"),
            (base("", r#"["csv"]"#, r#"[]"#), "paths", "at least one"),
            (base("", r#"["csv"]"#, r#"["A", "A"]"#), "paths", "twice"),
            (
                base("resource_types = []", r#"["csv"]"#, r#"["A"]"#),
                "resource_types",
                "empty",
            ),
            (
                base("resource_types = [\"Pat ient\"]", r#"["csv"]"#, r#"["A"]"#),
                "resource_types",
                "not a record type",
            ),
            (
                base("when_type = [\"ST\"]", r#"["csv"]"#, r#"["A"]"#),
                "when_type",
                "only HL7",
            ),
            (
                base("when_type = [\"ST\"]", r#"["hl7v2"]"#, r#"["NTE-3"]"#),
                "when_type",
                "OBX",
            ),
        ];
        for (text, field, expect) in cases {
            let (id, f, reason) = rule_err(&text);
            assert_eq!((id.as_str(), f.as_str()), ("r", field), "{text}");
            assert!(reason.contains(expect), "{reason}");
        }
        let (id, field, _) = rule_err("[[rule]]\nid = \"Bad_Id\"\ncategory = 0\nformats = [\"csv\"]\npaths = [\"A\"]\nmethod = \"keep\"\n");
        assert_eq!((id.as_str(), field.as_str()), ("#1", "id"));
    }

    #[test]
    fn same_path_in_two_rules_is_ambiguous_unless_types_differ() {
        let a = "[[rule]]\nid = \"a\"\ncategory = 0\nformats = [\"csv\"]\npaths = [\"X\"]\nmethod = \"keep\"\n";
        let b = "[[rule]]\nid = \"b\"\ncategory = 1\nformats = [\"csv\"]\npaths = [\"X\"]\nmethod = \"redact\"\n";
        let (id, field, reason) = rule_err(&format!("{a}{b}"));
        assert_eq!((id.as_str(), field.as_str()), ("b", "paths"));
        assert!(reason.contains("also in rule `a`"), "{reason}");
        let typed = b.replace("method", "resource_types = [\"Patient\"]\nmethod");
        assert!(parse(&format!("{a}{typed}")).is_ok());
    }

    #[test]
    fn syntax_and_settings_errors() {
        assert!(matches!(
            Policy::from_toml("name = "),
            Err(PolicyError::Syntax(_))
        ));
        let unknown = format!("{HEADER}colour = 1\n");
        assert!(
            matches!(Policy::from_toml(&unknown), Err(PolicyError::Syntax(m)) if m.contains("colour"))
        );
        for (from, to, field) in [
            ("dates = \"year\"", "dates = \"month\"", "settings.dates"),
            (
                "dates = \"year\"",
                "dates = \"shift\"\ndate_shift_max_days = 0",
                "settings.date_shift_max_days",
            ),
            (
                "dates = \"year\"",
                "dates = \"year\"\nage_cutoff = 95",
                "settings.age_cutoff",
            ),
            ("[\"036\"]", "[\"36\"]", "settings.restricted_zip3"),
            (
                "[\"036\"]",
                "[\"036\", \"036\"]",
                "settings.restricted_zip3",
            ),
            ("name = \"t\"", "name = \"\"", "name"),
        ] {
            match Policy::from_toml(&HEADER.replace(from, to)) {
                Err(PolicyError::Field { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{to}: {other:?}"),
            }
        }
        let no_zip3 = HEADER.replace("[\"036\"]", "[]");
        let text = format!("{no_zip3}[[rule]]\nid = \"z\"\ncategory = 2\nformats = [\"csv\"]\npaths = [\"ZIP\"]\nmethod = \"generalize-zip\"\n");
        assert!(
            matches!(Policy::from_toml(&text), Err(PolicyError::Rule { rule, .. }) if rule == "z")
        );
    }

    #[test]
    fn hash_is_of_the_file_bytes() {
        let a = parse("").unwrap();
        let b = Policy::from_toml(&format!("{HEADER}\n# comment\n")).unwrap();
        assert_ne!(a.hash, b.hash);
        assert_eq!(a.hash, hex::encode(Sha256::digest(HEADER.as_bytes())));
    }

    #[test]
    fn fhir_path_specificity() {
        let spec = |p: &str| parse_fhir_path(p).unwrap().1;
        assert!(spec("address.state") > spec("address"));
        assert!(spec("name.*") > spec("*.given"));
        assert!(spec("telecom.where(system='phone')") > spec("telecom"));
        assert!(spec("deceasedBoolean") > spec("deceased*"));
        let (Pattern::Fhir(segs), _) =
            parse_fhir_path("identifier.where(type.coding.code='MR').value").unwrap()
        else {
            panic!()
        };
        assert_eq!(segs.len(), 2);
        let filter = segs[0].filter.as_ref().unwrap();
        assert_eq!(filter.path, ["type", "coding", "code"]);
        assert_eq!(filter.value, "MR");
        // Filter values may contain dots, slashes and colons (extension URLs).
        assert!(parse_fhir_path(
            "extension.where(url='http://hl7.org/fhir/StructureDefinition/patient-birthPlace').valueAddress.state"
        )
        .is_ok());
    }

    #[test]
    fn hl7_path_specificity() {
        let spec = |p: &str| parse_hl7_path(p).unwrap().1;
        assert!(spec("PID-11.5") > spec("PID-11"));
        assert!(spec("PID-11") > spec("PID-*"));
        assert!(spec("PID-*") > spec("*-5"));
        assert!(spec("*-5") > spec("*-*"));
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("REASON*", "REASONCODE"));
        assert!(glob_match("*CODE", "REASONCODE"));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(!glob_match("a*b*c", "aXbY"));
        assert!(!glob_match("ab*ba", "aba"));
        assert!(glob_match("ADT^*", "ADT^A01"));
        assert!(!glob_match("Id", "ID"));
    }
}
