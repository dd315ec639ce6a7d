//! `/v1/tenants/{tenant_id}/rbac-restrictions` and `/rbac-findings`: RBAC for Applications,
//! Microsoft's recommended mechanism (docs/microsoft-365.md §3, §8.2).
//!
//! Thin handlers: parse, authorize, call one use case of `provisioning::rbac`, render. The
//! safety rules (the union trap, filter read-back, create before remove, the pointer's object id)
//! live with the use cases.
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::problem::{ApiError, FieldError, Problem, ProblemKind};
use super::{AppState, actor, page_limit};
use crate::auth::{Caller, Role};
use crate::provisioning::Change;
use crate::provisioning::rbac::{
    self, Enforcement, GroupVia, Restriction, RestrictionInput, ScopeInput, Verification,
};
use crate::store::rbac_restrictions::RbacRestrictionRecord;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/tenants/{tenant_id}/rbac-restrictions")
            .route(web::post().to(create_restriction))
            .route(web::get().to(list_restrictions)),
    )
    .service(
        web::resource("/tenants/{tenant_id}/rbac-restrictions/{id}")
            .route(web::get().to(get_restriction))
            .route(web::put().to(put_restriction))
            .route(web::delete().to(delete_restriction)),
    )
    .route(
        "/tenants/{tenant_id}/rbac-restrictions/{id}/enforce",
        web::post().to(enforce_restriction),
    )
    .route(
        "/tenants/{tenant_id}/rbac-findings",
        web::get().to(findings),
    );
}

/// How a scope group becomes an RBAC scope.
#[derive(Deserialize, Serialize, ToSchema, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum ScopeGroupVia {
    /// `-RecipientGroupScope`: survives a tenant relocation (default).
    RecipientGroupScope,
    /// A management scope `MemberOfGroup -eq '<DN>'` (Microsoft's migration recipe).
    MemberOfGroup,
}

/// Exactly one of `scope_group`, `recipient_filter` and `administrative_unit`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RbacScopeInput {
    /// A scope group's alias (direct members only are in scope, docs/microsoft-365.md §3.4).
    pub scope_group: Option<String>,
    /// With `scope_group`: `recipient_group_scope` (default) or `member_of_group`.
    pub via: Option<ScopeGroupVia>,
    /// An OPATH recipient filter, e.g. `Department -eq 'Sales'`; validated, and read back after
    /// every write (an empty or malformed filter can mean the whole organisation).
    pub recipient_filter: Option<String>,
    /// An Entra administrative unit's object id: `-RecipientAdministrativeUnitScope` (its
    /// members are in scope; Microsoft prefers it over a filter on an administrative unit).
    /// Verifying it needs `sample_mailboxes` (the unit's members are not listed).
    #[schema(value_type = Option<String>, format = Uuid)]
    pub administrative_unit: Option<String>,
}

/// A restriction to create (`POST`) or the replacement of one (`PUT`, where `app_id` must stay).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "app_id": "b9701c1e-1364-464d-93e4-01ae925e8d6c",
    "scope": {"scope_group": "crm-scope"},
    "remove_entra_grants": true,
    "canary_mailboxes": ["dave@contoso-sandbox.onmicrosoft.com"]
}))]
pub struct RbacRestrictionInput {
    /// The app's client id.
    #[schema(value_type = String, format = Uuid)]
    pub app_id: String,
    /// Optional: the Enterprise application's (service principal's) object id. The app
    /// registration's object id is refused (`app_registration_object_id`).
    pub service_principal_object_id: Option<String>,
    pub scope: RbacScopeInput,
    /// Mailbox permissions granted in scope, one role assignment each ("Application Mail.Read"
    /// for Mail.Read). Omitted: the app's Entra mailbox grants that have a role.
    pub permissions: Option<Vec<String>>,
    /// `EWS.AccessAsApp`, `SMTP.SendAsApp`: only RBAC grants them.
    #[serde(default)]
    pub rbac_only_permissions: Vec<String>,
    /// After creating, close the union trap: verify with `Test-ServicePrincipalAuthorization`
    /// (samples in scope, canaries out), then remove the app's Entra grants the restriction
    /// covers. Without it, an app that keeps its Entra grants is **not** restricted.
    #[serde(default)]
    pub remove_entra_grants: bool,
    /// Mailboxes that must be in scope; omitted for a scope group: up to three members.
    #[serde(default)]
    pub sample_mailboxes: Vec<String>,
    /// Mailboxes that must be out of scope (besides the tenant's canaries).
    #[serde(default)]
    pub canary_mailboxes: Vec<String>,
    /// Optional, for callers used to access policies: only `RestrictAccess` has an RBAC
    /// equivalent. `DenyAccess` is refused (`rbac_deny_unsupported`): RBAC for Applications can
    /// only grant (docs/microsoft-365.md §3.8); keep the DenyAccess policy or use an allow-list scope.
    #[schema(example = "RestrictAccess")]
    pub access_right: Option<String>,
}

