-- licensd schema (PostgreSQL). Times are BIGINT microseconds since the Unix
-- epoch (UTC), as in the SQLite schema, so both backends share their queries.
-- Every invariant the rules state is backed here as the last line of defence.

CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);

CREATE TABLE products (
    code                 TEXT PRIMARY KEY
                         CHECK (code ~ '^[A-Z0-9]{2,8}$' AND strpos(code, 'PRO') = 0 AND strpos(code, 'NFR') = 0),
    display_name         TEXT NOT NULL,
    latest_version       TEXT NOT NULL DEFAULT '',
    personal_terms       TEXT NOT NULL,
    business_terms       TEXT NOT NULL,
    grace_period_months  BIGINT NOT NULL CHECK (grace_period_months BETWEEN 0 AND 24),
    renewal_basis        TEXT NOT NULL CHECK (renewal_basis IN ('FROM_EXPIRY', 'FROM_NOW_IF_EXPIRED')),
    created_at           BIGINT NOT NULL,
    updated_at           BIGINT NOT NULL
);

CREATE TABLE licenses (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    license_key   TEXT NOT NULL UNIQUE,
    product_code  TEXT NOT NULL REFERENCES products(code),
    edition       TEXT NOT NULL CHECK (edition IN ('PERSONAL', 'BUSINESS')),
    kind          TEXT NOT NULL CHECK (kind IN ('STANDARD', 'PROMO', 'NFR')),
    seats         BIGINT NOT NULL CHECK (seats >= 1),
    seats_used    BIGINT NOT NULL DEFAULT 0 CHECK (seats_used >= 0 AND seats_used <= seats),
    term_years    BIGINT NOT NULL CHECK (term_years BETWEEN 1 AND 3),
    status        TEXT NOT NULL CHECK (status IN ('ACTIVE', 'SUSPENDED', 'REVOKED')),
    starts_at     BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL CHECK (expires_at > starts_at),
    renewal_count BIGINT NOT NULL DEFAULT 0 CHECK (renewal_count >= 0),
    order_ref     TEXT NOT NULL DEFAULT '',
    customer_ref  TEXT NOT NULL DEFAULT '',
    reseller      TEXT NOT NULL DEFAULT '',
    created_at    BIGINT NOT NULL,
    CHECK ((kind = 'STANDARD') = (strpos(license_key, 'PRO') = 0 AND strpos(license_key, 'NFR') = 0)),
    CHECK (kind <> 'PROMO' OR strpos(license_key, 'PRO') > 0),
    CHECK (kind <> 'NFR' OR strpos(license_key, 'NFR') > 0),
    CHECK (edition = 'BUSINESS' OR term_years <= 2)
);

CREATE INDEX licenses_expiry ON licenses (expires_at, id);
CREATE INDEX licenses_product ON licenses (product_code, expires_at, id);
CREATE INDEX licenses_customer ON licenses (customer_ref, expires_at, id);
CREATE INDEX licenses_order ON licenses (order_ref, expires_at, id);

CREATE TABLE activations (
    license_id     BIGINT NOT NULL REFERENCES licenses(id),
    fingerprint    TEXT NOT NULL CHECK (length(fingerprint) BETWEEN 1 AND 256),
    hostname       TEXT NOT NULL DEFAULT '',
    client_version TEXT NOT NULL DEFAULT '',
    activated_at   BIGINT NOT NULL,
    PRIMARY KEY (license_id, fingerprint)
);

-- seats_used mirrors COUNT(activations); its CHECK bounds it by seats (R7).
CREATE FUNCTION activations_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE licenses SET seats_used = seats_used + 1 WHERE id = NEW.license_id;
        RETURN NEW;
    ELSE
        UPDATE licenses SET seats_used = seats_used - 1 WHERE id = OLD.license_id;
        RETURN OLD;
    END IF;
END;
$$;
CREATE TRIGGER activations_count AFTER INSERT OR DELETE ON activations
    FOR EACH ROW EXECUTE FUNCTION activations_count();

CREATE TABLE renewal_codes (
    id                   TEXT PRIMARY KEY,
    code_hash            BYTEA NOT NULL UNIQUE,
    product_code         TEXT NOT NULL REFERENCES products(code),
    edition              TEXT NOT NULL CHECK (edition IN ('PERSONAL', 'BUSINESS')),
    seats                BIGINT NOT NULL CHECK (seats >= 1),
    term_years           BIGINT NOT NULL CHECK (term_years BETWEEN 1 AND 3),
    state                TEXT NOT NULL CHECK (state IN ('UNREDEEMED', 'REDEEMED', 'VOID')),
    issued_at            BIGINT NOT NULL,
    redeemed_at          BIGINT,
    redeemed_license_id  BIGINT REFERENCES licenses(id),
    voided_at            BIGINT,
    void_reason          TEXT NOT NULL DEFAULT '',
    order_ref            TEXT NOT NULL DEFAULT '',
    reseller             TEXT NOT NULL DEFAULT '',
    CHECK ((state = 'REDEEMED') = (redeemed_at IS NOT NULL AND redeemed_license_id IS NOT NULL)),
    CHECK ((state = 'VOID') = (voided_at IS NOT NULL))
);

-- A code leaves UNREDEEMED at most once.
CREATE FUNCTION renewal_codes_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state <> 'UNREDEEMED' AND NEW.state IS DISTINCT FROM OLD.state THEN
        RAISE EXCEPTION 'renewal code state is final';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER renewal_codes_final BEFORE UPDATE OF state ON renewal_codes
    FOR EACH ROW EXECUTE FUNCTION renewal_codes_final();

CREATE TABLE license_events (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    license_id      BIGINT NOT NULL REFERENCES licenses(id),
    type            TEXT NOT NULL CHECK (type IN ('issued', 'activated', 'deactivated', 'renewed',
                                                  'renewal_refused', 'suspended', 'reinstated', 'revoked')),
    at              BIGINT NOT NULL,
    actor           TEXT NOT NULL,
    fingerprint     TEXT NOT NULL DEFAULT '',
    old_expires_at  BIGINT,
    new_expires_at  BIGINT,
    renewal_code_id TEXT REFERENCES renewal_codes(id),
    refusal_reason  TEXT NOT NULL DEFAULT '',
    detail          TEXT NOT NULL DEFAULT '',
    CHECK (type <> 'renewed' OR (renewal_code_id IS NOT NULL AND new_expires_at > old_expires_at)),
    CHECK (type <> 'renewal_refused' OR refusal_reason <> '')
);

CREATE INDEX license_events_by_license ON license_events (license_id, id);
CREATE UNIQUE INDEX license_events_one_renewal_per_code ON license_events (renewal_code_id)
    WHERE type = 'renewed';

CREATE TABLE idempotency_keys (
    request_id   TEXT PRIMARY KEY,
    operation    TEXT NOT NULL,
    payload_hash BYTEA NOT NULL,
    resource     TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);
