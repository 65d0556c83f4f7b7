//! Unit tests of the call state machine, with explicit times (no clock, no sleeps).

use super::*;

fn hello(greeting: &str) -> Event {
    Event::Hello {
        greeting: greeting.into(),
        max_duration_secs: 0,
        idle_timeout_secs: 0,
        speculate_endpointing_ms: None,
        speculate_after_ms: None,
        fast_barge_in: false,
    }
}

/// Fake TTS output for `text`: `ms_per_char` of audio per non-whitespace character, with
/// the alignment a server would send for it.
fn speech(text: &str, ms_per_char: u32) -> (Vec<u8>, Vec<u32>) {
    let n = u32::try_from(nonws_count(text)).expect("small");
    let audio = vec![0x7f; (n * ms_per_char * 8) as usize];
    let starts = (0..n).map(|i| i * ms_per_char).collect();
    (audio, starts)
}

fn audio_event(ctx: u32, text: &str, ms_per_char: u32) -> Event {
    let (audio, starts) = speech(text, ms_per_char);
    Event::TtsAudio {
        ctx,
        audio,
        char_starts_ms: Some(starts),
    }
}

fn texts(actions: &[Action]) -> Vec<(u32, &str)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Tts(TtsCommand::Text {
                ctx,
                text,
                flush: true,
            }) => Some((*ctx, text.as_str())),
            _ => None,
        })
        .collect()
}

fn media_bytes(actions: &[Action]) -> usize {
    actions
        .iter()
        .map(|a| {
            if let Action::Media(f) = a {
                f.bytes().len()
            } else {
                0
            }
        })
        .sum()
}

fn marks(actions: &[Action]) -> Vec<&str> {
    actions
        .iter()
        .filter_map(|a| {
            if let Action::Mark(m) = a {
                Some(m.as_str())
            } else {
                None
            }
        })
        .collect()
}

fn to_do(actions: &[Action]) -> Vec<&RelayToDo> {
    actions
        .iter()
        .filter_map(|a| {
            if let Action::ToDo(m) = a {
                Some(m)
            } else {
                None
            }
        })
        .collect()
}

fn mark(name: &str) -> Event {
    Event::Mark { name: name.into() }
}

fn interim(text: &str) -> Event {
    Event::Transcript {
        text: text.into(),
        is_final: false,
        speech_final: false,
        audio_end_ms: None,
    }
}

/// A call with an empty greeting, past its setup: ctx 2 is the spare.
fn idle_call() -> CallState {
    let mut s = CallState::new();
    let a = s.handle(hello(""), 0);
    assert_eq!(
        a,
        [
            Action::Tts(TtsCommand::Open { ctx: 1 }),
            Action::Tts(TtsCommand::Open { ctx: 2 }),
            Action::Tts(TtsCommand::Close { ctx: 1 }),
        ]
    );
    s
}

/// Clause boundaries need following whitespace, so decimals and ellipses stay whole.
#[test]
fn clause_boundaries() {
    assert_eq!(clause_split("Hi there, you"), Some(9));
    assert_eq!(clause_split("It costs 3.5 dollars"), None);
    assert_eq!(clause_split("Wait... what"), Some(7));
    assert_eq!(
        clause_split("Done."),
        None,
        "end of text: wait for more or say_end"
    );
    assert_eq!(parse_mark("t3.c1.u7"), Some((7, 1)));
    assert_eq!(parse_mark("bye.c0.u9"), Some((9, 0)));
    assert_eq!(parse_mark("foreign"), None);
}

/// hello opens the greeting's context and a spare, and streams the greeting by clause
/// with a flush at each boundary; the last clause goes out at once (the greeting is whole).
#[test]
fn greeting_is_sent_by_clause() {
    let mut s = CallState::new();
    let a = s.handle(hello("Hey there, it's Coach. Ready?"), 0);
    assert_eq!(a[0], Action::Tts(TtsCommand::Open { ctx: 1 }));
    assert_eq!(a[1], Action::Tts(TtsCommand::Open { ctx: 2 }));
    assert_eq!(
        texts(&a),
        [(1, "Hey there, "), (1, "it's Coach. "), (1, "Ready? ")]
    );
    assert_eq!(s.tts_chars(), 27);
    // A control reconnect repeats hello: nothing is spoken twice.
    assert!(s
        .handle(hello("Hey there, it's Coach. Ready?"), 50)
        .is_empty());
}

