//! Exact rate and daily limits: counters per window.

use super::*;

impl Store {
    // ---- limits ----

    /// Counts one hit in a fixed window and returns the new count — one upsert, so
    /// concurrent hits each see a distinct count.
    pub async fn hit_rate_limit(&self, key: &str, window_start: i64) -> ApiResult<i64> {
        let row: Option<Count> = self
            .first(
                "INSERT INTO rate_limits (key, window_start, count) VALUES (?1, ?2, 1) \
                 ON CONFLICT (key, window_start) DO UPDATE SET count = rate_limits.count + 1 RETURNING count AS n",
                &[s(key), int(window_start)],
            )
            .await?;
        row.map(|c| c.n)
            .ok_or_else(|| ApiError::internal("rate limit", "upsert returned no row"))
    }

    /// Gives one hit back (a successful login does not count as a failure).
    pub async fn unhit_rate_limit(&self, key: &str, window_start: i64) -> ApiResult<()> {
        self.stmt(
            "UPDATE rate_limits SET count = count - 1 WHERE key = ?1 AND window_start = ?2 AND count > 0",
            &[s(key), int(window_start)],
        )?
        .run()
        .await
        .map_err(|e| ApiError::internal("rate limit release", e))?;
        Ok(())
    }

    /// Drops windows that ended before `before` (housekeeping; any caller may run it).
    pub async fn prune_rate_limits(&self, before: i64) -> ApiResult<()> {
        self.stmt(
            "DELETE FROM rate_limits WHERE window_start < ?1",
            &[int(before)],
        )?
        .run()
        .await
        .map_err(|e| ApiError::internal("rate limit prune", e))?;
        Ok(())
    }

    /// The per-day call counter bump, for the same batch as the call insert: it aborts
    /// the batch (`WriteConflict::DailyLimit`) when the count would pass `cap`.
    pub fn daily_call_stmt(&self, user_id: &str, day: &str, cap: i64) -> ApiResult<Bound<'_>> {
        self.stmt(
            "INSERT INTO call_day_counts (user_id, day, count, cap) VALUES (?1, ?2, 1, ?3) \
             ON CONFLICT (user_id, day) DO UPDATE SET count = call_day_counts.count + 1, cap = excluded.cap",
            &[s(user_id), crate::store::day(day), int(cap)],
        )
    }
}
