//! Dates and ages: parsing FHIR/ISO 8601 and HL7 v2 DTM strings, reducing them to the year or
//! shifting them, and aggregating ages over the cutoff.
//!
//! Parsing is hand-written and strict: anything that is not exactly one of the supported
//! shapes is "unparseable" and the caller redacts it, because a date we cannot read is a date
//! we cannot prove de-identified. A shifted date keeps the text after the calendar date (time,
//! fraction, zone) verbatim: shifting by whole days never changes the time of day, so the
//! output has the input's precision and format.

use chrono::{Datelike, NaiveDate, TimeDelta};

use crate::policy::DateMode;

/// How the calendar date is written: `2020-03-04` or `20200304`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Style {
    Iso,
    Hl7,
}

/// What the text gives: a year, a month or a full date (possibly with a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Precision {
    Year,
    Month,
    Day,
}

/// A parsed date. `date` is the earliest day the text can mean (1 January for a bare year),
/// which makes ages computed from it upper bounds: the conservative side for the age rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Parsed<'a> {
    pub(crate) style: Style,
    pub(crate) precision: Precision,
    pub(crate) date: NaiveDate,
    /// Everything after the calendar date (`T10:00:00Z`, `1230+0100`), already validated.
    pub(crate) rest: &'a str,
}

/// What the `age` method produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AgeOutcome {
    /// At or below the cutoff: de-identified like any date (or an age number kept).
    Value(String),
    /// Over the cutoff: aggregated (the clamped birth year, or `90+`).
    Clamped(String),
    Invalid,
}

/// `n` leading ASCII digits of `s` as a number, and the rest.
fn digits(s: &str, n: usize) -> Option<(u32, &str)> {
    let head = s.get(..n)?;
    if !head.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((head.parse().ok()?, s.get(n..)?))
}

/// Parses `YYYY`, `YYYY-MM`, `YYYY-MM-DD[(T| )hh:mm[:ss[.f]][Z|±hh:mm]]` or the HL7 DTM
/// `YYYY[MM[DD[hh[mm[ss[.ffff]]]]]][±hhmm]`.
pub(crate) fn parse(text: &str) -> Option<Parsed<'_>> {
    let (year, rest) = digits(text, 4)?;
    let year = i32::try_from(year).ok()?;
    if rest.is_empty() {
        return Some(Parsed {
            style: Style::Iso,
            precision: Precision::Year,
            date: NaiveDate::from_ymd_opt(year, 1, 1)?,
            rest,
        });
    }
    let (style, rest) = match rest.strip_prefix('-') {
        Some(r) => (Style::Iso, r),
        None => (Style::Hl7, rest),
    };
    let (month, rest) = digits(rest, 2)?;
    if rest.is_empty() {
        return Some(Parsed {
            style,
            precision: Precision::Month,
            date: NaiveDate::from_ymd_opt(year, month, 1)?,
            rest,
        });
    }
    let rest = match style {
        Style::Iso => rest.strip_prefix('-')?,
        Style::Hl7 => rest,
    };
    let (day, rest) = digits(rest, 2)?;
    let date = NaiveDate::from_ymd_opt(year, month, day)?;
    let time_ok = match style {
        Style::Iso => iso_time(rest),
        Style::Hl7 => hl7_time(rest),
    };
    time_ok.then_some(Parsed {
        style,
        precision: Precision::Day,
        date,
        rest,
    })
}

fn hour(s: &str) -> Option<&str> {
    digits(s, 2).filter(|(h, _)| *h < 24).map(|(_, r)| r)
}

fn minute(s: &str) -> Option<&str> {
    digits(s, 2).filter(|(m, _)| *m < 60).map(|(_, r)| r)
}

fn second(s: &str) -> Option<&str> {
    // 60 for a leap second.
    digits(s, 2).filter(|(v, _)| *v <= 60).map(|(_, r)| r)
}

/// A fraction `.f+` (at most `max` digits), if present.
fn fraction(s: &str, max: usize) -> Option<&str> {
    let Some(r) = s.strip_prefix('.') else {
        return Some(s);
    };
    let n = r.bytes().take_while(u8::is_ascii_digit).count();
    (1..=max).contains(&n).then(|| r.get(n..)).flatten()
}

