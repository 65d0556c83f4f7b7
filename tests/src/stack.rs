//! The stack launcher integration tests use: a real Worker under `wrangler dev` (fresh
//! local D1/KV/DO state per stack, free ports), optionally the media relay and the `fakes`
//! binary, each started as its own process group and waited for on `GET /health`.
//!
//! It only launches what earlier steps built: the Worker bundle (`build/worker/shim.mjs`),
//! wrangler in `node_modules`, Node ≥ 22, and the `media-relay`/`fakes` binaries. When
//! anything is missing it fails loudly with the command that fixes it; it never skips a
//! test and never builds anything itself.
//!
//! Children die with the test process however it ends (see `xtask::service`: a watchdog
//! pipe per process group), so a `Stack` may live in a `static` and never be dropped. A
//! dropped `Stack` stops its services and deletes its state directory.
//!
//! Each stack lives in `target/cmb-stack/<pid>-<n>/` (state plus `worker.log`,
//! `relay.log`, `fakes.log`). `CMB_STACK_LOG=1` also streams every line to stderr with a
//! `worker:<port> |` style prefix; `CMB_STACK_KEEP=1` keeps the directory after a drop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _, Result};
use xtask::health::{self, HealthReply};
use xtask::net::free_port;
use xtask::providers::{self, FAKES_READY, RELAY_PROVIDER_KEYS, WORKER_PROVIDER_KEYS};
use xtask::repo::Repo;
use xtask::service::{Service, ServiceSpec};
use xtask::toolchain::{workspace_bin_dir, Node};
use xtask::wrangler::{apply_migrations, WranglerDev};

/// How long a service may take to answer `/health`. Generous: several test binaries may
/// start wrangler at once on a 2-core machine.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

/// The hint every "something is not built" error carries.
const BUILD_HINT: &str = "run `cargo xtask test` (or `cargo xtask build-worker`) first";

/// Relay settings the launcher controls; inherited values must not leak into a test.
const RELAY_SETTINGS: &[&str] = &[
    "RELAY_LISTEN",
    "RELAY_SECRET",
    "RELAY_PUBLIC_URL",
    "TWILIO_AUTH_TOKEN",
    "WORKER_URL",
    "DEEPGRAM_API_KEY",
    "DEEPGRAM_URL",
    "ELEVENLABS_API_KEY",
    "ELEVENLABS_URL",
    "RELAY_MAX_CALLS",
    "RELAY_DRAIN_SECS",
    "RELAY_LOG_FORMAT",
];

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct StackOptions {
    /// Worker configuration on top of `wrangler.toml`'s `[vars]` (secrets included: locally
    /// both are plain env). The developer's `.dev.vars` is never read. `PUBLIC_BASE_URL`
    /// (and `RELAY_URL` with a relay) are filled in from the chosen ports unless given.
    pub worker_vars: BTreeMap<String, String>,
    /// Also start the `media-relay` binary, wired to this Worker.
    pub with_relay: bool,
    /// Relay environment on top of what the launcher derives (listen address, public URL,
    /// Worker URL, the Worker's `RELAY_SECRET`/`TWILIO_AUTH_TOKEN`, fake provider URLs).
    pub relay_env: BTreeMap<String, String>,
    /// Also start the `fakes` binary and point the Worker and relay at it. Provider keys
    /// not given in `worker_vars`/`relay_env` get generated stand-ins, which the fakes are
    /// given too.
    pub with_fakes: bool,
    /// Postgres for the Worker's `HYPERDRIVE` binding (wrangler dev connects to it
    /// directly); set together with `DB_BACKEND=postgres` in `worker_vars`.
    pub postgres_url: Option<String>,
}

/// A running stack. Dropping it stops every process and deletes its state.
pub struct Stack {
    dir: PathBuf,
    worker_url: String,
    relay_url: Option<String>,
    fake_urls: BTreeMap<String, String>,
    worker_vars: BTreeMap<String, String>,
    relay_env: BTreeMap<String, String>,
    /// The Worker's Postgres database, when it runs on Postgres.
    postgres_url: Option<String>,
    // Stopped in reverse start order by Drop (relay and Worker before the fakes).
    services: Vec<Service>,
}

