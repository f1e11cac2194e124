//! The de-identification engine: applies a [`Policy`] to one ingested record and reports, per
//! rule and path, what it did.
//!
//! The engine is pure (no IO, no clock, no randomness except the AES-GCM nonce of `encrypt`),
//! so the same record, policy, keys and context always give the same output, which is what
//! the golden tests and downstream deduplication rely on.
//!
//! It works on leaves. Every scalar of a record (a FHIR primitive, a CSV cell, an HL7
//! subcomponent) is governed by the most specific rule whose path matches it or one of its
//! ancestors; a leaf no rule covers is removed and counted in
//! [`Report::default_redactions`] (the allow-list model: forgetting a field costs data, never
//! privacy). Empty objects and arrays left behind are pruned; HL7 keeps its positional layout
//! and empties removed subcomponents instead.
//!
//! Ranking, highest first: a rule limited to the record's type beats an untyped one, then the
//! deeper path, then literal segments from the left, then `where` filters, then literal glob
//! characters, then an OBX value-type condition, then the earlier rule in the file.
//!
//! The `scrub` method needs to know the identifiers of the same record, so a record with any
//! scrub rule is walked twice: once to collect the values of identifier rules, once to
//! transform.

mod csv;
mod dates;
mod fhir;
mod hl7;
mod rules;

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use base64::Engine as _;
use chrono::NaiveDate;
use hmac::{Hmac, Mac};
use pipeline::crypto::{seal, KeyRef};
use pipeline::events::SourceRecordBody;
use pipeline::formats::{RecordShape, SourceFormat};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::identity::{self, MergeClaim, OtherPatient, TrustedId};
use crate::policy::{DateMode, Family, Method, Policy, Rule};
use crate::scrub::{self, Known};

use dates::AgeOutcome;
use fhir::{conditional_reference, fhir_metadata, split_reference};
use rules::{Candidate, Governing, Mode, PatternIndex, Prepared, Rank};

/// The report key under which the engine counts what it does to a Bundle entry's own fields
/// (`fullUrl`, `request.method`, `request.url`); policy rule ids cannot contain `:`.
pub const BUNDLE_ENTRY_RULE: &str = "engine:bundle-entry";

/// Domain separation: a pseudonym can never equal a date-shift MAC or a future derived value.
const PSEUDONYM_DOMAIN: &[u8] = b"medpipe/anonymization/pseudonym/v1\0";
const DATE_SHIFT_DOMAIN: &[u8] = b"medpipe/anonymization/date-shift/v1\0";
/// A patient keyed by a trusted identifier (see `identity`) never collides with one keyed
/// by a source id that happens to read the same.
const IDENTITY_DOMAIN: &[u8] = b"medpipe/anonymization/identity/v1\0";

/// Shortest name passed to the scrubber; one character would match everywhere.
const MIN_KNOWN_NAME_CHARS: usize = 2;
/// Shortest other identifier passed to the scrubber. Real identifiers (phones, SSNs, MRNs,
/// ids, streets) are longer; shorter values under identifier rules are type and use codes
/// (HL7 `PH`, `PRN`, `MR`) whose replacement would damage clinical text ("pH 7.4").
const MIN_KNOWN_ID_CHARS: usize = 4;

/// FHIR datatype metadata inside identifying elements (`telecom.system = "email"`,
/// `identifier.use`, `photo.contentType`): never identifiers themselves.
const FHIR_METADATA: [&str; 8] = [
    "use",
    "system",
    "rank",
    "contentType",
    "language",
    "size",
    "hash",
    "userSelected",
];

type HmacSha256 = Hmac<Sha256>;

/// Keys the engine uses. The pseudonym key also derives date shifts.
#[derive(Debug, Clone)]
pub struct Keys {
    pub pseudonym: KeyRef,
    /// Needed only by `encrypt` rules (checked at [`Engine::new`]).
    pub reidentify: Option<KeyRef>,
}

/// Per-run facts the output depends on; passed in so the engine never reads the clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// Pseudonyms and shifts are per tenant: the same MRN at two tenants does not link.
    pub tenant: String,
    /// The day ages are computed at ("over 89" is judged on this date).
    pub reference_date: NaiveDate,
}

/// Why a record could not be de-identified. Messages never contain record values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("the record has no patient link, so no patient pseudonym can be derived")]
    NoPatientLink,
    #[error(
        "the shared resource (a {0} without a patient) has no id or fullUrl, so no record can reference it"
    )]
    NoResourceId(String),
    #[error("unsupported source format `{0}` (expected csv, fhir-ndjson, fhir-bundle or hl7v2)")]
    UnsupportedFormat(String),
    #[error("unexpected record structure at `{path}`: {reason}")]
    UnexpectedStructure { path: String, reason: String },
    #[error(
        "rule `{0}` uses method encrypt, which needs the re-identification key, but none was given"
    )]
    MissingKey(String),
    #[error("cryptographic failure: {0}")]
    Crypto(String),
    #[error(transparent)]
    Scrubber(#[from] scrub::PatternError),
}

fn unexpected(path: impl Into<String>, reason: impl Into<String>) -> EngineError {
    EngineError::UnexpectedStructure {
        path: path.into(),
        reason: reason.into(),
    }
}

/// The de-identified record.
#[derive(Debug, Clone, PartialEq)]
pub struct Anonymized {
    /// Equals `engine.pseudonym(patient_link)`; for a shared resource without a patient
    /// (see [`Subject::Shared`]), the pseudonym of its own id.
    pub patient_pseudonym: String,
    /// Whose record it is.
    pub subject: Subject,
    pub content: Value,
    pub report: Report,
}

