//! ElevenLabs multi-context TTS WebSocket wire format (PROTOCOLS.md §5).
//!
//! Owns the URL, the client messages and parsing of server messages. It never touches a
//! socket. Context ids are the relay's own (`c<n>`); audio arrives as `ulaw_8000`, which is
//! exactly what Twilio plays, so nothing here (or anywhere) resamples.
//!
//! Provider tolerance: both `isFinal`/`is_final` and `contextId`/`context_id` are
//! accepted, since sources disagree on the server's spelling.

use cmb_core::channel::VoiceSettings;
use serde::Deserialize;
use serde_json::json;
use url::Url;

/// Model with the lowest latency that supports multi-context.
pub const MODEL_ID: &str = "eleven_flash_v2_5";
/// Seconds before ElevenLabs drops an idle context: the maximum, since the relay keeps
/// a spare context open between turns and closes used ones itself.
pub const INACTIVITY_TIMEOUT_SECS: u32 = 180;
/// Ends the whole socket (contexts already flushing finish first).
pub const CLOSE_SOCKET: &str = r#"{"close_socket":true}"#;

/// Why an ElevenLabs message could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElevenLabsError {
    #[error("malformed ElevenLabs message: {0}")]
    Malformed(String),
    #[error("voice id cannot be put in a URL")]
    BadVoiceId,
}

/// One server message the relay acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum TtsMessage {
    /// A chunk of μ-law audio for a context.
    Audio {
        context_id: Option<String>,
        audio: Vec<u8>,
        /// Start time (ms into this chunk) of each non-whitespace character it covers,
        /// from `alignment`; `None` if the server sent no usable alignment.
        char_starts_ms: Option<Vec<u32>>,
    },
    /// The context has produced all its audio.
    Final { context_id: Option<String> },
    /// An error frame; the server closes the socket after it.
    Error { message: String },
}

/// `…/v1/text-to-speech/{voice_id}/multi-stream-input?model_id=…&output_format=ulaw_8000&…`
pub fn stream_url(base: &Url, voice_id: &str) -> Result<Url, ElevenLabsError> {
    if voice_id.is_empty() {
        return Err(ElevenLabsError::BadVoiceId);
    }
    let mut url = base.clone();
    url.path_segments_mut()
        .map_err(|()| ElevenLabsError::BadVoiceId)?
        .pop_if_empty()
        // `push` percent-encodes, so a hostile voice id cannot change the path.
        .extend(["v1", "text-to-speech", voice_id, "multi-stream-input"]);
    url.query_pairs_mut()
        .append_pair("model_id", MODEL_ID)
        .append_pair("output_format", "ulaw_8000")
        .append_pair("inactivity_timeout", &INACTIVITY_TIMEOUT_SECS.to_string());
    Ok(url)
}

/// Opens a context: the first message must carry a single space, with the voice settings.
pub fn init_context(context_id: &str, settings: &VoiceSettings) -> String {
    json!({
        "text": " ",
        "context_id": context_id,
        "voice_settings": {
            "stability": settings.stability,
            "similarity_boost": settings.similarity_boost,
            "style": settings.style,
            "use_speaker_boost": settings.use_speaker_boost,
            "speed": settings.speed,
        },
    })
    .to_string()
}

/// Text for a context; `flush` forces generation of everything buffered (a clause end).
pub fn send_text(context_id: &str, text: &str, flush: bool) -> String {
    if flush {
        json!({"text": text, "context_id": context_id, "flush": true}).to_string()
    } else {
        json!({"text": text, "context_id": context_id}).to_string()
    }
}

/// Resets a context's inactivity timer without adding speech.
pub fn keep_alive(context_id: &str) -> String {
    json!({"text": "", "context_id": context_id}).to_string()
}

