//! The Model Context Protocol server's decisions (`POST /mcp`, Streamable HTTP transport,
//! spec 2025-06-18; `../shared/docs/PROTOCOLS.md` §10): reading one JSON-RPC 2.0 message,
//! which protocol version to speak, the tool catalog (`mcp/tools.json`), reading a tool's
//! arguments, and the shapes of results and errors. The Worker runs the tools' queries.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::events::SearchParams;

/// The versions this server speaks, newest first.
pub const PROTOCOL_VERSIONS: &[&str] = &["2025-06-18", "2025-03-26"];

/// The tool catalog, as `tools/list` answers it (kept as text: it is sent as is).
pub const TOOLS: &str = include_str!("mcp/tools.json");

/// JSON-RPC error codes.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
}

/// A JSON-RPC error to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(code::INVALID_PARAMS, message)
    }
}

/// One message from the client.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// Wants an answer with the same `id`.
    Request {
        id: Value,
        method: String,
        params: Value,
    },
    /// A notification or a response: answered 202 with no body.
    NoReply,
}

#[derive(Deserialize)]
struct Raw {
    jsonrpc: Option<String>,
    id: Option<Value>,
    method: Option<String>,
    #[serde(default)]
    params: Value,
    result: Option<Value>,
    error: Option<Value>,
}

/// Reads one message. `Err` carries the id to answer with (`null` when unknown).
pub fn parse(body: &[u8]) -> Result<Incoming, (Value, RpcError)> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        (
            Value::Null,
            RpcError::new(code::PARSE_ERROR, format!("Parse error: {e}")),
        )
    })?;
    if value.is_array() {
        return Err((
            Value::Null,
            RpcError::new(
                code::INVALID_REQUEST,
                "Batches are not supported (protocol 2025-06-18).",
            ),
        ));
    }
    let raw: Raw = serde_json::from_value(value).map_err(|e| {
        (
            Value::Null,
            RpcError::new(code::INVALID_REQUEST, format!("Invalid request: {e}")),
        )
    })?;
    let id = raw.id.clone().unwrap_or(Value::Null);
    if raw.jsonrpc.as_deref() != Some("2.0") {
        return Err((
            id,
            RpcError::new(code::INVALID_REQUEST, "jsonrpc must be \"2.0\"."),
        ));
    }
    if !matches!(id, Value::Null | Value::String(_) | Value::Number(_)) {
        return Err((
            Value::Null,
            RpcError::new(code::INVALID_REQUEST, "id must be a string or a number."),
        ));
    }
    match (raw.id, raw.method) {
        (Some(id), Some(method)) if !id.is_null() => Ok(Incoming::Request {
            id,
            method,
            params: raw.params,
        }),
        (None, Some(_)) => Ok(Incoming::NoReply),
        (Some(_), None) if raw.result.is_some() || raw.error.is_some() => Ok(Incoming::NoReply),
        _ => Err((
            id,
            RpcError::new(code::INVALID_REQUEST, "A request needs a method and an id."),
        )),
    }
}

/// The version to answer `initialize` with: the client's when we speak it, else our newest.
pub fn negotiate(requested: Option<&str>) -> &'static str {
    PROTOCOL_VERSIONS
        .iter()
        .find(|v| Some(**v) == requested)
        .copied()
        .unwrap_or(PROTOCOL_VERSIONS[0])
}

/// Whether a request's `MCP-Protocol-Version` header is acceptable (absent is: the spec
/// then assumes 2025-03-26).
pub fn version_supported(header: Option<&str>) -> bool {
    header.is_none_or(|v| PROTOCOL_VERSIONS.contains(&v.trim()))
}

/// `initialize`'s result.
pub fn initialize(params: &Value, server_version: &str) -> Value {
    json!({
        "protocolVersion": negotiate(params.get("protocolVersion").and_then(Value::as_str)),
        "capabilities": { "tools": { "listChanged": false } },
        "serverInfo": { "name": "call-me-back", "title": "Call Me Back operations", "version": server_version },
        "instructions": "Operator tools over Call Me Back's calls, money and event log. Ids are UUIDs; days are UTC YYYY-MM-DD; money is US cents or micro-dollars as each field says.",
    })
}

