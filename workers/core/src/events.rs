//! The operators' event log: what happened to calls, providers, webhooks, payments and
//! accounts, as small structured records (`events` table) that the console and the MCP
//! server search. The rules live here: which levels and kinds exist, how big a body may
//! be (and that transcripts and secrets never enter one), what the relay may send, how a
//! search is read from its parameters, and when an event is old enough to prune.

use serde::Deserialize;
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::validate::{codes, ValidationError};

/// Severity, ordered: a search for `warn` finds warnings and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Info, Level::Warn, Level::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }

    /// The stored rank (`events.level_rank`), so "at least warn" is one comparison.
    pub fn rank(self) -> i64 {
        match self {
            Level::Info => 1,
            Level::Warn => 2,
            Level::Error => 3,
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.as_str() == s)
    }
}

/// The kinds the Worker writes (the relay's own are `relay.<its event>`).
pub mod kind {
    pub const CALL_REQUESTED: &str = "call.requested";
    pub const CALL_STATUS: &str = "call.status";
    /// What the call's session machine logged (a provider's failure, a timeout, …).
    pub const CALL_SESSION: &str = "call.session";
    /// A request answered 5xx.
    pub const REQUEST_FAILED: &str = "request.failed";
    pub const WEBHOOK_REFUSED: &str = "webhook.refused";
    pub const STREAM_REFUSED: &str = "stream.refused";
    pub const PROVIDER_ERROR: &str = "provider.error";
    pub const PAYMENT_COMPLETED: &str = "payment.completed";
    pub const PAYMENT_REFUNDED: &str = "payment.refunded";
    pub const ADMIN_BAN: &str = "admin.ban";
    pub const ADMIN_UNBAN: &str = "admin.unban";
    pub const ADMIN_CREDITS: &str = "admin.credits";
    /// The cron pruned events past the retention.
    pub const EVENTS_PRUNED: &str = "events.pruned";
    /// The relay dropped events it could not ship (its queue was full).
    pub const RELAY_DROPPED: &str = "relay.events_dropped";
}

/// Where an event came from.
pub const SOURCE_WORKER: &str = "worker";
pub const SOURCE_RELAY: &str = "relay";

/// Longest kind: lowercase ASCII words joined by `.` or `_`.
pub const KIND_MAX: usize = 64;
/// A stored body's largest JSON text; a larger one is replaced by a note saying so.
pub const BODY_MAX_BYTES: usize = 2_048;
/// Longest string value kept in a body.
const STRING_MAX_CHARS: usize = 300;
/// Events one relay batch may carry.
pub const RELAY_BATCH_MAX: usize = 100;
/// Default and bounds of `EVENT_RETENTION_DAYS`.
pub const RETENTION_DAYS_DEFAULT: u32 = 30;
pub const RETENTION_DAYS_MAX: u32 = 3_650;
/// Search page size: default and largest.
pub const PAGE_DEFAULT: i64 = 50;
pub const PAGE_MAX: i64 = 200;
/// Longest free-text search (D1 refuses LIKE patterns over 50 bytes).
pub const TEXT_MAX: usize = 48;

/// One event to store.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub level: Level,
    pub kind: String,
    pub source: &'static str,
    pub call_id: Option<String>,
    pub user_id: Option<String>,
    pub request_id: Option<String>,
    /// Unix milliseconds.
    pub at_ms: u64,
    /// A JSON object, already through [`body`].
    pub body: Value,
}

impl Event {
    /// A Worker event at `now_ms`; the body is bounded and cleaned here.
    pub fn worker(level: Level, kind: &str, now_ms: u64, fields: Value) -> Event {
        Event {
            level,
            kind: kind.to_owned(),
            source: SOURCE_WORKER,
            call_id: None,
            user_id: None,
            request_id: None,
            at_ms: now_ms,
            body: body(fields),
        }
    }

    pub fn call(mut self, id: Option<&str>) -> Self {
        self.call_id = id.map(str::to_owned);
        self
    }

    pub fn user(mut self, id: Option<&str>) -> Self {
        self.user_id = id.map(str::to_owned);
        self
    }

    pub fn request(mut self, id: &str) -> Self {
        self.request_id = Some(id.to_owned());
        self
    }
}

