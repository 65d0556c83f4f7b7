//! The per-call decision logic as a pure state machine: `CallState::handle(event, now)`
//! returns the actions to perform.
//!
//! Owns turn detection, barge-in, clause splitting for TTS, mark bookkeeping (what the
//! caller actually heard), the outbound audio queue with its 20 ms pacing schedule, and
//! the call's timers (idle, max duration, hang-up grace). It must not read a clock or do
//! I/O: `now` is milliseconds since the stream started, given by the caller, so tests run
//! at any speed and replay exactly (str0m's "time is an input").
//!
//! Speech is modelled as *utterances* (the greeting, each reply turn, the goodbye), each
//! with its own ElevenLabs context. Text is sent to TTS clause by clause with `flush`, and
//! audio comes back with per-character alignment; counting non-whitespace characters tells
//! where each clause ends inside the audio, and a Twilio `mark` is placed exactly there.
//! When the mark echoes back, that clause was played to the caller.

use std::collections::VecDeque;

use cmb_core::channel::RelayToDo;

use crate::vad::{self, FrameAnalysis};

/// Milliseconds since the Twilio stream started.
pub type Ms = u64;

/// One outbound frame: 20 ms of 8 kHz μ-law.
pub const FRAME_BYTES: usize = 160;
/// Duration of a full frame.
pub const FRAME_MS: Ms = 20;
/// μ-law bytes per millisecond at 8 kHz.
const BYTES_PER_MS: u64 = 8;
/// Top Twilio's playout buffer up when less than this much audio is left in it…
const LOW_WATER_MS: Ms = 100;
/// …to this much. Batching several frames per wake-up keeps CPU per call low, while the
/// small lead keeps `clear` (barge-in) and marks precise.
const HIGH_WATER_MS: Ms = 300;
/// Above this much queued audio the relay stops reading TTS (backpressure on the socket),
/// so a long reply does not sit in this process's memory.
const MAX_QUEUED_BYTES: usize = 4 * 8000;
/// After the last clause was sent, TTS is considered finished once this long passes with
/// no new audio (fallback for servers that send neither alignment nor a final flag).
const TTS_QUIET_MS: Ms = 1_500;
/// Same, when no audio at all has arrived since the last text.
const TTS_NO_AUDIO_MS: Ms = 5_000;
/// How often the spare (pre-opened) TTS context is kept alive.
const SPARE_KEEPALIVE_MS: Ms = 60_000;
/// After `hang_up`, the longest the relay waits for queued speech and the goodbye.
const HANGUP_GRACE_MS: Ms = 30_000;
/// With speculation on: after this long of caller silence following voice, the relay asks
/// Deepgram to `Finalize`, so the pause's transcript arrives now rather than at the end
/// of endpointing, and a speculative reply can start on it (unless `hello` says
/// otherwise: `speculate_after_ms`).
const FINALIZE_AFTER_QUIET_MS: Ms = cmb_core::channel::DEFAULT_SPECULATE_AFTER_MS as Ms;
/// Voice shorter than this (a click on the line) is not worth a `Finalize`.
const MIN_VOICE_MS: Ms = 40;
/// Speculations per user turn at most (each pause that yields new words is one).
const MAX_SPECULATIONS_PER_TURN: u32 = 3;
/// Fast barge-in: voice-like caller audio, above the echo level, for this long (with
/// Deepgram's `SpeechStarted`) clears the persona without waiting for words.
const BARGE_CONFIRM_MS: Ms = 120;
/// Caller audio within this many dB under what the persona played is taken for its echo.
const ECHO_MARGIN_DB: f64 = 10.0;
/// What the persona played this recently can be echoing back now (the line's round trip
/// and Twilio's buffer).
const ECHO_WINDOW_MS: Ms = 500;
/// Words whose audio ended this soon after the persona's last audio played may be its
/// echo's tail (the line's round trip), not the caller's answer.
const ECHO_TAIL_MS: Ms = 200;
/// Characters that end a clause when followed by whitespace.
const CLAUSE_ENDS: &[char] = &['.', '!', '?', ',', ';', ':'];

/// Inputs to the state machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The DO's `hello`: limits and the greeting to speak first.
    Hello {
        greeting: String,
        max_duration_secs: u32,
        idle_timeout_secs: u32,
        /// `Some(endpointing)` when the DO speculates: the relay then ends a turn itself
        /// once the caller has been quiet this long after a final transcript.
        speculate_endpointing_ms: Option<u32>,
        /// How far into a pause (ms of quiet audio) the relay asks Deepgram to
        /// `Finalize` when speculating; `None`: [`FINALIZE_AFTER_QUIET_MS`].
        speculate_after_ms: Option<u32>,
        /// Barge in on confirmed voice, not only on words, and tell echo from the caller.
        fast_barge_in: bool,
    },
    /// One caller frame's worth of what `vad.rs` found, sent when its voice activity
    /// changed and for every frame while [`CallState::wants_caller_audio`]: whether it
    /// is voiced, and, while [`CallState::watches_barge_in`], its analysis.
    CallerAudio {
        voiced: bool,
        analysis: Option<FrameAnalysis>,
    },
    /// The greeting's audio, synthesized while the phone rang (`greeting.rs`), given at
    /// Twilio's `start` so it plays before `hello` arrives. It has no alignment, so the
    /// whole greeting is one clause with one mark at its end. `billed_chars` counts the
    /// characters synthesized for this call (0 when the audio came from the cache).
    StagedGreeting {
        text: String,
        audio: std::sync::Arc<[u8]>,
        billed_chars: u64,
    },
    /// A piece of the persona's reply for `turn`.
    SayDelta { turn: u32, text: String },
    /// The reply for `turn` is complete.
    SayEnd { turn: u32 },
    /// End the call after queued speech and the optional goodbye.
    HangUp {
        reason: String,
        goodbye: Option<String>,
    },
    /// A Deepgram transcript; `audio_end_ms` is where its audio ends, in stream time.
    Transcript {
        text: String,
        is_final: bool,
        speech_final: bool,
        audio_end_ms: Option<Ms>,
    },
    /// Deepgram VAD: the caller started making sound.
    SpeechStarted,
    /// Deepgram: a gap after the last final word.
    UtteranceEnd { last_word_end_ms: Option<Ms> },
    /// TTS audio for context `ctx`, with the start (ms into the chunk) of each
    /// non-whitespace character it covers when the server sent alignment.
    TtsAudio {
        ctx: u32,
        audio: Vec<u8>,
        char_starts_ms: Option<Vec<u32>>,
    },
    /// TTS says context `ctx` produced all its audio.
    TtsFinal { ctx: u32 },
    /// The TTS socket was replaced: every context on the old one is gone.
    TtsReconnected,
    /// Twilio echoed a mark.
    Mark { name: String },
    /// Keypad press.
    Dtmf { digit: String },
    /// Time passed (the caller wakes the machine at `next_wake`).
    Tick,
}

