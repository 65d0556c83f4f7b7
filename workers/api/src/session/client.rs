//! How the rest of the Worker reaches a call's Durable Object: one operation at a time
//! (`session_op`), or the relay's control channel handed over as a WebSocket
//! (`relay_session`). The DO itself is `session/mod.rs`.

use serde::Deserialize;
use worker::{Method, Request, RequestInit, Response};

use cmb_core::calls::CallStatus;
use cmb_core::model::{LedgerKind, RequestedBy};
use serde_json::json;

use crate::config;
use crate::error::{ApiError, ApiResult};
use crate::session::SessionOp;
use crate::store::{CallRow, LedgerEntry, ScheduleRow, Store, UserRow, WriteConflict};
use crate::Ctx;

/// Sends one operation to the call's Durable Object.
pub async fn session_op<T: for<'de> Deserialize<'de>>(
    ctx: &Ctx,
    call_id: &str,
    op: &SessionOp,
) -> ApiResult<T> {
    session_op_in(&ctx.env, call_id, op).await
}

/// [`session_op`] from anywhere with the bindings (a call's own DO booking another).
pub async fn session_op_in<T: for<'de> Deserialize<'de>>(
    env: &worker::Env,
    call_id: &str,
    op: &SessionOp,
) -> ApiResult<T> {
    let stub = stub(env, call_id)?;
    let body = serde_json::to_string(op).map_err(|e| ApiError::internal("encode op", e))?;
    let mut init = RequestInit::new();
    init.with_method(Method::Post).with_body(Some(body.into()));
    let req = Request::new_with_init("https://call-session/op", &init)?;
    let mut resp = stub
        .fetch_with_request(req)
        .await
        .map_err(|e| ApiError::internal("do fetch", e))?;
    if resp.status_code() != 200 {
        let text = resp
            .text()
            .await
            .map_err(|e| ApiError::internal("call session reply", e))?;
        return Err(ApiError::from_internal_reply(
            "call session",
            resp.status_code(),
            &text,
        ));
    }
    resp.json()
        .await
        .map_err(|e| ApiError::internal("do reply", e))
}

/// The relay's control channel for one call: authenticated with `RELAY_SECRET`, then
/// handed to the call's Durable Object, which accepts the WebSocket.
pub async fn relay_session(req: Request, ctx: &Ctx, call_id: &str) -> ApiResult<Response> {
    crate::http::auth::require_relay(&req, ctx)?;
    let upgrade = req
        .headers()
        .get("upgrade")
        .ok()
        .flatten()
        .unwrap_or_default();
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return Err(ApiError::new(
            426,
            "upgrade_required",
            "This endpoint is a WebSocket.",
        ));
    }
    if ctx.store.call(call_id).await?.is_none() {
        return Err(ApiError::not_found("Call"));
    }
    let stub = stub(&ctx.env, call_id)?;
    Ok(stub.fetch_with_request(req).await?)
}

/// A scheduled call to book: who, to which number, with which persona, when, and who
/// asked for it.
pub struct Booking<'a> {
    pub user: &'a UserRow,
    pub persona_id: &'a str,
    pub phone: &'a str,
    pub at_ms: u64,
    pub requested_by: RequestedBy,
    /// The schedule it is an attempt of, and which attempt (0: the occurrence itself).
    pub schedule: Option<(&'a str, i64)>,
}

