//! `Idempotency-Key` on the POSTs that create something billable (`/api/calls/trigger`,
//! `/api/calls/schedule`, `/api/schedules`), against the real Worker under
//! `wrangler dev` and the fake Twilio: a repeat gets the first answer and creates
//! nothing (one call, one reservation, one dial), another body under the key is refused,
//! keys are per user, a refused request gives its key back, and concurrent repeats run
//! once. The key's 24-hour expiry is driven with explicit time in
//! `cmb_core::idempotency`'s unit tests (the stack has no clock hook).

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmb_tests::api::{ApiClient, TestUser};
use cmb_tests::fakes::twilio::CalleeScript;
use cmb_tests::harness;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

fn client() -> ApiClient {
    harness::worker().api()
}

fn unique_number() -> String {
    let n = uuid::Uuid::new_v4().as_u128() % 10_000_000;
    format!("+1628{n:07}")
}

fn new_key() -> String {
    format!("idem-{}", uuid::Uuid::new_v4())
}

/// A user whose verified number is `number`.
async fn user_with(api: &ApiClient, label: &str, number: &str) -> TestUser {
    let user = api.register_user(label).await.unwrap();
    api.ensure_verified(&user, number).await.unwrap();
    user
}

/// An answer as a client sees it: status, body and whether it was marked a replay.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
    replayed: bool,
}

impl Answer {
    fn code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }
}

