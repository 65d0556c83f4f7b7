//! SQL for payments, refunds, the admin API, analytics, limits and the audit log: a
//! second `impl Store` block next to the lead's `store.rs`.
//!
//! Same rules as `store.rs`: every multi-statement write is one D1 `batch` (one
//! transaction), money moves only through `credit_ledger` rows with unique idempotency
//! keys plus the balance update in the same batch, and the audit row is part of that
//! batch, so a change and its audit record exist together or not at all. Amounts that
//! depend on the current balance (refunds that may not overdraw) are computed by SQL
//! inside the batch, never read first and written later. Routes never write SQL.

use crate::store::Bound;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};
use crate::store::{
    flag, int, opt, s, ts, LedgerEntry, PersonaRow, Store, WriteConflict, PERSONA_COLUMNS,
};

/// Who did something, as recorded in the audit log.
#[derive(Debug, Clone)]
pub struct Actor {
    /// The acting user; `None` for system actors (Stripe).
    pub id: Option<String>,
    /// The admin's email, or the system's name.
    pub name: String,
}

impl Actor {
    pub fn stripe() -> Self {
        Self {
            id: None,
            name: "stripe".into(),
        }
    }
}

/// One audit record whose before/after states are known to the caller.
pub struct AuditEntry<'a> {
    pub id: &'a str,
    pub actor: &'a Actor,
    pub action: &'a str,
    pub target_type: &'a str,
    pub target_id: Option<&'a str>,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    pub reason: Option<&'a str>,
}

/// An audit record as stored (`before`/`after` are JSON text).
#[derive(Debug, Clone, Deserialize)]
pub struct AuditRow {
    pub id: String,
    pub actor_id: Option<String>,
    pub actor: String,
    pub action: String,
    pub target_type: String,
    pub target_id: Option<String>,
    pub before_json: Option<String>,
    pub after_json: Option<String>,
    pub reason: Option<String>,
    pub created_at: String,
}

/// Filters of `GET /admin/audit`.
#[derive(Debug, Default)]
pub struct AuditFilter<'a> {
    pub action: Option<&'a str>,
    pub target_id: Option<&'a str>,
    pub actor_id: Option<&'a str>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PurchaseRow {
    pub id: String,
    pub user_id: String,
    pub pack: String,
    pub credits: i64,
    pub amount_cents: i64,
    pub currency: String,
    pub status: String,
    pub payment_intent: Option<String>,
    pub refunded_cents: i64,
    pub created_at: String,
    pub paid_at: Option<String>,
}

/// A Checkout Session just created for a user.
pub struct NewPurchase<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    pub pack: &'a str,
    pub credits: i64,
    pub amount_cents: i64,
    pub currency: &'a str,
}

/// A paid session to grant, with the event that says so.
pub struct Fulfilment<'a> {
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub purchase: NewPurchase<'a>,
    pub payment_intent: Option<&'a str>,
    pub ledger_id: &'a str,
    pub audit_id: &'a str,
}

/// One refund step of a charge.
pub struct RefundStep<'a> {
    pub event_id: &'a str,
    pub event_type: &'a str,
    /// `<charge id>:<cumulative amount_refunded>`: the step's idempotency key.
    pub id: &'a str,
    pub charge_id: &'a str,
    pub purchase_id: Option<&'a str>,
    pub user_id: &'a str,
    /// Money refunded in this step.
    pub refunded_cents: i64,
    /// The charge's cumulative refunded amount after this step.
    pub cumulative_refunded_cents: i64,
    pub fully_refunded: bool,
    /// Credits the refunded money bought; taken back as far as the balance allows.
    pub credits_due: i64,
    pub ledger_id: &'a str,
    pub audit_id: &'a str,
}

/// A user as the admin list shows it (never the password hash), with recorded debt.
#[derive(Debug, Clone, Deserialize)]
pub struct AdminUserRow {
    pub id: String,
    pub email: String,
    pub name: String,
    pub phone_number: Option<String>,
    pub role: String,
    pub tier: String,
    pub credits: i64,
    pub is_banned: i64,
    pub debt: i64,
    pub created_at: String,
}

