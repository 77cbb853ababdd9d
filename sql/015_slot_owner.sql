-- 015: a subscription's cap is kept on the wire by the process that owns it, so a freed slot
-- is refilled without waiting for its ack.
-- Append-only: never edit a migration that has shipped; add the next number instead.
--
-- Until now a slot counted from claim to ack: max_in_flight bounded the subscription's
-- in_flight rows, and a request that had ended held its slot until its result was written.
-- For a subscription whose own cap binds (one busy endpoint, the usual case) every refill
-- therefore waited for the ack write's round trip, and the wire ran below the cap.
--
-- A claimer that is alone on a subscription now becomes its owner (claim_owner, renewed by
-- its claims, lapsing 5 s after its last one). The owner may hold up to
-- max_in_flight + least(max_in_flight, p_ahead) rows in flight, and keeps at most
-- max_in_flight of them on the wire itself (the claim returns wire_cap to the owner, NULL to
-- the others; the owner holds the rest back until one of that subscription's requests
-- ends). The cap on requests to the endpoint still holds across replicas:
--   * ownership is taken only while the subscription has no in_flight row at all, so every
--     in_flight row of an owned subscription is the owner's;
--   * while it is owned, no other claimer takes its rows (it registers as the waiter, and the
--     owner gives ownership up at its next claim);
--   * once ownership is given up or has lapsed, the rule is the old one, max_in_flight minus
--     in_flight rows, and those still count the old owner's (on the wire or not), so nobody
--     adds a request until the total is below the cap.
-- Claimers that pass p_ahead = 0 (the default: tests, tools, older callers) never own, and
-- claim exactly as before. Worker ids must be unique among live replicas (the default,
-- hostname-pid, is).

ALTER TABLE webhook_subscriptions
    ADD COLUMN claim_owner text,
    ADD COLUMN claim_owner_until timestamptz;

DROP FUNCTION dispatcher_complete_and_claim(
    bigint[], bigint[], text[], double precision[], integer[], text[], integer[],
    double precision[], double precision[], text[], text[], boolean[], text, integer,
    double precision);
DROP FUNCTION dispatcher_claim(text, integer, double precision);

-- 007's claim (its guarantees and their statements are listed there), with ownership in
-- step 1 and the owner's room in step 2.
CREATE FUNCTION dispatcher_claim(p_worker text, p_limit integer, p_lease_seconds double precision,
                                 p_ahead integer DEFAULT 0)
RETURNS TABLE (
    delivery_id bigint, lease_token bigint, attempt integer, subscription_id uuid, url text,
    event_id text, event_type text, body text, secret text, previous_secret text,
    signature_header text, signers text[], headers text, event_created_at double precision,
    ordering_key text, manual boolean, retry_policy text, traceparent text, tracestate text,
    capped boolean, wire_cap integer
) LANGUAGE plpgsql
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
    v_cap integer;
    v_count integer;
    v_waiter text;
    v_owner text;
    v_wanted integer := 0;
    v_subs uuid[] := '{}';
    v_owned uuid[] := '{}';
    v_now timestamptz;
