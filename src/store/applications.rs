//! SQL for the `applications` and `application_secrets` tables. Secret texts never reach this
//! layer: only the metadata Microsoft shows for every secret (key id, name, hint, dates).
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

use super::StoreError;

/// The `state` column (CHECK `creating`, `ready`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplicationState {
    /// The intent is recorded; Microsoft may or may not have the registration yet.
    Creating,
    Ready,
}

impl ApplicationState {
    pub fn as_str(self) -> &'static str {
        match self {
            ApplicationState::Creating => "creating",
            ApplicationState::Ready => "ready",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "creating" => Ok(ApplicationState::Creating),
            "ready" => Ok(ApplicationState::Ready),
            other => Err(unknown("state", other)),
        }
    }
}

/// The `origin` column (CHECK `created`, `adopted`): whether DELETE removes the registration
/// from the tenant or only forgets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplicationOrigin {
    Created,
    Adopted,
}

impl ApplicationOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            ApplicationOrigin::Created => "created",
            ApplicationOrigin::Adopted => "adopted",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "created" => Ok(ApplicationOrigin::Created),
            "adopted" => Ok(ApplicationOrigin::Adopted),
            other => Err(unknown("origin", other)),
        }
    }
}

/// A value the table's CHECK constraint does not allow (a newer schema than this binary).
fn unknown(column: &str, value: &str) -> StoreError {
    StoreError::Other(anyhow::anyhow!(
        "applications.{column} holds the unknown value `{value}`"
    ))
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApplicationRecord {
    pub tenant_id: Uuid,
    pub key: String,
    /// An [`ApplicationState`] value.
    pub state: String,
    /// An [`ApplicationOrigin`] value.
    pub origin: String,
    pub marker: String,
    pub app_id: Option<Uuid>,
    pub application_object_id: Option<Uuid>,
    pub service_principal_object_id: Option<Uuid>,
    pub display_name: String,
    pub permissions: Vec<String>,
    pub grant_admin_consent: bool,
    pub allow_unscoped_permissions: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl ApplicationRecord {
    pub fn state(&self) -> Result<ApplicationState, StoreError> {
        ApplicationState::parse(&self.state)
    }

    pub fn origin(&self) -> Result<ApplicationOrigin, StoreError> {
        ApplicationOrigin::parse(&self.origin)
    }
}

const COLUMNS: &str = "tenant_id, key, state, origin, marker, app_id, application_object_id, \
    service_principal_object_id, display_name, permissions, grant_admin_consent, \
    allow_unscoped_permissions, created_at, updated_at";

fn from_row(r: &Row) -> ApplicationRecord {
    ApplicationRecord {
        tenant_id: r.get(0),
        key: r.get(1),
        state: r.get(2),
        origin: r.get(3),
        marker: r.get(4),
        app_id: r.get(5),
        application_object_id: r.get(6),
        service_principal_object_id: r.get(7),
        display_name: r.get(8),
        permissions: r.get(9),
        grant_admin_consent: r.get(10),
        allow_unscoped_permissions: r.get(11),
        created_at: r.get(12),
        updated_at: r.get(13),
    }
}

pub async fn get(
    c: &impl GenericClient,
    tenant_id: Uuid,
    key: &str,
) -> Result<Option<ApplicationRecord>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM applications WHERE tenant_id = $1 AND key = $2");
    Ok(c.query_opt(&sql, &[&tenant_id, &key])
        .await?
        .as_ref()
        .map(from_row))
}

/// The key under which an app id is already recorded in the tenant, if any.
pub async fn key_of_app(
    c: &impl GenericClient,
    tenant_id: Uuid,
    app_id: Uuid,
) -> Result<Option<String>, StoreError> {
    Ok(c.query_opt(
        "SELECT key FROM applications WHERE tenant_id = $1 AND app_id = $2",
        &[&tenant_id, &app_id],
    )
    .await?
    .map(|r| r.get(0)))
}

/// Ordered by key, after `after`.
pub async fn list(
    c: &impl GenericClient,
    tenant_id: Uuid,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<ApplicationRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM applications
         WHERE tenant_id = $1 AND ($2::text IS NULL OR key > $2)
         ORDER BY key LIMIT $3"
    );
    Ok(c.query(&sql, &[&tenant_id, &after, &limit])
        .await?
        .iter()
        .map(from_row)
        .collect())
}

