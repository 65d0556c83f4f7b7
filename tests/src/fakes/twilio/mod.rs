//! Fake Twilio: the Calls REST API, call progress with signed status callbacks, TwiML
//! webhooks and bidirectional Media Streams, all as PROTOCOLS.md §1–3 describe them.
//!
//! A created call runs in its own task (`call.rs`) following the [`CalleeScript`]
//! registered for its `To` number: it rings, then is busy, unanswered, failed, or answered
//! by a scripted [`crate::sim::Simulator`] that hears the bot and talks back through the
//! media stream (`media.rs`). Everything the fake saw and sent is recorded in
//! [`CallRecord`]s that tests read through [`Handle`].
//!
//! This module owns the configuration, the shared state and the handle. It must not sign
//! anything itself (signatures come from `cmb_core::twilio_sig`) and must never panic on
//! client input: bad requests get Twilio's error JSON, bad TwiML fails the call the way
//! Twilio does and is recorded as a notification.

pub mod app;
mod call;
mod media;
mod rest;
pub mod twiml;
mod verify;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

use crate::fakes::faults::{self, FaultSwitch};
use crate::fakes::{Server, LOOPBACK_ANY};
use crate::sim::{SimEvent, SimScript, Simulator, TranscriptLine};

pub use media::Playout;

/// Twilio REST API version, in paths and in every webhook's `ApiVersion`.
pub const API_VERSION: &str = "2010-04-01";

/// Configuration of the fake.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where to listen; port 0 picks a free port.
    pub addr: SocketAddr,
    /// The AccountSid the REST API accepts (Basic auth user and path segment).
    pub account_sid: String,
    /// The AuthToken: Basic auth password and webhook signing key.
    pub auth_token: String,
    /// How long one ring lasts. `Timeout` (seconds) is counted in rings, so with a short
    /// ring a test still sees a call time out after `Timeout` rings, only sooner.
    pub ring: Duration,
    /// Wall-clock time between two 20 ms media frames. 20 ms is real time; tests may
    /// go faster: media timestamps and playback stay in media time, so the protocol seen
    /// by the server is the same, only sooner.
    pub frame_interval: Duration,
    /// The script for numbers without one of their own.
    pub default_script: CalleeScript,
    /// For numbers without one of their own that were called before (a callback): this
    /// script instead of `default_script`, when set.
    pub repeat_script: Option<CalleeScript>,
    /// How long Twilio waits for a webhook (TwiML or callback) to answer.
    pub webhook_timeout: Duration,
    /// Seed of the fault jitter.
    pub fault_seed: u64,
    /// The Verify Service SID (`VA…`) the Verify API accepts.
    pub verify_service_sid: String,
    /// Network delay of the media stream, each way: every message to the server leaves
    /// this long after it was queued, and every message from it is handled this long
    /// after it arrived. A delay line: messages keep their spacing (the 20 ms cadence is
    /// untouched). Added to the fault latency. 0 = none (the latency benchmark sets it).
    pub media_one_way_delay: Duration,
}

/// The Verify Service SID the test stacks configure (`TWILIO_VERIFY_SERVICE_SID`).
pub const VERIFY_SERVICE_SID: &str = xtask::providers::FAKE_VERIFY_SERVICE_SID;

impl Config {
    /// Real-time defaults: 1 s rings, 20 ms frames, loopback on a free port, and a
    /// callee that answers after one ring and has a short conversation.
    pub fn new(account_sid: impl Into<String>, auth_token: impl Into<String>) -> Self {
        Self {
            addr: LOOPBACK_ANY,
            account_sid: account_sid.into(),
            auth_token: auth_token.into(),
            ring: Duration::from_secs(1),
            frame_interval: Duration::from_millis(20),
            default_script: CalleeScript::answer(SimScript::default_conversation()),
            repeat_script: None,
            webhook_timeout: Duration::from_secs(15),
            fault_seed: faults::DEFAULT_SEED,
            verify_service_sid: VERIFY_SERVICE_SID.to_owned(),
            media_one_way_delay: Duration::ZERO,
        }
    }
}

/// The AccountSid of [`Config::default`] (the `fakes` binary's stand-in).
pub const DEFAULT_ACCOUNT_SID: &str = "AC00000000000000000000000000000000";
/// The AuthToken of [`Config::default`] (the `fakes` binary's stand-in).
pub const DEFAULT_AUTH_TOKEN: &str = "fake-twilio-auth-token";

