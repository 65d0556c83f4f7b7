//! How the rest of the Worker reaches a call's Durable Object: one operation at a time
//! (`session_op`), or the relay's control channel handed over as a WebSocket
//! (`relay_session`). The DO itself is `session/mod.rs`.

use serde::Deserialize;
use worker::{Method, Request, RequestInit, Response};

use crate::config;
use crate::error::{ApiError, ApiResult};
use crate::session::SessionOp;
use crate::Ctx;

/// Sends one operation to the call's Durable Object.
pub async fn session_op<T: for<'de> Deserialize<'de>>(
    ctx: &Ctx,
    call_id: &str,
    op: &SessionOp,
) -> ApiResult<T> {
    let stub = stub(ctx, call_id)?;
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
    let header = req
        .headers()
        .get("authorization")
        .ok()
        .flatten()
        .unwrap_or_default();
    let presented = header.strip_prefix("Bearer ").unwrap_or("");
    if !cmb_core::password::hashes_equal(
        presented.as_bytes(),
        ctx.cfg.relay_secret.expose().as_bytes(),
    ) {
        return Err(ApiError::unauthorized("Invalid relay credentials."));
    }
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
    let stub = stub(ctx, call_id)?;
    Ok(stub.fetch_with_request(req).await?)
}

/// The stub of `call_id`'s Durable Object (one per call, named by the call id).
fn stub(ctx: &Ctx, call_id: &str) -> ApiResult<worker::Stub> {
    let ns = ctx
        .env
        .durable_object(config::CALL_SESSION_BINDING)
        .map_err(|e| ApiError::internal("do binding", e))?;
    ns.id_from_name(call_id)
        .and_then(|id| id.get_stub())
        .map_err(|e| ApiError::internal("do stub", e))
}
