//! One fake call's life, in its own task: dialing, ringing, the callee's answer (or not),
//! the TwiML program, and the status callbacks Twilio sends along the way.
//!
//! Owns the call state machine (`queued → ringing → in-progress → final`), webhook
//! delivery (signed with `cmb_core::twilio_sig`, sent in `SequenceNumber` order by a
//! per-call sender so a slow receiver never stalls the call), TwiML fetching and the
//! verbs other than `<Connect><Stream>` (that one is `media.rs`). It must not parse HTTP
//! requests from clients (that is `rest.rs`).
//!
//! Twilio behaviours modelled here, and their documented choices:
//! - `Timeout` is counted in rings (one ring = `Config::ring`), so a short ring makes
//!   a test time out after the same number of rings, only faster.
//! - A TwiML fetch that fails (HTTP error: 11200, wrong content type: 12300, bad XML:
//!   12100, schema: 12200) is recorded as a notice; like Twilio, the callee then hears
//!   "An application error has occurred" and the call ends. Having been answered, it ends
//!   `completed` (Twilio reports the error in its debugger, not in the call status).
//! - `CallDuration` counts whole seconds from answer to end, rounded up.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::http::header;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::twiml::{self, Verb};
use super::{
    media, rfc2822, AnsweredBy, CallStatus, CalleeScript, Command, Notice, Shared, TwimlFetch,
    WebhookRecord, API_VERSION,
};
use crate::audio;
use crate::sim::{SimScript, Simulator, FRAME_BYTES, FRAME_MS};

/// What the callee hears when the TwiML cannot be run, as at Twilio.
const APPLICATION_ERROR: &str = "An application error has occurred. Goodbye.";

/// Where a call's TwiML comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TwimlSource {
    Url { url: String, method: String },
    Inline(String),
}

/// Starts the task that runs call `sid`.
pub(super) fn start(
    shared: Arc<Shared>,
    sid: String,
    source: TwimlSource,
    script: CalleeScript,
    commands: mpsc::UnboundedReceiver<Command>,
) {
    tokio::spawn(async move {
        let callbacks = Callbacks::start(shared.clone(), sid.clone());
        let mut commands = commands;
        let outcome = lifecycle(&shared, &sid, source, script, &mut commands, &callbacks).await;
        let now = OffsetDateTime::now_utc();
        let duration = outcome.duration_secs;
        shared.update_call(&sid, |c| {
            c.status = outcome.status;
            c.status_history.push(outcome.status);
            c.end_time = Some(now);
            c.date_updated = now;
            c.duration_secs = Some(duration);
        });
        callbacks.progress("completed", outcome.status.as_str());
        shared.lock().commands.remove(&sid);
        // Deliver what is queued before declaring the call finished.
        callbacks.finish().await;
        shared.update_call(&sid, |c| c.finished = true);
        tracing::info!(fake = "twilio", call_sid = %sid, status = outcome.status.as_str(), duration, "call ended");
    });
}

struct Outcome {
    status: CallStatus,
    duration_secs: u64,
}

impl Outcome {
    fn unanswered(status: CallStatus) -> Self {
        Self {
            status,
            duration_secs: 0,
        }
    }
}

/// The next command; pends forever once the channel is closed (nobody can send any more).
pub(super) async fn next_command(commands: &mut mpsc::UnboundedReceiver<Command>) -> Command {
    match commands.recv().await {
        Some(c) => c,
        None => std::future::pending().await,
    }
}

fn set_status(shared: &Shared, sid: &str, status: CallStatus) {
    let now = OffsetDateTime::now_utc();
    shared.update_call(sid, |c| {
        c.status = status;
        c.status_history.push(status);
        c.date_updated = now;
    });
}

