//! Running the business, against the real Worker: the admin API (roles, bans, grants,
//! audit) and the exact limits (calls per day, failed logins).
//!
//! Analytics have their own test binary (`api_analytics.rs`): they are global, and the
//! calls made here would count in them.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmb_tests::api::{ApiClient, TestUser};
use cmb_tests::fakes::twilio::CalleeScript;
use cmb_tests::harness;
use serde_json::{json, Value};

fn client() -> ApiClient {
    harness::worker().api()
}

async fn call_and_wait(api: &ApiClient, user: &TestUser, number: &str) -> Value {
    let id = api.trigger_call(user, "sarah", number).await.unwrap();
    api.wait_settled(user, &id, Duration::from_secs(30))
        .await
        .unwrap()
}

/// Every admin route is 403 for a user and 401 for anonymous callers.
#[tokio::test]
async fn admin_routes_need_the_admin_role() {
    let api = client();
    let user = api.register_user("plain").await.unwrap();
    let routes = [
        ("GET", "/admin/users"),
        ("GET", format!("/admin/users/{}", user.id).leak()),
        ("POST", format!("/admin/users/{}/ban", user.id).leak()),
        ("POST", format!("/admin/users/{}/unban", user.id).leak()),
        ("POST", format!("/admin/users/{}/credits", user.id).leak()),
        ("GET", "/admin/calls"),
        ("GET", "/admin/calls/00000000-0000-4000-8000-000000000000"),
        ("GET", "/admin/personas"),
        ("GET", "/admin/audit"),
        ("GET", "/admin/analytics/calls"),
        ("GET", "/admin/analytics/revenue"),
        ("GET", "/admin/analytics/costs"),
    ];
    for (method, path) in routes {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let body = Some((
            "application/json",
            b"{\"amount\":5,\"reason\":\"x\"}".to_vec(),
        ));
        let as_user = api
            .raw(m.clone(), path, Some(&user.token), body.clone())
            .await
            .unwrap();
        assert_eq!(
            as_user.status, 403,
            "{method} {path} as a user: {}",
            as_user.body
        );
        let anon = api.raw(m, path, None, body).await.unwrap();
        assert_eq!(anon.status, 401, "{method} {path} anonymous");
    }
    assert_eq!(
        api.credits(&user).await.unwrap(),
        200,
        "nothing was granted"
    );
}

