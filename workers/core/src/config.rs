//! The Worker's typed configuration, parsed from a name → value lookup.
//!
//! Owns the setting names (API.md "Worker configuration"), their defaults and their
//! validation, and reports every missing or malformed setting at once. It must not read
//! the environment itself: the Worker adapts `worker::Env` into the lookup, tests pass a
//! map. Bindings (D1, KV, DOs) are the Worker's to check.
//!
//! Every value is trimmed of surrounding whitespace first — a trailing newline from
//! `echo … | wrangler secret put` is the classic way a secret "cannot be set" — and an
//! empty value counts as unset.

use std::fmt;

use url::Url;

use crate::secret::Secret;
use crate::validate;

pub const DEFAULT_TWILIO_API_BASE: &str = "https://api.twilio.com";
pub const DEFAULT_TWILIO_VERIFY_API_BASE: &str = "https://verify.twilio.com";

/// `VA` and 32 hex digits, as Twilio writes a Verify Service SID.
fn is_verify_sid(sid: &str) -> bool {
    sid.strip_prefix("VA")
        .is_some_and(|hex| hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()))
}
pub const DEFAULT_LLM_API_BASE: &str = "https://api.cerebras.ai/v1";
pub const DEFAULT_LLM_MODEL: &str = "gpt-oss-120b";
pub const DEFAULT_STRIPE_API_BASE: &str = "https://api.stripe.com";
pub const DEFAULT_FREE_CREDITS: i64 = 200;
/// What the persona says before its greeting on the first call that reaches a number.
pub const DEFAULT_AI_DISCLOSURE: &str =
    "Hi! Just so you know, this is an AI voice from Call Me Back, calling because this number asked for a call.";
/// The longest `AI_DISCLOSURE` (it is spoken before anything else).
pub const AI_DISCLOSURE_MAX_CHARS: usize = 300;
/// HMAC keys shorter than this are guessable offline.
pub const MIN_HMAC_SECRET_BYTES: usize = 32;
/// `CALL_SPECULATE_AFTER_MS`: at least one 20 ms frame of quiet, and less than the
/// endpointing time (300 ms), which ends the turn.
pub const SPECULATE_AFTER_MS_RANGE: std::ops::RangeInclusive<u32> = 20..=280;

/// Which database the Worker's store uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbBackend {
    /// Cloudflare D1 (binding `DB`), the default.
    D1,
    /// Postgres through the `HYPERDRIVE` binding.
    Postgres,
}

/// Where the Worker runs (`DEPLOY_ENV`): decides whether loopback URLs are a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeployEnv {
    /// `wrangler dev` on a developer's machine or in the test stacks (`wrangler.toml`'s
    /// top-level `[vars]`): loopback `PUBLIC_BASE_URL`/`RELAY_URL` are expected.
    Development,
    /// Anything deployed (`[env.production*]`), and the value when `DEPLOY_ENV` is unset:
    /// Twilio must reach both URLs, so a loopback address is reported.
    Production,
}

/// Everything the Worker needs from vars and secrets, validated.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// No trailing slash.
    pub public_base_url: String,
    /// Exactly as configured: Twilio connects to it and the relay checks signatures
    /// against the same string.
    pub relay_url: String,
    pub relay_secret: Secret,
    pub jwt_secret: Secret,
    pub db_backend: DbBackend,
    /// `DEPLOY_ENV`: `development` or `production` (the default).
    pub deploy_env: DeployEnv,
    pub twilio_account_sid: String,
    pub twilio_auth_token: Secret,
    /// E.164.
    pub twilio_phone_number: String,
    /// No trailing slash.
    pub twilio_api_base: String,
    pub llm_api_key: Secret,
    /// No trailing slash.
    pub llm_api_base: String,
    pub llm_model: String,
    pub stripe_secret_key: Secret,
    pub stripe_webhook_secret: Secret,
    /// No trailing slash.
    pub stripe_api_base: String,
    /// Twilio Verify Service (`VA…`) that sends the SMS codes.
    pub twilio_verify_service_sid: String,
    /// No trailing slash.
    pub twilio_verify_api_base: String,
    /// ISO 3166 alpha-2, upper case: the countries we call (`ALLOWED_COUNTRIES`).
    pub allowed_countries: Vec<String>,
    /// Lowercased. No longer grants anything: admins are granted by an operator
    /// (`cargo xtask admin grant`); kept so `/health` can tell an operator to move off it.
    pub admin_emails: Vec<String>,
    /// Origins (or `*`), no trailing slash.
    pub cors_origins: Vec<String>,
    pub free_credits: i64,
    /// Spoken before the greeting on the first call that reaches a number
    /// (`AI_DISCLOSURE`; it cannot be switched off, only reworded).
    pub ai_disclosure: String,
    /// Timeouts of every call (`CALL_*`, `TWILIO_RING_TIMEOUT_SECS`, `LLM_*_TIMEOUT_MS`).
    pub call_limits: crate::session::Limits,
    /// Deadline of one Twilio REST request (`TWILIO_TIMEOUT_MS`, default 10 000).
    pub twilio_timeout_ms: u32,
    /// The least `retry_after_minutes` a schedule may ask for (`SCHEDULE_MIN_RETRY_MINUTES`,
    /// default 5). Test-only: the test stacks lower it to 0 so a retry needs no wait.
    pub schedule_min_retry_minutes: u32,
    /// Days the operators' event log keeps (`EVENT_RETENTION_DAYS`, default 30).
    pub event_retention_days: u32,
}

