//! The fake Twilio's side of a bidirectional Media Stream (`<Connect><Stream>`,
//! PROTOCOLS.md §1): Twilio is the WebSocket *client* and opens the connection to the
//! server named in the TwiML.
//!
//! Owns the stream's wire messages (`connected`, `start`, paced inbound `media`, `dtmf`,
//! `mark` echoes, `stop`), the outbound playback queue ([`Playout`], a pure state
//! machine) and the pacing loop that feeds the callee simulator one 20 ms frame at a time.
//! It must not decide what the call does next: it reports how the stream ended and
//! `call.rs` carries on with the TwiML.
//!
//! Documented choices:
//! - Real Twilio only connects to `wss://`. The fake has no TLS and can only reach
//!   loopback, so it accepts `ws://` on loopback hosts only and refuses `wss://` and remote
//!   hosts with a 31920 notice, as it does for any handshake failure.
//! - A stream URL with a query string is refused (31920): Twilio documents query strings
//!   as unsupported, and the strict reading catches a client that relies on them.
//! - Messages from the server without the right `streamSid`, with an unknown `event`,
//!   bad JSON or bad base64, and binary frames, raise warning 31950 once per stream and
//!   are otherwise ignored.
//! - When the server closes first, no `stop` is sent (UNCONFIRMED at Twilio; a client must
//!   not wait for one).
//! - Fault latency and jitter delay each message without slowing the 20 ms cadence (a
//!   pipeline delay, in order); `drop_after_*` cut the TCP connection with no close frame.
//! - `Config::media_one_way_delay` is a delay line both ways: outbound it adds to the
//!   fault latency; inbound a reader task stamps each message on arrival and the stream
//!   handles it that long later, so the spacing of the server's messages is kept.

use std::collections::VecDeque;

use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use super::call::{next_command, Session, VerbEnd};
use super::twiml::StreamNoun;
use super::{new_sid, ClearRecord, MarkEcho, StreamEnd, StreamRecord, UtteranceTiming};
use crate::fakes::faults::FaultSwitch;
use crate::sim::FRAME_BYTES;

/// Stream handshake failure ("Stream - WebSocket - Handshake Error").
const HANDSHAKE_ERROR: u32 = 31920;
/// Malformed message from the server.
const MALFORMED_MESSAGE: u32 = 31950;
/// Too much outbound audio buffered.
const BUFFER_FULL: u32 = 31931;
/// About ten minutes of μ-law audio: beyond it Twilio stops accepting media.
const MAX_BUFFERED_BYTES: usize = 10 * 60 * 8000;
/// How long the fake waits for the handshake and for a closing writer.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Outbound audio waiting to be "played" to the callee, with the marks between it.
///
/// Pure and clock-free: [`Playout::play`] is told how many bytes one frame plays.
#[derive(Debug, Default)]
pub struct Playout {
    queue: VecDeque<Queued>,
    buffered: usize,
}

#[derive(Debug)]
enum Queued {
    /// Audio and how much of it was already played.
    Audio(Vec<u8>, usize),
    Mark(String),
}

impl Playout {
    pub fn new() -> Self {
        Self::default()
    }

    /// Audio bytes queued and not yet played.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// Queues audio after everything already queued.
    pub fn push_audio(&mut self, audio: Vec<u8>) {
        if audio.is_empty() {
            return;
        }
        self.buffered += audio.len();
        self.queue.push_back(Queued::Audio(audio, 0));
    }

    /// Queues a mark; returns it at once when no audio is pending before it (it has,
    /// trivially, all been played).
    pub fn push_mark(&mut self, name: String) -> Option<String> {
        if self.queue.is_empty() {
            return Some(name);
        }
        self.queue.push_back(Queued::Mark(name));
        None
    }

