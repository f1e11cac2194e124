//! Normalises lab and vital-sign units to UCUM and converts values to one canonical unit per analyte.
//!
//! The table is data, `units/ucum.toml`, embedded at compile time; every factor in it
//! cites its source. Rules, in order:
//!
//! 1. The unit spelling is looked up (trimmed, case-insensitive) in the spelling
//!    table. A spelling the table does not know is [`UnitStatus::Unknown`]: value and
//!    unit come back exactly as given, with no UCUM system, and nothing is guessed.
//! 2. The class is the one listing the LOINC code; with no code, or a code no class
//!    lists, it is the generic (mass, length, temperature) class that knows the unit.
//! 3. If the class has a conversion from the unit, the value is converted to the
//!    class's canonical unit ([`UnitStatus::Converted`]). If the unit already is the
//!    canonical one, or there is no class, the value is kept and only the spelling is
//!    normalised ([`UnitStatus::Unchanged`] / [`UnitStatus::Respelled`]). A known unit
//!    the class cannot convert keeps its value and is flagged
//!    ([`UnitStatus::NoConversion`]).
//!
//! Converted values are rounded to `max(4, significant digits of the input)`
//! significant digits: four is what lab analysers report, and an input written with
//! more digits keeps them. The rounding is decimal (through the shortest `f64`
//! rendering), so 4.995 comes back as 4.995 and not 4.99500000001. Values that are
//! not converted are returned bit for bit.
//!
//! Canonical units are SI: mmol/L for glucose and lipids, umol/L for creatinine, kg,
//! cm, Cel. Converting a US mg/dL result changes its LOINC *property* (a
//! `[Mass/volume]` code such as 2345-7 now holds a `[Moles/volume]` value), so
//! [`Normalized::recoded_loinc`] gives the matching `[Moles/volume]` code where the
//! table knows it (2345-7 -> 14749-6). Callers should emit that code, or keep the
//! original unit if they must keep the original code.

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use serde::Deserialize;

/// The UCUM code system URI for FHIR `Quantity.system`.
pub const UCUM_SYSTEM: &str = "http://unitsofmeasure.org";

/// Significant digits kept at least in a converted value.
const MIN_SIGNIFICANT_DIGITS: usize = 4;
/// More digits than an `f64` carries reliably are never kept.
const MAX_SIGNIFICANT_DIGITS: usize = 15;

const EMBEDDED_TABLE: &str = include_str!("../units/ucum.toml");

static EMBEDDED: LazyLock<Result<UnitTable, UnitsError>> =
    LazyLock::new(|| UnitTable::from_toml(EMBEDDED_TABLE));

/// Why a unit table cannot be loaded. Table data only: never record values.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UnitsError {
    #[error("units table is not valid TOML or has an unknown key: {0}")]
    Parse(String),
    #[error("units table: spelling {spelling:?} is claimed by both {first:?} and {second:?} (spellings are matched ignoring case)")]
    SpellingCollision {
        spelling: String,
        first: String,
        second: String,
    },
    #[error(
        "units table: class {class:?} uses unit {unit:?}, which no [[spelling]] entry defines"
    )]
    UndefinedUnit { class: String, unit: String },
    #[error("units table: class id {0:?} appears twice")]
    DuplicateClass(String),
    #[error(
        "units table: LOINC code {loinc:?} is listed by both class {first:?} and class {second:?}"
    )]
    LoincInTwoClasses {
        loinc: String,
        first: String,
        second: String,
    },
    #[error("units table: unit {unit:?} belongs to both generic classes {first:?} and {second:?}")]
    UnitInTwoGenericClasses {
        unit: String,
        first: String,
        second: String,
    },
    #[error(
        "units table: class {class:?} converts from {unit:?} twice, or from its own canonical unit"
    )]
    DuplicateConversion { class: String, unit: String },
    #[error("units table: class {class:?} has a non-finite or zero factor for {unit:?}")]
    BadFactor { class: String, unit: String },
    #[error("units table: class {class:?} recodes LOINC {loinc:?}, which it does not list")]
    RecodeOutsideClass { class: String, loinc: String },
}

