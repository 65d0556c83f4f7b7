//! The call's status machine, Twilio's status vocabulary, and schedule-time rules.
//!
//! Owns which status changes are legal ("never move backwards", finals are final) and the
//! mapping from Twilio callbacks. Applying a change — idempotently, in the DO and the
//! database — is the Worker's job.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::validate::{codes, ValidationError};

/// How far ahead a call may be scheduled (API.md: ≤ 30 days).
pub const MAX_SCHEDULE_AHEAD_SECS: i64 = 30 * 24 * 60 * 60;

/// A call's status, as stored and as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallStatus {
    Scheduled,
    Queued,
    Ringing,
    InProgress,
    Completed,
    Busy,
    NoAnswer,
    Failed,
    Canceled,
}

impl CallStatus {
    pub const ALL: [CallStatus; 9] = [
        CallStatus::Scheduled,
        CallStatus::Queued,
        CallStatus::Ringing,
        CallStatus::InProgress,
        CallStatus::Completed,
        CallStatus::Busy,
        CallStatus::NoAnswer,
        CallStatus::Failed,
        CallStatus::Canceled,
    ];

    /// The stored/serialized name (`in_progress`, `no_answer`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            CallStatus::Scheduled => "scheduled",
            CallStatus::Queued => "queued",
            CallStatus::Ringing => "ringing",
            CallStatus::InProgress => "in_progress",
            CallStatus::Completed => "completed",
            CallStatus::Busy => "busy",
            CallStatus::NoAnswer => "no_answer",
            CallStatus::Failed => "failed",
            CallStatus::Canceled => "canceled",
        }
    }

    /// True once the call is over; nothing changes a final status.
    pub fn is_final(self) -> bool {
        self.rank() == 4
    }

    /// Progress order: a status may only move to a higher rank. All final statuses share
    /// the top rank, so one final status never replaces another.
    pub fn rank(self) -> u8 {
        match self {
            CallStatus::Scheduled => 0,
            CallStatus::Queued => 1,
            CallStatus::Ringing => 2,
            CallStatus::InProgress => 3,
            CallStatus::Completed
            | CallStatus::Busy
            | CallStatus::NoAnswer
            | CallStatus::Failed
            | CallStatus::Canceled => 4,
        }
    }

    /// Whether the user may still cancel (API.md: only while scheduled or queued).
    pub fn is_user_cancelable(self) -> bool {
        matches!(self, CallStatus::Scheduled | CallStatus::Queued)
    }
}

impl fmt::Display for CallStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status name that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown call status {0:?}")]
pub struct UnknownCallStatus(pub String);

impl FromStr for CallStatus {
    type Err = UnknownCallStatus;

    /// Parses our own (stored) names, not Twilio's: see [`map_twilio_status`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CallStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownCallStatus(s.to_owned()))
    }
}

/// Maps Twilio's `CallStatus` (or status-callback event) to ours; `None` for values we
/// do not know, which the caller ignores rather than guesses.
pub fn map_twilio_status(s: &str) -> Option<CallStatus> {
    Some(match s {
        "queued" | "initiated" => CallStatus::Queued,
        "ringing" => CallStatus::Ringing,
        "in-progress" | "answered" => CallStatus::InProgress,
        "completed" => CallStatus::Completed,
        "busy" => CallStatus::Busy,
        "no-answer" => CallStatus::NoAnswer,
        "failed" => CallStatus::Failed,
        "canceled" => CallStatus::Canceled,
        _ => return None,
    })
}

/// Whether moving `from` → `to` is progress. Callbacks arrive out of order and are
/// retried, so a stale or repeated one (same or lower rank) is refused, and nothing
/// leaves a final status.
pub fn transition_allowed(from: CallStatus, to: CallStatus) -> bool {
    !from.is_final() && to.rank() > from.rank()
}

/// Whether Twilio's `AnsweredBy` says a machine picked up (`machine_start`,
/// `machine_end_beep`, …, or `fax`), as opposed to `human` or `unknown`.
pub fn is_machine(answered_by: &str) -> bool {
    answered_by.starts_with("machine_") || answered_by == "fax"
}

/// Parses a requested `scheduled_time` (RFC 3339 with an offset) and checks it is after
/// `now_unix` and at most 30 days ahead. Returns unix seconds (sub-seconds dropped).
pub fn parse_scheduled_time(input: &str, now_unix: i64) -> Result<i64, ValidationError> {
    const FIELD: &str = "scheduled_time";
    let input = input.trim();
    if input.is_empty() {
        return Err(ValidationError::new(
            FIELD,
            codes::REQUIRED,
            "scheduled_time is required.",
        ));
    }
    let at = OffsetDateTime::parse(input, &Rfc3339)
        .map_err(|_| {
            ValidationError::new(
                FIELD,
                codes::INVALID_FORMAT,
                "scheduled_time must be an RFC 3339 date-time, e.g. 2030-01-02T08:30:00Z.",
            )
        })?
        .unix_timestamp();
    if at <= now_unix {
        return Err(ValidationError::new(
            FIELD,
            codes::OUT_OF_RANGE,
            "scheduled_time must be in the future.",
        ));
    }
    if at > now_unix.saturating_add(MAX_SCHEDULE_AHEAD_SECS) {
        return Err(ValidationError::new(
            FIELD,
            codes::OUT_OF_RANGE,
            "scheduled_time must be at most 30 days ahead.",
        ));
    }
    Ok(at)
}

