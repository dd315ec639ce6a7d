//! The HTTP error type of the API and its RFC 9457 `application/problem+json` rendering.
//!
//! Every failure a client can see goes through [`ApiError`]: handlers return it, extractor
//! failures are converted into it, and the request-context middleware fills in `instance` and
//! `request_id` when the response leaves. Internal causes are logged there, never sent.
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// Stable error kinds. The `type` URI of a problem is `/problems/{code}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProblemKind {
    MalformedJson,
    UnsupportedMediaType,
    PayloadTooLarge,
    InvalidPathParameter,
    InvalidQuery,
    ValidationFailed,
    Unauthenticated,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    InvalidIdempotencyKey,
    IdempotencyKeyReused,
    IdempotencyKeyInUse,
    /// Another mailscope process is changing the same object in the tenant (its key lease).
    ObjectBusy,
    DatabaseUnavailable,
    /// The identity provider's signing keys could not be fetched, so no token can be checked.
    KeysUnavailable,
    NotReady,
    /// Microsoft (or the sandbox) refused or failed the request; the code says why.
    Microsoft365,
    /// An access policy with the same app and scope exists with other settings.
    PolicyConflict,
    /// Removing the app's last RestrictAccess policy would open every mailbox to it.
    LastRestrictPolicy,
    /// A scope group still scopes an access policy.
    ScopeGroupInUse,
    ApplicationHasPolicies,
    /// The recipient cannot be the scope of an application access policy.
    InvalidPolicyScope,
    RbacRestrictionConflict,
    AppRegistrationObjectId,
    ScopeFilterMismatch,
    RbacIncomplete,
    VerificationMailboxesRequired,
    RbacVerificationFailed,
    RbacDenyUnsupported,
    RbacMigrationActive,
    RbacMigrationNotPossible,
    RbacMigrationRollbackClosed,
    RbacUnionTrap,
    /// The request head exceeded the HTTP parser's limits (answered before any handler runs).
    RequestHeadersTooLarge,
    /// The request is not parseable HTTP/1.1.
    MalformedRequest,
    /// The request head did not arrive within the client request timeout.
    RequestTimeout,
    Internal,
}

