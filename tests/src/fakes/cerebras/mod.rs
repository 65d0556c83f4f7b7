//! Fake Cerebras chat completions (OpenAI-compatible, PROTOCOLS.md §6).
//!
//! Owns `POST /v1/chat/completions` (JSON and SSE streaming), `GET /v1/models`,
//! `GET /v1/tcp_warming`, the planned-failure knobs (next N requests fail, or fail
//! mid-stream) and the record of requests received. It must not be lenient: bad auth,
//! unknown models, malformed messages and unknown fields get the provider's error body.
//!
//! Replies come from a script (a queue) if one is set, else from a deterministic echo:
//! `"<first three words of the system prompt>! You said: <last user text>. Let's keep
//! going."` (`"Alright! …"` without a system prompt). Token counts are whitespace-split
//! words of the message contents and of the reply: close enough to real tokenisation for
//! billing tests, and exactly predictable.

pub mod acting;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::fakes::faults::{ConnectionFaults, ErrorResponder, FaultSwitch};
use crate::fakes::{Server, LOOPBACK_ANY};

/// Route of chat completions.
pub const CHAT_PATH: &str = "/v1/chat/completions";
/// Route the Python SDK hits on construction.
pub const WARMING_PATH: &str = "/v1/tcp_warming";
/// Route of the model list.
pub const MODELS_PATH: &str = "/v1/models";

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];
const KNOWN_FIELDS: &[&str] = &[
    "model",
    "messages",
    "stream",
    "max_completion_tokens",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "stream_options",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "reasoning_effort",
    "reasoning_format",
    "service_tier",
    "logprobs",
    "top_logprobs",
    "n",
    "user",
];

/// How the fake is set up.
#[derive(Clone, Debug)]
pub struct Config {
    pub addr: SocketAddr,
    /// The key expected in `Authorization: Bearer <key>`.
    pub api_key: String,
    /// Models served (others answer 404 `model_not_found`).
    pub models: Vec<String>,
    /// Replies to use, in order, before falling back to the echo.
    pub script: Vec<String>,
    /// Pause between two content chunks of a stream (generation speed; 0 = instant).
    pub chunk_interval: Duration,
    /// Streams only: time to first token, waited before the first event after the role
    /// chunk (its first content chunk, or its first tool call) (the latency benchmark sets
    /// it; 0 = none).
    pub first_token_delay: Duration,
    /// Streams only: generation speed in tokens per second, pacing the content chunks
    /// from the first one (chunk `i` is due `i / tokens_per_sec` after it; `None` = as
    /// fast as possible). A token here is one content chunk: one word with its leading
    /// whitespace ([`reply_pieces`]), which is also what `usage.completion_tokens` counts.
    /// Adds to `chunk_interval` when both are set.
    pub tokens_per_sec: Option<f64>,
    pub fault_seed: u64,
    /// Without a scripted reply, answer with [`acting`]'s rules (book a callback when
    /// asked, hang up on "bye", greet a known caller with the notes) instead of the echo.
    /// For the `cargo xtask dev` demo.
    pub acts: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            addr: LOOPBACK_ANY,
            api_key: "csk-test-key".to_owned(),
            models: vec!["gpt-oss-120b".to_owned(), "qwen-3.8-27b".to_owned()],
            script: Vec::new(),
            chunk_interval: Duration::ZERO,
            first_token_delay: Duration::ZERO,
            tokens_per_sec: None,
            fault_seed: crate::fakes::faults::DEFAULT_SEED,
            acts: false,
        }
    }
}

/// A failure planned for an upcoming chat completions request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlannedFailure {
    /// Answer with this HTTP status and the error body.
    Status(u16),
    /// Streaming requests: send this many content chunks, then an SSE error payload with
    /// `status_code` and end the stream without `[DONE]`. Non-streaming requests get
    /// the status as an HTTP error instead.
    MidStream { after_chunks: usize, status: u16 },
}

/// What an upcoming non-streaming request (the notes after a call) gets, whatever the
/// streaming requests around it get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotesPlan {
    /// Answer with this HTTP status and the error body.
    Fail(u16),
    /// Answer as usual, after holding the request this long.
    Hold(Duration),
}

/// One chat completions request as received.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// Parsed body (`Value::String` with the raw text if it was not JSON).
    pub body: Value,
    /// Status answered.
    pub status: u16,
    /// When the request arrived.
    pub at: std::time::Instant,
}

