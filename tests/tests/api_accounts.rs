//! Accounts over HTTP against the real Worker under `wrangler dev` (local D1 and KV):
//! register, login, logout and token checks, and the API's error format for bad input.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use cmb_tests::api::ApiClient;
use cmb_tests::harness;
use serde_json::json;

fn client() -> ApiClient {
    harness::worker().api()
}

/// The whole session lifecycle: register → login → me → logout → me is 401.
#[tokio::test]
async fn register_login_me_logout_revokes_the_token() {
    let api = client();
    let user = api.register_user("lifecycle").await.unwrap();

    let login = api
        .post(
            "/api/auth/login",
            None,
            &json!({ "email": user.email, "password": user.password }),
        )
        .await
        .unwrap();
    assert_eq!(login.status, 200, "{}", login.body);
    let token = login.body["token"].as_str().unwrap().to_string();
    assert_eq!(login.body["user"]["id"], user.id.as_str());

    let me = api.get("/api/me", Some(&token)).await.unwrap();
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.body["user"]["email"], user.email.as_str());
    assert_eq!(
        me.body["user"]["credits"], 200,
        "FREE_CREDITS default grant"
    );
    assert!(me.body["user"].get("password_hash").is_none());

    let out = api
        .post("/api/auth/logout", Some(&token), &json!({}))
        .await
        .unwrap();
    assert_eq!(out.status, 204);
    let after = api.get("/api/me", Some(&token)).await.unwrap();
    assert_eq!(after.status, 401);
    assert_eq!(after.code(), Some("unauthorized"));

    // The registration token is a different jti and still works.
    let other = api.get("/api/me", Some(&user.token)).await.unwrap();
    assert_eq!(other.status, 200);
}

/// A second account with the same email (any case) is 409 `email_taken`.
#[tokio::test]
async fn duplicate_email_is_409() {
    let api = client();
    let user = api.register_user("dup").await.unwrap();
    let again = api
        .post(
            "/api/auth/register",
            None,
            &json!({ "email": user.email.to_uppercase(), "password": "another long password", "name": "Dup" }),
        )
        .await
        .unwrap();
    assert_eq!(again.status, 409, "{}", again.body);
    assert_eq!(again.code(), Some("email_taken"));
}

/// Unknown email and wrong password get the identical answer.
#[tokio::test]
async fn login_answers_the_same_for_unknown_email_and_wrong_password() {
    let api = client();
    let user = api.register_user("same").await.unwrap();
    let wrong = api
        .post(
            "/api/auth/login",
            None,
            &json!({ "email": user.email, "password": "not the password" }),
        )
        .await
        .unwrap();
    let unknown = api
        .post(
            "/api/auth/login",
            None,
            &json!({ "email": "nobody-here@example.com", "password": "not the password" }),
        )
        .await
        .unwrap();
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.status, unknown.status);
    // The same answer but for the request id, which is each request's own.
    let same = |mut body: serde_json::Value| {
        body["error"]["request_id"].take();
        body
    };
    assert_eq!(same(wrong.body.clone()), same(unknown.body.clone()));
    assert_eq!(wrong.code(), Some("invalid_credentials"));
}

/// Short passwords are refused with `weak_password` and create nothing.
#[tokio::test]
async fn weak_password_is_400_and_creates_nothing() {
    let api = client();
    let email = format!("weak-{}@example.com", uuid::Uuid::new_v4().simple());
    let reply = api
        .post(
            "/api/auth/register",
            None,
            &json!({ "email": email, "password": "short", "name": "Weak" }),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 400);
    assert_eq!(reply.code(), Some("weak_password"));
    let login = api
        .post(
            "/api/auth/login",
            None,
            &json!({ "email": email, "password": "short" }),
        )
        .await
        .unwrap();
    assert_eq!(login.status, 401, "no account was created");
}

/// Malformed JSON, wrong types, missing fields and oversized bodies are 400 with a code.
#[tokio::test]
async fn bad_bodies_are_400_with_a_code() {
    let api = client();
    let post_raw = |body: Vec<u8>| {
        let api = api.clone();
        async move {
            api.raw(
                reqwest::Method::POST,
                "/api/auth/register",
                None,
                Some(("application/json", body)),
            )
            .await
            .unwrap()
        }
    };
    let malformed = post_raw(b"{\"email\": ".to_vec()).await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.code(), Some("malformed_json"));

    let wrong_type = api
        .post(
            "/api/auth/register",
            None,
            &json!({ "email": 42, "password": "long enough pass", "name": "x" }),
        )
        .await
        .unwrap();
    assert_eq!(wrong_type.status, 400);
    assert_eq!(wrong_type.code(), Some("invalid_body"));

    let missing = api
        .post(
            "/api/auth/register",
            None,
            &json!({ "email": "a@example.com" }),
        )
        .await
        .unwrap();
    assert_eq!(missing.status, 400);
    assert_eq!(missing.code(), Some("invalid_body"));

    let mut big =
        b"{\"email\":\"big@example.com\",\"password\":\"long enough pass\",\"name\":\"".to_vec();
    big.extend(std::iter::repeat_n(b'a', 65 * 1024));
    big.extend(b"\"}");
    let oversized = post_raw(big).await;
    assert_eq!(oversized.status, 400);
    assert_eq!(oversized.code(), Some("body_too_large"));

    let bad_email = api
        .post(
            "/api/auth/register",
            None,
            &json!({ "email": "not-an-email", "password": "long enough pass", "name": "x" }),
        )
        .await
        .unwrap();
    assert_eq!(bad_email.status, 400);
    assert_eq!(bad_email.code(), Some("invalid_email"));
}