/// Books a scheduled call: its row, under the tier's pending cap and the daily limit of
/// the UTC day it will dial (one transaction), then its session (which reserves credits
/// and re-checks the verified number at dial time). `POST /api/calls/schedule` and a
/// persona's `schedule_callback` share it; refusals are the API's errors.
pub async fn book_scheduled(
    env: &worker::Env,
    store: &Store,
    b: &Booking<'_>,
    now: &str,
) -> ApiResult<CallRow> {
    let call_id = crate::crypto::uuid().map_err(|e| ApiError::internal("uuid", e))?;
    let mut call = CallRow::pending(
        call_id.clone(),
        &b.user.id,
        b.persona_id,
        b.phone,
        CallStatus::Scheduled,
        Some(crate::iso_from_millis(b.at_ms)),
        b.requested_by,
    );
    if let Some((schedule_id, attempt)) = b.schedule {
        call.schedule_id = Some(schedule_id.to_owned());
        call.attempt = attempt;
    }
    let at_secs = i64::try_from(b.at_ms / 1000).unwrap_or(i64::MAX);
    let (day, _) = crate::http::limits::utc_day(at_secs);
    let cap = crate::http::limits::calls_per_day(b.user.tier);
    let max_pending = cmb_core::limits::pending_scheduled(b.user.tier);
    match store
        .insert_scheduled_call(&call, max_pending, &day, cap, now)
        .await?
    {
        Ok(true) => {}
        Ok(false) => {
            return Err(ApiError::new(
                429,
                "too_many_scheduled_calls",
                format!(
                    "Your {} plan can have at most {max_pending} scheduled calls.",
                    b.user.tier
                ),
            )
            .with_details(json!({ "limit": max_pending, "tier": b.user.tier })))
        }
        Err(WriteConflict::DailyLimit) => {
            return Err(crate::http::limits::day_full_error(b.user, &day))
        }
        // `calls_one_pending_per_schedule`: another booking of this schedule won.
        Err(WriteConflict::Duplicate) if b.schedule.is_some() => {
            return Err(ApiError::conflict(
                SCHEDULE_BUSY,
                "This schedule is being changed by another request; try again.",
            ))
        }
        Err(e) => return Err(ApiError::internal("schedule", format!("{e:?}"))),
    }
    let op = SessionOp::Start {
        call_id: call_id.clone(),
        user_id: b.user.id.clone(),
        phone_number: b.phone.to_owned(),
        reserved: 0,
        balance: 0,
        scheduled_at_ms: Some(b.at_ms),
    };
    if let Err(e) = session_op_in::<serde_json::Value>(env, &call_id, &op).await {
        abandon(store, &call_id, &b.user.id, 0, now).await;
        return Err(e);
    }
    store
        .call(&call_id)
        .await?
        .ok_or_else(|| ApiError::internal("schedule", "the booked call is gone"))
}

/// The code of a booking that lost to another booking of the same schedule.
const SCHEDULE_BUSY: &str = "schedule_busy";

/// Books `schedule`'s attempt `(at_ms, attempt)` for `user`, and records on the schedule
/// the call now pending (with `note`, why the last one was not placed, if it was not),
/// or why this occurrence was skipped (no verified phone, an erased or suspended account, a persona
/// no longer available, or a booking limit). `Ok(Err(_))` is that refusal, in the API's
/// terms; `Err` a failure of ours.
#[allow(clippy::too_many_arguments)]
pub async fn book_attempt(
    env: &worker::Env,
    cfg: &cmb_core::config::WorkerConfig,
    store: &Store,
    schedule: &ScheduleRow,
    user: &UserRow,
    (at_ms, attempt): (u64, i64),
    note: Option<&str>,
    now: &str,
) -> ApiResult<Result<CallRow, ApiError>> {
    let skip = |why: &str, code: &'static str| ApiError::new(409, code, why.to_owned());
    let refusal = if user.erased_at.is_some() {
        Some(skip("The account was erased.", "account_erased"))
    } else if user.is_banned {
        Some(skip("The account is suspended.", "account_suspended"))
    } else if !store
        .persona(&schedule.persona_id)
        .await?
        .is_some_and(|p| p.usable_by(&user.id))
    {
        Some(skip(
            "The schedule's persona is no longer available.",
            "invalid_persona",
        ))
    } else {
        None
    };
    let phone =
        cmb_core::destination::for_call(None, user.verified_phone(), &cfg.allowed_countries);
    let outcome = match (refusal, phone) {
        (Some(refused), _) => Err(refused),
        (None, Err(_)) => Err(skip(
            "The account has no verified phone number we can call.",
            "phone_not_verified",
        )),
        (None, Ok(phone)) => {
            let booking = Booking {
                user,
                persona_id: &schedule.persona_id,
                phone: &phone,
                at_ms,
                requested_by: RequestedBy::Schedule,
                schedule: Some((&schedule.id, attempt)),
            };
            match book_scheduled(env, store, &booking, now).await {
                Ok(row) => Ok(row),
                // Another booking of this schedule won the race: the schedule row is its
                // to write.
                Err(e) if e.code == SCHEDULE_BUSY => return Ok(Err(e)),
                Err(e) if e.status < 500 => Err(e),
                Err(e) => return Err(e),
            }
        }
    };
    match &outcome {
        Ok(row) => {
            let at = row.scheduled_time.as_deref().unwrap_or_default();
            store
                .set_schedule_pending(&schedule.id, Some((&row.id, at)), note, now)
                .await?;
        }
        Err(e) => {
            store
                .set_schedule_pending(&schedule.id, None, Some(&e.message), now)
                .await?;
        }
    }
    Ok(outcome)
}

