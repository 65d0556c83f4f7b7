//! The admin API: users with balances and debt, ban and unban, credit grants, any call
//! with its transcript and economics, and the full persona catalog.
//!
//! Every route starts with [`require_admin`]: anonymous is 401, anyone else 403. The
//! admin role must still hold *now* (the stored role, which only an operator grants), not
//! just when the token was issued. Every change writes its audit row in the same
//! transaction as the change (`store/users.rs`). This module never touches a call's state directly: a
//! banned user's pending calls are canceled through each call's Durable Object.

pub mod analytics;
pub mod audit;
pub mod events;
pub mod mcp;

use cmb_core::calls::CallStatus;
use cmb_core::events::{kind as event_kind, Level};
use cmb_core::model::LedgerKind;
use cmb_core::validate;
use futures::future::join_all;
use serde::Deserialize;
use serde_json::{json, Value};
use worker::{Request, Response};

use self::audit::action;
use crate::crypto;
use crate::error::{ApiError, ApiResult};
use crate::http::auth::require_admin;
use crate::http::page;
use crate::http::{json, parse_json, query, read_body};
use crate::session::session_op;
use crate::session::{CancelOutcome, SessionOp};
use crate::store::{AdminUserRow, AuditEntry, CallsFilter};
use crate::store::{LedgerEntry, PersonaRow, WriteConflict};
use crate::Ctx;

/// Largest single grant or deduction: a typo should not mint a fortune.
const MAX_ADJUSTMENT: i64 = 1_000_000;
/// The largest balance an admin grant may build (far below 2^53, the largest integer
/// D1 carries exactly as a JS number).
const MAX_BALANCE: i64 = 1_000_000_000;
const REASON_MAX_CHARS: usize = 500;

fn user_view(u: &AdminUserRow) -> Value {
    json!({
        "id": u.id,
        "email": u.email,
        "name": u.name,
        "phone_number": u.phone_number,
        "role": u.role,
        "tier": u.tier,
        "credits": u.credits,
        "debt": u.debt,
        "is_banned": u.is_banned,
        "created_at": u.created_at,
        "erased_at": u.erased_at,
    })
}

async fn target_user(ctx: &Ctx, id: &str) -> ApiResult<AdminUserRow> {
    ctx.store
        .admin_user(id)
        .await?
        .ok_or_else(|| ApiError::not_found("User"))
}

fn new_id() -> ApiResult<String> {
    crypto::uuid().map_err(|e| ApiError::internal("uuid", e))
}

/// A free-text reason: trimmed, one line, at most 500 characters.
fn reason(input: &str) -> ApiResult<String> {
    Ok(validate::text("reason", input, 1, REASON_MAX_CHARS, false)?)
}

/// An optional reason; blank counts as none.
fn optional_reason(input: Option<&str>) -> ApiResult<Option<String>> {
    input
        .filter(|r| !r.trim().is_empty())
        .map(reason)
        .transpose()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersQuery {
    limit: Option<i64>,
    offset: Option<i64>,
    q: Option<String>,
}

/// `GET /admin/users?limit&offset&q=`: newest first; `q` matches email or name.
pub async fn users(req: &Request, ctx: &Ctx) -> ApiResult<Response> {
    require_admin(req, ctx).await?;
    let q: UsersQuery = query(req)?;
    let (limit, offset) = page(q.limit, q.offset)?;
    let search = q.q.as_deref().map(str::trim).filter(|s| !s.is_empty());
    // D1 refuses LIKE patterns over 50 bytes ("pattern too complex"): say so as a 400
    // rather than fail inside the database.
    if search.is_some_and(|s| crate::store::like_pattern(s).len() > 50) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "q is too long: search with at most 48 characters (e.g. part of the email).",
        ));
    }
    let (rows, total) = ctx.store.admin_users(search, limit, offset).await?;
    let users: Vec<Value> = rows.iter().map(user_view).collect();
    json(200, &json!({ "users": users, "total": total }))
}

