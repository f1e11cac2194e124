//! HL7 v2 messages to FHIR: ADT (A01/A04/A08) → Patient + Encounter, ORU^R01 → one
//! DiagnosticReport per OBR and one Observation per OBX.
//!
//! Content is ingestion's message JSON: `segments[i].fields[n-1]` is field n, a list of
//! repetitions of components of subcomponents, escape sequences already decoded. The
//! code tables (statuses, patient class, value types, coding systems) are in
//! data/hl7v2.toml; this file follows the structure of the messages.
//!
//! Source identities (stable across re-sent and corrected messages, so a correction
//! replaces the preliminary result instead of sitting beside it):
//! - Encounter: `hl7:visit:<PV1-19.1>`; without a visit number,
//!   `hl7:msg:<control id>:<segment position>`.
//! - DiagnosticReport: `hl7:filler:<OBR-3.1>|<OBR-4.1>` (else the placer number OBR-2.1,
//!   else ORC-3/ORC-2, else message + segment position).
//! - Observation: its report's identity + `|OBX:<OBX-1 set id>[.<OBX-4 sub-id>]`, or the
//!   OBX's position in its group when set ids are missing or repeat.
//!
//! Without a control id the message is identified by a digest of its content.

use pipeline::ResourceType;
use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use super::datatypes::{
    code, coding, data_absent, decimal, digest, hl7_date, hl7_date_time, hl7_time, reference,
    sanitize, string,
};
use super::tables::{Hl7Tables, Tables, ValueKind};
use super::{resource_id, Draft, Input, MapError};

const V3_INTERPRETATION: &str =
    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation";
const V2_0078: &str = "http://terminology.hl7.org/CodeSystem/v2-0078";

pub(crate) fn map(input: &Input<'_>, tables: &Tables) -> Result<Vec<Draft>, MapError> {
    let t = &tables.hl7;
    let (message, event) = input
        .record_type
        .split_once('^')
        .unwrap_or((input.record_type, ""));
    let kind = match (message, event) {
        ("ADT", e) if t.adt_events.iter().any(|a| a == e) => Kind::Adt,
        ("ORU", "R01") => Kind::Oru,
        _ => return Err(MapError::unsupported(input.record_type)),
    };
    let msg = Message::read(input)?;
    match kind {
        Kind::Adt => adt(&msg, t),
        Kind::Oru => oru(&msg, t),
    }
}

enum Kind {
    Adt,
    Oru,
}

/// One segment of the content (the shared reader's view).
type Seg<'a> = pipeline::hl7::Segment<'a>;

/// A whole repetition as text: components joined with `^`, as the sender wrote it.
fn rep_text(seg: &Seg<'_>, n: usize, r: usize, component_separator: char) -> Option<String> {
    let comps = seg.comps(n, r);
    let parts: Vec<String> = (1..=comps.len())
        .map(|c| seg.text(n, r, c).unwrap_or_default())
        .collect();
    let joined = parts.join(&component_separator.to_string());
    let trimmed = joined.trim_end_matches(component_separator);
    (!trimmed.trim().is_empty()).then(|| trimmed.to_owned())
}

struct Message<'a> {
    segments: Vec<Seg<'a>>,
    pseudonym: &'a str,
    /// Identifies the message: its control id, else a digest of the content.
    key: String,
    component_separator: char,
    escape: char,
}

impl<'a> Message<'a> {
    fn read(input: &Input<'a>) -> Result<Self, MapError> {
        let read = pipeline::hl7::Message::read(input.content)
            .map_err(|e| MapError::invalid(format!("HL7 content: {e}")))?;
        let segments = read.segments;
        let key = read
            .control_id
            .and_then(string)
            .unwrap_or_else(|| digest(input.content));
        // MSH-2 holds the encoding characters: component, repetition, escape, subcomponent.
        let encoding = segments
            .first()
            .filter(|s| s.id == "MSH")
            .and_then(|msh| msh.text(2, 1, 1))
            .unwrap_or_default();
        let mut enc = encoding.chars();
        let component_separator = enc.next().unwrap_or('^');
        let escape = enc.nth(1).unwrap_or('\\');
        Ok(Message {
            segments,
            pseudonym: input.patient_pseudonym,
            key,
            component_separator,
            escape,
        })
    }

