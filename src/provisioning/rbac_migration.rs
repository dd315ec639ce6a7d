//! Migrating one app from application access policies to RBAC for Applications
//! (docs/microsoft-365.md §3.7, §8.2), as a resumable job with its own status.
//!
//! [`start`] plans (a dry run stops there) and records the migration with its job in one
//! transaction; the `rbac_migration` job ([`MigrationJob`], run by `jobs::rbac_migration`) calls
//! [`advance`] once per run, which runs **one** step and records its result, so a crash re-runs
//! at most the step under way. No connection, transaction or lock is held while the step calls
//! Microsoft (`step_lease`): a short transaction under the migration's advisory lock marks the
//! step started under a fresh token (a rollback closes once `remove_access_policy` has started),
//! another records the result only while the migration still names that token. A pause, resume
//! or rollback meanwhile answers at once; the step's result is still recorded when it ends (what
//! it did in the tenant is a fact), and the migration then goes no further than that request
//! says. The steps, in the order that never widens the app's access
//! (`domain::rbac_migration`):
//!
//! 1. `create_rbac`: one RBAC restriction per RestrictAccess scope, **beside** the policy
//!    (`rbac::create`, keyed by app and scope: a re-run adopts what an earlier attempt made);
//! 2. `verify_rbac`: `Test-ServicePrincipalAuthorization` shows the samples in scope and the
//!    canaries out of it; then the RBAC permission cache's documented minimum
//!    (`propagation.rbac_first_delay_ms`) passes, so Graph knows the RBAC grant before the Entra
//!    grant goes (otherwise the app would lose its own mailboxes for a while; narrower, not
//!    wider, but an outage);
//! 3. `remove_entra_consent`: the Entra app-role grants the restriction covers are revoked (the
//!    policy still bounds the app meanwhile);
//! 4. `verify_entra_removed`: no covered Entra grant is left, an RBAC propagation check (origin
//!    `rbac_migration`) sees the scope through Exchange and, for apps mailscope created, Graph;
//!    and access tokens issued before the revocation have expired: they still carry the revoked
//!    roles (docs/microsoft-365.md §8.8), which only the access policy bounds;
//! 5. `remove_access_policy`: refused by the last-RestrictAccess guard if a covered Entra grant
//!    came back; otherwise the policy now bounds nothing and goes;
//! 6. `verify_policy_removed`: Exchange lists no policy for the app, RBAC still scopes it, and a
//!    new propagation check agrees.
//!
//! A step that fails for good pauses the migration with the error (`rbac_migration.attention_needed`
//! event); `resume` runs it again. A rollback is allowed until step 5 has started: the consent
//! comes back (bounded by the policy), then the restrictions the migration created go.
use chrono::Utc;
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::access_policies::{self, check_app_id, same_app};
use super::rbac::{self, GroupVia, RestrictionInput, ScopeInput, Verification};
use super::scope_groups::primary_address;
use super::{Actor, Error, Rejection, Services, audit, step_lease, tenants};
use crate::domain::field_error::FieldError;
use crate::domain::grant::StepError;
use crate::domain::rbac_migration::{
    self as rules, NotCarried, PolicyInput, RollbackStep, State, Step, StepState,
};
use crate::m365::exchange::{ExchangeClient, Replication};
use crate::queue::job::Payload;
use crate::queue::worker::Outcome;
use crate::store;
use crate::store::propagation_checks::CheckState;
use crate::store::rbac_migrations::MigrationRecord;
use crate::store::step_runs::Saga;

/// Advisory-lock namespace: one runner of a migration's steps (or state change) at a time.
const MIGRATION_LOCK: &str = "rbac_migration";
/// Members of a scope sampled when the caller names none.
const DEFAULT_SAMPLES: usize = 3;
/// How deep nested groups are followed to name the members RBAC would not see.
const NESTING_DEPTH: usize = 5;

/// What the caller asks for.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub app_id: String,
    pub dry_run: bool,
    /// Mailboxes that must stay in scope (default: up to three direct members per scope).
    pub sample_mailboxes: Vec<String>,
    /// Mailboxes that must stay out of reach, besides the tenant's canaries.
    pub canary_mailboxes: Vec<String>,
    pub callback_url: Option<String>,
}

/// How a policy's scope becomes an RBAC scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RbacScope {
    /// One of mailscope's scope groups: `-RecipientGroupScope`.
    ScopeGroup(String),
    /// A group or mailbox mailscope does not manage: a management scope with this filter
    /// (`MemberOfGroup -eq '<DN>'` as in Microsoft's recipe, or `PrimarySmtpAddress -eq`).
    RecipientFilter(String),
}

/// An access policy of the app, as planned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedPolicy {
    /// mailscope's policy id.
    pub id: Uuid,
    pub scope_address: String,
    pub scope_alias: Option<String>,
    pub access_right: String,
    /// `None` for DenyAccess (no equivalent).
    pub rbac_scope: Option<RbacScope>,
}

/// An Entra app-role grant the migration removes (and a rollback restores).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedGrant {
    pub permission: String,
    pub resource_id: String,
    pub app_role_id: String,
}

/// Everything decided when the migration starts; stored with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Planned {
    pub app_id: String,
    pub service_principal_object_id: String,
    pub policies: Vec<PlannedPolicy>,
    /// Permissions granted by RBAC (one role assignment each, per scope).
    pub permissions: Vec<String>,
    pub entra_grants: Vec<PlannedGrant>,
    pub sample_mailboxes: Vec<String>,
    pub canary_mailboxes: Vec<String>,
    /// RBAC restrictions of the app that existed before: a rollback leaves them.
    pub pre_existing_restrictions: Vec<Uuid>,
    /// How long access tokens issued before the consent's removal are waited out.
    pub token_drain_seconds: u64,
    pub rules: rules::Plan,
}

/// What [`start`] did.
pub enum Started {
    /// The plan only; nothing recorded.
    DryRun(Box<Planned>),
    Queued(Box<MigrationRecord>),
}

/// The `rbac_migration` job: one step of one migration per run, for one run of it (start,
/// resume or rollback); a job of an older run ends at its next look.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationJob {
    pub tenant_id: Uuid,
    pub migration_id: Uuid,
    pub run: i64,
}

impl Payload for MigrationJob {
    const KIND: &'static str = "rbac_migration";
    /// Each failed run of a step (not throttling, not a poll) counts.
    const MAX_FAILURES: i32 = 8;

    fn tenant(&self) -> Uuid {
        self.tenant_id
    }

    fn unique_key(&self) -> Option<String> {
        Some(format!("{}@{}", self.migration_id, self.run))
    }
}