    /// Plays up to `max` bytes; returns them and the marks whose preceding audio is now
    /// fully played, in order.
    pub fn play(&mut self, max: usize) -> (Vec<u8>, Vec<String>) {
        let mut out = Vec::with_capacity(max);
        let mut marks = Vec::new();
        loop {
            match self.queue.front_mut() {
                Some(Queued::Mark(_)) => {
                    if let Some(Queued::Mark(name)) = self.queue.pop_front() {
                        marks.push(name);
                    }
                }
                Some(Queued::Audio(audio, pos)) => {
                    if out.len() == max {
                        break;
                    }
                    let take = (audio.len() - *pos).min(max - out.len());
                    out.extend_from_slice(&audio[*pos..*pos + take]);
                    *pos += take;
                    self.buffered -= take;
                    if *pos == audio.len() {
                        self.queue.pop_front();
                    }
                }
                None => break,
            }
        }
        (out, marks)
    }

    /// Drops all queued audio; returns how many bytes were dropped and every pending
    /// mark, in order (Twilio sends them all back at once).
    pub fn clear(&mut self) -> (usize, Vec<String>) {
        let dropped = self.buffered;
        self.buffered = 0;
        let marks = self
            .queue
            .drain(..)
            .filter_map(|q| match q {
                Queued::Mark(name) => Some(name),
                Queued::Audio(..) => None,
            })
            .collect();
        (dropped, marks)
    }
}

/// Why the writer stopped.
enum WriterEnd {
    Closed,
    /// `drop_after_messages` spent: the connection is cut.
    Dropped,
    Failed(String),
}

enum Outgoing {
    Text(String, Instant),
    Close,
}

/// Runs one `<Connect><Stream>` until it ends; `base_url` is the TwiML document's URL,
/// against which a relative stream URL resolves.
pub(super) async fn run_stream(
    session: &mut Session<'_>,
    noun: StreamNoun,
    base_url: Option<&str>,
) -> VerbEnd {
    let stream_sid = new_sid("MZ");
    let url = match resolve(&noun.url, base_url) {
        Ok(url) => url,
        Err(message) => {
            fail_handshake(
                session,
                &noun,
                &stream_sid,
                noun.url.clone(),
                String::new(),
                message,
            );
            return VerbEnd::Next;
        }
    };
    // The signature covers the stream URL with no parameters (PROTOCOLS.md §1).
    let signature =
        cmb_core::twilio_sig::compute_signature(&session.shared.cfg.auth_token, &url, &[]);
    let ws = match connect(&url, &signature).await {
        Ok(ws) => ws,
        Err(message) => {
            fail_handshake(session, &noun, &stream_sid, url, signature, message);
            return VerbEnd::Next;
        }
    };
    tracing::info!(fake = "twilio", call_sid = %session.sid, stream_sid = %stream_sid, %url, "media stream connected");
    let index = push_stream(
        session,
        StreamRecord {
            url,
            stream_sid: stream_sid.clone(),
            signature,
            custom_parameters: noun.parameters.clone(),
            ..StreamRecord::default()
        },
    );
    stream_callback(session, &noun, &stream_sid, "stream-started", None);
    let mut stream = ActiveStream {
        index,
        stream_sid,
        sequence: 0,
        chunk: 0,
        warned: Vec::new(),
    };
    let end = stream.run(session, ws, &noun).await;
    let end_kind = match &end {
        (StreamEnd::Stopped, _) => "stopped by Twilio",
        (StreamEnd::ServerClosed, _) => "closed by the server",
        (StreamEnd::Dropped, _) => "dropped by a fault",
        (StreamEnd::HandshakeFailed(_), _) => "handshake failed",
    };
    tracing::info!(fake = "twilio", call_sid = %session.sid, stream_sid = %stream.stream_sid, "media stream {end_kind}");
    stream_callback(session, &noun, &stream.stream_sid, "stream-stopped", None);
    let (record_end, verb_end) = end;
    session
        .shared
        .update_call(&session.sid, |c| c.streams[index].end = Some(record_end));
    verb_end
}

