//! Synthetic sample files in every format, for tests, the demo and benchmarks.
//!
//! Every person is invented: ids embed a caller-chosen tag so files from different runs
//! differ (and hash differently), SSNs use the never-issued 999 area, and names such as
//! `Given00042x` are easy to search for in leak checks. Writers stream, so a benchmark
//! can produce a million records without holding them.

use std::io::{self, Write};

use crate::formats::SourceFormat;

/// One invented patient. Every field is an identifier a leak check can look for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    pub id: String,
    pub mrn: String,
    pub ssn: String,
    pub first: String,
    pub last: String,
    /// `YYYY-MM-DD`.
    pub birth_date: String,
    pub address: String,
    pub phone: String,
    pub email: String,
    pub gender: &'static str,
}

impl Person {
    pub fn new(i: usize, tag: &str) -> Self {
        Person {
            id: format!("pat-{i:06}-{tag}"),
            mrn: format!("MRN{i:07}{tag}"),
            ssn: format!("999-{:02}-{:04}", i % 100, i % 10000),
            first: format!("Given{i:05}x"),
            last: format!("Family{i:05}y"),
            birth_date: format!("19{:02}-0{}-1{}", 40 + i % 60, 1 + i % 9, i % 10),
            address: format!("{} Synthetic Lane {i}", 100 + i),
            phone: format!("555-01{:02}-{:04}", i % 100, i % 10000),
            email: format!("given{i:05}.family@example.org"),
            gender: if i.is_multiple_of(2) {
                "female"
            } else {
                "male"
            },
        }
    }

    /// Values that must never appear in clear outside ingestion's sealed payloads.
    pub fn identifiers(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.mrn.clone(),
            self.ssn.clone(),
            self.first.clone(),
            self.last.clone(),
            self.address.clone(),
            self.phone.clone(),
            self.email.clone(),
        ]
    }

    fn hl7_birth(&self) -> String {
        self.birth_date.replace('-', "")
    }
}

/// Writes a file of exactly `records` records in `format`. The i-th patient is
/// `Person::new(i, tag)`; FHIR and HL7 files alternate a patient record and a clinical
/// record about the same patient, so `records` covers `records.div_ceil(2)` people.
pub fn write(
    format: SourceFormat,
    out: &mut impl Write,
    records: usize,
    tag: &str,
) -> io::Result<()> {
    match format {
        SourceFormat::Csv => write_patients_csv(out, records, tag),
        SourceFormat::FhirNdjson => write_ndjson(out, records, tag),
        SourceFormat::FhirBundle => write_bundle(out, records, tag),
        SourceFormat::Hl7v2 => write_hl7(out, records, tag),
    }
}

/// The people a file of `records` records in `format` mentions.
pub fn people(format: SourceFormat, records: usize, tag: &str) -> Vec<Person> {
    let n = match format {
        SourceFormat::Csv => records,
        _ => records.div_ceil(2),
    };
    (0..n).map(|i| Person::new(i, tag)).collect()
}

/// Synthea's `patients.csv` layout.
pub fn write_patients_csv(out: &mut impl Write, n: usize, tag: &str) -> io::Result<()> {
    writeln!(out, "Id,BIRTHDATE,DEATHDATE,SSN,DRIVERS,PASSPORT,PREFIX,FIRST,LAST,SUFFIX,MAIDEN,MARITAL,RACE,ETHNICITY,GENDER,BIRTHPLACE,ADDRESS,CITY,STATE,COUNTY,ZIP,LAT,LON,HEALTHCARE_EXPENSES,HEALTHCARE_COVERAGE")?;
    for i in 0..n {
        let p = Person::new(i, tag);
        writeln!(
            out,
            "{},{},,{},S99{i:06},,Mx.,{},{},,,S,white,nonhispanic,{},Springfield Massachusetts US,\"{}\",Springfield,Massachusetts,Hampden County,01{:03},42.1,-72.5,1000.0,500.0",
            p.id, p.birth_date, p.ssn, p.first, p.last,
            if p.gender == "female" { "F" } else { "M" },
            p.address, i % 1000
        )?;
    }
    Ok(())
}

