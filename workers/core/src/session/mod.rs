//! The call's brain: every decision of one call's life, as a pure state machine.
//!
//! The `CallSession` Durable Object is a thin shell around [`Session`]: for each event
//! it loads the state, calls [`Session::handle`] with the event and the current time,
//! persists the state, and carries out the returned [`Effect`]s (Twilio REST, database
//! writes, frames to the relay, an LLM stream, the alarm). Results of those effects come
//! back as further [`Event`]s. Nothing here reads a clock, draws randomness or does I/O,
//! so every path — lost callbacks, a stalled LLM, a relay that never connects, a restart
//! between Twilio's create and our save — is a unit test with explicit time.
//!
//! The lifecycle: scheduled → reserve → dial → queued/ringing → in progress (turns, idle
//! check-in, per-minute credit top-ups, max duration, credits running out) → ending →
//! settled. Every number that bills (reservations, the charge, provider costs) is decided
//! here; the shell never does credit or time arithmetic.
//!
//! Guarantees the tests hold it to: at most one Twilio create that Twilio could have
//! accepted, settled at most once, the balance never driven below zero, and a final
//! status within a bounded time after the last event whatever Twilio does.

mod machine;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use crate::calls::CallStatus;
use crate::channel::{DoToRelay, Envelope, VoiceSettings};
use crate::prompt::{ChatMessage, Speaker};

/// Timeouts and limits of one call, fixed when the call starts (from the Worker's config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// `Timeout` given to Twilio: how long the phone rings before `no-answer`.
    pub ring_timeout_secs: u32,
    /// A queued or ringing call with no final status by ring timeout + this margin is
    /// looked up at Twilio (`GET Calls/{sid}.json`).
    pub reconcile_margin_secs: u32,
    /// After this long from the dial with Twilio unreachable, settle as `failed`, free.
    pub reconcile_give_up_secs: u32,
    /// An answered call whose relay has not connected by then is ended.
    pub relay_connect_secs: u32,
    /// A relay channel that closed and did not come back within this is gone for good.
    pub relay_grace_secs: u32,
    /// Silence before the persona checks in, and again before it hangs up.
    pub idle_timeout_secs: u32,
    /// Longest call, whatever the balance.
    pub max_call_secs: u32,
    /// The shell cancels an LLM stream with no first token by then…
    pub llm_first_token_ms: u32,
    /// …or not finished by then; the machine's own backstop sits a little later.
    pub llm_total_ms: u32,
    /// After the media stream ended, how long to wait for Twilio's final status before
    /// settling from our own measure.
    pub settle_wait_secs: u32,
    /// After a goodbye, how long the relay has to confirm the hang-up before Twilio is
    /// asked to end the call.
    pub hang_up_grace_secs: u32,
    /// Read the persona and stage the greeting at the relay while the phone rings
    /// (`CALL_PREPARE_GREETING`). Off, both wait for the relay's connect: for deployments
    /// whose relays sit behind one URL, where the staged greeting would land on another
    /// relay and be wasted. Sessions stored before the setting existed load as on.
    #[serde(default = "default_true")]
    pub prepare_greeting: bool,
    /// Speculative replies (`CALL_SPECULATE`): the relay ends turns on its own pause
    /// timing and, when the caller pauses, the LLM starts on the transcript so far; its
    /// reply is spoken only if the confirmed turn has the same words. Sessions stored
    /// before the setting existed load as off.
    #[serde(default)]
    pub speculate: bool,
    /// With `speculate`: the caller's pause, in ms of audio, after which the relay
    /// finalizes it and offers it as a speculation (`CALL_SPECULATE_AFTER_MS`). Shorter
    /// answers sooner and speculates on more pauses that the caller talks on from.
    /// Sessions stored before the setting existed load the default.
    #[serde(default = "default_speculate_after_ms")]
    pub speculate_after_ms: u32,
    /// Fast barge-in (`CALL_FAST_BARGE_IN`): the relay clears the persona on confirmed
    /// voice without waiting for words, and ignores words that could be its echo.
    /// Sessions stored before the setting existed load as off.
    #[serde(default)]
    pub fast_barge_in: bool,
}

