-- A claim whose work is O(batch), flat in the number of tenants and in the queue's depth.
--
-- `queue_tenants` keeps, per tenant, how many of its jobs run (across all workers) and the
-- earliest `run_at` among its queued jobs (NULL when it has none). The claim takes the tenants
-- with the earliest runnable work from the partial index below (`FOR UPDATE SKIP LOCKED`, so two
-- claimers never serve the same tenant at once and the per-tenant cap holds across workers), then
-- each one's oldest runnable jobs up to its free slots from `jobs_queued_by_tenant`.
--
-- Statement-level triggers keep the table exact in the same transaction as every change to
-- `jobs` (enqueue, claim, outcome, reap, cancel, wake, purge, and direct SQL alike), one upsert
-- per statement rather than one per row.

CREATE TABLE queue_tenants (
    tenant_id    uuid PRIMARY KEY,
    -- Jobs of this tenant in state 'running'.
    running      integer NOT NULL DEFAULT 0,
    -- The earliest run_at among its queued jobs; NULL when none is queued.
    next_run_at  timestamptz
);
-- Tenants at their cap stay in this index, but there are at most (jobs running) / cap of them,
-- so the claim skips at most that many entries: bounded by the workers' concurrency, not by the
-- number of tenants.
CREATE INDEX queue_tenants_next ON queue_tenants (next_run_at) WHERE next_run_at IS NOT NULL;

INSERT INTO queue_tenants (tenant_id, running, next_run_at)
SELECT tenant_id,
       count(*) FILTER (WHERE state = 'running'),
       min(run_at) FILTER (WHERE state = 'queued')
FROM jobs WHERE state IN ('queued', 'running')
GROUP BY tenant_id;

-- Apply per-tenant deltas: `running` changes and the earliest run_at of jobs entering the queue;
-- tenants named in `recompute` lost a queued job (or one moved later) and have next_run_at
-- recomputed. The recompute is a separate statement run after the first one holds the tenants'
-- row locks, so its snapshot includes every enqueue that committed before we got the lock.
CREATE FUNCTION queue_tenants_apply(ids uuid[], deltas integer[], entered timestamptz[],
                                    recompute uuid[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF ids IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO queue_tenants AS q (tenant_id, running, next_run_at)
    SELECT u.tenant_id, u.delta, u.entered
    FROM unnest(ids, deltas, entered) AS u(tenant_id, delta, entered)
    ORDER BY u.tenant_id
    ON CONFLICT (tenant_id) DO UPDATE
        SET running = q.running + EXCLUDED.running,
            -- least() ignores NULLs.
            next_run_at = least(q.next_run_at, EXCLUDED.next_run_at);
    IF recompute IS NOT NULL THEN
        UPDATE queue_tenants q SET next_run_at = (
            SELECT j.run_at FROM jobs j
            WHERE j.tenant_id = q.tenant_id AND j.state = 'queued'
            ORDER BY j.run_at LIMIT 1)
        WHERE q.tenant_id = ANY(recompute);
    END IF;
END $$;

CREATE FUNCTION queue_tenants_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids uuid[]; deltas integer[]; entered timestamptz[];
BEGIN
    SELECT array_agg(tenant_id ORDER BY tenant_id), array_agg(running ORDER BY tenant_id),
           array_agg(first ORDER BY tenant_id)
    INTO ids, deltas, entered
    FROM (SELECT tenant_id,
                 count(*) FILTER (WHERE state = 'running')::integer AS running,
                 min(run_at) FILTER (WHERE state = 'queued') AS first
          FROM new_rows WHERE state IN ('queued', 'running') GROUP BY tenant_id) d;
    PERFORM queue_tenants_apply(ids, deltas, entered, NULL);
    RETURN NULL;
END $$;

CREATE FUNCTION queue_tenants_on_update() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids uuid[]; deltas integer[]; entered timestamptz[]; recompute uuid[];
BEGIN
    -- Heartbeats and payload updates change neither state nor a queued run_at: nothing to do.
    SELECT array_agg(tenant_id ORDER BY tenant_id), array_agg(running ORDER BY tenant_id),
           array_agg(first ORDER BY tenant_id),
           array_agg(tenant_id ORDER BY tenant_id) FILTER (WHERE left_queue)
    INTO ids, deltas, entered, recompute
    FROM (SELECT n.tenant_id,
                 sum((n.state = 'running')::integer - (o.state = 'running')::integer)::integer
                     AS running,
                 min(n.run_at) FILTER (WHERE n.state = 'queued') AS first,
                 bool_or(o.state = 'queued' AND (n.state <> 'queued' OR n.run_at > o.run_at))
                     AS left_queue
          FROM old_rows o JOIN new_rows n ON n.id = o.id
          WHERE o.state <> n.state OR (n.state = 'queued' AND n.run_at <> o.run_at)
          GROUP BY n.tenant_id) d;
    PERFORM queue_tenants_apply(ids, deltas, entered, recompute);
    RETURN NULL;
END $$;

CREATE FUNCTION queue_tenants_on_delete() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids uuid[]; deltas integer[]; recompute uuid[];
BEGIN
    SELECT array_agg(tenant_id ORDER BY tenant_id), array_agg(running ORDER BY tenant_id),
           array_agg(tenant_id ORDER BY tenant_id) FILTER (WHERE queued)
    INTO ids, deltas, recompute
    FROM (SELECT tenant_id,
                 -count(*) FILTER (WHERE state = 'running')::integer AS running,
                 bool_or(state = 'queued') AS queued
          FROM old_rows WHERE state IN ('queued', 'running') GROUP BY tenant_id) d;
    IF ids IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM queue_tenants_apply(ids, deltas, array_fill(NULL::timestamptz, ARRAY[cardinality(ids)]),
                                recompute);
    RETURN NULL;
END $$;

CREATE TRIGGER queue_tenants_insert AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION queue_tenants_on_insert();
CREATE TRIGGER queue_tenants_update AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION queue_tenants_on_update();
CREATE TRIGGER queue_tenants_delete AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION queue_tenants_on_delete();
-- TRUNCATE fires no row or statement DML trigger: start over.
CREATE FUNCTION queue_tenants_on_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM queue_tenants;
    RETURN NULL;
END $$;
CREATE TRIGGER queue_tenants_truncate AFTER TRUNCATE ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION queue_tenants_on_truncate();
