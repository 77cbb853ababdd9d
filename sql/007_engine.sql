-- 007: the delivery engine's second design. Routing and claiming cost per event and per
-- claimed row, not per subscription; in-flight slots are counted, not scanned; an ack and the
-- next claim share one round trip; trace context travels from the outbox row to the job.
-- Append-only: never edit a migration that has shipped; add the next number instead.
-- dispatcher_claim() and dispatcher_claim_probe() are redefined here (their result gains
-- columns); every guarantee listed in 006 holds, by the statement named below.

-- Trace context written by producers next to the event (W3C traceparent/tracestate).
ALTER TABLE webhook_outbox
    ADD COLUMN IF NOT EXISTS traceparent text,
    ADD COLUMN IF NOT EXISTS tracestate text;

-- == Routing through an index ======================================================
-- Each pattern of each subscription is a row; an event type is expanded into every pattern
-- that can match it ('a.b.c' → 'a.b.c', 'a.b.*', 'a.*', '*'), so routing an event is a few
-- primary-key probes whatever the number of subscriptions. Kept by a trigger, so every
-- writer of event_types (API, CLI, SQL by hand) keeps it exact.
CREATE TABLE webhook_subscription_patterns (
    pattern          text NOT NULL,
    subscription_id  uuid NOT NULL REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    PRIMARY KEY (pattern, subscription_id)
);
CREATE INDEX webhook_subscription_patterns_subscription
    ON webhook_subscription_patterns (subscription_id);

CREATE FUNCTION webhook_subscription_patterns_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.event_types IS NOT DISTINCT FROM OLD.event_types THEN
            RETURN NULL;
        END IF;
        DELETE FROM webhook_subscription_patterns WHERE subscription_id = NEW.id;
    END IF;
    INSERT INTO webhook_subscription_patterns (pattern, subscription_id)
    SELECT DISTINCT p.pattern, NEW.id FROM unnest(NEW.event_types) AS p(pattern);
    RETURN NULL;
END $$;

CREATE TRIGGER webhook_subscription_patterns_sync
    AFTER INSERT OR UPDATE OF event_types ON webhook_subscriptions
    FOR EACH ROW EXECUTE FUNCTION webhook_subscription_patterns_sync();

INSERT INTO webhook_subscription_patterns (pattern, subscription_id)
SELECT DISTINCT p.pattern, s.id
FROM webhook_subscriptions s, unnest(s.event_types) AS p(pattern);

