//! `cargo xtask bench relay`: builds the relay and the load generator in release mode
//! and runs `relay_bench` (N simulated calls against the relay and in-process fakes,
//! measured from /proc and the relay's own metrics). A benchmark, not a test: it prints
//! figures and never fails on a slow machine.

use anyhow::Result;
use clap::{Args, Subcommand};
use xtask::repo::Repo;

use super::{cargo, run_checked};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    target: BenchTarget,
}

#[derive(Subcommand)]
enum BenchTarget {
    /// The media relay under N concurrent simulated calls.
    Relay {
        /// Concurrent calls.
        #[arg(long, default_value_t = 1000)]
        calls: usize,
        /// Measured steady-state window, seconds.
        #[arg(long, default_value_t = 30)]
        duration: u64,
        /// Ramp-up, seconds.
        #[arg(long, default_value_t = 10)]
        ramp: u64,
        /// Aim at a relay already running (`ws://HOST:PORT/twilio`) instead of building
        /// and starting ours; relay_bench prints the environment to start it with.
        #[arg(long)]
        relay_url: Option<String>,
        /// With `--relay-url`: the relay's pid, for CPU and memory.
        #[arg(long, requires = "relay_url")]
        relay_pid: Option<u32>,
        /// Fixed ports for the fakes (for a relay configured by hand); 0 = free ports.
        #[arg(long, default_value_t = 0)]
        deepgram_port: u16,
        #[arg(long, default_value_t = 0)]
        elevenlabs_port: u16,
        #[arg(long, default_value_t = 0)]
        control_port: u16,
    },
}

pub fn run(repo: &Repo, args: &BenchArgs) -> Result<()> {
    let BenchTarget::Relay {
        calls,
        duration,
        ramp,
        relay_url,
        relay_pid,
        deepgram_port,
        elevenlabs_port,
        control_port,
    } = &args.target;
    let mut build = cargo();
    build.current_dir(repo.root()).args([
        "build",
        "--release",
        "-p",
        "cmb-tests",
        "--bin",
        "relay_bench",
    ]);
    if relay_url.is_none() {
        build.args(["-p", "media-relay", "--bin", "media-relay"]);
    }
    run_checked(&mut build, "cargo build --release (relay_bench, relay)")?;
    let bins = repo.root().join("target/release");
    let mut bench = std::process::Command::new(bins.join("relay_bench"));
    bench.args([
        "--calls",
        &calls.to_string(),
        "--duration-secs",
        &duration.to_string(),
        "--ramp-secs",
        &ramp.to_string(),
        "--deepgram-port",
        &deepgram_port.to_string(),
        "--elevenlabs-port",
        &elevenlabs_port.to_string(),
        "--control-port",
        &control_port.to_string(),
    ]);
    match relay_url {
        Some(url) => {
            bench.args(["--relay-url", url]);
            if let Some(pid) = relay_pid {
                bench.args(["--relay-pid", &pid.to_string()]);
            }
        }
        None => {
            bench.arg("--relay-bin").arg(bins.join("media-relay"));
        }
    }
    run_checked(&mut bench, "relay_bench")
}