async fn lifecycle(
    shared: &Arc<Shared>,
    sid: &str,
    source: TwimlSource,
    script: CalleeScript,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    callbacks: &Callbacks,
) -> Outcome {
    let now = OffsetDateTime::now_utc();
    shared.update_call(sid, |c| c.start_time = Some(now));
    // `initiated` is a callback status only: the resource stays `queued` until it rings.
    callbacks.progress("initiated", "initiated");
    let answer = match script {
        CalleeScript::Fail => return Outcome::unanswered(CallStatus::Failed),
        CalleeScript::Busy => return Outcome::unanswered(CallStatus::Busy),
        CalleeScript::NoAnswer => None,
        CalleeScript::Answer(answer) => Some(answer),
    };
    set_status(shared, sid, CallStatus::Ringing);
    callbacks.progress("ringing", "ringing");
    let timeout_rings = shared.call(sid).map_or(60, |c| c.timeout_secs);
    let wanted = answer.as_ref().map_or(u32::MAX, |a| a.after_rings);
    for _ in 0..wanted.min(timeout_rings) {
        tokio::select! {
            () = tokio::time::sleep(shared.cfg.ring) => {}
            command = next_command(commands) => match command {
                Command::Cancel | Command::Hangup { by_callee: false } => {
                    return Outcome::unanswered(CallStatus::Canceled);
                }
                // The callee declines the call while it rings.
                Command::Hangup { by_callee: true } => return Outcome::unanswered(CallStatus::Busy),
                // The REST API refuses redirects before answer; nothing to do here.
                Command::Redirect(_) => {}
            },
        }
    }
    let Some(answer) = answer.filter(|a| a.after_rings <= timeout_rings) else {
        return Outcome::unanswered(CallStatus::NoAnswer);
    };
    let answered_at = Instant::now();
    let amd = shared
        .call(sid)
        .is_some_and(|c| c.machine_detection.is_some());
    let answered_by = amd.then_some(answer.answered_by);
    shared.update_call(sid, |c| c.answered_by = answered_by);
    set_status(shared, sid, CallStatus::InProgress);
    callbacks.progress("answered", "in-progress");

    let sim = build_simulator(answer.session, sid).await;
    shared.lock().sims.insert(sid.to_owned(), sim.clone());
    let mut session = Session {
        shared: shared.clone(),
        sid: sid.to_owned(),
        answered_by,
        sim: sim.clone(),
        clock: Clock::new(shared.cfg.frame_interval),
        commands,
        callbacks,
    };
    session.run(source).await;
    {
        let mut sim = sim.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = sim.finish() {
            tracing::warn!(fake = "twilio", call_sid = %sid, error = %e, "simulator could not finish cleanly");
        }
    }
    // Ceil: any answered call lasts at least a second, as billed.
    let measured = answered_at.elapsed().as_secs_f64().ceil() as u64;
    Outcome {
        status: CallStatus::Completed,
        duration_secs: answer.duration_override_secs.unwrap_or(measured),
    }
}

/// Renders the callee's script off the runtime (espeak and WAV reads block).
async fn build_simulator(script: SimScript, sid: &str) -> Arc<Mutex<Simulator>> {
    let label = sid.to_owned();
    let built = tokio::task::spawn_blocking(move || {
        Simulator::new(script, label.clone()).unwrap_or_else(|e| {
            tracing::error!(fake = "twilio", call_sid = %label, error = %e, "callee script cannot be played; the callee hangs up");
            Simulator::broken(&e, label)
        })
    })
    .await;
    let sim = built.unwrap_or_else(|e| {
        let error = crate::sim::SimError::Espeak(format!("rendering task failed: {e}"));
        Simulator::broken(&error, sid)
    });
    Arc::new(Mutex::new(sim))
}

/// Media time, advanced one 20 ms frame per tick of a wall-clock interval.
pub(super) struct Clock {
    interval: Interval,
    /// Media time since the call was answered.
    pub(super) media_ms: u64,
}

impl Clock {
    fn new(frame_interval: Duration) -> Self {
        let mut interval = tokio::time::interval(frame_interval);
        // After a stall, keep a steady pace rather than bursting frames to catch up.
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            interval,
            media_ms: 0,
        }
    }

    /// Waits for the next frame; returns its media time.
    pub(super) async fn tick(&mut self) -> u64 {
        self.interval.tick().await;
        let now = self.media_ms;
        self.media_ms += FRAME_MS;
        now
    }
}

/// How a verb ended.
pub(super) enum VerbEnd {
    /// Go on with the next verb.
    Next,
    /// The call is over (callee or REST hang-up, or `<Hangup>`).
    Hangup,
    /// New TwiML replaces the rest of the program.
    Redirect(TwimlSource),
}

/// An answered call's program and the callee attached to it.
pub(super) struct Session<'a> {
    pub(super) shared: Arc<Shared>,
    pub(super) sid: String,
    pub(super) answered_by: Option<AnsweredBy>,
    pub(super) sim: Arc<Mutex<Simulator>>,
    pub(super) clock: Clock,
    pub(super) commands: &'a mut mpsc::UnboundedReceiver<Command>,
    pub(super) callbacks: &'a Callbacks,
}

