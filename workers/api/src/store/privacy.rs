//! The user's own data: everything the export reads (`GET /api/me/export`) and the one
//! batch that erases an account (`DELETE /api/me`).
//!
//! The erasure is a single transaction whose first statement is its guard: the account
//! row is tombstoned only while it is not erased yet, not an admin, and has no call
//! pending or live. Every later statement runs only if that row now carries this
//! erasure's time, so either everything is wiped or nothing is. What the decisions are
//! (who may erase, the tombstones, the number's digest) is `cmb_core::privacy`.

use cmb_core::calls::CallStatus;
use cmb_core::privacy;

use super::*;

/// A transcript line of one of the user's calls.
#[derive(Debug, Clone, Deserialize)]
pub struct ExportTranscriptRow {
    pub call_id: String,
    pub seq: i64,
    pub role: cmb_core::model::TranscriptRole,
    pub text: String,
    pub at: String,
    #[serde(deserialize_with = "read_flag")]
    pub interrupted: bool,
}

/// What one persona remembers about the user.
#[derive(Debug, Clone, Deserialize)]
pub struct ExportMemoryRow {
    pub persona_id: String,
    pub summary: String,
    pub calls: i64,
    pub last_call_at: String,
    pub updated_at: String,
}

/// A favourite persona of the user.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ExportFavoriteRow {
    pub persona_id: String,
    pub persona_name: String,
    pub created_at: String,
}

/// A schedule of the user, deleted ones included.
#[derive(Debug, Clone, Deserialize)]
pub struct ExportScheduleRow {
    pub id: String,
    pub persona_id: String,
    pub time_of_day: String,
    pub days: i64,
    pub timezone: String,
    pub retries: i64,
    pub retry_after_minutes: i64,
    #[serde(deserialize_with = "read_flag")]
    pub is_active: bool,
    pub pending_call_id: Option<String>,
    pub next_call_at: Option<String>,
    pub skipped_reason: Option<String>,
    pub deleted_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// Everything the export holds but the account itself.
pub struct ExportData {
    pub calls: Vec<CallRow>,
    pub transcripts: Vec<ExportTranscriptRow>,
    pub memories: Vec<ExportMemoryRow>,
    pub favorites: Vec<ExportFavoriteRow>,
    pub personas: Vec<PersonaRow>,
    pub schedules: Vec<ExportScheduleRow>,
    pub purchases: Vec<PurchaseRow>,
    pub ledger: Vec<LedgerRow>,
}

/// A number the account was the first to verify.
#[derive(Debug, Clone, Deserialize)]
pub struct VerifiedPhoneRow {
    pub phone_number: String,
    pub credited_by: Option<String>,
    pub verified_at: String,
}

/// One erasure: whose, when, and what the batch needs to know beforehand.
pub struct Erasure<'a> {
    pub user_id: &'a str,
    /// The account's email before the erasure (its login counters are dropped).
    pub email: &'a str,
    /// The numbers the account verified first, replaced by their digests.
    pub phones: &'a [VerifiedPhoneRow],
    pub audit_id: &'a str,
    pub now: &'a str,
}

/// The statuses of a call that is not over yet.
const UNFINISHED: &str = "('scheduled', 'queued', 'ringing', 'in_progress')";

/// Appended to every statement after the guard: the guard tombstoned the row at `?2`.
const ERASED_NOW: &str = "EXISTS (SELECT 1 FROM users WHERE id = ?1 AND erased_at = ?2)";

impl Store {
    /// The user's calls that are not over yet, with their statuses, oldest first.
    pub async fn unfinished_call_statuses(
        &self,
        user_id: &str,
    ) -> ApiResult<Vec<(String, CallStatus)>> {
        #[derive(Deserialize)]
        struct Row {
            id: String,
            status: CallStatus,
        }
        let rows: Vec<Row> = self
            .all(
                &format!(
                    "SELECT id, status FROM calls WHERE user_id = ?1 AND status IN {UNFINISHED} \
                     ORDER BY created_at, id"
                ),
                &[s(user_id)],
            )
            .await?;
        Ok(rows.into_iter().map(|r| (r.id, r.status)).collect())
    }

