//! The fake Twilio, driven like the Twilio docs describe: REST API with Basic auth,
//! signed status callbacks and TwiML webhooks (verified with `cmb_core::twilio_sig`), the
//! bidirectional media stream (marks, clear, dtmf, stop), callee scripts and faults.

// Helpers outside #[test] fns unwrap too: any panic here is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmb_tests::audio;
use cmb_tests::fakes::twilio::app::WebhookApp;
use cmb_tests::fakes::twilio::{
    self, Answer, AnsweredBy, CallStatus, CalleeScript, Config, StreamEnd,
};
use cmb_tests::sim::{SimScript, Step, Utterance};
use serde_json::Value;

const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
const TOKEN: &str = "fake-auth-token";
const FROM: &str = "+15017122661";
const TO: &str = "+15558675310";
const WAIT: Duration = Duration::from_secs(10);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

/// A fast fake: 50 ms rings, 5 ms per 20 ms media frame, and a callee who says nothing
/// and gives up after 60 s of media time (15 s of wall time).
async fn fake() -> twilio::Handle {
    init_tracing();
    let mut cfg = Config::new(ACCOUNT, TOKEN);
    cfg.ring = Duration::from_millis(50);
    cfg.frame_interval = Duration::from_millis(5);
    cfg.default_script = CalleeScript::answer(quiet_callee());
    twilio::spawn(cfg).await.unwrap()
}

fn quiet_callee() -> SimScript {
    let mut script = SimScript::new(vec![]);
    script.give_up_after_ms = 60_000;
    script
}

fn calls_url(fake: &twilio::Handle) -> String {
    format!(
        "{}/2010-04-01/Accounts/{ACCOUNT}/Calls.json",
        fake.base_url()
    )
}

fn call_url(fake: &twilio::Handle, sid: &str) -> String {
    format!(
        "{}/2010-04-01/Accounts/{ACCOUNT}/Calls/{sid}.json",
        fake.base_url()
    )
}

async fn post(url: &str, auth: (&str, &str), form: &[(&str, &str)]) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .basic_auth(auth.0, Some(auth.1))
        .form(form)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Creates a call to `to` with the app's TwiML and status URLs and every event.
async fn create(
    fake: &twilio::Handle,
    app: &WebhookApp,
    to: &str,
    extra: &[(&str, &str)],
) -> String {
    let twiml_url = app.twiml_url();
    let status_url = app.status_url();
    let mut form = vec![
        ("To", to),
        ("From", FROM),
        ("Url", twiml_url.as_str()),
        ("StatusCallback", status_url.as_str()),
        ("StatusCallbackEvent", "initiated"),
        ("StatusCallbackEvent", "ringing"),
        ("StatusCallbackEvent", "answered"),
        ("StatusCallbackEvent", "completed"),
    ];
    form.extend_from_slice(extra);
    let (status, body) = post(&calls_url(fake), (ACCOUNT, TOKEN), &form).await;
    assert_eq!(status, 201, "{body}");
    body["sid"].as_str().unwrap().to_owned()
}

/// Wrong credentials get 401 with Twilio's error JSON (20003) and a Basic challenge.
#[tokio::test]
async fn auth_failure_is_401_20003() {
    let fake = fake().await;
    let response = reqwest::Client::new()
        .post(calls_url(&fake))
        .basic_auth(ACCOUNT, Some("wrong"))
        .form(&[("To", TO), ("From", FROM), ("Url", "http://127.0.0.1:1/t")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], 20003);
    assert_eq!(body["status"], 401);
    assert_eq!(
        body["more_info"],
        "https://www.twilio.com/docs/errors/20003"
    );
    let (status, _) = post(&calls_url(&fake), ("", ""), &[("To", TO)]).await;
    assert_eq!(status, 401);
    assert!(fake.calls().is_empty());
}

