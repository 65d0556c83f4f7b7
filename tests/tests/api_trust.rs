//! Trust and safety against the real Worker (wrangler dev, D1 or Postgres) and the fake
//! Twilio (Calls and Verify): we call only a number the account proved it holds, never a
//! premium-rate, satellite or foreign range, free credits come once per number, and admin
//! rights come only from the operator command — never from registration or a token.

// A panic in a test is that test's failure.
#![allow(clippy::unwrap_used)]

use cmb_tests::api::{fresh_number, ApiClient, Reply, TestUser};
use cmb_tests::harness;
use serde_json::json;

/// A client that cannot read SMS: its users register without verifying a phone.
/// `POST /api/calls/schedule` with persona Alex, `ahead` from now, as `token`.
async fn schedule_in(api: &ApiClient, token: &str, ahead: time::Duration) -> Reply {
    let when = (time::OffsetDateTime::now_utc() + ahead)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    api.post(
        "/api/calls/schedule",
        Some(token),
        &json!({ "persona_id": "alex", "scheduled_time": when }),
    )
    .await
    .unwrap()
}

fn unverified_api() -> ApiClient {
    ApiClient::new(harness::worker().url())
}

async fn me(api: &ApiClient, user: &TestUser) -> serde_json::Value {
    let r = api.get("/api/me", Some(&user.token)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["user"].clone()
}

/// An account without a verified phone cannot have anyone called; once verified, calls
/// go to that number only, and `phone_number` may be left out.
#[tokio::test]
async fn calls_go_only_to_the_verified_number() {
    let api = harness::worker().api();
    let user = unverified_api().register_user("unverified").await.unwrap();
    assert_eq!(me(&api, &user).await["phone_verified"], false);
    let victim = "+14155550777";
    let calls_before = harness::worker().twilio.calls().len();
    for body in [
        json!({ "persona_id": "brad", "phone_number": victim }),
        json!({ "persona_id": "brad" }),
    ] {
        let r = api
            .post("/api/calls/trigger", Some(&user.token), &body)
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{}", r.body);
        assert_eq!(r.code(), Some("phone_not_verified"), "{}", r.body);
    }
    let r = api
        .post(
            "/api/calls/schedule",
            Some(&user.token),
            &json!({ "persona_id": "brad", "phone_number": victim, "scheduled_time": "2099-01-01T00:00:00Z" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);

    let own = fresh_number();
    let r = api.verify_phone(&user, &own).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["user"]["phone_verified"], true);
    assert_eq!(r.body["user"]["phone_number"], own.as_str());
    // Still nobody else's number.
    let r = api
        .post(
            "/api/calls/trigger",
            Some(&user.token),
            &json!({ "persona_id": "brad", "phone_number": victim }),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.code()), (403, Some("phone_not_verified")));
    assert_eq!(harness::worker().twilio.calls().len(), calls_before);
    // The verified number, by default.
    let r = api
        .post(
            "/api/calls/trigger",
            Some(&user.token),
            &json!({ "persona_id": "brad" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["call"]["phone_number"], own.as_str());
}

/// Premium-rate, shared-cost, satellite and not-allowed countries' numbers are refused
/// before anything reaches Twilio: no SMS is sent.
#[tokio::test]
async fn unsupported_destinations_never_reach_twilio() {
    let api = harness::worker().api();
    let user = unverified_api().register_user("tollfraud").await.unwrap();
    let inbox = harness::worker().twilio.sms_inbox();
    for number in [
        "+19005550123",  // US premium rate
        "+19765550123",  // US pay-per-call
        "+449098790123", // UK premium rate
        "+448712345678", // UK revenue share
        "+8816123456",   // satellite
        "+882161234567", // international network
        "+4930123456",   // Germany: not in ALLOWED_COUNTRIES
        "+18765550123",  // Jamaica shares +1 but is not the US
    ] {
        let r = api
            .post(
                "/api/me/phone",
                Some(&user.token),
                &json!({ "phone_number": number }),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{number}: {}", r.body);
        assert_eq!(r.code(), Some("unsupported_destination"), "{number}");
        // (Other tests of this binary send SMS concurrently: look at this number only.)
        assert_eq!(inbox.latest(number), None, "{number}: an SMS was sent");
    }
    let r = api
        .post(
            "/api/me/phone",
            Some(&user.token),
            &json!({ "phone_number": "not a number" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
}

/// A wrong code, a malformed one, or a code for a number never sent one: 400
/// `invalid_code`, and the account is unchanged (not verified, no credits).
#[tokio::test]
async fn a_wrong_code_changes_nothing() {
    let api = harness::worker().api();
    let user = unverified_api().register_user("wrongcode").await.unwrap();
    let number = fresh_number();
    let r = api
        .post(
            "/api/me/phone",
            Some(&user.token),
            &json!({ "phone_number": number }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(
        r.body["verification"],
        json!({ "phone_number": number, "status": "pending", "channel": "sms" })
    );
    let code = harness::worker().twilio.sms_codes(&number).pop().unwrap();
    let wrong = if code == "000000" { "111111" } else { "000000" };
    for (n, c) in [
        (number.clone(), wrong.to_owned()),
        (number.clone(), "12ab".to_owned()),
        (fresh_number(), code.clone()),
    ] {
        let r = api
            .post(
                "/api/me/phone/verify",
                Some(&user.token),
                &json!({ "phone_number": n, "code": c }),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.code(), Some("invalid_code"), "{}", r.body);
    }
    let u = me(&api, &user).await;
    assert_eq!(u["phone_verified"], false, "{u}");
    assert_eq!(u["credits"], 0, "{u}");
    // The right code still works after the wrong one.
    let r = api
        .post(
            "/api/me/phone/verify",
            Some(&user.token),
            &json!({ "phone_number": number, "code": code }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Registration gives no credits; the first account to verify a number gets the free
/// credits, a second account verifying the same number gets none (farming accounts on
/// one phone yields nothing), and neither verifying it again nor verifying another new
/// number pays the first account twice (farming phones on one account yields nothing).
#[tokio::test]
async fn free_credits_come_once_per_phone_number() {
    let api = harness::worker().api();
    let first = unverified_api().register_user("farm-a").await.unwrap();
    let second = unverified_api().register_user("farm-b").await.unwrap();
    assert_eq!(api.credits(&first).await.unwrap(), 0);
    let number = fresh_number();
    assert_eq!(api.verify_phone(&first, &number).await.unwrap().status, 200);
    assert_eq!(api.credits(&first).await.unwrap(), 200);
    assert_eq!(api.verify_phone(&first, &number).await.unwrap().status, 200);
    assert_eq!(
        api.credits(&first).await.unwrap(),
        200,
        "re-verifying pays again"
    );
    let r = api.verify_phone(&second, &number).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["user"]["phone_verified"], true);
    assert_eq!(
        api.credits(&second).await.unwrap(),
        0,
        "the number paid twice"
    );
}

/// Each verification SMS costs money: an account may start five an hour.
#[tokio::test]
async fn verification_starts_are_rate_limited_per_account() {
    let api = harness::worker().api();
    let user = unverified_api().register_user("sms-flood").await.unwrap();
    let inbox = harness::worker().twilio.sms_inbox();
    for i in 0..6 {
        let number = fresh_number();
        let r = api
            .post(
                "/api/me/phone",
                Some(&user.token),
                &json!({ "phone_number": number }),
            )
            .await
            .unwrap();
        if i < 5 {
            assert_eq!(r.status, 202, "start {i}: {}", r.body);
        } else {
            assert_eq!(r.status, 429, "start {i}: {}", r.body);
            assert_eq!(r.code(), Some("rate_limited"));
            assert!(r.body["error"]["details"]["retry_after"].as_i64() > Some(0));
            assert_eq!(inbox.latest(&number), None, "the refused start sent an SMS");
        }
    }
}

/// Registering an address listed in `ADMIN_EMAILS` makes nobody an admin, and a token
/// whose `role` claim says admin is not believed: the account's stored role decides, on
/// every request. Only the operator command grants and revokes it, and a revocation
/// applies at once to tokens already issued.
#[tokio::test]
async fn admin_rights_come_only_from_the_operator() {
    let w = harness::worker();
    let api = w.api();
    // The harness's admin registered the ADMIN_EMAILS address and came out a user
    // (asserted there) before the operator granted the role.
    let _ = harness::admin(&api).await;
    let user = api.register_user("would-be-admin").await.unwrap();
    let forged = cmb_core::jwt::encode(
        harness::jwt_secret().as_bytes(),
        &cmb_core::jwt::Claims {
            sub: user.id.clone(),
            jti: uuid::Uuid::new_v4().to_string(),
            iat: time::OffsetDateTime::now_utc().unix_timestamp(),
            exp: time::OffsetDateTime::now_utc().unix_timestamp() + 600,
            role: cmb_core::jwt::Role::Admin,
        },
    )
    .unwrap();
    for token in [&user.token, &forged] {
        let r = api.get("/admin/users", Some(token)).await.unwrap();
        assert_eq!(r.status, 403, "{}", r.body);
        let r = api
            .put(
                "/api/personas/brad",
                Some(token),
                &json!({ "name": "Pwned" }),
            )
            .await
            .unwrap();
        assert!(r.status == 403 || r.status == 404, "{}", r.body);
    }

    let granted = w
        .stack()
        .set_admin(&user.email, xtask::admin::Change::Grant)
        .unwrap();
    assert_eq!(
        (granted.before.as_str(), granted.after.as_str()),
        ("user", "admin")
    );
    let r = api.get("/admin/users", Some(&user.token)).await.unwrap();
    assert_eq!(r.status, 200, "granted, the same token works: {}", r.body);
    assert_eq!(me(&api, &user).await["role"], "admin");

    let revoked = w
        .stack()
        .set_admin(&user.email, xtask::admin::Change::Revoke)
        .unwrap();
    assert_eq!(revoked.after, "user");
    let r = api.get("/admin/users", Some(&user.token)).await.unwrap();
    assert_eq!(
        r.status, 403,
        "revoked, the old token still worked: {}",
        r.body
    );

    // The grant and the revocation are in the audit log, by the operator.
    let admin = harness::admin(&api).await;
    let r = api
        .get(
            &format!("/admin/audit?target_id={}", user.id),
            Some(&admin.token),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let actions: Vec<&str> = r.body["entries"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["action"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        actions.contains(&"role.grant") && actions.contains(&"role.revoke"),
        "{}",
        r.body
    );
    // An unknown email is the operator's error, named.
    let err = w
        .stack()
        .set_admin("nobody-here@example.com", xtask::admin::Change::Grant)
        .unwrap_err();
    assert!(err.to_string().contains("no account"), "{err:#}");
}

/// A scheduled call counts toward the daily limit of the day it will dial: scheduling
/// used to bypass it (free tier: 3 a day).
#[tokio::test]
async fn scheduled_calls_count_toward_their_days_limit() {
    let api = harness::worker().api();
    let user = api.register_user("sched-flood").await.unwrap();
    let day = |n: i64| schedule_in(&api, &user.token, time::Duration::days(n));
    for _ in 0..3 {
        let r = day(2).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let r = day(2).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.code(), Some("daily_call_limit"), "{}", r.body);
    assert_eq!(r.body["error"]["details"]["limit"], 3);
    // Another day has its own three.
    let r = day(3).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let history = api
        .get("/api/calls/history", Some(&user.token))
        .await
        .unwrap();
    assert_eq!(
        history.body["total"], 4,
        "the refused call was written: {}",
        history.body
    );
}

/// Pending scheduled calls are capped per tier (free: 5), exactly, when eight are asked
/// for at once (each on its own day, so the daily limit is not what stops them).
#[tokio::test]
async fn pending_schedules_are_capped_under_concurrency() {
    let api = harness::worker().api();
    let user = api.register_user("sched-burst").await.unwrap();
    let tasks: Vec<_> = (1..=8)
        .map(|day| {
            let api = api.clone();
            let token = user.token.clone();
            tokio::spawn(async move { schedule_in(&api, &token, time::Duration::days(day)).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == 429 {
            assert_eq!(r.code(), Some("too_many_scheduled_calls"), "{}", r.body);
            assert_eq!(r.body["error"]["details"]["limit"], 5);
        }
        statuses.push(r.status);
    }
    statuses.sort();
    assert_eq!(statuses, [201, 201, 201, 201, 201, 429, 429, 429]);
}

/// A call scheduled for the number the account had verified then does not ring it once
/// the account has verified another phone: the old number may be somebody else's now.
/// The call fails, free, and nothing reaches Twilio.
#[tokio::test]
async fn a_scheduled_call_does_not_ring_a_number_the_account_gave_up() {
    let api = harness::worker().api();
    let user = unverified_api().register_user("moved").await.unwrap();
    let old = fresh_number();
    assert_eq!(api.verify_phone(&user, &old).await.unwrap().status, 200);
    let r = schedule_in(&api, &user.token, time::Duration::seconds(3)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["call"]["id"].as_str().unwrap().to_string();
    let new = fresh_number();
    assert_eq!(api.verify_phone(&user, &new).await.unwrap().status, 200);

    let done = api
        .wait_settled(&user, &id, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done["call"]["status"], "failed", "{done}");
    assert!(
        harness::worker().twilio.calls().iter().all(|c| c.to != old),
        "the old number was rung"
    );
    assert_eq!(
        api.credits(&user).await.unwrap(),
        200,
        "a failed call is free"
    );
}
