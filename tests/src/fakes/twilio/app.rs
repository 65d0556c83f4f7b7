//! A tiny Twilio *customer* app for tests of the fake Twilio: it serves TwiML, receives
//! status callbacks and accepts media-stream WebSockets, verifying every
//! `X-Twilio-Signature` with `cmb_core::twilio_sig::validate_request` the way a real app
//! (our Worker and relay) must.
//!
//! Owns nothing of the fake itself; it stands where the Worker and the relay stand in the
//! end-to-end tests, so the fake can be tested alone. Each accepted stream is handed to
//! the test as a [`BotStream`] to script the bot side by hand. It must not be used as a
//! model of the production handlers: it is deliberately minimal.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{OriginalUri, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::fakes::{Server, LOOPBACK_ANY};

/// One webhook request the app received.
#[derive(Clone, Debug)]
pub struct AppRequest {
    /// The full URL as Twilio requested it (`http://127.0.0.1:PORT/path?query`).
    pub url: String,
    pub method: String,
    /// Form parameters of a POST (empty for GET: those are in the URL).
    pub params: Vec<(String, String)>,
    pub signature: Option<String>,
    /// Whether the signature validated.
    pub valid: bool,
}

impl AppRequest {
    /// A form parameter's value.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct AppState {
    auth_token: String,
    twiml: Mutex<String>,
    requests: Mutex<Vec<(String, AppRequest)>>,
    streams: mpsc::UnboundedSender<BotStream>,
    /// Upgrades refused because of a bad signature.
    refused_upgrades: Mutex<u32>,
}

/// The running app.
pub struct WebhookApp {
    server: Server,
    state: Arc<AppState>,
    streams: tokio::sync::Mutex<mpsc::UnboundedReceiver<BotStream>>,
}

impl WebhookApp {
    /// Starts the app on a free loopback port; it signs nothing and checks with `auth_token`.
    pub async fn spawn(auth_token: &str) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(AppState {
            auth_token: auth_token.to_owned(),
            twiml: Mutex::new("<Response><Hangup/></Response>".to_owned()),
            requests: Mutex::new(Vec::new()),
            streams: tx,
            refused_upgrades: Mutex::new(0),
        });
        let app = Router::new()
            .route("/twiml", any(twiml))
            .route("/status", any(webhook))
            .route("/stream-status", any(webhook))
            .route("/media", get(media))
            .with_state(state.clone());
        let server = Server::start("test-app", LOOPBACK_ANY, app)
            .await
            .context("starting the test webhook app")?;
        Ok(Self {
            server,
            state,
            streams: tokio::sync::Mutex::new(rx),
        })
    }

    /// TwiML webhook URL (with a query string, as the Worker's has).
    pub fn twiml_url(&self) -> String {
        format!("{}/twiml?callId=c1", self.server.base_url())
    }

    /// Status callback URL (with a query string).
    pub fn status_url(&self) -> String {
        format!("{}/status?callId=c1", self.server.base_url())
    }

    /// Stream status callback URL.
    pub fn stream_status_url(&self) -> String {
        format!("{}/stream-status", self.server.base_url())
    }

    /// Media WebSocket URL.
    pub fn stream_url(&self) -> String {
        format!("{}/media", self.server.ws_url())
    }

    /// A `<Connect><Stream>` document for this app's media URL, with parameters.
    pub fn connect_twiml(&self, parameters: &[(&str, &str)], after: &str) -> String {
        let params: String = parameters
            .iter()
            .map(|(k, v)| {
                format!(
                    r#"<Parameter name="{}" value="{}"/>"#,
                    xml_escape(k),
                    xml_escape(v)
                )
            })
            .collect();
        format!(
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="{}" statusCallback="{}">{params}</Stream></Connect>{after}</Response>"#,
            self.stream_url(),
            self.stream_status_url()
        )
    }

    /// The TwiML served from now on.
    pub fn set_twiml(&self, document: impl Into<String>) {
        *self
            .state
            .twiml
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = document.into();
    }

    /// Requests received on `path` (`/twiml`, `/status`, `/stream-status`), in order.
    pub fn requests(&self, path: &str) -> Vec<AppRequest> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Media upgrades refused for a bad signature.
    pub fn refused_upgrades(&self) -> u32 {
        *self
            .state
            .refused_upgrades
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The next media stream the fake opened (with a valid signature).
    pub async fn accept_stream(&self, timeout: Duration) -> anyhow::Result<BotStream> {
        let mut rx = self.streams.lock().await;
        tokio::time::timeout(timeout, rx.recv())
            .await
            .context("no media stream was opened in time")?
            .context("app stopped")
    }
}

/// Escapes text for an XML attribute value.
fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn record(state: &AppState, path: &str, request: AppRequest) {
    state
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((path.to_owned(), request));
}

/// The URL the client requested, rebuilt from `Host` as an app without a proxy does.
fn requested_url(scheme: &str, headers: &HeaderMap, uri: &axum::http::Uri) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    format!("{scheme}://{host}{uri}")
}

