//! Accounts: register, login, logout and `me`. Authenticating the other routes' callers
//! is `http::auth`.
//!
//! Tokens are HS256 JWTs (`cmb_core::jwt`); logout revokes a token by putting its `jti`
//! in KV `TOKEN_BLACKLIST` until the token would have expired anyway. Every authenticated
//! request also reloads the user, so a ban takes effect on the very next request.

use cmb_core::jwt::{self, Claims};
use cmb_core::validate;
use serde::Deserialize;
use serde_json::json;
use worker::{Request, Response};

use crate::crypto;
use crate::error::{ApiError, ApiResult};
use crate::http::auth::authenticate;
use crate::http::{json, json_body, no_content};
use crate::store::{UserRow, WriteConflict};
use crate::Ctx;

/// Lifetime of an access token.
pub const TOKEN_TTL_SECS: i64 = 24 * 3600;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    email: String,
    password: String,
    name: String,
    #[serde(default, alias = "phoneNumber")]
    phone_number: Option<String>,
}

#[derive(Deserialize)]
struct LoginBody {
    email: String,
    password: String,
}

fn issue_token(ctx: &Ctx, user: &UserRow) -> ApiResult<String> {
    let now = ctx.now_secs();
    let claims = Claims {
        sub: user.id.clone(),
        jti: crypto::uuid().map_err(|e| ApiError::internal("jti", e))?,
        iat: now,
        exp: now + TOKEN_TTL_SECS,
        role: user.role,
    };
    jwt::encode(ctx.cfg.jwt_secret.expose().as_bytes(), &claims)
        .map_err(|e| ApiError::internal("jwt encode", e))
}

pub async fn register(mut req: Request, ctx: &Ctx) -> ApiResult<Response> {
    let body: RegisterBody = json_body(&mut req).await?;
    let mut problems = Vec::new();
    let email = validate::email(&body.email)
        .map_err(|e| problems.push(e))
        .ok();
    let name = validate::name(&body.name)
        .map_err(|e| problems.push(e))
        .ok();
    let _ = cmb_core::password::check_password_policy(&body.password).map_err(|e| problems.push(e));
    let phone = match body
        .phone_number
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        Some(p) => validate::e164(p).map_err(|e| problems.push(e)).ok(),
        None => None,
    };
    let (Some(email), Some(name), true) = (email, name, problems.is_empty()) else {
        return Err(problems.into());
    };
    // Before the costly hash; a taken email counts too (it is how accounts are probed).
    crate::http::limits::registration(&req, ctx).await?;

    let hash = crypto::hash_password(&body.password)
        .await
        .map_err(|e| ApiError::internal("hash password", e))?;
    let id = crypto::uuid().map_err(|e| ApiError::internal("uuid", e))?;
    let now = ctx.now_iso();
    // Always a plain user with no credits: admins are granted by an operator, and the
    // free credits come with the first verification of a phone number (`routes::phone`).
    let created = ctx
        .store
        .create_user(&id, &email, &name, phone.as_deref(), &hash, &now)
        .await?;
    if let Err(WriteConflict::Duplicate) = created {
        return Err(ApiError::conflict(
            "email_taken",
            "An account with this email already exists.",
        ));
    } else if let Err(e) = created {
        return Err(ApiError::internal("create user", format!("{e:?}")));
    }
    let user = ctx
        .store
        .user_by_id(&id)
        .await?
        .ok_or_else(|| ApiError::internal("create user", "user missing after insert"))?;
    // The address that registered is the owner's: never slowed down at login.
    ctx.store
        .set_last_login_ip(&user.id, &crate::http::limits::client_ip(&req))
        .await?;
    let token = issue_token(ctx, &user)?;
    crate::log::info(
        "user_registered",
        json!({ "request_id": ctx.request_id, "user_id": user.id }),
    );
    json(201, &json!({ "token": token, "user": user.view() }))
}

pub async fn login(mut req: Request, ctx: &Ctx) -> ApiResult<Response> {
    let body: LoginBody = json_body(&mut req).await?;
    let invalid = || {
        ApiError::new(
            401,
            "invalid_credentials",
            "Email or password is incorrect.",
        )
    };
    // An email that cannot be valid cannot have an account; answer exactly as for a wrong
    // password, after the same amount of hashing work.
    let email = validate::email(&body.email).ok();
    // An erased account is answered like an unknown email (its password hash never
    // verifies anyway, and its email is a tombstone nobody registered).
    let user = match &email {
        Some(email) => ctx
            .store
            .user_by_email(email)
            .await?
            .filter(|u| u.erased_at.is_none()),
        None => None,
    };
    // Counted before the password is checked, given back on success (see `limits`).
    let attempt =
        crate::http::limits::login_attempt(&req, ctx, email.as_deref(), user.as_ref()).await?;
    let Some(user) = user else {
        crypto::dummy_verify(&body.password)
            .await
            .map_err(|e| ApiError::internal("dummy verify", e))?;
        return Err(invalid());
    };
    let ok = crypto::verify_password(&body.password, &user.password_hash)
        .await
        .map_err(|e| ApiError::internal("verify password", e))?;
    if !ok {
        return Err(invalid());
    }
    attempt.succeeded(ctx, &user.id).await?;
    if user.is_banned {
        return Err(ApiError::forbidden("This account is suspended.").with_code("account_banned"));
    }
    let token = issue_token(ctx, &user)?;
    json(200, &json!({ "token": token, "user": user.view() }))
}

pub async fn logout(req: &Request, ctx: &Ctx) -> ApiResult<Response> {
    let session = authenticate(req, ctx).await?;
    let ttl = (session.claims.exp - ctx.now_secs()).max(60);
    ctx.kv()?
        .put(&session.claims.jti, "revoked")
        .map_err(|e| ApiError::internal("kv put", e))?
        .expiration_ttl(ttl as u64)
        .execute()
        .await
        .map_err(|e| ApiError::internal("kv put", e))?;
    no_content()
}

pub async fn me(req: &Request, ctx: &Ctx) -> ApiResult<Response> {
    let session = authenticate(req, ctx).await?;
    json(200, &json!({ "user": session.user.view() }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MeUpdate {
    name: Option<String>,
    timezone: Option<String>,
}

/// `PATCH /api/me {name?, timezone?}`: the caller's display name and IANA time zone
/// (the persona's prompt states the caller's local time in it). Every field is
/// validated before anything is written.
pub async fn update_me(mut req: Request, ctx: &Ctx) -> ApiResult<Response> {
    let session = authenticate(&req, ctx).await?;
    let body: MeUpdate = json_body(&mut req).await?;
    let mut errors = Vec::new();
    let name = body
        .name
        .as_deref()
        .map(validate::name)
        .transpose()
        .unwrap_or_else(|e| {
            errors.push(e);
            None
        });
    let timezone = body
        .timezone
        .as_deref()
        .map(cmb_core::tz::parse)
        .transpose()
        .unwrap_or_else(|e| {
            errors.push(e);
            None
        });
    if !errors.is_empty() {
        return Err(errors.into());
    }
    ctx.store
        .update_profile(
            &session.user.id,
            name.as_deref(),
            timezone.as_deref(),
            &ctx.now_iso(),
        )
        .await?;
    let user = ctx
        .store
        .user_by_id(&session.user.id)
        .await?
        .ok_or_else(|| ApiError::internal("update me", "user missing after update"))?;
    json(200, &json!({ "user": user.view() }))
}
