//! The audit log of admin actions and money movements: who (actor), what (action on a
//! target), when, and the state before and after.
//!
//! Writers put the audit row in the same batch as the change (see `store_admin.rs`), so
//! a change is never recorded without happening or the reverse; this module owns the
//! action names, the actor of a session, and the admins' read route
//! (`GET /admin/audit?limit&offset&action&target_id&actor_id`). It never changes
//! anything but the log.

use serde::Deserialize;
use serde_json::{json, Value};
use worker::{Request, Response};

use crate::error::ApiResult;
use crate::http::auth::require_admin;
use crate::http::auth::Session;
use crate::http::page;
use crate::http::{json, query};
use crate::store::{Actor, AuditFilter, AuditRow};
use crate::Ctx;

/// Action names, stable for filtering.
pub mod action {
    pub const USER_BAN: &str = "user.ban";
    pub const USER_UNBAN: &str = "user.unban";
    // Also written by `store_admin`: `credits.grant`, `credits.deduct`,
    // `payment.purchase`, `payment.refund`.
}

/// The actor for an admin's session.
pub fn actor(session: &Session) -> Actor {
    Actor {
        id: Some(session.user.id.clone()),
        name: session.user.email.clone(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<i64>,
    offset: Option<i64>,
    action: Option<String>,
    target_id: Option<String>,
    actor_id: Option<String>,
}

/// Parses stored JSON text back into JSON (kept as a string if it ever fails to parse).
fn parse_state(text: Option<String>) -> Value {
    match text {
        None => Value::Null,
        Some(t) => serde_json::from_str(&t).unwrap_or(Value::String(t)),
    }
}

fn view(row: AuditRow) -> Value {
    json!({
        "id": row.id,
        "actor_id": row.actor_id,
        "actor": row.actor,
        "action": row.action,
        "target_type": row.target_type,
        "target_id": row.target_id,
        "before": parse_state(row.before_json),
        "after": parse_state(row.after_json),
        "reason": row.reason,
        "at": row.created_at,
    })
}

/// `GET /admin/audit`: newest first, with `total` for paging.
pub async fn list(req: &Request, ctx: &Ctx) -> ApiResult<Response> {
    require_admin(req, ctx).await?;
    let q: AuditQuery = query(req)?;
    let (limit, offset) = page(q.limit, q.offset)?;
    let filter = AuditFilter {
        action: q.action.as_deref().filter(|s| !s.is_empty()),
        target_id: q.target_id.as_deref().filter(|s| !s.is_empty()),
        actor_id: q.actor_id.as_deref().filter(|s| !s.is_empty()),
    };
    let (rows, total) = ctx.store.audit_entries(&filter, limit, offset).await?;
    let entries: Vec<Value> = rows.into_iter().map(view).collect();
    json(200, &json!({ "entries": entries, "total": total }))
}

#[cfg(test)]
// A panic in a test is that test's failure.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Stored states come back as JSON; a missing state is null.
    #[test]
    fn states_round_trip() {
        assert_eq!(parse_state(None), Value::Null);
        assert_eq!(
            parse_state(Some(r#"{"credits":5}"#.into())),
            json!({"credits": 5})
        );
        assert_eq!(parse_state(Some("not json".into())), json!("not json"));
    }
}
