//! Accounts: users, their roles and bans, and the admin's view of them.

use cmb_core::jwt::Role;
use cmb_core::model::Tier;

use super::*;

/// A user as stored.
#[derive(Debug, Clone, Deserialize)]
pub struct UserRow {
    pub id: String,
    pub email: String,
    pub name: String,
    pub phone_number: Option<String>,
    pub password_hash: String,
    pub role: Role,
    pub tier: Tier,
    pub credits: i64,
    #[serde(deserialize_with = "read_flag")]
    pub is_banned: bool,
    #[serde(deserialize_with = "read_flag")]
    pub phone_verified: bool,
    /// The address the owner last signed in from (never slowed down at login).
    pub last_login_ip: Option<String>,
    pub created_at: String,
    /// IANA time zone (`None`: UTC).
    pub timezone: Option<String>,
    /// When the account was erased (`DELETE /api/me`): it can never sign in again.
    pub erased_at: Option<String>,
}

impl UserRow {
    /// The number calls go to: the account's phone, once verified.
    pub fn verified_phone(&self) -> Option<&str> {
        self.phone_number.as_deref().filter(|_| self.phone_verified)
    }
}

/// The public view of a user (never the password hash).
#[derive(Debug, Clone, Serialize)]
pub struct UserView {
    pub id: String,
    pub email: String,
    pub name: String,
    pub phone_number: Option<String>,
    pub role: Role,
    pub tier: Tier,
    pub credits: i64,
    pub is_banned: bool,
    pub phone_verified: bool,
    pub created_at: String,
    /// IANA time zone, `null` until the caller sets one (then UTC is assumed).
    pub timezone: Option<String>,
}

impl UserRow {
    pub fn view(&self) -> UserView {
        UserView {
            id: self.id.clone(),
            email: self.email.clone(),
            name: self.name.clone(),
            phone_number: self.phone_number.clone(),
            role: self.role,
            tier: self.tier,
            credits: self.credits,
            is_banned: self.is_banned,
            phone_verified: self.phone_verified,
            created_at: self.created_at.clone(),
            timezone: self.timezone.clone(),
        }
    }
}

pub(super) const USER_COLUMNS: &str =
    "id, email, name, phone_number, password_hash, role, tier, credits, is_banned, phone_verified, last_login_ip, created_at, timezone, erased_at";

/// A user as the admin list shows it (never the password hash), with recorded debt.
#[derive(Debug, Clone, Deserialize)]
pub struct AdminUserRow {
    pub id: String,
    pub email: String,
    pub name: String,
    pub phone_number: Option<String>,
    pub role: Role,
    pub tier: Tier,
    pub credits: i64,
    #[serde(deserialize_with = "read_flag")]
    pub is_banned: bool,
    pub debt: i64,
    pub created_at: String,
    /// When the account was erased (its email is then a tombstone).
    pub erased_at: Option<String>,
}

pub(super) const ADMIN_USER_COLUMNS: &str = "u.id, u.email, u.name, u.phone_number, u.role, u.tier, u.credits, u.is_banned, \
     COALESCE((SELECT CAST(SUM(r.credits_due - r.credits_taken) AS BIGINT) FROM payment_refunds r WHERE r.user_id = u.id AND r.purchase_id IS NOT NULL), 0) AS debt, \
     u.created_at, u.erased_at";

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

impl Store {
    // ---- users ----

    /// Creates a user (no credits: those come with the first verification of a phone
    /// number). Returns `Err(WriteConflict::Duplicate)` when the email is taken.
    pub async fn create_user(
        &self,
        id: &str,
        email: &str,
        name: &str,
        phone_number: Option<&str>,
        password_hash: &str,
        now: &str,
    ) -> ApiResult<Result<(), WriteConflict>> {
        let insert = self.stmt(
            "INSERT INTO users (id, email, name, phone_number, password_hash, role, credits, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'user', 0, ?6, ?6)",
            &[s(id), s(email), s(name), opt(phone_number), s(password_hash), ts(now)],
        )?;
        self.batch(vec![insert]).await
    }

