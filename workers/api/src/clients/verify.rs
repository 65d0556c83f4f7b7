//! Twilio Verify (PROTOCOLS.md §8): start an SMS verification, check the code the user
//! typed. Twilio makes and sends the code; we never see it.
//!
//! Same account credentials and the same request helper (deadline, error parsing) as the
//! Calls client; only the base (`TWILIO_VERIFY_API_BASE`) differs, so the tests drive this
//! exact code against the fake.

use cmb_core::config::WorkerConfig;
use serde::Deserialize;
use worker::Method;

use super::twilio::{send, TwilioError};

#[derive(Deserialize)]
struct Verification {
    status: String,
    #[serde(default)]
    valid: bool,
}

fn url(cfg: &WorkerConfig, resource: &str) -> String {
    format!(
        "{}/v2/Services/{}/{resource}",
        cfg.twilio_verify_api_base, cfg.twilio_verify_service_sid
    )
}

fn decode(bytes: &[u8]) -> Result<Verification, TwilioError> {
    serde_json::from_slice(bytes).map_err(|e| TwilioError {
        status: 200,
        code: 0,
        message: format!("unexpected Verify response: {e}"),
    })
}

/// Starts (or, while one is pending, resends) an SMS verification to `to`. Not retried:
/// a repeat would send the user a second SMS.
pub async fn start(cfg: &WorkerConfig, to: &str) -> Result<(), TwilioError> {
    let form = [("To", to), ("Channel", "sms")];
    let bytes = send(cfg, Method::Post, &url(cfg, "Verifications"), Some(&form)).await?;
    decode(&bytes).map(|_| ())
}

/// What a code check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Approved,
    /// A wrong code (the verification stays pending).
    Wrong,
    /// No pending verification: expired, already used, or never started.
    NotPending,
}

/// Checks `code` for `to`.
pub async fn check(cfg: &WorkerConfig, to: &str, code: &str) -> Result<Check, TwilioError> {
    let form = [("To", to), ("Code", code)];
    match send(
        cfg,
        Method::Post,
        &url(cfg, "VerificationCheck"),
        Some(&form),
    )
    .await
    {
        Ok(bytes) => {
            let v = decode(&bytes)?;
            Ok(if v.valid && v.status == "approved" {
                Check::Approved
            } else {
                Check::Wrong
            })
        }
        Err(e) if e.status == 404 => Ok(Check::NotPending),
        Err(e) => Err(e),
    }
}
