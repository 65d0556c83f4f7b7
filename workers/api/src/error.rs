//! The Worker's one error type and its mapping to the JSON error format of API.md.
//!
//! Every route returns `Result<Response, ApiError>`; `ApiError::into_response` is the only
//! place that turns an error into HTTP. Client mistakes carry their own status and a stable
//! snake_case `code`; anything else is an internal error, answered with a generic message
//! and the request id (no internal detail leaks to clients) and logged once, with its
//! cause, at the request boundary (`lib.rs`).

use cmb_core::validate::ValidationError;
use serde_json::json;
use worker::Response;

#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// Extra machine-readable detail (e.g. which fields failed validation).
    pub details: Option<serde_json::Value>,
    /// What went wrong inside (internal errors only): logged, never sent.
    pub cause: Option<String>,
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
            cause: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(400, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "forbidden", message)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(404, "not_found", format!("{what} not found."))
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(409, code, message)
    }

    /// An unexpected failure of a dependency (database, KV, crypto). The boundary logs
    /// its cause; the client sees only that it was internal, and the request id.
    pub fn internal(context: &str, cause: impl std::fmt::Display) -> Self {
        let mut e = Self::new(500, "internal_error", "Something went wrong on our side.");
        e.cause = Some(format!("{context}: {cause}"));
        e
    }

    /// What to log about this error: the internal cause, else the client message.
    pub fn log_detail(&self) -> String {
        self.cause.clone().unwrap_or_else(|| self.message.clone())
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// The JSON body of API.md's error format, with `request_id`.
    pub fn body(&self, request_id: &str) -> serde_json::Value {
        let mut error =
            json!({ "code": self.code, "message": self.message, "request_id": request_id });
        if let Some(details) = &self.details {
            error["details"] = details.clone();
        }
        json!({ "error": error })
    }

    /// The JSON error of API.md, with `request_id` so a report can be matched to the logs.
    pub fn into_response(self, request_id: &str) -> worker::Result<Response> {
        // A 429's `details.retry_after` (seconds) is also the standard header.
        let retry_after = self
            .details
            .as_ref()
            .and_then(|d| d.get("retry_after"))
            .and_then(serde_json::Value::as_u64);
        let mut resp = Response::from_json(&self.body(request_id))?.with_status(self.status);
        if let Some(secs) = retry_after {
            resp.headers_mut().set("retry-after", &secs.to_string())?;
        }
        if self.status == 401 {
            // RFC 6750: say which scheme the API wants.
            resp.headers_mut()
                .set("www-authenticate", r#"Bearer realm="call-me-back""#)?;
        }
        Ok(resp)
    }
}

/// An error as it crosses an internal hop (a Durable Object answering the Worker): the
/// API's error object plus the internal cause, which only the receiving Worker reads.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct InternalReply {
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub cause: Option<String>,
}

impl ApiError {
    /// The reply of an internal hop: status, code and message as for a client, and the
    /// cause, so the receiving side can log it once at its boundary.
    pub fn into_internal_reply(self) -> worker::Result<Response> {
        let body = InternalReply {
            code: self.code.to_owned(),
            message: self.message,
            cause: self.cause,
        };
        Ok(Response::from_json(&json!({ "error": body }))?.with_status(self.status))
    }

    /// The error an internal hop answered with `status` and `body`. The receiver's own
    /// error is internal whatever the hop said: a route never sends a Durable Object a
    /// request it could refuse as the client's fault.
    pub fn from_internal_reply(hop: &str, status: u16, body: &str) -> Self {
        #[derive(serde::Deserialize)]
        struct Wrapped {
            error: InternalReply,
        }
        match serde_json::from_str::<Wrapped>(body) {
            Ok(Wrapped { error: e }) => ApiError::internal(
                hop,
                format!(
                    "{status} {}: {}",
                    e.code,
                    e.cause.as_deref().unwrap_or(&e.message)
                ),
            ),
            Err(_) => ApiError::internal(hop, format!("{status}: {body}")),
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        let details = json!([{ "field": e.field, "code": e.code, "message": e.message }]);
        ApiError::new(400, e.code, e.message).with_details(details)
    }
}

impl From<Vec<ValidationError>> for ApiError {
    fn from(errors: Vec<ValidationError>) -> Self {
        let Some(first) = errors.first() else {
            return ApiError::bad_request("invalid_input", "Invalid input.");
        };
        let code = first.code;
        let message = if errors.len() == 1 {
            first.message.clone()
        } else {
            let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
            format!("Invalid fields: {}.", fields.join(", "))
        };
        let details: Vec<_> = errors
            .iter()
            .map(|e| json!({ "field": e.field, "code": e.code, "message": e.message }))
            .collect();
        ApiError::new(400, code, message).with_details(serde_json::Value::Array(details))
    }
}

impl From<worker::Error> for ApiError {
    fn from(e: worker::Error) -> Self {
        ApiError::internal("worker", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Durable Object's failure reaches the route as an internal error that keeps the
    /// object's cause for the one log line, and never its status as the client's.
    #[test]
    fn an_internal_reply_becomes_an_internal_error_with_its_cause() {
        let body = r#"{"error":{"code":"internal_error","message":"Something went wrong on our side.","cause":"d1 batch: disk I/O error"}}"#;
        let e = ApiError::from_internal_reply("call session", 500, body);
        assert_eq!((e.status, e.code), (500, "internal_error"));
        assert_eq!(
            e.cause.as_deref(),
            Some("call session: 500 internal_error: d1 batch: disk I/O error")
        );

        let refused =
            r#"{"error":{"code":"invalid_input","message":"Bad session op: missing field `op`."}}"#;
        let e = ApiError::from_internal_reply("call session", 400, refused);
        assert_eq!(e.status, 500);
        assert_eq!(
            e.cause.as_deref(),
            Some("call session: 400 invalid_input: Bad session op: missing field `op`.")
        );

        let e = ApiError::from_internal_reply("call session", 502, "<html>bad gateway</html>");
        assert_eq!(
            e.cause.as_deref(),
            Some("call session: 502: <html>bad gateway</html>")
        );
    }
}
