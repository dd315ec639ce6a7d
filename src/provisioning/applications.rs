//! Applications: the third party's app registration in Entra ID, its service principal, the
//! admin consent of its application permissions, and its client secrets.
//!
//! A registration is either **created** by mailscope (and deleted by it) or **adopted** (recorded
//! only; deleting forgets it and removes only the secrets mailscope added). Creating is
//! crash-safe: the intent is committed before Microsoft is asked, the new registration carries the
//! tag `mailscope:<key>`, and a retry finds it by that tag instead of creating a second one. Every
//! step after that looks before it creates (service principal by app id, consent by listing the
//! assignments), all under the lease of (tenant, key) (`key_lease`), so concurrent identical
//! requests make one registration, on any replica. No pooled connection is held while Graph is
//! called: the lease is taken in one short statement, the record read in another, and the result
//! written in a short transaction that goes on only while the lease is still this request's.
//! Secret texts pass through once, in the result of [`add_secret`], and are never stored.
use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Duration, Utc};
use secrecy::SecretString;
use serde_json::json;
use uuid::Uuid;

use super::key_lease::KeyLease;
use super::{Actor, Change, Ensured, Error, Rejection, Services, audit, tenants};
use crate::domain::field_error::FieldError;
use crate::domain::permissions::{self, PermissionInfo};
use crate::domain::spelling;
use crate::m365::graph::{
    AppRoleAssignment, Application, NewApplication, RequiredResourceAccess, ResourceAccess,
    ServicePrincipal,
};
use crate::m365::{ErrorKind, GraphClient};
use crate::store;
use crate::store::access_policies::AccessPolicyRecord;
use crate::store::applications::{
    ApplicationOrigin, ApplicationRecord, ApplicationState, SecretRecord,
};

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

fn app_not_found(key: &str) -> Error {
    Error::not_found(format!("no application `{key}` in this tenant"))
}

/// The only writer of the application (tenant, key) on every replica until dropped.
async fn lease(services: &Services, tenant_id: Uuid, key: &str) -> Result<KeyLease, Error> {
    KeyLease::take(services, "application", &format!("{tenant_id}/{key}")).await
}

/// Graph object ids are GUIDs; anything else is a protocol surprise.
fn guid(s: &str) -> Result<Uuid, Error> {
    s.parse::<Uuid>()
        .map_err(|_| Error::internal(anyhow::anyhow!("Graph returned a non-GUID id `{s}`")))
}

/// Where a secret is in its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretStatus {
    Current,
    /// Ends within `provisioning.secret_expiring_soon_days`.
    ExpiringSoon,
    Expired,
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

/// What a PUT of an application asks for, as sent: create a registration (`display_name`,
/// `permissions`, `grant_admin_consent`) or adopt an existing one (`app_id`).
#[derive(Debug, Default)]
pub struct Request {
    pub display_name: Option<String>,
    pub permissions: Option<Vec<String>>,
    pub grant_admin_consent: Option<bool>,
    pub allow_unscoped_permissions: Option<bool>,
    pub app_id: Option<String>,
}

/// What a create request asks for, validated.
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

fn check_key(key: &str) -> Result<(), Error> {
    if is_key(key) {
        Ok(())
    } else {
        Err(Error::invalid(
            "key",
            "must be 1 to 63 lowercase letters, digits or `-`, not starting with `-`",
        ))
    }
}

fn validate(input: Request) -> Result<Mode, Error> {
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
            _ => Err(Error::Invalid(errs)),
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
        return Err(Error::Invalid(errs));
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
    if !errs.is_empty() {
        return Err(Error::Invalid(errs));
    }
    Ok(Mode::Create(CreateSpec {
        display_name,
        permissions,
        grant_admin_consent: input.grant_admin_consent.unwrap_or(false),
        allow_unscoped,
    }))
}

