-- Credentials of a grant's app announced as `expiring_soon` (signed `access_grant.expiring_soon`
-- event): one row per credential, inserted in the transaction that queues the event, so a
-- credential is announced once whatever restarts or concurrent workers do.
CREATE TABLE access_grant_credential_notices (
    tenant_id      uuid NOT NULL,
    grant_key      text NOT NULL,
    -- The client secret's or certificate's keyId in Graph.
    key_id         uuid NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('secret', 'certificate')),
    end_date_time  timestamptz NOT NULL,
    -- When the announcement was made (the event queued), and its delivery.
    announced_at   timestamptz NOT NULL DEFAULT now(),
    delivery_id    uuid,
    PRIMARY KEY (tenant_id, grant_key, key_id),
    FOREIGN KEY (tenant_id, grant_key) REFERENCES access_grants (tenant_id, key) ON DELETE CASCADE
);