fn default_true() -> bool {
    true
}

fn default_speculate_after_ms() -> u32 {
    crate::channel::DEFAULT_SPECULATE_AFTER_MS
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            ring_timeout_secs: 30,
            reconcile_margin_secs: 30,
            reconcile_give_up_secs: 300,
            relay_connect_secs: 20,
            relay_grace_secs: 15,
            idle_timeout_secs: 45,
            max_call_secs: 15 * 60,
            llm_first_token_ms: 4_000,
            llm_total_ms: 15_000,
            settle_wait_secs: 30,
            // Longer than the relay's own bound on a goodbye (30 s), so our backstop only
            // acts when the relay could not.
            hang_up_grace_secs: 40,
            prepare_greeting: true,
            speculate: true,
            speculate_after_ms: crate::channel::DEFAULT_SPECULATE_AFTER_MS,
            fast_barge_in: true,
        }
    }
}

/// The persona as the call needs it, read by the shell when the relay connects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonaBrief {
    pub name: String,
    pub voice_id: String,
    pub voice_settings: VoiceSettings,
    pub greeting: String,
    /// The full system prompt for this call.
    pub system_prompt: String,
    /// The caller's IANA time zone (tool results say times in it).
    #[serde(default)]
    pub caller_zone: Option<String>,
    /// What the persona says when a machine answers, before hanging up.
    #[serde(default)]
    pub voicemail: String,
}

/// A call was handed to its session (`POST /api/calls/trigger` or `/schedule`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Start {
    pub call_id: String,
    pub user_id: String,
    pub phone_number: String,
    /// Credits the route reserved with the call row (0 for a scheduled call).
    pub reserved: i64,
    /// The user's balance after that reservation (caps Twilio's `TimeLimit`).
    pub balance: i64,
    pub scheduled_at_ms: Option<u64>,
    /// The Twilio account whose callbacks this call accepts.
    pub account_sid: String,
    pub limits: Limits,
}

/// Everything that can happen to a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Start(Start),
    /// The user cancels (only while scheduled or queued).
    Cancel,
    /// The platform ends the call whatever its state (a ban).
    End {
        reason: String,
    },
    /// Twilio fetched the TwiML: the call was answered (by `answered_by`).
    Answered {
        answered_by: Option<String>,
    },
    /// A signed Twilio status callback's form parameters.
    TwilioStatus {
        params: Vec<(String, String)>,
    },
    /// Result of a Twilio REST request this machine asked for.
    Twilio(TwilioResult),
    /// Result of a database write this machine asked for.
    Db(DbResult),
    /// The shell accepted a relay control socket, numbered `conn`.
    RelayOpened {
        conn: u32,
        persona: PersonaBrief,
    },
    /// A decoded frame from relay socket `conn`.
    RelayFrame {
        conn: u32,
        frame: Envelope<crate::channel::RelayToDo>,
    },
    RelayClosed {
        conn: u32,
    },
    Llm(LlmEvent),
    /// The callback the persona asked for ([`Effect::ScheduleCallback`]): booked for
    /// `Ok(at_ms)`, or refused and why.
    Callback {
        tool_call_id: String,
        outcome: Result<u64, String>,
    },
    /// The persona read while the phone rang ([`Effect::Prepare`]).
    Prepared {
        persona: PersonaBrief,
    },
    /// The object's alarm fired.
    Alarm,
}

/// What the LLM stream task reports, tagged with the stream it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub enum LlmEvent {
    Delta {
        stream: u32,
        text: String,
        /// Request sent → this delta, for the first one.
        since_start_ms: u32,
    },
    Done {
        stream: u32,
        prompt_tokens: u64,
        completion_tokens: u64,
        /// The tool calls the reply made (`crate::tools`), assembled from the stream.
        tool_calls: Vec<crate::tools::ToolCall>,
    },
    /// An error, or a deadline passed (`timed_out`).
    Failed {
        stream: u32,
        timed_out: bool,
        message: String,
    },
}

