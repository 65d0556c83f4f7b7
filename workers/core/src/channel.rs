//! The relay <-> CallSession channel: the typed JSON messages both sides exchange over
//! the call's control WebSocket (DESIGN.md, "The relay <-> CallSession channel").
//!
//! Every frame is one JSON text frame `{"v":1,"seq":N,"type":"…", …fields}`: [`Envelope`]
//! carries `v` and `seq`, and [`DoToRelay`] / [`RelayToDo`] the typed body. This module
//! owns the wire shape and decoding rules only — sequencing, acknowledgement and replay
//! are the endpoints' job, and audio never crosses this channel.
//!
//! Compatibility rules: unknown *fields* are ignored (a newer peer may add some); an
//! unknown *type* decodes to [`ChannelError::UnknownType`], which is ignorable (see
//! [`decode`]); a different `v` is an error, because its meaning cannot be guessed.

use std::ops::RangeInclusive;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::validate::{codes, ValidationError};

/// The protocol version every frame carries in `v`.
pub const CHANNEL_VERSION: u32 = 1;

/// One frame: version, sender's sequence number, and the message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Always [`CHANNEL_VERSION`] for frames this code writes.
    pub v: u32,
    /// Sender-assigned, increasing per direction; lets a reconnecting peer say what it
    /// already has.
    pub seq: u64,
    #[serde(flatten)]
    pub msg: T,
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// Not JSON, missing `v`/`seq`/`type`, or wrong fields for a known type.
    #[error("malformed channel frame: {0}")]
    Malformed(String),
    /// A `v` this code does not speak.
    #[error("unsupported channel version {0}")]
    UnsupportedVersion(u32),
    /// A well-formed frame of a type this code does not know (a newer peer).
    #[error("unknown channel message type {0:?}")]
    UnknownType(String),
}

impl ChannelError {
    /// True when the frame can be skipped without breaking the conversation: a newer
    /// peer's message type that this side does not need to understand.
    pub fn is_ignorable(&self) -> bool {
        matches!(self, ChannelError::UnknownType(_))
    }
}

/// Implemented by the two direction enums; lists the `type` tags each one knows so an
/// unknown tag can be told apart from a broken known one.
pub trait ChannelMessage: Serialize + DeserializeOwned {
    /// Every `type` value this enum decodes.
    const TYPES: &'static [&'static str];
    /// This message's `type` tag (for logs and metrics).
    fn type_name(&self) -> &'static str;
}

impl<T> Envelope<T> {
    /// A frame of the current version.
    pub fn new(seq: u64, msg: T) -> Self {
        Self {
            v: CHANNEL_VERSION,
            seq,
            msg,
        }
    }
}

impl<T: ChannelMessage> Envelope<T> {
    /// The frame's JSON text.
    pub fn to_json(&self) -> Result<String, ChannelError> {
        serde_json::to_string(self).map_err(|e| ChannelError::Malformed(e.to_string()))
    }

    /// Decodes one text frame. See [`decode`] for the variant that maps ignorable frames
    /// to `Ok(None)`.
    pub fn from_json(text: &str) -> Result<Self, ChannelError> {
        /// The part every frame has, read first to classify failures precisely.
        #[derive(Deserialize)]
        struct Header {
            v: u32,
            #[allow(dead_code)] // required to be present, not read here
            seq: u64,
            #[serde(rename = "type")]
            kind: String,
        }
        let header: Header =
            serde_json::from_str(text).map_err(|e| ChannelError::Malformed(e.to_string()))?;
        if header.v != CHANNEL_VERSION {
            return Err(ChannelError::UnsupportedVersion(header.v));
        }
        if !T::TYPES.contains(&header.kind.as_str()) {
            return Err(ChannelError::UnknownType(header.kind));
        }
        serde_json::from_str(text).map_err(|e| ChannelError::Malformed(e.to_string()))
    }
}

/// Decodes one text frame; an ignorable frame (unknown `type`) is `Ok(None)`.
pub fn decode<T: ChannelMessage>(text: &str) -> Result<Option<Envelope<T>>, ChannelError> {
    match Envelope::<T>::from_json(text) {
        Ok(frame) => Ok(Some(frame)),
        Err(e) if e.is_ignorable() => Ok(None),
        Err(e) => Err(e),
    }
}