/// Whose record a record is: a patient's, or a resource many patients share
/// ([`pipeline::ResourceType::is_shared`]: a practitioner, an organisation, a location, a
/// medication, a device) that names no patient. A shared resource's own id stands in for
/// the patient link: it keys its pseudonym, its date shift and its free-text scrubbing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Patient,
    Shared,
}

/// Who a record is about, as far as the record itself says (see `identity`); the stage
/// adds what earlier records said (aliases and merges) before it picks the pseudonym.
#[derive(Debug, Clone, PartialEq)]
pub struct Identified {
    pub subject: Subject,
    /// The source link: the patient's id in the source, or a shared resource's own id.
    pub link: String,
    /// `pseudonym(link)`: the patient's pseudonym when nothing better is known.
    pub source_pseudonym: String,
    /// The pseudonym of the patient's highest-priority trusted identifier in the record.
    pub identity_pseudonym: Option<String>,
    /// Merges the record announces, with the other patient's pseudonym as far as the record
    /// says (its trusted identifier's, else its source id's).
    pub merges: Vec<Merge>,
}

/// A merge a record announces (see [`crate::identity::MergeClaim`]), pseudonymized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merge {
    /// The other patient was merged into this record's patient.
    Absorbed {
        other: String,
        other_is_source_id: bool,
        trigger: &'static str,
    },
    /// This record's patient was replaced by the other.
    ReplacedBy {
        other: String,
        other_is_source_id: bool,
    },
}

/// What was done to one record: counts only, keyed by rule id and by path without array
/// indices, so it can be stored and aggregated without becoming PHI itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub policy_version: String,
    pub policy_hash: String,
    /// Rule id -> path -> leaves the rule governed (whatever the outcome, `keep` included).
    pub rules: BTreeMap<String, BTreeMap<String, u64>>,
    /// Path -> leaves no rule covered, removed by the allow-list default.
    pub default_redactions: BTreeMap<String, u64>,
    /// Rule id -> path -> leaves its method could not handle (an unparseable date, a ZIP
    /// that is not a US ZIP) and that were removed instead. Also counted in `rules`.
    pub invalid: BTreeMap<String, BTreeMap<String, u64>>,
    /// Rule id -> path -> ages or birth dates over the cutoff that were aggregated. Also
    /// counted in `rules`.
    pub age_clamped: BTreeMap<String, BTreeMap<String, u64>>,
    /// Scrubber placeholder type (`NAME`, `DATE`, ...) -> replacements in free text.
    pub scrubbed: BTreeMap<String, u64>,
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    match map.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            map.insert(key.to_owned(), 1);
        }
    }
}

fn bump_rule(map: &mut BTreeMap<String, BTreeMap<String, u64>>, rule: &str, path: &str) {
    match map.get_mut(rule) {
        Some(paths) => bump(paths, path),
        None => {
            map.insert(rule.to_owned(), BTreeMap::from([(path.to_owned(), 1)]));
        }
    }
}

/// The engine for one policy, key set and context.
/// What the scrubber looks for in a record's free text.
pub enum Scrub<'k> {
    /// The record's own identifiers, collected by a first pass over it, and these.
    Collect(&'k Known),
    /// Exactly these: what [`Engine::known_identifiers`] returned for this very record
    /// (with no extra), when the caller has them already; the first pass is skipped.
    Known(Known),
}

pub struct Engine {
    policy: Policy,
    keys: Keys,
    ctx: Context,
    /// HMAC-SHA256 keyed with the pseudonym key, cloned per use (keying once is cheaper and
    /// leaves no fallible step after construction).
    mac: HmacSha256,
    /// The free-text scrubber, compiled (and so checked) before the first record.
    scrubber: &'static scrub::Scrubber,
    /// The candidate rules and pattern index of each format and record type seen, at
    /// most `PREPARED_MAX` of them (record types come from the data).
    prepared: std::sync::RwLock<HashMap<(SourceFormat, String), Arc<Prepared>>>,
}