/// The catalogue, served at `/problems` and `/problems/{code}` so the `type` URIs resolve.
pub const CATALOGUE: &[(ProblemKind, &str, &str)] = &[
    (
        ProblemKind::MalformedJson,
        "Malformed JSON",
        "The request body is not valid JSON.",
    ),
    (
        ProblemKind::UnsupportedMediaType,
        "Unsupported media type",
        "The request body must be sent with a supported Content-Type, usually application/json.",
    ),
    (
        ProblemKind::PayloadTooLarge,
        "Payload too large",
        "The request body exceeds the configured limit (http.body_limit_bytes).",
    ),
    (
        ProblemKind::InvalidPathParameter,
        "Invalid path parameter",
        "A path segment has the wrong format, for example a tenant id that is not a UUID.",
    ),
    (
        ProblemKind::InvalidQuery,
        "Invalid query",
        "A query parameter is missing, unknown or has the wrong format.",
    ),
    (
        ProblemKind::ValidationFailed,
        "Validation failed",
        "The request is well-formed JSON but its content is invalid; `errors` lists each field.",
    ),
    (
        ProblemKind::Unauthenticated,
        "Unauthenticated",
        "A valid bearer token is required: check its signature, issuer, audience and expiry.",
    ),
    (
        ProblemKind::Forbidden,
        "Forbidden",
        "The token is valid but lacks the role this operation needs.",
    ),
    (
        ProblemKind::NotFound,
        "Not found",
        "No such resource, or the caller may not see it.",
    ),
    (
        ProblemKind::MethodNotAllowed,
        "Method not allowed",
        "The resource exists but does not support this HTTP method.",
    ),
    (
        ProblemKind::Conflict,
        "Conflict",
        "The request conflicts with the current state of the resource.",
    ),
    (
        ProblemKind::InvalidIdempotencyKey,
        "Invalid idempotency key",
        "The Idempotency-Key header must be 1 to 255 printable characters, ideally a quoted UUID.",
    ),
    (
        ProblemKind::IdempotencyKeyReused,
        "Idempotency key reused",
        "This Idempotency-Key was already used with a different request (method, path or body); use a new key.",
    ),
    (
        ProblemKind::IdempotencyKeyInUse,
        "Idempotency key in use",
        "The first request with this Idempotency-Key is still running; retry the same request shortly.",
    ),
    (
        ProblemKind::ObjectBusy,
        "Object busy",
        "Another mailscope process is changing the same object in the tenant (a replica serving the same request, or a job); repeat the request after the indicated delay.",
    ),
    (
        ProblemKind::DatabaseUnavailable,
        "Database unavailable",
        "mailscope cannot reach its database right now; retry after the indicated delay.",
    ),
    (
        ProblemKind::KeysUnavailable,
        "Signing keys unavailable",
        "mailscope cannot fetch the identity provider's signing keys (auth.jwks_url), so it cannot check any token right now; retry after the indicated delay. Nothing is wrong with the token itself.",
    ),
    (
        ProblemKind::NotReady,
        "Not ready",
        "The service is starting or its database schema is not at the expected version.",
    ),
    (
        ProblemKind::Microsoft365,
        "Microsoft 365 request failed",
        "Microsoft Entra ID, Graph or Exchange Online refused or failed a call mailscope made; the problem's code names the cause and its detail says how to fix it.",
    ),
    (
        ProblemKind::PolicyConflict,
        "Access policy conflict",
        "An application access policy for this app and scope already exists with different settings; `errors` lists what differs. Change it with PUT or PATCH /access-policies/{id}.",
    ),
    (
        ProblemKind::LastRestrictPolicy,
        "Last RestrictAccess policy",
        "Removing the app's last RestrictAccess policy would give it every mailbox in the tenant (rule 4). Revoke its mail permissions first, or repeat with `?allow_unrestricted=true`.",
    ),
    (
        ProblemKind::ScopeGroupInUse,
        "Scope group in use",
        "The scope group is the scope of one or more application access policies; delete or replace those first.",
    ),
    (
        ProblemKind::ApplicationHasPolicies,
        "Application has access policies",
        "The application still has access policies managed by mailscope; delete them first (the last RestrictAccess policy needs allow_unrestricted=true).",
    ),
    (
        ProblemKind::InvalidPolicyScope,
        "Invalid policy scope",
        "Only a user mailbox, a mail user or a mail-enabled security group can scope an application access policy; shared, room and equipment mailboxes must be put into a scope group.",
    ),
    (
        ProblemKind::RbacRestrictionConflict,
        "RBAC restriction conflict",
        "An RBAC restriction for this app and scope already exists with different settings; `errors` lists what differs. Change it with PUT /rbac-restrictions/{id}.",
    ),
    (
        ProblemKind::AppRegistrationObjectId,
        "App registration object id",
        "The object id given is the app registration's, not its service principal's (Enterprise application). Exchange accepts it and the RBAC restriction never applies; omit it and mailscope uses the service principal's.",
    ),
    (
        ProblemKind::ScopeFilterMismatch,
        "Scope filter mismatch",
        "The management scope's recipient filter did not read back as written; an empty or altered filter can mean the whole organisation, so nothing was assigned to it.",
    ),
    (
        ProblemKind::RbacIncomplete,
        "RBAC restriction incomplete",
        "The restriction's pointer, role assignments or filter are not as recorded in the tenant; PUT the restriction again before removing Entra grants.",
    ),
    (
        ProblemKind::VerificationMailboxesRequired,
        "Verification mailboxes required",
        "Removing the app's Entra grants needs at least one mailbox inside the scope and one outside it (a canary) to verify with Test-ServicePrincipalAuthorization first.",
    ),
    (
        ProblemKind::RbacVerificationFailed,
        "RBAC verification failed",
        "Test-ServicePrincipalAuthorization does not show a sample mailbox in scope or shows a canary in scope; the app's Entra grants were left in place. `errors` lists each mailbox.",
    ),
    (
        ProblemKind::RbacDenyUnsupported,
        "DenyAccess has no RBAC equivalent",
        "RBAC for Applications can only grant: no role assignment says \"every mailbox except this group\", so a DenyAccess restriction cannot be expressed or verified as RBAC (docs/microsoft-365.md §3.8). Keep the DenyAccess application access policy, or turn its scope into an allow-list (a scope of the mailboxes the app may reach).",
    ),
    (
        ProblemKind::RbacMigrationActive,
        "RBAC migration under way",
        "The app already has an unfinished migration to RBAC for Applications; pause, resume or roll back that one (GET /rbac-migrations?app_id=…).",
    ),
    (
        ProblemKind::RbacMigrationNotPossible,
        "RBAC migration not possible",
        "The app's restriction cannot be carried over to RBAC for Applications: it has no application access policy, only DenyAccess ones (RBAC can only grant), or permissions no RBAC role grants. `errors` lists why; a dry run shows the whole plan.",
    ),
    (
        ProblemKind::RbacMigrationRollbackClosed,
        "RBAC migration rollback closed",
        "The migration has started removing the app's access policy, so only RBAC bounds the app; restoring its Entra consent now would reach every mailbox. Resume the migration instead.",
    ),
    (
        ProblemKind::RbacUnionTrap,
        "Entra grant would bypass RBAC",
        "The app is restricted by RBAC for Applications, and RBAC grants add to Entra grants: an Entra mailbox permission would reach every mailbox whatever the RBAC scope. Leave admin consent off (RBAC grants the permissions in scope), or remove the RBAC restriction first.",
    ),
    (
        ProblemKind::Internal,
        "Internal error",
        "An unexpected error; the request id identifies it in the service's logs.",
    ),
    (
        ProblemKind::RequestHeadersTooLarge,
        "Request header fields too large",
        "The request head has more than 96 header fields or exceeds 128 KiB; shorten it (often an oversized token or cookie).",
    ),
    (
        ProblemKind::MalformedRequest,
        "Malformed request",
        "The request is not valid HTTP/1.1 (request line, header syntax or framing), so it could not be read at all.",
    ),
    (
        ProblemKind::RequestTimeout,
        "Request timeout",
        "The request head did not arrive within the client request timeout; the connection was closed.",
    ),
];

