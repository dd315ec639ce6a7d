//! The provisioning layer's one error type.
//!
//! It says what went wrong in the domain's terms; the HTTP layer maps it to a problem document in
//! one place (`impl From<Error> for ApiError`), and the queue maps it to a job outcome in one
//! place ([`Error::job_outcome`]): Microsoft throttling runs the job again at `Retry-After`
//! without counting a failure, transient failures retry with backoff, the rest fail with cause.
use std::time::Duration;

use chrono::Utc;

use crate::domain::field_error::FieldError;
use crate::m365::M365Error;
use crate::queue::worker::Outcome;
use crate::store::StoreError;

/// A request the use case refuses because of the state it found (not because of its shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The request conflicts with the current state (e.g. still being created elsewhere).
    Conflict,
    /// An access policy with the same app and scope exists with other settings.
    PolicyConflict,
    /// Removing the app's last RestrictAccess policy would open every mailbox to it.
    LastRestrictPolicy,
    /// A scope group still scopes an access policy.
    ScopeGroupInUse,
    /// The application still has access policies managed by mailscope.
    ApplicationHasPolicies,
    /// The recipient cannot be the scope of an application access policy.
    InvalidPolicyScope,
    /// An RBAC restriction with the same app and scope exists with other settings.
    RbacConflict,
    /// The object id given for the app is its registration's, not its service principal's.
    RegistrationObjectId,
    /// A management scope's filter did not read back as written.
    ScopeFilterMismatch,
    /// The restriction is not complete in the tenant (pointer, assignments or filter).
    RbacIncomplete,
    /// Verifying needs mailboxes inside and outside the scope.
    VerificationMailboxesRequired,
    /// `Test-ServicePrincipalAuthorization` does not show the scope as intended.
    RbacVerificationFailed,
    /// DenyAccess was asked of RBAC for Applications, which can only grant (docs/microsoft-365.md §3.8).
    RbacDenyUnsupported,
    /// The app already has an unfinished RBAC migration.
    RbacMigrationActive,
    /// The app's restriction cannot be migrated to RBAC (no policy, only DenyAccess, …).
    RbacMigrationNotPossible,
    /// A rollback was asked for after the access policy's removal started.
    RbacMigrationRollbackClosed,
    /// An Entra mailbox grant was asked for an app restricted by RBAC (the union trap).
    RbacUnionTrap,
}

