//! Call routes: trigger now, schedule, cancel, history and detail.
//!
//! The route validates and writes the call row (with its credit reservation, atomically),
//! then hands the call to its `CallSession` Durable Object, which dials and owns the call
//! from there.

use cmb_core::calls::CallStatus;
use cmb_core::idempotency::Route;
use cmb_core::model::{LedgerKind, RequestedBy};
use serde::Deserialize;
use serde_json::json;
use worker::{Request, Response};

use crate::crypto;
use crate::error::{ApiError, ApiResult};
use crate::http::auth::{authenticate, Session};
use crate::http::booking::{destination, usable_persona};
use crate::http::idempotency::{self, Answer};
use crate::http::{json, parse_json, query};
use crate::session::client::{abandon, book_scheduled, Booking};
use crate::session::{session_op, CancelOutcome, SessionOp};
use crate::store::{CallRow, LedgerEntry, WriteConflict};
use crate::Ctx;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerBody {
    #[serde(alias = "personaId")]
    persona_id: String,
    #[serde(default, alias = "phoneNumber")]
    phone_number: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleBody {
    #[serde(alias = "personaId")]
    persona_id: String,
    #[serde(default, alias = "phoneNumber")]
    phone_number: Option<String>,
    #[serde(alias = "scheduledTime")]
    scheduled_time: String,
}

#[derive(Deserialize)]
struct HistoryQuery {
    limit: Option<i64>,
    offset: Option<i64>,
}

/// `POST /api/calls/trigger`, idempotent under an `Idempotency-Key`.
pub async fn trigger(req: Request, ctx: &Ctx) -> ApiResult<Response> {
    let work = async |session: &Session, raw: &[u8]| place_now(ctx, session, raw).await;
    idempotency::serve(req, ctx, Route::CallTrigger, work).await
}

async fn place_now(ctx: &Ctx, session: &Session, raw: &[u8]) -> Answer {
    let body: TriggerBody = parse_json(raw)?;
    let phone = destination(ctx, session, body.phone_number.as_deref())?;
    usable_persona(ctx, session, &body.persona_id).await?;

    let call_id = crypto::uuid().map_err(|e| ApiError::internal("uuid", e))?;
    let ledger_id = crypto::uuid().map_err(|e| ApiError::internal("uuid", e))?;
    let amount = cmb_core::pricing::MIN_CREDITS_TO_START;
    let mut call = CallRow::pending(
        call_id.clone(),
        &session.user.id,
        &body.persona_id,
        &phone,
        CallStatus::Queued,
        None,
        RequestedBy::User,
    );
    call.reserved_credits = amount;
    let key = format!("reserve:{call_id}");
    let reserve = LedgerEntry {
        id: &ledger_id,
        user_id: &session.user.id,
        kind: LedgerKind::Reserve,
        amount: -amount,
        key: &key,
        call_id: Some(&call_id),
        reason: "first minute",
    };
    let guard = crate::http::limits::daily_call_guard(ctx, &session.user)?;
    match ctx
        .store
        .insert_call_with_reservation(&call, &reserve, guard, &ctx.now_iso())
        .await?
    {
        Ok(()) => {}
        Err(WriteConflict::DailyLimit) => {
            return Err(crate::http::limits::daily_limit_error(ctx, &session.user))
        }
        Err(WriteConflict::LiveCall) => {
            return Err(ApiError::conflict(
                "call_in_progress",
                "You already have a call in progress.",
            ))
        }
        Err(WriteConflict::Check) => {
            let have = ctx.store.user_credits(&session.user.id).await?;
            return Err(ApiError::new(
                402,
                "insufficient_credits",
                format!("You need {amount} credits; you have {have}."),
            ));
        }
        Err(WriteConflict::Duplicate) => {
            return Err(ApiError::internal("trigger", "duplicate call id"))
        }
    }
    // As of the request (only Twilio's `TimeLimit` backstop depends on it).
    let balance = session.user.credits - amount;
    let op = SessionOp::Start {
        call_id: call_id.clone(),
        user_id: session.user.id.clone(),
        phone_number: phone,
        reserved: amount,
        balance,
        scheduled_at_ms: None,
    };
    if let Err(e) = session_op::<serde_json::Value>(ctx, &call_id, &op).await {
        // The row and reservation are in but the session never got the call: end it
        // here, releasing the reservation, rather than leave an orphan `queued` call.
        abandon(
            &ctx.store,
            &call_id,
            &session.user.id,
            amount,
            &ctx.now_iso(),
        )
        .await;
        return Err(e);
    }
    crate::log::info(
        "call_triggered",
        json!({ "request_id": ctx.request_id, "call_id": call_id, "user_id": session.user.id }),
    );
    let row = ctx
        .store
        .call(&call_id)
        .await?
        .ok_or_else(|| ApiError::not_found("Call"))?;
    Ok((201, json!({ "call": row })))
}

/// `POST /api/calls/schedule`, idempotent under an `Idempotency-Key`.
pub async fn schedule(req: Request, ctx: &Ctx) -> ApiResult<Response> {
    let work = async |session: &Session, raw: &[u8]| book(ctx, session, raw).await;
    idempotency::serve(req, ctx, Route::CallSchedule, work).await
}

async fn book(ctx: &Ctx, session: &Session, raw: &[u8]) -> Answer {
    let body: ScheduleBody = parse_json(raw)?;
    let phone = destination(ctx, session, body.phone_number.as_deref())?;
    // RFC 3339, in the future, at most 30 days ahead (`cmb_core::calls`); pending ones
    // are capped per tier below (`cmb_core::limits::pending_scheduled`).
    let at_secs = cmb_core::calls::parse_scheduled_time(&body.scheduled_time, ctx.now_secs())
        .map_err(|e| ApiError::from(e).with_code("invalid_scheduled_time"))?;
    usable_persona(ctx, session, &body.persona_id).await?;
    let booking = Booking {
        user: &session.user,
        persona_id: &body.persona_id,
        phone: &phone,
        at_ms: at_secs.unsigned_abs() * 1000, // after now, so positive
        requested_by: RequestedBy::User,
        schedule: None,
    };
    let row = book_scheduled(&ctx.env, &ctx.store, &booking, &ctx.now_iso()).await?;
    Ok((201, json!({ "call": row })))
}

/// Loads a call the session may see: its owner or an admin; 404 otherwise.
async fn visible_call(ctx: &Ctx, session: &Session, id: &str) -> ApiResult<CallRow> {
    match ctx.store.call(id).await? {
        Some(call) if call.user_id == session.user.id || session.is_admin() => Ok(call),
        _ => Err(ApiError::not_found("Call")),
    }
}

pub async fn cancel(req: &Request, ctx: &Ctx, id: &str) -> ApiResult<Response> {
    let session = authenticate(req, ctx).await?;
    let call = visible_call(ctx, &session, id).await?;
    if call.user_id != session.user.id {
        return Err(ApiError::not_found("Call"));
    }
    let outcome: CancelOutcome = session_op(ctx, id, &SessionOp::Cancel).await?;
    if !outcome.canceled {
        return Err(ApiError::conflict(
            "not_cancelable",
            format!(
                "Only scheduled or queued calls can be canceled; this one is {}.",
                outcome.status.as_str()
            ),
        ));
    }
    let row = ctx
        .store
        .call(id)
        .await?
        .ok_or_else(|| ApiError::not_found("Call"))?;
    json(200, &json!({ "call": row }))
}

pub async fn history(req: &Request, ctx: &Ctx) -> ApiResult<Response> {
    let session = authenticate(req, ctx).await?;
    let q: HistoryQuery = query(req)?;
    let limit = q.limit.unwrap_or(20);
    let offset = q.offset.unwrap_or(0);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "limit must be between 1 and 100.",
        ));
    }
    if offset < 0 {
        return Err(ApiError::bad_request(
            "invalid_query",
            "offset must not be negative.",
        ));
    }
    let (calls, total) = ctx
        .store
        .calls_for_user(&session.user.id, limit, offset)
        .await?;
    json(200, &json!({ "calls": calls, "total": total }))
}

pub async fn detail(req: &Request, ctx: &Ctx, id: &str) -> ApiResult<Response> {
    let session = authenticate(req, ctx).await?;
    let call = visible_call(ctx, &session, id).await?;
    let transcript: Vec<_> = ctx
        .store
        .transcript(id)
        .await?
        .into_iter()
        .map(|t| json!({ "role": t.role, "text": t.text, "at": t.at, "interrupted": t.interrupted != 0 }))
        .collect();
    let lines = ctx.store.costs(id).await?;
    let total_micros: i64 = lines.iter().map(|c| c.cost_micros).sum();
    let costs = json!({
        "credits_charged": call.cost_cents,
        "providers": lines,
        "total_cost_micros": total_micros,
    });
    // Per turn: end of the caller's turn -> first reply audio, and the LLM's first token.
    let latencies = ctx.store.latencies(id).await?;
    json(
        200,
        &json!({ "call": call, "transcript": transcript, "costs": costs, "latencies": latencies }),
    )
}
