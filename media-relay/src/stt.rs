//! The Deepgram socket task: caller audio in, transcript events out.
//!
//! Owns what happens on the connection and around it: KeepAlive while no audio flows, and
//! a bounded buffer of the caller's audio while disconnected, replayed on reconnect so no
//! speech is lost (the reconnect loop itself is [`crate::reconnect`]'s). Converts
//! Deepgram's per-connection audio times to stream time. It must not decide anything about
//! turns: events go to the call loop as is.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use cmb_core::secret::Secret;
use futures::future::Either;
use futures::{Future, SinkExt, StreamExt};
use http::header::AUTHORIZATION;
use http::{HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, warn};
use url::Url;

use crate::deepgram::{self, DeepgramEvent};
use crate::machine::{Event, Ms};
use crate::reconnect::{self, Ended, Resume};
use crate::ws::{self, ClientSocket, ConnectError};

/// Deepgram closes after 10 s without data; KeepAlive well inside that.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(4);
/// Caller audio kept while Deepgram is unreachable: 5 s of 20 ms frames.
const RING_FRAMES: usize = 250;
/// Largest Deepgram message accepted (a long final with word timings).
const MAX_MESSAGE: usize = 256 * 1024;
/// Most caller frames written to Deepgram in one go when several have queued up.
const MAX_BATCH: usize = 16;

/// One inbound audio frame, stamped with when the relay read it from Twilio.
#[derive(Debug, Clone)]
pub struct AudioFrame {
    pub read_at: Instant,
    pub data: Bytes,
}

/// What the call loop sends the task, in order.
#[derive(Debug, Clone)]
pub enum SttIn {
    Audio(AudioFrame),
    /// Ask Deepgram to finalize what it has (after the audio sent before it).
    Finalize,
}

impl Ring {
    /// Keeps audio; a `Finalize` while disconnected is dropped (the replayed audio is
    /// endpointed by Deepgram as usual).
    fn keep(&mut self, m: SttIn) {
        if let SttIn::Audio(f) = m {
            self.push(f);
        }
    }
}

/// What the task needs besides its sockets: where stream time starts, and its metrics.
#[derive(Debug, Clone)]
pub struct SttProbes {
    /// Stream time zero (the call loop's `t0`), to map Deepgram's audio times.
    pub t0: Instant,
    pub reconnects: Counter,
    /// Frame read from Twilio → written to Deepgram.
    pub forward_in: Histogram,
}

impl SttProbes {
    fn stream_ms(&self, at: Instant) -> Ms {
        u64::try_from(at.saturating_duration_since(self.t0).as_millis()).unwrap_or(Ms::MAX)
    }
}

/// What the task tells the call loop.
#[derive(Debug, Clone, PartialEq)]
pub enum SttOut {
    Event(Event),
    /// Deepgram could not be restored.
    Failed,
}

/// Starts the task. It reads `audio` until the call loop drops the sender.
pub fn spawn(
    url: Url,
    key: Secret,
    audio: mpsc::Receiver<SttIn>,
    probes: SttProbes,
) -> (mpsc::Receiver<SttOut>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(32);
    // In the call's span: its log lines (and shipped events) name the call.
    let task = tokio::spawn(tracing::Instrument::in_current_span(run(
        url, key, audio, tx, probes,
    )));
    (rx, task)
}

/// Audio buffered while disconnected; oldest dropped past five seconds.
#[derive(Default)]
struct Ring(VecDeque<AudioFrame>);

impl Ring {
    fn push(&mut self, f: AudioFrame) {
        if self.0.len() >= RING_FRAMES {
            self.0.pop_front();
        }
        self.0.push_back(f);
    }
}

/// The task: [`reconnect::run`] over a Deepgram link, or only the failure if the key
/// cannot be sent. Built here rather than in an `async fn`, whose future would keep its
/// arguments beside the link for the whole call.
fn run(
    url: Url,
    key: Secret,
    audio: mpsc::Receiver<SttIn>,
    tx: mpsc::Sender<SttOut>,
    probes: SttProbes,
) -> impl Future<Output = ()> {
    let header = match ws::header_value(&format!("Token {}", key.expose())) {
        Ok(v) => [(AUTHORIZATION, v)],
        Err(e) => {
            warn!(provider = "deepgram", error = %e, "bad Deepgram key");
            return Either::Left(async move {
                let _ = tx.send(SttOut::Failed).await;
            });
        }
    };
    let reconnects = probes.reconnects.clone();
    let link = Deepgram {
        url,
        header,
        audio,
        ring: Ring::default(),
        tx,
        probes,
    };
    Either::Right(reconnect::run(link, reconnect::PROVIDERS, reconnects))
}

