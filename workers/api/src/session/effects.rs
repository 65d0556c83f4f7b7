//! Carrying out the machine's effects: Twilio REST, database writes, relay frames, the
//! alarm, and the LLM stream. Each result goes back through the machine as an event.
//!
//! The LLM stream is read after the other effects of its event, in the same handler but
//! without the lock, with the machine's deadlines (first token, total): every delta is
//! its own event, and the reading stops as soon as the machine no longer wants it.

use std::collections::VecDeque;
use std::time::Duration;

use cmb_core::prompt::Speaker;
use cmb_core::session::{
    DbOp, DbOpKind, DbResult, Effect, Event, HangUpPurpose, LlmEvent, LogLevel, Refusal,
    TwilioCall, TwilioResult,
};
use futures::{FutureExt as _, StreamExt as _};
use worker::{AbortController, Delay, Result};

use super::{now_ms, rt, CallSession};
use crate::crypto;
use crate::iso_from_millis as iso;
use crate::llm;
use crate::store::{CostRow, LedgerEntry, Settlement, Store, TranscriptRow, WriteConflict};
use crate::twilio::{self, Dial};

impl CallSession {
    /// Runs `first` and everything its results lead to; LLM streams after the rest.
    pub(super) async fn drive(&self, first: Vec<Effect>) -> Result<()> {
        let mut queue: VecDeque<Effect> = first.into();
        let mut streams: VecDeque<Effect> = VecDeque::new();
        let mut store: Option<Store> = None;
        loop {
            self.run_queue(&mut queue, &mut streams, &mut store).await?;
            let Some(start) = streams.pop_front() else {
                return Ok(());
            };
            self.stream_llm(start, &mut queue, &mut streams, &mut store)
                .await?;
        }
    }

    async fn run_queue(
        &self,
        queue: &mut VecDeque<Effect>,
        streams: &mut VecDeque<Effect>,
        store: &mut Option<Store>,
    ) -> Result<()> {
        while let Some(effect) = queue.pop_front() {
            if matches!(effect, Effect::StartLlm { .. }) {
                streams.push_back(effect);
                continue;
            }
            if let Some(event) = self.run(effect, store).await? {
                if let Some((more, _)) = self.step(event).await? {
                    queue.extend(more);
                }
            }
        }
        Ok(())
    }

