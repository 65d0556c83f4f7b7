//! The persona's own actions, offered to the LLM as OpenAI-compatible `tools`
//! (PROTOCOLS.md §9): their definitions, the streamed `tool_calls` fragments assembled
//! into whole calls, and each call's arguments validated into a [`Tool`].
//!
//! Offered: `end_call` (the persona has said goodbye; the call ends once that goodbye has
//! been heard) and `schedule_callback` (`{"delay_minutes": 1..10080}` or `{"at": RFC
//! 3339}`: a call back later, to the same number with the same persona). A call the
//! model gets wrong (an unknown tool, bad JSON, a time out of range) is refused here with
//! a reason; it never breaks the turn.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub const END_CALL: &str = "end_call";
pub const SCHEDULE_CALLBACK: &str = "schedule_callback";
/// The longest `delay_minutes` (a week).
pub const MAX_DELAY_MINUTES: i64 = 10_080;
/// Longest `reason` kept from an `end_call`.
const REASON_MAX_CHARS: usize = 200;

/// Which tools a reply is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Offer {
    /// An ordinary reply: both.
    All,
    /// The reply that answers tool results: it may still say goodbye and hang up, but
    /// not book again, so tool rounds never chain.
    EndCallOnly,
}

impl Offer {
    pub fn allows(self, name: &str) -> bool {
        name == END_CALL || self == Self::All
    }
}

/// The `tools` array of a conversation request.
pub fn definitions(offer: Offer) -> Value {
    let mut all = all_definitions();
    if let Value::Array(list) = &mut all {
        list.retain(|d| {
            d["function"]["name"]
                .as_str()
                .is_some_and(|n| offer.allows(n))
        });
    }
    all
}

fn all_definitions() -> Value {
    json!([{
        "type": "function",
        "function": {
            "name": END_CALL,
            "description": "End the phone call. Call this only after you have said goodbye \
                            in this same reply; the line is hung up once the caller has \
                            heard your goodbye.",
            "parameters": {
                "type": "object",
                "properties": {
                    "reason": { "type": "string", "description": "Why the call is ending, in a few words." }
                },
                "additionalProperties": false
            }
        }
    }, {
        "type": "function",
        "function": {
            "name": SCHEDULE_CALLBACK,
            "description": "Schedule a phone call back to the caller later, when they ask \
                            for one (\"call me back in ten minutes\", \"call me tomorrow at \
                            seven\"). Give either delay_minutes or at, not both. The result \
                            says when it was booked, in the caller's local time, or why it \
                            could not be: tell the caller.",
            "parameters": {
                "type": "object",
                "properties": {
                    "delay_minutes": {
                        "type": "integer", "minimum": 1, "maximum": MAX_DELAY_MINUTES,
                        "description": "Minutes from now."
                    },
                    "at": {
                        "type": "string",
                        "description": "The time as RFC 3339 with the caller's UTC offset, e.g. 2026-12-03T07:00:00+00:00."
                    }
                },
                "additionalProperties": false
            }
        }
    }])
}

/// One streamed fragment of a tool call (`choices[].delta.tool_calls[]`): `id` and the
/// name come once, `arguments` in pieces to concatenate per `index`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ToolCallDelta {
    #[serde(default)]
    pub index: u32,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub function: FunctionDelta,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct FunctionDelta {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub arguments: Option<String>,
}

/// A whole tool call, as the model made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text, as the model wrote it (possibly malformed).
    pub arguments: String,
}

/// Collects the fragments of one stream's tool calls.
#[derive(Debug, Default)]
pub struct Assembler {
    calls: BTreeMap<u32, ToolCall>,
}

impl Assembler {
    pub fn push(&mut self, delta: ToolCallDelta) {
        let call = self.calls.entry(delta.index).or_insert_with(|| ToolCall {
            id: String::new(),
            name: String::new(),
            arguments: String::new(),
        });
        if let Some(id) = delta.id.filter(|i| !i.is_empty()) {
            call.id = id;
        }
        if let Some(name) = delta.function.name.filter(|n| !n.is_empty()) {
            call.name = name;
        }
        if let Some(piece) = delta.function.arguments {
            call.arguments.push_str(&piece);
        }
    }

