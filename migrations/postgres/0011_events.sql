-- 0011: the operators' event log (PostgreSQL dialect). Kept in step with
-- migrations/d1/0011_events.sql.

-- Structured events for the console and the MCP server (cmb_core::events): call
-- lifecycle steps, provider errors and reconnects, refused webhooks and streams, admin
-- actions, payments, and the relay's warnings and errors. Bodies are small JSON objects
-- without transcripts or secrets. Ids are not foreign keys: an event outlives nothing it
-- names and never blocks a deletion. Pruned after EVENT_RETENTION_DAYS by the cron.
CREATE TABLE events (
    id          TEXT PRIMARY KEY,
    created_at  TIMESTAMPTZ NOT NULL,
    -- 1 info, 2 warn, 3 error: "at least warn" is one comparison.
    level_rank  INTEGER NOT NULL CHECK (level_rank BETWEEN 1 AND 3),
    kind        TEXT NOT NULL,
    -- 'worker' or 'relay'.
    source      TEXT NOT NULL,
    call_id     TEXT,
    user_id     TEXT,
    request_id  TEXT,
    body_json   JSONB NOT NULL
);
CREATE INDEX events_created ON events (created_at);
CREATE INDEX events_call ON events (call_id, created_at);
CREATE INDEX events_user ON events (user_id, created_at);
