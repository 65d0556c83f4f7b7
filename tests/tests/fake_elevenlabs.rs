//! The fake ElevenLabs driven by a client written from the ElevenLabs WebSocket docs
//! (stream-input and multi-stream-input, JSON text frames, base64 audio + alignment).

// Helpers here are test code too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use base64::Engine as _;
use cmb_tests::audio;
use cmb_tests::fakes::elevenlabs::{self, Closed, Config};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const QUERY: &str = "model_id=eleven_flash_v2_5&output_format=ulaw_8000";

async fn fake(cfg: Config) -> elevenlabs::Handle {
    elevenlabs::spawn(cfg).await.unwrap()
}

async fn connect(
    fake: &elevenlabs::Handle,
    endpoint: &str,
    query: &str,
    header_key: Option<&str>,
) -> Ws {
    let url = format!(
        "{}/v1/text-to-speech/voice123/{endpoint}?{query}",
        fake.ws_url()
    );
    let mut request = url.into_client_request().unwrap();
    if let Some(key) = header_key {
        request
            .headers_mut()
            .insert("xi-api-key", HeaderValue::from_str(key).unwrap());
    }
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

#[derive(Debug)]
enum Seen {
    Json(Value),
    Close(Option<(u16, String)>),
    End,
}

async fn next(ws: &mut Ws) -> Seen {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("fake went silent");
        return match m {
            Some(Ok(Message::Text(t))) => Seen::Json(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(Message::Close(f))) => {
                Seen::Close(f.map(|f| (u16::from(f.code), f.reason.to_string())))
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => Seen::End,
        };
    }
}

async fn read_until(ws: &mut Ws, stop: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        match next(ws).await {
            Seen::Json(v) => {
                let done = stop(&v);
                out.push(v);
                if done {
                    return out;
                }
            }
            other => panic!("stream ended early: {other:?} after {out:?}"),
        }
    }
}

/// Decodes the tone-coded audio of the audio messages back to text.
fn heard(msgs: &[Value]) -> String {
    let bytes: Vec<u8> = msgs
        .iter()
        .filter_map(|m| m["audio"].as_str())
        .flat_map(|a| base64::engine::general_purpose::STANDARD.decode(a).unwrap())
        .collect();
    audio::decode_text(&bytes)
}

/// Expects an error frame with `error` then a 1008 close.
async fn expect_error(ws: &mut Ws, error: &str) {
    match next(ws).await {
        Seen::Json(v) => {
            assert_eq!(v["error"], error, "{v}");
            assert_eq!(v["code"], 1008);
            assert!(v["message"].is_string());
        }
        other => panic!("expected error frame, got {other:?}"),
    }
    assert!(matches!(next(ws).await, Seen::Close(Some((1008, _)))));
}

