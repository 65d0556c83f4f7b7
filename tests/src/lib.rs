//! Test kit: fake providers, phone simulator and the stack launcher.

pub mod audio;
pub mod fakes;
pub mod sim;