/// How a Twilio REST request ended.
#[derive(Debug, Clone, PartialEq)]
pub enum TwilioResult {
    /// `POST Calls.json` → 201.
    Created {
        sid: String,
    },
    /// Twilio refused the call (4xx other than 429): nothing was created.
    CreateRefused {
        message: String,
    },
    /// 429: nothing was created; try again later.
    CreateRateLimited,
    /// 5xx, a timeout or a transport error: the call may or may not exist.
    CreateUnknown {
        message: String,
    },
    /// `GET Calls/{sid}.json`, or the Calls list filtered by `To` (`sid` is then the
    /// match found, or `None` when the list has no such call).
    Looked {
        sid: Option<String>,
        call: Option<TwilioCall>,
    },
    LookFailed {
        message: String,
    },
    /// `POST Calls/{sid}.json Status=…` answered (ok or refused).
    HungUp {
        purpose: HangUpPurpose,
        ok: bool,
    },
}

/// The parts of a Twilio call resource the machine reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwilioCall {
    /// Twilio's status word (`queued`, `ringing`, `in-progress`, `completed`, …).
    pub status: String,
    pub duration_secs: Option<u32>,
    pub answered_by: Option<String>,
}

/// Why the machine asked Twilio to end a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HangUpPurpose {
    /// Stop a call that is still queued or ringing (`Status=canceled`).
    Cancel,
    /// End a live call from our side (`Status=completed`).
    Complete,
}

