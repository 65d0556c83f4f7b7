//! `cargo xtask admin grant|revoke EMAIL`: the only way anyone becomes (or stops being)
//! an admin. An operator runs it against the database the Worker reads:
//!
//! - the local development D1 (default; `cargo xtask dev` may be running),
//! - production D1 (`--remote`, through wrangler's login),
//! - a PostgreSQL database (`--database-url`).
//!
//! The change and its audit row (`actor = operator`) are written together. The Worker
//! reads the role from the account on every request, so it applies at once, to tokens
//! already issued as well.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::repo::Repo;
use crate::toolchain::Node;
use crate::wrangler::{d1_query, D1Target};

/// Where the accounts live.
#[derive(Debug, Clone)]
pub enum Target {
    /// A local D1 (`--persist-to` directory of wrangler dev).
    LocalD1(PathBuf),
    /// Production D1.
    RemoteD1,
    /// PostgreSQL, by connection URL.
    Postgres(String),
}

/// Grant or revoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Grant,
    Revoke,
}

impl Change {
    fn role(self) -> &'static str {
        match self {
            Change::Grant => "admin",
            Change::Revoke => "user",
        }
    }
}

/// What the command found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub user_id: String,
    /// The role before the change (the same as after when nothing changed).
    pub before: String,
    pub after: String,
}

/// An email as accounts store it (trimmed, lower case), refusing anything that could not
/// be one — it is written into SQL as a literal.
pub fn normalise_email(email: &str) -> Result<String> {
    let e = email.trim().to_ascii_lowercase();
    let ok = e.len() <= 254
        && e.split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && d.contains('.'))
        && e.chars()
            .all(|c| c.is_ascii_alphanumeric() || "@.+-_".contains(c));
    if !ok {
        bail!("{email:?} is not an email address an account can have");
    }
    Ok(e)
}

fn audit_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The statements, in the target's dialect: the audit row (only when the role changes),
/// the update, then the account as it now is.
fn statements(email: &str, change: Change, postgres: bool) -> String {
    let role = change.role();
    let (now, json) = if postgres {
        ("now()", "::jsonb")
    } else {
        ("strftime('%Y-%m-%dT%H:%M:%fZ', 'now')", "")
    };
    let action = match change {
        Change::Grant => "role.grant",
        Change::Revoke => "role.revoke",
    };
    let id = audit_id();
    format!(
        "INSERT INTO audit_log (id, actor_id, actor, action, target_type, target_id, before_json, after_json, reason, created_at) \
         SELECT '{id}', NULL, 'operator', '{action}', 'user', id, ('{{\"role\":\"' || role || '\"}}'){json}, '{{\"role\":\"{role}\"}}'{json}, 'cargo xtask admin', {now} \
         FROM users WHERE email = '{email}' AND role <> '{role}'; \
         UPDATE users SET role = '{role}', updated_at = {now} WHERE email = '{email}'; \
         SELECT u.id, u.role, (SELECT COUNT(*) FROM audit_log a WHERE a.id = '{id}') AS changed FROM users u WHERE u.email = '{email}';"
    )
}

/// Grants or revokes the admin role of the account with `email`.
/// Runs SQL that both dialects read alike against `target` (the tests seed rows no route
/// writes, e.g. an event older than the retention).
pub fn execute(repo: &Repo, target: &Target, sql: &str) -> Result<()> {
    match target {
        Target::LocalD1(_) | Target::RemoteD1 => {
            let node = Node::require(repo)?;
            let d1 = match target {
                Target::LocalD1(dir) => D1Target::Local(dir.clone()),
                _ => D1Target::Remote,
            };
            d1_query(repo, &node, &d1, sql).map(|_| ())
        }
        Target::Postgres(url) => {
            let out = Command::new("psql")
                .args([url.as_str(), "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
                .output()
                .context("running psql (is the PostgreSQL client installed?)")?;
            if !out.status.success() {
                bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        }
    }
}

pub fn set_role(repo: &Repo, target: &Target, email: &str, change: Change) -> Result<Outcome> {
    let email = normalise_email(email)?;
    let sql = statements(&email, change, matches!(target, Target::Postgres(_)));
    let row: Option<(String, String, i64)> = match target {
        Target::LocalD1(_) | Target::RemoteD1 => {
            let node = Node::require(repo)?;
            let d1 = match target {
                Target::LocalD1(dir) => D1Target::Local(dir.clone()),
                _ => D1Target::Remote,
            };
            let out = d1_query(repo, &node, &d1, &sql)?;
            let last = out
                .as_array()
                .and_then(|a| a.last())
                .and_then(|r| r["results"].as_array())
                .and_then(|r| r.first())
                .cloned();
            last.map(|r| {
                (
                    r["id"].as_str().unwrap_or_default().to_owned(),
                    r["role"].as_str().unwrap_or_default().to_owned(),
                    r["changed"].as_i64().unwrap_or(0),
                )
            })
        }
        Target::Postgres(url) => {
            let out = Command::new("psql")
                .args([
                    url.as_str(),
                    "-At",
                    "-F",
                    "|",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-q",
                ])
                .args(["-c", &format!("BEGIN; {sql} COMMIT;")])
                .output()
                .context("running psql (is the PostgreSQL client installed?)")?;
            if !out.status.success() {
                bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            stdout
                .lines()
                .rev()
                .find(|l| l.contains('|'))
                .and_then(|l| {
                    let mut f = l.split('|');
                    Some((
                        f.next()?.to_owned(),
                        f.next()?.to_owned(),
                        f.next()?.parse().ok()?,
                    ))
                })
        }
    };
    let Some((user_id, after, changed)) = row else {
        bail!("no account has the email {email}: the person registers first, then an operator grants the role");
    };
    if after != change.role() {
        bail!("the role of {email} is still {after:?}: the update did not apply");
    }
    // An audit row was written exactly when the role changed.
    let before = match (changed > 0, change) {
        (false, _) => after.clone(),
        (true, Change::Grant) => Change::Revoke.role().to_owned(),
        (true, Change::Revoke) => Change::Grant.role().to_owned(),
    };
    Ok(Outcome {
        user_id,
        before,
        after,
    })
}

#[cfg(test)]
// A panic in a test is that test's failure.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Emails are normalised; anything that could break out of a SQL literal is refused.
    #[test]
    fn emails_are_checked_before_they_reach_sql() {
        assert_eq!(
            normalise_email(" Ops@Example.COM ").unwrap(),
            "ops@example.com"
        );
        for bad in [
            "",
            "nobody",
            "a@b",
            "x'@example.com",
            "a@example.com; DROP TABLE users",
        ] {
            assert!(normalise_email(bad).is_err(), "{bad:?}");
        }
    }

    /// The audit row is written only when the role changes, before the update, in the
    /// target's dialect.
    #[test]
    fn statements_audit_then_update() {
        let d1 = statements("a@example.com", Change::Grant, false);
        let audit = d1.find("INSERT INTO audit_log").unwrap();
        let update = d1.find("UPDATE users SET role = 'admin'").unwrap();
        assert!(audit < update);
        assert!(d1.contains("AND role <> 'admin'"));
        assert!(d1.contains("strftime") && !d1.contains("::jsonb"));
        let pg = statements("a@example.com", Change::Revoke, true);
        assert!(pg.contains("role = 'user'") && pg.contains("::jsonb") && pg.contains("now()"));
    }
}
