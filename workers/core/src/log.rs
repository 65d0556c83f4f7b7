//! One JSON object per log line, the same shape from the Worker and the relay, so an
//! operator can filter Workers Logs (or the relay's stdout) by field: `level`, `event`,
//! and any of the shared ids (`request_id`, `call_id`, `call_sid`, `stream_sid`,
//! `provider`).
//!
//! Never log audio, keys or transcript text at info: fields named like secrets are
//! dropped here, whatever the caller passes.

use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// Field-name endings that never reach a log line (`stream_token`, `relay_secret`, …).
const SECRET_SUFFIXES: &[&str] = &["password", "token", "secret", "authorization", "api_key"];

/// Audio (`audio`, `audio_b64`, …) is never logged either.
fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_SUFFIXES.iter().any(|s| name.ends_with(s)) || name.starts_with("audio")
}

/// The line for `event` at `level` with `fields` (a JSON object; other values are kept
/// under `value`). A field cannot override `level` or `event`.
pub fn line(level: Level, event: &str, fields: Value) -> String {
    let mut out = Map::new();
    out.insert("level".into(), Value::from(level.as_str()));
    out.insert("event".into(), Value::from(event));
    match fields {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "level" || k == "event" || is_secret(&k) || v.is_null() {
                    continue;
                }
                out.insert(k, v);
            }
        }
        Value::Null => {}
        other => {
            out.insert("value".into(), other);
        }
    }
    Value::Object(out).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn one_json_object_per_line() {
        let l = line(
            Level::Warn,
            "webhook_refused",
            json!({"request_id": "r1", "why": "bad signature", "event": "spoofed"}),
        );
        let v: Value = serde_json::from_str(&l).unwrap_or_default();
        assert_eq!(v["request_id"], "r1");
        assert_eq!(v["why"], "bad signature");
        assert_eq!(v["event"], "webhook_refused");
        assert_eq!(v["level"], "warn");
        assert!(!l.contains('\n'));
    }

    #[test]
    fn secrets_and_nulls_are_dropped() {
        let l = line(
            Level::Info,
            "x",
            json!({"relay_secret": "s", "Authorization": "Bearer t", "stream_token": "t",
                   "audio_b64": "AAAA", "call_id": "c", "call_sid": null, "prompt_tokens": 3}),
        );
        let v: Value = serde_json::from_str(&l).unwrap_or_default();
        assert_eq!(
            v,
            json!({"level": "info", "event": "x", "call_id": "c", "prompt_tokens": 3}),
            "{l}"
        );
    }

    #[test]
    fn non_object_fields_are_kept_as_value() {
        let v: Value =
            serde_json::from_str(&line(Level::Error, "e", json!("why"))).unwrap_or_default();
        assert_eq!(v["value"], "why");
        let v: Value =
            serde_json::from_str(&line(Level::Debug, "e", Value::Null)).unwrap_or_default();
        assert_eq!(v, json!({"level": "debug", "event": "e"}));
    }
}
