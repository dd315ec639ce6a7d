//! `/v1/tenants/{tenant_id}/applications`: the third party's app registration in Entra ID, its
//! service principal, the admin consent of its application permissions, and its client secrets.
//!
//! A registration is either **created** by mailscope (and deleted by it) or **adopted** (recorded
//! only; DELETE forgets it and removes only the secrets mailscope added). Creating is crash-safe:
//! the intent is committed before Microsoft is asked, the new registration carries the tag
//! `mailscope:<key>`, and a retry finds it by that tag instead of creating a second one. Every
//! step after that looks before it creates (service principal by app id, consent by listing the
//! assignments), all under an advisory lock on (tenant, key), so concurrent identical PUTs make one
//! registration. Secret texts pass through once, in the answer to the POST, and are never stored.
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::idempotency::ReplayBody;
use super::problem::{ApiError, Problem};
use super::{AppState, page_limit};
use crate::auth::{Caller, Role};
use crate::provisioning::Change;
use crate::provisioning::applications::{self as use_case, Details, Request, SecretRequest};
use crate::store;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/tenants/{tenant_id}/applications").route(web::get().to(list_applications)),
    )
    .service(
        web::resource("/tenants/{tenant_id}/applications/{key}")
            .route(web::put().to(put_application))
            .route(web::get().to(get_application))
            .route(web::delete().to(delete_application)),
    )
    .service(
        web::resource("/tenants/{tenant_id}/applications/{key}/secrets")
            .route(web::post().to(add_secret))
            .route(web::get().to(list_secrets)),
    )
    .service(
        web::resource("/tenants/{tenant_id}/applications/{key}/secrets/{key_id}")
            .route(web::delete().to(delete_secret)),
    );
}

/// Create a registration (`display_name`, `permissions`, `grant_admin_consent`) or adopt an
/// existing one (`app_id`). `allow_unscoped_permissions` goes with either.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplicationInput {
    /// Create: the registration's display name.
    #[schema(example = "Contoso CRM connector")]
    pub display_name: Option<String>,
    /// Create: application permissions by name, e.g. `Mail.Send` (Microsoft Graph) or
    /// `full_access_as_app` (Exchange Online). The whole desired set: a later PUT with fewer
    /// removes the others from the registration and, with consent, revokes them.
    #[schema(example = json!(["Mail.Read", "Mail.Send"]))]
    pub permissions: Option<Vec<String>>,
    /// Create: grant admin consent (app role assignments) for exactly these permissions. Default
    /// `false`: the permissions are only requested.
    pub grant_admin_consent: Option<bool>,
    /// Accept permissions that application access policies do not restrict (e.g. `User.Read.All`,
    /// `Files.Read.All`): the app would reach them tenant-wide. Default `false`: refused with 422.
    pub allow_unscoped_permissions: Option<bool>,
    /// Adopt: the client id of an app already in the tenant (its registration, or the service
    /// principal of a multi-tenant app registered elsewhere).
    #[schema(value_type = Option<String>, format = Uuid, example = "b9701c1e-1364-464d-93e4-01ae925e8d6c")]
    pub app_id: Option<String>,
}

/// Whether an application permission is granted (an app role assignment exists).
#[derive(Serialize, ToSchema, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum ConsentState {
    Granted,
    NotGranted,
    /// The registration is still being created; nothing was read from the tenant.
    Unknown,
}

#[derive(Serialize, ToSchema)]
pub struct PermissionView {
    /// The permission's name, or its app role id when the resource does not name it.
    #[schema(example = "Mail.Send")]
    pub name: String,
    #[schema(example = "00000003-0000-0000-c000-000000000000")]
    pub resource_app_id: Option<String>,
    #[schema(example = "b633e1c5-b582-4048-a93e-9f11b44c7e96")]
    pub app_role_id: Option<String>,
    /// Listed in the registration's `requiredResourceAccess`.
    pub requested: bool,
    /// Read from the service principal's app role assignments.
    pub consent: ConsentState,
    /// False for permissions no application access policy restricts: they reach the whole tenant.
    pub covered_by_access_policies: bool,
}

#[derive(Serialize, ToSchema, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum SecretStatus {
    Current,
    /// Ends within `provisioning.secret_expiring_soon_days`.
    ExpiringSoon,
    Expired,
}

