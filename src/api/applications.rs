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
use std::collections::{BTreeSet, HashMap};

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::audit::record as audit;
use super::idempotency::ReplayBody;
use super::problem::{ApiError, FieldError, Problem, ProblemKind};
use super::tenants::tenant_handle;
use super::{AppState, page_limit};
use crate::auth::{Caller, Role};
use crate::domain::permissions::{self, PermissionInfo};
use crate::m365::graph::{
    AppRoleAssignment, Application, NewApplication, RequiredResourceAccess, ResourceAccess,
    ServicePrincipal,
};
use crate::m365::{ErrorKind, GraphClient};
use crate::store::{self, applications::ApplicationRecord, applications::SecretRecord};

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
    #[schema(example = "b9701c1e-1364-464d-93e4-01ae925e8d6c")]
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
    #[schema(example = "ready")]
    pub state: String,
    /// `created` (DELETE removes it from the tenant) or `adopted` (DELETE only forgets it).
    #[schema(example = "created")]
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
    pub state: String,
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

/// The tag that finds a registration mailscope created for `key` again after a crash.
fn marker(key: &str) -> String {
    format!("mailscope:{key}")
}

/// A vendor slug: lowercase letters, digits and `-`, 1 to 63 characters.
fn is_key(key: &str) -> bool {
    let b = key.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn app_not_found(key: &str) -> ApiError {
    ApiError::not_found(format!("no application `{key}` in this tenant"))
}

fn lock_name(tenant_id: Uuid, key: &str) -> String {
    format!("{tenant_id}/{key}")
}

/// Queue behind other requests for this application in this process before taking a pooled
/// connection (see `api::locks`); the advisory lock taken afterwards covers other replicas.
async fn take_turn(
    state: &AppState,
    tenant_id: Uuid,
    key: &str,
) -> tokio::sync::OwnedMutexGuard<()> {
    state
        .key_locks
        .lock(format!("application:{}", lock_name(tenant_id, key)))
        .await
}

/// Graph object ids are GUIDs; anything else is a protocol surprise.
fn guid(s: &str) -> Result<Uuid, ApiError> {
    s.parse::<Uuid>()
        .map_err(|_| ApiError::internal(anyhow::anyhow!("Graph returned a non-GUID id `{s}`")))
}

fn sql_error(e: tokio_postgres::Error) -> ApiError {
    ApiError::from(store::StoreError::from(e))
}

pub fn secret_status(
    end: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    soon_days: u32,
) -> SecretStatus {
    match end {
        Some(end) if end <= now => SecretStatus::Expired,
        Some(end) if end - now < Duration::days(i64::from(soon_days)) => SecretStatus::ExpiringSoon,
        _ => SecretStatus::Current,
    }
}

fn parse_time(s: Option<&str>) -> Option<DateTime<Utc>> {
    s.and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|d| d.with_timezone(&Utc))
}

/// What a create-mode PUT asks for, validated.
struct CreateSpec {
    display_name: String,
    permissions: Vec<String>,
    grant_admin_consent: bool,
    allow_unscoped: bool,
}

enum Mode {
    Create(CreateSpec),
    Adopt { app_id: Uuid, allow_unscoped: bool },
}

fn validate(input: ApplicationInput) -> Result<Mode, ApiError> {
    let mut errs = Vec::new();
    let mut err = |field: &str, message: String| {
        errs.push(FieldError {
            field: field.into(),
            message,
        })
    };
    let allow_unscoped = input.allow_unscoped_permissions.unwrap_or(false);
    if let Some(app_id) = input.app_id {
        if input.display_name.is_some()
            || input.permissions.is_some()
            || input.grant_admin_consent.is_some()
        {
            err(
                "app_id",
                "give either `app_id` to adopt an existing app, or `display_name` and `permissions` to create one"
                    .into(),
            );
        }
        let parsed = app_id.trim().parse::<Uuid>();
        if parsed.is_err() {
            err("app_id", "must be the app's client id (a GUID)".into());
        }
        return match parsed {
            Ok(app_id) if errs.is_empty() => Ok(Mode::Adopt {
                app_id,
                allow_unscoped,
            }),
            _ => Err(ApiError::validation(errs)),
        };
    }
    let display_name = input.display_name.unwrap_or_default().trim().to_string();
    if display_name.is_empty() || display_name.chars().count() > 256 {
        err(
            "display_name",
            "must be 1 to 256 characters (or give `app_id` to adopt an existing app)".into(),
        );
    }
    let Some(requested) = input.permissions else {
        err(
            "permissions",
            "list the application permissions to request, e.g. [\"Mail.Send\"] (may be empty)"
                .into(),
        );
        return Err(ApiError::validation(errs));
    };
    if requested.len() > 50 {
        err("permissions", "at most 50 permissions".into());
    }
    let mut permissions: Vec<String> = Vec::new();
    for (i, p) in requested.iter().enumerate() {
        let p = p.trim();
        if !permissions::is_permission_name(p) {
            err(
                &format!("permissions[{i}]"),
                "must be a permission name such as Mail.Send".into(),
            );
        } else if !permissions.iter().any(|q| q == p) {
            permissions.push(p.to_string());
        }
    }
    if !allow_unscoped {
        for (i, p) in requested.iter().enumerate() {
            let p = p.trim();
            if permissions::is_permission_name(p)
                && !permissions::classify(p).covered_by_access_policies
            {
                err(
                    &format!("permissions[{i}]"),
                    format!(
                        "{p} is not restricted by application access policies: the app would reach it \
                         across the whole tenant, whatever mailboxes its policy allows. Remove it, or \
                         pass `allow_unscoped_permissions: true` to accept that"
                    ),
                );
            }
        }
    }
    if !errs.is_empty() {
        return Err(ApiError::validation(errs));
    }
    Ok(Mode::Create(CreateSpec {
        display_name,
        permissions,
        grant_admin_consent: input.grant_admin_consent.unwrap_or(false),
        allow_unscoped,
    }))
}