/// Formats and record types whose candidate rules are kept prepared; past this, the
/// others are prepared per record (record types are the data's, and unbounded).
const PREPARED_MAX: usize = 256;

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("policy", &self.policy.name)
            .field("version", &self.policy.version)
            .field("tenant", &self.ctx.tenant)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Checks that the keys fit the policy: `encrypt` rules need `keys.reidentify`.
    pub fn new(policy: Policy, keys: Keys, ctx: Context) -> Result<Engine, EngineError> {
        if keys.reidentify.is_none() {
            if let Some(rule) = policy.rules.iter().find(|r| r.method == Method::Encrypt) {
                return Err(EngineError::MissingKey(rule.id.clone()));
            }
        }
        let mac = HmacSha256::new_from_slice(keys.pseudonym.key.expose()).map_err(|_| {
            EngineError::Crypto("the pseudonym key cannot key HMAC-SHA256".to_owned())
        })?;
        let scrubber = scrub::Scrubber::shared()?;
        Ok(Engine {
            policy,
            keys,
            ctx,
            mac,
            scrubber,
            prepared: std::sync::RwLock::default(),
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Id of the pseudonym key, recorded in every output event (keys rotate by id).
    pub fn key_id(&self) -> &str {
        &self.keys.pseudonym.id
    }

    /// A MAC over `domain`, the length-prefixed tenant and `data`. The length prefix keeps
    /// (tenant "a", id "bc") and (tenant "ab", id "c") apart.
    fn derive(&self, domain: &[u8], data: &str) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(domain);
        mac.update(&(self.ctx.tenant.len() as u64).to_be_bytes());
        mac.update(self.ctx.tenant.as_bytes());
        mac.update(data.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Stable pseudonym of a bare identifier (no "Patient/" or "urn:uuid:" prefix) for this
    /// tenant and key: hex HMAC-SHA256, 64 characters (also a valid FHIR id).
    pub fn pseudonym(&self, bare_id: &str) -> String {
        hex::encode(self.derive(PSEUDONYM_DOMAIN, bare_id))
    }

    /// Pseudonym of a trusted identifier: the system's name and the value, in their own
    /// domain.
    pub fn identity_pseudonym(&self, id: &TrustedId) -> String {
        let data = format!("{}:{}{}", id.system.len(), id.system, id.value);
        hex::encode(self.derive(IDENTITY_DOMAIN, &data))
    }

    /// The pseudonym of another patient a record names, and whether it is only the source
    /// id's (which an alias may resolve further).
    fn other_pseudonym(&self, other: &OtherPatient) -> (String, bool) {
        match other {
            OtherPatient::Trusted(id) => (self.identity_pseudonym(id), false),
            OtherPatient::SourceId(id) => (self.pseudonym(id), true),
        }
    }

    /// Who the record is about, as far as the record itself says.
    pub fn identify(
        &self,
        source_format: &str,
        record_type: &str,
        body: &SourceRecordBody,
    ) -> Result<Identified, EngineError> {
        let (format, link, subject) = format_and_link(source_format, record_type, body)?;
        let systems = &self.policy.identity;
        let (identity_pseudonym, merges) = match subject {
            Subject::Shared => (None, Vec::new()),
            Subject::Patient => {
                let identity =
                    identity::patient_identity(systems, format, record_type, &body.content)
                        .map(|id| self.identity_pseudonym(&id));
                let merges = identity::merge_claims(systems, format, record_type, &body.content)
                    .into_iter()
                    .map(|claim| match claim {
                        MergeClaim::Absorbed { other, trigger } => {
                            let (other, other_is_source_id) = self.other_pseudonym(&other);
                            Merge::Absorbed {
                                other,
                                other_is_source_id,
                                trigger,
                            }
                        }
                        MergeClaim::ReplacedBy { other } => {
                            let (other, other_is_source_id) = self.other_pseudonym(&other);
                            Merge::ReplacedBy {
                                other,
                                other_is_source_id,
                            }
                        }
                    })
                    .collect();
                (identity, merges)
            }
        };
        Ok(Identified {
            subject,
            source_pseudonym: self.pseudonym(&link),
            link: link.into_owned(),
            identity_pseudonym,
            merges,
        })
    }

    /// Per-patient date shift in days, in `[-max, -1] ∪ [1, max]`: never 0, so a shifted
    /// date never equals the original, and the same for every record of the patient, so
    /// intervals survive.
    pub fn date_shift_days(&self, patient_pseudonym: &str) -> i64 {
        let mac = self.derive(DATE_SHIFT_DOMAIN, patient_pseudonym);
        let n = mac
            .iter()
            .take(8)
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        let max = u64::from(self.policy.settings.date_shift_max_days.max(1));
        let magnitude = i64::try_from(1 + (n >> 1) % max).unwrap_or(1);
        if n & 1 == 0 {
            magnitude
        } else {
            -magnitude
        }
    }

    /// De-identifies one record. `record_type` is the FHIR type (also for CSV) or the HL7
    /// message type; `extra_known` adds identifiers of the same patient seen in earlier
    /// records (names, mostly) for the scrubber.
    pub fn anonymize(
        &self,
        source_format: &str,
        record_type: &str,
        body: &SourceRecordBody,
        extra_known: &Known,
    ) -> Result<Anonymized, EngineError> {
        let who = self.identify(source_format, record_type, body)?;
        let patient = who
            .identity_pseudonym
            .clone()
            .unwrap_or_else(|| who.source_pseudonym.clone());
        self.anonymize_as(
            source_format,
            record_type,
            body,
            &who,
            &patient,
            &|_| None,
            Scrub::Collect(extra_known),
        )
    }

    /// De-identifies one record as the record of `patient` (what [`Engine::identify`] and
    /// the stage's aliases and merges resolved). Every reference to the record's own link
    /// becomes `patient`; a reference to another Patient becomes what `resolve` says for
    /// its source id, else that id's pseudonym.
    #[allow(clippy::too_many_arguments)]
    pub fn anonymize_as(
        &self,
        source_format: &str,
        record_type: &str,
        body: &SourceRecordBody,
        who: &Identified,
        patient: &str,
        resolve: &dyn Fn(&str) -> Option<String>,
        scrub: Scrub<'_>,
    ) -> Result<Anonymized, EngineError> {
        let format = SourceFormat::parse(source_format)
            .ok_or_else(|| EngineError::UnsupportedFormat(source_format.to_owned()))?;
        let mut run = self.run(format, record_type, patient);
        run.link = Some(&who.link);
        run.resolve = Some(resolve);
        if run
            .index
            .candidates
            .iter()
            .any(|c| c.rule.method == Method::Scrub)
        {
            run.known = match scrub {
                Scrub::Collect(extra_known) => {
                    self.collect(&mut run, &who.link, &body.content, extra_known)?
                }
                Scrub::Known(known) => known,
            };
        }
        run.mode = Mode::Apply;
        let content = run
            .record(&body.content)?
            .unwrap_or_else(|| empty_like(format));
        let report = run.report;
        Ok(Anonymized {
            patient_pseudonym: patient.to_owned(),
            subject: who.subject,
            content,
            report,
        })
    }

    /// The identifiers of a record that the scrubber looks for in its free text: original
    /// values of leaves that category 1 rules (as names) and category 2, 4-18 rules (as other
    /// identifiers) remove or replace, plus the patient link and `extra_known`. Callers keep
    /// the result of a patient's Patient record to pass as `extra_known` for later records.
    pub fn known_identifiers(
        &self,
        source_format: &str,
        record_type: &str,
        body: &SourceRecordBody,
        extra_known: &Known,
    ) -> Result<Known, EngineError> {
        let (format, link, _) = format_and_link(source_format, record_type, body)?;
        let patient = self.pseudonym(&link);
        let mut run = self.run(format, record_type, &patient);
        self.collect(&mut run, &link, &body.content, extra_known)
    }

    fn collect(
        &self,
        run: &mut Run<'_>,
        link: &str,
        content: &Value,
        extra_known: &Known,
    ) -> Result<Known, EngineError> {
        run.mode = Mode::Collect;
        run.record(content)?;
        let mut known = std::mem::take(&mut run.known);
        push_known(&mut known.identifiers, link, MIN_KNOWN_ID_CHARS);
        for name in &extra_known.names {
            push_known(&mut known.names, name, MIN_KNOWN_NAME_CHARS);
        }
        for id in &extra_known.identifiers {
            push_known(&mut known.identifiers, id, MIN_KNOWN_ID_CHARS);
        }
        Ok(known)
    }

    fn run<'e>(&'e self, format: SourceFormat, record_type: &'e str, patient: &'e str) -> Run<'e> {
        let prepared = self.prepared(format, record_type);
        let candidates = prepared
            .candidates
            .iter()
            .filter_map(|&(r, p, rank)| {
                let rule = self.policy.rules.get(r)?;
                Some(Candidate {
                    rule,
                    path: rule.paths.get(p)?,
                    rank,
                })
            })
            .collect();
        let index = PatternIndex::new(prepared, candidates);
        Run {
            engine: self,
            format,
            record_type,
            index,
            patient,
            link: None,
            resolve: None,
            shift: None,
            mode: Mode::Collect,
            known: Known::default(),
            report: Report {
                policy_version: self.policy.version.clone(),
                policy_hash: self.policy.hash.clone(),
                ..Report::default()
            },
        }
    }

    /// The candidate rules of this format and record type and their index, prepared once.
    fn prepared(&self, format: SourceFormat, record_type: &str) -> Arc<Prepared> {
        let key = (format, record_type.to_owned());
        if let Some(p) = self
            .prepared
            .read()
            .ok()
            .and_then(|cache| cache.get(&key).cloned())
        {
            return p;
        }
        let (candidates, positions) = self.candidates(format, record_type);
        let prepared = Arc::new(Prepared::new(&candidates, positions));
        if let Ok(mut cache) = self.prepared.write() {
            if cache.len() < PREPARED_MAX {
                cache.insert(key, prepared.clone());
            }
        }
        prepared
    }

    /// Every rule path that can apply to records of this format and type, ranked, with
    /// its rule's and its own position in the policy.
    #[allow(clippy::type_complexity)]
    fn candidates(
        &self,
        format: SourceFormat,
        record_type: &str,
    ) -> (Vec<Candidate<'_>>, Vec<(usize, usize, Rank)>) {
        let mut out = Vec::new();
        let mut positions = Vec::new();
        for (index, rule) in self.policy.rules.iter().enumerate() {
            if !rule.formats.contains(&format) || !rule.applies_to_type(record_type) {
                continue;
            }
            for (p, path) in rule.paths.iter().enumerate() {
                let rank = Rank {
                    typed: rule.resource_types.is_some(),
                    specificity: path.specificity,
                    conditional: rule.when_type.is_some(),
                    order: Reverse(index),
                };
                out.push(Candidate { rule, path, rank });
                positions.push((index, p, rank));
            }
        }
        (out, positions)
    }

    /// `pseudonymize` for one value. FHIR references keep their shape: `Patient/123` ->
    /// `Patient/<p>`, `urn:uuid:abc` -> `urn:uuid:<p>`, `#c1` -> `#<p>`; an absolute URL loses
    /// its base (a server address) and becomes relative; a conditional `Type?query` becomes
    /// `Type/<pseudonym of the whole text>`. CSV and HL7 values are opaque.
    fn pseudonymize_value(&self, format: SourceFormat, text: &str) -> String {
        self.pseudonymize_as(format, text, None)
    }

    /// [`Engine::pseudonymize_value`], where `own` says which pseudonym a Patient's source
    /// id stands for (the record's own link, an alias): applied to `Patient/<id>` and
    /// `urn:uuid:<id>` references and to a bare value that is the link (`own_bare`).
    fn pseudonymize_as(&self, format: SourceFormat, text: &str, own: Option<&Own<'_>>) -> String {
        let resolved = |id: &str, bare: bool| {
            own.and_then(|o| {
                if id == o.link && (bare || o.link_is_reference) {
                    Some(o.patient.to_owned())
                } else if bare {
                    None
                } else {
                    (o.resolve)(id)
                }
            })
            .unwrap_or_else(|| self.pseudonym(id))
        };
        if format.family() != Family::Fhir {
            return match own {
                Some(o) if text == o.link => o.patient.to_owned(),
                _ => self.pseudonym(text),
            };
        }
        if let Some(id) = text.strip_prefix("urn:uuid:") {
            return format!("urn:uuid:{}", resolved(id, false));
        }
        for prefix in ["urn:oid:", "#"] {
            if let Some(id) = text.strip_prefix(prefix) {
                return format!("{prefix}{}", self.pseudonym(id));
            }
        }
        if let Some(kind) = conditional_reference(text) {
            return format!("{kind}/{}", self.pseudonym(text));
        }
        match split_reference(text) {
            Some((kind, id, version)) => {
                let p = if kind == "Patient" {
                    resolved(id, false)
                } else {
                    self.pseudonym(id)
                };
                match version {
                    Some(v) => format!("{kind}/{p}/_history/{v}"),
                    None => format!("{kind}/{p}"),
                }
            }
            None => match own {
                Some(o) if o.bare_is_link && text == o.link => o.patient.to_owned(),
                _ => self.pseudonym(text),
            },
        }
    }

    /// `encrypt`: `enc:v1:<key id>:<base64(nonce || ciphertext)>`, bound to the rule id.
    fn encrypt(&self, rule: &Rule, text: &str) -> Result<String, EngineError> {
        let key = self
            .keys
            .reidentify
            .as_ref()
            .ok_or_else(|| EngineError::MissingKey(rule.id.clone()))?;
        let (mut blob, ciphertext) = seal(key, text.as_bytes(), rule.id.as_bytes())
            .map_err(|e| EngineError::Crypto(e.to_string()))?;
        blob.extend_from_slice(&ciphertext);
        Ok(format!(
            "enc:v1:{}:{}",
            key.id,
            base64::engine::general_purpose::STANDARD.encode(blob)
        ))
    }
}

/// The parsed source format, the (non-blank) patient link of a record and whose record it
/// is. A FHIR resource of a shared type without a patient link is linked to its own id
/// (its `id`, else its Bundle entry's `fullUrl` id).
fn format_and_link<'b>(
    source_format: &str,
    record_type: &str,
    body: &'b SourceRecordBody,
) -> Result<(SourceFormat, Cow<'b, str>, Subject), EngineError> {
    let format = SourceFormat::parse(source_format)
        .ok_or_else(|| EngineError::UnsupportedFormat(source_format.to_owned()))?;
    if let Some(link) = body
        .patient_link
        .as_deref()
        .filter(|l| !l.trim().is_empty())
    {
        return Ok((format, Cow::Borrowed(link), Subject::Patient));
    }
    let shared = pipeline::ResourceType::parse(record_type).is_some_and(|t| t.is_shared());
    if !shared || format.family() != Family::Fhir {
        return Err(EngineError::NoPatientLink);
    }
    let content = &body.content;
    let resource = content.get("resource").unwrap_or(content);
    let own = resource
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.trim().is_empty())
        .map(Cow::Borrowed)
        .or_else(|| {
            let url = content.get("fullUrl").and_then(Value::as_str)?;
            let id = match url.strip_prefix("urn:uuid:") {
                Some(id) => id,
                None => split_reference(url).map(|(_, id, _)| id)?,
            };
            (!id.trim().is_empty()).then(|| Cow::Owned(id.to_owned()))
        })
        .ok_or_else(|| EngineError::NoResourceId(record_type.to_owned()))?;
    Ok((format, own, Subject::Shared))
}

