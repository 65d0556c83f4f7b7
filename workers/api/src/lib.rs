//! The Call Me Back Worker: HTTP API, Twilio and Stripe webhooks, data, and the
//! `CallSession` Durable Object.
//!
//! This crate is wiring: decisions that need no I/O live in `cmb_core`. Every route
//! answers through [`error::ApiError`], so clients always get the JSON error format of
//! API.md, and a client mistake is never a 500. This file holds the entry points only:
//! the request boundary (request id, CORS, one log line per failure) and dispatch over
//! the one route table, `cmb_core::http::routes::ROUTES`.

mod clients;
mod config;
mod crypto;
mod ctx;
mod error;
mod http;
mod log;
mod relay_container;
mod routes;
mod session;
mod store;

use cmb_core::http::routes::{self as table, Endpoint as E, Found, ROUTES};
use serde_json::json;
use worker::{event, Context, Env, Method, Request, Response};

pub use crate::ctx::{iso_from_millis, Ctx};
use crate::error::{ApiError, ApiResult};
pub use crate::relay_container::RelayContainer;
use crate::routes::{
    admin, auth, calls, console, favorites, health, openapi, payments, personas, phone, privacy,
    relay, schedules, voice,
};
pub use crate::session::CallSession;

#[event(start)]
fn start() {
    std::panic::set_hook(Box::new(|info| {
        // Panics abort the isolate; at least make their message visible in the logs.
        log::error("panic", json!({ "message": info.to_string() }));
    }));
}

#[event(fetch)]
async fn fetch(req: Request, env: Env, _ctx: Context) -> worker::Result<Response> {
    let request_id = request_id(&req);
    let origin = req.headers().get("origin").ok().flatten();
    let method = req.method();
    let preflight = method == Method::Options;
    let path = req.path();
    // A preflight is answered before configuration or storage is touched.
    let mut resp = if preflight {
        Response::empty()?.with_status(204)
    } else {
        match route(req, env.clone(), &request_id).await {
            Ok(resp) => resp,
            Err(e) => {
                if e.status >= 500 {
                    log::error(
                        "request_failed",
                        json!({ "request_id": request_id, "method": method.to_string(),
                                "path": path, "status": e.status, "code": e.code,
                                "cause": e.cause }),
                    );
                }
                e.into_response(&request_id)?
            }
        }
    };
    if resp.status_code() == 101 {
        return Ok(resp); // a WebSocket: its headers are the runtime's
    }
    let cors = config::cors(&env);
    let headers = resp.headers_mut();
    // Responses a route got from elsewhere (a DO) may have immutable headers: those keep
    // theirs, which is why failures to set are not errors.
    let _ = headers.set("x-request-id", &request_id);
    for (name, value) in cors.headers(origin.as_deref(), preflight) {
        let _ = headers.set(name, &value);
    }
    Ok(resp)
}

/// The cron trigger (`[triggers] crons` in wrangler.toml): prunes the operators' event
/// log past `EVENT_RETENTION_DAYS`. A failure is logged loudly; the next run retries.
#[event(scheduled)]
async fn scheduled(event: worker::ScheduledEvent, env: Env, _ctx: worker::ScheduleContext) {
    let now_ms = worker::Date::now().as_millis();
    let cron = event.cron();
    let outcome = async {
        let cfg = config::load(&env).map_err(|report| {
            let names: Vec<&str> = report.problems.iter().map(|p| p.name).collect();
            format!("misconfigured: {}", names.join(", "))
        })?;
        let store = store::Store::open(&env, cfg.db_backend)
            .await
            .map_err(|e| e.log_detail())?;
        let before_ms = cmb_core::events::prune_before_ms(now_ms, cfg.event_retention_days);
        let before = iso_from_millis(before_ms);
        let pruned = store
            .prune_events(&before)
            .await
            .map_err(|e| e.log_detail())?;
        let fields = json!({ "cron": cron, "pruned": pruned, "before": before, "retention_days": cfg.event_retention_days });
        log::info("events_pruned", fields.clone());
        store
            .record(vec![cmb_core::events::Event::worker(
                cmb_core::events::Level::Info,
                cmb_core::events::kind::EVENTS_PRUNED,
                now_ms,
                fields,
            )])
            .await;
        Ok::<(), String>(())
    }
    .await;
    if let Err(cause) = outcome {
        log::error(
            "events_prune_failed",
            json!({ "cron": cron, "cause": cause }),
        );
    }
}

/// `cf-ray` when Cloudflare sent a plausible one, else a fresh random id. Should the
/// random source fail, the id comes from the clock and a per-isolate counter (still
/// distinct within the isolate), and the failure is logged.
fn request_id(req: &Request) -> String {
    use cmb_core::http::request_id;
    use std::sync::atomic::{AtomicU16, Ordering};
    static SEQ: AtomicU16 = AtomicU16::new(0);
    let ray = req.headers().get("cf-ray").ok().flatten();
    request_id::from_cf_ray(ray.as_deref()).unwrap_or_else(|| match crypto::random_bytes::<8>() {
        Ok(bytes) => request_id::generated(bytes),
        Err(e) => {
            let id = request_id::from_clock(
                worker::Date::now().as_millis(),
                SEQ.fetch_add(1, Ordering::Relaxed),
            );
            log::error(
                "request_id_random_failed",
                json!({ "request_id": id, "error": e.to_string() }),
            );
            id
        }
    })
}

