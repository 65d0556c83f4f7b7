//! Fault injection shared by every fake provider.
//!
//! Owns the [`Faults`] knobs, the live [`FaultSwitch`] each fake consults per request, per
//! message and per connection, the HTTP middleware that applies the request-level knobs,
//! and the `/__faults` control routes that let tests in other processes flip them.
//! It must not know any provider's wire format: the provider-shaped error body comes from
//! the fake as an [`ErrorResponder`].
//!
//! Semantics of each knob:
//! - `latency_ms` + `jitter_ms`: wait before handling every request (WebSocket handshakes
//!   included) and before every message a fake sends on a stream. Jitter is uniform in
//!   `0..=jitter_ms`, drawn from a ChaCha8 generator seeded by the switch's seed and
//!   re-seeded at every `set`/`reset`, so a given `Faults` value replays the same delays.
//! - `first_byte_delay_ms`: extra wait before the first byte of content: the response of
//!   a plain HTTP request, the first event of an SSE stream, the first message a fake
//!   sends on a WebSocket (not the 101 handshake).
//! - `drop_after_ms` / `drop_after_messages`: streams only (WebSocket, SSE). The fake tears
//!   the connection down without a close frame or terminating chunk once that much time
//!   has passed since the connection opened, or before sending the message past that
//!   count. Changes apply to connections already open.
//! - `refuse_connections`: every request (and WebSocket upgrade) is answered 503 at once
//!   with the provider's error body. A real refusal is a TCP RST, but axum cannot un-accept
//!   a connection, so a 503 before any work is the closest a client can observe.
//! - `http_status`: every request is answered with that status and the provider's error
//!   body (after `refuse_connections`, before any latency).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

/// Path of the control routes every fake serves.
pub const CONTROL_PATH: &str = "/__faults";

/// Seed used by [`FaultSwitch::new`].
pub const DEFAULT_SEED: u64 = 0x00C0_FFEE;

/// The fault knobs; all off by default. Missing JSON fields mean "off".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    pub latency_ms: u64,
    pub jitter_ms: u64,
    pub first_byte_delay_ms: u64,
    pub drop_after_ms: Option<u64>,
    pub drop_after_messages: Option<u64>,
    pub refuse_connections: bool,
    /// Answer every request with this status + the provider's error body.
    pub http_status: Option<u16>,
}

/// What the request-level knobs say about a request before it is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// `refuse_connections`: answer 503 immediately.
    Refuse,
    /// `http_status`: answer with this status and the provider's error body.
    Status(StatusCode),
}

/// Builds the provider's error response for a status (e.g. Cerebras' `{"error":{…}}`).
pub type ErrorResponder = Arc<dyn Fn(StatusCode) -> Response + Send + Sync>;

/// Live, shared fault settings of one fake. Cheap to clone; all clones see every change.
#[derive(Clone)]
pub struct FaultSwitch {
    tx: Arc<watch::Sender<Faults>>,
    rng: Arc<Mutex<ChaCha8Rng>>,
    seed: u64,
}

impl Default for FaultSwitch {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for FaultSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultSwitch")
            .field("faults", &*self.tx.borrow())
            .field("seed", &self.seed)
            .finish()
    }
}

impl FaultSwitch {
    /// A switch with every fault off and the default jitter seed.
    pub fn new() -> Self {
        Self::with_seed(DEFAULT_SEED)
    }

