-- 0003: payments (Stripe Checkout), refunds, the admin audit log and exact limits
-- (SQLite / D1 dialect). Kept in step with migrations/postgres/0003_payments_admin.sql.
--
-- Credits still move only through credit_ledger + users.credits (0001); the tables here
-- record why money moved and make every Stripe delivery idempotent.

-- One row per Stripe Checkout Session we created (status 'open'), or first learned of
-- from a webhook. The session id is the natural key: a session is granted at most once
-- (its ledger key is 'stripe:session:<id>').
CREATE TABLE purchases (
    id             TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL REFERENCES users (id),
    pack           TEXT NOT NULL,
    credits        INTEGER NOT NULL CHECK (credits > 0),
    -- What the customer paid, in the currency's minor unit (cents).
    amount_cents   INTEGER NOT NULL CHECK (amount_cents >= 0),
    currency       TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('open', 'paid', 'failed', 'expired', 'refunded')),
    payment_intent TEXT,
    -- Cumulative amount refunded (Stripe's charge.amount_refunded), never decreasing.
    refunded_cents INTEGER NOT NULL DEFAULT 0 CHECK (refunded_cents >= 0),
    created_at     TEXT NOT NULL,
    paid_at        TEXT,
    updated_at     TEXT NOT NULL
);
CREATE INDEX purchases_user ON purchases (user_id, created_at);
CREATE INDEX purchases_payment_intent ON purchases (payment_intent);
CREATE INDEX purchases_paid_at ON purchases (paid_at);

-- Every Stripe event we acted on (or deliberately ignored), by event id: a redelivered
-- event finds its row and changes nothing.
CREATE TABLE stripe_events (
    id          TEXT PRIMARY KEY,
    type        TEXT NOT NULL,
    object_id   TEXT,
    outcome     TEXT NOT NULL,
    received_at TEXT NOT NULL
);

-- One row per refund step of a charge ('<charge id>:<cumulative amount_refunded>').
-- credits_due is what the refunded money bought; credits_taken is what the balance could
-- give back (the balance never goes negative); the difference is the user's debt.
CREATE TABLE payment_refunds (
    id             TEXT PRIMARY KEY,
    charge_id      TEXT NOT NULL,
    purchase_id    TEXT,
    user_id        TEXT NOT NULL REFERENCES users (id),
    refunded_cents INTEGER NOT NULL CHECK (refunded_cents >= 0),
    credits_due    INTEGER NOT NULL CHECK (credits_due >= 0),
    credits_taken  INTEGER NOT NULL CHECK (credits_taken >= 0),
    created_at     TEXT NOT NULL,
    CHECK (credits_taken <= credits_due)
);
CREATE INDEX payment_refunds_user ON payment_refunds (user_id);
CREATE INDEX payment_refunds_created ON payment_refunds (created_at);

-- Admin actions and money movements: who (actor), what (action on a target), when, and
-- the state before and after as JSON. Written in the same batch as the change itself.
CREATE TABLE audit_log (
    id          TEXT PRIMARY KEY,
    -- The acting user; NULL for system actors such as Stripe.
    actor_id    TEXT,
    -- Human-readable actor: the admin's email, or 'stripe'.
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target_type TEXT NOT NULL,
    target_id   TEXT,
    before_json TEXT,
    after_json  TEXT,
    reason      TEXT,
    created_at  TEXT NOT NULL
);
CREATE INDEX audit_log_created ON audit_log (created_at);
CREATE INDEX audit_log_target ON audit_log (target_type, target_id);

-- Fixed-window request counters (auth brute-force limits). Exact: one upsert returns the
-- new count. window_start is Unix seconds.
CREATE TABLE rate_limits (
    key          TEXT NOT NULL,
    window_start INTEGER NOT NULL,
    count        INTEGER NOT NULL,
    PRIMARY KEY (key, window_start)
);
CREATE INDEX rate_limits_window ON rate_limits (window_start);

-- Calls triggered per user per UTC day. The counter is bumped in the same batch as the
-- call insert; the named CHECK aborts the whole batch once the tier's cap is reached.
-- `cap` is rewritten on every bump, so a tier change applies at once.
CREATE TABLE call_day_counts (
    user_id TEXT NOT NULL REFERENCES users (id),
    day     TEXT NOT NULL,
    count   INTEGER NOT NULL,
    cap     INTEGER NOT NULL,
    PRIMARY KEY (user_id, day),
    CONSTRAINT calls_per_day_cap CHECK (count <= cap)
);