/// A permission resolved against the tenant: its resource and app role id.
#[derive(Clone)]
struct Resolved {
    name: String,
    info: PermissionInfo,
    app_role_id: String,
    /// Object id of the resource's service principal in this tenant (empty when not needed).
    resource_sp_id: String,
}

async fn resolve_permissions(
    graph: &GraphClient,
    names: &[String],
    need_resource_sp: bool,
) -> Result<Vec<Resolved>, ApiError> {
    let mut out = Vec::new();
    let mut errs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let info = permissions::classify(name);
        let resource_sp_id = if need_resource_sp {
            graph
                .resource_service_principal(info.resource_app_id)
                .await?
                .id
        } else {
            String::new()
        };
        match graph.resolve_app_role(info.resource_app_id, name).await {
            Ok(r) => out.push(Resolved {
                name: name.clone(),
                info,
                app_role_id: r.id.to_ascii_lowercase(),
                resource_sp_id,
            }),
            Err(e) if *e.kind() == ErrorKind::InvalidParameter || e.is_not_found() => {
                errs.push(FieldError {
                    field: format!("permissions[{i}]"),
                    message: format!(
                        "{name} is not an application permission of {} in this tenant (names are case-sensitive)",
                        if info.resource_app_id == permissions::EXCHANGE_RESOURCE {
                            "Office 365 Exchange Online"
                        } else {
                            "Microsoft Graph"
                        }
                    ),
                })
            }
            Err(e) => return Err(e.into()),
        }
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(ApiError::validation(errs))
    }
}

/// Names app roles by (resource service principal object id, app role id), reading each resource
/// service principal at most once per request (Graph and Exchange come from the connector's cache).
struct RoleNames<'g> {
    graph: &'g GraphClient,
    by_object_id: HashMap<String, Option<ServicePrincipal>>,
}

impl<'g> RoleNames<'g> {
    fn new(graph: &'g GraphClient) -> Self {
        RoleNames {
            graph,
            by_object_id: HashMap::new(),
        }
    }

    async fn resource(&mut self, object_id: &str) -> Result<Option<&ServicePrincipal>, ApiError> {
        let id = object_id.to_ascii_lowercase();
        if !self.by_object_id.contains_key(&id) {
            let mut found = None;
            for app in [permissions::GRAPH_RESOURCE, permissions::EXCHANGE_RESOURCE] {
                if let Ok(sp) = self.graph.resource_service_principal(app).await
                    && sp.id.eq_ignore_ascii_case(&id)
                {
                    found = Some(sp);
                }
            }
            if found.is_none() {
                found = self.graph.get_service_principal(object_id).await?;
            }
            self.by_object_id.insert(id.clone(), found);
        }
        Ok(self.by_object_id.get(&id).and_then(Option::as_ref))
    }

    /// (resource app id, permission name) of an assignment; the name falls back to the role id.
    async fn name(
        &mut self,
        resource_object_id: &str,
        app_role_id: &str,
    ) -> Result<(Option<String>, String), ApiError> {
        let sp = self.resource(resource_object_id).await?;
        let app_id = sp.map(|s| s.app_id.to_ascii_lowercase());
        let name = sp
            .and_then(|s| {
                s.app_roles
                    .iter()
                    .find(|r| r.id.eq_ignore_ascii_case(app_role_id))
            })
            .and_then(|r| r.value.clone())
            .unwrap_or_else(|| app_role_id.to_string());
        Ok((app_id, name))
    }
}

/// The `requiredResourceAccess` for these roles, keeping entries mailscope does not manage
/// (delegated `Scope` entries someone added).
fn desired_rra(
    existing: &[RequiredResourceAccess],
    roles: &[Resolved],
) -> Vec<RequiredResourceAccess> {
    let mut out: Vec<RequiredResourceAccess> = Vec::new();
    let mut push = |resource: &str, access: ResourceAccess| match out
        .iter_mut()
        .find(|r| r.resource_app_id.eq_ignore_ascii_case(resource))
    {
        Some(r) => r.resource_access.push(access),
        None => out.push(RequiredResourceAccess {
            resource_app_id: resource.to_string(),
            resource_access: vec![access],
        }),
    };
    for r in roles {
        push(
            r.info.resource_app_id,
            ResourceAccess {
                id: r.app_role_id.clone(),
                kind: "Role".into(),
            },
        );
    }
    for e in existing {
        for a in e.resource_access.iter().filter(|a| a.kind != "Role") {
            push(&e.resource_app_id, a.clone());
        }
    }
    out
}

