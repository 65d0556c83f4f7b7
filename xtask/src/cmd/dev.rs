//! `cargo xtask dev`: the whole stack on this machine until Ctrl-C.
//!
//! Order: setup → `.dev.vars` → decide real vs simulated providers → build the Worker and
//! the native binaries → D1 migrations → fakes (if simulated) → `wrangler dev` and the
//! relay → wait for both `/health` → print what runs where → stream logs. Any service
//! dying ends the session with its output; Ctrl-C or SIGTERM stops every process group
//! we started.
//!
//! Provider mode is explicit: never a silent fallback from real keys to fakes or back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use xtask::health::{self, HealthReply};
use xtask::net::ensure_port_free;
use xtask::providers::{
    self, collect_fakes, decide_mode, wire_fakes, ProviderMode, FAKES_READY, RELAY_PROVIDER_KEYS,
    WORKER_PROVIDER_KEYS,
};
use xtask::repo::Repo;
use xtask::service::{Service, ServiceSpec};
use xtask::toolchain::{workspace_bin_dir, Node};
use xtask::wrangler::{apply_migrations, WranglerDev};

use super::devvars::{ensure_dev_vars, read_env_file};
use super::{build, cargo, run_checked, setup};

/// How long a service may take to answer `/health` after starting.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

/// How long each process group gets to exit on SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Args)]
pub struct DevArgs {
    /// Worker port (wrangler dev).
    #[arg(long, default_value_t = 8787)]
    port: u16,
    /// Media relay port.
    #[arg(long, default_value_t = 8080)]
    relay_port: u16,
    /// wrangler's inspector (debugger) port.
    #[arg(long, default_value_t = 9229)]
    inspector_port: u16,
    /// First port for the fake providers (consecutive ports from here).
    #[arg(long, default_value_t = 8790)]
    fakes_base_port: u16,
    /// The database: `d1` (local SQLite, the default) or `postgres` (the machine's
    /// PostgreSQL server, database `cmb_dev`, through the Worker's Hyperdrive binding).
    #[arg(long, value_enum, default_value_t = DevDb::D1)]
    db: DevDb,
    /// Where wrangler keeps the local D1, KV and Durable Objects (default
    /// `.wrangler/state`; the README quickstart's check uses a fresh one).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Run against the fake providers even when real keys are configured (said in the
    /// banner like any simulated run).
    #[arg(long)]
    simulate: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DevDb {
    D1,
    Postgres,
}

/// The development database on Postgres (persistent; only new migrations are applied).
const DEV_PG_DATABASE: &str = "cmb_dev";

pub fn run(repo: &Repo, args: &DevArgs) -> Result<()> {
    setup::run(repo)?;
    let node = Node::require(repo)?;

    if ensure_dev_vars(repo)? {
        println!(
            "dev: created .dev.vars from .dev.vars.example (generated JWT_SECRET and RELAY_SECRET)"
        );
    }
    let dev_vars = read_env_file(&repo.root().join(".dev.vars"))?;
    let relay_file = read_env_file(&repo.root().join(".env"))?;
    let mode = if args.simulate {
        println!("dev: --simulate: the fake providers stand in for any configured keys");
        ProviderMode::Simulated
    } else {
        decide_mode(&provider_settings(&dev_vars, &relay_file))?
    };

    ensure_port_free(args.port, "the Worker")?;
    ensure_port_free(args.relay_port, "the relay")?;
    ensure_port_free(args.inspector_port, "wrangler's inspector")?;

    build::build_worker(repo, false)?;
    let bins = build_native(mode)?;
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| repo.dev_state_dir());
    println!("dev: applying D1 migrations to {} …", state_dir.display());
    apply_migrations(repo, &node, &state_dir)?;

    let worker_url = format!("http://127.0.0.1:{}", args.port);
    let relay_origin = format!("127.0.0.1:{}", args.relay_port);
    let relay_public_url = format!("ws://{relay_origin}/twilio");

