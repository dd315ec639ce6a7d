//! Access grants: "this app may use these permissions on these mailboxes", declared once.
//!
//! `put` and `delete` only record the desired state (a new revision) and queue the grant's job
//! in the same transaction; the `access_grant` job ([`GrantJob`], run by `jobs::access_grant`)
//! then calls [`advance`] once per run: it picks the next step with the pure
//! `domain::grant::next`, runs it through the same use cases as the five-call API (scope groups,
//! applications, access policies or RBAC restrictions, propagation checks), and records what it
//! produced, then reschedules itself. No connection, transaction or lock is held while a step
//! calls Microsoft (`step_lease`): a short transaction under the grant's lock starts the step
//! under a fresh token, and another records its result only while the grant still names that
//! token and revision; a PUT or DELETE meanwhile answers at once, and its revision's job waits
//! for the step under way. A crash at
//! any point re-runs at most the step that was under way, and every step is idempotent in the
//! tenant (by scope group alias, application key and marker, policy key, RBAC restriction key
//! (app, scope) with names derived from it, and one check per app), so the grant resumes to the
//! same end with no duplicate object.
//!
//! Objects in the tenant are named after the grant: scope group `grant-{key}` and application
//! key `grant-{key}`.
//!
//! Credentials of a grant's app that end soon are announced once each by the per-tenant
//! [`ExpiryScanJob`] ([`scan_expiring`]).
use std::collections::BTreeMap;

use chrono::Utc;
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::access_policies::{self as policies, PolicyInput};
use super::applications;
use super::rbac;
use super::scope_groups::{self, GroupSpec};
use super::{Actor, Error, Rejection, Services, audit, step_lease, tenants};
use crate::domain::access::AccessRight;
use crate::domain::field_error::FieldError;
use crate::domain::grant::{
    self as saga, Condition, Mechanism, Next, Plan, Step, StepEntry, StepError, StepState,
};
use crate::domain::permissions;
use crate::domain::propagation::{Access, Expectation};
use crate::queue::job::Payload;
use crate::queue::worker::Outcome;
use crate::store;
use crate::store::access_grants::{Filter, GrantRecord};
use crate::store::propagation_checks::CheckState;
use crate::store::scope_groups::Membership;
use crate::store::step_runs::Saga;

/// Advisory-lock namespace: one runner of a grant's steps at a time.
pub const GRANT_LOCK: &str = "access_grant";
/// Most mailboxes one grant may list (one propagation check verifies them all).
pub const MAX_MAILBOXES: usize = super::checks::MAX_EXPECTATIONS - 10;
const MAX_LABELS: usize = 20;
/// The mechanism of a new grant that names none: RBAC for Applications, Microsoft's successor to
/// application access policies (docs/microsoft-365.md §2.9, §3). A stored grant keeps the
/// mechanism it was created with when a later PUT names none.
pub const DEFAULT_MECHANISM: Mechanism = Mechanism::Rbac;

/// The app of a grant: one mailscope creates, or one that exists (a vendor's multi-tenant app).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppSpec {
    Create { display_name: String },
    Adopt { app_id: Uuid },
}

/// The mailboxes: addresses in a scope group mailscope manages for the grant, or an existing
/// scope group of mailscope's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MailboxSpec {
    Addresses(Vec<String>),
    ScopeGroup(String),
}

/// The part of the desired state that the tenant holds; a change of it is a new revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub app: AppSpec,
    /// Sorted, without duplicates.
    pub permissions: Vec<String>,
    pub mailboxes: MailboxSpec,
    /// Mailboxes the propagation check proves out of reach (besides the tenant's canaries).
    #[serde(default)]
    pub canary_mailboxes: Vec<String>,
}

/// A grant as the caller sent it.
#[derive(Debug, Default)]
pub struct Request {
    pub display_name: Option<String>,
    pub app_id: Option<String>,
    pub permissions: Vec<String>,
    pub mailboxes: Option<Vec<String>>,
    pub scope_group: Option<String>,
    pub canary_mailboxes: Vec<String>,
    pub mechanism: Option<Mechanism>,
    pub labels: BTreeMap<String, String>,
    pub external_ref: Option<String>,
    pub callback_url: Option<String>,
}

struct Valid {
    spec: Spec,
    /// As asked; `None`: keep the grant's, or [`DEFAULT_MECHANISM`] for a new grant.
    mechanism: Option<Mechanism>,
    labels: serde_json::Value,
    external_ref: Option<String>,
    callback_url: Option<String>,
}

/// A grant key: a lowercase slug short enough to name its scope group and application.
pub fn is_key(key: &str) -> bool {
    let b = key.as_bytes();
    (1..=57).contains(&b.len())
        && b[0] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// The alias of the scope group mailscope manages for a grant.
pub fn group_alias(key: &str) -> String {
    format!("grant-{key}")
}

/// The application key of the grant's app.
pub fn app_key(key: &str) -> String {
    format!("grant-{key}")
}

pub fn grant_not_found(key: &str) -> Error {
    Error::not_found(format!("no access grant `{key}` in this tenant"))
}

fn is_address(s: &str) -> bool {
    crate::domain::address::is_address(s.trim())
}

fn validate(services: &Services, key: &str, r: Request) -> Result<Valid, Error> {
    let mut errs: Vec<FieldError> = Vec::new();
    let mut err = |f: &str, m: String| errs.push(FieldError::new(f, m));
    if !is_key(key) {
        err(
            "key",
            "must be 1 to 57 lowercase letters, digits or `-`, not starting with `-`".into(),
        );
    }
    let app = match (r.display_name, r.app_id) {
        (Some(_), Some(_)) | (None, None) => {
            err(
                "app",
                "give either `display_name` (mailscope creates the app) or `app_id` (an existing app, e.g. a vendor's multi-tenant app consented to in this tenant)".into(),
            );
            None
        }
        (Some(d), None) => {
            let d = d.trim().to_string();
            if d.is_empty() || d.chars().count() > 256 {
                err("display_name", "must be 1 to 256 characters".into());
            }
            Some(AppSpec::Create { display_name: d })
        }
        (None, Some(a)) => match a.trim().parse::<Uuid>() {
            Ok(app_id) => Some(AppSpec::Adopt { app_id }),
            Err(_) => {
                err(
                    "app_id",
                    "must be the app's client id (a GUID), not an object id".into(),
                );
                None
            }
        },
    };
    let mut perms: Vec<String> = Vec::new();
    if r.permissions.is_empty() || r.permissions.len() > 50 {
        err(
            "permissions",
            "list 1 to 50 application permissions, e.g. [\"Mail.Read\"]".into(),
        );
    }
    for (i, p) in r.permissions.iter().enumerate() {
        let p = p.trim();
        if !permissions::is_permission_name(p) {
            err(
                &format!("permissions[{i}]"),
                "must be a permission name such as Mail.Read".into(),
            );
        } else if !permissions::classify(p).covered_by_access_policies {
            // A grant is a promise about mailboxes: a permission no restriction covers breaks it.
            err(
                &format!("permissions[{i}]"),
                format!(
                    "{p} is not restricted to mailboxes by application access policies (the app would reach it across the whole tenant); a grant accepts only mailbox permissions such as Mail.Read, Mail.Send or Calendars.ReadWrite"
                ),
            );
        } else if !perms.iter().any(|q| q == p) {
            perms.push(p.to_string());
        }
    }
    perms.sort();
    let mailboxes = match (r.mailboxes, r.scope_group) {
        (Some(_), Some(_)) | (None, None) => {
            err(
                "mailboxes",
                "give either `mailboxes` (addresses; mailscope manages the scope group) or `scope_group` (the alias of an existing scope group of mailscope's)".into(),
            );
            None
        }
        (Some(list), None) => {
            if list.is_empty() || list.len() > MAX_MAILBOXES {
                err(
                    "mailboxes",
                    format!("list 1 to {MAX_MAILBOXES} mailbox addresses"),
                );
            }
            let mut out: Vec<String> = Vec::new();
            for (i, m) in list.iter().enumerate() {
                if !is_address(m) {
                    err(&format!("mailboxes[{i}]"), "must be an SMTP address".into());
                }
                let m = m.trim().to_ascii_lowercase();
                if !out.contains(&m) {
                    out.push(m);
                }
            }
            out.sort();
            Some(MailboxSpec::Addresses(out))
        }
        (None, Some(alias)) => match scope_groups::normalise_alias(&alias) {
            Some(a) => Some(MailboxSpec::ScopeGroup(a)),
            None => {
                err(
                    "scope_group",
                    "must be a scope group alias: 1 to 64 letters, digits, `-`, `_` or `.`".into(),
                );
                None
            }
        },
    };
    let mut canaries: Vec<String> = Vec::new();
    for (i, c) in r.canary_mailboxes.iter().enumerate() {
        if !is_address(c) {
            err(
                &format!("canary_mailboxes[{i}]"),
                "must be an SMTP address".into(),
            );
        }
        let c = c.trim().to_ascii_lowercase();
        if !canaries.contains(&c) {
            canaries.push(c);
        }
    }
    canaries.sort();
    if let Some(MailboxSpec::Addresses(list)) = &mailboxes
        && let Some(c) = canaries.iter().find(|c| list.contains(c))
    {
        err(
            "canary_mailboxes",
            format!("{c} is both a mailbox of the grant and a canary"),
        );
    }
    // Resolved in `put`: omitted means the stored grant's mechanism, or the default for a new one.
    let mechanism = r.mechanism;
    if r.labels.len() > MAX_LABELS {
        err("labels", format!("at most {MAX_LABELS} labels"));
    }
    for (k, v) in &r.labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if !key_ok {
            err(
                &format!("labels.{k}"),
                "a label name is 1 to 63 letters, digits, `-`, `_`, `.` or `/`".into(),
            );
        }
        if v.chars().count() > 256 {
            err(&format!("labels.{k}"), "at most 256 characters".into());
        }
    }
    let external_ref = r
        .external_ref
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    if external_ref
        .as_ref()
        .is_some_and(|s| s.chars().count() > 256)
    {
        err("external_ref", "at most 256 characters".into());
    }
    if let Some(u) = &r.callback_url
        && let Err(why) = crate::webhooks::validate_callback_url(u, &services.settings.webhooks)
    {
        err("callback_url", why);
    }
    match (errs.is_empty(), app, mailboxes) {
        (true, Some(app), Some(mailboxes)) => Ok(Valid {
            spec: Spec {
                app,
                permissions: perms,
                mailboxes,
                canary_mailboxes: canaries,
            },
            mechanism,
            labels: json!(r.labels),
            external_ref,
            callback_url: r.callback_url.map(|u| u.trim().to_string()),
        }),
        _ => Err(Error::Invalid(errs)),
    }
}

