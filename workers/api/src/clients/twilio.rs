//! Twilio REST client (Calls resource) over the Workers `fetch`.
//!
//! Base URL is `TWILIO_API_BASE` (the real API by default; the fake in tests and the local
//! stack), so this exact code is what the tests exercise. Errors keep Twilio's own code
//! and message, because the call's failure reason shown to the user comes from them.

use base64::Engine as _;
use cmb_core::config::WorkerConfig;
use serde::Deserialize;
use std::time::Duration;

use worker::{Delay, Method};

use super::{request, send as send_request, Body, SendError};

/// A failed Twilio request: HTTP status, Twilio error code (0 when the body had none),
/// and a message fit for the call's `status_reason`.
#[derive(Debug, Clone)]
pub struct TwilioError {
    pub status: u16,
    pub code: i64,
    pub message: String,
}

impl std::fmt::Display for TwilioError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.code != 0 {
            write!(
                f,
                "Twilio error {} (HTTP {}): {}",
                self.code, self.status, self.message
            )
        } else {
            write!(f, "Twilio HTTP {}: {}", self.status, self.message)
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct CallBody {
    sid: String,
}

/// What to dial and where Twilio should call us back.
pub struct Dial<'a> {
    pub to: &'a str,
    pub twiml_url: &'a str,
    pub status_callback: &'a str,
    pub timeout_secs: u32,
    /// Twilio ends the call after this long whatever happens (a backstop).
    pub time_limit_secs: u32,
}

fn calls_url(cfg: &WorkerConfig) -> String {
    format!(
        "{}/2010-04-01/Accounts/{}/Calls.json",
        cfg.twilio_api_base, cfg.twilio_account_sid
    )
}

/// One request: Basic auth, an optional form body, a deadline (`TWILIO_TIMEOUT_MS`).
/// Transport failures and timeouts are status 0.
pub(super) async fn send(
    cfg: &WorkerConfig,
    method: Method,
    url: &str,
    form: Option<&[(&str, &str)]>,
) -> Result<Vec<u8>, TwilioError> {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        cfg.twilio_account_sid,
        cfg.twilio_auth_token.expose()
    ));
    let auth = format!("Basic {auth}");
    let answer = async {
        let body = form.map(Body::form).transpose()?;
        let req = request(method, url, &[("authorization", &auth)], body)?;
        send_request(req, cfg.twilio_timeout_ms).await
    }
    .await
    .map_err(|e| TwilioError {
        status: 0,
        code: 0,
        message: match e {
            SendError::Encode(m) => m,
            SendError::Transport(m) => format!("Twilio unreachable: {m}"),
            SendError::Timeout { ms } => format!("Twilio did not answer within {ms} ms"),
        },
    })?;
    if answer.is_success() {
        return Ok(answer.body);
    }
    let parsed: Option<ErrorBody> = serde_json::from_slice(&answer.body).ok();
    Err(match parsed {
        Some(e) => TwilioError {
            status: answer.status,
            code: e.code,
            message: e.message,
        },
        None => TwilioError {
            status: answer.status,
            code: 0,
            message: answer.snippet(200),
        },
    })
}

