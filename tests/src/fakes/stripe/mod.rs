//! Fake Stripe (PROTOCOLS.md §7): Checkout Sessions with Stripe's auth, nested form
//! parameters, validation errors and `Idempotency-Key` semantics; a pay page that
//! completes a session and can deliver the signed `checkout.session.completed` webhook;
//! plus builders and a signed sender for the webhook events our Worker handles.
//!
//! Owns the Checkout Session resource and the event shapes. Webhook signatures come from
//! `cmb_core::stripe_sig` (never re-implemented here). It must never panic on client
//! input: everything invalid gets Stripe's `{"error":{…}}` body.
//!
//! Documented choices: an unknown parameter is refused like Stripe does
//! (`parameter_unknown`), so a typo in the Worker's form is caught; idempotent requests
//! run atomically under the fake's lock, so the 409 "request in progress" case of real
//! Stripe cannot occur here.

pub mod form;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use rand::Rng as _;
use serde_json::{json, Map, Value};

use crate::fakes::faults::{self, ErrorResponder, FaultSwitch};
use crate::fakes::{Server, LOOPBACK_ANY};

/// API version stamped on events and responses.
pub const API_VERSION: &str = "2024-06-20";
const CREATE_ENDPOINT: &str = "POST /v1/checkout/sessions";
/// Stripe's limit on idempotency key length.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// A catalogue price usable as `line_items[i][price]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Price {
    pub currency: String,
    pub unit_amount: i64,
}

/// Where the pay page delivers `checkout.session.completed`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookTarget {
    pub url: String,
    /// The endpoint secret (`whsec_…`).
    pub secret: String,
}

/// Configuration of the fake.
#[derive(Clone, Debug)]
pub struct Config {
    pub addr: SocketAddr,
    /// The secret key the API accepts (`sk_test_…`).
    pub secret_key: String,
    /// Prices that `line_items[i][price]` may name.
    pub prices: HashMap<String, Price>,
    /// If set, paying a session on `/pay/{id}` delivers the completed event here.
    pub webhook: Option<WebhookTarget>,
    /// Seed of the fault jitter.
    pub fault_seed: u64,
}

/// The secret key of [`Config::default`] (the `fakes` binary's stand-in).
pub const DEFAULT_SECRET_KEY: &str = "sk_test_fake";

impl Config {
    /// Loopback on a free port, no prices, no webhook.
    pub fn new(secret_key: impl Into<String>) -> Self {
        Self {
            addr: LOOPBACK_ANY,
            secret_key: secret_key.into(),
            prices: HashMap::new(),
            webhook: None,
            fault_seed: faults::DEFAULT_SEED,
        }
    }
}

impl Default for Config {
    /// [`Config::new`] with [`DEFAULT_SECRET_KEY`].
    fn default() -> Self {
        Self::new(DEFAULT_SECRET_KEY)
    }
}

/// One API request the fake answered.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub idempotency_key: Option<String>,
    /// Decoded parameters (`Null` when the body could not be decoded).
    pub params: Value,
    pub status: u16,
    /// Answered from the idempotency store.
    pub replayed: bool,
}

/// One webhook delivery made by the pay page.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    pub event: Value,
    /// HTTP status, or why there was none.
    pub result: Result<u16, String>,
}

struct Stored {
    endpoint: String,
    params: Value,
    status: StatusCode,
    body: Value,
    request_id: String,
}

struct Store {
    cfg: Config,
    sessions: Vec<Value>,
    idempotency: HashMap<String, Stored>,
    requests: Vec<RequestRecord>,
    deliveries: Vec<Delivery>,
}

