//! SQL for the `propagation_checks` table. The probe secret is stored only sealed (see
//! `crypto.rs`, bound to the check's id) and never leaves this layer in a record's `Debug`.
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

use super::StoreError;
use crate::domain::propagation::{Bracket, Expectation};

/// A check's state, mapped to the stored values (the table's CHECK constraint) here only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckState {
    Queued,
    Running,
    Succeeded,
    /// Exchange disagrees with the expectations: a configuration problem, not a delay.
    Misconfigured,
    TimedOut,
    Cancelled,
    Failed,
}

impl CheckState {
    pub const ALL: [CheckState; 7] = [
        CheckState::Queued,
        CheckState::Running,
        CheckState::Succeeded,
        CheckState::Misconfigured,
        CheckState::TimedOut,
        CheckState::Cancelled,
        CheckState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CheckState::Queued => "queued",
            CheckState::Running => "running",
            CheckState::Succeeded => "succeeded",
            CheckState::Misconfigured => "misconfigured",
            CheckState::TimedOut => "timed_out",
            CheckState::Cancelled => "cancelled",
            CheckState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<CheckState> {
        CheckState::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Ended: the state never changes again.
    pub fn is_final(self) -> bool {
        !matches!(self, CheckState::Queued | CheckState::Running)
    }
}

/// Where a check is: Exchange's verdict, Graph as the app, or ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Configuration,
    Live,
    Done,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Configuration => "configuration",
            Stage::Live => "live",
            Stage::Done => "done",
        }
    }

    pub fn parse(s: &str) -> Option<Stage> {
        [Stage::Configuration, Stage::Live, Stage::Done]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

/// Which restriction a check verifies, and so which of Exchange's verdicts stage 1 asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mechanism {
    /// An application access policy: `Test-ApplicationAccessPolicy`.
    #[default]
    AccessPolicy,
    /// RBAC for Applications: `Test-ServicePrincipalAuthorization -Resource` (no cache, docs/microsoft-365.md §3.1).
    Rbac,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::AccessPolicy => "access_policy",
            Mechanism::Rbac => "rbac",
        }
    }

    pub fn parse(s: &str) -> Option<Mechanism> {
        [Mechanism::AccessPolicy, Mechanism::Rbac]
            .into_iter()
            .find(|m| m.as_str() == s)
    }
}

#[derive(Clone)]
pub struct CheckRecord {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub app_id: Uuid,
    pub state: CheckState,
    pub stage: Stage,
    pub verified_by: Option<String>,
    pub expectations: Vec<Expectation>,
    pub required_matches: i32,
    pub revision: i32,
    pub rounds: i32,
    pub deadline: DateTime<Utc>,
    pub callback_url: Option<String>,
    pub job_id: Option<Uuid>,
    pub cancel_requested: bool,
    pub probe_key_id: Option<Uuid>,
    pub probe_secret_sealed: Option<Vec<u8>>,
    pub reason: Option<String>,
    pub result: Option<serde_json::Value>,
    pub origin: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// How long the change took to be in force, once succeeded through Graph.
    pub propagation_seconds: Option<Bracket>,
    pub changed_at: DateTime<Utc>,
    pub mechanism: Mechanism,
}

impl std::fmt::Debug for CheckRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckRecord")
            .field("id", &self.id)
            .field("state", &self.state)
            .field("stage", &self.stage)
            .field("probe_key_id", &self.probe_key_id)
            .finish_non_exhaustive()
    }
}

impl CheckRecord {
    pub fn is_final(&self) -> bool {
        self.state.is_final()
    }
}

const COLUMNS: &str = "id, tenant_id, app_id, state, stage, verified_by, expectations, \
    required_matches, revision, rounds, deadline, callback_url, job_id, cancel_requested, \
    probe_key_id, probe_secret_sealed, reason, result, origin, created_at, updated_at, started_at, \
    finished_at, propagation_seconds, changed_at, mechanism, propagation_seconds_at_least";

fn from_row(r: &Row) -> CheckRecord {
    let exp: serde_json::Value = r.get(6);
    // The table's CHECK constraints admit only the values the enums know.
    let state = CheckState::parse(r.get(3)).unwrap_or(CheckState::Failed);
    let stage = Stage::parse(r.get(4)).unwrap_or(Stage::Done);
    CheckRecord {
        id: r.get(0),
        tenant_id: r.get(1),
        app_id: r.get(2),
        state,
        stage,
        verified_by: r.get(5),
        expectations: serde_json::from_value(exp).unwrap_or_default(),
        required_matches: r.get(7),
        revision: r.get(8),
        rounds: r.get(9),
        deadline: r.get(10),
        callback_url: r.get(11),
        job_id: r.get(12),
        cancel_requested: r.get(13),
        probe_key_id: r.get(14),
        probe_secret_sealed: r.get(15),
        reason: r.get(16),
        result: r.get(17),
        origin: r.get(18),
        created_at: r.get(19),
        updated_at: r.get(20),
        started_at: r.get(21),
        finished_at: r.get(22),
        propagation_seconds: r.get::<_, Option<f64>>(23).map(|at_most| Bracket {
            // Checks that ended before the bracket was recorded knew only the upper end.
            at_least: r.get::<_, Option<f64>>(26).unwrap_or(0.0),
            at_most,
        }),
        changed_at: r.get(24),
        mechanism: Mechanism::parse(r.get(25)).unwrap_or_default(),
    }
}

