-- The raw SQL limit for bench/queue.sh: the least a PostgreSQL queue can do per job, with no
-- tenants, leases, fencing or payloads. :rows jobs queued up front.
CREATE TABLE q (id bigint PRIMARY KEY, state text NOT NULL, run_at timestamptz NOT NULL);
INSERT INTO q SELECT i, 'queued', now() FROM generate_series(1, :rows) AS i;
CREATE INDEX q_queued ON q (id) WHERE state = 'queued';
VACUUM ANALYZE q;
