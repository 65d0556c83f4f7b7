//! The README's commands and what runs each one: a ledger the test below holds to the
//! README in both directions, so a command added to the README without saying what proves
//! it (or a ledger row left behind by a removed command) fails `cargo xtask test`.
//!
//! The quickstart's blocks are not listed: `cargo xtask quickstart` (a step of `cargo
//! xtask test`) runs them as written. Commands that need a Cloudflare account, a Docker
//! engine or a production database cannot run on a CI machine; their rows say so, and
//! what covers them instead.

/// How a README command is proven.
#[derive(Debug, Clone, Copy)]
pub enum Proof {
    /// Run as written (or with only its placeholders filled) by this step or test.
    Run(&'static str),
    /// Cannot run here (why), and what checks it instead.
    NotHere(&'static str, &'static str),
}

/// A README command (matched by the start of its line, after joining `\` continuations)
/// and its proof.
pub const LEDGER: &[(&str, Proof)] = &[
    ("cargo xtask dev", Proof::Run("step `README quickstart` (cargo xtask quickstart)")),
    ("cargo xtask test", Proof::Run(".ci/run, on a fresh clone")),
    (
        "npx openapi-typescript workers/core/openapi.json -o",
        Proof::Run("step `TypeScript types from openapi.json` (xtask/src/cmd/api_types.rs), into target/"),
    ),
    (
        "curl -X POST \"$API/api/schedules\"",
        Proof::Run("api_schedules (POST /api/schedules with this body's fields, both backends)"),
    ),
    (
        "cargo xtask admin grant ops@example.com  ",
        Proof::Run("every admin test: tests/src/harness.rs grants through xtask::admin, the same code"),
    ),
    (
        "cargo xtask admin grant ops@example.com --database-url",
        Proof::Run("the Postgres pass: harness.rs grants with the stack's database URL"),
    ),
    (
        "cargo xtask admin revoke",
        Proof::Run("api_trust (revoking takes the role away at once)"),
    ),
    (
        "cargo xtask admin grant ops@example.com --remote",
        Proof::NotHere(
            "needs a Cloudflare account (`wrangler login`)",
            "the same statement runs through `wrangler d1 execute --local` in the admin tests",
        ),
    ),
    (
        "cargo xtask admin grant you@example.com --remote",
        Proof::NotHere(
            "needs a Cloudflare account",
            "as above: the local form in the admin tests",
        ),
    ),
    (
        "cargo xtask migrate --database-url",
        Proof::Run("xtask/tests/migrate.rs (twice on a fresh database; the second applies nothing)"),
    ),
    (
        "npx wrangler hyperdrive create",
        Proof::NotHere(
            "needs a Cloudflare account",
            "the production-postgres dry run validates the binding it fills in",
        ),
    ),
    (
        "npx wrangler d1 create",
        Proof::NotHere("needs a Cloudflare account", "the dry runs validate the D1 bindings"),
    ),
    (
        "npx wrangler kv namespace create",
        Proof::NotHere("needs a Cloudflare account", "the dry runs validate the KV bindings"),
    ),
    (
        "npx wrangler d1 migrations apply DB --remote --env $ENV",
        Proof::NotHere(
            "needs a Cloudflare account",
            "every test stack and `cargo xtask dev` apply the same migrations with `--local`",
        ),
    ),
    (
        "for s in JWT_SECRET",
        Proof::NotHere(
            "needs a Cloudflare account",
            "config tests: every secret missing is named by /health and refused at start",
        ),
    ),
    (
        "cargo xtask deploy-check",
        Proof::Run("step `deploy rehearsal` of cargo xtask test"),
    ),
    (
        "SKIP_WORKER_BUILD=1 npx wrangler deploy --env $ENV",
        Proof::NotHere(
            "needs a Cloudflare account",
            "cargo xtask deploy-check runs `wrangler deploy --dry-run` for every env",
        ),
    ),
    (
        "curl -s https://api.your-domain.example/health",
        Proof::NotHere(
            "a deployed Worker",
            "every test stack waits for /health; stack_smoke checks its 503 for loopback URLs outside development",
        ),
    ),
    (
        "docker build -f media-relay/Dockerfile",
        Proof::NotHere(
            "no container engine runs on the CI machine",
            "step `hadolint (Dockerfiles)`; the binary it builds is the relay every test runs",
        ),
    ),
    (
        "docker run -d --name relay",
        Proof::NotHere(
            "no container engine runs on the CI machine",
            "`media-relay healthcheck` (its HEALTHCHECK) and SIGTERM draining are tested on the real process",
        ),
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command line of the README's `sh` blocks outside the quickstart: `\`
    /// continuations joined, comment-only lines and bare `NAME=value` settings skipped.
    fn readme_commands(readme: &str) -> Vec<String> {
        let (before, rest) = readme
            .split_once("<!-- quickstart:begin -->")
            .expect("quickstart markers");
        let (_, after) = rest
            .split_once("<!-- quickstart:end -->")
            .expect("quickstart end");
        let mut commands = Vec::new();
        for part in [before, after] {
            let mut in_sh = false;
            let mut pending = String::new();
            for line in part.lines() {
                let t = line.trim_end();
                if !in_sh {
                    in_sh = t == "```sh";
                    continue;
                }
                if t == "```" {
                    in_sh = false;
                    continue;
                }
                let trimmed = t.trim_start();
                if pending.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
                    continue;
                }
                match t.strip_suffix('\\') {
                    Some(head) => {
                        pending.push_str(head);
                        continue;
                    }
                    None => pending.push_str(if pending.is_empty() { trimmed } else { t }),
                }
                // A single-quoted argument (a JSON body) may span lines.
                if pending.matches('\'').count() % 2 == 1 {
                    pending.push('\n');
                    continue;
                }
                let command = std::mem::take(&mut pending);
                // `NAME=value`, alone on its line but for a comment.
                let head = command.split('#').next().unwrap_or_default().trim();
                let is_setting = !head.contains(char::is_whitespace)
                    && head.split_once('=').is_some_and(|(name, _)| {
                        !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                    });
                if !is_setting {
                    commands.push(command);
                }
            }
        }
        commands
    }

    #[test]
    fn every_readme_command_has_a_proof_and_every_proof_a_command() {
        let readme = include_str!("../../../README.md");
        let commands = readme_commands(readme);
        assert!(commands.len() >= 10, "{commands:#?}");
        let unproven: Vec<&String> = commands
            .iter()
            .filter(|c| !LEDGER.iter().any(|(prefix, _)| c.starts_with(prefix)))
            .collect();
        assert!(
            unproven.is_empty(),
            "README commands with no row in xtask/src/cmd/readme_commands.rs (say what runs \
             them, or why nothing can here and what checks them instead): {unproven:#?}"
        );
        let stale: Vec<&str> = LEDGER
            .iter()
            .map(|(prefix, _)| *prefix)
            .filter(|prefix| !commands.iter().any(|c| c.starts_with(prefix)))
            .collect();
        assert!(
            stale.is_empty(),
            "ledger rows whose command left the README: {stale:?}"
        );
        for (prefix, proof) in LEDGER {
            let said = match proof {
                Proof::Run(by) => !by.is_empty(),
                Proof::NotHere(why, instead) => !why.is_empty() && !instead.is_empty(),
            };
            assert!(
                said,
                "{prefix}: the proof must say what runs it, or why not and what instead"
            );
        }
    }

    #[test]
    fn commands_are_read_whole_and_settings_skipped() {
        let text = "```sh\nnot me\n```\n<!-- quickstart:begin -->\n```sh\nnor me\n```\n<!-- quickstart:end -->\n\
                    ```sh\nENV=production   # or other\n# a comment\ncurl -s a \\\n  -d b\nX=1 npx wrangler deploy\ncurl -d '{\"a\":1,\n  \"b\":2}'\n```\n";
        let found = readme_commands(text);
        assert_eq!(found[0], "not me");
        assert_eq!(found[1], "curl -s a   -d b");
        assert_eq!(found[2], "X=1 npx wrangler deploy");
        assert_eq!(found[3], "curl -d '{\"a\":1,\n  \"b\":2}'");
        assert_eq!(found.len(), 4, "{found:?}");
    }
}
