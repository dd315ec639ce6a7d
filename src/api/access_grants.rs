//! `/v1/tenants/{tenant_id}/access-grants`: vendor onboarding and offboarding as one declarative
//! resource. `PUT` declares "this app may use these permissions on these mailboxes", `DELETE`
//! declares it gone; the `access_grant` job does the five calls of the building-block API in the
//! order that never widens the app's access (`provisioning::grants`, `domain::grant`).
//!
//! Thin handlers: parse, authorize, call one use case of `provisioning::grants`, render.
use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::problem::{ApiError, Problem, ProblemKind};
use super::{AppState, actor, page_limit};
use crate::auth::{Caller, Role};
use crate::domain::grant::{self as saga, Condition, Mechanism, StepError};
use crate::provisioning::grants::{self, AppSpec, MailboxSpec, Request, Spec};
use crate::store::access_grants::{Filter, GrantRecord};

/// Longest `?wait=`.
const MAX_WAIT_SECONDS: u64 = 60;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/tenants/{tenant_id}/access-grants")
            .route(web::get().to(list_access_grants)),
    )
    .service(
        web::resource("/tenants/{tenant_id}/access-grants/{key}")
            .route(web::put().to(put_access_grant))
            .route(web::get().to(get_access_grant))
            .route(web::delete().to(delete_access_grant)),
    )
    .route(
        "/tenants/{tenant_id}/access-grants/{key}/credentials",
        web::get().to(get_credentials),
    )
    .route(
        "/tenants/{tenant_id}/access-grants/{key}/secrets",
        web::post().to(add_secret),
    )
    .route(
        "/tenants/{tenant_id}/access-grants/{key}/secrets/{key_id}",
        web::delete().to(delete_secret),
    )
    .route(
        "/tenants/{tenant_id}/access-grants/{key}/certificates",
        web::post().to(add_certificate),
    )
    .route(
        "/tenants/{tenant_id}/access-grants/{key}/certificates/{key_id}",
        web::delete().to(delete_certificate),
    );
}

/// The desired state: the app, its permissions, the mailboxes, and how to find the grant again.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "app_id": "b9701c1e-1364-464d-93e4-01ae925e8d6c",
    "permissions": ["Mail.Read"],
    "mailboxes": ["sales@contoso.com", "support@contoso.com"],
    "canary_mailboxes": ["ceo@contoso.com"],
    "mechanism": "rbac",
    "labels": {"vendor": "contoso-crm"},
    "external_ref": "CHG-1042",
    "callback_url": "https://portal.example.com/hooks/mailscope"
}))]
pub struct AccessGrantInput {
    /// Create an app registration with this name (give this or `app_id`).
    pub display_name: Option<String>,
    /// Adopt an existing app by its client id, e.g. a vendor's multi-tenant app the tenant has
    /// consented to (give this or `display_name`). mailscope never deletes an adopted app.
    #[schema(value_type = Option<String>, format = Uuid)]
    pub app_id: Option<String>,
    /// Application permissions on mailboxes, e.g. `Mail.Read`, `Mail.Send`, `Calendars.ReadWrite`.
    /// Only permissions a restriction covers are accepted.
    pub permissions: Vec<String>,
    /// The mailboxes (SMTP addresses); mailscope manages the scope group `grant-{key}` for them.
    /// Give this or `scope_group`.
    pub mailboxes: Option<Vec<String>>,
    /// An existing scope group of mailscope's (alias), left as it is on removal.
    pub scope_group: Option<String>,
    /// Mailboxes the propagation check proves out of reach, besides the tenant's canaries.
    #[serde(default)]
    pub canary_mailboxes: Vec<String>,
    /// `rbac` (RBAC for Applications, the default for a new grant: role assignments scoped to
    /// the scope group, no tenant-wide Entra consent; needs a canary mailbox, the grant's or the
    /// tenant's) or `access_policy` (an application access policy restricting the app's Entra
    /// consent). Omitted on an existing grant: it keeps its mechanism, which cannot change while
    /// the grant exists (409).
    pub mechanism: Option<Mechanism>,
    /// Free-form labels to find the grant again (`?label=vendor=contoso-crm`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The caller's reference, e.g. a vendor id or ticket number (`?external_ref=`).
    pub external_ref: Option<String>,
    /// Where signed events (`access_grant.ready`, `.failed`, `.removed`, and
    /// `.expiring_soon` once per credential of the app that ends soon) are sent.
    pub callback_url: Option<String>,
}