    /// A switch with every fault off whose jitter sequence is fixed by `seed`.
    pub fn with_seed(seed: u64) -> Self {
        let (tx, _) = watch::channel(Faults::default());
        Self {
            tx: Arc::new(tx),
            rng: Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(seed))),
            seed,
        }
    }

    /// The current settings.
    pub fn get(&self) -> Faults {
        self.tx.borrow().clone()
    }

    /// Replaces the settings and restarts the jitter sequence from the seed.
    pub fn set(&self, faults: Faults) {
        tracing::info!(?faults, "faults set");
        *self.rng.lock().unwrap_or_else(PoisonError::into_inner) =
            ChaCha8Rng::seed_from_u64(self.seed);
        self.tx.send_replace(faults);
    }

    /// Edits the settings in place (also restarts the jitter sequence).
    pub fn update(&self, edit: impl FnOnce(&mut Faults)) {
        let mut faults = self.get();
        edit(&mut faults);
        self.set(faults);
    }

    /// Turns every fault off.
    pub fn reset(&self) {
        self.set(Faults::default());
    }

    /// A receiver that wakes on every change (for long-lived connections).
    pub fn subscribe(&self) -> watch::Receiver<Faults> {
        self.tx.subscribe()
    }

    /// Draws the next per-request/per-message delay: `latency_ms` plus a jitter draw.
    pub fn next_delay(&self) -> Duration {
        let faults = self.get();
        let jitter = if faults.jitter_ms == 0 {
            0
        } else {
            self.rng
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .gen_range(0..=faults.jitter_ms)
        };
        Duration::from_millis(faults.latency_ms.saturating_add(jitter))
    }

    /// Whether a request must be answered by the fault instead of the fake.
    pub fn gate(&self) -> Option<Gate> {
        let faults = self.get();
        if faults.refuse_connections {
            return Some(Gate::Refuse);
        }
        faults.http_status.map(|code| {
            // The control route validates codes; a bad programmatic one degrades to 500.
            Gate::Status(StatusCode::from_u16(code).unwrap_or_else(|_| {
                tracing::warn!(code, "invalid http_status fault, answering 500");
                StatusCode::INTERNAL_SERVER_ERROR
            }))
        })
    }

    /// Per-connection fault state for a stream opened now.
    pub fn connection(&self) -> ConnectionFaults {
        ConnectionFaults {
            switch: self.clone(),
            opened: Instant::now(),
            sent: 0,
        }
    }
}

/// Fault state of one streaming connection (WebSocket session or SSE body).
pub struct ConnectionFaults {
    switch: FaultSwitch,
    opened: Instant,
    sent: u64,
}