pub fn migration_not_found(id: Uuid) -> Error {
    Error::not_found(format!("no RBAC migration {id} in this tenant"))
}

fn not_possible(detail: impl Into<String>, errors: Vec<FieldError>) -> Error {
    Error::Rejected {
        kind: Rejection::RbacMigrationNotPossible,
        detail: detail.into(),
        errors,
    }
}

fn internal(e: impl std::fmt::Display) -> Error {
    Error::internal(anyhow::anyhow!("{e}"))
}

pub fn planned_of(m: &MigrationRecord) -> Result<Planned, Error> {
    serde_json::from_value(m.plan.clone()).map_err(|e| internal(format!("migration plan: {e}")))
}

fn addresses(field: &str, list: &[String], errs: &mut Vec<FieldError>) -> Vec<String> {
    let mut out = Vec::new();
    for (i, m) in list.iter().enumerate() {
        if !crate::domain::address::is_address(m.trim()) {
            errs.push(FieldError::new(
                format!("{field}[{i}]"),
                "must be an SMTP address",
            ));
        }
        let m = m.trim().to_ascii_lowercase();
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out
}

/// Mailbox addresses reached only through groups nested in `group` (RBAC sees direct members
/// only, docs/microsoft-365.md §3.4), and the direct mailbox members.
async fn members(exo: &ExchangeClient, group: &str) -> Result<(Vec<String>, Vec<String>), Error> {
    let mut direct = Vec::new();
    let mut nested = Vec::new();
    let mut seen = vec![group.to_ascii_lowercase()];
    let mut frontier = vec![(group.to_string(), 0usize)];
    while let Some((g, depth)) = frontier.pop() {
        for m in exo
            .get_distribution_group_members(&g, Replication::Ignore)
            .await?
        {
            let kind = m.recipient_type_details.clone().unwrap_or_default();
            if kind.ends_with("Group") {
                let id = super::scope_groups::recipient_object_id(&m)
                    .or(m.identity.clone())
                    .unwrap_or_default();
                if depth < NESTING_DEPTH
                    && !id.is_empty()
                    && !seen.contains(&id.to_ascii_lowercase())
                {
                    seen.push(id.to_ascii_lowercase());
                    frontier.push((id, depth + 1));
                }
            } else if let Some(a) = primary_address(&m) {
                let a = a.to_ascii_lowercase();
                if depth == 0 {
                    direct.push(a);
                } else {
                    nested.push(a);
                }
            }
        }
    }
    nested.retain(|n| !direct.contains(n));
    nested.sort();
    nested.dedup();
    Ok((direct, nested))
}

/// Plan the migration of `request.app_id` (no writes).
pub async fn plan(
    services: &Services,
    tenant_id: Uuid,
    request: &Request,
) -> Result<Planned, Error> {
    let mut errs = Vec::new();
    let app_id = check_app_id(&request.app_id, &mut errs);
    let samples = addresses("sample_mailboxes", &request.sample_mailboxes, &mut errs);
    let mut canaries = addresses("canary_mailboxes", &request.canary_mailboxes, &mut errs);
    if let Some(u) = &request.callback_url
        && let Err(why) = crate::webhooks::validate_callback_url(u, &services.settings.webhooks)
    {
        errs.push(FieldError::new("callback_url", why));
    }
    if !errs.is_empty() {
        return Err(Error::Invalid(errs));
    }
    let (tenant, handle) = tenants::load(services, tenant_id).await?;
    let (graph, exo) = (handle.graph(), handle.exchange());
    let sp = graph
        .service_principal_by_app_id(&app_id)
        .await?
        .ok_or_else(|| {
            Error::invalid(
                "app_id",
                format!("app {app_id} has no service principal in this tenant"),
            )
        })?;
    let sp_id = sp.id.to_ascii_lowercase();
    let (records, pre_existing) = {
        let db = services.db().await?;
        // An access grant owns its app's policy and consent and would put them back at its next
        // change: the grant is what has to move, not the app under it.
        if let Ok(uuid) = app_id.parse::<Uuid>()
            && let Some(key) = store::applications::key_of_app(&db, tenant_id, uuid).await?
            && let Some(grant) = key.strip_prefix("grant-")
        {
            return Err(not_possible(
                format!(
                    "app {app_id} belongs to access grant `{grant}`, which manages its access policy and consent and would restore them at its next change; move the grant instead (a grant keeps its mechanism: offboard it and onboard it again with mechanism rbac where your version of mailscope offers it)"
                ),
                Vec::new(),
            ));
        }
        let records = store::access_policies::for_app(&db, tenant_id, &app_id).await?;
        let pre: Vec<Uuid> = store::rbac_restrictions::all(&db, tenant_id)
            .await?
            .into_iter()
            .filter(|r| r.app_id == app_id)
            .map(|r| r.id)
            .collect();
        (records, pre)
    };
    let live = exo
        .list_application_access_policies()
        .await?
        .into_iter()
        .filter(|p| same_app(p, &app_id))
        .count();
    if live > records.len() {
        return Err(not_possible(
            format!(
                "Exchange has {live} access policies for app {app_id} and mailscope knows {}; import them first with POST /sync, so the migration can remove them",
                records.len()
            ),
            Vec::new(),
        ));
    }
    if records.is_empty() {
        return Err(not_possible(
            format!(
                "app {app_id} has no application access policy, so there is nothing to migrate; restrict it with POST /rbac-restrictions"
            ),
            Vec::new(),
        ));
    }
    let mut inputs = Vec::new();
    let mut policies = Vec::new();
    let mut default_samples = Vec::new();
    for r in &records {
        let deny = r.access_right.eq_ignore_ascii_case("DenyAccess");
        let is_group = r.scope_type.contains("Group");
        let (direct, nested) = if is_group && !deny {
            members(&exo, &r.scope_object_id).await?
        } else {
            (vec![r.scope_address.to_ascii_lowercase()], Vec::new())
        };
        if !deny {
            default_samples.extend(direct.into_iter().take(DEFAULT_SAMPLES));
        }
        let rbac_scope = if deny {
            None
        } else if let Some(alias) = &r.scope_alias {
            Some(RbacScope::ScopeGroup(alias.clone()))
        } else if is_group {
            let dn = exo
                .get_recipient(&r.scope_object_id, Replication::Ignore)
                .await?
                .and_then(|g| g.distinguished_name)
                .ok_or_else(|| {
                    Error::not_found(format!(
                        "the policy's scope group {} is no longer in the tenant",
                        r.scope_address
                    ))
                })?;
            Some(RbacScope::RecipientFilter(format!(
                "MemberOfGroup -eq '{}'",
                dn.replace('\'', "''")
            )))
        } else {
            Some(RbacScope::RecipientFilter(format!(
                "PrimarySmtpAddress -eq '{}'",
                r.scope_address.replace('\'', "''")
            )))
        };
        inputs.push(PolicyInput {
            scope: r.scope_alias.clone().unwrap_or(r.scope_address.clone()),
            deny,
            nested_members: nested,
        });
        policies.push(PlannedPolicy {
            id: r.id,
            scope_address: r.scope_address.clone(),
            scope_alias: r.scope_alias.clone(),
            access_right: r.access_right.clone(),
            rbac_scope,
        });
    }
    let grants = rbac::entra_grants(&graph, &sp_id).await?;
    let names: Vec<String> = grants.iter().map(|(n, _)| n.clone()).collect();
    let mut plan = rules::plan(&inputs, &names);
    let drain = services
        .settings
        .provisioning
        .rbac_migration_token_drain_seconds;
    plan.expected_min_seconds += drain;
    plan.expected_max_seconds += drain;
    let entra_grants: Vec<PlannedGrant> = grants
        .iter()
        .filter(|(n, _)| plan.remove_entra_grants.iter().any(|p| p == n))
        .map(|(n, a)| PlannedGrant {
            permission: n.clone(),
            resource_id: a.resource_id.clone(),
            app_role_id: a.app_role_id.clone(),
        })
        .collect();
    canaries.extend(
        tenant
            .canary_mailboxes
            .iter()
            .map(|c| c.to_ascii_lowercase()),
    );
    canaries.sort();
    canaries.dedup();
    let mut samples = if samples.is_empty() {
        default_samples
    } else {
        samples
    };
    samples.sort();
    samples.dedup();
    Ok(Planned {
        app_id,
        service_principal_object_id: sp_id,
        policies,
        permissions: plan
            .create_assignments
            .iter()
            .map(|(p, _)| p.clone())
            .collect(),
        entra_grants,
        sample_mailboxes: samples,
        canary_mailboxes: canaries,
        pre_existing_restrictions: pre_existing,
        token_drain_seconds: drain,
        rules: plan,
    })
}

/// Plan and, unless it is a dry run, record the migration and queue its job. Refused (422) when
/// the plan cannot be executed, (409) when the app already has an unfinished migration.
pub async fn start(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    request: Request,
) -> Result<Started, Error> {
    let planned = plan(services, tenant_id, &request).await?;
    if request.dry_run {
        return Ok(Started::DryRun(Box::new(planned)));
    }
    if !planned.rules.executable {
        let errors: Vec<FieldError> = planned
            .rules
            .not_carried
            .iter()
            .filter(|n| n.blocks_execution)
            .map(|n: &NotCarried| FieldError::new(n.kind.clone(), n.detail.clone()))
            .collect();
        let detail = if planned.policies.iter().all(|p| p.rbac_scope.is_none()) {
            format!(
                "app {} is only constrained by DenyAccess policies, which RBAC for Applications cannot express (it only grants, docs/microsoft-365.md §3.8)",
                planned.app_id
            )
        } else if errors.is_empty() {
            format!(
                "app {} holds no Entra mailbox permission an RBAC role grants: nothing to carry over",
                planned.app_id
            )
        } else {
            "the app's restriction cannot be carried over to RBAC as it is; `errors` lists why (POST with dry_run: true shows the whole plan)".to_string()
        };
        return Err(not_possible(detail, errors));
    }
    let mut errs = Vec::new();
    if planned.sample_mailboxes.is_empty() {
        errs.push(FieldError::new(
            "sample_mailboxes",
            "name at least one mailbox inside the app's scope to verify each step with",
        ));
    }
    if planned.canary_mailboxes.is_empty() {
        errs.push(FieldError::new(
            "canary_mailboxes",
            "name at least one mailbox outside the app's scope (or set the tenant's canary_mailboxes): without one, nothing shows the migration never widened the app's access",
        ));
    }
    if !errs.is_empty() {
        return Err(Error::Rejected {
            kind: Rejection::VerificationMailboxesRequired,
            detail: "verifying the migration needs mailboxes inside and outside the app's scope"
                .into(),
            errors: errs,
        });
    }
    let plan_json = serde_json::to_value(&planned).map_err(internal)?;
    let mut m = MigrationRecord {
        id: Uuid::new_v4(),
        tenant_id,
        app_id: planned.app_id.clone(),
        state: State::Running,
        current_step: Step::CreateRbac,
        plan: plan_json,
        steps: rules::initial_log(),
        run: 1,
        paused_reason: None,
        callback_url: request.callback_url.map(|u| u.trim().to_string()),
        check_ids: Vec::new(),
        job_id: None,
        created_at: Utc::now(),
        updated_at: Utc::now(),
        finished_at: None,
        step_run: None,
    };
    let _turn = services
        .key_locks
        .lock(format!("{MIGRATION_LOCK}:{tenant_id}:{}", m.app_id))
        .await;
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    store::lock_key(&tx, MIGRATION_LOCK, &format!("{tenant_id}:{}", m.app_id)).await?;
    if let Some(active) = store::rbac_migrations::active_for_app(&tx, tenant_id, &m.app_id).await? {
        return Err(active_conflict(&active));
    }
    if !store::rbac_migrations::insert(&tx, &m).await? {
        return Err(Error::rejected(
            Rejection::RbacMigrationActive,
            format!("app {} already has a migration under way", m.app_id),
        ));
    }
    m.job_id = Some(enqueue(&tx, &m).await?);
    store::rbac_migrations::save(&tx, &m).await?;
    audit::record(
        &tx,
        actor,
        tenant_id,
        "rbac_migration.started",
        &format!("rbac_migration/{}", m.id),
        json!({"app_id": m.app_id, "scopes": planned.rules.scopes,
            "permissions": planned.permissions,
            "policies": planned.policies.iter().map(|p| p.id).collect::<Vec<_>>()}),
    )
    .await?;
    tx.commit().await?;
    Ok(Started::Queued(Box::new(m)))
}

fn active_conflict(active: &MigrationRecord) -> Error {
    Error::rejected(
        Rejection::RbacMigrationActive,
        format!(
            "app {} already has migration {} ({}); pause, resume or roll back that one (GET /rbac-migrations/{})",
            active.app_id,
            active.id,
            active.state.as_str(),
            active.id
        ),
    )
}

async fn enqueue(c: &impl GenericClient, m: &MigrationRecord) -> Result<Uuid, Error> {
    let job = MigrationJob {
        tenant_id: m.tenant_id,
        migration_id: m.id,
        run: m.run,
    };
    Ok(crate::queue::job::enqueue_job(c, &job).await?.id())
}

pub async fn get(services: &Services, tenant_id: Uuid, id: Uuid) -> Result<MigrationRecord, Error> {
    let db = services.db().await?;
    if store::tenants::get(&db, tenant_id).await?.is_none() {
        return Err(tenants::tenant_not_found(tenant_id));
    }
    store::rbac_migrations::get(&db, tenant_id, id)
        .await?
        .ok_or_else(|| migration_not_found(id))
}

pub async fn list(
    services: &Services,
    tenant_id: Uuid,
    app_id: Option<&str>,
    state: Option<State>,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<MigrationRecord>, Error> {
    let db = services.db().await?;
    if store::tenants::get(&db, tenant_id).await?.is_none() {
        return Err(tenants::tenant_not_found(tenant_id));
    }
    Ok(store::rbac_migrations::list(&db, tenant_id, app_id, state, after, limit).await?)
}

/// What a state change asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    RollBack,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Pause => "paused",
            Action::Resume => "resumed",
            Action::RollBack => "rollback_requested",
        }
    }
}

