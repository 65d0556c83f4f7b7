//! Business analytics for admins, per UTC day over an inclusive `from..=to` range
//! (`YYYY-MM-DD`, at most 366 days; default the last 30 days):
//!
//! - `GET /admin/analytics/calls`: calls by status, talk seconds, billed minutes,
//!   credits charged, and average / p95 end-of-turn → first-audio latency;
//! - `GET /admin/analytics/revenue`: Stripe sales and refunds (credits and US cents),
//!   debt recorded, and call revenue (credits charged; 1 credit = 1 US cent);
//! - `GET /admin/analytics/costs`: provider cost per provider (micro-dollars) against
//!   call revenue, and the gross margin.
//!
//! The range rules and the reports are `cmb_core::analytics`; the aggregation is the
//! store's SQL (`store/analytics.rs`). This module authenticates, queries and answers;
//! nothing here writes.

use cmb_core::analytics::{calls_report, costs_report, parse_range, revenue_report, Range};
use serde::Deserialize;
use worker::{Request, Response};

use crate::error::{ApiError, ApiResult};
use crate::http::auth::require_admin;
use crate::http::{json, query};
use crate::Ctx;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeQuery {
    from: Option<String>,
    to: Option<String>,
}

async fn admin_range(req: &Request, ctx: &Ctx) -> ApiResult<Range> {
    require_admin(req, ctx).await?;
    let q: RangeQuery = query(req)?;
    let today = time::OffsetDateTime::from_unix_timestamp(ctx.now_secs())
        .map_err(|e| ApiError::internal("clock", e))?
        .date();
    Ok(parse_range(q.from.as_deref(), q.to.as_deref(), today)?)
}

/// `GET /admin/analytics/calls?from&to`
pub async fn calls(req: &Request, ctx: &Ctx) -> ApiResult<Response> {
    let range = admin_range(req, ctx).await?;
    let (from, to) = (range.from.to_string(), range.to.to_string());
    let rows = ctx.store.calls_by_day(&from, &to).await?;
    let latency = ctx.store.latency_by_day(&from, &to).await?;
    json(200, &calls_report(&range, &rows, &latency))
}

/// `GET /admin/analytics/revenue?from&to`
pub async fn revenue(req: &Request, ctx: &Ctx) -> ApiResult<Response> {
    let range = admin_range(req, ctx).await?;
    let (from, to) = (range.from.to_string(), range.to.to_string());
    let sales = ctx.store.sales_by_day(&from, &to).await?;
    let refunds = ctx.store.refunds_by_day(&from, &to).await?;
    let calls = ctx.store.calls_by_day(&from, &to).await?;
    json(200, &revenue_report(&range, &sales, &refunds, &calls))
}

/// `GET /admin/analytics/costs?from&to`
pub async fn costs(req: &Request, ctx: &Ctx) -> ApiResult<Response> {
    let range = admin_range(req, ctx).await?;
    let (from, to) = (range.from.to_string(), range.to.to_string());
    let costs = ctx.store.costs_by_day(&from, &to).await?;
    let calls = ctx.store.calls_by_day(&from, &to).await?;
    json(200, &costs_report(&range, &costs, &calls))
}