/// One missing or malformed setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The setting's name, e.g. `JWT_SECRET`.
    pub name: &'static str,
    /// What is wrong, never the value itself (it may be a secret).
    pub problem: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.problem)
    }
}

/// Every problem found, in setting order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigProblem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid configuration: ")?;
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Collects problems while reading; on a problem each reader returns a placeholder,
/// which never escapes because any problem makes the whole parse fail.
struct Reader<F> {
    get: F,
    problems: Vec<ConfigProblem>,
}

impl<F: Fn(&str) -> Option<String>> Reader<F> {
    fn problem(&mut self, name: &'static str, problem: impl Into<String>) {
        self.problems.push(ConfigProblem {
            name,
            problem: problem.into(),
        });
    }

    /// The trimmed value, `None` when unset or blank.
    fn optional(&self, name: &str) -> Option<String> {
        (self.get)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn required(&mut self, name: &'static str) -> String {
        self.optional(name).unwrap_or_else(|| {
            self.problem(name, "missing");
            String::new()
        })
    }

    fn secret(&mut self, name: &'static str, min_bytes: usize) -> Secret {
        let Some(value) = self.optional(name) else {
            self.problem(name, "missing");
            return Secret::new("");
        };
        if value.len() < min_bytes {
            self.problem(
                name,
                format!("too short: must be at least {min_bytes} bytes"),
            );
        }
        Secret::new(value)
    }

    /// An absolute URL with one of `schemes` and a host; `None` (with a problem) otherwise.
    fn url(&mut self, name: &'static str, value: &str, schemes: &[&str]) -> Option<Url> {
        let url = match Url::parse(value) {
            Ok(url) => url,
            Err(e) => {
                self.problem(name, format!("not a valid URL ({e})"));
                return None;
            }
        };
        if !schemes.contains(&url.scheme()) {
            self.problem(name, format!("scheme must be {}", schemes.join(" or ")));
            return None;
        }
        if url.host_str().is_none_or(str::is_empty) {
            self.problem(name, "URL has no host");
            return None;
        }
        Some(url)
    }

    /// An http(s) base URL for building request URLs: no query or fragment, trailing
    /// slashes removed.
    fn base_url(&mut self, name: &'static str, default: Option<&str>) -> String {
        let value = match (self.optional(name), default) {
            (Some(v), _) => v,
            (None, Some(d)) => d.to_owned(),
            (None, None) => {
                self.problem(name, "missing");
                return String::new();
            }
        };
        let Some(url) = self.url(name, &value, &["https", "http"]) else {
            return String::new();
        };
        if url.query().is_some() || url.fragment().is_some() {
            self.problem(name, "a base URL cannot have a query or fragment");
        }
        value.trim_end_matches('/').to_owned()
    }

    /// A whole number > 0, or `default` when unset.
    fn positive(&mut self, name: &'static str, default: u32) -> u32 {
        match self.optional(name) {
            None => default,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if n > 0 => n,
                _ => {
                    self.problem(name, "must be a whole number > 0");
                    default
                }
            },
        }
    }