/// What [`normalize`] did to a quantity. A closed set: callers match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitStatus {
    /// The unit was already the UCUM code and no conversion applied.
    Unchanged,
    /// Only the spelling changed (e.g. "mg/dl" to "mg/dL"); the value is as given.
    Respelled,
    /// The value was converted to the class's canonical unit.
    Converted,
    /// The unit is known UCUM, but the analyte's class has no conversion from it to its
    /// canonical unit (e.g. glucose in g/L): value kept, spelling normalised. Worth a
    /// look by a person; never converted by guess.
    NoConversion,
    /// The unit spelling is not in the table: value and unit kept exactly as given.
    Unknown,
}

/// A quantity after normalisation.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalized {
    pub value: f64,
    /// The UCUM code, or for [`UnitStatus::Unknown`] the unit exactly as given.
    pub unit: String,
    /// [`UCUM_SYSTEM`] when `unit` is a UCUM code; `None` for an unknown unit, which a
    /// FHIR Quantity must then carry in `unit` only, without `system` and `code`.
    pub system: Option<&'static str>,
    pub converted: bool,
    pub status: UnitStatus,
    pub original_value: f64,
    pub original_unit: String,
    /// When a conversion changed the LOINC property (a [Mass/volume] code now holding
    /// a mmol/L value), the LOINC code whose property matches the new unit. Use it
    /// as the Observation code so that code and unit agree. `None`: keep the code.
    pub recoded_loinc: Option<String>,
    /// The class (analyte or dimension) that decided the canonical unit, if any.
    pub class: Option<String>,
}

impl Normalized {
    /// True when the unit was not recognised and the quantity was kept as given.
    pub fn is_unknown(&self) -> bool {
        self.status == UnitStatus::Unknown
    }
}

/// Normalises `value` in `unit` for the analyte `loinc` with the embedded table.
///
/// Never panics and never fails: an unknown unit comes back flagged
/// [`UnitStatus::Unknown`]. (If the embedded table were broken every unit would be
/// unknown; a unit test and [`embedded_table`] at startup rule that out.)
pub fn normalize(loinc: Option<&str>, value: f64, unit: &str) -> Normalized {
    match EMBEDDED.as_ref() {
        Ok(table) => table.normalize(loinc, value, unit),
        Err(_) => unknown(value, unit),
    }
}