/// Pause, resume or roll back. Does not wait for a step under way (its runner holds no lock while
/// it calls Microsoft): the step's result is recorded when it ends, and the migration then goes
/// no further than the request says (a pause stops before the next step; a resumed or rolled
/// back run's job starts once that step is recorded). A rollback is refused as soon as the
/// policy's removal has started. Returns the migration and whether it changed.
pub async fn act(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    id: Uuid,
    action: Action,
) -> Result<(MigrationRecord, bool), Error> {
    let _turn = migration_turn(services, id).await;
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    let Some(found) = store::rbac_migrations::get(&tx, tenant_id, id).await? else {
        return Err(migration_not_found(id));
    };
    store::lock_key(&tx, MIGRATION_LOCK, &id.to_string()).await?;
    let mut m = store::rbac_migrations::get(&tx, tenant_id, id)
        .await?
        .unwrap_or(found);
    let ended = |m: &MigrationRecord| {
        Error::conflict(format!(
            "RBAC migration {} has ended ({}); start a new one if needed",
            m.id,
            m.state.as_str()
        ))
    };
    match (action, m.state) {
        (_, s) if s.is_final() => return Err(ended(&m)),
        (Action::Pause, State::Paused)
        | (Action::Resume, State::Running)
        | (Action::RollBack, State::RollingBack) => {
            tx.commit().await?;
            return Ok((m, false));
        }
        (Action::Pause | Action::Resume, State::RollingBack) => {
            return Err(Error::conflict(format!(
                "RBAC migration {id} is rolling back; that cannot be paused or resumed, only awaited"
            )));
        }
        (Action::Pause, _) => {
            m.state = State::Paused;
            m.paused_reason = Some("requested".into());
        }
        (Action::Resume, _) => {
            m.state = State::Running;
            m.paused_reason = None;
            m.run += 1;
            m.job_id = Some(enqueue(&tx, &m).await?);
        }
        (Action::RollBack, _) => {
            if !rules::rollback_allowed(&m.steps) {
                return Err(Error::rejected(
                    Rejection::RbacMigrationRollbackClosed,
                    format!(
                        "RBAC migration {id} has started removing the app's access policy, so only RBAC bounds the app now; restoring its Entra consent would reach every mailbox. Resume the migration instead"
                    ),
                ));
            }
            m.state = State::RollingBack;
            m.paused_reason = None;
            m.run += 1;
            m.job_id = Some(enqueue(&tx, &m).await?);
        }
    }
    store::rbac_migrations::save(&tx, &m).await?;
    audit::record(
        &tx,
        actor,
        tenant_id,
        &format!("rbac_migration.{}", action.as_str()),
        &format!("rbac_migration/{id}"),
        json!({"app_id": m.app_id, "current_step": m.current_step.as_str(), "run": m.run}),
    )
    .await?;
    tx.commit().await?;
    Ok((m, true))
}

