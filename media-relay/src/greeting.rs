//! Greetings synthesized while the phone rings, so the persona speaks the moment the
//! callee answers.
//!
//! The call's Durable Object sends `PUT /internal/calls/{id}/greeting` (voice, settings,
//! text) right after Twilio accepts the dial. The relay synthesizes it with ElevenLabs'
//! HTTP streaming endpoint (PROTOCOLS.md §5, `ulaw_8000`: exactly what Twilio plays) and
//! keeps the audio for that call; when Twilio's `start` for the call arrives (with the
//! `greeting=prepared` parameter the TwiML adds for a person, never for a machine), the
//! call takes it and its first frame leaves at once, while the provider sockets open.
//!
//! Owns the staged greetings (one per call, bounded in number and age) and a cache of
//! synthesized audio by voice, settings and text, so a catalog persona's greeting is
//! synthesized once per relay process. Anything that goes wrong here only loses the head
//! start: a call with nothing staged speaks its greeting through the TTS socket as before,
//! and the failure is logged and counted (`relay_greetings_total`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cmb_core::channel::VoiceSettings;
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};
use url::Url;

use crate::elevenlabs::MODEL_ID;
use crate::metrics::Metrics;
use cmb_core::secret::Secret;

/// Longest the synthesis may take, body included (a phone rings for up to a minute, but a
/// greeting that takes longer than this is better spoken through the socket).
const SYNTH_TIMEOUT: Duration = Duration::from_secs(10);
/// A staged greeting not taken within this long is dropped (the call was not answered).
const STAGED_TTL: Duration = Duration::from_secs(180);
/// Longest greeting kept: 30 s of 8 kHz μ-law.
pub const MAX_AUDIO_BYTES: usize = 30 * 8000;
/// Longest greeting text accepted.
pub const MAX_TEXT_CHARS: usize = 1_000;
/// Audio the cache may hold in all (about 17 minutes of speech).
const CACHE_BYTES: usize = 8 * 1024 * 1024;

/// The body of `PUT /internal/calls/{id}/greeting`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareRequest {
    pub voice_id: String,
    pub voice_settings: VoiceSettings,
    pub text: String,
}

impl PrepareRequest {
    /// What is wrong with the request, if anything.
    pub fn problem(&self) -> Option<&'static str> {
        let id_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !id_ok(&self.voice_id) {
            return Some("voice_id must be 1-128 letters, digits, '-' or '_'");
        }
        if self.text.trim().is_empty() {
            return Some("text must not be empty");
        }
        if self.text.chars().count() > MAX_TEXT_CHARS {
            return Some("text is longer than 1,000 characters");
        }
        None
    }

    fn cache_key(&self) -> String {
        let s = &self.voice_settings;
        format!(
            "{MODEL_ID}\n{}\n{}/{}/{}/{}/{}\n{}",
            self.voice_id,
            s.stability,
            s.similarity_boost,
            s.style,
            s.speed,
            s.use_speaker_boost,
            self.text.trim()
        )
    }
}

/// A call id as the Worker makes them (a UUID); anything else is refused.
pub fn call_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A greeting ready to play.
#[derive(Debug, Clone)]
pub struct Ready {
    pub text: String,
    pub audio: Arc<[u8]>,
    /// Characters synthesized for this call (0 when the audio came from the cache).
    pub billed_chars: u64,
}

#[derive(Debug)]
enum Slot {
    Synthesizing,
    Ready(Ready),
}

#[derive(Debug)]
struct Staged {
    slot: Slot,
    since: Instant,
}

/// Audio by cache key, oldest evicted first once over [`CACHE_BYTES`].
#[derive(Debug, Default)]
struct Cache {
    audio: HashMap<String, Arc<[u8]>>,
    order: VecDeque<String>,
    bytes: usize,
}

impl Cache {
    fn get(&self, key: &str) -> Option<Arc<[u8]>> {
        self.audio.get(key).cloned()
    }

    fn put(&mut self, key: String, audio: Arc<[u8]>) {
        if self.audio.contains_key(&key) || audio.len() > CACHE_BYTES {
            return;
        }
        self.bytes += audio.len();
        self.order.push_back(key.clone());
        self.audio.insert(key, audio);
        while self.bytes > CACHE_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(a) = self.audio.remove(&old) {
                self.bytes -= a.len();
            }
        }
    }
}

/// Why a greeting could not be staged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Too many greetings are waiting for their calls.
    Full,
}