fn rra_set(rra: &[RequiredResourceAccess]) -> BTreeSet<(String, String, String)> {
    rra.iter()
        .flat_map(|r| {
            r.resource_access.iter().map(|a| {
                (
                    r.resource_app_id.to_ascii_lowercase(),
                    a.id.to_ascii_lowercase(),
                    a.kind.clone(),
                )
            })
        })
        .collect()
}

/// Read the registration, its service principal's assignments and its secrets from the tenant.
async fn describe(
    state: &AppState,
    graph: &GraphClient,
    r: ApplicationRecord,
) -> Result<ApplicationView, ApiError> {
    let db = state.db().await?;
    let ours = store::applications::secrets(&db, r.tenant_id, &r.key).await?;
    let policies = match r.app_id {
        Some(app_id) => {
            store::access_policies::for_app(&db, r.tenant_id, &app_id.to_string()).await?
        }
        None => Vec::new(),
    };
    drop(db);
    let now = Utc::now();
    let soon = state.settings.provisioning.secret_expiring_soon_days;
    let mut view = ApplicationView {
        key: r.key.clone(),
        state: r.state.clone(),
        origin: r.origin.clone(),
        app_id: r.app_id,
        application_object_id: r.application_object_id,
        service_principal_object_id: r.service_principal_object_id,
        display_name: r.display_name.clone(),
        permissions: Vec::new(),
        unscoped_permissions: Vec::new(),
        secrets: Vec::new(),
        policies: policies
            .into_iter()
            .map(crate::api::access_policies::view)
            .collect(),
        created_at: r.created_at,
        updated_at: r.updated_at,
    };
    if r.state != "ready" {
        view.permissions = r
            .permissions
            .iter()
            .map(|p| {
                let info = permissions::classify(p);
                PermissionView {
                    name: p.clone(),
                    resource_app_id: Some(info.resource_app_id.to_string()),
                    app_role_id: None,
                    requested: true,
                    consent: ConsentState::Unknown,
                    covered_by_access_policies: info.covered_by_access_policies,
                }
            })
            .collect();
        view.unscoped_permissions = unscoped(&view.permissions);
        return Ok(view);
    }
    let app = match r.application_object_id {
        Some(id) => graph.get_application(&id.to_string()).await?,
        None => None,
    };
    let assignments = match r.service_principal_object_id {
        Some(id) => match graph.app_role_assignments(&id.to_string()).await {
            Ok(a) => a,
            Err(e) if e.is_not_found() => Vec::new(),
            Err(e) => return Err(e.into()),
        },
        None => Vec::new(),
    };
    let mut names = RoleNames::new(graph);
    // (resource app id, role id) → view
    let mut perms: Vec<PermissionView> = Vec::new();
    for a in &assignments {
        let (resource_app_id, name) = names.name(&a.resource_id, &a.app_role_id).await?;
        perms.push(PermissionView {
            covered_by_access_policies: resource_app_id.as_deref().is_some_and(|rid| {
                let info = permissions::classify(&name);
                info.resource_app_id == rid && info.covered_by_access_policies
            }),
            name,
            resource_app_id,
            app_role_id: Some(a.app_role_id.to_ascii_lowercase()),
            requested: false,
            consent: ConsentState::Granted,
        });
    }
    if let Some(app) = &app {
        for rra in &app.required_resource_access {
            let resource = rra.resource_app_id.to_ascii_lowercase();
            for access in rra.resource_access.iter().filter(|a| a.kind == "Role") {
                let role = access.id.to_ascii_lowercase();
                if let Some(p) = perms.iter_mut().find(|p| {
                    p.resource_app_id.as_deref() == Some(resource.as_str())
                        && p.app_role_id.as_deref() == Some(role.as_str())
                }) {
                    p.requested = true;
                    continue;
                }
                let sp = graph.resource_service_principal(&resource).await.ok();
                let name = sp
                    .as_ref()
                    .and_then(|s| {
                        s.app_roles
                            .iter()
                            .find(|x| x.id.eq_ignore_ascii_case(&role))
                    })
                    .and_then(|x| x.value.clone())
                    .unwrap_or_else(|| role.clone());
                let info = permissions::classify(&name);
                perms.push(PermissionView {
                    covered_by_access_policies: info.resource_app_id == resource
                        && info.covered_by_access_policies,
                    name,
                    resource_app_id: Some(resource.clone()),
                    app_role_id: Some(role),
                    requested: true,
                    consent: ConsentState::NotGranted,
                });
            }
        }
    }
    perms.sort_by(|a, b| a.name.cmp(&b.name));
    view.unscoped_permissions = unscoped(&perms);
    view.permissions = perms;
    if let Some(app) = &app {
        view.display_name = app.display_name.clone().unwrap_or(view.display_name);
        view.secrets = app
            .password_credentials
            .iter()
            .filter_map(|p| {
                let key_id = p.key_id.as_deref()?.parse::<Uuid>().ok()?;
                let end = parse_time(p.end_date_time.as_deref());
                Some(SecretView {
                    key_id,
                    display_name: p.display_name.clone(),
                    hint: p.hint.clone(),
                    start_date_time: parse_time(p.start_date_time.as_deref()),
                    end_date_time: end,
                    status: secret_status(end, now, soon),
                    created_by_mailscope: ours.iter().any(|s| s.key_id == key_id),
                })
            })
            .collect();
    }
    Ok(view)
}