struct Shared {
    state: Mutex<Store>,
    faults: FaultSwitch,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The running fake; dropping it stops the server.
pub struct Handle {
    server: Server,
    shared: Arc<Shared>,
}

/// Starts the fake on `cfg.addr`.
pub async fn spawn(cfg: Config) -> anyhow::Result<Handle> {
    let faults = FaultSwitch::with_seed(cfg.fault_seed);
    let shared = new_shared(cfg, faults);
    let addr = shared.lock().cfg.addr;
    let server = Server::start("stripe", addr, router_for(shared.clone())).await?;
    Ok(Handle { server, shared })
}

/// The fake's HTTP app (API, pay page and `/__faults`), for `oneshot` tests.
pub fn router(cfg: Config, faults: FaultSwitch) -> Router {
    router_for(new_shared(cfg, faults))
}

fn new_shared(cfg: Config, faults: FaultSwitch) -> Arc<Shared> {
    Arc::new(Shared {
        state: Mutex::new(Store {
            cfg,
            sessions: Vec::new(),
            idempotency: HashMap::new(),
            requests: Vec::new(),
            deliveries: Vec::new(),
        }),
        faults,
    })
}

fn router_for(shared: Arc<Shared>) -> Router {
    let faults = shared.faults.clone();
    let app = Router::new()
        .route("/v1/checkout/sessions", post(create_session))
        .route("/v1/checkout/sessions/{id}", get(retrieve_session))
        .route("/pay/{id}", get(pay))
        .with_state(shared);
    faults::wrap(app, faults, error_responder())
}

impl Handle {
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT`: the value for `STRIPE_API_BASE`.
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// `ws://127.0.0.1:PORT` (unused by Stripe; here for symmetry with the other fakes).
    pub fn ws_url(&self) -> String {
        self.server.ws_url()
    }

    pub fn faults(&self) -> &FaultSwitch {
        &self.shared.faults
    }

    /// Every session created, in order (current state).
    pub fn sessions(&self) -> Vec<Value> {
        self.shared.lock().sessions.clone()
    }

    /// One session by id.
    pub fn session(&self, id: &str) -> Option<Value> {
        self.shared
            .lock()
            .sessions
            .iter()
            .find(|s| s["id"] == id)
            .cloned()
    }

    /// Every API request answered, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.clone()
    }

    /// Webhook deliveries made by the pay page.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.shared.lock().deliveries.clone()
    }

    /// Completes a session as if paid (no webhook); returns its new state.
    pub fn mark_paid(&self, id: &str) -> Option<Value> {
        complete(&mut self.shared.lock(), id)
    }

    /// Where the pay page delivers `checkout.session.completed` from now on.
    pub fn set_webhook(&self, target: Option<WebhookTarget>) {
        self.shared.lock().cfg.webhook = target;
    }

    /// Adds or replaces a catalogue price.
    pub fn set_price(&self, id: impl Into<String>, price: Price) {
        self.shared.lock().cfg.prices.insert(id.into(), price);
    }

    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

/// A Stripe API error.
#[derive(Debug)]
struct StripeError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
    param: Option<String>,
}

impl StripeError {
    fn invalid(message: impl Into<String>, param: Option<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            message: message.into(),
            param,
        }
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn missing(param: &str) -> Self {
        Self::invalid(
            format!("Missing required param: {param}."),
            Some(param.to_owned()),
        )
        .with_code("parameter_missing")
    }

    fn body(&self, request_id: &str) -> Value {
        let mut error = Map::new();
        error.insert("type".into(), json!(self.kind));
        error.insert("message".into(), json!(self.message));
        if let Some(code) = self.code {
            error.insert("code".into(), json!(code));
            error.insert(
                "doc_url".into(),
                json!(format!(
                    "https://stripe.com/docs/error-codes/{}",
                    code.replace('_', "-")
                )),
            );
        }
        if let Some(param) = &self.param {
            error.insert("param".into(), json!(param));
        }
        error.insert(
            "request_log_url".into(),
            json!(format!(
                "https://dashboard.stripe.com/test/logs/{request_id}"
            )),
        );
        json!({ "error": error })
    }
}

/// Error bodies for the fault layer.
fn error_responder() -> ErrorResponder {
    Arc::new(|status: StatusCode| {
        let kind = match status.as_u16() {
            401 => "invalid_request_error",
            // UNCONFIRMED (PROTOCOLS.md §7) as a `type` value; the SDK keys on the status.
            429 => "rate_limit_error",
            s if s >= 500 => "api_error",
            _ => "invalid_request_error",
        };
        let error = StripeError {
            status,
            kind,
            code: None,
            message: status.canonical_reason().unwrap_or("Error").to_owned(),
            param: None,
        };
        (status, Json(error.body(&random_id("req_", 14)))).into_response()
    })
}