/// The relay's staged greetings and their cache.
#[derive(Debug)]
pub struct Greetings {
    staged: Mutex<HashMap<String, Staged>>,
    cache: Mutex<Cache>,
    max_staged: usize,
    /// None only if the TLS backend could not start: then nothing is staged (logged).
    http: Option<reqwest::Client>,
}

impl Greetings {
    /// At most `max_staged` calls can have a greeting waiting at once.
    pub fn new(max_staged: usize) -> Self {
        Self {
            staged: Mutex::default(),
            cache: Mutex::default(),
            max_staged,
            http: reqwest::Client::builder()
                .timeout(SYNTH_TIMEOUT)
                .build()
                .map_err(
                    |e| tracing::error!(error = %e, "no HTTP client: greetings will not be staged"),
                )
                .ok(),
        }
    }

    fn staged(&self) -> std::sync::MutexGuard<'_, HashMap<String, Staged>> {
        self.staged.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stages the greeting for `call_id`: from the cache at once, or synthesized in the
    /// background. A repeat for a call already staged changes nothing.
    pub fn prepare(
        self: &Arc<Self>,
        call_id: &str,
        req: PrepareRequest,
        tts: TtsTarget,
        metrics: &Metrics,
    ) -> Result<(), Refused> {
        let key = req.cache_key();
        let cached = self.cache().get(&key);
        let Some(http) = self.http.clone() else {
            metrics.greeting("failed");
            return Ok(());
        };
        {
            let mut staged = self.staged();
            staged.retain(|_, s| s.since.elapsed() < STAGED_TTL);
            if staged.contains_key(call_id) {
                return Ok(());
            }
            if staged.len() >= self.max_staged {
                return Err(Refused::Full);
            }
            let slot = match &cached {
                Some(audio) => Slot::Ready(Ready {
                    text: req.text.trim().to_owned(),
                    audio: audio.clone(),
                    billed_chars: 0,
                }),
                None => Slot::Synthesizing,
            };
            staged.insert(
                call_id.to_owned(),
                Staged {
                    slot,
                    since: Instant::now(),
                },
            );
        }
        if cached.is_some() {
            metrics.greeting("cached");
            return Ok(());
        }
        let this = self.clone();
        let call_id = call_id.to_owned();
        let counter = metrics.greetings.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let outcome = match synthesize(&http, &tts, &req).await {
                Ok(audio) => {
                    let audio: Arc<[u8]> = audio.into();
                    this.cache().put(key, audio.clone());
                    let ready = Ready {
                        text: req.text.trim().to_owned(),
                        billed_chars: req.text.trim().chars().count() as u64,
                        audio,
                    };
                    info!(
                        call_id,
                        bytes = ready.audio.len(),
                        ms = started.elapsed().as_millis() as u64,
                        "greeting synthesized"
                    );
                    if let Some(s) = this.staged().get_mut(&call_id) {
                        s.slot = Slot::Ready(ready);
                    }
                    "synthesized"
                }
                Err(e) => {
                    warn!(call_id, provider = "elevenlabs", error = %e, "greeting synthesis failed; the call will speak it through the TTS socket");
                    this.staged().remove(&call_id);
                    "failed"
                }
            };
            counter
                .get_or_create(&crate::metrics::OutcomeLabel { outcome })
                .inc();
        });
        Ok(())
    }

    /// The greeting staged for `call_id`, if it is ready; the slot is freed either way.
    pub fn take(&self, call_id: &str, metrics: &Metrics) -> Option<Ready> {
        let staged = self.staged().remove(call_id);
        let (outcome, ready) = match staged {
            Some(Staged {
                slot: Slot::Ready(r),
                ..
            }) => ("played", Some(r)),
            Some(_) => ("not_ready", None),
            None => ("missing", None),
        };
        metrics.greeting(outcome);
        ready
    }
}

/// Where and how to reach ElevenLabs' HTTP API.
#[derive(Debug, Clone)]
pub struct TtsTarget {
    /// `ELEVENLABS_URL` with its scheme turned to HTTP(S).
    pub base: Url,
    pub api_key: Secret,
}

/// `ws://…` → `http://…`, `wss://…` → `https://…`; the host and path stay.
pub fn http_base(ws: &Url) -> Option<Url> {
    let scheme = match ws.scheme() {
        "ws" | "http" => "http",
        "wss" | "https" => "https",
        _ => return None,
    };
    // All four are "special" schemes, so `set_scheme` may swap between them.
    let mut url = ws.clone();
    url.set_scheme(scheme).ok()?;
    Some(url)
}

