//! The voice path under failure and forced endings, each test on its own stack (faults
//! and kills would disturb other calls): Deepgram dropping mid-call, the relay dying
//! mid-call, a silent caller, an admin ban ending a live call, a stalled LLM, a
//! stream replayed to a second relay, and the relay drained by SIGTERM mid-call.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

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

/// The callee at `number` hears the greeting, waits `pause_ms`, asks "are you still
/// there", hears the answer and hangs up.
fn still_there_callee(v: &VoiceStack, number: &str, pause_ms: u64) {
    v.twilio.set_script(
        number,
        CalleeScript::answer(SimScript::new(vec![
            Step::WaitForPersonaToFinish { silence_ms: 700 },
            Step::Pause(pause_ms),
            Step::Say(Utterance::text("are you still there")),
            Step::WaitForPersonaToFinish { silence_ms: 700 },
            Step::HangUp,
        ])),
    );
}

/// A stream upgrade to the relay at `url` signed as Twilio signs it.
fn signed_stream_request(url: &str) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    let sig =
        cmb_core::twilio_sig::compute_signature(cmb_tests::harness::TWILIO_AUTH_TOKEN, url, &[]);
    req.headers_mut()
        .insert("X-Twilio-Signature", sig.parse().unwrap());
    req
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
    let api = v.api();
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
    // The relay's warning about the drop reached the operators' event log, with the call.
    let admin = cmb_tests::harness::admin_on(&api, &v.stack).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = api
            .get(
                &format!("/admin/events?call_id={id}&kind=relay."),
                Some(&admin.token),
            )
            .await
            .unwrap();
        let shipped = found.body["events"].as_array().is_some_and(|e| {
            e.iter()
                .any(|e| e["source"] == "relay" && e["level"] == "warn")
        });
        if shipped {
            break;
        }
        if Instant::now() >= deadline {
            let all = api
                .get("/admin/events?kind=relay.", Some(&admin.token))
                .await
                .unwrap();
            panic!(
                "no relay warning for the call: {} (all relay events: {})",
                found.body, all.body
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The relay dying mid-call: what was said so far is stored and the call is settled.
#[tokio::test]
async fn relay_killed_mid_call_keeps_transcript_and_settles() {
    let mut v = VoiceStack::start(vec!["I'll remember that.".into()]);
    let api = v.api();
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
    let api = v.api();
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
    let api = v.api();
    let user = api.register_user("banned-mid-call").await.unwrap();
    let admin = cmb_tests::harness::admin_on(&api, &v.stack).await;
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

/// An LLM that stalls before its first byte holds up neither Twilio nor the call: the
/// first stalled turn ends with the fallback line after the first-token deadline, and a
/// hang-up during the second stall is acknowledged at once and the call settles.
#[tokio::test]
async fn a_stalled_llm_holds_up_neither_twilio_nor_the_call() {
    const FIRST_TOKEN_MS: u64 = 6_000;
    let extra = std::collections::BTreeMap::from([(
        "LLM_FIRST_TOKEN_TIMEOUT_MS".to_string(),
        FIRST_TOKEN_MS.to_string(),
    )]);
    let v = VoiceStack::start_with(vec!["never heard".into()], extra);
    v.cerebras.faults().set(Faults {
        first_byte_delay_ms: 30_000,
        ..Default::default()
    });
    let api = v.api();
    let user = api.register_user("llmstall").await.unwrap();
    let number = "+16285550127";
    v.twilio.set_script(
        number,
        CalleeScript::answer(SimScript::new(vec![
            Step::WaitForPersonaToFinish { silence_ms: 700 },
            Step::Say(Utterance::text("first question")),
            Step::WaitForPersonaToFinish { silence_ms: 700 },
            Step::Say(Utterance::text("second question")),
            Step::Pause(2000),
            Step::HangUp,
        ])),
    );
    let id = api.trigger_call(&user, "alex", number).await.unwrap();
    let done = api
        .wait_settled(&user, &id, Duration::from_secs(90))
        .await
        .unwrap();
    assert_eq!(done["call"]["status"], "completed", "{done}");
    let heard = heard_by(&v, number);
    assert!(
        heard.contains("I lost my train of thought"),
        "the stalled turn ended with the fallback line: {heard}"
    );
    assert!(!heard.contains("never heard"), "{heard}");
    let lines = user_lines(&done);
    assert!(
        lines.iter().any(|l| l.contains("second question")),
        "{lines:?}"
    );

    let record = v
        .twilio
        .calls()
        .into_iter()
        .find(|c| c.to == number)
        .unwrap();
    let completed = record
        .callbacks
        .iter()
        .find(|c| c.param("CallStatus") == Some("completed"))
        .expect("a completed callback");
    let asked = v
        .cerebras
        .requests()
        .into_iter()
        // The last conversation request (the notes request after the call is not one).
        .rfind(|r| r.status == 200 && r.body["stream"] == true)
        .expect("the LLM was asked");
    // The hang-up came while the second request was still waiting for its first byte…
    assert!(
        asked.at <= completed.sent_at
            && completed.sent_at < asked.at + Duration::from_millis(FIRST_TOKEN_MS),
        "the hang-up did not land inside the stall: asked {:?}, hang-up {:?}",
        asked.at,
        completed.sent_at
    );
    // …and was answered without waiting for it (a held lock would wait seconds).
    assert!(
        matches!(completed.result, Ok(s) if (200..300).contains(&s)),
        "{completed:?}"
    );
    for cb in &record.callbacks {
        assert!(
            cb.elapsed < Duration::from_millis(1500),
            "{} answered in {:?}",
            cb.param("CallStatus").unwrap_or("?"),
            cb.elapsed
        );
    }
}

/// A stream start replayed to a second relay host during a live call (the nonce cache
/// is per process, so that relay accepts the token) is refused by the call's DO: the
/// impostor is closed with 1008, nothing is opened for it, and the real call goes on.
#[tokio::test]
async fn a_stream_replayed_to_another_relay_is_refused() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;

    let mut v = VoiceStack::start(vec!["Still here with you.".into()]);
    let second_relay = v.stack.start_another_relay().unwrap();
    let api = v.api();
    let user = api.register_user("replay").await.unwrap();
    let number = "+16285550128";
    still_there_callee(&v, number, 5000);
    let id = api.trigger_call(&user, "alex", number).await.unwrap();
    let live = wait_persona_lines(&v, number, 1).await;
    let stream = live.streams.first().expect("the real stream").clone();
    let deepgram_before = v.deepgram.connections().len();
    let elevenlabs_before = v.elevenlabs.connections().len();

    // Replay exactly what Twilio sent, with a valid signature for the second relay.
    let req = signed_stream_request(&second_relay);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let params: serde_json::Map<String, Value> = stream
        .custom_parameters
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let account = cmb_tests::harness::TWILIO_ACCOUNT_SID;
    let start = json!({"event":"start","sequenceNumber":"1","streamSid":stream.stream_sid,
        "start":{"accountSid":account,"streamSid":stream.stream_sid,"callSid":live.sid,
        "tracks":["inbound"],"customParameters":params,
        "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}});
    ws.send(Message::text(
        json!({"event":"connected","protocol":"Call","version":"1.0.0"}).to_string(),
    ))
    .await
    .unwrap();
    ws.send(Message::text(start.to_string())).await.unwrap();
    let close = cmb_tests::harness::wait_close_code(&mut ws, Duration::from_secs(15))
        .await
        .expect("the replayed stream was closed");
    assert_eq!(close, Some(1008));
    assert_eq!(v.deepgram.connections().len(), deepgram_before);
    assert_eq!(v.elevenlabs.connections().len(), elevenlabs_before);

    // The real call was not disturbed: the next turn is heard and answered.
    let done = api
        .wait_settled(&user, &id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done["call"]["status"], "completed", "{done}");
    let lines = user_lines(&done);
    assert!(
        lines.iter().any(|l| l.contains("are you still there")),
        "{lines:?}"
    );
    let heard = heard_by(&v, number);
    assert!(heard.contains("Still here with you."), "{heard}");
}

/// SIGTERM mid-call, as a container host stops a relay: `/health` turns 503 `draining`,
/// a new stream is refused, the live call goes on (the caller is heard and answered after
/// the signal), and the process exits 0 once that call has ended.
#[tokio::test]
async fn sigterm_drains_the_relay_then_it_exits_cleanly() {
    use tokio_tungstenite::tungstenite::Error as WsError;

    // Longer than the call, so the call ends by itself, not at the deadline.
    let mut v = VoiceStack::start_with_relay_env(
        vec!["Still here, after the signal.".into()],
        [("RELAY_DRAIN_SECS".to_owned(), "60".to_owned())].into(),
    );
    let base = v.stack.relay_url().unwrap();
    let health_url = format!("{base}/health");
    let relay = format!("{}/twilio", base.replace("http://", "ws://"));
    let api = v.api();
    let user = api.register_user("drain").await.unwrap();
    let number = "+16285550129";
    still_there_callee(&v, number, 3000);
    let id = api.trigger_call(&user, "alex", number).await.unwrap();
    wait_persona_lines(&v, number, 1).await;
    v.stack.terminate("relay").unwrap();

    // Draining: 503 `draining` on /health (the listener stays open to say so).
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        let res = reqwest::get(&health_url).await.unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("/health {status} answered {text:?}: {e}"));
        if status == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "never draining: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(health["status"], "draining", "{health}");
    assert_eq!(health["checks"]["active_calls"], 1, "{health}");

    // A new, correctly signed stream is refused before the upgrade.
    let req = signed_stream_request(&relay);
    match tokio_tungstenite::connect_async(req).await {
        Err(WsError::Http(res)) => {
            assert_eq!(res.status().as_u16(), 503);
            let body: Value =
                serde_json::from_slice(res.body().as_deref().unwrap_or(b"{}")).unwrap();
            assert_eq!(body["error"]["code"], "draining", "{body}");
        }
        other => panic!("a new stream was not refused: {other:?}"),
    }

    // The live call goes on: the caller's line after the signal is heard and answered.
    let done = api
        .wait_settled(&user, &id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done["call"]["status"], "completed", "{done}");
    assert!(
        user_lines(&done)
            .iter()
            .any(|l| l.contains("are you still there")),
        "{done}"
    );
    let heard = heard_by(&v, number);
    assert!(heard.contains("Still here, after the signal."), "{heard}");
    assert!(!heard.contains("Sorry, we lost the connection"), "{heard}");

    // And once the call has ended, the relay exits by itself, successfully.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = v.stack.exited("relay").unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "relay still running after its last call: {}",
            v.stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "relay exit: {status}\n{}", v.stack.logs());
}
