//! JSON log lines (`cmb_core::log`) to the Workers console, which Workers Logs keeps
//! (`[observability]` in `wrangler.toml`). Fields: `request_id` for anything a request
//! does, `call_id`/`call_sid` for a call, `provider` for an outbound dependency.

use cmb_core::log::{line, Level};
use serde_json::Value;

pub fn emit(level: Level, event: &str, fields: Value) {
    let l = line(level, event, fields);
    match level {
        Level::Debug | Level::Info => worker::console_log!("{l}"),
        Level::Warn => worker::console_warn!("{l}"),
        Level::Error => worker::console_error!("{l}"),
    }
}

pub fn info(event: &str, fields: Value) {
    emit(Level::Info, event, fields);
}

pub fn warn(event: &str, fields: Value) {
    emit(Level::Warn, event, fields);
}

pub fn error(event: &str, fields: Value) {
    emit(Level::Error, event, fields);
}