/// Audio is paced in 160-byte frames, topped up between low and high water, and the
/// clause mark sits exactly where the next clause's first character starts.
#[test]
fn pacing_and_mark_placement() {
    let mut s = CallState::new();
    s.handle(hello("Hi there, how are you?"), 0);
    // 18 non-whitespace chars at 50 ms: 900 ms = 7200 bytes; clause 2 starts at 400 ms.
    let a = s.handle(audio_event(1, "Hi there, how are you?", 50), 100);
    assert!(
        a.contains(&Action::Tts(TtsCommand::Close { ctx: 1 })),
        "all text voiced: context released"
    );
    assert_eq!(media_bytes(&a), 15 * 160, "300 ms lead");
    assert!(a
        .iter()
        .all(|x| !matches!(x, Action::Media(f) if f.bytes().len() != 160)));
    assert_eq!(s.next_wake(), Some(300));

    let a = s.handle(Event::Tick, 300);
    // Topped up to 600 ms of lead: 10 frames, the mark after exactly 3200 bytes in total.
    assert_eq!(media_bytes(&a), 10 * 160);
    let frames_before_mark = a
        .iter()
        .take_while(|x| !matches!(x, Action::Mark(_)))
        .count();
    assert_eq!(
        frames_before_mark, 5,
        "15 + 5 frames = 3200 bytes precede the mark"
    );
    assert_eq!(marks(&a), ["t0.c0.u1"]);

    let a = s.handle(Event::Tick, 500);
    assert_eq!(media_bytes(&a), 10 * 160);
    assert!(marks(&a).is_empty());
    let a = s.handle(Event::Tick, 700);
    assert_eq!(media_bytes(&a), 10 * 160, "45 frames in all");
    assert_eq!(
        marks(&a),
        ["t0.c1.u1"],
        "the last mark follows the last frame"
    );
    assert!(matches!(a.last(), Some(Action::Mark(_))));
    assert_eq!(
        s.next_wake(),
        Some(60_000),
        "queue drained; only the spare's keep-alive is due"
    );
}

/// Mark echoes turn into cumulative `heard` reports; the last one ends the utterance.
#[test]
fn marks_report_what_was_heard() {
    let mut s = CallState::new();
    s.handle(hello("Hi there, how are you?"), 0);
    s.handle(audio_event(1, "Hi there, how are you?", 50), 100);
    for t in [300, 500, 700] {
        s.handle(Event::Tick, t);
    }
    let a = s.handle(mark("t0.c0.u1"), 720);
    assert_eq!(
        to_do(&a),
        [&RelayToDo::Heard {
            turn: 0,
            text: "Hi there,".into()
        }]
    );
    assert!(s.persona_active());
    let a = s.handle(mark("t0.c1.u1"), 1000);
    assert_eq!(
        to_do(&a),
        [&RelayToDo::Heard {
            turn: 0,
            text: "Hi there, how are you?".into()
        }]
    );
    assert!(!s.persona_active(), "fully heard greeting is done");
    // A duplicate echo changes nothing.
    assert!(s.handle(mark("t0.c1.u1"), 1001).is_empty());
}

/// VAD alone (a cough) or interim words without VAD do not interrupt; VAD then words do:
/// clear, drop queued audio, and report only what the marks confirmed.
#[test]
fn barge_in_needs_speech_confirmed_by_words() {
    let mut s = CallState::new();
    s.handle(hello("Hi there, how are you?"), 0);
    let mut sent = media_bytes(&s.handle(audio_event(1, "Hi there, how are you?", 50), 100));
    sent += media_bytes(&s.handle(Event::Tick, 300));
    sent += media_bytes(&s.handle(mark("t0.c0.u1"), 520));

    let a = s.handle(interim("uh"), 540);
    assert!(!a.contains(&Action::Clear), "words without VAD");
    sent += media_bytes(&a);
    s.handle(Event::SpeechStarted, 550);
    assert!(
        s.handle(interim(""), 560).is_empty(),
        "a cough: VAD without words"
    );

    let a = s.handle(interim("wait"), 600);
    assert_eq!(a[0], Action::Clear);
    assert_eq!(
        to_do(&a),
        [&RelayToDo::Interrupted {
            turn: 0,
            heard_text: "Hi there,".into()
        }]
    );
    // Everything not yet sent of the 7200 bytes is dropped.
    let dropped = (7200 - sent).div_ceil(160) as u64;
    assert!(dropped > 0);
    assert!(
        a.contains(&Action::Observe(Observation::FramesDropped(dropped))),
        "{a:?}"
    );
    assert!(!s.persona_active());
    // Twilio echoes the pending mark after `clear`: it must not count as heard.
    assert!(s.handle(mark("t0.c1.u1"), 610).is_empty());
}

/// A final transcript interrupts even without VAD; the interrupted reply's context is
/// closed, and the DO's late deltas for that turn are dropped.
#[test]
fn final_words_interrupt_a_reply_and_late_deltas_are_dropped() {
    let mut s = idle_call();
    let a = s.handle(
        Event::SayDelta {
            turn: 3,
            text: "Sure, let me".into(),
        },
        1000,
    );
    assert_eq!(
        a[0],
        Action::Tts(TtsCommand::Open { ctx: 3 }),
        "a new spare replaces the one taken"
    );
    assert_eq!(texts(&a), [(2, "Sure, ")]);

    let fin = Event::Transcript {
        text: "no stop".into(),
        is_final: true,
        speech_final: false,
        audio_end_ms: None,
    };
    let a = s.handle(fin, 1100);
    assert_eq!(
        a[..3],
        [
            Action::Clear,
            Action::Tts(TtsCommand::Close { ctx: 2 }),
            Action::ToDo(RelayToDo::Interrupted {
                turn: 3,
                heard_text: String::new()
            }),
        ]
    );
    assert!(s
        .handle(
            Event::SayDelta {
                turn: 3,
                text: " check that.".into()
            },
            1200
        )
        .is_empty());
    assert!(s.handle(Event::SayEnd { turn: 3 }, 1201).is_empty());
    // The next turn speaks normally, on the spare context.
    let a = s.handle(
        Event::SayDelta {
            turn: 4,
            text: "Okay. ".into(),
        },
        1300,
    );
    assert_eq!(texts(&a), [(3, "Okay. ")]);
}

