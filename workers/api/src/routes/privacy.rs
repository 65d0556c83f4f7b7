//! The user controls their data: `GET /api/me/export` (everything the account holds, as
//! one JSON document) and `DELETE /api/me` (erasure).
//!
//! An erasure first stops everything that could still dial the account, through the same
//! paths the user's own cancellations take (each schedule deleted, then its pending
//! attempt canceled through its call's Durable Object; every other scheduled call
//! canceled through its own), and only then wipes the data in one transaction
//! (`store::privacy`); last, each settled call's Durable Object drops what it kept about
//! the caller. Who may erase is `cmb_core::privacy`. This module never writes SQL and
//! never touches a call's state but through its Durable Object.

use std::collections::BTreeMap;

use cmb_core::calls::CallStatus;
use cmb_core::privacy::{self, ErasureRefusal};
use cmb_core::schedule::Days;
use serde::Deserialize;
use serde_json::{json, Value};
use worker::{Request, Response};

use crate::crypto;
use crate::error::{ApiError, ApiResult};
use crate::http::auth::authenticate;
use crate::http::{json, no_content, parse_json, read_body};
use crate::session::client::cancel_pending;
use crate::session::{session_op, CancelOutcome, ForgetOutcome, SessionOp};
use crate::store::{Erasure, ExportData, ExportScheduleRow};
use crate::Ctx;

fn refused(why: ErasureRefusal) -> ApiError {
    ApiError::new(why.status(), why.code(), why.message())
}

/// `GET /api/me/export`: the account (as `GET /api/me` shows it), every call with its
/// transcript, the personas' memories, favourites, custom personas, schedules (deleted
/// ones too), purchases and ledger entries — never a password hash, a token or a secret.
/// Served as a download (`Content-Disposition: attachment`).
pub async fn export(req: &Request, ctx: &Ctx) -> ApiResult<Response> {
    let session = authenticate(req, ctx).await?;
    let data = ctx.store.export_data(&session.user.id).await?;
    let document = json!({
        "export": {
            "generated_at": ctx.now_iso(),
            "user": session.user.view(),
            "calls": calls_with_transcripts(&data)?,
            "memories": memories(&data),
            "favorites": data.favorites,
            "personas": data.personas.iter().map(|p| p.view()).collect::<Vec<_>>(),
            "schedules": data.schedules.iter().map(schedule_view).collect::<ApiResult<Vec<_>>>()?,
            "purchases": data.purchases,
            "ledger": data.ledger,
        }
    });
    let mut resp = json(200, &document)?;
    let headers = resp.headers_mut();
    headers.set(
        "content-disposition",
        &format!("attachment; filename=\"{}\"", privacy::EXPORT_FILENAME),
    )?;
    // Personal data: no shared cache may keep a copy.
    headers.set("cache-control", "no-store")?;
    Ok(resp)
}

/// Each call as `GET /api/calls/:id` shows it, with its transcript lines in order.
fn calls_with_transcripts(data: &ExportData) -> ApiResult<Vec<Value>> {
    let mut lines: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for t in &data.transcripts {
        lines.entry(t.call_id.as_str()).or_default().push(json!({
            "role": t.role, "text": t.text, "at": t.at, "interrupted": t.interrupted,
        }));
    }
    data.calls
        .iter()
        .map(|call| {
            let mut view =
                serde_json::to_value(call).map_err(|e| ApiError::internal("export call", e))?;
            view["transcript"] = Value::Array(lines.remove(call.id.as_str()).unwrap_or_default());
            Ok(view)
        })
        .collect()
}

/// Per persona, the shape of `GET /api/personas/:id/memory`.
fn memories(data: &ExportData) -> Vec<Value> {
    data.memories
        .iter()
        .map(|m| {
            json!({
                "persona_id": m.persona_id,
                "memory": {
                    "summary": m.summary,
                    "updated_at": m.updated_at,
                    "calls": m.calls,
                    "last_call_at": m.last_call_at,
                },
            })
        })
        .collect()
}

/// A schedule as `/api/schedules` shows it, plus when it was deleted.
fn schedule_view(row: &ExportScheduleRow) -> ApiResult<Value> {
    let days = u8::try_from(row.days)
        .ok()
        .and_then(Days::from_bits)
        .ok_or_else(|| ApiError::internal("export schedule", "stored days out of range"))?;
    Ok(json!({
        "id": row.id,
        "persona_id": row.persona_id,
        "time_of_day": row.time_of_day,
        "days": days.names(),
        "timezone": row.timezone,
        "retries": row.retries,
        "retry_after_minutes": row.retry_after_minutes,
        "active": row.is_active,
        "next_call_at": row.next_call_at,
        "pending_call_id": row.pending_call_id,
        "skipped_reason": row.skipped_reason,
        "deleted_at": row.deleted_at,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }))
}

/// The optional body of `DELETE /api/me`: empty, or an empty JSON object.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EraseBody {}

