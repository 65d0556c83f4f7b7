//! How we invoke wrangler: `wrangler dev` for a local Worker and `wrangler d1 migrations
//! apply` for its database, with the environment TOOLCHAIN.md prescribes (Node ≥ 22 first
//! on `PATH`, no metrics, no `cf` fetch, no rebuild).
//!
//! It builds commands only; starting and stopping them is `service`'s job, and building
//! the Worker is `cargo xtask build-worker`'s.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::repo::Repo;
use crate::service::ServiceSpec;
use crate::toolchain::Node;

/// Name of the D1 binding in `wrangler.toml`.
pub const D1_BINDING: &str = "DB";

/// Environment every wrangler invocation gets.
fn base_env(node: &Node) -> Vec<(&'static str, OsString)> {
    vec![
        // wrangler's `#!/usr/bin/env node` must find Node ≥ 22, not an older system one.
        ("PATH", node.path_env()),
        ("WRANGLER_SEND_METRICS", "false".into()),
        // Offline: do not fetch the `request.cf` object from Cloudflare.
        ("CLOUDFLARE_CF_FETCH_ENABLED", "false".into()),
        // wrangler.toml's [build] command skips worker-build when this is set: callers
        // build once up front instead of on every wrangler start.
        ("SKIP_WORKER_BUILD", "1".into()),
    ]
}

/// Variables that would change what wrangler loads, dropped from the inherited
/// environment so a developer's shell cannot alter a run.
const INHERITED_TO_DROP: &[&str] = &[
    "CLOUDFLARE_INCLUDE_PROCESS_ENV",
    "CLOUDFLARE_LOAD_DEV_VARS_FROM_DOT_ENV",
    "CLOUDFLARE_ENV",
];

/// A `wrangler dev` to start.
#[derive(Debug, Clone)]
pub struct WranglerDev {
    pub port: u16,
    pub inspector_port: u16,
    /// Local D1/KV/DO state directory.
    pub persist_to: PathBuf,
    /// Passed as `--var NAME:VALUE`; they override `[vars]` and `.dev.vars` alike.
    pub vars: BTreeMap<String, String>,
    /// Loaded instead of `.dev.vars` when set. Tests point this at an empty file so a
    /// developer's own `.dev.vars` never leaks into them.
    pub env_file: Option<PathBuf>,
}

impl WranglerDev {
    /// The arguments after `wrangler`.
    pub fn args(&self, repo: &Repo) -> Result<Vec<OsString>> {
        let mut args: Vec<OsString> = vec![
            "dev".into(),
            "--config".into(),
            repo.wrangler_config().into(),
            "--ip".into(),
            "127.0.0.1".into(),
            "--port".into(),
            self.port.to_string().into(),
            "--inspector-port".into(),
            self.inspector_port.to_string().into(),
            "--show-interactive-dev-session=false".into(),
            "--persist-to".into(),
            self.persist_to.clone().into(),
            // `/__scheduled?cron=…` runs the cron handler (the event log's prune).
            "--test-scheduled".into(),
        ];
        if let Some(file) = &self.env_file {
            args.push("--env-file".into());
            args.push(file.into());
        }
        for (name, value) in &self.vars {
            check_var_name(name)?;
            args.push("--var".into());
            // wrangler splits at the first ':' only, so values may contain ':' (URLs).
            args.push(format!("{name}:{value}").into());
        }
        Ok(args)
    }

    /// A service spec for this `wrangler dev`, run from the repository root.
    pub fn spec(&self, repo: &Repo, node: &Node, name: &str) -> Result<ServiceSpec> {
        let mut spec = ServiceSpec::new(name, repo.wrangler_bin())
            .args(self.args(repo)?)
            .cwd(repo.root());
        for (key, value) in base_env(node) {
            spec = spec.env(key, value);
        }
        for key in INHERITED_TO_DROP {
            spec = spec.env_remove(*key);
        }
        Ok(spec)
    }
}

/// A non-interactive `wrangler <args> --config <repo's wrangler.toml>` in the repository,
/// with our Node and without the inherited variables that change wrangler's behaviour.
fn wrangler_command(repo: &Repo, node: &Node, args: &[&str]) -> Command {
    let mut cmd = Command::new(repo.wrangler_bin());
    cmd.args(args)
        .arg("--config")
        .arg(repo.wrangler_config())
        .current_dir(repo.root())
        // Belt and braces: wrangler only asks for confirmation on a TTY, and CI=true
        // makes it never ask.
        .env("CI", "true");
    for (key, value) in base_env(node) {
        cmd.env(key, value);
    }
    for key in INHERITED_TO_DROP {
        cmd.env_remove(key);
    }
    cmd
}

/// `wrangler d1 migrations apply DB --local --persist-to <dir>`, non-interactive.
pub fn migrations_apply(repo: &Repo, node: &Node, persist_to: &std::path::Path) -> Command {
    let mut cmd = wrangler_command(
        repo,
        node,
        &["d1", "migrations", "apply", D1_BINDING, "--local"],
    );
    cmd.arg("--persist-to").arg(persist_to);
    cmd
}

/// Where `wrangler d1 execute` runs: the local database of a `--persist-to` directory,
/// or the production D1 of the account wrangler is logged in to.
#[derive(Debug, Clone)]
pub enum D1Target {
    Local(std::path::PathBuf),
    Remote,
}