/// POSTs `body` (raw JSON text, so tests can vary whitespace and key order) to `path`
/// with an optional `Idempotency-Key`.
async fn post(user: &TestUser, path: &str, key: Option<&[u8]>, body: &str) -> Answer {
    let mut req = reqwest::Client::new()
        .post(format!("{}{path}", harness::worker().url()))
        .bearer_auth(&user.token)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(k) = key {
        req = req.header(
            "idempotency-key",
            reqwest::header::HeaderValue::from_bytes(k).unwrap(),
        );
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let replayed = match resp.headers().get("idempotent-replayed") {
        None => false,
        Some(v) => {
            assert_eq!(v, "true", "the replay header says true or is absent");
            true
        }
    };
    let body = resp.json().await.unwrap();
    Answer {
        status,
        body,
        replayed,
    }
}

async fn calls(api: &ApiClient, user: &TestUser) -> Vec<Value> {
    let r = api
        .get("/api/calls/history?limit=100", Some(&user.token))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["calls"].as_array().unwrap().clone()
}

async fn schedules(api: &ApiClient, user: &TestUser) -> Vec<Value> {
    let r = api.get("/api/schedules", Some(&user.token)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["schedules"].as_array().unwrap().clone()
}

/// The user's ledger entries of `kind` (the export holds every one).
async fn ledger(api: &ApiClient, user: &TestUser, kind: &str) -> Vec<Value> {
    let r = api.get("/api/me/export", Some(&user.token)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["export"]["ledger"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .cloned()
        .collect()
}

/// How many times the fake Twilio was asked to dial `number`, once the Worker has had
/// time to dial again if it were going to.
async fn dials_to(number: &str) -> usize {
    let count = || {
        harness::worker()
            .twilio
            .calls()
            .iter()
            .filter(|c| c.to == number)
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while count() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    count()
}

fn in_an_hour() -> String {
    (OffsetDateTime::now_utc() + time::Duration::hours(1))
        .replace_nanosecond(0)
        .unwrap()
        .format(&Rfc3339)
        .unwrap()
}

/// A retried trigger (the first answer lost on a flaky network) places one call: the
/// repeat, whitespace and key order changed, gets the first answer again, marked as a
/// replay, and neither reserves credits nor dials again.
#[tokio::test]
async fn a_repeated_trigger_places_one_call_and_reserves_once() {
    let api = client();
    let number = unique_number();
    harness::worker()
        .twilio
        .set_script(number.clone(), CalleeScript::NoAnswer);
    let user = user_with(&api, "idem-trigger", &number).await;
    let key = new_key();

    let first = post(
        &user,
        "/api/calls/trigger",
        Some(key.as_bytes()),
        r#"{"persona_id":"brad"}"#,
    )
    .await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert!(!first.replayed, "a first answer is not a replay");
    let again = post(
        &user,
        "/api/calls/trigger",
        Some(key.as_bytes()),
        "{\n  \"persona_id\" : \"brad\"\n}",
    )
    .await;
    assert_eq!(again.status, 201, "{:?}", again.body);
    assert!(again.replayed, "the repeat is marked as a replay");
    assert_eq!(again.body, first.body, "the repeat gets the first answer");

    let id = first.body["call"]["id"].as_str().unwrap();
    let all = calls(&api, &user).await;
    assert_eq!(all.len(), 1, "one call: {all:?}");
    assert_eq!(all[0]["id"], id);
    let reserves = ledger(&api, &user, "reserve").await;
    assert_eq!(reserves.len(), 1, "credits reserved once: {reserves:?}");
    assert_eq!(dials_to(&number).await, 1, "Twilio was asked to dial once");

    // Without a key nothing changes: a second trigger is a second request (refused
    // here because the first call is still ringing).
    let unkeyed = post(&user, "/api/calls/trigger", None, r#"{"persona_id":"brad"}"#).await;
    assert!(!unkeyed.replayed);
    assert_eq!(
        (unkeyed.status, unkeyed.code()),
        (409, Some("call_in_progress")),
        "{:?}",
        unkeyed.body
    );
}

/// A retried `POST /api/calls/schedule` books one call; the same key with another body
/// is 409 `idempotency_key_reused` and changes nothing; another user's identical key is
/// their own.
#[tokio::test]
async fn a_repeated_schedule_books_one_call_and_another_body_is_refused() {
    let api = client();
    let user = user_with(&api, "idem-schedule", &unique_number()).await;
    let key = new_key();
    let when = in_an_hour();
    let body = json!({ "persona_id": "brad", "scheduled_time": when }).to_string();

    let first = post(&user, "/api/calls/schedule", Some(key.as_bytes()), &body).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert!(!first.replayed);
    let reordered = format!(r#"{{ "scheduled_time": "{when}", "persona_id": "brad" }}"#);
    let again = post(&user, "/api/calls/schedule", Some(key.as_bytes()), &reordered).await;
    assert_eq!((again.status, again.replayed), (201, true), "{:?}", again.body);
    assert_eq!(again.body, first.body);

    let other = json!({ "persona_id": "sarah", "scheduled_time": when }).to_string();
    let reused = post(&user, "/api/calls/schedule", Some(key.as_bytes()), &other).await;
    assert_eq!(
        (reused.status, reused.code()),
        (409, Some("idempotency_key_reused")),
        "{:?}",
        reused.body
    );
    assert!(!reused.replayed);
    // The key belongs to its route too: the same key and body elsewhere is another request.
    let elsewhere = post(&user, "/api/calls/trigger", Some(key.as_bytes()), &body).await;
    assert_eq!(
        (elsewhere.status, elsewhere.code()),
        (409, Some("idempotency_key_reused")),
        "{:?}",
        elsewhere.body
    );
    let all = calls(&api, &user).await;
    assert_eq!(all.len(), 1, "still the one booked call: {all:?}");
    assert_eq!(all[0]["id"], first.body["call"]["id"]);
    assert_eq!(all[0]["persona_id"], "brad");
    assert_eq!(all[0]["status"], "scheduled");

    // Another user's identical key and body is theirs: a booking of their own.
    let stranger = user_with(&api, "idem-stranger", &unique_number()).await;
    let theirs = post(&stranger, "/api/calls/schedule", Some(key.as_bytes()), &body).await;
    assert_eq!((theirs.status, theirs.replayed), (201, false), "{:?}", theirs.body);
    assert_ne!(theirs.body["call"]["id"], first.body["call"]["id"]);
    assert_eq!(calls(&api, &stranger).await.len(), 1);
    assert_eq!(calls(&api, &user).await.len(), 1);
}

/// A retried `POST /api/schedules` makes one schedule with one pending attempt.
#[tokio::test]
async fn a_repeated_schedule_create_makes_one_schedule() {
    let api = client();
    let user = user_with(&api, "idem-recurring", &unique_number()).await;
    let key = new_key();
    let body = r#"{"persona_id":"brad","time_of_day":"07:00","days":["mon","fri"],"timezone":"Europe/London"}"#;
    let first = post(&user, "/api/schedules", Some(key.as_bytes()), body).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    let again = post(&user, "/api/schedules", Some(key.as_bytes()), body).await;
    assert_eq!((again.status, again.replayed), (201, true), "{:?}", again.body);
    assert_eq!(again.body, first.body);

    let changed = body.replace("07:00", "08:00");
    let reused = post(&user, "/api/schedules", Some(key.as_bytes()), &changed).await;
    assert_eq!(
        (reused.status, reused.code()),
        (409, Some("idempotency_key_reused")),
        "{:?}",
        reused.body
    );
    let all = schedules(&api, &user).await;
    assert_eq!(all.len(), 1, "one schedule: {all:?}");
    assert_eq!(all[0]["id"], first.body["schedule"]["id"]);
    assert_eq!(all[0]["time_of_day"], "07:00");
    let pending: Vec<_> = calls(&api, &user)
        .await
        .into_iter()
        .filter(|c| c["status"] == "scheduled")
        .collect();
    assert_eq!(pending.len(), 1, "one pending attempt: {pending:?}");
}

/// A request refused as the client's mistake keeps nothing under its key, so the
/// corrected request with the same key runs; a malformed key is refused before anything.
#[tokio::test]
async fn a_refused_request_gives_its_key_back_and_bad_keys_are_refused() {
    let api = client();
    let user = user_with(&api, "idem-refused", &unique_number()).await;
    let key = new_key();
    let bad = r#"{"persona_id":"brad","scheduled_time":"tomorrow at seven"}"#;
    let refused = post(&user, "/api/calls/schedule", Some(key.as_bytes()), bad).await;
    assert_eq!(
        (refused.status, refused.code()),
        (400, Some("invalid_scheduled_time")),
        "{:?}",
        refused.body
    );
    // Refused again, not replayed: it ran again.
    let refused = post(&user, "/api/calls/schedule", Some(key.as_bytes()), bad).await;
    assert_eq!((refused.status, refused.replayed), (400, false));

    let good = json!({ "persona_id": "brad", "scheduled_time": in_an_hour() }).to_string();
    let booked = post(&user, "/api/calls/schedule", Some(key.as_bytes()), &good).await;
    assert_eq!((booked.status, booked.replayed), (201, false), "{:?}", booked.body);
    let again = post(&user, "/api/calls/schedule", Some(key.as_bytes()), &good).await;
    assert_eq!((again.status, again.replayed), (201, true), "{:?}", again.body);
    assert_eq!(again.body, booked.body);
    assert_eq!(calls(&api, &user).await.len(), 1);

    // 256 characters, an empty key, and one that is not ASCII: 400, nothing booked.
    let other = json!({ "persona_id": "brad", "scheduled_time": in_an_hour() }).to_string();
    for key in [
        "k".repeat(256).into_bytes(),
        b"   ".to_vec(),
        "naïve".as_bytes().to_vec(),
    ] {
        let r = post(&user, "/api/calls/schedule", Some(&key), &other).await;
        assert_eq!(
            (r.status, r.code()),
            (400, Some("invalid_idempotency_key")),
            "{:?}",
            r.body
        );
    }
    // The longest key and printable punctuation are fine.
    let longest = "k".repeat(255);
    let r = post(&user, "/api/schedules", Some(longest.as_bytes()), r#"{"persona_id":"brad","time_of_day":"07:00","timezone":"UTC"}"#).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(
        calls(&api, &user)
            .await
            .iter()
            .filter(|c| c["schedule_id"].is_null())
            .count(),
        1,
        "no booking came of the bad keys"
    );
}

/// Identical requests sent at once under one key run once: one call, one reservation,
/// one dial; every other answer is the replay or 409 `idempotency_key_in_progress`.
#[tokio::test]
async fn concurrent_repeats_under_one_key_run_once() {
    const N: usize = 8;
    let api = client();

    // Trigger: the one-live-call rule alone would also refuse the others, so they must
    // be refused as the key's, never as `call_in_progress`.
    let number = unique_number();
    harness::worker()
        .twilio
        .set_script(number.clone(), CalleeScript::NoAnswer);
    let user = user_with(&api, "idem-race-trigger", &number).await;
    let key = new_key();
    let answers = futures::future::join_all((0..N).map(|_| {
        post(
            &user,
            "/api/calls/trigger",
            Some(key.as_bytes()),
            r#"{"persona_id":"brad"}"#,
        )
    }))
    .await;
    let id = one_ran(&answers);
    let all = calls(&api, &user).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["id"].as_str(), Some(id.as_str()));
    assert_eq!(ledger(&api, &user, "reserve").await.len(), 1);
    assert_eq!(dials_to(&number).await, 1);

    // Schedule: without the key these would book up to the pending cap.
    let user = user_with(&api, "idem-race-schedule", &unique_number()).await;
    let key = new_key();
    let body = json!({ "persona_id": "brad", "scheduled_time": in_an_hour() }).to_string();
    let answers = futures::future::join_all(
        (0..N).map(|_| post(&user, "/api/calls/schedule", Some(key.as_bytes()), &body)),
    )
    .await;
    let id = one_ran(&answers);
    let all = calls(&api, &user).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["id"].as_str(), Some(id.as_str()));
}

/// Exactly one answer ran (201, not a replay); the rest are its replay or in progress.
/// The call's id.
fn one_ran(answers: &[Answer]) -> String {
    let ran: Vec<_> = answers
        .iter()
        .filter(|a| a.status == 201 && !a.replayed)
        .collect();
    assert_eq!(ran.len(), 1, "exactly one ran: {answers:?}");
    let id = ran[0].body["call"]["id"].as_str().unwrap().to_owned();
    for a in answers {
        match (a.status, a.replayed) {
            (201, _) => assert_eq!(a.body, ran[0].body, "{answers:?}"),
            (409, false) => assert_eq!(a.code(), Some("idempotency_key_in_progress"), "{a:?}"),
            _ => panic!("unexpected answer {a:?}"),
        }
    }
    id
}
