//! `cargo xtask admin grant|revoke EMAIL [--remote | --database-url URL]`.

use anyhow::Result;
use clap::{Args, Subcommand};
use xtask::admin::{set_role, Change, Target};
use xtask::repo::Repo;

#[derive(Args)]
pub struct AdminArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Make the account with this email an admin.
    Grant(Who),
    /// Make the account with this email a plain user again.
    Revoke(Who),
}

#[derive(Args)]
struct Who {
    /// The account's email (it must be registered already).
    email: String,
    /// Production D1, through wrangler (`wrangler login` first).
    #[arg(long, conflicts_with = "database_url")]
    remote: bool,
    /// A PostgreSQL database (the one Hyperdrive points at), e.g. postgres://…
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
}

pub fn run(repo: &Repo, args: &AdminArgs) -> Result<()> {
    let (who, change) = match &args.action {
        Action::Grant(w) => (w, Change::Grant),
        Action::Revoke(w) => (w, Change::Revoke),
    };
    let target = match (&who.database_url, who.remote) {
        (Some(url), _) => Target::Postgres(url.clone()),
        (None, true) => Target::RemoteD1,
        (None, false) => Target::LocalD1(repo.dev_state_dir()),
    };
    let outcome = set_role(repo, &target, &who.email, change)?;
    if outcome.before == outcome.after {
        println!(
            "admin: {} ({}) is already {}; nothing changed",
            who.email.trim(),
            outcome.user_id,
            outcome.after
        );
    } else {
        println!(
            "admin: {} ({}) is now {} (was {}); audited as actor `operator`",
            who.email.trim(),
            outcome.user_id,
            outcome.after,
            outcome.before
        );
    }
    Ok(())
}
