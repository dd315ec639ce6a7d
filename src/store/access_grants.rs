//! Access grants: the desired state, the step log and the condition (migration 0011).
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

use super::StoreError;
use super::step_runs::StepRun;
use crate::domain::grant::{Condition, Mechanism, StepEntry};

#[derive(Debug, Clone)]
pub struct GrantRecord {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub key: String,
    /// The desired state as accepted (`provisioning::grants::Spec`).
    pub spec: serde_json::Value,
    pub mechanism: Mechanism,
    pub revision: i64,
    pub removing: bool,
    pub condition: Condition,
    pub steps: Vec<StepEntry>,
    pub labels: serde_json::Value,
    pub external_ref: Option<String>,
    pub callback_url: Option<String>,
    pub job_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub condition_at: DateTime<Utc>,
    /// The runner of the step under way (`store::step_runs`); written only through that module.
    pub step_run: Option<StepRun>,
}

const COLUMNS: &str = "id, tenant_id, key, spec, mechanism, revision, removing, condition, steps, \
     labels, external_ref, callback_url, job_id, created_at, updated_at, condition_at, step_run";

fn from_row(r: &Row) -> Result<GrantRecord, StoreError> {
    let mechanism: String = r.get(4);
    let condition: String = r.get(7);
    let steps: serde_json::Value = r.get(8);
    Ok(GrantRecord {
        id: r.get(0),
        tenant_id: r.get(1),
        key: r.get(2),
        spec: r.get(3),
        mechanism: match mechanism.as_str() {
            "rbac" => Mechanism::Rbac,
            _ => Mechanism::AccessPolicy,
        },
        revision: r.get(5),
        removing: r.get(6),
        condition: Condition::parse(&condition).ok_or_else(|| {
            StoreError::Other(anyhow::anyhow!(
                "access_grants.condition holds the unknown value `{condition}`"
            ))
        })?,
        steps: serde_json::from_value(steps)
            .map_err(|e| StoreError::Other(anyhow::anyhow!("access_grants.steps: {e}")))?,
        labels: r.get(9),
        external_ref: r.get(10),
        callback_url: r.get(11),
        job_id: r.get(12),
        created_at: r.get(13),
        updated_at: r.get(14),
        condition_at: r.get(15),
        step_run: super::step_runs::parse(r.get(16))?,
    })
}

fn steps_json(steps: &[StepEntry]) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(steps).map_err(|e| StoreError::Other(anyhow::anyhow!("steps: {e}")))
}

pub async fn get(
    c: &impl GenericClient,
    tenant_id: Uuid,
    key: &str,
) -> Result<Option<GrantRecord>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM access_grants WHERE tenant_id = $1 AND key = $2");
    c.query_opt(&sql, &[&tenant_id, &key])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// The grant, its row locked until the transaction ends (writers of the desired state).
pub async fn get_for_update(
    c: &impl GenericClient,
    tenant_id: Uuid,
    key: &str,
) -> Result<Option<GrantRecord>, StoreError> {
    let sql =
        format!("SELECT {COLUMNS} FROM access_grants WHERE tenant_id = $1 AND key = $2 FOR UPDATE");
    c.query_opt(&sql, &[&tenant_id, &key])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// Insert a new grant; `false` when one with the key exists (a concurrent first PUT won).
pub async fn insert(c: &impl GenericClient, g: &GrantRecord) -> Result<bool, StoreError> {
    Ok(c.execute(
        "INSERT INTO access_grants (id, tenant_id, key, spec, mechanism, revision, removing,
             condition, steps, labels, external_ref, callback_url, job_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         ON CONFLICT (tenant_id, key) DO NOTHING",
        &[
            &g.id,
            &g.tenant_id,
            &g.key,
            &g.spec,
            &g.mechanism.as_str(),
            &g.revision,
            &g.removing,
            &g.condition.as_str(),
            &steps_json(&g.steps)?,
            &g.labels,
            &g.external_ref,
            &g.callback_url,
            &g.job_id,
        ],
    )
    .await?
        == 1)
}

/// Write every mutable column of a grant the caller holds locked.
pub async fn save(c: &impl GenericClient, g: &GrantRecord) -> Result<(), StoreError> {
    c.execute(
        "UPDATE access_grants SET spec = $2, mechanism = $3, revision = $4, removing = $5,
             condition_at = CASE WHEN condition = $6 THEN condition_at ELSE now() END,
             condition = $6, steps = $7, labels = $8, external_ref = $9, callback_url = $10,
             job_id = $11, updated_at = now()
         WHERE id = $1",
        &[
            &g.id,
            &g.spec,
            &g.mechanism.as_str(),
            &g.revision,
            &g.removing,
            &g.condition.as_str(),
            &steps_json(&g.steps)?,
            &g.labels,
            &g.external_ref,
            &g.callback_url,
            &g.job_id,
        ],
    )
    .await?;
    Ok(())
}

/// Record the step log and condition, only if the desired state is still at `revision` (a run
/// that started on an older revision leaves its result to the next run). `true` when written.
pub async fn record_steps(
    c: &impl GenericClient,
    id: Uuid,
    revision: i64,
    steps: &[StepEntry],
    condition: Condition,
) -> Result<bool, StoreError> {
    Ok(c.execute(
        "UPDATE access_grants SET steps = $3,
             condition_at = CASE WHEN condition = $4 THEN condition_at ELSE now() END,
             condition = $4, updated_at = now()
         WHERE id = $1 AND revision = $2",
        &[&id, &revision, &steps_json(steps)?, &condition.as_str()],
    )
    .await?
        == 1)
}

/// What a list may be narrowed to.
#[derive(Debug, Default)]
pub struct Filter {
    /// Grants whose labels contain all of these (`{"vendor": "acme"}`).
    pub labels: Option<serde_json::Value>,
    pub condition: Option<Condition>,
    pub external_ref: Option<String>,
    /// Only these keys (a caller limited to some grants).
    pub keys: Option<Vec<String>>,
}

/// Ordered by key, after `after`.
pub async fn list(
    c: &impl GenericClient,
    tenant_id: Uuid,
    filter: &Filter,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<GrantRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM access_grants
         WHERE tenant_id = $1 AND ($2::text IS NULL OR key > $2)
           AND ($3::jsonb IS NULL OR labels @> $3)
           AND ($4::text IS NULL OR condition = $4)
           AND ($5::text IS NULL OR external_ref = $5)
           AND ($6::text[] IS NULL OR key = ANY($6))
         ORDER BY key LIMIT $7"
    );
    let condition = filter.condition.map(Condition::as_str);
    c.query(
        &sql,
        &[
            &tenant_id,
            &after,
            &filter.labels,
            &condition,
            &filter.external_ref,
            &filter.keys,
            &limit,
        ],
    )
    .await?
    .iter()
    .map(from_row)
    .collect()
}