impl From<AccessGrantInput> for Request {
    fn from(i: AccessGrantInput) -> Self {
        Request {
            display_name: i.display_name,
            app_id: i.app_id,
            permissions: i.permissions,
            mailboxes: i.mailboxes,
            scope_group: i.scope_group,
            canary_mailboxes: i.canary_mailboxes,
            mechanism: i.mechanism,
            labels: i.labels,
            external_ref: i.external_ref,
            callback_url: i.callback_url,
        }
    }
}

/// Why a step failed: what happened and what to do.
#[derive(Serialize, ToSchema)]
pub struct StepErrorView {
    #[schema(example = "throttled")]
    pub code: String,
    pub cause: String,
    pub fix: String,
}

impl From<StepError> for StepErrorView {
    fn from(e: StepError) -> Self {
        StepErrorView {
            code: e.code,
            cause: e.cause,
            fix: e.fix,
        }
    }
}

/// One step of the grant's current flow.
#[derive(Serialize, ToSchema)]
pub struct GrantStep {
    /// `scope_group`, `app`, `restriction`, `unscoped_grants`, `consent`, `propagation_check`;
    /// when removing: `revoke_consent`, `remove_restriction`, `remove_app`, `remove_scope_group`.
    #[schema(example = "restriction")]
    pub name: String,
    /// `pending`, `running` (under way or retrying), `done` or `failed`, for the current revision.
    #[schema(example = "done")]
    pub state: String,
    /// Runs within the current revision (a poll of a running check is not one).
    pub attempts: i32,
    /// What the step produced or found (ids of the objects; a note when it had nothing to do).
    #[schema(value_type = Object)]
    pub output: serde_json::Value,
    pub last_error: Option<StepErrorView>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// An access grant: its desired state, each step, and the overall condition.
#[derive(Serialize, ToSchema)]
pub struct AccessGrant {
    pub key: String,
    /// `pending`, `provisioning`, `propagating`, `ready`, `failed`, `removing` or `removed`.
    #[schema(example = "propagating")]
    pub condition: String,
    /// Counts changes of the desired state; each step shows its state within the current one.
    pub revision: i64,
    pub mechanism: Mechanism,
    /// `created` (mailscope creates the app and deletes it on removal) or `adopted`.
    #[schema(example = "adopted")]
    pub app_origin: String,
    #[schema(value_type = Option<String>, format = Uuid)]
    pub app_id: Option<String>,
    pub display_name: Option<String>,
    pub permissions: Vec<String>,
    /// The listed mailboxes (absent when the grant names a scope group).
    pub mailboxes: Option<Vec<String>>,
    pub scope_group: String,
    pub canary_mailboxes: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub external_ref: Option<String>,
    pub callback_url: Option<String>,
    pub steps: Vec<GrantStep>,
    /// For an app mailscope created, in `GET` of one grant: a credential of the app ends within
    /// `provisioning.secret_expiring_soon_days` and none lasts longer (details:
    /// `…/credentials`); announced once per credential by an `access_grant.expiring_soon` event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiring_soon: Option<bool>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the condition last changed.
    pub condition_since: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct AccessGrantList {
    pub items: Vec<AccessGrant>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next_after: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    /// Hold the request up to this many seconds (at most 60) until the condition changes.
    pub wait: Option<u64>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct GrantListQuery {
    /// `name=value`: only grants with this label.
    pub label: Option<String>,
    /// Only grants in this condition.
    pub condition: Option<String>,
    /// Only grants with this external reference.
    pub external_ref: Option<String>,
    /// Page size, 1–500 (default 50).
    pub limit: Option<i64>,
    /// Cursor: the `next_after` of the previous page.
    pub after: Option<String>,
}

pub(crate) fn view(g: GrantRecord) -> Result<AccessGrant, ApiError> {
    let spec: Spec = serde_json::from_value(g.spec.clone())
        .map_err(|e| ApiError::internal(anyhow::anyhow!("grant spec: {e}")))?;
    let plan = grants::plan_of(&g);
    let app = g
        .steps
        .iter()
        .find(|e| e.step == saga::Step::App)
        .map(|e| &e.output);
    let (app_origin, display_name, app_id) = match &spec.app {
        AppSpec::Create { display_name } => (
            "created",
            Some(display_name.clone()),
            app.and_then(|o| o.get("app_id")?.as_str().map(String::from)),
        ),
        AppSpec::Adopt { app_id } => ("adopted", None, Some(app_id.to_string())),
    };
    let (mailboxes, scope_group) = match &spec.mailboxes {
        MailboxSpec::Addresses(list) => (Some(list.clone()), grants::group_alias(&g.key)),
        MailboxSpec::ScopeGroup(a) => (None, a.clone()),
    };
    let steps = saga::flow(&plan)
        .iter()
        .map(|s| {
            let e = g.steps.iter().find(|e| e.step == *s);
            let current = e.filter(|e| e.revision == g.revision);
            GrantStep {
                name: s.as_str().into(),
                state: saga::display_state(&plan, e).into(),
                attempts: current.map_or(0, |e| e.attempts),
                output: e.map_or(serde_json::Value::Null, |e| e.output.clone()),
                last_error: current.and_then(|e| e.last_error.clone()).map(Into::into),
                updated_at: e.map(|e| e.updated_at),
            }
        })
        .collect();
    Ok(AccessGrant {
        key: g.key,
        condition: g.condition.as_str().into(),
        revision: g.revision,
        mechanism: g.mechanism,
        app_origin: app_origin.into(),
        app_id,
        display_name,
        permissions: spec.permissions,
        mailboxes,
        scope_group,
        canary_mailboxes: spec.canary_mailboxes,
        labels: serde_json::from_value(g.labels).unwrap_or_default(),
        external_ref: g.external_ref,
        callback_url: g.callback_url,
        steps,
        expiring_soon: None,
        created_at: g.created_at,
        updated_at: g.updated_at,
        condition_since: g.condition_at,
    })
}

fn status_response(
    req: &HttpRequest,
    g: GrantRecord,
    new_work: bool,
) -> Result<HttpResponse, ApiError> {
    let location = req.path().to_string();
    let mut b = if new_work {
        HttpResponse::Accepted()
    } else {
        HttpResponse::Ok()
    };
    b.insert_header((header::LOCATION, location));
    Ok(b.json(view(g)?))
}

/// Declare an access grant (onboard a vendor).
///
/// Records the desired state and answers at once; the `access_grant` job then creates (or
/// adopts) the scope group and the app, restricts the app to the scope group, and proves it in
/// force with a propagation check. With `rbac` (the default for a new grant) the restriction is
/// the service principal pointer and one role assignment per permission on the scope group; it
/// is verified in and out of scope with `Test-ServicePrincipalAuthorization` before any
/// tenant-wide Entra consent of the app is removed, and the app keeps none. With
/// `access_policy` the consent is granted only once the RestrictAccess policy exists. Follow it
/// with `GET …?wait=N` or the `callback_url`.
///
/// Idempotent: the same body again answers 200 and queues no work (labels, `external_ref` and
/// `callback_url` change in place); other mailboxes or permissions answer 202 and converge from
/// the current state; the same body on a `failed` or `removed` grant tries again (202).
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/access-grants/{key}", tag = "access grants",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("key" = String, Path, description = "The grant's key: 1 to 57 lowercase letters, digits or `-`"),
           ("Idempotency-Key" = Option<String>, Header, description = "Replays the stored response for a repeated request")),
    request_body = AccessGrantInput,
    responses(
        (status = 202, description = "accepted: the job works towards the new desired state", body = AccessGrant),
        (status = 200, description = "already the desired state: nothing new to do", body = AccessGrant),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the grant exists for another app or with another mechanism (`conflict`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid content, an unknown scope group, or with `rbac` a permission without an RBAC role or no canary mailbox", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "database unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn put_access_grant(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String)>,
    body: web::Json<AccessGrantInput>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, key) = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let (g, new_work) = grants::put(
        &state,
        &actor(&caller, &req),
        tenant_id,
        &key,
        body.into_inner().into(),
    )
    .await?;
    status_response(&req, g, new_work)
}

/// One grant: each step with its state, attempts and last error (cause and fix), and the
/// overall condition.
///
/// A token limited by the `mailscope_grants` claim (grant keys, or `label:name=value`) reads
/// only its grants here; every other resource of the tenant answers 404 to it.
///
/// `?wait=N` holds the request up to N seconds (at most 60) until the condition changes; a
/// `ready`, `failed` or `removed` grant answers at once.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/access-grants/{key}", tag = "access grants",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("key" = String, Path, description = "The grant's key"), WaitQuery),
    responses(
        (status = 200, description = "the grant", body = AccessGrant),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown grant, or tenant not visible", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get_access_grant(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String)>,
    q: web::Query<WaitQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let (tenant_id, key) = path.into_inner();
    // A token limited to some grants (a vendor portal) sees those, and any other as absent.
    caller.require_grant_tenant(tenant_id)?;
    let first = grants::get(&state, tenant_id, &key).await?;
    if !caller.may_see_grant(&first.key, &first.labels) {
        return Err(grants::grant_not_found(&key).into());
    }
    let wait = Duration::from_secs(q.wait.unwrap_or(0).min(MAX_WAIT_SECONDS));
    let until = tokio::time::Instant::now() + wait;
    let mut current = first.clone();
    // Poll the row (one indexed read every 250 ms, no connection held in between).
    while !current.condition.is_settled()
        && current.condition == first.condition
        && tokio::time::Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(250).min(until - tokio::time::Instant::now()))
            .await;
        current = grants::get(&state, tenant_id, &key).await?;
    }
    let created = matches!(
        serde_json::from_value::<Spec>(current.spec.clone()).map(|s| s.app),
        Ok(AppSpec::Create { .. })
    );
    let soon = if created && !current.removing {
        Some(grants::expiring_soon(&state, &current).await?)
    } else {
        None
    };
    let mut v = view(current)?;
    v.expiring_soon = soon;
    Ok(HttpResponse::Ok().json(v))
}

