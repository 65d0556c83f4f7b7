//! `Idempotency-Key` on the POSTs that create something billable: claim the key, run the
//! request once, keep its answer for repeats (`cmb_core::idempotency` decides; the rows
//! are `store::idempotency`).

use std::future::Future;

use cmb_core::idempotency::{self as idem, Decision, Outcome, Route, Stored};
use serde_json::{json, Value};
use worker::{Request, Response};

use crate::error::{ApiError, ApiResult};
use crate::http::auth::{authenticate, Session};
use crate::http::{json, read_body};
use crate::store::Claim;
use crate::Ctx;

/// What an idempotent route's work answers: a status and a JSON body.
pub type Answer = ApiResult<(u16, Value)>;

/// How many times a request tries to claim a key that a finishing or expiring request
/// is giving up at that moment, before it answers `idempotency_key_in_progress`.
const CLAIM_ATTEMPTS: usize = 2;

/// The request's `Idempotency-Key`, if it sent one; a 400 `invalid_idempotency_key`
/// when it is not 1 to 255 printable ASCII characters.
fn key(req: &Request) -> ApiResult<Option<String>> {
    let Some(raw) = req.headers().get("idempotency-key").ok().flatten() else {
        return Ok(None);
    };
    idem::parse_key(&raw)
        .map(|k| Some(k.to_owned()))
        .map_err(|message| {
            ApiError::bad_request(idem::INVALID_KEY, message)
                .with_details(json!([{ "field": "Idempotency-Key" }]))
        })
}

/// A whole idempotent route: authenticates, reads the key and the raw body, and runs
/// `work` with the session and body under [`run`].
pub async fn serve(
    mut req: Request,
    ctx: &Ctx,
    route: Route,
    work: impl AsyncFnOnce(&Session, &[u8]) -> Answer,
) -> ApiResult<Response> {
    let session = authenticate(&req, ctx).await?;
    let key = key(&req)?;
    let raw = read_body(&mut req).await?;
    run(
        ctx,
        route,
        &session.user.id,
        key,
        &raw,
        work(&session, &raw),
    )
    .await
}

/// Runs `work` (the route's request from `user_id` with `body`) at most once per key:
/// without a key it just runs; with one, a repeat of an answered request gets the
/// stored answer (with `Idempotent-Replayed: true`) and runs nothing, another request
/// under the key is 409 `idempotency_key_reused`, and a repeat while the first still
/// runs is 409 `idempotency_key_in_progress`. A 4xx answer releases the key; any other
/// answer, 5xx included, is kept for 24 hours.
async fn run(
    ctx: &Ctx,
    route: Route,
    user_id: &str,
    key: Option<String>,
    body: &[u8],
    work: impl Future<Output = Answer>,
) -> ApiResult<Response> {
    let Some(key) = key else {
        let (status, value) = work.await?;
        return json(status, &value);
    };
    let fingerprint = idem::fingerprint(route, user_id, body);
    let claim_id = crate::crypto::uuid().map_err(|e| ApiError::internal("uuid", e))?;
    let now_ms = i64::try_from(ctx.now_ms()).unwrap_or(i64::MAX);
    let expires_at = crate::iso_from_millis(idem::expires_at(now_ms).unsigned_abs());
    let now = ctx.now_iso();
    let claim = Claim {
        user_id,
        key: &key,
        route: route.as_str(),
        fingerprint: &fingerprint,
        claim: &claim_id,
        now: &now,
        expires_at: &expires_at,
    };
    let mut claimed = false;
    for _ in 0..CLAIM_ATTEMPTS {
        if ctx.store.claim_idempotency_key(&claim).await? {
            claimed = true;
            break;
        }
        // Gone since (released or pruned): claim again.
        let Some(row) = ctx.store.idempotency_key(user_id, &key).await? else {
            continue;
        };
        match idem::decide(&stored(&row)?, &fingerprint, now_ms) {
            Decision::Replay { status, body } => return replay(status, body),
            Decision::Reused => return Err(reused()),
            Decision::InProgress => return Err(in_progress()),
            Decision::Expired => continue,
        }
    }
    if !claimed {
        return Err(in_progress());
    }

    let answer = work.await;
    let status = match &answer {
        Ok((status, _)) => *status,
        Err(e) => e.status,
    };
    let kept = match idem::outcome(status) {
        Outcome::Release => {
            ctx.store
                .release_idempotency_key(user_id, &key, &claim_id)
                .await
        }
        Outcome::Store => {
            let value = match &answer {
                Ok((_, value)) => value.to_string(),
                Err(e) => e.body(&ctx.request_id).to_string(),
            };
            ctx.store
                .complete_idempotency_key(user_id, &key, &claim_id, status, &value)
                .await
        }
    };
    if let Err(e) = kept {
        // The request itself is done (a call may be placed): answer it. The key stays
        // claimed, so repeats are refused as in progress until it expires, never run.
        crate::log::error(
            "idempotency_key_not_kept",
            json!({ "request_id": ctx.request_id, "route": route.as_str(), "user_id": user_id,
                    "status": status, "cause": e.log_detail() }),
        );
    }
    let (status, value) = answer?;
    json(status, &value)
}

fn stored(row: &crate::store::IdempotencyRow) -> ApiResult<Stored> {
    let expires_at_ms = chrono::DateTime::parse_from_rfc3339(&row.expires_at)
        .map_err(|e| ApiError::internal("idempotency key expiry", e))?
        .timestamp_millis();
    let response = match (row.status, &row.response) {
        (Some(status), Some(body)) => Some((
            u16::try_from(status).map_err(|e| ApiError::internal("idempotency key status", e))?,
            body.clone(),
        )),
        _ => None,
    };
    Ok(Stored {
        fingerprint: row.fingerprint.clone(),
        response,
        expires_at_ms,
    })
}

/// The stored answer again, marked as a replay.
fn replay(status: u16, body: String) -> ApiResult<Response> {
    let mut resp = Response::from_bytes(body.into_bytes())?.with_status(status);
    let headers = resp.headers_mut();
    headers.set("content-type", "application/json")?;
    headers.set(idem::REPLAYED_HEADER, "true")?;
    Ok(resp)
}

fn reused() -> ApiError {
    ApiError::conflict(
        idem::KEY_REUSED,
        "This Idempotency-Key was already used for a different request; use a new key for a new request.",
    )
}

fn in_progress() -> ApiError {
    ApiError::conflict(
        idem::KEY_IN_PROGRESS,
        "A request with this Idempotency-Key is still being processed; retry it in a moment.",
    )
    .with_details(json!({ "retry_after": 1 }))
}
