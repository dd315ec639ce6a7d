//! `/v1/tenants/{tenant_id}/propagation-checks`: proof that an app's access restriction is in
//! force. Checks start by hand here or from every change to an app's access policies (in that
//! change's transaction); the `propagation_check` job (`crate::jobs::propagation_check`) runs
//! them. The use cases are in `provisioning::checks`; here is their HTTP shape.
//!
//! At most one check is active per (tenant, app): a new change, or a new request, replaces the
//! active check's expectations (its streaks restart) instead of starting a second one.
use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::problem::{ApiError, Problem, ProblemKind};
use super::{AppState, page_limit};
use crate::auth::{Caller, Role};
use crate::domain::propagation::{Access, Bracket};
use crate::provisioning::checks::{self as checks, CheckRequest, CheckView};
use crate::queue;
use crate::store::propagation_checks::{CheckState, Mechanism};
use crate::store::{self};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/tenants/{tenant_id}/propagation-checks")
            .route(web::post().to(create_check))
            .route(web::get().to(list_checks)),
    )
    .route(
        "/tenants/{tenant_id}/propagation-checks/{id}",
        web::get().to(get_check),
    )
    .route(
        "/tenants/{tenant_id}/propagation-checks/{id}/cancel",
        web::post().to(cancel_check),
    );
}

/// Longest `?wait=`.
const MAX_WAIT_SECONDS: u64 = 60;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpectationInput {
    /// The mailbox's SMTP address.
    #[schema(example = "alice@contoso.onmicrosoft.com")]
    pub mailbox: String,
    pub expected: Access,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "app_id": "b9701c1e-1364-464d-93e4-01ae925e8d6c",
    "expectations": [
        {"mailbox": "alice@contoso.onmicrosoft.com", "expected": "granted"},
        {"mailbox": "ceo@contoso.onmicrosoft.com", "expected": "denied"}
    ],
    "callback_url": "https://hooks.example.com/mailscope"
}))]
pub struct CheckInput {
    /// The app's client id.
    #[schema(value_type = String, format = Uuid)]
    pub app_id: String,
    #[serde(default)]
    pub expectations: Vec<ExpectationInput>,
    /// Mailboxes that must stay out of the app's reach: each is expected `denied`.
    #[serde(default)]
    pub canary_mailboxes: Vec<String>,
    /// Where to send a signed event when the check ends (stored; delivery comes with webhooks).
    pub callback_url: Option<String>,
    /// Consecutive matching observations per mailbox (default from settings, 1–20).
    pub required_matches: Option<u32>,
    /// Seconds until the check gives up as `timed_out` (default from settings: 24 hours for
    /// an access policy, 4 hours for RBAC).
    pub deadline_seconds: Option<u64>,
    /// The restriction to verify: `access_policy` (default, stage 1 asks
    /// `Test-ApplicationAccessPolicy`) or `rbac` (stage 1 asks `Test-ServicePrincipalAuthorization
    /// -Resource`, and Graph is looked at after RBAC's permission cache, 30 minutes to 2 hours).
    pub mechanism: Option<CheckMechanism>,
}

/// Which restriction a check verifies.
#[derive(Deserialize, Serialize, ToSchema, Clone, Copy, Default)]
#[serde(rename_all = "snake_case")]
pub enum CheckMechanism {
    /// An application access policy.
    #[default]
    AccessPolicy,
    /// RBAC for Applications. There is no DenyAccess in RBAC (docs/microsoft-365.md §3.8).
    Rbac,
}

impl From<CheckMechanism> for Mechanism {
    fn from(m: CheckMechanism) -> Mechanism {
        match m {
            CheckMechanism::AccessPolicy => Mechanism::AccessPolicy,
            CheckMechanism::Rbac => Mechanism::Rbac,
        }
    }
}