impl ProblemKind {
    pub fn code(self) -> &'static str {
        match self {
            ProblemKind::MalformedJson => "malformed_json",
            ProblemKind::UnsupportedMediaType => "unsupported_media_type",
            ProblemKind::PayloadTooLarge => "payload_too_large",
            ProblemKind::InvalidPathParameter => "invalid_path_parameter",
            ProblemKind::InvalidQuery => "invalid_query",
            ProblemKind::ValidationFailed => "validation_failed",
            ProblemKind::Unauthenticated => "unauthenticated",
            ProblemKind::Forbidden => "forbidden",
            ProblemKind::NotFound => "not_found",
            ProblemKind::MethodNotAllowed => "method_not_allowed",
            ProblemKind::Conflict => "conflict",
            ProblemKind::InvalidIdempotencyKey => "invalid_idempotency_key",
            ProblemKind::IdempotencyKeyReused => "idempotency_key_reused",
            ProblemKind::IdempotencyKeyInUse => "idempotency_key_in_use",
            ProblemKind::ObjectBusy => "object_busy",
            ProblemKind::DatabaseUnavailable => "database_unavailable",
            ProblemKind::KeysUnavailable => "keys_unavailable",
            ProblemKind::NotReady => "not_ready",
            ProblemKind::Microsoft365 => "microsoft_365",
            ProblemKind::PolicyConflict => "policy_conflict",
            ProblemKind::LastRestrictPolicy => "last_restrict_policy",
            ProblemKind::ScopeGroupInUse => "scope_group_in_use",
            ProblemKind::ApplicationHasPolicies => "application_has_policies",
            ProblemKind::InvalidPolicyScope => "invalid_policy_scope",
            ProblemKind::RbacRestrictionConflict => "rbac_restriction_conflict",
            ProblemKind::AppRegistrationObjectId => "app_registration_object_id",
            ProblemKind::ScopeFilterMismatch => "scope_filter_mismatch",
            ProblemKind::RbacIncomplete => "rbac_incomplete",
            ProblemKind::VerificationMailboxesRequired => "verification_mailboxes_required",
            ProblemKind::RbacVerificationFailed => "rbac_verification_failed",
            ProblemKind::RbacDenyUnsupported => "rbac_deny_unsupported",
            ProblemKind::RbacMigrationActive => "rbac_migration_active",
            ProblemKind::RbacMigrationNotPossible => "rbac_migration_not_possible",
            ProblemKind::RbacMigrationRollbackClosed => "rbac_migration_rollback_closed",
            ProblemKind::RbacUnionTrap => "rbac_union_trap",
            ProblemKind::RequestHeadersTooLarge => "request_headers_too_large",
            ProblemKind::MalformedRequest => "malformed_request",
            ProblemKind::RequestTimeout => "request_timeout",
            ProblemKind::Internal => "internal",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ProblemKind::MalformedJson
            | ProblemKind::InvalidPathParameter
            | ProblemKind::InvalidQuery
            | ProblemKind::InvalidIdempotencyKey => StatusCode::BAD_REQUEST,
            ProblemKind::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ProblemKind::IdempotencyKeyInUse | ProblemKind::ObjectBusy => StatusCode::CONFLICT,
            ProblemKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProblemKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProblemKind::ValidationFailed => StatusCode::UNPROCESSABLE_ENTITY,
            ProblemKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ProblemKind::Forbidden => StatusCode::FORBIDDEN,
            ProblemKind::NotFound => StatusCode::NOT_FOUND,
            ProblemKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProblemKind::Conflict => StatusCode::CONFLICT,
            ProblemKind::DatabaseUnavailable
            | ProblemKind::NotReady
            | ProblemKind::KeysUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProblemKind::Microsoft365 => StatusCode::BAD_GATEWAY,
            ProblemKind::PolicyConflict
            | ProblemKind::LastRestrictPolicy
            | ProblemKind::ScopeGroupInUse
            | ProblemKind::ApplicationHasPolicies => StatusCode::CONFLICT,
            ProblemKind::InvalidPolicyScope
            | ProblemKind::AppRegistrationObjectId
            | ProblemKind::VerificationMailboxesRequired
            | ProblemKind::RbacDenyUnsupported
            | ProblemKind::RbacMigrationNotPossible => StatusCode::UNPROCESSABLE_ENTITY,
            ProblemKind::RbacMigrationActive
            | ProblemKind::RbacMigrationRollbackClosed
            | ProblemKind::RbacUnionTrap => StatusCode::CONFLICT,
            ProblemKind::RbacRestrictionConflict
            | ProblemKind::RbacIncomplete
            | ProblemKind::RbacVerificationFailed => StatusCode::CONFLICT,
            ProblemKind::ScopeFilterMismatch => StatusCode::BAD_GATEWAY,
            ProblemKind::RequestHeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProblemKind::MalformedRequest => StatusCode::BAD_REQUEST,
            ProblemKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ProblemKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn title(self) -> &'static str {
        CATALOGUE
            .iter()
            .find(|(k, _, _)| *k == self)
            .map(|(_, t, _)| *t)
            .unwrap_or("Error")
    }

