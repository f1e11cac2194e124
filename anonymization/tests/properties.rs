//! Property tests over generated people in every format: determinism for a fixed key,
//! key-dependence of pseudonyms, one date shift per patient (intervals preserved), and no
//! identifier of the input anywhere in the serialized output.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use anonymization::engine::{Anonymized, Engine};
use anonymization::policy::Policy;
use anonymization::scrub::Known;
use chrono::{Datelike, NaiveDate, NaiveDateTime, Timelike};
use pipeline::events::SourceRecordBody;
use proptest::prelude::*;
use serde_json::{json, Value};

use common::{engine, engine_with_key, shift_policy};

/// An invented person; every field is an identifier the output must not contain.
#[derive(Debug, Clone)]
struct Person {
    id: String,
    mrn: String,
    ssn: String,
    first: String,
    last: String,
    phone: String,
    email: String,
    street: String,
    birth: NaiveDate,
}

impl Person {
    fn identifiers(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.mrn.clone(),
            self.ssn.clone(),
            self.first.clone(),
            self.last.clone(),
            self.phone.clone(),
            self.email.clone(),
            self.street.clone(),
            self.birth.format("%Y-%m-%d").to_string(),
            self.birth.format("%Y%m%d").to_string(),
        ]
    }

    fn known(&self) -> Known {
        Known {
            names: vec![self.first.clone(), self.last.clone()],
            identifiers: vec![self.mrn.clone()],
        }
    }
}

fn date(from: i32, to: i32) -> impl Strategy<Value = NaiveDate> {
    (from..to, 1u32..=12, 1u32..=28).prop_map(|(y, m, d)| NaiveDate::from_ymd_opt(y, m, d).unwrap())
}

fn person() -> impl Strategy<Value = Person> {
    (
        "[a-z0-9]{10}",
        "[0-9]{7}",
        ("[0-9]{3}", "[0-9]{2}", "[0-9]{4}"),
        "[A-Z][a-z]{3,8}[0-9]{1,3}",
        "[A-Z][a-z]{3,8}[0-9]{1,3}",
        ("[0-9]{3}", "[0-9]{4}"),
        ("[a-z]{3,8}", "[a-z]{3,8}"),
        ("[1-9][0-9]{0,3}", "[A-Z][a-z]{4,9}"),
        date(1920, 2020),
    )
        .prop_map(
            |(id, mrn, (a, b, c), first, last, (p1, p2), (u, v), (no, street), birth)| Person {
                id: format!("pat-{id}"),
                mrn: format!("MRN{mrn}"),
                ssn: format!("{a}-{b}-{c}"),
                first,
                last,
                phone: format!("555-{p1}-{p2}"),
                email: format!("{u}.{v}@mail.example"),
                street: format!("{no} {street} Street"),
                birth,
            },
        )
}

fn body(link: &str, content: Value) -> SourceRecordBody {
    SourceRecordBody {
        patient_link: Some(link.to_owned()),
        original: content.to_string(),
        content,
    }
}

fn fhir_patient(p: &Person) -> Value {
    json!({
        "resourceType": "Patient",
        "id": p.id,
        "identifier": [
            {"type": {"coding": [{"code": "MR"}]}, "system": "https://h.example/mrn", "value": p.mrn},
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": p.ssn}
        ],
        "name": [{"family": p.last, "given": [p.first], "text": format!("{} {}", p.first, p.last)}],
        "telecom": [{"system": "phone", "value": p.phone}, {"system": "email", "value": p.email}],
        "gender": "female",
        "birthDate": p.birth.format("%Y-%m-%d").to_string(),
        "address": [{"line": [p.street], "city": "Springfield", "state": "MA", "postalCode": "01103"}],
        "text": {"div": format!("<div>{} {} {}</div>", p.first, p.last, p.mrn)}
    })
}

fn fhir_observation(p: &Person, obs: &str, when: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "id": obs,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose"}]},
        "subject": {"reference": format!("Patient/{}", p.id), "display": format!("{} {}", p.first, p.last)},
        "effectiveDateTime": when,
        "valueQuantity": {"value": 99, "unit": "mg/dL"},
        "note": [{"text": format!("{} {} (MRN {}) called from {}", p.first, p.last, p.mrn, p.phone)}]
    })
}

const CSV_HEADER: [&str; 10] = [
    "Id",
    "BIRTHDATE",
    "SSN",
    "FIRST",
    "LAST",
    "ADDRESS",
    "CITY",
    "STATE",
    "ZIP",
    "GENDER",
];

