-- A worker's beats in a table of their own. Every beat rewrote the worker's whole row (its
-- labels, its held attempts and their generated incarnation test) and waited for the row
-- locks the placements take to reserve slots, while placements waited for the beats' locks:
-- with 1,000 simulated agents beating once a second, `throughput` ran a fifth faster when
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

ALTER TABLE workers DROP COLUMN last_heartbeat_at, DROP COLUMN usage;