    pub fn type_uri(self) -> String {
        format!("/problems/{}", self.code())
    }
}

pub use crate::domain::field_error::FieldError;

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// Stable URI reference naming the kind of problem; branch on this (or `code`).
    #[serde(rename = "type")]
    #[schema(example = "/problems/validation_failed")]
    pub type_uri: String,
    #[schema(example = "Validation failed")]
    pub title: String,
    #[schema(example = 422)]
    pub status: u16,
    /// What went wrong with this request, in words a person can act on.
    #[schema(example = "credentials.client_id: must be a GUID")]
    pub detail: String,
    /// The request path this problem is about.
    #[schema(example = "/v1/tenants/0b1c6a36-6b53-4bcb-8e56-0d4f5c7f3a11")]
    pub instance: String,
    /// Identifies the request in mailscope's logs (echoed in the `X-Request-Id` header).
    #[schema(example = "5f0c3c3e-2d3f-4c52-9f0b-6a8d1f1b2a77")]
    pub request_id: String,
    /// The same kind as `type`, without the path.
    #[schema(example = "validation_failed")]
    pub code: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// Details quote input (field names, values) in places; bounded so a caller cannot make a
/// problem document, or the log line that carries it, as large as its request.
const MAX_DETAIL_CHARS: usize = 600;
const MAX_FIELD_CHARS: usize = 120;