    let mut worker_vars = BTreeMap::from([
        ("PUBLIC_BASE_URL".to_owned(), worker_url.clone()),
        ("RELAY_URL".to_owned(), relay_public_url.clone()),
    ]);
    let postgres_url = if args.db == DevDb::Postgres {
        let migrations = repo.root().join("migrations/postgres");
        let db = xtask::pg::persistent_database(DEV_PG_DATABASE, &migrations)?;
        println!(
            "dev: database: PostgreSQL {} (Postgres migrations applied)",
            db.name
        );
        worker_vars.insert("DB_BACKEND".to_owned(), "postgres".to_owned());
        Some(db.url())
    } else {
        println!("dev: database: local D1 in {}", state_dir.display());
        None
    };
    let mut relay_env = BTreeMap::from([
        ("RELAY_LISTEN".to_owned(), relay_origin.clone()),
        ("RELAY_PUBLIC_URL".to_owned(), relay_public_url.clone()),
        ("WORKER_URL".to_owned(), worker_url.clone()),
    ]);
    // The Worker's shared secrets are the relay's too: one source, never out of step.
    for key in ["RELAY_SECRET", "TWILIO_AUTH_TOKEN"] {
        if let Some(value) = dev_vars.get(key) {
            relay_env.insert(key.to_owned(), value.clone());
        }
    }

    let mut services: Vec<Service> = Vec::new();
    let mut fake_urls = BTreeMap::new();
    if mode == ProviderMode::Simulated {
        let creds = providers::fake_credentials(&mut rand::thread_rng());
        let mut fakes = start_fakes(&bins, args.fakes_base_port, &creds, &worker_url)?;
        fakes.wait_for_line(Duration::from_secs(60), |l| l.trim() == FAKES_READY)?;
        let lines = fakes.lines();
        fake_urls = collect_fakes(lines.iter().map(String::as_str));
        let wiring = wire_fakes(&fake_urls)?;
        services.push(fakes);
        for (key, value) in &creds {
            if WORKER_PROVIDER_KEYS.contains(&key.as_str()) {
                worker_vars.insert(key.clone(), value.clone());
            }
            if RELAY_PROVIDER_KEYS.contains(&key.as_str()) || key == "TWILIO_AUTH_TOKEN" {
                relay_env.insert(key.clone(), value.clone());
            }
        }
        worker_vars.extend(wiring.worker_vars);
        relay_env.extend(wiring.relay_env);
    }

    let wrangler = WranglerDev {
        port: args.port,
        inspector_port: args.inspector_port,
        persist_to: state_dir.clone(),
        vars: worker_vars.clone(),
        env_file: None,
    };
    let mut worker_spec = wrangler.spec(repo, &node, "worker")?.echo(true);
    if let Some(url) = &postgres_url {
        worker_spec = worker_spec.env(
            "CLOUDFLARE_HYPERDRIVE_LOCAL_CONNECTION_STRING_HYPERDRIVE",
            url,
        );
    }
    services.push(Service::spawn(worker_spec)?);
    let mut relay = ServiceSpec::new("relay", bins.join("media-relay"))
        .cwd(repo.root())
        .echo(true);
    if std::env::var_os("RUST_LOG").is_none() {
        relay = relay.env("RUST_LOG", "info");
    }
    for (key, value) in &relay_env {
        relay = relay.env(key, value);
    }
    services.push(Service::spawn(relay)?);

    let worker_health = wait_health(&mut services, "worker", &format!("{worker_url}/health"))?;
    let relay_health = wait_health(
        &mut services,
        "relay",
        &format!("http://{relay_origin}/health"),
    )?;

    print_banner(&BannerInfo {
        worker_url: &worker_url,
        relay_origin: &relay_origin,
        relay_public_url: &relay_public_url,
        inspector_port: args.inspector_port,
        state_dir: &state_dir,
        mode,
        fake_urls: &fake_urls,
        worker_health: &worker_health,
        relay_health: &relay_health,
        worker_overrides: &worker_vars,
        relay_env: &relay_env,
    });

