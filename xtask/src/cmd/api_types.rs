//! The frontend's TypeScript types, generated from the OpenAPI document exactly as the
//! README tells frontend developers to (`npx openapi-typescript workers/core/openapi.json
//! -o …`), into `target/api-types/`, then type-checked with `tsc --noEmit --strict`: a
//! document the generator cannot read, or types that do not compile, fail the step.
//!
//! Both tools come pinned from package.json through `npm ci` (`cargo xtask setup`).

use std::process::Command;

use anyhow::{Context as _, Result};
use xtask::repo::Repo;
use xtask::toolchain::Node;

use super::run_checked;

/// The document, as the README names it (relative to the repository root).
const DOCUMENT: &str = "workers/core/openapi.json";
/// Where the step writes the types (relative to the repository root).
const OUTPUT: &str = "target/api-types/api.ts";

pub fn run(repo: &Repo) -> Result<()> {
    let node = Node::require(repo)?;
    let npx = node.bin_dir.join("npx");
    let npx = if npx.is_file() {
        npx
    } else {
        xtask::toolchain::which("npx").context("npx not found: run `cargo xtask setup`")?
    };
    let npx_in_root = |args: &[&str]| {
        let mut cmd = Command::new(&npx);
        // `--no-install`: only the pinned packages from node_modules, never a download.
        cmd.arg("--no-install")
            .args(args)
            .current_dir(repo.root())
            .env("PATH", node.path_env());
        cmd
    };
    run_checked(
        &mut npx_in_root(&["openapi-typescript", DOCUMENT, "-o", OUTPUT]),
        "openapi-typescript",
    )?;
    run_checked(
        &mut npx_in_root(&["tsc", "--noEmit", "--strict", OUTPUT]),
        "tsc --noEmit (the generated API types)",
    )
}
