//! `docs/SAFE-HARBOR.md` must describe the shipped policy as it is: its category table is
//! compared with one generated from `policies/safe-harbor.toml`, so a rule cannot be added,
//! removed or recategorised without the compliance document changing with it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::fs;
use std::path::Path;

use anonymization::policy::{Method, Policy};

/// The identifier kinds of 45 CFR 164.514(b)(2)(i)(A)-(R), in order.
const CATEGORIES: [&str; 19] = [
    "Not an identifier (kept, or removed for another reason)",
    "(A) Names",
    "(B) Geographic subdivisions smaller than a state (ZIP3 exception)",
    "(C) Dates (except year) related to the individual; ages over 89",
    "(D) Telephone numbers",
    "(E) Fax numbers",
    "(F) Email addresses",
    "(G) Social Security numbers",
    "(H) Medical record numbers",
    "(I) Health plan beneficiary numbers",
    "(J) Account numbers",
    "(K) Certificate/licence numbers",
    "(L) Vehicle identifiers and serial numbers, licence plates",
    "(M) Device identifiers and serial numbers",
    "(N) Web URLs",
    "(O) IP addresses",
    "(P) Biometric identifiers (finger and voice prints)",
    "(Q) Full-face photographs and comparable images",
    "(R) Any other unique identifying number, characteristic or code",
];

fn category_table(policy: &Policy) -> String {
    let mut out = String::from("| # | Identifier | Rules (method) |\n|---|---|---|\n");
    for (category, name) in CATEGORIES.iter().enumerate() {
        let rules: Vec<String> = policy
            .rules
            .iter()
            .filter(|r| usize::from(r.category) == category)
            .map(|r| format!("`{}` ({})", r.id, r.method))
            .collect();
        out.push_str(&format!("| {category} | {name} | {} |\n", rules.join(", ")));
    }
    out
}

fn doc() -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/SAFE-HARBOR.md"))
        .unwrap()
}

#[test]
fn category_table_matches_the_policy() {
    let table = category_table(&Policy::safe_harbor());
    assert!(
        doc().contains(&table),
        "docs/SAFE-HARBOR.md must contain this table (generated from the policy):\n\n{table}"
    );
}

#[test]
fn every_method_is_documented() {
    let doc = doc();
    for m in Method::NAMES {
        assert!(
            doc.contains(&format!("| `{m}` |")),
            "method {m} is not in the method table"
        );
    }
    assert!(doc.contains("NOT Safe Harbor"));
}