/// What an empty record looks like when every leaf was removed.
fn empty_like(format: SourceFormat) -> Value {
    match format.shape() {
        RecordShape::Hl7Message => serde_json::json!({"segments": []}),
        RecordShape::CsvRow | RecordShape::FhirResource | RecordShape::FhirBundleEntry => {
            Value::Object(Map::new())
        }
    }
}

fn push_known(list: &mut Vec<String>, value: &str, min_chars: usize) {
    let value = value.trim();
    if value.chars().count() >= min_chars && !list.iter().any(|k| k == value) {
        list.push(value.to_owned());
    }
}

/// The text of a scalar (numbers and booleans as JSON writes them).
fn scalar_text(value: &Value) -> Option<Cow<'_, str>> {
    match value {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// `generalize-zip`: a US ZIP (`12345`, `12345-6789`, `123456789`) -> its first three digits,
/// or `000` for the restricted areas; anything else is `None` (redacted).
fn generalize_zip(text: &str, restricted: &std::collections::BTreeSet<String>) -> Option<String> {
    let text = text.trim();
    let digits: String = text.chars().filter(|c| *c != '-').collect();
    let shape_ok = match text.len() {
        5 | 9 => !text.contains('-'),
        10 => text.find('-') == Some(5) && text.matches('-').count() == 1,
        _ => false,
    };
    if !shape_ok || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let zip3 = digits.get(..3)?;
    Some(if restricted.contains(zip3) {
        "000".to_owned()
    } else {
        zip3.to_owned()
    })
}

/// What the stage knows of another Patient's source id: the pseudonym it stands for.
pub type Resolve<'a> = dyn Fn(&str) -> Option<String> + 'a;

/// Which pseudonym a Patient's source id stands for in one record.
struct Own<'a> {
    link: &'a str,
    patient: &'a str,
    /// A reference to the link names this record's patient (false for a shared resource,
    /// whose link is its own id).
    link_is_reference: bool,
    /// A bare value equal to the link is the record's own id (a Patient's `id`).
    bare_is_link: bool,
    resolve: &'a dyn Fn(&str) -> Option<String>,
}