pub fn success(id: &Value, result: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

pub fn failure(id: &Value, e: &RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": e.code, "message": e.message } })
}

/// A tool's answer: the structured result, and the same as text for clients that only
/// read `content`.
pub fn tool_result(structured: Value) -> Value {
    json!({
        "content": [{ "type": "text", "text": structured.to_string() }],
        "structuredContent": structured,
        "isError": false,
    })
}

/// A tool's own failure (the call is well formed; the tool could not do it).
pub fn tool_error(message: &str) -> Value {
    json!({ "content": [{ "type": "text", "text": message }], "isError": true })
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListCalls {
    pub status: Option<crate::calls::CallStatus>,
    pub user_id: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GetCall {
    pub call_id: String,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct SearchLogs {
    level: Option<String>,
    kind: Option<String>,
    call_id: Option<String>,
    user_id: Option<String>,
    text: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub from: Option<String>,
    pub to: Option<String>,
}

/// A `tools/call`, its arguments read and checked.
#[derive(Debug, PartialEq)]
pub enum ToolCall {
    ListCalls {
        filter: ListCalls,
        limit: i64,
        offset: i64,
    },
    GetCall(GetCall),
    SearchLogs(crate::events::Search),
    AnalyticsSummary(Range),
}

fn args<T: DeserializeOwned + Default>(tool: &str, v: Option<&Value>) -> Result<T, RpcError> {
    match v {
        None | Some(Value::Null) => Ok(T::default()),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| RpcError::invalid_params(format!("{tool}: {e}"))),
    }
}

fn day(field: &str, v: Option<&str>) -> Result<(), RpcError> {
    match v.map(|d| crate::analytics::parse_day(field, d)) {
        Some(Err(e)) => Err(RpcError::invalid_params(e.message)),
        _ => Ok(()),
    }
}

/// Reads `tools/call`'s params: an unknown tool or bad arguments are `-32602`.
pub fn tool_call(params: &Value) -> Result<ToolCall, RpcError> {
    let name = params
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::invalid_params("tools/call needs a tool name."))?;
    let arguments = params.get("arguments");
    match name {
        "list_calls" => {
            let filter: ListCalls = args(name, arguments)?;
            day("from", filter.from.as_deref())?;
            day("to", filter.to.as_deref())?;
            if let (Some(f), Some(t)) = (&filter.from, &filter.to) {
                if f > t {
                    return Err(RpcError::invalid_params("from must not be after to."));
                }
            }
            let limit = filter.limit.unwrap_or(20);
            let offset = filter.offset.unwrap_or(0);
            if !(1..=100).contains(&limit) || !(0..=1_000_000).contains(&offset) {
                return Err(RpcError::invalid_params(
                    "limit is 1 to 100 and offset 0 to 1000000.",
                ));
            }
            Ok(ToolCall::ListCalls {
                filter,
                limit,
                offset,
            })
        }
        "get_call" => {
            let a: Option<GetCall> = match arguments {
                Some(v) => Some(
                    serde_json::from_value(v.clone())
                        .map_err(|e| RpcError::invalid_params(format!("get_call: {e}")))?,
                ),
                None => None,
            };
            let a = a.ok_or_else(|| RpcError::invalid_params("get_call needs call_id."))?;
            Ok(ToolCall::GetCall(a))
        }
        "search_logs" => {
            let a: SearchLogs = args(name, arguments)?;
            let search = crate::events::Search::parse(SearchParams {
                level: a.level,
                kind: a.kind,
                call_id: a.call_id,
                user_id: a.user_id,
                q: a.text,
                from: a.from,
                to: a.to,
                limit: a.limit,
                offset: a.offset,
            })
            .map_err(|e| RpcError::invalid_params(e.message))?;
            Ok(ToolCall::SearchLogs(search))
        }
        "analytics_summary" => Ok(ToolCall::AnalyticsSummary(args(name, arguments)?)),
        other => Err(RpcError::invalid_params(format!("Unknown tool: {other}"))),
    }
}

#[cfg(test)]
// A panic in a test is that test's failure.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::events::Level;

    #[test]
    fn messages() {
        let req = br#"{"jsonrpc":"2.0","id":7,"method":"tools/list"}"#;
        assert_eq!(
            parse(req).unwrap(),
            Incoming::Request {
                id: json!(7),
                method: "tools/list".into(),
                params: Value::Null
            }
        );
        let note = br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
        assert_eq!(parse(note).unwrap(), Incoming::NoReply);
        let response = br#"{"jsonrpc":"2.0","id":"s1","result":{}}"#;
        assert_eq!(parse(response).unwrap(), Incoming::NoReply);

        let code_of = |b: &[u8]| parse(b).unwrap_err().1.code;
        assert_eq!(code_of(b"{not json"), code::PARSE_ERROR);
        assert_eq!(
            code_of(br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#),
            code::INVALID_REQUEST
        );
        assert_eq!(
            code_of(br#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#),
            code::INVALID_REQUEST
        );
        assert_eq!(
            code_of(br#"{"jsonrpc":"2.0","id":{},"method":"ping"}"#),
            code::INVALID_REQUEST
        );
        assert_eq!(
            code_of(br#"{"jsonrpc":"2.0","id":1}"#),
            code::INVALID_REQUEST
        );
        // The id is kept for the error when it is readable.
        assert_eq!(
            parse(br#"{"jsonrpc":"1.0","id":"a","method":"x"}"#)
                .unwrap_err()
                .0,
            json!("a")
        );
    }

    #[test]
    fn versions() {
        assert_eq!(negotiate(Some("2025-03-26")), "2025-03-26");
        assert_eq!(negotiate(Some("2099-01-01")), "2025-06-18");
        assert_eq!(negotiate(None), "2025-06-18");
        assert!(version_supported(None));
        assert!(version_supported(Some("2025-06-18")));
        assert!(!version_supported(Some("2024-11-05")));
        let init = initialize(&json!({ "protocolVersion": "2025-06-18" }), "1.2.3");
        assert_eq!(init["protocolVersion"], "2025-06-18");
        assert_eq!(init["capabilities"]["tools"]["listChanged"], false);
        assert_eq!(init["serverInfo"]["version"], "1.2.3");
    }

    /// Each tool has a name, a description, an object input schema and an output schema
    /// whose required fields are its properties.
    #[test]
    fn the_catalog_is_well_formed() {
        let tools: Vec<Value> = serde_json::from_str(TOOLS).unwrap();
        let names: Vec<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
        assert_eq!(
            names,
            ["list_calls", "get_call", "search_logs", "analytics_summary"]
        );
        for t in &tools {
            assert!(
                t["description"].as_str().is_some_and(|d| d.len() > 20),
                "{t}"
            );
            assert_eq!(t["inputSchema"]["type"], "object");
            assert_eq!(t["outputSchema"]["type"], "object");
            for r in t["outputSchema"]["required"].as_array().unwrap() {
                assert!(
                    t["outputSchema"]["properties"]
                        .get(r.as_str().unwrap())
                        .is_some(),
                    "{r}"
                );
            }
            // Every tool named here has arguments this module reads.
            let empty = json!({ "name": t["name"], "arguments": {} });
            let read = tool_call(&empty);
            assert!(read.is_ok() || t["name"] == "get_call", "{read:?}");
        }
    }

    #[test]
    fn tool_arguments() {
        let call = |v: Value| tool_call(&v);
        assert_eq!(
            call(json!({ "name": "list_calls", "arguments": { "status": "completed", "from": "2026-12-01", "to": "2026-12-05" } })).unwrap(),
            ToolCall::ListCalls {
                filter: ListCalls {
                    status: Some(crate::calls::CallStatus::Completed),
                    from: Some("2026-12-01".into()),
                    to: Some("2026-12-05".into()),
                    ..Default::default()
                },
                limit: 20,
                offset: 0,
            }
        );
        assert_eq!(
            call(json!({ "name": "get_call", "arguments": { "call_id": "c1" } })).unwrap(),
            ToolCall::GetCall(GetCall {
                call_id: "c1".into()
            })
        );
        let ToolCall::SearchLogs(s) = call(
            json!({ "name": "search_logs", "arguments": { "level": "warn", "text": "twilio" } }),
        )
        .unwrap() else {
            panic!("search_logs");
        };
        assert_eq!(
            (s.min_level, s.text.as_deref()),
            (Some(Level::Warn), Some("twilio"))
        );
        assert_eq!(
            call(json!({ "name": "analytics_summary" })).unwrap(),
            ToolCall::AnalyticsSummary(Range::default())
        );

        let refused = |v: Value| call(v).unwrap_err().code;
        for bad in [
            json!({ "arguments": {} }),
            json!({ "name": "drop_tables" }),
            json!({ "name": "get_call", "arguments": {} }),
            json!({ "name": "get_call" }),
            json!({ "name": "list_calls", "arguments": { "status": "lost" } }),
            json!({ "name": "list_calls", "arguments": { "from": "yesterday" } }),
            json!({ "name": "list_calls", "arguments": { "from": "2026-12-05", "to": "2026-12-01" } }),
            json!({ "name": "list_calls", "arguments": { "limit": 101 } }),
            json!({ "name": "list_calls", "arguments": { "colour": "red" } }),
            json!({ "name": "search_logs", "arguments": { "level": "debug" } }),
            json!({ "name": "search_logs", "arguments": { "from": "soon" } }),
            json!({ "name": "analytics_summary", "arguments": { "days": 3 } }),
        ] {
            assert_eq!(refused(bad.clone()), code::INVALID_PARAMS, "{bad}");
        }
    }

    #[test]
    fn results() {
        let r = tool_result(json!({ "total": 1 }));
        assert_eq!(r["structuredContent"], json!({ "total": 1 }));
        assert_eq!(r["content"][0]["text"], "{\"total\":1}");
        assert_eq!(r["isError"], false);
        assert_eq!(tool_error("no such call")["isError"], true);
        let e = failure(&json!(3), &RpcError::invalid_params("x"));
        assert_eq!(
            e,
            json!({ "jsonrpc": "2.0", "id": 3, "error": { "code": -32602, "message": "x" } })
        );
        assert_eq!(success(&json!("a"), json!({}))["id"], "a");
    }
}
