-- 0002: calls, their transcripts, cost lines and turn latencies (PostgreSQL dialect).
-- Kept in step with migrations/d1/0002_calls.sql.

CREATE TABLE calls (
    id               TEXT PRIMARY KEY,
    user_id          TEXT NOT NULL REFERENCES users (id),
    persona_id       TEXT NOT NULL REFERENCES personas (id),
    phone_number     TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('scheduled', 'queued', 'ringing', 'in_progress', 'completed', 'busy', 'no_answer', 'failed', 'canceled')),
    status_reason    TEXT,
    scheduled_time   TIMESTAMPTZ,
    started_at       TIMESTAMPTZ,
    ended_at         TIMESTAMPTZ,
    duration_seconds BIGINT,
    twilio_call_sid  TEXT,
    answered_by      TEXT,
    reserved_credits BIGINT NOT NULL DEFAULT 0 CHECK (reserved_credits >= 0),
    cost_cents       BIGINT,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL
);
CREATE INDEX calls_user_created ON calls (user_id, created_at DESC);
CREATE INDEX calls_status ON calls (status);
CREATE UNIQUE INDEX calls_one_live_per_user ON calls (user_id) WHERE status IN ('queued', 'ringing', 'in_progress');

CREATE TABLE call_transcripts (
    call_id     TEXT NOT NULL REFERENCES calls (id),
    seq         BIGINT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    text        TEXT NOT NULL,
    at          TIMESTAMPTZ NOT NULL,
    interrupted BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (call_id, seq)
);

CREATE TABLE call_costs (
    call_id     TEXT NOT NULL REFERENCES calls (id),
    provider    TEXT NOT NULL CHECK (provider IN ('twilio', 'deepgram', 'llm', 'elevenlabs')),
    quantity    DOUBLE PRECISION NOT NULL,
    unit        TEXT NOT NULL,
    cost_micros BIGINT NOT NULL,
    PRIMARY KEY (call_id, provider)
);

CREATE TABLE call_turn_latencies (
    call_id                       TEXT NOT NULL REFERENCES calls (id),
    turn                          BIGINT NOT NULL,
    end_of_turn_to_first_audio_ms BIGINT,
    llm_first_token_ms            BIGINT,
    created_at                    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (call_id, turn)
);
