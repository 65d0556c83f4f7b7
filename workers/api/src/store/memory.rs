//! What a persona remembers about a caller (`persona_memories`, one row per caller and
//! persona; the notes themselves are made by `cmb_core::memory`).

use super::*;

/// A persona's notes about one caller.
#[derive(Debug, Clone, Deserialize)]
pub struct MemoryRow {
    pub summary: String,
    /// Calls folded into the notes.
    pub calls: i64,
    pub last_call_at: String,
    pub updated_at: String,
}

impl MemoryRow {
    /// The `YYYY-MM-DD` of the last call the notes come from.
    pub fn last_call_day(&self) -> &str {
        self.last_call_at.get(..10).unwrap_or(&self.last_call_at)
    }
}

impl Store {
    pub async fn memory(&self, user_id: &str, persona_id: &str) -> ApiResult<Option<MemoryRow>> {
        self.first(
            "SELECT summary, calls, last_call_at, updated_at FROM persona_memories \
             WHERE user_id = ?1 AND persona_id = ?2",
            &[s(user_id), s(persona_id)],
        )
        .await
    }

    /// Writes the notes made from call `call_id` (ended at `call_at`). Idempotent: a call
    /// already folded in, or one older than the notes' last call, changes nothing.
    pub async fn save_memory(
        &self,
        user_id: &str,
        persona_id: &str,
        summary: &str,
        call_id: &str,
        call_at: &str,
        now: &str,
    ) -> ApiResult<()> {
        let upsert = self.stmt(
            "INSERT INTO persona_memories (user_id, persona_id, summary, calls, last_call_id, last_call_at, updated_at) \
             VALUES (?1, ?2, ?3, 1, ?4, ?5, ?6) \
             ON CONFLICT (user_id, persona_id) DO UPDATE SET summary = excluded.summary, \
               calls = persona_memories.calls + 1, last_call_id = excluded.last_call_id, \
               last_call_at = excluded.last_call_at, updated_at = excluded.updated_at \
             WHERE persona_memories.last_call_id <> excluded.last_call_id \
               AND persona_memories.last_call_at <= excluded.last_call_at",
            &[s(user_id), s(persona_id), s(summary), s(call_id), ts(call_at), ts(now)],
        )?;
        match self.batch(vec![upsert]).await? {
            Ok(()) => Ok(()),
            Err(e) => Err(ApiError::internal("save memory", format!("{e:?}"))),
        }
    }

    /// Forgets what the persona remembers about the caller.
    pub async fn delete_memory(&self, user_id: &str, persona_id: &str) -> ApiResult<()> {
        let delete = self.stmt(
            "DELETE FROM persona_memories WHERE user_id = ?1 AND persona_id = ?2",
            &[s(user_id), s(persona_id)],
        )?;
        match self.batch(vec![delete]).await? {
            Ok(()) => Ok(()),
            Err(e) => Err(ApiError::internal("delete memory", format!("{e:?}"))),
        }
    }
}
