//! Fake ElevenLabs text-to-speech (PROTOCOLS.md §5): the WebSockets, single-context
//! `/v1/text-to-speech/{voice_id}/stream-input` and multi-context `…/multi-stream-input`,
//! and the HTTP streaming fallback `POST /v1/text-to-speech/{voice_id}/stream`
//! ([`HTTP_STREAM_PATH`]).
//!
//! Owns the handshake/query checks, a pure [`Conversation`] state machine (client JSON in,
//! actions out, time passed in) and the socket shell (inactivity, faults, interruption);
//! for HTTP, the request validation (FastAPI-style 422s, `detail.status` 401s) and the
//! chunked audio body (recorded as [`HttpSynthesis`]).
//! It must not guess in the client's favour: where the provider's behaviour is
//! undocumented it fails loudly (error frame + close 1008 on a socket, 422 over HTTP)
//! and says so in a comment.
//!
//! Audio is [`crate::audio::encode_text`] of the generated text (40 ms per character,
//! deterministic), so whoever hears it can decode exactly what was said.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::audio;
use crate::fakes::faults::{ConnectionFaults, ErrorResponder, FaultSwitch};
use crate::fakes::{Server, LOOPBACK_ANY};

/// Route of the single-context stream.
pub const SINGLE_PATH: &str = "/v1/text-to-speech/{voice_id}/stream-input";
/// Route of the multi-context stream.
pub const MULTI_PATH: &str = "/v1/text-to-speech/{voice_id}/multi-stream-input";
/// Route of the HTTP streaming fallback (`POST`, JSON body, chunked audio back).
pub const HTTP_STREAM_PATH: &str = "/v1/text-to-speech/{voice_id}/stream";
/// Simultaneous contexts allowed per multi-context connection.
pub const MAX_CONTEXTS: usize = 5;
/// Close code of every error the service reports on the socket.
pub const POLICY_CLOSE: u16 = 1008;
/// Characters per audio message: 12 × 40 ms = 480 ms, under the ~0.5 s the client should
/// see per message so streaming is visible.
pub const CHARS_PER_MESSAGE: usize = 12;

const DEFAULT_SCHEDULE: [u32; 4] = [120, 160, 250, 290];
const DEFAULT_INACTIVITY_S: u64 = 20;
const MAX_INACTIVITY_S: u64 = 180;
const KNOWN_OUTPUT_FORMATS: &[&str] = &[
    "ulaw_8000",
    "alaw_8000",
    "pcm_8000",
    "pcm_16000",
    "pcm_22050",
    "pcm_24000",
    "pcm_44100",
    "pcm_48000",
    "mp3_22050_32",
    "mp3_44100_32",
    "mp3_44100_64",
    "mp3_44100_96",
    "mp3_44100_128",
    "mp3_44100_192",
    "opus_48000_32",
    "opus_48000_64",
    "opus_48000_96",
    "opus_48000_128",
    "opus_48000_192",
];
const KNOWN_QUERY: &[&str] = &[
    "model_id",
    "output_format",
    "inactivity_timeout",
    "sync_alignment",
    "auto_mode",
    "language_code",
    "enable_logging",
    "enable_ssml_parsing",
    "apply_text_normalization",
    "seed",
    "authorization",
];

/// How the fake is set up.
#[derive(Clone, Debug)]
pub struct Config {
    pub addr: SocketAddr,
    /// The key expected in `xi-api-key` (header or first message).
    pub api_key: String,
    /// Wall-clock length of one second of `inactivity_timeout`: tests shrink it so the
    /// query's seconds still drive the timeout, only faster.
    pub timeout_second: Duration,
    /// Pause between two audio messages (HTTP: between two body chunks), simulating
    /// generation speed (0 = as fast as possible). Gives interruption tests audio still in
    /// flight to cancel.
    pub audio_interval: Duration,
    /// HTTP streaming only: pause before the first body chunk, simulating the service's
    /// time to first audio (the latency benchmark sets it; 0 = none).
    pub http_first_byte: Duration,
    /// WebSockets only: pause before the upgrade is answered, simulating the connect
    /// (TCP, TLS, handshake) to the service (the latency benchmark sets it; 0 = none).
    pub connect_delay: Duration,
    /// WebSockets only: time to first audio of each generation, counted from the text
    /// that triggered it (flush or chunk threshold) to its first audio message (the
    /// latency benchmark sets it; 0 = none). Messages already queued behind it wait too,
    /// as audio of one socket is sent in order.
    pub first_audio_delay: Duration,
    pub fault_seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            addr: LOOPBACK_ANY,
            api_key: "xi-test-key".to_owned(),
            timeout_second: Duration::from_secs(1),
            audio_interval: Duration::ZERO,
            http_first_byte: Duration::ZERO,
            connect_delay: Duration::ZERO,
            first_audio_delay: Duration::ZERO,
            fault_seed: crate::fakes::faults::DEFAULT_SEED,
        }
    }
}

/// Which endpoint a connection used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Single,
    Multi,
}

/// How a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Closed {
    ByServer {
        code: u16,
        reason: String,
    },
    ByClient {
        code: Option<u16>,
        reason: String,
    },
    /// Torn down without a close frame by a drop fault.
    Dropped,
    /// The transport ended without a close frame from the client.
    Vanished,
}

/// One piece of generated speech.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// Index of the connection in [`Handle::connections`].
    pub connection: usize,
    /// Context id (`""` on the single-context endpoint).
    pub context: String,
    pub text: String,
}

/// What the fake saw and did on one connection.
#[derive(Clone, Debug)]
pub struct ConnectionRecord {
    pub mode: Mode,
    pub voice_id: String,
    pub query: Vec<(String, String)>,
    /// Client messages, parsed (invalid JSON is kept as a string value).
    pub received: Vec<Value>,
    /// Messages sent, in order (audio included).
    pub sent: Vec<Value>,
    /// Contexts closed by the client (`close_context`) or by inactivity, in order.
    pub contexts_closed: Vec<String>,
    pub closed: Option<Closed>,
}

/// One accepted `POST …/stream` request (validated, audio about to be streamed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpSynthesis {
    pub voice_id: String,
    pub text: String,
    /// The `output_format` query value (always `ulaw_8000` once accepted).
    pub output_format: String,
    /// The body's `model_id`, if it sent one.
    pub model_id: Option<String>,
}

#[derive(Default)]
struct Log {
    connections: Vec<ConnectionRecord>,
    generations: Vec<Generation>,
    /// Accepted HTTP streaming requests, in arrival order.
    http_syntheses: Vec<HttpSynthesis>,
    /// Characters whose audio was actually sent (WebSocket messages and HTTP chunks).
    characters_sent: u64,
}

/// Shared state of the fake.
pub struct ElevenLabsState {
    cfg: Config,
    log: Mutex<Log>,
    faults: FaultSwitch,
}

impl ElevenLabsState {
    pub fn new(cfg: Config) -> Arc<Self> {
        Arc::new(Self {
            faults: FaultSwitch::with_seed(cfg.fault_seed),
            log: Mutex::new(Log::default()),
            cfg,
        })
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, index: usize, edit: impl FnOnce(&mut ConnectionRecord)) {
        if let Some(r) = self.log().connections.get_mut(index) {
            edit(r);
        }
    }
}

/// The fake's routes (wrapped with faults, plus `/__faults`).
pub fn router(state: Arc<ElevenLabsState>) -> Router {
    let faults = state.faults.clone();
    let app = Router::new()
        .route(SINGLE_PATH, get(single))
        .route(MULTI_PATH, get(multi))
        .route(HTTP_STREAM_PATH, post(http_stream))
        .with_state(state);
    // HTTP-level errors look like the REST API's: {"detail":{"status","message"}}.
    let error: ErrorResponder = Arc::new(|status: StatusCode| {
        let body = json!({"detail": {"status": "fault_injected", "message": "Injected fault (fake ElevenLabs)."}});
        (status, Json(body)).into_response()
    });
    crate::fakes::faults::wrap(app, faults, error)
}

/// A running fake ElevenLabs.
pub struct Handle {
    server: Server,
    state: Arc<ElevenLabsState>,
}

