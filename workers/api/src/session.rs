//! The `CallSession` Durable Object: one per call (named by the call id), the single
//! writer of that call's state after it is created.
//!
//! It dials (now, or when its alarm fires for a scheduled call), applies Twilio's status
//! callbacks in order, and settles the call exactly once. Handlers run one at a time (an
//! async mutex), and every database write is idempotent (ledger keys), so a retried alarm
//! or a replayed callback can never bill twice.

use cmb_core::calls::{self, CallStatus};
use futures::lock::Mutex;
use serde::{Deserialize, Serialize};
use worker::{
    durable_object, DurableObject, Env, Request, Response, Result, State, WebSocket,
    WebSocketIncomingMessage,
};

use crate::config;
use crate::crypto;
use crate::store::{CostRow, LedgerEntry, Settlement, Store, WriteConflict};
use crate::twilio::{self, Dial};

/// How long Twilio lets the phone ring before `no-answer`.
const RING_TIMEOUT_SECS: u32 = 30;
/// Retry delay when a database write failed for a reason other than a conflict.
const RETRY_MS: u64 = 5_000;

/// The call's state, persisted in the object's storage under `call`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallState {
    pub call_id: String,
    pub user_id: String,
    pub phone_number: String,
    pub status: CallStatus,
    pub twilio_sid: Option<String>,
    /// Credits currently held for the call.
    pub reserved: i64,
    /// Highest Twilio `SequenceNumber` applied (-1 before any).
    pub last_seq: i64,
    pub answered_by: Option<String>,
    pub scheduled_at_ms: Option<u64>,
    /// True once the final record and settlement are in the database.
    pub settled: bool,
    /// A final status waiting to be written (when the write failed and is retried).
    pub pending_final: Option<PendingFinal>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingFinal {
    pub status: CallStatus,
    pub duration_secs: u32,
    pub connected: bool,
}

/// Messages from the Worker's routes to the object (JSON over the DO fetch).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SessionOp {
    Start {
        call_id: String,
        user_id: String,
        phone_number: String,
        reserved: i64,
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
}

/// The object's answer to `StreamEnded`: whether the conversation ended on purpose.
#[derive(Debug, Serialize, Deserialize)]
pub struct StreamEndedOutcome {
    pub graceful: bool,
}

/// The object's answer to `Cancel`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CancelOutcome {
    pub canceled: bool,
    pub status: CallStatus,
}

#[durable_object]
pub struct CallSession {
    pub(crate) state: State,
    pub(crate) env: Env,
    lock: Mutex<()>,
}

fn now_ms() -> u64 {
    worker::Date::now().as_millis()
}

fn iso(ms: u64) -> String {
    crate::iso_from_millis(ms)
}

impl DurableObject for CallSession {
    fn new(state: State, env: Env) -> Self {
        Self {
            state,
            env,
            lock: Mutex::new(()),
        }
    }

    async fn fetch(&self, mut req: Request) -> Result<Response> {
        let upgrade = req.headers().get("upgrade")?.unwrap_or_default();
        if upgrade.eq_ignore_ascii_case("websocket") {
            let _guard = self.lock.lock().await;
            return self.accept_relay().await;
        }
        let op: SessionOp = match req.json().await {
            Ok(op) => op,
            Err(e) => return Response::error(format!("bad session op: {e}"), 400),
        };
        let _guard = self.lock.lock().await;
        match op {
            SessionOp::Start {
                call_id,
                user_id,
                phone_number,
                reserved,
                scheduled_at_ms,
            } => {
                let st = CallState {
                    call_id,
                    user_id,
                    phone_number,
                    status: if scheduled_at_ms.is_some() {
                        CallStatus::Scheduled
                    } else {
                        CallStatus::Queued
                    },
                    twilio_sid: None,
                    reserved,
                    last_seq: -1,
                    answered_by: None,
                    scheduled_at_ms,
                    settled: false,
                    pending_final: None,
                };
                self.save(&st).await?;
                let when = scheduled_at_ms.unwrap_or_else(now_ms);
                self.set_alarm_at(when).await?;
                Response::from_json(&serde_json::json!({ "ok": true }))
            }
            SessionOp::Cancel => {
                let outcome = self.cancel().await?;
                Response::from_json(&outcome)
            }
            SessionOp::End { reason } => {
                let outcome = self.end(&reason).await?;
                Response::from_json(&outcome)
            }
            SessionOp::Answered { answered_by } => {
                if let Some(mut st) = self.load().await? {
                    if answered_by.is_some() {
                        st.answered_by = answered_by;
                        self.save(&st).await?;
                    }
                }
                Response::from_json(&serde_json::json!({ "ok": true }))
            }
            SessionOp::StreamEnded => {
                let conv = self.load_conv().await?;
                Response::from_json(&StreamEndedOutcome {
                    graceful: conv.hanging_up,
                })
            }
            SessionOp::TwilioStatus { params } => {
                self.apply_status(&params).await?;
                Response::from_json(&serde_json::json!({ "ok": true }))
            }
        }
    }