/// Refuse permissions no application access policy restricts unless the caller accepted them.
/// Asked after the names are resolved, so a misspelled name is called what it is, not unscoped.
fn refuse_unscoped(spec: &CreateSpec) -> Result<(), Error> {
    if spec.allow_unscoped {
        return Ok(());
    }
    let errs: Vec<FieldError> = spec
        .permissions
        .iter()
        .enumerate()
        .filter(|(_, p)| !permissions::classify(p).covered_by_access_policies)
        .map(|(i, p)| FieldError {
            field: format!("permissions[{i}]"),
            message: format!(
                "{p} is not restricted by application access policies: the app would reach it \
                 across the whole tenant, whatever mailboxes its policy allows. Remove it, or \
                 pass `allow_unscoped_permissions: true` to accept that"
            ),
        })
        .collect();
    if errs.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(errs))
    }
}

/// The application permission names the tenant's Graph and Exchange Online service principals
/// offer (what a misspelled name is compared with), or the ones mailscope knows when the tenant
/// does not list them.
async fn application_role_names(graph: &GraphClient) -> Vec<String> {
    let mut names = Vec::new();
    for resource in [permissions::GRAPH_RESOURCE, permissions::EXCHANGE_RESOURCE] {
        if let Ok(sp) = graph.resource_service_principal(resource).await {
            names.extend(
                sp.app_roles
                    .into_iter()
                    .filter(|r| {
                        r.allowed_member_types.iter().any(|t| t == "Application")
                            && r.is_enabled != Some(false)
                    })
                    .filter_map(|r| r.value),
            );
        }
    }
    if names.is_empty() {
        names.extend(permissions::known_names().map(str::to_string));
    }
    names
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
) -> Result<Vec<Resolved>, Error> {
    let mut out = Vec::new();
    let mut errs = Vec::new();
    let mut known: Option<Vec<String>> = None;
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
                if known.is_none() {
                    known = Some(application_role_names(graph).await);
                }
                let hint = spelling::nearest(name, known.iter().flatten().map(String::as_str))
                    .map(|s| {
                        let other = permissions::classify(s).resource_app_id;
                        if other == info.resource_app_id {
                            format!("; did you mean `{s}`?")
                        } else {
                            format!(
                                "; did you mean `{s}` ({})?",
                                permissions::resource_name(other)
                            )
                        }
                    })
                    .unwrap_or_default();
                errs.push(FieldError {
                    field: format!("permissions[{i}]"),
                    message: format!(
                        "`{name}` is not a {} application permission in this tenant (names are case-sensitive){hint}",
                        permissions::resource_name(info.resource_app_id)
                    ),
                })
            }
            Err(e) => return Err(e.into()),
        }
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(Error::Invalid(errs))
    }
}