/// A failure as a step records it.
fn explain(e: &Error) -> StepError {
    let mut s = super::grants::explain(e);
    if s.fix.contains("PUT the grant") {
        s.fix = "correct the cause, then POST …/rbac-migrations/{id}/resume (or /rollback while the access policy exists)".into();
    }
    s
}

fn step_error(code: &str, cause: String, fix: &str) -> StepError {
    StepError {
        code: code.into(),
        cause,
        fix: fix.into(),
    }
}

/// What one run of a step did.
enum Ran {
    Done(serde_json::Value),
    /// Done, with a change in the tenant to audit in the transaction that records the step.
    Audited {
        output: serde_json::Value,
        action: &'static str,
        details: serde_json::Value,
    },
    Wait {
        output: Option<serde_json::Value>,
        at: chrono::DateTime<Utc>,
    },
    /// The verification in the tenant passed; the step's propagation check starts in the
    /// transaction that records the step (then it waits for it).
    StartCheck,
    Failed(StepError),
}

/// Run one step of the migration's job; the outcome tells the queue when to look again.
pub async fn advance(
    services: &Services,
    job: &crate::queue::JobRecord,
    p: &MigrationJob,
) -> Outcome {
    match advance_inner(services, job, p).await {
        Ok(o) => o,
        Err(e) => e.job_outcome(),
    }
}

