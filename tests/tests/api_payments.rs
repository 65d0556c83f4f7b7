//! Payments beyond `api_billing.rs`'s basics, against the real Worker under
//! `wrangler dev` and the fake Stripe: client idempotency keys and Stripe errors at
//! checkout, the pay page end to end, the audit and ledger record of a grant, refunds
//! that exceed the balance (debt) or come in parts, and signature-header edge cases
//! (secret rotation, `v0` only).
//!
//! Events are built by the fake's official-shape builders and signed with
//! `cmb_core::stripe_sig` exactly as Stripe signs them.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use cmb_core::stripe_sig;
use cmb_tests::api::{ApiClient, TestUser};
use cmb_tests::fakes::stripe as fake_stripe;
use cmb_tests::harness::{self, STRIPE_WEBHOOK_SECRET};
use serde_json::{json, Value};
use tokio::sync::RwLock;

/// Checkout tests share the fake Stripe; the one test that breaks it on purpose takes
/// this lock exclusively so no other checkout sees its fault.
static STRIPE_FAULTS: RwLock<()> = RwLock::const_new(());

fn client() -> ApiClient {
    harness::worker().api()
}

fn stripe() -> &'static fake_stripe::Handle {
    &harness::worker().stripe
}

fn webhook_url() -> String {
    format!("{}/api/payments/webhook", harness::worker().url())
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// POSTs a raw webhook body with the given `Stripe-Signature` header (if any).
async fn post_webhook(body: &[u8], signature: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(webhook_url())
        .header("content-type", "application/json; charset=utf-8")
        .body(body.to_vec());
    if let Some(sig) = signature {
        req = req.header("Stripe-Signature", sig);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

/// Delivers `event` signed as Stripe would, now.
async fn deliver(event: &Value) -> (u16, Value) {
    let payload = serde_json::to_vec(event).unwrap();
    let sig = stripe_sig::signature_header(STRIPE_WEBHOOK_SECRET, now(), &payload);
    post_webhook(&payload, Some(&sig)).await
}

/// `POST /api/payments/checkout` with an optional client `Idempotency-Key`.
async fn checkout(user: &TestUser, pack: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/api/payments/checkout", harness::worker().url()))
        .bearer_auth(&user.token)
        .json(&json!({ "pack": pack }));
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// A user with an open Checkout Session for `pack`; returns the session id.
async fn open_session(user: &TestUser, pack: &str) -> String {
    let _shared = STRIPE_FAULTS.read().await;
    let (status, body) = checkout(user, pack, None).await;
    assert_eq!(status, 200, "{body}");
    body["session_id"].as_str().unwrap().to_string()
}

/// The user's ledger entries as the admin sees them.
async fn ledger(api: &ApiClient, user: &TestUser) -> Vec<Value> {
    let admin = harness::admin(api).await;
    let r = api
        .get(&format!("/admin/users/{}", user.id), Some(&admin.token))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["ledger"].as_array().unwrap().clone()
}

async fn admin_user(api: &ApiClient, user: &TestUser) -> Value {
    let admin = harness::admin(api).await;
    let r = api
        .get(&format!("/admin/users/{}", user.id), Some(&admin.token))
        .await
        .unwrap();
    r.body["user"].clone()
}

/// The same client Idempotency-Key (a double-click) yields the same session; a new key
/// (a later purchase) a new one.
#[tokio::test]
async fn checkout_is_idempotent_per_client_key() {
    let _shared = STRIPE_FAULTS.read().await;
    let api = client();
    let user = api.register_user("dblclick").await.unwrap();
    let (s1, first) = checkout(&user, "starter", Some("order-1")).await;
    let (s2, again) = checkout(&user, "starter", Some("order-1")).await;
    assert_eq!((s1, s2), (200, 200), "{first} {again}");
    assert_eq!(first["session_id"], again["session_id"]);
    assert_eq!(first["url"], again["url"]);
    let (_, later) = checkout(&user, "starter", Some("order-2")).await;
    assert_ne!(later["session_id"], first["session_id"]);
    let replays = stripe()
        .requests()
        .into_iter()
        .filter(|r| r.params["client_reference_id"] == user.id.as_str() && r.replayed)
        .count();
    assert_eq!(
        replays, 1,
        "Stripe answered the repeat from its idempotency store"
    );
}

/// Bad input is a 4xx with a code; anonymous is 401; nothing reaches Stripe.
#[tokio::test]
async fn checkout_validates_input() {
    let _shared = STRIPE_FAULTS.read().await;
    let api = client();
    let user = api.register_user("badpack").await.unwrap();
    let before = stripe().requests().len();
    let (status, body) = checkout(&user, "gold", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_pack"))
    );
    let (status, body) = checkout(&user, "starter", Some("has spaces")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_idempotency_key"))
    );
    let r = api
        .post(
            "/api/payments/checkout",
            None,
            &json!({ "pack": "starter" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    let r = api
        .post(
            "/api/payments/checkout",
            Some(&user.token),
            &json!({ "pack": 5 }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let unrelated_or_none = stripe().requests()[before..]
        .iter()
        .all(|r| r.params["client_reference_id"] != user.id.as_str());
    assert!(unrelated_or_none, "refused checkouts never called Stripe");
}

/// A Stripe error becomes a 502 `payment_provider_error` carrying Stripe's message.
#[tokio::test]
async fn stripe_errors_are_502() {
    let _exclusive = STRIPE_FAULTS.write().await;
    let api = client();
    let user = api.register_user("outage").await.unwrap();
    stripe().faults().update(|f| f.http_status = Some(500));
    let (status, body) = checkout(&user, "starter", None).await;
    stripe().faults().reset();
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "payment_provider_error");
    assert_eq!(body["error"]["message"], "Internal Server Error");
}

/// Paying on Stripe's page delivers the signed completed event; the Worker grants the
/// pack, and the page returns to the Worker's success page.
#[tokio::test]
async fn paying_grants_the_pack() {
    let api = client();
    let user = api.register_user("payer").await.unwrap();
    let id = open_session(&user, "starter").await;
    let pay = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/pay/{id}", stripe().base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(pay.status().as_u16(), 303);
    let location = pay.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(
        location,
        format!(
            "{}/payments/success?session_id={id}",
            harness::worker().url()
        )
    );
    let delivery = stripe()
        .deliveries()
        .into_iter()
        .find(|d| d.event["data"]["object"]["id"] == id.as_str())
        .expect("webhook delivered");
    assert_eq!(delivery.result, Ok(200));
    assert_eq!(api.credits(&user).await.unwrap(), 200 + 500);
    let page = reqwest::get(&location).await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.unwrap().contains("Payment received"));
}

/// A grant under 10 concurrent deliveries plus another event for the same session is
/// one `fulfilled` and the rest `duplicate`, one ledger entry keyed by the session, and
/// one audit row with the exact balance before and after.
#[tokio::test]
async fn a_grant_is_recorded_once_in_ledger_and_audit() {
    let api = client();
    let user = api.register_user("redeliver").await.unwrap();
    let id = open_session(&user, "plus").await;
    let paid = stripe().mark_paid(&id).unwrap();
    let event = fake_stripe::checkout_session_completed(&paid, now());
    let deliveries: Vec<_> = (0..10)
        .map(|_| {
            let event = event.clone();
            tokio::spawn(async move { deliver(&event).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for d in deliveries {
        let (status, body) = d.await.unwrap();
        assert_eq!(status, 200, "{body}");
        outcomes.push(body["outcome"].as_str().unwrap().to_string());
    }
    outcomes.sort();
    assert_eq!(
        outcomes.iter().filter(|o| *o == "fulfilled").count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.iter().filter(|o| *o == "duplicate").count(),
        9,
        "{outcomes:?}"
    );
    assert_eq!(api.credits(&user).await.unwrap(), 200 + 1200);

    // Another event about the same session (a new event id) changes nothing either.
    let other = fake_stripe::checkout_session_async_payment_succeeded(&paid, now());
    let (status, body) = deliver(&other).await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("duplicate")));
    assert_eq!(api.credits(&user).await.unwrap(), 200 + 1200);

    let purchases: Vec<_> = ledger(&api, &user)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "purchase")
        .collect();
    assert_eq!(purchases.len(), 1);
    assert_eq!(purchases[0]["amount"], 1200);
    assert_eq!(
        purchases[0]["idempotency_key"],
        format!("stripe:session:{id}")
    );
    let admin = harness::admin(&api).await;
    let audit = api
        .audit(&admin, "payment.purchase", &user.id)
        .await
        .unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    let entry = &audit[0];
    assert_eq!(entry["actor"], "stripe");
    assert_eq!(entry["before"]["credits"], 200);
    assert_eq!(entry["after"]["credits"], 1400);
    assert_eq!(entry["after"]["session_id"], id.as_str());
}

/// Header edge cases (`api_billing.rs` covers tampering, wrong secret and age): a
/// header with only `v0`, or `v1` without `t`, is 400 and changes nothing; during
/// secret rotation any matching `v1` is accepted.
#[tokio::test]
async fn signature_header_edge_cases() {
    let api = client();
    let user = api.register_user("rotation").await.unwrap();
    let id = open_session(&user, "pro").await;
    let paid = stripe().mark_paid(&id).unwrap();
    let payload =
        serde_json::to_vec(&fake_stripe::checkout_session_completed(&paid, now())).unwrap();
    let t = now();
    let good = stripe_sig::signature_header(STRIPE_WEBHOOK_SECRET, t, &payload);
    let v1 = good.split(',').nth(1).unwrap();
    for (what, sig) in [
        ("v0 only", good.replace("v1=", "v0=")),
        ("no timestamp", v1.to_string()),
        ("empty", String::new()),
    ] {
        let (status, reply) = post_webhook(&payload, Some(&sig)).await;
        assert_eq!(status, 400, "{what}: {reply}");
        assert_eq!(reply["error"]["code"], "invalid_signature", "{what}");
    }
    assert_eq!(api.credits(&user).await.unwrap(), 200, "nothing changed");

    let rotated = format!("t={t},v1={},{v1},v0={}", "0".repeat(64), "1".repeat(64));
    let (status, reply) = post_webhook(&payload, Some(&rotated)).await;
    assert_eq!(
        (status, reply["outcome"].as_str()),
        (200, Some("fulfilled"))
    );
    assert_eq!(api.credits(&user).await.unwrap(), 200 + 3000);
}

/// A full refund takes the pack back; when the balance is lower it takes what there is
/// (never below zero) and records the rest as debt; a replay changes nothing.
#[tokio::test]
async fn refund_takes_credits_back_and_records_debt() {
    let api = client();
    let admin = harness::admin(&api).await;
    let user = api.register_user("refund").await.unwrap();
    let id = open_session(&user, "starter").await;
    let paid = stripe().mark_paid(&id).unwrap();
    deliver(&fake_stripe::checkout_session_completed(&paid, now())).await;
    assert_eq!(api.credits(&user).await.unwrap(), 700);
    // Spend most of it (an admin deduction stands in for calls).
    let r = api
        .post(
            &format!("/admin/users/{}/credits", user.id),
            Some(&admin.token),
            &json!({ "amount": -600, "reason": "spent on calls" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(api.credits(&user).await.unwrap(), 100);

    let refund = fake_stripe::charge_refunded(&paid, 500, now());
    let (status, body) = deliver(&refund).await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("refunded")),
        "{body}"
    );
    assert_eq!(api.credits(&user).await.unwrap(), 0, "never below zero");
    let view = admin_user(&api, &user).await;
    assert_eq!(view["debt"], 400, "the shortfall is recorded: {view}");
    let (status, body) = deliver(&refund).await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("duplicate")));
    assert_eq!(api.credits(&user).await.unwrap(), 0);
    assert_eq!(admin_user(&api, &user).await["debt"], 400);

    let entries = ledger(&api, &user).await;
    let refunds: Vec<_> = entries.iter().filter(|e| e["kind"] == "refund").collect();
    assert_eq!(refunds.len(), 1);
    assert_eq!(refunds[0]["amount"], -100);
    let sum: i64 = entries.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
    assert_eq!(sum, 0, "the ledger reconciles with the balance");
}

/// A charge refunded in two steps takes back proportional credits each time, adding up
/// to exactly the pack.
#[tokio::test]
async fn partial_refunds_are_proportional() {
    let api = client();
    let user = api.register_user("partial").await.unwrap();
    let id = open_session(&user, "plus").await;
    let paid = stripe().mark_paid(&id).unwrap();
    deliver(&fake_stripe::checkout_session_completed(&paid, now())).await;
    assert_eq!(api.credits(&user).await.unwrap(), 1400);

    // $2.50 of $10.00 → 300 of 1,200 credits.
    let first = fake_stripe::charge_refunded(&paid, 250, now());
    let charge_id = first["data"]["object"]["id"].clone();
    assert_eq!(deliver(&first).await.0, 200);
    assert_eq!(api.credits(&user).await.unwrap(), 1100);

    // The rest of the same charge: Stripe reports the cumulative amount and the previous.
    let mut rest = fake_stripe::charge_refunded(&paid, 1000, now());
    rest["data"]["object"]["id"] = charge_id;
    rest["data"]["previous_attributes"] = json!({ "amount_refunded": 250, "refunded": false });
    let (status, body) = deliver(&rest).await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("refunded")));
    assert_eq!(api.credits(&user).await.unwrap(), 200);
    assert_eq!(admin_user(&api, &user).await["debt"], 0);
}