/// One record being de-identified.
struct Run<'e> {
    engine: &'e Engine,
    format: SourceFormat,
    record_type: &'e str,
    index: PatternIndex<'e>,
    patient: &'e str,
    /// The record's source link, set by [`Engine::anonymize_as`].
    link: Option<&'e str>,
    resolve: Option<&'e Resolve<'e>>,
    shift: Option<i64>,
    mode: Mode,
    known: Known,
    report: Report,
}

impl<'e> Run<'e> {
    fn record(&mut self, content: &Value) -> Result<Option<Value>, EngineError> {
        match self.format.shape() {
            RecordShape::CsvRow => self.csv(content),
            RecordShape::FhirResource => self.fhir_resource(content, ""),
            RecordShape::FhirBundleEntry => self.fhir_entry(content),
            RecordShape::Hl7Message => self.hl7(content),
        }
    }

    fn shift_days(&mut self) -> i64 {
        match self.shift {
            Some(s) => s,
            None => {
                let s = self.engine.date_shift_days(self.patient);
                self.shift = Some(s);
                s
            }
        }
    }

    /// Handles one leaf under its governing rule (if any).
    fn leaf(
        &mut self,
        value: &Value,
        path: &str,
        governing: Option<Governing<'e>>,
    ) -> Result<Option<Value>, EngineError> {
        if value.as_str().is_some_and(|s| s.trim().is_empty()) {
            // A blank value (an empty CSV cell or HL7 component) carries nothing: kept under
            // `keep`, otherwise dropped, and never counted, so reports show only real data.
            let keep = self.mode == Mode::Apply
                && governing.is_some_and(|g| g.rule.method == Method::Keep);
            return Ok(keep.then(|| value.clone()));
        }
        match (self.mode, governing) {
            (Mode::Collect, Some(g)) => {
                self.collect(g.rule, value, path);
                Ok(None)
            }
            (Mode::Collect, None) => Ok(None),
            (Mode::Apply, None) => {
                bump(&mut self.report.default_redactions, path);
                Ok(None)
            }
            (Mode::Apply, Some(g)) => self.apply(g.rule, value, path),
        }
    }

