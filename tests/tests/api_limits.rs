//! Auth rate limits beyond `api_operators.rs`'s sequential check, against the real
//! Worker under `wrangler dev`: exact counts under concurrency, per client IP as well as
//! per account, successes not counted as failures, and the `Retry-After` header.
//!
//! Each test speaks from its own documentation-range address in `CF-Connecting-IP`
//! (`wrangler dev`, like Cloudflare's edge, keeps a client's value only locally; in
//! production the edge sets it), so the tests' per-IP windows never overlap.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use cmb_tests::harness;
use serde_json::{json, Value};

/// The limits the Worker enforces (`cmb_core::limits`): failures per account and IP,
/// per IP, and per account before the account is slowed down (also 10).
const FAILED_LOGINS_PER_EMAIL: usize = 10;
const SLOWED_WINDOW_SECS: i64 = 30;
const FAILED_LOGINS_PER_IP: usize = 50;
const REGISTRATIONS_PER_IP: usize = 50;
const PASSWORD: &str = "correct horse battery";

/// One answer: status, JSON body, and the `Retry-After` header if any.
struct Answer {
    status: u16,
    body: Value,
    retry_after: Option<i64>,
}

async fn post_from(ip: &str, path: &str, body: Value) -> Answer {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", harness::worker().url()))
        .header("CF-Connecting-IP", ip)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let body = resp.json().await.unwrap();
    Answer {
        status,
        body,
        retry_after,
    }
}

fn unique_email(label: &str) -> String {
    format!("{label}-{}@example.com", uuid::Uuid::new_v4().simple())
}

async fn register_from(ip: &str, email: &str) -> Answer {
    post_from(
        ip,
        "/api/auth/register",
        json!({ "email": email, "password": PASSWORD, "name": "Limit" }),
    )
    .await
}

async fn login_from(ip: &str, email: &str, password: &str) -> Answer {
    post_from(
        ip,
        "/api/auth/login",
        json!({ "email": email, "password": password }),
    )
    .await
}

/// Waits, if need be, until the current fixed window of `window_secs` has at least
/// 30 s left, so a test's counts are not split by a window boundary mid-test.
async fn away_from_window_edge(window_secs: i64) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let left = window_secs - now.rem_euclid(window_secs);
    if left < 30 {
        tokio::time::sleep(std::time::Duration::from_secs(left as u64 + 1)).await;
    }
}

/// Runs `n` copies of `f` at once and returns their answers.
async fn concurrently<F, Fut>(n: usize, f: F) -> Vec<Answer>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Answer> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(f(i))).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Counts answers by status, asserting every 429 is a well-formed `rate_limited` error
/// whose header and `details.retry_after` agree and lie within the window.
fn tally(answers: &[Answer], window_secs: i64) -> (usize, usize) {
    let mut limited = 0;
    for a in answers.iter().filter(|a| a.status == 429) {
        limited += 1;
        assert_eq!(a.body["error"]["code"], "rate_limited", "{}", a.body);
        let in_body = a.body["error"]["details"]["retry_after"].as_i64().unwrap();
        assert_eq!(a.retry_after, Some(in_body), "header matches the body");
        assert!((1..=window_secs).contains(&in_body), "{in_body}");
    }
    (answers.len() - limited, limited)
}

/// 20 concurrent wrong passwords for one account: exactly 10 are checked (401) and 10
/// refused (429 with `Retry-After`), because each attempt takes its slot atomically.
#[tokio::test]
async fn concurrent_failed_logins_stop_at_exactly_ten() {
    away_from_window_edge(15 * 60).await;
    let ip = "198.51.100.11";
    let email = unique_email("burst");
    assert_eq!(register_from(ip, &email).await.status, 201);
    let answers = concurrently(20, |_| {
        let email = email.clone();
        async move { login_from(ip, &email, "not the password").await }
    })
    .await;
    let (other, limited) = tally(&answers, 15 * 60);
    assert_eq!(limited, 20 - FAILED_LOGINS_PER_EMAIL);
    assert!(answers
        .iter()
        .filter(|a| a.status != 429)
        .all(|a| a.status == 401 && a.body["error"]["code"] == "invalid_credentials"));
    assert_eq!(other, FAILED_LOGINS_PER_EMAIL);
}

/// Successful logins give their slot back: after 12 good logins an account still has
/// all 10 failures before this address is refused for it.
#[tokio::test]
async fn successful_logins_are_not_failures() {
    away_from_window_edge(15 * 60).await;
    let ip = "198.51.100.12";
    let email = unique_email("regular");
    assert_eq!(register_from(ip, &email).await.status, 201);
    for i in 0..12 {
        let a = login_from(ip, &email, PASSWORD).await;
        assert_eq!(a.status, 200, "good login {i}: {}", a.body);
    }
    for i in 0..FAILED_LOGINS_PER_EMAIL {
        let a = login_from(ip, &email, "not the password").await;
        assert_eq!(a.status, 401, "failure {i}: {}", a.body);
    }
    let a = login_from(ip, &email, PASSWORD).await;
    assert_eq!(a.status, 429, "{}", a.body);
}

