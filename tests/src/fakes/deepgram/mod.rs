//! Fake Deepgram live speech-to-text (`/v1/listen` WebSocket, PROTOCOLS.md §4).
//!
//! Owns the handshake checks (auth, query parameters), a pure per-connection
//! [`Session`] that turns μ-law audio into Deepgram messages on *audio* time (bytes / 8000,
//! never the wall clock), and the socket shell that adds the idle timeout and faults.
//! It must not depend on our clients: it follows the provider's documented behaviour, and
//! where the docs are silent it is strict and says so, so client bugs surface here.
//!
//! What gets "recognised": a speech segment (found by an energy VAD over 20 ms frames)
//! is transcribed as the tone-decoded text if the audio is tone-coded
//! ([`crate::audio::encode_text`]), else the next entry of the configured script, else
//! `"unintelligible"` — unless the segment was noise (a cough: loud but spectrally flat,
//! [`crate::audio::spectral_flatness`]), which gets no interim results and an empty final,
//! as Deepgram answers non-speech. `SpeechStarted` still fires for it: VAD hears sound.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::audio::{self, ToneDecoder, SAMPLE_RATE};
use crate::fakes::faults::{ConnectionFaults, ErrorResponder, FaultSwitch};
use crate::fakes::{Server, LOOPBACK_ANY};

/// Path of the live transcription endpoint.
pub const LISTEN_PATH: &str = "/v1/listen";
/// Transcript of a segment that is neither tone-coded nor covered by the script.
pub const UNINTELLIGIBLE: &str = "unintelligible";
/// Close reason when the client sent nothing for the idle window.
pub const IDLE_CLOSE_REASON: &str = "NET-0001";
/// Close code for the idle timeout (PROTOCOLS.md: 1011 `NET-0001`).
pub const IDLE_CLOSE_CODE: u16 = 1011;

/// VAD frame: 20 ms of μ-law, the size Twilio sends.
const FRAME_BYTES: usize = 160;
/// Deepgram's default endpointing when the query does not set one.
const DEFAULT_ENDPOINTING_MS: u64 = 10;
/// With `endpointing=false` Deepgram still finalizes on its own; the fake does it after
/// this much silence (never `speech_final`).
const NO_ENDPOINT_FINALIZE_MS: u64 = 1000;
/// Per-character time of tone-coded speech, in seconds.
const SECONDS_PER_CHAR: f64 = audio::MS_PER_CHAR as f64 / 1000.0;

/// Query parameters the SDK knows (PROTOCOLS.md §4). Anything else is refused: the real
/// service's handling of unknown names is undocumented, and a typo such as `endpoint=`
/// silently ignored would hide a client bug.
const KNOWN_PARAMS: &[&str] = &[
    "callback",
    "callback_method",
    "channels",
    "detect_entities",
    "diarize",
    "diarize_model",
    "dictation",
    "encoding",
    "endpointing",
    "extra",
    "interim_results",
    "keyterm",
    "keywords",
    "language",
    "language_hint",
    "mip_opt_out",
    "model",
    "multichannel",
    "numerals",
    "profanity_filter",
    "punctuate",
    "redact",
    "replace",
    "sample_rate",
    "search",
    "smart_format",
    "tag",
    "utterance_end_ms",
    "vad_events",
    "version",
];

/// Encodings the SDK lists; only `mulaw` can be understood by the fake.
const KNOWN_ENCODINGS: &[&str] = &[
    "linear16", "linear32", "flac", "alaw", "mulaw", "amr-nb", "amr-wb", "opus", "ogg-opus",
    "speex", "g729",
];

/// How the fake is set up.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where to listen; [`LOOPBACK_ANY`] picks a free port.
    pub addr: SocketAddr,
    /// The key expected in `Authorization: Token <key>`.
    pub api_key: String,
    /// Close 1011 `NET-0001` after this long without audio or KeepAlive (10 s for real).
    pub idle_timeout: Duration,
    /// Transcripts for non-tone-coded speech segments, used in order.
    pub script: Vec<String>,
    /// A 20 ms frame at or above this level counts as speech.
    pub vad_threshold_dbfs: f32,
    /// Audio time between two interim results of one segment.
    pub interim_every_ms: u64,
    /// Seed of the fault jitter.
    pub fault_seed: u64,
    /// Called with every audio frame as it arrives (benchmarks timestamp frames here).
    pub audio_tap: Option<AudioTap>,
    /// Endpointing used whatever the query asks (`None`: the query's, as the service
    /// does). Not a provider behaviour: a knob for the latency benchmark, whose client's
    /// `endpointing` is fixed by the Worker (300 ms) and which wants to try others.
    pub endpointing_override_ms: Option<u64>,
}

/// The callback type of an [`AudioTap`].
pub type AudioTapFn = dyn Fn(&[u8]) + Send + Sync;

/// A callback that sees each binary audio frame the fake receives.
#[derive(Clone)]
pub struct AudioTap(pub Arc<AudioTapFn>);

impl std::fmt::Debug for AudioTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AudioTap")
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            addr: LOOPBACK_ANY,
            api_key: "dg-test-key".to_owned(),
            idle_timeout: Duration::from_secs(10),
            script: Vec::new(),
            vad_threshold_dbfs: -40.0,
            interim_every_ms: 400,
            fault_seed: crate::fakes::faults::DEFAULT_SEED,
            audio_tap: None,
            endpointing_override_ms: None,
        }
    }
}