fn unscoped(perms: &[PermissionView]) -> Vec<String> {
    perms
        .iter()
        .filter(|p| !p.covered_by_access_policies)
        .map(|p| p.name.clone())
        .collect()
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
        (status = 409, description = "the key names another app, or was adopted (mailscope does not change adopted apps)", body = Problem, content_type = "application/problem+json"),
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
    if !is_key(&key) {
        return Err(ApiError::validation(vec![FieldError {
            field: "key".into(),
            message: "must be 1 to 63 lowercase letters, digits or `-`, not starting with `-`"
                .into(),
        }]));
    }
    let mode = validate(body.into_inner())?;
    let (_, handle) = tenant_handle(&state, &caller, tenant_id).await?;
    let graph = handle.graph();
    let (record, created) = match mode {
        Mode::Create(spec) => {
            ensure_created(&req, &caller, &state, &graph, tenant_id, &key, spec).await?
        }
        Mode::Adopt {
            app_id,
            allow_unscoped,
        } => {
            adopt(
                &req,
                &caller,
                &state,
                &graph,
                tenant_id,
                &key,
                app_id,
                allow_unscoped,
            )
            .await?
        }
    };
    let view = describe(&state, &graph, record).await?;
    Ok(if created {
        HttpResponse::Created().json(view)
    } else {
        HttpResponse::Ok().json(view)
    })
}

