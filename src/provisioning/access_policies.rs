//! Application access policies: create (or adopt), replace, re-describe and delete (docs/microsoft-365.md §2,
//! pitfalls docs/microsoft-365.md §6.3–6.5, 6.10–6.12).
//!
//! A policy is identified by (app id, scope object id), never by Exchange's generated Identity;
//! mailscope's own UUID is the API id. Every writer of a tenant's policies (and sync) takes the
//! tenant's policy lease (`scope_groups::policy_lease`), then looks the key up in its records and
//! in the tenant before creating anything: concurrent duplicates create one policy, and a retry
//! after a crash between Exchange's create and mailscope's write adopts what Exchange has. No
//! pooled connection is held while Exchange is called: records are read in short statements and
//! the result written in one short transaction that goes on only while the lease is still held.
//!
//! Safety rules:
//! - a replacement creates the new policy **before** removing the old one, so the interim state
//!   is the union of both scopes, never unrestricted (docs/microsoft-365.md §6.11). Exchange cannot hold two policies
//!   for one app and scope, so a change of access right alone is done remove-then-create;
//! - removing (or turning into DenyAccess) an app's last RestrictAccess policy, which silently
//!   gives the app every mailbox (rule 4), is refused unless the caller accepts it.
//!
//! Change points for the propagation check (each inside the transaction that records the change,
//! so a job enqueued there commits with it): [`create`] after `New-…`, [`replace`] after the old
//! policy is removed, and [`delete`] after `Remove-…`.
use chrono::Utc;
use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::applications::covered_permissions_held;
use super::checks::{CheckView, TouchedScope, after_policy_change};
use super::scope_groups::{
    ids_of, maybe_exists, policy_lease, primary_address, recipient_object_id, scope_refusal,
};
use super::{Actor, Change, Ensured, Error, Rejection, Services, audit, tenants};
use crate::domain::access::{self as rules, AccessRight};
use crate::domain::field_error::FieldError;
use crate::m365::TenantHandle;
use crate::m365::exchange::{
    ApplicationAccessPolicy, ExchangeClient, NewApplicationAccessPolicy, Replication,
};
use crate::m365::graph::GraphClient;
use crate::store;
use crate::store::access_policies::{AccessPolicyRecord, PolicyOrigin, PolicyState};

/// Longest description accepted (descriptions eat into the tenant's policy budget, docs/microsoft-365.md §2.6).
const MAX_DESCRIPTION: usize = 1000;

/// A policy to create, or the replacement of one (where `app_id` must stay), as the caller gave it.
#[derive(Debug, Clone)]
pub struct PolicyInput {
    pub app_id: String,
    /// A scope group's alias, or an SMTP address.
    pub scope: String,
    pub access_right: AccessRight,
    pub description: Option<String>,
    pub canary_mailboxes: Vec<String>,
}

/// A policy as a change left it, and the check the change started (if any).
#[derive(Debug, Clone)]
pub struct PolicyChange {
    pub policy: AccessPolicyRecord,
    pub check: Option<CheckView>,
}

/// How a replacement reached the tenant (recorded in the audit event as `order`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplaceOrder {
    /// Only the description changed: edited in place.
    SetDescription,
    /// Same scope, other access right: Exchange needs the old policy gone first.
    RemoveThenCreate,
    /// Other scope: the new policy exists before the old one goes.
    CreateThenRemove,
}

impl ReplaceOrder {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplaceOrder::SetDescription => "set_description",
            ReplaceOrder::RemoveThenCreate => "remove_then_create",
            ReplaceOrder::CreateThenRemove => "create_then_remove",
        }
    }
}

/// A policy scope, resolved in the tenant.
#[derive(Debug, Clone)]
pub struct Scope {
    pub object_id: String,
    /// Every id Exchange may report for it in `ScopeIdentityRaw`.
    pub ids: Vec<String>,
    pub kind: String,
    pub address: String,
    pub alias: Option<String>,
}

pub fn policy_not_found(id: Uuid) -> Error {
    Error::not_found(format!(
        "mailscope has no access policy {id} in this tenant"
    ))
}

fn gone_from_tenant(id: Uuid) -> Error {
    Error::conflict(format!(
        "access policy {id} no longer exists in the tenant (removed outside mailscope); POST /sync to reconcile, then create it again"
    ))
}

