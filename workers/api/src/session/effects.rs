//! Carrying out the machine's effects: Twilio REST, database writes, relay frames, the
//! alarm, and the LLM stream. Each result goes back through the machine as an event.
//!
//! The LLM stream is read after the other effects of its event, in the same handler but
//! without the lock, with the machine's deadlines (first token, total): every delta is
//! its own event, and the reading stops as soon as the machine no longer wants it.

use serde_json::json;
use std::collections::VecDeque;
use std::time::Duration;

use cmb_core::model::{LedgerKind, RequestedBy, TranscriptRole};
use cmb_core::prompt::Speaker;
use cmb_core::session::{
    DbOp, DbOpKind, DbResult, Effect, Event, HangUpPurpose, LlmEvent, LogLevel, Refusal, Session,
    TwilioCall, TwilioResult,
};
use futures::{FutureExt as _, StreamExt as _};
use worker::{AbortController, Delay};

use super::{now_ms, CallSession};
use crate::clients::llm;
use crate::clients::twilio::{self, Dial};
use crate::crypto;
use crate::error::{ApiError, ApiResult};
use crate::iso_from_millis as iso;
use crate::store::{CostRow, LedgerEntry, Settlement, Store, TranscriptRow, WriteConflict};

impl CallSession {
    /// Runs `first` and everything its results lead to; LLM streams after the rest.
    pub(super) async fn drive(&self, first: Vec<Effect>, session: &Session) -> ApiResult<()> {
        let mut run = Run {
            queue: first.into(),
            streams: VecDeque::new(),
            store: None,
            events: Vec::new(),
            call_id: session.call_id.clone(),
            call_sid: session.sid.clone(),
            user_id: session.user_id.clone(),
        };
        loop {
            self.run_queue(&mut run).await?;
            let Some(start) = run.streams.pop_front() else {
                return Ok(());
            };
            self.stream_llm(start, &mut run).await?;
        }
    }

    async fn run_queue(&self, run: &mut Run) -> ApiResult<()> {
        let ran = self.run_effects(run).await;
        // Recorded after the effects, so a call's own work never waits on the event log.
        if !run.events.is_empty() {
            let events = std::mem::take(&mut run.events);
            match self.open_store(run).await {
                Ok(()) => run.store()?.record(events).await,
                Err(e) => crate::log::error(
                    "event_record_failed",
                    json!({ "call_id": run.call_id, "events": events.len(), "cause": e.log_detail() }),
                ),
            }
        }
        ran
    }

    async fn run_effects(&self, run: &mut Run) -> ApiResult<()> {
        while let Some(effect) = run.queue.pop_front() {
            if matches!(effect, Effect::StartLlm { .. }) {
                run.streams.push_back(effect);
                continue;
            }
            if let Some(event) = cmb_core::events::of_effect(&effect, now_ms()) {
                let event = event.call(Some(&run.call_id)).user(Some(&run.user_id));
                run.events.push(event);
            }
            if let Some(event) = self.run(effect, run).await? {
                if let Some((more, _)) = self.step(event).await? {
                    run.queue.extend(more);
                }
            }
        }
        Ok(())
    }

