-- Verdict latency and a leaner queue (issue 15).
--
-- 1. A propagation check reports how long the change took as a bracket: at least the time from
--    the change to the last observation that still showed the old behaviour, at most the time to
--    the first observation of the final matching streak. `propagation_seconds` keeps the upper
--    end; the lower end is new.
ALTER TABLE propagation_checks ADD COLUMN propagation_seconds_at_least double precision;

-- 2. Wake-ups for future jobs too, one NOTIFY per statement instead of a trigger per row.
--    The payload is the number of seconds (database clock) until the earliest job the statement
--    queued becomes runnable, 0 when it already is: a listener keeps a timer for the earliest
--    one, so a job scheduled ahead by any process runs at its time rather than at the next poll.
--    The delay is taken at the statement, so with the commit in between a listener wakes a
--    little late, never early. Identical payloads in one transaction are delivered once.
DROP TRIGGER jobs_notify ON jobs;
DROP FUNCTION jobs_notify();

CREATE OR REPLACE FUNCTION queue_tenants_apply(ids uuid[], deltas integer[], entered timestamptz[],
                                               recompute uuid[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    first timestamptz;
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
    SELECT min(e) INTO first FROM unnest(entered) AS e;
    IF first IS NOT NULL THEN
        PERFORM pg_notify('mailscope_jobs',
            round(greatest(extract(epoch FROM first - clock_timestamp()), 0), 3)::text);
    END IF;
END $$;
