//! The `CallSession` Durable Object: one per call (named by the call id), a thin shell
//! around the pure [`cmb_core::session::Session`] machine.
//!
//! Per event: load the state, `handle(event, now)`, persist, then carry out the effects
//! (`effects.rs`), feeding each result back as a new event. The lock is held only across
//! that load → handle → persist step (storage, never the network), so a Twilio status
//! callback, an alarm or a ban is handled at once whatever a Twilio request or the LLM
//! stream is doing. This module decides nothing: every number and every timer comes from
//! the machine.

pub mod client;
mod effects;
mod greeting;
mod memory;

use cmb_core::calls::CallStatus;
use cmb_core::channel::{self, RelayToDo};
use cmb_core::session::{self as machine, Effect, Event, PersonaBrief, Session};
use futures::lock::Mutex;
use serde::{Deserialize, Serialize};
use worker::{
    durable_object, DurableObject, Env, Request, Response, Result, State, WebSocket,
    WebSocketIncomingMessage, WebSocketPair,
};

use crate::error::{ApiError, ApiResult};

pub use client::{relay_session, session_op};
pub use cmb_core::session::CancelOutcome;

use crate::config;
use crate::store::Store;

/// Storage key of the machine's state.
const STATE_KEY: &str = "session";

/// Messages from the Worker's routes to the object (JSON over the DO fetch).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SessionOp {
    Start {
        call_id: String,
        user_id: String,
        phone_number: String,
        reserved: i64,
        /// The user's balance after the reservation (caps Twilio's `TimeLimit`).
        #[serde(default)]
        balance: i64,
        scheduled_at_ms: Option<u64>,
    },
    Cancel,
    Answered {
        answered_by: Option<String>,
    },
    TwilioStatus {
        params: Vec<(String, String)>,
    },
    /// Twilio reports the media stream over (its `<Connect action>` request).
    StreamEnded,
    /// The platform ends the call whatever its state (an admin ban): a pending call is
    /// canceled, a ringing one hung up through Twilio, a live conversation ends with a
    /// short goodbye like any other hang-up. Answers a [`CancelOutcome`].
    End {
        reason: String,
    },
    /// The account was erased: a settled call drops what it kept about the caller
    /// (`Session::forget_personal`). Answers a [`ForgetOutcome`].
    Forget,
}

/// The object's answer to `Forget`: false while the call is not settled yet.
#[derive(Debug, Serialize, Deserialize)]
pub struct ForgetOutcome {
    pub forgotten: bool,
}

/// The object's answer to `StreamEnded`: whether the conversation ended on purpose.
#[derive(Debug, Serialize, Deserialize)]
pub struct StreamEndedOutcome {
    pub graceful: bool,
}

#[durable_object]
pub struct CallSession {
    pub(crate) state: State,
    pub(crate) env: Env,
    /// Serialises load → handle → persist (storage only; never held across the network).
    lock: Mutex<()>,
}

fn now_ms() -> u64 {
    worker::Date::now().as_millis()
}

fn ok() -> ApiResult<Response> {
    Ok(Response::from_json(&serde_json::json!({ "ok": true }))?)
}

fn conn_tag(conn: u32) -> String {
    format!("conn-{conn}")
}

impl DurableObject for CallSession {
    fn new(state: State, env: Env) -> Self {
        Self {
            state,
            env,
            lock: Mutex::new(()),
        }
    }

    /// A route's operation, or the relay's channel. An error is answered in the API's
    /// JSON error format; an internal one carries its cause for the route, which logs it
    /// once with its request id (`session_op`), so it is not logged here.
    async fn fetch(&self, req: Request) -> Result<Response> {
        match self.serve(req).await {
            Ok(resp) => Ok(resp),
            Err(e) => e.into_internal_reply(),
        }
    }

    /// An alarm's failure is logged here (no caller will) and returned, so the platform
    /// retries the alarm.
    async fn alarm(&self) -> Result<Response> {
        match self.event(Event::Alarm).await {
            Ok(()) => Response::ok("ok"),
            Err(e) => {
                self.log_failure("alarm", &e).await;
                Err(worker::Error::RustError(e.log_detail()))
            }
        }
    }

    async fn websocket_message(
        &self,
        ws: WebSocket,
        message: WebSocketIncomingMessage,
    ) -> Result<()> {
        if let Err(e) = self.relay_message(ws, message).await {
            self.log_failure("relay_message", &e).await;
        }
        Ok(())
    }

    async fn websocket_close(
        &self,
        ws: WebSocket,
        code: usize,
        reason: String,
        _was_clean: bool,
    ) -> Result<()> {
        crate::log::info(
            "relay_channel_closed",
            serde_json::json!({ "call_id": self.call_id_hint().await, "code": code, "reason": reason }),
        );
        let _ = ws.close(Some(1000), Some("bye"));
        if let Some(conn) = self.conn_of(&ws) {
            if let Err(e) = self.event(Event::RelayClosed { conn }).await {
                self.log_failure("relay_closed", &e).await;
            }
        }
        Ok(())
    }