/// Finals accumulate and `speech_final` ends the turn with the joined text and the STT
/// latency measured from the end of the audio.
#[test]
fn speech_final_ends_the_turn() {
    let mut s = idle_call();
    let f1 = Event::Transcript {
        text: "book a table".into(),
        is_final: true,
        speech_final: false,
        audio_end_ms: Some(2000),
    };
    assert!(to_do(&s.handle(f1, 2100)).is_empty());
    let f2 = Event::Transcript {
        text: "for two".into(),
        is_final: true,
        speech_final: true,
        audio_end_ms: Some(2600),
    };
    let a = s.handle(f2, 2800);
    assert_eq!(
        to_do(&a),
        [&RelayToDo::UserTurn {
            text: "book a table for two".into(),
            stt_final_ms: 200,
            end_of_turn_at_ms: 2800
        }]
    );
    assert!(a.contains(&Action::Observe(Observation::SttFinalLatency(200))));
    // An UtteranceEnd after speech_final has nothing left to send.
    assert!(to_do(&s.handle(
        Event::UtteranceEnd {
            last_word_end_ms: Some(2600)
        },
        3600
    ))
    .is_empty());
}

/// Without speech_final, UtteranceEnd ends the turn; an empty speech_final sends nothing.
#[test]
fn utterance_end_is_the_fallback() {
    let mut s = idle_call();
    let empty = Event::Transcript {
        text: String::new(),
        is_final: true,
        speech_final: true,
        audio_end_ms: Some(500),
    };
    assert!(to_do(&s.handle(empty, 600)).is_empty());
    let f = Event::Transcript {
        text: "yes".into(),
        is_final: true,
        speech_final: false,
        audio_end_ms: Some(900),
    };
    s.handle(f, 1000);
    let a = s.handle(
        Event::UtteranceEnd {
            last_word_end_ms: Some(900),
        },
        1900,
    );
    assert_eq!(
        to_do(&a),
        [&RelayToDo::UserTurn {
            text: "yes".into(),
            stt_final_ms: 1000,
            end_of_turn_at_ms: 1900
        }]
    );
}

/// LLM first token, TTS first byte and end-of-turn-to-first-audio are measured, and the
/// DO gets a latency report when the reply's first frame goes out.
#[test]
fn reply_latencies_are_measured() {
    let mut s = idle_call();
    let f = Event::Transcript {
        text: "hi".into(),
        is_final: true,
        speech_final: true,
        audio_end_ms: Some(900),
    };
    s.handle(f, 1000);
    let a = s.handle(
        Event::SayDelta {
            turn: 1,
            text: "Great.".into(),
        },
        1300,
    );
    assert!(a.contains(&Action::Observe(Observation::LlmFirstToken(300))));
    assert!(
        texts(&a).is_empty(),
        "no boundary yet: 'Great.' may continue"
    );
    let a = s.handle(Event::SayEnd { turn: 1 }, 1350);
    assert_eq!(texts(&a), [(2, "Great. ")]);
    let a = s.handle(audio_event(2, "Great.", 50), 1500);
    assert!(a.contains(&Action::Observe(Observation::TtsFirstByte(150))));
    assert!(a.contains(&Action::Observe(Observation::EndOfTurnToFirstAudio(500))));
    assert!(to_do(&a).contains(&&RelayToDo::LatencyReport {
        turn: 1,
        end_of_turn_to_first_audio_ms: 500,
        tts_first_audio_ms: 150
    }));
    assert_eq!(s.first_audio_latencies(), [500]);
}

/// hang_up plays the goodbye and closes only once its mark echoes back.
#[test]
fn hang_up_waits_for_the_goodbye() {
    let mut s = idle_call();
    let a = s.handle(
        Event::HangUp {
            reason: "user_done".into(),
            goodbye: Some("Bye now.".into()),
        },
        100,
    );
    assert_eq!(
        texts(&a),
        [(2, "Bye now. ")],
        "goodbye uses the spare; no new spare"
    );
    assert!(!a.iter().any(|x| matches!(x, Action::Hangup { .. })));
    let a = s.handle(audio_event(2, "Bye now.", 50), 200);
    assert!(!a.iter().any(|x| matches!(x, Action::Hangup { .. })));
    let a = s.handle(Event::Tick, 400);
    assert_eq!(marks(&a), ["bye.c0.u2"]);
    let a = s.handle(mark("bye.c0.u2"), 700);
    assert_eq!(
        a,
        [Action::Hangup {
            reason: "user_done".into()
        }],
        "goodbye is not reported as heard"
    );
    assert!(s.is_ended());
    assert!(s.handle(Event::Tick, 800).is_empty());
}

