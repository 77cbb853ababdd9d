-- 014: the in-flight slot counter and the claim lock on a narrow row of their own.
-- Append-only: never edit a migration that has shipped; add the next number instead.
--
-- in_flight_count (007) lived on webhook_subscriptions: every claim and every ack rewrote the
-- subscription's wide row through the count trigger (a new version of every column, its CHECK
-- constraints evaluated again, an entry in each of its indexes when the page had no room), and
-- while routing inserted deliveries their foreign-key checks share-locked that same row, so
-- the claim's lock and the counter's updates turned its lock into a multixact. Profiling the
-- claim/ack loop put about a seventh of the database work per delivery there, more when one
-- statement touches many subscriptions.
--
-- webhook_subscription_slots holds, per subscription, what the claim and the acks write: the
-- counter, and the waiter of 007's fair share. Nothing indexes those columns and the table
-- leaves room on its pages, so each write is a heap-only update of a short row; nothing
-- references the table, so no foreign-key check locks its rows.
--
-- The guarantees of 007, and what holds each now:
--   1. max_in_flight across replicas: step 1 of the claim locks the subscription's slots row
--      (FOR NO KEY UPDATE SKIP LOCKED: one claimer per subscription at a time) and reads the
--      counter in that statement (a locked row is read at its latest committed version).
--      Claims raise the counter, in the trigger of their own UPDATE, on the row they hold (the
--      paused subscription's probe as in 007); acks, the reaper and releases lower it, locking
--      the row to write it, and a claimer skips a row they hold.
--   2. The rate limit: the bucket stays on the subscription row; only claimers of that
--      subscription write it, each under the slots lock, and step 2 reads it after that lock.
--      A rate-limited subscription's row is also locked in step 1 (SKIP LOCKED), as in 007,
--      so a claim never waits for a management write of that row it could deadlock with.
--   3. Ordering and 5./6. (fencing, what travels with the job): unchanged statements.
--   4. Paused and disabled subscriptions are skipped: step 1 tests them, and step 2 again on
--      its own later snapshot, so a pause committed before step 2 stops the claim.
-- in_flight_count stays exact at every commit: the same statement triggers keep it, in the
-- statement that changes a delivery's state, whoever runs it. It is also the in_flight depth
-- of the gauges now, which no longer log it as count deltas (webhook_delivery_depth below).

CREATE TABLE webhook_subscription_slots (
    -- No foreign key: its check would run on every update of a row this transaction already
    -- updated (the ack's decrement, then the claim's increment); the triggers below create
    -- and delete the row with its subscription instead.
    subscription_id     uuid PRIMARY KEY,
    in_flight_count     integer NOT NULL DEFAULT 0,
    -- A claimer that found the subscription at its cap (slots held by others) and waits for
    -- a slot; until claim_waiter_until, other claimers leave freed slots to it (007).
    claim_waiter        text,
    claim_waiter_until  timestamptz
) WITH (fillfactor = 50);

-- One row per subscription, created and deleted with it, whoever writes it (API, CLI, SQL by
-- hand, a cascade). A subscription's id never changes (its deliveries reference it).
CREATE FUNCTION webhook_subscription_slots_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO webhook_subscription_slots (subscription_id) SELECT n.id FROM new_rows n;
    ELSIF TG_OP = 'DELETE' THEN
        DELETE FROM webhook_subscription_slots l USING old_rows o WHERE l.subscription_id = o.id;
    ELSE
        DELETE FROM webhook_subscription_slots;
    END IF;
    RETURN NULL;
END $$;

-- Backfill under locks that keep out every writer of the counter (a delivery state change)
-- and of the subscriptions until this transaction commits with the new functions in place.
LOCK TABLE webhook_subscriptions IN SHARE ROW EXCLUSIVE MODE;
LOCK TABLE webhook_deliveries IN SHARE ROW EXCLUSIVE MODE;

CREATE TRIGGER webhook_subscription_slots_insert AFTER INSERT ON webhook_subscriptions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_subscription_slots_sync();
CREATE TRIGGER webhook_subscription_slots_delete AFTER DELETE ON webhook_subscriptions
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_subscription_slots_sync();
CREATE TRIGGER webhook_subscription_slots_truncate AFTER TRUNCATE ON webhook_subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_subscription_slots_sync();

INSERT INTO webhook_subscription_slots (subscription_id, in_flight_count, claim_waiter,
                                        claim_waiter_until)
SELECT s.id, (SELECT count(*) FROM webhook_deliveries d
              WHERE d.subscription_id = s.id AND d.state = 'in_flight'),
       s.claim_waiter, s.claim_waiter_until
FROM webhook_subscriptions s;

-- == Queue depth: in_flight from the slots rows =========================================
-- The count deltas (004) no longer log in_flight: the counter on the slots rows is the same
-- number, kept in the same statements, so the claim and the ack each write one delta row per
-- subscription fewer (the ack of a delivery none at all), and the gauges and the compaction
-- read and fold a third of the rows. Readers of the depth by state read this view: the
-- deltas, and one row per subscription with deliveries in flight. Both parts change in the
-- same statements, so one snapshot of the view is exact.
DELETE FROM webhook_delivery_count_deltas WHERE state = 'in_flight';

CREATE VIEW webhook_delivery_depth AS
SELECT d.subscription_id, d.state, d.delta FROM webhook_delivery_count_deltas d
UNION ALL
SELECT l.subscription_id, 'in_flight', l.in_flight_count::bigint
FROM webhook_subscription_slots l
WHERE l.in_flight_count <> 0;

-- == The counter's triggers ===========================================================
-- As in 007/013, writing the slots row instead of the subscription row. Rows are locked in
-- subscription-id order when a statement touches several, so two statements over the same
-- subscriptions cannot deadlock.
CREATE OR REPLACE FUNCTION webhook_delivery_count_track() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_subs uuid[];
    v_deltas integer[];
BEGIN
    -- INSERT and DELETE only (UPDATE has webhook_delivery_update_track). Transition tables
    -- hold exactly the rows this statement changed; each branch references only the tables
    -- its trigger declares (plpgsql plans a statement on first execution).
    IF TG_OP = 'INSERT' THEN
        INSERT INTO webhook_delivery_count_deltas (subscription_id, state, delta)
        SELECT n.subscription_id, n.state, count(*)
        FROM new_rows n
        WHERE n.state IN ('pending', 'retrying', 'dead', 'parked')
        GROUP BY n.subscription_id, n.state;
        SELECT array_agg(x.subscription_id ORDER BY x.subscription_id),
               array_agg(x.delta ORDER BY x.subscription_id)
        INTO v_subs, v_deltas
        FROM (SELECT n.subscription_id, count(*)::integer AS delta FROM new_rows n
              WHERE n.state = 'in_flight' GROUP BY 1) x;
    ELSE
        INSERT INTO webhook_delivery_count_deltas (subscription_id, state, delta)
        SELECT o.subscription_id, o.state, -count(*)
        FROM old_rows o
        WHERE o.state IN ('pending', 'retrying', 'dead', 'parked')
        GROUP BY o.subscription_id, o.state;
        SELECT array_agg(x.subscription_id ORDER BY x.subscription_id),
               array_agg(x.delta ORDER BY x.subscription_id)
        INTO v_subs, v_deltas
        FROM (SELECT o.subscription_id, -count(*)::integer AS delta FROM old_rows o
              WHERE o.state = 'in_flight' GROUP BY 1) x;
    END IF;
    IF v_subs IS NOT NULL THEN
        PERFORM 1 FROM webhook_subscription_slots l WHERE l.subscription_id = ANY (v_subs)
        ORDER BY l.subscription_id FOR NO KEY UPDATE;
        UPDATE webhook_subscription_slots l
        SET in_flight_count = l.in_flight_count + x.delta
        FROM unnest(v_subs, v_deltas) AS x(id, delta)
        WHERE l.subscription_id = x.id;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION webhook_delivery_count_reset() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM webhook_delivery_count_deltas;
    UPDATE webhook_subscription_slots SET in_flight_count = 0 WHERE in_flight_count <> 0;
    RETURN NULL;
END $$;

-- 013's UPDATE trigger, with the counter on the slots rows (the dead-letter part unchanged).
CREATE OR REPLACE FUNCTION webhook_delivery_update_track() RETURNS trigger LANGUAGE plpgsql
-- Index probes, never sequential scans (013, 5.).
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
    -- the in_flight part of them for in_flight_count, the others logged; whether any row is
    -- dead now.
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
        -- in_flight is counted on the slots rows only (webhook_delivery_depth).
        INSERT INTO webhook_delivery_count_deltas (subscription_id, state, delta)
        SELECT c.subscription_id, c.state, c.delta FROM c WHERE c.state <> 'in_flight'
    )
    SELECT array_agg(c.subscription_id ORDER BY c.subscription_id)
               FILTER (WHERE c.state = 'in_flight'),
           array_agg(c.delta::integer ORDER BY c.subscription_id)
               FILTER (WHERE c.state = 'in_flight'),
           EXISTS (SELECT 1 FROM new_rows n WHERE n.state = 'dead')
    INTO v_subs, v_deltas, v_dead
    FROM c;
    IF v_subs IS NOT NULL THEN
        -- Slots rows are locked in subscription-id order, so two statements over the same
        -- subscriptions cannot deadlock; a single row needs no ordering.
        IF cardinality(v_subs) > 1 THEN
            PERFORM 1 FROM webhook_subscription_slots l WHERE l.subscription_id = ANY (v_subs)
            ORDER BY l.subscription_id FOR NO KEY UPDATE;
        END IF;
        UPDATE webhook_subscription_slots l
        SET in_flight_count = l.in_flight_count + x.delta
        FROM unnest(v_subs, v_deltas) AS x(id, delta)
        WHERE l.subscription_id = x.id;
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

