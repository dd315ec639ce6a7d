//! The runner of a saga's step under way (migration 0017): the `step_run` column of
//! `access_grants` and `rbac_migrations`.
//!
//! A step's runner writes it in the short transaction that starts the step, under the saga's
//! advisory lock, and clears it in the one that records the step's result, which it does only
//! while the column still carries its token (the fence). Between the two no connection is held
//! while Microsoft is called; other writers of the saga (the API, a job of a newer revision or
//! run) go on meanwhile, and the recording transaction sees what they did.
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::StoreError;

/// Who runs a step of a saga, since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRun {
    /// Fresh for every run of a step: its result is recorded only while the saga still names it.
    pub token: Uuid,
    /// The job run (job id and claim attempt) that holds the step; live while its lease is.
    pub job_id: Uuid,
    pub attempt: i32,
    pub step: String,
    pub started_at: DateTime<Utc>,
}

/// The sagas with a `step_run` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saga {
    AccessGrant,
    RbacMigration,
}

impl Saga {
    fn table(self) -> &'static str {
        match self {
            Saga::AccessGrant => "access_grants",
            Saga::RbacMigration => "rbac_migrations",
        }
    }
}

/// The column as read (`NULL`: no step under way).
pub fn parse(v: Option<serde_json::Value>) -> Result<Option<StepRun>, StoreError> {
    v.map(serde_json::from_value)
        .transpose()
        .map_err(|e| StoreError::Other(anyhow::anyhow!("step_run: {e}")))
}

/// Name the runner of the step under way (or none). The caller holds the saga's advisory lock.
pub async fn set(
    c: &impl GenericClient,
    saga: Saga,
    id: Uuid,
    run: Option<&StepRun>,
) -> Result<(), StoreError> {
    let value = run
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| StoreError::Other(anyhow::anyhow!("step_run: {e}")))?;
    let sql = format!("UPDATE {} SET step_run = $2 WHERE id = $1", saga.table());
    c.execute(&sql, &[&id, &value]).await?;
    Ok(())
}
