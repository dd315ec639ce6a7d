-- Idempotency-Key records (IETF draft-ietf-httpapi-idempotency-key-header semantics).
-- Keys are scoped to the authenticated caller; the fingerprint covers method, path and body.
CREATE TABLE idempotency_keys (
    caller           text NOT NULL,
    key              text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    fingerprint      bytea NOT NULL,
    method           text NOT NULL,
    path             text NOT NULL,
    -- NULL while the first request is still running.
    response_status  integer,
    response_headers jsonb,
    response_body    bytea,
    -- A running request's claim; a crashed one's lapses and a retry takes over.
    locked_until     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (caller, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
