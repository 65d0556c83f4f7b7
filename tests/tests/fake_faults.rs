//! Every fault knob, on every speech-side fake, over real sockets: what a client sees when
//! a test (possibly in another process, via `POST /__faults`) turns it on.

// Helpers here are test code too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmb_tests::fakes::faults::{FaultSwitch, Faults};
use cmb_tests::fakes::{cerebras, deepgram, elevenlabs};
use eventsource_stream::Eventsource as _;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const DG_QUERY: &str = "model=nova-3&encoding=mulaw&sample_rate=8000&channels=1";
const XI_QUERY: &str = "model_id=eleven_flash_v2_5&output_format=ulaw_8000";

/// Sets faults the way a test in another process would.
async fn post_faults(base_url: &str, faults: Value) {
    let resp = reqwest::Client::new()
        .post(format!("{base_url}/__faults"))
        .json(&faults)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
}

async fn delete_faults(base_url: &str) {
    let resp = reqwest::Client::new()
        .delete(format!("{base_url}/__faults"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
}

#[derive(Debug)]
enum Seen {
    Json(Value),
    Close(u16),
    /// The connection ended without a close frame.
    End,
}

async fn next(ws: &mut Ws) -> Seen {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("fake went silent");
        return match m {
            Some(Ok(Message::Text(t))) => Seen::Json(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(Message::Close(f))) => Seen::Close(f.map_or(1005, |f| u16::from(f.code))),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => Seen::End,
        };
    }
}

/// Asserts the connection ended without a close frame (what a drop fault must look like).
async fn expect_dropped(ws: &mut Ws) {
    match next(ws).await {
        Seen::End => {}
        Seen::Close(code) => panic!("a drop must not send a close frame, got {code}"),
        Seen::Json(v) => panic!("expected the connection to drop, got {v}"),
    }
}

// ---------------------------------------------------------------- Deepgram

async fn dg_connect(f: &deepgram::Handle) -> Result<Ws, WsError> {
    let mut req = format!("{}/v1/listen?{DG_QUERY}", f.ws_url())
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Token {}", f.api_key())).unwrap(),
    );
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

async fn finalize(ws: &mut Ws) {
    ws.send(Message::Text(r#"{"type":"Finalize"}"#.into()))
        .await
        .unwrap();
}

fn ws_http_status(err: WsError) -> (u16, Option<String>) {
    match err {
        WsError::Http(resp) => (
            resp.status().as_u16(),
            resp.headers()
                .get("dg-error")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ),
        other => panic!("expected an HTTP handshake error, got {other}"),
    }
}

/// GET/POST/DELETE `/__faults` read, set and reset the switch; bad bodies are refused.
#[tokio::test]
async fn control_routes_over_http() {
    let f = deepgram::spawn(deepgram::Config::default()).await.unwrap();
    post_faults(
        &f.base_url(),
        json!({"latency_ms": 5, "drop_after_messages": 3}),
    )
    .await;
    assert_eq!(
        f.faults().get(),
        Faults {
            latency_ms: 5,
            drop_after_messages: Some(3),
            ..Faults::default()
        }
    );
    let got: Value = reqwest::get(format!("{}/__faults", f.base_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["latency_ms"], 5);
    let bad = reqwest::Client::new()
        .post(format!("{}/__faults", f.base_url()))
        .json(&json!({"latency": 5}))
        .send()
        .await
        .unwrap();
    assert!(bad.status().is_client_error());
    delete_faults(&f.base_url()).await;
    assert_eq!(f.faults().get(), Faults::default());
}

/// refuse_connections answers the WebSocket upgrade 503; http_status answers it with that
/// status and Deepgram's `dg-error` header; turning them off restores service.
#[tokio::test]
async fn deepgram_refuse_and_status() {
    let f = deepgram::spawn(deepgram::Config::default()).await.unwrap();
    post_faults(&f.base_url(), json!({"refuse_connections": true})).await;
    assert_eq!(ws_http_status(dg_connect(&f).await.unwrap_err()).0, 503);
    post_faults(&f.base_url(), json!({"http_status": 429})).await;
    let (status, dg_error) = ws_http_status(dg_connect(&f).await.unwrap_err());
    assert_eq!(status, 429);
    assert!(dg_error.is_some());
    delete_faults(&f.base_url()).await;
    assert!(dg_connect(&f).await.is_ok());
    assert_eq!(
        f.connection_count(),
        1,
        "refused handshakes never became connections"
    );
}

/// latency_ms delays every message the fake sends.
#[tokio::test]
async fn deepgram_latency_per_message() {
    let f = deepgram::spawn(deepgram::Config::default()).await.unwrap();
    let mut ws = dg_connect(&f).await.unwrap();
    f.faults().update(|x| x.latency_ms = 150);
    for _ in 0..2 {
        let t0 = Instant::now();
        finalize(&mut ws).await;
        assert!(matches!(next(&mut ws).await, Seen::Json(_)));
        assert!(
            t0.elapsed() >= Duration::from_millis(150),
            "{:?}",
            t0.elapsed()
        );
    }
}

/// first_byte_delay_ms delays only the first message of a connection.
#[tokio::test]
async fn deepgram_first_byte_delay() {
    let f = deepgram::spawn(deepgram::Config::default()).await.unwrap();
    f.faults().update(|x| x.first_byte_delay_ms = 300);
    let mut ws = dg_connect(&f).await.unwrap();
    let t0 = Instant::now();
    finalize(&mut ws).await;
    finalize(&mut ws).await;
    assert!(matches!(next(&mut ws).await, Seen::Json(_)));
    assert!(t0.elapsed() >= Duration::from_millis(300));
    let t1 = Instant::now();
    assert!(matches!(next(&mut ws).await, Seen::Json(_)));
    assert!(
        t1.elapsed() < Duration::from_millis(150),
        "second message was delayed too"
    );
}

/// drop_after_messages lets N messages out, then the connection vanishes without a close frame.
#[tokio::test]
async fn deepgram_drop_after_messages() {
    let f = deepgram::spawn(deepgram::Config::default()).await.unwrap();
    post_faults(&f.base_url(), json!({"drop_after_messages": 2})).await;
    let mut ws = dg_connect(&f).await.unwrap();
    for _ in 0..3 {
        finalize(&mut ws).await;
    }
    assert!(matches!(next(&mut ws).await, Seen::Json(_)));
    assert!(matches!(next(&mut ws).await, Seen::Json(_)));
    expect_dropped(&mut ws).await;
    assert!(
        f.wait_for(Duration::from_secs(2), |c| c[0].closed.is_some())
            .await
    );
    assert_eq!(f.close_reasons(), vec![Some(deepgram::Closed::Dropped)]);
}

/// drop_after_ms cuts an open connection at that age, even when set after it opened.
#[tokio::test]
async fn deepgram_drop_after_ms_applies_live() {
    let f = deepgram::spawn(deepgram::Config::default()).await.unwrap();
    let mut ws = dg_connect(&f).await.unwrap();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    post_faults(&f.base_url(), json!({"drop_after_ms": 200})).await;
    expect_dropped(&mut ws).await;
    let age = t0.elapsed();
    assert!(
        age >= Duration::from_millis(180) && age < Duration::from_secs(2),
        "{age:?}"
    );
}

// ---------------------------------------------------------------- ElevenLabs

async fn xi_connect(f: &elevenlabs::Handle) -> Result<Ws, WsError> {
    let mut req = format!(
        "{}/v1/text-to-speech/v1/multi-stream-input?{XI_QUERY}",
        f.ws_url()
    )
    .into_client_request()
    .unwrap();
    req.headers_mut()
        .insert("xi-api-key", HeaderValue::from_str(f.api_key()).unwrap());
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

async fn xi_say(ws: &mut Ws, text: &str) {
    let init = json!({"text": " ", "context_id": "t"});
    ws.send(Message::Text(init.to_string().into()))
        .await
        .unwrap();
    let msg = json!({"text": text, "context_id": "t", "flush": true});
    ws.send(Message::Text(msg.to_string().into()))
        .await
        .unwrap();
}

/// refuse_connections and http_status answer the upgrade with ElevenLabs' error body.
#[tokio::test]
async fn elevenlabs_refuse_and_status() {
    let f = elevenlabs::spawn(elevenlabs::Config::default())
        .await
        .unwrap();
    post_faults(&f.base_url(), json!({"refuse_connections": true})).await;
    match xi_connect(&f).await.unwrap_err() {
        WsError::Http(resp) => assert_eq!(resp.status().as_u16(), 503),
        other => panic!("{other}"),
    }
    post_faults(&f.base_url(), json!({"http_status": 401})).await;
    match xi_connect(&f).await.unwrap_err() {
        WsError::Http(resp) => {
            assert_eq!(resp.status().as_u16(), 401);
            let body: Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            assert!(body["detail"]["message"].is_string());
        }
        other => panic!("{other}"),
    }
    delete_faults(&f.base_url()).await;
    assert!(xi_connect(&f).await.is_ok());
}

/// latency + first_byte_delay hold back the first audio message.
#[tokio::test]
async fn elevenlabs_latency_and_first_byte() {
    let f = elevenlabs::spawn(elevenlabs::Config::default())
        .await
        .unwrap();
    let mut ws = xi_connect(&f).await.unwrap();
    f.faults().update(|x| {
        x.latency_ms = 50;
        x.first_byte_delay_ms = 200;
    });
    let t0 = Instant::now();
    xi_say(&mut ws, "Hi. ").await;
    assert!(matches!(next(&mut ws).await, Seen::Json(m) if m["audio"].is_string()));
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    let t1 = Instant::now();
    assert!(matches!(next(&mut ws).await, Seen::Json(m) if m["isFinal"] == true));
    let gap = t1.elapsed();
    assert!(
        gap >= Duration::from_millis(45) && gap < Duration::from_millis(200),
        "{gap:?}"
    );
}

/// drop_after_messages cuts the audio stream mid-utterance without a close frame.
#[tokio::test]
async fn elevenlabs_drop_after_messages() {
    let f = elevenlabs::spawn(elevenlabs::Config::default())
        .await
        .unwrap();
    f.faults().update(|x| x.drop_after_messages = Some(2));
    let mut ws = xi_connect(&f).await.unwrap();
    xi_say(
        &mut ws,
        "A sentence long enough for several audio messages. ",
    )
    .await;
    assert!(matches!(next(&mut ws).await, Seen::Json(_)));
    assert!(matches!(next(&mut ws).await, Seen::Json(_)));
    expect_dropped(&mut ws).await;
    assert!(
        f.wait_for(Duration::from_secs(2), |c| c[0].closed.is_some())
            .await
    );
    assert_eq!(f.connections()[0].closed, Some(elevenlabs::Closed::Dropped));
    assert_eq!(
        f.characters_synthesized(),
        24,
        "only the audio actually sent is billed"
    );
}

/// drop_after_ms cuts a connection at that age.
#[tokio::test]
async fn elevenlabs_drop_after_ms() {
    let f = elevenlabs::spawn(elevenlabs::Config::default())
        .await
        .unwrap();
    f.faults().update(|x| x.drop_after_ms = Some(150));
    let mut ws = xi_connect(&f).await.unwrap();
    let t0 = Instant::now();
    expect_dropped(&mut ws).await;
    assert!(t0.elapsed() < Duration::from_secs(2));
}

// ---------------------------------------------------------------- Cerebras

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-oss-120b", "stream": stream,
           "messages": [{"role": "user", "content": "one two three four five six"}]})
}

async fn post_chat(f: &cerebras::Handle, stream: bool) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", f.base_url()))
        .bearer_auth(f.api_key())
        .json(&chat(stream))
        .send()
        .await
        .unwrap()
}

/// Reads SSE data payloads until the stream ends; reports whether `[DONE]` arrived and
/// whether the body ended in a transport error.
async fn read_sse(resp: reqwest::Response) -> (Vec<String>, bool, bool) {
    let mut events = resp.bytes_stream().eventsource();
    let mut data = Vec::new();
    while let Some(e) = events.next().await {
        match e {
            Ok(e) if e.data == "[DONE]" => return (data, true, false),
            Ok(e) => data.push(e.data),
            Err(_) => return (data, false, true),
        }
    }
    (data, false, false)
}

/// refuse_connections and http_status answer with the OpenAI-style error body.
#[tokio::test]
async fn cerebras_refuse_and_status() {
    let f = cerebras::spawn(cerebras::Config::default()).await.unwrap();
    post_faults(&f.base_url(), json!({"refuse_connections": true})).await;
    let resp = post_chat(&f, false).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.json::<Value>().await.unwrap()["error"]["message"].is_string());
    post_faults(&f.base_url(), json!({"http_status": 402})).await;
    let resp = post_chat(&f, true).await;
    assert_eq!(resp.status(), 402);
    assert!(resp.json::<Value>().await.unwrap()["error"]["type"].is_string());
    assert!(
        f.requests().is_empty(),
        "faulted requests never reach the handler"
    );
    delete_faults(&f.base_url()).await;
    assert_eq!(post_chat(&f, false).await.status(), 200);
}

