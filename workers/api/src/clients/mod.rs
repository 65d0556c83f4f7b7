//! Outbound provider clients: each request has a deadline, and errors name the provider.
//!
//! The request plumbing every client shares lives here: headers, a form or JSON body,
//! and [`send`], which aborts the fetch, body included, at its deadline. Each client
//! keeps only its own wire format: URLs, auth, and how its provider spells an error.

pub mod llm;
pub mod stripe;
pub mod twilio;
pub mod verify;

use std::time::Duration;

use futures::FutureExt as _;
use serde::Serialize;
use worker::{AbortController, Delay, Fetch, Headers, Method, Request, RequestInit};

/// Why a request got no HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The request could not be built (a body that does not encode, a bad header).
    #[error("{0}")]
    Encode(String),
    /// The network or the runtime failed.
    #[error("{0}")]
    Transport(String),
    /// No whole answer within the deadline; the fetch was aborted.
    #[error("no answer within {ms} ms")]
    Timeout { ms: u32 },
}

/// An HTTP answer, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text for an error message, cut to `max` characters.
    pub fn snippet(&self, max: usize) -> String {
        String::from_utf8_lossy(&self.body)
            .chars()
            .take(max)
            .collect()
    }
}

/// A request body and its content type.
pub enum Body {
    /// `application/x-www-form-urlencoded` (Twilio, Stripe).
    Form(String),
    /// `application/json` (the LLM).
    Json(String),
}

impl Body {
    /// Form-encodes `fields` (pairs, repeats allowed, in order).
    pub fn form<T: Serialize + ?Sized>(fields: &T) -> Result<Body, SendError> {
        serde_urlencoded::to_string(fields)
            .map(Body::Form)
            .map_err(|e| SendError::Encode(format!("could not encode request: {e}")))
    }
}

/// Builds a request: method, URL, headers, and an optional body with its content type.
pub fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Body>,
) -> Result<Request, SendError> {
    let encode = |e: worker::Error| SendError::Encode(e.to_string());
    let h = Headers::new();
    for (name, value) in headers {
        h.set(name, value).map_err(encode)?;
    }
    let mut init = RequestInit::new();
    init.with_method(method);
    if let Some(body) = body {
        let (content_type, text) = match body {
            Body::Form(t) => ("application/x-www-form-urlencoded", t),
            Body::Json(t) => ("application/json", t),
        };
        h.set("content-type", content_type).map_err(encode)?;
        init.with_body(Some(text.into()));
    }
    init.with_headers(h);
    Request::new_with_init(url, &init).map_err(encode)
}

/// Sends `req` and reads the whole answer, aborting both at `deadline_ms`.
pub async fn send(req: Request, deadline_ms: u32) -> Result<Answer, SendError> {
    let transport = |e: worker::Error| SendError::Transport(e.to_string());
    let controller = AbortController::default();
    let signal = controller.signal();
    let exchange = async {
        let mut resp = Fetch::Request(req)
            .send_with_signal(&signal)
            .await
            .map_err(transport)?;
        let status = resp.status_code();
        let body = resp.bytes().await.map_err(transport)?;
        Ok(Answer { status, body })
    }
    .fuse();
    let timer = Delay::from(Duration::from_millis(u64::from(deadline_ms))).fuse();
    futures::pin_mut!(exchange, timer);
    futures::select! {
        answer = exchange => answer,
        () = timer => {
            controller.abort();
            Err(SendError::Timeout { ms: deadline_ms })
        }
    }
}
