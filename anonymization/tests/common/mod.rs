//! Shared test setup: fixed keys and context, and fixture loading.

#![allow(dead_code)] // each test crate uses a different subset

use std::fs;
use std::path::{Path, PathBuf};

use anonymization::engine::{Anonymized, Context, Engine, Keys};
use anonymization::policy::{DateMode, Policy};
use anonymization::scrub::Known;
use chrono::NaiveDate;
use pipeline::crypto::{KeyRef, Secret};
use pipeline::events::SourceRecordBody;
use serde::Deserialize;

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn key(id: &str, byte: u8) -> KeyRef {
    KeyRef {
        id: id.to_owned(),
        key: Secret::new([byte; 32]),
    }
}

/// The golden setup: pseudonym key of 32 bytes 0x22, tenant `tenant-a`, reference date
/// 2026-01-01.
pub fn engine(policy: Policy) -> Engine {
    engine_with_key(policy, 0x22)
}

pub fn engine_with_key(policy: Policy, byte: u8) -> Engine {
    Engine::new(
        policy,
        Keys {
            pseudonym: key("pseudonym-test", byte),
            reidentify: Some(key("reid-test", 0x33)),
        },
        Context {
            tenant: "tenant-a".to_owned(),
            reference_date: NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
        },
    )
    .unwrap()
}

pub fn shift_policy() -> Policy {
    let mut policy = Policy::safe_harbor();
    policy.settings.dates = DateMode::Shift;
    policy
}

#[derive(Deserialize)]
pub struct KnownJson {
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub identifiers: Vec<String>,
}

#[derive(Deserialize)]
pub struct BodyJson {
    pub patient_link: Option<String>,
    pub content: serde_json::Value,
    pub original: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixture {
    pub source_format: String,
    pub record_type: String,
    pub body: BodyJson,
    #[serde(default)]
    pub dates: Option<String>,
    #[serde(default)]
    pub extra_known: Option<KnownJson>,
    #[serde(default)]
    pub scrubbed: Vec<String>,
    #[serde(default)]
    pub must_not_contain: Vec<String>,
}

impl Fixture {
    pub fn load(path: &Path) -> Fixture {
        let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    pub fn known(&self) -> Known {
        self.extra_known
            .as_ref()
            .map(|k| Known {
                names: k.names.clone(),
                identifiers: k.identifiers.clone(),
            })
            .unwrap_or_default()
    }

    /// Everything the scrubber is expected to have removed: the caller's known values and
    /// the fixture's must-not-contain list.
    pub fn all_known(&self) -> Vec<String> {
        let k = self.known();
        k.names
            .into_iter()
            .chain(k.identifiers)
            .chain(self.must_not_contain.iter().cloned())
            .collect()
    }

    pub fn body(&self) -> SourceRecordBody {
        SourceRecordBody {
            patient_link: self.body.patient_link.clone(),
            content: self.body.content.clone(),
            original: self.body.original.clone(),
        }
    }
}

pub fn anonymize_fixture(fixture: &Fixture) -> (Engine, Anonymized) {
    let policy = match fixture.dates.as_deref() {
        None | Some("year") => Policy::safe_harbor(),
        Some("shift") => shift_policy(),
        Some(other) => panic!("unknown dates override {other}"),
    };
    let engine = engine(policy);
    let out = engine
        .anonymize(
            &fixture.source_format,
            &fixture.record_type,
            &fixture.body(),
            &fixture.known(),
        )
        .unwrap();
    (engine, out)
}
