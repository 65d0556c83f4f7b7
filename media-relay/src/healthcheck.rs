//! `media-relay healthcheck`: the container's `HEALTHCHECK` without curl in the image.
//! GETs the relay's own `/health` on loopback with a deadline and says whether the process
//! is alive and serving.
//!
//! Alive means `/health` answered `ok`, `full` or `draining` (503 for a load balancer,
//! but the process is doing its job: a host that restarts unhealthy containers must not
//! kill a full or draining relay with calls in it). `unhealthy` (a configuration
//! problem), any other answer, or none by the deadline is not alive.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// The whole check's deadline (connect, request, body).
pub const DEADLINE: Duration = Duration::from_secs(3);

/// Where to reach a relay bound at `listen`: a wildcard address is reached on loopback.
pub fn target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Whether an answer from `/health` means alive: `Ok` with its status, or why not.
pub fn verdict(status: u16, body: &[u8]) -> Result<String, String> {
    let parsed: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| format!("/health answered {status} without a JSON body"))?;
    let said = parsed["status"].as_str().unwrap_or("");
    match (status, said) {
        (200, "ok") | (503, "full" | "draining") => Ok(said.to_owned()),
        _ => Err(format!("/health answered {status} {said:?}: {parsed}")),
    }
}

/// GETs `http://{addr}/health` within [`DEADLINE`] and judges the answer.
pub async fn check(addr: SocketAddr) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .timeout(DEADLINE)
        .no_proxy()
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let url = format!("http://{addr}/health");
    let res = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = res.status().as_u16();
    let body = res
        .bytes()
        .await
        .map_err(|e| format!("GET {url}: reading the body: {e}"))?;
    verdict(status, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::server::app;
    use crate::state::AppState;

    /// A wildcard bind is checked on loopback; a specific address as it is.
    #[test]
    fn target_uses_loopback_for_wildcards() {
        let t = |s: &str| target(s.parse().expect("addr")).to_string();
        assert_eq!(t("0.0.0.0:8080"), "127.0.0.1:8080");
        assert_eq!(t("[::]:9000"), "[::1]:9000");
        assert_eq!(t("10.1.2.3:8080"), "10.1.2.3:8080");
    }

    /// ok, full and draining are alive; unhealthy, other codes and non-JSON are not.
    #[test]
    fn verdicts() {
        assert_eq!(verdict(200, br#"{"status":"ok"}"#), Ok("ok".into()));
        assert_eq!(verdict(503, br#"{"status":"full"}"#), Ok("full".into()));
        assert_eq!(
            verdict(503, br#"{"status":"draining"}"#),
            Ok("draining".into())
        );
        assert!(verdict(503, br#"{"status":"unhealthy"}"#).is_err());
        assert!(verdict(200, br#"{"status":"draining"}"#).is_err());
        assert!(verdict(500, br#"{"status":"ok"}"#).is_err());
        assert!(verdict(200, b"ok").is_err());
    }

    /// Against the real routes on a loopback port: alive with a good config, draining
    /// still alive, not alive with a bad config, and nothing listening fails in time.
    #[tokio::test]
    async fn checks_a_served_relay() {
        async fn serve(state: AppState) -> SocketAddr {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(async move { axum::serve(listener, app(state)).await });
            addr
        }
        let vars = [
            ("RELAY_SECRET", "0123456789abcdef0123456789abcdef"),
            ("RELAY_PUBLIC_URL", "wss://example.com/twilio"),
            ("TWILIO_AUTH_TOKEN", "tw"),
            ("WORKER_URL", "http://127.0.0.1:9"),
            ("DEEPGRAM_API_KEY", "dg"),
            ("ELEVENLABS_API_KEY", "xi"),
        ];
        let good = Config::from_lookup(|k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| (*v).to_owned())
        });
        let state = AppState::new(good);
        let addr = serve(state.clone()).await;
        assert_eq!(check(addr).await, Ok("ok".into()));
        state.start_draining();
        assert_eq!(check(addr).await, Ok("draining".into()));

        let bad = serve(AppState::new(Config::from_lookup(|_| None))).await;
        let err = check(bad).await.expect_err("unhealthy");
        assert!(err.contains("unhealthy"), "{err}");

        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let started = std::time::Instant::now();
        assert!(check(closed).await.is_err());
        assert!(started.elapsed() < DEADLINE + Duration::from_secs(1));
    }
}
