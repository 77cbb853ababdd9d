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