    /// A whole number in `range`, or `default` when unset.
    fn within(
        &mut self,
        name: &'static str,
        default: u32,
        range: std::ops::RangeInclusive<u32>,
    ) -> u32 {
        match self.optional(name) {
            None => default,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if range.contains(&n) => n,
                _ => {
                    self.problem(
                        name,
                        format!(
                            "must be a whole number from {} to {}",
                            range.start(),
                            range.end()
                        ),
                    );
                    default
                }
            },
        }
    }

    /// One of `options`' words (any case), or `default` when unset.
    fn choice<T: Copy>(&mut self, name: &'static str, default: T, options: &[(&str, T)]) -> T {
        let Some(value) = self.optional(name) else {
            return default;
        };
        match options
            .iter()
            .find(|(word, _)| value.eq_ignore_ascii_case(word))
        {
            Some((_, chosen)) => *chosen,
            None => {
                let words: Vec<&str> = options.iter().map(|(word, _)| *word).collect();
                self.problem(name, format!("must be {}", words.join(" or ")));
                default
            }
        }
    }

    /// `true` or `false` (any case), or `default` when unset.
    fn boolean(&mut self, name: &'static str, default: bool) -> bool {
        match self.optional(name) {
            None => default,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(_) => {
                self.problem(name, "must be true or false");
                default
            }
        }
    }

    /// Comma-separated list, entries trimmed, blanks dropped.
    fn list(&self, name: &str) -> Vec<String> {
        self.optional(name)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Parses the Worker configuration; see [`WorkerConfig::from_lookup`].
pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<WorkerConfig, ConfigErrors> {
    let mut r = Reader {
        get,
        problems: Vec::new(),
    };

    let public_base_url = r.base_url("PUBLIC_BASE_URL", None);

    let relay_url = r.required("RELAY_URL");
    if !relay_url.is_empty() {
        if let Some(url) = r.url("RELAY_URL", &relay_url, &["wss", "ws"]) {
            // Twilio drops query strings on stream URLs (PROTOCOLS.md §1).
            if url.query().is_some() {
                r.problem(
                    "RELAY_URL",
                    "must not have a query string (Twilio drops it); per-call data goes in <Parameter>s",
                );
            }
        }
    }

    let relay_secret = r.secret("RELAY_SECRET", MIN_HMAC_SECRET_BYTES);
    let jwt_secret = r.secret("JWT_SECRET", MIN_HMAC_SECRET_BYTES);

    let db_backend = r.choice(
        "DB_BACKEND",
        DbBackend::D1,
        &[("d1", DbBackend::D1), ("postgres", DbBackend::Postgres)],
    );
    // Unset is production: a forgotten variable never hides a loopback URL.
    let deploy_env = r.choice(
        "DEPLOY_ENV",
        DeployEnv::Production,
        &[
            ("development", DeployEnv::Development),
            ("production", DeployEnv::Production),
        ],
    );

    let twilio_account_sid = r.required("TWILIO_ACCOUNT_SID");
    let twilio_auth_token = r.secret("TWILIO_AUTH_TOKEN", 1);
    let twilio_phone_number = match r.optional("TWILIO_PHONE_NUMBER") {
        None => {
            r.problem("TWILIO_PHONE_NUMBER", "missing");
            String::new()
        }
        Some(v) => validate::e164(&v).unwrap_or_else(|e| {
            r.problem(
                "TWILIO_PHONE_NUMBER",
                format!("not an E.164 number: {}", e.message),
            );
            String::new()
        }),
    };
    let twilio_api_base = r.base_url("TWILIO_API_BASE", Some(DEFAULT_TWILIO_API_BASE));

    let llm_api_key = r.secret("LLM_API_KEY", 1);
    let llm_api_base = r.base_url("LLM_API_BASE", Some(DEFAULT_LLM_API_BASE));
    let llm_model = r
        .optional("LLM_MODEL")
        .unwrap_or_else(|| DEFAULT_LLM_MODEL.to_owned());

    let stripe_secret_key = r.secret("STRIPE_SECRET_KEY", 1);
    let stripe_webhook_secret = r.secret("STRIPE_WEBHOOK_SECRET", 1);
    let stripe_api_base = r.base_url("STRIPE_API_BASE", Some(DEFAULT_STRIPE_API_BASE));

    let twilio_verify_service_sid = r.required("TWILIO_VERIFY_SERVICE_SID");
    if !twilio_verify_service_sid.is_empty() && !is_verify_sid(&twilio_verify_service_sid) {
        r.problem(
            "TWILIO_VERIFY_SERVICE_SID",
            "must be a Verify Service SID: VA followed by 32 hex digits",
        );
    }
    let twilio_verify_api_base = r.base_url(
        "TWILIO_VERIFY_API_BASE",
        Some(DEFAULT_TWILIO_VERIFY_API_BASE),
    );
    let mut allowed_countries = Vec::new();
    match r.optional("ALLOWED_COUNTRIES") {
        None => allowed_countries.extend(
            crate::destination::DEFAULT_ALLOWED_COUNTRIES
                .iter()
                .map(|c| (*c).to_owned()),
        ),
        Some(_) => {
            for entry in r.list("ALLOWED_COUNTRIES") {
                match crate::destination::parse_country(&entry) {
                    Ok(c) => allowed_countries.push(c),
                    Err(why) => r.problem("ALLOWED_COUNTRIES", why),
                }
            }
            if allowed_countries.is_empty() {
                r.problem("ALLOWED_COUNTRIES", "lists no country");
            }
        }
    }

    let mut admin_emails = Vec::new();
    for entry in r.list("ADMIN_EMAILS") {
        match validate::email(&entry) {
            Ok(email) => admin_emails.push(email),
            Err(_) => r.problem("ADMIN_EMAILS", format!("{entry:?} is not a valid email")),
        }
    }

    let mut cors_origins = Vec::new();
    for entry in r.list("CORS_ORIGINS") {
        match crate::http::cors::parse_origin(&entry) {
            Ok(origin) => cors_origins.push(origin),
            Err(crate::http::cors::BadOrigin(why)) => r.problem("CORS_ORIGINS", why),
        }
    }

    let defaults = crate::session::Limits::default();
    let call_limits = crate::session::Limits {
        ring_timeout_secs: r.positive("TWILIO_RING_TIMEOUT_SECS", defaults.ring_timeout_secs),
        reconcile_margin_secs: r
            .positive("CALL_RECONCILE_MARGIN_SECS", defaults.reconcile_margin_secs),
        reconcile_give_up_secs: r.positive(
            "CALL_RECONCILE_GIVE_UP_SECS",
            defaults.reconcile_give_up_secs,
        ),
        relay_connect_secs: r.positive(
            "CALL_RELAY_CONNECT_TIMEOUT_SECS",
            defaults.relay_connect_secs,
        ),
        relay_grace_secs: r.positive("CALL_RELAY_GRACE_SECS", defaults.relay_grace_secs),
        idle_timeout_secs: r.positive("CALL_IDLE_TIMEOUT_SECS", defaults.idle_timeout_secs),
        max_call_secs: r.positive("CALL_MAX_DURATION_SECS", defaults.max_call_secs),
        llm_first_token_ms: r.positive("LLM_FIRST_TOKEN_TIMEOUT_MS", defaults.llm_first_token_ms),
        llm_total_ms: r.positive("LLM_TOTAL_TIMEOUT_MS", defaults.llm_total_ms),
        settle_wait_secs: r.positive("CALL_SETTLE_WAIT_SECS", defaults.settle_wait_secs),
        hang_up_grace_secs: r.positive("CALL_HANG_UP_GRACE_SECS", defaults.hang_up_grace_secs),
        prepare_greeting: r.boolean("CALL_PREPARE_GREETING", defaults.prepare_greeting),
        speculate: r.boolean("CALL_SPECULATE", defaults.speculate),
        speculate_after_ms: r.within(
            "CALL_SPECULATE_AFTER_MS",
            defaults.speculate_after_ms,
            SPECULATE_AFTER_MS_RANGE,
        ),
        fast_barge_in: r.boolean("CALL_FAST_BARGE_IN", defaults.fast_barge_in),
    };
    let twilio_timeout_ms = r.positive("TWILIO_TIMEOUT_MS", 10_000);
    let schedule_min_retry_minutes = match r.optional("SCHEDULE_MIN_RETRY_MINUTES") {
        None => crate::schedule::MIN_RETRY_AFTER_MINUTES,
        Some(v) => match v.parse::<u32>() {
            Ok(n) if n <= crate::schedule::MIN_RETRY_AFTER_MINUTES => n,
            _ => {
                r.problem(
                    "SCHEDULE_MIN_RETRY_MINUTES",
                    format!(
                        "must be a whole number from 0 to {}",
                        crate::schedule::MIN_RETRY_AFTER_MINUTES
                    ),
                );
                crate::schedule::MIN_RETRY_AFTER_MINUTES
            }
        },
    };
    let event_retention_days =
        match crate::events::retention_days(r.optional("EVENT_RETENTION_DAYS").as_deref()) {
            Ok(days) => days,
            Err(why) => {
                r.problem("EVENT_RETENTION_DAYS", why);
                crate::events::RETENTION_DAYS_DEFAULT
            }
        };

    let free_credits = match r.optional("FREE_CREDITS") {
        None => DEFAULT_FREE_CREDITS,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n >= 0 => n,
            _ => {
                r.problem("FREE_CREDITS", "must be a whole number ≥ 0");
                DEFAULT_FREE_CREDITS
            }
        },
    };

    let ai_disclosure = match r.optional("AI_DISCLOSURE") {
        None => DEFAULT_AI_DISCLOSURE.to_owned(),
        Some(v) => {
            let v = v.trim().to_owned();
            if v.chars().count() > AI_DISCLOSURE_MAX_CHARS || v.contains(['\n', '\r']) {
                r.problem(
                    "AI_DISCLOSURE",
                    format!("must be one line of at most {AI_DISCLOSURE_MAX_CHARS} characters"),
                );
            }
            v
        }
    };

    if !r.problems.is_empty() {
        return Err(ConfigErrors(r.problems));
    }
    Ok(WorkerConfig {
        public_base_url,
        relay_url,
        relay_secret,
        jwt_secret,
        db_backend,
        deploy_env,
        twilio_account_sid,
        twilio_auth_token,
        twilio_phone_number,
        twilio_api_base,
        llm_api_key,
        llm_api_base,
        llm_model,
        stripe_secret_key,
        stripe_webhook_secret,
        stripe_api_base,
        twilio_verify_service_sid,
        twilio_verify_api_base,
        allowed_countries,
        admin_emails,
        cors_origins,
        free_credits,
        schedule_min_retry_minutes,
        event_retention_days,
        ai_disclosure,
        call_limits,
        twilio_timeout_ms,
    })
}

