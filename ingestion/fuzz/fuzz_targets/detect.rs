//! Fuzz target: the detect parser must never panic, whatever the bytes.
#![no_main]

use ingestion::formats;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = formats::detect::detect(data, "input.dat");
});
