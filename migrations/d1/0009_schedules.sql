-- 0009: recurring schedules (SQLite / D1 dialect). Kept in step with
-- migrations/postgres/0009_schedules.sql.

-- "Every weekday at 07:00 in my time zone" (POST /api/schedules). Each occurrence is an
-- ordinary scheduled call (calls.requested_by = 'schedule', calls.schedule_id), booked
-- ahead of time: the next one when the schedule is made or changed, and when an attempt
-- settles (cmb_core::schedule decides a retry or the next occurrence).
CREATE TABLE schedules (
    id                  TEXT PRIMARY KEY,
    user_id             TEXT NOT NULL REFERENCES users (id),
    persona_id          TEXT NOT NULL REFERENCES personas (id),
    -- Local "HH:MM" in `timezone` (an IANA name).
    time_of_day         TEXT NOT NULL,
    -- Days it calls on: bit 0 = Monday … bit 6 = Sunday.
    days                INTEGER NOT NULL CHECK (days BETWEEN 1 AND 127),
    timezone            TEXT NOT NULL,
    retries             INTEGER NOT NULL CHECK (retries BETWEEN 0 AND 3),
    retry_after_minutes INTEGER NOT NULL CHECK (retry_after_minutes BETWEEN 0 AND 120),
    is_active           INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
    -- The pending attempt, and when it dials (NULL: none booked).
    pending_call_id     TEXT,
    next_call_at        TEXT,
    -- Why the last occurrence was not booked or not placed (NULL: it was).
    skipped_reason      TEXT,
    -- Deleted schedules are kept, so the calls they made still name them.
    deleted_at          TEXT,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL
);
CREATE INDEX schedules_user ON schedules (user_id, created_at);

-- The schedule a call is an attempt of, and which attempt (0: the occurrence itself).
ALTER TABLE calls ADD COLUMN schedule_id TEXT REFERENCES schedules (id);
ALTER TABLE calls ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0 CHECK (attempt >= 0);
-- At most one attempt of a schedule waits at a time: two concurrent bookings (two
-- edits of one schedule) cannot both ring the caller.
CREATE UNIQUE INDEX calls_one_pending_per_schedule ON calls (schedule_id)
    WHERE status = 'scheduled' AND schedule_id IS NOT NULL;
