-- Scope groups (mail-enabled security groups) and application access policies mailscope manages.
-- Both are keyed by their natural key in the tenant, never by Exchange's generated Identity.

CREATE TABLE scope_groups (
    tenant_id             uuid NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    -- Lower-case Exchange alias; also the group's Name when mailscope created it.
    alias                 text NOT NULL,
    display_name          text NOT NULL,
    primary_smtp_address  text NOT NULL,
    -- The group's Entra object id (ExternalDirectoryObjectId), else its Exchange Guid.
    object_id             text NOT NULL,
    membership            text NOT NULL CHECK (membership IN ('exact', 'additive')),
    -- Primary SMTP addresses (lower case) as last written or read by mailscope.
    members               text[] NOT NULL DEFAULT '{}',
    -- created: mailscope made it (DELETE removes it from the tenant); adopted/imported: it
    -- existed before (DELETE only forgets it).
    origin                text NOT NULL CHECK (origin IN ('created', 'adopted', 'imported')),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, alias)
);
CREATE UNIQUE INDEX scope_groups_object ON scope_groups (tenant_id, object_id);

CREATE TABLE access_policies (
    id                    uuid PRIMARY KEY,
    tenant_id             uuid NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    -- Client id (lower case), or '*' for a policy imported from the tenant that names all apps.
    app_id                text NOT NULL,
    -- Entra object id (else Exchange Guid) of the scope: a scope group, a mailbox or a mail user.
    scope_object_id       text NOT NULL,
    -- RecipientTypeDetails of the scope (MailUniversalSecurityGroup, UserMailbox, MailUser).
    scope_type            text NOT NULL,
    scope_address         text NOT NULL,
    -- Set when the scope is one of mailscope's scope groups.
    scope_alias           text,
    access_right          text NOT NULL CHECK (access_right IN ('RestrictAccess', 'DenyAccess')),
    description           text NOT NULL,
    -- Exchange's generated Identity, informational only (look-ups go by app and scope).
    exchange_identity     text,
    -- pending_propagation: written, not yet seen in force; in_force: a propagation check saw it;
    -- unverified: found in the tenant (adopted or imported), never checked by mailscope.
    state                 text NOT NULL CHECK (state IN ('pending_propagation', 'in_force', 'unverified')),
    origin                text NOT NULL CHECK (origin IN ('created', 'adopted', 'imported')),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, app_id, scope_object_id)
);
CREATE INDEX access_policies_tenant_app ON access_policies (tenant_id, app_id);