fn last_restrict_error(app_id: &str, what: &str, held: &[String]) -> Error {
    Error::rejected(
        Rejection::LastRestrictPolicy,
        format!(
            "{what} would leave app {app_id} without any RestrictAccess policy while it holds {}, which would then reach every mailbox in the tenant (rule 4, docs/microsoft-365.md §2.3). Revoke those permissions first (PUT /applications/{{key}} without them, or remove them in Entra ID) and repeat, or repeat with ?allow_unrestricted=true to accept that.",
            held.join(", ")
        ),
    )
}

fn conflict(existing_id: Option<Uuid>, diffs: Vec<FieldError>, where_: &str) -> Error {
    let id = existing_id.map_or(String::new(), |i| format!(" ({i})"));
    Error::Rejected {
        kind: Rejection::PolicyConflict,
        detail: format!(
            "{where_}{id} already has a policy for this app and scope with different settings; see `errors`. Change it with PUT or PATCH /access-policies/{{id}}."
        ),
        errors: diffs,
    }
}

fn field(field: &str, message: impl Into<String>) -> FieldError {
    FieldError::new(field, message)
}

/// The app's client id, normalised; a field error when it is not a GUID.
pub fn check_app_id(s: &str, errs: &mut Vec<FieldError>) -> String {
    match s.trim().parse::<Uuid>() {
        Ok(u) => u.to_string(),
        Err(_) => {
            errs.push(field("app_id", "must be the app's client id (a GUID)"));
            String::new()
        }
    }
}

/// Omitted or blank: a single space, the smallest value, so the tenant fits the most policies.
fn check_description(d: Option<&str>, errs: &mut Vec<FieldError>) -> String {
    match d {
        None => " ".into(),
        Some(d) if d.trim().is_empty() => " ".into(),
        Some(d) if d.chars().count() > MAX_DESCRIPTION => {
            errs.push(field(
                "description",
                format!("at most {MAX_DESCRIPTION} characters (descriptions count against the tenant's policy size limit)"),
            ));
            String::new()
        }
        Some(d) => d.trim().to_string(),
    }
}

fn check_canaries(canaries: &[String], errs: &mut Vec<FieldError>) -> Vec<String> {
    for (i, c) in canaries.iter().enumerate() {
        if !crate::domain::address::is_address(c.trim()) {
            errs.push(field(
                &format!("canary_mailboxes[{i}]"),
                "must be an SMTP address",
            ));
        }
    }
    canaries
        .iter()
        .map(|c| c.trim().to_ascii_lowercase())
        .collect()
}

pub(crate) fn same_app(p: &ApplicationAccessPolicy, app_id: &str) -> bool {
    p.app_id
        .as_deref()
        .is_some_and(|a| a.eq_ignore_ascii_case(app_id))
}

pub(crate) fn scope_guid(p: &ApplicationAccessPolicy) -> Option<String> {
    p.scope_group_guid().map(|g| g.to_ascii_lowercase())
}

/// The tenant's policy for (app, scope), by key.
fn in_tenant<'a>(
    all: &'a [ApplicationAccessPolicy],
    app_id: &str,
    ids: &[String],
) -> Option<&'a ApplicationAccessPolicy> {
    all.iter()
        .find(|p| same_app(p, app_id) && scope_guid(p).is_some_and(|g| ids.contains(&g)))
}

/// The tenant's policy for a record: by key, else by the Identity recorded when it was written.
fn record_in_tenant<'a>(
    all: &'a [ApplicationAccessPolicy],
    r: &AccessPolicyRecord,
) -> Option<&'a ApplicationAccessPolicy> {
    in_tenant(all, &r.app_id, std::slice::from_ref(&r.scope_object_id)).or_else(|| {
        all.iter().find(|p| {
            p.identity.is_some()
                && p.identity.as_deref().map(str::to_ascii_lowercase)
                    == r.exchange_identity.as_deref().map(str::to_ascii_lowercase)
        })
    })
}

/// The access right as Exchange spells it (exactly), if it is one.
fn tenant_right(p: &ApplicationAccessPolicy) -> Option<AccessRight> {
    [AccessRight::RestrictAccess, AccessRight::DenyAccess]
        .into_iter()
        .find(|r| p.access_right.as_deref() == Some(r.as_str()))
}

