//! The relay's typed configuration, read once at start-up.
//!
//! Owns parsing and validation of the environment variables listed in API.md "Relay
//! configuration", plus an optional `.env` file (real environment wins). Every problem is
//! collected and reported at once, so an operator fixes a deployment in one pass. It must
//! not fall back silently: a missing key is a named problem, never a default, and it never
//! mutates the process environment.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use cmb_core::secret::Secret;
use serde::Serialize;
use url::Url;

/// The shortest `RELAY_SECRET` accepted: it keys an HMAC, so it needs 256 bits.
pub const MIN_RELAY_SECRET_BYTES: usize = 32;

const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
const DEFAULT_DEEPGRAM_URL: &str = "wss://api.deepgram.com/v1/listen";
const DEFAULT_ELEVENLABS_URL: &str = "wss://api.elevenlabs.io";
const DEFAULT_MAX_CALLS: usize = 1000;
/// How long in-flight calls get to close cleanly after a shutdown signal.
/// Calls last minutes: a deploy lets the ones in progress finish (`RELAY_DRAIN_SECS`).
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(600);

/// Everything the relay needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address the HTTP server binds (`RELAY_LISTEN`).
    pub listen: SocketAddr,
    /// Shared with the Worker: control-channel bearer and stream-token HMAC key.
    pub relay_secret: Secret,
    /// The public `ws(s)://…/twilio` URL exactly as configured; Twilio signs this string,
    /// so it is kept verbatim rather than re-serialised through `Url`.
    pub public_url: String,
    /// Key for the upgrade's `X-Twilio-Signature`.
    pub twilio_auth_token: Secret,
    /// The Worker's base URL (`http(s)://`), for the control channel.
    pub worker_url: Url,
    /// Deepgram API key (`Authorization: Token …`).
    pub deepgram_api_key: Secret,
    /// Deepgram live endpoint (`ws(s)://…/v1/listen`).
    pub deepgram_url: Url,
    /// ElevenLabs API key (`xi-api-key`).
    pub elevenlabs_api_key: Secret,
    /// ElevenLabs base URL (`ws(s)://host`).
    pub elevenlabs_url: Url,
    /// New streams beyond this many active calls are refused.
    pub max_calls: usize,
    /// How long calls in progress may go on after SIGTERM before they are closed
    /// (`RELAY_DRAIN_SECS`); new calls are refused at once.
    pub shutdown_grace: Duration,
}

/// How the relay writes its log lines (`RELAY_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (the default outside a terminal): for log collectors.
    Json,
    /// Human-readable lines (the default in a terminal).
    Text,
}

impl LogFormat {
    /// `json` or `text`; unset: text in a terminal, JSON otherwise.
    pub fn parse(value: Option<&str>, terminal: bool) -> Result<LogFormat, String> {
        match value.map(str::trim) {
            None | Some("") => Ok(if terminal {
                LogFormat::Text
            } else {
                LogFormat::Json
            }),
            Some(v) if v.eq_ignore_ascii_case("json") => Ok(LogFormat::Json),
            Some(v) if v.eq_ignore_ascii_case("text") => Ok(LogFormat::Text),
            Some(v) => Err(format!("must be json or text, not {v:?}")),
        }
    }
}

/// One named configuration problem, as shown on `/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigProblem {
    /// The variable (or `.env`) at fault.
    pub name: String,
    /// What is wrong with it, e.g. `missing`.
    pub problem: String,
}