/// Mailboxes to verify with before the Entra grants go.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"canary_mailboxes": ["dave@contoso-sandbox.onmicrosoft.com"]}))]
pub struct EnforceInput {
    #[serde(default)]
    pub sample_mailboxes: Vec<String>,
    #[serde(default)]
    pub canary_mailboxes: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct RbacAssignment {
    #[schema(example = "Mail.Read")]
    pub permission: String,
    #[schema(example = "Application Mail.Read")]
    pub role: String,
    /// The role assignment's name in Exchange.
    pub name: String,
    /// Found in the tenant just now.
    pub present: bool,
}

#[derive(Serialize, ToSchema)]
pub struct RbacFinding {
    /// `union_trap`, `missing_pointer`, `wrong_pointer`, `missing_assignment` or
    /// `scope_filter_changed`.
    #[schema(example = "union_trap")]
    pub kind: String,
    pub detail: String,
    pub fix: String,
}

#[derive(Serialize, ToSchema)]
pub struct RbacScope {
    /// `recipient_group_scope`, `member_of_group`, `recipient_filter` or `administrative_unit`
    /// (then `object_id` is the unit's id and `scope_group` its display name).
    #[schema(example = "recipient_group_scope")]
    pub kind: String,
    pub scope_group: Option<String>,
    pub object_id: Option<String>,
    pub address: Option<String>,
    pub distinguished_name: Option<String>,
    /// The filter as written (for `member_of_group`, derived from the DN).
    pub recipient_filter: Option<String>,
    /// The filter as Exchange has it now (read live).
    pub recipient_filter_in_tenant: Option<String>,
    pub management_scope: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct EnforcementReport {
    pub in_scope_checked: Vec<String>,
    pub out_of_scope_checked: Vec<String>,
    /// Entra grants removed by this call.
    pub entra_grants_removed: Vec<String>,
    /// What happens next in Microsoft Graph.
    #[schema(
        example = "Graph applies RBAC changes through a permission cache of 30 minutes to 2 hours (an app in use keeps its entry up to 2 hours); Test-ServicePrincipalAuthorization already shows them."
    )]
    pub propagation: String,
    /// The propagation check that sees the restriction through Graph (also in the `Link`
    /// header, `rel="propagation-check"`).
    pub propagation_check_id: Option<Uuid>,
}

#[derive(Serialize, ToSchema)]
pub struct RbacRestriction {
    /// mailscope's id for the restriction.
    pub id: Uuid,
    #[schema(value_type = String, format = Uuid, example = "b9701c1e-1364-464d-93e4-01ae925e8d6c")]
    pub app_id: String,
    /// The Enterprise application's object id, as the Exchange pointer must carry it.
    pub service_principal_object_id: String,
    /// Exchange's pointer's object id, read live (absent: no pointer).
    pub pointer_object_id: Option<String>,
    pub scope: RbacScope,
    pub assignments: Vec<RbacAssignment>,
    /// Entra mailbox grants the app still holds: each reaches every mailbox whatever the scope.
    pub unscoped_entra_grants: Vec<String>,
    /// Entra grants mailscope removed after verifying this restriction.
    pub entra_grants_removed: Vec<String>,
    /// True only when the pointer, every assignment and the filter are in the tenant as
    /// recorded **and** no unscoped Entra mailbox grant remains (the union trap, docs/microsoft-365.md §3.3).
    pub restricted: bool,
    /// Why `restricted` is false, each with the fix.
    pub findings: Vec<RbacFinding>,
    /// `pending_propagation`, `in_force` or `unverified` (adopted from the tenant).
    #[schema(example = "pending_propagation")]
    pub state: String,
    /// `created` or `adopted`.
    #[schema(example = "created")]
    pub origin: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Present when this call verified and removed Entra grants.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<EnforcementReport>,
}

/// A restriction as recorded (the list does not read the tenant).
#[derive(Serialize, ToSchema)]
pub struct RbacRestrictionSummary {
    pub id: Uuid,
    #[schema(value_type = String, format = Uuid)]
    pub app_id: String,
    pub scope_kind: String,
    pub scope_group: Option<String>,
    pub recipient_filter: Option<String>,
    pub permissions: Vec<String>,
    pub entra_grants_removed: Vec<String>,
    pub state: String,
    pub origin: String,
}