/// The host of `url` when it is a loopback or unspecified address: `localhost` (and
/// `*.localhost`), 127.0.0.0/8, `0.0.0.0`, `::1`, `::` and IPv4-mapped forms of those.
/// `None` for any other host and for what does not parse as a URL.
pub fn loopback_host(url: &str) -> Option<String> {
    let parsed = Url::parse(url).ok()?;
    let local = match parsed.host()? {
        url::Host::Domain(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
        url::Host::Ipv4(ip) => ip.is_loopback() || ip.is_unspecified(),
        url::Host::Ipv6(ip) => {
            ip.is_loopback()
                || ip.is_unspecified()
                || ip
                    .to_ipv4_mapped()
                    .is_some_and(|v4| v4.is_loopback() || v4.is_unspecified())
        }
    };
    local.then(|| parsed.host_str().unwrap_or_default().to_owned())
}

impl WorkerConfig {
    /// Parses the configuration from `get` (setting name → value), naming every missing
    /// or malformed setting at once.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigErrors> {
        from_lookup(get)
    }

    /// What makes this configuration unable to place a call once deployed, though each
    /// value parses: `PUBLIC_BASE_URL` or `RELAY_URL` on a loopback address outside
    /// local development (`DEPLOY_ENV` other than `development`). Twilio would be told to
    /// call back and stream to an address it cannot reach.
    pub fn deployment_problems(&self) -> Vec<ConfigProblem> {
        if self.deploy_env == DeployEnv::Development {
            return Vec::new();
        }
        [
            ("PUBLIC_BASE_URL", &self.public_base_url),
            ("RELAY_URL", &self.relay_url),
        ]
        .into_iter()
        .filter_map(|(name, url)| {
            loopback_host(url).map(|host| ConfigProblem {
                name,
                problem: format!(
                    "{host} is a loopback address, which Twilio cannot reach; set the public URL \
                     (DEPLOY_ENV is production; only DEPLOY_ENV = \"development\" allows loopback)"
                ),
            })
        })
        .collect()
    }

    /// Whether `email` (already normalised) is listed in `ADMIN_EMAILS`.
    pub fn is_admin_email(&self, email: &str) -> bool {
        self.admin_emails.iter().any(|e| e == email)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const LONG: &str = "0123456789abcdef0123456789abcdef";

    fn good() -> HashMap<&'static str, String> {
        [
            ("PUBLIC_BASE_URL", "https://api.example.com/"),
            ("RELAY_URL", "wss://relay.example.com/twilio"),
            ("RELAY_SECRET", LONG),
            ("JWT_SECRET", LONG),
            ("TWILIO_ACCOUNT_SID", "ACffffffffffffffffffffffffffffffff"),
            ("TWILIO_AUTH_TOKEN", "tok"),
            ("TWILIO_PHONE_NUMBER", "+1 (415) 555-0100"),
            ("LLM_API_KEY", "csk-1"),
            ("STRIPE_SECRET_KEY", "sk_test_1"),
            ("STRIPE_WEBHOOK_SECRET", "whsec_1"),
            (
                "TWILIO_VERIFY_SERVICE_SID",
                "VAffffffffffffffffffffffffffffffff",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_owned()))
        .collect()
    }

    fn parse(vars: &HashMap<&'static str, String>) -> Result<WorkerConfig, ConfigErrors> {
        WorkerConfig::from_lookup(|name| vars.get(name).cloned())
    }

    fn names(e: &ConfigErrors) -> Vec<&'static str> {
        e.0.iter().map(|p| p.name).collect()
    }

    /// The required settings alone parse, and every default is applied.
    #[test]
    fn good_config_with_defaults() {
        let c = parse(&good()).unwrap();
        assert_eq!(c.public_base_url, "https://api.example.com");
        assert_eq!(c.relay_url, "wss://relay.example.com/twilio");
        assert_eq!(c.relay_secret.expose(), LONG);
        assert_eq!(c.db_backend, DbBackend::D1);
        assert_eq!(c.twilio_phone_number, "+14155550100");
        assert_eq!(c.twilio_api_base, "https://api.twilio.com");
        assert_eq!(c.llm_api_base, "https://api.cerebras.ai/v1");
        assert_eq!(c.llm_model, "gpt-oss-120b");
        assert_eq!(c.stripe_api_base, "https://api.stripe.com");
        assert_eq!(c.free_credits, 200);
        assert!(c.admin_emails.is_empty() && c.cors_origins.is_empty());
        assert_eq!(c.twilio_verify_api_base, "https://verify.twilio.com");
        assert_eq!(c.allowed_countries, ["US", "CA", "GB", "IE", "AU", "NZ"]);
        assert_eq!(c.ai_disclosure, DEFAULT_AI_DISCLOSURE);
        assert!(c.call_limits.prepare_greeting);
        assert!(c.call_limits.speculate);
        assert!(c.call_limits.fast_barge_in);
    }

    /// `CALL_PREPARE_GREETING` is `true` or `false` in any case; anything else is named.
    #[test]
    fn prepare_greeting_switch() {
        let mut v = good();
        v.insert("CALL_PREPARE_GREETING", "false".into());
        assert!(!parse(&v).unwrap().call_limits.prepare_greeting);
        v.insert("CALL_PREPARE_GREETING", " TRUE ".into());
        assert!(parse(&v).unwrap().call_limits.prepare_greeting);
        for bad in ["yes", "0", "off"] {
            v.insert("CALL_PREPARE_GREETING", bad.into());
            assert_eq!(names(&parse(&v).unwrap_err()), ["CALL_PREPARE_GREETING"]);
        }
    }

    /// `CALL_SPECULATE` switches speculative replies; a bad value is named.
    #[test]
    fn speculate_switch() {
        let mut v = good();
        v.insert("CALL_SPECULATE", "false".into());
        assert!(!parse(&v).unwrap().call_limits.speculate);
        v.insert("CALL_SPECULATE", "maybe".into());
        assert_eq!(names(&parse(&v).unwrap_err()), ["CALL_SPECULATE"]);
        v.remove("CALL_SPECULATE");
        v.insert("CALL_FAST_BARGE_IN", "FALSE".into());
        assert!(!parse(&v).unwrap().call_limits.fast_barge_in);
        v.insert("CALL_FAST_BARGE_IN", "1".into());
        assert_eq!(names(&parse(&v).unwrap_err()), ["CALL_FAST_BARGE_IN"]);
    }

    /// `CALL_SPECULATE_AFTER_MS` is 80 unless set, within one frame and the endpointing
    /// time; anything else is named.
    #[test]
    fn speculate_after_ms() {
        let mut v = good();
        assert_eq!(parse(&v).unwrap().call_limits.speculate_after_ms, 80);
        v.insert("CALL_SPECULATE_AFTER_MS", "40".into());
        assert_eq!(parse(&v).unwrap().call_limits.speculate_after_ms, 40);
        for bad in ["0", "19", "281", "300", "-40", "forty", "40ms"] {
            v.insert("CALL_SPECULATE_AFTER_MS", bad.into());
            assert_eq!(
                names(&parse(&v).unwrap_err()),
                ["CALL_SPECULATE_AFTER_MS"],
                "{bad}"
            );
        }
    }

    /// The disclosure can be reworded, not removed (an empty value is the default) and
    /// not made into a speech.
    #[test]
    fn ai_disclosure() {
        let mut v = good();
        v.insert("AI_DISCLOSURE", "  This is an AI calling.  ".into());
        assert_eq!(parse(&v).unwrap().ai_disclosure, "This is an AI calling.");
        v.insert("AI_DISCLOSURE", "".into());
        assert_eq!(parse(&v).unwrap().ai_disclosure, DEFAULT_AI_DISCLOSURE);
        v.insert("AI_DISCLOSURE", "x".repeat(AI_DISCLOSURE_MAX_CHARS + 1));
        assert_eq!(names(&parse(&v).unwrap_err()), ["AI_DISCLOSURE"]);
        v.insert("AI_DISCLOSURE", "two\nlines".into());
        assert_eq!(names(&parse(&v).unwrap_err()), ["AI_DISCLOSURE"]);
    }

    /// Verify and destination settings: a bad SID, an unknown country or an empty list
    /// is named; a good list replaces the default.
    #[test]
    fn verify_and_countries() {
        let mut v = good();
        v.insert("ALLOWED_COUNTRIES", "us, de".into());
        assert_eq!(parse(&v).unwrap().allowed_countries, ["US", "DE"]);
        v.insert("ALLOWED_COUNTRIES", "US,XX".into());
        v.insert("TWILIO_VERIFY_SERVICE_SID", "VA123".into());
        assert_eq!(
            names(&parse(&v).unwrap_err()),
            ["TWILIO_VERIFY_SERVICE_SID", "ALLOWED_COUNTRIES"]
        );
        v.insert("ALLOWED_COUNTRIES", " , ".into());
        v.remove("TWILIO_VERIFY_SERVICE_SID");
        assert_eq!(
            names(&parse(&v).unwrap_err()),
            ["TWILIO_VERIFY_SERVICE_SID", "ALLOWED_COUNTRIES"]
        );
    }

    /// Optional settings override defaults; lists are split, trimmed and normalised;
    /// values are trimmed (a secret with a trailing newline works).
    #[test]
    fn overrides_and_lists() {
        let mut v = good();
        v.insert("DB_BACKEND", "Postgres".into());
        v.insert("TWILIO_API_BASE", "http://127.0.0.1:9001/".into());
        v.insert("LLM_API_BASE", "http://127.0.0.1:9002/v1//".into());
        v.insert("LLM_MODEL", "llama-test".into());
        v.insert("STRIPE_API_BASE", "http://localhost:9003".into());
        v.insert(
            "ADMIN_EMAILS",
            " Boss@Example.com, ,ops@example.com ".into(),
        );
        v.insert(
            "CORS_ORIGINS",
            "https://app.example.com/, http://localhost:3000".into(),
        );
        v.insert("FREE_CREDITS", "0".into());
        v.insert("JWT_SECRET", format!("{LONG}\n"));
        v.insert("RELAY_URL", "ws://127.0.0.1:8080/twilio".into());
        let c = parse(&v).unwrap();
        assert_eq!(c.db_backend, DbBackend::Postgres);
        assert_eq!(c.twilio_api_base, "http://127.0.0.1:9001");
        assert_eq!(c.llm_api_base, "http://127.0.0.1:9002/v1");
        assert_eq!(c.llm_model, "llama-test");
        assert_eq!(c.stripe_api_base, "http://localhost:9003");
        assert_eq!(c.admin_emails, ["boss@example.com", "ops@example.com"]);
        assert!(c.is_admin_email("boss@example.com"));
        assert_eq!(
            c.cors_origins,
            ["https://app.example.com", "http://localhost:3000"]
        );
        assert_eq!(c.free_credits, 0);
        assert_eq!(c.jwt_secret.expose(), LONG);
        assert_eq!(c.relay_url, "ws://127.0.0.1:8080/twilio");
    }

    /// With nothing set, every required setting is named, in order, in one error.
    #[test]
    fn every_missing_setting_named() {
        let e = WorkerConfig::from_lookup(|_| None).unwrap_err();
        assert_eq!(
            names(&e),
            [
                "PUBLIC_BASE_URL",
                "RELAY_URL",
                "RELAY_SECRET",
                "JWT_SECRET",
                "TWILIO_ACCOUNT_SID",
                "TWILIO_AUTH_TOKEN",
                "TWILIO_PHONE_NUMBER",
                "LLM_API_KEY",
                "STRIPE_SECRET_KEY",
                "STRIPE_WEBHOOK_SECRET",
                "TWILIO_VERIFY_SERVICE_SID"
            ]
        );
        assert!(e.0.iter().all(|p| p.problem == "missing"));
    }

    /// Malformed values are all reported together, without echoing secrets.
    #[test]
    fn every_malformed_setting_named() {
        let mut v = good();
        v.insert("PUBLIC_BASE_URL", "api.example.com".into());
        v.insert("RELAY_URL", "https://relay.example.com/twilio".into());
        v.insert("RELAY_SECRET", "short-relay-secret".into());
        v.insert("JWT_SECRET", "   ".into());
        v.insert("DB_BACKEND", "mysql".into());
        v.insert("TWILIO_PHONE_NUMBER", "555-0100".into());
        v.insert("TWILIO_API_BASE", "ftp://api.twilio.com".into());
        v.insert("LLM_API_BASE", "https://api.cerebras.ai/v1?x=1".into());
        v.insert("STRIPE_API_BASE", "not a url".into());
        v.insert("ADMIN_EMAILS", "ok@example.com,not-an-email".into());
        v.insert("CORS_ORIGINS", "https://app.example.com/path".into());
        v.insert("FREE_CREDITS", "-5".into());
        let e = parse(&v).unwrap_err();
        assert_eq!(
            names(&e),
            [
                "PUBLIC_BASE_URL",
                "RELAY_URL",
                "RELAY_SECRET",
                "JWT_SECRET",
                "DB_BACKEND",
                "TWILIO_PHONE_NUMBER",
                "TWILIO_API_BASE",
                "LLM_API_BASE",
                "STRIPE_API_BASE",
                "ADMIN_EMAILS",
                "CORS_ORIGINS",
                "FREE_CREDITS"
            ]
        );
        let text = e.to_string();
        assert!(
            text.starts_with("invalid configuration: PUBLIC_BASE_URL: "),
            "{text}"
        );
        assert!(!text.contains("short-relay-secret"), "{text}");
    }

    /// HMAC secrets need 32 bytes: 31 is refused, 32 accepted.
    #[test]
    fn hmac_secret_length_boundary() {
        let mut v = good();
        v.insert("RELAY_SECRET", "x".repeat(31));
        v.insert("JWT_SECRET", "x".repeat(32));
        let e = parse(&v).unwrap_err();
        assert_eq!(names(&e), ["RELAY_SECRET"]);
        assert!(e.0[0].problem.contains("32"), "{:?}", e.0[0]);
    }

    /// A query string on RELAY_URL is refused, since Twilio would drop it.
    #[test]
    fn relay_url_query_refused() {
        let mut v = good();
        v.insert("RELAY_URL", "wss://relay.example.com/twilio?token=x".into());
        assert_eq!(names(&parse(&v).unwrap_err()), ["RELAY_URL"]);
    }

    /// Every spelling of a loopback or unspecified host is one; public hosts, private
    /// networks and look-alikes are not.
    #[test]
    fn loopback_hosts() {
        for url in [
            "http://127.0.0.1:8787",
            "ws://127.0.0.1:8080/twilio",
            "http://127.8.9.10",
            "http://localhost:8787",
            "wss://LocalHost./twilio",
            "http://api.localhost",
            "http://0.0.0.0:8787",
            "ws://[::1]:8080/twilio",
            "http://[::]",
            "http://[::ffff:127.0.0.1]",
            "http://2130706433",
        ] {
            assert!(loopback_host(url).is_some(), "{url}");
        }
        for url in [
            "https://api.example.com",
            "wss://relay.example.com/twilio",
            "http://10.0.0.1",
            "http://192.168.1.2",
            "http://128.0.0.1",
            "http://localhost.example.com",
            "http://mylocalhost",
            "ws://[2001:db8::1]/twilio",
            "not a url",
        ] {
            assert_eq!(loopback_host(url), None, "{url}");
        }
    }

    /// Outside development each loopback URL is named; in development none is; public
    /// URLs are never a problem.
    #[test]
    fn loopback_urls_outside_development() {
        let mut v = good();
        v.insert("PUBLIC_BASE_URL", "http://127.0.0.1:8787".into());
        v.insert("RELAY_URL", "ws://localhost:8080/twilio".into());
        // Unset DEPLOY_ENV is production: a forgotten variable never hides the problem.
        let c = parse(&v).unwrap();
        assert_eq!(c.deploy_env, DeployEnv::Production);
        let problems = c.deployment_problems();
        let named: Vec<_> = problems.iter().map(|p| p.name).collect();
        assert_eq!(named, ["PUBLIC_BASE_URL", "RELAY_URL"]);
        assert!(problems[0].problem.contains("127.0.0.1"), "{problems:?}");
        assert!(problems[1].problem.contains("localhost"), "{problems:?}");

        v.insert("DEPLOY_ENV", "production".into());
        assert_eq!(parse(&v).unwrap().deployment_problems(), problems);

        v.insert("DEPLOY_ENV", " Development ".into());
        let c = parse(&v).unwrap();
        assert_eq!(c.deploy_env, DeployEnv::Development);
        assert_eq!(c.deployment_problems(), []);

        let mut public = good();
        public.insert("DEPLOY_ENV", "production".into());
        assert_eq!(parse(&public).unwrap().deployment_problems(), []);
        public.insert("RELAY_URL", "ws://[::1]:8080/twilio".into());
        let named: Vec<_> = parse(&public)
            .unwrap()
            .deployment_problems()
            .iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(named, ["RELAY_URL"]);
    }

    /// `DEPLOY_ENV` is one of two words.
    #[test]
    fn deploy_env_refuses_other_values() {
        let mut v = good();
        v.insert("DEPLOY_ENV", "staging".into());
        assert_eq!(names(&parse(&v).unwrap_err()), ["DEPLOY_ENV"]);
    }

    /// Debug output of a parsed config shows no secret.
    #[test]
    fn debug_redacts_secrets() {
        let c = parse(&good()).unwrap();
        let dbg = format!("{c:?}");
        for secret in [LONG, "sk_test_1", "whsec_1", "csk-1"] {
            assert!(!dbg.contains(secret), "{secret} leaked");
        }
    }
}
