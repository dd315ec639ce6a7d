-- RBAC for Applications restrictions mailscope manages (reference §3): an app's Exchange service
-- principal pointer, a resource scope and one role assignment per permission, keyed by
-- (app, scope) like access policies, never by Exchange's generated names.

CREATE TABLE rbac_restrictions (
    id                          uuid PRIMARY KEY,
    tenant_id                   uuid NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    -- Client id (lower case).
    app_id                      text NOT NULL,
    -- The Entra service principal's object id (what New-ServicePrincipal -ObjectId takes).
    service_principal_object_id text NOT NULL,
    -- `group:<object id>` or `filter:<filter text>`: with app_id, the key.
    scope_key                   text NOT NULL,
    -- recipient_group_scope: -RecipientGroupScope <group>; member_of_group: a management scope
    -- with MemberOfGroup on the group's DN; recipient_filter: a management scope with the filter.
    scope_kind                  text NOT NULL CHECK (scope_kind IN ('recipient_group_scope', 'member_of_group', 'recipient_filter')),
    scope_group_alias           text,
    scope_object_id             text,
    scope_address               text,
    scope_distinguished_name    text,
    -- The filter as written (member_of_group: derived from the DN).
    recipient_filter            text,
    -- The management scope's name (NULL for recipient_group_scope).
    management_scope            text,
    -- Permissions covered, e.g. {Mail.Read, Calendars.Read}; one role assignment each.
    permissions                 text[] NOT NULL,
    -- Names of the role assignments, in the order of `permissions`.
    assignment_names            text[] NOT NULL,
    -- Entra app-role grants mailscope removed after verifying the restriction (the union trap).
    entra_grants_removed        text[] NOT NULL DEFAULT '{}',
    state                       text NOT NULL CHECK (state IN ('pending_propagation', 'in_force', 'unverified')),
    origin                      text NOT NULL CHECK (origin IN ('created', 'adopted')),
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, app_id, scope_key)
);
CREATE INDEX rbac_restrictions_tenant_app ON rbac_restrictions (tenant_id, app_id);
