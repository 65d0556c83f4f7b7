//! Streaming chat completions from an OpenAI-compatible endpoint (Cerebras by default,
//! `LLM_API_BASE`), parsed with `eventsource-stream`.
//!
//! The session shell reads the event stream itself (with its deadlines), so the persona
//! starts speaking before the reply is complete. Usage comes from the final chunk.

use cmb_core::config::WorkerConfig;
use cmb_core::prompt::ChatMessage;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use worker::{Fetch, Method};

use super::{request, Body};

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
}

#[derive(Deserialize, Default)]
struct Delta {
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<cmb_core::tools::ToolCallDelta>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// What one SSE event of the stream carried.
#[derive(Debug, Default)]
pub struct Piece {
    pub text: Vec<String>,
    /// Fragments of tool calls (PROTOCOLS.md §9), to assemble per index.
    pub tool_calls: Vec<cmb_core::tools::ToolCallDelta>,
    pub usage: Option<(u64, u64)>,
    /// `[DONE]`: the stream is over.
    pub done: bool,
}

/// Parses one SSE event's data.
pub fn parse_event(data: &str) -> Result<Piece, LlmError> {
    if data.trim() == "[DONE]" {
        return Ok(Piece {
            done: true,
            ..Piece::default()
        });
    }
    let chunk: Chunk =
        serde_json::from_str(data).map_err(|e| LlmError::Stream(format!("bad chunk: {e}")))?;
    if let Some(err) = chunk.error {
        return Err(LlmError::Stream(err.to_string()));
    }
    let mut piece = Piece::default();
    for choice in chunk.choices {
        if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
            piece.text.push(text);
        }
        piece.tool_calls.extend(choice.delta.tool_calls);
    }
    piece.usage = chunk.usage.map(|u| (u.prompt_tokens, u.completion_tokens));
    Ok(piece)
}

/// Sends the chat-completions request (aborted through `signal`) and returns its SSE
/// event stream.
pub async fn open(
    cfg: &WorkerConfig,
    messages: &[ChatMessage],
    tools: cmb_core::tools::Offer,
    signal: &worker::AbortSignal,
) -> Result<impl futures::Stream<Item = Result<String, LlmError>>, LlmError> {
    let body = json!({
        "model": cfg.llm_model,
        "messages": messages,
        "stream": true,
        "stream_options": { "include_usage": true },
        "max_completion_tokens": MAX_COMPLETION_TOKENS,
        "temperature": 0.7,
        "tools": cmb_core::tools::definitions(tools),
        "tool_choice": "auto",
    });
    let transport = |e: worker::Error| LlmError::Transport(e.to_string());
    let auth = format!("Bearer {}", cfg.llm_api_key.expose());
    let url = format!("{}/chat/completions", cfg.llm_api_base);
    // The session's deadlines (first token, whole reply) abort it through `signal`.
    let req = request(
        Method::Post,
        &url,
        &[("authorization", &auth), ("accept", "text/event-stream")],
        Some(Body::Json(body.to_string())),
    )
    .map_err(|e| LlmError::Transport(e.to_string()))?;
    let mut resp = Fetch::Request(req)
        .send_with_signal(signal)
        .await
        .map_err(transport)?;
    let status = resp.status_code();
    if status != 200 {
        let text = resp.text().await.unwrap_or_default();
        return Err(LlmError::Http {
            status,
            message: text.chars().take(300).collect(),
        });
    }
    let events = resp.stream().map_err(transport)?.eventsource();
    Ok(events.map(|e| {
        e.map(|e| e.data)
            .map_err(|e| LlmError::Stream(e.to_string()))
    }))
}

/// A whole (non-streaming) completion's deadline: it runs after the call, in the
/// background, so it may take longer than a turn but not forever.
const COMPLETE_TIMEOUT_MS: u32 = 20_000;

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    choices: Vec<CompletionChoice>,
}

