//! The call wiring end to end inside one process: Twilio is a pair of channels, and the
//! DO, Deepgram and ElevenLabs are minimal WebSocket peers on loopback. Proves the sockets
//! are opened with the right URLs and credentials and that events flow both ways; the
//! conversational logic itself is covered by the state machine's unit tests.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::Message as AxMessage;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use futures::channel::mpsc as fmpsc;
use futures::{SinkExt, StreamExt};
use media_relay::{AppState, Config};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const SECRET: &str = "0123456789abcdef0123456789abcdef";
const WAIT: Duration = Duration::from_secs(5);

/// An accepted peer socket with the request line and headers it came with.
struct Accepted {
    uri: String,
    headers: HashMap<String, String>,
    ws: WebSocketStream<TcpStream>,
}

/// A WebSocket server on an ephemeral loopback port, handing over each accepted socket.
async fn peer() -> (String, mpsc::Receiver<Accepted>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let mut uri = String::new();
            let mut headers = HashMap::new();
            // The callback's error type is fixed by tungstenite's `Callback` trait.
            #[allow(clippy::result_large_err)]
            let cb = |req: &Request, res: Response| {
                uri = req.uri().to_string();
                for (k, v) in req.headers() {
                    headers.insert(
                        k.as_str().to_owned(),
                        v.to_str().unwrap_or_default().to_owned(),
                    );
                }
                Ok(res)
            };
            if let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await {
                let _ = tx.send(Accepted { uri, headers, ws }).await;
            }
        }
    });
    (format!("127.0.0.1:{}", addr.port()), rx)
}

async fn next_json(ws: &mut WebSocketStream<TcpStream>) -> Value {
    loop {
        let msg = timeout(WAIT, ws.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).expect("json");
        }
    }
}

/// Next text message to Twilio, parsed.
async fn next_twilio(rx: &mut fmpsc::Receiver<AxMessage>) -> Value {
    loop {
        match timeout(WAIT, rx.next())
            .await
            .expect("in time")
            .expect("open")
        {
            AxMessage::Text(t) => return serde_json::from_str(t.as_str()).expect("json"),
            AxMessage::Close(c) => panic!("closed early: {c:?}"),
            _ => {}
        }
    }
}

fn config(worker: &str, deepgram: &str, elevenlabs: &str) -> Config {
    let vars = HashMap::from([
        ("RELAY_SECRET", SECRET.to_owned()),
        (
            "RELAY_PUBLIC_URL",
            "wss://relay.example.com/twilio".to_owned(),
        ),
        ("TWILIO_AUTH_TOKEN", "tw".to_owned()),
        ("WORKER_URL", format!("http://{worker}")),
        ("DEEPGRAM_API_KEY", "dg-key".to_owned()),
        ("DEEPGRAM_URL", format!("ws://{deepgram}/v1/listen")),
        ("ELEVENLABS_API_KEY", "xi-key".to_owned()),
        ("ELEVENLABS_URL", format!("ws://{elevenlabs}")),
    ]);
    Config::from_lookup(|k| vars.get(k).cloned()).expect("valid config")
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .expect("clock")
}

