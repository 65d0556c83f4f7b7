//! Exact limits, counted in the database: calls per UTC day by tier, and request rate
//! limits on the auth and verification routes. The numbers, the windows and what a count
//! means are `cmb_core::limits`; this module takes the slots and words the refusals.
//! Each refusal is a 429 with `retry_after` seconds (in the error's `details` and,
//! through `ApiError`, a `Retry-After` header).
//!
//! Counts live in D1/Postgres, never in KV (eventually consistent): the daily call
//! counter is bumped in the same batch as the call insert, and a rate-limit hit is one
//! upsert that returns the new count. It never decides anything about credits.
//!
//! The client IP is `CF-Connecting-IP`, which Cloudflare's edge sets (and `wrangler dev`
//! sets when the client did not). Without it every client shares one `unknown` bucket.

use cmb_core::limits::{
    self as policy, RateLimit, DAY_SECS, LOGIN_FAILURES_PER_ACCOUNT, LOGIN_FAILURES_PER_ACCOUNT_IP,
    LOGIN_FAILURES_PER_IP, LOGIN_SLOWED_ACCOUNT, REGISTRATIONS_PER_IP, VERIFICATIONS_PER_ACCOUNT,
    VERIFICATIONS_PER_IP,
};
pub use cmb_core::limits::{calls_per_day, utc_day};
use serde_json::json;
use worker::Request;

use crate::error::{ApiError, ApiResult};
use crate::store::{Bound, UserRow};
use crate::Ctx;

fn too_many(message: String, retry_after: i64, extra: serde_json::Value) -> ApiError {
    let mut details = json!({ "retry_after": retry_after });
    if let (Some(d), Some(extra)) = (details.as_object_mut(), extra.as_object()) {
        d.extend(extra.clone());
    }
    ApiError::new(429, "rate_limited", message).with_details(details)
}

/// The client's IP as the edge reports it.
pub fn client_ip(req: &Request) -> String {
    req.headers()
        .get("cf-connecting-ip")
        .ok()
        .flatten()
        .map(|ip| ip.trim().to_string())
        .filter(|ip| !ip.is_empty() && ip.len() <= 64)
        .unwrap_or_else(|| "unknown".into())
}

/// A slot taken in one window, which a success may give back.
#[derive(Debug, Clone)]
struct Slot {
    key: String,
    window_start: i64,
}

/// Counts one hit of `limit` for `subject`: the slot, the count including this hit and
/// the seconds until the window ends.
async fn hit(ctx: &Ctx, limit: RateLimit, subject: &str) -> ApiResult<(Slot, i64, i64)> {
    let (window_start, retry_after) = policy::window(ctx.now_secs(), limit.window_secs);
    let key = format!("{}:{subject}", limit.name);
    let count = ctx.store.hit_rate_limit(&key, window_start).await?;
    // Housekeeping: the first hit of a window clears windows that ended a day ago.
    if count == 1 {
        ctx.store.prune_rate_limits(window_start - DAY_SECS).await?;
    }
    Ok((Slot { key, window_start }, count, retry_after))
}

/// Takes one slot of `limit` for `subject`, or refuses with 429 when the window is full.
async fn take(ctx: &Ctx, limit: RateLimit, subject: &str, what: &str) -> ApiResult<Slot> {
    let (slot, count, retry_after) = hit(ctx, limit, subject).await?;
    if count > limit.limit {
        crate::log::warn(
            "rate_limited",
            json!({ "request_id": ctx.request_id, "limit": limit.name, "count": count }),
        );
        return Err(too_many(
            format!("Too many {what}. Try again in {retry_after} seconds."),
            retry_after,
            json!({ "limit": limit.limit, "window_seconds": limit.window_secs }),
        ));
    }
    Ok(slot)
}

/// Slots held by a login attempt until it is known to have succeeded.
#[must_use = "call `succeeded` after a good password, or the attempt counts as a failure"]
pub struct LoginAttempt {
    ip: String,
    slots: Vec<Slot>,
}

impl LoginAttempt {
    /// The password was right: the attempt was not a failure, so its slots are given
    /// back, and this address becomes the owner's last one (never slowed down).
    pub async fn succeeded(self, ctx: &Ctx, user_id: &str) -> ApiResult<()> {
        for slot in &self.slots {
            ctx.store
                .unhit_rate_limit(&slot.key, slot.window_start)
                .await?;
        }
        ctx.store.set_last_login_ip(user_id, &self.ip).await
    }
}

