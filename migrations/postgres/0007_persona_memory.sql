-- 0007: what a persona remembers about a caller, the caller's time zone, and who asked
-- for a call (PostgreSQL
-- dialect). Kept in step with migrations/d1/0007_persona_memory.sql.

-- One set of notes per (caller, persona), rewritten after each call the caller spoke in
-- (cmb_core::memory). `last_call_id` makes the write idempotent: a call is folded in
-- once, and an older call never overwrites a newer one's notes.
CREATE TABLE persona_memories (
    user_id       TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    persona_id    TEXT NOT NULL REFERENCES personas(id) ON DELETE CASCADE,
    summary       TEXT NOT NULL,
    calls         INTEGER NOT NULL DEFAULT 1 CHECK (calls >= 1),
    last_call_id  TEXT NOT NULL,
    last_call_at  TIMESTAMPTZ NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, persona_id)
);

-- The caller's IANA time zone (PATCH /api/me): the persona's prompt states the caller's
-- local date and time. NULL: UTC.
ALTER TABLE users ADD COLUMN timezone TEXT;

-- Who asked for the call: the user, the persona (a callback it promised), or a schedule.
ALTER TABLE calls ADD COLUMN requested_by TEXT NOT NULL DEFAULT 'user'
    CHECK (requested_by IN ('user', 'persona', 'schedule'));
