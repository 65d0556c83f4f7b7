//! Credits: the ledger and the balance it keeps exact (every change is a ledger row
//! with a unique idempotency key, in the same transaction as the balance update).

use cmb_core::model::LedgerKind;

use super::*;

/// A credit movement for one call, with its idempotency key.
pub struct LedgerEntry<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    pub kind: LedgerKind,
    pub amount: i64,
    pub key: &'a str,
    pub call_id: Option<&'a str>,
    pub reason: &'a str,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LedgerRow {
    pub id: String,
    pub kind: LedgerKind,
    pub amount: i64,
    pub idempotency_key: String,
    pub call_id: Option<String>,
    pub reason: Option<String>,
    pub created_at: String,
}

impl Store {
    // ---- credits ----

    /// Takes the user's row lock for the rest of the transaction (Postgres: a no-op
    /// update locks the row until commit, so a money batch that reads the balance in
    /// several statements sees one balance; D1 serialises batches anyway). The first
    /// statement of every batch that computes an amount from the balance.
    pub(crate) fn lock_user_stmt(&self, user_id: &str) -> ApiResult<Bound<'_>> {
        self.stmt(
            "UPDATE users SET updated_at = updated_at WHERE id = ?1",
            &[s(user_id)],
        )
    }

    pub(crate) fn ledger_stmts(&self, e: &LedgerEntry<'_>, now: &str) -> ApiResult<[Bound<'_>; 2]> {
        let insert = self.stmt(
            "INSERT INTO credit_ledger (id, user_id, kind, amount, idempotency_key, call_id, reason, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            &[s(e.id), s(e.user_id), s(e.kind.as_str()), int(e.amount), s(e.key), opt(e.call_id), s(e.reason), ts(now)],
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
}