/// Every problem found in one pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// All problems, in the order the settings are listed in API.md.
    pub problems: Vec<ConfigProblem>,
    /// `RELAY_LISTEN` when it alone was valid, so the binary can still bind and report the
    /// other problems on `/health` instead of dying silently behind a load balancer.
    pub listen: Option<SocketAddr>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid relay configuration:")?;
        for p in &self.problems {
            write!(f, " {}: {};", p.name, p.problem)?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads the process environment, then a `.env` file in the working directory for
    /// anything the environment does not set.
    pub fn from_env() -> Result<Self, ConfigError> {
        let (file, file_problem) = read_dotenv();
        let result =
            Self::from_lookup(|name| std::env::var(name).ok().or_else(|| file.get(name).cloned()));
        match (result, file_problem) {
            (r, None) => r,
            // A broken `.env` is a problem even if every setting came from the real env:
            // the operator clearly meant something by it.
            (Ok(config), Some(p)) => Err(ConfigError {
                problems: vec![p],
                listen: Some(config.listen),
            }),
            (Err(mut e), Some(p)) => {
                e.problems.push(p);
                Err(e)
            }
        }
    }

    /// Parses and validates settings from `lookup` (name → value); empty counts as missing.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut p = Problems::default();
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());

        let listen = p.check("RELAY_LISTEN", || {
            let raw = get("RELAY_LISTEN").unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
            raw.parse::<SocketAddr>()
                .map_err(|_| format!("not a socket address (host:port): {raw:?}"))
        });
        let relay_secret = p.check("RELAY_SECRET", || {
            let v = get("RELAY_SECRET").ok_or_else(missing)?;
            if v.len() < MIN_RELAY_SECRET_BYTES {
                return Err(format!(
                    "too short: need at least {MIN_RELAY_SECRET_BYTES} bytes"
                ));
            }
            Ok(Secret::new(v))
        });
        let public_url = p.check("RELAY_PUBLIC_URL", || {
            let v = get("RELAY_PUBLIC_URL").ok_or_else(missing)?;
            parse_url(&v, &["ws", "wss"])?;
            Ok(v)
        });
        let twilio_auth_token = p.check("TWILIO_AUTH_TOKEN", || secret(get("TWILIO_AUTH_TOKEN")));
        let worker_url = p.check("WORKER_URL", || {
            parse_url(&get("WORKER_URL").ok_or_else(missing)?, &["http", "https"])
        });
        let deepgram_api_key = p.check("DEEPGRAM_API_KEY", || secret(get("DEEPGRAM_API_KEY")));
        let deepgram_url = p.check("DEEPGRAM_URL", || {
            parse_url(
                &get("DEEPGRAM_URL").unwrap_or_else(|| DEFAULT_DEEPGRAM_URL.to_owned()),
                &["ws", "wss"],
            )
        });
        let elevenlabs_api_key =
            p.check("ELEVENLABS_API_KEY", || secret(get("ELEVENLABS_API_KEY")));
        let elevenlabs_url = p.check("ELEVENLABS_URL", || {
            parse_url(
                &get("ELEVENLABS_URL").unwrap_or_else(|| DEFAULT_ELEVENLABS_URL.to_owned()),
                &["ws", "wss"],
            )
        });
        let max_calls = p.check("RELAY_MAX_CALLS", || match get("RELAY_MAX_CALLS") {
            None => Ok(DEFAULT_MAX_CALLS),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("not a positive integer: {v:?}")),
            },
        });

        let shutdown_grace = p.check("RELAY_DRAIN_SECS", || match get("RELAY_DRAIN_SECS") {
            None => Ok(DEFAULT_SHUTDOWN_GRACE),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n <= 86_400 => Ok(Duration::from_secs(n)),
                _ => Err(format!("not a number of seconds (0 to 86400): {v:?}")),
            },
        });

        // Logging starts before the configuration is read (`main`); a bad value is still
        // a configuration problem, named on /health.
        p.check("RELAY_LOG_FORMAT", || {
            LogFormat::parse(get("RELAY_LOG_FORMAT").as_deref(), false)
        });

        // Destructure all at once: any `None` means a problem was recorded for it.
        match (
            listen,
            relay_secret,
            public_url,
            twilio_auth_token,
            worker_url,
            deepgram_api_key,
            deepgram_url,
            elevenlabs_api_key,
            elevenlabs_url,
            max_calls,
            shutdown_grace,
        ) {
            (
                Some(listen),
                Some(relay_secret),
                Some(public_url),
                Some(twilio_auth_token),
                Some(worker_url),
                Some(deepgram_api_key),
                Some(deepgram_url),
                Some(elevenlabs_api_key),
                Some(elevenlabs_url),
                Some(max_calls),
                Some(shutdown_grace),
            ) if p.0.is_empty() => Ok(Config {
                listen,
                relay_secret,
                public_url,
                twilio_auth_token,
                worker_url,
                deepgram_api_key,
                deepgram_url,
                elevenlabs_api_key,
                elevenlabs_url,
                max_calls,
                shutdown_grace,
            }),
            (listen, ..) => Err(ConfigError {
                problems: p.0,
                listen,
            }),
        }
    }
}

