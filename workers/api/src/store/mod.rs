//! Data access: the only module that writes SQL. Routes and the Durable Object call these
//! methods and never see which database answers.
//!
//! Multi-statement writes go through D1 `batch`, which runs as one transaction: a failed
//! constraint in any statement (unique idempotency key, `credits >= 0`) rolls the whole
//! batch back. That is how credit operations stay exact under concurrency without
//! read-then-write.

pub mod admin;
pub mod db;

use serde::{Deserialize, Serialize};
use worker::{D1Database, Env};

use crate::store::db::Db;
pub use crate::store::db::WriteConflict;
pub(crate) use crate::store::db::{day, flag, int, opt, opt_int, opt_ts, real, s, ts, Arg, Bound};

use crate::error::{ApiError, ApiResult};

/// A user as stored.
#[derive(Debug, Clone, Deserialize)]
pub struct UserRow {
    pub id: String,
    pub email: String,
    pub name: String,
    pub phone_number: Option<String>,
    pub password_hash: String,
    pub role: String,
    pub tier: String,
    pub credits: i64,
    pub is_banned: i64,
    pub created_at: String,
}

/// The public view of a user (never the password hash).
#[derive(Debug, Clone, Serialize)]
pub struct UserView {
    pub id: String,
    pub email: String,
    pub name: String,
    pub phone_number: Option<String>,
    pub role: String,
    pub tier: String,
    pub credits: i64,
    pub is_banned: bool,
    pub created_at: String,
}