/// Would the app lose its last RestrictAccess policy if `removed` were replaced by a policy with
/// `added` (none: deleted)? The tenant's other policies decide.
fn leaves_unrestricted(
    all: &[ApplicationAccessPolicy],
    app_id: &str,
    removed: Option<AccessRight>,
    added: Option<AccessRight>,
    except: Option<&ApplicationAccessPolicy>,
) -> bool {
    rules::leaves_app_unrestricted(app_id, removed, added, &others(all, except))
}

fn others(
    all: &[ApplicationAccessPolicy],
    except: Option<&ApplicationAccessPolicy>,
) -> Vec<rules::AccessPolicy> {
    all.iter()
        .filter(|p| Some(*p) != except)
        .filter_map(|p| {
            Some(rules::AccessPolicy {
                app_id: p.app_id.clone()?,
                scope_id: scope_guid(p).unwrap_or_default(),
                access_right: tenant_right(p)?,
            })
        })
        .collect()
}

/// The guard on the last RestrictAccess policy: refused (unless `allow_unrestricted`) only when
/// the change would widen what the app reaches, i.e. the app still holds a permission policies
/// restrict. Its actual grants are read from Graph only when the policies alone say it would.
/// Returns the covered permissions the app holds when it is left without RestrictAccess.
#[allow(clippy::too_many_arguments)]
async fn guard_last_restrict(
    graph: &GraphClient,
    all: &[ApplicationAccessPolicy],
    app_id: &str,
    removed: Option<AccessRight>,
    added: Option<AccessRight>,
    except: Option<&ApplicationAccessPolicy>,
    allow_unrestricted: bool,
    what: &str,
) -> Result<Option<Vec<String>>, Error> {
    if !leaves_unrestricted(all, app_id, removed, added, except) {
        return Ok(None);
    }
    let held = covered_permissions_held(graph, app_id).await?;
    let widens = rules::removal_widens_access(
        app_id,
        removed,
        added,
        &others(all, except),
        !held.is_empty(),
    );
    if widens && !allow_unrestricted {
        return Err(last_restrict_error(app_id, what, &held));
    }
    Ok(Some(held))
}

/// Start or update the app's propagation check in the change's transaction.
async fn check_after_change(
    tx: &impl GenericClient,
    services: &Services,
    tenant_id: Uuid,
    app_id: &str,
    touched: &[TouchedScope],
    canaries: &[String],
) -> Result<Option<CheckView>, Error> {
    match after_policy_change(tx, services, tenant_id, app_id, touched, canaries).await? {
        Some(c) => Ok(Some(super::checks::view(tx, c).await?)),
        None => Ok(None),
    }
}

/// Resolve `scope` (a scope group alias, or an address) with `Get-Recipient` and check that it
/// can be a policy scope (docs/microsoft-365.md §2.4); invalid with the reason otherwise.
pub async fn resolve_scope(
    services: &Services,
    exo: &ExchangeClient,
    tenant_id: Uuid,
    scope: &str,
) -> Result<Scope, Error> {
    let text = scope.trim().to_ascii_lowercase();
    // A scope group mailscope recorded exists even if Exchange has not replicated it yet (seconds
    // to minutes after New-DistributionGroup): wait for it, whichever of its names the request
    // uses (alias, address as `PUT /scope-groups` returned it, object id). An unknown address
    // fails fast.
    let db = services.db().await?;
    let recorded = store::scope_groups::get_by_any_name(&db, tenant_id, &text).await?;
    drop(db);
    let (identity, replication) = match recorded {
        Some(g) => (g.object_id, Replication::AwaitNew),
        None if text.contains('@') => (text.clone(), Replication::Ignore),
        None => {
            return Err(Error::invalid(
                "scope",
                format!(
                    "mailscope has no scope group `{text}`; create it with PUT /scope-groups/{text}, or give an SMTP address"
                ),
            ));
        }
    };
    let r = exo
        .get_recipient(&identity, replication)
        .await?
        .ok_or_else(|| {
            Error::invalid(
                "scope",
                format!("no recipient `{text}` exists in the tenant"),
            )
        })?;
    if let Some(why) = scope_refusal(&r) {
        return Err(Error::Rejected {
            kind: Rejection::InvalidPolicyScope,
            detail: format!("`{text}` cannot scope an application access policy: {why}"),
            errors: vec![field("scope", why)],
        });
    }
    let object_id = recipient_object_id(&r)
        .ok_or_else(|| Error::internal(anyhow::anyhow!("Get-Recipient returned no object id")))?;
    let db = services.db().await?;
    let alias = store::scope_groups::get_by_object_id(&db, tenant_id, &object_id)
        .await?
        .map(|g| g.alias);
    Ok(Scope {
        ids: ids_of(r.external_directory_object_id.as_deref(), r.guid.as_deref()),
        object_id,
        kind: r.recipient_type_details.clone().unwrap_or_default(),
        address: primary_address(&r).unwrap_or(text),
        alias,
    })
}

