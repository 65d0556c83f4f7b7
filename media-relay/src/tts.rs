//! The ElevenLabs socket task: TTS commands in, audio events out.
//!
//! Owns the connection's lifetime: connect (before the greeting is needed), translate
//! `TtsCommand`s into multi-context messages, reconnect (the loop is
//! [`crate::reconnect`]'s), and report `Reconnected` so the state machine re-issues what
//! the old socket lost. Audio is handed on only as fast as the call loop takes it
//! (backpressure reaches the TCP socket), while commands keep flowing. It must not decide
//! what to say or when.

use cmb_core::channel::VoiceSettings;
use cmb_core::secret::Secret;
use futures::future::Either;
use futures::{Future, SinkExt, StreamExt};
use http::{HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, warn};
use url::Url;

use crate::elevenlabs::{self, TtsMessage};
use crate::machine::{Event, TtsCommand};
use crate::reconnect::{self, Ended};
use crate::ws::{self, ClientSocket, ConnectError};

/// Largest ElevenLabs message accepted: a chunk of base64 audio with alignment.
const MAX_MESSAGE: usize = 1024 * 1024;
/// Commands buffered from the call loop (text per clause, context open/close).
const COMMANDS: usize = 128;

/// What the task tells the call loop.
#[derive(Debug, Clone, PartialEq)]
pub enum TtsOut {
    /// A provider event, with when its message was read from the socket.
    Event { event: Event, read_at: Instant },
    /// A new socket replaced a dropped one: contexts must be re-created.
    Reconnected,
    /// ElevenLabs could not be restored.
    Failed,
}

/// The call loop's ends of the TTS task.
pub struct TtsLink {
    /// Commands; dropping it closes the socket.
    pub tx: mpsc::Sender<TtsCommand>,
    /// Kept tiny: each message can hold a second of audio.
    pub rx: mpsc::Receiver<TtsOut>,
    pub task: JoinHandle<()>,
}

/// Starts the task for the persona's voice.
pub fn spawn(url: Url, key: Secret, voice: VoiceSettings, reconnects: Counter) -> TtsLink {
    let (tx, commands) = mpsc::channel(COMMANDS);
    let (out, rx) = mpsc::channel(2);
    // In the call's span: its log lines (and shipped events) name the call.
    let task = tokio::spawn(tracing::Instrument::in_current_span(run(
        url, key, voice, commands, out, reconnects,
    )));
    TtsLink { tx, rx, task }
}

/// The wire name of a machine context.
fn context_name(ctx: u32) -> String {
    format!("c{ctx}")
}

fn context_number(name: Option<&str>) -> Option<u32> {
    name?.strip_prefix('c')?.parse().ok()
}

fn encode(cmd: &TtsCommand, voice: &VoiceSettings) -> Option<String> {
    Some(match cmd {
        TtsCommand::Open { ctx } => elevenlabs::init_context(&context_name(*ctx), voice),
        TtsCommand::Text { ctx, text, flush } => {
            elevenlabs::send_text(&context_name(*ctx), text, *flush)
        }
        TtsCommand::Close { ctx } => elevenlabs::close_context(&context_name(*ctx)),
        TtsCommand::KeepAlive { ctx } => elevenlabs::keep_alive(&context_name(*ctx)),
        TtsCommand::Resync => return None,
    })
}

fn to_event(msg: TtsMessage) -> Option<Event> {
    match msg {
        TtsMessage::Audio {
            context_id,
            audio,
            char_starts_ms,
        } => {
            let ctx = context_number(context_id.as_deref())?;
            Some(Event::TtsAudio {
                ctx,
                audio,
                char_starts_ms,
            })
        }
        TtsMessage::Final { context_id } => Some(Event::TtsFinal {
            ctx: context_number(context_id.as_deref())?,
        }),
        TtsMessage::Error { message } => {
            warn!(provider = "elevenlabs", %message, "ElevenLabs error");
            None
        }
    }
}

/// The task: [`reconnect::run`] over an ElevenLabs link, or only the failure if the key
/// cannot be sent. Built here rather than in an `async fn`, whose future would keep its
/// arguments beside the link for the whole call.
fn run(
    url: Url,
    key: Secret,
    voice: VoiceSettings,
    commands: mpsc::Receiver<TtsCommand>,
    out: mpsc::Sender<TtsOut>,
    reconnects: Counter,
) -> impl Future<Output = ()> {
    let key = match ws::header_value(key.expose()) {
        Ok(v) => v,
        Err(e) => {
            warn!(provider = "elevenlabs", error = %e, "bad ElevenLabs key");
            return Either::Left(async move {
                let _ = out.send(TtsOut::Failed).await;
            });
        }
    };
    let link = ElevenLabs {
        url,
        header: [(HeaderName::from_static("xi-api-key"), key)],
        voice,
        commands,
        out,
    };
    Either::Right(reconnect::run(link, reconnect::PROVIDERS, reconnects))
}

