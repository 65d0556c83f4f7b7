//! One call: the Twilio stream handshake (stream token, replay check), then the call loop
//! that wires Twilio, the control channel, Deepgram and ElevenLabs to the state machine.
//!
//! Owns the sockets' wiring and the call's teardown (close Twilio, report `usage` and
//! `ended`, close the providers). It must not make conversational decisions: every event
//! goes through `CallState::handle`, and this module only performs the returned actions.
//! Errors are logged here, with the call's ids, and never reach the accept loop.
//!
//! The loop polls with `select! { biased; … }` in priority order: shutdown, the DO
//! (hang-up), Deepgram (barge-in), the pacing timer, Twilio, and TTS audio last, so
//! system messages always overtake queued audio.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::BytesMut;
use cmb_core::channel::{DoToRelay, RelayToDo};
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::config::Config;
use crate::control::{self, ControlEvent, ControlParams};
use crate::machine::{Action, CallState, Event, Ms, Observation};
use crate::metrics::{Metrics, ProviderLabel};
use crate::state::{AppState, CallSlot};
use crate::stt::{self, AudioFrame, SttIn, SttOut, SttProbes};
use crate::tts::{self, TtsLink, TtsOut};
use crate::twilio::{self, StartInfo, TwilioEvent};
use crate::vad::{self, Vad};
use crate::{deepgram, elevenlabs};

/// Twilio sends `connected` then `start` right away; anything slower is not Twilio.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The DO answers `ready` with `hello` within a round trip; give it generous slack.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// Inbound audio buffered toward Deepgram (5 s), which also covers the wait for `hello`.
const AUDIO_CHANNEL: usize = 256;
/// How long teardown waits for the final frames to reach the DO and providers.
const TEARDOWN_WAIT: Duration = Duration::from_secs(3);

/// WebSocket close codes used toward Twilio.
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_UNSUPPORTED: u16 = 1003;

/// Serves one upgraded Twilio stream until it ends; the slot frees on return.
pub async fn serve(state: AppState, config: Arc<Config>, socket: WebSocket, slot: CallSlot) {
    let (sink, stream) = socket.split();
    let outcome = run(&state, &config, sink, stream).await;
    state.metrics().call_ended(outcome);
    drop(slot);
}

/// The call, generic over the Twilio transport so tests can drive it with channels.
/// Returns the outcome label for `relay_calls_total`.
pub async fn run<Si, St, E>(
    state: &AppState,
    config: &Config,
    mut tw_tx: Si,
    mut tw_rx: St,
) -> &'static str
where
    Si: Sink<Message> + Unpin,
    St: Stream<Item = Result<Message, E>> + Unpin,
{
    let shutdown = state.shutdown_token().clone();
    let started = tokio::select! {
        s = wait_for_start(&mut tw_rx) => s,
        () = shutdown.cancelled() => Err(()),
    };
    let start = match started {
        Ok(s) => s,
        Err(()) => {
            warn!("Twilio stream closed, silent or shut down before `start`");
            close(&mut tw_tx, CLOSE_POLICY, "no start").await;
            return "rejected_handshake";
        }
    };
    let span = info_span!("call", call_sid = %start.call_sid, stream_sid = %start.stream_sid, call_id = tracing::field::Empty);
    async move {
        if !start.media_format_ok {
            warn!("refusing stream: audio is not 8 kHz mono mu-law");
            close(&mut tw_tx, CLOSE_UNSUPPORTED, "unsupported media format").await;
            return "rejected_format";
        }
        let call_id = match check_token(state, config, &start) {
            Ok(id) => id,
            Err(why) => {
                warn!(why, "refusing stream: bad stream token");
                close(&mut tw_tx, CLOSE_POLICY, "invalid stream token").await;
                return "rejected_token";
            }
        };
        tracing::Span::current().record("call_id", call_id.as_str());
        info!("call stream started");
        let outcome = live(state, config, call_id, start, &mut tw_tx, &mut tw_rx).await;
        info!(outcome, "call stream ended");
        outcome
    }
    .instrument(span)
    .await
}

