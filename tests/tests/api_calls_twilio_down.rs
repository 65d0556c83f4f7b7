//! Twilio failing: the Worker's calls against a fake Twilio answering 5xx. In its own
//! test binary (own Worker and fake) because the fault applies to every request the fake
//! receives, which would disturb concurrent tests.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use cmb_tests::fakes::faults::Faults;
use cmb_tests::harness;
use serde_json::Value;

/// A Twilio 5xx on create leaves the outcome unknown: the session never dials again but
/// looks the call up by `To`; when Twilio lists no such call the call fails with Twilio's
/// answer as its reason, and the reservation is released.
#[tokio::test]
async fn twilio_error_fails_the_call_and_releases() {
    let api = harness::worker().api();
    let user = api.register_user("t5xx").await.unwrap();
    // Verified while Twilio still answers (Verify shares the fake's faults).
    api.ensure_verified(&user, "+14155550100").await.unwrap();
    let faults = harness::worker().twilio.faults().clone();
    faults.set(Faults {
        http_status: Some(503),
        ..Default::default()
    });
    let id = api
        .trigger_call(&user, "brad", "+14155550100")
        .await
        .unwrap();
    // The create goes out from the alarm at once; then Twilio recovers.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    faults.reset();
    let deadline = Instant::now() + Duration::from_secs(45);
    let done: Value = loop {
        let r = api
            .get(&format!("/api/calls/{id}"), Some(&user.token))
            .await
            .unwrap();
        if r.body["call"]["status"] != "queued" || Instant::now() > deadline {
            break r.body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(done["call"]["status"], "failed", "{done}");
    let reason = done["call"]["status_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("503"),
        "reason names Twilio's answer: {reason}"
    );
    assert_eq!(api.credits(&user).await.unwrap(), 200);
}
