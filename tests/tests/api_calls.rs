//! Calls end to end against the real Worker under `wrangler dev` and the fake Twilio:
//! trigger, Twilio REST, status callbacks, settlement, scheduling, cancel, webhooks'
//! signatures, and credit reservations under concurrency.
//!
//! The relay is not part of this suite: the TwiML points at an address where nothing
//! listens, so Twilio (the fake) runs the spoken fallback and the call completes — the
//! billing path is the same.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use cmb_tests::api::{ApiClient, TestUser};
use cmb_tests::fakes::twilio::{Answer, AnsweredBy, CallRecord, CalleeScript};
use cmb_tests::harness::{self, TWILIO_AUTH_TOKEN};
use cmb_tests::sim::{SimScript, Step};
use serde_json::{json, Value};

fn client() -> ApiClient {
    harness::worker().api()
}

/// A phone number no other test uses, so per-number callee scripts don't collide.
fn unique_number() -> String {
    let n = uuid::Uuid::new_v4().as_u128() % 10_000_000;
    format!("+1415{n:07}")
}

/// Runs on the fakes' runtime: the fake Twilio lives there.
fn set_script(number: &str, script: CalleeScript) {
    harness::worker()
        .twilio
        .set_script(number.to_string(), script);
}

async fn wait_call_to(number: &str, timeout: Duration) -> Option<CallRecord> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(c) = harness::worker()
            .twilio
            .calls()
            .into_iter()
            .find(|c| c.to == number)
        {
            return Some(c);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_fake_finished(number: &str) -> CallRecord {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(c) = harness::worker()
            .twilio
            .calls()
            .into_iter()
            .find(|c| c.to == number && c.finished)
        {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "fake Twilio never finished the call to {number}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls the Worker until the call reaches a status in `want`; returns every status seen.
async fn wait_status(
    api: &ApiClient,
    user: &TestUser,
    id: &str,
    want: &[&str],
) -> (Value, Vec<String>) {
    wait_status_within(api, user, id, want, Duration::from_secs(30)).await
}

async fn wait_status_within(
    api: &ApiClient,
    user: &TestUser,
    id: &str,
    want: &[&str],
    within: Duration,
) -> (Value, Vec<String>) {
    let deadline = Instant::now() + within;
    let mut seen: Vec<String> = Vec::new();
    loop {
        let r = api
            .get(&format!("/api/calls/{id}"), Some(&user.token))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let status = r.body["call"]["status"].as_str().unwrap().to_string();
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if want.contains(&status.as_str()) {
            return (r.body, seen);
        }
        assert!(
            Instant::now() < deadline,
            "call {id} stuck; statuses seen {seen:?}: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

async fn trigger(api: &ApiClient, user: &TestUser, number: &str) -> Value {
    api.ensure_verified(user, number).await.unwrap();
    let r = api
        .post(
            "/api/calls/trigger",
            Some(&user.token),
            &json!({ "persona_id": "brad", "phone_number": number }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    r.body
}

fn quick_answer(duration_override_secs: Option<u64>, after_rings: u32) -> CalleeScript {
    CalleeScript::Answer(Answer {
        after_rings,
        answered_by: AnsweredBy::Human,
        session: SimScript::new(vec![Step::Pause(300), Step::HangUp]),
        duration_override_secs,
    })
}

/// A triggered call goes queued → ringing → in_progress → completed, Twilio gets the
/// right request, and the call settles to 25 + 40 per started minute.
#[tokio::test]
async fn triggered_call_progresses_and_settles() {
    let api = client();
    let user = api.register_user("caller").await.unwrap();
    let number = unique_number();
    set_script(&number, quick_answer(Some(125), 2));

    let body = trigger(&api, &user, &number).await;
    assert_eq!(body["call"]["status"], "queued");
    let id = body["call"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        api.credits(&user).await.unwrap(),
        200 - 65,
        "first minute reserved"
    );

    let (final_body, seen) = wait_status(
        &api,
        &user,
        &id,
        &["completed", "failed", "busy", "no_answer"],
    )
    .await;
    assert_eq!(final_body["call"]["status"], "completed", "{final_body}");
    for expected in ["ringing", "in_progress"] {
        assert!(
            seen.iter().any(|s| s == expected),
            "never saw {expected}: {seen:?}"
        );
    }
    assert_eq!(final_body["call"]["duration_seconds"], 125);
    assert_eq!(final_body["call"]["cost_cents"], 25 + 3 * 40);
    assert!(final_body["call"]["ended_at"].is_string());
    assert!(final_body["call"]["twilio_call_sid"]
        .as_str()
        .unwrap()
        .starts_with("CA"));
    let twilio_line = final_body["costs"]["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["provider"] == "twilio")
        .cloned();
    assert_eq!(
        twilio_line.unwrap()["cost_micros"],
        3 * 13_000,
        "Twilio: 3 minutes at $0.013"
    );
    assert_eq!(api.credits(&user).await.unwrap(), 200 - 145);

    let fake = wait_fake_finished(&number).await;
    assert_eq!(fake.param("From"), Some("+15005550006"));
    assert!(fake
        .url
        .as_deref()
        .unwrap()
        .ends_with(&format!("/api/voice/twiml?callId={id}")));
    assert!(fake
        .status_callback
        .as_deref()
        .unwrap()
        .ends_with(&format!("/api/voice/status?callId={id}")));
    let mut events = fake.status_callback_events.clone();
    events.sort();
    assert_eq!(events, ["answered", "completed", "initiated", "ringing"]);
    assert_eq!(
        fake.machine_detection.as_deref(),
        Some("DetectMessageEnd"),
        "a machine is answered after its beep"
    );
    assert!(fake.timeout_secs > 0);
    assert!(!fake.twiml_fetches.is_empty(), "Twilio fetched the TwiML");
}

/// Busy and no-answer calls cost nothing and release the reservation.
#[tokio::test]
async fn busy_and_no_answer_cost_nothing() {
    let api = client();
    for (script, status) in [
        (CalleeScript::Busy, "busy"),
        (CalleeScript::NoAnswer, "no_answer"),
    ] {
        let user = api.register_user(status).await.unwrap();
        let number = unique_number();
        set_script(&number, script);
        let id = trigger(&api, &user, &number).await["call"]["id"]
            .as_str()
            .unwrap()
            .to_string();
        let (body, _) = wait_status(
            &api,
            &user,
            &id,
            &["completed", "failed", "busy", "no_answer"],
        )
        .await;
        assert_eq!(body["call"]["status"], status, "{body}");
        assert_eq!(body["call"]["cost_cents"], 0);
        assert_eq!(
            api.credits(&user).await.unwrap(),
            200,
            "{status}: reservation released, nothing charged"
        );
    }
}

/// An answering machine is answered after its beep with the media stream, as a person
/// is (the persona leaves its voicemail through the relay: `e2e_call`). This stack has no
/// relay, so no message is left, and the call says so; it is billed as connected.
#[tokio::test]
async fn answering_machine_gets_the_stream_for_a_voicemail() {
    let api = client();
    let user = api.register_user("machine").await.unwrap();
    let number = unique_number();
    set_script(
        &number,
        CalleeScript::Answer(Answer {
            after_rings: 1,
            answered_by: AnsweredBy::MachineEndBeep,
            session: SimScript::new(vec![Step::Pause(200)]),
            duration_override_secs: Some(95),
        }),
    );
    let id = trigger(&api, &user, &number).await["call"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (body, _) = wait_status(&api, &user, &id, &["completed", "failed"]).await;
    assert_eq!(body["call"]["status"], "completed");
    assert_eq!(body["call"]["answered_by"], "machine_end_beep");
    assert_eq!(
        body["call"]["status_reason"],
        "Answered by a machine; no message was left."
    );
    let charged = body["call"]["cost_cents"].as_i64().unwrap();
    assert_eq!(charged, cmb_core::pricing::call_charge_credits(95, true));
    assert_eq!(api.credits(&user).await.unwrap(), 200 - charged);
    let fake = wait_fake_finished(&number).await;
    assert_eq!(fake.machine_detection.as_deref(), Some("DetectMessageEnd"));
    let xml = format!("{:?}", fake.twiml_fetches[0]);
    assert!(
        xml.contains("<Stream"),
        "the stream connects for a machine: {xml}"
    );
}

/// Bad signatures on either webhook are 403 and change nothing; so is a signed callback
/// for a call we never placed.
#[tokio::test]
async fn webhooks_refuse_bad_signatures() {
    let api = client();
    let user = api.register_user("sig").await.unwrap();
    let number = unique_number();
    set_script(&number, CalleeScript::NoAnswer);
    let id = trigger(&api, &user, &number).await["call"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let base = harness::worker().url();
    let http = reqwest::Client::new();
    let params = vec![
        ("CallSid".to_string(), "CA0000".to_string()),
        ("CallStatus".to_string(), "completed".to_string()),
        ("CallDuration".to_string(), "600".to_string()),
        ("SequenceNumber".to_string(), "9".to_string()),
    ];
    for path in ["/api/voice/status", "/api/voice/twiml"] {
        let url = format!("{base}{path}?callId={id}");
        let good_sig = cmb_core::twilio_sig::compute_signature(TWILIO_AUTH_TOKEN, &url, &params);
        let wrong_key = cmb_core::twilio_sig::compute_signature("not-the-token", &url, &params);
        for sig in [Some(wrong_key.as_str()), Some("garbage"), None] {
            let mut req = http.post(&url).form(&params);
            if let Some(sig) = sig {
                req = req.header("X-Twilio-Signature", sig);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 403, "{path} with {sig:?}");
        }
        // Tampered body: signed for other params.
        let mut tampered = params.clone();
        tampered[2].1 = "6000".into();
        let r = http
            .post(&url)
            .header("X-Twilio-Signature", &good_sig)
            .form(&tampered)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path} tampered");
        // Correctly signed, but for an unknown call.
        let unknown = format!("{base}{path}?callId=00000000-0000-4000-8000-000000000000");
        let sig = cmb_core::twilio_sig::compute_signature(TWILIO_AUTH_TOKEN, &unknown, &params);
        let r = http
            .post(&unknown)
            .header("X-Twilio-Signature", sig)
            .form(&params)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path} unknown call");
    }
    let r = api
        .get(&format!("/api/calls/{id}"), Some(&user.token))
        .await
        .unwrap();
    assert_ne!(
        r.body["call"]["status"], "completed",
        "nothing changed: {}",
        r.body
    );
    assert_eq!(api.credits(&user).await.unwrap(), 200 - 65);
}

/// After a call settled, replayed and out-of-order callbacks change nothing.
#[tokio::test]
async fn replayed_and_out_of_order_callbacks_change_nothing() {
    let api = client();
    let user = api.register_user("replay").await.unwrap();
    let number = unique_number();
    set_script(&number, quick_answer(Some(30), 1));
    let id = trigger(&api, &user, &number).await["call"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (done, _) = wait_status(&api, &user, &id, &["completed"]).await;
    let fake = wait_fake_finished(&number).await;
    let balance = api.credits(&user).await.unwrap();
    assert_eq!(balance, 200 - 65);

    let http = reqwest::Client::new();
    let url = fake.status_callback.clone().unwrap();
    // Every callback Twilio sent, again, in reverse order (the final one first).
    for cb in fake.callbacks.iter().rev() {
        let sig = cmb_core::twilio_sig::compute_signature(TWILIO_AUTH_TOKEN, &url, &cb.params);
        let r = http
            .post(&url)
            .header("X-Twilio-Signature", sig)
            .form(&cb.params)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    // A forged-late "completed" with a longer duration and a higher sequence number.
    let mut later = fake.callbacks.last().unwrap().params.clone();
    for (k, v) in later.iter_mut() {
        match k.as_str() {
            "CallDuration" | "Duration" => *v = "900".into(),
            "SequenceNumber" => *v = "99".into(),
            _ => {}
        }
    }
    let sig = cmb_core::twilio_sig::compute_signature(TWILIO_AUTH_TOKEN, &url, &later);
    let r = http
        .post(&url)
        .header("X-Twilio-Signature", sig)
        .form(&later)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    let after = api
        .get(&format!("/api/calls/{id}"), Some(&user.token))
        .await
        .unwrap();
    assert_eq!(
        after.body["call"], done["call"],
        "the call record did not move"
    );
    assert_eq!(
        api.credits(&user).await.unwrap(),
        balance,
        "nothing billed twice"
    );
}

/// 20 concurrent triggers: at most what the balance allows is reserved (here one live
/// call), the balance never goes negative, and the ledger reconciles.
#[tokio::test]
async fn concurrent_triggers_never_overdraw() {
    let api = client();
    let user = api.register_user("burst").await.unwrap();
    let number = unique_number();
    set_script(&number, CalleeScript::NoAnswer);
    api.ensure_verified(&user, &number).await.unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let api = api.clone();
            let token = user.token.clone();
            let number = number.clone();
            tokio::spawn(async move {
                api.post(
                    "/api/calls/trigger",
                    Some(&token),
                    &json!({ "persona_id": "brad", "phone_number": number }),
                )
                .await
                .unwrap()
            })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            201 => created += 1,
            409 => assert_eq!(r.code(), Some("call_in_progress")),
            402 => assert_eq!(r.code(), Some("insufficient_credits")),
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert_eq!(created, 1, "one live call per user");
    let balance = api.credits(&user).await.unwrap();
    assert_eq!(balance, 200 - 65);
    let history = api
        .get("/api/calls/history?limit=100", Some(&user.token))
        .await
        .unwrap();
    assert_eq!(history.body["total"], 1, "refused triggers wrote nothing");
}

/// A user with too few credits cannot start a call.
#[tokio::test]
async fn insufficient_credits_is_402() {
    let api = client();
    let user = api.register_user("poor").await.unwrap();
    let number = unique_number();
    set_script(&number, quick_answer(Some(300), 1));
    // 200 credits: a 5-minute call costs 225, leaving 0.
    let id = trigger(&api, &user, &number).await["call"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (body, _) = wait_status(&api, &user, &id, &["completed"]).await;
    assert_eq!(
        body["call"]["cost_cents"], 200,
        "capped at what could be collected: {body}"
    );
    assert_eq!(api.credits(&user).await.unwrap(), 0);
    let r = api
        .post(
            "/api/calls/trigger",
            Some(&user.token),
            &json!({ "persona_id": "brad" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 402, "{}", r.body);
    assert_eq!(r.code(), Some("insufficient_credits"));
}

/// Twilio refusing the number (21211) fails the call with Twilio's message.
#[tokio::test]
async fn bad_numbers_are_refused() {
    let api = client();
    let user = api.register_user("badnum").await.unwrap();
    for bad in ["12345", "+0123456789", "+1 415 CALL ME", "+1415555"] {
        let r = api
            .post(
                "/api/calls/trigger",
                Some(&user.token),
                &json!({ "persona_id": "brad", "phone_number": bad }),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert_eq!(r.code(), Some("invalid_phone_number"), "{bad}");
    }
    let r = api
        .post(
            "/api/calls/trigger",
            Some(&user.token),
            &json!({ "persona_id": "nobody" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.code(), Some("invalid_persona"));
    let r = api
        .post(
            "/api/calls/trigger",
            Some(&user.token),
            &json!({ "phoneNumber": "+14155550100" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "persona_id is required: {}", r.body);
    assert_eq!(api.credits(&user).await.unwrap(), 200, "nothing reserved");
}

/// A scheduled call dials at its time; a canceled one never dials. Two accounts, each
/// with its own verified number (an account has one at a time).
#[tokio::test]
async fn scheduled_call_dials_on_time_and_canceled_never_does() {
    let api = client();
    let user = api.register_user("sched").await.unwrap();
    let other = api.register_user("sched-cancel").await.unwrap();
    let on_time = unique_number();
    let canceled = unique_number();
    set_script(&on_time, CalleeScript::Busy);
    // Both numbers verified first: on a slow machine the SMS round trips would eat the
    // three seconds of lead.
    api.ensure_verified(&user, &on_time).await.unwrap();
    api.ensure_verified(&other, &canceled).await.unwrap();
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let at_str = at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let r = api
        .post(
            "/api/calls/schedule",
            Some(&user.token),
            &json!({ "persona_id": "sarah", "phone_number": on_time, "scheduled_time": at_str }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["call"]["status"], "scheduled");
    let r2 = api
        .post(
            "/api/calls/schedule",
            Some(&other.token),
            &json!({ "personaId": "sarah", "phoneNumber": canceled, "scheduledTime": at_str }),
        )
        .await
        .unwrap();
    assert_eq!(r2.status, 201, "camelCase aliases accepted: {}", r2.body);
    let cancel_id = r2.body["call"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        api.credits(&user).await.unwrap(),
        200,
        "nothing reserved until dialing"
    );

    let c = api
        .delete(&format!("/api/calls/{cancel_id}"), Some(&other.token))
        .await
        .unwrap();
    assert_eq!(c.status, 200, "{}", c.body);
    assert_eq!(c.body["call"]["status"], "canceled");
    let again = api
        .delete(&format!("/api/calls/{cancel_id}"), Some(&other.token))
        .await
        .unwrap();
    assert_eq!(again.status, 409);

    let dialed = wait_call_to(&on_time, Duration::from_secs(15))
        .await
        .expect("scheduled call dialed");
    let dialed_at = dialed.date_created;
    assert!(
        dialed_at >= at - time::Duration::milliseconds(1000),
        "not early: {dialed_at} vs {at}"
    );
    assert!(
        dialed_at <= at + time::Duration::seconds(3),
        "on time: {dialed_at} vs {at}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        wait_call_to(&canceled, Duration::from_millis(10))
            .await
            .is_none(),
        "canceled call never dialed"
    );
}

/// Scheduling validates the time: past, too far ahead and malformed are 400; at most 5
/// pending per user.
#[tokio::test]
async fn schedule_validates_time_and_limit() {
    let api = client();
    let user = api.register_user("limit").await.unwrap();
    let fmt = |d: time::Duration| {
        (time::OffsetDateTime::now_utc() + d)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    for bad in [
        fmt(time::Duration::minutes(-5)),
        fmt(time::Duration::days(31)),
        "tomorrow at nine".to_string(),
    ] {
        let r = api
            .post(
                "/api/calls/schedule",
                Some(&user.token),
                &json!({ "persona_id": "alex", "scheduled_time": bad }),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert_eq!(r.code(), Some("invalid_scheduled_time"));
    }
    // Three a day (the free tier's daily limit counts scheduled calls too), over two days.
    for i in 0..6 {
        let later = fmt(time::Duration::days(2 + i / 3));
        let r = api
            .post(
                "/api/calls/schedule",
                Some(&user.token),
                &json!({ "persona_id": "alex", "scheduled_time": later }),
            )
            .await
            .unwrap();
        if i < 5 {
            assert_eq!(r.status, 201, "{i}: {}", r.body);
        } else {
            assert_eq!(r.status, 429, "{}", r.body);
            assert_eq!(r.code(), Some("too_many_scheduled_calls"));
        }
    }
}

/// History is the caller's only, newest first, paged; another user's call is 404.
#[tokio::test]
async fn history_is_private_paged_and_newest_first() {
    let api = client();
    let user = api.register_user("hist").await.unwrap();
    let other = api.register_user("hist-other").await.unwrap();
    let later = (time::OffsetDateTime::now_utc() + time::Duration::days(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = api
            .post(
                "/api/calls/schedule",
                Some(&user.token),
                &json!({ "persona_id": "boss", "scheduled_time": later }),
            )
            .await
            .unwrap();
        ids.push(r.body["call"]["id"].as_str().unwrap().to_string());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let page = api
        .get("/api/calls/history?limit=2&offset=0", Some(&user.token))
        .await
        .unwrap();
    assert_eq!(page.status, 200);
    assert_eq!(page.body["total"], 3);
    let got: Vec<&str> = page.body["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[2].as_str(), ids[1].as_str()]);
    let page2 = api
        .get("/api/calls/history?limit=2&offset=2", Some(&user.token))
        .await
        .unwrap();
    assert_eq!(page2.body["calls"][0]["id"], ids[0].as_str());
    let bad = api
        .get("/api/calls/history?limit=500", Some(&user.token))
        .await
        .unwrap();
    assert_eq!(bad.status, 400);

    let theirs = api
        .get("/api/calls/history", Some(&other.token))
        .await
        .unwrap();
    assert_eq!(theirs.body["total"], 0);
    let peek = api
        .get(&format!("/api/calls/{}", ids[0]), Some(&other.token))
        .await
        .unwrap();
    assert_eq!(peek.status, 404);
    let cancel = api
        .delete(&format!("/api/calls/{}", ids[0]), Some(&other.token))
        .await
        .unwrap();
    assert_eq!(cancel.status, 404);
    let detail = api
        .get(&format!("/api/calls/{}", ids[0]), Some(&user.token))
        .await
        .unwrap();
    assert_eq!(detail.body["transcript"], json!([]));
}

/// Every status callback of a call is lost (our Worker was down, Twilio gave up): the
/// session looks the call up at Twilio after the ring timeout (30 s + the test stack's
/// 3 s margin), settles it as Twilio reports it — free — and the user's next call is
/// not blocked by a wedged live call.
#[tokio::test]
async fn lost_callbacks_are_reconciled_with_twilio() {
    let api = client();
    let user = api.register_user("lostcb").await.unwrap();
    let number = unique_number();
    set_script(&number, CalleeScript::NoAnswer);
    harness::worker()
        .twilio
        .lose_status_callbacks(number.clone());
    let id = trigger(&api, &user, &number).await["call"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let fake = wait_fake_finished(&number).await;
    assert!(fake.callbacks.is_empty(), "no callback reached the Worker");
    let (body, _) = wait_status_within(
        &api,
        &user,
        &id,
        &["no_answer", "failed", "completed"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(body["call"]["status"], "no_answer", "{body}");
    assert_eq!(body["call"]["cost_cents"], 0);
    assert_eq!(
        api.credits(&user).await.unwrap(),
        200,
        "reservation released"
    );
    // Not wedged: the next call goes through.
    let next = unique_number();
    set_script(&next, CalleeScript::Busy);
    trigger(&api, &user, &next).await;
}

/// How many credit reservations the user's ledger holds (the export has every entry).
async fn reservations(api: &ApiClient, user: &TestUser) -> usize {
    let r = api.get("/api/me/export", Some(&user.token)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["export"]["ledger"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "reserve")
        .count()
}

/// How many times the fake Twilio was asked to dial `number`, once the Worker has had
/// time to dial again if it were going to.
async fn dials_settled(number: &str) -> usize {
    wait_call_to(number, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    harness::worker()
        .twilio
        .calls()
        .iter()
        .filter(|c| c.to == number)
        .count()
}

/// A user with a verified `number` that rings unanswered (the call stays live a while).
async fn ringing_user(api: &ApiClient, label: &str) -> (TestUser, String) {
    let number = unique_number();
    set_script(&number, CalleeScript::NoAnswer);
    let user = api.register_user(label).await.unwrap();
    api.ensure_verified(&user, &number).await.unwrap();
    (user, number)
}

/// A retried trigger (its first answer lost on a flaky network) under one
/// `Idempotency-Key` places one call: the repeat, whitespace and key order changed, gets
/// the first answer again marked `Idempotent-Replayed`, and neither reserves credits nor
/// dials again. Another body under the key is 409 `idempotency_key_reused`.
#[tokio::test]
async fn a_repeated_trigger_with_its_key_places_one_call() {
    let api = client();
    let (user, number) = ringing_user(&api, "idem-trigger").await;
    let key = uuid::Uuid::new_v4().to_string();
    let key = Some(key.as_bytes());
    let post = |body: String, want| {
        let (api, user) = (&api, &user);
        async move {
            api.post_idempotent_expect("/api/calls/trigger", user, key, &body, want)
                .await
                .unwrap()
        }
    };

    let body = format!(r#"{{"persona_id":"brad","phone_number":"{number}"}}"#);
    let first = post(body.clone(), (201, None, false)).await;
    let spaced = format!("{{\n  \"phone_number\" : \"{number}\",\n  \"persona_id\": \"brad\"\n}}");
    let again = post(spaced, (201, None, true)).await;
    assert_eq!(again.body, first.body, "the repeat gets the first answer");
    let other = r#"{"persona_id":"sarah"}"#.to_owned();
    post(other, (409, Some("idempotency_key_reused"), false)).await;

    let history = api
        .get("/api/calls/history", Some(&user.token))
        .await
        .unwrap();
    assert_eq!(history.body["total"], 1, "one call: {}", history.body);
    assert_eq!(history.body["calls"][0]["id"], first.body["call"]["id"]);
    assert_eq!(reservations(&api, &user).await, 1, "credits reserved once");
    assert_eq!(
        dials_settled(&number).await,
        1,
        "Twilio was asked to dial once"
    );

    // Without a key a second trigger is a second request (refused: the call still rings).
    api.post_idempotent_expect(
        "/api/calls/trigger",
        &user,
        None,
        &body,
        (409, Some("call_in_progress"), false),
    )
    .await
    .unwrap();
}

/// Identical triggers sent at once under one key place one call, reserve once and dial
/// once. The one-live-call rule alone would refuse the others too, so they must be
/// refused as the key's (or replayed), never as `call_in_progress`.
#[tokio::test]
async fn concurrent_triggers_under_one_key_place_one_call() {
    let api = client();
    let (user, number) = ringing_user(&api, "idem-trigger-race").await;
    let key = uuid::Uuid::new_v4().to_string();
    let body = format!(r#"{{"persona_id":"brad","phone_number":"{number}"}}"#);
    let id = api
        .post_idempotent_at_once(8, "/api/calls/trigger", &user, &key, &body)
        .await
        .unwrap();
    let history = api
        .get("/api/calls/history", Some(&user.token))
        .await
        .unwrap();
    assert_eq!(history.body["total"], 1, "{}", history.body);
    assert_eq!(history.body["calls"][0]["id"].as_str(), Some(id.as_str()));
    assert_eq!(reservations(&api, &user).await, 1);
    assert_eq!(dials_settled(&number).await, 1);
}