/// Commands for the TTS socket task; contexts are numbered by the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TtsCommand {
    /// Initialise a context with the persona's voice settings.
    Open { ctx: u32 },
    /// Text for a context; `flush` at clause ends.
    Text { ctx: u32, text: String, flush: bool },
    /// Close a context (barge-in, or its audio is complete).
    Close { ctx: u32 },
    /// Keep an idle context from timing out.
    KeepAlive { ctx: u32 },
    /// Marks where the machine's answer to `TtsReconnected` begins: commands issued before
    /// it were meant for the old socket and must be dropped, since the answer re-issues
    /// everything still needed.
    Resync,
}

/// Measurements for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    FramesDropped(u64),
    LateFrames(u64),
    EndOfTurnToFirstAudio(Ms),
    SttFinalLatency(Ms),
    TtsFirstByte(Ms),
    LlmFirstToken(Ms),
}

/// 20 ms (or, before a mark, less) of μ-law to send to Twilio.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    buf: [u8; FRAME_BYTES],
    len: u8,
}

impl Frame {
    /// The audio bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Frame({} bytes)", self.len)
    }
}

/// Outputs of the state machine, in the order they must be performed.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send to the call's Durable Object.
    ToDo(RelayToDo),
    /// Send to the TTS socket.
    Tts(TtsCommand),
    /// Send an audio frame to Twilio.
    Media(Frame),
    /// Send a named mark to Twilio.
    Mark(String),
    /// Tell Twilio to drop its buffered audio.
    Clear,
    /// Ask Deepgram to finalize what it has heard (`{"type":"Finalize"}`).
    SttFinalize,
    /// Close the Twilio stream (which ends the call), then report `ended{reason}`.
    Hangup { reason: String },
    /// Record a measurement.
    Observe(Observation),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Spoken from `hello`; reported to the DO as turn 0.
    Greeting,
    Reply(u32),
    /// From `hang_up`; not reported.
    Goodbye,
}

impl Kind {
    /// The turn number the DO knows this speech by.
    fn reported_turn(self) -> Option<u32> {
        match self {
            Kind::Greeting => Some(0),
            Kind::Reply(t) => Some(t),
            Kind::Goodbye => None,
        }
    }
}

#[derive(Debug)]
struct Clause {
    /// Trimmed text as sent to TTS.
    text: String,
    /// Cumulative non-whitespace characters of the utterance through this clause.
    end_nonws: usize,
}

#[derive(Debug)]
struct Utterance {
    kind: Kind,
    ctx: u32,
    /// Received text not yet ending in a clause boundary.
    pending: String,
    clauses: Vec<Clause>,
    sent_nonws: usize,
    received_nonws: usize,
    /// False once a chunk came without alignment: from then on only the end is known.
    alignment_ok: bool,
    /// No more text will come (say_end, or greeting/goodbye given whole).
    input_done: bool,
    /// All audio has arrived (or is given up on); every mark is placed.
    audio_done: bool,
    /// The server closed the context itself, so no `close_context` is owed.
    server_closed: bool,
    marks_placed: usize,
    /// Out-queue position of the last placed mark.
    last_mark_pos: Option<u64>,
    /// Clauses whose mark has echoed back.
    heard: usize,
    /// Out-queue position of the first audio byte.
    start_pos: Option<u64>,
    first_out: bool,
    first_text_at: Option<Ms>,
    last_text_at: Ms,
    first_audio_at: Option<Ms>,
    last_audio_at: Option<Ms>,
}

impl Utterance {
    fn new(kind: Kind, ctx: u32, now: Ms) -> Self {
        Self {
            kind,
            ctx,
            pending: String::new(),
            clauses: Vec::new(),
            sent_nonws: 0,
            received_nonws: 0,
            alignment_ok: true,
            input_done: false,
            audio_done: false,
            server_closed: false,
            marks_placed: 0,
            last_mark_pos: None,
            heard: 0,
            start_pos: None,
            first_out: false,
            first_text_at: None,
            last_text_at: now,
            first_audio_at: None,
            last_audio_at: None,
        }
    }

    fn mark_name(&self, clause: usize) -> String {
        match self.kind.reported_turn() {
            Some(turn) => format!("t{turn}.c{clause}.u{}", self.ctx),
            None => format!("bye.c{clause}.u{}", self.ctx),
        }
    }

    fn heard_text(&self) -> String {
        let mut s = String::new();
        for c in &self.clauses[..self.heard] {
            if !s.is_empty() {
                s.push(' ');
            }
            s.push_str(&c.text);
        }
        s
    }

    fn finished(&self) -> bool {
        self.audio_done && self.heard >= self.clauses.len()
    }
}

/// Parses `…c{clause}.u{ctx}` from a mark name.
fn parse_mark(name: &str) -> Option<(u32, usize)> {
    let mut parts = name.rsplit('.');
    let ctx = parts.next()?.strip_prefix('u')?.parse().ok()?;
    let clause = parts.next()?.strip_prefix('c')?.parse().ok()?;
    Some((ctx, clause))
}