#[derive(Serialize, ToSchema)]
pub struct RbacRestrictionList {
    pub items: Vec<RbacRestrictionSummary>,
    pub next_after: Option<Uuid>,
}

#[derive(Serialize, ToSchema)]
pub struct RbacScanFinding {
    #[schema(value_type = String, format = Uuid)]
    pub app_id: String,
    pub display_name: Option<String>,
    pub service_principal_object_id: String,
    /// `union_trap`: Entra mailbox grants beside RBAC assignments (the scope narrows nothing);
    /// `unrestricted`: Entra mailbox grants, no RBAC assignment, no RestrictAccess policy.
    #[schema(example = "union_trap")]
    pub kind: String,
    pub entra_grants: Vec<String>,
    pub rbac_roles: Vec<String>,
    pub fix: String,
}

#[derive(Serialize, ToSchema)]
pub struct RbacFindings {
    pub items: Vec<RbacScanFinding>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RestrictionListQuery {
    /// Only this app's restrictions (client id).
    #[param(value_type = Option<String>, format = Uuid)]
    pub app_id: Option<String>,
    /// Page size, 1–500 (default 50).
    pub limit: Option<i64>,
    /// Cursor: the `next_after` of the previous page.
    pub after: Option<Uuid>,
}

const PROPAGATION_NOTE: &str = "Graph applies RBAC changes through a permission cache of 30 minutes to 2 hours (an app in use keeps its cached entry up to 2 hours, docs/microsoft-365.md §3.5); Test-ServicePrincipalAuthorization already shows them.";

fn report(e: Enforcement) -> EnforcementReport {
    EnforcementReport {
        in_scope_checked: e.in_scope_checked,
        out_of_scope_checked: e.out_of_scope_checked,
        entra_grants_removed: e.entra_grants_removed,
        propagation: PROPAGATION_NOTE.into(),
        propagation_check_id: e.propagation_check_id,
    }
}

fn view(r: Restriction, enforcement: Option<Enforcement>) -> RbacRestriction {
    let rec = r.record;
    RbacRestriction {
        id: rec.id,
        app_id: rec.app_id,
        service_principal_object_id: rec.service_principal_object_id,
        pointer_object_id: r.pointer_object_id,
        scope: RbacScope {
            kind: rec.scope_kind,
            scope_group: rec.scope_group_alias,
            object_id: rec.scope_object_id,
            address: rec.scope_address,
            distinguished_name: rec.scope_distinguished_name,
            recipient_filter: rec.recipient_filter,
            recipient_filter_in_tenant: r.filter_in_tenant,
            management_scope: rec.management_scope,
        },
        assignments: r
            .assignments
            .into_iter()
            .map(|a| RbacAssignment {
                permission: a.permission,
                role: a.role,
                name: a.name,
                present: a.present,
            })
            .collect(),
        unscoped_entra_grants: r.unscoped_entra_grants,
        entra_grants_removed: rec.entra_grants_removed,
        restricted: r.restricted,
        findings: r
            .findings
            .into_iter()
            .map(|f| RbacFinding {
                kind: f.kind.into(),
                detail: f.detail,
                fix: f.fix,
            })
            .collect(),
        state: rec.state.as_str().into(),
        origin: rec.origin,
        created_at: rec.created_at,
        updated_at: rec.updated_at,
        enforcement: enforcement.map(report),
    }
}

fn summary(r: RbacRestrictionRecord) -> RbacRestrictionSummary {
    RbacRestrictionSummary {
        id: r.id,
        app_id: r.app_id,
        scope_kind: r.scope_kind,
        scope_group: r.scope_group_alias,
        recipient_filter: r.recipient_filter,
        permissions: r.permissions,
        entra_grants_removed: r.entra_grants_removed,
        state: r.state.as_str().into(),
        origin: r.origin,
    }
}

impl TryFrom<RbacRestrictionInput> for RestrictionInput {
    type Error = ApiError;
    fn try_from(mut i: RbacRestrictionInput) -> Result<Self, ApiError> {
        if let Some(au) = i.scope.administrative_unit.take() {
            if i.scope.scope_group.is_some()
                || i.scope.recipient_filter.is_some()
                || i.scope.via.is_some()
            {
                return Err(ApiError::validation(vec![FieldError::new(
                    "scope",
                    "give exactly one of scope_group, recipient_filter and administrative_unit (via only with scope_group)",
                )]));
            }
            return Ok(input_with(i, ScopeInput::AdministrativeUnit(au)));
        }
        let scope = match (i.scope.scope_group.take(), i.scope.recipient_filter.take()) {
            (Some(alias), None) => ScopeInput::ScopeGroup {
                alias,
                via: match i.scope.via {
                    Some(ScopeGroupVia::MemberOfGroup) => GroupVia::MemberOfGroup,
                    _ => GroupVia::RecipientGroupScope,
                },
            },
            (None, Some(f)) if i.scope.via.is_none() => ScopeInput::RecipientFilter(f),
            (None, Some(_)) => {
                return Err(ApiError::validation(vec![FieldError::new(
                    "scope.via",
                    "only with scope_group",
                )]));
            }
            _ => {
                return Err(ApiError::validation(vec![FieldError::new(
                    "scope",
                    "give exactly one of scope_group, recipient_filter and administrative_unit",
                )]));
            }
        };
        Ok(input_with(i, scope))
    }
}

fn input_with(i: RbacRestrictionInput, scope: ScopeInput) -> RestrictionInput {
    RestrictionInput {
        app_id: i.app_id,
        service_principal_object_id: i.service_principal_object_id,
        scope,
        permissions: i.permissions,
        rbac_only_permissions: i.rbac_only_permissions,
        remove_entra_grants: i.remove_entra_grants,
        verification: Verification {
            sample_mailboxes: i.sample_mailboxes,
            canary_mailboxes: i.canary_mailboxes,
        },
        access_right: i.access_right,
    }
}

/// Restrict an app with RBAC for Applications (Microsoft's recommended mechanism).
///
/// In one call: the Exchange pointer to the app's service principal (`New-ServicePrincipal`
/// with the service principal's object id), the scope (`-RecipientGroupScope`, or a management
/// scope whose filter is read back), one role assignment per permission, and with
/// `remove_entra_grants` the safe removal of the Entra grants (verify first, docs/microsoft-365.md §3.3). Idempotent
/// by (app, scope): the same restriction again answers 200; other permissions for the same key
/// answer 409 listing what differs; what the tenant already has is adopted, never duplicated.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/rbac-restrictions", tag = "rbac restrictions",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Replays the stored response for a repeated request")),
    request_body = RbacRestrictionInput,
    responses(
        (status = 201, description = "created in the tenant", body = RbacRestriction),
        (status = 200, description = "already existed (in mailscope, or adopted from the tenant)", body = RbacRestriction),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "same app and scope with other settings (`rbac_restriction_conflict`), or verification failed (`rbac_verification_failed`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid content, a permission without a role, an unknown scope group, the app registration's object id (`app_registration_object_id`), no mailbox to verify with (`verification_mailboxes_required`), or `access_right: DenyAccess`, which RBAC cannot express (`rbac_deny_unsupported`)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft 365 refused or failed, or the filter did not read back (`scope_filter_mismatch`)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn create_restriction(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
    body: web::Json<RbacRestrictionInput>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let tenant_id = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let input = RestrictionInput::try_from(body.into_inner())?;
    let ensured = rbac::create(&state, &actor(&caller, &req), tenant_id, input).await?;
    let (r, enforcement) = ensured.value;
    let location = format!("{}/{}", req.path(), r.record.id);
    let mut res = match ensured.change {
        Change::Created => {
            let mut b = HttpResponse::Created();
            b.insert_header((header::LOCATION, location));
            b
        }
        _ => {
            let mut b = HttpResponse::Ok();
            b.insert_header((header::CONTENT_LOCATION, location));
            b
        }
    };
    if let Some(c) = enforcement.as_ref().and_then(|e| e.propagation_check_id) {
        res.insert_header(super::propagation_checks::link_header(tenant_id, c));
    }
    Ok(res.json(view(r, enforcement)))
}

/// The tenant's RBAC restrictions known to mailscope (as recorded; GET one to read it live).
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/rbac-restrictions", tag = "rbac restrictions",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"), RestrictionListQuery),
    responses(
        (status = 200, description = "a page of restrictions", body = RbacRestrictionList),
        (status = 400, description = "invalid query", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "tenant not visible", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list_restrictions(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
    q: web::Query<RestrictionListQuery>,
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
    let rows = rbac::list(&state, tenant_id, app_id.as_deref(), q.after, limit + 1).await?;
    let (rows, more) = super::split_page(rows, limit);
    let items: Vec<RbacRestrictionSummary> = rows.into_iter().map(summary).collect();
    let next_after = super::next_cursor(&items, more, |p| p.id);
    Ok(HttpResponse::Ok().json(RbacRestrictionList { items, next_after }))
}

/// One restriction, read live from the tenant: pointer, assignments, filter, and whether the app
/// is really restricted (no unscoped Entra mailbox grant left).
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/rbac-restrictions/{id}", tag = "rbac restrictions",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("id" = Uuid, Path, description = "mailscope's restriction id")),
    responses(
        (status = 200, description = "the restriction, live", body = RbacRestriction),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown restriction, or tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft 365 refused or failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get_restriction(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, Uuid)>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let (tenant_id, id) = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let r = rbac::get(&state, tenant_id, id).await?;
    Ok(HttpResponse::Ok().json(view(r, None)))
}

/// Replace a restriction's scope or permissions: the new scope and assignments are created
/// before the old ones are removed, so access in between is the union of both, never wider.
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/rbac-restrictions/{id}", tag = "rbac restrictions",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("id" = Uuid, Path, description = "mailscope's restriction id")),
    request_body = RbacRestrictionInput,
    responses(
        (status = 200, description = "replaced (or already as requested)", body = RbacRestriction),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown restriction, or tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "another restriction has the new key (`rbac_restriction_conflict`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid content, `app_id` changed, or `access_right: DenyAccess`, which RBAC cannot express (`rbac_deny_unsupported`)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft 365 refused or failed, or the filter did not read back (`scope_filter_mismatch`)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn put_restriction(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, Uuid)>,
    body: web::Json<RbacRestrictionInput>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, id) = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let input = RestrictionInput::try_from(body.into_inner())?;
    let ensured = rbac::replace(&state, &actor(&caller, &req), tenant_id, id, input).await?;
    let (r, check) = ensured.value;
    let mut res = HttpResponse::Ok();
    if let Some(c) = check {
        res.insert_header(super::propagation_checks::link_header(tenant_id, c));
    }
    Ok(res.json(view(r, None)))
}

/// Delete a restriction: its role assignments, its management scope, and the pointer when
/// nothing else uses it. This only ever narrows access (RBAC grants, never denies); Entra
/// grants mailscope removed are not restored.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/rbac-restrictions/{id}", tag = "rbac restrictions",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("id" = Uuid, Path, description = "mailscope's restriction id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown restriction, or tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft 365 refused or failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete_restriction(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, Uuid)>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, id) = path.into_inner();
    caller.require_tenant(tenant_id)?;
    rbac::delete(&state, &actor(&caller, &req), tenant_id, id).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Close the union trap in the safe order: verify with `Test-ServicePrincipalAuthorization`
/// (sample mailboxes in scope, canaries out of scope), then remove the app's Entra grants for
/// the permissions the restriction covers. Nothing is removed when a check fails.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/rbac-restrictions/{id}/enforce", tag = "rbac restrictions",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("id" = Uuid, Path, description = "mailscope's restriction id")),
    request_body = EnforceInput,
    responses(
        (status = 200, description = "verified; the covered Entra grants are gone", body = RbacRestriction),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown restriction, or tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the restriction is incomplete in the tenant (`rbac_incomplete`) or Exchange does not show the scope as intended (`rbac_verification_failed`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "no mailbox to verify with (`verification_mailboxes_required`)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft 365 refused or failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn enforce_restriction(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, Uuid)>,
    body: web::Json<EnforceInput>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, id) = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let b = body.into_inner();
    let v = Verification {
        sample_mailboxes: b.sample_mailboxes,
        canary_mailboxes: b.canary_mailboxes,
    };
    let e = rbac::enforce(&state, &actor(&caller, &req), tenant_id, id, v).await?;
    let r = rbac::get(&state, tenant_id, id).await?;
    let mut res = HttpResponse::Ok();
    if let Some(c) = e.propagation_check_id {
        res.insert_header(super::propagation_checks::link_header(tenant_id, c));
    }
    Ok(res.json(view(r, Some(e))))
}

/// Scan the tenant for the union trap, whoever set the apps up: apps holding an Entra
/// Mail.*/Calendars.*/Contacts.*/MailboxSettings.* grant beside RBAC assignments (the scope
/// narrows nothing), and apps holding such a grant with no restriction at all.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/rbac-findings", tag = "rbac restrictions",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id")),
    responses(
        (status = 200, description = "the findings, each with its fix", body = RbacFindings),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft 365 refused or failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn findings(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let tenant_id = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let items = rbac::scan(&state, tenant_id)
        .await?
        .into_iter()
        .map(|f| RbacScanFinding {
            app_id: f.app_id,
            display_name: f.display_name,
            service_principal_object_id: f.service_principal_object_id,
            kind: f.kind.into(),
            entra_grants: f.entra_grants,
            rbac_roles: f.rbac_roles,
            fix: f.fix,
        })
        .collect();
    Ok(HttpResponse::Ok().json(RbacFindings { items }))
}