/// Who ended a connection, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Closed {
    /// The fake sent a close frame.
    ByServer { code: u16, reason: String },
    /// The client sent a close frame (`None` code: a close frame without payload).
    ByClient { code: Option<u16>, reason: String },
    /// The fake tore the connection down without a close frame (a drop fault).
    Dropped,
    /// The transport ended without a close frame from the client.
    Vanished,
}

/// What the fake saw and did on one connection.
#[derive(Clone, Debug, Default)]
pub struct ConnectionRecord {
    /// Query parameters in the order received.
    pub query: Vec<(String, String)>,
    /// Audio bytes received (binary frames).
    pub bytes_received: u64,
    /// Every JSON message sent, in order.
    pub sent: Vec<Value>,
    /// Transcripts of the `is_final:true` results sent.
    pub finals: Vec<String>,
    /// Control messages received (`KeepAlive`, `Finalize`, …), by type.
    pub controls: Vec<String>,
    /// How it ended; `None` while open.
    pub closed: Option<Closed>,
}

impl ConnectionRecord {
    /// The value of a query parameter, if given.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sent messages of one `type`.
    pub fn sent_of_type(&self, ty: &str) -> Vec<&Value> {
        self.sent.iter().filter(|m| m["type"] == ty).collect()
    }
}

/// Shared state of the fake (what tests inspect through the [`Handle`]).
pub struct DeepgramState {
    cfg: Config,
    script: Mutex<VecDeque<String>>,
    connections: Mutex<Vec<ConnectionRecord>>,
    faults: FaultSwitch,
}

impl DeepgramState {
    /// State for a fake configured by `cfg`.
    pub fn new(cfg: Config) -> Arc<Self> {
        Arc::new(Self {
            script: Mutex::new(cfg.script.iter().cloned().collect()),
            connections: Mutex::new(Vec::new()),
            faults: FaultSwitch::with_seed(cfg.fault_seed),
            cfg,
        })
    }

    fn record(&self, index: usize, edit: impl FnOnce(&mut ConnectionRecord)) {
        let mut all = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = all.get_mut(index) {
            edit(r);
        }
    }

    fn next_script_line(&self) -> Option<String> {
        self.script
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }

    fn peek_script_line(&self) -> Option<String> {
        self.script
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .front()
            .cloned()
    }
}

/// The fake's routes (provider routes wrapped with faults, plus `/__faults`).
pub fn router(state: Arc<DeepgramState>) -> Router {
    let faults = state.faults.clone();
    let app = Router::new()
        .route(LISTEN_PATH, get(listen))
        .with_state(state);
    let error: ErrorResponder =
        Arc::new(|status| handshake_error(status, "FAULT", "Injected fault (fake Deepgram)."));
    crate::fakes::faults::wrap(app, faults, error)
}

/// A running fake Deepgram.
pub struct Handle {
    server: Server,
    state: Arc<DeepgramState>,
}

/// Starts the fake on `cfg.addr`.
pub async fn spawn(cfg: Config) -> anyhow::Result<Handle> {
    let addr = cfg.addr;
    let state = DeepgramState::new(cfg);
    let server = Server::start("deepgram", addr, router(state.clone())).await?;
    Ok(Handle { server, state })
}

impl Handle {
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// `ws://127.0.0.1:PORT` (append [`LISTEN_PATH`] and the query).
    pub fn ws_url(&self) -> String {
        self.server.ws_url()
    }

    /// The live fault switch of this fake.
    pub fn faults(&self) -> &FaultSwitch {
        &self.state.faults
    }

    /// The expected API key.
    pub fn api_key(&self) -> &str {
        &self.state.cfg.api_key
    }

    /// Appends transcripts for upcoming non-tone-coded segments.
    pub fn push_script<I: IntoIterator<Item = S>, S: Into<String>>(&self, lines: I) {
        let mut script = self
            .state
            .script
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        script.extend(lines.into_iter().map(Into::into));
    }

