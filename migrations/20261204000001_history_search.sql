-- History and search read models (issue: history, search and retention).
--
-- Full-text search over jobs: a job's name, labels, command and the output tail of its latest
-- attempt, as a `simple` (no stemming, lowercased) tsvector. It lives in its own table so that
-- the GIN index is written twice in a job's life (at submission and when an attempt ends with
-- a tail), not on every state change: every `jobs` update is a non-HOT update that would add
-- an entry to each of its indexes. Both writes happen in the transaction that changes the
-- projection. Long texts are cut to 4 KiB so that no job can exceed a tsvector's 1 MiB limit
-- and fail the batch it was submitted with.
CREATE FUNCTION hodei_job_search(name text, labels jsonb, spec jsonb, tail jsonb)
RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN setweight(to_tsvector('simple', name), 'A')
    || setweight(to_tsvector('simple', left(labels::text, 4096)), 'B')
    || to_tsvector('simple', left(coalesce(spec ->> 'command', ''), 4096))
    || to_tsvector('simple', left(coalesce(tail::text, ''), 4096));

CREATE TABLE job_search (
    job_id uuid PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    search tsvector NOT NULL
);

CREATE INDEX job_search_gin ON job_search USING gin (search);

INSERT INTO job_search (job_id, search)
SELECT id, hodei_job_search(name, labels, spec, attempts -> -1 -> 'output_tail') FROM jobs;

-- ListEvents: events across jobs by time, oldest first, keyset (at, event_id).
CREATE INDEX job_events_at ON job_events (at, event_id);
