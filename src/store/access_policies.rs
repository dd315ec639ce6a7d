//! SQL for the `access_policies` table: application access policies keyed by
//! (tenant, app id, scope object id), with mailscope's own UUID as the API id.
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

use super::StoreError;
use crate::domain::access::AccessRight;

/// Where a policy stands with Microsoft: the `state` column (its CHECK constraint lists the same
/// values, migration 0004).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyState {
    /// Written; Microsoft takes 30 minutes to hours to apply it.
    PendingPropagation,
    /// Seen in force by a propagation check.
    InForce,
    /// Found in the tenant, never checked by mailscope.
    Unverified,
}

/// How mailscope came to manage a policy: the `origin` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyOrigin {
    /// Created by mailscope.
    Created,
    /// Found in the tenant on create and taken under management.
    Adopted,
    /// Imported by sync.
    Imported,
}

impl PolicyState {
    /// The database (and API) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyState::PendingPropagation => "pending_propagation",
            PolicyState::InForce => "in_force",
            PolicyState::Unverified => "unverified",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::PendingPropagation, Self::InForce, Self::Unverified]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

impl PolicyOrigin {
    /// The database (and API) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyOrigin::Created => "created",
            PolicyOrigin::Adopted => "adopted",
            PolicyOrigin::Imported => "imported",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Created, Self::Adopted, Self::Imported]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AccessPolicyRecord {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub app_id: String,
    pub scope_object_id: String,
    pub scope_type: String,
    pub scope_address: String,
    pub scope_alias: Option<String>,
    pub access_right: String,
    pub description: String,
    pub exchange_identity: Option<String>,
    pub state: PolicyState,
    pub origin: PolicyOrigin,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl AccessPolicyRecord {
    /// The recorded access right (only Exchange's two spellings are ever written).
    pub fn right(&self) -> AccessRight {
        if self.access_right == "DenyAccess" {
            AccessRight::DenyAccess
        } else {
            AccessRight::RestrictAccess
        }
    }
}

const COLUMNS: &str = "id, tenant_id, app_id, scope_object_id, scope_type, scope_address, \
    scope_alias, access_right, description, exchange_identity, state, origin, created_at, updated_at";

/// A value the column's CHECK constraint does not allow (a migration this code does not know).
fn unknown(column: &str, value: &str) -> StoreError {
    StoreError::Other(anyhow::anyhow!(
        "access_policies.{column} has an unknown value {value:?}"
    ))
}

fn from_row(r: &Row) -> Result<AccessPolicyRecord, StoreError> {
    let state: &str = r.get(10);
    let origin: &str = r.get(11);
    Ok(AccessPolicyRecord {
        id: r.get(0),
        tenant_id: r.get(1),
        app_id: r.get(2),
        scope_object_id: r.get(3),
        scope_type: r.get(4),
        scope_address: r.get(5),
        scope_alias: r.get(6),
        access_right: r.get(7),
        description: r.get(8),
        exchange_identity: r.get(9),
        state: PolicyState::parse(state).ok_or_else(|| unknown("state", state))?,
        origin: PolicyOrigin::parse(origin).ok_or_else(|| unknown("origin", origin))?,
        created_at: r.get(12),
        updated_at: r.get(13),
    })
}

pub async fn get(
    c: &impl GenericClient,
    tenant_id: Uuid,
    id: Uuid,
) -> Result<Option<AccessPolicyRecord>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM access_policies WHERE tenant_id = $1 AND id = $2");
    c.query_opt(&sql, &[&tenant_id, &id])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// The policy with this natural key, if mailscope knows it.
pub async fn get_by_key(
    c: &impl GenericClient,
    tenant_id: Uuid,
    app_id: &str,
    scope_object_id: &str,
) -> Result<Option<AccessPolicyRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM access_policies
         WHERE tenant_id = $1 AND app_id = $2 AND scope_object_id = $3"
    );
    c.query_opt(&sql, &[&tenant_id, &app_id, &scope_object_id])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// Ordered by id, after `after`; only `app_id`'s when given.
