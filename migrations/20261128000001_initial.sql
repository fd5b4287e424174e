-- Jobs: the projection of each job's event history, updated in the same transaction as the
-- events are appended. `version` is the seq of the last event (optimistic concurrency).
CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    tenant           text        NOT NULL,
    name             text        NOT NULL,
    state            text        NOT NULL CHECK (state IN ('queued', 'assigned', 'running', 'succeeded', 'failed', 'cancelled', 'timed_out')),
    priority         integer     NOT NULL,
    spec             jsonb       NOT NULL,
    labels           jsonb       NOT NULL,
    idempotency_key  text,
    attempts         jsonb       NOT NULL,
    current_attempt  integer     NOT NULL,
    worker_id        text,
    cancel_requested boolean     NOT NULL,
    not_before       timestamptz,
    reason           text,
    exit_code        integer,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    version          bigint      NOT NULL
);

-- Idempotent submission: one job per (tenant, key).
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- ListJobs by state, newest first (ids are UUIDv7, so id order is creation order).
CREATE INDEX jobs_state_id ON jobs (state, id DESC);
-- ListJobs by labels.
CREATE INDEX jobs_labels ON jobs USING gin (labels jsonb_path_ops);
-- Jobs on a worker, for lost-worker handling.
CREATE INDEX jobs_active_worker ON jobs (worker_id) WHERE state IN ('assigned', 'running');

-- The append-only event store: the audit trail from which every projection can be rebuilt.
CREATE TABLE job_events (
    job_id   uuid        NOT NULL REFERENCES jobs (id),
    seq      bigint      NOT NULL CHECK (seq >= 1),
    event_id uuid        NOT NULL UNIQUE,
    type     text        NOT NULL,
    at       timestamptz NOT NULL,
    data     jsonb       NOT NULL,
    PRIMARY KEY (job_id, seq)
);

-- Transactional outbox: messages committed with the state change that caused them, relayed
-- to JetStream (Nats-Msg-Id = id) and deleted once the server acknowledged them.
CREATE TABLE outbox (
    position   bigserial PRIMARY KEY,
    id         uuid        NOT NULL UNIQUE,
    subject    text        NOT NULL,
    payload    bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Workers, written by the registry (heartbeats, liveness) and the schedulers (reservations:
-- `held` and `version`, updated only with `WHERE version = expected`).
CREATE TABLE workers (
    id                  text PRIMARY KEY,
    labels              jsonb       NOT NULL,
    cpu_millis          bigint      NOT NULL,
    memory_mb           bigint      NOT NULL,
    max_concurrent_jobs integer     NOT NULL,
    status              text        NOT NULL CHECK (status IN ('ready', 'draining', 'lost', 'offline')),
    held                jsonb       NOT NULL,
    usage               jsonb       NOT NULL,
    registered_at       timestamptz NOT NULL,
    last_heartbeat_at   timestamptz NOT NULL,
    version             bigint      NOT NULL
);

CREATE INDEX workers_status ON workers (status, last_heartbeat_at);

-- Jobs on workers by age, for the reconciler's overdue checks.
CREATE INDEX jobs_on_workers_updated ON jobs (updated_at) WHERE state IN ('assigned', 'running');
