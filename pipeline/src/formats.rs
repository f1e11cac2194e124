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

/// The JSON shape in which one record of a format travels (sealed in
/// `SourceRecordIngested`, in the clear in `RecordAnonymized`): what anonymization walks
/// and canonization maps. A new format of an existing shape needs no code in either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordShape {
    /// One CSV row: `{column: cell}`.
    CsvRow,
    /// One FHIR resource.
    FhirResource,
    /// One Bundle entry: `{fullUrl, resource, request}`.
    FhirBundleEntry,
    /// One HL7 v2 message (`pipeline::hl7::Message`).
    Hl7Message,
}

impl RecordShape {
    pub fn family(self) -> Family {
        match self {
            RecordShape::CsvRow => Family::Csv,
            RecordShape::FhirResource | RecordShape::FhirBundleEntry => Family::Fhir,
            RecordShape::Hl7Message => Family::Hl7,
        }
    }
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

    pub fn shape(self) -> RecordShape {
        match self {
            SourceFormat::Csv => RecordShape::CsvRow,
            SourceFormat::FhirNdjson => RecordShape::FhirResource,
            SourceFormat::FhirBundle => RecordShape::FhirBundleEntry,
            SourceFormat::Hl7v2 => RecordShape::Hl7Message,
        }
    }

    pub fn family(self) -> Family {
        self.shape().family()
    }

    /// The usual file extension of the format (without the dot).
    pub fn extension(self) -> &'static str {
        match self {
            SourceFormat::Csv => "csv",
            SourceFormat::FhirNdjson => "ndjson",
            SourceFormat::FhirBundle => "json",
            SourceFormat::Hl7v2 => "hl7",
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
