-- Agent track 002: the submitting request's W3C trace context, kept with the job so its
-- callbacks (published by a runner, maybe on another replica, maybe after a restart) continue
-- the caller's trace. Optional and unchecked: the API stores only values that parse.
-- Append-only: never edit a migration that has shipped; add the next number instead.

ALTER TABLE agent_jobs
    ADD COLUMN IF NOT EXISTS traceparent text,
    ADD COLUMN IF NOT EXISTS tracestate text;
