-- 0004: the first version's persona profile fields, kept for its clients (PostgreSQL
-- dialect). Kept in step with migrations/d1/0004_persona_profile.sql.
-- NULL: not set.
ALTER TABLE personas ADD COLUMN avatar_url TEXT;
ALTER TABLE personas ADD COLUMN category TEXT;
