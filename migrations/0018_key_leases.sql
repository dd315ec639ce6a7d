-- Leases on natural keys (issue 15, goal 3: no pooled connection is held while Microsoft is
-- called).
--
-- A use case that must be the only writer of a key on every replica while it calls Microsoft
-- (an application's registration, a tenant's access policies or RBAC restrictions) used to hold a
-- transaction-scoped advisory lock, and with it a pooled connection, across those calls. It now
-- takes a lease in one short statement, calls Microsoft with no connection held, and writes its
-- result in a short transaction that first re-reads the lease row (FOR UPDATE) and goes on only
-- while the row still carries its token.
--
-- A lease is live while its holder process is (its session-level advisory lock, see
-- `store::liveness`) and `locked_until` has not passed; the holder renews `locked_until` while it
-- works, so a process that is alive but lost track of a lease (its release failed) blocks the key
-- for at most that long. The holder's own process may take the lease over at once: within a
-- process the key is already serialised by an in-process lock, so the previous holder there is
-- gone.
CREATE TABLE key_leases (
    name          text PRIMARY KEY,
    holder        integer NOT NULL,
    token         uuid NOT NULL,
    taken_at      timestamptz NOT NULL DEFAULT now(),
    locked_until  timestamptz NOT NULL
);
