//! Load for the media relay, measured from the outside: a fake control peer that speaks
//! the relay <-> CallSession channel in place of the Worker, and simulated Twilio Media
//! Streams clients that talk to any relay URL.
//!
//! Each client streams 20 ms μ-law frames in real time — silence, with a tone-coded
//! utterance every few seconds (so the fake Deepgram produces real turns) — and records
//! when its utterance ended and when the persona's first audio frame came back. The
//! control peer answers every `user_turn` at once with a short reply, so what is measured
//! is the relay's pipeline plus the fakes' own (zero added) latency.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message as AxMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use cmb_core::channel::{self, DoToRelay, Envelope, RelayToDo, SttOptions, VoiceSettings};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::audio;

/// What the fake control peer says back to every user turn: a fake LLM at zero latency,
/// so the benchmark measures the relay, not a model.
pub const REPLY: &str = "Sure, let's do that.";

/// Shared state of the control peer.
#[derive(Clone)]
pub struct ControlPeer {
    secret: Arc<String>,
    pub turns_answered: Arc<AtomicU64>,
}

impl ControlPeer {
    pub fn new(secret: &str) -> Self {
        Self {
            secret: Arc::new(secret.to_string()),
            turns_answered: Arc::new(AtomicU64::new(0)),
        }
    }

    /// `GET /internal/calls/{id}/session`, as the Worker serves it, and
    /// `GET /internal/calls/{id}/stream-token`, which mints what the Worker would put in
    /// the TwiML's `<Parameter>`s, so any load generator can start valid streams.
    pub fn router(self) -> Router {
        Router::new()
            .route("/internal/calls/{id}/session", get(session))
            .route("/internal/calls/{id}/stream-token", get(stream_token))
            .with_state(self)
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let expected = format!("Bearer {}", self.secret);
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == expected)
    }
}

/// How long a minted stream token stays valid.
const TOKEN_TTL_SECS: i64 = 300;

/// A fresh single-use stream token for `call_id` (what the Worker mints per call).
pub fn mint_stream_token(secret: &str, call_id: &str) -> (String, i64) {
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + TOKEN_TTL_SECS;
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    (
        cmb_core::stream_token::mint(secret, call_id, exp, &nonce),
        exp,
    )
}