/// Resolves and checks the stream URL (see the module docs for what is refused).
fn resolve(raw: &str, base: Option<&str>) -> Result<String, String> {
    let absolute = url::Url::parse(raw);
    let parsed = match (&absolute, base) {
        (Ok(u), _) => u.clone(),
        (Err(_), Some(base)) => {
            let joined = url::Url::parse(base)
                .and_then(|b| b.join(raw))
                .map_err(|e| format!("cannot resolve stream url {raw:?} against {base}: {e}"))?;
            let mut joined = joined;
            let scheme = if joined.scheme() == "https" {
                "wss"
            } else {
                "ws"
            };
            joined
                .set_scheme(scheme)
                .map_err(|()| format!("cannot use {scheme} for {joined}"))?;
            joined
        }
        (Err(e), None) => return Err(format!("stream url {raw:?} is not an absolute URL: {e}")),
    };
    if parsed.query().is_some() {
        return Err(format!(
            "stream url {raw:?} has a query string, which Twilio does not support: use <Parameter>"
        ));
    }
    match parsed.scheme() {
        "ws" => {}
        "wss" => {
            return Err(format!(
                "stream url {raw:?} is wss://, which the fake cannot reach (no TLS on loopback): use ws:// on 127.0.0.1 in tests"
            ))
        }
        other => return Err(format!("stream url {raw:?} has scheme {other}; Twilio requires wss://")),
    }
    let loopback = match parsed.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if !loopback {
        return Err(format!(
            "stream url {raw:?}: ws:// is only accepted on loopback (real Twilio requires wss://)"
        ));
    }
    // Sign what the TwiML said when it was absolute: that is the URL Twilio requests.
    Ok(match absolute {
        Ok(_) => raw.to_owned(),
        Err(_) => parsed.to_string(),
    })
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str, signature: &str) -> Result<Ws, String> {
    let mut request = url
        .into_client_request()
        .map_err(|e| format!("invalid stream url {url}: {e}"))?;
    let value = signature
        .parse()
        .map_err(|e| format!("signature header: {e}"))?;
    request.headers_mut().insert("X-Twilio-Signature", value);
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(
            request, None,
            // A media sender writes each small message as it comes (TCP_NODELAY): with
            // Nagle, `start` would wait behind `connected` for the relay's delayed ACK
            // (up to 40 ms on Linux), which is this fake's artefact, not the relay's.
            true,
        ),
    )
    .await
    {
        Err(_) => Err(format!("connecting to {url} timed out")),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => Err(format!(
            "{url} refused the WebSocket upgrade with HTTP {}",
            response.status()
        )),
        Ok(Err(e)) => Err(format!("connecting to {url}: {e}")),
        Ok(Ok((ws, _))) => Ok(ws),
    }
}

fn push_stream(session: &Session<'_>, record: StreamRecord) -> usize {
    let mut index = 0;
    session.shared.update_call(&session.sid, |c| {
        index = c.streams.len();
        c.streams.push(record);
    });
    index
}

fn fail_handshake(
    session: &Session<'_>,
    noun: &StreamNoun,
    stream_sid: &str,
    url: String,
    signature: String,
    message: String,
) {
    session.notice(HANDSHAKE_ERROR, message.clone());
    push_stream(
        session,
        StreamRecord {
            url,
            stream_sid: stream_sid.to_owned(),
            signature,
            custom_parameters: noun.parameters.clone(),
            end: Some(StreamEnd::HandshakeFailed(message.clone())),
            ..StreamRecord::default()
        },
    );
    stream_callback(session, noun, stream_sid, "stream-error", Some(&message));
}

/// Sends the `<Stream statusCallback>` webhook, if the TwiML asked for one.
fn stream_callback(
    session: &Session<'_>,
    noun: &StreamNoun,
    stream_sid: &str,
    event: &str,
    error: Option<&str>,
) {
    let Some(url) = noun.status_callback.clone() else {
        return;
    };
    let p = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    // UNCONFIRMED (PROTOCOLS.md §1): the Timestamp format; RFC 3339 here.
    let timestamp = OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut params = vec![
        p("AccountSid", &session.shared.cfg.account_sid),
        p("CallSid", &session.sid),
        p("StreamSid", stream_sid),
        p("StreamName", noun.name.as_deref().unwrap_or(stream_sid)),
        p("StreamEvent", event),
        p("Timestamp", &timestamp),
    ];
    if let Some(error) = error {
        params.push(p("StreamError", error));
    }
    let method = noun
        .status_callback_method
        .clone()
        .unwrap_or_else(|| "POST".to_owned());
    session.callbacks.stream(url, method, params);
}

