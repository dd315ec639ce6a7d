-- Idempotency keys are scoped to the caller, the method and the path (the same key on another
-- endpoint is another key), and a running request records the process that holds it: that
-- process's lease (`store::liveness`) tells a retry at once whether the holder is still alive.
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (caller, method, path, key);
ALTER TABLE idempotency_keys ADD COLUMN holder integer;