#[derive(Deserialize)]
struct CompletionChoice {
    message: CompletionMessage,
}

#[derive(Deserialize)]
struct CompletionMessage {
    #[serde(default)]
    content: Option<String>,
}

/// One non-streaming completion (at most `max_tokens`); its text.
pub async fn complete(
    cfg: &WorkerConfig,
    messages: &[ChatMessage],
    max_tokens: u32,
) -> Result<String, LlmError> {
    let body = json!({
        "model": cfg.llm_model,
        "messages": messages,
        "stream": false,
        "max_completion_tokens": max_tokens,
        "temperature": 0.3,
    });
    let auth = format!("Bearer {}", cfg.llm_api_key.expose());
    let url = format!("{}/chat/completions", cfg.llm_api_base);
    let req = request(
        Method::Post,
        &url,
        &[("authorization", &auth)],
        Some(Body::Json(body.to_string())),
    )
    .map_err(|e| LlmError::Transport(e.to_string()))?;
    let answer = super::send(req, COMPLETE_TIMEOUT_MS)
        .await
        .map_err(|e| LlmError::Transport(e.to_string()))?;
    if answer.status != 200 {
        return Err(LlmError::Http {
            status: answer.status,
            message: answer.snippet(300),
        });
    }
    let completion: Completion = serde_json::from_slice(&answer.body)
        .map_err(|e| LlmError::Stream(format!("bad completion: {e}")))?;
    completion
        .choices
        .into_iter()
        .next()
        .and_then(|c| c.message.content)
        .ok_or_else(|| LlmError::Stream("a completion without content".into()))
}

#[cfg(test)]
// A panic in a test is that test's failure.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn assembled(events: &[&str]) -> (String, Vec<cmb_core::tools::ToolCall>) {
        let mut text = String::new();
        let mut calls = cmb_core::tools::Assembler::default();
        for e in events {
            let piece = parse_event(e).unwrap();
            text.extend(piece.text);
            for d in piece.tool_calls {
                calls.push(d);
            }
        }
        (text, calls.finish())
    }

    /// PROTOCOLS.md §9, tools only: `content: null`, then the fragments.
    #[test]
    fn a_tools_only_reply_assembles_its_call() {
        let (text, calls) = assembled(&[
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"schedule_callback","arguments":""}}]},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"delay_"}}]},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"minutes\":10}"}}]},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":5,"completion_tokens":7}}"#,
        ]);
        assert_eq!(text, "");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].id, "call_1");
        assert_eq!(calls[0].name, "schedule_callback");
        assert_eq!(calls[0].arguments, r#"{"delay_minutes":10}"#);
        assert!(parse_event("[DONE]").unwrap().done);
    }

    /// Some models speak and call in one response: both are kept.
    #[test]
    fn content_and_tools_in_one_reply() {
        let (text, calls) = assembled(&[
            r#"{"choices":[{"index":0,"delta":{"content":"Bye, Sam!"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":" Talk soon.","tool_calls":[{"index":0,"id":"call_2","type":"function","function":{"name":"end_call","arguments":"{}"}}]},"finish_reason":"tool_calls"}]}"#,
        ]);
        assert_eq!(text, "Bye, Sam! Talk soon.");
        assert_eq!(calls[0].name, "end_call");
    }

    /// Malformed arguments assemble as sent (the session answers them with an error
    /// result); a malformed chunk is a stream error, not a panic.
    #[test]
    fn malformed_arguments_and_chunks() {
        let (_, calls) = assembled(&[
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_3","type":"function","function":{"name":"end_call","arguments":"{\"reason\":"}}]},"finish_reason":"tool_calls"}]}"#,
        ]);
        assert_eq!(calls[0].arguments, "{\"reason\":");
        assert!(cmb_core::tools::parse(&calls[0], 0).is_err());
        assert!(matches!(parse_event("{not json"), Err(LlmError::Stream(_))));
    }
}
