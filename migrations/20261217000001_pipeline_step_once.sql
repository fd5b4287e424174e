-- A step of a pipeline run starts one job, ever: the run's row lock and version already make
-- its transitions one at a time, and this makes a second job for the same step fail with a
-- unique violation (retried as a conflict, the run read again) whatever path created it. It
-- replaces the index on pipeline_run_id alone, whose look-ups it serves as its first column.
CREATE UNIQUE INDEX jobs_pipeline_step ON jobs (pipeline_run_id, pipeline_step)
    WHERE pipeline_run_id IS NOT NULL;
DROP INDEX jobs_pipeline_run;
