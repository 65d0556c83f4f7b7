//! Streaming chat completions from an OpenAI-compatible endpoint (Cerebras by default,
//! `LLM_API_BASE`), parsed with `eventsource-stream`.
//!
//! Text deltas are handed to the caller as they arrive, so the persona starts speaking
//! before the reply is complete. Usage comes from the final chunk.

use cmb_core::config::WorkerConfig;
use cmb_core::prompt::ChatMessage;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use worker::{Fetch, Headers, Method, Request, RequestInit};

/// Replies are spoken: keep them short.
const MAX_COMPLETION_TOKENS: u32 = 220;

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("LLM unreachable: {0}")]
    Transport(String),
    #[error("LLM answered HTTP {status}: {message}")]
    Http { status: u16, message: String },
    #[error("LLM stream error: {0}")]
    Stream(String),
}

/// What a completed reply cost and how fast it started.
#[derive(Debug, Default, Clone)]
pub struct Completion {
    pub text: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Request sent → first content delta, in ms.
    pub first_token_ms: Option<u64>,
    pub finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<Usage>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Delta,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct Delta {
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
}

fn now_ms() -> u64 {
    worker::Date::now().as_millis()
}

/// Streams a reply, calling `on_delta` with each piece of text as it arrives.
pub async fn stream_reply(
    cfg: &WorkerConfig,
    messages: &[ChatMessage],
    mut on_delta: impl FnMut(&str),
) -> Result<Completion, LlmError> {
    let body = json!({
        "model": cfg.llm_model,
        "messages": messages,
        "stream": true,
        "stream_options": { "include_usage": true },
        "max_completion_tokens": MAX_COMPLETION_TOKENS,
        "temperature": 0.7,
    });
    let transport = |e: worker::Error| LlmError::Transport(e.to_string());
    let headers = Headers::new();
    headers
        .set(
            "authorization",
            &format!("Bearer {}", cfg.llm_api_key.expose()),
        )
        .map_err(transport)?;
    headers
        .set("content-type", "application/json")
        .map_err(transport)?;
    headers
        .set("accept", "text/event-stream")
        .map_err(transport)?;
    let mut init = RequestInit::new();
    init.with_method(Method::Post)
        .with_headers(headers)
        .with_body(Some(body.to_string().into()));
    let url = format!("{}/chat/completions", cfg.llm_api_base);
    let started = now_ms();
    let req = Request::new_with_init(&url, &init).map_err(transport)?;
    let mut resp = Fetch::Request(req).send().await.map_err(transport)?;
    let status = resp.status_code();
    if status != 200 {
        let text = resp.text().await.unwrap_or_default();
        return Err(LlmError::Http {
            status,
            message: text.chars().take(300).collect(),
        });
    }
    let mut events = resp.stream().map_err(transport)?.eventsource();
    let mut out = Completion::default();
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| LlmError::Stream(e.to_string()))?;
        if event.data.trim() == "[DONE]" {
            break;
        }
        let chunk: Chunk = serde_json::from_str(&event.data)
            .map_err(|e| LlmError::Stream(format!("bad chunk: {e}")))?;
        if let Some(err) = chunk.error {
            return Err(LlmError::Stream(err.to_string()));
        }
        for choice in chunk.choices {
            if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                if out.first_token_ms.is_none() {
                    out.first_token_ms = Some(now_ms().saturating_sub(started));
                }
                on_delta(&text);
                out.text.push_str(&text);
            }
            if choice.finish_reason.is_some() {
                out.finish_reason = choice.finish_reason;
            }
        }
        if let Some(u) = chunk.usage {
            out.prompt_tokens = u.prompt_tokens;
            out.completion_tokens = u.completion_tokens;
        }
    }
    Ok(out)
}
