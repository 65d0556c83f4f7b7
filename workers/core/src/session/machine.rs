//! [`Session::handle`]: one event in, effects out. See the module docs in `mod.rs`.

use crate::calls::{self, CallStatus};
use crate::channel::{DoToRelay, Envelope, RelayToDo, SttOptions};
use crate::pricing;
use crate::prompt::{self, Speaker};
use crate::tools;

use super::*;

/// A Twilio create with no answer by then is treated as "outcome unknown". The shell's
/// own deadline on the request is shorter, so this only fires after a restart.
const CREATE_STALE_MS: u64 = 30_000;
/// Before looking up a create whose outcome is unknown, give Twilio's list time to show it.
const FIND_DELAY_MS: u64 = 5_000;
/// How many times an unknown create is looked up before we conclude it never happened.
const FIND_ATTEMPTS: u32 = 2;
/// 429s tolerated on create before the call fails.
const CREATE_ATTEMPTS: u32 = 3;
/// Retry delay after a transient database failure.
const DB_RETRY_MS: u64 = 5_000;
/// The next minute is reserved this long before it starts.
const MINUTE_LEAD_MS: u64 = 5_000;
/// The machine's own LLM deadline sits this far beyond the shell's.
const LLM_BACKSTOP_MS: u64 = 2_000;
/// The relay's own limits sit this far beyond ours, so ours always act first.
const RELAY_BACKSTOP_SECS: u32 = 30;
/// Twilio's `TimeLimit` sits this far beyond what the balance pays for.
const TIME_LIMIT_MARGIN_SECS: u32 = 60;
/// DO → relay frames kept for a resume (oldest dropped beyond).
const OUTBOX_MAX: usize = 256;
/// A call stops speculating once discarded speculations have cost this many tokens
/// (prompt + completion): a bound on what speculation can add to a call's LLM bill.
const SPECULATION_WASTE_CAP_TOKENS: u64 = 20_000;
/// Prompt budget for the conversation history.
const PROMPT_BUDGET_TOKENS: usize = 3_000;

fn secs(s: u32) -> u64 {
    u64::from(s) * 1000
}

impl Session {
    /// A new call's session, and what to do first (a call for now dials at once).
    pub fn start(s: Start, now: u64) -> (Session, Vec<Effect>) {
        let mut session = Session {
            status: if s.scheduled_at_ms.is_some() {
                CallStatus::Scheduled
            } else {
                CallStatus::Queued
            },
            minutes_reserved: u32::from(s.reserved > 0),
            call_id: s.call_id,
            user_id: s.user_id,
            phone_number: s.phone_number,
            account_sid: s.account_sid,
            limits: s.limits,
            scheduled_at_ms: s.scheduled_at_ms,
            reserve_retry_ms: None,
            reserving: false,
            dial: Dial::NotYet,
            dialed_ms: None,
            dial_error: None,
            sid: None,
            reserved: s.reserved,
            balance: s.balance,
            minute_pending: false,
            minute_retry_ms: None,
            last_seq: -1,
            answered_by: None,
            answered_ms: None,
            lookup_at_ms: None,
            lookup_failures: 0,
            lookup_in_flight: false,
            cancel_requested: None,
            relay: RelayLink::default(),
            conv: Conversation::default(),
            llm: None,
            spec: None,
            twilio_end_requested: false,
            ending_ms: None,
            final_: None,
            settle: SettleStep::None,
            charged: 0,
            creates: 0,
            rate_limited: 0,
            reply: None,
            alarm_ms: None,
        };
        let mut out = Vec::new();
        if session.scheduled_at_ms.is_none() {
            // Dial from the alarm, at once: the route that started the call does not wait
            // for Twilio.
            session.dial = Dial::Due {
                at_ms: now,
                attempt: 1,
            };
        }
        session.finish(now, &mut out);
        (session, out)
    }

    /// Applies one event at time `now` (ms since the epoch) and returns what to do.
    pub fn handle(&mut self, event: Event, now: u64) -> Vec<Effect> {
        let mut out = Vec::new();
        match event {
            Event::Start(_) => {} // a retried start: the session exists already
            Event::Cancel => self.on_cancel(None, now, &mut out),
            Event::End { reason } => self.on_cancel(Some(reason), now, &mut out),
            Event::Answered { answered_by } => self.on_answered(answered_by, now),
            Event::TwilioStatus { params } => self.on_status(&params, now, &mut out),
            Event::Twilio(r) => self.on_twilio(r, now, &mut out),
            Event::Db(r) => self.on_db(r, now, &mut out),
            Event::RelayOpened { conn, persona } => {
                self.on_relay_open(conn, persona, now, &mut out)
            }
            Event::RelayFrame { conn, frame } => self.on_relay_frame(conn, frame, now, &mut out),
            Event::RelayClosed { conn } => self.on_relay_closed(conn, now),
            Event::Llm(e) => self.on_llm(e, now, &mut out),
            Event::Callback {
                tool_call_id,
                outcome,
            } => self.on_callback(&tool_call_id, outcome, now, &mut out),
            Event::Prepared { persona } => self.on_prepared(persona, &mut out),
            Event::Alarm => {
                self.alarm_ms = None; // the platform cleared it by firing
                self.on_alarm(now, &mut out);
            }
        }
        self.finish(now, &mut out);
        out
    }

    /// True once the call's final record and credits are in the database.
    pub fn is_settled(&self) -> bool {
        self.settle == SettleStep::Done
    }

    /// Drops what the session keeps about the caller, for an erasure of their account:
    /// the number, the conversation's words (transcribed, generated, heard, and any
    /// frame not acknowledged) and the persona's prompt, which carried the caller's
    /// notes and time zone. Ids, statuses, counters and the final record stay. Only once
    /// the call is settled (nothing of it is still to be written): false, with nothing
    /// changed, before.
    pub fn forget_personal(&mut self) -> bool {
        if !self.is_settled() {
            return false;
        }
        self.phone_number.clear();
        self.llm = None;
        self.spec = None;
        self.conv.persona = None;
        self.conv.lines.clear();
        self.conv.outbox.clear();
        self.conv.tool_round = None;
        self.conv.callback = None;
        true
    }

    /// Whether the media stream ended because we hung up (the goodbye was said).
    pub fn hung_up_on_purpose(&self) -> bool {
        self.conv.hanging_up_ms.is_some()
    }

    /// The LLM stream currently wanted, if any: the shell stops reading any other.
    pub fn active_stream(&self) -> Option<u32> {
        self.llm.as_ref().map(|l| l.stream)
    }

    /// Whether the shell should keep reading LLM stream `stream`: the turn's reply, or
    /// the speculation held for the next turn.
    pub fn wants_stream(&self, stream: u32) -> bool {
        self.active_stream() == Some(stream)
            || self.spec.as_ref().is_some_and(|s| s.stream == stream)
    }

    /// The earliest time something must happen without an outside event.
    pub fn next_wake(&self) -> Option<u64> {
        if self.is_settled() {
            return None;
        }
        let l = &self.limits;
        let mut at: Vec<u64> = Vec::new();
        if let SettleStep::RetryAt(t) = self.settle {
            at.push(t);
        }
        if self.final_.is_some() {
            return at.into_iter().min();
        }
        if self.status == CallStatus::Scheduled && !self.reserving {
            at.extend(self.reserve_retry_ms.or(self.scheduled_at_ms));
        }
        match self.dial {
            Dial::Requested { at_ms, .. } => at.push(at_ms + CREATE_STALE_MS),
            Dial::Due { at_ms, .. } => at.push(at_ms),
            _ => {}
        }
        if !self.lookup_in_flight && self.status.rank() < CallStatus::InProgress.rank() {
            at.extend(self.lookup_at_ms);
        }
        if self.relay.stream_sid.is_none() {
            at.extend(self.answered_ms.map(|a| a + secs(l.relay_connect_secs)));
        }
        if self.status == CallStatus::InProgress {
            let r = &self.relay;
            if r.active.is_none() {
                at.extend(r.lost_ms.map(|t| t + secs(l.relay_grace_secs)));
            }
            at.extend(self.ending_ms.map(|t| t + secs(l.settle_wait_secs)));
            if let (Some(t), None, false) = (
                self.conv.hanging_up_ms,
                r.ended_ms,
                self.twilio_end_requested,
            ) {
                at.push(t + secs(l.hang_up_grace_secs));
            }
            if let Some(c) = r.connected_ms.filter(|_| self.is_talking()) {
                at.push(c + secs(l.max_call_secs));
                let idle_from = self.conv.last_activity_ms.unwrap_or(c);
                at.push(idle_from + secs(l.idle_timeout_secs));
                if !self.minute_pending {
                    at.push(
                        self.minute_retry_ms
                            .unwrap_or_else(|| self.next_minute_due(c)),
                    );
                }
            }
            if let Some(llm) = &self.llm {
                at.push(llm.started_ms + u64::from(l.llm_total_ms) + LLM_BACKSTOP_MS);
            }
        }
        at.into_iter().min()
    }