fn json(e: &[Expectation]) -> serde_json::Value {
    serde_json::to_value(e).unwrap_or_else(|_| serde_json::json!([]))
}

pub struct NewCheck<'a> {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub app_id: Uuid,
    pub expectations: &'a [Expectation],
    pub required_matches: i32,
    pub deadline: DateTime<Utc>,
    pub callback_url: Option<&'a str>,
    pub origin: &'a str,
    pub mechanism: Mechanism,
}

pub async fn get(
    c: &impl GenericClient,
    tenant_id: Uuid,
    id: Uuid,
) -> Result<Option<CheckRecord>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM propagation_checks WHERE tenant_id = $1 AND id = $2");
    Ok(c.query_opt(&sql, &[&tenant_id, &id])
        .await?
        .as_ref()
        .map(from_row))
}

pub async fn get_by_id(
    c: &impl GenericClient,
    id: Uuid,
) -> Result<Option<CheckRecord>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM propagation_checks WHERE id = $1");
    Ok(c.query_opt(&sql, &[&id]).await?.as_ref().map(from_row))
}

/// The app's active check, locked for the caller's transaction.
pub async fn active_for_app(
    c: &impl GenericClient,
    tenant_id: Uuid,
    app_id: Uuid,
) -> Result<Option<CheckRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM propagation_checks
         WHERE tenant_id = $1 AND app_id = $2 AND state IN ('queued', 'running') FOR UPDATE"
    );
    Ok(c.query_opt(&sql, &[&tenant_id, &app_id])
        .await?
        .as_ref()
        .map(from_row))
}

pub async fn insert(c: &impl GenericClient, n: &NewCheck<'_>) -> Result<CheckRecord, StoreError> {
    let sql = format!(
        "INSERT INTO propagation_checks (id, tenant_id, app_id, expectations, required_matches,
             deadline, callback_url, origin, mechanism)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {COLUMNS}"
    );
    let row = c
        .query_one(
            &sql,
            &[
                &n.id,
                &n.tenant_id,
                &n.app_id,
                &json(n.expectations),
                &n.required_matches,
                &n.deadline,
                &n.callback_url,
                &n.origin,
                &n.mechanism.as_str(),
            ],
        )
        .await?;
    Ok(from_row(&row))
}

pub async fn set_job(c: &impl GenericClient, id: Uuid, job_id: Uuid) -> Result<(), StoreError> {
    c.execute(
        "UPDATE propagation_checks SET job_id = $2 WHERE id = $1",
        &[&id, &job_id],
    )
    .await?;
    Ok(())
}

/// New expectations for an active check: streaks restart, the configuration stage runs again,
/// and a run in progress discards what it saw (the revision moves on). The latest change decides
/// the mechanism verified.
pub async fn replace_expectations(
    c: &impl GenericClient,
    id: Uuid,
    expectations: &[Expectation],
    deadline: DateTime<Utc>,
    callback_url: Option<&str>,
    mechanism: Mechanism,
) -> Result<CheckRecord, StoreError> {
    let sql = format!(
        "UPDATE propagation_checks SET expectations = $2, revision = revision + 1,
             stage = 'configuration', rounds = 0, deadline = greatest(deadline, $3),
             cancel_requested = false, mechanism = $5,
             callback_url = coalesce($4, callback_url), changed_at = now(), updated_at = now()
         WHERE id = $1 RETURNING {COLUMNS}"
    );
    let row = c
        .query_one(
            &sql,
            &[
                &id,
                &json(expectations),
                &deadline,
                &callback_url,
                &mechanism.as_str(),
            ],
        )
        .await?;
    Ok(from_row(&row))
}

/// What one run of the check learnt, written only if the expectations did not change meanwhile.
pub struct Progress<'a> {
    pub state: CheckState,
    pub stage: Stage,
    pub verified_by: Option<&'a str>,
    pub expectations: &'a [Expectation],
    pub rounds: i32,
    pub reason: Option<&'a str>,
    pub result: Option<&'a serde_json::Value>,
    pub propagation_seconds: Option<Bracket>,
}

