//! Stripe REST client (Checkout Sessions) over the Workers `fetch` (PROTOCOLS.md §7).
//!
//! Owns the wire format: form encoding with bracketed keys, Bearer auth, the
//! `Idempotency-Key` header, and Stripe's error body. The base URL is `STRIPE_API_BASE`
//! (the real API by default, the fake in tests), so this exact code is what the tests
//! exercise. It knows nothing about users, ledgers or webhooks.

use cmb_core::config::WorkerConfig;
use cmb_core::pricing::CreditPack;
use serde::Deserialize;
use worker::Method;

use super::{request, send, Body, SendError};

/// A failed Stripe request: HTTP status (0 when Stripe was unreachable), Stripe's error
/// `type` and its human message, which we pass on to the client.
#[derive(Debug, Clone)]
pub struct StripeError {
    pub status: u16,
    pub kind: String,
    pub message: String,
}

impl std::fmt::Display for StripeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Stripe {} (HTTP {}): {}",
            self.kind, self.status, self.message
        )
    }
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    message: String,
}

/// The fields of a created Checkout Session we use.
#[derive(Debug, Clone, Deserialize)]
pub struct CheckoutSession {
    pub id: String,
    /// The hosted payment page; Stripe clears it once the session is complete.
    pub url: Option<String>,
    pub amount_total: Option<i64>,
    pub currency: Option<String>,
}

/// What to sell to whom.
pub struct NewCheckout<'a> {
    pub user_id: &'a str,
    pub email: &'a str,
    pub pack: CreditPack,
    pub success_url: &'a str,
    pub cancel_url: &'a str,
    /// Stripe replays the first answer for a repeated key (≤ 255 characters).
    pub idempotency_key: &'a str,
}

/// The form parameters of a Checkout Session for `c`, in Stripe's bracket notation.
/// Separate from the request so the exact parameters are unit-tested.
pub fn checkout_form(c: &NewCheckout<'_>) -> Vec<(String, String)> {
    let pack = c.pack;
    let credits = pack.credits().to_string();
    let product = format!(
        "Call Me Back {} pack: {} credits",
        pack.name(),
        pack.credits()
    );
    let mut form: Vec<(String, String)> = [
        ("mode", "payment"),
        ("success_url", c.success_url),
        ("cancel_url", c.cancel_url),
        ("client_reference_id", c.user_id),
        ("customer_email", c.email),
        ("line_items[0][price_data][currency]", "usd"),
        ("line_items[0][price_data][product_data][name]", &product),
        ("line_items[0][quantity]", "1"),
        ("metadata[user_id]", c.user_id),
        ("metadata[pack]", pack.name()),
        ("metadata[credits]", &credits),
        // Copied onto the PaymentIntent (and so its charge), so a refund event can be
        // traced to the user and pack even without our purchase row.
        ("payment_intent_data[metadata][user_id]", c.user_id),
        ("payment_intent_data[metadata][pack]", pack.name()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    form.push((
        "line_items[0][price_data][unit_amount]".into(),
        pack.price_cents().to_string(),
    ));
    form
}

/// Creates a Checkout Session; returns it (with its `url`) or Stripe's error.
pub async fn create_checkout_session(
    cfg: &WorkerConfig,
    c: &NewCheckout<'_>,
) -> Result<CheckoutSession, StripeError> {
    let url = format!("{}/v1/checkout/sessions", cfg.stripe_api_base);
    let bytes = post_form(cfg, &url, &checkout_form(c), c.idempotency_key).await?;
    serde_json::from_slice(&bytes).map_err(|e| StripeError {
        status: 200,
        kind: "api_error".into(),
        message: format!("unexpected Checkout Session response: {e}"),
    })
}

/// Every Stripe request's deadline: a checkout that hangs fails rather than holding the
/// client's request open.
const STRIPE_TIMEOUT_MS: u32 = 10_000;

async fn post_form(
    cfg: &WorkerConfig,
    url: &str,
    form: &[(String, String)],
    idempotency_key: &str,
) -> Result<Vec<u8>, StripeError> {
    let auth = format!("Bearer {}", cfg.stripe_secret_key.expose());
    let answer = async {
        let req = request(
            Method::Post,
            url,
            &[
                ("authorization", &auth),
                ("idempotency-key", idempotency_key),
            ],
            Some(Body::form(form)?),
        )?;
        send(req, STRIPE_TIMEOUT_MS).await
    }
    .await
    .map_err(|e| match e {
        SendError::Encode(message) => StripeError {
            status: 0,
            kind: "invalid_request_error".into(),
            message,
        },
        SendError::Transport(m) => StripeError {
            status: 0,
            kind: "api_connection_error".into(),
            message: format!("Stripe unreachable: {m}"),
        },
        SendError::Timeout { ms } => StripeError {
            status: 0,
            kind: "api_connection_error".into(),
            message: format!("Stripe did not answer within {ms} ms"),
        },
    })?;
    if answer.is_success() {
        return Ok(answer.body);
    }
    Err(
        match serde_json::from_slice::<ErrorEnvelope>(&answer.body) {
            Ok(e) => StripeError {
                status: answer.status,
                kind: e.error.kind,
                message: e.error.message,
            },
            Err(_) => StripeError {
                status: answer.status,
                kind: "api_error".into(),
                message: answer.snippet(200),
            },
        },
    )
}

#[cfg(test)]
// A panic in a test is that test's failure.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The session form carries the pack's price, the user and pack in both metadata
    /// maps, and Stripe's bracket keys exactly.
    #[test]
    fn checkout_form_parameters() {
        let form = checkout_form(&NewCheckout {
            user_id: "u1",
            email: "a@b.test",
            pack: CreditPack::Plus,
            success_url: "https://x.test/ok?session_id={CHECKOUT_SESSION_ID}",
            cancel_url: "https://x.test/cancel",
            idempotency_key: "k",
        });
        let get = |k: &str| {
            form.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("mode"), Some("payment"));
        assert_eq!(get("client_reference_id"), Some("u1"));
        assert_eq!(get("line_items[0][price_data][unit_amount]"), Some("1000"));
        assert_eq!(get("line_items[0][price_data][currency]"), Some("usd"));
        assert_eq!(get("line_items[0][quantity]"), Some("1"));
        assert_eq!(get("metadata[pack]"), Some("plus"));
        assert_eq!(get("metadata[credits]"), Some("1200"));
        assert_eq!(get("payment_intent_data[metadata][user_id]"), Some("u1"));
        assert_eq!(
            get("success_url"),
            Some("https://x.test/ok?session_id={CHECKOUT_SESSION_ID}")
        );
        let encoded = serde_urlencoded::to_string(&form).unwrap();
        assert!(
            encoded.contains("metadata%5Buser_id%5D=u1"),
            "brackets are percent-encoded like Stripe's SDKs do: {encoded}"
        );
    }
}