/// A client secret's metadata (Microsoft never shows the text again after creating it).
#[derive(Serialize, ToSchema)]
pub struct SecretView {
    pub key_id: Uuid,
    pub display_name: Option<String>,
    /// The secret's first three characters, as Microsoft shows them.
    #[schema(example = "Abc")]
    pub hint: Option<String>,
    pub start_date_time: Option<DateTime<Utc>>,
    pub end_date_time: Option<DateTime<Utc>>,
    pub status: SecretStatus,
    /// Added through mailscope (removed by DELETE of the application even when it was adopted).
    pub created_by_mailscope: bool,
}

/// A secret just made: the text is in this answer and nowhere else.
#[derive(Serialize, ToSchema)]
pub struct NewSecret {
    #[serde(flatten)]
    pub secret: SecretView,
    /// Shown once. Store it in the third party's vault now; mailscope keeps no copy, and a replay
    /// of the request (same Idempotency-Key) answers without it.
    #[schema(format = Password, example = "Abc8Q~xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_text: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct SecretList {
    pub items: Vec<SecretView>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"display_name": "crm-2025-q3", "lifetime_days": 90}))]
pub struct SecretInput {
    pub display_name: String,
    /// 1 to `provisioning.max_secret_lifetime_days` (default 180).
    pub lifetime_days: i64,
}

