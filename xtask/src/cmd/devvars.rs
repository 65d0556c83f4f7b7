//! Local secrets for `cargo xtask dev`: creates `.dev.vars` from `.dev.vars.example` when
//! missing (with freshly generated `JWT_SECRET` and `RELAY_SECRET`), and reads `.dev.vars`
//! and the relay's `.env` as key/value maps.
//!
//! Never overwrites an existing `.dev.vars` and never prints secret values.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use xtask::providers::{random_secret, PLACEHOLDER};
use xtask::repo::Repo;

/// Secrets that are ours rather than a provider's, so we can simply generate them.
const GENERATED: &[&str] = &["JWT_SECRET", "RELAY_SECRET"];

/// Length of generated secrets (the relay requires at least 32 bytes).
const SECRET_LEN: usize = 48;

/// The example text with each generated secret's placeholder replaced by `secret()`.
/// Comments, order and every other line are kept as written.
pub fn render_dev_vars(example: &str, mut secret: impl FnMut() -> String) -> String {
    let mut out = String::with_capacity(example.len() + 64);
    for line in example.lines() {
        let generated = line.split_once('=').and_then(|(key, value)| {
            let key = key.trim();
            (GENERATED.contains(&key) && value.trim() == PLACEHOLDER)
                .then(|| format!("{key}={}", secret()))
        });
        out.push_str(generated.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Makes sure `.dev.vars` exists; returns whether it was created now.
pub fn ensure_dev_vars(repo: &Repo) -> Result<bool> {
    let path = repo.root().join(".dev.vars");
    if path.exists() {
        return Ok(false);
    }
    let example_path = repo.root().join(".dev.vars.example");
    let example = std::fs::read_to_string(&example_path)
        .with_context(|| format!("reading {}", example_path.display()))?;
    let mut rng = rand::thread_rng();
    let text = render_dev_vars(&example, || random_secret(&mut rng, SECRET_LEN));
    // Secrets: readable by the owner only; `create_new` never clobbers a file that
    // appeared meanwhile.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(true)
}

/// KEY=VALUE pairs of a dotenv-style file, or an empty map if it does not exist.
pub fn read_env_file(path: &Path) -> Result<BTreeMap<String, String>> {
    if !path.exists() {
        return Ok(BTreeMap::new());
    }
    let iter =
        dotenvy::from_path_iter(path).with_context(|| format!("reading {}", path.display()))?;
    iter.map(|item| item.with_context(|| format!("parsing {}", path.display())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "\
# comment
JWT_SECRET=replace-me
RELAY_SECRET=replace-me
TWILIO_AUTH_TOKEN=replace-me
LLM_API_KEY=
";

    /// Only our own secrets are generated; provider keys keep their placeholder.
    #[test]
    fn generates_only_our_secrets() {
        let mut n = 0;
        let text = render_dev_vars(EXAMPLE, || {
            n += 1;
            format!("generated{n}")
        });
        assert_eq!(
            text,
            "# comment\nJWT_SECRET=generated1\nRELAY_SECRET=generated2\n\
             TWILIO_AUTH_TOKEN=replace-me\nLLM_API_KEY=\n"
        );
    }

    /// A value someone already filled in is kept, not regenerated.
    #[test]
    fn keeps_filled_in_values() {
        let text = render_dev_vars("JWT_SECRET=mine\n", || "generated".into());
        assert_eq!(text, "JWT_SECRET=mine\n");
    }

    /// The committed example parses and lists every Worker secret from API.md.
    #[test]
    fn committed_example_lists_every_secret() {
        let repo = Repo::from_crate_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
        let vars = read_env_file(&repo.root().join(".dev.vars.example")).unwrap();
        for key in [
            "JWT_SECRET",
            "RELAY_SECRET",
            "TWILIO_ACCOUNT_SID",
            "TWILIO_AUTH_TOKEN",
            "LLM_API_KEY",
            "STRIPE_SECRET_KEY",
            "STRIPE_WEBHOOK_SECRET",
        ] {
            assert_eq!(
                vars.get(key).map(String::as_str),
                Some(PLACEHOLDER),
                "{key}"
            );
        }
    }

    /// The committed relay example parses and names every relay setting from API.md.
    #[test]
    fn committed_relay_example_lists_every_setting() {
        let repo = Repo::from_crate_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
        let vars = read_env_file(&repo.root().join(".env.example")).unwrap();
        for key in [
            "RELAY_LISTEN",
            "RELAY_SECRET",
            "RELAY_PUBLIC_URL",
            "TWILIO_AUTH_TOKEN",
            "WORKER_URL",
            "DEEPGRAM_API_KEY",
            "DEEPGRAM_URL",
            "ELEVENLABS_API_KEY",
            "ELEVENLABS_URL",
            "RELAY_MAX_CALLS",
        ] {
            assert!(vars.contains_key(key), "{key}");
        }
    }
}
