-- One pgbench transaction = claim 10 jobs (one statement, its own commit), then complete the
-- same 10 (one statement, its own commit): jobs/s = tps × 10.
WITH c AS (SELECT id FROM q WHERE state = 'queued' ORDER BY id LIMIT 10 FOR UPDATE SKIP LOCKED),
     u AS (UPDATE q SET state = 'running' FROM c WHERE q.id = c.id RETURNING q.id)
SELECT quote_literal(coalesce(array_agg(id), '{}')::text) AS ids FROM u \gset
UPDATE q SET state = 'done' WHERE id = ANY (:ids::bigint[]);