/// Reads until Twilio's `start` (skipping `connected`), within [`START_TIMEOUT`].
async fn wait_for_start<St, E>(tw_rx: &mut St) -> Result<StartInfo, ()>
where
    St: Stream<Item = Result<Message, E>> + Unpin,
{
    let read = async {
        while let Some(Ok(msg)) = tw_rx.next().await {
            let Message::Text(text) = msg else { continue };
            match twilio::parse(text.as_str()) {
                Ok(Some(TwilioEvent::Start(s))) => return Ok(s),
                Ok(_) => continue,
                Err(e) => warn!(error = %e, "ignoring bad Twilio message before start"),
            }
        }
        Err(())
    };
    tokio::time::timeout(START_TIMEOUT, read)
        .await
        .unwrap_or(Err(()))
}

/// Verifies `callId` + `streamToken` from the custom parameters and burns the nonce.
fn check_token(
    state: &AppState,
    config: &Config,
    start: &StartInfo,
) -> Result<String, &'static str> {
    let param = |k: &str| {
        start
            .custom_parameters
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    let (Some(call_id), Some(token)) = (param("callId"), param("streamToken")) else {
        return Err("missing callId or streamToken");
    };
    let now = unix_now();
    let claims = cmb_core::stream_token::verify(config.relay_secret.expose(), token, call_id, now)
        .map_err(|e| match e {
            cmb_core::stream_token::StreamTokenError::Expired => "expired",
            cmb_core::stream_token::StreamTokenError::BadSignature => "forged",
            cmb_core::stream_token::StreamTokenError::WrongCall => "issued for another call",
            cmb_core::stream_token::StreamTokenError::Malformed => "malformed",
        })?;
    state
        .claim_nonce(&claims.nonce, claims.expires_at, now)
        .map_err(|e| match e {
            crate::nonce::NonceRejected::Reused => "replayed (nonce already used)",
            crate::nonce::NonceRejected::Full => "replay cache full",
        })?;
    Ok(claims.call_id)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

async fn close<Si: Sink<Message> + Unpin>(tw_tx: &mut Si, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tw_tx.send(Message::Close(Some(frame))).await;
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Why the loop stopped, and what to tell the DO.
struct End {
    /// `ended.reason` for the DO.
    reason: String,
    /// Label for metrics.
    outcome: &'static str,
    /// Whether the Twilio socket is still ours to close.
    close_twilio: bool,
    /// The close code toward Twilio when it is ours to close.
    close_code: u16,
}

impl End {
    fn new(reason: &str, outcome: &'static str) -> Self {
        Self {
            reason: reason.to_owned(),
            outcome,
            close_twilio: true,
            close_code: CLOSE_NORMAL,
        }
    }

    fn caller_gone() -> Self {
        Self {
            reason: "caller_hung_up".to_owned(),
            outcome: "caller_hung_up",
            close_twilio: false,
            close_code: CLOSE_NORMAL,
        }
    }
}

/// Per-call wiring state for the loop.
struct Call<'a> {
    state: &'a AppState,
    config: &'a Config,
    t0: Instant,
    machine: CallState,
    outbound: twilio::Outbound,
    /// Caller audio (and `Finalize`) for the Deepgram task; its receiver until `hello`.
    audio_tx: mpsc::Sender<SttIn>,
    audio_rx: Option<mpsc::Receiver<SttIn>>,
    vad: Vad,
    stt_rx: Option<mpsc::Receiver<SttOut>>,
    stt_task: Option<tokio::task::JoinHandle<()>>,
    tts: Option<TtsLink>,
    control_tx: mpsc::Sender<RelayToDo>,
    stt_audio_bytes: u64,
}

impl Call<'_> {
    fn now(&self) -> Ms {
        u64::try_from(self.t0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn metrics(&self) -> &Metrics {
        self.state.metrics()
    }

    fn reconnects(&self, provider: &'static str) -> prometheus_client::metrics::counter::Counter {
        self.metrics()
            .reconnects
            .get_or_create(&ProviderLabel { provider })
            .clone()
    }

    /// Maps a DO message to a machine event; `hello` also opens the providers.
    fn on_do(&mut self, msg: DoToRelay) -> Result<Option<Event>, End> {
        Ok(Some(match msg {
            DoToRelay::Hello {
                voice_id,
                voice_settings,
                stt,
                greeting,
                max_duration_secs,
                idle_timeout_secs,
                speculate,
                speculate_after_ms,
                fast_barge_in,
                ..
            } => {
                if self.tts.is_none() {
                    // Deepgram and ElevenLabs connect in parallel, each in its own task.
                    let url = deepgram::listen_url(&self.config.deepgram_url, &stt);
                    if let Some(audio) = self.audio_rx.take() {
                        let probes = SttProbes {
                            t0: self.t0,
                            reconnects: self.reconnects("deepgram"),
                            forward_in: self.metrics().forward_in.clone(),
                        };
                        let (rx, task) =
                            stt::spawn(url, self.config.deepgram_api_key.clone(), audio, probes);
                        self.stt_rx = Some(rx);
                        self.stt_task = Some(task);
                    }
                    let url = elevenlabs::stream_url(&self.config.elevenlabs_url, &voice_id)
                        .map_err(|e| {
                            warn!(error = %e, "cannot build the TTS URL");
                            End::new("bad_voice_id", "tts_unavailable")
                        })?;
                    self.tts = Some(tts::spawn(
                        url,
                        self.config.elevenlabs_api_key.clone(),
                        voice_settings,
                        self.reconnects("elevenlabs"),
                    ));
                }
                Event::Hello {
                    greeting,
                    max_duration_secs,
                    idle_timeout_secs,
                    speculate_endpointing_ms: speculate.then_some(stt.endpointing_ms),
                    speculate_after_ms,
                    fast_barge_in,
                }
            }
            DoToRelay::SayDelta { turn, text } => Event::SayDelta { turn, text },
            DoToRelay::SayEnd { turn } => Event::SayEnd { turn },
            DoToRelay::HangUp { reason, goodbye } => Event::HangUp { reason, goodbye },
            // Handled inside the control task.
            DoToRelay::Ping | DoToRelay::Ack { .. } => return Ok(None),
        }))
    }

    /// Handles one Twilio frame: audio goes straight to Deepgram, the rest to the machine.
    fn on_twilio(&mut self, text: &str, buf: &mut BytesMut) -> Result<Option<Event>, End> {
        // Forwarding time runs from here: parsing and decoding are part of it.
        let read_at = Instant::now();
        let event = match twilio::parse(text) {
            Ok(Some(e)) => e,
            Ok(None) => return Ok(None),
            Err(e) => {
                warn!(error = %e, "ignoring bad Twilio message");
                return Ok(None);
            }
        };
        Ok(match event {
            TwilioEvent::Media { payload, .. } => {
                self.metrics().frames_in.inc();
                let Some(data) = twilio::decode_payload(&payload, buf) else {
                    return Ok(None);
                };
                self.stt_audio_bytes += data.len() as u64;
                let changed = self.vad.push(&data).is_some();
                let analysis = self
                    .machine
                    .watches_barge_in()
                    .then(|| vad::analyse_with_power(&data, self.vad.power()));
                let report = changed || self.machine.wants_caller_audio();
                let frame = AudioFrame { read_at, data };
                if self.audio_tx.try_send(SttIn::Audio(frame)).is_err() {
                    // Deepgram's task buffers 5 s itself; a full queue means it is stuck.
                    warn!(
                        provider = "deepgram",
                        "audio queue full; dropping a caller frame"
                    );
                }
                report.then_some(Event::CallerAudio {
                    voiced: self.vad.voiced(),
                    analysis,
                })
            }
            TwilioEvent::Mark { name } => Some(Event::Mark { name }),
            TwilioEvent::Dtmf { digit } => Some(Event::Dtmf { digit }),
            TwilioEvent::Stop => return Err(End::caller_gone()),
            TwilioEvent::Connected | TwilioEvent::Start(_) => None,
        })
    }

    /// Performs the machine's actions in order; Twilio frames are flushed once at the end.
    async fn perform<Si: Sink<Message> + Unpin>(
        &mut self,
        actions: Vec<Action>,
        tw_tx: &mut Si,
    ) -> Result<u32, End> {
        let mut fed = false;
        let mut media = 0u32;
        let mut end = None;
        for action in actions {
            let twilio_msg = match action {
                Action::Media(frame) => {
                    self.metrics().frames_out.inc();
                    media += 1;
                    self.outbound.media(frame.bytes())
                }
                Action::Mark(name) => self.outbound.mark(&name),
                Action::Clear => self.outbound.clear(),
                Action::SttFinalize => {
                    if self.audio_tx.try_send(SttIn::Finalize).is_err() {
                        warn!(
                            provider = "deepgram",
                            "audio queue full; dropping a Finalize"
                        );
                    }
                    continue;
                }
                Action::ToDo(msg) => {
                    if self.control_tx.try_send(msg).is_err() {
                        warn!(
                            provider = "control",
                            "control queue full; dropping a frame for the DO"
                        );
                    }
                    continue;
                }
                Action::Tts(cmd) => {
                    if let Some(tts) = &self.tts {
                        if tts.tx.try_send(cmd).is_err() {
                            warn!(
                                provider = "elevenlabs",
                                "TTS command queue full; dropping a command"
                            );
                        }
                    }
                    continue;
                }
                Action::Observe(o) => {
                    self.observe(o);
                    continue;
                }
                Action::Hangup { reason } => {
                    end = Some(End::new(&reason, "hung_up"));
                    continue;
                }
            };
            if tw_tx.feed(Message::Text(twilio_msg.into())).await.is_err() {
                return Err(End::caller_gone());
            }
            fed = true;
        }
        if fed && tw_tx.flush().await.is_err() {
            return Err(End::caller_gone());
        }
        end.map_or(Ok(media), Err)
    }

    fn observe(&self, o: Observation) {
        let secs = |ms: Ms| ms as f64 / 1000.0;
        let m = self.metrics();
        match o {
            Observation::FramesDropped(n) => {
                m.frames_dropped.inc_by(n);
            }
            Observation::LateFrames(n) => {
                m.late_frames.inc_by(n);
            }
            Observation::EndOfTurnToFirstAudio(ms) => {
                m.end_of_turn_to_first_audio.observe(secs(ms))
            }
            Observation::SttFinalLatency(ms) => m.stt_final_latency.observe(secs(ms)),
            Observation::TtsFirstByte(ms) => m.tts_first_byte.observe(secs(ms)),
            Observation::LlmFirstToken(ms) => m.llm_first_token.observe(secs(ms)),
        }
    }
}

/// The call after a valid `start`: runs until hang-up, then tears everything down.
async fn live<Si, St, E>(
    state: &AppState,
    config: &Config,
    call_id: String,
    start: StartInfo,
    tw_tx: &mut Si,
    tw_rx: &mut St,
) -> &'static str
where
    Si: Sink<Message> + Unpin,
    St: Stream<Item = Result<Message, E>> + Unpin,
{
    // The TwiML asks for the staged greeting only when a person answered.
    let staged = (start.custom_parameters.get("greeting").map(String::as_str) == Some("prepared"))
        .then(|| state.greetings().take(&call_id, state.metrics()))
        .flatten();
    let Some(url) = control::session_url(&config.worker_url, &call_id) else {
        warn!("WORKER_URL cannot carry the control channel");
        close(tw_tx, CLOSE_NORMAL, "relay misconfigured").await;
        return "control_lost";
    };
    let control_reconnects = state
        .metrics()
        .reconnects
        .get_or_create(&ProviderLabel {
            provider: "control",
        })
        .clone();
    let mut control = control::spawn(
        ControlParams {
            url,
            secret: config.relay_secret.clone(),
            call_id,
            call_sid: start.call_sid.clone(),
            stream_sid: start.stream_sid.clone(),
        },
        control_reconnects,
    );
    let (audio_tx, audio_rx) = mpsc::channel(AUDIO_CHANNEL);
    let mut call = Call {
        state,
        config,
        t0: Instant::now(),
        machine: CallState::new(),
        outbound: twilio::Outbound::new(&start.stream_sid),
        audio_tx,
        audio_rx: Some(audio_rx),
        vad: Vad::default(),
        stt_rx: None,
        stt_task: None,
        tts: None,
        control_tx: control.tx.clone(),
        stt_audio_bytes: 0,
    };
    if let Some(g) = staged {
        // Plays now, while the control channel and the providers connect.
        let event = Event::StagedGreeting {
            text: g.text,
            audio: g.audio,
            billed_chars: g.billed_chars,
        };
        let actions = call.machine.handle(event, 0);
        if let Err(end) = call.perform(actions, tw_tx).await {
            return end.outcome;
        }
    }
    let shutdown: CancellationToken = state.shutdown_token().clone();
    let hello_deadline = call.t0 + HELLO_TIMEOUT;
    let mut buf = BytesMut::new();
    // The shutdown future and the one timer live across iterations: re-creating them per
    // 20 ms frame would cost a lock and a timer-wheel update every time.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let timer = tokio::time::sleep_until(hello_deadline);
    tokio::pin!(timer);
    let mut armed = Some(hello_deadline);

    let end = loop {
        let waiting_hello = call.tts.is_none();
        let wake = call
            .machine
            .next_wake()
            .map(|ms| call.t0 + Duration::from_millis(ms));
        // The machine's next wake, or the hello deadline while waiting for `hello`.
        let deadline = match (wake, waiting_hello) {
            (Some(w), true) => Some(w.min(hello_deadline)),
            (None, true) => Some(hello_deadline),
            (w, false) => w,
        };
        if let Some(d) = deadline.filter(|d| armed != Some(*d)) {
            timer.as_mut().reset(d);
            armed = Some(d);
        }
        let wants_tts = call.machine.wants_tts_audio();
        let tts_rx = call.tts.as_mut().map(|t| &mut t.rx);
        let mut tts_read_at = None;
        let step: Result<Option<Event>, End> = tokio::select! {
            biased;
            () = &mut cancelled => Err(End::new("relay_shutdown", "relay_shutdown")),
            ev = control.rx.recv() => match ev {
                Some(ControlEvent::Message(msg)) => call.on_do(*msg),
                Some(ControlEvent::Lost) | None => Err(End::new("control_lost", "control_lost")),
                Some(ControlEvent::Refused) => Err(End {
                    close_code: CLOSE_POLICY,
                    ..End::new("refused_by_session", "rejected_session")
                }),
            },
            ev = recv_opt(&mut call.stt_rx) => match ev {
                Some(SttOut::Event(e)) => Ok(Some(e)),
                Some(SttOut::Failed) | None => Err(End::new("stt_unavailable", "stt_unavailable")),
            },
            () = &mut timer, if deadline.is_some() => {
                // Fired: the next iteration re-arms it.
                armed = None;
                if waiting_hello && Instant::now() >= hello_deadline {
                    warn!("no hello from the DO");
                    Err(End::new("no_hello", "control_lost"))
                } else {
                    Ok(Some(Event::Tick))
                }
            }
            msg = tw_rx.next() => match msg {
                Some(Ok(Message::Text(text))) => call.on_twilio(text.as_str(), &mut buf),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => Err(End::caller_gone()),
                Some(Ok(_)) => Ok(None),
            },
            ev = async { match tts_rx { Some(rx) => rx.recv().await, None => std::future::pending().await } }, if wants_tts => match ev {
                Some(TtsOut::Event { event, read_at }) => {
                    tts_read_at = Some(read_at);
                    Ok(Some(event))
                }
                Some(TtsOut::Reconnected) => Ok(Some(Event::TtsReconnected)),
                Some(TtsOut::Failed) | None => {
                    warn!(provider = "elevenlabs", "TTS could not be restored; ending the call");
                    Err(End::new("tts_unavailable", "tts_unavailable"))
                }
            },
        };
        let event = match step {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(end) => break end,
        };
        let now = call.now();
        let actions = call.machine.handle(event, now);
        match call.perform(actions, tw_tx).await {
            Ok(media) => {
                // TTS audio the pacer sent at once: time from ElevenLabs to Twilio.
                if let Some(read_at) = tts_read_at.filter(|_| media > 0) {
                    let secs = read_at.elapsed().as_secs_f64();
                    for _ in 0..media {
                        call.metrics().forward_out.observe(secs);
                    }
                }
            }
            Err(end) => break end,
        }
    };

    // Teardown: Twilio first (the caller must not wait on us), then the DO's record.
    if end.close_twilio {
        close(tw_tx, end.close_code, "").await;
    }
    let usage = RelayToDo::Usage {
        stt_audio_secs: call.stt_audio_bytes as f64 / 8000.0,
        tts_chars: call.machine.tts_chars(),
        first_audio_latencies_ms: call.machine.first_audio_latencies().to_vec(),
    };
    let _ = call.control_tx.send(usage).await;
    let _ = call
        .control_tx
        .send(RelayToDo::Ended {
            reason: end.reason.clone(),
        })
        .await;
    // Dropping every sender lets each task flush and close its socket.
    drop(call.control_tx);
    drop(control.tx);
    drop(call.audio_tx);
    let tts_task = call.tts.map(|t| {
        drop(t.tx);
        t.task
    });
    let waits = async {
        let _ = (&mut control.task).await;
        if let Some(t) = call.stt_task {
            let _ = t.await;
        }
        if let Some(t) = tts_task {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(TEARDOWN_WAIT, waits).await.is_err() {
        warn!("teardown timed out; abandoning socket tasks");
        control.task.abort();
    }
    info!(reason = %end.reason, "call ended");
    end.outcome
}