/// Byte index just after the first clause boundary followed by whitespace.
fn clause_split(text: &str) -> Option<usize> {
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if CLAUSE_ENDS.contains(&c) && chars.peek().is_some_and(|&(_, n)| n.is_whitespace()) {
            return Some(i + c.len_utf8());
        }
    }
    None
}

fn nonws_count(text: &str) -> usize {
    text.chars().filter(|c| !c.is_whitespace()).count()
}

/// Capacity an empty outbound audio queue may keep (about six frames).
const IDLE_QUEUE_BYTES: usize = 1024;

/// Audio waiting to go to Twilio, with marks at absolute byte positions.
#[derive(Debug, Default)]
struct OutQueue {
    audio: VecDeque<u8>,
    /// Bytes ever enqueued / sent: absolute positions survive draining.
    enqueued: u64,
    sent: u64,
    marks: VecDeque<(u64, String)>,
    /// When Twilio will have played everything sent so far.
    play_cursor: Ms,
    /// Since when audio has been waiting (for late-frame accounting).
    waiting_since: Option<Ms>,
}

impl OutQueue {
    fn push(&mut self, audio: &[u8], now: Ms) {
        if audio.is_empty() {
            return;
        }
        self.audio.extend(audio);
        self.enqueued += audio.len() as u64;
        self.waiting_since.get_or_insert(now);
    }

    /// Gives back an empty queue's memory: a reply's audio can be seconds long, and most
    /// of a call is spent listening, so an idle call should not keep that capacity.
    fn release(&mut self) {
        if self.audio.is_empty() && self.audio.capacity() > IDLE_QUEUE_BYTES {
            self.audio = VecDeque::new();
        }
    }

    fn frames_in(bytes: usize) -> u64 {
        bytes.div_ceil(FRAME_BYTES) as u64
    }

    /// Drops everything not yet sent; returns the number of frames dropped.
    fn clear(&mut self, now: Ms) -> u64 {
        let dropped = Self::frames_in(self.audio.len());
        self.audio.clear();
        self.release();
        self.enqueued = self.sent;
        self.marks.clear();
        self.play_cursor = now;
        self.waiting_since = None;
        dropped
    }

    /// Drops queued audio (and marks) after absolute position `pos` (not below `sent`).
    fn truncate_to(&mut self, pos: u64) -> u64 {
        let pos = pos.max(self.sent);
        if pos >= self.enqueued {
            return 0;
        }
        let keep = usize::try_from(pos - self.sent).unwrap_or(usize::MAX);
        let dropped = Self::frames_in(self.audio.len() - keep);
        self.audio.truncate(keep);
        self.enqueued = pos;
        self.marks.retain(|(p, _)| *p <= pos);
        if self.audio.is_empty() {
            self.waiting_since = None;
        }
        dropped
    }
}

/// The caller's pauses, for speculation: the relay's own view of silence (VAD) against
/// Deepgram's words.
#[derive(Debug, Default)]
struct Pause {
    /// How long the caller has been quiet, in audio (20 ms per quiet frame: a stall in
    /// delivery is not a pause); `None` while voiced.
    quiet_ms: Option<Ms>,
    /// Since when the caller has been voiced; `None` while quiet.
    voiced_since: Option<Ms>,
    /// Voice ended and Deepgram has not been asked to finalize it yet.
    finalize_due: bool,
    /// The text last sent as `speculate`, while it stands.
    speculated: Option<String>,
    /// Speculations in this turn.
    count: u32,
}

/// Evidence for a fast barge-in while the persona speaks.
#[derive(Debug, Default)]
struct Barge {
    /// Consecutive voice-like caller audio above the echo level.
    run_ms: Ms,
    /// Some of the caller's voice above the echo level since the last barge-in or turn:
    /// words Deepgram finds now are the caller's, not the persona's echo.
    above_echo: bool,
    /// Mean power of the frames the persona played, by when each began to play.
    played: VecDeque<(Ms, u64)>,
    /// When the last of the persona's audio sent so far ends playing.
    played_until: Ms,
}

impl Barge {
    /// The loudest the persona was in the echo window before `now` (0: silent).
    fn persona_power(&self, now: Ms) -> u64 {
        self.played
            .iter()
            .filter(|(at, _)| *at <= now && at + ECHO_WINDOW_MS >= now)
            .map(|(_, p)| *p)
            .max()
            .unwrap_or(0)
    }

    fn reset(&mut self) {
        self.run_ms = 0;
        self.above_echo = false;
    }
}

/// The call's state. See the module docs.
#[derive(Debug, Default)]
pub struct CallState {
    live: bool,
    max_end: Option<Ms>,
    idle_ms: Option<Ms>,
    last_activity: Ms,
    finals: String,
    last_final_end: Option<Ms>,
    /// SpeechStarted seen in the current user segment: interim text may now barge in.
    barge_armed: bool,
    /// The greeting came as staged audio: `hello` must not speak it again.
    greeting_staged: bool,
    /// Endpointing, when the DO speculates (see `Event::Hello`).
    speculate_endpointing: Option<Ms>,
    /// Quiet audio before `Finalize`, when speculating (see `Event::Hello`); `None`:
    /// [`FINALIZE_AFTER_QUIET_MS`].
    finalize_after: Option<Ms>,
    pause: Pause,
    fast_barge_in: bool,
    barge: Barge,
    utterances: VecDeque<Utterance>,
    next_ctx: u32,
    /// Pre-opened context for the next reply, and when it was last touched.
    spare: Option<(u32, Ms)>,
    /// Reply turns at or below this were interrupted: their late deltas are dropped.
    interrupted_through: Option<u32>,
    hangup: Option<(String, Ms)>,
    ended: bool,
    out: OutQueue,
    /// End of the user's last turn, until its reply's first audio goes out.
    last_eot: Option<Ms>,
    awaiting_first_token: Option<Ms>,
    tts_chars: u64,
    first_audio_latencies: Vec<u32>,
}

