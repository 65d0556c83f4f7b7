//! Real or simulated providers for a local run, decided explicitly and never mixed
//! silently.
//!
//! Owns: which settings are provider credentials, what counts as "not set" (empty or the
//! example files' placeholder), generated stand-in credentials for the fakes, and how the
//! `fakes` binary's announced URLs become Worker vars and relay env. It does not start
//! anything.

use std::collections::BTreeMap;

use anyhow::{bail, Context as _, Result};
use rand::distributions::{Alphanumeric, DistString as _};
use rand::Rng;
use url::Url;

/// The Verify Service SID the fake Twilio accepts (and `cargo xtask dev` configures).
pub const FAKE_VERIFY_SERVICE_SID: &str = "VA00000000000000000000000000000001";
/// The value `.dev.vars.example` and `.env.example` use for every secret to fill in.
pub const PLACEHOLDER: &str = "replace-me";

/// Worker secrets that are credentials of an outside provider.
pub const WORKER_PROVIDER_KEYS: &[&str] = &[
    "TWILIO_ACCOUNT_SID",
    "TWILIO_AUTH_TOKEN",
    "LLM_API_KEY",
    "STRIPE_SECRET_KEY",
    "STRIPE_WEBHOOK_SECRET",
];

/// Relay settings that are credentials of an outside provider.
pub const RELAY_PROVIDER_KEYS: &[&str] = &["DEEPGRAM_API_KEY", "ELEVENLABS_API_KEY"];

/// The fakes the `fakes` binary announces, each as `fake <name> listening on <url>`.
pub const FAKE_NAMES: &[&str] = &["cerebras", "deepgram", "elevenlabs", "stripe", "twilio"];

/// The `fakes` binary's last start-up line.
pub const FAKES_READY: &str = "fakes ready";

/// True when a setting is absent, empty or still the placeholder.
pub fn is_unset(value: Option<&str>) -> bool {
    value
        .map(str::trim)
        .is_none_or(|v| v.is_empty() || v == PLACEHOLDER)
}

/// Whether a local run talks to the real providers or to the fakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderMode {
    Real,
    Simulated,
}

/// Decides the mode from the provider credentials found in `settings`: none set means
/// simulated, all set means real. A mix is refused, because running half a call against
/// real providers and half against fakes would look like it works and prove nothing.
pub fn decide_mode(settings: &BTreeMap<String, String>) -> Result<ProviderMode> {
    let keys = WORKER_PROVIDER_KEYS.iter().chain(RELAY_PROVIDER_KEYS);
    let (unset, set): (Vec<&str>, Vec<&str>) =
        keys.partition(|k| is_unset(settings.get(**k).map(String::as_str)));
    match (set.is_empty(), unset.is_empty()) {
        (true, _) => Ok(ProviderMode::Simulated),
        (false, true) => Ok(ProviderMode::Real),
        (false, false) => bail!(
            "provider keys are only partly set: {} set, but {} missing (empty or \"{PLACEHOLDER}\"). \
             Fill in all of them (in .dev.vars and .env) to use the real providers, or clear \
             all of them to run against the fakes; a mix is refused.",
            set.join(", "),
            unset.join(", ")
        ),
    }
}

/// Stand-in credentials for the fakes, shaped like the real ones (Twilio `AC` + 32 hex,
/// Stripe `sk_test_`/`whsec_` prefixes) so format checks in the Worker and relay pass.
/// The fakes are given the same values and check them like the providers would.
pub fn fake_credentials(rng: &mut impl Rng) -> BTreeMap<String, String> {
    let mut hex = |n: usize| -> String {
        (0..n)
            .map(|_| char::from(b"0123456789abcdef"[rng.gen_range(0..16)]))
            .collect()
    };
    let account_sid = format!("AC{}", hex(32));
    let auth_token = hex(32);
    let deepgram = hex(40);
    let elevenlabs = format!("sk_{}", hex(48));
    let llm = format!("csk-fake{}", hex(40));
    let stripe_key = format!("sk_test_fake{}", Alphanumeric.sample_string(rng, 24));
    let stripe_whsec = format!("whsec_fake{}", Alphanumeric.sample_string(rng, 32));
    BTreeMap::from([
        ("TWILIO_ACCOUNT_SID".to_owned(), account_sid),
        ("TWILIO_AUTH_TOKEN".to_owned(), auth_token),
        ("LLM_API_KEY".to_owned(), llm),
        ("STRIPE_SECRET_KEY".to_owned(), stripe_key),
        ("STRIPE_WEBHOOK_SECRET".to_owned(), stripe_whsec),
        ("DEEPGRAM_API_KEY".to_owned(), deepgram),
        ("ELEVENLABS_API_KEY".to_owned(), elevenlabs),
    ])
}

