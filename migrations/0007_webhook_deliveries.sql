-- Callback deliveries (Standard Webhooks): one row per event sent to one URL, delivered by a
-- `webhook_delivery` job. The row keeps the exact body, so every attempt sends (and signs) the
-- same bytes under the same `webhook-id` (the row id), and the log of attempts for the API.

CREATE TABLE webhook_deliveries (
    id             uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL,
    -- What the event is about, e.g. a propagation check.
    subject_id     uuid NOT NULL,
    event_type     text NOT NULL,
    url            text NOT NULL,
    body           text NOT NULL,
    job_id         uuid,
    state          text NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending', 'delivered', 'failed')),
    attempt_count  integer NOT NULL DEFAULT 0,
    -- [{"at", "status_code", "error", "duration_ms"}], oldest first; bounded by max attempts.
    attempts       jsonb NOT NULL DEFAULT '[]'::jsonb,
    last_status_code integer,
    last_error     text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);

CREATE INDEX webhook_deliveries_subject ON webhook_deliveries (subject_id, created_at);
