//! `cargo xtask bench relay`: builds the relay and the load generator in release mode
//! and runs `relay_bench` (N simulated calls against the relay and in-process fakes,
//! measured from /proc and the relay's own metrics). With `--vs-node`, our relay and the
//! shared kit's minimal Node.js relay side by side instead (`vs_node`).
//!
//! `cargo xtask bench latency`: builds the Worker, the relay and `latency_bench`, and runs
//! whole calls through the Worker under wrangler dev and the relay against fakes with
//! realistic provider delays, each latency technique off and on.
//!
//! Benchmarks, not tests: they print figures and never fail on a slow machine.

use anyhow::Result;
use clap::{Args, Subcommand};
use xtask::repo::Repo;

use super::{build, cargo, run_checked, setup, vs_node};

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
        /// Instead of relay_bench: our relay and the minimal Node.js relay of the
        /// side-by-side kit, alternately, under the kit's own load generator (`--calls`,
        /// `--duration`), reporting CPU per call-second, per frame handled and the ratio
        /// ours / Node. Needs `node` and `npm`.
        #[arg(long)]
        vs_node: bool,
        /// With `--vs-node`: runs of each relay (medians are reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// With `--vs-node`: the kit (copied, never written to), relative to the repo root.
        #[arg(long, default_value = "../shared/bench")]
        node_kit: std::path::PathBuf,
        /// Passed to relay_bench as they are, e.g. `--relay-url ws://HOST:PORT/twilio
        /// --relay-pid PID --deepgram-port N …` to aim at a relay started by hand (then
        /// ours is not built or started). `relay_bench --help` lists them.
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
    /// Call latency (answer → greeting, end of speech → reply, barge-in → clear) through
    /// the Worker under wrangler dev and the relay, with realistic provider delays, each
    /// latency technique off and on.
    Latency {
        /// Calls per setting of each technique.
        #[arg(long, default_value_t = 10)]
        calls: usize,
        /// Build the Worker with wasm-opt (`build-worker --release`) instead of the dev
        /// build the tests use.
        #[arg(long)]
        release_worker: bool,
        /// Passed to latency_bench as they are, e.g. `--llm-first-token-ms 400
        /// --endpointing-ms 500`. `latency_bench --help` lists them.
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
}

pub fn run(repo: &Repo, args: &BenchArgs) -> Result<()> {
    match &args.target {
        BenchTarget::Relay {
            vs_node: true,
            calls,
            duration,
            reps,
            node_kit,
            ..
        } => {
            build_release(repo)?;
            let sitting = vs_node::Sitting {
                calls: *calls,
                duration: *duration,
                warmup: 5,
                reps: *reps,
                kit: node_kit.clone(),
            };
            vs_node::run(repo, &repo.root().join("target/release"), &sitting)
        }
        BenchTarget::Relay {
            calls,
            duration,
            ramp,
            bench_args,
            ..
        } => relay(repo, *calls, *duration, *ramp, bench_args),
        BenchTarget::Latency {
            calls,
            release_worker,
            bench_args,
        } => latency(repo, *calls, *release_worker, bench_args),
    }
}

/// Release builds of the relay (what production runs) and of the bench with its
/// in-process fakes (so the fakes' own work stays small next to the delays they inject);
/// the same packages as `bench relay` builds, so the two share their build. The Worker is
/// the dev build the tests use unless `release_worker`: it runs under wrangler dev either
/// way, which is a dev server, so its figures are the DO's logic, not Cloudflare's speed.
fn latency(repo: &Repo, calls: usize, release_worker: bool, bench_args: &[String]) -> Result<()> {
    setup::run(repo)?;
    build::build_worker(repo, release_worker)?;
    build_release(repo)?;
    // The stack launcher finds media-relay next to the running bench (target/release).
    let mut bench = std::process::Command::new(repo.root().join("target/release/latency_bench"));
    bench.args(["--calls", &calls.to_string()]).args(bench_args);
    run_checked(&mut bench, "latency_bench")
}

fn relay(repo: &Repo, calls: usize, duration: u64, ramp: u64, bench_args: &[String]) -> Result<()> {
    let external = bench_args.iter().any(|a| a.starts_with("--relay-url"));
    build_release(repo)?;
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

/// The relay, both benchmarks and the fakes (the control peer of `--vs-node`) in release
/// mode, always together: building one alone
/// would resolve different dependency features and rebuild half the tree each time
/// another is built.
fn build_release(repo: &Repo) -> Result<()> {
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
        "--bin",
        "latency_bench",
        "--bin",
        "fakes",
    ]);
    run_checked(
        &mut build,
        "cargo build --release (relay, relay_bench, latency_bench, fakes)",
    )
}
