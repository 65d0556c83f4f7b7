//! The operators' event log (`events`, migration 0011): writes, the search behind the
//! console and the MCP server, and the retention prune.

use super::*;

use cmb_core::events::{Event, Search};

/// An event as stored, for the console and MCP (`body` is JSON text in `body_json`).
#[derive(Debug, Clone, Deserialize)]
pub struct EventRow {
    pub id: String,
    pub created_at: String,
    pub level_rank: i64,
    pub kind: String,
    pub source: String,
    pub call_id: Option<String>,
    pub user_id: Option<String>,
    pub request_id: Option<String>,
    pub body_json: String,
}

impl EventRow {
    pub fn view(&self) -> serde_json::Value {
        let level = cmb_core::events::Level::ALL
            .into_iter()
            .find(|l| l.rank() == self.level_rank)
            .map_or("info", |l| l.as_str());
        serde_json::json!({
            "id": self.id,
            "at": self.created_at,
            "level": level,
            "kind": self.kind,
            "source": self.source,
            "call_id": self.call_id,
            "user_id": self.user_id,
            "request_id": self.request_id,
            "body": serde_json::from_str::<serde_json::Value>(&self.body_json)
                .unwrap_or(serde_json::Value::Null),
        })
    }
}

const COLUMNS: &str =
    "id, created_at, level_rank, kind, source, call_id, user_id, request_id, body_json";

impl Store {
    /// The insert of one event (`id` is the caller's fresh UUID).
    pub fn operator_event_stmt(&self, id: &str, e: &Event) -> ApiResult<Bound<'_>> {
        self.stmt(
            &format!("INSERT INTO events ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
            &[
                s(id),
                ts(&crate::iso_from_millis(e.at_ms)),
                int(e.level.rank()),
                s(&e.kind),
                s(e.source),
                opt(e.call_id.as_deref()),
                opt(e.user_id.as_deref()),
                opt(e.request_id.as_deref()),
                Arg::Json(Some(e.body.to_string())),
            ],
        )
    }

    /// Stores events, all or none.
    pub async fn insert_events(&self, events: &[(String, Event)]) -> ApiResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let stmts = events
            .iter()
            .map(|(id, e)| self.operator_event_stmt(id, e))
            .collect::<ApiResult<Vec<_>>>()?;
        self.batch(stmts)
            .await?
            .map_err(|c| crate::error::ApiError::internal("insert events", format!("{c:?}")))
    }

    /// Newest first, with the total that matches.
    pub async fn search_events(&self, q: &Search) -> ApiResult<(Vec<EventRow>, i64)> {
        let filter = "(?1 IS NULL OR level_rank >= ?1) \
             AND (?2 IS NULL OR kind = ?2 OR (?3 IS NOT NULL AND kind LIKE ?3 ESCAPE '\\')) \
             AND (?4 IS NULL OR call_id = ?4) AND (?5 IS NULL OR user_id = ?5) \
             AND (?6 IS NULL OR LOWER(kind) LIKE LOWER(?6) ESCAPE '\\' \
                  OR LOWER(CAST(body_json AS TEXT)) LIKE LOWER(?6) ESCAPE '\\') \
             AND (?7 IS NULL OR created_at >= ?7) AND (?8 IS NULL OR created_at <= ?8)";
        // A kind ending in '.' is a prefix.
        let prefix = q
            .kind
            .as_deref()
            .filter(|k| k.ends_with('.'))
            .map(|k| format!("{}%", like_pattern(k).trim_matches('%')));
        let iso = |ms: Option<u64>| opt_ts(ms.map(crate::iso_from_millis).as_deref());
        let args = vec![
            opt_int(q.min_level.map(|l| l.rank())),
            opt(q.kind.as_deref()),
            opt(prefix.as_deref()),
            opt(q.call_id.as_deref()),
            opt(q.user_id.as_deref()),
            opt(q.text.as_deref().map(like_pattern).as_deref()),
            iso(q.from_ms),
            iso(q.to_ms),
        ];
        let mut page = args.clone();
        page.extend([int(q.limit), int(q.offset)]);
        let rows = self
            .all(
                &format!(
                    "SELECT {COLUMNS} FROM events WHERE {filter} \
                     ORDER BY created_at DESC, id DESC LIMIT ?9 OFFSET ?10"
                ),
                &page,
            )
            .await?;
        let total: Option<Count> = self
            .first(
                &format!("SELECT COUNT(*) AS n FROM events WHERE {filter}"),
                &args,
            )
            .await?;
        Ok((rows, total.map_or(0, |c| c.n)))
    }

    /// Deletes events created before `before` (RFC 3339); answers how many.
    pub async fn prune_events(&self, before: &str) -> ApiResult<i64> {
        let n: Option<Count> = self
            .first(
                "SELECT COUNT(*) AS n FROM events WHERE created_at < ?1",
                &[ts(before)],
            )
            .await?;
        self.batch(vec![
            self.stmt("DELETE FROM events WHERE created_at < ?1", &[ts(before)])?
        ])
        .await?
        .map_err(|c| crate::error::ApiError::internal("prune events", format!("{c:?}")))?;
        Ok(n.map_or(0, |c| c.n))
    }
}

impl Store {
    /// Records events for operators, best effort: a failure to write is logged (naming
    /// the kinds lost), never the failure of what the events describe.
    pub async fn record(&self, events: Vec<Event>) {
        let kinds: Vec<String> = events.iter().map(|e| e.kind.clone()).collect();
        let rows: Result<Vec<(String, Event)>, _> = events
            .into_iter()
            .map(|e| crate::crypto::uuid().map(|id| (id, e)))
            .collect();
        let outcome = match rows {
            Ok(rows) => self.insert_events(&rows).await.map_err(|e| e.log_detail()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(cause) = outcome {
            crate::log::error(
                "event_record_failed",
                serde_json::json!({ "kinds": kinds, "cause": cause }),
            );
        }
    }
}
