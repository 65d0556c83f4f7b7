//! The fake Stripe, driven like a Stripe client: auth, nested form parameters,
//! Idempotency-Key semantics, the pay page with its signed webhook, `deliver_event`
//! against a receiver that verifies with `cmb_core::stripe_sig::verify`, and faults.

// Helpers outside #[test] fns unwrap too: any panic here is a test failure.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use cmb_tests::fakes::stripe::{self, Config, WebhookTarget};
use cmb_tests::fakes::{Server, LOOPBACK_ANY};
use serde_json::Value;

const KEY: &str = "sk_test_51FakeKeyForTests";
const WHSEC: &str = "whsec_test_secret";

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

async fn fake() -> stripe::Handle {
    init_tracing();
    stripe::spawn(Config::new(KEY)).await.unwrap()
}

fn checkout_form(order: &str) -> Vec<(&'static str, String)> {
    vec![
        ("mode", "payment".into()),
        (
            "success_url",
            "https://app.example.com/ok?session_id={CHECKOUT_SESSION_ID}".into(),
        ),
        ("cancel_url", "https://app.example.com/cancel".into()),
        ("client_reference_id", "user_42".into()),
        ("metadata[order_id]", order.into()),
        ("metadata[pack]", "plus".into()),
        ("line_items[0][price_data][currency]", "usd".into()),
        (
            "line_items[0][price_data][product_data][name]",
            "Call credits".into(),
        ),
        ("line_items[0][price_data][unit_amount]", "1000".into()),
        ("line_items[0][quantity]", "1".into()),
        ("customer_email", "a@b.com".into()),
        ("payment_intent_data[metadata][order_id]", order.into()),
    ]
}

async fn create(
    fake: &stripe::Handle,
    form: &[(&str, String)],
    key: Option<&str>,
) -> (u16, HeaderMap, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/v1/checkout/sessions", fake.base_url()))
        .bearer_auth(KEY)
        .form(form);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.json().await.unwrap())
}

/// A webhook endpoint that accepts only events `stripe_sig::verify` accepts.
struct Receiver {
    server: Server,
    events: Arc<Mutex<Vec<Value>>>,
}

async fn receiver(secret: &'static str) -> Receiver {
    async fn hook(
        State((secret, events)): State<(&'static str, Arc<Mutex<Vec<Value>>>)>,
        headers: HeaderMap,
        body: Bytes,
    ) -> StatusCode {
        let header = headers
            .get("stripe-signature")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        match cmb_core::stripe_sig::verify(secret, header, &body, now, 300) {
            Ok(()) => {
                events
                    .lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                StatusCode::OK
            }
            Err(_) => StatusCode::BAD_REQUEST,
        }
    }
    let events = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new()
        .route("/webhook", post(hook))
        .with_state((secret, events.clone()));
    let server = Server::start("stripe-receiver", LOOPBACK_ANY, app)
        .await
        .unwrap();
    Receiver { server, events }
}

impl Receiver {
    fn url(&self) -> String {
        format!("{}/webhook", self.server.base_url())
    }
}

/// No key, a wrong key and a publishable key get 401; Bearer and Basic `sk_…:` work.
#[tokio::test]
async fn auth() {
    let fake = fake().await;
    let url = format!("{}/v1/checkout/sessions", fake.base_url());
    let client = reqwest::Client::new();
    let form = checkout_form("o1");

    let none = client.post(&url).form(&form).send().await.unwrap();
    assert_eq!(none.status(), 401);
    let body: Value = none.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("did not provide an API key"));

    for bad in ["sk_test_wrong", "pk_test_51FakeKeyForTests"] {
        let wrong = client
            .post(&url)
            .bearer_auth(bad)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401);
        let body: Value = wrong.json().await.unwrap();
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Invalid API Key provided"));
    }

    let basic = client
        .post(&url)
        .basic_auth(KEY, Some(""))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 200);
    let (status, _, _) = create(&fake, &form, None).await;
    assert_eq!(status, 200);
    assert_eq!(fake.sessions().len(), 2);
}

