-- Schedules: a job or pipeline template started on a cron expression (docs/ARCHITECTURE.md,
-- "Schedules"). A scheduler replica claims due schedules with FOR UPDATE SKIP LOCKED and, in
-- one transaction, records each tick it handles, the job or run the tick starts and the
-- schedule's next tick. The primary key of schedule_ticks makes a second firing of a tick
-- impossible whatever the replicas do.
CREATE TABLE schedules (
    id          uuid        PRIMARY KEY,
    tenant      text        NOT NULL,
    name        text        NOT NULL,
    spec        jsonb       NOT NULL,
    paused      boolean     NOT NULL,
    next_tick   timestamptz,
    fire_at     timestamptz,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    version     bigint      NOT NULL,
    UNIQUE (tenant, name)
);

-- What the replicas poll: the active schedules by when they fire next.
CREATE INDEX schedules_due ON schedules (fire_at) WHERE NOT paused AND fire_at IS NOT NULL;

CREATE TABLE schedule_ticks (
    schedule_id uuid        NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    tick        timestamptz NOT NULL,
    -- fired (a tick started a job or run), triggered (by hand), skipped (overlap policy),
    -- missed (older than the catch-up window; one row for a run of them, at the last one).
    outcome     text        NOT NULL CHECK (outcome IN ('fired', 'triggered', 'skipped', 'missed')),
    handled_at  timestamptz NOT NULL,
    job_id      uuid,
    run_id      uuid,
    detail      text        NOT NULL DEFAULT '',
    PRIMARY KEY (schedule_id, tick)
);

-- The overlap check: a schedule's ticks that started something.
CREATE INDEX schedule_ticks_started ON schedule_ticks (schedule_id, tick DESC)
    WHERE job_id IS NOT NULL OR run_id IS NOT NULL;