/// What RBAC for Applications needs of a grant beyond the common rules: a role for every
/// permission (docs/microsoft-365.md §3.2), and a mailbox outside the scope to prove the scope
/// excludes someone before any Entra consent is removed (the grant's canaries or the tenant's).
fn check_rbac(spec: &Spec, tenant_canaries: &[String]) -> Result<(), Error> {
    let mut errs = Vec::new();
    for (i, p) in spec.permissions.iter().enumerate() {
        if crate::domain::rbac::role_for_permission(p).is_none()
            || !crate::domain::rbac::is_mailbox_permission(p)
        {
            errs.push(FieldError::new(
                format!("permissions[{i}]"),
                format!(
                    "{p} has no RBAC for Applications role (docs/microsoft-365.md §3.2); use `\"mechanism\": \"access_policy\"` for it"
                ),
            ));
        }
    }
    if spec.canary_mailboxes.is_empty() && tenant_canaries.is_empty() {
        errs.push(FieldError::new(
            "canary_mailboxes",
            "with `rbac`, name at least one mailbox outside the grant (or set the tenant's canary_mailboxes): the scope is verified to exclude it before the app's Entra consent is removed",
        ));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(errs))
    }
}

fn spec_of(g: &GrantRecord) -> Result<Spec, Error> {
    serde_json::from_value(g.spec.clone())
        .map_err(|e| Error::internal(anyhow::anyhow!("access grant {} spec: {e}", g.key)))
}

fn spec_json(s: &Spec) -> Result<serde_json::Value, Error> {
    serde_json::to_value(s).map_err(|e| Error::internal(anyhow::anyhow!("grant spec: {e}")))
}

pub fn plan_of(g: &GrantRecord) -> Plan {
    Plan {
        revision: g.revision,
        removing: g.removing,
        mechanism: g.mechanism,
    }
}

/// The `access_grant` job's payload: advance one grant, for one revision of its desired state.
/// A newer revision has a job of its own; a job of an older one ends at its next run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantJob {
    pub tenant_id: Uuid,
    pub key: String,
    pub revision: i64,
}

impl Payload for GrantJob {
    const KIND: &'static str = "access_grant";
    /// Each failed run of a step (not throttling, not a poll) counts.
    const MAX_FAILURES: i32 = 8;

    fn tenant(&self) -> Uuid {
        self.tenant_id
    }

    fn unique_key(&self) -> Option<String> {
        Some(format!("{}@{}", self.key, self.revision))
    }
}

async fn enqueue(c: &impl GenericClient, g: &GrantRecord) -> Result<Uuid, Error> {
    let job = GrantJob {
        tenant_id: g.tenant_id,
        key: g.key.clone(),
        revision: g.revision,
    };
    Ok(crate::queue::job::enqueue_job(c, &job).await?.id())
}

/// Record the desired state. Idempotent: the same body again changes nothing and queues no work
/// (labels, external reference and callback URL are updated in place, without new work); other
/// mailboxes or permissions are a new revision that converges from the current state; the same
/// body on a `failed` or `removed` grant tries again. Concurrent PUTs are serialised on the row.
/// Returns the grant and whether new work was queued.
pub async fn put(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    key: &str,
    request: Request,
) -> Result<(GrantRecord, bool), Error> {
    let valid = validate(services, key, request)?;
    let _turn = grant_turn(services, tenant_id, key).await;
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    if store::tenants::get(&tx, tenant_id).await?.is_none() {
        return Err(tenants::tenant_not_found(tenant_id));
    }
    if let MailboxSpec::ScopeGroup(alias) = &valid.spec.mailboxes
        && store::scope_groups::get(&tx, tenant_id, alias)
            .await?
            .is_none()
    {
        return Err(Error::invalid(
            "scope_group",
            format!(
                "mailscope has no scope group `{alias}`; create it with PUT /scope-groups/{alias}, or list `mailboxes` instead"
            ),
        ));
    }
    let spec = spec_json(&valid.spec)?;
    let tenant_canaries = store::tenants::get(&tx, tenant_id)
        .await?
        .map(|t| t.canary_mailboxes)
        .unwrap_or_default();
    let fresh = GrantRecord {
        id: Uuid::new_v4(),
        tenant_id,
        key: key.to_string(),
        spec: spec.clone(),
        mechanism: valid.mechanism.unwrap_or(DEFAULT_MECHANISM),
        revision: 1,
        removing: false,
        condition: Condition::Pending,
        steps: Vec::new(),
        labels: valid.labels.clone(),
        external_ref: valid.external_ref.clone(),
        callback_url: valid.callback_url.clone(),
        job_id: None,
        created_at: Utc::now(),
        updated_at: Utc::now(),
        condition_at: Utc::now(),
        step_run: None,
    };
    let inserted = store::access_grants::insert(&tx, &fresh).await?;
    let mut g = store::access_grants::get_for_update(&tx, tenant_id, key)
        .await?
        .ok_or_else(|| Error::internal(anyhow::anyhow!("access grant {key} vanished")))?;
    // Omitted: the grant keeps the mechanism it has (a grant created before RBAC became the
    // default stays on access policies).
    let mechanism = valid.mechanism.unwrap_or(g.mechanism);
    if mechanism == Mechanism::Rbac {
        check_rbac(&valid.spec, &tenant_canaries)?;
    }
    let action;
    if inserted {
        action = "access_grant.created";
    } else {
        let old = spec_of(&g)?;
        let settled_again = matches!(g.condition, Condition::Failed | Condition::Removed);
        let same = old == valid.spec && g.mechanism == mechanism && !g.removing;
        if mechanism != g.mechanism && g.condition != Condition::Removed {
            // Switching in place would be a migration with its own safe order (the new
            // restriction verified before the old one's consent changes); not a grant's job.
            return Err(Error::rejected(
                Rejection::Conflict,
                format!(
                    "access grant `{key}` uses `{}`; its mechanism cannot change while it exists. DELETE it (wait for `removed`) and PUT it again with `\"mechanism\": \"{}\"`",
                    g.mechanism.as_str(),
                    mechanism.as_str()
                ),
            ));
        }
        if !g.removing && g.condition != Condition::Removed && old.app != valid.spec.app {
            return Err(Error::rejected(
                Rejection::Conflict,
                format!(
                    "access grant `{key}` is for another app; the app of a grant cannot change. DELETE it and create a grant with another key"
                ),
            ));
        }
        g.labels = valid.labels;
        g.external_ref = valid.external_ref;
        g.callback_url = valid.callback_url;
        if same && !settled_again {
            store::access_grants::save(&tx, &g).await?;
            tx.commit().await?;
            return Ok((g, false));
        }
        g.spec = spec;
        g.mechanism = mechanism;
        g.revision += 1;
        g.removing = false;
        g.condition = saga::condition(&plan_of(&g), &g.steps);
        action = "access_grant.updated";
    }
    // The scan first: its insert may wait for a worker writing the scan job's outcome, whose
    // statement then updates the tenant's queue summary, which the grant's job locks until
    // commit. In the other order the two would wait for each other (deadlock, a 500).
    ensure_expiry_scan(&tx, tenant_id).await?;
    g.job_id = Some(enqueue(&tx, &g).await?);
    store::access_grants::save(&tx, &g).await?;
    audit::record(
        &tx,
        actor,
        tenant_id,
        action,
        &format!("access_grant/{key}"),
        json!({"revision": g.revision, "spec": g.spec, "mechanism": g.mechanism.as_str()}),
    )
    .await?;
    tx.commit().await?;
    Ok((g, true))
}