    /// One effect; its result as an event, if it has one.
    async fn run(&self, effect: Effect, run: &mut Run) -> ApiResult<Option<Event>> {
        match effect {
            Effect::ToRelay { conn, frames } => {
                for ws in self.sockets(conn) {
                    for f in &frames {
                        let text = f
                            .to_json()
                            .map_err(|e| ApiError::internal("encode relay frame", e))?;
                        if let Err(e) = ws.send_with_str(text) {
                            crate::log::warn(
                                "relay_send_failed",
                                json!({ "call_id": run.call_id, "error": e.to_string() }),
                            );
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
            // The reader stops at its next piece, when the machine no longer wants it.
            Effect::CancelLlm { .. } => Ok(None),
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
            Effect::ScheduleCallback {
                tool_call_id,
                at_ms,
            } => {
                // Whatever goes wrong, the persona gets an answer to tell the caller.
                let outcome = match self.open_store(run).await {
                    Ok(()) => self.book_callback(run.store()?, run, at_ms).await,
                    Err(e) => {
                        crate::log::error(
                            "callback_failed",
                            json!({ "call_id": run.call_id, "error": e.log_detail() }),
                        );
                        Err(CALLBACK_UNAVAILABLE.to_owned())
                    }
                };
                Ok(Some(Event::Callback {
                    tool_call_id,
                    outcome,
                }))
            }
            Effect::Prepare => {
                // A persona that cannot be read now is read again when the relay connects.
                match self.persona_for(&run.call_id).await {
                    Ok(Some(persona)) => Ok(Some(Event::Prepared { persona })),
                    Ok(None) => Ok(None),
                    Err(e) => {
                        crate::log::warn(
                            "prepare_failed",
                            json!({ "call_id": run.call_id, "error": e.log_detail() }),
                        );
                        Ok(None)
                    }
                }
            }
            Effect::StageGreeting {
                voice_id,
                voice_settings,
                text,
            } => {
                let cfg = self.config()?;
                let job = super::greeting::stage(
                    cfg,
                    run.call_id.clone(),
                    voice_id,
                    voice_settings,
                    text,
                );
                // In the background: the dial goes on; the relay answers at once anyway.
                self.state.wait_until(job);
                Ok(None)
            }
            Effect::Settled { status } => {
                // What follows a schedule's attempt; a failure is logged, never the call's.
                let follow = match self.open_store(run).await {
                    Ok(()) => self.follow_schedule(run.store()?, run, status).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = follow {
                    crate::log::error(
                        "schedule_follow_up_failed",
                        json!({ "call_id": run.call_id, "error": e.log_detail() }),
                    );
                }
                Ok(None)
            }
            Effect::Remember { lines, ended_at_ms } => {
                let job = super::memory::Job {
                    env: self.env.clone(),
                    cfg: self.config()?,
                    call_id: run.call_id.clone(),
                    user_id: run.user_id.clone(),
                    lines,
                    ended_at_ms,
                };
                // In the background: nothing waits for the notes.
                self.state.wait_until(super::memory::remember(job));
                Ok(None)
            }
            Effect::Log { level, message } => {
                let level = match level {
                    LogLevel::Info => cmb_core::log::Level::Info,
                    LogLevel::Warn => cmb_core::log::Level::Warn,
                    LogLevel::Error => cmb_core::log::Level::Error,
                };
                crate::log::emit(
                    level,
                    "session",
                    json!({ "call_id": run.call_id, "call_sid": run.call_sid, "message": message }),
                );
                Ok(None)
            }
            Effect::TwilioCreate {
                to,
                timeout_secs,
                time_limit_secs,
            } => {
                let cfg = self.config()?;
                // The destination rules once more, right before the dial: nothing
                // outside them ever reaches Twilio, whatever path queued the call.
                if let Err(refusal) = cmb_core::destination::check(&to, &cfg.allowed_countries) {
                    return Ok(Some(Event::Twilio(TwilioResult::CreateRefused {
                        message: format!("unsupported destination: {}", refusal.message()),
                    })));
                }
                // And only the account's verified number as it is now: a call scheduled
                // before the account verified another phone does not ring the old one.
                self.open_store(run).await?;
                let store = run.store()?;
                let owner = store.user_by_id(&run.user_id).await?;
                if owner.as_ref().and_then(|u| u.verified_phone()) != Some(to.as_str()) {
                    return Ok(Some(Event::Twilio(TwilioResult::CreateRefused {
                        message: "the number is no longer the account's verified phone".into(),
                    })));
                }
                let id = &run.call_id;
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
                        crate::log::warn(
                            "twilio_hang_up_refused",
                            json!({ "call_id": run.call_id, "call_sid": sid, "provider": "twilio", "status": word, "error": e.to_string() }),
                        );
                        false
                    }
                };
                Ok(Some(Event::Twilio(TwilioResult::HungUp { purpose, ok })))
            }
            Effect::Db(op) => {
                self.open_store(run).await?;
                let store = run.store()?;
                Ok(db(store, &run.call_id, &run.user_id, op).await)
            }
        }
    }

    /// Reads one LLM reply with the machine's deadlines, each piece an event.
    async fn stream_llm(&self, start: Effect, run: &mut Run) -> ApiResult<()> {
        let Effect::StartLlm {
            stream,
            messages,
            tools,
            first_token_ms,
            total_ms,
        } = start
        else {
            return Ok(());
        };
        let cfg = self.config()?;
        let controller = AbortController::default();
        let signal = controller.signal();
        let started = now_ms();
        let first_deadline = started + u64::from(first_token_ms);
        let total_deadline = started + u64::from(total_ms);
        let mut got_first = false;
        let mut usage = (0u64, 0u64);
        let mut tool_calls = cmb_core::tools::Assembler::default();
        let outcome: std::result::Result<(), (bool, String)> = async {
            let opening = llm::open(&cfg, &messages, tools, &signal).fuse();
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
                // A reply that only calls tools has begun too: the first-token deadline is met.
                for delta in piece.tool_calls {
                    got_first = true;
                    tool_calls.push(delta);
                }
                for text in piece.text {
                    got_first = true;
                    let since = u32::try_from(now_ms() - started).unwrap_or(u32::MAX);
                    let ev = Event::Llm(LlmEvent::Delta {
                        stream,
                        text,
                        since_start_ms: since,
                    });
                    if !self.feed(ev, stream, run).await.map_err(|e| (false, e.log_detail()))? {
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
        let ev = match outcome {
            Ok(()) => LlmEvent::Done {
                stream,
                prompt_tokens: usage.0,
                completion_tokens: usage.1,
                tool_calls: tool_calls.finish(),
            },
            Err((timed_out, message)) => LlmEvent::Failed {
                stream,
                timed_out,
                message,
            },
        };
        self.feed(Event::Llm(ev), stream, run).await?;
        Ok(())
    }

    /// Steps one LLM event and runs what it leads to; false once the machine no longer
    /// wants `stream` (neither the reply nor the speculation).
    async fn feed(&self, event: Event, stream: u32, run: &mut Run) -> ApiResult<bool> {
        let Some((effects, session)) = self.step(event).await? else {
            return Ok(false);
        };
        run.queue.extend(effects);
        self.run_queue(run).await?;
        Ok(session.wants_stream(stream))
    }
}

impl CallSession {
    /// Opens the run's database on first use.
    async fn open_store(&self, run: &mut Run) -> ApiResult<()> {
        if run.store.is_none() {
            run.store = Some(self.store().await?);
        }
        Ok(())
    }

    /// The persona's `schedule_callback`: a scheduled call to the account's verified
    /// number with this call's persona, under the usual limits (the route's own booking).
    /// `Err` says why not, for the persona to tell the caller.
    async fn book_callback(
        &self,
        store: &Store,
        run: &Run,
        at_ms: u64,
    ) -> std::result::Result<u64, String> {
        let refused = |why: &str| Err(why.to_owned());
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            crate::log::error(
                "callback_failed",
                json!({ "call_id": run.call_id, "step": what, "error": e.to_string() }),
            );
            Err(CALLBACK_UNAVAILABLE.to_owned())
        };
        let cfg = match self.config() {
            Ok(cfg) => cfg,
            Err(e) => return failed("config", &e.log_detail()),
        };
        let user = match store.user_by_id(&run.user_id).await {
            Ok(Some(user)) => user,
            Ok(None) => return refused("the account no longer exists"),
            Err(e) => return failed("read account", &e.log_detail()),
        };
        let call = match store.call(&run.call_id).await {
            Ok(Some(call)) => call,
            Ok(None) => return failed("read call", &"the call row is missing"),
            Err(e) => return failed("read call", &e.log_detail()),
        };
        if user.is_banned {
            return refused("the account is suspended");
        }
        // The persona as the booking route would check it: it may have been retired (or
        // made private to someone else) since this call began.
        match store.persona(&call.persona_id).await {
            Ok(Some(p)) if p.usable_by(&user.id) => {}
            Ok(_) => return refused("this persona is no longer available for calls"),
            Err(e) => return failed("read persona", &e.log_detail()),
        }
        let phone = match cmb_core::destination::for_call(
            None,
            user.verified_phone(),
            &cfg.allowed_countries,
        ) {
            Ok(phone) => phone,
            Err(_) => return refused("the account has no verified phone number we can call"),
        };
        let booking = crate::session::client::Booking {
            user: &user,
            persona_id: &call.persona_id,
            phone: &phone,
            at_ms,
            requested_by: RequestedBy::Persona,
            schedule: None,
        };
        match crate::session::client::book_scheduled(&self.env, store, &booking, &iso(now_ms()))
            .await
        {
            Ok(row) => {
                crate::log::info(
                    "callback_booked",
                    json!({ "call_id": run.call_id, "callback_call_id": row.id, "at": row.scheduled_time }),
                );
                Ok(at_ms)
            }
            Err(e) if e.status < 500 => Err(e.message),
            Err(e) => failed("book", &e.log_detail()),
        }
    }
}

impl CallSession {
    /// After an attempt of a schedule settled: its retry (`no_answer`/`busy`, while retries
    /// are left) or the schedule's next occurrence is booked, unless the schedule was
    /// deleted, paused, or moved on to another attempt since (a PATCH detaches the old).
    async fn follow_schedule(
        &self,
        store: &Store,
        run: &Run,
        status: cmb_core::calls::CallStatus,
    ) -> ApiResult<()> {
        let Some(call) = store.call(&run.call_id).await? else {
            return Ok(());
        };
        let Some(schedule_id) = call.schedule_id.as_deref() else {
            return Ok(());
        };
        let Some(schedule) = store.schedule_by_id(schedule_id).await? else {
            return Ok(()); // deleted
        };
        if !schedule.is_active || schedule.pending_call_id.as_deref() != Some(call.id.as_str()) {
            return Ok(());
        }
        let Some(user) = store.user_by_id(&call.user_id).await? else {
            return Ok(());
        };
        let cfg = self.config()?;
        let now = now_ms();
        let plan = cmb_core::schedule::after_attempt(
            &cmb_core::schedule::Attempt {
                status,
                attempt: u32::try_from(call.attempt).unwrap_or(u32::MAX),
                retries: u32::try_from(schedule.retries).unwrap_or(0),
                retry_after_minutes: u32::try_from(schedule.retry_after_minutes).unwrap_or(0),
                scheduled_at: call.scheduled_time.as_deref(),
            },
            &schedule.time_of_day,
            schedule.days,
            &schedule.timezone,
            i64::try_from(now).unwrap_or(i64::MAX),
        )
        .map_err(|e| ApiError::internal("schedule", e))?;
        // An attempt that could not be placed (no credits, say) is noted on the schedule
        // beside the next one.
        let note = call
            .status_reason
            .as_deref()
            .filter(|_| status == cmb_core::calls::CallStatus::Failed);
        let outcome = crate::session::client::book_following(
            &self.env,
            &cfg,
            store,
            &schedule,
            &user,
            (plan.at_ms, i64::from(plan.attempt)),
            note,
            &iso(now),
        )
        .await?;
        crate::log::info(
            "schedule_followed",
            json!({
                "call_id": run.call_id, "schedule_id": schedule.id, "status": status.as_str(),
                "retry": plan.attempt > 0,
                "booked_call_id": outcome.as_ref().ok().map(|row| row.id.clone()),
                "skipped": outcome.err().map(|e| e.message),
            }),
        );
        Ok(())
    }
}

/// What the persona is told when a callback could not be booked for a reason of ours.
const CALLBACK_UNAVAILABLE: &str = "the callback could not be booked right now";

/// The work of one `drive`: effects still to run, LLM streams to read after them, the
/// database opened on first use, and the call's ids.
struct Run {
    queue: VecDeque<Effect>,
    streams: VecDeque<Effect>,
    store: Option<Store>,
    /// Operator events of the effects run so far, recorded once the queue is empty.
    events: Vec<cmb_core::events::Event>,
    call_id: String,
    call_sid: Option<String>,
    user_id: String,
}

impl Run {
    /// The database, once [`CallSession::open_store`] opened it.
    fn store(&self) -> ApiResult<&Store> {
        self.store
            .as_ref()
            .ok_or_else(|| ApiError::internal("call session", "the store was not opened"))
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

/// Reserves minute `minute` of the call: the first (a scheduled call's, which also moves
/// it to `queued`) or one more minute of talk. After the first, the user's balance comes
/// back too: it caps Twilio's `TimeLimit` at the dial.
async fn reserve(
    store: &Store,
    call_id: &str,
    user_id: &str,
    minute: u32,
    key: &str,
    amount: i64,
    now: &str,
) -> Option<Event> {
    let id = match crypto::uuid() {
        Ok(id) => id,
        Err(e) => return failed(DbOpKind::Reserve, e),
    };
    let entry = LedgerEntry {
        id: &id,
        user_id,
        kind: LedgerKind::Reserve,
        amount: -amount,
        key,
        call_id: Some(call_id),
        reason: if minute == 1 {
            "first minute of scheduled call"
        } else {
            "next minute of call"
        },
    };
    let written = if minute == 1 {
        store.start_scheduled_call(call_id, &entry, now).await
    } else {
        store.apply_ledger(&entry, now).await
    };
    match written {
        Ok(Ok(())) | Ok(Err(WriteConflict::Duplicate)) => {
            let balance = if minute == 1 {
                match store.user_credits(user_id).await {
                    Ok(b) => Some(b),
                    Err(e) => {
                        crate::log::warn(
                            "balance_read_failed",
                            json!({ "call_id": call_id, "cause": e.log_detail() }),
                        );
                        None
                    }
                }
            } else {
                None
            };
            Some(Event::Db(DbResult::Reserved { minute, balance }))
        }
        Ok(Err(c)) => Some(Event::Db(DbResult::ReserveRefused {
            minute,
            why: refusal(c),
        })),
        Err(e) => failed(DbOpKind::Reserve, e.message),
    }
}

/// One database write; its result as an event (none for best-effort writes).
async fn db(store: &Store, call_id: &str, user_id: &str, op: DbOp) -> Option<Event> {
    let now = iso(now_ms());
    match op {
        DbOp::ReserveScheduled { key, amount } => {
            reserve(store, call_id, user_id, 1, &key, amount, &now).await
        }
        DbOp::ReserveMinute {
            key,
            minute,
            amount,
        } => reserve(store, call_id, user_id, minute, &key, amount, &now).await,
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
                crate::log::error(
                    "call_progress_write_failed",
                    json!({ "call_id": call_id, "cause": e.log_detail() }),
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
            let id = match crypto::uuid() {
                Ok(id) => id,
                Err(e) => return failed(DbOpKind::Settle, e),
            };
            let key = format!("release:{call_id}");
            let entry = LedgerEntry {
                id: &id,
                user_id,
                kind: LedgerKind::Release,
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
                        Speaker::User => TranscriptRole::User,
                        Speaker::Assistant => TranscriptRole::Assistant,
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
                crate::log::error(
                    "conversation_write_failed",
                    json!({ "call_id": call_id, "cause": e.log_detail() }),
                );
            }
            None
        }
        DbOp::Settle(s) => {
            let (release_id, settle_id) = match (crypto::uuid(), crypto::uuid()) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => return failed(DbOpKind::Settle, e),
            };
            let twilio_cost = CostRow {
                provider: "twilio".into(),
                quantity: s.twilio_minutes as f64,
                unit: "minutes".into(),
                cost_micros: s.twilio_micros,
            };
            let ended = iso(s.ended_at_ms);
            let settlement = Settlement {
                call_id,
                status: s.status,
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
