-- 0003: payments (Stripe Checkout), refunds, the admin audit log and exact limits
-- (Postgres dialect). Kept in step with migrations/d1/0003_payments_admin.sql: same
-- tables, same columns, Postgres-native types (timestamptz, bigint, jsonb).

CREATE TABLE purchases (
    id             text PRIMARY KEY,
    user_id        text NOT NULL REFERENCES users (id),
    pack           text NOT NULL,
    credits        bigint NOT NULL CHECK (credits > 0),
    amount_cents   bigint NOT NULL CHECK (amount_cents >= 0),
    currency       text NOT NULL,
    status         text NOT NULL CHECK (status IN ('open', 'paid', 'failed', 'expired', 'refunded')),
    payment_intent text,
    refunded_cents bigint NOT NULL DEFAULT 0 CHECK (refunded_cents >= 0),
    created_at     timestamptz NOT NULL,
    paid_at        timestamptz,
    updated_at     timestamptz NOT NULL
);
CREATE INDEX purchases_user ON purchases (user_id, created_at);
CREATE INDEX purchases_payment_intent ON purchases (payment_intent);
CREATE INDEX purchases_paid_at ON purchases (paid_at);

CREATE TABLE stripe_events (
    id          text PRIMARY KEY,
    type        text NOT NULL,
    object_id   text,
    outcome     text NOT NULL,
    received_at timestamptz NOT NULL
);

CREATE TABLE payment_refunds (
    id             text PRIMARY KEY,
    charge_id      text NOT NULL,
    purchase_id    text,
    user_id        text NOT NULL REFERENCES users (id),
    refunded_cents bigint NOT NULL CHECK (refunded_cents >= 0),
    credits_due    bigint NOT NULL CHECK (credits_due >= 0),
    credits_taken  bigint NOT NULL CHECK (credits_taken >= 0),
    created_at     timestamptz NOT NULL,
    CHECK (credits_taken <= credits_due)
);
CREATE INDEX payment_refunds_user ON payment_refunds (user_id);
CREATE INDEX payment_refunds_created ON payment_refunds (created_at);

CREATE TABLE audit_log (
    id          text PRIMARY KEY,
    actor_id    text,
    actor       text NOT NULL,
    action      text NOT NULL,
    target_type text NOT NULL,
    target_id   text,
    before_json jsonb,
    after_json  jsonb,
    reason      text,
    created_at  timestamptz NOT NULL
);
CREATE INDEX audit_log_created ON audit_log (created_at);
CREATE INDEX audit_log_target ON audit_log (target_type, target_id);

CREATE TABLE rate_limits (
    key          text NOT NULL,
    window_start bigint NOT NULL,
    count        bigint NOT NULL,
    PRIMARY KEY (key, window_start)
);
CREATE INDEX rate_limits_window ON rate_limits (window_start);

CREATE TABLE call_day_counts (
    user_id text NOT NULL REFERENCES users (id),
    day     date NOT NULL,
    count   bigint NOT NULL,
    cap     bigint NOT NULL,
    PRIMARY KEY (user_id, day),
    CONSTRAINT calls_per_day_cap CHECK (count <= cap)
);