impl UserRow {
    pub fn view(&self, role: &str) -> UserView {
        UserView {
            id: self.id.clone(),
            email: self.email.clone(),
            name: self.name.clone(),
            phone_number: self.phone_number.clone(),
            role: role.to_string(),
            tier: self.tier.clone(),
            credits: self.credits,
            is_banned: self.is_banned != 0,
            created_at: self.created_at.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct PersonaRow {
    pub id: String,
    pub owner_id: Option<String>,
    pub name: String,
    pub description: String,
    pub system_prompt: String,
    pub greeting: String,
    pub voice_id: String,
    pub stability: f64,
    pub similarity_boost: f64,
    pub style: f64,
    pub speed: f64,
    pub is_active: i64,
    pub created_at: String,
    pub updated_at: String,
    pub avatar_url: Option<String>,
    pub category: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VoiceSettingsView {
    pub stability: f64,
    pub similarity_boost: f64,
    pub style: f64,
    pub speed: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PersonaView {
    pub id: String,
    pub name: String,
    pub description: String,
    pub system_prompt: String,
    pub greeting: String,
    pub voice_id: String,
    pub voice_settings: VoiceSettingsView,
    /// The first version's names for the same three fields, for its clients.
    pub core_system_prompt: String,
    pub default_voice_id: String,
    pub default_voice_settings: VoiceSettingsView,
    pub avatar_url: Option<String>,
    pub category: Option<String>,
    pub is_custom: bool,
    pub owner_id: Option<String>,
    pub is_active: bool,
    pub created_at: String,
    pub updated_at: String,
}

impl PersonaRow {
    /// The persona's validated fields (as `cmb_core::persona` merges updates into them).
    pub fn fields(&self) -> cmb_core::persona::PersonaFields {
        cmb_core::persona::PersonaFields {
            name: self.name.clone(),
            description: self.description.clone(),
            system_prompt: self.system_prompt.clone(),
            greeting: self.greeting.clone(),
            voice_id: self.voice_id.clone(),
            voice_settings: cmb_core::channel::VoiceSettings {
                stability: self.stability,
                similarity_boost: self.similarity_boost,
                style: self.style,
                speed: self.speed,
                use_speaker_boost: true,
            },
            avatar_url: self.avatar_url.clone(),
            category: self.category.clone(),
        }
    }

    pub fn view(&self) -> PersonaView {
        let voice_settings = VoiceSettingsView {
            stability: self.stability,
            similarity_boost: self.similarity_boost,
            style: self.style,
            speed: self.speed,
        };
        PersonaView {
            id: self.id.clone(),
            name: self.name.clone(),
            description: self.description.clone(),
            system_prompt: self.system_prompt.clone(),
            greeting: self.greeting.clone(),
            voice_id: self.voice_id.clone(),
            voice_settings: voice_settings.clone(),
            core_system_prompt: self.system_prompt.clone(),
            default_voice_id: self.voice_id.clone(),
            default_voice_settings: voice_settings,
            avatar_url: self.avatar_url.clone(),
            category: self.category.clone(),
            is_custom: self.owner_id.is_some(),
            owner_id: self.owner_id.clone(),
            is_active: self.is_active != 0,
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
        }
    }
}

/// The fields of a persona to write (already validated by `cmb_core::persona`).
#[derive(Debug, Clone)]
pub struct PersonaWrite {
    pub name: String,
    pub description: String,
    pub system_prompt: String,
    pub greeting: String,
    pub voice_id: String,
    pub stability: f64,
    pub similarity_boost: f64,
    pub style: f64,
    pub speed: f64,
    pub avatar_url: Option<String>,
    pub category: Option<String>,
}

/// A call as stored; also its API view (API.md "A `call` object" plus `status_reason`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CallRow {
    pub id: String,
    pub user_id: String,
    pub persona_id: String,
    pub phone_number: String,
    pub status: String,
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
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TranscriptRow {
    pub seq: i64,
    pub role: String,
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

/// A credit movement for one call, with its idempotency key.
pub struct LedgerEntry<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    pub kind: &'a str,
    pub amount: i64,
    pub key: &'a str,
    pub call_id: Option<&'a str>,
    pub reason: &'a str,
}

/// The final record of a call, written once when it settles.
pub struct Settlement<'a> {
    pub call_id: &'a str,
    pub status: &'a str,
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

pub struct Store {
    db: Db,
}

/// A persona's writable fields as arguments, in column order (name … speed).
fn persona_args(p: &PersonaWrite) -> [Arg; 11] {
    [
        s(&p.name),
        s(&p.description),
        s(&p.system_prompt),
        s(&p.greeting),
        s(&p.voice_id),
        real(p.stability),
        real(p.similarity_boost),
        real(p.style),
        real(p.speed),
        opt(p.avatar_url.as_deref()),
        opt(p.category.as_deref()),
    ]
}

const USER_COLUMNS: &str =
    "id, email, name, phone_number, password_hash, role, tier, credits, is_banned, created_at";
const CALL_COLUMNS: &str = "id, user_id, persona_id, phone_number, status, status_reason, scheduled_time, started_at, ended_at, duration_seconds, twilio_call_sid, answered_by, reserved_credits, cost_cents, created_at";
pub(crate) const PERSONA_COLUMNS: &str = "id, owner_id, name, description, system_prompt, greeting, voice_id, stability, similarity_boost, style, speed, is_active, created_at, updated_at, avatar_url, category";

impl Store {
    pub fn new(db: D1Database) -> Self {
        Self { db: Db::d1(db) }
    }

    /// The configured database: D1, or Postgres through Hyperdrive (`DB_BACKEND`).
    pub async fn open(env: &Env, backend: cmb_core::config::DbBackend) -> ApiResult<Self> {
        Ok(Self {
            db: Db::open(env, backend).await?,
        })
    }

    pub fn dialect(&self) -> crate::store::db::Dialect {
        self.db.dialect()
    }

    pub(crate) fn stmt(&self, sql: &str, args: &[Arg]) -> ApiResult<Bound<'_>> {
        Ok(self.db.bind(sql, args))
    }

    pub(crate) async fn first<T: for<'de> Deserialize<'de>>(
        &self,
        sql: &str,
        args: &[Arg],
    ) -> ApiResult<Option<T>> {
        self.db.first(sql, args).await
    }

    pub(crate) async fn all<T: for<'de> Deserialize<'de>>(
        &self,
        sql: &str,
        args: &[Arg],
    ) -> ApiResult<Vec<T>> {
        self.db.all(sql, args).await
    }

    /// Runs statements as one transaction; a constraint failure is returned as a
    /// [`WriteConflict`] with nothing applied.
    pub(crate) async fn batch(
        &self,
        stmts: Vec<Bound<'_>>,
    ) -> ApiResult<Result<(), WriteConflict>> {
        self.db.batch_bound(stmts).await
    }

    /// Liveness check for `/health`.
    pub async fn ping(&self) -> Result<(), String> {
        self.db
            .first::<serde_json::Value>("SELECT 1 AS ok", &[])
            .await
            .map(|_| ())
            .map_err(|e| e.message)
    }

    // ---- users ----

    /// Creates a user and grants the starting credits in one transaction.
    /// Returns `Err(WriteConflict::Duplicate)` when the email is taken.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_user(
        &self,
        id: &str,
        email: &str,
        name: &str,
        phone_number: Option<&str>,
        password_hash: &str,
        role: &str,
        free_credits: i64,
        ledger_id: &str,
        now: &str,
    ) -> ApiResult<Result<(), WriteConflict>> {
        let insert = self.stmt(
            "INSERT INTO users (id, email, name, phone_number, password_hash, role, credits, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
            &[s(id), s(email), s(name), opt(phone_number), s(password_hash), s(role), int(free_credits), ts(now)],
        )?;
        let grant = self.stmt(
            "INSERT INTO credit_ledger (id, user_id, kind, amount, idempotency_key, reason, created_at) \
             VALUES (?1, ?2, 'grant', ?3, ?4, 'signup', ?5)",
            &[s(ledger_id), s(id), int(free_credits), s(&format!("signup:{id}")), ts(now)],
        )?;
        self.batch(vec![insert, grant]).await
    }

    pub async fn user_by_email(&self, email: &str) -> ApiResult<Option<UserRow>> {
        self.first(
            &format!("SELECT {USER_COLUMNS} FROM users WHERE email = ?1"),
            &[s(email)],
        )
        .await
    }

    pub async fn user_by_id(&self, id: &str) -> ApiResult<Option<UserRow>> {
        self.first(
            &format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?1"),
            &[s(id)],
        )
        .await
    }

    // ---- personas ----

    /// Active catalog personas plus the viewer's own active custom ones.
    pub async fn list_personas(&self, viewer: Option<&str>) -> ApiResult<Vec<PersonaRow>> {
        self.all(
            &format!(
                "SELECT {PERSONA_COLUMNS} FROM personas \
                 WHERE is_active = TRUE AND (owner_id IS NULL OR owner_id = ?1) \
                 ORDER BY owner_id IS NOT NULL, created_at, name"
            ),
            &[opt(viewer)],
        )
        .await
    }

    pub async fn persona(&self, id: &str) -> ApiResult<Option<PersonaRow>> {
        self.first(
            &format!("SELECT {PERSONA_COLUMNS} FROM personas WHERE id = ?1"),
            &[s(id)],
        )
        .await
    }

    pub async fn insert_persona(
        &self,
        id: &str,
        owner: Option<&str>,
        p: &PersonaWrite,
        now: &str,
    ) -> ApiResult<()> {
        let mut args = vec![s(id), opt(owner)];
        args.extend(persona_args(p));
        args.push(ts(now));
        let stmt = self.stmt(
            "INSERT INTO personas (id, owner_id, name, description, system_prompt, greeting, voice_id, \
             stability, similarity_boost, style, speed, avatar_url, category, is_active, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, TRUE, ?14, ?14)",
            &args,
        )?;
        stmt.run()
            .await
            .map_err(|e| ApiError::internal("insert persona", e))?;
        Ok(())
    }

    pub async fn update_persona(&self, id: &str, p: &PersonaWrite, now: &str) -> ApiResult<()> {
        let mut args = vec![s(id)];
        args.extend(persona_args(p));
        args.push(ts(now));
        let stmt = self.stmt(
            "UPDATE personas SET name = ?2, description = ?3, system_prompt = ?4, greeting = ?5, voice_id = ?6, \
             stability = ?7, similarity_boost = ?8, style = ?9, speed = ?10, avatar_url = ?11, category = ?12, \
             updated_at = ?13 WHERE id = ?1",
            &args,
        )?;
        stmt.run()
            .await
            .map_err(|e| ApiError::internal("update persona", e))?;
        Ok(())
    }

    pub async fn deactivate_persona(&self, id: &str, now: &str) -> ApiResult<()> {
        let stmt = self.stmt(
            "UPDATE personas SET is_active = FALSE, updated_at = ?2 WHERE id = ?1",
            &[s(id), ts(now)],
        )?;
        stmt.run()
            .await
            .map_err(|e| ApiError::internal("delete persona", e))?;
        Ok(())
    }

    // ---- favourites ----

    /// Idempotent: marking an existing favourite again changes nothing.
    pub async fn add_favorite(&self, user: &str, persona: &str, now: &str) -> ApiResult<()> {
        let stmt = self.stmt(
            "INSERT INTO favorites (user_id, persona_id, created_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (user_id, persona_id) DO NOTHING",
            &[s(user), s(persona), ts(now)],
        )?;
        stmt.run()
            .await
            .map_err(|e| ApiError::internal("add favorite", e))?;
        Ok(())
    }

    pub async fn remove_favorite(&self, user: &str, persona: &str) -> ApiResult<()> {
        let stmt = self.stmt(
            "DELETE FROM favorites WHERE user_id = ?1 AND persona_id = ?2",
            &[s(user), s(persona)],
        )?;
        stmt.run()
            .await
            .map_err(|e| ApiError::internal("remove favorite", e))?;
        Ok(())
    }

    /// The user's favourites that they can still see (active, catalog or their own).
    pub async fn favorites(&self, user: &str) -> ApiResult<Vec<PersonaRow>> {
        self.all(
            "SELECT p.id, p.owner_id, p.name, p.description, p.system_prompt, p.greeting, p.voice_id, \
             p.stability, p.similarity_boost, p.style, p.speed, p.is_active, p.created_at, p.updated_at, \
             p.avatar_url, p.category \
             FROM favorites f JOIN personas p ON p.id = f.persona_id \
             WHERE f.user_id = ?1 AND p.is_active = TRUE AND (p.owner_id IS NULL OR p.owner_id = ?1) \
             ORDER BY f.created_at DESC",
            &[s(user)],
        )
        .await
    }

    // ---- credits ----

    pub(crate) fn ledger_stmts(&self, e: &LedgerEntry<'_>, now: &str) -> ApiResult<[Bound<'_>; 2]> {
        let insert = self.stmt(
            "INSERT INTO credit_ledger (id, user_id, kind, amount, idempotency_key, call_id, reason, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            &[s(e.id), s(e.user_id), s(e.kind), int(e.amount), s(e.key), opt(e.call_id), s(e.reason), ts(now)],
        )?;
        let update = self.stmt(
            "UPDATE users SET credits = credits + ?2, updated_at = ?3 WHERE id = ?1",
            &[s(e.user_id), int(e.amount), ts(now)],
        )?;
        Ok([insert, update])
    }

    /// Applies one ledger entry and its balance change atomically. A repeated key is
    /// `Duplicate` (nothing applied twice); an overdraw is `Check` (nothing applied).
    pub async fn apply_ledger(
        &self,
        e: &LedgerEntry<'_>,
        now: &str,
    ) -> ApiResult<Result<(), WriteConflict>> {
        let stmts = self.ledger_stmts(e, now)?;
        self.batch(stmts.into()).await
    }

    /// The balance recomputed from the ledger, for reconciliation.
    pub async fn ledger_balance(&self, user_id: &str) -> ApiResult<i64> {
        #[derive(Deserialize)]
        struct Sum {
            total: Option<i64>,
        }
        let sum: Option<Sum> = self
            .first(
                "SELECT CAST(SUM(amount) AS BIGINT) AS total FROM credit_ledger WHERE user_id = ?1",
                &[s(user_id)],
            )
            .await?;
        Ok(sum.and_then(|s| s.total).unwrap_or(0))
    }

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

    fn insert_call_stmt(&self, call: &CallRow, now: &str) -> ApiResult<Bound<'_>> {
        self.stmt(
            "INSERT INTO calls (id, user_id, persona_id, phone_number, status, scheduled_time, reserved_credits, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
            &[
                s(&call.id),
                s(&call.user_id),
                s(&call.persona_id),
                s(&call.phone_number),
                s(&call.status),
                opt_ts(call.scheduled_time.as_deref()),
                int(call.reserved_credits),
                ts(now),
            ],
        )
    }

    /// Inserts a scheduled call unless the user already has `max_pending` of them; one
    /// statement, so concurrent requests cannot exceed the limit. Returns whether inserted.
    pub async fn insert_scheduled_call(
        &self,
        call: &CallRow,
        max_pending: i64,
        now: &str,
    ) -> ApiResult<bool> {
        let stmt = self.stmt(
            "INSERT INTO calls (id, user_id, persona_id, phone_number, status, scheduled_time, reserved_credits, created_at, updated_at) \
             SELECT ?1, ?2, ?3, ?4, 'scheduled', ?5, 0, ?6, ?6 \
             WHERE (SELECT COUNT(*) FROM calls WHERE user_id = ?2 AND status = 'scheduled') < ?7",
            &[
                s(&call.id),
                s(&call.user_id),
                s(&call.persona_id),
                s(&call.phone_number),
                opt_ts(call.scheduled_time.as_deref()),
                ts(now),
                int(max_pending),
            ],
        )?;
        let result = stmt
            .run()
            .await
            .map_err(|e| ApiError::internal("insert scheduled call", e))?;
        let changes = result
            .meta()
            .map_err(|e| ApiError::internal("d1 meta", e))?
            .and_then(|m| m.changes)
            .unwrap_or(0);
        Ok(changes == 1)
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
                kind: "release",
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
                kind: "settle",
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
                s(st.status),
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
    /// replaces it, so this is safe to call at every end-of-call signal.
    pub async fn save_transcript(&self, call_id: &str, rows: &[TranscriptRow]) -> ApiResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut stmts = Vec::with_capacity(rows.len());
        for r in rows {
            stmts.push(self.stmt(
                "INSERT INTO call_transcripts (call_id, seq, role, text, at, interrupted) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (call_id, seq) DO UPDATE SET text = excluded.text, interrupted = excluded.interrupted",
                &[s(call_id), int(r.seq), s(&r.role), s(&r.text), ts(&r.at), flag(r.interrupted != 0)],
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
}