/// The application permissions that access policies restrict (Graph mail, calendar, contacts;
/// EWS `full_access_as_app`) which the app identified by `app_id` holds in the tenant now, read
/// from its service principal's app role assignments. Empty when it has no service principal.
pub async fn covered_permissions_held(
    graph: &GraphClient,
    app_id: &str,
) -> Result<Vec<String>, Error> {
    let Some(sp) = graph.service_principal_by_app_id(app_id).await? else {
        return Ok(Vec::new());
    };
    let assignments = match graph.app_role_assignments(&sp.id).await {
        Ok(a) => a,
        Err(e) if e.is_not_found() => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut names = RoleNames::new(graph);
    let mut held = Vec::new();
    for a in &assignments {
        let (resource_app_id, name) = names.name(&a.resource_id, &a.app_role_id).await?;
        let info = permissions::classify(&name);
        if info.covered_by_access_policies
            && resource_app_id.as_deref() == Some(info.resource_app_id)
        {
            held.push(name);
        }
    }
    held.sort();
    held.dedup();
    Ok(held)
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

    async fn resource(&mut self, object_id: &str) -> Result<Option<&ServicePrincipal>, Error> {
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
    ) -> Result<(Option<String>, String), Error> {
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

/// Whether an application permission is granted (an app role assignment exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consent {
    Granted,
    NotGranted,
    /// The registration is still being created; nothing was read from the tenant.
    Unknown,
}

/// An application permission as the tenant has it: requested, granted, or both.
#[derive(Debug, Clone)]
pub struct Permission {
    /// The permission's name, or its app role id when the resource does not name it.
    pub name: String,
    pub resource_app_id: Option<String>,
    pub app_role_id: Option<String>,
    /// Listed in the registration's `requiredResourceAccess`.
    pub requested: bool,
    pub consent: Consent,
    /// False for permissions no application access policy restricts.
    pub covered_by_access_policies: bool,
}

/// A client secret's metadata (Microsoft never shows the text again after creating it).
#[derive(Debug, Clone)]
pub struct Secret {
    pub key_id: Uuid,
    pub display_name: Option<String>,
    pub hint: Option<String>,
    pub start_date_time: Option<DateTime<Utc>>,
    pub end_date_time: Option<DateTime<Utc>>,
    pub status: SecretStatus,
    /// Added through mailscope (removed on delete even when the app was adopted).
    pub created_by_mailscope: bool,
}

/// A secret just made, with its text: shown once, stored nowhere.
pub struct NewSecret {
    pub secret: Secret,
    pub text: SecretString,
}

/// An application as recorded and as read from the tenant. `record.display_name` is the
/// registration's current name when the tenant has one.
pub struct Details {
    pub record: ApplicationRecord,
    pub permissions: Vec<Permission>,
    /// Names of granted or requested permissions that no application access policy restricts.
    pub unscoped_permissions: Vec<String>,
    pub secrets: Vec<Secret>,
    /// The application access policies mailscope manages for this app.
    pub policies: Vec<AccessPolicyRecord>,
}

/// Read the registration, its service principal's assignments and its secrets from the tenant.
async fn describe(
    services: &Services,
    graph: &GraphClient,
    r: ApplicationRecord,
) -> Result<Details, Error> {
    let db = services.db().await?;
    let ours = store::applications::secrets(&db, r.tenant_id, &r.key).await?;
    let policies = match r.app_id {
        Some(app_id) => {
            store::access_policies::for_app(&db, r.tenant_id, &app_id.to_string()).await?
        }
        None => Vec::new(),
    };
    drop(db);
    let now = Utc::now();
    let soon = services.settings.provisioning.secret_expiring_soon_days;
    let ready = r.state()? == ApplicationState::Ready;
    let mut view = Details {
        record: r,
        permissions: Vec::new(),
        unscoped_permissions: Vec::new(),
        secrets: Vec::new(),
        policies,
    };
    let r = &view.record;
    if !ready {
        view.permissions = r
            .permissions
            .iter()
            .map(|p| {
                let info = permissions::classify(p);
                Permission {
                    name: p.clone(),
                    resource_app_id: Some(info.resource_app_id.to_string()),
                    app_role_id: None,
                    requested: true,
                    consent: Consent::Unknown,
                    covered_by_access_policies: info.covered_by_access_policies,
                }
            })
            .collect();
        view.unscoped_permissions = unscoped(&view.permissions);
        return Ok(view);
    }
    let (application_object_id, service_principal_object_id) =
        (r.application_object_id, r.service_principal_object_id);
    let app = match application_object_id {
        Some(id) => graph.get_application(&id.to_string()).await?,
        None => None,
    };
    let assignments = match service_principal_object_id {
        Some(id) => match graph.app_role_assignments(&id.to_string()).await {
            Ok(a) => a,
            Err(e) if e.is_not_found() => Vec::new(),
            Err(e) => return Err(e.into()),
        },
        None => Vec::new(),
    };
    let mut names = RoleNames::new(graph);
    // (resource app id, role id) → view
    let mut perms: Vec<Permission> = Vec::new();
    for a in &assignments {
        let (resource_app_id, name) = names.name(&a.resource_id, &a.app_role_id).await?;
        perms.push(Permission {
            covered_by_access_policies: resource_app_id.as_deref().is_some_and(|rid| {
                let info = permissions::classify(&name);
                info.resource_app_id == rid && info.covered_by_access_policies
            }),
            name,
            resource_app_id,
            app_role_id: Some(a.app_role_id.to_ascii_lowercase()),
            requested: false,
            consent: Consent::Granted,
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
                perms.push(Permission {
                    covered_by_access_policies: info.resource_app_id == resource
                        && info.covered_by_access_policies,
                    name,
                    resource_app_id: Some(resource.clone()),
                    app_role_id: Some(role),
                    requested: true,
                    consent: Consent::NotGranted,
                });
            }
        }
    }
    perms.sort_by(|a, b| a.name.cmp(&b.name));
    view.unscoped_permissions = unscoped(&perms);
    view.permissions = perms;
    if let Some(app) = &app {
        if let Some(name) = &app.display_name {
            view.record.display_name = name.clone();
        }
        view.secrets = app
            .password_credentials
            .iter()
            .filter_map(|p| {
                let key_id = p.key_id.as_deref()?.parse::<Uuid>().ok()?;
                let end = parse_time(p.end_date_time.as_deref());
                Some(Secret {
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

fn unscoped(perms: &[Permission]) -> Vec<String> {
    perms
        .iter()
        .filter(|p| !p.covered_by_access_policies)
        .map(|p| p.name.clone())
        .collect()
}

/// The create path; returns the stored record and whether this call completed the creation.
/// An app restricted by RBAC for Applications must not get an Entra mailbox grant back: RBAC
/// adds to Entra grants, so the grant would reach every mailbox whatever the RBAC scope (the
/// union trap, docs/microsoft-365.md §3.3). Refused rather than granted silently.
async fn refuse_union_trap(
    services: &Services,
    tenant_id: Uuid,
    app_id: &str,
    roles: &[Resolved],
    current: &[AppRoleAssignment],
) -> Result<(), Error> {
    let missing: Vec<&str> = roles
        .iter()
        .filter(|r| crate::domain::rbac::is_mailbox_permission(&r.name))
        .filter(|r| {
            !current.iter().any(|a| {
                a.resource_id.eq_ignore_ascii_case(&r.resource_sp_id)
                    && a.app_role_id.eq_ignore_ascii_case(&r.app_role_id)
            })
        })
        .map(|r| r.name.as_str())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let db = services.db().await?;
    let app = app_id.to_ascii_lowercase();
    let restrictions: Vec<Uuid> = store::rbac_restrictions::all(&db, tenant_id)
        .await?
        .into_iter()
        .filter(|r| r.app_id == app)
        .map(|r| r.id)
        .collect();
    if restrictions.is_empty() {
        return Ok(());
    }
    Err(Error::Rejected {
        kind: Rejection::RbacUnionTrap,
        detail: format!(
            "app {app_id} is restricted by RBAC for Applications (restriction {}); granting it the Entra permissions {} would let it reach every mailbox whatever its RBAC scope, because RBAC grants add to Entra grants (docs/microsoft-365.md §3.3). Send `grant_admin_consent: false` (RBAC grants the mailbox permissions in scope), or delete the RBAC restriction first and restrict the app with an access policy",
            restrictions
                .iter()
                .map(Uuid::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            missing.join(", ")
        ),
        errors: missing
            .iter()
            .map(|p| {
                FieldError::new(
                    "grant_admin_consent",
                    format!("{p}: an Entra grant would bypass the app's RBAC scope"),
                )
            })
            .collect(),
    })
}

async fn ensure_created(
    services: &Services,
    actor: &Actor,
    graph: &GraphClient,
    tenant_id: Uuid,
    key: &str,
    spec: CreateSpec,
) -> Result<(ApplicationRecord, bool), Error> {
    // Resolve names before anything is recorded: an unknown permission is the caller's error.
    let roles = resolve_permissions(graph, &spec.permissions, spec.grant_admin_consent).await?;
    refuse_unscoped(&spec)?;
    let mark = marker(key);
    let lease = lease(services, tenant_id, key).await?;
    // The intent, committed before Microsoft is asked to create anything.
    store::applications::insert_intent(
        &services.db().await?,
        &ApplicationRecord {
            tenant_id,
            key: key.to_string(),
            state: ApplicationState::Creating.as_str().into(),
            origin: ApplicationOrigin::Created.as_str().into(),
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
    let Some(existing) = store::applications::get(&services.db().await?, tenant_id, key).await?
    else {
        // Cannot happen under the lease (deleting takes it too); a guard, not a path.
        return Err(Error::conflict(format!(
            "application `{key}` was deleted while this request ran; retry it"
        )));
    };
    if existing.origin()? == ApplicationOrigin::Adopted {
        return Err(Error::conflict(format!(
            "application `{key}` was adopted (app id {}); mailscope does not change adopted apps. \
             Send `{{\"app_id\": …}}` to refresh it, or use another key",
            existing.app_id.map(|a| a.to_string()).unwrap_or_default()
        )));
    }
    let was_creating = existing.state()? == ApplicationState::Creating;

    // 1. The registration: by the recorded object id, else by its marker tag, else create it.
    let mut recovered = false;
    let mut created_in_tenant = false;
    // Written moments ago (a repeated PUT, a retried step): Entra may still answer 404 for it
    // (docs/microsoft-365.md §8.4), and taking that for "deleted" would create a second one.
    let written_recently = Utc::now() - existing.updated_at
        < Duration::seconds(
            i64::try_from(services.settings.m365.entra_consistency_window_secs)
                .unwrap_or(i64::MAX / 1000),
        );
    let mut app: Option<Application> = match existing.application_object_id {
        Some(id) if written_recently => graph.get_application_after_write(&id.to_string()).await?,
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
                return Err(Error::conflict(format!(
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
        refuse_union_trap(services, tenant_id, &app.app_id, &roles, &current).await?;
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
        state: ApplicationState::Ready.as_str().into(),
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
        return Ok((existing, false));
    }
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    lease.confirm(&tx).await?;
    let stored = match store::applications::save(&tx, &record).await {
        Ok(s) => s,
        Err(e) if store::sqlstate(&e) == Some("23505") => {
            return Err(Error::conflict(format!(
                "app {} is already recorded under another key in this tenant",
                app.app_id
            )));
        }
        Err(e) => return Err(Error::from(e)),
    };
    let action = if was_creating {
        "application.created"
    } else {
        "application.updated"
    };
    audit::record(
        &tx,
        actor,
        tenant_id,
        action,
        &format!("application/{key}"),
        json!({
            "app_id": app.app_id,
            "application_object_id": app.id,
            "service_principal_object_id": sp.id,
            "origin": ApplicationOrigin::Created.as_str(),
            "created_in_tenant": created_in_tenant,
            "recovered_by_marker": recovered,
            "permissions": spec.permissions,
            "granted": granted,
            "revoked": revoked,
            "changed": changed,
        }),
    )
    .await?;
    tx.commit().await?;
    Ok((stored, was_creating))
}

#[allow(clippy::too_many_arguments)]
async fn adopt(
    services: &Services,
    actor: &Actor,
    graph: &GraphClient,
    tenant_id: Uuid,
    key: &str,
    app_id: Uuid,
    allow_unscoped: bool,
) -> Result<(ApplicationRecord, bool), Error> {
    let lease = lease(services, tenant_id, key).await?;
    let db = services.db().await?;
    if let Some(existing) = store::applications::get(&db, tenant_id, key).await? {
        if existing.state()? == ApplicationState::Ready && existing.app_id == Some(app_id) {
            return Ok((existing, false));
        }
        return Err(Error::conflict(match existing.app_id {
            Some(other) => format!(
                "application `{key}` is app {other}, not {app_id}; use another key, or DELETE `{key}` first"
            ),
            None => format!(
                "application `{key}` is being created; repeat its create request to finish it, or DELETE it first"
            ),
        }));
    }
    if let Some(other) = store::applications::key_of_app(&db, tenant_id, app_id).await? {
        return Err(Error::conflict(format!(
            "app {app_id} is already recorded as application `{other}` in this tenant"
        )));
    }
    drop(db);
    let app = graph.application_by_app_id(&app_id.to_string()).await?;
    let sp = graph
        .service_principal_by_app_id(&app_id.to_string())
        .await?;
    let sp = match (&app, sp) {
        (_, Some(sp)) => sp,
        (Some(_), None) => {
            return Err(Error::Invalid(vec![FieldError {
                field: "app_id".into(),
                message: format!(
                    "app {app_id} is registered but has no service principal (enterprise app) in this tenant, \
                     so it can neither sign in nor be granted permissions. Create it (Entra admin center → \
                     Enterprise applications, or grant admin consent), then adopt it"
                ),
            }]));
        }
        (None, None) => {
            return Err(Error::Invalid(vec![FieldError {
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
        return Err(Error::Invalid(vec![FieldError {
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
        state: ApplicationState::Ready.as_str().into(),
        origin: ApplicationOrigin::Adopted.as_str().into(),
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
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    lease.confirm(&tx).await?;
    let stored = match store::applications::save(&tx, &record).await {
        Ok(s) => s,
        Err(e) if store::sqlstate(&e) == Some("23505") => {
            return Err(Error::conflict(format!(
                "app {app_id} is already recorded under another key in this tenant"
            )));
        }
        Err(e) => return Err(Error::from(e)),
    };
    audit::record(
        &tx,
        actor,
        tenant_id,
        "application.adopted",
        &format!("application/{key}"),
        json!({
            "app_id": app_id,
            "application_object_id": app.as_ref().map(|a| a.id.clone()),
            "service_principal_object_id": sp.id,
            "origin": ApplicationOrigin::Adopted.as_str(),
            "permissions": granted,
            "unscoped_permissions": tenant_wide,
        }),
    )
    .await?;
    tx.commit().await?;
    Ok((stored, true))
}

/// Create or adopt a registration, or bring a created one to the requested state. Idempotent by
/// (tenant, key): repeating the request changes nothing, and a retry after a crash finds the
/// registration it had created instead of making a second one. The result is read back from the
/// tenant.
pub async fn put(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    key: &str,
    request: Request,
) -> Result<Ensured<Details>, Error> {
    check_key(key)?;
    let mode = validate(request)?;
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let graph = handle.graph();
    let (record, change) = match mode {
        Mode::Create(spec) => {
            let (record, created) =
                ensure_created(services, actor, &graph, tenant_id, key, spec).await?;
            (
                record,
                if created {
                    Change::Created
                } else {
                    Change::Updated
                },
            )
        }
        Mode::Adopt {
            app_id,
            allow_unscoped,
        } => {
            let (record, adopted) = adopt(
                services,
                actor,
                &graph,
                tenant_id,
                key,
                app_id,
                allow_unscoped,
            )
            .await?;
            (
                record,
                if adopted {
                    Change::Adopted
                } else {
                    Change::Unchanged
                },
            )
        }
    };
    let value = describe(services, &graph, record).await?;
    Ok(Ensured { value, change })
}

/// One application: ids, permissions with their consent state (read from the tenant), and the
/// metadata of its secrets.
pub async fn get(services: &Services, tenant_id: Uuid, key: &str) -> Result<Details, Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let db = services.db().await?;
    let record = store::applications::get(&db, tenant_id, key)
        .await?
        .ok_or_else(|| app_not_found(key))?;
    drop(db);
    describe(services, &handle.graph(), record).await
}

/// The application's secrets (metadata only), read from the tenant, soonest-ending first.
pub async fn secrets(
    services: &Services,
    tenant_id: Uuid,
    key: &str,
) -> Result<Vec<Secret>, Error> {
    let mut items = get(services, tenant_id, key).await?.secrets;
    items.sort_by_key(|s| s.end_date_time);
    Ok(items)
}

/// Delete what mailscope created, forget what it adopted. A created registration is deleted from
/// the tenant (with its service principal and consent); an adopted one stays, and only the
/// secrets mailscope added to it are removed. Refused while the app has access policies.
pub async fn delete(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    key: &str,
) -> Result<(), Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let graph = handle.graph();
    let lease = lease(services, tenant_id, key).await?;
    let db = services.db().await?;
    let record = store::applications::get(&db, tenant_id, key)
        .await?
        .ok_or_else(|| app_not_found(key))?;
    if let Some(app_id) = record.app_id {
        // Deleting or forgetting an app must not strand its policies: a forgotten app keeps
        // access, and removing its last RestrictAccess policy is a decision of its own.
        let policies = store::access_policies::for_app(&db, tenant_id, &app_id.to_string()).await?;
        if !policies.is_empty() {
            let ids: Vec<String> = policies.iter().map(|p| p.id.to_string()).collect();
            return Err(Error::rejected(
                Rejection::ApplicationHasPolicies,
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
    let secrets = store::applications::secrets(&db, tenant_id, key).await?;
    drop(db);
    let mut deleted_in_tenant: Vec<String> = Vec::new();
    let mut removed_secrets: Vec<Uuid> = Vec::new();
    if record.origin()? == ApplicationOrigin::Created {
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
        for s in secrets {
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
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    lease.confirm(&tx).await?;
    store::applications::delete(&tx, tenant_id, key).await?;
    audit::record(
        &tx,
        actor,
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
    tx.commit().await?;
    Ok(())
}

/// The record of a ready application with a registration in this tenant (secrets live there).
async fn registration(
    c: &impl deadpool_postgres::GenericClient,
    tenant_id: Uuid,
    key: &str,
) -> Result<(ApplicationRecord, Uuid), Error> {
    let record = store::applications::get(c, tenant_id, key)
        .await?
        .ok_or_else(|| app_not_found(key))?;
    if record.state()? != ApplicationState::Ready {
        return Err(Error::conflict(format!(
            "application `{key}` is still being created; repeat its PUT to finish it"
        )));
    }
    let Some(obj) = record.application_object_id else {
        return Err(Error::conflict(format!(
            "application `{key}` is registered in its publisher's tenant, not this one: its secrets \
             are managed by the publisher"
        )));
    };
    Ok((record, obj))
}

/// A client secret to add: its name and how many days it lasts.
pub struct SecretRequest {
    pub display_name: String,
    pub lifetime_days: i64,
}

/// Add a client secret. Its text is in the result only: mailscope neither stores nor logs it.
/// If recording the secret fails, it is removed again (nobody would ever see it).
pub async fn add_secret(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    key: &str,
    request: SecretRequest,
) -> Result<NewSecret, Error> {
    let max = services.settings.provisioning.max_secret_lifetime_days;
    let mut errs = Vec::new();
    let name = request.display_name.trim().to_string();
    if name.is_empty() || name.chars().count() > 256 {
        errs.push(FieldError::new(
            "display_name",
            "must be 1 to 256 characters",
        ));
    }
    if !(1..=i64::from(max)).contains(&request.lifetime_days) {
        errs.push(FieldError::new(
            "lifetime_days",
            format!("must be between 1 and {max} days (provisioning.max_secret_lifetime_days)"),
        ));
    }
    if !errs.is_empty() {
        return Err(Error::Invalid(errs));
    }
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let graph = handle.graph();
    let lease = lease(services, tenant_id, key).await?;
    let (_, obj) = registration(&services.db().await?, tenant_id, key).await?;
    let end = Utc::now() + Duration::days(request.lifetime_days);
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
    let saved: Result<(), Error> = async {
        let mut db = services.db().await?;
        let tx = db.transaction().await?;
        lease.confirm(&tx).await?;
        store::applications::insert_secret(&tx, tenant_id, key, &meta).await?;
        audit::record(
            &tx,
            actor,
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
        tx.commit().await?;
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
    let secret = Secret {
        key_id: meta.key_id,
        display_name: Some(meta.display_name),
        hint: meta.hint,
        start_date_time: Some(meta.start_date_time),
        end_date_time: Some(meta.end_date_time),
        status: secret_status(
            Some(meta.end_date_time),
            Utc::now(),
            services.settings.provisioning.secret_expiring_soon_days,
        ),
        created_by_mailscope: true,
    };
    Ok(NewSecret {
        secret,
        text: added.secret_text,
    })
}

/// Remove a secret from the registration (apps using it stop signing in with it at once).
pub async fn delete_secret(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    key: &str,
    key_id: Uuid,
) -> Result<(), Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let graph = handle.graph();
    let lease = lease(services, tenant_id, key).await?;
    let (_, obj) = registration(&services.db().await?, tenant_id, key).await?;
    match graph
        .remove_password(&obj.to_string(), &key_id.to_string())
        .await
    {
        Ok(()) => {}
        Err(e) if e.is_not_found() => {
            return Err(Error::not_found(format!(
                "application `{key}` has no secret with key id {key_id}"
            )));
        }
        Err(e) => return Err(e.into()),
    }
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    lease.confirm(&tx).await?;
    let ours = store::applications::delete_secret(&tx, tenant_id, key, key_id).await?;
    audit::record(
        &tx,
        actor,
        tenant_id,
        "application.secret_removed",
        &format!("application/{key}"),
        json!({ "key_id": key_id, "created_by_mailscope": ours }),
    )
    .await?;
    tx.commit().await?;
    Ok(())
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
        let app_id = || Some("b9701c1e-1364-464d-93e4-01ae925e8d6c".to_string());
        let perms = |p: &[&str]| Some(p.iter().map(|s| s.to_string()).collect());
        assert!(
            validate(Request {
                app_id: app_id(),
                display_name: Some("x".into()),
                ..Default::default()
            })
            .is_err()
        );
        assert!(matches!(
            validate(Request {
                app_id: app_id(),
                ..Default::default()
            }),
            Ok(Mode::Adopt { .. })
        ));
        let spec = |p: &[&str], allow: bool| {
            let Ok(Mode::Create(spec)) = validate(Request {
                display_name: Some("x".into()),
                permissions: perms(p),
                allow_unscoped_permissions: Some(allow),
                ..Default::default()
            }) else {
                panic!("expected a create spec for {p:?}")
            };
            spec
        };
        let Err(Error::Invalid(errors)) =
            refuse_unscoped(&spec(&["Mail.Read", "Files.Read.All"], false))
        else {
            panic!("an unscoped permission needs consent")
        };
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "permissions[1]");
        assert!(refuse_unscoped(&spec(&["Files.Read.All"], true)).is_ok());
        assert!(refuse_unscoped(&spec(&["Mail.Read"], false)).is_ok());
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

/// What [`set_consent`] changed in the tenant (permission names).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ConsentChange {
    pub granted: Vec<String>,
    pub revoked: Vec<String>,
}

/// Admin consent to exactly these application permissions: the app's service principal in this
/// tenant is assigned the missing app roles and loses the others. Works for an app mailscope
/// created and for an adopted one (a vendor's multi-tenant app consented to in this tenant);
/// with no permissions it revokes the consent, which takes the app's mail access away whatever
/// its access policies say. Idempotent: the roles already held are not posted again.
///
/// Granting widens the app's reach to what its restriction allows, so callers grant only once
/// the restriction exists (docs/microsoft-365.md §2.3).
pub async fn set_consent(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    key: &str,
    names: &[String],
) -> Result<ConsentChange, Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let graph = handle.graph();
    let _lease = lease(services, tenant_id, key).await?;
    let record = {
        let db = services.db().await?;
        store::applications::get(&db, tenant_id, key)
            .await?
            .ok_or_else(|| app_not_found(key))?
    };
    let Some(sp) = record.service_principal_object_id.map(|s| s.to_string()) else {
        // A registration still being created has no service principal, hence no consent.
        return Ok(ConsentChange::default());
    };
    let roles = resolve_permissions(&graph, names, !names.is_empty()).await?;
    let current: Vec<AppRoleAssignment> = graph.app_role_assignments(&sp).await?;
    let mut change = ConsentChange::default();
    // Revoke first: between the two halves the app holds less, never more.
    let mut role_names = RoleNames::new(&graph);
    for a in &current {
        let wanted = roles.iter().any(|r| {
            a.resource_id.eq_ignore_ascii_case(&r.resource_sp_id)
                && a.app_role_id.eq_ignore_ascii_case(&r.app_role_id)
        });
        if !wanted {
            // `false` when it was gone already (a retry after a crash): the same end.
            graph.revoke_app_role(&a.resource_id, &a.id).await?;
            change
                .revoked
                .push(role_names.name(&a.resource_id, &a.app_role_id).await?.1);
        }
    }
    for r in &roles {
        let held = current.iter().any(|a| {
            a.resource_id.eq_ignore_ascii_case(&r.resource_sp_id)
                && a.app_role_id.eq_ignore_ascii_case(&r.app_role_id)
        });
        if !held {
            graph
                .grant_app_role(&r.resource_sp_id, &sp, &r.app_role_id)
                .await?;
            change.granted.push(r.name.clone());
        }
    }
    if !change.granted.is_empty() || !change.revoked.is_empty() {
        let db = services.db().await?;
        audit::record(
            &db,
            actor,
            tenant_id,
            "application.consent_changed",
            &format!("application/{key}"),
            json!({"app_id": record.app_id, "granted": change.granted, "revoked": change.revoked}),
        )
        .await?;
    }
    Ok(change)
}
