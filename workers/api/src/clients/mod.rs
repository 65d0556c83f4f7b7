//! Outbound provider clients: each request has a deadline, and errors name the provider.

pub mod llm;
pub mod stripe;
pub mod twilio;
pub mod verify;
