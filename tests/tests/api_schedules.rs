//! Recurring schedules over HTTP against the real Worker under `wrangler dev`, with the
//! fake Twilio: the routes and their errors, the pending attempt each schedule keeps
//! booked, and a schedule that dials at its minute and retries a missed call.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use cmb_tests::api::{ApiClient, TestUser};
use cmb_tests::fakes::twilio::{CallRecord, CalleeScript};
use cmb_tests::harness;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

fn client() -> ApiClient {
    harness::worker().api()
}

fn unique_number() -> String {
    let n = uuid::Uuid::new_v4().as_u128() % 10_000_000;
    format!("+1628{n:07}")
}

/// A user whose verified number is `number` (the one schedules call).
async fn user_with(api: &ApiClient, label: &str, number: &str) -> TestUser {
    let user = api.register_user(label).await.unwrap();
    api.ensure_verified(&user, number).await.unwrap();
    user
}

fn at(v: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(
        v.as_str().unwrap_or_else(|| panic!("a time: {v}")),
        &Rfc3339,
    )
    .unwrap()
}

async fn calls(api: &ApiClient, user: &TestUser) -> Vec<Value> {
    let r = api
        .get("/api/calls/history?limit=100", Some(&user.token))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["calls"].as_array().unwrap().clone()
}

/// `POST /api/schedules` that must succeed (201).
async fn create(api: &ApiClient, user: &TestUser, body: &Value) -> cmb_tests::api::Reply {
    let r = api
        .post("/api/schedules", Some(&user.token), body)
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{body}: {}", r.body);
    r
}

/// How many of the user's calls are waiting to dial.
async fn pending_calls(api: &ApiClient, user: &TestUser) -> usize {
    calls(api, user)
        .await
        .iter()
        .filter(|c| c["status"] == "scheduled")
        .count()
}

async fn call(api: &ApiClient, user: &TestUser, id: &str) -> Value {
    let r = api
        .get(&format!("/api/calls/{id}"), Some(&user.token))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["call"].clone()
}

