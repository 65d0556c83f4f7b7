//! HTTP surface and process lifecycle: `app(state)` (routes `/health`, `/metrics`,
//! `/twilio`, and the DO's `PUT /internal/calls/{id}/greeting`) and `run(listener, config, signals)`
//! (serving, then draining on SIGTERM: `drain.rs` decides).
//!
//! Owns the upgrade gate: config present, Twilio signature valid, capacity available. It must not
//! hold per-call logic; an upgraded socket is handed to `call::serve` and its errors are
//! logged there, never reaching the accept loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::extract::Path;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::json;
use std::future::IntoFuture as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
pub use crate::state::{AppState, CallSlot};

/// The crate version reported on `/health`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Largest Twilio message we accept: a 20 ms media frame is ~400 bytes of JSON, and the
/// `start` message with custom parameters a few KB. Anything bigger is not Twilio.
const TWILIO_MAX_MESSAGE: usize = 64 * 1024;

/// The relay's routes.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/twilio", get(twilio))
        .route("/internal/calls/{call_id}/greeting", put(prepare_greeting))
        .with_state(state)
}

/// Serves `app` on `listener` until the relay has drained (`drain.rs`): the first item of
/// `signals` (SIGTERM or SIGINT) starts draining, calls in progress go on until they end
/// or `RELAY_DRAIN_SECS` runs out, then `run` returns `Ok`. A second signal returns at
/// once with an error naming the calls abandoned. `signals` ending means no more signals.
pub async fn run(
    listener: TcpListener,
    config: Result<Config, ConfigError>,
    mut signals: tokio::sync::mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    let grace = config.as_ref().map_or(Duration::ZERO, |c| c.shutdown_grace);
    let state = AppState::new(config);
    state.log_config_problems();
    // Audio goes out as small paced writes (a burst is written in 1 KiB pieces): with
    // Nagle, each piece after the first would wait for Twilio's ACK of the one before,
    // up to a delayed-ACK timeout (40 ms on Linux). The provider sockets the relay opens
    // disable it too (`ws::connect`).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY on a Twilio socket");
        }
    });
    // The listener stays open while draining, so `/health` can say so.
    let stop_serving = CancellationToken::new();
    let serve = axum::serve(listener, app(state.clone()))
        .with_graceful_shutdown(stop_serving.clone().cancelled_owned());
    let mut server = tokio::spawn(serve.into_future());

    let outcome = tokio::select! {
        outcome = drain(&state, grace, &mut signals) => outcome,
        served = &mut server => Err(match served {
            Ok(Ok(())) => anyhow::anyhow!("the HTTP server stopped by itself"),
            Ok(Err(e)) => anyhow::Error::new(e).context("the HTTP server failed"),
            Err(e) => anyhow::Error::new(e).context("the HTTP server task failed"),
        }),
    };
    stop_serving.cancel();
    if !server.is_finished()
        && tokio::time::timeout(crate::drain::CLOSE_BOUND, &mut server)
            .await
            .is_err()
    {
        tracing::warn!("HTTP connections still open at exit; dropping them");
        server.abort();
    }
    outcome
}

/// The shell of `drain::Drain`: waits for the first signal, drains, and closes what is
/// left at the deadline.
async fn drain(
    state: &AppState,
    grace: Duration,
    signals: &mut tokio::sync::mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    use crate::drain::{Drain, OnSignal, Step};

    let mut machine = Drain::new(grace);
    if signals.recv().await.is_none() {
        // No signal can come any more: serve until the process is killed.
        std::future::pending::<()>().await;
    }
    if let OnSignal::ExitNow = machine.signal(Instant::now()) {
        anyhow::bail!("shutdown signal while already draining");
    }
    state.start_draining();
    let tracker = state.tracker();
    // Closed: `wait` resolves once the calls in it have ended (none can join while draining).
    tracker.close();
    tracing::info!(
        active_calls = tracker.len(),
        drain_secs = grace.as_secs(),
        "shutdown requested: draining (new calls refused, calls in progress go on)"
    );
    let mut signals_open = true;
    loop {
        match machine.step(Instant::now(), tracker.len()) {
            Step::AllCallsEnded => {
                tracing::info!("drained: every call has ended");
                return Ok(());
            }
            Step::DeadlineReached { open } => {
                tracing::warn!(
                    open,
                    "drain deadline (RELAY_DRAIN_SECS) reached: closing the calls still open"
                );
                state.shutdown_token().cancel();
                if tokio::time::timeout(crate::drain::CLOSE_BOUND, tracker.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        remaining = tracker.len(),
                        "calls did not close in time; abandoning them"
                    );
                }
                return Ok(());
            }
            Step::Wait { until } => {
                tokio::select! {
                    () = tracker.wait() => {}
                    () = tokio::time::sleep_until(until.into()) => {}
                    signal = signals.recv(), if signals_open => match signal {
                        None => signals_open = false,
                        Some(()) => {
                            if let OnSignal::ExitNow = machine.signal(Instant::now()) {
                                state.shutdown_token().cancel();
                                anyhow::bail!(
                                    "second shutdown signal: exiting at once, abandoning {} call(s)",
                                    tracker.len()
                                );
                            }
                        }
                    },
                }
            }
        }
    }
}

