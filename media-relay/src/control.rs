//! The control channel to the call's Durable Object: one WebSocket to
//! `WORKER_URL/internal/calls/{id}/session`, authenticated with `RELAY_SECRET`.
//!
//! Owns sequencing and resumption: every relay frame gets a `seq` and is kept until the DO
//! acknowledges it (and re-sent after a reconnect); DO frames already processed are
//! dropped when replayed, and `ready.resume_from` tells the DO where to resume. Answers
//! `ping` itself. It must not interpret the conversation: `hello`, `say_*` and `hang_up`
//! are passed to the call loop untouched.

use std::collections::VecDeque;

use cmb_core::channel::{decode, DoToRelay, Envelope, RelayToDo};
use cmb_core::secret::Secret;
use futures::future::Either;
use futures::{Future, SinkExt, StreamExt};
use http::header::AUTHORIZATION;
use http::{HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tracing::warn;
use url::Url;

use crate::reconnect::{self, Ended, Resume};
use crate::ws::{self, ClientSocket, ConnectError};

/// Largest DO frame accepted: hello with a long greeting is a few KB.
const MAX_MESSAGE: usize = 256 * 1024;
/// Relay frames kept for re-sending until acknowledged; past this the oldest go (logged),
/// so a DO that never acks cannot grow the call's memory.
const MAX_UNACKED: usize = 256;
/// Buffers between the call loop and this task; a few messages per turn flow here.
const CHANNEL: usize = 64;

/// What the control task tells the call loop.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlEvent {
    /// A DO message for the call (not ping/ack, which are handled here). Boxed: `hello`
    /// is large and rare, and an unboxed variant would size every slot of the channel.
    Message(Box<DoToRelay>),
    /// The channel could not be restored: the call cannot continue.
    Lost,
    /// The DO refused this relay (close 1008): another socket holds the call's stream,
    /// or the call is over. Final: the call must not go on here.
    Refused,
}

/// Who this call is, for `ready`.
#[derive(Debug, Clone)]
pub struct ControlParams {
    pub url: Url,
    pub secret: Secret,
    pub call_id: String,
    pub call_sid: String,
    pub stream_sid: String,
}

/// The call loop's ends of the control task.
pub struct ControlLink {
    /// Frames for the DO; dropping it closes the channel once everything is sent.
    pub tx: mpsc::Sender<RelayToDo>,
    pub rx: mpsc::Receiver<ControlEvent>,
    pub task: JoinHandle<()>,
}

/// `http(s)://worker/prefix` → `ws(s)://worker/prefix/internal/calls/{id}/session`.
pub fn session_url(worker: &Url, call_id: &str) -> Option<Url> {
    let mut url = worker.clone();
    let scheme = match worker.scheme() {
        "http" => "ws",
        "https" => "wss",
        _ => return None,
    };
    url.set_scheme(scheme).ok()?;
    url.set_query(None);
    url.path_segments_mut()
        .ok()?
        .pop_if_empty()
        // `extend` percent-encodes each segment: a call id cannot escape the path.
        .extend(["internal", "calls", call_id, "session"]);
    Some(url)
}

/// Starts the control task.
pub fn spawn(params: ControlParams, reconnects: Counter) -> ControlLink {
    let (tx, from_loop) = mpsc::channel(CHANNEL);
    let (to_loop, rx) = mpsc::channel(CHANNEL);
    let task = tokio::spawn(run(params, from_loop, to_loop, reconnects));
    ControlLink { tx, rx, task }
}

/// Relay → DO frames with their sequence numbers, kept until acknowledged.
#[derive(Debug, Default)]
struct Outbox {
    next_seq: u64,
    unacked: VecDeque<(u64, String)>,
    /// Warned once already that the DO does not ack (avoids a log line per frame).
    overflow_warned: bool,
}

