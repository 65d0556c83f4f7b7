//! `GET /openapi.json`: the API's OpenAPI 3.1 document, as checked in
//! (`workers/core/openapi.json`, kept equal to the route table by `cmb_core`'s tests).
//!
//! Served as is: it needs no configuration, storage or caller.

use worker::Response;

use crate::error::ApiResult;

pub fn document() -> ApiResult<Response> {
    let mut resp = Response::ok(cmb_core::http::openapi::DOCUMENT)?;
    resp.headers_mut().set("content-type", "application/json")?;
    Ok(resp)
}
