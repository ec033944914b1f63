-- The event feed (src/store/event_feed.rs) delivers events in id order, and
-- only up to an id below which no event can still appear. It learns that
-- bound from the id sequence and transaction ids, which holds only if a
-- transaction has its transaction id before it takes an event id. An
-- identity column takes its id before any other default is evaluated, so
-- the id now comes from a function that first makes sure the transaction
-- has its transaction id.
DO $$
DECLARE
    next_id BIGINT;
BEGIN
    -- The identity's sequence may be ahead of the table (rolled-back
    -- writes): keep its position so that no id is ever taken twice.
    SELECT GREATEST(
               COALESCE((SELECT MAX(id) FROM license_events), 0),
               COALESCE(pg_sequence_last_value(pg_get_serial_sequence('license_events', 'id')::regclass), 0)
           ) + 1
      INTO next_id;
    ALTER TABLE license_events ALTER COLUMN id DROP IDENTITY;
    CREATE SEQUENCE license_events_id_seq OWNED BY license_events.id;
    PERFORM setval('license_events_id_seq', next_id, false);
END
$$;

CREATE FUNCTION licensd_next_event_id() RETURNS BIGINT
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_current_xact_id();
    RETURN nextval('license_events_id_seq');
END;
$$;

ALTER TABLE license_events ALTER COLUMN id SET DEFAULT licensd_next_event_id();

-- The feed's reading: the last event id taken so far, then (in this order)
-- a transaction id above that of every transaction that took one of those
-- ids. Once every transaction below `xid_bound` has finished (a later
-- snapshot's xmin has reached it), every id up to `last_id` is final.
-- (A snapshot's xmax is no such bound: a transaction that has its id but
-- started after the last one to finish lies above xmax and is not listed.)
CREATE FUNCTION licensd_event_bound(OUT last_id BIGINT, OUT xid_bound BIGINT)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    last_id := COALESCE(pg_sequence_last_value('license_events_id_seq'::regclass), 0);
    xid_bound := pg_current_xact_id()::text::bigint + 1;
END;
$$;