fn csv_patient(p: &Person) -> Value {
    let values = [
        p.id.clone(),
        p.birth.format("%Y-%m-%d").to_string(),
        p.ssn.clone(),
        p.first.clone(),
        p.last.clone(),
        p.street.clone(),
        "Springfield".into(),
        "Massachusetts".into(),
        "01103".into(),
        "F".into(),
    ];
    Value::Object(
        CSV_HEADER
            .iter()
            .zip(values)
            .map(|(k, v)| ((*k).to_owned(), Value::String(v)))
            .collect(),
    )
}

/// The ingestion layout of an HL7 message without escape sequences.
fn hl7(lines: &[String]) -> Value {
    let mut segments = Vec::new();
    for line in lines {
        let mut parts = line.split('|');
        let id = parts.next().unwrap();
        let mut fields = Vec::new();
        if id == "MSH" {
            fields.push(json!([[["|"]]]));
            fields.push(json!([[[parts.next().unwrap()]]]));
        }
        for f in parts {
            if f.is_empty() {
                fields.push(json!([]));
                continue;
            }
            let reps: Vec<Value> = f
                .split('~')
                .map(|r| {
                    json!(r
                        .split('^')
                        .map(|c| c.split('&').collect::<Vec<_>>())
                        .collect::<Vec<_>>())
                })
                .collect();
            fields.push(Value::Array(reps));
        }
        segments.push(json!({"id": id, "fields": fields}));
    }
    json!({"message_type": "ADT^A01", "control_id": "C1", "version": "2.5.1", "segments": segments})
}

fn hl7_adt(p: &Person) -> Value {
    hl7(&[
        "MSH|^~\\&|APP|FAC|R|RF|20250101120000||ADT^A01|C1|P|2.5.1".to_owned(),
        format!(
            "PID|1||{}^^^H^MR~{}^^^SSA^SS||{}^{}||{}|F|||{}^^Springfield^MA^01103||{}^PRN^PH~^NET^X^{}||||||{}",
            p.mrn,
            p.ssn,
            p.last,
            p.first,
            p.birth.format("%Y%m%d"),
            p.street,
            p.phone,
            p.email,
            p.ssn
        ),
        format!("NK1|1|{}^Kin|SPO|{}|{}", p.last, p.street, p.phone),
        format!(
            "OBX|1|ST|8251-1^Comment^LN||{} {} {}||||||F|||20250101",
            p.first, p.last, p.mrn
        ),
        format!("NTE|1|L|Call {} at {}", p.first, p.phone),
    ])
}

/// Every record kind for one person: (format, record type, link, content).
fn records(p: &Person) -> Vec<(&'static str, &'static str, String, Value)> {
    vec![
        ("fhir-ndjson", "Patient", p.id.clone(), fhir_patient(p)),
        (
            "fhir-ndjson",
            "Observation",
            p.id.clone(),
            fhir_observation(p, "o1", "2024-05-06T07:08:09Z"),
        ),
        (
            "fhir-bundle",
            "Patient",
            p.id.clone(),
            json!({"fullUrl": format!("urn:uuid:{}", p.id), "resource": fhir_patient(p),
                   "request": {"method": "PUT", "url": format!("Patient/{}", p.id)}}),
        ),
        ("csv", "Patient", p.id.clone(), csv_patient(p)),
        ("hl7v2", "ADT^A01", p.mrn.clone(), hl7_adt(p)),
    ]
}

