//! The local PostgreSQL server for tests: see `xtask::pg` (shared with
//! `cargo xtask dev --db postgres`). This adds the repository's migrations folder.

use std::path::{Path, PathBuf};

pub use xtask::pg::{ensure_server, migration_files, PgDatabase, HOST, PASSWORD, PORT, ROLE};

/// The Postgres migrations of this repository.
pub fn migrations_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/postgres")
}

/// A fresh, uniquely named database with every Postgres migration applied in order.
pub fn fresh_database(label: &str) -> anyhow::Result<PgDatabase> {
    xtask::pg::fresh_database(label, &migrations_dir())
}