/// The task's own steps for [`reconnect::run`]. The caller's audio is taken (and
/// buffered) all the time, connecting and waiting included; the call is over once the
/// call loop drops the audio sender.
struct Deepgram {
    url: Url,
    header: [(HeaderName, HeaderValue); 1],
    audio: mpsc::Receiver<SttIn>,
    ring: Ring,
    tx: mpsc::Sender<SttOut>,
    probes: SttProbes,
}

impl reconnect::Link for Deepgram {
    const PROVIDER: &'static str = "deepgram";
    const NAME: &'static str = "Deepgram";
    type Socket = Box<ClientSocket>;

    async fn connect(&mut self, _: bool) -> Option<Result<Self::Socket, ConnectError>> {
        let connecting = ws::connect(&self.url, &self.header, MAX_MESSAGE);
        let ring = &mut self.ring;
        reconnect::meanwhile(connecting, &mut self.audio, |m| ring.keep(m)).await
    }

    async fn wait(&mut self, delay: Duration) -> bool {
        let ring = &mut self.ring;
        reconnect::meanwhile(tokio::time::sleep(delay), &mut self.audio, |m| ring.keep(m))
            .await
            .is_some()
    }

    async fn serve(&mut self, socket: &mut Self::Socket, _: bool) -> Ended {
        let ended = session(
            socket,
            &mut self.ring,
            &mut self.audio,
            &self.tx,
            &self.probes,
        )
        .await;
        if ended == Ended::Over {
            ws::close(socket, Some(deepgram::CLOSE_STREAM)).await;
        }
        ended
    }

    async fn give_up(&mut self) {
        let _ = self.tx.send(SttOut::Failed).await;
    }

    fn resume(&self) -> Resume {
        Resume {
            buffered: Some(self.ring.0.len()),
            ..Resume::default()
        }
    }
}

async fn session(
    socket: &mut ClientSocket,
    ring: &mut Ring,
    audio: &mut mpsc::Receiver<SttIn>,
    tx: &mpsc::Sender<SttOut>,
    probes: &SttProbes,
) -> Ended {
    // Deepgram's clock starts at the first audio byte of this connection.
    let mut epoch: Option<Ms> = None;
    for f in ring.0.drain(..) {
        epoch.get_or_insert_with(|| probes.stream_ms(f.read_at));
        if socket.send(Message::Binary(f.data)).await.is_err() {
            return Ended::Dropped;
        }
    }
    // One timer for the connection, re-armed only when it fires: resetting a timer per
    // 20 ms frame would cost a timer-wheel update per frame.
    let mut last_sent = Instant::now();
    let keep_alive = tokio::time::sleep_until(last_sent + KEEP_ALIVE_EVERY);
    tokio::pin!(keep_alive);
    let mut batch: Vec<AudioFrame> = Vec::new();
    loop {
        tokio::select! {
            biased;
            // Caller audio first: a wake-up is nearly always a caller frame, and trying
            // the Deepgram socket first would cost an empty read (WouldBlock) on every
            // frame on top of the one before the task sleeps again. A result that
            // arrived meanwhile is read right after the frame is written (microseconds);
            // the audio queue is bounded, so the socket is always reached.
            m = audio.recv() => {
                let f = match m {
                    Some(SttIn::Audio(f)) => f,
                    Some(SttIn::Finalize) => {
                        if socket.send(Message::text(deepgram::FINALIZE)).await.is_err() {
                            return Ended::Dropped;
                        }
                        last_sent = Instant::now();
                        continue;
                    }
                    None => return Ended::Over,
                };
                epoch.get_or_insert_with(|| probes.stream_ms(f.read_at));
                // Frames that queued up meanwhile go out in the same write: no frame
                // waits for another, but a busy relay makes one syscall, not several.
                batch.clear();
                batch.push(f);
                let mut finalize = false;
                while batch.len() < MAX_BATCH {
                    match audio.try_recv() {
                        Ok(SttIn::Audio(more)) => batch.push(more),
                        // After this batch, which it followed.
                        Ok(SttIn::Finalize) => {
                            finalize = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let mut written = true;
                for f in &batch {
                    // A clone of `Bytes` is a reference count, not a copy.
                    if socket.feed(Message::Binary(f.data.clone())).await.is_err() {
                        written = false;
                        break;
                    }
                }
                if finalize && written {
                    written = socket.feed(Message::text(deepgram::FINALIZE)).await.is_ok();
                }
                if !written || socket.flush().await.is_err() {
                    // The connection died under these frames: replay them on the next.
                    for f in batch.drain(..) {
                        ring.push(f);
                    }
                    return Ended::Dropped;
                }
                last_sent = Instant::now();
                // Per frame; a batch is timed by its oldest frame (an upper bound).
                let secs = last_sent.saturating_duration_since(batch[0].read_at).as_secs_f64();
                for _ in &batch {
                    probes.forward_in.observe(secs);
                }
            }
            frame = socket.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(c))) => {
                        debug!(provider = "deepgram", close = ?c, "Deepgram closed the stream");
                        return Ended::Dropped;
                    }
                    None | Some(Err(_)) => return Ended::Dropped,
                    Some(Ok(_)) => continue,
                };
                let event = match deepgram::parse(text.as_str()) {
                    Ok(Some(e)) => e,
                    Ok(None) => continue,
                    Err(e) => {
                        warn!(provider = "deepgram", error = %e, "ignoring bad Deepgram message");
                        continue;
                    }
                };
                if let Some(ev) = to_event(event, epoch) {
                    if tx.send(SttOut::Event(ev)).await.is_err() {
                        return Ended::Over;
                    }
                }
            }
            () = &mut keep_alive => {
                let due = last_sent + KEEP_ALIVE_EVERY;
                if Instant::now() >= due {
                    if socket.send(Message::text(deepgram::KEEP_ALIVE)).await.is_err() {
                        return Ended::Dropped;
                    }
                    last_sent = Instant::now();
                }
                keep_alive.as_mut().reset(last_sent + KEEP_ALIVE_EVERY);
            }
        }
    }
}

