-- Retention: ended jobs and pipeline runs older than the retention age leave the hot tables
-- (`jobs`, `job_events`, `job_search`, `pipeline_runs`, `pipeline_events`) for these archive
-- tables, one short transaction per batch (see `hodei_storage::archive`).
--
-- An archived aggregate keeps its whole event history (the write model; every event already
-- has secret values masked, so nothing secret is archived) as one zstd-compressed JSON array
-- in seq order, plus the columns an archived record is found and described by. Its projection
-- is not kept: it is folded from the events when the record is read, as `GetJob --at` folds
-- any job. The application compresses: PostgreSQL compresses only values of rows over 2 KiB,
-- and most histories are shorter. The compressed bytes are stored as they are (`EXTERNAL`:
-- no second compression attempt).
CREATE TABLE jobs_archive (
    id              uuid PRIMARY KEY,
    tenant          text        NOT NULL,
    name            text        NOT NULL,
    state           text        NOT NULL,
    labels          jsonb       NOT NULL,
    pipeline_run_id uuid,
    created_at      timestamptz NOT NULL,
    ended_at        timestamptz NOT NULL,
    archived_at     timestamptz NOT NULL,
    events          bytea       NOT NULL
);
ALTER TABLE jobs_archive ALTER COLUMN events SET STORAGE EXTERNAL;

-- A run's step jobs, read with the run.
CREATE INDEX jobs_archive_run ON jobs_archive (pipeline_run_id) WHERE pipeline_run_id IS NOT NULL;

CREATE TABLE pipeline_runs_archive (
    id          uuid PRIMARY KEY,
    tenant      text        NOT NULL,
    name        text        NOT NULL,
    state       text        NOT NULL,
    created_at  timestamptz NOT NULL,
    ended_at    timestamptz NOT NULL,
    archived_at timestamptz NOT NULL,
    events      bytea       NOT NULL
);
ALTER TABLE pipeline_runs_archive ALTER COLUMN events SET STORAGE EXTERNAL;
