//! Outbound WebSocket plumbing shared by the provider and control tasks: connecting with
//! small buffers and TLS, and the reconnect backoff schedule (the loop that uses it is
//! [`crate::reconnect`]).
//!
//! Owns how a socket is opened, never what is said on it. Buffers are sized per socket so
//! that a call (four sockets) stays within the relay's memory budget.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::SinkExt;
use http::{HeaderName, HeaderValue};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use url::Url;

/// A connected client socket.
pub type ClientSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest a connect (TCP + TLS + upgrade) may take before it counts as a failure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid request: {0}")]
    Request(String),
    #[error("connect timed out")]
    Timeout,
    #[error(transparent)]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
}

/// Bytes read from a socket at a time. tungstenite allocates this eagerly and grows the
/// buffer to hold a whole message when one is larger, so a small value bounds a quiet
/// socket's memory without limiting message size, and every read zero-fills this much
/// first. A Twilio media frame (~420 bytes) fits in one read; a long Deepgram result or a
/// TTS audio message (a few per second while the persona speaks) takes a few.
pub const READ_BUFFER: usize = 1024;

/// Socket buffer sizes: reads per [`READ_BUFFER`]. Every `send` flushes; `feed` gathers
/// messages up to this many bytes so that a batch (frames that queued up together) is one
/// write.
pub fn config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(4 * 1024)
        .max_write_buffer_size(max_message.max(64 * 1024))
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// Process-wide TLS client config (ring provider, webpki roots), built once.
fn tls() -> Result<Arc<rustls::ClientConfig>, ConnectError> {
    static TLS: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    TLS.get_or_init(|| {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
        .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(ConnectError::Request)
}

/// Opens `url` with extra request `headers` (auth).
pub async fn connect(
    url: &Url,
    headers: &[(HeaderName, HeaderValue)],
    max_message: usize,
) -> Result<Box<ClientSocket>, ConnectError> {
    let mut request = url.as_str().into_client_request()?;
    for (name, value) in headers {
        request.headers_mut().insert(name.clone(), value.clone());
    }
    let connector = if url.scheme() == "wss" {
        Connector::Rustls(tls()?)
    } else {
        Connector::Plain
    };
    // Boxed: the handshake future is ~14 KiB and would otherwise be inlined into every
    // socket task's state for the whole call, though it lives only while connecting.
    let connecting = Box::pin(tokio_tungstenite::connect_async_tls_with_config(
        request,
        Some(config(max_message)),
        true,
        Some(connector),
    ));
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        // Boxed: a socket is ~1.4 KiB, and an async fn that moves one across awaits may
        // keep several inline copies of it for the task's whole life.
        Ok(Ok((socket, _response))) => Ok(Box::new(socket)),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(ConnectError::Timeout),
    }
}

/// Ends a socket the task is done with: `last` (the peer's own end-of-stream message,
/// if it has one), then a close frame. Errors are moot: the task is ending either way.
pub async fn close(socket: &mut ClientSocket, last: Option<&'static str>) {
    if let Some(text) = last {
        let _ = socket.send(Message::text(text)).await;
    }
    let _ = socket.close(None).await;
}

/// A header value from a secret; a value with control characters is a config problem
/// surfaced as a connect error rather than a panic.
pub fn header_value(value: &str) -> Result<HeaderValue, ConnectError> {
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| ConnectError::Request("invalid header value".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

/// Reconnect delays: the first retry comes almost at once, then quickly growing, so a
/// blip is bridged within a second and a dead provider is given up on in bounded time.
/// Every delay is jittered (a step `d` waits uniformly in `d/2..=d`; the first, zero, in
/// `0..=FIRST_RETRY_SPREAD`) so a provider blip under 1,000 calls does not bring 1,000
/// reconnects in the same millisecond.
#[derive(Debug, Clone)]
pub struct Backoff {
    delays: &'static [Duration],
    attempt: usize,
    rng: StdRng,
}

/// How far the immediate first retries of many calls are spread.
pub const FIRST_RETRY_SPREAD: Duration = Duration::from_millis(50);

/// Providers: 0, 0.1, 0.25, 0.5, 1, 2 s — about four seconds in all before giving up.
pub const PROVIDER_DELAYS: &[Duration] = &[
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// Control channel: the DO may be restarting; keep trying for about 20 s.
pub const CONTROL_DELAYS: &[Duration] = &[
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(4),
    Duration::from_secs(4),
    Duration::from_secs(4),
];

impl Backoff {
    /// A fresh schedule with its own random jitter.
    pub fn new(delays: &'static [Duration]) -> Self {
        Self::seeded(delays, rand::thread_rng().gen())
    }

    /// A schedule whose jitter replays from `seed` (tests).
    pub fn seeded(delays: &'static [Duration], seed: u64) -> Self {
        Self {
            delays,
            attempt: 0,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The wait before the next attempt, or `None` once the schedule is exhausted.
    pub fn next_delay(&mut self) -> Option<Duration> {
        let d = self.delays.get(self.attempt).copied()?;
        self.attempt += 1;
        let (low, high) = if d.is_zero() {
            (Duration::ZERO, FIRST_RETRY_SPREAD)
        } else {
            (d / 2, d)
        };
        let span = u64::try_from((high - low).as_micros()).unwrap_or(u64::MAX);
        Some(low + Duration::from_micros(self.rng.gen_range(0..=span)))
    }

    /// Called after a successful connect: the next failure starts over.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first retry comes within the spread, the first three fit in a second, every
    /// step stays within half to all of its nominal delay, and it ends.
    #[test]
    fn backoff_schedule() {
        let mut b = Backoff::new(PROVIDER_DELAYS);
        let first = b.next_delay().expect("1");
        assert!(first <= FIRST_RETRY_SPREAD);
        let first_three = first + b.next_delay().expect("2") + b.next_delay().expect("3");
        assert!(first_three < Duration::from_secs(1));
        for nominal in &PROVIDER_DELAYS[3..] {
            let d = b.next_delay().expect("step");
            assert!(*nominal / 2 <= d && d <= *nominal, "{d:?} for {nominal:?}");
        }
        assert_eq!(b.next_delay(), None, "exhausted");
        assert_eq!(b.next_delay(), None, "stays exhausted");
        b.reset();
        assert!(b.next_delay().expect("again") <= FIRST_RETRY_SPREAD);
    }

    /// Many calls retrying after the same blip do not retry in step.
    #[test]
    fn jitter_spreads_calls() {
        let firsts: std::collections::BTreeSet<Duration> = (0..1000)
            .map(|seed| {
                Backoff::seeded(CONTROL_DELAYS, seed)
                    .next_delay()
                    .expect("first")
            })
            .collect();
        assert!(firsts.len() > 900, "{} distinct first delays", firsts.len());
        let mut a = Backoff::seeded(CONTROL_DELAYS, 7);
        let mut b = Backoff::seeded(CONTROL_DELAYS, 7);
        assert_eq!(a.next_delay(), b.next_delay(), "a seed replays");
    }

    /// The TLS config builds with the explicit ring provider.
    #[test]
    fn tls_config_builds() {
        assert!(tls().is_ok());
    }
}
