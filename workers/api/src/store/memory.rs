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
    /// already folded in, or one older than the notes' last call, changes nothing. Nor
    /// does a call that ended before the caller last made the persona forget them, even
    /// when its notes job was already running then (`memory_forgets`), nor any call of
    /// an erased account.
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
             SELECT ?1, ?2, ?3, 1, ?4, ?5, ?6 \
             WHERE NOT EXISTS (SELECT 1 FROM memory_forgets \
               WHERE user_id = ?1 AND persona_id = ?2 AND forgotten_at >= ?5) \
             AND NOT EXISTS (SELECT 1 FROM users WHERE id = ?1 AND erased_at IS NOT NULL) \
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

    /// Forgets what the persona remembers about the caller, at `now`: the notes go, and
    /// no call that ended before `now` is folded in again.
    pub async fn delete_memory(&self, user_id: &str, persona_id: &str, now: &str) -> ApiResult<()> {
        let forget = self.stmt(
            "INSERT INTO memory_forgets (user_id, persona_id, forgotten_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (user_id, persona_id) DO UPDATE SET forgotten_at = excluded.forgotten_at",
            &[s(user_id), s(persona_id), ts(now)],
        )?;
        let delete = self.stmt(
            "DELETE FROM persona_memories WHERE user_id = ?1 AND persona_id = ?2",
            &[s(user_id), s(persona_id)],
        )?;
        match self.batch(vec![forget, delete]).await? {
            Ok(()) => Ok(()),
            Err(e) => Err(ApiError::internal("delete memory", format!("{e:?}"))),
        }
    }
}
