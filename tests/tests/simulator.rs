//! Scripted phone-simulator sessions against the fake Twilio alone: a small test bot plays
//! tone-coded audio with marks over the media stream, the simulated callee listens,
//! interrupts and answers, and the tests check marks, `clear`, and exactly what was heard.

// Helpers outside #[test] fns unwrap too: any panic here is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmb_tests::audio;
use cmb_tests::fakes::twilio::app::{BotStream, WebhookApp};
use cmb_tests::fakes::twilio::{self, CallStatus, CalleeScript, Config};
use cmb_tests::sim::{HangUpReason, SimEvent, SimScript, Speaker, Step, Utterance};
use serde_json::Value;

const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
const TOKEN: &str = "fake-auth-token";
const TO: &str = "+15558675310";
const WAIT: Duration = Duration::from_secs(15);

async fn setup(script: SimScript) -> (twilio::Handle, WebhookApp, String) {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let mut cfg = Config::new(ACCOUNT, TOKEN);
    cfg.ring = Duration::from_millis(20);
    // 4× real time: the protocol is the same, in media time.
    cfg.frame_interval = Duration::from_millis(5);
    cfg.default_script = CalleeScript::answer(script);
    let fake = twilio::spawn(cfg).await.unwrap();
    let app = WebhookApp::spawn(TOKEN).await.unwrap();
    app.set_twiml(app.connect_twiml(&[("callId", "c1")], ""));
    let response = reqwest::Client::new()
        .post(format!(
            "{}/2010-04-01/Accounts/{ACCOUNT}/Calls.json",
            fake.base_url()
        ))
        .basic_auth(ACCOUNT, Some(TOKEN))
        .form(&[
            ("To", TO),
            ("From", "+15017122661"),
            ("Url", &app.twiml_url()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    let sid = body["sid"].as_str().unwrap().to_owned();
    (fake, app, sid)
}

fn is_speech(media: &Value) -> bool {
    use base64::Engine as _;
    let payload = media["media"]["payload"].as_str().unwrap_or("");
    let audio = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .unwrap_or_default();
    audio::energy_dbfs(&audio) > -40.0
}

/// Plays `text` one character (320 bytes) per media message, each followed by a mark `c{i}`.
fn play_with_marks(bot: &BotStream, text: &str) -> Vec<u8> {
    let spoken = audio::encode_text(text);
    for (i, chunk) in spoken.chunks(audio::SAMPLES_PER_CHAR).enumerate() {
        bot.send_media(chunk);
        bot.send_mark(&format!("c{i}"));
    }
    spoken
}

/// Barge-in: the callee talks 300 ms into the greeting, the bot clears, every pending mark
/// comes back at once, and the callee heard exactly the audio played before the clear.
#[tokio::test]
async fn interruption_clears_and_callee_heard_exactly_the_played_prefix() {
    let script = SimScript::new(vec![
        Step::InterruptAfterMs(300),
        Step::Say(Utterance::text("wait stop")),
        Step::Pause(100),
        Step::HangUp,
    ]);
    let (fake, app, sid) = setup(script).await;
    let mut bot = app.accept_stream(WAIT).await.unwrap();
    let start = bot.recv_event("start", WAIT).await.unwrap();
    assert_eq!(start["start"]["customParameters"]["callId"], "c1");

    let greeting = "Hello there, this is your coach speaking, ready to train today?";
    let spoken = play_with_marks(&bot, greeting);
    // Listen until the callee starts speaking, then barge-in: clear.
    let mut marks = Vec::new();
    loop {
        let message = bot
            .recv(WAIT)
            .await
            .expect("stream ended before the callee spoke");
        if message["event"] == "mark" {
            marks.push(message["mark"]["name"].as_str().unwrap().to_owned());
        }
        if message["event"] == "media" && is_speech(&message) {
            break;
        }
    }
    bot.send_clear();
    // Every mark comes back: the played ones, then the rest at once because of the clear.
    while marks.len() < greeting.len() {
        let mark = bot.recv_event("mark", WAIT).await.unwrap();
        marks.push(mark["mark"]["name"].as_str().unwrap().to_owned());
    }
    let expected: Vec<String> = (0..greeting.len()).map(|i| format!("c{i}")).collect();
    assert_eq!(marks, expected);
    // The callee finishes its sentence and hangs up: Twilio stops the stream.
    bot.recv_event("stop", WAIT).await.unwrap();
    bot.drain_until_closed(WAIT).await.unwrap();
    assert_eq!(audio::decode_text(&bot.inbound_audio), "wait stop");

    let record = fake.wait_finished(&sid, WAIT).await.unwrap();
    assert_eq!(record.status, CallStatus::Completed);
    let stream = &record.streams[0];
    let played: Vec<_> = stream
        .marks_echoed
        .iter()
        .filter(|m| !m.by_clear)
        .map(|m| m.name.clone())
        .collect();
    let cleared: Vec<_> = stream
        .marks_echoed
        .iter()
        .filter(|m| m.by_clear)
        .map(|m| m.name.clone())
        .collect();
    let k = played.len();
    assert_eq!(played, expected[..k]);
    assert_eq!(cleared, expected[k..]);
    assert_eq!(stream.clears.len(), 1);
    assert_eq!(stream.clears[0].marks_returned, expected[k..]);
    // 300 ms of greeting is 7.5 characters: at least 7 played, and the clear cut the rest.
    assert!((7..greeting.len()).contains(&k), "{k} characters played");
    // Bytes played: the k marked characters, plus at most one frame of the next one.
    let bytes = stream.bytes_played as usize;
    assert!(
        (k * 320..k * 320 + 320).contains(&bytes),
        "{bytes} bytes for {k} characters"
    );
    assert_eq!(
        stream.bytes_played + stream.clears[0].dropped_bytes,
        spoken.len() as u64
    );

    // What the callee heard is exactly what those bytes carry, nothing after the clear.
    let played_audio = [&spoken[..bytes], &audio::silence(40)[..]].concat();
    let heard = audio::decode_text(&played_audio);
    assert_eq!(record.heard_text, heard);
    assert!(
        heard == greeting[..k] || heard == greeting[..k + 1],
        "{heard:?} vs k={k}"
    );

    // The transcript: the persona's cut greeting, then the callee's interruption 300 ms in.
    let persona = record
        .transcript
        .iter()
        .find(|l| l.speaker == Speaker::Persona)
        .unwrap();
    let caller = record
        .transcript
        .iter()
        .find(|l| l.speaker == Speaker::Caller)
        .unwrap();
    assert_eq!(persona.text, heard);
    assert_eq!(caller.text, "wait stop");
    assert_eq!(caller.at_ms - persona.at_ms, 300);
    assert!(matches!(
        record.sim_events.last(),
        Some(SimEvent::HungUp {
            reason: HangUpReason::Script,
            ..
        })
    ));
}

/// Turn-taking: the callee waits for the greeting to finish, answers, waits for the reply
/// and hangs up after the second persona turn; the recording holds what it heard.
#[tokio::test]
async fn turn_taking_with_recording() {
    let recording = std::env::temp_dir().join(format!("cmb-sim-call-{}.wav", std::process::id()));
    let mut script = SimScript::new(vec![
        Step::WaitForPersonaToFinish { silence_ms: 300 },
        Step::Say(Utterance::text("one")),
        Step::HangUpAfterTurns(2),
    ])
    .with_recording(&recording);
    script.turn_silence_ms = 300;
    let (fake, app, sid) = setup(script).await;
    let mut bot = app.accept_stream(WAIT).await.unwrap();
    bot.recv_event("start", WAIT).await.unwrap();
    play_with_marks(&bot, "hi");
    // Wait for the callee's whole utterance, then reply.
    let mut decoder = audio::ToneDecoder::new();
    while decoder.text() != "one" {
        let media = bot.recv_event("media", WAIT).await.unwrap();
        use base64::Engine as _;
        let payload = media["media"]["payload"].as_str().unwrap();
        decoder.push(
            &base64::engine::general_purpose::STANDARD
                .decode(payload)
                .unwrap(),
        );
    }
    play_with_marks(&bot, "ok");
    bot.recv_event("stop", WAIT).await.unwrap();

    let record = fake.wait_finished(&sid, WAIT).await.unwrap();
    let lines: Vec<_> = record
        .transcript
        .iter()
        .map(|l| (l.speaker, l.text.as_str(), l.at_ms))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    let mut sorted = lines.clone();
    sorted.sort_by_key(|l| l.2);
    let spoken: Vec<_> = sorted.iter().map(|l| (l.0, l.1)).collect();
    assert_eq!(
        spoken,
        [
            (Speaker::Persona, "hi"),
            (Speaker::Caller, "one"),
            (Speaker::Persona, "ok")
        ]
    );
    // The callee spoke only after 300 ms of silence following "hi" (80 ms long).
    assert!(sorted[1].2 >= sorted[0].2 + 80 + 300, "{sorted:?}");
    assert_eq!(
        record.sim_events.last().map(|e| matches!(
            e,
            SimEvent::HungUp {
                reason: HangUpReason::AfterTurns(2),
                ..
            }
        )),
        Some(true)
    );
    let heard = audio::read_wav(&recording).unwrap();
    let _ = std::fs::remove_file(&recording);
    assert_eq!(audio::decode_text(&heard), "hiok");
    assert_eq!(record.heard_text, "hiok");
}
