//! Platform-free domain logic shared by the Worker (`cmb-api`) and the media relay.
//!
//! Nothing here performs I/O, reads a clock or draws randomness: time, ids and random
//! bytes are always arguments, so every function runs the same on wasm32 and native and
//! is unit-tested natively.

pub mod analytics;
pub mod calls;
pub mod channel;
pub mod config;
pub mod console;
pub mod destination;
pub mod events;
pub mod http;
pub mod idempotency;
pub mod jwt;
pub mod limits;
pub mod log;
pub mod mcp;
pub mod memory;
pub mod model;
pub mod password;
pub mod persona;
pub mod pricing;
pub mod privacy;
pub mod prompt;
pub mod relay_container;
pub mod schedule;
pub mod secret;
pub mod session;
pub mod stream_token;
pub mod stripe_sig;
pub mod tools;
pub mod twilio_sig;
pub mod twiml;
pub mod tz;
pub mod validate;

pub use secret::Secret;
pub use validate::ValidationError;