/// 200 `ok` while the relay takes calls; 503 when it cannot take one more, so a load
/// balancer steers new calls elsewhere: `unhealthy` (configuration), `draining`
/// (shutting down: calls in progress go on) or `full` (at `RELAY_MAX_CALLS`).
async fn health(State(state): State<AppState>) -> Response {
    let active = state.active_calls();
    let config = match state.config() {
        Ok(c) => c,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({
                    "status": "unhealthy",
                    "version": VERSION,
                    "checks": {"config": {"ok": false, "problems": e.problems}},
                })),
            )
                .into_response();
        }
    };
    let status = if state.is_draining() {
        "draining"
    } else if active >= config.max_calls {
        "full"
    } else {
        "ok"
    };
    let code = if status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": status,
        "version": VERSION,
        "checks": {"config": {"ok": true}, "active_calls": active, "max_calls": config.max_calls},
    });
    (code, Json(body)).into_response()
}

/// The call's DO, right after Twilio accepted the dial: synthesize the greeting now, so it
/// plays the moment the callee answers (`greeting.rs`). Authenticated with `RELAY_SECRET`;
/// 202 once staged (the synthesis itself runs in the background).
async fn prepare_greeting(
    State(state): State<AppState>,
    Path(call_id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Ok(config) = state.config() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy",
            "The relay's configuration is invalid; see /health.",
        );
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !cmb_core::password::hashes_equal(
        presented.as_bytes(),
        config.relay_secret.expose().as_bytes(),
    ) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Invalid relay credentials.",
        );
    }
    if state.is_draining() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "The relay is shutting down and takes no new calls.",
        );
    }
    if !crate::greeting::call_id_ok(&call_id) {
        return refuse(StatusCode::BAD_REQUEST, "invalid_call_id", "Bad call id.");
    }
    let req: crate::greeting::PrepareRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                &format!("Bad greeting request: {e}"),
            )
        }
    };
    if let Some(problem) = req.problem() {
        return refuse(StatusCode::BAD_REQUEST, "invalid_body", problem);
    }
    let Some(base) = crate::greeting::http_base(&config.elevenlabs_url) else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy",
            "ELEVENLABS_URL has no HTTP form.",
        );
    };
    let tts = crate::greeting::TtsTarget {
        base,
        api_key: config.elevenlabs_api_key.clone(),
    };
    match state
        .greetings()
        .prepare(&call_id, req, tts, state.metrics())
    {
        Ok(()) => (StatusCode::ACCEPTED, Json(json!({"status": "accepted"}))).into_response(),
        Err(crate::greeting::Refused::Full) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "full",
            "Too many greetings are waiting for their calls.",
        ),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics().encode(),
    )
        .into_response()
}

