//! `/v1/tenants/{tenant_id}/rbac-migrations`: an app's migration from application access
//! policies to RBAC for Applications, planned (dry run) or run as a resumable job, with pause,
//! resume and rollback. Thin handlers over `provisioning::rbac_migration`.
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::access_grants::StepErrorView;
use super::problem::{ApiError, Problem, ProblemKind};
use super::{AppState, actor, page_limit};
use crate::auth::{Caller, Role};
use crate::domain::rbac_migration::{State, Step, StepState};
use crate::provisioning::rbac_migration::{self as migration, Action, Planned, RbacScope, Started};
use crate::store::rbac_migrations::MigrationRecord;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/tenants/{tenant_id}/rbac-migrations")
            .route(web::post().to(create_migration))
            .route(web::get().to(list_migrations)),
    )
    .route(
        "/tenants/{tenant_id}/rbac-migrations/{id}",
        web::get().to(get_migration),
    )
    .route(
        "/tenants/{tenant_id}/rbac-migrations/{id}/pause",
        web::post().to(pause_migration),
    )
    .route(
        "/tenants/{tenant_id}/rbac-migrations/{id}/resume",
        web::post().to(resume_migration),
    )
    .route(
        "/tenants/{tenant_id}/rbac-migrations/{id}/rollback",
        web::post().to(rollback_migration),
    );
}

/// Migrate one app, or only plan it.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "app_id": "b9701c1e-1364-464d-93e4-01ae925e8d6c",
    "dry_run": false,
    "canary_mailboxes": ["bob@contoso-sandbox.onmicrosoft.com"],
    "callback_url": "https://portal.example.com/hooks/mailscope"
}))]
pub struct RbacMigrationInput {
    /// The app's client id.
    #[schema(value_type = String, format = Uuid)]
    pub app_id: String,
    /// Only plan: answer 200 with what would be created and removed, what cannot be carried
    /// over and the expected time; nothing is recorded or changed.
    #[serde(default)]
    pub dry_run: bool,
    /// Mailboxes that must stay reachable (default: up to three direct members per scope).
    #[serde(default)]
    pub sample_mailboxes: Vec<String>,
    /// Mailboxes that must stay out of reach at every step, besides the tenant's canaries.
    #[serde(default)]
    pub canary_mailboxes: Vec<String>,
    /// Signed events: `rbac_migration.succeeded`, `.failed`, `.rolled_back`, and
    /// `.attention_needed` when a step's error paused it.
    pub callback_url: Option<String>,
}

/// Where a migration stands.
#[derive(Serialize, Deserialize, ToSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    Running,
    Paused,
    RollingBack,
    RolledBack,
    Succeeded,
    Failed,
}

impl From<State> for MigrationState {
    fn from(s: State) -> Self {
        match s {
            State::Running => MigrationState::Running,
            State::Paused => MigrationState::Paused,
            State::RollingBack => MigrationState::RollingBack,
            State::RolledBack => MigrationState::RolledBack,
            State::Succeeded => MigrationState::Succeeded,
            State::Failed => MigrationState::Failed,
        }
    }
}

impl From<MigrationState> for State {
    fn from(s: MigrationState) -> Self {
        match s {
            MigrationState::Running => State::Running,
            MigrationState::Paused => State::Paused,
            MigrationState::RollingBack => State::RollingBack,
            MigrationState::RolledBack => State::RolledBack,
            MigrationState::Succeeded => State::Succeeded,
            MigrationState::Failed => State::Failed,
        }
    }
}

/// A forward step, in the only order it runs (`done` once all ran).
#[derive(Serialize, ToSchema, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum MigrationStepName {
    CreateRbac,
    VerifyRbac,
    RemoveEntraConsent,
    VerifyEntraRemoved,
    RemoveAccessPolicy,
    VerifyPolicyRemoved,
    Done,
}

impl From<Step> for MigrationStepName {
    fn from(s: Step) -> Self {
        match s {
            Step::CreateRbac => MigrationStepName::CreateRbac,
            Step::VerifyRbac => MigrationStepName::VerifyRbac,
            Step::RemoveEntraConsent => MigrationStepName::RemoveEntraConsent,
            Step::VerifyEntraRemoved => MigrationStepName::VerifyEntraRemoved,
            Step::RemoveAccessPolicy => MigrationStepName::RemoveAccessPolicy,
            Step::VerifyPolicyRemoved => MigrationStepName::VerifyPolicyRemoved,
            Step::Done => MigrationStepName::Done,
        }
    }
}