/// Single context: buffered text is spoken at flush as ≤0.5 s audio messages whose tones
/// carry the text, with per-chunk alignment; `{"text":""}` ends with isFinal and a close.
#[tokio::test]
async fn single_context_stream() {
    let f = fake(Config::default()).await;
    let mut ws = connect(&f, "stream-input", QUERY, Some(f.api_key())).await;
    send(&mut ws, json!({"text": " ", "voice_settings": {"stability": 0.5, "similarity_boost": 0.75, "speed": 1.0}})).await;
    send(
        &mut ws,
        json!({"text": "Hello there, ", "try_trigger_generation": false}),
    )
    .await;
    send(&mut ws, json!({"text": "how can I help? ", "flush": true})).await;
    let said = "Hello there, how can I help? ";
    let mut msgs = Vec::new();
    while heard(&msgs).len() < said.len() {
        match next(&mut ws).await {
            Seen::Json(v) => msgs.push(v),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(heard(&msgs), said);
    for m in &msgs {
        let n = m["alignment"]["chars"].as_array().unwrap().len();
        assert!(n <= 12, "chunk of {n} chars is over 0.5 s");
        assert_eq!(
            m["alignment"]["charStartTimesMs"][0], 0,
            "times are relative to the chunk"
        );
        assert!(m["normalizedAlignment"]["charDurationsMs"].is_array());
        assert!(m.get("contextId").is_none());
        assert!(m.get("isFinal").is_none());
    }
    send(&mut ws, json!({"text": "Bye. "})).await;
    send(&mut ws, json!({"text": ""})).await;
    let rest = read_until(&mut ws, |m| m["isFinal"] == true).await;
    assert_eq!(heard(&rest), "Bye. ");
    assert!(matches!(next(&mut ws).await, Seen::Close(Some((1000, _)))));
    assert_eq!(f.characters_synthesized(), (said.len() + 5) as u64);
    assert_eq!(
        f.texts_by_context()[""],
        vec![said.to_owned(), "Bye. ".to_owned()]
    );
}

/// The key may come in the first message: `xi-api-key` (single) / `xi_api_key` (multi).
#[tokio::test]
async fn key_in_first_message() {
    let f = fake(Config::default()).await;
    let mut ws = connect(&f, "stream-input", QUERY, None).await;
    send(&mut ws, json!({"text": " ", "xi-api-key": f.api_key()})).await;
    send(&mut ws, json!({"text": "ok ", "flush": true})).await;
    let msgs = read_until(&mut ws, |m| m["audio"].is_string()).await;
    assert_eq!(heard(&msgs), "ok ");

    let mut ws = connect(&f, "multi-stream-input", QUERY, None).await;
    send(
        &mut ws,
        json!({"text": " ", "context_id": "c", "xi_api_key": f.api_key()}),
    )
    .await;
    send(
        &mut ws,
        json!({"text": "fine ", "context_id": "c", "flush": true}),
    )
    .await;
    let msgs = read_until(&mut ws, |m| m["isFinal"] == true).await;
    assert_eq!(heard(&msgs), "fine ");
}

/// A missing or wrong key (or the other endpoint's spelling) is invalid_api_key + 1008.
#[tokio::test]
async fn bad_key_is_error_frame_and_1008() {
    let f = fake(Config::default()).await;
    let mut ws = connect(&f, "stream-input", QUERY, Some("wrong")).await;
    send(&mut ws, json!({"text": " "})).await;
    expect_error(&mut ws, "invalid_api_key").await;

    let mut ws = connect(&f, "multi-stream-input", QUERY, None).await;
    send(&mut ws, json!({"text": " ", "context_id": "c"})).await;
    expect_error(&mut ws, "invalid_api_key").await;

    // Single-context spelling on the multi endpoint is not the key.
    let mut ws = connect(&f, "multi-stream-input", QUERY, None).await;
    send(
        &mut ws,
        json!({"text": " ", "context_id": "c", "xi-api-key": f.api_key()}),
    )
    .await;
    expect_error(&mut ws, "invalid_message").await;
    assert!(f
        .connections()
        .iter()
        .all(|c| matches!(c.closed, Some(Closed::ByServer { code: 1008, .. }))));
    assert_eq!(f.characters_synthesized(), 0);
}

/// A non-μ-law output format is refused on the socket.
#[tokio::test]
async fn output_format_must_be_ulaw_8000() {
    let f = fake(Config::default()).await;
    let mut ws = connect(
        &f,
        "stream-input",
        "model_id=eleven_flash_v2_5&output_format=pcm_16000",
        Some(f.api_key()),
    )
    .await;
    expect_error(&mut ws, "invalid_output_format").await;
}

/// Out-of-range voice settings in the first message are refused.
#[tokio::test]
async fn voice_settings_out_of_range() {
    let f = fake(Config::default()).await;
    let mut ws = connect(&f, "stream-input", QUERY, Some(f.api_key())).await;
    send(
        &mut ws,
        json!({"text": " ", "voice_settings": {"speed": 2.0}}),
    )
    .await;
    expect_error(&mut ws, "invalid_voice_settings").await;
}

/// Multi-context: close_context stops that context's audio at once (nothing already
/// queued comes after it), the other context is unaffected, and the id can be reused.
#[tokio::test]
async fn close_context_interrupts_immediately() {
    let f = fake(Config {
        audio_interval: Duration::from_millis(40),
        ..Config::default()
    })
    .await;
    let mut ws = connect(&f, "multi-stream-input", QUERY, Some(f.api_key())).await;
    send(&mut ws, json!({"text": " ", "context_id": "turn-1"})).await;
    let long = "This is a long answer that the caller will interrupt halfway through. ".repeat(3);
    send(
        &mut ws,
        json!({"text": long, "context_id": "turn-1", "flush": true}),
    )
    .await;
    let first = read_until(&mut ws, |m| m["audio"].is_string()).await;
    assert_eq!(first[0]["contextId"], "turn-1");
    send(
        &mut ws,
        json!({"context_id": "turn-1", "close_context": true}),
    )
    .await;
    send(
        &mut ws,
        json!({"text": "Yes? ", "context_id": "turn-2", "flush": true}),
    )
    .await;
    let after = read_until(&mut ws, |m| {
        m["isFinal"] == true && m["contextId"] == "turn-2"
    })
    .await;
    // At most one turn-1 message was already on the wire when close_context arrived.
    let late = after.iter().filter(|m| m["contextId"] == "turn-1").count();
    assert!(late <= 1, "{late} turn-1 messages after close_context");
    assert!(after
        .iter()
        .all(|m| m["isFinal"] != true || m["contextId"] != "turn-1"));
    assert_eq!(
        heard(
            &after
                .iter()
                .filter(|m| m["contextId"] == "turn-2")
                .cloned()
                .collect::<Vec<_>>()
        ),
        "Yes? "
    );
    // Nothing more for turn-1, ever.
    let quiet = tokio::time::timeout(Duration::from_millis(200), ws.next()).await;
    assert!(
        quiet.is_err(),
        "unexpected message after the turn: {quiet:?}"
    );
    let sent_turn1: usize = f.connections()[0]
        .sent
        .iter()
        .filter(|m| m["contextId"] == "turn-1")
        .count();
    assert!(
        sent_turn1 < long.len() / 12,
        "the interrupted answer was cut short"
    );
    assert_eq!(f.contexts_closed(), vec!["turn-1"]);

    // Reusing the id starts a fresh context.
    send(
        &mut ws,
        json!({"text": "Again. ", "context_id": "turn-1", "flush": true}),
    )
    .await;
    let again = read_until(&mut ws, |m| m["isFinal"] == true).await;
    assert_eq!(heard(&again), "Again. ");
}

/// A sixth simultaneous context is max_active_conversations + 1008.
#[tokio::test]
async fn five_contexts_max() {
    let f = fake(Config::default()).await;
    let mut ws = connect(&f, "multi-stream-input", QUERY, Some(f.api_key())).await;
    for i in 1..=5 {
        send(&mut ws, json!({"text": " ", "context_id": format!("c{i}")})).await;
    }
    send(&mut ws, json!({"text": " ", "context_id": "c6"})).await;
    expect_error(&mut ws, "max_active_conversations").await;
}

/// Closing contexts frees slots: many turns in sequence never hit the limit.
#[tokio::test]
async fn closed_contexts_free_slots() {
    let f = fake(Config::default()).await;
    let mut ws = connect(&f, "multi-stream-input", QUERY, Some(f.api_key())).await;
    send(&mut ws, json!({"text": " ", "context_id": "turn-0"})).await;
    for i in 0..8 {
        let id = format!("turn-{i}");
        send(
            &mut ws,
            json!({"text": "Hi. ", "context_id": id, "flush": true}),
        )
        .await;
        read_until(&mut ws, |m| m["isFinal"] == true).await;
        send(&mut ws, json!({"context_id": id, "close_context": true})).await;
    }
    send(&mut ws, json!({"close_socket": true})).await;
    assert!(matches!(next(&mut ws).await, Seen::Close(Some((1000, _)))));
    assert_eq!(f.characters_synthesized(), 8 * 4);
}

/// No message for inactivity_timeout (scaled) closes with an error frame and 1008.
#[tokio::test]
async fn inactivity_timeout_closes() {
    let f = fake(Config {
        timeout_second: Duration::from_millis(20),
        ..Config::default()
    })
    .await;
    let mut ws = connect(
        &f,
        "stream-input",
        &format!("{QUERY}&inactivity_timeout=5"),
        Some(f.api_key()),
    )
    .await;
    send(&mut ws, json!({"text": " "})).await;
    let t0 = tokio::time::Instant::now();
    expect_error(&mut ws, "input_timeout_exceeded").await;
    assert!(t0.elapsed() >= Duration::from_millis(100));
}

/// A keep-alive `{"text":" "}` inside the window keeps the socket open.
#[tokio::test]
async fn keep_alive_holds_the_socket() {
    let f = fake(Config {
        timeout_second: Duration::from_millis(50),
        ..Config::default()
    })
    .await;
    let mut ws = connect(
        &f,
        "stream-input",
        &format!("{QUERY}&inactivity_timeout=3"),
        Some(f.api_key()),
    )
    .await;
    send(&mut ws, json!({"text": " "})).await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        send(&mut ws, json!({"text": " "})).await;
    }
    send(&mut ws, json!({"text": "still here ", "flush": true})).await;
    let msgs = read_until(&mut ws, |m| m["audio"].is_string()).await;
    assert_eq!(heard(&msgs), "still here ");
}

/// `connect_delay` holds the upgrade; `first_audio_delay` holds each generation's first
/// audio message (counted from the flush), not the ones after it, and applies again to
/// the next generation.
#[tokio::test]
async fn connect_and_first_audio_delays() {
    let f = fake(Config {
        connect_delay: Duration::from_millis(150),
        first_audio_delay: Duration::from_millis(120),
        ..Config::default()
    })
    .await;
    let started = std::time::Instant::now();
    let mut ws = connect(&f, "multi-stream-input", QUERY, Some(f.api_key())).await;
    let connected = started.elapsed();
    assert!(connected >= Duration::from_millis(150), "{connected:?}");
    send(&mut ws, json!({"text": " ", "context_id": "t1"})).await;
    for turn in ["First answer, long enough for two messages. ", "Second. "] {
        let flushed = std::time::Instant::now();
        send(
            &mut ws,
            json!({"text": turn, "context_id": "t1", "flush": true}),
        )
        .await;
        let first = read_until(&mut ws, |m| m["audio"].is_string()).await;
        let waited = flushed.elapsed();
        assert!(waited >= Duration::from_millis(120), "{turn}: {waited:?}");
        let rest = read_until(&mut ws, |m| m["isFinal"] == true).await;
        let all: Vec<Value> = first.into_iter().chain(rest).collect();
        assert_eq!(heard(&all), turn);
        // The later messages of a generation are not held again (the first turn has four:
        // held each, they would take 360 ms more).
        assert!(
            flushed.elapsed() < waited + Duration::from_millis(300),
            "{turn}: {:?}",
            flushed.elapsed()
        );
    }
}
