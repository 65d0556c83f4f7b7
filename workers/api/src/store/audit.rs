//! The admin audit log: every admin action, written in the same transaction as the change.

use super::*;

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

pub(super) fn json_text(v: &Option<serde_json::Value>) -> crate::store::Arg {
    crate::store::Arg::Json(v.as_ref().map(|v| v.to_string()))
}

#[derive(Deserialize)]
pub(super) struct Count {
    pub(super) n: i64,
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
    /// the user's row (`credits`, `users.id`) and the parameters `delta_args`, bound as
    /// `?9`, `?10`, …. Bound numbers arrive as JS doubles, so the
    /// delta is cast back to an integer before it lands in JSON (no column affinity
    /// does it there).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn balance_audit_stmt(
        &self,
        id: &str,
        actor: &Actor,
        action: &str,
        user_id: &str,
        delta_sql: &str,
        delta_args: &[crate::store::Arg],
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
        let mut args = vec![
            s(id),
            opt(actor.id.as_deref()),
            s(&actor.name),
            s(action),
            s(user_id),
            opt(reason),
            ts(now),
            crate::store::Arg::Json(Some(extra_after.to_string())),
        ];
        args.extend_from_slice(delta_args);
        self.stmt(
            &format!(
                "INSERT INTO audit_log (id, actor_id, actor, action, target_type, target_id, before_json, after_json, reason, created_at) \
                 SELECT ?1, ?2, ?3, ?4, 'user', id, {before}, {after}, ?6, ?7 FROM users WHERE id = ?5"
            ),
            &args,
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
}
