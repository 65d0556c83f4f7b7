//! Builds the LLM prompt for one persona turn: the persona's system prompt, an optional
//! summary of earlier calls, and as much of this call's conversation as fits a token
//! budget (newest kept first).
//!
//! Pure: the Durable Object passes the history in and sends the result to the LLM.

use serde::{Deserialize, Serialize};

/// An OpenAI-compatible chat message: `system`, `user`, `assistant` (which may carry
/// `tool_calls`, and then `content: null` when it said nothing) or `tool` (a tool's
/// result, answering `tool_call_id`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub content: String,
    #[serde(default)]
    pub tool_calls: Vec<crate::tools::ToolCall>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

impl Serialize for ChatMessage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("role", &self.role)?;
        if self.content.is_empty() && !self.tool_calls.is_empty() {
            m.serialize_entry("content", &())?;
        } else {
            m.serialize_entry("content", &self.content)?;
        }
        if !self.tool_calls.is_empty() {
            let calls: Vec<serde_json::Value> = self
                .tool_calls
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "id": c.id,
                        "type": "function",
                        "function": { "name": c.name, "arguments": c.arguments },
                    })
                })
                .collect();
            m.serialize_entry("tool_calls", &calls)?;
        }
        if let Some(id) = &self.tool_call_id {
            m.serialize_entry("tool_call_id", id)?;
        }
        m.end()
    }
}

/// Who said a line of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Speaker {
    User,
    Assistant,
}

/// A rough token estimate (≈ 4 characters per token, at least 1 per message) — good
/// enough to keep a prompt inside a budget without shipping a tokenizer to the Worker.
pub fn estimate_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4) + 1
}

/// Assembles the messages for the next reply. The system prompt (and summary) are always
/// kept; from the conversation, the newest lines are kept while they fit `budget_tokens`,
/// and the oldest dropped. Empty lines are skipped.
pub fn build_messages(
    system_prompt: &str,
    summary: Option<&str>,
    history: &[(Speaker, String)],
    budget_tokens: usize,
) -> Vec<ChatMessage> {
    let mut system = system_prompt.to_string();
    if let Some(s) = summary.map(str::trim).filter(|s| !s.is_empty()) {
        system.push_str("\n\nWhat you and this caller talked about in earlier calls:\n");
        system.push_str(s);
    }
    let mut used = estimate_tokens(&system);
    let mut kept: Vec<ChatMessage> = Vec::new();
    for (speaker, text) in history.iter().rev() {
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let cost = estimate_tokens(text);
        if used + cost > budget_tokens && !kept.is_empty() {
            break;
        }
        used += cost;
        kept.push(ChatMessage::new(
            match speaker {
                Speaker::User => "user",
                Speaker::Assistant => "assistant",
            },
            text,
        ));
    }
    kept.reverse();
    let mut messages = Vec::with_capacity(kept.len() + 1);
    messages.push(ChatMessage::new("system", system));
    messages.extend(kept);
    messages
}

/// Splits streamed text at clause boundaries so speech can start before the reply is
/// complete: returns the complete clauses in `buffer` and leaves the rest in it.
pub fn take_clauses(buffer: &mut String) -> Option<String> {
    let cut = buffer
        .char_indices()
        .filter(|(_, c)| matches!(c, '.' | '!' | '?' | ',' | ';' | ':'))
        .map(|(i, c)| i + c.len_utf8())
        .next_back()?;
    let rest = buffer.split_off(cut);
    let clauses = std::mem::replace(buffer, rest);
    Some(clauses)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: Speaker, t: &str) -> (Speaker, String) {
        (s, t.to_string())
    }

    /// The system prompt comes first, then the conversation in order.
    #[test]
    fn keeps_everything_within_budget() {
        let h = vec![
            line(Speaker::Assistant, "Hi!"),
            line(Speaker::User, "Hello there"),
        ];
        let m = build_messages("You are Brad.", None, &h, 1000);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].role, "system");
        assert_eq!(m[1].role, "assistant");
        assert_eq!(m[2].content, "Hello there");
    }

    /// Over budget, the oldest lines go and the newest stay.
    #[test]
    fn drops_oldest_first() {
        let h: Vec<_> = (0..50)
            .map(|i| {
                line(
                    Speaker::User,
                    &format!("message number {i} with some words"),
                )
            })
            .collect();
        let m = build_messages("sys", None, &h, 60);
        assert!(m.len() < 51);
        assert_eq!(
            m.last().unwrap().content,
            "message number 49 with some words"
        );
        assert!(m
            .iter()
            .all(|x| x.content != "message number 0 with some words"));
    }

    /// The newest line is kept even when it alone exceeds the budget.
    #[test]
    fn always_keeps_the_latest_line() {
        let long = "word ".repeat(500);
        let m = build_messages("sys", None, &[line(Speaker::User, &long)], 10);
        assert_eq!(m.len(), 2);
    }

    /// A summary of earlier calls is appended to the system prompt.
    #[test]
    fn summary_goes_into_the_system_prompt() {
        let m = build_messages("sys", Some("They run 5k."), &[], 100);
        assert!(m[0].content.contains("They run 5k."));
        let m = build_messages("sys", Some("  "), &[], 100);
        assert_eq!(m[0].content, "sys");
    }

    /// Clauses are taken up to the last boundary; the tail waits for more text.
    #[test]
    fn clause_splitting() {
        let mut b = String::from("Hey there, how are");
        assert_eq!(take_clauses(&mut b).as_deref(), Some("Hey there,"));
        assert_eq!(b, " how are");
        assert_eq!(take_clauses(&mut b), None);
        b.push_str(" you? Good.");
        assert_eq!(take_clauses(&mut b).as_deref(), Some(" how are you? Good."));
        assert_eq!(b, "");
    }
}
