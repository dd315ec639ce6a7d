-- The runner of a saga's step under way (issue 15, goal 3: no pooled connection is held while
-- Microsoft is called).
--
-- An access grant's or RBAC migration's step runs in three parts: a short transaction under the
-- saga's advisory lock decides the step and writes `step_run` with a fresh token and the job run
-- (job id, attempt) that holds it; the step calls Microsoft with no connection held; a second
-- short transaction records the result only while `step_run` still carries that token, and
-- clears it. Another job of the saga waits while the holder's job lease is live, and takes over
-- (a new token, so a late result of the old runner is discarded) once it is not. NULL between
-- steps. Shape: {"token", "job_id", "attempt", "step", "started_at"}.
ALTER TABLE access_grants ADD COLUMN step_run jsonb;
ALTER TABLE rbac_migrations ADD COLUMN step_run jsonb;