/// Books `schedule`'s next occurrence after `now_ms` as its attempt 0
/// ([`book_following`]): when a schedule is made, changed or resumed, and when its
/// account is reinstated.
#[allow(clippy::too_many_arguments)]
pub async fn book_next_occurrence(
    env: &worker::Env,
    cfg: &cmb_core::config::WorkerConfig,
    store: &Store,
    schedule: &ScheduleRow,
    user: &UserRow,
    now_ms: u64,
    now: &str,
) -> ApiResult<Result<CallRow, ApiError>> {
    let at = occurrence_after(schedule, now_ms)?;
    book_following(env, cfg, store, schedule, user, (at, 0), None, now).await
}

/// The schedule's first occurrence after `after_ms`.
fn occurrence_after(schedule: &ScheduleRow, after_ms: u64) -> ApiResult<u64> {
    use cmb_core::schedule::{next_occurrence, Days, TimeOfDay};
    let stored = |what: &str| {
        ApiError::internal(
            "schedule",
            format!("stored {what} does not parse: {}", schedule.id),
        )
    };
    let time = TimeOfDay::parse(&schedule.time_of_day).map_err(|_| stored("time_of_day"))?;
    let days = u8::try_from(schedule.days)
        .ok()
        .and_then(Days::from_bits)
        .ok_or_else(|| stored("days"))?;
    let after = i64::try_from(after_ms).unwrap_or(i64::MAX);
    next_occurrence(time, days, &schedule.timezone, after)
        .and_then(|ms| u64::try_from(ms).ok())
        .ok_or_else(|| stored("timezone"))
}

/// How many occurrences in a row a full day may skip: a week of them.
const FULL_DAYS_SKIPPED: usize = 7;

/// [`book_attempt`], moving on while the day it would dial already has the tier's daily
/// calls (the user's own calls that day, or retries that used them): that occurrence (or
/// retry) is skipped, the reason kept on the schedule, and the next occurrence is tried,
/// so a busy day never stops a schedule. Any other refusal is final.
#[allow(clippy::too_many_arguments)]
pub async fn book_following(
    env: &worker::Env,
    cfg: &cmb_core::config::WorkerConfig,
    store: &Store,
    schedule: &ScheduleRow,
    user: &UserRow,
    (mut at_ms, mut attempt): (u64, i64),
    note: Option<&str>,
    now: &str,
) -> ApiResult<Result<CallRow, ApiError>> {
    let mut note = note.map(str::to_owned);
    let mut tries = 0;
    loop {
        let outcome = book_attempt(
            env,
            cfg,
            store,
            schedule,
            user,
            (at_ms, attempt),
            note.as_deref(),
            now,
        )
        .await?;
        match outcome {
            Err(full)
                if full.code == crate::http::limits::DAY_FULL && tries < FULL_DAYS_SKIPPED =>
            {
                tries += 1;
                at_ms = occurrence_after(schedule, at_ms)?;
                attempt = 0;
                note = Some(full.message);
            }
            other => return Ok(other),
        }
    }
}

/// Cancels the schedule's pending attempt, if it has one still waiting; false when it
/// could not be (it is already dialling or live: it runs, and the schedule's changes
/// apply from the next occurrence).
pub async fn cancel_pending(env: &worker::Env, schedule: &ScheduleRow) -> ApiResult<bool> {
    let Some(call_id) = &schedule.pending_call_id else {
        return Ok(true);
    };
    let outcome: crate::session::CancelOutcome =
        session_op_in(env, call_id, &SessionOp::Cancel).await?;
    Ok(outcome.canceled || outcome.status.is_final())
}

/// Ends a call whose session could not be started, releasing what it reserved (the same
/// ledger key the session would use, so this can never release twice).
pub async fn abandon(store: &Store, call_id: &str, user_id: &str, reserved: i64, now: &str) {
    let Ok(id) = crate::crypto::uuid() else {
        return;
    };
    let key = format!("release:{call_id}");
    let reason = "The call could not be started; nothing was charged.";
    let release = LedgerEntry {
        id: &id,
        user_id,
        kind: LedgerKind::Release,
        amount: reserved,
        key: &key,
        call_id: Some(call_id),
        reason,
    };
    let result = store
        .end_call_unconnected(call_id, "failed", reason, Some(&release), now)
        .await;
    if !matches!(result, Ok(Ok(()))) {
        crate::log::error("abandon_failed", json!({ "call_id": call_id }));
    }
}

/// The stub of `call_id`'s Durable Object (one per call, named by the call id).
fn stub(env: &worker::Env, call_id: &str) -> ApiResult<worker::Stub> {
    let ns = env
        .durable_object(config::CALL_SESSION_BINDING)
        .map_err(|e| ApiError::internal("do binding", e))?;
    ns.id_from_name(call_id)
        .and_then(|id| id.get_stub())
        .map_err(|e| ApiError::internal("do stub", e))
}