async fn route(req: Request, env: Env, request_id: &str) -> ApiResult<Response> {
    let path = req.path();
    // The relay's own routes, when this environment runs it in a container.
    if cmb_core::relay_container::is_relay_path(&path) {
        if let Ok(relay) = env.durable_object(config::RELAY_CONTAINER_BINDING) {
            return relay_container::forward(relay, req).await;
        }
    }
    let method = req.method();
    let (route, params) = match table::find(ROUTES, table::Method::parse(method.as_ref()), &path) {
        Found::Route(route, params) => (route, params),
        Found::WrongMethod { allow } => {
            let mut resp = ApiError::new(
                405,
                "method_not_allowed",
                format!("{method} is not allowed on {path}."),
            )
            .with_details(json!({ "allow": allow }))
            .into_response(request_id)?;
            resp.headers_mut().set("allow", &allow)?;
            return Ok(resp);
        }
        Found::NotFound => return Err(ApiError::not_found("Route")),
    };
    match route.endpoint {
        E::Health => return health::health(&env).await,
        // The contract needs no configuration or storage: served even when misconfigured.
        E::OpenApi => return openapi::document(&env).await,
        // The console's files are static: what they show comes from the admin routes.
        E::Console => return console::page(&env).await,
        E::ConsoleAsset => {
            return console::asset(&env, params.first().copied().unwrap_or_default()).await
        }
        _ => {}
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
    let store = store::Store::open(&env, cfg.db_backend).await?;
    let ctx = Ctx {
        env,
        cfg,
        store,
        request_id: request_id.to_owned(),
        now_ms: worker::Date::now().as_millis(),
    };
    let id = params.first().copied().unwrap_or_default();
    let ctx = &ctx;
    let method = req.method().to_string();
    let result = dispatch(route, req, ctx, id).await;
    if let Err(e) = &result {
        let cause = (e.status >= 500).then(|| e.log_detail());
        let refused = cmb_core::events::of_refusal(
            route.access,
            (&method, &path),
            (e.status, e.code),
            cause.as_deref(),
            ctx.now_ms,
        );
        if let Some(event) = refused {
            ctx.record(event.request(&ctx.request_id)).await;
        }
    }
    result
}

/// One route's handler.
async fn dispatch(route: &table::Route, req: Request, ctx: &Ctx, id: &str) -> ApiResult<Response> {
    match route.endpoint {
        E::Health => health::health(&ctx.env).await,
        E::OpenApi => openapi::document(&ctx.env).await,
        E::Console => console::page(&ctx.env).await,
        E::ConsoleAsset => console::asset(&ctx.env, id).await,
        E::Register => auth::register(req, ctx).await,
        E::Login => auth::login(req, ctx).await,
        E::Logout => auth::logout(&req, ctx).await,
        E::Me => auth::me(&req, ctx).await,
        E::MeUpdate => auth::update_me(req, ctx).await,
        E::MeExport => privacy::export(&req, ctx).await,
        E::MeErase => privacy::erase(req, ctx).await,
        E::PhoneStart => phone::start(req, ctx).await,
        E::PhoneVerify => phone::verify(req, ctx).await,

        E::PersonaList => personas::list(&req, ctx).await,
        E::PersonaCreate => personas::create(req, ctx).await,
        E::PersonaGet => personas::get(&req, ctx, id).await,
        E::PersonaUpdate => personas::update(req, ctx, id).await,
        E::PersonaDelete => personas::delete(&req, ctx, id).await,
        E::PersonaMemoryGet => personas::memory(&req, ctx, id).await,
        E::PersonaMemoryDelete => personas::forget(&req, ctx, id).await,

        E::CallTrigger => calls::trigger(req, ctx).await,
        E::CallSchedule => calls::schedule(req, ctx).await,
        E::CallHistory => calls::history(&req, ctx).await,
        E::CallDetail => calls::detail(&req, ctx, id).await,
        E::CallCancel => calls::cancel(&req, ctx, id).await,

        E::ScheduleList => schedules::list(&req, ctx).await,
        E::ScheduleCreate => schedules::create(req, ctx).await,
        E::ScheduleUpdate => schedules::update(req, ctx, id).await,
        E::ScheduleDelete => schedules::delete(&req, ctx, id).await,

        E::VoiceTwiml => voice::twiml(req, ctx).await,
        E::VoiceStatus => voice::status(req, ctx).await,
        E::VoiceStreamEnded => voice::stream_ended(req, ctx).await,
        E::RelaySession => session::relay_session(req, ctx, id).await,

        E::FavoriteList => favorites::list(&req, ctx).await,
        E::FavoriteAdd => favorites::add(req, ctx).await,
        E::FavoriteRemove => favorites::remove(&req, ctx, id).await,

        E::Checkout => payments::checkout(req, ctx).await,
        E::StripeWebhook => payments::webhook(req, ctx).await,
        E::PaymentSuccessPage => payments::success_page(),
        E::PaymentCancelPage => payments::cancel_page(),

        E::AdminUsers => admin::users(&req, ctx).await,
        E::AdminUser => admin::user(&req, ctx, id).await,
        E::AdminBan => admin::ban(req, ctx, id).await,
        E::AdminUnban => admin::unban(req, ctx, id).await,
        E::AdminCredits => admin::credits(req, ctx, id).await,
        E::AdminCalls => admin::calls(&req, ctx).await,
        E::AdminCall => admin::call(&req, ctx, id).await,
        E::AdminPersonas => admin::personas(&req, ctx).await,
        E::AdminAudit => admin::audit::list(&req, ctx).await,
        E::AnalyticsCalls => admin::analytics::calls(&req, ctx).await,
        E::AnalyticsRevenue => admin::analytics::revenue(&req, ctx).await,
        E::AnalyticsCosts => admin::analytics::costs(&req, ctx).await,
        E::AdminEvents => admin::events::list(&req, ctx).await,
        E::RelayEvents => relay::relay_batch(req, ctx).await,
        E::Mcp => admin::mcp::post(req, ctx).await,
    }
}
