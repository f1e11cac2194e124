//! Fuzz target: the bundle parser must never panic, whatever the bytes.
#![no_main]

use ingestion::formats;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = formats::collect(|s| formats::fhir::parse_bundle(data, s));
});
