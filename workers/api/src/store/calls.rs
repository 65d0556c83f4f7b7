//! Calls: their lifecycle rows, settlement, the conversation record (transcript, costs,
//! latencies) and the admin's view.

use cmb_core::calls::CallStatus;
use cmb_core::model::{LedgerKind, RequestedBy, TranscriptRole};

use super::*;

/// A call as stored; also its API view (API.md "A `call` object" plus `status_reason`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CallRow {
    pub id: String,
    pub user_id: String,
    pub persona_id: String,
    pub phone_number: String,
    pub status: CallStatus,
    pub status_reason: Option<String>,
    pub scheduled_time: Option<String>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub duration_seconds: Option<i64>,
    pub twilio_call_sid: Option<String>,
    pub answered_by: Option<String>,
    #[serde(skip_serializing)]
    pub reserved_credits: i64,
    pub cost_cents: Option<i64>,
    pub created_at: String,
    /// Who asked for the call: the user, the persona, or a schedule.
    pub requested_by: RequestedBy,
    /// The schedule this call is an attempt of, and which (0: the occurrence itself).
    pub schedule_id: Option<String>,
    pub attempt: i64,
}

impl CallRow {
    /// A call not placed yet (queued or scheduled), as a route or a persona requests it.
    pub fn pending(
        id: String,
        user_id: &str,
        persona_id: &str,
        phone: &str,
        status: CallStatus,
        scheduled_time: Option<String>,
        requested_by: RequestedBy,
    ) -> Self {
        Self {
            id,
            user_id: user_id.to_owned(),
            persona_id: persona_id.to_owned(),
            phone_number: phone.to_owned(),
            status,
            status_reason: None,
            scheduled_time,
            started_at: None,
            ended_at: None,
            duration_seconds: None,
            twilio_call_sid: None,
            answered_by: None,
            reserved_credits: 0,
            cost_cents: None,
            created_at: String::new(),
            requested_by,
            schedule_id: None,
            attempt: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TranscriptRow {
    pub seq: i64,
    pub role: TranscriptRole,
    pub text: String,
    pub at: String,
    pub interrupted: i64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CostRow {
    pub provider: String,
    pub quantity: f64,
    pub unit: String,
    pub cost_micros: i64,
}

/// The final record of a call, written once when it settles.
pub struct Settlement<'a> {
    pub call_id: &'a str,
    pub status: CallStatus,
    pub reason: Option<&'a str>,
    pub ended_at: &'a str,
    pub duration_seconds: i64,
    pub charge: i64,
    pub release: i64,
    pub user_id: &'a str,
    pub release_ledger_id: &'a str,
    pub settle_ledger_id: &'a str,
    pub costs: &'a [CostRow],
}

pub(super) const CALL_COLUMNS: &str = "id, user_id, persona_id, phone_number, status, status_reason, scheduled_time, started_at, ended_at, duration_seconds, twilio_call_sid, answered_by, reserved_credits, cost_cents, created_at, requested_by, schedule_id, attempt";

/// A call with its owner's email and current reservation, for admins.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AdminCallRow {
    pub id: String,
    pub user_id: String,
    pub user_email: Option<String>,
    pub persona_id: String,
    pub phone_number: String,
    pub status: CallStatus,
    pub status_reason: Option<String>,
    pub scheduled_time: Option<String>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub duration_seconds: Option<i64>,
    pub twilio_call_sid: Option<String>,
    pub answered_by: Option<String>,
    pub reserved_credits: i64,
    pub cost_cents: Option<i64>,
    pub created_at: String,
    pub requested_by: RequestedBy,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LatencyRow {
    pub turn: i64,
    pub end_of_turn_to_first_audio_ms: Option<i64>,
    pub llm_first_token_ms: Option<i64>,
}

pub(super) const ADMIN_CALL_COLUMNS: &str = "c.id, c.user_id, u.email AS user_email, c.persona_id, c.phone_number, c.status, \
     c.status_reason, c.scheduled_time, c.started_at, c.ended_at, c.duration_seconds, c.twilio_call_sid, \
     c.answered_by, c.reserved_credits, c.cost_cents, c.created_at, c.requested_by";

/// What `admin_calls` lists: any of a user, a status and a range of UTC days (the day a
/// call belongs to in analytics).
#[derive(Debug, Default)]
pub struct CallsFilter<'a> {
    pub user_id: Option<&'a str>,
    pub status: Option<&'a str>,
    pub from_day: Option<&'a str>,
    pub to_day: Option<&'a str>,
}

impl Store {
    // ---- calls ----

    /// Inserts a call that dials now, reserving its first minute in the same transaction.
    /// `LiveCall` when the user already has a live call, `Check` when the balance is short.
    /// `guard` (the daily call counter, `limits::daily_call_guard`) runs first in the same
    /// transaction: `DailyLimit` when the user's cap is reached.
    pub async fn insert_call_with_reservation(
        &self,
        call: &CallRow,
        reserve: &LedgerEntry<'_>,
        guard: Bound<'_>,
        now: &str,
    ) -> ApiResult<Result<(), WriteConflict>> {
        let insert = self.insert_call_stmt(call, now)?;
        let [ledger, balance] = self.ledger_stmts(reserve, now)?;
        self.batch(vec![guard, insert, ledger, balance]).await
    }

    pub(super) fn insert_call_stmt(&self, call: &CallRow, now: &str) -> ApiResult<Bound<'_>> {
        self.stmt(
            "INSERT INTO calls (id, user_id, persona_id, phone_number, status, scheduled_time, reserved_credits, requested_by, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?9, ?8, ?8)",
            &[
                s(&call.id),
                s(&call.user_id),
                s(&call.persona_id),
                s(&call.phone_number),
                s(call.status.as_str()),
                opt_ts(call.scheduled_time.as_deref()),
                int(call.reserved_credits),
                ts(now),
                s(call.requested_by.as_str()),
            ],
        )
    }

    /// Inserts a scheduled call unless the user already has `max_pending` of them, and
    /// counts it toward the daily limit of the day it will dial (`day`, UTC; `cap` the
    /// tier's), in one transaction. `Ok(false)`: the pending cap was reached;
    /// `Err(WriteConflict::DailyLimit)`: that day's cap was.
    ///
    /// The first statement touches the user's row: on Postgres it takes the row lock, so
    /// concurrent schedules of one user run one after another and each `COUNT(*)` (a fresh
    /// snapshot per statement under READ COMMITTED) sees the others' rows. D1 runs one
    /// batch at a time anyway.
    pub async fn insert_scheduled_call(
        &self,
        call: &CallRow,
        max_pending: i64,
        day: &str,
        cap: i64,
        now: &str,
    ) -> ApiResult<Result<bool, WriteConflict>> {
        let lock = self.lock_user_stmt(&call.user_id)?;
        let insert = self.stmt(
            "INSERT INTO calls (id, user_id, persona_id, phone_number, status, scheduled_time, reserved_credits, requested_by, schedule_id, attempt, created_at, updated_at) \
             SELECT ?1, ?2, ?3, ?4, 'scheduled', ?5, 0, ?8, ?9, ?10, ?6, ?6 \
             WHERE (SELECT COUNT(*) FROM calls WHERE user_id = ?2 AND status = 'scheduled') < ?7",
            &[
                s(&call.id),
                s(&call.user_id),
                s(&call.persona_id),
                s(&call.phone_number),
                opt_ts(call.scheduled_time.as_deref()),
                ts(now),
                int(max_pending),
                s(call.requested_by.as_str()),
                opt(call.schedule_id.as_deref()),
                int(call.attempt),
            ],
        )?;
        let count = self.stmt(
            "INSERT INTO call_day_counts (user_id, day, count, cap) \
             SELECT ?1, ?2, 1, ?3 WHERE EXISTS (SELECT 1 FROM calls WHERE id = ?4) \
             ON CONFLICT (user_id, day) DO UPDATE SET count = call_day_counts.count + 1, cap = excluded.cap",
            &[s(&call.user_id), crate::store::day(day), int(cap), s(&call.id)],
        )?;
        if let Err(conflict) = self.batch(vec![lock, insert, count]).await? {
            return Ok(Err(conflict));
        }
        Ok(Ok(self.call(&call.id).await?.is_some()))
    }

    /// Moves a scheduled call to `queued` and reserves its first minute, atomically.
    pub async fn start_scheduled_call(
        &self,
        call_id: &str,
        reserve: &LedgerEntry<'_>,
        now: &str,
    ) -> ApiResult<Result<(), WriteConflict>> {
        let update = self.stmt(
            "UPDATE calls SET status = 'queued', reserved_credits = reserved_credits + ?2, updated_at = ?3 WHERE id = ?1",
            &[s(call_id), int(-reserve.amount), ts(now)],
        )?;
        let [ledger, balance] = self.ledger_stmts(reserve, now)?;
        self.batch(vec![update, ledger, balance]).await
    }

    /// Whether a call other than `except` ever reached `phone` (was answered): its
    /// listener has heard the AI disclosure already.
    pub async fn number_reached_before(&self, phone: &str, except: &str) -> ApiResult<bool> {
        let row: Option<Count> = self
            .first(
                "SELECT COUNT(*) AS n FROM calls WHERE phone_number = ?1 AND id <> ?2 AND started_at IS NOT NULL",
                &[s(phone), s(except)],
            )
            .await?;
        Ok(row.is_some_and(|c| c.n > 0))
    }

    pub async fn call(&self, id: &str) -> ApiResult<Option<CallRow>> {
        self.first(
            &format!("SELECT {CALL_COLUMNS} FROM calls WHERE id = ?1"),
            &[s(id)],
        )
        .await
    }

    pub async fn calls_for_user(
        &self,
        user_id: &str,
        limit: i64,
        offset: i64,
    ) -> ApiResult<(Vec<CallRow>, i64)> {
        let rows = self
            .all(
                &format!(
                    "SELECT {CALL_COLUMNS} FROM calls WHERE user_id = ?1 \
                     ORDER BY created_at DESC, id DESC LIMIT ?2 OFFSET ?3"
                ),
                &[s(user_id), int(limit), int(offset)],
            )
            .await?;
        #[derive(Deserialize)]
        struct Count {
            n: i64,
        }
        let total: Option<Count> = self
            .first(
                "SELECT COUNT(*) AS n FROM calls WHERE user_id = ?1",
                &[s(user_id)],
            )
            .await?;
        Ok((rows, total.map_or(0, |c| c.n)))
    }

    /// Records a non-final status change (ringing, in progress) and what came with it.
    pub async fn update_call_progress(
        &self,
        id: &str,
        status: &str,
        twilio_sid: Option<&str>,
        started_at: Option<&str>,
        answered_by: Option<&str>,
        now: &str,
    ) -> ApiResult<()> {
        self.stmt(
            "UPDATE calls SET status = ?2, twilio_call_sid = COALESCE(?3, twilio_call_sid), \
             started_at = COALESCE(started_at, ?4), answered_by = COALESCE(?5, answered_by), updated_at = ?6 WHERE id = ?1",
            &[s(id), s(status), opt(twilio_sid), opt_ts(started_at), opt(answered_by), ts(now)],
        )?
        .run()
        .await
        .map_err(|e| ApiError::internal("update call", e))?;
        Ok(())
    }

    /// Ends a call that never reached Twilio (failed to dial, canceled, unpayable schedule)
    /// and releases whatever it had reserved — one transaction, idempotent by key.
    pub async fn end_call_unconnected(
        &self,
        id: &str,
        status: &str,
        reason: &str,
        release: Option<&LedgerEntry<'_>>,
        now: &str,
    ) -> ApiResult<Result<(), WriteConflict>> {
        let mut stmts = vec![self.stmt(
            "UPDATE calls SET status = ?2, status_reason = ?3, reserved_credits = 0, cost_cents = 0, \
             ended_at = COALESCE(ended_at, ?4), updated_at = ?4 WHERE id = ?1",
            &[s(id), s(status), s(reason), ts(now)],
        )?];
        if let Some(r) = release.filter(|r| r.amount != 0) {
            stmts.extend(self.ledger_stmts(r, now)?);
        }
        self.batch(stmts).await
    }

    /// Settles a finished call once: release the reservation, charge the price, write the
    /// final record and cost lines — all in one transaction whose ledger keys make any
    /// retry a `Duplicate` with nothing applied twice.
    pub async fn settle_call(
        &self,
        st: &Settlement<'_>,
        now: &str,
    ) -> ApiResult<Result<(), WriteConflict>> {
        let release_key = format!("release:{}", st.call_id);
        let settle_key = format!("settle:{}", st.call_id);
        let mut stmts = Vec::new();
        stmts.extend(self.ledger_stmts(
            &LedgerEntry {
                id: st.release_ledger_id,
                user_id: st.user_id,
                kind: LedgerKind::Release,
                amount: st.release,
                key: &release_key,
                call_id: Some(st.call_id),
                reason: "call ended",
            },
            now,
        )?);
        stmts.extend(self.ledger_stmts(
            &LedgerEntry {
                id: st.settle_ledger_id,
                user_id: st.user_id,
                kind: LedgerKind::Settle,
                amount: -st.charge,
                key: &settle_key,
                call_id: Some(st.call_id),
                reason: "call charge",
            },
            now,
        )?);
        stmts.push(self.stmt(
            "UPDATE calls SET status = ?2, status_reason = COALESCE(?3, status_reason), ended_at = ?4, \
             duration_seconds = ?5, cost_cents = ?6, reserved_credits = 0, updated_at = ?4 WHERE id = ?1",
            &[
                s(st.call_id),
                s(st.status.as_str()),
                opt(st.reason),
                ts(st.ended_at),
                int(st.duration_seconds),
                int(st.charge),
            ],
        )?);
        for c in st.costs {
            stmts.push(self.stmt(
                "INSERT INTO call_costs (call_id, provider, quantity, unit, cost_micros) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (call_id, provider) DO UPDATE SET quantity = excluded.quantity, unit = excluded.unit, cost_micros = excluded.cost_micros",
                &[s(st.call_id), s(&c.provider), real(c.quantity), s(&c.unit), int(c.cost_micros)],
            )?);
        }
        self.batch(stmts).await
    }

    pub async fn user_credits(&self, user_id: &str) -> ApiResult<i64> {
        Ok(self.user_by_id(user_id).await?.map_or(0, |u| u.credits))
    }

    pub async fn transcript(&self, call_id: &str) -> ApiResult<Vec<TranscriptRow>> {
        self.all(
            "SELECT seq, role, text, at, interrupted FROM call_transcripts WHERE call_id = ?1 ORDER BY seq",
            &[s(call_id)],
        )
        .await
    }

    pub async fn costs(&self, call_id: &str) -> ApiResult<Vec<CostRow>> {
        self.all(
            "SELECT provider, quantity, unit, cost_micros FROM call_costs WHERE call_id = ?1 ORDER BY provider",
            &[s(call_id)],
        )
        .await
    }

    // ---- conversation record ----

    /// Writes the transcript; re-writing a line (e.g. once what was heard is confirmed)
    /// replaces it, so this is safe to call at every end-of-call signal. Nothing is
    /// written for a call whose account was erased meanwhile.
    pub async fn save_transcript(&self, call_id: &str, rows: &[TranscriptRow]) -> ApiResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut stmts = Vec::with_capacity(rows.len());
        for r in rows {
            stmts.push(self.stmt(
                "INSERT INTO call_transcripts (call_id, seq, role, text, at, interrupted) SELECT ?1, ?2, ?3, ?4, ?5, ?6 \
                 WHERE NOT EXISTS (SELECT 1 FROM calls c JOIN users u ON u.id = c.user_id \
                   WHERE c.id = ?1 AND u.erased_at IS NOT NULL) \
                 ON CONFLICT (call_id, seq) DO UPDATE SET text = excluded.text, interrupted = excluded.interrupted",
                &[s(call_id), int(r.seq), s(r.role.as_str()), s(&r.text), ts(&r.at), flag(r.interrupted != 0)],
            )?);
        }
        match self.batch(stmts).await? {
            Ok(()) => Ok(()),
            Err(e) => Err(ApiError::internal("save transcript", format!("{e:?}"))),
        }
    }