    /// Remembers the original value of a leaf that an identifier rule removes or replaces,
    /// so that the scrubber can find it in the same record's free text. Category 1 values are
    /// names; categories 2 and 4-18 are other identifiers; dates (3), kept or scrubbed values
    /// and FHIR datatype metadata are not identifiers to look for.
    fn collect(&mut self, rule: &Rule, value: &Value, path: &str) {
        if !rule.method.removes_original() || rule.category == 0 || rule.category == 3 {
            return;
        }
        if self.format.family() == Family::Fhir && fhir_metadata(path) {
            return;
        }
        let Some(text) = scalar_text(value) else {
            return;
        };
        if rule.category == 1 {
            push_known(&mut self.known.names, &text, MIN_KNOWN_NAME_CHARS);
        } else {
            push_known(&mut self.known.identifiers, &text, MIN_KNOWN_ID_CHARS);
        }
    }

    fn apply(
        &mut self,
        rule: &'e Rule,
        value: &Value,
        path: &str,
    ) -> Result<Option<Value>, EngineError> {
        bump_rule(&mut self.report.rules, &rule.id, path);
        let Some(text) = scalar_text(value) else {
            // null: nothing to protect; only `keep` keeps the explicit null.
            return Ok((rule.method == Method::Keep).then_some(Value::Null));
        };
        let settings = &self.engine.policy.settings;
        let out = match &rule.method {
            Method::Keep => return Ok(Some(value.clone())),
            Method::Redact => None,
            Method::Substitute(v) => Some(v.clone()),
            Method::Pseudonymize => Some(self.pseudonymize(&text)),
            Method::Date => {
                let shift = self.dates_shift();
                let out = dates::deidentify(&text, settings.dates, shift);
                if out.is_none() {
                    bump_rule(&mut self.report.invalid, &rule.id, path);
                }
                out
            }
            Method::Age => {
                let shift = self.dates_shift();
                let outcome = dates::age(
                    &text,
                    settings.dates,
                    shift,
                    self.engine.ctx.reference_date,
                    settings.age_cutoff,
                );
                match outcome {
                    AgeOutcome::Value(v) => Some(v),
                    AgeOutcome::Clamped(v) => {
                        bump_rule(&mut self.report.age_clamped, &rule.id, path);
                        Some(v)
                    }
                    AgeOutcome::Invalid => {
                        bump_rule(&mut self.report.invalid, &rule.id, path);
                        None
                    }
                }
            }
            Method::GeneralizeZip => {
                let out = generalize_zip(&text, &settings.restricted_zip3);
                if out.is_none() {
                    bump_rule(&mut self.report.invalid, &rule.id, path);
                }
                out
            }
            Method::Encrypt => Some(self.engine.encrypt(rule, &text)?),
            Method::Scrub => {
                let scrubbed = self.engine.scrubber.scrub(&text, &self.known);
                for (kind, n) in scrubbed.counts {
                    *self.report.scrubbed.entry(kind.to_owned()).or_default() += n;
                }
                Some(scrubbed.text)
            }
        };
        Ok(out.map(Value::String))
    }

    /// `pseudonymize`, with the record's own link and the stage's aliases applied.
    fn pseudonymize(&self, text: &str) -> String {
        let (Some(link), Some(resolve)) = (self.link, self.resolve) else {
            return self.engine.pseudonymize_value(self.format, text);
        };
        let own = Own {
            link,
            patient: self.patient,
            link_is_reference: !pipeline::ResourceType::parse(self.record_type)
                .is_some_and(|t| t.is_shared()),
            bare_is_link: self.record_type == "Patient",
            resolve,
        };
        self.engine.pseudonymize_as(self.format, text, Some(&own))
    }

    /// The shift for this record's patient, or 0 when dates are not shifted.
    fn dates_shift(&mut self) -> i64 {
        match self.engine.policy.settings.dates {
            DateMode::Year => 0,
            DateMode::Shift => self.shift_days(),
        }
    }

