//! The live conversation inside the `CallSession` Durable Object: the relay's control
//! WebSocket (hibernation API), the persona's turns through the LLM, what the caller
//! actually heard, call limits, and the end-of-call record.
//!
//! Audio never crosses this channel — a few JSON frames per turn (DESIGN.md). The
//! conversation is kept in the object's storage after every message, so a relay that
//! dies loses nothing said so far, and a hibernated object resumes where it was.

use cmb_core::channel::{self, DoToRelay, Envelope, RelayToDo, SttOptions, VoiceSettings};
use cmb_core::prompt::{self, Speaker};
use serde::{Deserialize, Serialize};
use worker::{Response, Result, WebSocket, WebSocketPair};

use crate::config;
use crate::llm;
use crate::session::{CallSession, CallState};
use crate::store::{CostRow, LedgerEntry, TranscriptRow, WriteConflict};
use crate::twilio;

/// Longest call we allow, whatever the balance.
pub const MAX_CALL_SECS: u32 = 15 * 60;
/// Silence (no user speech) before the persona checks in, and again before it hangs up.
/// `CALL_IDLE_TIMEOUT_SECS` overrides it.
pub const IDLE_TIMEOUT_SECS: u32 = 45;
/// The relay enforces its own idle and duration limits as a backstop in case this
/// object is unreachable; they sit this far beyond ours so ours always act first.
const RELAY_BACKSTOP_SECS: u32 = 30;
/// How many recent outgoing frames are kept for a reconnecting relay.
const OUTBOX_LEN: usize = 64;
/// After the relay reports the end, how long to wait for Twilio's final status before
/// settling from what we have.
const SETTLE_WATCHDOG_MS: u64 = 30_000;
/// Prompt budget for the conversation history.
const PROMPT_BUDGET_TOKENS: usize = 3_000;

const FALLBACK_LINE: &str =
    "Sorry, I lost my train of thought for a second. Could you say that again?";
const CHECK_IN_LINE: &str = "Are you still there?";
const IDLE_GOODBYE: &str = "Seems like you're busy. I'll let you go. Talk soon, bye!";
/// Said when the platform ends the call (the account was suspended).
const ENDED_GOODBYE: &str = "I'm sorry, I have to end our call now. Goodbye.";
const CREDITS_GOODBYE: &str =
    "Looks like you're out of credits for now, so I have to wrap up. Talk soon, bye!";
const MAX_DURATION_GOODBYE: &str =
    "We've reached the time limit for this call. Great talking with you, bye!";

/// One line of the conversation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Line {
    pub speaker: Speaker,
    /// Persona turns: the turn number the relay reports `heard`/`interrupted` for.
    pub turn: Option<u32>,
    /// What was generated (persona) or transcribed (user).
    pub text: String,
    /// What the caller actually heard, once the relay confirmed it.
    pub heard: Option<String>,
    pub interrupted: bool,
    pub at_ms: u64,
}

/// The conversation's persistent state (storage key `conv`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Conversation {
    pub persona_prompt: String,
    pub greeting: String,
    pub lines: Vec<Line>,
    pub next_turn: u32,
    pub out_seq: u64,
    pub last_in_seq: u64,
    pub outbox: Vec<(u64, String)>,
    pub started_at_ms: Option<u64>,
    pub last_user_speech_ms: Option<u64>,
    pub checked_in: bool,
    pub hanging_up: bool,
    pub ended: bool,
    pub llm_prompt_tokens: u64,
    pub llm_completion_tokens: u64,
    pub stt_audio_secs: f64,
    pub tts_chars: u64,
    /// (turn, end of turn → first audio ms, LLM first token ms)
    pub latencies: Vec<(u32, Option<u32>, Option<u32>)>,
    /// Minutes of talk paid for so far (the first at trigger time).
    pub minutes_reserved: u32,
}

fn now_ms() -> u64 {
    worker::Date::now().as_millis()
}

fn rt(e: impl std::fmt::Display) -> worker::Error {
    worker::Error::RustError(e.to_string())
}

