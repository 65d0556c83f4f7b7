//! The session machine with explicit time: every path of a call's life, and a property
//! test over random event sequences.

use super::*;
use crate::channel::{DoToRelay, Envelope, RelayToDo, VoiceSettings};
use crate::pricing;

const T0: u64 = 1_800_000_000_000;
const SID: &str = "CA0000000000000000000000000000000a";
const AC: &str = "AC0000000000000000000000000000000b";

fn start(scheduled: Option<u64>) -> Start {
    Start {
        call_id: "call-1".into(),
        user_id: "user-1".into(),
        phone_number: "+15550001111".into(),
        reserved: if scheduled.is_some() { 0 } else { 65 },
        balance: 135,
        scheduled_at_ms: scheduled,
        account_sid: AC.into(),
        limits: Limits::default(),
    }
}

fn persona() -> PersonaBrief {
    PersonaBrief {
        name: "Brad".into(),
        voice_id: "v1".into(),
        voice_settings: VoiceSettings::default(),
        greeting: "Yo!".into(),
        system_prompt: "You are Brad.".into(),
        caller_zone: Some("Europe/London".into()),
        voicemail: "Hi, it's Brad. I'll try you again soon.".into(),
    }
}

fn status(seq: i64, st: &str) -> Event {
    status_with(seq, st, &[])
}

fn status_with(seq: i64, st: &str, extra: &[(&str, &str)]) -> Event {
    let mut params = vec![
        ("CallSid".to_string(), SID.to_string()),
        ("AccountSid".to_string(), AC.to_string()),
        ("CallStatus".to_string(), st.to_string()),
        ("SequenceNumber".to_string(), seq.to_string()),
    ];
    params.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Event::TwilioStatus { params }
}

fn frame(seq: u64, msg: RelayToDo) -> Envelope<RelayToDo> {
    Envelope::new(seq, msg)
}

fn ready(resume_from: Option<u64>) -> RelayToDo {
    RelayToDo::Ready {
        call_sid: SID.into(),
        stream_sid: "MZ1".into(),
        resume_from,
    }
}

fn turn(text: &str) -> RelayToDo {
    RelayToDo::UserTurn {
        text: text.into(),
        stt_final_ms: 100,
        end_of_turn_at_ms: 0,
    }
}

/// The caller says `text` (relay frame `seq` on socket 0) at `at`.
fn user_says(s: &mut Session, seq: u64, text: &str, at: u64) -> Vec<Effect> {
    s.handle(
        Event::RelayFrame {
            conn: 0,
            frame: frame(seq, turn(text)),
        },
        at,
    )
}

fn has<F: Fn(&Effect) -> bool>(effects: &[Effect], f: F) -> bool {
    effects.iter().any(f)
}

fn creates(effects: &[Effect]) -> usize {
    effects
        .iter()
        .filter(|e| matches!(e, Effect::TwilioCreate { .. }))
        .count()
}

fn settlement(effects: &[Effect]) -> Option<&Settlement> {
    effects.iter().find_map(|e| match e {
        Effect::Db(DbOp::Settle(s)) => Some(s),
        _ => None,
    })
}

fn end_unconnected(effects: &[Effect]) -> Option<(CallStatus, i64)> {
    effects.iter().find_map(|e| match e {
        Effect::Db(DbOp::EndUnconnected {
            status, release, ..
        }) => Some((*status, *release)),
        _ => None,
    })
}

fn sent(effects: &[Effect]) -> Vec<DoToRelay> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::ToRelay { frames, .. } => Some(frames.iter().map(|f| f.msg.clone())),
            _ => None,
        })
        .flatten()
        .collect()
}

fn sent_seqs(effects: &[Effect]) -> Vec<u64> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::ToRelay { frames, .. } => Some(frames.iter().map(|f| f.seq)),
            _ => None,
        })
        .flatten()
        .collect()
}

fn alarm(effects: &[Effect]) -> Option<Option<u64>> {
    effects.iter().rev().find_map(|e| match e {
        Effect::SetAlarm(t) => Some(*t),
        _ => None,
    })
}

/// The shell accepted relay socket 0 at `at`, with the test persona read at connect.
fn open_relay(s: &mut Session, at: u64) -> Vec<Effect> {
    s.handle(
        Event::RelayOpened {
            conn: 0,
            persona: persona(),
        },
        at,
    )
}

/// A call dialled and placed at Twilio (sid known), at T0.
fn placed() -> Session {
    let mut s = dialled();
    s.handle(
        Event::Twilio(TwilioResult::Created { sid: SID.into() }),
        T0 + 200,
    );
    s
}

/// A call answered, its relay bound on socket 0, at T0 + 5 s.
fn live() -> Session {
    let mut s = placed();
    s.handle(status(0, "initiated"), T0 + 300);
    s.handle(status(1, "ringing"), T0 + 1_000);
    s.handle(status(2, "in-progress"), T0 + 4_000);
    let fx = open_relay(&mut s, T0 + 5_000);
    assert!(matches!(sent(&fx).first(), Some(DoToRelay::Hello { .. })));
    s.handle(
        Event::RelayFrame {
            conn: 0,
            frame: frame(1, ready(None)),
        },
        T0 + 5_000,
    );
    assert_eq!(s.relay.stream_sid.as_deref(), Some("MZ1"));
    s
}

/// A call for now whose create went out (from the alarm at T0).
fn dialled() -> Session {
    let (mut s, fx) = Session::start(start(None), T0);
    assert_eq!(creates(&fx), 0, "the route does not wait for Twilio");
    assert_eq!(alarm(&fx), Some(Some(T0)));
    let fx = s.handle(Event::Alarm, T0);
    assert_eq!(creates(&fx), 1);
    s
}

/// Runs the alarm at `at` (what the platform does when the alarm time comes).
fn fire(s: &mut Session, at: u64) -> Vec<Effect> {
    s.handle(Event::Alarm, at)
}

/// Settles a call whose last effects asked for the final write.
fn settle_ok(s: &mut Session, at: u64) {
    s.handle(Event::Db(DbResult::Settled), at);
    assert!(s.is_settled());
}

// ---- dialling ----

/// A call for now dials at once, with the ring timeout and a balance-capped TimeLimit.
#[test]
fn trigger_dials_once_with_time_limit() {
    let (mut s, _) = Session::start(start(None), T0);
    let fx = s.handle(Event::Alarm, T0);
    let create = fx.iter().find_map(|e| match e {
        Effect::TwilioCreate {
            timeout_secs,
            time_limit_secs,
            ..
        } => Some((*timeout_secs, *time_limit_secs)),
        _ => None,
    });
    // 200 credits pay for 4 minutes (25 + 4 × 40); Twilio's backstop is a minute later.
    assert_eq!(create, Some((30, 4 * 60 + 60)));
    assert!(matches!(s.dial, Dial::Requested { at_ms: T0, .. }));
    assert!(
        alarm(&fx).flatten().is_some(),
        "a stale create is checked later"
    );
}

/// A scheduled call reserves at its time, then dials; an unpayable one fails, free.
#[test]
fn scheduled_call_reserves_then_dials() {
    let at = T0 + 3_600_000;
    let (mut s, fx) = Session::start(start(Some(at)), T0);
    assert_eq!(creates(&fx), 0);
    assert_eq!(alarm(&fx), Some(Some(at)));
    let fx = fire(&mut s, at);
    assert!(has(&fx, |e| matches!(
        e,
        Effect::Db(DbOp::ReserveScheduled { amount: 65, .. })
    )));
    let fx = s.handle(
        Event::Db(DbResult::Reserved {
            minute: 1,
            balance: Some(10),
        }),
        at + 50,
    );
    assert_eq!(creates(&fx), 1);
    assert_eq!(s.reserved, 65);

    let (mut poor, _) = Session::start(start(Some(at)), T0);
    fire(&mut poor, at);
    let fx = poor.handle(
        Event::Db(DbResult::ReserveRefused {
            minute: 1,
            why: Refusal::Credits,
        }),
        at + 50,
    );
    assert_eq!(creates(&fx), 0);
    assert_eq!(end_unconnected(&fx), Some((CallStatus::Failed, 0)));
}

/// A transient database failure at the scheduled time is retried, not dropped.
#[test]
fn scheduled_reservation_retries_after_db_failure() {
    let at = T0 + 60_000;
    let (mut s, _) = Session::start(start(Some(at)), T0);
    fire(&mut s, at);
    let fx = s.handle(
        Event::Db(DbResult::Failed {
            op: DbOpKind::Reserve,
            message: "d1 down".into(),
        }),
        at + 10,
    );
    assert_eq!(alarm(&fx), Some(Some(at + 10 + 5_000)));
    let fx = fire(&mut s, at + 5_010);
    assert!(has(&fx, |e| matches!(
        e,
        Effect::Db(DbOp::ReserveScheduled { .. })
    )));
}

/// Twilio refusing the call (4xx) fails it and releases the reservation.
#[test]
fn dial_refused_releases() {
    let mut s = dialled();
    let fx = s.handle(
        Event::Twilio(TwilioResult::CreateRefused {
            message: "Twilio error 21211".into(),
        }),
        T0 + 100,
    );
    assert_eq!(end_unconnected(&fx), Some((CallStatus::Failed, 65)));
    settle_ok(&mut s, T0 + 150);
    assert_eq!(s.status, CallStatus::Failed);
    assert_eq!(s.next_wake(), None);
}

/// 429 means nothing was created: retried with backoff, and after three the call fails.
#[test]
fn dial_rate_limited_retries_then_fails() {
    let mut s = dialled();
    let mut now = T0;
    for attempt in 1..=3 {
        let fx = s.handle(Event::Twilio(TwilioResult::CreateRateLimited), now + 100);
        if attempt == 3 {
            assert_eq!(end_unconnected(&fx), Some((CallStatus::Failed, 65)));
            break;
        }
        let Dial::Due { at_ms, .. } = s.dial else {
            panic!("expected a retry, got {:?}", s.dial);
        };
        assert!(at_ms >= now + 100 + 5_000, "backs off at least 5 s");
        now = at_ms;
        let fx = fire(&mut s, now);
        assert_eq!(creates(&fx), 1);
    }
    assert_eq!(s.creates - s.rate_limited, 0);
}

/// A 5xx or timeout on create never dials again: the call is looked up by `To`, found,
/// and carries on under the sid Twilio lists.
#[test]
fn dial_unknown_is_found_not_redialled() {
    let mut s = dialled();
    s.handle(
        Event::Twilio(TwilioResult::CreateUnknown {
            message: "timeout".into(),
        }),
        T0 + 10_000,
    );
    let wake = s.next_wake().expect("a lookup is planned");
    let fx = fire(&mut s, wake);
    assert!(has(&fx, |e| matches!(e, Effect::TwilioFind { .. })));
    assert_eq!(creates(&fx), 0);
    let fx = s.handle(
        Event::Twilio(TwilioResult::Looked {
            sid: Some(SID.into()),
            call: Some(TwilioCall {
                status: "ringing".into(),
                duration_secs: None,
                answered_by: None,
            }),
        }),
        wake + 100,
    );
    assert_eq!(s.sid.as_deref(), Some(SID));
    assert_eq!(creates(&fx), 0);
    assert!(matches!(s.dial, Dial::Placed { .. }));
}