    // ---- bookkeeping ----

    /// Ends every handling: merges relay sends and moves the alarm if it changed.
    fn finish(&mut self, now: u64, out: &mut Vec<Effect>) {
        merge_relay_sends(out);
        let next = self.next_wake().map(|t| t.max(now));
        if next != self.alarm_ms {
            self.alarm_ms = next;
            out.push(Effect::SetAlarm(next));
        }
    }

    fn log(out: &mut Vec<Effect>, level: LogLevel, message: impl Into<String>) {
        out.push(Effect::Log {
            level,
            message: message.into(),
        });
    }

    /// A deterministic jittered backoff: 5 s doubling to 60 s, plus up to half again,
    /// spread by the call id so calls hit by the same outage do not retry in lockstep.
    fn backoff_ms(&self, attempt: u32) -> u64 {
        let base = (5_000u64 << attempt.min(4)).min(60_000);
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.call_id.bytes().chain(attempt.to_le_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        base + h % (base / 2 + 1)
    }

    /// A machine answered: the persona leaves its voicemail line and hangs up.
    fn is_voicemail(&self) -> bool {
        self.answered_by.as_deref().is_some_and(calls::is_machine)
    }

    fn is_talking(&self) -> bool {
        self.conv.hanging_up_ms.is_none() && self.ending_ms.is_none() && self.final_.is_none()
    }

    fn next_minute_due(&self, connected: u64) -> u64 {
        (connected + u64::from(self.minutes_reserved.max(1)) * 60_000)
            .saturating_sub(MINUTE_LEAD_MS)
    }

    /// Our own measure of connected time, up to `end`.
    fn connected_secs(&self, end: u64) -> u32 {
        let start = match (self.relay.connected_ms, self.answered_ms) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(end),
        };
        u32::try_from(end.saturating_sub(start) / 1000).unwrap_or(u32::MAX)
    }

    // ---- dialling ----

    fn dial(&mut self, now: u64, attempt: u32, out: &mut Vec<Effect>) {
        self.creates += 1;
        self.dial = Dial::Requested {
            at_ms: now,
            attempt,
        };
        self.dialed_ms.get_or_insert(now);
        let paid = pricing::max_call_secs_for_balance(self.balance + self.reserved);
        let time_limit = paid.min(self.limits.max_call_secs) + TIME_LIMIT_MARGIN_SECS;
        out.push(Effect::TwilioCreate {
            to: self.phone_number.clone(),
            timeout_secs: self.limits.ring_timeout_secs,
            time_limit_secs: time_limit,
        });
    }

    fn lookup_deadline_after_dial(&self) -> Option<u64> {
        self.dialed_ms.map(|d| {
            d + secs(self.limits.ring_timeout_secs) + secs(self.limits.reconcile_margin_secs)
        })
    }

    fn gave_up_on_twilio(&self, now: u64) -> bool {
        self.dialed_ms
            .is_some_and(|d| now >= d + secs(self.limits.reconcile_give_up_secs))
    }

    fn on_twilio(&mut self, r: TwilioResult, now: u64, out: &mut Vec<Effect>) {
        match r {
            TwilioResult::Created { sid } => {
                if !matches!(self.dial, Dial::Requested { .. } | Dial::Unknown { .. }) {
                    Self::log(
                        out,
                        LogLevel::Warn,
                        format!("unexpected Twilio create result call_sid={sid}"),
                    );
                    return;
                }
                self.placed(sid, now, out);
            }
            TwilioResult::CreateRefused { message } => {
                if matches!(self.dial, Dial::Requested { .. }) && self.final_.is_none() {
                    self.finalize(CallStatus::Failed, 0, false, Some(message), now, out);
                }
            }
            TwilioResult::CreateRateLimited => {
                let Dial::Requested { attempt, .. } = self.dial else {
                    return;
                };
                self.rate_limited += 1;
                if self.cancel_requested.is_some() {
                    let reason = self.cancel_reason();
                    self.finalize(CallStatus::Canceled, 0, false, Some(reason), now, out);
                } else if attempt >= CREATE_ATTEMPTS {
                    let msg = "Twilio is rate limiting calls; please try again shortly.";
                    self.finalize(CallStatus::Failed, 0, false, Some(msg.into()), now, out);
                } else {
                    self.dial = Dial::Due {
                        at_ms: now + self.backoff_ms(attempt - 1),
                        attempt: attempt + 1,
                    };
                }
            }
            TwilioResult::CreateUnknown { message } => {
                if let Dial::Requested { at_ms, .. } = self.dial {
                    Self::log(
                        out,
                        LogLevel::Warn,
                        format!("Twilio create outcome unknown: {message}"),
                    );
                    self.dial_error = Some(message);
                    self.unknown_dial(at_ms, now);
                }
            }
            TwilioResult::Looked { sid, call } => {
                self.lookup_in_flight = false;
                self.on_lookup(sid, call, now, out);
            }
            TwilioResult::LookFailed { message } => {
                self.lookup_in_flight = false;
                self.lookup_failures += 1;
                if self.final_.is_some() {
                    return;
                }
                if self.gave_up_on_twilio(now) {
                    let msg = "Twilio never reported the call's outcome; nothing was charged.";
                    Self::log(
                        out,
                        LogLevel::Error,
                        format!("giving up on Twilio: {message}"),
                    );
                    self.finalize(CallStatus::Failed, 0, false, Some(msg.into()), now, out);
                } else {
                    self.lookup_at_ms = Some(now + self.backoff_ms(self.lookup_failures));
                }
            }
            TwilioResult::HungUp { purpose, ok } => {
                if purpose == HangUpPurpose::Cancel {
                    if ok && self.final_.is_none() {
                        let reason = self.cancel_reason();
                        self.finalize(CallStatus::Canceled, 0, false, Some(reason), now, out);
                        self.reply = Some(CancelOutcome {
                            canceled: true,
                            status: CallStatus::Canceled,
                        });
                    } else if !ok && self.final_.is_some() {
                        // Canceled while its create was in flight, and Twilio could no
                        // longer cancel it (answered meanwhile): end it instead.
                        self.end_at_twilio(out);
                    } else if !ok {
                        self.cancel_requested = None;
                        self.reply = Some(CancelOutcome {
                            canceled: false,
                            status: self.status,
                        });
                    }
                } else if !ok {
                    Self::log(
                        out,
                        LogLevel::Warn,
                        "Twilio refused to end the call (over already?)",
                    );
                }
            }
        }
    }

    fn unknown_dial(&mut self, since_ms: u64, now: u64) {
        self.dial = Dial::Unknown {
            since_ms,
            lookups: 0,
        };
        self.lookup_at_ms = Some(now + FIND_DELAY_MS);
    }

    fn placed(&mut self, sid: String, now: u64, out: &mut Vec<Effect>) {
        self.dial = Dial::Placed { at_ms: now };
        if self.sid.as_deref().is_some_and(|s| s != sid) {
            Self::log(
                out,
                LogLevel::Warn,
                format!("Twilio created call_sid={sid}, callbacks named another"),
            );
        }
        self.sid = Some(sid.clone());
        self.lookup_at_ms = self.lookup_deadline_after_dial();
        if self.final_.is_some() || self.cancel_requested.is_some() {
            // Canceled while the create was in flight: only Twilio can stop it ringing.
            out.push(Effect::TwilioHangUp {
                sid,
                purpose: HangUpPurpose::Cancel,
            });
            return;
        }
        out.push(Effect::Db(DbOp::Progress {
            status: self.status,
            sid: Some(sid),
            started_at_ms: None,
            answered_by: None,
        }));
        if self.limits.prepare_greeting && self.conv.persona.is_none() {
            out.push(Effect::Prepare);
        }
    }

    /// The persona, read while the phone rings: kept for the relay's `hello`, and the
    /// greeting staged at the relay unless the stream is already up (the relay connected
    /// first and has its hello), a machine answered, or the call is over.
    fn on_prepared(&mut self, persona: PersonaBrief, out: &mut Vec<Effect>) {
        if self.final_.is_some() || self.conv.persona.is_some() {
            return;
        }
        // A machine that already answered gets the voicemail line from `hello` instead.
        if self.relay.hello_seq.is_none()
            && !self.is_voicemail()
            && !persona.greeting.trim().is_empty()
        {
            out.push(Effect::StageGreeting {
                voice_id: persona.voice_id.clone(),
                voice_settings: persona.voice_settings.clone(),
                text: persona.greeting.clone(),
            });
        }
        self.conv.persona = Some(persona);
    }

