-- 003: management API support: a per-subscription token bucket (rate limit across replicas),
-- manual replays recorded as manual attempts, and indexes for the keyset-paginated listings.
-- Append-only: never edit a migration that has shipped; add the next number instead.

-- Token bucket for rate_limit_per_second. NULL tokens = a full bucket (never used, or the
-- limit just changed). Capacity is one second's worth (at least 1 request), so a claimer that
-- wakes at most once per poll interval can still reach the configured rate.
ALTER TABLE webhook_subscriptions
    ADD COLUMN rate_tokens      double precision,
    ADD COLUMN rate_refilled_at timestamptz;

-- Set by a manual retry/replay; the claim hands it to the worker (Job.manual, so the attempt
-- row says manual = true) and the ack of that attempt clears it.
ALTER TABLE webhook_deliveries
    ADD COLUMN manual_replay boolean NOT NULL DEFAULT false;

-- Delivery listings per subscription, newest first (keyset on id).
CREATE INDEX webhook_deliveries_subscription_id ON webhook_deliveries (subscription_id, id);
-- Bulk replay of a subscription's dead deliveries.
CREATE INDEX webhook_deliveries_dead ON webhook_deliveries (subscription_id, id)
    WHERE state = 'dead';
-- Subscription listings (keyset on created_at, id).
CREATE INDEX webhook_subscriptions_created ON webhook_subscriptions (created_at, id);

-- Tokens in a bucket refilled at p_rate per second up to max(1, p_rate), as of p_at.
CREATE FUNCTION dispatcher_bucket_tokens(
    p_rate double precision, p_tokens double precision, p_refilled_at timestamptz,
    p_at timestamptz
) RETURNS double precision LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_rate IS NULL THEN NULL
        WHEN p_tokens IS NULL OR p_refilled_at IS NULL THEN greatest(1.0, p_rate)
        ELSE least(greatest(1.0, p_rate),
                   p_tokens + greatest(0.0, extract(epoch FROM p_at - p_refilled_at)) * p_rate)
    END
$$;

-- The claim from 001 plus (a) the token bucket and (b) the manual flag in its result. The
-- result gains a column, which CREATE OR REPLACE cannot do, hence DROP + CREATE (inside the
-- migration's transaction, so no claim ever sees the function missing).
--
-- Unchanged guarantees: step 1 locks (FOR NO KEY UPDATE ... SKIP LOCKED) the subscriptions
-- with due work, spare capacity and (when rate limited) at least one token, so one replica
-- at a time claims for a subscription. Step 2 runs on a fresh snapshot taken after those
-- locks: it counts in_flight rows (max_in_flight across replicas) and reads the bucket every
-- earlier claim committed, takes at most floor(tokens) deliveries, and writes the bucket back
-- in the same statement, so the rate holds across replicas too. The bucket clock is
-- clock_timestamp() read after the locks, so per subscription it only moves forward.
DROP FUNCTION dispatcher_claim(text, integer, double precision);

CREATE FUNCTION dispatcher_claim(p_worker text, p_limit integer, p_lease_seconds double precision)
RETURNS TABLE (
    delivery_id bigint, lease_token bigint, attempt integer, subscription_id uuid, url text,
    event_id text, event_type text, body text, secret text, previous_secret text,
    signature_header text, signers text[], headers text, event_created_at double precision,
    ordering_key text, manual boolean
) LANGUAGE plpgsql AS $$
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
          AND (s.rate_limit_per_second IS NULL
               OR dispatcher_bucket_tokens(s.rate_limit_per_second, s.rate_tokens,
                                           s.rate_refilled_at, clock_timestamp()) >= 1)
          AND EXISTS (SELECT 1 FROM webhook_deliveries d
                      WHERE d.subscription_id = s.id AND d.state IN ('pending', 'retrying')
                        AND d.next_attempt_at <= now())
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
              AND (d.ordering_key IS NULL OR NOT EXISTS (
                    SELECT 1 FROM webhook_deliveries e
                    WHERE e.subscription_id = d.subscription_id
                      AND e.ordering_key = d.ordering_key
                      AND e.outbox_id < d.outbox_id
                      AND e.state IN ('pending', 'in_flight', 'retrying', 'parked')))
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
        FROM picked, webhook_outbox o, webhook_subscriptions s
        WHERE d.id = picked.id AND o.id = d.outbox_id AND s.id = d.subscription_id
        RETURNING d.id AS delivery_id, d.lease_token, d.attempt, d.subscription_id, s.url,
                  o.event_id, o.event_type, o.payload::text AS body, s.secret,
                  CASE WHEN s.previous_secret_until > now() THEN s.previous_secret END
                      AS previous_secret,
                  s.signature_header, s.signers, s.headers::text AS headers,
                  extract(epoch FROM o.created_at)::double precision AS event_created_at,
                  d.ordering_key, picked.manual_replay AS manual
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
           c.headers, c.event_created_at, c.ordering_key, c.manual
    FROM claimed c;
END $$;
