//! `POST /mcp`: the Model Context Protocol server for operators' AI assistants
//! (Streamable HTTP, one JSON-RPC message per POST, answered with one JSON response).
//! Stateless: no session id, no server-initiated stream (`GET /mcp` is a 405).
//!
//! Authentication is an admin's bearer token, as for every admin route, with the
//! `WWW-Authenticate` challenge MCP clients expect on a 401. The protocol's decisions
//! (messages, versions, the tool catalog, arguments) are `cmb_core::mcp`; this module runs
//! the tools over the store, through the same code as the admin routes.

use cmb_core::events::SearchParams;
use cmb_core::mcp::{self, Incoming, RpcError, ToolCall};
use serde_json::{json, Value};
use worker::{Request, Response};

use crate::error::{ApiError, ApiResult};
use crate::http::auth::require_admin;
use crate::http::read_body;
use crate::store::CallsFilter;
use crate::Ctx;

/// The challenge on a 401 (RFC 6750); MCP clients read it to know a bearer token is due.
const CHALLENGE: &str = "Bearer realm=\"call-me-back\", error=\"invalid_token\"";

pub async fn post(mut req: Request, ctx: &Ctx) -> ApiResult<Response> {
    if let Err(e) = require_admin(&req, ctx).await {
        let unauthorized = e.status == 401;
        let mut resp = e.into_response(&ctx.request_id)?;
        if unauthorized {
            resp.headers_mut().set("www-authenticate", CHALLENGE)?;
        }
        return Ok(resp);
    }
    let version = req.headers().get("mcp-protocol-version").ok().flatten();
    if !mcp::version_supported(version.as_deref()) {
        return Err(ApiError::bad_request(
            "unsupported_protocol_version",
            format!(
                "MCP-Protocol-Version {} is not supported; this server speaks {}.",
                version.unwrap_or_default(),
                mcp::PROTOCOL_VERSIONS.join(", ")
            ),
        ));
    }
    let body = read_body(&mut req).await?;
    let answer = match mcp::parse(&body) {
        Ok(Incoming::NoReply) => return Ok(Response::empty()?.with_status(202)),
        Ok(Incoming::Request { id, method, params }) => match handle(ctx, &method, &params).await {
            Ok(result) => mcp::success(&id, result),
            Err(e) => mcp::failure(&id, &e),
        },
        Err((id, e)) => mcp::failure(&id, &e),
    };
    crate::http::json(200, &answer)
}

async fn handle(ctx: &Ctx, method: &str, params: &Value) -> Result<Value, RpcError> {
    match method {
        "initialize" => Ok(mcp::initialize(params, env!("CARGO_PKG_VERSION"))),
        "ping" => Ok(json!({})),
        "tools/list" => {
            let tools: Value = serde_json::from_str(mcp::TOOLS)
                .map_err(|e| RpcError::invalid_params(format!("tool catalog: {e}")))?;
            Ok(json!({ "tools": tools }))
        }
        "tools/call" => {
            let call = mcp::tool_call(params)?;
            Ok(match run(ctx, call).await {
                Ok(structured) => mcp::tool_result(structured),
                Err(ToolFailure(message)) => mcp::tool_error(&message),
            })
        }
        other => Err(RpcError {
            code: mcp::code::METHOD_NOT_FOUND,
            message: format!("Method not found: {other}"),
        }),
    }
}

/// A tool that could not do what it was asked (the answer is `isError: true`).
struct ToolFailure(String);

impl From<ApiError> for ToolFailure {
    fn from(e: ApiError) -> Self {
        if e.status >= 500 {
            crate::log::error(
                "mcp_tool_failed",
                json!({ "code": e.code, "cause": e.log_detail() }),
            );
        }
        ToolFailure(e.message)
    }
}

async fn run(ctx: &Ctx, call: ToolCall) -> Result<Value, ToolFailure> {
    match call {
        ToolCall::ListCalls {
            filter,
            limit,
            offset,
        } => {
            let status = filter.status.map(|s| s.as_str());
            let f = CallsFilter {
                user_id: filter.user_id.as_deref(),
                status,
                from_day: filter.from.as_deref(),
                to_day: filter.to.as_deref(),
            };
            let (calls, total) = ctx.store.admin_calls(&f, limit, offset).await?;
            Ok(json!({ "calls": calls, "total": total }))
        }
        ToolCall::GetCall(g) => {
            let Some(mut detail) = super::call_detail(ctx, &g.call_id).await? else {
                return Err(ToolFailure(format!("No call has the id {}.", g.call_id)));
            };
            let params = SearchParams {
                call_id: Some(g.call_id),
                limit: Some(cmb_core::events::PAGE_MAX),
                ..Default::default()
            };
            detail["events"] = super::events::search(ctx, params).await?["events"].take();
            Ok(detail)
        }
        ToolCall::SearchLogs(search) => {
            let (rows, total) = ctx.store.search_events(&search).await?;
            let events: Vec<Value> = rows.iter().map(|r| r.view()).collect();
            Ok(json!({ "events": events, "total": total }))
        }
        ToolCall::AnalyticsSummary(range) => {
            let today = time::OffsetDateTime::from_unix_timestamp(ctx.now_secs())
                .map_err(|e| ApiError::internal("clock", e))?
                .date();
            let range =
                cmb_core::analytics::parse_range(range.from.as_deref(), range.to.as_deref(), today)
                    .map_err(|e| ToolFailure(e.message))?;
            let (from, to) = (range.from.to_string(), range.to.to_string());
            let s = &ctx.store;
            let calls = s.calls_by_day(&from, &to).await?;
            let latency = s.latency_by_day(&from, &to).await?;
            let sales = s.sales_by_day(&from, &to).await?;
            let refunds = s.refunds_by_day(&from, &to).await?;
            let costs = s.costs_by_day(&from, &to).await?;
            Ok(cmb_core::analytics::summary(
                &range, &calls, &latency, &sales, &refunds, &costs,
            ))
        }
    }
}