fn random_id(prefix: &str, len: usize) -> String {
    let tail: String = rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect();
    format!("{prefix}{tail}")
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Bearer `sk_…` or Basic `sk_…:` (empty password), as Stripe accepts.
fn authorize(state: &Store, headers: &HeaderMap) -> Result<(), StripeError> {
    let unauthorized = |message: String| StripeError {
        status: StatusCode::UNAUTHORIZED,
        kind: "invalid_request_error",
        code: None,
        message,
        param: None,
    };
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Err(unauthorized(
            "You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').".into(),
        ));
    };
    let key = if let Some(token) = value.strip_prefix("Bearer ") {
        token.trim().to_owned()
    } else if let Some(encoded) = value.strip_prefix("Basic ") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        decoded
            .split_once(':')
            .map_or(decoded.clone(), |(user, _)| user.to_owned())
    } else {
        String::new()
    };
    if key != state.cfg.secret_key || key.is_empty() {
        // Like Stripe, show only the key's last four characters (chars: the key may not
        // be ASCII when it came through Basic auth).
        let count = key.chars().count();
        let shown: String = if count > 4 {
            key.chars().skip(count - 4).collect()
        } else {
            String::new()
        };
        return Err(unauthorized(format!(
            "Invalid API Key provided: sk_test_****{shown}"
        )));
    }
    Ok(())
}

fn respond(
    status: StatusCode,
    body: Value,
    request_id: &str,
    idempotency_key: Option<&str>,
    replayed: bool,
) -> Response {
    let mut response = (status, Json(body)).into_response();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert("request-id", v);
    }
    headers.insert("stripe-version", HeaderValue::from_static(API_VERSION));
    if let Some(key) = idempotency_key.and_then(|k| HeaderValue::from_str(k).ok()) {
        headers.insert("idempotency-key", key);
    }
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

fn host_of(headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_owned()
}

async fn create_session(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request_id = random_id("req_", 14);
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let host = host_of(&headers);
    let mut state = shared.lock();
    let params = form::parse(&body);
    let mut log = RequestRecord {
        method: "POST".into(),
        path: "/v1/checkout/sessions".into(),
        idempotency_key: key.clone(),
        params: params.clone().unwrap_or(Value::Null),
        status: 0,
        replayed: false,
    };
    let (status, body, replayed) = match run_create(
        &mut state,
        &headers,
        params,
        key.as_deref(),
        &host,
        &request_id,
    ) {
        Ok((status, body, replayed)) => (status, body, replayed),
        Err(e) => (e.status, e.body(&request_id), false),
    };
    log.status = status.as_u16();
    log.replayed = replayed;
    state.requests.push(log);
    drop(state);
    respond(status, body, &request_id, key.as_deref(), replayed)
}

/// Auth, idempotency and the create itself. Errors returned here are never stored under
/// the idempotency key (Stripe stores only requests that reached the endpoint).
fn run_create(
    state: &mut Store,
    headers: &HeaderMap,
    params: Result<Value, form::FormError>,
    key: Option<&str>,
    host: &str,
    request_id: &str,
) -> Result<(StatusCode, Value, bool), StripeError> {
    authorize(state, headers)?;
    let params = params.map_err(|e| StripeError::invalid(e.0, None))?;
    if let Some(key) = key {
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(StripeError::invalid(
                format!("Idempotency-Key must be between 1 and {MAX_IDEMPOTENCY_KEY} characters"),
                None,
            ));
        }
        if let Some(stored) = state.idempotency.get(key) {
            if stored.endpoint != CREATE_ENDPOINT || stored.params != params {
                return Err(StripeError {
                    status: StatusCode::BAD_REQUEST,
                    kind: "idempotency_error",
                    code: None,
                    message: format!(
                        "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{key}' if you meant to execute a different request."
                    ),
                    param: None,
                });
            }
            tracing::debug!(fake = "stripe", key, original = %stored.request_id, "idempotent replay");
            return Ok((stored.status, stored.body.clone(), true));
        }
    }
    let session = build_session(&params, &state.cfg.prices, unix_now(), host)?;
    tracing::info!(fake = "stripe", id = %session["id"], "checkout session created");
    state.sessions.push(session.clone());
    if let Some(key) = key {
        state.idempotency.insert(
            key.to_owned(),
            Stored {
                endpoint: CREATE_ENDPOINT.into(),
                params,
                status: StatusCode::OK,
                body: session.clone(),
                request_id: request_id.to_owned(),
            },
        );
    }
    Ok((StatusCode::OK, session, false))
}