    /// The calls, in `index` order. Each has an id of its own: one the model left out or
    /// repeated becomes `call_<index>` (made unique), since every `tool` result must
    /// answer exactly one call.
    pub fn finish(self) -> Vec<ToolCall> {
        let mut seen = std::collections::BTreeSet::new();
        let mut calls = Vec::with_capacity(self.calls.len());
        for (index, mut call) in self.calls {
            if call.id.is_empty() || seen.contains(&call.id) {
                let mut id = format!("call_{index}");
                while seen.contains(&id) {
                    id.push('_');
                }
                call.id = id;
            }
            seen.insert(call.id.clone());
            calls.push(call);
        }
        calls
    }
}

/// What a tool call came to, as the `role: "tool"` message's content: booked (with the
/// time in UTC and in the caller's zone) or refused, and why.
pub fn callback_result(outcome: Result<u64, &str>, zone: Option<&str>) -> String {
    match outcome {
        Ok(at_ms) => {
            let at = crate::calls::format_rfc3339(i64::try_from(at_ms / 1000).unwrap_or(i64::MAX))
                .unwrap_or_default();
            json!({
                "scheduled": true,
                "at": at,
                "caller_local_time": local(at_ms, zone),
            })
            .to_string()
        }
        Err(why) => json!({ "scheduled": false, "error": why }).to_string(),
    }
}

/// Where the call's callback stands: the persona books at most one per call, and every
/// later request's system prompt says what came of it (so a result the caller talked
/// over is not lost, and the model does not book twice).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallbackState {
    /// Asked for; the booking's answer is awaited.
    Booking {
        tool_call_id: String,
    },
    Booked {
        at_ms: u64,
    },
    /// The last try was refused; another may be made.
    Refused {
        why: String,
    },
}

impl CallbackState {
    /// Why another `schedule_callback` is refused, while one is booked or being booked.
    pub fn refuses_another(&self, zone: Option<&str>) -> Option<String> {
        match self {
            Self::Booking { .. } => Some("a callback is already being booked on this call".into()),
            Self::Booked { at_ms } => Some(format!(
                "a callback is already booked on this call, for {}",
                local(*at_ms, zone)
            )),
            Self::Refused { .. } => None,
        }
    }

    /// The system prompt's line about it.
    pub fn prompt_note(&self, zone: Option<&str>) -> String {
        match self {
            Self::Booking { .. } => "You asked to book a callback on this call; the booking is \
                                     not confirmed yet. Do not book another."
                .into(),
            Self::Booked { at_ms } => format!(
                "You booked a callback on this call for {}. It stands: do not \
                 book another.",
                local(*at_ms, zone)
            ),
            Self::Refused { why } => format!(
                "Your callback could not be booked: {why}. If you have not told the caller \
                 yet, tell them."
            ),
        }
    }
}

fn local(at_ms: u64, zone: Option<&str>) -> String {
    crate::tz::local_time(zone, i64::try_from(at_ms).unwrap_or(i64::MAX))
}

/// The result for a call the model got wrong.
pub fn error_result(why: &str) -> String {
    json!({ "error": why }).to_string()
}

/// A tool call the session can carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tool {
    EndCall {
        reason: Option<String>,
    },
    /// Call back at `at_ms` (already checked: in the future, at most 30 days ahead).
    ScheduleCallback {
        at_ms: u64,
    },
}