/// Formats unix seconds as RFC 3339 UTC (`2023-11-14T22:13:20Z`), the API's timestamp
/// form; `None` outside the representable years.
pub fn format_rfc3339(unix: i64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()?
        .format(&Rfc3339)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use CallStatus::*;

    const NOW: i64 = 1_700_000_000; // 2023-11-14T22:13:20Z

    /// Serde names, `as_str`, `Display` and `FromStr` agree for every status.
    #[test]
    fn names_agree() {
        for s in CallStatus::ALL {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
            assert_eq!(s.to_string(), s.as_str());
            assert_eq!(s.as_str().parse::<CallStatus>(), Ok(s));
        }
        assert_eq!(
            serde_json::from_str::<CallStatus>("\"no_answer\"").unwrap(),
            NoAnswer
        );
        assert!("in-progress".parse::<CallStatus>().is_err());
    }

    /// Exactly the five end states are final.
    #[test]
    fn finals() {
        let finals: Vec<_> = CallStatus::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .collect();
        assert_eq!(finals, [Completed, Busy, NoAnswer, Failed, Canceled]);
        assert!(Scheduled.is_user_cancelable() && Queued.is_user_cancelable());
        assert!(!Ringing.is_user_cancelable() && !Completed.is_user_cancelable());
    }

    /// Every Twilio status and callback event maps as PROTOCOLS.md §3 says.
    #[test]
    fn twilio_mapping() {
        for (twilio, ours) in [
            ("initiated", Queued),
            ("queued", Queued),
            ("ringing", Ringing),
            ("in-progress", InProgress),
            ("answered", InProgress),
            ("completed", Completed),
            ("busy", Busy),
            ("no-answer", NoAnswer),
            ("failed", Failed),
            ("canceled", Canceled),
        ] {
            assert_eq!(map_twilio_status(twilio), Some(ours), "{twilio}");
        }
        for unknown in ["", "in_progress", "Completed", "cancelled", "paused"] {
            assert_eq!(map_twilio_status(unknown), None, "{unknown}");
        }
    }

    /// Forward moves are allowed (skipping steps too), backward and repeated ones are not,
    /// and nothing leaves a final status.
    #[test]
    fn transitions() {
        assert!(transition_allowed(Scheduled, Queued));
        assert!(transition_allowed(Queued, Ringing));
        assert!(transition_allowed(Ringing, InProgress));
        assert!(transition_allowed(InProgress, Completed));
        assert!(
            transition_allowed(Queued, Completed),
            "callback for ringing lost"
        );
        assert!(transition_allowed(Scheduled, Canceled));
        assert!(transition_allowed(Ringing, NoAnswer));
        assert!(
            !transition_allowed(InProgress, Ringing),
            "late ringing callback"
        );
        assert!(!transition_allowed(Ringing, Ringing), "retried callback");
        for from in CallStatus::ALL.into_iter().filter(|s| s.is_final()) {
            for to in CallStatus::ALL {
                assert!(!transition_allowed(from, to), "{from} -> {to}");
            }
        }
    }

    /// `machine_*` and `fax` are machines; `human`, `unknown` and empty are not.
    #[test]
    fn machines() {
        for m in [
            "machine_start",
            "machine_end_beep",
            "machine_end_silence",
            "machine_end_other",
            "fax",
        ] {
            assert!(is_machine(m), "{m}");
        }
        for h in ["human", "unknown", "", "machine"] {
            assert!(!is_machine(h), "{h}");
        }
    }

    /// Future times within 30 days parse (any offset); the bounds are exact.
    #[test]
    fn schedule_time_accepts() {
        assert_eq!(
            parse_scheduled_time("2023-11-14T22:13:21Z", NOW),
            Ok(NOW + 1)
        );
        assert_eq!(
            parse_scheduled_time(" 2023-11-15T00:13:30+02:00 ", NOW),
            Ok(NOW + 10)
        );
        assert_eq!(
            parse_scheduled_time("2023-12-14T22:13:20Z", NOW),
            Ok(NOW + MAX_SCHEDULE_AHEAD_SECS)
        );
        assert_eq!(
            parse_scheduled_time("2023-11-14T22:13:20.999Z", NOW),
            Err(ValidationError::new(
                "scheduled_time",
                codes::OUT_OF_RANGE,
                "scheduled_time must be in the future."
            )),
            "sub-seconds are dropped, so this is `now`"
        );
    }

    /// Past, now, beyond 30 days, offset-less and garbage inputs are refused with the
    /// right code.
    #[test]
    fn schedule_time_rejects() {
        let code = |s: &str| parse_scheduled_time(s, NOW).unwrap_err().code;
        assert_eq!(code("2023-11-14T22:13:20Z"), codes::OUT_OF_RANGE);
        assert_eq!(code("2020-01-01T00:00:00Z"), codes::OUT_OF_RANGE);
        assert_eq!(code("2023-12-14T22:13:21Z"), codes::OUT_OF_RANGE);
        assert_eq!(code("2023-11-20T10:00:00"), codes::INVALID_FORMAT);
        assert_eq!(code("tomorrow"), codes::INVALID_FORMAT);
        assert_eq!(code("1700000100"), codes::INVALID_FORMAT);
        assert_eq!(code(""), codes::REQUIRED);
    }

    /// Formatting is RFC 3339 UTC and parses back to the same instant.
    #[test]
    fn format_round_trip() {
        assert_eq!(format_rfc3339(NOW).as_deref(), Some("2023-11-14T22:13:20Z"));
        assert_eq!(format_rfc3339(0).as_deref(), Some("1970-01-01T00:00:00Z"));
        let s = format_rfc3339(NOW + 5).unwrap();
        assert_eq!(parse_scheduled_time(&s, NOW), Ok(NOW + 5));
        assert_eq!(format_rfc3339(i64::MAX), None);
    }
}
