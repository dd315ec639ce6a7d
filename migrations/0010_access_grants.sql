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

-- Public certificates a vendor uploaded for the app of its grant (an app mailscope created).
-- Kept whole because Graph replaces an app's keyCredentials as a list: adding one resends the
-- others. Nothing here is secret.
CREATE TABLE access_grant_certificates (
    tenant_id        uuid NOT NULL,
    grant_key        text NOT NULL,
    -- The keyCredential's keyId in Graph (chosen by mailscope).
    key_id           uuid NOT NULL,
    -- SHA-1 of the DER, upper-case hex (Graph's customKeyIdentifier).
    thumbprint       text NOT NULL,
    certificate_der  bytea NOT NULL,
    display_name     text NOT NULL,
    not_before       timestamptz NOT NULL,
    not_after        timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, grant_key, key_id),
    UNIQUE (tenant_id, grant_key, thumbprint),
    FOREIGN KEY (tenant_id, grant_key) REFERENCES access_grants (tenant_id, key) ON DELETE CASCADE
);