async fn advance_inner(
    services: &Services,
    job: &crate::queue::JobRecord,
    p: &MigrationJob,
) -> Result<Outcome, Error> {
    let lock = p.migration_id.to_string();
    let actor = Actor::Job {
        kind: MigrationJob::KIND,
        id: job.id,
    };
    // 1. Decide the step, mark it started and name this run its runner, in a short transaction.
    let (m, planned, name, forward, polling, token) = {
        let _turn = migration_turn(services, p.migration_id).await;
        let mut db = services.db().await?;
        let tx = db.transaction().await?;
        store::lock_key(&tx, MIGRATION_LOCK, &lock).await?;
        let Some(mut m) = store::rbac_migrations::get(&tx, p.tenant_id, p.migration_id).await?
        else {
            return Ok(Outcome::Succeeded(
                json!({"ended": "the migration no longer exists"}),
            ));
        };
        if m.run != p.run {
            return Ok(Outcome::Succeeded(
                json!({"ended": "superseded by a newer run", "run": m.run}),
            ));
        }
        // A step of an older run may still be calling Microsoft: one step at a time.
        if let Some(at) = step_lease::held_elsewhere(&tx, m.step_run.as_ref(), job).await? {
            return Ok(Outcome::Reschedule { at, payload: None });
        }
        let planned = planned_of(&m)?;
        let (name, forward) = match m.state {
            State::Running if m.current_step == Step::Done => {
                clear_runner(&tx, &m).await?;
                settle(services, &tx, &mut m, State::Succeeded, None).await?;
                tx.commit().await?;
                return Ok(Outcome::Succeeded(json!({"state": "succeeded"})));
            }
            State::Running => (m.current_step.as_str(), true),
            State::RollingBack => match next_rollback(&m) {
                Some(s) => (s.as_str(), false),
                None => {
                    clear_runner(&tx, &m).await?;
                    settle(services, &tx, &mut m, State::RolledBack, None).await?;
                    tx.commit().await?;
                    return Ok(Outcome::Succeeded(json!({"state": "rolled_back"})));
                }
            },
            s => {
                return Ok(Outcome::Succeeded(json!({"ended": s.as_str()})));
            }
        };
        // A poll of a check this step started is not a new attempt.
        let polling = rules::entry(&m.steps, name)
            .is_some_and(|e| e.state == StepState::Running && e.output.get("check_id").is_some());
        // Known before Microsoft is asked: the step has started (a rollback closes once the
        // policy's removal has, whether or not this run ever returns).
        rules::mark_started(&mut m.steps, name, Utc::now());
        store::rbac_migrations::save(&tx, &m).await?;
        let run = step_lease::start(job, name);
        store::step_runs::set(&tx, Saga::RbacMigration, m.id, Some(&run)).await?;
        tx.commit().await?;
        (m, planned, name.to_string(), forward, polling, run.token)
    };

    // 2. The step, with no connection held here.
    let ran = if forward {
        run_forward(services, &actor, &m, &planned).await
    } else {
        match next_rollback(&m) {
            Some(s) => run_rollback(services, &actor, &m, &planned, s).await,
            None => Ok(Ran::Done(json!({}))),
        }
    };

    // 3. Record the result, if this run is still the step's runner.
    let _turn = migration_turn(services, p.migration_id).await;
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    store::lock_key(&tx, MIGRATION_LOCK, &lock).await?;
    let Some(mut m) = store::rbac_migrations::get(&tx, p.tenant_id, p.migration_id).await? else {
        return Ok(Outcome::Succeeded(
            json!({"ended": "the migration no longer exists"}),
        ));
    };
    if !step_lease::still_ours(m.step_run.as_ref(), token) {
        // Taken over after this run's lease lapsed: the newer run's result stands.
        tracing::warn!(migration = %m.id, step = %name, "step taken over by another run; its result is discarded");
        return Ok(Outcome::Succeeded(
            json!({"ended": "another run took the step over; this run's result was discarded"}),
        ));
    }
    clear_runner(&tx, &m).await?;
    let ran = match ran {
        Ok(r) => Ok(complete(services, &tx, &actor, &m, &planned, r).await?),
        Err(e) => Err(e),
    };
    let ours = m.run == p.run
        && m.state
            == if forward {
                State::Running
            } else {
                State::RollingBack
            };
    if ours {
        let outcome =
            record_result(services, &tx, job, &mut m, &name, forward, polling, ran).await?;
        tx.commit().await?;
        return Ok(outcome);
    }
    // Paused, resumed or rolled back while the step ran: what it did in the tenant is recorded,
    // the state stays as that request left it, and a newer run's job (waiting for this step)
    // goes on from here.
    record_late(services, &tx, job, &mut m, p, &name, forward, polling, ran).await?;
    tx.commit().await?;
    if let Some(next) = m.job_id.filter(|j| *j != job.id) {
        step_lease::wake(&db, next).await;
    }
    Ok(Outcome::Succeeded(
        json!({"ended": m.state.as_str(), "step": name}),
    ))
}

/// The migration's turn in this process (see `locks`), taken before a pooled connection by every
/// writer that takes the migration's advisory lock, so callers and runners waiting for it hold
/// no connection.
async fn migration_turn(services: &Services, id: Uuid) -> tokio::sync::OwnedMutexGuard<()> {
    services
        .key_locks
        .lock(format!("{MIGRATION_LOCK}:{id}"))
        .await
}

/// Forget the runner the migration names, if any (this run's, or a dead one's it takes over).
async fn clear_runner(tx: &impl GenericClient, m: &MigrationRecord) -> Result<(), Error> {
    if m.step_run.is_some() {
        store::step_runs::set(tx, Saga::RbacMigration, m.id, None).await?;
    }
    Ok(())
}

/// The part of a step that writes mailscope's own records, done in the transaction that records
/// the step: start the propagation check a verification asked for, audit a change made in the
/// tenant.
async fn complete(
    services: &Services,
    tx: &impl GenericClient,
    actor: &Actor,
    m: &MigrationRecord,
    planned: &Planned,
    ran: Ran,
) -> Result<Ran, Error> {
    match ran {
        Ran::StartCheck => {
            let check = super::checks::after_rbac_change(
                tx,
                services,
                m.tenant_id,
                &planned.app_id,
                &planned.sample_mailboxes,
                &planned.canary_mailboxes,
                "rbac_migration",
            )
            .await?
            .ok_or_else(|| internal("no expectation for the propagation check"))?;
            Ok(Ran::Wait {
                output: Some(json!({"check_id": check.id})),
                at: Utc::now() + chrono::Duration::milliseconds(500),
            })
        }
        Ran::Audited {
            output,
            action,
            details,
        } => {
            audit::record(
                tx,
                actor,
                m.tenant_id,
                action,
                &format!("rbac_migration/{}", m.id),
                details,
            )
            .await?;
            Ok(Ran::Done(output))
        }
        other => Ok(other),
    }
}

fn remember_check(m: &mut MigrationRecord, output: Option<&serde_json::Value>) {
    if let Some(c) = output.and_then(|o| o.get("check_id")?.as_str()?.parse::<Uuid>().ok())
        && !m.check_ids.contains(&c)
    {
        m.check_ids.push(c);
    }
}

