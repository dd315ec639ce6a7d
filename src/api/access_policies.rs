//! `/v1/tenants/{tenant_id}/access-policies`, `/access-tests` and `/sync`: application access
//! policies (docs/microsoft-365.md §2, pitfalls docs/microsoft-365.md §6.3–6.5, 6.10–6.12).
//!
//! Thin handlers: parse, authorize, call one use case of `provisioning::access_policies`,
//! `access_test` or `sync`, render. The safety rules (create before remove, the last
//! RestrictAccess policy) live with the use cases.
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::problem::{ApiError, Problem, ProblemKind};
use super::propagation_checks::{PropagationCheck, link_header, view_of};
use super::{AppState, actor, page_limit};
use crate::auth::{Caller, Role};
use crate::domain::access::{AccessRight, AccessRule};
use crate::provisioning::access_policies::{self as policies, PolicyInput};
use crate::provisioning::checks::CheckView;
use crate::provisioning::{Change, access_test as tests, sync as syncing};
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
    /// The app's client id (not an object id, docs/microsoft-365.md §6.5).
    #[schema(value_type = String, format = Uuid)]
    pub app_id: String,
    /// A scope group's alias, or the SMTP address of a scope group, user mailbox or mail user.
    pub scope: String,
    pub access_right: AccessRight,
    /// Omitted: a single space, the smallest value, so the tenant fits the most policies (docs/microsoft-365.md §2.6).
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
    #[param(value_type = Option<String>, format = Uuid)]
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
    #[schema(value_type = String, format = Uuid, example = "b9701c1e-1364-464d-93e4-01ae925e8d6c")]
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
    #[schema(value_type = super::schema::PolicyState, example = "pending_propagation")]
    pub state: String,
    /// `created` by mailscope, `adopted` (found in the tenant on create) or `imported` (by sync).
    #[schema(value_type = super::schema::PolicyOrigin, example = "created")]
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

pub(crate) fn view(r: AccessPolicyRecord) -> AccessPolicy {
    let access_right = r.right();
    AccessPolicy {
        id: r.id,
        app_id: r.app_id,
        scope_object_id: r.scope_object_id,
        scope_type: r.scope_type,
        scope_address: r.scope_address,
        scope_alias: r.scope_alias,
        access_right,
        description: r.description,
        exchange_identity: r.exchange_identity,
        state: r.state.as_str().into(),
        origin: r.origin.as_str().into(),
        created_at: r.created_at,
        updated_at: r.updated_at,
        propagation_check: None,
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
    caller.require_tenant(tenant_id)?;
    let ensured = policies::create(
        &state,
        &actor(&caller, &req),
        tenant_id,
        body.into_inner().into(),
    )
    .await?;
    let change = ensured.value;
    if ensured.change == Change::Unchanged {
        return Ok(HttpResponse::Ok().json(view(change.policy)));
    }
    let location = format!("{}/{}", req.path(), change.policy.id);
    let mut res = if ensured.change == Change::Created {
        let mut b = HttpResponse::Created();
        b.insert_header((header::LOCATION, location));
        b
    } else {
        let mut b = HttpResponse::Ok();
        b.insert_header((header::CONTENT_LOCATION, location));
        b
    };
    Ok(with_check(&mut res, tenant_id, change.policy, change.check))
}

impl From<AccessPolicyInput> for PolicyInput {
    fn from(i: AccessPolicyInput) -> Self {
        PolicyInput {
            app_id: i.app_id,
            scope: i.scope,
            access_right: i.access_right,
            description: i.description,
            canary_mailboxes: i.canary_mailboxes,
        }
    }
}

/// The check as the change's transaction saw it.
fn check_view(s: CheckView) -> PropagationCheck {
    view_of(s)
}

/// Render a changed policy with the check it started, also linked by the `Link` header.
fn with_check(
    res: &mut actix_web::HttpResponseBuilder,
    tenant_id: Uuid,
    policy: AccessPolicyRecord,
    check: Option<CheckView>,
) -> HttpResponse {
    let mut v = view(policy);
    if let Some(c) = check {
        res.insert_header(link_header(tenant_id, c.check.id));
        v.propagation_check = Some(check_view(c));
    }
    res.json(v)
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
    let next_after = super::next_cursor(&items, more, |p| p.id);
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
    let rec = policies::get(&state, tenant_id, id).await?;
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
    caller.require_tenant(tenant_id)?;
    let actor = actor(&caller, &req);
    let ensured = policies::describe(&state, &actor, tenant_id, id, &body.description).await?;
    Ok(HttpResponse::Ok().json(view(ensured.value)))
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
    caller.require_tenant(tenant_id)?;
    let actor = actor(&caller, &req);
    let input = body.into_inner().into();
    let ensured =
        policies::replace(&state, &actor, tenant_id, id, input, q.allow_unrestricted).await?;
    let change = ensured.value;
    Ok(with_check(
        &mut HttpResponse::Ok(),
        tenant_id,
        change.policy,
        change.check,
    ))
}

/// Delete a policy from the tenant and from mailscope.
///
/// Refused (409 `last_restrict_policy`) when it is the app's last RestrictAccess policy and the
/// app still holds a permission policies restrict (e.g. `Mail.Read`), because that silently gives
/// the app every mailbox, unless `?allow_unrestricted=true`. Revoke the permissions first to
/// wind an app down.
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
    caller.require_tenant(tenant_id)?;
    let actor = actor(&caller, &req);
    let check = policies::delete(&state, &actor, tenant_id, id, q.allow_unrestricted).await?;
    // 204 has no body: the check is linked by the header only.
    let mut res = HttpResponse::NoContent();
    if let Some(c) = &check {
        res.insert_header(link_header(tenant_id, c.check.id));
    }
    Ok(res.finish())
}