/// A connected stream's counters.
struct ActiveStream {
    index: usize,
    stream_sid: String,
    /// Last `sequenceNumber` used (`start` is 1).
    sequence: u64,
    /// Last inbound media `chunk` (the first is 1).
    chunk: u64,
    warned: Vec<u32>,
}

impl ActiveStream {
    fn next_sequence(&mut self) -> String {
        self.sequence += 1;
        self.sequence.to_string()
    }

    async fn run(
        &mut self,
        session: &mut Session<'_>,
        ws: Ws,
        noun: &StreamNoun,
    ) -> (StreamEnd, VerbEnd) {
        let (sink, source) = ws.split();
        let one_way = session.shared.cfg.media_one_way_delay;
        // Dropped with this function, so a dropped stream really closes the socket.
        let (mut source, _reader) = delay_line(source, one_way);
        let (out, out_rx) = mpsc::unbounded_channel();
        let faults = session.shared.faults.clone();
        let mut drop_timer = faults.connection().drop_timer();
        let mut writer = tokio::spawn(write_loop(sink, out_rx, faults, one_way));
        let mut playout = Playout::new();

        let custom: serde_json::Map<String, Value> = noun
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        self.send(
            session,
            &out,
            json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
        );
        let start = json!({
            "event": "start",
            "sequenceNumber": self.next_sequence(),
            "streamSid": self.stream_sid,
            "start": {
                "accountSid": session.shared.cfg.account_sid,
                "streamSid": self.stream_sid,
                "callSid": session.sid,
                "tracks": ["inbound"],
                "customParameters": custom,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        });
        self.send(session, &out, start);
        let start_sent = Instant::now();
        session.shared.update_call(&session.sid, |c| {
            c.streams[self.index].timing.start_sent = Some(start_sent);
        });

        loop {
            tokio::select! {
                biased;
                command = next_command(session.commands) => {
                    if let Some(end) = session.on_command(command) {
                        self.stop(session, &out, writer).await;
                        return (StreamEnd::Stopped, end);
                    }
                }
                () = drop_timer.wait() => {
                    writer.abort();
                    return (StreamEnd::Dropped, VerbEnd::Next);
                }
                ended = &mut writer => {
                    let end = match ended {
                        Ok(WriterEnd::Dropped) => StreamEnd::Dropped,
                        Ok(WriterEnd::Failed(error)) => {
                            tracing::debug!(fake = "twilio", call_sid = %session.sid, %error, "stream send failed: server gone");
                            StreamEnd::ServerClosed
                        }
                        Ok(WriterEnd::Closed) | Err(_) => StreamEnd::ServerClosed,
                    };
                    return (end, VerbEnd::Next);
                }
                now = session.clock.tick() => {
                    let (played, marks) = playout.play(FRAME_BYTES);
                    for name in marks {
                        self.echo_mark(session, &out, name, false);
                    }
                    let (frame, events) = session.sim_tick_events(now, &played);
                    self.chunk += 1;
                    let media = json!({
                        "event": "media",
                        "sequenceNumber": self.next_sequence(),
                        "streamSid": self.stream_sid,
                        "media": {
                            "track": "inbound",
                            "chunk": self.chunk.to_string(),
                            "timestamp": ((self.chunk - 1) * crate::sim::FRAME_MS).to_string(),
                            "payload": base64::engine::general_purpose::STANDARD.encode(frame.audio),
                        },
                    });
                    self.send(session, &out, media);
                    let sent_at = Instant::now();
                    let played_len = played.len() as u64;
                    session.shared.update_call(&session.sid, |c| {
                        let s = &mut c.streams[self.index];
                        s.media_frames_sent += 1;
                        s.bytes_played += played_len;
                        for event in events {
                            match event {
                                crate::sim::SimEvent::StartedSpeaking { text, .. } => {
                                    s.timing.utterances.push(UtteranceTiming {
                                        text,
                                        started: sent_at,
                                        ended: None,
                                        first_media_after: None,
                                    });
                                }
                                crate::sim::SimEvent::StoppedSpeaking { .. } => {
                                    if let Some(u) = s.timing.utterances.last_mut() {
                                        u.ended = Some(sent_at);
                                    }
                                }
                                _ => {}
                            }
                        }
                    });
                    if let Some(digit) = frame.dtmf {
                        let dtmf = json!({
                            "event": "dtmf",
                            "sequenceNumber": self.next_sequence(),
                            "streamSid": self.stream_sid,
                            "dtmf": {"track": "inbound_track", "digit": digit.to_string()},
                        });
                        self.send(session, &out, dtmf);
                        session.shared.update_call(&session.sid, |c| c.streams[self.index].dtmf_sent.push(digit));
                    }
                    if frame.hang_up {
                        self.stop(session, &out, writer).await;
                        return (StreamEnd::Stopped, VerbEnd::Hangup);
                    }
                }
                message = source.next() => match message {
                    Some(Ok(Message::Text(text))) => self.on_text(session, &out, &mut playout, text.as_str()),
                    Some(Ok(Message::Binary(_))) => {
                        self.warn_once(session, MALFORMED_MESSAGE, "binary frame (media must be JSON text frames)");
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        // Answer the close handshake, then carry on with the TwiML.
                        let _ = out.send(Outgoing::Close);
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut writer).await;
                        return (StreamEnd::ServerClosed, VerbEnd::Next);
                    }
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    /// Sends `stop`, closes the socket and waits for the writer to flush.
    async fn stop(
        &mut self,
        session: &Session<'_>,
        out: &mpsc::UnboundedSender<Outgoing>,
        writer: tokio::task::JoinHandle<WriterEnd>,
    ) {
        let stop = json!({
            "event": "stop",
            "sequenceNumber": self.next_sequence(),
            "streamSid": self.stream_sid,
            "stop": {"accountSid": session.shared.cfg.account_sid, "callSid": session.sid},
        });
        self.send(session, out, stop);
        let _ = out.send(Outgoing::Close);
        if tokio::time::timeout(CLOSE_TIMEOUT, writer).await.is_err() {
            tracing::warn!(fake = "twilio", call_sid = %session.sid, "stream writer did not close in time");
        }
    }

    fn send(&self, session: &Session<'_>, out: &mpsc::UnboundedSender<Outgoing>, message: Value) {
        if out
            .send(Outgoing::Text(message.to_string(), Instant::now()))
            .is_ok()
        {
            session
                .shared
                .update_call(&session.sid, |c| c.streams[self.index].messages_sent += 1);
        }
    }

    fn echo_mark(
        &mut self,
        session: &Session<'_>,
        out: &mpsc::UnboundedSender<Outgoing>,
        name: String,
        by_clear: bool,
    ) {
        let mark = json!({
            "event": "mark",
            "sequenceNumber": self.next_sequence(),
            "streamSid": self.stream_sid,
            "mark": {"name": name},
        });
        self.send(session, out, mark);
        let at_ms = self.chunk * crate::sim::FRAME_MS;
        session.shared.update_call(&session.sid, |c| {
            c.streams[self.index].marks_echoed.push(MarkEcho {
                name,
                at_ms,
                by_clear,
            });
        });
    }

    fn warn_once(&mut self, session: &Session<'_>, code: u32, detail: &str) {
        if self.warned.contains(&code) {
            return;
        }
        self.warned.push(code);
        session.notice(code, format!("stream {}: {detail}", self.stream_sid));
        session
            .shared
            .update_call(&session.sid, |c| c.streams[self.index].warnings.push(code));
    }

    fn on_text(
        &mut self,
        session: &Session<'_>,
        out: &mpsc::UnboundedSender<Outgoing>,
        playout: &mut Playout,
        text: &str,
    ) {
        let Ok(message) = serde_json::from_str::<Value>(text) else {
            self.warn_once(session, MALFORMED_MESSAGE, "text frame is not JSON");
            return;
        };
        let event = message.get("event").and_then(Value::as_str).unwrap_or("");
        if !matches!(event, "media" | "mark" | "clear") {
            self.warn_once(
                session,
                MALFORMED_MESSAGE,
                &format!("unknown event {event:?}"),
            );
            return;
        }
        if message.get("streamSid").and_then(Value::as_str) != Some(self.stream_sid.as_str()) {
            self.warn_once(
                session,
                MALFORMED_MESSAGE,
                &format!("{event} without this stream's streamSid"),
            );
            return;
        }
        match event {
            "media" => {
                let payload = message.pointer("/media/payload").and_then(Value::as_str);
                let Some(audio) =
                    payload.and_then(|p| base64::engine::general_purpose::STANDARD.decode(p).ok())
                else {
                    self.warn_once(session, MALFORMED_MESSAGE, "media without a base64 payload");
                    return;
                };
                let len = audio.len() as u64;
                let arrived = Instant::now();
                if playout.buffered_bytes() + audio.len() > MAX_BUFFERED_BYTES {
                    self.warn_once(
                        session,
                        BUFFER_FULL,
                        "more than 10 minutes of audio buffered; media dropped",
                    );
                } else {
                    playout.push_audio(audio);
                }
                session.shared.update_call(&session.sid, |c| {
                    let s = &mut c.streams[self.index];
                    s.media_received += 1;
                    s.bytes_received += len;
                    s.timing.first_media.get_or_insert(arrived);
                    if let Some(u) = s.timing.utterances.last_mut() {
                        if u.ended.is_some() && u.first_media_after.is_none() {
                            u.first_media_after = Some(arrived);
                        }
                    }
                });
            }
            "mark" => {
                let Some(name) = message.pointer("/mark/name").and_then(Value::as_str) else {
                    self.warn_once(session, MALFORMED_MESSAGE, "mark without mark.name");
                    return;
                };
                let name = name.to_owned();
                session.shared.update_call(&session.sid, |c| {
                    c.streams[self.index].marks_received.push(name.clone())
                });
                if let Some(done) = playout.push_mark(name) {
                    self.echo_mark(session, out, done, false);
                }
            }
            _ => {
                let (dropped, marks) = playout.clear();
                let at_ms = self.chunk * crate::sim::FRAME_MS;
                let arrived = Instant::now();
                session.shared.update_call(&session.sid, |c| {
                    c.streams[self.index].timing.clears.push(arrived);
                    c.streams[self.index].clears.push(ClearRecord {
                        at_ms,
                        dropped_bytes: dropped as u64,
                        marks_returned: marks.clone(),
                    });
                });
                for name in marks {
                    self.echo_mark(session, out, name, true);
                }
            }
        }
    }
}

/// What the stream reads from the server.
type Incoming = Result<Message, tokio_tungstenite::tungstenite::Error>;

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The server's messages, each handed over `delay` after it arrived (the source itself
/// when `delay` is zero). A reader task stamps arrivals, so the wait never holds up the
/// reading of the next message and the spacing is kept.
fn delay_line(
    mut source: futures::stream::SplitStream<Ws>,
    delay: std::time::Duration,
) -> (
    futures::stream::BoxStream<'static, Incoming>,
    Option<AbortOnDrop>,
) {
    if delay.is_zero() {
        return (source.boxed(), None);
    }
    let (tx, rx) = mpsc::unbounded_channel::<(Incoming, Instant)>();
    let reader = tokio::spawn(async move {
        while let Some(item) = source.next().await {
            if tx.send((item, Instant::now())).is_err() {
                return;
            }
        }
    });
    let delayed = futures::stream::unfold(rx, move |mut rx| async move {
        let (item, arrived) = rx.recv().await?;
        tokio::time::sleep_until(arrived + delay).await;
        Some((item, rx))
    });
    (delayed.boxed(), Some(AbortOnDrop(reader)))
}

/// Sends queued messages in order, each delayed by the fault latency plus `one_way` from
/// when it was queued; stops on `Close`, on a send error, or when the message budget is
/// spent.
async fn write_loop(
    mut sink: futures::stream::SplitSink<Ws, Message>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    faults: FaultSwitch,
    one_way: std::time::Duration,
) -> WriterEnd {
    let mut sent = 0u64;
    let mut last_due = Instant::now();
    while let Some(item) = rx.recv().await {
        match item {
            Outgoing::Text(text, queued_at) => {
                let settings = faults.get();
                if settings.drop_after_messages.is_some_and(|max| sent >= max) {
                    // Returning drops this half; the reader half goes with the stream.
                    return WriterEnd::Dropped;
                }
                let mut delay = faults.next_delay() + one_way;
                if sent == 0 {
                    delay += std::time::Duration::from_millis(settings.first_byte_delay_ms);
                }
                // Never reorder: a message is due no earlier than the one before it.
                let due = (queued_at + delay).max(last_due);
                tokio::time::sleep_until(due).await;
                last_due = due;
                if let Err(e) = sink.send(Message::text(text)).await {
                    return WriterEnd::Failed(e.to_string());
                }
                sent += 1;
            }
            Outgoing::Close => {
                let frame = CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                };
                let _ = sink.send(Message::Close(Some(frame))).await;
                let _ = sink.close().await;
                return WriterEnd::Closed;
            }
        }
    }
    WriterEnd::Closed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Audio plays in order, frame by frame, with silence-free concatenation across chunks.
    #[test]
    fn playout_plays_in_order_across_chunks() {
        let mut p = Playout::new();
        p.push_audio(vec![1; 100]);
        p.push_audio(vec![2; 100]);
        assert_eq!(p.buffered_bytes(), 200);
        let (a, _) = p.play(160);
        assert_eq!(a, [vec![1; 100], vec![2; 60]].concat());
        let (b, _) = p.play(160);
        assert_eq!(b, vec![2; 40]);
        assert_eq!(p.buffered_bytes(), 0);
        assert_eq!(p.play(160), (vec![], vec![]));
    }

    /// A mark comes back in the frame that plays the last byte queued before it.
    #[test]
    fn marks_return_after_their_audio() {
        let mut p = Playout::new();
        p.push_audio(vec![0; 200]);
        assert_eq!(p.push_mark("a".into()), None);
        p.push_audio(vec![0; 160]);
        assert_eq!(p.push_mark("b".into()), None);
        assert_eq!(p.play(160).1, Vec::<String>::new());
        assert_eq!(p.play(160).1, vec!["a".to_owned()]);
        assert_eq!(p.play(160).1, vec!["b".to_owned()]);
    }

    /// A mark exactly at a frame boundary comes back with that frame, not the next one.
    #[test]
    fn mark_on_frame_boundary() {
        let mut p = Playout::new();
        p.push_audio(vec![0; 160]);
        p.push_mark("m".into());
        assert_eq!(p.play(160).1, vec!["m".to_owned()]);
    }

    /// With nothing queued, a mark is due at once.
    #[test]
    fn mark_with_empty_queue_is_immediate() {
        let mut p = Playout::new();
        assert_eq!(p.push_mark("now".into()), Some("now".into()));
    }

    /// Clear drops the audio and returns every pending mark in order.
    #[test]
    fn clear_returns_pending_marks() {
        let mut p = Playout::new();
        p.push_audio(vec![0; 500]);
        p.push_mark("1".into());
        p.push_audio(vec![0; 500]);
        p.push_mark("2".into());
        let _ = p.play(160);
        assert_eq!(p.clear(), (840, vec!["1".to_owned(), "2".to_owned()]));
        assert_eq!(p.buffered_bytes(), 0);
        assert_eq!(p.play(160), (vec![], vec![]));
    }

    /// Stream URLs: loopback ws:// is accepted as written; the rest is refused or resolved.
    #[test]
    fn stream_url_rules() {
        assert_eq!(
            resolve("ws://127.0.0.1:9/twilio", None).unwrap(),
            "ws://127.0.0.1:9/twilio"
        );
        assert_eq!(
            resolve("ws://localhost:9/t", None).unwrap(),
            "ws://localhost:9/t"
        );
        assert!(resolve("wss://relay.example.com/twilio", None)
            .unwrap_err()
            .contains("wss"));
        assert!(resolve("ws://relay.example.com/twilio", None)
            .unwrap_err()
            .contains("loopback"));
        assert!(resolve("ws://127.0.0.1:9/t?token=1", None)
            .unwrap_err()
            .contains("query"));
        assert!(resolve("https://127.0.0.1:9/t", None).is_err());
        assert!(resolve("/media", None).is_err());
        assert_eq!(
            resolve(
                "/media/abc",
                Some("http://127.0.0.1:8787/api/voice/twiml?callId=1")
            )
            .unwrap(),
            "ws://127.0.0.1:8787/media/abc"
        );
    }
}