/// The embedded table, or why it did not load. Call once at startup to fail fast.
pub fn embedded_table() -> Result<&'static UnitTable, UnitsError> {
    EMBEDDED.as_ref().map_err(Clone::clone)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    #[serde(default)]
    spelling: Vec<SpellingEntry>,
    #[serde(default)]
    class: Vec<ClassEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpellingEntry {
    ucum: String,
    #[serde(default)]
    aliases: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassEntry {
    id: String,
    canonical: String,
    #[serde(default)]
    generic: bool,
    #[serde(default)]
    loinc: Vec<String>,
    #[serde(default)]
    recode: BTreeMap<String, String>,
    #[serde(default)]
    convert: Vec<ConvertEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConvertEntry {
    from: String,
    factor: f64,
    #[serde(default)]
    offset: f64,
}

/// One linear conversion into a class's canonical unit: `value * factor + offset`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conversion {
    pub factor: f64,
    pub offset: f64,
}

impl Conversion {
    pub fn apply(&self, value: f64) -> f64 {
        value * self.factor + self.offset
    }

    /// The exact inverse, for round-trip checks and for reporting in source units.
    pub fn invert(&self, canonical: f64) -> f64 {
        (canonical - self.offset) / self.factor
    }
}

#[derive(Debug)]
struct Class {
    id: String,
    canonical: String,
    conversions: HashMap<String, Conversion>,
    recode: HashMap<String, String>,
}

/// A loaded, validated unit table.
#[derive(Debug)]
pub struct UnitTable {
    /// Folded spelling -> UCUM code.
    spellings: HashMap<String, String>,
    classes: Vec<Class>,
    /// LOINC code -> index into `classes`.
    by_loinc: HashMap<String, usize>,
    /// UCUM unit -> generic class index, for units that belong to one.
    generic_by_unit: HashMap<String, usize>,
}

fn fold(spelling: &str) -> String {
    spelling.trim().to_lowercase()
}

fn unknown(value: f64, unit: &str) -> Normalized {
    Normalized {
        value,
        unit: unit.to_string(),
        system: None,
        converted: false,
        status: UnitStatus::Unknown,
        original_value: value,
        original_unit: unit.to_string(),
        recoded_loinc: None,
        class: None,
    }
}

impl UnitTable {
    /// Parses and validates a table in the `units/ucum.toml` format.
    pub fn from_toml(text: &str) -> Result<Self, UnitsError> {
        let file: TableFile = toml::from_str(text).map_err(|e| UnitsError::Parse(e.to_string()))?;

        let mut spellings: HashMap<String, String> = HashMap::new();
        for entry in &file.spelling {
            for spelling in std::iter::once(&entry.ucum).chain(&entry.aliases) {
                let key = fold(spelling);
                if let Some(first) = spellings.get(&key) {
                    // The same UCUM code listing a spelling twice is harmless.
                    if first != &entry.ucum {
                        return Err(UnitsError::SpellingCollision {
                            spelling: spelling.clone(),
                            first: first.clone(),
                            second: entry.ucum.clone(),
                        });
                    }
                }
                spellings.insert(key, entry.ucum.clone());
            }
        }
        let is_ucum = |unit: &str| spellings.get(&fold(unit)).map(String::as_str) == Some(unit);

        let mut classes = Vec::with_capacity(file.class.len());
        let mut by_loinc: HashMap<String, usize> = HashMap::new();
        let mut generic_by_unit: HashMap<String, usize> = HashMap::new();
        for (index, entry) in file.class.into_iter().enumerate() {
            if classes.iter().any(|c: &Class| c.id == entry.id) {
                return Err(UnitsError::DuplicateClass(entry.id));
            }
            // Units in classes must be the UCUM codes themselves, not aliases, so the
            // lookup after respelling finds them.
            if !is_ucum(&entry.canonical) {
                return Err(UnitsError::UndefinedUnit {
                    class: entry.id,
                    unit: entry.canonical,
                });
            }
            let mut conversions = HashMap::new();
            for c in &entry.convert {
                if !is_ucum(&c.from) {
                    return Err(UnitsError::UndefinedUnit {
                        class: entry.id.clone(),
                        unit: c.from.clone(),
                    });
                }
                if !(c.factor.is_finite() && c.factor != 0.0 && c.offset.is_finite()) {
                    return Err(UnitsError::BadFactor {
                        class: entry.id.clone(),
                        unit: c.from.clone(),
                    });
                }
                let conversion = Conversion {
                    factor: c.factor,
                    offset: c.offset,
                };
                if c.from == entry.canonical
                    || conversions.insert(c.from.clone(), conversion).is_some()
                {
                    return Err(UnitsError::DuplicateConversion {
                        class: entry.id.clone(),
                        unit: c.from.clone(),
                    });
                }
            }
            for loinc in &entry.loinc {
                if let Some(&first) = by_loinc.get(loinc) {
                    let first: &Class = &classes[first];
                    return Err(UnitsError::LoincInTwoClasses {
                        loinc: loinc.clone(),
                        first: first.id.clone(),
                        second: entry.id.clone(),
                    });
                }
                by_loinc.insert(loinc.clone(), index);
            }
            for loinc in entry.recode.keys() {
                if !entry.loinc.contains(loinc) {
                    return Err(UnitsError::RecodeOutsideClass {
                        class: entry.id.clone(),
                        loinc: loinc.clone(),
                    });
                }
            }
            if entry.generic {
                for unit in std::iter::once(&entry.canonical).chain(conversions.keys()) {
                    if let Some(&first) = generic_by_unit.get(unit) {
                        let first: &Class = &classes[first];
                        return Err(UnitsError::UnitInTwoGenericClasses {
                            unit: unit.clone(),
                            first: first.id.clone(),
                            second: entry.id.clone(),
                        });
                    }
                    generic_by_unit.insert(unit.clone(), index);
                }
            }
            classes.push(Class {
                id: entry.id,
                canonical: entry.canonical,
                conversions,
                recode: entry.recode.into_iter().collect(),
            });
        }
        Ok(Self {
            spellings,
            classes,
            by_loinc,
            generic_by_unit,
        })
    }

    /// The UCUM code for a source spelling, if the table knows it.
    pub fn ucum_for(&self, spelling: &str) -> Option<&str> {
        self.spellings.get(&fold(spelling)).map(String::as_str)
    }

    /// The canonical UCUM unit for a LOINC code, if a class lists the code.
    pub fn canonical_unit(&self, loinc: &str) -> Option<&str> {
        self.by_loinc
            .get(loinc.trim())
            .map(|&i| self.classes[i].canonical.as_str())
    }

    /// The conversion a class applies from `ucum_unit`, by class id.
    pub fn conversion(&self, class_id: &str, ucum_unit: &str) -> Option<Conversion> {
        self.classes
            .iter()
            .find(|c| c.id == class_id)
            .and_then(|c| c.conversions.get(ucum_unit).copied())
    }

    /// See [`normalize`] and the module docs for the rules.
    pub fn normalize(&self, loinc: Option<&str>, value: f64, unit: &str) -> Normalized {
        let Some(ucum) = self.ucum_for(unit) else {
            return unknown(value, unit);
        };
        let class_index = loinc
            .and_then(|code| self.by_loinc.get(code.trim()))
            .or_else(|| self.generic_by_unit.get(ucum))
            .copied();
        let spelled = if ucum == unit {
            UnitStatus::Unchanged
        } else {
            UnitStatus::Respelled
        };
        let keep = |status: UnitStatus, class: Option<&Class>| Normalized {
            value,
            unit: ucum.to_string(),
            system: Some(UCUM_SYSTEM),
            converted: false,
            status,
            original_value: value,
            original_unit: unit.to_string(),
            recoded_loinc: None,
            class: class.map(|c| c.id.clone()),
        };
        let Some(class) = class_index.map(|i| &self.classes[i]) else {
            return keep(spelled, None);
        };
        if class.canonical == ucum {
            return keep(spelled, Some(class));
        }
        let Some(conversion) = class.conversions.get(ucum) else {
            return keep(UnitStatus::NoConversion, Some(class));
        };
        let converted = round_like(conversion.apply(value), value);
        Normalized {
            value: converted,
            unit: class.canonical.clone(),
            system: Some(UCUM_SYSTEM),
            converted: true,
            status: UnitStatus::Converted,
            original_value: value,
            original_unit: unit.to_string(),
            recoded_loinc: loinc.and_then(|code| class.recode.get(code.trim()).cloned()),
            class: Some(class.id.clone()),
        }
    }
}

/// Significant digits in the shortest decimal rendering of `value` (trailing zeros
/// of an integer count, since `90` gives no way to tell them from measured ones).
fn significant_digits(value: f64) -> usize {
    let text = format!("{}", value.abs());
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    digits.trim_start_matches('0').len().max(1)
}

/// Rounds a converted value to `max(4, significant digits of the input)` digits.
fn round_like(converted: f64, input: f64) -> f64 {
    if !converted.is_finite() || converted == 0.0 {
        return converted;
    }
    let digits = significant_digits(input).clamp(MIN_SIGNIFICANT_DIGITS, MAX_SIGNIFICANT_DIGITS);
    round_significant(converted, digits)
}

/// Decimal rounding to `digits` significant digits, through scientific formatting so
/// the result is the `f64` nearest to the rounded decimal.
fn round_significant(value: f64, digits: usize) -> f64 {
    let text = format!("{:.*e}", digits.saturating_sub(1), value);
    text.parse().unwrap_or(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One data-driven check: `(loinc, value, unit)` gives `(value, unit, status)`.
    fn check(loinc: Option<&str>, value: f64, unit: &str, want: (f64, &str, UnitStatus)) {
        let got = normalize(loinc, value, unit);
        assert_eq!(
            (got.value, got.unit.as_str(), got.status),
            want,
            "normalize({loinc:?}, {value}, {unit:?})"
        );
        assert_eq!(got.original_value.to_bits(), value.to_bits());
        assert_eq!(got.original_unit, unit);
        assert_eq!(got.converted, got.status == UnitStatus::Converted);
        let expected_system = (got.status != UnitStatus::Unknown).then_some(UCUM_SYSTEM);
        assert_eq!(got.system, expected_system);
    }

    #[test]
    fn embedded_table_loads() {
        assert!(embedded_table().is_ok(), "{:?}", embedded_table().err());
    }

    #[test]
    fn conversions_to_canonical_units() {
        use UnitStatus::Converted;
        check(Some("2345-7"), 90.0, "mg/dL", (4.996, "mmol/L", Converted));
        check(Some("2093-3"), 200.0, "mg/dL", (5.173, "mmol/L", Converted));
        check(Some("2085-9"), 50.0, "mg/dl", (1.293, "mmol/L", Converted));
        check(
            Some("13457-7"),
            130.0,
            "MG/DL",
            (3.362, "mmol/L", Converted),
        );
        check(Some("2571-8"), 150.0, "mg/dL", (1.694, "mmol/L", Converted));
        check(Some("2160-0"), 1.2, "mg/dL", (106.1, "umol/L", Converted));
        check(Some("29463-7"), 154.0, "lb", (69.85, "kg", Converted));
        check(Some("29463-7"), 154.0, "lbs", (69.85, "kg", Converted));
        check(None, 154.0, "[lb_av]", (69.85, "kg", Converted));
        check(None, 8.0, "oz", (0.2268, "kg", Converted));
        check(None, 3500.0, "g", (3.5, "kg", Converted));
        check(Some("8302-2"), 70.0, "in", (177.8, "cm", Converted));
        check(None, 70.0, "inch", (177.8, "cm", Converted));
        check(None, 6.0, "ft", (182.9, "cm", Converted));
        check(None, 1.8, "m", (180.0, "cm", Converted));
        check(Some("8310-5"), 98.6, "degF", (37.0, "Cel", Converted));
        check(None, 98.6, "°F", (37.0, "Cel", Converted));
        check(None, 100.4, "[degF]", (38.0, "Cel", Converted));
        check(None, 32.0, "degF", (0.0, "Cel", Converted));
        check(None, -40.0, "degF", (-40.0, "Cel", Converted));
    }

    #[test]
    fn input_precision_beyond_four_digits_is_kept() {
        // 154.32 lb has five significant digits, so five are kept: 69.998 kg.
        check(None, 154.32, "lb", (69.998, "kg", UnitStatus::Converted));
    }

    #[test]
    fn spelling_only_normalisations_keep_the_value() {
        use UnitStatus::{Respelled, Unchanged};
        check(None, 120.0, "mmHg", (120.0, "mm[Hg]", Respelled));
        check(Some("8480-6"), 120.0, "mm Hg", (120.0, "mm[Hg]", Respelled));
        check(None, 24.3, "kg/m2", (24.3, "kg/m2", Unchanged));
        check(None, 24.3, "kg/m^2", (24.3, "kg/m2", Respelled));
        check(None, 72.0, "bpm", (72.0, "/min", Respelled));
        check(None, 72.0, "beats/min", (72.0, "/min", Respelled));
        check(None, 97.0, "%", (97.0, "%", Unchanged));
        check(None, 170.0, "cm", (170.0, "cm", Unchanged));
        check(None, 70.0, "kg", (70.0, "kg", Unchanged));
        check(None, 95.0, "mg/dl", (95.0, "mg/dL", Respelled));
        check(None, 5.2, "mmol/l", (5.2, "mmol/L", Respelled));
        check(None, 7.1, "10*3/uL", (7.1, "10*3/uL", Unchanged));
        check(None, 7.1, "K/uL", (7.1, "10*3/uL", Respelled));
        check(None, 13.5, "g/dL", (13.5, "g/dL", Unchanged));
        check(None, 13.5, "g/dl", (13.5, "g/dL", Respelled));
        check(None, 30.0, "U/L", (30.0, "U/L", Unchanged));
        check(None, 30.0, " u/l ", (30.0, "U/L", Respelled));
        check(None, 80.0, "µmol/L", (80.0, "umol/L", Respelled));
        // Already canonical for the analyte: unchanged value, normalised spelling.
        check(Some("2345-7"), 5.4, "mmol/l", (5.4, "mmol/L", Respelled));
    }

    #[test]
    fn unknown_units_are_kept_as_given_and_flagged() {
        for unit in ["furlongs", "C", "F", "", "mg/dL/x", "mEq/L"] {
            let got = normalize(Some("2345-7"), 1.5, unit);
            assert!(got.is_unknown(), "{unit:?}");
            assert_eq!((got.value, got.unit.as_str()), (1.5, unit));
            assert_eq!(got.system, None);
            assert!(!got.converted);
        }
    }

    #[test]
    fn known_unit_without_conversion_is_flagged_not_guessed() {
        // Glucose in g/L is a real unit, but the table defines no g/L -> mmol/L factor.
        check(
            Some("2345-7"),
            0.9,
            "g/L",
            (0.9, "g/L", UnitStatus::NoConversion),
        );
        // A body-weight code with a length unit: dimension mismatch, value kept.
        check(
            Some("29463-7"),
            70.0,
            "in",
            (70.0, "[in_i]", UnitStatus::NoConversion),
        );
    }

    #[test]
    fn unlisted_loinc_uses_generic_class_but_no_lab_factor() {
        // A lab mg/dL value with no analyte cannot be converted: spelling only.
        check(None, 90.0, "mg/dL", (90.0, "mg/dL", UnitStatus::Unchanged));
        check(
            Some("9999-9"),
            90.0,
            "mg/dl",
            (90.0, "mg/dL", UnitStatus::Respelled),
        );
        check(
            Some("9999-9"),
            10.0,
            "lb",
            (4.536, "kg", UnitStatus::Converted),
        );
    }

    #[test]
    fn mass_concentration_codes_are_recoded_to_their_molar_sibling() {
        assert_eq!(
            normalize(Some("2345-7"), 90.0, "mg/dL")
                .recoded_loinc
                .as_deref(),
            Some("14749-6")
        );
        assert_eq!(
            normalize(Some("2160-0"), 1.0, "mg/dL")
                .recoded_loinc
                .as_deref(),
            Some("14682-9")
        );
        // LDL has no confirmed sibling; weight never changes property.
        assert_eq!(
            normalize(Some("13457-7"), 100.0, "mg/dL").recoded_loinc,
            None
        );
        assert_eq!(normalize(Some("29463-7"), 100.0, "lb").recoded_loinc, None);
        // Not converted, not recoded.
        assert_eq!(normalize(Some("2345-7"), 5.0, "mmol/L").recoded_loinc, None);
    }

    #[test]
    fn factors_match_their_cited_derivations() {
        let table = embedded_table().unwrap();
        let factor = |class: &str, unit: &str| table.conversion(class, unit).unwrap().factor;
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
        assert!(close(factor("glucose", "mg/dL"), 10.0 / 180.16));
        assert!(close(factor("glucose", "mg/dL"), 1.0 / 18.016));
        assert!(close(factor("cholesterol", "mg/dL"), 10.0 / 386.65));
        assert!(close(factor("creatinine", "mg/dL"), 10_000.0 / 113.12));
        assert!(close(factor("mass", "[lb_av]"), 0.45359237));
        assert!(close(factor("mass", "[oz_av]"), 0.45359237 / 16.0));
        assert!(close(factor("length", "[ft_i]"), 12.0 * 2.54));
        let f = table.conversion("temperature", "[degF]").unwrap();
        assert!(close(f.factor, 5.0 / 9.0));
        assert!(close(f.offset, -32.0 * 5.0 / 9.0));
    }

    #[test]
    fn round_trips_through_the_inverse_stay_within_rounding() {
        let table = embedded_table().unwrap();
        let cases = [
            ("glucose", "mg/dL", [40.0, 90.0, 126.0, 599.0]),
            ("cholesterol", "mg/dL", [35.0, 130.0, 200.0, 310.0]),
            ("triglycerides", "mg/dL", [45.0, 150.0, 499.0, 1200.0]),
            ("creatinine", "mg/dL", [0.4, 0.9, 1.2, 12.5]),
            ("mass", "[lb_av]", [5.5, 154.0, 220.4, 700.0]),
            ("length", "[in_i]", [18.5, 60.0, 70.0, 84.25]),
            ("temperature", "[degF]", [95.0, 98.6, 100.4, 107.9]),
        ];
        for (class, unit, values) in cases {
            let conversion = table.conversion(class, unit).unwrap();
            for x in values {
                let y = round_like(conversion.apply(x), x);
                let back = conversion.invert(y);
                // Rounding to >= 4 significant digits moves y by at most 5e-4 of |y|.
                let tolerance = 5e-4 * y.abs() / conversion.factor.abs() + 1e-9;
                assert!(
                    (back - x).abs() <= tolerance,
                    "{class} {x} {unit} -> {y} -> {back}"
                );
            }
        }
    }

    #[test]
    fn non_finite_values_never_panic() {
        for value in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
            f64::MIN_POSITIVE,
        ] {
            let got = normalize(Some("2345-7"), value, "mg/dL");
            assert_eq!(got.status, UnitStatus::Converted);
            assert_eq!(got.value.is_nan(), value.is_nan());
        }
    }

    #[test]
    fn rounding_is_decimal() {
        assert_eq!(round_significant(4.995_474, 4), 4.995);
        assert_eq!(round_significant(69.853_225, 4), 69.85);
        assert_eq!(round_significant(36.999_999_999, 4), 37.0);
        assert_eq!(significant_digits(90.0), 2);
        assert_eq!(significant_digits(0.0012), 2);
        assert_eq!(significant_digits(154.32), 5);
    }

    #[test]
    fn table_validation_rejects_bad_data() {
        let collision = r#"
            [[spelling]]
            ucum = "mg/dL"
            [[spelling]]
            ucum = "mg/L"
            aliases = ["MG/DL"]
        "#;
        assert!(matches!(
            UnitTable::from_toml(collision),
            Err(UnitsError::SpellingCollision { .. })
        ));
        let unknown_key = "[[spelling]]\nucum = \"kg\"\nalias = [\"kgs\"]\n";
        assert!(matches!(
            UnitTable::from_toml(unknown_key),
            Err(UnitsError::Parse(_))
        ));
        let undefined = r#"
            [[spelling]]
            ucum = "kg"
            [[class]]
            id = "mass"
            canonical = "kg"
            convert = [{ from = "lb", factor = 0.45359237 }]
        "#;
        assert!(matches!(
            UnitTable::from_toml(undefined),
            Err(UnitsError::UndefinedUnit { .. })
        ));
        let two_classes = r#"
            [[spelling]]
            ucum = "kg"
            [[class]]
            id = "a"
            canonical = "kg"
            loinc = ["1-1"]
            [[class]]
            id = "b"
            canonical = "kg"
            loinc = ["1-1"]
        "#;
        assert!(matches!(
            UnitTable::from_toml(two_classes),
            Err(UnitsError::LoincInTwoClasses { .. })
        ));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn never_panics_and_keeps_originals(
                loinc in proptest::option::of("[0-9]{1,5}-[0-9]"),
                value in proptest::num::f64::ANY,
                unit in "\\PC{0,12}",
            ) {
                let got = normalize(loinc.as_deref(), value, &unit);
                prop_assert_eq!(got.original_value.to_bits(), value.to_bits());
                prop_assert_eq!(&got.original_unit, &unit);
                if got.is_unknown() {
                    prop_assert_eq!(got.value.to_bits(), value.to_bits());
                    prop_assert_eq!(&got.unit, &unit);
                }
                if !got.converted {
                    prop_assert_eq!(got.value.to_bits(), value.to_bits());
                }
            }

            #[test]
            fn every_conversion_round_trips_within_rounding(
                index in 0usize..64,
                value in 0.001f64..100_000.0,
            ) {
                let table = embedded_table().unwrap();
                let conversions: Vec<&Conversion> =
                    table.classes.iter().flat_map(|c| c.conversions.values()).collect();
                let conversion = conversions[index % conversions.len()];
                let y = round_like(conversion.apply(value), value);
                let back = conversion.invert(y);
                let tolerance = 5e-4 * y.abs() / conversion.factor.abs() + 1e-9;
                prop_assert!((back - value).abs() <= tolerance, "{} -> {} -> {}", value, y, back);
            }
        }
    }
}
