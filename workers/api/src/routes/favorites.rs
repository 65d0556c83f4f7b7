//! Favourite personas: a user marks personas they like and lists them.
//!
//! Only personas the user can see (active catalog personas or their own) can be marked.

use serde::Deserialize;
use serde_json::json;
use worker::{Request, Response};

use crate::error::{ApiError, ApiResult};
use crate::http::auth::authenticate;
use crate::http::{json, json_body, no_content};
use crate::Ctx;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    #[serde(alias = "personaId")]
    persona_id: String,
}

pub async fn list(req: &Request, ctx: &Ctx) -> ApiResult<Response> {
    let session = authenticate(req, ctx).await?;
    let personas: Vec<_> = ctx
        .store
        .favorites(&session.user.id)
        .await?
        .iter()
        .map(|p| p.view())
        .collect();
    json(200, &json!({ "personas": personas }))
}

pub async fn add(mut req: Request, ctx: &Ctx) -> ApiResult<Response> {
    let session = authenticate(&req, ctx).await?;
    let body: AddBody = json_body(&mut req).await?;
    let visible = ctx
        .store
        .persona(&body.persona_id)
        .await?
        .filter(|p| p.is_active && p.owner_id.as_deref().is_none_or(|o| o == session.user.id));
    let Some(persona) = visible else {
        return Err(ApiError::not_found("Persona"));
    };
    ctx.store
        .add_favorite(&session.user.id, &persona.id, &ctx.now_iso())
        .await?;
    no_content()
}

pub async fn remove(req: &Request, ctx: &Ctx, persona_id: &str) -> ApiResult<Response> {
    let session = authenticate(req, ctx).await?;
    ctx.store
        .remove_favorite(&session.user.id, persona_id)
        .await?;
    no_content()
}
