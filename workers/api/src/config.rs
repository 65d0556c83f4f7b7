//! Reads the Worker's vars, secrets and bindings into the typed configuration, once per
//! isolate.
//!
//! Parsing and validation rules live in `cmb_core::config` (pure, unit-tested); this module
//! only adapts `worker::Env` to a lookup function and checks that the bindings exist. It
//! never substitutes a default for a missing secret: problems are reported, by name, on
//! `/health` and on every request that needs the missing piece.

use std::cell::RefCell;
use std::rc::Rc;

use cmb_core::config::{ConfigProblem, WorkerConfig};
use cmb_core::http::cors::CorsPolicy;
use worker::Env;

pub const DB_BINDING: &str = "DB";
pub const KV_BINDING: &str = "TOKEN_BLACKLIST";
pub const CALL_SESSION_BINDING: &str = "CALL_SESSION";
pub const HYPERDRIVE_BINDING: &str = "HYPERDRIVE";
/// Bound only in `[env.production-containers]`.
pub const RELAY_CONTAINER_BINDING: &str = "RELAY_CONTAINER";

thread_local! {
    static CACHED: RefCell<Option<Rc<WorkerConfig>>> = const { RefCell::new(None) };
    static CORS: RefCell<Option<Rc<CorsPolicy>>> = const { RefCell::new(None) };
}

/// The CORS policy from `CORS_ORIGINS`, parsed once per isolate (vars cannot change
/// without a new deployment). Read on its own, not through [`load`], so preflights and
/// the answers of a misconfigured Worker get it too; entries that do not parse allow
/// nothing here, and [`load`] reports them by name.
pub fn cors(env: &Env) -> Rc<CorsPolicy> {
    if let Some(policy) = CORS.with(|c| c.borrow().clone()) {
        return policy;
    }
    let policy = Rc::new(
        env.var("CORS_ORIGINS")
            .map(|v| CorsPolicy::lenient(&v.to_string()))
            .unwrap_or_default(),
    );
    CORS.with(|c| *c.borrow_mut() = Some(policy.clone()));
    policy
}

/// Every problem found in the configuration and bindings, each naming the setting.
#[derive(Debug, Clone)]
pub struct ConfigReport {
    pub problems: Vec<ConfigProblem>,
}

/// Returns the parsed configuration, or every problem with it.
///
/// A good configuration is parsed once per isolate (vars and secrets cannot change
/// without a new deployment, which starts new isolates); a bad one is re-read on each call
/// so the errors stay visible and exact.
pub fn load(env: &Env) -> Result<Rc<WorkerConfig>, ConfigReport> {
    if let Some(cfg) = CACHED.with(|c| c.borrow().clone()) {
        return Ok(cfg);
    }
    let lookup = |name: &str| -> Option<String> {
        env.var(name)
            .map(|v| v.to_string())
            .or_else(|_| env.secret(name).map(|s| s.to_string()))
            .ok()
    };
    let mut problems = Vec::new();
    let parsed = WorkerConfig::from_lookup(lookup);
    let cfg = match parsed {
        Ok(cfg) => Some(cfg),
        Err(errors) => {
            problems.extend(errors.0);
            None
        }
    };
    problems.extend(check_bindings(env));
    match cfg {
        Some(cfg) if problems.is_empty() => {
            let cfg = Rc::new(cfg);
            CACHED.with(|c| *c.borrow_mut() = Some(cfg.clone()));
            Ok(cfg)
        }
        _ => Err(ConfigReport { problems }),
    }
}

fn check_bindings(env: &Env) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    if env.d1(DB_BINDING).is_err() {
        problems.push(ConfigProblem {
            name: DB_BINDING,
            problem: "D1 binding missing (wrangler.toml [[d1_databases]])".into(),
        });
    }
    if env.kv(KV_BINDING).is_err() {
        problems.push(ConfigProblem {
            name: KV_BINDING,
            problem: "KV binding missing (wrangler.toml [[kv_namespaces]])".into(),
        });
    }
    if env.durable_object(CALL_SESSION_BINDING).is_err() {
        problems.push(ConfigProblem {
            name: CALL_SESSION_BINDING,
            problem: "Durable Object binding missing (wrangler.toml [durable_objects])".into(),
        });
    }
    problems
}
