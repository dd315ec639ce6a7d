//! Input that no handler can store: text with NUL characters (U+0000). PostgreSQL's `text` cannot
//! hold them (`invalid byte sequence for encoding "UTF8": 0x00`), and neither can Exchange or
//! Graph names, so every request under `/v1` is checked here, once, before any handler sees it:
//! a JSON body naming the field (422), the path (400) and the query (400).
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{Error, web};

use super::problem::{ApiError, FieldError, ProblemKind};

const NUL_MESSAGE: &str = "must not contain a NUL character (U+0000)";

pub async fn refuse_nul(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    match check(&mut req).await {
        Ok(()) => next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body),
        // Attach the error to the request so the request-context middleware renders it.
        Err(e) => Ok(req.error_response(e)),
    }
}

async fn check(req: &mut ServiceRequest) -> Result<(), ApiError> {
    // `path()` is still percent-encoded; the router decodes `%00` into the parameters.
    let decoded = |s: &str| percent_decoded_has_nul(s);
    if decoded(req.path()) {
        return Err(ApiError::new(
            ProblemKind::InvalidPathParameter,
            format!("a path segment {NUL_MESSAGE}"),
        ));
    }
    if decoded(req.query_string()) {
        return Err(ApiError::new(
            ProblemKind::InvalidQuery,
            format!("the query string {NUL_MESSAGE}"),
        ));
    }
    let has_body = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim() != "0");
    if !has_body || !matches!(req.method().as_str(), "POST" | "PUT" | "PATCH") {
        return Ok(());
    }
    let body = req.extract::<web::Bytes>().await.map_err(|e| {
        ApiError::new(
            ProblemKind::PayloadTooLarge,
            format!("cannot read the body: {e}"),
        )
    })?;
    // A raw NUL is not valid JSON (the extractor refuses it); only the escape `\u0000` gets
    // through, so only a body that has one is parsed here.
    if body.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000"))
        && let Ok(value) = serde_json::from_slice::<serde_json::Value>(&body)
    {
        let mut errors = Vec::new();
        find_nul(&value, String::new(), &mut errors);
        if !errors.is_empty() {
            return Err(ApiError::validation(errors));
        }
    }
    // Put the body back for the handler.
    req.set_payload(Payload::Stream {
        payload: Box::pin(futures_util::stream::once(async move { Ok(body) })),
    });
    Ok(())
}

fn percent_decoded_has_nul(s: &str) -> bool {
    s.contains('\0')
        || s.as_bytes()
            .windows(3)
            .any(|w| w.eq_ignore_ascii_case(b"%00"))
}

/// Every string (value or object key) holding a NUL, named like the handlers name fields:
/// `credentials.client_id`, `members[2]`, `body` for the top level.
fn find_nul(v: &serde_json::Value, at: String, out: &mut Vec<FieldError>) {
    let name = |at: &str| {
        if at.is_empty() {
            "body".to_string()
        } else {
            at.to_string()
        }
    };
    match v {
        serde_json::Value::String(s) if s.contains('\0') => out.push(FieldError {
            field: name(&at),
            message: NUL_MESSAGE.into(),
        }),
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                find_nul(item, format!("{}[{i}]", name(&at)), out);
            }
        }
        serde_json::Value::Object(map) => {
            for (k, item) in map {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                if k.contains('\0') {
                    out.push(FieldError {
                        field: path.replace('\0', "\\u0000"),
                        message: NUL_MESSAGE.into(),
                    });
                    continue;
                }
                find_nul(item, path, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_named_by_their_path() {
        let v = serde_json::json!({"a": "x\u{0}", "b": {"c": ["ok", "y\u{0}"]}, "d": "fine"});
        let mut out = Vec::new();
        find_nul(&v, String::new(), &mut out);
        let fields: Vec<&str> = out.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["a", "b.c[1]"]);
    }

    #[test]
    fn encoded_nul_in_paths() {
        assert!(percent_decoded_has_nul("/v1/a%00b"));
        assert!(!percent_decoded_has_nul("/v1/a%200b"));
    }
}