    async fn store_for<'a>(&self, store: &'a mut Option<Store>) -> Result<&'a Store> {
        if store.is_none() {
            *store = Some(self.store().await?);
        }
        store.as_ref().ok_or_else(|| rt("no store"))
    }

    /// One effect; its result as an event, if it has one.
    async fn run(&self, effect: Effect, store: &mut Option<Store>) -> Result<Option<Event>> {
        match effect {
            Effect::ToRelay { conn, frames } => {
                for ws in self.sockets(conn) {
                    for f in &frames {
                        let text = f.to_json().map_err(rt)?;
                        if let Err(e) = ws.send_with_str(text) {
                            worker::console_warn!("send to relay failed: {e}");
                        }
                    }
                }
                Ok(None)
            }
            Effect::CloseRelay { conn, reason } => {
                for ws in self.sockets(conn) {
                    let _ = ws.close(Some(1008), Some(reason.as_str()));
                }
                Ok(None)
            }
            Effect::CancelLlm { stream } => {
                if self.reading.get() == Some(stream) {
                    self.reading.set(None);
                }
                Ok(None)
            }
            Effect::StartLlm { .. } => Ok(None), // read by `drive`
            Effect::SetAlarm(at) => {
                match at {
                    Some(ms) => {
                        let date = js_sys::Date::new(&wasm_bindgen::JsValue::from_f64(ms as f64));
                        self.state
                            .storage()
                            .set_alarm(worker::ScheduledTime::new(date))
                            .await?;
                    }
                    None => self.state.storage().delete_alarm().await?,
                }
                Ok(None)
            }
            Effect::Log { level, message } => {
                match level {
                    LogLevel::Info => worker::console_log!("call: {message}"),
                    LogLevel::Warn => worker::console_warn!("call: {message}"),
                    LogLevel::Error => worker::console_error!("call: {message}"),
                }
                Ok(None)
            }
            Effect::TwilioCreate {
                to,
                timeout_secs,
                time_limit_secs,
            } => {
                let cfg = self.config()?;
                let (id, _) = self.ids().await?;
                let base = &cfg.public_base_url;
                let twiml_url = format!("{base}/api/voice/twiml?callId={id}");
                let status_url = format!("{base}/api/voice/status?callId={id}");
                let dial = Dial {
                    to: &to,
                    twiml_url: &twiml_url,
                    status_callback: &status_url,
                    timeout_secs,
                    time_limit_secs,
                };
                let result = match twilio::create_call(&cfg, &dial).await {
                    Ok(sid) => TwilioResult::Created { sid },
                    Err(e) if e.status == 429 => TwilioResult::CreateRateLimited,
                    Err(e) if (400..500).contains(&e.status) => TwilioResult::CreateRefused {
                        message: e.to_string(),
                    },
                    Err(e) => TwilioResult::CreateUnknown {
                        message: e.to_string(),
                    },
                };
                Ok(Some(Event::Twilio(result)))
            }
            Effect::TwilioFetch { sid } => {
                let cfg = self.config()?;
                Ok(Some(looked(twilio::fetch_call(&cfg, &sid).await)))
            }
            Effect::TwilioFind { to, since_ms } => {
                let cfg = self.config()?;
                let day: String = iso(since_ms).chars().take(10).collect();
                Ok(Some(looked(twilio::find_call(&cfg, &to, &day).await)))
            }
            Effect::TwilioHangUp { sid, purpose } => {
                let cfg = self.config()?;
                let word = match purpose {
                    HangUpPurpose::Cancel => "canceled",
                    HangUpPurpose::Complete => "completed",
                };
                let ok = match twilio::end_call(&cfg, &sid, word).await {
                    Ok(()) => true,
                    Err(e) => {
                        worker::console_warn!("Twilio refused Status={word} call_sid={sid}: {e}");
                        false
                    }
                };
                Ok(Some(Event::Twilio(TwilioResult::HungUp { purpose, ok })))
            }
            Effect::Db(op) => {
                let (id, user) = self.ids().await?;
                let store = self.store_for(store).await?;
                Ok(db(store, &id, &user, op).await)
            }
        }
    }

    /// The call's and its user's ids (fixed for the object's life).
    async fn ids(&self) -> Result<(String, String)> {
        let s = self
            .state
            .storage()
            .get::<cmb_core::session::Session>(super::STATE_KEY)
            .await?
            .ok_or_else(|| rt("no call in this object"))?;
        Ok((s.call_id, s.user_id))
    }

    /// Reads one LLM reply with the machine's deadlines, each piece an event.
    async fn stream_llm(
        &self,
        start: Effect,
        queue: &mut VecDeque<Effect>,
        streams: &mut VecDeque<Effect>,
        store: &mut Option<Store>,
    ) -> Result<()> {
        let Effect::StartLlm {
            stream,
            messages,
            first_token_ms,
            total_ms,
        } = start
        else {
            return Ok(());
        };
        self.reading.set(Some(stream));
        let cfg = self.config()?;
        let controller = AbortController::default();
        let signal = controller.signal();
        let started = now_ms();
        let first_deadline = started + u64::from(first_token_ms);
        let total_deadline = started + u64::from(total_ms);
        let mut got_first = false;
        let mut usage = (0u64, 0u64);
        let outcome: std::result::Result<(), (bool, String)> = async {
            let opening = llm::open(&cfg, &messages, &signal).fuse();
            let timer = Delay::from(Duration::from_millis(u64::from(first_token_ms))).fuse();
            futures::pin_mut!(opening, timer);
            let events = futures::select! {
                r = opening => r.map_err(|e| (false, e.to_string()))?,
                () = timer => return Err((true, format!("no answer in {first_token_ms} ms"))),
            };
            futures::pin_mut!(events);
            loop {
                let deadline = if got_first { total_deadline } else { first_deadline };
                let left = deadline.saturating_sub(now_ms());
                let next = events.next().fuse();
                let timer = Delay::from(Duration::from_millis(left)).fuse();
                futures::pin_mut!(next, timer);
                let item = futures::select! {
                    item = next => item,
                    () = timer => {
                        let what = if got_first { "reply not finished in" } else { "no first token in" };
                        let ms = if got_first { total_ms } else { first_token_ms };
                        return Err((true, format!("{what} {ms} ms")));
                    }
                };
                let Some(data) = item else { return Ok(()) };
                let piece = llm::parse_event(&data.map_err(|e| (false, e.to_string()))?)
                    .map_err(|e| (false, e.to_string()))?;
                if let Some(u) = piece.usage {
                    usage = u;
                }
                for text in piece.text {
                    got_first = true;
                    let since = u32::try_from(now_ms() - started).unwrap_or(u32::MAX);
                    let ev = Event::Llm(LlmEvent::Delta {
                        stream,
                        text,
                        since_start_ms: since,
                    });
                    if !self.feed(ev, stream, queue, streams, store).await.map_err(|e| (false, e.to_string()))? {
                        return Ok(()); // the machine moved on (barge-in, hang-up, end)
                    }
                }
                if piece.done {
                    return Ok(());
                }
            }
        }
        .await;
        controller.abort();
        if self.reading.get() != Some(stream) {
            return Ok(());
        }
        self.reading.set(None);
        let ev = match outcome {
            Ok(()) => LlmEvent::Done {
                stream,
                prompt_tokens: usage.0,
                completion_tokens: usage.1,
            },
            Err((timed_out, message)) => LlmEvent::Failed {
                stream,
                timed_out,
                message,
            },
        };
        self.feed(Event::Llm(ev), stream, queue, streams, store)
            .await?;
        Ok(())
    }

    /// Steps one LLM event and runs what it leads to; false once `stream` is no longer
    /// the one the machine wants.
    async fn feed(
        &self,
        event: Event,
        stream: u32,
        queue: &mut VecDeque<Effect>,
        streams: &mut VecDeque<Effect>,
        store: &mut Option<Store>,
    ) -> Result<bool> {
        let Some((effects, session)) = self.step(event).await? else {
            return Ok(false);
        };
        queue.extend(effects);
        self.run_queue(queue, streams, store).await?;
        let wanted = session.active_stream() == Some(stream) && self.reading.get() == Some(stream);
        Ok(wanted)
    }
}

