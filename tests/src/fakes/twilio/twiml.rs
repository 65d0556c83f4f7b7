//! TwiML parsing for the fake Twilio: turns the document a webhook returns into the verbs
//! the fake knows how to run.
//!
//! Uses a real XML parser (`roxmltree`), so malformed XML fails like it does at Twilio
//! (error 12100, "Document parse failure") instead of being half-understood by string
//! matching. Only the verbs a Call Me Back call can meet are supported (`<Connect><Stream>`,
//! `<Say>`, `<Pause>`, `<Hangup>`); any other verb is reported as a schema error (Twilio's
//! 12200) so a test notices the Worker started emitting TwiML the fake does not model. It
//! must not perform I/O or decide what happens to the call: that is `call.rs`.

use std::fmt;

/// Twilio error code for a document that is not well-formed XML.
pub const DOCUMENT_PARSE_FAILURE: u32 = 12100;
/// Twilio error code for well-formed TwiML that breaks the schema (unknown verb, bad
/// attribute, missing `url`, …).
pub const SCHEMA_VALIDATION: u32 = 12200;

/// One TwiML verb the fake can execute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verb {
    /// `<Say>`: text spoken to the callee (the fake tone-codes it so the simulator hears it).
    Say { text: String, loops: u32 },
    /// `<Pause length="N">`: N seconds of silence (default 1).
    Pause { seconds: u32 },
    /// `<Hangup/>`.
    Hangup,
    /// `<Connect><Stream>`: a bidirectional media stream; blocks until the server closes it.
    Connect(StreamNoun),
}

/// The `<Stream>` noun of a `<Connect>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamNoun {
    /// The `url` attribute exactly as written (may be relative; resolved by the caller).
    pub url: String,
    pub name: Option<String>,
    pub status_callback: Option<String>,
    pub status_callback_method: Option<String>,
    /// `<Parameter name value>` children, in document order.
    pub parameters: Vec<(String, String)>,
    /// The `<Connect action>` URL: requested when the stream ends, and its TwiML replaces
    /// the rest of the document.
    pub action: Option<String>,
}

/// Why a TwiML document was refused, with the Twilio error code it maps to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TwimlError {
    pub code: u32,
    pub message: String,
}

impl TwimlError {
    fn schema(message: impl Into<String>) -> Self {
        Self {
            code: SCHEMA_VALIDATION,
            message: message.into(),
        }
    }
}

impl fmt::Display for TwimlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TwiML error {}: {}", self.code, self.message)
    }
}

impl std::error::Error for TwimlError {}

/// Parses a TwiML document into the verbs to run, in order.
pub fn parse(xml: &str) -> Result<Vec<Verb>, TwimlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| TwimlError {
        code: DOCUMENT_PARSE_FAILURE,
        message: format!("document is not well-formed XML: {e}"),
    })?;
    let root = doc.root_element();
    if root.tag_name().name() != "Response" {
        return Err(TwimlError::schema(format!(
            "root element must be <Response>, found <{}>",
            root.tag_name().name()
        )));
    }
    let mut verbs = Vec::new();
    for node in root.children() {
        if node.is_text() {
            reject_stray_text(node, "Response")?;
            continue;
        }
        if !node.is_element() {
            // Comments and processing instructions are legal anywhere.
            continue;
        }
        verbs.push(parse_verb(node)?);
    }
    Ok(verbs)
}

