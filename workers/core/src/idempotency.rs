//! Client idempotency for the POSTs that create something billable
//! (`POST /api/calls/trigger`, `/api/calls/schedule`, `/api/schedules`): what an
//! `Idempotency-Key` may be, which request a key was first used for, and what a repeat
//! gets. Modelled on Stripe's behaviour (PROTOCOLS.md §7).
//!
//! The Worker claims a key (one row per user and key, written before the work, so of
//! concurrent requests with one key exactly one runs), runs the request, then stores its
//! answer ([`Outcome::Store`]) or gives the key back ([`Outcome::Release`]). A later
//! request with the key is decided by [`decide`] from what the row holds.

use sha2::{Digest, Sha256};

/// The longest key accepted, in bytes (Stripe's limit).
pub const KEY_MAX: usize = 255;
/// How long a key is remembered after its first use; after that it is free again (and
/// the row is pruned).
pub const TTL_MS: i64 = 24 * 60 * 60 * 1000;

/// 400: the key is empty, too long or not printable ASCII.
pub const INVALID_KEY: &str = "invalid_idempotency_key";
/// 409: the key was used for another request (another route or another body).
pub const KEY_REUSED: &str = "idempotency_key_reused";
/// 409: the first request with the key is still running.
pub const KEY_IN_PROGRESS: &str = "idempotency_key_in_progress";
/// The response header that marks an answer replayed from an earlier request.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// The routes that take an `Idempotency-Key` of their own. The name is part of the
/// fingerprint, so one key on two routes is two different requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    CallTrigger,
    CallSchedule,
    ScheduleCreate,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::CallTrigger => "POST /api/calls/trigger",
            Route::CallSchedule => "POST /api/calls/schedule",
            Route::ScheduleCreate => "POST /api/schedules",
        }
    }
}

/// The `Idempotency-Key` header's value as a key: surrounding whitespace dropped, then 1
/// to [`KEY_MAX`] printable ASCII characters (space through `~`). `Err` carries the
/// message of the 400.
pub fn parse_key(raw: &str) -> Result<&str, String> {
    let key = raw.trim();
    if key.is_empty() || key.len() > KEY_MAX {
        return Err(format!(
            "Idempotency-Key must be 1 to {KEY_MAX} characters; this one has {}.",
            key.chars().count()
        ));
    }
    if !key.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err("Idempotency-Key must be printable ASCII (space through ~).".to_owned());
    }
    Ok(key)
}

/// What identifies a request for its key: hex SHA-256 over the route, the user's id and
/// the body. A body that is JSON counts as its canonical form (compact, object keys
/// sorted, numbers as serde_json writes them), so whitespace and key order do not make
/// two requests differ; any other body (which the route refuses anyway) counts as its
/// bytes.
pub fn fingerprint(route: Route, user_id: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(route.as_str().as_bytes());
    h.update(b"\n");
    h.update(user_id.as_bytes());
    h.update(b"\n");
    match serde_json::from_slice::<serde_json::Value>(body) {
        // `Value`'s objects are ordered maps (serde_json without `preserve_order`), so
        // writing it back out sorts every object's keys; a test below holds this.
        Ok(v) => {
            h.update(b"json:");
            h.update(v.to_string().as_bytes());
        }
        Err(_) => {
            h.update(b"raw:");
            h.update(body);
        }
    }
    hex::encode(h.finalize())
}

/// When a key claimed at `now_ms` expires.
pub fn expires_at(now_ms: i64) -> i64 {
    now_ms.saturating_add(TTL_MS)
}

/// What storage holds for a user's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub fingerprint: String,
    /// The first request's status and JSON body; `None` while it runs.
    pub response: Option<(u16, String)>,
    pub expires_at_ms: i64,
}

/// What a request whose key is already stored gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The same request, answered before: its status and body again, nothing run.
    Replay { status: u16, body: String },
    /// Another request under this key: 409 [`KEY_REUSED`], nothing run.
    Reused,
    /// The same request, still running: 409 [`KEY_IN_PROGRESS`], nothing run.
    InProgress,
    /// The key's time is up: it is free, as if never used.
    Expired,
}

/// The decision for a request with `fingerprint` at `now_ms`, given what is stored.
pub fn decide(stored: &Stored, fingerprint: &str, now_ms: i64) -> Decision {
    if now_ms >= stored.expires_at_ms {
        return Decision::Expired;
    }
    if stored.fingerprint != fingerprint {
        return Decision::Reused;
    }
    match &stored.response {
        Some((status, body)) => Decision::Replay {
            status: *status,
            body: body.clone(),
        },
        None => Decision::InProgress,
    }
}

/// What becomes of a claimed key once its request has been answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Keep the answer for replays: a success, or a 5xx (the work may have been partly
    /// done, so running it again could book twice; the client retries with a new key
    /// once it has checked what exists).
    Store,
    /// Give the key back: a 4xx is the client's mistake, nothing was created, and a
    /// corrected request with the same key must run.
    Release,
}