impl Stack {
    /// Starts the stack and waits until every service answers `/health` (200 or 503: the
    /// Worker reports bad configuration as 503, which tests may want to see).
    pub fn start(opts: StackOptions) -> Result<Stack> {
        let repo = Repo::from_crate_dir(env!("CARGO_MANIFEST_DIR"))?;
        let prereqs = Prereqs::check(&repo, &opts)?;
        let echo = std::env::var_os("CMB_STACK_LOG").is_some_and(|v| v == "1");

        let worker_port = free_port()?;
        let inspector_port = free_port()?;
        let worker_url = format!("http://127.0.0.1:{worker_port}");
        let relay_port = if opts.with_relay {
            Some(free_port()?)
        } else {
            None
        };

        // From here on every failure drops `stack`, which stops whatever already started
        // and removes the directory.
        let dir = fresh_state_dir(&prereqs.bins)?;
        let mut stack = Stack {
            dir: dir.clone(),
            worker_url: worker_url.clone(),
            relay_url: relay_port.map(|p| format!("http://127.0.0.1:{p}")),
            fake_urls: BTreeMap::new(),
            worker_vars: BTreeMap::new(),
            relay_env: BTreeMap::new(),
            postgres_url: opts.postgres_url.clone(),
            services: Vec::new(),
        };

        let mut worker_vars = BTreeMap::from([("PUBLIC_BASE_URL".to_owned(), worker_url.clone())]);
        let mut relay_env = BTreeMap::new();
        if let Some(port) = relay_port {
            let public = format!("ws://127.0.0.1:{port}/twilio");
            worker_vars.insert("RELAY_URL".into(), public.clone());
            relay_env.insert("RELAY_LISTEN".into(), format!("127.0.0.1:{port}"));
            relay_env.insert("RELAY_PUBLIC_URL".into(), public);
            relay_env.insert("WORKER_URL".into(), worker_url.clone());
            // A test stack is stopped with a few seconds' grace, not a deploy's drain.
            relay_env.insert("RELAY_DRAIN_SECS".into(), "3".into());
        }

        if opts.with_fakes {
            let creds = providers::fake_credentials(&mut rand::thread_rng());
            // The caller's credentials win; generated ones fill the gaps. The fakes check
            // whatever the Worker and relay will actually send.
            let mut effective = creds;
            for key in WORKER_PROVIDER_KEYS {
                if let Some(v) = opts.worker_vars.get(*key) {
                    effective.insert((*key).to_owned(), v.clone());
                }
            }
            for key in RELAY_PROVIDER_KEYS {
                if let Some(v) = opts.relay_env.get(*key) {
                    effective.insert((*key).to_owned(), v.clone());
                }
            }
            let fakes = start_fakes(&prereqs.bins, &dir, &effective, &worker_url, echo)?;
            stack.services.push(fakes);
            let fakes = stack.services.last_mut().context("fakes service")?;
            fakes.wait_for_line(STARTUP_TIMEOUT, |l| l.trim() == FAKES_READY)?;
            let lines = fakes.lines();
            stack.fake_urls = providers::collect_fakes(lines.iter().map(String::as_str));
            let wiring = providers::wire_fakes(&stack.fake_urls)?;
            for (key, value) in effective {
                if WORKER_PROVIDER_KEYS.contains(&key.as_str()) {
                    worker_vars.insert(key.clone(), value.clone());
                }
                if RELAY_PROVIDER_KEYS.contains(&key.as_str()) {
                    relay_env.insert(key, value);
                }
            }
            worker_vars.extend(wiring.worker_vars);
            relay_env.extend(wiring.relay_env);
        }

        // The caller's settings have the last word.
        worker_vars.extend(opts.worker_vars.clone());
        // Secrets the relay shares with the Worker come from the Worker's final config.
        for key in ["RELAY_SECRET", "TWILIO_AUTH_TOKEN"] {
            if let Some(v) = worker_vars.get(key) {
                relay_env.insert(key.to_owned(), v.clone());
            }
        }
        relay_env.extend(opts.relay_env.clone());
        stack.worker_vars = worker_vars.clone();
        stack.relay_env = relay_env.clone();

        // Fresh local D1 for this stack, migrated like `cargo xtask dev` does.
        let persist = dir.join("state");
        apply_migrations(&repo, &prereqs.node, &persist)?;
        // wrangler reads this instead of the repository's `.dev.vars`, so a developer's
        // local secrets never change what a test sees.
        let empty_env = dir.join("empty.env");
        std::fs::write(&empty_env, "").context("writing the empty env file")?;
        let wrangler = WranglerDev {
            port: worker_port,
            inspector_port,
            persist_to: persist,
            vars: worker_vars,
            env_file: Some(empty_env),
        };
        let mut spec = wrangler.spec(&repo, &prereqs.node, &format!("worker:{worker_port}"))?;
        if let Some(url) = &opts.postgres_url {
            spec = spec.env(
                "CLOUDFLARE_HYPERDRIVE_LOCAL_CONNECTION_STRING_HYPERDRIVE",
                url,
            );
        }
        let spec = spec
            .log_file(dir.join("worker.log"))
            .echo(echo)
            // Plain text in log files, and wrangler's own debug log beside them rather
            // than piling up in the home directory.
            .env("FORCE_COLOR", "0")
            .env("NO_COLOR", "1")
            .env("WRANGLER_LOG_PATH", dir.join("wrangler-logs"));
        stack.services.push(Service::spawn(spec)?);

        if let Some(port) = relay_port {
            let relay = spawn_relay(&prereqs.bins, &dir, port, &relay_env, echo, "relay.log")?;
            stack.services.push(relay);
        }

        stack.wait_healthy()?;
        Ok(stack)
    }

