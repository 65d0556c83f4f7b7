//! Buying credits against the real Worker and the fake Stripe: Checkout, the signed
//! webhook (exactly-once grants under replays and concurrency, unpaid sessions, bad
//! signatures), and refunds.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use cmb_tests::api::{ApiClient, TestUser};
use cmb_tests::fakes::stripe;
use cmb_tests::harness::{self, STRIPE_WEBHOOK_SECRET};
use serde_json::{json, Value};

fn client() -> ApiClient {
    harness::worker().api()
}

fn webhook_url() -> String {
    format!("{}/api/payments/webhook", harness::worker().url())
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Starts a checkout for `pack` and returns the fake Stripe's session object.
async fn checkout(api: &ApiClient, user: &TestUser, pack: &str) -> Value {
    let r = api
        .post(
            "/api/payments/checkout",
            Some(&user.token),
            &json!({ "pack": pack }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let url = r.body["url"].as_str().unwrap().to_string();
    let session = harness::worker()
        .stripe
        .sessions()
        .into_iter()
        .find(|s| s["url"] == url.as_str())
        .expect("the session behind the returned URL exists at Stripe");
    session
}

/// The session as Stripe sends it once the card payment succeeded.
fn paid(session: &Value) -> Value {
    let mut s = session.clone();
    s["payment_status"] = json!("paid");
    s["status"] = json!("complete");
    // A paid session in payment mode always has its PaymentIntent (refunds name it).
    if s["payment_intent"].is_null() {
        s["payment_intent"] = json!(format!("pi_{}", uuid::Uuid::new_v4().simple()));
    }
    s
}

/// Checkout creates a Stripe session with the user, the pack and an idempotency key,
/// and answers its URL; unknown packs are 400.
#[tokio::test]
async fn checkout_creates_a_session_for_the_pack() {
    let api = client();
    let user = api.register_user("buyer").await.unwrap();
    let session = checkout(&api, &user, "plus").await;
    assert_eq!(session["client_reference_id"], user.id.as_str());
    assert_eq!(session["amount_total"], 1000);
    assert_eq!(session["mode"], "payment");
    let meta = &session["metadata"];
    assert!(
        meta.to_string().contains(&user.id),
        "metadata names the user: {meta}"
    );
    assert!(
        meta.to_string().contains("plus"),
        "metadata names the pack: {meta}"
    );
    let request = harness::worker()
        .stripe
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path == "/v1/checkout/sessions")
        .unwrap();
    assert!(
        request.idempotency_key.is_some(),
        "Stripe requests carry an Idempotency-Key"
    );

    let bad = api
        .post(
            "/api/payments/checkout",
            Some(&user.token),
            &json!({ "pack": "mega" }),
        )
        .await
        .unwrap();
    assert_eq!(bad.status, 400, "{}", bad.body);
    let anon = api
        .post(
            "/api/payments/checkout",
            None,
            &json!({ "pack": "starter" }),
        )
        .await
        .unwrap();
    assert_eq!(anon.status, 401);
}

/// A paid session grants its credits exactly once, even when the event is delivered ten
/// times, concurrently.
#[tokio::test]
async fn paid_session_grants_once_under_concurrent_redelivery() {
    let api = client();
    let user = api.register_user("once").await.unwrap();
    let session = checkout(&api, &user, "starter").await;
    let event = stripe::checkout_session_completed(&paid(&session), now());
    let deliveries: Vec<_> = (0..10)
        .map(|_| {
            let event = event.clone();
            tokio::spawn(async move {
                stripe::deliver_event(&webhook_url(), STRIPE_WEBHOOK_SECRET, &event, now())
                    .await
                    .unwrap()
            })
        })
        .collect();
    for d in deliveries {
        assert_eq!(d.await.unwrap().as_u16(), 200);
    }
    assert_eq!(api.credits(&user).await.unwrap(), 200 + 500);

    // The same session through another event (async success) grants nothing more.
    let again = stripe::checkout_session_async_payment_succeeded(&paid(&session), now());
    let status = stripe::deliver_event(&webhook_url(), STRIPE_WEBHOOK_SECRET, &again, now())
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 200);
    assert_eq!(
        api.credits(&user).await.unwrap(),
        700,
        "one grant per session"
    );
}

/// `checkout.session.completed` with `payment_status: unpaid` grants nothing; the later
/// `async_payment_succeeded` does.
#[tokio::test]
async fn unpaid_session_grants_nothing_until_it_is_paid() {
    let api = client();
    let user = api.register_user("unpaid").await.unwrap();
    let session = checkout(&api, &user, "starter").await;
    let event = stripe::checkout_session_completed(&session, now());
    assert_eq!(session["payment_status"], "unpaid");
    let status = stripe::deliver_event(&webhook_url(), STRIPE_WEBHOOK_SECRET, &event, now())
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 200);
    assert_eq!(api.credits(&user).await.unwrap(), 200);

    let settled = stripe::checkout_session_async_payment_succeeded(&paid(&session), now());
    let status = stripe::deliver_event(&webhook_url(), STRIPE_WEBHOOK_SECRET, &settled, now())
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 200);
    assert_eq!(api.credits(&user).await.unwrap(), 700);
}

