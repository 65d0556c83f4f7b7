//! `cargo xtask test`: everything CI checks, in a fixed order, stopping at the first
//! failure: setup, rustfmt, clippy (native and wasm32), the deploy rehearsal
//! (`cargo xtask deploy-check`), the Worker build, the native
//! binaries the stack launcher runs, then `cargo test --workspace` (unit and integration
//! tests; the integration tests start their own `wrangler dev` via `cmb_tests::stack`) on
//! D1, and the Worker-backed integration suites once more on PostgreSQL.
//!
//! Prints each step's wall time and a summary. It does not start services itself.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use xtask::repo::Repo;

use super::{api_types, build, cargo, deploy_check, quickstart, run_checked, setup};

#[derive(Args)]
pub struct TestArgs {
    /// Skip rustfmt, clippy and the deploy rehearsal (for a quick local loop; CI never
    /// passes this).
    #[arg(long)]
    quick: bool,
    /// Passed to the test binaries after `--` (e.g. a test name filter).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    test_args: Vec<String>,
}

struct Step {
    name: &'static str,
    took: Duration,
    ok: bool,
}

pub fn run(repo: &Repo, args: &TestArgs) -> Result<()> {
    let started = Instant::now();
    let mut steps: Vec<Step> = Vec::new();
    let result = run_steps(repo, args, &mut steps);
    println!("\n==> summary");
    for step in &steps {
        println!(
            "  {:<44} {:>7.1}s  {}",
            step.name,
            step.took.as_secs_f64(),
            if step.ok { "ok" } else { "FAILED" }
        );
    }
    println!(
        "  {:<44} {:>7.1}s  {}",
        "total",
        started.elapsed().as_secs_f64(),
        if result.is_ok() { "ok" } else { "FAILED" }
    );
    result
}

fn run_steps(repo: &Repo, args: &TestArgs, steps: &mut Vec<Step>) -> Result<()> {
    let root = repo.root();
    let mut step = |name: &'static str, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        println!("\n==> {name}");
        let started = Instant::now();
        let result = f();
        let took = started.elapsed();
        let ok = result.is_ok();
        println!(
            "<== {name}: {} in {:.1}s",
            if ok { "ok" } else { "FAILED" },
            took.as_secs_f64()
        );
        steps.push(Step { name, took, ok });
        result
    };
    let cargo_in_root = |args: &[&str]| -> Command {
        let mut cmd = cargo();
        cmd.args(args).current_dir(root);
        cmd
    };

    step("setup", &mut || setup::run(repo))?;
    step("TypeScript types from openapi.json", &mut || {
        api_types::run(repo)
    })?;
    if !args.quick {
        step("cargo fmt --check", &mut || {
            run_checked(
                &mut cargo_in_root(&["fmt", "--all", "--", "--check"]),
                "cargo fmt --check (run `cargo fmt --all` to fix)",
            )
        })?;
        step("clippy (native, all targets)", &mut || {
            run_checked(
                &mut cargo_in_root(&[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]),
                "cargo clippy",
            )
        })?;
        step("clippy (wasm32: cmb-core, cmb-api)", &mut || {
            run_checked(
                &mut cargo_in_root(&[
                    "clippy",
                    "-p",
                    "cmb-core",
                    "-p",
                    "cmb-api",
                    "--target",
                    "wasm32-unknown-unknown",
                    "--",
                    "-D",
                    "warnings",
                ]),
                "cargo clippy --target wasm32-unknown-unknown",
            )
        })?;
        step("hadolint (Dockerfiles)", &mut || {
            super::dockerfile::lint(repo)
        })?;
    }
    // Before the dev build: it builds the release Worker into build/, which the dev
    // build then replaces for the integration tests.
    if !args.quick {
        step("deploy rehearsal (release Worker, dry runs)", &mut || {
            deploy_check::run(repo, &deploy_check::DeployCheckArgs::default())
        })?;
    }
    step("build the Worker (dev)", &mut || {
        build::build_worker(repo, false)
    })?;
    // The stack launcher runs these binaries; `cargo test` alone does not build another
    // package's binaries, and a stale one would test old code.
    step("build relay and fakes binaries", &mut || {
        run_checked(
            &mut cargo_in_root(&[
                "build",
                "-p",
                "media-relay",
                "--bin",
                "media-relay",
                "-p",
                "cmb-tests",
                "--bin",
                "fakes",
            ]),
            "cargo build (relay, fakes)",
        )
    })?;
    step("cargo test --workspace (D1)", &mut || {
        let mut cmd = cargo_in_root(&["test", "--workspace"]);
        if !args.test_args.is_empty() {
            cmd.arg("--").args(&args.test_args);
        }
        run_checked(&mut cmd, "cargo test")
    })?;
    // The same Worker-backed suites again with DB_BACKEND=postgres: each stack gets a
    // fresh database on the local PostgreSQL server (started if it is not running).
    step("integration tests on Postgres", &mut || {
        let mut cmd = cargo_in_root(&["test", "-p", "cmb-tests"]);
        for suite in POSTGRES_SUITES {
            cmd.args(["--test", suite]);
        }
        cmd.env("CMB_DB_BACKEND", "postgres");
        if !args.test_args.is_empty() {
            cmd.arg("--").args(&args.test_args);
        }
        run_checked(&mut cmd, "cargo test (Postgres)")
    })?;
    // Every command of the README's quickstart, against `cargo xtask dev` itself.
    step("README quickstart", &mut || quickstart::run(repo))
}

/// Every integration test binary that runs the Worker: all of them run on both backends.
const POSTGRES_SUITES: &[&str] = &["api_*", "e2e_*"];
