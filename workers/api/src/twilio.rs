//! Twilio REST client (Calls resource) over the Workers `fetch`.
//!
//! Base URL is `TWILIO_API_BASE` (the real API by default; the fake in tests and the local
//! stack), so this exact code is what the tests exercise. Errors keep Twilio's own code
//! and message, because the call's failure reason shown to the user comes from them.

use base64::Engine as _;
use cmb_core::config::WorkerConfig;
use serde::Deserialize;
use worker::{Fetch, Headers, Method, Request, RequestInit};

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
}

fn calls_url(cfg: &WorkerConfig) -> String {
    format!(
        "{}/2010-04-01/Accounts/{}/Calls.json",
        cfg.twilio_api_base, cfg.twilio_account_sid
    )
}

async fn post_form(
    cfg: &WorkerConfig,
    url: &str,
    form: &[(&str, &str)],
) -> Result<Vec<u8>, TwilioError> {
    let body = serde_urlencoded::to_string(form).map_err(|e| TwilioError {
        status: 0,
        code: 0,
        message: format!("could not encode request: {e}"),
    })?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        cfg.twilio_account_sid,
        cfg.twilio_auth_token.expose()
    ));
    let transport = |e: worker::Error| TwilioError {
        status: 0,
        code: 0,
        message: format!("Twilio unreachable: {e}"),
    };
    let headers = Headers::new();
    headers
        .set("authorization", &format!("Basic {auth}"))
        .map_err(transport)?;
    headers
        .set("content-type", "application/x-www-form-urlencoded")
        .map_err(transport)?;
    let mut init = RequestInit::new();
    init.with_method(Method::Post)
        .with_headers(headers)
        .with_body(Some(body.into()));
    let req = Request::new_with_init(url, &init).map_err(transport)?;
    let mut resp = Fetch::Request(req).send().await.map_err(transport)?;
    let status = resp.status_code();
    let bytes = resp.bytes().await.map_err(transport)?;
    if (200..300).contains(&status) {
        return Ok(bytes);
    }
    let parsed: Option<ErrorBody> = serde_json::from_slice(&bytes).ok();
    Err(match parsed {
        Some(e) => TwilioError {
            status,
            code: e.code,
            message: e.message,
        },
        None => TwilioError {
            status,
            code: 0,
            message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
        },
    })
}

/// Creates the outbound call; returns its `CA…` sid.
pub async fn create_call(cfg: &WorkerConfig, dial: &Dial<'_>) -> Result<String, TwilioError> {
    let timeout = dial.timeout_secs.to_string();
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
        ("MachineDetection", "Enable"),
    ];
    let bytes = post_form(cfg, &calls_url(cfg), &form).await?;
    let call: CallBody = serde_json::from_slice(&bytes).map_err(|e| TwilioError {
        status: 201,
        code: 0,
        message: format!("unexpected create-call response: {e}"),
    })?;
    Ok(call.sid)
}

/// Ends a call: `completed` for a live call, `canceled` for one still queued or ringing.
pub async fn end_call(cfg: &WorkerConfig, sid: &str, status: &str) -> Result<(), TwilioError> {
    let url = format!(
        "{}/2010-04-01/Accounts/{}/Calls/{}.json",
        cfg.twilio_api_base, cfg.twilio_account_sid, sid
    );
    post_form(cfg, &url, &[("Status", status)])
        .await
        .map(|_| ())
}
