-- 011: operational events. The dispatcher announces what happens to subscriptions and
-- deliveries by writing events into its own outbox, from triggers, in the transaction of the
-- change they report: an event exists if and only if its change committed, whoever made it
-- (the endpoint health monitor, the ack, the lease reaper, /v1, the CLI, a hand-written
-- UPDATE). They route, sign, retry and order (ordering_key = the subject's id) like any event.
-- Append-only: never edit a migration that has shipped; add the next number instead.
--
-- Payload: {"type": <event type>, "timestamp": <ISO 8601>, "data": {...}} — the schemas are
-- in docs/schemas/. Never a payload, a secret, or a URL's path, query or credentials.
--
-- No recursion: an event type starting with 'dispatcher.' is operational. A dead operational
-- event announces nothing, and the health of a subscription that receives operational events
-- (a pattern 'dispatcher.…'; '*' does not match them) is not announced, so a broken
-- operations endpoint cannot feed itself; operator actions on it (disable, enable, rotate)
-- still are.
--
-- Reserved: a producer cannot INSERT a 'dispatcher.' event type (receivers trust them).
--
-- No storms: per subscription and minute, the first dispatcher.delivery.dead events (60, or
-- the session's dispatcher.dead_events_per_minute) are written; past that, dead letters only
-- add to a counter row, and one dispatcher.deliveries.dead_summary per subscription and
-- minute is written once the minute is over (dispatcher_flush_dead_summaries()).
--
-- Callers name what they do through transaction-local settings, read here:
--   dispatcher.change_kind   'gone' | 'failing' for automatic disables (default: operator),
--                            'reseal' for re-encrypting a secret (not a rotation);
--   dispatcher.failure_ratio the breaker's failure ratio when it pauses;
--   dispatcher.event_reason  the reason of an enable or resume (as for 005's audit trail).

-- The host of a subscription URL: never its credentials, path or query.
CREATE FUNCTION dispatcher_url_host(p_url text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT substring(p_url FROM '^[a-zA-Z][a-zA-Z0-9+.-]*://(?:[^@/?#]*@)?(\[[^]/]*\]|[^:/?#]*)')
$$;

-- Does this subscription receive operational events (then its health is not announced)?
CREATE FUNCTION dispatcher_receives_operational(p_event_types text[]) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT EXISTS (SELECT 1 FROM unnest(p_event_types) AS p(pattern)
                   WHERE starts_with(p.pattern, 'dispatcher.'))
$$;

-- Why a delivery died, from what the claimer and the reaper leave on it (the texts of
-- dispatcher.backoff's GiveUp reasons and the sender's blocked/signing errors).
CREATE FUNCTION dispatcher_dead_why(p_status integer, p_error text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_error LIKE 'blocked:%' THEN 'blocked'
        WHEN p_error LIKE 'signing:%' OR p_error ILIKE '%secret%' THEN 'unreadable_secret'
        WHEN p_error LIKE '%(max age exceeded%' THEN 'age'
        WHEN p_status BETWEEN 400 AND 499 AND p_status NOT IN (408, 429) THEN '4xx_rule'
        ELSE 'attempts'
    END
$$;

-- The envelope of every operational event.
CREATE FUNCTION dispatcher_event_payload(p_type text, p_data jsonb) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('type', p_type,
                              'timestamp', to_char(now() AT TIME ZONE 'UTC',
                                                   'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                              'data', p_data)
$$;

-- The 'dispatcher.' event types are reserved: a producer's INSERT of one fails with a clear
-- error (receivers must be able to trust them). The functions below switch the guard off
-- around their own INSERTs only (transaction-local, back on right after). Row-level with a
-- WHEN, so other event types never enter the function.
CREATE FUNCTION webhook_outbox_reserved_type() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('dispatcher.emitting', true), '') <> 'on' THEN
        RAISE EXCEPTION 'event type % is reserved: types starting with "dispatcher." are the dispatcher''s own operational events',
            NEW.event_type
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER webhook_outbox_reserved_type BEFORE INSERT ON webhook_outbox
    FOR EACH ROW WHEN (starts_with(NEW.event_type, 'dispatcher.'))
    EXECUTE FUNCTION webhook_outbox_reserved_type();

-- One operational event. Plain INSERT; the outbox's statement trigger wakes the routers.
CREATE FUNCTION dispatcher_emit(p_type text, p_subject text, p_data jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('dispatcher.emitting', 'on', true);
    INSERT INTO webhook_outbox (event_type, payload, ordering_key)
    VALUES (p_type, dispatcher_event_payload(p_type, p_data), p_subject);
    PERFORM set_config('dispatcher.emitting', '', true);
END $$;

-- The subscription part every subscription event carries.
CREATE FUNCTION dispatcher_subscription_subject(s webhook_subscriptions) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('subscription_id', s.id::text,
                              'url_host', dispatcher_url_host(s.url),
                              'description', s.description)
$$;

CREATE FUNCTION webhook_subscription_announce() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_kind text := coalesce(nullif(current_setting('dispatcher.change_kind', true), ''),
                            'operator');
    v_reason text := nullif(current_setting('dispatcher.event_reason', true), '');
    v_ratio double precision :=
        nullif(current_setting('dispatcher.failure_ratio', true), '')::double precision;
    v_quiet boolean := dispatcher_receives_operational(NEW.event_types);
    v_subject jsonb := dispatcher_subscription_subject(NEW);
BEGIN
    IF OLD.enabled AND NOT NEW.enabled THEN
        IF v_kind NOT IN ('gone', 'failing') THEN
            v_kind := 'operator';
        END IF;
        IF v_kind = 'operator' OR NOT v_quiet THEN
            PERFORM dispatcher_emit('dispatcher.subscription.disabled', NEW.id::text,
                v_subject || jsonb_build_object('reason', v_kind,
                                                'detail', NEW.disabled_reason,
                                                'disabled_at', coalesce(NEW.disabled_at, now())));
        END IF;
    ELSIF NEW.enabled AND NOT OLD.enabled THEN
        PERFORM dispatcher_emit('dispatcher.subscription.enabled', NEW.id::text,
            v_subject || jsonb_build_object('detail', v_reason));
    ELSIF NEW.enabled AND NOT v_quiet THEN
        -- The breaker opening and closing. 005's audit trail also records each failed probe's
        -- longer pause; announcing those would say "still paused" again and again.
        IF NEW.pause_count > OLD.pause_count AND NEW.paused_until IS NOT NULL
           AND (OLD.paused_until IS NULL OR OLD.paused_until <= now()) THEN
            PERFORM dispatcher_emit('dispatcher.subscription.paused', NEW.id::text,
                v_subject || jsonb_build_object(
                    'reason', NEW.paused_reason,
                    'failure_ratio', v_ratio,
                    -- Until the probe; paused_until adds the probe's grace on top.
                    'pause_seconds', round(greatest(0, extract(epoch FROM
                                           coalesce(NEW.probe_at, NEW.paused_until) - now())), 3),
                    'pause_count', NEW.pause_count,
                    'paused_until', NEW.paused_until));
        ELSIF OLD.paused_until IS NOT NULL AND NEW.paused_until IS NULL THEN
            PERFORM dispatcher_emit('dispatcher.subscription.resumed', NEW.id::text,
                v_subject || jsonb_build_object('reason', coalesce(v_reason, 'recovered'),
                                                'pause_count', OLD.pause_count));
        END IF;
    END IF;
    IF NEW.secret IS DISTINCT FROM OLD.secret AND v_kind <> 'reseal' THEN
        PERFORM dispatcher_emit('dispatcher.subscription.secret_rotated', NEW.id::text,
            v_subject || jsonb_build_object(
                'previous_secret_valid_until',
                CASE WHEN NEW.previous_secret_until > now() THEN NEW.previous_secret_until END));
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER webhook_subscription_announce
    AFTER UPDATE OF enabled, paused_until, pause_count, secret ON webhook_subscriptions
    FOR EACH ROW EXECUTE FUNCTION webhook_subscription_announce();

-- Dead letters per subscription and minute: the storm guard's counter and the summary's
-- material. One row per (subscription, minute) with dead letters; no foreign key, so a
-- deleted subscription's last summary still goes out.
CREATE TABLE webhook_dead_letter_counts (
    subscription_id  uuid        NOT NULL,
    minute           timestamptz NOT NULL,
    dead             bigint      NOT NULL,
    -- Past the rate: not announced one by one, left to the summary.
    suppressed       bigint      NOT NULL DEFAULT 0,
    -- The first few suppressed deliveries.
    sample_ids       bigint[]    NOT NULL DEFAULT '{}',
    summarized_at    timestamptz,
    PRIMARY KEY (subscription_id, minute)
);
CREATE INDEX webhook_dead_letter_counts_unsummarized ON webhook_dead_letter_counts (minute)
    WHERE suppressed > 0 AND summarized_at IS NULL;

-- Statement-level, on the transition tables (captured anyway for 004's count triggers), so
-- an ack or reaper statement that kills N deliveries costs one pass over its rows plus, per
-- subscription, one counter upsert; only the announced rows (at most the rate) cost an event.
-- Locking: the counter upsert row-locks (subscription, minute) until commit, so concurrent
-- statements killing deliveries of one subscription count in turn; nothing else waits on it.
CREATE FUNCTION webhook_delivery_dead_announce() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_rate bigint := coalesce(
        nullif(current_setting('dispatcher.dead_events_per_minute', true), '')::bigint, 60);
    v_minute timestamptz := date_trunc('minute', now());
    v_subs uuid[];
    v_before bigint[];
BEGIN
    -- The common case (a claim, a retry, a delivery): nothing died, nothing more to do.
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE state = 'dead') THEN
        RETURN NULL;
    END IF;

    -- Count this statement's dead letters per subscription; keep what each counter held
    -- before them (its rank in the minute starts there).
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

CREATE TRIGGER webhook_delivery_dead_announce AFTER UPDATE ON webhook_deliveries
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_delivery_dead_announce();

-- Write the summary of every finished minute that suppressed dead letters, once: SKIP
-- LOCKED so replicas flushing at the same time take disjoint rows, and summarized_at is set
-- in the transaction that writes the event. Counter rows older than a day are dropped.
-- Returns the number of summaries written.
CREATE FUNCTION dispatcher_flush_dead_summaries(p_now timestamptz DEFAULT now())
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_written integer;
BEGIN
    PERFORM set_config('dispatcher.emitting', 'on', true);
    WITH due AS (
        SELECT subscription_id, minute
        FROM webhook_dead_letter_counts
        WHERE suppressed > 0 AND summarized_at IS NULL
          AND minute < date_trunc('minute', p_now)
        ORDER BY minute
        LIMIT 1000
        FOR UPDATE SKIP LOCKED
    ), marked AS (
        UPDATE webhook_dead_letter_counts c
        SET summarized_at = now()
        FROM due
        WHERE c.subscription_id = due.subscription_id AND c.minute = due.minute
        RETURNING c.*
    )
    INSERT INTO webhook_outbox (event_type, payload, ordering_key)
    SELECT 'dispatcher.deliveries.dead_summary',
           dispatcher_event_payload('dispatcher.deliveries.dead_summary', jsonb_build_object(
               'subscription_id', m.subscription_id::text,
               'window_start', m.minute,
               'window_end', m.minute + interval '1 minute',
               'dead', m.dead,
               'announced', m.dead - m.suppressed,
               'suppressed', m.suppressed,
               'sample_delivery_ids', to_jsonb(m.sample_ids))),
           m.subscription_id::text
    FROM marked m
    ORDER BY m.minute, m.subscription_id;
    GET DIAGNOSTICS v_written = ROW_COUNT;
    PERFORM set_config('dispatcher.emitting', '', true);

    DELETE FROM webhook_dead_letter_counts
    WHERE minute < p_now - interval '1 day' AND (suppressed = 0 OR summarized_at IS NOT NULL);
    RETURN v_written;
END $$;
