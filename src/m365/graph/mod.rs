//! Microsoft Graph client (v1.0): applications, service principals, app role assignments,
//! secrets, users, mailbox probes and `$batch` (docs/microsoft-365.md §5).
//!
//! Errors branch on Graph's `error.code`, never on message text (`ErrorAccessDenied` on a mailbox
//! is [`ErrorKind::MailboxAccessDenied`] whatever the message says). Lists follow
//! `@odata.nextLink` on the configured host only.
mod app_roles;
pub mod batch;
pub mod types;

pub(crate) use app_roles::AppRoleCache;
pub use app_roles::{AppRoleSource, ResolvedAppRole, well_known_app_role};
pub use batch::{BatchRequest, BatchResponse};
pub use types::*;

use super::TenantContext;
use super::error::{ErrorKind, M365Error, Service};
use super::token::TokenResource;
use super::transport::{Auth, Call, Core, RawResponse, rebase_next_link};
use reqwest::Method;
use secrecy::SecretString;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::sync::Arc;

/// Resource app id of Microsoft Graph.
pub const GRAPH_APP_ID: &str = "00000003-0000-0000-c000-000000000000";
/// Resource app id of Office 365 Exchange Online.
pub const EXCHANGE_APP_ID: &str = "00000002-0000-0ff1-ce00-000000000000";

/// Graph's `error.details[].code` when a service principal is created for an application Entra
/// does not (yet) know (docs/microsoft-365.md §8.4).
pub const NO_BACKING_APPLICATION: &str = "NoBackingApplicationObject";

/// Guard against a server that keeps handing out next links.
const MAX_PAGES: usize = 10_000;

/// Percent-encode a path segment or query value: RFC 3986 unreserved characters and `@` (legal
/// in both, and how Graph shows UPNs in paths) are kept; `#` in guest UPNs, `/`, `&`, spaces and
/// quotes are escaped.
pub(crate) fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// OData string literal: single quotes doubled.
pub(crate) fn odata_str(s: &str) -> String {
    s.replace('\'', "''")
}

/// Which harmless read a mailbox probe makes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum MailboxProbe {
    /// `GET /users/{id}/messages?$top=1&$select=id` (Mail.*)
    Messages,
    /// `GET /users/{id}/calendars?$top=1&$select=id` (Calendars.*)
    Calendars,
    /// `GET /users/{id}/events?$top=1&$select=id` (Calendars.*)
    Events,
    /// `GET /users/{id}/contacts?$top=1&$select=id` (Contacts.*)
    Contacts,
    /// `GET /users/{id}/mailboxSettings` (MailboxSettings.*)
    MailboxSettings,
}

impl MailboxProbe {
    pub fn path(self, user: &str) -> String {
        let u = pct(user);
        match self {
            MailboxProbe::Messages => format!("/users/{u}/messages?$top=1&$select=id"),
            MailboxProbe::Calendars => format!("/users/{u}/calendars?$top=1&$select=id"),
            MailboxProbe::Events => format!("/users/{u}/events?$top=1&$select=id"),
            MailboxProbe::Contacts => format!("/users/{u}/contacts?$top=1&$select=id"),
            MailboxProbe::MailboxSettings => format!("/users/{u}/mailboxSettings"),
        }
    }

    pub fn operation(self) -> &'static str {
        match self {
            MailboxProbe::Messages => "probe.messages",
            MailboxProbe::Calendars => "probe.calendars",
            MailboxProbe::Events => "probe.events",
            MailboxProbe::Contacts => "probe.contacts",
            MailboxProbe::MailboxSettings => "probe.mailbox_settings",
        }
    }
}

/// What a mailbox probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The read succeeded: the app can reach this mailbox.
    Allowed,
    /// Graph answered `ErrorAccessDenied`: a policy or scope blocks the app.
    Denied { message: Option<String> },
}

/// Graph client bound to one tenant.
#[derive(Clone)]
pub struct GraphClient {
    core: Arc<Core>,
    ctx: Arc<TenantContext>,
    app_roles: Arc<AppRoleCache>,
}

impl GraphClient {
    pub(crate) fn new(
        core: Arc<Core>,
        ctx: Arc<TenantContext>,
        app_roles: Arc<AppRoleCache>,
    ) -> Self {
        GraphClient {
            core,
            ctx,
            app_roles,
        }
    }

