//! Staging the greeting at the relay while the phone rings (the machine's
//! `Effect::StageGreeting`): the relay synthesizes it over ElevenLabs' HTTP API and plays
//! it the moment a person answers (`media-relay/src/greeting.rs`).
//!
//! Runs in the background of the call's Durable Object (`waitUntil`) with a deadline. A
//! failure is logged and costs only the head start: the relay then speaks the greeting
//! from `hello` through its TTS socket, as before.

use std::rc::Rc;

use cmb_core::channel::VoiceSettings;
use cmb_core::config::WorkerConfig;
use serde_json::json;
use worker::Method;

use crate::clients::{self, Body};

/// The relay answers at once (the synthesis runs on its side); this bounds a relay that
/// does not.
const DEADLINE_MS: u32 = 3_000;

/// `PUT {relay}/internal/calls/{id}/greeting`, authenticated with `RELAY_SECRET`.
pub(super) async fn stage(
    cfg: Rc<WorkerConfig>,
    call_id: String,
    voice_id: String,
    voice_settings: VoiceSettings,
    text: String,
) {
    let Some(url) = cmb_core::channel::greeting_url(&cfg.relay_url, &call_id) else {
        crate::log::warn(
            "greeting_stage_failed",
            json!({ "call_id": call_id, "error": "RELAY_URL has no HTTP form" }),
        );
        return;
    };
    let body = json!({ "voice_id": voice_id, "voice_settings": voice_settings, "text": text });
    let auth = format!("Bearer {}", cfg.relay_secret.expose());
    let sent = match clients::request(
        Method::Put,
        &url,
        &[("authorization", auth.as_str())],
        Some(Body::Json(body.to_string())),
    ) {
        Ok(req) => clients::send(req, DEADLINE_MS).await,
        Err(e) => Err(e),
    };
    match sent {
        Ok(a) if a.is_success() => {
            crate::log::info("greeting_staged", json!({ "call_id": call_id }))
        }
        Ok(a) => crate::log::warn(
            "greeting_stage_refused",
            json!({ "call_id": call_id, "status": a.status, "detail": a.snippet(200) }),
        ),
        Err(e) => crate::log::warn(
            "greeting_stage_failed",
            json!({ "call_id": call_id, "error": e.to_string() }),
        ),
    }
}
