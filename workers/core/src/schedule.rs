//! Recurring schedules, decided: "every weekday at 07:00 in Europe/London".
//!
//! A schedule is a time of day, a set of weekdays and an IANA time zone. Its occurrences
//! are wall-clock times in that zone, so they follow daylight-saving changes: a 02:30
//! call on a spring-forward day (02:30 does not exist) happens at 03:30 local, and on a
//! fall-back day (02:30 happens twice) it happens once, at the first. Each occurrence is
//! booked as an ordinary scheduled call; a `no_answer` or `busy` attempt is retried
//! `retries` times, `retry_after_minutes` apart, then the schedule moves on.
//!
//! Everything here takes `now`; nothing reads a clock.

use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use jiff::Timestamp;

use crate::calls::CallStatus;
use crate::validate::ValidationError;

/// The shortest delay between attempts users may choose (API.md: 5–120 minutes); tests
/// may lower it with `SCHEDULE_MIN_RETRY_MINUTES`.
pub const MIN_RETRY_AFTER_MINUTES: u32 = 5;
pub const MAX_RETRY_AFTER_MINUTES: u32 = 120;
pub const DEFAULT_RETRY_AFTER_MINUTES: u32 = 10;
pub const MAX_RETRIES: u32 = 3;
pub const DEFAULT_RETRIES: u32 = 1;

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// A set of weekdays, stored as a bit mask (bit 0 Monday … bit 6 Sunday), never empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Days(u8);

impl Days {
    pub const ALL: Days = Days(0x7f);
    /// Monday to Friday.
    pub const WEEKDAYS: Days = Days(0x1f);

    /// `["mon", "wed"]`, in any order and case; repeats are allowed, an empty list is not.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Days, ValidationError> {
        let invalid = |message: &str| ValidationError::new("days", "invalid_days", message);
        if names.is_empty() {
            return Err(invalid("days must name at least one day."));
        }
        let mut bits = 0u8;
        for name in names {
            let name = name.as_ref().trim().to_ascii_lowercase();
            let Some(i) = DAY_NAMES.iter().position(|d| *d == name) else {
                return Err(invalid(
                    "days must be a list of mon, tue, wed, thu, fri, sat, sun.",
                ));
            };
            bits |= 1 << i;
        }
        Ok(Days(bits))
    }

    /// The stored mask; `None` when it is empty or out of range.
    pub fn from_bits(bits: u8) -> Option<Days> {
        (bits != 0 && bits <= Self::ALL.0).then_some(Days(bits))
    }

    pub fn bits(self) -> u8 {
        self.0
    }

    /// The days' names, Monday first.
    pub fn names(self) -> Vec<&'static str> {
        DAY_NAMES
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, d)| *d)
            .collect()
    }

    /// Whether `day` is one of them; `day` counts from Monday = 0.
    pub fn contains(self, monday_zero: u8) -> bool {
        monday_zero < 7 && self.0 & (1 << monday_zero) != 0
    }
}

/// A wall-clock time of day, to the minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeOfDay {
    hour: u8,
    minute: u8,
}

impl TimeOfDay {
    /// `"07:00"`, `"7:05"`, `"23:59"`.
    pub fn parse(s: &str) -> Result<TimeOfDay, ValidationError> {
        let invalid = || {
            ValidationError::new(
                "time_of_day",
                "invalid_time_of_day",
                "time_of_day must be a 24-hour time HH:MM, from 00:00 to 23:59.",
            )
        };
        let (h, m) = s.trim().split_once(':').ok_or_else(invalid)?;
        let digits = |p: &str, max_len| {
            !p.is_empty() && p.len() <= max_len && p.bytes().all(|b| b.is_ascii_digit())
        };
        if !digits(h, 2) || m.len() != 2 || !digits(m, 2) {
            return Err(invalid());
        }
        let (hour, minute) = (h.parse::<u8>(), m.parse::<u8>());
        match (hour, minute) {
            (Ok(hour), Ok(minute)) if hour < 24 && minute < 60 => Ok(TimeOfDay { hour, minute }),
            _ => Err(invalid()),
        }
    }

    fn civil(self) -> Time {
        // In range by construction.
        Time::constant(self.hour as i8, self.minute as i8, 0, 0)
    }
}

impl std::fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02}:{:02}", self.hour, self.minute)
    }
}