impl CallState {
    /// A call that has not received `hello` yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event at `now`.
    pub fn handle(&mut self, event: Event, now: Ms) -> Vec<Action> {
        let mut out = Vec::new();
        if self.ended {
            return out;
        }
        match event {
            Event::Hello {
                greeting,
                max_duration_secs,
                idle_timeout_secs,
                speculate_endpointing_ms,
                speculate_after_ms,
                fast_barge_in,
            } => {
                if !self.live {
                    self.speculate_endpointing = speculate_endpointing_ms.map(Ms::from);
                    self.finalize_after = speculate_after_ms.map(Ms::from);
                    self.fast_barge_in = fast_barge_in;
                }
                self.hello(
                    &greeting,
                    max_duration_secs,
                    idle_timeout_secs,
                    now,
                    &mut out,
                );
            }
            Event::CallerAudio { voiced, analysis } => {
                self.caller_voice(voiced, now, &mut out);
                if let Some(a) = analysis {
                    self.caller_frame(a, now, &mut out);
                }
            }
            Event::StagedGreeting {
                text,
                audio,
                billed_chars,
            } => self.staged_greeting(&text, &audio, billed_chars, now),
            Event::SayDelta { turn, text } => self.say_delta(turn, &text, now, &mut out),
            Event::SayEnd { turn } => self.say_end(turn, now, &mut out),
            Event::HangUp { reason, goodbye } => self.hang_up(reason, goodbye, now, &mut out),
            Event::Transcript {
                text,
                is_final,
                speech_final,
                audio_end_ms,
            } => self.transcript(&text, is_final, speech_final, audio_end_ms, now, &mut out),
            Event::SpeechStarted => {
                self.barge_armed = true;
                self.last_activity = now;
            }
            Event::UtteranceEnd { last_word_end_ms } => {
                let end = last_word_end_ms.or(self.last_final_end);
                self.end_of_turn(end, now, &mut out);
            }
            Event::TtsAudio {
                ctx,
                audio,
                char_starts_ms,
            } => self.tts_audio(ctx, &audio, char_starts_ms.as_deref(), now, &mut out),
            Event::TtsFinal { ctx } => self.tts_final(ctx, &mut out),
            Event::TtsReconnected => self.tts_reconnected(now, &mut out),
            Event::Mark { name } => self.mark_echo(&name, &mut out),
            Event::Dtmf { digit } => out.push(Action::ToDo(RelayToDo::Dtmf { digit })),
            Event::Tick => {}
        }
        self.pump(now, &mut out);
        out
    }

    /// When the machine next needs a `Tick`, if ever (absent other events).
    pub fn next_wake(&self) -> Option<Ms> {
        if self.ended {
            return None;
        }
        let mut wake: Option<Ms> = None;
        let mut at = |t: Ms| wake = Some(wake.map_or(t, |w| w.min(t)));
        if !self.out.audio.is_empty() {
            at(self.out.play_cursor.saturating_sub(LOW_WATER_MS));
        }
        for u in &self.utterances {
            if u.input_done && !u.audio_done && u.pending.is_empty() {
                at(quiet_deadline(u));
            }
        }
        if let Some((_, touched)) = self.spare {
            at(touched + SPARE_KEEPALIVE_MS);
        }
        if let Some(end) = self.max_end {
            at(end);
        }
        if let (Some(idle), false) = (self.idle_ms, self.persona_active()) {
            at(self.last_activity + idle);
        }
        if let Some((_, deadline)) = &self.hangup {
            at(*deadline);
        }
        wake
    }

    /// False while enough audio is queued: the caller should stop reading TTS for now.
    pub fn wants_tts_audio(&self) -> bool {
        self.out.audio.len() < MAX_QUEUED_BYTES
    }

    /// Total characters sent to TTS.
    pub fn tts_chars(&self) -> u64 {
        self.tts_chars
    }

    /// Per reply: end of user turn to first audio frame sent, in ms.
    pub fn first_audio_latencies(&self) -> &[u32] {
        &self.first_audio_latencies
    }

    /// True once `Hangup` was emitted.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Whether every caller frame should be reported (not only changes of voice): a pause
    /// is being timed (speculation on, up to the endpointing time: a final arriving
    /// after that ends the turn at once), or barge-in is watched.
    pub fn wants_caller_audio(&self) -> bool {
        let timing = match (self.speculate_endpointing, self.pause.quiet_ms) {
            (Some(endpointing), Some(quiet)) => quiet < endpointing,
            _ => false,
        };
        timing || self.watches_barge_in()
    }

    /// Whether caller frames should come with their analysis: the persona is speaking and
    /// a fast barge-in could stop it.
    pub fn watches_barge_in(&self) -> bool {
        self.fast_barge_in && self.live && self.hangup.is_none() && self.persona_active()
    }

    /// Persona audio is queued, playing, or being generated.
    fn persona_active(&self) -> bool {
        !self.utterances.is_empty() || !self.out.audio.is_empty()
    }

    fn alloc_ctx(&mut self) -> u32 {
        self.next_ctx += 1;
        self.next_ctx
    }

    fn open_spare(&mut self, now: Ms, out: &mut Vec<Action>) {
        let ctx = self.alloc_ctx();
        out.push(Action::Tts(TtsCommand::Open { ctx }));
        self.spare = Some((ctx, now));
    }

    /// A context for new speech: the pre-opened spare if any (no setup latency).
    fn take_ctx(&mut self, now: Ms, out: &mut Vec<Action>) -> u32 {
        let ctx = match self.spare.take() {
            Some((ctx, _)) => ctx,
            None => {
                let ctx = self.alloc_ctx();
                out.push(Action::Tts(TtsCommand::Open { ctx }));
                ctx
            }
        };
        if self.hangup.is_none() {
            self.open_spare(now, out);
        }
        ctx
    }

