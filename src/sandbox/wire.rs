//! Response shapes exactly as each Microsoft service sends them: Graph's `{"error":{…}}` with
//! `innerError`, Exchange admin's cmdlet errors with `details` and `innererror`, and the login
//! endpoint's `AADSTS…` errors. Handlers build a [`Reply`]; `$batch` embeds replies as JSON.
use actix_web::HttpResponse;
use actix_web::http::StatusCode;
use actix_web::web::Bytes;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

/// A whole-second `Retry-After` value: rounded **up**, so a client that waits exactly this long
/// finds the budget window reset (rounding down would invite a second 429), and at least 1.
pub fn retry_after_whole_secs(d: std::time::Duration) -> String {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1).to_string()
}

/// A response under construction.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

#[derive(Debug, Clone)]
pub enum Body {
    Json(Value),
    /// Raw bytes with a content type (e.g. the NUL-byte 403 of InvokeCommand).
    Raw(Vec<u8>, String),
    Empty,
    /// Drop the connection before a complete response.
    Drop,
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Self {
        Reply {
            status,
            headers: vec![],
            body: Body::Json(body),
        }
    }

    pub fn empty(status: u16) -> Self {
        Reply {
            status,
            headers: vec![],
            body: Body::Empty,
        }
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    pub fn header_value(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json_body(&self) -> Option<&Value> {
        match &self.body {
            Body::Json(v) => Some(v),
            _ => None,
        }
    }

    pub fn into_response(self) -> HttpResponse {
        if matches!(self.body, Body::Drop) {
            // Headers go out, then the body stream fails: the client sees a broken connection.
            let failing = futures_util::stream::once(async {
                Err::<Bytes, std::io::Error>(std::io::Error::other("sandbox: dropped connection"))
            });
            return HttpResponse::Ok().streaming(failing);
        }
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut b = HttpResponse::build(status);
        let mut has_ct = false;
        for (n, v) in &self.headers {
            has_ct |= n.eq_ignore_ascii_case("content-type");
            b.insert_header((n.as_str(), v.as_str()));
        }
        match self.body {
            Body::Json(v) => {
                if !has_ct {
                    b.insert_header(("Content-Type", "application/json; charset=utf-8"));
                }
                b.body(serde_json::to_vec(&v).unwrap_or_default())
            }
            Body::Raw(bytes, ct) => {
                if !has_ct {
                    b.insert_header(("Content-Type", ct));
                }
                b.body(bytes)
            }
            Body::Empty | Body::Drop => b.finish(),
        }
    }
}

/// Graph timestamps in `innerError.date` have no fractional seconds or zone.
pub fn graph_date(now: DateTime<Utc>) -> String {
    now.format("%Y-%m-%dT%H:%M:%S").to_string()
}

/// Graph's error body. `request_id` is the service's own id for this request; `client_request_id`
/// echoes the caller's `client-request-id` (docs/microsoft-365.md §8.6).
pub fn graph_error(
    status: u16,
    code: &str,
    message: &str,
    request_id: &str,
    client_request_id: &str,
    now: DateTime<Utc>,
) -> Reply {
    Reply::json(
        status,
        json!({"error": {"code": code, "message": message,
            "innerError": {"date": graph_date(now), "request-id": request_id, "client-request-id": client_request_id}}}),
    )
}

/// Add Graph's `error.details` (`[{"code","message","target"}]`) to an error reply, as Entra
/// sends it for some 400s (e.g. `NoBackingApplicationObject`).
pub fn with_details(mut r: Reply, details: Value) -> Reply {
    if let Body::Json(v) = &mut r.body
        && let Some(e) = v.get_mut("error").and_then(Value::as_object_mut)
    {
        e.insert("details".into(), details);
    }
    r
}

/// Graph's 429 body (https://learn.microsoft.com/graph/throttling).
pub fn graph_throttled(request_id: &str, client_request_id: &str, now: DateTime<Utc>) -> Reply {
    Reply::json(
        429,
        json!({"error": {"code": "TooManyRequests",
            "innerError": {"code": "429", "date": graph_date(now), "message": "Please retry after",
                "request-id": request_id, "client-request-id": client_request_id, "status": "429"},
            "message": "Please retry again later."}}),
    )
}

/// An Exchange cmdlet error (docs/microsoft-365.md §1.3): `details[0].message` is `<ErrorId>|<ExceptionType>|<text>`.
pub fn exchange_error(
    status: u16,
    code: &str,
    error_id: &str,
    exception_type: &str,
    text: &str,
) -> Reply {
    let short = exception_type
        .rsplit('.')
        .next()
        .unwrap_or(exception_type)
        .to_string();
    Reply::json(
        status,
        json!({"error": {"code": code, "message": "Error executing cmdlet",
            "details": [{"code": "Client", "target": "", "message": format!("{error_id}|{exception_type}|{text}")}],
            "innererror": {"message": "Error executing cmdlet",
                "type": "Microsoft.Exchange.Admin.OData.Core.ODataServiceException",
                "stacktrace": "   at Microsoft.Exchange.Admin.OData.Core.CmdletExecutor.Execute()"}}}),
    )
    .header("x-ExceptionType", short)
}

/// A login error in the `AADSTS…` shape (status 401 for `invalid_client`, else 400). The
/// description's lines are separated by `\r\n` ("Trace ID", "Correlation ID", "Timestamp"), as
/// on Microsoft's error reference page (docs/microsoft-365.md §8.5); `correlation_id` is the
/// caller's `client-request-id` when it sent one.
pub fn aadsts(
    error: &str,
    code: u32,
    text: &str,
    now: DateTime<Utc>,
    trace_id: &str,
    correlation_id: &str,
) -> Reply {
    let ts = now.format("%Y-%m-%d %H:%M:%SZ").to_string();
    let description = format!(
        "AADSTS{code}: {text}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {ts}"
    );
    let status = if error == "invalid_client" { 401 } else { 400 };
    Reply::json(
        status,
        json!({"error": error, "error_description": description, "error_codes": [code],
            "timestamp": ts, "trace_id": trace_id, "correlation_id": correlation_id,
            "error_uri": format!("https://login.microsoftonline.com/error?code={code}")}),
    )
    .header("x-ms-request-id", trace_id)
    .header("client-request-id", correlation_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn aadsts_description_lines_are_crlf_separated() {
        let r = aadsts("invalid_scope", 700022, "x", Utc::now(), "t-1", "c-1");
        let v = r.json_body().cloned().unwrap_or_default();
        let d = v["error_description"].as_str().unwrap_or_default();
        assert!(
            d.starts_with("AADSTS700022: x\r\nTrace ID: t-1\r\nCorrelation ID: c-1\r\nTimestamp: ")
        );
        assert_eq!(v["correlation_id"], "c-1");
    }

    #[test]
    fn whole_second_retry_after_never_points_before_the_reset() {
        assert_eq!(retry_after_whole_secs(Duration::from_millis(1500)), "2");
        assert_eq!(retry_after_whole_secs(Duration::from_secs(2)), "2");
        assert_eq!(retry_after_whole_secs(Duration::from_millis(1)), "1");
        assert_eq!(retry_after_whole_secs(Duration::ZERO), "1");
    }
}
