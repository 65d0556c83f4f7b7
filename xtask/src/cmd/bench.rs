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
        /// Passed to relay_bench as they are, e.g. `--relay-url ws://HOST:PORT/twilio
        /// --relay-pid PID --deepgram-port N …` to aim at a relay started by hand (then
        /// ours is not built or started). `relay_bench --help` lists them.
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
}

pub fn run(repo: &Repo, args: &BenchArgs) -> Result<()> {
    let BenchTarget::Relay {
        calls,
        duration,
        ramp,
        bench_args,
    } = &args.target;
    let external = bench_args.iter().any(|a| a.starts_with("--relay-url"));
    // Both, always: building one alone would resolve different dependency features and
    // rebuild half the tree each time the other is built.
    let mut build = cargo();
    build.current_dir(repo.root()).args([
        "build",
        "--release",
        "-p",
        "media-relay",
        "--bin",
        "media-relay",
        "-p",
        "cmb-tests",
        "--bin",
        "relay_bench",
    ]);
    run_checked(&mut build, "cargo build --release (relay, relay_bench)")?;
    let bins = repo.root().join("target/release");
    let mut bench = std::process::Command::new(bins.join("relay_bench"));
    bench.args([
        "--calls",
        &calls.to_string(),
        "--duration-secs",
        &duration.to_string(),
        "--ramp-secs",
        &ramp.to_string(),
    ]);
    bench.args(bench_args);
    if !external {
        bench.arg("--relay-bin").arg(bins.join("media-relay"));
    }
    run_checked(&mut bench, "relay_bench")
}