/// `creating` (the intent is recorded; a PUT completes it) or `ready`.
#[derive(Serialize, ToSchema)]
pub struct ApplicationView {
    #[schema(example = "contoso-crm")]
    pub key: String,
    #[schema(value_type = super::schema::ApplicationState, example = "ready")]
    pub state: String,
    /// `created` (DELETE removes it from the tenant) or `adopted` (DELETE only forgets it).
    #[schema(value_type = super::schema::ApplicationOrigin, example = "created")]
    pub origin: String,
    /// Client id.
    pub app_id: Option<Uuid>,
    /// Object id of the app registration (absent for a multi-tenant app registered elsewhere).
    pub application_object_id: Option<Uuid>,
    /// Object id of the enterprise app (what Exchange `New-ServicePrincipal -ObjectId` takes).
    pub service_principal_object_id: Option<Uuid>,
    pub display_name: String,
    pub permissions: Vec<PermissionView>,
    /// Names of granted or requested permissions that no application access policy restricts.
    pub unscoped_permissions: Vec<String>,
    pub secrets: Vec<SecretView>,
    /// The application access policies mailscope manages for this app.
    pub policies: Vec<crate::api::access_policies::AccessPolicy>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A list entry: what mailscope recorded, without reading the tenant.
#[derive(Serialize, ToSchema)]
pub struct ApplicationSummary {
    pub key: String,
    #[schema(value_type = super::schema::ApplicationState)]
    pub state: String,
    #[schema(value_type = super::schema::ApplicationOrigin)]
    pub origin: String,
    pub app_id: Option<Uuid>,
    pub display_name: String,
    /// Requested (created) or found granted when adopted.
    pub permissions: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct ApplicationList {
    pub items: Vec<ApplicationSummary>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next_after: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Page size, 1–500 (default 50).
    pub limit: Option<i64>,
    /// Cursor: the `next_after` of the previous page.
    pub after: Option<String>,
}

impl From<use_case::Consent> for ConsentState {
    fn from(c: use_case::Consent) -> Self {
        match c {
            use_case::Consent::Granted => ConsentState::Granted,
            use_case::Consent::NotGranted => ConsentState::NotGranted,
            use_case::Consent::Unknown => ConsentState::Unknown,
        }
    }
}

impl From<use_case::SecretStatus> for SecretStatus {
    fn from(s: use_case::SecretStatus) -> Self {
        match s {
            use_case::SecretStatus::Current => SecretStatus::Current,
            use_case::SecretStatus::ExpiringSoon => SecretStatus::ExpiringSoon,
            use_case::SecretStatus::Expired => SecretStatus::Expired,
        }
    }
}

pub(crate) fn secret_view(s: use_case::Secret) -> SecretView {
    SecretView {
        key_id: s.key_id,
        display_name: s.display_name,
        hint: s.hint,
        start_date_time: s.start_date_time,
        end_date_time: s.end_date_time,
        status: s.status.into(),
        created_by_mailscope: s.created_by_mailscope,
    }
}

fn view(d: Details) -> ApplicationView {
    let r = d.record;
    ApplicationView {
        key: r.key,
        state: r.state,
        origin: r.origin,
        app_id: r.app_id,
        application_object_id: r.application_object_id,
        service_principal_object_id: r.service_principal_object_id,
        display_name: r.display_name,
        permissions: d
            .permissions
            .into_iter()
            .map(|p| PermissionView {
                name: p.name,
                resource_app_id: p.resource_app_id,
                app_role_id: p.app_role_id,
                requested: p.requested,
                consent: p.consent.into(),
                covered_by_access_policies: p.covered_by_access_policies,
            })
            .collect(),
        unscoped_permissions: d.unscoped_permissions,
        secrets: d.secrets.into_iter().map(secret_view).collect(),
        policies: d
            .policies
            .into_iter()
            .map(crate::api::access_policies::view)
            .collect(),
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

/// Create or adopt a registration, or bring a created one to the requested state.
///
/// Create (`display_name`, `permissions`, `grant_admin_consent`): the registration (tagged
/// `mailscope:<key>`), its service principal and, with consent, exactly the listed app role
/// assignments (missing ones granted, others revoked). Adopt (`app_id`): records an app already in
/// the tenant without changing it. Idempotent by (tenant, key): repeating the request changes
/// nothing, and a retry after a crash finds the registration it had created instead of making a
/// second one. The answer is read back from the tenant.
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/applications/{key}", tag = "applications",
    params(
        ("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
        ("key" = String, Path, description = "Your name for the app: lowercase letters, digits and `-`, e.g. a vendor slug"),
    ),
    request_body(content = ApplicationInput, examples(
        ("create" = (summary = "Create a registration with admin consent", value = json!({
            "display_name": "Contoso CRM connector",
            "permissions": ["Mail.Read", "Mail.Send"],
            "grant_admin_consent": true
        }))),
        ("adopt" = (summary = "Adopt an app already in the tenant", value = json!({
            "app_id": "b9701c1e-1364-464d-93e4-01ae925e8d6c"
        }))),
        ("unscoped" = (summary = "Accept a tenant-wide permission explicitly", value = json!({
            "display_name": "Directory-aware CRM",
            "permissions": ["Mail.Read", "User.Read.All"],
            "grant_admin_consent": true,
            "allow_unscoped_permissions": true
        }))),
    )),
    responses(
        (status = 201, description = "created or adopted", body = ApplicationView),
        (status = 200, description = "updated, or already as requested", body = ApplicationView),
        (status = 400, description = "malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the key names another app, or was adopted (mailscope does not change adopted apps), or admin consent to a mailbox permission of an app restricted by RBAC for Applications, which would bypass its scope (`rbac_union_trap`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid content; a permission no access policy restricts without `allow_unscoped_permissions`; an app not in the tenant", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft refused or failed (cause and fix in `detail`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "database unavailable, or Microsoft throttled (see Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn put_application(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String)>,
    body: web::Json<ApplicationInput>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, key) = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let input = body.into_inner();
    let request = Request {
        display_name: input.display_name,
        permissions: input.permissions,
        grant_admin_consent: input.grant_admin_consent,
        allow_unscoped_permissions: input.allow_unscoped_permissions,
        app_id: input.app_id,
    };
    let actor = super::actor(&caller, &req);
    let ensured = use_case::put(&state, &actor, tenant_id, &key, request).await?;
    let view = view(ensured.value);
    Ok(match ensured.change {
        Change::Created | Change::Adopted => HttpResponse::Created().json(view),
        Change::Updated | Change::Unchanged => HttpResponse::Ok().json(view),
    })
}

/// One application: ids, permissions with their consent state (read from the tenant), and the
/// metadata of its secrets.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/applications/{key}", tag = "applications",
    params(
        ("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
        ("key" = String, Path, description = "The application's key"),
    ),
    responses(
        (status = 200, description = "the application", body = ApplicationView),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown tenant or application", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft refused or failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get_application(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String)>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let (tenant_id, key) = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let details = use_case::get(&state, tenant_id, &key).await?;
    Ok(HttpResponse::Ok().json(view(details)))
}

/// The applications mailscope manages in a tenant, ordered by key (from mailscope's records; the
/// tenant is not read).
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/applications", tag = "applications",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"), ListQuery),
    responses(
        (status = 200, description = "a page of applications", body = ApplicationList),
        (status = 400, description = "invalid query", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list_applications(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
    q: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let tenant_id = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let limit = page_limit(q.limit)?;
    let db = state.db().await?;
    super::require_registered(&db, tenant_id).await?;
    let rows = store::applications::list(&db, tenant_id, q.after.as_deref(), limit + 1).await?;
    let (rows, more) = super::split_page(rows, limit);
    let items: Vec<ApplicationSummary> = rows
        .into_iter()
        .map(|r| ApplicationSummary {
            key: r.key,
            state: r.state,
            origin: r.origin,
            app_id: r.app_id,
            display_name: r.display_name,
            permissions: r.permissions,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
        .collect();
    let next_after = super::next_cursor(&items, more, |a| a.key.clone());
    Ok(HttpResponse::Ok().json(ApplicationList { items, next_after }))
}

/// Delete what mailscope created, forget what it adopted.
///
/// A created registration is deleted from the tenant (with its service principal and consent). An
/// adopted one stays; only the secrets mailscope added to it are removed.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/applications/{key}", tag = "applications",
    params(
        ("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
        ("key" = String, Path, description = "The application's key"),
    ),
    responses(
        (status = 204, description = "deleted (created) or forgotten (adopted)"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown tenant or application", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft refused or failed; nothing was forgotten", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete_application(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String)>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, key) = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let actor = super::actor(&caller, &req);
    use_case::delete(&state, &actor, tenant_id, &key).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Add a client secret. The text is in this answer only: mailscope neither stores nor logs it,
/// and a replay (same Idempotency-Key) answers with the metadata alone.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/applications/{key}/secrets", tag = "applications",
    params(
        ("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
        ("key" = String, Path, description = "The application's key"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe: the same key replays the first answer (without the secret text) instead of adding a second secret"),
    ),
    request_body = SecretInput,
    responses(
        (status = 201, description = "the new secret, with its text (shown once)", body = NewSecret),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown tenant or application", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "still being created, or registered in another tenant", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid name or lifetime (over `provisioning.max_secret_lifetime_days`)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft refused or failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn add_secret(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String)>,
    body: web::Json<SecretInput>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, key) = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let input = body.into_inner();
    let request = SecretRequest {
        display_name: input.display_name,
        lifetime_days: input.lifetime_days,
    };
    let actor = super::actor(&caller, &req);
    let added = use_case::add_secret(&state, &actor, tenant_id, &key, request).await?;
    let mut answer = NewSecret {
        secret: secret_view(added.secret),
        secret_text: None,
    };
    // A replay of the request answers with the metadata alone.
    let replay = serde_json::to_vec(&answer).map_err(ApiError::internal)?;
    {
        use secrecy::ExposeSecret;
        answer.secret_text = Some(added.text.expose_secret().to_string());
    }
    let mut res = HttpResponse::Created().json(&answer);
    res.extensions_mut().insert(ReplayBody(replay));
    Ok(res)
}

/// The application's secrets (metadata only), read from the tenant, with their status.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/applications/{key}/secrets", tag = "applications",
    params(
        ("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
        ("key" = String, Path, description = "The application's key"),
    ),
    responses(
        (status = 200, description = "the secrets, soonest-ending first", body = SecretList),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown tenant or application", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft refused or failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list_secrets(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String)>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let (tenant_id, key) = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let secrets = use_case::secrets(&state, tenant_id, &key).await?;
    let items = secrets.into_iter().map(secret_view).collect();
    Ok(HttpResponse::Ok().json(SecretList { items }))
}

/// Remove a secret from the registration (apps using it stop signing in with it at once).
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/applications/{key}/secrets/{key_id}", tag = "applications",
    params(
        ("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
        ("key" = String, Path, description = "The application's key"),
        ("key_id" = Uuid, Path, description = "The secret's key id"),
    ),
    responses(
        (status = 204, description = "removed"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown tenant, application or secret", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "still being created, or registered in another tenant", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft refused or failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete_secret(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String, Uuid)>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, key, key_id) = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let actor = super::actor(&caller, &req);
    use_case::delete_secret(&state, &actor, tenant_id, &key, key_id).await?;
    Ok(HttpResponse::NoContent().finish())
}