/// `New-ApplicationAccessPolicy`; when it fails as if the policy already existed (a create whose
/// answer was lost), look again and return what Exchange has. `true` when created.
pub async fn new_policy(
    exo: &ExchangeClient,
    app_id: &str,
    scope: &Scope,
    right: AccessRight,
    description: &str,
) -> Result<(ApplicationAccessPolicy, bool), Error> {
    let n = NewApplicationAccessPolicy {
        app_ids: vec![app_id.to_string()],
        policy_scope_group_id: scope.object_id.clone(),
        access_right: right,
        description: Some(description.to_string()),
    };
    match exo.new_application_access_policy(&n).await {
        Ok(v) => Ok((
            v.into_iter()
                .find(|p| same_app(p, app_id))
                .unwrap_or_default(),
            true,
        )),
        Err(e) if maybe_exists(&e) => {
            let all = exo.list_application_access_policies().await?;
            match in_tenant(&all, app_id, &scope.ids) {
                Some(p) if p.access_right.as_deref() == Some(right.as_str()) => {
                    Ok((p.clone(), false))
                }
                _ => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Adopt the tenant's policy for the key when it has the requested right (conflict when it has
/// another), else create it. With `require_app`, refuse an app that is not in the tenant first.
/// `true` when created.
async fn adopt_or_create(
    exo: &ExchangeClient,
    all: &[ApplicationAccessPolicy],
    app_id: &str,
    scope: &Scope,
    right: AccessRight,
    description: &str,
    require_app: Option<&TenantHandle>,
) -> Result<(ApplicationAccessPolicy, bool), Error> {
    if let Some(p) = in_tenant(all, app_id, &scope.ids) {
        let tenant_right = p.access_right.clone().unwrap_or_default();
        if tenant_right != right.as_str() {
            return Err(conflict(
                None,
                vec![field(
                    "access_right",
                    format!(
                        "in the tenant: {tenant_right}, requested: {}",
                        right.as_str()
                    ),
                )],
                "the tenant",
            ));
        }
        return Ok((p.clone(), false));
    }
    // A policy for an app that is not in the tenant protects nothing (docs/microsoft-365.md §6.5).
    if let Some(handle) = require_app
        && handle
            .graph()
            .service_principal_by_app_id(app_id)
            .await?
            .is_none()
    {
        return Err(Error::invalid(
            "app_id",
            format!(
                "no app with client id {app_id} has a service principal in this tenant; register or consent the app first (use its client id, not an object id)"
            ),
        ));
    }
    new_policy(exo, app_id, scope, right, description).await
}

/// One policy known to mailscope.
pub async fn get(
    services: &Services,
    tenant_id: Uuid,
    id: Uuid,
) -> Result<AccessPolicyRecord, Error> {
    let db = services.db().await?;
    store::access_policies::get(&db, tenant_id, id)
        .await?
        .ok_or_else(|| policy_not_found(id))
}

/// Create a policy, idempotent by (app id, scope): the same policy again is `Unchanged`, the same
/// key with other settings a conflict listing what differs; a matching policy already in the
/// tenant is `Adopted`, never duplicated.
pub async fn create(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    input: PolicyInput,
) -> Result<Ensured<PolicyChange>, Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let mut errs = Vec::new();
    let app_id = check_app_id(&input.app_id, &mut errs);
    let description = check_description(input.description.as_deref(), &mut errs);
    let canaries = check_canaries(&input.canary_mailboxes, &mut errs);
    if input.scope.trim().is_empty() {
        errs.push(field(
            "scope",
            "name a scope group alias or an SMTP address",
        ));
    }
    if !errs.is_empty() {
        return Err(Error::Invalid(errs));
    }
    let exo = handle.exchange();
    let scope = resolve_scope(services, &exo, tenant_id, &input.scope).await?;
    let right = input.access_right;

    let lease = policy_lease(services, tenant_id).await?;
    let existing = store::access_policies::get_by_key(
        &services.db().await?,
        tenant_id,
        &app_id,
        &scope.object_id,
    )
    .await?;
    if let Some(existing) = existing {
        let mut diffs = Vec::new();
        if existing.access_right != right.as_str() {
            diffs.push(field(
                "access_right",
                format!(
                    "existing: {}, requested: {}",
                    existing.access_right,
                    right.as_str()
                ),
            ));
        }
        if existing.description != description {
            diffs.push(field(
                "description",
                format!(
                    "existing: {:?}, requested: {:?}",
                    existing.description, description
                ),
            ));
        }
        if !diffs.is_empty() {
            return Err(conflict(Some(existing.id), diffs, "mailscope"));
        }
        return Ok(Ensured {
            value: PolicyChange {
                policy: existing,
                check: None,
            },
            change: Change::Unchanged,
        });
    }
    // Look in the tenant before creating: adopt, never duplicate.
    let all = exo.list_application_access_policies().await?;
    let (policy, created) = adopt_or_create(
        &exo,
        &all,
        &app_id,
        &scope,
        right,
        &description,
        Some(&handle),
    )
    .await?;
    // Change point for the propagation check: a created policy is pending until seen in force.
    let record = AccessPolicyRecord {
        id: Uuid::new_v4(),
        tenant_id,
        app_id: app_id.clone(),
        scope_object_id: scope.object_id.clone(),
        scope_type: scope.kind.clone(),
        scope_address: scope.address.clone(),
        scope_alias: scope.alias.clone(),
        access_right: right.as_str().into(),
        description: if created {
            description
        } else {
            policy.description.clone().unwrap_or(description)
        },
        exchange_identity: policy.identity.clone(),
        state: if created {
            PolicyState::PendingPropagation
        } else {
            PolicyState::Unverified
        },
        origin: if created {
            PolicyOrigin::Created
        } else {
            PolicyOrigin::Adopted
        },
        created_at: Utc::now(),
        updated_at: Utc::now(),
    };
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    lease.confirm(&tx).await?;
    let stored = store::access_policies::insert(&tx, &record).await?;
    audit::record(
        &tx,
        actor,
        tenant_id,
        if created {
            "access_policy.created"
        } else {
            "access_policy.adopted"
        },
        &format!("access_policy/{}", stored.id),
        serde_json::json!({"app_id": app_id, "scope_object_id": stored.scope_object_id,
            "scope_address": stored.scope_address, "access_right": stored.access_right,
            "exchange_identity": stored.exchange_identity}),
    )
    .await?;
    let check = check_after_change(&tx, services, tenant_id, &app_id, &[], &canaries).await?;
    tx.commit().await?;
    Ok(Ensured {
        value: PolicyChange {
            policy: stored,
            check,
        },
        change: if created {
            Change::Created
        } else {
            Change::Adopted
        },
    })
}

/// Change a policy's description (the only property Exchange edits in place).
pub async fn describe(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    id: Uuid,
    description: &str,
) -> Result<Ensured<AccessPolicyRecord>, Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let mut errs = Vec::new();
    let description = check_description(Some(description), &mut errs);
    if !errs.is_empty() {
        return Err(Error::Invalid(errs));
    }
    let exo = handle.exchange();
    let lease = policy_lease(services, tenant_id).await?;
    let rec = store::access_policies::get(&services.db().await?, tenant_id, id)
        .await?
        .ok_or_else(|| policy_not_found(id))?;
    if rec.description == description {
        return Ok(Ensured {
            value: rec,
            change: Change::Unchanged,
        });
    }
    let all = exo.list_application_access_policies().await?;
    let identity = record_in_tenant(&all, &rec)
        .and_then(|p| p.identity.clone())
        .ok_or_else(|| gone_from_tenant(id))?;
    exo.set_application_access_policy_description(&identity, &description)
        .await?;
    let old = rec.description.clone();
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    lease.confirm(&tx).await?;
    let stored = store::access_policies::update(
        &tx,
        &AccessPolicyRecord {
            description,
            exchange_identity: Some(identity),
            ..rec
        },
    )
    .await?;
    audit::record(
        &tx,
        actor,
        tenant_id,
        "access_policy.updated",
        &format!("access_policy/{id}"),
        serde_json::json!({"description": {"before": old, "after": stored.description}}),
    )
    .await?;
    tx.commit().await?;
    Ok(Ensured {
        value: stored,
        change: Change::Updated,
    })
}

/// Replace a policy's scope, access right or description, never leaving the app unrestricted in
/// between; turning its last RestrictAccess policy into DenyAccess needs `allow_unrestricted`.
pub async fn replace(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    id: Uuid,
    input: PolicyInput,
    allow_unrestricted: bool,
) -> Result<Ensured<PolicyChange>, Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let mut errs = Vec::new();
    let app_id = check_app_id(&input.app_id, &mut errs);
    let description = check_description(input.description.as_deref(), &mut errs);
    let canaries = check_canaries(&input.canary_mailboxes, &mut errs);
    if !errs.is_empty() {
        return Err(Error::Invalid(errs));
    }
    let exo = handle.exchange();
    let scope = resolve_scope(services, &exo, tenant_id, &input.scope).await?;
    let right = input.access_right;

    let lease = policy_lease(services, tenant_id).await?;
    let rec = store::access_policies::get(&services.db().await?, tenant_id, id)
        .await?
        .ok_or_else(|| policy_not_found(id))?;
    if rec.app_id != app_id {
        return Err(Error::invalid(
            "app_id",
            format!(
                "a policy's app cannot change (this one is {}); create a policy for the other app instead",
                rec.app_id
            ),
        ));
    }
    let same_scope = scope.ids.contains(&rec.scope_object_id);
    let old_right = rec.right();
    if same_scope && old_right == right && rec.description == description {
        return Ok(Ensured {
            value: PolicyChange {
                policy: rec,
                check: None,
            },
            change: Change::Unchanged,
        });
    }
    let all = exo.list_application_access_policies().await?;
    let old_in_tenant = record_in_tenant(&all, &rec).cloned();
    // The app stays restricted if the new policy restricts or another RestrictAccess remains.
    guard_last_restrict(
        &handle.graph(),
        &all,
        &app_id,
        Some(old_right),
        Some(right),
        old_in_tenant.as_ref(),
        allow_unrestricted,
        "This replacement",
    )
    .await?;
    let before = serde_json::json!({"scope_object_id": rec.scope_object_id,
        "scope_address": rec.scope_address, "access_right": rec.access_right});
    let (new_policy_obj, order, origin) = if same_scope && old_right == right {
        // Description only: edit in place.
        let identity = old_in_tenant
            .as_ref()
            .and_then(|p| p.identity.clone())
            .ok_or_else(|| gone_from_tenant(id))?;
        exo.set_application_access_policy_description(&identity, &description)
            .await?;
        let p = ApplicationAccessPolicy {
            identity: Some(identity),
            ..Default::default()
        };
        (p, ReplaceOrder::SetDescription, rec.origin)
    } else if same_scope {
        // Exchange keys policies by app and scope: the old must go before the new can exist.
        if let Some(old) = old_in_tenant.as_ref().and_then(|p| p.identity.clone()) {
            exo.remove_application_access_policy(&old).await?;
        }
        match new_policy(&exo, &app_id, &scope, right, &description).await {
            Ok((p, _)) => (p, ReplaceOrder::RemoveThenCreate, PolicyOrigin::Created),
            Err(e) => {
                // Put the old policy back so the app keeps the restriction it had.
                let restore = new_policy(&exo, &app_id, &scope, old_right, &rec.description).await;
                if restore.is_err() {
                    tracing::error!(policy = %id, "replacement failed and the old policy could not be restored");
                }
                return Err(e);
            }
        }
    } else {
        let other = store::access_policies::get_by_key(
            &services.db().await?,
            tenant_id,
            &app_id,
            &scope.object_id,
        )
        .await?;
        if let Some(other) = other {
            return Err(conflict(
                Some(other.id),
                vec![field(
                    "scope",
                    format!(
                        "policy {} already covers this app and scope; delete this one instead",
                        other.id
                    ),
                )],
                "mailscope",
            ));
        }
        let (p, created) =
            adopt_or_create(&exo, &all, &app_id, &scope, right, &description, None).await?;
        // Only now, with the new policy in place, remove the old one.
        if let Some(old) = old_in_tenant.as_ref().and_then(|p| p.identity.clone()) {
            exo.remove_application_access_policy(&old).await?;
        }
        let origin = if created {
            PolicyOrigin::Created
        } else {
            PolicyOrigin::Adopted
        };
        (p, ReplaceOrder::CreateThenRemove, origin)
    };
    // Change point for the propagation check: the replacement is pending until seen in force.
    let touched = [TouchedScope {
        address: rec.scope_address.clone(),
        alias: rec.scope_alias.clone(),
    }];
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    lease.confirm(&tx).await?;
    let stored = store::access_policies::update(
        &tx,
        &AccessPolicyRecord {
            scope_object_id: scope.object_id.clone(),
            scope_type: scope.kind.clone(),
            scope_address: scope.address.clone(),
            scope_alias: scope.alias.clone(),
            access_right: right.as_str().into(),
            description,
            exchange_identity: new_policy_obj
                .identity
                .clone()
                .or(rec.exchange_identity.clone()),
            state: PolicyState::PendingPropagation,
            origin,
            ..rec
        },
    )
    .await?;
    let in_place = order == ReplaceOrder::SetDescription;
    audit::record(
        &tx,
        actor,
        tenant_id,
        if in_place {
            "access_policy.updated"
        } else {
            "access_policy.replaced"
        },
        &format!("access_policy/{id}"),
        serde_json::json!({"before": before, "after": {"scope_object_id": stored.scope_object_id,
            "scope_address": stored.scope_address, "access_right": stored.access_right},
            "order": order.as_str(), "allow_unrestricted": allow_unrestricted}),
    )
    .await?;
    let check = if in_place {
        None
    } else {
        check_after_change(&tx, services, tenant_id, &app_id, &touched, &canaries).await?
    };
    tx.commit().await?;
    Ok(Ensured {
        value: PolicyChange {
            policy: stored,
            check,
        },
        change: Change::Updated,
    })
}

/// Delete a policy from the tenant and from mailscope; refused when it is the app's last
/// RestrictAccess policy unless `allow_unrestricted`. Returns the check the removal started.
pub async fn delete(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    id: Uuid,
    allow_unrestricted: bool,
) -> Result<Option<CheckView>, Error> {
    delete_with(services, actor, tenant_id, id, allow_unrestricted, true).await
}

/// Delete a policy (never the last RestrictAccess one of an app holding covered Entra
/// permissions) without starting an access-policy propagation check: for the RBAC migration,
/// which verifies the app through its RBAC check instead (an access-policy check of an app
/// without policies would only report rule 4).
pub async fn delete_quietly(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    id: Uuid,
) -> Result<(), Error> {
    delete_with(services, actor, tenant_id, id, false, false)
        .await
        .map(|_| ())
}

async fn delete_with(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    id: Uuid,
    allow_unrestricted: bool,
    start_check: bool,
) -> Result<Option<CheckView>, Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let exo = handle.exchange();
    let lease = policy_lease(services, tenant_id).await?;
    let rec = store::access_policies::get(&services.db().await?, tenant_id, id)
        .await?
        .ok_or_else(|| policy_not_found(id))?;
    let all = exo.list_application_access_policies().await?;
    let live = record_in_tenant(&all, &rec).cloned();
    let removed_right = live.as_ref().and_then(tenant_right);
    let held = guard_last_restrict(
        &handle.graph(),
        &all,
        &rec.app_id,
        removed_right,
        None,
        live.as_ref(),
        allow_unrestricted,
        "Deleting this policy",
    )
    .await?;
    let left_unrestricted = held.is_some();
    let removed = match live.as_ref().and_then(|p| p.identity.clone()) {
        Some(identity) => exo.remove_application_access_policy(&identity).await?,
        None => false,
    };
    // Change point for the propagation check: a removal takes up to 30 minutes to apply (docs/microsoft-365.md §2.1).
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    lease.confirm(&tx).await?;
    store::access_policies::delete(&tx, tenant_id, id).await?;
    audit::record(
        &tx,
        actor,
        tenant_id,
        "access_policy.deleted",
        &format!("access_policy/{id}"),
        serde_json::json!({"app_id": rec.app_id, "scope_object_id": rec.scope_object_id,
            "access_right": rec.access_right, "removed_from_tenant": removed,
            "left_unrestricted": left_unrestricted,
            "covered_permissions_held": held.unwrap_or_default()}),
    )
    .await?;
    let touched = [TouchedScope {
        address: rec.scope_address.clone(),
        alias: rec.scope_alias.clone(),
    }];
    let check = if start_check {
        check_after_change(&tx, services, tenant_id, &rec.app_id, &touched, &[]).await?
    } else {
        None
    };
    tx.commit().await?;
    Ok(check)
}
