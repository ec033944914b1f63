-- licensd schema (SQLite). Times are INTEGER microseconds since the Unix epoch (UTC).
-- Every invariant the rules state is backed here as the last line of defence.

CREATE TABLE settings (
    name  TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) STRICT;

CREATE TABLE products (
    code                 TEXT PRIMARY KEY NOT NULL
                         CHECK (length(code) BETWEEN 2 AND 8 AND code NOT GLOB '*[^A-Z0-9]*'
                                AND instr(code, 'PRO') = 0 AND instr(code, 'NFR') = 0),
    display_name         TEXT NOT NULL,
    latest_version       TEXT NOT NULL DEFAULT '',
    personal_terms       TEXT NOT NULL,   -- comma-separated years, e.g. "1,2"
    business_terms       TEXT NOT NULL,
    grace_period_months  INTEGER NOT NULL CHECK (grace_period_months BETWEEN 0 AND 24),
    renewal_basis        TEXT NOT NULL CHECK (renewal_basis IN ('FROM_EXPIRY', 'FROM_NOW_IF_EXPIRED')),
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
) STRICT;

CREATE TABLE licenses (
    id            INTEGER PRIMARY KEY,
    license_key   TEXT NOT NULL UNIQUE,   -- normalised, without dashes
    product_code  TEXT NOT NULL REFERENCES products(code),
    edition       TEXT NOT NULL CHECK (edition IN ('PERSONAL', 'BUSINESS')),
    kind          TEXT NOT NULL CHECK (kind IN ('STANDARD', 'PROMO', 'NFR')),
    seats         INTEGER NOT NULL CHECK (seats >= 1),
    seats_used    INTEGER NOT NULL DEFAULT 0 CHECK (seats_used >= 0 AND seats_used <= seats),
    term_years    INTEGER NOT NULL CHECK (term_years BETWEEN 1 AND 3),
    status        TEXT NOT NULL CHECK (status IN ('ACTIVE', 'SUSPENDED', 'REVOKED')),
    starts_at     INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL CHECK (expires_at > starts_at),
    renewal_count INTEGER NOT NULL DEFAULT 0 CHECK (renewal_count >= 0),
    order_ref     TEXT NOT NULL DEFAULT '',
    customer_ref  TEXT NOT NULL DEFAULT '',
    reseller      TEXT NOT NULL DEFAULT '',
    created_at    INTEGER NOT NULL,
    -- A STANDARD key never carries a kind marker; PROMO/NFR keys always do (R9).
    CHECK ((kind = 'STANDARD') = (instr(license_key, 'PRO') = 0 AND instr(license_key, 'NFR') = 0)),
    CHECK (kind <> 'PROMO' OR instr(license_key, 'PRO') > 0),
    CHECK (kind <> 'NFR' OR instr(license_key, 'NFR') > 0),
    CHECK (edition = 'BUSINESS' OR term_years <= 2)
) STRICT;

CREATE INDEX licenses_expiry ON licenses (expires_at, id);
CREATE INDEX licenses_product ON licenses (product_code, expires_at, id);
CREATE INDEX licenses_customer ON licenses (customer_ref, expires_at, id);
CREATE INDEX licenses_order ON licenses (order_ref, expires_at, id);

-- One row per bound workstation; a fingerprint is bound to a license at most once.
CREATE TABLE activations (
    license_id     INTEGER NOT NULL REFERENCES licenses(id),
    fingerprint    TEXT NOT NULL CHECK (length(fingerprint) BETWEEN 1 AND 256),
    hostname       TEXT NOT NULL DEFAULT '',
    client_version TEXT NOT NULL DEFAULT '',
    activated_at   INTEGER NOT NULL,
    PRIMARY KEY (license_id, fingerprint)
) STRICT, WITHOUT ROWID;

-- seats_used mirrors COUNT(activations) and its CHECK bounds it by seats (R7):
-- these triggers keep the mirror exact whatever statement touches activations.
CREATE TRIGGER activations_count_insert AFTER INSERT ON activations BEGIN
    UPDATE licenses SET seats_used = seats_used + 1 WHERE id = NEW.license_id;
END;
CREATE TRIGGER activations_count_delete AFTER DELETE ON activations BEGIN
    UPDATE licenses SET seats_used = seats_used - 1 WHERE id = OLD.license_id;
END;

CREATE TABLE renewal_codes (
    id                   TEXT PRIMARY KEY NOT NULL,          -- public id
    code_hash            BLOB NOT NULL UNIQUE,               -- SHA-256 of the normalised code
    product_code         TEXT NOT NULL REFERENCES products(code),
    edition              TEXT NOT NULL CHECK (edition IN ('PERSONAL', 'BUSINESS')),
    seats                INTEGER NOT NULL CHECK (seats >= 1),
    term_years           INTEGER NOT NULL CHECK (term_years BETWEEN 1 AND 3),
    state                TEXT NOT NULL CHECK (state IN ('UNREDEEMED', 'REDEEMED', 'VOID')),
    issued_at            INTEGER NOT NULL,
    redeemed_at          INTEGER,
    redeemed_license_id  INTEGER REFERENCES licenses(id),
    voided_at            INTEGER,
    void_reason          TEXT NOT NULL DEFAULT '',
    order_ref            TEXT NOT NULL DEFAULT '',
    reseller             TEXT NOT NULL DEFAULT '',
    CHECK ((state = 'REDEEMED') = (redeemed_at IS NOT NULL AND redeemed_license_id IS NOT NULL)),
    CHECK ((state = 'VOID') = (voided_at IS NOT NULL))
) STRICT;

-- A code leaves UNREDEEMED at most once: no statement may move it back or on.
CREATE TRIGGER renewal_codes_final BEFORE UPDATE OF state ON renewal_codes
WHEN OLD.state <> 'UNREDEEMED' BEGIN
    SELECT RAISE(ABORT, 'renewal code state is final');
END;

CREATE TABLE license_events (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    license_id      INTEGER NOT NULL REFERENCES licenses(id),
    type            TEXT NOT NULL CHECK (type IN ('issued', 'activated', 'deactivated', 'renewed',
                                                  'renewal_refused', 'suspended', 'reinstated', 'revoked')),
    at              INTEGER NOT NULL,
    actor           TEXT NOT NULL,
    fingerprint     TEXT NOT NULL DEFAULT '',
    old_expires_at  INTEGER,
    new_expires_at  INTEGER,
    renewal_code_id TEXT REFERENCES renewal_codes(id),
    refusal_reason  TEXT NOT NULL DEFAULT '',
    detail          TEXT NOT NULL DEFAULT '',
    CHECK (type <> 'renewed' OR (renewal_code_id IS NOT NULL AND new_expires_at > old_expires_at)),
    CHECK (type <> 'renewal_refused' OR refusal_reason <> '')
) STRICT;

CREATE INDEX license_events_by_license ON license_events (license_id, id);
-- One redemption per code (R4).
CREATE UNIQUE INDEX license_events_one_renewal_per_code ON license_events (renewal_code_id)
    WHERE type = 'renewed';

-- Idempotency keys of billing mutations: the first request's payload digest
-- and the resource it produced.
CREATE TABLE idempotency_keys (
    request_id   TEXT PRIMARY KEY NOT NULL,
    operation    TEXT NOT NULL,
    payload_hash BLOB NOT NULL,
    resource     TEXT NOT NULL,
    created_at   INTEGER NOT NULL
) STRICT;
