-- Bearer tokens for the billing and support APIs. Only the SHA-256 of a
-- token's secret is stored; the id finds the row.
CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
    role        TEXT NOT NULL CHECK (role IN ('admin', 'billing', 'support')),
    secret_hash BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
) STRICT;

-- A name belongs to one live token; a revoked name may be reused.
CREATE UNIQUE INDEX api_tokens_live_name ON api_tokens (name) WHERE revoked_at IS NULL;