/// [`send`] for requests that are safe to repeat (fetches, and updates that set a final
/// status): up to three tries on 429, 5xx or no answer, with jittered backoff.
async fn send_idempotent(
    cfg: &WorkerConfig,
    method: Method,
    url: &str,
    form: Option<&[(&str, &str)]>,
) -> Result<Vec<u8>, TwilioError> {
    let mut attempt = 0u32;
    loop {
        match send(cfg, method.clone(), url, form).await {
            Err(e) if e.is_retryable() && attempt < 2 => {
                let jitter = crate::crypto::random_u32().unwrap_or(0) % 250;
                let wait = 250 * (1u64 << attempt) + u64::from(jitter);
                Delay::from(Duration::from_millis(wait)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

impl TwilioError {
    /// 429, 5xx, or no answer at all.
    pub fn is_retryable(&self) -> bool {
        self.status == 0 || self.status == 429 || self.status >= 500
    }
}

/// Creates the outbound call; returns its `CA…` sid. Never retried here: a create
/// without an answer may have succeeded (the session looks it up instead).
pub async fn create_call(cfg: &WorkerConfig, dial: &Dial<'_>) -> Result<String, TwilioError> {
    let timeout = dial.timeout_secs.to_string();
    let time_limit = dial.time_limit_secs.to_string();
    let form = [
        ("To", dial.to),
        ("From", cfg.twilio_phone_number.as_str()),
        ("Url", dial.twiml_url),
        ("Method", "POST"),
        ("StatusCallback", dial.status_callback),
        ("StatusCallbackMethod", "POST"),
        ("StatusCallbackEvent", "initiated"),
        ("StatusCallbackEvent", "ringing"),
        ("StatusCallbackEvent", "answered"),
        ("StatusCallbackEvent", "completed"),
        ("Timeout", timeout.as_str()),
        ("TimeLimit", time_limit.as_str()),
        // Answering machines are told apart, and the answer waits for the beep, so the
        // persona's voicemail is recorded whole.
        ("MachineDetection", "DetectMessageEnd"),
    ];
    let bytes = send(cfg, Method::Post, &calls_url(cfg), Some(&form)).await?;
    let call: CallBody = serde_json::from_slice(&bytes).map_err(|e| TwilioError {
        status: 201,
        code: 0,
        message: format!("unexpected create-call response: {e}"),
    })?;
    Ok(call.sid)
}

fn call_url(cfg: &WorkerConfig, sid: &str) -> String {
    format!(
        "{}/2010-04-01/Accounts/{}/Calls/{}.json",
        cfg.twilio_api_base, cfg.twilio_account_sid, sid
    )
}

/// Ends a call: `completed` for a live call, `canceled` for one still queued or ringing.
pub async fn end_call(cfg: &WorkerConfig, sid: &str, status: &str) -> Result<(), TwilioError> {
    send_idempotent(
        cfg,
        Method::Post,
        &call_url(cfg, sid),
        Some(&[("Status", status)]),
    )
    .await
    .map(|_| ())
}

/// A call resource as Twilio reports it.
#[derive(Debug, Deserialize)]
pub struct CallResource {
    pub sid: String,
    pub status: String,
    #[serde(default)]
    pub duration: Option<String>,
    #[serde(default)]
    pub answered_by: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
}

impl CallResource {
    pub fn duration_secs(&self) -> Option<u32> {
        self.duration.as_deref().and_then(|d| d.parse().ok())
    }
}

/// `GET Calls/{sid}.json`; `Ok(None)` when Twilio has no such call.
pub async fn fetch_call(
    cfg: &WorkerConfig,
    sid: &str,
) -> Result<Option<CallResource>, TwilioError> {
    match send_idempotent(cfg, Method::Get, &call_url(cfg, sid), None).await {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| TwilioError {
                status: 200,
                code: 0,
                message: format!("unexpected call resource: {e}"),
            }),
        Err(e) if e.status == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

/// The newest call to `to` created on or after `since_date` (`YYYY-MM-DD`, UTC), from
/// the Calls list (`To` and `StartTime>=` filters).
pub async fn find_call(
    cfg: &WorkerConfig,
    to: &str,
    since_date: &str,
) -> Result<Option<CallResource>, TwilioError> {
    #[derive(Deserialize)]
    struct Page {
        #[serde(default)]
        calls: Vec<CallResource>,
    }
    let query =
        serde_urlencoded::to_string([("To", to), ("StartTime>", since_date), ("PageSize", "20")])
            .map_err(|e| TwilioError {
            status: 0,
            code: 0,
            message: format!("could not encode query: {e}"),
        })?;
    let url = format!("{}?{query}", calls_url(cfg));
    let bytes = send_idempotent(cfg, Method::Get, &url, None).await?;
    let page: Page = serde_json::from_slice(&bytes).map_err(|e| TwilioError {
        status: 200,
        code: 0,
        message: format!("unexpected calls list: {e}"),
    })?;
    Ok(page
        .calls
        .into_iter()
        .find(|c| c.to.as_deref().is_none_or(|t| t == to)))
}
