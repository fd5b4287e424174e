-- Pipeline runs: the projection of each run's event history, updated in the same transaction
-- as its events are appended (`version` = seq of the last event), and locked (`FOR UPDATE`)
-- by every transaction that moves one of its steps, so concurrent step endings serialise.
CREATE TABLE pipeline_runs (
    id               uuid PRIMARY KEY,
    tenant           text        NOT NULL,
    name             text        NOT NULL,
    state            text        NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    spec             jsonb       NOT NULL,
    steps            jsonb       NOT NULL,
    cancel_requested boolean     NOT NULL,
    failing_fast     boolean     NOT NULL,
    idempotency_key  text,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    version          bigint      NOT NULL,
    trace_context    jsonb       NOT NULL DEFAULT '{}'
);

-- Idempotent submission: one run per (tenant, key).
CREATE UNIQUE INDEX pipeline_runs_idempotency_key ON pipeline_runs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- ListPipelineRuns by state, newest first (UUIDv7 ids sort by creation).
CREATE INDEX pipeline_runs_state_id ON pipeline_runs (state, id DESC);

-- The append-only history of each run.
CREATE TABLE pipeline_events (
    run_id   uuid        NOT NULL REFERENCES pipeline_runs (id),
    seq      bigint      NOT NULL CHECK (seq >= 1),
    event_id uuid        NOT NULL UNIQUE,
    type     text        NOT NULL,
    at       timestamptz NOT NULL,
    data     jsonb       NOT NULL,
    PRIMARY KEY (run_id, seq)
);

-- A step's job knows its run and step, so the transaction that ends the job moves the run.
ALTER TABLE jobs ADD COLUMN pipeline_run_id uuid REFERENCES pipeline_runs (id);
ALTER TABLE jobs ADD COLUMN pipeline_step text;
CREATE INDEX jobs_pipeline_run ON jobs (pipeline_run_id) WHERE pipeline_run_id IS NOT NULL;
