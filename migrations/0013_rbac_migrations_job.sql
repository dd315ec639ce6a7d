-- Migrations of one app from application access policies to RBAC for Applications (issue 11,
-- item 5), run by the `rbac_migration` job one step per run (src/domain/rbac_migration.rs).
--
-- `plan` is what was decided when the migration started (scopes, permissions, the Entra grants
-- to remove with their ids so a rollback can restore them, the restrictions that existed
-- before); `steps` the per-step log (state, attempts, output, last error); `run` counts starts,
-- resumes and rollbacks: each queues a job of its own, and a job of an older run ends at its
-- next look.
CREATE TABLE rbac_migrations (
    id              uuid PRIMARY KEY,
    tenant_id       uuid NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    -- Client id (lower case).
    app_id          text NOT NULL,
    state           text NOT NULL CHECK (state IN ('running', 'paused', 'rolling_back',
                                                   'rolled_back', 'succeeded', 'failed')),
    -- The next forward step (domain::rbac_migration::Step), `done` once finished.
    current_step    text NOT NULL,
    plan            jsonb NOT NULL,
    steps           jsonb NOT NULL DEFAULT '[]'::jsonb,
    run             bigint NOT NULL DEFAULT 1,
    -- Why it is paused: `requested` or `error` (then `steps` holds the error).
    paused_reason   text CHECK (paused_reason IN ('requested', 'error')),
    -- Asked for while a step ran: honoured before the next one.
    pause_requested boolean NOT NULL DEFAULT false,
    callback_url    text,
    -- Propagation checks the migration started.
    check_ids       uuid[] NOT NULL DEFAULT '{}',
    job_id          uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
-- One unfinished migration per app.
CREATE UNIQUE INDEX rbac_migrations_active_app ON rbac_migrations (tenant_id, app_id)
    WHERE state IN ('running', 'paused', 'rolling_back');
CREATE INDEX rbac_migrations_tenant ON rbac_migrations (tenant_id, created_at, id);


-- RBAC restrictions scoped to an Entra administrative unit (-RecipientAdministrativeUnitScope).
ALTER TABLE rbac_restrictions DROP CONSTRAINT IF EXISTS rbac_restrictions_scope_kind_check;
ALTER TABLE rbac_restrictions ADD CONSTRAINT rbac_restrictions_scope_kind_check
    CHECK (scope_kind IN ('recipient_group_scope', 'member_of_group', 'recipient_filter',
                          'administrative_unit'));