/// How long into a caller's pause (ms of audio) the relay finalizes it and offers a
/// speculation, when `hello` does not say (`CALL_SPECULATE_AFTER_MS`'s default).
pub const DEFAULT_SPECULATE_AFTER_MS: u32 = 80;

/// Messages from the CallSession Durable Object to the relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DoToRelay {
    /// First frame after the relay connects: everything it needs to run the call's audio.
    Hello {
        call_id: String,
        persona_name: String,
        voice_id: String,
        voice_settings: VoiceSettings,
        stt: SttOptions,
        /// Spoken first, before the user says anything.
        greeting: String,
        max_duration_secs: u32,
        /// Hang up after this long with neither side speaking.
        idle_timeout_secs: u32,
        /// Speculative replies: the relay ends turns on its own silence timing (asking
        /// Deepgram to `Finalize` early) and sends `speculate` when the caller pauses.
        /// Absent (false) from a DO that does not speculate.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        speculate: bool,
        /// With `speculate`: how long the caller's pause (ms of audio) lasts before the
        /// relay finalizes it and offers it as a speculation. Absent: the relay's default
        /// ([`DEFAULT_SPECULATE_AFTER_MS`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        speculate_after_ms: Option<u32>,
        /// Barge-in on confirmed voice (periodic, louder than the persona's echo) without
        /// waiting for words, and words that could be the echo do not barge in. Absent
        /// (false) from a DO that does not ask for it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fast_barge_in: bool,
    },
    /// A piece of the persona's reply for `turn`, streamed as the LLM produces it.
    SayDelta {
        turn: u32,
        text: String,
    },
    /// The reply for `turn` is complete: flush what remains to TTS.
    SayEnd {
        turn: u32,
    },
    /// End the call, optionally after speaking `goodbye`.
    HangUp {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        goodbye: Option<String>,
    },
    Ping,
    /// Acknowledges every relay frame up to and including `seq`, so a reconnecting relay
    /// knows what the DO already has. (`ack_seq` on the wire: `seq` is the envelope's.)
    Ack {
        #[serde(rename = "ack_seq")]
        seq: u64,
    },
}

impl ChannelMessage for DoToRelay {
    const TYPES: &'static [&'static str] =
        &["hello", "say_delta", "say_end", "hang_up", "ping", "ack"];

    fn type_name(&self) -> &'static str {
        match self {
            DoToRelay::Hello { .. } => "hello",
            DoToRelay::SayDelta { .. } => "say_delta",
            DoToRelay::SayEnd { .. } => "say_end",
            DoToRelay::HangUp { .. } => "hang_up",
            DoToRelay::Ping => "ping",
            DoToRelay::Ack { .. } => "ack",
        }
    }
}

/// Messages from the relay to the CallSession Durable Object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RelayToDo {
    /// The media stream is up. On a reconnect, `resume_from` is the last DO `seq` the
    /// relay processed, so the DO resends only what came after.
    Ready {
        call_sid: String,
        stream_sid: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_from: Option<u64>,
    },
    /// The user finished speaking.
    UserTurn {
        /// Final transcript of the turn.
        text: String,
        /// How long STT took to finalise after the audio ended.
        stt_final_ms: u32,
        /// When the end of turn was detected, in ms since the stream started; the DO
        /// measures response latency from here.
        end_of_turn_at_ms: u64,
    },
    /// The caller paused and `text` is their turn's final transcript so far: a reply may
    /// start, but nothing of it is spoken unless a `user_turn` with the same text follows
    /// (only with `hello.speculate`).
    Speculate {
        text: String,
    },
    /// The caller spoke again after a `speculate`: that speculation is void.
    DropSpeculation,
    /// The persona's reply for `turn` was played in full (confirmed by Twilio marks).
    Heard {
        turn: u32,
        text: String,
    },
    /// The user barged in during `turn`; only `heard_text` reached their ear.
    Interrupted {
        turn: u32,
        heard_text: String,
    },
    /// A keypad press (`0`–`9`, `*`, `#`).
    Dtmf {
        digit: String,
    },
    /// Provider usage so far, for the cost breakdown.
    Usage {
        stt_audio_secs: f64,
        tts_chars: u64,
        /// Per turn: end of user turn to first persona audio sent to Twilio.
        first_audio_latencies_ms: Vec<u32>,
    },
    /// Per-turn timing the relay measured, sent when the turn's first audio went out.
    LatencyReport {
        turn: u32,
        /// End of user turn to first persona audio sent to Twilio.
        end_of_turn_to_first_audio_ms: u32,
        /// First text sent to TTS to first audio received from it.
        tts_first_audio_ms: u32,
    },
    /// The media stream ended (caller hung up, stream stopped, relay error…).
    Ended {
        reason: String,
    },
    Pong,
}