impl Rejection {
    /// The stable code a person or a job status sees (the HTTP problem's `code` too).
    pub fn code(self) -> &'static str {
        match self {
            Rejection::Conflict => "conflict",
            Rejection::PolicyConflict => "policy_conflict",
            Rejection::LastRestrictPolicy => "last_restrict_policy",
            Rejection::ScopeGroupInUse => "scope_group_in_use",
            Rejection::ApplicationHasPolicies => "application_has_policies",
            Rejection::InvalidPolicyScope => "invalid_policy_scope",
            Rejection::RbacConflict => "rbac_restriction_conflict",
            Rejection::RegistrationObjectId => "app_registration_object_id",
            Rejection::ScopeFilterMismatch => "scope_filter_mismatch",
            Rejection::RbacIncomplete => "rbac_incomplete",
            Rejection::VerificationMailboxesRequired => "verification_mailboxes_required",
            Rejection::RbacVerificationFailed => "rbac_verification_failed",
            Rejection::RbacDenyUnsupported => "rbac_deny_unsupported",
            Rejection::RbacMigrationActive => "rbac_migration_active",
            Rejection::RbacMigrationNotPossible => "rbac_migration_not_possible",
            Rejection::RbacMigrationRollbackClosed => "rbac_migration_rollback_closed",
            Rejection::RbacUnionTrap => "rbac_union_trap",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input is invalid; each field says why.
    #[error("invalid input: {}", join(.0))]
    Invalid(Vec<FieldError>),
    /// The object does not exist (or the caller may not see it).
    #[error("not found: {0}")]
    NotFound(String),
    /// Refused because of the state found; `errors` lists differences where there are any.
    #[error("{kind:?}: {detail}")]
    Rejected {
        kind: Rejection,
        detail: String,
        errors: Vec<FieldError>,
    },
    /// Another mailscope process has been changing the same object in the tenant for longer
    /// than a request waits (its key lease, `key_lease`); the same request can be repeated.
    #[error("busy: {0}")]
    Busy(String),
    /// Microsoft refused or failed; keeps `Retry-After` and the cause and fix.
    #[error(transparent)]
    Microsoft(#[from] M365Error),
    /// mailscope's database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An unexpected failure; the cause is logged, never shown.
    #[error(transparent)]
    Internal(anyhow::Error),
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// When Microsoft throttles without saying for how long.
const DEFAULT_THROTTLE_WAIT: Duration = Duration::from_secs(30);

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid(vec![FieldError::new(field, message)])
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Error::NotFound(detail.into())
    }

    pub fn rejected(kind: Rejection, detail: impl Into<String>) -> Self {
        Error::Rejected {
            kind,
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::rejected(Rejection::Conflict, detail)
    }

    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        Error::Internal(cause.into())
    }

    /// The Microsoft error, if this is one.
    pub fn microsoft(&self) -> Option<&M365Error> {
        match self {
            Error::Microsoft(e) => Some(e),
            _ => None,
        }
    }

    /// How long Microsoft asked to wait, when this is throttling.
    pub fn throttled_for(&self) -> Option<Duration> {
        match self {
            Error::Microsoft(e) if matches!(e.kind(), crate::m365::ErrorKind::Throttled { .. }) => {
                Some(e.retry_after().unwrap_or(DEFAULT_THROTTLE_WAIT))
            }
            _ => None,
        }
    }

    /// True when running the same step again later, unchanged, can succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Microsoft(e) => e.is_retryable(),
            Error::Store(StoreError::Unavailable(_)) | Error::Busy(_) => true,
            _ => false,
        }
    }

    /// The one mapping from a use case's failure to what the queue does with the job.
    pub fn job_outcome(&self) -> Outcome {
        if let Some(wait) = self.throttled_for() {
            let at = Utc::now()
                + chrono::Duration::from_std(wait)
                    .unwrap_or_else(|_| chrono::Duration::seconds(30));
            return Outcome::Reschedule { at, payload: None };
        }
        let message = self.to_string();
        if self.is_transient() {
            Outcome::Retry(message)
        } else {
            Outcome::Fail(message)
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Store(StoreError::from(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::m365::{ErrorKind, Service};

    #[test]
    fn throttling_reschedules_at_retry_after_and_is_not_a_failure() {
        let e = Error::from(M365Error::new(
            ErrorKind::Throttled {
                retry_after: Some(Duration::from_secs(7)),
            },
            Service::Exchange,
            "Get-Recipient",
        ));
        let before = Utc::now();
        match e.job_outcome() {
            Outcome::Reschedule { at, payload: None } => {
                let secs = (at - before).num_milliseconds();
                assert!((6_500..=8_000).contains(&secs), "{secs} ms");
            }
            other => panic!("expected a reschedule, got {other:?}"),
        }
    }

    #[test]
    fn transient_retries_and_permanent_fails() {
        let t = Error::from(M365Error::new(
            ErrorKind::Transient,
            Service::Graph,
            "GET x",
        ));
        assert!(matches!(t.job_outcome(), Outcome::Retry(_)));
        let p = Error::invalid("scope", "no such recipient");
        assert!(matches!(p.job_outcome(), Outcome::Fail(m) if m.contains("no such recipient")));
        // A key another process is changing: the step runs again later.
        let b = Error::Busy("another process is changing `application:t/acme`".into());
        assert!(matches!(b.job_outcome(), Outcome::Retry(m) if m.contains("application:t/acme")));
    }
}
