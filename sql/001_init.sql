-- 001: outbox, subscriptions, deliveries, attempt log.
-- Append-only: never edit a migration that has shipped; add the next number instead.

CREATE TABLE webhook_subscriptions (
    id                       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    url                      text        NOT NULL CHECK (url ~ '^https?://'),
    event_types              text[]      NOT NULL CHECK (cardinality(event_types) > 0),
    secret                   text        NOT NULL,
    previous_secret          text,
    previous_secret_until    timestamptz,
    signature_header         text,
    signers                  text[]      NOT NULL DEFAULT '{}',
    headers                  jsonb       NOT NULL DEFAULT '{}',
    max_in_flight            integer     NOT NULL DEFAULT 10 CHECK (max_in_flight BETWEEN 1 AND 10000),
    rate_limit_per_second    double precision CHECK (rate_limit_per_second > 0),
    retry_policy             jsonb,
    description              text        NOT NULL DEFAULT '',
    metadata                 jsonb       NOT NULL DEFAULT '{}',
    enabled                  boolean     NOT NULL DEFAULT true,
    disabled_reason          text,
    disabled_at              timestamptz,
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now()
);

-- The outbox is the producers' contract (DESIGN.md, contract 1): event_type and payload are
-- required; event_id, subscription_id and ordering_key are optional.
CREATE TABLE webhook_outbox (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id         text        NOT NULL DEFAULT ('evt_' || replace(gen_random_uuid()::text, '-', ''))
                                 CHECK (length(event_id) BETWEEN 1 AND 200),
    event_type       text        NOT NULL CHECK (length(event_type) BETWEEN 1 AND 200),
    payload          jsonb       NOT NULL,
    subscription_id  uuid,
    ordering_key     text        CHECK (length(ordering_key) <= 200),
    created_at       timestamptz NOT NULL DEFAULT now(),
    routed_at        timestamptz,
    -- routed | unmatched | unknown_subscription
    route_result     text,
    delivery_count   integer,
    CONSTRAINT webhook_outbox_event_id_key UNIQUE (event_id)
);
-- The router reads only unrouted rows, in insert order.
CREATE INDEX webhook_outbox_unrouted ON webhook_outbox (id) WHERE routed_at IS NULL;
CREATE INDEX webhook_outbox_unmatched ON webhook_outbox (id) WHERE route_result <> 'routed';

CREATE SEQUENCE webhook_lease_token_seq AS bigint;

CREATE TABLE webhook_deliveries (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    outbox_id         bigint      NOT NULL REFERENCES webhook_outbox (id) ON DELETE CASCADE,
    subscription_id   uuid        NOT NULL REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    ordering_key      text,
    -- pending: never tried · in_flight: leased to a worker · retrying: waiting for next_attempt_at
    -- delivered · dead · parked: held while its subscription is disabled · cancelled
    state             text        NOT NULL DEFAULT 'pending'
                                  CHECK (state IN ('pending', 'in_flight', 'retrying', 'delivered',
                                                   'dead', 'parked', 'cancelled')),
    attempt           integer     NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    leased_until      timestamptz,
    lease_token       bigint,
    leased_by         text,
    last_status       integer,
    last_error        text,
    event_created_at  timestamptz NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    CONSTRAINT webhook_deliveries_event_subscription_key UNIQUE (outbox_id, subscription_id)
);
-- Claim: due work per subscription, oldest first.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (subscription_id, next_attempt_at, id)
    WHERE state IN ('pending', 'retrying');
-- Per-subscription in-flight count (bounded by max_in_flight) and lease expiry.
CREATE INDEX webhook_deliveries_in_flight ON webhook_deliveries (subscription_id, leased_until)
    WHERE state = 'in_flight';
-- Ordering: is an earlier delivery with the same key still unfinished?
CREATE INDEX webhook_deliveries_ordering ON webhook_deliveries (subscription_id, ordering_key, outbox_id)
    WHERE ordering_key IS NOT NULL AND state IN ('pending', 'in_flight', 'retrying', 'parked');
-- Queue-depth gauges and listings.
CREATE INDEX webhook_deliveries_state ON webhook_deliveries (state, subscription_id);
CREATE INDEX webhook_deliveries_oldest ON webhook_deliveries (subscription_id, event_created_at)
    WHERE state IN ('pending', 'in_flight', 'retrying');

CREATE TABLE webhook_attempts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id     bigint      NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt         integer     NOT NULL,
    manual          boolean     NOT NULL DEFAULT false,
    started_at      timestamptz NOT NULL,
    duration_ms     double precision NOT NULL,
    outcome         text        NOT NULL,
    status_code     integer,
    error           text,
    response_body   text,
    worker          text,
    -- false when the fencing token no longer matched: a stale worker's result, logged but not applied
    applied         boolean     NOT NULL DEFAULT true
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);

-- Wake dispatchers when producers commit new events (one notification per statement).
CREATE FUNCTION webhook_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dispatcher_outbox', '');
    RETURN NULL;
END $$;

CREATE TRIGGER webhook_outbox_notify AFTER INSERT ON webhook_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_outbox_notify();

-- Unrouted events with an ordering key: the claims' ordering rule (006_claim.sql) checks them.
CREATE INDEX webhook_outbox_unrouted_key ON webhook_outbox (ordering_key, id)
    WHERE routed_at IS NULL AND ordering_key IS NOT NULL;

-- The claim function, dispatcher_claim(), is defined once in 006_claim.sql, after every
-- column it reads exists.
