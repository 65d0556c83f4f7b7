//! The fake Cerebras driven by a client written from the OpenAI-compatible chat
//! completions docs (reqwest + eventsource-stream for SSE).

// Helpers here are test code too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmb_tests::fakes::cerebras::{self, Config};
use eventsource_stream::Eventsource as _;
use futures::StreamExt as _;
use serde_json::{json, Value};

async fn fake(cfg: Config) -> cerebras::Handle {
    cerebras::spawn(cfg).await.unwrap()
}

fn chat_body(user: &str, stream: bool) -> Value {
    json!({
        "model": "gpt-oss-120b",
        "messages": [
            {"role": "system", "content": "Coach Max here. You push people to train."},
            {"role": "user", "content": user}
        ],
        "stream": stream,
        "max_completion_tokens": 200,
        "temperature": 0.7
    })
}

async fn post(fake: &cerebras::Handle, key: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", fake.base_url()))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Reads an SSE response to the end: the JSON data payloads, and whether `[DONE]` came.
async fn read_sse(resp: reqwest::Response) -> (Vec<Value>, bool) {
    let mut events = resp.bytes_stream().eventsource();
    let mut out = Vec::new();
    while let Some(event) = events.next().await {
        let Ok(event) = event else {
            return (out, false);
        };
        if event.data == "[DONE]" {
            assert!(events.next().await.is_none(), "nothing may follow [DONE]");
            return (out, true);
        }
        out.push(serde_json::from_str(&event.data).unwrap());
    }
    (out, false)
}

/// The SDK's warm-up GET answers 200 without auth; the model list needs the key.
#[tokio::test]
async fn warming_and_models() {
    let f = fake(Config::default()).await;
    let http = reqwest::Client::new();
    let warm = http
        .get(format!("{}/v1/tcp_warming", f.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 200);
    assert_eq!(f.warming_hits(), 1);
    let anon = http
        .get(format!("{}/v1/models", f.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
    let models: Value = http
        .get(format!("{}/v1/models", f.base_url()))
        .bearer_auth(f.api_key())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "gpt-oss-120b");
}

/// A bad bearer key is 401 with an OpenAI-style `{"error":{…}}` body.
#[tokio::test]
async fn bad_key_is_401() {
    let f = fake(Config::default()).await;
    let resp = post(&f, "nope", &chat_body("hi", false)).await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].is_string());
    assert!(body["error"]["type"].is_string());
    assert_eq!(f.requests()[0].status, 401);
}

/// Unknown model is 404 model_not_found; a bad role is 400 naming `messages`.
#[tokio::test]
async fn validation_errors() {
    let f = fake(Config::default()).await;
    let mut body = chat_body("hi", false);
    body["model"] = json!("llama-3.3-70b");
    let resp = post(&f, f.api_key(), &body).await;
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "model_not_found"
    );
    let mut body = chat_body("hi", false);
    body["messages"][1]["role"] = json!("human");
    let resp = post(&f, f.api_key(), &body).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["param"],
        "messages"
    );
    let raw = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", f.base_url()))
        .bearer_auth(f.api_key())
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
}

