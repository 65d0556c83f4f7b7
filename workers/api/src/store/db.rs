//! The two databases behind one small interface: D1 (SQLite) and PostgreSQL through the
//! `HYPERDRIVE` binding (tokio-postgres over a Workers socket).
//!
//! SQL is written once, in the dialect both accept: `?N` placeholders, `TRUE`/`FALSE`
//! literals, `ON CONFLICT`, `CAST(… AS BIGINT)` around aggregates. Arguments carry their
//! SQL type ([`Arg`]), so the Postgres side can cast each placeholder explicitly
//! (`$1::text::timestamptz`, …) and rows come back as the same JSON shape from both:
//! timestamps as RFC 3339 UTC strings with milliseconds (what the D1 side stores), flags
//! as 0/1. A batch is one transaction on both. Constraint failures are classified into
//! [`WriteConflict`] so callers never parse database messages themselves.

use std::rc::Rc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;
use serde_json::{Map, Number, Value};
use tokio_postgres::types::{ToSql, Type};
use wasm_bindgen::JsValue;
use worker::postgres_tls::PassthroughTls;
use worker::{D1Database, D1PreparedStatement, Env};

use crate::error::{ApiError, ApiResult};

/// A typed SQL argument. `None` is SQL NULL of that type.
#[derive(Debug, Clone)]
pub enum Arg {
    Text(Option<String>),
    Int(Option<i64>),
    Real(Option<f64>),
    Bool(Option<bool>),
    /// An RFC 3339 timestamp: TEXT in D1, `timestamptz` in Postgres.
    Time(Option<String>),
    /// A `YYYY-MM-DD` day: TEXT in D1, `date` in Postgres.
    Date(Option<String>),
    /// JSON text: TEXT in D1, `jsonb` in Postgres.
    Json(Option<String>),
}

pub fn s(v: &str) -> Arg {
    Arg::Text(Some(v.to_string()))
}
pub fn opt(v: Option<&str>) -> Arg {
    Arg::Text(v.map(str::to_string))
}
pub fn int(v: i64) -> Arg {
    Arg::Int(Some(v))
}
pub fn opt_int(v: Option<i64>) -> Arg {
    Arg::Int(v)
}
pub fn real(v: f64) -> Arg {
    Arg::Real(Some(v))
}
pub fn flag(v: bool) -> Arg {
    Arg::Bool(Some(v))
}
/// Reads a stored flag: both drivers return 0/1 (SQLite's INTEGER, Postgres' BOOLEAN
/// mapped the same way), and JSON booleans are accepted too.
pub fn read_flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Int(i64),
        Bool(bool),
    }
    match <Flag as serde::Deserialize>::deserialize(d)? {
        Flag::Bool(b) => Ok(b),
        Flag::Int(0) => Ok(false),
        Flag::Int(1) => Ok(true),
        Flag::Int(n) => Err(serde::de::Error::custom(format!("flag out of range: {n}"))),
    }
}
pub fn ts(v: &str) -> Arg {
    Arg::Time(Some(v.to_string()))
}
pub fn opt_ts(v: Option<&str>) -> Arg {
    Arg::Time(v.map(str::to_string))
}
pub fn day(v: &str) -> Arg {
    Arg::Date(Some(v.to_string()))
}

/// One statement: SQL in the shared dialect plus its arguments.
#[derive(Debug, Clone)]
pub struct Stmt {
    pub sql: String,
    pub args: Vec<Arg>,
}

/// How a failed write failed, for the callers that care.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteConflict {
    /// A UNIQUE constraint: the row (or the idempotency key) already exists.
    Duplicate,
    /// The user already has a live call (the `calls_one_live_per_user` index).
    LiveCall,
    /// The user's calls-per-day cap (`call_day_counts`' `calls_per_day_cap`, see `limits`).
    DailyLimit,
    /// A CHECK constraint, e.g. `credits >= 0`.
    Check,
}

/// A failed statement (the message names the cause; constraint failures included).
#[derive(Debug)]
pub struct DbError(pub String);

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A statement bound to the database that will run it: `run` it alone, or hand several
/// to [`Db::batch_bound`] for one transaction.
pub struct Bound<'a> {
    db: &'a Db,
    pub(crate) stmt: Stmt,
}

/// What a single statement changed (shaped like D1's result metadata).
pub struct RunResult {
    changes: u64,
}

pub struct RunMeta {
    pub changes: Option<usize>,
}

impl RunResult {
    pub fn meta(&self) -> Result<Option<RunMeta>, DbError> {
        Ok(Some(RunMeta {
            changes: Some(self.changes as usize),
        }))
    }
}

