//! Deepgram live STT v1 wire format (PROTOCOLS.md §4): the connect URL, control
//! messages, and parsing of server events.
//!
//! Owns the format only. Times are returned in Deepgram's audio seconds; converting them to
//! stream time (which depends on reconnects) is the socket task's job. Unknown message
//! types are ignorable (`Ok(None)`).

use cmb_core::channel::SttOptions;
use serde::Deserialize;
use url::Url;

/// Keeps the socket open while no audio flows (Deepgram closes after 10 s of nothing).
pub const KEEP_ALIVE: &str = r#"{"type":"KeepAlive"}"#;
/// Asks Deepgram to finalize the audio it has now; the result carries `from_finalize`.
pub const FINALIZE: &str = r#"{"type":"Finalize"}"#;
/// Asks Deepgram to flush, send the last results and close normally.
pub const CLOSE_STREAM: &str = r#"{"type":"CloseStream"}"#;

/// Why a Deepgram message could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeepgramError {
    #[error("malformed Deepgram message: {0}")]
    Malformed(String),
}

/// One server event the relay acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum DeepgramEvent {
    /// An interim (`is_final=false`) or final transcript of a span of audio.
    Results {
        transcript: String,
        is_final: bool,
        /// Endpointing saw a pause: the user may have finished.
        speech_final: bool,
        /// Audio seconds (on this connection) where the span ends.
        end_s: f64,
    },
    /// Voice activity began (needs `vad_events=true`).
    SpeechStarted,
    /// A gap of `utterance_end_ms` after the last final word.
    UtteranceEnd { last_word_end_s: Option<f64> },
    /// Deepgram reported an error; it closes the socket next.
    Error { description: String },
}