const SESSION_PARAMS: &[&str] = &[
    "mode",
    "success_url",
    "cancel_url",
    "client_reference_id",
    "metadata",
    "line_items",
    "customer",
    "customer_email",
    "customer_creation",
    "currency",
    "expand",
    "expires_at",
    "locale",
    "payment_intent_data",
    "payment_method_types",
    "allow_promotion_codes",
    "billing_address_collection",
    "submit_type",
    "ui_mode",
    "automatic_tax",
    "invoice_creation",
    "subscription_data",
];
const LINE_ITEM_PARAMS: &[&str] = &[
    "price",
    "price_data",
    "quantity",
    "adjustable_quantity",
    "tax_rates",
    "dynamic_tax_rates",
];
const PRICE_DATA_PARAMS: &[&str] = &[
    "currency",
    "product",
    "product_data",
    "unit_amount",
    "unit_amount_decimal",
    "recurring",
    "tax_behavior",
];
const PRODUCT_DATA_PARAMS: &[&str] = &["name", "description", "images", "metadata", "tax_code"];

fn check_known(
    object: &Map<String, Value>,
    known: &[&str],
    prefix: &str,
) -> Result<(), StripeError> {
    for key in object.keys() {
        if !known.contains(&key.as_str()) {
            let name = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}[{key}]")
            };
            return Err(StripeError::invalid(
                format!("Received unknown parameter: {name}"),
                Some(name),
            )
            .with_code("parameter_unknown"));
        }
    }
    Ok(())
}

fn string_param<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    name: &str,
) -> Result<Option<&'a str>, StripeError> {
    match object.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(StripeError::invalid(
            format!("Invalid string: {name}"),
            Some(name.to_owned()),
        )),
    }
}

fn object_param<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    name: &str,
) -> Result<Option<&'a Map<String, Value>>, StripeError> {
    match object.get(key) {
        None => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        // An empty string clears a hash in Stripe's API; for a create that means "none".
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(_) => Err(StripeError::invalid(
            format!("Invalid object: {name}"),
            Some(name.to_owned()),
        )),
    }
}

fn integer_param(
    object: &Map<String, Value>,
    key: &str,
    name: &str,
    min: i64,
) -> Result<Option<i64>, StripeError> {
    let Some(raw) = string_param(object, key, name)? else {
        return Ok(None);
    };
    match raw.parse::<i64>() {
        Ok(n) if n >= min => Ok(Some(n)),
        _ => Err(
            StripeError::invalid(format!("Invalid integer: {raw}"), Some(name.to_owned()))
                .with_code("parameter_invalid_integer"),
        ),
    }
}

fn url_param(object: &Map<String, Value>, key: &str) -> Result<Option<String>, StripeError> {
    let Some(raw) = string_param(object, key, key)? else {
        return Ok(None);
    };
    let ok =
        url::Url::parse(raw).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
    if !ok {
        return Err(
            StripeError::invalid("Not a valid URL", Some(key.to_owned())).with_code("url_invalid"),
        );
    }
    Ok(Some(raw.to_owned()))
}

fn metadata(object: &Map<String, Value>, key: &str) -> Result<Value, StripeError> {
    let Some(meta) = object_param(object, key, key)? else {
        return Ok(json!({}));
    };
    if meta.len() > 50 {
        return Err(StripeError::invalid(
            "Metadata can have at most 50 keys",
            Some(key.to_owned()),
        ));
    }
    for (k, v) in meta {
        let name = format!("{key}[{k}]");
        let Value::String(v) = v else {
            return Err(StripeError::invalid(
                format!("Invalid string: {name}"),
                Some(name),
            ));
        };
        if k.len() > 40 || v.len() > 500 {
            return Err(StripeError::invalid(
                "Metadata keys are limited to 40 characters and values to 500",
                Some(name),
            ));
        }
    }
    Ok(Value::Object(meta.clone()))
}

