//! `cargo xtask migrate --database-url URL`: applies the Postgres migrations a database
//! has not had yet, tracked in `_cmb_migrations` (`xtask::pg::migrate`, the runner
//! `dev --db postgres` uses too). Safe to re-run: a database that is up to date gets
//! nothing. The D1 side is `wrangler d1 migrations apply DB --remote` (README, Deploying).

use anyhow::{Context as _, Result};
use clap::Args;
use xtask::repo::Repo;

#[derive(Args)]
pub struct MigrateArgs {
    /// The database (`postgres://user:password@host:port/db?sslmode=require`); what
    /// Hyperdrive points at.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
}

pub fn run(repo: &Repo, args: &MigrateArgs) -> Result<()> {
    let dir = repo.root().join("migrations/postgres");
    let applied = xtask::pg::migrate(&args.database_url, &dir).context("migrate")?;
    if applied.is_empty() {
        println!("migrate: up to date (nothing to apply)");
    }
    for name in &applied {
        println!("migrate: applied {name}");
    }
    Ok(())
}
