//! The Call Me Back Worker: HTTP API, Twilio and Stripe webhooks, data, and the
//! `CallSession` Durable Object.
//!
//! This crate is wiring: decisions that need no I/O live in `cmb_core`. Every route
//! answers through [`error::ApiError`], so clients always get the JSON error format of
//! API.md, and a client mistake is never a 500.

mod admin;
mod analytics;
mod audit;
mod auth;
mod calls;
mod config;
mod crypto;
mod db;
mod error;
mod favorites;
mod health;
mod http;
mod limits;
mod llm;
mod payments;
mod personas;
mod session;
mod store;
mod store_admin;
mod stripe;
mod twilio;
mod voice;

use std::rc::Rc;

use cmb_core::config::WorkerConfig;
use worker::{event, Context, Env, Method, Request, Response};

use crate::error::{ApiError, ApiResult};
pub use crate::session::CallSession;

/// Everything a route needs for one request.
pub struct Ctx {
    pub env: Env,
    pub cfg: Rc<WorkerConfig>,
    pub store: store::Store,
    now_ms: u64,
}

impl Ctx {
    /// The request's clock reading, taken once (time is an argument below this point).
    pub fn now_secs(&self) -> i64 {
        (self.now_ms / 1000) as i64
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// RFC 3339 UTC with millisecond precision, e.g. `2026-11-22T09:30:00.000Z`.
    pub fn now_iso(&self) -> String {
        iso_from_millis(self.now_ms)
    }

    pub fn kv(&self) -> ApiResult<worker::KvStore> {
        self.env
            .kv(config::KV_BINDING)
            .map_err(|e| ApiError::internal("kv binding", e))
    }
}

/// RFC 3339 UTC (`toISOString`) for a Unix time in milliseconds.
pub fn iso_from_millis(ms: u64) -> String {
    String::from(js_sys::Date::new(&wasm_bindgen::JsValue::from_f64(ms as f64)).to_iso_string())
}

#[event(start)]
fn start() {
    console_error_panic_hook_set();
}

/// Panics abort the isolate; at least make their message visible in the logs.
fn console_error_panic_hook_set() {
    std::panic::set_hook(Box::new(|info| {
        worker::console_error!("panic: {info}");
    }));
}

#[event(fetch)]
async fn fetch(req: Request, env: Env, _ctx: Context) -> worker::Result<Response> {
    let origin = req.headers().get("origin").ok().flatten();
    let method = req.method();
    let path = req.path();
    let result = route(req, env).await;
    let (mut resp, cors) = match result {
        Ok((resp, cors)) => (resp, cors),
        Err(e) => (e.into_response()?, Vec::new()),
    };
    if resp.status_code() >= 500 {
        worker::console_error!("{method:?} {path} -> {}", resp.status_code());
    }
    http::apply_cors(&mut resp, origin.as_deref(), &cors);
    Ok(resp)
}

async fn route(req: Request, env: Env) -> ApiResult<(Response, Vec<String>)> {
    let path = req.path();
    let method = req.method();
    if path == "/health" {
        return Ok((health::health(&env).await?, Vec::new()));
    }
    let cfg = config::load(&env).map_err(|report| {
        let names: Vec<&str> = report.problems.iter().map(|p| p.name).collect();
        ApiError::new(
            503,
            "misconfigured",
            format!(
                "The service is misconfigured: {}. See /health.",
                names.join(", ")
            ),
        )
    })?;
    let cors = cfg.cors_origins.clone();
    let store = store::Store::open(&env, cfg.db_backend).await?;
    let ctx = Ctx {
        env,
        cfg,
        store,
        now_ms: worker::Date::now().as_millis(),
    };
    if method == Method::Options {
        return Ok((Response::empty()?.with_status(204), cors));
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let resp = match (method.clone(), segments.as_slice()) {
        (Method::Post, ["api", "auth", "register"]) => auth::register(req, &ctx).await,
        (Method::Post, ["api", "auth", "login"]) => auth::login(req, &ctx).await,
        (Method::Post, ["api", "auth", "logout"]) => auth::logout(&req, &ctx).await,
        (Method::Get, ["api", "me"]) => auth::me(&req, &ctx).await,

        (Method::Get, ["api", "personas"]) => personas::list(&req, &ctx).await,
        (Method::Post, ["api", "personas"]) => personas::create(req, &ctx).await,
        (Method::Get, ["api", "personas", id]) => personas::get(&req, &ctx, id).await,
        (Method::Put, ["api", "personas", id]) => personas::update(req, &ctx, id).await,
        (Method::Delete, ["api", "personas", id]) => personas::delete(&req, &ctx, id).await,

        (Method::Post, ["api", "calls", "trigger"]) => calls::trigger(req, &ctx).await,
        (Method::Post, ["api", "calls", "schedule"]) => calls::schedule(req, &ctx).await,
        (Method::Get, ["api", "calls", "history"]) => calls::history(&req, &ctx).await,
        (Method::Get, ["api", "calls", id]) => calls::detail(&req, &ctx, id).await,
        (Method::Delete, ["api", "calls", id]) => calls::cancel(&req, &ctx, id).await,

        (Method::Post, ["api", "voice", "twiml"]) => voice::twiml(req, &ctx).await,
        (Method::Post, ["api", "voice", "status"]) => voice::status(req, &ctx).await,
        (Method::Post, ["api", "voice", "stream-ended"]) => voice::stream_ended(req, &ctx).await,

        (Method::Get, ["internal", "calls", id, "session"]) => relay_session(req, &ctx, id).await,

        (Method::Get, ["api", "favorites"]) => favorites::list(&req, &ctx).await,
        (Method::Post, ["api", "favorites"]) => favorites::add(req, &ctx).await,
        (Method::Delete, ["api", "favorites", id]) => favorites::remove(&req, &ctx, id).await,

        (Method::Post, ["api", "payments", "checkout"]) => payments::checkout(req, &ctx).await,
        (Method::Post, ["api", "payments", "webhook"]) => payments::webhook(req, &ctx).await,
        (Method::Get, ["payments", "success"]) => payments::success_page(),
        (Method::Get, ["payments", "cancel"]) => payments::cancel_page(),

        (Method::Get, ["admin", "users"]) => admin::users(&req, &ctx).await,
        (Method::Get, ["admin", "users", id]) => admin::user(&req, &ctx, id).await,
        (Method::Post, ["admin", "users", id, "ban"]) => admin::ban(req, &ctx, id).await,
        (Method::Post, ["admin", "users", id, "unban"]) => admin::unban(req, &ctx, id).await,
        (Method::Post, ["admin", "users", id, "credits"]) => admin::credits(req, &ctx, id).await,
        (Method::Get, ["admin", "calls"]) => admin::calls(&req, &ctx).await,
        (Method::Get, ["admin", "calls", id]) => admin::call(&req, &ctx, id).await,
        (Method::Get, ["admin", "personas"]) => admin::personas(&req, &ctx).await,
        (Method::Get, ["admin", "audit"]) => audit::list(&req, &ctx).await,
        (Method::Get, ["admin", "analytics", "calls"]) => analytics::calls(&req, &ctx).await,
        (Method::Get, ["admin", "analytics", "revenue"]) => analytics::revenue(&req, &ctx).await,
        (Method::Get, ["admin", "analytics", "costs"]) => analytics::costs(&req, &ctx).await,

        (_, ["api", ..]) | (_, ["admin", ..]) | (_, ["internal", ..]) => {
            if known_path(&segments) {
                Err(ApiError::new(
                    405,
                    "method_not_allowed",
                    format!("{method:?} is not allowed on {path}."),
                ))
            } else {
                Err(ApiError::not_found("Route"))
            }
        }
        _ => Err(ApiError::not_found("Route")),
    }?;
    Ok((resp, cors))
}

/// The relay's control channel for one call: authenticated with `RELAY_SECRET`, then
/// handed to the call's Durable Object, which accepts the WebSocket.
async fn relay_session(req: Request, ctx: &Ctx, call_id: &str) -> ApiResult<Response> {
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
    let ns = ctx
        .env
        .durable_object(config::CALL_SESSION_BINDING)
        .map_err(|e| ApiError::internal("do binding", e))?;
    let stub = ns
        .id_from_name(call_id)
        .and_then(|id| id.get_stub())
        .map_err(|e| ApiError::internal("do stub", e))?;
    Ok(stub.fetch_with_request(req).await?)
}

/// Paths that exist with some other method (for a 405 instead of a 404).
fn known_path(segments: &[&str]) -> bool {
    matches!(
        segments,
        ["api", "auth", "register" | "login" | "logout"]
            | ["api", "me"]
            | ["api", "personas"]
            | ["api", "personas", _]
            | ["api", "favorites"]
            | ["api", "favorites", _]
            | ["api", "calls", "trigger" | "schedule" | "history"]
            | ["api", "calls", _]
            | ["api", "voice", "twiml" | "status" | "stream-ended"]
            | ["api", "payments", "checkout" | "webhook"]
            | ["admin", "users" | "calls" | "personas" | "audit"]
            | ["admin", "users" | "calls", _]
            | ["admin", "users", _, "ban" | "unban" | "credits"]
            | ["admin", "analytics", "calls" | "revenue" | "costs"]
    )
}