/// The create path; returns the stored record and whether this call completed the creation.
async fn ensure_created(
    req: &HttpRequest,
    caller: &Caller,
    state: &AppState,
    graph: &GraphClient,
    tenant_id: Uuid,
    key: &str,
    spec: CreateSpec,
) -> Result<(ApplicationRecord, bool), ApiError> {
    // Resolve names before anything is recorded: an unknown permission is the caller's error.
    let roles = resolve_permissions(graph, &spec.permissions, spec.grant_admin_consent).await?;
    let mark = marker(key);
    let _turn = take_turn(state, tenant_id, key).await;
    let mut db = state.db().await?;
    // The intent, committed before Microsoft is asked to create anything.
    store::applications::insert_intent(
        &db,
        &ApplicationRecord {
            tenant_id,
            key: key.to_string(),
            state: "creating".into(),
            origin: "created".into(),
            marker: mark.clone(),
            app_id: None,
            application_object_id: None,
            service_principal_object_id: None,
            display_name: spec.display_name.clone(),
            permissions: spec.permissions.clone(),
            grant_admin_consent: spec.grant_admin_consent,
            allow_unscoped_permissions: spec.allow_unscoped,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        },
    )
    .await?;
    let tx = db.transaction().await.map_err(store::StoreError::from)?;
    // Held until commit, across the Graph calls: one writer per (tenant, key), on every replica.
    store::lock_key(&tx, "application", &lock_name(tenant_id, key)).await?;
    let Some(existing) = store::applications::get(&tx, tenant_id, key).await? else {
        // Deleted between the intent and the lock: the caller may simply retry.
        return Err(ApiError::conflict(format!(
            "application `{key}` was deleted while this request ran; retry it"
        )));
    };
    if existing.origin == "adopted" {
        return Err(ApiError::conflict(format!(
            "application `{key}` was adopted (app id {}); mailscope does not change adopted apps. \
             Send `{{\"app_id\": …}}` to refresh it, or use another key",
            existing.app_id.map(|a| a.to_string()).unwrap_or_default()
        )));
    }
    let was_creating = existing.state == "creating";

    // 1. The registration: by the recorded object id, else by its marker tag, else create it.
    let mut recovered = false;
    let mut created_in_tenant = false;
    let mut app: Option<Application> = match existing.application_object_id {
        Some(id) => graph.get_application(&id.to_string()).await?,
        None => None,
    };
    if app.is_none() {
        let filter = format!("tags/any(t:t eq '{}')", mark.replace('\'', "''"));
        let mut found = graph.find_applications(&filter).await?;
        match found.len() {
            0 => {}
            1 => {
                app = found.pop();
                recovered = existing.application_object_id.is_none();
            }
            _ => {
                return Err(ApiError::conflict(format!(
                    "{} registrations in the tenant carry the tag `{mark}` (object ids {}); delete the extra ones, then retry",
                    found.len(),
                    found
                        .iter()
                        .map(|a| a.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
    }
    let rra_wanted = desired_rra(
        app.as_ref()
            .map(|a| a.required_resource_access.as_slice())
            .unwrap_or_default(),
        &roles,
    );
    let mut changed: Vec<&str> = Vec::new();
    let app = match app {
        Some(a) => a,
        None => {
            created_in_tenant = true;
            graph
                .create_application(&NewApplication {
                    display_name: spec.display_name.clone(),
                    sign_in_audience: Some("AzureADMyOrg".into()),
                    required_resource_access: rra_wanted.clone(),
                    tags: vec![mark.clone()],
                })
                .await?
        }
    };
    let mut patch = serde_json::Map::new();
    if app.display_name.as_deref() != Some(spec.display_name.as_str()) {
        patch.insert("displayName".into(), json!(spec.display_name));
        changed.push("display_name");
    }
    if rra_set(&app.required_resource_access) != rra_set(&rra_wanted) {
        patch.insert("requiredResourceAccess".into(), json!(rra_wanted));
        changed.push("permissions");
    }
    if !patch.is_empty() {
        graph
            .update_application(&app.id, &serde_json::Value::Object(patch))
            .await?;
    }

    // 2. The service principal: by the recorded id, else by app id, else create it.
    let mut sp = match existing.service_principal_object_id {
        Some(id) => graph.get_service_principal(&id.to_string()).await?,
        None => None,
    }
    .filter(|sp| sp.app_id.eq_ignore_ascii_case(&app.app_id));
    if sp.is_none() {
        sp = graph.service_principal_by_app_id(&app.app_id).await?;
    }
    let sp = match sp {
        Some(sp) => sp,
        None => match graph.create_service_principal(&app.app_id).await {
            Ok(sp) => sp,
            Err(e) if *e.kind() == ErrorKind::AlreadyExists => graph
                .service_principal_by_app_id(&app.app_id)
                .await?
                .ok_or(e)?,
            Err(e) => return Err(e.into()),
        },
    };

    // 3. Consent: exactly the listed roles; post only the missing ones.
    let mut granted: Vec<String> = Vec::new();
    let mut revoked: Vec<String> = Vec::new();
    if spec.grant_admin_consent {
        let current: Vec<AppRoleAssignment> = graph.app_role_assignments(&sp.id).await?;
        for r in &roles {
            let held = current.iter().any(|a| {
                a.resource_id.eq_ignore_ascii_case(&r.resource_sp_id)
                    && a.app_role_id.eq_ignore_ascii_case(&r.app_role_id)
            });
            if !held {
                graph
                    .grant_app_role(&r.resource_sp_id, &sp.id, &r.app_role_id)
                    .await?;
                granted.push(r.name.clone());
            }
        }
        let mut names = RoleNames::new(graph);
        for a in &current {
            let wanted = roles.iter().any(|r| {
                a.resource_id.eq_ignore_ascii_case(&r.resource_sp_id)
                    && a.app_role_id.eq_ignore_ascii_case(&r.app_role_id)
            });
            if !wanted {
                graph.revoke_app_role(&a.resource_id, &a.id).await?;
                revoked.push(names.name(&a.resource_id, &a.app_role_id).await?.1);
            }
        }
    }
    if !granted.is_empty() || !revoked.is_empty() {
        changed.push("consent");
    }
    if (existing.grant_admin_consent != spec.grant_admin_consent
        || existing.allow_unscoped_permissions != spec.allow_unscoped
        || existing.permissions != spec.permissions)
        && !changed.contains(&"permissions")
    {
        changed.push("permissions");
    }

    let record = ApplicationRecord {
        state: "ready".into(),
        app_id: Some(guid(&app.app_id)?),
        application_object_id: Some(guid(&app.id)?),
        service_principal_object_id: Some(guid(&sp.id)?),
        display_name: spec.display_name.clone(),
        permissions: spec.permissions.clone(),
        grant_admin_consent: spec.grant_admin_consent,
        allow_unscoped_permissions: spec.allow_unscoped,
        ..existing.clone()
    };
    if !was_creating && changed.is_empty() && record == existing {
        tx.commit().await.map_err(store::StoreError::from)?;
        return Ok((existing, false));
    }
    let stored = match store::applications::save(&tx, &record).await {
        Ok(s) => s,
        Err(e) if store::sqlstate(&e) == Some("23505") => {
            return Err(ApiError::conflict(format!(
                "app {} is already recorded under another key in this tenant",
                app.app_id
            )));
        }
        Err(e) => return Err(sql_error(e)),
    };
    let action = if was_creating {
        "application.created"
    } else {
        "application.updated"
    };
    audit(
        &tx,
        caller,
        req,
        tenant_id,
        action,
        &format!("application/{key}"),
        json!({
            "app_id": app.app_id,
            "application_object_id": app.id,
            "service_principal_object_id": sp.id,
            "origin": "created",
            "created_in_tenant": created_in_tenant,
            "recovered_by_marker": recovered,
            "permissions": spec.permissions,
            "granted": granted,
            "revoked": revoked,
            "changed": changed,
        }),
    )
    .await?;
    tx.commit().await.map_err(store::StoreError::from)?;
    Ok((stored, was_creating))
}

#[allow(clippy::too_many_arguments)]
async fn adopt(
    req: &HttpRequest,
    caller: &Caller,
    state: &AppState,
    graph: &GraphClient,
    tenant_id: Uuid,
    key: &str,
    app_id: Uuid,
    allow_unscoped: bool,
) -> Result<(ApplicationRecord, bool), ApiError> {
    let _turn = take_turn(state, tenant_id, key).await;
    let mut db = state.db().await?;
    let tx = db.transaction().await.map_err(store::StoreError::from)?;
    store::lock_key(&tx, "application", &lock_name(tenant_id, key)).await?;
    if let Some(existing) = store::applications::get(&tx, tenant_id, key).await? {
        if existing.state == "ready" && existing.app_id == Some(app_id) {
            tx.commit().await.map_err(store::StoreError::from)?;
            return Ok((existing, false));
        }
        return Err(ApiError::conflict(match existing.app_id {
            Some(other) => format!(
                "application `{key}` is app {other}, not {app_id}; use another key, or DELETE `{key}` first"
            ),
            None => format!(
                "application `{key}` is being created; repeat its create request to finish it, or DELETE it first"
            ),
        }));
    }
    if let Some(other) = store::applications::key_of_app(&tx, tenant_id, app_id).await? {
        return Err(ApiError::conflict(format!(
            "app {app_id} is already recorded as application `{other}` in this tenant"
        )));
    }
    let app = graph.application_by_app_id(&app_id.to_string()).await?;
    let sp = graph
        .service_principal_by_app_id(&app_id.to_string())
        .await?;
    let sp = match (&app, sp) {
        (_, Some(sp)) => sp,
        (Some(_), None) => {
            return Err(ApiError::validation(vec![FieldError {
                field: "app_id".into(),
                message: format!(
                    "app {app_id} is registered but has no service principal (enterprise app) in this tenant, \
                     so it can neither sign in nor be granted permissions. Create it (Entra admin center → \
                     Enterprise applications, or grant admin consent), then adopt it"
                ),
            }]));
        }
        (None, None) => {
            return Err(ApiError::validation(vec![FieldError {
                field: "app_id".into(),
                message: format!(
                    "no app with client id {app_id} in this tenant: check the id (the Application (client) ID, \
                     not an object id), or have an admin consent to the vendor's app first"
                ),
            }]));
        }
    };
    let assignments = graph.app_role_assignments(&sp.id).await?;
    let mut names = RoleNames::new(graph);
    let mut granted: Vec<String> = Vec::new();
    let mut tenant_wide: Vec<String> = Vec::new();
    for a in &assignments {
        let (resource, name) = names.name(&a.resource_id, &a.app_role_id).await?;
        let info = permissions::classify(&name);
        if !(resource.as_deref() == Some(info.resource_app_id) && info.covered_by_access_policies) {
            tenant_wide.push(name.clone());
        }
        if !granted.contains(&name) {
            granted.push(name);
        }
    }
    if !tenant_wide.is_empty() && !allow_unscoped {
        return Err(ApiError::validation(vec![FieldError {
            field: "app_id".into(),
            message: format!(
                "app {app_id} holds {} which application access policies do not restrict: it reaches \
                 that data across the whole tenant whatever its policy allows. Revoke them, or pass \
                 `allow_unscoped_permissions: true` to adopt it anyway",
                tenant_wide.join(", ")
            ),
        }]));
    }
    let record = ApplicationRecord {
        tenant_id,
        key: key.to_string(),
        state: "ready".into(),
        origin: "adopted".into(),
        marker: marker(key),
        app_id: Some(app_id),
        application_object_id: app.as_ref().map(|a| guid(&a.id)).transpose()?,
        service_principal_object_id: Some(guid(&sp.id)?),
        display_name: app
            .as_ref()
            .and_then(|a| a.display_name.clone())
            .or(sp.display_name.clone())
            .unwrap_or_default(),
        permissions: granted.clone(),
        grant_admin_consent: false,
        allow_unscoped_permissions: allow_unscoped,
        created_at: Utc::now(),
        updated_at: Utc::now(),
    };
    let stored = match store::applications::save(&tx, &record).await {
        Ok(s) => s,
        Err(e) if store::sqlstate(&e) == Some("23505") => {
            return Err(ApiError::conflict(format!(
                "app {app_id} is already recorded under another key in this tenant"
            )));
        }
        Err(e) => return Err(sql_error(e)),
    };
    audit(
        &tx,
        caller,
        req,
        tenant_id,
        "application.adopted",
        &format!("application/{key}"),
        json!({
            "app_id": app_id,
            "application_object_id": app.as_ref().map(|a| a.id.clone()),
            "service_principal_object_id": sp.id,
            "origin": "adopted",
            "permissions": granted,
            "unscoped_permissions": tenant_wide,
        }),
    )
    .await?;
    tx.commit().await.map_err(store::StoreError::from)?;
    Ok((stored, true))
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
    let (_, handle) = tenant_handle(&state, &caller, tenant_id).await?;
    let db = state.db().await?;
    let record = store::applications::get(&db, tenant_id, &key)
        .await?
        .ok_or_else(|| app_not_found(&key))?;
    drop(db);
    let view = describe(&state, &handle.graph(), record).await?;
    Ok(HttpResponse::Ok().json(view))
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
    let next_after = if more {
        items.last().map(|a| a.key.clone())
    } else {
        None
    };
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
    let (_, handle) = tenant_handle(&state, &caller, tenant_id).await?;
    let graph = handle.graph();
    let _turn = take_turn(&state, tenant_id, &key).await;
    let mut db = state.db().await?;
    let tx = db.transaction().await.map_err(store::StoreError::from)?;
    store::lock_key(&tx, "application", &lock_name(tenant_id, &key)).await?;
    let record = store::applications::get(&tx, tenant_id, &key)
        .await?
        .ok_or_else(|| app_not_found(&key))?;
    if let Some(app_id) = record.app_id {
        // Deleting or forgetting an app must not strand its policies: a forgotten app keeps
        // access, and removing its last RestrictAccess policy is a decision of its own.
        let policies = store::access_policies::for_app(&tx, tenant_id, &app_id.to_string()).await?;
        if !policies.is_empty() {
            let ids: Vec<String> = policies.iter().map(|p| p.id.to_string()).collect();
            return Err(ApiError::new(
                ProblemKind::ApplicationHasPolicies,
                format!(
                    "application `{key}` still has {} access polic{} ({}); delete them first with \
                     DELETE /v1/tenants/{tenant_id}/access-policies/{{id}} (the last RestrictAccess \
                     policy needs ?allow_unrestricted=true)",
                    ids.len(),
                    if ids.len() == 1 { "y" } else { "ies" },
                    ids.join(", ")
                ),
            ));
        }
    }
    let mut deleted_in_tenant: Vec<String> = Vec::new();
    let mut removed_secrets: Vec<Uuid> = Vec::new();
    if record.origin == "created" {
        let mut objects: Vec<String> = record
            .application_object_id
            .map(|id| vec![id.to_string()])
            .unwrap_or_default();
        if objects.is_empty() {
            // Interrupted creation: whatever carries the marker is ours.
            let filter = format!("tags/any(t:t eq '{}')", record.marker.replace('\'', "''"));
            objects = graph
                .find_applications(&filter)
                .await?
                .into_iter()
                .map(|a| a.id)
                .collect();
        }
        for id in objects {
            // Deleting the registration deletes its service principal and consent with it.
            if graph.delete_application(&id).await? {
                deleted_in_tenant.push(id);
            }
        }
    } else if let Some(obj) = record.application_object_id {
        for s in store::applications::secrets(&tx, tenant_id, &key).await? {
            match graph
                .remove_password(&obj.to_string(), &s.key_id.to_string())
                .await
            {
                Ok(()) => removed_secrets.push(s.key_id),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    store::applications::delete(&tx, tenant_id, &key).await?;
    audit(
        &tx,
        &caller,
        &req,
        tenant_id,
        "application.deleted",
        &format!("application/{key}"),
        json!({
            "app_id": record.app_id,
            "origin": record.origin,
            "deleted_in_tenant": deleted_in_tenant,
            "removed_secrets": removed_secrets,
        }),
    )
    .await?;
    tx.commit().await.map_err(store::StoreError::from)?;
    Ok(HttpResponse::NoContent().finish())
}

/// The record of a ready application with a registration in this tenant (secrets live there).
async fn registration(
    c: &impl deadpool_postgres::GenericClient,
    tenant_id: Uuid,
    key: &str,
) -> Result<(ApplicationRecord, Uuid), ApiError> {
    let record = store::applications::get(c, tenant_id, key)
        .await?
        .ok_or_else(|| app_not_found(key))?;
    if record.state != "ready" {
        return Err(ApiError::conflict(format!(
            "application `{key}` is still being created; repeat its PUT to finish it"
        )));
    }
    let Some(obj) = record.application_object_id else {
        return Err(ApiError::conflict(format!(
            "application `{key}` is registered in its publisher's tenant, not this one: its secrets \
             are managed by the publisher"
        )));
    };
    Ok((record, obj))
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
    let max = state.settings.provisioning.max_secret_lifetime_days;
    let mut errs = Vec::new();
    let name = input.display_name.trim().to_string();
    if name.is_empty() || name.chars().count() > 256 {
        errs.push(FieldError {
            field: "display_name".into(),
            message: "must be 1 to 256 characters".into(),
        });
    }
    if !(1..=i64::from(max)).contains(&input.lifetime_days) {
        errs.push(FieldError {
            field: "lifetime_days".into(),
            message: format!(
                "must be between 1 and {max} days (provisioning.max_secret_lifetime_days)"
            ),
        });
    }
    if !errs.is_empty() {
        return Err(ApiError::validation(errs));
    }
    let (_, handle) = tenant_handle(&state, &caller, tenant_id).await?;
    let graph = handle.graph();
    let _turn = take_turn(&state, tenant_id, &key).await;
    let mut db = state.db().await?;
    let tx = db.transaction().await.map_err(store::StoreError::from)?;
    store::lock_key(&tx, "application", &lock_name(tenant_id, &key)).await?;
    let (_, obj) = registration(&tx, tenant_id, &key).await?;
    let end = Utc::now() + Duration::days(input.lifetime_days);
    let end_text = end.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let added = graph
        .add_password(&obj.to_string(), &name, Some(&end_text))
        .await?;
    let meta = SecretRecord {
        key_id: guid(&added.key_id)?,
        display_name: added.display_name.clone().unwrap_or(name),
        hint: added.hint.clone().filter(|h| h.chars().count() <= 3),
        start_date_time: parse_time(added.start_date_time.as_deref()).unwrap_or_else(Utc::now),
        end_date_time: parse_time(added.end_date_time.as_deref()).unwrap_or(end),
        created_at: Utc::now(),
    };
    let saved: Result<(), ApiError> = async {
        store::applications::insert_secret(&tx, tenant_id, &key, &meta).await?;
        audit(
            &tx,
            &caller,
            &req,
            tenant_id,
            "application.secret_added",
            &format!("application/{key}"),
            json!({
                "key_id": meta.key_id,
                "display_name": meta.display_name,
                "end_date_time": meta.end_date_time,
            }),
        )
        .await?;
        tx.commit().await.map_err(store::StoreError::from)?;
        Ok(())
    }
    .await;
    if let Err(e) = saved {
        // Nobody will ever see this secret: take it back rather than leave an unknown credential.
        if let Err(undo) = graph.remove_password(&obj.to_string(), &added.key_id).await {
            tracing::warn!(key_id = %added.key_id, error = %undo, "could not remove a secret whose record failed");
        }
        return Err(e);
    }
    let view = SecretView {
        key_id: meta.key_id,
        display_name: Some(meta.display_name),
        hint: meta.hint,
        start_date_time: Some(meta.start_date_time),
        end_date_time: Some(meta.end_date_time),
        status: secret_status(
            Some(meta.end_date_time),
            Utc::now(),
            state.settings.provisioning.secret_expiring_soon_days,
        ),
        created_by_mailscope: true,
    };
    let mut answer = NewSecret {
        secret: view,
        secret_text: None,
    };
    let replay = serde_json::to_vec(&answer).map_err(ApiError::internal)?;
    {
        use secrecy::ExposeSecret;
        answer.secret_text = Some(added.secret_text.expose_secret().to_string());
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
    let (_, handle) = tenant_handle(&state, &caller, tenant_id).await?;
    let db = state.db().await?;
    let record = store::applications::get(&db, tenant_id, &key)
        .await?
        .ok_or_else(|| app_not_found(&key))?;
    drop(db);
    let mut items = describe(&state, &handle.graph(), record).await?.secrets;
    items.sort_by_key(|s| s.end_date_time);
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
    let (_, handle) = tenant_handle(&state, &caller, tenant_id).await?;
    let graph = handle.graph();
    let _turn = take_turn(&state, tenant_id, &key).await;
    let mut db = state.db().await?;
    let tx = db.transaction().await.map_err(store::StoreError::from)?;
    store::lock_key(&tx, "application", &lock_name(tenant_id, &key)).await?;
    let (_, obj) = registration(&tx, tenant_id, &key).await?;
    match graph
        .remove_password(&obj.to_string(), &key_id.to_string())
        .await
    {
        Ok(()) => {}
        Err(e) if e.is_not_found() => {
            return Err(ApiError::not_found(format!(
                "application `{key}` has no secret with key id {key_id}"
            )));
        }
        Err(e) => return Err(e.into()),
    }
    let ours = store::applications::delete_secret(&tx, tenant_id, &key, key_id).await?;
    audit(
        &tx,
        &caller,
        &req,
        tenant_id,
        "application.secret_removed",
        &format!("application/{key}"),
        json!({ "key_id": key_id, "created_by_mailscope": ours }),
    )
    .await?;
    tx.commit().await.map_err(store::StoreError::from)?;
    Ok(HttpResponse::NoContent().finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_slugs() {
        assert!(is_key("contoso-crm"));
        assert!(is_key("a"));
        assert!(!is_key(""));
        assert!(!is_key("-x"));
        assert!(!is_key("Contoso"));
        assert!(!is_key("a_b"));
        assert!(!is_key(&"a".repeat(64)));
    }

    #[test]
    fn secret_status_boundaries() {
        let now = Utc::now();
        assert_eq!(
            secret_status(Some(now - Duration::seconds(1)), now, 30),
            SecretStatus::Expired
        );
        assert_eq!(secret_status(Some(now), now, 30), SecretStatus::Expired);
        assert_eq!(
            secret_status(Some(now + Duration::days(29)), now, 30),
            SecretStatus::ExpiringSoon
        );
        assert_eq!(
            secret_status(Some(now + Duration::days(30)), now, 30),
            SecretStatus::Current
        );
        assert_eq!(secret_status(None, now, 30), SecretStatus::Current);
    }

    #[test]
    fn create_and_adopt_are_exclusive_and_unscoped_needs_consent() {
        let input = |v: serde_json::Value| serde_json::from_value::<ApplicationInput>(v).unwrap();
        assert!(
            validate(input(
                json!({"app_id": "b9701c1e-1364-464d-93e4-01ae925e8d6c", "display_name": "x"})
            ))
            .is_err()
        );
        assert!(matches!(
            validate(input(
                json!({"app_id": "b9701c1e-1364-464d-93e4-01ae925e8d6c"})
            )),
            Ok(Mode::Adopt { .. })
        ));
        let e = validate(input(
            json!({"display_name": "x", "permissions": ["Mail.Read", "Files.Read.All"]}),
        ))
        .err()
        .unwrap();
        assert_eq!(e.errors.len(), 1);
        assert_eq!(e.errors[0].field, "permissions[1]");
        assert!(matches!(
            validate(input(
                json!({"display_name": "x", "permissions": ["Files.Read.All"], "allow_unscoped_permissions": true})
            )),
            Ok(Mode::Create(_))
        ));
    }

    #[test]
    fn rra_keeps_delegated_entries() {
        let existing = vec![RequiredResourceAccess {
            resource_app_id: permissions::GRAPH_RESOURCE.into(),
            resource_access: vec![
                ResourceAccess {
                    id: "old-role".into(),
                    kind: "Role".into(),
                },
                ResourceAccess {
                    id: "scope-1".into(),
                    kind: "Scope".into(),
                },
            ],
        }];
        let roles = vec![Resolved {
            name: "Mail.Read".into(),
            info: permissions::classify("Mail.Read"),
            app_role_id: "role-1".into(),
            resource_sp_id: String::new(),
        }];
        let set = rra_set(&desired_rra(&existing, &roles));
        assert!(set.contains(&(
            permissions::GRAPH_RESOURCE.into(),
            "role-1".into(),
            "Role".into()
        )));
        assert!(set.contains(&(
            permissions::GRAPH_RESOURCE.into(),
            "scope-1".into(),
            "Scope".into()
        )));
        assert_eq!(set.len(), 2);
    }
}