/// Nested bracket parameters become the session's fields; retrieve returns the same.
#[tokio::test]
async fn nested_form_parameters() {
    let fake = fake().await;
    let (status, headers, session) = create(&fake, &checkout_form("ord_9"), None).await;
    assert_eq!(status, 200, "{session}");
    assert!(headers
        .get("request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("req_"));
    let id = session["id"].as_str().unwrap();
    assert!(id.starts_with("cs_test_"));
    assert_eq!(session["object"], "checkout.session");
    assert_eq!(session["client_reference_id"], "user_42");
    assert_eq!(
        session["metadata"],
        serde_json::json!({"order_id": "ord_9", "pack": "plus"})
    );
    assert_eq!(session["amount_total"], 1000);
    assert_eq!(session["currency"], "usd");
    assert_eq!(session["payment_status"], "unpaid");
    assert_eq!(session["status"], "open");
    assert_eq!(session["mode"], "payment");
    assert_eq!(session["url"], format!("{}/pay/{id}", fake.base_url()));
    let logged = &fake.requests()[0].params;
    assert_eq!(
        logged["payment_intent_data"]["metadata"]["order_id"],
        "ord_9"
    );
    assert_eq!(
        logged["line_items"][0]["price_data"]["product_data"]["name"],
        "Call credits"
    );

    let fetched: Value = reqwest::Client::new()
        .get(format!("{}/v1/checkout/sessions/{id}", fake.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched, session);
    let missing = reqwest::Client::new()
        .get(format!(
            "{}/v1/checkout/sessions/cs_test_nope",
            fake.base_url()
        ))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.json::<Value>().await.unwrap()["error"]["code"],
        "resource_missing"
    );

    // A broken nested key and an unknown parameter are refused with Stripe's error shape.
    let mut sparse = checkout_form("o");
    sparse.push(("line_items[2][quantity]", "1".into()));
    let (status, _, body) = create(&fake, &sparse, None).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let mut unknown = checkout_form("o");
    unknown.push(("succes_url", "https://typo.test".into()));
    let (status, _, body) = create(&fake, &unknown, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("parameter_unknown"))
    );
    assert_eq!(body["error"]["param"], "succes_url");
}

/// Same key + same params replays the stored answer (same session, marked replayed);
/// same key + other params is `idempotency_error`; a request that failed validation is
/// not stored, so its key can be used again.
#[tokio::test]
async fn idempotency_keys() {
    let fake = fake().await;
    let form = checkout_form("ord_1");
    let (s1, h1, first) = create(&fake, &form, Some("key-1")).await;
    let (s2, h2, second) = create(&fake, &form, Some("key-1")).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(first, second);
    assert!(h1.get("idempotent-replayed").is_none());
    assert_eq!(h2.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(h2.get("idempotency-key").unwrap(), "key-1");
    assert_eq!(fake.sessions().len(), 1);

    let (s3, _, conflict) = create(&fake, &checkout_form("ord_2"), Some("key-1")).await;
    assert_eq!(s3, 400);
    assert_eq!(conflict["error"]["type"], "idempotency_error");
    assert!(conflict["error"]["message"]
        .as_str()
        .unwrap()
        .contains("key-1"));
    assert_eq!(fake.sessions().len(), 1);

    let mut invalid = checkout_form("ord_3");
    invalid.retain(|(k, _)| *k != "mode");
    let (s4, _, error) = create(&fake, &invalid, Some("key-2")).await;
    assert_eq!(
        (s4, error["error"]["code"].as_str()),
        (400, Some("parameter_missing"))
    );
    let (s5, h5, fresh) = create(&fake, &checkout_form("ord_3"), Some("key-2")).await;
    assert_eq!(s5, 200);
    assert!(h5.get("idempotent-replayed").is_none());
    assert_ne!(fresh["id"], first["id"]);

    let (s6, _, other) = create(&fake, &form, Some("key-3")).await;
    assert_eq!(s6, 200);
    assert_ne!(other["id"], first["id"]);
    assert_eq!(fake.sessions().len(), 3);
    let replays: Vec<bool> = fake.requests().iter().map(|r| r.replayed).collect();
    assert_eq!(replays, [false, true, false, false, false, false]);
}

/// The pay page completes the session, delivers a signed checkout.session.completed
/// once, and redirects to success_url with the session id filled in.
#[tokio::test]
async fn pay_page_completes_and_delivers() {
    let fake = fake().await;
    let hook = receiver(WHSEC).await;
    fake.set_webhook(Some(WebhookTarget {
        url: hook.url(),
        secret: WHSEC.into(),
    }));
    let (_, _, session) = create(&fake, &checkout_form("ord_7"), None).await;
    let id = session["id"].as_str().unwrap().to_owned();
    let no_redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for _ in 0..2 {
        let paid = no_redirect
            .get(session["url"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(paid.status(), 303);
        assert_eq!(
            paid.headers()["location"],
            format!("https://app.example.com/ok?session_id={id}").as_str()
        );
    }
    let now = fake.session(&id).unwrap();
    assert_eq!(
        (now["status"].as_str(), now["payment_status"].as_str()),
        (Some("complete"), Some("paid"))
    );
    assert!(now["payment_intent"].as_str().unwrap().starts_with("pi_"));
    assert_eq!(now["customer_details"]["email"], "a@b.com");

    let deliveries = fake.deliveries();
    assert_eq!(deliveries.len(), 1, "paying twice delivers once");
    assert_eq!(deliveries[0].result, Ok(200));
    let events = hook.events.lock().unwrap().clone();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "checkout.session.completed");
    assert_eq!(events[0]["object"], "event");
    assert_eq!(events[0]["api_version"], stripe::API_VERSION);
    assert_eq!(events[0]["data"]["object"]["id"], id.as_str());
    assert_eq!(events[0]["data"]["object"]["payment_status"], "paid");
    assert_eq!(
        events[0]["data"]["object"]["client_reference_id"],
        "user_42"
    );
    assert!(events[0]["id"].as_str().unwrap().starts_with("evt_"));
}

/// deliver_event signs every event kind so `stripe_sig::verify` accepts it; a wrong
/// secret or a stale timestamp is refused by the same check.
#[tokio::test]
async fn deliver_event_signs_for_verify() {
    let fake = fake().await;
    let hook = receiver(WHSEC).await;
    let (_, _, session) = create(&fake, &checkout_form("ord_8"), None).await;
    let paid = fake.mark_paid(session["id"].as_str().unwrap()).unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let events = [
        stripe::checkout_session_completed(&paid, now),
        stripe::checkout_session_async_payment_succeeded(&session, now),
        stripe::charge_refunded(&paid, 400, now),
    ];
    for event in &events {
        let status = stripe::deliver_event(&hook.url(), WHSEC, event, now)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{}", event["type"]);
    }
    let received = hook.events.lock().unwrap().clone();
    assert_eq!(received, events);
    assert_eq!(received[1]["data"]["object"]["payment_status"], "paid");
    assert_eq!(received[2]["data"]["object"]["amount_refunded"], 400);
    assert_eq!(received[2]["data"]["object"]["refunded"], false);

    let wrong = stripe::deliver_event(&hook.url(), "whsec_other", &events[0], now)
        .await
        .unwrap();
    assert_eq!(wrong, StatusCode::BAD_REQUEST);
    let stale = stripe::deliver_event(&hook.url(), WHSEC, &events[0], now - 3600)
        .await
        .unwrap();
    assert_eq!(stale, StatusCode::BAD_REQUEST);
    assert_eq!(hook.events.lock().unwrap().len(), 3);
}

/// Faults: http_status answers with Stripe's error body, refuse with 503, latency delays,
/// all settable over `/__faults`; nothing is created meanwhile.
#[tokio::test]
async fn faults() {
    let fake = fake().await;
    let client = reqwest::Client::new();
    let faults_url = format!("{}/__faults", fake.base_url());
    client
        .post(&faults_url)
        .json(&serde_json::json!({"http_status": 500}))
        .send()
        .await
        .unwrap();
    let (status, _, body) = create(&fake, &checkout_form("o"), None).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (500, Some("api_error"))
    );
    client
        .post(&faults_url)
        .json(&serde_json::json!({"refuse_connections": true}))
        .send()
        .await
        .unwrap();
    let (status, _, _) = create(&fake, &checkout_form("o"), None).await;
    assert_eq!(status, 503);
    assert!(fake.sessions().is_empty());

    client.delete(&faults_url).send().await.unwrap();
    fake.faults().update(|f| f.latency_ms = 250);
    let t0 = std::time::Instant::now();
    let (status, _, _) = create(&fake, &checkout_form("o"), None).await;
    assert_eq!(status, 200);
    assert!(t0.elapsed() >= Duration::from_millis(250));
}
