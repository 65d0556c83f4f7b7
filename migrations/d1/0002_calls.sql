-- 0002: calls, their transcripts and cost lines (SQLite / D1 dialect).
-- Kept in step with migrations/postgres/0002_calls.sql.

CREATE TABLE calls (
    id               TEXT PRIMARY KEY,
    user_id          TEXT NOT NULL REFERENCES users (id),
    persona_id       TEXT NOT NULL REFERENCES personas (id),
    phone_number     TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('scheduled', 'queued', 'ringing', 'in_progress', 'completed', 'busy', 'no_answer', 'failed', 'canceled')),
    -- Why a call failed, was canceled or ended early, for humans.
    status_reason    TEXT,
    scheduled_time   TEXT,
    started_at       TEXT,
    ended_at         TEXT,
    duration_seconds INTEGER,
    twilio_call_sid  TEXT,
    answered_by      TEXT,
    -- Credits currently held for this call (released when it settles).
    reserved_credits INTEGER NOT NULL DEFAULT 0 CHECK (reserved_credits >= 0),
    -- Credits finally charged (25 + 40 per started minute), set once when it settles.
    cost_cents       INTEGER,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);
CREATE INDEX calls_user_created ON calls (user_id, created_at DESC);
CREATE INDEX calls_status ON calls (status);
-- One live call per user, enforced by the database itself: a second concurrent trigger
-- aborts on this index instead of racing a read-then-write check.
CREATE UNIQUE INDEX calls_one_live_per_user ON calls (user_id) WHERE status IN ('queued', 'ringing', 'in_progress');

-- What was said, in order; `interrupted` marks a persona turn cut short by barge-in
-- (its text is what the caller actually heard).
CREATE TABLE call_transcripts (
    call_id     TEXT NOT NULL REFERENCES calls (id),
    seq         INTEGER NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    text        TEXT NOT NULL,
    at          TEXT NOT NULL,
    interrupted INTEGER NOT NULL DEFAULT 0 CHECK (interrupted IN (0, 1)),
    PRIMARY KEY (call_id, seq)
);

-- One line per provider per call: what we paid (micro-dollars, exact integers).
CREATE TABLE call_costs (
    call_id     TEXT NOT NULL REFERENCES calls (id),
    provider    TEXT NOT NULL CHECK (provider IN ('twilio', 'deepgram', 'llm', 'elevenlabs')),
    quantity    REAL NOT NULL,
    unit        TEXT NOT NULL,
    cost_micros INTEGER NOT NULL,
    PRIMARY KEY (call_id, provider)
);

-- Per persona turn: end of the user's turn to the first persona audio sent to Twilio
-- (measured by the relay) and to the LLM's first token (measured by the DO).
CREATE TABLE call_turn_latencies (
    call_id                       TEXT NOT NULL REFERENCES calls (id),
    turn                          INTEGER NOT NULL,
    end_of_turn_to_first_audio_ms INTEGER,
    llm_first_token_ms            INTEGER,
    created_at                    TEXT NOT NULL,
    PRIMARY KEY (call_id, turn)
);
