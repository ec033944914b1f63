-- A customer's or an order's licenses are listed by walking the index of
-- their reference and sorting the few found by expiry, instead of keeping
-- the expiry in both indexes: a renewal (which moves expires_at) then
-- changes two indexes fewer. Listings by product or by expiry alone, which
-- may cover most licenses, still walk an index in expiry order.
DROP INDEX licenses_customer;
CREATE INDEX licenses_customer ON licenses (customer_ref, id);
DROP INDEX licenses_order;
CREATE INDEX licenses_order ON licenses (order_ref, id);
