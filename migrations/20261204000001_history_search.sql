-- History and search read models (issue: history, search and retention).
--
-- Full-text search over jobs: a job's name, labels, command and the output tail of its latest
-- attempt, as a `simple` (no stemming, lowercased) tsvector. It lives in its own table so that
-- the GIN index is written twice in a job's life (at submission and when an attempt ends with
-- a tail), not on every state change: every `jobs` update is a non-HOT update that would add
-- an entry to each of its indexes. Both writes happen in the transaction that changes the
-- projection. Long texts are cut to 4 KiB so that no job can exceed a tsvector's 1 MiB limit
-- and fail the batch it was submitted with.
--
-- Each text gives two kinds of lexemes: PostgreSQL's words (`build-api` gives `build-api`,
-- `build` and `api`, with positions, for phrases) and every whole token between spaces and
-- JSON punctuation (`repo-42`, `deployment.apps/web`), which PostgreSQL's parser would split
-- into `repo` and `-42`. Searches look tokens up whole (see `hodei_storage::sql::tsquery`),
-- so `repo-42` is one index lookup instead of a phrase rechecked against every `repo`.
-- Tokens longer than 256 bytes are left out (a tsvector lexeme may not exceed 2 KiB).
CREATE FUNCTION hodei_search_text(t text)
RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN to_tsvector('simple', t)
    || array_to_tsvector(ARRAY(
           SELECT DISTINCT w FROM regexp_split_to_table(lower(t), '[\s"{}\[\],:;()=<>|&!''`*]+') AS w
           WHERE w <> '' AND octet_length(w) <= 256));

CREATE FUNCTION hodei_job_search(name text, labels jsonb, spec jsonb, tail jsonb)
RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN setweight(hodei_search_text(name), 'A')
    || setweight(hodei_search_text(left(labels::text, 4096)), 'B')
    || hodei_search_text(left(coalesce(spec ->> 'command', ''), 4096))
    || hodei_search_text(left(coalesce(tail::text, ''), 4096));

CREATE TABLE job_search (
    job_id uuid PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    search tsvector NOT NULL
);

CREATE INDEX job_search_gin ON job_search USING gin (search);
-- A search page is `ORDER BY id DESC LIMIT n`: the planner walks the primary key and filters
-- when it expects many matches, and reads the GIN index first when it expects few. With the
-- default statistics a word in 1 job of 10,000 was estimated 10x too common, and a page took
-- 150 ms walking half the table; more most-common-element statistics set it right.
ALTER TABLE job_search ALTER COLUMN search SET STATISTICS 1000;

INSERT INTO job_search (job_id, search)
SELECT id, hodei_job_search(name, labels, spec, attempts -> -1 -> 'output_tail') FROM jobs;

-- ListEvents: events across jobs by time, oldest first, keyset (at, event_id).
CREATE INDEX job_events_at ON job_events (at, event_id);