fn bounded(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

/// The API's error: a kind, a message for the client, and (optionally) an internal cause that is
/// logged and never sent.
#[derive(Debug)]
pub struct ApiError {
    pub kind: ProblemKind,
    pub detail: String,
    pub errors: Vec<FieldError>,
    pub retry_after: Option<u64>,
    pub extra_headers: Vec<(header::HeaderName, HeaderValue)>,
    pub internal: Option<anyhow::Error>,
    /// A more specific problem code than the kind's (e.g. `policy_limit_reached`).
    pub code_override: Option<&'static str>,
    /// A status other than the kind's (Microsoft errors choose theirs).
    pub status_override: Option<StatusCode>,
}

impl ApiError {
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        ApiError {
            kind,
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
            extra_headers: Vec::new(),
            internal: None,
            code_override: None,
            status_override: None,
        }
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::NotFound, detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::Conflict, detail)
    }

    pub fn validation(errors: Vec<FieldError>) -> Self {
        let detail = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        ApiError {
            errors,
            ..Self::new(ProblemKind::ValidationFailed, detail)
        }
    }

    pub fn unauthenticated(detail: impl Into<String>) -> Self {
        let mut e = Self::new(ProblemKind::Unauthenticated, detail);
        e.extra_headers.push((
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        ));
        e
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::Forbidden, detail)
    }

    /// An unexpected failure: the client sees a generic message, the cause goes to the log.
    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        ApiError {
            internal: Some(cause.into()),
            ..Self::new(
                ProblemKind::Internal,
                "an unexpected error occurred; quote the request id when reporting it",
            )
        }
    }

    pub fn database_unavailable(cause: impl Into<anyhow::Error>) -> Self {
        ApiError {
            internal: Some(cause.into()),
            retry_after: Some(5),
            ..Self::new(
                ProblemKind::DatabaseUnavailable,
                "the database is unreachable or busy; retry shortly",
            )
        }
    }

    pub fn code(&self) -> &'static str {
        self.code_override.unwrap_or_else(|| self.kind.code())
    }

    pub fn status(&self) -> StatusCode {
        self.status_override.unwrap_or_else(|| self.kind.status())
    }

    /// The problem document for this error in the context of one request.
    pub fn to_problem(&self, instance: &str, request_id: &str) -> Problem {
        Problem {
            type_uri: format!("/problems/{}", self.code()),
            title: self.kind.title().to_string(),
            status: self.status().as_u16(),
            detail: bounded(&self.detail, MAX_DETAIL_CHARS),
            instance: instance.to_string(),
            request_id: request_id.to_string(),
            code: self.code().to_string(),
            errors: self
                .errors
                .iter()
                .map(|e| FieldError {
                    field: bounded(&e.field, MAX_FIELD_CHARS),
                    message: bounded(&e.message, MAX_DETAIL_CHARS),
                })
                .collect(),
        }
    }

    /// Render with request context (used by the request-context middleware).
    pub fn render(&self, instance: &str, request_id: &str) -> HttpResponse {
        let mut b = HttpResponse::build(self.status());
        b.insert_header((header::CONTENT_TYPE, PROBLEM_CONTENT_TYPE));
        if let Some(s) = self.retry_after {
            b.insert_header((header::RETRY_AFTER, s.to_string()));
        }
        for (k, v) in &self.extra_headers {
            b.insert_header((k.clone(), v.clone()));
        }
        let body = serde_json::to_vec(&self.to_problem(instance, request_id)).unwrap_or_default();
        b.body(body)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code(), self.detail)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status()
    }

    // Without request context (the middleware re-renders with it); still a valid problem.
    fn error_response(&self) -> HttpResponse {
        self.render("", "")
    }
}

/// Microsoft's failures become problems a person can act on: the connector's stable code as the
/// type, its cause and fix as the detail, and `Retry-After` when Microsoft throttled us.
impl From<crate::m365::M365Error> for ApiError {
    fn from(e: crate::m365::M365Error) -> Self {
        // Microsoft's own request id, when it sent one: a support case with Microsoft needs it.
        let support = e
            .request_id()
            .map(|id| format!(" Microsoft request id: {id}."))
            .unwrap_or_default();
        let mut a = ApiError::new(
            ProblemKind::Microsoft365,
            format!("{} {}{support}", e.cause(), e.fix()),
        );
        a.code_override = Some(e.code());
        a.status_override = StatusCode::from_u16(e.suggested_http_status()).ok();
        a.retry_after = e.retry_after().map(|d| d.as_secs().max(1)).or(
            // Entra converges in seconds to minutes: a short wait before asking again.
            (*e.kind() == crate::m365::ErrorKind::ReplicationPending).then_some(30),
        );
        a
    }
}