/// Offboard: revoke the consent, then remove the restriction (the access policy, or the RBAC
/// role assignments, then the service principal pointer once nothing else of the app uses it),
/// then the app and the scope group if mailscope created them. Answers 202 with the grant
/// `removing`; it ends `removed`.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/access-grants/{key}", tag = "access grants",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("key" = String, Path, description = "The grant's key")),
    responses(
        (status = 202, description = "removal under way", body = AccessGrant),
        (status = 200, description = "already being removed, or removed", body = AccessGrant),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown grant, or tenant not visible", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete_access_grant(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String)>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, key) = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let (g, new_work) = grants::delete(&state, &actor(&caller, &req), tenant_id, &key).await?;
    status_response(&req, g, new_work)
}

/// The tenant's grants with their condition, ordered by key; filterable by label, condition
/// and external reference (a portal's list view). A token limited by the `mailscope_grants`
/// claim sees only its grants.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/access-grants", tag = "access grants",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"), GrantListQuery),
    responses(
        (status = 200, description = "a page of grants", body = AccessGrantList),
        (status = 400, description = "invalid query (`invalid_query`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "tenant not visible", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list_access_grants(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
    q: web::Query<GrantListQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let tenant_id = path.into_inner();
    caller.require_grant_tenant(tenant_id)?;
    let q = q.into_inner();
    let limit = page_limit(q.limit)?;
    let labels = match &q.label {
        None => None,
        Some(l) => match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => Some(serde_json::json!({ k: v })),
            _ => {
                return Err(ApiError::new(
                    ProblemKind::InvalidQuery,
                    "label must be `name=value`, e.g. label=vendor=contoso-crm",
                ));
            }
        },
    };
    let condition = match &q.condition {
        None => None,
        Some(c) => Some(Condition::parse(c).ok_or_else(|| {
            ApiError::new(
                ProblemKind::InvalidQuery,
                "condition must be one of pending, provisioning, propagating, ready, failed, removing, removed",
            )
        })?),
    };
    let filter = Filter {
        labels,
        condition,
        external_ref: q.external_ref,
        keys: None,
    };
    let mut items = grants::list(&state, tenant_id, &filter, q.after.as_deref(), limit + 1).await?;
    let more = items.len() as i64 > limit;
    items.truncate(usize::try_from(limit).unwrap_or(50));
    // The cursor is the last key read, so a page thinned by the caller's limit still pages on.
    let next_after = super::next_cursor(&items, more, |g| g.key.clone());
    let items: Vec<AccessGrant> = items
        .into_iter()
        .filter(|g| caller.may_see_grant(&g.key, &g.labels))
        .map(view)
        .collect::<Result<_, _>>()?;
    Ok(HttpResponse::Ok().json(AccessGrantList { items, next_after }))
}

