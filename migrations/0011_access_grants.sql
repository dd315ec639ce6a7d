-- Access grants: "this app may use these permissions on these mailboxes", declared once and
-- brought about by the `access_grant` job one step per run. `spec` is the desired state, `steps`
-- the log of what each step produced (see src/domain/grant.rs); `revision` counts changes of the
-- desired state, and every step records the revision it completed for.

CREATE TABLE access_grants (
    id             uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    key            text NOT NULL CHECK (key ~ '^[a-z0-9][a-z0-9-]{0,56}$'),
    spec           jsonb NOT NULL,
    mechanism      text NOT NULL CHECK (mechanism IN ('access_policy', 'rbac')),
    revision       bigint NOT NULL DEFAULT 1,
    -- DELETE asked for: the steps are the offboarding ones.
    removing       boolean NOT NULL DEFAULT false,
    condition      text NOT NULL DEFAULT 'pending'
                   CHECK (condition IN ('pending', 'provisioning', 'propagating', 'ready',
                                        'failed', 'removing', 'removed')),
    steps          jsonb NOT NULL DEFAULT '[]'::jsonb,
    labels         jsonb NOT NULL DEFAULT '{}'::jsonb,
    external_ref   text,
    callback_url   text,
    job_id         uuid,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- When the condition last changed (for `ready_at`, `removed_at` and long polls).
    condition_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, key)
);
CREATE INDEX access_grants_labels ON access_grants USING gin (labels);
CREATE INDEX access_grants_condition ON access_grants (tenant_id, condition);
