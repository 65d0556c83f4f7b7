//! The `media-relay` binary: reads config, binds, serves until SIGINT/SIGTERM.
//!
//! Owns only process concerns (logging, signals, the listen socket). A bad config does
//! not stop the process: it still binds so `/health` can name the problems.

use media_relay::{run, Config};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

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