/// `GET /admin/users/:id`: the user and their 50 latest ledger entries.
pub async fn user(req: &Request, ctx: &Ctx, id: &str) -> ApiResult<Response> {
    require_admin(req, ctx).await?;
    let user = target_user(ctx, id).await?;
    let ledger = ctx.store.ledger_of_user(id, 50).await?;
    json(200, &json!({ "user": user_view(&user), "ledger": ledger }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BanBody {
    reason: Option<String>,
}

/// The optional JSON body of ban/unban (an empty body is fine).
async fn ban_body(req: &mut Request) -> ApiResult<BanBody> {
    let body = read_body(req).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(BanBody::default());
    }
    parse_json(&body)
}

/// `POST /admin/users/:id/ban {reason?}`: the user's tokens stop working on their next
/// request (authentication reloads the user); through each call's Durable Object their
/// scheduled or queued calls are canceled and a ringing or live call is ended (a live
/// conversation with a short goodbye).
pub async fn ban(req: Request, ctx: &Ctx, id: &str) -> ApiResult<Response> {
    let session = set_banned(req, ctx, id, true).await?;
    crate::log::info(
        "user_banned",
        json!({ "request_id": ctx.request_id, "user_id": id, "by": session.user.id }),
    );

    // The ban already holds; stopping calls is best effort per call, reported per call.
    let unfinished = ctx.store.unfinished_calls(id).await?;
    let end = SessionOp::End {
        reason: "account_suspended".into(),
    };
    let end = &end;
    let outcomes = join_all(unfinished.iter().map(|call_id| async move {
        let outcome = session_op::<CancelOutcome>(ctx, call_id, end).await;
        (call_id, outcome)
    }))
    .await;
    let mut canceled = Vec::new();
    let mut ended = Vec::new();
    let mut not_canceled = Vec::new();
    for (call_id, outcome) in outcomes {
        match outcome {
            Ok(o) if o.canceled && o.status == CallStatus::Canceled => {
                canceled.push(json!(call_id))
            }
            Ok(o) if o.canceled => ended.push(json!(call_id)),
            Ok(o) => not_canceled.push(json!({ "id": call_id, "status": o.status.as_str() })),
            Err(e) => {
                crate::log::error(
                    "ban_cancel_failed",
                    json!({ "request_id": ctx.request_id, "call_id": call_id, "code": e.code, "cause": e.log_detail() }),
                );
                not_canceled.push(json!({ "id": call_id, "error": e.code }));
            }
        }
    }
    let user = target_user(ctx, id).await?;
    json(
        200,
        &json!({
            "user": user_view(&user),
            "canceled_calls": canceled,
            "ended_calls": ended,
            "not_canceled_calls": not_canceled,
        }),
    )
}

/// `POST /admin/users/:id/unban {reason?}`.
pub async fn unban(req: Request, ctx: &Ctx, id: &str) -> ApiResult<Response> {
    set_banned(req, ctx, id, false).await?;
    resume_schedules(ctx, id).await?;
    let user = target_user(ctx, id).await?;
    json(200, &json!({ "user": user_view(&user) }))
}

/// A reinstated account's active schedules that were skipped while it was suspended (the
/// ban canceled their pending attempts) book their next occurrence again.
async fn resume_schedules(ctx: &Ctx, user_id: &str) -> ApiResult<()> {
    let Some(user) = ctx.store.user_by_id(user_id).await? else {
        return Ok(());
    };
    let now = ctx.now_iso();
    for schedule in ctx.store.schedules(user_id).await? {
        if !schedule.is_active || schedule.pending_call_id.is_some() {
            continue;
        }
        let booked = crate::session::client::book_next_occurrence(
            &ctx.env, &ctx.cfg, &ctx.store, &schedule, &user, ctx.now_ms, &now,
        )
        .await?;
        crate::log::info(
            "schedule_resumed",
            json!({
                "request_id": ctx.request_id, "schedule_id": schedule.id,
                "skipped": booked.err().map(|e| e.code),
            }),
        );
    }
    Ok(())
}

/// What ban and unban share: an admin, the optional `{reason}` body, an existing target
/// (never the admin's own account for a ban), and the change with its audit row in one
/// transaction. Returns the admin's session.
async fn set_banned(
    mut req: Request,
    ctx: &Ctx,
    id: &str,
    banned: bool,
) -> ApiResult<crate::http::auth::Session> {
    let session = require_admin(&req, ctx).await?;
    let body = ban_body(&mut req).await?;
    let reason = optional_reason(body.reason.as_deref())?;
    if banned && id == session.user.id {
        return Err(ApiError::bad_request(
            "cannot_ban_self",
            "You cannot ban your own account.",
        ));
    }
    target_user(ctx, id).await?;
    let actor = audit::actor(&session);
    let audit_id = new_id()?;
    let entry = AuditEntry {
        id: &audit_id,
        actor: &actor,
        action: if banned {
            action::USER_BAN
        } else {
            action::USER_UNBAN
        },
        target_type: "user",
        target_id: Some(id),
        before: None,
        after: None,
        reason: reason.as_deref(),
    };
    ctx.store
        .set_banned(id, banned, &entry, &ctx.now_iso())
        .await?;
    let kind = if banned {
        event_kind::ADMIN_BAN
    } else {
        event_kind::ADMIN_UNBAN
    };
    let fields = json!({ "by": session.user.id, "by_email": session.user.email, "reason": reason });
    ctx.record(ctx.event(Level::Info, kind, fields).user(Some(id)))
        .await;
    Ok(session)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreditsBody {
    amount: i64,
    reason: String,
}

/// `POST /admin/users/:id/credits {amount, reason}`: a positive amount grants, a
/// negative one deducts (never below zero). An `Idempotency-Key` header makes a retried
/// request a no-op that answers the current state with `"replayed": true`.
pub async fn credits(mut req: Request, ctx: &Ctx, id: &str) -> ApiResult<Response> {
    let session = require_admin(&req, ctx).await?;
    let client_key = crate::http::idempotency_key(&req)?;
    let body: CreditsBody = crate::http::json_body(&mut req).await?;
    // A range check, not `abs()`: `i64::MIN` has no absolute value (and wraps in release).
    if body.amount == 0 || !(-MAX_ADJUSTMENT..=MAX_ADJUSTMENT).contains(&body.amount) {
        return Err(ApiError::bad_request(
            "invalid_amount",
            format!("amount must be a non-zero whole number of credits between -{MAX_ADJUSTMENT} and {MAX_ADJUSTMENT}."),
        )
        .with_details(json!([{ "field": "amount" }])));
    }
    let reason = reason(&body.reason)?;
    let target = target_user(ctx, id).await?;
    if body.amount > 0 && target.credits > MAX_BALANCE - body.amount {
        return Err(ApiError::bad_request(
            "invalid_amount",
            format!(
                "A balance may not exceed {MAX_BALANCE} credits; this user has {}.",
                target.credits
            ),
        )
        .with_details(json!([{ "field": "amount" }])));
    }
    let ledger_id = new_id()?;
    let key = match &client_key {
        Some(k) => format!("admin:{id}:{k}"),
        None => format!("admin:{ledger_id}"),
    };
    let entry = LedgerEntry {
        id: &ledger_id,
        user_id: id,
        kind: LedgerKind::for_adjustment(body.amount),
        amount: body.amount,
        key: &key,
        call_id: None,
        reason: &reason,
    };
    let actor = audit::actor(&session);
    let audit_id = new_id()?;
    let replayed = match ctx
        .store
        .admin_adjust_credits(&entry, &audit_id, &actor, &ctx.now_iso())
        .await?
    {
        Ok(()) => false,
        Err(WriteConflict::Duplicate) if client_key.is_some() => true,
        Err(WriteConflict::Check) => {
            let have = ctx.store.user_credits(id).await?;
            return Err(ApiError::conflict(
                "insufficient_credits",
                format!(
                    "Cannot deduct {} credits; the user has {have}.",
                    -body.amount
                ),
            ));
        }
        Err(e) => return Err(ApiError::internal("adjust credits", format!("{e:?}"))),
    };
    crate::log::info(
        "credits_adjusted",
        json!({ "request_id": ctx.request_id, "user_id": id, "amount": body.amount, "by": session.user.id, "replayed": replayed }),
    );
    if !replayed {
        let fields = json!({ "by": session.user.id, "by_email": session.user.email, "amount": body.amount, "reason": reason });
        ctx.record(
            ctx.event(Level::Info, event_kind::ADMIN_CREDITS, fields)
                .user(Some(id)),
        )
        .await;
    }
    let user = target_user(ctx, id).await?;
    json(
        200,
        &json!({ "user": user_view(&user), "replayed": replayed }),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallsQuery {
    limit: Option<i64>,
    offset: Option<i64>,
    user_id: Option<String>,
    status: Option<String>,
}

/// `GET /admin/calls?limit&offset&user_id&status`: any user's calls, newest first.
pub async fn calls(req: &Request, ctx: &Ctx) -> ApiResult<Response> {
    require_admin(req, ctx).await?;
    let q: CallsQuery = query(req)?;
    let (limit, offset) = page(q.limit, q.offset)?;
    let user_id = q.user_id.as_deref().filter(|s| !s.is_empty());
    let status = q.status.as_deref().filter(|s| !s.is_empty());
    let (calls, total) = ctx
        .store
        .admin_calls(
            &CallsFilter {
                user_id,
                status,
                from_day: None,
                to_day: None,
            },
            limit,
            offset,
        )
        .await?;
    json(200, &json!({ "calls": calls, "total": total }))
}

/// `GET /admin/calls/:id`: the call, its owner, transcript, what it cost us per
/// provider against what it earned, per-turn latencies and its ledger entries.
pub async fn call(req: &Request, ctx: &Ctx, id: &str) -> ApiResult<Response> {
    require_admin(req, ctx).await?;
    let detail = call_detail(ctx, id)
        .await?
        .ok_or_else(|| ApiError::not_found("Call"))?;
    json(200, &detail)
}

/// A call as operators see it (the admin route and the MCP tool `get_call`); `None`
/// when there is no such call.
pub async fn call_detail(ctx: &Ctx, id: &str) -> ApiResult<Option<Value>> {
    let Some(call) = ctx.store.admin_call(id).await? else {
        return Ok(None);
    };
    let transcript: Vec<Value> = ctx
        .store
        .transcript(id)
        .await?
        .into_iter()
        .map(|t| json!({ "role": t.role, "text": t.text, "at": t.at, "interrupted": t.interrupted != 0 }))
        .collect();
    let lines = ctx.store.costs(id).await?;
    let cost_micros: i64 = lines.iter().map(|c| c.cost_micros).sum();
    let revenue_micros = call.cost_cents.unwrap_or(0) * cmb_core::pricing::MICROS_PER_CREDIT;
    let costs = json!({
        "credits_charged": call.cost_cents,
        "providers": lines,
        "total_cost_micros": cost_micros,
        "revenue_micros": revenue_micros,
        "margin_micros": revenue_micros - cost_micros,
    });
    let latencies = ctx.store.latencies(id).await?;
    let ledger = ctx.store.ledger_of_call(id).await?;
    Ok(Some(json!({
        "call": call,
        "transcript": transcript,
        "costs": costs,
        "latencies": latencies,
        "ledger": ledger,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PersonasQuery {
    include_custom: Option<bool>,
}

/// `GET /admin/personas?include_custom=false`: the whole catalog, retired personas
/// included (changes go through `/api/personas`, which admits admins).
pub async fn personas(req: &Request, ctx: &Ctx) -> ApiResult<Response> {
    require_admin(req, ctx).await?;
    let q: PersonasQuery = query(req)?;
    let personas: Vec<_> = ctx
        .store
        .all_personas(q.include_custom.unwrap_or(false))
        .await?
        .iter()
        .map(PersonaRow::view)
        .collect();
    json(200, &json!({ "personas": personas }))
}