    // Until now Ctrl-C simply kills us, and the watchdog pipes take the services down.
    // From here it stops them in order, with a report.
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    })
    .context("installing the Ctrl-C handler")?;
    let outcome = supervise(&mut services, &stop_rx);
    println!("dev: stopping {} services …", services.len());
    // Reverse start order: the relay and Worker go before the fakes they call.
    while let Some(mut service) = services.pop() {
        let name = service.name().to_owned();
        match service.stop(STOP_GRACE) {
            Ok(_) => println!("dev: stopped {name}"),
            Err(e) => eprintln!("dev: stopping {name}: {e:#}"),
        }
    }
    outcome
}

/// Provider credentials as each side would see them: the Worker's from `.dev.vars`; the
/// relay's from its environment, else its `.env` (the relay's own precedence).
fn provider_settings(
    dev_vars: &BTreeMap<String, String>,
    relay_file: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut settings = BTreeMap::new();
    for key in WORKER_PROVIDER_KEYS {
        if let Some(v) = dev_vars.get(*key) {
            settings.insert((*key).to_owned(), v.clone());
        }
    }
    for key in RELAY_PROVIDER_KEYS {
        if let Some(v) = std::env::var(key)
            .ok()
            .or_else(|| relay_file.get(*key).cloned())
        {
            settings.insert((*key).to_owned(), v);
        }
    }
    settings
}

/// Builds the relay (and the fakes when simulated) and returns the directory holding them.
fn build_native(mode: ProviderMode) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "-p", "media-relay", "--bin", "media-relay"]);
    if mode == ProviderMode::Simulated {
        cmd.args(["-p", "cmb-tests", "--bin", "fakes"]);
    }
    println!(
        "dev: building the relay{} …",
        if mode == ProviderMode::Simulated {
            " and the fakes"
        } else {
            ""
        }
    );
    run_checked(
        &mut cmd,
        "building the relay (package media-relay) and, when simulated, the fakes (package cmb-tests, bin fakes)",
    )?;
    let bins = workspace_bin_dir()?;
    let mut wanted = vec!["media-relay"];
    if mode == ProviderMode::Simulated {
        wanted.push("fakes");
    }
    for bin in wanted {
        if !bins.join(bin).is_file() {
            bail!(
                "{} is missing after the build: the `{bin}` binary is not in the workspace yet",
                bins.join(bin).display()
            );
        }
    }
    Ok(bins)
}

fn start_fakes(
    bins: &std::path::Path,
    base_port: u16,
    creds: &BTreeMap<String, String>,
    worker_url: &str,
) -> Result<Service> {
    let mut spec = ServiceSpec::new("fakes", bins.join("fakes"))
        .args(["--host", "127.0.0.1", "--base-port"])
        .arg(base_port.to_string())
        .env("WORKER_URL", worker_url)
        .echo(true);
    if std::env::var_os("RUST_LOG").is_none() {
        spec = spec.env("RUST_LOG", "info");
    }
    // The fakes check credentials like the providers do, so they get the same values.
    for (key, value) in creds {
        spec = spec.env(key, value);
    }
    println!("dev: starting the fake providers …");
    Service::spawn(spec)
}

fn wait_health(services: &mut [Service], name: &str, url: &str) -> Result<HealthReply> {
    let service = services
        .iter_mut()
        .find(|s| s.name() == name)
        .with_context(|| format!("no service named {name}"))?;
    health::wait_until_up(url, service, STARTUP_TIMEOUT)
}

