//! Request and response plumbing shared by every route: bounded JSON bodies, typed
//! decoding with clear 400s, JSON responses, query strings.
//!
//! Nothing here knows about users or calls.

pub mod assets;
pub mod auth;
pub mod booking;
pub mod idempotency;
pub mod limits;

use serde::de::DeserializeOwned;
use serde::Serialize;
use worker::{Request, Response};

use crate::error::{ApiError, ApiResult};

/// The client's `Idempotency-Key` header, trimmed, if it sent one; a 400
/// `invalid_idempotency_key` when it is not 1 to 100 letters, digits or `- _ . :`.
pub fn idempotency_key(req: &Request) -> ApiResult<Option<String>> {
    let Some(raw) = req.headers().get("idempotency-key").ok().flatten() else {
        return Ok(None);
    };
    let key = raw.trim();
    if !cmb_core::http::valid_idempotency_key(key) {
        return Err(ApiError::bad_request(
            "invalid_idempotency_key",
            format!(
                "Idempotency-Key must be 1 to {} letters, digits or - _ . :",
                cmb_core::http::IDEMPOTENCY_KEY_MAX
            ),
        ));
    }
    Ok(Some(key.to_owned()))
}

/// API.md: bodies over 64 KiB are refused.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Reads the raw body, refusing anything over [`MAX_BODY_BYTES`] — first by the declared
/// `Content-Length` (so an oversized body is not even read), then while it streams in (a
/// chunked body has no length header): reading stops at the first chunk past the limit,
/// so an endless body costs at most the limit plus one chunk of memory.
pub async fn read_body(req: &mut Request) -> ApiResult<Vec<u8>> {
    use futures::StreamExt;

    if let Ok(Some(len)) = req.headers().get("content-length") {
        if len
            .trim()
            .parse::<usize>()
            .map_or(true, |n| n > MAX_BODY_BYTES)
        {
            return Err(too_large());
        }
    }
    let unreadable = |e: worker::Error| {
        ApiError::bad_request(
            "unreadable_body",
            format!("Could not read the request body: {e}"),
        )
    };
    let mut stream = match req.stream() {
        Ok(stream) => stream,
        Err(worker::Error::BodyUsed) => {
            return Err(ApiError::internal("read body", "the body was already read"))
        }
        // A request without a body (a POST with none) has no stream to read.
        Err(_) => return Ok(Vec::new()),
    };
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(unreadable)?;
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            // Dropping the stream cancels the rest of the upload.
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn too_large() -> ApiError {
    ApiError::bad_request(
        "body_too_large",
        format!(
            "The request body is larger than {} KiB.",
            MAX_BODY_BYTES / 1024
        ),
    )
}

/// Reads and decodes a JSON body into `T`. Malformed JSON and wrong types are distinct,
/// stable codes (`malformed_json`, `invalid_body`) with serde's explanation in the message.
pub async fn json_body<T: DeserializeOwned>(req: &mut Request) -> ApiResult<T> {
    let body = read_body(req).await?;
    parse_json(&body)
}

pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "malformed_json",
            "The request body must be a JSON object.",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::bad_request("malformed_json", format!("Malformed JSON: {e}"))
            }
            Category::Data => ApiError::bad_request("invalid_body", format!("Invalid body: {e}")),
        }
    })
}

pub fn json<T: Serialize>(status: u16, value: &T) -> ApiResult<Response> {
    Ok(Response::from_json(value)?.with_status(status))
}

pub fn no_content() -> ApiResult<Response> {
    Ok(Response::empty()?.with_status(204))
}

/// Parses the query string into `T`, as a 400 when it does not fit.
pub fn query<T: DeserializeOwned>(req: &Request) -> ApiResult<T> {
    let url = req.url()?;
    serde_urlencoded::from_str(url.query().unwrap_or(""))
        .map_err(|e| ApiError::bad_request("invalid_query", format!("Invalid query string: {e}")))
}

/// Default and largest page of the admin lists.
const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 200;

/// Validated `limit`/`offset` of an admin list.
pub fn page(limit: Option<i64>, offset: Option<i64>) -> ApiResult<(i64, i64)> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    let offset = offset.unwrap_or(0);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be between 1 and {MAX_PAGE}."),
        ));
    }
    if offset < 0 {
        return Err(ApiError::bad_request(
            "invalid_query",
            "offset must not be negative.",
        ));
    }
    Ok((limit, offset))
}

/// The 400 for a number we will not call nor text (`cmb_core::destination`).
pub fn unsupported_destination(refusal: &cmb_core::destination::Refusal) -> ApiError {
    ApiError::bad_request("unsupported_destination", refusal.message())
        .with_details(serde_json::json!([{ "field": "phone_number" }]))
}