impl Session<'_> {
    async fn run(&mut self, source: TwimlSource) {
        let mut base_url = None;
        let mut verbs = self.load(source, &mut base_url).await;
        while let Some(verb) = verbs.pop_front() {
            let end = match verb {
                Verb::Say { text, loops } => {
                    let spoken = audio::encode_text(&text);
                    let all = spoken.repeat(loops.max(1) as usize);
                    self.play(&all).await
                }
                Verb::Pause { seconds } => {
                    self.play(&audio::silence(seconds.saturating_mul(1000)))
                        .await
                }
                Verb::Hangup => VerbEnd::Hangup,
                Verb::Connect(noun) => {
                    let action = noun.action.clone();
                    let end = media::run_stream(self, noun, base_url.as_deref()).await;
                    match (end, action) {
                        // Like Twilio: once the stream ends, the action URL's TwiML takes
                        // over (the verbs after <Connect> never run).
                        (VerbEnd::Next, Some(url)) => VerbEnd::Redirect(TwimlSource::Url {
                            url: resolve_url(base_url.as_deref(), &url),
                            method: "POST".to_owned(),
                        }),
                        (end, _) => end,
                    }
                }
            };
            match end {
                VerbEnd::Next => {}
                VerbEnd::Hangup => return,
                VerbEnd::Redirect(source) => verbs = self.load(source, &mut base_url).await,
            }
        }
    }

    /// Ticks the callee through `heard` (Twilio speaking to them) in real time.
    async fn play(&mut self, heard: &[u8]) -> VerbEnd {
        let mut chunks = heard.chunks(FRAME_BYTES);
        loop {
            tokio::select! {
                biased;
                command = next_command(self.commands) => {
                    if let Some(end) = self.on_command(command) {
                        return end;
                    }
                }
                now = self.clock.tick() => {
                    let Some(chunk) = chunks.next() else {
                        return VerbEnd::Next;
                    };
                    let frame = self.sim_tick(now, chunk);
                    if frame.hang_up {
                        return VerbEnd::Hangup;
                    }
                }
            }
        }
    }

    /// What a command does to a live call, if anything.
    pub(super) fn on_command(&self, command: Command) -> Option<VerbEnd> {
        match command {
            Command::Hangup { .. } => Some(VerbEnd::Hangup),
            Command::Redirect(source) => Some(VerbEnd::Redirect(source)),
            // Refused by the REST API once answered; ignore a stale one.
            Command::Cancel => None,
        }
    }

    /// One frame of the callee, and the events it produced.
    pub(super) fn sim_tick_events(
        &self,
        now_ms: u64,
        heard: &[u8],
    ) -> (crate::sim::SimFrame, Vec<crate::sim::SimEvent>) {
        let mut sim = self.sim.lock().unwrap_or_else(PoisonError::into_inner);
        let before = sim.events().len();
        let frame = sim.tick(now_ms, heard);
        let events = sim.events().get(before..).unwrap_or_default().to_vec();
        (frame, events)
    }

    /// One frame of the callee.
    pub(super) fn sim_tick(&self, now_ms: u64, heard: &[u8]) -> crate::sim::SimFrame {
        self.sim
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tick(now_ms, heard)
    }

    pub(super) fn notice(&self, code: u32, message: impl Into<String>) {
        let message = message.into();
        tracing::warn!(fake = "twilio", call_sid = %self.sid, code, %message, "twilio notice");
        self.shared
            .update_call(&self.sid, |c| c.notices.push(Notice { code, message }));
    }

    /// Gets and parses TwiML; a failure becomes Twilio's application-error message.
    async fn load(&mut self, source: TwimlSource, base_url: &mut Option<String>) -> VecDeque<Verb> {
        let document = match source {
            TwimlSource::Inline(doc) => Ok(doc),
            TwimlSource::Url { url, method } => {
                *base_url = Some(url.clone());
                self.fetch(&url, &method).await
            }
        };
        let parsed = document.and_then(|doc| {
            twiml::parse(&doc).map_err(|e| Notice {
                code: e.code,
                message: e.message,
            })
        });
        match parsed {
            Ok(verbs) => verbs.into(),
            Err(notice) => {
                self.notice(notice.code, notice.message);
                VecDeque::from([Verb::Say {
                    text: APPLICATION_ERROR.to_owned(),
                    loops: 1,
                }])
            }
        }
    }

    /// Requests the TwiML webhook like Twilio does (signed, with the call's parameters).
    async fn fetch(&self, url: &str, method: &str) -> Result<String, Notice> {
        let Some(record) = self.shared.call(&self.sid) else {
            return Err(Notice {
                code: 11200,
                message: "call vanished".into(),
            });
        };
        let mut params = vec![
            ("AccountSid".to_owned(), self.shared.cfg.account_sid.clone()),
            ("ApiVersion".to_owned(), API_VERSION.to_owned()),
            ("CallSid".to_owned(), self.sid.clone()),
            (
                "CallStatus".to_owned(),
                CallStatus::InProgress.as_str().to_owned(),
            ),
            ("Called".to_owned(), record.to.clone()),
            ("Caller".to_owned(), record.from.clone()),
            ("Direction".to_owned(), "outbound-api".to_owned()),
            ("From".to_owned(), record.from.clone()),
            ("To".to_owned(), record.to.clone()),
        ];
        if let Some(by) = self.answered_by {
            params.push(("AnsweredBy".to_owned(), by.as_str().to_owned()));
        }
        let (request, response) = send_webhook(&self.shared, url, method, params).await;
        let (fetch, outcome) = match response {
            Ok(resp) => {
                let content_type = resp
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                let outcome = if !status.is_success() {
                    Err(Notice {
                        code: 11200,
                        message: format!("HTTP retrieval failure: {url} answered {status}"),
                    })
                } else if !content_type.as_deref().is_some_and(|ct| ct.contains("xml")) {
                    // Twilio only runs documents served as XML.
                    Err(Notice {
                        code: 12300,
                        message: format!(
                            "Invalid Content-Type {content_type:?} for TwiML from {url}"
                        ),
                    })
                } else {
                    Ok(body.clone())
                };
                (
                    TwimlFetch {
                        request,
                        body,
                        content_type,
                    },
                    outcome,
                )
            }
            Err(e) => (
                TwimlFetch {
                    request,
                    body: String::new(),
                    content_type: None,
                },
                Err(Notice {
                    code: 11200,
                    message: format!("HTTP retrieval failure: {url}: {e}"),
                }),
            ),
        };
        self.shared
            .update_call(&self.sid, |c| c.twiml_fetches.push(fetch));
        outcome
    }
}

