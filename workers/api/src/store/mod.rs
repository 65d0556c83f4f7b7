//! Data access: the only module that writes SQL, one file per subject (`users`,
//! `personas`, `ledger`, `calls`, `payments`, `audit`, `limits`, `analytics`, `memory`,
//! `schedules`, `privacy`, `idempotency`, `events`) over the
//! database drivers in `db`. Routes and the Durable Object call these methods and never
//! see which database answers.
//!
//! Multi-statement writes go through D1 `batch`, which runs as one transaction: a failed
//! constraint in any statement (unique idempotency key, `credits >= 0`) rolls the whole
//! batch back. That is how credit operations stay exact under concurrency without
//! read-then-write. An admin action's audit row is part of the same batch, so a change
//! and its record exist together or not at all; amounts that depend on the balance
//! (refunds that may not overdraw) are computed by SQL inside the batch.

mod analytics;
mod audit;
mod calls;
pub mod db;
mod events;
mod idempotency;
mod ledger;
mod limits;
mod memory;
mod payments;
mod personas;
mod privacy;
mod schedules;
mod users;

pub use audit::*;
pub use calls::*;
pub use idempotency::*;
pub use ledger::*;
pub use payments::*;
pub use personas::*;
pub use privacy::*;
pub use schedules::*;
pub use users::*;

use serde::{Deserialize, Serialize};
use worker::{D1Database, Env};

use crate::store::db::Db;
pub use crate::store::db::WriteConflict;
pub(crate) use crate::store::db::{
    day, flag, int, opt, opt_int, opt_ts, read_flag, real, s, ts, Arg, Bound,
};

use crate::error::{ApiError, ApiResult};

pub struct Store {
    db: Db,
}

impl Store {
    pub fn new(db: D1Database) -> Self {
        Self { db: Db::d1(db) }
    }

    /// The configured database: D1, or Postgres through Hyperdrive (`DB_BACKEND`).
    pub async fn open(env: &Env, backend: cmb_core::config::DbBackend) -> ApiResult<Self> {
        Ok(Self {
            db: Db::open(env, backend).await?,
        })
    }

    pub fn dialect(&self) -> crate::store::db::Dialect {
        self.db.dialect()
    }

    pub(crate) fn stmt(&self, sql: &str, args: &[Arg]) -> ApiResult<Bound<'_>> {
        Ok(self.db.bind(sql, args))
    }

    pub(crate) async fn first<T: for<'de> Deserialize<'de>>(
        &self,
        sql: &str,
        args: &[Arg],
    ) -> ApiResult<Option<T>> {
        self.db.first(sql, args).await
    }

    pub(crate) async fn all<T: for<'de> Deserialize<'de>>(
        &self,
        sql: &str,
        args: &[Arg],
    ) -> ApiResult<Vec<T>> {
        self.db.all(sql, args).await
    }

    /// Runs statements as one transaction; a constraint failure is returned as a
    /// [`WriteConflict`] with nothing applied.
    pub(crate) async fn batch(
        &self,
        stmts: Vec<Bound<'_>>,
    ) -> ApiResult<Result<(), WriteConflict>> {
        self.db.batch_bound(stmts).await
    }

    /// Liveness check for `/health`.
    pub async fn ping(&self) -> Result<(), String> {
        self.db
            .first::<serde_json::Value>("SELECT 1 AS ok", &[])
            .await
            .map(|_| ())
            .map_err(|e| e.message)
    }
}
