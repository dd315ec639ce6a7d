//! SQL for the `scope_groups` table: mailscope's record of the mail-enabled security groups it
//! manages, keyed by (tenant, alias).
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

use super::StoreError;

/// The `membership` column (CHECK `exact`, `additive`): how a PUT's members relate to the
/// group's current members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Membership {
    #[default]
    Exact,
    Additive,
}

impl Membership {
    pub fn as_str(self) -> &'static str {
        match self {
            Membership::Exact => "exact",
            Membership::Additive => "additive",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "exact" => Ok(Membership::Exact),
            "additive" => Ok(Membership::Additive),
            other => Err(unknown("membership", other)),
        }
    }
}

/// The `origin` column (CHECK `created`, `adopted`, `imported`): whether mailscope made the
/// group (and deletes it from the tenant) or found it there (and only forgets it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupOrigin {
    Created,
    Adopted,
    Imported,
}

impl GroupOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupOrigin::Created => "created",
            GroupOrigin::Adopted => "adopted",
            GroupOrigin::Imported => "imported",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "created" => Ok(GroupOrigin::Created),
            "adopted" => Ok(GroupOrigin::Adopted),
            "imported" => Ok(GroupOrigin::Imported),
            other => Err(unknown("origin", other)),
        }
    }
}

/// A value the table's CHECK constraint does not allow (a newer schema than this binary).
fn unknown(column: &str, value: &str) -> StoreError {
    StoreError::Other(anyhow::anyhow!(
        "scope_groups.{column} holds the unknown value `{value}`"
    ))
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScopeGroupRecord {
    pub tenant_id: Uuid,
    pub alias: String,
    pub display_name: String,
    pub primary_smtp_address: String,
    pub object_id: String,
    /// A [`Membership`] value.
    pub membership: String,
    pub members: Vec<String>,
    /// A [`GroupOrigin`] value.
    pub origin: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "tenant_id, alias, display_name, primary_smtp_address, object_id, \
    membership, members, origin, created_at, updated_at";

fn from_row(r: &Row) -> ScopeGroupRecord {
    ScopeGroupRecord {
        tenant_id: r.get(0),
        alias: r.get(1),
        display_name: r.get(2),
        primary_smtp_address: r.get(3),
        object_id: r.get(4),
        membership: r.get(5),
        members: r.get(6),
        origin: r.get(7),
        created_at: r.get(8),
        updated_at: r.get(9),
    }
}

pub async fn get(
    c: &impl GenericClient,
    tenant_id: Uuid,
    alias: &str,
) -> Result<Option<ScopeGroupRecord>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM scope_groups WHERE tenant_id = $1 AND alias = $2");
    Ok(c.query_opt(&sql, &[&tenant_id, &alias])
        .await?
        .as_ref()
        .map(from_row))
}

pub async fn get_by_object_id(
    c: &impl GenericClient,
    tenant_id: Uuid,
    object_id: &str,
) -> Result<Option<ScopeGroupRecord>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM scope_groups WHERE tenant_id = $1 AND object_id = $2");
    Ok(c.query_opt(&sql, &[&tenant_id, &object_id])
        .await?
        .as_ref()
        .map(from_row))
}

/// The group mailscope manages under any of its names: alias, primary SMTP address or object id
/// (`name` in lower case). An alias wins over another group's address.
pub async fn get_by_any_name(
    c: &impl GenericClient,
    tenant_id: Uuid,
    name: &str,
) -> Result<Option<ScopeGroupRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM scope_groups
         WHERE tenant_id = $1
           AND (alias = $2 OR lower(primary_smtp_address) = $2 OR lower(object_id) = $2)
         ORDER BY alias = $2 DESC LIMIT 1"
    );
    Ok(c.query_opt(&sql, &[&tenant_id, &name])
        .await?
        .as_ref()
        .map(from_row))
}

/// Ordered by alias, after `after`.
pub async fn list(
    c: &impl GenericClient,
    tenant_id: Uuid,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<ScopeGroupRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM scope_groups
         WHERE tenant_id = $1 AND ($2::text IS NULL OR alias > $2)
         ORDER BY alias LIMIT $3"
    );
    Ok(c.query(&sql, &[&tenant_id, &after, &limit])
        .await?
        .iter()
        .map(from_row)
        .collect())
}

/// Insert or replace by (tenant, alias); returns the stored row.
pub async fn upsert(
    c: &impl GenericClient,
    g: &ScopeGroupRecord,
) -> Result<ScopeGroupRecord, StoreError> {
    let sql = format!(
        "INSERT INTO scope_groups (tenant_id, alias, display_name, primary_smtp_address, object_id,
             membership, members, origin)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (tenant_id, alias) DO UPDATE SET
             display_name = EXCLUDED.display_name,
             primary_smtp_address = EXCLUDED.primary_smtp_address,
             object_id = EXCLUDED.object_id, membership = EXCLUDED.membership,
             members = EXCLUDED.members, origin = EXCLUDED.origin, updated_at = now()
         RETURNING {COLUMNS}"
    );
    let row = c
        .query_one(
            &sql,
            &[
                &g.tenant_id,
                &g.alias,
                &g.display_name,
                &g.primary_smtp_address,
                &g.object_id,
                &g.membership,
                &g.members,
                &g.origin,
            ],
        )
        .await?;
    Ok(from_row(&row))
}

pub async fn delete(
    c: &impl GenericClient,
    tenant_id: Uuid,
    alias: &str,
) -> Result<bool, StoreError> {
    Ok(c.execute(
        "DELETE FROM scope_groups WHERE tenant_id = $1 AND alias = $2",
        &[&tenant_id, &alias],
    )
    .await?
        == 1)
}