/// Offboard: record that the grant should be gone and queue the reverse steps. Idempotent: a
/// grant already being removed (or removed) is returned as it is. Returns whether work was queued.
pub async fn delete(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    key: &str,
) -> Result<(GrantRecord, bool), Error> {
    let _turn = grant_turn(services, tenant_id, key).await;
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    let mut g = store::access_grants::get_for_update(&tx, tenant_id, key)
        .await?
        .ok_or_else(|| grant_not_found(key))?;
    if g.removing && g.condition != Condition::Failed {
        tx.commit().await?;
        return Ok((g, false));
    }
    g.revision += 1;
    g.removing = true;
    g.condition = Condition::Removing;
    g.job_id = Some(enqueue(&tx, &g).await?);
    store::access_grants::save(&tx, &g).await?;
    audit::record(
        &tx,
        actor,
        tenant_id,
        "access_grant.removal_requested",
        &format!("access_grant/{key}"),
        json!({"revision": g.revision}),
    )
    .await?;
    tx.commit().await?;
    Ok((g, true))
}

pub async fn get(services: &Services, tenant_id: Uuid, key: &str) -> Result<GrantRecord, Error> {
    let db = services.db().await?;
    if store::tenants::get(&db, tenant_id).await?.is_none() {
        return Err(tenants::tenant_not_found(tenant_id));
    }
    store::access_grants::get(&db, tenant_id, key)
        .await?
        .ok_or_else(|| grant_not_found(key))
}

