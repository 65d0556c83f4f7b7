//! Exact limits: calls per UTC day by tier, and request rate limits on the auth routes
//! against brute force. Each refusal is a 429 with `retry_after` seconds (in the error's
//! `details` and, through `ApiError`, a `Retry-After` header).
//!
//! Counts live in D1, never in KV (eventually consistent): the daily call counter is
//! bumped in the same batch as the call insert, and a rate-limit hit is one upsert that
//! returns the new count. This module owns the numbers and the keys; the SQL is in
//! `store_admin.rs`. It never decides anything about credits.
//!
//! The numbers, and why (the test suites register and log in from 127.0.0.1 and stay
//! well under them):
//! - calls per UTC day, triggered or scheduled (counted for the day they dial): free 3,
//!   basic 10, premium 50 (the first version's);
//! - failed logins: 10 per email and 50 per client IP per 15 minutes. A slot is taken
//!   before the password is checked (so concurrent guesses cannot overshoot) and given
//!   back when the login succeeds, so only failures count;
//! - registrations: 50 per client IP per hour — generous for shared networks, still a
//!   wall against scripted sign-ups.
//!
//! The client IP is `CF-Connecting-IP`, which Cloudflare's edge sets (and `wrangler dev`
//! sets when the client did not). Without it every client shares one `unknown` bucket.

use serde_json::json;
use worker::Request;

use crate::store::Bound;

use crate::error::{ApiError, ApiResult};
use crate::store::UserRow;
use crate::Ctx;

const DAY_SECS: i64 = 24 * 3600;

/// One fixed-window limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Key prefix, e.g. `login:email`.
    pub name: &'static str,
    pub limit: i64,
    pub window_secs: i64,
}

pub const LOGIN_FAILURES_PER_EMAIL: RateLimit = RateLimit {
    name: "login:email",
    limit: 10,
    window_secs: 15 * 60,
};
pub const LOGIN_FAILURES_PER_IP: RateLimit = RateLimit {
    name: "login:ip",
    limit: 50,
    window_secs: 15 * 60,
};
pub const REGISTRATIONS_PER_IP: RateLimit = RateLimit {
    name: "register:ip",
    limit: 50,
    window_secs: 3600,
};

/// SMS verifications started per account and per client IP: each costs us an SMS, and
/// each verified number is worth the free credits.
pub const VERIFICATIONS_PER_ACCOUNT: RateLimit = RateLimit {
    name: "verify:user",
    limit: 5,
    window_secs: 3600,
};
pub const VERIFICATIONS_PER_IP: RateLimit = RateLimit {
    name: "verify:ip",
    limit: 50,
    window_secs: 3600,
};

/// Calls a user may trigger per UTC day, by tier (unknown tiers get the free cap).
pub fn calls_per_day(tier: &str) -> i64 {
    match tier {
        "premium" => 50,
        "basic" => 10,
        _ => 3,
    }
}

/// The fixed window containing `now`: its start and the seconds until it ends (≥ 1).
pub fn window(now_secs: i64, window_secs: i64) -> (i64, i64) {
    let start = now_secs - now_secs.rem_euclid(window_secs);
    (start, (start + window_secs - now_secs).max(1))
}

/// The UTC day of `now` (`YYYY-MM-DD`) and the seconds until the next one starts.
pub fn utc_day(now_secs: i64) -> (String, i64) {
    let (start, retry_after) = window(now_secs, DAY_SECS);
    let day = time::OffsetDateTime::from_unix_timestamp(start)
        .map(|t| t.date().to_string())
        .unwrap_or_else(|_| "1970-01-01".into());
    (day, retry_after)
}

fn too_many(message: String, retry_after: i64, extra: serde_json::Value) -> ApiError {
    let mut details = json!({ "retry_after": retry_after });
    if let (Some(d), Some(extra)) = (details.as_object_mut(), extra.as_object()) {
        d.extend(extra.clone());
    }
    ApiError::new(429, "rate_limited", message).with_details(details)
}