async fn stream_token(
    State(peer): State<ControlPeer>,
    Path(call_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !peer.authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let (token, exp) = mint_stream_token(&peer.secret, &call_id);
    axum::Json(json!({"callId": call_id, "streamToken": token, "expiresAt": exp})).into_response()
}

async fn session(
    State(peer): State<ControlPeer>,
    Path(call_id): Path<String>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !peer.authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    ws.on_upgrade(move |socket| run_session(peer, call_id, socket))
}

async fn run_session(peer: ControlPeer, call_id: String, mut socket: WebSocket) {
    let mut seq = 0u64;
    let mut send = |msg: DoToRelay| {
        seq += 1;
        Envelope::new(seq, msg).to_json().unwrap_or_default()
    };
    let hello = send(DoToRelay::Hello {
        call_id,
        persona_name: "Bench".into(),
        voice_id: "bench-voice".into(),
        voice_settings: VoiceSettings::default(),
        stt: SttOptions::default(),
        greeting: "Hi.".into(),
        max_duration_secs: 3600,
        idle_timeout_secs: 3600,
        speculate: false,
        speculate_after_ms: None,
        fast_barge_in: false,
    });
    if socket.send(AxMessage::Text(hello.into())).await.is_err() {
        return;
    }
    let mut turn = 0u32;
    while let Some(Ok(msg)) = socket.next().await {
        let AxMessage::Text(text) = msg else { continue };
        let Ok(Some(frame)) = channel::decode::<RelayToDo>(&text) else {
            continue;
        };
        let mut out = vec![send(DoToRelay::Ack { seq: frame.seq })];
        if let RelayToDo::UserTurn { .. } = frame.msg {
            turn += 1;
            out.push(send(DoToRelay::SayDelta {
                turn,
                text: REPLY.into(),
            }));
            out.push(send(DoToRelay::SayEnd { turn }));
            peer.turns_answered.fetch_add(1, Ordering::Relaxed);
        }
        for text in out {
            if socket.send(AxMessage::Text(text.into())).await.is_err() {
                return;
            }
        }
    }
}

/// Serves the control peer on `addr`.
pub async fn spawn_control_peer(
    peer: ControlPeer,
    addr: SocketAddr,
) -> anyhow::Result<crate::fakes::Server> {
    crate::fakes::Server::start("control", addr, peer.router()).await
}

/// How one simulated call is set up.
#[derive(Clone)]
pub struct ClientConfig {
    /// The relay's `ws://…/twilio` URL (also what the upgrade is signed over).
    pub relay_url: String,
    pub twilio_auth_token: String,
    pub relay_secret: String,
    /// Speak once every this many ms …
    pub speak_every_ms: u64,
    /// … this utterance (tone-coded so the fake Deepgram transcribes it).
    pub utterance: String,
    /// Where tagged frames' send times go (see [`FrameClock`]).
    pub frames: FrameClock,
}

/// Send and receive times of tagged silence frames, to time caller → relay → Deepgram.
/// One in every [`TAG_EVERY`] silence frames carries an id in its first bytes, written
/// with μ-law codes of near-zero amplitude so it stays silence to any VAD.
#[derive(Clone, Default)]
pub struct FrameClock {
    sent: Arc<std::sync::Mutex<std::collections::HashMap<u32, Instant>>>,
    received: Arc<std::sync::Mutex<Vec<(u32, Instant)>>>,
}

pub const TAG_EVERY: u64 = 5;

impl FrameClock {
    /// Writes `id` into a silence frame.
    pub fn tag(frame: &mut [u8; 160], id: u32) {
        frame[0] = 0xFE;
        frame[1] = 0x7E;
        for i in 0..8 {
            frame[2 + i] = 0xF0 | ((id >> (28 - 4 * i)) & 0x0F) as u8;
        }
    }

    /// The id of a tagged frame.
    pub fn read(frame: &[u8]) -> Option<u32> {
        if frame.len() < 10 || frame[0] != 0xFE || frame[1] != 0x7E {
            return None;
        }
        frame[2..10].iter().try_fold(0u32, |acc, b| {
            (b & 0xF0 == 0xF0).then_some((acc << 4) | u32::from(b & 0x0F))
        })
    }

    fn sent(&self, id: u32) {
        if let Ok(mut m) = self.sent.lock() {
            m.insert(id, Instant::now());
        }
    }

    /// For the Deepgram fake's audio tap.
    pub fn received(&self, frame: &[u8]) {
        if let Some(id) = Self::read(frame) {
            if let Ok(mut v) = self.received.lock() {
                v.push((id, Instant::now()));
            }
        }
    }

    /// Caller send → Deepgram receive, in ms, for every tagged frame that arrived.
    pub fn latencies_ms(&self) -> Vec<f64> {
        let (Ok(sent), Ok(received)) = (self.sent.lock(), self.received.lock()) else {
            return Vec::new();
        };
        received
            .iter()
            .filter_map(|(id, at)| {
                sent.get(id)
                    .map(|s| at.duration_since(*s).as_secs_f64() * 1000.0)
            })
            .collect()
    }
}

/// What one call measured.
#[derive(Debug, Default, Clone)]
pub struct CallStats {
    /// End of the caller's utterance → first persona audio frame, per turn (ms).
    pub turn_latency_ms: Vec<f64>,
    pub frames_out: u64,
    pub frames_in: u64,
    pub error: Option<String>,
}

fn frame_json(stream_sid: &str, seq: u64, chunk: u64, ts_ms: u64, payload: &[u8]) -> String {
    json!({
        "event": "media",
        "sequenceNumber": seq.to_string(),
        "streamSid": stream_sid,
        "media": {"track": "inbound", "chunk": chunk.to_string(), "timestamp": ts_ms.to_string(),
                  "payload": base64::engine::general_purpose::STANDARD.encode(payload)}
    })
    .to_string()
}

/// Runs one simulated call for `duration`, then hangs up (`stop` and close).
pub async fn run_call(cfg: ClientConfig, index: usize, duration: Duration) -> CallStats {
    match run_call_inner(&cfg, index, duration).await {
        Ok(stats) => stats,
        Err(e) => CallStats {
            error: Some(e.to_string()),
            ..Default::default()
        },
    }
}

async fn run_call_inner(
    cfg: &ClientConfig,
    index: usize,
    duration: Duration,
) -> anyhow::Result<CallStats> {
    let call_id = format!("bench-{index}-{}", uuid::Uuid::new_v4().simple());
    let stream_sid = format!("MZ{}", uuid::Uuid::new_v4().simple());
    let call_sid = format!("CA{}", uuid::Uuid::new_v4().simple());
    let mut req = cfg.relay_url.clone().into_client_request()?;
    let sig = cmb_core::twilio_sig::compute_signature(&cfg.twilio_auth_token, &cfg.relay_url, &[]);
    req.headers_mut().insert("X-Twilio-Signature", sig.parse()?);
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    let (mut tx, mut rx) = ws.split();
    let (token, _) = mint_stream_token(&cfg.relay_secret, &call_id);
    tx.send(Message::text(
        json!({"event":"connected","protocol":"Call","version":"1.0.0"}).to_string(),
    ))
    .await?;
    tx.send(Message::text(
        json!({"event":"start","sequenceNumber":"1","streamSid":stream_sid,
           "start":{"accountSid":"ACbench","streamSid":stream_sid,"callSid":call_sid,"tracks":["inbound"],
                    "customParameters":{"callId":call_id,"streamToken":token},
                    "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}})
        .to_string(),
    ))
    .await?;

    // Receiving side: count frames, note the first frame after each utterance ended,
    // echo marks (a real Twilio echoes once played; at once is the zero-latency case).
    let utterance_ended: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let stats = Arc::new(Mutex::new(CallStats::default()));
    let (mark_tx, mut mark_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let recv = {
        let utterance_ended = utterance_ended.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = rx.next().await {
                let Message::Text(text) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                match v["event"].as_str() {
                    Some("media") => {
                        let now = Instant::now();
                        let mut s = stats.lock().await;
                        s.frames_out += 1;
                        if let Some(ended) = utterance_ended.lock().await.take() {
                            s.turn_latency_ms
                                .push(now.duration_since(ended).as_secs_f64() * 1000.0);
                        }
                    }
                    Some("mark") => {
                        if let Some(name) = v["mark"]["name"].as_str() {
                            let _ = mark_tx.send(name.to_string());
                        }
                    }
                    _ => {}
                }
            }
        })
    };

    let speech = audio::encode_text(&cfg.utterance);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let (mut seq, mut chunk) = (1u64, 0u64);
    // Stagger the calls so utterances do not all start on the same tick.
    let offset_ms = (index as u64 * 137) % cfg.speak_every_ms.max(1);
    let silence = [audio::ULAW_SILENCE; 160];
    let mut tagged = silence;
    while started.elapsed() < duration {
        tokio::select! {
            Some(name) = mark_rx.recv() => {
                seq += 1;
                let echo = json!({"event":"mark","sequenceNumber":seq.to_string(),"streamSid":stream_sid,"mark":{"name":name}});
                tx.send(Message::text(echo.to_string())).await?;
            }
            _ = tick.tick() => {
                let ms = chunk * 20;
                let phase = (ms + offset_ms) % cfg.speak_every_ms;
                let at = (phase / 20) as usize * 160;
                let frame: &[u8] = if at + 160 <= speech.len() {
                    &speech[at..at + 160]
                } else if chunk % TAG_EVERY == 0 {
                    let id = ((index as u32 & 0xFFF) << 20) | (chunk as u32 & 0xF_FFFF);
                    FrameClock::tag(&mut tagged, id);
                    cfg.frames.sent(id);
                    &tagged
                } else {
                    &silence
                };
                // Turns in the first second could be mistaken for the greeting's audio.
                if at < speech.len() && at + 160 >= speech.len() && started.elapsed() > Duration::from_secs(1) {
                    // The last frame of the utterance goes out now.
                    *utterance_ended.lock().await = Some(Instant::now());
                }
                seq += 1;
                chunk += 1;
                tx.send(Message::text(frame_json(&stream_sid, seq, chunk, ms, frame))).await?;
                stats.lock().await.frames_in += 1;
            }
        }
    }
    seq += 1;
    let stop = json!({"event":"stop","sequenceNumber":seq.to_string(),"streamSid":stream_sid,
                      "stop":{"accountSid":"ACbench","callSid":call_sid}});
    let _ = tx.send(Message::text(stop.to_string())).await;
    let _ = tx.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), recv).await;
    let out = stats.lock().await.clone();
    Ok(out)
}

/// Estimates quantile `q` of the Prometheus histogram `name` (base name, without
/// `_bucket`) in a text exposition, as Prometheus' `histogram_quantile` does: linear
/// interpolation inside the bucket the rank falls in; a rank in the `+Inf` bucket gives
/// the highest finite bound. `None` when the histogram is absent or empty.
pub fn histogram_quantile(metrics_text: &str, name: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = metrics_text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let le = rest.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = rest.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let in_bucket = count - below;
            let frac = if in_bucket > 0.0 {
                (rank - below) / in_bucket
            } else {
                1.0
            };
            return Some(lower + (le - lower) * frac);
        }
        lower = le;
        below = count;
    }
    Some(lower)
}

