//! Test kit: fake providers, phone simulator and the stack launcher.

pub mod api;
pub mod audio;
pub mod contract;
pub mod fakes;
pub mod harness;
pub mod loadgen;
pub mod pg;
pub mod process;
pub mod sim;
pub mod stack;
