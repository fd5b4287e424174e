-- A worker's beats in a table of their own. Every beat rewrote the worker's whole row (its
-- labels, its held attempts and their generated incarnation test) and waited for the row
-- locks the placements take to reserve slots, while placements waited for the beats' locks:
-- with 1,000 simulated agents beating once a second, `throughput` ran a tenth faster when
-- they beat four times less often. The time of the last beat and the usage it reported now
-- live here, one narrow row a worker that only beats write; `workers` is written by a beat
-- only when it changes something else (registration, labels, capacity, lease terms, the
-- agent's incarnation or key, its status). No foreign key: its check would lock the worker's
-- row against the placements again. Workers are never deleted.
CREATE TABLE worker_beats (
    worker_id         text        PRIMARY KEY,
    last_heartbeat_at timestamptz NOT NULL,
    usage             jsonb       NOT NULL
) WITH (fillfactor = 50);

INSERT INTO worker_beats (worker_id, last_heartbeat_at, usage)
SELECT id, last_heartbeat_at, usage FROM workers;

-- During a rolling update, services of the previous release still read and write
-- `workers.last_heartbeat_at` and `workers.usage`, so the columns stay: this release never
-- writes them (the defaults fill them for the workers it registers) and reads each worker's
-- later beat of the two places. Every worker gets its beat row when it is inserted, whoever
-- inserts it, so a worker registered by a previous release's registry is still found silent.
ALTER TABLE workers
    ALTER COLUMN last_heartbeat_at SET DEFAULT now(),
    ALTER COLUMN usage SET DEFAULT
        '{"cpu_percent": 0, "memory_used_mb": 0, "memory_total_mb": 0, "load_1m": 0}'::jsonb;

CREATE FUNCTION hodei_worker_beat_row() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO worker_beats (worker_id, last_heartbeat_at, usage)
    VALUES (NEW.id, NEW.last_heartbeat_at, NEW.usage)
    ON CONFLICT (worker_id) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER workers_beat_row AFTER INSERT ON workers
    FOR EACH ROW EXECUTE FUNCTION hodei_worker_beat_row();
