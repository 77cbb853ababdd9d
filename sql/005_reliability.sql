-- 005: endpoint health (auto-disable window, failure-ratio circuit breaker with probes), an
-- audit trail of every disable/enable/pause/resume, a probe claim, and the claim skipping
-- paused subscriptions. Secrets at rest need no schema change: `secret` and
-- `previous_secret` hold either plaintext (rows from before encryption was configured) or an
-- `enc:v1:<key id>:<base64>` envelope (dispatcher/secretbox.py).
-- Append-only: never edit a migration that has shipped; add the next number instead.

ALTER TABLE webhook_subscriptions
    -- Circuit breaker: while paused_until is in the future the claim skips the subscription.
    -- probe_at is when one replica may send a single probe delivery; paused_until outlives it
    -- by a grace period, so if the probing replica dies the pause simply runs out (fail open).
    ADD COLUMN paused_until     timestamptz,
    ADD COLUMN paused_reason    text,
    ADD COLUMN probe_at         timestamptz,
    -- Consecutive pauses without a recovery; each one doubles the pause (up to a cap).
    ADD COLUMN pause_count      integer NOT NULL DEFAULT 0,
    -- First failure since the last success; auto-disable when older than the window.
    ADD COLUMN failing_since    timestamptz,
    ADD COLUMN last_success_at  timestamptz;

-- Audit trail. No foreign key on purpose: the history of a deleted subscription is kept.
CREATE TABLE webhook_subscription_events (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id  uuid        NOT NULL,
    -- disabled | enabled | paused | resumed
    kind             text        NOT NULL CHECK (kind IN ('disabled', 'enabled', 'paused', 'resumed')),
    reason           text,
    -- application_name of the session that made the change (dispatcher, dispatcher-cli, …)
    source           text,
    at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_subscription_events_subscription
    ON webhook_subscription_events (subscription_id, id);

-- A re-enabled subscription starts with a clean health record; otherwise one that failed for
-- six days before being disabled would be disabled again at the next health check.
CREATE FUNCTION webhook_subscription_health_reset() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.enabled AND NOT OLD.enabled THEN
        NEW.paused_until := NULL;
        NEW.paused_reason := NULL;
        NEW.probe_at := NULL;
        NEW.pause_count := 0;
        NEW.failing_since := NULL;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER webhook_subscription_health_reset BEFORE UPDATE OF enabled ON webhook_subscriptions
    FOR EACH ROW EXECUTE FUNCTION webhook_subscription_health_reset();

-- Every change of enabled/paused is recorded here, whoever makes it (410 handling, the health
-- loop, the admin API, the CLI, a hand-written UPDATE). A caller can name the reason for an
-- enable or a resume with SET LOCAL dispatcher.event_reason = '…'.
CREATE FUNCTION webhook_subscription_audit() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_reason text := nullif(current_setting('dispatcher.event_reason', true), '');
    v_source text := nullif(current_setting('application_name', true), '');
BEGIN
    IF OLD.enabled AND NOT NEW.enabled THEN
        INSERT INTO webhook_subscription_events (subscription_id, kind, reason, source)
        VALUES (NEW.id, 'disabled', coalesce(NEW.disabled_reason, v_reason), v_source);
    ELSIF NEW.enabled AND NOT OLD.enabled THEN
        INSERT INTO webhook_subscription_events (subscription_id, kind, reason, source)
        VALUES (NEW.id, 'enabled', coalesce(v_reason, 'enabled'), v_source);
    END IF;
    IF NEW.enabled = OLD.enabled THEN
        IF NEW.pause_count > OLD.pause_count AND NEW.paused_until IS NOT NULL THEN
            INSERT INTO webhook_subscription_events (subscription_id, kind, reason, source)
            VALUES (NEW.id, 'paused', NEW.paused_reason, v_source);
        ELSIF OLD.paused_until IS NOT NULL AND NEW.paused_until IS NULL THEN
            INSERT INTO webhook_subscription_events (subscription_id, kind, reason, source)
            VALUES (NEW.id, 'resumed', coalesce(v_reason, 'recovered'), v_source);
        END IF;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER webhook_subscription_audit
    AFTER UPDATE OF enabled, paused_until, pause_count ON webhook_subscriptions
    FOR EACH ROW EXECUTE FUNCTION webhook_subscription_audit();

-- The probe: one delivery of a paused subscription, claimed by the replica that won the
-- probe slot (health.py moves probe_at forward under a row lock first). Same result columns
-- and lease/fencing as dispatcher_claim(), but it ignores next_attempt_at (the probe *is*
-- the retry) and paused_until (the subscription is paused by definition), and it still
-- honours ordering keys (the same rule as dispatcher_claim(), 006) and takes nothing while
-- the subscription has work in flight.
CREATE FUNCTION dispatcher_claim_probe(p_worker text, p_subscription uuid,
                                       p_lease_seconds double precision)
RETURNS TABLE (
    delivery_id bigint, lease_token bigint, attempt integer, subscription_id uuid, url text,
    event_id text, event_type text, body text, secret text, previous_secret text,
    signature_header text, signers text[], headers text, event_created_at double precision,
    ordering_key text, manual boolean, retry_policy text
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
              picked.manual_replay, s.retry_policy::text;
END $$;