/// Sends one signed webhook; returns what was sent and the response (or the error).
pub(super) async fn send_webhook(
    shared: &Shared,
    url: &str,
    method: &str,
    params: Vec<(String, String)>,
) -> (WebhookRecord, Result<reqwest::Response, String>) {
    let get = method.eq_ignore_ascii_case("GET");
    let encoded = serde_urlencoded::to_string(&params).unwrap_or_default();
    // GET carries the parameters in the query string, which the signature then covers
    // as part of the URL, with no separate parameters (PROTOCOLS.md §2).
    let (request_url, signed_params): (String, &[(String, String)]) = if get {
        let sep = if url.contains('?') { '&' } else { '?' };
        (format!("{url}{sep}{encoded}"), &[])
    } else {
        (url.to_owned(), &params)
    };
    let signature = cmb_core::twilio_sig::compute_signature(
        &shared.cfg.auth_token,
        &request_url,
        signed_params,
    );
    let builder = if get {
        shared.http.get(&request_url)
    } else {
        shared
            .http
            .post(&request_url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(encoded)
    };
    let sent_at = std::time::Instant::now();
    let response = builder
        .header("X-Twilio-Signature", &signature)
        .header(header::USER_AGENT, "TwilioProxy/1.1")
        .header(
            "I-Twilio-Idempotency-Token",
            uuid::Uuid::new_v4().to_string(),
        )
        .send()
        .await
        .map_err(|e| e.to_string());
    let record = WebhookRecord {
        url: request_url,
        method: if get { "GET" } else { "POST" }.to_owned(),
        params,
        signature,
        result: response
            .as_ref()
            .map(|r| r.status().as_u16())
            .map_err(Clone::clone),
        sent_at,
        elapsed: sent_at.elapsed(),
    };
    (record, response)
}

/// A queued webhook.
enum Job {
    Progress {
        event: String,
        call_status: String,
        at: OffsetDateTime,
    },
    Stream {
        url: String,
        method: String,
        params: Vec<(String, String)>,
    },
}

/// Per-call webhook sender: keeps callbacks in order without blocking the call.
pub(super) struct Callbacks {
    tx: mpsc::UnboundedSender<Job>,
    task: tokio::task::JoinHandle<()>,
}

impl Callbacks {
    fn start(shared: Arc<Shared>, sid: String) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let task = tokio::spawn(async move {
            let mut sequence = 0u32;
            while let Some(job) = rx.recv().await {
                match job {
                    Job::Progress {
                        event,
                        call_status,
                        at,
                    } => {
                        let Some(record) = shared.call(&sid) else {
                            continue;
                        };
                        let Some(url) = record.status_callback.clone() else {
                            continue;
                        };
                        if shared.lock().lost_callbacks.contains(&record.to) {
                            continue;
                        }
                        // `completed` is always sent; other events only when asked for.
                        if event != "completed" && !record.status_callback_events.contains(&event) {
                            continue;
                        }
                        let params =
                            progress_params(&shared, &record, &event, &call_status, sequence, at);
                        sequence += 1;
                        let method = record.status_callback_method.clone();
                        let (sent, _) = send_webhook(&shared, &url, &method, params).await;
                        log_result(&sid, &sent);
                        shared.update_call(&sid, |c| c.callbacks.push(sent));
                    }
                    Job::Stream {
                        url,
                        method,
                        params,
                    } => {
                        let (sent, _) = send_webhook(&shared, &url, &method, params).await;
                        log_result(&sid, &sent);
                        shared.update_call(&sid, |c| c.stream_callbacks.push(sent));
                    }
                }
            }
        });
        Self { tx, task }
    }

    /// Queues a call progress event (sent only if the call asked for it).
    pub(super) fn progress(&self, event: &str, call_status: &str) {
        let _ = self.tx.send(Job::Progress {
            event: event.to_owned(),
            call_status: call_status.to_owned(),
            at: OffsetDateTime::now_utc(),
        });
    }

    /// Queues a stream status callback.
    pub(super) fn stream(&self, url: String, method: String, params: Vec<(String, String)>) {
        let _ = self.tx.send(Job::Stream {
            url,
            method,
            params,
        });
    }

    /// Delivers everything queued, then stops.
    async fn finish(self) {
        drop(self.tx);
        if let Err(e) = self.task.await {
            tracing::error!(fake = "twilio", error = %e, "callback sender failed");
        }
    }
}