/// hang_up with nothing to say closes at once; with speech that never plays, at the grace deadline.
#[test]
fn hang_up_without_goodbye_and_deadline() {
    let mut s = idle_call();
    let a = s.handle(
        Event::HangUp {
            reason: "canceled".into(),
            goodbye: None,
        },
        100,
    );
    assert_eq!(
        a,
        [
            Action::Tts(TtsCommand::Close { ctx: 2 }),
            Action::Hangup {
                reason: "canceled".into()
            }
        ]
    );

    let mut s = idle_call();
    s.handle(
        Event::HangUp {
            reason: "max_duration".into(),
            goodbye: Some("Time's up.".into()),
        },
        100,
    );
    assert_eq!(s.next_wake(), Some(5_100), "no-audio fallback first");
    s.handle(Event::Tick, 5_100);
    assert_eq!(s.next_wake(), Some(30_100));
    assert!(!s
        .handle(Event::Tick, 30_099)
        .iter()
        .any(|x| matches!(x, Action::Hangup { .. })));
    assert_eq!(
        s.handle(Event::Tick, 30_100),
        [Action::Hangup {
            reason: "max_duration".into()
        }]
    );
}

/// The idle timeout counts from the last speech on either side; max duration is absolute.
#[test]
fn idle_and_max_duration() {
    let mut s = CallState::new();
    s.handle(
        Event::Hello {
            greeting: String::new(),
            max_duration_secs: 60,
            idle_timeout_secs: 10,
            speculate_endpointing_ms: None,
            speculate_after_ms: None,
            fast_barge_in: false,
        },
        0,
    );
    assert_eq!(s.next_wake(), Some(10_000));
    s.handle(interim("hello?"), 5_000);
    assert!(s.handle(Event::Tick, 10_000).is_empty());
    assert_eq!(
        s.handle(Event::Tick, 15_000),
        [Action::Hangup {
            reason: "idle_timeout".into()
        }]
    );

    let mut s = CallState::new();
    s.handle(
        Event::Hello {
            greeting: String::new(),
            max_duration_secs: 30,
            idle_timeout_secs: 0,
            speculate_endpointing_ms: None,
            speculate_after_ms: None,
            fast_barge_in: false,
        },
        0,
    );
    assert_eq!(s.next_wake(), Some(30_000));
    assert_eq!(
        s.handle(Event::Tick, 30_000),
        [Action::Hangup {
            reason: "max_duration".into()
        }]
    );
}

/// When the TTS socket is replaced mid-clause, audio of finished clauses stays, the rest
/// is cut from the queue and re-synthesised on re-opened contexts.
#[test]
fn tts_reconnect_resends_unfinished_clauses() {
    let mut s = CallState::new();
    s.handle(hello("One, two."), 0);
    // 6 of 8 chars arrive at 100 ms/char: 4800 bytes, clause 2 starting at 3200.
    let (audio, starts) = speech("One,tw", 100);
    let a = s.handle(
        Event::TtsAudio {
            ctx: 1,
            audio,
            char_starts_ms: Some(starts),
        },
        100,
    );
    assert_eq!(media_bytes(&a), 2400);
    let a = s.handle(Event::TtsReconnected, 150);
    assert_eq!(
        a[..4],
        [
            Action::Tts(TtsCommand::Resync),
            Action::Tts(TtsCommand::Open { ctx: 1 }),
            Action::Tts(TtsCommand::Text {
                ctx: 1,
                text: "two. ".into(),
                flush: true
            }),
            Action::Observe(Observation::FramesDropped(10)),
        ]
    );
    assert_eq!(
        a[4],
        Action::Tts(TtsCommand::Open { ctx: 2 }),
        "spare re-opened"
    );
    // The re-synthesised clause arrives and completes the greeting.
    let a = s.handle(audio_event(1, "two.", 100), 300);
    assert!(a.contains(&Action::Tts(TtsCommand::Close { ctx: 1 })));
    let mut all = a;
    for t in [500, 700, 900] {
        all.extend(s.handle(Event::Tick, t));
    }
    assert_eq!(marks(&all), ["t0.c0.u1", "t0.c1.u1"]);
    assert_eq!(
        media_bytes(&all),
        3200 - 2400 + 3200,
        "rest of clause 1, then clause 2"
    );
}

/// A pacer woken late counts the frames that missed their slot.
#[test]
fn late_wakeups_count_late_frames() {
    let mut s = CallState::new();
    s.handle(hello("Hello."), 0);
    s.handle(audio_event(1, "Hello.", 200), 0);
    assert_eq!(s.next_wake(), Some(200));
    let a = s.handle(Event::Tick, 450);
    assert!(
        a.contains(&Action::Observe(Observation::LateFrames(7))),
        "{a:?}"
    );
}

