//! InvokeCommand error answers → [`ErrorKind`] (docs/microsoft-365.md §1.3 "Errors" and "Throttling").
//!
//! Branching uses, in order: the HTTP status for 401/403/429, the exception type from
//! `details[0].message` (`ErrorId|ExceptionType|text`), then the status. Two cases have no code
//! at all and are matched on Microsoft's fixed sentences, which the reference quotes: the
//! per-tenant concurrency limit and the Application Access Policy size limit.
use crate::m365::error::{ErrorKind, M365Error, Service};
use crate::m365::transport::RawResponse;
use serde_json::Value;

const CONCURRENCY_LIMIT_TEXT: &str = "maximum number of concurrent requests per tenant";
const POLICY_LIMIT_TEXT: &str = "total size of App Access Policies exceeded the limit";

/// The parts of an Exchange error body.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ExchangeErrorBody {
    pub code: Option<String>,
    pub error_id: Option<String>,
    pub exception_type: Option<String>,
    pub message: Option<String>,
}

/// Parse `{"error":{"code","message","details":[{"message":"Id|Type|text"}],"innererror":{…}}}`.
/// Message precedence: `details[0].message` text, `innererror.internalException.message`,
/// `error.message`.
pub(crate) fn parse_error_body(body: &[u8]) -> Option<ExchangeErrorBody> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let err = v.get("error")?;
    let mut out = ExchangeErrorBody {
        code: err.get("code").and_then(Value::as_str).map(str::to_string),
        ..Default::default()
    };
    let detail = err
        .get("details")
        .and_then(Value::as_array)
        .and_then(|d| d.first())
        .and_then(|d| d.get("message"))
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty());
    if let Some(d) = detail {
        let mut parts = d.splitn(3, '|');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(id), Some(ty), Some(text)) => {
                out.error_id = Some(id.trim().to_string()).filter(|s| !s.is_empty());
                out.exception_type = Some(ty.trim().to_string()).filter(|s| !s.is_empty());
                out.message = Some(text.trim().to_string());
            }
            // Not the three-part form: the whole string is the text.
            _ => out.message = Some(d.to_string()),
        }
    }
    if out.message.is_none() {
        let inner = err.get("innererror").or_else(|| err.get("innerError"));
        out.message = inner
            .and_then(|i| i.get("internalException"))
            .and_then(|i| i.get("message"))
            .and_then(Value::as_str)
            .or_else(|| err.get("message").and_then(Value::as_str))
            .map(str::to_string);
    }
    Some(out)
}

fn kind_from_exception(exception_type: &str) -> Option<ErrorKind> {
    let short = exception_type.rsplit('.').next().unwrap_or(exception_type);
    if short.ends_with("NotFoundException") || short == "ADNoSuchObjectException" {
        Some(ErrorKind::NotFound)
    } else if short.ends_with("AlreadyExistsException") || short.ends_with("ExistsException") {
        Some(ErrorKind::AlreadyExists)
    } else if short.contains("ParameterBinding")
        || short.contains("ParameterSet")
        || short.contains("Argument")
        || short.contains("InvalidParameter")
        || short == "DataValidationException"
        || short == "RecipientTaskException"
    {
        Some(ErrorKind::InvalidParameter)
    } else {
        None
    }
}

