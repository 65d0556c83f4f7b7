//! The `media-relay` binary: reads config, binds, serves until SIGINT/SIGTERM, then drains
//! (`drain.rs`). `media-relay healthcheck` instead checks a running relay's `/health`
//! (the container's `HEALTHCHECK`; `healthcheck.rs`) and exits 0 when it is alive.
//!
//! Owns only process concerns (logging, signals, the listen socket). A bad config does
//! not stop the process: it still binds so `/health` can name the problems.

use std::io::IsTerminal as _;

use media_relay::config::LogFormat;
use media_relay::{run, Config};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (None, _) => serve().await,
        (Some("healthcheck"), None) => healthcheck().await,
        _ => anyhow::bail!("usage: media-relay [healthcheck]"),
    }
}

/// The address the relay binds (`RELAY_LISTEN`), read as the relay reads it.
fn listen_address(
    config: &Result<Config, media_relay::ConfigError>,
) -> anyhow::Result<std::net::SocketAddr> {
    match config {
        Ok(c) => Ok(c.listen),
        Err(e) => match e.listen {
            Some(addr) => Ok(addr),
            // Without an address there is nowhere to report from: fail loudly instead.
            None => anyhow::bail!("{e}"),
        },
    }
}

/// Exit 0 when the relay at `RELAY_LISTEN` answers `/health` alive within the deadline.
async fn healthcheck() -> anyhow::Result<()> {
    let addr = media_relay::healthcheck::target(listen_address(&Config::from_env())?);
    match media_relay::healthcheck::check(addr).await {
        Ok(status) => {
            println!("media-relay at {addr}: {status}");
            Ok(())
        }
        Err(why) => anyhow::bail!("media-relay at {addr} is not healthy: {why}"),
    }
}

async fn serve() -> anyhow::Result<()> {
    let events = init_logging();

    let config = Config::from_env();
    // Without a valid config there is no Worker to ship to: the queue closes, and the
    // problems are on /health and in the log lines.
    if let Ok(c) = &config {
        if let Ok(url) = c.worker_url.join("/internal/relay/events") {
            media_relay::events::spawn(events, url.to_string(), c.relay_secret.expose().to_owned());
        }
    }
    let listen = listen_address(&config)?;
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    // The dev launcher waits for this line (then polls /health).
    println!("media-relay listening on http://{addr}");
    tracing::info!(%addr, "media-relay listening");
    run(listener, config, shutdown_signals()?).await
}

/// JSON lines (one object per event, the span's `call_id`/`call_sid`/`stream_sid` with
/// it) unless `RELAY_LOG_FORMAT=text` or a terminal asks for text. A bad value is named
/// on `/health` by the configuration check; logging then uses the default.
fn init_logging() -> media_relay::events::Queue {
    use tracing_subscriber::prelude::*;
    let terminal = std::io::stdout().is_terminal();
    let asked = LogFormat::parse(std::env::var("RELAY_LOG_FORMAT").ok().as_deref(), terminal);
    let format = asked.clone().unwrap_or(if terminal {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = matches!(format, LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
    });
    let text = matches!(format, LogFormat::Text)
        .then(|| tracing_subscriber::fmt::layer().with_ansi(terminal));
    // Warnings and errors also go to the Worker's event log (`events.rs`).
    let (shipper, queue) = media_relay::events::channel(media_relay::events::QUEUE);
    tracing_subscriber::registry()
        .with(filter)
        .with(json)
        .with(text)
        .with(shipper)
        .init();
    if let Err(problem) = asked {
        tracing::error!(name = "RELAY_LOG_FORMAT", %problem, "relay configuration problem");
    }
    queue
}

/// One item per SIGINT or SIGTERM (container hosts send the latter), for as long as
/// the relay runs: the first starts draining, a second exits at once.
fn shutdown_signals() -> anyhow::Result<tokio::sync::mpsc::Receiver<()>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    #[cfg(unix)]
    {
        use anyhow::Context as _;
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM"),
                    _ = int.recv() => tracing::info!("SIGINT"),
                }
                if tx.send(()).await.is_err() {
                    return;
                }
            }
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
