//! The append-only audit trail (the table rejects UPDATE and DELETE by trigger).
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::StoreError;

#[derive(Debug, Clone)]
pub struct NewAuditEvent<'a> {
    pub tenant_id: Uuid,
    pub actor_sub: Option<&'a str>,
    pub actor_app: Option<&'a str>,
    pub action: &'a str,
    pub target: &'a str,
    pub request_id: &'a str,
    pub details: serde_json::Value,
}

#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub id: i64,
    pub tenant_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub actor_sub: Option<String>,
    pub actor_app: Option<String>,
    pub action: String,
    pub target: String,
    pub request_id: String,
    pub details: serde_json::Value,
}

pub async fn insert(c: &impl GenericClient, e: &NewAuditEvent<'_>) -> Result<i64, StoreError> {
    let row = c
        .query_one(
            "INSERT INTO audit_events (tenant_id, actor_sub, actor_app, action, target, request_id, details)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            &[
                &e.tenant_id,
                &e.actor_sub,
                &e.actor_app,
                &e.action,
                &e.target,
                &e.request_id,
                &e.details,
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// Newest first; `before` is the cursor (an event id).
pub async fn list(
    c: &impl GenericClient,
    tenant_id: Uuid,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<AuditRecord>, StoreError> {
    let rows = c
        .query(
            "SELECT id, tenant_id, occurred_at, actor_sub, actor_app, action, target, request_id, details
             FROM audit_events
             WHERE tenant_id = $1 AND ($2::bigint IS NULL OR id < $2)
             ORDER BY id DESC LIMIT $3",
            &[&tenant_id, &before, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| AuditRecord {
            id: r.get(0),
            tenant_id: r.get(1),
            occurred_at: r.get(2),
            actor_sub: r.get(3),
            actor_app: r.get(4),
            action: r.get(5),
            target: r.get(6),
            request_id: r.get(7),
            details: r.get(8),
        })
        .collect())
}
