//! The fake Twilio Verify API (PROTOCOLS.md §8): start an SMS verification, check a code.
//!
//! Owns the verifications (one pending per service and `To`, 10 minutes, 5 sends, 5
//! checks) and the "SMS inbox" tests read the codes from. A code is random: a test can
//! only finish a verification by reading what the fake "sent", as a person reads an SMS.
//! It logs every code plainly so a developer running `cargo xtask dev` can type it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::rest::{authorize, first, is_e164, parse_form, TwilioError};
use super::{new_sid, Shared};

/// How long a verification stays pending.
pub const VERIFICATION_TTL: Duration = Duration::from_secs(600);
const MAX_SENDS: u32 = 5;
const MAX_CHECKS: u32 = 5;

/// One pending verification.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    sid: String,
    code: String,
    channel: String,
    started: Instant,
    created: OffsetDateTime,
    sends: u32,
    checks: u32,
}

pub(super) fn routes(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v2/Services/{service}/Verifications", post(start))
        .route("/v2/Services/{service}/VerificationCheck", post(check))
        .with_state(shared)
}

fn service_ok(
    shared: &Shared,
    headers: &HeaderMap,
    service: &str,
    path: &str,
) -> Result<(), TwilioError> {
    // Basic auth as for the REST API; the account is the credentials' own.
    authorize(shared, headers, &shared.cfg.account_sid, path)?;
    if service != shared.cfg.verify_service_sid {
        return Err(TwilioError::not_found(path));
    }
    Ok(())
}

fn verification_json(shared: &Shared, to: &str, p: &Pending, status: &str) -> Value {
    let created = p
        .created
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    json!({
        "sid": p.sid,
        "service_sid": shared.cfg.verify_service_sid,
        "account_sid": shared.cfg.account_sid,
        "to": to,
        "channel": p.channel,
        "status": status,
        "valid": status == "approved",
        "lookup": {},
        "send_code_attempts": (0..p.sends).map(|_| json!({"attempt_sid": new_sid("VL"), "channel": p.channel, "time": created})).collect::<Vec<_>>(),
        "date_created": created,
        "date_updated": created,
        "url": format!("https://verify.twilio.com/v2/Services/{}/Verifications/{}", shared.cfg.verify_service_sid, p.sid),
    })
}

async fn start(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/v2/Services/{service}/Verifications");
    respond(
        StatusCode::CREATED,
        start_inner(&shared, &headers, &service, &path, &body),
    )
}

/// The resource JSON with `status`, or Twilio's error JSON.
fn respond(status: StatusCode, result: Result<Value, TwilioError>) -> Response {
    match result {
        Ok(v) => (status, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

fn start_inner(
    shared: &Shared,
    headers: &HeaderMap,
    service: &str,
    path: &str,
    body: &[u8],
) -> Result<Value, TwilioError> {
    service_ok(shared, headers, service, path)?;
    let form = parse_form(body)?;
    let to = first(&form, "To").unwrap_or_default().to_owned();
    if !is_e164(&to) {
        return Err(TwilioError::bad_request(60200, "Invalid parameter `To`"));
    }
    let channel = first(&form, "Channel").unwrap_or_default().to_owned();
    if !matches!(channel.as_str(), "sms" | "call" | "whatsapp" | "email") {
        return Err(TwilioError::bad_request(
            60200,
            "Invalid parameter: Channel",
        ));
    }
    let mut state = shared.lock();
    let key = (service.to_owned(), to.clone());
    let live = state
        .verifications
        .get(&key)
        .filter(|p| p.started.elapsed() < VERIFICATION_TTL)
        .cloned();
    let pending = match live {
        Some(mut p) => {
            if p.sends >= MAX_SENDS {
                return Err(TwilioError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    60203,
                    "Max send attempts reached",
                ));
            }
            p.sends += 1;
            p
        }
        None => Pending {
            sid: new_sid("VE"),
            code: format!("{:06}", rand::random::<u32>() % 1_000_000),
            channel,
            started: Instant::now(),
            created: OffsetDateTime::now_utc(),
            sends: 1,
            checks: 0,
        },
    };
    state.verifications.insert(key, pending.clone());
    state.sms.push((to.clone(), pending.code.clone()));
    drop(state);
    tracing::info!(
        fake = "twilio-verify",
        to = %to,
        code = %pending.code,
        "SMS to {to}: your Call Me Back code is {}",
        pending.code
    );
    Ok(verification_json(shared, &to, &pending, "pending"))
}

async fn check(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/v2/Services/{service}/VerificationCheck");
    respond(
        StatusCode::OK,
        check_inner(&shared, &headers, &service, &path, &body),
    )
}

fn check_inner(
    shared: &Shared,
    headers: &HeaderMap,
    service: &str,
    path: &str,
    body: &[u8],
) -> Result<Value, TwilioError> {
    service_ok(shared, headers, service, path)?;
    let form = parse_form(body)?;
    let to = first(&form, "To").unwrap_or_default().to_owned();
    let code = first(&form, "Code").unwrap_or_default().to_owned();
    if to.is_empty() || code.is_empty() {
        return Err(TwilioError::bad_request(
            60200,
            "Invalid parameter: To and Code are required",
        ));
    }
    let mut state = shared.lock();
    let key = (service.to_owned(), to.clone());
    let Some(p) = state
        .verifications
        .get_mut(&key)
        .filter(|p| p.started.elapsed() < VERIFICATION_TTL)
    else {
        return Err(TwilioError::not_found(path));
    };
    if p.checks >= MAX_CHECKS {
        return Err(TwilioError::new(
            StatusCode::TOO_MANY_REQUESTS,
            60202,
            "Max check attempts reached",
        ));
    }
    p.checks += 1;
    let approved = p.code == code;
    let p = p.clone();
    if approved {
        state.verifications.remove(&key);
    }
    drop(state);
    Ok(verification_json(
        shared,
        &to,
        &p,
        if approved { "approved" } else { "pending" },
    ))
}