    async fn alarm(&self) -> Result<Response> {
        let _guard = self.lock.lock().await;
        let Some(mut st) = self.load().await? else {
            return Response::ok("no call");
        };
        if let Some(pending) = st.pending_final.clone() {
            self.finish(&mut st, pending).await?;
            return Response::ok("settled");
        }
        if !st.settled
            && st.status == CallStatus::InProgress
            && self.conversation_alarm(&mut st).await?
        {
            return Response::ok("conversation");
        }
        let ready_to_dial = match st.status {
            CallStatus::Scheduled => self.reserve_scheduled(&mut st).await?,
            CallStatus::Queued => st.twilio_sid.is_none(),
            _ => false,
        };
        if ready_to_dial {
            self.dial(&mut st).await?;
        }
        Response::ok("ok")
    }

    async fn websocket_message(
        &self,
        ws: WebSocket,
        message: WebSocketIncomingMessage,
    ) -> Result<()> {
        let _guard = self.lock.lock().await;
        match message {
            WebSocketIncomingMessage::String(text) => self.on_relay_message(&ws, &text).await,
            WebSocketIncomingMessage::Binary(_) => {
                worker::console_warn!("relay sent a binary frame; the channel is JSON text only");
                Ok(())
            }
        }
    }

    async fn websocket_close(
        &self,
        ws: WebSocket,
        code: usize,
        reason: String,
        _was_clean: bool,
    ) -> Result<()> {
        let _guard = self.lock.lock().await;
        worker::console_log!("relay channel closed code={code} reason={reason}");
        let _ = ws.close(Some(1000), Some("bye"));
        self.on_relay_closed().await
    }

    async fn websocket_error(&self, _ws: WebSocket, error: worker::Error) -> Result<()> {
        worker::console_warn!("relay channel error: {error}");
        Ok(())
    }
}

impl CallSession {
    /// Sets the object's alarm for an absolute time (ms since the epoch). workers-rs reads
    /// a bare integer as an offset from now, so always go through a `Date`.
    pub(crate) async fn set_alarm_at(&self, at_ms: u64) -> Result<()> {
        let date = js_sys::Date::new(&wasm_bindgen::JsValue::from_f64(at_ms as f64));
        self.state
            .storage()
            .set_alarm(worker::ScheduledTime::new(date))
            .await
    }

    /// Settles a call whose final status never arrived, from our own measure of it.
    pub(crate) async fn settle_from_watchdog(
        &self,
        st: &mut CallState,
        duration_secs: u32,
    ) -> Result<()> {
        let pending = PendingFinal {
            status: CallStatus::Completed,
            duration_secs,
            connected: true,
        };
        st.pending_final = Some(pending.clone());
        self.save(st).await?;
        worker::console_warn!(
            "settling from watchdog call_id={} duration={duration_secs}",
            st.call_id
        );
        self.finish(st, pending).await
    }

    /// The configured database (D1 or Postgres), opened for this event.
    pub(crate) async fn store(&self) -> Result<Store> {
        let cfg = config::load(&self.env).map_err(|r| {
            let names: Vec<&str> = r.problems.iter().map(|p| p.name).collect();
            worker::Error::RustError(format!("misconfigured: {}", names.join(", ")))
        })?;
        Store::open(&self.env, cfg.db_backend)
            .await
            .map_err(|e| worker::Error::RustError(format!("{}: {}", e.code, e.message)))
    }

    pub(crate) async fn load(&self) -> Result<Option<CallState>> {
        self.state.storage().get::<CallState>("call").await
    }

    pub(crate) async fn save(&self, st: &CallState) -> Result<()> {
        self.state.storage().put("call", st).await
    }

    fn api_err(e: crate::error::ApiError) -> worker::Error {
        worker::Error::RustError(format!("{}: {}", e.code, e.message))
    }

