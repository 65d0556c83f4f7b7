//! Updating what the persona remembers after a call (the machine's `Effect::Remember`).
//!
//! Runs in the background of the call's Durable Object (`waitUntil`): settlement is
//! already written, nothing waits for this, and any failure leaves the old notes as they
//! were. The notes themselves (prompt, cleaning, cap) are `cmb_core::memory`.

use std::rc::Rc;

use cmb_core::config::WorkerConfig;
use cmb_core::memory::{self, Notes};
use cmb_core::session::TranscriptLine;
use serde_json::json;
use worker::Env;

use crate::clients::llm;
use crate::error::{ApiError, ApiResult};
use crate::iso_from_millis as iso;
use crate::store::Store;

/// One call's contribution to the notes.
pub(super) struct Job {
    pub env: Env,
    pub cfg: Rc<WorkerConfig>,
    pub call_id: String,
    pub user_id: String,
    pub lines: Vec<TranscriptLine>,
    pub ended_at_ms: u64,
}

/// Runs `job` and logs how it went (never the notes or the transcript).
pub(super) async fn remember(job: Job) {
    match update(&job).await {
        Ok(Some(chars)) => crate::log::info(
            "memory_updated",
            json!({ "call_id": job.call_id, "user_id": job.user_id, "chars": chars }),
        ),
        Ok(None) => crate::log::warn(
            "memory_unchanged",
            json!({ "call_id": job.call_id, "user_id": job.user_id, "why": "the LLM's notes were empty" }),
        ),
        Err(e) => crate::log::warn(
            "memory_update_failed",
            json!({ "call_id": job.call_id, "user_id": job.user_id, "error": e.log_detail() }),
        ),
    }
}

/// The new notes' length, or None when the LLM gave nothing to keep.
async fn update(job: &Job) -> ApiResult<Option<usize>> {
    let store = Store::open(&job.env, job.cfg.db_backend).await?;
    let call = store
        .call(&job.call_id)
        .await?
        .ok_or_else(|| ApiError::internal("memory", "the call row is gone"))?;
    let persona = store
        .persona(&call.persona_id)
        .await?
        .ok_or_else(|| ApiError::internal("memory", "the persona is gone"))?;
    let previous = store.memory(&job.user_id, &call.persona_id).await?;
    let ended_at = iso(job.ended_at_ms);
    let messages = memory::update_messages(
        &persona.name,
        previous.as_ref().map(|m| Notes {
            summary: &m.summary,
            day: m.last_call_day(),
        }),
        &job.lines,
        ended_at.get(..10).unwrap_or(&ended_at),
    );
    let answer = llm::complete(&job.cfg, &messages, memory::MAX_COMPLETION_TOKENS)
        .await
        .map_err(|e| ApiError::internal("memory llm", e))?;
    let Some(summary) = memory::clean(&answer) else {
        return Ok(None);
    };
    let now = iso(worker::Date::now().as_millis());
    store
        .save_memory(
            &job.user_id,
            &call.persona_id,
            &summary,
            &job.call_id,
            &ended_at,
            &now,
        )
        .await?;
    Ok(Some(summary.chars().count()))
}