/// An unknown create that Twilio never lists fails the call, free, without a second dial.
#[test]
fn dial_unknown_not_found_fails_free() {
    let mut s = dialled();
    s.handle(
        Event::Twilio(TwilioResult::CreateUnknown {
            message: "503".into(),
        }),
        T0 + 100,
    );
    let mut all = Vec::new();
    for _ in 0..2 {
        let wake = s.next_wake().expect("lookup");
        all.extend(fire(&mut s, wake));
        all.extend(s.handle(
            Event::Twilio(TwilioResult::Looked {
                sid: None,
                call: None,
            }),
            wake + 100,
        ));
    }
    assert_eq!(creates(&all), 0);
    assert_eq!(end_unconnected(&all), Some((CallStatus::Failed, 65)));
    let reason = all.iter().find_map(|e| match e {
        Effect::Db(DbOp::EndUnconnected { reason, .. }) => Some(reason.clone()),
        _ => None,
    });
    assert!(
        reason.is_some_and(|r| r.contains("503")),
        "names Twilio's answer"
    );
}

/// The object restarted between Twilio's create and our save: the stale intent is
/// looked up, never created again.
#[test]
fn restart_between_create_and_save_reconciles() {
    let s = dialled();
    // The shell persisted the intent, then died: the create's result is lost.
    let json = serde_json::to_string(&s).expect("serialize");
    let mut s: Session = serde_json::from_str(&json).expect("deserialize");
    let wake = s.next_wake().expect("stale create check");
    assert_eq!(wake, T0 + 30_000);
    let fx = fire(&mut s, wake);
    assert_eq!(creates(&fx), 0);
    assert!(has(&fx, |e| matches!(e, Effect::TwilioFind { .. })));
    assert!(matches!(s.dial, Dial::Unknown { .. }));
}

// ---- status callbacks ----

/// Statuses in any order and repeated: the call only moves forward, settles once.
#[test]
fn statuses_out_of_order_and_repeated() {
    let mut s = placed();
    s.handle(status(2, "in-progress"), T0 + 4_000);
    assert_eq!(s.status, CallStatus::InProgress);
    let fx = s.handle(status(1, "ringing"), T0 + 4_100);
    assert!(
        fx.iter().all(|e| !matches!(e, Effect::Db(_))),
        "stale ringing ignored"
    );
    assert_eq!(s.status, CallStatus::InProgress);
    let fx = s.handle(
        status_with(3, "completed", &[("CallDuration", "125")]),
        T0 + 130_000,
    );
    let st = settlement(&fx).expect("settles");
    assert_eq!(
        (st.duration_secs, st.charge, st.release),
        (125, 25 + 3 * 40, 65)
    );
    let again = s.handle(
        status_with(3, "completed", &[("CallDuration", "125")]),
        T0 + 130_100,
    );
    assert!(settlement(&again).is_none(), "a replay settles nothing");
    let later = s.handle(status_with(4, "busy", &[]), T0 + 130_200);
    assert!(settlement(&later).is_none() && end_unconnected(&later).is_none());
}

/// Callbacks for another CallSid or another account are ignored.
#[test]
fn callbacks_bound_to_the_call() {
    let mut s = placed();
    let mut other = status(0, "in-progress");
    if let Event::TwilioStatus { params } = &mut other {
        params[0].1 = "CAffffffffffffffffffffffffffffffff".into();
    }
    s.handle(other, T0 + 1_000);
    assert_eq!(s.status, CallStatus::Queued);
    let mut foreign = status(0, "in-progress");
    if let Event::TwilioStatus { params } = &mut foreign {
        params[1].1 = "ACffffffffffffffffffffffffffffffff".into();
    }
    s.handle(foreign, T0 + 1_000);
    assert_eq!(s.status, CallStatus::Queued);
    s.handle(status(0, "in-progress"), T0 + 1_000);
    assert_eq!(s.status, CallStatus::InProgress);
}

/// Busy and no-answer cost nothing and release the whole reservation.
#[test]
fn busy_and_no_answer_are_free() {
    for word in ["busy", "no-answer", "failed", "canceled"] {
        let mut s = placed();
        let fx = s.handle(status(1, word), T0 + 5_000);
        let (status, release) = end_unconnected(&fx).expect(word);
        assert_eq!(release, 65, "{word}");
        assert!(status.is_final());
    }
}

/// A machine answered (after its beep): the persona's voicemail line is the greeting,
/// the relay hangs up once it has been heard, nothing the machine says is a turn, and the
/// call is charged like any connected call, its reason saying a message was left.
#[test]
fn a_machine_gets_the_personas_voicemail_then_the_line_drops() {
    let mut s = placed();
    s.handle(
        Event::Answered {
            answered_by: Some("machine_end_beep".into()),
        },
        T0 + 3_000,
    );
    s.handle(status(2, "in-progress"), T0 + 3_100);
    let fx = open_relay(&mut s, T0 + 4_000);
    let hello = sent(&fx);
    assert!(
        matches!(hello.first(), Some(DoToRelay::Hello { greeting, .. }) if greeting == "Hi, it's Brad. I'll try you again soon."),
        "{hello:?}"
    );
    let fx = s.handle(
        Event::RelayFrame {
            conn: 0,
            frame: frame(1, ready(None)),
        },
        T0 + 4_000,
    );
    assert!(
        sent(&fx).iter().any(
            |m| matches!(m, DoToRelay::HangUp { reason, goodbye: None } if reason == "voicemail")
        ),
        "{:?}",
        sent(&fx)
    );
    // The machine's own message is transcribed by the relay: no reply to it.
    let fx = user_says(
        &mut s,
        2,
        "Please leave a message after the tone.",
        T0 + 5_000,
    );
    assert!(
        !has(&fx, |e| matches!(e, Effect::StartLlm { .. })),
        "{fx:?}"
    );
    let fx = s.handle(
        status_with(3, "completed", &[("CallDuration", "12")]),
        T0 + 16_000,
    );
    let settled = settlement(&fx).expect("settled");
    assert_eq!(settled.charge, pricing::call_charge_credits(12, true));
    assert_eq!(settled.reason.as_deref(), Some("Voicemail left."));
    let record = fx
        .iter()
        .find_map(|e| match e {
            Effect::Db(DbOp::SaveConversation(r)) => Some(r),
            _ => None,
        })
        .expect("the transcript is saved with the settlement");
    let texts: Vec<_> = record.lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["Hi, it's Brad. I'll try you again soon."]);
    assert_eq!(
        s.conv.lines.len(),
        1,
        "only the voicemail line: {:?}",
        s.conv.lines
    );
}

/// A machine whose stream never connected heard nothing: the call says so.
/// Twilio accepted the dial: the persona is read while the phone rings, and the greeting
/// staged at the relay; the relay's `hello` then uses that persona (the shell's read at
/// connect time is not needed). A second `Prepared` changes nothing.
#[test]
fn the_greeting_is_prepared_while_the_phone_rings() {
    let mut s = dialled();
    let fx = s.handle(
        Event::Twilio(TwilioResult::Created { sid: SID.into() }),
        T0 + 200,
    );
    assert!(has(&fx, |e| matches!(e, Effect::Prepare)), "{fx:?}");
    let mut prepared = persona();
    prepared.greeting = "Hey, it's Brad!".into();
    let fx = s.handle(
        Event::Prepared {
            persona: prepared.clone(),
        },
        T0 + 250,
    );
    assert_eq!(
        fx.iter()
            .filter(|e| matches!(e, Effect::StageGreeting { .. }))
            .collect::<Vec<_>>(),
        [&Effect::StageGreeting {
            voice_id: "v1".into(),
            voice_settings: VoiceSettings::default(),
            text: "Hey, it's Brad!".into(),
        }]
    );
    let fx = s.handle(Event::Prepared { persona: persona() }, T0 + 260);
    assert!(!has(&fx, |e| matches!(e, Effect::StageGreeting { .. })));
    s.handle(status(2, "in-progress"), T0 + 3_000);
    // The shell passes what it has; the prepared persona wins.
    let fx = open_relay(&mut s, T0 + 3_100);
    assert!(
        matches!(sent(&fx).first(), Some(DoToRelay::Hello { greeting, .. }) if greeting == "Hey, it's Brad!"),
        "{:?}",
        sent(&fx)
    );
    assert_eq!(s.conv.lines[0].text, "Hey, it's Brad!");
}

/// With `CALL_PREPARE_GREETING=false` nothing is read or staged while the phone rings:
/// the persona comes with the relay's connect, as before the technique, and the greeting
/// goes out in `hello`.
#[test]
fn with_prepare_greeting_off_nothing_is_prepared() {
    let mut st = start(None);
    st.limits.prepare_greeting = false;
    let (mut s, _) = Session::start(st, T0);
    s.handle(Event::Alarm, T0);
    let fx = s.handle(
        Event::Twilio(TwilioResult::Created { sid: SID.into() }),
        T0 + 200,
    );
    assert!(!has(&fx, |e| matches!(e, Effect::Prepare)), "{fx:?}");
    assert!(
        has(&fx, |e| matches!(e, Effect::Db(DbOp::Progress { .. }))),
        "{fx:?}"
    );
    s.handle(status(1, "ringing"), T0 + 1_000);
    s.handle(status(2, "in-progress"), T0 + 3_000);
    let fx = open_relay(&mut s, T0 + 3_100);
    assert!(
        matches!(sent(&fx).first(), Some(DoToRelay::Hello { greeting, .. }) if greeting == "Yo!"),
        "{:?}",
        sent(&fx)
    );
}

/// Sessions stored before `prepare_greeting` existed load with it on.
#[test]
fn stored_limits_without_prepare_greeting_load_as_on() {
    let mut json = serde_json::to_value(Limits::default()).unwrap();
    json.as_object_mut().unwrap().remove("prepare_greeting");
    let limits: Limits = serde_json::from_value(json).unwrap();
    assert!(limits.prepare_greeting);
}