/// The Twilio Media Streams upgrade. Everything checkable before the upgrade is checked
/// here, so a refused stream never costs a WebSocket.
async fn twilio(
    State(state): State<AppState>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let config = match state.config() {
        Ok(c) => Arc::clone(c),
        Err(_) => {
            tracing::error!("refusing Twilio stream: relay configuration is invalid");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "config_invalid",
                "relay configuration is invalid",
            );
        }
    };
    if state.is_draining() {
        tracing::warn!("refusing Twilio stream: relay is draining");
        state.metrics().call_ended("rejected_draining");
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "The relay is shutting down and takes no new calls.",
        );
    }
    let signature = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok());
    let signed = signature.is_some_and(|sig| {
        cmb_core::twilio_sig::validate_request(
            config.twilio_auth_token.expose(),
            &config.public_url,
            &[],
            sig,
        )
    });
    if !signed {
        tracing::warn!(
            present = signature.is_some(),
            "refusing Twilio stream: bad X-Twilio-Signature"
        );
        state.metrics().call_ended("rejected_signature");
        return refuse(
            StatusCode::FORBIDDEN,
            "bad_signature",
            "invalid X-Twilio-Signature",
        );
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    // Capacity is taken before the upgrade so concurrent upgrades cannot overshoot it.
    let slot = state.try_acquire_call(config.max_calls);
    ws.max_message_size(TWILIO_MAX_MESSAGE)
        .max_frame_size(TWILIO_MAX_MESSAGE)
        // Small buffers keep a call small: inbound frames are ~400 bytes (the read buffer
        // is allocated eagerly; the default is 128 KiB). A pacing burst (~10 frames of
        // ~330 bytes) is written in ~1 KiB pieces: the write buffer keeps its peak size
        // for the whole call, so a few more syscalls per burst buy ~3 KiB per call.
        .read_buffer_size(crate::ws::READ_BUFFER)
        .write_buffer_size(1024)
        .on_upgrade(move |mut socket| async move {
            let Some(slot) = slot else {
                tracing::warn!(
                    max_calls = config.max_calls,
                    "refusing Twilio stream: relay at capacity"
                );
                state.metrics().call_ended("rejected_capacity");
                // 1013 "try again later": a clean close, so Twilio ends the <Connect> promptly.
                let close = CloseFrame {
                    code: 1013,
                    reason: "relay at capacity".into(),
                };
                let _ = socket.send(Message::Close(Some(close))).await;
                return;
            };
            let spawner = state.clone();
            spawner.spawn_call(crate::call::serve(state, config, socket, slot));
        })
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use std::collections::HashMap;
    use tower::ServiceExt;

    fn good_config() -> Config {
        let vars = HashMap::from([
            ("RELAY_SECRET", "0123456789abcdef0123456789abcdef"),
            ("RELAY_PUBLIC_URL", "wss://example.com/media"),
            ("TWILIO_AUTH_TOKEN", "12345"),
            ("WORKER_URL", "http://127.0.0.1:8787"),
            ("DEEPGRAM_API_KEY", "dg"),
            ("ELEVENLABS_API_KEY", "xi"),
            // Loopback, where nothing listens: no test reaches a real provider.
            ("ELEVENLABS_URL", "ws://127.0.0.1:9"),
            ("RELAY_MAX_CALLS", "2"),
        ]);
        Config::from_lookup(|k| vars.get(k).map(|v| (*v).to_owned())).expect("valid test config")
    }

    async fn get_json(app: Router, uri: &str) -> (StatusCode, serde_json::Value) {
        send_json(app, Request::get(uri).body(Body::empty()).expect("request")).await
    }

    async fn send_json(app: Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
        let res = app.oneshot(req).await.expect("infallible");
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, serde_json::from_slice(&bytes).expect("json body"))
    }

    /// A good config gives 200 with status ok, the version and the active call count.
    #[tokio::test]
    async fn health_ok_with_good_config() {
        let state = AppState::new(Ok(good_config()));
        let _slot = state.try_acquire_call(2).expect("slot");
        let (status, body) = get_json(app(state), "/health").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({"status": "ok", "version": VERSION, "checks": {"config": {"ok": true}, "active_calls": 1, "max_calls": 2}})
        );
    }

    /// At `RELAY_MAX_CALLS` the relay reports itself full (503) so a load balancer sends
    /// new calls elsewhere; a freed slot makes it ok again, and shutting down is draining.
    #[tokio::test]
    async fn health_is_503_when_full_or_draining() {
        let state = AppState::new(Ok(good_config()));
        let a = state.try_acquire_call(2).expect("slot");
        let _b = state.try_acquire_call(2).expect("slot");
        let (status, body) = get_json(app(state.clone()), "/health").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "full");
        assert_eq!(body["checks"]["active_calls"], 2);
        drop(a);
        let (status, body) = get_json(app(state.clone()), "/health").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "ok");
        state.start_draining();
        let (status, body) = get_json(app(state), "/health").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "draining");
    }

    /// A bad config gives 503 naming every problem.
    #[tokio::test]
    async fn health_names_config_problems() {
        let err = Config::from_lookup(|k| (k == "RELAY_SECRET").then(|| "short".to_owned()))
            .expect_err("invalid");
        let (status, body) = get_json(app(AppState::new(Err(err))), "/health").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "unhealthy");
        assert_eq!(body["checks"]["config"]["ok"], false);
        let problems = body["checks"]["config"]["problems"]
            .as_array()
            .expect("array");
        let names: Vec<&str> = problems.iter().filter_map(|p| p["name"].as_str()).collect();
        assert_eq!(
            names,
            [
                "RELAY_SECRET",
                "RELAY_PUBLIC_URL",
                "TWILIO_AUTH_TOKEN",
                "WORKER_URL",
                "DEEPGRAM_API_KEY",
                "ELEVENLABS_API_KEY"
            ]
        );
        assert_eq!(
            problems[3],
            json!({"name": "WORKER_URL", "problem": "missing"})
        );
    }

    /// `/metrics` serves the text exposition with the relay's metrics in it.
    #[tokio::test]
    async fn metrics_are_served() {
        let state = AppState::new(Ok(good_config()));
        state.metrics().frames_out.inc_by(3);
        let res = app(state)
            .oneshot(
                Request::get("/metrics")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("infallible");
        assert_eq!(res.status(), StatusCode::OK);
        let ct = res
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .expect("body");
        let text = String::from_utf8(bytes.to_vec()).expect("utf8");
        assert!(text.contains("relay_frames_out_total 3"), "{text}");
        assert!(text.contains("relay_active_calls 0"), "{text}");
    }

    fn upgrade_request(signature: Option<&str>) -> Request<Body> {
        let mut b = Request::get("/twilio")
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==");
        if let Some(sig) = signature {
            b = b.header("x-twilio-signature", sig);
        }
        b.body(Body::empty()).expect("request")
    }

    /// The upgrade is refused with 403 without a valid signature over RELAY_PUBLIC_URL.
    #[tokio::test]
    async fn twilio_upgrade_requires_signature() {
        let state = AppState::new(Ok(good_config()));
        for sig in [None, Some("AAAAAAAAAAAAAAAAAAAAAAAAAAA=")] {
            let res = app(state.clone())
                .oneshot(upgrade_request(sig))
                .await
                .expect("infallible");
            assert_eq!(res.status(), StatusCode::FORBIDDEN, "signature {sig:?}");
        }
    }

    /// With a bad config the upgrade is refused even when correctly signed.
    #[tokio::test]
    async fn twilio_refused_with_bad_config() {
        let err = Config::from_lookup(|_| None).expect_err("invalid");
        let res = app(AppState::new(Err(err)))
            .oneshot(upgrade_request(Some("7PR3qMkpDyEJtMrVOY/LDyNq8J8=")))
            .await
            .expect("infallible");
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    /// Call slots stop at the maximum and free themselves on drop.
    #[test]
    fn call_slots_are_bounded() {
        let state = AppState::new(Ok(good_config()));
        let a = state.try_acquire_call(2).expect("first");
        let _b = state.try_acquire_call(2).expect("second");
        assert!(state.try_acquire_call(2).is_none());
        drop(a);
        assert_eq!(state.active_calls(), 1);
        assert!(state.try_acquire_call(2).is_some());
    }

    async fn put_greeting(
        state: AppState,
        id: &str,
        auth: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let req = Request::put(format!("/internal/calls/{id}/greeting"))
            .header("authorization", auth)
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .expect("request");
        send_json(app(state), req).await
    }

    /// The DO's greeting request needs the relay secret and a valid body; a bad one is a
    /// JSON error and stages nothing.
    #[tokio::test]
    async fn greeting_route_checks_secret_and_body() {
        let state = AppState::new(Ok(good_config()));
        let good = r#"{"voice_id":"v1","voice_settings":{"stability":0.5,"similarity_boost":0.75,"style":0.0,"speed":1.0,"use_speaker_boost":true},"text":"Hi!"}"#;
        let secret = "Bearer 0123456789abcdef0123456789abcdef";
        let (status, body) = put_greeting(state.clone(), "c1", "Bearer wrong", good).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"]["code"], "unauthorized");
        let (status, body) = put_greeting(state.clone(), "c1", secret, r#"{"text":"Hi!"}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "invalid_body");
        let empty = good.replace(r#""Hi!""#, r#""  ""#);
        let (status, _) = put_greeting(state.clone(), "c1", secret, &empty).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, body) = put_greeting(state.clone(), "a.b", secret, good).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "invalid_call_id");
        assert!(
            state.greetings().take("c1", state.metrics()).is_none(),
            "nothing staged by refused requests"
        );
        // Nothing listens at the test config's ElevenLabs URL; the request is still staged
        // (the synthesis fails in the background and the call falls back to the socket).
        let (status, body) = put_greeting(state.clone(), "c1", secret, good).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(body["status"], "accepted");
    }
}
