//! Twilio Media Streams wire format (PROTOCOLS.md §1): inbound JSON events, outbound
//! `media` / `mark` / `clear` messages.
//!
//! Owns parsing and serialisation only; it never touches a socket and decides nothing.
//! Unknown events are ignorable (`Ok(None)`), not errors: Twilio may add some. The media
//! path borrows the base64 payload from the frame text so an inbound frame costs no
//! allocation here.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;
use serde::Deserialize;

/// Why a Twilio message could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwilioError {
    /// Not JSON, or a known event missing its body.
    #[error("malformed Twilio message: {0}")]
    Malformed(String),
}

/// What the `start` message tells us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartInfo {
    pub stream_sid: String,
    pub call_sid: String,
    /// `<Parameter>`s from the TwiML (`callId`, `streamToken`).
    pub custom_parameters: HashMap<String, String>,
    /// `audio/x-mulaw` at 8000 Hz mono is the only format this relay handles.
    pub media_format_ok: bool,
}

/// One inbound Twilio event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TwilioEvent<'a> {
    Connected,
    Start(StartInfo),
    /// Base64 μ-law audio, borrowed from the frame where JSON escaping allows.
    Media {
        payload: Cow<'a, str>,
        /// Milliseconds since the stream started, per Twilio.
        timestamp_ms: Option<u64>,
    },
    Dtmf {
        digit: String,
    },
    /// Echo of a mark we sent: all audio queued before it has played.
    Mark {
        name: String,
    },
    Stop,
}

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow, default)]
    media: Option<RawMedia<'a>>,
    #[serde(default)]
    start: Option<RawStart>,
    #[serde(default)]
    mark: Option<RawMark>,
    #[serde(default)]
    dtmf: Option<RawDtmf>,
}

#[derive(Deserialize)]
struct RawMedia<'a> {
    #[serde(borrow)]
    payload: Cow<'a, str>,
    #[serde(borrow, default)]
    timestamp: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    track: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawStart {
    stream_sid: String,
    call_sid: String,
    #[serde(default)]
    custom_parameters: HashMap<String, String>,
    #[serde(default)]
    media_format: Option<RawFormat>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawFormat {
    encoding: String,
    sample_rate: u32,
    channels: u32,
}

#[derive(Deserialize)]
struct RawMark {
    name: String,
}

#[derive(Deserialize)]
struct RawDtmf {
    digit: String,
}

fn malformed(what: &str) -> TwilioError {
    TwilioError::Malformed(what.to_owned())
}

/// Parses one inbound text frame; unknown events and outbound-track media are `Ok(None)`.
pub fn parse(text: &str) -> Result<Option<TwilioEvent<'_>>, TwilioError> {
    match media_fast(text) {
        Some(event) => Ok(event),
        None => parse_full(text),
    }
}

