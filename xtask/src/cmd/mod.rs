//! The `cargo xtask` subcommands, plus the two helpers they share for running other
//! programs. Reusable machinery (services, tool lookup, wrangler flags) belongs in the
//! library, where the test stack launcher can use it too.

pub mod admin;
pub mod api_types;
pub mod bench;
pub mod build;
pub mod deploy_check;
pub mod dev;
pub mod devvars;
pub mod dockerfile;
pub mod migrate;
pub mod quickstart;
#[cfg(test)]
mod readme_commands;
pub mod setup;
pub mod test;
pub mod vs_node;

use std::ffi::OsString;
use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// The cargo that is running us (`$CARGO`), so nested builds use the same toolchain.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")))
}

/// Runs `cmd` with inherited stdio and fails, naming `what`, unless it succeeds.
pub fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
