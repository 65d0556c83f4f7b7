//! The persona's own actions, offered to the LLM as OpenAI-compatible `tools`
//! (PROTOCOLS.md §9): their definitions, the streamed `tool_calls` fragments assembled
//! into whole calls, and each call's arguments validated into a [`Tool`].
//!
//! Offered today: `end_call` (the persona has said goodbye; the call ends once that
//! goodbye has been heard). A call the model gets wrong (an unknown tool, bad JSON) is
//! refused here with a reason the session logs; it never breaks the turn.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub const END_CALL: &str = "end_call";
/// Longest `reason` kept from an `end_call`.
const REASON_MAX_CHARS: usize = 200;

/// The `tools` array of a conversation request.
pub fn definitions() -> Value {
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

    /// The calls, in `index` order.
    pub fn finish(self) -> Vec<ToolCall> {
        self.calls.into_values().collect()
    }
}

/// A tool call the session can carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tool {
    EndCall { reason: Option<String> },
}

/// Validates a call: a tool we offered, with arguments of the right shape. The error
/// says what the model got wrong.
pub fn parse(call: &ToolCall) -> Result<Tool, String> {
    let args = call.arguments.trim();
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

    #[test]
    fn end_call_arguments_are_validated() {
        let call = |args: &str| ToolCall {
            id: "c".into(),
            name: END_CALL.into(),
            arguments: args.into(),
        };
        assert_eq!(parse(&call("")), Ok(Tool::EndCall { reason: None }));
        assert_eq!(parse(&call("{}")), Ok(Tool::EndCall { reason: None }));
        assert_eq!(
            parse(&call(r#"{"reason":" caller is driving "}"#)),
            Ok(Tool::EndCall {
                reason: Some("caller is driving".into())
            })
        );
        assert_eq!(
            parse(&call(&format!(r#"{{"reason":"{}"}}"#, "x".repeat(500)))),
            Ok(Tool::EndCall {
                reason: Some("x".repeat(200))
            })
        );
        assert!(parse(&call("{\"reason\":"))
            .unwrap_err()
            .contains("not JSON"));
        assert!(parse(&call("[1]")).unwrap_err().contains("JSON object"));
        assert!(parse(&call(r#"{"reason":5}"#))
            .unwrap_err()
            .contains("string"));
        assert!(parse(&call(r#"{"when":"now"}"#))
            .unwrap_err()
            .contains("unknown argument"));
        let unknown = ToolCall {
            id: "c".into(),
            name: "transfer_money".into(),
            arguments: "{}".into(),
        };
        assert_eq!(
            parse(&unknown),
            Err("unknown tool \"transfer_money\"".into())
        );
    }

    #[test]
    fn the_definitions_offer_end_call_with_a_schema() {
        let d = definitions();
        assert_eq!(d[0]["type"], "function");
        assert_eq!(d[0]["function"]["name"], END_CALL);
        assert_eq!(d[0]["function"]["parameters"]["type"], "object");
    }
}
