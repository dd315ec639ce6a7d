//! The connector's one error type, [`M365Error`].
//!
//! Every failure reaching Microsoft (or the sandbox) is reduced to an [`ErrorKind`] a person can
//! act on, with a short `cause()` and a `fix()` sentence written for tenant admins, and a stable
//! snake_case `code()` the HTTP layer uses as the suffix of the problem `type`. Microsoft's own
//! code and message are kept as context for support, never as the thing we branch on when a code
//! exists. Tokens and secrets are never put into an error: requests carry them only in headers and
//! form bodies, and neither is copied here.
use std::fmt;
use std::time::Duration;

/// Which remote service answered (or failed to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// The Entra ID token endpoint.
    Login,
    /// Microsoft Graph.
    Graph,
    /// Exchange Online admin API (InvokeCommand).
    Exchange,
}

impl Service {
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Login => "login",
            Service::Graph => "graph",
            Service::Exchange => "exchange",
        }
    }
}

/// What went wrong, in terms that decide what a person (or the caller) does next.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// AADSTS7000215: the client secret is wrong (often the secret's id was pasted instead of its value).
    InvalidClientSecret,
    /// AADSTS7000222: the client secret has expired.
    ClientSecretExpired,
    /// AADSTS700027/700024/…: the certificate assertion was refused (not registered, expired, clock off).
    InvalidClientCertificate,
    /// AADSTS700016: no app with this client id exists in the tenant.
    AppNotFoundInTenant,
    /// AADSTS7000112: the app or its service principal is disabled.
    AppDisabled,
    /// AADSTS90002/900023: the tenant id or domain does not exist in this cloud.
    TenantNotFound,
    /// AADSTS65001: admin consent was never granted in this tenant.
    ConsentMissing,
    /// AADSTS500011: the resource (e.g. Exchange Online) has no service principal in the tenant.
    ResourceNotInTenant,
    /// AADSTS70011: the requested scope is not valid (usually the wrong cloud for the tenant).
    InvalidScope,
    /// AADSTS53003 and similar: sign-in blocked by Conditional Access or another policy.
    SignInBlocked,
    /// Any other sign-in failure.
    SignInFailed,
    /// A Graph 401: the token was refused even after a fresh one was fetched.
    TokenRejected,
    /// Exchange InvokeCommand 401: the app lacks the `Exchange.ManageAsApp` app role.
    MissingManageAsAppRole,
    /// Exchange InvokeCommand 403: the service principal holds no Exchange admin directory role
    /// (or the cmdlet is unknown to the tenant).
    MissingExchangeAdminRole,
    /// Graph 403 on a directory call: the app lacks a Graph application permission.
    GraphPermissionMissing,
    /// Graph `ErrorAccessDenied` on a mailbox: an Application Access Policy or RBAC scope blocks it.
    MailboxAccessDenied,
    /// The object does not exist (or has not replicated yet).
    NotFound,
    /// Entra has not yet made an object mailscope just wrote usable everywhere (eventual
    /// consistency), and the bounded retries ran out: a new app still 404, its service principal
    /// refused with `NoBackingApplicationObject`, a new secret refused, a new role not in tokens.
    ReplicationPending,
    /// The object already exists.
    AlreadyExists,
    /// Microsoft rejected a parameter or the request shape.
    InvalidParameter,
    /// New-ApplicationAccessPolicy: "The total size of App Access Policies exceeded the limit."
    PolicyLimitReached,
    /// 429 or Exchange's concurrent-request limit; `retry_after` when Microsoft said how long to wait.
    Throttled { retry_after: Option<Duration> },
    /// 5xx/408 and similar: worth retrying later.
    Transient,
    /// No answer within the per-request timeout.
    Timeout,
    /// The host could not be reached (DNS, TCP, TLS).
    Unreachable,
    /// mailscope's own configuration for the tenant is unusable (bad PEM, bad URL, ...).
    InvalidConfiguration,
    /// Microsoft answered with a shape we do not understand.
    Protocol,
}