/// The event a call session's effect is worth to an operator, if any: each status
/// change and the final record (`call.status`), and what the machine logs
/// (`call.session`). Pure: the Durable Object records what this returns.
pub fn of_effect(effect: &crate::session::Effect, now_ms: u64) -> Option<Event> {
    use crate::session::{DbOp, Effect, LogLevel};
    let status = |status: crate::calls::CallStatus, fields: Value| {
        let level = match status {
            crate::calls::CallStatus::Failed => Level::Warn,
            _ => Level::Info,
        };
        let mut body = fields;
        body["status"] = Value::from(status.as_str());
        Event::worker(level, kind::CALL_STATUS, now_ms, body)
    };
    Some(match effect {
        Effect::Log { level, message } => Event::worker(
            match level {
                LogLevel::Info => Level::Info,
                LogLevel::Warn => Level::Warn,
                LogLevel::Error => Level::Error,
            },
            kind::CALL_SESSION,
            now_ms,
            serde_json::json!({ "message": message }),
        ),
        Effect::Db(DbOp::Progress {
            status: s,
            answered_by,
            ..
        }) => status(*s, serde_json::json!({ "answered_by": answered_by })),
        Effect::Db(DbOp::EndUnconnected {
            status: s, reason, ..
        }) => status(*s, serde_json::json!({ "reason": reason, "final": true })),
        Effect::Db(DbOp::Settle(x)) => status(
            x.status,
            serde_json::json!({
                "reason": x.reason, "final": true, "duration_secs": x.duration_secs,
                "credits_charged": x.charge,
            }),
        ),
        _ => return None,
    })
}

/// The event a failed request is worth: any 5xx (`request.failed`), a webhook refused
/// as unsigned or malformed (`webhook.refused`), the relay's control channel refused
/// (`stream.refused`). Other client errors are the client's business, not an event.
pub fn of_refusal(
    access: crate::http::routes::Access,
    (method, path): (&str, &str),
    (status, code): (u16, &str),
    cause: Option<&str>,
    now_ms: u64,
) -> Option<Event> {
    use crate::http::routes::Access;
    let (level, kind) = match (access, status) {
        (_, 500..) => (Level::Error, kind::REQUEST_FAILED),
        (Access::Twilio | Access::Stripe, 400 | 401 | 403) => (Level::Warn, kind::WEBHOOK_REFUSED),
        (Access::Relay, 401 | 403) => (Level::Warn, kind::STREAM_REFUSED),
        _ => return None,
    };
    let fields = serde_json::json!({
        "method": method, "path": path, "status": status, "code": code,
        "cause": if status >= 500 { cause } else { None },
    });
    Some(Event::worker(level, kind, now_ms, fields))
}

/// Whether a kind is well formed: 1–64 of `a-z 0-9 . _`, starting with a letter.
pub fn valid_kind(kind: &str) -> bool {
    kind.len() <= KIND_MAX
        && kind.starts_with(|c: char| c.is_ascii_lowercase())
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_')
}

/// Fields that never enter an event: secrets, audio, and what was said (transcripts
/// stay in `call_transcripts`, which erasure reaches).
fn is_excluded(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    const SECRET: &[&str] = &["password", "token", "secret", "authorization", "api_key"];
    const SPOKEN: &[&str] = &[
        "text",
        "transcript",
        "utterance",
        "content",
        "prompt",
        "reply",
    ];
    SECRET.iter().any(|s| n.ends_with(s)) || n.starts_with("audio") || SPOKEN.contains(&n.as_str())
}

fn clean(value: Value, depth: usize) -> Value {
    match value {
        Value::String(s) if s.chars().count() > STRING_MAX_CHARS => {
            let mut cut: String = s.chars().take(STRING_MAX_CHARS).collect();
            cut.push('…');
            Value::String(cut)
        }
        Value::Object(map) if depth < 3 => Value::Object(
            map.into_iter()
                .filter(|(k, v)| !is_excluded(k) && !v.is_null())
                .map(|(k, v)| (k, clean(v, depth + 1)))
                .collect(),
        ),
        Value::Array(items) if depth < 3 => Value::Array(
            items
                .into_iter()
                .take(20)
                .map(|v| clean(v, depth + 1))
                .collect(),
        ),
        Value::Object(_) | Value::Array(_) => Value::String("…".into()),
        other => other,
    }
}

/// An event's body from arbitrary fields: a JSON object without secrets, audio or
/// spoken text, strings cut to 300 characters, nesting cut at three levels, and at most
/// [`BODY_MAX_BYTES`] of JSON (else `{"truncated": true, "bytes": n}`).
pub fn body(fields: Value) -> Value {
    let object = match fields {
        Value::Object(map) => Value::Object(map),
        Value::Null => Value::Object(Map::new()),
        other => {
            let mut map = Map::new();
            map.insert("value".into(), other);
            Value::Object(map)
        }
    };
    let cleaned = clean(object, 0);
    let bytes = cleaned.to_string().len();
    if bytes > BODY_MAX_BYTES {
        serde_json::json!({ "truncated": true, "bytes": bytes })
    } else {
        cleaned
    }
}