pub async fn list(
    c: &impl GenericClient,
    tenant_id: Uuid,
    app_id: Option<&str>,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<AccessPolicyRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM access_policies
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

/// The policies mailscope records for one app (client id, compared case-insensitively).
pub async fn for_app(
    c: &impl GenericClient,
    tenant_id: Uuid,
    app_id: &str,
) -> Result<Vec<AccessPolicyRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM access_policies
         WHERE tenant_id = $1 AND lower(app_id) = lower($2) ORDER BY created_at, id"
    );
    c.query(&sql, &[&tenant_id, &app_id])
        .await?
        .iter()
        .map(from_row)
        .collect()
}

/// Every policy of the tenant (for evaluation and sync).
pub async fn all(
    c: &impl GenericClient,
    tenant_id: Uuid,
) -> Result<Vec<AccessPolicyRecord>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM access_policies WHERE tenant_id = $1 ORDER BY id");
    c.query(&sql, &[&tenant_id])
        .await?
        .iter()
        .map(from_row)
        .collect()
}

/// How many policies use this scope.
pub async fn count_by_scope(
    c: &impl GenericClient,
    tenant_id: Uuid,
    scope_object_id: &str,
) -> Result<i64, StoreError> {
    let row = c
        .query_one(
            "SELECT count(*) FROM access_policies WHERE tenant_id = $1 AND scope_object_id = $2",
            &[&tenant_id, &scope_object_id],
        )
        .await?;
    Ok(row.get(0))
}

pub async fn insert(
    c: &impl GenericClient,
    p: &AccessPolicyRecord,
) -> Result<AccessPolicyRecord, StoreError> {
    let sql = format!(
        "INSERT INTO access_policies (id, tenant_id, app_id, scope_object_id, scope_type,
             scope_address, scope_alias, access_right, description, exchange_identity, state, origin)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         RETURNING {COLUMNS}"
    );
    let row = c
        .query_one(
            &sql,
            &[
                &p.id,
                &p.tenant_id,
                &p.app_id,
                &p.scope_object_id,
                &p.scope_type,
                &p.scope_address,
                &p.scope_alias,
                &p.access_right,
                &p.description,
                &p.exchange_identity,
                &p.state.as_str(),
                &p.origin.as_str(),
            ],
        )
        .await?;
    from_row(&row)
}

/// Rewrite everything but id, tenant and app (a replaced or re-described policy).
pub async fn update(
    c: &impl GenericClient,
    p: &AccessPolicyRecord,
) -> Result<AccessPolicyRecord, StoreError> {
    let sql = format!(
        "UPDATE access_policies SET scope_object_id = $3, scope_type = $4, scope_address = $5,
             scope_alias = $6, access_right = $7, description = $8, exchange_identity = $9,
             state = $10, origin = $11, updated_at = now()
         WHERE tenant_id = $1 AND id = $2
         RETURNING {COLUMNS}"
    );
    let row = c
        .query_one(
            &sql,
            &[
                &p.tenant_id,
                &p.id,
                &p.scope_object_id,
                &p.scope_type,
                &p.scope_address,
                &p.scope_alias,
                &p.access_right,
                &p.description,
                &p.exchange_identity,
                &p.state.as_str(),
                &p.origin.as_str(),
            ],
        )
        .await?;
    from_row(&row)
}

pub async fn delete(c: &impl GenericClient, tenant_id: Uuid, id: Uuid) -> Result<bool, StoreError> {
    Ok(c.execute(
        "DELETE FROM access_policies WHERE tenant_id = $1 AND id = $2",
        &[&tenant_id, &id],
    )
    .await?
        == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIGRATION: &str = include_str!("../../migrations/0004_scope_groups_and_policies.sql");

    #[test]
    fn states_and_origins_round_trip_and_are_the_check_constraint_values() {
        let table = &MIGRATION[MIGRATION
            .find("CREATE TABLE access_policies")
            .expect("the migration creates access_policies")..];
        for s in [
            PolicyState::PendingPropagation,
            PolicyState::InForce,
            PolicyState::Unverified,
        ] {
            assert_eq!(PolicyState::parse(s.as_str()), Some(s));
            assert!(table.contains(&format!("'{}'", s.as_str())), "{s:?}");
        }
        for o in [
            PolicyOrigin::Created,
            PolicyOrigin::Adopted,
            PolicyOrigin::Imported,
        ] {
            assert_eq!(PolicyOrigin::parse(o.as_str()), Some(o));
            assert!(table.contains(&format!("'{}'", o.as_str())), "{o:?}");
        }
        assert_eq!(PolicyState::parse("creating"), None);
    }
}