/// Invalid numbers and a missing Url get Twilio's codes; unknown calls and accounts 20404.
#[tokio::test]
async fn bad_input_gets_twilio_error_codes() {
    let fake = fake().await;
    let auth = (ACCOUNT, TOKEN);
    let url = "http://127.0.0.1:1/twiml";
    let (s, b) = post(
        &calls_url(&fake),
        auth,
        &[("To", "555-1234"), ("From", FROM), ("Url", url)],
    )
    .await;
    assert_eq!((s, b["code"].as_u64()), (400, Some(21211)), "{b}");
    assert!(b["message"].as_str().unwrap().contains("555-1234"));
    let (s, b) = post(
        &calls_url(&fake),
        auth,
        &[("To", TO), ("From", "CallMeBack"), ("Url", url)],
    )
    .await;
    assert_eq!((s, b["code"].as_u64()), (400, Some(21212)), "{b}");
    let (s, b) = post(&calls_url(&fake), auth, &[("To", TO), ("From", FROM)]).await;
    assert_eq!((s, b["code"].as_u64()), (400, Some(21205)), "{b}");
    assert!(b["message"].as_str().unwrap().contains("Url"));

    let missing = reqwest::Client::new()
        .get(call_url(&fake, "CA00000000000000000000000000000000"))
        .basic_auth(ACCOUNT, Some(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.json::<Value>().await.unwrap()["code"], 20404);
    let other = format!(
        "{}/2010-04-01/Accounts/ACffffffffffffffffffffffffffffffff/Calls.json",
        fake.base_url()
    );
    let (s, b) = post(&other, auth, &[("To", TO), ("From", FROM), ("Url", url)]).await;
    assert_eq!((s, b["code"].as_u64()), (404, Some(20404)));
    assert!(fake.calls().is_empty());
}

/// The full happy path: 201 call JSON, signed callbacks in SequenceNumber order, a signed
/// TwiML fetch, a signed stream upgrade with connected/start/media, and after the bot
/// closes the socket Twilio goes on with `<Say>`, which the callee hears.
#[tokio::test]
async fn call_flow_is_signed_ordered_and_streams_media() {
    let fake = fake().await;
    let app = WebhookApp::spawn(TOKEN).await.unwrap();
    app.set_twiml(app.connect_twiml(&[("callId", "c1"), ("token", "t&k")], "<Say>Goodbye</Say>"));
    let mut callee = SimScript::new(vec![Step::Say(Utterance::text("hi bot"))]);
    callee.give_up_after_ms = 60_000;
    fake.set_script(TO, CalleeScript::answer(callee));

    let (twiml_url, status_url) = (app.twiml_url(), app.status_url());
    let (status, body) = post(
        &calls_url(&fake),
        (ACCOUNT, TOKEN),
        &[
            ("To", TO),
            ("From", FROM),
            ("Url", twiml_url.as_str()),
            ("StatusCallback", status_url.as_str()),
            ("StatusCallbackEvent", "initiated"),
            ("StatusCallbackEvent", "ringing"),
            ("StatusCallbackEvent", "answered"),
            ("StatusCallbackEvent", "completed"),
        ],
    )
    .await;
    assert_eq!(status, 201);
    let sid = body["sid"].as_str().unwrap().to_owned();
    assert!(sid.starts_with("CA") && sid.len() == 34);
    assert_eq!(body["status"], "queued");
    assert_eq!(body["direction"], "outbound-api");
    assert_eq!(body["api_version"], "2010-04-01");
    assert_eq!(body["to_formatted"], "(555) 867-5310");
    assert_eq!(
        body["uri"],
        format!("/2010-04-01/Accounts/{ACCOUNT}/Calls/{sid}.json")
    );
    let created = body["date_created"].as_str().unwrap();
    assert!(
        time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc2822)
            .is_ok(),
        "{created}"
    );
    assert!(created.ends_with("+0000"));

    let mut bot = app.accept_stream(WAIT).await.unwrap();
    let connected = bot.recv(WAIT).await.unwrap();
    assert_eq!(
        connected,
        serde_json::json!({"event":"connected","protocol":"Call","version":"1.0.0"})
    );
    let start = bot.recv(WAIT).await.unwrap();
    assert_eq!(start["event"], "start");
    assert_eq!(start["sequenceNumber"], "1");
    let stream_sid = start["streamSid"].as_str().unwrap().to_owned();
    assert!(stream_sid.starts_with("MZ") && stream_sid.len() == 34);
    assert_eq!(start["start"]["streamSid"], stream_sid.as_str());
    assert_eq!(start["start"]["callSid"], sid.as_str());
    assert_eq!(start["start"]["accountSid"], ACCOUNT);
    assert_eq!(start["start"]["tracks"], serde_json::json!(["inbound"]));
    assert_eq!(
        start["start"]["customParameters"],
        serde_json::json!({"callId":"c1","token":"t&k"})
    );
    assert_eq!(
        start["start"]["mediaFormat"],
        serde_json::json!({"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1})
    );
    // Media frames: 160 bytes, chunk from "1", timestamps 20 ms apart, sequence +1 each.
    for i in 1..=20u64 {
        let media = bot.recv_event("media", WAIT).await.unwrap();
        assert_eq!(media["streamSid"], stream_sid.as_str());
        assert_eq!(media["sequenceNumber"], (i + 1).to_string());
        assert_eq!(media["media"]["track"], "inbound");
        assert_eq!(media["media"]["chunk"], i.to_string());
        assert_eq!(media["media"]["timestamp"], ((i - 1) * 20).to_string());
    }
    assert_eq!(bot.inbound_audio.len(), 20 * 160);
    // "hi bot" is 6 × 40 ms = 15 frames, so 20 frames hold all of it.
    assert_eq!(audio::decode_text(&bot.inbound_audio), "hi bot");
    bot.close();

    let record = fake.wait_finished(&sid, WAIT).await.unwrap();
    assert_eq!(record.status, CallStatus::Completed);
    assert_eq!(
        record.status_history,
        vec![
            CallStatus::Queued,
            CallStatus::Ringing,
            CallStatus::InProgress,
            CallStatus::Completed
        ]
    );
    assert_eq!(record.heard_text, "Goodbye");
    assert_eq!(record.streams.len(), 1);
    assert_eq!(record.streams[0].end, Some(StreamEnd::ServerClosed));
    assert!(record.duration_secs.unwrap() >= 1);

    // Callbacks: signed (the app validated each), in order, the right statuses.
    let received = app.requests("/status");
    assert_eq!(received.len(), 4);
    assert!(received.iter().all(|r| r.valid), "{received:#?}");
    let statuses: Vec<_> = received
        .iter()
        .map(|r| r.param("CallStatus").unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["initiated", "ringing", "in-progress", "completed"]
    );
    let sequence: Vec<_> = received
        .iter()
        .map(|r| r.param("SequenceNumber").unwrap())
        .collect();
    assert_eq!(sequence, ["0", "1", "2", "3"]);
    for r in &received {
        assert_eq!(r.url, app.status_url());
        assert_eq!(r.param("CallSid"), Some(sid.as_str()));
        assert_eq!(r.param("AccountSid"), Some(ACCOUNT));
        assert_eq!(r.param("Direction"), Some("outbound-api"));
        assert_eq!(r.param("ApiVersion"), Some("2010-04-01"));
        assert_eq!(r.param("CallbackSource"), Some("call-progress-events"));
        assert_eq!((r.param("From"), r.param("To")), (Some(FROM), Some(TO)));
        assert!(r.param("Timestamp").unwrap().ends_with("+0000"));
        assert!(r.param("AnsweredBy").is_none(), "no AMD was requested");
    }
    let last = &received[3];
    let secs: u64 = last.param("CallDuration").unwrap().parse().unwrap();
    assert_eq!(Some(secs), record.duration_secs);
    assert_eq!(last.param("Duration"), Some("1"));
    assert!(received[2].param("CallDuration").is_none());
    assert!(record.callbacks.iter().all(|c| c.result == Ok(204)));

    // TwiML: one signed POST with the call's parameters.
    let fetches = app.requests("/twiml");
    assert_eq!(fetches.len(), 1);
    assert!(fetches[0].valid);
    assert_eq!(fetches[0].method, "POST");
    assert_eq!(fetches[0].param("CallStatus"), Some("in-progress"));
    assert_eq!(fetches[0].param("CallSid"), Some(sid.as_str()));
    assert_eq!(record.twiml_fetches.len(), 1);

    // The app accepted the upgrade, so its signature was valid; stream callbacks too.
    assert_eq!(app.refused_upgrades(), 0);
    let stream_events: Vec<_> = app
        .requests("/stream-status")
        .iter()
        .map(|r| (r.valid, r.param("StreamEvent").unwrap_or("").to_owned()))
        .collect();
    assert_eq!(
        stream_events,
        [
            (true, "stream-started".to_owned()),
            (true, "stream-stopped".to_owned())
        ]
    );

    // Fetch reflects the end state.
    let fetched: Value = reqwest::Client::new()
        .get(call_url(&fake, &sid))
        .basic_auth(ACCOUNT, Some(TOKEN))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["status"], "completed");
    assert_eq!(fetched["duration"], secs.to_string());
    assert!(fetched["end_time"].is_string());
}

/// A mark comes back only once the audio before it has played; `clear` drops the queued
/// audio and returns every pending mark at once; a mark with nothing queued comes back
/// straight away.
#[tokio::test]
async fn marks_and_clear() {
    let fake = fake().await;
    let app = WebhookApp::spawn(TOKEN).await.unwrap();
    app.set_twiml(app.connect_twiml(&[], ""));
    let sid = create(&fake, &app, TO, &[]).await;
    let mut bot = app.accept_stream(WAIT).await.unwrap();
    bot.recv_event("start", WAIT).await.unwrap();
    let sent_at = bot.received.len();
    bot.send_media(&audio::encode_text("ab")); // 640 bytes = 4 frames
    bot.send_mark("a");
    bot.send_media(&audio::silence(5_000));
    bot.send_mark("b");
    let a = bot.recv_event("mark", WAIT).await.unwrap();
    assert_eq!(a["mark"]["name"], "a");
    assert_eq!(a["streamSid"], bot.stream_sid());
    // It came back in the 4th frame of playback, so at least 3 frames went by first.
    let frames_before = bot.received[sent_at..]
        .iter()
        .filter(|m| m["event"] == "media")
        .count();
    assert!(frames_before >= 3, "{frames_before}");
    bot.send_clear();
    let b = bot.recv_event("mark", WAIT).await.unwrap();
    assert_eq!(b["mark"]["name"], "b");
    bot.send_mark("c");
    let c = bot.recv_event("mark", WAIT).await.unwrap();
    assert_eq!(c["mark"]["name"], "c");
    // Sequence numbers keep increasing across event kinds.
    let seqs: Vec<u64> = bot
        .received
        .iter()
        .filter_map(|m| m["sequenceNumber"].as_str().map(|s| s.parse().unwrap()))
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    bot.close();

    let record = fake.wait_finished(&sid, WAIT).await.unwrap();
    let stream = &record.streams[0];
    assert_eq!(stream.marks_received, ["a", "b", "c"]);
    let echoed: Vec<_> = stream
        .marks_echoed
        .iter()
        .map(|m| (m.name.as_str(), m.by_clear))
        .collect();
    assert_eq!(echoed, [("a", false), ("b", true), ("c", false)]);
    assert_eq!(stream.clears.len(), 1);
    assert_eq!(stream.clears[0].marks_returned, ["b"]);
    let dropped = stream.clears[0].dropped_bytes;
    // The clear follows mark a's echo at once: with TCP_NODELAY it can arrive before the
    // first silence frame plays, so all of the silence may be dropped.
    assert!(dropped > 0 && dropped <= 40_000, "{dropped}");
    assert_eq!(stream.bytes_received, 640 + 40_000);
    assert_eq!(stream.bytes_played + dropped, stream.bytes_received);
    // The callee heard "ab" and then silence.
    assert_eq!(record.heard_text, "ab");
}

/// Busy and no-answer scripts end the call without answering; GET callbacks are signed
/// over the URL with the parameters in its query.
#[tokio::test]
async fn busy_and_no_answer() {
    let fake = fake().await;
    let app = WebhookApp::spawn(TOKEN).await.unwrap();
    let busy = "+15550000001";
    let away = "+15550000002";
    fake.set_script(busy, CalleeScript::Busy);
    fake.set_script(away, CalleeScript::NoAnswer);

    let busy_sid = create(&fake, &app, busy, &[("StatusCallbackMethod", "GET")]).await;
    let busy_call = fake.wait_finished(&busy_sid, WAIT).await.unwrap();
    assert_eq!(busy_call.status, CallStatus::Busy);
    assert_eq!(
        busy_call.status_history,
        [CallStatus::Queued, CallStatus::Busy]
    );
    assert!(busy_call.twiml_fetches.is_empty());
    let gets = app.requests("/status");
    assert_eq!(gets.len(), 2);
    assert!(gets
        .iter()
        .all(|r| r.valid && r.method == "GET" && r.params.is_empty()));
    assert!(gets[1].url.contains("CallStatus=busy"), "{}", gets[1].url);
    assert!(gets[1].url.contains("CallDuration=0"));

    let started = std::time::Instant::now();
    let away_sid = create(&fake, &app, away, &[("Timeout", "4")]).await;
    let away_call = fake.wait_finished(&away_sid, WAIT).await.unwrap();
    assert_eq!(away_call.status, CallStatus::NoAnswer);
    assert_eq!(
        away_call.status_history,
        [
            CallStatus::Queued,
            CallStatus::Ringing,
            CallStatus::NoAnswer
        ]
    );
    // Four 50 ms rings.
    assert!(started.elapsed() >= Duration::from_millis(200));
    let statuses: Vec<_> = away_call
        .callbacks
        .iter()
        .map(|c| c.param("CallStatus").unwrap().to_owned())
        .collect();
    assert_eq!(statuses, ["initiated", "ringing", "no-answer"]);
    assert!(away_call.callbacks.iter().all(|c| c.result == Ok(204)));

    // A callee who would answer after more rings than Timeout allows does not answer.
    fake.set_script(
        away,
        CalleeScript::Answer(Answer {
            after_rings: 5,
            answered_by: AnsweredBy::Human,
            session: quiet_callee(),
            duration_override_secs: None,
        }),
    );
    let late = create(&fake, &app, away, &[("Timeout", "2")]).await;
    assert_eq!(
        fake.wait_finished(&late, WAIT).await.unwrap().status,
        CallStatus::NoAnswer
    );
}

/// REST `Status=completed` ends a live call: the stream gets `stop` and is closed, the
/// answer shows `completed`; canceling an answered call or ending an ended one is 21220.
#[tokio::test]
async fn rest_hangup_sends_stop() {
    let fake = fake().await;
    let app = WebhookApp::spawn(TOKEN).await.unwrap();
    app.set_twiml(app.connect_twiml(&[], ""));
    let sid = create(&fake, &app, TO, &[]).await;
    let mut bot = app.accept_stream(WAIT).await.unwrap();
    bot.recv_event("media", WAIT).await.unwrap();

    let (status, body) = post(
        &call_url(&fake, &sid),
        (ACCOUNT, TOKEN),
        &[("Status", "canceled")],
    )
    .await;
    assert_eq!(
        (status, body["code"].as_u64()),
        (400, Some(21220)),
        "{body}"
    );

    let (status, body) = post(
        &call_url(&fake, &sid),
        (ACCOUNT, TOKEN),
        &[("Status", "completed")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "completed");
    let stop = bot.recv_event("stop", WAIT).await.unwrap();
    assert_eq!(stop["streamSid"], bot.stream_sid());
    assert_eq!(stop["stop"]["callSid"], sid.as_str());
    assert_eq!(stop["stop"]["accountSid"], ACCOUNT);
    bot.drain_until_closed(WAIT).await.unwrap();

    let record = fake.wait_finished(&sid, WAIT).await.unwrap();
    assert_eq!(record.streams[0].end, Some(StreamEnd::Stopped));
    let last = record.callbacks.last().unwrap();
    assert_eq!(last.param("CallStatus"), Some("completed"));

    let (status, body) = post(
        &call_url(&fake, &sid),
        (ACCOUNT, TOKEN),
        &[("Status", "completed")],
    )
    .await;
    assert_eq!((status, body["code"].as_u64()), (400, Some(21220)));
}

/// `Status=canceled` while ringing ends the call `canceled` without answering.
#[tokio::test]
async fn cancel_while_ringing() {
    let fake = fake().await;
    let app = WebhookApp::spawn(TOKEN).await.unwrap();
    fake.set_script(
        TO,
        CalleeScript::Answer(Answer {
            after_rings: 50,
            answered_by: AnsweredBy::Human,
            session: quiet_callee(),
            duration_override_secs: None,
        }),
    );
    let sid = create(&fake, &app, TO, &[]).await;
    fake.wait_for(&sid, WAIT, |c| c.status == CallStatus::Ringing)
        .await
        .unwrap();
    let (status, body) = post(
        &call_url(&fake, &sid),
        (ACCOUNT, TOKEN),
        &[("Status", "canceled")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "canceled");
    let record = fake.wait_finished(&sid, WAIT).await.unwrap();
    assert_eq!(
        record.callbacks.last().unwrap().param("CallStatus"),
        Some("canceled")
    );
    assert!(record.twiml_fetches.is_empty());
}

/// The callee hanging up (handle) sends `stop`; DTMF from the callee arrives as a `dtmf`
/// event; a binary frame from the bot raises warning 31950 once.
#[tokio::test]
async fn callee_hangup_dtmf_and_binary_warning() {
    let fake = fake().await;
    let app = WebhookApp::spawn(TOKEN).await.unwrap();
    app.set_twiml(app.connect_twiml(&[], ""));
    let mut callee = SimScript::new(vec![Step::Pause(100), Step::PressDigit('5')]);
    callee.give_up_after_ms = 60_000;
    fake.set_script(TO, CalleeScript::answer(callee));
    let sid = create(&fake, &app, TO, &[]).await;
    let mut bot = app.accept_stream(WAIT).await.unwrap();
    let dtmf = bot.recv_event("dtmf", WAIT).await.unwrap();
    assert_eq!(
        dtmf["dtmf"],
        serde_json::json!({"track":"inbound_track","digit":"5"})
    );
    assert_eq!(dtmf["streamSid"], bot.stream_sid());
    bot.send_binary(&[0xFF; 160]);
    bot.send_binary(&[0xFF; 160]);
    bot.send_json(
        &serde_json::json!({"event": "media", "streamSid": "MZwrong", "media": {"payload": ""}}),
    );
    // Let the fake read them before the hang-up.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(fake.hangup(&sid));
    bot.recv_event("stop", WAIT).await.unwrap();
    let record = fake.wait_finished(&sid, WAIT).await.unwrap();
    assert_eq!(record.status, CallStatus::Completed);
    assert_eq!(record.streams[0].warnings, [31950]);
    assert_eq!(record.streams[0].dtmf_sent, ['5']);
    assert!(!fake.hangup(&sid), "a finished call cannot be hung up");
}

/// Malformed TwiML fails like Twilio's 12100: the callee hears the application-error
/// message and the call ends; a stream URL with a query string is refused (31920) and
/// Twilio goes on with the next verb.
#[tokio::test]
async fn bad_twiml_and_bad_stream_url() {
    let fake = fake().await;
    let app = WebhookApp::spawn(TOKEN).await.unwrap();
    app.set_twiml("<Response><Say>unclosed</Response>");
    let sid = create(&fake, &app, TO, &[]).await;
    let record = fake.wait_finished(&sid, WAIT).await.unwrap();
    assert_eq!(
        record.notices.iter().map(|n| n.code).collect::<Vec<_>>(),
        [12100]
    );
    assert_eq!(
        record.heard_text,
        "An application error has occurred. Goodbye."
    );
    assert_eq!(record.status, CallStatus::Completed);

    app.set_twiml(format!(
        r#"<Response><Connect><Stream url="{}?token=x"/></Connect><Say>after</Say></Response>"#,
        app.stream_url()
    ));
    let sid = create(&fake, &app, TO, &[]).await;
    let record = fake.wait_finished(&sid, WAIT).await.unwrap();
    assert_eq!(
        record.notices.iter().map(|n| n.code).collect::<Vec<_>>(),
        [31920]
    );
    assert!(matches!(
        record.streams[0].end,
        Some(StreamEnd::HandshakeFailed(_))
    ));
    assert_eq!(record.heard_text, "after");
}

/// With MachineDetection, AnsweredBy is in the TwiML request, the answered/completed
/// callbacks and the call JSON; duration_override_secs drives CallDuration and Duration.
#[tokio::test]
async fn machine_detection_and_duration_override() {
    let fake = fake().await;
    let app = WebhookApp::spawn(TOKEN).await.unwrap();
    app.set_twiml("<Response><Pause length=\"0\"/></Response>");
    fake.set_script(
        TO,
        CalleeScript::Answer(Answer {
            after_rings: 1,
            answered_by: AnsweredBy::MachineEndBeep,
            session: quiet_callee(),
            duration_override_secs: Some(125),
        }),
    );
    let sid = create(&fake, &app, TO, &[("MachineDetection", "DetectMessageEnd")]).await;
    let record = fake.wait_finished(&sid, WAIT).await.unwrap();
    assert_eq!(
        app.requests("/twiml")[0].param("AnsweredBy"),
        Some("machine_end_beep")
    );
    let by: Vec<_> = record
        .callbacks
        .iter()
        .map(|c| c.param("AnsweredBy"))
        .collect();
    assert_eq!(
        by,
        [
            None,
            None,
            Some("machine_end_beep"),
            Some("machine_end_beep")
        ]
    );
    let last = record.callbacks.last().unwrap();
    assert_eq!(last.param("CallDuration"), Some("125"));
    assert_eq!(last.param("Duration"), Some("3"));
    let fetched: Value = reqwest::Client::new()
        .get(call_url(&fake, &sid))
        .basic_auth(ACCOUNT, Some(TOKEN))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["answered_by"], "machine_end_beep");
    assert_eq!(fetched["duration"], "125");
}

/// http_status answers with Twilio's error body; refuse answers 503; latency delays;
/// `/__faults` flips them over HTTP and DELETE resets.
#[tokio::test]
async fn request_faults() {
    let fake = fake().await;
    let client = reqwest::Client::new();
    let faults_url = format!("{}/__faults", fake.base_url());
    let form = [
        ("To", "bad"),
        ("From", FROM),
        ("Url", "http://127.0.0.1:1/t"),
    ];

    client
        .post(&faults_url)
        .json(&serde_json::json!({"http_status": 429}))
        .send()
        .await
        .unwrap();
    let (s, b) = post(&calls_url(&fake), (ACCOUNT, TOKEN), &form).await;
    assert_eq!((s, b["code"].as_u64()), (429, Some(20429)));

    fake.faults().update(|f| f.refuse_connections = true);
    let (s, b) = post(&calls_url(&fake), (ACCOUNT, TOKEN), &form).await;
    assert_eq!((s, b["code"].as_u64()), (503, Some(20503)));

    client.delete(&faults_url).send().await.unwrap();
    let (s, b) = post(&calls_url(&fake), (ACCOUNT, TOKEN), &form).await;
    assert_eq!((s, b["code"].as_u64()), (400, Some(21211)));

    fake.faults().update(|f| f.latency_ms = 300);
    let t0 = std::time::Instant::now();
    let _ = post(&calls_url(&fake), (ACCOUNT, TOKEN), &form).await;
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert!(fake.calls().is_empty());
}

/// Stream faults: drop_after_messages cuts the media socket after N messages with no
/// close frame and no `stop`; first_byte_delay holds back the first message.
#[tokio::test]
async fn stream_faults() {
    let fake = fake().await;
    let app = WebhookApp::spawn(TOKEN).await.unwrap();
    app.set_twiml(app.connect_twiml(&[], ""));
    // Ring long enough to set the stream faults after the create request is answered
    // (request faults would delay that answer too).
    fake.set_script(
        TO,
        CalleeScript::Answer(Answer {
            after_rings: 4,
            answered_by: AnsweredBy::Human,
            session: quiet_callee(),
            duration_override_secs: None,
        }),
    );
    let sid = create(&fake, &app, TO, &[]).await;
    fake.faults().update(|f| {
        f.drop_after_messages = Some(5);
        f.first_byte_delay_ms = 700;
    });
    let mut bot = app.accept_stream(WAIT).await.unwrap();
    let t0 = std::time::Instant::now();
    let first = bot.recv(WAIT).await.unwrap();
    assert_eq!(first["event"], "connected");
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    let rest = bot.drain_until_closed(WAIT).await.unwrap();
    assert_eq!(rest.len(), 4, "{rest:?}");
    assert!(rest.iter().all(|m| m["event"] != "stop"));
    let record = fake.wait_finished(&sid, WAIT).await.unwrap();
    assert_eq!(record.streams[0].end, Some(StreamEnd::Dropped));

    fake.faults().reset();
    fake.faults().update(|f| f.drop_after_ms = Some(200));
    let sid = create(&fake, &app, TO, &[]).await;
    let mut bot = app.accept_stream(WAIT).await.unwrap();
    bot.recv_event("start", WAIT).await.unwrap();
    bot.drain_until_closed(WAIT).await.unwrap();
    let record = fake.wait_finished(&sid, WAIT).await.unwrap();
    assert_eq!(record.streams[0].end, Some(StreamEnd::Dropped));
}

/// Latency and jitter on a stream delay every message but neither slow the 20 ms cadence
/// (a pipeline delay, not a per-message sleep) nor reorder messages.
#[tokio::test]
async fn stream_latency_and_jitter_keep_cadence_and_order() {
    let fake = fake().await;
    let app = WebhookApp::spawn(TOKEN).await.unwrap();
    app.set_twiml(app.connect_twiml(&[], ""));
    fake.set_script(
        TO,
        CalleeScript::Answer(Answer {
            after_rings: 4,
            answered_by: AnsweredBy::Human,
            session: quiet_callee(),
            duration_override_secs: None,
        }),
    );
    let sid = create(&fake, &app, TO, &[]).await;
    fake.faults().update(|f| {
        f.latency_ms = 300;
        f.jitter_ms = 100;
    });
    let mut bot = app.accept_stream(WAIT).await.unwrap();
    let t0 = std::time::Instant::now();
    bot.recv_event("connected", WAIT).await.unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    let first_media = std::time::Instant::now();
    for _ in 0..60 {
        bot.recv_event("media", WAIT).await.unwrap();
    }
    // 60 frames at 5 ms each; sequential 300 ms sleeps would take 18 s.
    assert!(
        first_media.elapsed() < Duration::from_secs(3),
        "{:?}",
        first_media.elapsed()
    );
    let seqs: Vec<u64> = bot
        .received
        .iter()
        .filter_map(|m| m["sequenceNumber"].as_str().map(|s| s.parse().unwrap()))
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    fake.faults().reset();
    assert!(fake.hangup(&sid));
    fake.wait_finished(&sid, WAIT).await.unwrap();
}

/// `media_one_way_delay` delays both directions as a delay line (the server's messages
/// keep their spacing), and the stream's timing records when `start` left, when the
/// callee's utterance began and ended, and when the first media and the clear arrived.
#[tokio::test]
async fn media_one_way_delay_and_stream_timing() {
    init_tracing();
    let delay = Duration::from_millis(300);
    let mut cfg = Config::new(ACCOUNT, TOKEN);
    cfg.ring = Duration::from_millis(50);
    cfg.frame_interval = Duration::from_millis(5);
    cfg.media_one_way_delay = delay;
    let mut script = SimScript::new(vec![Step::Say(Utterance::text("hi")), Step::Pause(60_000)]);
    script.give_up_after_ms = 60_000;
    cfg.default_script = CalleeScript::answer(script);
    let fake = twilio::spawn(cfg).await.unwrap();
    let app = WebhookApp::spawn(TOKEN).await.unwrap();
    app.set_twiml(app.connect_twiml(&[], ""));
    let sid = create(&fake, &app, TO, &[]).await;
    let mut bot = app.accept_stream(WAIT).await.unwrap();
    let accepted = std::time::Instant::now();
    bot.recv_event("start", WAIT).await.unwrap();
    assert!(accepted.elapsed() >= delay, "{:?}", accepted.elapsed());
    // "hi" is 4 frames, 20 ms of wall time here: over well before this.
    tokio::time::sleep(Duration::from_millis(200)).await;
    bot.send_media(&audio::encode_text("ab"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    bot.send_clear();
    let record = fake
        .wait_for(&sid, WAIT, |c| {
            c.streams
                .first()
                .is_some_and(|s| !s.timing.clears.is_empty())
        })
        .await
        .unwrap();
    let t = &record.streams[0].timing;
    let start = t.start_sent.unwrap();
    let first_media = t.first_media.unwrap();
    // Out to the bot, 200 ms there, back: two one-way delays at least.
    assert!(
        first_media >= start + 2 * delay + Duration::from_millis(200),
        "{:?}",
        first_media - start
    );
    let [said] = &t.utterances[..] else {
        panic!("{:?}", t.utterances)
    };
    assert_eq!(said.text, "hi");
    let ended = said.ended.unwrap();
    assert!(said.started >= start && ended > said.started, "{said:?}");
    assert_eq!(said.first_media_after, Some(first_media));
    // The clear left the bot 100 ms after the media and keeps that spacing; handled one
    // delay after the other (a sleep per message) it would come 300 ms after.
    let gap = t.clears[0] - first_media;
    assert!(
        gap >= Duration::from_millis(90) && gap < Duration::from_millis(250),
        "{gap:?}"
    );
    assert!(fake.hangup(&sid));
    fake.wait_finished(&sid, WAIT).await.unwrap();
}

/// The `fakes` binary announces each fake and `fakes ready`, serves with the credentials
/// from the environment, and exits cleanly on SIGTERM.
#[tokio::test]
async fn fakes_binary_announces_serves_and_stops() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fakes"))
        .args([
            "--host",
            "127.0.0.1",
            "--base-port",
            "0",
            "--only",
            "twilio,stripe",
        ])
        .env("TWILIO_ACCOUNT_SID", ACCOUNT)
        .env("TWILIO_AUTH_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let announced = cmb_tests::process::fakes_announcements(&mut child, WAIT)
        .await
        .unwrap();
    assert_eq!(announced.len(), 2, "{announced:?}");
    assert!(announced[0].starts_with("fake twilio listening on http://127.0.0.1:"));
    assert!(announced[1].starts_with("fake stripe listening on http://127.0.0.1:"));
    let base = announced[0].rsplit(' ').next().unwrap();
    let (status, body) = post(
        &format!("{base}/2010-04-01/Accounts/{ACCOUNT}/Calls.json"),
        (ACCOUNT, TOKEN),
        &[("To", "nope")],
    )
    .await;
    assert_eq!(
        (status, body["code"].as_u64()),
        (400, Some(21211)),
        "credentials from env accepted"
    );

    cmb_tests::process::stop_cleanly(&mut child, WAIT)
        .await
        .unwrap();
}

/// Updating a live call with new `Twiml` stops the stream (`stop`) and runs the new
/// document: the callee hears the `<Say>`, then the call completes.
#[tokio::test]
async fn rest_redirect_replaces_the_program() {
    let fake = fake().await;
    let app = WebhookApp::spawn(TOKEN).await.unwrap();
    app.set_twiml(app.connect_twiml(&[], ""));
    let sid = create(&fake, &app, TO, &[]).await;
    let mut bot = app.accept_stream(WAIT).await.unwrap();
    bot.recv_event("media", WAIT).await.unwrap();
    let (status, body) = post(
        &call_url(&fake, &sid),
        (ACCOUNT, TOKEN),
        &[(
            "Twiml",
            "<Response><Say>See you</Say><Hangup/><Say>never</Say></Response>",
        )],
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("in-progress"))
    );
    bot.recv_event("stop", WAIT).await.unwrap();
    let record = fake.wait_finished(&sid, WAIT).await.unwrap();
    assert_eq!(record.status, CallStatus::Completed);
    assert_eq!(record.streams[0].end, Some(StreamEnd::Stopped));
    assert_eq!(record.heard_text, "See you");
}