    fn wait_healthy(&mut self) -> Result<()> {
        let worker_health = format!("{}/health", self.worker_url);
        let relay_health = self.relay_url.as_ref().map(|u| format!("{u}/health"));
        for service in &mut self.services {
            let url = if service.name().starts_with("worker:") {
                &worker_health
            } else if let (true, Some(url)) = (service.name().starts_with("relay:"), &relay_health)
            {
                url
            } else {
                continue;
            };
            health::wait_until_up(url, service, STARTUP_TIMEOUT)?;
        }
        Ok(())
    }

    /// The Worker's base URL, e.g. `http://127.0.0.1:40123`.
    pub fn worker_url(&self) -> String {
        self.worker_url.clone()
    }

    /// The relay's base URL (`http://…`; its media endpoint is `ws://…/twilio`), if started.
    pub fn relay_url(&self) -> Option<String> {
        self.relay_url.clone()
    }

    /// A fake's announced URL by name (`twilio`, `cerebras`, `stripe`, `deepgram`,
    /// `elevenlabs`), if fakes were started.
    pub fn fake_url(&self, name: &str) -> Option<String> {
        self.fake_urls.get(name).cloned()
    }

    /// The Worker configuration actually passed (so tests can sign with its secrets).
    pub fn worker_vars(&self) -> &BTreeMap<String, String> {
        &self.worker_vars
    }

    /// The relay environment actually passed.
    pub fn relay_env(&self) -> &BTreeMap<String, String> {
        &self.relay_env
    }

    /// This stack's directory: local state and one log file per service.
    /// The database the Worker reads, as `cargo xtask admin` addresses it.
    pub fn admin_target(&self) -> xtask::admin::Target {
        match &self.postgres_url {
            Some(url) => xtask::admin::Target::Postgres(url.clone()),
            None => xtask::admin::Target::LocalD1(self.dir.join("state")),
        }
    }

    /// What `cargo xtask admin grant|revoke EMAIL` does, against this stack's database.
    pub fn set_admin(
        &self,
        email: &str,
        change: xtask::admin::Change,
    ) -> Result<xtask::admin::Outcome> {
        let repo = Repo::from_crate_dir(env!("CARGO_MANIFEST_DIR"))?;
        xtask::admin::set_role(&repo, &self.admin_target(), email, change)
    }