/// Record the intent to create (state `creating`) unless the key is already recorded; committed
/// before Microsoft is asked to create anything.
pub async fn insert_intent(
    c: &impl GenericClient,
    r: &ApplicationRecord,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO applications (tenant_id, key, state, origin, marker, display_name, permissions,
             grant_admin_consent, allow_unscoped_permissions)
         VALUES ($1, $2, 'creating', 'created', $3, $4, $5, $6, $7)
         ON CONFLICT (tenant_id, key) DO NOTHING",
        &[
            &r.tenant_id,
            &r.key,
            &r.marker,
            &r.display_name,
            &r.permissions,
            &r.grant_admin_consent,
            &r.allow_unscoped_permissions,
        ],
    )
    .await?;
    Ok(())
}

/// Insert or replace the whole record; returns the stored row.
pub async fn save(
    c: &impl GenericClient,
    r: &ApplicationRecord,
) -> Result<ApplicationRecord, tokio_postgres::Error> {
    let sql = format!(
        "INSERT INTO applications (tenant_id, key, state, origin, marker, app_id,
             application_object_id, service_principal_object_id, display_name, permissions,
             grant_admin_consent, allow_unscoped_permissions)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT (tenant_id, key) DO UPDATE SET
             state = EXCLUDED.state, origin = EXCLUDED.origin, marker = EXCLUDED.marker,
             app_id = EXCLUDED.app_id, application_object_id = EXCLUDED.application_object_id,
             service_principal_object_id = EXCLUDED.service_principal_object_id,
             display_name = EXCLUDED.display_name, permissions = EXCLUDED.permissions,
             grant_admin_consent = EXCLUDED.grant_admin_consent,
             allow_unscoped_permissions = EXCLUDED.allow_unscoped_permissions, updated_at = now()
         RETURNING {COLUMNS}"
    );
    let row = c
        .query_one(
            &sql,
            &[
                &r.tenant_id,
                &r.key,
                &r.state,
                &r.origin,
                &r.marker,
                &r.app_id,
                &r.application_object_id,
                &r.service_principal_object_id,
                &r.display_name,
                &r.permissions,
                &r.grant_admin_consent,
                &r.allow_unscoped_permissions,
            ],
        )
        .await?;
    Ok(from_row(&row))
}

pub async fn delete(
    c: &impl GenericClient,
    tenant_id: Uuid,
    key: &str,
) -> Result<bool, StoreError> {
    Ok(c.execute(
        "DELETE FROM applications WHERE tenant_id = $1 AND key = $2",
        &[&tenant_id, &key],
    )
    .await?
        == 1)
}

#[derive(Debug, Clone, PartialEq)]
pub struct SecretRecord {
    pub key_id: Uuid,
    pub display_name: String,
    pub hint: Option<String>,
    pub start_date_time: DateTime<Utc>,
    pub end_date_time: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

pub async fn secrets(
    c: &impl GenericClient,
    tenant_id: Uuid,
    key: &str,
) -> Result<Vec<SecretRecord>, StoreError> {
    Ok(c.query(
        "SELECT key_id, display_name, hint, start_date_time, end_date_time, created_at
         FROM application_secrets WHERE tenant_id = $1 AND key = $2 ORDER BY end_date_time",
        &[&tenant_id, &key],
    )
    .await?
    .iter()
    .map(|r| SecretRecord {
        key_id: r.get(0),
        display_name: r.get(1),
        hint: r.get(2),
        start_date_time: r.get(3),
        end_date_time: r.get(4),
        created_at: r.get(5),
    })
    .collect())
}

pub async fn insert_secret(
    c: &impl GenericClient,
    tenant_id: Uuid,
    key: &str,
    s: &SecretRecord,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO application_secrets (tenant_id, key, key_id, display_name, hint,
             start_date_time, end_date_time)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        &[
            &tenant_id,
            &key,
            &s.key_id,
            &s.display_name,
            &s.hint,
            &s.start_date_time,
            &s.end_date_time,
        ],
    )
    .await?;
    Ok(())
}

pub async fn delete_secret(
    c: &impl GenericClient,
    tenant_id: Uuid,
    key: &str,
    key_id: Uuid,
) -> Result<bool, StoreError> {
    Ok(c.execute(
        "DELETE FROM application_secrets WHERE tenant_id = $1 AND key = $2 AND key_id = $3",
        &[&tenant_id, &key, &key_id],
    )
    .await?
        == 1)
}