    /// Snapshot of every accepted connection, oldest first.
    pub fn connections(&self) -> Vec<ConnectionRecord> {
        self.state
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Number of WebSocket connections accepted.
    pub fn connection_count(&self) -> usize {
        self.state
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Audio bytes received over all connections.
    pub fn bytes_received(&self) -> u64 {
        self.connections().iter().map(|c| c.bytes_received).sum()
    }

    /// Transcripts of every final result sent, over all connections.
    pub fn finals_sent(&self) -> Vec<String> {
        self.connections()
            .into_iter()
            .flat_map(|c| c.finals)
            .collect()
    }

    /// How each connection ended (`None` while still open).
    pub fn close_reasons(&self) -> Vec<Option<Closed>> {
        self.connections().into_iter().map(|c| c.closed).collect()
    }

    /// Polls the records until `check` holds or `timeout` passes; returns whether it held.
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

    /// Stops the fake.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

/// Handshake failure as Deepgram answers it: status, `dg-error` and `dg-request-id`
/// headers, JSON body. UNCONFIRMED: the body keys; clients should rely on status/headers.
fn handshake_error(status: StatusCode, err_code: &str, message: &str) -> Response {
    let request_id = uuid::Uuid::new_v4().to_string();
    let body = json!({"err_code": err_code, "err_msg": message, "request_id": request_id});
    let mut response = (status, axum::Json(body)).into_response();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(message) {
        headers.insert("dg-error", v);
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert("dg-request-id", v);
    }
    response
}

/// Options of one stream, parsed and validated from the query.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenOptions {
    pub model: String,
    pub interim_results: bool,
    /// `None` when `endpointing=false`.
    pub endpointing_ms: Option<u64>,
    pub utterance_end_ms: Option<u64>,
    pub vad_events: bool,
}

impl ListenOptions {
    /// Validates the query as the real handshake does (400 with a message on failure).
    pub fn from_query(query: &[(String, String)]) -> Result<Self, String> {
        let get = |name: &str| {
            query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if let Some((unknown, _)) = query
            .iter()
            .find(|(k, _)| !KNOWN_PARAMS.contains(&k.as_str()))
        {
            return Err(format!("Unknown query parameter: {unknown}"));
        }
        let model = get("model")
            .filter(|m| !m.is_empty())
            .ok_or("Missing required parameter: model")?;
        // Raw μ-law has no container to sniff, so the encoding must be given (Deepgram only
        // auto-detects containerized audio).
        let encoding = get("encoding").ok_or("Missing encoding: raw audio needs encoding")?;
        if !KNOWN_ENCODINGS.contains(&encoding) {
            return Err(format!("Unsupported encoding: {encoding}"));
        }
        if encoding != "mulaw" {
            return Err(format!(
                "fake Deepgram understands only encoding=mulaw, got {encoding}"
            ));
        }
        let sample_rate =
            get("sample_rate").ok_or("Missing sample_rate: required for raw encodings")?;
        if sample_rate != SAMPLE_RATE.to_string() {
            return Err(format!(
                "fake Deepgram understands only sample_rate=8000, got {sample_rate}"
            ));
        }
        if let Some(channels) = get("channels") {
            if channels != "1" {
                return Err(format!(
                    "fake Deepgram understands only channels=1, got {channels}"
                ));
            }
        }
        let flag = |name: &str| -> Result<bool, String> {
            match get(name) {
                None | Some("false") => Ok(false),
                Some("true") => Ok(true),
                Some(other) => Err(format!("Invalid boolean for {name}: {other}")),
            }
        };
        let interim_results = flag("interim_results")?;
        let vad_events = flag("vad_events")?;
        let endpointing_ms = match get("endpointing") {
            None => Some(DEFAULT_ENDPOINTING_MS),
            Some("false") => None,
            Some(ms) => Some(
                ms.parse::<u64>()
                    .map_err(|_| format!("Invalid endpointing: {ms}"))?,
            ),
        };
        let utterance_end_ms = match get("utterance_end_ms") {
            None => None,
            Some(ms) => Some(
                ms.parse::<u64>()
                    .map_err(|_| format!("Invalid utterance_end_ms: {ms}"))?,
            ),
        };
        // UtteranceEnd is built from interim results; asking for it without them is a
        // client mistake the docs call out, so the fake refuses it outright.
        if utterance_end_ms.is_some() && !interim_results {
            return Err("utterance_end_ms requires interim_results=true".to_owned());
        }
        Ok(Self {
            model: model.to_owned(),
            interim_results,
            endpointing_ms,
            utterance_end_ms,
            vad_events,
        })
    }
}

async fn listen(
    State(state): State<Arc<DeepgramState>>,
    headers: HeaderMap,
    RawQuery(raw_query): RawQuery,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    // Only `Token <key>` is accepted: temporary `Bearer` JWTs cannot be checked by a fake
    // and our clients never use them, so a Bearer header here is a client bug.
    let expected = format!("Token {}", state.cfg.api_key);
    let authorized = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == expected);
    if !authorized {
        tracing::info!("deepgram fake: rejecting handshake with bad credentials");
        return handshake_error(
            StatusCode::UNAUTHORIZED,
            "INVALID_AUTH",
            "Invalid credentials.",
        );
    }
    let query: Vec<(String, String)> =
        match serde_urlencoded::from_str(raw_query.as_deref().unwrap_or("")) {
            Ok(q) => q,
            Err(err) => {
                let message = format!("Malformed query string: {err}");
                return handshake_error(StatusCode::BAD_REQUEST, "Bad Request", &message);
            }
        };
    let options = match ListenOptions::from_query(&query) {
        Ok(mut o) => {
            if let Some(ms) = state.cfg.endpointing_override_ms {
                o.endpointing_ms = Some(ms);
            }
            o
        }
        Err(message) => {
            tracing::info!(%message, "deepgram fake: rejecting handshake");
            return handshake_error(StatusCode::BAD_REQUEST, "Bad Request", &message);
        }
    };
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => return rejection.into_response(),
    };
    let index = {
        let mut all = state
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        all.push(ConnectionRecord {
            query,
            ..ConnectionRecord::default()
        });
        all.len() - 1
    };
    let connection_faults = state.faults.connection();
    upgrade.on_upgrade(move |socket| async move {
        run_connection(socket, state, options, index, connection_faults).await;
    })
}

/// What the reader hands the writer.
enum Outbound {
    Json(Value),
    Close(u16, String),
}

/// How the writer stopped.
enum WriterEnd {
    /// Sent a close frame.
    Closed,
    /// A message budget fault said to drop the connection.
    Dropped,
    /// The socket failed or the reader went away.
    Gone,
}

async fn run_connection(
    socket: WebSocket,
    state: Arc<DeepgramState>,
    options: ListenOptions,
    index: usize,
    faults: ConnectionFaults,
) {
    tracing::debug!(index, model = %options.model, "deepgram fake: connection open");
    let (sink, stream) = socket.split();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut drop_timer = faults.drop_timer();
    let mut writer = tokio::spawn(write_loop(sink, rx, faults, state.clone(), index));
    let reader = read_loop(stream, tx, state.clone(), options, index);
    tokio::pin!(reader);

    // Whichever ends first decides; dropping both socket halves without a close frame is
    // how a drop fault looks to the client (the TCP connection just goes away).
    let outcome = tokio::select! {
        () = drop_timer.wait() => Some(Closed::Dropped),
        end = &mut writer => match end {
            Ok(WriterEnd::Dropped) => Some(Closed::Dropped),
            _ => None,
        },
        () = &mut reader => {
            // Let the writer flush what the reader queued (final results, close frame).
            tokio::select! {
                () = drop_timer.wait() => Some(Closed::Dropped),
                end = &mut writer => match end {
                    Ok(WriterEnd::Dropped) => Some(Closed::Dropped),
                    _ => None,
                },
            }
        }
    };
    writer.abort();
    if let Some(closed) = outcome {
        tracing::info!(index, "deepgram fake: dropping connection (fault)");
        state.record(index, |r| r.closed = Some(closed));
    }
    state.record(index, |r| {
        if r.closed.is_none() {
            r.closed = Some(Closed::Vanished);
        }
    });
}

async fn write_loop(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    mut faults: ConnectionFaults,
    state: Arc<DeepgramState>,
    index: usize,
) -> WriterEnd {
    while let Some(out) = rx.recv().await {
        match out {
            Outbound::Json(value) => {
                if !faults.before_send().await {
                    return WriterEnd::Dropped;
                }
                let text = value.to_string();
                if sink.send(Message::Text(text.into())).await.is_err() {
                    return WriterEnd::Gone;
                }
                state.record(index, |r| {
                    if value["type"] == "Results" && value["is_final"] == true {
                        let t = value["channel"]["alternatives"][0]["transcript"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned();
                        r.finals.push(t);
                    }
                    r.sent.push(value);
                });
            }
            Outbound::Close(code, reason) => {
                let frame = CloseFrame {
                    code,
                    reason: reason.clone().into(),
                };
                let _ = sink.send(Message::Close(Some(frame))).await;
                state.record(index, |r| {
                    // The client may have closed first; keep the first outcome.
                    if r.closed.is_none() {
                        r.closed = Some(Closed::ByServer { code, reason });
                    }
                });
                return WriterEnd::Closed;
            }
        }
    }
    WriterEnd::Gone
}

async fn read_loop(
    mut stream: futures::stream::SplitStream<WebSocket>,
    tx: mpsc::UnboundedSender<Outbound>,
    state: Arc<DeepgramState>,
    options: ListenOptions,
    index: usize,
) {
    let idle_timeout = state.cfg.idle_timeout;
    let mut session = Session::new(
        options,
        state.cfg.vad_threshold_dbfs,
        state.cfg.interim_every_ms,
    );
    let mut idle_deadline = Instant::now() + idle_timeout;
    let send_all = |messages: Vec<Value>| {
        for m in messages {
            let _ = tx.send(Outbound::Json(m));
        }
    };
    loop {
        let message = tokio::select! {
            m = stream.next() => m,
            () = tokio::time::sleep_until(idle_deadline) => {
                tracing::info!(index, "deepgram fake: idle timeout");
                let _ = tx.send(Outbound::Close(IDLE_CLOSE_CODE, IDLE_CLOSE_REASON.to_owned()));
                return;
            }
        };
        match message {
            Some(Ok(Message::Binary(bytes))) => {
                if bytes.is_empty() {
                    // An empty binary frame was Deepgram's legacy close-stream signal, and
                    // the docs still say it closes the connection: the fake treats it
                    // exactly like CloseStream (flush, Metadata, close 1000) so a client
                    // that sends one by accident loses its stream, visibly.
                    tracing::info!(index, "deepgram fake: empty binary frame, closing");
                    send_all(session.close_stream(&now_rfc3339()));
                    let _ = tx.send(Outbound::Close(1000, String::new()));
                    return;
                }
                idle_deadline = Instant::now() + idle_timeout;
                if let Some(tap) = &state.cfg.audio_tap {
                    (tap.0)(&bytes);
                }
                state.record(index, |r| r.bytes_received += bytes.len() as u64);
                let mut script = ScriptSource(&state);
                send_all(session.push_audio(&bytes, &mut script));
            }
            Some(Ok(Message::Text(text))) => {
                let control: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                let kind = control["type"].as_str().unwrap_or_default().to_owned();
                state.record(index, |r| r.controls.push(kind.clone()));
                match kind.as_str() {
                    // Only audio and KeepAlive reset the idle timer: the docs disagree on
                    // whether any text frame counts, and the strict reading catches a client
                    // that thinks Finalize keeps a silent stream alive.
                    "KeepAlive" => idle_deadline = Instant::now() + idle_timeout,
                    "Finalize" => {
                        let mut script = ScriptSource(&state);
                        send_all(session.finalize(&mut script));
                    }
                    "CloseStream" => {
                        let mut script = ScriptSource(&state);
                        send_all(session.flush(&mut script));
                        send_all(session.close_stream(&now_rfc3339()));
                        let _ = tx.send(Outbound::Close(1000, String::new()));
                        return;
                    }
                    "Configure" => send_all(vec![json!({
                        "type": "ConfigureSuccess",
                        "request_id": session.request_id,
                        "keyterms": control.get("keyterms").cloned().unwrap_or(json!([])),
                    })]),
                    _ => {
                        // Undocumented: what the service does with an unknown control
                        // message. The fake answers a schema error and closes, so a client
                        // sending malformed control JSON finds out at once.
                        tracing::info!(index, %kind, "deepgram fake: unknown control message");
                        send_all(vec![json!({
                            "type": "Error",
                            "variant": "SchemaError",
                            "description": "Unknown or malformed control message.",
                            "message": text.as_str(),
                        })]);
                        let _ = tx.send(Outbound::Close(1008, "DATA-0000".to_owned()));
                        return;
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = match frame {
                    Some(f) => (Some(f.code), f.reason.to_string()),
                    None => (None, String::new()),
                };
                state.record(index, |r| {
                    r.closed = Some(Closed::ByClient { code, reason })
                });
                return;
            }
            // Pings are answered by axum itself.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Err(_)) | None => return,
        }
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Where a session takes transcripts of non-tone-coded speech from.
pub trait Script {
    /// The transcript a segment in progress would get (interim results).
    fn peek(&mut self) -> Option<String>;
    /// Takes the transcript of a finished segment.
    fn next(&mut self) -> Option<String>;
}

struct ScriptSource<'a>(&'a DeepgramState);

impl Script for ScriptSource<'_> {
    fn peek(&mut self) -> Option<String> {
        self.0.peek_script_line()
    }
    fn next(&mut self) -> Option<String> {
        self.0.next_script_line()
    }
}

impl Script for VecDeque<String> {
    fn peek(&mut self) -> Option<String> {
        self.front().cloned()
    }
    fn next(&mut self) -> Option<String> {
        self.pop_front()
    }
}

/// A speech segment not yet finalized.
#[derive(Debug)]
struct Segment {
    start_s: f64,
    last_speech_end_s: f64,
    /// Tone-decoded characters heard in this segment.
    text: String,
    /// Audio time of the last interim result (or the segment start).
    last_interim_s: f64,
    /// Loud frames with a voice's concentrated spectrum; a segment with too few (a cough,
    /// a burst of noise) is transcribed as nothing, as Deepgram does.
    tonal_frames: u32,
}

/// Loud frames under this spectral flatness sound like a voice, not noise.
const TONAL_FLATNESS: f32 = 0.3;
/// A segment with fewer tonal frames than this has no words.
const MIN_TONAL_FRAMES: u32 = 3;

impl Segment {
    fn is_speech(&self) -> bool {
        self.tonal_frames >= MIN_TONAL_FRAMES
    }
}

/// One stream's recognizer on audio time: feed it audio and control messages, get the
/// JSON messages Deepgram would send. Pure: no clock, no I/O.
pub struct Session {
    options: ListenOptions,
    vad_threshold_dbfs: f32,
    interim_every_s: f64,
    /// Partial VAD frame waiting for more bytes.
    frame: Vec<u8>,
    /// Bytes consumed into whole VAD frames.
    consumed: u64,
    /// Bytes received in total (Metadata duration).
    received: u64,
    decoder: ToneDecoder,
    /// Decoded characters that arrived outside a segment, kept for the next one.
    orphan_text: String,
    segment: Option<Segment>,
    /// End of the last finalized word while an UtteranceEnd is due.
    utterance_pending: Option<f64>,
    hasher: Sha256,
    /// Request id reported in every message.
    pub request_id: String,
    model_uuid: String,
}

impl Session {
    /// A new stream with validated options.
    pub fn new(options: ListenOptions, vad_threshold_dbfs: f32, interim_every_ms: u64) -> Self {
        Self {
            options,
            vad_threshold_dbfs,
            interim_every_s: interim_every_ms as f64 / 1000.0,
            frame: Vec::with_capacity(FRAME_BYTES),
            consumed: 0,
            received: 0,
            decoder: ToneDecoder::new(),
            orphan_text: String::new(),
            segment: None,
            utterance_pending: None,
            hasher: Sha256::new(),
            request_id: uuid::Uuid::new_v4().to_string(),
            model_uuid: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// Feeds audio bytes; returns the messages due by the end of this audio.
    pub fn push_audio(&mut self, bytes: &[u8], script: &mut dyn Script) -> Vec<Value> {
        self.received += bytes.len() as u64;
        self.hasher.update(bytes);
        let mut out = Vec::new();
        for &b in bytes {
            self.frame.push(b);
            if self.frame.len() == FRAME_BYTES {
                let frame = std::mem::take(&mut self.frame);
                self.on_frame(&frame, script, &mut out);
                self.frame = frame;
                self.frame.clear();
            }
        }
        out
    }

    /// `Finalize`: flushes the segment in progress as a final with `from_finalize:true`.
    /// With nothing pending it still answers an empty final, so a client waiting for
    /// `from_finalize` is never left hanging.
    pub fn finalize(&mut self, script: &mut dyn Script) -> Vec<Value> {
        let mut out = Vec::new();
        self.drain_partial_frame(script, &mut out);
        match self.segment.take() {
            Some(segment) => out.push(self.final_result(segment, false, true, script)),
            None => {
                let now = self.audio_time();
                out.push(self.results_json(now, 0.0, "", Vec::new(), true, false, true));
            }
        }
        out
    }

    /// Flushes a pending segment as a plain final (used before closing).
    pub fn flush(&mut self, script: &mut dyn Script) -> Vec<Value> {
        let mut out = Vec::new();
        self.drain_partial_frame(script, &mut out);
        if let Some(segment) = self.segment.take() {
            out.push(self.final_result(segment, false, false, script));
        }
        out
    }

    /// The `Metadata` message sent before a normal close.
    pub fn close_stream(&mut self, created: &str) -> Vec<Value> {
        let sha = hex::encode(self.hasher.clone().finalize());
        vec![json!({
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.request_id,
            "sha256": sha,
            "created": created,
            "duration": round3(self.received as f64 / f64::from(SAMPLE_RATE)),
            "channels": 1,
            "models": [self.model_uuid],
            "model_info": {
                self.model_uuid.clone(): {"name": self.options.model, "version": "fake", "arch": "fake"}
            },
        })]
    }

    fn audio_time(&self) -> f64 {
        self.consumed as f64 / f64::from(SAMPLE_RATE)
    }

    /// A trailing partial frame is analysed as-is when the stream is flushed.
    fn drain_partial_frame(&mut self, script: &mut dyn Script, out: &mut Vec<Value>) {
        if !self.frame.is_empty() {
            let frame = std::mem::take(&mut self.frame);
            self.on_frame(&frame, script, out);
        }
    }

    fn on_frame(&mut self, frame: &[u8], script: &mut dyn Script, out: &mut Vec<Value>) {
        let t0 = self.audio_time();
        self.consumed += frame.len() as u64;
        let t1 = self.audio_time();
        let decoded = self.decoder.push(frame);
        let speech = audio::energy_dbfs(frame) >= self.vad_threshold_dbfs;

        if speech {
            // Speech resuming cancels a pending UtteranceEnd: the utterance goes on.
            self.utterance_pending = None;
            if self.segment.is_none() {
                if self.options.vad_events {
                    out.push(json!({"type": "SpeechStarted", "channel": [0, 1], "timestamp": round3(t0)}));
                }
                self.segment = Some(Segment {
                    start_s: t0,
                    last_speech_end_s: t1,
                    text: std::mem::take(&mut self.orphan_text),
                    last_interim_s: t0,
                    tonal_frames: 0,
                });
            }
        }
        match self.segment.as_mut() {
            Some(segment) => segment.text.push_str(&decoded),
            None => self.orphan_text.push_str(&decoded),
        }

        let Some(segment) = self.segment.as_mut() else {
            self.maybe_utterance_end(t1, out);
            return;
        };
        if speech {
            segment.last_speech_end_s = t1;
            if audio::spectral_flatness(frame) < TONAL_FLATNESS {
                segment.tonal_frames += 1;
            }
            if self.options.interim_results
                && t1 - segment.last_interim_s >= self.interim_every_s - 1e-9
            {
                segment.last_interim_s = t1;
                let (start, end) = (segment.start_s, segment.last_speech_end_s);
                let text = if !segment.is_speech() {
                    String::new()
                } else if segment.text.trim().is_empty() {
                    script.peek().unwrap_or_default()
                } else {
                    segment.text.trim().to_owned()
                };
                if !text.is_empty() {
                    let words = words_for(&text, start, end, !segment.text.trim().is_empty());
                    out.push(self.results_json(
                        start,
                        end - start,
                        &text,
                        words,
                        false,
                        false,
                        false,
                    ));
                }
            }
            return;
        }
        let silence_ms = (t1 - segment.last_speech_end_s) * 1000.0;
        let due = match self.options.endpointing_ms {
            Some(ms) => (silence_ms + 1e-6 >= ms as f64).then_some(true),
            None => (silence_ms + 1e-6 >= NO_ENDPOINT_FINALIZE_MS as f64).then_some(false),
        };
        if let Some(speech_final) = due {
            if let Some(segment) = self.segment.take() {
                out.push(self.final_result(segment, speech_final, false, script));
            }
        }
        self.maybe_utterance_end(t1, out);
    }

    fn maybe_utterance_end(&mut self, now: f64, out: &mut Vec<Value>) {
        let (Some(gap_ms), Some(last_word_end)) =
            (self.options.utterance_end_ms, self.utterance_pending)
        else {
            return;
        };
        if (now - last_word_end) * 1000.0 + 1e-6 >= gap_ms as f64 {
            self.utterance_pending = None;
            out.push(json!({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": round3(last_word_end)}));
        }
    }

    fn final_result(
        &mut self,
        segment: Segment,
        speech_final: bool,
        from_finalize: bool,
        script: &mut dyn Script,
    ) -> Value {
        let tone = segment.text.trim();
        let (text, timed) = if !tone.is_empty() {
            (tone.to_owned(), true)
        } else if !segment.is_speech() {
            // Noise: Deepgram's final for it is an empty transcript.
            (String::new(), false)
        } else {
            (
                script.next().unwrap_or_else(|| UNINTELLIGIBLE.to_owned()),
                false,
            )
        };
        let (start, end) = (segment.start_s, segment.last_speech_end_s);
        let words = words_for(&text, start, end, timed);
        let last_word_end = words.last().and_then(|w| w["end"].as_f64()).unwrap_or(end);
        if self.options.interim_results && self.options.utterance_end_ms.is_some() {
            self.utterance_pending = Some(last_word_end);
        }
        self.results_json(
            start,
            end - start,
            &text,
            words,
            true,
            speech_final,
            from_finalize,
        )
    }

    #[allow(clippy::too_many_arguments)] // mirrors the Results fields one to one
    fn results_json(
        &self,
        start: f64,
        duration: f64,
        transcript: &str,
        words: Vec<Value>,
        is_final: bool,
        speech_final: bool,
        from_finalize: bool,
    ) -> Value {
        json!({
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round3(duration),
            "start": round3(start),
            "is_final": is_final,
            "speech_final": speech_final,
            "from_finalize": from_finalize,
            "channel": {"alternatives": [{
                "transcript": transcript,
                "confidence": if transcript.is_empty() { 0.0 } else { 0.99 },
                "words": words,
            }]},
            "metadata": {
                "request_id": self.request_id,
                "model_uuid": self.model_uuid,
                "model_info": {"name": self.options.model, "version": "fake", "arch": "fake"},
            },
        })
    }
}

/// Word entries for a transcript. Tone-coded text is timed exactly (40 ms per character
/// from the segment start); scripted text is spread evenly over the segment.
fn words_for(text: &str, start: f64, end: f64, tone_timed: bool) -> Vec<Value> {
    let mut words = Vec::new();
    let total_chars = text.chars().count().max(1) as f64;
    let per_char = if tone_timed {
        SECONDS_PER_CHAR
    } else {
        (end - start).max(0.0) / total_chars
    };
    let mut offset = 0usize;
    for token in text.split(' ') {
        let len = token.chars().count();
        if !token.is_empty() {
            let bare: String = token
                .trim_matches(|c: char| c.is_ascii_punctuation())
                .to_lowercase();
            let w_start = start + offset as f64 * per_char;
            words.push(json!({
                "word": if bare.is_empty() { token.to_lowercase() } else { bare },
                "start": round3(w_start),
                "end": round3(w_start + len as f64 * per_char),
                "confidence": 0.99,
                "punctuated_word": token,
            }));
        }
        offset += len + 1;
    }
    words
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(query: &str) -> Result<ListenOptions, String> {
        let q: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap();
        ListenOptions::from_query(&q)
    }

    fn session(query: &str) -> Session {
        Session::new(opts(query).unwrap(), -40.0, 400)
    }

    const BASE: &str = "model=nova-3&encoding=mulaw&sample_rate=8000&channels=1";

    /// The handshake accepts our production query and rejects what the real one rejects.
    #[test]
    fn query_validation() {
        let ok = opts(&format!(
            "{BASE}&interim_results=true&endpointing=300&utterance_end_ms=1000&vad_events=true&smart_format=true&punctuate=true&language=en"
        ))
        .unwrap();
        assert_eq!(ok.endpointing_ms, Some(300));
        assert_eq!(ok.utterance_end_ms, Some(1000));
        assert!(ok.interim_results && ok.vad_events);
        assert_eq!(opts(BASE).unwrap().endpointing_ms, Some(10));
        assert_eq!(
            opts(&format!("{BASE}&endpointing=false"))
                .unwrap()
                .endpointing_ms,
            None
        );
        for bad in [
            "encoding=mulaw&sample_rate=8000",
            "model=nova-3&sample_rate=8000",
            "model=nova-3&encoding=wav&sample_rate=8000",
            "model=nova-3&encoding=linear16&sample_rate=8000",
            "model=nova-3&encoding=mulaw",
            "model=nova-3&encoding=mulaw&sample_rate=16000",
            "model=nova-3&encoding=mulaw&sample_rate=8000&channels=2",
            "model=nova-3&encoding=mulaw&sample_rate=8000&endpointing=soon",
            "model=nova-3&encoding=mulaw&sample_rate=8000&utterance_end_ms=1000",
            "model=nova-3&encoding=mulaw&sample_rate=8000&interim_results=yes",
            "model=nova-3&encoding=mulaw&sample_rate=8000&endpoint=300",
        ] {
            assert!(opts(bad).is_err(), "{bad} should be rejected");
        }
    }

    fn types(messages: &[Value]) -> Vec<String> {
        messages
            .iter()
            .map(|m| m["type"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Tone-coded speech followed by silence gives interims, one speech_final result with
    /// the exact text and timings, then UtteranceEnd after the configured gap.
    #[test]
    fn tone_speech_to_final_and_utterance_end() {
        let mut s = session(&format!(
            "{BASE}&interim_results=true&endpointing=300&utterance_end_ms=1000&vad_events=true"
        ));
        let mut script = VecDeque::new();
        let audio = [
            audio::silence(200),
            audio::encode_text("book a table"),
            audio::silence(1500),
        ]
        .concat();
        let out = s.push_audio(&audio, &mut script);
        let kinds = types(&out);
        assert_eq!(kinds.first().map(String::as_str), Some("SpeechStarted"));
        assert_eq!(out[0]["timestamp"], 0.2);
        let finals: Vec<&Value> = out.iter().filter(|m| m["is_final"] == true).collect();
        assert_eq!(finals.len(), 1);
        let f = finals[0];
        assert_eq!(f["speech_final"], true);
        assert_eq!(f["from_finalize"], false);
        assert_eq!(
            f["channel"]["alternatives"][0]["transcript"],
            "book a table"
        );
        assert_eq!(f["start"], 0.2);
        assert_eq!(f["duration"], 0.48);
        let words = f["channel"]["alternatives"][0]["words"].as_array().unwrap();
        assert_eq!(words.len(), 3);
        assert_eq!(words[1]["word"], "a");
        assert_eq!(words[1]["start"], 0.4);
        assert_eq!(words[2]["end"], 0.68);
        // Interims came before the final, and none after.
        let interims = out
            .iter()
            .filter(|m| m["type"] == "Results" && m["is_final"] == false)
            .count();
        assert!(interims >= 1);
        let final_pos = out.iter().position(|m| m["is_final"] == true).unwrap();
        assert!(out[final_pos..].iter().all(|m| m["is_final"] != false));
        // The final arrives ~300 ms after speech ends; UtteranceEnd ~1000 ms after.
        assert_eq!(kinds.last().map(String::as_str), Some("UtteranceEnd"));
        assert_eq!(out.last().unwrap()["last_word_end"], 0.68);
    }

    /// Without vad_events/interim_results there is no SpeechStarted, interim or UtteranceEnd.
    #[test]
    fn optional_events_need_their_flags() {
        let mut s = session(&format!("{BASE}&endpointing=300"));
        let mut script = VecDeque::new();
        let audio = [audio::encode_text("hello there"), audio::silence(2000)].concat();
        let out = s.push_audio(&audio, &mut script);
        assert_eq!(types(&out), vec!["Results"]);
        assert_eq!(out[0]["is_final"], true);
        assert_eq!(out[0]["speech_final"], true);
    }

    /// Endpointing waits the configured silence: 290 ms is not enough for endpointing=300.
    #[test]
    fn endpointing_waits_for_the_configured_silence() {
        let mut s = session(&format!("{BASE}&endpointing=300"));
        let mut script = VecDeque::new();
        assert!(s
            .push_audio(&audio::encode_text("hi"), &mut script)
            .is_empty());
        assert!(s.push_audio(&audio::silence(280), &mut script).is_empty());
        let out = s.push_audio(&audio::silence(20), &mut script);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["speech_final"], true);
    }

    /// Non-tone speech takes the script in order, then "unintelligible".
    #[test]
    fn script_then_unintelligible() {
        let mut s = session(&format!("{BASE}&endpointing=100"));
        let mut script: VecDeque<String> = ["yes please".to_owned()].into();
        // A buzz loud enough to be speech, its spectrum peaked like a voice's (so not
        // noise), but no clean tone.
        let noise: Vec<u8> = (0..4000u32)
            .map(|i| audio::ulaw_encode(((i.wrapping_mul(2_654_435_761) >> 16) as i16) / 4))
            .collect();
        let mut out = s.push_audio(&[noise.clone(), audio::silence(200)].concat(), &mut script);
        out.extend(s.push_audio(&[noise, audio::silence(200)].concat(), &mut script));
        let transcripts: Vec<&str> = out
            .iter()
            .map(|m| {
                m["channel"]["alternatives"][0]["transcript"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert_eq!(transcripts, vec!["yes please", UNINTELLIGIBLE]);
    }

    /// A cough is sound, not speech: VAD fires, but there are no interim results, and its
    /// final is an empty transcript that takes nothing from the script.
    #[test]
    fn a_cough_has_no_words() {
        let mut s = session(&format!(
            "{BASE}&endpointing=100&interim_results=true&vad_events=true"
        ));
        let mut script: VecDeque<String> = ["yes please".to_owned()].into();
        let out = s.push_audio(
            &[audio::cough(300, 7), audio::silence(200)].concat(),
            &mut script,
        );
        let types: Vec<&str> = out.iter().filter_map(|m| m["type"].as_str()).collect();
        assert_eq!(types, ["SpeechStarted", "Results"], "{out:?}");
        assert_eq!(out[1]["is_final"], true);
        assert_eq!(out[1]["channel"]["alternatives"][0]["transcript"], "");
        assert_eq!(script.len(), 1, "the script is for speech");
    }

    /// Finalize flushes mid-speech with from_finalize:true, and answers even when idle.
    #[test]
    fn finalize_flushes_now() {
        let mut s = session(&format!("{BASE}&endpointing=300"));
        let mut script = VecDeque::new();
        s.push_audio(&audio::encode_text("wait"), &mut script);
        let out = s.finalize(&mut script);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["from_finalize"], true);
        assert_eq!(out[0]["is_final"], true);
        assert_eq!(out[0]["channel"]["alternatives"][0]["transcript"], "wait");
        let idle = s.finalize(&mut script);
        assert_eq!(idle[0]["channel"]["alternatives"][0]["transcript"], "");
        assert_eq!(idle[0]["from_finalize"], true);
    }

    /// endpointing=false never sets speech_final; finals still come after a long pause.
    #[test]
    fn endpointing_false_finalizes_without_speech_final() {
        let mut s = session(&format!("{BASE}&endpointing=false"));
        let mut script = VecDeque::new();
        let out = s.push_audio(
            &[audio::encode_text("ok"), audio::silence(1200)].concat(),
            &mut script,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["is_final"], true);
        assert_eq!(out[0]["speech_final"], false);
    }

    /// Metadata reports the audio duration and its SHA-256.
    #[test]
    fn metadata_reports_duration() {
        let mut s = session(BASE);
        let mut script = VecDeque::new();
        let audio = audio::silence(1500);
        s.push_audio(&audio, &mut script);
        let m = &s.close_stream("2024-01-01T00:00:00Z")[0];
        assert_eq!(m["type"], "Metadata");
        assert_eq!(m["duration"], 1.5);
        assert_eq!(m["sha256"], hex::encode(Sha256::digest(&audio)));
    }
}
