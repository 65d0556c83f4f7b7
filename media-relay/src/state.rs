//! Process-wide state shared by the HTTP surface (`server`) and every call (`call`):
//! configuration, metrics, call slots, the stream-token replay cache, the greetings staged
//! while phones ring, and the draining and shutdown signals. Both depend on this module; it depends on neither.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError};
use crate::greeting::Greetings;
use crate::metrics::Metrics;
use crate::nonce::{NonceCache, NonceRejected};

/// Process-wide state shared by every request. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    config: Result<Arc<Config>, ConfigError>,
    metrics: Metrics,
    active_calls: AtomicUsize,
    nonces: Mutex<NonceCache>,
    greetings: Arc<Greetings>,
    draining: CancellationToken,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl AppState {
    /// Builds the state; a bad config is kept (not fatal) so `/health` can name it.
    pub fn new(config: Result<Config, ConfigError>) -> Self {
        let nonce_capacity = config
            .as_ref()
            .map_or(1, |c| c.max_calls.saturating_mul(4).max(1024));
        let staged_capacity = config
            .as_ref()
            .map_or(1, |c| c.max_calls.saturating_mul(2).max(16));
        Self {
            inner: Arc::new(Shared {
                config: config.map(Arc::new),
                metrics: Metrics::new(),
                active_calls: AtomicUsize::new(0),
                nonces: Mutex::new(NonceCache::new(nonce_capacity)),
                greetings: Arc::new(Greetings::new(staged_capacity)),
                draining: CancellationToken::new(),
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
        }
    }

    /// The validated config, or every problem with it.
    pub fn config(&self) -> Result<&Arc<Config>, &ConfigError> {
        self.inner.config.as_ref()
    }

    /// Greetings synthesized while the phone rings.
    pub fn greetings(&self) -> &Arc<Greetings> {
        &self.inner.greetings
    }

    /// Metric handles.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Calls currently holding a slot.
    pub fn active_calls(&self) -> usize {
        self.inner.active_calls.load(Ordering::Acquire)
    }

    /// Cancelled when the calls still open must close (the drain deadline, or at once
    /// with `RELAY_DRAIN_SECS=0`); calls close cleanly on it.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// From the first shutdown signal on (`drain.rs`): new streams and greetings are
    /// refused and `/health` answers 503 `draining`, while calls in progress go on.
    pub fn start_draining(&self) {
        self.inner.draining.cancel();
    }

    /// Whether the relay is draining (or past it, shutting down).
    pub fn is_draining(&self) -> bool {
        self.inner.draining.is_cancelled() || self.inner.shutdown.is_cancelled()
    }

    /// Records a stream-token nonce, refusing one already used and not yet expired.
    pub fn claim_nonce(
        &self,
        nonce: &str,
        expires_at: i64,
        now_unix: i64,
    ) -> Result<(), NonceRejected> {
        // A poisoned lock only means another call panicked mid-insert; the set is still a
        // valid set, so keep using it rather than failing every later call.
        let mut set = self
            .inner
            .nonces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        set.claim(nonce, expires_at, now_unix)
    }

    /// Takes a call slot if fewer than `max` are active. The slot frees itself on drop.
    pub fn try_acquire_call(&self, max: usize) -> Option<CallSlot> {
        let counter = &self.inner.active_calls;
        let mut current = counter.load(Ordering::Acquire);
        loop {
            if current >= max {
                return None;
            }
            match counter.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
        self.inner.metrics.active_calls.inc();
        Some(CallSlot {
            state: self.clone(),
        })
    }

    /// Logs every configuration problem at error level (once, at start-up).
    pub fn log_config_problems(&self) {
        if let Err(e) = &self.inner.config {
            for p in &e.problems {
                tracing::error!(name = %p.name, problem = %p.problem, "relay configuration problem");
            }
            tracing::error!(
                count = e.problems.len(),
                "relay configuration is invalid: /health answers 503 and calls are refused"
            );
        }
    }

    /// Spawns a per-call task that shutdown waits for.
    pub fn spawn_call<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.inner.tracker.spawn(fut);
    }
}

/// One active call's capacity slot; releases on drop, whatever way the call ends.
pub struct CallSlot {
    state: AppState,
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        self.state.inner.active_calls.fetch_sub(1, Ordering::AcqRel);
        self.state.inner.metrics.active_calls.dec();
    }
}

impl AppState {
    /// Tracks call tasks so shutdown can wait for them.
    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
    }
}