impl ErrorKind {
    /// Stable machine code, used as the problem `type` suffix by the HTTP layer.
    pub fn code(&self) -> &'static str {
        match self {
            ErrorKind::InvalidClientSecret => "invalid_client_secret",
            ErrorKind::ClientSecretExpired => "client_secret_expired",
            ErrorKind::InvalidClientCertificate => "invalid_client_certificate",
            ErrorKind::AppNotFoundInTenant => "app_not_found_in_tenant",
            ErrorKind::AppDisabled => "app_disabled",
            ErrorKind::TenantNotFound => "tenant_not_found",
            ErrorKind::ConsentMissing => "consent_missing",
            ErrorKind::ResourceNotInTenant => "resource_not_in_tenant",
            ErrorKind::InvalidScope => "invalid_scope",
            ErrorKind::SignInBlocked => "sign_in_blocked",
            ErrorKind::SignInFailed => "sign_in_failed",
            ErrorKind::TokenRejected => "token_rejected",
            ErrorKind::MissingManageAsAppRole => "missing_manage_as_app_role",
            ErrorKind::MissingExchangeAdminRole => "missing_exchange_admin_role",
            ErrorKind::GraphPermissionMissing => "graph_permission_missing",
            ErrorKind::MailboxAccessDenied => "mailbox_access_denied",
            ErrorKind::NotFound => "not_found",
            ErrorKind::ReplicationPending => "replication_pending",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::InvalidParameter => "invalid_parameter",
            ErrorKind::PolicyLimitReached => "policy_limit_reached",
            ErrorKind::Throttled { .. } => "throttled",
            ErrorKind::Transient => "transient",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::InvalidConfiguration => "invalid_configuration",
            ErrorKind::Protocol => "protocol",
        }
    }

    /// True when trying again later, unchanged, can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ErrorKind::Throttled { .. }
                | ErrorKind::Transient
                | ErrorKind::Timeout
                | ErrorKind::Unreachable
                | ErrorKind::ReplicationPending
        )
    }

    /// True for failures of the management credential or its grants: an admin must act.
    pub fn is_credential_problem(&self) -> bool {
        matches!(
            self,
            ErrorKind::InvalidClientSecret
                | ErrorKind::ClientSecretExpired
                | ErrorKind::InvalidClientCertificate
                | ErrorKind::AppNotFoundInTenant
                | ErrorKind::AppDisabled
                | ErrorKind::TenantNotFound
                | ErrorKind::ConsentMissing
                | ErrorKind::ResourceNotInTenant
                | ErrorKind::InvalidScope
                | ErrorKind::SignInBlocked
                | ErrorKind::SignInFailed
                | ErrorKind::TokenRejected
                | ErrorKind::MissingManageAsAppRole
                | ErrorKind::MissingExchangeAdminRole
                | ErrorKind::GraphPermissionMissing
        )
    }
}

/// An error from the Microsoft 365 connector. Boxed so `Result<_, M365Error>` stays one pointer
/// wide on the happy path.
#[derive(Debug, Clone)]
pub struct M365Error(Box<ErrorInner>);

#[derive(Debug, Clone)]
struct ErrorInner {
    kind: ErrorKind,
    service: Service,
    operation: String,
    status: Option<u16>,
    /// Microsoft's code: `AADSTS7000215`, Graph `error.code`, Exchange ErrorId, ...
    remote_code: Option<String>,
    /// Exchange exception type (`...ManagementObjectNotFoundException`), when given.
    exception_type: Option<String>,
    /// Microsoft's message text (trimmed), for support. Free text: never branched on when a code exists.
    remote_message: Option<String>,
    request_id: Option<String>,
    /// `Retry-After` sent with a non-throttling answer (e.g. a 503); honoured as a floor on retry.
    retry_after_hint: Option<Duration>,
}

/// Longest remote message kept; Exchange stack traces are not useful to admins.
const MAX_MESSAGE: usize = 600;

impl M365Error {
    pub fn new(kind: ErrorKind, service: Service, operation: impl Into<String>) -> Self {
        M365Error(Box::new(ErrorInner {
            kind,
            service,
            operation: operation.into(),
            status: None,
            remote_code: None,
            exception_type: None,
            remote_message: None,
            request_id: None,
            retry_after_hint: None,
        }))
    }

    pub fn with_retry_after_hint(mut self, d: Option<Duration>) -> Self {
        self.0.retry_after_hint = d;
        self
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.0.status = Some(status);
        self
    }

    pub fn with_remote_code(mut self, code: impl Into<String>) -> Self {
        let code = code.into();
        if !code.is_empty() {
            self.0.remote_code = Some(code);
        }
        self
    }

    pub fn with_exception_type(mut self, t: impl Into<String>) -> Self {
        let t = t.into();
        if !t.is_empty() {
            self.0.exception_type = Some(t);
        }
        self
    }

    pub fn with_message(mut self, message: impl AsRef<str>) -> Self {
        let m = message.as_ref().trim();
        if !m.is_empty() {
            self.0.remote_message = Some(truncate(m, MAX_MESSAGE));
        }
        self
    }