impl Default for Config {
    /// [`Config::new`] with [`DEFAULT_ACCOUNT_SID`] and [`DEFAULT_AUTH_TOKEN`].
    fn default() -> Self {
        Self::new(DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN)
    }
}

/// What the callee at a number does when called.
#[derive(Clone, Debug, PartialEq)]
pub enum CalleeScript {
    /// Picks up after some rings; the simulator then runs `session`.
    Answer(Answer),
    /// The line is busy: the call ends `busy` without ringing.
    Busy,
    /// Rings until the call's `Timeout`, then ends `no-answer`.
    NoAnswer,
    /// The carrier rejects the call: it ends `failed`.
    Fail,
}

impl CalleeScript {
    /// A human who answers after one ring and follows `session`.
    pub fn answer(session: SimScript) -> Self {
        Self::Answer(Answer {
            after_rings: 1,
            answered_by: AnsweredBy::Human,
            session,
            duration_override_secs: None,
        })
    }
}

/// How an answered call goes.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    /// Rings before pick-up; more rings than the call's `Timeout` means `no-answer`.
    pub after_rings: u32,
    /// Reported as `AnsweredBy` when the call asked for `MachineDetection`.
    pub answered_by: AnsweredBy,
    /// What the person (or machine) does once connected.
    pub session: SimScript,
    /// Reported `CallDuration`/`duration` instead of the measured one, so a fast test can
    /// exercise minute-based billing.
    pub duration_override_secs: Option<u64>,
}

/// Answering machine detection result (the subset seen in real callbacks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnsweredBy {
    Human,
    MachineEndBeep,
    MachineStart,
    Unknown,
}

impl AnsweredBy {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Human => "human",
            Self::MachineEndBeep => "machine_end_beep",
            Self::MachineStart => "machine_start",
            Self::Unknown => "unknown",
        }
    }
}

/// Call status, as in the REST resource and `CallStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CallStatus {
    Queued,
    Ringing,
    InProgress,
    Completed,
    Busy,
    Failed,
    NoAnswer,
    Canceled,
}

impl CallStatus {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Ringing => "ringing",
            Self::InProgress => "in-progress",
            Self::Completed => "completed",
            Self::Busy => "busy",
            Self::Failed => "failed",
            Self::NoAnswer => "no-answer",
            Self::Canceled => "canceled",
        }
    }

    /// Whether the call is over.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::Ringing | Self::InProgress)
    }
}

/// A webhook the fake sent (status callback, stream status callback) and its outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookRecord {
    /// The URL requested (for GET, with the parameters in its query).
    pub url: String,
    pub method: String,
    /// Form parameters (POST) or the query parameters (GET), in sent order.
    pub params: Vec<(String, String)>,
    /// The `X-Twilio-Signature` sent.
    pub signature: String,
    /// HTTP status of the answer, or why there was none.
    pub result: Result<u16, String>,
    /// When the request was sent.
    pub sent_at: std::time::Instant,
    /// From sending the request to the answer's status line (or the failure).
    pub elapsed: std::time::Duration,
}

impl WebhookRecord {
    /// The value of a parameter, if sent.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One TwiML document request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TwimlFetch {
    pub request: WebhookRecord,
    /// The document received (empty on failure).
    pub body: String,
    pub content_type: Option<String>,
}

/// A debugger notification Twilio would raise for the call (e.g. 11200, 12100, 31920).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub code: u32,
    pub message: String,
}

/// A `mark` sent back to the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkEcho {
    pub name: String,
    /// Stream media time (ms) when it was sent back.
    pub at_ms: u64,
    /// Returned early because a `clear` dropped the audio before it.
    pub by_clear: bool,
}

/// A `clear` received from the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClearRecord {
    pub at_ms: u64,
    /// Queued audio bytes discarded.
    pub dropped_bytes: u64,
    /// Marks returned at once because of it.
    pub marks_returned: Vec<String>,
}

/// How a media stream ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The server closed the WebSocket: Twilio goes on with the next verb.
    ServerClosed,
    /// Twilio ended it (callee hung up, REST hang-up or redirect): `stop` was sent.
    Stopped,
    /// A fault tore the connection down without a close frame.
    Dropped,
    /// The WebSocket could not be opened.
    HandshakeFailed(String),
}