/// A ban takes effect on the very next request with the user's existing token, cancels
/// their scheduled calls, and is audited; unban restores access.
#[tokio::test]
async fn ban_takes_effect_at_once_and_unban_restores() {
    let api = client();
    let admin = harness::admin(&api).await;
    let user = api.register_user("banned").await.unwrap();
    let later = (time::OffsetDateTime::now_utc() + time::Duration::days(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let sched = api
        .post(
            "/api/calls/schedule",
            Some(&user.token),
            &json!({ "persona_id": "alex", "scheduled_time": later }),
        )
        .await
        .unwrap();
    assert_eq!(sched.status, 201);
    let call_id = sched.body["call"]["id"].as_str().unwrap().to_string();

    let ban = api
        .post(
            &format!("/admin/users/{}/ban", user.id),
            Some(&admin.token),
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(ban.status, 200, "{}", ban.body);
    let me = api.get("/api/me", Some(&user.token)).await.unwrap();
    assert_eq!(me.status, 403, "{}", me.body);
    assert_eq!(me.code(), Some("account_banned"));
    let login = api
        .post(
            "/api/auth/login",
            None,
            &json!({ "email": user.email, "password": user.password }),
        )
        .await
        .unwrap();
    assert_ne!(login.status, 200, "a banned user cannot log in");
    let call = api
        .get(&format!("/admin/calls/{call_id}"), Some(&admin.token))
        .await
        .unwrap();
    assert_eq!(call.body["call"]["status"], "canceled", "{}", call.body);

    let audit = api
        .get("/admin/audit?limit=50", Some(&admin.token))
        .await
        .unwrap();
    assert_eq!(audit.status, 200, "{}", audit.body);
    assert!(
        audit.body.to_string().contains(&user.id),
        "the ban is in the audit log"
    );

    let unban = api
        .post(
            &format!("/admin/users/{}/unban", user.id),
            Some(&admin.token),
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(unban.status, 200);
    assert_eq!(
        api.get("/api/me", Some(&user.token)).await.unwrap().status,
        200
    );
}

/// An admin grant moves the balance by exactly the amount, with a reason, audited; bad
/// amounts are 400 and change nothing.
#[tokio::test]
async fn admin_grants_credits_with_a_reason() {
    let api = client();
    let admin = harness::admin(&api).await;
    let user = api.register_user("granted").await.unwrap();
    let path = format!("/admin/users/{}/credits", user.id);
    let r = api
        .post(
            &path,
            Some(&admin.token),
            &json!({ "amount": 150, "reason": "goodwill" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(api.credits(&user).await.unwrap(), 350);
    for bad in [
        json!({ "amount": "lots", "reason": "x" }),
        json!({ "reason": "no amount" }),
        json!({ "amount": 0, "reason": "zero" }),
    ] {
        let r = api.post(&path, Some(&admin.token), &bad).await.unwrap();
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    assert_eq!(api.credits(&user).await.unwrap(), 350);
    let needle = &user.email[..user.email.find('@').unwrap()];
    let users = api
        .get(
            &format!("/admin/users?q={}", needle.to_uppercase()),
            Some(&admin.token),
        )
        .await
        .unwrap();
    assert_eq!(users.status, 200, "{}", users.body);
    assert!(
        users.body.to_string().contains("350"),
        "search is case-insensitive and shows balances: {}",
        users.body
    );
    let long = "x".repeat(60);
    let r = api
        .get(&format!("/admin/users?q={long}"), Some(&admin.token))
        .await
        .unwrap();
    assert_eq!(
        r.status, 400,
        "an over-long search is a clear 400: {}",
        r.body
    );
    let audit = api
        .get("/admin/audit?limit=100", Some(&admin.token))
        .await
        .unwrap();
    assert!(
        audit.body.to_string().contains("goodwill"),
        "{}",
        audit.body
    );
}

/// A free user's fourth call today is 429 with `retry_after`, at exactly the limit.
#[tokio::test]
async fn calls_per_day_limit_is_exact() {
    let api = client();
    let admin = harness::admin(&api).await;
    let user = api.register_user("quota").await.unwrap();
    // Enough credits for four calls, so only the daily limit can refuse the fourth.
    api.post(
        &format!("/admin/users/{}/credits", user.id),
        Some(&admin.token),
        &json!({ "amount": 500, "reason": "test" }),
    )
    .await
    .unwrap();
    for i in 0..3 {
        let number = format!("+1415555091{i}");
        harness::worker()
            .twilio
            .set_script(number.clone(), CalleeScript::Busy);
        call_and_wait(&api, &user, &number).await;
    }
    let r = api
        .post(
            "/api/calls/trigger",
            Some(&user.token),
            &json!({ "persona_id": "sarah" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(
        r.body["error"]["details"]["retry_after"].as_i64().unwrap() > 0,
        "{}",
        r.body
    );
}

/// Failed logins for one account are limited at exactly 10 per window.
#[tokio::test]
async fn failed_logins_are_limited_exactly() {
    let api = client();
    let user = api.register_user("brute").await.unwrap();
    for i in 0..10 {
        let r = api
            .post(
                "/api/auth/login",
                None,
                &json!({ "email": user.email, "password": "wrong password!" }),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 401, "attempt {i}: {}", r.body);
    }
    let r = api
        .post(
            "/api/auth/login",
            None,
            &json!({ "email": user.email, "password": user.password }),
        )
        .await
        .unwrap();
    assert_eq!(
        r.status, 429,
        "the 11th attempt is refused, even with the right password: {}",
        r.body
    );
    assert_eq!(r.code(), Some("rate_limited"));
}