/// How a database write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbResult {
    /// The reservation for `minute` is in (or was already: same ledger key). `balance`
    /// is the user's balance afterwards, when it was read (a scheduled call's first
    /// minute: it caps Twilio's `TimeLimit`).
    Reserved { minute: u32, balance: Option<i64> },
    /// The reservation could not be made.
    ReserveRefused { minute: u32, why: Refusal },
    /// `EndUnconnected` or `Settle` applied (or had been: same ledger keys).
    Settled,
    /// `Settle` was refused because the balance cannot cover the charge beyond the
    /// reservation; `balance` is what the user has.
    SettleShort { balance: i64 },
    /// A transient failure; the write is retried.
    Failed { op: DbOpKind, message: String },
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Credits,
    LiveCall,
    DailyLimit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DbOpKind {
    Reserve,
    Settle,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send these frames, in order, to relay socket `conn`.
    ToRelay {
        conn: u32,
        frames: Vec<Envelope<DoToRelay>>,
    },
    /// Close relay socket `conn` (refused or replaced).
    CloseRelay {
        conn: u32,
        reason: String,
    },
    /// Stream a reply; report deltas and the end as [`LlmEvent`]s tagged `stream`.
    StartLlm {
        stream: u32,
        messages: Vec<ChatMessage>,
        /// The tools the reply is offered.
        tools: crate::tools::Offer,
        first_token_ms: u32,
        total_ms: u32,
    },
    /// Stop reading stream `stream` (its events are ignored from now on anyway).
    CancelLlm {
        stream: u32,
    },
    TwilioCreate {
        to: String,
        timeout_secs: u32,
        time_limit_secs: u32,
    },
    TwilioFetch {
        sid: String,
    },
    /// The Calls list filtered by `To` and started on or after `since_ms`.
    TwilioFind {
        to: String,
        since_ms: u64,
    },
    TwilioHangUp {
        sid: String,
        purpose: HangUpPurpose,
    },
    Db(DbOp),
    /// The call settled after a conversation the caller spoke in: update what the persona
    /// remembers of them (`crate::memory`), in the background. Emitted once, after the
    /// settlement is written, so it never holds settlement up; failing keeps the old notes.
    Remember {
        lines: Vec<TranscriptLine>,
        ended_at_ms: u64,
    },
    /// The call's final record is written (emitted once, connected or not): what follows
    /// a call happens now (a schedule's retry or next occurrence).
    Settled {
        status: CallStatus,
    },
    /// The persona asked to call the caller back at `at_ms`: book a scheduled call to the
    /// account's verified number with this call's persona (the usual limits apply), and
    /// answer with [`Event::Callback`].
    ScheduleCallback {
        tool_call_id: String,
        at_ms: u64,
    },
    /// Twilio accepted the dial: read the persona now, while the phone rings, and answer
    /// with [`Event::Prepared`] (so the relay's `hello` needs no reads when it connects).
    Prepare,
    /// Have the relay synthesize the greeting while the phone rings
    /// (`PUT {relay}/internal/calls/{id}/greeting`), so it plays the moment a person
    /// answers. Best effort, in the background: without it the greeting goes through the
    /// relay's TTS socket as before.
    StageGreeting {
        voice_id: String,
        voice_settings: VoiceSettings,
        text: String,
    },
    /// Set the alarm to this time (ms since the epoch), or delete it.
    SetAlarm(Option<u64>),
    /// Something an operator should see in the logs.
    Log {
        level: LogLevel,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Info,
    Warn,
    Error,
}

/// Database writes, each idempotent by its ledger key.
#[derive(Debug, Clone, PartialEq)]
pub enum DbOp {
    /// A scheduled call's time has come: mark it queued and reserve its first minute.
    ReserveScheduled { key: String, amount: i64 },
    /// Reserve one more minute of talk.
    ReserveMinute {
        key: String,
        minute: u32,
        amount: i64,
    },
    /// A non-final status change (best effort; the final record rewrites it).
    Progress {
        status: CallStatus,
        sid: Option<String>,
        started_at_ms: Option<u64>,
        answered_by: Option<String>,
    },
    /// End a call that never connected and release what it holds.
    EndUnconnected {
        status: CallStatus,
        reason: String,
        release: i64,
        at_ms: u64,
    },
    /// The transcript, provider costs and latencies so far (idempotent upserts).
    SaveConversation(Box<ConversationRecord>),
    /// The final record: release the reservation, charge, write the Twilio cost.
    Settle(Settlement),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settlement {
    pub status: CallStatus,
    pub reason: Option<String>,
    pub ended_at_ms: u64,
    pub duration_secs: u32,
    pub charge: i64,
    pub release: i64,
    pub twilio_minutes: i64,
    pub twilio_micros: i64,
}

/// What the database keeps of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationRecord {
    pub lines: Vec<TranscriptLine>,
    pub costs: Vec<CostLine>,
    /// (turn, end of turn → first audio ms, LLM first token ms)
    pub latencies: Vec<(u32, Option<u32>, Option<u32>)>,
    pub at_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TranscriptLine {
    pub seq: i64,
    pub role: Speaker,
    pub text: String,
    pub at_ms: u64,
    pub interrupted: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CostLine {
    pub provider: &'static str,
    pub quantity: f64,
    pub unit: &'static str,
    pub micros: i64,
}

/// The answer to `Cancel` and `End`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelOutcome {
    pub canceled: bool,
    pub status: CallStatus,
}

/// One line of the conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub speaker: Speaker,
    /// Persona turns: the turn the relay reports `heard`/`interrupted` for.
    pub turn: Option<u32>,
    /// What was generated (persona) or transcribed (user).
    pub text: String,
    /// What the caller actually heard, once the relay confirmed it.
    pub heard: Option<String>,
    pub interrupted: bool,
    pub at_ms: u64,
}

/// How far the dial got. The intent is persisted before the request goes out, so a
/// restart with the outcome unknown looks the call up instead of dialling again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dial {
    NotYet,
    /// `POST Calls.json` sent (attempt n, counted from 1).
    Requested {
        at_ms: u64,
        attempt: u32,
    },
    /// Dial at `at_ms`: the first try (from the alarm, at once), or again after a 429
    /// (nothing was created).
    Due {
        at_ms: u64,
        attempt: u32,
    },
    /// The outcome is unknown: look the call up by `To` (lookups so far).
    Unknown {
        since_ms: u64,
        lookups: u32,
    },
    /// Twilio has the call.
    Placed {
        at_ms: u64,
    },
}