/// Starts the fake on `cfg.addr`.
pub async fn spawn(cfg: Config) -> anyhow::Result<Handle> {
    let addr = cfg.addr;
    let state = ElevenLabsState::new(cfg);
    let server = Server::start("elevenlabs", addr, router(state.clone())).await?;
    Ok(Handle { server, state })
}

impl Handle {
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// `ws://127.0.0.1:PORT`
    pub fn ws_url(&self) -> String {
        self.server.ws_url()
    }

    pub fn faults(&self) -> &FaultSwitch {
        &self.state.faults
    }

    pub fn api_key(&self) -> &str {
        &self.state.cfg.api_key
    }

    pub fn connections(&self) -> Vec<ConnectionRecord> {
        self.state.log().connections.clone()
    }

    /// Characters whose audio was sent (what ElevenLabs would bill).
    pub fn characters_synthesized(&self) -> u64 {
        self.state.log().characters_sent
    }

    /// Every WebSocket generation, in order (HTTP requests are in
    /// [`Handle::http_syntheses`]).
    pub fn generations(&self) -> Vec<Generation> {
        self.state.log().generations.clone()
    }

    /// Every accepted HTTP streaming request, in arrival order.
    pub fn http_syntheses(&self) -> Vec<HttpSynthesis> {
        self.state.log().http_syntheses.clone()
    }

    /// Generated texts grouped by context id (all connections).
    pub fn texts_by_context(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for g in self.generations() {
            out.entry(g.context).or_default().push(g.text);
        }
        out
    }

    /// Contexts closed, over all connections, in order.
    pub fn contexts_closed(&self) -> Vec<String> {
        self.connections()
            .into_iter()
            .flat_map(|c| c.contexts_closed)
            .collect()
    }

    /// Polls the records until `check` holds or `timeout` passes.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        check: impl Fn(&[ConnectionRecord]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if check(&self.connections()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

/// Stream options from the query string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    pub model_id: Option<String>,
    pub inactivity_timeout_s: u64,
}

impl StreamOptions {
    /// Validates the query; the error is `(error code, message)` for the error frame.
    pub fn from_query(query: &[(String, String)]) -> Result<Self, (&'static str, String)> {
        let get = |name: &str| {
            query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if let Some((unknown, _)) = query
            .iter()
            .find(|(k, _)| !KNOWN_QUERY.contains(&k.as_str()))
        {
            return Err((
                "invalid_request",
                format!("Unknown query parameter: {unknown}"),
            ));
        }
        // The real default is mp3; anything but μ-law 8 kHz would be unplayable on a phone
        // line, so the fake requires the format to be asked for explicitly.
        match get("output_format") {
            Some("ulaw_8000") => {}
            Some(f) if KNOWN_OUTPUT_FORMATS.contains(&f) => {
                return Err((
                    "invalid_output_format",
                    format!("fake ElevenLabs produces only ulaw_8000, not {f}"),
                ))
            }
            Some(f) => {
                return Err((
                    "invalid_output_format",
                    format!("Invalid output format: {f}"),
                ))
            }
            None => {
                return Err((
                    "invalid_output_format",
                    "output_format missing (default mp3_44100_128 is not phone audio)".to_owned(),
                ))
            }
        }
        let inactivity_timeout_s = match get("inactivity_timeout") {
            None => DEFAULT_INACTIVITY_S,
            Some(v) => match v.parse::<u64>() {
                Ok(s) if (1..=MAX_INACTIVITY_S).contains(&s) => s,
                _ => {
                    return Err((
                        "invalid_request",
                        format!("inactivity_timeout must be an integer in 1..=180, got {v}"),
                    ))
                }
            },
        };
        Ok(Self {
            model_id: get("model_id").map(str::to_owned),
            inactivity_timeout_s,
        })
    }
}

async fn single(
    state: State<Arc<ElevenLabsState>>,
    path: Path<String>,
    headers: HeaderMap,
    query: RawQuery,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    connect_delay(&state).await;
    accept(Mode::Single, state, path, headers, query, upgrade)
}

async fn multi(
    state: State<Arc<ElevenLabsState>>,
    path: Path<String>,
    headers: HeaderMap,
    query: RawQuery,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    connect_delay(&state).await;
    accept(Mode::Multi, state, path, headers, query, upgrade)
}

/// [`Config::connect_delay`], before the upgrade is answered.
async fn connect_delay(state: &ElevenLabsState) {
    if !state.cfg.connect_delay.is_zero() {
        tokio::time::sleep(state.cfg.connect_delay).await;
    }
}

fn accept(
    mode: Mode,
    State(state): State<Arc<ElevenLabsState>>,
    Path(voice_id): Path<String>,
    headers: HeaderMap,
    RawQuery(raw_query): RawQuery,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => return rejection.into_response(),
    };
    let query: Vec<(String, String)> =
        serde_urlencoded::from_str(raw_query.as_deref().unwrap_or("")).unwrap_or_default();
    let header_key = headers
        .get("xi-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let index = {
        let mut log = state.log();
        log.connections.push(ConnectionRecord {
            mode,
            voice_id,
            query: query.clone(),
            received: Vec::new(),
            sent: Vec::new(),
            contexts_closed: Vec::new(),
            closed: None,
        });
        log.connections.len() - 1
    };
    let faults = state.faults.connection();
    // Errors are reported on the socket (error frame + 1008), as the service does for
    // auth and message problems, so the upgrade always succeeds.
    upgrade.on_upgrade(move |socket| async move {
        run_connection(socket, state, mode, query, header_key, index, faults).await;
    })
}

/// Something the connection must do, produced by the [`Conversation`].
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send this JSON (the single-context isFinal).
    Send(Value),
    /// Send a message of one context (audio, or its isFinal): dropped if the context is
    /// closed before it goes out. `chars` is the characters of audio it carries.
    ContextMessage {
        context: String,
        epoch: u64,
        chars: usize,
        message: Value,
    },
    /// A generation happened (for the records).
    Generated { context: String, text: String },
    /// A context was closed (pending text and unsent audio must be dropped).
    ContextClosed { context: String, epoch: u64 },
    /// Report an error frame and close 1008.
    Fail {
        error: &'static str,
        message: String,
    },
    /// Close normally (1000) after everything queued has been sent.
    Close,
}

#[derive(Debug)]
struct Context {
    buffer: String,
    schedule: Vec<u32>,
    generations: usize,
    last_activity: Instant,
    epoch: u64,
}

/// The per-connection protocol state machine. Pure: no I/O, time is an argument.
pub struct Conversation {
    mode: Mode,
    expected_key: String,
    header_key: Option<String>,
    started: bool,
    inactivity: Duration,
    last_message: Instant,
    contexts: HashMap<String, Context>,
    /// Bumped per context id every time a context with that id is opened.
    next_epoch: u64,
    finished: bool,
}

const SINGLE_FIELDS: &[&str] = &[
    "text",
    "voice_settings",
    "generation_config",
    "pronunciation_dictionary_locators",
    "xi-api-key",
    "authorization",
    "flush",
    "try_trigger_generation",
];
const MULTI_FIELDS: &[&str] = &[
    "text",
    "context_id",
    "voice_settings",
    "generation_config",
    "pronunciation_dictionary_locators",
    "xi_api_key",
    "authorization",
    "flush",
    "close_context",
    "close_socket",
];
/// Fields allowed only in the first message (of the socket, or of a context in multi).
const INIT_ONLY: &[&str] = &[
    "voice_settings",
    "generation_config",
    "pronunciation_dictionary_locators",
];

/// The internal id of the single-context endpoint's only context.
const SINGLE_CONTEXT: &str = "";

impl Conversation {
    pub fn new(
        mode: Mode,
        expected_key: String,
        header_key: Option<String>,
        inactivity: Duration,
        now: Instant,
    ) -> Self {
        Self {
            mode,
            expected_key,
            header_key,
            started: false,
            inactivity,
            last_message: now,
            contexts: HashMap::new(),
            next_epoch: 0,
            finished: false,
        }
    }

    /// Whether the conversation has ended (a Fail or Close was produced).
    pub fn finished(&self) -> bool {
        self.finished
    }

    fn fail(&mut self, error: &'static str, message: impl Into<String>) -> Vec<Action> {
        self.finished = true;
        vec![Action::Fail {
            error,
            message: message.into(),
        }]
    }