/// Without alignment, marks are placed when the audio goes quiet after the last text.
#[test]
fn quiet_fallback_without_alignment() {
    let mut s = CallState::new();
    s.handle(hello("Hello."), 0);
    let a = s.handle(
        Event::TtsAudio {
            ctx: 1,
            audio: vec![0x7f; 800],
            char_starts_ms: None,
        },
        100,
    );
    assert!(
        !a.contains(&Action::Tts(TtsCommand::Close { ctx: 1 })),
        "end not known yet"
    );
    assert_eq!(s.next_wake(), Some(1_600));
    let a = s.handle(Event::Tick, 1_600);
    assert!(a.contains(&Action::Tts(TtsCommand::Close { ctx: 1 })));
    assert_eq!(marks(&a), ["t0.c0.u1"]);
}

/// A final flag before all text is voiced is ignored when alignment says otherwise.
#[test]
fn early_final_is_ignored_with_alignment() {
    let mut s = CallState::new();
    s.handle(hello("One, two."), 0);
    s.handle(audio_event(1, "One,", 50), 100);
    let a = s.handle(Event::TtsFinal { ctx: 1 }, 150);
    assert!(!a.contains(&Action::Tts(TtsCommand::Close { ctx: 1 })));
    let a = s.handle(audio_event(1, "two.", 50), 200);
    assert!(a.contains(&Action::Tts(TtsCommand::Close { ctx: 1 })));
}

/// Above four seconds of queued audio the machine asks for TTS reads to pause.
#[test]
fn backpressure_on_tts() {
    let mut s = CallState::new();
    s.handle(hello("Long."), 0);
    assert!(s.wants_tts_audio());
    s.handle(
        Event::TtsAudio {
            ctx: 1,
            audio: vec![0x7f; 5 * 8000],
            char_starts_ms: None,
        },
        0,
    );
    assert!(!s.wants_tts_audio());
    for t in (200..=2000).step_by(200) {
        s.handle(Event::Tick, t);
    }
    assert!(s.wants_tts_audio());
}

/// The spare context is kept alive, audio for unknown contexts is dropped, DTMF is forwarded.
#[test]
fn spare_keepalive_stale_audio_and_dtmf() {
    let mut s = idle_call();
    assert_eq!(s.next_wake(), Some(60_000));
    assert_eq!(
        s.handle(Event::Tick, 60_000),
        [Action::Tts(TtsCommand::KeepAlive { ctx: 2 })]
    );
    assert!(s.handle(audio_event(9, "stale", 50), 60_001).is_empty());
    assert_eq!(
        s.handle(Event::Dtmf { digit: "5".into() }, 60_002),
        [Action::ToDo(RelayToDo::Dtmf { digit: "5".into() })]
    );
}

fn staged(text: &str, bytes: usize, billed_chars: u64) -> Event {
    Event::StagedGreeting {
        text: text.into(),
        audio: vec![0x7f; bytes].into(),
        billed_chars,
    }
}

/// A greeting synthesized while the phone rang plays the moment the stream starts, before
/// `hello`: the first frames go out at once, its one mark sits at its end, and `hello`
/// then only opens the next reply's context, speaking nothing twice.
#[test]
fn staged_greeting_plays_before_hello_and_is_not_spoken_again() {
    let mut s = CallState::new();
    // 1.2 s of audio: the pacer sends high water (300 ms) at once.
    let a = s.handle(staged("Hey, it's Coach. Ready?", 9600, 19), 0);
    assert_eq!(media_bytes(&a), 2400, "{a:?}");
    assert!(
        !a.iter().any(|x| matches!(x, Action::Tts(_))),
        "no TTS for it"
    );
    assert!(s.persona_active());
    assert_eq!(s.tts_chars(), 19, "billed as synthesized for this call");

    let a = s.handle(hello("Hey, it's Coach. Ready?"), 30);
    assert_eq!(
        a,
        [Action::Tts(TtsCommand::Open { ctx: 2 })],
        "only the spare"
    );

    let mut sent = 2400;
    let mut mark_seen = Vec::new();
    for t in (220..=1400).step_by(200) {
        let a = s.handle(Event::Tick, t);
        sent += media_bytes(&a);
        mark_seen.extend(marks(&a).into_iter().map(str::to_owned));
    }
    assert_eq!(sent, 9600);
    assert_eq!(mark_seen, ["t0.c0.u1"], "one mark, after all of it");
    let a = s.handle(mark("t0.c0.u1"), 1250);
    assert_eq!(
        to_do(&a),
        [&RelayToDo::Heard {
            turn: 0,
            text: "Hey, it's Coach. Ready?".into()
        }]
    );
    assert!(!s.persona_active());
    // The first reply uses the spare opened at hello.
    let a = s.handle(
        Event::SayDelta {
            turn: 1,
            text: "Sure. ".into(),
        },
        1300,
    );
    assert_eq!(texts(&a), [(2, "Sure. ")]);
}

