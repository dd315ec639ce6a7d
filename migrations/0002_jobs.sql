-- The job queue (propagation checks, callback deliveries, maintenance).
--
-- `attempt` counts claims and is the fencing token: every write by a worker names the attempt it
-- claimed, so a worker whose lease lapsed cannot overwrite the result of a newer attempt.
-- `failures` counts consecutive failed runs and drives backoff; a rescheduled poll is not a failure.

CREATE TABLE jobs (
    id                uuid PRIMARY KEY,
    kind              text NOT NULL,
    -- The nil UUID for jobs that belong to no tenant.
    tenant_id         uuid NOT NULL,
    -- At most one active job per (kind, tenant, unique_key).
    unique_key        text,
    payload           jsonb NOT NULL DEFAULT '{}'::jsonb,
    state             text NOT NULL DEFAULT 'queued'
                      CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    attempt           integer NOT NULL DEFAULT 0,
    failures          integer NOT NULL DEFAULT 0,
    max_failures      integer NOT NULL DEFAULT 10,
    run_at            timestamptz NOT NULL DEFAULT now(),
    lease_owner       text,
    lease_expires_at  timestamptz,
    cancel_requested  boolean NOT NULL DEFAULT false,
    last_error        text,
    result            jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz
);

CREATE UNIQUE INDEX jobs_active_unique ON jobs (kind, tenant_id, unique_key)
    WHERE state IN ('queued', 'running') AND unique_key IS NOT NULL;
-- Claiming walks tenants with queued work (a loose index scan), then each tenant's oldest jobs.
CREATE INDEX jobs_queued_by_tenant ON jobs (tenant_id, run_at) WHERE state = 'queued';
CREATE INDEX jobs_running ON jobs (tenant_id, lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE state IN ('succeeded', 'failed', 'cancelled');

-- Wake workers when a job becomes runnable now; future jobs are found by polling.
CREATE FUNCTION jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'queued' AND NEW.run_at <= now() THEN
        PERFORM pg_notify('mailscope_jobs', NEW.kind);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE OF state, run_at ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_notify();