// ---------- access tests ----------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"app_id": "b9701c1e-1364-464d-93e4-01ae925e8d6c", "mailbox": "bob@contoso-sandbox.onmicrosoft.com"}))]
pub struct AccessTestInput {
    /// The app's client id.
    #[schema(value_type = String, format = Uuid)]
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
    /// `no_policy` (docs/microsoft-365.md §2.3).
    #[schema(value_type = super::schema::AccessRuleName, example = "restrict_miss")]
    pub rule: String,
    /// mailscope's ids of the policies that matched the app and the mailbox.
    pub matched_policies: Vec<Uuid>,
    /// How nested groups were counted (`transitive`, as the current documentation says).
    #[schema(value_type = super::schema::NestedGroupsCount, example = "transitive")]
    pub nested_groups: String,
}

#[derive(Serialize, ToSchema)]
pub struct AccessTestResult {
    #[schema(value_type = String, format = Uuid)]
    pub app_id: String,
    pub mailbox: String,
    pub mailbox_object_id: String,
    /// What Exchange says now (it sees changes before Microsoft Graph does, docs/microsoft-365.md §6.2).
    pub exchange: ExchangeVerdict,
    /// mailscope's evaluation of its own policies against the scope groups' live members.
    pub local: LocalVerdict,
    pub agree: bool,
    /// Why the two differ, when they do.
    pub disagreement: Option<String>,
    /// Both mechanisms together: Entra grants, access policies and RBAC assignments.
    pub effective: EffectiveAccess,
}

/// One row of `Test-ServicePrincipalAuthorization -Resource` (live, no cache, no Entra grants).
#[derive(Serialize, ToSchema)]
pub struct RbacAuthorizationRow {
    #[schema(example = "Application Mail.Read")]
    pub role_name: Option<String>,
    pub granted_permissions: Vec<String>,
    pub allowed_resource_scope: Option<String>,
    #[schema(example = "CustomRecipientScope")]
    pub scope_type: Option<String>,
    pub in_scope: Option<bool>,
}

/// The verdict for one permission and which mechanism decided it.
#[derive(Serialize, ToSchema)]
pub struct PermissionVerdict {
    #[schema(example = "Mail.Read")]
    pub permission: String,
    pub granted: bool,
    /// `entra_unrestricted` (an Entra grant nothing restricts here), `access_policy_allows`,
    /// `access_policy_denies`, `rbac_in_scope` or `rbac_out_of_scope`.
    #[schema(example = "rbac_in_scope")]
    pub decided_by: String,
}