/// Admits a login attempt for `email` (normalised; `None` when it cannot be an
/// account's, so only the IP limit applies) whose account, if any, is `account`. See
/// `cmb_core::limits` for the policy: per IP, per account and IP, and a slow-down of the
/// account that spares its owner's last address. An unknown email is counted like a
/// real one.
pub async fn login_attempt(
    req: &Request,
    ctx: &Ctx,
    email: Option<&str>,
    account: Option<&UserRow>,
) -> ApiResult<LoginAttempt> {
    let ip = client_ip(req);
    let mut slots = vec![take(ctx, LOGIN_FAILURES_PER_IP, &ip, "failed logins").await?];
    if let Some(email) = email {
        let pair = format!("{email}|{ip}");
        slots.push(
            take(
                ctx,
                LOGIN_FAILURES_PER_ACCOUNT_IP,
                &pair,
                "failed logins for this account",
            )
            .await?,
        );
        let (slot, failures, _) = hit(ctx, LOGIN_FAILURES_PER_ACCOUNT, email).await?;
        slots.push(slot);
        let owners_ip = account.and_then(|u| u.last_login_ip.as_deref()) == Some(ip.as_str());
        if policy::login_slowed(failures, owners_ip) {
            slots.push(
                take(
                    ctx,
                    LOGIN_SLOWED_ACCOUNT,
                    email,
                    "sign-in attempts for this account",
                )
                .await?,
            );
        }
    }
    Ok(LoginAttempt { ip, slots })
}

/// Admits a registration from the request's client IP.
pub async fn registration(req: &Request, ctx: &Ctx) -> ApiResult<()> {
    take(
        ctx,
        REGISTRATIONS_PER_IP,
        &client_ip(req),
        "sign-ups from your network",
    )
    .await?;
    Ok(())
}

/// Admits the start of an SMS verification for `user`, per account and per client IP.
pub async fn verification_start(req: &Request, ctx: &Ctx, user: &UserRow) -> ApiResult<()> {
    take(
        ctx,
        VERIFICATIONS_PER_IP,
        &client_ip(req),
        "verification codes from your network",
    )
    .await?;
    take(
        ctx,
        VERIFICATIONS_PER_ACCOUNT,
        &user.id,
        "verification codes for this account",
    )
    .await?;
    Ok(())
}

/// The statement that counts one more triggered call for `user` today; it goes in the
/// same batch as the call insert and aborts it with `WriteConflict::DailyLimit` when
/// the tier's cap is reached.
pub fn daily_call_guard<'a>(ctx: &'a Ctx, user: &UserRow) -> ApiResult<Bound<'a>> {
    let (day, _) = utc_day(ctx.now_secs());
    ctx.store
        .daily_call_stmt(&user.id, &day, calls_per_day(user.tier))
}

/// The 429 for a user whose daily call cap is reached; retry at the next UTC midnight.
pub fn daily_limit_error(ctx: &Ctx, user: &UserRow) -> ApiError {
    let (_, retry_after) = utc_day(ctx.now_secs());
    let cap = calls_per_day(user.tier);
    too_many(
        format!(
            "You have used all {cap} calls of your {} plan today. Try again in {retry_after} seconds.",
            user.tier
        ),
        retry_after,
        json!({ "limit": cap, "tier": user.tier }),
    )
    .with_code("daily_call_limit")
}

/// The 429 for a scheduled call on a day whose calls are all planned already.
/// The code of a booking refused because its day already has the tier's daily calls.
pub const DAY_FULL: &str = "daily_call_limit";

pub fn day_full_error(user: &UserRow, day: &str) -> ApiError {
    let cap = calls_per_day(user.tier);
    ApiError::new(
        429,
        DAY_FULL,
        format!(
            "Your {} plan has {cap} calls a day, and {day} already has them all.",
            user.tier
        ),
    )
    .with_details(json!({ "limit": cap, "tier": user.tier, "day": day }))
}

#[cfg(test)]
// A panic in a test is that test's failure.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A 429 carries retry_after in its details, next to the limit's own facts.
    #[test]
    fn too_many_shape() {
        let e = too_many("x".into(), 42, json!({ "limit": 10 }));
        assert_eq!((e.status, e.code), (429, "rate_limited"));
        assert_eq!(e.details, Some(json!({ "retry_after": 42, "limit": 10 })));
    }
}