-- == The claim ========================================================================
-- 007's claim (see its notes and 1.–4. above), with the lock, the counter and the waiter on
-- the slots row.
CREATE OR REPLACE FUNCTION dispatcher_claim(p_worker text, p_limit integer,
                                            p_lease_seconds double precision)
RETURNS TABLE (
    delivery_id bigint, lease_token bigint, attempt integer, subscription_id uuid, url text,
    event_id text, event_type text, body text, secret text, previous_secret text,
    signature_header text, signers text[], headers text, event_created_at double precision,
    ordering_key text, manual boolean, retry_policy text, traceparent text, tracestate text,
    capped boolean
) LANGUAGE plpgsql
-- Plan once per connection (006), index probes only (013).
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    v_start uuid := gen_random_uuid();
    v_cursor uuid := v_start;
    v_wrapped boolean := false;
    v_sub uuid;
    v_due timestamptz;
    v_free integer;
    v_room integer;
    v_rated boolean;
    v_waiter text;
    v_wanted integer := 0;
    v_subs uuid[] := '{}';
    v_rooms integer[] := '{}';
    v_now timestamptz;
BEGIN
    IF p_limit <= 0 THEN
        RETURN;
    END IF;
    -- Step 1: the next subscription (in id order, from a random start) with queued work,
    -- and its earliest due time, from webhook_deliveries_due.
    LOOP
        SELECT d.subscription_id, d.next_attempt_at INTO v_sub, v_due
        FROM webhook_deliveries d
        WHERE d.state IN ('pending', 'retrying') AND d.subscription_id > v_cursor
        ORDER BY d.subscription_id, d.next_attempt_at
        LIMIT 1;
        IF NOT FOUND OR (v_wrapped AND v_sub >= v_start) THEN
            EXIT WHEN v_wrapped;
            v_wrapped := true;
            v_cursor := '00000000-0000-0000-0000-000000000000';
            CONTINUE;
        END IF;
        v_cursor := v_sub;
        CONTINUE WHEN v_due > now();
        SELECT s.max_in_flight - l.in_flight_count,
               s.rate_limit_per_second IS NOT NULL,
               CASE WHEN s.rate_limit_per_second IS NULL THEN p_limit
                    ELSE floor(dispatcher_bucket_tokens(s.rate_limit_per_second, s.rate_tokens,
                                                        s.rate_refilled_at,
                                                        clock_timestamp()))::integer END,
               CASE WHEN l.claim_waiter_until > now() THEN l.claim_waiter END
        INTO v_room, v_rated, v_free, v_waiter
        FROM webhook_subscription_slots l
        JOIN webhook_subscriptions s ON s.id = l.subscription_id
        WHERE l.subscription_id = v_sub
          AND s.enabled
          AND (s.paused_until IS NULL OR s.paused_until <= now())
        FOR NO KEY UPDATE OF l SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        IF v_rated THEN
            -- Its bucket is written in step 2: hold the row now, never wait for it there.
            PERFORM 1 FROM webhook_subscriptions s WHERE s.id = v_sub
            FOR NO KEY UPDATE SKIP LOCKED;
            CONTINUE WHEN NOT FOUND;
        END IF;
        IF v_room <= 0 THEN
            -- Held at its cap by other claimers (or by this one): queue up for the next slot,
            -- so a subscription's capacity is shared by the replicas that want it instead of
            -- staying with whoever refills first. Written at most every second or so.
            UPDATE webhook_subscription_slots l
            SET claim_waiter = p_worker, claim_waiter_until = now() + interval '2 seconds'
            WHERE l.subscription_id = v_sub
              AND (l.claim_waiter IS DISTINCT FROM p_worker
                   OR l.claim_waiter_until < now() + interval '1 second');
            CONTINUE;
        END IF;
        IF v_waiter IS NOT NULL THEN
            -- The wait is answered once: one slot per registration, so a waiter that does
            -- not come back for it (busy elsewhere) costs the subscription one idle slot
            -- until the next claim, not a stall.
            UPDATE webhook_subscription_slots l
            SET claim_waiter = NULL, claim_waiter_until = NULL
            WHERE l.subscription_id = v_sub;
            IF v_waiter <> p_worker THEN
                -- Another claimer waits for this subscription's next slot: leave it free and
                -- wake the claimers (WORK_CHANNEL in repository.py; delivered at commit).
                PERFORM pg_notify('dispatcher_work', '');
                CONTINUE;
            END IF;
        END IF;
        v_free := least(v_room, v_free);
        IF v_free > 0 THEN
            v_subs := v_subs || v_sub;
            v_rooms := v_rooms || v_room;
            v_wanted := v_wanted + v_free;
            EXIT WHEN v_wanted >= p_limit;
        END IF;
    END LOOP;
    IF cardinality(v_subs) = 0 THEN
        RETURN;
    END IF;
    v_now := clock_timestamp();

    -- Step 2, on a snapshot taken after the step-1 locks; a subscription paused or disabled
    -- since step 1 takes nothing. The room is step 1's: read from the locked slots row, which
    -- a lock always reads at its latest committed version, and which only this transaction
    -- can raise until it commits (others can only lower it: the room is never overstated).
    RETURN QUERY
    WITH subs AS (
        SELECT b.id, b.rate, b.tokens, b.cap_free,
               least(b.cap_free,
                     CASE WHEN b.rate IS NULL THEN p_limit ELSE floor(b.tokens)::integer END)
                   AS free
        FROM (
            SELECT s.id, s.rate_limit_per_second AS rate,
                   dispatcher_bucket_tokens(s.rate_limit_per_second, s.rate_tokens,
                                            s.rate_refilled_at, v_now) AS tokens,
                   r.room AS cap_free
            FROM unnest(v_subs, v_rooms) AS r(id, room)
            JOIN webhook_subscriptions s ON s.id = r.id
            WHERE s.enabled
              AND (s.paused_until IS NULL OR s.paused_until <= now())
        ) b
    ), picked AS (
        SELECT c.id
        FROM subs
        CROSS JOIN LATERAL (
            SELECT d.id
            FROM webhook_deliveries d
            WHERE d.subscription_id = subs.id
              AND d.state IN ('pending', 'retrying')
              AND d.next_attempt_at <= now()
              AND (d.ordering_key IS NULL OR (
                    -- Ordering: no earlier event with this key still unrouted (replicas route
                    -- disjoint batches in parallel, so a later batch can be routed first) ...
                    NOT EXISTS (SELECT 1 FROM webhook_outbox u
                                WHERE u.ordering_key = d.ordering_key AND u.id < d.outbox_id
                                  AND u.routed_at IS NULL)
                    -- ... and none unfinished for this subscription.
                    AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e
                                    WHERE e.subscription_id = d.subscription_id
                                      AND e.ordering_key = d.ordering_key
                                      AND e.outbox_id < d.outbox_id
                                      AND e.state IN ('pending', 'in_flight', 'retrying',
                                                      'parked'))))
            ORDER BY d.next_attempt_at, d.id
            LIMIT greatest(subs.free, 0)
            FOR UPDATE OF d SKIP LOCKED
        ) c
        LIMIT p_limit
    ), claimed AS (
        UPDATE webhook_deliveries d
        SET state = 'in_flight',
            attempt = d.attempt + 1,
            leased_until = now() + make_interval(secs => p_lease_seconds),
            lease_token = nextval('webhook_lease_token_seq'),
            leased_by = p_worker,
            updated_at = now()
        FROM webhook_outbox o, webhook_subscriptions s
        WHERE d.id = ANY (ARRAY(SELECT p.id FROM picked p))
          AND o.id = d.outbox_id AND s.id = d.subscription_id
        RETURNING d.id AS delivery_id, d.lease_token, d.attempt, d.subscription_id, s.url,
                  o.event_id, o.event_type, o.payload::text AS body, s.secret,
                  CASE WHEN s.previous_secret_until > now() THEN s.previous_secret END
                      AS previous_secret,
                  s.signature_header, s.signers, s.headers::text AS headers,
                  extract(epoch FROM o.created_at)::double precision AS event_created_at,
                  d.ordering_key, d.manual_replay AS manual,
                  s.retry_policy::text AS retry_policy, o.traceparent, o.tracestate
    ), taken AS (
        SELECT c.subscription_id AS id, count(*)::integer AS n FROM claimed c GROUP BY 1
    ), bucket AS (
        -- Only rate-limited subscriptions that took work pay tokens; the others keep their
        -- stored state, which yields the same refill next time.
        UPDATE webhook_subscriptions s
        SET rate_tokens = subs.tokens - taken.n, rate_refilled_at = v_now
        FROM subs JOIN taken ON taken.id = subs.id
        WHERE s.id = subs.id AND subs.rate IS NOT NULL
    )
    SELECT c.delivery_id, c.lease_token, c.attempt, c.subscription_id, c.url, c.event_id,
           c.event_type, c.body, c.secret, c.previous_secret, c.signature_header, c.signers,
           c.headers, c.event_created_at, c.ordering_key, c.manual, c.retry_policy,
           c.traceparent, c.tracestate, taken.n >= subs.cap_free AS capped
    FROM claimed c
    JOIN taken ON taken.id = c.subscription_id
    JOIN subs ON subs.id = c.subscription_id;
END $$;

-- The columns now on the slots rows leave the subscription row (narrower for every read and
-- write of it). Nothing outside this file's functions reads them.
ALTER TABLE webhook_subscriptions
    DROP COLUMN in_flight_count,
    DROP COLUMN claim_waiter,
    DROP COLUMN claim_waiter_until;
