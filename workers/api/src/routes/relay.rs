//! The media relay's own routes on the Worker (its control channel is the call's
//! Durable Object, `session/client.rs`): `POST /internal/relay/events`, the relay's
//! warnings and errors in batches for the operators' event log (`cmb_core::events`).

use cmb_core::events::{self, RelayBatch};
use serde_json::json;
use worker::{Request, Response};

use crate::error::{ApiError, ApiResult};
use crate::http::auth::require_relay;
use crate::http::{json, json_body};
use crate::Ctx;

/// `POST /internal/relay/events {events: [...], dropped}`: stored all or none; answers
/// how many were stored.
pub async fn relay_batch(mut req: Request, ctx: &Ctx) -> ApiResult<Response> {
    require_relay(&req, ctx)?;
    let batch: RelayBatch = json_body(&mut req).await?;
    let events = events::from_relay(batch, ctx.now_ms)?;
    let stored = events.len();
    let rows = events
        .into_iter()
        .map(|e| crate::crypto::uuid().map(|id| (id, e)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::internal("uuid", e))?;
    ctx.store.insert_events(&rows).await?;
    json(200, &json!({ "stored": stored }))
}
