//! The ElevenLabs socket task: TTS commands in, audio events out.
//!
//! Owns the connection's lifetime: connect (before the greeting is needed), translate
//! `TtsCommand`s into multi-context messages, reconnect with backoff, and report
//! `Reconnected` so the state machine re-issues what the old socket lost. Audio is handed
//! on only as fast as the call loop takes it (backpressure reaches the TCP socket), while
//! commands keep flowing. It must not decide what to say or when.

use std::time::Duration;

use cmb_core::channel::VoiceSettings;
use cmb_core::secret::Secret;
use futures::{SinkExt, StreamExt};
use http::HeaderName;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};
use url::Url;

use crate::elevenlabs::{self, TtsMessage};
use crate::machine::{Event, TtsCommand};
use crate::ws::{self, Backoff, ClientSocket, PROVIDER_DELAYS};

/// Largest ElevenLabs message accepted: a chunk of base64 audio with alignment.
const MAX_MESSAGE: usize = 1024 * 1024;
/// Commands buffered from the call loop (text per clause, context open/close).
const COMMANDS: usize = 128;
/// A connection that lived this long was healthy: its failure restarts the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

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
    let task = tokio::spawn(run(url, key, voice, commands, out, reconnects));
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

async fn run(
    url: Url,
    key: Secret,
    voice: VoiceSettings,
    mut commands: mpsc::Receiver<TtsCommand>,
    out: mpsc::Sender<TtsOut>,
    reconnects: Counter,
) {
    let key = match ws::header_value(key.expose()) {
        Ok(v) => v,
        Err(e) => {
            warn!(provider = "elevenlabs", error = %e, "bad ElevenLabs key");
            let _ = out.send(TtsOut::Failed).await;
            return;
        }
    };
    let header = [(HeaderName::from_static("xi-api-key"), key)];
    let mut backoff = Backoff::new(PROVIDER_DELAYS);
    let mut connected_before = false;
    loop {
        // Before the first connection, commands wait in the channel (the greeting must
        // not be lost). After a drop, they are read and discarded while reconnecting: the
        // machine re-issues everything still needed after `Reconnected`.
        let connecting = ws::connect(&url, &header, MAX_MESSAGE);
        tokio::pin!(connecting);
        let result = loop {
            tokio::select! {
                r = &mut connecting => break r,
                c = commands.recv(), if connected_before => if c.is_none() { return },
            }
        };
        let mut socket = match result {
            Ok(s) => s,
            Err(e) => {
                warn!(provider = "elevenlabs", error = %e, "ElevenLabs connect failed");
                let Some(delay) = backoff.next_delay() else {
                    let _ = out.send(TtsOut::Failed).await;
                    return;
                };
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        let resync = connected_before;
        if connected_before {
            reconnects.inc();
            info!(provider = "elevenlabs", "ElevenLabs reconnected");
            if out.send(TtsOut::Reconnected).await.is_err() {
                return;
            }
        }
        connected_before = true;
        let opened = Instant::now();
        match session(&mut socket, &voice, resync, &mut commands, &out).await {
            Ended::CallOver => {
                let _ = socket.send(Message::text(elevenlabs::CLOSE_SOCKET)).await;
                let _ = socket.as_mut().close(None).await;
                return;
            }
            Ended::Dropped => {
                debug!(provider = "elevenlabs", "ElevenLabs connection dropped");
                if opened.elapsed() >= HEALTHY_AFTER {
                    backoff.reset();
                }
                let Some(delay) = backoff.next_delay() else {
                    let _ = out.send(TtsOut::Failed).await;
                    return;
                };
                tokio::time::sleep(delay).await;
            }
        }
    }
}

enum Ended {
    Dropped,
    CallOver,
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
                let Some(cmd) = cmd else { return Ended::CallOver };
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
                let Ok(permit) = permit else { return Ended::CallOver };
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