impl From<Mechanism> for CheckMechanism {
    fn from(m: Mechanism) -> CheckMechanism {
        match m {
            Mechanism::AccessPolicy => CheckMechanism::AccessPolicy,
            Mechanism::Rbac => CheckMechanism::Rbac,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ExpectationView {
    pub mailbox: String,
    pub expected: Access,
    /// The latest answer: Graph's in the live stage, else `Test-ApplicationAccessPolicy`'s.
    pub last_observed: Option<Access>,
    pub last_observed_at: Option<DateTime<Utc>>,
    pub consecutive_matches: u32,
    /// The first observation of the final matching streak: the change had taken effect for this
    /// mailbox by then.
    pub first_matched_at: Option<DateTime<Utc>>,
    pub met_at: Option<DateTime<Utc>>,
    /// The last observation that still showed the old behaviour (a flap included): the change
    /// took effect for this mailbox after it.
    pub last_mismatch_at: Option<DateTime<Utc>>,
    /// Once met: seconds from the change to `last_mismatch_at` (`at_least`, 0 if the first look
    /// already matched) and to `first_matched_at` (`at_most`).
    pub propagation_seconds: Option<Bracket>,
}

#[derive(Serialize, ToSchema)]
pub struct PropagationCheck {
    pub id: Uuid,
    pub app_id: Uuid,
    /// `queued`, `running`, `succeeded`, `misconfigured`, `timed_out`, `cancelled` or `failed`.
    #[schema(value_type = super::schema::CheckState, example = "running")]
    pub state: String,
    /// `configuration` (Exchange's Test cmdlet), `live` (Graph as the app) or `done`.
    #[schema(value_type = super::schema::CheckStage, example = "live")]
    pub stage: String,
    /// `graph` (seen through Graph as the app) or `exchange_test` (adopted or send-only apps).
    #[schema(value_type = Option<super::schema::VerifiedBy>)]
    pub verified_by: Option<String>,
    pub expectations: Vec<ExpectationView>,
    pub required_matches: i32,
    /// Runs of the check's job so far.
    pub attempts: i32,
    /// When the check looks next (while active).
    pub next_run_at: Option<DateTime<Utc>>,
    pub deadline: DateTime<Utc>,
    pub callback_url: Option<String>,
    /// Signed `propagation_check.completed` events sent to `callback_url` when the check ended,
    /// with every attempt (the `id` is the `webhook-id` header receivers dedupe on).
    pub callback_deliveries: Vec<crate::webhooks::DeliveryStatus>,
    /// Why it ended as it did (misconfiguration, last observations at the deadline, failure).
    pub reason: Option<String>,
    /// Once `succeeded` through Graph: when the change took effect at the slowest mailbox, in
    /// seconds from the change, as the observations bound it. `at_least` is the last
    /// observation that still showed the old behaviour, `at_most` the first of the confirmed
    /// new behaviour; the true moment lies between (the gap is one observation interval).
    pub propagation_seconds: Option<Bracket>,
    /// `manual`, `access_policy` (started by a policy change) or `rbac_restriction` (started
    /// when an RBAC restriction was enforced or replaced).
    #[schema(value_type = super::schema::CheckOrigin)]
    pub origin: String,
    /// What stage 1 verifies: `access_policy` or `rbac`.
    pub mechanism: CheckMechanism,
    /// While an RBAC check waits for Graph: that RBAC for Applications caches permissions for
    /// 30 minutes to 2 hours, up to 2 hours for an app in use.
    #[schema(
        example = "waiting for RBAC for Applications' permission cache: Exchange (Test-ServicePrincipalAuthorization) already shows the change, Graph applies it within 30 minutes to 2 hours as documented; an app in use keeps its cached permissions up to 2 hours, so its old access can last until about 2026-12-01T07:00:00+00:00"
    )]
    pub waiting_note: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The change being verified (the last one, when several changes merged into this check).
    pub changed_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Serialize, ToSchema)]