    fn on_lookup(
        &mut self,
        sid: Option<String>,
        call: Option<TwilioCall>,
        now: u64,
        out: &mut Vec<Effect>,
    ) {
        if self.final_.is_some() {
            return;
        }
        if let Dial::Unknown { since_ms, lookups } = self.dial {
            match (sid, &call) {
                (Some(sid), Some(_)) => self.placed(sid, now, out),
                _ if lookups + 1 >= FIND_ATTEMPTS => {
                    // Twilio has no such call: it was never created. Dialling again could
                    // ring the person twice if it were merely slow to list, so we stop.
                    let msg = match &self.dial_error {
                        Some(e) => {
                            format!("{e}; Twilio did not confirm the call, nothing was charged.")
                        }
                        None => "Twilio did not confirm the call; nothing was charged.".to_string(),
                    };
                    self.finalize(CallStatus::Failed, 0, false, Some(msg), now, out);
                    return;
                }
                _ => {
                    self.dial = Dial::Unknown {
                        since_ms,
                        lookups: lookups + 1,
                    };
                    self.lookup_at_ms = Some(now + self.backoff_ms(lookups));
                    return;
                }
            }
        }
        let Some(call) = call else {
            // Twilio does not know the sid it gave us: treat like a failed lookup.
            self.lookup_failures += 1;
            self.lookup_at_ms = Some(now + self.backoff_ms(self.lookup_failures));
            return;
        };
        if call.answered_by.is_some() {
            self.answered_by = call.answered_by.clone();
        }
        match calls::map_twilio_status(&call.status) {
            Some(status) if status.is_final() => {
                self.apply_final(status, call.duration_secs, now, out);
            }
            Some(status) => {
                self.apply_progress(status, now, out);
                if status.rank() < CallStatus::InProgress.rank() {
                    self.lookup_at_ms = Some(now + self.backoff_ms(0));
                }
            }
            None => self.lookup_at_ms = Some(now + self.backoff_ms(0)),
        }
    }

    // ---- Twilio callbacks ----

    fn on_status(&mut self, params: &[(String, String)], now: u64, out: &mut Vec<Effect>) {
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        // Bind to this call: its account and, once known, its CallSid.
        if get("AccountSid") != Some(self.account_sid.as_str()) {
            Self::log(
                out,
                LogLevel::Warn,
                "status callback for another account ignored",
            );
            return;
        }
        let Some(call_sid) = get("CallSid") else {
            Self::log(
                out,
                LogLevel::Warn,
                "status callback without CallSid ignored",
            );
            return;
        };
        match &self.sid {
            Some(sid) if sid != call_sid => {
                Self::log(
                    out,
                    LogLevel::Warn,
                    format!("status callback for call_sid={call_sid} ignored: this call is {sid}"),
                );
                return;
            }
            Some(_) => {}
            // Twilio's first callbacks can beat its create response; bind to the first sid
            // only while our own create is in flight.
            None if matches!(self.dial, Dial::Requested { .. } | Dial::Unknown { .. }) => {
                self.sid = Some(call_sid.to_string());
            }
            None => {
                Self::log(
                    out,
                    LogLevel::Warn,
                    "status callback for a call not dialled ignored",
                );
                return;
            }
        }
        let seq = get("SequenceNumber")
            .and_then(|s| s.parse::<i64>().ok())
            .unwrap_or(self.last_seq + 1);
        if seq <= self.last_seq || self.final_.is_some() {
            return; // a replay, or too late to matter
        }
        let Some(status) = get("CallStatus").and_then(calls::map_twilio_status) else {
            return;
        };
        self.last_seq = seq;
        if let Some(by) = get("AnsweredBy") {
            self.answered_by = Some(by.to_string());
        }
        if status.is_final() {
            let duration = get("CallDuration").and_then(|d| d.parse::<u32>().ok());
            self.apply_final(status, duration, now, out);
        } else {
            self.apply_progress(status, now, out);
        }
    }

    fn apply_progress(&mut self, status: CallStatus, now: u64, out: &mut Vec<Effect>) {
        if !calls::transition_allowed(self.status, status) {
            return;
        }
        self.status = status;
        let started = (status == CallStatus::InProgress).then_some(now);
        if started.is_some() {
            self.answered_ms.get_or_insert(now);
        }
        out.push(Effect::Db(DbOp::Progress {
            status,
            sid: self.sid.clone(),
            started_at_ms: started,
            answered_by: self.answered_by.clone(),
        }));
    }

    /// Twilio's final word on the call.
    fn apply_final(
        &mut self,
        status: CallStatus,
        duration: Option<u32>,
        now: u64,
        out: &mut Vec<Effect>,
    ) {
        let measured = self.connected_secs(self.relay.ended_ms.unwrap_or(now));
        let duration = duration.unwrap_or(measured);
        let connected = status == CallStatus::Completed
            && (self.status == CallStatus::InProgress || duration > 0);
        self.finalize(status, duration, connected, None, now, out);
    }

    fn on_answered(&mut self, answered_by: Option<String>, now: u64) {
        if self.final_.is_some() {
            return;
        }
        if answered_by.is_some() {
            self.answered_by = answered_by;
        }
        // The relay should connect soon (a person gets the conversation, a machine the
        // persona's voicemail), whether or not Twilio's callbacks arrive. The status
        // itself moves with Twilio's `answered` callback (or the relay's `ready`), so a
        // `ringing` callback racing this fetch is not skipped.
        self.answered_ms.get_or_insert(now);
    }

    // ---- cancel and end ----

    fn cancel_reason(&self) -> String {
        match &self.cancel_requested {
            Some(Some(reason)) => format!("Ended by the platform: {reason}"),
            _ => "Canceled by the user.".to_string(),
        }
    }

    /// `Cancel` (`platform` None) or `End` (the platform's reason).
    fn on_cancel(&mut self, platform: Option<String>, now: u64, out: &mut Vec<Effect>) {
        let not = |status| CancelOutcome {
            canceled: false,
            status,
        };
        if self.final_.is_some() {
            self.reply = Some(not(self.final_.as_ref().map_or(self.status, |f| f.status)));
            return;
        }
        let is_end = platform.is_some();
        match self.status {
            CallStatus::Scheduled | CallStatus::Queued | CallStatus::Ringing => {
                if self.status == CallStatus::Ringing && !is_end {
                    self.reply = Some(not(self.status));
                    return;
                }
                self.cancel_requested = Some(platform);
                match (&self.dial, self.sid.clone()) {
                    (Dial::Placed { .. }, Some(sid)) => {
                        // Only Twilio can stop it ringing; its answer sets the reply.
                        self.reply = None;
                        out.push(Effect::TwilioHangUp {
                            sid,
                            purpose: HangUpPurpose::Cancel,
                        });
                    }
                    // Not placed yet, or its create or reservation still in flight: the
                    // call ends now. A create that lands later is canceled at Twilio
                    // (`placed`), a reservation that lands later is released (`on_db`).
                    _ => {
                        let reason = self.cancel_reason();
                        self.finalize(CallStatus::Canceled, 0, false, Some(reason), now, out);
                        self.reply = Some(CancelOutcome {
                            canceled: true,
                            status: CallStatus::Canceled,
                        });
                    }
                }
            }
            CallStatus::InProgress if is_end => {
                let reason = platform.unwrap_or_default();
                self.hang_up(&reason, Some(ENDED_GOODBYE), now, out);
                self.reply = Some(CancelOutcome {
                    canceled: true,
                    status: self.status,
                });
            }
            other => self.reply = Some(not(other)),
        }
    }

    // ---- credits ----

