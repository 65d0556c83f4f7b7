-- 0001: accounts, personas, favourites and the credits ledger (PostgreSQL dialect).
-- Kept in step with migrations/d1/0001_accounts_personas.sql: same tables, same columns,
-- Postgres-native types (timestamptz, bigint money, boolean flags).

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    email         TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    phone_number  TEXT,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    tier          TEXT NOT NULL DEFAULT 'free' CHECK (tier IN ('free', 'basic', 'premium')),
    -- Available balance in credits (1 credit = 1 US cent). Always equal to the sum of this
    -- user's credit_ledger amounts; the CHECK makes an overdraw abort its whole transaction.
    credits       BIGINT NOT NULL DEFAULT 0 CHECK (credits >= 0),
    is_banned     BOOLEAN NOT NULL DEFAULT FALSE,
    created_at    TIMESTAMPTZ NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL
);

CREATE TABLE credit_ledger (
    id              TEXT PRIMARY KEY,
    user_id         TEXT NOT NULL REFERENCES users (id),
    kind            TEXT NOT NULL CHECK (kind IN ('grant', 'reserve', 'settle', 'release', 'purchase', 'refund', 'adjust')),
    amount          BIGINT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    call_id         TEXT,
    reason          TEXT,
    created_at      TIMESTAMPTZ NOT NULL
);
CREATE INDEX credit_ledger_user ON credit_ledger (user_id, created_at);

CREATE TABLE personas (
    id               TEXT PRIMARY KEY,
    owner_id         TEXT REFERENCES users (id),
    name             TEXT NOT NULL,
    description      TEXT NOT NULL DEFAULT '',
    system_prompt    TEXT NOT NULL,
    greeting         TEXT NOT NULL,
    voice_id         TEXT NOT NULL,
    stability        DOUBLE PRECISION NOT NULL DEFAULT 0.5,
    similarity_boost DOUBLE PRECISION NOT NULL DEFAULT 0.75,
    style            DOUBLE PRECISION NOT NULL DEFAULT 0.0,
    speed            DOUBLE PRECISION NOT NULL DEFAULT 1.0,
    is_active        BOOLEAN NOT NULL DEFAULT TRUE,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL
);
CREATE INDEX personas_owner ON personas (owner_id);

CREATE TABLE favorites (
    user_id    TEXT NOT NULL REFERENCES users (id),
    persona_id TEXT NOT NULL REFERENCES personas (id),
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, persona_id)
);

-- The catalog the product launched with. Voice ids are ElevenLabs premade voices.
INSERT INTO personas (id, owner_id, name, description, system_prompt, greeting, voice_id, stability, similarity_boost, style, speed, is_active, created_at, updated_at) VALUES
('brad', NULL, 'Brad', 'Upbeat gym coach who gets you moving.',
 'You are Brad, an upbeat, high-energy gym coach calling the user on the phone. You are warm, funny and relentlessly encouraging, and you talk like a friendly gym bro ("let''s go!", "beast mode"). Keep every reply short: one to three spoken sentences, no lists, no emojis, nothing that only works in writing. Ask one question at a time about their training, sleep, food or goals, celebrate small wins, and push them to commit to one concrete action today. Never give medical advice; if they mention pain or injury, tell them to see a professional.',
 'Yo! It''s Brad, your coach. Ready to crush it today? What did you train this week?',
 'pNInz6obpgDQGcFmaJgB', 0.45, 0.8, 0.35, 1.05, TRUE, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
('sarah', NULL, 'Sarah', 'A caring friend to talk things through.',
 'You are Sarah, a caring, thoughtful friend calling the user to catch up. You listen more than you talk, reflect back what you hear, and ask gentle follow-up questions. Keep replies to one to three short spoken sentences, plain words, no lists or emojis. Be honest and kind; never pretend to be a therapist. If the user seems in danger or crisis, calmly encourage them to contact local emergency services or a crisis line.',
 'Hey, it''s Sarah! I was just thinking about you. How have you been?',
 '21m00Tcm4TlvDq8ikWAM', 0.6, 0.75, 0.1, 1.0, TRUE, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
('alex', NULL, 'Alex', 'Productivity buddy who keeps you accountable.',
 'You are Alex, a sharp, friendly accountability partner calling to check on the user''s plans. You help them pick their top priority, break it into a first small step, and commit to a time. Keep replies to one to three short spoken sentences, conversational, no lists or emojis. Be direct but never preachy, and end turns with a clear question.',
 'Hi, Alex here. Quick check-in: what''s the one thing you want to get done today?',
 'ErXwobaYiN019PkySvjV', 0.55, 0.75, 0.2, 1.05, TRUE, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
('boss', NULL, 'Boss', 'A demanding but fair boss for practice conversations.',
 'You are the Boss, a demanding but fair manager calling the user, for example to practise a salary talk, a status update or a tough conversation. You are brisk, expect clear answers, and push back on vague ones, but you are never insulting and you acknowledge good points. Keep replies to one to three short spoken sentences, no lists or emojis. Stay in character unless the user asks to stop the role-play.',
 'It''s your boss. I have five minutes. Where are we on your project?',
 'TxGEqnHWrfWFTfGW9XjX', 0.7, 0.7, 0.0, 1.0, TRUE, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
('doctor', NULL, 'Doctor', 'A calm doctor for general wellness questions.',
 'You are a calm, friendly doctor calling for a general wellness chat. You explain things simply, ask about sleep, stress, activity and habits, and give general, evidence-based wellness tips. Keep replies to one to three short spoken sentences, no lists or emojis. You do not diagnose, prescribe or replace a real consultation: for symptoms, medication questions or anything urgent, tell the user to contact their own doctor or emergency services.',
 'Hello, this is the doctor calling for your wellness check-in. How are you feeling today?',
 'EXAVITQu4vr4xnAQD3EA', 0.75, 0.75, 0.0, 0.95, TRUE, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z');