/// `DELETE /api/me`: erases the account's personal data; 204.
///
/// Refused, with nothing changed, for an admin (403 `admin_cannot_erase`) and while a
/// call is dialling, ringing or live (409 `call_in_progress`). Otherwise every schedule is
/// deleted and every pending call canceled first, so nothing ever dials the account
/// again; then one transaction wipes the rest (see `Store::erase_user` for what is kept
/// and why). Afterwards every token of the account is refused (401) and its email is free
/// for a new registration.
pub async fn erase(mut req: Request, ctx: &Ctx) -> ApiResult<Response> {
    let session = authenticate(&req, ctx).await?;
    let body = read_body(&mut req).await?;
    if !body.iter().all(u8::is_ascii_whitespace) {
        let _: EraseBody = parse_json(&body)?;
    }
    let user = &session.user;
    let unfinished = ctx.store.unfinished_call_statuses(&user.id).await?;
    privacy::may_erase(session.is_admin(), unfinished.iter().map(|(_, s)| *s)).map_err(refused)?;

    // Nothing may dial an erased account: schedules go first (so a canceled attempt books
    // no next one), then their pending attempts, then any other scheduled call. Each is
    // a whole operation of its own; should one of those calls have started dialling
    // since the check above, the answer is 409 with them done and the database not yet
    // erased (a retry once the call is over completes it).
    let now = ctx.now_iso();
    let schedules = ctx.store.schedules(&user.id).await?;
    if !schedules.is_empty() {
        ctx.store.delete_schedules_of(&user.id, &now).await?;
    }
    for schedule in &schedules {
        if !cancel_pending(&ctx.env, schedule).await? {
            return Err(refused(ErasureRefusal::CallInProgress));
        }
    }
    for (call_id, status) in ctx.store.unfinished_call_statuses(&user.id).await? {
        if status != CallStatus::Scheduled {
            return Err(refused(ErasureRefusal::CallInProgress));
        }
        let outcome: CancelOutcome = session_op(ctx, &call_id, &SessionOp::Cancel).await?;
        if !outcome.canceled && !outcome.status.is_final() {
            // It started dialling meanwhile.
            return Err(refused(ErasureRefusal::CallInProgress));
        }
    }

    let phones = ctx.store.verified_phones_first_of(&user.id).await?;
    let audit_id = crypto::uuid().map_err(|e| ApiError::internal("uuid", e))?;
    let erasure = Erasure {
        user_id: &user.id,
        email: &user.email,
        phones: &phones,
        audit_id: &audit_id,
        now: &now,
    };
    if !ctx.store.erase_user(&erasure).await? {
        // The batch's guard changed nothing: a concurrent erasure won (done, then), or a
        // call was booked or started since the checks above (try again).
        let erased = ctx
            .store
            .user_by_id(&user.id)
            .await?
            .is_some_and(|u| u.erased_at.is_some());
        if !erased {
            return Err(refused(ErasureRefusal::CallInProgress));
        }
    }
    let (forgotten, kept) = forget_in_sessions(ctx, &user.id).await;
    crate::log::info(
        "user_erased",
        json!({ "request_id": ctx.request_id, "user_id": user.id, "phones": phones.len(),
                "sessions_forgotten": forgotten, "sessions_not_forgotten": kept }),
    );
    no_content()
}

/// How many call sessions are asked to forget at once.
const FORGET_CONCURRENCY: usize = 8;

/// Each call's Durable Object keeps the call's state (the number, the conversation, the
/// persona's prompt with the caller's notes): once the database is erased, every settled
/// one drops it. Best effort, after the erasure has happened: a failure is logged per
/// call, never answered. Returns (forgotten, not forgotten).
async fn forget_in_sessions(ctx: &Ctx, user_id: &str) -> (usize, usize) {
    let ids = match ctx.store.call_ids_of(user_id).await {
        Ok(ids) => ids,
        Err(e) => {
            crate::log::error(
                "erase_sessions_unlisted",
                json!({ "request_id": ctx.request_id, "user_id": user_id, "cause": e.log_detail() }),
            );
            return (0, 0);
        }
    };
    let (mut forgotten, mut kept) = (0, 0);
    for chunk in ids.chunks(FORGET_CONCURRENCY) {
        let outcomes = futures::future::join_all(chunk.iter().map(|id| async move {
            (
                id,
                session_op::<ForgetOutcome>(ctx, id, &SessionOp::Forget).await,
            )
        }))
        .await;
        for (call_id, outcome) in outcomes {
            match outcome {
                Ok(ForgetOutcome { forgotten: true }) => forgotten += 1,
                Ok(ForgetOutcome { forgotten: false }) => {
                    kept += 1;
                    crate::log::warn(
                        "erase_session_not_settled",
                        json!({ "request_id": ctx.request_id, "call_id": call_id }),
                    );
                }
                Err(e) => {
                    kept += 1;
                    crate::log::error(
                        "erase_session_failed",
                        json!({ "request_id": ctx.request_id, "call_id": call_id, "code": e.code, "cause": e.log_detail() }),
                    );
                }
            }
        }
    }
    (forgotten, kept)
}
