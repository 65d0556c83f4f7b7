//! Persona routes: the public catalog, users' own custom personas, and the admin-managed
//! catalog.
//!
//! Visibility: everyone sees active catalog personas; a custom persona is visible only to
//! its owner (and admins). Field rules and voice-setting ranges are `cmb_core::persona`'s;
//! this module only merges, authorises and stores.

use cmb_core::limits::CUSTOM_PERSONAS_PER_USER;
use cmb_core::persona::{PersonaFields, PersonaInput};
use serde::Deserialize;
use serde_json::json;
use worker::{Request, Response};

use crate::crypto;
use crate::error::{ApiError, ApiResult};
use crate::http::auth::{authenticate, optional_session, Session};
use crate::http::{json, json_body, no_content, page, query};
use crate::store::{PersonaRow, PersonaWrite};
use crate::Ctx;

fn write_of(f: &PersonaFields) -> PersonaWrite {
    PersonaWrite {
        name: f.name.clone(),
        description: f.description.clone(),
        system_prompt: f.system_prompt.clone(),
        greeting: f.greeting.clone(),
        voice_id: f.voice_id.clone(),
        stability: f.voice_settings.stability,
        similarity_boost: f.voice_settings.similarity_boost,
        style: f.voice_settings.style,
        speed: f.voice_settings.speed,
        avatar_url: f.avatar_url.clone(),
        category: f.category.clone(),
    }
}

/// Whether `viewer` may see `row` at all (inactive personas only for owner and admins).
fn visible(row: &PersonaRow, viewer: Option<&Session>) -> bool {
    let admin = viewer.is_some_and(Session::is_admin);
    let owner = match (&row.owner_id, viewer) {
        (Some(owner), Some(s)) => owner == &s.user.id,
        _ => false,
    };
    if admin || owner {
        return true;
    }
    row.owner_id.is_none() && row.is_active
}

/// Whether `session` may change `row`: its owner, or an admin.
fn may_edit(row: &PersonaRow, session: &Session) -> bool {
    session.is_admin() || row.owner_id.as_deref() == Some(session.user.id.as_str())
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<i64>,
    offset: Option<i64>,
}

/// `GET /api/personas[?limit&offset]`: a page (default 50, at most 200) and the total.
pub async fn list(req: &Request, ctx: &Ctx) -> ApiResult<Response> {
    let session = optional_session(req, ctx).await?;
    let q: ListQuery = query(req)?;
    let (limit, offset) = page(q.limit, q.offset)?;
    let viewer = session.as_ref().map(|s| s.user.id.as_str());
    let (rows, total) = ctx.store.list_personas(viewer, limit, offset).await?;
    let personas: Vec<_> = rows.iter().map(PersonaRow::view).collect();
    json(
        200,
        &json!({ "personas": personas, "total": total, "limit": limit, "offset": offset }),
    )
}

pub async fn get(req: &Request, ctx: &Ctx, id: &str) -> ApiResult<Response> {
    let session = optional_session(req, ctx).await?;
    let row = ctx
        .store
        .persona(id)
        .await?
        .filter(|row| visible(row, session.as_ref()))
        .ok_or_else(|| ApiError::not_found("Persona"))?;
    json(200, &json!({ "persona": row.view() }))
}

pub async fn create(mut req: Request, ctx: &Ctx) -> ApiResult<Response> {
    let session = authenticate(&req, ctx).await?;
    let input: PersonaInput = json_body(&mut req).await?;
    let fields = input.validate_create()?;
    let id = crypto::uuid().map_err(|e| ApiError::internal("uuid", e))?;
    // Admins curate the catalog; everyone else creates their own custom personas.
    let owner = if session.is_admin() {
        None
    } else {
        Some(session.user.id.as_str())
    };
    let max = CUSTOM_PERSONAS_PER_USER;
    if !ctx
        .store
        .insert_persona(&id, owner, &write_of(&fields), max, &ctx.now_iso())
        .await?
    {
        return Err(ApiError::conflict(
            "too_many_personas",
            format!("You can have at most {max} custom personas. Delete one to make room."),
        )
        .with_details(json!({ "limit": max })));
    }
    let row = ctx
        .store
        .persona(&id)
        .await?
        .ok_or_else(|| ApiError::internal("create persona", "row missing after insert"))?;
    json(201, &json!({ "persona": row.view() }))
}

