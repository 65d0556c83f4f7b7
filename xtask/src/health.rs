//! Waiting for a service's `GET /health` to answer.
//!
//! "Up" means the service itself answered: 200 (healthy) or 503 (running, but with named
//! problems; callers decide whether that is acceptable). Anything else — connection
//! refused, a proxy's placeholder page — means "not yet". This module never judges the
//! body; it hands it back.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::service::Service;

/// One `/health` answer.
#[derive(Debug, Clone)]
pub struct HealthReply {
    pub status: u16,
    pub body: String,
}

impl HealthReply {
    pub fn is_healthy(&self) -> bool {
        self.status == 200
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        // Status codes are data here (503 is a meaningful answer), not errors.
        .http_status_as_error(false)
        // Loopback only: an HTTP(S)_PROXY from the environment must not intercept it.
        .proxy(None)
        .build()
        .new_agent()
}

/// One GET, any status.
pub fn get(url: &str, timeout: Duration) -> Result<HealthReply> {
    let mut resp = agent(timeout).get(url).call()?;
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string()?;
    Ok(HealthReply { status, body })
}

/// Polls `url` until it answers 200 or 503. Fails as soon as `service` exits, or at
/// `timeout`, with the last observation and the service's output tail.
pub fn wait_until_up(url: &str, service: &mut Service, timeout: Duration) -> Result<HealthReply> {
    let started = Instant::now();
    loop {
        let last = match get(url, Duration::from_secs(5)) {
            Ok(reply) if matches!(reply.status, 200 | 503) => return Ok(reply),
            Ok(reply) => format!("HTTP {}: {}", reply.status, snippet(&reply.body)),
            Err(e) => e.to_string(),
        };
        if let Some(status) = service.exited()? {
            bail!(
                "{} exited ({status}) before {url} answered; last output:\n{}",
                service.name(),
                service.tail(40)
            );
        }
        if started.elapsed() >= timeout {
            bail!(
                "{} did not answer {url} within {}s (last: {last}); last output:\n{}",
                service.name(),
                timeout.as_secs(),
                service.tail(40)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn snippet(body: &str) -> &str {
    let end = body.char_indices().nth(200).map_or(body.len(), |(i, _)| i);
    &body[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::ServiceSpec;

    /// A service that dies before answering fails the wait at once, naming itself.
    #[test]
    fn exited_service_fails_fast() {
        let mut svc =
            Service::spawn(ServiceSpec::new("dead", "sh").args(["-c", "echo bye"])).unwrap();
        let started = Instant::now();
        // Port 9 (discard) has no listener on loopback here.
        let err = wait_until_up(
            "http://127.0.0.1:9/health",
            &mut svc,
            Duration::from_secs(30),
        )
        .unwrap_err()
        .to_string();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(err.contains("dead exited"), "{err}");
        assert!(err.contains("bye"), "{err}");
    }

    /// Long bodies are cut for messages without splitting a character.
    #[test]
    fn snippet_cuts_on_char_boundary() {
        let body = "é".repeat(300);
        assert_eq!(snippet(&body).chars().count(), 200);
        assert_eq!(snippet("short"), "short");
    }
}
