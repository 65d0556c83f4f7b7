//! What every booking route checks the same way: the number it may call and the persona
//! it may call with (`POST /api/calls/trigger`, `/schedule`, `/api/schedules`).

use serde_json::json;

use crate::error::{ApiError, ApiResult};
use crate::http::auth::Session;
use crate::Ctx;

/// The number to call (`cmb_core::destination::for_call`: the account's verified phone,
/// and only that).
pub fn destination(ctx: &Ctx, session: &Session, given: Option<&str>) -> ApiResult<String> {
    use cmb_core::destination::{for_call, CallRefusal};
    for_call(
        given,
        session.user.verified_phone(),
        &ctx.cfg.allowed_countries,
    )
    .map_err(|r| match r {
        CallRefusal::Invalid(e) => e.into(),
        CallRefusal::NotVerified { asked } => {
            let message = if asked {
                "We only call your own verified number. Verify this number first (POST /api/me/phone)."
            } else {
                "Verify your phone number first (POST /api/me/phone); we only call that number."
            };
            ApiError::new(403, "phone_not_verified", message)
                .with_details(json!([{ "field": "phone_number" }]))
        }
        CallRefusal::Destination(r) => crate::http::unsupported_destination(&r),
    })
}

/// The persona must exist, be active, and be visible to the caller.
pub async fn usable_persona(ctx: &Ctx, session: &Session, id: &str) -> ApiResult<()> {
    let persona = ctx.store.persona(id).await?;
    match persona {
        Some(p) if p.usable_by(&session.user.id) => Ok(()),
        _ => Err(ApiError::bad_request(
            "invalid_persona",
            "This persona does not exist or is not available.",
        )
        .with_details(json!([{ "field": "persona_id" }]))),
    }
}