fn looked(r: std::result::Result<Option<twilio::CallResource>, twilio::TwilioError>) -> Event {
    Event::Twilio(match r {
        Ok(Some(c)) => TwilioResult::Looked {
            call: Some(TwilioCall {
                duration_secs: c.duration_secs(),
                status: c.status,
                answered_by: c.answered_by,
            }),
            sid: Some(c.sid),
        },
        Ok(None) => TwilioResult::Looked {
            sid: None,
            call: None,
        },
        Err(e) => TwilioResult::LookFailed {
            message: e.to_string(),
        },
    })
}

fn failed(op: DbOpKind, e: impl std::fmt::Display) -> Option<Event> {
    Some(Event::Db(DbResult::Failed {
        op,
        message: e.to_string(),
    }))
}

fn refusal(c: WriteConflict) -> Refusal {
    match c {
        WriteConflict::LiveCall => Refusal::LiveCall,
        WriteConflict::DailyLimit => Refusal::DailyLimit,
        _ => Refusal::Credits,
    }
}

/// One database write; its result as an event (none for best-effort writes).
async fn db(store: &Store, call_id: &str, user_id: &str, op: DbOp) -> Option<Event> {
    let now = iso(now_ms());
    let uuid = || crypto::uuid().unwrap_or_default();
    match op {
        DbOp::ReserveScheduled { key, amount } => {
            let id = uuid();
            let entry = LedgerEntry {
                id: &id,
                user_id,
                kind: "reserve",
                amount: -amount,
                key: &key,
                call_id: Some(call_id),
                reason: "first minute of scheduled call",
            };
            match store.start_scheduled_call(call_id, &entry, &now).await {
                Ok(Ok(())) | Ok(Err(WriteConflict::Duplicate)) => {
                    let balance = store.user_credits(user_id).await.unwrap_or(0);
                    Some(Event::Db(DbResult::Reserved { minute: 1, balance }))
                }
                Ok(Err(c)) => Some(Event::Db(DbResult::ReserveRefused {
                    minute: 1,
                    why: refusal(c),
                })),
                Err(e) => failed(DbOpKind::Reserve, e.message),
            }
        }
        DbOp::ReserveMinute {
            key,
            minute,
            amount,
        } => {
            let id = uuid();
            let entry = LedgerEntry {
                id: &id,
                user_id,
                kind: "reserve",
                amount: -amount,
                key: &key,
                call_id: Some(call_id),
                reason: "next minute of call",
            };
            match store.apply_ledger(&entry, &now).await {
                Ok(Ok(())) | Ok(Err(WriteConflict::Duplicate)) => {
                    let balance = store.user_credits(user_id).await.unwrap_or(0);
                    Some(Event::Db(DbResult::Reserved { minute, balance }))
                }
                Ok(Err(c)) => Some(Event::Db(DbResult::ReserveRefused {
                    minute,
                    why: refusal(c),
                })),
                Err(e) => failed(DbOpKind::Reserve, e.message),
            }
        }
        DbOp::Progress {
            status,
            sid,
            started_at_ms,
            answered_by,
        } => {
            let started = started_at_ms.map(iso);
            if let Err(e) = store
                .update_call_progress(
                    call_id,
                    status.as_str(),
                    sid.as_deref(),
                    started.as_deref(),
                    answered_by.as_deref(),
                    &now,
                )
                .await
            {
                worker::console_error!(
                    "call progress write failed call_id={call_id}: {}",
                    e.message
                );
            }
            None
        }
        DbOp::EndUnconnected {
            status,
            reason,
            release,
            at_ms,
        } => {
            let id = uuid();
            let key = format!("release:{call_id}");
            let entry = LedgerEntry {
                id: &id,
                user_id,
                kind: "release",
                amount: release,
                key: &key,
                call_id: Some(call_id),
                reason: &reason,
            };
            match store
                .end_call_unconnected(call_id, status.as_str(), &reason, Some(&entry), &iso(at_ms))
                .await
            {
                Ok(Ok(())) | Ok(Err(WriteConflict::Duplicate)) => {
                    Some(Event::Db(DbResult::Settled))
                }
                Ok(Err(c)) => failed(DbOpKind::Settle, format!("{c:?}")),
                Err(e) => failed(DbOpKind::Settle, e.message),
            }
        }
        DbOp::SaveConversation(record) => {
            let rows: Vec<TranscriptRow> = record
                .lines
                .iter()
                .map(|l| TranscriptRow {
                    seq: l.seq,
                    role: match l.role {
                        Speaker::User => "user".into(),
                        Speaker::Assistant => "assistant".into(),
                    },
                    text: l.text.clone(),
                    at: iso(l.at_ms),
                    interrupted: i64::from(l.interrupted),
                })
                .collect();
            let costs: Vec<CostRow> = record
                .costs
                .iter()
                .map(|c| CostRow {
                    provider: c.provider.into(),
                    quantity: c.quantity,
                    unit: c.unit.into(),
                    cost_micros: c.micros,
                })
                .collect();
            let results = [
                store.save_transcript(call_id, &rows).await,
                store.save_costs(call_id, &costs).await,
                store
                    .save_latencies(call_id, &record.latencies, &iso(record.at_ms))
                    .await,
            ];
            for e in results.into_iter().filter_map(|r| r.err()) {
                worker::console_error!(
                    "conversation write failed call_id={call_id}: {}",
                    e.message
                );
            }
            None
        }
        DbOp::Settle(s) => {
            let release_id = uuid();
            let settle_id = uuid();
            let twilio_cost = CostRow {
                provider: "twilio".into(),
                quantity: s.twilio_minutes as f64,
                unit: "minutes".into(),
                cost_micros: s.twilio_micros,
            };
            let ended = iso(s.ended_at_ms);
            let settlement = Settlement {
                call_id,
                status: s.status.as_str(),
                reason: s.reason.as_deref(),
                ended_at: &ended,
                duration_seconds: i64::from(s.duration_secs),
                charge: s.charge,
                release: s.release,
                user_id,
                release_ledger_id: &release_id,
                settle_ledger_id: &settle_id,
                costs: std::slice::from_ref(&twilio_cost),
            };
            match store.settle_call(&settlement, &now).await {
                Ok(Ok(())) | Ok(Err(WriteConflict::Duplicate)) => {
                    Some(Event::Db(DbResult::Settled))
                }
                Ok(Err(WriteConflict::Check)) => match store.user_credits(user_id).await {
                    Ok(balance) => Some(Event::Db(DbResult::SettleShort { balance })),
                    Err(e) => failed(DbOpKind::Settle, e.message),
                },
                Ok(Err(c)) => failed(DbOpKind::Settle, format!("{c:?}")),
                Err(e) => failed(DbOpKind::Settle, e.message),
            }
        }
    }
}
