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

/// Starts the server if needed and makes sure the test role exists.
pub fn ensure_server() -> Result<()> {
    let ready = Command::new("pg_isready")
        .args(["-h", HOST, "-p", &PORT.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("pg_isready not found: install PostgreSQL (`cargo xtask setup` does)")?;
    if !ready.success() {
        let clusters = run(Command::new("pg_lsclusters").arg("-h")).context("pg_lsclusters")?;
        let Some(line) = clusters.lines().next() else {
            bail!("no PostgreSQL cluster on this machine (pg_lsclusters is empty)");
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (version, cluster) = (
            fields.first().copied().unwrap_or("15"),
            fields.get(1).copied().unwrap_or("main"),
        );
        run(Command::new("pg_ctlcluster").args([version, cluster, "start"]))?;
        for _ in 0..50 {
            let up = Command::new("pg_isready")
                .args(["-h", HOST, "-p", &PORT.to_string()])
                .stdout(std::process::Stdio::null())
                .status()?;
            if up.success() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
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
/// applied in order (recorded in `_cmb_migrations`). For the development database,
/// whose data should survive restarts.
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
    db.query("CREATE TABLE IF NOT EXISTS _cmb_migrations (name TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")?;
    let applied = db.query("SELECT name FROM _cmb_migrations")?;
    for file in migration_files(migrations)? {
        let file_name = file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        if applied.lines().any(|l| l.trim() == file_name) {
            continue;
        }
        psql(&db.name, &["-1", "-f", &file.to_string_lossy()])
            .with_context(|| format!("applying {}", file.display()))?;
        db.query(&format!(
            "INSERT INTO _cmb_migrations (name) VALUES ('{file_name}')"
        ))?;
    }
    Ok(db)
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