/// Non-streaming: the echo reply, usage counted in words, the body recorded.
#[tokio::test]
async fn non_streaming_echo() {
    let f = fake(Config::default()).await;
    let resp: Value = post(&f, f.api_key(), &chat_body("I ran five miles", false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(resp["object"], "chat.completion");
    let reply = "Coach Max here! You said: I ran five miles. Let's keep going.";
    assert_eq!(resp["choices"][0]["message"]["role"], "assistant");
    assert_eq!(resp["choices"][0]["message"]["content"], reply);
    assert_eq!(resp["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        resp["usage"]["completion_tokens"],
        reply.split_whitespace().count()
    );
    assert_eq!(resp["usage"]["prompt_tokens"], 8 + 4);
    assert!(resp["time_info"]["total_time"].is_number());
    assert_eq!(
        f.requests()[0].body["messages"][1]["content"],
        "I ran five miles"
    );
}

/// Streaming: role chunk, word chunks that add up to the reply, a final chunk with
/// finish_reason/usage/time_info, then `[DONE]`.
#[tokio::test]
async fn streaming_shape() {
    let f = fake(Config::default()).await;
    let resp = post(&f, f.api_key(), &chat_body("hello", true)).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let (chunks, done) = read_sse(resp).await;
    assert!(done);
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        content,
        "Coach Max here! You said: hello. Let's keep going."
    );
    let content_chunks = chunks[1..chunks.len() - 1].len();
    assert_eq!(content_chunks, content.split_whitespace().count());
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert_eq!(
        last["usage"]["total_tokens"],
        last["usage"]["prompt_tokens"].as_u64().unwrap() + 9
    );
    assert!(last["time_info"].is_object());
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
}

/// Scripted replies are used in order, then the echo takes over.
#[tokio::test]
async fn scripted_replies() {
    let f = fake(Config {
        script: vec!["First line.".into()],
        ..Config::default()
    })
    .await;
    f.push_script(["Second line."]);
    let mut got = Vec::new();
    for _ in 0..3 {
        let (chunks, _) = read_sse(post(&f, f.api_key(), &chat_body("x", true)).await).await;
        got.push(
            chunks
                .iter()
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
                .collect::<String>(),
        );
    }
    assert_eq!(got[0], "First line.");
    assert_eq!(got[1], "Second line.");
    assert!(got[2].starts_with("Coach Max here!"));
}

/// max_completion_tokens truncates the reply and reports finish_reason "length".
#[tokio::test]
async fn max_tokens_truncates() {
    let f = fake(Config::default()).await;
    let mut body = chat_body("a b c", true);
    body["max_completion_tokens"] = json!(3);
    let (chunks, done) = read_sse(post(&f, f.api_key(), &body).await).await;
    assert!(done);
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Coach Max here!");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 3);
}

/// Planned failures: the next N requests answer the status with the error body, and the
/// scripted reply waits for the retry.
#[tokio::test]
async fn next_requests_fail_then_recover() {
    let f = fake(Config::default()).await;
    f.push_script(["After the storm."]);
    f.fail_next(2, 429);
    f.fail_next(1, 503);
    for expected in [429, 429, 503] {
        let resp = post(&f, f.api_key(), &chat_body("x", false)).await;
        assert_eq!(resp.status(), expected);
        let body: Value = resp.json().await.unwrap();
        assert!(body["error"]["message"].is_string());
    }
    let ok: Value = post(&f, f.api_key(), &chat_body("x", false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ok["choices"][0]["message"]["content"], "After the storm.");
    let statuses: Vec<u16> = f.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![429, 429, 503, 200]);
}

/// A planned 500 is answered as such.
#[tokio::test]
async fn planned_500() {
    let f = fake(Config::default()).await;
    f.fail_next(1, 500);
    let resp = post(&f, f.api_key(), &chat_body("x", true)).await;
    assert_eq!(resp.status(), 500);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["type"],
        "server_error"
    );
}

/// An error mid-stream arrives as a data payload with status_code, and no `[DONE]`.
#[tokio::test]
async fn error_mid_stream() {
    let f = fake(Config::default()).await;
    f.fail_mid_stream_next(1, 2, 429);
    let (chunks, done) = read_sse(post(&f, f.api_key(), &chat_body("x", true)).await).await;
    assert!(!done);
    assert_eq!(chunks.len(), 1 + 2 + 1);
    let err = chunks.last().unwrap();
    assert_eq!(err["status_code"], 429);
    assert!(err["error"]["message"].is_string());
    // The next stream is whole again.
    let (_, done) = read_sse(post(&f, f.api_key(), &chat_body("x", true)).await).await;
    assert!(done);
}

/// chunk_interval paces content chunks, so a stream takes visible time (barge-in tests).
#[tokio::test]
async fn chunk_interval_paces_stream() {
    let f = fake(Config {
        chunk_interval: Duration::from_millis(20),
        ..Config::default()
    })
    .await;
    let t0 = tokio::time::Instant::now();
    let (chunks, done) = read_sse(post(&f, f.api_key(), &chat_body("go", true)).await).await;
    assert!(done);
    let content_chunks = (chunks.len() - 2) as u32;
    assert!(t0.elapsed() >= Duration::from_millis(20) * content_chunks);
}

/// first_token_delay holds the first content chunk (not the role chunk); tokens_per_sec
/// then spreads the content chunks over (n - 1) / rate.
#[tokio::test]
async fn first_token_delay_and_token_rate() {
    let f = fake(Config {
        first_token_delay: Duration::from_millis(150),
        tokens_per_sec: Some(50.0),
        script: vec!["one two three four five six seven eight nine ten eleven".into()],
        ..Config::default()
    })
    .await;
    let t0 = std::time::Instant::now();
    let resp = post(&f, f.api_key(), &chat_body("go", true)).await;
    let mut events = resp.bytes_stream().eventsource();
    let mut first_content = None;
    let mut last_content = None;
    let mut words = 0u32;
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        if event.data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&event.data).unwrap();
        let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        if !content.is_empty() {
            words += 1;
            first_content.get_or_insert_with(|| t0.elapsed());
            last_content = Some(t0.elapsed());
        }
    }
    assert_eq!(words, 11);
    let first = first_content.unwrap();
    let last = last_content.unwrap();
    assert!(first >= Duration::from_millis(150), "{first:?}");
    // 10 gaps of 20 ms after the first.
    assert!(
        last - first >= Duration::from_millis(195),
        "{:?}",
        last - first
    );
}
