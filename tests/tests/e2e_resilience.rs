//! The voice path under failure and forced endings, each test on its own stack (faults
//! and kills would disturb other calls): Deepgram dropping mid-call, the relay dying
//! mid-call, a silent caller, and an admin ban ending a live call.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use cmb_tests::api::ApiClient;
use cmb_tests::fakes::faults::Faults;
use cmb_tests::fakes::twilio::{CallRecord, CalleeScript};
use cmb_tests::harness::VoiceStack;
use cmb_tests::sim::{SimScript, Speaker, Step, Utterance};
use serde_json::{json, Value};

/// Waits until the caller has heard `n` persona lines in full.
async fn wait_persona_lines(v: &VoiceStack, number: &str, n: usize) -> CallRecord {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(c) = v.twilio.calls().into_iter().find(|c| c.to == number) {
            if c.transcript
                .iter()
                .filter(|l| l.speaker == Speaker::Persona)
                .count()
                >= n
            {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "persona never spoke {n} lines");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The callee at `number` answers and then says nothing for a minute.
fn silent_callee(v: &VoiceStack, number: &str) {
    v.twilio.set_script(
        number,
        CalleeScript::answer(SimScript::new(vec![Step::Pause(60_000)])),
    );
}

/// Everything the callee at `number` heard.
fn heard_by(v: &VoiceStack, number: &str) -> String {
    v.twilio
        .calls()
        .into_iter()
        .find(|c| c.to == number)
        .unwrap()
        .heard_text
}

fn user_lines(body: &Value) -> Vec<String> {
    body["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["role"] == "user")
        .map(|t| t["text"].as_str().unwrap().to_string())
        .collect()
}

/// Deepgram dropping the connection mid-call: the relay reconnects, and the user's next
/// turn is still transcribed and answered.
#[tokio::test]
async fn deepgram_drop_mid_call_recovers() {
    let v = VoiceStack::start(vec![
        "Got it, first thing noted.".into(),
        "And the second one too.".into(),
    ]);
    let api = ApiClient::new(v.stack.worker_url());
    let user = api.register_user("dgdrop").await.unwrap();
    let number = "+16285550123";
    v.twilio.set_script(
        number,
        CalleeScript::answer(SimScript::new(vec![
            Step::WaitForPersonaToFinish { silence_ms: 700 },
            Step::Say(Utterance::text("first thing")),
            Step::WaitForPersonaToFinish { silence_ms: 700 },
            Step::Pause(2500),
            Step::Say(Utterance::text("second thing after the drop")),
            Step::WaitForPersonaToFinish { silence_ms: 700 },
            Step::HangUp,
        ])),
    );
    let id = api.trigger_call(&user, "alex", number).await.unwrap();
    // Greeting and the first reply heard: now cut Deepgram off.
    wait_persona_lines(&v, number, 2).await;
    let before = v.deepgram.connection_count();
    v.deepgram.faults().set(Faults {
        drop_after_ms: Some(1),
        ..Default::default()
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while v.deepgram.close_reasons().iter().all(Option::is_none) {
        assert!(Instant::now() < deadline, "the drop never happened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    v.deepgram.faults().reset();

    let done = api
        .wait_settled(&user, &id, Duration::from_secs(60))
        .await
        .unwrap();
    let lines = user_lines(&done);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("second thing after the drop")),
        "{lines:?}"
    );
    assert!(
        v.deepgram.connection_count() > before,
        "the relay reconnected to Deepgram"
    );
    let heard = heard_by(&v, number);
    assert!(
        heard.contains("And the second one too."),
        "the turn after the drop was answered: {heard}"
    );
}

/// The relay dying mid-call: what was said so far is stored and the call is settled.
#[tokio::test]
async fn relay_killed_mid_call_keeps_transcript_and_settles() {
    let mut v = VoiceStack::start(vec!["I'll remember that.".into()]);
    let api = ApiClient::new(v.stack.worker_url());
    let user = api.register_user("relaykill").await.unwrap();
    let number = "+16285550124";
    v.twilio.set_script(
        number,
        CalleeScript::answer(SimScript::new(vec![
            Step::WaitForPersonaToFinish { silence_ms: 700 },
            Step::Say(Utterance::text("remember this line")),
            Step::WaitForPersonaToFinish { silence_ms: 700 },
            Step::Pause(20_000),
            Step::HangUp,
        ])),
    );
    let id = api.trigger_call(&user, "alex", number).await.unwrap();
    wait_persona_lines(&v, number, 2).await;
    v.stack.kill("relay").unwrap();

    let done = api
        .wait_settled(&user, &id, Duration::from_secs(90))
        .await
        .unwrap();
    assert_eq!(done["call"]["status"], "completed", "{done}");
    let lines = user_lines(&done);
    assert!(
        lines.iter().any(|l| l.contains("remember this line")),
        "{lines:?}"
    );
    let persona: Vec<&str> = done["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["role"] == "assistant")
        .filter_map(|t| t["text"].as_str())
        .collect();
    assert!(
        persona.iter().any(|t| t.contains("I'll remember that.")),
        "{persona:?}"
    );
    let charged = done["call"]["cost_cents"].as_i64().unwrap();
    assert!(charged >= 25, "billed for the connected call: {charged}");
    // Twilio asked what to do once the stream died: the caller got an apology, not silence.
    let heard = heard_by(&v, number);
    assert!(
        heard.contains("Sorry, we lost the connection"),
        "fallback spoken: {heard}"
    );
    let me = api.get("/api/me", Some(&user.token)).await.unwrap();
    assert_eq!(
        me.body["user"]["credits"].as_i64().unwrap(),
        200 - charged,
        "reservation settled"
    );
}

/// A silent caller: the persona checks in once, then says goodbye and the call ends —
/// with the goodbye heard and no fallback apology after it.
#[tokio::test]
async fn idle_caller_gets_a_check_in_then_a_goodbye() {
    let extra =
        std::collections::BTreeMap::from([("CALL_IDLE_TIMEOUT_SECS".to_string(), "3".to_string())]);
    let v = VoiceStack::start_with(vec![], extra);
    let api = ApiClient::new(v.stack.worker_url());
    let user = api.register_user("idle").await.unwrap();
    let number = "+16285550125";
    silent_callee(&v, number);
    let id = api.trigger_call(&user, "alex", number).await.unwrap();
    let done = api
        .wait_settled(&user, &id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done["call"]["status"], "completed", "{done}");
    let heard = heard_by(&v, number);
    assert!(
        heard.contains("Are you still there?"),
        "check-in heard: {heard}"
    );
    assert!(heard.contains("I'll let you go"), "goodbye heard: {heard}");
    assert!(
        !heard.contains("Sorry, we lost the connection"),
        "no fallback after a goodbye: {heard}"
    );
    let persona: Vec<&str> = done["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["role"] == "assistant")
        .filter_map(|t| t["text"].as_str())
        .collect();
    assert!(
        persona.iter().any(|t| t.contains("Are you still there?")),
        "{persona:?}"
    );
}

/// Banning a user in the middle of a call ends it: the persona says a short goodbye the
/// caller hears, the call completes and settles, and the ban reports it as ended.
#[tokio::test]
async fn ban_ends_a_live_call_with_a_goodbye() {
    let v = VoiceStack::start(vec![]);
    let api = ApiClient::new(v.stack.worker_url());
    let user = api.register_user("banned-mid-call").await.unwrap();
    let admin = cmb_tests::harness::admin(&api).await;
    let number = "+16285550126";
    silent_callee(&v, number);
    let id = api.trigger_call(&user, "alex", number).await.unwrap();
    // The greeting was heard: the conversation is live.
    wait_persona_lines(&v, number, 1).await;

    let r = api.ban(&admin, &user.id, "abuse").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["ended_calls"], json!([id]), "{}", r.body);
    assert_eq!(r.body["canceled_calls"], json!([]), "{}", r.body);

    // The banned user's token no longer works; the admin reads the settled call.
    let done = api
        .wait_settled(&admin, &id, Duration::from_secs(40))
        .await
        .unwrap();
    assert_eq!(done["call"]["status"], "completed", "{done}");
    let heard = heard_by(&v, number);
    assert!(
        heard.contains("I have to end our call now"),
        "goodbye heard: {heard}"
    );
    assert!(
        !heard.contains("Sorry, we lost the connection"),
        "no fallback after a goodbye: {heard}"
    );
    let last = done["transcript"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["role"], "assistant", "{done}");
    assert!(
        last["text"]
            .as_str()
            .unwrap()
            .contains("I have to end our call now"),
        "{done}"
    );
}
