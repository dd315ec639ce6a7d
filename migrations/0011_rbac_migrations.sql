-- RBAC for Applications: propagation checks that verify an RBAC restriction (issue 11, item 4).
--
-- `mechanism` says which of Exchange's verdicts stage 1 asks for: `access_policy`
-- (Test-ApplicationAccessPolicy) or `rbac` (Test-ServicePrincipalAuthorization -Resource, which
-- bypasses the RBAC permission cache, reference §3.1, §3.5). Existing checks verified access
-- policies.
ALTER TABLE propagation_checks
    ADD COLUMN mechanism text NOT NULL DEFAULT 'access_policy'
        CHECK (mechanism IN ('access_policy', 'rbac'));
ALTER TABLE propagation_checks DROP CONSTRAINT IF EXISTS propagation_checks_origin_check;
ALTER TABLE propagation_checks ADD CONSTRAINT propagation_checks_origin_check
    CHECK (origin IN ('manual', 'access_policy', 'rbac_restriction', 'rbac_migration'));
