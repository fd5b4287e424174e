-- Retention: ended jobs and pipeline runs older than the retention age leave the hot tables
-- (`jobs`, `job_events`, `job_search`, `pipeline_runs`, `pipeline_events`) for these archive
-- tables, one short transaction per batch (see `hodei_storage::archive`).
--
-- An archived aggregate keeps its whole event history (the write model; every event already
-- has secret values masked, so nothing secret is archived) as one JSON array in seq order,
-- plus the columns an archived record is found and described by. Its projection is not kept:
-- it is folded from the events when the record is read, as `GetJob ... --at` folds any job.
-- Long values are compressed (lz4 where the server has it, PostgreSQL's pglz otherwise), and
-- a row is compressed from 128 bytes on instead of the default 2 KiB.
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
    events          jsonb       NOT NULL
) WITH (toast_tuple_target = 128);

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
    events      jsonb       NOT NULL
) WITH (toast_tuple_target = 128);

DO $$
BEGIN
    ALTER TABLE jobs_archive ALTER COLUMN events SET COMPRESSION lz4;
    ALTER TABLE pipeline_runs_archive ALTER COLUMN events SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 is not available: archives are compressed with pglz';
END
$$;