fn parse_verb(node: roxmltree::Node<'_, '_>) -> Result<Verb, TwimlError> {
    match node.tag_name().name() {
        "Say" => {
            let text: String = node
                .children()
                .filter(|c| c.is_text())
                .filter_map(|c| c.text())
                .collect();
            let loops = match node.attribute("loop") {
                None => 1,
                Some(v) => v.parse::<u32>().map_err(|_| {
                    TwimlError::schema(format!("<Say loop=\"{v}\"> is not a number"))
                })?,
            };
            Ok(Verb::Say {
                text: text.trim().to_owned(),
                loops,
            })
        }
        "Pause" => {
            let seconds = match node.attribute("length") {
                None => 1,
                Some(v) => v.parse::<u32>().map_err(|_| {
                    TwimlError::schema(format!("<Pause length=\"{v}\"> is not a number"))
                })?,
            };
            Ok(Verb::Pause { seconds })
        }
        "Hangup" => Ok(Verb::Hangup),
        "Connect" => parse_connect(node),
        other => Err(TwimlError::schema(format!(
            "verb <{other}> is not supported by the fake Twilio (supported: Connect/Stream, Say, Pause, Hangup)"
        ))),
    }
}

fn parse_connect(node: roxmltree::Node<'_, '_>) -> Result<Verb, TwimlError> {
    let mut nouns = Vec::new();
    for child in node.children() {
        if child.is_text() {
            reject_stray_text(child, "Connect")?;
        } else if child.is_element() {
            nouns.push(child);
        }
    }
    let [stream] = nouns.as_slice() else {
        return Err(TwimlError::schema(format!(
            "<Connect> must contain exactly one noun, found {}",
            nouns.len()
        )));
    };
    if stream.tag_name().name() != "Stream" {
        return Err(TwimlError::schema(format!(
            "<Connect><{}> is not supported by the fake Twilio (only <Stream>)",
            stream.tag_name().name()
        )));
    }
    let url = stream
        .attribute("url")
        .filter(|u| !u.trim().is_empty())
        .ok_or_else(|| TwimlError::schema("<Stream> requires a url attribute"))?;
    // UNCONFIRMED (PROTOCOLS.md §1): bidirectional streams may accept only inbound_track.
    // The fake refuses anything else, the strict reading, so a client relying on a track
    // Twilio might not honour is caught here rather than in production.
    if let Some(track) = stream.attribute("track") {
        if track != "inbound_track" {
            return Err(TwimlError::schema(format!(
                "<Connect><Stream track=\"{track}\">: bidirectional streams only carry inbound_track"
            )));
        }
    }
    if let Some(method) = stream.attribute("statusCallbackMethod") {
        if method != "GET" && method != "POST" {
            return Err(TwimlError::schema(format!(
                "<Stream statusCallbackMethod=\"{method}\"> must be GET or POST"
            )));
        }
    }
    let mut parameters = Vec::new();
    for child in stream.children() {
        if child.is_text() {
            reject_stray_text(child, "Stream")?;
            continue;
        }
        if !child.is_element() {
            continue;
        }
        if child.tag_name().name() != "Parameter" {
            return Err(TwimlError::schema(format!(
                "<Stream> may only contain <Parameter>, found <{}>",
                child.tag_name().name()
            )));
        }
        let (Some(name), Some(value)) = (child.attribute("name"), child.attribute("value")) else {
            return Err(TwimlError::schema(
                "<Parameter> requires both name and value attributes",
            ));
        };
        parameters.push((name.to_owned(), value.to_owned()));
    }
    if let Some(method) = node.attribute("method") {
        if method != "GET" && method != "POST" {
            return Err(TwimlError::schema(format!(
                "<Connect method=\"{method}\"> must be GET or POST"
            )));
        }
    }
    Ok(Verb::Connect(StreamNoun {
        action: node
            .attribute("action")
            .filter(|a| !a.trim().is_empty())
            .map(str::to_owned),
        url: url.to_owned(),
        name: stream.attribute("name").map(str::to_owned),
        status_callback: stream.attribute("statusCallback").map(str::to_owned),
        status_callback_method: stream.attribute("statusCallbackMethod").map(str::to_owned),
        parameters,
    }))
}