pub struct PropagationCheckList {
    pub items: Vec<PropagationCheck>,
    pub next_after: Option<Uuid>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    /// Wait up to this many seconds (at most 60) for the state to change.
    pub wait: Option<u64>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct CheckListQuery {
    /// Only checks in this state.
    #[param(value_type = Option<super::schema::CheckState>)]
    pub state: Option<String>,
    pub app_id: Option<Uuid>,
    /// Page size, 1–500 (default 50).
    pub limit: Option<i64>,
    /// Cursor: the `next_after` of the previous page.
    pub after: Option<Uuid>,
}

/// The check as the API shows it (its job's runs and callbacks read with `c`).
pub async fn view(
    c: &impl GenericClient,
    r: store::propagation_checks::CheckRecord,
) -> Result<PropagationCheck, ApiError> {
    Ok(view_of(checks::view(c, r).await?))
}

pub(crate) fn view_of(v: CheckView) -> PropagationCheck {
    let attempts = v.job.as_ref().map_or(0, |j| j.attempt);
    let next_run_at = v.next_run_at();
    let waiting_note = v.waiting_note();
    let r = v.check;
    let changed = r.changed_at;
    PropagationCheck {
        id: r.id,
        app_id: r.app_id,
        state: r.state.as_str().to_string(),
        stage: r.stage.as_str().to_string(),
        verified_by: r.verified_by,
        expectations: r
            .expectations
            .into_iter()
            .map(|e| ExpectationView {
                propagation_seconds: e.propagation(changed),
                last_mismatch_at: e.last_mismatch_at,
                mailbox: e.mailbox,
                expected: e.expected,
                last_observed: e.last_observed,
                last_observed_at: e.last_observed_at,
                consecutive_matches: e.consecutive_matches,
                first_matched_at: e.first_matched_at,
                met_at: e.met_at,
            })
            .collect(),
        required_matches: r.required_matches,
        attempts,
        next_run_at,
        deadline: r.deadline,
        callback_url: r.callback_url,
        callback_deliveries: v.deliveries,
        reason: r.reason,
        propagation_seconds: r.propagation_seconds,
        origin: r.origin,
        mechanism: r.mechanism.into(),
        waiting_note,
        created_at: r.created_at,
        changed_at: r.changed_at,
        updated_at: r.updated_at,
        finished_at: r.finished_at,
    }
}

/// The API path of a check.
pub fn check_path(tenant_id: Uuid, id: Uuid) -> String {
    format!("/v1/tenants/{tenant_id}/propagation-checks/{id}")
}

/// `Link: </v1/tenants/{t}/propagation-checks/{id}>; rel="propagation-check"`
pub fn link_header(tenant_id: Uuid, id: Uuid) -> (header::HeaderName, String) {
    (
        header::LINK,
        format!("<{}>; rel=\"propagation-check\"", check_path(tenant_id, id)),
    )
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::not_found(format!("no propagation check {id} in this tenant"))
}

/// Start a propagation check by hand with explicit expectations.
///
/// If the app already has an active check, its expectations are replaced (200); otherwise a new
/// check starts (201). Needs MailScope.Write.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/propagation-checks", tag = "propagation checks",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Replays the stored response for a repeated request")),
    request_body = CheckInput,
    responses(
        (status = 201, description = "check started", body = PropagationCheck),
        (status = 200, description = "the app's active check, with these expectations now", body = PropagationCheck),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid content", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn create_check(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
    body: web::Json<CheckInput>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let tenant_id = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let input = body.into_inner();
    let request = CheckRequest {
        app_id: input.app_id,
        expectations: input
            .expectations
            .into_iter()
            .map(|e| (e.mailbox, e.expected))
            .collect(),
        canary_mailboxes: input.canary_mailboxes,
        callback_url: input.callback_url,
        required_matches: input.required_matches,
        deadline_seconds: input.deadline_seconds,
        mechanism: input.mechanism.unwrap_or_default().into(),
    };
    let (v, created) =
        checks::create(&state, &super::actor(&caller, &req), tenant_id, &request).await?;
    let v = view_of(v);
    let location = check_path(tenant_id, v.id);
    Ok(if created {
        HttpResponse::Created()
            .insert_header((header::LOCATION, location))
            .json(v)
    } else {
        HttpResponse::Ok()
            .insert_header((header::CONTENT_LOCATION, location))
            .json(v)
    })
}

/// One check: state, stage, each mailbox's last observation and streak, propagation time.
///
/// `?wait=N` holds the request up to N seconds (at most 60) until the state changes; a check
/// that has ended answers at once.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/propagation-checks/{id}", tag = "propagation checks",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("id" = Uuid, Path, description = "The check's id"), WaitQuery),
    responses(
        (status = 200, description = "the check", body = PropagationCheck),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown check, or tenant not visible", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get_check(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, Uuid)>,
    q: web::Query<WaitQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let (tenant_id, id) = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let wait = Duration::from_secs(q.wait.unwrap_or(0).min(MAX_WAIT_SECONDS));
    let until = tokio::time::Instant::now() + wait;
    let first = {
        let db = state.db().await?;
        store::propagation_checks::get(&db, tenant_id, id)
            .await?
            .ok_or_else(|| not_found(id))?
    };
    let mut current = first.clone();
    // Poll the row (one indexed read every 250 ms, no connection held in between).
    // A final state never changes again: answer at once.
    while !current.is_final() && current.state == first.state && tokio::time::Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(250).min(until - tokio::time::Instant::now()))
            .await;
        let db = state.db().await?;
        current = store::propagation_checks::get(&db, tenant_id, id)
            .await?
            .ok_or_else(|| not_found(id))?;
    }
    let db = state.db().await?;
    Ok(HttpResponse::Ok().json(view(&db, current).await?))
}