    fn on_db(&mut self, r: DbResult, now: u64, out: &mut Vec<Effect>) {
        match r {
            DbResult::Reserved { minute, balance } => {
                if let Some(balance) = balance {
                    self.balance = balance;
                }
                if minute <= 1 {
                    if !self.reserving {
                        return;
                    }
                    self.reserving = false;
                    self.reserve_retry_ms = None;
                    self.reserved += pricing::MIN_CREDITS_TO_START;
                    if self.final_.is_some() {
                        // Canceled while the reservation was in flight: give it back.
                        self.write_final(now, out);
                        return;
                    }
                    self.minutes_reserved = 1;
                    self.status = CallStatus::Queued;
                    if self.cancel_requested.is_some() {
                        let reason = self.cancel_reason();
                        self.finalize(CallStatus::Canceled, 0, false, Some(reason), now, out);
                    } else {
                        self.dial(now, 1, out);
                    }
                } else if self.minute_pending && minute == self.minutes_reserved + 1 {
                    self.minute_pending = false;
                    self.minute_retry_ms = None;
                    self.minutes_reserved = minute;
                    self.reserved += pricing::PER_MINUTE_CREDITS;
                }
            }
            DbResult::ReserveRefused { minute, why } => {
                if minute <= 1 {
                    if !self.reserving {
                        return;
                    }
                    self.reserving = false;
                    let reason = match why {
                        Refusal::Credits => format!(
                            "Not enough credits at the scheduled time: a call needs {} credits.",
                            pricing::MIN_CREDITS_TO_START
                        ),
                        Refusal::LiveCall => {
                            "Another call was in progress at the scheduled time.".to_string()
                        }
                        Refusal::DailyLimit => {
                            "The daily call limit was reached at the scheduled time.".to_string()
                        }
                    };
                    self.finalize(CallStatus::Failed, 0, false, Some(reason), now, out);
                } else if self.minute_pending {
                    self.minute_pending = false;
                    self.hang_up("out_of_credits", Some(CREDITS_GOODBYE), now, out);
                }
            }
            DbResult::Settled => {
                if self.settle == SettleStep::InFlight {
                    self.settle = SettleStep::Done;
                    if let Some(f) = &self.final_ {
                        self.status = f.status;
                        self.charged = f.charge;
                    }
                    self.reserved = 0;
                    self.minute_pending = false;
                    Self::log(
                        out,
                        LogLevel::Info,
                        format!(
                            "call settled status={} charge={}",
                            self.status, self.charged
                        ),
                    );
                    out.push(Effect::Settled {
                        status: self.status,
                    });
                    if let Some(f) = self.final_.as_ref().filter(|f| f.connected) {
                        let lines = self.record(now).lines;
                        if crate::memory::worth_remembering(&lines) {
                            out.push(Effect::Remember {
                                lines,
                                ended_at_ms: f.at_ms,
                            });
                        }
                    }
                }
            }
            DbResult::SettleShort { balance } => {
                if self.settle != SettleStep::InFlight {
                    return;
                }
                let Some(f) = self.final_.as_mut() else {
                    return;
                };
                // The call outran its reservation and the balance cannot cover the rest:
                // charge what there is and record the shortfall.
                let collectable = self.reserved + balance.max(0);
                if f.charge > collectable {
                    f.reason = Some(format!(
                        "{} credits could not be collected.",
                        f.full_charge - collectable
                    ));
                    f.charge = collectable;
                }
                self.write_final(now, out);
            }
            DbResult::Failed { op, message } => match op {
                DbOpKind::Reserve if self.reserving => {
                    self.reserving = false;
                    self.reserve_retry_ms = Some(now + DB_RETRY_MS);
                    Self::log(
                        out,
                        LogLevel::Error,
                        format!("reservation failed, retrying: {message}"),
                    );
                }
                DbOpKind::Reserve => {
                    self.minute_pending = false;
                    self.minute_retry_ms = Some(now + DB_RETRY_MS);
                    Self::log(
                        out,
                        LogLevel::Error,
                        format!("minute reservation failed, retrying: {message}"),
                    );
                }
                DbOpKind::Settle => {
                    if self.settle == SettleStep::InFlight {
                        self.settle = SettleStep::RetryAt(now + DB_RETRY_MS);
                        Self::log(
                            out,
                            LogLevel::Error,
                            format!("settlement failed, retrying: {message}"),
                        );
                    }
                }
            },
        }
    }

    /// Decides the call's final status and charge, once, and writes it.
    fn finalize(
        &mut self,
        status: CallStatus,
        duration_secs: u32,
        connected: bool,
        reason: Option<String>,
        now: u64,
        out: &mut Vec<Effect>,
    ) {
        if self.final_.is_some() {
            return;
        }
        if let Some(llm) = self.llm.take() {
            out.push(Effect::CancelLlm { stream: llm.stream });
        }
        self.drop_speculation(out);
        let spec = self.conv.speculation;
        if spec.started > 0 {
            Self::log(
                out,
                LogLevel::Info,
                format!(
                    "speculation started={} used={} wasted_tokens={}",
                    spec.started, spec.used, spec.wasted_tokens
                ),
            );
        }
        // A machine answered: the persona left its voicemail (charged like any connected
        // call), or, if the stream never connected, nothing was said.
        let charge = pricing::call_charge_credits(duration_secs, connected);
        let reason = reason.or_else(|| {
            (self.is_voicemail() && connected).then(|| {
                if self.relay.connected_ms.is_some() {
                    "Voicemail left.".into()
                } else {
                    "Answered by a machine; no message was left.".into()
                }
            })
        });
        self.final_ = Some(Final {
            status,
            duration_secs: if connected { duration_secs } else { 0 },
            connected,
            reason,
            at_ms: now,
            charge,
            full_charge: charge,
        });
        self.write_final(now, out);
    }

    /// Emits the final record's write (again, on a retry: the ledger keys make it safe).
    fn write_final(&mut self, now: u64, out: &mut Vec<Effect>) {
        let Some(f) = self.final_.clone() else {
            return;
        };
        self.settle = SettleStep::InFlight;
        if !f.connected {
            out.push(Effect::Db(DbOp::EndUnconnected {
                status: f.status,
                reason: f.reason.unwrap_or_else(|| default_reason(f.status)),
                release: self.reserved,
                at_ms: f.at_ms,
            }));
            return;
        }
        out.push(Effect::Db(DbOp::SaveConversation(Box::new(
            self.record(now),
        ))));
        let usage = pricing::CallUsage {
            call_duration_secs: f.duration_secs,
            ..Default::default()
        };
        let b = pricing::cost_breakdown(&pricing::ProviderRates::default(), &usage);
        out.push(Effect::Db(DbOp::Settle(Settlement {
            status: f.status,
            reason: f.reason,
            ended_at_ms: f.at_ms,
            duration_secs: f.duration_secs,
            charge: f.charge,
            release: self.reserved,
            twilio_minutes: pricing::started_minutes(f.duration_secs),
            twilio_micros: b.twilio_micros,
        })));
    }

    /// The conversation as the database keeps it: transcript, provider costs, latencies.
    pub fn record(&self, now: u64) -> ConversationRecord {
        let c = &self.conv;
        let lines = c
            .lines
            .iter()
            .enumerate()
            // A persona line counts once the caller could have heard it.
            .filter(|(_, l)| !(l.speaker == Speaker::Assistant && l.heard.as_deref() == Some("")))
            .map(|(i, l)| TranscriptLine {
                seq: i as i64,
                role: l.speaker,
                text: l.heard.clone().unwrap_or_else(|| l.text.clone()),
                at_ms: l.at_ms,
                interrupted: l.interrupted,
            })
            .collect();
        let usage = pricing::CallUsage {
            call_duration_secs: 0,
            stt_audio_secs: c.stt_audio_secs,
            llm_input_tokens: c.llm_prompt_tokens,
            llm_output_tokens: c.llm_completion_tokens,
            tts_chars: c.tts_chars,
        };
        let b = pricing::cost_breakdown(&pricing::ProviderRates::default(), &usage);
        ConversationRecord {
            lines,
            costs: vec![
                CostLine {
                    provider: "deepgram",
                    quantity: c.stt_audio_secs / 60.0,
                    unit: "minutes",
                    micros: b.stt_micros,
                },
                CostLine {
                    provider: "llm",
                    quantity: (c.llm_prompt_tokens + c.llm_completion_tokens) as f64,
                    unit: "tokens",
                    micros: b.llm_micros,
                },
                CostLine {
                    provider: "elevenlabs",
                    quantity: c.tts_chars as f64,
                    unit: "characters",
                    micros: b.tts_micros,
                },
            ],
            latencies: c.latencies.clone(),
            at_ms: now,
        }
    }

    // ---- timers ----

