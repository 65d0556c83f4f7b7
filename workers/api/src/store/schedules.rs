//! Recurring schedules (`schedules`): what the user set up, and which attempt is pending.
//! The decisions (next occurrence, retries) are `cmb_core::schedule`; each attempt is an
//! ordinary scheduled call (`calls.schedule_id`).

use super::*;

/// A schedule as stored.
#[derive(Debug, Clone, Deserialize)]
pub struct ScheduleRow {
    pub id: String,
    pub user_id: String,
    pub persona_id: String,
    pub time_of_day: String,
    pub days: i64,
    pub timezone: String,
    pub retries: i64,
    pub retry_after_minutes: i64,
    #[serde(deserialize_with = "read_flag")]
    pub is_active: bool,
    pub pending_call_id: Option<String>,
    pub next_call_at: Option<String>,
    pub skipped_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// The fields a user sets.
pub struct ScheduleWrite<'a> {
    pub persona_id: &'a str,
    pub time_of_day: &'a str,
    pub days: i64,
    pub timezone: &'a str,
    pub retries: i64,
    pub retry_after_minutes: i64,
    pub is_active: bool,
}

const COLUMNS: &str = "id, user_id, persona_id, time_of_day, days, timezone, retries, \
     retry_after_minutes, is_active, pending_call_id, next_call_at, skipped_reason, created_at, updated_at";

impl Store {
    /// The user's schedule `id` (not deleted).
    pub async fn schedule(&self, user_id: &str, id: &str) -> ApiResult<Option<ScheduleRow>> {
        self.first(
            &format!(
                "SELECT {COLUMNS} FROM schedules WHERE id = ?1 AND user_id = ?2 AND deleted_at IS NULL"
            ),
            &[s(id), s(user_id)],
        )
        .await
    }

    /// Schedule `id` whoever owns it (a call's session following up), not deleted.
    pub async fn schedule_by_id(&self, id: &str) -> ApiResult<Option<ScheduleRow>> {
        self.first(
            &format!("SELECT {COLUMNS} FROM schedules WHERE id = ?1 AND deleted_at IS NULL"),
            &[s(id)],
        )
        .await
    }

    pub async fn schedules(&self, user_id: &str) -> ApiResult<Vec<ScheduleRow>> {
        self.all(
            &format!(
                "SELECT {COLUMNS} FROM schedules WHERE user_id = ?1 AND deleted_at IS NULL \
                 ORDER BY created_at, id"
            ),
            &[s(user_id)],
        )
        .await
    }

    pub async fn insert_schedule(
        &self,
        id: &str,
        user_id: &str,
        w: &ScheduleWrite<'_>,
        now: &str,
    ) -> ApiResult<()> {
        let insert = self.stmt(
            "INSERT INTO schedules (id, user_id, persona_id, time_of_day, days, timezone, retries, \
               retry_after_minutes, is_active, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)",
            &[
                s(id),
                s(user_id),
                s(w.persona_id),
                s(w.time_of_day),
                int(w.days),
                s(w.timezone),
                int(w.retries),
                int(w.retry_after_minutes),
                flag(w.is_active),
                ts(now),
            ],
        )?;
        self.write("insert schedule", vec![insert]).await
    }

    pub async fn update_schedule(
        &self,
        id: &str,
        w: &ScheduleWrite<'_>,
        now: &str,
    ) -> ApiResult<()> {
        let update = self.stmt(
            "UPDATE schedules SET persona_id = ?2, time_of_day = ?3, days = ?4, timezone = ?5, \
               retries = ?6, retry_after_minutes = ?7, is_active = ?8, updated_at = ?9 \
             WHERE id = ?1",
            &[
                s(id),
                s(w.persona_id),
                s(w.time_of_day),
                int(w.days),
                s(w.timezone),
                int(w.retries),
                int(w.retry_after_minutes),
                flag(w.is_active),
                ts(now),
            ],
        )?;
        self.write("update schedule", vec![update]).await
    }

    /// Records the attempt now pending (`None`: none), or why the occurrence was skipped.
    pub async fn set_schedule_pending(
        &self,
        id: &str,
        pending: Option<(&str, &str)>,
        skipped_reason: Option<&str>,
        now: &str,
    ) -> ApiResult<()> {
        let update = self.stmt(
            "UPDATE schedules SET pending_call_id = ?2, next_call_at = ?3, skipped_reason = ?4, \
               updated_at = ?5 WHERE id = ?1",
            &[
                s(id),
                opt(pending.map(|p| p.0)),
                opt_ts(pending.map(|p| p.1)),
                opt(skipped_reason),
                ts(now),
            ],
        )?;
        self.write("schedule pending", vec![update]).await
    }

    /// Deletes a schedule (kept, so its calls still name it).
    pub async fn delete_schedule(&self, id: &str, now: &str) -> ApiResult<()> {
        let delete = self.stmt(
            "UPDATE schedules SET deleted_at = ?2, is_active = FALSE, pending_call_id = NULL, \
               next_call_at = NULL, updated_at = ?2 WHERE id = ?1",
            &[s(id), ts(now)],
        )?;
        self.write("delete schedule", vec![delete]).await
    }

    async fn write(&self, what: &str, stmts: Vec<Bound<'_>>) -> ApiResult<()> {
        match self.batch(stmts).await? {
            Ok(()) => Ok(()),
            Err(e) => Err(ApiError::internal(what, format!("{e:?}"))),
        }
    }
}