pub async fn update(mut req: Request, ctx: &Ctx, id: &str) -> ApiResult<Response> {
    let session = authenticate(&req, ctx).await?;
    let row = editable(ctx, &session, id).await?;
    let input: PersonaInput = json_body(&mut req).await?;
    let mut fields = row.fields();
    input.apply_update(&mut fields)?;
    ctx.store
        .update_persona(id, &write_of(&fields), &ctx.now_iso())
        .await?;
    let row = ctx
        .store
        .persona(id)
        .await?
        .ok_or_else(|| ApiError::not_found("Persona"))?;
    json(200, &json!({ "persona": row.view() }))
}

pub async fn delete(req: &Request, ctx: &Ctx, id: &str) -> ApiResult<Response> {
    let session = authenticate(req, ctx).await?;
    editable(ctx, &session, id).await?;
    ctx.store.deactivate_persona(id, &ctx.now_iso()).await?;
    no_content()
}

/// A persona whose memory of the caller the session may read or clear: one it talks to
/// (a catalog persona, or its own), even retired, so a caller can always make a persona
/// forget. 404 otherwise, as for any persona it cannot see.
async fn remembering(ctx: &Ctx, session: &Session, id: &str) -> ApiResult<PersonaRow> {
    ctx.store
        .persona(id)
        .await?
        .filter(|row| row.owner_id.as_deref().is_none_or(|o| o == session.user.id))
        .ok_or_else(|| ApiError::not_found("Persona"))
}

/// `GET /api/personas/:id/memory`: what this persona remembers about the caller.
pub async fn memory(req: &Request, ctx: &Ctx, id: &str) -> ApiResult<Response> {
    let session = authenticate(req, ctx).await?;
    remembering(ctx, &session, id).await?;
    let memory = ctx.store.memory(&session.user.id, id).await?;
    let view = match memory {
        Some(m) => json!({
            "summary": m.summary,
            "updated_at": m.updated_at,
            "calls": m.calls,
            "last_call_at": m.last_call_at,
        }),
        None => json!({ "summary": null, "updated_at": null, "calls": 0, "last_call_at": null }),
    };
    json(200, &json!({ "memory": view }))
}

/// `DELETE /api/personas/:id/memory`: the persona forgets the caller; the next call
/// starts fresh.
pub async fn forget(req: &Request, ctx: &Ctx, id: &str) -> ApiResult<Response> {
    let session = authenticate(req, ctx).await?;
    remembering(ctx, &session, id).await?;
    ctx.store
        .delete_memory(&session.user.id, id, &ctx.now_iso())
        .await?;
    crate::log::info(
        "memory_deleted",
        json!({ "request_id": ctx.request_id, "user_id": session.user.id, "persona_id": id }),
    );
    no_content()
}

/// Loads a persona the session may change: 404 when it cannot even see it (so custom
/// personas' existence does not leak), 403 when it can see but not change it (catalog).
async fn editable(ctx: &Ctx, session: &Session, id: &str) -> ApiResult<PersonaRow> {
    let row = ctx
        .store
        .persona(id)
        .await?
        .filter(|row| visible(row, Some(session)))
        .ok_or_else(|| ApiError::not_found("Persona"))?;
    if !may_edit(&row, session) {
        return Err(ApiError::forbidden(
            "Only an admin can change catalog personas.",
        ));
    }
    if !row.is_active {
        return Err(ApiError::not_found("Persona"));
    }
    Ok(row)
}
