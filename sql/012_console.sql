-- 012: recent-attempt windows for the operator console (delivered/failed per minute, failure
-- ratio per subscription).
-- Append-only: never edit a migration that has shipped; add the next number instead.
--
-- Attempts are appended in roughly started_at order, so a BRIN index answers "the last N
-- minutes" by reading only the newest block ranges. It costs almost nothing on the hot insert
-- path (one summary per 128 pages, updated lazily), unlike a btree. Retention deletes old rows
-- and new rows may land in the freed space; such ranges widen and get read too, which costs
-- time but never correctness.
CREATE INDEX webhook_attempts_started_brin ON webhook_attempts USING brin (started_at);

-- The delivery listing's creation-time filters. Deliveries are inserted in created_at order
-- and created_at never changes, so the same holds; a range whose rows moved on update
-- (state changes are not HOT: state is indexed) only widens, costing reads, never results.
CREATE INDEX webhook_deliveries_created_brin ON webhook_deliveries USING brin (created_at);