pub fn outcome(status: u16) -> Outcome {
    if (400..500).contains(&status) {
        Outcome::Release
    } else {
        Outcome::Store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_764_806_400_000; // 2025-12-04T00:00:00Z

    #[test]
    fn keys_are_one_to_255_printable_ascii_characters() {
        assert_eq!(
            parse_key("0b5f3c9e-8a4d-4e7b-9a61-2f0c1d2e3f40"),
            Ok("0b5f3c9e-8a4d-4e7b-9a61-2f0c1d2e3f40")
        );
        assert_eq!(
            parse_key("  retry #2 / order=9  "),
            Ok("retry #2 / order=9")
        );
        assert_eq!(parse_key("~!{}"), Ok("~!{}"));
        let longest = "k".repeat(KEY_MAX);
        assert_eq!(parse_key(&longest), Ok(longest.as_str()));
        assert!(parse_key(&"k".repeat(KEY_MAX + 1))
            .unwrap_err()
            .contains("1 to 255"));
        assert!(parse_key("").is_err());
        assert!(parse_key("   ").is_err());
        assert!(parse_key("naïve").unwrap_err().contains("printable ASCII"));
        assert!(parse_key("tab\there").is_err());
        assert!(parse_key("del\u{7f}").is_err());
    }

    #[test]
    fn a_fingerprint_ignores_whitespace_and_key_order() {
        let a = fingerprint(
            Route::CallSchedule,
            "u1",
            br#"{"persona_id":"brad","scheduled_time":"2026-12-05T07:00:00Z","x":{"b":1,"a":[2,3]}}"#,
        );
        let b = fingerprint(
            Route::CallSchedule,
            "u1",
            b"{ \"x\": {\"a\": [2, 3], \"b\": 1},\n  \"scheduled_time\": \"2026-12-05T07:00:00Z\", \"persona_id\": \"brad\" }",
        );
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn a_fingerprint_differs_by_body_route_and_user() {
        let body = br#"{"persona_id":"brad"}"#;
        let base = fingerprint(Route::CallTrigger, "u1", body);
        assert_ne!(
            base,
            fingerprint(Route::CallTrigger, "u1", br#"{"persona_id":"sara"}"#)
        );
        assert_ne!(base, fingerprint(Route::CallSchedule, "u1", body));
        assert_ne!(base, fingerprint(Route::ScheduleCreate, "u1", body));
        assert_ne!(base, fingerprint(Route::CallTrigger, "u2", body));
        // A value's type matters: "1" is not 1.
        assert_ne!(
            fingerprint(Route::CallTrigger, "u1", br#"{"a":1}"#),
            fingerprint(Route::CallTrigger, "u1", br#"{"a":"1"}"#)
        );
    }

    #[test]
    fn a_body_that_is_not_json_counts_as_its_bytes() {
        let a = fingerprint(Route::CallTrigger, "u1", b"{not json");
        assert_eq!(a, fingerprint(Route::CallTrigger, "u1", b"{not json"));
        assert_ne!(a, fingerprint(Route::CallTrigger, "u1", b"{not  json"));
        // Never confused with a JSON body of the same text.
        assert_ne!(
            fingerprint(Route::CallTrigger, "u1", b"\"x\""),
            fingerprint(Route::CallTrigger, "u1", b"\"x\"\"")
        );
    }

    fn stored(fp: &str, response: Option<(u16, &str)>) -> Stored {
        Stored {
            fingerprint: fp.to_owned(),
            response: response.map(|(s, b)| (s, b.to_owned())),
            expires_at_ms: expires_at(T0),
        }
    }

    #[test]
    fn the_same_request_answered_before_is_replayed() {
        let s = stored("fp", Some((201, r#"{"call":{"id":"c1"}}"#)));
        assert_eq!(
            decide(&s, "fp", T0 + 1_000),
            Decision::Replay {
                status: 201,
                body: r#"{"call":{"id":"c1"}}"#.to_owned()
            }
        );
        // A stored 5xx is replayed like any answer.
        let s = stored("fp", Some((500, r#"{"error":{}}"#)));
        assert!(matches!(
            decide(&s, "fp", T0),
            Decision::Replay { status: 500, .. }
        ));
    }

    #[test]
    fn another_body_under_the_key_is_refused_answered_or_running() {
        assert_eq!(
            decide(&stored("fp", Some((201, "{}"))), "other", T0),
            Decision::Reused
        );
        assert_eq!(decide(&stored("fp", None), "other", T0), Decision::Reused);
    }

    #[test]
    fn the_same_request_while_the_first_runs_is_in_progress() {
        assert_eq!(
            decide(&stored("fp", None), "fp", T0 + 5),
            Decision::InProgress
        );
    }

    #[test]
    fn a_key_is_remembered_for_24_hours_then_free() {
        let answered = stored("fp", Some((201, "{}")));
        let running = stored("fp", None);
        let last_ms = T0 + TTL_MS - 1;
        assert!(matches!(
            decide(&answered, "fp", last_ms),
            Decision::Replay { .. }
        ));
        assert_eq!(decide(&answered, "other", last_ms), Decision::Reused);
        assert_eq!(decide(&running, "fp", last_ms), Decision::InProgress);
        for d in [
            decide(&answered, "fp", T0 + TTL_MS),
            decide(&answered, "other", T0 + TTL_MS),
            decide(&running, "fp", T0 + TTL_MS + 60_000),
        ] {
            assert_eq!(d, Decision::Expired);
        }
        assert_eq!(expires_at(T0), T0 + 86_400_000);
        assert_eq!(expires_at(i64::MAX - 1), i64::MAX);
    }

    #[test]
    fn client_errors_release_the_key_everything_else_is_stored() {
        for status in [400, 402, 403, 404, 409, 422, 429, 499] {
            assert_eq!(outcome(status), Outcome::Release, "{status}");
        }
        for status in [200, 201, 202, 204, 500, 502, 503] {
            assert_eq!(outcome(status), Outcome::Store, "{status}");
        }
    }
}