/// One event as the relay sends it (`POST /internal/relay/events`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayEvent {
    /// Unix milliseconds on the relay's clock.
    pub at_ms: u64,
    pub level: Level,
    /// The relay's event name (`provider_reconnect`, `deepgram_error`, …).
    pub kind: String,
    #[serde(default)]
    pub call_id: Option<String>,
    #[serde(default)]
    pub fields: Value,
}

/// A relay batch: its events and how many it dropped since the last batch.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayBatch {
    pub events: Vec<RelayEvent>,
    #[serde(default)]
    pub dropped: u64,
}

/// How far the relay's clock may be from ours before its timestamps are replaced by ours.
const CLOCK_SKEW_MS: u64 = 24 * 3_600_000;

/// The events to store from a relay batch received at `now_ms`: warnings and errors only,
/// kinds prefixed `relay.`, bodies bounded, call ids that look like ids, timestamps
/// within a day of ours (else ours), and one `relay.events_dropped` when it dropped any.
pub fn from_relay(batch: RelayBatch, now_ms: u64) -> Result<Vec<Event>, ValidationError> {
    if batch.events.len() > RELAY_BATCH_MAX {
        return Err(ValidationError::new(
            "events",
            codes::OUT_OF_RANGE,
            format!("A batch carries at most {RELAY_BATCH_MAX} events."),
        ));
    }
    let mut out = Vec::with_capacity(batch.events.len() + 1);
    for (i, e) in batch.events.into_iter().enumerate() {
        let kind = format!("relay.{}", e.kind);
        if !valid_kind(&kind) {
            return Err(ValidationError::new(
                format!("events[{i}].kind"),
                codes::INVALID_FORMAT,
                "kind is lowercase letters, digits, '.' and '_' (at most 58).",
            ));
        }
        if e.level == Level::Info {
            return Err(ValidationError::new(
                format!("events[{i}].level"),
                codes::OUT_OF_RANGE,
                "The relay ships warnings and errors only.",
            ));
        }
        let call_id = e.call_id.filter(|id| crate::validate::is_uuid(id));
        let at_ms = if e.at_ms.abs_diff(now_ms) > CLOCK_SKEW_MS {
            now_ms
        } else {
            e.at_ms
        };
        out.push(Event {
            level: e.level,
            kind,
            source: SOURCE_RELAY,
            call_id,
            user_id: None,
            request_id: None,
            at_ms,
            body: body(e.fields),
        });
    }
    if batch.dropped > 0 {
        let mut dropped = Event::worker(
            Level::Warn,
            kind::RELAY_DROPPED,
            now_ms,
            serde_json::json!({ "dropped": batch.dropped }),
        );
        dropped.source = SOURCE_RELAY;
        out.push(dropped);
    }
    Ok(out)
}

/// `EVENT_RETENTION_DAYS`: unset is 30; otherwise a whole number of days, 1–3650.
pub fn retention_days(raw: Option<&str>) -> Result<u32, String> {
    match raw.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(RETENTION_DAYS_DEFAULT),
        Some(s) => match s.parse::<u32>() {
            Ok(d) if (1..=RETENTION_DAYS_MAX).contains(&d) => Ok(d),
            _ => Err(format!(
                "must be a whole number of days from 1 to {RETENTION_DAYS_MAX} (got {s:?})"
            )),
        },
    }
}

/// Events at or before this instant (unix ms) are pruned.
pub fn prune_before_ms(now_ms: u64, retention_days: u32) -> u64 {
    now_ms.saturating_sub(u64::from(retention_days) * 86_400_000)
}

