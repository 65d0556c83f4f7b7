//! The Worker's static assets (wrangler.toml `[assets]`, binding `ASSETS`), read through
//! the binding: `cargo xtask build-worker` fills `build/assets/`, and the Worker runs
//! first on every request (`run_worker_first`), so what it serves from there carries the
//! same CORS headers and request id as every other answer.

use worker::Env;

use crate::error::{ApiError, ApiResult};

/// The assets binding in wrangler.toml.
const ASSETS_BINDING: &str = "ASSETS";

/// The bytes of the asset at `path` (from the assets directory's root, with a leading
/// `/`), or `None` when there is no such file.
pub async fn read(env: &Env, path: &str) -> ApiResult<Option<Vec<u8>>> {
    let assets = env
        .assets(ASSETS_BINDING)
        .map_err(|e| ApiError::internal("binding ASSETS missing (wrangler.toml [assets])", e))?;
    // The host is not looked at: the asset server answers by path.
    let mut asset = assets
        .fetch(format!("https://assets.invalid{path}"), None)
        .await
        .map_err(|e| ApiError::internal("fetching a static asset", e))?;
    match asset.status_code() {
        200 => {}
        404 => return Ok(None),
        other => {
            return Err(ApiError::internal(
                "a static asset",
                format!("{path} answered {other}"),
            ))
        }
    }
    let body = asset
        .bytes()
        .await
        .map_err(|e| ApiError::internal("reading a static asset", e))?;
    Ok(Some(body))
}