BEGIN
    IF p_limit <= 0 THEN
        RETURN;
    END IF;
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
        SELECT s.max_in_flight, s.in_flight_count,
               CASE WHEN s.rate_limit_per_second IS NULL THEN p_limit
                    ELSE floor(dispatcher_bucket_tokens(s.rate_limit_per_second, s.rate_tokens,
                                                        s.rate_refilled_at,
                                                        clock_timestamp()))::integer END,
               CASE WHEN s.claim_waiter_until > now() THEN s.claim_waiter END,
               CASE WHEN s.claim_owner_until > now() THEN s.claim_owner END
        INTO v_cap, v_count, v_free, v_waiter, v_owner
        FROM webhook_subscriptions s
        WHERE s.id = v_sub
          AND s.enabled
          AND (s.paused_until IS NULL OR s.paused_until <= now())
        FOR NO KEY UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        IF v_owner = p_worker AND v_waiter IS NOT NULL AND v_waiter <> p_worker THEN
            -- Another claimer wants this subscription: give ownership up. The old rule
            -- applies from here on (see the header); the waiter is answered below.
            UPDATE webhook_subscriptions s SET claim_owner = NULL, claim_owner_until = NULL
            WHERE s.id = v_sub;
            v_owner := NULL;
        ELSIF v_owner = p_worker THEN
            -- Renewed at most every 2.5 s or so.
            IF p_ahead <= 0 THEN
                UPDATE webhook_subscriptions s SET claim_owner = NULL, claim_owner_until = NULL
                WHERE s.id = v_sub;
                v_owner := NULL;
            ELSE
                UPDATE webhook_subscriptions s SET claim_owner_until = now() + interval '5 seconds'
                WHERE s.id = v_sub AND s.claim_owner_until < now() + interval '2.5 seconds';
            END IF;
        ELSIF v_owner IS NULL AND p_ahead > 0 AND v_count = 0
              AND (v_waiter IS NULL OR v_waiter = p_worker) THEN
            UPDATE webhook_subscriptions s
            SET claim_owner = p_worker, claim_owner_until = now() + interval '5 seconds'
            WHERE s.id = v_sub;
            v_owner := p_worker;
        END IF;
        IF v_owner IS NOT NULL AND v_owner <> p_worker THEN
            -- Owned by another claimer, which alone sees how many of its rows are on the
            -- wire: wait for it to give ownership up.
            v_room := 0;
        ELSIF v_owner = p_worker THEN
            v_room := v_cap + least(v_cap, p_ahead) - v_count;
        ELSE
            v_room := v_cap - v_count;
        END IF;
        IF v_room <= 0 THEN
            -- At its cap: queue up for the next slot (007), unless this claimer owns it
            -- already, which would only take the place of a replica waiting for it.
            IF v_owner IS DISTINCT FROM p_worker THEN
                UPDATE webhook_subscriptions s
                SET claim_waiter = p_worker, claim_waiter_until = now() + interval '2 seconds'
                WHERE s.id = v_sub
                  AND (s.claim_waiter IS DISTINCT FROM p_worker
                       OR s.claim_waiter_until < now() + interval '1 second');
            END IF;
            CONTINUE;
        END IF;
        IF v_waiter IS NOT NULL THEN
            UPDATE webhook_subscriptions s SET claim_waiter = NULL, claim_waiter_until = NULL
            WHERE s.id = v_sub;
            IF v_waiter <> p_worker THEN
                PERFORM pg_notify('dispatcher_work', '');
                CONTINUE;
            END IF;
        END IF;
        v_free := least(v_room, v_free, p_limit - v_wanted);
        IF v_free > 0 THEN
            -- What it can take, not what it has room for: counted from the due index (at
            -- most the room), so a claim over many subscriptions with a little work each
            -- visits enough of them to fill itself. (007 counted the room: with one event
            -- per subscription and a cap of 5, a claim of 50 took 10 and came back short,
            -- which reads as "no more work" until the next poll.) Read in the index's order,
            -- so the scan stops after v_free entries; unordered, the generic plan read the
            -- subscription's whole queue through a bitmap (8 ms per visit at 250 000).
            SELECT count(*)::integer INTO v_free
            FROM (SELECT 1 FROM webhook_deliveries d
                  WHERE d.subscription_id = v_sub AND d.state IN ('pending', 'retrying')
                    AND d.next_attempt_at <= now()
                  ORDER BY d.next_attempt_at
                  LIMIT v_free) x;
        END IF;
        IF v_free > 0 THEN
            v_subs := v_subs || v_sub;
            IF v_owner = p_worker THEN
                v_owned := v_owned || v_sub;
            END IF;
            v_wanted := v_wanted + v_free;
            EXIT WHEN v_wanted >= p_limit;
        END IF;
    END LOOP;
    IF cardinality(v_subs) = 0 THEN
        RETURN;
    END IF;
    v_now := clock_timestamp();

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
                   s.max_in_flight - s.in_flight_count
                   + CASE WHEN s.id = ANY (v_owned) THEN least(s.max_in_flight, p_ahead)
                          ELSE 0 END AS cap_free
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
                  s.retry_policy::text AS retry_policy, o.traceparent, o.tracestate,
                  CASE WHEN s.id = ANY (v_owned) THEN s.max_in_flight END AS wire_cap
    ), taken AS (
        SELECT c.subscription_id AS id, count(*)::integer AS n FROM claimed c GROUP BY 1
    ), bucket AS (
        UPDATE webhook_subscriptions s
        SET rate_tokens = subs.tokens - taken.n, rate_refilled_at = v_now
        FROM subs JOIN taken ON taken.id = subs.id
        WHERE s.id = subs.id AND subs.rate IS NOT NULL
    )
    SELECT c.delivery_id, c.lease_token, c.attempt, c.subscription_id, c.url, c.event_id,
           c.event_type, c.body, c.secret, c.previous_secret, c.signature_header, c.signers,
           c.headers, c.event_created_at, c.ordering_key, c.manual, c.retry_policy,
           c.traceparent, c.tracestate, taken.n >= subs.cap_free AS capped, c.wire_cap
    FROM claimed c
    JOIN taken ON taken.id = c.subscription_id
    JOIN subs ON subs.id = c.subscription_id;
END $$;

-- 007's complete-and-fetch, passing p_ahead on.
CREATE FUNCTION dispatcher_complete_and_claim(
    p_ids bigint[], p_tokens bigint[], p_states text[], p_delays double precision[],
    p_statuses integer[], p_errors text[], p_attempts integer[], p_started double precision[],
    p_durations_ms double precision[], p_outcomes text[], p_responses text[],
    p_manual boolean[], p_worker text, p_limit integer, p_lease_seconds double precision,
    p_ahead integer DEFAULT 0
) RETURNS TABLE (
    delivery_id bigint, lease_token bigint, attempt integer, subscription_id uuid, url text,
    event_id text, event_type text, body text, secret text, previous_secret text,
    signature_header text, signers text[], headers text, event_created_at double precision,
    ordering_key text, manual boolean, retry_policy text, traceparent text, tracestate text,
    capped boolean, wire_cap integer, acked bigint
) LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    SELECT NULL::bigint, NULL::bigint, NULL::integer, NULL::uuid, NULL::text, NULL::text,
           NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text[],
           NULL::text, NULL::double precision, NULL::text, NULL::boolean, NULL::text,
           NULL::text, NULL::text, NULL::boolean, NULL::integer, a.id
    FROM dispatcher_ack(p_ids, p_tokens, p_states, p_delays, p_statuses, p_errors,
                        p_attempts, p_started, p_durations_ms, p_outcomes, p_responses,
                        p_manual, p_worker) AS a(id);
    RETURN QUERY
    SELECT c.*, NULL::bigint FROM dispatcher_claim(p_worker, p_limit, p_lease_seconds, p_ahead) c;
END $$;

-- A claimer that stops gives its subscriptions up at once (they would lapse in 5 s anyway).
CREATE FUNCTION dispatcher_disown(p_worker text) RETURNS void LANGUAGE sql AS $$
    UPDATE webhook_subscriptions SET claim_owner = NULL, claim_owner_until = NULL
    WHERE claim_owner = p_worker
$$;