    /// Runs SQL against this stack's database (`xtask::admin::execute`).
    pub fn execute_sql(&self, sql: &str) -> Result<()> {
        let repo = Repo::from_crate_dir(env!("CARGO_MANIFEST_DIR"))?;
        xtask::admin::execute(&repo, &self.admin_target(), sql)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// One `GET /health` of the Worker, any status.
    pub fn worker_health(&self) -> Result<HealthReply> {
        health::get(
            &format!("{}/health", self.worker_url),
            Duration::from_secs(10),
        )
    }

    /// Kills a service at once: SIGKILL to its whole process group, as a crash would, with
    /// no chance to shut down cleanly. `name` is `worker`, `relay` or `fakes`.
    pub fn kill(&mut self, name: &str) -> Result<()> {
        self.service(name)?.kill()
    }

    /// Sends SIGTERM to a service's process group (what a container host sends to stop
    /// it), leaving it to shut down as it does.
    pub fn terminate(&mut self, name: &str) -> Result<()> {
        self.service(name)?.signal(xtask::service::Signal::SIGTERM)
    }

    /// The service's exit status once it has ended by itself, `None` while it runs.
    pub fn exited(&mut self, name: &str) -> Result<Option<std::process::ExitStatus>> {
        self.service(name)?.exited()
    }

    fn service(&mut self, name: &str) -> Result<&mut Service> {
        let prefixed = format!("{name}:");
        self.services
            .iter_mut()
            .find(|s| s.name() == name || s.name().starts_with(&prefixed))
            .with_context(|| format!("no service named {name} in this stack"))
    }

    /// Starts one more relay on a new port, with this stack's relay settings (same Worker,
    /// secrets and providers), as a second relay host behind the same Worker would run.
    /// Returns its `ws://…/twilio` URL once it answers `/health`.
    pub fn start_another_relay(&mut self) -> Result<String> {
        if self.relay_url.is_none() {
            bail!("this stack runs no relay");
        }
        let bins = workspace_bin_dir()?;
        let port = free_port()?;
        let public = format!("ws://127.0.0.1:{port}/twilio");
        let mut env = self.relay_env.clone();
        env.insert("RELAY_LISTEN".into(), format!("127.0.0.1:{port}"));
        env.insert("RELAY_PUBLIC_URL".into(), public.clone());
        let echo = std::env::var_os("CMB_STACK_LOG").is_some_and(|v| v == "1");
        let mut relay = spawn_relay(
            &bins,
            &self.dir,
            port,
            &env,
            echo,
            &format!("relay-{port}.log"),
        )?;
        let health_url = format!("http://127.0.0.1:{port}/health");
        let up = health::wait_until_up(&health_url, &mut relay, STARTUP_TIMEOUT);
        // Pushed first so that a failed start is still stopped by Drop.
        self.services.push(relay);
        up?;
        Ok(public)
    }

    /// The recent output of every service, for a failing test's message.
    pub fn logs(&self) -> String {
        self.services
            .iter()
            .map(|s| format!("--- {} ---\n{}", s.name(), s.tail(80)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        while let Some(mut service) = self.services.pop() {
            let _ = service.stop(Duration::from_secs(5));
        }
        if std::env::var_os("CMB_STACK_KEEP").is_some_and(|v| v == "1") {
            eprintln!("stack: kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Spawns the `media-relay` binary on `port` with exactly `env` on top of a clean slate.
fn spawn_relay(
    bins: &Path,
    dir: &Path,
    port: u16,
    env: &BTreeMap<String, String>,
    echo: bool,
    log: &str,
) -> Result<Service> {
    let mut spec = ServiceSpec::new(format!("relay:{port}"), bins.join("media-relay"))
        // Not the repository root: the relay would read a developer's `.env` there.
        .cwd(dir)
        .log_file(dir.join(log))
        .echo(echo);
    for key in RELAY_SETTINGS {
        spec = spec.env_remove(*key);
    }
    if std::env::var_os("RUST_LOG").is_none() {
        spec = spec.env("RUST_LOG", "info");
    }
    for (key, value) in env {
        spec = spec.env(key, value);
    }
    Service::spawn(spec)
}

/// Everything the launcher needs from earlier build steps, checked up front.
struct Prereqs {
    node: Node,
    bins: PathBuf,
}

impl Prereqs {
    fn check(repo: &Repo, opts: &StackOptions) -> Result<Prereqs> {
        let node = Node::require(repo).context(BUILD_HINT)?;
        let mut missing = Vec::new();
        for path in [repo.wrangler_bin(), repo.worker_shim()] {
            if !path.is_file() {
                missing.push(path);
            }
        }
        let bins = workspace_bin_dir()?;
        if opts.with_relay {
            missing.push(bins.join("media-relay"));
        }
        if opts.with_fakes {
            missing.push(bins.join("fakes"));
        }
        missing.retain(|p| !p.is_file());
        if !missing.is_empty() {
            let list: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
            bail!("missing {}: {BUILD_HINT}", list.join(", "));
        }
        warn_if_stale(repo);
        Ok(Prereqs { node, bins })
    }
}

/// Tests against an old Worker bundle pass or fail for the wrong reasons; say so when a
/// Worker source file is newer than the bundle (a warning: the bundle may be deliberate).
fn warn_if_stale(repo: &Repo) {
    let Some(built) = modified(&repo.worker_shim()) else {
        return;
    };
    let sources = [
        repo.root().join("workers").join("api").join("src"),
        repo.root().join("workers").join("core").join("src"),
    ];
    if let Some(newer) = sources.iter().find_map(|dir| newer_file(dir, built)) {
        eprintln!(
            "stack: WARNING: {} is newer than the Worker bundle; run `cargo xtask build-worker` \
             (cargo xtask test does) to test the current code",
            newer.display()
        );
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    path.metadata().and_then(|m| m.modified()).ok()
}

fn newer_file(dir: &Path, than: SystemTime) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = newer_file(&path, than) {
                return Some(found);
            }
        } else if modified(&path).is_some_and(|m| m > than) {
            return Some(path);
        }
    }
    None
}

/// A new, empty state directory under `<target>/cmb-stack/`, named `<pid>-<n>`. Stacks held
/// in statics are never dropped, so directories of processes that no longer run are
/// removed here instead.
fn fresh_state_dir(bins: &Path) -> Result<PathBuf> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let root = bins.parent().unwrap_or(bins).join("cmb-stack");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    for entry in std::fs::read_dir(&root)?.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = root.join(format!(
        "{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn start_fakes(
    bins: &Path,
    dir: &Path,
    creds: &BTreeMap<String, String>,
    worker_url: &str,
    echo: bool,
) -> Result<Service> {
    let mut spec = ServiceSpec::new("fakes", bins.join("fakes"))
        .args(["--host", "127.0.0.1", "--base-port", "0"])
        .env("WORKER_URL", worker_url)
        .cwd(dir)
        .log_file(dir.join("fakes.log"))
        .echo(echo);
    if std::env::var_os("RUST_LOG").is_none() {
        spec = spec.env("RUST_LOG", "info");
    }
    for (key, value) in creds {
        spec = spec.env(key, value);
    }
    Service::spawn(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// State directories of processes that no longer exist are swept; ours are kept and
    /// each new stack gets its own empty directory.
    #[test]
    fn state_dirs_are_fresh_and_stale_ones_swept() {
        let base = std::env::temp_dir().join(format!("cmb-stack-test-{}", std::process::id()));
        let bins = base.join("debug");
        let root = base.join("cmb-stack");
        // No process can have this pid (it is above any pid_max).
        let stale = root.join(format!("{}-0", u32::MAX - 1));
        std::fs::create_dir_all(stale.join("state")).unwrap();

        let first = fresh_state_dir(&bins).unwrap();
        let second = fresh_state_dir(&bins).unwrap();

        assert!(!stale.exists(), "stale directory not removed");
        assert_ne!(first, second);
        assert!(first.starts_with(&root) && first.is_dir() && second.is_dir());
        assert_eq!(std::fs::read_dir(&second).unwrap().count(), 0);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