/// latency + jitter: each request waits exactly the switch's seeded draw (replayed here
/// with a twin switch of the same seed), so jitter is real and deterministic.
#[tokio::test]
async fn cerebras_latency_and_seeded_jitter() {
    let seed = 42;
    let f = cerebras::spawn(cerebras::Config {
        fault_seed: seed,
        ..cerebras::Config::default()
    })
    .await
    .unwrap();
    let faults = Faults {
        latency_ms: 30,
        jitter_ms: 120,
        ..Faults::default()
    };
    let twin = FaultSwitch::with_seed(seed);
    twin.set(faults.clone());
    let expected: Vec<Duration> = (0..5).map(|_| twin.next_delay()).collect();
    assert!(expected.iter().any(|d| *d != expected[0]), "jitter varies");
    f.faults().set(faults);
    for want in expected {
        let t0 = Instant::now();
        assert_eq!(post_chat(&f, false).await.status(), 200);
        let took = t0.elapsed();
        assert!(
            took >= want && took < want + Duration::from_millis(100),
            "took {took:?}, want {want:?}"
        );
    }
}

/// first_byte_delay on a stream: headers come at once, the first event after the delay.
#[tokio::test]
async fn cerebras_first_byte_delay_on_stream() {
    let f = cerebras::spawn(cerebras::Config::default()).await.unwrap();
    f.faults().update(|x| x.first_byte_delay_ms = 300);
    let t0 = Instant::now();
    let resp = post_chat(&f, true).await;
    assert!(
        t0.elapsed() < Duration::from_millis(250),
        "headers were delayed"
    );
    let mut events = resp.bytes_stream().eventsource();
    let first = events.next().await.unwrap().unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert!(first.data.contains("\"role\":\"assistant\""));
}