    fn hello(
        &mut self,
        greeting: &str,
        max_secs: u32,
        idle_secs: u32,
        now: Ms,
        out: &mut Vec<Action>,
    ) {
        if self.live {
            // A control-channel reconnect re-sends hello; the call is already running.
            return;
        }
        self.live = true;
        self.last_activity = now;
        self.max_end = (max_secs > 0).then(|| now + u64::from(max_secs) * 1000);
        self.idle_ms = (idle_secs > 0).then(|| u64::from(idle_secs) * 1000);
        if self.greeting_staged {
            // Already playing from the staged audio: only the next reply's context is owed.
            self.open_spare(now, out);
            return;
        }
        let ctx = self.take_ctx(now, out);
        let mut u = Utterance::new(Kind::Greeting, ctx, now);
        push_text(&mut u, greeting, now, &mut self.tts_chars, out);
        finish_input(&mut u, now, &mut self.tts_chars, &mut self.out, out);
        self.utterances.push_back(u);
    }

    fn staged_greeting(&mut self, text: &str, audio: &[u8], billed_chars: u64, now: Ms) {
        let text = text.trim();
        if self.live || self.greeting_staged || audio.is_empty() || nonws_count(text) == 0 {
            return;
        }
        self.greeting_staged = true;
        let ctx = self.alloc_ctx();
        let mut u = Utterance::new(Kind::Greeting, ctx, now);
        u.sent_nonws = nonws_count(text);
        u.received_nonws = u.sent_nonws;
        u.clauses.push(Clause {
            text: text.to_owned(),
            end_nonws: u.sent_nonws,
        });
        u.input_done = true;
        // No TTS context was ever opened for it, so none is owed a close.
        u.server_closed = true;
        u.first_audio_at = Some(now);
        u.last_audio_at = Some(now);
        u.start_pos = Some(self.out.enqueued);
        self.out.push(audio, now);
        self.tts_chars += billed_chars;
        let mut none = Vec::new();
        Self::complete_audio(&mut u, &mut self.out, &mut none);
        self.utterances.push_back(u);
    }

    fn say_delta(&mut self, turn: u32, text: &str, now: Ms, out: &mut Vec<Action>) {
        if !self.live
            || self.hangup.is_some()
            || self.interrupted_through.is_some_and(|t| turn <= t)
        {
            return;
        }
        if let Some(asked) = self.awaiting_first_token.take() {
            out.push(Action::Observe(Observation::LlmFirstToken(
                now.saturating_sub(asked),
            )));
        }
        if let Some(u) = self
            .utterances
            .iter_mut()
            .find(|u| u.kind == Kind::Reply(turn))
        {
            // A delta after say_end is a duplicate or a DO bug: the reply is already whole.
            if !u.input_done {
                push_text(u, text, now, &mut self.tts_chars, out);
            }
            return;
        }
        let ctx = self.take_ctx(now, out);
        let mut u = Utterance::new(Kind::Reply(turn), ctx, now);
        push_text(&mut u, text, now, &mut self.tts_chars, out);
        self.utterances.push_back(u);
    }

    fn say_end(&mut self, turn: u32, now: Ms, out: &mut Vec<Action>) {
        if let Some(u) = self
            .utterances
            .iter_mut()
            .find(|u| u.kind == Kind::Reply(turn) && !u.input_done)
        {
            finish_input(u, now, &mut self.tts_chars, &mut self.out, out);
        }
    }

    fn hang_up(&mut self, reason: String, goodbye: Option<String>, now: Ms, out: &mut Vec<Action>) {
        if self.hangup.is_some() {
            return;
        }
        // Replies still streaming end here: nothing more will be said but the goodbye.
        for u in self.utterances.iter_mut().filter(|u| !u.input_done) {
            finish_input(u, now, &mut self.tts_chars, &mut self.out, out);
        }
        // Set before taking a context, so no new spare is opened.
        self.hangup = Some((reason, now + HANGUP_GRACE_MS));
        if let Some(text) = goodbye.filter(|g| !g.trim().is_empty()) {
            let ctx = self.take_ctx(now, out);
            let mut u = Utterance::new(Kind::Goodbye, ctx, now);
            push_text(&mut u, &text, now, &mut self.tts_chars, out);
            finish_input(&mut u, now, &mut self.tts_chars, &mut self.out, out);
            self.utterances.push_back(u);
        }
        if let Some((ctx, _)) = self.spare.take() {
            out.push(Action::Tts(TtsCommand::Close { ctx }));
        }
    }

    fn transcript(
        &mut self,
        text: &str,
        is_final: bool,
        speech_final: bool,
        audio_end_ms: Option<Ms>,
        now: Ms,
        out: &mut Vec<Action>,
    ) {
        let text = text.trim();
        if !text.is_empty() {
            self.last_activity = now;
            // Barge-in needs words, not just sound: VAD alone fires on coughs and line
            // noise. Interim words count once VAD saw speech start; a final transcript is
            // evidence enough on its own.
            // With fast barge-in, words heard during the persona's speech (or its echo's
            // tail) count only if some of the caller's voice was louder than its echo:
            // otherwise they are the echo.
            let overlapped = self.persona_active()
                || audio_end_ms.is_some_and(|end| end <= self.barge.played_until + ECHO_TAIL_MS);
            let echo = self.fast_barge_in && overlapped && !self.barge.above_echo;
            if echo {
                return;
            }
            if self.persona_active() && self.hangup.is_none() && (self.barge_armed || is_final) {
                self.barge_in(now, out);
            }
            if is_final {
                if !self.finals.is_empty() {
                    self.finals.push(' ');
                }
                self.finals.push_str(text);
                self.last_final_end = audio_end_ms;
                if !speech_final {
                    self.speculate(now, out);
                }
            }
        }
        if speech_final {
            self.end_of_turn(audio_end_ms.or(self.last_final_end), now, out);
        }
    }