/// Validates a webhook as the Worker must: full URL as requested + the form parameters.
fn check(
    state: &AppState,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> AppRequest {
    let url = requested_url("http", headers, uri);
    let params: Vec<(String, String)> = if method == Method::POST {
        serde_urlencoded::from_bytes(body).unwrap_or_default()
    } else {
        Vec::new()
    };
    let signature = headers
        .get("X-Twilio-Signature")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let valid = signature.as_deref().is_some_and(|s| {
        cmb_core::twilio_sig::validate_request(&state.auth_token, &url, &params, s)
    });
    AppRequest {
        url,
        method: method.to_string(),
        params,
        signature,
        valid,
    }
}

async fn twiml(
    State(state): State<Arc<AppState>>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = check(&state, &method, &uri, &headers, &body);
    let valid = request.valid;
    record(&state, "/twiml", request);
    if !valid {
        return StatusCode::FORBIDDEN.into_response();
    }
    let doc = state
        .twiml
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    ([(header::CONTENT_TYPE, "text/xml")], doc).into_response()
}

async fn webhook(
    State(state): State<Arc<AppState>>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let request = check(&state, &method, &uri, &headers, &body);
    let valid = request.valid;
    record(&state, uri.path(), request);
    if valid {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::FORBIDDEN
    }
}

async fn media(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    ws: WebSocketUpgrade,
) -> Response {
    let url = requested_url("ws", &headers, &uri);
    let valid = headers
        .get("X-Twilio-Signature")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| cmb_core::twilio_sig::validate_request(&state.auth_token, &url, &[], s));
    if !valid {
        *state
            .refused_upgrades
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += 1;
        return StatusCode::FORBIDDEN.into_response();
    }
    ws.on_upgrade(move |socket| async move {
        let (bot, pump) = BotStream::new(socket);
        if state.streams.send(bot).is_ok() {
            pump.await;
        }
    })
}

/// The bot's end of one media stream, driven by the test.
pub struct BotStream {
    incoming: mpsc::UnboundedReceiver<Incoming>,
    outgoing: mpsc::UnboundedSender<Message>,
    stream_sid: Option<String>,
    /// Inbound (callee) audio received so far, decoded from `media` payloads.
    pub inbound_audio: Vec<u8>,
    /// Every JSON message received, in order.
    pub received: Vec<Value>,
}

enum Incoming {
    Json(Value),
    Closed,
}

impl BotStream {
    fn new(socket: WebSocket) -> (Self, impl std::future::Future<Output = ()>) {
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let (mut sink, mut source) = socket.split();
        let pump = async move {
            let reader = async {
                while let Some(Ok(message)) = source.next().await {
                    match message {
                        Message::Text(text) => {
                            if let Ok(value) = serde_json::from_str(text.as_str()) {
                                let _ = in_tx.send(Incoming::Json(value));
                            }
                        }
                        Message::Close(_) => break,
                        _ => {}
                    }
                }
                let _ = in_tx.send(Incoming::Closed);
            };
            let writer = async {
                while let Some(message) = out_rx.recv().await {
                    let closing = matches!(message, Message::Close(_));
                    if sink.send(message).await.is_err() || closing {
                        break;
                    }
                }
            };
            tokio::join!(reader, writer);
        };
        (
            Self {
                incoming: in_rx,
                outgoing: out_tx,
                stream_sid: None,
                inbound_audio: Vec::new(),
                received: Vec::new(),
            },
            pump,
        )
    }

    /// The `streamSid` from `start` (after [`BotStream::recv_event`] saw it).
    pub fn stream_sid(&self) -> &str {
        self.stream_sid.as_deref().unwrap_or("")
    }

    /// Next message; `None` once the fake closed the socket or after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Value> {
        match tokio::time::timeout(timeout, self.incoming.recv()).await {
            Ok(Some(Incoming::Json(value))) => {
                if value["event"] == "start" {
                    self.stream_sid = value["streamSid"].as_str().map(str::to_owned);
                }
                if value["event"] == "media" {
                    if let Some(audio) = value["media"]["payload"]
                        .as_str()
                        .and_then(|p| base64::engine::general_purpose::STANDARD.decode(p).ok())
                    {
                        self.inbound_audio.extend_from_slice(&audio);
                    }
                }
                self.received.push(value.clone());
                Some(value)
            }
            _ => None,
        }
    }

    /// Skips messages until one with `event` arrives.
    pub async fn recv_event(&mut self, event: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                Some(v) if v["event"] == event => return Ok(v),
                Some(_) => {}
                None => anyhow::bail!(
                    "no {event:?} message within {timeout:?} (socket closed or timed out)"
                ),
            }
        }
    }

    /// Waits until the fake closes the socket; returns the messages received meanwhile.
    pub async fn drain_until_closed(&mut self, timeout: Duration) -> anyhow::Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.incoming.recv()).await {
                Err(_) => anyhow::bail!("socket still open after {timeout:?}"),
                Ok(None) | Ok(Some(Incoming::Closed)) => return Ok(seen),
                Ok(Some(Incoming::Json(v))) => {
                    self.received.push(v.clone());
                    seen.push(v);
                }
            }
        }
    }

    /// Sends a JSON text frame.
    pub fn send_json(&self, value: &Value) {
        let _ = self.outgoing.send(Message::Text(value.to_string().into()));
    }

    /// Sends outbound audio as one `media` message.
    pub fn send_media(&self, ulaw: &[u8]) {
        let payload = base64::engine::general_purpose::STANDARD.encode(ulaw);
        self.send_json(&json!({"event": "media", "streamSid": self.stream_sid(), "media": {"payload": payload}}));
    }

    /// Sends a `mark`.
    pub fn send_mark(&self, name: &str) {
        self.send_json(
            &json!({"event": "mark", "streamSid": self.stream_sid(), "mark": {"name": name}}),
        );
    }

    /// Sends a `clear`.
    pub fn send_clear(&self) {
        self.send_json(&json!({"event": "clear", "streamSid": self.stream_sid()}));
    }

    /// Sends a binary frame (which Twilio answers with warning 31950).
    pub fn send_binary(&self, bytes: &[u8]) {
        let _ = self.outgoing.send(Message::Binary(bytes.to_vec().into()));
    }

    /// Closes the socket from the bot's side (Twilio then runs the next verb).
    pub fn close(&self) {
        let _ = self.outgoing.send(Message::Close(None));
    }
}