/// The live-transcription URL for μ-law 8 kHz mono from Twilio.
pub fn listen_url(base: &Url, stt: &SttOptions) -> Url {
    let mut url = base.clone();
    url.query_pairs_mut()
        .append_pair("model", &stt.model)
        .append_pair("encoding", "mulaw")
        .append_pair("sample_rate", "8000")
        .append_pair("channels", "1")
        .append_pair("interim_results", "true")
        .append_pair("endpointing", &stt.endpointing_ms.to_string())
        .append_pair("utterance_end_ms", &stt.utterance_end_ms.to_string())
        .append_pair("vad_events", "true")
        .append_pair("smart_format", "true")
        .append_pair("punctuate", "true")
        .append_pair("language", &stt.language);
    url
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    is_final: bool,
    #[serde(default)]
    speech_final: bool,
    #[serde(default)]
    start: f64,
    #[serde(default)]
    duration: f64,
    #[serde(default)]
    channel: Option<RawChannel>,
    #[serde(default)]
    last_word_end: Option<f64>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// `channel` is an object on `Results` and an array on `UtteranceEnd`/`SpeechStarted`;
/// only the object form carries transcripts (`Results` when it has `alternatives`,
/// `Other` for anything else).
enum RawChannel {
    Results { alternatives: Vec<RawAlternative> },
    Other,
}

/// By hand rather than `#[serde(untagged)]`, which first copies the whole value (every
/// word with its timings, on a real Deepgram result) into a buffer to try each variant.
impl<'de> Deserialize<'de> for RawChannel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};

        struct ChannelVisitor;
        impl<'de> Visitor<'de> for ChannelVisitor {
            type Value = RawChannel;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a Deepgram channel")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawChannel, A::Error> {
                let mut alternatives = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "alternatives" && alternatives.is_none() {
                        alternatives = Some(map.next_value::<Vec<RawAlternative>>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(
                    alternatives.map_or(RawChannel::Other, |alternatives| RawChannel::Results {
                        alternatives,
                    }),
                )
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawChannel, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(RawChannel::Other)
            }

            // Any other JSON value is ignorable, as before.
            fn visit_bool<E>(self, _: bool) -> Result<RawChannel, E> {
                Ok(RawChannel::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<RawChannel, E> {
                Ok(RawChannel::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<RawChannel, E> {
                Ok(RawChannel::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<RawChannel, E> {
                Ok(RawChannel::Other)
            }
            fn visit_str<E>(self, _: &str) -> Result<RawChannel, E> {
                Ok(RawChannel::Other)
            }
            fn visit_unit<E>(self) -> Result<RawChannel, E> {
                Ok(RawChannel::Other)
            }
        }
        d.deserialize_any(ChannelVisitor)
    }
}

#[derive(Deserialize)]
struct RawAlternative {
    #[serde(default)]
    transcript: String,
}

/// Parses one server text frame; `Metadata` and unknown types are `Ok(None)`.
pub fn parse(text: &str) -> Result<Option<DeepgramEvent>, DeepgramError> {
    let raw: Raw =
        serde_json::from_str(text).map_err(|e| DeepgramError::Malformed(e.to_string()))?;
    Ok(Some(match raw.kind.as_str() {
        "Results" => {
            let transcript = match raw.channel {
                Some(RawChannel::Results { alternatives }) => alternatives
                    .into_iter()
                    .next()
                    .map(|a| a.transcript)
                    .unwrap_or_default(),
                _ => {
                    return Err(DeepgramError::Malformed(
                        "Results without channel.alternatives".into(),
                    ))
                }
            };
            DeepgramEvent::Results {
                transcript,
                is_final: raw.is_final,
                // speech_final implies is_final; tolerate a peer that sets only one.
                speech_final: raw.speech_final,
                end_s: raw.start + raw.duration,
            }
        }
        "SpeechStarted" => DeepgramEvent::SpeechStarted,
        "UtteranceEnd" => DeepgramEvent::UtteranceEnd {
            last_word_end_s: raw.last_word_end,
        },
        "Error" => DeepgramEvent::Error {
            description: raw.description.or(raw.message).unwrap_or_default(),
        },
        _ => return Ok(None),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The URL carries every parameter the brief lists, with the call's STT options.
    #[test]
    fn url_has_all_parameters() {
        let base = Url::parse("wss://api.deepgram.com/v1/listen").expect("url");
        let stt = SttOptions {
            model: "nova-3".into(),
            language: "en".into(),
            endpointing_ms: 300,
            utterance_end_ms: 1000,
        };
        assert_eq!(
            listen_url(&base, &stt).as_str(),
            "wss://api.deepgram.com/v1/listen?model=nova-3&encoding=mulaw&sample_rate=8000&channels=1\
             &interim_results=true&endpointing=300&utterance_end_ms=1000&vad_events=true\
             &smart_format=true&punctuate=true&language=en"
        );
    }

    /// A final result with speech_final gives its transcript and the span's end time.
    #[test]
    fn parses_results() {
        let text = r#"{"type":"Results","channel_index":[0,1],"duration":1.12,"start":3.40,
            "is_final":true,"speech_final":true,"from_finalize":false,
            "channel":{"alternatives":[{"transcript":"book a table for two","confidence":0.97,"words":[]}]},
            "metadata":{"request_id":"r"}}"#;
        let Some(DeepgramEvent::Results {
            transcript,
            is_final,
            speech_final,
            end_s,
        }) = parse(text).expect("valid")
        else {
            panic!("not results")
        };
        assert_eq!(transcript, "book a table for two");
        assert!(is_final && speech_final);
        assert!((end_s - 4.52).abs() < 1e-9);
    }

    /// Quirk: `channel` is an array on UtteranceEnd and SpeechStarted; both still parse.
    #[test]
    fn channel_array_quirk() {
        assert_eq!(
            parse(r#"{"type":"UtteranceEnd","channel":[0,1],"last_word_end":4.52}"#).expect("ok"),
            Some(DeepgramEvent::UtteranceEnd {
                last_word_end_s: Some(4.52)
            })
        );
        assert_eq!(
            parse(r#"{"type":"SpeechStarted","channel":[0,1],"timestamp":3.38}"#).expect("ok"),
            Some(DeepgramEvent::SpeechStarted)
        );
    }

    /// The channel forms that are not a result's object are ignorable on any message; an
    /// object without `alternatives` leaves a `Results` malformed.
    #[test]
    fn channel_other_forms() {
        for channel in [
            r#"null"#,
            r#"7"#,
            r#""x""#,
            r#"{"x":[1,{"a":2}]}"#,
            r#"[{"y":1}]"#,
        ] {
            let text = format!(r#"{{"type":"SpeechStarted","channel":{channel}}}"#);
            assert_eq!(
                parse(&text).expect("ok"),
                Some(DeepgramEvent::SpeechStarted)
            );
            let text = format!(r#"{{"type":"Results","channel":{channel}}}"#);
            assert!(parse(&text).is_err(), "{text}");
        }
        // Escaped keys still name `alternatives`; unknown keys around it are skipped.
        let text = r#"{"type":"Results","is_final":true,"channel":{"a":{"b":[1]},
            "alte\u0072natives":[{"transcript":"hi","words":[{"w":"hi"}]}],"z":0}}"#;
        assert!(matches!(
            parse(text).expect("ok"),
            Some(DeepgramEvent::Results { transcript, .. }) if transcript == "hi"
        ));
    }

    /// Metadata and unknown types are ignorable; errors carry their description.
    #[test]
    fn other_messages() {
        assert_eq!(
            parse(r#"{"type":"Metadata","request_id":"r","duration":1.0}"#).expect("ok"),
            None
        );
        assert_eq!(
            parse(r#"{"type":"Error","variant":"SchemaError","description":"bad","message":"m"}"#)
                .expect("ok"),
            Some(DeepgramEvent::Error {
                description: "bad".into()
            })
        );
        assert!(parse(r#"{"type":"Results"}"#).is_err());
    }
}