impl ChannelMessage for RelayToDo {
    const TYPES: &'static [&'static str] = &[
        "ready",
        "user_turn",
        "speculate",
        "drop_speculation",
        "heard",
        "interrupted",
        "dtmf",
        "usage",
        "latency_report",
        "ended",
        "pong",
    ];

    fn type_name(&self) -> &'static str {
        match self {
            RelayToDo::Ready { .. } => "ready",
            RelayToDo::UserTurn { .. } => "user_turn",
            RelayToDo::Speculate { .. } => "speculate",
            RelayToDo::DropSpeculation => "drop_speculation",
            RelayToDo::Heard { .. } => "heard",
            RelayToDo::Interrupted { .. } => "interrupted",
            RelayToDo::Dtmf { .. } => "dtmf",
            RelayToDo::Usage { .. } => "usage",
            RelayToDo::LatencyReport { .. } => "latency_report",
            RelayToDo::Ended { .. } => "ended",
            RelayToDo::Pong => "pong",
        }
    }
}

/// ElevenLabs voice settings, sent as-is in the TTS initialisation message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VoiceSettings {
    pub stability: f64,
    pub similarity_boost: f64,
    pub style: f64,
    pub speed: f64,
    pub use_speaker_boost: bool,
}

/// ElevenLabs' accepted ranges.
pub const UNIT_RANGE: RangeInclusive<f64> = 0.0..=1.0;
pub const SPEED_RANGE: RangeInclusive<f64> = 0.7..=1.2;

impl Default for VoiceSettings {
    /// ElevenLabs' documented defaults.
    fn default() -> Self {
        Self {
            stability: 0.5,
            similarity_boost: 0.75,
            style: 0.0,
            speed: 1.0,
            use_speaker_boost: true,
        }
    }
}

impl VoiceSettings {
    /// The first out-of-range setting, if any.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self.problems().into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Every out-of-range setting (NaN is out of every range), with fields named
    /// `voice_settings.<name>`.
    pub fn problems(&self) -> Vec<ValidationError> {
        let checks = [
            ("stability", self.stability, &UNIT_RANGE),
            ("similarity_boost", self.similarity_boost, &UNIT_RANGE),
            ("style", self.style, &UNIT_RANGE),
            ("speed", self.speed, &SPEED_RANGE),
        ];
        checks
            .into_iter()
            .filter(|(_, value, range)| !range.contains(value))
            .map(|(name, _, range)| {
                ValidationError::new(
                    format!("voice_settings.{name}"),
                    codes::OUT_OF_RANGE,
                    format!(
                        "{name} must be between {} and {}.",
                        range.start(),
                        range.end()
                    ),
                )
            })
            .collect()
    }
}

/// Deepgram live-transcription options the relay puts in its connect URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SttOptions {
    /// e.g. `nova-3`.
    pub model: String,
    /// BCP-47, e.g. `en`.
    pub language: String,
    /// Silence that ends an utterance (Deepgram `endpointing`).
    pub endpointing_ms: u32,
    /// Gap that emits `UtteranceEnd` (Deepgram minimum 1000).
    pub utterance_end_ms: u32,
}

impl Default for SttOptions {
    /// Phone-call defaults: `nova-3`, English, 300 ms endpointing, 1 s utterance end.
    fn default() -> Self {
        Self {
            model: "nova-3".into(),
            language: "en".into(),
            endpointing_ms: 300,
            utterance_end_ms: 1000,
        }
    }
}