    fn on_alarm(&mut self, now: u64, out: &mut Vec<Effect>) {
        if let SettleStep::RetryAt(t) = self.settle {
            if now >= t {
                self.write_final(now, out);
            }
        }
        if self.final_.is_some() {
            return;
        }
        let l = self.limits.clone();
        // A scheduled call's time has come.
        if self.status == CallStatus::Scheduled && !self.reserving {
            let due = self.reserve_retry_ms.or(self.scheduled_at_ms);
            if due.is_some_and(|t| now >= t) {
                if self.cancel_requested.is_some() {
                    let reason = self.cancel_reason();
                    self.finalize(CallStatus::Canceled, 0, false, Some(reason), now, out);
                    return;
                }
                self.reserving = true;
                out.push(Effect::Db(DbOp::ReserveScheduled {
                    key: format!("reserve:{}", self.call_id),
                    amount: pricing::MIN_CREDITS_TO_START,
                }));
            }
        }
        match self.dial {
            Dial::Due { at_ms, attempt } if now >= at_ms => self.dial(now, attempt, out),
            // No answer to our create (the object restarted mid-request): look it up.
            Dial::Requested { at_ms, .. } if now >= at_ms + CREATE_STALE_MS => {
                self.unknown_dial(at_ms, now);
                self.lookup_at_ms = Some(now);
            }
            _ => {}
        }
        let before_answer = self.status.rank() < CallStatus::InProgress.rank();
        if before_answer && !self.lookup_in_flight && self.lookup_at_ms.is_some_and(|t| now >= t) {
            self.lookup_at_ms = None;
            if self.gave_up_on_twilio(now) && self.lookup_failures > 0 {
                let msg = "Twilio never reported the call's outcome; nothing was charged.";
                self.finalize(CallStatus::Failed, 0, false, Some(msg.into()), now, out);
                return;
            }
            match (&self.dial, &self.sid) {
                (Dial::Unknown { since_ms, .. }, _) => {
                    self.lookup_in_flight = true;
                    out.push(Effect::TwilioFind {
                        to: self.phone_number.clone(),
                        since_ms: since_ms.saturating_sub(60_000),
                    });
                }
                (Dial::Placed { .. }, Some(sid)) => {
                    self.lookup_in_flight = true;
                    out.push(Effect::TwilioFetch { sid: sid.clone() });
                }
                _ => {}
            }
        }
        // The call was answered (TwiML fetched, or Twilio said so).
        if self.relay.stream_sid.is_none()
            && self
                .answered_ms
                .is_some_and(|a| now >= a + secs(l.relay_connect_secs))
        {
            Self::log(
                out,
                LogLevel::Error,
                "answered call's media relay never connected",
            );
            self.end_at_twilio(out);
            let msg = "The call's audio never connected; nothing was charged.";
            self.finalize(CallStatus::Failed, 0, false, Some(msg.into()), now, out);
            return;
        }
        if self.status != CallStatus::InProgress {
            return;
        }
        if let (None, Some(lost)) = (self.relay.active, self.relay.lost_ms) {
            if now >= lost + secs(l.relay_grace_secs) {
                Self::log(
                    out,
                    LogLevel::Error,
                    "media relay gone for good; ending the call",
                );
                self.end_at_twilio(out);
                let duration = self.connected_secs(lost);
                let msg = "The call's audio connection was lost.";
                self.finalize(
                    CallStatus::Completed,
                    duration,
                    true,
                    Some(msg.into()),
                    now,
                    out,
                );
                return;
            }
        }
        if let Some(ending) = self.ending_ms {
            if now >= ending + secs(l.settle_wait_secs) {
                // Twilio's final status never came: settle from our own measure.
                Self::log(
                    out,
                    LogLevel::Warn,
                    "no final status from Twilio; settling from our measure",
                );
                let duration = self.connected_secs(self.relay.ended_ms.unwrap_or(ending));
                self.finalize(CallStatus::Completed, duration, true, None, now, out);
                return;
            }
        }
        if let (Some(t), None) = (self.conv.hanging_up_ms, self.relay.ended_ms) {
            if now >= t + secs(l.hang_up_grace_secs) && !self.twilio_end_requested {
                // The relay never confirmed the goodbye: end the call through Twilio.
                self.end_at_twilio(out);
                self.ending_ms.get_or_insert(now);
            }
        }
        if let Some(llm) = &self.llm {
            if now >= llm.started_ms + u64::from(l.llm_total_ms) + LLM_BACKSTOP_MS {
                let stream = llm.stream;
                out.push(Effect::CancelLlm { stream });
                self.llm_failed(stream, "LLM stream never finished", now, out);
            }
        }
        let Some(connected) = self.relay.connected_ms.filter(|_| self.is_talking()) else {
            return;
        };
        if now >= connected + secs(l.max_call_secs) {
            self.hang_up("max_duration", Some(MAX_DURATION_GOODBYE), now, out);
            return;
        }
        let idle_from = self.conv.last_activity_ms.unwrap_or(connected);
        if now >= idle_from + secs(l.idle_timeout_secs) {
            if self.conv.checked_in {
                self.hang_up("idle", Some(IDLE_GOODBYE), now, out);
                return;
            }
            self.conv.checked_in = true;
            self.conv.last_activity_ms = Some(now);
            self.say_line(CHECK_IN_LINE, now, out);
        }
        let due = self
            .minute_retry_ms
            .unwrap_or_else(|| self.next_minute_due(connected));
        if !self.minute_pending && now >= due {
            self.minute_pending = true;
            self.minute_retry_ms = None;
            let minute = self.minutes_reserved + 1;
            out.push(Effect::Db(DbOp::ReserveMinute {
                key: format!("reserve:{}:{minute}", self.call_id),
                minute,
                amount: pricing::PER_MINUTE_CREDITS,
            }));
        }
    }

    fn end_at_twilio(&mut self, out: &mut Vec<Effect>) {
        if self.twilio_end_requested {
            return;
        }
        self.twilio_end_requested = true;
        if let Some(sid) = self.sid.clone() {
            out.push(Effect::TwilioHangUp {
                sid,
                purpose: HangUpPurpose::Complete,
            });
        }
    }

    // ---- the relay channel ----

    /// Queues a frame for the relay (kept for a resume) and sends it if one is bound.
    fn send(&mut self, msg: DoToRelay, out: &mut Vec<Effect>) {
        self.conv.out_seq += 1;
        let env = Envelope::new(self.conv.out_seq, msg);
        if !matches!(env.msg, DoToRelay::Ack { .. }) {
            self.conv.outbox.push(env.clone());
            if self.conv.outbox.len() > OUTBOX_MAX {
                self.conv.outbox.remove(0);
            }
        }
        if let Some(conn) = self.relay.active {
            out.push(Effect::ToRelay {
                conn,
                frames: vec![env],
            });
        }
    }

    fn replay(&self, conn: u32, after: u64, out: &mut Vec<Effect>) {
        let frames: Vec<_> = self
            .conv
            .outbox
            .iter()
            .filter(|f| f.seq > after)
            .cloned()
            .collect();
        if !frames.is_empty() {
            out.push(Effect::ToRelay { conn, frames });
        }
    }

    fn on_relay_open(&mut self, conn: u32, persona: PersonaBrief, now: u64, out: &mut Vec<Effect>) {
        self.relay.next_conn = self.relay.next_conn.max(conn + 1);
        if self.final_.is_some() {
            out.push(Effect::CloseRelay {
                conn,
                reason: "call already ended".into(),
            });
            return;
        }
        self.relay.open.push(conn);
        if self.conv.persona.is_none() {
            self.conv.persona = Some(persona);
        }
        let Some(p) = self.conv.persona.clone() else {
            return;
        };
        // A machine hears the voicemail line in place of the greeting.
        let greeting = if self.is_voicemail() {
            p.voicemail.clone()
        } else {
            p.greeting.clone()
        };
        if self.conv.lines.is_empty() {
            // The greeting is the persona's turn 0.
            self.conv.lines.push(Line {
                speaker: Speaker::Assistant,
                turn: Some(0),
                text: greeting.clone(),
                heard: None,
                interrupted: false,
                at_ms: now,
            });
            self.conv.next_turn = 1;
        }
        if self.relay.stream_sid.is_some() {
            return; // a resume: wait for its `ready` to say what it has
        }
        if self.relay.hello_seq.is_none() {
            let hello = DoToRelay::Hello {
                call_id: self.call_id.clone(),
                persona_name: p.name,
                voice_id: p.voice_id,
                voice_settings: p.voice_settings,
                stt: SttOptions::default(),
                greeting,
                max_duration_secs: self.limits.max_call_secs + RELAY_BACKSTOP_SECS,
                idle_timeout_secs: 2 * self.limits.idle_timeout_secs + RELAY_BACKSTOP_SECS,
                speculate: self.limits.speculate,
                speculate_after_ms: self
                    .limits
                    .speculate
                    .then_some(self.limits.speculate_after_ms),
                fast_barge_in: self.limits.fast_barge_in,
            };
            self.send(hello, out);
            self.relay.hello_seq = Some(self.conv.out_seq);
        }
        // Not bound yet: this socket gets the hello (and anything queued after it).
        let from = self.relay.hello_seq.unwrap_or(1).saturating_sub(1);
        self.replay(conn, from, out);
    }

    fn close(&mut self, conn: u32, reason: &str, out: &mut Vec<Effect>) {
        self.relay.open.retain(|c| *c != conn);
        out.push(Effect::CloseRelay {
            conn,
            reason: reason.into(),
        });
    }

    fn on_relay_closed(&mut self, conn: u32, now: u64) {
        self.relay.open.retain(|c| *c != conn);
        if self.relay.active == Some(conn) {
            self.relay.active = None;
            if self.final_.is_none() && self.relay.ended_ms.is_none() {
                self.relay.lost_ms = Some(now);
            }
        }
    }

    fn on_relay_frame(
        &mut self,
        conn: u32,
        frame: Envelope<RelayToDo>,
        now: u64,
        out: &mut Vec<Effect>,
    ) {
        if !self.relay.open.contains(&conn) {
            return;
        }
        if let RelayToDo::Ready {
            call_sid,
            stream_sid,
            resume_from,
        } = &frame.msg
        {
            if !self.on_ready(conn, call_sid, stream_sid, *resume_from, now, out) {
                return;
            }
        } else if self.relay.active != Some(conn) {
            return; // only the bound socket speaks for the call
        }
        let seq = frame.seq;
        let replay = seq != 0
            && seq <= self.conv.last_in_seq
            && !matches!(frame.msg, RelayToDo::Ready { .. });
        if !replay {
            self.conv.last_in_seq = self.conv.last_in_seq.max(seq);
            self.on_relay_msg(frame.msg, now, out);
        }
        let ack = DoToRelay::Ack {
            seq: self.conv.last_in_seq,
        };
        if self.relay.active == Some(conn) {
            self.send(ack, out);
        }
    }

