//! The caller's time zone: IANA names validated against the bundled time-zone database
//! (jiff's, compiled in, so the Worker needs no filesystem), and the caller's local date
//! and time as the persona's system prompt states it, so "tomorrow at seven" means the
//! caller's seven.

use jiff::tz::TimeZone;
use jiff::Timestamp;

use crate::validate::ValidationError;

/// The zone of an account that never set one.
pub const DEFAULT: &str = "UTC";
const FIELD: &str = "timezone";
/// Longer than any IANA name (the longest is about 32 characters).
const MAX_LEN: usize = 64;

/// The error code of an unknown or malformed zone.
pub const INVALID_TIMEZONE: &str = "invalid_timezone";

/// Validates an IANA time-zone name (`Europe/London`, `America/New_York`, `UTC`), and
/// returns it as the database spells it (`europe/london` → `Europe/London`).
pub fn parse(name: &str) -> Result<String, ValidationError> {
    let name = name.trim();
    let invalid = || {
        ValidationError::new(
            FIELD,
            INVALID_TIMEZONE,
            "timezone must be an IANA time-zone name, e.g. Europe/London or America/New_York.",
        )
    };
    if name.is_empty() || name.len() > MAX_LEN {
        return Err(invalid());
    }
    // Only database names: no POSIX TZ strings or fixed offsets, which would not follow
    // daylight-saving changes.
    if name.contains(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '+'))) {
        return Err(invalid());
    }
    // The database's own spelling is stored: lookups ignore case.
    let tz = TimeZone::get(name).map_err(|_| invalid())?;
    Ok(tz.iana_name().unwrap_or(name).to_owned())
}

/// `at_ms` as the caller reads it: `Wednesday 2 December 2026, 19:40 (Europe/London)`
/// (UTC when the zone is unknown or absent).
pub fn local_time(zone: Option<&str>, at_ms: i64) -> String {
    let (name, tz) = zone_or_utc(zone);
    match Timestamp::from_millisecond(at_ms) {
        Ok(ts) => format!(
            "{} ({name})",
            ts.to_zoned_datetime(tz).strftime("%A %-d %B %Y, %H:%M")
        ),
        Err(_) => format!("an unknown time ({name})"),
    }
}

fn zone_or_utc(zone: Option<&str>) -> (&str, TimeZone) {
    match zone.and_then(|z| TimeZone::get(z).ok().map(|tz| (z, tz))) {
        Some(found) => found,
        None => (DEFAULT, TimeZone::UTC),
    }
}

/// The system prompt's line with the caller's local date and time at `now_ms`, in `zone`
/// (an unknown or absent zone is UTC, and says so).
pub fn prompt_line(zone: Option<&str>, now_ms: i64) -> String {
    let (name, tz) = match zone.and_then(|z| TimeZone::get(z).ok().map(|tz| (z, tz))) {
        Some(found) => found,
        None => (DEFAULT, TimeZone::UTC),
    };
    match Timestamp::from_millisecond(now_ms) {
        Ok(ts) => {
            let local = ts.to_zoned_datetime(tz);
            format!(
                "For the caller it is now {} (time zone {name}).",
                local.strftime("%A %-d %B %Y, %H:%M")
            )
        }
        Err(_) => format!("The caller's time zone is {name}."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iana_names_are_accepted_and_others_refused() {
        for ok in [
            "Europe/London",
            "America/New_York",
            "Australia/Sydney",
            "UTC",
            " Asia/Kolkata ",
        ] {
            assert_eq!(parse(ok).as_deref(), Ok(ok.trim()), "{ok}");
        }
        // Stored as the database spells it.
        assert_eq!(parse("europe/london").as_deref(), Ok("Europe/London"));
        assert_eq!(parse("AMERICA/NEW_YORK").as_deref(), Ok("America/New_York"));
        for bad in [
            "",
            "Mars/Olympus_Mons",
            "Europe/Londn",
            "EST+5",
            "<+03>-3",
            "../../etc/passwd",
            &"A".repeat(65),
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(
                (e.field.as_str(), e.code),
                ("timezone", INVALID_TIMEZONE),
                "{bad}"
            );
        }
    }

    /// 2026-12-02T19:30:00Z is a Wednesday: evening in London, the next morning in Sydney
    /// (summer time there), early afternoon in New York.
    #[test]
    fn the_prompt_says_the_callers_local_time() {
        let now = 1_796_239_800_000; // 2026-12-02T19:30:00Z
        assert_eq!(
            prompt_line(Some("Europe/London"), now),
            "For the caller it is now Wednesday 2 December 2026, 19:30 (time zone Europe/London)."
        );
        assert_eq!(
            prompt_line(Some("Australia/Sydney"), now),
            "For the caller it is now Thursday 3 December 2026, 06:30 (time zone Australia/Sydney)."
        );
        assert_eq!(
            prompt_line(Some("America/New_York"), now),
            "For the caller it is now Wednesday 2 December 2026, 14:30 (time zone America/New_York)."
        );
        assert_eq!(
            prompt_line(None, now),
            "For the caller it is now Wednesday 2 December 2026, 19:30 (time zone UTC)."
        );
        assert_eq!(
            prompt_line(Some("Nowhere/Land"), now),
            prompt_line(None, now)
        );
    }
}