/// A machine answering a prepared call gets the voicemail line in `hello` (the staged
/// greeting is for a person: the TwiML does not ask for it), and a `Prepared` arriving
/// after the relay connected stages nothing.
#[test]
fn a_prepared_call_answered_by_a_machine_gets_the_voicemail() {
    let mut s = placed();
    s.handle(Event::Prepared { persona: persona() }, T0 + 250);
    s.handle(
        Event::Answered {
            answered_by: Some("machine_end_beep".into()),
        },
        T0 + 3_000,
    );
    let fx = open_relay(&mut s, T0 + 4_000);
    assert!(
        matches!(sent(&fx).first(), Some(DoToRelay::Hello { greeting, .. }) if greeting == "Hi, it's Brad. I'll try you again soon."),
        "{:?}",
        sent(&fx)
    );

    let mut late = placed();
    late.handle(status(2, "in-progress"), T0 + 1_000);
    open_relay(&mut late, T0 + 1_100);
    let fx = late.handle(Event::Prepared { persona: persona() }, T0 + 1_200);
    assert!(
        fx.iter()
            .all(|e| !matches!(e, Effect::StageGreeting { .. })),
        "{fx:?}"
    );

    // A machine answered before the persona was read: nothing is staged for it.
    let mut machine = placed();
    machine.handle(
        Event::Answered {
            answered_by: Some("machine_end_beep".into()),
        },
        T0 + 1_000,
    );
    let fx = machine.handle(Event::Prepared { persona: persona() }, T0 + 1_200);
    assert!(
        fx.iter()
            .all(|e| !matches!(e, Effect::StageGreeting { .. })),
        "{fx:?}"
    );
}

#[test]
fn a_machine_without_a_stream_is_not_said_to_have_a_message() {
    let mut s = placed();
    s.handle(
        Event::Answered {
            answered_by: Some("machine_end_beep".into()),
        },
        T0 + 3_000,
    );
    let fx = s.handle(
        status_with(1, "completed", &[("CallDuration", "4")]),
        T0 + 8_000,
    );
    let reason = settlement(&fx).and_then(|s| s.reason.clone());
    assert_eq!(
        reason.as_deref(),
        Some("Answered by a machine; no message was left.")
    );
}

// ---- lost callbacks ----

/// No final status by ring timeout + margin: Twilio is asked, and its answer settles.
#[test]
fn lost_callbacks_reconciled_with_twilio() {
    let mut s = placed();
    let wake = s.next_wake().expect("reconcile planned");
    assert_eq!(wake, T0 + 60_000);
    let fx = fire(&mut s, wake);
    assert!(has(
        &fx,
        |e| matches!(e, Effect::TwilioFetch { sid } if sid == SID)
    ));
    let fx = s.handle(
        Event::Twilio(TwilioResult::Looked {
            sid: Some(SID.into()),
            call: Some(TwilioCall {
                status: "no-answer".into(),
                duration_secs: Some(0),
                answered_by: None,
            }),
        }),
        wake + 200,
    );
    assert_eq!(end_unconnected(&fx), Some((CallStatus::NoAnswer, 65)));
}

/// Twilio unreachable: lookups back off, and after the hard deadline the call fails, free.
#[test]
fn lost_callbacks_twilio_down_gives_up_free() {
    let mut s = placed();
    let mut now = T0;
    let mut lookups = 0;
    while !s.is_settled() {
        let wake = s.next_wake().expect("something planned");
        assert!(wake >= now, "time only moves forward");
        now = wake;
        let fx = fire(&mut s, now);
        if has(&fx, |e| matches!(e, Effect::TwilioFetch { .. })) {
            lookups += 1;
            s.handle(
                Event::Twilio(TwilioResult::LookFailed {
                    message: "503".into(),
                }),
                now + 100,
            );
        }
        if let Some((status, release)) = end_unconnected(&fx) {
            assert_eq!((status, release), (CallStatus::Failed, 65));
            settle_ok(&mut s, now + 10);
        }
        assert!(now < T0 + 600_000, "gave up within the hard deadline");
    }
    assert!(lookups >= 3, "retried with backoff ({lookups})");
    assert!(now >= T0 + 300_000);
    assert_eq!(s.charged, 0);
}

// ---- the relay ----

/// An answered call whose relay never connects is ended and settled free within a minute.
#[test]
fn relay_never_connects() {
    let mut s = placed();
    s.handle(status(0, "in-progress"), T0 + 4_000);
    let wake = s.next_wake().expect("relay deadline");
    assert_eq!(wake, T0 + 24_000);
    let fx = fire(&mut s, wake);
    assert!(has(&fx, |e| matches!(
        e,
        Effect::TwilioHangUp {
            purpose: HangUpPurpose::Complete,
            ..
        }
    )));
    assert_eq!(end_unconnected(&fx), Some((CallStatus::Failed, 65)));
}

/// A relay that vanishes is ended after the grace period, billing connected time only.
#[test]
fn relay_vanishes_bills_connected_time() {
    let mut s = live();
    s.handle(Event::RelayClosed { conn: 0 }, T0 + 35_000);
    let wake = s.next_wake().expect("grace deadline");
    assert_eq!(wake, T0 + 50_000);
    let fx = fire(&mut s, wake);
    assert!(has(&fx, |e| matches!(e, Effect::TwilioHangUp { .. })));
    let st = settlement(&fx).expect("settles");
    // Answered at +4 s, lost at +35 s: 31 s, one started minute.
    assert_eq!((st.duration_secs, st.charge), (31, 65));
}

