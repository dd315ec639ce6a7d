//! SQL for the `rbac_restrictions` table: RBAC for Applications restrictions keyed by
//! (tenant, app id, scope key), with mailscope's own UUID as the API id.
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

use super::StoreError;
use super::access_policies::PolicyState;

#[derive(Debug, Clone, PartialEq)]
pub struct RbacRestrictionRecord {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub app_id: String,
    pub service_principal_object_id: String,
    pub scope_key: String,
    /// `recipient_group_scope`, `member_of_group` or `recipient_filter`.
    pub scope_kind: String,
    pub scope_group_alias: Option<String>,
    pub scope_object_id: Option<String>,
    pub scope_address: Option<String>,
    pub scope_distinguished_name: Option<String>,
    pub recipient_filter: Option<String>,
    pub management_scope: Option<String>,
    pub permissions: Vec<String>,
    pub assignment_names: Vec<String>,
    pub entra_grants_removed: Vec<String>,
    pub state: PolicyState,
    /// `created` or `adopted`.
    pub origin: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, tenant_id, app_id, service_principal_object_id, scope_key, scope_kind, \
    scope_group_alias, scope_object_id, scope_address, scope_distinguished_name, recipient_filter, \
    management_scope, permissions, assignment_names, entra_grants_removed, state, origin, \
    created_at, updated_at";

fn from_row(r: &Row) -> Result<RbacRestrictionRecord, StoreError> {
    let state: &str = r.get(15);
    Ok(RbacRestrictionRecord {
        id: r.get(0),
        tenant_id: r.get(1),
        app_id: r.get(2),
        service_principal_object_id: r.get(3),
        scope_key: r.get(4),
        scope_kind: r.get(5),
        scope_group_alias: r.get(6),
        scope_object_id: r.get(7),
        scope_address: r.get(8),
        scope_distinguished_name: r.get(9),
        recipient_filter: r.get(10),
        management_scope: r.get(11),
        permissions: r.get(12),
        assignment_names: r.get(13),
        entra_grants_removed: r.get(14),
        state: PolicyState::parse(state).ok_or_else(|| {
            StoreError::Other(anyhow::anyhow!(
                "rbac_restrictions.state has an unknown value {state:?}"
            ))
        })?,
        origin: r.get(16),
        created_at: r.get(17),
        updated_at: r.get(18),
    })
}

pub async fn get(
    c: &impl GenericClient,
    tenant_id: Uuid,
    id: Uuid,
) -> Result<Option<RbacRestrictionRecord>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM rbac_restrictions WHERE tenant_id = $1 AND id = $2");
    c.query_opt(&sql, &[&tenant_id, &id])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

pub async fn get_by_key(
    c: &impl GenericClient,
    tenant_id: Uuid,
    app_id: &str,
    scope_key: &str,
) -> Result<Option<RbacRestrictionRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM rbac_restrictions WHERE tenant_id = $1 AND app_id = $2 AND scope_key = $3"
    );
    c.query_opt(&sql, &[&tenant_id, &app_id, &scope_key])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// A page of the tenant's restrictions (optionally one app's), by id.
pub async fn list(
    c: &impl GenericClient,
    tenant_id: Uuid,
    app_id: Option<&str>,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<RbacRestrictionRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM rbac_restrictions
         WHERE tenant_id = $1 AND ($2::text IS NULL OR app_id = $2)
           AND ($3::uuid IS NULL OR id > $3)
         ORDER BY id LIMIT $4"
    );
    c.query(&sql, &[&tenant_id, &app_id, &after, &limit])
        .await?
        .iter()
        .map(from_row)
        .collect()
}

/// Every restriction of the tenant.
pub async fn all(
    c: &impl GenericClient,
    tenant_id: Uuid,
) -> Result<Vec<RbacRestrictionRecord>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM rbac_restrictions WHERE tenant_id = $1 ORDER BY id");
    c.query(&sql, &[&tenant_id])
        .await?
        .iter()
        .map(from_row)
        .collect()
}

/// Insert, or rewrite everything but id, tenant and app of an existing row.
pub async fn upsert(
    c: &impl GenericClient,
    p: &RbacRestrictionRecord,
) -> Result<RbacRestrictionRecord, StoreError> {
    let sql = format!(
        "INSERT INTO rbac_restrictions (id, tenant_id, app_id, service_principal_object_id,
             scope_key, scope_kind, scope_group_alias, scope_object_id, scope_address,
             scope_distinguished_name, recipient_filter, management_scope, permissions,
             assignment_names, entra_grants_removed, state, origin)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
         ON CONFLICT (id) DO UPDATE SET
             service_principal_object_id = EXCLUDED.service_principal_object_id,
             scope_key = EXCLUDED.scope_key, scope_kind = EXCLUDED.scope_kind,
             scope_group_alias = EXCLUDED.scope_group_alias,
             scope_object_id = EXCLUDED.scope_object_id, scope_address = EXCLUDED.scope_address,
             scope_distinguished_name = EXCLUDED.scope_distinguished_name,
             recipient_filter = EXCLUDED.recipient_filter,
             management_scope = EXCLUDED.management_scope, permissions = EXCLUDED.permissions,
             assignment_names = EXCLUDED.assignment_names,
             entra_grants_removed = EXCLUDED.entra_grants_removed, state = EXCLUDED.state,
             origin = EXCLUDED.origin, updated_at = now()
         RETURNING {COLUMNS}"
    );
    let row = c
        .query_one(
            &sql,
            &[
                &p.id,
                &p.tenant_id,
                &p.app_id,
                &p.service_principal_object_id,
                &p.scope_key,
                &p.scope_kind,
                &p.scope_group_alias,
                &p.scope_object_id,
                &p.scope_address,
                &p.scope_distinguished_name,
                &p.recipient_filter,
                &p.management_scope,
                &p.permissions,
                &p.assignment_names,
                &p.entra_grants_removed,
                &p.state.as_str(),
                &p.origin,
            ],
        )
        .await?;
    from_row(&row)
}

pub async fn delete(c: &impl GenericClient, tenant_id: Uuid, id: Uuid) -> Result<bool, StoreError> {
    Ok(c.execute(
        "DELETE FROM rbac_restrictions WHERE tenant_id = $1 AND id = $2",
        &[&tenant_id, &id],
    )
    .await?
        == 1)
}
