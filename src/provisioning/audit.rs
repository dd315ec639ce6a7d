//! The audit trail of provisioning changes, written in the same transaction as the change.
use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::{Actor, Error};
use crate::store::{self, audit::NewAuditEvent};

/// Record an audit event inside the caller's transaction.
pub async fn record(
    c: &impl GenericClient,
    actor: &Actor,
    tenant_id: Uuid,
    action: &str,
    target: &str,
    details: serde_json::Value,
) -> Result<(), Error> {
    let request_id = actor.request_id();
    let app = actor.app();
    store::audit::insert(
        c,
        &NewAuditEvent {
            tenant_id,
            actor_sub: actor.subject(),
            actor_app: app.as_deref(),
            action,
            target,
            request_id: &request_id,
            details,
        },
    )
    .await?;
    Ok(())
}
