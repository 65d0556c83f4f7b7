//! One module per resource of API.md; `admin/` holds the operator routes. A route module
//! never imports another: what several share lives in `http` (bodies, paging, the
//! session), `store` (data), `session` (the call's Durable Object) or `cmb_core`.

pub mod admin;
pub mod auth;
pub mod calls;
pub mod console;
pub mod favorites;
pub mod health;
pub mod openapi;
pub mod payments;
pub mod personas;
pub mod phone;
pub mod privacy;
pub mod relay;
pub mod schedules;
pub mod voice;
