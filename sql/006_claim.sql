-- 006: the claim. dispatcher_claim() hands one worker its due deliveries in one round trip.
-- Append-only: never edit a migration that has shipped; add the next number instead.
-- Defined once, here, after every column it reads exists (001, 003, 005).
--
-- Guarantees, and the statement that holds each:
--   1. max_in_flight holds across every replica. Step 1 locks (FOR NO KEY UPDATE ... SKIP
--      LOCKED) the subscriptions that have due work and spare capacity, so one replica at a
--      time claims for a given subscription (the others skip it). Step 2 runs on a fresh
--      snapshot (plpgsql, READ COMMITTED) taken after those locks, so it sees every claim
--      another replica committed before; counting in_flight rows there bounds the claim.
--      NO KEY UPDATE (not UPDATE) so the router's foreign-key checks are not blocked.
--   2. The per-subscription rate limit holds across replicas the same way: the token bucket
--      lives on the subscription row (003), is read after the lock and written back in the
--      same statement; at most floor(tokens) deliveries are taken. Its clock is
--      clock_timestamp() read after the locks, so per subscription it only moves forward.
--   3. Ordering: a delivery with an ordering_key is eligible only when no earlier event with
--      the same key is still unrouted, and none has an unfinished delivery to this
--      subscription. (The probe in 005 applies the same rule; a helper function for it cost
--      ~2 ms of claim latency, so it is written out in both.)
--   4. Paused (circuit breaker, 005) and disabled subscriptions are skipped; the health
--      probe claims through dispatcher_claim_probe() instead.
--   5. Fencing: every claim writes a fresh lease_token and leased_until from the database
--      clock, and moves attempt forward (so a delivery that keeps killing workers dies).
--   6. manual (003) and the subscription's retry_policy override travel with the job.
-- Plan notes, found by profiling `dispatcher bench`:
--   * "Has due work" is a scalar subquery with ORDER BY next_attempt_at LIMIT 1 (matching
--     webhook_deliveries_due): EXISTS was pulled up into a hash semi-join that read every
--     queued row (~10 ms at 20 k queued, growing with the backlog).
--   * The claiming UPDATE finds its rows by `d.id = ANY (ARRAY(SELECT id FROM picked))`: the
--     planner cannot estimate a locking CTE and hash-joined a sequential scan (~0.5 s at 1 M).
--   * `SET plan_cache_mode = force_generic_plan`: plpgsql re-planned both statements on every
--      call (~2.5 ms, the largest fixed cost of a claim); the plan shape no longer depends on
--      the parameters, so the generic plan is the same plan.

CREATE FUNCTION dispatcher_claim(p_worker text, p_limit integer, p_lease_seconds double precision)
RETURNS TABLE (
    delivery_id bigint, lease_token bigint, attempt integer, subscription_id uuid, url text,
    event_id text, event_type text, body text, secret text, previous_secret text,
    signature_header text, signers text[], headers text, event_created_at double precision,
    ordering_key text, manual boolean, retry_policy text
) LANGUAGE plpgsql
-- Plan once per connection instead of on every call (see the plan notes above).
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    v_subs uuid[];
    v_caps integer[];
    v_now timestamptz;
BEGIN
    SELECT array_agg(x.id), array_agg(x.max_in_flight) INTO v_subs, v_caps
    FROM (
        SELECT s.id, s.max_in_flight
        FROM webhook_subscriptions s
        WHERE s.enabled
          AND (s.paused_until IS NULL OR s.paused_until <= now())
          AND (s.rate_limit_per_second IS NULL
               OR dispatcher_bucket_tokens(s.rate_limit_per_second, s.rate_tokens,
                                           s.rate_refilled_at, clock_timestamp()) >= 1)
          AND (SELECT true FROM webhook_deliveries d
               WHERE d.subscription_id = s.id AND d.state IN ('pending', 'retrying')
                 AND d.next_attempt_at <= now()
               ORDER BY d.next_attempt_at
               LIMIT 1)
          AND (SELECT count(*) FROM webhook_deliveries f
               WHERE f.subscription_id = s.id AND f.state = 'in_flight') < s.max_in_flight
        ORDER BY random()
        LIMIT p_limit
        FOR NO KEY UPDATE OF s SKIP LOCKED
    ) x;
    IF v_subs IS NULL THEN
        RETURN;
    END IF;
    v_now := clock_timestamp();

    RETURN QUERY
    WITH subs AS (
        SELECT b.id, b.rate, b.tokens,
               least(b.cap - b.in_flight,
                     CASE WHEN b.rate IS NULL THEN p_limit ELSE floor(b.tokens)::integer END)
                   AS free
        FROM (
            SELECT u.id, u.cap, s.rate_limit_per_second AS rate,
                   dispatcher_bucket_tokens(s.rate_limit_per_second, s.rate_tokens,
                                            s.rate_refilled_at, v_now) AS tokens,
                   (SELECT count(*) FROM webhook_deliveries f
                    WHERE f.subscription_id = u.id AND f.state = 'in_flight')::integer
                       AS in_flight
            FROM unnest(v_subs, v_caps) AS u(id, cap)
            JOIN webhook_subscriptions s ON s.id = u.id
        ) b
    ), picked AS (
        SELECT c.id, c.manual_replay
        FROM subs
        CROSS JOIN LATERAL (
            SELECT d.id, d.manual_replay
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
                  s.retry_policy::text AS retry_policy
    ), bucket AS (
        -- Only rate-limited subscriptions that took work pay tokens; the others keep their
        -- stored state, which yields the same refill next time.
        UPDATE webhook_subscriptions s
        SET rate_tokens = subs.tokens - n.taken, rate_refilled_at = v_now
        FROM subs
        JOIN (SELECT c.subscription_id AS id, count(*) AS taken FROM claimed c GROUP BY 1) n
          ON n.id = subs.id
        WHERE s.id = subs.id AND subs.rate IS NOT NULL
    )
    SELECT c.delivery_id, c.lease_token, c.attempt, c.subscription_id, c.url, c.event_id,
           c.event_type, c.body, c.secret, c.previous_secret, c.signature_header, c.signers,
           c.headers, c.event_created_at, c.ordering_key, c.manual, c.retry_policy
    FROM claimed c;
END $$;
