//! Recurring schedules (`/api/schedules`): "every weekday at 07:00 in my time zone".
//!
//! The route validates (`cmb_core::schedule`, `cmb_core::tz`), writes the schedule, and
//! books its next attempt as an ordinary scheduled call (`session::client::book_next_occurrence`,
//! the same booking as `POST /api/calls/schedule`). When an attempt settles, its session
//! books the retry or the next occurrence.

use cmb_core::idempotency::Route;
use cmb_core::schedule::{self, Days, TimeOfDay};
use serde::Deserialize;
use serde_json::{json, Value};
use worker::{Request, Response};

use crate::error::{ApiError, ApiResult};
use crate::http::auth::{authenticate, Session};
use crate::http::booking::{destination, usable_persona};
use crate::http::idempotency::{self, Answer};
use crate::http::{json, json_body, no_content, parse_json};
use crate::session::client::{book_next_occurrence, cancel_pending};
use crate::store::{ScheduleRow, ScheduleWrite};
use crate::Ctx;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    persona_id: String,
    time_of_day: String,
    #[serde(default)]
    days: Option<Vec<String>>,
    /// The account's time zone when left out.
    #[serde(default)]
    timezone: Option<String>,
    #[serde(default)]
    retries: Option<i64>,
    #[serde(default)]
    retry_after_minutes: Option<i64>,
    #[serde(default)]
    active: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    #[serde(default)]
    persona_id: Option<String>,
    #[serde(default)]
    time_of_day: Option<String>,
    #[serde(default)]
    days: Option<Vec<String>>,
    #[serde(default)]
    timezone: Option<String>,
    #[serde(default)]
    retries: Option<i64>,
    #[serde(default)]
    retry_after_minutes: Option<i64>,
    #[serde(default)]
    active: Option<bool>,
}

/// A schedule's fields, validated.
struct Fields {
    persona_id: String,
    time: TimeOfDay,
    days: Days,
    timezone: String,
    retries: u32,
    retry_after_minutes: u32,
    active: bool,
}

impl Fields {
    fn write<'a>(&'a self, time_of_day: &'a str) -> ScheduleWrite<'a> {
        ScheduleWrite {
            persona_id: &self.persona_id,
            time_of_day,
            days: i64::from(self.days.bits()),
            timezone: &self.timezone,
            retries: i64::from(self.retries),
            retry_after_minutes: i64::from(self.retry_after_minutes),
            is_active: self.active,
        }
    }
}

/// Validates every field before anything is written; `base` is the schedule a PATCH
/// changes.
fn fields(
    ctx: &Ctx,
    session: &Session,
    body: PatchBody,
    base: Option<&ScheduleRow>,
) -> ApiResult<Fields> {
    let time = match (&body.time_of_day, base) {
        (Some(t), _) => TimeOfDay::parse(t)?,
        (None, Some(b)) => TimeOfDay::parse(&b.time_of_day)?,
        (None, None) => TimeOfDay::parse("")?,
    };
    let days = match (&body.days, base) {
        (Some(d), _) => Days::parse(d)?,
        (None, Some(b)) => stored_days(b)?,
        (None, None) => Days::ALL,
    };
    let timezone = match (&body.timezone, base) {
        (Some(z), _) => cmb_core::tz::parse(z)?,
        (None, Some(b)) => b.timezone.clone(),
        (None, None) => match session.user.timezone.as_deref() {
            Some(z) => cmb_core::tz::parse(z)?,
            None => {
                return Err(ApiError::bad_request(
                    cmb_core::tz::INVALID_TIMEZONE,
                    "timezone is required (an IANA name, e.g. Europe/London), or set one on your account (PATCH /api/me).",
                )
                .with_details(json!([{ "field": "timezone" }])))
            }
        },
    };
    let retries = match (body.retries, base) {
        (None, Some(b)) => u32::try_from(b.retries).unwrap_or(0),
        (given, _) => schedule::retries(given)?,
    };
    let retry_after_minutes = match (body.retry_after_minutes, base) {
        (None, Some(b)) => u32::try_from(b.retry_after_minutes).unwrap_or(0),
        (given, _) => schedule::retry_after_minutes(given, ctx.cfg.schedule_min_retry_minutes)?,
    };
    let persona_id = match (body.persona_id, base) {
        (Some(p), _) => p,
        (None, Some(b)) => b.persona_id.clone(),
        (None, None) => String::new(),
    };
    Ok(Fields {
        persona_id,
        time,
        days,
        timezone,
        retries,
        retry_after_minutes,
        active: body.active.or(base.map(|b| b.is_active)).unwrap_or(true),
    })
}

fn stored_days(row: &ScheduleRow) -> ApiResult<Days> {
    u8::try_from(row.days)
        .ok()
        .and_then(Days::from_bits)
        .ok_or_else(|| {
            ApiError::internal(
                "schedule",
                format!("stored days out of range: {}", row.days),
            )
        })
}

/// The API's view of a schedule.
fn view(row: &ScheduleRow) -> ApiResult<Value> {
    Ok(json!({
        "id": row.id,
        "persona_id": row.persona_id,
        "time_of_day": row.time_of_day,
        "days": stored_days(row)?.names(),
        "timezone": row.timezone,
        "retries": row.retries,
        "retry_after_minutes": row.retry_after_minutes,
        "active": row.is_active,
        "next_call_at": row.next_call_at,
        "pending_call_id": row.pending_call_id,
        "skipped_reason": row.skipped_reason,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }))
}