    /// The earliest instant at which [`Conversation::expire`] has something to do.
    pub fn next_deadline(&self) -> Instant {
        let socket = self.last_message + self.inactivity;
        self.contexts
            .values()
            .map(|c| c.last_activity + self.inactivity)
            .fold(socket, Instant::min)
    }

    /// Applies inactivity: idle contexts (multi) are closed; an idle socket fails with
    /// `input_timeout_exceeded`. UNCONFIRMED: the exact error code of an idle close; the
    /// fake uses the error-frame shape the service uses for every other socket error.
    pub fn expire(&mut self, now: Instant) -> Vec<Action> {
        if self.finished {
            return Vec::new();
        }
        if now >= self.last_message + self.inactivity {
            let secs = self.inactivity.as_secs_f64();
            return self.fail(
                "input_timeout_exceeded",
                format!("Have not received new text for {secs} seconds"),
            );
        }
        let mut out = Vec::new();
        if self.mode == Mode::Multi {
            let idle: Vec<String> = self
                .contexts
                .iter()
                .filter(|(_, c)| now >= c.last_activity + self.inactivity)
                .map(|(id, _)| id.clone())
                .collect();
            for id in idle {
                if let Some(c) = self.contexts.remove(&id) {
                    out.push(Action::ContextClosed {
                        context: id,
                        epoch: c.epoch,
                    });
                }
            }
        }
        out
    }

    /// Handles one client text frame.
    pub fn on_text(&mut self, text: &str, now: Instant) -> Vec<Action> {
        if self.finished {
            return Vec::new();
        }
        self.last_message = now;
        let Ok(Value::Object(msg)) = serde_json::from_str::<Value>(text) else {
            return self.fail("invalid_message", "Message is not a JSON object");
        };
        let allowed = match self.mode {
            Mode::Single => SINGLE_FIELDS,
            Mode::Multi => MULTI_FIELDS,
        };
        // Unknown fields are refused: the classic bug is the key spelled for the other
        // endpoint (`xi_api_key` vs `xi-api-key`), which the service would just not see.
        if let Some(unknown) = msg.keys().find(|k| !allowed.contains(&k.as_str())) {
            let unknown = unknown.clone();
            return self.fail("invalid_message", format!("Unknown field: {unknown}"));
        }
        let first = !self.started;
        if first {
            self.started = true;
            let key_field = match self.mode {
                Mode::Single => "xi-api-key",
                Mode::Multi => "xi_api_key",
            };
            let key = msg
                .get(key_field)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or_else(|| self.header_key.clone());
            if key.as_deref() != Some(self.expected_key.as_str()) {
                return self.fail("invalid_api_key", "Invalid API key");
            }
            if msg.get("text").and_then(Value::as_str) != Some(" ") {
                return self.fail(
                    "invalid_message",
                    "The first message must have text equal to a single space",
                );
            }
        } else if msg.contains_key("xi-api-key") || msg.contains_key("xi_api_key") {
            return self.fail(
                "invalid_message",
                "The API key is accepted only in the first message",
            );
        }
        match self.mode {
            Mode::Single => self.on_single(&msg, first, now),
            Mode::Multi => self.on_multi(&msg, first, now),
        }
    }

    fn on_single(&mut self, msg: &Map<String, Value>, first: bool, now: Instant) -> Vec<Action> {
        let Some(text) = msg.get("text").and_then(Value::as_str) else {
            return self.fail("invalid_message", "Field text is required");
        };
        if first {
            return match self.open_context(SINGLE_CONTEXT, msg, now) {
                Ok(()) => Vec::new(),
                Err((e, m)) => self.fail(e, m),
            };
        }
        if let Some(field) = INIT_ONLY.iter().find(|f| msg.contains_key(**f)) {
            return self.fail(
                "invalid_message",
                format!("{field} is allowed only in the first message"),
            );
        }
        let flush = msg.get("flush").and_then(Value::as_bool).unwrap_or(false);
        if text.is_empty() {
            // End of sequence: flush, isFinal, close.
            let mut out = self.generate(SINGLE_CONTEXT, true);
            out.push(Action::Send(json!({"isFinal": true})));
            out.push(Action::Close);
            self.finished = true;
            return out;
        }
        self.add_text(SINGLE_CONTEXT, text, flush, now)
    }

    fn on_multi(&mut self, msg: &Map<String, Value>, first: bool, now: Instant) -> Vec<Action> {
        if msg.get("close_socket").and_then(Value::as_bool) == Some(true) {
            // Contexts already generating finish (their audio is queued first), then close.
            self.finished = true;
            return vec![Action::Close];
        }
        // The schema makes context_id optional (a default context); the fake requires it
        // because our client must always address the turn it means.
        let Some(id) = msg
            .get("context_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            return self.fail("invalid_message", "context_id is required");
        };
        if msg.get("close_context").and_then(Value::as_bool) == Some(true) {
            return match self.contexts.remove(&id) {
                Some(c) => vec![Action::ContextClosed {
                    context: id,
                    epoch: c.epoch,
                }],
                // Closing an unknown/already closed context is harmless.
                None => Vec::new(),
            };
        }
        let text = msg.get("text").and_then(Value::as_str);
        let is_new = !self.contexts.contains_key(&id);
        if is_new {
            if self.contexts.len() >= MAX_CONTEXTS {
                return self.fail(
                    "max_active_conversations",
                    format!("Maximum of {MAX_CONTEXTS} simultaneous contexts exceeded"),
                );
            }
            if let Err((e, m)) = self.open_context(&id, msg, now) {
                return self.fail(e, m);
            }
        } else if let Some(field) = INIT_ONLY.iter().find(|f| msg.contains_key(**f)) {
            return self.fail(
                "invalid_message",
                format!("{field} is allowed only in a context's first message"),
            );
        }
        if let Some(c) = self.contexts.get_mut(&id) {
            c.last_activity = now;
        }
        let flush = msg.get("flush").and_then(Value::as_bool).unwrap_or(false);
        let text = match text {
            Some(t) => t,
            None if flush => "",
            None => return self.fail("invalid_message", "Field text is required"),
        };
        if first || (is_new && text == " ") {
            return Vec::new();
        }
        self.add_text(&id, text, flush, now)
    }

    fn open_context(
        &mut self,
        id: &str,
        msg: &Map<String, Value>,
        now: Instant,
    ) -> Result<(), (&'static str, String)> {
        if let Some(vs) = msg.get("voice_settings") {
            validate_voice_settings(vs).map_err(|m| ("invalid_voice_settings", m))?;
        }
        let schedule = match msg.get("generation_config") {
            Some(gc) => {
                validate_generation_config(gc).map_err(|m| ("invalid_generation_config", m))?
            }
            None => None,
        }
        .unwrap_or_else(|| DEFAULT_SCHEDULE.to_vec());
        self.next_epoch += 1;
        self.contexts.insert(
            id.to_owned(),
            Context {
                buffer: String::new(),
                schedule,
                generations: 0,
                last_activity: now,
                epoch: self.next_epoch,
            },
        );
        Ok(())
    }

    fn add_text(&mut self, id: &str, text: &str, flush: bool, now: Instant) -> Vec<Action> {
        let Some(c) = self.contexts.get_mut(id) else {
            return Vec::new();
        };
        c.last_activity = now;
        // A lone space after the first message is a keep-alive, not text.
        if text != " " {
            c.buffer.push_str(text);
        }
        if flush {
            let epoch = c.epoch;
            let mut out = self.generate(id, true);
            if self.mode == Mode::Multi {
                // UNCONFIRMED: that isFinal follows every flush of a context; the fake sends
                // it so a client can tell a turn's audio is complete. It travels like audio:
                // a context closed before it goes out never gets it.
                out.push(Action::ContextMessage {
                    context: id.to_owned(),
                    epoch,
                    chars: 0,
                    message: json!({"isFinal": true, "contextId": id}),
                });
            }
            return out;
        }
        self.generate(id, false)
    }

