-- A heartbeat rewrites its worker's row. With `last_heartbeat_at` in an index, every beat was a
-- non-HOT update: a new entry in each of the table's indexes (and dead ones for vacuum), from
-- 1,000 to 40,000 times a second. Without it a beat, and a reservation too, changes no
-- indexed column unless the worker's status moves, so PostgreSQL writes the new version on the
-- same page and leaves the indexes alone (a HOT update). The liveness sweep, which found
-- silent workers through this index, now reads the ready and draining workers and compares
-- their times: about 1 ms with 1,000 workers, and the sweep's timeline is unchanged.
DROP INDEX workers_status;
CREATE INDEX workers_status ON workers (status);

-- Room on each page for the next version of its rows, so that an update can stay on its page.
ALTER TABLE workers SET (fillfactor = 50);
