//! TwiML documents the Worker returns to Twilio's voice webhook.
//!
//! Owns rendering and XML escaping only. Which document to send (and the stream token in
//! the parameters) is the Worker's decision.

use std::fmt::Write as _;

const XML_DECLARATION: &str = r#"<?xml version="1.0" encoding="UTF-8"?>"#;

/// Escapes text for an XML attribute or element. Characters XML 1.0 cannot carry at all
/// (most C0 controls) are dropped: one stray byte in a persona name must not make Twilio
/// reject the whole document.
pub fn escape_xml(input: &str) -> String {
    let mut out = String::with_capacity(input.len());
    for c in input.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if c.is_control() && c < '\u{80}' => {}
            c => out.push(c),
        }
    }
    out
}

/// `<Say>` for non-blank text, nothing otherwise (Twilio refuses an empty `<Say>`).
fn say(text: &str) -> String {
    if text.trim().is_empty() {
        String::new()
    } else {
        format!("<Say>{}</Say>", escape_xml(text))
    }
}

/// Bridges the call to the relay: `<Connect action><Stream url>` with one `<Parameter>`
/// per pair (Twilio drops query strings on stream URLs, so per-call data goes here).
///
/// When the stream ends, Twilio requests `action_url` and runs the TwiML it answers
/// instead of anything after `<Connect>`: that is where the Worker decides between a
/// plain hang-up (the conversation ended on purpose) and a spoken fallback (the relay
/// could not be reached or dropped the call). A fallback placed after `<Connect>` would
/// also play after every goodbye.
pub fn connect_stream(relay_url: &str, params: &[(&str, &str)], action_url: &str) -> String {
    let mut xml = format!(
        r#"{XML_DECLARATION}<Response><Connect action="{}" method="POST"><Stream url="{}">"#,
        escape_xml(action_url),
        escape_xml(relay_url)
    );
    for (name, value) in params {
        // Writing to a String cannot fail.
        let _ = write!(
            xml,
            r#"<Parameter name="{}" value="{}"/>"#,
            escape_xml(name),
            escape_xml(value)
        );
    }
    xml.push_str("</Stream></Connect></Response>");
    xml
}

/// Speaks `text` (if any) and hangs up: for calls that must not go ahead (canceled,
/// out of credits, unknown call id).
pub fn say_and_hangup(text: &str) -> String {
    format!(
        "{XML_DECLARATION}<Response>{}<Hangup/></Response>",
        say(text)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The full document: action on `<Connect>`, parameters in order, nothing after.
    #[test]
    fn connect_stream_document() {
        let xml = connect_stream(
            "wss://relay.example.com/twilio",
            &[("callId", "c-1"), ("token", "abc.def")],
            "https://api.example.com/api/voice/stream-ended?callId=c-1",
        );
        assert_eq!(
            xml,
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?><Response>"#,
                r#"<Connect action="https://api.example.com/api/voice/stream-ended?callId=c-1" method="POST">"#,
                r#"<Stream url="wss://relay.example.com/twilio">"#,
                r#"<Parameter name="callId" value="c-1"/>"#,
                r#"<Parameter name="token" value="abc.def"/>"#,
                r#"</Stream></Connect></Response>"#
            )
        );
    }

    /// Every attribute and text node is escaped (`&<>"'`).
    #[test]
    fn escapes_everything() {
        let nasty = r#"a&b<c>d"e'f"#;
        let escaped = "a&amp;b&lt;c&gt;d&quot;e&apos;f";
        let xml = connect_stream(nasty, &[(nasty, nasty)], nasty);
        assert_eq!(
            xml,
            format!(
                r#"{XML_DECLARATION}<Response><Connect action="{escaped}" method="POST"><Stream url="{escaped}"><Parameter name="{escaped}" value="{escaped}"/></Stream></Connect></Response>"#
            )
        );
        assert_eq!(
            say_and_hangup(nasty),
            format!("{XML_DECLARATION}<Response><Say>{escaped}</Say><Hangup/></Response>")
        );
    }

    /// Characters XML cannot carry are dropped; newlines, tabs and non-ASCII stay.
    #[test]
    fn drops_invalid_control_chars() {
        assert_eq!(escape_xml("a\u{0}b\u{1b}c\td\ne é"), "abc\td\ne é");
    }

    /// A blank goodbye renders a bare hang-up.
    #[test]
    fn blank_say_omitted() {
        assert_eq!(
            say_and_hangup("  "),
            format!("{XML_DECLARATION}<Response><Hangup/></Response>")
        );
    }
}
