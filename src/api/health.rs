//! Liveness, readiness and metrics endpoints (unauthenticated, for orchestrators and scrapers).
use std::time::Duration;

use actix_web::{HttpResponse, web};
use prometheus::{Encoder, TextEncoder};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::problem::{ApiError, ProblemKind};
use crate::store::migrate;
use crate::telemetry::Metrics;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
    /// Applied database schema version (readiness only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<i32>,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "alive", body = Health)))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health {
        status: "ok",
        schema_version: None,
    })
}

/// The database answers and its schema is at (or ahead of) this binary's version.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "ready", body = Health),
        (status = 503, description = "not ready", body = super::problem::Problem, content_type = "application/problem+json"),
    ))]
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let check = async {
        let client = state.db().await?;
        migrate::current_version(&client)
            .await
            .map_err(|e| ApiError::from(crate::store::StoreError::from(e)))
    };
    let version = tokio::time::timeout(Duration::from_secs(3), check)
        .await
        .map_err(|_| {
            ApiError::database_unavailable(anyhow::anyhow!("readiness check timed out"))
        })??;
    let latest = migrate::latest_version();
    match version {
        Some(v) if v == latest => Ok(HttpResponse::Ok().json(Health {
            status: "ready",
            schema_version: Some(v),
        })),
        other => Err(ApiError::new(
            ProblemKind::NotReady,
            format!(
                "database schema is at version {}, this binary needs {latest}; run `mailscope migrate`",
                other
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "none".into())
            ),
        )),
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus metrics", content_type = "text/plain")))]
pub async fn metrics(state: web::Data<AppState>, m: web::Data<Metrics>) -> HttpResponse {
    let s = state.pool.status();
    m.pool_connections
        .with_label_values(&["max"])
        .set(s.max_size as i64);
    m.pool_connections
        .with_label_values(&["open"])
        .set(s.size as i64);
    m.pool_connections
        .with_label_values(&["idle"])
        .set(s.available as i64);
    m.pool_connections
        .with_label_values(&["waiting"])
        .set(s.waiting as i64);
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&m.registry.gather(), &mut buf) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    HttpResponse::Ok()
        .content_type(TextEncoder::new().format_type())
        .body(buf)
}