    fn base(&self) -> String {
        format!("{}/v1.0", self.ctx.endpoints.graph)
    }

    fn call<'a>(&'a self, op: &'a str, method: Method, path: &str) -> Call<'a> {
        let url = if path.starts_with("http://") || path.starts_with("https://") {
            rebase_next_link(&self.ctx.endpoints.graph, path)
        } else {
            format!("{}{path}", self.base())
        };
        let mut c = Call::new(&self.ctx.tenant_id, Service::Graph, op, method, url)
            .header("accept", "application/json");
        c.auth = Some(Auth {
            ctx: &self.ctx,
            resource: TokenResource::Graph,
        });
        c
    }

    /// Send a request built by [`GraphClient::call`]; error answers are classified.
    async fn send(&self, call: &Call<'_>) -> Result<RawResponse, M365Error> {
        self.core.execute(call, classify_graph).await
    }

    /// `GET` a JSON resource.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        op: &str,
        path: &str,
    ) -> Result<T, M365Error> {
        let resp = self.send(&self.call(op, Method::GET, path)).await?;
        resp.json(Service::Graph, op)
    }

    /// `GET` a resource, `None` on 404.
    pub async fn get_optional<T: DeserializeOwned>(
        &self,
        op: &str,
        path: &str,
    ) -> Result<Option<T>, M365Error> {
        match self.get_json(op, path).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET` a collection, following `@odata.nextLink`.
    pub async fn list<T: DeserializeOwned>(
        &self,
        op: &str,
        path: &str,
    ) -> Result<Vec<T>, M365Error> {
        let mut out = Vec::new();
        let mut next = path.to_string();
        for _ in 0..MAX_PAGES {
            let page: Value = self.get_json(op, &next).await?;
            let items = match page.get("value") {
                Some(Value::Array(a)) => a.clone(),
                None | Some(Value::Null) => Vec::new(),
                Some(_) => {
                    return Err(M365Error::new(ErrorKind::Protocol, Service::Graph, op)
                        .with_message("`value` is not an array"));
                }
            };
            for item in items {
                out.push(serde_json::from_value(item).map_err(|e| {
                    M365Error::new(ErrorKind::Protocol, Service::Graph, op)
                        .with_message(format!("unexpected item: {e}"))
                })?);
            }
            match page.get("@odata.nextLink").and_then(Value::as_str) {
                Some(l) if !l.is_empty() && l != next => next = l.to_string(),
                _ => return Ok(out),
            }
        }
        Err(M365Error::new(ErrorKind::Protocol, Service::Graph, op).with_message("too many pages"))
    }

    /// `POST` JSON. `idempotent` only for requests harmless to repeat.
    pub async fn post_json<T: DeserializeOwned>(
        &self,
        op: &str,
        path: &str,
        body: &Value,
        idempotent: bool,
    ) -> Result<T, M365Error> {
        let mut c = self.call(op, Method::POST, path).json_body(body);
        c.idempotent = idempotent;
        self.send(&c).await?.json(Service::Graph, op)
    }

    /// `POST` JSON expecting no content (204).
    pub async fn post_no_content(
        &self,
        op: &str,
        path: &str,
        body: &Value,
        idempotent: bool,
    ) -> Result<(), M365Error> {
        let mut c = self.call(op, Method::POST, path).json_body(body);
        c.idempotent = idempotent;
        self.send(&c).await.map(|_| ())
    }

    /// `PATCH` (idempotent by nature).
    pub async fn patch(&self, op: &str, path: &str, body: &Value) -> Result<(), M365Error> {
        let mut c = self.call(op, Method::PATCH, path).json_body(body);
        c.idempotent = true;
        self.send(&c).await.map(|_| ())
    }

    /// `DELETE`; `Ok(false)` when it was already gone.
    pub async fn delete(&self, op: &str, path: &str) -> Result<bool, M365Error> {
        let mut c = self.call(op, Method::DELETE, path);
        c.idempotent = true;
        match self.send(&c).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    // ----- applications -----

    /// `POST /applications` (not retried on ambiguous failures: look up by name/appId first).
    pub async fn create_application(&self, app: &NewApplication) -> Result<Application, M365Error> {
        let body = serde_json::to_value(app).unwrap_or_default();
        self.post_json("applications.create", "/applications", &body, false)
            .await
    }

    /// By object id.
    pub async fn get_application(&self, object_id: &str) -> Result<Option<Application>, M365Error> {
        self.get_optional(
            "applications.get",
            &format!("/applications/{}", pct(object_id)),
        )
        .await
    }

    /// By object id, for an application mailscope wrote moments ago: a 404 is retried for
    /// `entra_consistency_window_secs` (a new application reads as Not Found until it has
    /// replicated, docs/microsoft-365.md §8.4); after that it is gone (`None`).
    pub async fn get_application_after_write(
        &self,
        object_id: &str,
    ) -> Result<Option<Application>, M365Error> {
        let op = "applications.get";
        let mut c = self.call(
            op,
            Method::GET,
            &format!("/applications/{}", pct(object_id)),
        );
        c.not_found_until = Some(self.consistency_deadline());
        match self.send(&c).await {
            Ok(resp) => resp.json(Service::Graph, op).map(Some),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Until when answers explained by Entra's eventual consistency are retried.
    fn consistency_deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now()
            + std::time::Duration::from_secs(self.core.settings.entra_consistency_window_secs)
    }

    /// By client id: `GET /applications(appId='…')`.
    pub async fn application_by_app_id(
        &self,
        app_id: &str,
    ) -> Result<Option<Application>, M365Error> {
        let path = format!("/applications(appId='{}')", pct(&odata_str(app_id)));
        self.get_optional("applications.get_by_app_id", &path).await
    }

    /// `GET /applications?$filter=…` (all pages). `filter` is an OData expression.
    pub async fn find_applications(&self, filter: &str) -> Result<Vec<Application>, M365Error> {
        self.list(
            "applications.list",
            &format!("/applications?$filter={}", pct(filter)),
        )
        .await
    }

    pub async fn update_application(
        &self,
        object_id: &str,
        patch: &Value,
    ) -> Result<(), M365Error> {
        self.patch(
            "applications.update",
            &format!("/applications/{}", pct(object_id)),
            patch,
        )
        .await
    }

    pub async fn delete_application(&self, object_id: &str) -> Result<bool, M365Error> {
        self.delete(
            "applications.delete",
            &format!("/applications/{}", pct(object_id)),
        )
        .await
    }

    /// `POST /applications/{id}/addPassword`. Never retried after an ambiguous failure (a retry
    /// could mint a second secret); the secret text comes back once, wrapped.
    pub async fn add_password(
        &self,
        object_id: &str,
        display_name: &str,
        end_date_time: Option<&str>,
    ) -> Result<NewPassword, M365Error> {
        let mut cred = json!({ "displayName": display_name });
        if let Some(end) = end_date_time {
            cred["endDateTime"] = json!(end);
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Raw {
            key_id: String,
            secret_text: String,
            hint: Option<String>,
            display_name: Option<String>,
            start_date_time: Option<String>,
            end_date_time: Option<String>,
        }
        let op = "applications.add_password";
        let resp = self
            .send(&{
                let c = self.call(
                    op,
                    Method::POST,
                    &format!("/applications/{}/addPassword", pct(object_id)),
                );
                c.json_body(&json!({ "passwordCredential": cred }))
            })
            .await?;
        // Parse without echoing the body into any error message: it holds the secret.
        let raw: Raw = serde_json::from_slice(&resp.body).map_err(|_| {
            M365Error::new(ErrorKind::Protocol, Service::Graph, op)
                .with_message("addPassword answer lacks keyId or secretText")
        })?;
        Ok(NewPassword {
            key_id: raw.key_id,
            secret_text: SecretString::from(raw.secret_text),
            hint: raw.hint,
            display_name: raw.display_name,
            start_date_time: raw.start_date_time,
            end_date_time: raw.end_date_time,
        })
    }

    /// `POST /applications/{id}/removePassword` (repeat-safe).
    pub async fn remove_password(&self, object_id: &str, key_id: &str) -> Result<(), M365Error> {
        let path = format!("/applications/{}/removePassword", pct(object_id));
        self.post_no_content(
            "applications.remove_password",
            &path,
            &json!({ "keyId": key_id }),
            true,
        )
        .await
    }

    // ----- service principals -----

    /// `POST /servicePrincipals {"appId"}`. Right after the application was created, Entra
    /// answers 400 `NoBackingApplicationObject` until the application has replicated
    /// (docs/microsoft-365.md §8.4): that answer created nothing, so it is retried for
    /// `entra_consistency_window_secs`, then reported as `replication_pending`.
    pub async fn create_service_principal(
        &self,
        app_id: &str,
    ) -> Result<ServicePrincipal, M365Error> {
        let op = "service_principals.create";
        let mut c = self
            .call(op, Method::POST, "/servicePrincipals")
            .json_body(&json!({ "appId": app_id }));
        c.lag = Some((self.consistency_deadline(), |e| {
            e.remote_code() == Some(NO_BACKING_APPLICATION)
        }));
        self.send(&c).await?.json(Service::Graph, op)
    }

    pub async fn get_service_principal(
        &self,
        object_id: &str,
    ) -> Result<Option<ServicePrincipal>, M365Error> {
        self.get_optional(
            "service_principals.get",
            &format!("/servicePrincipals/{}", pct(object_id)),
        )
        .await
    }

    /// `GET /servicePrincipals(appId='…')`.
    pub async fn service_principal_by_app_id(
        &self,
        app_id: &str,
    ) -> Result<Option<ServicePrincipal>, M365Error> {
        let path = format!("/servicePrincipals(appId='{}')", pct(&odata_str(app_id)));
        self.get_optional("service_principals.get_by_app_id", &path)
            .await
    }

    /// Who holds app roles of a resource: `GET /servicePrincipals/{resource}/appRoleAssignedTo`.
    pub async fn app_role_assigned_to(
        &self,
        resource_sp_id: &str,
    ) -> Result<Vec<AppRoleAssignment>, M365Error> {
        let path = format!(
            "/servicePrincipals/{}/appRoleAssignedTo",
            pct(resource_sp_id)
        );
        self.list("app_role_assigned_to.list", &path).await
    }

    /// Grant an app role (admin consent for an application permission). List first: a repeat
    /// answers 400.
    pub async fn grant_app_role(
        &self,
        resource_sp_id: &str,
        principal_sp_id: &str,
        app_role_id: &str,
    ) -> Result<AppRoleAssignment, M365Error> {
        let path = format!(
            "/servicePrincipals/{}/appRoleAssignedTo",
            pct(resource_sp_id)
        );
        let body = json!({ "principalId": principal_sp_id, "resourceId": resource_sp_id, "appRoleId": app_role_id });
        self.post_json("app_role_assigned_to.create", &path, &body, false)
            .await
    }

    /// Revoke an app role assignment; `Ok(false)` when it was already gone.
    pub async fn revoke_app_role(
        &self,
        resource_sp_id: &str,
        assignment_id: &str,
    ) -> Result<bool, M365Error> {
        let path = format!(
            "/servicePrincipals/{}/appRoleAssignedTo/{}",
            pct(resource_sp_id),
            pct(assignment_id)
        );
        self.delete("app_role_assigned_to.delete", &path).await
    }

    /// App roles a principal holds: `GET /servicePrincipals/{id}/appRoleAssignments`.
    pub async fn app_role_assignments(
        &self,
        principal_sp_id: &str,
    ) -> Result<Vec<AppRoleAssignment>, M365Error> {
        let path = format!(
            "/servicePrincipals/{}/appRoleAssignments",
            pct(principal_sp_id)
        );
        self.list("app_role_assignments.list", &path).await
    }

    /// Assign an Entra directory role (e.g. Exchange Administrator) to a principal, tenant-wide.
    pub async fn assign_directory_role(
        &self,
        principal_id: &str,
        role_definition_id: &str,
    ) -> Result<DirectoryRoleAssignment, M365Error> {
        let body = json!({
            "@odata.type": "#microsoft.graph.unifiedRoleAssignment",
            "principalId": principal_id,
            "roleDefinitionId": role_definition_id,
            "directoryScopeId": "/"
        });
        self.post_json(
            "directory_role_assignments.create",
            "/roleManagement/directory/roleAssignments",
            &body,
            false,
        )
        .await
    }

    /// Directory role assignments of a principal.
    pub async fn directory_role_assignments(
        &self,
        principal_id: &str,
    ) -> Result<Vec<DirectoryRoleAssignment>, M365Error> {
        let filter = pct(&format!("principalId eq '{}'", odata_str(principal_id)));
        self.list(
            "directory_role_assignments.list",
            &format!("/roleManagement/directory/roleAssignments?$filter={filter}"),
        )
        .await
    }

    /// An administrative unit by object id (needs `AdministrativeUnit.Read.All` or
    /// `Directory.Read.All`); `None` when there is none.
    pub async fn get_administrative_unit(
        &self,
        id: &str,
    ) -> Result<Option<AdministrativeUnit>, M365Error> {
        let path = format!(
            "/directory/administrativeUnits/{}?$select=id,displayName",
            pct(id)
        );
        self.get_optional("administrative_units.get", &path).await
    }

    // ----- users and mailboxes -----

    /// By object id or UPN.
    pub async fn get_user(&self, id_or_upn: &str) -> Result<Option<User>, M365Error> {
        let path = format!(
            "/users/{}?$select=id,userPrincipalName,displayName,mail",
            pct(id_or_upn)
        );
        self.get_optional("users.get", &path).await
    }

    /// One harmless read of a mailbox as the app. `ErrorAccessDenied` (by code) is `Denied`;
    /// anything else that fails is an error.
    pub async fn probe_mailbox(
        &self,
        user: &str,
        probe: MailboxProbe,
    ) -> Result<ProbeOutcome, M365Error> {
        match self
            .get_json::<Value>(probe.operation(), &probe.path(user))
            .await
        {
            Ok(_) => Ok(ProbeOutcome::Allowed),
            Err(e) if *e.kind() == ErrorKind::MailboxAccessDenied => Ok(ProbeOutcome::Denied {
                message: e.remote_message().map(str::to_string),
            }),
            Err(e) => Err(e),
        }
    }

    // ----- app roles -----

    /// The resource's service principal (id and app roles), cached per tenant.
    pub async fn resource_service_principal(
        &self,
        resource_app_id: &str,
    ) -> Result<ServicePrincipal, M365Error> {
        self.app_roles.resource_sp(self, resource_app_id).await
    }

    /// Resolve an application permission name (e.g. `Mail.Read`) to its app role id from the
    /// resource's `appRoles`, falling back to the reference's well-known ids.
    pub async fn resolve_app_role(
        &self,
        resource_app_id: &str,
        value: &str,
    ) -> Result<ResolvedAppRole, M365Error> {
        self.app_roles.resolve(self, resource_app_id, value).await
    }

    pub(crate) fn tenant_id(&self) -> &str {
        &self.ctx.tenant_id
    }
}

/// Classify a non-2xx Graph answer by `error.code` (then status).
pub(crate) fn classify_graph(resp: &RawResponse, service: Service, op: &str) -> M365Error {
    let v: Option<Value> = serde_json::from_slice(&resp.body).ok();
    let err = v.as_ref().and_then(|v| v.get("error"));
    let code = err
        .and_then(|e| e.get("code"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let message = err.and_then(|e| e.get("message")).and_then(Value::as_str);
    // `details[]` names the precise reason where Entra sends one (e.g. `NoBackingApplicationObject`
    // under a generic `Request_BadRequest`): it becomes the remote code kept for support.
    let detail_code = err
        .and_then(|e| e.get("details"))
        .and_then(Value::as_array)
        .and_then(|d| d.iter().find_map(|x| x.get("code").and_then(Value::as_str)))
        .filter(|c| !c.is_empty());
    let inner_request_id = err
        .and_then(|e| e.get("innerError").or_else(|| e.get("innererror")))
        .and_then(|i| i.get("request-id"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let retry_after = resp.retry_after();
    let status = resp.status;
    let lc = code.to_ascii_lowercase();
    let kind = if status == 429 || lc == "toomanyrequests" || lc == "activitylimitreached" {
        ErrorKind::Throttled { retry_after }
    } else if code == "ErrorAccessDenied" {
        ErrorKind::MailboxAccessDenied
    } else if status == 401 {
        ErrorKind::TokenRejected
    } else if status == 404
        || matches!(
            lc.as_str(),
            "request_resourcenotfound"
                | "resourcenotfound"
                | "itemnotfound"
                | "erroritemnotfound"
                | "errorinvaliduser"
                | "mailboxnotenabledforrestapi"
        )
    {
        ErrorKind::NotFound
    } else if status == 409 || lc == "request_multipleobjectswithsamekeyvalue" || lc == "conflict" {
        ErrorKind::AlreadyExists
    } else if status == 403 {
        ErrorKind::GraphPermissionMissing
    } else if status == 400 || status == 422 {
        ErrorKind::InvalidParameter
    } else if status == 408 || status >= 500 {
        ErrorKind::Transient
    } else {
        ErrorKind::Protocol
    };
    let mut e = M365Error::new(kind, service, op)
        .with_status(status)
        .with_remote_code(detail_code.unwrap_or(code))
        .with_request_id(resp.request_id().or(inner_request_id))
        .with_retry_after_hint(retry_after);
    if let Some(m) = message {
        e = e.with_message(m);
    }
    e
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is fine in tests (developers' guide)
mod tests {
    use super::*;

    fn raw(status: u16, body: &str) -> RawResponse {
        RawResponse {
            status,
            headers: Default::default(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn access_denied_is_recognised_by_code_not_message() {
        for msg in [
            "Access to OData is disabled.",
            "Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy settings.",
            "anything",
        ] {
            let body = json!({"error":{"code":"ErrorAccessDenied","message":msg,"innerError":{"request-id":"r1"}}}).to_string();
            let e = classify_graph(&raw(403, &body), Service::Graph, "probe");
            assert_eq!(*e.kind(), ErrorKind::MailboxAccessDenied);
            assert_eq!(e.request_id(), Some("r1"));
        }
        // Same message, other code: not a mailbox denial.
        let body = json!({"error":{"code":"Authorization_RequestDenied","message":"Access to OData is disabled."}}).to_string();
        assert_eq!(
            *classify_graph(&raw(403, &body), Service::Graph, "x").kind(),
            ErrorKind::GraphPermissionMissing
        );
    }

    #[test]
    fn status_and_code_mapping() {
        let e = classify_graph(
            &raw(
                404,
                r#"{"error":{"code":"Request_ResourceNotFound","message":"x"}}"#,
            ),
            Service::Graph,
            "x",
        );
        assert!(e.is_not_found());
        let e = classify_graph(
            &raw(
                400,
                r#"{"error":{"code":"Request_BadRequest","message":"x"}}"#,
            ),
            Service::Graph,
            "x",
        );
        assert_eq!(*e.kind(), ErrorKind::InvalidParameter);
        let e = classify_graph(&raw(503, "<html>"), Service::Graph, "x");
        assert_eq!(*e.kind(), ErrorKind::Transient);
        let e = classify_graph(
            &raw(401, r#"{"error":{"code":"InvalidAuthenticationToken"}}"#),
            Service::Graph,
            "x",
        );
        assert_eq!(*e.kind(), ErrorKind::TokenRejected);
    }

    #[test]
    fn details_code_is_kept_and_request_id_is_microsofts() {
        let body = json!({"error":{"code":"Request_BadRequest","message":"The appId 'x' of the service principal does not reference a valid application object.",
            "details":[{"code":"NoBackingApplicationObject","message":"…","target":"appId"}],
            "innerError":{"request-id":"ms-1","client-request-id":"ours-1"}}}).to_string();
        let mut r = raw(400, &body);
        r.headers
            .insert("client-request-id", "ours-1".parse().unwrap());
        let e = classify_graph(&r, Service::Graph, "service_principals.create");
        assert_eq!(e.remote_code(), Some(NO_BACKING_APPLICATION));
        assert_eq!(*e.kind(), ErrorKind::InvalidParameter);
        assert_eq!(e.request_id(), Some("ms-1"));
    }

    #[test]
    fn encoding_helpers() {
        assert_eq!(pct("a b/c#EXT#d@e.f"), "a%20b%2Fc%23EXT%23d@e.f");
        assert_eq!(odata_str("o'brien"), "o''brien");
    }
}
