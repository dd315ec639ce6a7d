//! `/v1/tenants/{tenant_id}/access-policies`, `/access-tests` and `/sync`: application access
//! policies (reference §2, pitfalls §6.3–6.5, 6.10–6.12).
//!
//! A policy is identified by (app id, scope object id), never by Exchange's generated Identity;
//! mailscope's own UUID is the API id. Every writer of a tenant's policies (and `/sync`) holds
//! one transaction-scoped advisory lock for the tenant, then looks the key up in its records and
//! in the tenant before creating anything: concurrent duplicates create one policy, and a retry
//! after a crash between Exchange's create and mailscope's write adopts what Exchange has.
//!
//! Safety rules:
//! - a replacement (`PUT`) creates the new policy **before** removing the old one, so the interim
//!   state is the union of both scopes, never unrestricted (§6.11). Exchange cannot hold two
//!   policies for one app and scope, so a change of access right alone is done remove-then-create;
//! - removing (or turning into DenyAccess) an app's last RestrictAccess policy, which silently
//!   gives the app every mailbox (rule 4), is refused with 409 unless `?allow_unrestricted=true`.
//!
//! Change points for the propagation check (each runs inside the request's transaction, so a
//! job enqueued there commits with the change): [`create_policy`] after `New-…`, [`put_access_policy`]
//! after the old policy is removed, and [`delete_access_policy`] after `Remove-…`.
use std::collections::{BTreeMap, BTreeSet};

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::audit::record as audit;
use super::problem::{ApiError, FieldError, Problem, ProblemKind};
use super::propagation_checks::{PropagationCheck, link_header, view as check_view};
use super::tenants::tenant_handle;
use super::{AppState, page_limit};
use crate::auth::{Caller, Role};
use crate::domain::access::AccessRight;
use crate::domain::access::{self as rules, ALL_APPS, AccessRule, GroupMembers, NestedGroups};
use crate::m365::exchange::{
    ApplicationAccessPolicy, ExchangeClient, NewApplicationAccessPolicy, Recipient, Replication,
};
use crate::provisioning::checks::{TouchedScope, after_policy_change};
use crate::provisioning::scope_groups::{
    POLICY_LOCK, current_members_of, ids_of, lock_group, maybe_exists, primary_address,
    recipient_object_id, scope_refusal,
};
use crate::store::{self, access_policies::AccessPolicyRecord};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/tenants/{tenant_id}/access-policies")
            .route(web::post().to(create_policy))
            .route(web::get().to(list_access_policies)),
    )
    .service(
        web::resource("/tenants/{tenant_id}/access-policies/{id}")
            .route(web::get().to(get_access_policy))
            .route(web::patch().to(patch_access_policy))
            .route(web::put().to(put_access_policy))
            .route(web::delete().to(delete_access_policy)),
    )
    .route(
        "/tenants/{tenant_id}/access-tests",
        web::post().to(access_test),
    )
    .route("/tenants/{tenant_id}/sync", web::post().to(sync));
}

/// Longest description accepted (descriptions eat into the tenant's policy budget, §2.6).
const MAX_DESCRIPTION: usize = 1000;
/// Most groups expanded when evaluating nested membership locally.
const MAX_GROUPS_EXPANDED: usize = 50;

/// A policy to create (`POST`) or the replacement of one (`PUT`, where `app_id` must stay).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "app_id": "b9701c1e-1364-464d-93e4-01ae925e8d6c",
    "scope": "crm-scope",
    "access_right": "RestrictAccess",
    "description": "CRM connector: sales mailboxes only"
}))]
pub struct AccessPolicyInput {
    /// The app's client id (not an object id, §6.5).
    pub app_id: String,
    /// A scope group's alias, or the SMTP address of a scope group, user mailbox or mail user.
    pub scope: String,
    pub access_right: AccessRight,
    /// Omitted: a single space, the smallest value, so the tenant fits the most policies (§2.6).
    pub description: Option<String>,
    /// Mailboxes the app must not reach, checked by the propagation check (besides the tenant's).
    #[serde(default)]
    pub canary_mailboxes: Vec<String>,
}