/// Validates a call at `now_ms`: a tool we offered, with arguments of the right shape and
/// range. The error says what the model got wrong; it goes back to the model.
pub fn parse(call: &ToolCall, now_ms: u64) -> Result<Tool, String> {
    let args = call.arguments.trim();
    if call.name != END_CALL && call.name != SCHEDULE_CALLBACK {
        return Err(format!("unknown tool {:?}", call.name));
    }
    let args: Value = if args.is_empty() {
        json!({})
    } else {
        serde_json::from_str(args)
            .map_err(|e| format!("{}: arguments are not JSON ({e})", call.name))?
    };
    let Value::Object(fields) = args else {
        return Err(format!("{}: arguments must be a JSON object", call.name));
    };
    match call.name.as_str() {
        END_CALL => {
            if let Some(other) = fields.keys().find(|k| k.as_str() != "reason") {
                return Err(format!("end_call: unknown argument {other:?}"));
            }
            let reason = match fields.get("reason") {
                None | Some(Value::Null) => None,
                Some(Value::String(r)) => {
                    Some(r.trim().chars().take(REASON_MAX_CHARS).collect::<String>())
                        .filter(|r| !r.is_empty())
                }
                Some(_) => return Err("end_call: reason must be a string".into()),
            };
            Ok(Tool::EndCall { reason })
        }
        SCHEDULE_CALLBACK => {
            if let Some(other) = fields
                .keys()
                .find(|k| !matches!(k.as_str(), "delay_minutes" | "at"))
            {
                return Err(format!("schedule_callback: unknown argument {other:?}"));
            }
            let now_secs = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
            let at_secs = match (fields.get("delay_minutes"), fields.get("at")) {
                (Some(d), None) => match d.as_i64() {
                    Some(m) if (1..=MAX_DELAY_MINUTES).contains(&m) => now_secs + m * 60,
                    _ => {
                        return Err(format!(
                            "schedule_callback: delay_minutes must be a whole number from 1 to {MAX_DELAY_MINUTES}"
                        ))
                    }
                },
                (None, Some(Value::String(at))) => crate::calls::parse_scheduled_time(at, now_secs)
                    .map_err(|e| format!("schedule_callback: {}", e.message))?,
                (None, Some(_)) => return Err("schedule_callback: at must be an RFC 3339 string".into()),
                _ => return Err("schedule_callback: give exactly one of delay_minutes or at".into()),
            };
            Ok(Tool::ScheduleCallback {
                at_ms: at_secs.unsigned_abs() * 1000,
            })
        }
        other => Err(format!("unknown tool {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(
        index: u32,
        id: Option<&str>,
        name: Option<&str>,
        args: Option<&str>,
    ) -> ToolCallDelta {
        ToolCallDelta {
            index,
            id: id.map(Into::into),
            function: FunctionDelta {
                name: name.map(Into::into),
                arguments: args.map(Into::into),
            },
        }
    }

    /// PROTOCOLS.md §9: id and name once, arguments in fragments, per index.
    #[test]
    fn fragments_assemble_per_index() {
        let wire = r#"[{"index":0,"id":"call_1","type":"function","function":{"name":"end_call","arguments":""}}]"#;
        let first: Vec<ToolCallDelta> = serde_json::from_str(wire).unwrap();
        let mut a = Assembler::default();
        for d in first {
            a.push(d);
        }
        a.push(delta(1, Some("call_2"), Some("other"), Some("{")));
        a.push(delta(0, None, None, Some("{\"reason\":")));
        a.push(delta(1, None, None, Some("}")));
        a.push(delta(0, None, None, Some("\"done\"}")));
        assert_eq!(
            a.finish(),
            vec![
                ToolCall {
                    id: "call_1".into(),
                    name: "end_call".into(),
                    arguments: "{\"reason\":\"done\"}".into()
                },
                ToolCall {
                    id: "call_2".into(),
                    name: "other".into(),
                    arguments: "{}".into()
                },
            ]
        );
    }

    /// Every result must answer exactly one call: a missing or repeated id is replaced.
    #[test]
    fn every_call_gets_an_id_of_its_own() {
        let mut a = Assembler::default();
        a.push(delta(0, Some("call_1"), Some("end_call"), Some("{}")));
        a.push(delta(
            1,
            Some("call_1"),
            Some("schedule_callback"),
            Some("{}"),
        ));
        a.push(delta(2, None, Some("end_call"), Some("{}")));
        a.push(delta(3, Some("call_2"), Some("end_call"), Some("{}")));
        let ids: Vec<String> = a.finish().into_iter().map(|c| c.id).collect();
        // Index 1 repeats call_1, and its index name is taken too; index 2 has none;
        // index 3's own id was given to index 2.
        assert_eq!(
            ids,
            ["call_1", "call_1_", "call_2", "call_3"].map(String::from)
        );
    }

    const NOW: u64 = 1_796_239_800_000; // 2026-12-02T19:30:00Z

    fn parse_at(call: &ToolCall) -> Result<Tool, String> {
        parse(call, NOW)
    }

    #[test]
    fn schedule_callback_arguments_are_validated() {
        let call = |args: &str| ToolCall {
            id: "c".into(),
            name: SCHEDULE_CALLBACK.into(),
            arguments: args.into(),
        };
        assert_eq!(
            parse_at(&call(r#"{"delay_minutes":10}"#)),
            Ok(Tool::ScheduleCallback {
                at_ms: NOW + 600_000
            })
        );
        assert_eq!(
            parse_at(&call(r#"{"delay_minutes":10080}"#)),
            Ok(Tool::ScheduleCallback {
                at_ms: NOW + 10_080 * 60_000
            })
        );
        assert_eq!(
            parse_at(&call(r#"{"at":"2026-12-03T07:00:00+11:00"}"#)),
            Ok(Tool::ScheduleCallback {
                at_ms: 1_796_241_600_000
            })
        );
        for (args, says) in [
            (r#"{"delay_minutes":0}"#, "from 1 to 10080"),
            (r#"{"delay_minutes":10081}"#, "from 1 to 10080"),
            (r#"{"delay_minutes":2.5}"#, "whole number"),
            (r#"{"delay_minutes":"10"}"#, "whole number"),
            (r#"{"at":"2026-12-01T07:00:00Z"}"#, "in the future"),
            (r#"{"at":"2027-02-01T07:00:00Z"}"#, "30 days"),
            (r#"{"at":"tomorrow at 7"}"#, "RFC 3339"),
            (r#"{"at":7}"#, "RFC 3339 string"),
            (r#"{}"#, "exactly one"),
            (
                r#"{"delay_minutes":5,"at":"2026-12-03T07:00:00Z"}"#,
                "exactly one",
            ),
            (r#"{"minutes":5}"#, "unknown argument"),
        ] {
            let e = parse_at(&call(args)).unwrap_err();
            assert!(e.contains(says), "{args}: {e}");
        }
    }

    #[test]
    fn results_say_when_in_the_callers_time_or_why_not() {
        let ok: Value =
            serde_json::from_str(&callback_result(Ok(NOW + 600_000), Some("Europe/London")))
                .unwrap();
        assert_eq!(ok["scheduled"], true);
        assert_eq!(ok["at"], "2026-12-02T19:40:00Z");
        assert_eq!(
            ok["caller_local_time"],
            "Wednesday 2 December 2026, 19:40 (Europe/London)"
        );
        let no: Value =
            serde_json::from_str(&callback_result(Err("out of credits"), None)).unwrap();
        assert_eq!(no, json!({ "scheduled": false, "error": "out of credits" }));
    }

    #[test]
    fn end_call_arguments_are_validated() {
        let call = |args: &str| ToolCall {
            id: "c".into(),
            name: END_CALL.into(),
            arguments: args.into(),
        };
        assert_eq!(parse_at(&call("")), Ok(Tool::EndCall { reason: None }));
        assert_eq!(parse_at(&call("{}")), Ok(Tool::EndCall { reason: None }));
        assert_eq!(
            parse_at(&call(r#"{"reason":" caller is driving "}"#)),
            Ok(Tool::EndCall {
                reason: Some("caller is driving".into())
            })
        );
        assert_eq!(
            parse_at(&call(&format!(r#"{{"reason":"{}"}}"#, "x".repeat(500)))),
            Ok(Tool::EndCall {
                reason: Some("x".repeat(200))
            })
        );
        assert!(parse_at(&call("{\"reason\":"))
            .unwrap_err()
            .contains("not JSON"));
        assert!(parse_at(&call("[1]")).unwrap_err().contains("JSON object"));
        assert!(parse_at(&call(r#"{"reason":5}"#))
            .unwrap_err()
            .contains("string"));
        assert!(parse_at(&call(r#"{"when":"now"}"#))
            .unwrap_err()
            .contains("unknown argument"));
        let unknown = ToolCall {
            id: "c".into(),
            name: "transfer_money".into(),
            arguments: "{}".into(),
        };
        assert_eq!(
            parse_at(&unknown),
            Err("unknown tool \"transfer_money\"".into())
        );
    }

    #[test]
    fn the_answer_to_a_result_is_offered_only_end_call() {
        let d = definitions(Offer::EndCallOnly);
        assert_eq!(d.as_array().map(Vec::len), Some(1));
        assert_eq!(d[0]["function"]["name"], END_CALL);
        assert!(!Offer::EndCallOnly.allows(SCHEDULE_CALLBACK));
        assert!(Offer::All.allows(SCHEDULE_CALLBACK));
    }

    #[test]
    fn the_definitions_offer_both_tools_with_a_schema() {
        let d = definitions(Offer::All);
        assert_eq!(d[0]["type"], "function");
        assert_eq!(d[0]["function"]["name"], END_CALL);
        assert_eq!(d[0]["function"]["parameters"]["type"], "object");
        assert_eq!(d[1]["function"]["name"], SCHEDULE_CALLBACK);
        assert_eq!(
            d[1]["function"]["parameters"]["properties"]["delay_minutes"]["maximum"],
            MAX_DELAY_MINUTES
        );
    }
}
