-- Propagation checks: proof that an app's access restriction is in force. One row per check; the
-- job queue runs it (job `propagation_check`, unique key = app id), this table holds its state.

CREATE TABLE propagation_checks (
    id                     uuid PRIMARY KEY,
    tenant_id              uuid NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    app_id                 uuid NOT NULL,
    state                  text NOT NULL DEFAULT 'queued'
                           CHECK (state IN ('queued', 'running', 'succeeded', 'misconfigured',
                                            'timed_out', 'cancelled', 'failed')),
    stage                  text NOT NULL DEFAULT 'configuration'
                           CHECK (stage IN ('configuration', 'live', 'done')),
    verified_by            text CHECK (verified_by IN ('graph', 'exchange_test')),
    -- [{mailbox, expected, last_observed, last_observed_at, consecutive_matches,
    --   first_matched_at, met_at}]
    expectations           jsonb NOT NULL DEFAULT '[]'::jsonb,
    required_matches       integer NOT NULL DEFAULT 3 CHECK (required_matches BETWEEN 1 AND 20),
    -- Bumped whenever the expectations change; a run that started on an older revision discards
    -- its observations instead of overwriting the new expectations.
    revision               integer NOT NULL DEFAULT 1,
    -- Observation rounds in the live stage (drives the backoff).
    rounds                 integer NOT NULL DEFAULT 0,
    deadline               timestamptz NOT NULL,
    -- Kept for signed callbacks, delivered by the webhooks module once it exists.
    callback_url           text,
    job_id                 uuid,
    cancel_requested       boolean NOT NULL DEFAULT false,
    -- The short-lived client secret added to a managed app for stage 2: Microsoft's keyId and
    -- the secret text sealed with the service's key, bound to this row's id. Cleared once removed.
    probe_key_id           uuid,
    probe_secret_sealed    bytea,
    probe_secret_key_id    text,
    reason                 text,
    result                 jsonb,
    origin                 text NOT NULL DEFAULT 'manual' CHECK (origin IN ('manual', 'access_policy')),
    created_at             timestamptz NOT NULL DEFAULT now(),
    -- The latest change the check verifies (propagation time counts from here).
    changed_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    started_at             timestamptz,
    finished_at            timestamptz,
    propagation_seconds    double precision
);
-- At most one active check per (tenant, app); a new change updates it instead.
CREATE UNIQUE INDEX propagation_checks_active ON propagation_checks (tenant_id, app_id)
    WHERE state IN ('queued', 'running');
CREATE INDEX propagation_checks_tenant ON propagation_checks (tenant_id, id);