/// A token with a tampered signature, a forged payload, or past its expiry is 401.
#[tokio::test]
async fn tampered_and_expired_tokens_are_401() {
    let api = client();
    let user = api.register_user("tamper").await.unwrap();

    let mut tampered = user.token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let r = api.get("/api/me", Some(&tampered)).await.unwrap();
    assert_eq!(r.status, 401);

    let secret = harness::jwt_secret();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let expired = cmb_core::jwt::encode(
        secret.as_bytes(),
        &cmb_core::jwt::Claims {
            sub: user.id.clone(),
            jti: uuid::Uuid::new_v4().to_string(),
            iat: now - 7200,
            exp: now - 3600,
            role: cmb_core::jwt::Role::User,
        },
    )
    .unwrap();
    let r = api.get("/api/me", Some(&expired)).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.body);

    // Same claims signed with another key: a forgery.
    let forged = cmb_core::jwt::encode(
        b"a-completely-different-secret-of-enough-length",
        &cmb_core::jwt::Claims {
            sub: user.id.clone(),
            jti: uuid::Uuid::new_v4().to_string(),
            iat: now,
            exp: now + 3600,
            role: cmb_core::jwt::Role::Admin,
        },
    )
    .unwrap();
    let r = api.get("/api/me", Some(&forged)).await.unwrap();
    assert_eq!(r.status, 401);

    let none = api.get("/api/me", None).await.unwrap();
    assert_eq!(none.status, 401);
}

/// `/health` is 200 with its checks when configured.
#[tokio::test]
async fn health_reports_its_checks() {
    let r = client().get("/health", None).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "ok");
    for check in ["config", "db", "kv"] {
        assert_eq!(r.body["checks"][check]["ok"], true, "{check}: {}", r.body);
    }
}

/// Unknown routes are JSON 404s, not HTML or plain text.
#[tokio::test]
async fn unknown_route_is_a_json_404() {
    let r = client().get("/api/nothing-here", None).await.unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), Some("not_found"));
}

/// `PATCH /api/me`.
async fn patch_me(api: &ApiClient, token: &str, body: serde_json::Value) -> cmb_tests::api::Reply {
    api.raw(
        reqwest::Method::PATCH,
        "/api/me",
        Some(token),
        Some(("application/json", body.to_string().into_bytes())),
    )
    .await
    .unwrap()
}

/// The caller sets their name and IANA time zone; bad values are 400 naming each field
/// and change nothing.
#[tokio::test]
async fn the_caller_sets_their_name_and_time_zone() {
    let api = client();
    let user = api.register_user("zone").await.unwrap();
    let me = api.get("/api/me", Some(&user.token)).await.unwrap();
    assert_eq!(me.body["user"]["timezone"], serde_json::Value::Null);

    let r = patch_me(&api, &user.token, json!({ "timezone": "Europe/London" })).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["user"]["timezone"], "Europe/London");
    assert_eq!(
        r.body["user"]["name"], "zone",
        "a field not given is unchanged"
    );

    let r = patch_me(&api, &user.token, json!({ "name": "  Sam  " })).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["user"]["name"], "Sam");
    assert_eq!(r.body["user"]["timezone"], "Europe/London");

    let r = patch_me(
        &api,
        &user.token,
        json!({ "name": "New Name", "timezone": "Mars/Olympus_Mons" }),
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (400, Some("invalid_timezone")),
        "{}",
        r.body
    );
    let r = patch_me(
        &api,
        &user.token,
        json!({ "name": "", "timezone": "EST+5" }),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let fields: Vec<&str> = r.body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["name", "timezone"]);
    let r = patch_me(&api, &user.token, json!({ "tier": "premium" })).await;
    assert_eq!(r.status, 400, "unknown fields are refused: {}", r.body);

    let me = api.get("/api/me", Some(&user.token)).await.unwrap();
    assert_eq!(me.body["user"]["name"], "Sam", "nothing half-applied");
    assert_eq!(me.body["user"]["timezone"], "Europe/London");
    assert_eq!(me.body["user"]["tier"], "free");

    let anonymous = api
        .raw(
            reqwest::Method::PATCH,
            "/api/me",
            None,
            Some(("application/json", b"{}".to_vec())),
        )
        .await
        .unwrap();
    assert_eq!(anonymous.status, 401);
}
