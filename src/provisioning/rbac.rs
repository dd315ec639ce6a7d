//! RBAC for Applications restrictions (docs/microsoft-365.md §3, §8.2): the Exchange service principal
//! pointer, a resource scope, and one role assignment per mailbox permission, keyed by
//! (app id, scope) and idempotent like access policies.
//!
//! Every write follows the access policies' pattern: take the tenant's turn, look the key up in
//! mailscope's records and then in the tenant (adopt what is there, never duplicate: names are
//! derived from the key, so a retry after a crash finds what the first attempt made), write,
//! record and audit in one transaction.
//!
//! Safety rules:
//! - **the union trap** (docs/microsoft-365.md §3.3, §6.9): RBAC grants add to Entra grants, so a restriction is never
//!   reported as restricting while the app holds an Entra grant for a mailbox permission; the
//!   safe order to remove it is [`enforce`]: verify with `Test-ServicePrincipalAuthorization`
//!   in scope (samples) and out of scope (canaries) first, then revoke the covered Entra grants;
//! - a filter is read back after every write: an empty or altered filter can mean the whole
//!   organisation (docs/microsoft-365.md §3.4); the scope is removed again and the write refused;
//! - a replacement creates the new scope and assignments before removing the old ones (the
//!   interim state is the union of both scopes, never wider);
//! - the pointer must carry the **service principal's** object id (docs/microsoft-365.md §3.1, §6.5): a pointer with
//!   another object id (typically the app registration's) never matches the app's tokens.
//!   mailscope refuses such an id from the caller and replaces such a pointer found in the tenant.
//!
//! Removing a restriction never widens access: RBAC only grants (docs/microsoft-365.md §3.3, §3.8), so unlike an
//! access policy's removal there is no rule-4 trap to guard against; what the app keeps is its
//! Entra grants, which [`get`] reports.
use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::access_policies::check_app_id;
use super::key_lease::KeyLease;
use super::scope_groups::{maybe_exists, primary_address, recipient_object_id};
use super::{Actor, Change, Ensured, Error, Rejection, Services, audit, tenants};
use crate::domain::field_error::FieldError;
use crate::domain::permissions;
use crate::domain::rbac::{
    RBAC_ONLY_PERMISSIONS, RecipientFilter, is_mailbox_permission, role_for_permission,
    unscoped_mailbox_grants,
};
use crate::m365::exchange::{
    AuthorizationRow, ExchangeClient, ExoServicePrincipal, ManagementRoleAssignment,
    NewAppRoleAssignment, Replication, RoleAssignmentQuery,
};
use crate::m365::graph::AppRoleAssignment;
use crate::m365::{ErrorKind, GraphClient};
use crate::store::access_policies::PolicyState;
use crate::store::{self, rbac_restrictions::RbacRestrictionRecord};

/// The advisory-lock namespace of a tenant's RBAC restrictions.
const RBAC_LOCK: &str = "rbac_restrictions";
/// Members of a scope group tested in scope when the caller names no sample.
const DEFAULT_SAMPLES: usize = 3;

/// How a scope group becomes an RBAC scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupVia {
    /// `-RecipientGroupScope <group>`: survives a tenant relocation (docs/microsoft-365.md §8.2). The default.
    RecipientGroupScope,
    /// A management scope `MemberOfGroup -eq '<group DN>'` (Microsoft's migration recipe, docs/microsoft-365.md §3.7).
    MemberOfGroup,
}

impl GroupVia {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupVia::RecipientGroupScope => "recipient_group_scope",
            GroupVia::MemberOfGroup => "member_of_group",
        }
    }
}

/// The scope of a restriction, as the caller gave it.
#[derive(Debug, Clone)]
pub enum ScopeInput {
    /// One of mailscope's scope groups, by alias.
    ScopeGroup { alias: String, via: GroupVia },
    /// An OPATH recipient filter for a management scope (validated, read back).
    RecipientFilter(String),
    /// An Entra administrative unit by object id: `-RecipientAdministrativeUnitScope`, which
    /// Microsoft prefers over a filter on an administrative unit (docs/microsoft-365.md §8.2).
    AdministrativeUnit(String),
}

/// A restriction to create, or the replacement of one (where `app_id` must stay).
#[derive(Debug, Clone)]
pub struct RestrictionInput {
    pub app_id: String,
    /// Optional: the Enterprise application's object id, checked against Entra.
    pub service_principal_object_id: Option<String>,
    pub scope: ScopeInput,
    /// Mailbox permissions to grant in scope; omitted: the app's Entra mailbox grants.
    pub permissions: Option<Vec<String>>,
    /// EWS.AccessAsApp / SMTP.SendAsApp, which only RBAC grants (docs/microsoft-365.md §8.2).
    pub rbac_only_permissions: Vec<String>,
    /// After creating, verify and remove the covered Entra grants ([`enforce`]).
    pub remove_entra_grants: bool,
    pub verification: Verification,
    /// As a caller used to access policies may send it: only `RestrictAccess` (or nothing) has
    /// an RBAC equivalent; `DenyAccess` is refused with the explanation ([`deny_unsupported`]).
    pub access_right: Option<String>,
}

/// DenyAccess asked of RBAC for Applications: refused, with why and what to do instead (docs/microsoft-365.md §3.8).
pub fn deny_unsupported(field_name: &str) -> Error {
    Error::Rejected {
        kind: Rejection::RbacDenyUnsupported,
        detail: "RBAC for Applications can only grant: no role assignment says \"every mailbox except this group\", so DenyAccess has no RBAC equivalent (docs/microsoft-365.md §3.8). Keep the DenyAccess application access policy, or restrict the app to an allow-list scope instead.".into(),
        errors: vec![field(
            field_name,
            "DenyAccess has no RBAC equivalent; only RestrictAccess (an allow-list scope) can be expressed",
        )],
    }
}

/// Refuse an `access_right` other than `RestrictAccess`.
fn check_access_right(access_right: Option<&str>) -> Result<(), Error> {
    match access_right.map(str::trim) {
        None => Ok(()),
        Some(r) if r.eq_ignore_ascii_case("RestrictAccess") => Ok(()),
        Some(r) if r.eq_ignore_ascii_case("DenyAccess") => Err(deny_unsupported("access_right")),
        Some(_) => Err(Error::invalid(
            "access_right",
            "must be RestrictAccess (the only access right RBAC for Applications can express)",
        )),
    }
}

/// Mailboxes `Test-ServicePrincipalAuthorization` checks before Entra grants go.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    /// Must be in scope; omitted for a scope group: up to three of its members.
    pub sample_mailboxes: Vec<String>,
    /// Must be out of scope (besides the tenant's canaries).
    pub canary_mailboxes: Vec<String>,
}

/// A scope resolved in the tenant.
#[derive(Debug, Clone)]
struct Scope {
    key: String,
    kind: &'static str,
    alias: Option<String>,
    object_id: Option<String>,
    address: Option<String>,
    dn: Option<String>,
    /// The management scope's filter (None for `-RecipientGroupScope`).
    filter: Option<String>,
}

/// One role assignment as the tenant has it.
#[derive(Debug, Clone)]
pub struct AssignmentState {
    pub permission: String,
    pub role: String,
    pub name: String,
    pub present: bool,
}

/// Something that keeps the app from being restricted, with the fix.
#[derive(Debug, Clone)]
pub struct Finding {
    /// `union_trap`, `missing_pointer`, `wrong_pointer`, `missing_assignment`,
    /// `scope_filter_changed`.
    pub kind: &'static str,
    pub detail: String,
    pub fix: String,
}

