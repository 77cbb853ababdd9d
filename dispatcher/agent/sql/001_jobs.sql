-- Agent track 001: the reference lead-qualification agent's job table, applied by
-- `dispatcher agent --migrate` (the dispatcher's own migrations never create it).
-- Append-only: never edit a migration that has shipped; add the next number instead.
-- IF NOT EXISTS: databases migrated before the agent had its own track got this table from
-- the dispatcher's former 002_agent.sql (the same definition); they adopt it as it is.

CREATE TABLE IF NOT EXISTS agent_jobs (
    id               text        PRIMARY KEY CHECK (id ~ '^lq-[0-9a-f]{20}$'),
    -- QUEUED → DATA_ENRICHMENT_COMPLETE → CRITERIA_CHECK_COMPLETE → COMPLETE, or FAILED.
    status           text        NOT NULL DEFAULT 'QUEUED'
                                 CHECK (status IN ('QUEUED', 'DATA_ENRICHMENT_COMPLETE',
                                                   'CRITERIA_CHECK_COMPLETE', 'COMPLETE', 'FAILED')),
    -- Steps committed so far (0..3); a resumed job continues at the next one.
    step             integer     NOT NULL DEFAULT 0 CHECK (step BETWEEN 0 AND 3),
    current_step     text        NOT NULL DEFAULT 'Queued',
    percentage       integer     NOT NULL DEFAULT 0 CHECK (percentage BETWEEN 0 AND 100),
    prospects        jsonb       NOT NULL,
    criteria         jsonb       NOT NULL,
    webhook_url      text        NOT NULL CHECK (webhook_url ~ '^https?://'),
    -- The callback subscription (uuid5 of the URL). No foreign key on purpose: a deleted
    -- subscription must make the callback unroutable, never turn it into a fan-out.
    subscription_id  uuid        NOT NULL,
    enriched         jsonb,
    checked          jsonb,
    results          jsonb,
    error            text,
    -- How often a runner has picked the job up; a job that keeps crashing its runner fails.
    runs             integer     NOT NULL DEFAULT 0,
    last_worker      text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);

-- Runners look only for unfinished jobs, oldest first.
CREATE INDEX IF NOT EXISTS agent_jobs_unfinished ON agent_jobs (created_at, id)
    WHERE status NOT IN ('COMPLETE', 'FAILED');