impl Bound<'_> {
    /// Runs the statement alone. Any failure, constraint violations included, is an error.
    pub async fn run(self) -> Result<RunResult, DbError> {
        match self.db.exec(self.stmt).await {
            Ok(Ok(changes)) => Ok(RunResult { changes }),
            Ok(Err(conflict)) => Err(DbError(format!("constraint violated: {conflict:?}"))),
            Err(e) => Err(DbError(format!("{}: {}", e.code, e.message))),
        }
    }
}

/// Which SQL dialect answers, for the rare query that must differ (date functions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

enum Backend {
    D1(D1Database),
    Pg(Rc<tokio_postgres::Client>),
}

/// A database connection for one request (or one Durable Object event).
pub struct Db {
    backend: Backend,
}

fn internal(context: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(context, e)
}

impl Db {
    pub fn d1(db: D1Database) -> Self {
        Self {
            backend: Backend::D1(db),
        }
    }

    /// Opens the configured database: D1, or Postgres through the `HYPERDRIVE` binding.
    pub async fn open(env: &Env, backend: cmb_core::config::DbBackend) -> ApiResult<Self> {
        match backend {
            cmb_core::config::DbBackend::D1 => {
                let d1 = env
                    .d1(crate::config::DB_BINDING)
                    .map_err(|e| internal("d1 binding", e))?;
                Ok(Self::d1(d1))
            }
            cmb_core::config::DbBackend::Postgres => Self::postgres(env).await,
        }
    }

    async fn postgres(env: &Env) -> ApiResult<Self> {
        let hd = env
            .hyperdrive(crate::config::HYPERDRIVE_BINDING)
            .map_err(|e| internal("hyperdrive binding", e))?;
        let config: tokio_postgres::Config = hd
            .connection_string()
            .parse()
            .map_err(|e| internal("hyperdrive connection string", e))?;
        let socket = hd
            .connect()
            .map_err(|e| internal("hyperdrive connect", e))?;
        let (client, connection) = config
            .connect_raw(socket, PassthroughTls)
            .await
            .map_err(|e| internal("postgres connect", e))?;
        wasm_bindgen_futures::spawn_local(async move {
            if let Err(e) = connection.await {
                crate::log::error(
                    "postgres_connection_failed",
                    serde_json::json!({ "error": e.to_string() }),
                );
            }
        });
        // Timestamps are rendered in UTC whatever the server's default.
        client
            .batch_execute("SET TIME ZONE 'UTC'")
            .await
            .map_err(|e| internal("postgres session", e))?;
        Ok(Self {
            backend: Backend::Pg(Rc::new(client)),
        })
    }

    pub fn dialect(&self) -> Dialect {
        match self.backend {
            Backend::D1(_) => Dialect::Sqlite,
            Backend::Pg(_) => Dialect::Postgres,
        }
    }