    pub fn with_request_id(mut self, id: Option<String>) -> Self {
        self.0.request_id = id.filter(|s| !s.is_empty());
        self
    }

    /// Replace the kind, keeping Microsoft's code, message and request id (used when bounded
    /// retries turn an answer into a more telling kind).
    pub fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.0.kind = kind;
        self
    }

    /// Replace the operation name (used when a lower layer did not know it).
    pub fn with_operation(mut self, operation: impl Into<String>) -> Self {
        self.0.operation = operation.into();
        self
    }

    pub fn kind(&self) -> &ErrorKind {
        &self.0.kind
    }
    pub fn service(&self) -> Service {
        self.0.service
    }
    pub fn operation(&self) -> &str {
        &self.0.operation
    }
    pub fn status(&self) -> Option<u16> {
        self.0.status
    }
    pub fn remote_code(&self) -> Option<&str> {
        self.0.remote_code.as_deref()
    }
    pub fn exception_type(&self) -> Option<&str> {
        self.0.exception_type.as_deref()
    }
    pub fn remote_message(&self) -> Option<&str> {
        self.0.remote_message.as_deref()
    }
    pub fn request_id(&self) -> Option<&str> {
        self.0.request_id.as_deref()
    }

    /// Stable machine code (see [`ErrorKind::code`]).
    pub fn code(&self) -> &'static str {
        self.0.kind.code()
    }

    pub fn is_retryable(&self) -> bool {
        self.0.kind.is_retryable()
    }

    pub fn is_not_found(&self) -> bool {
        self.0.kind == ErrorKind::NotFound
    }

    /// How long Microsoft asked us to wait before trying again, if it said so.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.0.kind {
            ErrorKind::Throttled {
                retry_after: Some(d),
            } => Some(d),
            _ => self.0.retry_after_hint,
        }
    }

    /// A status the HTTP layer can answer with when it passes this error on.
    pub fn suggested_http_status(&self) -> u16 {
        match self.0.kind {
            ErrorKind::NotFound => 404,
            ErrorKind::AlreadyExists => 409,
            ErrorKind::InvalidParameter | ErrorKind::PolicyLimitReached => 422,
            ErrorKind::Throttled { .. } | ErrorKind::ReplicationPending => 503,
            ErrorKind::Timeout => 504,
            ErrorKind::InvalidConfiguration => 422,
            _ => 502,
        }
    }

    /// One sentence: what happened, in an admin's words.
    pub fn cause(&self) -> String {
        let svc = match self.0.service {
            Service::Login => "Microsoft Entra sign-in",
            Service::Graph => "Microsoft Graph",
            Service::Exchange => "Exchange Online",
        };
        match &self.0.kind {
            ErrorKind::InvalidClientSecret => "The client secret of mailscope's management app is wrong.".into(),
            ErrorKind::ClientSecretExpired => "The client secret of mailscope's management app has expired.".into(),
            ErrorKind::InvalidClientCertificate => {
                "Microsoft Entra refused the certificate credential of mailscope's management app.".into()
            }
            ErrorKind::AppNotFoundInTenant => {
                "mailscope's management app does not exist in this tenant (wrong client id or tenant, or it was never consented here).".into()
            }
            ErrorKind::AppDisabled => "mailscope's management app is disabled in this tenant.".into(),
            ErrorKind::TenantNotFound => "The tenant id or domain is unknown to this Microsoft cloud.".into(),
            ErrorKind::ConsentMissing => {
                "An administrator has not granted consent to mailscope's management app in this tenant.".into()
            }
            ErrorKind::ResourceNotInTenant => {
                "The tenant has no service principal for the requested resource (for Exchange: no Exchange Online subscription, or it was never provisioned).".into()
            }
            ErrorKind::InvalidScope => {
                "The token scope is not valid for this tenant, usually because the tenant is in a different Microsoft cloud.".into()
            }
            ErrorKind::SignInBlocked => {
                "Sign-in of mailscope's management app was blocked by a tenant policy such as Conditional Access.".into()
            }
            ErrorKind::SignInFailed => "Microsoft Entra refused to issue a token to mailscope's management app.".into(),
            ErrorKind::TokenRejected => format!("{svc} rejected mailscope's access token."),
            ErrorKind::MissingManageAsAppRole => {
                "The app lacks the Exchange.ManageAsApp role, so Exchange Online refuses its admin commands.".into()
            }
            ErrorKind::MissingExchangeAdminRole => {
                "The service principal has no Exchange Administrator role (or the command is not available in this tenant).".into()
            }
            ErrorKind::GraphPermissionMissing => {
                "The app lacks a Microsoft Graph application permission this operation needs.".into()
            }
            ErrorKind::MailboxAccessDenied => {
                "Exchange Online denied the app access to this mailbox (an Application Access Policy, RBAC scope or EWS access policy blocks it).".into()
            }
            ErrorKind::NotFound => format!("{svc} could not find the object."),
            ErrorKind::ReplicationPending => format!(
                "{svc} has not yet made an object mailscope just created usable everywhere (Microsoft Entra's eventual consistency){}.",
                self.0
                    .remote_code
                    .as_deref()
                    .map(|c| format!(": it still answers {c}"))
                    .unwrap_or_default()
            ),
            ErrorKind::AlreadyExists => format!("{svc} already has an object with this name or key."),
            ErrorKind::InvalidParameter => format!("{svc} rejected a parameter of the request."),
            ErrorKind::PolicyLimitReached => {
                "The tenant has reached the size limit for Application Access Policies.".into()
            }
            ErrorKind::Throttled { retry_after: Some(d) } => {
                format!("{svc} is throttling requests for this tenant (asked to wait {:.1} s).", d.as_secs_f64())
            }
            ErrorKind::Throttled { retry_after: None } => format!("{svc} is throttling requests for this tenant."),
            ErrorKind::Transient => format!("{svc} had a temporary failure."),
            ErrorKind::Timeout => format!("{svc} did not answer in time."),
            ErrorKind::Unreachable => format!("mailscope could not reach {svc}."),
            ErrorKind::InvalidConfiguration => "The tenant's connection settings in mailscope are not usable.".into(),
            ErrorKind::Protocol => format!("{svc} answered in a way mailscope does not understand."),
        }
    }

    /// One sentence: what an admin should do about it.
    pub fn fix(&self) -> String {
        match &self.0.kind {
            ErrorKind::InvalidClientSecret => {
                "Copy the secret's Value (not its Secret ID) from the app's Certificates & secrets page into the tenant's credential in mailscope.".into()
            }
            ErrorKind::ClientSecretExpired => {
                "Create a new client secret on the app registration and update the tenant's credential in mailscope.".into()
            }
            ErrorKind::InvalidClientCertificate => {
                "Upload the certificate to the app registration (Certificates & secrets), check it has not expired, and check this server's clock.".into()
            }
            ErrorKind::AppNotFoundInTenant => {
                "Check the client id and tenant id, then have a Global Administrator grant admin consent to the app in this tenant.".into()
            }
            ErrorKind::AppDisabled => {
                "Enable the app in Entra ID (Enterprise applications > Properties > Enabled for users to sign in).".into()
            }
            ErrorKind::TenantNotFound => {
                "Check the tenant id and the tenant's cloud setting (global, usgov, usgovdod, china).".into()
            }
            ErrorKind::ConsentMissing => {
                "Have a Global Administrator open the admin consent link for the app and accept it.".into()
            }
            ErrorKind::ResourceNotInTenant => {
                "Make sure the tenant has Exchange Online, then grant admin consent to the app again.".into()
            }
            ErrorKind::InvalidScope => "Check the tenant's cloud setting and endpoint overrides in mailscope.".into(),
            ErrorKind::SignInBlocked => {
                "Exclude the management app from the blocking Conditional Access policy for workload identities, or allow this server's IP address.".into()
            }
            ErrorKind::SignInFailed => {
                "Check the app registration and the credential in mailscope; Microsoft's message below names the reason.".into()
            }
            ErrorKind::TokenRejected => {
                "Check the tenant's cloud setting and that the app's permissions were granted; then retry.".into()
            }
            ErrorKind::MissingManageAsAppRole => {
                "Add the Office 365 Exchange Online application permission Exchange.ManageAsApp to the app and grant admin consent; new tokens pick it up within minutes.".into()
            }
            ErrorKind::MissingExchangeAdminRole => {
                "Assign the Exchange Administrator role in Entra ID (Roles and administrators) to the app's service principal; it can take up to an hour to apply.".into()
            }
            ErrorKind::GraphPermissionMissing => {
                "Grant the app the Microsoft Graph application permissions mailscope needs (e.g. Application.ReadWrite.All, AppRoleAssignment.ReadWrite.All) and grant admin consent.".into()
            }
            ErrorKind::MailboxAccessDenied => {
                "If the mailbox should be reachable, add it to the policy's scope group; also check EWS access policies (EwsApplicationAccessPolicy) on the mailbox and organization.".into()
            }
            ErrorKind::NotFound => {
                "Check the name or id; objects created moments ago can take a few minutes to appear.".into()
            }
            ErrorKind::ReplicationPending => {
                "Nothing to change: Entra usually converges within seconds to minutes, and mailscope retries the step; if it persists, quote Microsoft's request id to Microsoft support.".into()
            }
            ErrorKind::AlreadyExists => "Use the existing object or choose another name.".into(),
            ErrorKind::InvalidParameter => "Check the values given; Microsoft's message below names the parameter.".into(),
            ErrorKind::PolicyLimitReached => {
                "Remove unused Application Access Policies or move apps to RBAC for Applications, which allows far more apps.".into()
            }
            ErrorKind::Throttled { .. } => {
                "Nothing to change; mailscope retries automatically. If this persists, reduce other automation in the tenant.".into()
            }
            ErrorKind::Transient | ErrorKind::Timeout => {
                "Retry later; if it persists, check the Microsoft 365 service health page.".into()
            }
            ErrorKind::Unreachable => {
                "Check DNS, proxy and firewall rules for outbound HTTPS from the mailscope server, and the tenant's endpoint settings.".into()
            }
            ErrorKind::InvalidConfiguration => "Correct the tenant's credential or endpoint settings in mailscope.".into(),
            ErrorKind::Protocol => {
                "Retry later; if it persists, report it with the request id to the mailscope maintainers.".into()
            }
        }
    }
}