    /// Everything the user's export holds besides the account row.
    pub async fn export_data(&self, user_id: &str) -> ApiResult<ExportData> {
        let args = [s(user_id)];
        let calls = self
            .all(
                &format!(
                    "SELECT {CALL_COLUMNS} FROM calls WHERE user_id = ?1 ORDER BY created_at, id"
                ),
                &args,
            )
            .await?;
        let transcripts = self
            .all(
                "SELECT t.call_id, t.seq, t.role, t.text, t.at, t.interrupted FROM call_transcripts t \
                 JOIN calls c ON c.id = t.call_id WHERE c.user_id = ?1 ORDER BY t.call_id, t.seq",
                &args,
            )
            .await?;
        let memories = self
            .all(
                "SELECT persona_id, summary, calls, last_call_at, updated_at FROM persona_memories \
                 WHERE user_id = ?1 ORDER BY persona_id",
                &args,
            )
            .await?;
        let favorites = self
            .all(
                "SELECT f.persona_id, p.name AS persona_name, f.created_at FROM favorites f \
                 JOIN personas p ON p.id = f.persona_id WHERE f.user_id = ?1 \
                 ORDER BY f.created_at, f.persona_id",
                &args,
            )
            .await?;
        let personas = self
            .all(
                &format!(
                    "SELECT {PERSONA_COLUMNS} FROM personas WHERE owner_id = ?1 ORDER BY created_at, id"
                ),
                &args,
            )
            .await?;
        let schedules = self
            .all(
                "SELECT id, persona_id, time_of_day, days, timezone, retries, retry_after_minutes, \
                 is_active, pending_call_id, next_call_at, skipped_reason, deleted_at, created_at, updated_at \
                 FROM schedules WHERE user_id = ?1 ORDER BY created_at, id",
                &args,
            )
            .await?;
        let purchases = self
            .all(
                &format!(
                    "SELECT {PURCHASE_COLUMNS} FROM purchases WHERE user_id = ?1 ORDER BY created_at, id"
                ),
                &args,
            )
            .await?;
        let ledger = self
            .all(
                "SELECT id, kind, amount, idempotency_key, call_id, reason, created_at FROM credit_ledger \
                 WHERE user_id = ?1 ORDER BY created_at, id",
                &args,
            )
            .await?;
        Ok(ExportData {
            calls,
            transcripts,
            memories,
            favorites,
            personas,
            schedules,
            purchases,
            ledger,
        })
    }