    /// Builds a statement bound to this database (no I/O).
    pub fn bind(&self, sql: &str, args: &[Arg]) -> Bound<'_> {
        Bound {
            db: self,
            stmt: Stmt {
                sql: sql.to_string(),
                args: args.to_vec(),
            },
        }
    }

    /// Runs bound statements as one transaction (see [`Db::batch`]).
    pub async fn batch_bound(&self, stmts: Vec<Bound<'_>>) -> ApiResult<Result<(), WriteConflict>> {
        self.batch(stmts.into_iter().map(|b| b.stmt).collect())
            .await
    }

    /// The first row, decoded into `T`.
    pub async fn first<T: DeserializeOwned>(
        &self,
        sql: &str,
        args: &[Arg],
    ) -> ApiResult<Option<T>> {
        let mut rows = self.rows(sql, args).await?;
        match rows.is_empty() {
            true => Ok(None),
            false => serde_json::from_value(rows.swap_remove(0))
                .map(Some)
                .map_err(|e| internal("decode row", e)),
        }
    }

    /// Every row, decoded into `T`.
    pub async fn all<T: DeserializeOwned>(&self, sql: &str, args: &[Arg]) -> ApiResult<Vec<T>> {
        self.rows(sql, args)
            .await?
            .into_iter()
            .map(|r| serde_json::from_value(r).map_err(|e| internal("decode row", e)))
            .collect()
    }

    /// Runs one statement; returns how many rows it changed. A constraint failure is
    /// a `WriteConflict`.
    pub async fn exec(&self, stmt: Stmt) -> ApiResult<Result<u64, WriteConflict>> {
        match &self.backend {
            Backend::D1(d1) => {
                match d1_retry(|| async { Ok(d1_prepare(d1, &stmt)?.run().await) }).await? {
                    Ok(result) => {
                        let changes = result
                            .meta()
                            .map_err(|e| internal("d1 meta", e))?
                            .and_then(|m| m.changes)
                            .unwrap_or(0);
                        Ok(Ok(changes as u64))
                    }
                    Err(e) => {
                        classify_d1(&e).map_or_else(|| Err(internal("d1 run", e)), |c| Ok(Err(c)))
                    }
                }
            }
            Backend::Pg(client) => {
                let (sql, params) = pg_params(&stmt);
                let refs: Vec<&(dyn ToSql + Sync)> = params
                    .iter()
                    .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                    .collect();
                match client.execute(sql.as_str(), &refs).await {
                    Ok(n) => Ok(Ok(n)),
                    Err(e) => classify_pg(&e).map_or_else(
                        || Err(internal("postgres execute", pg_message(&e))),
                        |c| Ok(Err(c)),
                    ),
                }
            }
        }
    }

    /// Runs statements as one transaction; a constraint failure anywhere is returned as
    /// a [`WriteConflict`] with nothing applied.
    pub async fn batch(&self, stmts: Vec<Stmt>) -> ApiResult<Result<(), WriteConflict>> {
        match &self.backend {
            Backend::D1(d1) => {
                let run = || async {
                    let prepared = stmts
                        .iter()
                        .map(|s| d1_prepare(d1, s))
                        .collect::<ApiResult<Vec<_>>>()?;
                    Ok(d1.batch(prepared).await)
                };
                match d1_retry(run).await? {
                    Ok(_) => Ok(Ok(())),
                    Err(e) => {
                        classify_d1(&e).map_or_else(|| Err(internal("d1 batch", e)), |c| Ok(Err(c)))
                    }
                }
            }
            Backend::Pg(client) => {
                client
                    .batch_execute("BEGIN")
                    .await
                    .map_err(|e| internal("postgres begin", e))?;
                for stmt in &stmts {
                    let (sql, params) = pg_params(stmt);
                    let refs: Vec<&(dyn ToSql + Sync)> = params
                        .iter()
                        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                        .collect();
                    if let Err(e) = client.execute(sql.as_str(), &refs).await {
                        let _ = client.batch_execute("ROLLBACK").await;
                        return classify_pg(&e).map_or_else(
                            || Err(internal("postgres batch", pg_message(&e))),
                            |c| Ok(Err(c)),
                        );
                    }
                }
                client
                    .batch_execute("COMMIT")
                    .await
                    .map_err(|e| internal("postgres commit", e))?;
                Ok(Ok(()))
            }
        }
    }

    async fn rows(&self, sql: &str, args: &[Arg]) -> ApiResult<Vec<Value>> {
        let stmt = Stmt {
            sql: sql.to_string(),
            args: args.to_vec(),
        };
        match &self.backend {
            Backend::D1(d1) => {
                let result = d1_retry(|| async { Ok(d1_prepare(d1, &stmt)?.all().await) })
                    .await?
                    .map_err(|e| internal("d1 query", e))?;
                result
                    .results::<Value>()
                    .map_err(|e| internal("d1 decode", e))
            }
            Backend::Pg(client) => {
                let (sql, params) = pg_params(&stmt);
                let refs: Vec<&(dyn ToSql + Sync)> = params
                    .iter()
                    .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                    .collect();
                let rows = client
                    .query(sql.as_str(), &refs)
                    .await
                    .map_err(|e| internal("postgres query", pg_message(&e)))?;
                rows.iter().map(pg_row_to_json).collect()
            }
        }
    }
}

// ---- D1 ----

fn d1_arg(a: &Arg) -> JsValue {
    match a {
        Arg::Text(v) | Arg::Time(v) | Arg::Date(v) | Arg::Json(v) => {
            v.as_deref().map_or(JsValue::NULL, JsValue::from_str)
        }
        // Integers cross into JS as numbers; every value we store is far below 2^53.
        Arg::Int(v) => v.map_or(JsValue::NULL, |i| JsValue::from_f64(i as f64)),
        Arg::Real(v) => v.map_or(JsValue::NULL, JsValue::from_f64),
        Arg::Bool(v) => v.map_or(JsValue::NULL, |b| {
            JsValue::from_f64(if b { 1.0 } else { 0.0 })
        }),
    }
}

/// Pauses between tries of a D1 call that found the database locked.
const D1_BUSY_PAUSES_MS: [u64; 5] = [10, 25, 50, 100, 250];

