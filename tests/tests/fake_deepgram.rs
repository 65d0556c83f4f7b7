//! The fake Deepgram driven by a client written from Deepgram's live-streaming docs
//! (tokio-tungstenite, `Authorization: Token`, binary μ-law frames, JSON control messages).

// Helpers here are test code too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmb_tests::audio;
use cmb_tests::fakes::deepgram::{
    self, Closed, Config, IDLE_CLOSE_CODE, IDLE_CLOSE_REASON, LISTEN_PATH,
};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const PROD_QUERY: &str = "model=nova-3&encoding=mulaw&sample_rate=8000&channels=1&interim_results=true&endpointing=300&utterance_end_ms=1000&vad_events=true&smart_format=true&punctuate=true&language=en";

async fn fake(cfg: Config) -> deepgram::Handle {
    deepgram::spawn(cfg).await.unwrap()
}

async fn connect_with(
    fake: &deepgram::Handle,
    query: &str,
    auth: Option<&str>,
) -> Result<Ws, WsError> {
    let url = format!("{}{LISTEN_PATH}?{query}", fake.ws_url());
    let mut request = url.into_client_request().unwrap();
    if let Some(auth) = auth {
        request
            .headers_mut()
            .insert("Authorization", HeaderValue::from_str(auth).unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(ws, _)| ws)
}

async fn connect(fake: &deepgram::Handle, query: &str) -> Ws {
    let auth = format!("Token {}", fake.api_key());
    connect_with(fake, query, Some(&auth)).await.unwrap()
}

/// Sends audio in Twilio-sized 20 ms frames, as the relay does.
async fn send_audio(ws: &mut Ws, ulaw: &[u8]) {
    for frame in ulaw.chunks(160) {
        ws.send(Message::Binary(frame.to_vec().into()))
            .await
            .unwrap();
    }
}

async fn send_json(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.unwrap();
}

/// What a client sees next: a JSON message, a close frame, or the end of the stream.
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

/// Reads JSON messages until `stop` matches one (inclusive).
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
            other => panic!("stream ended before the expected message: {other:?}, got {out:?}"),
        }
    }
}

fn http_status(err: &WsError) -> Option<(u16, Option<String>)> {
    match err {
        WsError::Http(resp) => Some((
            resp.status().as_u16(),
            resp.headers()
                .get("dg-error")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        )),
        _ => None,
    }
}

/// A missing or wrong key fails the handshake with 401 and a `dg-error` header.
#[tokio::test]
async fn bad_auth_is_401_at_handshake() {
    let f = fake(Config::default()).await;
    for auth in [
        None,
        Some("Token nope"),
        Some("Bearer dg-test-key"),
        Some("dg-test-key"),
    ] {
        let err = connect_with(&f, PROD_QUERY, auth).await.unwrap_err();
        let (status, dg_error) = http_status(&err).unwrap();
        assert_eq!(status, 401, "{auth:?}");
        assert!(dg_error.is_some());
    }
    assert_eq!(f.connection_count(), 0);
}

/// Unknown encodings and a missing sample_rate fail the handshake with 400.
#[tokio::test]
async fn bad_query_is_400_at_handshake() {
    let f = fake(Config::default()).await;
    let auth = "Token dg-test-key";
    for query in [
        "model=nova-3&encoding=mp3&sample_rate=8000",
        "model=nova-3&encoding=mulaw",
        "encoding=mulaw&sample_rate=8000",
        "model=nova-3&encoding=mulaw&sample_rate=8000&utterance_end_ms=1000",
    ] {
        let err = connect_with(&f, query, Some(auth)).await.unwrap_err();
        assert_eq!(http_status(&err).unwrap().0, 400, "{query}");
    }
}

