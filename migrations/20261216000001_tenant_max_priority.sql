-- The highest priority a tenant's jobs count with (placement order and preemption): a job
-- asking for more keeps its own priority but counts with this. NULL: no cap.
ALTER TABLE tenant_policies ADD COLUMN max_priority integer
    CHECK (max_priority BETWEEN -1000 AND 1000);
