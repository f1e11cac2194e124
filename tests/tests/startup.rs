//! Fail fast: a broken policy, mapping table or concept map stops its stage at start with
//! an error naming the file and the line, before the stage reads a record; nothing is
//! dead-lettered record by record.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use tests::Pipeline;

/// Starts `stage` with `env`, waits for it to exit on its own, and returns its log.
fn stops_at_start(p: &mut Pipeline, stage: &str, env: &[(&str, &str)]) -> String {
    p.start(stage, env);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = p.exited(stage) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "{stage} did not stop at start; its log:\n{}",
            p.log(stage)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = p.log(stage);
    assert!(!status.success(), "{stage} exited with success:\n{log}");
    assert!(
        !log.contains("Partitions assigned") && !log.contains("Stage state reloaded"),
        "{stage} got as far as consuming:\n{log}"
    );
    log
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write the broken file");
}

#[test]
fn a_policy_with_a_syntax_error_stops_anonymization_naming_the_file_and_line() {
    let mut p = Pipeline::new();
    let policy = p.dir.path().join("broken-policy.toml");
    write(
        &policy,
        "name = \"broken\"\nversion = \"1\"\n\n[[rule]]\nid = \"r1\"\nmethod = \n",
    );
    let log = stops_at_start(
        &mut p,
        "anonymization",
        &[("MEDPIPE_POLICY_FILE", policy.to_str().expect("utf-8 path"))],
    );
    assert!(log.contains(&policy.display().to_string()), "{log}");
    assert!(log.contains("line 6"), "{log}");
}

#[test]
fn a_broken_mapping_table_stops_canonization_naming_the_file_and_line() {
    let mut p = Pipeline::new();
    let dir = p.dir.path().join("mapping");
    std::fs::create_dir_all(&dir).expect("mapping dir");
    let table = dir.join("hl7v2.toml");
    write(&table, "version = \"2\"\n\n[gender\nF = \"female\"\n");
    let log = stops_at_start(
        &mut p,
        "canonization",
        &[("MEDPIPE_MAPPING_DIR", dir.to_str().expect("utf-8 path"))],
    );
    assert!(log.contains(&table.display().to_string()), "{log}");
    assert!(log.contains("line 3"), "{log}");
}

#[test]
fn a_broken_concept_map_stops_canonization_naming_the_file() {
    let mut p = Pipeline::new();
    let dir = p.dir.path().join("maps");
    std::fs::create_dir_all(&dir).expect("maps dir");
    let map = dir.join("local-lab.v1.toml");
    write(
        &map,
        "id = \"local-lab\"\nversion = \"1\"\neffective_from = 2015-01-01\n\
         source_system = \"urn:medpipe:local-lab\"\ntarget_system = \"http://loinc.org\"\n\n\
         [[map]]\nsource_code = \"GLU\"\ntarget_code = 2345\n",
    );
    let log = stops_at_start(
        &mut p,
        "canonization",
        &[("MEDPIPE_CONCEPT_MAP_DIR", dir.to_str().expect("utf-8 path"))],
    );
    assert!(log.contains(&map.display().to_string()), "{log}");
    assert!(log.contains("line 9"), "{log}");
}