/// The task's own steps for [`reconnect::run`]. Before the first connection, commands
/// wait in the channel (the greeting must not be lost). After a drop, they are read and
/// discarded while connecting: the machine re-issues everything still needed after
/// `Reconnected`. Between attempts the channel is not read.
struct ElevenLabs {
    url: Url,
    header: [(HeaderName, HeaderValue); 1],
    voice: VoiceSettings,
    commands: mpsc::Receiver<TtsCommand>,
    out: mpsc::Sender<TtsOut>,
}

impl reconnect::Link for ElevenLabs {
    const PROVIDER: &'static str = "elevenlabs";
    const NAME: &'static str = "ElevenLabs";
    type Socket = Box<ClientSocket>;

    async fn connect(
        &mut self,
        ever_connected: bool,
    ) -> Option<Result<Self::Socket, ConnectError>> {
        let connecting = ws::connect(&self.url, &self.header, MAX_MESSAGE);
        if ever_connected {
            reconnect::meanwhile(connecting, &mut self.commands, drop).await
        } else {
            Some(connecting.await)
        }
    }

    async fn reconnected(&mut self) -> bool {
        self.out.send(TtsOut::Reconnected).await.is_ok()
    }

    async fn serve(&mut self, socket: &mut Self::Socket, reconnect: bool) -> Ended {
        let ended = session(
            socket,
            &self.voice,
            reconnect,
            &mut self.commands,
            &self.out,
        )
        .await;
        if ended == Ended::Over {
            ws::close(socket, Some(elevenlabs::CLOSE_SOCKET)).await;
        }
        ended
    }

    async fn give_up(&mut self) {
        let _ = self.out.send(TtsOut::Failed).await;
    }
}

async fn session(
    socket: &mut ClientSocket,
    voice: &VoiceSettings,
    mut awaiting_resync: bool,
    commands: &mut mpsc::Receiver<TtsCommand>,
    out: &mpsc::Sender<TtsOut>,
) -> Ended {
    // One event at a time waits for the call loop; meanwhile the socket is not read
    // (TCP backpressure) but commands still go out.
    let mut pending: Option<(Event, Instant)> = None;
    loop {
        tokio::select! {
            biased;
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { return Ended::Over };
                if cmd == TtsCommand::Resync {
                    awaiting_resync = false;
                    continue;
                }
                if awaiting_resync {
                    continue; // meant for the old socket
                }
                if let Some(json) = encode(&cmd, voice) {
                    if socket.send(Message::text(json)).await.is_err() {
                        return Ended::Dropped;
                    }
                }
            }
            permit = out.reserve(), if pending.is_some() => {
                let Ok(permit) = permit else { return Ended::Over };
                if let Some((event, read_at)) = pending.take() {
                    permit.send(TtsOut::Event { event, read_at });
                }
            }
            frame = socket.next(), if pending.is_none() => {
                let text = match frame {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(c))) => {
                        debug!(provider = "elevenlabs", close = ?c, "ElevenLabs closed the socket");
                        return Ended::Dropped;
                    }
                    None | Some(Err(_)) => return Ended::Dropped,
                    Some(Ok(_)) => continue,
                };
                match elevenlabs::parse(text.as_str()) {
                    Ok(Some(msg)) => pending = to_event(msg).map(|e| (e, Instant::now())),
                    Ok(None) => {}
                    Err(e) => warn!(provider = "elevenlabs", error = %e, "ignoring bad ElevenLabs message"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Commands map to multi-context messages on `c<n>` contexts; Resync sends nothing.
    #[test]
    fn commands_encode() {
        let v = VoiceSettings::default();
        let text = encode(
            &TtsCommand::Text {
                ctx: 4,
                text: "Hi. ".into(),
                flush: true,
            },
            &v,
        )
        .expect("text");
        assert!(text.contains(r#""context_id":"c4""#), "{text}");
        assert_eq!(encode(&TtsCommand::Resync, &v), None);
        let open = encode(&TtsCommand::Open { ctx: 1 }, &v).expect("open");
        assert!(open.contains("voice_settings"), "{open}");
    }

    /// Server messages map back to machine contexts; foreign context ids are dropped.
    #[test]
    fn messages_decode() {
        let audio = TtsMessage::Audio {
            context_id: Some("c7".into()),
            audio: vec![1],
            char_starts_ms: None,
        };
        assert_eq!(
            to_event(audio),
            Some(Event::TtsAudio {
                ctx: 7,
                audio: vec![1],
                char_starts_ms: None
            })
        );
        assert_eq!(
            to_event(TtsMessage::Final {
                context_id: Some("c7".into())
            }),
            Some(Event::TtsFinal { ctx: 7 })
        );
        assert_eq!(
            to_event(TtsMessage::Final {
                context_id: Some("other".into())
            }),
            None
        );
        assert_eq!(to_event(TtsMessage::Final { context_id: None }), None);
    }
}