/// Validates a create request and builds the new session object.
fn build_session(
    params: &Value,
    prices: &HashMap<String, Price>,
    now: i64,
    host: &str,
) -> Result<Value, StripeError> {
    let Some(p) = params.as_object() else {
        return Err(StripeError::invalid("Invalid request body", None));
    };
    check_known(p, SESSION_PARAMS, "")?;
    let mode = string_param(p, "mode", "mode")?.ok_or_else(|| StripeError::missing("mode"))?;
    if !matches!(mode, "payment" | "setup" | "subscription") {
        return Err(StripeError::invalid(
            "Invalid mode: must be one of payment, setup, or subscription",
            Some("mode".into()),
        ));
    }
    let success_url =
        url_param(p, "success_url")?.ok_or_else(|| StripeError::missing("success_url"))?;
    let cancel_url = url_param(p, "cancel_url")?;
    let client_reference_id = string_param(p, "client_reference_id", "client_reference_id")?;
    if client_reference_id.is_some_and(|c| c.len() > 200) {
        return Err(StripeError::invalid(
            "client_reference_id is limited to 200 characters",
            Some("client_reference_id".into()),
        ));
    }
    let customer_email = string_param(p, "customer_email", "customer_email")?;
    let meta = metadata(p, "metadata")?;
    let (amount, currency) = line_items(p, mode, prices)?;
    let currency = match (currency, string_param(p, "currency", "currency")?) {
        (Some(c), _) => Some(c),
        (None, Some(c)) => Some(c.to_ascii_lowercase()),
        (None, None) => None,
    };
    let id = random_id("cs_test_", 58);
    let url = format!("http://{host}/pay/{id}");
    Ok(json!({
        "id": id,
        "object": "checkout.session",
        "amount_subtotal": amount,
        "amount_total": amount,
        "cancel_url": cancel_url,
        "client_reference_id": client_reference_id,
        "created": now,
        "currency": currency,
        "customer": string_param(p, "customer", "customer")?,
        "customer_details": null,
        "customer_email": customer_email,
        "expires_at": now + 24 * 3600,
        "livemode": false,
        "metadata": meta,
        "mode": mode,
        "payment_intent": null,
        "payment_method_types": ["card"],
        "payment_status": if mode == "setup" { "no_payment_required" } else { "unpaid" },
        "status": "open",
        "subscription": null,
        "success_url": success_url,
        "url": url,
    }))
}

/// Validates `line_items`; returns the total and its currency.
fn line_items(
    p: &Map<String, Value>,
    mode: &str,
    prices: &HashMap<String, Price>,
) -> Result<(Option<i64>, Option<String>), StripeError> {
    let items = match p.get("line_items") {
        None if mode == "setup" => return Ok((None, None)),
        None => return Err(StripeError::missing("line_items")),
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(_) => {
            return Err(StripeError::invalid(
                "Invalid array",
                Some("line_items".into()),
            ))
        }
    };
    let mut total = 0i64;
    let mut currency: Option<String> = None;
    let mut recurring = false;
    for (i, item) in items.iter().enumerate() {
        let at = format!("line_items[{i}]");
        let Some(item) = item.as_object() else {
            return Err(StripeError::invalid(
                format!("Invalid object: {at}"),
                Some(at),
            ));
        };
        check_known(item, LINE_ITEM_PARAMS, &at)?;
        let quantity = integer_param(item, "quantity", &format!("{at}[quantity]"), 1)?
            .ok_or_else(|| StripeError::missing(&format!("{at}[quantity]")))?;
        let (item_currency, unit_amount) = match (
            string_param(item, "price", &format!("{at}[price]"))?,
            object_param(item, "price_data", &format!("{at}[price_data]"))?,
        ) {
            (Some(_), Some(_)) => {
                return Err(StripeError::invalid(
                    format!(
                    "You may only specify one of these parameters: {at}[price], {at}[price_data]."
                ),
                    Some(at),
                ))
            }
            (None, None) => {
                return Err(StripeError::invalid(
                    format!("You must specify either `price` or `price_data` for {at}."),
                    Some(at),
                ))
            }
            (Some(price_id), None) => {
                let price = prices.get(price_id).ok_or_else(|| {
                    StripeError::invalid(
                        format!("No such price: '{price_id}'"),
                        Some(format!("{at}[price]")),
                    )
                    .with_code("resource_missing")
                })?;
                (price.currency.clone(), price.unit_amount)
            }
            (None, Some(data)) => {
                let pd = format!("{at}[price_data]");
                check_known(data, PRICE_DATA_PARAMS, &pd)?;
                let cur = string_param(data, "currency", &format!("{pd}[currency]"))?
                    .ok_or_else(|| StripeError::missing(&format!("{pd}[currency]")))?;
                if cur.len() != 3 || !cur.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(StripeError::invalid(
                        format!("Invalid currency: {cur}"),
                        Some(format!("{pd}[currency]")),
                    ));
                }
                let unit = integer_param(data, "unit_amount", &format!("{pd}[unit_amount]"), 0)?
                    .ok_or_else(|| StripeError::missing(&format!("{pd}[unit_amount]")))?;
                let product = string_param(data, "product", &format!("{pd}[product]"))?;
                match (
                    product,
                    object_param(data, "product_data", &format!("{pd}[product_data]"))?,
                ) {
                    (Some(_), None) => {}
                    (None, Some(pdata)) => {
                        check_known(pdata, PRODUCT_DATA_PARAMS, &format!("{pd}[product_data]"))?;
                        if string_param(pdata, "name", &format!("{pd}[product_data][name]"))?
                            .is_none_or(str::is_empty)
                        {
                            return Err(StripeError::missing(&format!("{pd}[product_data][name]")));
                        }
                    }
                    _ => {
                        return Err(StripeError::invalid(
                            format!(
                            "You must specify exactly one of {pd}[product] or {pd}[product_data]."
                        ),
                            Some(pd),
                        ))
                    }
                }
                if data.contains_key("recurring") {
                    if mode == "payment" {
                        return Err(StripeError::invalid(
                            "You specified `payment` mode but passed a recurring price. Either switch to `subscription` mode or use only one-time prices.",
                            Some(format!("{pd}[recurring]")),
                        ));
                    }
                    recurring = true;
                }
                (cur.to_ascii_lowercase(), unit)
            }
        };
        match &currency {
            Some(c) if *c != item_currency => {
                return Err(StripeError::invalid(
                    "All line items must use the same currency.",
                    Some(at),
                ));
            }
            _ => currency = Some(item_currency),
        }
        total = unit_amount
            .checked_mul(quantity)
            .and_then(|line| total.checked_add(line))
            .ok_or_else(|| StripeError::invalid("Amount too large", Some(at.clone())))?;
    }
    if mode == "subscription" && !recurring {
        return Err(StripeError::invalid(
            "You must provide at least one recurring price in `subscription` mode when using prices.",
            Some("line_items".into()),
        ));
    }
    Ok((Some(total), currency))
}

