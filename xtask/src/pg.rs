//! The local PostgreSQL server for `cargo xtask dev --db postgres` and the tests: started
//! if it is not running (the distribution's cluster, as root), a `cmb` role, and
//! databases with the project's Postgres migrations applied — a fresh one per test
//! stack, or the persistent development database with only new migrations applied.
//!
//! Uses the server's own tools (`pg_ctlcluster`, `psql`), so it runs against exactly the
//! server the machine has. Fails loudly, naming the command, when any of it is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// The role the tests (and `cargo xtask dev --db postgres`) connect as.
pub const ROLE: &str = "cmb";
pub const PASSWORD: &str = "cmb";
pub const HOST: &str = "127.0.0.1";
pub const PORT: u16 = 5432;

/// A database created for one test binary.
#[derive(Debug, Clone)]
pub struct PgDatabase {
    pub name: String,
}

impl PgDatabase {
    /// `postgres://` URL with `sslmode=disable` (loopback).
    pub fn url(&self) -> String {
        format!(
            "postgres://{ROLE}:{PASSWORD}@{HOST}:{PORT}/{}?sslmode=disable",
            self.name
        )
    }

    /// Runs SQL through `psql` and returns its unaligned, tuples-only output.
    pub fn query(&self, sql: &str) -> Result<String> {
        psql(&self.name, &["-At", "-F", "|", "-c", sql])
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn psql(db: &str, args: &[&str]) -> Result<String> {
    run(Command::new("psql")
        .env("PGPASSWORD", PASSWORD)
        .args([
            "-h",
            HOST,
            "-p",
            &PORT.to_string(),
            "-U",
            ROLE,
            "-d",
            db,
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
        ])
        .args(args))
}

/// As the `postgres` superuser over the local socket (we are root on these machines).
fn as_postgres(sql: &str) -> Result<String> {
    run(Command::new("su").args([
        "postgres",
        "-c",
        &format!("psql -At -v ON_ERROR_STOP=1 -c \"{sql}\""),
    ]))
}

fn server_ready() -> Result<bool> {
    Ok(Command::new("pg_isready")
        .args(["-h", HOST, "-p", &PORT.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("pg_isready not found: install PostgreSQL (`cargo xtask setup` does)")?
        .success())
}

/// Starts the server if needed and makes sure the test role exists. Safe to call from
/// several threads or processes at once: a start that loses the race ("already
/// running") waits for the server like the one that won.
pub fn ensure_server() -> Result<()> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !server_ready()? {
        let clusters = run(Command::new("pg_lsclusters").arg("-h")).context("pg_lsclusters")?;
        let Some(line) = clusters.lines().next() else {
            bail!("no PostgreSQL cluster on this machine (pg_lsclusters is empty)");
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (version, cluster) = (
            fields.first().copied().unwrap_or("15"),
            fields.get(1).copied().unwrap_or("main"),
        );
        let started = run(Command::new("pg_ctlcluster").args([version, cluster, "start"]));
        // A server that was not shut down cleanly recovers first (fsyncing its data
        // directory can take a minute with many test databases).
        let mut up = false;
        for _ in 0..1200 {
            if server_ready()? {
                up = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if !up {
            started?;
            bail!("PostgreSQL {version}/{cluster} started but is not accepting connections on {HOST}:{PORT}");
        }
    }
    let exists = as_postgres(&format!("SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'"))?;
    if exists.trim() != "1" {
        as_postgres(&format!(
            "CREATE ROLE {ROLE} LOGIN SUPERUSER PASSWORD '{PASSWORD}'"
        ))?;
    }
    Ok(())
}

/// A fresh, uniquely named database with every migration in `migrations` applied.
pub fn fresh_database(label: &str, migrations: &Path) -> Result<PgDatabase> {
    ensure_server()?;
    let name = format!("cmb_{label}_{:016x}", rand::random::<u64>());
    as_postgres(&format!("CREATE DATABASE {name} OWNER {ROLE}"))?;
    let db = PgDatabase { name };
    for file in migration_files(migrations)? {
        psql(&db.name, &["-f", &file.to_string_lossy()])
            .with_context(|| format!("applying {}", file.display()))?;
    }
    Ok(db)
}

/// The named database, created if missing, with the migrations it has not had yet
/// applied in order ([`migrate`]). For the development database, whose data should
/// survive restarts.
pub fn persistent_database(name: &str, migrations: &Path) -> Result<PgDatabase> {
    ensure_server()?;
    let exists = as_postgres(&format!(
        "SELECT 1 FROM pg_database WHERE datname = '{name}'"
    ))?;
    if exists.trim() != "1" {
        as_postgres(&format!("CREATE DATABASE {name} OWNER {ROLE}"))?;
    }
    let db = PgDatabase {
        name: name.to_string(),
    };
    migrate(&db.url(), migrations)?;
    Ok(db)
}

/// An empty, uniquely named database on the local server (for tests of [`migrate`]).
pub fn empty_database(label: &str) -> Result<PgDatabase> {
    ensure_server()?;
    let name = format!("cmb_{label}_{:016x}", rand::random::<u64>());
    as_postgres(&format!("CREATE DATABASE {name} OWNER {ROLE}"))?;
    Ok(PgDatabase { name })
}

/// The table that records which migrations a database has had.
pub const TRACKING_TABLE: &str = "_cmb_migrations";

/// Applies to the database at `url` the migrations of `dir` it has not had yet, in
/// order, each in one transaction with its row in `_cmb_migrations` (so a failed file
/// changes nothing and is tried again next time). Returns the names applied, empty when
/// the database was up to date. Used by `cargo xtask migrate` and `dev --db postgres`.
pub fn migrate(url: &str, dir: &Path) -> Result<Vec<String>> {
    let files = migration_files(dir)?;
    if files.is_empty() {
        bail!("no .sql migrations in {}", dir.display());
    }
    let untracked = psql_url(
        url,
        &[
            "-At",
            "-c",
            &format!("SELECT to_regclass('{TRACKING_TABLE}') IS NULL AND to_regclass('users') IS NOT NULL"),
        ],
    )?;
    if untracked.trim() == "t" {
        bail!(
            "the database has the schema but no {TRACKING_TABLE} table: it was migrated \
             without tracking (one psql -f per file). Record what it has, then rerun: \
             CREATE TABLE {TRACKING_TABLE} (name TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now()); \
             INSERT INTO {TRACKING_TABLE} (name) VALUES ('0001_….sql'), … for each file applied"
        );
    }
    psql_url(url, &["-c", &format!("CREATE TABLE IF NOT EXISTS {TRACKING_TABLE} (name TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")])?;
    let applied = psql_url(
        url,
        &["-At", "-c", &format!("SELECT name FROM {TRACKING_TABLE}")],
    )?;
    let mut done = Vec::new();
    for file in files {
        let name = file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !migration_name_ok(&name) {
            bail!(
                "{}: a migration is named NNNN_lowercase_words.sql",
                file.display()
            );
        }
        if applied.lines().any(|l| l.trim() == name) {
            continue;
        }
        // `-1` runs every -f and -c in one transaction: the file and its tracking row
        // commit together or not at all.
        psql_url(
            url,
            &[
                "-1",
                "-f",
                &file.to_string_lossy(),
                "-c",
                &format!("INSERT INTO {TRACKING_TABLE} (name) VALUES ('{name}')"),
            ],
        )
        .with_context(|| format!("applying {} (nothing of it was applied)", file.display()))?;
        done.push(name);
    }
    Ok(done)
}

/// `NNNN_lowercase_words.sql`: safe to write into SQL as it is.
fn migration_name_ok(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".sql") else {
        return false;
    };
    let (number, words) = stem.split_at(stem.len().min(4));
    number.len() == 4
        && number.bytes().all(|b| b.is_ascii_digit())
        && words.starts_with('_')
        && words[1..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// `psql` against a connection URL (its password included), stopping at the first error.
fn psql_url(url: &str, args: &[&str]) -> Result<String> {
    run(Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url])
        .args(args))
    .map_err(|e| anyhow::anyhow!("{}", redact(&format!("{e:#}"), url)))
}

/// `text` with the URL's password replaced, for error messages.
fn redact(text: &str, url: &str) -> String {
    let Ok(mut shown) = url::Url::parse(url) else {
        return text.replace(url, "<database url>");
    };
    if shown.password().is_none() || shown.set_password(Some("***")).is_err() {
        return text.to_owned();
    }
    text.replace(url, shown.as_str())
}

/// The `NNNN_*.sql` files of a migrations directory, in order.
pub fn migration_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only `NNNN_lowercase_words.sql` names are applied (they are written into SQL).
    #[test]
    fn migration_names() {
        assert!(migration_name_ok("0001_accounts_personas.sql"));
        assert!(migration_name_ok("0010_x2.sql"));
        assert!(!migration_name_ok("0001_x'); DROP TABLE users; --.sql"));
        assert!(!migration_name_ok("001_short.sql"));
        assert!(!migration_name_ok("0001-dash.sql"));
        assert!(!migration_name_ok("0001_Upper.sql"));
        assert!(!migration_name_ok("0001_.txt"));
    }

    /// A URL's password never reaches an error message.
    #[test]
    fn passwords_are_redacted() {
        let url = "postgres://cmb:cmb@127.0.0.1:5432/cmb_db";
        assert_eq!(
            redact(&format!("psql -d {url} failed"), url),
            "psql -d postgres://cmb:***@127.0.0.1:5432/cmb_db failed"
        );
    }
}