/// `""` or `(T| )hh:mm[:ss[.f]][Z|±hh:mm|±hhmm]`.
fn iso_time(s: &str) -> bool {
    if s.is_empty() {
        return true;
    }
    let Some(s) = s.strip_prefix(['T', ' ']) else {
        return false;
    };
    let Some(s) = hour(s).and_then(|r| r.strip_prefix(':')).and_then(minute) else {
        return false;
    };
    let s = match s.strip_prefix(':') {
        Some(r) => match second(r).and_then(|r| fraction(r, 9)) {
            Some(r) => r,
            None => return false,
        },
        None => s,
    };
    match s {
        "" | "Z" => true,
        _ => s
            .strip_prefix(['+', '-'])
            .and_then(hour)
            .map(|r| r.strip_prefix(':').unwrap_or(r))
            .and_then(minute)
            .is_some_and(str::is_empty),
    }
}

/// `""` or `hh[mm[ss[.ffff]]][±hhmm]` (the zone may also follow the date directly).
fn hl7_time(s: &str) -> bool {
    let mut s = s;
    if let Some(r) = hour(s) {
        s = r;
        if let Some(r) = minute(s) {
            s = r;
            if let Some(r) = second(s) {
                match fraction(r, 4) {
                    Some(r) => s = r,
                    None => return false,
                }
            }
        }
    }
    s.is_empty()
        || s.strip_prefix(['+', '-'])
            .and_then(hour)
            .and_then(minute)
            .is_some_and(str::is_empty)
}

fn year_text(date: NaiveDate) -> Option<String> {
    (0..=9999)
        .contains(&date.year())
        .then(|| format!("{:04}", date.year()))
}

/// Applies the `date` method: the year alone, or the date shifted by `shift_days` in the
/// input's format. With `Shift`, a bare year is kept and a year-month is reduced to the year,
/// since a whole-day shift cannot be expressed at those precisions without changing the
/// interval between dates. `None` means unparseable (the caller redacts).
pub(crate) fn deidentify(text: &str, mode: DateMode, shift_days: i64) -> Option<String> {
    let parsed = parse(text)?;
    if mode == DateMode::Year || parsed.precision != Precision::Day {
        return year_text(parsed.date);
    }
    let shifted = parsed
        .date
        .checked_add_signed(TimeDelta::try_days(shift_days)?)?;
    year_text(shifted)?;
    let day = match parsed.style {
        Style::Iso => shifted.format("%Y-%m-%d"),
        Style::Hl7 => shifted.format("%Y%m%d"),
    };
    Some(format!("{day}{}", parsed.rest))
}

/// Whole years from `birth` to `reference`.
pub(crate) fn age_at(birth: NaiveDate, reference: NaiveDate) -> i64 {
    let mut years = i64::from(reference.year()) - i64::from(birth.year());
    if (reference.month(), reference.day()) < (birth.month(), birth.day()) {
        years -= 1;
    }
    years
}