    /// Generates the buffer if `force`, or if it reached the schedule's next threshold.
    fn generate(&mut self, id: &str, force: bool) -> Vec<Action> {
        let Some(c) = self.contexts.get_mut(id) else {
            return Vec::new();
        };
        let threshold = c
            .schedule
            .get(c.generations)
            .or(c.schedule.last())
            .copied()
            .unwrap_or(DEFAULT_SCHEDULE[0]) as usize;
        let len = c.buffer.chars().count();
        if c.buffer.trim().is_empty() || (!force && len < threshold) {
            if force {
                c.buffer.clear();
            }
            return Vec::new();
        }
        c.generations += 1;
        let text = std::mem::take(&mut c.buffer);
        let epoch = c.epoch;
        let mut out = vec![Action::Generated {
            context: id.to_owned(),
            text: text.clone(),
        }];
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(CHARS_PER_MESSAGE) {
            let piece: String = piece.iter().collect();
            let mut message = audio_message(&piece);
            if self.mode == Mode::Multi {
                message["contextId"] = json!(id);
            }
            out.push(Action::ContextMessage {
                context: id.to_owned(),
                epoch,
                chars: piece.chars().count(),
                message,
            });
        }
        out
    }
}

/// One audio message: base64 μ-law plus alignment relative to the start of this chunk.
fn audio_message(text: &str) -> Value {
    let bytes = audio::encode_text(text);
    let chars: Vec<String> = text.chars().map(String::from).collect();
    let ms = audio::MS_PER_CHAR;
    let starts: Vec<u32> = (0..chars.len() as u32).map(|i| i * ms).collect();
    let durations = vec![ms; chars.len()];
    let alignment =
        json!({"chars": chars, "charStartTimesMs": starts, "charDurationsMs": durations});
    json!({
        "audio": base64::engine::general_purpose::STANDARD.encode(bytes),
        "alignment": alignment,
        "normalizedAlignment": alignment,
    })
}

fn validate_voice_settings(vs: &Value) -> Result<(), String> {
    let Value::Object(map) = vs else {
        return Err("voice_settings must be an object".to_owned());
    };
    for (key, value) in map {
        let range = match key.as_str() {
            "stability" | "similarity_boost" | "style" => 0.0..=1.0,
            "speed" => 0.7..=1.2,
            "use_speaker_boost" => {
                if value.is_boolean() {
                    continue;
                }
                return Err("use_speaker_boost must be a boolean".to_owned());
            }
            other => return Err(format!("Unknown voice setting: {other}")),
        };
        match value.as_f64() {
            Some(v) if range.contains(&v) => {}
            _ => {
                return Err(format!(
                    "{key} must be a number in {}..={}, got {value}",
                    range.start(),
                    range.end()
                ))
            }
        }
    }
    Ok(())
}

