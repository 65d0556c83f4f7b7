//! Purchases (Stripe Checkout), Stripe event idempotency and refunds.

use cmb_core::model::PurchaseStatus;

use super::*;

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PurchaseRow {
    pub id: String,
    pub user_id: String,
    pub pack: String,
    pub credits: i64,
    pub amount_cents: i64,
    pub currency: String,
    pub status: PurchaseStatus,
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

/// Why money went back to the buyer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clawback {
    /// `charge.refunded`: we (or Stripe) refunded part or all of the charge.
    Refund,
    /// `charge.dispute.created`: the buyer's bank is taking the money back.
    Dispute,
}

impl Clawback {
    fn ledger_key(self, step_id: &str) -> String {
        match self {
            Self::Refund => format!("stripe:refund:{step_id}"),
            Self::Dispute => format!("stripe:{step_id}"),
        }
    }

    fn audit_action(self) -> &'static str {
        match self {
            Self::Refund => "payment.refund",
            Self::Dispute => "payment.dispute",
        }
    }
}

/// One refund step of a charge, or a dispute of it.
pub struct RefundStep<'a> {
    pub kind: Clawback,
    pub event_id: &'a str,
    pub event_type: &'a str,
    /// `<charge id>:<cumulative amount_refunded>` for a refund, `dispute:<id>` for a
    /// dispute: the step's idempotency key.
    pub id: &'a str,
    pub charge_id: &'a str,
    pub payment_intent: Option<&'a str>,
    /// `None` while the purchase is not fulfilled yet: the step is kept pending (nothing
    /// taken) and netted out of the grant when it is.
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
    /// the audit row, in one transaction that locks the user's row first. Refunds of the
    /// same PaymentIntent seen before this (pending) are netted out of the grant and
    /// linked to the purchase, so a refund and its purchase net zero in either order.
    /// `Duplicate` means this event or this session was already processed, and nothing
    /// changed.
    pub async fn fulfil_purchase(
        &self,
        f: &Fulfilment<'_>,
        now: &str,
    ) -> ApiResult<Result<(), WriteConflict>> {
        let p = &f.purchase;
        let key = format!("stripe:session:{}", p.id);
        let reason = format!("Stripe checkout: {} pack", p.pack);
        // The credits already refunded before this grant, over (pi, user).
        let pending = |pi: &str, user: &str| {
            format!(
                "COALESCE((SELECT CAST(SUM(r.credits_due) AS BIGINT) FROM payment_refunds r \
                 WHERE r.payment_intent = {pi} AND r.purchase_id IS NULL AND r.user_id = {user}), 0)"
            )
        };
        let grant = |credits: &str, pi: &str, user: &str| {
            let pending = pending(pi, user);
            format!("(CASE WHEN {credits} > {pending} THEN {credits} - {pending} ELSE 0 END)")
        };
        let mut stmts = vec![
            self.lock_user_stmt(p.user_id)?,
            self.event_stmt(f.event_id, f.event_type, p.id, "fulfilled", now)?,
        ];
        stmts.push(self.balance_audit_stmt(
            f.audit_id,
            &Actor::stripe(),
            "payment.purchase",
            p.user_id,
            &grant("?9", "?10", "users.id"),
            &[int(p.credits), opt(f.payment_intent)],
            &serde_json::json!({
                "session_id": p.id,
                "pack": p.pack,
                "amount_cents": p.amount_cents,
                "currency": p.currency,
            }),
            Some(&reason),
            now,
        )?);
        stmts.push(self.stmt(
            &format!(
                "INSERT INTO credit_ledger (id, user_id, kind, amount, idempotency_key, call_id, reason, created_at) \
                 SELECT ?1, ?2, 'purchase', {}, ?5, NULL, ?6, ?7",
                grant("?3", "?4", "?2")
            ),
            &[
                s(f.ledger_id),
                s(p.user_id),
                int(p.credits),
                opt(f.payment_intent),
                s(&key),
                s(&reason),
                ts(now),
            ],
        )?);
        stmts.push(self.stmt(
            &format!(
                "UPDATE users SET credits = credits + {}, updated_at = ?4 WHERE id = ?1",
                grant("?2", "?3", "?1")
            ),
            &[s(p.user_id), int(p.credits), opt(f.payment_intent), ts(now)],
        )?);
        let refunded = "COALESCE((SELECT CAST(SUM(r.refunded_cents) AS BIGINT) FROM payment_refunds r \
                        WHERE r.payment_intent = ?7 AND r.purchase_id IS NULL AND r.user_id = ?2), 0)";
        stmts.push(self.stmt(
            &format!(
                "INSERT INTO purchases (id, user_id, pack, credits, amount_cents, currency, status, payment_intent, refunded_cents, created_at, paid_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, CASE WHEN {refunded} >= ?5 THEN 'refunded' ELSE 'paid' END, ?7, {refunded}, ?8, ?8, ?8) \
                 ON CONFLICT (id) DO UPDATE SET \
                   status = CASE WHEN purchases.status = 'refunded' OR excluded.status = 'refunded' THEN 'refunded' ELSE 'paid' END, \
                   payment_intent = COALESCE(excluded.payment_intent, purchases.payment_intent), \
                   refunded_cents = CASE WHEN purchases.refunded_cents > excluded.refunded_cents THEN purchases.refunded_cents ELSE excluded.refunded_cents END, \
                   amount_cents = excluded.amount_cents, currency = excluded.currency, \
                   paid_at = COALESCE(purchases.paid_at, excluded.paid_at), updated_at = excluded.updated_at"
            ),
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
        // Last: the pending refunds are now settled against this purchase.
        stmts.push(self.stmt(
            "UPDATE payment_refunds SET purchase_id = ?1, credits_taken = credits_due \
             WHERE payment_intent = ?2 AND purchase_id IS NULL AND user_id = ?3",
            &[s(p.id), opt(f.payment_intent), s(p.user_id)],
        )?);
        self.batch(stmts).await
    }

    /// Marks an open purchase `failed` or `expired` and records the event (idempotent).
    pub async fn close_purchase(
        &self,
        event_id: &str,
        event_type: &str,
        session_id: &str,
        status: PurchaseStatus,
        now: &str,
    ) -> ApiResult<Result<(), WriteConflict>> {
        let event = self.event_stmt(event_id, event_type, session_id, status.as_str(), now)?;
        let update = self.stmt(
            "UPDATE purchases SET status = ?2, updated_at = ?3 WHERE id = ?1 AND status = 'open'",
            &[s(session_id), s(status.as_str()), ts(now)],
        )?;
        self.batch(vec![event, update]).await
    }

    /// Takes back what a refund step or a dispute is due, as far as the balance allows,
    /// and records the rest as debt — all computed from the balance inside one
    /// transaction that locks the user's row first, so the balance never goes negative,
    /// never races another write, and `SUM(ledger) = balance` holds on both databases. A
    /// step whose purchase is not fulfilled yet takes nothing and waits (see
    /// [`Store::fulfil_purchase`]). `Duplicate` means the event or the step was already
    /// applied.
    pub async fn refund_purchase(
        &self,
        r: &RefundStep<'_>,
        now: &str,
    ) -> ApiResult<Result<(), WriteConflict>> {
        let key = r.kind.ledger_key(r.id);
        let reason = match r.kind {
            Clawback::Refund => format!("Stripe refund of charge {}", r.charge_id),
            Clawback::Dispute => format!("Stripe dispute of charge {}", r.charge_id),
        };
        let settled = r.purchase_id.is_some();
        // What is taken: as much of the due as the balance holds, or nothing while pending.
        let taken = |due: &str| {
            if settled {
                format!("(CASE WHEN credits < {due} THEN credits ELSE {due} END)")
            } else {
                // Nothing, but still naming the parameter: D1 refuses unused bindings.
                format!("(0 * {due})")
            }
        };
        let mut stmts = vec![
            self.lock_user_stmt(r.user_id)?,
            self.event_stmt(r.event_id, r.event_type, r.charge_id, "refunded", now)?,
        ];
        // Every statement below reads `credits` before the final UPDATE changes it.
        stmts.push(self.stmt(
            &format!(
                "INSERT INTO payment_refunds (id, charge_id, purchase_id, user_id, refunded_cents, credits_due, credits_taken, payment_intent, created_at) \
                 SELECT ?1, ?2, ?3, id, ?5, ?6, {}, ?7, ?8 FROM users WHERE id = ?4",
                taken("?6")
            ),
            &[
                s(r.id),
                s(r.charge_id),
                opt(r.purchase_id),
                s(r.user_id),
                int(r.refunded_cents),
                int(r.credits_due),
                opt(r.payment_intent),
                ts(now),
            ],
        )?);
        stmts.push(self.balance_audit_stmt(
            r.audit_id,
            &Actor::stripe(),
            r.kind.audit_action(),
            r.user_id,
            &format!("-{}", taken("?9")),
            &[int(r.credits_due)],
            &serde_json::json!({
                "charge_id": r.charge_id,
                "purchase_id": r.purchase_id,
                "refunded_cents": r.refunded_cents,
                "credits_due": r.credits_due,
                "pending": !settled,
            }),
            Some(&reason),
            now,
        )?);
        if settled {
            stmts.push(self.stmt(
                &format!(
                    "INSERT INTO credit_ledger (id, user_id, kind, amount, idempotency_key, call_id, reason, created_at) \
                     SELECT ?1, id, 'refund', -{}, ?4, NULL, ?5, ?6 FROM users WHERE id = ?2",
                    taken("?3")
                ),
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
                &format!(
                    "UPDATE users SET credits = credits - {}, updated_at = ?3 WHERE id = ?1",
                    taken("?2")
                ),
                &[s(r.user_id), int(r.credits_due), ts(now)],
            )?);
        }
        match (r.purchase_id, r.kind) {
            (Some(purchase), Clawback::Refund) => stmts.push(self.stmt(
                "UPDATE purchases SET refunded_cents = CASE WHEN refunded_cents > ?2 THEN refunded_cents ELSE ?2 END, \
                 status = CASE WHEN ?3 THEN 'refunded' ELSE status END, updated_at = ?4 WHERE id = ?1",
                &[
                    s(purchase),
                    int(r.cumulative_refunded_cents),
                    flag(r.fully_refunded),
                    ts(now),
                ],
            )?),
            (Some(purchase), Clawback::Dispute) => stmts.push(self.stmt(
                "UPDATE purchases SET disputed_at = COALESCE(disputed_at, ?2), updated_at = ?2 WHERE id = ?1",
                &[s(purchase), ts(now)],
            )?),
            (None, _) => {}
        }
        self.batch(stmts).await
    }

    /// Refund steps of a PaymentIntent still pending (seen before its purchase was
    /// fulfilled, and not netted by that fulfilment).
    pub async fn pending_refunds(&self, payment_intent: &str) -> ApiResult<Vec<String>> {
        #[derive(Deserialize)]
        struct Id {
            id: String,
        }
        let rows: Vec<Id> = self
            .all(
                "SELECT id FROM payment_refunds WHERE payment_intent = ?1 AND purchase_id IS NULL ORDER BY created_at",
                &[s(payment_intent)],
            )
            .await?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    /// Settles a pending refund step against its purchase, fulfilled meanwhile (the
    /// refund and the fulfilment crossed): takes what the step is due as far as the
    /// balance allows (the rest is debt), records it in the ledger and links the step.
    /// Every statement is conditional on the step still being pending, under the user's
    /// row lock, so a step the fulfilment netted, or another settlement took, changes
    /// nothing.
    pub async fn settle_pending_refund(
        &self,
        step_id: &str,
        purchase_id: &str,
        user_id: &str,
        ledger_id: &str,
        now: &str,
    ) -> ApiResult<Result<(), WriteConflict>> {
        let key = Clawback::Refund.ledger_key(step_id);
        let reason = format!("Stripe refund settled against purchase {purchase_id}");
        let stmts = vec![
            self.lock_user_stmt(user_id)?,
            self.stmt(
                "INSERT INTO credit_ledger (id, user_id, kind, amount, idempotency_key, call_id, reason, created_at) \
                 SELECT ?1, u.id, 'refund', -(CASE WHEN u.credits < r.credits_due THEN u.credits ELSE r.credits_due END), ?3, NULL, ?4, ?5 \
                 FROM users u JOIN payment_refunds r ON r.user_id = u.id \
                 WHERE u.id = ?2 AND r.id = ?6 AND r.purchase_id IS NULL",
                &[s(ledger_id), s(user_id), s(&key), s(&reason), ts(now), s(step_id)],
            )?,
            self.stmt(
                "UPDATE users SET credits = credits + COALESCE((SELECT amount FROM credit_ledger WHERE id = ?2), 0), \
                 updated_at = ?3 WHERE id = ?1",
                &[s(user_id), s(ledger_id), ts(now)],
            )?,
            self.stmt(
                "UPDATE purchases SET \
                   refunded_cents = refunded_cents + COALESCE((SELECT r.refunded_cents FROM payment_refunds r WHERE r.id = ?2 AND r.purchase_id IS NULL), 0), \
                   updated_at = ?3 WHERE id = ?1",
                &[s(purchase_id), s(step_id), ts(now)],
            )?,
            self.stmt(
                "UPDATE purchases SET status = 'refunded' WHERE id = ?1 AND refunded_cents >= amount_cents",
                &[s(purchase_id)],
            )?,
            self.stmt(
                "UPDATE payment_refunds SET purchase_id = ?2, \
                   credits_taken = COALESCE((SELECT -amount FROM credit_ledger WHERE id = ?3), credits_taken) \
                 WHERE id = ?1 AND purchase_id IS NULL",
                &[s(step_id), s(purchase_id), s(ledger_id)],
            )?,
        ];
        self.batch(stmts).await
    }
}