pub async fn save_progress(
    c: &impl GenericClient,
    id: Uuid,
    revision: i32,
    p: &Progress<'_>,
) -> Result<bool, StoreError> {
    let n = c
        .execute(
            "UPDATE propagation_checks SET state = $3, stage = $4, verified_by = $5,
                 expectations = $6, rounds = $7, reason = $8, result = $9,
                 propagation_seconds = $10, propagation_seconds_at_least = $11,
                 updated_at = now(),
                 started_at = coalesce(started_at, now()),
                 finished_at = CASE WHEN $3 IN ('queued', 'running') THEN NULL ELSE now() END
             WHERE id = $1 AND revision = $2 AND state IN ('queued', 'running')
               AND (NOT cancel_requested OR $3 NOT IN ('queued', 'running'))",
            &[
                &id,
                &revision,
                &p.state.as_str(),
                &p.stage.as_str(),
                &p.verified_by,
                &json(p.expectations),
                &p.rounds,
                &p.reason,
                &p.result,
                &p.propagation_seconds.map(|b| b.at_most),
                &p.propagation_seconds.map(|b| b.at_least),
            ],
        )
        .await?;
    Ok(n == 1)
}

/// End a check whatever its revision (cancel, failure).
pub async fn finish(
    c: &impl GenericClient,
    id: Uuid,
    state: CheckState,
    reason: Option<&str>,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE propagation_checks SET state = $2, reason = coalesce($3, reason), stage = 'done',
             updated_at = now(), finished_at = now()
         WHERE id = $1 AND state IN ('queued', 'running')",
        &[&id, &state.as_str(), &reason],
    )
    .await?;
    Ok(())
}

pub async fn request_cancel(c: &impl GenericClient, id: Uuid) -> Result<(), StoreError> {
    c.execute(
        "UPDATE propagation_checks SET cancel_requested = true, updated_at = now()
         WHERE id = $1 AND state IN ('queued', 'running')",
        &[&id],
    )
    .await?;
    Ok(())
}

/// Record the probe secret just added (sealed) before using it, so a later run can remove it.
pub async fn set_probe(
    c: &impl GenericClient,
    id: Uuid,
    key_id: Uuid,
    sealed: &[u8],
    cipher_key_id: &str,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE propagation_checks SET probe_key_id = $2, probe_secret_sealed = $3,
             probe_secret_key_id = $4, updated_at = now() WHERE id = $1",
        &[&id, &key_id, &sealed, &cipher_key_id],
    )
    .await?;
    Ok(())
}

/// The tenant's checks that may have a probe secret on an app: one recorded, or a live stage
/// still running (which may have added one it has not recorded yet).
pub async fn holding_probes(
    c: &impl GenericClient,
    tenant_id: Uuid,
) -> Result<Vec<CheckRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM propagation_checks
         WHERE tenant_id = $1
           AND (probe_key_id IS NOT NULL
                OR (stage <> 'configuration' AND state IN ('queued', 'running')))"
    );
    Ok(c.query(&sql, &[&tenant_id])
        .await?
        .iter()
        .map(from_row)
        .collect())
}

/// The probe secret was removed from the app (or never existed): forget it.
pub async fn clear_probe(c: &impl GenericClient, id: Uuid) -> Result<(), StoreError> {
    c.execute(
        "UPDATE propagation_checks SET probe_key_id = NULL, probe_secret_sealed = NULL,
             probe_secret_key_id = NULL, updated_at = now() WHERE id = $1",
        &[&id],
    )
    .await?;
    Ok(())
}

pub async fn list(
    c: &impl GenericClient,
    tenant_id: Uuid,
    state: Option<CheckState>,
    app_id: Option<Uuid>,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<CheckRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM propagation_checks
         WHERE tenant_id = $1 AND ($2::text IS NULL OR state = $2)
           AND ($3::uuid IS NULL OR app_id = $3) AND ($4::uuid IS NULL OR id > $4)
         ORDER BY id LIMIT $5"
    );
    let state = state.map(CheckState::as_str);
    let rows = c
        .query(&sql, &[&tenant_id, &state, &app_id, &after, &limit])
        .await?;
    Ok(rows.iter().map(from_row).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_stages_round_trip_through_their_stored_values() {
        for s in CheckState::ALL {
            assert_eq!(CheckState::parse(s.as_str()), Some(s));
        }
        assert_eq!(CheckState::TimedOut.as_str(), "timed_out");
        assert!(CheckState::Misconfigured.is_final() && !CheckState::Running.is_final());
        assert_eq!(CheckState::parse("done"), None);
        for s in [Stage::Configuration, Stage::Live, Stage::Done] {
            assert_eq!(Stage::parse(s.as_str()), Some(s));
        }
    }
}