/// A call with its owner's email and current reservation, for admins.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AdminCallRow {
    pub id: String,
    pub user_id: String,
    pub user_email: Option<String>,
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
    pub reserved_credits: i64,
    pub cost_cents: Option<i64>,
    pub created_at: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LedgerRow {
    pub id: String,
    pub kind: String,
    pub amount: i64,
    pub idempotency_key: String,
    pub call_id: Option<String>,
    pub reason: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LatencyRow {
    pub turn: i64,
    pub end_of_turn_to_first_audio_ms: Option<i64>,
    pub llm_first_token_ms: Option<i64>,
}

/// Calls of one UTC day and status.
#[derive(Debug, Clone, Deserialize)]
pub struct CallDayRow {
    pub day: String,
    pub status: String,
    pub calls: i64,
    pub duration_seconds: i64,
    pub billed_minutes: i64,
    pub credits_charged: i64,
}

/// End-of-turn latency of one UTC day (or of the whole range, `day = "total"`).
#[derive(Debug, Clone, Deserialize)]
pub struct LatencyDayRow {
    pub day: String,
    pub turns: i64,
    pub avg_ms: Option<f64>,
    pub p95_ms: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SalesDayRow {
    pub day: String,
    pub purchases: i64,
    pub credits_sold: i64,
    pub sales_cents: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RefundDayRow {
    pub day: String,
    pub refunds: i64,
    pub refunded_cents: i64,
    pub credits_taken: i64,
    pub debt_credits: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CostDayRow {
    pub day: String,
    pub provider: String,
    pub quantity: f64,
    pub cost_micros: i64,
}

#[derive(Deserialize)]
struct Count {
    n: i64,
}

/// The UTC day a call belongs to in analytics: when it was answered, else when it was
/// due, else when it was requested. `date()` normalises any UTC offset, so a timestamp
/// with `+02:00` still lands on its UTC day.
const CALL_DAY: &str = "date(COALESCE(c.started_at, c.scheduled_time, c.created_at))";

const ADMIN_USER_COLUMNS: &str = "u.id, u.email, u.name, u.phone_number, u.role, u.tier, u.credits, u.is_banned, \
     COALESCE((SELECT CAST(SUM(r.credits_due - r.credits_taken) AS BIGINT) FROM payment_refunds r WHERE r.user_id = u.id), 0) AS debt, \
     u.created_at";

const ADMIN_CALL_COLUMNS: &str = "c.id, c.user_id, u.email AS user_email, c.persona_id, c.phone_number, c.status, \
     c.status_reason, c.scheduled_time, c.started_at, c.ended_at, c.duration_seconds, c.twilio_call_sid, \
     c.answered_by, c.reserved_credits, c.cost_cents, c.created_at";

const PURCHASE_COLUMNS: &str =
    "id, user_id, pack, credits, amount_cents, currency, status, payment_intent, \
     refunded_cents, created_at, paid_at";

/// Escapes `%`, `_` and `\` for a `LIKE … ESCAPE '\'` pattern.
pub fn like_pattern(q: &str) -> String {
    let mut out = String::with_capacity(q.len() + 2);
    out.push('%');
    for c in q.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

fn json_text(v: &Option<serde_json::Value>) -> crate::store::Arg {
    crate::store::Arg::Json(v.as_ref().map(|v| v.to_string()))
}

impl Store {
    // ---- audit ----

    /// The insert of an audit record whose states the caller knows.
    pub fn audit_stmt(&self, e: &AuditEntry<'_>, now: &str) -> ApiResult<Bound<'_>> {
        self.stmt(
            "INSERT INTO audit_log (id, actor_id, actor, action, target_type, target_id, before_json, after_json, reason, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            &[
                s(e.id),
                opt(e.actor.id.as_deref()),
                s(&e.actor.name),
                s(e.action),
                s(e.target_type),
                opt(e.target_id),
                json_text(&e.before),
                json_text(&e.after),
                opt(e.reason),
                ts(now),
            ],
        )
    }

    /// Audit of a balance change computed by SQL from the balance as it is inside the
    /// batch (place it before the balance update). `delta_sql` is an expression over
    /// `credits` and the bound parameter `?9`. Bound numbers arrive as JS doubles, so the
    /// delta is cast back to an integer before it lands in JSON (no column affinity
    /// does it there).
    #[allow(clippy::too_many_arguments)]
    fn balance_audit_stmt(
        &self,
        id: &str,
        actor: &Actor,
        action: &str,
        user_id: &str,
        delta_sql: &str,
        delta_param: i64,
        extra_after: &serde_json::Value,
        reason: Option<&str>,
        now: &str,
    ) -> ApiResult<Bound<'_>> {
        // JSON is built in SQL so the before/after balance is the one this transaction
        // sees; the two databases spell JSON functions differently.
        let (before, after) = match self.dialect() {
            crate::store::db::Dialect::Sqlite => (
                "json_object('credits', credits)".to_string(),
                format!("json_patch(json_object('credits', credits + CAST(({delta_sql}) AS INTEGER)), ?8)"),
            ),
            crate::store::db::Dialect::Postgres => (
                "jsonb_build_object('credits', credits)".to_string(),
                format!("jsonb_build_object('credits', credits + ({delta_sql})) || ?8"),
            ),
        };
        self.stmt(
            &format!(
                "INSERT INTO audit_log (id, actor_id, actor, action, target_type, target_id, before_json, after_json, reason, created_at) \
                 SELECT ?1, ?2, ?3, ?4, 'user', id, {before}, {after}, ?6, ?7 FROM users WHERE id = ?5"
            ),
            &[
                s(id),
                opt(actor.id.as_deref()),
                s(&actor.name),
                s(action),
                s(user_id),
                opt(reason),
                ts(now),
                crate::store::Arg::Json(Some(extra_after.to_string())),
                int(delta_param),
            ],
        )
    }

    /// Writes one audit record on its own (for actions whose change is not ours to batch).
    pub async fn insert_audit(&self, e: &AuditEntry<'_>, now: &str) -> ApiResult<()> {
        self.audit_stmt(e, now)?
            .run()
            .await
            .map_err(|e| ApiError::internal("insert audit", e))?;
        Ok(())
    }

    pub async fn audit_entries(
        &self,
        f: &AuditFilter<'_>,
        limit: i64,
        offset: i64,
    ) -> ApiResult<(Vec<AuditRow>, i64)> {
        let filter = "(?1 IS NULL OR action = ?1) AND (?2 IS NULL OR target_id = ?2) AND (?3 IS NULL OR actor_id = ?3)";
        let args = [opt(f.action), opt(f.target_id), opt(f.actor_id)];
        let rows = self
            .all(
                &format!(
                    "SELECT id, actor_id, actor, action, target_type, target_id, before_json, after_json, reason, created_at \
                     FROM audit_log WHERE {filter} ORDER BY created_at DESC, id DESC LIMIT ?4 OFFSET ?5"
                ),
                &[args[0].clone(), args[1].clone(), args[2].clone(), int(limit), int(offset)],
            )
            .await?;
        let total: Option<Count> = self
            .first(
                &format!("SELECT COUNT(*) AS n FROM audit_log WHERE {filter}"),
                &args,
            )
            .await?;
        Ok((rows, total.map_or(0, |c| c.n)))
    }

    // ---- purchases and Stripe events ----

    /// Records a Checkout Session we created. A replayed creation (same idempotency key,
    /// same session) changes nothing.
    pub async fn record_checkout(&self, p: &NewPurchase<'_>, now: &str) -> ApiResult<()> {
        self.stmt(
            "INSERT INTO purchases (id, user_id, pack, credits, amount_cents, currency, status, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'open', ?7, ?7) ON CONFLICT (id) DO NOTHING",
            &[
                s(p.id),
                s(p.user_id),
                s(p.pack),
                int(p.credits),
                int(p.amount_cents),
                s(p.currency),
                ts(now),
            ],
        )?
        .run()
        .await
        .map_err(|e| ApiError::internal("record checkout", e))?;
        Ok(())
    }

    pub async fn purchase(&self, id: &str) -> ApiResult<Option<PurchaseRow>> {
        self.first(
            &format!("SELECT {PURCHASE_COLUMNS} FROM purchases WHERE id = ?1"),
            &[s(id)],
        )
        .await
    }

    pub async fn purchase_by_payment_intent(&self, pi: &str) -> ApiResult<Option<PurchaseRow>> {
        self.first(
            &format!(
                "SELECT {PURCHASE_COLUMNS} FROM purchases WHERE payment_intent = ?1 ORDER BY created_at LIMIT 1"
            ),
            &[s(pi)],
        )
        .await
    }

    fn event_stmt(
        &self,
        id: &str,
        kind: &str,
        object_id: &str,
        outcome: &str,
        now: &str,
    ) -> ApiResult<Bound<'_>> {
        self.stmt(
            "INSERT INTO stripe_events (id, type, object_id, outcome, received_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            &[s(id), s(kind), s(object_id), s(outcome), ts(now)],
        )
    }

    /// Notes an event that was a no-op (a duplicate), unless it is already known.
    pub async fn note_stripe_event(
        &self,
        id: &str,
        kind: &str,
        object_id: &str,
        outcome: &str,
        now: &str,
    ) -> ApiResult<()> {
        self.stmt(
            "INSERT INTO stripe_events (id, type, object_id, outcome, received_at) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (id) DO NOTHING",
            &[s(id), s(kind), s(object_id), s(outcome), ts(now)],
        )?
        .run()
        .await
        .map_err(|e| ApiError::internal("note stripe event", e))?;
        Ok(())
    }

    /// Grants a paid session's credits once: the event row (unique per event), the
    /// purchase ledger entry (unique per session), the balance, the purchase record and
    /// the audit row, in one transaction. `Duplicate` means this event or this session
    /// was already processed, and nothing changed.
    pub async fn fulfil_purchase(
        &self,
        f: &Fulfilment<'_>,
        now: &str,
    ) -> ApiResult<Result<(), WriteConflict>> {
        let p = &f.purchase;
        let key = format!("stripe:session:{}", p.id);
        let reason = format!("Stripe checkout: {} pack", p.pack);
        let mut stmts = vec![self.event_stmt(f.event_id, f.event_type, p.id, "fulfilled", now)?];
        stmts.push(self.balance_audit_stmt(
            f.audit_id,
            &Actor::stripe(),
            "payment.purchase",
            p.user_id,
            "?9",
            p.credits,
            &serde_json::json!({
                "session_id": p.id,
                "pack": p.pack,
                "amount_cents": p.amount_cents,
                "currency": p.currency,
            }),
            Some(&reason),
            now,
        )?);
        stmts.extend(self.ledger_stmts(
            &LedgerEntry {
                id: f.ledger_id,
                user_id: p.user_id,
                kind: "purchase",
                amount: p.credits,
                key: &key,
                call_id: None,
                reason: &reason,
            },
            now,
        )?);
        stmts.push(self.stmt(
            "INSERT INTO purchases (id, user_id, pack, credits, amount_cents, currency, status, payment_intent, created_at, paid_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'paid', ?7, ?8, ?8, ?8) \
             ON CONFLICT (id) DO UPDATE SET \
               status = CASE WHEN purchases.status = 'refunded' THEN 'refunded' ELSE 'paid' END, \
               payment_intent = COALESCE(excluded.payment_intent, purchases.payment_intent), \
               amount_cents = excluded.amount_cents, currency = excluded.currency, \
               paid_at = COALESCE(purchases.paid_at, excluded.paid_at), updated_at = excluded.updated_at",
            &[
                s(p.id),
                s(p.user_id),
                s(p.pack),
                int(p.credits),
                int(p.amount_cents),
                s(p.currency),
                opt(f.payment_intent),
                ts(now),
            ],
        )?);
        self.batch(stmts).await
    }

    /// Marks an open purchase `failed` or `expired` and records the event (idempotent).
    pub async fn close_purchase(
        &self,
        event_id: &str,
        event_type: &str,
        session_id: &str,
        status: &str,
        now: &str,
    ) -> ApiResult<Result<(), WriteConflict>> {
        let event = self.event_stmt(event_id, event_type, session_id, status, now)?;
        let update = self.stmt(
            "UPDATE purchases SET status = ?2, updated_at = ?3 WHERE id = ?1 AND status = 'open'",
            &[s(session_id), s(status), ts(now)],
        )?;
        self.batch(vec![event, update]).await
    }

    /// Takes back what a refund step is due, as far as the balance allows, and records
    /// the rest as debt — all computed from the balance inside the transaction, so the
    /// balance never goes negative and never races another write. `Duplicate` means the
    /// event or the step was already applied.
    pub async fn refund_purchase(
        &self,
        r: &RefundStep<'_>,
        now: &str,
    ) -> ApiResult<Result<(), WriteConflict>> {
        let key = format!("stripe:refund:{}", r.id);
        let reason = format!("Stripe refund of charge {}", r.charge_id);
        let mut stmts =
            vec![self.event_stmt(r.event_id, r.event_type, r.charge_id, "refunded", now)?];
        // Every statement below reads `credits` before the final UPDATE changes it.
        stmts.push(self.stmt(
            "INSERT INTO payment_refunds (id, charge_id, purchase_id, user_id, refunded_cents, credits_due, credits_taken, created_at) \
             SELECT ?1, ?2, ?3, id, ?5, ?6, CASE WHEN credits < ?6 THEN credits ELSE ?6 END, ?7 FROM users WHERE id = ?4",
            &[
                s(r.id),
                s(r.charge_id),
                opt(r.purchase_id),
                s(r.user_id),
                int(r.refunded_cents),
                int(r.credits_due),
                ts(now),
            ],
        )?);
        stmts.push(self.balance_audit_stmt(
            r.audit_id,
            &Actor::stripe(),
            "payment.refund",
            r.user_id,
            "-(CASE WHEN credits < ?9 THEN credits ELSE ?9 END)",
            r.credits_due,
            &serde_json::json!({
                "charge_id": r.charge_id,
                "purchase_id": r.purchase_id,
                "refunded_cents": r.refunded_cents,
                "credits_due": r.credits_due,
            }),
            Some(&reason),
            now,
        )?);
        stmts.push(self.stmt(
            "INSERT INTO credit_ledger (id, user_id, kind, amount, idempotency_key, call_id, reason, created_at) \
             SELECT ?1, id, 'refund', -(CASE WHEN credits < ?3 THEN credits ELSE ?3 END), ?4, NULL, ?5, ?6 FROM users WHERE id = ?2",
            &[
                s(r.ledger_id),
                s(r.user_id),
                int(r.credits_due),
                s(&key),
                s(&reason),
                ts(now),
            ],
        )?);
        stmts.push(self.stmt(
            "UPDATE users SET credits = credits - (CASE WHEN credits < ?2 THEN credits ELSE ?2 END), updated_at = ?3 WHERE id = ?1",
            &[s(r.user_id), int(r.credits_due), ts(now)],
        )?);
        if let Some(purchase) = r.purchase_id {
            stmts.push(self.stmt(
                "UPDATE purchases SET refunded_cents = CASE WHEN refunded_cents > ?2 THEN refunded_cents ELSE ?2 END, \
                 status = CASE WHEN ?3 THEN 'refunded' ELSE status END, updated_at = ?4 WHERE id = ?1",
                &[
                    s(purchase),
                    int(r.cumulative_refunded_cents),
                    flag(r.fully_refunded),
                    ts(now),
                ],
            )?);
        }
        self.batch(stmts).await
    }

    // ---- admin: users ----

    pub async fn admin_users(
        &self,
        q: Option<&str>,
        limit: i64,
        offset: i64,
    ) -> ApiResult<(Vec<AdminUserRow>, i64)> {
        let pattern = q.map(like_pattern);
        // Case-insensitive on both databases (SQLite's LIKE already is for ASCII;
        // Postgres' is not).
        let filter = "(?1 IS NULL OR LOWER(u.email) LIKE LOWER(?1) ESCAPE '\\' OR LOWER(u.name) LIKE LOWER(?1) ESCAPE '\\')";
        let rows = self
            .all(
                &format!(
                    "SELECT {ADMIN_USER_COLUMNS} FROM users u WHERE {filter} \
                     ORDER BY u.created_at DESC, u.id DESC LIMIT ?2 OFFSET ?3"
                ),
                &[opt(pattern.as_deref()), int(limit), int(offset)],
            )
            .await?;
        let total: Option<Count> = self
            .first(
                &format!("SELECT COUNT(*) AS n FROM users u WHERE {filter}"),
                &[opt(pattern.as_deref())],
            )
            .await?;
        Ok((rows, total.map_or(0, |c| c.n)))
    }

    pub async fn admin_user(&self, id: &str) -> ApiResult<Option<AdminUserRow>> {
        self.first(
            &format!("SELECT {ADMIN_USER_COLUMNS} FROM users u WHERE u.id = ?1"),
            &[s(id)],
        )
        .await
    }

    pub async fn ledger_of_user(&self, user_id: &str, limit: i64) -> ApiResult<Vec<LedgerRow>> {
        self.all(
            "SELECT id, kind, amount, idempotency_key, call_id, reason, created_at FROM credit_ledger \
             WHERE user_id = ?1 ORDER BY created_at DESC, id DESC LIMIT ?2",
            &[s(user_id), int(limit)],
        )
        .await
    }

    /// Sets `is_banned` and audits the change, in one transaction. Setting the value it
    /// already has writes nothing (no audit row for a no-op).
    pub async fn set_banned(
        &self,
        user_id: &str,
        banned: bool,
        audit: &AuditEntry<'_>,
        now: &str,
    ) -> ApiResult<()> {
        let (before, after) = match self.dialect() {
            crate::store::db::Dialect::Sqlite => (
                "json_object('is_banned', json(CASE WHEN is_banned THEN 'true' ELSE 'false' END))",
                "json_object('is_banned', json(?8))",
            ),
            crate::store::db::Dialect::Postgres => (
                "jsonb_build_object('is_banned', is_banned)",
                "jsonb_build_object('is_banned', ?8)",
            ),
        };
        let audit_stmt = self.stmt(
            &format!(
                "INSERT INTO audit_log (id, actor_id, actor, action, target_type, target_id, before_json, after_json, reason, created_at) \
                 SELECT ?1, ?2, ?3, ?4, 'user', id, {before}, {after}, ?6, ?7 FROM users WHERE id = ?5 AND is_banned = ?9"
            ),
            &[
                s(audit.id),
                opt(audit.actor.id.as_deref()),
                s(&audit.actor.name),
                s(audit.action),
                s(user_id),
                opt(audit.reason),
                ts(now),
                match self.dialect() {
                    crate::store::db::Dialect::Sqlite => s(if banned { "true" } else { "false" }),
                    crate::store::db::Dialect::Postgres => flag(banned),
                },
                flag(!banned),
            ],
        )?;
        let update = self.stmt(
            "UPDATE users SET is_banned = ?2, updated_at = ?3 WHERE id = ?1 AND is_banned = ?4",
            &[s(user_id), flag(banned), ts(now), flag(!banned)],
        )?;
        match self.batch(vec![audit_stmt, update]).await? {
            Ok(()) => Ok(()),
            Err(e) => Err(ApiError::internal("set banned", format!("{e:?}"))),
        }
    }

    /// Grants (positive) or deducts (negative) credits by an admin: ledger entry, balance
    /// and audit in one transaction. `Duplicate` for a reused idempotency key, `Check`
    /// when a deduction would overdraw.
    pub async fn admin_adjust_credits(
        &self,
        entry: &LedgerEntry<'_>,
        audit_id: &str,
        actor: &Actor,
        now: &str,
    ) -> ApiResult<Result<(), WriteConflict>> {
        let mut stmts = vec![self.balance_audit_stmt(
            audit_id,
            actor,
            if entry.amount >= 0 {
                "credits.grant"
            } else {
                "credits.deduct"
            },
            entry.user_id,
            "?9",
            entry.amount,
            &serde_json::json!({ "amount": entry.amount, "ledger_id": entry.id }),
            Some(entry.reason),
            now,
        )?];
        stmts.extend(self.ledger_stmts(entry, now)?);
        self.batch(stmts).await
    }

    /// Calls of a user that have not been handed to Twilio for good yet (cancelable).
    /// The user's calls that are not over yet: pending, ringing or live.
    pub async fn unfinished_calls(&self, user_id: &str) -> ApiResult<Vec<String>> {
        #[derive(Deserialize)]
        struct Id {
            id: String,
        }
        let rows: Vec<Id> = self
            .all(
                "SELECT id FROM calls WHERE user_id = ?1 AND status IN ('scheduled', 'queued', 'ringing', 'in_progress') ORDER BY created_at",
                &[s(user_id)],
            )
            .await?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    // ---- admin: calls and personas ----

    pub async fn admin_calls(
        &self,
        user_id: Option<&str>,
        status: Option<&str>,
        limit: i64,
        offset: i64,
    ) -> ApiResult<(Vec<AdminCallRow>, i64)> {
        let filter = "(?1 IS NULL OR c.user_id = ?1) AND (?2 IS NULL OR c.status = ?2)";
        let rows = self
            .all(
                &format!(
                    "SELECT {ADMIN_CALL_COLUMNS} FROM calls c LEFT JOIN users u ON u.id = c.user_id \
                     WHERE {filter} ORDER BY c.created_at DESC, c.id DESC LIMIT ?3 OFFSET ?4"
                ),
                &[opt(user_id), opt(status), int(limit), int(offset)],
            )
            .await?;
        let total: Option<Count> = self
            .first(
                &format!("SELECT COUNT(*) AS n FROM calls c WHERE {filter}"),
                &[opt(user_id), opt(status)],
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

#[cfg(test)]
// A panic in a test is that test's failure.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// LIKE wildcards typed by an admin match literally; the pattern is a substring match.
    #[test]
    fn like_pattern_escapes_wildcards() {
        assert_eq!(like_pattern("bob"), "%bob%");
        assert_eq!(like_pattern("50%_off\\"), "%50\\%\\_off\\\\%");
        assert_eq!(like_pattern(""), "%%");
    }
}