/// Deepgram audio seconds → stream milliseconds, given where this connection's audio began.
fn stream_ms(epoch: Option<Ms>, seconds: f64) -> Option<Ms> {
    let epoch = epoch?;
    // Non-negative, bounded seconds; `as` saturates anything odd.
    Some(epoch + (seconds.max(0.0) * 1000.0).round() as u64)
}

fn to_event(e: DeepgramEvent, epoch: Option<Ms>) -> Option<Event> {
    Some(match e {
        DeepgramEvent::Results {
            transcript,
            is_final,
            speech_final,
            end_s,
        } => Event::Transcript {
            text: transcript,
            is_final: is_final || speech_final,
            speech_final,
            audio_end_ms: stream_ms(epoch, end_s),
        },
        DeepgramEvent::SpeechStarted => Event::SpeechStarted,
        DeepgramEvent::UtteranceEnd { last_word_end_s } => Event::UtteranceEnd {
            last_word_end_ms: last_word_end_s.and_then(|s| stream_ms(epoch, s)),
        },
        DeepgramEvent::Error { description } => {
            warn!(provider = "deepgram", %description, "Deepgram error");
            return None;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deepgram times are offset by where the connection's audio began in the stream.
    #[test]
    fn times_map_to_stream_time() {
        let e = DeepgramEvent::Results {
            transcript: "hi".into(),
            is_final: true,
            speech_final: true,
            end_s: 1.25,
        };
        assert_eq!(
            to_event(e, Some(10_000)),
            Some(Event::Transcript {
                text: "hi".into(),
                is_final: true,
                speech_final: true,
                audio_end_ms: Some(11_250)
            })
        );
        assert_eq!(
            to_event(
                DeepgramEvent::UtteranceEnd {
                    last_word_end_s: Some(2.0)
                },
                None
            ),
            Some(Event::UtteranceEnd {
                last_word_end_ms: None
            })
        );
    }

    /// The reconnect buffer keeps only the newest five seconds.
    #[test]
    fn ring_is_bounded() {
        let t0 = Instant::now();
        let mut r = Ring::default();
        for i in 0..300 {
            r.push(AudioFrame {
                read_at: t0 + Duration::from_millis(i * 20),
                data: Bytes::from_static(&[0xff]),
            });
        }
        assert_eq!(r.0.len(), RING_FRAMES);
        assert_eq!(
            r.0.front().map(|f| f.read_at),
            Some(t0 + Duration::from_millis(50 * 20))
        );
    }
}