/// How many times a missed occurrence is tried again: 0–3, 1 when left out.
pub fn retries(given: Option<i64>) -> Result<u32, ValidationError> {
    match given {
        None => Ok(DEFAULT_RETRIES),
        Some(n) if (0..=i64::from(MAX_RETRIES)).contains(&n) => Ok(n as u32),
        Some(_) => Err(ValidationError::new(
            "retries",
            "invalid_retries",
            format!("retries must be a whole number from 0 to {MAX_RETRIES}."),
        )),
    }
}

/// Minutes between attempts: `min`–120 (`min` is 5 outside tests), 10 when left out.
pub fn retry_after_minutes(given: Option<i64>, min: u32) -> Result<u32, ValidationError> {
    match given {
        None => Ok(DEFAULT_RETRY_AFTER_MINUTES.max(min)),
        Some(n) if (i64::from(min)..=i64::from(MAX_RETRY_AFTER_MINUTES)).contains(&n) => {
            Ok(n as u32)
        }
        Some(_) => Err(ValidationError::new(
            "retry_after_minutes",
            "invalid_retry_after",
            format!(
                "retry_after_minutes must be a whole number from {min} to {MAX_RETRY_AFTER_MINUTES}."
            ),
        )),
    }
}

/// The first occurrence strictly after `after_ms` (ms since the epoch), as ms since the
/// epoch: the first listed day, from the local date of `after_ms` on, whose `time` is
/// still to come. A time that does not exist that day (spring forward) moves forward by
/// the gap; one that happens twice (fall back) is its first. `None` for an unknown zone
/// or a time outside jiff's range.
pub fn next_occurrence(time: TimeOfDay, days: Days, zone: &str, after_ms: i64) -> Option<i64> {
    let tz = TimeZone::get(zone).ok()?;
    let after = Timestamp::from_millisecond(after_ms).ok()?;
    let mut date: Date = after.to_zoned_datetime(tz.clone()).date();
    // Any set of days has one within a week, counted from today.
    for _ in 0..8 {
        let weekday = date.weekday().to_monday_zero_offset() as u8;
        if days.contains(weekday) {
            let at = tz
                .to_ambiguous_zoned_datetime(date.to_datetime(time.civil()))
                .compatible()
                .ok()?
                .timestamp();
            if at > after {
                return Some(at.as_millisecond());
            }
        }
        date = date.tomorrow().ok()?;
    }
    None
}

/// Whether an attempt that ended `status` is tried again (`attempt` counts from 0, the
/// occurrence itself).
pub fn retried(status: CallStatus, attempt: u32, retries: u32) -> bool {
    matches!(status, CallStatus::NoAnswer | CallStatus::Busy) && attempt < retries
}

/// An attempt of a schedule that has just settled.
#[derive(Debug, Clone)]
pub struct Attempt<'a> {
    pub status: CallStatus,
    /// 0 for the occurrence, 1.. for its retries.
    pub attempt: u32,
    pub retries: u32,
    pub retry_after_minutes: u32,
    /// When the attempt was booked for (RFC 3339), if it was a scheduled call.
    pub scheduled_at: Option<&'a str>,
}

/// What to book next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Next {
    pub at_ms: u64,
    /// 0: the next occurrence; 1..: a retry of this one.
    pub attempt: u32,
}