    /// Binds the call to one media stream. False when `conn` was refused.
    fn on_ready(
        &mut self,
        conn: u32,
        call_sid: &str,
        stream_sid: &str,
        resume_from: Option<u64>,
        now: u64,
        out: &mut Vec<Effect>,
    ) -> bool {
        if self.final_.is_some() {
            self.close(conn, "call already ended", out);
            return false;
        }
        if self.sid.as_deref().is_some_and(|s| s != call_sid) {
            Self::log(
                out,
                LogLevel::Warn,
                format!("relay stream for call_sid={call_sid} refused"),
            );
            self.close(conn, "stream belongs to another call", out);
            return false;
        }
        match self.relay.stream_sid.clone() {
            None => {
                self.relay.stream_sid = Some(stream_sid.to_string());
                self.relay.active = Some(conn);
                self.relay.connected_ms = Some(now);
                self.conv.last_activity_ms = Some(now);
                if self.sid.is_none() {
                    self.sid = Some(call_sid.to_string());
                }
                self.minutes_reserved = self.minutes_reserved.max(1);
                self.apply_progress(CallStatus::InProgress, now, out);
                for other in self.relay.open.clone() {
                    if other != conn {
                        self.close(other, "another socket took the stream", out);
                    }
                }
                let from = resume_from.unwrap_or_else(|| self.relay.hello_seq.unwrap_or(0));
                self.replay(conn, from, out);
                if self.is_voicemail() {
                    // The voicemail line is the hello's greeting: once it has been heard,
                    // the relay hangs up.
                    self.hang_up("voicemail", None, now, out);
                }
                true
            }
            Some(bound) if bound == stream_sid => {
                if let Some(active) = self.relay.active.filter(|a| *a != conn) {
                    if self.relay.open.contains(&active) {
                        Self::log(
                            out,
                            LogLevel::Warn,
                            "second relay socket for a connected stream refused",
                        );
                        self.close(conn, "stream already connected", out);
                        return false;
                    }
                }
                // A resume: replay, in order, what the relay has not processed.
                self.relay.active = Some(conn);
                self.relay.lost_ms = None;
                let from = resume_from.unwrap_or(0);
                self.conv.outbox.retain(|f| f.seq > from);
                self.replay(conn, from, out);
                true
            }
            Some(_) => {
                Self::log(
                    out,
                    LogLevel::Warn,
                    format!("relay stream {stream_sid} refused: the call has another"),
                );
                self.close(conn, "the call has another stream", out);
                false
            }
        }
    }

    fn on_relay_msg(&mut self, msg: RelayToDo, now: u64, out: &mut Vec<Effect>) {
        match msg {
            RelayToDo::Ready { .. } | RelayToDo::Pong => {}
            RelayToDo::UserTurn { text, .. } => {
                self.conv.last_activity_ms = Some(now);
                self.conv.checked_in = false;
                let text = text.trim();
                // A machine's own greeting is not a turn.
                if text.is_empty() || self.final_.is_some() || self.is_voicemail() {
                    self.drop_speculation(out);
                    return;
                }
                self.conv.lines.push(Line {
                    speaker: Speaker::User,
                    turn: None,
                    text: text.to_string(),
                    heard: None,
                    interrupted: false,
                    at_ms: now,
                });
                if self.is_talking() && !self.promote_speculation(text, now, out) {
                    self.start_reply(now, out);
                }
            }
            RelayToDo::Speculate { text } => self.speculate(text.trim(), now, out),
            RelayToDo::DropSpeculation => self.drop_speculation(out),
            RelayToDo::Heard { turn, text } => {
                if let Some(line) = self.conv.lines.iter_mut().find(|l| l.turn == Some(turn)) {
                    line.heard = Some(text);
                    line.interrupted = false;
                }
            }
            RelayToDo::Interrupted { turn, heard_text } => {
                self.conv.last_activity_ms = Some(now);
                if let Some(line) = self.conv.lines.iter_mut().find(|l| l.turn == Some(turn)) {
                    line.heard = Some(heard_text);
                    line.interrupted = true;
                }
            }
            RelayToDo::Dtmf { digit } => {
                Self::log(out, LogLevel::Info, format!("dtmf digit={digit}"));
            }
            RelayToDo::Usage {
                stt_audio_secs,
                tts_chars,
                ..
            } => {
                self.conv.stt_audio_secs = stt_audio_secs;
                self.conv.tts_chars = tts_chars;
                if self.final_.is_some() {
                    // Usage can trail Twilio's final status: keep the cost lines current.
                    out.push(Effect::Db(DbOp::SaveConversation(Box::new(
                        self.record(now),
                    ))));
                }
            }
            RelayToDo::LatencyReport {
                turn,
                end_of_turn_to_first_audio_ms,
                ..
            } => self.latency(turn).1 = Some(end_of_turn_to_first_audio_ms),
            RelayToDo::Ended { reason } => {
                Self::log(
                    out,
                    LogLevel::Info,
                    format!("relay ended the stream reason={reason}"),
                );
                self.relay.ended_ms.get_or_insert(now);
                if self.final_.is_some() {
                    out.push(Effect::Db(DbOp::SaveConversation(Box::new(
                        self.record(now),
                    ))));
                    return;
                }
                if let Some(llm) = self.llm.take() {
                    out.push(Effect::CancelLlm { stream: llm.stream });
                }
                self.drop_speculation(out);
                self.ending_ms.get_or_insert(now);
                out.push(Effect::Db(DbOp::SaveConversation(Box::new(
                    self.record(now),
                ))));
                self.end_at_twilio(out);
            }
        }
    }

    /// The latency record of `turn`, created on first use.
    fn latency(&mut self, turn: u32) -> &mut (u32, Option<u32>, Option<u32>) {
        let lat = &mut self.conv.latencies;
        let i = match lat.iter().position(|l| l.0 == turn) {
            Some(i) => i,
            None => {
                lat.push((turn, None, None));
                lat.len() - 1
            }
        };
        &mut lat[i]
    }

    /// Says one whole persona line (check-in).
    fn say_line(&mut self, text: &str, now: u64, out: &mut Vec<Effect>) {
        let turn = self.conv.next_turn;
        self.conv.next_turn += 1;
        self.conv.lines.push(Line {
            speaker: Speaker::Assistant,
            turn: Some(turn),
            text: text.into(),
            heard: None,
            interrupted: false,
            at_ms: now,
        });
        self.send(
            DoToRelay::SayDelta {
                turn,
                text: text.into(),
            },
            out,
        );
        self.send(DoToRelay::SayEnd { turn }, out);
    }

    /// Hangs up from our side: the relay says the goodbye, then the call ends.
    /// Ends a live conversation: what the persona is saying is finished, then `goodbye`
    /// (when given) is said, and the relay hangs up once the last of it has been heard
    /// (bounded by its grace time).
    fn hang_up(&mut self, reason: &str, goodbye: Option<&str>, now: u64, out: &mut Vec<Effect>) {
        if !self.is_talking() {
            return;
        }
        self.conv.hanging_up_ms = Some(now);
        if let Some(llm) = self.llm.take() {
            out.push(Effect::CancelLlm { stream: llm.stream });
            self.close_turn(llm, now, out);
        }
        self.drop_speculation(out);
        if let Some(goodbye) = goodbye {
            let turn = self.conv.next_turn;
            self.conv.next_turn += 1;
            self.conv.lines.push(Line {
                speaker: Speaker::Assistant,
                turn: Some(turn),
                text: goodbye.into(),
                heard: None,
                interrupted: false,
                at_ms: now,
            });
        }
        Self::log(out, LogLevel::Info, format!("hanging up reason={reason}"));
        self.send(
            DoToRelay::HangUp {
                reason: reason.into(),
                goodbye: goodbye.map(Into::into),
            },
            out,
        );
    }

    // ---- the LLM ----

    /// A booked (or refused) callback: its result joins the tool round.
    fn on_callback(
        &mut self,
        tool_call_id: &str,
        outcome: Result<u64, String>,
        now: u64,
        out: &mut Vec<Effect>,
    ) {
        match &outcome {
            Ok(at_ms) => Self::log(
                out,
                LogLevel::Info,
                format!("callback booked at_ms={at_ms}"),
            ),
            Err(why) => Self::log(out, LogLevel::Warn, format!("callback refused: {why}")),
        }
        let zone = self.caller_zone();
        // What came of it stays with the call, for every later prompt to say, even when
        // the round below is gone.
        if matches!(&self.conv.callback, Some(tools::CallbackState::Booking { tool_call_id: id }) if id == tool_call_id)
        {
            self.conv.callback = Some(match &outcome {
                Ok(at_ms) => tools::CallbackState::Booked { at_ms: *at_ms },
                Err(why) => tools::CallbackState::Refused { why: why.clone() },
            });
        }
        let Some(round) = self.conv.tool_round.as_mut() else {
            return; // the call moved on (it ended, or the caller spoke): nothing to say
        };
        let Some(i) = round.calls.iter().position(|c| c.id == tool_call_id) else {
            return;
        };
        round.results[i] = Some(tools::callback_result(
            outcome.as_ref().map(|at| *at).map_err(String::as_str),
            zone.as_deref(),
        ));
        self.answer_tools(now, out);
    }

