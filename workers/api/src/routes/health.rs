//! `GET /health`: whether this Worker can serve, with each check named.
//!
//! 200 when configuration, database and KV all answer; otherwise 503 listing every
//! failing check (each misconfigured setting by name). A configuration that parses but
//! cannot place a call once deployed (`PUBLIC_BASE_URL`/`RELAY_URL` on a loopback address
//! outside `DEPLOY_ENV = "development"`) fails the config check too; the other routes keep
//! serving. Never reveals secret values.

use serde_json::{json, Value};
use worker::{Env, Response};

use crate::config;
use crate::error::ApiResult;

fn problem(p: &cmb_core::config::ConfigProblem) -> Value {
    json!({ "name": p.name, "problem": p.problem })
}

pub async fn health(env: &Env) -> ApiResult<Response> {
    let (config_check, config_ok) = match config::load(env) {
        Ok(cfg) => {
            // Values that parse but cannot work once deployed (loopback URLs outside
            // local development): 503, so a monitor watching the status sees it.
            let problems: Vec<Value> = cfg.deployment_problems().iter().map(problem).collect();
            // ADMIN_EMAILS grants nothing since admins are made by `cargo xtask admin
            // grant`; an operator who still sets it is told, not silently ignored.
            let warnings: Vec<Value> = if cfg.admin_emails.is_empty() {
                Vec::new()
            } else {
                vec![json!({
                    "name": "ADMIN_EMAILS",
                    "problem": "ignored: it grants nothing; grant admins with `cargo xtask admin grant EMAIL`, then remove it"
                })]
            };
            let ok = problems.is_empty();
            let mut check = json!({ "ok": ok });
            if !ok {
                check["problems"] = Value::Array(problems);
            }
            if !warnings.is_empty() {
                check["warnings"] = Value::Array(warnings);
            }
            (check, ok)
        }
        Err(report) => {
            let problems: Vec<Value> = report.problems.iter().map(problem).collect();
            (json!({ "ok": false, "problems": problems }), false)
        }
    };
    // The configured backend (D1 unless a valid configuration says Postgres).
    let backend = config::load(env).map_or(cmb_core::config::DbBackend::D1, |c| c.db_backend);
    let backend_name = match backend {
        cmb_core::config::DbBackend::D1 => "d1",
        cmb_core::config::DbBackend::Postgres => "postgres",
    };
    let (db_check, db_ok) = match crate::store::Store::open(env, backend).await {
        Ok(store) => match store.ping().await {
            Ok(()) => (json!({ "ok": true, "backend": backend_name }), true),
            Err(e) => (
                json!({ "ok": false, "backend": backend_name, "problem": e }),
                false,
            ),
        },
        Err(e) => (
            json!({ "ok": false, "backend": backend_name, "problem": e.message }),
            false,
        ),
    };
    let (kv_check, kv_ok) = match env.kv(config::KV_BINDING) {
        Ok(kv) => match kv.get("__health").text().await {
            Ok(_) => (json!({ "ok": true }), true),
            Err(e) => (json!({ "ok": false, "problem": e.to_string() }), false),
        },
        Err(_) => (
            json!({ "ok": false, "problem": "binding TOKEN_BLACKLIST missing" }),
            false,
        ),
    };
    let healthy = config_ok && db_ok && kv_ok;
    let body = json!({
        "status": if healthy { "ok" } else { "unhealthy" },
        "version": env!("CARGO_PKG_VERSION"),
        "checks": { "config": config_check, "db": db_check, "kv": kv_check },
    });
    Ok(Response::from_json(&body)?.with_status(if healthy { 200 } else { 503 }))
}