    /// Upserts provider cost lines (one per provider per call).
    pub async fn save_costs(&self, call_id: &str, rows: &[CostRow]) -> ApiResult<()> {
        let mut stmts = Vec::with_capacity(rows.len());
        for c in rows {
            stmts.push(self.stmt(
                "INSERT INTO call_costs (call_id, provider, quantity, unit, cost_micros) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (call_id, provider) DO UPDATE SET quantity = excluded.quantity, unit = excluded.unit, cost_micros = excluded.cost_micros",
                &[s(call_id), s(&c.provider), real(c.quantity), s(&c.unit), int(c.cost_micros)],
            )?);
        }
        if stmts.is_empty() {
            return Ok(());
        }
        match self.batch(stmts).await? {
            Ok(()) => Ok(()),
            Err(e) => Err(ApiError::internal("save costs", format!("{e:?}"))),
        }
    }

    /// Upserts per-turn latencies: (turn, end of turn → first audio, LLM first token).
    pub async fn save_latencies(
        &self,
        call_id: &str,
        rows: &[(u32, Option<u32>, Option<u32>)],
        now: &str,
    ) -> ApiResult<()> {
        let mut stmts = Vec::with_capacity(rows.len());
        for (turn, audio, llm) in rows {
            let opt_int = |v: &Option<u32>| opt_int(v.map(i64::from));
            stmts.push(self.stmt(
                "INSERT INTO call_turn_latencies (call_id, turn, end_of_turn_to_first_audio_ms, llm_first_token_ms, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (call_id, turn) DO UPDATE SET \
                 end_of_turn_to_first_audio_ms = COALESCE(excluded.end_of_turn_to_first_audio_ms, call_turn_latencies.end_of_turn_to_first_audio_ms), \
                 llm_first_token_ms = COALESCE(excluded.llm_first_token_ms, call_turn_latencies.llm_first_token_ms)",
                &[s(call_id), int(i64::from(*turn)), opt_int(audio), opt_int(llm), ts(now)],
            )?);
        }
        if stmts.is_empty() {
            return Ok(());
        }
        match self.batch(stmts).await? {
            Ok(()) => Ok(()),
            Err(e) => Err(ApiError::internal("save latencies", format!("{e:?}"))),
        }
    }

