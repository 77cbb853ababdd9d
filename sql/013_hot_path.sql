-- 013: less database work per delivery on the hot path (route → claim → ack + attempt row).
-- Append-only: never edit a migration that has shipped; add the next number instead.
--
-- Every state change of a delivery is a non-HOT update (state is indexed), so each claim and
-- each ack writes one entry into every index whose predicate the new row version matches,
-- and every UPDATE statement runs the statement-level triggers on its transition tables.
-- Profiling the claim/ack loop (perf and callgrind on the backend) put about a quarter of
-- its work in index inserts and a fifth in those triggers, and found plans that read far
-- more rows than they touch. This migration keeps every guarantee of 004, 007 and 011:
--
-- 1. Indexes that only management reads use, kept off the two hot transitions
--    (pending → in_flight, in_flight → delivered):
--    * webhook_deliveries_state (state, subscription_id) took an entry at both. It served the
--      delivery listing filtered by state, newest first, which it could not return in id
--      order anyway. Replaced by (state, id) for the states a listing looks for by state:
--      keyset order straight from the index. in_flight is listed from
--      webhook_deliveries_in_flight (bounded by max_in_flight), delivered (the bulk of the
--      table) from the primary key backwards.
--    * webhook_deliveries_oldest took an entry at every claim. It now covers the queued
--      states only; the oldest-undelivered gauges add the in-flight rows through
--      webhook_deliveries_in_flight (at most max_in_flight per subscription).
-- 2. The attempt log's foreign key checked every logged attempt with a query of its own (a
--    tenth of the work per delivery). The ack logs attempts only for deliveries that exist
--    (it checks in the same statement, and holds the row lock of every applied one), so the
--    check is dropped; what the key also did, deleting a delivery's attempts with it, a
--    statement trigger on the deliveries now does, for every DELETE (retention, a deleted
--    subscription or event cascading) and TRUNCATE.
-- 3. The ack finds its rows by primary key. Its generic plan read every in-flight row of
--    every subscription through webhook_deliveries_in_flight (the partial index matched its
--    state = 'in_flight' test and was estimated at one row) and joined the arguments to each
--    of them: with 100 requests on the wire and 10 acks, 1000 joined rows per ack, a cost
--    that grew with the traffic, not with the acks.
-- 4. One statement trigger for UPDATE instead of two (004's counts and 011's dead-letter
--    announcements read the same transition tables): one function call, and the counting
--    is one statement plus the in_flight_count update, whose explicit ordered row lock is
--    only needed when a statement touches several subscriptions.
-- 5. No sequential scans of webhook_subscriptions in the claim and in that trigger. They
--    find a handful of subscriptions by id, but on a table of a few hundred rows the planner
--    prefers reading every row (and every dead version the counters' updates leave) on each
--    statement: with 200 subscriptions, a fifth of the database work per delivery. The
--    setting is scoped to those two functions; each of their statements has an index path.

DROP INDEX webhook_deliveries_state;
CREATE INDEX webhook_deliveries_state_id ON webhook_deliveries (state, id)
    WHERE state NOT IN ('in_flight', 'delivered');

DROP INDEX webhook_deliveries_oldest;
CREATE INDEX webhook_deliveries_oldest ON webhook_deliveries (subscription_id, event_created_at)
    WHERE state IN ('pending', 'retrying');

-- The UPDATE trigger: 004/007's counting (see webhook_delivery_count_track for the rules) and
-- 011's dead-letter announcements (webhook_delivery_dead_announce), in one call.
CREATE FUNCTION webhook_delivery_update_track() RETURNS trigger LANGUAGE plpgsql
-- Index probes, never sequential scans (5. above).
SET enable_seqscan = off
AS $$
DECLARE
    v_subs uuid[];
    v_deltas integer[];
    v_dead boolean;
    v_rate bigint;
    v_minute timestamptz;
    v_before bigint[];
BEGIN
    -- Counts: one signed delta per (subscription, state) the statement moved rows between,
    -- and the in_flight part of them for in_flight_count; whether any row is dead now.
    WITH c AS (
        SELECT c.subscription_id, c.state, sum(c.delta) AS delta
        FROM (
            SELECT o.subscription_id, o.state, -1 AS delta FROM old_rows o
            WHERE o.state IN ('pending', 'in_flight', 'retrying', 'dead', 'parked')
            UNION ALL
            SELECT n.subscription_id, n.state, 1 FROM new_rows n
            WHERE n.state IN ('pending', 'in_flight', 'retrying', 'dead', 'parked')
        ) c
        GROUP BY c.subscription_id, c.state
        -- An update that moved no row between states (or as many in as out) adds nothing.
        HAVING sum(c.delta) <> 0
    ), logged AS (
        INSERT INTO webhook_delivery_count_deltas (subscription_id, state, delta)
        SELECT c.subscription_id, c.state, c.delta FROM c
    )
    SELECT array_agg(c.subscription_id ORDER BY c.subscription_id)
               FILTER (WHERE c.state = 'in_flight'),
           array_agg(c.delta::integer ORDER BY c.subscription_id)
               FILTER (WHERE c.state = 'in_flight'),
           EXISTS (SELECT 1 FROM new_rows n WHERE n.state = 'dead')
    INTO v_subs, v_deltas, v_dead
    FROM c;
    IF v_subs IS NOT NULL THEN
        -- Counter rows are locked in subscription-id order (007), so two statements over the
        -- same subscriptions cannot deadlock; a single row needs no ordering.
        IF cardinality(v_subs) > 1 THEN
            PERFORM 1 FROM webhook_subscriptions s WHERE s.id = ANY (v_subs)
            ORDER BY s.id FOR NO KEY UPDATE;
        END IF;
        UPDATE webhook_subscriptions s
        SET in_flight_count = s.in_flight_count + x.delta
        FROM unnest(v_subs, v_deltas) AS x(id, delta)
        WHERE s.id = x.id;
    END IF;

    -- The common case (a claim, a retry, a delivery): nothing died, nothing more to do.
    IF NOT v_dead THEN
        RETURN NULL;
    END IF;

    -- Dead letters, as in 011: count this statement's per subscription; keep what each
    -- counter held before them (its rank in the minute starts there).
    v_rate := coalesce(
        nullif(current_setting('dispatcher.dead_events_per_minute', true), '')::bigint, 60);
    v_minute := date_trunc('minute', now());
    v_subs := NULL;
    WITH dead AS (
        SELECT n.subscription_id
        FROM new_rows n
        JOIN old_rows o ON o.id = n.id
        JOIN webhook_outbox e ON e.id = n.outbox_id
        WHERE n.state = 'dead' AND o.state <> 'dead'
          AND NOT starts_with(e.event_type, 'dispatcher.')
    ), per_sub AS (
        SELECT subscription_id, count(*) AS n FROM dead GROUP BY subscription_id
    ), counted AS (
        INSERT INTO webhook_dead_letter_counts AS c (subscription_id, minute, dead)
        -- In subscription order, so two acks killing deliveries of the same subscriptions
        -- lock their counter rows in the same order (no deadlock).
        SELECT subscription_id, v_minute, n FROM per_sub ORDER BY subscription_id
        ON CONFLICT (subscription_id, minute) DO UPDATE SET dead = c.dead + excluded.dead
        RETURNING c.subscription_id, c.dead
    )
    SELECT array_agg(c.subscription_id), array_agg(c.dead - p.n) INTO v_subs, v_before
    FROM counted c JOIN per_sub p USING (subscription_id);
    IF v_subs IS NULL THEN
        RETURN NULL;  -- only operational events died
    END IF;

    -- Announce the dead letters that fit under this minute's rate, one event each; leave the
    -- rest to the minute's summary (their count and the first few ids).
    PERFORM set_config('dispatcher.emitting', 'on', true);
    WITH ranked AS (
        SELECT n.id, n.subscription_id, n.attempt, n.last_status, n.last_error, e.event_id,
               e.event_type,
               b.before + row_number() OVER (PARTITION BY n.subscription_id ORDER BY n.id)
                   AS pos
        FROM new_rows n
        JOIN old_rows o ON o.id = n.id
        JOIN webhook_outbox e ON e.id = n.outbox_id
        JOIN unnest(v_subs, v_before) AS b(subscription_id, before)
          ON b.subscription_id = n.subscription_id
        WHERE n.state = 'dead' AND o.state <> 'dead'
          AND NOT starts_with(e.event_type, 'dispatcher.')
    ), announced AS (
        INSERT INTO webhook_outbox (event_type, payload, ordering_key)
        SELECT 'dispatcher.delivery.dead',
               dispatcher_event_payload('dispatcher.delivery.dead', jsonb_build_object(
                   'delivery_id', r.id, 'event_id', r.event_id, 'event_type', r.event_type,
                   'subscription_id', r.subscription_id::text, 'attempts', r.attempt,
                   'why', dispatcher_dead_why(r.last_status, r.last_error),
                   'last_status', r.last_status, 'last_error', r.last_error)),
               r.id::text
        FROM ranked r
        WHERE r.pos <= v_rate
        ORDER BY r.id
    )
    UPDATE webhook_dead_letter_counts c
    SET suppressed = c.suppressed + x.n,
        sample_ids = (c.sample_ids || x.ids)[1:10]
    FROM (
        SELECT r.subscription_id, count(*) AS n, (array_agg(r.id ORDER BY r.id))[1:10] AS ids
        FROM ranked r
        WHERE r.pos > v_rate
        GROUP BY r.subscription_id
    ) x
    WHERE c.subscription_id = x.subscription_id AND c.minute = v_minute;
    PERFORM set_config('dispatcher.emitting', '', true);
    RETURN NULL;
END $$;

-- Swapped in one transaction: no UPDATE commits between the old triggers and the new one.
DROP TRIGGER webhook_delivery_dead_announce ON webhook_deliveries;
DROP TRIGGER webhook_delivery_count_update ON webhook_deliveries;
DROP FUNCTION webhook_delivery_dead_announce();
CREATE TRIGGER webhook_delivery_count_update AFTER UPDATE ON webhook_deliveries
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_delivery_update_track();


-- == The attempt log without its foreign key (2. above) ===============================
CREATE FUNCTION webhook_delivery_attempts_cascade() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM webhook_attempts;
    ELSE
        DELETE FROM webhook_attempts a USING old_rows o WHERE a.delivery_id = o.id;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER webhook_delivery_attempts_delete AFTER DELETE ON webhook_deliveries
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_delivery_attempts_cascade();
CREATE TRIGGER webhook_delivery_attempts_truncate AFTER TRUNCATE ON webhook_deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_delivery_attempts_cascade();
ALTER TABLE webhook_attempts DROP CONSTRAINT webhook_attempts_delivery_id_fkey;

-- == The ack by primary key (3. above) ==================================================
-- As in 007 (fenced on the lease token, every attempt logged, applied or not), but the
-- in-flight test compares with a one-row subquery, so the planner cannot turn it into a scan
-- of the in-flight index: each acked row is a primary-key probe.
CREATE OR REPLACE FUNCTION dispatcher_ack(
    p_ids bigint[], p_tokens bigint[], p_states text[], p_delays double precision[],
    p_statuses integer[], p_errors text[], p_attempts integer[], p_started double precision[],
    p_durations_ms double precision[], p_outcomes text[], p_responses text[],
    p_manual boolean[], p_worker text
) RETURNS SETOF bigint LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    RETURN QUERY
    WITH r AS (
        SELECT *
        FROM unnest(p_ids, p_tokens, p_states, p_delays, p_statuses, p_errors, p_attempts,
                    p_started, p_durations_ms, p_outcomes, p_responses, p_manual)
             AS r(id, token, state, delay, status, error, attempt, started, duration_ms,
                  outcome, response, manual)
    ), applied AS (
        UPDATE webhook_deliveries d
        SET state = r.state,
            next_attempt_at = CASE WHEN r.delay IS NULL THEN d.next_attempt_at
                                   ELSE now() + make_interval(secs => r.delay) END,
            leased_until = NULL,
            lease_token = NULL,
            leased_by = NULL,
            last_status = r.status,
            last_error = r.error,
            -- a manual replay is one attempt; whatever follows it is automatic again (003)
            manual_replay = false,
            finished_at = CASE WHEN r.state IN ('delivered', 'dead') THEN now() END,
            updated_at = now()
        FROM r
        WHERE d.id = r.id AND d.lease_token = r.token
          AND d.state = (SELECT 'in_flight'::text)
        RETURNING d.id
    ), logged AS (
        INSERT INTO webhook_attempts (delivery_id, attempt, manual, started_at, duration_ms,
                                      outcome, status_code, error, response_body, worker,
                                      applied)
        SELECT r.id, r.attempt, r.manual, to_timestamp(r.started), r.duration_ms, r.outcome,
               r.status, r.error, r.response, p_worker, r.id IN (SELECT a.id FROM applied a)
        FROM r
        WHERE EXISTS (SELECT 1 FROM webhook_deliveries x WHERE x.id = r.id)
    )
    SELECT a.id FROM applied a;
END $$;

-- == Index probes in the claim (5. above); its other settings stay ========================
ALTER FUNCTION dispatcher_claim(text, integer, double precision) SET enable_seqscan = off;