async fn retrieve_session(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let request_id = random_id("req_", 14);
    let mut state = shared.lock();
    let outcome = authorize(&state, &headers).and_then(|()| {
        state
            .sessions
            .iter()
            .find(|s| s["id"] == id.as_str())
            .cloned()
            .ok_or_else(|| {
                StripeError {
                    status: StatusCode::NOT_FOUND,
                    ..StripeError::invalid(
                        format!("No such checkout.session: '{id}'"),
                        Some("session".into()),
                    )
                }
                .with_code("resource_missing")
            })
    });
    let (status, body) = match outcome {
        Ok(session) => (StatusCode::OK, session),
        Err(e) => (e.status, e.body(&request_id)),
    };
    state.requests.push(RequestRecord {
        method: "GET".into(),
        path: format!("/v1/checkout/sessions/{id}"),
        idempotency_key: None,
        params: Value::Null,
        status: status.as_u16(),
        replayed: false,
    });
    drop(state);
    respond(status, body, &request_id, None, false)
}

/// Completes a session as paid; returns its new state (unchanged if already complete).
fn complete(state: &mut Store, id: &str) -> Option<Value> {
    let session = state.sessions.iter_mut().find(|s| s["id"] == id)?;
    if session["status"] == "open" {
        session["status"] = json!("complete");
        if session["payment_status"] == "unpaid" {
            session["payment_status"] = json!("paid");
            session["payment_intent"] = json!(random_id("pi_", 24));
        }
        let email = session["customer_email"]
            .as_str()
            .unwrap_or("customer@example.com")
            .to_owned();
        session["customer_details"] =
            json!({"email": email, "name": null, "phone": null, "address": null});
        // Stripe drops the hosted URL once the session is complete.
        session["url"] = Value::Null;
    }
    Some(session.clone())
}