/// Record one run of step `name` for the run and state it started in, and move the migration on
/// (next step, pause on an error, final state) in the transaction that holds its lock.
#[allow(clippy::too_many_arguments)]
async fn record_result(
    services: &Services,
    tx: &impl GenericClient,
    job: &crate::queue::JobRecord,
    m: &mut MigrationRecord,
    name: &str,
    forward: bool,
    polling: bool,
    ran: Result<Ran, Error>,
) -> Result<Outcome, Error> {
    let stopped = if forward {
        State::Paused
    } else {
        State::Failed
    };
    let outcome = match log_run(job, m, name, forward, polling, ran)? {
        Logged::Done => Outcome::Reschedule {
            at: Utc::now(),
            payload: None,
        },
        Logged::Wait(at) => Outcome::Reschedule { at, payload: None },
        Logged::Again(outcome) => outcome,
        Logged::Failed(error) => {
            settle(services, tx, m, stopped, Some("error")).await?;
            let mut result = json!({"state": stopped.as_str(), "step": name});
            if let Some(error) = error {
                result["error"] = json!(error);
            }
            return Ok(Outcome::Succeeded(result));
        }
    };
    store::rbac_migrations::save(tx, m).await?;
    Ok(outcome)
}

/// What one run of a step came to, once written to the migration's step log.
enum Logged {
    Done,
    /// Under way: look again at this time.
    Wait(chrono::DateTime<Utc>),
    /// Failed for good: a verification that did not pass (`None`), or an error past its retries.
    Failed(Option<String>),
    /// A failure the queue retries or reschedules.
    Again(Outcome),
}

/// Write one run of step `name` to the step log (and, for a forward step that finished, move
/// `current_step` on); the caller decides what it means for the migration's state.
fn log_run(
    job: &crate::queue::JobRecord,
    m: &mut MigrationRecord,
    name: &str,
    forward: bool,
    polling: bool,
    ran: Result<Ran, Error>,
) -> Result<Logged, Error> {
    let now = Utc::now();
    Ok(match ran {
        Ok(Ran::Done(output)) => {
            remember_check(m, Some(&output));
            rules::record(
                &mut m.steps,
                name,
                StepState::Done,
                Some(output),
                None,
                !polling,
                now,
            );
            if forward {
                m.current_step = m.current_step.next();
            }
            Logged::Done
        }
        Ok(Ran::Wait { output, at }) => {
            remember_check(m, output.as_ref());
            rules::record(
                &mut m.steps,
                name,
                StepState::Running,
                output,
                None,
                !polling,
                now,
            );
            Logged::Wait(at)
        }
        Ok(Ran::Failed(why)) => {
            rules::record(
                &mut m.steps,
                name,
                StepState::Failed,
                None,
                Some(why),
                !polling,
                now,
            );
            Logged::Failed(None)
        }
        Ok(Ran::StartCheck | Ran::Audited { .. }) => {
            return Err(internal("a step's record was not completed"));
        }
        Err(e) => {
            let outcome = e.job_outcome();
            let gives_up = match &outcome {
                Outcome::Retry(_) => job.failures + 1 >= job.max_failures,
                Outcome::Fail(_) => true,
                _ => false,
            };
            if !matches!(e, Error::Microsoft(_)) {
                tracing::warn!(migration = %m.id, step = %name, error = %e, "RBAC migration step failed");
            }
            rules::record(
                &mut m.steps,
                name,
                if gives_up {
                    StepState::Failed
                } else {
                    StepState::Running
                },
                None,
                Some(explain(&e)),
                !matches!(outcome, Outcome::Reschedule { .. }),
                now,
            );
            if gives_up {
                Logged::Failed(Some(e.to_string()))
            } else {
                Logged::Again(outcome)
            }
        }
    })
}

/// Record one run of step `name` that ended after a pause, resume or rollback was accepted: the
/// step's log and, for a forward step that finished, the next step (what the tenant now holds),
/// but not the state. A forward step that failed for good while paused pauses it for that error
/// (`rbac_migration.attention_needed`), as it would have had the step ended first.
#[allow(clippy::too_many_arguments)]
async fn record_late(
    services: &Services,
    tx: &impl GenericClient,
    job: &crate::queue::JobRecord,
    m: &mut MigrationRecord,
    p: &MigrationJob,
    name: &str,
    forward: bool,
    polling: bool,
    ran: Result<Ran, Error>,
) -> Result<(), Error> {
    let failed = matches!(
        log_run(job, m, name, forward, polling, ran)?,
        Logged::Failed(_)
    );
    if failed && forward && m.state == State::Paused && m.run == p.run {
        settle(services, tx, m, State::Paused, Some("error")).await?;
    } else {
        store::rbac_migrations::save(tx, m).await?;
    }
    Ok(())
}

/// The next rollback step not done yet.
fn next_rollback(m: &MigrationRecord) -> Option<RollbackStep> {
    RollbackStep::ORDER
        .into_iter()
        .find(|s| rules::entry(&m.steps, s.as_str()).is_none_or(|e| e.state != StepState::Done))
}

/// Record a final state (or a pause on an error) and, on a change, queue the signed event in the
/// same transaction: `rbac_migration.succeeded`, `.rolled_back`, `.failed`, or
/// `.attention_needed` for a pause on an error.
async fn settle(
    services: &Services,
    tx: &impl GenericClient,
    m: &mut MigrationRecord,
    state: State,
    reason: Option<&str>,
) -> Result<(), Error> {
    let changed = m.state != state;
    m.state = state;
    m.paused_reason = (state == State::Paused).then(|| reason.unwrap_or("requested").to_string());
    store::rbac_migrations::save(tx, m).await?;
    let event = match state {
        State::Succeeded => "rbac_migration.succeeded",
        State::RolledBack => "rbac_migration.rolled_back",
        State::Failed => "rbac_migration.failed",
        State::Paused if reason == Some("error") => "rbac_migration.attention_needed",
        _ => return Ok(()),
    };
    let Some(raw) = m
        .callback_url
        .clone()
        .filter(|_| changed || state == State::Paused)
    else {
        return Ok(());
    };
    let url = match crate::webhooks::validate_callback_url(&raw, &services.settings.webhooks) {
        Ok(u) => u,
        Err(why) => {
            tracing::warn!(migration = %m.id, %why, "callback URL refused; no event sent");
            return Ok(());
        }
    };
    let failed = m.steps.iter().find(|e| e.state == StepState::Failed);
    crate::webhooks::enqueue_delivery(
        tx,
        m.tenant_id,
        m.id,
        event,
        &url,
        json!({
            "migration_id": m.id,
            "tenant_id": m.tenant_id,
            "app_id": m.app_id,
            "state": state.as_str(),
            "current_step": m.current_step.as_str(),
            "failed_step": failed.map(|e| e.name.clone()),
            "error": failed.and_then(|e| e.last_error.clone()),
        }),
    )
    .await?;
    Ok(())
}

