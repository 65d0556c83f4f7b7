//! `fakes`: runs the fake providers as one process for `cargo xtask dev` and the stack
//! launcher, when real provider keys are absent.
//!
//! Owns only wiring: which fakes to start, on which ports, with which credentials (read
//! from the same env names the Worker and the relay use), the start-up announcements
//! (`fake <name> listening on <url>` per fake, then `fakes ready`) and a clean stop on
//! SIGINT/SIGTERM. Provider behaviour lives in `cmb_tests::fakes`; nothing here may
//! change it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use cmb_tests::fakes::{cerebras, deepgram, elevenlabs, stripe, twilio};
use cmb_tests::loadgen::{self, ControlPeer};
use cmb_tests::sim::SimScript;

/// The fakes, in base-port order: with `--base-port N`, the i-th listens on N + i.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Fake {
    Twilio,
    Deepgram,
    Elevenlabs,
    Cerebras,
    Stripe,
    /// The relay's CallSession peer (for relay load tests; `--only control`): speaks the
    /// relay <-> DO channel, answers every user turn at once and mints stream tokens.
    Control,
}

/// Every fake, in base-port order.
const EVERY: [Fake; 6] = [
    Fake::Twilio,
    Fake::Deepgram,
    Fake::Elevenlabs,
    Fake::Cerebras,
    Fake::Stripe,
    Fake::Control,
];

impl Fake {
    fn name(self) -> &'static str {
        match self {
            Self::Twilio => "twilio",
            Self::Deepgram => "deepgram",
            Self::Elevenlabs => "elevenlabs",
            Self::Cerebras => "cerebras",
            Self::Stripe => "stripe",
            Self::Control => "control",
        }
    }

    /// Its place in [`EVERY`], which is its offset from `--base-port`.
    fn offset(self) -> u16 {
        // EVERY has six entries: the index always fits.
        EVERY.iter().position(|f| *f == self).unwrap_or(0) as u16
    }
}

/// What runs without `--only`: every provider the Worker and the relay call (the control
/// peer stands in for the Worker, so only when asked for).
fn defaults() -> Vec<Fake> {
    EVERY.into_iter().filter(|f| *f != Fake::Control).collect()
}

/// Runs fake Twilio, Deepgram, ElevenLabs, Cerebras and Stripe on loopback (and, with
/// `--only control`, the relay's CallSession peer for load tests).
#[derive(Debug, Parser)]
#[command(name = "fakes", version)]
struct Args {
    /// Start only these fakes (comma-separated); all of them by default.
    #[arg(long, value_enum, value_delimiter = ',', conflicts_with = "all")]
    only: Vec<Fake>,
    /// Start every fake (the default; for explicitness in scripts).
    #[arg(long)]
    all: bool,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Consecutive ports from N in the order twilio, deepgram, elevenlabs, cerebras,
    /// stripe, control; 0 gives every fake a free port.
    #[arg(long)]
    base_port: Option<u16>,
    #[arg(long)]
    twilio_port: Option<u16>,
    #[arg(long)]
    deepgram_port: Option<u16>,
    #[arg(long)]
    elevenlabs_port: Option<u16>,
    #[arg(long)]
    cerebras_port: Option<u16>,
    #[arg(long)]
    stripe_port: Option<u16>,
    #[arg(long)]
    control_port: Option<u16>,

    #[arg(long, env = "TWILIO_ACCOUNT_SID", hide_env_values = true)]
    twilio_account_sid: Option<String>,
    #[arg(long, env = "TWILIO_AUTH_TOKEN", hide_env_values = true)]
    twilio_auth_token: Option<String>,
    #[arg(long, env = "DEEPGRAM_API_KEY", hide_env_values = true)]
    deepgram_api_key: Option<String>,
    #[arg(long, env = "ELEVENLABS_API_KEY", hide_env_values = true)]
    elevenlabs_api_key: Option<String>,
    #[arg(long, env = "LLM_API_KEY", hide_env_values = true)]
    llm_api_key: Option<String>,
    #[arg(long, env = "STRIPE_SECRET_KEY", hide_env_values = true)]
    stripe_secret_key: Option<String>,
    /// Signs `checkout.session.completed` when a session is paid on the fake's pay page.
    #[arg(long, env = "STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    stripe_webhook_secret: Option<String>,
    /// Where the pay page delivers the webhook; default `$WORKER_URL/api/payments/webhook`.
    #[arg(long, env = "STRIPE_WEBHOOK_URL")]
    stripe_webhook_url: Option<String>,
    /// Shared with the relay: the control fake checks it on the channel and signs stream
    /// tokens with it. Required for `control`; there is no stand-in.
    #[arg(long, env = "RELAY_SECRET", hide_env_values = true)]
    relay_secret: Option<String>,
    /// The Worker's base URL (for the default Stripe webhook URL).
    #[arg(long, env = "WORKER_URL")]
    worker_url: Option<String>,

