//! A whole call, end to end, on loopback: the real Worker (wrangler dev) and the real
//! media relay, with protocol-faithful fakes for Twilio (and the phone simulator as the
//! person who answers), Deepgram, ElevenLabs and Cerebras.
//!
//! trigger → fake Twilio dials → TwiML → relay → greeting heard → user turns answered →
//! barge-in → hang up → history with transcript, costs and settled credits.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use std::sync::OnceLock;
use std::time::Duration;

use cmb_tests::fakes::twilio;
use cmb_tests::harness::{self, VoiceStack, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN};
use cmb_tests::sim::{SimScript, Speaker, Step, Utterance};
use serde_json::json;

fn voice() -> &'static VoiceStack {
    static STACK: OnceLock<VoiceStack> = OnceLock::new();
    STACK.get_or_init(|| {
        VoiceStack::start(vec![
            "Nice! Legs today, then.".into(),
            LONG_REPLY.into(),
            "Sure, go ahead.".into(),
        ])
    })
}

/// A long reply for the turn the caller interrupts, so there is audio left to drop.
const LONG_REPLY: &str = "Great question! Start with three sets of ten squats, then lunges, then planks for a minute, and finish with a slow stretch for your hamstrings and calves.";

fn unique_number() -> String {
    let n = uuid::Uuid::new_v4().as_u128() % 10_000_000;
    format!("+1628{n:07}")
}

