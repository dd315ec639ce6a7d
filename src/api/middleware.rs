//! The request-context middleware: request ids, problem+json rendering with context, metrics and
//! the access log, in one place so that every response — from a handler, an extractor, the
//! router or the auth layer — leaves the same way.
use std::time::Instant;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{Error, HttpMessage, web};
use tracing::Instrument;

use super::problem::{ApiError, PROBLEM_CONTENT_TYPE, ProblemKind};
use crate::telemetry::Metrics;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The id of the current request, in request extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// A client-supplied id is kept if it is short printable ASCII; otherwise a new one is made.
fn request_id_from(req: &ServiceRequest) -> String {
    req.headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

pub async fn request_context(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let started = Instant::now();
    let request_id = request_id_from(&req);
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let metrics = req.app_data::<web::Data<Metrics>>().cloned();
    let method = req.method().to_string();
    let path = req.path().to_string();
    let span =
        tracing::info_span!("request", request_id = %request_id, method = %method, path = %path);

    let res = next.call(req).instrument(span.clone()).await?;
    let mut res = finish(res, &path, &request_id, &span);
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        res.headers_mut()
            .insert(HeaderName::from_static(REQUEST_ID_HEADER), v);
    }

    let route = res
        .request()
        .match_pattern()
        .unwrap_or_else(|| "<unmatched>".into());
    let status = res.status().as_u16();
    let elapsed = started.elapsed();
    if let Some(m) = metrics {
        let labels = [method.as_str(), route.as_str(), &status.to_string()];
        m.http_requests.with_label_values(&labels).inc();
        m.http_duration
            .with_label_values(&labels)
            .observe(elapsed.as_secs_f64());
    }
    span.in_scope(|| {
        tracing::info!(status, route = %route, elapsed_ms = elapsed.as_secs_f64() * 1e3, "request finished")
    });
    Ok(res)
}

/// Render errors as problem+json with this request's `instance` and `request_id`.
fn finish(
    res: ServiceResponse<impl MessageBody + 'static>,
    path: &str,
    request_id: &str,
    span: &tracing::Span,
) -> ServiceResponse<BoxBody> {
    let status = res.status();
    let api_error = res
        .response()
        .error()
        .and_then(|e| e.as_error::<ApiError>());
    let rendered = match api_error {
        Some(e) => {
            if let Some(cause) = &e.internal {
                span.in_scope(
                    || tracing::error!(error = ?cause, code = e.code(), "request failed"),
                );
            }
            Some(e.render(path, request_id))
        }
        None if status.is_client_error() || status.is_server_error() => {
            // A JSON body was written on purpose by a handler; only bare framework errors
            // (empty or text bodies) are turned into problems.
            let is_json = res.headers().get(header::CONTENT_TYPE).is_some_and(|v| {
                let v = v.as_bytes();
                v.starts_with(PROBLEM_CONTENT_TYPE.as_bytes()) || v.starts_with(b"application/json")
            });
            if is_json {
                None
            } else {
                // Errors produced outside our handlers (router 404/405, actix internals).
                if let Some(e) = res.response().error() {
                    span.in_scope(|| tracing::warn!(error = %e, "framework error"));
                }
                Some(generic(status).render(path, request_id))
            }
        }
        None => None,
    };
    match rendered {
        Some(new) => {
            let (req, _) = res.into_parts();
            ServiceResponse::new(req, new)
        }
        None => res.map_into_boxed_body(),
    }
}

fn generic(status: actix_web::http::StatusCode) -> ApiError {
    use actix_web::http::StatusCode as S;
    match status {
        S::NOT_FOUND => ApiError::not_found("no resource at this path"),
        S::METHOD_NOT_ALLOWED => ApiError::new(
            ProblemKind::MethodNotAllowed,
            "this resource does not support the method",
        ),
        S::PAYLOAD_TOO_LARGE => {
            ApiError::new(ProblemKind::PayloadTooLarge, "request body too large")
        }
        S::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            ProblemKind::UnsupportedMediaType,
            "unsupported content type",
        ),
        S::UNAUTHORIZED => ApiError::unauthenticated("authentication required"),
        S::FORBIDDEN => ApiError::forbidden("forbidden"),
        S::CONFLICT => ApiError::conflict("conflict"),
        S::UNPROCESSABLE_ENTITY => ApiError::new(ProblemKind::ValidationFailed, "invalid request"),
        s if s.is_client_error() => ApiError::new(ProblemKind::MalformedJson, "bad request"),
        _ => ApiError::internal(anyhow::anyhow!("unhandled status {status}")),
    }
}