    // ---- admin: calls and personas ----

    pub async fn admin_calls(
        &self,
        f: &CallsFilter<'_>,
        limit: i64,
        offset: i64,
    ) -> ApiResult<(Vec<AdminCallRow>, i64)> {
        let day = super::analytics::CALL_DAY;
        let filter = format!(
            "(?1 IS NULL OR c.user_id = ?1) AND (?2 IS NULL OR c.status = ?2) \
             AND (?3 IS NULL OR {day} >= ?3) AND (?4 IS NULL OR {day} <= ?4)"
        );
        let args = [
            opt(f.user_id),
            opt(f.status),
            Arg::Date(f.from_day.map(str::to_owned)),
            Arg::Date(f.to_day.map(str::to_owned)),
        ];
        let mut page = args.to_vec();
        page.extend([int(limit), int(offset)]);
        let rows = self
            .all(
                &format!(
                    "SELECT {ADMIN_CALL_COLUMNS} FROM calls c LEFT JOIN users u ON u.id = c.user_id \
                     WHERE {filter} ORDER BY c.created_at DESC, c.id DESC LIMIT ?5 OFFSET ?6"
                ),
                &page,
            )
            .await?;
        let total: Option<Count> = self
            .first(
                &format!("SELECT COUNT(*) AS n FROM calls c WHERE {filter}"),
                &args,
            )
            .await?;
        Ok((rows, total.map_or(0, |c| c.n)))
    }

