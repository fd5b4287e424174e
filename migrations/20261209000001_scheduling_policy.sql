-- Each tenant's weight (its share of contended capacity) and quotas, set by an admin. A tenant
-- without a row has weight 1 and no quota.
CREATE TABLE tenant_policies (
    tenant           text        PRIMARY KEY,
    weight           integer     NOT NULL CHECK (weight BETWEEN 1 AND 10000),
    max_queued_jobs  bigint      CHECK (max_queued_jobs >= 0),
    max_running_jobs bigint      CHECK (max_running_jobs >= 0),
    max_cpu_millis   bigint      CHECK (max_cpu_millis >= 0),
    max_memory_mb    bigint      CHECK (max_memory_mb >= 0),
    updated_at       timestamptz NOT NULL
);

-- Placement reads the head of each tenant's queue (highest priority, then oldest: ids are
-- UUIDv7), and a submission past a queue quota counts the tenant's queued jobs.
CREATE INDEX jobs_queued_by_tenant ON jobs (tenant, priority DESC, id) WHERE state = 'queued';

-- While a preemptible job's attempt is being stopped for a waiting job of a higher priority:
-- that job. Cleared when the attempt ends (the job is queued again).
ALTER TABLE jobs ADD COLUMN preempted_by uuid;
-- Whether a preemption is already under way for a waiting job (any scheduler replica asks).
CREATE INDEX jobs_preempted_by ON jobs (preempted_by) WHERE preempted_by IS NOT NULL;