/// `POST {base}/v1/text-to-speech/{voice_id}/stream?output_format=ulaw_8000`, read whole.
async fn synthesize(
    http: &reqwest::Client,
    tts: &TtsTarget,
    req: &PrepareRequest,
) -> Result<Vec<u8>, String> {
    let mut url = tts.base.clone();
    url.path_segments_mut()
        .map_err(|()| "ELEVENLABS_URL cannot take a path".to_owned())?
        .pop_if_empty()
        .extend(["v1", "text-to-speech", &req.voice_id, "stream"]);
    url.query_pairs_mut()
        .append_pair("output_format", "ulaw_8000");
    let s = &req.voice_settings;
    let body = json!({
        "text": req.text.trim(),
        "model_id": MODEL_ID,
        "voice_settings": {
            "stability": s.stability,
            "similarity_boost": s.similarity_boost,
            "style": s.style,
            "use_speaker_boost": s.use_speaker_boost,
            "speed": s.speed,
        },
    });
    let mut resp = http
        .post(url)
        .header("xi-api-key", tts.api_key.expose())
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        let detail = resp.text().await.unwrap_or_default();
        let detail: String = detail.chars().take(300).collect();
        return Err(format!("HTTP {status}: {detail}"));
    }
    let mut audio = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("reading audio: {e}"))?
    {
        if audio.len() + chunk.len() > MAX_AUDIO_BYTES {
            return Err(format!("audio longer than {MAX_AUDIO_BYTES} bytes"));
        }
        audio.extend_from_slice(&chunk);
    }
    if audio.is_empty() {
        return Err("no audio in the answer".to_owned());
    }
    Ok(audio)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> PrepareRequest {
        PrepareRequest {
            voice_id: "voice-1".into(),
            voice_settings: VoiceSettings::default(),
            text: text.into(),
        }
    }

    #[test]
    fn requests_are_checked() {
        assert_eq!(req("Hi!").problem(), None);
        assert!(req("  ").problem().is_some());
        assert!(req(&"a".repeat(1001)).problem().is_some());
        let mut r = req("Hi!");
        r.voice_id = "../admin".into();
        assert!(r.problem().is_some(), "a voice id cannot change the path");
        assert!(call_id_ok("4f1c2a9e-0b7d-4c1e-9d2a-1f3e5b7c9d0e"));
        assert!(!call_id_ok("a/b"));
        assert!(!call_id_ok(""));
    }

    #[test]
    fn the_cache_key_covers_voice_settings_and_text() {
        let a = req("Hi!");
        let mut b = req("Hi!");
        assert_eq!(a.cache_key(), b.cache_key());
        b.voice_settings.speed = 1.1;
        assert_ne!(a.cache_key(), b.cache_key());
        assert_ne!(a.cache_key(), req("Hello!").cache_key());
    }

    #[test]
    fn the_cache_evicts_oldest_first() {
        let mut c = Cache::default();
        let big = CACHE_BYTES / 2 + 1;
        c.put("a".into(), vec![0; big].into());
        c.put("b".into(), vec![0; big].into());
        assert!(c.get("a").is_none());
        assert!(c.get("b").is_some());
        assert!(c.bytes <= CACHE_BYTES);
    }

    #[test]
    fn http_base_follows_the_socket_scheme() {
        let u = |s: &str| http_base(&Url::parse(s).expect("url")).map(|u| u.to_string());
        assert_eq!(
            u("wss://api.elevenlabs.io").as_deref(),
            Some("https://api.elevenlabs.io/")
        );
        assert_eq!(
            u("ws://127.0.0.1:4312/").as_deref(),
            Some("http://127.0.0.1:4312/")
        );
        assert_eq!(u("ftp://x"), None);
    }

    #[tokio::test]
    async fn staged_greetings_are_taken_once_and_bounded() {
        let metrics = Metrics::new();
        let g = Arc::new(Greetings::new(1));
        g.cache().put(req("Hi!").cache_key(), vec![1, 2, 3].into());
        let tts = TtsTarget {
            // Nothing listens here: only a cache hit can stage.
            base: Url::parse("http://127.0.0.1:9").expect("url"),
            api_key: Secret::new("k"),
        };
        g.prepare("c1", req("Hi!"), tts.clone(), &metrics)
            .expect("staged");
        assert_eq!(
            g.prepare("c2", req("Hi!"), tts.clone(), &metrics),
            Err(Refused::Full)
        );
        let r = g.take("c1", &metrics).expect("ready");
        assert_eq!((&*r.audio, r.billed_chars), (&[1u8, 2, 3][..], 0));
        assert!(g.take("c1", &metrics).is_none(), "taken once");
    }
}