/// Classify a non-2xx InvokeCommand answer.
pub(crate) fn classify_exchange(resp: &RawResponse, service: Service, op: &str) -> M365Error {
    // The 403 body can be NUL bytes labelled gzip: never require it to parse.
    let parsed = parse_error_body(&resp.body);
    let text = String::from_utf8_lossy(&resp.body);
    let status = resp.status;
    let retry_after = resp.retry_after();
    let exception_kind = parsed
        .as_ref()
        .and_then(|p| p.exception_type.as_deref())
        .and_then(kind_from_exception);
    let kind = if status == 429 || text.contains(CONCURRENCY_LIMIT_TEXT) {
        ErrorKind::Throttled { retry_after }
    } else if status == 401 {
        ErrorKind::MissingManageAsAppRole
    } else if status == 403 {
        ErrorKind::MissingExchangeAdminRole
    } else if text.contains(POLICY_LIMIT_TEXT) {
        ErrorKind::PolicyLimitReached
    } else if let Some(k) = exception_kind {
        k
    } else {
        match status {
            404 => ErrorKind::NotFound,
            409 => ErrorKind::AlreadyExists,
            400 | 422 => ErrorKind::InvalidParameter,
            408 | 500..=599 => ErrorKind::Transient,
            _ => ErrorKind::Protocol,
        }
    };
    let mut e = M365Error::new(kind, service, op)
        .with_status(status)
        .with_request_id(resp.request_id())
        .with_retry_after_hint(retry_after);
    match parsed {
        Some(p) => {
            if let Some(c) = p.error_id.or(p.code) {
                e = e.with_remote_code(c);
            }
            if let Some(t) = p
                .exception_type
                .or_else(|| resp.header("x-exceptiontype").map(str::to_string))
            {
                e = e.with_exception_type(t);
            }
            if let Some(m) = p.message {
                e = e.with_message(m);
            }
        }
        None => {
            if let Some(t) = resp.header("x-exceptiontype") {
                e = e.with_exception_type(t);
            }
            // Only keep printable text; the 403 body is binary junk.
            if !text.is_empty() && text.chars().all(|c| !c.is_control() || c.is_whitespace()) {
                e = e.with_message(text.as_ref());
            }
        }
    }
    e
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is fine in tests (developers' guide)
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    fn raw(status: u16, body: &[u8]) -> RawResponse {
        RawResponse {
            status,
            headers: HeaderMap::new(),
            body: body.to_vec(),
        }
    }

    const NOT_FOUND: &str = r#"{"error":{"code":"NotFound","message":"Error executing cmdlet","details":[{"code":"Client","target":"","message":"Ex6F9304|Microsoft.Exchange.Configuration.Tasks.ManagementObjectNotFoundException|The operation couldn't be performed because object 'x' couldn't be found on 'y'."}],"innererror":{"message":"Error executing cmdlet","type":"Microsoft.Exchange.Admin.OData.Core.ODataServiceException","stacktrace":"..."}}}"#;

    #[test]
    fn details_message_is_split_into_id_type_text() {
        let p = parse_error_body(NOT_FOUND.as_bytes()).unwrap();
        assert_eq!(p.error_id.as_deref(), Some("Ex6F9304"));
        assert_eq!(
            p.exception_type.as_deref(),
            Some("Microsoft.Exchange.Configuration.Tasks.ManagementObjectNotFoundException")
        );
        assert!(
            p.message
                .unwrap()
                .starts_with("The operation couldn't be performed")
        );
        let e = classify_exchange(&raw(404, NOT_FOUND.as_bytes()), Service::Exchange, "op");
        assert_eq!(*e.kind(), ErrorKind::NotFound);
        assert_eq!(e.remote_code(), Some("Ex6F9304"));
    }

    #[test]
    fn message_fallbacks() {
        let inner = br#"{"error":{"code":"BadRequest","message":"outer","innererror":{"internalException":{"message":"inner text"}}}}"#;
        assert_eq!(
            parse_error_body(inner).unwrap().message.as_deref(),
            Some("inner text")
        );
        let outer = br#"{"error":{"code":"BadRequest","message":"outer"}}"#;
        assert_eq!(
            parse_error_body(outer).unwrap().message.as_deref(),
            Some("outer")
        );
        let two_parts = br#"{"error":{"details":[{"message":"just|text"}]}}"#;
        assert_eq!(
            parse_error_body(two_parts).unwrap().message.as_deref(),
            Some("just|text")
        );
    }

    #[test]
    fn status_and_exception_mapping() {
        let already = br#"{"error":{"code":"BadRequest","details":[{"message":"Ex1|Microsoft.Exchange.Management.Tasks.ManagementObjectAlreadyExistsException|exists"}]}}"#;
        assert_eq!(
            *classify_exchange(&raw(400, already), Service::Exchange, "op").kind(),
            ErrorKind::AlreadyExists
        );
        let ambiguous = br#"{"error":{"code":"BadRequest","details":[{"message":"Ex2|System.Management.Automation.AmbiguousParameterSetException|ambiguous"}]}}"#;
        assert_eq!(
            *classify_exchange(&raw(400, ambiguous), Service::Exchange, "op").kind(),
            ErrorKind::InvalidParameter
        );
        let member = br#"{"error":{"details":[{"message":"Ex3|Microsoft.Exchange.Management.Tasks.MemberAlreadyExistsException|already a member"}]}}"#;
        assert_eq!(
            *classify_exchange(&raw(400, member), Service::Exchange, "op").kind(),
            ErrorKind::AlreadyExists
        );
        assert_eq!(
            *classify_exchange(&raw(400, b"{}"), Service::Exchange, "op").kind(),
            ErrorKind::InvalidParameter
        );
        assert_eq!(
            *classify_exchange(&raw(401, b""), Service::Exchange, "op").kind(),
            ErrorKind::MissingManageAsAppRole
        );
        assert_eq!(
            *classify_exchange(&raw(503, b""), Service::Exchange, "op").kind(),
            ErrorKind::Transient
        );
    }

    #[test]
    fn gzip_labelled_nul_403_is_missing_admin_role() {
        let mut r = raw(403, &[0u8; 20]);
        r.headers
            .insert("content-encoding", HeaderValue::from_static("gzip"));
        let e = classify_exchange(&r, Service::Exchange, "op");
        assert_eq!(*e.kind(), ErrorKind::MissingExchangeAdminRole);
        assert_eq!(e.remote_message(), None);
    }

    #[test]
    fn fixed_sentences() {
        let busy = br#"{"error":{"code":"InternalServerError","message":"You have reached the maximum number of concurrent requests per tenant. Please wait and try again"}}"#;
        assert!(matches!(
            classify_exchange(&raw(500, busy), Service::Exchange, "op").kind(),
            ErrorKind::Throttled { .. }
        ));
        let limit = br#"{"error":{"code":"BadRequest","details":[{"message":"ExA|Microsoft.Exchange.Management.Tasks.TaskException|The total size of App Access Policies exceeded the limit."}]}}"#;
        assert_eq!(
            *classify_exchange(&raw(400, limit), Service::Exchange, "op").kind(),
            ErrorKind::PolicyLimitReached
        );
    }
}