/// first_byte_delay on a plain request delays the whole response.
#[tokio::test]
async fn cerebras_first_byte_delay_plain() {
    let f = cerebras::spawn(cerebras::Config::default()).await.unwrap();
    f.faults().update(|x| x.first_byte_delay_ms = 200);
    let t0 = Instant::now();
    assert_eq!(post_chat(&f, false).await.status(), 200);
    assert!(t0.elapsed() >= Duration::from_millis(200));
}

/// drop_after_messages cuts the SSE body after N events: no `[DONE]`, a transport error.
#[tokio::test]
async fn cerebras_drop_after_messages() {
    let f = cerebras::spawn(cerebras::Config::default()).await.unwrap();
    f.faults().update(|x| x.drop_after_messages = Some(3));
    let (data, done, broken) = read_sse(post_chat(&f, true).await).await;
    assert_eq!(data.len(), 3);
    assert!(!done && broken);
}

/// drop_after_ms cuts a slow stream at that age.
#[tokio::test]
async fn cerebras_drop_after_ms() {
    let f = cerebras::spawn(cerebras::Config {
        chunk_interval: Duration::from_millis(60),
        ..cerebras::Config::default()
    })
    .await
    .unwrap();
    f.faults().update(|x| x.drop_after_ms = Some(200));
    let t0 = Instant::now();
    let (data, done, broken) = read_sse(post_chat(&f, true).await).await;
    assert!(!done && broken);
    assert!(data.len() >= 2 && data.len() <= 5, "{} events", data.len());
    assert!(t0.elapsed() < Duration::from_secs(1));
}
