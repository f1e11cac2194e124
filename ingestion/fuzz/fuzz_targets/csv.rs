//! Fuzz target: the csv parser must never panic, whatever the bytes.
#![no_main]

use ingestion::formats;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = formats::collect(|s| formats::csv::parse(data, "patients.csv", &formats::csv::CsvOptions::default(), s));
});