/// A certificate credential: the vendor's public certificate, registered on the grant's app.
#[derive(Serialize, ToSchema)]
pub struct CertificateView {
    /// The credential's `keyId` in Microsoft Graph.
    pub key_id: Uuid,
    /// SHA-1 of the certificate, upper-case hex (Graph's `customKeyIdentifier`).
    pub thumbprint: String,
    pub display_name: String,
    pub start_date_time: DateTime<Utc>,
    pub end_date_time: DateTime<Utc>,
    pub status: super::applications::SecretStatus,
}

/// The vendor's credentials for the grant's app.
#[derive(Serialize, ToSchema)]
pub struct GrantCredentials {
    /// Client secrets (metadata only; the text is shown once, when it is added).
    pub secrets: Vec<super::applications::SecretView>,
    pub certificates: Vec<CertificateView>,
    /// A credential ends within `provisioning.secret_expiring_soon_days` and none lasts longer:
    /// time to rotate.
    pub expiring_soon: bool,
}

/// The vendor's public certificate (PEM); never a private key.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"certificate_pem": "-----BEGIN CERTIFICATE-----\nMIID…\n-----END CERTIFICATE-----", "display_name": "acme 2026"}))]
pub struct CertificateInput {
    pub certificate_pem: String,
    pub display_name: Option<String>,
}

