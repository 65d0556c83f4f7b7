//! `GET /openapi.json`: the API's OpenAPI 3.1 document, as checked in
//! (`workers/core/openapi.json`, kept equal to the route table by `cmb_core`'s tests).
//!
//! The document is a static asset (`cargo xtask build-worker` copies it into
//! `build/assets/`, wrangler.toml `[assets]`), not compiled into the wasm, where its 300 KB
//! would weigh on the upload's size budget. It needs no configuration, storage or caller.

use worker::{Env, Response};

use crate::error::{ApiError, ApiResult};
use crate::http::assets;

pub async fn document(env: &Env) -> ApiResult<Response> {
    let Some(body) = assets::read(env, "/openapi.json").await? else {
        return Err(ApiError::internal(
            "the openapi.json asset",
            "missing (was build/assets/ built by `cargo xtask build-worker`?)",
        ));
    };
    let mut resp = Response::from_bytes(body)?;
    resp.headers_mut().set("content-type", "application/json")?;
    Ok(resp)
}