/// Closes a context: the interruption primitive, and how a finished context is released
/// (a connection holds at most 5).
pub fn close_context(context_id: &str) -> String {
    json!({"context_id": context_id, "close_context": true}).to_string()
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    audio: Option<String>,
    #[serde(default, alias = "is_final")]
    #[serde(rename = "isFinal")]
    is_final: Option<bool>,
    #[serde(default, alias = "context_id")]
    #[serde(rename = "contextId")]
    context_id: Option<String>,
    #[serde(default)]
    alignment: Option<RawAlignment>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAlignment {
    #[serde(default)]
    chars: Vec<String>,
    #[serde(default)]
    char_start_times_ms: Vec<f64>,
}

/// Parses one server text frame. A frame with neither audio, final flag nor error is
/// ignorable (`Ok(None)`).
pub fn parse(text: &str) -> Result<Option<TtsMessage>, ElevenLabsError> {
    let raw: Raw =
        serde_json::from_str(text).map_err(|e| ElevenLabsError::Malformed(e.to_string()))?;
    if raw.error.is_some() {
        let message = raw
            .message
            .unwrap_or_else(|| raw.error.map(|e| e.to_string()).unwrap_or_default());
        return Ok(Some(TtsMessage::Error { message }));
    }
    if let Some(b64) = raw.audio.as_deref().filter(|a| !a.is_empty()) {
        let audio = base64_simd::STANDARD
            .decode_to_vec(b64)
            .map_err(|e| ElevenLabsError::Malformed(format!("audio is not base64: {e}")))?;
        let char_starts_ms = raw.alignment.and_then(non_whitespace_starts);
        return Ok(Some(TtsMessage::Audio {
            context_id: raw.context_id,
            audio,
            char_starts_ms,
        }));
    }
    if raw.is_final == Some(true) {
        return Ok(Some(TtsMessage::Final {
            context_id: raw.context_id,
        }));
    }
    Ok(None)
}

/// Start times of the non-whitespace characters. Whitespace is skipped on both sides of
/// the clause bookkeeping, so a server that drops or adds spaces cannot shift a mark.
fn non_whitespace_starts(a: RawAlignment) -> Option<Vec<u32>> {
    if a.chars.len() != a.char_start_times_ms.len() {
        return None;
    }
    Some(
        a.chars
            .iter()
            .zip(&a.char_start_times_ms)
            .filter(|(c, _)| !c.trim().is_empty())
            // Times are small non-negative ms; `as` saturates anything odd to 0..=u32::MAX.
            .map(|(_, t)| t.max(0.0).round() as u32)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The URL has the voice in the path and the documented query parameters.
    #[test]
    fn url_shape() {
        let base = Url::parse("wss://api.elevenlabs.io").expect("url");
        assert_eq!(
            stream_url(&base, "voice 1").expect("url").as_str(),
            "wss://api.elevenlabs.io/v1/text-to-speech/voice%201/multi-stream-input\
             ?model_id=eleven_flash_v2_5&output_format=ulaw_8000&inactivity_timeout=180"
        );
        let prefixed = Url::parse("ws://127.0.0.1:9/fake/").expect("url");
        assert_eq!(
            stream_url(&prefixed, "v").expect("url").path(),
            "/fake/v1/text-to-speech/v/multi-stream-input"
        );
        assert_eq!(stream_url(&base, ""), Err(ElevenLabsError::BadVoiceId));
        assert_eq!(
            stream_url(&base, "../x").expect("url").path(),
            "/v1/text-to-speech/..%2Fx/multi-stream-input"
        );
    }

    /// Client messages match the multi-context schema.
    #[test]
    fn client_messages() {
        let v: serde_json::Value =
            serde_json::from_str(&init_context("c1", &VoiceSettings::default())).expect("json");
        assert_eq!(v["text"], " ");
        assert_eq!(v["context_id"], "c1");
        assert_eq!(v["voice_settings"]["similarity_boost"], 0.75);
        let v: serde_json::Value =
            serde_json::from_str(&send_text("c1", "Hi, ", true)).expect("json");
        assert_eq!(
            v,
            json!({"text": "Hi, ", "context_id": "c1", "flush": true})
        );
        let v: serde_json::Value = serde_json::from_str(&close_context("c1")).expect("json");
        assert_eq!(v, json!({"context_id": "c1", "close_context": true}));
        let v: serde_json::Value = serde_json::from_str(&keep_alive("c1")).expect("json");
        assert_eq!(v, json!({"text": "", "context_id": "c1"}));
    }

    /// Audio decodes, and alignment keeps only non-whitespace characters' start times.
    #[test]
    fn parses_audio_with_alignment() {
        let text = r#"{"audio":"//7+","contextId":"c1","normalizedAlignment":null,
            "alignment":{"chars":["H","i"," ","y"],"charStartTimesMs":[0,40,90,100],"charDurationsMs":[40,50,10,60]}}"#;
        assert_eq!(
            parse(text).expect("valid"),
            Some(TtsMessage::Audio {
                context_id: Some("c1".into()),
                audio: vec![0xff, 0xfe, 0xfe],
                char_starts_ms: Some(vec![0, 40, 100]),
            })
        );
    }

    /// Quirk: both spellings of the final flag and context id are accepted; null audio on
    /// the final message is not audio.
    #[test]
    fn final_spellings_quirk() {
        for text in [
            r#"{"isFinal":true,"contextId":"c2","audio":null}"#,
            r#"{"is_final":true,"context_id":"c2","audio":""}"#,
        ] {
            assert_eq!(
                parse(text).expect("valid"),
                Some(TtsMessage::Final {
                    context_id: Some("c2".into())
                }),
                "{text}"
            );
        }
    }

    /// Error frames are recognised; empty frames are ignorable.
    #[test]
    fn errors_and_noise() {
        let text = r#"{"message":"Maximum simultaneous contexts exceeded (5)","error":"max_active_conversations","code":1008}"#;
        assert!(
            matches!(parse(text).expect("valid"), Some(TtsMessage::Error { message }) if message.contains("(5)"))
        );
        assert_eq!(parse(r#"{"contextId":"c1"}"#).expect("valid"), None);
        assert!(parse(r#"{"audio":"***"}"#).is_err());
    }
}