#[derive(Default)]
struct Inner {
    script: VecDeque<String>,
    failures: VecDeque<PlannedFailure>,
    notes_plans: VecDeque<NotesPlan>,
    /// Non-streaming requests being held now ([`NotesPlan::Hold`]).
    holding: usize,
    requests: Vec<RequestRecord>,
    warming_hits: u64,
}

/// Shared state of the fake.
pub struct CerebrasState {
    cfg: Config,
    inner: Mutex<Inner>,
    faults: FaultSwitch,
}

impl CerebrasState {
    pub fn new(cfg: Config) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                script: cfg.script.iter().cloned().collect(),
                ..Inner::default()
            }),
            faults: FaultSwitch::with_seed(cfg.fault_seed),
            cfg,
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The fake's routes (wrapped with faults, plus `/__faults`).
pub fn router(state: Arc<CerebrasState>) -> Router {
    let faults = state.faults.clone();
    let app = Router::new()
        .route(CHAT_PATH, post(chat))
        .route(MODELS_PATH, get(models))
        .route(WARMING_PATH, get(warming))
        .with_state(state);
    let error: ErrorResponder = Arc::new(|status: StatusCode| error_for_status(status.as_u16()));
    crate::fakes::faults::wrap(app, faults, error)
}

/// A running fake Cerebras.
pub struct Handle {
    server: Server,
    state: Arc<CerebrasState>,
}

/// Starts the fake on `cfg.addr`.
pub async fn spawn(cfg: Config) -> anyhow::Result<Handle> {
    let addr = cfg.addr;
    let state = CerebrasState::new(cfg);
    let server = Server::start("cerebras", addr, router(state.clone())).await?;
    Ok(Handle { server, state })
}

