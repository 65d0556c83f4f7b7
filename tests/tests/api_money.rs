//! Money paths that used to leak, against the real Worker under `wrangler dev` (D1, or
//! Postgres in the second pass) and signed events in Stripe's shape: a dispute leaves
//! the credits in place; a refund that arrives before its purchase lets the purchase
//! grant anyway; a paid amount or currency other than the pack's still grants; a
//! session we never created grants from its metadata; and, under concurrent money
//! movements of every kind, each balance equals the sum of its ledger.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use cmb_core::stripe_sig;
use cmb_tests::api::{ApiClient, TestUser};
use cmb_tests::fakes::stripe as fake_stripe;
use cmb_tests::harness::{self, STRIPE_WEBHOOK_SECRET};
use serde_json::{json, Value};

/// The free credits a verified test account starts with (`FREE_CREDITS`).
const FREE: i64 = 200;

fn client() -> ApiClient {
    harness::worker().api()
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Delivers `event` signed as Stripe would, now; the status and the `outcome`.
async fn deliver(event: &Value) -> (u16, String) {
    let payload = serde_json::to_vec(event).unwrap();
    let sig = stripe_sig::signature_header(STRIPE_WEBHOOK_SECRET, now(), &payload);
    let resp = reqwest::Client::new()
        .post(format!("{}/api/payments/webhook", harness::worker().url()))
        .header("content-type", "application/json")
        .header("Stripe-Signature", sig)
        .body(payload)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let outcome = body["outcome"].as_str().unwrap_or_default().to_string();
    (status, outcome)
}

/// A checkout of `pack` for `user`, paid on the fake Stripe: the paid session.
async fn paid_session(api: &ApiClient, user: &TestUser, pack: &str) -> Value {
    let id = api.checkout(user, pack).await.unwrap();
    harness::worker().stripe.mark_paid(&id).unwrap()
}

/// The admin's view of `user`: the user object and their latest ledger entries.
async fn account(api: &ApiClient, user: &TestUser) -> (Value, Vec<Value>) {
    let admin = harness::admin(api).await;
    let r = api
        .get(&format!("/admin/users/{}", user.id), Some(&admin.token))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    (
        r.body["user"].clone(),
        r.body["ledger"].as_array().unwrap().clone(),
    )
}

/// Asserts `SUM(ledger) = balance` for `user` (every entry must be on the page) and
/// returns the balance.
async fn reconciled(api: &ApiClient, user: &TestUser) -> i64 {
    let (view, entries) = account(api, user).await;
    assert!(entries.len() < 50, "the ledger page must hold every entry");
    let sum: i64 = entries.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
    let balance = view["credits"].as_i64().unwrap();
    assert_eq!(sum, balance, "ledger and balance disagree: {entries:?}");
    assert!(balance >= 0);
    balance
}

/// A dispute takes back the pack's credits (audited, once), and a replay changes
/// nothing.
#[tokio::test]
async fn a_dispute_takes_the_pack_back() {
    let api = client();
    let user = api.register_user("disputer").await.unwrap();
    let paid = paid_session(&api, &user, "plus").await;
    let (status, outcome) = deliver(&fake_stripe::checkout_session_completed(&paid, now())).await;
    assert_eq!((status, outcome.as_str()), (200, "fulfilled"));
    assert_eq!(api.credits(&user).await.unwrap(), FREE + 1200);

    let dispute = fake_stripe::charge_dispute_created(&paid, now());
    let (status, outcome) = deliver(&dispute).await;
    assert_eq!((status, outcome.as_str()), (200, "disputed"));
    assert_eq!(api.credits(&user).await.unwrap(), FREE);
    let (status, outcome) = deliver(&dispute).await;
    assert_eq!((status, outcome.as_str()), (200, "duplicate"));
    assert_eq!(reconciled(&api, &user).await, FREE);

    let admin = harness::admin(&api).await;
    let audit = api
        .audit(&admin, "payment.dispute", &user.id)
        .await
        .unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    let entry = &audit[0];
    assert_eq!(entry["actor"], "stripe");
    assert_eq!(entry["before"]["credits"], FREE + 1200);
    assert_eq!(entry["after"]["credits"], FREE);
}

/// A full refund delivered before the purchase's `checkout.session.completed` waits,
/// and the purchase then grants nothing: the pair nets zero, and the free credits the
/// account already had are untouched (no debt either).
#[tokio::test]
async fn a_refund_before_its_purchase_nets_zero() {
    let api = client();
    let user = api.register_user("early-refund").await.unwrap();
    let paid = paid_session(&api, &user, "starter").await;
    let (status, outcome) = deliver(&fake_stripe::charge_refunded(&paid, 500, now())).await;
    assert_eq!((status, outcome.as_str()), (200, "refund_pending"));
    assert_eq!(api.credits(&user).await.unwrap(), FREE);

    let (status, outcome) = deliver(&fake_stripe::checkout_session_completed(&paid, now())).await;
    assert_eq!((status, outcome.as_str()), (200, "fulfilled"));
    assert_eq!(
        api.credits(&user).await.unwrap(),
        FREE,
        "the refund was netted"
    );
    let (view, _) = account(&api, &user).await;
    assert_eq!(view["debt"], 0, "{view}");
    assert_eq!(reconciled(&api, &user).await, FREE);

    // A partial refund first nets only its share: $2.50 of $10.00 is 300 of 1,200.
    let paid = paid_session(&api, &user, "plus").await;
    let (_, outcome) = deliver(&fake_stripe::charge_refunded(&paid, 250, now())).await;
    assert_eq!(outcome, "refund_pending");
    deliver(&fake_stripe::checkout_session_completed(&paid, now())).await;
    assert_eq!(api.credits(&user).await.unwrap(), FREE + 900);
    assert_eq!(reconciled(&api, &user).await, FREE + 900);
}

/// Fulfilment checks what was paid: an `amount_total` or `currency` other than the
/// pack's price grants nothing (the event is answered, so Stripe stops retrying, and
/// an operator is told in the log).
#[tokio::test]
async fn a_paid_amount_other_than_the_packs_grants_nothing() {
    let api = client();
    let user = api.register_user("underpaid").await.unwrap();
    let paid = paid_session(&api, &user, "pro").await;
    for (field, value) in [("amount_total", json!(1)), ("currency", json!("eur"))] {
        let mut event = fake_stripe::checkout_session_completed(&paid, now());
        event["data"]["object"][field] = value;
        let (status, outcome) = deliver(&event).await;
        assert_eq!(
            (status, outcome.as_str()),
            (200, "amount_mismatch"),
            "{field}"
        );
        assert_eq!(api.credits(&user).await.unwrap(), FREE, "{field}");
    }
    // The genuine event still grants the pack.
    let (_, outcome) = deliver(&fake_stripe::checkout_session_completed(&paid, now())).await;
    assert_eq!(outcome, "fulfilled");
    assert_eq!(api.credits(&user).await.unwrap(), FREE + 3000);
}

/// A paid session we never created (made elsewhere on the Stripe account, naming one
/// of our users in its metadata) grants nothing.
#[tokio::test]
async fn a_session_we_did_not_create_grants_nothing() {
    let api = client();
    let user = api.register_user("foreign").await.unwrap();
    let mut session = paid_session(&api, &user, "starter").await;
    session["id"] = json!(format!("cs_test_{}", uuid::Uuid::new_v4().simple()));
    session["payment_intent"] = json!(format!("pi_{}", uuid::Uuid::new_v4().simple()));
    session["client_reference_id"] = json!(user.id);
    session["metadata"] = json!({ "user_id": user.id, "pack": "pro" });
    session["amount_total"] = json!(2000);
    let (status, outcome) =
        deliver(&fake_stripe::checkout_session_completed(&session, now())).await;
    assert_eq!((status, outcome.as_str()), (200, "not_ours"));
    assert_eq!(api.credits(&user).await.unwrap(), FREE);
}

/// Waits for every task; each must have been answered 200.
async fn all_answered(tasks: Vec<tokio::task::JoinHandle<(u16, String)>>) {
    for t in tasks {
        let (status, what) = t.await.unwrap();
        assert_eq!(status, 200, "{what}");
    }
}

/// Every kind of money movement at once, for several users: purchases (each delivered
/// twice), a full refund racing its own purchase, admin grants and deductions, then a
/// dispute racing a deduction. Every balance ends exactly where the arithmetic says
/// and equals the sum of its ledger — on D1, and on Postgres where each money batch
/// locks the user's row first.
#[tokio::test]
async fn concurrent_money_movements_reconcile() {
    let api = client();
    let admin = harness::admin(&api).await;
    let mut users = Vec::new();
    for i in 0..3 {
        users.push(api.register_user(&format!("ledger-{i}")).await.unwrap());
    }
    let mut starters = Vec::new();
    let mut pluses = Vec::new();
    for user in &users {
        starters.push(paid_session(&api, user, "starter").await);
        pluses.push(paid_session(&api, user, "plus").await);
    }
    let adjust = |user: &TestUser, amount: i64| {
        let api = api.clone();
        let token = admin.token.clone();
        let path = format!("/admin/users/{}/credits", user.id);
        async move {
            let r = api
                .post(
                    &path,
                    Some(&token),
                    &json!({ "amount": amount, "reason": "reconciliation test" }),
                )
                .await
                .unwrap();
            (r.status, r.body.to_string())
        }
    };

    // Phase 1, all at once: per user, the starter pack and its full refund (in either
    // order), the plus pack twice, three grants of 100 and two deductions of 50.
    let mut tasks: Vec<tokio::task::JoinHandle<(u16, String)>> = Vec::new();
    for ((user, starter), plus) in users.iter().zip(&starters).zip(&pluses) {
        let events = [
            fake_stripe::checkout_session_completed(starter, now()),
            fake_stripe::charge_refunded(starter, 500, now()),
            fake_stripe::checkout_session_completed(plus, now()),
            fake_stripe::checkout_session_completed(plus, now()),
        ];
        for event in events {
            tasks.push(tokio::spawn(async move { deliver(&event).await }));
        }
        for amount in [100, 100, 100, -50, -50] {
            tasks.push(tokio::spawn(adjust(user, amount)));
        }
    }
    all_answered(tasks).await;
    for user in &users {
        assert_eq!(
            reconciled(&api, user).await,
            FREE + 1200 + 300 - 100,
            "the starter pack and its refund net zero"
        );
        assert_eq!(account(&api, user).await.0["debt"], 0);
    }

    // Phase 2: a dispute of the plus pack, delivered twice, racing a deduction.
    let mut tasks: Vec<tokio::task::JoinHandle<(u16, String)>> = Vec::new();
    for (user, plus) in users.iter().zip(&pluses) {
        let dispute = fake_stripe::charge_dispute_created(plus, now());
        for _ in 0..2 {
            let dispute = dispute.clone();
            tasks.push(tokio::spawn(async move { deliver(&dispute).await }));
        }
        tasks.push(tokio::spawn(adjust(user, -50)));
    }
    all_answered(tasks).await;
    for user in &users {
        assert_eq!(
            reconciled(&api, user).await,
            FREE + 1200 + 300 - 100 - 50 - 1200
        );
    }
}

/// Admin amounts are range-checked without overflow: `i64::MIN` (which has no absolute
/// value) and numbers beyond i64 are refused and change nothing.
#[tokio::test]
async fn admin_amounts_cannot_overflow() {
    let api = client();
    let admin = harness::admin(&api).await;
    let user = api.register_user("overflow").await.unwrap();
    let path = format!("/admin/users/{}/credits", user.id);
    for amount in [json!(i64::MIN), json!(i64::MAX), json!(1e30), json!(-1e30)] {
        let r = api
            .post(
                &path,
                Some(&admin.token),
                &json!({ "amount": amount, "reason": "overflow probe" }),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{amount}: {}", r.body);
    }
    assert_eq!(reconciled(&api, &user).await, FREE);
}