/// The relay drops and resumes: every unacknowledged frame is replayed in order, with the
/// seqs it had, and no fresh frame jumps ahead of them.
#[test]
fn relay_resume_replays_unacknowledged_in_order() {
    let mut s = live();
    user_says(&mut s, 2, "hello there", T0 + 6_000);
    let stream = s.active_stream().expect("reply streaming");
    let mut deltas = Vec::new();
    for (i, word) in ["Hey ", "buddy, ", "ready?"].iter().enumerate() {
        let fx = s.handle(
            Event::Llm(LlmEvent::Delta {
                stream,
                text: (*word).into(),
                since_start_ms: 100 + i as u32,
            }),
            T0 + 6_100,
        );
        deltas.extend(sent_seqs(&fx));
    }
    // The socket drops before the relay saw those deltas; the end comes meanwhile.
    s.handle(Event::RelayClosed { conn: 0 }, T0 + 6_200);
    let fx = s.handle(
        Event::Llm(LlmEvent::Done {
            stream,
            prompt_tokens: 10,
            completion_tokens: 3,
            tool_calls: Vec::new(),
        }),
        T0 + 6_300,
    );
    assert!(sent(&fx).is_empty(), "nothing sent with no socket bound");
    let fx = s.handle(
        Event::RelayOpened {
            conn: 1,
            persona: persona(),
        },
        T0 + 6_500,
    );
    assert!(
        sent(&fx).is_empty(),
        "a resuming socket gets no fresh hello"
    );
    let resume_from = deltas[0] - 1;
    let fx = s.handle(
        Event::RelayFrame {
            conn: 1,
            frame: frame(3, ready(Some(resume_from))),
        },
        T0 + 6_500,
    );
    let seqs = sent_seqs(&fx);
    let msgs = sent(&fx);
    let texts: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            DoToRelay::SayDelta { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(texts, ["Hey ", "buddy, ", "ready?"]);
    assert!(msgs.iter().any(|m| matches!(m, DoToRelay::SayEnd { .. })));
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    assert!(seqs[0] > resume_from);
    assert_eq!(&seqs[..3], &deltas[..]);
    assert_eq!(s.relay.lost_ms, None);
}

/// A second relay socket for a connected stream (a replayed token) is refused, and so is
/// one for another stream; the real one stays bound.
#[test]
fn second_relay_refused() {
    let mut s = live();
    s.handle(
        Event::RelayOpened {
            conn: 1,
            persona: persona(),
        },
        T0 + 7_000,
    );
    let fx = s.handle(
        Event::RelayFrame {
            conn: 1,
            frame: frame(1, ready(None)),
        },
        T0 + 7_000,
    );
    assert!(has(&fx, |e| matches!(
        e,
        Effect::CloseRelay { conn: 1, .. }
    )));
    assert_eq!(s.relay.active, Some(0));
    s.handle(
        Event::RelayOpened {
            conn: 2,
            persona: persona(),
        },
        T0 + 7_100,
    );
    let fx = s.handle(
        Event::RelayFrame {
            conn: 2,
            frame: frame(
                1,
                RelayToDo::Ready {
                    call_sid: SID.into(),
                    stream_sid: "MZ-other".into(),
                    resume_from: None,
                },
            ),
        },
        T0 + 7_100,
    );
    assert!(has(&fx, |e| matches!(
        e,
        Effect::CloseRelay { conn: 2, .. }
    )));
    // Frames from a refused socket change nothing.
    s.handle(
        Event::RelayFrame {
            conn: 2,
            frame: frame(2, turn("I am an impostor")),
        },
        T0 + 7_200,
    );
    assert!(s.llm.is_none());
}

/// A replayed relay frame is acknowledged again but applied once.
#[test]
fn relay_frames_deduplicated() {
    let mut s = live();
    let f = frame(2, turn("hi"));
    s.handle(
        Event::RelayFrame {
            conn: 0,
            frame: f.clone(),
        },
        T0 + 6_000,
    );
    let first = s.active_stream();
    let fx = s.handle(Event::RelayFrame { conn: 0, frame: f }, T0 + 6_010);
    assert_eq!(s.active_stream(), first, "no second reply");
    assert!(sent(&fx)
        .iter()
        .any(|m| matches!(m, DoToRelay::Ack { seq: 2 })));
}

// ---- the LLM ----

/// A stall before the first token: the caller hears the fallback line, and a status
/// callback meanwhile is applied at once.
#[test]
fn llm_stall_before_first_token() {
    let mut s = live();
    user_says(&mut s, 2, "hi", T0 + 6_000);
    let stream = s.active_stream().expect("streaming");
    // Twilio reports meanwhile: nothing waits for the LLM.
    let fx = s.handle(
        status_with(3, "completed", &[("CallDuration", "9")]),
        T0 + 7_000,
    );
    assert!(settlement(&fx).is_some());
    assert!(has(
        &fx,
        |e| matches!(e, Effect::CancelLlm { stream: x } if *x == stream)
    ));

    let mut s = live();
    user_says(&mut s, 2, "hi", T0 + 6_000);
    let stream = s.active_stream().expect("streaming");
    let fx = s.handle(
        Event::Llm(LlmEvent::Failed {
            stream,
            timed_out: true,
            message: "no first token in 4000 ms".into(),
        }),
        T0 + 10_000,
    );
    let msgs = sent(&fx);
    assert!(msgs
        .iter()
        .any(|m| matches!(m, DoToRelay::SayDelta { text, .. } if text == FALLBACK_LINE)));
    assert!(msgs.iter().any(|m| matches!(m, DoToRelay::SayEnd { .. })));
    assert!(s.llm.is_none());
}

/// A stall mid-reply: what was said stays, the fallback follows; and if the shell's task
/// vanished, the machine's own backstop does the same.
#[test]
fn llm_stall_mid_reply_and_backstop() {
    let mut s = live();
    user_says(&mut s, 2, "hi", T0 + 6_000);
    let stream = s.active_stream().expect("streaming");
    s.handle(
        Event::Llm(LlmEvent::Delta {
            stream,
            text: "Well, ".into(),
            since_start_ms: 200,
        }),
        T0 + 6_200,
    );
    assert_eq!(s.next_wake(), Some(T0 + 6_000 + 15_000 + 2_000));
    let fx = fire(&mut s, T0 + 23_000);
    assert!(has(&fx, |e| matches!(e, Effect::CancelLlm { .. })));
    let said: Vec<_> = sent(&fx)
        .into_iter()
        .filter_map(|m| match m {
            DoToRelay::SayDelta { text, .. } => Some(text),
            _ => None,
        })
        .collect();
    assert_eq!(said, [format!(" {FALLBACK_LINE}")]);
    let line = s.conv.lines.last().expect("line");
    assert_eq!(line.text, format!("Well,  {FALLBACK_LINE}"));
    // Late events of the dead stream change nothing.
    let fx = s.handle(
        Event::Llm(LlmEvent::Delta {
            stream,
            text: "late".into(),
            since_start_ms: 9_000,
        }),
        T0 + 23_100,
    );
    assert!(sent(&fx).is_empty());
}

/// A new user turn while a reply streams drops the old reply and starts a new one.
#[test]
fn barge_in_restarts_the_reply() {
    let mut s = live();
    user_says(&mut s, 2, "hi", T0 + 6_000);
    let first = s.active_stream().expect("first");
    let fx = user_says(&mut s, 3, "wait", T0 + 6_500);
    assert!(has(
        &fx,
        |e| matches!(e, Effect::CancelLlm { stream } if *stream == first)
    ));
    assert_ne!(s.active_stream(), Some(first));
}

// ---- limits ----

/// Each minute is reserved before it starts; when the balance can't, the persona says
/// goodbye and the call ends.
#[test]
fn credits_run_out() {
    let mut s = live();
    s.limits.idle_timeout_secs = 10_000;
    let wake = s.next_wake().expect("minute top-up");
    assert_eq!(wake, T0 + 5_000 + 55_000);
    let fx = fire(&mut s, wake);
    assert!(has(&fx, |e| matches!(
        e,
        Effect::Db(DbOp::ReserveMinute {
            minute: 2,
            amount: 40,
            ..
        })
    )));
    s.handle(
        Event::Db(DbResult::Reserved {
            minute: 2,
            balance: Some(30),
        }),
        wake + 10,
    );
    assert_eq!((s.reserved, s.minutes_reserved), (105, 2));
    // Keep talking so idle does not end it first.
    user_says(&mut s, 2, "still here", T0 + 100_000);
    let stream = s.active_stream().expect("reply");
    s.handle(
        Event::Llm(LlmEvent::Done {
            stream,
            prompt_tokens: 1,
            completion_tokens: 1,
            tool_calls: Vec::new(),
        }),
        T0 + 100_100,
    );
    let wake = s.next_wake().expect("next minute");
    assert_eq!(wake, T0 + 5_000 + 115_000);
    fire(&mut s, wake);
    let fx = s.handle(
        Event::Db(DbResult::ReserveRefused {
            minute: 3,
            why: Refusal::Credits,
        }),
        wake + 10,
    );
    assert!(sent(&fx).iter().any(|m| matches!(m, DoToRelay::HangUp { reason, goodbye: Some(g) } if reason == "out_of_credits" && g == CREDITS_GOODBYE)));
    // The relay confirms; Twilio's final settles against what was reserved.
    s.handle(
        Event::RelayFrame {
            conn: 0,
            frame: frame(
                3,
                RelayToDo::Ended {
                    reason: "hang_up".into(),
                },
            ),
        },
        wake + 4_000,
    );
    let fx = s.handle(
        status_with(3, "completed", &[("CallDuration", "124")]),
        wake + 5_000,
    );
    let st = settlement(&fx).expect("settles");
    assert_eq!((st.charge, st.release), (145, 105));
    // The balance can't cover 145 - 105: charge what can be collected.
    let fx = s.handle(
        Event::Db(DbResult::SettleShort { balance: 30 }),
        wake + 5_100,
    );
    let st = settlement(&fx).expect("settles again");
    assert_eq!(st.charge, 135);
    assert_eq!(
        st.reason.as_deref(),
        Some("10 credits could not be collected.")
    );
    settle_ok(&mut s, wake + 5_200);
}

/// The longest call ends with the time-limit goodbye.
#[test]
fn max_duration() {
    let mut s = live();
    s.limits.idle_timeout_secs = 10_000;
    let mut now;
    loop {
        now = s.next_wake().expect("planned");
        let fx = fire(&mut s, now);
        for e in &fx {
            if let Effect::Db(DbOp::ReserveMinute { minute, .. }) = e {
                s.handle(
                    Event::Db(DbResult::Reserved {
                        minute: *minute,
                        balance: Some(1_000),
                    }),
                    now,
                );
            }
        }
        if let Some(DoToRelay::HangUp { reason, .. }) = sent(&fx)
            .into_iter()
            .find(|m| matches!(m, DoToRelay::HangUp { .. }))
        {
            assert_eq!(reason, "max_duration");
            break;
        }
    }
    assert_eq!(now, T0 + 5_000 + 900_000);
}

/// Silence: the persona checks in once, then says goodbye; if the relay never confirms,
/// Twilio ends the call and it settles from our measure.
#[test]
fn idle_check_in_then_goodbye_then_settles() {
    let mut s = live();
    s.limits.idle_timeout_secs = 20;
    let fx = fire(&mut s, T0 + 25_000);
    assert!(sent(&fx)
        .iter()
        .any(|m| matches!(m, DoToRelay::SayDelta { text, .. } if text == CHECK_IN_LINE)));
    let fx = fire(&mut s, T0 + 45_000);
    assert!(sent(&fx)
        .iter()
        .any(|m| matches!(m, DoToRelay::HangUp { reason, .. } if reason == "idle")));
    let wake = s.next_wake().expect("hang-up grace");
    // The default grace outlasts the relay's own 30 s bound on a goodbye.
    assert_eq!(s.limits.hang_up_grace_secs, 40);
    assert_eq!(wake, T0 + 85_000);
    let fx = fire(&mut s, wake);
    assert!(has(&fx, |e| matches!(
        e,
        Effect::TwilioHangUp {
            purpose: HangUpPurpose::Complete,
            ..
        }
    )));
    let wake = s.next_wake().expect("settle wait");
    let fx = fire(&mut s, wake);
    let st = settlement(&fx).expect("settles from our measure");
    assert_eq!(st.status, CallStatus::Completed);
    // Answered at +4 s; our measure stops when we asked Twilio to end it (+85 s).
    assert_eq!(st.duration_secs, 81);
}

// ---- cancel and end ----

/// Cancel: a scheduled call ends at once; a placed one through Twilio; a live one can't.
#[test]
fn cancel_in_every_state() {
    let (mut s, _) = Session::start(start(Some(T0 + 60_000)), T0);
    let fx = s.handle(Event::Cancel, T0 + 1);
    assert_eq!(end_unconnected(&fx), Some((CallStatus::Canceled, 0)));
    assert_eq!(s.reply.map(|r| r.canceled), Some(true));

    let mut s = placed();
    let fx = s.handle(Event::Cancel, T0 + 500);
    assert!(has(&fx, |e| matches!(
        e,
        Effect::TwilioHangUp {
            purpose: HangUpPurpose::Cancel,
            ..
        }
    )));
    let fx = s.handle(
        Event::Twilio(TwilioResult::HungUp {
            purpose: HangUpPurpose::Cancel,
            ok: true,
        }),
        T0 + 600,
    );
    assert_eq!(end_unconnected(&fx), Some((CallStatus::Canceled, 65)));
    assert_eq!(s.reply.map(|r| r.canceled), Some(true));

    // Create in flight: the call ends at once, and is canceled at Twilio as soon as
    // Twilio names it.
    let mut s = dialled();
    let fx = s.handle(Event::Cancel, T0 + 10);
    assert_eq!(end_unconnected(&fx), Some((CallStatus::Canceled, 65)));
    assert_eq!(s.reply.map(|r| r.canceled), Some(true));
    let fx = s.handle(
        Event::Twilio(TwilioResult::Created { sid: SID.into() }),
        T0 + 200,
    );
    assert!(has(&fx, |e| matches!(
        e,
        Effect::TwilioHangUp {
            purpose: HangUpPurpose::Cancel,
            ..
        }
    )));

    let mut s = live();
    let fx = s.handle(Event::Cancel, T0 + 6_000);
    assert_eq!(s.reply.map(|r| r.canceled), Some(false));
    assert!(sent(&fx).is_empty());

    let mut s = placed();
    s.handle(status(1, "ringing"), T0 + 1_000);
    s.handle(Event::Cancel, T0 + 1_100);
    assert_eq!(
        s.reply.map(|r| r.canceled),
        Some(false),
        "ringing: not user-cancelable"
    );
}

/// End (a ban): pending calls end, ringing ones are hung up, live ones get a goodbye.
#[test]
fn end_in_every_state() {
    let (mut s, _) = Session::start(start(Some(T0 + 60_000)), T0);
    let fx = s.handle(
        Event::End {
            reason: "banned".into(),
        },
        T0 + 1,
    );
    assert_eq!(
        end_unconnected(&fx).map(|e| e.0),
        Some(CallStatus::Canceled)
    );

    let mut s = placed();
    s.handle(status(1, "ringing"), T0 + 1_000);
    let fx = s.handle(
        Event::End {
            reason: "banned".into(),
        },
        T0 + 1_100,
    );
    assert!(has(&fx, |e| matches!(
        e,
        Effect::TwilioHangUp {
            purpose: HangUpPurpose::Cancel,
            ..
        }
    )));

    let mut s = live();
    let fx = s.handle(
        Event::End {
            reason: "banned".into(),
        },
        T0 + 6_000,
    );
    assert!(sent(&fx)
        .iter()
        .any(|m| matches!(m, DoToRelay::HangUp { goodbye: Some(g), .. } if g == ENDED_GOODBYE)));
    assert_eq!(s.reply.map(|r| r.canceled), Some(true));

    let mut s = placed();
    s.handle(status(1, "busy"), T0 + 1_000);
    s.handle(
        Event::End {
            reason: "banned".into(),
        },
        T0 + 1_100,
    );
    assert_eq!(s.reply.map(|r| r.canceled), Some(false));
}

/// Settlement that fails transiently is retried until it lands.
#[test]
fn settlement_retried() {
    let mut s = placed();
    s.handle(status(1, "busy"), T0 + 1_000);
    let fx = s.handle(
        Event::Db(DbResult::Failed {
            op: DbOpKind::Settle,
            message: "down".into(),
        }),
        T0 + 1_100,
    );
    assert_eq!(alarm(&fx), Some(Some(T0 + 6_100)));
    let fx = fire(&mut s, T0 + 6_100);
    assert_eq!(end_unconnected(&fx), Some((CallStatus::Busy, 65)));
    settle_ok(&mut s, T0 + 6_200);
}

/// An erasure's scrub: refused while the call is not settled; once it is, the number,
/// the words and the persona's prompt are gone and the accounting stays.
#[test]
fn a_settled_session_forgets_the_caller() {
    let mut s = live();
    user_says(&mut s, 2, "my name is robin", T0 + 6_000);
    let before = s.clone();
    assert!(!s.forget_personal(), "a live call keeps its state");
    assert_eq!(s, before);

    let fx = s.handle(status(3, "completed"), T0 + 20_000);
    assert!(settlement(&fx).is_some());
    assert!(
        !s.forget_personal(),
        "not before the final write is confirmed"
    );
    settle_ok(&mut s, T0 + 20_100);
    let charged = s.charged;
    assert!(s.conv.lines.iter().any(|l| l.text.contains("robin")));
    assert!(s.forget_personal());
    assert!(s.phone_number.is_empty());
    assert!(s.conv.lines.is_empty() && s.conv.outbox.is_empty());
    assert!(s.conv.persona.is_none() && s.llm.is_none());
    assert!(s.is_settled());
    assert_eq!(s.charged, charged);
    assert_eq!(s.status, CallStatus::Completed);
    assert!(!format!("{s:?}").contains("robin"));
}

// ---- the persona's tools ----

/// A reply: `text` streamed, then the end with `tool_calls`.
fn reply(
    s: &mut Session,
    text: &str,
    tool_calls: Vec<crate::tools::ToolCall>,
    at: u64,
) -> Vec<Effect> {
    let stream = s.active_stream().expect("a reply is streaming");
    if !text.is_empty() {
        s.handle(
            Event::Llm(LlmEvent::Delta {
                stream,
                text: text.into(),
                since_start_ms: 200,
            }),
            at,
        );
    }
    s.handle(
        Event::Llm(LlmEvent::Done {
            stream,
            prompt_tokens: 10,
            completion_tokens: 3,
            tool_calls,
        }),
        at + 10,
    )
}

fn end_call(args: &str) -> crate::tools::ToolCall {
    crate::tools::ToolCall {
        id: "call_1".into(),
        name: "end_call".into(),
        arguments: args.into(),
    }
}

fn hang_ups(effects: &[Effect]) -> Vec<(String, Option<String>)> {
    sent(effects)
        .into_iter()
        .filter_map(|m| match m {
            DoToRelay::HangUp { reason, goodbye } => Some((reason, goodbye)),
            _ => None,
        })
        .collect()
}

/// `end_call` after a goodbye: the goodbye is finished and the relay hangs up once it
/// has been heard; nothing more is said.
#[test]
fn end_call_hangs_up_after_the_goodbye_is_heard() {
    let mut s = live();
    user_says(&mut s, 2, "ok I have to go", T0 + 8_000);
    let fx = reply(
        &mut s,
        "Go get it, Sam. Bye!",
        vec![end_call(r#"{"reason":"caller had to go"}"#)],
        T0 + 8_500,
    );
    let said = sent(&fx);
    let end = said
        .iter()
        .position(|m| matches!(m, DoToRelay::SayEnd { .. }));
    let hang = said
        .iter()
        .position(|m| matches!(m, DoToRelay::HangUp { .. }));
    assert!(
        end.is_some() && end < hang,
        "the reply is finished first: {said:?}"
    );
    assert_eq!(hang_ups(&fx), vec![("persona_ended".to_string(), None)]);
    assert!(s
        .conv
        .lines
        .iter()
        .any(|l| l.speaker == Speaker::Assistant && l.text == "Go get it, Sam. Bye!"));
    // The caller's next words are not answered: the call is ending.
    let fx = user_says(&mut s, 3, "wait one more thing", T0 + 9_000);
    assert!(!has(&fx, |e| matches!(e, Effect::StartLlm { .. })));
}

/// `end_call` with nothing said: our goodbye is said, then the line drops.
#[test]
fn end_call_without_a_goodbye_says_ours() {
    let mut s = live();
    user_says(&mut s, 2, "bye", T0 + 8_000);
    let fx = reply(&mut s, "", vec![end_call("")], T0 + 8_500);
    assert_eq!(
        hang_ups(&fx),
        vec![(
            "persona_ended".to_string(),
            Some(PERSONA_GOODBYE.to_string())
        )]
    );
}

/// A tool call the model got wrong is logged and refused; the turn goes on as spoken.
#[test]
fn a_bad_tool_call_never_breaks_the_turn() {
    let mut s = live();
    user_says(&mut s, 2, "how are you", T0 + 8_000);
    let unknown = crate::tools::ToolCall {
        id: "call_9".into(),
        name: "transfer_money".into(),
        arguments: "{}".into(),
    };
    let fx = reply(
        &mut s,
        "Doing great!",
        vec![end_call("{\"reason\":"), unknown],
        T0 + 8_500,
    );
    assert!(hang_ups(&fx).is_empty(), "no hang-up on a malformed call");
    assert!(has(
        &fx,
        |e| matches!(e, Effect::Log { level: LogLevel::Warn, message } if message.contains("not JSON"))
    ));
    assert!(has(
        &fx,
        |e| matches!(e, Effect::Log { level: LogLevel::Warn, message } if message.contains("transfer_money"))
    ));
    assert!(sent(&fx)
        .iter()
        .any(|m| matches!(m, DoToRelay::SayEnd { .. })));
    assert!(
        started_messages(&fx).is_none(),
        "the spoken reply stands: no extra turn for the mistakes"
    );
    let fx = user_says(&mut s, 3, "cool", T0 + 9_000);
    assert!(
        has(&fx, |e| matches!(e, Effect::StartLlm { .. })),
        "the call goes on"
    );
}

fn schedule(id: &str, args: &str) -> crate::tools::ToolCall {
    crate::tools::ToolCall {
        id: id.into(),
        name: "schedule_callback".into(),
        arguments: args.into(),
    }
}

fn started_messages(effects: &[Effect]) -> Option<&Vec<crate::prompt::ChatMessage>> {
    effects.iter().find_map(|e| match e {
        Effect::StartLlm { messages, .. } => Some(messages),
        _ => None,
    })
}

/// "Call me back in ten minutes": the callback is booked through the shell, and its
/// result goes back to the LLM as a `tool` message answering the reply's call, so the
/// persona confirms it aloud in the caller's time.
#[test]
fn schedule_callback_is_booked_then_confirmed_aloud() {
    let mut s = live();
    user_says(
        &mut s,
        2,
        "call me back in ten minutes, I'm driving",
        T0 + 8_000,
    );
    let fx = reply(
        &mut s,
        "Sure thing.",
        vec![schedule("call_7", r#"{"delay_minutes":10}"#)],
        T0 + 8_500,
    );
    let booked = fx.iter().find_map(|e| match e {
        Effect::ScheduleCallback {
            tool_call_id,
            at_ms,
        } => Some((tool_call_id.clone(), *at_ms)),
        _ => None,
    });
    // Ten minutes from now, to the second.
    let at = (T0 + 8_510) / 1000 * 1000 + 600_000;
    assert_eq!(booked, Some(("call_7".to_string(), at)));
    // The booking goes out after the turn's own end.
    let say_end = fx.iter().position(|e| {
        matches!(e, Effect::ToRelay { frames, .. } if frames.iter().any(|f| matches!(f.msg, DoToRelay::SayEnd { .. })))
    });
    let booking = fx
        .iter()
        .position(|e| matches!(e, Effect::ScheduleCallback { .. }));
    assert!(say_end.is_some() && say_end < booking, "{fx:?}");
    assert!(
        started_messages(&fx).is_none(),
        "nothing to say before the result"
    );
    assert!(hang_ups(&fx).is_empty());

    let fx = s.handle(
        Event::Callback {
            tool_call_id: "call_7".into(),
            outcome: Ok(at),
        },
        T0 + 8_700,
    );
    let messages = started_messages(&fx).expect("the persona confirms");
    assert_eq!(
        offers_tools(&fx),
        Some(crate::tools::Offer::EndCallOnly),
        "the answer cannot book again"
    );
    let n = messages.len();
    assert_eq!(messages[n - 2].role, "assistant");
    assert_eq!(messages[n - 2].content, "Sure thing.");
    assert_eq!(messages[n - 2].tool_calls[0].id, "call_7");
    assert_eq!(messages[n - 1].role, "tool");
    assert_eq!(messages[n - 1].tool_call_id.as_deref(), Some("call_7"));
    let result: serde_json::Value = serde_json::from_str(&messages[n - 1].content).unwrap();
    assert_eq!(result["scheduled"], true);
    assert!(result["caller_local_time"]
        .as_str()
        .unwrap()
        .ends_with("(Europe/London)"));
}

fn offers_tools(effects: &[Effect]) -> Option<crate::tools::Offer> {
    effects.iter().find_map(|e| match e {
        Effect::StartLlm { tools, .. } => Some(*tools),
        _ => None,
    })
}

fn system_prompt(effects: &[Effect]) -> String {
    started_messages(effects).expect("a reply starts")[0]
        .content
        .clone()
}

/// Books the callback of `live()`'s call for ten minutes out and has it confirmed.
fn booked_and_confirmed(s: &mut Session) -> u64 {
    let fx = user_says(s, 2, "call me back in ten minutes", T0 + 8_000);
    assert_eq!(
        offers_tools(&fx),
        Some(crate::tools::Offer::All),
        "an ordinary reply offers both"
    );
    reply(
        s,
        "Sure thing.",
        vec![schedule("call_7", r#"{"delay_minutes":10}"#)],
        T0 + 8_500,
    );
    let at = T0 + 608_000;
    s.handle(
        Event::Callback {
            tool_call_id: "call_7".into(),
            outcome: Ok(at),
        },
        T0 + 8_700,
    );
    at
}

/// Tool rounds never chain: the reply that answers a result is offered only `end_call`,
/// and a booking it makes anyway is not acted on.
#[test]
fn the_answer_to_a_tool_result_cannot_call_tools() {
    let mut s = live();
    booked_and_confirmed(&mut s);
    let fx = reply(
        &mut s,
        "Done, I'll call you at 10:25.",
        vec![schedule("call_8", r#"{"delay_minutes":20}"#)],
        T0 + 9_000,
    );
    assert!(!has(&fx, |e| matches!(e, Effect::ScheduleCallback { .. })));
    assert!(started_messages(&fx).is_none(), "no further round");
    assert!(s
        .conv
        .lines
        .iter()
        .any(|l| l.text == "Done, I'll call you at 10:25."));
}

/// One callback per call: once booked, another is refused for the model, and every later
/// prompt says what was booked.
#[test]
fn one_callback_per_call() {
    let mut s = live();
    let at = booked_and_confirmed(&mut s);
    reply(&mut s, "Booked for 10:25.", vec![], T0 + 9_000);
    let fx = user_says(&mut s, 3, "and call me tomorrow too", T0 + 10_000);
    assert!(system_prompt(&fx).contains("You booked a callback on this call for"));
    let fx = reply(
        &mut s,
        "",
        vec![schedule("call_9", r#"{"delay_minutes":1440}"#)],
        T0 + 10_500,
    );
    assert!(!has(&fx, |e| matches!(e, Effect::ScheduleCallback { .. })));
    let result = &started_messages(&fx)
        .expect("told at once")
        .last()
        .unwrap()
        .content;
    assert!(result.contains("already booked"), "{result}");
    assert_eq!(
        s.conv.callback,
        Some(crate::tools::CallbackState::Booked { at_ms: at })
    );
}

/// A refused callback (limits, credits) is reported to the model, which explains it.
#[test]
fn a_refused_callback_is_explained() {
    let mut s = live();
    user_says(&mut s, 2, "call me tomorrow", T0 + 8_000);
    reply(
        &mut s,
        "",
        vec![schedule("call_1", r#"{"delay_minutes":1440}"#)],
        T0 + 8_500,
    );
    let fx = s.handle(
        Event::Callback {
            tool_call_id: "call_1".into(),
            outcome: Err("You already have 5 scheduled calls.".into()),
        },
        T0 + 8_700,
    );
    let messages = started_messages(&fx).expect("the persona explains");
    let last = messages.last().unwrap();
    assert_eq!(last.role, "tool");
    assert!(
        last.content.contains("\"scheduled\":false") && last.content.contains("5 scheduled calls")
    );
    // The assistant message with the call stands on its own when nothing was said.
    let call = &messages[messages.len() - 2];
    assert_eq!(
        (call.role.as_str(), call.content.as_str()),
        ("assistant", "")
    );
}

/// An out-of-range time never reaches the shell; the model gets the reason at once.
#[test]
fn a_bad_callback_time_goes_back_to_the_model() {
    let mut s = live();
    user_says(&mut s, 2, "call me in a year", T0 + 8_000);
    let fx = reply(
        &mut s,
        "",
        vec![schedule("call_2", r#"{"delay_minutes":525600}"#)],
        T0 + 8_500,
    );
    assert!(!has(&fx, |e| matches!(e, Effect::ScheduleCallback { .. })));
    let messages = started_messages(&fx).expect("answered at once");
    assert!(messages.last().unwrap().content.contains("delay_minutes"));
}

/// The caller speaking before the result is in: the round is dropped with the old turn,
/// and the late result says nothing.
#[test]
fn a_late_callback_result_after_the_caller_spoke_says_nothing() {
    let mut s = live();
    user_says(&mut s, 2, "call me back later", T0 + 8_000);
    reply(
        &mut s,
        "",
        vec![schedule("call_3", r#"{"delay_minutes":30}"#)],
        T0 + 8_500,
    );
    user_says(&mut s, 3, "actually never mind", T0 + 9_000);
    let fx = s.handle(
        Event::Callback {
            tool_call_id: "call_3".into(),
            outcome: Ok(T0 + 1_800_000),
        },
        T0 + 9_100,
    );
    assert!(started_messages(&fx).is_none());
    // It is not lost: the next prompt says it was booked.
    reply(&mut s, "Okay.", vec![], T0 + 9_500);
    let fx = user_says(&mut s, 4, "wait, did you book it?", T0 + 10_000);
    assert!(system_prompt(&fx).contains("You booked a callback on this call for"));
}

/// "Call me back in ten, bye": booked and hung up in one reply. The callback is still
/// booked, after the hang-up is on its way; nothing more is said.
#[test]
fn a_callback_with_the_goodbye_is_still_booked() {
    let mut s = live();
    user_says(&mut s, 2, "call me back in ten, bye", T0 + 8_000);
    let fx = reply(
        &mut s,
        "Will do. Bye!",
        vec![
            schedule("call_4", r#"{"delay_minutes":10}"#),
            end_call("{}"),
        ],
        T0 + 8_500,
    );
    let hang = fx.iter().position(|e| {
        matches!(e, Effect::ToRelay { frames, .. } if frames.iter().any(|f| matches!(f.msg, DoToRelay::HangUp { .. })))
    });
    let booking = fx
        .iter()
        .position(|e| matches!(e, Effect::ScheduleCallback { .. }));
    assert!(hang.is_some() && hang < booking, "{fx:?}");
    let fx = s.handle(
        Event::Callback {
            tool_call_id: "call_4".into(),
            outcome: Ok(T0 + 608_000),
        },
        T0 + 8_700,
    );
    assert!(started_messages(&fx).is_none());
    assert!(matches!(
        s.conv.callback,
        Some(crate::tools::CallbackState::Booked { .. })
    ));
}

// ---- memory ----

fn remembers(effects: &[Effect]) -> Vec<&Vec<TranscriptLine>> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Remember { lines, .. } => Some(lines),
            _ => None,
        })
        .collect()
}

/// A call the caller spoke in is remembered once, after its settlement is written (and
/// not again when a late or repeated `Settled` arrives).
#[test]
fn a_settled_conversation_is_remembered_once() {
    let mut s = live();
    user_says(&mut s, 2, "I want to run 5 km by Friday.", T0 + 8_000);
    let fx = s.handle(status(3, "completed"), T0 + 20_000);
    assert!(settlement(&fx).is_some(), "the final write comes first");
    assert!(
        remembers(&fx).is_empty(),
        "nothing before the settlement is written"
    );
    let fx = s.handle(Event::Db(DbResult::Settled), T0 + 20_100);
    let lines = remembers(&fx);
    assert_eq!(lines.len(), 1);
    assert!(lines[0]
        .iter()
        .any(|l| l.role == Speaker::User && l.text.contains("5 km by Friday")));
    let fx = s.handle(Event::Db(DbResult::Settled), T0 + 20_200);
    assert!(remembers(&fx).is_empty(), "once");
}

fn settled(effects: &[Effect]) -> Vec<CallStatus> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Settled { status } => Some(*status),
            _ => None,
        })
        .collect()
}

/// What follows a call (a schedule's next attempt) is told once, when the final record
/// is written, for answered and unanswered calls alike.
#[test]
fn the_shell_is_told_once_when_the_final_record_is_written() {
    let mut s = live();
    let fx = s.handle(status(3, "completed"), T0 + 20_000);
    assert!(settled(&fx).is_empty(), "not before the write is confirmed");
    let fx = s.handle(Event::Db(DbResult::Settled), T0 + 20_100);
    assert_eq!(settled(&fx), [CallStatus::Completed]);
    let fx = s.handle(Event::Db(DbResult::Settled), T0 + 20_200);
    assert!(settled(&fx).is_empty(), "once");

    let mut s = placed();
    let fx = s.handle(status(1, "no-answer"), T0 + 30_000);
    assert!(end_unconnected(&fx).is_some());
    assert!(settled(&fx).is_empty(), "not before the write is confirmed");
    let fx = s.handle(Event::Db(DbResult::Settled), T0 + 30_100);
    assert_eq!(settled(&fx), [CallStatus::NoAnswer]);
}

/// A call where the caller never spoke, or that never connected, leaves no memory.
#[test]
fn silent_and_unconnected_calls_are_not_remembered() {
    let mut s = live();
    let fx = s.handle(status(3, "completed"), T0 + 20_000);
    assert!(settlement(&fx).is_some(), "the final write is in flight");
    let fx = s.handle(Event::Db(DbResult::Settled), T0 + 20_100);
    assert!(
        s.is_settled(),
        "the settlement landed, so Remember would be due now"
    );
    assert!(remembers(&fx).is_empty());

    let mut s = placed();
    let fx = s.handle(status(1, "no-answer"), T0 + 30_000);
    assert!(
        end_unconnected(&fx).is_some(),
        "the final write is in flight"
    );
    let fx = s.handle(Event::Db(DbResult::Settled), T0 + 30_100);
    assert!(s.is_settled());
    assert!(remembers(&fx).is_empty());
}

// ---- properties ----

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// What the outside world does next.
    #[derive(Debug, Clone)]
    enum Step {
        /// Let time pass to the next alarm (or by this much when none).
        Wait(u32),
        Status(u8, Option<u32>),
        Cancel,
        End,
        Answered(bool),
        RelayOpen,
        RelayReady(u8),
        RelayTurn,
        RelayEnded,
        RelayClose,
        LlmDelta,
        LlmDone,
        LlmFail,
        /// The caller pauses on "hi" (`speculate`), or speaks on (`drop_speculation`).
        RelaySpeculate(bool),
        /// An event of the speculative stream: delta, done, failure.
        SpecLlm(u8),
        Spend(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u32..120_000).prop_map(Step::Wait),
            2 => (0u8..8, proptest::option::of(0u32..400)).prop_map(|(s, d)| Step::Status(s, d)),
            1 => Just(Step::Cancel),
            1 => Just(Step::End),
            1 => any::<bool>().prop_map(Step::Answered),
            1 => Just(Step::RelayOpen),
            1 => (0u8..3).prop_map(Step::RelayReady),
            2 => Just(Step::RelayTurn),
            1 => Just(Step::RelayEnded),
            1 => Just(Step::RelayClose),
            2 => Just(Step::LlmDelta),
            1 => Just(Step::LlmDone),
            1 => Just(Step::LlmFail),
            1 => any::<bool>().prop_map(Step::RelaySpeculate),
            1 => (0u8..3).prop_map(Step::SpecLlm),
            1 => (0u8..200).prop_map(Step::Spend),
        ]
    }

    /// The world's answers to effects: Twilio and the database, each either working or
    /// failing in the ways they can.
    #[derive(Debug, Clone)]
    struct Answers {
        twilio: Vec<u8>,
        db: Vec<u8>,
    }

    /// A tiny database: the user's balance, the ledger keys applied, the call's final
    /// record.
    struct World {
        s: Session,
        now: u64,
        balance: i64,
        keys: Vec<String>,
        /// The final status written, and whether a later write changed it.
        final_status: Option<CallStatus>,
        final_changed: bool,
        /// Credits other activity took from the balance meanwhile.
        spent: i64,
        creates_accepted: u32,
        answers: Answers,
        ai: usize,
        conn: u32,
        rseq: u64,
        twilio_up: bool,
    }

    const STATUSES: [&str; 8] = [
        "initiated",
        "ringing",
        "in-progress",
        "completed",
        "busy",
        "no-answer",
        "failed",
        "canceled",
    ];

    impl World {
        fn pick(&mut self, twilio: bool) -> u8 {
            self.ai += 1;
            let v = if twilio {
                &self.answers.twilio
            } else {
                &self.answers.db
            };
            v[self.ai % v.len()]
        }

        fn apply(&mut self, event: Event) {
            let mut queue = std::collections::VecDeque::from(self.s.handle(event, self.now));
            while let Some(e) = queue.pop_front() {
                if let Some(ev) = self.run(e) {
                    queue.extend(self.s.handle(ev, self.now));
                }
            }
        }

        fn write_final(&mut self, status: CallStatus) {
            if self.final_status.is_some_and(|s| s != status) {
                self.final_changed = true;
            }
            self.final_status = Some(status);
        }

        fn ledger(&mut self, key: String, amount: i64) -> Result<bool, ()> {
            if self.keys.contains(&key) {
                return Ok(true);
            }
            if self.balance + amount < 0 {
                return Err(());
            }
            self.balance += amount;
            self.keys.push(key);
            Ok(true)
        }

        fn run(&mut self, e: Effect) -> Option<Event> {
            match e {
                Effect::TwilioCreate { .. } => Some(Event::Twilio(match self.pick(true) % 5 {
                    0 => TwilioResult::CreateRateLimited,
                    1 => TwilioResult::CreateUnknown {
                        message: "timeout".into(),
                    },
                    2 => TwilioResult::CreateRefused {
                        message: "21211".into(),
                    },
                    _ => {
                        self.creates_accepted += 1;
                        TwilioResult::Created { sid: SID.into() }
                    }
                })),
                Effect::TwilioFetch { .. } | Effect::TwilioFind { .. } => {
                    let r = self.pick(true);
                    Some(Event::Twilio(if !self.twilio_up || r.is_multiple_of(3) {
                        TwilioResult::LookFailed {
                            message: "503".into(),
                        }
                    } else {
                        let found = self.creates_accepted > 0;
                        TwilioResult::Looked {
                            sid: found.then(|| SID.to_string()),
                            call: found.then(|| TwilioCall {
                                status: STATUSES[(r as usize) % STATUSES.len()].into(),
                                duration_secs: Some(u32::from(r)),
                                answered_by: None,
                            }),
                        }
                    }))
                }
                Effect::TwilioHangUp { purpose, .. } => {
                    let ok = self.twilio_up && !self.pick(true).is_multiple_of(4);
                    Some(Event::Twilio(TwilioResult::HungUp { purpose, ok }))
                }
                Effect::Db(op) => self.db(op),
                _ => None,
            }
        }

        fn db(&mut self, op: DbOp) -> Option<Event> {
            let fail = self.pick(false).is_multiple_of(5);
            let id = self.s.call_id.clone();
            match op {
                DbOp::ReserveScheduled { key, amount }
                | DbOp::ReserveMinute { key, amount, .. } => {
                    let minute = if key == format!("reserve:{id}") {
                        1
                    } else {
                        self.s.minutes_reserved + 1
                    };
                    if fail {
                        return Some(Event::Db(DbResult::Failed {
                            op: DbOpKind::Reserve,
                            message: "x".into(),
                        }));
                    }
                    Some(Event::Db(match self.ledger(key, -amount) {
                        // Like the shell: the balance comes back with the first minute only.
                        Ok(_) => DbResult::Reserved {
                            minute,
                            balance: (minute == 1).then_some(self.balance),
                        },
                        Err(()) => DbResult::ReserveRefused {
                            minute,
                            why: Refusal::Credits,
                        },
                    }))
                }
                DbOp::EndUnconnected {
                    release, status, ..
                } => {
                    if fail {
                        return Some(Event::Db(DbResult::Failed {
                            op: DbOpKind::Settle,
                            message: "x".into(),
                        }));
                    }
                    if release != 0 {
                        let _ = self.ledger(format!("release:{id}"), release);
                    }
                    self.write_final(status);
                    Some(Event::Db(DbResult::Settled))
                }
                DbOp::Settle(st) => {
                    if fail {
                        return Some(Event::Db(DbResult::Failed {
                            op: DbOpKind::Settle,
                            message: "x".into(),
                        }));
                    }
                    if self.keys.contains(&format!("settle:{id}")) {
                        return Some(Event::Db(DbResult::Settled));
                    }
                    if self.balance + st.release - st.charge < 0 {
                        return Some(Event::Db(DbResult::SettleShort {
                            balance: self.balance,
                        }));
                    }
                    self.balance += st.release - st.charge;
                    self.keys.push(format!("release:{id}"));
                    self.keys.push(format!("settle:{id}"));
                    self.write_final(st.status);
                    Some(Event::Db(DbResult::Settled))
                }
                _ => None,
            }
        }

        fn step(&mut self, step: Step) {
            match step {
                Step::Wait(ms) => {
                    self.now = match self.s.next_wake() {
                        Some(t) => t.max(self.now),
                        None => self.now + u64::from(ms),
                    };
                    self.apply(Event::Alarm);
                }
                Step::Status(i, d) => {
                    self.now += 500;
                    let seq = self.s.last_seq + 1 + i64::from(i % 2);
                    let mut extra = vec![];
                    let dur;
                    if let Some(d) = d {
                        dur = d.to_string();
                        extra.push(("CallDuration", dur.as_str()));
                    }
                    if self.creates_accepted > 0 {
                        self.apply(status_with(seq, STATUSES[i as usize], &extra));
                    }
                }
                Step::Cancel => self.apply(Event::Cancel),
                Step::End => self.apply(Event::End {
                    reason: "ban".into(),
                }),
                Step::Answered(machine) => self.apply(Event::Answered {
                    answered_by: Some(if machine { "machine_start" } else { "human" }.into()),
                }),
                Step::RelayOpen => {
                    self.conn += 1;
                    self.apply(Event::RelayOpened {
                        conn: self.conn,
                        persona: persona(),
                    });
                }
                Step::RelayReady(k) => {
                    self.rseq += 1;
                    let stream = if k == 2 { "MZ-other" } else { "MZ1" };
                    self.apply(Event::RelayFrame {
                        conn: self.conn,
                        frame: frame(
                            self.rseq,
                            RelayToDo::Ready {
                                call_sid: SID.into(),
                                stream_sid: stream.into(),
                                resume_from: (k == 1).then_some(self.s.conv.out_seq / 2),
                            },
                        ),
                    });
                }
                Step::RelayTurn | Step::RelayEnded => {
                    self.rseq += 1;
                    self.now += 1_000;
                    let msg = if matches!(step, Step::RelayTurn) {
                        turn("hi")
                    } else {
                        RelayToDo::Ended {
                            reason: "stop".into(),
                        }
                    };
                    self.apply(Event::RelayFrame {
                        conn: self.conn,
                        frame: frame(self.rseq, msg),
                    });
                }
                Step::RelayClose => self.apply(Event::RelayClosed { conn: self.conn }),
                Step::RelaySpeculate(pause) => {
                    self.rseq += 1;
                    self.now += 200;
                    let msg = match pause {
                        true => RelayToDo::Speculate { text: "hi".into() },
                        false => RelayToDo::DropSpeculation,
                    };
                    self.apply(Event::RelayFrame {
                        conn: self.conn,
                        frame: frame(self.rseq, msg),
                    });
                }
                Step::SpecLlm(k) => {
                    let Some(stream) = self.s.spec.as_ref().map(|sp| sp.stream) else {
                        return;
                    };
                    self.now += 100;
                    self.apply(Event::Llm(llm_event(stream, k)));
                }
                Step::LlmDelta | Step::LlmDone | Step::LlmFail => {
                    let stream = self.s.active_stream().unwrap_or(0);
                    self.now += 100;
                    let k = match step {
                        Step::LlmDelta => 0,
                        Step::LlmDone => 1,
                        _ => 2,
                    };
                    self.apply(Event::Llm(llm_event(stream, k)));
                }
                Step::Spend(n) => {
                    // Other calls or refunds move the balance meanwhile.
                    let after = (self.balance - i64::from(n)).max(0);
                    self.spent += self.balance - after;
                    self.balance = after;
                }
            }
        }
    }

    /// An LLM stream's event: 0 a delta, 1 done, else a time-out.
    fn llm_event(stream: u32, k: u8) -> LlmEvent {
        match k {
            0 => LlmEvent::Delta {
                stream,
                text: "yo ".into(),
                since_start_ms: 100,
            },
            1 => LlmEvent::Done {
                stream,
                prompt_tokens: 5,
                completion_tokens: 5,
                tool_calls: Vec::new(),
            },
            _ => LlmEvent::Failed {
                stream,
                timed_out: true,
                message: "t".into(),
            },
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// Over any sequence of events and provider behaviour: at most one create Twilio
        /// could have accepted, a final record that never changes once written, the
        /// balance never negative, and — once the outside world goes quiet (Twilio down,
        /// nothing else arriving) — a final status within a bounded time, with every
        /// reserved credit back but the charge.
        #[test]
        fn invariants(
            scheduled in any::<bool>(),
            steps in proptest::collection::vec(step(), 0..60),
            twilio in proptest::collection::vec(any::<u8>(), 1..8),
            db in proptest::collection::vec(any::<u8>(), 1..8),
        ) {
            let st = start(scheduled.then_some(T0 + 30_000));
            let balance = 200 - st.reserved;
            let (s, fx) = Session::start(st, T0);
            let mut w = World {
                s, now: T0, balance, keys: vec![], final_status: None, final_changed: false, spent: 0, creates_accepted: 0,
                answers: Answers { twilio, db }, ai: 0, conn: 0, rseq: 0, twilio_up: true,
            };
            if !scheduled {
                w.keys.push("reserve:call-1".into());
            }
            let mut queue = std::collections::VecDeque::from(fx);
            while let Some(e) = queue.pop_front() {
                if let Some(ev) = w.run(e) {
                    queue.extend(w.s.handle(ev, w.now));
                }
            }
            for step in steps {
                w.step(step);
                prop_assert!(w.s.creates - w.s.rate_limited <= 1, "dialled twice: {:?}", w.s.dial);
                prop_assert!(!w.final_changed, "the final record changed");
                prop_assert!(w.balance >= 0);
                prop_assert!(w.s.reserved >= 0);
            }
            // The world goes quiet: only alarms, Twilio unreachable, the database fine.
            w.twilio_up = false;
            w.answers.db = vec![1];
            w.answers.twilio = vec![0];
            let quiet_from = w.now;
            let mut guard = 0;
            while !w.s.is_settled() {
                guard += 1;
                prop_assert!(guard < 500, "no progress: {:?}", w.s);
                let Some(next) = w.s.next_wake() else {
                    prop_assert!(false, "wedged with no alarm: {:?}", w.s);
                    break;
                };
                w.now = next.max(w.now);
                w.apply(Event::Alarm);
            }
            let bound = 40 * 60_000; // 30-day schedules aside, well inside an hour
            prop_assert!(w.now - quiet_from <= bound, "took {} ms to settle", w.now - quiet_from);
            prop_assert!(w.final_status.is_some(), "no final record");
            prop_assert!(!w.final_changed, "the final record changed");
            // Exact money: whatever was reserved came back, less the charge.
            prop_assert_eq!(w.balance, 200 - w.spent - w.s.charged);
            prop_assert!(w.balance >= 0);
            prop_assert!(w.s.charged <= 200, "charged more than the user ever had");
            prop_assert!(w.s.creates - w.s.rate_limited <= 1);
            prop_assert!(w.s.spec.is_none(), "a speculation outlived the call");
        }
    }
}

// ---- speculative replies ----

/// The relay's frame `seq`: the caller paused on `text`.
fn pause_on(s: &mut Session, seq: u64, text: &str, at: u64) -> Vec<Effect> {
    s.handle(
        Event::RelayFrame {
            conn: 0,
            frame: frame(seq, RelayToDo::Speculate { text: text.into() }),
        },
        at,
    )
}

/// Whether `effects` cancel LLM stream `stream`.
fn cancelled(effects: &[Effect], stream: u32) -> bool {
    has(
        effects,
        |e| matches!(e, Effect::CancelLlm { stream: x } if *x == stream),
    )
}

fn started_streams(effects: &[Effect]) -> Vec<(u32, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::StartLlm {
                stream, messages, ..
            } => Some((*stream, messages.last().map(|m| m.content.clone())?)),
            _ => None,
        })
        .collect()
}

fn said(effects: &[Effect]) -> Vec<(u32, String)> {
    sent(effects)
        .into_iter()
        .filter_map(|m| match m {
            DoToRelay::SayDelta { turn, text } => Some((turn, text)),
            _ => None,
        })
        .collect()
}

fn llm_delta(stream: u32, text: &str, since_start_ms: u32) -> Event {
    Event::Llm(LlmEvent::Delta {
        stream,
        text: text.into(),
        since_start_ms,
    })
}

/// `hello` tells the relay to speculate only when the call's limits say so.
#[test]
fn hello_carries_the_speculation_switch() {
    let s = live();
    assert!(s.limits.speculate);
    let mut s = placed();
    s.limits.speculate = false;
    s.handle(status(2, "in-progress"), T0 + 4_000);
    let fx = open_relay(&mut s, T0 + 5_000);
    assert!(matches!(
        sent(&fx).first(),
        Some(DoToRelay::Hello {
            speculate: false,
            speculate_after_ms: None,
            ..
        })
    ));
    // Speculating, it says how far into a pause to start.
    let mut s = placed();
    s.limits.speculate_after_ms = 40;
    s.handle(status(2, "in-progress"), T0 + 4_000);
    let fx = open_relay(&mut s, T0 + 5_000);
    assert!(matches!(
        sent(&fx).first(),
        Some(DoToRelay::Hello {
            speculate: true,
            speculate_after_ms: Some(40),
            ..
        })
    ));
}

/// A speculation streams with the caller's words as the last message, says nothing;
/// when the turn is confirmed with the same words it becomes the reply: what it produced
/// is spoken at once, its first token (which came before the end of turn) counts as 0 ms,
/// and the rest streams as usual.
#[test]
fn a_confirmed_speculation_is_spoken_at_once() {
    let mut s = live();
    let fx = pause_on(&mut s, 2, "what should I train", T0 + 6_000);
    let started = started_streams(&fx);
    assert_eq!(started.len(), 1);
    let (stream, last) = started[0].clone();
    assert_eq!(last, "what should I train");
    assert_eq!(s.active_stream(), None, "nothing is the turn's reply yet");
    assert!(s.wants_stream(stream), "the shell keeps reading it");
    let fx = s.handle(llm_delta(stream, "Legs, ", 250), T0 + 6_250);
    assert!(
        sent(&fx).is_empty(),
        "a speculation is never spoken before the turn"
    );
    let fx = user_says(&mut s, 3, "what should I train", T0 + 6_300);
    assert!(started_streams(&fx).is_empty(), "no second request");
    assert_eq!(said(&fx), [(1, "Legs, ".to_string())]);
    assert_eq!(s.active_stream(), Some(stream));
    let fx = reply(&mut s, "bro.", vec![], T0 + 6_400);
    assert!(sent(&fx).contains(&DoToRelay::SayEnd { turn: 1 }));
    let line = s.conv.lines.last().expect("reply line");
    assert_eq!(line.text, "Legs, bro.");
    assert_eq!(line.turn, Some(1));
    assert_eq!(
        s.conv.latencies.iter().find(|l| l.0 == 1).and_then(|l| l.2),
        Some(0)
    );
    assert_eq!(s.conv.speculation.started, 1);
    assert_eq!(s.conv.speculation.used, 1);
    assert_eq!(s.conv.speculation.wasted_tokens, 0);
    assert_eq!(s.conv.llm_prompt_tokens, 10);
}

/// A speculation that finished before the turn was confirmed is whole: the reply is
/// spoken and closed at once, with its exact usage.
#[test]
fn a_finished_speculation_is_the_whole_reply() {
    let mut s = live();
    let fx = pause_on(&mut s, 2, "hi", T0 + 6_000);
    let stream = started_streams(&fx)[0].0;
    s.handle(llm_delta(stream, "Hey!", 250), T0 + 6_250);
    s.handle(
        Event::Llm(LlmEvent::Done {
            stream,
            prompt_tokens: 42,
            completion_tokens: 2,
            tool_calls: vec![],
        }),
        T0 + 6_260,
    );
    assert!(s.spec.is_some());
    let fx = user_says(&mut s, 3, "hi", T0 + 6_300);
    assert_eq!(said(&fx), [(1, "Hey!".to_string())]);
    assert!(sent(&fx).contains(&DoToRelay::SayEnd { turn: 1 }));
    assert!(s.llm.is_none() && s.spec.is_none());
    assert_eq!(s.conv.llm_prompt_tokens, 42);
    assert_eq!(s.conv.llm_completion_tokens, 2);
}

/// Other words, the caller speaking on, or a changed conversation void a speculation:
/// its stream is cancelled, what it cost is counted, and none of it is ever spoken.
#[test]
fn a_void_speculation_is_cancelled_counted_and_never_spoken() {
    // The confirmed turn has more words.
    let mut s = live();
    let fx = pause_on(&mut s, 2, "so", T0 + 6_000);
    let first = started_streams(&fx)[0].0;
    s.handle(llm_delta(first, "So what?", 250), T0 + 6_250);
    let fx = user_says(&mut s, 3, "so legs today", T0 + 6_800);
    assert!(cancelled(&fx, first));
    let started = started_streams(&fx);
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].1, "so legs today");
    assert!(said(&fx).is_empty());
    let wasted = s.conv.speculation.wasted_tokens;
    assert!(wasted > 0);
    assert_eq!(
        s.conv.llm_prompt_tokens + s.conv.llm_completion_tokens,
        wasted
    );
    // Late deltas of the cancelled stream go nowhere.
    let fx = s.handle(llm_delta(first, "late", 300), T0 + 6_900);
    assert!(said(&fx).is_empty());

    // The caller spoke again: the relay drops it.
    let mut s = live();
    let fx = pause_on(&mut s, 2, "so", T0 + 6_000);
    let stream = started_streams(&fx)[0].0;
    let fx = s.handle(
        Event::RelayFrame {
            conn: 0,
            frame: frame(3, RelayToDo::DropSpeculation),
        },
        T0 + 6_100,
    );
    assert!(cancelled(&fx, stream));
    assert!(s.spec.is_none());
    assert!(!s.wants_stream(stream), "the shell stops reading it");
    assert_eq!(s.conv.speculation.started, 1);
    assert_eq!(s.conv.speculation.used, 0);

    // The same words, but the conversation changed meanwhile (the greeting was cut
    // short after the speculation began): the prompt would differ.
    let mut s = live();
    let fx = pause_on(&mut s, 2, "hi", T0 + 6_000);
    let stream = started_streams(&fx)[0].0;
    s.handle(
        Event::RelayFrame {
            conn: 0,
            frame: frame(
                3,
                RelayToDo::Interrupted {
                    turn: 0,
                    heard_text: "Y".into(),
                },
            ),
        },
        T0 + 6_050,
    );
    let fx = user_says(&mut s, 4, "hi", T0 + 6_300);
    assert!(cancelled(&fx, stream));
    assert_eq!(started_streams(&fx).len(), 1);

    // The same words and lines, but the system prompt changed meanwhile (what a
    // callback's booking adds to it, say): the prompt would differ.
    let mut s = live();
    let fx = pause_on(&mut s, 2, "hi", T0 + 6_000);
    let stream = started_streams(&fx)[0].0;
    if let Some(p) = s.conv.persona.as_mut() {
        p.system_prompt.push_str(" A callback is booked.");
    }
    let fx = user_says(&mut s, 3, "hi", T0 + 6_300);
    assert!(cancelled(&fx, stream));
    assert_eq!(started_streams(&fx).len(), 1);
}

/// No speculation while a reply streams, when switched off, or once discarded
/// speculations have cost the call's cap; a new pause replaces the last speculation.
#[test]
fn speculation_only_between_replies_within_its_cap() {
    let mut s = live();
    user_says(&mut s, 2, "hi", T0 + 6_000);
    assert!(started_streams(&pause_on(&mut s, 3, "and", T0 + 6_100)).is_empty());

    let mut s = live();
    s.limits.speculate = false;
    assert!(started_streams(&pause_on(&mut s, 2, "hi", T0 + 6_000)).is_empty());

    let mut s = live();
    let first = started_streams(&pause_on(&mut s, 2, "so", T0 + 6_000))[0].0;
    let fx = pause_on(&mut s, 3, "so legs", T0 + 6_500);
    assert!(cancelled(&fx, first));
    assert_eq!(started_streams(&fx)[0].1, "so legs");

    let mut s = live();
    s.conv.speculation.wasted_tokens = 20_000;
    assert!(started_streams(&pause_on(&mut s, 2, "hi", T0 + 6_000)).is_empty());
    // The turn itself is answered as usual.
    assert_eq!(
        started_streams(&user_says(&mut s, 3, "hi", T0 + 6_300)).len(),
        1
    );
}

/// A speculation that fails is counted and dropped; the turn gets its own stream.
#[test]
fn a_failed_speculation_leaves_the_turn_to_a_fresh_stream() {
    let mut s = live();
    let stream = started_streams(&pause_on(&mut s, 2, "hi", T0 + 6_000))[0].0;
    let fx = s.handle(
        Event::Llm(LlmEvent::Failed {
            stream,
            timed_out: false,
            message: "503".into(),
        }),
        T0 + 6_100,
    );
    assert!(sent(&fx).is_empty(), "no fallback line for a speculation");
    assert!(s.spec.is_none());
    assert_eq!(
        started_streams(&user_says(&mut s, 3, "hi", T0 + 6_300)).len(),
        1
    );
}

/// Every integer in `v` is one a JavaScript number holds exactly (the DO stores the
/// session through JS).
fn fits_js_numbers(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Number(n) => n.as_u64().is_none_or(|u| u < (1 << 53)),
        serde_json::Value::Array(a) => a.iter().all(fits_js_numbers),
        serde_json::Value::Object(o) => o.values().all(fits_js_numbers),
        _ => true,
    }
}

/// A session holding a speculation can be stored: its fingerprint is a JS-safe number.
#[test]
fn a_speculating_session_stores_as_javascript_numbers() {
    let mut s = live();
    for (i, text) in ["hi", "what should I train today", "so"].iter().enumerate() {
        pause_on(&mut s, 2 + i as u64, text, T0 + 6_000 + i as u64);
        assert!(s.spec.is_some());
        let stored = serde_json::to_value(&s).unwrap();
        assert!(fits_js_numbers(&stored), "{stored}");
    }
}