/// Everything about one `<Connect><Stream>`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamRecord {
    /// Resolved `ws://` URL connected to.
    pub url: String,
    pub stream_sid: String,
    /// The `X-Twilio-Signature` sent on the upgrade.
    pub signature: String,
    pub custom_parameters: Vec<(String, String)>,
    /// JSON messages queued for the server (`connected`, `start`, `media`, …); a fault
    /// may drop the connection before the last ones leave.
    pub messages_sent: u64,
    /// Inbound (callee) `media` frames sent.
    pub media_frames_sent: u64,
    pub dtmf_sent: Vec<char>,
    /// Outbound `media` messages and their decoded bytes.
    pub media_received: u64,
    pub bytes_received: u64,
    /// Outbound bytes actually played to the callee.
    pub bytes_played: u64,
    pub marks_received: Vec<String>,
    pub marks_echoed: Vec<MarkEcho>,
    pub clears: Vec<ClearRecord>,
    /// Twilio warnings raised on this stream (31950 malformed message, 31931 buffer
    /// full), each at most once, as Twilio does.
    pub warnings: Vec<u32>,
    pub end: Option<StreamEnd>,
    /// When things happened on the stream, for latency measurements.
    pub timing: StreamTiming,
}

/// Wall-clock moments of one stream (for `latency_bench`). "Sent" is when the fake
/// queued a message, before [`Config::media_one_way_delay`]; "arrived" is when a message
/// from the server reached the fake, after it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamTiming {
    /// `start` sent: the callee is on the line.
    pub start_sent: Option<tokio::time::Instant>,
    /// The first outbound `media` arrived.
    pub first_media: Option<tokio::time::Instant>,
    /// The callee's utterances, in order.
    pub utterances: Vec<UtteranceTiming>,
    /// Each `clear` arrived.
    pub clears: Vec<tokio::time::Instant>,
}

/// One utterance of the callee on the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UtteranceTiming {
    /// The transcript label ([`crate::sim::Utterance::render`]).
    pub text: String,
    /// Its first frame was sent.
    pub started: tokio::time::Instant,
    /// Its last frame was sent.
    pub ended: Option<tokio::time::Instant>,
    /// The first outbound `media` that arrived after `ended`.
    pub first_media_after: Option<tokio::time::Instant>,
}

/// Everything the fake knows about one call. A snapshot: read a fresh one to see progress.
#[derive(Clone, Debug, PartialEq)]
pub struct CallRecord {
    pub sid: String,
    /// The create request's form, exactly as received.
    pub params: Vec<(String, String)>,
    pub to: String,
    pub from: String,
    pub url: Option<String>,
    pub method: String,
    pub twiml: Option<String>,
    pub status_callback: Option<String>,
    pub status_callback_method: String,
    pub status_callback_events: Vec<String>,
    pub timeout_secs: u32,
    pub machine_detection: Option<String>,
    pub status: CallStatus,
    /// Every status the call went through, in order, from `queued`.
    pub status_history: Vec<CallStatus>,
    pub answered_by: Option<AnsweredBy>,
    pub date_created: OffsetDateTime,
    pub date_updated: OffsetDateTime,
    pub start_time: Option<OffsetDateTime>,
    pub end_time: Option<OffsetDateTime>,
    pub duration_secs: Option<u64>,
    /// Call progress callbacks, in sequence order.
    pub callbacks: Vec<WebhookRecord>,
    /// Stream status callbacks (`stream-started`, …).
    pub stream_callbacks: Vec<WebhookRecord>,
    pub twiml_fetches: Vec<TwimlFetch>,
    pub streams: Vec<StreamRecord>,
    pub notices: Vec<Notice>,
    /// The callee's transcript, both sides (see [`crate::sim::Simulator::transcript`]).
    pub transcript: Vec<TranscriptLine>,
    /// Everything the callee decoded from what it heard.
    pub heard_text: String,
    pub sim_events: Vec<SimEvent>,
    /// The call ended and every callback was delivered (or failed).
    pub finished: bool,
}

impl CallRecord {
    /// The value of a create parameter (first occurrence).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Requests to a running call, from the REST API or the handle.
#[derive(Debug)]
enum Command {
    /// `Status=completed`, or the callee hanging up (`by_callee`).
    Hangup { by_callee: bool },
    /// `Status=canceled` while queued or ringing.
    Cancel,
    /// New TwiML for the live call (`Url`/`Method` or `Twiml`).
    Redirect(call::TwimlSource),
}

struct State {
    calls: Vec<CallRecord>,
    index: HashMap<String, usize>,
    scripts: HashMap<String, CalleeScript>,
    default_script: CalleeScript,
    commands: HashMap<String, mpsc::UnboundedSender<Command>>,
    sims: HashMap<String, Arc<Mutex<Simulator>>>,
    /// Numbers whose call-progress callbacks are lost (never sent, as when our Worker
    /// is down and Twilio gives up).
    lost_callbacks: std::collections::HashSet<String>,
    /// Pending Verify verifications by (service, `To`).
    verifications: HashMap<(String, String), verify::Pending>,
    /// Every verification SMS "sent": (`To`, code), oldest first.
    sms: Vec<(String, String)>,
}

/// State shared by the REST handlers, the call tasks and the handle.
struct Shared {
    cfg: Config,
    faults: FaultSwitch,
    http: reqwest::Client,
    state: Mutex<State>,
    /// Bumped on every change so waiters wake up.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere must not wedge every later request: keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `edit` to a call's record and wakes waiters.
    fn update_call(&self, sid: &str, edit: impl FnOnce(&mut CallRecord)) {
        {
            let mut state = self.lock();
            let Some(&i) = state.index.get(sid) else {
                return;
            };
            edit(&mut state.calls[i]);
        }
        self.changed.send_modify(|v| *v += 1);
    }

