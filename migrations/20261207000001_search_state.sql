-- The job's state beside its search vector. A search with a state filter reads the matches'
-- `job_search` rows from the GIN index's bitmap anyway (for their ids); with the state in the
-- same rows, matches in other states are dropped there, instead of by 2,000 primary-key reads
-- of `jobs` for a word in 1 job of 500 whose jobs are all in other states (25 ms at 1M jobs).
-- `jobs::save` and `jobs::save_many` keep it current in the statement that moves the job; no
-- index covers it, so that update is a HOT update when the page has room (hence the fillfactor).
ALTER TABLE job_search ADD COLUMN state text;
UPDATE job_search s SET state = j.state FROM jobs j WHERE j.id = s.job_id;
ALTER TABLE job_search ALTER COLUMN state SET NOT NULL;
ALTER TABLE job_search SET (fillfactor = 90);
