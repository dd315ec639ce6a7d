//! SQL for `rbac_migrations` (migration 0013): one app's migration from access policies to RBAC
//! for Applications, its plan, step log and state.
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

use super::StoreError;
use super::step_runs::StepRun;
use crate::domain::rbac_migration::{State, Step, StepEntry};

#[derive(Debug, Clone)]
pub struct MigrationRecord {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub app_id: String,
    pub state: State,
    pub current_step: Step,
    /// `provisioning::rbac_migration::Planned`, as decided at the start.
    pub plan: serde_json::Value,
    pub steps: Vec<StepEntry>,
    pub run: i64,
    /// `requested` or `error` while paused.
    pub paused_reason: Option<String>,
    pub callback_url: Option<String>,
    pub check_ids: Vec<Uuid>,
    pub job_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The runner of the step under way (`store::step_runs`); written only through that module.
    pub step_run: Option<StepRun>,
}

const COLUMNS: &str = "id, tenant_id, app_id, state, current_step, plan, steps, run, \
     paused_reason, callback_url, check_ids, job_id, created_at, updated_at, finished_at, step_run";

fn other(e: impl std::fmt::Display) -> StoreError {
    StoreError::Other(anyhow::anyhow!("rbac_migrations: {e}"))
}

fn from_row(r: &Row) -> Result<MigrationRecord, StoreError> {
    let state: String = r.get(3);
    let step: String = r.get(4);
    let steps: serde_json::Value = r.get(6);
    Ok(MigrationRecord {
        id: r.get(0),
        tenant_id: r.get(1),
        app_id: r.get(2),
        state: State::parse(&state).ok_or_else(|| other(format!("unknown state `{state}`")))?,
        current_step: Step::parse(&step).ok_or_else(|| other(format!("unknown step `{step}`")))?,
        plan: r.get(5),
        steps: serde_json::from_value(steps).map_err(other)?,
        run: r.get(7),
        paused_reason: r.get(8),
        callback_url: r.get(9),
        check_ids: r.get(10),
        job_id: r.get(11),
        created_at: r.get(12),
        updated_at: r.get(13),
        finished_at: r.get(14),
        step_run: super::step_runs::parse(r.get(15))?,
    })
}

fn steps_json(steps: &[StepEntry]) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(steps).map_err(other)
}

/// Insert a new migration; `false` when the app already has an unfinished one.
pub async fn insert(c: &impl GenericClient, m: &MigrationRecord) -> Result<bool, StoreError> {
    Ok(c.execute(
        "INSERT INTO rbac_migrations (id, tenant_id, app_id, state, current_step, plan, steps,
             run, paused_reason, callback_url, check_ids, job_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT (tenant_id, app_id) WHERE state IN ('running', 'paused', 'rolling_back')
         DO NOTHING",
        &[
            &m.id,
            &m.tenant_id,
            &m.app_id,
            &m.state.as_str(),
            &m.current_step.as_str(),
            &m.plan,
            &steps_json(&m.steps)?,
            &m.run,
            &m.paused_reason,
            &m.callback_url,
            &m.check_ids,
            &m.job_id,
        ],
    )
    .await?
        == 1)
}

pub async fn get(
    c: &impl GenericClient,
    tenant_id: Uuid,
    id: Uuid,
) -> Result<Option<MigrationRecord>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM rbac_migrations WHERE tenant_id = $1 AND id = $2");
    c.query_opt(&sql, &[&tenant_id, &id])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// The app's unfinished migration, if any.
pub async fn active_for_app(
    c: &impl GenericClient,
    tenant_id: Uuid,
    app_id: &str,
) -> Result<Option<MigrationRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM rbac_migrations WHERE tenant_id = $1 AND app_id = $2
           AND state IN ('running', 'paused', 'rolling_back')"
    );
    c.query_opt(&sql, &[&tenant_id, &app_id])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// Write everything that changes after the insert.
pub async fn save(c: &impl GenericClient, m: &MigrationRecord) -> Result<(), StoreError> {
    c.execute(
        "UPDATE rbac_migrations SET state = $3, current_step = $4, steps = $5, run = $6,
             paused_reason = $7, check_ids = $8, job_id = $9, updated_at = now(),
             finished_at = CASE WHEN $3 IN ('succeeded', 'rolled_back', 'failed')
                                THEN coalesce(finished_at, now()) END
         WHERE tenant_id = $1 AND id = $2",
        &[
            &m.tenant_id,
            &m.id,
            &m.state.as_str(),
            &m.current_step.as_str(),
            &steps_json(&m.steps)?,
            &m.run,
            &m.paused_reason,
            &m.check_ids,
            &m.job_id,
        ],
    )
    .await?;
    Ok(())
}

/// A page of the tenant's migrations, newest first; `after` is the last id of the previous page.
pub async fn list(
    c: &impl GenericClient,
    tenant_id: Uuid,
    app_id: Option<&str>,
    state: Option<State>,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<MigrationRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM rbac_migrations m
         WHERE tenant_id = $1 AND ($2::text IS NULL OR app_id = $2)
           AND ($3::text IS NULL OR state = $3)
           AND ($4::uuid IS NULL OR (created_at, id) < (
                SELECT created_at, id FROM rbac_migrations WHERE tenant_id = $1 AND id = $4))
         ORDER BY created_at DESC, id DESC LIMIT $5"
    );
    let state = state.map(State::as_str);
    c.query(&sql, &[&tenant_id, &app_id, &state, &after, &limit])
        .await?
        .iter()
        .map(from_row)
        .collect()
}