    /// Counts every leaf of a subtree no rule looks at (Bundle entry fields the engine does
    /// not know, unknown top-level keys) as a default redaction.
    fn drop_subtree(&mut self, value: &Value, path: &str) {
        if self.mode != Mode::Apply {
            return;
        }
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    self.drop_subtree(v, &join(path, k));
                }
            }
            Value::Array(items) => {
                for v in items {
                    self.drop_subtree(v, path);
                }
            }
            _ => bump(&mut self.report.default_redactions, path),
        }
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline::crypto::Secret;

    fn key(id: &str, byte: u8) -> KeyRef {
        KeyRef {
            id: id.to_owned(),
            key: Secret::new([byte; 32]),
        }
    }

    fn engine_with(policy: Policy) -> Engine {
        Engine::new(
            policy,
            Keys {
                pseudonym: key("p1", 0x22),
                reidentify: Some(key("r1", 0x33)),
            },
            Context {
                tenant: "t1".to_owned(),
                reference_date: NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
            },
        )
        .unwrap()
    }

    #[test]
    fn references_keep_their_shape() {
        let e = engine_with(Policy::safe_harbor());
        let p = e.pseudonym("123");
        let f = |t: &str| e.pseudonymize_value(SourceFormat::FhirNdjson, t);
        assert_eq!(f("Patient/123"), format!("Patient/{p}"));
        assert_eq!(
            f("https://x.example/fhir/Patient/123"),
            format!("Patient/{p}")
        );
        assert_eq!(
            f("Patient/123/_history/2"),
            format!("Patient/{p}/_history/2")
        );
        assert_eq!(f("urn:uuid:123"), format!("urn:uuid:{p}"));
        assert_eq!(f("#123"), format!("#{p}"));
        assert_eq!(f("123"), p);
        assert_eq!(
            f("Patient?identifier=123"),
            e.pseudonym("Patient?identifier=123")
        );
        // HL7 and CSV values are opaque, so PID-3 `A/123` still links to its patient_link.
        assert_eq!(
            e.pseudonymize_value(SourceFormat::Hl7v2, "Patient/123"),
            e.pseudonym("Patient/123")
        );
    }

    #[test]
    fn pseudonyms_are_tenant_and_domain_separated() {
        let e = engine_with(Policy::safe_harbor());
        let mut other = engine_with(Policy::safe_harbor());
        other.ctx.tenant = "t2".to_owned();
        assert_ne!(e.pseudonym("123"), other.pseudonym("123"));
        assert_eq!(e.pseudonym("123").len(), 64);
        let mut shifted = engine_with(Policy::safe_harbor());
        shifted.ctx.tenant = "t".to_owned();
        // Length prefix: (t, "1123") is not (t1, "123").
        assert_ne!(shifted.pseudonym("1123"), e.pseudonym("123"));
    }

    #[test]
    fn date_shift_is_bounded_and_never_zero() {
        let e = engine_with(Policy::safe_harbor());
        let max = i64::from(e.policy.settings.date_shift_max_days);
        let mut signs = (false, false);
        for i in 0..2000 {
            let s = e.date_shift_days(&format!("p{i}"));
            assert!(s != 0 && s.abs() <= max, "{s}");
            if s > 0 {
                signs.0 = true;
            } else {
                signs.1 = true;
            }
        }
        assert_eq!(signs, (true, true));
    }

    #[test]
    fn zips() {
        let restricted = ["036".to_owned()].into_iter().collect();
        let z = |t: &str| generalize_zip(t, &restricted);
        assert_eq!(z("01103").as_deref(), Some("011"));
        assert_eq!(z("03601").as_deref(), Some("000"));
        assert_eq!(z("01103-1234").as_deref(), Some("011"));
        assert_eq!(z("011031234").as_deref(), Some("011"));
        for bad in [
            "V4V 2S7",
            "0110",
            "01103-",
            "0110a",
            "011-031234",
            "1234567",
        ] {
            assert_eq!(z(bad), None, "{bad}");
        }
    }

    #[test]
    fn encrypt_needs_the_key_at_construction() {
        let policy = Policy::from_toml(
            r#"name = "t"
version = "1"
[settings]
dates = "year"
restricted_zip3 = []
[[rule]]
id = "ssn-escrow"
category = 7
formats = ["csv"]
paths = ["SSN"]
method = "encrypt"
"#,
        )
        .unwrap();
        let err = Engine::new(
            policy.clone(),
            Keys {
                pseudonym: key("p1", 0x22),
                reidentify: None,
            },
            Context {
                tenant: "t".into(),
                reference_date: NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
            },
        )
        .unwrap_err();
        assert_eq!(err, EngineError::MissingKey("ssn-escrow".into()));
        assert!(err.to_string().contains("ssn-escrow"));

        let e = engine_with(policy);
        let body = SourceRecordBody {
            patient_link: Some("p".into()),
            content: serde_json::json!({"SSN": "999-12-3456"}),
            original: "999-12-3456".into(),
        };
        let out = e
            .anonymize("csv", "Patient", &body, &Known::default())
            .unwrap();
        let sealed = out.content["SSN"].as_str().unwrap();
        let b64 = sealed.strip_prefix("enc:v1:r1:").unwrap();
        let blob = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let (nonce, ct) = blob.split_at(12);
        let plain = pipeline::crypto::open(&key("r1", 0x33), nonce, ct, b"ssn-escrow").unwrap();
        assert_eq!(plain, b"999-12-3456");
        assert!(pipeline::crypto::open(&key("r1", 0x33), nonce, ct, b"other-rule").is_err());
    }

    #[test]
    fn errors_carry_no_values() {
        let e = engine_with(Policy::safe_harbor());
        let body = |content: Value, link: Option<&str>| SourceRecordBody {
            patient_link: link.map(str::to_owned),
            content,
            original: "Secretname".into(),
        };
        let known = Known::default();
        assert_eq!(
            e.anonymize("csv", "Patient", &body(serde_json::json!({}), None), &known),
            Err(EngineError::NoPatientLink)
        );
        assert_eq!(
            e.anonymize(
                "xml",
                "Patient",
                &body(serde_json::json!({}), Some("1")),
                &known
            ),
            Err(EngineError::UnsupportedFormat("xml".into()))
        );
        let wrong_type = body(
            serde_json::json!({"resourceType": "Secretname", "id": "1"}),
            Some("1"),
        );
        let err = e
            .anonymize("fhir-ndjson", "Patient", &wrong_type, &known)
            .unwrap_err();
        assert!(!err.to_string().contains("Secretname"), "{err}");
        let bad_hl7 = body(
            serde_json::json!({"segments": [{"id": "PID", "fields": [[[["1"]]], "Secretname"]}]}),
            Some("1"),
        );
        let err = e
            .anonymize("hl7v2", "ADT^A01", &bad_hl7, &known)
            .unwrap_err();
        assert!(
            matches!(&err, EngineError::UnexpectedStructure { path, .. } if path == "segments[0].fields[1]")
        );
        assert!(!err.to_string().contains("Secretname"), "{err}");
    }

    /// A patient's own record scrubbed with the identifiers the caller collected for it
    /// (`Scrub::Known`) comes out the same as with the engine's own first pass.
    #[test]
    fn a_record_scrubbed_with_its_own_known_identifiers_is_the_same_as_collected() {
        let e = engine_with(Policy::safe_harbor());
        let body = SourceRecordBody {
            patient_link: Some("pat-1".into()),
            content: serde_json::json!({
                "resourceType": "Observation", "id": "obs-1", "status": "final",
                "subject": {"reference": "Patient/pat-1", "display": "Zelda43 Quigley111"},
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "note": [{"text": "Zelda43 Quigley111 reports dizziness; call pat-1 back."}]
            }),
            original: String::new(),
        };
        let own = e
            .known_identifiers("fhir-ndjson", "Observation", &body, &Known::default())
            .unwrap();
        assert!(
            own.names.iter().any(|n| n.contains("Quigley111")),
            "{own:?}"
        );
        let who = e.identify("fhir-ndjson", "Observation", &body).unwrap();
        let run = |scrub: Scrub<'_>| {
            e.anonymize_as(
                "fhir-ndjson",
                "Observation",
                &body,
                &who,
                "p",
                &|_| None,
                scrub,
            )
            .unwrap()
            .content
        };
        let collected = run(Scrub::Collect(&Known::default()));
        assert_eq!(collected, run(Scrub::Known(own.clone())));
        // The note is kept, scrubbed by the record's own identifiers.
        let text = collected.to_string();
        assert!(text.contains("reports dizziness"), "{text}");
        assert!(
            !text.contains("Quigley111") && !text.contains("pat-1"),
            "{text}"
        );
    }

    #[test]
    fn known_identifiers_come_from_identifier_rules_only() {
        let e = engine_with(Policy::safe_harbor());
        let body = SourceRecordBody {
            patient_link: Some("pat-1".into()),
            content: serde_json::json!({
                "resourceType": "Patient", "id": "pat-1",
                "name": [{"family": "Quigley111", "given": ["Zelda43"], "prefix": ["Mrs."]}],
                "telecom": [{"system": "email", "value": "z@example.org"}],
                "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": "999-45-6789"}],
                "address": [{"line": ["45 Sample Avenue"], "state": "NH", "postalCode": "03601"}],
                "birthDate": "1930-06-15", "gender": "female"
            }),
            original: String::new(),
        };
        let extra = Known {
            names: vec!["Otto12".into(), "Zelda43".into()],
            identifiers: vec!["X".into()],
        };
        let known = e
            .known_identifiers("fhir-ndjson", "Patient", &body, &extra)
            .unwrap();
        assert_eq!(known.names, ["Quigley111", "Zelda43", "Otto12"]);
        for id in [
            "z@example.org",
            "999-45-6789",
            "45 Sample Avenue",
            "03601",
            "pat-1",
        ] {
            assert!(known.identifiers.iter().any(|k| k == id), "{id}: {known:?}");
        }
        // Kept values, dates, name affixes (category 0) and one-character values are not
        // identifiers to look for.
        for not in [
            "NH",
            "female",
            "1930-06-15",
            "Mrs.",
            "X",
            "email",
            "http://hl7.org/fhir/sid/us-ssn",
        ] {
            assert!(
                !known
                    .names
                    .iter()
                    .chain(&known.identifiers)
                    .any(|k| k == not),
                "{not}: {known:?}"
            );
        }
    }

    #[test]
    fn precedence_and_substitute() {
        let policy = Policy::from_toml(
            r#"name = "t"
version = "1"
[settings]
dates = "year"
restricted_zip3 = []
[[rule]]
id = "all-codes"
category = 0
formats = ["csv"]
paths = ["*CODE"]
method = "keep"
[[rule]]
id = "reason-codes"
category = 0
formats = ["csv"]
paths = ["REASON*"]
method = "redact"
[[rule]]
id = "patient-note"
category = 1
formats = ["csv"]
resource_types = ["Patient"]
paths = ["N*"]
method = "substitute"
value = "[removed]"
[[rule]]
id = "note"
category = 0
formats = ["csv"]
paths = ["NOTE"]
method = "keep"
"#,
        )
        .unwrap();
        let e = engine_with(policy);
        let row = serde_json::json!({"CODE": "1", "REASONCODE": "2", "NOTE": "Zelda", "X": "y"});
        let body = SourceRecordBody {
            patient_link: Some("p".into()),
            content: row,
            original: String::new(),
        };
        let known = Known::default();
        let patient = e.anonymize("csv", "Patient", &body, &known).unwrap();
        // A typed glob beats an untyped exact name; between globs, more literal characters
        // win (`REASON*` over `*CODE`).
        assert_eq!(
            patient.content,
            serde_json::json!({"CODE": "1", "NOTE": "[removed]"})
        );
        assert_eq!(patient.report.default_redactions.get("X"), Some(&1));
        let other = e.anonymize("csv", "Encounter", &body, &known).unwrap();
        assert_eq!(
            other.content,
            serde_json::json!({"CODE": "1", "NOTE": "Zelda"})
        );
    }
}