-- Every pattern that matches p_type under the routing rule: the type itself, '*', and each
-- prefix that ends in a dot followed by '*'.
CREATE FUNCTION dispatcher_type_patterns(p_type text) RETURNS text[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT ARRAY[p_type, '*'] || ARRAY(
        SELECT left(p_type, i) || '*'
        FROM generate_series(1, length(p_type)) AS i
        WHERE substr(p_type, i, 1) = '.')
$$;

-- == In-flight slots, counted ======================================================
-- in_flight_count is the number of the subscription's deliveries in state in_flight. The
-- statement-level trigger that already records count deltas (004) keeps it, in the same
-- statement as the change, whoever makes it (claim, ack, reaper, release, management), so
-- it is exact at every commit; a crashed transaction changes neither.
-- Locking: the counter rows are locked in subscription-id order (the FOR NO KEY UPDATE
-- below), so two acks over the same subscriptions cannot deadlock; a claim already holds the
-- rows it counts for (its step 1 lock).
ALTER TABLE webhook_subscriptions ADD COLUMN in_flight_count integer NOT NULL DEFAULT 0;

-- A claimer that found the subscription at its cap (slots held by others) and waits for a
-- slot; until claim_waiter_until, other claimers leave freed slots to it (see the claim).
ALTER TABLE webhook_subscriptions
    ADD COLUMN claim_waiter text,
    ADD COLUMN claim_waiter_until timestamptz;

CREATE OR REPLACE FUNCTION webhook_delivery_count_track() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_subs uuid[];
    v_deltas integer[];
BEGIN
    -- Transition tables hold exactly the rows this statement changed; each branch references
    -- only the tables its trigger declares (plpgsql plans a statement on first execution).
    IF TG_OP = 'INSERT' THEN
        INSERT INTO webhook_delivery_count_deltas (subscription_id, state, delta)
        SELECT n.subscription_id, n.state, count(*)
        FROM new_rows n
        WHERE n.state IN ('pending', 'in_flight', 'retrying', 'dead', 'parked')
        GROUP BY n.subscription_id, n.state;
        SELECT array_agg(x.subscription_id ORDER BY x.subscription_id),
               array_agg(x.delta ORDER BY x.subscription_id)
        INTO v_subs, v_deltas
        FROM (SELECT n.subscription_id, count(*)::integer AS delta FROM new_rows n
              WHERE n.state = 'in_flight' GROUP BY 1) x;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO webhook_delivery_count_deltas (subscription_id, state, delta)
        SELECT o.subscription_id, o.state, -count(*)
        FROM old_rows o
        WHERE o.state IN ('pending', 'in_flight', 'retrying', 'dead', 'parked')
        GROUP BY o.subscription_id, o.state;
        SELECT array_agg(x.subscription_id ORDER BY x.subscription_id),
               array_agg(x.delta ORDER BY x.subscription_id)
        INTO v_subs, v_deltas
        FROM (SELECT o.subscription_id, -count(*)::integer AS delta FROM old_rows o
              WHERE o.state = 'in_flight' GROUP BY 1) x;
    ELSE
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
        SELECT array_agg(c.subscription_id ORDER BY c.subscription_id),
               array_agg(c.delta::integer ORDER BY c.subscription_id)
        INTO v_subs, v_deltas
        FROM c WHERE c.state = 'in_flight';
    END IF;
    IF v_subs IS NOT NULL THEN
        PERFORM 1 FROM webhook_subscriptions s WHERE s.id = ANY (v_subs)
        ORDER BY s.id FOR NO KEY UPDATE;
        UPDATE webhook_subscriptions s
        SET in_flight_count = s.in_flight_count + x.delta
        FROM unnest(v_subs, v_deltas) AS x(id, delta)
        WHERE s.id = x.id;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION webhook_delivery_count_reset() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM webhook_delivery_count_deltas;
    UPDATE webhook_subscriptions SET in_flight_count = 0 WHERE in_flight_count <> 0;
    RETURN NULL;
END $$;

-- Backfill under the same lock as 004's: no claim or ack slips between the count and the
-- trigger taking over (the function is replaced in this transaction).
LOCK TABLE webhook_deliveries IN SHARE ROW EXCLUSIVE MODE;
UPDATE webhook_subscriptions s
SET in_flight_count = (SELECT count(*) FROM webhook_deliveries d
                       WHERE d.subscription_id = s.id AND d.state = 'in_flight');

-- == The claim =====================================================================
-- Guarantees (as in 006), and the statement that holds each:
--   1. max_in_flight holds across every replica: step 1 locks the subscription row (FOR NO
--      KEY UPDATE SKIP LOCKED: one claimer per subscription at a time) and step 2 reads
--      in_flight_count on a fresh snapshot taken after that lock; acks and the reaper can
--      only lower it meanwhile (they wait for the lock to write it).
--   2. The rate limit: the token bucket on the subscription row, read after the lock and
--      written back in step 2; clock_timestamp() after the locks, so it only moves forward.
--   3. Ordering: a keyed delivery is eligible only when no earlier event with its key is
--      unrouted, and none has an unfinished delivery to this subscription (written out,
--      as in 005 and 006: a helper function cost ~2 ms of claim latency).
--   4. Paused and disabled subscriptions are skipped (the probe has its own claim).
--   5. Fencing: fresh lease_token, leased_until from the database clock, attempt + 1.
--   6. manual, the retry_policy override and the trace context travel with the job.
-- Cost: step 1 walks only subscriptions that have queued work (one probe of the due index
-- each, starting at a random point and wrapping around), and stops once the subscriptions
-- it locked can fill the claim: subscriptions with nothing queued are never visited.
-- `capped` tells the caller a subscription's claim was cut by its max_in_flight, so the
-- caller claims for it again when one of its requests finishes (no timer). Because that
-- refill happens in the ack's own transaction, a claimer that finds a subscription at its
-- cap registers as its waiter, and the next freed slot is left to it (fair share).
DROP FUNCTION dispatcher_claim(text, integer, double precision);
CREATE FUNCTION dispatcher_claim(p_worker text, p_limit integer, p_lease_seconds double precision)
RETURNS TABLE (
    delivery_id bigint, lease_token bigint, attempt integer, subscription_id uuid, url text,
    event_id text, event_type text, body text, secret text, previous_secret text,
    signature_header text, signers text[], headers text, event_created_at double precision,
    ordering_key text, manual boolean, retry_policy text, traceparent text, tracestate text,
    capped boolean
) LANGUAGE plpgsql
-- Plan once per connection instead of on every call (006's plan notes).
SET plan_cache_mode = force_generic_plan
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
    v_waiter text;
    v_wanted integer := 0;
    v_subs uuid[] := '{}';
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
        SELECT s.max_in_flight - s.in_flight_count,
               CASE WHEN s.rate_limit_per_second IS NULL THEN p_limit
                    ELSE floor(dispatcher_bucket_tokens(s.rate_limit_per_second, s.rate_tokens,
                                                        s.rate_refilled_at,
                                                        clock_timestamp()))::integer END,
               CASE WHEN s.claim_waiter_until > now() THEN s.claim_waiter END
        INTO v_room, v_free, v_waiter
        FROM webhook_subscriptions s
        WHERE s.id = v_sub
          AND s.enabled
          AND (s.paused_until IS NULL OR s.paused_until <= now())
        FOR NO KEY UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        IF v_room <= 0 THEN
            -- Held at its cap by other claimers (or by this one): queue up for the next slot,
            -- so a subscription's capacity is shared by the replicas that want it instead of
            -- staying with whoever refills first. Written at most every second or so.
            UPDATE webhook_subscriptions s
            SET claim_waiter = p_worker, claim_waiter_until = now() + interval '2 seconds'
            WHERE s.id = v_sub
              AND (s.claim_waiter IS DISTINCT FROM p_worker
                   OR s.claim_waiter_until < now() + interval '1 second');
            CONTINUE;
        END IF;
        IF v_waiter IS NOT NULL THEN
            -- The wait is answered once: one slot per registration, so a waiter that does
            -- not come back for it (busy elsewhere) costs the subscription one idle slot
            -- until the next claim, not a stall.
            UPDATE webhook_subscriptions s SET claim_waiter = NULL, claim_waiter_until = NULL
            WHERE s.id = v_sub;
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
            v_wanted := v_wanted + v_free;
            EXIT WHEN v_wanted >= p_limit;
        END IF;
    END LOOP;
    IF cardinality(v_subs) = 0 THEN
        RETURN;
    END IF;
    v_now := clock_timestamp();

    -- Step 2, on a snapshot taken after the step-1 locks.
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
                   s.max_in_flight - s.in_flight_count AS cap_free
            FROM webhook_subscriptions s
            WHERE s.id = ANY (v_subs)
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

-- The probe (005), with the same result columns as dispatcher_claim().
DROP FUNCTION dispatcher_claim_probe(text, uuid, double precision);
CREATE FUNCTION dispatcher_claim_probe(p_worker text, p_subscription uuid,
                                       p_lease_seconds double precision)
RETURNS TABLE (
    delivery_id bigint, lease_token bigint, attempt integer, subscription_id uuid, url text,
    event_id text, event_type text, body text, secret text, previous_secret text,
    signature_header text, signers text[], headers text, event_created_at double precision,
    ordering_key text, manual boolean, retry_policy text, traceparent text, tracestate text,
    capped boolean
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH picked AS (
        SELECT d.id, d.manual_replay
        FROM webhook_deliveries d
        WHERE d.subscription_id = p_subscription
          AND d.state IN ('pending', 'retrying')
          AND NOT EXISTS (SELECT 1 FROM webhook_deliveries f
                          WHERE f.subscription_id = p_subscription AND f.state = 'in_flight')
          AND (d.ordering_key IS NULL OR (
                -- Ordering: the same rule as dispatcher_claim().
                NOT EXISTS (SELECT 1 FROM webhook_outbox u
                            WHERE u.ordering_key = d.ordering_key AND u.id < d.outbox_id
                              AND u.routed_at IS NULL)
                AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e
                                WHERE e.subscription_id = d.subscription_id
                                  AND e.ordering_key = d.ordering_key
                                  AND e.outbox_id < d.outbox_id
                                  AND e.state IN ('pending', 'in_flight', 'retrying',
                                                  'parked'))))
        ORDER BY d.next_attempt_at, d.id
        LIMIT 1
        FOR UPDATE OF d SKIP LOCKED
    )
    UPDATE webhook_deliveries d
    SET state = 'in_flight',
        attempt = d.attempt + 1,
        leased_until = now() + make_interval(secs => p_lease_seconds),
        lease_token = nextval('webhook_lease_token_seq'),
        leased_by = p_worker,
        updated_at = now()
    FROM picked, webhook_outbox o, webhook_subscriptions s
    WHERE d.id = picked.id AND o.id = d.outbox_id AND s.id = d.subscription_id AND s.enabled
    RETURNING d.id, d.lease_token, d.attempt, d.subscription_id, s.url, o.event_id,
              o.event_type, o.payload::text,
              s.secret,
              CASE WHEN s.previous_secret_until > now() THEN s.previous_secret END,
              s.signature_header, s.signers, s.headers::text,
              extract(epoch FROM o.created_at)::double precision, d.ordering_key,
              picked.manual_replay, s.retry_policy::text, o.traceparent, o.tracestate, true;
END $$;

-- == Acks, and an ack with the next claim in one round trip ===========================
-- Results are applied fenced on the lease token: a row whose token changed (lease expired
-- and reclaimed, or released) is left alone, and its attempt is logged with applied = false.
-- Returns the ids that were applied.
CREATE FUNCTION dispatcher_ack(
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
        WHERE d.id = r.id AND d.lease_token = r.token AND d.state = 'in_flight'
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

-- Complete-and-fetch: apply results, then claim on a fresh snapshot that sees them (the
-- freed slots count at once). Rows with acked set are the applied ids; the others are jobs.
CREATE FUNCTION dispatcher_complete_and_claim(
    p_ids bigint[], p_tokens bigint[], p_states text[], p_delays double precision[],
    p_statuses integer[], p_errors text[], p_attempts integer[], p_started double precision[],
    p_durations_ms double precision[], p_outcomes text[], p_responses text[],
    p_manual boolean[], p_worker text, p_limit integer, p_lease_seconds double precision
) RETURNS TABLE (
    delivery_id bigint, lease_token bigint, attempt integer, subscription_id uuid, url text,
    event_id text, event_type text, body text, secret text, previous_secret text,
    signature_header text, signers text[], headers text, event_created_at double precision,
    ordering_key text, manual boolean, retry_policy text, traceparent text, tracestate text,
    capped boolean, acked bigint
) LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    SELECT NULL::bigint, NULL::bigint, NULL::integer, NULL::uuid, NULL::text, NULL::text,
           NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text[],
           NULL::text, NULL::double precision, NULL::text, NULL::boolean, NULL::text,
           NULL::text, NULL::text, NULL::boolean, a.id
    FROM dispatcher_ack(p_ids, p_tokens, p_states, p_delays, p_statuses, p_errors,
                        p_attempts, p_started, p_durations_ms, p_outcomes, p_responses,
                        p_manual, p_worker) AS a(id);
    RETURN QUERY
    SELECT c.*, NULL::bigint FROM dispatcher_claim(p_worker, p_limit, p_lease_seconds) c;
END $$;