/// The production query gets SpeechStarted, interims, a speech_final result carrying the
/// tone-coded text, UtteranceEnd, and on CloseStream a Metadata then a normal close.
#[tokio::test]
async fn full_turn_with_production_query() {
    let f = fake(Config::default()).await;
    let mut ws = connect(&f, PROD_QUERY).await;
    let said = "book a table for two";
    send_audio(
        &mut ws,
        &[
            audio::silence(200),
            audio::encode_text(said),
            audio::silence(1200),
        ]
        .concat(),
    )
    .await;

    let msgs = read_until(&mut ws, |m| m["type"] == "UtteranceEnd").await;
    assert_eq!(msgs[0]["type"], "SpeechStarted");
    assert_eq!(msgs[0]["channel"], serde_json::json!([0, 1]));
    let interims: Vec<_> = msgs
        .iter()
        .filter(|m| m["type"] == "Results" && m["is_final"] == false)
        .collect();
    assert!(!interims.is_empty());
    for i in &interims {
        let t = i["channel"]["alternatives"][0]["transcript"]
            .as_str()
            .unwrap();
        assert!(
            said.starts_with(t),
            "interim {t:?} is a prefix of what was said"
        );
    }
    let finals: Vec<_> = msgs.iter().filter(|m| m["is_final"] == true).collect();
    assert_eq!(finals.len(), 1);
    assert_eq!(finals[0]["speech_final"], true);
    assert_eq!(finals[0]["channel"]["alternatives"][0]["transcript"], said);
    assert_eq!(finals[0]["channel_index"], serde_json::json!([0, 1]));
    let words = finals[0]["channel"]["alternatives"][0]["words"]
        .as_array()
        .unwrap();
    assert_eq!(words.len(), 5);
    assert_eq!(words[0]["start"], 0.2);
    assert!(finals[0]["metadata"]["request_id"].is_string());

    send_json(&mut ws, r#"{"type":"CloseStream"}"#).await;
    let meta = read_until(&mut ws, |m| m["type"] == "Metadata").await;
    let meta = meta.last().unwrap();
    assert_eq!(meta["channels"], 1);
    assert_eq!(meta["duration"], 0.2 + 0.8 + 1.2);
    assert!(matches!(next(&mut ws).await, Seen::Close(Some((1000, _)))));

    assert!(
        f.wait_for(Duration::from_secs(2), |c| c[0].closed.is_some())
            .await
    );
    let conns = f.connections();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].param("utterance_end_ms"), Some("1000"));
    assert_eq!(conns[0].bytes_received, 8 * (200 + 800 + 1200));
    assert_eq!(f.finals_sent(), vec![said.to_owned()]);
    assert_eq!(
        f.close_reasons(),
        vec![Some(Closed::ByServer {
            code: 1000,
            reason: String::new()
        })]
    );
}

/// `endpointing_override_ms` replaces the query's endpointing: with 600 ms instead of
/// the query's 300, 400 ms of silence does not end the utterance; 700 ms does.
#[tokio::test]
async fn endpointing_override_replaces_the_query() {
    let f = fake(Config {
        endpointing_override_ms: Some(600),
        ..Config::default()
    })
    .await;
    let mut ws = connect(&f, PROD_QUERY).await;
    send_audio(
        &mut ws,
        &[audio::encode_text("hello there"), audio::silence(400)].concat(),
    )
    .await;
    let mut early = Vec::new();
    while let Ok(Some(Ok(Message::Text(t)))) =
        tokio::time::timeout(Duration::from_millis(300), ws.next()).await
    {
        early.push(serde_json::from_str::<Value>(t.as_str()).unwrap());
    }
    assert!(
        early.iter().all(|m| m["is_final"] != true),
        "final after 400 ms of silence: {early:?}"
    );
    send_audio(&mut ws, &audio::silence(300)).await;
    let msgs = read_until(&mut ws, |m| m["is_final"] == true).await;
    let last = msgs.last().unwrap();
    assert_eq!(last["speech_final"], true);
    assert_eq!(
        last["channel"]["alternatives"][0]["transcript"],
        "hello there"
    );
    assert_eq!(f.connections()[0].param("endpointing"), Some("300"));
}

/// Non-tone speech is transcribed from the script, in order.
#[tokio::test]
async fn scripted_transcripts_for_plain_audio() {
    let f = fake(Config::default()).await;
    f.push_script(["I want to cancel"]);
    let mut ws = connect(
        &f,
        "model=nova-3&encoding=mulaw&sample_rate=8000&endpointing=200",
    )
    .await;
    // Loud noise: speech to the VAD, but no clean tone.
    let noise: Vec<u8> = (0..4800u32)
        .map(|i| audio::ulaw_encode(((i.wrapping_mul(2_654_435_761) >> 16) as i16) / 3))
        .collect();
    send_audio(&mut ws, &[noise, audio::silence(400)].concat()).await;
    let msgs = read_until(&mut ws, |m| m["is_final"] == true).await;
    assert_eq!(
        msgs.last().unwrap()["channel"]["alternatives"][0]["transcript"],
        "I want to cancel"
    );
}

