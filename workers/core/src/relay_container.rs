//! The Cloudflare Containers option (`[env.production-containers]`): the media relay runs
//! in a container behind the `RelayContainer` Durable Object, and the Worker passes it
//! the relay's requests. What is decided here, without I/O: which requests are the
//! relay's, and the container's environment, built from the Worker's own settings.
//!
//! With containers, `RELAY_URL` is the Worker's host (`wss://<worker>/twilio`): Twilio's
//! media stream and the DO's greeting `PUT` (derived from `RELAY_URL`,
//! `channel::greeting_url`) arrive at the Worker, which forwards them to the container.

use crate::config::ConfigProblem;

/// The port the relay listens on inside the container (`RELAY_LISTEN`).
pub const RELAY_PORT: u16 = 8080;

/// The one container instance's name: every call's stream goes to the same relay
/// (`max_instances = 1`; the relay takes `RELAY_MAX_CALLS` calls at once).
pub const INSTANCE_NAME: &str = "relay";

/// Whether `path` is one of the relay's routes a caller reaches through the Worker:
/// `/twilio` (Twilio Media Streams) and `/internal/calls/{id}/greeting` (the DO staging
/// a greeting). The relay's `/health` and `/metrics` stay private to the container.
pub fn is_relay_path(path: &str) -> bool {
    if path == "/twilio" {
        return true;
    }
    let Some(rest) = path.strip_prefix("/internal/calls/") else {
        return false;
    };
    rest.strip_suffix("/greeting")
        .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

/// Settings the container's relay needs, read from the Worker's vars and secrets under
/// the same names, required.
const PASSED: &[&str] = &[
    "RELAY_SECRET",
    "TWILIO_AUTH_TOKEN",
    "DEEPGRAM_API_KEY",
    "ELEVENLABS_API_KEY",
];

/// Optional relay settings passed on when the Worker has them.
const PASSED_IF_SET: &[&str] = &[
    "DEEPGRAM_URL",
    "ELEVENLABS_URL",
    "RELAY_MAX_CALLS",
    "RELAY_DRAIN_SECS",
];

/// The relay's environment in the container, from the Worker's settings (`get`): its
/// public URL is the Worker's `RELAY_URL`, its Worker the Worker's `PUBLIC_BASE_URL`.
/// Every missing setting is named; nothing is defaulted.
pub fn container_env(
    get: impl Fn(&str) -> Option<String>,
) -> Result<Vec<(&'static str, String)>, Vec<ConfigProblem>> {
    let value = |name: &str| {
        get(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let mut env = vec![("RELAY_LISTEN", format!("0.0.0.0:{RELAY_PORT}"))];
    let mut problems = Vec::new();
    let mut require = |to: &'static str, from: &'static str, env: &mut Vec<_>| match value(from) {
        Some(v) => env.push((to, v)),
        None => problems.push(ConfigProblem {
            name: from,
            problem: format!("missing: the relay container's {to} comes from it"),
        }),
    };
    require("RELAY_PUBLIC_URL", "RELAY_URL", &mut env);
    require("WORKER_URL", "PUBLIC_BASE_URL", &mut env);
    for name in PASSED {
        require(name, name, &mut env);
    }
    for name in PASSED_IF_SET {
        if let Some(v) = value(name) {
            env.push((name, v));
        }
    }
    if problems.is_empty() {
        Ok(env)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn relay_paths() {
        for path in ["/twilio", "/internal/calls/c_123/greeting"] {
            assert!(is_relay_path(path), "{path}");
        }
        for path in [
            "/twilio/",
            "/twilio2",
            "/health",
            "/metrics",
            "/internal/calls//greeting",
            "/internal/calls/a/b/greeting",
            "/internal/calls/c_1",
            "/api/calls",
        ] {
            assert!(!is_relay_path(path), "{path}");
        }
    }

    #[test]
    fn env_from_the_workers_settings() {
        let vars: HashMap<&str, &str> = [
            ("RELAY_URL", "wss://api.example.com/twilio"),
            ("PUBLIC_BASE_URL", "https://api.example.com"),
            ("RELAY_SECRET", "s3cret"),
            ("TWILIO_AUTH_TOKEN", "tok"),
            ("DEEPGRAM_API_KEY", "dg"),
            ("ELEVENLABS_API_KEY", " el \n"),
            ("RELAY_MAX_CALLS", "50"),
        ]
        .into_iter()
        .collect();
        let env = container_env(|n| vars.get(n).map(|v| (*v).to_owned())).unwrap();
        let env: HashMap<_, _> = env.into_iter().collect();
        assert_eq!(env["RELAY_LISTEN"], "0.0.0.0:8080");
        assert_eq!(env["RELAY_PUBLIC_URL"], "wss://api.example.com/twilio");
        assert_eq!(env["WORKER_URL"], "https://api.example.com");
        assert_eq!(env["ELEVENLABS_API_KEY"], "el");
        assert_eq!(env["RELAY_MAX_CALLS"], "50");
        assert!(!env.contains_key("DEEPGRAM_URL"));
        assert_eq!(env.len(), 8);
    }

    #[test]
    fn every_missing_setting_is_named() {
        let problems =
            container_env(|n| (n == "RELAY_SECRET").then(|| "s".to_owned())).unwrap_err();
        let names: Vec<_> = problems.iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "RELAY_URL",
                "PUBLIC_BASE_URL",
                "TWILIO_AUTH_TOKEN",
                "DEEPGRAM_API_KEY",
                "ELEVENLABS_API_KEY"
            ]
        );
    }
}