/// Tampered body, wrong secret, old timestamp, no signature: 400 and nothing changes.
#[tokio::test]
async fn bad_signatures_are_400_and_change_nothing() {
    let api = client();
    let user = api.register_user("forger").await.unwrap();
    let session = checkout(&api, &user, "pro").await;
    let event = stripe::checkout_session_completed(&paid(&session), now());
    let http = reqwest::Client::new();
    let body = serde_json::to_vec(&event).unwrap();

    let wrong_secret = cmb_core::stripe_sig::signature_header("whsec_not_ours", now(), &body);
    let old = cmb_core::stripe_sig::signature_header(STRIPE_WEBHOOK_SECRET, now() - 3600, &body);
    let good = cmb_core::stripe_sig::signature_header(STRIPE_WEBHOOK_SECRET, now(), &body);
    let mut tampered = event.clone();
    tampered["data"]["object"]["amount_total"] = json!(1);
    let tampered = serde_json::to_vec(&tampered).unwrap();

    for (sig, payload) in [
        (Some(wrong_secret), body.clone()),
        (Some(old), body.clone()),
        (Some(good), tampered),
        (Some("t=1,v1=deadbeef".to_string()), body.clone()),
        (None, body.clone()),
    ] {
        let mut req = http
            .post(webhook_url())
            .header("content-type", "application/json")
            .body(payload);
        if let Some(sig) = sig {
            req = req.header("Stripe-Signature", sig);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400);
    }
    assert_eq!(
        api.credits(&user).await.unwrap(),
        200,
        "no bad delivery granted anything"
    );
}

/// Event types we do not handle are acknowledged with 200 (so Stripe stops retrying).
#[tokio::test]
async fn ignored_event_types_get_200() {
    let event = stripe::event(
        "customer.created",
        json!({"id": "cus_1", "object": "customer"}),
        Value::Null,
        now(),
    );
    let status = stripe::deliver_event(&webhook_url(), STRIPE_WEBHOOK_SECRET, &event, now())
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 200);
}

/// A full refund takes the pack's credits back; never below zero.
#[tokio::test]
async fn refunds_take_credits_back_but_never_below_zero() {
    let api = client();
    let user = api.register_user("refund").await.unwrap();
    let session = checkout(&api, &user, "starter").await;
    let paid_session = paid(&session);
    let event = stripe::checkout_session_completed(&paid_session, now());
    stripe::deliver_event(&webhook_url(), STRIPE_WEBHOOK_SECRET, &event, now())
        .await
        .unwrap();
    assert_eq!(api.credits(&user).await.unwrap(), 700);

    // Spend some of it: a connected 3-minute call costs 145.
    let number = "+14155550777";
    harness::worker().twilio.set_script(
        number,
        cmb_tests::fakes::twilio::CalleeScript::Answer(cmb_tests::fakes::twilio::Answer {
            after_rings: 1,
            answered_by: cmb_tests::fakes::twilio::AnsweredBy::Human,
            session: cmb_tests::sim::SimScript::new(vec![
                cmb_tests::sim::Step::Pause(200),
                cmb_tests::sim::Step::HangUp,
            ]),
            duration_override_secs: Some(125),
        }),
    );
    let id = api.trigger_call(&user, "brad", number).await.unwrap();
    api.wait_settled(&user, &id, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    let before = api.credits(&user).await.unwrap();
    assert_eq!(before, 700 - 145);

    let refund = stripe::charge_refunded(&paid_session, 500, now());
    let status = stripe::deliver_event(&webhook_url(), STRIPE_WEBHOOK_SECRET, &refund, now())
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 200);
    assert_eq!(
        api.credits(&user).await.unwrap(),
        before - 500,
        "the pack's 500 credits taken back"
    );
    // Delivered again: nothing more is taken.
    stripe::deliver_event(&webhook_url(), STRIPE_WEBHOOK_SECRET, &refund, now())
        .await
        .unwrap();
    assert_eq!(api.credits(&user).await.unwrap(), before - 500);
}