/// D1 answers `SQLITE_BUSY` ("database is locked") when another writer holds the
/// database: locally, an operator's `wrangler d1 execute` (`cargo xtask admin grant`)
/// on the state `wrangler dev` is serving. The call did nothing, so it is tried again a
/// few times, briefly (under half a second in all), before the error stands.
async fn d1_retry<T, F, Fut>(mut call: F) -> ApiResult<worker::Result<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ApiResult<worker::Result<T>>>,
{
    for pause in D1_BUSY_PAUSES_MS {
        match call().await? {
            Err(e) if is_busy(&e.to_string()) => {
                crate::log::warn("d1_busy_retry", serde_json::json!({ "pause_ms": pause }));
                worker::Delay::from(std::time::Duration::from_millis(pause)).await;
            }
            done => return Ok(done),
        }
    }
    call().await
}

/// Whether a D1 error is SQLite's "the database is locked" (nothing was done).
pub fn is_busy(message: &str) -> bool {
    message.contains("SQLITE_BUSY") || message.contains("database is locked")
}

fn d1_prepare(d1: &D1Database, stmt: &Stmt) -> ApiResult<D1PreparedStatement> {
    let args: Vec<JsValue> = stmt.args.iter().map(d1_arg).collect();
    d1.prepare(stmt.sql.as_str())
        .bind(&args)
        .map_err(|e| internal("d1 bind", e))
}

fn classify_d1(err: &worker::Error) -> Option<WriteConflict> {
    classify_message(&err.to_string())
}

/// Maps a constraint failure message to a conflict (SQLite's wording).
pub fn classify_message(text: &str) -> Option<WriteConflict> {
    if text.contains("UNIQUE constraint failed: calls.user_id")
        || text.contains("calls_one_live_per_user")
    {
        Some(WriteConflict::LiveCall)
    } else if text.contains("UNIQUE constraint failed") {
        Some(WriteConflict::Duplicate)
    } else if text.contains("CHECK constraint failed: calls_per_day_cap") {
        Some(WriteConflict::DailyLimit)
    } else if text.contains("CHECK constraint failed") {
        Some(WriteConflict::Check)
    } else {
        None
    }
}

// ---- Postgres ----

/// tokio-postgres' Display says only "db error"; the server's message is what helps.
fn pg_message(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!(
            "{} ({}): {}",
            db.message(),
            db.code().code(),
            db.detail().unwrap_or("")
        ),
        None => err.to_string(),
    }
}

fn classify_pg(err: &tokio_postgres::Error) -> Option<WriteConflict> {
    let db = err.as_db_error()?;
    match db.code().code() {
        "23505" if db.constraint() == Some("calls_one_live_per_user") => {
            Some(WriteConflict::LiveCall)
        }
        "23505" => Some(WriteConflict::Duplicate),
        "23514" if db.constraint() == Some("calls_per_day_cap") => Some(WriteConflict::DailyLimit),
        "23514" => Some(WriteConflict::Check),
        _ => None,
    }
}

/// Rewrites `?N` placeholders to `$N` with an explicit cast for the argument's type, and
/// converts the arguments. Casting through `text` lets timestamps travel as strings.
fn pg_params(stmt: &Stmt) -> (String, Vec<Box<dyn ToSql + Sync>>) {
    let sql = translate_placeholders(&stmt.sql, |n| {
        let cast = match stmt.args.get(n.saturating_sub(1)) {
            Some(Arg::Text(_)) | None => "::text",
            Some(Arg::Int(_)) => "::int8",
            Some(Arg::Real(_)) => "::float8",
            Some(Arg::Bool(_)) => "::boolean",
            Some(Arg::Time(_)) => "::text::timestamptz",
            Some(Arg::Date(_)) => "::text::date",
            Some(Arg::Json(_)) => "::text::jsonb",
        };
        format!("${n}{cast}")
    });
    let params = stmt
        .args
        .iter()
        .map(|a| -> Box<dyn ToSql + Sync> {
            match a {
                Arg::Text(v) | Arg::Time(v) | Arg::Date(v) | Arg::Json(v) => Box::new(v.clone()),
                Arg::Int(v) => Box::new(*v),
                Arg::Real(v) => Box::new(*v),
                Arg::Bool(v) => Box::new(*v),
            }
        })
        .collect();
    (sql, params)
}

/// Replaces each `?N` outside string literals with `render(N)`.
pub fn translate_placeholders(sql: &str, render: impl Fn(usize) -> String) -> String {
    let mut out = String::with_capacity(sql.len() + 32);
    let mut chars = sql.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if c == '\'' {
            in_string = !in_string;
            out.push(c);
            continue;
        }
        if c == '?' && !in_string && chars.peek().is_some_and(char::is_ascii_digit) {
            let mut digits = String::new();
            while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                digits.push(*d);
                chars.next();
            }
            out.push_str(&render(digits.parse().unwrap_or(0)));
            continue;
        }
        out.push(c);
    }
    out
}