    /// A scheduled call's time has come: reserve its first minute. Returns false (and
    /// ends the call with the reason) when it can no longer be paid for.
    async fn reserve_scheduled(&self, st: &mut CallState) -> Result<bool> {
        let store = self.store().await?;
        let id = crypto::uuid().map_err(|e| worker::Error::RustError(e.to_string()))?;
        let key = format!("reserve:{}", st.call_id);
        let amount = cmb_core::pricing::MIN_CREDITS_TO_START;
        let now = iso(now_ms());
        let entry = LedgerEntry {
            id: &id,
            user_id: &st.user_id,
            kind: "reserve",
            amount: -amount,
            key: &key,
            call_id: Some(&st.call_id),
            reason: "first minute of scheduled call",
        };
        let result = store
            .start_scheduled_call(&st.call_id, &entry, &now)
            .await
            .map_err(Self::api_err)?;
        let failure = match result {
            Ok(()) | Err(WriteConflict::Duplicate) => None,
            Err(WriteConflict::Check) => Some(format!(
                "Not enough credits at the scheduled time: a call needs {amount} credits."
            )),
            Err(WriteConflict::LiveCall) => {
                Some("Another call was in progress at the scheduled time.".to_string())
            }
            // Starting a scheduled call does not bump the daily counter (see `limits`).
            Err(WriteConflict::DailyLimit) => {
                Some("The daily call limit was reached at the scheduled time.".to_string())
            }
        };
        if let Some(reason) = failure {
            store
                .end_call_unconnected(&st.call_id, "failed", &reason, None, &now)
                .await
                .map_err(Self::api_err)?
                .map_err(|e| worker::Error::RustError(format!("{e:?}")))?;
            st.status = CallStatus::Failed;
            st.settled = true;
            self.save(st).await?;
            worker::console_log!(
                "scheduled call failed call_id={} reason={reason}",
                st.call_id
            );
            return Ok(false);
        }
        st.status = CallStatus::Queued;
        st.reserved = amount;
        self.save(st).await?;
        Ok(true)
    }

    /// Asks Twilio to place the call. A Twilio error fails the call with Twilio's reason
    /// and releases the reservation.
    async fn dial(&self, st: &mut CallState) -> Result<()> {
        let cfg = config::load(&self.env).map_err(|r| {
            let names: Vec<&str> = r.problems.iter().map(|p| p.name).collect();
            worker::Error::RustError(format!("misconfigured: {}", names.join(", ")))
        })?;
        let base = &cfg.public_base_url;
        let twiml_url = format!("{base}/api/voice/twiml?callId={}", st.call_id);
        let status_url = format!("{base}/api/voice/status?callId={}", st.call_id);
        let dial = Dial {
            to: &st.phone_number,
            twiml_url: &twiml_url,
            status_callback: &status_url,
            timeout_secs: RING_TIMEOUT_SECS,
        };
        let store = self.store().await?;
        let now = iso(now_ms());
        match twilio::create_call(&cfg, &dial).await {
            Ok(sid) => {
                worker::console_log!("dialed call_id={} call_sid={sid}", st.call_id);
                st.twilio_sid = Some(sid.clone());
                self.save(st).await?;
                store
                    .update_call_progress(&st.call_id, "queued", Some(&sid), None, None, &now)
                    .await
                    .map_err(Self::api_err)?;
            }
            Err(e) => {
                worker::console_warn!("dial failed call_id={} error={e}", st.call_id);
                self.end_unconnected(st, CallStatus::Failed, &e.to_string())
                    .await?;
            }
        }
        Ok(())
    }

    /// Ends a call that never connected, releasing its reservation.
    async fn end_unconnected(
        &self,
        st: &mut CallState,
        status: CallStatus,
        reason: &str,
    ) -> Result<()> {
        let store = self.store().await?;
        let id = crypto::uuid().map_err(|e| worker::Error::RustError(e.to_string()))?;
        let key = format!("release:{}", st.call_id);
        let release = LedgerEntry {
            id: &id,
            user_id: &st.user_id,
            kind: "release",
            amount: st.reserved,
            key: &key,
            call_id: Some(&st.call_id),
            reason,
        };
        let result = store
            .end_call_unconnected(
                &st.call_id,
                status.as_str(),
                reason,
                Some(&release),
                &iso(now_ms()),
            )
            .await
            .map_err(Self::api_err)?;
        match result {
            Ok(()) | Err(WriteConflict::Duplicate) => {}
            Err(e) => return Err(worker::Error::RustError(format!("end call: {e:?}"))),
        }
        st.status = status;
        st.reserved = 0;
        st.settled = true;
        self.save(st).await
    }

