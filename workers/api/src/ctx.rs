//! What a route gets for one request: the environment, the validated configuration, the
//! store, the request's clock reading and its id.

use std::rc::Rc;

use cmb_core::config::WorkerConfig;
use worker::Env;

use crate::config;
use crate::error::{ApiError, ApiResult};
use crate::store;

/// Everything a route needs for one request.
pub struct Ctx {
    pub env: Env,
    pub cfg: Rc<WorkerConfig>,
    pub store: store::Store,
    pub request_id: String,
    pub(crate) now_ms: u64,
}

impl Ctx {
    /// An operator event of this request (its id and clock), for [`Ctx::record`].
    pub fn event(
        &self,
        level: cmb_core::events::Level,
        kind: &str,
        fields: serde_json::Value,
    ) -> cmb_core::events::Event {
        cmb_core::events::Event::worker(level, kind, self.now_ms, fields).request(&self.request_id)
    }

    /// Records an operator event, best effort (`Store::record`).
    pub async fn record(&self, event: cmb_core::events::Event) {
        self.store.record(vec![event]).await;
    }

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