/// The provisioning layer's errors, mapped to problems in this one place.
impl From<crate::provisioning::Error> for ApiError {
    fn from(e: crate::provisioning::Error) -> Self {
        use crate::provisioning::{Error, Rejection};
        match e {
            Error::Invalid(errors) => ApiError::validation(errors),
            Error::NotFound(detail) => ApiError::not_found(detail),
            Error::Rejected {
                kind,
                detail,
                errors,
            } => {
                let kind = match kind {
                    Rejection::Conflict => ProblemKind::Conflict,
                    Rejection::PolicyConflict => ProblemKind::PolicyConflict,
                    Rejection::LastRestrictPolicy => ProblemKind::LastRestrictPolicy,
                    Rejection::ScopeGroupInUse => ProblemKind::ScopeGroupInUse,
                    Rejection::ApplicationHasPolicies => ProblemKind::ApplicationHasPolicies,
                    Rejection::InvalidPolicyScope => ProblemKind::InvalidPolicyScope,
                    Rejection::RbacConflict => ProblemKind::RbacRestrictionConflict,
                    Rejection::RegistrationObjectId => ProblemKind::AppRegistrationObjectId,
                    Rejection::ScopeFilterMismatch => ProblemKind::ScopeFilterMismatch,
                    Rejection::RbacIncomplete => ProblemKind::RbacIncomplete,
                    Rejection::VerificationMailboxesRequired => {
                        ProblemKind::VerificationMailboxesRequired
                    }
                    Rejection::RbacVerificationFailed => ProblemKind::RbacVerificationFailed,
                    Rejection::RbacDenyUnsupported => ProblemKind::RbacDenyUnsupported,
                    Rejection::RbacMigrationActive => ProblemKind::RbacMigrationActive,
                    Rejection::RbacMigrationNotPossible => ProblemKind::RbacMigrationNotPossible,
                    Rejection::RbacMigrationRollbackClosed => {
                        ProblemKind::RbacMigrationRollbackClosed
                    }
                    Rejection::RbacUnionTrap => ProblemKind::RbacUnionTrap,
                };
                ApiError {
                    errors,
                    ..ApiError::new(kind, detail)
                }
            }
            Error::Busy(detail) => ApiError {
                retry_after: Some(5),
                ..ApiError::new(ProblemKind::ObjectBusy, detail)
            },
            Error::Microsoft(m) => m.into(),
            Error::Store(s) => s.into(),
            Error::Internal(cause) => ApiError::internal(cause),
        }
    }
}

/// Authentication and authorization refusals, mapped to problems in this one place.
impl From<crate::auth::Denied> for ApiError {
    fn from(e: crate::auth::Denied) -> Self {
        use crate::auth::{AuthError, Denied};
        match e {
            // Not the caller's fault: a 503 to retry, not a 401 that says "get another token".
            Denied::Unauthenticated(AuthError::KeysUnavailable(why)) => ApiError {
                internal: Some(anyhow::anyhow!("JWKS unavailable: {why}")),
                retry_after: Some(5),
                ..ApiError::new(
                    ProblemKind::KeysUnavailable,
                    "the identity provider's signing keys cannot be fetched right now, so no token can be checked; retry shortly",
                )
            },
            Denied::Unauthenticated(why) => ApiError::unauthenticated(why.to_string()),
            Denied::Forbidden(detail) => ApiError::forbidden(detail),
            hidden @ Denied::TenantNotFound(_) => ApiError::not_found(hidden.to_string()),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::Unavailable(cause) => ApiError::database_unavailable(cause),
            StoreError::Other(cause) => ApiError::internal(cause),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_in_the_catalogue_with_a_distinct_code() {
        let mut codes: Vec<_> = CATALOGUE.iter().map(|(k, _, _)| k.code()).collect();
        let n = codes.len();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), n);
        assert_eq!(n, 39);
    }

    #[test]
    fn internal_cause_is_not_rendered() {
        let e = ApiError::internal(anyhow::anyhow!("password=hunter2 in connection string"));
        let p = e.to_problem("/v1/x", "rid");
        assert!(!serde_json::to_string(&p).unwrap().contains("hunter2"));
        assert_eq!(p.status, 500);
    }

    #[test]
    fn a_busy_object_is_a_conflict_to_repeat_later_with_its_cause() {
        let e = ApiError::from(crate::provisioning::Error::Busy(
            "another mailscope process has been changing `application:t/acme`".into(),
        ));
        assert_eq!(e.code(), "object_busy");
        assert_eq!(e.status(), StatusCode::CONFLICT);
        assert_eq!(e.retry_after, Some(5));
        assert!(e.detail.contains("application:t/acme"), "{}", e.detail);
    }

    #[test]
    fn validation_detail_lists_fields() {
        let e = ApiError::validation(vec![FieldError {
            field: "a".into(),
            message: "bad".into(),
        }]);
        assert_eq!(e.detail, "a: bad");
        assert_eq!(e.kind.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
}