/// Fast path for `media`, about 50 events a second per call: Twilio's documented layout
/// (`{"event":"media",` first, string values, no escapes) is read by position instead
/// of through a full JSON parse. `None` means "not that layout": the full parser then
/// decides, so an unusual message is handled exactly as before, only slower.
fn media_fast(text: &str) -> Option<Option<TwilioEvent<'_>>> {
    static PAYLOAD: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(r#""payload":""#));
    static TRACK: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(r#""track":""#));
    static TIMESTAMP: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(r#""timestamp":""#));
    let body = text.strip_prefix(r#"{"event":"media","#)?;
    // Escapes and nesting beyond Twilio's layout need the full parser; base64 and
    // Twilio's ids never contain a backslash.
    if !body.ends_with('}') || memchr::memchr(b'\\', body.as_bytes()).is_some() {
        return None;
    }
    let payload = string_value(body, &PAYLOAD)?;
    if string_value(body, &TRACK).is_some_and(|t| t != "inbound" && t != "inbound_track") {
        return Some(None);
    }
    Some(Some(TwilioEvent::Media {
        payload: Cow::Borrowed(payload),
        timestamp_ms: string_value(body, &TIMESTAMP).and_then(|t| t.parse().ok()),
    }))
}

/// The string after the key `key` finds (the key ends with the opening quote), up to its
/// closing quote. SIMD substring search: this scans every caller frame.
fn string_value<'a>(body: &'a str, key: &Finder<'_>) -> Option<&'a str> {
    let start = key.find(body.as_bytes())? + key.needle().len();
    let rest = body.get(start..)?;
    let len = memchr::memchr(b'"', rest.as_bytes())?;
    rest.get(..len)
}

/// The authoritative parser: any valid JSON layout of any event.
fn parse_full(text: &str) -> Result<Option<TwilioEvent<'_>>, TwilioError> {
    let raw: Raw<'_> =
        serde_json::from_str(text).map_err(|e| TwilioError::Malformed(e.to_string()))?;
    let event = match raw.event.as_ref() {
        "connected" => TwilioEvent::Connected,
        "start" => {
            let s = raw.start.ok_or_else(|| malformed("start without body"))?;
            // An absent mediaFormat is taken as the documented default.
            let media_format_ok = s.media_format.is_none_or(|f| {
                f.encoding == "audio/x-mulaw" && f.sample_rate == 8000 && f.channels == 1
            });
            TwilioEvent::Start(StartInfo {
                stream_sid: s.stream_sid,
                call_sid: s.call_sid,
                custom_parameters: s.custom_parameters,
                media_format_ok,
            })
        }
        "media" => {
            let m = raw.media.ok_or_else(|| malformed("media without body"))?;
            // Only the caller's side is speech to transcribe.
            if m.track
                .as_deref()
                .is_some_and(|t| t != "inbound" && t != "inbound_track")
            {
                return Ok(None);
            }
            TwilioEvent::Media {
                payload: m.payload,
                timestamp_ms: m.timestamp.and_then(|t| t.parse().ok()),
            }
        }
        "dtmf" => TwilioEvent::Dtmf {
            digit: raw
                .dtmf
                .ok_or_else(|| malformed("dtmf without body"))?
                .digit,
        },
        "mark" => TwilioEvent::Mark {
            name: raw.mark.ok_or_else(|| malformed("mark without body"))?.name,
        },
        "stop" => TwilioEvent::Stop,
        _ => return Ok(None),
    };
    Ok(Some(event))
}

/// Decodes a media payload into the spare capacity of `buf` and splits it off, so
/// successive frames share (and, once sent, give back) one allocation. `None` for bad
/// base64 or an empty payload: an empty frame must never reach Deepgram.
///
/// SIMD base64 (`base64-simd`): this runs for every caller frame, and the scalar decoder
/// was the relay's largest single cost per frame.
pub fn decode_payload(payload: &str, buf: &mut BytesMut) -> Option<Bytes> {
    let n = base64_simd::STANDARD
        .decoded_length(payload.as_bytes())
        .ok()
        .filter(|&n| n > 0)?;
    if buf.capacity() < n {
        // A new chunk only when the current one is used up; `reserve` reclaims the
        // original allocation instead once every earlier frame is dropped.
        buf.reserve(n.max(DECODE_CHUNK));
    }
    buf.resize(n, 0);
    match base64_simd::STANDARD.decode(
        payload.as_bytes(),
        base64_simd::Out::from_slice(&mut buf[..]),
    ) {
        Ok(out) if out.len() == n => Some(buf.split().freeze()),
        _ => {
            buf.clear();
            None
        }
    }
}

/// Allocation unit for decoded inbound audio: room for six 160-byte frames, so a call
/// allocates once per ~120 ms of audio and holds little while its frames are in flight.
const DECODE_CHUNK: usize = 1024;

/// Builds outbound messages for one stream. Holds the JSON-escaped stream sid so a media
/// frame is one exact-size allocation.
#[derive(Debug, Clone)]
pub struct Outbound {
    sid_json: String,
}

impl Outbound {
    /// For the stream `stream_sid`.
    pub fn new(stream_sid: &str) -> Self {
        // Serialising a &str cannot fail; the fallback keeps this path panic-free.
        let sid_json = serde_json::to_string(stream_sid).unwrap_or_else(|_| "\"\"".to_owned());
        Self { sid_json }
    }

    /// `{"event":"media","streamSid":…,"media":{"payload":"<base64 μ-law>"}}`
    pub fn media(&self, audio: &[u8]) -> String {
        const HEAD: &str = r#"{"event":"media","streamSid":"#;
        const MID: &str = r#","media":{"payload":""#;
        const TAIL: &str = r#""}}"#;
        let b64_len = audio.len().div_ceil(3) * 4;
        let mut s = String::with_capacity(
            HEAD.len() + self.sid_json.len() + MID.len() + b64_len + TAIL.len(),
        );
        s.push_str(HEAD);
        s.push_str(&self.sid_json);
        s.push_str(MID);
        base64_simd::STANDARD.encode_append(audio, &mut s);
        s.push_str(TAIL);
        s
    }

    /// `{"event":"mark","streamSid":…,"mark":{"name":…}}`
    pub fn mark(&self, name: &str) -> String {
        let name = serde_json::to_string(name).unwrap_or_else(|_| "\"\"".to_owned());
        format!(
            r#"{{"event":"mark","streamSid":{},"mark":{{"name":{name}}}}}"#,
            self.sid_json
        )
    }

    /// `{"event":"clear","streamSid":…}`: Twilio drops its buffered audio (barge-in).
    pub fn clear(&self) -> String {
        format!(r#"{{"event":"clear","streamSid":{}}}"#, self.sid_json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented `start` message yields sids, custom parameters and an accepted format.
    #[test]
    fn parses_start() {
        let text = r#"{"event":"start","sequenceNumber":"1","streamSid":"MZ1",
            "start":{"accountSid":"AC1","streamSid":"MZ1","callSid":"CA1","tracks":["inbound"],
            "customParameters":{"callId":"c-1","streamToken":"tok"},
            "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}"#;
        let Some(TwilioEvent::Start(s)) = parse(text).expect("valid") else {
            panic!("not start")
        };
        assert_eq!(s.stream_sid, "MZ1");
        assert_eq!(s.call_sid, "CA1");
        assert_eq!(
            s.custom_parameters.get("callId").map(String::as_str),
            Some("c-1")
        );
        assert!(s.media_format_ok);
    }

    /// A stream in another audio format is flagged, since we never resample.
    #[test]
    fn flags_wrong_media_format() {
        let text = r#"{"event":"start","streamSid":"MZ1","start":{"streamSid":"MZ1","callSid":"CA1",
            "mediaFormat":{"encoding":"audio/l16","sampleRate":16000,"channels":1}}}"#;
        let Some(TwilioEvent::Start(s)) = parse(text).expect("valid") else {
            panic!("not start")
        };
        assert!(!s.media_format_ok);
    }

    /// Media payloads are borrowed from the frame, and the timestamp string is parsed.
    #[test]
    fn media_payload_is_borrowed() {
        let text = r#"{"event":"media","sequenceNumber":"2","streamSid":"MZ1",
            "media":{"track":"inbound","chunk":"1","timestamp":"40","payload":"//7+"}}"#;
        let Some(TwilioEvent::Media {
            payload,
            timestamp_ms,
        }) = parse(text).expect("valid")
        else {
            panic!("not media")
        };
        assert!(matches!(payload, Cow::Borrowed("//7+")));
        assert_eq!(timestamp_ms, Some(40));
        let mut buf = BytesMut::new();
        assert_eq!(
            decode_payload(&payload, &mut buf).as_deref(),
            Some(&[0xff, 0xfe, 0xfe][..])
        );
        assert_eq!(decode_payload("", &mut buf), None, "never an empty frame");
        assert_eq!(decode_payload("***", &mut buf), None);
    }

    /// The media fast path agrees with the full parser on every layout, and defers to it
    /// (returns `None`) whenever the layout is not Twilio's.
    #[test]
    fn media_fast_path_matches_full_parser() {
        let twilio_docs = r#"{"event":"media","sequenceNumber":"2","streamSid":"MZ1","media":{"track":"inbound","chunk":"1","timestamp":"5","payload":"//7+"}}"#;
        let alphabetical = r#"{"event":"media","media":{"chunk":"1","payload":"//7+","timestamp":"40","track":"inbound"},"sequenceNumber":"2","streamSid":"MZ1"}"#;
        let no_track = r#"{"event":"media","streamSid":"MZ1","media":{"payload":"//7+"}}"#;
        let outbound =
            r#"{"event":"media","streamSid":"MZ1","media":{"track":"outbound","payload":"//7+"}}"#;
        for text in [twilio_docs, alphabetical, no_track, outbound] {
            assert!(media_fast(text).is_some(), "fast path taken for {text}");
            assert_eq!(
                media_fast(text).unwrap_or(None),
                parse_full(text).expect("valid"),
                "{text}"
            );
        }
        assert_eq!(
            media_fast(outbound),
            Some(None),
            "outbound audio is not the caller's"
        );
        // Not the fast layout: the full parser decides.
        let spaced = r#"{ "event": "media", "media": {"payload": "//7+"} }"#;
        let escaped = r#"{"event":"media","streamSid":"MZ\u0031","media":{"payload":"//7+"}}"#;
        let no_payload = r#"{"event":"media","streamSid":"MZ1","media":{}}"#;
        let truncated = r#"{"event":"media","media":{"payload":"//7+"#;
        for text in [spaced, escaped, no_payload, truncated] {
            assert_eq!(media_fast(text), None, "{text}");
        }
        assert!(matches!(parse(spaced), Ok(Some(TwilioEvent::Media { .. }))));
        assert!(parse(no_payload).is_err());
        assert!(parse(truncated).is_err());
    }

    /// Marks, DTMF and stop parse; unknown events are ignorable, not errors.
    #[test]
    fn other_events() {
        assert_eq!(
            parse(r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"t1.c0.u2"}}"#).expect("ok"),
            Some(TwilioEvent::Mark {
                name: "t1.c0.u2".into()
            })
        );
        assert_eq!(
            parse(
                r#"{"event":"dtmf","streamSid":"MZ1","dtmf":{"track":"inbound_track","digit":"5"}}"#
            )
            .expect("ok"),
            Some(TwilioEvent::Dtmf { digit: "5".into() })
        );
        assert_eq!(
            parse(r#"{"event":"stop","streamSid":"MZ1","stop":{}}"#).expect("ok"),
            Some(TwilioEvent::Stop)
        );
        assert_eq!(
            parse(r#"{"event":"connected","protocol":"Call"}"#).expect("ok"),
            Some(TwilioEvent::Connected)
        );
        assert_eq!(parse(r#"{"event":"something_new"}"#).expect("ok"), None);
        assert!(parse("not json").is_err());
        assert!(parse(r#"{"event":"media"}"#).is_err());
    }

    /// Outbound messages are the exact documented JSON, as text.
    #[test]
    fn outbound_shapes() {
        let out = Outbound::new("MZ1");
        let media: serde_json::Value =
            serde_json::from_str(&out.media(&[0xff, 0xfe, 0xfe])).expect("json");
        assert_eq!(
            media,
            serde_json::json!({"event":"media","streamSid":"MZ1","media":{"payload":"//7+"}})
        );
        let mark: serde_json::Value = serde_json::from_str(&out.mark("t1.c0.u2")).expect("json");
        assert_eq!(
            mark,
            serde_json::json!({"event":"mark","streamSid":"MZ1","mark":{"name":"t1.c0.u2"}})
        );
        let clear: serde_json::Value = serde_json::from_str(&out.clear()).expect("json");
        assert_eq!(
            clear,
            serde_json::json!({"event":"clear","streamSid":"MZ1"})
        );
    }

    /// A full 160-byte frame encodes to the 216-character payload Twilio itself sends.
    #[test]
    fn frame_payload_size() {
        let out = Outbound::new("MZ1");
        let msg = out.media(&[0xff; 160]);
        let v: serde_json::Value = serde_json::from_str(&msg).expect("json");
        assert_eq!(v["media"]["payload"].as_str().map(str::len), Some(216));
        assert_eq!(msg.capacity(), msg.len(), "sized exactly");
    }
}
