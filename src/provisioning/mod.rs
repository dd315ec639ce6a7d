//! The provisioning use cases: ensure scope groups and their members, applications, consent and
//! secrets, access policies, access tests and sync.
//!
//! Each use case is a plain async function over a cloneable [`Services`] handle and an
//! [`Actor`] (an API caller or a job) that the audit trail records. No HTTP type crosses into
//! this layer, so the same step runs from a handler or from a queue job. Every use case returns
//! [`Error`], which maps to an HTTP problem in one place (`api::problem`) and to a job outcome in
//! one place ([`Error::job_outcome`]).
use std::sync::Arc;

use deadpool_postgres::Pool;

use crate::config::Settings;
use crate::crypto::CredentialCipher;

pub mod access_policies;
pub mod access_test;
pub mod actor;
pub mod applications;
pub mod audit;
pub mod checks;
pub mod error;
pub mod grants;
pub mod key_lease;
pub mod locks;
pub mod rbac;
pub mod rbac_migration;
pub mod scope_groups;
pub mod step_lease;
pub mod sync;
pub mod tenants;

pub use actor::Actor;
pub use error::{Error, Rejection};

/// Everything a use case may need, cheap to clone: HTTP handlers and jobs hold the same one.
#[derive(Clone)]
pub struct Services {
    pub pool: Pool,
    pub cipher: CredentialCipher,
    pub settings: Arc<Settings>,
    pub m365: crate::m365::M365Client,
    /// In-process queues per natural key, in front of the database's advisory locks.
    pub key_locks: Arc<locks::KeyLocks>,
    /// This process's lease, which tells other processes whether work it claimed is still alive.
    pub liveness: Arc<crate::store::liveness::Liveness>,
}

impl Services {
    /// A pooled connection; pool exhaustion and outages become [`Error::Store`] (unavailable).
    pub async fn db(&self) -> Result<deadpool_postgres::Object, Error> {
        self.pool
            .get()
            .await
            .map_err(|e| Error::Store(crate::store::StoreError::from(e)))
    }
}

/// What an idempotent use case did. The HTTP status and the audit event follow from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Created in the tenant (and recorded).
    Created,
    /// Found in the tenant and taken under management, not created again.
    Adopted,
    /// Existed and was changed to match the request.
    Updated,
    /// Already as requested: nothing was written.
    Unchanged,
}

/// A use case's result and what it took to get there.
#[derive(Debug, Clone)]
pub struct Ensured<T> {
    pub value: T,
    pub change: Change,
}
