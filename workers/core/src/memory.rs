//! What a persona remembers about a caller between calls: when a call is worth
//! remembering, the bounded prompt that asks the LLM for the updated notes, how its
//! answer is cleaned and capped, and how the notes go into the next call's system prompt.
//!
//! Pure: the call's Durable Object sends the prompt (non-streaming, with a deadline)
//! after the call settled, and stores the result; if anything fails, the old notes stay.

use crate::prompt::{ChatMessage, Speaker};
use crate::session::TranscriptLine;

/// The longest notes kept, in characters (the issue's "about 1,200").
pub const MAX_CHARS: usize = 1200;
/// How much of a call's transcript goes into the update prompt, in characters (its end
/// is kept: that is where the commitments and goodbyes are).
pub const TRANSCRIPT_BUDGET_CHARS: usize = 8000;
/// The update's answer is short: about [`MAX_CHARS`] in tokens, with room.
pub const MAX_COMPLETION_TOKENS: u32 = 500;

/// Whether a call leaves anything to remember: the caller said something.
pub fn worth_remembering(lines: &[TranscriptLine]) -> bool {
    lines
        .iter()
        .any(|l| l.role == Speaker::User && !l.text.trim().is_empty())
}

/// The notes as they were before this call, with the day of the call they come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notes<'a> {
    pub summary: &'a str,
    /// `YYYY-MM-DD` of the last call folded in.
    pub day: &'a str,
}

/// The messages that ask for the updated notes: the previous notes and this call's
/// transcript (its last [`TRANSCRIPT_BUDGET_CHARS`]).
pub fn update_messages(
    persona_name: &str,
    previous: Option<Notes<'_>>,
    lines: &[TranscriptLine],
    call_day: &str,
) -> Vec<ChatMessage> {
    let system = format!(
        "You keep {persona_name}'s private notes about one caller, read before each phone \
         call with them. Write the updated notes: the caller's name and situation, their \
         goals, what either side committed to on the call, and what to follow up next time. \
         Keep what still matters from the previous notes and drop what no longer does. \
         Plain sentences, no lists, no markdown, at most {MAX_CHARS} characters. Write only \
         the notes."
    );
    let mut transcript = String::new();
    for l in lines {
        let text = l.text.trim();
        if text.is_empty() {
            continue;
        }
        let who = match l.role {
            Speaker::User => "Caller",
            Speaker::Assistant => persona_name,
        };
        transcript.push_str(&format!("{who}: {text}\n"));
    }
    let transcript = tail_chars(&transcript, TRANSCRIPT_BUDGET_CHARS);
    let previous = match previous {
        Some(n) => format!(
            "Previous notes (last call on {}):\n{}",
            n.day,
            cap(n.summary, MAX_CHARS)
        ),
        None => "Previous notes: none (this was the first call).".to_owned(),
    };
    vec![
        ChatMessage::new("system", system),
        ChatMessage::new(
            "user",
            format!("{previous}\n\nThe call on {call_day}:\n{transcript}"),
        ),
    ]
}

/// The LLM's answer as notes: trimmed, code fences and wrapping quotes removed, capped at
/// [`MAX_CHARS`] (at a sentence end if there is one in the last fifth, else a word).
/// `None` when nothing is left: the old notes stay.
pub fn clean(answer: &str) -> Option<String> {
    let mut s = answer.trim();
    s = s.trim_start_matches("```").trim_end_matches("```").trim();
    s = s.strip_prefix("text\n").unwrap_or(s).trim();
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        s = s[1..s.len() - 1].trim();
    }
    if s.is_empty() {
        return None;
    }
    Some(cap(s, MAX_CHARS))
}

/// The next call's system prompt with the notes, and the day of the call they are from.
pub fn with_notes(system_prompt: &str, notes: Option<Notes<'_>>) -> String {
    match notes {
        Some(n) if !n.summary.trim().is_empty() => format!(
            "{system_prompt}\n\nWhat you remember about this caller from earlier calls \
             (the last one on {}):\n{}",
            n.day,
            n.summary.trim()
        ),
        _ => system_prompt.to_owned(),
    }
}

/// `text` cut to at most `max` characters, at a sentence end in the last fifth when
/// there is one, else at a word boundary.
fn cap(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let cut: String = text.chars().take(max).collect();
    let floor = max * 4 / 5;
    let at_sentence = cut
        .char_indices()
        .rev()
        .find(|(i, c)| matches!(c, '.' | '!' | '?') && cut[..*i].chars().count() >= floor)
        .map(|(i, c)| i + c.len_utf8());
    let end = at_sentence
        .or_else(|| cut.rfind(char::is_whitespace))
        .unwrap_or(cut.len());
    cut[..end].trim_end().to_owned()
}