/// Barge-in during a staged greeting stops it like any speech; no TTS context is closed
/// (none was opened), and nothing of it counts as heard before its mark. Staged audio that
/// arrives after `hello` is ignored: the greeting is already on its way through TTS.
#[test]
fn staged_greeting_barge_in_and_late_staging() {
    let mut s = CallState::new();
    s.handle(staged("Hello there!", 8000, 0), 0);
    assert_eq!(s.tts_chars(), 0, "from the cache: nothing billed");
    s.handle(hello("Hello there!"), 10);
    s.handle(Event::SpeechStarted, 200);
    let a = s.handle(interim("wait"), 220);
    assert_eq!(a[0], Action::Clear);
    assert!(
        !a.contains(&Action::Tts(TtsCommand::Close { ctx: 1 })),
        "{a:?}"
    );
    assert_eq!(
        to_do(&a),
        [&RelayToDo::Interrupted {
            turn: 0,
            heard_text: String::new()
        }]
    );

    let mut s = CallState::new();
    s.handle(hello("Hi!"), 0);
    let a = s.handle(staged("Hi!", 1600, 3), 5);
    assert_eq!(media_bytes(&a), 0);
    assert_eq!(s.tts_chars(), 3, "only the TTS path's characters");
}

/// A call like `idle_call` whose DO speculates, with 300 ms endpointing.
fn speculating_call() -> CallState {
    speculating_call_after(None)
}

/// [`speculating_call`], with `hello`'s `speculate_after_ms`.
fn speculating_call_after(speculate_after_ms: Option<u32>) -> CallState {
    let mut s = CallState::new();
    s.handle(
        Event::Hello {
            greeting: String::new(),
            max_duration_secs: 0,
            idle_timeout_secs: 0,
            speculate_endpointing_ms: Some(300),
            speculate_after_ms,
            fast_barge_in: false,
        },
        0,
    );
    s
}

fn final_words(text: &str, audio_end_ms: Ms) -> Event {
    Event::Transcript {
        text: text.into(),
        is_final: true,
        speech_final: false,
        audio_end_ms: Some(audio_end_ms),
    }
}

fn voice(voiced: bool) -> Event {
    Event::CallerAudio {
        voiced,
        analysis: None,
    }
}

/// `n` quiet caller frames from `from`, 20 ms apart, as the call loop reports them (each
/// one while the machine wants them, else only the first): the actions, with when.
fn quiet(s: &mut CallState, from: Ms, n: u64) -> Vec<(Ms, Action)> {
    let mut out = Vec::new();
    for i in 0..n {
        let t = from + i * 20;
        if i > 0 && !s.wants_caller_audio() {
            continue;
        }
        out.extend(s.handle(voice(false), t).into_iter().map(|a| (t, a)));
    }
    out
}

fn turns(actions: &[(Ms, Action)]) -> Vec<(Ms, &RelayToDo)> {
    actions
        .iter()
        .filter_map(|(t, a)| match a {
            Action::ToDo(m) => Some((*t, m)),
            _ => None,
        })
        .collect()
}

/// With speculation on: 80 ms of quiet audio into a pause after voice, the relay asks
/// Deepgram to finalize; the final is offered to the DO as a speculation at once, and
/// the turn ends when the pause has lasted the endpointing time, with the same text.
/// Pauses are counted in audio frames, so frames arriving late do not lengthen them.
#[test]
fn a_pause_is_finalized_early_offered_as_speculation_and_ends_the_turn() {
    let mut s = speculating_call();
    s.handle(voice(true), 1000);
    s.handle(Event::SpeechStarted, 1010);
    assert!(s.handle(interim("what should"), 1400).is_empty());
    // A 20 ms dip inside the sentence: a pause too short to finalize.
    assert!(quiet(&mut s, 1420, 1).is_empty());
    s.handle(voice(true), 1440);
    assert!(!s.wants_caller_audio(), "voiced: only changes are reported");
    // Quiet from 1600: the fourth quiet frame asks for Finalize, once.
    let a = quiet(&mut s, 1600, 4);
    assert_eq!(a, [(1660, Action::SttFinalize)]);
    assert!(s.wants_caller_audio());
    // Deepgram is slow, and the frames come late: audio time is what counts.
    let a = s.handle(final_words("what should I train", 1600), 1900);
    assert_eq!(
        to_do(&a),
        [&RelayToDo::Speculate {
            text: "what should I train".into()
        }]
    );
    let a = quiet(&mut s, 2000, 11);
    assert_eq!(
        turns(&a),
        [(
            2200,
            &RelayToDo::UserTurn {
                text: "what should I train".into(),
                stt_final_ms: 600,
                end_of_turn_at_ms: 2200
            }
        )]
    );
    assert!(!s.wants_caller_audio(), "nothing left to time");
    // Deepgram's own endpointing later has nothing left to send.
    let late = Event::Transcript {
        text: String::new(),
        is_final: true,
        speech_final: true,
        audio_end_ms: Some(1600),
    };
    assert!(to_do(&s.handle(late, 2300)).is_empty());
}

/// `hello`'s `speculate_after_ms` moves the `Finalize`: at 40 ms, the second quiet frame
/// asks for it; the turn still ends at the endpointing time.
#[test]
fn the_do_sets_how_far_into_a_pause_the_relay_finalizes() {
    let mut s = speculating_call_after(Some(40));
    s.handle(voice(true), 1000);
    s.handle(interim("what should"), 1400);
    assert_eq!(quiet(&mut s, 1600, 4), [(1620, Action::SttFinalize)]);
    s.handle(final_words("what should I train", 1600), 1650);
    let a = quiet(&mut s, 1680, 12);
    assert_eq!(
        turns(&a),
        [(
            1880,
            &RelayToDo::UserTurn {
                text: "what should I train".into(),
                stt_final_ms: 280,
                end_of_turn_at_ms: 1880
            }
        )]
    );
}