    fn first(&self, id: &str) -> Option<Seg<'a>> {
        self.segments.iter().copied().find(|s| s.id == id)
    }

    /// Results for one patient only: every PID must identify the record's patient
    /// (PID-3.1 is pseudonymized like the patient link), or results would be misfiled.
    fn check_single_patient(&self) -> Result<(), MapError> {
        for pid in self.segments.iter().filter(|s| s.id == "PID") {
            // PID-3.1, as ingestion reads the patient link: the first subcomponent.
            let ids: Vec<&str> = (1..=pid.reps(3).len())
                .filter_map(|r| pid.sub(3, r, 1, 1))
                .map(str::trim)
                .filter(|id| !id.is_empty())
                .collect();
            if !ids.is_empty() && !ids.contains(&self.pseudonym) {
                return Err(MapError::invalid(format!(
                    "PID segment {} identifies another patient than the record's",
                    pid.position
                )));
            }
        }
        Ok(())
    }

    /// The Encounter identity of a PV1: the visit number, else message + position.
    fn visit_identity(&self, pv1: Seg<'_>) -> String {
        match pv1.value(19) {
            Some(visit) if !visit.is_empty() => format!("hl7:visit:{visit}"),
            _ => format!("hl7:msg:{}:{}", self.key, pv1.position),
        }
    }

    /// Text of a string-typed field: repetitions are lines; formatting escapes the
    /// parser left (`\H\`, `\.sp\`, ...) are removed.
    fn lines(&self, seg: Seg<'_>, n: usize) -> Option<String> {
        let lines: Vec<String> = (1..=seg.reps(n).len())
            .map(|r| {
                rep_text(&seg, n, r, self.component_separator)
                    .map(|t| strip_formatting(&t, self.escape))
                    .unwrap_or_default()
            })
            .collect();
        string(lines.join("\n").as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// ADT
// ---------------------------------------------------------------------------------------------

fn adt(msg: &Message<'_>, t: &Hl7Tables) -> Result<Vec<Draft>, MapError> {
    msg.check_single_patient()?;
    let Some(pid) = msg.first("PID") else {
        return Err(MapError::invalid("ADT message has no PID segment"));
    };
    let mut out = vec![patient(pid, t, msg.pseudonym)];
    if let Some(pv1) = msg.first("PV1") {
        let identity = msg.visit_identity(pv1);
        let id = resource_id(ResourceType::Encounter, msg.pseudonym, &identity);
        out.push((ResourceType::Encounter, id, encounter(pv1, t)));
    }
    Ok(out)
}

fn patient(pid: Seg<'_>, t: &Hl7Tables, pseudonym: &str) -> Draft {
    let mut p = Map::new();
    if let Some(g) = pid
        .value(8)
        .and_then(|g| t.gender.get(&g.to_ascii_uppercase()))
    {
        p.insert("gender".into(), json!(g));
    }
    if let Some(b) = pid.value(7).as_deref().and_then(hl7_date) {
        p.insert("birthDate".into(), json!(b));
    }
    if let Some(d) = pid.value(29).as_deref().and_then(hl7_date_time) {
        p.insert("deceasedDateTime".into(), json!(d));
    } else {
        match pid.value(30).map(|v| v.to_ascii_uppercase()).as_deref() {
            Some("Y") => {
                p.insert("deceasedBoolean".into(), json!(true));
            }
            Some("N") => {
                p.insert("deceasedBoolean".into(), json!(false));
            }
            _ => {}
        }
    }
    if let Some(m) = pid
        .value(16)
        .and_then(|m| t.marital_status.get(&m.to_ascii_uppercase()))
    {
        p.insert("maritalStatus".into(), json!({ "coding": [m] }));
    }
    // De-identification leaves state, (3-digit) ZIP and country of each address.
    let addresses: Vec<Value> = (1..=pid.reps(11).len())
        .filter_map(|r| {
            let mut a = Map::new();
            for (c, element) in [(4, "state"), (5, "postalCode"), (6, "country")] {
                if let Some(v) = pid.text(11, r, c).as_deref().and_then(string) {
                    a.insert(element.into(), json!(v));
                }
            }
            (!a.is_empty()).then_some(Value::Object(a))
        })
        .collect();
    if !addresses.is_empty() {
        p.insert("address".into(), Value::Array(addresses));
    }
    (
        ResourceType::Patient,
        super::patient_id(pseudonym),
        Value::Object(p),
    )
}

fn encounter(pv1: Seg<'_>, t: &Hl7Tables) -> Value {
    let mut e = Map::new();
    let class = pv1.value(2).map(|c| c.to_ascii_uppercase());
    let start = pv1.value(44).as_deref().and_then(hl7_date_time);
    let end = pv1.value(45).as_deref().and_then(hl7_date_time);
    // A discharge date means the visit is over; otherwise the patient class says what
    // state a visit of that kind is in when messaged (v2-to-FHIR), and an unknown class
    // leaves the status unknown.
    let status = if end.is_some() {
        Some("finished".to_owned())
    } else {
        class.as_ref().and_then(|c| t.class_status.get(c)).cloned()
    };
    if let Some(s) = status {
        e.insert("status".into(), json!(s));
    }
    if let Some(c) = class.as_ref().and_then(|c| t.patient_class.get(c)) {
        e.insert("class".into(), c.clone());
    }
    let mut period = Map::new();
    if let Some(s) = start {
        period.insert("start".into(), json!(s));
    }
    if let Some(s) = end {
        period.insert("end".into(), json!(s));
    }
    if !period.is_empty() {
        e.insert("period".into(), Value::Object(period));
    }
    let service = pv1
        .value(10)
        .map(|v| v.to_ascii_uppercase())
        .filter(|v| t.hospital_services.contains(v));
    if let Some(c) = service.as_deref().and_then(|v| {
        coding(
            Some("http://terminology.hl7.org/CodeSystem/v2-0069"),
            v,
            None,
        )
    }) {
        e.insert("serviceType".into(), json!({ "coding": [c] }));
    }
    Value::Object(e)
}

// ---------------------------------------------------------------------------------------------
// ORU
// ---------------------------------------------------------------------------------------------

/// An OBR with its OBX segments (each with the NTE segments that follow it).
struct Group<'a> {
    obr: Option<Seg<'a>>,
    /// The ORC before the OBR, if any (order numbers when OBR lacks them).
    orc: Option<Seg<'a>>,
    results: Vec<(Seg<'a>, Vec<Seg<'a>>)>,
}

fn oru(msg: &Message<'_>, t: &Hl7Tables) -> Result<Vec<Draft>, MapError> {
    msg.check_single_patient()?;
    let encounter = msg.first("PV1").and_then(|pv1| {
        pv1.value(19).filter(|v| !v.is_empty()).map(|_| {
            resource_id(
                ResourceType::Encounter,
                msg.pseudonym,
                &msg.visit_identity(pv1),
            )
        })
    });

    let mut groups: Vec<Group<'_>> = Vec::new();
    let mut orc = None;
    for seg in &msg.segments {
        match seg.id {
            "ORC" => orc = Some(*seg),
            "OBR" => groups.push(Group {
                obr: Some(*seg),
                orc: orc.take(),
                results: Vec::new(),
            }),
            "OBX" => {
                if groups.is_empty() {
                    groups.push(Group {
                        obr: None,
                        orc: None,
                        results: Vec::new(),
                    });
                }
                if let Some(g) = groups.last_mut() {
                    g.results.push((*seg, Vec::new()));
                }
            }
            "NTE" => {
                // Notes after an OBX belong to it; notes on the order itself have no
                // place in an R4 DiagnosticReport and are not mapped.
                if let Some((_, notes)) = groups.last_mut().and_then(|g| g.results.last_mut()) {
                    notes.push(*seg);
                }
            }
            _ => {}
        }
    }

    let mut out = Vec::new();
    let mut used = BTreeSet::new();
    for group in &groups {
        let report_identity = unique(&mut used, report_identity(msg, group));
        let set_ids: Vec<Option<String>> = group
            .results
            .iter()
            .map(|(obx, _)| {
                obx.value(1)
                    .filter(|v| !v.is_empty())
                    .map(|set| match obx.value(4) {
                        Some(sub) if !sub.is_empty() => format!("{set}.{sub}"),
                        _ => set,
                    })
            })
            .collect();
        let distinct: BTreeSet<&Option<String>> = set_ids.iter().collect();
        let use_set_ids = distinct.len() == set_ids.len() && set_ids.iter().all(Option::is_some);
        let mut result_ids = Vec::new();
        for (i, ((obx, notes), set_id)) in group.results.iter().zip(&set_ids).enumerate() {
            let suffix = match (use_set_ids, set_id) {
                (true, Some(set)) => set.clone(),
                _ => format!("#{}", i + 1),
            };
            let identity = unique(&mut used, format!("{report_identity}|OBX:{suffix}"));
            let id = resource_id(ResourceType::Observation, msg.pseudonym, &identity);
            let resource = observation(msg, t, group.obr, *obx, notes, encounter.as_deref());
            result_ids.push(id.clone());
            out.push((ResourceType::Observation, id, resource));
        }
        if let Some(obr) = group.obr {
            let id = resource_id(
                ResourceType::DiagnosticReport,
                msg.pseudonym,
                &report_identity,
            );
            let report = report(t, obr, &result_ids, encounter.as_deref());
            // The report first, then its results: readers see the order before the values.
            let at = out.len() - result_ids.len();
            out.insert(at, (ResourceType::DiagnosticReport, id, report));
        }
    }
    Ok(out)
}

/// `identity`, or `identity` + `|dup:n` if an earlier resource of the message has it.
fn unique(used: &mut BTreeSet<String>, identity: String) -> String {
    if used.insert(identity.clone()) {
        return identity;
    }
    let mut n = 2;
    loop {
        let candidate = format!("{identity}|dup:{n}");
        if used.insert(candidate.clone()) {
            return candidate;
        }
        n += 1;
    }
}

fn report_identity(msg: &Message<'_>, group: &Group<'_>) -> String {
    let Some(obr) = group.obr else {
        return format!("hl7:msg:{}:no-order", msg.key);
    };
    let service = obr.value(4).unwrap_or_default();
    let numbered = [
        ("filler", Some(obr), 3),
        ("placer", Some(obr), 2),
        ("filler", group.orc, 3),
        ("placer", group.orc, 2),
    ];
    for (kind, seg, n) in numbered {
        if let Some(number) = seg.and_then(|s| s.value(n)).filter(|v| !v.is_empty()) {
            return format!("hl7:{kind}:{number}|{service}");
        }
    }
    format!("hl7:msg:{}:{}", msg.key, obr.position)
}

fn report(t: &Hl7Tables, obr: Seg<'_>, results: &[String], encounter: Option<&str>) -> Value {
    let mut r = Map::new();
    let status = obr
        .value(25)
        .and_then(|s| t.report_status.get(&s.to_ascii_uppercase()))
        .map_or("unknown", String::as_str);
    r.insert("status".into(), json!(status));
    if let Some(cc) = codeable(t, obr, 4, 1) {
        r.insert("code".into(), cc);
    }
    // OBR-24 is a category only when it is a table 0074 section; the result status is
    // OBR-25's, above.
    let section = obr
        .value(24)
        .and_then(|v| code(&v))
        .map(|v| v.to_ascii_uppercase())
        .filter(|v| t.diagnostic_service_sections.contains(v));
    if let Some(c) = section.as_deref().and_then(|v| {
        coding(
            Some("http://terminology.hl7.org/CodeSystem/v2-0074"),
            v,
            None,
        )
    }) {
        r.insert("category".into(), json!([{ "coding": [c] }]));
    }
    if let Some(e) = encounter {
        r.insert("encounter".into(), reference(ResourceType::Encounter, e));
    }
    if let Some(d) = obr.value(7).as_deref().and_then(hl7_date_time) {
        r.insert("effectiveDateTime".into(), json!(d));
    }
    let refs: Vec<Value> = results
        .iter()
        .map(|id| reference(ResourceType::Observation, id))
        .collect();
    if !refs.is_empty() {
        r.insert("result".into(), Value::Array(refs));
    }
    Value::Object(r)
}

fn observation(
    msg: &Message<'_>,
    t: &Hl7Tables,
    obr: Option<Seg<'_>>,
    obx: Seg<'_>,
    notes: &[Seg<'_>],
    encounter: Option<&str>,
) -> Value {
    let mut o = Map::new();
    let status = obx
        .value(11)
        .and_then(|s| t.observation_status.get(&s.to_ascii_uppercase()))
        .map_or("unknown", String::as_str);
    o.insert("status".into(), json!(status));
    if let Some(cc) = codeable(t, obx, 3, 1) {
        o.insert("code".into(), cc);
    }
    if let Some(e) = encounter {
        o.insert("encounter".into(), reference(ResourceType::Encounter, e));
    }
    let effective = obx
        .value(14)
        .as_deref()
        .and_then(hl7_date_time)
        .or_else(|| {
            obr.and_then(|r| r.value(7))
                .as_deref()
                .and_then(hl7_date_time)
        });
    if let Some(d) = effective {
        o.insert("effectiveDateTime".into(), json!(d));
    }
    match value(msg, t, obx) {
        Ok((element, v)) => {
            o.insert(element.into(), v);
        }
        Err(reason) => {
            o.insert("dataAbsentReason".into(), data_absent(reason));
        }
    }
    let interpretation: Vec<Value> = (1..=obx.reps(8).len())
        .filter_map(|r| obx.text(8, r, 1))
        .filter_map(|flag| {
            let flag = code(&flag)?;
            Some(match t.abnormal_flags.get(&flag) {
                Some(display) => json!({ "coding": [{ "system": V3_INTERPRETATION, "code": flag, "display": display }] }),
                None => json!({ "coding": [{ "system": V2_0078, "code": flag }] }),
            })
        })
        .collect();
    if !interpretation.is_empty() {
        o.insert("interpretation".into(), Value::Array(interpretation));
    }
    if let Some(range) = obx.value(7).and_then(|r| reference_range(&r, unit(t, obx))) {
        o.insert("referenceRange".into(), json!([range]));
    }
    let note: Vec<Value> = notes
        .iter()
        .filter_map(|nte| msg.lines(*nte, 3))
        .map(|text| json!({ "text": text }))
        .collect();
    if !note.is_empty() {
        o.insert("note".into(), Value::Array(note));
    }
    Value::Object(o)
}

/// Observation.value[x] from OBX-2/OBX-5, or the data-absent-reason code explaining why
/// there is none.
fn value(
    msg: &Message<'_>,
    t: &Hl7Tables,
    obx: Seg<'_>,
) -> Result<(&'static str, Value), &'static str> {
    let declared = obx.value(2).filter(|v| !v.is_empty());
    let raw = obx.text(5, 1, 1).unwrap_or_default();
    let kind = match declared {
        Some(vt) => match t.value_types.get(&vt.to_ascii_uppercase()) {
            Some(kind) => *kind,
            None => return Err("unsupported"),
        },
        // No value type: a number is a quantity, anything else text.
        None if decimal(&raw).is_some() => ValueKind::Quantity,
        None => ValueKind::String,
    };
    let has_value = obx
        .reps(5)
        .iter()
        .enumerate()
        .any(|(r, _)| rep_text(&obx, 5, r + 1, msg.component_separator).is_some());
    if !has_value {
        return Err("unknown");
    }
    let quantity = |n: serde_json::Number| {
        let mut q = unit(t, obx);
        q.insert("value".into(), Value::Number(n));
        Value::Object(q)
    };
    match kind {
        ValueKind::Quantity => match decimal(&raw) {
            Some(n) => Ok(("valueQuantity", quantity(n))),
            // Not a number despite the type: keep what was sent, as text.
            None => msg
                .lines(obx, 5)
                .map(|s| ("valueString", json!(s)))
                .ok_or("unknown"),
        },
        ValueKind::StructuredNumeric => Ok(structured_numeric(t, obx)),
        ValueKind::Range => {
            let low = obx.text(5, 1, 1).as_deref().and_then(decimal);
            let high = obx.text(5, 1, 2).as_deref().and_then(decimal);
            if low.is_none() && high.is_none() {
                return Err("error");
            }
            let mut range = Map::new();
            if let Some(n) = low {
                range.insert("low".into(), quantity(n));
            }
            if let Some(n) = high {
                range.insert("high".into(), quantity(n));
            }
            Ok(("valueRange", Value::Object(range)))
        }
        ValueKind::String => msg
            .lines(obx, 5)
            .map(|s| ("valueString", json!(s)))
            .ok_or("unknown"),
        ValueKind::Concept => codeable(t, obx, 5, 1)
            .map(|cc| ("valueCodeableConcept", cc))
            .ok_or("unknown"),
        ValueKind::DateTime => hl7_date_time(&raw)
            .map(|d| ("valueDateTime", json!(d)))
            .ok_or("error"),
        ValueKind::Time => hl7_time(&raw)
            .map(|d| ("valueTime", json!(d)))
            .ok_or("error"),
        ValueKind::CodeString => string(&raw)
            .map(|s| ("valueString", json!(s)))
            .ok_or("unknown"),
    }
}

/// SN: `comparator ^ num1 ^ separator/suffix ^ num2`.
/// `<^5` → Quantity with comparator; `^10^-^20` → Range; `^1^:^128` or `^1^/^2` → Ratio;
/// anything else (`<>`, `2^+`, a range with a comparator) → the text as sent.
fn structured_numeric(t: &Hl7Tables, obx: Seg<'_>) -> (&'static str, Value) {
    let part = |c| {
        obx.text(5, 1, c)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let (cmp, n1, sep, n2) = (part(1), part(2), part(3), part(4));
    // An empty comparator (or "=") means an exact value; an unknown one has no FHIR form.
    let comparator: Option<&str> = if cmp.is_empty() {
        Some("")
    } else {
        t.sn_comparators.get(cmp.as_str()).map(String::as_str)
    };
    let plain = comparator == Some("");
    let units = unit(t, obx);
    let quantity = |n: serde_json::Number, comparator: &str, with_units: bool| {
        let mut q = if with_units {
            units.clone()
        } else {
            Map::new()
        };
        if !comparator.is_empty() {
            q.insert("comparator".into(), json!(comparator));
        }
        q.insert("value".into(), Value::Number(n));
        Value::Object(q)
    };
    let parsed = match (sep.as_str(), decimal(&n1), decimal(&n2), comparator) {
        ("", Some(a), None, Some(c)) if n2.is_empty() => {
            Some(("valueQuantity", quantity(a, c, true)))
        }
        ("-", Some(a), Some(b), _) if plain => Some((
            "valueRange",
            json!({ "low": quantity(a, "", true), "high": quantity(b, "", true) }),
        )),
        (":" | "/", Some(a), Some(b), _) if plain => Some((
            "valueRatio",
            json!({ "numerator": quantity(a, "", false), "denominator": quantity(b, "", false) }),
        )),
        _ => None,
    };
    parsed.unwrap_or_else(|| {
        let text: String = [cmp, n1, sep, n2].concat();
        ("valueString", json!(text))
    })
}

/// OBX-6 → the unit part of a Quantity. A code is only kept with a known system (qty-3).
fn unit(t: &Hl7Tables, obx: Seg<'_>) -> Map<String, Value> {
    let mut q = Map::new();
    let id = obx.text(6, 1, 1).as_deref().and_then(code);
    let text = obx.text(6, 1, 2).as_deref().and_then(string);
    let system = obx.text(6, 1, 3).and_then(|s| system(t, &s));
    if let Some(u) = text.clone().or_else(|| id.clone()) {
        q.insert("unit".into(), json!(u));
    }
    if let (Some(system), Some(id)) = (system, id) {
        q.insert("system".into(), json!(system));
        q.insert("code".into(), json!(id));
    }
    q
}

/// OBX-7 → one referenceRange: `70-99` → low/high, `<5` → high, `>10` → low, else text.
fn reference_range(text: &str, units: Map<String, Value>) -> Option<Value> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let bound = |n: serde_json::Number| {
        let mut q = units.clone();
        q.insert("value".into(), Value::Number(n));
        Value::Object(q)
    };
    let split = text
        .char_indices()
        .skip(1)
        .find(|(_, c)| *c == '-')
        .map(|(i, _)| (&text[..i], &text[i + 1..]));
    if let Some((lo, hi)) = split {
        if let (Some(a), Some(b)) = (decimal(lo), decimal(hi)) {
            return Some(json!({ "low": bound(a), "high": bound(b) }));
        }
    }
    for (prefix, side) in [("<=", "high"), ("<", "high"), (">=", "low"), (">", "low")] {
        if let Some(n) = text.strip_prefix(prefix).and_then(decimal) {
            return Some(json!({ side: bound(n) }));
        }
    }
    Some(json!({ "text": text }))
}

/// A CE/CWE/CNE repetition → CodeableConcept: the primary triple (1-3) and the alternate
/// (4-6) as codings, original text (9) as text; `None` when nothing is usable.
fn codeable(t: &Hl7Tables, seg: Seg<'_>, n: usize, r: usize) -> Option<Value> {
    let mut codings = Vec::new();
    for (c, d, s) in [(1, 2, 3), (4, 5, 6)] {
        let Some(code_text) = seg.text(n, r, c) else {
            continue;
        };
        // A code without a system name is the sender's own (see data/hl7v2.toml).
        let system = match seg.text(n, r, s).and_then(|s| system(t, &s)) {
            Some(system) => system,
            None => t.local_system.clone(),
        };
        let display = seg.text(n, r, d);
        if let Some(coding) = coding(Some(&system), &code_text, display.as_deref()) {
            codings.push(coding);
        }
    }
    let mut cc = Map::new();
    if !codings.is_empty() {
        cc.insert("coding".into(), Value::Array(codings));
    }
    let text = seg.text(n, r, 9).as_deref().and_then(string).or_else(|| {
        // Text alone (no code): keep it as the concept's text.
        cc.is_empty()
            .then(|| seg.text(n, r, 2).as_deref().and_then(string))
            .flatten()
    });
    if let Some(text) = text {
        cc.insert("text".into(), json!(text));
    }
    (!cc.is_empty()).then_some(Value::Object(cc))
}

/// An HL7 coding system name (table 0396) → FHIR system URI (see data/hl7v2.toml).
fn system(t: &Hl7Tables, name: &str) -> Option<String> {
    let name = name.trim();
    if name.is_empty() {
        return None;
    }
    if name.contains("://") || name.starts_with("urn:") {
        return Some(name.to_owned());
    }
    let upper = name.to_ascii_uppercase();
    if let Some(uri) = t.coding_systems.get(&upper) {
        return Some(uri.clone());
    }
    if let Some(table) = upper
        .strip_prefix("HL7")
        .filter(|n| n.len() == 4 && n.bytes().all(|b| b.is_ascii_digit()))
    {
        return Some(format!("http://terminology.hl7.org/CodeSystem/v2-{table}"));
    }
    if t.local_names.iter().any(|l| l.eq_ignore_ascii_case(name))
        || upper.starts_with(&t.local_prefix)
    {
        return Some(t.local_system.clone());
    }
    Some(format!("urn:medpipe:hl7v2-system:{}", sanitize(name)))
}

/// Removes the formatting escapes of FT/TX text that ingestion leaves encoded:
/// `\H\`/`\N\` (highlighting) vanish, `\.br\`, `\.sp\` and `\.sp n\` become line breaks, and
/// `\.in\`, `\.ti\`, `\.sk\`, `\.ce\`, `\.fi\`, `\.nf\` (layout) vanish. Other text is kept.
fn strip_formatting(text: &str, escape: char) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(escape) {
        out.push_str(&rest[..start]);
        let after = &rest[start + escape.len_utf8()..];
        let Some(end) = after.find(escape) else {
            out.push_str(&rest[start..]);
            return out;
        };
        let sequence = &after[..end];
        let replacement = match sequence {
            "H" | "N" | ".fi" | ".nf" | ".ce" => Some(""),
            ".br" => Some("\n"),
            s if s == ".sp"
                || s.strip_prefix(".sp")
                    .is_some_and(|n| n.trim().bytes().all(|b| b.is_ascii_digit())) =>
            {
                Some("\n")
            }
            s if [".in", ".ti", ".sk"].iter().any(|p| {
                s.strip_prefix(p).is_some_and(|n| {
                    let n = n.trim_start_matches(['+', '-']);
                    n.bytes().all(|b| b.is_ascii_digit())
                })
            }) =>
            {
                Some("")
            }
            _ => None,
        };
        match replacement {
            Some(r) => out.push_str(r),
            None => {
                out.push(escape);
                out.push_str(sequence);
                out.push(escape);
            }
        }
        rest = &after[end + escape.len_utf8()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_escapes_are_removed() {
        assert_eq!(strip_formatting(r"a\H\b\N\c", '\\'), "abc");
        assert_eq!(strip_formatting(r"a\.sp\b\.sp2\c", '\\'), "a\nb\nc");
        assert_eq!(strip_formatting(r"\.in+4\x\.ti-2\y", '\\'), "xy");
        assert_eq!(
            strip_formatting(r"keep \Zfoo\ and \ alone", '\\'),
            r"keep \Zfoo\ and \ alone"
        );
    }
}