pub async fn list(
    services: &Services,
    tenant_id: Uuid,
    filter: &Filter,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<GrantRecord>, Error> {
    let db = services.db().await?;
    if store::tenants::get(&db, tenant_id).await?.is_none() {
        return Err(tenants::tenant_not_found(tenant_id));
    }
    Ok(store::access_grants::list(&db, tenant_id, filter, after, limit).await?)
}

/// A failure as a step records it: what happened and what to do, for a person.
pub fn explain(e: &Error) -> StepError {
    let again = "correct the cause, then PUT the grant again (the same body retries it)";
    let (code, cause, fix) = match e {
        Error::Invalid(errs) => (
            "validation_failed",
            errs.iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; "),
            again.to_string(),
        ),
        Error::NotFound(d) => ("not_found", d.clone(), again.to_string()),
        Error::Rejected { kind, detail, .. } => (kind.code(), detail.clone(), again.to_string()),
        Error::Microsoft(m) => (m.code(), m.cause(), m.fix()),
        Error::Busy(d) => (
            "object_busy",
            d.clone(),
            "nothing: mailscope retries the step once the other process has finished".to_string(),
        ),
        Error::Store(_) => (
            "database_unavailable",
            "mailscope's database was unavailable".to_string(),
            "nothing: mailscope retries the step on its own".to_string(),
        ),
        Error::Internal(_) => (
            "internal",
            "an unexpected failure inside mailscope (its cause is in mailscope's log)".to_string(),
            again.to_string(),
        ),
    };
    StepError {
        code: code.to_string(),
        cause,
        fix,
    }
}

/// What one run of a step did.
enum Ran {
    Done(serde_json::Value),
    /// Not finished (a check under way): look again at `at`.
    Wait {
        output: Option<serde_json::Value>,
        at: chrono::DateTime<Utc>,
    },
    /// Ended without the effect asked for, not because a call failed (a check that did not pass).
    Failed(StepError),
}

/// Run one step of the grant's job. The outcome tells the queue when to run the next one.
pub async fn advance(services: &Services, job: &crate::queue::JobRecord, p: &GrantJob) -> Outcome {
    match advance_inner(services, job, p).await {
        Ok(o) => o,
        // Only mailscope's own bookkeeping fails here (a step's failure is recorded): retry.
        Err(e) => e.job_outcome(),
    }
}

async fn advance_inner(
    services: &Services,
    job: &crate::queue::JobRecord,
    p: &GrantJob,
) -> Result<Outcome, Error> {
    let lock = format!("{}:{}", p.tenant_id, p.key);
    let actor = Actor::Job {
        kind: GrantJob::KIND,
        id: job.id,
    };
    // 1. Decide the step and name this run its runner, in a short transaction.
    let (g, step, polling, token) = {
        let _turn = grant_turn(services, p.tenant_id, &p.key).await;
        let mut db = services.db().await?;
        let tx = db.transaction().await?;
        store::lock_key(&tx, GRANT_LOCK, &lock).await?;
        let Some(mut g) = store::access_grants::get_for_update(&tx, p.tenant_id, &p.key).await?
        else {
            return Ok(Outcome::Succeeded(
                json!({"ended": "the grant no longer exists"}),
            ));
        };
        if g.revision != p.revision {
            return Ok(Outcome::Succeeded(
                json!({"ended": "superseded by a newer revision", "revision": g.revision}),
            ));
        }
        // A step of an older revision may still be calling Microsoft: one step at a time.
        if let Some(at) = step_lease::held_elsewhere(&tx, g.step_run.as_ref(), job).await? {
            return Ok(Outcome::Reschedule { at, payload: None });
        }
        let plan = plan_of(&g);
        let step = match saga::next(&plan, &g.steps) {
            Next::Settled(c) => {
                clear_runner(&tx, &g).await?;
                settle(&tx, &mut g, c).await?;
                tx.commit().await?;
                return Ok(Outcome::Succeeded(json!({"condition": c.as_str()})));
            }
            Next::Run(s) => s,
        };
        // A poll of a check this revision started is not a new attempt of the step.
        let polling = g.steps.iter().any(|e| {
            e.step == step
                && e.revision == g.revision
                && e.state == StepState::Running
                && e.output.get("check_id").is_some()
        });
        // The propagation check step calls no Microsoft API (it starts or polls the check): it
        // runs here, and a check it starts commits with the step's record.
        if step == Step::PropagationCheck {
            let ran = propagation(services, &tx, &g).await;
            clear_runner(&tx, &g).await?;
            let outcome = record_result(&tx, job, &mut g, step, polling, ran).await?;
            tx.commit().await?;
            return Ok(outcome);
        }
        let run = step_lease::start(job, step.as_str());
        store::step_runs::set(&tx, Saga::AccessGrant, g.id, Some(&run)).await?;
        tx.commit().await?;
        (g, step, polling, run.token)
    };

    // 2. The step, with no connection held here.
    let ran = run_step(services, &actor, &g, step).await;

    // 3. Record the result, if this run is still the step's runner.
    let _turn = grant_turn(services, p.tenant_id, &p.key).await;
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    store::lock_key(&tx, GRANT_LOCK, &lock).await?;
    let Some(mut g) = store::access_grants::get_for_update(&tx, p.tenant_id, &p.key).await? else {
        return Ok(Outcome::Succeeded(
            json!({"ended": "the grant no longer exists"}),
        ));
    };
    if !step_lease::still_ours(g.step_run.as_ref(), token) {
        // Taken over after this run's lease lapsed: the newer run's result stands.
        tracing::warn!(grant = %g.key, step = step.as_str(), "step taken over by another run; its result is discarded");
        return Ok(Outcome::Succeeded(
            json!({"ended": "another run took the step over; this run's result was discarded"}),
        ));
    }
    clear_runner(&tx, &g).await?;
    if g.revision != p.revision {
        // A newer revision was accepted meanwhile. Its steps converge from what the tenant holds,
        // so what this step made is kept under its own revision (e.g. the policy a later
        // revision replaces), never as a result of the newer one.
        let now = Utc::now();
        let kept = match ran {
            Ok(Ran::Done(output)) => Some((StepState::Done, output)),
            Ok(Ran::Wait {
                output: Some(output),
                ..
            }) => Some((StepState::Running, output)),
            _ => None,
        };
        if let Some((state, output)) = kept {
            saga::record(
                &mut g.steps,
                step,
                p.revision,
                state,
                Some(output),
                None,
                !polling,
                now,
            );
            let condition = saga::condition(&plan_of(&g), &g.steps);
            store::access_grants::record_steps(&tx, g.id, g.revision, &g.steps, condition).await?;
        }
        tx.commit().await?;
        // The newer revision's job waits for this step: let it go on now.
        if let Some(next) = g.job_id.filter(|j| *j != job.id) {
            step_lease::wake(&db, next).await;
        }
        return Ok(Outcome::Succeeded(
            json!({"ended": "superseded by a newer revision", "revision": g.revision}),
        ));
    }
    let outcome = record_result(&tx, job, &mut g, step, polling, ran).await?;
    tx.commit().await?;
    Ok(outcome)
}

/// The grant's turn in this process (see `locks`), taken before a pooled connection by every
/// writer of the grant's record, so callers and runners waiting for it hold no connection.
async fn grant_turn(
    services: &Services,
    tenant_id: Uuid,
    key: &str,
) -> tokio::sync::OwnedMutexGuard<()> {
    services
        .key_locks
        .lock(format!("{GRANT_LOCK}:{tenant_id}:{key}"))
        .await
}

/// Forget the runner the grant names, if any (this run's, or a dead one's it takes over).
async fn clear_runner(tx: &impl GenericClient, g: &GrantRecord) -> Result<(), Error> {
    if g.step_run.is_some() {
        store::step_runs::set(tx, Saga::AccessGrant, g.id, None).await?;
    }
    Ok(())
}

/// Record one run of `step` for the grant's current revision, in the transaction that holds the
/// grant's lock and row; settle the grant when that decides it. The queue's outcome.
async fn record_result(
    tx: &impl GenericClient,
    job: &crate::queue::JobRecord,
    g: &mut GrantRecord,
    step: Step,
    polling: bool,
    ran: Result<Ran, Error>,
) -> Result<Outcome, Error> {
    let plan = plan_of(g);
    let now = Utc::now();
    let outcome = match ran {
        Ok(Ran::Done(output)) => {
            saga::record(
                &mut g.steps,
                step,
                g.revision,
                StepState::Done,
                Some(output),
                None,
                !polling,
                now,
            );
            Outcome::Reschedule {
                at: now,
                payload: None,
            }
        }
        Ok(Ran::Wait { output, at }) => {
            saga::record(
                &mut g.steps,
                step,
                g.revision,
                StepState::Running,
                output,
                None,
                !polling,
                now,
            );
            Outcome::Reschedule { at, payload: None }
        }
        Ok(Ran::Failed(why)) => {
            let message = format!("{}: {}", step.as_str(), why.cause);
            saga::record(
                &mut g.steps,
                step,
                g.revision,
                StepState::Failed,
                None,
                Some(why),
                !polling,
                now,
            );
            Outcome::Fail(message)
        }
        Err(e) => {
            let outcome = e.job_outcome();
            let gives_up = match &outcome {
                Outcome::Retry(_) => job.failures + 1 >= job.max_failures,
                Outcome::Fail(_) => true,
                _ => false,
            };
            if !matches!(e, Error::Microsoft(_)) {
                tracing::warn!(grant = %g.key, step = step.as_str(), error = %e, "access grant step failed");
            }
            saga::record(
                &mut g.steps,
                step,
                g.revision,
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
                Outcome::Fail(format!("{}: {e}", step.as_str()))
            } else {
                outcome
            }
        }
    };
    let condition = saga::condition(&plan, &g.steps);
    if condition.is_settled() {
        settle(tx, g, condition).await?;
        return Ok(match outcome {
            Outcome::Fail(m) => Outcome::Fail(m),
            _ => Outcome::Succeeded(json!({"condition": condition.as_str()})),
        });
    }
    if !store::access_grants::record_steps(tx, g.id, g.revision, &g.steps, condition).await? {
        return Ok(Outcome::Succeeded(
            json!({"ended": "superseded by a newer revision"}),
        ));
    }
    Ok(outcome)
}

/// Record a settled condition; on a change to it, queue the signed event (in the same
/// transaction: the event is sent iff the condition is recorded).
async fn settle(tx: &impl GenericClient, g: &mut GrantRecord, c: Condition) -> Result<(), Error> {
    let changed = g.condition != c;
    store::access_grants::record_steps(tx, g.id, g.revision, &g.steps, c).await?;
    g.condition = c;
    if changed && let Some(url) = &g.callback_url {
        match reqwest::Url::parse(url) {
            Ok(url) => {
                let failed = g
                    .steps
                    .iter()
                    .find(|e| e.revision == g.revision && e.state == StepState::Failed);
                crate::webhooks::enqueue_delivery(
                    tx,
                    g.tenant_id,
                    g.id,
                    &format!("access_grant.{}", c.as_str()),
                    &url,
                    json!({
                        "tenant_id": g.tenant_id,
                        "key": g.key,
                        "condition": c.as_str(),
                        "revision": g.revision,
                        "labels": g.labels,
                        "external_ref": g.external_ref,
                        "failed_step": failed.map(|e| e.step.as_str()),
                        "error": failed.and_then(|e| e.last_error.clone()),
                    }),
                )
                .await?;
            }
            Err(e) => tracing::warn!(grant = %g.key, error = %e, "callback URL no longer parses"),
        }
    }
    Ok(())
}

fn output_of(g: &GrantRecord, step: Step) -> Option<&StepEntry> {
    g.steps.iter().find(|e| e.step == step)
}

/// The grant's scope group alias: the one mailscope manages for it, or the one it names.
fn scope_alias(g: &GrantRecord, spec: &Spec) -> String {
    match &spec.mailboxes {
        MailboxSpec::Addresses(_) => group_alias(&g.key),
        MailboxSpec::ScopeGroup(a) => a.clone(),
    }
}

async fn app_record(
    services: &Services,
    g: &GrantRecord,
) -> Result<Option<store::applications::ApplicationRecord>, Error> {
    let db = services.db().await?;
    Ok(store::applications::get(&db, g.tenant_id, &app_key(&g.key)).await?)
}

fn app_id_of(app: &store::applications::ApplicationRecord) -> Result<Uuid, Error> {
    app.app_id.ok_or_else(|| {
        Error::conflict(format!(
            "application `{}` is still being created; the app step runs again",
            app.key
        ))
    })
}

/// One step that calls Microsoft, through the provisioning use cases (which take their own
/// connections, briefly). No connection is held here across a call: the reads the step needs
/// are short ones of their own.
async fn run_step(
    services: &Services,
    actor: &Actor,
    g: &GrantRecord,
    step: Step,
) -> Result<Ran, Error> {
    let spec = spec_of(g)?;
    let t = g.tenant_id;
    let alias = scope_alias(g, &spec);
    match step {
        Step::ScopeGroup => match &spec.mailboxes {
            MailboxSpec::Addresses(list) => {
                let put = scope_groups::put(
                    services,
                    actor,
                    t,
                    &alias,
                    GroupSpec {
                        display_name: Some(format!("mailscope grant {}", g.key)),
                        members: list.clone(),
                        membership: Membership::Exact,
                    },
                )
                .await?;
                let r = put.value;
                Ok(Ran::Done(json!({
                    "alias": r.alias, "address": r.primary_smtp_address, "object_id": r.object_id,
                    "members": r.members, "origin": r.origin, "managed_by_grant": true,
                })))
            }
            MailboxSpec::ScopeGroup(a) => {
                let r = store::scope_groups::get(&services.db().await?, t, a)
                    .await?
                    .ok_or_else(|| {
                        Error::not_found(format!("mailscope has no scope group `{a}` any more"))
                    })?;
                Ok(Ran::Done(json!({
                    "alias": r.alias, "address": r.primary_smtp_address, "object_id": r.object_id,
                    "members": r.members, "origin": r.origin, "managed_by_grant": false,
                })))
            }
        },
        Step::App => {
            let request = match &spec.app {
                AppSpec::Create { display_name } => applications::Request {
                    display_name: Some(display_name.clone()),
                    permissions: Some(spec.permissions.clone()),
                    // The consent step grants, once the restriction exists.
                    grant_admin_consent: Some(false),
                    allow_unscoped_permissions: Some(false),
                    app_id: None,
                },
                AppSpec::Adopt { app_id } => applications::Request {
                    app_id: Some(app_id.to_string()),
                    allow_unscoped_permissions: Some(false),
                    ..Default::default()
                },
            };
            let put = applications::put(services, actor, t, &app_key(&g.key), request).await?;
            let r = put.value.record;
            Ok(Ran::Done(json!({
                "key": r.key, "app_id": r.app_id, "origin": r.origin,
                "application_object_id": r.application_object_id,
                "service_principal_object_id": r.service_principal_object_id,
            })))
        }
        Step::Restriction if g.mechanism == Mechanism::Rbac => {
            rbac_restriction(services, actor, g, &spec, &alias).await
        }
        Step::Restriction => {
            let app = app_record(services, g).await?.ok_or_else(|| {
                Error::conflict("the grant's app is not recorded; the app step runs again")
            })?;
            let app_id = app_id_of(&app)?.to_string();
            let input = PolicyInput {
                app_id: app_id.clone(),
                scope: alias.clone(),
                access_right: AccessRight::RestrictAccess,
                description: Some(format!("mailscope grant {}", g.key)),
                canary_mailboxes: Vec::new(),
            };
            // Another scope than last time: replace (the new policy exists before the old one
            // goes, so the app is never unrestricted in between).
            let previous = output_of(g, Step::Restriction)
                .and_then(|e| e.output.get("policy_id")?.as_str()?.parse::<Uuid>().ok());
            let previous = match previous {
                Some(id) => store::access_policies::get(&services.db().await?, t, id).await?,
                None => None,
            };
            let changed = match previous {
                Some(old) if old.scope_alias.as_deref() != Some(alias.as_str()) => {
                    policies::replace(services, actor, t, old.id, input, false).await?
                }
                _ => policies::create(services, actor, t, input).await?,
            };
            let p = changed.value.policy;
            Ok(Ran::Done(json!({
                "policy_id": p.id, "app_id": p.app_id, "scope": alias,
                "access_right": "RestrictAccess", "state": p.state.as_str(),
            })))
        }
        Step::UnscopedGrants if g.mechanism == Mechanism::Rbac => {
            let id = restriction_of(g).ok_or_else(|| {
                Error::conflict(
                    "the grant's RBAC restriction is not recorded; the restriction step runs again",
                )
            })?;
            // The safe order of provisioning::rbac::enforce: Test-ServicePrincipalAuthorization
            // shows members in scope and every canary out of it, and only then the Entra
            // grants the restriction covers go (docs/microsoft-365.md §3.3, §3.7).
            let e = rbac::enforce(
                services,
                actor,
                t,
                id,
                rbac::Verification {
                    sample_mailboxes: Vec::new(),
                    canary_mailboxes: spec.canary_mailboxes.clone(),
                },
            )
            .await?;
            Ok(Ran::Done(json!({
                "restriction_id": id,
                "verified_with": "Test-ServicePrincipalAuthorization",
                "in_scope_checked": e.in_scope_checked,
                "out_of_scope_checked": e.out_of_scope_checked,
                "entra_grants_removed": e.entra_grants_removed,
            })))
        }
        Step::UnscopedGrants => Ok(Ran::Done(json!({
            "skipped": true,
            "note": "nothing to remove with application access policies: they restrict the app's own Entra consent to the scope group, so there is no unscoped grant beside it (with RBAC for Applications this step removes the tenant-wide Entra consent)",
        }))),
        Step::Consent if g.mechanism == Mechanism::Rbac => {
            // RBAC's role assignments grant the permissions inside the scope; an Entra consent
            // would add the whole tenant (the union trap), so the app keeps none.
            let change =
                applications::set_consent(services, actor, t, &app_key(&g.key), &[]).await?;
            Ok(Ran::Done(json!({
                "permissions": spec.permissions,
                "granted_by": "rbac_role_assignments",
                "entra_consent": [],
                "granted": change.granted, "revoked": change.revoked,
            })))
        }
        Step::Consent => {
            let change =
                applications::set_consent(services, actor, t, &app_key(&g.key), &spec.permissions)
                    .await?;
            Ok(Ran::Done(json!({
                "permissions": spec.permissions,
                "granted": change.granted, "revoked": change.revoked,
            })))
        }
        // Run by `advance_inner` in the transaction that records it (no Microsoft call).
        Step::PropagationCheck => Err(Error::internal(anyhow::anyhow!(
            "the propagation check step runs in the recording transaction"
        ))),
        Step::RevokeConsent => match app_record(services, g).await? {
            Some(_) => {
                let change =
                    applications::set_consent(services, actor, t, &app_key(&g.key), &[]).await?;
                Ok(Ran::Done(json!({"revoked": change.revoked})))
            }
            None => Ok(Ran::Done(
                json!({"skipped": true, "note": "no app recorded"}),
            )),
        },
        Step::RemoveRestriction => {
            let Some(app) = app_record(services, g).await? else {
                return Ok(Ran::Done(
                    json!({"skipped": true, "note": "no app recorded"}),
                ));
            };
            let Some(app_id) = app.app_id else {
                return Ok(Ran::Done(
                    json!({"skipped": true, "note": "the app was never created"}),
                ));
            };
            let ours: Vec<_> =
                store::access_policies::for_app(&services.db().await?, t, &app_id.to_string())
                    .await?
                    .into_iter()
                    .filter(|p| p.scope_alias.as_deref() == Some(alias.as_str()))
                    .collect();
            let mut removed = Vec::new();
            for p in ours {
                // The consent was revoked by the step before: without mail permissions, losing
                // its last RestrictAccess policy gives the app nothing (docs/microsoft-365.md
                // docs/microsoft-365.md §2.3), which is why this order, and only this order, may accept it.
                match policies::delete(services, actor, t, p.id, true).await {
                    Ok(_) => removed.push(p.id),
                    Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            // RBAC restrictions of the grant (and of a grant that once used them): the consent
            // is gone, and RBAC only ever grants, so removing them narrows (docs/microsoft-365.md
            // §3.3). provisioning::rbac::delete removes the assignments, then the management
            // scope and the service principal pointer once nothing else of the app uses them.
            let recorded = restriction_of(g);
            let app = app_id.to_string();
            let rbac_ours: Vec<_> = store::rbac_restrictions::all(&services.db().await?, t)
                .await?
                .into_iter()
                .filter(|r| r.app_id.eq_ignore_ascii_case(&app))
                .filter(|r| {
                    Some(r.id) == recorded || r.scope_group_alias.as_deref() == Some(alias.as_str())
                })
                .collect();
            let mut removed_rbac = Vec::new();
            for r in rbac_ours {
                match rbac::delete(services, actor, t, r.id).await {
                    Ok(()) => removed_rbac.push(r.id),
                    Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(Ran::Done(json!({
                "removed_policies": removed,
                "removed_rbac_restrictions": removed_rbac,
            })))
        }
        Step::RemoveApp => {
            let Some(app) = app_record(services, g).await? else {
                return Ok(Ran::Done(
                    json!({"skipped": true, "note": "no app recorded"}),
                ));
            };
            match applications::delete(services, actor, t, &app.key).await {
                Ok(()) | Err(Error::NotFound(_)) => Ok(Ran::Done(json!({
                    "app_id": app.app_id,
                    "deleted_in_tenant": app.origin == "created",
                    "note": if app.origin == "created" {
                        "created by mailscope: deleted from the tenant"
                    } else {
                        "adopted: left in the tenant, only forgotten by mailscope"
                    },
                }))),
                Err(e) => Err(e),
            }
        }
        Step::RemoveScopeGroup => {
            // The group mailscope made for the grant goes, even when a later revision switched
            // to an existing scope group (then it is no longer any policy's scope); a scope group
            // the grant only named stays.
            let ours = group_alias(&g.key);
            let named = match &spec.mailboxes {
                MailboxSpec::ScopeGroup(a) => Some(a.clone()),
                MailboxSpec::Addresses(_) => None,
            };
            let rec = store::scope_groups::get(&services.db().await?, t, &ours).await?;
            let mut out = json!({"alias": ours, "deleted_in_tenant": false});
            if let Some(rec) = rec.filter(|_| named.as_deref() != Some(ours.as_str())) {
                match scope_groups::delete(services, actor, t, &ours).await {
                    Ok(()) | Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
                out["deleted_in_tenant"] = json!(rec.origin == "created");
            }
            if let Some(a) = named {
                out["note"] = json!(format!(
                    "scope group `{a}` was not created for the grant: it stays"
                ));
            }
            Ok(Ran::Done(out))
        }
    }
}

/// Start the app's propagation check for this revision (every member expected granted, the
/// canaries denied), then wait for it. A membership change starts no check by itself, so the
/// grant always starts one: newly added members are reported in force only once they are.
async fn propagation(
    services: &Services,
    tx: &impl GenericClient,
    g: &GrantRecord,
) -> Result<Ran, Error> {
    let spec = spec_of(g)?;
    let alias = scope_alias(g, &spec);
    let alias = alias.as_str();
    let started = g
        .steps
        .iter()
        .find(|e| e.step == Step::PropagationCheck && e.revision == g.revision)
        .and_then(|e| e.output.get("check_id")?.as_str()?.parse::<Uuid>().ok());
    let Some(check_id) = started else {
        let app = store::applications::get(tx, g.tenant_id, &app_key(&g.key))
            .await?
            .ok_or_else(|| Error::conflict("the grant's app is not recorded"))?;
        let app_id = app_id_of(&app)?;
        let tenant = store::tenants::get(tx, g.tenant_id)
            .await?
            .ok_or_else(|| tenants::tenant_not_found(g.tenant_id))?;
        let group = store::scope_groups::get(tx, g.tenant_id, alias)
            .await?
            .ok_or_else(|| Error::not_found(format!("scope group `{alias}` is gone")))?;
        let mut expectations: Vec<Expectation> = group
            .members
            .iter()
            .map(|m| Expectation::new(m, Access::Granted))
            .collect();
        for c in spec.canary_mailboxes.iter().chain(&tenant.canary_mailboxes) {
            if !group.members.iter().any(|m| m.eq_ignore_ascii_case(c)) {
                expectations.push(Expectation::new(c, Access::Denied));
            }
        }
        let expectations = crate::domain::propagation::dedupe(expectations);
        let mechanism = match g.mechanism {
            Mechanism::AccessPolicy => crate::store::propagation_checks::Mechanism::AccessPolicy,
            Mechanism::Rbac => crate::store::propagation_checks::Mechanism::Rbac,
        };
        let (check, _) = super::checks::start_or_update(
            tx,
            services,
            g.tenant_id,
            app_id,
            &expectations,
            None,
            None,
            None,
            "access_policy",
            mechanism,
        )
        .await?;
        return Ok(Ran::Wait {
            output: Some(json!({"check_id": check.id, "mailboxes": expectations.len()})),
            at: Utc::now() + chrono::Duration::milliseconds(500),
        });
    };
    let check = store::propagation_checks::get_by_id(tx, check_id)
        .await?
        .ok_or_else(|| Error::internal(anyhow::anyhow!("propagation check {check_id} vanished")))?;
    match check.state {
        CheckState::Succeeded => Ok(Ran::Done(json!({
            "check_id": check.id, "state": "succeeded", "verified_by": check.verified_by,
            "propagation_seconds": check.propagation_seconds,
        }))),
        s if s.is_final() => Ok(Ran::Failed(StepError {
            code: format!("propagation_check_{}", s.as_str()),
            cause: format!(
                "propagation check {} ended {}: {}",
                check.id,
                s.as_str(),
                check.reason.as_deref().unwrap_or("no reason recorded")
            ),
            fix: format!(
                "see GET /v1/tenants/{}/propagation-checks/{} for each mailbox's verdict; correct the tenant or the grant, then PUT the grant again",
                g.tenant_id, check.id
            ),
        })),
        _ => {
            // Look again when the check's own job next looks (at least a second from now).
            let job_at = match check.job_id {
                Some(j) => crate::queue::get(tx, j).await?.map(|j| j.run_at),
                None => None,
            };
            let soon = Utc::now() + chrono::Duration::seconds(1);
            Ok(Ran::Wait {
                output: None,
                at: job_at.map_or(soon, |a| a.max(soon)),
            })
        }
    }
}

/// The RBAC restriction the grant's restriction step recorded.
fn restriction_of(g: &GrantRecord) -> Option<Uuid> {
    output_of(g, Step::Restriction)?
        .output
        .get("restriction_id")?
        .as_str()?
        .parse()
        .ok()
}

/// The RBAC restriction step: the service principal pointer and one role assignment per
/// permission scoped to the grant's scope group (`-RecipientGroupScope`, which survives a tenant
/// relocation, docs/microsoft-365.md §8.2), through `provisioning::rbac`. Another scope or other
/// permissions than last time replace the restriction (the new assignments exist before the old
/// ones go). The Entra consent is not touched here: the next step verifies, then removes it.
async fn rbac_restriction(
    services: &Services,
    actor: &Actor,
    g: &GrantRecord,
    spec: &Spec,
    alias: &str,
) -> Result<Ran, Error> {
    let t = g.tenant_id;
    let app = app_record(services, g).await?.ok_or_else(|| {
        Error::conflict("the grant's app is not recorded; the app step runs again")
    })?;
    let app_id = app_id_of(&app)?.to_string();
    let input = || rbac::RestrictionInput {
        app_id: app_id.clone(),
        service_principal_object_id: None,
        scope: rbac::ScopeInput::ScopeGroup {
            alias: alias.to_string(),
            via: rbac::GroupVia::RecipientGroupScope,
        },
        permissions: Some(spec.permissions.clone()),
        rbac_only_permissions: Vec::new(),
        remove_entra_grants: false,
        verification: rbac::Verification::default(),
        access_right: None,
    };
    let previous = match restriction_of(g) {
        Some(id) => store::rbac_restrictions::get(&services.db().await?, t, id).await?,
        None => None,
    };
    let r = match previous {
        Some(old) => {
            rbac::replace(services, actor, t, old.id, input())
                .await?
                .value
                .0
        }
        None => match rbac::create(services, actor, t, input()).await {
            Ok(e) => e.value.0,
            // The app already has a restriction on this scope with other permissions (one the
            // grant made before its record was lost, or one made by hand): converge it.
            Err(Error::Rejected {
                kind: Rejection::RbacConflict,
                ..
            }) => {
                let existing = store::rbac_restrictions::all(&services.db().await?, t)
                    .await?
                    .into_iter()
                    .find(|r| {
                        r.app_id.eq_ignore_ascii_case(&app_id)
                            && r.scope_group_alias.as_deref() == Some(alias)
                    })
                    .ok_or_else(|| {
                        Error::conflict("an RBAC restriction of the app conflicts with the grant")
                    })?;
                rbac::replace(services, actor, t, existing.id, input())
                    .await?
                    .value
                    .0
            }
            Err(e) => return Err(e),
        },
    };
    let rec = &r.record;
    Ok(Ran::Done(json!({
        "restriction_id": rec.id, "app_id": rec.app_id,
        "service_principal_object_id": rec.service_principal_object_id,
        "pointer_object_id": r.pointer_object_id,
        "scope": alias, "scope_kind": rec.scope_kind, "permissions": rec.permissions,
        "assignments": rec.assignment_names, "origin": rec.origin,
    })))
}

/// The app of a grant whose app mailscope created, with its registration's object id: only such
/// an app gets credentials from mailscope (an adopted vendor app's credentials are the vendor's).
async fn created_app(
    services: &Services,
    tenant_id: Uuid,
    key: &str,
) -> Result<(GrantRecord, Uuid), Error> {
    let g = get(services, tenant_id, key).await?;
    let spec = spec_of(&g)?;
    if let AppSpec::Adopt { app_id } = spec.app {
        return Err(Error::conflict(format!(
            "access grant `{key}` adopted the existing app {app_id}: its credentials belong to its publisher, who manages them in its own tenant; mailscope issues credentials only for apps it created"
        )));
    }
    if g.removing {
        return Err(Error::conflict(format!(
            "access grant `{key}` is being removed (or removed): its app gets no new credentials"
        )));
    }
    let app = app_record(services, &g).await?;
    match app.and_then(|a| a.application_object_id) {
        Some(obj) => Ok((g, obj)),
        None => Err(Error::conflict(format!(
            "the app of access grant `{key}` is not created yet; wait for the grant's `app` step (GET …/access-grants/{key}?wait=30)"
        ))),
    }
}

/// A client secret for the grant's app, shown once (see `applications::add_secret`). Rotation:
/// add the new one, switch the vendor over, then delete the old one; both work meanwhile.
pub async fn add_secret(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    key: &str,
    request: applications::SecretRequest,
) -> Result<applications::NewSecret, Error> {
    created_app(services, tenant_id, key).await?;
    applications::add_secret(services, actor, tenant_id, &app_key(key), request).await
}

pub async fn delete_secret(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    key: &str,
    key_id: Uuid,
) -> Result<(), Error> {
    created_app(services, tenant_id, key).await?;
    applications::delete_secret(services, actor, tenant_id, &app_key(key), key_id).await
}

/// The credentials of the grant's app: client secrets (metadata, read from the tenant) and the
/// certificates the vendor uploaded.
pub struct Credentials {
    pub secrets: Vec<applications::Secret>,
    pub certificates: Vec<store::access_grants::CertificateRecord>,
}

pub async fn credentials(
    services: &Services,
    tenant_id: Uuid,
    key: &str,
) -> Result<Credentials, Error> {
    created_app(services, tenant_id, key).await?;
    let secrets = applications::secrets(services, tenant_id, &app_key(key))
        .await?
        .into_iter()
        // The propagation check's short-lived probe secret is mailscope's own, not the vendor's.
        .filter(|s| {
            !s.display_name
                .as_deref()
                .is_some_and(|n| n.starts_with("mailscope propagation probe"))
        })
        .collect();
    let db = services.db().await?;
    let certificates = store::access_grants::certificates(&db, tenant_id, key).await?;
    Ok(Credentials {
        secrets,
        certificates,
    })
}

/// A credential of a grant's app, as the expiry rules see it.
#[derive(Debug, Clone, Serialize)]
pub struct CredentialEnd {
    pub key_id: Uuid,
    /// `secret` or `certificate`.
    pub kind: &'static str,
    pub display_name: String,
    pub end_date_time: chrono::DateTime<Utc>,
}

/// The vendor's credentials of the grant's app, from mailscope's records (the secrets added and
/// certificates uploaded through mailscope; the propagation check's probe secret is not one).
async fn credential_ends(
    c: &impl GenericClient,
    g: &GrantRecord,
) -> Result<Vec<CredentialEnd>, Error> {
    let mut ends: Vec<CredentialEnd> =
        store::applications::secrets(c, g.tenant_id, &app_key(&g.key))
            .await?
            .into_iter()
            .filter(|s| !s.display_name.starts_with("mailscope propagation probe"))
            .map(|s| CredentialEnd {
                key_id: s.key_id,
                kind: "secret",
                display_name: s.display_name,
                end_date_time: s.end_date_time,
            })
            .collect();
    ends.extend(
        store::access_grants::certificates(c, g.tenant_id, &g.key)
            .await?
            .into_iter()
            .map(|c| CredentialEnd {
                key_id: c.key_id,
                kind: "certificate",
                display_name: c.display_name,
                end_date_time: c.not_after,
            }),
    );
    Ok(ends)
}

/// The credentials that end within `soon_days` while none lasts beyond it: the vendor has to
/// rotate. Empty when a longer-lasting credential exists (rotation already done) or none ends soon.
pub fn expiring(
    ends: &[CredentialEnd],
    now: chrono::DateTime<Utc>,
    soon_days: u32,
) -> Vec<&CredentialEnd> {
    let status =
        |e: &CredentialEnd| applications::secret_status(Some(e.end_date_time), now, soon_days);
    if ends
        .iter()
        .any(|e| status(e) == applications::SecretStatus::Current)
    {
        return Vec::new();
    }
    ends.iter()
        .filter(|e| status(e) == applications::SecretStatus::ExpiringSoon)
        .collect()
}

/// Whether a credential of the grant's app ends within `provisioning.secret_expiring_soon_days`
/// while none lasts beyond it (the vendor has to rotate). From mailscope's records only.
pub async fn expiring_soon(services: &Services, g: &GrantRecord) -> Result<bool, Error> {
    let db = services.db().await?;
    let ends = credential_ends(&db, g).await?;
    let soon = services.settings.provisioning.secret_expiring_soon_days;
    Ok(!expiring(&ends, Utc::now(), soon).is_empty())
}

/// The `credential_expiry_scan` job's payload: one per tenant with grants, rescheduling itself
/// every `provisioning.credential_scan_interval_seconds` while the tenant has grants.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExpiryScanJob {
    pub tenant_id: Uuid,
}

impl Payload for ExpiryScanJob {
    const KIND: &'static str = "credential_expiry_scan";

    fn tenant(&self) -> Uuid {
        self.tenant_id
    }

    /// One active scan per tenant, however many PUTs and workers ask for one.
    fn unique_key(&self) -> Option<String> {
        Some("credentials".into())
    }
}

/// Make sure the tenant's scan is queued (a no-op when it is).
pub async fn ensure_expiry_scan(c: &impl GenericClient, tenant_id: Uuid) -> Result<(), Error> {
    crate::queue::job::enqueue_job(c, &ExpiryScanJob { tenant_id }).await?;
    Ok(())
}

/// Queue the scan of every tenant with grants (periodic housekeeping: a scan job that failed
/// for good, or was purged, comes back). Returns how many tenants have one.
pub async fn ensure_expiry_scans(services: &Services) -> Result<usize, Error> {
    let db = services.db().await?;
    let tenants = store::access_grants::tenants_with_grants(&db).await?;
    for t in &tenants {
        ensure_expiry_scan(&db, *t).await?;
    }
    Ok(tenants.len())
}

/// One scan of a tenant's grants: each credential of a grant's app that [`expiring`] reports is
/// announced once, by a signed `access_grant.expiring_soon` event to the grant's callback URL.
/// The notice row and the event are written in one transaction and the row's key is the
/// credential, so a crash, a retry or a second worker never announces it twice.
pub async fn scan_expiring(services: &Services, tenant_id: Uuid) -> Result<Outcome, Error> {
    let mut db = services.db().await?;
    let grants = store::access_grants::live_in_tenant(&db, tenant_id).await?;
    if grants.is_empty() {
        return Ok(Outcome::Succeeded(
            json!({"ended": "no access grant in the tenant"}),
        ));
    }
    let soon = services.settings.provisioning.secret_expiring_soon_days;
    let mut announced = 0usize;
    for g in &grants {
        let Some(url) = g
            .callback_url
            .as_deref()
            .and_then(|u| reqwest::Url::parse(u).ok())
        else {
            continue;
        };
        let tx = db.transaction().await?;
        let ends = credential_ends(&tx, g).await?;
        let mut new: Vec<&CredentialEnd> = Vec::new();
        for c in expiring(&ends, Utc::now(), soon) {
            if store::access_grants::insert_credential_notice(
                &tx,
                tenant_id,
                &g.key,
                c.key_id,
                c.kind,
                c.end_date_time,
            )
            .await?
            {
                new.push(c);
            }
        }
        if !new.is_empty() {
            let delivery = crate::webhooks::enqueue_delivery(
                &tx,
                tenant_id,
                g.id,
                "access_grant.expiring_soon",
                &url,
                json!({
                    "tenant_id": tenant_id,
                    "key": g.key,
                    "labels": g.labels,
                    "external_ref": g.external_ref,
                    "expiring_within_days": soon,
                    "credentials": new,
                    "fix": format!("add a new credential (POST …/access-grants/{}/secrets or …/certificates), switch the vendor to it, then delete the old one", g.key),
                }),
            )
            .await?;
            let ids: Vec<Uuid> = new.iter().map(|c| c.key_id).collect();
            store::access_grants::set_notice_delivery(&tx, tenant_id, &g.key, &ids, delivery)
                .await?;
            announced += new.len();
        }
        tx.commit().await?;
    }
    let every = services
        .settings
        .provisioning
        .credential_scan_interval_seconds;
    if announced > 0 {
        tracing::info!(tenant = %tenant_id, credentials = announced, "announced credentials expiring soon");
    }
    Ok(Outcome::Reschedule {
        at: Utc::now() + chrono::Duration::seconds(i64::try_from(every).unwrap_or(3600)),
        payload: None,
    })
}

/// The lease on a grant's certificate credentials (`key_lease`): adding or removing one sets the
/// app's whole `keyCredentials` list in Graph, so one writer at a time on every replica, with no
/// pooled connection held while Graph is called.
async fn credential_lease(
    services: &Services,
    tenant_id: Uuid,
    key: &str,
) -> Result<super::key_lease::KeyLease, Error> {
    super::key_lease::KeyLease::take(
        services,
        "access_grant_credentials",
        &format!("{tenant_id}:{key}"),
    )
    .await
}

fn key_credentials(certs: &[store::access_grants::CertificateRecord]) -> serde_json::Value {
    use base64::Engine;
    json!(
        certs
            .iter()
            .map(|c| json!({
                "type": "AsymmetricX509Cert",
                "usage": "Verify",
                "keyId": c.key_id,
                "displayName": c.display_name,
                "key": base64::engine::general_purpose::STANDARD.encode(&c.der),
                "startDateTime": c.not_before.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                "endDateTime": c.not_after.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            }))
            .collect::<Vec<_>>()
    )
}

/// Add the vendor's public certificate as a credential of the grant's app; the certificates
/// already there stay (rotation with overlap: delete the old one once the vendor switched).
/// Idempotent by thumbprint: the same certificate again is returned, not added twice. Graph
/// replaces `keyCredentials` as a whole, so the whole recorded list is sent each time, which
/// also makes a retry after a crash converge to one credential per certificate.
pub async fn add_certificate(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    key: &str,
    pem: &str,
    display_name: Option<String>,
) -> Result<(store::access_grants::CertificateRecord, bool), Error> {
    let info = crate::domain::certificate::parse_pem(pem)
        .map_err(|why| Error::invalid("certificate_pem", why))?;
    if info.not_after <= Utc::now() {
        return Err(Error::invalid(
            "certificate_pem",
            format!("the certificate expired on {}", info.not_after.to_rfc3339()),
        ));
    }
    let display_name = display_name
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| format!("{key} certificate {}", &info.thumbprint[..8]));
    if display_name.chars().count() > 256 {
        return Err(Error::invalid("display_name", "at most 256 characters"));
    }
    let (_, object_id) = created_app(services, tenant_id, key).await?;
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let lease = credential_lease(services, tenant_id, key).await?;
    let mut certs =
        store::access_grants::certificates(&services.db().await?, tenant_id, key).await?;
    if let Some(c) = certs.iter().find(|c| c.thumbprint == info.thumbprint) {
        return Ok((c.clone(), false));
    }
    let new = store::access_grants::CertificateRecord {
        key_id: Uuid::new_v4(),
        thumbprint: info.thumbprint.clone(),
        der: info.der,
        display_name,
        not_before: info.not_before,
        not_after: info.not_after,
        created_at: Utc::now(),
    };
    certs.push(new.clone());
    handle
        .graph()
        .update_application(
            &object_id.to_string(),
            &json!({"keyCredentials": key_credentials(&certs)}),
        )
        .await?;
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    lease.confirm(&tx).await?;
    store::access_grants::insert_certificate(&tx, tenant_id, key, &new).await?;
    audit::record(
        &tx,
        actor,
        tenant_id,
        "access_grant.certificate_added",
        &format!("access_grant/{key}"),
        json!({"key_id": new.key_id, "thumbprint": new.thumbprint, "not_after": new.not_after}),
    )
    .await?;
    tx.commit().await?;
    Ok((new, true))
}

/// Remove a certificate credential from the grant's app (the others stay).
pub async fn delete_certificate(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    key: &str,
    key_id: Uuid,
) -> Result<(), Error> {
    let (_, object_id) = created_app(services, tenant_id, key).await?;
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let lease = credential_lease(services, tenant_id, key).await?;
    let certs = store::access_grants::certificates(&services.db().await?, tenant_id, key).await?;
    if !certs.iter().any(|c| c.key_id == key_id) {
        return Err(Error::not_found(format!(
            "access grant `{key}` has no certificate {key_id}"
        )));
    }
    let rest: Vec<_> = certs.into_iter().filter(|c| c.key_id != key_id).collect();
    handle
        .graph()
        .update_application(
            &object_id.to_string(),
            &json!({"keyCredentials": key_credentials(&rest)}),
        )
        .await?;
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    lease.confirm(&tx).await?;
    store::access_grants::delete_certificate(&tx, tenant_id, key, key_id).await?;
    audit::record(
        &tx,
        actor,
        tenant_id,
        "access_grant.certificate_removed",
        &format!("access_grant/{key}"),
        json!({"key_id": key_id}),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(days: i64, kind: &'static str) -> CredentialEnd {
        CredentialEnd {
            key_id: Uuid::new_v4(),
            kind,
            display_name: "x".into(),
            end_date_time: Utc::now() + chrono::Duration::days(days),
        }
    }

    #[test]
    fn only_credentials_ending_soon_with_nothing_longer_are_expiring() {
        let now = Utc::now();
        assert!(expiring(&[], now, 30).is_empty());
        let soon = [end(5, "secret"), end(-1, "secret")];
        let got = expiring(&soon, now, 30);
        assert_eq!(got.len(), 1, "the expired one is not announced");
        assert_eq!(got[0].key_id, soon[0].key_id);
        // Rotated already: a credential lasting beyond the window means nothing to announce.
        let rotated = [end(5, "secret"), end(200, "certificate")];
        assert!(expiring(&rotated, now, 30).is_empty());
        assert_eq!(expiring(&[end(5, "certificate")], now, 3).len(), 0);
    }
}
