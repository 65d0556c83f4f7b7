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

/// Bridges the call to the relay: `<Connect><Stream url>` with one `<Parameter>` per
/// pair (Twilio drops query strings on stream URLs, so per-call data goes here), then a
/// `<Say>` that Twilio only reaches when the stream ends or cannot be opened — the
/// spoken fallback when the relay is unreachable.
pub fn connect_stream(relay_url: &str, params: &[(&str, &str)], fallback_say: &str) -> String {
    let mut xml = format!(
        r#"{XML_DECLARATION}<Response><Connect><Stream url="{}">"#,
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
    xml.push_str("</Stream></Connect>");
    xml.push_str(&say(fallback_say));
    xml.push_str("</Response>");
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

    /// The full document, with parameters in order and the fallback after `<Connect>`.
    #[test]
    fn connect_stream_document() {
        let xml = connect_stream(
            "wss://relay.example.com/twilio",
            &[("callId", "c-1"), ("token", "abc.def")],
            "Sorry, we could not connect your call.",
        );
        assert_eq!(
            xml,
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect>"#,
                r#"<Stream url="wss://relay.example.com/twilio">"#,
                r#"<Parameter name="callId" value="c-1"/>"#,
                r#"<Parameter name="token" value="abc.def"/>"#,
                r#"</Stream></Connect><Say>Sorry, we could not connect your call.</Say></Response>"#
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
                r#"{XML_DECLARATION}<Response><Connect><Stream url="{escaped}"><Parameter name="{escaped}" value="{escaped}"/></Stream></Connect><Say>{escaped}</Say></Response>"#
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

    /// A blank fallback or goodbye renders no `<Say>` at all.
    #[test]
    fn blank_say_omitted() {
        assert_eq!(
            connect_stream("wss://r/x", &[], "  "),
            format!(
                r#"{XML_DECLARATION}<Response><Connect><Stream url="wss://r/x"></Stream></Connect></Response>"#
            )
        );
        assert_eq!(
            say_and_hangup(""),
            format!("{XML_DECLARATION}<Response><Hangup/></Response>")
        );
    }
}
