//! Shared machinery behind `cargo xtask` and the integration-test stack launcher
//! (`cmb_tests::stack`): where the project's tools live, how to start and stop a service
//! as a whole process group, how to invoke `wrangler`, and how local runs are pointed at
//! the fake providers.
//!
//! Everything here is blocking `std` code (no async runtime) so the `xtask` binary stays
//! quick to build. Nothing here installs anything; that is `cargo xtask setup`'s job.

pub mod admin;
pub mod deploy;
pub mod health;
pub mod net;
pub mod pg;
pub mod providers;
pub mod repo;
pub mod service;
pub mod text;
pub mod toolchain;
pub mod wrangler;