/// The last `max` characters of `text`, starting at a line when one begins in them.
fn tail_chars(text: &str, max: usize) -> &str {
    let count = text.chars().count();
    if count <= max {
        return text;
    }
    let start = text.char_indices().nth(count - max).map_or(0, |(i, _)| i);
    let tail = &text[start..];
    match tail.find('\n') {
        Some(nl) if nl + 1 < tail.len() => &tail[nl + 1..],
        _ => tail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(role: Speaker, text: &str) -> TranscriptLine {
        TranscriptLine {
            seq: 0,
            role,
            text: text.into(),
            at_ms: 0,
            interrupted: false,
        }
    }

    #[test]
    fn only_a_call_where_the_caller_spoke_is_remembered() {
        assert!(!worth_remembering(&[]));
        assert!(!worth_remembering(&[line(
            Speaker::Assistant,
            "Hi, it's Brad!"
        )]));
        assert!(!worth_remembering(&[
            line(Speaker::Assistant, "Hi!"),
            line(Speaker::User, "  ")
        ]));
        assert!(worth_remembering(&[
            line(Speaker::Assistant, "Hi!"),
            line(Speaker::User, "I want to run 5 km by Friday.")
        ]));
    }

    #[test]
    fn the_update_prompt_carries_the_old_notes_and_the_call() {
        let lines = [
            line(Speaker::Assistant, "Hey, it's Brad!"),
            line(Speaker::User, "I'm Sam. I want to run 5 km by Friday."),
        ];
        let m = update_messages(
            "Brad",
            Some(Notes {
                summary: "Sam is training for a race.",
                day: "2026-11-30",
            }),
            &lines,
            "2026-12-01",
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].role, "system");
        assert!(m[0].content.contains("Brad's private notes"));
        assert!(m[0].content.contains("1200 characters"));
        let user = &m[1].content;
        assert!(
            user.contains("Previous notes (last call on 2026-11-30):\nSam is training for a race.")
        );
        assert!(user.contains("The call on 2026-12-01:\nBrad: Hey, it's Brad!\nCaller: I'm Sam. I want to run 5 km by Friday.\n"));
        let first = update_messages("Brad", None, &lines, "2026-12-01");
        assert!(first[1].content.starts_with("Previous notes: none"));
    }

    /// A long call keeps its end within the budget, from a whole line.
    #[test]
    fn the_update_prompt_is_bounded() {
        let long: Vec<TranscriptLine> = (0..2000)
            .map(|i| line(Speaker::User, &format!("line {i} of a long call")))
            .collect();
        let m = update_messages("Brad", None, &long, "2026-12-01");
        let user = &m[1].content;
        assert!(user.chars().count() < TRANSCRIPT_BUDGET_CHARS + 200);
        assert!(user.ends_with("Caller: line 1999 of a long call\n"));
        let body = &user[user.find("2026-12-01:\n").unwrap() + 12..];
        assert!(
            body.starts_with("Caller: line "),
            "starts at a whole line: {body:.40}"
        );
    }

    #[test]
    fn answers_are_cleaned_and_capped() {
        assert_eq!(clean("  Sam runs.  ").as_deref(), Some("Sam runs."));
        assert_eq!(clean("\"Sam runs.\"").as_deref(), Some("Sam runs."));
        assert_eq!(clean("```\nSam runs.\n```").as_deref(), Some("Sam runs."));
        assert_eq!(
            clean("```text\nSam runs.\n```").as_deref(),
            Some("Sam runs.")
        );
        assert_eq!(clean(""), None);
        assert_eq!(clean(" ``` ``` "), None);
        let sentence = "Sam wants to run five kilometres by Friday. ";
        let long = sentence.repeat(60);
        let capped = clean(&long).unwrap();
        assert!(capped.chars().count() <= MAX_CHARS);
        assert!(
            capped.ends_with("Friday."),
            "cut at a sentence: {capped:.40}"
        );
        let words = "word ".repeat(400);
        let capped = clean(&words).unwrap();
        assert!(capped.chars().count() <= MAX_CHARS && capped.ends_with("word"));
        let wide = "é".repeat(2000);
        assert_eq!(clean(&wide).unwrap().chars().count(), MAX_CHARS);
    }

    #[test]
    fn notes_go_into_the_next_calls_system_prompt_with_their_day() {
        let p = with_notes(
            "You are Brad.",
            Some(Notes {
                summary: " Sam wants 5 km by Friday. ",
                day: "2026-12-01",
            }),
        );
        assert_eq!(
            p,
            "You are Brad.\n\nWhat you remember about this caller from earlier calls (the last one on 2026-12-01):\nSam wants 5 km by Friday."
        );
        assert_eq!(with_notes("You are Brad.", None), "You are Brad.");
        assert_eq!(
            with_notes(
                "You are Brad.",
                Some(Notes {
                    summary: " ",
                    day: "2026-12-01"
                })
            ),
            "You are Brad."
        );
    }
}
