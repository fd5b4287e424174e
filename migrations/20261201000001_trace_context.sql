-- Trace context (W3C `traceparent`/`tracestate` as a JSON object) so the work a message or a
-- job causes later continues the trace that caused it.

-- The context of the span that queued each message; the relay puts it in the NATS headers.
ALTER TABLE outbox ADD COLUMN headers jsonb NOT NULL DEFAULT '{}';

-- The context of the job's submission: steps taken without a message to continue (the
-- reconciler's retries and timeouts, the registry's hand-back of a lost worker's attempts)
-- continue the job's trace from it.
ALTER TABLE jobs ADD COLUMN trace_context jsonb NOT NULL DEFAULT '{}';
