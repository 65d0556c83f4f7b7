-- 0006: logins that spare the owner, refunds that arrive before their purchase, and
-- disputes (SQLite / D1 dialect). Kept in step with
-- migrations/postgres/0006_money_and_logins.sql.

-- The address the account last signed in from: never slowed down when strangers fail
-- logins on the account (cmb_core::limits).
ALTER TABLE users ADD COLUMN last_login_ip TEXT;

-- A refund or dispute names its charge's PaymentIntent. A refund seen before its
-- purchase was fulfilled stays pending (purchase_id NULL, nothing taken) and is netted
-- out of the grant when the purchase is fulfilled.
ALTER TABLE payment_refunds ADD COLUMN payment_intent TEXT;
CREATE INDEX payment_refunds_payment_intent ON payment_refunds (payment_intent);

-- When Stripe reported a dispute on the purchase's charge (its credits were taken back).
ALTER TABLE purchases ADD COLUMN disputed_at TEXT;

-- The AI disclosure is spoken on the first call that reaches a number: looked up by number.
CREATE INDEX calls_phone_number ON calls (phone_number);
