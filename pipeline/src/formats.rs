//! The source formats: declared once, here, for every stage. Ingestion parses them,
//! anonymization walks them, canonization maps them, and events name them in
//! `source_format`. A `match` over `SourceFormat` is exhaustive, so adding a format fails
//! to compile until every stage handles it (ARCHITECTURE.md, "How to add...").

/// The formats ingestion understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceFormat {
    /// CSV (any delimiter) with a header row: Synthea's export or a mapped layout.
    Csv,
    /// FHIR R4 NDJSON, the Bulk Data `$export` format: one resource per line.
    FhirNdjson,
    /// One FHIR R4 Bundle (`collection`, `transaction` or `batch`) as JSON.
    FhirBundle,
    /// HL7 v2.x messages, optionally in FHS/BHS batches or MLLP frames.
    Hl7v2,
}

/// Formats that carry the same data model, so share a path syntax (anonymization) and a
/// mapping (canonization).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Csv,
    Fhir,
    Hl7,
}

impl SourceFormat {
    pub const ALL: [SourceFormat; 4] = [
        SourceFormat::Csv,
        SourceFormat::FhirNdjson,
        SourceFormat::FhirBundle,
        SourceFormat::Hl7v2,
    ];

    /// The name used in events (`source_format`, `format`), config and commands.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceFormat::Csv => "csv",
            SourceFormat::FhirNdjson => "fhir-ndjson",
            SourceFormat::FhirBundle => "fhir-bundle",
            SourceFormat::Hl7v2 => "hl7v2",
        }
    }

    pub fn family(self) -> Family {
        match self {
            SourceFormat::Csv => Family::Csv,
            SourceFormat::FhirNdjson | SourceFormat::FhirBundle => Family::Fhir,
            SourceFormat::Hl7v2 => Family::Hl7,
        }
    }

    /// The format an event names, if it is one.
    pub fn parse(name: &str) -> Option<SourceFormat> {
        SourceFormat::ALL.into_iter().find(|f| f.as_str() == name)
    }
}

impl std::str::FromStr for SourceFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SourceFormat::parse(s).ok_or_else(|| {
            let names: Vec<&str> = SourceFormat::ALL.iter().map(|f| f.as_str()).collect();
            format!("unknown format {s:?}; expected one of {}", names.join(", "))
        })
    }
}

impl std::fmt::Display for SourceFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused_with_the_list() {
        for f in SourceFormat::ALL {
            assert_eq!(f.as_str().parse::<SourceFormat>(), Ok(f));
        }
        let err = "xml".parse::<SourceFormat>().unwrap_err();
        assert!(
            err.contains("csv, fhir-ndjson, fhir-bundle, hl7v2"),
            "{err}"
        );
    }
}