    /// Records that `user_id` proved it holds `phone` (Twilio Verify approved): the
    /// account's number, verified; and, in the same transaction, the free credits — only
    /// if no account ever verified this number before *and* this account never had them.
    /// Per number, the grant is claimed by its ledger id on the number's row first, so two
    /// concurrent verifications cannot both grant (on Postgres the second waits on the row
    /// lock, then finds it claimed); per account, the ledger key `free:user:<id>` is
    /// unique. A number known only by its digest (an erased account verified it) was
    /// verified before too. Returns whether credits were granted.
    pub async fn set_verified_phone(
        &self,
        user_id: &str,
        phone: &str,
        free_credits: i64,
        grant_id: &str,
        now: &str,
    ) -> ApiResult<bool> {
        let key = format!("free:user:{user_id}");
        let stmts = vec![
            self.stmt(
                "UPDATE users SET phone_number = ?2, phone_verified = ?3, updated_at = ?4 WHERE id = ?1",
                &[s(user_id), s(phone), flag(true), ts(now)],
            )?,
            // A number an erased account verified is kept only as its digest
            // (`cmb_core::privacy::phone_digest`): it still counts as verified before, so
            // no row in clear is made for it and the grant below finds nothing to claim.
            self.stmt(
                "INSERT INTO verified_phones (phone_number, first_user_id, verified_at) SELECT ?1, ?2, ?3 \
                 WHERE NOT EXISTS (SELECT 1 FROM verified_phones WHERE phone_number = ?4) \
                 ON CONFLICT (phone_number) DO NOTHING",
                &[s(phone), s(user_id), ts(now), s(&cmb_core::privacy::phone_digest(phone))],
            )?,
            self.stmt(
                "UPDATE verified_phones SET credited_by = ?3 \
                 WHERE phone_number = ?1 AND first_user_id = ?2 AND credited_by IS NULL AND ?4 > 0",
                &[s(phone), s(user_id), s(grant_id), int(free_credits)],
            )?,
            self.stmt(
                "INSERT INTO credit_ledger (id, user_id, kind, amount, idempotency_key, reason, created_at) \
                 SELECT ?1, ?2, 'grant', ?3, ?4, 'verified phone', ?5 FROM verified_phones \
                 WHERE phone_number = ?6 AND credited_by = ?1 \
                 ON CONFLICT (idempotency_key) DO NOTHING",
                &[s(grant_id), s(user_id), int(free_credits), s(&key), ts(now), s(phone)],
            )?,
            self.stmt(
                "UPDATE users SET credits = credits + ?2 WHERE id = ?1 \
                 AND EXISTS (SELECT 1 FROM credit_ledger WHERE id = ?3)",
                &[s(user_id), int(free_credits), s(grant_id)],
            )?,
        ];
        match self.batch(stmts).await? {
            Ok(()) => {}
            Err(e) => return Err(ApiError::internal("verify phone", format!("{e:?}"))),
        }
        let granted: Option<Count> = self
            .first(
                "SELECT COUNT(*) AS n FROM credit_ledger WHERE id = ?1",
                &[s(grant_id)],
            )
            .await?;
        Ok(granted.is_some_and(|g| g.n > 0))
    }

    /// Remembers the address the owner just signed in from (see `cmb_core::limits`).
    pub async fn set_last_login_ip(&self, user_id: &str, ip: &str) -> ApiResult<()> {
        self.stmt(
            "UPDATE users SET last_login_ip = ?2 WHERE id = ?1 AND last_login_ip IS DISTINCT FROM ?2",
            &[s(user_id), s(ip)],
        )?
        .run()
        .await
        .map_err(|e| ApiError::internal("last login ip", e))?;
        Ok(())
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

    /// Sets the fields given of the caller's profile (`None`: unchanged).
    pub async fn update_profile(
        &self,
        user_id: &str,
        name: Option<&str>,
        timezone: Option<&str>,
        now: &str,
    ) -> ApiResult<()> {
        let update = self.stmt(
            "UPDATE users SET name = COALESCE(?2, name), timezone = COALESCE(?3, timezone), updated_at = ?4 WHERE id = ?1",
            &[s(user_id), opt(name), opt(timezone), ts(now)],
        )?;
        match self.batch(vec![update]).await? {
            Ok(()) => Ok(()),
            Err(e) => Err(ApiError::internal("update profile", format!("{e:?}"))),
        }
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
        let mut stmts = vec![self.lock_user_stmt(entry.user_id)?];
        stmts.push(self.balance_audit_stmt(
            audit_id,
            actor,
            if entry.amount >= 0 {
                "credits.grant"
            } else {
                "credits.deduct"
            },
            entry.user_id,
            "?9",
            &[int(entry.amount)],
            &serde_json::json!({ "amount": entry.amount, "ledger_id": entry.id }),
            Some(entry.reason),
            now,
        )?);
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
}

#[cfg(test)]
// A panic in a test is that test's failure.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// LIKE wildcards typed by an admin match literally; the pattern is a substring match.
    #[test]
    pub(super) fn like_pattern_escapes_wildcards() {
        assert_eq!(like_pattern("bob"), "%bob%");
        assert_eq!(like_pattern("50%_off\\"), "%50\\%\\_off\\\\%");
        assert_eq!(like_pattern(""), "%%");
    }
}
