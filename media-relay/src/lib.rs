//! The media relay: carries one phone call's audio between Twilio Media Streams, Deepgram
//! (speech to text) and ElevenLabs (text to speech), and talks to the call's Durable
//! Object over one control WebSocket.
//!
//! Entry points: [`run`] (serve a bound listener until shutdown) and [`app`] (the router,
//! for `oneshot` tests). Layout follows "codec apart from socket apart from behaviour":
//!
//! - codecs (no I/O): [`twilio`], [`deepgram`], [`elevenlabs`];
//! - behaviour (no I/O, no clock): [`machine`], the per-call state machine;
//! - sockets: [`call`] (handshake and call loop), [`control`] (DO channel), [`stt`] and
//!   [`tts`] (provider tasks), [`reconnect`] (the one reconnect loop of those three tasks),
//!   [`ws`] (connect and backoff), [`greeting`] (greetings synthesized while the phone
//!   rings, over ElevenLabs' HTTP API);
//! - process: [`config`], [`state`] (shared by `server` and `call`, depending on neither),
//!   [`server`], [`drain`] (the pure shutdown decision `server::run` carries out),
//!   [`healthcheck`] (the binary's `healthcheck` subcommand), [`metrics`], [`nonce`].

pub mod call;
pub mod config;
pub mod control;
pub mod deepgram;
pub mod drain;
pub mod elevenlabs;
pub mod events;
pub mod greeting;
pub mod healthcheck;
pub mod machine;
pub mod metrics;
pub mod nonce;
pub mod reconnect;
pub mod server;
pub mod state;
pub mod stt;
pub mod tts;
pub mod twilio;
pub mod vad;
pub mod ws;

pub use config::{Config, ConfigError, ConfigProblem};
pub use server::{app, run, AppState};
