//! The `media-relay` binary: reads config, binds, serves until SIGINT/SIGTERM.
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
    init_logging();

    let config = Config::from_env();
    let listen = match &config {
        Ok(c) => c.listen,
        Err(e) => match e.listen {
            Some(addr) => addr,
            // Without an address there is nowhere to report from: fail loudly instead.
            None => anyhow::bail!("{e}"),
        },
    };
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    // The dev launcher waits for this line (then polls /health).
    println!("media-relay listening on http://{addr}");
    tracing::info!(%addr, "media-relay listening");
    run(listener, config, shutdown_signal()).await
}

/// JSON lines (one object per event, the span's `call_id`/`call_sid`/`stream_sid` with
/// it) unless `RELAY_LOG_FORMAT=text` or a terminal asks for text. A bad value is named
/// on `/health` by the configuration check; logging then uses the default.
fn init_logging() {
    let terminal = std::io::stdout().is_terminal();
    let asked = LogFormat::parse(std::env::var("RELAY_LOG_FORMAT").ok().as_deref(), terminal);
    let format = asked.clone().unwrap_or(if terminal {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Text => builder.with_ansi(terminal).init(),
    }
    if let Err(problem) = asked {
        tracing::error!(name = "RELAY_LOG_FORMAT", %problem, "relay configuration problem");
    }
}

/// Resolves on SIGINT or SIGTERM (container orchestrators send the latter).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