/// A random secret of `len` alphanumeric characters (JWT and relay secrets).
pub fn random_secret(rng: &mut impl Rng, len: usize) -> String {
    Alphanumeric.sample_string(rng, len)
}

/// Parses `fake <name> listening on <url>`.
pub fn parse_fake_line(line: &str) -> Option<(String, String)> {
    let rest = line.trim().strip_prefix("fake ")?;
    let (name, url) = rest.split_once(" listening on ")?;
    let name = name.trim();
    let url = url.trim();
    (!name.is_empty() && !name.contains(' ') && !url.is_empty())
        .then(|| (name.to_owned(), url.to_owned()))
}

/// The announced fakes, by name, from the `fakes` binary's output lines.
pub fn collect_fakes<'a>(lines: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, String> {
    lines.into_iter().filter_map(parse_fake_line).collect()
}

/// Where the Worker and the relay must point to use the fakes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeWiring {
    pub worker_vars: BTreeMap<String, String>,
    pub relay_env: BTreeMap<String, String>,
}

/// Maps announced fake URLs onto the settings that carry each provider's base URL, using
/// the same paths as the real defaults (`…/v1` for the LLM, `…/v1/listen` for Deepgram).
/// Every expected fake must be present: a missing one is an error, not a real-provider
/// fallback.
pub fn wire_fakes(fakes: &BTreeMap<String, String>) -> Result<FakeWiring> {
    let missing: Vec<&str> = FAKE_NAMES
        .iter()
        .copied()
        .filter(|name| !fakes.contains_key(*name))
        .collect();
    if !missing.is_empty() {
        bail!(
            "the fakes binary did not announce: {} (it announced: {})",
            missing.join(", "),
            fakes.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let origin = |name: &str, scheme: &str| -> Result<String> {
        let url = &fakes[name];
        let parsed = Url::parse(url).with_context(|| format!("fake {name} URL {url:?}"))?;
        let host = parsed
            .host_str()
            .with_context(|| format!("fake {name} URL {url:?} has no host"))?;
        let port = parsed
            .port_or_known_default()
            .with_context(|| format!("fake {name} URL {url:?} has no port"))?;
        Ok(format!("{scheme}://{host}:{port}"))
    };
    let mut wiring = FakeWiring::default();
    wiring
        .worker_vars
        .insert("TWILIO_API_BASE".into(), origin("twilio", "http")?);
    // The fake Twilio serves Verify too, for its own service SID.
    wiring
        .worker_vars
        .insert("TWILIO_VERIFY_API_BASE".into(), origin("twilio", "http")?);
    wiring.worker_vars.insert(
        "TWILIO_VERIFY_SERVICE_SID".into(),
        FAKE_VERIFY_SERVICE_SID.into(),
    );
    wiring.worker_vars.insert(
        "LLM_API_BASE".into(),
        format!("{}/v1", origin("cerebras", "http")?),
    );
    wiring
        .worker_vars
        .insert("STRIPE_API_BASE".into(), origin("stripe", "http")?);
    wiring.relay_env.insert(
        "DEEPGRAM_URL".into(),
        format!("{}/v1/listen", origin("deepgram", "ws")?),
    );
    wiring
        .relay_env
        .insert("ELEVENLABS_URL".into(), origin("elevenlabs", "ws")?);
    Ok(wiring)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    fn settings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Empty, whitespace and the placeholder all count as "not set".
    #[test]
    fn placeholder_and_empty_are_unset() {
        assert!(is_unset(None));
        assert!(is_unset(Some("")));
        assert!(is_unset(Some("  ")));
        assert!(is_unset(Some(PLACEHOLDER)));
        assert!(!is_unset(Some("AC123")));
    }

    /// No provider keys at all: simulated.
    #[test]
    fn no_keys_means_simulated() {
        let s = settings(&[("TWILIO_ACCOUNT_SID", PLACEHOLDER), ("LLM_API_KEY", "")]);
        assert_eq!(decide_mode(&s).unwrap(), ProviderMode::Simulated);
    }

    /// Every provider key set: real.
    #[test]
    fn all_keys_means_real() {
        let all: Vec<(&str, &str)> = WORKER_PROVIDER_KEYS
            .iter()
            .chain(RELAY_PROVIDER_KEYS)
            .map(|k| (*k, "real-value"))
            .collect();
        assert_eq!(decide_mode(&settings(&all)).unwrap(), ProviderMode::Real);
    }

    /// Some keys set and others not is refused, naming both groups.
    #[test]
    fn mixed_keys_are_refused() {
        let s = settings(&[("LLM_API_KEY", "csk-real")]);
        let err = decide_mode(&s).unwrap_err().to_string();
        assert!(err.contains("LLM_API_KEY set"), "{err}");
        assert!(err.contains("DEEPGRAM_API_KEY"), "{err}");
    }

    /// Generated credentials cover every provider key, are not placeholders, and look
    /// like the real formats.
    #[test]
    fn fake_credentials_cover_every_key() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let creds = fake_credentials(&mut rng);
        for key in WORKER_PROVIDER_KEYS.iter().chain(RELAY_PROVIDER_KEYS) {
            assert!(!is_unset(creds.get(*key).map(String::as_str)), "{key}");
        }
        let sid = &creds["TWILIO_ACCOUNT_SID"];
        assert!(sid.starts_with("AC") && sid.len() == 34, "{sid}");
        assert!(creds["STRIPE_WEBHOOK_SECRET"].starts_with("whsec_"));
        assert_eq!(decide_mode(&creds).unwrap(), ProviderMode::Real);
    }

    /// Announcement lines parse; other log lines are ignored.
    #[test]
    fn parses_fake_announcements() {
        assert_eq!(
            parse_fake_line("fake twilio listening on http://127.0.0.1:4010"),
            Some(("twilio".into(), "http://127.0.0.1:4010".into()))
        );
        assert_eq!(parse_fake_line("fakes ready"), None);
        assert_eq!(parse_fake_line("2026 INFO fake request"), None);
    }

    /// Announced URLs land on the right settings with the real defaults' paths.
    #[test]
    fn wires_fakes_to_settings() {
        let fakes = collect_fakes([
            "fake twilio listening on http://127.0.0.1:4001",
            "fake cerebras listening on http://127.0.0.1:4002/",
            "fake stripe listening on http://127.0.0.1:4003",
            "fake deepgram listening on http://127.0.0.1:4004",
            "fake elevenlabs listening on ws://127.0.0.1:4005",
            "fakes ready",
        ]);
        let w = wire_fakes(&fakes).unwrap();
        assert_eq!(w.worker_vars["TWILIO_API_BASE"], "http://127.0.0.1:4001");
        assert_eq!(
            w.worker_vars["TWILIO_VERIFY_API_BASE"],
            "http://127.0.0.1:4001"
        );
        assert_eq!(w.worker_vars["LLM_API_BASE"], "http://127.0.0.1:4002/v1");
        assert_eq!(w.worker_vars["STRIPE_API_BASE"], "http://127.0.0.1:4003");
        assert_eq!(w.relay_env["DEEPGRAM_URL"], "ws://127.0.0.1:4004/v1/listen");
        assert_eq!(w.relay_env["ELEVENLABS_URL"], "ws://127.0.0.1:4005");
    }

    /// A fake that was not announced is an error naming it.
    #[test]
    fn missing_fake_is_an_error() {
        let fakes = collect_fakes(["fake twilio listening on http://127.0.0.1:4001"]);
        let err = wire_fakes(&fakes).unwrap_err().to_string();
        assert!(err.contains("deepgram"), "{err}");
    }
}