/// The tenant's checks, newest id order not guaranteed (ordered by id for stable paging).
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/propagation-checks", tag = "propagation checks",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"), CheckListQuery),
    responses(
        (status = 200, description = "a page of checks", body = PropagationCheckList),
        (status = 400, description = "invalid query", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "tenant not visible", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list_checks(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
    q: web::Query<CheckListQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let tenant_id = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let limit = page_limit(q.limit)?;
    let filter = match &q.state {
        None => None,
        Some(s) => Some(CheckState::parse(s).ok_or_else(|| {
            let all: Vec<&str> = CheckState::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::new(
                ProblemKind::InvalidQuery,
                format!("state must be one of {}", all.join(", ")),
            )
        })?),
    };
    let db = state.db().await?;
    super::require_registered(&db, tenant_id).await?;
    let rows =
        store::propagation_checks::list(&db, tenant_id, filter, q.app_id, q.after, limit + 1)
            .await?;
    let (rows, more) = super::split_page(rows, limit);
    // The page's jobs in one query.
    let job_ids: Vec<Uuid> = rows.iter().filter_map(|r| r.job_id).collect();
    let jobs = queue::get_many(&db, &job_ids).await?;
    let items: Vec<PropagationCheck> = rows
        .into_iter()
        .map(|r| {
            let job = r.job_id.and_then(|j| jobs.get(&j)).cloned();
            // Lists leave callbacks out (one query per check); `GET` of one check has them.
            view_of(CheckView {
                check: r,
                job,
                deliveries: Vec::new(),
            })
        })
        .collect();
    let next_after = super::next_cursor(&items, more, |c| c.id);
    Ok(HttpResponse::Ok().json(PropagationCheckList { items, next_after }))
}

/// Cancel a check.
///
/// A check that holds no probe secret and is not running ends at once (200). Otherwise it is
/// flagged (202) and its job, woken at once, removes the probe secret and ends it `cancelled`.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/propagation-checks/{id}/cancel", tag = "propagation checks",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("id" = Uuid, Path, description = "The check's id")),
    responses(
        (status = 200, description = "cancelled", body = PropagationCheck),
        (status = 202, description = "cancellation requested; the check ends once its probe secret is removed", body = PropagationCheck),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown check, or tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the check has already ended", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn cancel_check(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, Uuid)>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, id) = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let (v, done) = checks::cancel(&state, &super::actor(&caller, &req), tenant_id, id).await?;
    let v = view_of(v);
    Ok(if done {
        HttpResponse::Ok().json(v)
    } else {
        HttpResponse::Accepted().json(v)
    })
}
