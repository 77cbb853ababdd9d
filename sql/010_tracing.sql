-- 010: W3C Trace Context on outbox events, so a delivery's spans continue the producer's trace.
-- Append-only: never edit a migration that has shipped; add the next number instead.
--
-- Both columns are optional and unchecked on purpose: a producer that writes a malformed value
-- must not have its business transaction fail over a tracing header. The dispatcher reads
-- them leniently (dispatcher/tracing.py): anything that does not parse starts a new trace.
-- IF NOT EXISTS: another migration may add the same columns (the claim returns them).

ALTER TABLE webhook_outbox
    ADD COLUMN IF NOT EXISTS traceparent text,
    ADD COLUMN IF NOT EXISTS tracestate text;