/// Whitespace between elements is fine; any other text where a verb or noun belongs is not.
fn reject_stray_text(node: roxmltree::Node<'_, '_>, parent: &str) -> Result<(), TwimlError> {
    match node.text() {
        Some(t) if !t.trim().is_empty() => Err(TwimlError::schema(format!(
            "unexpected text {:?} inside <{parent}>",
            t.trim()
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document the Worker serves parses into one Connect with its parameters in order.
    #[test]
    fn connect_stream_with_parameters() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
            <Response>
              <Connect>
                <Stream url="wss://relay.example.com/twilio" name="call">
                  <Parameter name="callId" value="c-1"/>
                  <Parameter name="token" value="a&amp;b"/>
                </Stream>
              </Connect>
              <Say>Sorry, goodbye.</Say>
            </Response>"#;
        let verbs = parse(xml).unwrap();
        assert_eq!(
            verbs,
            vec![
                Verb::Connect(StreamNoun {
                    url: "wss://relay.example.com/twilio".into(),
                    name: Some("call".into()),
                    status_callback: None,
                    status_callback_method: None,
                    parameters: vec![
                        ("callId".into(), "c-1".into()),
                        ("token".into(), "a&b".into())
                    ],
                    action: None,
                }),
                Verb::Say {
                    text: "Sorry, goodbye.".into(),
                    loops: 1
                },
            ]
        );
    }

    /// `<Connect action>` is kept so the call can fetch it when the stream ends.
    #[test]
    fn connect_action() {
        let xml = r#"<Response><Connect action="https://w.example/after?callId=1" method="POST"><Stream url="wss://r/x"/></Connect></Response>"#;
        let Verb::Connect(noun) = &parse(xml).unwrap()[0] else {
            panic!("not a Connect");
        };
        assert_eq!(
            noun.action.as_deref(),
            Some("https://w.example/after?callId=1")
        );
        let bad =
            r#"<Response><Connect method="PUT"><Stream url="wss://r/x"/></Connect></Response>"#;
        assert!(parse(bad).is_err());
    }

    /// Say, Pause and Hangup with their attributes; comments are ignored.
    #[test]
    fn simple_verbs() {
        let xml = r#"<Response><!-- hi --><Say loop="2" voice="alice">Hi</Say><Pause length="3"/><Pause/><Hangup/></Response>"#;
        assert_eq!(
            parse(xml).unwrap(),
            vec![
                Verb::Say {
                    text: "Hi".into(),
                    loops: 2
                },
                Verb::Pause { seconds: 3 },
                Verb::Pause { seconds: 1 },
                Verb::Hangup
            ]
        );
    }

    /// Malformed XML is a 12100 document parse failure.
    #[test]
    fn malformed_xml_is_12100() {
        for xml in ["<Response><Say>unclosed</Response>", "not xml", ""] {
            assert_eq!(
                parse(xml).unwrap_err().code,
                DOCUMENT_PARSE_FAILURE,
                "{xml}"
            );
        }
    }

    /// Schema problems are 12200: wrong root, unknown verb, stray text, bad Stream.
    #[test]
    fn schema_errors_are_12200() {
        for xml in [
            "<Reply><Hangup/></Reply>",
            "<Response><Dial>+15550001111</Dial></Response>",
            "<Response>hello<Hangup/></Response>",
            "<Response><Connect/></Response>",
            "<Response><Connect><Stream/></Connect></Response>",
            r#"<Response><Connect><Stream url="wss://x/y" track="both_tracks"/></Connect></Response>"#,
            r#"<Response><Connect><Stream url="wss://x/y"><Parameter name="a"/></Stream></Connect></Response>"#,
            r#"<Response><Connect><Room>r</Room></Connect></Response>"#,
            r#"<Response><Pause length="soon"/></Response>"#,
        ] {
            assert_eq!(parse(xml).unwrap_err().code, SCHEMA_VALIDATION, "{xml}");
        }
    }

    /// An empty Response is valid TwiML (the call simply ends).
    #[test]
    fn empty_response_is_valid() {
        assert_eq!(parse("<Response/>").unwrap(), vec![]);
    }
}
