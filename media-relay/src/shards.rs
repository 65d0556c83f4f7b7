//! The process's threads: one single-threaded runtime per core ("shard"), each with its
//! own listening socket on the same port (`SO_REUSEPORT`: the kernel spreads new
//! connections over them) and all sharing one [`AppState`] (capacity, replay cache,
//! staged greetings, metrics, shutdown).
//!
//! Why not one multi-threaded runtime: a call is four sockets and four tasks (Twilio
//! loop, Deepgram, ElevenLabs, control) that hand every caller frame from one to the
//! next. On a work-stealing runtime those hand-offs wake the other worker thread (a
//! futex) and bounce the call's data between cores; measured on the 2-core bench machine
//! that was ~15% of the relay's CPU. Pinned to one shard, a call's tasks wake each other
//! with a local queue push. The cost is balance: a shard cannot lend its calls to an idle
//! one, so the spread is only as even as the kernel's hash of new connections.
//!
//! Owns only threads, listeners and the shutdown fan-out; serving is [`server::serve`].

use std::future::Future;
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;

use crate::config::{Config, ConfigError};
use crate::server::{self, AppState};

/// Pending connections per listener (what `TcpListener::bind` uses).
const BACKLOG: u32 = 1024;

/// Shards to run: `TOKIO_WORKER_THREADS` when set (the knob the relay's multi-threaded
/// runtime honoured before), else one per available core.
pub fn count() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The running shards.
pub struct Shards {
    addr: SocketAddr,
    state: AppState,
    threads: Vec<JoinHandle<anyhow::Result<()>>>,
    /// One message per shard whose accept loop ended.
    exited: mpsc::UnboundedReceiver<()>,
}

/// Binds `listen` in `n` shards and starts serving; returns once every shard listens.
pub fn start(
    listen: SocketAddr,
    config: Result<Config, ConfigError>,
    n: usize,
) -> anyhow::Result<Shards> {
    let grace = config.as_ref().map_or(Duration::ZERO, |c| c.shutdown_grace);
    let state = AppState::new(config);
    state.log_config_problems();
    let (exited_tx, exited) = mpsc::unbounded_channel();
    let mut threads = Vec::with_capacity(n);
    // The first shard binds what was asked (port 0 included); the others join its port.
    let mut addr = listen;
    for i in 0..n.max(1) {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let state = state.clone();
        let exited_tx = exited_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("relay-shard-{i}"))
            .spawn(move || {
                let result = shard(addr, state, grace, ready_tx);
                let _ = exited_tx.send(());
                result
            })
            .context("starting a relay shard thread")?;
        threads.push(thread);
        match ready_rx.recv() {
            Ok(Ok(bound)) => addr = bound,
            Ok(Err(e)) => return Err(e.context(format!("binding {addr}"))),
            Err(_) => anyhow::bail!("relay shard {i} died while binding {addr}"),
        }
    }
    Ok(Shards {
        addr,
        state,
        threads,
        exited,
    })
}

impl Shards {
    /// Where the shards listen.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` resolves (or a shard's accept loop fails), then shuts every
    /// shard down: calls in progress get the configured grace to close.
    pub fn run_until(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        // Signals need a runtime; this one only waits.
        let waiter = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        waiter.block_on(async {
            tokio::select! {
                () = shutdown => {}
                _ = self.exited.recv() => {}
            }
        });
        tracing::info!("shutdown requested: refusing new calls, closing active ones");
        self.state.shutdown_token().cancel();
        let mut first_error = None;
        for t in self.threads {
            let result = t
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a relay shard panicked")));
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// One shard's thread: its runtime, its listener, the accept loop until the shared
/// shutdown token is cancelled, then the wait for the calls in progress.
fn shard(
    addr: SocketAddr,
    state: AppState,
    grace: Duration,
    ready: std::sync::mpsc::Sender<anyhow::Result<SocketAddr>>,
) -> anyhow::Result<()> {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return Ok(());
        }
    };
    runtime.block_on(async move {
        let listener = match bind(addr).and_then(|l| Ok((l.local_addr()?, l))) {
            Ok((bound, l)) => {
                let _ = ready.send(Ok(bound));
                l
            }
            Err(e) => {
                let _ = ready.send(Err(e.into()));
                return Ok(());
            }
        };
        let stop = state.shutdown_token().clone().cancelled_owned();
        let served = server::serve(listener, state.clone(), stop).await;
        server::drain(&state, grace).await;
        served
    })
}

/// A listener that shares its port with the other shards' (`SO_REUSEPORT`). Only
/// sockets of the same user can join a port this way; one bound without the option
/// still makes the bind fail, as before.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shards share one port: the first binds port 0, the others join what it got, and
    /// every one of them serves the same state (`/health` counts the same calls).
    #[test]
    fn shards_share_a_port_and_state() {
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let invalid = ConfigError {
            problems: Vec::new(),
            listen: Some(listen),
        };
        let shards = start(listen, Err(invalid), 2).expect("start");
        let addr = shards.addr();
        assert_ne!(addr.port(), 0);
        assert_eq!(shards.threads.len(), 2);
        // Several connections, so that both listeners are likely to be hit; each answers.
        for _ in 0..8 {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            use std::io::{Read as _, Write as _};
            s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("read");
            assert!(out.starts_with("HTTP/1.1 503"), "{out}");
        }
        let stop = async {};
        shards.run_until(stop).expect("clean stop");
    }
}