/// The client's IP as the edge reports it.
fn client_ip(req: &Request) -> String {
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

/// Takes one slot of `limit` for `subject`, or refuses with 429 when the window is full.
async fn take(ctx: &Ctx, limit: RateLimit, subject: &str, what: &str) -> ApiResult<Slot> {
    let (window_start, retry_after) = window(ctx.now_secs(), limit.window_secs);
    let key = format!("{}:{subject}", limit.name);
    let count = ctx.store.hit_rate_limit(&key, window_start).await?;
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
    // Housekeeping: the first hit of a window clears windows that ended a day ago.
    if count == 1 {
        ctx.store.prune_rate_limits(window_start - DAY_SECS).await?;
    }
    Ok(Slot { key, window_start })
}

/// Slots held by a login attempt until it is known to have succeeded.
#[must_use = "call `succeeded` after a good password, or the attempt counts as a failure"]
pub struct LoginAttempt {
    slots: Vec<Slot>,
}

impl LoginAttempt {
    /// The password was right: the attempt was not a failure, give its slots back.
    pub async fn succeeded(self, ctx: &Ctx) -> ApiResult<()> {
        for slot in &self.slots {
            ctx.store
                .unhit_rate_limit(&slot.key, slot.window_start)
                .await?;
        }
        Ok(())
    }
}

/// Admits a login attempt, per client IP and per email (`email` normalised; `None` when
/// it cannot be an account's, so only the IP limit applies).
pub async fn login_attempt(
    req: &Request,
    ctx: &Ctx,
    email: Option<&str>,
) -> ApiResult<LoginAttempt> {
    let mut slots = vec![take(ctx, LOGIN_FAILURES_PER_IP, &client_ip(req), "failed logins").await?];
    if let Some(email) = email {
        slots.push(
            take(
                ctx,
                LOGIN_FAILURES_PER_EMAIL,
                email,
                "failed logins for this account",
            )
            .await?,
        );
    }
    Ok(LoginAttempt { slots })
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
        .daily_call_stmt(&user.id, &day, calls_per_day(&user.tier))
}

/// The 429 for a user whose daily call cap is reached; retry at the next UTC midnight.
pub fn daily_limit_error(ctx: &Ctx, user: &UserRow) -> ApiError {
    let (_, retry_after) = utc_day(ctx.now_secs());
    let cap = calls_per_day(&user.tier);
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
pub fn day_full_error(user: &UserRow, day: &str) -> ApiError {
    let cap = calls_per_day(&user.tier);
    ApiError::new(
        429,
        "daily_call_limit",
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

    /// Windows are aligned to multiples of their length; retry_after counts to the end.
    #[test]
    fn fixed_windows() {
        assert_eq!(window(1_000, 900), (900, 800));
        assert_eq!(window(900, 900), (900, 900));
        assert_eq!(window(1_799, 900), (900, 1));
        assert_eq!(window(-1, 900), (-900, 1));
    }

    /// The UTC day flips at midnight, not a second early or late.
    #[test]
    fn utc_days() {
        // 2026-01-01T23:59:59Z and the next second.
        assert_eq!(utc_day(1_767_311_999), ("2026-01-01".to_string(), 1));
        assert_eq!(utc_day(1_767_312_000), ("2026-01-02".to_string(), 86_400));
    }

    /// The first version's caps; anything unknown is treated as free.
    #[test]
    fn tier_caps() {
        assert_eq!(calls_per_day("free"), 3);
        assert_eq!(calls_per_day("basic"), 10);
        assert_eq!(calls_per_day("premium"), 50);
        assert_eq!(calls_per_day("platinum"), 3);
    }

    /// A 429 carries retry_after in its details, next to the limit's own facts.
    #[test]
    fn too_many_shape() {
        let e = too_many("x".into(), 42, json!({ "limit": 10 }));
        assert_eq!((e.status, e.code), (429, "rate_limited"));
        assert_eq!(e.details, Some(json!({ "retry_after": 42, "limit": 10 })));
    }
}
