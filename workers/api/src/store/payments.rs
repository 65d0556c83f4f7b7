//! Purchases (Stripe Checkout), Stripe event idempotency and refunds.

use super::*;

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

pub(super) const PURCHASE_COLUMNS: &str =
    "id, user_id, pack, credits, amount_cents, currency, status, payment_intent, \
     refunded_cents, created_at, paid_at";

impl Store {
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

    pub(super) fn event_stmt(
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
}