    /// Once every call of the tool round has its result, streams the reply that says
    /// what came of them.
    fn answer_tools(&mut self, now: u64, out: &mut Vec<Effect>) {
        let ready = self
            .conv
            .tool_round
            .as_ref()
            .is_some_and(|r| r.results.iter().all(Option::is_some));
        if !ready || !self.is_talking() || self.llm.is_some() {
            return;
        }
        if let Some(round) = self.conv.tool_round.take() {
            self.start_stream(Some(round), now, out);
        }
    }

    fn start_reply(&mut self, now: u64, out: &mut Vec<Effect>) {
        // The caller spoke: a tool round not yet answered is dropped with the old turn
        // (what came of a callback still reaches the prompt, through `conv.callback`).
        self.conv.tool_round = None;
        self.start_stream(None, now, out);
    }

    fn caller_zone(&self) -> Option<String> {
        self.conv
            .persona
            .as_ref()
            .and_then(|p| p.caller_zone.clone())
    }

    fn start_stream(&mut self, round: Option<ToolRound>, now: u64, out: &mut Vec<Effect>) {
        if let Some(old) = self.llm.take() {
            // The caller spoke again before the last reply finished: drop it.
            out.push(Effect::CancelLlm { stream: old.stream });
            self.close_turn(old, now, out);
        }
        let Some(mut messages) = self.prompt(self.history()) else {
            return;
        };
        // The reply that answers tool results cannot book again: rounds never chain.
        let answering = round.is_some();
        if let Some(round) = round {
            // The reply that made the calls carries them; each result answers its call.
            match messages.last_mut().filter(|m| m.role == "assistant") {
                Some(last) => last.tool_calls = round.calls.clone(),
                None => messages.push(prompt::ChatMessage {
                    tool_calls: round.calls.clone(),
                    ..prompt::ChatMessage::new("assistant", "")
                }),
            }
            for (call, result) in round.calls.iter().zip(round.results) {
                messages.push(prompt::ChatMessage {
                    tool_call_id: Some(call.id.clone()),
                    ..prompt::ChatMessage::new("tool", result.unwrap_or_default())
                });
            }
        }
        let turn = self.conv.next_turn;
        self.conv.next_turn += 1;
        let stream = self.conv.next_stream;
        self.conv.next_stream += 1;
        self.llm = Some(LlmTurn {
            stream,
            turn,
            started_ms: now,
            text: String::new(),
            first_token_ms: None,
            answering,
            lead_ms: 0,
        });
        out.push(Effect::StartLlm {
            stream,
            messages,
            tools: if answering {
                tools::Offer::EndCallOnly
            } else {
                tools::Offer::All
            },
            first_token_ms: self.limits.llm_first_token_ms,
            total_ms: self.limits.llm_total_ms,
        });
    }

    /// The conversation as the LLM is shown it: what the caller heard of each line.
    fn history(&self) -> Vec<(Speaker, String)> {
        self.conv
            .lines
            .iter()
            .map(|l| (l.speaker, l.heard.clone().unwrap_or_else(|| l.text.clone())))
            .collect()
    }

    /// The prompt for a reply to `history` (none without a persona).
    fn prompt(&self, history: Vec<(Speaker, String)>) -> Option<Vec<prompt::ChatMessage>> {
        let persona = self.conv.persona.as_ref()?;
        let system = match &self.conv.callback {
            Some(cb) => format!(
                "{}\n\n{}",
                persona.system_prompt,
                cb.prompt_note(persona.caller_zone.as_deref())
            ),
            None => persona.system_prompt.clone(),
        };
        Some(prompt::build_messages(
            &system,
            None,
            &history,
            PROMPT_BUDGET_TOKENS,
        ))
    }

    /// The caller paused on `text`: start the reply to it now, held unspoken until the
    /// turn is confirmed. Only between replies (nothing streaming, no tool round waiting),
    /// and only while discarded speculations have cost less than the call's cap.
    fn speculate(&mut self, text: &str, now: u64, out: &mut Vec<Effect>) {
        self.drop_speculation(out);
        let idle = self.llm.is_none() && self.conv.tool_round.is_none();
        let allowed = self.limits.speculate
            && self.is_talking()
            && !self.is_voicemail()
            && self.conv.speculation.wasted_tokens < SPECULATION_WASTE_CAP_TOKENS;
        if text.is_empty() || !idle || !allowed {
            return;
        }
        let mut history = self.history();
        history.push((Speaker::User, text.to_owned()));
        let Some(messages) = self.prompt(history) else {
            return;
        };
        let fingerprint = prompt_fingerprint(&messages);
        let prompt_estimate = messages
            .iter()
            .map(|m| prompt::estimate_tokens(&m.content) as u64)
            .sum();
        let stream = self.conv.next_stream;
        self.conv.next_stream += 1;
        self.conv.speculation.started += 1;
        self.spec = Some(Speculation {
            stream,
            text: text.to_owned(),
            started_ms: now,
            history: fingerprint,
            prompt_estimate,
            reply: String::new(),
            first_token_ms: None,
            done: None,
        });
        out.push(Effect::StartLlm {
            stream,
            messages,
            tools: tools::Offer::All,
            first_token_ms: self.limits.llm_first_token_ms,
            total_ms: self.limits.llm_total_ms,
        });
    }

    /// A speculation that will not be used: its stream is cancelled and what it cost is
    /// counted (into the call's LLM totals, which the cost breakdown bills).
    fn drop_speculation(&mut self, out: &mut Vec<Effect>) {
        if let Some(spec) = self.spec.take() {
            if spec.done.is_none() {
                out.push(Effect::CancelLlm {
                    stream: spec.stream,
                });
            }
            self.count_discarded(&spec);
        }
    }

    /// A discarded speculation's tokens: exact when its stream finished, estimated
    /// otherwise; billed into the call's LLM totals.
    fn count_discarded(&mut self, spec: &Speculation) {
        let (prompt_tokens, completion_tokens) = match &spec.done {
            Some(d) => (d.prompt_tokens, d.completion_tokens),
            None => (
                spec.prompt_estimate,
                prompt::estimate_tokens(&spec.reply) as u64,
            ),
        };
        self.conv.llm_prompt_tokens += prompt_tokens;
        self.conv.llm_completion_tokens += completion_tokens;
        self.conv.speculation.wasted_tokens += prompt_tokens + completion_tokens;
    }

    /// The caller's turn (already in the transcript) is confirmed: if the speculation
    /// answered exactly this conversation, it becomes the turn's reply, and what it has
    /// produced so far is spoken at once. False when there was none to use (it is
    /// discarded if it answered something else).
    fn promote_speculation(&mut self, text: &str, now: u64, out: &mut Vec<Effect>) -> bool {
        let usable = self.spec.as_ref().is_some_and(|s| {
            s.text == text
                && self.llm.is_none()
                && self.conv.tool_round.is_none()
                && self
                    .prompt(self.history())
                    .is_some_and(|m| prompt_fingerprint(&m) == s.history)
        });
        if !usable {
            self.drop_speculation(out);
            return false;
        }
        let Some(spec) = self.spec.take() else {
            return false;
        };
        self.conv.speculation.used += 1;
        let turn = self.conv.next_turn;
        self.conv.next_turn += 1;
        let stream = spec.stream;
        self.llm = Some(LlmTurn {
            stream,
            turn,
            started_ms: spec.started_ms,
            text: String::new(),
            first_token_ms: None,
            answering: false,
            lead_ms: u32::try_from(now.saturating_sub(spec.started_ms)).unwrap_or(u32::MAX),
        });
        if let Some(since_start_ms) = spec.first_token_ms {
            let text = spec.reply;
            self.on_llm(
                LlmEvent::Delta {
                    stream,
                    text,
                    since_start_ms,
                },
                now,
                out,
            );
        }
        if let Some(d) = spec.done {
            self.on_llm(
                LlmEvent::Done {
                    stream,
                    prompt_tokens: d.prompt_tokens,
                    completion_tokens: d.completion_tokens,
                    tool_calls: d.tool_calls,
                },
                now,
                out,
            );
        }
        true
    }