/// A restriction as recorded and as read live from the tenant.
#[derive(Debug, Clone)]
pub struct Restriction {
    pub record: RbacRestrictionRecord,
    pub pointer_object_id: Option<String>,
    pub assignments: Vec<AssignmentState>,
    /// The management scope's filter as Exchange has it now.
    pub filter_in_tenant: Option<String>,
    /// Entra grants of mailbox permissions that reach every mailbox whatever the scope.
    pub unscoped_entra_grants: Vec<String>,
    /// Restricted to the scope for every mailbox permission: pointer right, every assignment
    /// present, filter as written, and no unscoped Entra mailbox grant left.
    pub restricted: bool,
    pub findings: Vec<Finding>,
}

/// What [`enforce`] checked and removed.
#[derive(Debug, Clone, Default)]
pub struct Enforcement {
    pub in_scope_checked: Vec<String>,
    pub out_of_scope_checked: Vec<String>,
    pub entra_grants_removed: Vec<String>,
    /// The propagation check started (or given these expectations) to see it through Graph.
    pub propagation_check_id: Option<Uuid>,
}

fn field(f: &str, m: impl Into<String>) -> FieldError {
    FieldError::new(f, m)
}

pub fn restriction_not_found(id: Uuid) -> Error {
    Error::not_found(format!(
        "mailscope has no RBAC restriction {id} in this tenant"
    ))
}