/// Waits for Ctrl-C or for a service to die (an error, with its output).
fn supervise(services: &mut [Service], stop: &mpsc::Receiver<()>) -> Result<()> {
    loop {
        match stop.recv_timeout(Duration::from_millis(250)) {
            Ok(()) => {
                println!("\ndev: Ctrl-C received");
                return Ok(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
        for service in services.iter_mut() {
            if let Some(status) = service.exited()? {
                bail!(
                    "{} exited unexpectedly ({status}); last output:\n{}",
                    service.name(),
                    service.tail(40)
                );
            }
        }
    }
}

struct BannerInfo<'a> {
    worker_url: &'a str,
    relay_origin: &'a str,
    relay_public_url: &'a str,
    inspector_port: u16,
    state_dir: &'a std::path::Path,
    mode: ProviderMode,
    fake_urls: &'a BTreeMap<String, String>,
    worker_health: &'a HealthReply,
    relay_health: &'a HealthReply,
    worker_overrides: &'a BTreeMap<String, String>,
    relay_env: &'a BTreeMap<String, String>,
}

fn print_banner(info: &BannerInfo<'_>) {
    let rule = "=".repeat(72);
    println!("{rule}");
    println!("Call Me Back dev stack is up");
    println!(
        "  Worker     {}  (health: {})",
        info.worker_url, info.worker_health.status
    );
    println!(
        "  relay      http://{}  (health: {})",
        info.relay_origin, info.relay_health.status
    );
    println!(
        "  media URL  {}  (RELAY_URL / RELAY_PUBLIC_URL)",
        info.relay_public_url
    );
    println!("  debugger   127.0.0.1:{}", info.inspector_port);
    println!("  local D1/KV/DO state  {}", info.state_dir.display());
    println!("  Worker: secrets from .dev.vars, vars from wrangler.toml, overridden with:");
    print_settings(info.worker_overrides);
    println!("  relay: .env if present, overridden with:");
    print_settings(info.relay_env);
    match info.mode {
        ProviderMode::Simulated => {
            println!("  providers are SIMULATED (fakes): no real provider keys configured");
            for (name, url) in info.fake_urls {
                println!("    fake {name:<10} {url}");
            }
        }
        ProviderMode::Real => {
            println!("  providers are REAL (keys from .dev.vars and the relay's .env/environment)");
        }
    }
    for (name, reply) in [("Worker", info.worker_health), ("relay", info.relay_health)] {
        if !reply.is_healthy() {
            println!(
                "  WARNING: the {name} reports problems on /health ({}):",
                reply.status
            );
            println!("    {}", reply.body.trim());
        }
    }
    println!("Logs follow, prefixed by service. Ctrl-C stops everything.");
    println!("{rule}");
}

/// Prints settings, masking secret values.
fn print_settings(settings: &BTreeMap<String, String>) {
    for (key, value) in settings {
        let shown = if is_secret(key) {
            "<set>"
        } else {
            value.as_str()
        };
        println!("    {key} = {shown}");
    }
}

fn is_secret(key: &str) -> bool {
    WORKER_PROVIDER_KEYS.contains(&key)
        || RELAY_PROVIDER_KEYS.contains(&key)
        || key.ends_with("_SECRET")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Worker's keys come only from .dev.vars; the relay's from its .env file.
    #[test]
    fn provider_settings_come_from_each_sides_source() {
        let dev_vars = BTreeMap::from([
            ("LLM_API_KEY".to_owned(), "from-dev-vars".to_owned()),
            ("DEEPGRAM_API_KEY".to_owned(), "ignored".to_owned()),
        ]);
        let relay = BTreeMap::from([("ELEVENLABS_API_KEY".to_owned(), "from-env-file".to_owned())]);
        let s = provider_settings(&dev_vars, &relay);
        assert_eq!(s["LLM_API_KEY"], "from-dev-vars");
        if std::env::var_os("ELEVENLABS_API_KEY").is_none() {
            assert_eq!(s["ELEVENLABS_API_KEY"], "from-env-file");
        }
        if std::env::var_os("DEEPGRAM_API_KEY").is_none() {
            assert!(!s.contains_key("DEEPGRAM_API_KEY"));
        }
    }

    /// Secret settings are never printed in the banner.
    #[test]
    fn secrets_are_recognised() {
        assert!(is_secret("TWILIO_AUTH_TOKEN"));
        assert!(is_secret("STRIPE_WEBHOOK_SECRET"));
        assert!(is_secret("RELAY_SECRET"));
        assert!(is_secret("DEEPGRAM_API_KEY"));
        assert!(!is_secret("TWILIO_API_BASE"));
        assert!(!is_secret("PUBLIC_BASE_URL"));
    }
}
