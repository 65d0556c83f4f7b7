//! `GET /admin/events`: the operators' event log, searched (the console's events page and
//! the MCP tool `search_logs`). The rules are `cmb_core::events`.

use cmb_core::events::{Search, SearchParams};
use serde_json::{json, Value};
use worker::{Request, Response};

use crate::error::ApiResult;
use crate::http::auth::require_admin;
use crate::http::{json, query};
use crate::Ctx;

/// The events a search finds, newest first, with the total, as the console and MCP show
/// them.
pub async fn search(ctx: &Ctx, params: SearchParams) -> ApiResult<Value> {
    let search = Search::parse(params)?;
    let (rows, total) = ctx.store.search_events(&search).await?;
    let events: Vec<Value> = rows.iter().map(|r| r.view()).collect();
    Ok(json!({ "events": events, "total": total }))
}

/// `GET /admin/events?level&kind&call_id&user_id&q&from&to&limit&offset`
pub async fn list(req: &Request, ctx: &Ctx) -> ApiResult<Response> {
    require_admin(req, ctx).await?;
    let params: SearchParams = query(req)?;
    json(200, &search(ctx, params).await?)
}
