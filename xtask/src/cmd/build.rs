//! `cargo xtask build-worker`: runs worker-build for `workers/api` so that
//! `build/worker/shim.mjs` (wrangler.toml's `main`) exists, fully offline.
//!
//! worker-build would otherwise download wasm-bindgen and wasm-opt from GitHub and esbuild
//! from npm at build time; we hand it the ones `cargo xtask setup` installed
//! (`WASM_BINDGEN_BIN`, `WASM_OPT_BIN`, `ESBUILD_BIN`). It installs nothing itself.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use xtask::repo::Repo;
use xtask::toolchain::{CargoTool, Node};

use super::run_checked;

/// Dev builds skip wasm-opt (tens of seconds saved per build); `--release` runs binaryen's
/// wasm-opt from `node_modules` as worker-build's release profile asks.
pub fn build_worker(repo: &Repo, release: bool) -> Result<()> {
    let started = Instant::now();
    let wasm_bindgen = CargoTool::wasm_bindgen(repo)?.require(repo)?;
    let worker_build = CargoTool::worker_build(repo)?.require(repo)?;
    let node = Node::require(repo)?;
    let esbuild = repo.esbuild_bin();
    if !esbuild.is_file() {
        bail!(
            "{} missing: run `cargo xtask setup` (npm ci installs it)",
            esbuild.display()
        );
    }

    let mut cmd = Command::new(worker_build);
    // worker-build finds the crate from its working directory; `--out-dir` is resolved
    // against the crate, so pass it absolute to land in <repo>/build.
    cmd.current_dir(repo.worker_crate_dir())
        .env("WASM_BINDGEN_BIN", &wasm_bindgen)
        .env("ESBUILD_BIN", &esbuild)
        // binaryen's wasm-opt is a Node script.
        .env("PATH", node.path_env());
    if release {
        let wasm_opt = repo.wasm_opt_bin();
        if !wasm_opt.is_file() {
            bail!("{} missing: run `cargo xtask setup`", wasm_opt.display());
        }
        // The size-bound profile (root Cargo.toml `[profile.worker-release]`; wasm-opt
        // `-Oz` from workers/api's `[package.metadata.wasm-pack.profile.custom]`).
        cmd.args(["--profile", "worker-release"])
            .env("WASM_OPT_BIN", wasm_opt);
    } else {
        cmd.args(["--dev", "--no-opt"]);
    }
    cmd.arg("--out-dir").arg(repo.worker_build_dir());

    let profile = if release { "release" } else { "dev" };
    println!("build-worker: worker-build ({profile}) for workers/api …");
    run_checked(&mut cmd, "worker-build")?;

    if release {
        strip_names(repo, &node)?;
    }

    copy_assets(repo)?;

    let shim = repo.worker_shim();
    if !shim.is_file() {
        bail!(
            "worker-build succeeded but {} was not written; wrangler.toml's `main` needs it",
            shim.display()
        );
    }
    println!(
        "build-worker: {} ready ({profile}, {:.1}s)",
        shim.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The Worker's static assets (wrangler.toml `[assets]`, binding `ASSETS`), served
/// through the Worker rather than compiled into the wasm: the OpenAPI document, whose
/// 300 KB of JSON would cost ~20 KB of the gzipped upload's budget, and the operators'
/// console (`workers/console/`, served at `/admin`).
fn copy_assets(repo: &Repo) -> Result<()> {
    let dir = repo.worker_build_dir().join("assets");
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to)
            .map(drop)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))
    };
    let console = dir.join("admin");
    // Recreated, so a file removed from the console does not linger in the upload.
    if console.exists() {
        std::fs::remove_dir_all(&console)
            .with_context(|| format!("removing {}", console.display()))?;
    }
    std::fs::create_dir_all(&console).with_context(|| format!("creating {}", console.display()))?;
    copy(
        &repo.root().join("workers/core/openapi.json"),
        &dir.join("openapi.json"),
    )?;
    let from = repo.root().join("workers/console");
    let files = std::fs::read_dir(&from).with_context(|| format!("listing {}", from.display()))?;
    for file in files {
        let path = file?.path();
        if path.is_file() {
            copy(
                &path,
                &console.join(path.file_name().expect("a file's name")),
            )?;
        }
    }
    Ok(())
}

/// Drops the wasm's name section (function names, ~110 KB of the gzipped upload) that
/// worker-build keeps: wasm-opt rewrites the module without `--debuginfo` and runs no
/// pass. Panics still log their message and location (the panic hook); only a JS stack
/// trace through the wasm loses its function names.
fn strip_names(repo: &Repo, node: &Node) -> Result<()> {
    let wasm = repo.worker_build_dir().join("index_bg.wasm");
    let mut cmd = Command::new(repo.wasm_opt_bin());
    cmd.arg(&wasm)
        .arg("-o")
        .arg(&wasm)
        .env("PATH", node.path_env());
    // The features worker-build enables (so nothing newer than workerd runs is emitted).
    for feature in WASM_FEATURES {
        cmd.arg(format!("--enable-{feature}"));
    }
    run_checked(&mut cmd, "wasm-opt (strip names)")
}

/// worker-build 0.8's wasm-opt feature set.
const WASM_FEATURES: &[&str] = &[
    "mutable-globals",
    "sign-ext",
    "nontrapping-float-to-int",
    "bulk-memory",
    "multivalue",
    "reference-types",
    "exception-handling",
];