/// The caller speaks again before the pause ends the turn: the speculation is dropped,
/// the next pause offers the whole turn so far, and the turn carries all of it.
#[test]
fn speaking_again_drops_the_speculation() {
    let mut s = speculating_call();
    s.handle(voice(true), 1000);
    s.handle(interim("so"), 1200);
    assert_eq!(quiet(&mut s, 1300, 4), [(1360, Action::SttFinalize)]);
    s.handle(final_words("so", 1300), 1390);
    assert_eq!(
        to_do(&s.handle(voice(true), 1450)),
        [&RelayToDo::DropSpeculation]
    );
    // Dropped once only.
    quiet(&mut s, 1460, 1);
    assert!(to_do(&s.handle(voice(true), 1480)).is_empty());
    s.handle(interim("legs today"), 1800);
    assert_eq!(quiet(&mut s, 2000, 4), [(2060, Action::SttFinalize)]);
    let a = s.handle(final_words("legs today", 2000), 2090);
    assert_eq!(
        to_do(&a),
        [&RelayToDo::Speculate {
            text: "so legs today".into()
        }]
    );
    let a = quiet(&mut s, 2080, 20);
    assert_eq!(
        turns(&a),
        [(
            2280,
            &RelayToDo::UserTurn {
                text: "so legs today".into(),
                stt_final_ms: 280,
                end_of_turn_at_ms: 2280
            }
        )]
    );
}

/// A click on the line asks nothing of Deepgram; a cough is finalized like speech, and
/// its empty final starts nothing; a final that comes after the pause has lasted the
/// endpointing time ends the turn at once, without a speculation; and speculations per
/// turn are bounded.
#[test]
fn clicks_coughs_late_finals_and_the_speculation_bound() {
    let mut s = speculating_call();
    s.handle(voice(true), 1000);
    assert!(quiet(&mut s, 1020, 20).is_empty(), "a 20 ms click");
    s.handle(voice(true), 1600);
    assert_eq!(quiet(&mut s, 1800, 4), [(1860, Action::SttFinalize)]);
    assert!(to_do(&s.handle(final_words("", 1800), 1890)).is_empty());
    assert!(quiet(&mut s, 1880, 20).is_empty());
    assert!(
        !s.wants_caller_audio(),
        "the pause has lasted the endpointing time"
    );

    s.handle(voice(true), 2000);
    s.handle(interim("hi"), 2300);
    quiet(&mut s, 2400, 16);
    // Deepgram was slow: the pause already lasted 300 ms.
    let a = s.handle(final_words("hi", 2400), 2750);
    assert_eq!(
        to_do(&a),
        [&RelayToDo::UserTurn {
            text: "hi".into(),
            stt_final_ms: 350,
            end_of_turn_at_ms: 2750
        }]
    );

    let mut offered = 0;
    for i in 0..6u64 {
        let t = 4000 + i * 400;
        s.handle(voice(true), t);
        s.handle(interim("word"), t + 50);
        quiet(&mut s, t + 100, 4);
        let a = s.handle(final_words("word", t + 100), t + 190);
        offered += to_do(&a)
            .iter()
            .filter(|m| matches!(m, RelayToDo::Speculate { .. }))
            .count();
    }
    assert_eq!(offered, 3);
}

/// Without speculation (a DO that does not ask for it), pauses change nothing: no
/// `Finalize`, no speculation, and only Deepgram's endpointing ends the turn.
#[test]
fn without_speculation_pauses_are_deepgrams_to_judge() {
    let mut s = idle_call();
    s.handle(voice(true), 1000);
    s.handle(interim("what"), 1200);
    assert!(quiet(&mut s, 1300, 30).is_empty());
    assert!(
        !s.wants_caller_audio(),
        "no pause timing without speculation"
    );
    assert!(to_do(&s.handle(final_words("what now", 1300), 1420)).is_empty());
    assert!(to_do(&s.handle(voice(true), 2100)).is_empty());
}

/// A call with fast barge-in whose greeting is playing from 100 ms: loud persona audio
/// (μ-law 0x10, about −10 dBFS) so its echo level is known.
fn barge_call() -> CallState {
    let mut s = CallState::new();
    s.handle(
        Event::Hello {
            greeting: "Hi there, how are you?".into(),
            max_duration_secs: 0,
            idle_timeout_secs: 0,
            speculate_endpointing_ms: None,
            speculate_after_ms: None,
            fast_barge_in: true,
        },
        0,
    );
    let (_, starts) = speech("Hi there, how are you?", 100);
    let audio = vec![0x10; starts.len() * 100 * 8];
    s.handle(
        Event::TtsAudio {
            ctx: 1,
            audio,
            char_starts_ms: Some(starts),
        },
        100,
    );
    assert!(s.watches_barge_in());
    s
}