fn validate_generation_config(gc: &Value) -> Result<Option<Vec<u32>>, String> {
    let Some(schedule) = gc.get("chunk_length_schedule") else {
        return Ok(None);
    };
    let Some(items) = schedule.as_array().filter(|a| !a.is_empty()) else {
        return Err("chunk_length_schedule must be a non-empty array".to_owned());
    };
    items
        .iter()
        .map(|v| match v.as_u64() {
            Some(n) if (50..=500).contains(&n) => Ok(n as u32),
            _ => Err(format!(
                "chunk_length_schedule entries must be in 50..=500, got {v}"
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// What the reader hands the writer.
enum Outbound {
    Json(Value),
    /// A message of one context, sent only while that context is still open.
    Context {
        context: String,
        epoch: u64,
        chars: usize,
        message: Value,
    },
    /// A generation of `context` was triggered at this time: its first audio message
    /// waits [`Config::first_audio_delay`] from then.
    GenerationStarted {
        context: String,
        at: Instant,
    },
    Close(u16, String),
}

/// Currently open context epochs, shared by reader and writer so audio of a context
/// closed after it was queued is never sent.
type OpenEpochs = Arc<Mutex<HashMap<String, u64>>>;

#[allow(clippy::too_many_arguments)] // the connection's whole setup, passed once
async fn run_connection(
    socket: WebSocket,
    state: Arc<ElevenLabsState>,
    mode: Mode,
    query: Vec<(String, String)>,
    header_key: Option<String>,
    index: usize,
    faults: ConnectionFaults,
) {
    let (sink, mut stream) = socket.split();
    let (tx, rx) = mpsc::unbounded_channel();
    let epochs: OpenEpochs = Arc::default();
    let mut drop_timer = faults.drop_timer();
    let mut writer = tokio::spawn(write_loop(
        sink,
        rx,
        faults,
        state.clone(),
        index,
        epochs.clone(),
    ));

    // The reader owns the only sender: when it ends, the writer drains the queue and stops.
    let reader_state = state.clone();
    let reader = async move {
        let state = reader_state;
        let options = match StreamOptions::from_query(&query) {
            Ok(o) => o,
            Err((error, message)) => {
                send_failure(&tx, error, message);
                return;
            }
        };
        let inactivity = state.cfg.timeout_second * options.inactivity_timeout_s as u32;
        let mut conv = Conversation::new(
            mode,
            state.cfg.api_key.clone(),
            header_key,
            inactivity,
            Instant::now(),
        );
        loop {
            let actions = tokio::select! {
                m = stream.next() => match m {
                    Some(Ok(Message::Text(text))) => {
                        let parsed = serde_json::from_str(text.as_str()).unwrap_or_else(|_| Value::String(text.to_string()));
                        state.record(index, |r| r.received.push(parsed));
                        conv.on_text(text.as_str(), Instant::now())
                    }
                    Some(Ok(Message::Binary(_))) => {
                        // The protocol is JSON text only.
                        conv.on_text("binary", Instant::now())
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) = frame.map_or((None, String::new()), |f| (Some(f.code), f.reason.to_string()));
                        state.record(index, |r| r.closed = Some(Closed::ByClient { code, reason }));
                        return;
                    }
                    Some(Err(_)) | None => return,
                },
                () = tokio::time::sleep_until(conv.next_deadline()) => conv.expire(Instant::now()),
            };
            for action in actions {
                apply(action, &tx, &state, index, &epochs);
            }
            if conv.finished() {
                return;
            }
        }
    };
    tokio::pin!(reader);

    let dropped = tokio::select! {
        () = drop_timer.wait() => true,
        end = &mut writer => matches!(end, Ok(WriterEnd::Dropped)),
        () = &mut reader => tokio::select! {
            () = drop_timer.wait() => true,
            end = &mut writer => matches!(end, Ok(WriterEnd::Dropped)),
        },
    };
    writer.abort();
    state.record(index, |r| {
        if dropped {
            r.closed = Some(Closed::Dropped);
        } else if r.closed.is_none() {
            r.closed = Some(Closed::Vanished);
        }
    });
}

fn send_failure(tx: &mpsc::UnboundedSender<Outbound>, error: &str, message: String) {
    tracing::info!(%error, %message, "elevenlabs fake: failing connection");
    let _ = tx.send(Outbound::Json(
        json!({"message": message, "error": error, "code": POLICY_CLOSE}),
    ));
    let _ = tx.send(Outbound::Close(POLICY_CLOSE, close_reason(error)));
}

/// Close reasons are limited to 123 bytes by RFC 6455.
fn close_reason(text: &str) -> String {
    let mut end = text.len().min(123);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

fn apply(
    action: Action,
    tx: &mpsc::UnboundedSender<Outbound>,
    state: &ElevenLabsState,
    index: usize,
    epochs: &OpenEpochs,
) {
    match action {
        Action::Send(v) => {
            let _ = tx.send(Outbound::Json(v));
        }
        Action::ContextMessage {
            context,
            epoch,
            chars,
            message,
        } => {
            epochs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(context.clone(), epoch);
            let _ = tx.send(Outbound::Context {
                context,
                epoch,
                chars,
                message,
            });
        }
        Action::Generated { context, text } => {
            let _ = tx.send(Outbound::GenerationStarted {
                context: context.clone(),
                at: Instant::now(),
            });
            state.log().generations.push(Generation {
                connection: index,
                context,
                text,
            });
        }
        Action::ContextClosed { context, epoch } => {
            let mut open = epochs.lock().unwrap_or_else(PoisonError::into_inner);
            if open.get(&context) == Some(&epoch) {
                open.remove(&context);
            }
            drop(open);
            state.record(index, |r| r.contexts_closed.push(context));
        }
        Action::Fail { error, message } => send_failure(tx, error, message),
        Action::Close => {
            let _ = tx.send(Outbound::Close(1000, String::new()));
        }
    }
}

enum WriterEnd {
    Closed,
    Dropped,
    Gone,
}

async fn write_loop(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    mut faults: ConnectionFaults,
    state: Arc<ElevenLabsState>,
    index: usize,
    epochs: OpenEpochs,
) -> WriterEnd {
    let interval = state.cfg.audio_interval;
    let first_audio_delay = state.cfg.first_audio_delay;
    // Contexts whose next audio message is a generation's first, and when it is due.
    let mut first_audio_due: HashMap<String, Instant> = HashMap::new();
    let is_open = |context: &str, epoch: u64| {
        epochs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(context)
            == Some(&epoch)
    };
    while let Some(out) = rx.recv().await {
        let (message, context, chars) = match out {
            Outbound::Json(v) => (v, None, 0),
            Outbound::Context {
                context,
                epoch,
                chars,
                message,
            } => (message, Some((context, epoch)), chars),
            Outbound::GenerationStarted { context, at } => {
                if !first_audio_delay.is_zero() {
                    first_audio_due.insert(context, at + first_audio_delay);
                }
                continue;
            }
            Outbound::Close(code, reason) => {
                let frame = CloseFrame {
                    code,
                    reason: reason.clone().into(),
                };
                let _ = sink.send(Message::Close(Some(frame))).await;
                state.record(index, |r| {
                    if r.closed.is_none() {
                        r.closed = Some(Closed::ByServer { code, reason });
                    }
                });
                return WriterEnd::Closed;
            }
        };
        let live = || context.as_ref().is_none_or(|(c, e)| is_open(c, *e));
        if !live() {
            continue;
        }
        let first_due = match &context {
            Some((c, _)) if chars > 0 => first_audio_due.remove(c),
            _ => None,
        };
        if let Some(due) = first_due {
            tokio::time::sleep_until(due).await;
        } else if chars > 0 && !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        if !faults.before_send().await {
            return WriterEnd::Dropped;
        }
        // Checked again after every wait: close_context may have arrived meanwhile, and
        // nothing of a closed context may go out after it.
        if !live() {
            continue;
        }
        if sink
            .send(Message::Text(message.to_string().into()))
            .await
            .is_err()
        {
            return WriterEnd::Gone;
        }
        state.log().characters_sent += chars as u64;
        state.record(index, |r| r.sent.push(message));
    }
    WriterEnd::Gone
}

/// Query parameters of `POST …/stream` (PROTOCOLS.md §5).
const HTTP_QUERY: &[&str] = &[
    "output_format",
    "optimize_streaming_latency",
    "enable_logging",
];
/// Body fields of `POST …/stream`: PROTOCOLS.md's list plus the pronunciation
/// dictionaries the sockets take too. The SDK knows a few more (request-stitching ids,
/// `use_pvc_as_ivc`, …); add them here when our client starts sending them.
const HTTP_FIELDS: &[&str] = &[
    "text",
    "model_id",
    "voice_settings",
    "language_code",
    "seed",
    "previous_text",
    "next_text",
    "apply_text_normalization",
    "pronunciation_dictionary_locators",
];
/// What the service streams when the request has no `output_format`.
const HTTP_DEFAULT_OUTPUT_FORMAT: &str = "mp3_44100_128";
/// The only format the fake synthesizes.
const HTTP_OUTPUT_FORMAT: &str = "ulaw_8000";
/// Content type of the 200 body. `audio/basic` is the registered type of 8 kHz mono μ-law
/// (RFC 2046). UNCONFIRMED: the header the service sends for `ulaw_8000`; clients should
/// not rely on it, they asked for the format in the query.
const HTTP_AUDIO_CONTENT_TYPE: &str = "audio/basic";

/// An HTTP error answer: status and JSON body.
type HttpError = (StatusCode, Value);

/// The REST API's non-validation error: `{"detail":{"status","message"}}`.
fn detail_error(status: StatusCode, code: &str, message: &str) -> HttpError {
    (
        status,
        json!({"detail": {"status": code, "message": message}}),
    )
}

/// One FastAPI validation problem, pydantic v2 style (`type` names as pydantic's).
/// UNCONFIRMED: the service's exact `msg` wording; clients should key on status and `loc`.
fn issue(loc: Value, msg: impl Into<String>, kind: &str) -> Value {
    json!({"loc": loc, "msg": msg.into(), "type": kind})
}

/// Validates a `POST …/stream` request: key, query, then body. What it accepts is what
/// gets recorded and spoken. FastAPI reports every validation problem at once, so the 422
/// `detail` lists all of them.
fn validate_http(
    expected_key: &str,
    voice_id: &str,
    headers: &HeaderMap,
    raw_query: Option<&str>,
    body: &[u8],
) -> Result<HttpSynthesis, HttpError> {
    // UNCONFIRMED: which wins when both the key and the request are bad; the fake checks
    // the key first, as an auth dependency runs before FastAPI raises validation errors.
    match headers.get("xi-api-key").map(|v| v.to_str()) {
        None => {
            return Err(detail_error(
                StatusCode::UNAUTHORIZED,
                "needs_authorization",
                "Neither authorization header nor xi-api-key received, please provide one.",
            ))
        }
        Some(Ok(key)) if key == expected_key => {}
        Some(_) => {
            return Err(detail_error(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "Invalid API key",
            ))
        }
    }
    let mut issues = Vec::new();
    let output_format = validate_http_query(raw_query, &mut issues);
    let body = validate_http_body(headers, body, &mut issues);
    match body {
        Some((text, model_id)) if issues.is_empty() => Ok(HttpSynthesis {
            voice_id: voice_id.to_owned(),
            text,
            output_format,
            model_id,
        }),
        _ => Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "detail": issues }),
        )),
    }
}

/// Checks the query; returns the output format asked for (valid only if no issue).
fn validate_http_query(raw_query: Option<&str>, issues: &mut Vec<Value>) -> String {
    let query: Vec<(String, String)> = match serde_urlencoded::from_str(raw_query.unwrap_or("")) {
        Ok(q) => q,
        Err(e) => {
            issues.push(issue(
                json!(["query"]),
                format!("Malformed query string: {e}"),
                "value_error",
            ));
            Vec::new()
        }
    };
    let get = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    // FastAPI ignores unknown query parameters; the fake refuses them, as on the sockets,
    // so a misspelled option (which the service would silently ignore) is caught.
    for (key, _) in &query {
        if !HTTP_QUERY.contains(&key.as_str()) {
            issues.push(issue(
                json!(["query", key]),
                format!("Unknown query parameter: {key}"),
                "extra_forbidden",
            ));
        }
    }
    let output_format = get("output_format").unwrap_or(HTTP_DEFAULT_OUTPUT_FORMAT);
    // The service would stream any known format (mp3_44100_128 when none is given); the
    // fake only synthesizes μ-law 8 kHz, the one format a phone line can play, so anything
    // else is refused loudly rather than answered with audio in the wrong format.
    if output_format != HTTP_OUTPUT_FORMAT {
        let msg = if KNOWN_OUTPUT_FORMATS.contains(&output_format) {
            let asked = if get("output_format").is_some() {
                output_format.to_owned()
            } else {
                format!("the default {output_format}")
            };
            format!("fake ElevenLabs only synthesizes {HTTP_OUTPUT_FORMAT}, not {asked}")
        } else {
            format!(
                "Invalid output format: {output_format} (and fake ElevenLabs only synthesizes {HTTP_OUTPUT_FORMAT})"
            )
        };
        issues.push(issue(json!(["query", "output_format"]), msg, "enum"));
    }
    // Deprecated upstream but still accepted: an integer 0..=4.
    if let Some(v) = get("optimize_streaming_latency") {
        if !matches!(v.parse::<u8>(), Ok(0..=4)) {
            issues.push(issue(
                json!(["query", "optimize_streaming_latency"]),
                format!("Input should be an integer in 0..=4, got {v}"),
                "int_parsing",
            ));
        }
    }
    if let Some(v) = get("enable_logging") {
        if !matches!(v, "true" | "false" | "1" | "0") {
            issues.push(issue(
                json!(["query", "enable_logging"]),
                format!("Input should be a valid boolean, got {v}"),
                "bool_parsing",
            ));
        }
    }
    output_format.to_owned()
}

/// Checks the JSON body; returns `(text, model_id)` if the body itself is usable.
fn validate_http_body(
    headers: &HeaderMap,
    body: &[u8],
    issues: &mut Vec<Value>,
) -> Option<(String, Option<String>)> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    // UNCONFIRMED: FastAPI parses a body without Content-Type as JSON anyway; the fake
    // requires the header the docs show, so a client that forgets it is caught.
    if !is_json {
        issues.push(issue(
            json!(["body"]),
            "Content-Type must be application/json",
            "model_attributes_type",
        ));
        return None;
    }
    let map = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => {
            issues.push(issue(
                json!(["body"]),
                "Input should be a valid dictionary or object to extract fields from",
                "model_attributes_type",
            ));
            return None;
        }
        Err(e) => {
            issues.push(issue(
                json!(["body", e.column()]),
                format!("JSON decode error: {e}"),
                "json_invalid",
            ));
            return None;
        }
    };
    let before = issues.len();
    let mut at = |field: &str, msg: String, kind: &str| {
        issues.push(issue(json!(["body", field]), msg, kind));
    };
    // The service's model ignores unknown fields; the fake refuses them, as on the sockets,
    // so a misspelled field (silently dropped upstream) is caught.
    for key in map.keys() {
        if !HTTP_FIELDS.contains(&key.as_str()) {
            at(key, format!("Unknown field: {key}"), "extra_forbidden");
        }
    }
    // UNCONFIRMED: the service's answer to an empty text (it may be a 400); the fake
    // refuses it with a 422 as a too-short string.
    let text = match map.get("text") {
        None => {
            at("text", "Field required".to_owned(), "missing");
            None
        }
        Some(Value::String(t)) if t.is_empty() => {
            at(
                "text",
                "String should have at least 1 character".to_owned(),
                "string_too_short",
            );
            None
        }
        Some(Value::String(t)) => Some(t.clone()),
        Some(_) => {
            at(
                "text",
                "Input should be a valid string".to_owned(),
                "string_type",
            );
            None
        }
    };
    for field in ["model_id", "language_code", "previous_text", "next_text"] {
        if map
            .get(field)
            .is_some_and(|v| !v.is_string() && !v.is_null())
        {
            at(
                field,
                "Input should be a valid string".to_owned(),
                "string_type",
            );
        }
    }
    if let Some(vs) = map.get("voice_settings").filter(|v| !v.is_null()) {
        if let Err(msg) = validate_voice_settings(vs) {
            at("voice_settings", msg, "value_error");
        }
    }
    if let Some(seed) = map.get("seed").filter(|v| !v.is_null()) {
        if seed.as_u64().is_none_or(|s| s > u64::from(u32::MAX)) {
            at(
                "seed",
                format!("Input should be an integer in 0..=4294967295, got {seed}"),
                "int_type",
            );
        }
    }
    if let Some(norm) = map.get("apply_text_normalization") {
        if !matches!(norm.as_str(), Some("auto" | "on" | "off")) {
            at(
                "apply_text_normalization",
                format!("Input should be 'auto', 'on' or 'off', got {norm}"),
                "enum",
            );
        }
    }
    if map
        .get("pronunciation_dictionary_locators")
        .is_some_and(|v| !v.is_array() && !v.is_null())
    {
        at(
            "pronunciation_dictionary_locators",
            "Input should be a valid list".to_owned(),
            "list_type",
        );
    }
    if issues.len() > before {
        return None;
    }
    let model_id = map
        .get("model_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    text.map(|t| (t, model_id))
}

