//! Analytics: per-day aggregates over inclusive `YYYY-MM-DD` UTC days.

use super::*;

use cmb_core::analytics::{CallDayRow, CostDayRow, LatencyDayRow, RefundDayRow, SalesDayRow};

/// The UTC day a call belongs to in analytics: when it was answered, else when it was
/// due, else when it was requested. `date()` normalises any UTC offset, so a timestamp
/// with `+02:00` still lands on its UTC day.
pub(super) const CALL_DAY: &str = "date(COALESCE(c.started_at, c.scheduled_time, c.created_at))";

impl Store {
    // ---- analytics (from/to are inclusive YYYY-MM-DD UTC days) ----

    pub async fn calls_by_day(&self, from: &str, to: &str) -> ApiResult<Vec<CallDayRow>> {
        self.all(
            &format!(
                "SELECT {CALL_DAY} AS day, c.status AS status, COUNT(*) AS calls, \
                 COALESCE(CAST(SUM(c.duration_seconds) AS BIGINT), 0) AS duration_seconds, \
                 COALESCE(CAST(SUM(CASE WHEN c.status = 'completed' AND c.duration_seconds > 0 \
                   THEN (c.duration_seconds + 59) / 60 ELSE 0 END) AS BIGINT), 0) AS billed_minutes, \
                 COALESCE(CAST(SUM(c.cost_cents) AS BIGINT), 0) AS credits_charged \
                 FROM calls c WHERE {CALL_DAY} BETWEEN ?1 AND ?2 \
                 GROUP BY 1, 2 ORDER BY 1, 2"
            ),
            &[crate::store::day(from), crate::store::day(to)],
        )
        .await
    }

    /// Average and p95 (nearest rank: the smallest value with at least 95% of the
    /// turns at or below it) of end-of-turn → first-audio latency, per day and over the
    /// whole range (`day = "total"`).
    pub async fn latency_by_day(&self, from: &str, to: &str) -> ApiResult<Vec<LatencyDayRow>> {
        let query = |group: &str| {
            format!(
                "WITH l AS ( \
                   SELECT {group} AS day, t.end_of_turn_to_first_audio_ms AS ms \
                   FROM call_turn_latencies t JOIN calls c ON c.id = t.call_id \
                   WHERE t.end_of_turn_to_first_audio_ms IS NOT NULL AND {CALL_DAY} BETWEEN ?1 AND ?2), \
                 r AS ( \
                   SELECT day, ms, ROW_NUMBER() OVER (PARTITION BY day ORDER BY ms) AS rn, \
                   COUNT(*) OVER (PARTITION BY day) AS n FROM l) \
                 SELECT day, COUNT(*) AS turns, CAST(AVG(ms) AS DOUBLE PRECISION) AS avg_ms, \
                 MIN(CASE WHEN rn * 100 >= n * 95 THEN ms END) AS p95_ms \
                 FROM r GROUP BY day ORDER BY day"
            )
        };
        let mut rows: Vec<LatencyDayRow> = self
            .all(
                &query(CALL_DAY),
                &[crate::store::day(from), crate::store::day(to)],
            )
            .await?;
        rows.extend(
            self.all::<LatencyDayRow>(
                &query("'total'"),
                &[crate::store::day(from), crate::store::day(to)],
            )
            .await?,
        );
        Ok(rows)
    }

    pub async fn sales_by_day(&self, from: &str, to: &str) -> ApiResult<Vec<SalesDayRow>> {
        self.all(
            "SELECT date(paid_at) AS day, COUNT(*) AS purchases, CAST(SUM(credits) AS BIGINT) AS credits_sold, \
             CAST(SUM(amount_cents) AS BIGINT) AS sales_cents FROM purchases \
             WHERE paid_at IS NOT NULL AND date(paid_at) BETWEEN ?1 AND ?2 GROUP BY 1 ORDER BY 1",
            &[crate::store::day(from), crate::store::day(to)],
        )
        .await
    }

    pub async fn refunds_by_day(&self, from: &str, to: &str) -> ApiResult<Vec<RefundDayRow>> {
        self.all(
            "SELECT date(created_at) AS day, COUNT(*) AS refunds, CAST(SUM(refunded_cents) AS BIGINT) AS refunded_cents, \
             CAST(SUM(credits_taken) AS BIGINT) AS credits_taken, CAST(SUM(credits_due - credits_taken) AS BIGINT) AS debt_credits \
             FROM payment_refunds WHERE date(created_at) BETWEEN ?1 AND ?2 GROUP BY 1 ORDER BY 1",
            &[crate::store::day(from), crate::store::day(to)],
        )
        .await
    }

    pub async fn costs_by_day(&self, from: &str, to: &str) -> ApiResult<Vec<CostDayRow>> {
        self.all(
            &format!(
                "SELECT {CALL_DAY} AS day, k.provider AS provider, CAST(SUM(k.quantity) AS DOUBLE PRECISION) AS quantity, \
                 CAST(SUM(k.cost_micros) AS BIGINT) AS cost_micros \
                 FROM call_costs k JOIN calls c ON c.id = k.call_id \
                 WHERE {CALL_DAY} BETWEEN ?1 AND ?2 GROUP BY 1, 2 ORDER BY 1, 2"
            ),
            &[crate::store::day(from), crate::store::day(to)],
        )
        .await
    }
}
