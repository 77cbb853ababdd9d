-- 012: the creation-time filters of the delivery listing (console and /v1).
-- Append-only: never edit a migration that has shipped; add the next number instead.
--
-- Deliveries are inserted in created_at order and created_at never changes, so a BRIN index
-- answers a time range by reading only the block ranges that can hold it, at almost no cost
-- on the hot insert path (one summary per 128 pages, unlike a btree entry per row). Rows that
-- move on update (state changes are not HOT: state is indexed) widen their new range; that
-- costs reads, never results.
CREATE INDEX webhook_deliveries_created_brin ON webhook_deliveries USING brin (created_at);