    /// Length of one ring of the fake Twilio, in ms.
    #[arg(long, default_value_t = 1000)]
    ring_ms: u64,
}

/// Defaults used when a credential is not given: the same stand-ins the tests use (the
/// fakes' own `Config::default` credentials).
const DEFAULT_TWILIO_SID: &str = twilio::DEFAULT_ACCOUNT_SID;
const DEFAULT_TWILIO_TOKEN: &str = twilio::DEFAULT_AUTH_TOKEN;
const DEFAULT_STRIPE_KEY: &str = stripe::DEFAULT_SECRET_KEY;

/// An empty value (e.g. `KEY=` in an env file) counts as not given.
fn given(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

impl Args {
    fn selected(&self) -> Vec<Fake> {
        if self.only.is_empty() {
            defaults()
        } else {
            EVERY
                .into_iter()
                .filter(|f| self.only.contains(f))
                .collect()
        }
    }

    /// A per-fake port flag wins; then `--base-port` (0 = free port); else a free port.
    fn port(&self, fake: Fake) -> anyhow::Result<u16> {
        let explicit = match fake {
            Fake::Twilio => self.twilio_port,
            Fake::Deepgram => self.deepgram_port,
            Fake::Elevenlabs => self.elevenlabs_port,
            Fake::Cerebras => self.cerebras_port,
            Fake::Stripe => self.stripe_port,
            Fake::Control => self.control_port,
        };
        match (explicit, self.base_port) {
            (Some(port), _) => Ok(port),
            (None, Some(0) | None) => Ok(0),
            (None, Some(base)) => base
                .checked_add(fake.offset())
                .with_context(|| format!("--base-port {base} leaves no port for {}", fake.name())),
        }
    }

    fn stripe_webhook(&self) -> Option<stripe::WebhookTarget> {
        let secret = given(&self.stripe_webhook_secret)?;
        let url = given(&self.stripe_webhook_url).or_else(|| {
            given(&self.worker_url)
                .map(|w| format!("{}/api/payments/webhook", w.trim_end_matches('/')))
        })?;
        Some(stripe::WebhookTarget { url, secret })
    }
}

/// A started fake, kept alive until shutdown.
enum Running {
    Twilio(twilio::Handle),
    Deepgram(deepgram::Handle),
    Elevenlabs(elevenlabs::Handle),
    Cerebras(cerebras::Handle),
    Stripe(stripe::Handle),
    Control(cmb_tests::fakes::Server),
}

impl Running {
    fn base_url(&self) -> String {
        match self {
            Self::Twilio(h) => h.base_url(),
            Self::Deepgram(h) => h.base_url(),
            Self::Elevenlabs(h) => h.base_url(),
            Self::Cerebras(h) => h.base_url(),
            Self::Stripe(h) => h.base_url(),
            Self::Control(h) => h.base_url(),
        }
    }

    async fn shutdown(self) {
        match self {
            Self::Twilio(h) => h.shutdown().await,
            Self::Deepgram(h) => h.shutdown().await,
            Self::Elevenlabs(h) => h.shutdown().await,
            Self::Cerebras(h) => h.shutdown().await,
            Self::Stripe(h) => h.shutdown().await,
            Self::Control(h) => h.shutdown().await,
        }
    }
}

async fn start(args: &Args, fake: Fake) -> anyhow::Result<Running> {
    let addr = SocketAddr::new(args.host, args.port(fake)?);
    Ok(match fake {
        Fake::Twilio => {
            let sid = given(&args.twilio_account_sid).unwrap_or_else(|| DEFAULT_TWILIO_SID.into());
            let token =
                given(&args.twilio_auth_token).unwrap_or_else(|| DEFAULT_TWILIO_TOKEN.into());
            let mut cfg = twilio::Config::new(sid, token);
            cfg.addr = addr;
            cfg.ring = Duration::from_millis(args.ring_ms);
            // Answer after one ring and play the demo: a goal, a barge-in, a callback the
            // persona books, "bye"; the callback is the demo's second call.
            cfg.default_script = twilio::CalleeScript::answer(SimScript::demo_first_call());
            cfg.repeat_script = Some(twilio::CalleeScript::answer(SimScript::demo_callback()));
            Running::Twilio(twilio::spawn(cfg).await?)
        }
        Fake::Deepgram => {
            let mut cfg = deepgram::Config {
                addr,
                ..Default::default()
            };
            if let Some(key) = given(&args.deepgram_api_key) {
                cfg.api_key = key;
            }
            Running::Deepgram(deepgram::spawn(cfg).await?)
        }
        Fake::Elevenlabs => {
            let mut cfg = elevenlabs::Config {
                addr,
                ..Default::default()
            };
            if let Some(key) = given(&args.elevenlabs_api_key) {
                cfg.api_key = key;
            }
            Running::Elevenlabs(elevenlabs::spawn(cfg).await?)
        }
        Fake::Cerebras => {
            // The demo's stand-in judgement: tools used as a model would (see `acting`).
            let mut cfg = cerebras::Config {
                addr,
                acts: true,
                ..Default::default()
            };
            if let Some(key) = given(&args.llm_api_key) {
                cfg.api_key = key;
            }
            Running::Cerebras(cerebras::spawn(cfg).await?)
        }
        Fake::Stripe => {
            let key = given(&args.stripe_secret_key).unwrap_or_else(|| DEFAULT_STRIPE_KEY.into());
            let mut cfg = stripe::Config::new(key);
            cfg.addr = addr;
            cfg.webhook = args.stripe_webhook();
            if let Some(target) = &cfg.webhook {
                tracing::info!(url = %target.url, "fake stripe delivers checkout.session.completed on payment");
            }
            Running::Stripe(stripe::spawn(cfg).await?)
        }
        Fake::Control => {
            let secret = given(&args.relay_secret)
                .context("the control fake needs RELAY_SECRET (the relay's shared secret)")?;
            Running::Control(loadgen::spawn_control_peer(ControlPeer::new(&secret), addr).await?)
        }
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs go to stderr; stdout carries only the announcements the launchers parse.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let mut running = Vec::new();
    for fake in args.selected() {
        let handle = start(&args, fake)
            .await
            .with_context(|| format!("starting fake {}", fake.name()))?;
        println!("fake {} listening on {}", fake.name(), handle.base_url());
        running.push(handle);
    }
    println!("fakes ready");
    stop_signal().await?;
    tracing::info!("stopping the fakes");
    for handle in running {
        handle.shutdown().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("fakes").chain(args.iter().copied())).unwrap()
    }

    /// No selection means every fake; --only keeps the canonical order.
    #[test]
    fn selection() {
        assert_eq!(parse(&[]).selected(), defaults());
        assert_eq!(parse(&["--all"]).selected(), defaults());
        assert_eq!(
            parse(&["--only", "stripe,twilio"]).selected(),
            vec![Fake::Twilio, Fake::Stripe]
        );
        assert_eq!(defaults().len(), 5);
        assert!(
            !defaults().contains(&Fake::Control),
            "control only when asked for"
        );
        assert_eq!(
            parse(&["--only", "control,deepgram"]).selected(),
            vec![Fake::Deepgram, Fake::Control]
        );
        assert!(Args::try_parse_from(["fakes", "--only", "twillio"]).is_err());
        assert!(Args::try_parse_from(["fakes", "--only", "twilio", "--all"]).is_err());
    }

    /// Ports: per-fake flag, else base + fixed offset, base 0 = free ports, else free.
    #[test]
    fn ports() {
        let a = parse(&["--base-port", "4000", "--stripe-port", "9999"]);
        assert_eq!(a.port(Fake::Twilio).unwrap(), 4000);
        assert_eq!(a.port(Fake::Cerebras).unwrap(), 4003);
        assert_eq!(a.port(Fake::Control).unwrap(), 4005);
        assert_eq!(a.port(Fake::Stripe).unwrap(), 9999);
        let zero = parse(&["--base-port", "0"]);
        assert!(EVERY.iter().all(|f| zero.port(*f).unwrap() == 0));
        assert_eq!(parse(&[]).port(Fake::Deepgram).unwrap(), 0);
        assert!(parse(&["--base-port", "65535"]).port(Fake::Stripe).is_err());
    }

    /// The Stripe webhook needs a secret; its URL defaults to the Worker's route.
    #[test]
    fn stripe_webhook_target() {
        let none = parse(&["--worker-url", "http://127.0.0.1:8787/"]);
        assert_eq!(none.stripe_webhook(), None);
        let from_worker = parse(&[
            "--worker-url",
            "http://127.0.0.1:8787/",
            "--stripe-webhook-secret",
            "whsec_x",
        ]);
        assert_eq!(
            from_worker.stripe_webhook(),
            Some(stripe::WebhookTarget {
                url: "http://127.0.0.1:8787/api/payments/webhook".into(),
                secret: "whsec_x".into()
            })
        );
        let explicit = parse(&[
            "--worker-url",
            "http://w",
            "--stripe-webhook-url",
            "http://hook/x",
            "--stripe-webhook-secret",
            "whsec_x",
        ]);
        assert_eq!(explicit.stripe_webhook().unwrap().url, "http://hook/x");
        assert_eq!(given(&Some("  ".into())), None);
    }
}