    /// [`SessionOp::Cancel`]: stops a call that has not connected yet.
    async fn cancel(&self) -> Result<CancelOutcome> {
        match self.load().await? {
            Some(st) => self.cancel_loaded(st).await,
            None => Ok(CancelOutcome {
                canceled: false,
                status: CallStatus::Failed,
            }),
        }
    }

    /// [`Self::cancel`] for a state already loaded.
    async fn cancel_loaded(&self, mut st: CallState) -> Result<CancelOutcome> {
        match st.status {
            CallStatus::Scheduled | CallStatus::Queued => {}
            other => {
                return Ok(CancelOutcome {
                    canceled: false,
                    status: other,
                })
            }
        }
        // Already handed to Twilio: only Twilio can stop it ringing.
        if let Some(sid) = st.twilio_sid.clone() {
            if !self.cancel_at_twilio(&st, &sid).await? {
                return Ok(CancelOutcome {
                    canceled: false,
                    status: st.status,
                });
            }
        }
        self.state.storage().delete_alarm().await?;
        self.end_unconnected(&mut st, CallStatus::Canceled, "Canceled by the user.")
            .await?;
        Ok(CancelOutcome {
            canceled: true,
            status: CallStatus::Canceled,
        })
    }

    /// Asks Twilio to stop placing the call (`Status=canceled`); false, logged, when it
    /// refuses. Twilio's status callback then settles the call.
    async fn cancel_at_twilio(&self, st: &CallState, sid: &str) -> Result<bool> {
        let cfg = config::load(&self.env)
            .map_err(|_| worker::Error::RustError("misconfigured".into()))?;
        match twilio::end_call(&cfg, sid, "canceled").await {
            Ok(()) => Ok(true),
            Err(e) => {
                worker::console_warn!("Twilio refused to cancel call_id={} error={e}", st.call_id);
                Ok(false)
            }
        }
    }

    /// [`SessionOp::End`]: `canceled` says whether the call was stopped (a live one
    /// finishes its goodbye and settles as usual).
    async fn end(&self, reason: &str) -> Result<CancelOutcome> {
        let Some(st) = self.load().await? else {
            return Ok(CancelOutcome {
                canceled: false,
                status: CallStatus::Failed,
            });
        };
        match st.status {
            CallStatus::Scheduled | CallStatus::Queued => self.cancel_loaded(st).await,
            CallStatus::Ringing if !st.settled => {
                let canceled = match st.twilio_sid.as_deref() {
                    Some(sid) => self.cancel_at_twilio(&st, sid).await?,
                    None => false,
                };
                Ok(CancelOutcome {
                    canceled,
                    status: st.status,
                })
            }
            CallStatus::InProgress if !st.settled => {
                self.end_conversation(&st, reason).await?;
                Ok(CancelOutcome {
                    canceled: true,
                    status: st.status,
                })
            }
            other => Ok(CancelOutcome {
                canceled: false,
                status: other,
            }),
        }
    }

    /// Applies one Twilio status callback. Replays (a `SequenceNumber` already applied),
    /// late arrivals that would move the call backwards, and anything after a final
    /// status change nothing.
    async fn apply_status(&self, params: &[(String, String)]) -> Result<()> {
        let Some(mut st) = self.load().await? else {
            return Ok(());
        };
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let seq = get("SequenceNumber")
            .and_then(|s| s.parse::<i64>().ok())
            .unwrap_or(st.last_seq + 1);
        let Some(new_status) = get("CallStatus").and_then(calls::map_twilio_status) else {
            return Ok(());
        };
        if seq <= st.last_seq || st.status.is_final() || st.pending_final.is_some() {
            return Ok(());
        }
        st.last_seq = seq;
        if let Some(sid) = get("CallSid") {
            st.twilio_sid.get_or_insert_with(|| sid.to_string());
        }
        if let Some(by) = get("AnsweredBy") {
            st.answered_by = Some(by.to_string());
        }
        if !calls::transition_allowed(st.status, new_status) {
            self.save(&st).await?;
            return Ok(());
        }
        if new_status.is_final() {
            let duration_secs = get("CallDuration")
                .and_then(|d| d.parse::<u32>().ok())
                .unwrap_or(0);
            let connected = new_status == CallStatus::Completed
                && (st.status == CallStatus::InProgress || duration_secs > 0);
            let pending = PendingFinal {
                status: new_status,
                duration_secs,
                connected,
            };
            st.pending_final = Some(pending.clone());
            self.save(&st).await?;
            return self.finish(&mut st, pending).await;
        }
        let now = now_ms();
        let started_at = (new_status == CallStatus::InProgress).then(|| iso(now));
        st.status = new_status;
        self.save(&st).await?;
        self.store()
            .await?
            .update_call_progress(
                &st.call_id,
                new_status.as_str(),
                st.twilio_sid.as_deref(),
                started_at.as_deref(),
                st.answered_by.as_deref(),
                &iso(now),
            )
            .await
            .map_err(Self::api_err)?;
        Ok(())
    }