/// After `done` settled at `now_ms`: its retry, `retry_after_minutes` from now (while
/// retries are left, and only if it comes before the next occurrence), or else the next
/// occurrence after both now and the attempt's own time. Errors name stored data that
/// does not parse.
pub fn after_attempt(
    done: &Attempt<'_>,
    time_of_day: &str,
    days: i64,
    zone: &str,
    now_ms: i64,
) -> Result<Next, String> {
    let time = TimeOfDay::parse(time_of_day).map_err(|e| format!("time_of_day: {}", e.message))?;
    let days = u8::try_from(days)
        .ok()
        .and_then(Days::from_bits)
        .ok_or_else(|| format!("days out of range: {days}"))?;
    let booked_ms = match done.scheduled_at {
        Some(at) => at
            .parse::<Timestamp>()
            .map_err(|e| format!("scheduled_at {at:?}: {e}"))?
            .as_millisecond(),
        None => now_ms,
    };
    let after = now_ms.max(booked_ms);
    let next = next_occurrence(time, days, zone, after)
        .ok_or_else(|| format!("no next occurrence in {zone:?}"))?;
    let to_ms = |ms: i64| u64::try_from(ms).map_err(|_| format!("time before 1970: {ms}"));
    if retried(done.status, done.attempt, done.retries) {
        let retry = now_ms.saturating_add(i64::from(done.retry_after_minutes) * 60_000);
        if retry < next {
            return Ok(Next {
                at_ms: to_ms(retry)?,
                attempt: done.attempt + 1,
            });
        }
    }
    Ok(Next {
        at_ms: to_ms(next)?,
        attempt: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> i64 {
        rfc3339.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn utc(ms: i64) -> String {
        Timestamp::from_millisecond(ms).unwrap().to_string()
    }

    fn next(time: &str, days: Days, zone: &str, after: &str) -> String {
        let t = TimeOfDay::parse(time).unwrap();
        utc(next_occurrence(t, days, zone, ms(after)).unwrap())
    }

    #[test]
    fn times_of_day_parse_and_print_as_hh_mm() {
        for (given, shown) in [
            ("07:00", "07:00"),
            ("7:05", "07:05"),
            ("23:59", "23:59"),
            (" 00:00 ", "00:00"),
        ] {
            assert_eq!(
                TimeOfDay::parse(given).unwrap().to_string(),
                shown,
                "{given}"
            );
        }
        for bad in [
            "",
            "7",
            "24:00",
            "12:60",
            "12:5",
            "12:005",
            "-1:00",
            "ab:cd",
            "12:00:00",
            "１２:00",
        ] {
            let e = TimeOfDay::parse(bad).unwrap_err();
            assert_eq!(
                (e.field.as_str(), e.code),
                ("time_of_day", "invalid_time_of_day"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn days_parse_to_a_mask_and_back_to_names() {
        let d = Days::parse(&["fri", "MON", "wed", "mon"]).unwrap();
        assert_eq!(d.bits(), 0b10101);
        assert_eq!(d.names(), ["mon", "wed", "fri"]);
        assert_eq!(Days::from_bits(d.bits()), Some(d));
        assert_eq!(Days::ALL.names().len(), 7);
        assert_eq!(
            Days::parse(&["mon", "tue", "wed", "thu", "fri"]).unwrap(),
            Days::WEEKDAYS
        );
        assert_eq!(Days::from_bits(0), None);
        assert_eq!(Days::from_bits(0x80), None);
        for bad in [vec![], vec!["monday"], vec!["mon", ""], vec!["xyz"]] {
            let e = Days::parse(&bad).unwrap_err();
            assert_eq!(
                (e.field.as_str(), e.code),
                ("days", "invalid_days"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn retries_and_their_delay_default_and_stay_in_range() {
        assert_eq!(retries(None), Ok(1));
        assert_eq!(retries(Some(0)), Ok(0));
        assert_eq!(retries(Some(3)), Ok(3));
        for bad in [-1, 4, 100] {
            assert_eq!(retries(Some(bad)).unwrap_err().code, "invalid_retries");
        }
        assert_eq!(retry_after_minutes(None, 5), Ok(10));
        assert_eq!(retry_after_minutes(Some(5), 5), Ok(5));
        assert_eq!(retry_after_minutes(Some(120), 5), Ok(120));
        for bad in [4, 0, 121, -5] {
            let e = retry_after_minutes(Some(bad), 5).unwrap_err();
            assert_eq!(
                (e.field.as_str(), e.code),
                ("retry_after_minutes", "invalid_retry_after")
            );
        }
        // The test-only minimum lets a retry come at once.
        assert_eq!(retry_after_minutes(Some(0), 0), Ok(0));
    }

    #[test]
    fn the_next_occurrence_is_later_today_or_on_the_next_listed_day() {
        // 2026-12-02 is a Wednesday.
        let all = Days::ALL;
        assert_eq!(
            next("07:00", all, "UTC", "2026-12-02T06:59:59Z"),
            "2026-12-02T07:00:00Z"
        );
        // Strictly after: at the minute itself, it is tomorrow's.
        assert_eq!(
            next("07:00", all, "UTC", "2026-12-02T07:00:00Z"),
            "2026-12-03T07:00:00Z"
        );
        // Weekdays from Friday evening: Monday.
        assert_eq!(
            next("07:00", Days::WEEKDAYS, "UTC", "2026-12-04T08:00:00Z"),
            "2026-12-07T07:00:00Z"
        );
        // Only Wednesday, just after Wednesday's: a week on.
        let wed = Days::parse(&["wed"]).unwrap();
        assert_eq!(
            next("07:00", wed, "UTC", "2026-12-02T07:01:00Z"),
            "2026-12-09T07:00:00Z"
        );
        // The local day decides the weekday: 23:30 Tuesday in New York is Wednesday in UTC.
        let tue = Days::parse(&["tue"]).unwrap();
        assert_eq!(
            next("23:45", tue, "America/New_York", "2026-12-02T04:30:00Z"),
            "2026-12-02T04:45:00Z"
        );
    }

    #[test]
    fn occurrences_cross_month_and_year_ends() {
        let all = Days::ALL;
        assert_eq!(
            next("07:00", all, "UTC", "2026-11-30T08:00:00Z"),
            "2026-12-01T07:00:00Z"
        );
        assert_eq!(
            next("07:00", all, "UTC", "2026-12-31T08:00:00Z"),
            "2027-01-01T07:00:00Z"
        );
        // 2028 is a leap year.
        assert_eq!(
            next("07:00", all, "UTC", "2028-02-28T08:00:00Z"),
            "2028-02-29T07:00:00Z"
        );
        assert_eq!(
            next("07:00", all, "UTC", "2027-02-28T08:00:00Z"),
            "2027-03-01T07:00:00Z"
        );
        // Sundays only, from Wednesday 30 December 2026: Sunday 3 January 2027, Sydney
        // morning (UTC+11 in summer) being Saturday evening in UTC.
        let sun = Days::parse(&["sun"]).unwrap();
        assert_eq!(
            next("07:00", sun, "Australia/Sydney", "2026-12-30T00:00:00Z"),
            "2027-01-02T20:00:00Z"
        );
    }

    #[test]
    fn new_york_follows_its_daylight_saving_changes() {
        let all = Days::ALL;
        let ny = "America/New_York";
        // 07:00 is 12:00Z in winter (EST) and 11:00Z in summer (EDT), across 8 March 2026.
        assert_eq!(
            next("07:00", all, ny, "2026-03-07T13:00:00Z"),
            "2026-03-08T11:00:00Z"
        );
        assert_eq!(
            next("07:00", all, ny, "2026-03-06T13:00:00Z"),
            "2026-03-07T12:00:00Z"
        );
        // 02:30 does not exist on 8 March 2026: it happens at 03:30 EDT (07:30Z).
        assert_eq!(
            next("02:30", all, ny, "2026-03-08T05:00:00Z"),
            "2026-03-08T07:30:00Z"
        );
        // 01:30 happens twice on 1 November 2026: only the first (EDT, 05:30Z) is an
        // occurrence; after it comes 2 November's (EST, 06:30Z).
        assert_eq!(
            next("01:30", all, ny, "2026-11-01T04:00:00Z"),
            "2026-11-01T05:30:00Z"
        );
        assert_eq!(
            next("01:30", all, ny, "2026-11-01T05:30:00Z"),
            "2026-11-02T06:30:00Z"
        );
    }

    #[test]
    fn london_follows_its_daylight_saving_changes() {
        let all = Days::ALL;
        let london = "Europe/London";
        // BST starts 29 March 2026 at 01:00 GMT: 01:30 does not exist and is 02:30 BST.
        assert_eq!(
            next("01:30", all, london, "2026-03-29T00:00:00Z"),
            "2026-03-29T01:30:00Z"
        );
        assert_eq!(
            next("07:00", all, london, "2026-03-28T08:00:00Z"),
            "2026-03-29T06:00:00Z"
        );
        // BST ends 25 October 2026: 01:30 happens twice, the first is at 00:30Z.
        assert_eq!(
            next("01:30", all, london, "2026-10-25T00:00:00Z"),
            "2026-10-25T00:30:00Z"
        );
        assert_eq!(
            next("01:30", all, london, "2026-10-25T00:30:00Z"),
            "2026-10-26T01:30:00Z"
        );
    }

    #[test]
    fn sydney_follows_its_daylight_saving_changes() {
        let all = Days::ALL;
        let sydney = "Australia/Sydney";
        // AEDT starts 4 October 2026 at 02:00 AEST (16:00Z on the 3rd): 02:30 is 03:30
        // AEDT, 16:30Z.
        assert_eq!(
            next("02:30", all, sydney, "2026-10-03T15:00:00Z"),
            "2026-10-03T16:30:00Z"
        );
        // AEDT ends 5 April 2026 at 03:00 AEDT (16:00Z on the 4th): 02:30 happens twice;
        // the first is AEDT (15:30Z), then 6 April's is AEST (16:30Z).
        assert_eq!(
            next("02:30", all, sydney, "2026-04-04T15:00:00Z"),
            "2026-04-04T15:30:00Z"
        );
        assert_eq!(
            next("02:30", all, sydney, "2026-04-04T15:30:00Z"),
            "2026-04-05T16:30:00Z"
        );
        // 07:00 in summer (UTC+11) and winter (UTC+10).
        assert_eq!(
            next("07:00", all, sydney, "2026-01-10T00:00:00Z"),
            "2026-01-10T20:00:00Z"
        );
        assert_eq!(
            next("07:00", all, sydney, "2026-07-10T00:00:00Z"),
            "2026-07-10T21:00:00Z"
        );
    }

    #[test]
    fn an_unknown_zone_has_no_occurrence() {
        let t = TimeOfDay::parse("07:00").unwrap();
        assert_eq!(next_occurrence(t, Days::ALL, "Mars/Olympus_Mons", 0), None);
    }

    fn attempt(status: CallStatus, attempt: u32, scheduled_at: &str) -> Attempt<'_> {
        Attempt {
            status,
            attempt,
            retries: 2,
            retry_after_minutes: 10,
            scheduled_at: Some(scheduled_at),
        }
    }

    #[test]
    fn a_missed_occurrence_is_retried_then_given_up() {
        let at = "2026-12-02T07:00:00Z";
        let now = ms("2026-12-02T07:00:40Z");
        let plan =
            |status, n| after_attempt(&attempt(status, n, at), "07:00", 0x7f, "UTC", now).unwrap();
        for status in [CallStatus::NoAnswer, CallStatus::Busy] {
            assert_eq!(
                plan(status, 0),
                Next {
                    at_ms: (now + 600_000) as u64,
                    attempt: 1
                },
                "{status:?}"
            );
            assert_eq!(plan(status, 1).attempt, 2);
            // Retries used up: tomorrow's occurrence.
            assert_eq!(
                plan(status, 2),
                Next {
                    at_ms: ms("2026-12-03T07:00:00Z") as u64,
                    attempt: 0
                }
            );
        }
        // Answered, failed or canceled: never retried.
        for status in [
            CallStatus::Completed,
            CallStatus::Failed,
            CallStatus::Canceled,
        ] {
            assert_eq!(
                plan(status, 0),
                Next {
                    at_ms: ms("2026-12-03T07:00:00Z") as u64,
                    attempt: 0
                }
            );
        }
    }

    #[test]
    fn a_retry_never_runs_into_the_next_occurrence() {
        let done = Attempt {
            status: CallStatus::NoAnswer,
            attempt: 0,
            retries: 3,
            retry_after_minutes: 120,
            scheduled_at: Some("2026-12-02T06:00:00Z"),
        };
        // Every day at 07:00; the 06:00 attempt (booked before a PATCH moved the time)
        // ended at 06:01: a retry at 08:01 would pass 07:00, so 07:00 comes instead.
        let plan = after_attempt(&done, "07:00", 0x7f, "UTC", ms("2026-12-02T06:01:00Z")).unwrap();
        assert_eq!(
            plan,
            Next {
                at_ms: ms("2026-12-02T07:00:00Z") as u64,
                attempt: 0
            }
        );
    }

    #[test]
    fn a_canceled_early_attempt_moves_to_the_occurrence_after_its_own() {
        // Canceled at 06:00 for 07:00: the next is tomorrow's, not the canceled one.
        let done = attempt(CallStatus::Canceled, 0, "2026-12-02T07:00:00Z");
        let plan = after_attempt(&done, "07:00", 0x7f, "UTC", ms("2026-12-02T06:00:00Z")).unwrap();
        assert_eq!(
            plan,
            Next {
                at_ms: ms("2026-12-03T07:00:00Z") as u64,
                attempt: 0
            }
        );
    }

    #[test]
    fn stored_data_that_does_not_parse_is_an_error() {
        let done = attempt(CallStatus::Completed, 0, "2026-12-02T07:00:00Z");
        assert!(after_attempt(&done, "7am", 0x7f, "UTC", 0).is_err());
        assert!(after_attempt(&done, "07:00", 0, "UTC", 0).is_err());
        assert!(after_attempt(&done, "07:00", 0x7f, "Nowhere/Land", 0).is_err());
        let bad = attempt(CallStatus::Completed, 0, "yesterday");
        assert!(after_attempt(&bad, "07:00", 0x7f, "UTC", 0).is_err());
    }
}