/// Books the schedule's next occurrence from now ([`book_next_occurrence`]).
async fn book_next(
    ctx: &Ctx,
    session: &Session,
    row: &ScheduleRow,
    now: &str,
) -> ApiResult<Result<crate::store::CallRow, ApiError>> {
    book_next_occurrence(
        &ctx.env,
        &ctx.cfg,
        &ctx.store,
        row,
        &session.user,
        ctx.now_ms,
        now,
    )
    .await
}

async fn owned(ctx: &Ctx, session: &Session, id: &str) -> ApiResult<ScheduleRow> {
    ctx.store
        .schedule(&session.user.id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("Schedule"))
}

pub async fn list(req: &Request, ctx: &Ctx) -> ApiResult<Response> {
    let session = authenticate(req, ctx).await?;
    let rows = ctx.store.schedules(&session.user.id).await?;
    let views = rows.iter().map(view).collect::<ApiResult<Vec<_>>>()?;
    json(200, &json!({ "schedules": views }))
}

/// `POST /api/schedules`, idempotent under an `Idempotency-Key`.
pub async fn create(req: Request, ctx: &Ctx) -> ApiResult<Response> {
    let work = async |session: &Session, raw: &[u8]| create_schedule(ctx, session, raw).await;
    idempotency::serve(req, ctx, Route::ScheduleCreate, work).await
}

async fn create_schedule(ctx: &Ctx, session: &Session, raw: &[u8]) -> Answer {
    let body: CreateBody = parse_json(raw)?;
    let body = PatchBody {
        persona_id: Some(body.persona_id),
        time_of_day: Some(body.time_of_day),
        days: body.days,
        timezone: body.timezone,
        retries: body.retries,
        retry_after_minutes: body.retry_after_minutes,
        active: body.active,
    };
    let f = fields(ctx, session, body, None)?;
    usable_persona(ctx, session, &f.persona_id).await?;
    destination(ctx, session, None)?;
    let id = crate::crypto::uuid().map_err(|e| ApiError::internal("uuid", e))?;
    let time = f.time.to_string();
    let now = ctx.now_iso();
    ctx.store
        .insert_schedule(&id, &session.user.id, &f.write(&time), &now)
        .await?;
    if f.active {
        let row = owned(ctx, session, &id).await?;
        match book_next(ctx, session, &row, &now).await {
            Ok(Ok(_)) => {}
            // The first occurrence cannot be booked (a limit): nothing is kept.
            Ok(Err(refused)) => {
                ctx.store.delete_schedule(&id, &now).await?;
                return Err(refused);
            }
            Err(e) => {
                ctx.store.delete_schedule(&id, &now).await?;
                return Err(e);
            }
        }
    }
    let row = owned(ctx, session, &id).await?;
    crate::log::info(
        "schedule_created",
        json!({ "request_id": ctx.request_id, "user_id": session.user.id, "schedule_id": id }),
    );
    Ok((201, json!({ "schedule": view(&row)? })))
}

pub async fn update(mut req: Request, ctx: &Ctx, id: &str) -> ApiResult<Response> {
    let session = authenticate(&req, ctx).await?;
    let row = owned(ctx, &session, id).await?;
    let body: PatchBody = json_body(&mut req).await?;
    let changes_persona = body.persona_id.is_some();
    let f = fields(ctx, &session, body, Some(&row))?;
    if changes_persona {
        usable_persona(ctx, &session, &f.persona_id).await?;
    }
    let now = ctx.now_iso();
    let time = f.time.to_string();
    // The pending attempt was booked under the old settings. It is detached first (so
    // its session, once it settles, books nothing), then canceled; one already dialling
    // runs to its end on its own.
    ctx.store.update_schedule(id, &f.write(&time), &now).await?;
    ctx.store.set_schedule_pending(id, None, None, &now).await?;
    cancel_pending(&ctx.env, &row).await?;
    if f.active {
        let row = owned(ctx, &session, id).await?;
        // A refusal is kept as the schedule's `skipped_reason`; the change stands.
        let booked = book_next(ctx, &session, &row, &now).await?;
        if let Err(refused) = booked {
            crate::log::info(
                "schedule_skipped",
                json!({ "request_id": ctx.request_id, "schedule_id": id, "code": refused.code }),
            );
        }
    }
    let row = owned(ctx, &session, id).await?;
    json(200, &json!({ "schedule": view(&row)? }))
}

pub async fn delete(req: &Request, ctx: &Ctx, id: &str) -> ApiResult<Response> {
    let session = authenticate(req, ctx).await?;
    let row = owned(ctx, &session, id).await?;
    // Deleted first, so the canceled attempt's session books nothing after it.
    ctx.store.delete_schedule(id, &ctx.now_iso()).await?;
    if !cancel_pending(&ctx.env, &row).await? {
        crate::log::info(
            "schedule_deleted_during_attempt",
            json!({ "request_id": ctx.request_id, "schedule_id": id, "call_id": row.pending_call_id }),
        );
    }
    no_content()
}