/// The product's promise in one test: greeting, two answered turns, a barge-in that
/// Twilio is told to `clear`, hang-up, and a stored transcript with only what was heard,
/// per-provider costs and settled credits.
#[tokio::test]
async fn a_whole_call_with_barge_in() {
    let v = voice();
    let api = v.api();
    let user = api.register_user("e2e").await.unwrap();
    let number = unique_number();
    let script = SimScript::new(vec![
        Step::WaitForPersonaToFinish { silence_ms: 700 },
        Step::Say(Utterance::text("what should I train today")),
        Step::WaitForPersonaToFinish { silence_ms: 700 },
        Step::Say(Utterance::text("give me a full workout")),
        Step::InterruptAfterMs(600),
        Step::Say(Utterance::text("wait a second")),
        Step::WaitForPersonaToFinish { silence_ms: 700 },
        Step::HangUp,
    ]);
    v.twilio
        .set_script(number.clone(), twilio::CalleeScript::answer(script));

    let id = api.trigger_call(&user, "brad", &number).await.unwrap();

    let done = api
        .wait_settled(&user, &id, Duration::from_secs(90))
        .await
        .unwrap();
    let fake = v
        .twilio
        .calls()
        .into_iter()
        .find(|c| c.to == number)
        .unwrap();
    let heard = fake.heard_text.clone();
    assert_eq!(
        done["call"]["status"], "completed",
        "{done}\nheard: {heard}\n{:#?}",
        fake.transcript
    );

    // The caller heard the AI disclosure first (the first call to this number), then
    // the greeting and the first reply in full.
    assert!(
        heard.trim_start().starts_with(harness::VOICE_AI_DISCLOSURE),
        "disclosure first: {heard}"
    );
    assert!(
        heard.contains("Ready to crush it today"),
        "greeting heard: {heard}"
    );
    assert!(
        heard.contains("Nice! Legs today, then."),
        "first reply heard: {heard}"
    );
    // The barge-in: Twilio was told to clear, and the rest of the long reply never played.
    let stream = fake.streams.first().expect("a media stream");
    assert!(!stream.clears.is_empty(), "a clear reached Twilio");
    assert!(
        !heard.contains("calves"),
        "the interrupted reply was cut: {heard}"
    );

    let transcript = done["transcript"].as_array().unwrap();
    let texts: Vec<(&str, &str, bool)> = transcript
        .iter()
        .map(|t| {
            (
                t["role"].as_str().unwrap(),
                t["text"].as_str().unwrap(),
                t["interrupted"].as_bool().unwrap(),
            )
        })
        .collect();
    let user_lines: Vec<&str> = texts
        .iter()
        .filter(|t| t.0 == "user")
        .map(|t| t.1)
        .collect();
    assert!(
        user_lines
            .iter()
            .any(|l| l.contains("what should I train today")),
        "{texts:?}"
    );
    assert!(
        user_lines
            .iter()
            .any(|l| l.contains("give me a full workout")),
        "{texts:?}"
    );
    let interrupted: Vec<_> = texts.iter().filter(|t| t.0 == "assistant" && t.2).collect();
    assert_eq!(
        interrupted.len(),
        1,
        "exactly one interrupted persona turn: {texts:?}"
    );
    let cut = interrupted[0].1;
    assert!(
        LONG_REPLY.starts_with(cut.trim_end()),
        "stored text is what was played: {cut:?}"
    );
    assert!(cut.len() < LONG_REPLY.len(), "and only that: {cut:?}");

    // Costs: every provider has a line; credits settled against the reservation.
    let providers: Vec<&str> = done["costs"]["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["provider"].as_str().unwrap())
        .collect();
    for p in ["twilio", "deepgram", "llm", "elevenlabs"] {
        assert!(providers.contains(&p), "{p} cost line: {providers:?}");
    }
    eprintln!(
        "stored transcript: {texts:#?}\ncosts: {}\nheard: {heard}",
        done["costs"]
    );
    // Latencies: the caller's own detail has one row per answered turn, with the time
    // from the end of the turn to the first reply audio.
    let latencies = done["latencies"]
        .as_array()
        .expect("latencies in the detail");
    assert!(
        latencies.len() >= 2,
        "a row per answered turn: {latencies:?}"
    );
    assert!(
        latencies.iter().any(|l| l["end_of_turn_to_first_audio_ms"]
            .as_i64()
            .is_some_and(|ms| ms > 0)),
        "{latencies:?}"
    );
    let charged = done["call"]["cost_cents"].as_i64().unwrap();
    assert!(charged >= 65, "at least base + one minute: {charged}");
    assert_eq!(api.credits(&user).await.unwrap(), 200 - charged);

    // The simulator's own view agrees that the persona spoke and the caller spoke.
    assert!(fake
        .transcript
        .iter()
        .any(|l| l.speaker == Speaker::Persona));
    assert!(fake.transcript.iter().any(|l| l.speaker == Speaker::Caller));
    assert!(v
        .deepgram
        .connections()
        .iter()
        .all(|c| c.query.iter().any(|(k, v)| k == "encoding" && v == "mulaw")));
    assert!(!v.elevenlabs.connections().is_empty());
    assert!(!v.cerebras.requests().is_empty());

    // A second call to the same number opens with the greeting alone: its listener has
    // heard the disclosure.
    let admin = harness::admin_on(&api, &v.stack).await;
    let r = api
        .post(
            &format!("/admin/users/{}/credits", user.id),
            Some(&admin.token),
            &json!({ "amount": 500, "reason": "second call" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    v.twilio.set_script(
        number.clone(),
        twilio::CalleeScript::answer(SimScript::new(vec![
            Step::WaitForPersonaToFinish { silence_ms: 700 },
            Step::HangUp,
        ])),
    );
    let second = api.trigger_call(&user, "brad", &number).await.unwrap();
    api.wait_settled(&user, &second, Duration::from_secs(60))
        .await
        .unwrap();
    let again = v
        .twilio
        .calls()
        .into_iter()
        .rfind(|c| c.to == number)
        .unwrap()
        .heard_text;
    assert!(again.contains("Ready to crush it today"), "{again}");
    assert!(
        !again.contains(harness::VOICE_AI_DISCLOSURE),
        "the disclosure again: {again}"
    );
}

/// A forged stream token is refused by the relay with close 1008 and nothing is opened.
#[tokio::test]
async fn forged_stream_token_is_refused() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let v = voice();
    let relay_public = v.stack.relay_env().get("RELAY_PUBLIC_URL").unwrap().clone();
    let dg_before = v.deepgram.connections().len();
    let mut req = relay_public.clone().into_client_request().unwrap();
    let sig = cmb_core::twilio_sig::compute_signature(TWILIO_AUTH_TOKEN, &relay_public, &[]);
    req.headers_mut()
        .insert("X-Twilio-Signature", sig.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::text(
        json!({"event":"connected","protocol":"Call","version":"1.0.0"}).to_string(),
    ))
    .await
    .unwrap();
    let forged = cmb_core::stream_token::mint(
        "not-the-relay-secret-but-long-enough-1234567890",
        "call-x",
        i64::MAX / 2,
        "n1",
    );
    let start = json!({"event":"start","sequenceNumber":"1","streamSid":"MZ00000000000000000000000000000001",
        "start":{"accountSid":TWILIO_ACCOUNT_SID,"streamSid":"MZ00000000000000000000000000000001","callSid":"CA00000000000000000000000000000001",
        "tracks":["inbound"],"customParameters":{"callId":"call-x","streamToken":forged},
        "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}});
    ws.send(Message::text(start.to_string())).await.unwrap();
    let close = harness::wait_close_code(&mut ws, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(close, Some(1008));
    assert_eq!(
        v.deepgram.connections().len(),
        dg_before,
        "nothing opened for a forged token"
    );

    // And an upgrade without a valid Twilio signature never becomes a WebSocket.
    let mut bad = relay_public.into_client_request().unwrap();
    bad.headers_mut()
        .insert("X-Twilio-Signature", "bogus".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(bad).await.is_err());
}

/// Its own stack: the conversation replies are the fake's echo, so this test takes no
/// scripted reply from the other tests.
fn memory_voice() -> &'static VoiceStack {
    static STACK: OnceLock<VoiceStack> = OnceLock::new();
    STACK.get_or_init(|| VoiceStack::start(Vec::new()))
}

/// One call to `number` in which the caller says `line` and hangs up; its settled view.
async fn call_saying(v: &VoiceStack, user: &cmb_tests::api::TestUser, number: &str, line: &str) {
    v.twilio.set_script(
        number.to_owned(),
        twilio::CalleeScript::answer(SimScript::new(vec![
            Step::WaitForPersonaToFinish { silence_ms: 700 },
            Step::Say(Utterance::text(line)),
            Step::WaitForPersonaToFinish { silence_ms: 700 },
            Step::HangUp,
        ])),
    );
    let api = v.api();
    let id = api.trigger_call(user, "brad", number).await.unwrap();
    let done = api
        .wait_settled(user, &id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done["call"]["status"], "completed", "{done}");
    assert_eq!(done["call"]["requested_by"], "user", "{done}");
}

/// The memory once it has folded in `calls` calls (it is written after settlement, in
/// the background).
async fn memory_after(
    v: &VoiceStack,
    user: &cmb_tests::api::TestUser,
    calls: i64,
) -> serde_json::Value {
    let api = v.api();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let r = api
            .get("/api/personas/brad/memory", Some(&user.token))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        if r.body["memory"]["calls"] == calls {
            return r.body["memory"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "memory never folded in call {calls}: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The user message of the notes request (non-streaming) made after the call in which
/// the caller said `line`: the previous notes and that call's transcript.
fn notes_prompt_after(v: &VoiceStack, line: &str) -> String {
    let caller = format!("Caller: {line}");
    v.cerebras
        .requests()
        .into_iter()
        .filter(|r| r.body["stream"] == false)
        .find_map(|r| {
            r.body["messages"][1]["content"]
                .as_str()
                .filter(|c| c.contains(&caller))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("no notes request with {caller:?}"))
}

/// The system prompt of the conversation request in which the caller said `line`.
fn system_prompt_when(v: &VoiceStack, line: &str) -> String {
    let request = v
        .cerebras
        .requests()
        .into_iter()
        .filter(|r| r.body["stream"] == true)
        .find(|r| {
            r.body["messages"].as_array().is_some_and(|m| {
                m.iter()
                    .any(|m| m["role"] == "user" && m["content"] == line)
            })
        })
        .unwrap_or_else(|| panic!("no conversation request with {line:?}"));
    request.body["messages"][0]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The persona remembers the caller: after a call the LLM is asked (non-streaming) for
/// notes made of the previous notes and the transcript, they are stored, and the next
/// call's system prompt carries them with the day of the call; a second call folds in;
/// after DELETE the next call starts fresh. The prompt also states the caller's local
/// time in their zone.
#[tokio::test]
async fn the_persona_remembers_the_caller_across_calls() {
    let v = memory_voice();
    let api = v.api();
    let user = api.register_user("memory").await.unwrap();
    let number = unique_number();
    let admin = harness::admin_on(&api, &v.stack).await;
    let r = api
        .post(
            &format!("/admin/users/{}/credits", user.id),
            Some(&admin.token),
            &json!({ "amount": 1000, "reason": "three calls" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    let zone = api
        .raw(
            reqwest::Method::PATCH,
            "/api/me",
            Some(&user.token),
            Some((
                "application/json",
                br#"{"timezone":"Australia/Sydney"}"#.to_vec(),
            )),
        )
        .await
        .unwrap();
    assert_eq!(zone.status, 200, "{}", zone.body);

    let first = "my name is sam and i want to run five kilometres by friday";
    call_saying(v, &user, &number, first).await;
    let prompt = system_prompt_when(v, first);
    assert!(
        !prompt.contains("What you remember about this caller"),
        "a first call has nothing to remember"
    );
    // The persona knows when it is for the caller: their zone's local date and time.
    assert!(
        prompt.contains("For the caller it is now ")
            && prompt.contains("(time zone Australia/Sydney)."),
        "{prompt}"
    );
    let memory = memory_after(v, &user, 1).await;
    let summary = memory["summary"].as_str().unwrap().to_owned();
    // The fake's echo answers with the prompt's last user message: the transcript.
    assert!(summary.contains("five kilometres"), "{summary}");
    assert!(summary.chars().count() <= 1200, "{summary}");
    assert!(memory["updated_at"].is_string() && memory["last_call_at"].is_string());
    assert!(notes_prompt_after(v, first).starts_with("Previous notes: none"));

    let second = "hello again it is sam checking in";
    call_saying(v, &user, &number, second).await;
    let prompt = system_prompt_when(v, second);
    let day = &memory["last_call_at"].as_str().unwrap()[..10];
    assert!(
        prompt.contains(&format!(
            "What you remember about this caller from earlier calls (the last one on {day}):\n{summary}"
        )),
        "{prompt}"
    );
    let folded = memory_after(v, &user, 2).await;
    assert!(notes_prompt_after(v, second)
        .contains(&format!("Previous notes (last call on {day}):\n{summary}")));
    assert!(folded["summary"].as_str().unwrap().contains(second));

    let gone = api
        .delete("/api/personas/brad/memory", Some(&user.token))
        .await
        .unwrap();
    assert_eq!(gone.status, 204);
    let third = "do you remember me at all";
    call_saying(v, &user, &number, third).await;
    assert!(
        !system_prompt_when(v, third).contains("What you remember about this caller"),
        "a forgotten caller starts fresh"
    );
}

fn forgetting_voice() -> &'static VoiceStack {
    static STACK: OnceLock<VoiceStack> = OnceLock::new();
    STACK.get_or_init(|| VoiceStack::start(Vec::new()))
}

/// The notes request made after the call in which the caller said `line`, once it has
/// been answered.
async fn notes_request_answered(v: &VoiceStack, line: &str) -> u16 {
    let caller = format!("Caller: {line}");
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let status = v.cerebras.requests().into_iter().find_map(|r| {
            let content = r.body["messages"][1]["content"].as_str()?.to_owned();
            (r.body["stream"] == false && content.contains(&caller)).then_some(r.status)
        });
        if let Some(status) = status {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no notes request after {line:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The notes are never worse for a failure, and forgetting wins: a notes request that
/// fails leaves the old notes as they were, and a `DELETE` made while a call's notes are
/// still being written is not undone by that write.
#[tokio::test]
async fn failed_notes_keep_the_old_ones_and_forgetting_wins_a_race() {
    let v = forgetting_voice();
    let api = v.api();
    let user = api.register_user("forget").await.unwrap();
    let number = unique_number();
    let admin = harness::admin_on(&api, &v.stack).await;
    let r = api
        .post(
            &format!("/admin/users/{}/credits", user.id),
            Some(&admin.token),
            &json!({ "amount": 1000, "reason": "three calls" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    let first = "my name is kim and i swim on tuesdays";
    call_saying(v, &user, &number, first).await;
    let kept = memory_after(v, &user, 1).await;
    assert!(kept["summary"]
        .as_str()
        .unwrap()
        .contains("swim on tuesdays"));

    // The notes LLM fails after the second call: the first call's notes stay.
    v.cerebras
        .plan_notes(cmb_tests::fakes::cerebras::NotesPlan::Fail(500));
    let second = "i could not swim this week";
    call_saying(v, &user, &number, second).await;
    assert_eq!(notes_request_answered(v, second).await, 500);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let after = api
        .get("/api/personas/brad/memory", Some(&user.token))
        .await
        .unwrap();
    assert_eq!(
        after.body["memory"], kept,
        "a failed update changes nothing"
    );

    // The third call's notes are held at the LLM; the caller asks to be forgotten then.
    v.cerebras
        .plan_notes(cmb_tests::fakes::cerebras::NotesPlan::Hold(
            Duration::from_secs(3),
        ));
    let third = "please forget everything about me";
    call_saying(v, &user, &number, third).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while v.cerebras.holding() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the notes request never came"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone = api
        .delete("/api/personas/brad/memory", Some(&user.token))
        .await
        .unwrap();
    assert_eq!(gone.status, 204);
    assert_eq!(notes_request_answered(v, third).await, 200);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let after = api
        .get("/api/personas/brad/memory", Some(&user.token))
        .await
        .unwrap();
    assert_eq!(
        after.body["memory"]["summary"],
        serde_json::Value::Null,
        "the notes written after the DELETE did not bring the caller back: {}",
        after.body
    );
}

/// What `cargo xtask dev` shows with simulated providers (the same demo scripts and the
/// same acting fake LLM as the `fakes` binary): the caller asks to be called back in two
/// minutes, the persona books it and confirms, then says goodbye and hangs up; on the
/// callback it opens with what it remembered. The callback is dialled here at once
/// rather than after two minutes; everything else is the demo as it runs.
#[tokio::test]
async fn the_dev_demo_books_a_callback_and_remembers_on_it() {
    let v = demo_voice();
    let api = v.api();
    let user = api.register_user("demo").await.unwrap();
    let number = unique_number();
    let before = std::time::SystemTime::now();
    let id = api.trigger_call(&user, "brad", &number).await.unwrap();
    let done = api
        .wait_settled(&user, &id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done["call"]["status"], "completed", "{done}");
    let record = v
        .twilio
        .calls()
        .into_iter()
        .find(|c| c.to == number)
        .unwrap();
    assert!(
        record
            .heard_text
            .contains("I'll call you back in 2 minutes")
            && record.heard_text.contains("Done! I'll call you back")
            && record.heard_text.contains("Talk soon, bye!"),
        "booked, confirmed and said goodbye: {}",
        record.heard_text
    );
    assert!(
        !record
            .sim_events
            .iter()
            .any(|e| matches!(e, cmb_tests::sim::SimEvent::HungUp { .. })),
        "the persona hung up, not the caller"
    );
    let history = api
        .get("/api/calls/history", Some(&user.token))
        .await
        .unwrap();
    let callback = history.body["calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["requested_by"] == "persona")
        .unwrap_or_else(|| panic!("no callback booked: {}", history.body))
        .clone();
    let at = time::OffsetDateTime::parse(
        callback["scheduled_time"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
    .unix_timestamp();
    let asked = before
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (asked + 120..asked + 180).contains(&at),
        "about two minutes out: {callback}"
    );
    // The notes kept the goal; the callback (dialled now) opens with it.
    let memory = memory_after(v, &user, 1).await;
    assert!(
        memory["summary"]
            .as_str()
            .unwrap()
            .contains("run five kilometres by Friday"),
        "{memory}"
    );
    let again = api.trigger_call(&user, "brad", &number).await.unwrap();
    api.wait_settled(&user, &again, Duration::from_secs(60))
        .await
        .unwrap();
    let second = v
        .twilio
        .calls()
        .into_iter()
        .filter(|c| c.to == number)
        .nth(1)
        .unwrap();
    assert!(
        second
            .heard_text
            .contains("Good to hear from you again! I remember:")
            && second.heard_text.contains("five kilometres by Friday"),
        "the callback opens with the remembered goal: {}",
        second.heard_text
    );
}

fn demo_voice() -> &'static VoiceStack {
    static STACK: OnceLock<VoiceStack> = OnceLock::new();
    STACK.get_or_init(VoiceStack::start_demo)
}

/// The persona's replies on the call the caller ends early: it books a callback, then,
/// with the booking's result, confirms it, says goodbye and ends the call.
const BOOKS_A_CALLBACK: &str =
    "Sure thing! <tool_call>schedule_callback {\"delay_minutes\":10}</tool_call>";
const CONFIRMS_AND_ENDS: &str = "Booked, I will call you back in ten minutes. Drive safe, bye! <tool_call>end_call {\"reason\":\"the caller is driving\"}</tool_call>";

fn ending_voice() -> &'static VoiceStack {
    static STACK: OnceLock<VoiceStack> = OnceLock::new();
    STACK.get_or_init(|| VoiceStack::start(vec![BOOKS_A_CALLBACK.into(), CONFIRMS_AND_ENDS.into()]))
}

/// "Call me back in ten minutes, I'm driving": the persona books the callback
/// (`schedule_callback`, streamed as a tool call), gets the booking back as a `tool`
/// message, confirms it aloud, and ends the call itself (`end_call`) once its goodbye has
/// been heard, without the caller hanging up. The callback is an ordinary scheduled call
/// to the same number with the same persona, `requested_by: persona`.
#[tokio::test]
async fn the_persona_books_a_callback_and_hangs_up_after_its_goodbye() {
    let v = ending_voice();
    let api = v.api();
    let user = api.register_user("driver").await.unwrap();
    let number = unique_number();
    v.twilio.set_script(
        number.clone(),
        twilio::CalleeScript::answer(SimScript::new(vec![
            Step::WaitForPersonaToFinish { silence_ms: 700 },
            Step::Say(Utterance::text("call me back in ten minutes i am driving")),
            // The caller would stay on the line for a long while: the persona ends it.
            Step::Pause(45_000),
            Step::HangUp,
        ])),
    );
    let before = std::time::SystemTime::now();
    let id = api.trigger_call(&user, "brad", &number).await.unwrap();
    let done = api
        .wait_settled(&user, &id, Duration::from_secs(40))
        .await
        .unwrap();
    let after = std::time::SystemTime::now();
    assert_eq!(done["call"]["status"], "completed", "{done}");
    let record = v
        .twilio
        .calls()
        .into_iter()
        .find(|c| c.to == number)
        .unwrap();
    assert!(
        record
            .heard_text
            .contains("I will call you back in ten minutes")
            && record.heard_text.contains("Drive safe, bye"),
        "the confirmation and goodbye were heard to their end: {}",
        record.heard_text
    );
    assert!(
        !record
            .sim_events
            .iter()
            .any(|e| matches!(e, cmb_tests::sim::SimEvent::HungUp { .. })),
        "the persona hung up, not the caller: {:?}",
        record.sim_events
    );
    let said: Vec<&str> = done["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["role"] == "assistant")
        .map(|t| t["text"].as_str().unwrap())
        .collect();
    assert!(
        said.iter().all(|t| !t.contains("tool_call"))
            && said.iter().any(|t| t.contains("Drive safe, bye!")),
        "{said:?}"
    );

    // The callback: a scheduled call ten minutes out, same number and persona.
    let history = api
        .get("/api/calls/history", Some(&user.token))
        .await
        .unwrap();
    let callback = history.body["calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["requested_by"] == "persona")
        .unwrap_or_else(|| panic!("no callback booked: {}", history.body))
        .clone();
    assert_eq!(callback["status"], "scheduled", "{callback}");
    assert_eq!(callback["phone_number"], number);
    assert_eq!(callback["persona_id"], "brad");
    let at = time::OffsetDateTime::parse(
        callback["scheduled_time"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    };
    let at = at.unix_timestamp();
    assert!(
        secs(before) + 600 - 1 <= at && at <= secs(after) + 600,
        "ten minutes from the request: {callback}"
    );

    // What the model saw: both tools offered, then its call answered by a tool message.
    let conversation: Vec<_> = v
        .cerebras
        .requests()
        .into_iter()
        .filter(|r| r.body["stream"] == true)
        .collect();
    let offered = |r: &cmb_tests::fakes::cerebras::RequestRecord| -> Vec<String> {
        r.body["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["function"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(offered(&conversation[0]), ["end_call", "schedule_callback"]);
    let confirm = conversation
        .iter()
        .find(|r| {
            r.body["messages"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["role"] == "tool")
        })
        .expect("the booking went back to the model");
    // The confirmation may hang up, but not book again: tool rounds never chain.
    assert_eq!(offered(confirm), ["end_call"]);
    let messages = confirm.body["messages"].as_array().unwrap();
    let tool = messages.iter().find(|m| m["role"] == "tool").unwrap();
    let result: serde_json::Value =
        serde_json::from_str(tool["content"].as_str().unwrap()).unwrap();
    assert_eq!(result["scheduled"], true, "{tool}");
    assert_eq!(
        result["at"],
        callback["scheduled_time"]
            .as_str()
            .unwrap()
            .replace(".000Z", "Z")
    );
    let asked = messages
        .iter()
        .find(|m| m["role"] == "assistant" && m["tool_calls"].is_array())
        .unwrap();
    assert_eq!(asked["tool_calls"][0]["id"], tool["tool_call_id"]);
    assert_eq!(
        asked["tool_calls"][0]["function"]["name"],
        "schedule_callback"
    );

    let cancel = api
        .delete(
            &format!("/api/calls/{}", callback["id"].as_str().unwrap()),
            Some(&user.token),
        )
        .await
        .unwrap();
    assert_eq!(cancel.status, 200, "{}", cancel.body);
}

/// An answering machine (Twilio answers after its beep, `DetectMessageEnd`): the persona
/// leaves its short voicemail in its own voice through the relay, then hangs up itself;
/// the call is charged like any connected call, and its history shows
/// `answered_by: machine_end_beep` and the message left.
#[tokio::test]
async fn a_machine_gets_a_voicemail_in_the_personas_voice() {
    let v = memory_voice();
    let api = v.api();
    let user = api.register_user("voicemail").await.unwrap();
    let number = unique_number();
    v.twilio.set_script(
        number.clone(),
        twilio::CalleeScript::Answer(twilio::Answer {
            after_rings: 1,
            answered_by: twilio::AnsweredBy::MachineEndBeep,
            // A machine records, silent, until the line drops.
            session: SimScript::new(vec![Step::Pause(45_000), Step::HangUp]),
            duration_override_secs: None,
        }),
    );
    let id = api.trigger_call(&user, "brad", &number).await.unwrap();
    let done = api
        .wait_settled(&user, &id, Duration::from_secs(40))
        .await
        .unwrap();
    let call = &done["call"];
    assert_eq!(call["status"], "completed", "{done}");
    assert_eq!(call["answered_by"], "machine_end_beep", "{done}");
    assert_eq!(call["status_reason"], "Voicemail left.", "{done}");
    let secs = u32::try_from(call["duration_seconds"].as_i64().unwrap()).unwrap();
    assert_eq!(
        call["cost_cents"].as_i64().unwrap(),
        cmb_core::pricing::call_charge_credits(secs, true),
        "charged like a connected call: {done}"
    );
    let said: Vec<&str> = done["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert_eq!(t["role"], "assistant", "only the persona spoke: {done}");
            t["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].contains("it's Brad") && said[0].contains("try you again"),
        "{said:?}"
    );

    let record = v
        .twilio
        .calls()
        .into_iter()
        .find(|c| c.to == number)
        .unwrap();
    let heard = &record.heard_text;
    assert!(
        heard.trim_start().starts_with(harness::VOICE_AI_DISCLOSURE),
        "the first call to a number discloses the AI, on a voicemail too: {heard}"
    );
    assert!(
        heard.contains("Sorry I missed you") && heard.contains("Talk later"),
        "the whole voicemail was recorded: {heard}"
    );
    assert!(
        !heard.contains("Ready to crush it"),
        "the greeting is not left on a machine: {heard}"
    );
    assert!(
        !record
            .sim_events
            .iter()
            .any(|e| matches!(e, cmb_tests::sim::SimEvent::HungUp { .. })),
        "the persona hung up, not the machine: {:?}",
        record.sim_events
    );
}

/// The greeting is synthesized while the phone rings (ElevenLabs' HTTP endpoint, through
/// the relay) and plays from the stream's start: never through the TTS socket, heard in
/// full, in the transcript as heard. A second call with the same greeting (same persona,
/// voice and text: a first call to another number) comes from the relay's cache.
#[tokio::test]
async fn the_greeting_is_synthesized_while_the_phone_rings_and_cached() {
    let v = voice();
    let api = v.api();
    let user = api.register_user("greeting").await.unwrap();
    let is_sarahs = |text: &str| text.contains("Sarah");
    for round in 0..2 {
        let number = unique_number();
        let script = SimScript::new(vec![
            Step::WaitForPersonaToFinish { silence_ms: 700 },
            Step::HangUp,
        ]);
        // A phone rings for seconds. The session reads the persona before staging, and on
        // Postgres with the whole suite running those reads once took over 5 s (then the
        // greeting rightly went through the socket): ten 1 s rings leave ample time.
        v.twilio.set_script(
            number.clone(),
            twilio::CalleeScript::Answer(twilio::Answer {
                after_rings: 10,
                answered_by: twilio::AnsweredBy::Human,
                session: script,
                duration_override_secs: None,
            }),
        );
        let id = api.trigger_call(&user, "sarah", &number).await.unwrap();
        let done = api
            .wait_settled(&user, &id, Duration::from_secs(60))
            .await
            .unwrap();
        let record = v
            .twilio
            .calls()
            .into_iter()
            .find(|c| c.to == number)
            .unwrap();
        let stream = record.streams.first().expect("a media stream");
        assert!(
            stream
                .custom_parameters
                .contains(&("greeting".to_owned(), "prepared".to_owned())),
            "a person's TwiML asks for the staged greeting: {:?}",
            stream.custom_parameters
        );
        let synthesized: Vec<_> = v
            .elevenlabs
            .http_syntheses()
            .into_iter()
            .filter(|s| is_sarahs(&s.text))
            .collect();
        assert_eq!(
            synthesized.len(),
            1,
            "round {round}: synthesized once, then cached: {synthesized:?}"
        );
        let greeting = &synthesized[0];
        assert_eq!(greeting.output_format, "ulaw_8000");
        assert!(greeting.text.starts_with(harness::VOICE_AI_DISCLOSURE));
        assert!(
            !v.elevenlabs
                .generations()
                .iter()
                .any(|g| is_sarahs(&g.text)),
            "round {round}: the greeting never went through the TTS socket"
        );
        let heard = record.heard_text.trim();
        assert!(
            heard.contains(greeting.text.trim()),
            "round {round}: the whole greeting was heard: {heard:?}"
        );
        let first = &done["transcript"][0];
        assert_eq!(first["role"], "assistant", "{done}");
        assert_eq!(first["text"], greeting.text.trim(), "{done}");
        assert_eq!(first["interrupted"], false, "{done}");
    }
}

/// A call to a fresh number answered by `script`: the fake Twilio's record once the call
/// ended (it must within 45 s; a call that goes on fails with what the callee heard) and
/// the settled call view.
async fn scripted_call(
    v: &VoiceStack,
    user: &cmb_tests::api::TestUser,
    script: SimScript,
) -> (serde_json::Value, twilio::CallRecord) {
    let api = v.api();
    let number = unique_number();
    v.twilio
        .set_script(number.clone(), twilio::CalleeScript::answer(script));
    let id = api.trigger_call(user, "brad", &number).await.unwrap();
    let sid = loop {
        if let Some(c) = v.twilio.calls().into_iter().find(|c| c.to == number) {
            break c.sid;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let fake = match v.twilio.wait_finished(&sid, Duration::from_secs(45)).await {
        Ok(record) => record,
        Err(_) => {
            let record = v.twilio.calls().into_iter().find(|c| c.sid == sid);
            panic!(
                "the call went on; callee's transcript and clears: {:#?}",
                record.map(|c| (c.transcript, c.streams.first().map(|s| s.clears.len())))
            )
        }
    };
    let done = api
        .wait_settled(user, &id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done["call"]["status"], "completed", "{done}");
    (done, fake)
}

/// The last user message of an LLM request.
fn last_user_message(body: &serde_json::Value) -> Option<String> {
    body["messages"]
        .as_array()?
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .map(str::to_owned)
}

/// A caller who pauses mid-sentence: the relay finalizes the pause early and the DO
/// speculates on "so"; the caller goes on, that speculation is dropped unheard, and the
/// pause at the end of the sentence is speculated on again and becomes the reply (one
/// request for the whole turn, no other). The conversation replies are the fake's echo.
#[tokio::test]
async fn a_pause_mid_sentence_is_speculated_on_and_only_the_confirmed_reply_is_heard() {
    let v = memory_voice();
    let api = v.api();
    let user = api.register_user("spec").await.unwrap();
    let script = SimScript::new(vec![
        Step::WaitForPersonaToFinish { silence_ms: 700 },
        Step::Say(Utterance::text("so")),
        // Longer than the relay's 80 ms before Finalize, well short of 300 ms
        // endpointing.
        Step::Pause(160),
        Step::Say(Utterance::text("what about legs today")),
        Step::WaitForPersonaToFinish { silence_ms: 700 },
        Step::HangUp,
    ]);
    let (done, fake) = scripted_call(v, &user, script).await;
    let heard = fake.heard_text.clone();

    let whole = "so what about legs today";
    let asked: Vec<String> = v
        .cerebras
        .requests()
        .iter()
        .filter_map(|r| last_user_message(&r.body))
        .filter(|m| m == "so" || m == whole)
        .collect();
    assert_eq!(
        asked,
        ["so", whole],
        "one speculation per pause, in order; transcript: {}",
        done["transcript"]
    );
    assert!(
        heard.contains(&format!("You said: {whole}.")),
        "the confirmed reply was heard: {heard}"
    );
    assert!(
        !heard.contains("You said: so."),
        "the dropped speculation was never spoken: {heard}"
    );
    let users: Vec<&str> = done["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["role"] == "user")
        .filter_map(|t| t["text"].as_str())
        .collect();
    assert_eq!(users, [whole], "one turn, all of it");

    // Deepgram was asked to finalize at each pause.
    let conn = v
        .deepgram
        .connections()
        .into_iter()
        .find(|c| c.finals.iter().any(|f| f.contains("legs today")))
        .expect("the call's Deepgram connection");
    let finalizes = conn.controls.iter().filter(|c| *c == "Finalize").count();
    assert!(finalizes >= 2, "controls: {:?}", conn.controls);
}

/// A callee who never says a word: coughing through the greeting, or silent on a line
/// that echoes the persona back 12 dB down. Neither interrupts the persona (no `clear`,
/// the greeting heard whole) nor becomes a turn it answers.
#[tokio::test]
async fn coughs_and_line_echo_never_interrupt_the_persona() {
    let v = memory_voice();
    let api = v.api();
    let coughs = SimScript::new(vec![
        Step::InterruptAfterMs(800),
        Step::Say(Utterance::Cough(300)),
        Step::Pause(600),
        Step::Say(Utterance::Cough(300)),
        Step::WaitForPersonaToFinish { silence_ms: 1500 },
        Step::HangUp,
    ]);
    let echo = SimScript::new(vec![
        Step::WaitForPersonaToFinish { silence_ms: 1500 },
        Step::HangUp,
    ])
    .with_echo(cmb_tests::sim::Echo {
        delay_ms: 60,
        loss_db: 12.0,
    });
    for (kind, script) in [("coughs", coughs), ("echo", echo)] {
        let user = api.register_user(kind).await.unwrap();
        let (done, fake) = scripted_call(v, &user, script).await;
        let stream = fake.streams.first().expect("a media stream");
        assert!(stream.clears.is_empty(), "{kind}: a false barge-in");
        assert!(
            fake.heard_text.contains("What did you train this week?"),
            "{kind}: the greeting was heard whole: {}",
            fake.heard_text
        );
        let roles: Vec<&str> = done["transcript"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["role"].as_str())
            .collect();
        assert_eq!(roles, ["assistant"], "{kind}: {}", done["transcript"]);
    }
}
