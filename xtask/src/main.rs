//! `cargo xtask`: the project's developer commands.
//!
//! - `setup`: install what is missing (idempotent, seconds when warm).
//! - `build-worker`: build the Worker with worker-build, offline.
//! - `deploy-check`: the deploy rehearsal (dry runs of the production envs, size budget).
//! - `dev`: the whole local stack (Worker, relay, fakes) until Ctrl-C.
//! - `test`: everything CI checks, in order, failing on the first problem.
//! - `migrate --database-url URL`: the Postgres migrations a database has not had yet.
//! - `admin grant|revoke EMAIL`: give or take an account's admin role (the only way).
//! - `bench relay`: the media relay under load; `bench latency`: call latency with
//!   realistic providers, techniques off and on (figures in docs/PERFORMANCE.md).
//!
//! Argument parsing and dispatch only; each command lives in `cmd/`.

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xtask::repo::Repo;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Call Me Back developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install missing tools: wasm32 target, wasm-bindgen-cli, worker-build, Node >= 22,
    /// npm packages (wrangler, binaryen, esbuild), PostgreSQL.
    Setup,
    /// Build the Worker into build/ (where wrangler.toml's `main` points).
    BuildWorker {
        /// Optimised build with wasm-opt (for deploys and size checks); default is a fast
        /// dev build.
        #[arg(long)]
        release: bool,
    },
    /// The deploy rehearsal: release build, `wrangler deploy --dry-run` of every
    /// production environment, bundle sizes against the 1 MB gzip budget.
    DeployCheck(cmd::deploy_check::DeployCheckArgs),
    /// Run the local stack: wrangler dev (Worker, D1, KV, DOs), the media relay, and the
    /// fake providers when no real provider keys are configured. Ctrl-C stops everything.
    Dev(cmd::dev::DevArgs),
    /// Follow the README's quickstart against a fresh `cargo xtask dev --simulate` and
    /// check every promised answer (a step of `test`).
    Quickstart,
    /// Setup, format check, clippy (native and wasm32), Worker build, all tests.
    Test(cmd::test::TestArgs),
    /// Apply the Postgres migrations a database has not had yet (tracked; safe to re-run).
    Migrate(cmd::migrate::MigrateArgs),
    /// Grant or revoke an account's admin role (`admin grant EMAIL [--remote | --database-url URL]`).
    Admin(cmd::admin::AdminArgs),
    /// Benchmarks (`cargo xtask bench relay [--calls N --duration S --ramp S] [-- RELAY_BENCH_ARGS]`,
    /// `cargo xtask bench relay --vs-node [--calls N --duration S --reps R]`,
    /// `cargo xtask bench latency [--calls N] [--release-worker] [-- LATENCY_BENCH_ARGS]`).
    Bench(cmd::bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let repo = match Repo::from_crate_dir(env!("CARGO_MANIFEST_DIR")) {
        Ok(repo) => repo,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Setup => cmd::setup::run(&repo),
        Command::BuildWorker { release } => cmd::build::build_worker(&repo, release),
        Command::DeployCheck(args) => cmd::deploy_check::run(&repo, &args),
        Command::Dev(args) => cmd::dev::run(&repo, &args),
        Command::Test(args) => cmd::test::run(&repo, &args),
        Command::Quickstart => cmd::quickstart::run(&repo),
        Command::Bench(args) => cmd::bench::run(&repo, &args),
        Command::Admin(args) => cmd::admin::run(&repo, &args),
        Command::Migrate(args) => cmd::migrate::run(&repo, &args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
