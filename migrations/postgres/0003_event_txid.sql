-- The transaction that wrote each history event, so that every replica's
-- validation cache can poll the events without missing one whose sequence
-- id was taken before, but committed after, an event it has already seen
-- (see src/store/cache_feed.rs).
ALTER TABLE license_events ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX license_events_by_txid ON license_events (txid);