/// Effective access with both mechanisms together (docs/microsoft-365.md §3.3: RBAC adds to Entra grants;
/// access policies narrow only Entra grants).
#[derive(Serialize, ToSchema)]
pub struct EffectiveAccess {
    pub entra_mailbox_permissions: Vec<String>,
    /// Exchange has a service principal pointer with the app's object id.
    pub rbac_pointer: bool,
    pub rbac: Vec<RbacAuthorizationRow>,
    pub permissions: Vec<PermissionVerdict>,
    /// Where mailscope's expectation from its RBAC restrictions differs from Exchange's.
    pub rbac_disagreement: Option<String>,
}

pub(super) fn rule_name(r: AccessRule) -> &'static str {
    match r {
        AccessRule::DenyMatch => "deny_match",
        AccessRule::RestrictMatch => "restrict_match",
        AccessRule::RestrictMiss => "restrict_miss",
        AccessRule::NoPolicy => "no_policy",
    }
}

/// Check whether an app may reach a mailbox: `Test-ApplicationAccessPolicy` and mailscope's own
/// evaluation of the four rules, side by side, with the reason when they differ; and under
/// `effective`, both mechanisms together (Entra grants, access policies, RBAC assignments via
/// `Test-ServicePrincipalAuthorization -Resource`) with the verdict per permission.
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
    caller.require_tenant(tenant_id)?;
    let t = tests::run(&state, tenant_id, &body.app_id, &body.mailbox).await?;
    Ok(HttpResponse::Ok().json(AccessTestResult {
        app_id: t.app_id,
        mailbox: t.mailbox,
        mailbox_object_id: t.mailbox_object_id,
        exchange: ExchangeVerdict {
            access_check_result: t.access_check_result,
            granted: t.exchange_granted,
        },
        local: LocalVerdict {
            granted: t.local.granted,
            rule: rule_name(t.local.rule).into(),
            matched_policies: t.matched_policies,
            nested_groups: "transitive".into(),
        },
        agree: t.agree,
        disagreement: t.disagreement,
        effective: EffectiveAccess {
            entra_mailbox_permissions: t.effective.entra_mailbox_permissions,
            rbac_pointer: t.effective.rbac_pointer,
            rbac: t
                .effective
                .rbac_rows
                .into_iter()
                .map(|r| RbacAuthorizationRow {
                    in_scope: r.in_scope(),
                    role_name: r.role_name,
                    granted_permissions: r.granted_permissions,
                    allowed_resource_scope: r.allowed_resource_scope,
                    scope_type: r.scope_type,
                })
                .collect(),
            permissions: t
                .effective
                .permissions
                .into_iter()
                .map(|p| PermissionVerdict {
                    permission: p.permission,
                    granted: p.granted,
                    decided_by: p.decided_by.into(),
                })
                .collect(),
            rbac_disagreement: t.effective.rbac_disagreement,
        },
    }))
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

impl From<syncing::FieldDrift> for FieldDrift {
    fn from(f: syncing::FieldDrift) -> Self {
        FieldDrift {
            field: f.field,
            recorded: f.recorded,
            tenant: f.tenant,
        }
    }
}

impl From<syncing::DriftItem> for DriftItem {
    fn from(d: syncing::DriftItem) -> Self {
        DriftItem {
            key: d.key,
            id: d.id,
            changes: d.changes.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<syncing::DriftSet> for DriftSet {
    fn from(d: syncing::DriftSet) -> Self {
        let items = |v: Vec<syncing::DriftItem>| v.into_iter().map(Into::into).collect();
        DriftSet {
            added: items(d.added),
            removed: items(d.removed),
            changed: items(d.changed),
            unchanged: d.unchanged,
        }
    }
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
    caller.require_tenant(tenant_id)?;
    let r = syncing::run(&state, &actor(&caller, &req), tenant_id, q.dry_run).await?;
    Ok(HttpResponse::Ok().json(SyncReport {
        dry_run: r.dry_run,
        access_policies: r.access_policies.into(),
        scope_groups: r.scope_groups.into(),
    }))
}