impl fmt::Display for M365Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.0.service.as_str(),
            self.0.operation,
            self.cause()
        )?;
        if let Some(s) = self.0.status {
            write!(f, " (HTTP {s}")?;
            if let Some(c) = &self.0.remote_code {
                write!(f, ", {c}")?;
            }
            write!(f, ")")?;
        } else if let Some(c) = &self.0.remote_code {
            write!(f, " ({c})")?;
        }
        if let Some(m) = &self.0.remote_message {
            write!(f, ": {m}")?;
        }
        Ok(())
    }
}

impl std::error::Error for M365Error {}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is fine in tests (developers' guide)
mod tests {
    use super::*;

    #[test]
    fn codes_are_snake_case_and_unique() {
        let kinds = [
            ErrorKind::InvalidClientSecret,
            ErrorKind::ClientSecretExpired,
            ErrorKind::InvalidClientCertificate,
            ErrorKind::AppNotFoundInTenant,
            ErrorKind::AppDisabled,
            ErrorKind::TenantNotFound,
            ErrorKind::ConsentMissing,
            ErrorKind::ResourceNotInTenant,
            ErrorKind::InvalidScope,
            ErrorKind::SignInBlocked,
            ErrorKind::SignInFailed,
            ErrorKind::TokenRejected,
            ErrorKind::MissingManageAsAppRole,
            ErrorKind::MissingExchangeAdminRole,
            ErrorKind::GraphPermissionMissing,
            ErrorKind::MailboxAccessDenied,
            ErrorKind::NotFound,
            ErrorKind::ReplicationPending,
            ErrorKind::AlreadyExists,
            ErrorKind::InvalidParameter,
            ErrorKind::PolicyLimitReached,
            ErrorKind::Throttled { retry_after: None },
            ErrorKind::Transient,
            ErrorKind::Timeout,
            ErrorKind::Unreachable,
            ErrorKind::InvalidConfiguration,
            ErrorKind::Protocol,
        ];
        let mut seen = std::collections::HashSet::new();
        for k in &kinds {
            let c = k.code();
            assert!(
                c.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'),
                "{c}"
            );
            assert!(seen.insert(c), "duplicate {c}");
            let e = M365Error::new(k.clone(), Service::Exchange, "op");
            assert!(e.cause().ends_with('.') && e.fix().ends_with('.'), "{c}");
        }
    }

    #[test]
    fn display_names_cause_status_and_code() {
        let e = M365Error::new(
            ErrorKind::MissingManageAsAppRole,
            Service::Exchange,
            "Get-Mailbox",
        )
        .with_status(401)
        .with_remote_code("Unauthorized");
        let s = e.to_string();
        assert!(s.contains("Exchange.ManageAsApp"), "{s}");
        assert!(s.contains("HTTP 401, Unauthorized"), "{s}");
    }

    #[test]
    fn truncates_on_char_boundary() {
        let s = "é".repeat(400);
        let t = truncate(&s, 601);
        assert!(t.len() <= 604);
        assert!(t.ends_with('…'));
    }
}
