//! Client idempotency keys (`idempotency_keys`): the claim a request takes before its
//! work, the answer it leaves for repeats, and the release after a client error. The
//! decisions (what a repeat gets, what is kept) are `cmb_core::idempotency`.

use super::*;

/// A claim on a user's key, as the request that holds it writes it.
pub struct Claim<'a> {
    pub user_id: &'a str,
    pub key: &'a str,
    pub route: &'a str,
    pub fingerprint: &'a str,
    /// Random, this request's own: only it stores an answer or releases the key.
    pub claim: &'a str,
    pub now: &'a str,
    pub expires_at: &'a str,
}

/// A key as stored.
#[derive(Debug, Deserialize)]
pub struct IdempotencyRow {
    pub fingerprint: String,
    pub status: Option<i64>,
    pub response: Option<String>,
    pub expires_at: String,
}

impl Store {
    /// Claims `c.key` for this request: `true` if it is now ours, `false` if an unexpired
    /// row holds it (read it with [`Store::idempotency_key`]). One transaction prunes every
    /// expired key first, this one included, so an expired key is free again; of
    /// concurrent claims of one key the primary key lets exactly one in.
    pub async fn claim_idempotency_key(&self, c: &Claim<'_>) -> ApiResult<bool> {
        let prune = self.stmt(
            "DELETE FROM idempotency_keys WHERE expires_at <= ?1",
            &[ts(c.now)],
        )?;
        let insert = self.stmt(
            "INSERT INTO idempotency_keys (user_id, key, route, fingerprint, claim, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            &[
                s(c.user_id),
                s(c.key),
                s(c.route),
                s(c.fingerprint),
                s(c.claim),
                ts(c.now),
                ts(c.expires_at),
            ],
        )?;
        match self.batch(vec![prune, insert]).await? {
            Ok(()) => Ok(true),
            Err(WriteConflict::Duplicate) => Ok(false),
            Err(other) => Err(ApiError::internal(
                "claim idempotency key",
                format!("{other:?}"),
            )),
        }
    }

    pub async fn idempotency_key(
        &self,
        user_id: &str,
        key: &str,
    ) -> ApiResult<Option<IdempotencyRow>> {
        self.first(
            "SELECT fingerprint, status, response, expires_at FROM idempotency_keys \
             WHERE user_id = ?1 AND key = ?2",
            &[s(user_id), s(key)],
        )
        .await
    }

    /// Stores the answer of the request holding `claim`, for replays.
    pub async fn complete_idempotency_key(
        &self,
        user_id: &str,
        key: &str,
        claim: &str,
        status: u16,
        response: &str,
    ) -> ApiResult<()> {
        self.stmt(
            "UPDATE idempotency_keys SET status = ?4, response = ?5 \
             WHERE user_id = ?1 AND key = ?2 AND claim = ?3 AND status IS NULL",
            &[
                s(user_id),
                s(key),
                s(claim),
                int(i64::from(status)),
                s(response),
            ],
        )?
        .run()
        .await
        .map_err(|e| ApiError::internal("complete idempotency key", e))?;
        Ok(())
    }

    /// Gives the key back (the request failed as the client's mistake): the next request
    /// with it runs as if it were new.
    pub async fn release_idempotency_key(
        &self,
        user_id: &str,
        key: &str,
        claim: &str,
    ) -> ApiResult<()> {
        self.stmt(
            "DELETE FROM idempotency_keys WHERE user_id = ?1 AND key = ?2 AND claim = ?3 AND status IS NULL",
            &[s(user_id), s(key), s(claim)],
        )?
        .run()
        .await
        .map_err(|e| ApiError::internal("release idempotency key", e))?;
        Ok(())
    }
}