fn log_result(sid: &str, sent: &WebhookRecord) {
    match &sent.result {
        Ok(status) => {
            tracing::debug!(fake = "twilio", call_sid = %sid, url = %sent.url, status, "webhook delivered")
        }
        Err(e) => {
            tracing::warn!(fake = "twilio", call_sid = %sid, url = %sent.url, error = %e, "webhook failed")
        }
    }
}

/// The form of a call progress callback (PROTOCOLS.md §3).
fn progress_params(
    shared: &Shared,
    record: &super::CallRecord,
    event: &str,
    call_status: &str,
    sequence: u32,
    at: OffsetDateTime,
) -> Vec<(String, String)> {
    let p = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    let mut params = vec![
        p("AccountSid", &shared.cfg.account_sid),
        p("ApiVersion", API_VERSION),
        p("CallSid", &record.sid),
        p("CallStatus", call_status),
        p("Called", &record.to),
        p("Caller", &record.from),
        p("CallbackSource", "call-progress-events"),
        // Empty but present, as in real callbacks: a validator must sign them too.
        p("CallerName", ""),
        p("Direction", "outbound-api"),
        p("ForwardedFrom", ""),
        p("From", &record.from),
        p("ParentCallSid", ""),
        p("SequenceNumber", &sequence.to_string()),
        p("Timestamp", &rfc2822(at)),
        p("To", &record.to),
    ];
    // Queued events are sent after the fact: decide from the event, not the live status.
    if event == "completed" {
        let secs = record.duration_secs.unwrap_or(0);
        params.push(p("CallDuration", &secs.to_string()));
        // UNCONFIRMED (PROTOCOLS.md §3): `Duration` looks like billed minutes.
        params.push(p("Duration", &secs.div_ceil(60).to_string()));
    }
    if record.machine_detection.is_some() && matches!(event, "answered" | "completed") {
        if let Some(by) = record.answered_by {
            params.push(p("AnsweredBy", by.as_str()));
        }
    }
    params
}

/// Resolves a possibly relative TwiML URL against the document it came from.
fn resolve_url(base: Option<&str>, url: &str) -> String {
    match base
        .and_then(|b| url::Url::parse(b).ok())
        .and_then(|b| b.join(url).ok())
    {
        Some(joined) => joined.to_string(),
        None => url.to_owned(),
    }
}
