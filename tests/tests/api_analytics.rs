//! Analytics over real calls, against the real Worker: the reports' totals match
//! hand-computed figures. Alone in its binary (its own Worker and database), because
//! analytics are global and other tests' calls would count in them.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmb_tests::api::{ApiClient, TestUser};
use cmb_tests::fakes::twilio::{Answer, AnsweredBy, CalleeScript};
use cmb_tests::harness;
use cmb_tests::sim::{SimScript, Step};
use serde_json::{json, Value};

fn answer_for(secs: u64) -> CalleeScript {
    CalleeScript::Answer(Answer {
        after_rings: 1,
        answered_by: AnsweredBy::Human,
        session: SimScript::new(vec![Step::Pause(200), Step::HangUp]),
        duration_override_secs: Some(secs),
    })
}

async fn call_and_wait(api: &ApiClient, user: &TestUser, number: &str) -> Value {
    let id = api.trigger_call(user, "sarah", number).await.unwrap();
    api.wait_settled(user, &id, Duration::from_secs(30))
        .await
        .unwrap()
}

/// Analytics over calls made here match hand-computed totals for today (UTC).
#[tokio::test]
async fn analytics_match_hand_computed_totals() {
    let api = harness::worker().api();
    let admin = harness::admin(&api).await;
    let user = api.register_user("analytics").await.unwrap();
    api.post(
        &format!("/admin/users/{}/credits", user.id),
        Some(&admin.token),
        &json!({ "amount": 300, "reason": "test" }),
    )
    .await
    .unwrap();
    let w = harness::worker();
    w.twilio.set_script("+14155550801", answer_for(125));
    w.twilio.set_script("+14155550802", answer_for(30));
    w.twilio.set_script("+14155550803", CalleeScript::Busy);
    let mut charged = 0;
    for n in ["+14155550801", "+14155550802", "+14155550803"] {
        charged += call_and_wait(&api, &user, n).await["call"]["cost_cents"]
            .as_i64()
            .unwrap();
    }
    // 125 s → 25 + 3×40; 30 s → 25 + 40; busy → 0.
    assert_eq!(charged, 145 + 65);

    let today = time::OffsetDateTime::now_utc().date().to_string();
    let r = api
        .get(
            &format!("/admin/analytics/calls?from={today}&to={today}"),
            Some(&admin.token),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let t = &r.body["totals"];
    assert_eq!(t["calls"], 3, "{}", r.body);
    assert_eq!(t["by_status"]["completed"], 2);
    assert_eq!(t["by_status"]["busy"], 1);
    assert_eq!(t["duration_seconds"], 155);
    assert_eq!(t["billed_minutes"], 4);
    assert_eq!(t["credits_charged"], 210);

    let costs = api
        .get(
            &format!("/admin/analytics/costs?from={today}&to={today}"),
            Some(&admin.token),
        )
        .await
        .unwrap();
    assert_eq!(costs.status, 200, "{}", costs.body);
    assert_eq!(
        costs.body["totals"]["providers"]["twilio"]["cost_micros"],
        4 * 13_000,
        "Twilio: 4 billed minutes at $0.013: {}",
        costs.body
    );

    let bad = api
        .get("/admin/analytics/calls?from=yesterday", Some(&admin.token))
        .await
        .unwrap();
    assert_eq!(bad.status, 400);
}