/// One Postgres row as the JSON object a D1 row would be.
fn pg_row_to_json(row: &tokio_postgres::Row) -> ApiResult<Value> {
    let mut map = Map::new();
    for (i, col) in row.columns().iter().enumerate() {
        let decode =
            |e: tokio_postgres::Error| internal("postgres decode", format!("{}: {e}", col.name()));
        let t = col.type_();
        let value = if [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(t) {
            row.try_get::<_, Option<String>>(i)
                .map_err(decode)?
                .map_or(Value::Null, Value::String)
        } else if *t == Type::INT8 {
            row.try_get::<_, Option<i64>>(i)
                .map_err(decode)?
                .map_or(Value::Null, Value::from)
        } else if *t == Type::INT4 {
            row.try_get::<_, Option<i32>>(i)
                .map_err(decode)?
                .map_or(Value::Null, Value::from)
        } else if *t == Type::INT2 {
            row.try_get::<_, Option<i16>>(i)
                .map_err(decode)?
                .map_or(Value::Null, Value::from)
        } else if *t == Type::FLOAT8 {
            row.try_get::<_, Option<f64>>(i)
                .map_err(decode)?
                .and_then(Number::from_f64)
                .map_or(Value::Null, Value::Number)
        } else if *t == Type::FLOAT4 {
            row.try_get::<_, Option<f32>>(i)
                .map_err(decode)?
                .and_then(|f| Number::from_f64(f64::from(f)))
                .map_or(Value::Null, Value::Number)
        } else if *t == Type::BOOL {
            // Flags read as 0/1, like SQLite's.
            row.try_get::<_, Option<bool>>(i)
                .map_err(decode)?
                .map_or(Value::Null, |b| Value::from(i64::from(b)))
        } else if *t == Type::JSONB || *t == Type::JSON {
            // JSON reads back as its text, as D1 stores it.
            row.try_get::<_, Option<Value>>(i)
                .map_err(decode)?
                .map_or(Value::Null, |j| Value::String(j.to_string()))
        } else if *t == Type::DATE {
            row.try_get::<_, Option<chrono::NaiveDate>>(i)
                .map_err(decode)?
                .map_or(Value::Null, |d| {
                    Value::String(d.format("%Y-%m-%d").to_string())
                })
        } else if *t == Type::TIMESTAMPTZ {
            row.try_get::<_, Option<DateTime<Utc>>>(i)
                .map_err(decode)?
                .map_or(Value::Null, |v| {
                    Value::String(v.to_rfc3339_opts(SecondsFormat::Millis, true))
                })
        } else {
            return Err(internal(
                "postgres decode",
                format!(
                    "column {} has unsupported type {t}; cast it in SQL (e.g. jsonb to text)",
                    col.name()
                ),
            ));
        };
        map.insert(col.name().to_string(), value);
    }
    Ok(Value::Object(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `?N` becomes `$N` plus a cast; `?` inside string literals is left alone.
    #[test]
    fn placeholders_are_translated_outside_literals() {
        let out = translate_placeholders("SELECT '?1', x FROM t WHERE a = ?1 AND b = ?12", |n| {
            format!("${n}")
        });
        assert_eq!(out, "SELECT '?1', x FROM t WHERE a = $1 AND b = $12");
    }

    /// SQLite's constraint messages map to the right conflict.
    #[test]
    fn sqlite_messages_classify() {
        assert_eq!(
            classify_message(
                "D1_ERROR: UNIQUE constraint failed: calls.user_id: SQLITE_CONSTRAINT"
            ),
            Some(WriteConflict::LiveCall)
        );
        assert_eq!(
            classify_message("UNIQUE constraint failed: credit_ledger.idempotency_key"),
            Some(WriteConflict::Duplicate)
        );
        assert_eq!(
            classify_message("CHECK constraint failed: credits >= 0"),
            Some(WriteConflict::Check)
        );
        assert_eq!(
            classify_message("CHECK constraint failed: calls_per_day_cap: SQLITE_CONSTRAINT"),
            Some(WriteConflict::DailyLimit)
        );
        assert_eq!(classify_message("no such table"), None);
    }

    /// Only "the database is locked" is retried; a constraint failure is an answer.
    #[test]
    fn busy_is_recognised() {
        assert!(is_busy("D1_ERROR: database is locked: SQLITE_BUSY"));
        assert!(is_busy("Error: SQLITE_BUSY"));
        assert!(!is_busy(
            "UNIQUE constraint failed: users.email: SQLITE_CONSTRAINT"
        ));
    }
}