fn restriction_input(planned: &Planned, scope: &RbacScope) -> RestrictionInput {
    RestrictionInput {
        app_id: planned.app_id.clone(),
        service_principal_object_id: Some(planned.service_principal_object_id.clone()),
        scope: match scope {
            RbacScope::ScopeGroup(alias) => ScopeInput::ScopeGroup {
                alias: alias.clone(),
                via: GroupVia::RecipientGroupScope,
            },
            RbacScope::RecipientFilter(f) => ScopeInput::RecipientFilter(f.clone()),
        },
        permissions: Some(planned.permissions.clone()),
        rbac_only_permissions: Vec::new(),
        remove_entra_grants: false,
        verification: Verification::default(),
        access_right: None,
    }
}

/// The restrictions `create_rbac` made or adopted.
fn restrictions_of(m: &MigrationRecord) -> Vec<Uuid> {
    rules::entry(&m.steps, Step::CreateRbac.as_str())
        .and_then(|e| e.output.get("restrictions")?.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_str()?.parse().ok())
        .collect()
}

fn finished_at(m: &MigrationRecord, step: Step) -> Option<chrono::DateTime<Utc>> {
    rules::entry(&m.steps, step.as_str()).and_then(|e| e.finished_at)
}

/// `Test-ServicePrincipalAuthorization` (live, no cache): every sample in scope for every
/// permission, every canary out of scope. The disagreements, one per mailbox and permission.
async fn verify_scope(exo: &ExchangeClient, planned: &Planned) -> Result<Vec<String>, Error> {
    let sp = &planned.service_principal_object_id;
    let mut failures = Vec::new();
    for s in &planned.sample_mailboxes {
        let rows = exo
            .test_service_principal_authorization(sp, Some(s))
            .await?;
        for p in &planned.permissions {
            if !rbac::rows_granting(&rows, std::slice::from_ref(p))
                .any(|r| r.in_scope() == Some(true))
            {
                failures.push(format!("{s} is not in the RBAC scope for {p} (it must stay reachable; RBAC sees direct members only)"));
            }
        }
    }
    for c in &planned.canary_mailboxes {
        let rows = exo
            .test_service_principal_authorization(sp, Some(c))
            .await?;
        for r in
            rbac::rows_granting(&rows, &planned.permissions).filter(|r| r.in_scope() != Some(false))
        {
            failures.push(format!(
                "canary {c} is in scope of {} ({}): the RBAC scope is wider than the policy's",
                r.role_name.clone().unwrap_or_default(),
                r.allowed_resource_scope.clone().unwrap_or_default()
            ));
        }
    }
    Ok(failures)
}

/// Start the app's RBAC propagation check (once per step; started by [`complete`] in the
/// transaction that records the step), then wait for it. `None` once it succeeded.
async fn check_step(
    services: &Services,
    m: &MigrationRecord,
    step: Step,
) -> Result<Option<Ran>, Error> {
    // A check whose failure paused the migration is not looked at again: a resume starts anew.
    let started = rules::entry(&m.steps, step.as_str())
        .filter(|e| e.state != StepState::Failed)
        .and_then(|e| e.output.get("check_id")?.as_str()?.parse::<Uuid>().ok());
    let Some(check_id) = started else {
        return Ok(Some(Ran::StartCheck));
    };
    // Two short reads; no Microsoft call while the connection is held.
    let db = services.db().await?;
    let check = store::propagation_checks::get_by_id(&db, check_id)
        .await?
        .ok_or_else(|| internal(format!("propagation check {check_id} vanished")))?;
    match check.state {
        CheckState::Succeeded => Ok(None),
        s if s.is_final() => Ok(Some(Ran::Failed(step_error(
            &format!("propagation_check_{}", s.as_str()),
            format!(
                "propagation check {} ended {}: {}",
                check.id,
                s.as_str(),
                check.reason.as_deref().unwrap_or("no reason recorded")
            ),
            "see the propagation check for each mailbox's verdict; correct the tenant, then resume (or roll back while the access policy exists)",
        )))),
        _ => {
            let job_at = match check.job_id {
                Some(j) => crate::queue::get(&db, j).await?.map(|j| j.run_at),
                None => None,
            };
            let soon = Utc::now() + chrono::Duration::seconds(1);
            Ok(Some(Ran::Wait {
                output: None,
                at: job_at.map_or(soon, |a| a.max(soon)),
            }))
        }
    }
}