    /// Writes the final record and settles credits, once. On a transient failure the
    /// alarm retries; the ledger keys make the retry safe.
    async fn finish(&self, st: &mut CallState, pending: PendingFinal) -> Result<()> {
        let machine = st.answered_by.as_deref().is_some_and(calls::is_machine);
        // A machine answered: the call ended politely without a conversation, base fee only.
        let mut charge = if machine && pending.connected {
            cmb_core::pricing::BASE_CALL_CREDITS
        } else {
            cmb_core::pricing::call_charge_credits(pending.duration_secs, pending.connected)
        };
        let billed_minutes = if pending.connected {
            i64::from(pending.duration_secs.div_ceil(60))
        } else {
            0
        };
        let usage = cmb_core::pricing::CallUsage {
            call_duration_secs: if pending.connected {
                pending.duration_secs
            } else {
                0
            },
            ..Default::default()
        };
        let breakdown =
            cmb_core::pricing::cost_breakdown(&cmb_core::pricing::ProviderRates::default(), &usage);
        let twilio_cost = CostRow {
            provider: "twilio".into(),
            quantity: billed_minutes as f64,
            unit: "minutes".into(),
            cost_micros: breakdown.twilio_micros,
        };
        let conv = self.load_conv().await?;
        self.persist_conversation(st, &conv).await?;
        let store = self.store().await?;
        let now = iso(now_ms());
        let mut reason: Option<String> = machine.then(|| "Answered by a machine.".to_string());
        for attempt in 0..2 {
            let release_id = crypto::uuid().map_err(|e| worker::Error::RustError(e.to_string()))?;
            let settle_id = crypto::uuid().map_err(|e| worker::Error::RustError(e.to_string()))?;
            let settlement = Settlement {
                call_id: &st.call_id,
                status: pending.status.as_str(),
                reason: reason.as_deref(),
                ended_at: &now,
                duration_seconds: i64::from(pending.duration_secs),
                charge,
                release: st.reserved,
                user_id: &st.user_id,
                release_ledger_id: &release_id,
                settle_ledger_id: &settle_id,
                costs: std::slice::from_ref(&twilio_cost),
            };
            match store.settle_call(&settlement, &now).await {
                Ok(Ok(())) | Ok(Err(WriteConflict::Duplicate)) => break,
                Ok(Err(WriteConflict::Check)) if attempt == 0 => {
                    // The call outran its reservation and the balance cannot cover the
                    // rest: charge what there is and record the shortfall.
                    let balance = store
                        .user_credits(&st.user_id)
                        .await
                        .map_err(Self::api_err)?;
                    let collectable = st.reserved + balance;
                    reason = Some(format!(
                        "{} credits could not be collected.",
                        charge - collectable
                    ));
                    charge = collectable;
                }
                Ok(Err(e)) => return Err(worker::Error::RustError(format!("settle: {e:?}"))),
                Err(e) => {
                    worker::console_error!(
                        "settle failed call_id={} error={}; retrying",
                        st.call_id,
                        e.message
                    );
                    self.set_alarm_at(now_ms() + RETRY_MS).await?;
                    return Ok(());
                }
            }
        }
        st.status = pending.status;
        st.reserved = 0;
        st.settled = true;
        st.pending_final = None;
        self.save(st).await?;
        worker::console_log!(
            "call settled call_id={} status={} duration={} charge={charge}",
            st.call_id,
            pending.status.as_str(),
            pending.duration_secs
        );
        Ok(())
    }
}