    async fn websocket_error(&self, _ws: WebSocket, error: worker::Error) -> Result<()> {
        crate::log::warn(
            "relay_channel_error",
            serde_json::json!({ "call_id": self.call_id_hint().await, "error": error.to_string() }),
        );
        Ok(())
    }
}

impl CallSession {
    async fn serve(&self, mut req: Request) -> ApiResult<Response> {
        let upgrade = req.headers().get("upgrade")?.unwrap_or_default();
        if upgrade.eq_ignore_ascii_case("websocket") {
            return self.accept_relay().await;
        }
        let op: SessionOp = match req.json().await {
            Ok(op) => op,
            Err(e) => {
                return Err(ApiError::bad_request(
                    "invalid_input",
                    format!("Bad session op: {e}."),
                ))
            }
        };
        match op {
            SessionOp::Start {
                call_id,
                user_id,
                phone_number,
                reserved,
                balance,
                scheduled_at_ms,
            } => {
                let cfg = self.config()?;
                let start = machine::Start {
                    call_id,
                    user_id,
                    phone_number,
                    reserved,
                    balance,
                    scheduled_at_ms,
                    account_sid: cfg.twilio_account_sid.clone(),
                    limits: cfg.call_limits.clone(),
                };
                let started = {
                    let _guard = self.lock.lock().await;
                    if self.load().await?.is_some() {
                        None // a retried start
                    } else {
                        let (session, effects) = Session::start(start, now_ms());
                        self.save(&session).await?;
                        Some((effects, session))
                    }
                };
                if let Some((effects, session)) = started {
                    self.drive(effects, &session).await?;
                }
                ok()
            }
            SessionOp::Cancel => self.cancel_like(Event::Cancel).await,
            SessionOp::End { reason } => self.cancel_like(Event::End { reason }).await,
            SessionOp::Answered { answered_by } => {
                self.event(Event::Answered { answered_by }).await?;
                ok()
            }
            SessionOp::StreamEnded => {
                let graceful = self.load().await?.is_some_and(|s| s.hung_up_on_purpose());
                Ok(Response::from_json(&StreamEndedOutcome { graceful })?)
            }
            SessionOp::TwilioStatus { params } => {
                self.event(Event::TwilioStatus { params }).await?;
                ok()
            }
            SessionOp::Forget => {
                let forgotten = {
                    let _guard = self.lock.lock().await;
                    match self.load().await? {
                        None => true,
                        Some(mut s) => {
                            let forgotten = s.forget_personal();
                            if forgotten {
                                self.save(&s).await?;
                            }
                            forgotten
                        }
                    }
                };
                Ok(Response::from_json(&ForgetOutcome { forgotten })?)
            }
        }
    }
}