/// `wrangler d1 execute DB (--local --persist-to <dir> | --remote) --command <sql> --json`.
pub fn d1_execute(repo: &Repo, node: &Node, target: &D1Target, sql: &str) -> Command {
    let mut cmd = wrangler_command(
        repo,
        node,
        &["d1", "execute", D1_BINDING, "--json", "--yes"],
    );
    match target {
        D1Target::Local(dir) => {
            cmd.arg("--local").arg("--persist-to").arg(dir);
        }
        D1Target::Remote => {
            cmd.arg("--remote");
        }
    }
    cmd.arg("--command").arg(sql);
    cmd
}

/// Runs one SQL statement on D1 and returns wrangler's JSON result (an array with one
/// `{results, success, meta}` per statement); a failure carries wrangler's output.
pub fn d1_query(
    repo: &Repo,
    node: &Node,
    target: &D1Target,
    sql: &str,
) -> Result<serde_json::Value> {
    // A local database that the running `wrangler dev` is writing at that moment answers
    // `SQLITE_BUSY`; the statement then did nothing (one transaction), so it is retried a
    // few times, 200 ms apart, before the error is returned.
    const BUSY_RETRIES: u32 = 10;
    let mut attempt = 0;
    let out = loop {
        let out = d1_execute(repo, node, target, sql)
            .output()
            .with_context(|| format!("running {}", repo.wrangler_bin().display()))?;
        let busy =
            !out.status.success() && String::from_utf8_lossy(&out.stdout).contains("SQLITE_BUSY");
        if !busy || attempt == BUSY_RETRIES {
            break out;
        }
        attempt += 1;
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrangler d1 execute failed ({}):\n{}\n{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("wrangler d1 execute printed no JSON: {stdout}"))
}

/// Runs the migrations, failing with wrangler's output if it fails.
pub fn apply_migrations(repo: &Repo, node: &Node, persist_to: &std::path::Path) -> Result<()> {
    let out = migrations_apply(repo, node, persist_to)
        .output()
        .with_context(|| format!("running {}", repo.wrangler_bin().display()))?;
    if !out.status.success() {
        bail!(
            "wrangler d1 migrations apply failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Worker variable names are identifiers; anything else would be mangled by `--var`.
fn check_var_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if !ok {
        bail!("invalid Worker variable name {name:?}");
    }
    Ok(())
}

/// `wrangler deploy --dry-run --env <env> --outdir <outdir>`: bundles the Worker and
/// validates the environment's configuration without uploading anything or logging in.
/// The Worker must already be built (`SKIP_WORKER_BUILD` is set). Containers are not
/// built (`--containers-rollout=none`: no Docker, no image build); their configuration
/// is still read and checked.
pub fn deploy_dry_run(repo: &Repo, node: &Node, env: &str, outdir: &std::path::Path) -> Command {
    let mut cmd = wrangler_command(
        repo,
        node,
        &[
            "deploy",
            "--dry-run",
            "--containers-rollout=none",
            "--env",
            env,
        ],
    );
    cmd.arg("--outdir").arg(outdir);
    // Plain text, for reading its warnings.
    cmd.env("FORCE_COLOR", "0").env("NO_COLOR", "1");
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> Repo {
        Repo::from_crate_dir(env!("CARGO_MANIFEST_DIR")).unwrap()
    }

    fn dev(vars: &[(&str, &str)]) -> WranglerDev {
        WranglerDev {
            port: 8787,
            inspector_port: 9229,
            persist_to: PathBuf::from("/tmp/state"),
            vars: vars
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            env_file: None,
        }
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The flags TOOLCHAIN.md requires are all there, in a usable form.
    #[test]
    fn dev_args_carry_the_required_flags() {
        let args = strings(dev(&[]).args(&repo()).unwrap());
        let joined = args.join(" ");
        assert!(args[0] == "dev");
        assert!(joined.contains("--ip 127.0.0.1 --port 8787 --inspector-port 9229"));
        assert!(joined.contains("--show-interactive-dev-session=false"));
        assert!(joined.contains("--persist-to /tmp/state"));
        assert!(!joined.contains("--env-file"));
    }

    /// Vars become `--var NAME:VALUE` pairs in name order; values keep their colons.
    #[test]
    fn vars_become_var_flags() {
        let args = strings(
            dev(&[("RELAY_URL", "ws://127.0.0.1:1/twilio"), ("A_B", "x")])
                .args(&repo())
                .unwrap(),
        );
        let vars: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "--var")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(vars, ["A_B:x", "RELAY_URL:ws://127.0.0.1:1/twilio"]);
    }

    /// A name wrangler would split wrongly is rejected instead of passed on.
    #[test]
    fn bad_var_names_are_rejected() {
        assert!(dev(&[("BAD:NAME", "x")]).args(&repo()).is_err());
        assert!(dev(&[("", "x")]).args(&repo()).is_err());
    }

    /// The env file option replaces `.dev.vars` loading when given.
    #[test]
    fn env_file_is_passed() {
        let mut d = dev(&[]);
        d.env_file = Some(PathBuf::from("/tmp/empty.env"));
        let joined = strings(d.args(&repo()).unwrap()).join(" ");
        assert!(joined.contains("--env-file /tmp/empty.env"));
    }
}