    fn call(&self, sid: &str) -> Option<CallRecord> {
        let (mut record, sim) = {
            let state = self.lock();
            let i = *state.index.get(sid)?;
            (state.calls[i].clone(), state.sims.get(sid).cloned())
        };
        if let Some(sim) = sim {
            let sim = sim.lock().unwrap_or_else(PoisonError::into_inner);
            record.transcript = sim.transcript().to_vec();
            record.heard_text = sim.heard_text().to_owned();
            record.sim_events = sim.events().to_vec();
        }
        Some(record)
    }

    fn script_for(&self, to: &str) -> CalleeScript {
        let state = self.lock();
        let called_before = state.calls.iter().any(|c| c.to == to);
        let repeat = self.cfg.repeat_script.as_ref().filter(|_| called_before);
        state
            .scripts
            .get(to)
            .or(repeat)
            .unwrap_or(&state.default_script)
            .clone()
    }
}

/// The running fake; dropping it stops the server.
pub struct Handle {
    server: Server,
    shared: Arc<Shared>,
}

/// Read access to the fake's verification SMS, shared with the fake.
#[derive(Clone)]
pub struct SmsInbox(Arc<Shared>);

impl SmsInbox {
    /// The newest code sent to `to`.
    pub fn latest(&self, to: &str) -> Option<String> {
        self.0
            .lock()
            .sms
            .iter()
            .rev()
            .find(|(n, _)| n == to)
            .map(|(_, c)| c.clone())
    }
}

/// Starts the fake on `cfg.addr` and returns its handle.
pub async fn spawn(cfg: Config) -> anyhow::Result<Handle> {
    let faults = FaultSwitch::with_seed(cfg.fault_seed);
    let shared = new_shared(cfg, faults)?;
    let server = Server::start("twilio", shared.cfg.addr, router_for(shared.clone())).await?;
    Ok(Handle { server, shared })
}

/// The fake's HTTP app (REST API + `/__faults`), for tests that drive it with `oneshot`.
/// Calls created through it run in tasks on the current runtime.
pub fn router(cfg: Config, faults: FaultSwitch) -> anyhow::Result<axum::Router> {
    Ok(router_for(new_shared(cfg, faults)?))
}

fn new_shared(cfg: Config, faults: FaultSwitch) -> anyhow::Result<Arc<Shared>> {
    let http = reqwest::Client::builder()
        .timeout(cfg.webhook_timeout)
        // Twilio does not follow redirects on webhooks; a 3xx is the answer.
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let (changed, _) = watch::channel(0);
    Ok(Arc::new(Shared {
        state: Mutex::new(State {
            calls: Vec::new(),
            index: HashMap::new(),
            scripts: HashMap::new(),
            default_script: cfg.default_script.clone(),
            commands: HashMap::new(),
            sims: HashMap::new(),
            lost_callbacks: Default::default(),
            verifications: HashMap::new(),
            sms: Vec::new(),
        }),
        cfg,
        faults,
        http,
        changed,
    }))
}

fn router_for(shared: Arc<Shared>) -> axum::Router {
    let faults = shared.faults.clone();
    faults::wrap(
        rest::routes(shared.clone()).merge(verify::routes(shared)),
        faults,
        rest::error_responder(),
    )
}

impl Handle {
    /// The codes Verify "sent" by SMS to `to`, oldest first (the phone's inbox).
    pub fn sms_codes(&self, to: &str) -> Vec<String> {
        self.shared
            .lock()
            .sms
            .iter()
            .filter(|(n, _)| n == to)
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// A cheap clone of the inbox for an API client (see `ApiClient::with_sms`).
    pub fn sms_inbox(&self) -> SmsInbox {
        SmsInbox(self.shared.clone())
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT`: the value for `TWILIO_API_BASE`.
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// `ws://127.0.0.1:PORT` (the fake serves no WebSocket; here for symmetry).
    pub fn ws_url(&self) -> String {
        self.server.ws_url()
    }

    /// The live fault settings.
    pub fn faults(&self) -> &FaultSwitch {
        &self.shared.faults
    }

    /// What the callee at `number` (E.164) does from now on.
    pub fn set_script(&self, number: impl Into<String>, script: CalleeScript) {
        self.shared.lock().scripts.insert(number.into(), script);
    }

    /// From now on, call-progress callbacks of calls to `number` are lost: Twilio's
    /// resource still moves on, only the webhooks never arrive.
    pub fn lose_status_callbacks(&self, number: impl Into<String>) {
        self.shared.lock().lost_callbacks.insert(number.into());
    }

    /// What callees without their own script do from now on.
    pub fn set_default_script(&self, script: CalleeScript) {
        self.shared.lock().default_script = script;
    }

    /// Every call so far, in creation order.
    pub fn calls(&self) -> Vec<CallRecord> {
        let sids: Vec<String> = self
            .shared
            .lock()
            .calls
            .iter()
            .map(|c| c.sid.clone())
            .collect();
        sids.iter()
            .filter_map(|sid| self.shared.call(sid))
            .collect()
    }

    /// One call, if it exists.
    pub fn call(&self, sid: &str) -> Option<CallRecord> {
        self.shared.call(sid)
    }

    /// Simulates the callee hanging up (while it rings: declining, which ends it `busy`).
    /// Returns false if the call is unknown or over.
    pub fn hangup(&self, call_sid: &str) -> bool {
        let state = self.shared.lock();
        state
            .commands
            .get(call_sid)
            .is_some_and(|tx| tx.send(Command::Hangup { by_callee: true }).is_ok())
    }

    /// Waits until the call satisfies `pred`; errors after `timeout` with the last state.
    pub async fn wait_for(
        &self,
        sid: &str,
        timeout: Duration,
        pred: impl Fn(&CallRecord) -> bool,
    ) -> anyhow::Result<CallRecord> {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if let Some(record) = self.shared.call(sid) {
                if pred(&record) {
                    return Ok(record);
                }
            }
            // Transcripts change without a state bump, so re-check at least every 50 ms.
            let wake = (tokio::time::Instant::now() + Duration::from_millis(50)).min(deadline);
            let _ = tokio::time::timeout_at(wake, rx.changed()).await;
            if tokio::time::Instant::now() >= deadline {
                let last = self.shared.call(sid);
                anyhow::bail!(
                    "call {sid} did not reach the expected state in {timeout:?}; last: {last:#?}"
                );
            }
        }
    }

    /// Waits until the call has ended and its last callback went out.
    pub async fn wait_finished(&self, sid: &str, timeout: Duration) -> anyhow::Result<CallRecord> {
        self.wait_for(sid, timeout, |c| c.finished).await
    }

    /// Waits for the first call to exist (e.g. created by the Worker) and returns its sid.
    pub async fn wait_for_any_call(&self, timeout: Duration) -> anyhow::Result<String> {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if let Some(c) = self.shared.lock().calls.last() {
                return Ok(c.sid.clone());
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                anyhow::bail!("no call was created within {timeout:?}");
            }
        }
    }

    /// Stops the server (calls in progress keep their tasks until they end).
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

/// `CA`/`MZ`… + 32 lowercase hex digits, like Twilio sids.
fn new_sid(prefix: &str) -> String {
    format!("{prefix}{:032x}", rand::random::<u128>())
}

/// RFC 2822 date as Twilio writes it: `Tue, 09 May 2017 18:27:49 +0000`.
fn rfc2822(t: OffsetDateTime) -> String {
    // Formatting a valid UTC date with a well-known format cannot fail; fall back anyway.
    t.format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sids look like Twilio's: prefix + 32 lowercase hex.
    #[test]
    fn sid_shape() {
        let sid = new_sid("CA");
        assert_eq!(sid.len(), 34);
        assert!(sid.starts_with("CA"));
        assert!(sid[2..]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(sid, new_sid("CA"));
    }

    /// Dates use Twilio's RFC 2822 form with +0000.
    #[test]
    fn date_format() {
        let t = time::macros::datetime!(2017-05-09 18:27:49 UTC);
        assert_eq!(rfc2822(t), "Tue, 09 May 2017 18:27:49 +0000");
    }
}