impl CallSession {
    /// One frame from the relay's control channel, through the machine.
    async fn relay_message(
        &self,
        ws: WebSocket,
        message: WebSocketIncomingMessage,
    ) -> ApiResult<()> {
        let Some(conn) = self.conn_of(&ws) else {
            return Ok(());
        };
        let text = match message {
            WebSocketIncomingMessage::String(text) => text,
            WebSocketIncomingMessage::Binary(_) => {
                crate::log::warn(
                    "relay_binary_frame",
                    serde_json::json!({ "call_id": self.call_id_hint().await }),
                );
                return Ok(());
            }
        };
        let frame = match channel::decode::<RelayToDo>(&text) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) => {
                crate::log::warn(
                    "relay_bad_frame",
                    serde_json::json!({ "call_id": self.call_id_hint().await, "error": e.to_string() }),
                );
                return Ok(());
            }
        };
        self.event(Event::RelayFrame { conn, frame }).await
    }

    /// Logs a failure no caller will see (alarm, relay channel), once, with the call id.
    async fn log_failure(&self, during: &str, e: &ApiError) {
        crate::log::error(
            "call_session_failed",
            serde_json::json!({ "call_id": self.call_id_hint().await, "during": during, "error": e.log_detail() }),
        );
    }

    pub(crate) fn config(&self) -> ApiResult<std::rc::Rc<cmb_core::config::WorkerConfig>> {
        config::load(&self.env).map_err(|r| {
            let names: Vec<&str> = r.problems.iter().map(|p| p.name).collect();
            ApiError::internal(
                "call session config",
                format!("misconfigured: {}", names.join(", ")),
            )
        })
    }

    /// The configured database (D1 or Postgres), opened for this event.
    pub(crate) async fn store(&self) -> ApiResult<Store> {
        let cfg = self.config()?;
        Store::open(&self.env, cfg.db_backend).await
    }

    async fn load(&self) -> ApiResult<Option<Session>> {
        Ok(self.state.storage().get::<Session>(STATE_KEY).await?)
    }

    async fn save(&self, s: &Session) -> ApiResult<()> {
        Ok(self.state.storage().put(STATE_KEY, s).await?)
    }

    /// Load → handle → persist, under the lock (storage only). `None` for a call this
    /// object does not hold.
    pub(crate) async fn step(&self, event: Event) -> ApiResult<Option<(Vec<Effect>, Session)>> {
        let _guard = self.lock.lock().await;
        let Some(mut session) = self.load().await? else {
            return Ok(None);
        };
        let effects = session.handle(event, now_ms());
        self.save(&session).await?;
        Ok(Some((effects, session)))
    }

    /// One outside event, and everything it leads to.
    async fn event(&self, event: Event) -> ApiResult<()> {
        match self.step(event).await? {
            Some((effects, session)) => self.drive(effects, &session).await,
            None => Ok(()),
        }
    }

    /// `Cancel` / `End`: the machine's reply once its effects (a Twilio cancel) ran.
    async fn cancel_like(&self, event: Event) -> ApiResult<Response> {
        self.event(event).await?;
        let outcome = match self.load().await? {
            Some(s) => s.reply.unwrap_or(CancelOutcome {
                canceled: false,
                status: s.status,
            }),
            None => CancelOutcome {
                canceled: false,
                status: CallStatus::Failed,
            },
        };
        Ok(Response::from_json(&outcome)?)
    }

    /// The call this DO holds, for a log line (None before `Start`).
    async fn call_id_hint(&self) -> Option<String> {
        self.load().await.ok().flatten().map(|s| s.call_id)
    }

    fn conn_of(&self, ws: &WebSocket) -> Option<u32> {
        self.state
            .get_tags(ws)
            .iter()
            .find_map(|t| t.strip_prefix("conn-").and_then(|n| n.parse().ok()))
    }

    pub(crate) fn sockets(&self, conn: u32) -> Vec<WebSocket> {
        self.state.get_websockets_with_tag(&conn_tag(conn))
    }

    /// The relay's control channel: accept it (hibernatable, tagged with its number) and
    /// let the machine decide what it gets.
    async fn accept_relay(&self) -> ApiResult<Response> {
        let Some(session) = self.load().await? else {
            return Err(ApiError::not_found("Call"));
        };
        if session.final_.is_some() {
            return Err(ApiError::new(
                410,
                "call_ended",
                "This call has already ended.",
            ));
        }
        // Read while the phone rang (`Effect::Prepare`), or now if that has not finished.
        let persona = match session.conv.persona.clone() {
            Some(p) => p,
            None => self.persona_for(&session.call_id).await?.ok_or_else(|| {
                ApiError::conflict("persona_missing", "The call's persona is gone.")
            })?,
        };
        let pair = WebSocketPair::new()?;
        let (effects, session) = {
            let _guard = self.lock.lock().await;
            let Some(mut session) = self.load().await? else {
                return Err(ApiError::not_found("Call"));
            };
            let conn = session.relay.next_conn;
            self.state
                .accept_websocket_with_tags(&pair.server, &[conn_tag(conn).as_str()]);
            let effects = session.handle(Event::RelayOpened { conn, persona }, now_ms());
            self.save(&session).await?;
            (effects, session)
        };
        self.drive(effects, &session).await?;
        crate::log::info(
            "relay_connected",
            serde_json::json!({ "call_id": session.call_id }),
        );
        Ok(Response::from_websocket(pair.client)?)
    }

    async fn persona_for(&self, call_id: &str) -> ApiResult<Option<PersonaBrief>> {
        let store = self.store().await?;
        let Some(call) = store.call(call_id).await? else {
            return Ok(None);
        };
        let Some(p) = store.persona(&call.persona_id).await? else {
            return Ok(None);
        };
        let fields = p.fields();
        let notes = store.memory(&call.user_id, &call.persona_id).await?;
        let zone = store
            .user_by_id(&call.user_id)
            .await?
            .and_then(|u| u.timezone);
        let system_prompt = cmb_core::persona::call_prompt(
            &fields,
            zone.as_deref(),
            i64::try_from(now_ms()).unwrap_or(i64::MAX),
            notes.as_ref().map(|m| cmb_core::memory::Notes {
                summary: &m.summary,
                day: m.last_call_day(),
            }),
        );
        let first_call = !store
            .number_reached_before(&call.phone_number, &call.id)
            .await?;
        let disclosure = &self.config()?.ai_disclosure;
        let greeting = cmb_core::persona::opening_line(&p.greeting, disclosure, first_call);
        let voicemail = cmb_core::persona::voicemail_line(&p.name, disclosure, first_call);
        Ok(Some(PersonaBrief {
            system_prompt,
            name: p.name,
            voice_id: p.voice_id,
            voice_settings: cmb_core::channel::VoiceSettings {
                stability: p.stability,
                similarity_boost: p.similarity_boost,
                style: p.style,
                speed: p.speed,
                use_speaker_boost: true,
            },
            greeting,
            voicemail,
            caller_zone: zone,
        }))
    }
}
