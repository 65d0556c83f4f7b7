-- 0004: the first version's persona profile fields, kept for its clients (SQLite / D1
-- dialect). Kept in step with migrations/postgres/0004_persona_profile.sql.
-- NULL: not set.
ALTER TABLE personas ADD COLUMN avatar_url TEXT;
ALTER TABLE personas ADD COLUMN category TEXT;
