-- The public key (an X25519 "xkey", X…) the worker's current agent incarnation announced in
-- its heartbeats: the scheduler seals a job's secret values to it at assignment. NULL for
-- agents that announced none; they are given no job with secrets.
ALTER TABLE workers ADD COLUMN seal_key text;