/// One forward step. The use cases it calls take their own connections, briefly; the writes to
/// mailscope's records it asks for are done by [`complete`].
async fn run_forward(
    services: &Services,
    actor: &Actor,
    m: &MigrationRecord,
    planned: &Planned,
) -> Result<Ran, Error> {
    let (_, handle) = tenants::load(services, m.tenant_id).await?;
    let (graph, exo) = (handle.graph(), handle.exchange());
    let t = m.tenant_id;
    let sp = &planned.service_principal_object_id;
    match m.current_step {
        Step::CreateRbac => {
            let mut ids = Vec::new();
            let mut changes = Vec::new();
            for p in &planned.policies {
                let Some(scope) = &p.rbac_scope else { continue };
                let made =
                    rbac::create(services, actor, t, restriction_input(planned, scope)).await?;
                ids.push(made.value.0.record.id);
                changes.push(format!("{:?}", made.change).to_ascii_lowercase());
            }
            Ok(Ran::Done(json!({"restrictions": ids, "changes": changes})))
        }
        Step::VerifyRbac => {
            let mut incomplete = Vec::new();
            for id in restrictions_of(m) {
                let r = rbac::get(services, t, id).await?;
                incomplete.extend(
                    r.findings
                        .into_iter()
                        .filter(|f| f.kind != "union_trap")
                        .map(|f| f.detail),
                );
            }
            if !incomplete.is_empty() {
                return Ok(Ran::Failed(step_error(
                    "rbac_incomplete",
                    incomplete.join("; "),
                    "resume: the create_rbac step is idempotent; or roll back",
                )));
            }
            let failures = verify_scope(&exo, planned).await?;
            if !failures.is_empty() {
                return Ok(Ran::Failed(step_error(
                    "rbac_verification_failed",
                    failures.join("; "),
                    "correct the scope (e.g. add nested members to the group directly), then resume; or roll back",
                )));
            }
            // Graph cannot tell the RBAC grant from the Entra one while both cover the same
            // scope; the cache's documented minimum makes it known before the Entra grant goes.
            let created = finished_at(m, Step::CreateRbac).unwrap_or_else(Utc::now);
            let ready = created
                + chrono::Duration::milliseconds(
                    i64::try_from(services.settings.propagation.rbac_first_delay_ms)
                        .unwrap_or(i64::MAX / 4),
                );
            let out = json!({"in_scope_checked": planned.sample_mailboxes,
                "out_of_scope_checked": planned.canary_mailboxes,
                "graph": "RBAC's permission cache loads the new grant within 30 minutes to 2 hours; the Entra consent goes only after the documented minimum"});
            if Utc::now() < ready {
                return Ok(Ran::Wait {
                    output: Some(out),
                    at: ready,
                });
            }
            Ok(Ran::Done(out))
        }
        Step::RemoveEntraConsent => {
            let current = match graph.app_role_assignments(sp).await {
                Ok(a) => a,
                Err(e) if e.is_not_found() => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            let mut removed = Vec::new();
            for g in &planned.entra_grants {
                for a in current.iter().filter(|a| {
                    a.resource_id.eq_ignore_ascii_case(&g.resource_id)
                        && a.app_role_id.eq_ignore_ascii_case(&g.app_role_id)
                }) {
                    graph.revoke_app_role(&a.resource_id, &a.id).await?;
                    removed.push(g.permission.clone());
                }
            }
            Ok(Ran::Audited {
                output: json!({"removed": removed, "removed_at": Utc::now()}),
                action: "rbac_migration.entra_consent_removed",
                details: json!({"app_id": planned.app_id, "removed": removed}),
            })
        }
        Step::VerifyEntraRemoved => {
            let held: Vec<String> = rbac::entra_grants(&graph, sp)
                .await?
                .into_iter()
                .map(|(n, _)| n)
                .filter(|n| planned.permissions.iter().any(|p| p == n))
                .collect();
            if !held.is_empty() {
                return Ok(Ran::Failed(step_error(
                    "entra_grant_present",
                    format!(
                        "the app holds the Entra grants {} again (someone consented meanwhile); with them it reaches every mailbox once the policy goes",
                        held.join(", ")
                    ),
                    "remove the Entra grant again (or roll back), then resume",
                )));
            }
            if let Some(ran) = check_step(services, m, Step::VerifyEntraRemoved).await? {
                return Ok(ran);
            }
            // Tokens issued before the revocation still carry the revoked roles; only the
            // access policy bounds them until they expire (docs/microsoft-365.md §8.8).
            let removed = finished_at(m, Step::RemoveEntraConsent).unwrap_or_else(Utc::now);
            let drained = removed
                + chrono::Duration::seconds(
                    i64::try_from(planned.token_drain_seconds).unwrap_or(i64::MAX / 4),
                );
            if Utc::now() < drained {
                return Ok(Ran::Wait {
                    output: Some(
                        json!({"waiting_for": "access tokens issued before the consent was removed to expire", "until": drained}),
                    ),
                    at: drained,
                });
            }
            Ok(Ran::Done(
                json!({"tokens_expired_at": drained, "entra_mailbox_grants": []}),
            ))
        }
        Step::RemoveAccessPolicy => {
            let mut removed = Vec::new();
            for p in &planned.policies {
                // The last-RestrictAccess guard (allow_unrestricted = false) refuses if a covered
                // Entra grant came back: then removing the policy would open every mailbox.
                match access_policies::delete_quietly(services, actor, t, p.id).await {
                    Ok(()) => removed.push(p.id),
                    Err(Error::NotFound(_)) => {}
                    Err(Error::Rejected {
                        kind: Rejection::LastRestrictPolicy,
                        detail,
                        ..
                    }) => {
                        return Ok(Ran::Failed(step_error(
                            "last_restrict_policy",
                            detail,
                            "remove the app's Entra mail grants again, then resume",
                        )));
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(Ran::Done(json!({"removed_policies": removed})))
        }
        Step::VerifyPolicyRemoved => {
            let left: Vec<String> = exo
                .list_application_access_policies()
                .await?
                .into_iter()
                .filter(|p| same_app(p, &planned.app_id))
                .filter_map(|p| p.identity)
                .collect();
            if !left.is_empty() {
                return Ok(Ran::Failed(step_error(
                    "access_policy_present",
                    format!(
                        "Exchange still lists access policies for the app: {}",
                        left.join(", ")
                    ),
                    "resume: the remove_access_policy step is idempotent",
                )));
            }
            let failures = verify_scope(&exo, planned).await?;
            if !failures.is_empty() {
                return Ok(Ran::Failed(step_error(
                    "rbac_verification_failed",
                    failures.join("; "),
                    "correct the RBAC restriction (PUT /rbac-restrictions/{id}), then resume",
                )));
            }
            if let Some(ran) = check_step(services, m, Step::VerifyPolicyRemoved).await? {
                return Ok(ran);
            }
            Ok(Ran::Done(json!({"access_policies_in_tenant": 0})))
        }
        Step::Done => Ok(Ran::Done(json!({}))),
    }
}

async fn run_rollback(
    services: &Services,
    actor: &Actor,
    m: &MigrationRecord,
    planned: &Planned,
    step: RollbackStep,
) -> Result<Ran, Error> {
    let (_, handle) = tenants::load(services, m.tenant_id).await?;
    let graph = handle.graph();
    let sp = &planned.service_principal_object_id;
    match step {
        RollbackStep::RestoreEntraConsent => {
            // The access policy still exists (checked when the rollback was accepted), so the
            // consent that comes back is bounded by it.
            let current = match graph.app_role_assignments(sp).await {
                Ok(a) => a,
                Err(e) if e.is_not_found() => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            let mut restored = Vec::new();
            for g in &planned.entra_grants {
                let held = current.iter().any(|a| {
                    a.resource_id.eq_ignore_ascii_case(&g.resource_id)
                        && a.app_role_id.eq_ignore_ascii_case(&g.app_role_id)
                });
                if !held {
                    graph
                        .grant_app_role(&g.resource_id, sp, &g.app_role_id)
                        .await?;
                    restored.push(g.permission.clone());
                }
            }
            Ok(Ran::Done(json!({"restored": restored})))
        }
        RollbackStep::RemoveRbac => {
            // The migration's checks verify RBAC alone; with the consent back they would only
            // report the union trap.
            for c in &m.check_ids {
                let _ = super::checks::cancel(services, actor, m.tenant_id, *c).await;
            }
            let mut removed = Vec::new();
            for id in restrictions_of(m) {
                if planned.pre_existing_restrictions.contains(&id) {
                    continue;
                }
                match rbac::delete(services, actor, m.tenant_id, id).await {
                    Ok(()) => removed.push(id),
                    Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(Ran::Done(json!({"removed_restrictions": removed})))
        }
    }
}