fn certificate_view(
    c: crate::store::access_grants::CertificateRecord,
    soon_days: u32,
) -> CertificateView {
    let status =
        crate::provisioning::applications::secret_status(Some(c.not_after), Utc::now(), soon_days);
    CertificateView {
        key_id: c.key_id,
        thumbprint: c.thumbprint,
        display_name: c.display_name,
        start_date_time: c.not_before,
        end_date_time: c.not_after,
        status: status.into(),
    }
}

/// The grant the caller may act on: its tenant visible (a grant-limited token included) and the
/// grant within the token's `mailscope_grants`, else 404.
async fn visible_grant(
    caller: &Caller,
    state: &AppState,
    tenant_id: Uuid,
    key: &str,
) -> Result<GrantRecord, ApiError> {
    caller.require_grant_tenant(tenant_id)?;
    let g = grants::get(state, tenant_id, key).await?;
    if !caller.may_see_grant(&g.key, &g.labels) {
        return Err(grants::grant_not_found(key).into());
    }
    Ok(g)
}

/// The credentials of the grant's app (apps mailscope created only): client secrets and
/// certificates with their status, and whether it is time to rotate.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/access-grants/{key}/credentials", tag = "access grants",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("key" = String, Path, description = "The grant's key")),
    responses(
        (status = 200, description = "the credentials", body = GrantCredentials),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown grant, or not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the grant adopted an existing app (its publisher manages its credentials), or its app is not created yet", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get_credentials(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String)>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let (tenant_id, key) = path.into_inner();
    let g = visible_grant(&caller, &state, tenant_id, &key).await?;
    let creds = grants::credentials(&state, tenant_id, &key).await?;
    let soon = state.settings.provisioning.secret_expiring_soon_days;
    Ok(HttpResponse::Ok().json(GrantCredentials {
        secrets: creds
            .secrets
            .into_iter()
            .map(super::applications::secret_view)
            .collect(),
        certificates: creds
            .certificates
            .into_iter()
            .map(|c| certificate_view(c, soon))
            .collect(),
        expiring_soon: grants::expiring_soon(&state, &g).await?,
    }))
}