/// Unix milliseconds of an RFC 3339 instant.
pub fn parse_instant(s: &str) -> Option<u64> {
    let t = OffsetDateTime::parse(s.trim(), &Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// What a search asks for, from the raw query parameters (the console's `GET
/// /admin/events`, the MCP tool `search_logs`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchParams {
    pub level: Option<String>,
    pub kind: Option<String>,
    pub call_id: Option<String>,
    pub user_id: Option<String>,
    /// Free text, matched in the kind and the body.
    pub q: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

/// A validated search.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Search {
    /// Only events at this level or above.
    pub min_level: Option<Level>,
    /// A kind, or a prefix when it ends with `.` (`call.` finds every call event).
    pub kind: Option<String>,
    pub call_id: Option<String>,
    pub user_id: Option<String>,
    pub text: Option<String>,
    /// Inclusive bounds, unix ms.
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
    pub limit: i64,
    pub offset: i64,
}

fn blank(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

fn instant(field: &str, v: Option<String>) -> Result<Option<u64>, ValidationError> {
    blank(v)
        .map(|s| {
            parse_instant(&s).ok_or_else(|| {
                ValidationError::new(
                    field,
                    codes::INVALID_FORMAT,
                    format!("{field} must be an RFC 3339 instant, e.g. 2026-12-01T00:00:00Z."),
                )
            })
        })
        .transpose()
}

impl Search {
    pub fn parse(p: SearchParams) -> Result<Search, ValidationError> {
        let min_level = blank(p.level)
            .map(|l| {
                Level::parse(&l).ok_or_else(|| {
                    ValidationError::new(
                        "level",
                        codes::INVALID_FORMAT,
                        "level is one of info, warn, error.",
                    )
                })
            })
            .transpose()?;
        let kind = blank(p.kind);
        if let Some(k) = &kind {
            if !valid_kind(k.trim_end_matches('.')) {
                return Err(ValidationError::new(
                    "kind",
                    codes::INVALID_FORMAT,
                    "kind is lowercase letters, digits, '.' and '_', e.g. call.status or call.",
                ));
            }
        }
        let text = blank(p.q);
        if text.as_ref().is_some_and(|t| t.len() > TEXT_MAX) {
            return Err(ValidationError::new(
                "q",
                codes::TOO_LONG,
                format!("Search with at most {TEXT_MAX} bytes of text."),
            ));
        }
        let from_ms = instant("from", p.from)?;
        let to_ms = instant("to", p.to)?;
        if let (Some(f), Some(t)) = (from_ms, to_ms) {
            if f > t {
                return Err(ValidationError::new(
                    "from",
                    codes::OUT_OF_RANGE,
                    "from must not be after to.",
                ));
            }
        }
        let limit = p.limit.unwrap_or(PAGE_DEFAULT);
        if !(1..=PAGE_MAX).contains(&limit) {
            return Err(ValidationError::new(
                "limit",
                codes::OUT_OF_RANGE,
                format!("limit is 1 to {PAGE_MAX}."),
            ));
        }
        let offset = p.offset.unwrap_or(0);
        if !(0..=1_000_000).contains(&offset) {
            return Err(ValidationError::new(
                "offset",
                codes::OUT_OF_RANGE,
                "offset is 0 to 1000000.",
            ));
        }
        Ok(Search {
            min_level,
            kind,
            call_id: blank(p.call_id),
            user_id: blank(p.user_id),
            text,
            from_ms,
            to_ms,
            limit,
            offset,
        })
    }
}

#[cfg(test)]
// A panic in a test is that test's failure.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn levels_order_and_parse() {
        assert!(Level::Info < Level::Warn && Level::Warn < Level::Error);
        for l in Level::ALL {
            assert_eq!(Level::parse(l.as_str()), Some(l));
        }
        assert_eq!(Level::parse("debug"), None);
        assert!(Level::Warn.rank() < Level::Error.rank());
    }

    #[test]
    fn bodies_keep_no_secrets_audio_or_speech() {
        let b = body(json!({
            "status": 502, "relay_secret": "s", "Authorization": "Bearer x",
            "audio_b64": "AAAA", "text": "what the caller said", "transcript": ["hi"],
            "nested": { "stream_token": "t", "reason": "timeout" }, "gone": null,
        }));
        assert_eq!(
            b,
            json!({ "status": 502, "nested": { "reason": "timeout" } })
        );
    }

    #[test]
    fn bodies_are_bounded() {
        let long = "x".repeat(1_000);
        let b = body(json!({ "detail": long }));
        assert_eq!(b["detail"].as_str().unwrap().chars().count(), 301);
        let many: Map<String, Value> = (0..100)
            .map(|i| (format!("field_{i}"), Value::from("y".repeat(100))))
            .collect();
        let b = body(Value::Object(many));
        assert_eq!(b["truncated"], true);
        assert!(b.to_string().len() <= BODY_MAX_BYTES);
        assert_eq!(body(json!(7)), json!({ "value": 7 }));
        assert_eq!(body(Value::Null), json!({}));
        let deep = body(json!({ "a": { "b": { "c": { "d": 1 } } } }));
        assert_eq!(deep, json!({ "a": { "b": { "c": "…" } } }));
    }

    #[test]
    fn session_effects_become_call_events() {
        use crate::calls::CallStatus;
        use crate::session::{DbOp, Effect, LogLevel, Settlement};
        let log = Effect::Log {
            level: LogLevel::Error,
            message: "LLM failed: 503".into(),
        };
        let e = of_effect(&log, 9).unwrap();
        assert_eq!(
            (e.level, e.kind.as_str(), e.at_ms),
            (Level::Error, kind::CALL_SESSION, 9)
        );
        assert_eq!(e.body, json!({ "message": "LLM failed: 503" }));
        let ringing = Effect::Db(DbOp::Progress {
            status: CallStatus::Ringing,
            sid: Some("CA1".into()),
            started_at_ms: None,
            answered_by: None,
        });
        assert_eq!(
            of_effect(&ringing, 1).unwrap().body,
            json!({ "status": "ringing" })
        );
        let failed = Effect::Db(DbOp::EndUnconnected {
            status: CallStatus::Failed,
            reason: "twilio_refused".into(),
            release: 1,
            at_ms: 1,
        });
        let e = of_effect(&failed, 1).unwrap();
        assert_eq!(e.level, Level::Warn);
        assert_eq!(
            e.body,
            json!({ "status": "failed", "reason": "twilio_refused", "final": true })
        );
        let settled = Effect::Db(DbOp::Settle(Settlement {
            status: CallStatus::Completed,
            reason: None,
            ended_at_ms: 5,
            duration_secs: 61,
            charge: 2,
            release: 0,
            twilio_minutes: 2,
            twilio_micros: 28_000,
        }));
        assert_eq!(
            of_effect(&settled, 1).unwrap().body,
            json!({ "status": "completed", "final": true, "duration_secs": 61, "credits_charged": 2 })
        );
        assert_eq!(of_effect(&Effect::SetAlarm(None), 1), None);
    }

    #[test]
    fn refusals() {
        use crate::http::routes::Access;
        let post = ("POST", "/api/voice/status");
        let e = of_refusal(Access::Twilio, post, (403, "forbidden"), None, 3).unwrap();
        assert_eq!(
            (e.level, e.kind.as_str()),
            (Level::Warn, kind::WEBHOOK_REFUSED)
        );
        assert_eq!(
            e.body,
            json!({ "method": "POST", "path": "/api/voice/status", "status": 403, "code": "forbidden" })
        );
        let stripe = ("POST", "/api/payments/webhook");
        let e = of_refusal(Access::Stripe, stripe, (400, "invalid_signature"), None, 3).unwrap();
        assert_eq!(e.kind, kind::WEBHOOK_REFUSED);
        let relay = ("GET", "/internal/calls/x/session");
        let e = of_refusal(Access::Relay, relay, (401, "unauthorized"), None, 3).unwrap();
        assert_eq!(e.kind, kind::STREAM_REFUSED);
        let e = of_refusal(
            Access::User,
            ("GET", "/api/me"),
            (503, "db"),
            Some("D1 down"),
            3,
        )
        .unwrap();
        assert_eq!(
            (e.level, e.kind.as_str()),
            (Level::Error, kind::REQUEST_FAILED)
        );
        assert_eq!(e.body["cause"], "D1 down");
        // A user's own mistakes, and a webhook for a call we do not know, are not events.
        assert_eq!(
            of_refusal(Access::User, ("POST", "/api/me"), (400, "x"), None, 3),
            None
        );
        assert_eq!(
            of_refusal(Access::Twilio, post, (404, "not_found"), None, 3),
            None
        );
        // A client error's cause is never kept.
        let e = of_refusal(Access::Twilio, post, (403, "forbidden"), Some("sig"), 3).unwrap();
        assert_eq!(e.body.get("cause"), None);
    }

    #[test]
    fn kinds() {
        assert!(valid_kind("call.status"));
        assert!(valid_kind("relay.provider_reconnect"));
        for bad in ["", "Call", "9x", "a b", "a-b", &"a".repeat(65)] {
            assert!(!valid_kind(bad), "{bad:?}");
        }
    }

    const NOW: u64 = 1_764_000_000_000;
    const CALL: &str = "7f1b7c3e-6d3a-4b6e-9c1e-2d5f8a9b0c1d";

    fn batch(v: Value) -> RelayBatch {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn relay_batches_become_relay_events() {
        let events = from_relay(
            batch(json!({ "events": [
                { "at_ms": NOW - 5, "level": "warn", "kind": "provider_reconnect", "call_id": CALL,
                  "fields": { "provider": "deepgram", "attempt": 2 } },
                { "at_ms": 1, "level": "error", "kind": "tts_failed", "call_id": "not-an-id" },
            ], "dropped": 3 })),
            NOW,
        )
        .unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].kind, "relay.provider_reconnect");
        assert_eq!(events[0].source, SOURCE_RELAY);
        assert_eq!(events[0].call_id.as_deref(), Some(CALL));
        assert_eq!(events[0].at_ms, NOW - 5);
        assert_eq!(
            events[0].body,
            json!({ "provider": "deepgram", "attempt": 2 })
        );
        // A clock a day off is replaced by ours; a malformed call id is dropped.
        assert_eq!(events[1].at_ms, NOW);
        assert_eq!(events[1].call_id, None);
        assert_eq!(events[2].kind, kind::RELAY_DROPPED);
        assert_eq!(events[2].body, json!({ "dropped": 3 }));
    }

    #[test]
    fn relay_batches_are_refused_whole() {
        let info = batch(json!({ "events": [{ "at_ms": NOW, "level": "info", "kind": "x" }] }));
        assert_eq!(from_relay(info, NOW).unwrap_err().field, "events[0].level");
        let bad =
            batch(json!({ "events": [{ "at_ms": NOW, "level": "warn", "kind": "Bad Kind" }] }));
        assert_eq!(from_relay(bad, NOW).unwrap_err().field, "events[0].kind");
        let many: Vec<Value> = (0..=RELAY_BATCH_MAX)
            .map(|_| json!({ "at_ms": NOW, "level": "warn", "kind": "x" }))
            .collect();
        let big = batch(json!({ "events": many }));
        assert_eq!(from_relay(big, NOW).unwrap_err().field, "events");
        assert!(serde_json::from_value::<RelayBatch>(json!({ "events": [], "extra": 1 })).is_err());
    }

    #[test]
    fn retention() {
        assert_eq!(retention_days(None), Ok(30));
        assert_eq!(retention_days(Some(" ")), Ok(30));
        assert_eq!(retention_days(Some("7")), Ok(7));
        for bad in ["0", "-1", "3651", "1.5", "week"] {
            assert!(retention_days(Some(bad)).is_err(), "{bad}");
        }
        assert_eq!(prune_before_ms(NOW, 30), NOW - 30 * 86_400_000);
        assert_eq!(prune_before_ms(5, 1), 0);
    }

    #[test]
    fn searches() {
        let s = Search::parse(SearchParams {
            level: Some("warn".into()),
            kind: Some("call.".into()),
            q: Some(" timeout ".into()),
            from: Some("2026-12-01T00:00:00Z".into()),
            to: Some("2026-12-01T01:00:00+01:00".into()),
            call_id: Some(" ".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.min_level, Some(Level::Warn));
        assert_eq!(s.kind.as_deref(), Some("call."));
        assert_eq!(s.text.as_deref(), Some("timeout"));
        assert_eq!(s.call_id, None);
        assert_eq!(s.from_ms, s.to_ms, "+01:00 is normalised");
        assert_eq!((s.limit, s.offset), (PAGE_DEFAULT, 0));

        let bad = |p: SearchParams| Search::parse(p).unwrap_err().field;
        assert_eq!(
            bad(SearchParams {
                level: Some("debug".into()),
                ..Default::default()
            }),
            "level"
        );
        assert_eq!(
            bad(SearchParams {
                kind: Some("Call".into()),
                ..Default::default()
            }),
            "kind"
        );
        assert_eq!(
            bad(SearchParams {
                q: Some("x".repeat(49)),
                ..Default::default()
            }),
            "q"
        );
        assert_eq!(
            bad(SearchParams {
                from: Some("yesterday".into()),
                ..Default::default()
            }),
            "from"
        );
        assert_eq!(
            bad(SearchParams {
                from: Some("2026-12-02T00:00:00Z".into()),
                to: Some("2026-12-01T00:00:00Z".into()),
                ..Default::default()
            }),
            "from"
        );
        assert_eq!(
            bad(SearchParams {
                limit: Some(0),
                ..Default::default()
            }),
            "limit"
        );
        assert_eq!(
            bad(SearchParams {
                limit: Some(201),
                ..Default::default()
            }),
            "limit"
        );
        assert_eq!(
            bad(SearchParams {
                offset: Some(-1),
                ..Default::default()
            }),
            "offset"
        );
    }
}
