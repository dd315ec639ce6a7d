-- A cheaper claim (issue 15): one round trip and one commit per batch, no trigger work on the
-- claim and completion paths.
--
-- Before, statement-level triggers with transition tables kept `queue_tenants` exact on every
-- UPDATE of `jobs`, including the claim and every completion. That was about half of a claim's
-- time. Now:
--
-- * `queue_tenants.running` is gone: the claim counts a tenant's running jobs itself, from the
--   `jobs_running` partial index, for the tenants it looks at only.
-- * `queue_tenants.next_run_at` is a lower bound: never later than the tenant's earliest queued
--   job, possibly earlier (a job that left the queue, by a claim, a cancel or a purge, leaves it
--   behind). Jobs entering the queue lower it: the INSERT trigger for new jobs, and a row-level
--   UPDATE trigger whose WHEN clause (evaluated without calling PL/pgSQL) matches only rows that
--   enter the queue or move earlier in it. A claim that meets a tenant whose bound was stale finds
--   nothing runnable there and sets the bound right.
-- * `queue_claim` settles the runs that ended (succeeded or rescheduled, fenced by attempt) and
--   claims the next batch in one call: one statement, one commit.
--
-- Not compatible with the previous release's claim, which reads `running`: during a rolling
-- update its workers cannot claim (their statement fails; nothing is claimed twice) and write
-- their last outcomes when they stop. docs/deploy.md says how to upgrade past this one.

DROP TRIGGER queue_tenants_update ON jobs;
DROP TRIGGER queue_tenants_delete ON jobs;
DROP TRIGGER queue_tenants_insert ON jobs;
DROP FUNCTION queue_tenants_on_update();
DROP FUNCTION queue_tenants_on_delete();
DROP FUNCTION queue_tenants_on_insert();
DROP FUNCTION queue_tenants_apply(uuid[], integer[], timestamptz[], uuid[]);
ALTER TABLE queue_tenants DROP COLUMN running;

