//! Twilio webhooks: the TwiML that connects an answered call to the media relay, and the
//! call-progress status callback.
//!
//! Both verify `X-Twilio-Signature` over `PUBLIC_BASE_URL` + path + query and the form
//! parameters before acting on anything; a bad signature, or a call we do not know, is a
//! 403 that changes nothing.

use cmb_core::{stream_token, twilio_sig, twiml};
use serde_json::json;
use worker::{Request, Response};

use crate::crypto;
use crate::error::{ApiError, ApiResult};
use crate::http::{no_content, read_body};
use crate::session::session_op;
use crate::session::SessionOp;
use crate::Ctx;

/// How long a stream token stays valid: the relay must receive `start` within this.
const STREAM_TOKEN_TTL_SECS: i64 = 120;
const FALLBACK_SAY: &str =
    "Sorry, we lost the connection to your call. Please try again in a moment. Goodbye.";

/// A verified Twilio webhook: its call id and form parameters.
struct Verified {
    call_id: String,
    params: Vec<(String, String)>,
}

async fn verify(mut req: Request, ctx: &Ctx) -> ApiResult<Verified> {
    let url = req.url()?;
    let forbidden =
        || ApiError::forbidden("Invalid Twilio signature.").with_code("invalid_signature");
    let signature = req
        .headers()
        .get("x-twilio-signature")
        .ok()
        .flatten()
        .ok_or_else(forbidden)?;
    let body = read_body(&mut req).await?;
    let params: Vec<(String, String)> =
        serde_urlencoded::from_bytes(&body).map_err(|_| forbidden())?;
    // Rebuild the URL Twilio signed from our public origin, not from the local request
    // (proxies and tunnels change scheme, host and port).
    let signed_url = match url.query() {
        Some(q) => format!("{}{}?{q}", ctx.cfg.public_base_url, url.path()),
        None => format!("{}{}", ctx.cfg.public_base_url, url.path()),
    };
    if !twilio_sig::validate_request(
        ctx.cfg.twilio_auth_token.expose(),
        &signed_url,
        &params,
        &signature,
    ) {
        crate::log::warn(
            "twilio_signature_refused",
            json!({ "request_id": ctx.request_id, "path": url.path() }),
        );
        return Err(forbidden());
    }
    let call_id = url
        .query_pairs()
        .find(|(k, _)| k == "callId")
        .map(|(_, v)| v.into_owned())
        .ok_or_else(forbidden)?;
    // Signed but for a call we never placed: refuse the same way.
    if ctx.store.call(&call_id).await?.is_none() {
        return Err(forbidden());
    }
    Ok(Verified { call_id, params })
}

fn twiml_response(xml: String) -> ApiResult<Response> {
    let mut resp = Response::ok(xml)?;
    resp.headers_mut()
        .set("content-type", "text/xml; charset=utf-8")?;
    Ok(resp)
}

pub async fn twiml(req: Request, ctx: &Ctx) -> ApiResult<Response> {
    let v = verify(req, ctx).await?;
    let get = |name: &str| {
        v.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, val)| val.clone())
    };
    let answered_by = get("AnsweredBy");
    let _: serde_json::Value = session_op(
        ctx,
        &v.call_id,
        &SessionOp::Answered {
            answered_by: answered_by.clone(),
        },
    )
    .await?;
    let machine = answered_by
        .as_deref()
        .is_some_and(cmb_core::calls::is_machine);
    if machine {
        // Twilio waited for the beep (`DetectMessageEnd`): the stream connects as for a
        // person, and the session has the persona leave its voicemail line.
        crate::log::info(
            "answering_machine",
            json!({ "request_id": ctx.request_id, "call_id": v.call_id, "answered_by": answered_by }),
        );
    }
    let nonce = crypto::uuid().map_err(|e| ApiError::internal("nonce", e))?;
    let token = stream_token::mint(
        ctx.cfg.relay_secret.expose(),
        &v.call_id,
        ctx.now_secs() + STREAM_TOKEN_TTL_SECS,
        &nonce,
    );
    let action = format!(
        "{}/api/voice/stream-ended?callId={}",
        ctx.cfg.public_base_url, v.call_id
    );
    let xml = twiml::connect_stream(
        &ctx.cfg.relay_url,
        &[
            ("callId", v.call_id.as_str()),
            ("streamToken", token.as_str()),
            // A person hears the greeting the relay synthesized while the phone rang; a
            // machine gets the voicemail line from `hello` instead.
            ("greeting", if machine { "none" } else { "prepared" }),
        ],
        &action,
    );
    twiml_response(xml)
}

/// Twilio's `<Connect action>`: the media stream ended while the call is still up. If we
/// ended the conversation on purpose (goodbye said), hang up; otherwise the relay could
/// not be reached or dropped the call, so apologise before hanging up — never silence.
pub async fn stream_ended(req: Request, ctx: &Ctx) -> ApiResult<Response> {
    let v = verify(req, ctx).await?;
    let outcome: crate::session::StreamEndedOutcome =
        session_op(ctx, &v.call_id, &SessionOp::StreamEnded).await?;
    if outcome.graceful {
        return twiml_response(twiml::say_and_hangup(""));
    }
    crate::log::warn(
        "stream_ended_unexpectedly",
        json!({ "request_id": ctx.request_id, "call_id": v.call_id }),
    );
    twiml_response(twiml::say_and_hangup(FALLBACK_SAY))
}

pub async fn status(req: Request, ctx: &Ctx) -> ApiResult<Response> {
    let v = verify(req, ctx).await?;
    let _: serde_json::Value = session_op(
        ctx,
        &v.call_id,
        &SessionOp::TwilioStatus { params: v.params },
    )
    .await?;
    no_content()
}
