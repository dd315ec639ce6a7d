//! The HTTP API: shared state, route table, extractor error handlers and the OpenAPI document.
//! One file per resource, each with its own `routes()`.
use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::{HttpRequest, HttpResponse, web};
use problem::{ApiError, FieldError, ProblemKind};

pub mod access_grants;
pub mod access_policies;
pub mod applications;
pub mod audit;
mod caller;
pub mod health;
pub mod idempotency;
pub mod input;
pub mod middleware;
pub mod openapi;
pub mod problem;
pub mod propagation_checks;
pub mod protocol_errors;
pub mod rbac_migrations;
pub mod rbac_restrictions;
pub mod schema;
pub mod scope_groups;
pub mod tenants;

/// What every handler holds: the provisioning layer's services handle.
pub type AppState = crate::provisioning::Services;

/// The audit-trail actor for an API caller.
pub fn actor(caller: &crate::auth::Caller, req: &HttpRequest) -> crate::provisioning::Actor {
    crate::provisioning::Actor::Caller {
        subject: caller.subject.clone(),
        app: caller.app.clone(),
        request_id: request_id(req),
    }
}

/// The request id set by the request-context middleware.
pub fn request_id(req: &HttpRequest) -> String {
    use actix_web::HttpMessage;
    req.extensions()
        .get::<middleware::RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default()
}

/// Register the routes and the extractor configuration on an actix app. A worker-only process
/// serves just the operational endpoints (probes and metrics).
pub fn configure(cfg: &mut web::ServiceConfig, body_limit: usize, with_api: bool) {
    if !with_api {
        cfg.configure(health::routes)
            .default_service(web::to(not_found));
        return;
    }
    cfg.app_data(
        web::JsonConfig::default()
            .limit(body_limit)
            .error_handler(|e, _| json_error(e).into()),
    )
    .app_data(web::PathConfig::default().error_handler(|e, _| path_error(e).into()))
    .app_data(web::QueryConfig::default().error_handler(|e, _| query_error(e).into()))
    .app_data(web::PayloadConfig::default().limit(body_limit))
    .configure(health::routes)
    .configure(openapi::routes)
    .service(
        web::scope("/v1")
            .wrap(actix_web::middleware::from_fn(idempotency::middleware))
            // Outermost: input no handler can store is refused before a key is claimed for it.
            .wrap(actix_web::middleware::from_fn(input::refuse_nul))
            .configure(tenants::routes)
            .configure(applications::routes)
            .configure(scope_groups::routes)
            .configure(rbac_restrictions::routes)
            .configure(rbac_migrations::routes)
            .configure(access_policies::routes)
            .configure(access_grants::routes)
            .configure(propagation_checks::routes)
            .configure(audit::routes),
    )
    .default_service(web::to(not_found));
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found("no resource at this path"))
}

fn json_error(e: JsonPayloadError) -> ApiError {
    match e {
        JsonPayloadError::ContentType => ApiError::new(
            ProblemKind::UnsupportedMediaType,
            "send the body as JSON with `Content-Type: application/json`",
        ),
        JsonPayloadError::Overflow { limit }
        | JsonPayloadError::OverflowKnownLength { limit, .. } => ApiError::new(
            ProblemKind::PayloadTooLarge,
            format!("the body exceeds the limit of {limit} bytes"),
        ),
        JsonPayloadError::Deserialize(de) if de.is_data() => {
            // Unknown fields, wrong types, missing fields: the JSON parsed, its content is wrong.
            ApiError::validation(vec![FieldError {
                field: "body".into(),
                message: de.to_string(),
            }])
        }
        JsonPayloadError::Deserialize(de) => ApiError::new(
            ProblemKind::MalformedJson,
            format!("the body is not valid JSON: {de}"),
        ),
        other => ApiError::new(
            ProblemKind::MalformedJson,
            format!("cannot read the body: {other}"),
        ),
    }
}

fn path_error(e: PathError) -> ApiError {
    let PathError::Deserialize(de) = e else {
        return ApiError::new(ProblemKind::InvalidPathParameter, "invalid path");
    };
    let msg = de.to_string();
    let detail = if msg.contains("UUID") || msg.contains("Uuid") || msg.contains("uuid") {
        format!("a path segment must be a UUID: {msg}")
    } else {
        format!("invalid path parameter: {msg}")
    };
    ApiError::new(ProblemKind::InvalidPathParameter, detail)
}

fn query_error(e: QueryPayloadError) -> ApiError {
    ApiError::new(
        ProblemKind::InvalidQuery,
        format!("invalid query string: {e}"),
    )
}

/// Split a `limit + 1` query result into the page and whether another page follows.
pub fn split_page<T>(mut rows: Vec<T>, limit: i64) -> (Vec<T>, bool) {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit.max(0) as usize);
    (rows, more)
}

/// The cursor for the next page: the last item's key when another page follows.
pub fn next_cursor<T, K>(items: &[T], more: bool, key: impl Fn(&T) -> K) -> Option<K> {
    if more { items.last().map(key) } else { None }
}

/// 404 unless the tenant is registered (visibility is checked by `Caller::require_tenant`).
pub async fn require_registered(
    db: &impl deadpool_postgres::GenericClient,
    tenant_id: uuid::Uuid,
) -> Result<(), ApiError> {
    match crate::store::tenants::get(db, tenant_id).await? {
        Some(_) => Ok(()),
        None => Err(crate::auth::tenant_not_found(tenant_id).into()),
    }
}

/// `?limit=` handling shared by list endpoints.
pub fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(50),
        Some(l) if (1..=500).contains(&l) => Ok(l),
        Some(_) => Err(ApiError::new(
            ProblemKind::InvalidQuery,
            "limit must be between 1 and 500",
        )),
    }
}