impl ConnectionFaults {
    /// Messages this connection has been allowed to send so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Waits what the faults ask before the next outbound message (latency, jitter, and the
    /// first-byte delay before the first one). Returns `false` when `drop_after_messages`
    /// is spent: the caller must then drop the connection instead of sending.
    pub async fn before_send(&mut self) -> bool {
        let faults = self.switch.get();
        if faults
            .drop_after_messages
            .is_some_and(|max| self.sent >= max)
        {
            return false;
        }
        let mut delay = self.switch.next_delay();
        if self.sent == 0 {
            delay += Duration::from_millis(faults.first_byte_delay_ms);
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.sent += 1;
        true
    }

    /// A timer that fires when `drop_after_ms` has elapsed since this connection opened.
    pub fn drop_timer(&self) -> DropTimer {
        DropTimer {
            rx: self.switch.subscribe(),
            opened: self.opened,
        }
    }
}

/// Fires when the connection it was made for must be dropped (`drop_after_ms`). Owned
/// separately from [`ConnectionFaults`] so a handler can `select!` on it while sending.
pub struct DropTimer {
    rx: watch::Receiver<Faults>,
    opened: Instant,
}

impl DropTimer {
    /// Resolves once `drop_after_ms` has passed since the connection opened; re-reads the
    /// setting on every change, and never resolves while it is unset.
    pub async fn wait(&mut self) {
        loop {
            let deadline = self
                .rx
                .borrow_and_update()
                .drop_after_ms
                .map(|ms| self.opened + Duration::from_millis(ms));
            match deadline {
                Some(deadline) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(deadline) => return,
                        changed = self.rx.changed() => {
                            if changed.is_err() {
                                // Switch gone: the deadline we know is final.
                                tokio::time::sleep_until(deadline).await;
                                return;
                            }
                        }
                    }
                }
                None => {
                    if self.rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }
}

/// Wraps a fake's provider routes with the request-level faults and adds the control
/// routes (which are never subject to faults, so a test can always turn them off).
pub fn wrap(app: Router, switch: FaultSwitch, error: ErrorResponder) -> Router {
    let gated = app.layer(axum::middleware::from_fn_with_state(
        (switch.clone(), error),
        apply_request_faults,
    ));
    gated.merge(control_router(switch))
}

/// `GET` (read), `POST` (set, JSON body = [`Faults`]) and `DELETE` (reset) on `/__faults`.
pub fn control_router(switch: FaultSwitch) -> Router {
    Router::new()
        .route(
            CONTROL_PATH,
            get(read_faults).post(set_faults).delete(reset_faults),
        )
        .with_state(switch)
}

async fn read_faults(State(switch): State<FaultSwitch>) -> Json<Faults> {
    Json(switch.get())
}

async fn set_faults(State(switch): State<FaultSwitch>, Json(faults): Json<Faults>) -> Response {
    if let Some(code) = faults.http_status {
        if !(100..=599).contains(&code) || StatusCode::from_u16(code).is_err() {
            let body = format!("http_status {code} is not an HTTP status code");
            return (StatusCode::BAD_REQUEST, body).into_response();
        }
    }
    switch.set(faults.clone());
    Json(faults).into_response()
}

async fn reset_faults(State(switch): State<FaultSwitch>) -> StatusCode {
    switch.reset();
    StatusCode::NO_CONTENT
}

async fn apply_request_faults(
    State((switch, error)): State<(FaultSwitch, ErrorResponder)>,
    request: Request,
    next: Next,
) -> Response {
    match switch.gate() {
        Some(Gate::Refuse) => {
            tracing::debug!(path = %request.uri().path(), "fault: refusing request");
            return error(StatusCode::SERVICE_UNAVAILABLE);
        }
        Some(Gate::Status(status)) => {
            tracing::debug!(path = %request.uri().path(), %status, "fault: forced status");
            return error(status);
        }
        None => {}
    }
    let delay = switch.next_delay();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let response = next.run(request).await;
    // Streams (WebSocket 101, SSE) apply the first-byte delay to their first message.
    let is_stream = response.status() == StatusCode::SWITCHING_PROTOCOLS
        || response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
    let first_byte = switch.get().first_byte_delay_ms;
    if !is_stream && first_byte > 0 {
        tokio::time::sleep(Duration::from_millis(first_byte)).await;
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt as _;

    fn plain_error() -> ErrorResponder {
        Arc::new(|status: StatusCode| {
            (status, format!("fake error {}", status.as_u16())).into_response()
        })
    }

    fn app(switch: &FaultSwitch) -> Router {
        wrap(
            Router::new().route("/hello", get(|| async { "hi" })),
            switch.clone(),
            plain_error(),
        )
    }

    async fn call(app: Router, method: &str, uri: &str, body: &str) -> (StatusCode, String) {
        let request = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    /// Missing JSON fields default to "off"; unknown fields are rejected (typos must not be silent).
    #[test]
    fn faults_json_defaults_and_strictness() {
        let f: Faults = serde_json::from_str(r#"{"latency_ms":5}"#).unwrap();
        assert_eq!(
            f,
            Faults {
                latency_ms: 5,
                ..Faults::default()
            }
        );
        assert!(serde_json::from_str::<Faults>(r#"{"latency":5}"#).is_err());
    }

    /// The same seed and settings give the same jitter sequence, within 0..=jitter_ms.
    #[test]
    fn jitter_is_deterministic_and_bounded() {
        let faults = Faults {
            latency_ms: 10,
            jitter_ms: 50,
            ..Faults::default()
        };
        let draw = |seed| {
            let s = FaultSwitch::with_seed(seed);
            s.set(faults.clone());
            (0..32).map(|_| s.next_delay()).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
        assert!(a
            .iter()
            .all(|d| (10..=60).contains(&(d.as_millis() as u64))));
        // Not a constant: jitter really varies.
        assert!(a.iter().any(|d| *d != a[0]));
    }

    /// `set` restarts the jitter sequence so a given Faults value replays identically.
    #[test]
    fn set_reseeds_jitter() {
        let s = FaultSwitch::new();
        let f = Faults {
            jitter_ms: 1000,
            ..Faults::default()
        };
        s.set(f.clone());
        let first: Vec<_> = (0..5).map(|_| s.next_delay()).collect();
        s.set(f);
        let again: Vec<_> = (0..5).map(|_| s.next_delay()).collect();
        assert_eq!(first, again);
    }

    /// refuse wins over http_status; a bad programmatic status degrades to 500.
    #[test]
    fn gate_order() {
        let s = FaultSwitch::new();
        assert_eq!(s.gate(), None);
        s.update(|f| f.http_status = Some(429));
        assert_eq!(s.gate(), Some(Gate::Status(StatusCode::TOO_MANY_REQUESTS)));
        s.update(|f| f.refuse_connections = true);
        assert_eq!(s.gate(), Some(Gate::Refuse));
        s.set(Faults {
            http_status: Some(42),
            ..Faults::default()
        });
        assert_eq!(
            s.gate(),
            Some(Gate::Status(StatusCode::INTERNAL_SERVER_ERROR))
        );
    }

    /// The message budget lets exactly N messages through, then asks for a drop.
    #[tokio::test(start_paused = true)]
    async fn message_budget_then_drop() {
        let s = FaultSwitch::new();
        s.update(|f| f.drop_after_messages = Some(2));
        let mut conn = s.connection();
        assert!(conn.before_send().await);
        assert!(conn.before_send().await);
        assert!(!conn.before_send().await);
        assert_eq!(conn.sent(), 2);
    }

    /// The first message waits first_byte + latency, later ones only latency.
    #[tokio::test(start_paused = true)]
    async fn first_byte_delay_applies_once() {
        let s = FaultSwitch::new();
        s.set(Faults {
            latency_ms: 10,
            first_byte_delay_ms: 300,
            ..Faults::default()
        });
        let mut conn = s.connection();
        let t0 = Instant::now();
        assert!(conn.before_send().await);
        assert_eq!(t0.elapsed(), Duration::from_millis(310));
        let t1 = Instant::now();
        assert!(conn.before_send().await);
        assert_eq!(t1.elapsed(), Duration::from_millis(10));
    }

    /// The drop timer fires at open + drop_after_ms, and picks up a setting made later.
    #[tokio::test(start_paused = true)]
    async fn drop_timer_follows_live_settings() {
        let s = FaultSwitch::new();
        let conn = s.connection();
        let mut timer = conn.drop_timer();
        let t0 = Instant::now();
        let setter = {
            let s = s.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                s.update(|f| f.drop_after_ms = Some(250));
            })
        };
        timer.wait().await;
        assert_eq!(t0.elapsed(), Duration::from_millis(250));
        setter.await.unwrap();
    }

    /// The drop timer never fires while drop_after_ms is unset.
    #[tokio::test(start_paused = true)]
    async fn drop_timer_idle_without_setting() {
        let s = FaultSwitch::new();
        let mut timer = s.connection().drop_timer();
        let fired = tokio::time::timeout(Duration::from_secs(3600), timer.wait()).await;
        assert!(fired.is_err());
    }

    /// POST sets, GET reads, DELETE resets; invalid codes are refused with 400.
    #[tokio::test]
    async fn control_routes() {
        let s = FaultSwitch::new();
        let (st, _) = call(app(&s), "POST", CONTROL_PATH, r#"{"http_status":503}"#).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(s.get().http_status, Some(503));
        let (st, body) = call(app(&s), "GET", CONTROL_PATH, "").await;
        assert_eq!(st, StatusCode::OK);
        assert!(body.contains(r#""http_status":503"#), "{body}");
        let (st, _) = call(app(&s), "POST", CONTROL_PATH, r#"{"http_status":1000}"#).await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        assert_eq!(s.get().http_status, Some(503));
        let (st, _) = call(app(&s), "DELETE", CONTROL_PATH, "").await;
        assert_eq!(st, StatusCode::NO_CONTENT);
        assert_eq!(s.get(), Faults::default());
    }

    /// Request faults use the provider's error body; the control routes stay reachable.
    #[tokio::test]
    async fn middleware_gates_requests_but_not_control() {
        let s = FaultSwitch::new();
        assert_eq!(
            call(app(&s), "GET", "/hello", "").await,
            (StatusCode::OK, "hi".into())
        );
        s.update(|f| f.http_status = Some(429));
        assert_eq!(
            call(app(&s), "GET", "/hello", "").await,
            (StatusCode::TOO_MANY_REQUESTS, "fake error 429".into())
        );
        s.update(|f| f.refuse_connections = true);
        assert_eq!(
            call(app(&s), "GET", "/hello", "").await,
            (StatusCode::SERVICE_UNAVAILABLE, "fake error 503".into())
        );
        let (st, _) = call(app(&s), "GET", CONTROL_PATH, "").await;
        assert_eq!(st, StatusCode::OK);
    }

    /// Plain requests wait latency + first-byte delay before the response.
    #[tokio::test(start_paused = true)]
    async fn middleware_delays_plain_requests() {
        let s = FaultSwitch::new();
        s.set(Faults {
            latency_ms: 40,
            first_byte_delay_ms: 200,
            ..Faults::default()
        });
        let t0 = Instant::now();
        let (st, _) = call(app(&s), "GET", "/hello", "").await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(t0.elapsed(), Duration::from_millis(240));
    }
}