fn start_msg(call_id: &str, token: &str) -> AxMessage {
    let v = json!({"event":"start","sequenceNumber":"1","streamSid":"MZ1",
        "start":{"accountSid":"AC1","streamSid":"MZ1","callSid":"CA1","tracks":["inbound"],
        "customParameters":{"callId":call_id,"streamToken":token},
        "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}});
    AxMessage::Text(v.to_string().into())
}

type TwilioIn = fmpsc::Sender<Result<AxMessage, Infallible>>;

/// Starts `call::run` with channel-backed Twilio ends.
fn start_call(
    state: &AppState,
    config: Config,
) -> (
    TwilioIn,
    fmpsc::Receiver<AxMessage>,
    tokio::task::JoinHandle<&'static str>,
) {
    let (to_relay, from_twilio) = fmpsc::channel::<Result<AxMessage, Infallible>>(64);
    let (to_twilio, from_relay) = fmpsc::channel::<AxMessage>(256);
    let state = state.clone();
    let task = tokio::spawn(async move {
        media_relay::call::run(&state, &config, to_twilio, from_twilio).await
    });
    (to_relay, from_relay, task)
}

/// A forged token and a replayed one are both closed with 1008 before anything opens.
#[tokio::test]
async fn bad_and_replayed_tokens_are_refused() {
    let (worker, mut do_rx) = peer().await;
    let cfg = config(&worker, "127.0.0.1:9", "127.0.0.1:9");
    let state = AppState::new(Ok(cfg.clone()));

    let (mut tw, mut out, task) = start_call(&state, cfg.clone());
    tw.send(Ok(start_msg("call-1", "forged.token")))
        .await
        .expect("send");
    assert_eq!(task.await.expect("join"), "rejected_token");
    match out.next().await {
        Some(AxMessage::Close(Some(c))) => assert_eq!(c.code, 1008),
        other => panic!("expected close 1008, got {other:?}"),
    }

    let token = cmb_core::stream_token::mint(SECRET, "call-1", unix_now() + 60, "nonce-1");
    // First use is accepted (the control channel is dialled)…
    let (mut tw, _out, first) = start_call(&state, cfg.clone());
    tw.send(Ok(start_msg("call-1", &token)))
        .await
        .expect("send");
    let dialled = timeout(WAIT, do_rx.recv())
        .await
        .expect("control dialled")
        .expect("socket");
    assert_eq!(dialled.uri, "/internal/calls/call-1/session");
    assert_eq!(
        dialled.headers.get("authorization").map(String::as_str),
        Some(&*format!("Bearer {SECRET}"))
    );
    // …the same token again is a replay.
    let (mut tw2, mut out2, second) = start_call(&state, cfg);
    tw2.send(Ok(start_msg("call-1", &token)))
        .await
        .expect("send");
    assert_eq!(second.await.expect("join"), "rejected_token");
    assert!(matches!(out2.next().await, Some(AxMessage::Close(Some(c))) if c.code == 1008));
    first.abort();
}

/// A DO that refuses the relay (close 1008: another socket holds the call's stream) ends
/// the call here at once, 1008 toward Twilio, and is never dialled again.
#[tokio::test]
async fn a_session_refusal_is_final() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    let (worker, mut do_rx) = peer().await;
    let cfg = config(&worker, "127.0.0.1:9", "127.0.0.1:9");
    let state = AppState::new(Ok(cfg.clone()));
    let token = cmb_core::stream_token::mint(SECRET, "call-2", unix_now() + 60, "nonce-2");
    let (mut tw, mut out, task) = start_call(&state, cfg);
    tw.send(Ok(start_msg("call-2", &token)))
        .await
        .expect("send");
    let mut dialled = timeout(WAIT, do_rx.recv())
        .await
        .expect("control dialled")
        .expect("socket");
    assert_eq!(next_json(&mut dialled.ws).await["type"], "ready");
    dialled
        .ws
        .close(Some(CloseFrame {
            code: CloseCode::Policy,
            reason: "stream already connected".into(),
        }))
        .await
        .expect("close");
    assert_eq!(
        timeout(WAIT, task).await.expect("ends").expect("join"),
        "rejected_session"
    );
    let mut closed = None;
    while let Some(msg) = out.next().await {
        if let AxMessage::Close(c) = msg {
            closed = c.map(|c| c.code);
        }
    }
    assert_eq!(closed, Some(1008), "Twilio is told the stream was refused");
    assert!(
        do_rx.try_recv().is_err(),
        "a refused relay does not dial the DO again"
    );
}

/// ready → hello → providers dialled with their credentials → greeting spoken as paced
/// frames with a mark → heard; caller audio reaches Deepgram; a final transcript becomes
/// user_turn; Twilio's stop ends the call with usage and ended.
#[tokio::test]
async fn a_call_flows_through_every_socket() {
    let (worker, mut do_rx) = peer().await;
    let (deepgram, mut dg_rx) = peer().await;
    let (elevenlabs, mut el_rx) = peer().await;
    let cfg = config(&worker, &deepgram, &elevenlabs);
    let state = AppState::new(Ok(cfg.clone()));
    let (mut tw, mut out, task) = start_call(&state, cfg);
    let token = cmb_core::stream_token::mint(SECRET, "call-9", unix_now() + 60, "nonce-9");
    tw.send(Ok(AxMessage::Text(
        r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#.into(),
    )))
    .await
    .expect("send");
    tw.send(Ok(start_msg("call-9", &token)))
        .await
        .expect("send");

    // Control channel: ready, then hello.
    let mut ctl = timeout(WAIT, do_rx.recv())
        .await
        .expect("in time")
        .expect("socket")
        .ws;
    let ready = next_json(&mut ctl).await;
    assert_eq!(ready["type"], "ready");
    assert_eq!(ready["call_sid"], "CA1");
    assert_eq!(ready["stream_sid"], "MZ1");
    let hello = json!({"v":1,"seq":1,"type":"hello","call_id":"call-9","persona_name":"Coach","voice_id":"voice-1",
        "voice_settings":{"stability":0.5,"similarity_boost":0.75,"style":0.0,"speed":1.0,"use_speaker_boost":true},
        "stt":{"model":"nova-3","language":"en","endpointing_ms":300,"utterance_end_ms":1000},
        "greeting":"Hi!","max_duration_secs":600,"idle_timeout_secs":60});
    ctl.send(Message::text(hello.to_string()))
        .await
        .expect("hello");

    // Providers are dialled with the call's options and keys.
    let dg = timeout(WAIT, dg_rx.recv())
        .await
        .expect("in time")
        .expect("deepgram");
    assert!(
        dg.uri
            .starts_with("/v1/listen?model=nova-3&encoding=mulaw&sample_rate=8000"),
        "{}",
        dg.uri
    );
    assert!(
        dg.uri.contains("endpointing=300") && dg.uri.contains("vad_events=true"),
        "{}",
        dg.uri
    );
    assert_eq!(
        dg.headers.get("authorization").map(String::as_str),
        Some("Token dg-key")
    );
    let mut dg = dg.ws;
    let el = timeout(WAIT, el_rx.recv())
        .await
        .expect("in time")
        .expect("elevenlabs");
    assert_eq!(
        el.uri,
        "/v1/text-to-speech/voice-1/multi-stream-input?model_id=eleven_flash_v2_5&output_format=ulaw_8000&inactivity_timeout=180"
    );
    assert_eq!(
        el.headers.get("xi-api-key").map(String::as_str),
        Some("xi-key")
    );
    let mut el = el.ws;

    // ElevenLabs gets the greeting context opened (with voice settings) and its text.
    let init = next_json(&mut el).await;
    assert_eq!(
        (init["text"].as_str(), init["context_id"].as_str()),
        (Some(" "), Some("c1"))
    );
    assert!(init["voice_settings"].is_object());
    let mut greeting_text = None;
    for _ in 0..3 {
        let m = next_json(&mut el).await;
        if m["context_id"] == "c1" && m["text"] == "Hi! " {
            greeting_text = Some(m);
            break;
        }
    }
    assert_eq!(greeting_text.map(|m| m["flush"].clone()), Some(json!(true)));

    // 3 chars × 40 ms = 120 ms of audio = 960 bytes → 6 frames, then the clause mark.
    let audio = BASE64.encode([0x7fu8; 960]);
    let chunk = json!({"audio": audio, "contextId": "c1",
        "alignment": {"chars":["H","i","!"],"charStartTimesMs":[0,40,80],"charDurationsMs":[40,40,40]}});
    el.send(Message::text(chunk.to_string()))
        .await
        .expect("audio");
    let mut frames = 0;
    let mark = loop {
        let m = next_twilio(&mut out).await;
        assert_eq!(m["streamSid"], "MZ1");
        match m["event"].as_str() {
            Some("media") => {
                assert_eq!(
                    m["media"]["payload"].as_str().map(str::len),
                    Some(216),
                    "160-byte frames"
                );
                frames += 1;
            }
            Some("mark") => break m["mark"]["name"].as_str().expect("name").to_owned(),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(frames, 6);
    // The context is released once all its text was voiced.
    let close = next_json(&mut el).await;
    assert_eq!(close, json!({"context_id":"c1","close_context":true}));

    // Twilio echoes the mark: the DO hears that the greeting was heard.
    let echo = json!({"event":"mark","sequenceNumber":"3","streamSid":"MZ1","mark":{"name":mark}});
    tw.send(Ok(AxMessage::Text(echo.to_string().into())))
        .await
        .expect("echo");
    let heard = next_json(&mut ctl).await;
    assert_eq!(
        (
            heard["type"].as_str(),
            heard["turn"].as_u64(),
            heard["text"].as_str()
        ),
        (Some("heard"), Some(0), Some("Hi!"))
    );

    // Caller audio goes to Deepgram as binary frames, decoded.
    let media = json!({"event":"media","sequenceNumber":"4","streamSid":"MZ1",
        "media":{"track":"inbound","chunk":"1","timestamp":"20","payload": BASE64.encode([0x55u8; 160])}});
    tw.send(Ok(AxMessage::Text(media.to_string().into())))
        .await
        .expect("media");
    let bin = loop {
        match timeout(WAIT, dg.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("frame")
        {
            Message::Binary(b) => break b,
            _ => continue,
        }
    };
    assert_eq!(&bin[..], &[0x55u8; 160][..]);

    // A final transcript with speech_final becomes the user's turn.
    let result = json!({"type":"Results","is_final":true,"speech_final":true,"start":0.0,"duration":0.02,
        "channel":{"alternatives":[{"transcript":"hello there","confidence":0.9}]}});
    dg.send(Message::text(result.to_string()))
        .await
        .expect("results");
    let turn = next_json(&mut ctl).await;
    assert_eq!(
        (turn["type"].as_str(), turn["text"].as_str()),
        (Some("user_turn"), Some("hello there"))
    );

    // The caller hangs up: usage, then ended, reach the DO; the call task finishes.
    tw.send(Ok(AxMessage::Text(
        r#"{"event":"stop","sequenceNumber":"5","streamSid":"MZ1","stop":{}}"#.into(),
    )))
    .await
    .expect("stop");
    let usage = next_json(&mut ctl).await;
    assert_eq!(usage["type"], "usage");
    assert_eq!(usage["tts_chars"], 3);
    assert_eq!(usage["stt_audio_secs"], 0.02);
    let ended = next_json(&mut ctl).await;
    assert_eq!(
        (ended["type"].as_str(), ended["reason"].as_str()),
        (Some("ended"), Some("caller_hung_up"))
    );
    assert_eq!(
        timeout(WAIT, task).await.expect("in time").expect("join"),
        "caller_hung_up"
    );
}

/// Through the real server on port 0: a correctly signed upgrade is accepted, one beyond
/// RELAY_MAX_CALLS is closed cleanly with 1013, and shutdown ends `run` with calls open.
#[tokio::test]
async fn server_enforces_capacity_and_shuts_down() {
    let public = "wss://relay.example.com/twilio";
    let vars = HashMap::from([
        ("RELAY_SECRET", SECRET),
        ("RELAY_PUBLIC_URL", public),
        ("TWILIO_AUTH_TOKEN", "tw"),
        ("WORKER_URL", "http://127.0.0.1:9"),
        ("DEEPGRAM_API_KEY", "dg"),
        ("ELEVENLABS_API_KEY", "xi"),
        ("RELAY_MAX_CALLS", "1"),
        // No drain: the call still open is closed at the signal.
        ("RELAY_DRAIN_SECS", "0"),
    ]);
    let cfg = Config::from_lookup(|k| vars.get(k).map(|v| (*v).to_owned())).expect("valid config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::mpsc::channel::<()>(1);
    let server = tokio::spawn(media_relay::run(listener, Ok(cfg), stopped));

    let signed = || {
        let url = format!("ws://{addr}/twilio");
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
                .expect("request");
        let sig = cmb_core::twilio_sig::compute_signature("tw", public, &[]);
        req.headers_mut()
            .insert("x-twilio-signature", sig.parse().expect("header"));
        req
    };
    let (mut first, _) = tokio_tungstenite::connect_async(signed())
        .await
        .expect("first call accepted");
    let (mut second, _) = tokio_tungstenite::connect_async(signed())
        .await
        .expect("upgrade then close");
    match timeout(WAIT, second.next()).await.expect("in time") {
        Some(Ok(Message::Close(Some(c)))) => assert_eq!(u16::from(c.code), 1013),
        other => panic!("expected a 1013 close, got {other:?}"),
    }

    stop.send(()).await.expect("server running");
    timeout(WAIT, server)
        .await
        .expect("run returns within the grace period")
        .expect("join")
        .expect("ok");
    // The first call, still waiting for `start`, was closed by the shutdown.
    let closed = timeout(WAIT, async {
        loop {
            match first.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok());
}
