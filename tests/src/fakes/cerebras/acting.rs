//! The fake's stand-in for a model's judgement, for the `cargo xtask dev` demo (off in
//! tests unless asked for): a few keyword rules that use the tools the way a real model
//! would, so the simulated caller's "call me back in two minutes" is booked and
//! confirmed, "bye" ends the call, and a second call opens with what the notes kept.
//!
//! The replies are ordinary scripted replies (`text <tool_call>name {args}</tool_call>`),
//! so they go through the same checks (a tool must be offered) and the same wire format.

use serde_json::Value;

use super::ChatRequest;

/// The header the Worker puts before the notes in the system prompt (`cmb_core::memory`).
const MEMORY_HEADER: &str = "What you remember about this caller";
/// How the notes request shows the call's transcript lines of the caller.
const CALLER_LINE: &str = "Caller: ";
const NOTES_MAX_CHARS: usize = 1_000;

/// The reply the rules choose, or None to use the echo.
pub fn reply(request: &ChatRequest) -> Option<String> {
    if !request.stream {
        return Some(notes(request));
    }
    let (role, last) = request.messages.last()?;
    if role == "tool" {
        return Some(confirmation(last));
    }
    if role != "user" {
        return None;
    }
    let said = last.to_lowercase();
    if let Some(minutes) = callback_minutes(&said).filter(|_| offered(request, "schedule_callback"))
    {
        let unit = if minutes == 1 { "minute" } else { "minutes" };
        return Some(format!(
            "Sure, I'll call you back in {minutes} {unit}. <tool_call>schedule_callback {{\"delay_minutes\":{minutes}}}</tool_call>"
        ));
    }
    if words(&said).any(|w| w == "bye" || w == "goodbye") && offered(request, "end_call") {
        return Some(
            "Talk soon, bye! <tool_call>end_call {\"reason\":\"the caller said bye\"}</tool_call>"
                .into(),
        );
    }
    let user_turns = request.messages.iter().filter(|(r, _)| r == "user").count();
    if user_turns == 1 {
        if let Some(kept) = remembered(request) {
            return Some(format!("Good to hear from you again! I remember: {kept}"));
        }
    }
    None
}

fn offered(request: &ChatRequest, tool: &str) -> bool {
    request.tool_choice != "none" && request.tools.iter().any(|t| t == tool)
}

fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
}