impl Outbox {
    /// Numbers `msg` and returns its JSON; kept for re-sending unless it is per-connection.
    fn push(&mut self, msg: RelayToDo) -> Option<String> {
        self.next_seq += 1;
        let keep = !matches!(msg, RelayToDo::Ready { .. } | RelayToDo::Pong);
        let json = match Envelope::new(self.next_seq, msg).to_json() {
            Ok(j) => j,
            Err(e) => {
                warn!(error = %e, "cannot encode control frame");
                return None;
            }
        };
        if keep {
            if self.unacked.len() >= MAX_UNACKED {
                if !self.overflow_warned {
                    warn!("DO is not acknowledging control frames; forgetting the oldest");
                    self.overflow_warned = true;
                }
                self.unacked.pop_front();
            }
            self.unacked.push_back((self.next_seq, json.clone()));
        }
        Some(json)
    }

    fn ack(&mut self, seq: u64) {
        while self.unacked.front().is_some_and(|(s, _)| *s <= seq) {
            self.unacked.pop_front();
        }
    }
}

/// How a connected session ended.
enum SessionEnd {
    /// The socket dropped: reconnect.
    Dropped,
    /// The call loop is done and everything was sent.
    Done,
    /// The DO closed the channel with 1008 (policy): this relay may not carry the call
    /// (another socket holds the stream, or the call is over). Reconnecting cannot help.
    Refused(String),
}

/// The task: [`reconnect::run`] over the DO link, or only the loss if the secret cannot
/// be sent. Built here rather than in an `async fn`, whose future would keep its arguments
/// beside the link for the whole call.
fn run(
    p: ControlParams,
    from_loop: mpsc::Receiver<RelayToDo>,
    to_loop: mpsc::Sender<ControlEvent>,
    reconnects: Counter,
) -> impl Future<Output = ()> {
    let auth = match ws::header_value(&format!("Bearer {}", p.secret.expose())) {
        Ok(v) => v,
        Err(e) => {
            warn!(call_id = %p.call_id, error = %e, "control channel: bad secret");
            return Either::Left(async move {
                let _ = to_loop.send(ControlEvent::Lost).await;
            });
        }
    };
    let link = Control {
        header: [(AUTHORIZATION, auth)],
        p,
        outbox: Outbox::default(),
        last_in: None,
        from_loop,
        to_loop,
    };
    Either::Right(reconnect::run(link, reconnect::CONTROL, reconnects))
}

/// The task's own steps for [`reconnect::run`]. The call loop's frames wait in their
/// channel while disconnected; each new socket starts with `ready` and the unacked ones.
struct Control {
    p: ControlParams,
    header: [(HeaderName, HeaderValue); 1],
    outbox: Outbox,
    /// Seq of the last DO frame processed: replays at or below it are dropped.
    last_in: Option<u64>,
    from_loop: mpsc::Receiver<RelayToDo>,
    to_loop: mpsc::Sender<ControlEvent>,
}

impl reconnect::Link for Control {
    const PROVIDER: &'static str = "control";
    const NAME: &'static str = "control channel";
    type Socket = Box<ClientSocket>;

    async fn connect(&mut self, _: bool) -> Option<Result<Self::Socket, ConnectError>> {
        Some(ws::connect(&self.p.url, &self.header, MAX_MESSAGE).await)
    }

    async fn serve(&mut self, socket: &mut Self::Socket, _: bool) -> Ended {
        let ready = RelayToDo::Ready {
            call_sid: self.p.call_sid.clone(),
            stream_sid: self.p.stream_sid.clone(),
            resume_from: self.last_in,
        };
        match session(
            socket,
            ready,
            &mut self.outbox,
            &mut self.last_in,
            &mut self.from_loop,
            &self.to_loop,
        )
        .await
        {
            SessionEnd::Dropped => Ended::Dropped,
            SessionEnd::Done => {
                ws::close(socket, None).await;
                Ended::Over
            }
            SessionEnd::Refused(reason) => {
                warn!(call_id = %self.p.call_id, provider = "control", reason, "the call's DO refused this relay");
                let _ = self.to_loop.send(ControlEvent::Refused).await;
                Ended::Over
            }
        }
    }