-- Jobs entered the queue: lower each tenant's bound to its earliest new `run_at` (never raise it),
-- then wake the listeners once with the seconds until the earliest of them is runnable (0 when it
-- already is; see migration 0015). Tenants are locked in id order, so two callers cannot deadlock.
CREATE FUNCTION queue_tenants_entered(ids uuid[], firsts timestamptz[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    first timestamptz;
BEGIN
    INSERT INTO queue_tenants AS q (tenant_id, next_run_at)
    SELECT u.tenant_id, min(u.first) FROM unnest(ids, firsts) AS u(tenant_id, first)
    GROUP BY u.tenant_id
    ORDER BY u.tenant_id
    ON CONFLICT (tenant_id) DO UPDATE SET next_run_at = EXCLUDED.next_run_at
        WHERE q.next_run_at IS NULL OR q.next_run_at > EXCLUDED.next_run_at;
    SELECT min(f) INTO first FROM unnest(firsts) AS f;
    IF first IS NOT NULL THEN
        PERFORM pg_notify('mailscope_jobs',
            round(greatest(extract(epoch FROM first - clock_timestamp()), 0), 3)::text);
    END IF;
END $$;

CREATE FUNCTION queue_tenants_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids uuid[]; firsts timestamptz[];
BEGIN
    SELECT array_agg(tenant_id), array_agg(run_at) INTO ids, firsts
    FROM new_rows WHERE state = 'queued';
    IF ids IS NOT NULL THEN
        PERFORM queue_tenants_entered(ids, firsts);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER queue_tenants_insert AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION queue_tenants_on_insert();

-- A job back in the queue (released, rescheduled or retried by `record`, requeued) or moved
-- earlier (woken). `queue_claim` for the runs it settles and the reaper for the leases it ends do
-- this themselves, for all their jobs at once in tenant order, and say so with the
-- transaction-local setting below.
CREATE FUNCTION queue_tenants_on_requeue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM queue_tenants_entered(ARRAY[NEW.tenant_id], ARRAY[NEW.run_at]);
    RETURN NULL;
END $$;
CREATE TRIGGER queue_tenants_requeue AFTER UPDATE OF state, run_at ON jobs FOR EACH ROW
    WHEN (NEW.state = 'queued' AND (OLD.state <> 'queued' OR NEW.run_at < OLD.run_at)
          AND current_setting('mailscope.queue_settling', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION queue_tenants_on_requeue();

-- Settle, then claim. Settle: the runs in `s_*` that ended (`s_done`: succeeded with `s_results`,
-- else rescheduled to `s_run_ats` with `s_payloads` when not NULL), each only while its attempt
-- still holds it; returns those rows as written (state `succeeded` or `queued`). Claim: up to
-- `lim` runnable jobs of `kinds`, at most `cap` running per tenant, oldest first over tenants;
-- returns them as claimed (state `running`). A job rescheduled to now can come back twice, settled
-- then claimed, in that order.
--
-- The claim takes the tenants with the earliest bound and a free slot from the partial index on
-- `next_run_at` (`FOR UPDATE SKIP LOCKED`: two claimers never serve one tenant at once, so the cap
-- holds across workers), then each one's oldest runnable jobs up to its free slots, keeps the
-- oldest `lim`, marks them running, and sets the tenants' bounds to their earliest queued job.
-- That last statement runs after the tenants are locked, so it sees every enqueue that committed
-- before; an enqueue still open waits for this commit and then lowers the bound itself. Each
-- statement reads at most `lim` tenants and `lim` × `cap` jobs: the work does not grow with the
-- number of tenants or the queue's depth. A tenant whose bound was stale gave nothing; the claim
-- then looks further, a few rounds at most. JIT is off: the plans are a handful of index probes.
CREATE FUNCTION queue_claim(kinds text[], cap bigint, lim bigint, owner text,
                            lease double precision,
                            s_ids uuid[], s_attempts integer[], s_done boolean[],
                            s_results jsonb[], s_run_ats timestamptz[], s_payloads jsonb[])
RETURNS SETOF jobs LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    visited uuid[]; free bigint[]; picked uuid[]; served bigint; n bigint; got bigint := 0;
    rounds integer := 0; requeues boolean; requeued_ids uuid[]; requeued_at timestamptz[];
BEGIN
    IF cardinality(s_ids) > 0 THEN
        -- Only rescheduled runs re-enter the queue; a batch of successes needs none of this.
        requeues := false = ANY(s_done);
        IF requeues THEN
            PERFORM set_config('mailscope.queue_settling', 'on', true);
        END IF;
        RETURN QUERY
        UPDATE jobs j SET
            state = CASE WHEN d.done THEN 'succeeded' ELSE 'queued' END,
            result = CASE WHEN d.done THEN d.result ELSE j.result END,
            run_at = CASE WHEN d.done THEN j.run_at ELSE d.run_at END,
            payload = coalesce(d.payload, j.payload),
            finished_at = CASE WHEN d.done THEN now() ELSE j.finished_at END,
            failures = 0, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
        FROM unnest(s_ids, s_attempts, s_done, s_results, s_run_ats, s_payloads)
             AS d(id, attempt, done, result, run_at, payload)
        WHERE j.id = d.id AND j.attempt = d.attempt AND j.state = 'running'
        RETURNING j.*;
        IF requeues THEN
            PERFORM set_config('mailscope.queue_settling', '', true);
            SELECT array_agg(j.tenant_id), array_agg(j.run_at) INTO requeued_ids, requeued_at
            FROM jobs j JOIN unnest(s_ids, s_attempts, s_done) AS d(id, attempt, done)
                 ON j.id = d.id AND j.attempt = d.attempt
            WHERE NOT d.done AND j.state = 'queued';
            IF requeued_ids IS NOT NULL THEN
                PERFORM queue_tenants_entered(requeued_ids, requeued_at);
            END IF;
        END IF;
    END IF;
    WHILE got < lim AND rounds < 4 LOOP
        rounds := rounds + 1;
        SELECT array_agg(t.tenant_id), array_agg(t.free) INTO visited, free FROM (
            SELECT q.tenant_id, cap - r.running AS free FROM queue_tenants q
            CROSS JOIN LATERAL (SELECT count(*) AS running FROM jobs r
                                WHERE r.tenant_id = q.tenant_id AND r.state = 'running') r
            WHERE q.next_run_at <= now() AND r.running < cap
            ORDER BY q.next_run_at
            LIMIT lim - got
            FOR UPDATE OF q SKIP LOCKED) t;
        EXIT WHEN visited IS NULL;
        -- No row locks here: claimers serve a tenant only while holding its row, so the jobs
        -- are ours to take; the UPDATE re-checks the state of any a cancel changed meanwhile.
        SELECT array_agg(p.id), count(DISTINCT p.tenant_id) INTO picked, served FROM (
            SELECT c.id, t.tenant_id FROM unnest(visited, free) AS t(tenant_id, free)
            CROSS JOIN LATERAL (
                SELECT j.id, j.run_at FROM jobs j
                WHERE j.state = 'queued' AND j.tenant_id = t.tenant_id
                  AND j.run_at <= now() AND j.kind = ANY(kinds)
                ORDER BY j.run_at
                LIMIT least(t.free, lim - got)) c
            ORDER BY c.run_at, c.id
            LIMIT lim - got) p;
        IF picked IS NOT NULL THEN
            RETURN QUERY
            UPDATE jobs SET state = 'running', attempt = jobs.attempt + 1, lease_owner = owner,
                lease_expires_at = now() + make_interval(secs => lease), updated_at = now(),
                started_at = coalesce(jobs.started_at, now())
            WHERE jobs.id = ANY(picked) AND jobs.state = 'queued'
            RETURNING jobs.*;
            GET DIAGNOSTICS n = ROW_COUNT;
            got := got + n;
        END IF;
        -- OFFSET 0 keeps each tenant's earliest job computed once; `= ANY` keeps the join to
        -- the visited rows (an index probe each), whatever the number of tenants.
        UPDATE queue_tenants q SET next_run_at = s.next
        FROM (SELECT v.id, (SELECT j.run_at FROM jobs j
                            WHERE j.tenant_id = v.id AND j.state = 'queued'
                            ORDER BY j.run_at LIMIT 1) AS next
              FROM unnest(visited) AS v(id) OFFSET 0) s
        WHERE q.tenant_id = ANY(visited) AND q.tenant_id = s.id
          AND q.next_run_at IS DISTINCT FROM s.next;
        -- Below the limit, every candidate was taken: a tenant that gave none had a stale bound
        -- (now set right), so look further; otherwise the queue has no more for us.
        EXIT WHEN coalesce(served, 0) >= cardinality(visited);
    END LOOP;
END $$;