/// The relay side of the call: which control socket is the call's, and its stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayLink {
    /// Sockets the shell has open (accepted, not closed).
    pub open: Vec<u32>,
    /// The socket bound to the call's stream.
    pub active: Option<u32>,
    /// The one media stream this call accepts.
    pub stream_sid: Option<String>,
    /// When the media stream first connected (our measure of connected time starts).
    pub connected_ms: Option<u64>,
    /// When the bound socket closed with the call still live.
    pub lost_ms: Option<u64>,
    /// When the relay reported the stream over.
    pub ended_ms: Option<u64>,
    /// Seq of our `hello` in the outbox, resent to a socket not yet bound.
    pub hello_seq: Option<u64>,
    /// The number the shell gives the next socket it accepts.
    pub next_conn: u32,
}

/// The LLM reply being streamed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LlmTurn {
    pub stream: u32,
    pub turn: u32,
    pub started_ms: u64,
    pub text: String,
    pub first_token_ms: Option<u32>,
    /// The reply that answers tool results: it was offered only `end_call`.
    #[serde(default)]
    pub answering: bool,
    /// A promoted speculation: how long before the end of turn its stream began, so its
    /// first token is timed from the end of turn like any reply's.
    #[serde(default)]
    pub lead_ms: u32,
}

/// A reply begun on a pause's transcript, held unspoken until the turn is confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Speculation {
    pub stream: u32,
    /// The caller's words it answers.
    pub text: String,
    pub started_ms: u64,
    /// Fingerprint of the prompt it was started with (system prompt, conversation, the
    /// caller's words): it is used only if the confirmed turn gives the same prompt.
    /// Below 2^53, like every number in the stored session.
    pub history: u64,
    /// Tokens of its prompt, estimated (counted if it is discarded before it finished).
    pub prompt_estimate: u64,
    /// The reply so far, and when its first token came (since `started_ms`).
    pub reply: String,
    pub first_token_ms: Option<u32>,
    /// Set once the stream finished before the turn was confirmed.
    pub done: Option<SpeculationDone>,
}

/// A speculative stream's end, kept until the turn is confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeculationDone {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub tool_calls: Vec<crate::tools::ToolCall>,
}

/// What speculation did on this call (reported in the call's log line at the end).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpeculationStats {
    pub started: u32,
    /// Promoted to the turn's reply.
    pub used: u32,
    /// Tokens (prompt + completion) of discarded speculations: exact when the stream had
    /// finished, estimated otherwise. Already part of the LLM token totals.
    pub wasted_tokens: u64,
}

/// A final status waiting to be written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Final {
    pub status: CallStatus,
    pub duration_secs: u32,
    pub connected: bool,
    pub reason: Option<String>,
    pub at_ms: u64,
    /// Credits to charge (lowered to what can be collected on a shortfall).
    pub charge: i64,
    /// The call's price before any shortfall.
    pub full_charge: i64,
}

/// Where the settlement write is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SettleStep {
    None,
    InFlight,
    RetryAt(u64),
    Done,
}

/// The conversation's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub persona: Option<PersonaBrief>,
    pub lines: Vec<Line>,
    pub next_turn: u32,
    /// Last seq we sent to the relay.
    pub out_seq: u64,
    /// Highest relay seq applied.
    pub last_in_seq: u64,
    /// DO → relay frames the relay has not yet acknowledged.
    pub outbox: Vec<Envelope<DoToRelay>>,
    /// Last speech from either side the idle timer counts from.
    pub last_activity_ms: Option<u64>,
    pub checked_in: bool,
    /// A goodbye was sent at this time; the call ends when the relay confirms.
    pub hanging_up_ms: Option<u64>,
    pub llm_prompt_tokens: u64,
    pub llm_completion_tokens: u64,
    pub stt_audio_secs: f64,
    pub tts_chars: u64,
    pub latencies: Vec<(u32, Option<u32>, Option<u32>)>,
    pub next_stream: u32,
    /// Tool calls of the last reply waiting for their results, to go back to the LLM.
    #[serde(default)]
    pub tool_round: Option<ToolRound>,
    /// The call's one callback, once the persona asked for it.
    #[serde(default)]
    pub callback: Option<crate::tools::CallbackState>,
    #[serde(default)]
    pub speculation: SpeculationStats,
}