/// Accumulates problems while each setting is checked independently.
#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn check<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T, String>) -> Option<T> {
        match f() {
            Ok(v) => Some(v),
            Err(problem) => {
                self.0.push(ConfigProblem {
                    name: name.to_owned(),
                    problem,
                });
                None
            }
        }
    }
}

fn missing() -> String {
    "missing".to_owned()
}

fn secret(value: Option<String>) -> Result<Secret, String> {
    value.map(Secret::new).ok_or_else(missing)
}

/// Parses an absolute URL with a host and one of `schemes`. The value is never echoed in
/// the problem text: URLs can carry credentials.
fn parse_url(raw: &str, schemes: &[&str]) -> Result<Url, String> {
    let want = || {
        schemes
            .iter()
            .map(|s| format!("{s}://"))
            .collect::<Vec<_>>()
            .join(" or ")
    };
    let url = Url::parse(raw).map_err(|e| format!("not a URL ({e}); expected {}", want()))?;
    if !schemes.contains(&url.scheme()) {
        return Err(format!(
            "wrong scheme {:?}; expected {}",
            url.scheme(),
            want()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("URL has no host".to_owned());
    }
    Ok(url)
}

/// Reads `./.env` into a map. A missing file is normal; a malformed one is a problem.
fn read_dotenv() -> (HashMap<String, String>, Option<ConfigProblem>) {
    let mut map = HashMap::new();
    let iter = match dotenvy::dotenv_iter() {
        Ok(iter) => iter,
        Err(e) if e.not_found() => return (map, None),
        Err(e) => return (map, Some(dotenv_problem(&e))),
    };
    for item in iter {
        match item {
            Ok((k, v)) => {
                map.insert(k, v);
            }
            Err(e) => return (map, Some(dotenv_problem(&e))),
        }
    }
    (map, None)
}

fn dotenv_problem(e: &dotenvy::Error) -> ConfigProblem {
    // dotenvy's parse errors quote the offending line, which may hold a secret: name only
    // the kind of failure.
    let problem = match e {
        dotenvy::Error::LineParse(_, index) => format!("cannot parse line at byte {index}"),
        dotenvy::Error::Io(io) => format!("cannot read: {}", io.kind()),
        _ => "cannot read".to_owned(),
    };
    ConfigProblem {
        name: ".env".to_owned(),
        problem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn good() -> HashMap<&'static str, &'static str> {
        HashMap::from([
            ("RELAY_SECRET", SECRET),
            ("RELAY_PUBLIC_URL", "wss://relay.example.com/twilio"),
            ("TWILIO_AUTH_TOKEN", "twilio-token"),
            ("WORKER_URL", "http://127.0.0.1:8787"),
            ("DEEPGRAM_API_KEY", "dg-key"),
            ("ELEVENLABS_API_KEY", "xi-key"),
        ])
    }

    fn parse(vars: &HashMap<&'static str, &'static str>) -> Result<Config, ConfigError> {
        Config::from_lookup(|k| vars.get(k).map(|v| (*v).to_owned()))
    }

    fn names(e: &ConfigError) -> Vec<&str> {
        e.problems.iter().map(|p| p.name.as_str()).collect()
    }

    /// The minimal set of required variables parses, and defaults fill the rest.
    #[test]
    fn defaults_apply() {
        let c = parse(&good()).expect("valid config");
        assert_eq!(c.listen, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(c.deepgram_url.as_str(), "wss://api.deepgram.com/v1/listen");
        assert_eq!(c.elevenlabs_url.as_str(), "wss://api.elevenlabs.io/");
        assert_eq!(c.max_calls, 1000);
        assert_eq!(c.public_url, "wss://relay.example.com/twilio");
        assert_eq!(c.relay_secret.expose(), SECRET);
        assert_eq!(c.shutdown_grace, Duration::from_secs(600));
    }

    /// Explicit values override every default.
    #[test]
    fn explicit_values_win() {
        let mut v = good();
        v.insert("RELAY_LISTEN", "127.0.0.1:0");
        v.insert("DEEPGRAM_URL", "ws://127.0.0.1:9001/v1/listen");
        v.insert("ELEVENLABS_URL", "ws://127.0.0.1:9002");
        v.insert("RELAY_MAX_CALLS", "7");
        v.insert("RELAY_DRAIN_SECS", "45");
        v.insert("RELAY_LOG_FORMAT", "text");
        let c = parse(&v).expect("valid config");
        assert_eq!(c.shutdown_grace, Duration::from_secs(45));
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.deepgram_url.port(), Some(9001));
        assert_eq!(c.elevenlabs_url.port(), Some(9002));
        assert_eq!(c.max_calls, 7);
    }

    /// The drain time and log format are checked like everything else.
    #[test]
    fn bad_drain_and_log_format_are_named() {
        let mut v = good();
        v.insert("RELAY_DRAIN_SECS", "soon");
        v.insert("RELAY_LOG_FORMAT", "xml");
        let e = parse(&v).expect_err("invalid");
        assert_eq!(names(&e), ["RELAY_DRAIN_SECS", "RELAY_LOG_FORMAT"]);
    }

    #[test]
    fn log_format_defaults_by_terminal() {
        assert_eq!(LogFormat::parse(None, true), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(None, false), Ok(LogFormat::Json));
        assert_eq!(LogFormat::parse(Some("JSON"), true), Ok(LogFormat::Json));
        assert_eq!(LogFormat::parse(Some("text"), false), Ok(LogFormat::Text));
        assert!(LogFormat::parse(Some("xml"), false).is_err());
    }

    /// With nothing set, every required variable is named, in one error.
    #[test]
    fn every_missing_setting_is_reported_at_once() {
        let e = parse(&HashMap::new()).expect_err("empty env is invalid");
        assert_eq!(
            names(&e),
            [
                "RELAY_SECRET",
                "RELAY_PUBLIC_URL",
                "TWILIO_AUTH_TOKEN",
                "WORKER_URL",
                "DEEPGRAM_API_KEY",
                "ELEVENLABS_API_KEY"
            ]
        );
        assert!(e.problems.iter().all(|p| p.problem == "missing"));
        // The default listen address still parsed, so the binary can serve /health.
        assert_eq!(e.listen, Some("0.0.0.0:8080".parse().expect("addr")));
    }

    /// Malformed values are reported alongside missing ones, each with its reason.
    #[test]
    fn malformed_values_are_named() {
        let mut v = good();
        v.insert("RELAY_SECRET", "short");
        v.insert("RELAY_PUBLIC_URL", "https://relay.example.com/twilio");
        v.insert("WORKER_URL", "not a url");
        v.insert("DEEPGRAM_URL", "http://x/v1/listen");
        v.insert("RELAY_MAX_CALLS", "0");
        v.insert("RELAY_LISTEN", "localhost");
        v.remove("ELEVENLABS_API_KEY");
        let e = parse(&v).expect_err("invalid");
        assert_eq!(
            names(&e),
            [
                "RELAY_LISTEN",
                "RELAY_SECRET",
                "RELAY_PUBLIC_URL",
                "WORKER_URL",
                "DEEPGRAM_URL",
                "ELEVENLABS_API_KEY",
                "RELAY_MAX_CALLS"
            ]
        );
        assert!(
            e.problems[1].problem.contains("32 bytes"),
            "{:?}",
            e.problems[1]
        );
        assert!(
            e.problems[2].problem.contains("wss://"),
            "{:?}",
            e.problems[2]
        );
        assert_eq!(e.listen, None);
    }

    /// An empty value counts as missing (a common `.env` mistake: `KEY=`).
    #[test]
    fn empty_is_missing() {
        let mut v = good();
        v.insert("DEEPGRAM_API_KEY", "");
        let e = parse(&v).expect_err("invalid");
        assert_eq!(
            e.problems,
            [ConfigProblem {
                name: "DEEPGRAM_API_KEY".into(),
                problem: "missing".into()
            }]
        );
    }

    /// Neither the config's Debug nor the error text leaks secret values.
    #[test]
    fn secrets_do_not_leak() {
        let c = parse(&good()).expect("valid config");
        let dbg = format!("{c:?}");
        for s in [SECRET, "twilio-token", "dg-key", "xi-key"] {
            assert!(!dbg.contains(s), "{s} leaked in {dbg}");
        }
        let mut v = good();
        v.insert("RELAY_SECRET", "tiny-secret");
        let e = parse(&v).expect_err("invalid");
        assert!(!e.to_string().contains("tiny-secret"), "{e}");
    }
}