/// Finalize flushes the speech in progress; the result is marked from_finalize.
#[tokio::test]
async fn finalize_flushes_with_from_finalize() {
    let f = fake(Config::default()).await;
    let mut ws = connect(&f, PROD_QUERY).await;
    send_audio(&mut ws, &audio::encode_text("hold on")).await;
    send_json(&mut ws, r#"{"type":"Finalize"}"#).await;
    let msgs = read_until(&mut ws, |m| m["from_finalize"] == true).await;
    let last = msgs.last().unwrap();
    assert_eq!(last["is_final"], true);
    assert_eq!(last["channel"]["alternatives"][0]["transcript"], "hold on");
}

/// With no audio and no KeepAlive the fake closes 1011 NET-0001 after the idle window.
#[tokio::test]
async fn idle_stream_closes_net_0001() {
    let f = fake(Config {
        idle_timeout: Duration::from_millis(200),
        ..Config::default()
    })
    .await;
    let mut ws = connect(&f, PROD_QUERY).await;
    let started = tokio::time::Instant::now();
    match next(&mut ws).await {
        Seen::Close(Some((code, reason))) => {
            assert_eq!(code, IDLE_CLOSE_CODE);
            assert_eq!(reason, IDLE_CLOSE_REASON);
        }
        other => panic!("expected close, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(200));
}

/// KeepAlive resets the idle timer (and gets no reply); Finalize alone does not.
#[tokio::test]
async fn keepalive_resets_idle_timer() {
    let f = fake(Config {
        idle_timeout: Duration::from_millis(250),
        ..Config::default()
    })
    .await;
    let mut ws = connect(&f, PROD_QUERY).await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        send_json(&mut ws, r#"{"type":"KeepAlive"}"#).await;
    }
    // 500 ms in, still open: nothing was received.
    let quick = tokio::time::timeout(Duration::from_millis(50), ws.next()).await;
    assert!(
        quick.is_err(),
        "KeepAlive got a reply or the stream closed: {quick:?}"
    );
    assert!(matches!(next(&mut ws).await, Seen::Close(Some((1011, _)))));
    assert_eq!(f.connections()[0].controls, vec!["KeepAlive"; 5]);
}

/// An empty binary frame closes the stream (flush + Metadata + 1000), as the docs warn.
#[tokio::test]
async fn empty_binary_frame_closes_stream() {
    let f = fake(Config::default()).await;
    let mut ws = connect(&f, PROD_QUERY).await;
    send_audio(&mut ws, &audio::silence(100)).await;
    ws.send(Message::Binary(Vec::new().into())).await.unwrap();
    let msgs = read_until(&mut ws, |m| m["type"] == "Metadata").await;
    assert_eq!(msgs.last().unwrap()["duration"], 0.1);
    assert!(matches!(next(&mut ws).await, Seen::Close(Some((1000, _)))));
}

/// An unknown control message gets a SchemaError and a 1008 close.
#[tokio::test]
async fn unknown_control_message_is_refused() {
    let f = fake(Config::default()).await;
    let mut ws = connect(&f, PROD_QUERY).await;
    send_json(&mut ws, r#"{"type":"Keepalive"}"#).await;
    let msgs = read_until(&mut ws, |m| m["type"] == "Error").await;
    assert_eq!(msgs[0]["variant"], "SchemaError");
    assert!(matches!(next(&mut ws).await, Seen::Close(Some((1008, _)))));
}

/// A client close is recorded with its code.
#[tokio::test]
async fn client_close_is_recorded() {
    let f = fake(Config::default()).await;
    let mut ws = connect(&f, PROD_QUERY).await;
    ws.close(None).await.unwrap();
    assert!(
        f.wait_for(Duration::from_secs(2), |c| c[0].closed.is_some())
            .await
    );
    assert!(matches!(
        f.close_reasons()[0],
        Some(Closed::ByClient { .. })
    ));
}
