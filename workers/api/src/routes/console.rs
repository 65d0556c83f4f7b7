//! `GET /admin` and `GET /admin/assets/:file`: the operators' console, static files from
//! `build/assets/admin/` with the headers `cmb_core::console` decides (a strict CSP among
//! them). The page signs an admin in and calls the JSON admin routes with their token;
//! serving it needs no configuration, storage or caller.

use cmb_core::console;
use worker::{Env, Response};

use crate::error::{ApiError, ApiResult};
use crate::http::assets;

/// `GET /admin`.
pub async fn page(env: &Env) -> ApiResult<Response> {
    serve(env, console::INDEX).await?.ok_or_else(|| {
        ApiError::internal(
            "the console's index.html asset",
            "missing (was build/assets/ built by `cargo xtask build-worker`?)",
        )
    })
}

/// `GET /admin/assets/:file`.
pub async fn asset(env: &Env, file: &str) -> ApiResult<Response> {
    serve(env, file)
        .await?
        .ok_or_else(|| ApiError::not_found("Console file"))
}

async fn serve(env: &Env, file: &str) -> ApiResult<Option<Response>> {
    let Some(content_type) = console::content_type(file) else {
        return Ok(None);
    };
    let path = format!("/{}/{file}", console::ASSET_DIR);
    let Some(body) = assets::read(env, &path).await? else {
        return Ok(None);
    };
    let mut resp = Response::from_bytes(body)?;
    let headers = resp.headers_mut();
    headers.set("content-type", content_type)?;
    for (name, value) in console::HEADERS {
        headers.set(name, value)?;
    }
    Ok(Some(resp))
}