/// A reply's tool calls and their results (`None`: still being carried out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolRound {
    pub calls: Vec<crate::tools::ToolCall>,
    pub results: Vec<Option<String>>,
}

/// One call's whole state, persisted by the shell after every event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub call_id: String,
    pub user_id: String,
    pub phone_number: String,
    pub account_sid: String,
    pub limits: Limits,
    pub status: CallStatus,
    pub scheduled_at_ms: Option<u64>,
    /// Set while a scheduled call's reservation is in flight, or its retry time.
    pub reserve_retry_ms: Option<u64>,
    pub reserving: bool,
    pub dial: Dial,
    /// When the first create went out (reconcile and give-up deadlines count from it).
    pub dialed_ms: Option<u64>,
    /// What Twilio said when a create's outcome was unknown (shown if the call fails).
    pub dial_error: Option<String>,
    pub sid: Option<String>,
    /// Credits currently held for the call.
    pub reserved: i64,
    /// The user's balance as last seen (for Twilio's `TimeLimit`).
    pub balance: i64,
    /// Minutes of talk reserved (the first with the call).
    pub minutes_reserved: u32,
    /// A minute reservation in flight, or its retry time.
    pub minute_pending: bool,
    pub minute_retry_ms: Option<u64>,
    /// Highest Twilio `SequenceNumber` applied (-1 before any).
    pub last_seq: i64,
    pub answered_by: Option<String>,
    pub answered_ms: Option<u64>,
    /// Next Twilio lookup of a call whose final status is late, and how many failed.
    pub lookup_at_ms: Option<u64>,
    pub lookup_failures: u32,
    pub lookup_in_flight: bool,
    /// The user (`Some(None)`) or the platform (`Some(Some(reason))`) asked to stop the
    /// call before it connected.
    pub cancel_requested: Option<Option<String>>,
    pub relay: RelayLink,
    pub conv: Conversation,
    pub llm: Option<LlmTurn>,
    /// A speculative reply in flight (never spoken until promoted into `llm`).
    #[serde(default)]
    pub spec: Option<Speculation>,
    /// Twilio was asked to end the call.
    pub twilio_end_requested: bool,
    /// The conversation is over (relay ended, or Twilio asked to end it); Twilio's final
    /// status is awaited until `settle_wait_secs` after this.
    pub ending_ms: Option<u64>,
    pub final_: Option<Final>,
    pub settle: SettleStep,
    /// Credits charged at settlement.
    pub charged: i64,
    /// Twilio creates issued that Twilio could have accepted (invariant: ≤ 1).
    pub creates: u32,
    /// Of those, refused with 429 (so certainly not created).
    pub rate_limited: u32,
    /// The answer to the last `Cancel` or `End`.
    pub reply: Option<CancelOutcome>,
    /// The alarm as last set (None: none set).
    pub alarm_ms: Option<u64>,
}

/// Said when the LLM fails or stalls: never silence.
pub const FALLBACK_LINE: &str =
    "Sorry, I lost my train of thought for a second. Could you say that again?";
pub const CHECK_IN_LINE: &str = "Are you still there?";
/// Said when the persona ended the call without a goodbye of its own.
pub const PERSONA_GOODBYE: &str = "Alright, talk soon. Bye!";
pub const IDLE_GOODBYE: &str = "Seems like you're busy. I'll let you go. Talk soon, bye!";
/// Said when the platform ends the call (the account was suspended).
pub const ENDED_GOODBYE: &str = "I'm sorry, I have to end our call now. Goodbye.";
pub const CREDITS_GOODBYE: &str =
    "Looks like you're out of credits for now, so I have to wrap up. Talk soon, bye!";
pub const MAX_DURATION_GOODBYE: &str =
    "We've reached the time limit for this call. Great talking with you, bye!";