    fn end_of_turn(&mut self, audio_end: Option<Ms>, now: Ms, out: &mut Vec<Action>) {
        self.barge_armed = false;
        self.barge.reset();
        if self.finals.is_empty() {
            return;
        }
        // The DO holds the speculation against this turn's text; the next turn starts
        // afresh.
        self.pause.speculated = None;
        self.pause.count = 0;
        let text = std::mem::take(&mut self.finals);
        self.last_final_end = None;
        let stt_final_ms = audio_end.map_or(0, |end| now.saturating_sub(end));
        out.push(Action::Observe(Observation::SttFinalLatency(stt_final_ms)));
        out.push(Action::ToDo(RelayToDo::UserTurn {
            text,
            stt_final_ms: u32::try_from(stt_final_ms).unwrap_or(u32::MAX),
            end_of_turn_at_ms: now,
        }));
        self.last_eot = Some(now);
        self.awaiting_first_token = Some(now);
    }

    fn caller_voice(&mut self, voiced: bool, now: Ms, out: &mut Vec<Action>) {
        if !voiced {
            if let Some(since) = self.pause.voiced_since.take() {
                self.pause.finalize_due |= now.saturating_sub(since) >= MIN_VOICE_MS;
            }
            let quiet = self.pause.quiet_ms.unwrap_or(0) + FRAME_MS;
            self.pause.quiet_ms = Some(quiet);
            return self.pause_timers(quiet, now, out);
        }
        self.pause.quiet_ms = None;
        self.pause.voiced_since.get_or_insert(now);
        if self.pause.speculated.take().is_some() {
            // The turn goes on: the reply begun on the pause answers words not yet said.
            out.push(Action::ToDo(RelayToDo::DropSpeculation));
        }
    }

    /// A caller frame while the persona speaks: voice-like audio louder than the persona's
    /// echo, held for `BARGE_CONFIRM_MS` once Deepgram's VAD agrees, is the caller
    /// talking over it.
    fn caller_frame(&mut self, a: FrameAnalysis, now: Ms, out: &mut Vec<Action>) {
        if !self.fast_barge_in {
            return;
        }
        let persona = vad::dbfs(self.barge.persona_power(now));
        let level = vad::dbfs(a.power);
        let voice = a.voice_like && level >= vad::VOICE_DBFS && level >= persona - ECHO_MARGIN_DB;
        self.barge.above_echo |= voice;
        self.barge.run_ms = match voice {
            true => self.barge.run_ms + FRAME_MS,
            false => 0,
        };
        if self.barge_armed
            && self.barge.run_ms >= BARGE_CONFIRM_MS
            && self.hangup.is_none()
            && self.persona_active()
        {
            self.barge_in(now, out);
        }
    }

    /// With speculation on, during a pause: a final transcript is offered to the DO as a
    /// speculation (when it is news), and a pause that has lasted the endpointing time
    /// ends the turn.
    fn speculate(&mut self, now: Ms, out: &mut Vec<Action>) {
        let (Some(endpointing), Some(quiet)) = (self.speculate_endpointing, self.pause.quiet_ms)
        else {
            return;
        };
        if quiet >= endpointing {
            return self.end_of_turn(self.last_final_end, now, out);
        }
        let news = self.pause.speculated.as_deref() != Some(self.finals.as_str());
        if news
            && self.live
            && self.hangup.is_none()
            && self.pause.count < MAX_SPECULATIONS_PER_TURN
        {
            self.pause.count += 1;
            self.pause.speculated = Some(self.finals.clone());
            out.push(Action::ToDo(RelayToDo::Speculate {
                text: self.finals.clone(),
            }));
        }
    }

    /// The relay's own pause timing (speculation on): `Finalize` a little into a pause
    /// that follows voice, and end the turn once the pause has lasted the endpointing time
    /// with a final transcript in hand (Deepgram's `speech_final` never comes for audio
    /// that was finalized early).
    fn pause_timers(&mut self, quiet: Ms, now: Ms, out: &mut Vec<Action>) {
        let Some(endpointing) = self.speculate_endpointing else {
            return;
        };
        if self.pause.finalize_due
            && quiet >= self.finalize_after.unwrap_or(FINALIZE_AFTER_QUIET_MS)
        {
            self.pause.finalize_due = false;
            out.push(Action::SttFinalize);
        }
        if !self.finals.is_empty() && quiet >= endpointing {
            self.end_of_turn(self.last_final_end, now, out);
        }
    }

    /// The caller talks over the persona: stop it everywhere and report what was heard.
    fn barge_in(&mut self, now: Ms, out: &mut Vec<Action>) {
        out.push(Action::Clear);
        // What the persona played stays evidence of itself (the word rule), but nothing
        // queued after this point will play.
        self.barge.run_ms = 0;
        self.barge.played.retain(|(at, _)| *at <= now);
        self.barge.played_until = self.barge.played_until.min(now);
        for u in self.utterances.drain(..) {
            if !u.server_closed {
                out.push(Action::Tts(TtsCommand::Close { ctx: u.ctx }));
            }
            if let Kind::Reply(t) = u.kind {
                self.interrupted_through = Some(self.interrupted_through.map_or(t, |i| i.max(t)));
            }
            if let Some(turn) = u.kind.reported_turn() {
                out.push(Action::ToDo(RelayToDo::Interrupted {
                    turn,
                    heard_text: u.heard_text(),
                }));
            }
        }
        let dropped = self.out.clear(now);
        if dropped > 0 {
            out.push(Action::Observe(Observation::FramesDropped(dropped)));
        }
    }

