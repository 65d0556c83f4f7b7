//! Who is calling: bearer-token authentication (JWT signature and expiry, revocation in
//! KV, the account reloaded on every request so a ban or a lost admin role takes effect at
//! once) and the role checks every route uses.
//!
//! The role is the account's, read on every request. The token's `role` claim is only
//! informative for clients: a token issued while its holder was an admin grants nothing
//! once an operator revoked the role (`cargo xtask admin revoke`).

use cmb_core::jwt::{self, Claims, Role};

use crate::error::{ApiError, ApiResult};
use crate::store::UserRow;
use crate::Ctx;
use worker::Request;

/// An authenticated caller.
pub struct Session {
    pub user: UserRow,
    pub claims: Claims,
}

impl Session {
    /// Whether the account is an admin now (never from the token's claim).
    pub fn is_admin(&self) -> bool {
        self.user.role == Role::Admin
    }
}

/// Authenticates the bearer token: signature and expiry, then revocation (KV), then the
/// user (exists, not erased, not banned).
pub async fn authenticate(req: &Request, ctx: &Ctx) -> ApiResult<Session> {
    let header = req.headers().get("authorization").ok().flatten();
    let Some(token) = header.as_deref().and_then(|h| h.strip_prefix("Bearer ")) else {
        return Err(ApiError::unauthorized("Missing bearer token."));
    };
    let claims = jwt::decode(
        ctx.cfg.jwt_secret.expose().as_bytes(),
        token.trim(),
        ctx.now_secs(),
    )
    .map_err(|e| ApiError::unauthorized(format!("Invalid token: {e}.")))?;
    let revoked = ctx
        .kv()?
        .get(&claims.jti)
        .text()
        .await
        .map_err(|e| ApiError::internal("kv get", e))?;
    if revoked.is_some() {
        return Err(ApiError::unauthorized("This token has been revoked."));
    }
    // An erased account keeps its row (the ledger needs it) but no token of it works
    // again: every one issued before the erasure ends here.
    let Some(user) = ctx
        .store
        .user_by_id(&claims.sub)
        .await?
        .filter(|u| u.erased_at.is_none())
    else {
        return Err(ApiError::unauthorized("This account no longer exists."));
    };
    if user.is_banned {
        return Err(ApiError::forbidden("This account is suspended.").with_code("account_banned"));
    }
    Ok(Session { user, claims })
}

/// Authenticates when a token is present; anonymous otherwise. A present but invalid
/// token is still an error, so a client never silently loses its identity.
pub async fn optional_session(req: &Request, ctx: &Ctx) -> ApiResult<Option<Session>> {
    match req.headers().get("authorization").ok().flatten() {
        Some(_) => authenticate(req, ctx).await.map(Some),
        None => Ok(None),
    }
}

/// Authenticates an admin: 401 without a valid token, 403 for anyone not an admin now.
pub async fn require_admin(req: &Request, ctx: &Ctx) -> ApiResult<Session> {
    let session = authenticate(req, ctx).await?;
    if !session.is_admin() {
        return Err(ApiError::forbidden("This route is for admins only."));
    }
    Ok(session)
}

/// The media relay's own requests: `Authorization: Bearer <RELAY_SECRET>`, compared in
/// constant time.
pub fn require_relay(req: &Request, ctx: &Ctx) -> ApiResult<()> {
    let header = req
        .headers()
        .get("authorization")
        .ok()
        .flatten()
        .unwrap_or_default();
    let presented = header.strip_prefix("Bearer ").unwrap_or("");
    if cmb_core::password::hashes_equal(
        presented.as_bytes(),
        ctx.cfg.relay_secret.expose().as_bytes(),
    ) {
        Ok(())
    } else {
        Err(ApiError::unauthorized("Invalid relay credentials."))
    }
}