/// A certificate credential of a grant's app.
#[derive(Debug, Clone)]
pub struct CertificateRecord {
    pub key_id: Uuid,
    pub thumbprint: String,
    pub der: Vec<u8>,
    pub display_name: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

pub async fn certificates(
    c: &impl GenericClient,
    tenant_id: Uuid,
    key: &str,
) -> Result<Vec<CertificateRecord>, StoreError> {
    Ok(c
        .query(
            "SELECT key_id, thumbprint, certificate_der, display_name, not_before, not_after, created_at
             FROM access_grant_certificates WHERE tenant_id = $1 AND grant_key = $2
             ORDER BY not_after, key_id",
            &[&tenant_id, &key],
        )
        .await?
        .iter()
        .map(|r| CertificateRecord {
            key_id: r.get(0),
            thumbprint: r.get(1),
            der: r.get(2),
            display_name: r.get(3),
            not_before: r.get(4),
            not_after: r.get(5),
            created_at: r.get(6),
        })
        .collect())
}

pub async fn insert_certificate(
    c: &impl GenericClient,
    tenant_id: Uuid,
    key: &str,
    cert: &CertificateRecord,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO access_grant_certificates (tenant_id, grant_key, key_id, thumbprint,
             certificate_der, display_name, not_before, not_after)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &tenant_id,
            &key,
            &cert.key_id,
            &cert.thumbprint,
            &cert.der,
            &cert.display_name,
            &cert.not_before,
            &cert.not_after,
        ],
    )
    .await?;
    Ok(())
}

pub async fn delete_certificate(
    c: &impl GenericClient,
    tenant_id: Uuid,
    key: &str,
    key_id: Uuid,
) -> Result<bool, StoreError> {
    Ok(c.execute(
        "DELETE FROM access_grant_certificates WHERE tenant_id = $1 AND grant_key = $2 AND key_id = $3",
        &[&tenant_id, &key, &key_id],
    )
    .await?
        == 1)
}

/// Record that a credential of a grant's app was announced as expiring soon. `false` when it was
/// already (by an earlier scan, or a concurrent one that committed first).
pub async fn insert_credential_notice(
    c: &impl GenericClient,
    tenant_id: Uuid,
    key: &str,
    key_id: Uuid,
    kind: &str,
    end_date_time: DateTime<Utc>,
) -> Result<bool, StoreError> {
    Ok(c.execute(
        "INSERT INTO access_grant_credential_notices (tenant_id, grant_key, key_id, kind,
             end_date_time)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tenant_id, grant_key, key_id) DO NOTHING",
        &[&tenant_id, &key, &key_id, &kind, &end_date_time],
    )
    .await?
        == 1)
}

/// Link the notices of one announcement to its delivery.
pub async fn set_notice_delivery(
    c: &impl GenericClient,
    tenant_id: Uuid,
    key: &str,
    key_ids: &[Uuid],
    delivery_id: Uuid,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE access_grant_credential_notices SET delivery_id = $4
         WHERE tenant_id = $1 AND grant_key = $2 AND key_id = ANY($3)",
        &[&tenant_id, &key, &key_ids, &delivery_id],
    )
    .await?;
    Ok(())
}

/// Tenants with a grant that is not removed (each gets a credential-expiry scan).
pub async fn tenants_with_grants(c: &impl GenericClient) -> Result<Vec<Uuid>, StoreError> {
    Ok(c.query(
        "SELECT DISTINCT tenant_id FROM access_grants WHERE NOT removing",
        &[],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

/// A tenant's grants that are not being removed, ordered by key.
pub async fn live_in_tenant(
    c: &impl GenericClient,
    tenant_id: Uuid,
) -> Result<Vec<GrantRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM access_grants WHERE tenant_id = $1 AND NOT removing ORDER BY key"
    );
    c.query(&sql, &[&tenant_id])
        .await?
        .iter()
        .map(from_row)
        .collect()
}