    fn tts_audio(
        &mut self,
        ctx: u32,
        audio: &[u8],
        starts: Option<&[u32]>,
        now: Ms,
        out: &mut Vec<Action>,
    ) {
        // Audio for a context we closed (barge-in) or never had is stale: drop it.
        let Some(u) = self.utterances.iter_mut().find(|u| u.ctx == ctx) else {
            return;
        };
        if u.first_audio_at.is_none() {
            u.first_audio_at = Some(now);
            if let Some(t) = u.first_text_at {
                out.push(Action::Observe(Observation::TtsFirstByte(
                    now.saturating_sub(t),
                )));
            }
        }
        u.last_audio_at = Some(now);
        u.start_pos.get_or_insert(self.out.enqueued);
        let mut consumed = 0;
        match starts {
            Some(starts) if u.alignment_ok && !u.audio_done => {
                let base = u.received_nonws;
                let end = base + starts.len();
                while u.marks_placed < u.clauses.len() {
                    let boundary = u.clauses[u.marks_placed].end_nonws;
                    if boundary > end {
                        break;
                    }
                    // The next clause starts where its first character starts; a boundary
                    // at the chunk's end falls after all of it.
                    let split = match starts.get(boundary.saturating_sub(base)) {
                        Some(&ms) if boundary < end => {
                            usize::try_from(u64::from(ms) * BYTES_PER_MS)
                                .unwrap_or(usize::MAX)
                                .clamp(consumed, audio.len())
                        }
                        _ => audio.len(),
                    };
                    self.out.push(&audio[consumed..split], now);
                    consumed = split;
                    let name = u.mark_name(u.marks_placed);
                    self.out.marks.push_back((self.out.enqueued, name));
                    u.last_mark_pos = Some(self.out.enqueued);
                    u.marks_placed += 1;
                }
                u.received_nonws = end;
            }
            _ => u.alignment_ok = false,
        }
        self.out.push(&audio[consumed..], now);
        let complete = u.input_done && u.alignment_ok && u.received_nonws >= u.sent_nonws;
        if complete {
            Self::complete_audio(u, &mut self.out, out);
        }
    }

    fn tts_final(&mut self, ctx: u32, out: &mut Vec<Action>) {
        let Some(u) = self.utterances.iter_mut().find(|u| u.ctx == ctx) else {
            return;
        };
        // Some servers may mark the end of each flush as final; with alignment the
        // character count is the truth, so a final before all text is voiced is ignored.
        if u.input_done
            && !(u.alignment_ok && u.first_audio_at.is_some() && u.received_nonws < u.sent_nonws)
        {
            u.server_closed = true;
            Self::complete_audio(u, &mut self.out, out);
        }
    }

    /// All audio of `u` is in the queue: place the marks not placed yet at its end and
    /// release the context.
    fn complete_audio(u: &mut Utterance, queue: &mut OutQueue, out: &mut Vec<Action>) {
        if u.audio_done {
            return;
        }
        u.audio_done = true;
        while u.marks_placed < u.clauses.len() {
            let name = u.mark_name(u.marks_placed);
            queue.marks.push_back((queue.enqueued, name));
            u.last_mark_pos = Some(queue.enqueued);
            u.marks_placed += 1;
        }
        if !u.server_closed {
            u.server_closed = true;
            out.push(Action::Tts(TtsCommand::Close { ctx: u.ctx }));
        }
    }

    fn tts_reconnected(&mut self, now: Ms, out: &mut Vec<Action>) {
        // Contexts died with the old socket. Audio of clauses fully received stays; from
        // the first unfinished clause on, the queue is cut and the text sent again.
        out.push(Action::Tts(TtsCommand::Resync));
        let mut cut: Option<u64> = None;
        for u in self.utterances.iter_mut() {
            if u.audio_done && cut.is_none() {
                continue;
            }
            if cut.is_none() {
                let pos = u.last_mark_pos.or(u.start_pos).unwrap_or(self.out.enqueued);
                cut = Some(pos);
                u.received_nonws = u
                    .marks_placed
                    .checked_sub(1)
                    .map_or(0, |i| u.clauses[i].end_nonws);
            } else {
                u.marks_placed = 0;
                u.last_mark_pos = None;
                u.received_nonws = 0;
                u.start_pos = None;
                u.heard = 0;
            }
            u.audio_done = false;
            u.server_closed = false;
            u.alignment_ok = true;
            u.last_text_at = now;
            u.last_audio_at = None;
            out.push(Action::Tts(TtsCommand::Open { ctx: u.ctx }));
            for c in &u.clauses[u.marks_placed..] {
                out.push(Action::Tts(TtsCommand::Text {
                    ctx: u.ctx,
                    text: format!("{} ", c.text),
                    flush: true,
                }));
            }
            if u.input_done && u.marks_placed == u.clauses.len() {
                u.audio_done = true;
                u.server_closed = true;
            }
        }
        if let Some(pos) = cut {
            let dropped = self.out.truncate_to(pos);
            if dropped > 0 {
                out.push(Action::Observe(Observation::FramesDropped(dropped)));
            }
        }
        if let Some((ctx, _)) = self.spare {
            out.push(Action::Tts(TtsCommand::Open { ctx }));
            self.spare = Some((ctx, now));
        }
    }

    fn mark_echo(&mut self, name: &str, out: &mut Vec<Action>) {
        // Echoes of marks flushed by our own `clear` name utterances already gone.
        let Some((ctx, clause)) = parse_mark(name) else {
            return;
        };
        let Some(u) = self.utterances.iter_mut().find(|u| u.ctx == ctx) else {
            return;
        };
        if clause < u.heard || clause >= u.clauses.len() {
            return;
        }
        u.heard = clause + 1;
        if let Some(turn) = u.kind.reported_turn() {
            // Cumulative: each `heard` supersedes the previous one for the turn.
            out.push(Action::ToDo(RelayToDo::Heard {
                turn,
                text: u.heard_text(),
            }));
        }
    }

    /// Pacing, first-audio bookkeeping, and timers; runs after every event.
    fn pump(&mut self, now: Ms, out: &mut Vec<Action>) {
        for u in self.utterances.iter_mut() {
            if u.input_done && !u.audio_done && u.pending.is_empty() && now >= quiet_deadline(u) {
                Self::complete_audio(u, &mut self.out, out);
            }
        }
        self.pace(now, out);
        while self.utterances.front().is_some_and(Utterance::finished) {
            self.utterances.pop_front();
        }
        if let Some((ctx, touched)) = self.spare {
            if now >= touched + SPARE_KEEPALIVE_MS {
                out.push(Action::Tts(TtsCommand::KeepAlive { ctx }));
                self.spare = Some((ctx, now));
            }
        }
        let reason = if let Some((reason, deadline)) = &self.hangup {
            (!self.persona_active() || now >= *deadline).then(|| reason.clone())
        } else if self.max_end.is_some_and(|end| now >= end) {
            Some("max_duration".to_owned())
        } else if self
            .idle_ms
            .is_some_and(|idle| !self.persona_active() && now >= self.last_activity + idle)
        {
            Some("idle_timeout".to_owned())
        } else {
            None
        };
        if let Some(reason) = reason {
            self.ended = true;
            out.push(Action::Hangup { reason });
        }
    }