/// "call me back in ten minutes" / "in 2 minutes" → the minutes.
fn callback_minutes(said: &str) -> Option<u32> {
    let at = said.find("call me back in ")? + "call me back in ".len();
    let mut rest = words(&said[at..]);
    let n = rest.next()?;
    let unit = rest.next()?;
    if !unit.starts_with("minute") {
        return None;
    }
    n.parse().ok().or_else(|| {
        let spelled = [
            "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        ];
        match n {
            "a" => Some(1),
            "fifteen" => Some(15),
            "twenty" => Some(20),
            "thirty" => Some(30),
            _ => spelled.iter().position(|w| *w == n).map(|i| i as u32),
        }
        .filter(|m| *m > 0)
    })
}

/// What to say about a tool result (`cmb_core::tools::callback_result`).
fn confirmation(result: &str) -> String {
    let v: Value = serde_json::from_str(result).unwrap_or(Value::Null);
    match (
        &v["scheduled"],
        v["caller_local_time"].as_str(),
        v["error"].as_str(),
    ) {
        (Value::Bool(true), Some(when), _) => format!("Done! I'll call you back {when}."),
        (_, _, Some(why)) => format!("I couldn't book that: {why}."),
        _ => "Hmm, I couldn't tell whether that worked.".into(),
    }
}

/// The notes after a call: the previous notes, then what the caller said on this one.
fn notes(request: &ChatRequest) -> String {
    let prompt = request
        .messages
        .iter()
        .rev()
        .find(|(r, _)| r == "user")
        .map_or("", |(_, t)| t.as_str());
    let previous = prompt
        .split_once(":\n")
        .filter(|_| !prompt.starts_with("Previous notes: none"))
        .and_then(|(_, rest)| rest.split("\n\nThe call on").next())
        .map(str::trim)
        .filter(|p| !p.is_empty());
    let said: Vec<&str> = prompt
        .lines()
        .filter_map(|l| l.strip_prefix(CALLER_LINE))
        .collect();
    let this_call = format!("The caller said: {}", said.join(" / "));
    let all = match previous {
        Some(p) => format!("{p} {this_call}"),
        None => this_call,
    };
    all.chars().take(NOTES_MAX_CHARS).collect()
}

/// The first line of the notes in the system prompt, if there are notes.
fn remembered(request: &ChatRequest) -> Option<String> {
    let system = &request.messages.iter().find(|(r, _)| r == "system")?.1;
    let after = &system[system.find(MEMORY_HEADER)?..];
    let line = after.lines().nth(1)?.trim();
    (!line.is_empty()).then(|| line.chars().take(300).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(stream: bool, messages: &[(&str, &str)]) -> ChatRequest {
        ChatRequest {
            model: "gpt-oss-120b".into(),
            stream,
            max_completion_tokens: None,
            messages: messages
                .iter()
                .map(|(r, t)| ((*r).to_owned(), (*t).to_owned()))
                .collect(),
            tools: vec!["end_call".into(), "schedule_callback".into()],
            tool_choice: "auto".into(),
        }
    }

    #[test]
    fn a_callback_is_booked_when_asked_for() {
        let r = request(
            true,
            &[
                ("system", "You are Brad."),
                ("user", "Call me back in two minutes, I am driving."),
            ],
        );
        assert_eq!(
            reply(&r).as_deref(),
            Some("Sure, I'll call you back in 2 minutes. <tool_call>schedule_callback {\"delay_minutes\":2}</tool_call>")
        );
        let mut only_end = r.clone();
        only_end.tools = vec!["end_call".into()];
        assert_eq!(reply(&only_end), None, "not offered: not called");
        assert_eq!(callback_minutes("call me back in 15 minutes"), Some(15));
        assert_eq!(callback_minutes("call me back in a minute"), Some(1));
        assert_eq!(callback_minutes("call me back in two hours"), None);
    }

    #[test]
    fn bye_ends_the_call_and_results_are_confirmed() {
        let r = request(true, &[("user", "Thanks, bye.")]);
        assert!(reply(&r)
            .unwrap()
            .ends_with("<tool_call>end_call {\"reason\":\"the caller said bye\"}</tool_call>"));
        let r = request(
            true,
            &[(
                "tool",
                r#"{"scheduled":true,"at":"x","caller_local_time":"Thursday 3 December 2026, 07:02 (UTC)"}"#,
            )],
        );
        assert_eq!(
            reply(&r).as_deref(),
            Some("Done! I'll call you back Thursday 3 December 2026, 07:02 (UTC).")
        );
        let r = request(
            true,
            &[("tool", r#"{"scheduled":false,"error":"no credits"}"#)],
        );
        assert_eq!(
            reply(&r).as_deref(),
            Some("I couldn't book that: no credits.")
        );
    }

    #[test]
    fn notes_keep_what_the_caller_said_and_the_next_call_opens_with_them() {
        let first = request(
            false,
            &[("system", "notes"), ("user", "Previous notes: none (this was the first call).\n\nThe call on 2026-12-02:\nBrad: Yo!\nCaller: i want to run five kilometres by friday\nBrad: Nice.")],
        );
        let kept = reply(&first).unwrap();
        assert_eq!(
            kept,
            "The caller said: i want to run five kilometres by friday"
        );
        let second = request(
            false,
            &[("system", "notes"), ("user", &format!("Previous notes (last call on 2026-12-02):\n{kept}\n\nThe call on 2026-12-03:\nCaller: hello again"))],
        );
        assert_eq!(
            reply(&second).unwrap(),
            format!("{kept} The caller said: hello again")
        );
        let system = format!("You are Brad.\n\n{MEMORY_HEADER} from earlier calls (the last one on 2026-12-02):\n{kept}\n\nFor the caller it is now …");
        let call = request(true, &[("system", &system), ("user", "hi it is me again")]);
        assert_eq!(
            reply(&call).unwrap(),
            format!("Good to hear from you again! I remember: {kept}")
        );
    }
}
