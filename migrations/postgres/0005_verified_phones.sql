-- 0005: verified phone numbers (PostgreSQL dialect). Kept in step with
-- migrations/d1/0005_verified_phones.sql.
--
-- A user's phone_number is only ever dialled once phone_verified is set: Twilio Verify
-- proved the account holds that phone.
ALTER TABLE users ADD COLUMN phone_verified BOOLEAN NOT NULL DEFAULT FALSE;

-- Every number ever verified, by anyone. The free credits go with the number, once:
-- to the first account that verified it, claimed by the grant's ledger id.
CREATE TABLE verified_phones (
    phone_number  TEXT PRIMARY KEY,
    first_user_id TEXT NOT NULL REFERENCES users (id),
    -- The credit_ledger id of the free-credits grant; NULL until it is made.
    credited_by   TEXT,
    verified_at   TIMESTAMPTZ NOT NULL
);