impl CallSession {
    /// The idle timeout: `CALL_IDLE_TIMEOUT_SECS` when set to a positive number.
    fn idle_timeout_secs(&self) -> u32 {
        self.env
            .var("CALL_IDLE_TIMEOUT_SECS")
            .ok()
            .and_then(|v| v.to_string().trim().parse::<u32>().ok())
            .filter(|s| *s > 0)
            .unwrap_or(IDLE_TIMEOUT_SECS)
    }

    pub(crate) async fn load_conv(&self) -> Result<Conversation> {
        Ok(self
            .state
            .storage()
            .get::<Conversation>("conv")
            .await?
            .unwrap_or_default())
    }

    pub(crate) async fn save_conv(&self, conv: &Conversation) -> Result<()> {
        self.state.storage().put("conv", conv).await
    }

    /// Sends one frame to the relay and keeps it for a possible resume.
    fn send(&self, ws: &WebSocket, conv: &mut Conversation, msg: DoToRelay) -> Result<()> {
        conv.out_seq += 1;
        let text = Envelope::new(conv.out_seq, msg).to_json().map_err(rt)?;
        conv.outbox.push((conv.out_seq, text.clone()));
        if conv.outbox.len() > OUTBOX_LEN {
            conv.outbox.remove(0);
        }
        ws.send_with_str(text)
    }

    /// Sends to whichever relay socket is connected (none is fine: it may be reconnecting).
    fn send_any(&self, conv: &mut Conversation, msg: DoToRelay) -> Result<()> {
        match self.state.get_websockets().first() {
            Some(ws) => self.send(ws, conv, msg),
            None => {
                // Keep it for the reconnecting relay, which resumes from its last seq.
                conv.out_seq += 1;
                let text = Envelope::new(conv.out_seq, msg).to_json().map_err(rt)?;
                conv.outbox.push((conv.out_seq, text));
                Ok(())
            }
        }
    }

    /// The relay's control channel: accept it (hibernatable) and greet.
    pub(crate) async fn accept_relay(&self) -> Result<Response> {
        let Some(st) = self.load().await? else {
            return Response::error("unknown call", 404);
        };
        if st.settled || st.status.is_final() {
            return Response::error("call already ended", 410);
        }
        let store = self.store().await?;
        let call = store.call(&st.call_id).await.map_err(|e| rt(e.message))?;
        let persona = match call {
            Some(c) => store
                .persona(&c.persona_id)
                .await
                .map_err(|e| rt(e.message))?,
            None => None,
        };
        let Some(persona) = persona else {
            return Response::error("persona missing", 409);
        };
        // Close any older socket: one relay per call.
        for old in self.state.get_websockets() {
            let _ = old.close(Some(1000), Some("replaced by a new connection"));
        }
        let pair = WebSocketPair::new()?;
        self.state.accept_web_socket(&pair.server);

        let mut conv = self.load_conv().await?;
        let fields = crate::personas::fields_of(&persona);
        conv.persona_prompt = cmb_core::persona::call_system_prompt(&fields);
        conv.greeting = persona.greeting.clone();
        if conv.lines.is_empty() {
            // The greeting is the persona's turn 0.
            conv.lines.push(Line {
                speaker: Speaker::Assistant,
                turn: Some(0),
                text: persona.greeting.clone(),
                heard: None,
                interrupted: false,
                at_ms: now_ms(),
            });
            conv.next_turn = 1;
        }
        let hello = DoToRelay::Hello {
            call_id: st.call_id.clone(),
            persona_name: persona.name.clone(),
            voice_id: persona.voice_id.clone(),
            voice_settings: VoiceSettings {
                stability: persona.stability,
                similarity_boost: persona.similarity_boost,
                style: persona.style,
                speed: persona.speed,
                use_speaker_boost: true,
            },
            stt: SttOptions::default(),
            greeting: persona.greeting.clone(),
            max_duration_secs: MAX_CALL_SECS + RELAY_BACKSTOP_SECS,
            idle_timeout_secs: 2 * self.idle_timeout_secs() + RELAY_BACKSTOP_SECS,
        };
        self.send(&pair.server, &mut conv, hello)?;
        self.save_conv(&conv).await?;
        worker::console_log!("relay connected call_id={}", st.call_id);
        Response::from_websocket(pair.client)
    }