#[derive(Serialize, ToSchema, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum MigrationStepState {
    Pending,
    Running,
    Done,
    Failed,
}

/// Why a part of the current restriction is not carried over.
#[derive(Serialize, ToSchema, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum NotCarriedKind {
    /// RBAC only grants: no equivalent (blocks the migration).
    DenyAccessPolicy,
    /// Reached only through a nested group, which RBAC scopes do not see (the app loses it).
    NestedMember,
    /// No RBAC role grants it, e.g. Mail.ReadBasic.All or full_access_as_app (blocks).
    PermissionWithoutRole,
}

#[derive(Serialize, ToSchema)]
pub struct NotCarriedView {
    pub kind: NotCarriedKind,
    /// The policy's scope, the member's address or the permission.
    #[schema(example = "board@contoso-sandbox.onmicrosoft.com")]
    pub subject: String,
    pub detail: String,
    /// Executing anyway would change what the app can do or reach.
    pub blocks_execution: bool,
}

#[derive(Serialize, ToSchema)]
pub struct PlannedAssignment {
    #[schema(example = "Mail.Read")]
    pub permission: String,
    #[schema(example = "Application Mail.Read")]
    pub role: String,
}

/// One access policy of the app and what becomes of it.
#[derive(Serialize, ToSchema)]
pub struct PlannedPolicyView {
    /// mailscope's access policy id (removed in the `remove_access_policy` step).
    pub id: Uuid,
    pub scope_address: String,
    pub scope_group: Option<String>,
    #[schema(example = "RestrictAccess")]
    pub access_right: String,
    /// The RBAC scope created for it: `scope_group` (`-RecipientGroupScope`) or
    /// `recipient_filter` (a management scope); absent for DenyAccess.
    pub rbac_scope_group: Option<String>,
    pub rbac_recipient_filter: Option<String>,
}

/// The plan: what will be created and removed, what cannot be carried over, how long it takes.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({
    "app_id": "b9701c1e-1364-464d-93e4-01ae925e8d6c",
    "service_principal_object_id": "5d6a1c2e-8b7f-4e0a-9f3d-2c1b0a9e8d7c",
    "policies": [{"id": "8c0d5e43-3a5b-4a57-a1d2-0e6a8b1f2c3d", "scope_address": "crm-scope@contoso-sandbox.onmicrosoft.com",
        "scope_group": "crm-scope", "access_right": "RestrictAccess", "rbac_scope_group": "crm-scope", "rbac_recipient_filter": null}],
    "create_assignments": [{"permission": "Mail.Read", "role": "Application Mail.Read"}],
    "remove_entra_grants": ["Mail.Read"],
    "remove_access_policies": ["crm-scope"],
    "not_carried": [],
    "steps": ["create_rbac", "verify_rbac", "remove_entra_consent", "verify_entra_removed",
        "remove_access_policy", "verify_policy_removed", "done"],
    "sample_mailboxes": ["alice@contoso-sandbox.onmicrosoft.com"],
    "canary_mailboxes": ["bob@contoso-sandbox.onmicrosoft.com"],
    "token_drain_seconds": 5400,
    "expected_min_seconds": 9000,
    "expected_max_seconds": 19800,
    "executable": true
}))]
pub struct RbacMigrationPlan {
    #[schema(value_type = String, format = Uuid)]
    pub app_id: String,
    pub service_principal_object_id: String,
    pub policies: Vec<PlannedPolicyView>,
    /// Role assignments created beside the policy, per RestrictAccess scope.
    pub create_assignments: Vec<PlannedAssignment>,
    /// Entra grants removed once RBAC is verified (restored by a rollback).
    pub remove_entra_grants: Vec<String>,
    /// Access policies (their scopes) removed last.
    pub remove_access_policies: Vec<String>,
    pub not_carried: Vec<NotCarriedView>,
    pub steps: Vec<MigrationStepName>,
    pub sample_mailboxes: Vec<String>,
    pub canary_mailboxes: Vec<String>,
    /// The wait after the consent's removal for older access tokens to expire.
    pub token_drain_seconds: u64,
    /// Expected duration: RBAC's permission cache (30 minutes to 2 hours) twice, plus the
    /// token drain.
    pub expected_min_seconds: u64,
    pub expected_max_seconds: u64,
    /// False when something in `not_carried` blocks the migration.
    pub executable: bool,
}