/// A caller frame's analysis at `dbfs` mean power.
fn caller_frame(dbfs: f64, voice_like: bool) -> Event {
    let power = (32768.0f64 * 32768.0 * 10f64.powf(dbfs / 10.0)) as u64;
    Event::CallerAudio {
        voiced: dbfs >= crate::vad::VOICE_DBFS,
        analysis: Some(FrameAnalysis { power, voice_like }),
    }
}

/// Feeds 20 ms caller frames from `from` until a `Clear` (its time) or `frames` ran out.
fn frames_until_clear(s: &mut CallState, from: Ms, frames: u64, ev: &Event) -> Option<Ms> {
    (0..frames).map(|i| from + i * 20).find(|&t| {
        let a = s.handle(Event::Tick, t);
        a.contains(&Action::Clear) || s.handle(ev.clone(), t).contains(&Action::Clear)
    })
}

/// The caller's voice, as loud as the persona and periodic, clears it after 120 ms once
/// Deepgram's VAD agrees, with no words yet; what was heard is reported as usual.
#[test]
fn fast_barge_in_on_confirmed_voice() {
    let mut s = barge_call();
    let voice = caller_frame(-12.0, true);
    // Before SpeechStarted, voice alone does not clear.
    assert_eq!(frames_until_clear(&mut s, 600, 10, &voice), None);
    s.handle(Event::SpeechStarted, 800);
    // The run is already 200 ms long: the next frame clears.
    let a = s.handle(voice.clone(), 820);
    assert_eq!(a[0], Action::Clear);
    assert!(matches!(
        to_do(&a)[..],
        [RelayToDo::Interrupted { turn: 0, .. }]
    ));
    assert!(!s.watches_barge_in(), "nothing left to interrupt");

    // A fresh run: six frames of 20 ms.
    let mut s = barge_call();
    s.handle(Event::SpeechStarted, 590);
    assert_eq!(frames_until_clear(&mut s, 600, 20, &voice), Some(700));
}

/// A cough (loud, not periodic) and the persona's own echo (periodic, 12 dB under what
/// it played) never clear by themselves, and the echo's words neither barge in nor
/// become a turn; the caller's voice through the same echo still does.
#[test]
fn coughs_and_echo_do_not_barge_in() {
    let mut s = barge_call();
    s.handle(Event::SpeechStarted, 590);
    let cough = caller_frame(-8.0, false);
    assert_eq!(frames_until_clear(&mut s, 600, 15, &cough), None);
    let echo = caller_frame(-22.0, true);
    assert_eq!(frames_until_clear(&mut s, 900, 30, &echo), None);
    let a = s.handle(interim("there how"), 1500);
    assert!(!a.contains(&Action::Clear), "echo words: {a:?}");
    let f = Event::Transcript {
        text: "there how".into(),
        is_final: true,
        speech_final: true,
        audio_end_ms: Some(1500),
    };
    let a = s.handle(f, 1600);
    assert!(!a.contains(&Action::Clear));
    assert!(to_do(&a).is_empty(), "no turn from the echo: {a:?}");
    // The caller speaks up: louder than the echo margin.
    let voice = caller_frame(-14.0, true);
    assert_eq!(frames_until_clear(&mut s, 1700, 20, &voice), Some(1800));
}

/// Without fast barge-in (the DO did not ask), frame analysis is not wanted and words are
/// what barges in, as before.
#[test]
fn without_fast_barge_in_words_barge_in() {
    let mut s = CallState::new();
    s.handle(hello("Hi there, how are you?"), 0);
    s.handle(audio_event(1, "Hi there, how are you?", 50), 100);
    assert!(!s.watches_barge_in());
    s.handle(Event::SpeechStarted, 550);
    let loud = caller_frame(-12.0, true);
    assert_eq!(frames_until_clear(&mut s, 560, 20, &loud), None);
    assert_eq!(s.handle(interim("wait"), 1000)[0], Action::Clear);
}

/// The echo's tail: words whose audio ended within 200 ms of the persona's last audio
/// are its echo when none of the caller's voice rose above it; words ending later are the
/// caller's answer.
#[test]
fn the_echo_tail_is_not_a_turn() {
    let mut s = barge_call();
    // The whole greeting plays out: 18 characters × 100 ms from 100 ms.
    let mut t = 100;
    while s.watches_barge_in() || t < 2_000 {
        t += 20;
        for name in marks(&s.handle(Event::Tick, t)) {
            let name = name.to_owned();
            s.handle(mark(&name), t);
        }
        if t > 10_000 {
            panic!("the greeting never finished");
        }
    }
    let final_at = |text: &str, end: Ms| Event::Transcript {
        text: text.into(),
        is_final: true,
        speech_final: true,
        audio_end_ms: Some(end),
    };
    let a = s.handle(final_at("how are you", 1_950), 2_300);
    assert!(to_do(&a).is_empty(), "the echo's tail: {a:?}");
    let a = s.handle(final_at("fine thanks", 3_000), 3_300);
    assert_eq!(
        to_do(&a),
        [&RelayToDo::UserTurn {
            text: "fine thanks".into(),
            stt_final_ms: 300,
            end_of_turn_at_ms: 3_300
        }]
    );
}