/// The hosted pay page: completes the session, delivers the webhook when configured,
/// and redirects to `success_url` like Checkout does.
async fn pay(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let (session, newly, webhook) = {
        let mut state = shared.lock();
        let was_open = state
            .sessions
            .iter()
            .any(|s| s["id"] == id.as_str() && s["status"] == "open");
        let Some(session) = complete(&mut state, &id) else {
            return (StatusCode::NOT_FOUND, "No such checkout session").into_response();
        };
        (session, was_open, state.cfg.webhook.clone())
    };
    if newly {
        if let Some(target) = webhook {
            let event = checkout_session_completed(&session, unix_now());
            let result = deliver_event(&target.url, &target.secret, &event, unix_now())
                .await
                .map(|s| s.as_u16())
                .map_err(|e| e.to_string());
            tracing::info!(fake = "stripe", %id, ?result, "checkout.session.completed delivered");
            shared.lock().deliveries.push(Delivery { event, result });
        }
    }
    let target = session["success_url"]
        .as_str()
        .unwrap_or("/")
        .replace("{CHECKOUT_SESSION_ID}", &id);
    match HeaderValue::from_str(&target) {
        Ok(location) => (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response(),
        Err(_) => (StatusCode::OK, "Payment complete").into_response(),
    }
}

/// An event envelope in Stripe's shape around `object`.
pub fn event(kind: &str, object: Value, previous_attributes: Value, created: i64) -> Value {
    json!({
        "id": random_id("evt_", 24),
        "object": "event",
        "api_version": API_VERSION,
        "created": created,
        "data": {"object": object, "previous_attributes": previous_attributes},
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": kind,
    })
}

/// `checkout.session.completed` for a session (pass the paid session for a card payment).
pub fn checkout_session_completed(session: &Value, created: i64) -> Value {
    event(
        "checkout.session.completed",
        session.clone(),
        Value::Null,
        created,
    )
}

/// `checkout.session.async_payment_succeeded`: a delayed payment method settled, so the
/// session is now paid.
pub fn checkout_session_async_payment_succeeded(session: &Value, created: i64) -> Value {
    let mut object = session.clone();
    object["status"] = json!("complete");
    object["payment_status"] = json!("paid");
    event(
        "checkout.session.async_payment_succeeded",
        object,
        Value::Null,
        created,
    )
}

/// `charge.refunded` for the charge behind a paid session (`amount_refunded` ≤ total).
pub fn charge_refunded(session: &Value, amount_refunded: i64, created: i64) -> Value {
    let amount = session["amount_total"].as_i64().unwrap_or(0);
    let charge_id = random_id("ch_", 24);
    let currency = session["currency"].clone();
    let payment_intent = session["payment_intent"].clone();
    let refund = json!({
        "id": random_id("re_", 24),
        "object": "refund",
        "amount": amount_refunded,
        "charge": charge_id,
        "created": created,
        "currency": currency,
        "payment_intent": payment_intent,
        "status": "succeeded",
    });
    let charge = json!({
        "id": charge_id,
        "object": "charge",
        "amount": amount,
        "amount_captured": amount,
        "amount_refunded": amount_refunded,
        "captured": true,
        "created": created,
        "currency": currency,
        "customer": session["customer"].clone(),
        "livemode": false,
        "metadata": session["metadata"].clone(),
        "paid": true,
        "payment_intent": payment_intent,
        "refunded": amount_refunded >= amount,
        "status": "succeeded",
        "refunds": {
            "object": "list",
            "data": [refund],
            "has_more": false,
            "total_count": 1,
            "url": format!("/v1/charges/{charge_id}/refunds"),
        },
    });
    event(
        "charge.refunded",
        charge,
        json!({"amount_refunded": 0, "refunded": false}),
        created,
    )
}

/// `charge.dispute.created` for the charge behind a paid session: the buyer's bank
/// disputes the whole amount (Stripe's `dispute` object).
pub fn charge_dispute_created(session: &Value, created: i64) -> Value {
    let dispute = json!({
        "id": random_id("dp_", 24),
        "object": "dispute",
        "amount": session["amount_total"].clone(),
        "balance_transactions": [],
        "charge": random_id("ch_", 24),
        "created": created,
        "currency": session["currency"].clone(),
        "evidence": {},
        "is_charge_refundable": false,
        "livemode": false,
        "metadata": {},
        "payment_intent": session["payment_intent"].clone(),
        "reason": "fraudulent",
        "status": "needs_response",
    });
    event("charge.dispute.created", dispute, Value::Null, created)
}

/// Signs `event` as Stripe would at `timestamp` (`cmb_core::stripe_sig`) and POSTs it to
/// `webhook_url`; returns the receiver's status.
pub async fn deliver_event(
    webhook_url: &str,
    secret: &str,
    event: &Value,
    timestamp: i64,
) -> anyhow::Result<StatusCode> {
    let payload = serde_json::to_vec(event)?;
    let signature = cmb_core::stripe_sig::signature_header(secret, timestamp, &payload);
    let response = reqwest::Client::new()
        .post(webhook_url)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header(
            header::USER_AGENT,
            "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        )
        .header("Stripe-Signature", signature)
        .body(payload)
        .send()
        .await?;
    Ok(response.status())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(body: &str) -> Value {
        form::parse(body.as_bytes()).unwrap()
    }

    const OK: &str = "mode=payment&success_url=https://a.test/ok&cancel_url=https://a.test/no\
        &line_items[0][price_data][currency]=USD&line_items[0][price_data][unit_amount]=500\
        &line_items[0][price_data][product_data][name]=Credits&line_items[0][quantity]=3";

    /// A valid payment session totals its line items, lowercases the currency and is open.
    #[test]
    fn builds_an_open_unpaid_session() {
        let s = build_session(&params(OK), &HashMap::new(), 1_700_000_000, "127.0.0.1:9").unwrap();
        assert_eq!(s["amount_total"], 1500);
        assert_eq!(s["currency"], "usd");
        assert_eq!(
            (s["status"].as_str(), s["payment_status"].as_str()),
            (Some("open"), Some("unpaid"))
        );
        let id = s["id"].as_str().unwrap();
        assert!(id.starts_with("cs_test_"));
        assert_eq!(s["url"], format!("http://127.0.0.1:9/pay/{id}"));
        assert_eq!(s["expires_at"], 1_700_000_000 + 86_400);
        assert_eq!(s["metadata"], json!({}));
    }

    /// Each invalid input names the parameter Stripe would name.
    #[test]
    fn validation_names_the_param() {
        let prices = HashMap::from([(
            "price_1".to_owned(),
            Price {
                currency: "eur".into(),
                unit_amount: 100,
            },
        )]);
        let cases = [
            ("success_url=https://a.test/ok&line_items[0][price]=price_1&line_items[0][quantity]=1", "mode"),
            ("mode=payment&line_items[0][price]=price_1&line_items[0][quantity]=1", "success_url"),
            ("mode=payment&success_url=nope&line_items[0][price]=price_1&line_items[0][quantity]=1", "success_url"),
            ("mode=payment&success_url=https://a.test&cancel_url=x&line_items[0][price]=price_1&line_items[0][quantity]=1", "cancel_url"),
            ("mode=payment&success_url=https://a.test", "line_items"),
            ("mode=payment&success_url=https://a.test&line_items[0][price]=price_1", "line_items[0][quantity]"),
            ("mode=payment&success_url=https://a.test&line_items[0][price]=price_2&line_items[0][quantity]=1", "line_items[0][price]"),
            ("mode=payment&success_url=https://a.test&line_items[0][quantity]=1", "line_items[0]"),
            ("mode=payment&success_url=https://a.test&line_items[0][price_data][currency]=usd&line_items[0][price_data][unit_amount]=1&line_items[0][quantity]=1", "line_items[0][price_data]"),
            ("mode=payment&success_url=https://a.test&line_items[0][price]=price_1&line_items[0][quantity]=0", "line_items[0][quantity]"),
            ("mode=payment&success_url=https://a.test&line_items[0][price]=price_1&line_items[0][quantity]=1&colour=red", "colour"),
            ("mode=payment&success_url=https://a.test&line_items[0][price]=price_1&line_items[0][quantity]=1&line_items[1][price_data][currency]=usd&line_items[1][price_data][unit_amount]=1&line_items[1][price_data][product]=prod_1&line_items[1][quantity]=1", "line_items[1]"),
        ];
        for (body, param) in cases {
            let err = build_session(&params(body), &prices, 0, "h").unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {}", err.message);
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
        }
        let ok = build_session(
            &params("mode=payment&success_url=https://a.test&line_items[0][price]=price_1&line_items[0][quantity]=2"),
            &prices,
            0,
            "h",
        )
        .unwrap();
        assert_eq!(
            (ok["amount_total"].as_i64(), ok["currency"].as_str()),
            (Some(200), Some("eur"))
        );
    }

    /// Error bodies carry type, message, param and code like Stripe's.
    #[test]
    fn error_body_shape() {
        let body = StripeError::missing("mode").body("req_1");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "parameter_missing");
        assert_eq!(body["error"]["param"], "mode");
        assert_eq!(body["error"]["message"], "Missing required param: mode.");
        assert_eq!(
            body["error"]["request_log_url"],
            "https://dashboard.stripe.com/test/logs/req_1"
        );
    }

    /// The refund event carries the charge in the official shape.
    #[test]
    fn charge_refunded_shape() {
        let session = json!({"amount_total": 1000, "currency": "usd", "payment_intent": "pi_1", "metadata": {"u": "1"}, "customer": null});
        let e = charge_refunded(&session, 1000, 5);
        assert_eq!(e["type"], "charge.refunded");
        assert_eq!(e["object"], "event");
        let charge = &e["data"]["object"];
        assert_eq!(charge["object"], "charge");
        assert_eq!(charge["refunded"], true);
        assert_eq!(charge["payment_intent"], "pi_1");
        assert_eq!(charge["refunds"]["data"][0]["amount"], 1000);
        assert_eq!(e["data"]["previous_attributes"]["refunded"], false);
    }
}
