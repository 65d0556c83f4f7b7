-- 0010: client idempotency keys (PostgreSQL dialect). Kept in step with
-- migrations/d1/0010_idempotency.sql.

-- One row per user and `Idempotency-Key` on POST /api/calls/trigger, /api/calls/schedule
-- and /api/schedules (cmb_core::idempotency). The row is claimed before the request's
-- work (the primary key lets exactly one of concurrent requests in), then holds the
-- answer replayed to repeats; a client error deletes it. Rows past `expires_at` are free
-- again and pruned by the next claim.
CREATE TABLE idempotency_keys (
    user_id     TEXT NOT NULL REFERENCES users (id),
    key         TEXT NOT NULL,
    -- The route it was used on ("POST /api/calls/schedule").
    route       TEXT NOT NULL,
    -- Hex SHA-256 of route, user and canonical body: what a repeat must match.
    fingerprint TEXT NOT NULL,
    -- A random id of the request holding the claim: only it stores or releases.
    claim       TEXT NOT NULL,
    -- The answer (NULL while the first request runs).
    status      INTEGER,
    response    TEXT,
    created_at  TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