/// Applies the `age` method to a birth date or an age in years.
///
/// An age (1 to 3 digits, optionally with a fraction) over the cutoff becomes `"<cutoff+1>+"`;
/// other ages are kept, as Safe Harbor allows. A birth date of someone older than the cutoff at
/// `reference` becomes the year `reference year - (cutoff + 1)`, the single aggregate
/// category, in every date mode; younger people's birth dates go through [`deidentify`].
pub(crate) fn age(
    text: &str,
    mode: DateMode,
    shift_days: i64,
    reference: NaiveDate,
    cutoff: u32,
) -> AgeOutcome {
    let trimmed = text.trim();
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let is_age = match trimmed.split_once('.') {
        Some((whole, frac)) => whole.len() <= 3 && all_digits(whole) && all_digits(frac),
        None => trimmed.len() <= 3 && all_digits(trimmed),
    };
    if is_age {
        return match trimmed.parse::<f64>() {
            Ok(years) if years > f64::from(cutoff) => {
                AgeOutcome::Clamped(format!("{}+", cutoff + 1))
            }
            Ok(_) => AgeOutcome::Value(trimmed.to_owned()),
            Err(_) => AgeOutcome::Invalid,
        };
    }
    let Some(parsed) = parse(text) else {
        return AgeOutcome::Invalid;
    };
    if age_at(parsed.date, reference) > i64::from(cutoff) {
        let year = i64::from(reference.year()) - i64::from(cutoff) - 1;
        return AgeOutcome::Clamped(format!("{year:04}"));
    }
    match deidentify(text, mode, shift_days) {
        Some(v) => AgeOutcome::Value(v),
        None => AgeOutcome::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    #[test]
    fn parses_supported_shapes() {
        for (text, style, precision) in [
            ("2020", Style::Iso, Precision::Year),
            ("2020-03", Style::Iso, Precision::Month),
            ("2020-03-04", Style::Iso, Precision::Day),
            ("2020-03-04T10:15:00Z", Style::Iso, Precision::Day),
            ("2020-03-04T10:15:00.123+02:00", Style::Iso, Precision::Day),
            ("2020-03-04T10:15-05:00", Style::Iso, Precision::Day),
            ("2020-03-04 10:15:00", Style::Iso, Precision::Day),
            ("202003", Style::Hl7, Precision::Month),
            ("20200304", Style::Hl7, Precision::Day),
            ("2020030410", Style::Hl7, Precision::Day),
            ("202003041015", Style::Hl7, Precision::Day),
            ("20200304101530", Style::Hl7, Precision::Day),
            ("20200304101530.1234", Style::Hl7, Precision::Day),
            ("20200304101530-0500", Style::Hl7, Precision::Day),
            ("20200304+0100", Style::Hl7, Precision::Day),
        ] {
            let p = parse(text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!((p.style, p.precision), (style, precision), "{text}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for text in [
            "",
            "20",
            "+2020",
            "2020-13-01",
            "2020-02-30",
            "2020-3-4",
            "03/04/2020",
            "2020-03-04T25:00:00Z",
            "2020-03-04T10:15:00Q",
            "2020-03-04T",
            "20200304101",
            "20200304101530.12345",
            "yesterday",
            "2020-03-04x",
        ] {
            assert_eq!(parse(text), None, "{text}");
        }
    }

    #[test]
    fn year_mode_keeps_the_year() {
        for text in [
            "2020",
            "2020-03",
            "2020-03-04T10:15:00Z",
            "20200304",
            "202003041015-0500",
        ] {
            assert_eq!(deidentify(text, DateMode::Year, 7).as_deref(), Some("2020"));
        }
        assert_eq!(deidentify("not a date", DateMode::Year, 7), None);
    }

    #[test]
    fn shift_mode_keeps_format_and_time() {
        let s = |t: &str, n| deidentify(t, DateMode::Shift, n);
        assert_eq!(s("2020-03-04", 10).as_deref(), Some("2020-03-14"));
        assert_eq!(
            s("2020-12-30T23:59:59.5+05:30", 3).as_deref(),
            Some("2021-01-02T23:59:59.5+05:30")
        );
        assert_eq!(s("20200301", -1).as_deref(), Some("20200229"));
        assert_eq!(
            s("202003011230-0500", -1).as_deref(),
            Some("202002291230-0500")
        );
        assert_eq!(s("2020", 200).as_deref(), Some("2020"));
        assert_eq!(s("2020-03", 200).as_deref(), Some("2020"));
        assert_eq!(s("9999-12-31", 1), None);
    }

    #[test]
    fn ages() {
        let reference = d(2026, 1, 1);
        let a = |t: &str| age(t, DateMode::Year, 5, reference, 89);
        assert_eq!(a("1930-06-01"), AgeOutcome::Clamped("1936".into()));
        assert_eq!(a("19300601"), AgeOutcome::Clamped("1936".into()));
        // Exactly 90 on the reference date.
        assert_eq!(a("1936-01-01"), AgeOutcome::Clamped("1936".into()));
        // 89 until 2 January.
        assert_eq!(a("1936-01-02"), AgeOutcome::Value("1936".into()));
        // A bare year is read as 1 January: the oldest the person can be.
        assert_eq!(a("1936"), AgeOutcome::Clamped("1936".into()));
        assert_eq!(a("1961-04-12"), AgeOutcome::Value("1961".into()));
        assert_eq!(a("95"), AgeOutcome::Clamped("90+".into()));
        assert_eq!(a("89"), AgeOutcome::Value("89".into()));
        assert_eq!(a("90.5"), AgeOutcome::Clamped("90+".into()));
        assert_eq!(a("4.5"), AgeOutcome::Value("4.5".into()));
        assert_eq!(a("ninety"), AgeOutcome::Invalid);
        assert_eq!(a("1."), AgeOutcome::Invalid);
        assert_eq!(
            age("1961-04-12", DateMode::Shift, 5, reference, 89),
            AgeOutcome::Value("1961-04-17".into())
        );
        assert_eq!(
            age("1930-04-12", DateMode::Shift, 5, reference, 89),
            AgeOutcome::Clamped("1936".into())
        );
    }

    #[test]
    fn age_at_counts_whole_years() {
        assert_eq!(age_at(d(2000, 2, 29), d(2026, 2, 28)), 25);
        assert_eq!(age_at(d(2000, 2, 29), d(2026, 3, 1)), 26);
        assert_eq!(age_at(d(2026, 5, 1), d(2026, 1, 1)), -1);
    }
}
