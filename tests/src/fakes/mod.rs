//! Protocol-faithful fake providers (PROTOCOLS.md is the wire-format truth).
//!
//! Each fake is a folder (`cerebras/`, `deepgram/`, `elevenlabs/`, `stripe/`, `twilio/`)
//! whose `mod.rs` follows one convention:
//!
//! - `Config`: how it is set up; `Config::default()` listens on [`LOOPBACK_ANY`] with
//!   test credentials, and `Config::addr` says where to listen;
//! - `spawn(cfg: Config) -> anyhow::Result<Handle>`: serves the fake on `cfg.addr`
//!   (through [`Server`]);
//! - `Handle`: the running fake, which tests inspect (`addr()`, `base_url()`,
//!   `faults()`, what it recorded) and stop with `shutdown()` or by dropping it;
//! - `router(..)`: its axum app (wrapped with the faults), for `oneshot` tests.
//!
//! This module owns only what all fakes share: the fault knobs ([`faults`]) and
//! [`Server`], the serve-in-a-task helper. It must not hold provider behaviour.

pub mod cerebras;
pub mod deepgram;
pub mod elevenlabs;
pub mod faults;
pub mod stripe;
pub mod twilio;

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::Router;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The loopback address with an OS-chosen port: where fakes bind unless told otherwise.
pub const LOOPBACK_ANY: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// A fake's HTTP server running in a tokio task; it stops gracefully when dropped or
/// [`Server::shutdown`] is called (open WebSockets are then cut by the task abort).
pub struct Server {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` (use [`LOOPBACK_ANY`] for a free port) and serves `app` in a task.
    pub async fn start(name: &'static str, addr: SocketAddr, app: Router) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("fake {name}: binding {addr}"))?;
        let addr = listener.local_addr().context("reading bound address")?;
        let (tx, rx) = oneshot::channel::<()>();
        // Providers stream small messages as they come (TCP_NODELAY), as the relay does:
        // with Nagle, a second message would wait for the first one's delayed ACK.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    // A dropped sender means the handle is gone: stop as well.
                    let _ = rx.await;
                })
                .await;
            if let Err(err) = served {
                tracing::error!(fake = name, %err, "fake server stopped with an error");
            }
        });
        tracing::info!(fake = name, %addr, "fake listening");
        Ok(Self {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ws://127.0.0.1:PORT`
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Stops accepting, then cuts whatever is still open (long-lived WebSockets would
    /// otherwise hold a graceful shutdown forever).
    pub async fn shutdown(mut self) {
        self.stop();
        if let Some(mut task) = self.task.take() {
            let grace = std::time::Duration::from_millis(500);
            if tokio::time::timeout(grace, &mut task).await.is_err() {
                tracing::debug!("fake server did not drain in time, aborting it");
                task.abort();
            }
        }
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