fn run(engine: &Engine, p: &Person) -> Vec<Anonymized> {
    records(p)
        .into_iter()
        .map(|(format, rt, link, content)| {
            engine
                .anonymize(format, rt, &body(&link, content), &p.known())
                .unwrap()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn output_is_deterministic_for_a_fixed_key(p in person()) {
        let a = run(&engine(Policy::safe_harbor()), &p);
        let b = run(&engine(Policy::safe_harbor()), &p);
        prop_assert_eq!(a, b);
        let a = run(&engine(shift_policy()), &p);
        let b = run(&engine(shift_policy()), &p);
        prop_assert_eq!(a, b);
    }

    #[test]
    fn another_key_gives_other_pseudonyms(p in person()) {
        let a = run(&engine_with_key(Policy::safe_harbor(), 0x22), &p);
        let b = run(&engine_with_key(Policy::safe_harbor(), 0x44), &p);
        for (x, y) in a.iter().zip(&b) {
            prop_assert_ne!(&x.patient_pseudonym, &y.patient_pseudonym);
            prop_assert_ne!(&x.content, &y.content);
        }
        // The Patient resource id is the patient pseudonym under either key.
        prop_assert_eq!(&a[0].content["id"], &json!(a[0].patient_pseudonym));
        prop_assert_eq!(&b[0].content["id"], &json!(b[0].patient_pseudonym));
    }

    #[test]
    fn no_identifier_reaches_the_output(p in person()) {
        for policy in [Policy::safe_harbor(), shift_policy()] {
            let engine = engine(policy);
            for out in run(&engine, &p) {
                let text = serde_json::to_string(&out.content).unwrap()
                    + &serde_json::to_string(&out.report).unwrap();
                for id in p.identifiers() {
                    prop_assert!(!text.contains(&id), "{} leaked: {}", id, text);
                }
            }
        }
    }

    #[test]
    fn one_shift_per_patient_keeps_intervals(
        p in person(),
        d1 in date(1990, 2025),
        d2 in date(1990, 2025),
        h in 0u32..24,
    ) {
        let engine = engine(shift_policy());
        let patient = engine.pseudonym(&p.id);
        let shift = engine.date_shift_days(&patient);
        prop_assert!(shift != 0 && shift.abs() <= i64::from(engine.policy().settings.date_shift_max_days));

        let t1 = format!("{}T{h:02}:30:00+02:00", d1.format("%Y-%m-%d"));
        let t2 = d2.format("%Y-%m-%d").to_string();
        let o1 = engine.anonymize("fhir-ndjson", "Observation", &body(&p.id, fhir_observation(&p, "a", &t1)), &p.known()).unwrap();
        let o2 = engine.anonymize("fhir-ndjson", "Observation", &body(&p.id, fhir_observation(&p, "b", &t2)), &p.known()).unwrap();
        let row = json!({"DATE": t1, "PATIENT": p.id, "CODE": "8302-2"});
        let o3 = engine.anonymize("csv", "Observation", &body(&p.id, row), &Known::default()).unwrap();
        let msg = hl7(&[
            "MSH|^~\\&|A|B|C|D|20250101||ORU^R01|C9|P|2.5.1".to_owned(),
            format!("PID|1||{}^^^H^MR", p.id),
            format!("OBX|1|NM|2339-0^Glucose^LN||7|mg/dL|||||F|||{}{h:02}30", d2.format("%Y%m%d")),
        ]);
        let o4 = engine.anonymize("hl7v2", "ORU^R01", &body(&p.id, msg), &Known::default()).unwrap();
        for o in [&o1, &o2, &o3, &o4] {
            prop_assert_eq!(&o.patient_pseudonym, &patient);
        }

        let iso = |v: &Value| NaiveDateTime::parse_from_str(&v.as_str().unwrap()[..19], "%Y-%m-%dT%H:%M:%S").unwrap();
        let s1 = iso(&o1.content["effectiveDateTime"]);
        prop_assert_eq!(&o1.content["effectiveDateTime"].as_str().unwrap()[10..], &t1[10..], "time and zone kept");
        let s2 = NaiveDate::parse_from_str(o2.content["effectiveDateTime"].as_str().unwrap(), "%Y-%m-%d").unwrap();
        let s3 = iso(&o3.content["DATE"]);
        let dtm = o4.content["segments"][2]["fields"][13][0][0][0].as_str().unwrap();
        let s4 = NaiveDate::parse_from_str(&dtm[..8], "%Y%m%d").unwrap();
        prop_assert_eq!(&dtm[8..], format!("{h:02}30"));

        prop_assert_eq!((s1.date() - d1).num_days(), shift);
        prop_assert_eq!((s2 - d2).num_days(), shift);
        prop_assert_eq!((s3.date() - d1).num_days(), shift);
        prop_assert_eq!((s4 - d2).num_days(), shift);
        prop_assert_eq!((s2 - s1.date()).num_days(), (d2 - d1).num_days());
        prop_assert_eq!(s1.hour(), h);
    }

    #[test]
    fn years_and_ages_in_year_mode(p in person()) {
        let engine = engine(Policy::safe_harbor());
        let out = engine.anonymize("fhir-ndjson", "Patient", &body(&p.id, fhir_patient(&p)), &Known::default()).unwrap();
        let birth = out.content["birthDate"].as_str().unwrap();
        let age = 2026 - p.birth.year() - i32::from((1, 1) < (p.birth.month(), p.birth.day()));
        let expected = if age > 89 { "1936".to_owned() } else { p.birth.year().to_string() };
        prop_assert_eq!(birth, expected.as_str());
    }
}
