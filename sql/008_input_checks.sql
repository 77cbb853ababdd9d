-- Producers write webhook_outbox with plain SQL, so the table itself refuses an event id the
-- dispatcher could never send: it goes out as the webhook-id header, where a control character
-- (line breaks, tab, DEL, C1) fails every attempt until the event ages out. The producer's own
-- INSERT fails instead, naming this constraint.
--
-- NOT VALID first, then VALIDATE in a block of its own: the rows written before this migration
-- are checked once (a scan of the outbox, which retention keeps short, under the migration's
-- table lock), and if an old row breaks the rule the constraint stays NOT VALID (every new or
-- updated row is still checked) and the migration goes on, so an upgrade never stops on old
-- data. Those old rows fail at the attempt with their own reason, as before.
ALTER TABLE webhook_outbox
    ADD CONSTRAINT webhook_outbox_event_id_printable
    CHECK (event_id !~ '[\x01-\x1f\x7f-\x9f]') NOT VALID;

DO $$
BEGIN
    ALTER TABLE webhook_outbox VALIDATE CONSTRAINT webhook_outbox_event_id_printable;
EXCEPTION WHEN check_violation THEN
    RAISE WARNING 'webhook_outbox has event ids with control characters written before this '
                  'migration; new rows are checked, old ones are left as they are';
END
$$;
