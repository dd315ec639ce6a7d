-- Third-party app registrations mailscope created or adopted in a tenant, and the metadata of the
-- client secrets it added. The secret text itself is never stored: Microsoft returns it once and
-- mailscope hands it to the caller once.

CREATE TABLE applications (
    tenant_id                    uuid NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    -- Chosen by the caller, e.g. a vendor slug.
    key                          text NOT NULL CHECK (key ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    -- `creating`: intent recorded before Microsoft's create; a retry finds the registration by
    -- `marker` (a tag on the Graph application) instead of creating a second one.
    state                        text NOT NULL CHECK (state IN ('creating', 'ready')),
    -- `created`: DELETE removes it from the tenant; `adopted`: DELETE only forgets it.
    origin                       text NOT NULL CHECK (origin IN ('created', 'adopted')),
    marker                       text NOT NULL,
    app_id                       uuid,
    -- NULL for an adopted multi-tenant app whose registration lives in its publisher's tenant.
    application_object_id        uuid,
    service_principal_object_id  uuid,
    display_name                 text NOT NULL,
    -- Application permissions asked for (created) or found granted when adopted.
    permissions                  text[] NOT NULL DEFAULT '{}',
    grant_admin_consent          boolean NOT NULL DEFAULT false,
    allow_unscoped_permissions   boolean NOT NULL DEFAULT false,
    created_at                   timestamptz NOT NULL DEFAULT now(),
    updated_at                   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, key),
    CHECK (state = 'creating' OR (app_id IS NOT NULL AND service_principal_object_id IS NOT NULL))
);
-- One key per app in a tenant.
CREATE UNIQUE INDEX applications_app_id ON applications (tenant_id, app_id) WHERE app_id IS NOT NULL;

CREATE TABLE application_secrets (
    tenant_id        uuid NOT NULL,
    key              text NOT NULL,
    -- Microsoft's keyId of the password credential.
    key_id           uuid NOT NULL,
    display_name     text NOT NULL,
    -- The first three characters Microsoft shows for every secret; never more.
    hint             text CHECK (hint IS NULL OR length(hint) <= 3),
    start_date_time  timestamptz NOT NULL,
    end_date_time    timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, key, key_id),
    FOREIGN KEY (tenant_id, key) REFERENCES applications (tenant_id, key) ON DELETE CASCADE
);
