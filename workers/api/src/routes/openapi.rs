//! `GET /openapi.json`: the API's OpenAPI 3.1 document, as checked in
//! (`workers/core/openapi.json`, kept equal to the route table by `cmb_core`'s tests).
//!
//! The document is a static asset (`cargo xtask build-worker` copies it into
//! `build/assets/`, wrangler.toml `[assets]`), not compiled into the wasm, where its 300 KB
//! would weigh on the upload's size budget. The Worker answers the route itself (assets
//! run behind it: `run_worker_first`), so the answer has the same CORS headers and request
//! id as every other. It needs no configuration, storage or caller.

use worker::{Env, Response};

use crate::error::{ApiError, ApiResult};

/// The assets binding in wrangler.toml.
const ASSETS_BINDING: &str = "ASSETS";

pub async fn document(env: &Env) -> ApiResult<Response> {
    let assets = env
        .assets(ASSETS_BINDING)
        .map_err(|e| ApiError::internal("binding ASSETS missing (wrangler.toml [assets])", e))?;
    // The host is not looked at: the asset server answers by path.
    let mut asset = assets
        .fetch("https://assets.invalid/openapi.json", None)
        .await
        .map_err(|e| ApiError::internal("fetching the openapi.json asset", e))?;
    if asset.status_code() != 200 {
        return Err(ApiError::internal(
            "the openapi.json asset",
            format!(
                "answered {} (was build/assets/ built by `cargo xtask build-worker`?)",
                asset.status_code()
            ),
        ));
    }
    let body = asset
        .bytes()
        .await
        .map_err(|e| ApiError::internal("reading the openapi.json asset", e))?;
    let mut resp = Response::from_bytes(body)?;
    resp.headers_mut().set("content-type", "application/json")?;
    Ok(resp)
}