    async fn give_up(&mut self) {
        let _ = self.to_loop.send(ControlEvent::Lost).await;
    }

    fn call_id(&self) -> Option<&str> {
        Some(&self.p.call_id)
    }

    fn resume(&self) -> Resume {
        Resume {
            resume_from: self.last_in,
            ..Resume::default()
        }
    }
}

async fn session(
    socket: &mut ClientSocket,
    ready: RelayToDo,
    outbox: &mut Outbox,
    last_in: &mut Option<u64>,
    from_loop: &mut mpsc::Receiver<RelayToDo>,
    to_loop: &mpsc::Sender<ControlEvent>,
) -> SessionEnd {
    // `ready` first, then whatever the DO has not acknowledged, in order.
    let mut first: Vec<String> = outbox.push(ready).into_iter().collect();
    first.extend(outbox.unacked.iter().map(|(_, j)| j.clone()));
    for json in first {
        if socket.send(Message::text(json)).await.is_err() {
            return SessionEnd::Dropped;
        }
    }
    loop {
        tokio::select! {
            biased;
            msg = from_loop.recv() => {
                let Some(msg) = msg else { return SessionEnd::Done };
                if let Some(json) = outbox.push(msg) {
                    if socket.send(Message::text(json)).await.is_err() {
                        return SessionEnd::Dropped;
                    }
                }
            }
            frame = socket.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(Some(f)))) if f.code == CloseCode::Policy => {
                        return SessionEnd::Refused(f.reason.to_string());
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return SessionEnd::Dropped,
                    Some(Ok(_)) => continue,
                };
                let envelope = match decode::<DoToRelay>(text.as_str()) {
                    Ok(Some(e)) => e,
                    Ok(None) => continue,
                    Err(e) => {
                        warn!(error = %e, "ignoring bad control frame");
                        continue;
                    }
                };
                if last_in.is_some_and(|s| envelope.seq <= s) {
                    continue; // a replay of something already processed
                }
                *last_in = Some(envelope.seq);
                match envelope.msg {
                    DoToRelay::Ack { seq } => outbox.ack(seq),
                    DoToRelay::Ping => {
                        if let Some(json) = outbox.push(RelayToDo::Pong) {
                            if socket.send(Message::text(json)).await.is_err() {
                                return SessionEnd::Dropped;
                            }
                        }
                    }
                    msg => {
                        if to_loop.send(ControlEvent::Message(Box::new(msg))).await.is_err() {
                            return SessionEnd::Done;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The session URL maps the scheme, keeps a path prefix, and encodes the call id.
    #[test]
    fn session_urls() {
        let u = |s: &str| Url::parse(s).expect("url");
        assert_eq!(
            session_url(&u("http://127.0.0.1:8787"), "c-1").map(|u| u.to_string()),
            Some("ws://127.0.0.1:8787/internal/calls/c-1/session".into())
        );
        assert_eq!(
            session_url(&u("https://api.example.com/v2/?x=1"), "a/b").map(|u| u.to_string()),
            Some("wss://api.example.com/v2/internal/calls/a%2Fb/session".into())
        );
        assert_eq!(session_url(&u("ftp://x"), "c"), None);
    }

    /// Frames are numbered, kept until acked, and per-connection ones are not kept.
    #[test]
    fn outbox_sequencing() {
        let mut o = Outbox::default();
        let ready = o.push(RelayToDo::Ready {
            call_sid: "CA".into(),
            stream_sid: "MZ".into(),
            resume_from: None,
        });
        assert!(ready.is_some_and(|j| j.contains(r#""seq":1"#)));
        o.push(RelayToDo::Dtmf { digit: "1".into() });
        o.push(RelayToDo::Dtmf { digit: "2".into() });
        assert_eq!(
            o.unacked.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [2, 3]
        );
        o.ack(2);
        assert_eq!(o.unacked.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [3]);
        o.push(RelayToDo::Pong);
        assert_eq!(o.unacked.len(), 1, "pong is not re-sent");
    }
}