/// Add a client secret to the grant's app. The text is in this answer only (a replay with the
/// same `Idempotency-Key` answers without it). Rotate by adding the new one, then deleting the
/// old one: both work in between.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/access-grants/{key}/secrets", tag = "access grants", operation_id = "add_grant_secret",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("key" = String, Path, description = "The grant's key"),
           ("Idempotency-Key" = Option<String>, Header, description = "Replays the stored response (without the secret text)")),
    request_body = super::applications::SecretInput,
    responses(
        (status = 201, description = "added; `secret_text` shown once", body = super::applications::NewSecret),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown grant, or not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the grant adopted an existing app, or its app is not created yet", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid lifetime or name", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn add_secret(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String)>,
    body: web::Json<super::applications::SecretInput>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, key) = path.into_inner();
    visible_grant(&caller, &state, tenant_id, &key).await?;
    let input = body.into_inner();
    let request = crate::provisioning::applications::SecretRequest {
        display_name: input.display_name,
        lifetime_days: input.lifetime_days,
    };
    let added = grants::add_secret(&state, &actor(&caller, &req), tenant_id, &key, request).await?;
    let mut answer = super::applications::NewSecret {
        secret: super::applications::secret_view(added.secret),
        secret_text: None,
    };
    let replay = serde_json::to_vec(&answer).map_err(ApiError::internal)?;
    {
        use secrecy::ExposeSecret;
        answer.secret_text = Some(added.text.expose_secret().to_string());
    }
    let mut res = HttpResponse::Created().json(&answer);
    res.extensions_mut()
        .insert(super::idempotency::ReplayBody(replay));
    Ok(res)
}

/// Remove a client secret from the grant's app.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/access-grants/{key}/secrets/{key_id}", tag = "access grants", operation_id = "delete_grant_secret",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("key" = String, Path, description = "The grant's key"),
           ("key_id" = Uuid, Path, description = "The secret's keyId")),
    responses(
        (status = 204, description = "removed"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown grant or secret, or not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the grant adopted an existing app", body = Problem, content_type = "application/problem+json"),
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
    visible_grant(&caller, &state, tenant_id, &key).await?;
    grants::delete_secret(&state, &actor(&caller, &req), tenant_id, &key, key_id).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Register the vendor's public certificate as a credential of the grant's app (Graph
/// `keyCredentials`); the vendor keeps its private key. Certificates already registered stay
/// (rotation with overlap). The same certificate again answers 200 with the existing credential.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/access-grants/{key}/certificates", tag = "access grants",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("key" = String, Path, description = "The grant's key")),
    request_body = CertificateInput,
    responses(
        (status = 201, description = "registered", body = CertificateView),
        (status = 200, description = "already registered", body = CertificateView),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown grant, or not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the grant adopted an existing app, or its app is not created yet", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "not a PEM certificate (or a private key), or expired", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn add_certificate(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String)>,
    body: web::Json<CertificateInput>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, key) = path.into_inner();
    visible_grant(&caller, &state, tenant_id, &key).await?;
    let input = body.into_inner();
    let (cert, created) = grants::add_certificate(
        &state,
        &actor(&caller, &req),
        tenant_id,
        &key,
        &input.certificate_pem,
        input.display_name,
    )
    .await?;
    let v = certificate_view(cert, state.settings.provisioning.secret_expiring_soon_days);
    Ok(if created {
        HttpResponse::Created().json(v)
    } else {
        HttpResponse::Ok().json(v)
    })
}

/// Remove a certificate credential from the grant's app.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/access-grants/{key}/certificates/{key_id}", tag = "access grants",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("key" = String, Path, description = "The grant's key"),
           ("key_id" = Uuid, Path, description = "The credential's keyId")),
    responses(
        (status = 204, description = "removed"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown grant or certificate, or not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the grant adopted an existing app", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete_certificate(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String, Uuid)>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, key, key_id) = path.into_inner();
    visible_grant(&caller, &state, tenant_id, &key).await?;
    grants::delete_certificate(&state, &actor(&caller, &req), tenant_id, &key, key_id).await?;
    Ok(HttpResponse::NoContent().finish())
}
