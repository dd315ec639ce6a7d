//! `/v1/tenants/{tenant_id}/audit-events` and the helper every changing handler uses to record
//! who did what, in the same transaction as the change itself.
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::problem::{ApiError, Problem};
use super::{AppState, page_limit, request_id};
use crate::auth::{Caller, Role};
use crate::store::{self, audit::NewAuditEvent};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/tenants/{tenant_id}/audit-events",
        web::get().to(list_audit_events),
    );
}

/// Record an audit event inside the caller's transaction.
pub async fn record(
    c: &impl GenericClient,
    caller: &Caller,
    req: &HttpRequest,
    tenant_id: Uuid,
    action: &str,
    target: &str,
    details: serde_json::Value,
) -> Result<(), ApiError> {
    let rid = request_id(req);
    store::audit::insert(
        c,
        &NewAuditEvent {
            tenant_id,
            actor_sub: caller.subject.as_deref(),
            actor_app: caller.app.as_deref(),
            action,
            target,
            request_id: &rid,
            details,
        },
    )
    .await?;
    Ok(())
}

#[derive(Serialize, ToSchema)]
pub struct Actor {
    /// The caller's `oid` or `sub` claim.
    pub subject: Option<String>,
    /// The calling application (`azp` or `appid`).
    pub app: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditEvent {
    pub id: i64,
    pub occurred_at: DateTime<Utc>,
    pub actor: Actor,
    #[schema(example = "tenant.registered")]
    pub action: String,
    #[schema(example = "tenant/0b1c6a36-6b53-4bcb-8e56-0d4f5c7f3a11")]
    pub target: String,
    pub request_id: String,
    pub details: serde_json::Value,
}

#[derive(Serialize, ToSchema)]
pub struct AuditEventList {
    /// Newest first.
    pub items: Vec<AuditEvent>,
    /// Pass as `before` to get older events; absent on the last page.
    pub next_before: Option<i64>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Page size, 1–500 (default 50).
    pub limit: Option<i64>,
    /// Cursor: the `next_before` of the previous page.
    pub before: Option<i64>,
}

/// The tenant's audit trail, newest first.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/audit-events", tag = "tenants",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"), AuditQuery),
    responses(
        (status = 200, description = "a page of events", body = AuditEventList),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "tenant not visible", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list_audit_events(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
    q: web::Query<AuditQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let tenant_id = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let limit = page_limit(q.limit)?;
    let db = state.db().await?;
    let rows = store::audit::list(&db, tenant_id, q.before, limit + 1).await?;
    let (rows, more) = super::split_page(rows, limit);
    let items: Vec<AuditEvent> = rows
        .into_iter()
        .map(|r| AuditEvent {
            id: r.id,
            occurred_at: r.occurred_at,
            actor: Actor {
                subject: r.actor_sub,
                app: r.actor_app,
            },
            action: r.action,
            target: r.target,
            request_id: r.request_id,
            details: r.details,
        })
        .collect();
    let next_before = if more {
        items.last().map(|e| e.id)
    } else {
        None
    };
    Ok(HttpResponse::Ok().json(AuditEventList { items, next_before }))
}