/// Where the call's DO asks the relay to synthesize the greeting while the phone rings:
/// `RELAY_URL`'s origin, its scheme made HTTP(S), then `/internal/calls/{id}/greeting`.
pub fn greeting_url(relay_url: &str, call_id: &str) -> Option<String> {
    let mut url = url::Url::parse(relay_url).ok()?;
    let scheme = match url.scheme() {
        "wss" => "https",
        "ws" => "http",
        _ => return None,
    };
    // `ws`/`wss` and `http`/`https` are all "special" schemes, so the swap is allowed.
    url.set_scheme(scheme).ok()?;
    url.set_query(None);
    url.set_fragment(None);
    url.path_segments_mut()
        .ok()?
        .clear()
        .extend(["internal", "calls", call_id, "greeting"]);
    Some(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden<T: ChannelMessage + PartialEq + std::fmt::Debug>(seq: u64, msg: T, json: &str) {
        let frame = Envelope::new(seq, msg);
        assert_eq!(frame.to_json().unwrap(), json, "serialize");
        assert_eq!(
            Envelope::<T>::from_json(json).unwrap(),
            frame,
            "deserialize"
        );
    }

    /// Every DO → relay message has exactly this JSON shape, both ways.
    #[test]
    fn do_to_relay_golden() {
        golden(
            1,
            DoToRelay::Hello {
                call_id: "c1".into(),
                persona_name: "Coach".into(),
                voice_id: "v1".into(),
                voice_settings: VoiceSettings::default(),
                stt: SttOptions::default(),
                greeting: "Hey!".into(),
                max_duration_secs: 600,
                idle_timeout_secs: 30,
                speculate: false,
                speculate_after_ms: None,
                fast_barge_in: false,
            },
            concat!(
                r#"{"v":1,"seq":1,"type":"hello","call_id":"c1","persona_name":"Coach","#,
                r#""voice_id":"v1","voice_settings":{"stability":0.5,"similarity_boost":0.75,"#,
                r#""style":0.0,"speed":1.0,"use_speaker_boost":true},"stt":{"model":"nova-3","#,
                r#""language":"en","endpointing_ms":300,"utterance_end_ms":1000},"#,
                r#""greeting":"Hey!","max_duration_secs":600,"idle_timeout_secs":30}"#
            ),
        );
        golden(
            2,
            DoToRelay::SayDelta {
                turn: 3,
                text: "Hi \"you\"".into(),
            },
            r#"{"v":1,"seq":2,"type":"say_delta","turn":3,"text":"Hi \"you\""}"#,
        );
        golden(
            3,
            DoToRelay::SayEnd { turn: 3 },
            r#"{"v":1,"seq":3,"type":"say_end","turn":3}"#,
        );
        golden(
            4,
            DoToRelay::HangUp {
                reason: "max_duration".into(),
                goodbye: Some("Bye!".into()),
            },
            r#"{"v":1,"seq":4,"type":"hang_up","reason":"max_duration","goodbye":"Bye!"}"#,
        );
        golden(
            5,
            DoToRelay::HangUp {
                reason: "canceled".into(),
                goodbye: None,
            },
            r#"{"v":1,"seq":5,"type":"hang_up","reason":"canceled"}"#,
        );
        golden(6, DoToRelay::Ping, r#"{"v":1,"seq":6,"type":"ping"}"#);
        golden(
            7,
            DoToRelay::Ack { seq: 41 },
            r#"{"v":1,"seq":7,"type":"ack","ack_seq":41}"#,
        );
    }

    /// Every relay → DO message has exactly this JSON shape, both ways.
    #[test]
    fn relay_to_do_golden() {
        golden(
            1,
            RelayToDo::Ready {
                call_sid: "CA1".into(),
                stream_sid: "MZ1".into(),
                resume_from: None,
            },
            r#"{"v":1,"seq":1,"type":"ready","call_sid":"CA1","stream_sid":"MZ1"}"#,
        );
        golden(
            2,
            RelayToDo::Ready {
                call_sid: "CA1".into(),
                stream_sid: "MZ1".into(),
                resume_from: Some(9),
            },
            r#"{"v":1,"seq":2,"type":"ready","call_sid":"CA1","stream_sid":"MZ1","resume_from":9}"#,
        );
        golden(
            3,
            RelayToDo::UserTurn {
                text: "hello".into(),
                stt_final_ms: 120,
                end_of_turn_at_ms: 5_000,
            },
            r#"{"v":1,"seq":3,"type":"user_turn","text":"hello","stt_final_ms":120,"end_of_turn_at_ms":5000}"#,
        );
        golden(
            4,
            RelayToDo::Heard {
                turn: 1,
                text: "Hey!".into(),
            },
            r#"{"v":1,"seq":4,"type":"heard","turn":1,"text":"Hey!"}"#,
        );
        golden(
            5,
            RelayToDo::Interrupted {
                turn: 2,
                heard_text: "Well, I".into(),
            },
            r#"{"v":1,"seq":5,"type":"interrupted","turn":2,"heard_text":"Well, I"}"#,
        );
        golden(
            6,
            RelayToDo::Dtmf { digit: "#".into() },
            r##"{"v":1,"seq":6,"type":"dtmf","digit":"#"}"##,
        );
        golden(
            7,
            RelayToDo::Usage {
                stt_audio_secs: 61.5,
                tts_chars: 420,
                first_audio_latencies_ms: vec![640, 580],
            },
            r#"{"v":1,"seq":7,"type":"usage","stt_audio_secs":61.5,"tts_chars":420,"first_audio_latencies_ms":[640,580]}"#,
        );
        golden(
            8,
            RelayToDo::LatencyReport {
                turn: 2,
                end_of_turn_to_first_audio_ms: 610,
                tts_first_audio_ms: 150,
            },
            r#"{"v":1,"seq":8,"type":"latency_report","turn":2,"end_of_turn_to_first_audio_ms":610,"tts_first_audio_ms":150}"#,
        );
        golden(
            9,
            RelayToDo::Ended {
                reason: "caller_hung_up".into(),
            },
            r#"{"v":1,"seq":9,"type":"ended","reason":"caller_hung_up"}"#,
        );
        golden(10, RelayToDo::Pong, r#"{"v":1,"seq":10,"type":"pong"}"#);
        golden(
            11,
            RelayToDo::Speculate {
                text: "what should I".into(),
            },
            r#"{"v":1,"seq":11,"type":"speculate","text":"what should I"}"#,
        );
        golden(
            12,
            RelayToDo::DropSpeculation,
            r#"{"v":1,"seq":12,"type":"drop_speculation"}"#,
        );
    }

    /// `TYPES` and `type_name` agree with what serde actually writes, for every variant.
    #[test]
    fn type_lists_match_serde() {
        fn check<T: ChannelMessage>(msgs: Vec<T>) {
            assert_eq!(msgs.len(), T::TYPES.len(), "one sample per type");
            for m in msgs {
                let value = serde_json::to_value(Envelope::new(0, &m)).unwrap();
                let tag = value["type"].as_str().unwrap().to_owned();
                assert_eq!(tag, m.type_name());
                assert!(T::TYPES.contains(&tag.as_str()), "{tag}");
            }
        }
        check(vec![
            DoToRelay::Hello {
                call_id: String::new(),
                persona_name: String::new(),
                voice_id: String::new(),
                voice_settings: VoiceSettings::default(),
                stt: SttOptions::default(),
                greeting: String::new(),
                max_duration_secs: 0,
                idle_timeout_secs: 0,
                speculate: true,
                speculate_after_ms: Some(40),
                fast_barge_in: true,
            },
            DoToRelay::SayDelta {
                turn: 0,
                text: String::new(),
            },
            DoToRelay::SayEnd { turn: 0 },
            DoToRelay::HangUp {
                reason: String::new(),
                goodbye: None,
            },
            DoToRelay::Ping,
            DoToRelay::Ack { seq: 0 },
        ]);
        check(vec![
            RelayToDo::Ready {
                call_sid: String::new(),
                stream_sid: String::new(),
                resume_from: None,
            },
            RelayToDo::UserTurn {
                text: String::new(),
                stt_final_ms: 0,
                end_of_turn_at_ms: 0,
            },
            RelayToDo::Speculate {
                text: String::new(),
            },
            RelayToDo::DropSpeculation,
            RelayToDo::Heard {
                turn: 0,
                text: String::new(),
            },
            RelayToDo::Interrupted {
                turn: 0,
                heard_text: String::new(),
            },
            RelayToDo::Dtmf {
                digit: String::new(),
            },
            RelayToDo::Usage {
                stt_audio_secs: 0.0,
                tts_chars: 0,
                first_audio_latencies_ms: vec![],
            },
            RelayToDo::LatencyReport {
                turn: 0,
                end_of_turn_to_first_audio_ms: 0,
                tts_first_audio_ms: 0,
            },
            RelayToDo::Ended {
                reason: String::new(),
            },
            RelayToDo::Pong,
        ]);
    }

    /// An unknown `type` is an ignorable error, and `decode` turns it into `Ok(None)`.
    #[test]
    fn unknown_type_is_ignorable() {
        let text = r#"{"v":1,"seq":3,"type":"emote","mood":"happy"}"#;
        let err = Envelope::<RelayToDo>::from_json(text).unwrap_err();
        assert_eq!(err, ChannelError::UnknownType("emote".into()));
        assert!(err.is_ignorable());
        assert_eq!(decode::<RelayToDo>(text), Ok(None));
        // A DO message sent the wrong way is unknown in that direction.
        assert!(decode::<DoToRelay>(r#"{"v":1,"seq":1,"type":"pong"}"#)
            .unwrap()
            .is_none());
    }

    /// Unknown extra fields (from a newer peer) are ignored; `null` is accepted for
    /// optional fields.
    #[test]
    fn extra_fields_ignored_and_null_options() {
        let text = r#"{"v":1,"seq":2,"type":"say_end","turn":4,"new_field":[1,2]}"#;
        assert_eq!(
            decode::<DoToRelay>(text).unwrap().unwrap().msg,
            DoToRelay::SayEnd { turn: 4 }
        );
        let text = r#"{"v":1,"seq":2,"type":"ready","call_sid":"CA","stream_sid":"MZ","resume_from":null}"#;
        assert_eq!(
            decode::<RelayToDo>(text).unwrap().unwrap().msg,
            RelayToDo::Ready {
                call_sid: "CA".into(),
                stream_sid: "MZ".into(),
                resume_from: None
            }
        );
    }

    /// Broken frames are `Malformed` (not ignorable); another version is refused.
    #[test]
    fn malformed_and_version_errors() {
        for text in [
            "not json",
            "{}",
            r#"{"v":1,"type":"ping"}"#,
            r#"{"v":1,"seq":1}"#,
            r#"{"v":1,"seq":-1,"type":"ping"}"#,
            r#"{"v":1,"seq":1,"type":"say_end"}"#,
            r#"{"v":1,"seq":1,"type":"say_end","turn":"one"}"#,
            r#"[1,2]"#,
        ] {
            let err = decode::<DoToRelay>(text).unwrap_err();
            assert!(matches!(err, ChannelError::Malformed(_)), "{text}: {err:?}");
            assert!(!err.is_ignorable());
        }
        assert_eq!(
            decode::<DoToRelay>(r#"{"v":2,"seq":1,"type":"ping"}"#),
            Err(ChannelError::UnsupportedVersion(2))
        );
    }

    /// The ElevenLabs ranges are enforced on every setting, NaN included, and all
    /// problems are reported.
    #[test]
    fn voice_settings_ranges() {
        assert_eq!(VoiceSettings::default().validate(), Ok(()));
        let edge = VoiceSettings {
            stability: 0.0,
            similarity_boost: 1.0,
            style: 1.0,
            speed: 0.7,
            use_speaker_boost: false,
        };
        assert_eq!(edge.validate(), Ok(()));
        let fast = VoiceSettings {
            speed: 1.2,
            ..VoiceSettings::default()
        };
        assert_eq!(fast.validate(), Ok(()));
        let bad = VoiceSettings {
            stability: -0.1,
            similarity_boost: f64::NAN,
            style: 1.01,
            speed: 1.25,
            use_speaker_boost: true,
        };
        let fields: Vec<String> = bad.problems().into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "voice_settings.stability",
                "voice_settings.similarity_boost",
                "voice_settings.style",
                "voice_settings.speed"
            ]
        );
        let err = VoiceSettings {
            speed: 0.69,
            ..VoiceSettings::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.code, codes::OUT_OF_RANGE);
        assert_eq!(err.field, "voice_settings.speed");
    }

    #[test]
    fn greeting_url_is_the_relays_origin_over_http() {
        assert_eq!(
            greeting_url("wss://relay.example.com/twilio", "c-1").as_deref(),
            Some("https://relay.example.com/internal/calls/c-1/greeting")
        );
        assert_eq!(
            greeting_url("ws://127.0.0.1:4400/media?x=1", "c1").as_deref(),
            Some("http://127.0.0.1:4400/internal/calls/c1/greeting")
        );
        // A call id cannot climb out of its path segment.
        assert_eq!(
            greeting_url("wss://r.example/twilio", "../x").as_deref(),
            Some("https://r.example/internal/calls/..%2Fx/greeting")
        );
        assert_eq!(greeting_url("https://r.example/twilio", "c1"), None);
        assert_eq!(greeting_url("not a url", "c1"), None);
    }
}
