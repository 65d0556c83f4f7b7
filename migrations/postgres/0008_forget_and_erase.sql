-- 0008: forgetting and erasure (PostgreSQL dialect). Kept in step with
-- migrations/d1/0008_forget_and_erase.sql.

-- When the caller last made a persona forget them (DELETE /api/personas/:id/memory).
-- The notes of a call that ended before then are never written, even by a notes job
-- that was already running when the caller asked.
CREATE TABLE memory_forgets (
    user_id      TEXT NOT NULL REFERENCES users (id),
    persona_id   TEXT NOT NULL REFERENCES personas (id),
    forgotten_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, persona_id)
);

-- When the account was erased (DELETE /api/me). An erased account keeps only what the
-- ledger needs (its id, the ledger rows, anonymised calls); it can never sign in again.
ALTER TABLE users ADD COLUMN erased_at TIMESTAMPTZ;