/// Short, stable hash of the key: names in the tenant are derived from it, so a retry after a
/// crash finds what an earlier attempt created.
fn key_hash(app_id: &str, scope_key: &str) -> String {
    let d = Sha256::digest(format!("{app_id}|{scope_key}").as_bytes());
    d.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

fn management_scope_name(app_id: &str, scope_key: &str) -> String {
    format!("mailscope-{}-{}", &app_id[..8], key_hash(app_id, scope_key))
}

/// At most 64 characters (docs/microsoft-365.md §3.1): 10 + 8 + 1 + 8 + 1 + the longest permission (25).
fn assignment_name(app_id: &str, scope_key: &str, permission: &str) -> String {
    let n = format!(
        "mailscope-{}-{}-{permission}",
        &app_id[..8],
        key_hash(app_id, scope_key)
    );
    n.chars().take(64).collect()
}

/// A DN inside a single-quoted OPATH value: quotes doubled.
fn member_of_group_filter(dn: &str) -> String {
    format!("MemberOfGroup -eq '{}'", dn.replace('\'', "''"))
}

/// Two filters mean the same when they parse to the same tree.
fn same_filter(a: &str, b: &str) -> bool {
    match (RecipientFilter::parse(a), RecipientFilter::parse(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Validate the permissions asked for (or derive them from the app's Entra mailbox grants).
fn choose_permissions(
    asked: Option<&[String]>,
    rbac_only: &[String],
    entra: &[String],
) -> Result<Vec<String>, Error> {
    let mut errs = Vec::new();
    let mut out: Vec<String> = Vec::new();
    let base: Vec<String> = match asked {
        Some(list) => list.to_vec(),
        None => entra
            .iter()
            .filter(|p| role_for_permission(p).is_some() && is_mailbox_permission(p))
            .cloned()
            .collect(),
    };
    for (i, p) in base.iter().enumerate() {
        match role_for_permission(p) {
            Some(r) if is_mailbox_permission(p) => out.push(r.permissions[0].to_string()),
            _ => errs.push(field(
                &format!("permissions[{i}]"),
                format!("`{p}` has no RBAC application role (Mail.*, Calendars.*, Contacts.* and MailboxSettings.* do, except Mail.ReadBasic.All, docs/microsoft-365.md §3.2)"),
            )),
        }
    }
    for (i, p) in rbac_only.iter().enumerate() {
        match RBAC_ONLY_PERMISSIONS
            .iter()
            .find(|x| x.eq_ignore_ascii_case(p.trim()))
        {
            Some(x) => out.push((*x).to_string()),
            None => errs.push(field(
                &format!("rbac_only_permissions[{i}]"),
                format!("must be one of {}", RBAC_ONLY_PERMISSIONS.join(", ")),
            )),
        }
    }
    out.sort();
    out.dedup();
    if errs.is_empty() && out.is_empty() {
        errs.push(field(
            "permissions",
            "the app holds no Entra mailbox permission RBAC can scope; name the permissions to grant",
        ));
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(Error::Invalid(errs))
    }
}

/// The app's Entra service principal and its app registration's object id (if in this tenant).
async fn entra_app(graph: &GraphClient, app_id: &str) -> Result<(String, Option<String>), Error> {
    let sp = graph.service_principal_by_app_id(app_id).await?.ok_or_else(|| {
        Error::invalid(
            "app_id",
            format!("app {app_id} has no service principal in this tenant; add or consent to the app first (docs/microsoft-365.md §6.5)"),
        )
    })?;
    let registration = graph.application_by_app_id(app_id).await?.map(|a| a.id);
    Ok((sp.id.to_ascii_lowercase(), registration))
}

/// The app's Entra app-role grants with their permission names.
pub(crate) async fn entra_grants(
    graph: &GraphClient,
    sp_object_id: &str,
) -> Result<Vec<(String, AppRoleAssignment)>, Error> {
    let assignments = match graph.app_role_assignments(sp_object_id).await {
        Ok(a) => a,
        Err(e) if e.is_not_found() => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let mut names: BTreeMap<(String, String), String> = BTreeMap::new();
    for resource in [permissions::GRAPH_RESOURCE, permissions::EXCHANGE_RESOURCE] {
        if let Ok(sp) = graph.resource_service_principal(resource).await {
            for r in &sp.app_roles {
                if let Some(v) = &r.value {
                    names.insert(
                        (sp.id.to_ascii_lowercase(), r.id.to_ascii_lowercase()),
                        v.clone(),
                    );
                }
            }
        }
    }
    Ok(assignments
        .into_iter()
        .map(|a| {
            let name = names
                .get(&(
                    a.resource_id.to_ascii_lowercase(),
                    a.app_role_id.to_ascii_lowercase(),
                ))
                .cloned()
                .unwrap_or_else(|| a.app_role_id.clone());
            (name, a)
        })
        .collect())
}

/// Resolve the scope in the tenant and validate a filter.
async fn resolve_scope(
    services: &Services,
    graph: &GraphClient,
    exo: &ExchangeClient,
    tenant_id: Uuid,
    input: &ScopeInput,
) -> Result<Scope, Error> {
    match input {
        ScopeInput::AdministrativeUnit(id) => {
            let id = id.trim().to_ascii_lowercase();
            if id.parse::<Uuid>().is_err() {
                return Err(Error::invalid(
                    "scope.administrative_unit",
                    "must be the administrative unit's object id (a GUID)",
                ));
            }
            let unit = graph.get_administrative_unit(&id).await?.ok_or_else(|| {
                Error::invalid(
                    "scope.administrative_unit",
                    format!("the tenant has no administrative unit {id}"),
                )
            })?;
            Ok(Scope {
                key: format!("au:{id}"),
                kind: "administrative_unit",
                alias: unit.display_name,
                object_id: Some(id),
                address: None,
                dn: None,
                filter: None,
            })
        }
        ScopeInput::RecipientFilter(text) => {
            let text = text.trim().to_string();
            let parsed = RecipientFilter::parse(&text).map_err(|e| {
                Error::invalid(
                    "scope.recipient_filter",
                    format!("not a valid OPATH recipient filter: {e} (an empty or malformed filter can mean the whole organisation, docs/microsoft-365.md §3.4)"),
                )
            })?;
            // A MemberOfGroup DN that names no group matches nobody: most likely a typo.
            for dn in parsed.member_of_group_dns() {
                if exo.get_recipient(&dn, Replication::Ignore).await?.is_none() {
                    return Err(Error::invalid(
                        "scope.recipient_filter",
                        format!("MemberOfGroup names `{dn}`, which is no group in the tenant"),
                    ));
                }
            }
            Ok(Scope {
                key: format!("filter:{text}"),
                kind: "recipient_filter",
                alias: None,
                object_id: None,
                address: None,
                dn: None,
                filter: Some(text),
            })
        }
        ScopeInput::ScopeGroup { alias, via } => {
            let alias = alias.trim().to_ascii_lowercase();
            let db = services.db().await?;
            let g = store::scope_groups::get(&db, tenant_id, &alias)
                .await?
                .ok_or_else(|| {
                    Error::invalid(
                        "scope.scope_group",
                        format!("mailscope has no scope group `{alias}`; create it with PUT /scope-groups/{alias}"),
                    )
                })?;
            drop(db);
            let r = exo
                .get_recipient(&g.object_id, Replication::AwaitNew)
                .await?
                .ok_or_else(|| {
                    Error::invalid(
                        "scope.scope_group",
                        format!("scope group `{alias}` is no longer in the tenant"),
                    )
                })?;
            let dn = r.distinguished_name.clone();
            let filter = match via {
                GroupVia::RecipientGroupScope => None,
                GroupVia::MemberOfGroup => {
                    Some(member_of_group_filter(dn.as_deref().ok_or_else(|| {
                        Error::internal(anyhow::anyhow!("Get-Recipient returned no DN"))
                    })?))
                }
            };
            let object_id = recipient_object_id(&r).unwrap_or(g.object_id.clone());
            Ok(Scope {
                key: format!("group:{object_id}"),
                kind: via.as_str(),
                alias: Some(alias),
                address: primary_address(&r).or(Some(g.primary_smtp_address)),
                object_id: Some(object_id),
                dn,
                filter,
            })
        }
    }
}

/// Make sure Exchange's pointer for the app carries the service principal's object id.
/// Returns the pointer and, when one with a wrong object id was replaced, that id.
async fn ensure_pointer(
    exo: &ExchangeClient,
    app_id: &str,
    sp_object_id: &str,
) -> Result<(ExoServicePrincipal, Option<String>), Error> {
    let existing = exo
        .get_service_principal(app_id, Replication::Ignore)
        .await?;
    let mut corrected = None;
    if let Some(p) = existing {
        let oid = p.object_id.clone().unwrap_or_default();
        if oid.eq_ignore_ascii_case(sp_object_id) {
            return Ok((p, None));
        }
        // Another object id (usually the app registration's, docs/microsoft-365.md §6.5) never matches the app's
        // tokens: nothing it grants has ever worked, so replacing it narrows nothing.
        let identity = p.identity.clone().unwrap_or(oid.clone());
        exo.remove_service_principal(&identity).await?;
        corrected = Some(oid);
    }
    let p = match exo
        .new_service_principal(app_id, sp_object_id, Some(&format!("mailscope {app_id}")))
        .await
    {
        Ok(p) => p,
        Err(e) if maybe_exists(&e) => exo
            .get_service_principal(sp_object_id, Replication::AwaitNew)
            .await?
            .ok_or(e)?,
        Err(e) => return Err(e.into()),
    };
    // Wait out replication: the role assignments name the pointer next.
    exo.get_service_principal(sp_object_id, Replication::AwaitNew)
        .await?;
    Ok((p, corrected))
}

/// Create (or adopt) the management scope and read its filter back. `true` when created.
async fn ensure_management_scope(
    exo: &ExchangeClient,
    name: &str,
    filter: &str,
) -> Result<bool, Error> {
    let found = exo.get_management_scope(name, Replication::Ignore).await?;
    let created = match found {
        Some(_) => false,
        None => match exo.new_management_scope(name, filter).await {
            Ok(_) => true,
            Err(e) if maybe_exists(&e) => false,
            Err(e) => return Err(e.into()),
        },
    };
    let back = exo
        .get_management_scope(name, Replication::AwaitNew)
        .await?
        .and_then(|s| s.filter().map(str::to_string));
    match back {
        Some(b) if same_filter(&b, filter) => Ok(created),
        back => {
            // Never leave a scope whose filter is not the one asked for: it could mean the
            // whole organisation (docs/microsoft-365.md §3.4). Only a scope nothing uses yet is removed.
            if created {
                let _ = exo.remove_management_scope(name).await;
            }
            Err(Error::Rejected {
                kind: Rejection::ScopeFilterMismatch,
                detail: format!(
                    "management scope `{name}` reads back with filter {back:?} instead of {filter:?}; nothing was assigned to it. An empty or altered filter can mean the whole organisation (docs/microsoft-365.md §3.4)"
                ),
                errors: vec![field("scope", "the filter did not read back as written")],
            })
        }
    }
}

/// Does a tenant assignment grant `role` in this scope?
fn assignment_matches(
    a: &ManagementRoleAssignment,
    role: &str,
    scope: &Scope,
    ms: Option<&str>,
) -> bool {
    let role_ok = a
        .role
        .as_deref()
        .is_some_and(|r| r.eq_ignore_ascii_case(role));
    let scope_ok = match ms {
        _ if scope.kind == "administrative_unit" => {
            a.custom_resource_scope.is_none()
                && a.recipient_administrative_unit_scope
                    .as_deref()
                    .zip(scope.object_id.as_deref())
                    .is_some_and(|(x, y)| x.eq_ignore_ascii_case(y))
        }
        Some(ms) => a
            .custom_resource_scope
            .as_deref()
            .is_some_and(|c| c.eq_ignore_ascii_case(ms)),
        None => {
            a.recipient_group_scope.is_some() && a.custom_resource_scope.is_none() && {
                let g = a.recipient_group_scope.as_deref().unwrap_or_default();
                [
                    scope.alias.as_deref(),
                    scope.object_id.as_deref(),
                    scope.address.as_deref(),
                ]
                .iter()
                .flatten()
                .any(|x| x.eq_ignore_ascii_case(g))
                    || scope.dn.as_deref().is_some_and(|dn| {
                        dn.to_ascii_lowercase()
                            .starts_with(&format!("cn={},", g.to_ascii_lowercase()))
                    })
            }
        }
    };
    role_ok && scope_ok && a.enabled != Some(false)
}

/// The pointer's role assignments in the tenant.
async fn assignments_of(
    exo: &ExchangeClient,
    sp_object_id: &str,
) -> Result<Vec<ManagementRoleAssignment>, Error> {
    Ok(exo
        .get_management_role_assignments(&RoleAssignmentQuery {
            role_assignee: Some(sp_object_id.to_string()),
            ..Default::default()
        })
        .await?)
}

/// Create the missing role assignments (adopting matching ones); the names, per permission.
async fn ensure_assignments(
    exo: &ExchangeClient,
    app_id: &str,
    sp_object_id: &str,
    scope: &Scope,
    ms: Option<&str>,
    permissions: &[String],
) -> Result<(Vec<String>, bool), Error> {
    let existing = assignments_of(exo, sp_object_id).await?;
    let mut names = Vec::new();
    let mut created_any = false;
    for p in permissions {
        let role = role_for_permission(p)
            .ok_or_else(|| Error::internal(anyhow::anyhow!("no role for {p}")))?
            .name;
        if let Some(a) = existing
            .iter()
            .find(|a| assignment_matches(a, role, scope, ms))
        {
            names.push(a.name.clone().unwrap_or_default());
            continue;
        }
        let name = assignment_name(app_id, &scope.key, p);
        let n = NewAppRoleAssignment {
            name: Some(name.clone()),
            role: role.to_string(),
            app: sp_object_id.to_string(),
            custom_resource_scope: ms.map(str::to_string),
            recipient_group_scope: if ms.is_none() && scope.kind != "administrative_unit" {
                scope.object_id.clone()
            } else {
                None
            },
            recipient_administrative_unit_scope: if scope.kind == "administrative_unit" {
                scope.object_id.clone()
            } else {
                None
            },
        };
        match exo.new_app_role_assignment(&n).await {
            Ok(_) => created_any = true,
            // Created by an attempt whose answer was lost: the name is derived from the key.
            Err(e) if maybe_exists(&e) && existing_by_name(exo, &name).await? => {}
            Err(e) => return Err(e.into()),
        }
        names.push(name);
    }
    Ok((names, created_any))
}

async fn existing_by_name(exo: &ExchangeClient, name: &str) -> Result<bool, Error> {
    Ok(!exo
        .get_management_role_assignments(&RoleAssignmentQuery {
            identity: Some(name.to_string()),
            ..Default::default()
        })
        .await?
        .is_empty())
}

/// Remove role assignments by name (already gone is fine).
async fn remove_assignments(exo: &ExchangeClient, names: &[String]) -> Result<(), Error> {
    for n in names {
        exo.remove_management_role_assignment(n).await?;
    }
    Ok(())
}

/// Remove a management scope mailscope created, unless something else still uses it.
async fn remove_scope_if_ours(exo: &ExchangeClient, name: Option<&str>) -> Result<(), Error> {
    let Some(name) = name.filter(|n| n.starts_with("mailscope-")) else {
        return Ok(());
    };
    match exo.remove_management_scope(name).await {
        Ok(_) => Ok(()),
        // Still used by an assignment made outside mailscope: leave it.
        Err(e) if *e.kind() == ErrorKind::InvalidParameter => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn conflict(existing: Uuid, diffs: Vec<FieldError>) -> Error {
    Error::Rejected {
        kind: Rejection::RbacConflict,
        detail: format!(
            "RBAC restriction {existing} already covers this app and scope with other settings; see `errors`. Change it with PUT /rbac-restrictions/{existing}."
        ),
        errors: diffs,
    }
}

struct Prepared {
    app_id: String,
    sp_object_id: String,
    scope: Scope,
    permissions: Vec<String>,
}

/// Validate the input against Entra and the tenant (no writes).
async fn prepare(
    services: &Services,
    graph: &GraphClient,
    exo: &ExchangeClient,
    tenant_id: Uuid,
    input: &RestrictionInput,
) -> Result<Prepared, Error> {
    check_access_right(input.access_right.as_deref())?;
    let mut errs = Vec::new();
    let app_id = check_app_id(&input.app_id, &mut errs);
    if !errs.is_empty() {
        return Err(Error::Invalid(errs));
    }
    let (sp_object_id, registration) = entra_app(graph, &app_id).await?;
    if let Some(given) = &input.service_principal_object_id {
        let given = given.trim().to_ascii_lowercase();
        if registration
            .as_deref()
            .is_some_and(|r| r.eq_ignore_ascii_case(&given))
        {
            return Err(Error::Rejected {
                kind: Rejection::RegistrationObjectId,
                detail: format!(
                    "{given} is the object id of the app registration, not of its service principal (Enterprise application). Exchange accepts it silently and the restriction never applies (docs/microsoft-365.md §3.1, §6.5). The service principal's object id is {sp_object_id}; omit the field and mailscope uses it."
                ),
                errors: vec![field(
                    "service_principal_object_id",
                    format!(
                        "the app registration's object id; the service principal's is {sp_object_id}"
                    ),
                )],
            });
        }
        if given != sp_object_id {
            return Err(Error::invalid(
                "service_principal_object_id",
                format!("app {app_id}'s service principal is {sp_object_id}, not {given}"),
            ));
        }
    }
    let entra: Vec<String> = entra_grants(graph, &sp_object_id)
        .await?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let scope = resolve_scope(services, graph, exo, tenant_id, &input.scope).await?;
    // Once enforced, the app holds no Entra mailbox grant to derive the permissions from: a
    // repeat of the request that created the restriction means the restriction's own.
    let recorded = if input.permissions.is_none()
        && !entra
            .iter()
            .any(|p| is_mailbox_permission(p) && role_for_permission(p).is_some())
    {
        let db = services.db().await?;
        store::rbac_restrictions::get_by_key(&db, tenant_id, &app_id, &scope.key)
            .await?
            .map(|r| {
                r.permissions
                    .into_iter()
                    .filter(|p| {
                        !RBAC_ONLY_PERMISSIONS
                            .iter()
                            .any(|x| x.eq_ignore_ascii_case(p))
                    })
                    .collect::<Vec<_>>()
            })
    } else {
        None
    };
    let permissions = choose_permissions(
        input.permissions.as_deref().or(recorded.as_deref()),
        &input.rbac_only_permissions,
        &entra,
    )?;
    Ok(Prepared {
        app_id,
        sp_object_id,
        scope,
        permissions,
    })
}

/// The lease on the tenant's RBAC restrictions (`key_lease`): creating, replacing and deleting
/// one are the only writers of the tenant's RBAC objects, one at a time on every replica, and none
/// holds a pooled connection while it calls Exchange. Each records its result in a short
/// transaction under the tenant's advisory lock, which [`enforce`] takes too for its own write.
async fn lease(services: &Services, tenant_id: Uuid) -> Result<KeyLease, Error> {
    KeyLease::take(services, RBAC_LOCK, &tenant_id.to_string()).await
}

/// Create a restriction (pointer → scope → assignments), or adopt what the tenant has. With
/// `remove_entra_grants`, then [`enforce`] it in the same call.
pub async fn create(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    input: RestrictionInput,
) -> Result<Ensured<(Restriction, Option<Enforcement>)>, Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let (graph, exo) = (handle.graph(), handle.exchange());
    let pre = prepare(services, &graph, &exo, tenant_id, &input).await?;
    let lease = lease(services, tenant_id).await?;
    let existing = store::rbac_restrictions::get_by_key(
        &services.db().await?,
        tenant_id,
        &pre.app_id,
        &pre.scope.key,
    )
    .await?;
    if let Some(existing) = existing {
        let mut diffs = Vec::new();
        if existing.permissions != pre.permissions {
            diffs.push(field(
                "permissions",
                format!(
                    "existing: {}, requested: {}",
                    existing.permissions.join(", "),
                    pre.permissions.join(", ")
                ),
            ));
        }
        if existing.scope_kind != pre.scope.kind {
            diffs.push(field(
                "scope",
                format!(
                    "existing: {}, requested: {}",
                    existing.scope_kind, pre.scope.kind
                ),
            ));
        }
        if !diffs.is_empty() {
            return Err(conflict(existing.id, diffs));
        }
        drop(lease);
        let enforcement = if input.remove_entra_grants {
            Some(enforce(services, actor, tenant_id, existing.id, input.verification).await?)
        } else {
            None
        };
        let r = get(services, tenant_id, existing.id).await?;
        return Ok(Ensured {
            value: (r, enforcement),
            change: Change::Unchanged,
        });
    }
    let (_, corrected) = ensure_pointer(&exo, &pre.app_id, &pre.sp_object_id).await?;
    let ms_name = pre
        .scope
        .filter
        .as_ref()
        .map(|_| management_scope_name(&pre.app_id, &pre.scope.key));
    let mut created = false;
    if let (Some(name), Some(filter)) = (&ms_name, &pre.scope.filter) {
        created |= ensure_management_scope(&exo, name, filter).await?;
    }
    let (names, made) = ensure_assignments(
        &exo,
        &pre.app_id,
        &pre.sp_object_id,
        &pre.scope,
        ms_name.as_deref(),
        &pre.permissions,
    )
    .await?;
    created |= made;
    let record = RbacRestrictionRecord {
        id: Uuid::new_v4(),
        tenant_id,
        app_id: pre.app_id.clone(),
        service_principal_object_id: pre.sp_object_id.clone(),
        scope_key: pre.scope.key.clone(),
        scope_kind: pre.scope.kind.to_string(),
        scope_group_alias: pre.scope.alias.clone(),
        scope_object_id: pre.scope.object_id.clone(),
        scope_address: pre.scope.address.clone(),
        scope_distinguished_name: pre.scope.dn.clone(),
        recipient_filter: pre.scope.filter.clone(),
        management_scope: ms_name,
        permissions: pre.permissions.clone(),
        assignment_names: names,
        entra_grants_removed: Vec::new(),
        state: if created {
            PolicyState::PendingPropagation
        } else {
            PolicyState::Unverified
        },
        origin: if created { "created" } else { "adopted" }.into(),
        created_at: Utc::now(),
        updated_at: Utc::now(),
    };
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    lease.confirm(&tx).await?;
    store::lock_key(&tx, RBAC_LOCK, &tenant_id.to_string()).await?;
    let stored = store::rbac_restrictions::upsert(&tx, &record).await?;
    audit::record(
        &tx,
        actor,
        tenant_id,
        if created {
            "rbac_restriction.created"
        } else {
            "rbac_restriction.adopted"
        },
        &format!("rbac_restriction/{}", stored.id),
        serde_json::json!({"app_id": stored.app_id, "scope_key": stored.scope_key,
            "scope_kind": stored.scope_kind, "permissions": stored.permissions,
            "assignments": stored.assignment_names, "management_scope": stored.management_scope,
            "pointer_corrected_from": corrected}),
    )
    .await?;
    tx.commit().await?;
    drop(db);
    // Enforcing takes no lease (it writes under the advisory lock only); ours ends here.
    drop(lease);
    let enforcement = if input.remove_entra_grants {
        Some(enforce(services, actor, tenant_id, stored.id, input.verification).await?)
    } else {
        None
    };
    let r = get(services, tenant_id, stored.id).await?;
    Ok(Ensured {
        value: (r, enforcement),
        change: if created {
            Change::Created
        } else {
            Change::Adopted
        },
    })
}

/// A restriction, read live from the tenant: pointer, assignments, filter, and the union trap.
pub async fn get(services: &Services, tenant_id: Uuid, id: Uuid) -> Result<Restriction, Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let db = services.db().await?;
    let rec = store::rbac_restrictions::get(&db, tenant_id, id)
        .await?
        .ok_or_else(|| restriction_not_found(id))?;
    drop(db);
    live(&handle.graph(), &handle.exchange(), rec).await
}

async fn live(
    graph: &GraphClient,
    exo: &ExchangeClient,
    rec: RbacRestrictionRecord,
) -> Result<Restriction, Error> {
    let mut findings = Vec::new();
    let pointer = exo
        .get_service_principal(&rec.app_id, Replication::Ignore)
        .await?;
    let pointer_object_id = pointer.as_ref().and_then(|p| p.object_id.clone());
    let pointer_ok = pointer_object_id
        .as_deref()
        .is_some_and(|o| o.eq_ignore_ascii_case(&rec.service_principal_object_id));
    match &pointer_object_id {
        None => findings.push(Finding {
            kind: "missing_pointer",
            detail: "Exchange has no service principal pointer for the app, so no role assignment applies".into(),
            fix: "PUT this restriction again to recreate it".into(),
        }),
        Some(o) if !pointer_ok => findings.push(Finding {
            kind: "wrong_pointer",
            detail: format!("Exchange's pointer carries object id {o}, not the service principal's {} (docs/microsoft-365.md §6.5)", rec.service_principal_object_id),
            fix: "PUT this restriction again: mailscope replaces the pointer".into(),
        }),
        _ => {}
    }
    let tenant = if pointer_ok {
        assignments_of(exo, &rec.service_principal_object_id).await?
    } else {
        Vec::new()
    };
    let assignments: Vec<AssignmentState> = rec
        .permissions
        .iter()
        .zip(rec.assignment_names.iter())
        .map(|(p, n)| AssignmentState {
            permission: p.clone(),
            role: role_for_permission(p)
                .map(|r| r.name.to_string())
                .unwrap_or_default(),
            name: n.clone(),
            present: tenant
                .iter()
                .any(|a| a.name.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(n))),
        })
        .collect();
    for a in assignments.iter().filter(|a| !a.present) {
        findings.push(Finding {
            kind: "missing_assignment",
            detail: format!(
                "role assignment `{}` ({}) is not in the tenant",
                a.name, a.role
            ),
            fix: "PUT this restriction again to recreate it".into(),
        });
    }
    let mut filter_in_tenant = None;
    if let (Some(ms), Some(f)) = (&rec.management_scope, &rec.recipient_filter) {
        filter_in_tenant = exo
            .get_management_scope(ms, Replication::Ignore)
            .await?
            .and_then(|s| s.filter().map(str::to_string));
        if !filter_in_tenant
            .as_deref()
            .is_some_and(|t| same_filter(t, f))
        {
            findings.push(Finding {
                kind: "scope_filter_changed",
                detail: format!("management scope `{ms}` has filter {filter_in_tenant:?}, not {f:?}; an empty filter means the whole organisation (docs/microsoft-365.md §3.4)"),
                fix: "PUT this restriction again to restore the filter".into(),
            });
        }
    }
    let entra: Vec<String> = entra_grants(graph, &rec.service_principal_object_id)
        .await?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let unscoped = unscoped_mailbox_grants(&entra);
    if !unscoped.is_empty() {
        findings.push(Finding {
            kind: "union_trap",
            detail: format!(
                "the app holds Entra grants {} for every mailbox; RBAC grants add to them, so the scope narrows nothing while they remain (docs/microsoft-365.md §3.3, §6.9)",
                unscoped.join(", ")
            ),
            fix: format!(
                "POST /rbac-restrictions/{}/enforce: mailscope verifies the scope with Test-ServicePrincipalAuthorization, then removes the Entra grants the restriction covers",
                rec.id
            ),
        });
    }
    let restricted = findings.is_empty();
    Ok(Restriction {
        record: rec,
        pointer_object_id,
        assignments,
        filter_in_tenant,
        unscoped_entra_grants: unscoped,
        restricted,
        findings,
    })
}

/// The tenant's restrictions known to mailscope (records only; `get` reads one live).
pub async fn list(
    services: &Services,
    tenant_id: Uuid,
    app_id: Option<&str>,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<RbacRestrictionRecord>, Error> {
    let db = services.db().await?;
    if store::tenants::get(&db, tenant_id).await?.is_none() {
        return Err(tenants::tenant_not_found(tenant_id));
    }
    Ok(store::rbac_restrictions::list(&db, tenant_id, app_id, after, limit).await?)
}

/// Replace a restriction's scope or permissions: the new scope and assignments exist before the
/// old ones go.
pub async fn replace(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    id: Uuid,
    input: RestrictionInput,
) -> Result<Ensured<(Restriction, Option<Uuid>)>, Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let (graph, exo) = (handle.graph(), handle.exchange());
    let pre = prepare(services, &graph, &exo, tenant_id, &input).await?;
    // Mailboxes the propagation check expects in the new scope, read before the transaction.
    let samples = check_samples(&exo, &pre.scope, &input.verification).await?;
    let lease = lease(services, tenant_id).await?;
    let db = services.db().await?;
    let rec = store::rbac_restrictions::get(&db, tenant_id, id)
        .await?
        .ok_or_else(|| restriction_not_found(id))?;
    if rec.app_id != pre.app_id {
        return Err(Error::invalid(
            "app_id",
            format!(
                "a restriction's app cannot change (this one is {}); create one for the other app instead",
                rec.app_id
            ),
        ));
    }
    if rec.scope_key == pre.scope.key
        && rec.permissions == pre.permissions
        && rec.scope_kind == pre.scope.kind
    {
        drop(db);
        return Ok(Ensured {
            value: (get(services, tenant_id, id).await?, None),
            change: Change::Unchanged,
        });
    }
    if rec.scope_key != pre.scope.key
        && let Some(other) =
            store::rbac_restrictions::get_by_key(&db, tenant_id, &pre.app_id, &pre.scope.key)
                .await?
    {
        return Err(conflict(
            other.id,
            vec![field(
                "scope",
                format!("restriction {} already covers this app and scope", other.id),
            )],
        ));
    }
    drop(db);
    ensure_pointer(&exo, &pre.app_id, &pre.sp_object_id).await?;
    // A new key gets its own management scope name, so the old scope stays intact until the
    // new assignments exist.
    let ms_name = pre
        .scope
        .filter
        .as_ref()
        .map(|_| management_scope_name(&pre.app_id, &pre.scope.key));
    if let (Some(name), Some(filter)) = (&ms_name, &pre.scope.filter) {
        ensure_management_scope(&exo, name, filter).await?;
    }
    let (names, _) = ensure_assignments(
        &exo,
        &pre.app_id,
        &pre.sp_object_id,
        &pre.scope,
        ms_name.as_deref(),
        &pre.permissions,
    )
    .await?;
    // Only now the old assignments (and scope) go.
    let keep: BTreeSet<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
    let old: Vec<String> = rec
        .assignment_names
        .iter()
        .filter(|n| !keep.contains(&n.to_ascii_lowercase()))
        .cloned()
        .collect();
    remove_assignments(&exo, &old).await?;
    if rec.management_scope != ms_name {
        remove_scope_if_ours(&exo, rec.management_scope.as_deref()).await?;
    }
    let before = serde_json::json!({"scope_key": rec.scope_key, "permissions": rec.permissions});
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    lease.confirm(&tx).await?;
    store::lock_key(&tx, RBAC_LOCK, &tenant_id.to_string()).await?;
    // An enforcement may have recorded the Entra grants it removed meanwhile: keep them.
    let rec = store::rbac_restrictions::get(&tx, tenant_id, id)
        .await?
        .ok_or_else(|| restriction_not_found(id))?;
    let stored = store::rbac_restrictions::upsert(
        &tx,
        &RbacRestrictionRecord {
            scope_key: pre.scope.key.clone(),
            scope_kind: pre.scope.kind.to_string(),
            scope_group_alias: pre.scope.alias.clone(),
            scope_object_id: pre.scope.object_id.clone(),
            scope_address: pre.scope.address.clone(),
            scope_distinguished_name: pre.scope.dn.clone(),
            recipient_filter: pre.scope.filter.clone(),
            management_scope: ms_name,
            permissions: pre.permissions.clone(),
            assignment_names: names,
            state: PolicyState::PendingPropagation,
            ..rec
        },
    )
    .await?;
    // A restriction already enforced claims the new scope now: verify it through Exchange and
    // Graph. One whose Entra grants remain restricts nothing yet (the union trap), so there is
    // nothing to see in force until it is enforced.
    let check_id = if stored.entra_grants_removed.is_empty() {
        None
    } else {
        super::checks::after_rbac_change(
            &tx,
            services,
            tenant_id,
            &stored.app_id,
            &samples,
            &input.verification.canary_mailboxes,
            "rbac_restriction",
        )
        .await?
        .map(|c| c.id)
    };
    audit::record(
        &tx,
        actor,
        tenant_id,
        "rbac_restriction.replaced",
        &format!("rbac_restriction/{id}"),
        serde_json::json!({"before": before, "after": {"scope_key": stored.scope_key,
            "permissions": stored.permissions}, "order": "create_then_remove",
            "removed_assignments": old, "propagation_check": check_id}),
    )
    .await?;
    tx.commit().await?;
    drop(db);
    Ok(Ensured {
        value: (get(services, tenant_id, id).await?, check_id),
        change: Change::Updated,
    })
}

/// Mailboxes in `scope` a propagation check expects granted: the caller's samples, else up to
/// three mailbox members of a scope group (a filter's members are not listed).
async fn check_samples(
    exo: &ExchangeClient,
    scope: &Scope,
    v: &Verification,
) -> Result<Vec<String>, Error> {
    let given: Vec<String> = v
        .sample_mailboxes
        .iter()
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    if !given.is_empty() {
        return Ok(given);
    }
    // An administrative unit's or a filter's members are not listed.
    let Some(group) = scope
        .object_id
        .as_ref()
        .filter(|_| scope.kind != "administrative_unit")
    else {
        return Ok(Vec::new());
    };
    Ok(exo
        .get_distribution_group_members(group, Replication::Ignore)
        .await?
        .iter()
        .filter(|m| {
            m.recipient_type_details
                .as_deref()
                .is_some_and(|t| t.ends_with("Mailbox"))
        })
        .filter_map(primary_address)
        .take(DEFAULT_SAMPLES)
        .collect())
}

/// Delete a restriction: its assignments, then its management scope, then the pointer when no
/// other restriction of the app and no other assignment uses it. Narrows access only (RBAC
/// grants, never denies, docs/microsoft-365.md §3.3).
pub async fn delete(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    id: Uuid,
) -> Result<(), Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let exo = handle.exchange();
    let lease = lease(services, tenant_id).await?;
    let db = services.db().await?;
    let rec = store::rbac_restrictions::get(&db, tenant_id, id)
        .await?
        .ok_or_else(|| restriction_not_found(id))?;
    let others = store::rbac_restrictions::all(&db, tenant_id)
        .await?
        .into_iter()
        .any(|r| r.id != id && r.app_id == rec.app_id);
    drop(db);
    remove_assignments(&exo, &rec.assignment_names).await?;
    remove_scope_if_ours(&exo, rec.management_scope.as_deref()).await?;
    let mut pointer_removed = false;
    if !others
        && assignments_of(&exo, &rec.service_principal_object_id)
            .await?
            .is_empty()
    {
        pointer_removed = exo
            .remove_service_principal(&rec.service_principal_object_id)
            .await?;
    }
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    lease.confirm(&tx).await?;
    store::lock_key(&tx, RBAC_LOCK, &tenant_id.to_string()).await?;
    store::rbac_restrictions::delete(&tx, tenant_id, id).await?;
    audit::record(
        &tx,
        actor,
        tenant_id,
        "rbac_restriction.deleted",
        &format!("rbac_restriction/{id}"),
        serde_json::json!({"app_id": rec.app_id, "scope_key": rec.scope_key,
            "removed_assignments": rec.assignment_names, "pointer_removed": pointer_removed}),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Rows of `Test-ServicePrincipalAuthorization -Resource` that grant one of `permissions`.
pub(crate) fn rows_granting<'a>(
    rows: &'a [AuthorizationRow],
    permissions: &'a [String],
) -> impl Iterator<Item = &'a AuthorizationRow> {
    rows.iter().filter(move |r| {
        r.granted_permissions
            .iter()
            .any(|g| permissions.iter().any(|p| p.eq_ignore_ascii_case(g.trim())))
    })
}

/// The live state, re-read while pieces written moments ago may still be replicating.
///
/// Exchange objects created a moment ago can be missing from other calls for seconds to minutes
/// (docs/microsoft-365.md §1.3), so a pointer or role assignment absent right after mailscope
/// wrote the restriction is not yet proof that it is incomplete: re-read, with growing pauses,
/// until the connector's replication window since the last write has passed.
async fn live_after_replication(
    services: &Services,
    graph: &GraphClient,
    exo: &ExchangeClient,
    rec: &RbacRestrictionRecord,
) -> Result<Restriction, Error> {
    let m365 = &services.settings.m365;
    let deadline = rec.updated_at + m365.replication_window();
    let cap = std::time::Duration::from_millis(m365.replication_poll_max_ms);
    let mut pause = std::time::Duration::from_millis(250);
    loop {
        let state = live(graph, exo, rec.clone()).await?;
        let replicating = state
            .findings
            .iter()
            .any(|f| matches!(f.kind, "missing_pointer" | "missing_assignment"));
        let left = (deadline - Utc::now()).to_std().unwrap_or_default();
        if !replicating || left.is_zero() {
            return Ok(state);
        }
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(cap);
    }
}

/// Close the union trap in the safe order (docs/microsoft-365.md §3.3, §3.7): the restriction must be complete in the
/// tenant; `Test-ServicePrincipalAuthorization` (live, no cache, docs/microsoft-365.md §3.1) must show every sample in
/// scope for every permission and every canary out of scope; only then are the app's Entra
/// grants for the covered permissions removed. Graph follows within the RBAC permission cache
/// (30 minutes to 2 hours, docs/microsoft-365.md §3.5, docs/microsoft-365.md §8.3).
pub async fn enforce(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    id: Uuid,
    v: Verification,
) -> Result<Enforcement, Error> {
    let (tenant, handle) = tenants::load(services, tenant_id).await?;
    let (graph, exo) = (handle.graph(), handle.exchange());
    let db = services.db().await?;
    let rec = store::rbac_restrictions::get(&db, tenant_id, id)
        .await?
        .ok_or_else(|| restriction_not_found(id))?;
    drop(db);
    let state = live_after_replication(services, &graph, &exo, &rec).await?;
    let incomplete: Vec<&Finding> = state
        .findings
        .iter()
        .filter(|f| f.kind != "union_trap")
        .collect();
    if !incomplete.is_empty() {
        return Err(Error::Rejected {
            kind: Rejection::RbacIncomplete,
            detail: format!(
                "the restriction is not complete in the tenant, so the Entra grants stay: {}",
                incomplete
                    .iter()
                    .map(|f| f.detail.clone())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            errors: Vec::new(),
        });
    }
    let lower = |v: &[String]| -> Vec<String> {
        v.iter()
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let mut samples = lower(&v.sample_mailboxes);
    if samples.is_empty()
        && rec.scope_kind != "administrative_unit"
        && let Some(group) = &rec.scope_object_id
    {
        samples = exo
            .get_distribution_group_members(group, Replication::Ignore)
            .await?
            .iter()
            .filter(|m| {
                m.recipient_type_details
                    .as_deref()
                    .is_some_and(|t| t.ends_with("Mailbox"))
            })
            .filter_map(primary_address)
            .take(DEFAULT_SAMPLES)
            .collect();
    }
    let mut canaries = lower(&v.canary_mailboxes);
    canaries.extend(lower(&tenant.canary_mailboxes));
    canaries.sort();
    canaries.dedup();
    let mut errs = Vec::new();
    if samples.is_empty() {
        errs.push(field(
            "sample_mailboxes",
            "name at least one mailbox inside the scope to verify before the Entra grants go",
        ));
    }
    if canaries.is_empty() {
        errs.push(field(
            "canary_mailboxes",
            "name at least one mailbox outside the scope (or set the tenant's canary_mailboxes): without one, nothing shows the scope excludes anyone",
        ));
    }
    if !errs.is_empty() {
        return Err(Error::Rejected {
            kind: Rejection::VerificationMailboxesRequired,
            detail: "verifying the restriction needs mailboxes inside and outside its scope".into(),
            errors: errs,
        });
    }
    let sp = &rec.service_principal_object_id;
    let mut failures = Vec::new();
    for s in &samples {
        let rows = exo
            .test_service_principal_authorization(sp, Some(s))
            .await?;
        for p in &rec.permissions {
            let one = std::slice::from_ref(p);
            if !rows_granting(&rows, one).any(|r| r.in_scope() == Some(true)) {
                failures.push(field(
                    "sample_mailboxes",
                    format!("{s}: not in scope for {p} (Test-ServicePrincipalAuthorization)"),
                ));
            }
        }
    }
    for c in &canaries {
        let rows = exo
            .test_service_principal_authorization(sp, Some(c))
            .await?;
        for r in rows_granting(&rows, &rec.permissions).filter(|r| r.in_scope() != Some(false)) {
            failures.push(field(
                "canary_mailboxes",
                format!(
                    "{c}: in scope of {} ({}) — the scope is wider than intended",
                    r.role_name.clone().unwrap_or_default(),
                    r.allowed_resource_scope.clone().unwrap_or_default()
                ),
            ));
        }
    }
    if !failures.is_empty() {
        return Err(Error::Rejected {
            kind: Rejection::RbacVerificationFailed,
            detail: "Test-ServicePrincipalAuthorization does not show the scope as intended; the app's Entra grants were left in place".into(),
            errors: failures,
        });
    }
    // Verified: now the Entra grants the restriction covers can go.
    let mut removed = Vec::new();
    for (name, a) in entra_grants(&graph, sp).await? {
        if rec
            .permissions
            .iter()
            .any(|p| p.eq_ignore_ascii_case(&name))
        {
            graph.revoke_app_role(&a.resource_id, &a.id).await?;
            removed.push(name);
        }
    }
    removed.sort();
    removed.dedup();
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    store::lock_key(&tx, RBAC_LOCK, &tenant_id.to_string()).await?;
    if let Some(cur) = store::rbac_restrictions::get(&tx, tenant_id, id).await? {
        let mut all_removed = cur.entra_grants_removed.clone();
        all_removed.extend(removed.iter().cloned());
        all_removed.sort();
        all_removed.dedup();
        store::rbac_restrictions::upsert(
            &tx,
            &RbacRestrictionRecord {
                entra_grants_removed: all_removed,
                state: PolicyState::PendingPropagation,
                ..cur
            },
        )
        .await?;
    }
    // Exchange shows the scope already; Graph follows through the permission cache. The check
    // starts in the same transaction, so a committed enforcement always has one.
    let check = super::checks::after_rbac_change(
        &tx,
        services,
        tenant_id,
        &rec.app_id,
        &samples,
        &canaries,
        "rbac_restriction",
    )
    .await?;
    let check_id = check.map(|c| c.id);
    audit::record(
        &tx,
        actor,
        tenant_id,
        "rbac_restriction.enforced",
        &format!("rbac_restriction/{id}"),
        serde_json::json!({"in_scope_checked": samples, "out_of_scope_checked": canaries,
            "entra_grants_removed": removed, "propagation_check": check_id}),
    )
    .await?;
    tx.commit().await?;
    Ok(Enforcement {
        in_scope_checked: samples,
        out_of_scope_checked: canaries,
        entra_grants_removed: removed,
        propagation_check_id: check_id,
    })
}

/// One app the scan found at risk.
#[derive(Debug, Clone)]
pub struct ScanFinding {
    pub app_id: String,
    pub display_name: Option<String>,
    pub service_principal_object_id: String,
    /// `union_trap` (Entra mailbox grants beside RBAC assignments) or `unrestricted` (Entra
    /// mailbox grants, no RBAC assignment and no RestrictAccess policy).
    pub kind: &'static str,
    pub entra_grants: Vec<String>,
    pub rbac_roles: Vec<String>,
    pub fix: String,
}

/// Find the union trap in a tenant, whoever set it up: every service principal holding an Entra
/// mailbox grant, with its RBAC assignments (via Exchange's pointers) and access policies.
pub async fn scan(services: &Services, tenant_id: Uuid) -> Result<Vec<ScanFinding>, Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let (graph, exo) = (handle.graph(), handle.exchange());
    let db = services.db().await?;
    let ours = store::rbac_restrictions::all(&db, tenant_id).await?;
    drop(db);
    let pointers = exo.list_service_principals().await?;
    let policies = exo.list_application_access_policies().await?;
    // principal id → (display name, granted mailbox permissions)
    let mut holders: BTreeMap<String, (Option<String>, Vec<String>)> = BTreeMap::new();
    for resource in [permissions::GRAPH_RESOURCE, permissions::EXCHANGE_RESOURCE] {
        let Ok(rsp) = graph.resource_service_principal(resource).await else {
            continue;
        };
        for a in graph.app_role_assigned_to(&rsp.id).await? {
            let Some(name) = rsp
                .app_roles
                .iter()
                .find(|r| r.id.eq_ignore_ascii_case(&a.app_role_id))
                .and_then(|r| r.value.clone())
            else {
                continue;
            };
            if is_mailbox_permission(&name) {
                let e = holders
                    .entry(a.principal_id.to_ascii_lowercase())
                    .or_insert((a.principal_display_name.clone(), Vec::new()));
                e.1.push(name);
            }
        }
    }
    let mut out = Vec::new();
    for (sp_id, (display, grants)) in holders {
        let Some(sp) = graph.get_service_principal(&sp_id).await? else {
            continue;
        };
        let app_id = sp.app_id.to_ascii_lowercase();
        let grants = unscoped_mailbox_grants(&grants);
        let pointer = pointers.iter().find(|p| {
            p.object_id
                .as_deref()
                .is_some_and(|o| o.eq_ignore_ascii_case(&sp_id))
        });
        let roles: Vec<String> = match pointer {
            Some(_) => assignments_of(&exo, &sp_id)
                .await?
                .into_iter()
                .filter_map(|a| a.role)
                .collect(),
            None => Vec::new(),
        };
        let restricted_by_policy = policies.iter().any(|p| {
            super::access_policies::same_app(p, &app_id)
                && p.access_right.as_deref() == Some("RestrictAccess")
        });
        let restriction = ours.iter().find(|r| r.app_id == app_id);
        if !roles.is_empty() {
            let fix = match restriction {
                Some(r) => format!(
                    "POST /rbac-restrictions/{}/enforce to verify the scope and remove the Entra grants {}",
                    r.id,
                    grants.join(", ")
                ),
                None => format!(
                    "adopt the assignments with POST /rbac-restrictions (app {app_id}, its scope), then POST /rbac-restrictions/{{id}}/enforce to remove the Entra grants {}",
                    grants.join(", ")
                ),
            };
            out.push(ScanFinding {
                app_id,
                display_name: display.or(sp.display_name.clone()),
                service_principal_object_id: sp_id,
                kind: "union_trap",
                entra_grants: grants,
                rbac_roles: roles,
                fix,
            });
        } else if !restricted_by_policy {
            out.push(ScanFinding {
                fix: format!("restrict the app: POST /rbac-restrictions with app {app_id} and a scope, with remove_entra_grants (Microsoft's recommended mechanism), or an access policy"),
                app_id,
                display_name: display.or(sp.display_name.clone()),
                service_principal_object_id: sp_id,
                kind: "unrestricted",
                entra_grants: grants,
                rbac_roles: roles,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = "b9701c1e-1364-464d-93e4-01ae925e8d6c";

    #[test]
    fn names_fit_exchange_limits_and_follow_the_key() {
        let n = assignment_name(APP, "group:x", "MailboxSettings.ReadWrite");
        assert!(n.chars().count() <= 64, "{n}");
        assert_eq!(
            n,
            assignment_name(APP, "group:x", "MailboxSettings.ReadWrite")
        );
        assert_ne!(
            n,
            assignment_name(APP, "group:y", "MailboxSettings.ReadWrite")
        );
        assert!(management_scope_name(APP, "filter:a").starts_with("mailscope-b9701c1e-"));
    }

    #[test]
    fn permissions_default_to_the_entra_mailbox_grants_with_a_role() {
        let entra = vec![
            "Mail.Read".to_string(),
            "User.Read.All".to_string(),
            "Mail.ReadBasic.All".to_string(),
            "Calendars.Read".to_string(),
        ];
        let p = choose_permissions(None, &["smtp.sendasapp".into()], &entra).unwrap_or_default();
        assert_eq!(p, vec!["Calendars.Read", "Mail.Read", "SMTP.SendAsApp"]);
        let e = choose_permissions(Some(&["Files.Read.All".into()]), &[], &entra);
        assert!(matches!(e, Err(Error::Invalid(v)) if v[0].field == "permissions[0]"));
        let none = choose_permissions(None, &[], &["User.Read.All".into()]);
        assert!(matches!(none, Err(Error::Invalid(v)) if v[0].field == "permissions"));
    }

    #[test]
    fn filters_compare_by_meaning_and_dns_are_quoted() {
        assert!(same_filter(
            "Department -eq 'Sales'",
            "(department  -eq \"Sales\")"
        ));
        assert!(!same_filter("Department -eq 'Sales'", ""));
        let f = member_of_group_filter("CN=O'Brien,OU=x");
        assert_eq!(f, "MemberOfGroup -eq 'CN=O''Brien,OU=x'");
        assert!(RecipientFilter::parse(&f).is_ok());
    }
}