    /// A speculative stream's event: held, never sent to the relay.
    fn on_speculation_llm(&mut self, e: LlmEvent) {
        let Some(spec) = self.spec.as_mut() else {
            return;
        };
        match e {
            LlmEvent::Delta {
                text,
                since_start_ms,
                ..
            } => {
                spec.first_token_ms.get_or_insert(since_start_ms);
                spec.reply.push_str(&text);
            }
            LlmEvent::Done {
                prompt_tokens,
                completion_tokens,
                tool_calls,
                ..
            } => {
                spec.done = Some(SpeculationDone {
                    prompt_tokens,
                    completion_tokens,
                    tool_calls,
                });
            }
            // Counted as discarded (its stream is over: nothing to cancel); the
            // confirmed turn starts a stream of its own.
            LlmEvent::Failed { .. } => {
                if let Some(spec) = self.spec.take() {
                    self.count_discarded(&spec);
                }
            }
        }
    }

    /// Ends a reply turn with what it produced (none: nothing to record).
    fn close_turn(&mut self, llm: LlmTurn, now: u64, out: &mut Vec<Effect>) {
        self.send(DoToRelay::SayEnd { turn: llm.turn }, out);
        if !llm.text.trim().is_empty() {
            self.conv.lines.push(Line {
                speaker: Speaker::Assistant,
                turn: Some(llm.turn),
                text: llm.text,
                heard: None,
                interrupted: false,
                at_ms: now,
            });
        }
    }

    fn on_llm(&mut self, e: LlmEvent, now: u64, out: &mut Vec<Effect>) {
        let stream = match &e {
            LlmEvent::Delta { stream, .. }
            | LlmEvent::Done { stream, .. }
            | LlmEvent::Failed { stream, .. } => *stream,
        };
        if self.spec.as_ref().is_some_and(|s| s.stream == stream) {
            return self.on_speculation_llm(e);
        }
        match e {
            LlmEvent::Delta {
                stream,
                text,
                since_start_ms,
            } => {
                let Some(llm) = self.llm.as_mut().filter(|l| l.stream == stream) else {
                    return;
                };
                llm.text.push_str(&text);
                let turn = llm.turn;
                if llm.first_token_ms.is_none() {
                    // A promoted speculation's first token may have come before the end
                    // of turn: then the caller waited 0 ms for it.
                    let waited = since_start_ms.saturating_sub(llm.lead_ms);
                    llm.first_token_ms = Some(waited);
                    self.latency(turn).2 = Some(waited);
                }
                self.send(DoToRelay::SayDelta { turn, text }, out);
            }
            LlmEvent::Done {
                stream,
                prompt_tokens,
                completion_tokens,
                tool_calls,
            } => {
                if self.active_stream() != Some(stream) {
                    return;
                }
                self.conv.llm_prompt_tokens += prompt_tokens;
                self.conv.llm_completion_tokens += completion_tokens;
                let offer = match self.llm.as_ref().is_some_and(|l| l.answering) {
                    true => tools::Offer::EndCallOnly,
                    false => tools::Offer::All,
                };
                // A tool the reply was not offered is not acted on (nor answered).
                let (tool_calls, unoffered): (Vec<_>, Vec<_>) =
                    tool_calls.into_iter().partition(|c| offer.allows(&c.name));
                for call in unoffered {
                    Self::log(
                        out,
                        LogLevel::Warn,
                        format!("tool call {:?} was not offered; ignored", call.name),
                    );
                }
                self.on_reply_done(stream, tool_calls, now, out);
            }
            LlmEvent::Failed {
                stream,
                timed_out,
                message,
            } => {
                if self.active_stream() != Some(stream) {
                    return;
                }
                let what = if timed_out {
                    "LLM timed out"
                } else {
                    "LLM failed"
                };
                self.llm_failed(stream, &format!("{what}: {message}"), now, out);
            }
        }
    }

    /// A reply finished, with the tool calls it made: the persona may end the call, book
    /// its callback, or get what its calls came to back in one more reply.
    fn on_reply_done(
        &mut self,
        stream: u32,
        tool_calls: Vec<tools::ToolCall>,
        now: u64,
        out: &mut Vec<Effect>,
    ) {
        let zone = self.caller_zone();
        let mut end = None;
        let mut results = Vec::new();
        // Carried out once the turn's own effects are out (its SayEnd first).
        let mut booking = None;
        for call in &tool_calls {
            let result = match tools::parse(call, now) {
                Ok(tools::Tool::EndCall { reason }) => {
                    end = Some(reason);
                    Some(tools::error_result("the call is ending"))
                }
                Ok(tools::Tool::ScheduleCallback { at_ms }) => {
                    let busy = self
                        .conv
                        .callback
                        .as_ref()
                        .and_then(|cb| cb.refuses_another(zone.as_deref()));
                    match busy {
                        Some(why) => Some(tools::error_result(&why)),
                        None => {
                            self.conv.callback = Some(tools::CallbackState::Booking {
                                tool_call_id: call.id.clone(),
                            });
                            booking = Some(Effect::ScheduleCallback {
                                tool_call_id: call.id.clone(),
                                at_ms,
                            });
                            None
                        }
                    }
                }
                // The model's mistake: it gets the reason as the tool's result.
                Err(why) => {
                    Self::log(out, LogLevel::Warn, format!("tool call refused: {why}"));
                    Some(tools::error_result(&why))
                }
            };
            results.push(result);
        }
        let empty = self.llm.as_ref().is_none_or(|l| l.text.trim().is_empty());
        match end {
            // The persona ended the call: its goodbye is this reply (or, when it said
            // nothing, ours), and the line drops once that has been heard. A callback in
            // the same reply is still booked; there is no one left to tell what came of it.
            Some(reason) => {
                Self::log(
                    out,
                    LogLevel::Info,
                    format!(
                        "the persona ends the call reason={}",
                        reason.as_deref().unwrap_or("-")
                    ),
                );
                let goodbye = empty.then_some(PERSONA_GOODBYE);
                self.hang_up("persona_ended", goodbye, now, out);
            }
            // Calls that only failed, beside a whole spoken reply: the reply stands, and
            // the mistakes are logged; no extra turn.
            None if booking.is_none() && !empty => {
                if let Some(llm) = self.llm.take() {
                    self.close_turn(llm, now, out);
                }
            }
            // Tool calls to answer: the turn ends as spoken, and the results go back to
            // the LLM (once all are in) so the persona says what came of them.
            None if !tool_calls.is_empty() => {
                if let Some(llm) = self.llm.take() {
                    self.close_turn(llm, now, out);
                }
                self.conv.tool_round = Some(ToolRound {
                    calls: tool_calls,
                    results,
                });
                self.answer_tools(now, out);
            }
            None if empty => self.llm_failed(stream, "LLM answered nothing", now, out),
            None => {
                if let Some(llm) = self.llm.take() {
                    self.close_turn(llm, now, out);
                }
            }
        }
        out.extend(booking);
    }

    /// Never leave the caller in silence: finish the turn with the fallback line.
    fn llm_failed(&mut self, stream: u32, why: &str, now: u64, out: &mut Vec<Effect>) {
        let Some(mut llm) = self.llm.take().filter(|l| l.stream == stream) else {
            return;
        };
        Self::log(out, LogLevel::Error, format!("{why} turn={}", llm.turn));
        let line = if llm.text.trim().is_empty() {
            FALLBACK_LINE.to_string()
        } else {
            format!(" {FALLBACK_LINE}")
        };
        llm.text.push_str(&line);
        self.send(
            DoToRelay::SayDelta {
                turn: llm.turn,
                text: line,
            },
            out,
        );
        self.close_turn(llm, now, out);
    }
}

fn default_reason(status: CallStatus) -> String {
    match status {
        CallStatus::Busy => "The line was busy.",
        CallStatus::NoAnswer => "Nobody answered.",
        CallStatus::Canceled => "Canceled.",
        _ => "The call did not connect.",
    }
    .to_string()
}

/// Consecutive sends to the same socket become one effect (one storage round, one batch).
fn merge_relay_sends(out: &mut Vec<Effect>) {
    let mut merged: Vec<Effect> = Vec::with_capacity(out.len());
    for e in out.drain(..) {
        if let (
            Some(Effect::ToRelay {
                conn: last,
                frames: acc,
            }),
            Effect::ToRelay { conn, frames },
        ) = (merged.last_mut(), &e)
        {
            if *last == *conn {
                acc.extend(frames.iter().cloned());
                continue;
            }
        }
        merged.push(e);
    }
    *out = merged;
}

/// Identifies a prompt (system prompt with its callback note, and the conversation), to
/// tell whether a speculation answered the same one. `DefaultHasher::new()` is the same
/// hasher in every instance of one build, which is all a call's state ever meets (after a
/// deploy, a mismatch only drops a speculation). 52 bits, so the DO's storage (JavaScript
/// numbers) holds it exactly.
fn prompt_fingerprint(messages: &[prompt::ChatMessage]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for m in messages {
        m.role.hash(&mut h);
        m.content.hash(&mut h);
    }
    h.finish() >> 12
}
