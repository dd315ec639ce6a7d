-- Tenants mailscope manages, their encrypted management credential, and the audit trail.

CREATE TABLE tenants (
    tenant_id              uuid PRIMARY KEY,
    display_name           text NOT NULL,
    cloud                  text NOT NULL CHECK (cloud IN ('global', 'usgov', 'usgovdod', 'china', 'custom')),
    default_domain         text NOT NULL,
    endpoints              jsonb NOT NULL DEFAULT '{}'::jsonb,
    client_id              uuid NOT NULL,
    credential_kind        text NOT NULL CHECK (credential_kind IN ('client_secret', 'certificate')),
    -- AES-256-GCM: nonce || ciphertext, bound to tenant_id as associated data.
    credential_ciphertext  bytea NOT NULL,
    -- Which encryption key sealed it (a fingerprint, not the key), for rotation.
    credential_key_id      text NOT NULL,
    canary_mailboxes       text[] NOT NULL DEFAULT '{}',
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE audit_events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    uuid NOT NULL,
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    actor_sub    text,
    actor_app    text,
    action       text NOT NULL,
    target       text NOT NULL,
    request_id   text NOT NULL,
    details      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_events_tenant ON audit_events (tenant_id, id);

-- The audit trail is append-only: no UPDATE, DELETE or TRUNCATE, even by the service itself.
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only' USING ERRCODE = '42501';
END $$;
CREATE TRIGGER audit_events_no_update BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