    pub async fn admin_call(&self, id: &str) -> ApiResult<Option<AdminCallRow>> {
        self.first(
            &format!(
                "SELECT {ADMIN_CALL_COLUMNS} FROM calls c LEFT JOIN users u ON u.id = c.user_id WHERE c.id = ?1"
            ),
            &[s(id)],
        )
        .await
    }

    pub async fn ledger_of_call(&self, call_id: &str) -> ApiResult<Vec<LedgerRow>> {
        self.all(
            "SELECT id, kind, amount, idempotency_key, call_id, reason, created_at FROM credit_ledger \
             WHERE call_id = ?1 ORDER BY created_at, id",
            &[s(call_id)],
        )
        .await
    }

    pub async fn latencies(&self, call_id: &str) -> ApiResult<Vec<LatencyRow>> {
        self.all(
            "SELECT turn, end_of_turn_to_first_audio_ms, llm_first_token_ms FROM call_turn_latencies \
             WHERE call_id = ?1 ORDER BY turn",
            &[s(call_id)],
        )
        .await
    }

    /// Every catalog persona, retired ones included (custom personas too when asked).
    pub async fn all_personas(&self, include_custom: bool) -> ApiResult<Vec<PersonaRow>> {
        self.all(
            &format!(
                "SELECT {PERSONA_COLUMNS} FROM personas \
                 WHERE ?1 = 1 OR owner_id IS NULL ORDER BY owner_id IS NOT NULL, is_active DESC, created_at, name"
            ),
            &[int(i64::from(include_custom))],
        )
        .await
    }
}