/// The only property Exchange lets change in place.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"description": "CRM connector: sales and support"}))]
pub struct AccessPolicyPatch {
    pub description: String,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct GuardQuery {
    /// Accept that the app loses its last RestrictAccess policy and so reaches every mailbox.
    #[serde(default)]
    pub allow_unrestricted: bool,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PolicyListQuery {
    /// Only this app's policies (client id).
    pub app_id: Option<String>,
    /// Page size, 1–500 (default 50).
    pub limit: Option<i64>,
    /// Cursor: the `next_after` of the previous page.
    pub after: Option<Uuid>,
}

#[derive(Serialize, ToSchema)]
pub struct AccessPolicy {
    /// mailscope's id for the policy.
    pub id: Uuid,
    #[schema(example = "b9701c1e-1364-464d-93e4-01ae925e8d6c")]
    pub app_id: String,
    /// Entra object id of the scope: with `app_id`, the policy's key.
    pub scope_object_id: String,
    /// `MailUniversalSecurityGroup`, `UserMailbox` or `MailUser`.
    #[schema(example = "MailUniversalSecurityGroup")]
    pub scope_type: String,
    pub scope_address: String,
    /// The scope group's alias when the scope is one of mailscope's scope groups.
    pub scope_alias: Option<String>,
    pub access_right: AccessRight,
    pub description: String,
    /// Exchange's generated Identity (informational; never used as a key).
    pub exchange_identity: Option<String>,
    /// `pending_propagation` (written; Microsoft takes 30 minutes to hours to apply it),
    /// `in_force`, or `unverified` (found in the tenant, never checked by mailscope).
    #[schema(example = "pending_propagation")]
    pub state: String,
    /// `created` by mailscope, `adopted` (found in the tenant on create) or `imported` (by sync).
    #[schema(example = "created")]
    pub origin: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The check started (or updated) by this change; also linked by the `Link` header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub propagation_check: Option<PropagationCheck>,
}

#[derive(Serialize, ToSchema)]
pub struct AccessPolicyList {
    pub items: Vec<AccessPolicy>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next_after: Option<Uuid>,
}

fn right_of(s: &str) -> AccessRight {
    if s == "DenyAccess" {
        AccessRight::DenyAccess
    } else {
        AccessRight::RestrictAccess
    }
}

pub(crate) fn view(r: AccessPolicyRecord) -> AccessPolicy {
    AccessPolicy {
        id: r.id,
        app_id: r.app_id,
        scope_object_id: r.scope_object_id,
        scope_type: r.scope_type,
        scope_address: r.scope_address,
        scope_alias: r.scope_alias,
        access_right: right_of(&r.access_right),
        description: r.description,
        exchange_identity: r.exchange_identity,
        state: r.state,
        origin: r.origin,
        created_at: r.created_at,
        updated_at: r.updated_at,
        propagation_check: None,
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

/// Start or update the app's propagation check in the change's transaction.
async fn check_after_change(
    tx: &impl deadpool_postgres::GenericClient,
    state: &AppState,
    tenant_id: Uuid,
    app_id: &str,
    touched: &[TouchedScope],
    canaries: &[String],
) -> Result<Option<PropagationCheck>, ApiError> {
    match after_policy_change(tx, state, tenant_id, app_id, touched, canaries).await? {
        Some(c) => Ok(Some(check_view(tx, c).await?)),
        None => Ok(None),
    }
}

fn field(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

fn check_app_id(s: &str, name: &str, errs: &mut Vec<FieldError>) -> String {
    match s.trim().parse::<Uuid>() {
        Ok(u) => u.to_string(),
        Err(_) => {
            errs.push(field(name, "must be the app's client id (a GUID)"));
            String::new()
        }
    }
}

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

/// A policy scope, resolved in the tenant.
#[derive(Debug, Clone)]
struct Scope {
    object_id: String,
    /// Every id Exchange may report for it in `ScopeIdentityRaw`.
    ids: Vec<String>,
    kind: String,
    address: String,
    alias: Option<String>,
}

/// Resolve `scope` (a scope group alias, or an address) with `Get-Recipient` and check that it
/// can be a policy scope (§2.4); 422 with the reason otherwise.
async fn resolve_scope(
    state: &AppState,
    exo: &ExchangeClient,
    tenant_id: Uuid,
    scope: &str,
) -> Result<Scope, ApiError> {
    let text = scope.trim().to_ascii_lowercase();
    // A scope group mailscope recorded exists even if Exchange has not replicated it yet (seconds
    // to minutes after New-DistributionGroup): wait for it. An unknown address fails fast.
    let mut replication = Replication::Ignore;
    let identity = if text.contains('@') {
        text.clone()
    } else {
        let db = state.db().await?;
        match store::scope_groups::get(&db, tenant_id, &text).await? {
            Some(g) => {
                replication = Replication::AwaitNew;
                g.object_id
            }
            None => {
                return Err(ApiError::validation(vec![field(
                    "scope",
                    format!(
                        "mailscope has no scope group `{text}`; create it with PUT /scope-groups/{text}, or give an SMTP address"
                    ),
                )]));
            }
        }
    };
    let r = exo
        .get_recipient(&identity, replication)
        .await?
        .ok_or_else(|| {
            ApiError::validation(vec![field(
                "scope",
                format!("no recipient `{text}` exists in the tenant"),
            )])
        })?;
    if let Some(why) = scope_refusal(&r) {
        return Err(ApiError {
            errors: vec![field("scope", why.clone())],
            ..ApiError::new(
                ProblemKind::InvalidPolicyScope,
                format!("`{text}` cannot scope an application access policy: {why}"),
            )
        });
    }
    let object_id = recipient_object_id(&r).ok_or_else(|| {
        ApiError::internal(anyhow::anyhow!("Get-Recipient returned no object id"))
    })?;
    let db = state.db().await?;
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

fn same_app(p: &ApplicationAccessPolicy, app_id: &str) -> bool {
    p.app_id
        .as_deref()
        .is_some_and(|a| a.eq_ignore_ascii_case(app_id))
}

fn scope_guid(p: &ApplicationAccessPolicy) -> Option<String> {
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

/// Would the app keep a RestrictAccess policy if `except` were gone? (`*` policies count.)
fn other_restrict_remains(
    all: &[ApplicationAccessPolicy],
    app_id: &str,
    except: Option<&ApplicationAccessPolicy>,
) -> bool {
    all.iter().any(|p| {
        Some(p) != except
            && (same_app(p, app_id) || p.app_id.as_deref() == Some(ALL_APPS))
            && p.access_right.as_deref() == Some("RestrictAccess")
    })
}

fn last_restrict_error(app_id: &str, what: &str) -> ApiError {
    ApiError::new(
        ProblemKind::LastRestrictPolicy,
        format!(
            "{what} would leave app {app_id} without any RestrictAccess policy, which gives it every mailbox in the tenant (rule 4, reference §2.3). Revoke the app's mail permissions first, or repeat with ?allow_unrestricted=true to accept that."
        ),
    )
}

async fn lock_policies(
    c: &impl deadpool_postgres::GenericClient,
    tenant_id: Uuid,
) -> Result<(), ApiError> {
    store::lock_key(c, POLICY_LOCK, &tenant_id.to_string()).await?;
    Ok(())
}

fn policy_not_found(id: Uuid) -> ApiError {
    ApiError::not_found(format!(
        "mailscope has no access policy {id} in this tenant"
    ))
}

/// `New-ApplicationAccessPolicy`; when it fails as if the policy already existed (a create whose
/// answer was lost), look again and return what Exchange has.
async fn new_policy(
    exo: &ExchangeClient,
    app_id: &str,
    scope: &Scope,
    right: AccessRight,
    description: &str,
) -> Result<(ApplicationAccessPolicy, bool), ApiError> {
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

fn conflict(existing_id: Option<Uuid>, diffs: Vec<FieldError>, where_: &str) -> ApiError {
    let id = existing_id.map_or(String::new(), |i| format!(" ({i})"));
    ApiError {
        errors: diffs,
        ..ApiError::new(
            ProblemKind::PolicyConflict,
            format!(
                "{where_}{id} already has a policy for this app and scope with different settings; see `errors`. Change it with PUT or PATCH /access-policies/{{id}}."
            ),
        )
    }
}

/// Create an application access policy.
///
/// Idempotent by (app id, scope): the same policy again answers 200 with the existing one; the
/// same key with a different access right or description answers 409 listing what differs. A
/// matching policy already in the tenant is adopted (200), never duplicated.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/access-policies", tag = "access policies",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Replays the stored response for a repeated request")),
    request_body = AccessPolicyInput,
    responses(
        (status = 201, description = "created in the tenant", body = AccessPolicy),
        (status = 200, description = "already existed (in mailscope, or adopted from the tenant)", body = AccessPolicy),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "same app and scope with other settings (`policy_conflict`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid content, unknown scope, a scope type Exchange refuses (`invalid_policy_scope`), app not in the tenant, or the tenant's policy limit (`policy_limit_reached`)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft 365 refused or failed (the code names the cause)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "database unavailable or Microsoft throttling (see Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn create_policy(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
    body: web::Json<AccessPolicyInput>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let tenant_id = path.into_inner();
    let (_, handle) = tenant_handle(&state, &caller, tenant_id).await?;
    let input = body.into_inner();
    let mut errs = Vec::new();
    let app_id = check_app_id(&input.app_id, "app_id", &mut errs);
    let description = check_description(input.description.as_deref(), &mut errs);
    let canaries = check_canaries(&input.canary_mailboxes, &mut errs);
    if input.scope.trim().is_empty() {
        errs.push(field(
            "scope",
            "name a scope group alias or an SMTP address",
        ));
    }
    if !errs.is_empty() {
        return Err(ApiError::validation(errs));
    }
    let exo = handle.exchange();
    let scope = resolve_scope(&state, &exo, tenant_id, &input.scope).await?;
    let right = input.access_right;

    let mut db = state.db().await?;
    let tx = db.transaction().await.map_err(store::StoreError::from)?;
    lock_policies(&tx, tenant_id).await?;
    if let Some(existing) =
        store::access_policies::get_by_key(&tx, tenant_id, &app_id, &scope.object_id).await?
    {
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
        tx.commit().await.map_err(store::StoreError::from)?;
        if !diffs.is_empty() {
            return Err(conflict(Some(existing.id), diffs, "mailscope"));
        }
        return Ok(HttpResponse::Ok().json(view(existing)));
    }
    // Look in the tenant before creating: adopt, never duplicate.
    let all = exo.list_application_access_policies().await?;
    let (policy, created) = match in_tenant(&all, &app_id, &scope.ids) {
        Some(p) => {
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
            (p.clone(), false)
        }
        None => {
            // A policy for an app that is not in the tenant protects nothing (§6.5).
            if handle
                .graph()
                .service_principal_by_app_id(&app_id)
                .await?
                .is_none()
            {
                return Err(ApiError::validation(vec![field(
                    "app_id",
                    format!(
                        "no app with client id {app_id} has a service principal in this tenant; register or consent the app first (use its client id, not an object id)"
                    ),
                )]));
            }
            new_policy(&exo, &app_id, &scope, right, &description).await?
        }
    };
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
            "pending_propagation".into()
        } else {
            "unverified".into()
        },
        origin: if created { "created" } else { "adopted" }.into(),
        created_at: Utc::now(),
        updated_at: Utc::now(),
    };
    let stored = store::access_policies::insert(&tx, &record).await?;
    audit(
        &tx,
        &caller,
        &req,
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
    let check = check_after_change(&tx, &state, tenant_id, &app_id, &[], &canaries).await?;
    tx.commit().await.map_err(store::StoreError::from)?;
    let location = format!("{}/{}", req.path(), stored.id);
    let mut v = view(stored);
    let link = check.as_ref().map(|c| link_header(tenant_id, c.id));
    v.propagation_check = check;
    let mut res = if created {
        let mut b = HttpResponse::Created();
        b.insert_header((header::LOCATION, location));
        b
    } else {
        let mut b = HttpResponse::Ok();
        b.insert_header((header::CONTENT_LOCATION, location));
        b
    };
    if let Some(l) = link {
        res.insert_header(l);
    }
    Ok(res.json(v))
}

/// The tenant's policies known to mailscope, optionally one app's.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/access-policies", tag = "access policies",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"), PolicyListQuery),
    responses(
        (status = 200, description = "a page of policies", body = AccessPolicyList),
        (status = 400, description = "invalid query", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "tenant not visible", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list_access_policies(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
    q: web::Query<PolicyListQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let tenant_id = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let limit = page_limit(q.limit)?;
    let app_id = match &q.app_id {
        Some(a) => Some(
            a.trim()
                .parse::<Uuid>()
                .map_err(|_| {
                    ApiError::new(
                        ProblemKind::InvalidQuery,
                        "app_id must be a client id (GUID)",
                    )
                })?
                .to_string(),
        ),
        None => None,
    };
    let db = state.db().await?;
    super::require_registered(&db, tenant_id).await?;
    let rows =
        store::access_policies::list(&db, tenant_id, app_id.as_deref(), q.after, limit + 1).await?;
    let (rows, more) = super::split_page(rows, limit);
    let items: Vec<AccessPolicy> = rows.into_iter().map(view).collect();
    let next_after = if more {
        items.last().map(|p| p.id)
    } else {
        None
    };
    Ok(HttpResponse::Ok().json(AccessPolicyList { items, next_after }))
}

/// One policy.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/access-policies/{id}", tag = "access policies",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("id" = Uuid, Path, description = "mailscope's policy id")),
    responses(
        (status = 200, description = "the policy", body = AccessPolicy),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown policy, or tenant not visible", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get_access_policy(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, Uuid)>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let (tenant_id, id) = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let db = state.db().await?;
    let rec = store::access_policies::get(&db, tenant_id, id)
        .await?
        .ok_or_else(|| policy_not_found(id))?;
    Ok(HttpResponse::Ok().json(view(rec)))
}

/// Change a policy's description (the only property Exchange edits in place).
#[utoipa::path(patch, path = "/v1/tenants/{tenant_id}/access-policies/{id}", tag = "access policies",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("id" = Uuid, Path, description = "mailscope's policy id")),
    request_body = AccessPolicyPatch,
    responses(
        (status = 200, description = "updated (or unchanged)", body = AccessPolicy),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown policy, or tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the policy was removed from the tenant outside mailscope", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid description, or the tenant's policy size limit", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn patch_access_policy(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, Uuid)>,
    body: web::Json<AccessPolicyPatch>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, id) = path.into_inner();
    let (_, handle) = tenant_handle(&state, &caller, tenant_id).await?;
    let mut errs = Vec::new();
    let description = check_description(Some(&body.description), &mut errs);
    if !errs.is_empty() {
        return Err(ApiError::validation(errs));
    }
    let exo = handle.exchange();
    let mut db = state.db().await?;
    let tx = db.transaction().await.map_err(store::StoreError::from)?;
    lock_policies(&tx, tenant_id).await?;
    let rec = store::access_policies::get(&tx, tenant_id, id)
        .await?
        .ok_or_else(|| policy_not_found(id))?;
    if rec.description == description {
        tx.commit().await.map_err(store::StoreError::from)?;
        return Ok(HttpResponse::Ok().json(view(rec)));
    }
    let all = exo.list_application_access_policies().await?;
    let identity = record_in_tenant(&all, &rec)
        .and_then(|p| p.identity.clone())
        .ok_or_else(|| gone_from_tenant(id))?;
    exo.set_application_access_policy_description(&identity, &description)
        .await?;
    let old = rec.description.clone();
    let stored = store::access_policies::update(
        &tx,
        &AccessPolicyRecord {
            description,
            exchange_identity: Some(identity),
            ..rec
        },
    )
    .await?;
    audit(
        &tx,
        &caller,
        &req,
        tenant_id,
        "access_policy.updated",
        &format!("access_policy/{id}"),
        serde_json::json!({"description": {"before": old, "after": stored.description}}),
    )
    .await?;
    tx.commit().await.map_err(store::StoreError::from)?;
    Ok(HttpResponse::Ok().json(view(stored)))
}

fn gone_from_tenant(id: Uuid) -> ApiError {
    ApiError::conflict(format!(
        "access policy {id} no longer exists in the tenant (removed outside mailscope); POST /sync to reconcile, then create it again"
    ))
}

/// Replace a policy's scope or access right.
///
/// The new policy is created **before** the old one is removed, so the app is never
/// unrestricted in between (the interim state is the union of both scopes). Exchange cannot hold
/// two policies for one app and scope, so changing only the access right removes the old policy
/// first; access in that moment never exceeds what the old or the new policy grants. Turning the
/// app's last RestrictAccess policy into DenyAccess needs `?allow_unrestricted=true`.
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/access-policies/{id}", tag = "access policies",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("id" = Uuid, Path, description = "mailscope's policy id"), GuardQuery),
    request_body = AccessPolicyInput,
    responses(
        (status = 200, description = "replaced (or already as requested)", body = AccessPolicy),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown policy, or tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "another policy has the new key (`policy_conflict`), or the app would lose its last RestrictAccess policy (`last_restrict_policy`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid content, `app_id` changed, or a scope Exchange refuses", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft 365 refused or failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn put_access_policy(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, Uuid)>,
    q: web::Query<GuardQuery>,
    body: web::Json<AccessPolicyInput>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, id) = path.into_inner();
    let (_, handle) = tenant_handle(&state, &caller, tenant_id).await?;
    let input = body.into_inner();
    let mut errs = Vec::new();
    let app_id = check_app_id(&input.app_id, "app_id", &mut errs);
    let description = check_description(input.description.as_deref(), &mut errs);
    let canaries = check_canaries(&input.canary_mailboxes, &mut errs);
    if !errs.is_empty() {
        return Err(ApiError::validation(errs));
    }
    let exo = handle.exchange();
    let scope = resolve_scope(&state, &exo, tenant_id, &input.scope).await?;
    let right = input.access_right;

    let mut db = state.db().await?;
    let tx = db.transaction().await.map_err(store::StoreError::from)?;
    lock_policies(&tx, tenant_id).await?;
    let rec = store::access_policies::get(&tx, tenant_id, id)
        .await?
        .ok_or_else(|| policy_not_found(id))?;
    if rec.app_id != app_id {
        return Err(ApiError::validation(vec![field(
            "app_id",
            format!(
                "a policy's app cannot change (this one is {}); create a policy for the other app instead",
                rec.app_id
            ),
        )]));
    }
    let same_scope = scope.ids.contains(&rec.scope_object_id);
    let old_right = right_of(&rec.access_right);
    if same_scope && old_right == right && rec.description == description {
        tx.commit().await.map_err(store::StoreError::from)?;
        return Ok(HttpResponse::Ok().json(view(rec)));
    }
    let all = exo.list_application_access_policies().await?;
    let old_in_tenant = record_in_tenant(&all, &rec).cloned();
    // The app stays restricted if the new policy restricts or another RestrictAccess remains.
    if old_right == AccessRight::RestrictAccess
        && right == AccessRight::DenyAccess
        && !q.allow_unrestricted
        && !other_restrict_remains(&all, &app_id, old_in_tenant.as_ref())
    {
        return Err(last_restrict_error(&app_id, "This replacement"));
    }
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
        (p, "set_description", rec.origin.clone())
    } else if same_scope {
        // Exchange keys policies by app and scope: the old must go before the new can exist.
        if let Some(old) = old_in_tenant.as_ref().and_then(|p| p.identity.clone()) {
            exo.remove_application_access_policy(&old).await?;
        }
        match new_policy(&exo, &app_id, &scope, right, &description).await {
            Ok((p, _)) => (p, "remove_then_create", "created".to_string()),
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
        if let Some(other) =
            store::access_policies::get_by_key(&tx, tenant_id, &app_id, &scope.object_id).await?
        {
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
        let (p, origin) = match in_tenant(&all, &app_id, &scope.ids) {
            Some(p) if p.access_right.as_deref() == Some(right.as_str()) => (p.clone(), "adopted"),
            Some(p) => {
                return Err(conflict(
                    None,
                    vec![field(
                        "access_right",
                        format!(
                            "in the tenant: {}, requested: {}",
                            p.access_right.clone().unwrap_or_default(),
                            right.as_str()
                        ),
                    )],
                    "the tenant",
                ));
            }
            None => {
                let (p, created) = new_policy(&exo, &app_id, &scope, right, &description).await?;
                (p, if created { "created" } else { "adopted" })
            }
        };
        // Only now, with the new policy in place, remove the old one.
        if let Some(old) = old_in_tenant.as_ref().and_then(|p| p.identity.clone()) {
            exo.remove_application_access_policy(&old).await?;
        }
        (p, "create_then_remove", origin.to_string())
    };
    // Change point for the propagation check: the replacement is pending until seen in force.
    let touched = [TouchedScope {
        address: rec.scope_address.clone(),
        alias: rec.scope_alias.clone(),
    }];
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
            state: "pending_propagation".into(),
            origin,
            ..rec
        },
    )
    .await?;
    audit(
        &tx,
        &caller,
        &req,
        tenant_id,
        if order == "set_description" {
            "access_policy.updated"
        } else {
            "access_policy.replaced"
        },
        &format!("access_policy/{id}"),
        serde_json::json!({"before": before, "after": {"scope_object_id": stored.scope_object_id,
            "scope_address": stored.scope_address, "access_right": stored.access_right},
            "order": order, "allow_unrestricted": q.allow_unrestricted}),
    )
    .await?;
    let check = if order == "set_description" {
        None
    } else {
        check_after_change(&tx, &state, tenant_id, &app_id, &touched, &canaries).await?
    };
    tx.commit().await.map_err(store::StoreError::from)?;
    let mut v = view(stored);
    let mut res = HttpResponse::Ok();
    if let Some(c) = &check {
        res.insert_header(link_header(tenant_id, c.id));
    }
    v.propagation_check = check;
    Ok(res.json(v))
}

/// Delete a policy from the tenant and from mailscope.
///
/// Refused (409 `last_restrict_policy`) when it is the app's last RestrictAccess policy, because
/// that silently gives the app every mailbox, unless `?allow_unrestricted=true`.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/access-policies/{id}", tag = "access policies",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("id" = Uuid, Path, description = "mailscope's policy id"), GuardQuery),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown policy, or tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the app's last RestrictAccess policy (`last_restrict_policy`)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft 365 refused or failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete_access_policy(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, Uuid)>,
    q: web::Query<GuardQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, id) = path.into_inner();
    let (_, handle) = tenant_handle(&state, &caller, tenant_id).await?;
    let exo = handle.exchange();
    let mut db = state.db().await?;
    let tx = db.transaction().await.map_err(store::StoreError::from)?;
    lock_policies(&tx, tenant_id).await?;
    let rec = store::access_policies::get(&tx, tenant_id, id)
        .await?
        .ok_or_else(|| policy_not_found(id))?;
    let all = exo.list_application_access_policies().await?;
    let live = record_in_tenant(&all, &rec).cloned();
    let removes_restrict = live
        .as_ref()
        .is_some_and(|p| p.access_right.as_deref() == Some("RestrictAccess"));
    let left_unrestricted =
        removes_restrict && !other_restrict_remains(&all, &rec.app_id, live.as_ref());
    if left_unrestricted && !q.allow_unrestricted {
        return Err(last_restrict_error(&rec.app_id, "Deleting this policy"));
    }
    let removed = match live.as_ref().and_then(|p| p.identity.clone()) {
        Some(identity) => exo.remove_application_access_policy(&identity).await?,
        None => false,
    };
    // Change point for the propagation check: a removal takes up to 30 minutes to apply (§2.1).
    store::access_policies::delete(&tx, tenant_id, id).await?;
    audit(
        &tx,
        &caller,
        &req,
        tenant_id,
        "access_policy.deleted",
        &format!("access_policy/{id}"),
        serde_json::json!({"app_id": rec.app_id, "scope_object_id": rec.scope_object_id,
            "access_right": rec.access_right, "removed_from_tenant": removed,
            "left_unrestricted": left_unrestricted}),
    )
    .await?;
    let touched = [TouchedScope {
        address: rec.scope_address.clone(),
        alias: rec.scope_alias.clone(),
    }];
    let check = check_after_change(&tx, &state, tenant_id, &rec.app_id, &touched, &[]).await?;
    tx.commit().await.map_err(store::StoreError::from)?;
    // 204 has no body: the check is linked by the header only.
    let mut res = HttpResponse::NoContent();
    if let Some(c) = &check {
        res.insert_header(link_header(tenant_id, c.id));
    }
    Ok(res.finish())
}

// ---------- access tests ----------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"app_id": "b9701c1e-1364-464d-93e4-01ae925e8d6c", "mailbox": "bob@contoso-sandbox.onmicrosoft.com"}))]
pub struct AccessTestInput {
    /// The app's client id.
    pub app_id: String,
    /// The mailbox's address.
    pub mailbox: String,
}

#[derive(Serialize, ToSchema)]
pub struct ExchangeVerdict {
    /// `AccessCheckResult` of `Test-ApplicationAccessPolicy`: `Granted` or `Denied`.
    #[schema(example = "Denied")]
    pub access_check_result: Option<String>,
    pub granted: Option<bool>,
}

#[derive(Serialize, ToSchema)]
pub struct LocalVerdict {
    pub granted: bool,
    /// Which of the four rules decided: `deny_match`, `restrict_match`, `restrict_miss` or
    /// `no_policy` (reference §2.3).
    #[schema(example = "restrict_miss")]
    pub rule: String,
    /// mailscope's ids of the policies that matched the app and the mailbox.
    pub matched_policies: Vec<Uuid>,
    /// How nested groups were counted (`transitive`, as the current documentation says).
    #[schema(example = "transitive")]
    pub nested_groups: String,
}

#[derive(Serialize, ToSchema)]
pub struct AccessTestResult {
    pub app_id: String,
    pub mailbox: String,
    pub mailbox_object_id: String,
    /// What Exchange says now (it sees changes before Microsoft Graph does, §6.2).
    pub exchange: ExchangeVerdict,
    /// mailscope's evaluation of its own policies against the scope groups' live members.
    pub local: LocalVerdict,
    pub agree: bool,
    /// Why the two differ, when they do.
    pub disagreement: Option<String>,
}

fn rule_name(r: AccessRule) -> &'static str {
    match r {
        AccessRule::DenyMatch => "deny_match",
        AccessRule::RestrictMatch => "restrict_match",
        AccessRule::RestrictMiss => "restrict_miss",
        AccessRule::NoPolicy => "no_policy",
    }
}

/// Direct members (object ids) of `roots` and of groups nested in them, read from Exchange.
async fn expand_groups(
    exo: &ExchangeClient,
    roots: impl IntoIterator<Item = String>,
) -> Result<GroupMembers, ApiError> {
    let mut members = GroupMembers::new();
    let mut queue: Vec<String> = roots.into_iter().collect();
    while let Some(g) = queue.pop() {
        if members.contains_key(&g) || members.len() >= MAX_GROUPS_EXPANDED {
            continue;
        }
        let list: Vec<Recipient> = exo
            .get_distribution_group_members(&g, Replication::Ignore)
            .await?;
        let mut ids = Vec::new();
        for r in list {
            let Some(id) = recipient_object_id(&r) else {
                continue;
            };
            if r.recipient_type_details
                .as_deref()
                .is_some_and(|t| t.contains("Group"))
            {
                queue.push(id.clone());
            }
            ids.push(id);
        }
        members.insert(g, ids);
    }
    Ok(members)
}

/// Check whether an app may reach a mailbox: `Test-ApplicationAccessPolicy` and mailscope's own
/// evaluation of the four rules, side by side, with the reason when they differ.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/access-tests", tag = "access policies",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id")),
    request_body = AccessTestInput,
    responses(
        (status = 200, description = "both verdicts", body = AccessTestResult),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid app id, or no such mailbox", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft 365 refused or failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn access_test(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
    body: web::Json<AccessTestInput>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let tenant_id = path.into_inner();
    let (_, handle) = tenant_handle(&state, &caller, tenant_id).await?;
    let mut errs = Vec::new();
    let app_id = check_app_id(&body.app_id, "app_id", &mut errs);
    let mailbox = body.mailbox.trim().to_ascii_lowercase();
    if mailbox.is_empty() {
        errs.push(field("mailbox", "name a mailbox address"));
    }
    if !errs.is_empty() {
        return Err(ApiError::validation(errs));
    }
    let exo = handle.exchange();
    let unknown_mailbox = || {
        ApiError::validation(vec![field(
            "mailbox",
            format!("no mailbox `{mailbox}` exists in the tenant"),
        )])
    };
    let recipient = exo
        .get_recipient(&mailbox, Replication::Ignore)
        .await?
        .ok_or_else(unknown_mailbox)?;
    let mailbox_id = recipient_object_id(&recipient).ok_or_else(unknown_mailbox)?;
    let check = match exo.test_application_access_policy(&mailbox, &app_id).await {
        Err(e) if e.is_not_found() => return Err(unknown_mailbox()),
        r => r?,
    };

    let db = state.db().await?;
    let records: Vec<AccessPolicyRecord> = store::access_policies::all(&db, tenant_id)
        .await?
        .into_iter()
        .filter(|r| r.app_id == ALL_APPS || r.app_id.eq_ignore_ascii_case(&app_id))
        .collect();
    drop(db);
    let policies: Vec<rules::AccessPolicy> = records
        .iter()
        .map(|r| rules::AccessPolicy {
            app_id: r.app_id.clone(),
            scope_id: r.scope_object_id.clone(),
            access_right: if r.access_right == "DenyAccess" {
                rules::AccessRight::DenyAccess
            } else {
                rules::AccessRight::RestrictAccess
            },
        })
        .collect();
    let groups = expand_groups(
        &exo,
        records
            .iter()
            .filter(|r| r.scope_type.contains("Group"))
            .map(|r| r.scope_object_id.clone()),
    )
    .await?;
    let eval = |nested| {
        rules::evaluate_application_access(&app_id, &mailbox_id, &policies, &groups, nested)
    };
    let local = eval(NestedGroups::Transitive);
    let exchange_granted = check.granted();
    let agree = exchange_granted == Some(local.granted);
    let disagreement = if agree {
        None
    } else {
        Some(
            explain(
                &exo,
                &app_id,
                &records,
                exchange_granted,
                eval(NestedGroups::DirectOnly).granted,
            )
            .await?,
        )
    };
    Ok(HttpResponse::Ok().json(AccessTestResult {
        app_id,
        mailbox,
        mailbox_object_id: mailbox_id,
        exchange: ExchangeVerdict {
            access_check_result: check.access_check_result.clone(),
            granted: exchange_granted,
        },
        local: LocalVerdict {
            granted: local.granted,
            rule: rule_name(local.rule).into(),
            matched_policies: local.matched.iter().map(|i| records[*i].id).collect(),
            nested_groups: "transitive".into(),
        },
        agree,
        disagreement,
    }))
}

/// Why Exchange and mailscope's evaluation differ, most likely cause first.
async fn explain(
    exo: &ExchangeClient,
    app_id: &str,
    records: &[AccessPolicyRecord],
    exchange_granted: Option<bool>,
    direct_only_granted: bool,
) -> Result<String, ApiError> {
    let Some(exchange_granted) = exchange_granted else {
        return Ok(
            "Exchange answered neither Granted nor Denied, so there is nothing to compare".into(),
        );
    };
    let tenant: BTreeSet<(String, String)> = exo
        .list_application_access_policies()
        .await?
        .iter()
        .filter(|p| same_app(p, app_id) || p.app_id.as_deref() == Some(ALL_APPS))
        .filter_map(|p| Some((scope_guid(p)?, p.access_right.clone()?)))
        .collect();
    let known: BTreeSet<(String, String)> = records
        .iter()
        .map(|r| (r.scope_object_id.clone(), r.access_right.clone()))
        .collect();
    if tenant != known {
        let only_tenant = tenant.difference(&known).count();
        let only_known = known.difference(&tenant).count();
        return Ok(format!(
            "the tenant's policies for this app differ from mailscope's records ({only_tenant} only in the tenant, {only_known} only in mailscope); POST /sync to import the tenant's state"
        ));
    }
    if direct_only_granted == exchange_granted {
        return Ok("Exchange appears to count only direct members of nested groups, while mailscope counted nested members (whether nesting counts is unverified, reference §2.5); add the mailboxes to the scope group directly".into());
    }
    Ok("mailscope's policies match the tenant's, yet the verdicts differ: a change made moments ago may not have reached Exchange yet; run the test again in a few minutes".into())
}

// ---------- sync ----------

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SyncQuery {
    /// Only report the drift; change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// One field that differs between mailscope's record and the tenant.
#[derive(Serialize, ToSchema)]
pub struct FieldDrift {
    pub field: String,
    pub recorded: Option<String>,
    pub tenant: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct DriftItem {
    /// `app_id/scope_object_id` for a policy, the alias for a scope group.
    pub key: String,
    /// mailscope's id (policies).
    pub id: Option<Uuid>,
    pub changes: Vec<FieldDrift>,
}

#[derive(Serialize, ToSchema, Default)]
pub struct DriftSet {
    /// In the tenant, not in mailscope (imported unless `dry_run`).
    pub added: Vec<DriftItem>,
    /// In mailscope, gone from the tenant (forgotten unless `dry_run`).
    pub removed: Vec<DriftItem>,
    /// Changed outside mailscope (mailscope's record follows the tenant unless `dry_run`).
    pub changed: Vec<DriftItem>,
    pub unchanged: usize,
}

#[derive(Serialize, ToSchema)]
pub struct SyncReport {
    pub dry_run: bool,
    pub access_policies: DriftSet,
    pub scope_groups: DriftSet,
}

fn drift(field: &str, recorded: &str, tenant: &str) -> Option<FieldDrift> {
    (recorded != tenant).then(|| FieldDrift {
        field: field.into(),
        recorded: Some(recorded.into()),
        tenant: Some(tenant.into()),
    })
}

/// Import the tenant's application access policies (and the security groups they use as scopes)
/// and report drift: what was added, removed or changed outside mailscope. The tenant is the
/// truth: unless `dry_run`, mailscope's records are made to match it.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/sync", tag = "access policies",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"), SyncQuery),
    responses(
        (status = 200, description = "the drift found (and reconciled unless dry_run)", body = SyncReport),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft 365 refused or failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn sync(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
    q: web::Query<SyncQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let tenant_id = path.into_inner();
    let (_, handle) = tenant_handle(&state, &caller, tenant_id).await?;
    let exo = handle.exchange();
    let dry = q.dry_run;
    let mut db = state.db().await?;
    let tx = db.transaction().await.map_err(store::StoreError::from)?;
    lock_policies(&tx, tenant_id).await?;

    // Scope groups first, so imported policies can name their group's alias.
    let tenant_policies = exo.list_application_access_policies().await?;
    let mut scope_cache: BTreeMap<String, Option<Recipient>> = BTreeMap::new();
    for g in tenant_policies.iter().filter_map(scope_guid) {
        if let std::collections::btree_map::Entry::Vacant(slot) = scope_cache.entry(g) {
            let r = exo.get_recipient(slot.key(), Replication::Ignore).await?;
            slot.insert(r);
        }
    }
    let mut groups = DriftSet::default();
    let mut known_groups = store::scope_groups::list(&tx, tenant_id, None, i64::MAX).await?;
    known_groups.sort_by(|a, b| a.alias.cmp(&b.alias));
    let mut known_group_ids: BTreeSet<String> = BTreeSet::new();
    for g in known_groups {
        lock_group(&tx, tenant_id, &g.alias).await?;
        known_group_ids.insert(g.object_id.clone());
        let Some(live) = exo
            .get_distribution_group(&g.object_id, Replication::Ignore)
            .await?
        else {
            if !dry {
                store::scope_groups::delete(&tx, tenant_id, &g.alias).await?;
            }
            groups.removed.push(DriftItem {
                key: g.alias.clone(),
                id: None,
                changes: vec![],
            });
            continue;
        };
        let members: Vec<String> = current_members_of(&exo, &g.object_id).await?;
        let display = live.display_name.clone().unwrap_or_default();
        let changes: Vec<FieldDrift> = [
            drift("display_name", &g.display_name, &display),
            drift("members", &g.members.join(","), &members.join(",")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if changes.is_empty() {
            groups.unchanged += 1;
            continue;
        }
        if !dry {
            store::scope_groups::upsert(
                &tx,
                &store::scope_groups::ScopeGroupRecord {
                    display_name: display,
                    members,
                    ..g.clone()
                },
            )
            .await?;
        }
        groups.changed.push(DriftItem {
            key: g.alias,
            id: None,
            changes,
        });
    }
    // Security groups that scope tenant policies but are unknown to mailscope.
    for r in scope_cache.values().flatten() {
        let Some(oid) = recipient_object_id(r) else {
            continue;
        };
        if r.recipient_type_details.as_deref() != Some("MailUniversalSecurityGroup")
            || known_group_ids.contains(&oid)
        {
            continue;
        }
        known_group_ids.insert(oid.clone());
        let alias = r.alias.clone().unwrap_or_default().to_ascii_lowercase();
        if alias.is_empty()
            || store::scope_groups::get(&tx, tenant_id, &alias)
                .await?
                .is_some()
        {
            continue;
        }
        let members = current_members_of(&exo, &oid).await?;
        if !dry {
            lock_group(&tx, tenant_id, &alias).await?;
            store::scope_groups::upsert(
                &tx,
                &store::scope_groups::ScopeGroupRecord {
                    tenant_id,
                    alias: alias.clone(),
                    display_name: r.display_name.clone().unwrap_or_else(|| alias.clone()),
                    primary_smtp_address: primary_address(r).unwrap_or_default(),
                    object_id: oid,
                    membership: "exact".into(),
                    members,
                    origin: "imported".into(),
                    created_at: Utc::now(),
                    updated_at: Utc::now(),
                },
            )
            .await?;
        }
        groups.added.push(DriftItem {
            key: alias,
            id: None,
            changes: vec![],
        });
    }

    let mut policies = DriftSet::default();
    let records = store::access_policies::all(&tx, tenant_id).await?;
    let mut matched: BTreeSet<Uuid> = BTreeSet::new();
    for p in &tenant_policies {
        let (Some(app), Some(guid)) = (p.app_id.clone(), scope_guid(p)) else {
            continue;
        };
        let app = app.to_ascii_lowercase();
        let right = p.access_right.clone().unwrap_or_default();
        let desc = p.description.clone().unwrap_or_default();
        let scope_r = scope_cache.get(&guid).cloned().flatten();
        let scope_oid = scope_r
            .as_ref()
            .and_then(recipient_object_id)
            .unwrap_or(guid.clone());
        let rec = records.iter().find(|r| {
            !matched.contains(&r.id)
                && r.app_id == app
                && (r.scope_object_id == scope_oid || r.scope_object_id == guid)
        });
        match rec {
            Some(r) => {
                matched.insert(r.id);
                let changes: Vec<FieldDrift> = [
                    drift("access_right", &r.access_right, &right),
                    drift("description", &r.description, &desc),
                ]
                .into_iter()
                .flatten()
                .collect();
                if changes.is_empty() {
                    policies.unchanged += 1;
                    continue;
                }
                if !dry {
                    store::access_policies::update(
                        &tx,
                        &AccessPolicyRecord {
                            access_right: right,
                            description: desc,
                            exchange_identity: p.identity.clone(),
                            state: "unverified".into(),
                            ..r.clone()
                        },
                    )
                    .await?;
                }
                policies.changed.push(DriftItem {
                    key: format!("{}/{}", r.app_id, r.scope_object_id),
                    id: Some(r.id),
                    changes,
                });
            }
            None => {
                let id = Uuid::new_v4();
                if !dry {
                    let alias = store::scope_groups::get_by_object_id(&tx, tenant_id, &scope_oid)
                        .await?
                        .map(|g| g.alias);
                    store::access_policies::insert(
                        &tx,
                        &AccessPolicyRecord {
                            id,
                            tenant_id,
                            app_id: app.clone(),
                            scope_object_id: scope_oid.clone(),
                            scope_type: scope_r
                                .as_ref()
                                .and_then(|r| r.recipient_type_details.clone())
                                .unwrap_or_default(),
                            scope_address: scope_r
                                .as_ref()
                                .and_then(primary_address)
                                .unwrap_or_else(|| p.scope_name.clone().unwrap_or_default()),
                            scope_alias: alias,
                            access_right: right.clone(),
                            description: desc,
                            exchange_identity: p.identity.clone(),
                            state: "unverified".into(),
                            origin: "imported".into(),
                            created_at: Utc::now(),
                            updated_at: Utc::now(),
                        },
                    )
                    .await?;
                }
                policies.added.push(DriftItem {
                    key: format!("{app}/{scope_oid}"),
                    id: (!dry).then_some(id),
                    changes: vec![FieldDrift {
                        field: "access_right".into(),
                        recorded: None,
                        tenant: Some(right),
                    }],
                });
            }
        }
    }
    for r in records.iter().filter(|r| !matched.contains(&r.id)) {
        if !dry {
            store::access_policies::delete(&tx, tenant_id, r.id).await?;
        }
        policies.removed.push(DriftItem {
            key: format!("{}/{}", r.app_id, r.scope_object_id),
            id: Some(r.id),
            changes: vec![],
        });
    }
    let report = SyncReport {
        dry_run: dry,
        access_policies: policies,
        scope_groups: groups,
    };
    let count = |d: &DriftSet| d.added.len() + d.removed.len() + d.changed.len();
    if !dry && count(&report.access_policies) + count(&report.scope_groups) > 0 {
        audit(
            &tx,
            &caller,
            &req,
            tenant_id,
            "tenant.synced",
            &format!("tenant/{tenant_id}"),
            serde_json::to_value(&report).map_err(ApiError::internal)?,
        )
        .await?;
    }
    tx.commit().await.map_err(store::StoreError::from)?;
    Ok(HttpResponse::Ok().json(report))
}