/// The value at quantile `q` (0..=1) of `values` (nearest rank); `None` when empty.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tagged frame's id reads back; untagged silence and speech do not.
    #[test]
    fn frame_tags_round_trip() {
        let mut f = [audio::ULAW_SILENCE; 160];
        FrameClock::tag(&mut f, 0xABC1_2345);
        assert_eq!(FrameClock::read(&f), Some(0xABC1_2345));
        assert_eq!(FrameClock::read(&[audio::ULAW_SILENCE; 160]), None);
        assert!(
            audio::energy_dbfs(&f) < -40.0,
            "a tag stays silence to a VAD"
        );
    }

    /// Quantiles interpolate inside the right bucket; `+Inf` gives the top finite bound;
    /// a missing or empty histogram is `None`.
    #[test]
    fn histogram_quantiles() {
        let text = "# TYPE x_seconds histogram\n\
            x_seconds_sum 1.0\n\
            x_seconds_count 100\n\
            x_seconds_bucket{le=\"0.001\"} 50\n\
            x_seconds_bucket{le=\"0.002\"} 90\n\
            x_seconds_bucket{le=\"0.004\"} 99\n\
            x_seconds_bucket{le=\"+Inf\"} 100\n\
            y_seconds_bucket{le=\"+Inf\"} 0\n";
        let q = |q| histogram_quantile(text, "x_seconds", q).expect("present");
        assert!((q(0.5) - 0.001).abs() < 1e-12, "{}", q(0.5));
        assert!((q(0.25) - 0.0005).abs() < 1e-12, "{}", q(0.25));
        assert!((q(0.7) - 0.0015).abs() < 1e-12, "{}", q(0.7));
        assert!((q(0.99) - 0.004).abs() < 1e-12, "{}", q(0.99));
        assert!(
            (q(1.0) - 0.004).abs() < 1e-12,
            "+Inf → highest finite bound"
        );
        assert_eq!(histogram_quantile(text, "y_seconds", 0.5), None, "empty");
        assert_eq!(histogram_quantile(text, "z_seconds", 0.5), None, "absent");
    }

    /// Nearest-rank percentiles on a known set.
    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
    }
}