    /// One frame from the relay.
    pub(crate) async fn on_relay_message(&self, ws: &WebSocket, text: &str) -> Result<()> {
        let frame = match channel::decode::<RelayToDo>(text) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) => {
                worker::console_warn!("bad relay frame: {e}");
                return Ok(());
            }
        };
        let Some(mut st) = self.load().await? else {
            return Ok(());
        };
        let mut conv = self.load_conv().await?;
        let seq = frame.seq;
        let is_replay =
            seq != 0 && seq <= conv.last_in_seq && !matches!(frame.msg, RelayToDo::Ready { .. });
        if is_replay {
            // Already applied before a reconnect; acknowledge again, apply nothing.
            let ack = DoToRelay::Ack {
                seq: conv.last_in_seq,
            };
            self.send(ws, &mut conv, ack)?;
            return self.save_conv(&conv).await;
        }
        conv.last_in_seq = conv.last_in_seq.max(seq);
        let now = now_ms();
        match frame.msg {
            RelayToDo::Ready {
                call_sid,
                resume_from,
                ..
            } => {
                if st.twilio_sid.is_none() {
                    st.twilio_sid = Some(call_sid);
                    self.save(&st).await?;
                }
                if conv.started_at_ms.is_none() {
                    conv.started_at_ms = Some(now);
                    conv.last_user_speech_ms = Some(now);
                    conv.minutes_reserved = 1;
                }
                if let Some(from) = resume_from {
                    for (_, frame) in conv.outbox.iter().filter(|(s, _)| *s > from) {
                        ws.send_with_str(frame)?;
                    }
                }
                self.schedule_limits(&conv).await?;
            }
            RelayToDo::UserTurn { text, .. } => {
                conv.last_user_speech_ms = Some(now);
                conv.checked_in = false;
                if !text.trim().is_empty() {
                    conv.lines.push(Line {
                        speaker: Speaker::User,
                        turn: None,
                        text: text.trim().to_string(),
                        heard: None,
                        interrupted: false,
                        at_ms: now,
                    });
                    self.save_conv(&conv).await?;
                    if !conv.hanging_up {
                        self.reply(ws, &mut conv).await?;
                    }
                }
            }
            RelayToDo::Heard { turn, text } => {
                if let Some(line) = conv.lines.iter_mut().find(|l| l.turn == Some(turn)) {
                    line.heard = Some(text);
                    line.interrupted = false;
                }
            }
            RelayToDo::Interrupted { turn, heard_text } => {
                conv.last_user_speech_ms = Some(now);
                if let Some(line) = conv.lines.iter_mut().find(|l| l.turn == Some(turn)) {
                    line.heard = Some(heard_text);
                    line.interrupted = true;
                }
            }
            RelayToDo::Dtmf { digit } => {
                worker::console_log!("dtmf call_id={} digit={digit}", st.call_id);
            }
            RelayToDo::Usage {
                stt_audio_secs,
                tts_chars,
                ..
            } => {
                conv.stt_audio_secs = stt_audio_secs;
                conv.tts_chars = tts_chars;
            }
            RelayToDo::LatencyReport {
                turn,
                end_of_turn_to_first_audio_ms,
                ..
            } => match conv.latencies.iter_mut().find(|l| l.0 == turn) {
                Some(l) => l.1 = Some(end_of_turn_to_first_audio_ms),
                None => conv
                    .latencies
                    .push((turn, Some(end_of_turn_to_first_audio_ms), None)),
            },
            RelayToDo::Ended { reason } => {
                worker::console_log!("relay ended call_id={} reason={reason}", st.call_id);
                conv.ended = true;
                self.save_conv(&conv).await?;
                self.persist_conversation(&st, &conv).await?;
                self.end_twilio_call(&st).await;
                if !st.settled {
                    self.set_alarm_at(now + SETTLE_WATCHDOG_MS).await?;
                }
            }
            RelayToDo::Pong => {}
        }
        let ack = DoToRelay::Ack {
            seq: conv.last_in_seq,
        };
        self.send(ws, &mut conv, ack)?;
        self.save_conv(&conv).await
    }

    /// Generates and streams the persona's reply to the latest user line.
    async fn reply(&self, ws: &WebSocket, conv: &mut Conversation) -> Result<()> {
        let cfg = config::load(&self.env).map_err(|_| rt("misconfigured"))?;
        let history: Vec<(Speaker, String)> = conv
            .lines
            .iter()
            .map(|l| (l.speaker, l.heard.clone().unwrap_or_else(|| l.text.clone())))
            .collect();
        let messages =
            prompt::build_messages(&conv.persona_prompt, None, &history, PROMPT_BUDGET_TOKENS);
        let turn = conv.next_turn;
        conv.next_turn += 1;
        let mut deltas: Vec<String> = Vec::new();
        let mut sent_err: Option<worker::Error> = None;
        let result = llm::stream_reply(&cfg, &messages, |delta| {
            if sent_err.is_some() {
                return;
            }
            deltas.push(delta.to_string());
            // Stream to the relay as the LLM produces it.
            let frame = DoToRelay::SayDelta {
                turn,
                text: delta.to_string(),
            };
            if let Err(e) = self.send(ws, conv, frame) {
                sent_err = Some(e);
            }
        })
        .await;
        if let Some(e) = sent_err {
            return Err(e);
        }
        let text = match result {
            Ok(done) => {
                conv.llm_prompt_tokens += done.prompt_tokens;
                conv.llm_completion_tokens += done.completion_tokens;
                let first = done
                    .first_token_ms
                    .map(|ms| ms.min(u64::from(u32::MAX)) as u32);
                match conv.latencies.iter_mut().find(|l| l.0 == turn) {
                    Some(l) => l.2 = first,
                    None => conv.latencies.push((turn, None, first)),
                }
                done.text
            }
            Err(e) => {
                worker::console_error!("llm failed turn={turn}: {e}");
                // Never leave the caller in silence: say something, keep the call going.
                let already = deltas.concat();
                let line = if already.trim().is_empty() {
                    FALLBACK_LINE.to_string()
                } else {
                    format!(" {FALLBACK_LINE}")
                };
                self.send(
                    ws,
                    conv,
                    DoToRelay::SayDelta {
                        turn,
                        text: line.clone(),
                    },
                )?;
                already + &line
            }
        };
        conv.lines.push(Line {
            speaker: Speaker::Assistant,
            turn: Some(turn),
            text,
            heard: None,
            interrupted: false,
            at_ms: now_ms(),
        });
        self.send(ws, conv, DoToRelay::SayEnd { turn })
    }

    /// The relay's socket closed. If the conversation didn't end properly, start the
    /// watchdog that settles the call from what we have.
    pub(crate) async fn on_relay_closed(&self) -> Result<()> {
        let conv = self.load_conv().await?;
        if let Some(st) = self.load().await? {
            if !st.settled {
                self.persist_conversation(&st, &conv).await?;
                self.set_alarm_at(now_ms() + SETTLE_WATCHDOG_MS).await?;
            }
        }
        Ok(())
    }

    /// Asks Twilio to end the call (it may already have ended; that's fine).
    pub(crate) async fn end_twilio_call(&self, st: &CallState) {
        let (Some(sid), Ok(cfg)) = (st.twilio_sid.as_deref(), config::load(&self.env)) else {
            return;
        };
        if let Err(e) = twilio::end_call(&cfg, sid, "completed").await {
            worker::console_log!(
                "twilio end_call call_id={} (already over?): {e}",
                st.call_id
            );
        }
    }

    /// Hangs up from our side: the relay says the goodbye, then the call ends.
    async fn hang_up(
        &self,
        st: &CallState,
        conv: &mut Conversation,
        reason: &str,
        goodbye: &str,
    ) -> Result<()> {
        if conv.hanging_up {
            return Ok(());
        }
        conv.hanging_up = true;
        let turn = conv.next_turn;
        conv.next_turn += 1;
        conv.lines.push(Line {
            speaker: Speaker::Assistant,
            turn: Some(turn),
            text: goodbye.to_string(),
            heard: None,
            interrupted: false,
            at_ms: now_ms(),
        });
        self.send_any(
            conv,
            DoToRelay::HangUp {
                reason: reason.to_string(),
                goodbye: Some(goodbye.to_string()),
            },
        )?;
        self.save_conv(conv).await?;
        worker::console_log!("hanging up call_id={} reason={reason}", st.call_id);
        // If the relay never confirms, the watchdog ends the call through Twilio.
        self.set_alarm_at(now_ms() + 10_000).await
    }

    /// Ends a live conversation at the platform's request: a short goodbye, then the
    /// usual hang-up (relay first; the watchdog ends it through Twilio if the relay
    /// never confirms).
    pub(crate) async fn end_conversation(&self, st: &CallState, reason: &str) -> Result<()> {
        let mut conv = self.load_conv().await?;
        self.hang_up(st, &mut conv, reason, ENDED_GOODBYE).await
    }

    /// Sets the alarm for the next limit check: the next minute boundary (to reserve
    /// credits for it), the idle deadline, or the maximum duration.
    async fn schedule_limits(&self, conv: &Conversation) -> Result<()> {
        let Some(start) = conv.started_at_ms else {
            return Ok(());
        };
        // Reserve the next minute a few seconds before it starts.
        let next_minute = start + u64::from(conv.minutes_reserved) * 60_000 - 5_000;
        let idle =
            conv.last_user_speech_ms.unwrap_or(start) + u64::from(self.idle_timeout_secs()) * 1000;
        let max = start + u64::from(MAX_CALL_SECS) * 1000;
        let when = next_minute.min(idle).min(max).max(now_ms() + 100);
        self.set_alarm_at(when).await
    }

    /// Alarm work while a conversation is live. Returns true when it handled the alarm.
    pub(crate) async fn conversation_alarm(&self, st: &mut CallState) -> Result<bool> {
        let mut conv = self.load_conv().await?;
        let Some(start) = conv.started_at_ms else {
            return Ok(false);
        };
        let now = now_ms();
        if conv.ended || conv.hanging_up {
            // The relay is gone or we hung up: make sure Twilio ends the call and, if its
            // final status never comes, settle from what we have.
            self.end_twilio_call(st).await;
            if !st.settled {
                let secs = ((now - start) / 1000) as u32;
                self.persist_conversation(st, &conv).await?;
                self.settle_from_watchdog(st, secs).await?;
            }
            return Ok(true);
        }
        if now >= start + u64::from(MAX_CALL_SECS) * 1000 {
            self.hang_up(st, &mut conv, "max_duration", MAX_DURATION_GOODBYE)
                .await?;
            return Ok(true);
        }
        let idle_deadline =
            conv.last_user_speech_ms.unwrap_or(start) + u64::from(self.idle_timeout_secs()) * 1000;
        if now >= idle_deadline {
            if conv.checked_in {
                self.hang_up(st, &mut conv, "idle", IDLE_GOODBYE).await?;
                return Ok(true);
            }
            conv.checked_in = true;
            conv.last_user_speech_ms = Some(now);
            let turn = conv.next_turn;
            conv.next_turn += 1;
            conv.lines.push(Line {
                speaker: Speaker::Assistant,
                turn: Some(turn),
                text: CHECK_IN_LINE.into(),
                heard: None,
                interrupted: false,
                at_ms: now,
            });
            self.send_any(
                &mut conv,
                DoToRelay::SayDelta {
                    turn,
                    text: CHECK_IN_LINE.into(),
                },
            )?;
            self.send_any(&mut conv, DoToRelay::SayEnd { turn })?;
        }
        let next_minute_at = start + u64::from(conv.minutes_reserved) * 60_000 - 5_000;
        if now >= next_minute_at {
            if self.reserve_minute(st, conv.minutes_reserved + 1).await? {
                conv.minutes_reserved += 1;
            } else {
                self.hang_up(st, &mut conv, "out_of_credits", CREDITS_GOODBYE)
                    .await?;
                return Ok(true);
            }
        }
        self.save_conv(&conv).await?;
        self.schedule_limits(&conv).await?;
        Ok(true)
    }

    /// Reserves credits for minute `n` of the call; false when the balance can't pay.
    async fn reserve_minute(&self, st: &mut CallState, n: u32) -> Result<bool> {
        let store = self.store().await?;
        let id = crate::crypto::uuid().map_err(rt)?;
        let key = format!("reserve:{}:{n}", st.call_id);
        let amount = cmb_core::pricing::PER_MINUTE_CREDITS;
        let entry = LedgerEntry {
            id: &id,
            user_id: &st.user_id,
            kind: "reserve",
            amount: -amount,
            key: &key,
            call_id: Some(&st.call_id),
            reason: "next minute of call",
        };
        match store
            .apply_ledger(&entry, &crate::iso_from_millis(now_ms()))
            .await
            .map_err(|e| rt(e.message))?
        {
            Ok(()) => {
                st.reserved += amount;
                self.save(st).await?;
                Ok(true)
            }
            Err(WriteConflict::Duplicate) => Ok(true),
            Err(_) => Ok(false),
        }
    }

    /// Writes the transcript, provider cost lines and latencies — idempotent, so any of
    /// `ended`, a closed socket, or the final status callback may call it.
    pub(crate) async fn persist_conversation(
        &self,
        st: &CallState,
        conv: &Conversation,
    ) -> Result<()> {
        if conv.lines.is_empty() {
            return Ok(());
        }
        let store = self.store().await?;
        let rows: Vec<TranscriptRow> = conv
            .lines
            .iter()
            .enumerate()
            .filter(|(_, l)| {
                // A persona line counts once the caller could have heard it: confirmed,
                // or at least generated while the call was up.
                !(l.speaker == Speaker::Assistant && l.heard.as_deref() == Some(""))
            })
            .map(|(i, l)| TranscriptRow {
                seq: i as i64,
                role: match l.speaker {
                    Speaker::User => "user".into(),
                    Speaker::Assistant => "assistant".into(),
                },
                text: l.heard.clone().unwrap_or_else(|| l.text.clone()),
                at: crate::iso_from_millis(l.at_ms),
                interrupted: i64::from(l.interrupted),
            })
            .collect();
        store
            .save_transcript(&st.call_id, &rows)
            .await
            .map_err(|e| rt(e.message))?;
        let usage = cmb_core::pricing::CallUsage {
            call_duration_secs: 0,
            stt_audio_secs: conv.stt_audio_secs,
            llm_input_tokens: conv.llm_prompt_tokens,
            llm_output_tokens: conv.llm_completion_tokens,
            tts_chars: conv.tts_chars,
        };
        let b =
            cmb_core::pricing::cost_breakdown(&cmb_core::pricing::ProviderRates::default(), &usage);
        let costs = [
            CostRow {
                provider: "deepgram".into(),
                quantity: conv.stt_audio_secs / 60.0,
                unit: "minutes".into(),
                cost_micros: b.stt_micros,
            },
            CostRow {
                provider: "llm".into(),
                quantity: (conv.llm_prompt_tokens + conv.llm_completion_tokens) as f64,
                unit: "tokens".into(),
                cost_micros: b.llm_micros,
            },
            CostRow {
                provider: "elevenlabs".into(),
                quantity: conv.tts_chars as f64,
                unit: "characters".into(),
                cost_micros: b.tts_micros,
            },
        ];
        store
            .save_costs(&st.call_id, &costs)
            .await
            .map_err(|e| rt(e.message))?;
        store
            .save_latencies(
                &st.call_id,
                &conv.latencies,
                &crate::iso_from_millis(now_ms()),
            )
            .await
            .map_err(|e| rt(e.message))?;
        Ok(())
    }
}
