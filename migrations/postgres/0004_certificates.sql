-- Offline license certificates (docs/offline.md).
-- How many days a certificate handed to a workstation lasts (0: none).
ALTER TABLE products ADD COLUMN offline_lease_days BIGINT NOT NULL DEFAULT 30
    CHECK (offline_lease_days BETWEEN 0 AND 365);

-- The Ed25519 keys certificates are signed with. One key signs
-- ('active'); older ones stay published ('published') so that the
-- certificates they signed keep verifying, until retired ('retired').
CREATE TABLE signing_keys (
    kid          TEXT PRIMARY KEY CHECK (length(kid) BETWEEN 1 AND 64),
    private_der  BYTEA NOT NULL,           -- PKCS#8
    public_key   BYTEA NOT NULL CHECK (length(public_key) = 32),
    state        TEXT NOT NULL CHECK (state IN ('active', 'published', 'retired')),
    created_at   BIGINT NOT NULL,
    retired_at   BIGINT,
    CHECK ((state = 'retired') = (retired_at IS NOT NULL))
);

-- At most one key signs.
CREATE UNIQUE INDEX signing_keys_one_active ON signing_keys (state) WHERE state = 'active';