impl Handle {
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT` (the SDK-style base; OpenAI-style clients add `/v1`).
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    pub fn faults(&self) -> &FaultSwitch {
        &self.state.faults
    }

    pub fn api_key(&self) -> &str {
        &self.state.cfg.api_key
    }

    /// Queues replies used before the echo.
    pub fn push_script<I: IntoIterator<Item = S>, S: Into<String>>(&self, replies: I) {
        self.state
            .inner()
            .script
            .extend(replies.into_iter().map(Into::into));
    }

    /// The next `n` chat requests answer `status` with the error body.
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut inner = self.state.inner();
        inner
            .failures
            .extend(std::iter::repeat_n(PlannedFailure::Status(status), n));
    }

    /// The next `n` streaming requests break after `after_chunks` content chunks with an
    /// SSE error payload carrying `status`.
    pub fn fail_mid_stream_next(&self, n: usize, after_chunks: usize, status: u16) {
        let mut inner = self.state.inner();
        inner.failures.extend(std::iter::repeat_n(
            PlannedFailure::MidStream {
                after_chunks,
                status,
            },
            n,
        ));
    }

    /// The next non-streaming requests (one per plan) go as planned.
    pub fn plan_notes(&self, plan: NotesPlan) {
        self.state.inner().notes_plans.push_back(plan);
    }

    /// Non-streaming requests being held right now.
    pub fn holding(&self) -> usize {
        self.state.inner().holding
    }

    /// Chat completions requests received, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.state.inner().requests.clone()
    }

    /// How many times `GET /v1/tcp_warming` was hit.
    pub fn warming_hits(&self) -> u64 {
        self.state.inner().warming_hits
    }

    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

/// OpenAI-style error response. UNCONFIRMED whether Cerebras nests under `error`; the
/// SDK reads `body["error"]` when present, so nesting is safe for every client.
fn error_response(
    status: u16,
    kind: &str,
    message: &str,
    param: Option<&str>,
    code: &str,
) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({"error": {"message": message, "type": kind, "param": param, "code": code}});
    (status, Json(body)).into_response()
}

/// The error body Cerebras-style services give for a bare status.
fn error_for_status(status: u16) -> Response {
    let (kind, code, message) = status_error(status);
    error_response(status, kind, message, None, code)
}

fn status_error(status: u16) -> (&'static str, &'static str, &'static str) {
    match status {
        400 => ("invalid_request_error", "bad_request", "Bad request."),
        401 => ("invalid_request_error", "wrong_api_key", "Wrong API Key"),
        402 => ("payment_required", "payment_required", "Payment required."),
        403 => (
            "permission_denied",
            "permission_denied",
            "Permission denied.",
        ),
        404 => ("not_found_error", "not_found", "Not found."),
        422 => (
            "invalid_request_error",
            "unprocessable_entity",
            "Unprocessable entity.",
        ),
        429 => (
            "too_many_requests_error",
            "request_quota_exceeded",
            "Requests per minute limit exceeded - too many requests sent.",
        ),
        503 => (
            "service_unavailable",
            "service_unavailable",
            "We're experiencing high traffic right now! Please try again soon.",
        ),
        _ => (
            "server_error",
            "internal_server_error",
            "Internal server error.",
        ),
    }
}

fn bearer_ok(state: &CerebrasState, headers: &HeaderMap) -> bool {
    let expected = format!("Bearer {}", state.cfg.api_key);
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == expected)
}

async fn models(State(state): State<Arc<CerebrasState>>, headers: HeaderMap) -> Response {
    if !bearer_ok(&state, &headers) {
        return error_for_status(401);
    }
    let created = unix_now();
    let data: Vec<Value> = state
        .cfg
        .models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": created, "owned_by": "Cerebras"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// The SDK's connection pre-warm: always 200, no auth (its errors are ignored anyway).
async fn warming(State(state): State<Arc<CerebrasState>>) -> StatusCode {
    state.inner().warming_hits += 1;
    StatusCode::OK
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A validated chat completions request.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub stream: bool,
    pub max_completion_tokens: Option<usize>,
    /// `(role, text)` of every message (text parts joined).
    pub messages: Vec<(String, String)>,
    /// Names of the functions offered in `tools`.
    pub tools: Vec<String>,
    /// `tool_choice` (`auto` when absent); with `none` no tool may be called.
    pub tool_choice: String,
}

/// Why a request was refused: `(status, param, message, code)`.
pub type Rejection = (u16, Option<&'static str>, String, &'static str);

impl ChatRequest {
    /// Validates a body the way the API does.
    pub fn parse(body: &Value, models: &[String]) -> Result<Self, Rejection> {
        let bad =
            |param: &'static str, message: String| (400, Some(param), message, "wrong_api_format");
        let Value::Object(map) = body else {
            return Err((
                400,
                None,
                "Request body must be a JSON object.".into(),
                "wrong_api_format",
            ));
        };
        if let Some(unknown) = map.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
            return Err((
                400,
                None,
                format!("Unrecognized request argument supplied: {unknown}"),
                "wrong_api_format",
            ));
        }
        let model = match map.get("model").and_then(Value::as_str) {
            Some(m) => m.to_owned(),
            None => return Err(bad("model", "model is required".into())),
        };
        if !models.contains(&model) {
            return Err((
                404,
                Some("model"),
                format!("Model {model} does not exist or you do not have access to it."),
                "model_not_found",
            ));
        }
        let Some(raw_messages) = map
            .get("messages")
            .and_then(Value::as_array)
            .filter(|m| !m.is_empty())
        else {
            return Err(bad("messages", "messages must be a non-empty array".into()));
        };
        let mut messages = Vec::with_capacity(raw_messages.len());
        for (i, m) in raw_messages.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
            if !ROLES.contains(&role) {
                return Err(bad(
                    "messages",
                    format!("messages[{i}].role must be one of {ROLES:?}"),
                ));
            }
            let text = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                // Content parts: only text parts carry meaning here.
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(" "),
                // Assistant tool-call turns may carry null content.
                Some(Value::Null) | None
                    if role == "assistant" && m.get("tool_calls").is_some() =>
                {
                    String::new()
                }
                _ => {
                    return Err(bad(
                        "messages",
                        format!("messages[{i}].content must be a string or content parts"),
                    ))
                }
            };
            // A tool result must answer a call an earlier assistant message made.
            if role == "tool" {
                let id = m
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let answered = raw_messages[..i].iter().any(|prev| {
                    prev["role"] == "assistant"
                        && prev["tool_calls"]
                            .as_array()
                            .is_some_and(|calls| calls.iter().any(|c| c["id"] == id))
                });
                if id.is_empty() || !answered {
                    return Err(bad(
                        "messages",
                        format!("messages[{i}] (role tool) must answer an earlier assistant tool call by tool_call_id"),
                    ));
                }
            }
            messages.push((role.to_owned(), text));
        }
        let stream = match map.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("stream", "stream must be a boolean".into())),
        };
        let max_completion_tokens = match map
            .get("max_completion_tokens")
            .or_else(|| map.get("max_tokens"))
        {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Some(n as usize),
                _ => {
                    return Err(bad(
                        "max_completion_tokens",
                        "max_completion_tokens must be a positive integer".into(),
                    ))
                }
            },
        };
        let tools = match map.get("tools") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => {
                let mut names = Vec::new();
                for (i, t) in list.iter().enumerate() {
                    match t["function"]["name"].as_str() {
                        Some(name) if t["type"] == "function" && !name.is_empty() => {
                            names.push(name.to_owned());
                        }
                        _ => {
                            return Err(bad(
                                "tools",
                                format!("tools[{i}] must be {{\"type\":\"function\",\"function\":{{\"name\":…}}}}"),
                            ))
                        }
                    }
                }
                names
            }
            Some(_) => return Err(bad("tools", "tools must be an array".into())),
        };
        let tool_choice = match map.get("tool_choice") {
            None | Some(Value::Null) => "auto".to_owned(),
            Some(Value::String(c)) if matches!(c.as_str(), "auto" | "none" | "required") => {
                c.clone()
            }
            Some(_) => {
                return Err(bad(
                    "tool_choice",
                    "tool_choice must be \"auto\", \"none\" or \"required\"".into(),
                ))
            }
        };
        Ok(Self {
            model,
            stream,
            max_completion_tokens,
            messages,
            tools,
            tool_choice,
        })
    }

    /// The deterministic echo reply for this conversation.
    pub fn echo_reply(&self) -> String {
        let persona: Vec<&str> = self
            .messages
            .iter()
            .find(|(role, _)| role == "system")
            .map(|(_, text)| {
                text.split_whitespace()
                    .take(3)
                    .map(|w| w.trim_matches(|c: char| c.is_ascii_punctuation()))
                    .filter(|w| !w.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let opener = if persona.is_empty() {
            "Alright".to_owned()
        } else {
            persona.join(" ")
        };
        let last_user = self
            .messages
            .iter()
            .rev()
            .find(|(role, _)| role == "user")
            .map(|(_, text)| text.trim())
            .unwrap_or("");
        format!("{opener}! You said: {last_user}. Let's keep going.")
    }

    /// Prompt tokens: whitespace-split words of every message.
    pub fn prompt_tokens(&self) -> usize {
        self.messages.iter().map(|(_, t)| count_tokens(t)).sum()
    }
}

/// The fake's token count: whitespace-split words.
pub fn count_tokens(text: &str) -> usize {
    text.split_whitespace().count()
}

/// The reply pieces as streamed: each word with the whitespace before it, truncated to
/// `max_tokens` words. Returns the pieces and the finish reason.
pub fn reply_pieces(reply: &str, max_tokens: Option<usize>) -> (Vec<String>, &'static str) {
    let mut pieces: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    for c in reply.chars() {
        // A word ends at the first whitespace after it; that whitespace leads the next piece.
        if c.is_whitespace() && in_word {
            pieces.push(std::mem::take(&mut current));
        }
        in_word = !c.is_whitespace();
        current.push(c);
    }
    if !current.is_empty() {
        match pieces.last_mut() {
            Some(last) if current.trim().is_empty() => last.push_str(&current),
            _ => pieces.push(current),
        }
    }
    match max_tokens {
        Some(max) if pieces.len() > max => {
            pieces.truncate(max);
            (pieces, "length")
        }
        _ => (pieces, "stop"),
    }
}

async fn chat(
    State(state): State<Arc<CerebrasState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parsed: Result<Value, _> = serde_json::from_slice(&body);
    let recorded = parsed.as_ref().map_or_else(
        |_| Value::String(String::from_utf8_lossy(&body).into_owned()),
        Clone::clone,
    );
    let arrived = std::time::Instant::now();
    let record = |status: u16| {
        state.inner().requests.push(RequestRecord {
            body: recorded.clone(),
            status,
            at: arrived,
        });
    };
    if !bearer_ok(&state, &headers) {
        record(401);
        return error_response(
            401,
            "invalid_request_error",
            "Wrong API Key",
            Some("api_key"),
            "wrong_api_key",
        );
    }
    let Ok(body) = parsed else {
        record(400);
        return error_response(
            400,
            "invalid_request_error",
            "Request body is not valid JSON.",
            None,
            "wrong_api_format",
        );
    };
    let request = match ChatRequest::parse(&body, &state.cfg.models) {
        Ok(r) => r,
        Err((status, param, message, code)) => {
            record(status);
            return error_response(status, "invalid_request_error", &message, param, code);
        }
    };
    let notes_plan = match request.stream {
        true => None,
        false => state.inner().notes_plans.pop_front(),
    };
    match notes_plan {
        Some(NotesPlan::Fail(status)) => {
            record(status);
            return error_for_status(status);
        }
        Some(NotesPlan::Hold(pause)) => {
            state.inner().holding += 1;
            tokio::time::sleep(pause).await;
            state.inner().holding -= 1;
        }
        None => {}
    }
    let (failure, scripted) = {
        let mut inner = state.inner();
        let failure = inner.failures.pop_front();
        // A failed request consumes no scripted reply: the retry must get it.
        let scripted = match failure {
            Some(PlannedFailure::Status(_)) => None,
            Some(PlannedFailure::MidStream { .. }) if !request.stream => None,
            _ => inner.script.pop_front(),
        };
        (failure, scripted)
    };
    match failure {
        Some(PlannedFailure::Status(status)) => {
            record(status);
            return error_for_status(status);
        }
        Some(PlannedFailure::MidStream { status, .. }) if !request.stream => {
            record(status);
            return error_for_status(status);
        }
        _ => {}
    }
    let reply = scripted
        .or_else(|| state.cfg.acts.then(|| acting::reply(&request)).flatten())
        .unwrap_or_else(|| request.echo_reply());
    // A scripted reply may end with tool calls; the model can only call tools offered.
    let (reply, calls) = split_tool_calls(&reply);
    let callable = |name: &String| request.tool_choice != "none" && request.tools.contains(name);
    if let Some((name, _)) = calls.iter().find(|(n, _)| !callable(n)) {
        record(400);
        return error_response(
            400,
            "invalid_request_error",
            &format!(
                "the scripted reply calls {name:?}, which the request did not offer (tools {:?}, tool_choice {:?})",
                request.tools, request.tool_choice
            ),
            Some("tools"),
            "wrong_api_format",
        );
    }
    record(200);
    let (pieces, mut finish_reason) = reply_pieces(&reply, request.max_completion_tokens);
    if !calls.is_empty() {
        finish_reason = "tool_calls";
    }
    let completion_tokens = pieces.len();
    let prompt_tokens = request.prompt_tokens();
    let meta = Meta {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4()),
        created: unix_now(),
        model: request.model.clone(),
        usage: json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }),
    };
    if !request.stream {
        let content: String = pieces.concat();
        let mut message = json!({"role": "assistant", "content": content});
        if !calls.is_empty() {
            message["tool_calls"] = calls
                .iter()
                .enumerate()
                .map(|(i, (name, args))| json!({"id": format!("call_{i}"), "type": "function", "function": {"name": name, "arguments": args}}))
                .collect();
        }
        return Json(json!({
            "id": meta.id,
            "object": "chat.completion",
            "created": meta.created,
            "model": meta.model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": meta.usage,
            "time_info": time_info(meta.created),
        }))
        .into_response();
    }
    let mid_stream = match failure {
        Some(PlannedFailure::MidStream {
            after_chunks,
            status,
        }) => Some((after_chunks, status)),
        _ => None,
    };
    let events = stream_events(&meta, &pieces, &calls, finish_reason, mid_stream);
    let pacing = Pacing {
        chunk_interval: state.cfg.chunk_interval,
        first_token_delay: state.cfg.first_token_delay,
        tokens_per_sec: state.cfg.tokens_per_sec,
    };
    sse_response(events, state.faults.connection(), pacing)
}

/// How a stream's events are spread in time ([`Config`]'s pacing fields).
#[derive(Clone, Copy, Debug, Default)]
struct Pacing {
    chunk_interval: Duration,
    first_token_delay: Duration,
    tokens_per_sec: Option<f64>,
}

impl Pacing {
    /// When the `index`-th content chunk is due, given when the first was sent.
    fn content_due(&self, first: tokio::time::Instant, index: u32) -> tokio::time::Instant {
        match self.tokens_per_sec {
            Some(tps) if tps > 0.0 && tps.is_finite() => {
                first + Duration::from_secs_f64(f64::from(index) / tps)
            }
            _ => first,
        }
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    usage: Value,
}

fn time_info(created: u64) -> Value {
    json!({"queue_time": 0.0001, "prompt_time": 0.002, "completion_time": 0.01, "total_time": 0.0121, "created": created as f64 + 0.1})
}

/// One SSE event of the stream.
#[derive(Clone, Debug, PartialEq)]
enum Event {
    /// A `data: <json>` event; `content` marks the ones paced by `chunk_interval`.
    Data { json: Value, content: bool },
    /// `data: [DONE]`
    Done,
}

/// The full event sequence of a streamed completion (pure).
fn stream_events(
    meta: &Meta,
    pieces: &[String],
    calls: &[(String, String)],
    finish_reason: &str,
    mid_stream: Option<(usize, u16)>,
) -> Vec<Event> {
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let mut events = vec![Event::Data {
        json: chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        content: false,
    }];
    for (i, piece) in pieces.iter().enumerate() {
        if let Some((after, status)) = mid_stream {
            if i == after {
                events.push(Event::Data {
                    json: mid_stream_error(status),
                    content: false,
                });
                return events;
            }
        }
        events.push(Event::Data {
            json: chunk(json!({"content": piece}), Value::Null),
            content: true,
        });
    }
    if let Some((_, status)) = mid_stream {
        // Fewer pieces than `after_chunks`: the error still comes before the end.
        events.push(Event::Data {
            json: mid_stream_error(status),
            content: false,
        });
        return events;
    }
    // Tool calls after the content (PROTOCOLS.md §9): id, type and name once, then the
    // arguments in two fragments.
    for (i, (name, args)) in calls.iter().enumerate() {
        events.push(Event::Data {
            json: chunk(
                json!({"tool_calls": [{"index": i, "id": format!("call_{i}"), "type": "function", "function": {"name": name, "arguments": ""}}]}),
                Value::Null,
            ),
            content: false,
        });
        let half = args
            .char_indices()
            .nth(args.chars().count() / 2)
            .map_or(args.len(), |(b, _)| b);
        for part in [&args[..half], &args[half..]] {
            events.push(Event::Data {
                json: chunk(
                    json!({"tool_calls": [{"index": i, "function": {"arguments": part}}]}),
                    Value::Null,
                ),
                content: false,
            });
        }
    }
    let mut last = chunk(json!({}), json!(finish_reason));
    last["usage"] = meta.usage.clone();
    last["time_info"] = time_info(meta.created);
    events.push(Event::Data {
        json: last,
        content: false,
    });
    events.push(Event::Done);
    events
}

/// Opens a scripted tool call: `Bye! <tool_call>end_call {"reason":"done"}</tool_call>`.
pub const TOOL_CALL_OPEN: &str = "<tool_call>";
const TOOL_CALL_CLOSE: &str = "</tool_call>";

/// A scripted reply's text and its tool calls `(name, arguments)`, in order.
pub fn split_tool_calls(reply: &str) -> (String, Vec<(String, String)>) {
    let Some(at) = reply.find(TOOL_CALL_OPEN) else {
        return (reply.to_owned(), Vec::new());
    };
    let text = reply[..at].trim_end().to_owned();
    let calls = reply[at..]
        .split(TOOL_CALL_OPEN)
        .filter_map(|part| part.split(TOOL_CALL_CLOSE).next())
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| match c.split_once(char::is_whitespace) {
            Some((name, args)) => (name.to_owned(), args.trim().to_owned()),
            None => (c.to_owned(), String::new()),
        })
        .collect();
    (text, calls)
}

fn mid_stream_error(status: u16) -> Value {
    let (kind, code, message) = status_error(status);
    json!({
        "error": {"message": message, "type": kind, "param": null, "code": code, "id": uuid::Uuid::new_v4().to_string()},
        "status_code": status,
    })
}

/// Serves the events as `text/event-stream`, applying per-event faults. A drop fault
/// aborts the body with an error, so the client sees the connection cut mid-response
/// (no terminating chunk), like a network failure.
fn sse_response(events: Vec<Event>, mut faults: ConnectionFaults, pacing: Pacing) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let mut drop_timer = faults.drop_timer();
    let interval = pacing.chunk_interval;
    tokio::spawn(async move {
        let produce = async {
            // When the first content chunk went out, and how many have.
            let mut first_content: Option<tokio::time::Instant> = None;
            let mut content_sent = 0u32;
            for (i, event) in events.into_iter().enumerate() {
                let (text, paced) = match event {
                    Event::Data { json, content } => (format!("data: {json}\n\n"), content),
                    Event::Done => ("data: [DONE]\n\n".to_owned(), false),
                };
                // Event 0 is the role chunk; the model's first token follows it.
                if i == 1 && !pacing.first_token_delay.is_zero() {
                    tokio::time::sleep(pacing.first_token_delay).await;
                }
                if paced {
                    if let Some(first) = first_content {
                        tokio::time::sleep_until(pacing.content_due(first, content_sent)).await;
                    }
                }
                if paced && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                if paced {
                    first_content.get_or_insert_with(tokio::time::Instant::now);
                    content_sent += 1;
                }
                if !faults.before_send().await {
                    return false;
                }
                if tx.send(Ok(Bytes::from(text))).await.is_err() {
                    // Client went away.
                    return true;
                }
            }
            true
        };
        let completed = tokio::select! {
            done = produce => done,
            () = drop_timer.wait() => false,
        };
        if !completed {
            tracing::info!("cerebras fake: dropping stream (fault)");
            // hyper discards its unflushed write buffer when a body fails; give it a moment
            // so the client really receives the events sent before the cut.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx
                .send(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "fault: drop",
                )))
                .await;
        }
    });
    let body = Body::from_stream(ReceiverStream(rx));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| error_for_status(500))
}

/// Minimal `Stream` over an mpsc receiver (avoids pulling tokio-stream for one adapter).
struct ReceiverStream<T>(mpsc::Receiver<T>);

impl<T> Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models() -> Vec<String> {
        vec!["gpt-oss-120b".to_owned()]
    }

    /// Valid bodies parse; bad model, roles, content and unknown fields are refused.
    #[test]
    fn request_validation() {
        let ok = json!({"model":"gpt-oss-120b","messages":[{"role":"system","content":"Coach Max here."},{"role":"user","content":"hi"}],"stream":true,"max_completion_tokens":5});
        let r = ChatRequest::parse(&ok, &models()).unwrap();
        assert!(r.stream);
        assert_eq!(r.max_completion_tokens, Some(5));
        let cases = [
            (json!({"messages":[{"role":"user","content":"x"}]}), 400),
            (
                json!({"model":"llama3.1-8b","messages":[{"role":"user","content":"x"}]}),
                404,
            ),
            (json!({"model":"gpt-oss-120b","messages":[]}), 400),
            (
                json!({"model":"gpt-oss-120b","messages":[{"role":"bot","content":"x"}]}),
                400,
            ),
            (
                json!({"model":"gpt-oss-120b","messages":[{"role":"user"}]}),
                400,
            ),
            (
                json!({"model":"gpt-oss-120b","messages":[{"role":"user","content":"x"}],"stream":"yes"}),
                400,
            ),
            (
                json!({"model":"gpt-oss-120b","messages":[{"role":"user","content":"x"}],"max_completion_tokens":0}),
                400,
            ),
            (
                json!({"model":"gpt-oss-120b","messages":[{"role":"user","content":"x"}],"temprature":0.2}),
                400,
            ),
        ];
        for (body, status) in cases {
            assert_eq!(
                ChatRequest::parse(&body, &models()).unwrap_err().0,
                status,
                "{body}"
            );
        }
    }

    /// The echo uses the persona's first words and the last user message.
    #[test]
    fn echo_reply_is_deterministic() {
        let body = json!({"model":"gpt-oss-120b","messages":[
            {"role":"system","content":"Coach Max here, tough love only."},
            {"role":"user","content":"first"},{"role":"assistant","content":"ok"},
            {"role":"user","content":" I ran 5k "}]});
        let r = ChatRequest::parse(&body, &models()).unwrap();
        assert_eq!(
            r.echo_reply(),
            "Coach Max here! You said: I ran 5k. Let's keep going."
        );
        assert_eq!(r.prompt_tokens(), 6 + 1 + 1 + 3);
        let plain = ChatRequest::parse(
            &json!({"model":"gpt-oss-120b","messages":[{"role":"user","content":"yo"}]}),
            &models(),
        )
        .unwrap();
        assert_eq!(
            plain.echo_reply(),
            "Alright! You said: yo. Let's keep going."
        );
    }

    /// With a token rate, chunk `i` is due `i / rate` after the first; without one (or a
    /// nonsensical rate) at once.
    #[test]
    fn token_rate_schedule() {
        let t = tokio::time::Instant::now();
        let paced = Pacing {
            tokens_per_sec: Some(400.0),
            ..Pacing::default()
        };
        assert_eq!(paced.content_due(t, 0), t);
        assert_eq!(paced.content_due(t, 4), t + Duration::from_millis(10));
        assert_eq!(paced.content_due(t, 400), t + Duration::from_secs(1));
        for rate in [None, Some(0.0), Some(-1.0), Some(f64::NAN)] {
            let p = Pacing {
                tokens_per_sec: rate,
                ..Pacing::default()
            };
            assert_eq!(p.content_due(t, 10), t, "{rate:?}");
        }
    }

    /// Pieces are words with their leading space; joined they give the reply back.
    #[test]
    fn pieces_split_on_words_and_truncate() {
        let (p, reason) = reply_pieces("Hello there,  friend. ", None);
        assert_eq!(p, vec!["Hello", " there,", "  friend. "]);
        assert_eq!(p.concat(), "Hello there,  friend. ");
        assert_eq!(reason, "stop");
        let (p, reason) = reply_pieces("a b c d", Some(2));
        assert_eq!(p.concat(), "a b");
        assert_eq!(reason, "length");
        assert_eq!(reply_pieces("a b", Some(2)).1, "stop");
    }

    /// The stream is role chunk, content chunks, final chunk with usage, then [DONE];
    /// a mid-stream failure ends with the error payload instead.
    #[test]
    fn stream_event_sequence() {
        let meta = Meta {
            id: "chatcmpl-1".into(),
            created: 1,
            model: "gpt-oss-120b".into(),
            usage: json!({"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}),
        };
        let pieces = vec!["Hi".to_owned(), " you".to_owned()];
        let events = stream_events(&meta, &pieces, &[], "stop", None);
        assert_eq!(events.len(), 5);
        let Event::Data { json: first, .. } = &events[0] else {
            panic!()
        };
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        let Event::Data { json: last, .. } = &events[3] else {
            panic!()
        };
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert_eq!(last["usage"]["total_tokens"], 3);
        assert!(last["time_info"]["total_time"].is_number());
        assert_eq!(events[4], Event::Done);

        let broken = stream_events(&meta, &pieces, &[], "stop", Some((1, 429)));
        assert_eq!(broken.len(), 3);
        let Event::Data { json: err, .. } = &broken[2] else {
            panic!()
        };
        assert_eq!(err["status_code"], 429);
        assert!(err["error"]["message"].is_string());
    }

    /// A scripted reply's tool calls stream after its content as PROTOCOLS.md §9 shows:
    /// id, type and name once, the arguments in fragments, `finish_reason: tool_calls`.
    #[test]
    fn scripted_tool_calls_stream_in_fragments() {
        let (text, calls) =
            split_tool_calls("Bye, Sam! <tool_call>end_call {\"reason\":\"done\"}</tool_call>");
        assert_eq!(text, "Bye, Sam!");
        assert_eq!(
            calls,
            vec![("end_call".to_string(), "{\"reason\":\"done\"}".to_string())]
        );
        assert_eq!(split_tool_calls("plain"), ("plain".to_string(), vec![]));
        let meta = Meta {
            id: "chatcmpl-1".into(),
            created: 1,
            model: "m".into(),
            usage: json!({}),
        };
        let (pieces, _) = reply_pieces(&text, None);
        let events = stream_events(&meta, &pieces, &calls, "tool_calls", None);
        let data: Vec<&Value> = events
            .iter()
            .filter_map(|e| match e {
                Event::Data { json, .. } => Some(json),
                Event::Done => None,
            })
            .collect();
        let fragments: Vec<&Value> = data
            .iter()
            .filter_map(|d| d["choices"][0]["delta"]["tool_calls"].get(0))
            .collect();
        assert_eq!(fragments.len(), 3);
        assert_eq!(fragments[0]["id"], "call_0");
        assert_eq!(fragments[0]["function"]["name"], "end_call");
        let args: String = fragments
            .iter()
            .map(|f| f["function"]["arguments"].as_str().unwrap())
            .collect();
        assert_eq!(args, "{\"reason\":\"done\"}");
        assert_eq!(
            data.last().unwrap()["choices"][0]["finish_reason"],
            "tool_calls"
        );
    }
}
