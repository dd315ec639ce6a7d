//! SQL for the `tenants` table. Credentials arrive here already sealed; this layer never sees
//! them in clear.
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

use super::StoreError;

#[derive(Debug, Clone)]
pub struct TenantRecord {
    pub tenant_id: Uuid,
    pub display_name: String,
    pub cloud: String,
    pub default_domain: String,
    pub endpoints: serde_json::Value,
    pub client_id: Uuid,
    pub credential_kind: String,
    pub credential_ciphertext: Vec<u8>,
    pub credential_key_id: String,
    pub canary_mailboxes: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "tenant_id, display_name, cloud, default_domain, endpoints, client_id, \
    credential_kind, credential_ciphertext, credential_key_id, canary_mailboxes, created_at, updated_at";

fn from_row(r: &Row) -> TenantRecord {
    TenantRecord {
        tenant_id: r.get(0),
        display_name: r.get(1),
        cloud: r.get(2),
        default_domain: r.get(3),
        endpoints: r.get(4),
        client_id: r.get(5),
        credential_kind: r.get(6),
        credential_ciphertext: r.get(7),
        credential_key_id: r.get(8),
        canary_mailboxes: r.get(9),
        created_at: r.get(10),
        updated_at: r.get(11),
    }
}

pub async fn get(c: &impl GenericClient, id: Uuid) -> Result<Option<TenantRecord>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM tenants WHERE tenant_id = $1");
    Ok(c.query_opt(&sql, &[&id]).await?.as_ref().map(from_row))
}

/// Tenants ordered by id, after `after`, restricted to `visible` unless `None` (all).
pub async fn list(
    c: &impl GenericClient,
    visible: Option<&[Uuid]>,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<TenantRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM tenants
         WHERE ($1::uuid[] IS NULL OR tenant_id = ANY($1))
           AND ($2::uuid IS NULL OR tenant_id > $2)
         ORDER BY tenant_id LIMIT $3"
    );
    let visible: Option<Vec<Uuid>> = visible.map(|v| v.to_vec());
    Ok(c.query(&sql, &[&visible, &after, &limit])
        .await?
        .iter()
        .map(from_row)
        .collect())
}

/// Insert or replace; returns the stored row and whether it was created.
pub async fn upsert(
    c: &impl GenericClient,
    t: &TenantRecord,
) -> Result<(TenantRecord, bool), StoreError> {
    let sql = format!(
        "INSERT INTO tenants (tenant_id, display_name, cloud, default_domain, endpoints, client_id,
             credential_kind, credential_ciphertext, credential_key_id, canary_mailboxes)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (tenant_id) DO UPDATE SET
             display_name = EXCLUDED.display_name, cloud = EXCLUDED.cloud,
             default_domain = EXCLUDED.default_domain, endpoints = EXCLUDED.endpoints,
             client_id = EXCLUDED.client_id, credential_kind = EXCLUDED.credential_kind,
             credential_ciphertext = EXCLUDED.credential_ciphertext,
             credential_key_id = EXCLUDED.credential_key_id,
             canary_mailboxes = EXCLUDED.canary_mailboxes, updated_at = now()
         RETURNING {COLUMNS}, (xmax = 0) AS inserted"
    );
    let row = c
        .query_one(
            &sql,
            &[
                &t.tenant_id,
                &t.display_name,
                &t.cloud,
                &t.default_domain,
                &t.endpoints,
                &t.client_id,
                &t.credential_kind,
                &t.credential_ciphertext,
                &t.credential_key_id,
                &t.canary_mailboxes,
            ],
        )
        .await?;
    Ok((from_row(&row), row.get(12)))
}

pub async fn delete(c: &impl GenericClient, id: Uuid) -> Result<bool, StoreError> {
    Ok(
        c.execute("DELETE FROM tenants WHERE tenant_id = $1", &[&id])
            .await?
            == 1,
    )
}