    /// Sends frames so Twilio holds between LOW and HIGH water of audio, stopping at mark
    /// positions so each mark follows exactly the audio before it.
    fn pace(&mut self, now: Ms, out: &mut Vec<Action>) {
        let q = &mut self.out;
        if q.play_cursor < now {
            // Twilio ran dry while audio was waiting here: those frames are late.
            if q.waiting_since.is_some_and(|since| since <= q.play_cursor) {
                let late = (now - q.play_cursor) / FRAME_MS;
                if late > 0 {
                    out.push(Action::Observe(Observation::LateFrames(late)));
                }
            }
            q.play_cursor = now;
        }
        let before = q.sent;
        loop {
            while q.marks.front().is_some_and(|(pos, _)| *pos <= q.sent) {
                if let Some((_, name)) = q.marks.pop_front() {
                    out.push(Action::Mark(name));
                }
            }
            if q.audio.is_empty() || q.play_cursor >= now + HIGH_WATER_MS {
                break;
            }
            // Only top up when below the low-water mark, then fill to high water.
            if q.sent == before && q.play_cursor > now + LOW_WATER_MS {
                break;
            }
            let to_mark = q.marks.front().map_or(u64::MAX, |(pos, _)| pos - q.sent);
            let n = q
                .audio
                .len()
                .min(FRAME_BYTES)
                .min(usize::try_from(to_mark).unwrap_or(usize::MAX));
            let mut frame = Frame {
                buf: [0; FRAME_BYTES],
                len: 0,
            };
            for (dst, src) in frame.buf.iter_mut().zip(q.audio.drain(..n)) {
                *dst = src;
            }
            // n ≤ 160 fits u8.
            frame.len = u8::try_from(n).unwrap_or(u8::MAX);
            // Kept from the first frame (a staged greeting plays before `hello` says
            // whether barge-in is fast): its echo is what must not interrupt it.
            if self.barge.played.len() >= 64 {
                self.barge.played.pop_front();
            }
            self.barge
                .played
                .push_back((q.play_cursor, vad::mean_power(frame.bytes())));
            q.sent += n as u64;
            q.play_cursor += (n as u64).div_ceil(BYTES_PER_MS);
            self.barge.played_until = q.play_cursor;
            out.push(Action::Media(frame));
        }
        if q.audio.is_empty() {
            q.waiting_since = None;
            q.release();
        } else if q.sent != before {
            q.waiting_since = Some(now);
        }
        if q.sent == before {
            return;
        }
        let sent = q.sent;
        self.last_activity = now;
        for u in self.utterances.iter_mut() {
            if u.first_out || u.start_pos.is_none_or(|p| p >= sent) {
                continue;
            }
            u.first_out = true;
            let Kind::Reply(turn) = u.kind else { continue };
            let Some(eot) = self.last_eot.take() else {
                continue;
            };
            let latency = now.saturating_sub(eot);
            let latency_ms = u32::try_from(latency).unwrap_or(u32::MAX);
            let tts_ms = match (u.first_text_at, u.first_audio_at) {
                (Some(t), Some(a)) => u32::try_from(a.saturating_sub(t)).unwrap_or(u32::MAX),
                _ => 0,
            };
            self.first_audio_latencies.push(latency_ms);
            out.push(Action::Observe(Observation::EndOfTurnToFirstAudio(latency)));
            out.push(Action::ToDo(RelayToDo::LatencyReport {
                turn,
                end_of_turn_to_first_audio_ms: latency_ms,
                tts_first_audio_ms: tts_ms,
            }));
        }
    }
}

/// Adds streamed text to `u`, sending each completed clause to TTS.
fn push_text(u: &mut Utterance, text: &str, now: Ms, tts_chars: &mut u64, out: &mut Vec<Action>) {
    u.pending.push_str(text);
    while let Some(end) = clause_split(&u.pending) {
        let clause: String = u.pending.drain(..end).collect();
        emit_clause(u, &clause, now, tts_chars, out);
    }
}

/// No more text for `u`: send what remains as its last clause.
fn finish_input(
    u: &mut Utterance,
    now: Ms,
    tts_chars: &mut u64,
    queue: &mut OutQueue,
    out: &mut Vec<Action>,
) {
    let rest = std::mem::take(&mut u.pending);
    emit_clause(u, &rest, now, tts_chars, out);
    u.input_done = true;
    if u.clauses.is_empty() {
        // Nothing to say: release the context now.
        CallState::complete_audio(u, queue, out);
    }
}

fn emit_clause(u: &mut Utterance, text: &str, now: Ms, tts_chars: &mut u64, out: &mut Vec<Action>) {
    let text = text.trim();
    let n = nonws_count(text);
    if n == 0 {
        return;
    }
    u.sent_nonws += n;
    u.clauses.push(Clause {
        text: text.to_owned(),
        end_nonws: u.sent_nonws,
    });
    *tts_chars += text.chars().count() as u64;
    u.first_text_at.get_or_insert(now);
    u.last_text_at = now;
    // ElevenLabs wants each chunk to end with one space.
    out.push(Action::Tts(TtsCommand::Text {
        ctx: u.ctx,
        text: format!("{text} "),
        flush: true,
    }));
}

/// When an utterance whose text is all sent is deemed to have no more audio coming.
fn quiet_deadline(u: &Utterance) -> Ms {
    match u.last_audio_at {
        Some(a) => a.max(u.last_text_at) + TTS_QUIET_MS,
        None => u.last_text_at + TTS_NO_AUDIO_MS,
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