/// `POST …/stream`: validates, records, then streams the text's audio.
///
/// Faults apply as to any plain HTTP response (faults.rs counts only WebSockets and SSE as
/// streams): `latency_ms` and `first_byte_delay_ms` delay the headers, `http_status` and
/// `refuse_connections` replace the answer; `drop_after_*` do not cut this body.
async fn http_stream(
    State(state): State<Arc<ElevenLabsState>>,
    Path(voice_id): Path<String>,
    headers: HeaderMap,
    RawQuery(raw_query): RawQuery,
    body: Bytes,
) -> Response {
    let synthesis = match validate_http(
        &state.cfg.api_key,
        &voice_id,
        &headers,
        raw_query.as_deref(),
        &body,
    ) {
        Ok(s) => s,
        Err((status, body)) => {
            tracing::info!(%status, %body, "elevenlabs fake: refusing HTTP stream request");
            return (status, Json(body)).into_response();
        }
    };
    let text = synthesis.text.clone();
    state.log().http_syntheses.push(synthesis);
    (
        [(header::CONTENT_TYPE, HTTP_AUDIO_CONTENT_TYPE)],
        audio_body(&text, state),
    )
        .into_response()
}

/// The 200 body, sent chunked (no length): the text's audio, one chunk per
/// [`CHARS_PER_MESSAGE`] characters (480 ms, as the sockets' audio messages). The first
/// chunk waits [`Config::http_first_byte`] (time to first audio), the next ones
/// [`Config::audio_interval`] each (generation speed).
fn audio_body(text: &str, state: Arc<ElevenLabsState>) -> Body {
    let chars: Vec<char> = text.chars().collect();
    let pieces: Vec<String> = chars
        .chunks(CHARS_PER_MESSAGE)
        .map(|piece| piece.iter().collect())
        .collect();
    let start = (pieces.into_iter(), true, state);
    let chunks = futures::stream::unfold(start, |(mut pieces, first, state)| async move {
        let piece = pieces.next()?;
        let wait = if first {
            state.cfg.http_first_byte
        } else {
            state.cfg.audio_interval
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        // Counted when handed to the server, like a socket message once sent.
        state.log().characters_sent += piece.chars().count() as u64;
        let chunk = Bytes::from(audio::encode_text(&piece));
        Some((
            Ok::<_, std::convert::Infallible>(chunk),
            (pieces, false, state),
        ))
    });
    Body::from_stream(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "k";

    fn conv(mode: Mode) -> (Conversation, Instant) {
        let now = Instant::now();
        (
            Conversation::new(mode, KEY.into(), None, Duration::from_secs(20), now),
            now,
        )
    }

    fn fail_code(actions: &[Action]) -> Option<&'static str> {
        actions.iter().find_map(|a| match a {
            Action::Fail { error, .. } => Some(*error),
            _ => None,
        })
    }

    fn audio_text(actions: &[Action]) -> String {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::ContextMessage { message, .. } if message["audio"].is_string() => {
                    let b = base64::engine::general_purpose::STANDARD
                        .decode(message["audio"].as_str().unwrap())
                        .unwrap();
                    Some(audio::decode_text(&b))
                }
                _ => None,
            })
            .collect()
    }

    /// The first message must carry the key (right spelling per endpoint) and text " ".
    #[test]
    fn first_message_rules() {
        let (mut c, now) = conv(Mode::Single);
        assert_eq!(
            fail_code(&c.on_text(r#"{"text":" "}"#, now)),
            Some("invalid_api_key")
        );
        let (mut c, now) = conv(Mode::Single);
        assert_eq!(
            fail_code(&c.on_text(r#"{"text":" ","xi_api_key":"k"}"#, now)),
            Some("invalid_message")
        );
        let (mut c, now) = conv(Mode::Single);
        assert_eq!(
            fail_code(&c.on_text(r#"{"text":"Hello","xi-api-key":"k"}"#, now)),
            Some("invalid_message")
        );
        let (mut c, now) = conv(Mode::Single);
        assert!(c
            .on_text(r#"{"text":" ","xi-api-key":"k"}"#, now)
            .is_empty());
        let (mut c, now) = conv(Mode::Multi);
        assert!(c
            .on_text(r#"{"text":" ","context_id":"a","xi_api_key":"k"}"#, now)
            .is_empty());
        // A key in the header is enough.
        let now = Instant::now();
        let mut c = Conversation::new(
            Mode::Single,
            KEY.into(),
            Some(KEY.into()),
            Duration::from_secs(20),
            now,
        );
        assert!(c.on_text(r#"{"text":" "}"#, now).is_empty());
    }

    /// voice_settings and chunk_length_schedule ranges are enforced, and only at first.
    #[test]
    fn settings_validation() {
        for bad in [
            r#"{"stability":1.5}"#,
            r#"{"similarity_boost":-0.1}"#,
            r#"{"style":2}"#,
            r#"{"speed":0.5}"#,
            r#"{"speed":1.3}"#,
            r#"{"use_speaker_boost":"yes"}"#,
            r#"{"pitch":1}"#,
        ] {
            let (mut c, now) = conv(Mode::Single);
            let msg = format!(r#"{{"text":" ","xi-api-key":"k","voice_settings":{bad}}}"#);
            assert_eq!(
                fail_code(&c.on_text(&msg, now)),
                Some("invalid_voice_settings"),
                "{bad}"
            );
        }
        for bad in ["[]", "[49]", "[120,501]", "[\"x\"]"] {
            let (mut c, now) = conv(Mode::Single);
            let msg = format!(
                r#"{{"text":" ","xi-api-key":"k","generation_config":{{"chunk_length_schedule":{bad}}}}}"#
            );
            assert_eq!(
                fail_code(&c.on_text(&msg, now)),
                Some("invalid_generation_config"),
                "{bad}"
            );
        }
        let (mut c, now) = conv(Mode::Single);
        let ok = r#"{"text":" ","xi-api-key":"k","voice_settings":{"stability":0.5,"similarity_boost":0.75,"style":0,"use_speaker_boost":true,"speed":1.0},"generation_config":{"chunk_length_schedule":[50]}}"#;
        assert!(c.on_text(ok, now).is_empty());
        assert_eq!(
            fail_code(&c.on_text(r#"{"text":"x ","voice_settings":{"speed":1.0}}"#, now)),
            Some("invalid_message")
        );
    }

    /// Text buffers until flush; the audio carries exactly the text; end-of-sequence closes.
    #[test]
    fn single_flush_and_end_of_sequence() {
        let (mut c, now) = conv(Mode::Single);
        c.on_text(r#"{"text":" ","xi-api-key":"k"}"#, now);
        assert!(c.on_text(r#"{"text":"Hello there, "}"#, now).is_empty());
        let out = c.on_text(r#"{"text":"how can I help? ","flush":true}"#, now);
        assert_eq!(audio_text(&out), "Hello there, how can I help? ");
        // ≤ 12 characters (480 ms) per audio message.
        let audio_msgs = out
            .iter()
            .filter(|a| matches!(a, Action::ContextMessage { .. }))
            .count();
        assert_eq!(audio_msgs, 3);
        assert!(
            !out.iter().any(|a| matches!(a, Action::Send(_))),
            "no isFinal on a single flush"
        );
        c.on_text(r#"{"text":"Bye. "}"#, now);
        let end = c.on_text(r#"{"text":""}"#, now);
        assert_eq!(audio_text(&end), "Bye. ");
        assert!(end.contains(&Action::Send(json!({"isFinal": true}))));
        assert_eq!(end.last(), Some(&Action::Close));
        assert!(c.finished());
    }

    /// Alignment is per chunk, camelCase, 40 ms per character starting at 0.
    #[test]
    fn alignment_shape() {
        let m = audio_message("Hi");
        assert_eq!(m["alignment"]["chars"], json!(["H", "i"]));
        assert_eq!(m["alignment"]["charStartTimesMs"], json!([0, 40]));
        assert_eq!(m["alignment"]["charDurationsMs"], json!([40, 40]));
        assert_eq!(m["normalizedAlignment"], m["alignment"]);
    }

    /// Reaching the chunk schedule generates without a flush; thresholds advance per generation.
    #[test]
    fn chunk_schedule_triggers_generation() {
        let (mut c, now) = conv(Mode::Single);
        c.on_text(r#"{"text":" ","xi-api-key":"k","generation_config":{"chunk_length_schedule":[50,60]}}"#, now);
        let forty = "a".repeat(40);
        assert!(c
            .on_text(&json!({"text": forty}).to_string(), now)
            .is_empty());
        let out = c.on_text(&json!({"text": "b".repeat(10)}).to_string(), now);
        assert_eq!(audio_text(&out).len(), 50);
        // Next threshold is 60.
        assert!(c
            .on_text(&json!({"text": "c".repeat(59)}).to_string(), now)
            .is_empty());
        assert_eq!(
            audio_text(&c.on_text(&json!({"text": "d"}).to_string(), now)).len(),
            60
        );
    }

    /// Multi: per-context flush with isFinal+contextId, close_context, reuse, 5-context cap.
    #[test]
    fn multi_contexts() {
        let (mut c, now) = conv(Mode::Multi);
        c.on_text(r#"{"text":" ","context_id":"t1","xi_api_key":"k"}"#, now);
        c.on_text(r#"{"text":"Sure, one moment. ","context_id":"t1"}"#, now);
        let out = c.on_text(r#"{"context_id":"t1","text":"","flush":true}"#, now);
        assert_eq!(audio_text(&out), "Sure, one moment. ");
        let Some(Action::ContextMessage { message, .. }) = out
            .iter()
            .find(|a| matches!(a, Action::ContextMessage { .. }))
        else {
            panic!("no audio")
        };
        assert_eq!(message["contextId"], "t1");
        assert_eq!(
            out.last(),
            Some(&Action::ContextMessage {
                context: "t1".into(),
                epoch: 1,
                chars: 0,
                message: json!({"isFinal": true, "contextId": "t1"})
            })
        );
        // close_context drops pending text.
        c.on_text(r#"{"text":"never said ","context_id":"t1"}"#, now);
        let closed = c.on_text(r#"{"context_id":"t1","close_context":true}"#, now);
        assert!(matches!(&closed[..], [Action::ContextClosed { context, .. }] if context == "t1"));
        // Reused id is a fresh context: the dropped text does not come back.
        let again = c.on_text(r#"{"text":"fresh ","context_id":"t1","flush":true}"#, now);
        assert_eq!(audio_text(&again), "fresh ");
        for id in ["t2", "t3", "t4", "t5"] {
            assert!(fail_code(
                &c.on_text(&json!({"text": " ", "context_id": id}).to_string(), now)
            )
            .is_none());
        }
        let over = c.on_text(r#"{"text":" ","context_id":"t6"}"#, now);
        assert_eq!(fail_code(&over), Some("max_active_conversations"));
    }

    /// Multi requires context_id; close_socket closes after queued work.
    #[test]
    fn multi_context_id_and_close_socket() {
        let (mut c, now) = conv(Mode::Multi);
        assert_eq!(
            fail_code(&c.on_text(r#"{"text":" ","xi_api_key":"k"}"#, now)),
            Some("invalid_message")
        );
        let (mut c, now) = conv(Mode::Multi);
        c.on_text(r#"{"text":" ","context_id":"a","xi_api_key":"k"}"#, now);
        assert_eq!(
            c.on_text(r#"{"close_socket":true}"#, now),
            vec![Action::Close]
        );
    }

    /// Inactivity closes idle contexts (multi) and then the socket with an error frame.
    #[test]
    fn inactivity() {
        let start = Instant::now();
        let t = Duration::from_secs(20);
        let mut c = Conversation::new(Mode::Multi, KEY.into(), None, t, start);
        c.on_text(r#"{"text":" ","context_id":"a","xi_api_key":"k"}"#, start);
        let later = start + Duration::from_secs(15);
        c.on_text(r#"{"text":" ","context_id":"b"}"#, later);
        assert_eq!(c.next_deadline(), start + t);
        let out = c.expire(start + t);
        assert!(matches!(&out[..], [Action::ContextClosed { context, .. }] if context == "a"));
        assert_eq!(c.next_deadline(), later + t);
        assert_eq!(
            fail_code(&c.expire(later + t)),
            Some("input_timeout_exceeded")
        );
    }

    /// The query must ask for ulaw_8000; inactivity_timeout is bounded to 180.
    #[test]
    fn query_rules() {
        let q = |s: &str| {
            StreamOptions::from_query(
                &serde_urlencoded::from_str::<Vec<(String, String)>>(s).unwrap(),
            )
        };
        let ok =
            q("model_id=eleven_flash_v2_5&output_format=ulaw_8000&inactivity_timeout=180").unwrap();
        assert_eq!(ok.inactivity_timeout_s, 180);
        assert_eq!(
            q("output_format=ulaw_8000").unwrap().inactivity_timeout_s,
            20
        );
        assert_eq!(
            q("output_format=pcm_16000").unwrap_err().0,
            "invalid_output_format"
        );
        assert_eq!(
            q("output_format=wav").unwrap_err().0,
            "invalid_output_format"
        );
        assert_eq!(q("model_id=x").unwrap_err().0, "invalid_output_format");
        assert_eq!(
            q("output_format=ulaw_8000&inactivity_timeout=181")
                .unwrap_err()
                .0,
            "invalid_request"
        );
        assert_eq!(
            q("output_format=ulaw_8000&voice=x").unwrap_err().0,
            "invalid_request"
        );
    }

    const ULAW: &str = "output_format=ulaw_8000";

    /// A `POST …/stream` request to `fake`, with `xi-api-key` if given.
    fn stream_request(fake: &Handle, key: Option<&str>, query: &str) -> reqwest::RequestBuilder {
        let url = format!(
            "{}/v1/text-to-speech/voice123/stream?{query}",
            fake.base_url()
        );
        let request = reqwest::Client::new().post(url);
        match key {
            Some(key) => request.header("xi-api-key", key),
            None => request,
        }
    }

    /// HTTP fallback: 200 with a chunked μ-law body that decodes to the text; recorded.
    #[tokio::test]
    async fn http_stream_speaks_the_text() {
        let f = spawn(Config::default()).await.unwrap();
        let text = "Hello there, how can I help?";
        let body = json!({
            "text": text,
            "model_id": "eleven_flash_v2_5",
            "voice_settings": {"stability": 0.5, "similarity_boost": 0.75, "style": 0, "use_speaker_boost": true, "speed": 1.0},
            "language_code": "en",
            "seed": 7,
            "previous_text": null,
            "next_text": "Bye.",
            "apply_text_normalization": "auto",
        });
        let query = "output_format=ulaw_8000&optimize_streaming_latency=3&enable_logging=false";
        let r = stream_request(&f, Some(f.api_key()), query)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "audio/basic");
        assert_eq!(r.headers()[header::TRANSFER_ENCODING], "chunked");
        let bytes = r.bytes().await.unwrap();
        assert_eq!(bytes.len(), text.len() * audio::SAMPLES_PER_CHAR);
        assert_eq!(audio::decode_text(&bytes), text);
        assert_eq!(
            f.http_syntheses(),
            vec![HttpSynthesis {
                voice_id: "voice123".into(),
                text: text.into(),
                output_format: "ulaw_8000".into(),
                model_id: Some("eleven_flash_v2_5".into()),
            }]
        );
        assert_eq!(f.characters_synthesized(), text.len() as u64);
        assert!(f.connections().is_empty() && f.generations().is_empty());
        // model_id is optional.
        let r = stream_request(&f, Some(f.api_key()), ULAW)
            .json(&json!({"text": "Hi."}))
            .send()
            .await
            .unwrap();
        assert_eq!(audio::decode_text(&r.bytes().await.unwrap()), "Hi.");
        assert_eq!(f.http_syntheses()[1].model_id, None);
    }

    /// Nothing arrives before `http_first_byte`; then one chunk per 12 characters, paced.
    #[tokio::test]
    async fn http_stream_is_paced_in_chunks() {
        let cfg = Config {
            http_first_byte: Duration::from_millis(150),
            audio_interval: Duration::from_millis(20),
            ..Config::default()
        };
        let f = spawn(cfg).await.unwrap();
        let text = "One two three, four five six."; // 29 characters: 3 chunks
        let started = std::time::Instant::now();
        let r = stream_request(&f, Some(f.api_key()), ULAW)
            .json(&json!({"text": text}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let mut body = r.bytes_stream();
        let mut first_at = None;
        let mut chunks = Vec::new();
        while let Some(chunk) = body.next().await {
            first_at.get_or_insert_with(|| started.elapsed());
            chunks.push(chunk.unwrap());
        }
        let first_at = first_at.unwrap();
        assert!(first_at >= Duration::from_millis(150), "{first_at:?}");
        assert!(
            started.elapsed() >= first_at + Duration::from_millis(40),
            "two paced chunks follow the first"
        );
        assert!(chunks.len() >= 3, "{} chunks", chunks.len());
        assert_eq!(audio::decode_text(&chunks.concat()), text);
    }

    /// A wrong or missing key is a 401 with `detail.status`; nothing is recorded.
    #[tokio::test]
    async fn http_stream_auth() {
        let f = spawn(Config::default()).await.unwrap();
        for (key, status) in [
            (Some("wrong"), "invalid_api_key"),
            (None, "needs_authorization"),
        ] {
            let r = stream_request(&f, key, ULAW)
                .json(&json!({"text": "hi"}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["detail"]["status"], status, "{v}");
            assert!(v["detail"]["message"].is_string(), "{v}");
        }
        assert!(f.http_syntheses().is_empty());
    }

    /// Bad query or body: 422 with FastAPI's `detail` list naming the culprit.
    #[tokio::test]
    async fn http_stream_validation() {
        let f = spawn(Config::default()).await.unwrap();
        let hi = json!({"text": "hi"});
        let cases = [
            ("", hi.clone(), json!(["query", "output_format"])),
            (
                "output_format=pcm_16000",
                hi.clone(),
                json!(["query", "output_format"]),
            ),
            (
                "output_format=wav",
                hi.clone(),
                json!(["query", "output_format"]),
            ),
            // model_id goes in the body here, unlike on the sockets.
            (
                "output_format=ulaw_8000&model_id=x",
                hi.clone(),
                json!(["query", "model_id"]),
            ),
            (
                "output_format=ulaw_8000&optimize_streaming_latency=9",
                hi.clone(),
                json!(["query", "optimize_streaming_latency"]),
            ),
            (ULAW, json!({}), json!(["body", "text"])),
            (ULAW, json!({"text": ""}), json!(["body", "text"])),
            (ULAW, json!({"text": 5}), json!(["body", "text"])),
            (
                ULAW,
                json!({"text": "hi", "voice": "x"}),
                json!(["body", "voice"]),
            ),
            (
                ULAW,
                json!({"text": "hi", "voice_settings": {"speed": 2.0}}),
                json!(["body", "voice_settings"]),
            ),
            (
                ULAW,
                json!({"text": "hi", "seed": -1}),
                json!(["body", "seed"]),
            ),
            (
                ULAW,
                json!({"text": "hi", "apply_text_normalization": "maybe"}),
                json!(["body", "apply_text_normalization"]),
            ),
            (ULAW, json!(["hi"]), json!(["body"])),
        ];
        for (query, body, loc) in cases {
            let r = stream_request(&f, Some(f.api_key()), query)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(
                r.status(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "{query} {body}"
            );
            let v: Value = r.json().await.unwrap();
            let detail = v["detail"].as_array().unwrap();
            let hit = detail.iter().find(|d| d["loc"] == loc);
            let hit = hit.unwrap_or_else(|| panic!("{query} {body}: no {loc} in {v}"));
            assert!(hit["msg"].is_string() && hit["type"].is_string(), "{v}");
        }
        // The fake only speaks μ-law, and says so, including for the mp3 default.
        for query in ["", "output_format=pcm_16000"] {
            let r = stream_request(&f, Some(f.api_key()), query)
                .json(&hi)
                .send()
                .await
                .unwrap();
            let v: Value = r.json().await.unwrap();
            let msg = v["detail"][0]["msg"].as_str().unwrap();
            assert!(msg.contains("only synthesizes ulaw_8000"), "{msg}");
        }
        // Every problem is listed at once.
        let r = stream_request(&f, Some(f.api_key()), "output_format=pcm_16000")
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["detail"].as_array().unwrap().len(), 2, "{v}");
        // Not JSON, or not said to be JSON.
        let r = stream_request(&f, Some(f.api_key()), ULAW)
            .header(header::CONTENT_TYPE, "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["detail"][0]["type"], "json_invalid", "{v}");
        let r = stream_request(&f, Some(f.api_key()), ULAW)
            .body(r#"{"text":"hi"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(f.http_syntheses().is_empty());
        assert_eq!(f.characters_synthesized(), 0);
    }

    /// The route sits behind the fault wrapper like the sockets.
    #[tokio::test]
    async fn http_stream_faults() {
        let f = spawn(Config::default()).await.unwrap();
        f.faults().set(crate::fakes::faults::Faults {
            http_status: Some(503),
            ..Default::default()
        });
        let r = stream_request(&f, Some(f.api_key()), ULAW)
            .json(&json!({"text": "hi"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["detail"]["status"], "fault_injected");
        assert!(f.http_syntheses().is_empty());
    }
}