pub fn patient_resource(p: &Person) -> serde_json::Value {
    serde_json::json!({
        "resourceType": "Patient",
        "id": p.id,
        "identifier": [
            {"system": "https://example.org/mrn", "value": p.mrn},
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": p.ssn}
        ],
        "name": [{"use": "official", "family": p.last, "given": [p.first]}],
        "telecom": [{"system": "phone", "value": p.phone}, {"system": "email", "value": p.email}],
        "gender": p.gender,
        "birthDate": p.birth_date,
        "address": [{"line": [p.address], "city": "Springfield", "state": "MA", "postalCode": "01103"}]
    })
}

pub fn observation_resource(p: &Person, i: usize, subject: &str) -> serde_json::Value {
    serde_json::json!({
        "resourceType": "Observation",
        "id": format!("obs-{i:07}-{}", p.id),
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose"}]},
        "subject": {"reference": subject},
        "effectiveDateTime": format!("2020-0{}-1{}T08:30:00Z", 1 + i % 9, i % 10),
        "valueQuantity": {"value": 70 + (i % 60), "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}
    })
}

fn write_ndjson(out: &mut impl Write, records: usize, tag: &str) -> io::Result<()> {
    for r in 0..records {
        let p = Person::new(r / 2, tag);
        let resource = if r.is_multiple_of(2) {
            patient_resource(&p)
        } else {
            observation_resource(&p, r, &format!("Patient/{}", p.id))
        };
        serde_json::to_writer(&mut *out, &resource)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

fn write_bundle(out: &mut impl Write, records: usize, tag: &str) -> io::Result<()> {
    out.write_all(
        b"{\n  \"resourceType\": \"Bundle\",\n  \"type\": \"transaction\",\n  \"entry\": [\n",
    )?;
    for r in 0..records {
        let p = Person::new(r / 2, tag);
        let url = format!("urn:uuid:{}", p.id);
        let (full_url, resource, kind) = if r.is_multiple_of(2) {
            (url.clone(), patient_resource(&p), "Patient")
        } else {
            (
                format!("urn:uuid:obs-{r}-{}", p.id),
                observation_resource(&p, r, &url),
                "Observation",
            )
        };
        let entry = serde_json::json!({
            "fullUrl": full_url,
            "resource": resource,
            "request": {"method": "POST", "url": kind}
        });
        if r > 0 {
            out.write_all(b",\n")?;
        }
        out.write_all(b"    ")?;
        serde_json::to_writer(&mut *out, &entry)?;
    }
    out.write_all(b"\n  ]\n}\n")
}

fn write_hl7(out: &mut impl Write, records: usize, tag: &str) -> io::Result<()> {
    for r in 0..records {
        let p = Person::new(r / 2, tag);
        let sex = if p.gender == "female" { "F" } else { "M" };
        let pid = format!(
            "PID|1||{}^^^HOSP^MR~{}^^^SSA^SS||{}^{}||{}|{sex}|||{}^^Springfield^MA^01103||{}",
            p.mrn,
            p.ssn,
            p.last,
            p.first,
            p.hl7_birth(),
            p.address,
            p.phone
        );
        if r.is_multiple_of(2) {
            write!(
                out,
                "MSH|^~\\&|SYNTH|HOSP|MEDPIPE|DEST|20200101120000||ADT^A01|MSG{r:08}|P|2.5.1\r\
                 EVN|A01|20200101120000\r{pid}\rPV1|1|I|WARD^1^1\r"
            )?;
        } else {
            write!(
                out,
                "MSH|^~\\&|SYNTH|LAB|MEDPIPE|DEST|20200101130000||ORU^R01|MSG{r:08}|P|2.5.1\r\
                 {pid}\rOBR|1||LAB{r}|2339-0^Glucose^LN\r\
                 OBX|1|NM|2339-0^Glucose^LN||{}|mg/dL|70-99|N|||F\r\
                 OBX|2|ST|8251-1^Comment^LN||fasting sample||||||F\r\
                 OBX|3|CE|5778-6^Color^LN||Y^Yellow^HL70000||||||F\r",
                70 + r % 60
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn people_are_distinct_and_tagged() {
        let a = Person::new(1, "t1");
        assert_ne!(a, Person::new(2, "t1"));
        assert_ne!(a.id, Person::new(1, "t2").id);
        assert!(a.ssn.starts_with("999-"));
        assert_eq!(people(SourceFormat::Hl7v2, 5, "t").len(), 3);
        assert_eq!(people(SourceFormat::Csv, 5, "t").len(), 5);
    }
}
