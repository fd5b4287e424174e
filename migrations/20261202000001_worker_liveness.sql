-- Careful liveness (issue: exactly once under every fault).
--
-- A silent worker first becomes 'unreachable' (no new work, its attempts stay its own), and is
-- only 'lost' (attempts handed back) once its lease and kill grace have passed, or when a new
-- agent incarnation or a goodbye confirms that its processes are gone. Each agent announces its
-- incarnation (new at every start), its lease and its kill grace in every heartbeat.
ALTER TABLE workers DROP CONSTRAINT IF EXISTS workers_status_check;
ALTER TABLE workers ADD CONSTRAINT workers_status_check
    CHECK (status IN ('ready', 'draining', 'unreachable', 'lost', 'offline'));
ALTER TABLE workers
    ADD COLUMN incarnation   uuid,
    ADD COLUMN lease_ms      bigint NOT NULL DEFAULT 15000 CHECK (lease_ms > 0),
    ADD COLUMN kill_grace_ms bigint NOT NULL DEFAULT 10000 CHECK (kill_grace_ms >= 0);