#[derive(Serialize, ToSchema)]
pub struct MigrationStep {
    /// A forward step, or a rollback step (`restore_entra_consent`, `remove_rbac`).
    #[schema(example = "create_rbac")]
    pub name: String,
    pub state: MigrationStepState,
    /// Runs that did work (polls of a check under way do not count).
    pub attempts: u32,
    /// What the step made or found: restriction ids, removed grants, check ids.
    #[schema(value_type = Object)]
    pub output: serde_json::Value,
    pub last_error: Option<StepErrorView>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PausedReason {
    Requested,
    Error,
}

/// An app's migration and where it stands.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({
    "id": "2f4c1d7e-93b5-4d8f-a0e1-6b2c3d4e5f60",
    "app_id": "b9701c1e-1364-464d-93e4-01ae925e8d6c",
    "state": "running",
    "current_step": "verify_entra_removed",
    "paused_reason": null,
    "rollback_allowed": true,
    "plan": {
        "app_id": "b9701c1e-1364-464d-93e4-01ae925e8d6c",
        "service_principal_object_id": "5d6a1c2e-8b7f-4e0a-9f3d-2c1b0a9e8d7c",
        "policies": [{"id": "8c0d5e43-3a5b-4a57-a1d2-0e6a8b1f2c3d", "scope_address": "crm-scope@contoso-sandbox.onmicrosoft.com",
            "scope_group": "crm-scope", "access_right": "RestrictAccess", "rbac_scope_group": "crm-scope", "rbac_recipient_filter": null}],
        "create_assignments": [{"permission": "Mail.Read", "role": "Application Mail.Read"}],
        "remove_entra_grants": ["Mail.Read"],
        "remove_access_policies": ["crm-scope"],
        "not_carried": [],
        "steps": ["create_rbac", "verify_rbac", "remove_entra_consent", "verify_entra_removed",
            "remove_access_policy", "verify_policy_removed", "done"],
        "sample_mailboxes": ["alice@contoso-sandbox.onmicrosoft.com"],
        "canary_mailboxes": ["bob@contoso-sandbox.onmicrosoft.com"],
        "token_drain_seconds": 5400,
        "expected_min_seconds": 9000,
        "expected_max_seconds": 19800,
        "executable": true
    },
    "steps": [{"name": "create_rbac", "state": "done", "attempts": 1,
        "output": {"restrictions": ["0b3e..."]}, "last_error": null,
        "started_at": "2026-12-01T09:00:00Z", "finished_at": "2026-12-01T09:00:02Z"}],
    "check_ids": [],
    "callback_url": null,
    "created_at": "2026-12-01T09:00:00Z",
    "updated_at": "2026-12-01T09:31:00Z",
    "finished_at": null
}))]
pub struct RbacMigration {
    pub id: Uuid,
    #[schema(value_type = String, format = Uuid)]
    pub app_id: String,
    pub state: MigrationState,
    /// The next forward step (`done` once all ran).
    pub current_step: MigrationStepName,
    pub paused_reason: Option<PausedReason>,
    /// A rollback is possible: the access policy still bounds the app.
    pub rollback_allowed: bool,
    pub plan: RbacMigrationPlan,
    pub steps: Vec<MigrationStep>,
    /// Propagation checks the migration started (`/propagation-checks/{id}`).
    pub check_ids: Vec<Uuid>,
    pub callback_url: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A dry run's answer.
#[derive(Serialize, ToSchema)]
pub struct RbacMigrationDryRun {
    /// Always true.
    pub dry_run: bool,
    pub plan: RbacMigrationPlan,
}

#[derive(Serialize, ToSchema)]
pub struct RbacMigrationList {
    pub items: Vec<RbacMigration>,
    pub next_after: Option<Uuid>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct MigrationListQuery {
    /// Only this app's migrations (client id).
    #[param(value_type = Option<String>, format = Uuid)]
    pub app_id: Option<String>,
    /// Only migrations in this state.
    pub state: Option<MigrationState>,
    /// Page size, 1–500 (default 50).
    pub limit: Option<i64>,
    /// Cursor: the `next_after` of the previous page (newest first).
    pub after: Option<Uuid>,
}

fn plan_view(p: Planned) -> RbacMigrationPlan {
    let r = p.rules;
    RbacMigrationPlan {
        app_id: p.app_id,
        service_principal_object_id: p.service_principal_object_id,
        policies: p
            .policies
            .into_iter()
            .map(|x| {
                let (group, filter) = match x.rbac_scope {
                    Some(RbacScope::ScopeGroup(g)) => (Some(g), None),
                    Some(RbacScope::RecipientFilter(f)) => (None, Some(f)),
                    None => (None, None),
                };
                PlannedPolicyView {
                    id: x.id,
                    scope_address: x.scope_address,
                    scope_group: x.scope_alias,
                    access_right: x.access_right,
                    rbac_scope_group: group,
                    rbac_recipient_filter: filter,
                }
            })
            .collect(),
        create_assignments: r
            .create_assignments
            .into_iter()
            .map(|(permission, role)| PlannedAssignment { permission, role })
            .collect(),
        remove_entra_grants: r.remove_entra_grants,
        remove_access_policies: r.remove_access_policies,
        not_carried: r
            .not_carried
            .into_iter()
            .map(|n| NotCarriedView {
                kind: match n.kind.as_str() {
                    "deny_access_policy" => NotCarriedKind::DenyAccessPolicy,
                    "nested_member" => NotCarriedKind::NestedMember,
                    _ => NotCarriedKind::PermissionWithoutRole,
                },
                subject: n.subject,
                detail: n.detail,
                blocks_execution: n.blocks_execution,
            })
            .collect(),
        steps: r.steps.into_iter().map(Into::into).collect(),
        sample_mailboxes: p.sample_mailboxes,
        canary_mailboxes: p.canary_mailboxes,
        token_drain_seconds: p.token_drain_seconds,
        expected_min_seconds: r.expected_min_seconds,
        expected_max_seconds: r.expected_max_seconds,
        executable: r.executable,
    }
}

fn view(m: MigrationRecord) -> Result<RbacMigration, ApiError> {
    let planned = migration::planned_of(&m)?;
    Ok(RbacMigration {
        id: m.id,
        app_id: m.app_id,
        state: m.state.into(),
        current_step: m.current_step.into(),
        paused_reason: match m.paused_reason.as_deref() {
            Some("error") => Some(PausedReason::Error),
            Some(_) => Some(PausedReason::Requested),
            None => None,
        },
        rollback_allowed: !m.state.is_final()
            && crate::domain::rbac_migration::rollback_allowed(&m.steps),
        plan: plan_view(planned),
        steps: m
            .steps
            .into_iter()
            .map(|e| MigrationStep {
                name: e.name,
                state: match e.state {
                    StepState::Pending => MigrationStepState::Pending,
                    StepState::Running => MigrationStepState::Running,
                    StepState::Done => MigrationStepState::Done,
                    StepState::Failed => MigrationStepState::Failed,
                },
                attempts: e.attempts,
                output: e.output,
                last_error: e.last_error.map(Into::into),
                started_at: e.started_at,
                finished_at: e.finished_at,
            })
            .collect(),
        check_ids: m.check_ids,
        callback_url: m.callback_url,
        created_at: m.created_at,
        updated_at: m.updated_at,
        finished_at: m.finished_at,
    })
}

/// Migrate an app from application access policies to RBAC for Applications, or plan it.
///
/// With `dry_run`, answers 200 with the plan and changes nothing. Otherwise records the
/// migration and answers 202; its job runs one step per run in the order that never widens the
/// app's access: RBAC beside the policy → verify (`Test-ServicePrincipalAuthorization`) → remove
/// the Entra consent → verify (propagation check, older tokens expired) → remove the access
/// policy → verify. Follow it with `GET …/rbac-migrations/{id}`.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/rbac-migrations", tag = "rbac migrations",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Replays the stored response for a repeated request")),
    request_body = RbacMigrationInput,
    responses(
        (status = 202, description = "recorded; its job runs the steps (`Location` names it)", body = RbacMigration),
        (status = 200, description = "dry run: the plan, nothing changed", body = RbacMigrationDryRun),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the app already has an unfinished migration (`rbac_migration_active`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid content; the app has no access policy, only DenyAccess ones, or permissions no RBAC role grants (`rbac_migration_not_possible`); no mailbox to verify with (`verification_mailboxes_required`)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft 365 refused or failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn create_migration(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
    body: web::Json<RbacMigrationInput>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let tenant_id = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let b = body.into_inner();
    let request = migration::Request {
        app_id: b.app_id,
        dry_run: b.dry_run,
        sample_mailboxes: b.sample_mailboxes,
        canary_mailboxes: b.canary_mailboxes,
        callback_url: b.callback_url,
    };
    match migration::start(&state, &actor(&caller, &req), tenant_id, request).await? {
        Started::DryRun(p) => Ok(HttpResponse::Ok().json(RbacMigrationDryRun {
            dry_run: true,
            plan: plan_view(*p),
        })),
        Started::Queued(m) => {
            let location = format!("{}/{}", req.path(), m.id);
            Ok(HttpResponse::Accepted()
                .insert_header((header::LOCATION, location))
                .json(view(*m)?))
        }
    }
}

/// The tenant's migrations, newest first.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/rbac-migrations", tag = "rbac migrations",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"), MigrationListQuery),
    responses(
        (status = 200, description = "a page of migrations", body = RbacMigrationList),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "tenant not visible", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list_migrations(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
    q: web::Query<MigrationListQuery>,
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
    let rows = migration::list(
        &state,
        tenant_id,
        app_id.as_deref(),
        q.state.map(Into::into),
        q.after,
        limit + 1,
    )
    .await?;
    let (rows, more) = super::split_page(rows, limit);
    let items = rows.into_iter().map(view).collect::<Result<Vec<_>, _>>()?;
    let next_after = super::next_cursor(&items, more, |m| m.id);
    Ok(HttpResponse::Ok().json(RbacMigrationList { items, next_after }))
}

/// One migration: its plan, state, current step and each step's attempts, output and error.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/rbac-migrations/{id}", tag = "rbac migrations",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("id" = Uuid, Path, description = "The migration's id")),
    responses(
        (status = 200, description = "the migration", body = RbacMigration),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown migration, or tenant not visible", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get_migration(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, Uuid)>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let (tenant_id, id) = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let m = migration::get(&state, tenant_id, id).await?;
    Ok(HttpResponse::Ok().json(view(m)?))
}

async fn act(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, Uuid)>,
    action: Action,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, id) = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let (m, changed) = migration::act(&state, &actor(&caller, &req), tenant_id, id, action).await?;
    let queued = changed && matches!(action, Action::Resume | Action::RollBack);
    let mut res = if queued {
        HttpResponse::Accepted()
    } else {
        HttpResponse::Ok()
    };
    Ok(res.json(view(m)?))
}

/// Pause, answered at once: a step under way finishes and is recorded (it shows in `steps`); no
/// further step runs until resumed.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/rbac-migrations/{id}/pause", tag = "rbac migrations",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("id" = Uuid, Path, description = "The migration's id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Replays the stored response for a repeated request")),
    responses(
        (status = 200, description = "paused (or already paused)", body = RbacMigration),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown migration, or tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the migration has ended or is rolling back (`conflict`)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn pause_migration(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, Uuid)>,
) -> Result<HttpResponse, ApiError> {
    act(req, caller, state, path, Action::Pause).await
}

/// Resume a paused migration: the current step runs again (each step is idempotent).
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/rbac-migrations/{id}/resume", tag = "rbac migrations",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("id" = Uuid, Path, description = "The migration's id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Replays the stored response for a repeated request")),
    responses(
        (status = 202, description = "resumed; the job runs the current step", body = RbacMigration),
        (status = 200, description = "already running", body = RbacMigration),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown migration, or tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the migration has ended or is rolling back (`conflict`)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn resume_migration(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, Uuid)>,
) -> Result<HttpResponse, ApiError> {
    act(req, caller, state, path, Action::Resume).await
}

/// Roll back while the access policy still exists: the Entra consent the migration removed comes
/// back (bounded by the policy), then the RBAC restrictions it created go.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/rbac-migrations/{id}/rollback", tag = "rbac migrations",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("id" = Uuid, Path, description = "The migration's id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Replays the stored response for a repeated request")),
    responses(
        (status = 202, description = "rolling back", body = RbacMigration),
        (status = 200, description = "already rolling back", body = RbacMigration),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown migration, or tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the migration has ended (`conflict`), or has started removing the access policy (`rbac_migration_rollback_closed`)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn rollback_migration(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, Uuid)>,
) -> Result<HttpResponse, ApiError> {
    act(req, caller, state, path, Action::RollBack).await
}
