//! The account's phone number, proved by an SMS code (Twilio Verify): the only number
//! we ever call for this account.
//!
//! `POST /api/me/phone` checks the destination (country and range, `cmb_core::
//! destination`) and the start limits before anything is sent; `POST /api/me/phone/
//! verify` checks the code with Twilio and, once approved, records the number as the
//! account's and grants the free credits if no account ever verified it before.

use cmb_core::validate;
use serde::Deserialize;
use serde_json::json;
use worker::{Request, Response};

use crate::clients::twilio::TwilioError;
use crate::clients::verify::{self, Check};
use crate::crypto;
use crate::error::{ApiError, ApiResult};
use crate::http::auth::authenticate;
use crate::http::{json, json_body};
use crate::Ctx;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    #[serde(alias = "phoneNumber")]
    phone_number: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBody {
    #[serde(alias = "phoneNumber")]
    phone_number: String,
    code: String,
}

/// A Verify failure as the caller should see it (PROTOCOLS.md §8's codes).
fn verify_error(ctx: &Ctx, e: TwilioError) -> ApiError {
    crate::log::warn(
        "verify_failed",
        json!({ "request_id": ctx.request_id, "provider": "twilio_verify", "status": e.status, "code": e.code }),
    );
    match e.code {
        60200 => ApiError::bad_request(
            "invalid_phone_number",
            "Twilio cannot send a code to this number.",
        ),
        60202 | 60203 => ApiError::new(
            429,
            "rate_limited",
            "Too many attempts for this number. Try again later.",
        )
        .with_details(json!({ "retry_after": 600 })),
        60410 | 60605 => ApiError::bad_request(
            "unsupported_destination",
            "We cannot send codes to this number.",
        ),
        _ => ApiError::new(
            502,
            "verification_provider_error",
            "The verification service did not answer. Try again shortly.",
        ),
    }
}

pub async fn start(mut req: Request, ctx: &Ctx) -> ApiResult<Response> {
    let session = authenticate(&req, ctx).await?;
    let body: StartBody = json_body(&mut req).await?;
    let phone = validate::e164(&body.phone_number)?;
    cmb_core::destination::check(&phone, &ctx.cfg.allowed_countries)
        .map_err(|r| crate::http::unsupported_destination(&r))?;
    crate::http::limits::verification_start(&req, ctx, &session.user).await?;
    verify::start(&ctx.cfg, &phone)
        .await
        .map_err(|e| verify_error(ctx, e))?;
    crate::log::info(
        "phone_verification_started",
        json!({ "request_id": ctx.request_id, "user_id": session.user.id }),
    );
    json(
        202,
        &json!({ "verification": { "phone_number": phone, "status": "pending", "channel": "sms" } }),
    )
}

pub async fn verify(mut req: Request, ctx: &Ctx) -> ApiResult<Response> {
    let session = authenticate(&req, ctx).await?;
    let body: VerifyBody = json_body(&mut req).await?;
    let phone = validate::e164(&body.phone_number)?;
    let code = body.code.trim();
    let invalid = |message: &str| {
        ApiError::bad_request("invalid_code", message.to_owned())
            .with_details(json!([{ "field": "code" }]))
    };
    if !(4..=10).contains(&code.len()) || !code.chars().all(|c| c.is_ascii_digit()) {
        return Err(invalid(
            "The code is the 4 to 10 digits in the SMS we sent.",
        ));
    }
    match verify::check(&ctx.cfg, &phone, code)
        .await
        .map_err(|e| verify_error(ctx, e))?
    {
        Check::Approved => {}
        Check::Wrong => {
            return Err(invalid(
                "That code is not right. Check the SMS and try again.",
            ))
        }
        Check::NotPending => {
            return Err(invalid(
                "This code has expired or was already used. Ask for a new one.",
            ))
        }
    }
    let grant_id = crypto::uuid().map_err(|e| ApiError::internal("uuid", e))?;
    let granted = ctx
        .store
        .set_verified_phone(
            &session.user.id,
            &phone,
            ctx.cfg.free_credits,
            &grant_id,
            &ctx.now_iso(),
        )
        .await?;
    crate::log::info(
        "phone_verified",
        json!({ "request_id": ctx.request_id, "user_id": session.user.id, "free_credits": granted }),
    );
    let user = ctx
        .store
        .user_by_id(&session.user.id)
        .await?
        .ok_or_else(|| ApiError::unauthorized("This account no longer exists."))?;
    json(200, &json!({ "user": user.view() }))
}