async fn schedules(api: &ApiClient, user: &TestUser) -> Vec<Value> {
    let r = api.get("/api/schedules", Some(&user.token)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["schedules"].as_array().unwrap().clone()
}

fn dials_to(number: &str) -> Vec<CallRecord> {
    harness::worker()
        .twilio
        .calls()
        .into_iter()
        .filter(|c| c.to == number)
        .collect()
}

async fn wait_dials(number: &str, n: usize, timeout: Duration) -> Vec<CallRecord> {
    let deadline = Instant::now() + timeout;
    loop {
        let dials = dials_to(number);
        if dials.len() >= n || Instant::now() > deadline {
            return dials;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `check` holds for the user's schedule list (what follows an attempt is
/// booked by the attempt's session, after the call settles).
async fn wait_schedules(
    api: &ApiClient,
    user: &TestUser,
    timeout: Duration,
    check: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let list = schedules(api, user).await;
        if check(&list) || Instant::now() > deadline {
            return list;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Create, list, pause, resume with a new time, and delete: each leaves exactly one
/// pending attempt (an ordinary scheduled call, `requested_by: schedule`) or none.
#[tokio::test]
async fn a_schedule_is_created_paused_changed_and_deleted_with_its_pending_call() {
    let api = client();
    let number = unique_number();
    let user = user_with(&api, "sched-crud", &number).await;
    let before = OffsetDateTime::now_utc();

    let r = create(
        &api,
        &user,
        &json!({
            "persona_id": "brad",
            "time_of_day": "07:00",
            "days": ["fri", "mon", "tue", "wed", "thu"],
            "timezone": "europe/london",
        }),
    )
    .await;
    let s = r.body["schedule"].clone();
    let id = s["id"].as_str().unwrap().to_owned();
    assert_eq!(s["persona_id"], "brad");
    assert_eq!(s["time_of_day"], "07:00");
    assert_eq!(s["days"], json!(["mon", "tue", "wed", "thu", "fri"]));
    assert_eq!(
        s["timezone"], "Europe/London",
        "stored as the database spells it"
    );
    assert_eq!(
        (s["retries"].clone(), s["retry_after_minutes"].clone()),
        (json!(1), json!(10))
    );
    assert_eq!(s["active"], true);
    // The next occurrence: a weekday, 07:00 in London (GMT in December, BST in summer),
    // within the next four days.
    let next = at(&s["next_call_at"]);
    assert!(
        next > before && next < before + time::Duration::days(4),
        "{next}"
    );
    let london_offset = if (4..=9).contains(&(next.month() as u8)) {
        1
    } else {
        0
    };
    let local = next.to_offset(UtcOffset::from_hms(london_offset, 0, 0).unwrap());
    assert_eq!(
        (local.hour(), local.minute(), local.second()),
        (7, 0, 0),
        "{next}"
    );
    assert!(
        local.weekday().number_days_from_monday() < 5,
        "a weekday: {local}"
    );

    // Its pending attempt is an ordinary scheduled call.
    let pending = s["pending_call_id"].as_str().unwrap().to_owned();
    let c = call(&api, &user, &pending).await;
    assert_eq!(c["status"], "scheduled");
    assert_eq!(c["requested_by"], "schedule");
    assert_eq!(c["schedule_id"], id.as_str());
    assert_eq!(c["attempt"], 0);
    assert_eq!(c["phone_number"], number.as_str());
    assert_eq!(at(&c["scheduled_time"]), next);

    let list = schedules(&api, &user).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], id.as_str());

    // Pause: the pending call is canceled, nothing is next.
    let r = api
        .patch(
            &format!("/api/schedules/{id}"),
            Some(&user.token),
            &json!({ "active": false }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["schedule"]["active"], false);
    assert_eq!(r.body["schedule"]["next_call_at"], Value::Null);
    assert_eq!(r.body["schedule"]["pending_call_id"], Value::Null);
    assert_eq!(call(&api, &user, &pending).await["status"], "canceled");

    // Resume at another time, every day, in New York.
    let r = api
        .patch(
            &format!("/api/schedules/{id}"),
            Some(&user.token),
            &json!({ "active": true, "time_of_day": "8:15", "days": ["sat", "sun"], "timezone": "America/New_York", "retries": 0 }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let s = r.body["schedule"].clone();
    assert_eq!(s["time_of_day"], "08:15");
    assert_eq!(s["days"], json!(["sat", "sun"]));
    assert_eq!(s["retries"], 0);
    assert_eq!(s["retry_after_minutes"], 10, "unchanged");
    let next = at(&s["next_call_at"]);
    let ny_offset = if (4..=10).contains(&(next.month() as u8)) {
        -4
    } else {
        -5
    };
    let local = next.to_offset(UtcOffset::from_hms(ny_offset, 0, 0).unwrap());
    assert_eq!((local.hour(), local.minute()), (8, 15), "{next}");
    assert!(
        local.weekday().number_days_from_monday() >= 5,
        "a weekend day: {local}"
    );
    let resumed = s["pending_call_id"].as_str().unwrap().to_owned();
    assert_ne!(resumed, pending);
    assert_eq!(call(&api, &user, &resumed).await["status"], "scheduled");

    // A change of persona only: the pending call is rebooked with it.
    let r = api
        .patch(
            &format!("/api/schedules/{id}"),
            Some(&user.token),
            &json!({ "persona_id": "sarah" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let rebooked = r.body["schedule"]["pending_call_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(call(&api, &user, &resumed).await["status"], "canceled");
    let c = call(&api, &user, &rebooked).await;
    assert_eq!(
        (c["persona_id"].clone(), c["status"].clone()),
        (json!("sarah"), json!("scheduled"))
    );
    assert_eq!(at(&r.body["schedule"]["next_call_at"]), next, "same time");

    // Delete: gone from the list, its pending call canceled, and 404 after.
    let d = api
        .delete(&format!("/api/schedules/{id}"), Some(&user.token))
        .await
        .unwrap();
    assert_eq!(d.status, 204, "{}", d.body);
    assert!(schedules(&api, &user).await.is_empty());
    assert_eq!(call(&api, &user, &rebooked).await["status"], "canceled");
    let again = api
        .delete(&format!("/api/schedules/{id}"), Some(&user.token))
        .await
        .unwrap();
    assert_eq!((again.status, again.code()), (404, Some("not_found")));
    let still_scheduled = pending_calls(&api, &user).await;
    assert_eq!(still_scheduled, 0, "nothing left to dial");
}

/// Every bad field is a 400 naming it, and nothing is created; another user's schedule
/// is 404 to everyone else.
#[tokio::test]
async fn bad_schedules_are_refused_and_others_schedules_are_not_found() {
    let api = client();
    let user = user_with(&api, "sched-bad", &unique_number()).await;
    let good = json!({ "persona_id": "sarah", "time_of_day": "07:00", "timezone": "UTC" });
    let with = |k: &str, v: Value| {
        let mut b = good.clone();
        b[k] = v;
        b
    };
    let cases = [
        (
            with("time_of_day", json!("25:00")),
            "invalid_time_of_day",
            "time_of_day",
        ),
        (
            with("time_of_day", json!("7am")),
            "invalid_time_of_day",
            "time_of_day",
        ),
        (
            with("timezone", json!("Mars/Olympus_Mons")),
            "invalid_timezone",
            "timezone",
        ),
        (
            with("timezone", json!("EST+5")),
            "invalid_timezone",
            "timezone",
        ),
        (with("days", json!([])), "invalid_days", "days"),
        (
            with("days", json!(["mon", "funday"])),
            "invalid_days",
            "days",
        ),
        (with("retries", json!(4)), "invalid_retries", "retries"),
        (with("retries", json!(-1)), "invalid_retries", "retries"),
        (
            with("retry_after_minutes", json!(121)),
            "invalid_retry_after",
            "retry_after_minutes",
        ),
    ];
    for (body, code, field) in cases {
        let r = api
            .post("/api/schedules", Some(&user.token), &body)
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.code()),
            (400, Some(code)),
            "{body}: {}",
            r.body
        );
        let named = r.body["error"]["details"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["field"] == field));
        assert!(named, "the error names {field}: {}", r.body);
    }
    // Malformed JSON and unknown fields.
    let r = api
        .post(
            "/api/schedules",
            Some(&user.token),
            &with("every", json!("day")),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    let r = api
        .post(
            "/api/schedules",
            Some(&user.token),
            &json!({ "time_of_day": "07:00", "timezone": "UTC" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "persona_id is required: {}", r.body);
    // An unknown persona.
    let r = api
        .post(
            "/api/schedules",
            Some(&user.token),
            &with("persona_id", json!("nobody")),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.code()),
        (400, Some("invalid_persona")),
        "{}",
        r.body
    );
    // No zone given and none on the account.
    let r = api
        .post(
            "/api/schedules",
            Some(&user.token),
            &json!({ "persona_id": "sarah", "time_of_day": "07:00" }),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.code()),
        (400, Some("invalid_timezone")),
        "{}",
        r.body
    );
    // Without a token.
    let r = api.post("/api/schedules", None, &good).await.unwrap();
    assert_eq!(r.status, 401);
    assert!(
        schedules(&api, &user).await.is_empty(),
        "nothing was created"
    );
    assert!(calls(&api, &user).await.is_empty(), "nothing was booked");

    // The account's zone is the default.
    let r = api
        .patch(
            "/api/me",
            Some(&user.token),
            &json!({ "timezone": "Australia/Sydney" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let r = create(
        &api,
        &user,
        &json!({ "persona_id": "sarah", "time_of_day": "07:00" }),
    )
    .await;
    assert_eq!(r.body["schedule"]["timezone"], "Australia/Sydney");
    let id = r.body["schedule"]["id"].as_str().unwrap().to_owned();

    // A bad PATCH changes nothing.
    let r = api
        .patch(
            &format!("/api/schedules/{id}"),
            Some(&user.token),
            &json!({ "time_of_day": "07:60", "active": false }),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.code()),
        (400, Some("invalid_time_of_day")),
        "{}",
        r.body
    );
    let list = schedules(&api, &user).await;
    assert_eq!(
        (list[0]["time_of_day"].clone(), list[0]["active"].clone()),
        (json!("07:00"), json!(true))
    );

    // Someone else's schedule does not exist for them.
    let other = user_with(&api, "sched-other", &unique_number()).await;
    for r in [
        api.patch(
            &format!("/api/schedules/{id}"),
            Some(&other.token),
            &json!({ "active": false }),
        )
        .await
        .unwrap(),
        api.delete(&format!("/api/schedules/{id}"), Some(&other.token))
            .await
            .unwrap(),
    ] {
        assert_eq!((r.status, r.code()), (404, Some("not_found")), "{}", r.body);
    }
    assert!(schedules(&api, &other).await.is_empty());
    assert_eq!(schedules(&api, &user).await[0]["active"], true, "untouched");

    // An account without a verified number cannot set one up.
    let unverified = ApiClient::new(api.base())
        .register_user("sched-unverified")
        .await
        .unwrap();
    let r = api
        .post("/api/schedules", Some(&unverified.token), &good)
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.code()),
        (403, Some("phone_not_verified")),
        "{}",
        r.body
    );
    assert!(schedules(&api, &unverified).await.is_empty());
}

/// A schedule set for the coming minute, in a zone half an hour off UTC, dials at that
/// minute; unanswered, it is tried again after its delay (0 here, through the test-only
/// `SCHEDULE_MIN_RETRY_MINUTES`); then the schedule waits for the next day. Each attempt
/// is its own call, linked to the schedule.
#[tokio::test]
async fn a_schedule_dials_at_its_minute_and_retries_a_missed_call() {
    let api = client();
    let number = unique_number();
    harness::worker()
        .twilio
        .set_script(number.clone(), CalleeScript::NoAnswer);
    let user = user_with(&api, "sched-dial", &number).await;

    // The coming minute as a Kolkata (UTC+05:30, no DST) time.
    let kolkata = UtcOffset::from_hms(5, 30, 0).unwrap();
    let (minute, _) = coming_minute();
    let local = minute.to_offset(kolkata);
    let time_of_day = format!("{:02}:{:02}", local.hour(), local.minute());
    let r = create(
        &api,
        &user,
        &json!({
            "persona_id": "sarah",
            "time_of_day": time_of_day,
            "timezone": "Asia/Kolkata",
            "retries": 1,
            "retry_after_minutes": 0,
        }),
    )
    .await;
    let id = r.body["schedule"]["id"].as_str().unwrap().to_owned();
    assert_eq!(at(&r.body["schedule"]["next_call_at"]), minute);

    // The occurrence rings out unanswered; its one retry finds the line busy.
    let dials = wait_dials(&number, 1, Duration::from_secs(100)).await;
    assert_eq!(dials.len(), 1, "the occurrence dialed");
    harness::worker()
        .twilio
        .set_script(number.clone(), CalleeScript::Busy);
    let dials = wait_dials(&number, 2, Duration::from_secs(60)).await;
    assert_eq!(dials.len(), 2, "the occurrence and one retry: {dials:?}");
    let first = dials[0].date_created;
    assert!(
        first >= minute - time::Duration::milliseconds(1000)
            && first <= minute + time::Duration::seconds(5),
        "dialed at its minute: {first} vs {minute}"
    );

    // Then tomorrow's occurrence is booked, and no third dial comes today.
    // Past the retry, which was booked for right after the occurrence and stays pending
    // while it dials.
    let list = wait_schedules(&api, &user, Duration::from_secs(30), |l| {
        l[0]["next_call_at"]
            .as_str()
            .is_some_and(|t| at(&json!(t)) > minute + time::Duration::hours(1))
    })
    .await;
    assert_eq!(
        at(&list[0]["next_call_at"]),
        minute + time::Duration::days(1),
        "{}",
        list[0]
    );
    assert_eq!(list[0]["skipped_reason"], Value::Null);
    let history = calls(&api, &user).await;
    let mut attempts: Vec<(i64, String, String)> = history
        .iter()
        .filter(|c| c["schedule_id"] == id.as_str())
        .map(|c| {
            (
                c["attempt"].as_i64().unwrap(),
                c["status"].as_str().unwrap().to_owned(),
                c["requested_by"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    attempts.sort();
    let schedule = "schedule".to_owned();
    assert_eq!(
        attempts,
        [
            (0, "no_answer".to_owned(), schedule.clone()),
            (0, "scheduled".to_owned(), schedule.clone()),
            (1, "busy".to_owned(), schedule.clone()),
        ],
        "{history:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(dials_to(&number).len(), 2, "given up after one retry");

    // Deleting it cancels tomorrow's.
    let d = api
        .delete(&format!("/api/schedules/{id}"), Some(&user.token))
        .await
        .unwrap();
    assert_eq!(d.status, 204);
    assert!(calls(&api, &user)
        .await
        .iter()
        .all(|c| c["status"] != "scheduled"));
}

/// The next whole minute at least 5 s away, and that minute as `HH:MM` in UTC.
fn coming_minute() -> (OffsetDateTime, String) {
    let now = OffsetDateTime::now_utc();
    let mut minute = now
        .replace_second(0)
        .unwrap()
        .replace_nanosecond(0)
        .unwrap()
        + time::Duration::minutes(1);
    if minute - now < time::Duration::seconds(5) {
        minute += time::Duration::minutes(1);
    }
    let hh_mm = format!("{:02}:{:02}", minute.hour(), minute.minute());
    (minute, hh_mm)
}

/// An occurrence that comes when the account has no credits is not placed: its call fails
/// free with the reason, the schedule says why (`skipped_reason`) and books the next day.
#[tokio::test]
async fn an_occurrence_without_credits_is_skipped_and_says_why() {
    let api = client();
    let number = unique_number();
    harness::worker()
        .twilio
        .set_script(number.clone(), CalleeScript::Busy);
    let user = user_with(&api, "sched-broke", &number).await;
    let (minute, hh_mm) = coming_minute();
    let r = create(
        &api,
        &user,
        &json!({ "persona_id": "sarah", "time_of_day": hh_mm, "timezone": "UTC", "retries": 0 }),
    )
    .await;
    let first = r.body["schedule"]["pending_call_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The credits go before the minute comes.
    let admin = harness::admin(&api).await;
    let r = api
        .post(
            &format!("/admin/users/{}/credits", user.id),
            Some(&admin.token),
            &json!({ "amount": -200, "reason": "schedule test: no credits" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(api.credits(&user).await.unwrap(), 0);

    let list = wait_schedules(&api, &user, Duration::from_secs(100), |l| {
        l[0]["pending_call_id"].as_str().is_some_and(|p| p != first)
    })
    .await;
    let s = &list[0];
    assert_eq!(
        at(&s["next_call_at"]),
        minute + time::Duration::days(1),
        "{s}"
    );
    let why = s["skipped_reason"].as_str().unwrap_or_default();
    assert!(why.contains("Not enough credits"), "says why: {s}");
    let missed = call(&api, &user, &first).await;
    assert_eq!(missed["status"], "failed", "{missed}");
    assert_eq!(missed["cost_cents"], 0, "{missed}");
    assert!(dials_to(&number).is_empty(), "never dialed");
    let d = api
        .delete(
            &format!("/api/schedules/{}", s["id"].as_str().unwrap()),
            Some(&user.token),
        )
        .await
        .unwrap();
    assert_eq!(d.status, 204);
}

/// A ban cancels the schedule's pending attempt and nothing is booked while the account
/// is suspended; reinstating it books the next occurrence again.
#[tokio::test]
async fn a_suspended_account_skips_its_schedule_until_reinstated() {
    let api = client();
    let user = user_with(&api, "sched-banned", &unique_number()).await;
    let r = create(
        &api,
        &user,
        &json!({ "persona_id": "sarah", "time_of_day": "06:45", "timezone": "Europe/London" }),
    )
    .await;
    let first = r.body["schedule"]["pending_call_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let next = r.body["schedule"]["next_call_at"].clone();
    let admin = harness::admin(&api).await;
    let r = api.ban(&admin, &user.id, "schedule test").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.to_string().contains(&first),
        "the ban canceled the pending attempt: {}",
        r.body
    );
    // The canceled attempt's session finds the account suspended and books nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = api
        .post(
            &format!("/admin/users/{}/unban", user.id),
            Some(&admin.token),
            &json!({ "reason": "schedule test over" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let list = wait_schedules(&api, &user, Duration::from_secs(20), |l| {
        l[0]["pending_call_id"].as_str().is_some_and(|p| p != first)
    })
    .await;
    let s = &list[0];
    let resumed = s["pending_call_id"]
        .as_str()
        .unwrap_or_else(|| panic!("resumed: {s}"));
    assert_ne!(resumed, first);
    assert_eq!(
        s["next_call_at"], next,
        "the same occurrence, booked again: {s}"
    );
    assert_eq!(s["skipped_reason"], Value::Null, "{s}");
    assert_eq!(call(&api, &user, resumed).await["status"], "scheduled");
    assert_eq!(call(&api, &user, &first).await["status"], "canceled");
    let scheduled = pending_calls(&api, &user).await;
    assert_eq!(scheduled, 1, "one pending attempt");
}

/// A day that already has the tier's daily calls skips that occurrence, says why, and
/// books the next one: a full day never stops a schedule.
#[tokio::test]
async fn a_full_day_skips_to_the_next_occurrence() {
    let api = client();
    let user = user_with(&api, "sched-full-day", &unique_number()).await;
    // Tomorrow (UTC) gets the free tier's three calls a day.
    let tomorrow = (OffsetDateTime::now_utc() + time::Duration::days(1)).date();
    let at_time = |h, m| {
        tomorrow
            .with_hms(h, m, 0)
            .unwrap()
            .assume_utc()
            .format(&Rfc3339)
            .unwrap()
    };
    for m in 0..3 {
        let r = api
            .post(
                "/api/calls/schedule",
                Some(&user.token),
                &json!({ "persona_id": "sarah", "scheduled_time": at_time(10, m) }),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.body);
    }
    // Every week on tomorrow's weekday at noon: tomorrow's is skipped.
    let weekday = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        [usize::from(tomorrow.weekday().number_days_from_monday())];
    let r = create(&api, &user, &json!({ "persona_id": "sarah", "time_of_day": "12:00", "days": [weekday], "timezone": "UTC" })).await;
    let s = &r.body["schedule"];
    let week_later = tomorrow.with_hms(12, 0, 0).unwrap().assume_utc() + time::Duration::days(7);
    assert_eq!(at(&s["next_call_at"]), week_later, "{s}");
    let why = s["skipped_reason"].as_str().unwrap_or_default();
    assert!(why.contains("calls a day"), "says why: {s}");
}

fn in_an_hour() -> String {
    (OffsetDateTime::now_utc() + time::Duration::hours(1))
        .replace_nanosecond(0)
        .unwrap()
        .format(&Rfc3339)
        .unwrap()
}

fn new_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// [`ApiClient::post_idempotent_expect`] that must succeed in its expectation.
async fn post(
    api: &ApiClient,
    path: &str,
    user: &TestUser,
    key: Option<&[u8]>,
    body: &str,
    want: (u16, Option<&str>, bool),
) -> cmb_tests::api::Reply {
    api.post_idempotent_expect(path, user, key, body, want)
        .await
        .unwrap()
}

const BOOKED: (u16, Option<&str>, bool) = (201, None, false);
const REPLAYED: (u16, Option<&str>, bool) = (201, None, true);
const REUSED: (u16, Option<&str>, bool) = (409, Some("idempotency_key_reused"), false);

/// A retried `POST /api/calls/schedule` under one `Idempotency-Key` books one call (the
/// repeat, keys reordered, gets the first answer marked `Idempotent-Replayed`); another
/// body, or the same on another route, is 409 `idempotency_key_reused` and changes
/// nothing; another user's identical key and body is a booking of their own.
#[tokio::test]
async fn a_repeated_booking_with_its_key_books_one_call() {
    let api = client();
    let user = user_with(&api, "idem-schedule", &unique_number()).await;
    let key = new_key();
    let key = Some(key.as_bytes());
    let path = "/api/calls/schedule";
    let when = in_an_hour();
    let body = json!({ "persona_id": "brad", "scheduled_time": when }).to_string();

    let first = post(&api, path, &user, key, &body, BOOKED).await;
    let reordered = format!(r#"{{ "scheduled_time": "{when}", "persona_id": "brad" }}"#);
    let again = post(&api, path, &user, key, &reordered, REPLAYED).await;
    assert_eq!(again.body, first.body);
    let other = json!({ "persona_id": "sarah", "scheduled_time": when }).to_string();
    post(&api, path, &user, key, &other, REUSED).await;
    post(&api, "/api/calls/trigger", &user, key, &body, REUSED).await;
    let all = calls(&api, &user).await;
    assert_eq!(all.len(), 1, "still the one booked call: {all:?}");
    assert_eq!(all[0]["id"], first.body["call"]["id"]);
    assert_eq!(
        (&all[0]["persona_id"], &all[0]["status"]),
        (&json!("brad"), &json!("scheduled"))
    );

    let stranger = user_with(&api, "idem-stranger", &unique_number()).await;
    let theirs = post(&api, path, &stranger, key, &body, BOOKED).await;
    assert_ne!(theirs.body["call"]["id"], first.body["call"]["id"]);
    assert_eq!(calls(&api, &stranger).await.len(), 1);
    assert_eq!(calls(&api, &user).await.len(), 1);
}

/// A retried `POST /api/schedules` under one key makes one schedule with one pending
/// attempt; a changed body under the key is refused.
#[tokio::test]
async fn a_repeated_schedule_with_its_key_is_made_once() {
    let api = client();
    let user = user_with(&api, "idem-recurring", &unique_number()).await;
    let key = new_key();
    let key = Some(key.as_bytes());
    let path = "/api/schedules";
    let body = r#"{"persona_id":"brad","time_of_day":"07:00","days":["mon","fri"],"timezone":"Europe/London"}"#;
    let first = post(&api, path, &user, key, body, BOOKED).await;
    let again = post(&api, path, &user, key, body, REPLAYED).await;
    assert_eq!(again.body, first.body);
    let changed = body.replace("07:00", "08:00");
    post(&api, path, &user, key, &changed, REUSED).await;

    let all = schedules(&api, &user).await;
    assert_eq!(all.len(), 1, "one schedule: {all:?}");
    assert_eq!(all[0]["id"], first.body["schedule"]["id"]);
    assert_eq!(all[0]["time_of_day"], "07:00");
    assert_eq!(pending_calls(&api, &user).await, 1, "one pending attempt");
}

/// A request refused as the client's mistake keeps nothing under its key: it runs again,
/// and the corrected request with the same key books. Malformed keys are refused before
/// anything runs; the longest allowed key works.
#[tokio::test]
async fn a_refused_request_gives_its_key_back_and_bad_keys_are_refused() {
    let api = client();
    let user = user_with(&api, "idem-refused", &unique_number()).await;
    let key = new_key();
    let key = Some(key.as_bytes());
    let path = "/api/calls/schedule";
    let bad = r#"{"persona_id":"brad","scheduled_time":"tomorrow at seven"}"#;
    for _ in 0..2 {
        let refused = (400, Some("invalid_scheduled_time"), false);
        post(&api, path, &user, key, bad, refused).await;
    }
    let good = json!({ "persona_id": "brad", "scheduled_time": in_an_hour() }).to_string();
    let booked = post(&api, path, &user, key, &good, BOOKED).await;
    let again = post(&api, path, &user, key, &good, REPLAYED).await;
    assert_eq!(again.body, booked.body);

    let other = json!({ "persona_id": "brad", "scheduled_time": in_an_hour() }).to_string();
    let too_long = "k".repeat(256);
    for bad_key in [too_long.as_bytes(), b"   ", "naïve".as_bytes()] {
        let invalid = (400, Some("invalid_idempotency_key"), false);
        post(&api, path, &user, Some(bad_key), &other, invalid).await;
    }
    assert_eq!(
        calls(&api, &user).await.len(),
        1,
        "no booking came of the bad keys"
    );
    let longest = "~".repeat(255);
    post(&api, path, &user, Some(longest.as_bytes()), &other, BOOKED).await;
}

/// Identical bookings sent at once under one key book one call (without the key they
/// would book up to the pending cap).
#[tokio::test]
async fn concurrent_bookings_under_one_key_book_one_call() {
    let api = client();
    let user = user_with(&api, "idem-race", &unique_number()).await;
    let key = new_key();
    let body = json!({ "persona_id": "brad", "scheduled_time": in_an_hour() }).to_string();
    let id = api
        .post_idempotent_at_once(8, "/api/calls/schedule", &user, &key, &body)
        .await
        .unwrap();
    let all = calls(&api, &user).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["id"].as_str(), Some(id.as_str()));
}