/// A stranger guessing the owner's password from several addresses cannot lock the
/// owner out: each of the stranger's addresses is stopped at 10 failures, the account
/// is then slowed down for unfamiliar addresses (one attempt per 30-second window, never
/// a lock), and the owner signs in at once from the address they last used.
#[tokio::test]
async fn a_stranger_cannot_lock_the_owner_out() {
    away_from_window_edge(15 * 60).await;
    let owner_ip = "198.51.100.21";
    let email = unique_email("victim");
    assert_eq!(register_from(owner_ip, &email).await.status, 201);

    let first = "203.0.113.21";
    for i in 0..FAILED_LOGINS_PER_EMAIL {
        let a = login_from(first, &email, "guess").await;
        assert_eq!(a.status, 401, "guess {i}: {}", a.body);
    }
    let a = login_from(first, &email, "guess").await;
    assert_eq!(
        a.status, 429,
        "that address is done for this account: {}",
        a.body
    );
    tally(&[a], 15 * 60);

    // A second address finds the account slowed: at most one attempt per window is
    // checked (two if a window boundary falls between these three), the rest wait.
    let second = "203.0.113.22";
    let answers = [
        login_from(second, &email, "guess").await,
        login_from(second, &email, "guess").await,
        login_from(second, &email, "guess").await,
    ];
    let (checked, slowed) = tally(&answers, SLOWED_WINDOW_SECS);
    assert!(
        checked <= 2 && slowed >= 1,
        "{checked} checked, {slowed} slowed"
    );
    assert!(answers
        .iter()
        .all(|a| a.status == 429 || a.body["error"]["code"] == "invalid_credentials"));

    // The owner, from their own address, is not slowed at all.
    let a = login_from(owner_ip, &email, PASSWORD).await;
    assert_eq!(a.status, 200, "the owner was locked out: {}", a.body);
    // From a new address the owner is at worst asked to wait out the window, and the
    // account is still there (a right password is not refused as a wrong one).
    let a = login_from("198.51.100.22", &email, PASSWORD).await;
    match a.status {
        200 => {}
        429 => {
            tally(&[a], SLOWED_WINDOW_SECS);
        }
        other => panic!("owner from a new address: {other} {}", a.body),
    }
}

/// Unknown emails and wrong passwords get the same answer (only the request id differs).
#[tokio::test]
async fn unknown_emails_and_wrong_passwords_look_alike() {
    let ip = "198.51.100.23";
    let email = unique_email("exists");
    assert_eq!(register_from(ip, &email).await.status, 201);
    let strip = |mut a: Answer| {
        a.body["error"]["request_id"] = Value::Null;
        (a.status, a.body, a.retry_after)
    };
    let wrong = strip(login_from(ip, &email, "not the password").await);
    let unknown = strip(login_from(ip, &unique_email("absent"), "not the password").await);
    assert_eq!(wrong.0, 401);
    assert_eq!(wrong, unknown);
}

/// Guessing across many accounts from one address stops at exactly 50 failures; another
/// address is unaffected.
#[tokio::test]
async fn failed_logins_per_ip_stop_at_exactly_fifty() {
    away_from_window_edge(15 * 60).await;
    let ip = "198.51.100.13";
    let answers = concurrently(FAILED_LOGINS_PER_IP + 5, |_| async move {
        login_from(ip, &unique_email("nobody"), "not the password").await
    })
    .await;
    let (checked, limited) = tally(&answers, 15 * 60);
    assert_eq!((checked, limited), (FAILED_LOGINS_PER_IP, 5));

    let elsewhere = "198.51.100.14";
    let email = unique_email("elsewhere");
    assert_eq!(register_from(elsewhere, &email).await.status, 201);
    assert_eq!(login_from(elsewhere, &email, PASSWORD).await.status, 200);
}

/// 55 concurrent sign-ups from one address: exactly 50 accounts are created, the other
/// 5 are 429 and create nothing; another address can still sign up.
#[tokio::test]
async fn registrations_per_ip_stop_at_exactly_fifty() {
    away_from_window_edge(3600).await;
    let ip = "198.51.100.15";
    let emails: Vec<String> = (0..REGISTRATIONS_PER_IP + 5)
        .map(|_| unique_email("signup"))
        .collect();
    let answers = concurrently(emails.len(), |i| {
        let email = emails[i].clone();
        async move { register_from(ip, &email).await }
    })
    .await;
    let (created, limited) = tally(&answers, 3600);
    assert_eq!((created, limited), (REGISTRATIONS_PER_IP, 5));
    assert!(answers
        .iter()
        .filter(|a| a.status != 429)
        .all(|a| a.status == 201));

    // The refused sign-ups left no account behind (checked from a fresh address).
    let checker = "198.51.100.16";
    for (email, a) in emails.iter().zip(&answers) {
        let login = login_from(checker, email, PASSWORD).await;
        let expected = if a.status == 201 { 200 } else { 401 };
        assert_eq!(login.status, expected, "{email}: {}", login.body);
    }
    let email = unique_email("neighbour");
    assert_eq!(register_from("198.51.100.17", &email).await.status, 201);
}