    /// The ids of all the user's calls.
    pub async fn call_ids_of(&self, user_id: &str) -> ApiResult<Vec<String>> {
        #[derive(Deserialize)]
        struct Row {
            id: String,
        }
        let rows: Vec<Row> = self
            .all(
                "SELECT id FROM calls WHERE user_id = ?1 ORDER BY created_at, id",
                &[s(user_id)],
            )
            .await?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    /// The numbers `user_id` was the first account to verify.
    pub async fn verified_phones_first_of(
        &self,
        user_id: &str,
    ) -> ApiResult<Vec<VerifiedPhoneRow>> {
        self.all(
            "SELECT phone_number, credited_by, verified_at FROM verified_phones \
             WHERE first_user_id = ?1 ORDER BY verified_at, phone_number",
            &[s(user_id)],
        )
        .await
    }

    /// Deletes every schedule of the user (kept, so their calls still name them), so an
    /// attempt canceled afterwards books nothing after it.
    pub async fn delete_schedules_of(&self, user_id: &str, now: &str) -> ApiResult<()> {
        let delete = self.stmt(
            "UPDATE schedules SET deleted_at = ?2, is_active = FALSE, pending_call_id = NULL, \
               next_call_at = NULL, updated_at = ?2 WHERE user_id = ?1 AND deleted_at IS NULL",
            &[s(user_id), ts(now)],
        )?;
        match self.batch(vec![delete]).await? {
            Ok(()) => Ok(()),
            Err(e) => Err(ApiError::internal("delete schedules", format!("{e:?}"))),
        }
    }

    /// Erases the account's personal data in one transaction. `Ok(false)`: nothing was
    /// changed, because the account is already erased, is an admin, or has a call
    /// pending or live (one was booked or started since the caller looked).
    ///
    /// Kept: the account row (tombstoned) and, unchanged, its ledger, purchases, refunds
    /// and call rows (their numbers blanked), which the accounts need. Gone: the
    /// transcripts, the memories, the favourites, the custom personas' words (retired,
    /// so calls still name them), the schedules (soft-deleted), the login counters
    /// naming the email, and the numbers in clear in `verified_phones` (their digests
    /// stay, so free credits are still granted once per number).
    pub async fn erase_user(&self, e: &Erasure<'_>) -> ApiResult<bool> {
        let tombstone = privacy::erased_email(e.user_id);
        let who = [s(e.user_id), ts(e.now)];
        let with = |extra: &[Arg]| -> Vec<Arg> {
            let mut args = who.to_vec();
            args.extend_from_slice(extra);
            args
        };
        let mut stmts = vec![
            // The guard: everything below runs only if this tombstoned the row.
            self.stmt(
                &format!(
                    "UPDATE users SET email = ?3, name = '', phone_number = NULL, phone_verified = ?4, \
                       password_hash = ?5, timezone = NULL, last_login_ip = NULL, erased_at = ?2, updated_at = ?2 \
                     WHERE id = ?1 AND erased_at IS NULL AND role <> 'admin' \
                       AND NOT EXISTS (SELECT 1 FROM calls WHERE user_id = ?1 AND status IN {UNFINISHED})"
                ),
                &with(&[
                    s(&tombstone),
                    flag(false),
                    s(privacy::ERASED_PASSWORD_HASH),
                ]),
            )?,
            self.stmt(
                &format!(
                    "INSERT INTO audit_log (id, actor_id, actor, action, target_type, target_id, created_at) \
                     SELECT ?3, ?1, ?4, 'user.erase', 'user', ?1, ?2 WHERE {ERASED_NOW}"
                ),
                &with(&[s(e.audit_id), s(&tombstone)]),
            )?,
            // Earlier audit rows keep the actor's id, not the email it had.
            self.stmt(
                &format!("UPDATE audit_log SET actor = ?3 WHERE actor_id = ?1 AND {ERASED_NOW}"),
                &with(&[s(&tombstone)]),
            )?,
            self.stmt(
                &format!(
                    "DELETE FROM call_transcripts WHERE call_id IN (SELECT id FROM calls WHERE user_id = ?1) \
                     AND {ERASED_NOW}"
                ),
                &with(&[]),
            )?,
            self.stmt(
                &format!(
                    "UPDATE calls SET phone_number = '', updated_at = ?2 WHERE user_id = ?1 AND {ERASED_NOW}"
                ),
                &with(&[]),
            )?,
            self.stmt(
                &format!("DELETE FROM persona_memories WHERE user_id = ?1 AND {ERASED_NOW}"),
                &with(&[]),
            )?,
            self.stmt(
                &format!("DELETE FROM memory_forgets WHERE user_id = ?1 AND {ERASED_NOW}"),
                &with(&[]),
            )?,
            // Stored answers to idempotent requests hold the calls' numbers.
            self.stmt(
                &format!("DELETE FROM idempotency_keys WHERE user_id = ?1 AND {ERASED_NOW}"),
                &with(&[]),
            )?,
            // Theirs, and anyone's on their personas.
            self.stmt(
                &format!(
                    "DELETE FROM favorites WHERE (user_id = ?1 \
                       OR persona_id IN (SELECT id FROM personas WHERE owner_id = ?1)) AND {ERASED_NOW}"
                ),
                &with(&[]),
            )?,
            self.stmt(
                &format!(
                    "UPDATE personas SET is_active = FALSE, name = '', description = '', system_prompt = '', \
                       greeting = '', avatar_url = NULL, category = NULL, updated_at = ?2 \
                     WHERE owner_id = ?1 AND {ERASED_NOW}"
                ),
                &with(&[]),
            )?,
            self.stmt(
                &format!(
                    "UPDATE schedules SET deleted_at = COALESCE(deleted_at, ?2), is_active = FALSE, \
                       pending_call_id = NULL, next_call_at = NULL, skipped_reason = NULL, timezone = 'UTC', \
                       updated_at = ?2 WHERE user_id = ?1 AND {ERASED_NOW}"
                ),
                &with(&[]),
            )?,
        ];
        let (exact, pair_prefix) = privacy::login_counter_keys(e.email);
        let mut keys = exact.iter().map(|k| s(k)).collect::<Vec<_>>();
        keys.push(s(&pair_prefix));
        stmts.push(self.stmt(
            &format!(
                "DELETE FROM rate_limits WHERE (key = ?3 OR key = ?4 OR substr(key, 1, length(?5)) = ?5) \
                 AND {ERASED_NOW}"
            ),
            &with(&keys),
        )?);
        for phone in e.phones {
            stmts.push(self.stmt(
                &format!(
                    "INSERT INTO verified_phones (phone_number, first_user_id, credited_by, verified_at) \
                     SELECT ?3, ?1, ?4, ?5 WHERE {ERASED_NOW} ON CONFLICT (phone_number) DO NOTHING"
                ),
                &with(&[
                    s(&privacy::phone_digest(&phone.phone_number)),
                    opt(phone.credited_by.as_deref()),
                    ts(&phone.verified_at),
                ]),
            )?);
            stmts.push(self.stmt(
                &format!(
                    "DELETE FROM verified_phones WHERE phone_number = ?3 AND first_user_id = ?1 AND {ERASED_NOW}"
                ),
                &with(&[s(&phone.phone_number)]),
            )?);
        }
        match self.batch(stmts).await? {
            Ok(()) => {}
            Err(conflict) => return Err(ApiError::internal("erase", format!("{conflict:?}"))),
        }
        let erased: Option<Count> = self
            .first(
                "SELECT COUNT(*) AS n FROM users WHERE id = ?1 AND erased_at = ?2",
                &who,
            )
            .await?;
        Ok(erased.is_some_and(|c| c.n > 0))
    }
}
