//! Propagation checks: started after a change to an app's restriction or by hand, cancelled on
//! request. The check itself runs as the `propagation_check` queue job (`jobs::propagation_check`,
//! payload [`CheckJob`]); here it is created, given new expectations or flagged, in the
//! transaction of the change that calls for it.
use std::collections::BTreeSet;

use chrono::Utc;
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Actor, Error, Services};
use crate::domain::access::{self as rules, ALL_APPS, GroupMembers};
use crate::domain::field_error::FieldError;
use crate::domain::propagation::{self as domain, Access, Expectation};
use crate::m365::TenantHandle;
use crate::queue::job::Payload;
use crate::queue::{self, JobRecord, JobState};
use crate::store::propagation_checks::{CheckRecord, CheckState, Mechanism, Stage};
use crate::store::{self, StoreError};
use crate::webhooks::DeliveryStatus;

/// Advisory-lock namespace: one writer of an app's check at a time.
pub const CHECK_LOCK: &str = "propagation_check";

/// Start the app's check, or give the active one these expectations. In the caller's
/// transaction; returns the check and whether it is new. The default deadline follows the
/// mechanism: RBAC's reflects its documented permission cache of 30 minutes to 2 hours (docs/microsoft-365.md §3.5).
#[allow(clippy::too_many_arguments)]
pub async fn start_or_update(
    c: &impl GenericClient,
    services: &Services,
    tenant_id: Uuid,
    app_id: Uuid,
    expectations: &[Expectation],
    callback_url: Option<&str>,
    required_matches: Option<u32>,
    deadline_seconds: Option<u64>,
    origin: &str,
    mechanism: Mechanism,
) -> Result<(CheckRecord, bool), Error> {
    let p = &services.settings.propagation;
    store::lock_key(c, CHECK_LOCK, &format!("{tenant_id}:{app_id}")).await?;
    let default_deadline = match mechanism {
        Mechanism::AccessPolicy => p.deadline_seconds,
        Mechanism::Rbac => p.rbac_deadline_seconds,
    };
    let deadline = Utc::now()
        + chrono::Duration::seconds(
            i64::try_from(deadline_seconds.unwrap_or(default_deadline)).unwrap_or(i64::MAX / 2),
        );
    if let Some(active) = store::propagation_checks::active_for_app(c, tenant_id, app_id).await? {
        let updated = store::propagation_checks::replace_expectations(
            c,
            active.id,
            expectations,
            deadline,
            callback_url,
            mechanism,
        )
        .await?;
        let mut updated = updated;
        let woken = match updated.job_id {
            // Look at the new expectations now rather than at the end of a long backoff. A new
            // change supersedes a pending cancel: it needs verifying all the same.
            Some(job) => queue::wake(c, job).await?,
            None => false,
        };
        if !woken {
            // Its job ended without ending the check (e.g. the reaper gave up on a crashing
            // worker): give the check a job again rather than leave it stuck.
            let job = enqueue_job(c, tenant_id, app_id, updated.id).await?;
            store::propagation_checks::set_job(c, updated.id, job).await?;
            updated.job_id = Some(job);
        }
        return Ok((updated, false));
    }
    let id = Uuid::new_v4();
    let required = i32::try_from(required_matches.unwrap_or(p.required_matches)).unwrap_or(3);
    let mut rec = store::propagation_checks::insert(
        c,
        &store::propagation_checks::NewCheck {
            id,
            tenant_id,
            app_id,
            expectations,
            required_matches: required,
            deadline,
            callback_url,
            origin,
            mechanism,
        },
    )
    .await?;
    let job = enqueue_job(c, tenant_id, app_id, id).await?;
    store::propagation_checks::set_job(c, id, job).await?;
    rec.job_id = Some(job);
    Ok((rec, true))
}

/// The `propagation_check` job's payload: one step of `check_id` per run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckJob {
    pub check_id: Uuid,
    /// Absent in jobs queued before payloads were typed; only used when queueing.
    #[serde(default)]
    pub tenant_id: Uuid,
    #[serde(default)]
    pub app_id: Uuid,
}

impl Payload for CheckJob {
    const KIND: &'static str = "propagation_check";

    fn tenant(&self) -> Uuid {
        self.tenant_id
    }

    /// One active check job per tenant and app.
    fn unique_key(&self) -> Option<String> {
        Some(self.app_id.to_string())
    }
}

/// The app's check job (one active per tenant and app), running `check_id`.
async fn enqueue_job(
    c: &impl GenericClient,
    tenant_id: Uuid,
    app_id: Uuid,
    check_id: Uuid,
) -> Result<Uuid, Error> {
    let job = CheckJob {
        check_id,
        tenant_id,
        app_id,
    };
    let enqueued = queue::job::enqueue_job(c, &job).await?;
    if let queue::Enqueued::Existing(j) = enqueued {
        // A job of an ended check still active: it runs this check from now on.
        queue::job::replace_payload(c, j, &job).await?;
    }
    Ok(enqueued.id())
}

/// A scope touched by a policy change, for the default expectations.
pub struct TouchedScope {
    pub address: String,
    pub alias: Option<String>,
}

/// After a change to an app's policies (in the change's transaction): start or update the app's
/// check with default expectations drawn from its policies, the scopes the change touched, the
/// tenant's canary mailboxes and the request's. `None` when there is nothing to check.
pub async fn after_policy_change(
    c: &impl GenericClient,
    services: &Services,
    tenant_id: Uuid,
    app_id: &str,
    touched: &[TouchedScope],
    request_canaries: &[String],
) -> Result<Option<CheckRecord>, Error> {
    let Ok(app_uuid) = app_id.parse::<Uuid>() else {
        return Ok(None); // `*` policies concern every app: no single app to check.
    };
    let records: Vec<_> = store::access_policies::all(c, tenant_id)
        .await?
        .into_iter()
        .filter(|r| r.app_id == ALL_APPS || r.app_id.eq_ignore_ascii_case(app_id))
        .collect();
    let mut members = GroupMembers::new();
    let mut scopes: Vec<String> = Vec::new();
    let scope_iter = records
        .iter()
        .map(|r| {
            (
                r.scope_address.clone(),
                r.scope_alias.clone(),
                r.scope_type.clone(),
            )
        })
        .chain(
            touched
                .iter()
                .map(|t| (t.address.clone(), t.alias.clone(), String::new())),
        );
    let mut seen = BTreeSet::new();
    for (address, alias, kind) in scope_iter {
        let address = address.to_ascii_lowercase();
        if !seen.insert(address.clone()) {
            continue;
        }
        let group = match &alias {
            Some(a) => store::scope_groups::get(c, tenant_id, a).await?,
            None => None,
        };
        match group {
            Some(g) => {
                members.insert(address.clone(), g.members.clone());
                scopes.push(address);
            }
            // A group mailscope does not manage: its members are unknown here.
            None if kind.contains("Group") => {}
            None if alias.is_some() => {}
            None => scopes.push(address),
        }
    }
    let policies: Vec<rules::AccessPolicy> = records
        .iter()
        .map(|r| rules::AccessPolicy {
            app_id: r.app_id.clone(),
            scope_id: r.scope_address.to_ascii_lowercase(),
            access_right: if r.access_right == "DenyAccess" {
                rules::AccessRight::DenyAccess
            } else {
                rules::AccessRight::RestrictAccess
            },
        })
        .collect();
    let mut canaries = store::tenants::get(c, tenant_id)
        .await?
        .map(|t| t.canary_mailboxes)
        .unwrap_or_default();
    canaries.extend(request_canaries.iter().cloned());
    let expectations = domain::default_expectations(
        app_id,
        &policies,
        &members,
        &scopes,
        &canaries,
        services.settings.propagation.sample_size,
    );
    if expectations.is_empty() {
        return Ok(None);
    }
    let (check, _) = start_or_update(
        c,
        services,
        tenant_id,
        app_uuid,
        &expectations,
        None,
        None,
        None,
        "access_policy",
        Mechanism::AccessPolicy,
    )
    .await?;
    Ok(Some(check))
}

/// After an RBAC restriction of `app_id` is enforced or replaced (in the change's transaction):
/// start or update the app's check verifying it through RBAC: `samples` (mailboxes in scope)
/// expected granted, `canaries` and the tenant's canary mailboxes expected denied (a mailbox in
/// both is expected denied: the safe reading). `None` when there is nothing to check.
pub async fn after_rbac_change(
    c: &impl GenericClient,
    services: &Services,
    tenant_id: Uuid,
    app_id: &str,
    samples: &[String],
    canaries: &[String],
    origin: &str,
) -> Result<Option<CheckRecord>, Error> {
    let Ok(app_uuid) = app_id.trim().parse::<Uuid>() else {
        return Ok(None);
    };
    let tenant_canaries = store::tenants::get(c, tenant_id)
        .await?
        .map(|t| t.canary_mailboxes)
        .unwrap_or_default();
    let expectations: Vec<Expectation> = samples
        .iter()
        .map(|m| Expectation::new(m, Access::Granted))
        .chain(
            canaries
                .iter()
                .chain(tenant_canaries.iter())
                .map(|m| Expectation::new(m, Access::Denied)),
        )
        .filter(|e| !e.mailbox.is_empty())
        .take(MAX_EXPECTATIONS)
        .collect();
    let expectations = domain::dedupe(expectations);
    if expectations.is_empty() {
        return Ok(None);
    }
    let (check, _) = start_or_update(
        c,
        services,
        tenant_id,
        app_uuid,
        &expectations,
        None,
        None,
        None,
        origin,
        Mechanism::Rbac,
    )
    .await?;
    Ok(Some(check))
}

/// At most this many mailboxes per check.
pub const MAX_EXPECTATIONS: usize = 100;

/// A check with what the API shows of it: its job's runs and its callbacks.
#[derive(Debug, Clone)]
pub struct CheckView {
    pub check: CheckRecord,
    pub job: Option<JobRecord>,
    pub deliveries: Vec<DeliveryStatus>,
}

impl CheckView {
    /// When the check looks next: while it is active and its job waits.
    pub fn next_run_at(&self) -> Option<chrono::DateTime<Utc>> {
        self.job
            .as_ref()
            .filter(|j| !self.check.is_final() && j.state == JobState::Queued)
            .map(|j| j.run_at)
    }

    /// While an RBAC check waits for Graph: what it waits for, in Microsoft's documented terms
    /// (docs/microsoft-365.md §3.5, §8.3). `None` otherwise.
    pub fn waiting_note(&self) -> Option<String> {
        let c = &self.check;
        if c.is_final() || c.mechanism != Mechanism::Rbac || c.stage != Stage::Live {
            return None;
        }
        let until = (c.changed_at + chrono::Duration::hours(2)).to_rfc3339();
        Some(format!(
            "waiting for RBAC for Applications' permission cache: Exchange \
             (Test-ServicePrincipalAuthorization) already shows the change, Graph applies it within \
             30 minutes to 2 hours as documented; an app in use keeps its cached permissions up to \
             2 hours, so its old access can last until about {until}"
        ))
    }
}

/// The check as the API shows it, read with `c` (inside the caller's transaction if any).
pub async fn view(c: &impl GenericClient, check: CheckRecord) -> Result<CheckView, Error> {
    let job = match check.job_id {
        Some(j) => queue::get(c, j).await?,
        None => None,
    };
    let deliveries = crate::webhooks::deliveries_for(c, check.tenant_id, check.id).await?;
    Ok(CheckView {
        check,
        job,
        deliveries,
    })
}

fn no_check(id: Uuid) -> Error {
    Error::not_found(format!("no propagation check {id} in this tenant"))
}

/// A check asked for by hand, as the caller sent it.
pub struct CheckRequest {
    pub app_id: String,
    pub expectations: Vec<(String, Access)>,
    /// Mailboxes that must stay out of the app's reach: each is expected `denied`.
    pub canary_mailboxes: Vec<String>,
    pub callback_url: Option<String>,
    pub required_matches: Option<u32>,
    pub deadline_seconds: Option<u64>,
    /// Which restriction to verify: an access policy (default) or RBAC for Applications.
    pub mechanism: Mechanism,
}

/// The validated form of a request: the app and its deduplicated expectations.
fn validate(services: &Services, r: &CheckRequest) -> Result<(Uuid, Vec<Expectation>), Error> {
    let is_mailbox = |s: &str| crate::domain::address::is_address(s.trim());
    let mut errs = Vec::new();
    let app_id = r.app_id.trim().parse::<Uuid>().unwrap_or_else(|_| {
        errs.push(FieldError::new(
            "app_id",
            "must be the app's client id (a GUID)",
        ));
        Uuid::nil()
    });
    let mut expectations = Vec::new();
    for (i, (mailbox, expected)) in r.expectations.iter().enumerate() {
        if !is_mailbox(mailbox) {
            errs.push(FieldError::new(
                format!("expectations[{i}].mailbox"),
                "must be an SMTP address",
            ));
        }
        expectations.push(Expectation::new(mailbox, *expected));
    }
    for (i, m) in r.canary_mailboxes.iter().enumerate() {
        if !is_mailbox(m) {
            errs.push(FieldError::new(
                format!("canary_mailboxes[{i}]"),
                "must be an SMTP address",
            ));
        }
        expectations.push(Expectation::new(m, Access::Denied));
    }
    let expectations = domain::dedupe(expectations);
    if expectations.is_empty() {
        errs.push(FieldError::new(
            "expectations",
            "give at least one expectation or canary mailbox",
        ));
    }
    if expectations.len() > MAX_EXPECTATIONS {
        errs.push(FieldError::new(
            "expectations",
            format!("at most {MAX_EXPECTATIONS} mailboxes per check"),
        ));
    }
    // Scheme, credentials, allow-list and internal addresses (SSRF); checked again at delivery.
    if let Some(u) = &r.callback_url
        && let Err(why) = crate::webhooks::validate_callback_url(u, &services.settings.webhooks)
    {
        errs.push(FieldError::new("callback_url", why));
    }
    if r.required_matches.is_some_and(|k| !(1..=20).contains(&k)) {
        errs.push(FieldError::new(
            "required_matches",
            "must be between 1 and 20",
        ));
    }
    if r.deadline_seconds
        .is_some_and(|d| !(1..=30 * 86_400).contains(&d))
    {
        errs.push(FieldError::new(
            "deadline_seconds",
            "must be between 1 and 2592000 (30 days)",
        ));
    }
    if errs.is_empty() {
        Ok((app_id, expectations))
    } else {
        Err(Error::Invalid(errs))
    }
}

/// Start a check by hand, or give the app's active check these expectations. Returns the check
/// as it stands when the change commits and whether it is new.
pub async fn create(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    request: &CheckRequest,
) -> Result<(CheckView, bool), Error> {
    let (app_id, expectations) = validate(services, request)?;
    let mut db = services.db().await?;
    let tx = db.transaction().await.map_err(StoreError::from)?;
    if store::tenants::get(&tx, tenant_id).await?.is_none() {
        return Err(super::tenants::tenant_not_found(tenant_id));
    }
    let (check, created) = start_or_update(
        &tx,
        services,
        tenant_id,
        app_id,
        &expectations,
        request.callback_url.as_deref(),
        request.required_matches,
        request.deadline_seconds,
        "manual",
        request.mechanism,
    )
    .await?;
    super::audit::record(
        &tx,
        actor,
        tenant_id,
        if created {
            "propagation_check.created"
        } else {
            "propagation_check.updated"
        },
        &format!("propagation_check/{}", check.id),
        serde_json::json!({"app_id": app_id, "mailboxes": expectations.len(),
            "mechanism": request.mechanism.as_str()}),
    )
    .await?;
    let v = view(&tx, check).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok((v, created))
}

/// Cancel a check. A queued check that holds no probe secret ends at once (`true`); otherwise it
/// is flagged and its job, run once more at once, removes the probe secret and ends it.
pub async fn cancel(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    id: Uuid,
) -> Result<(CheckView, bool), Error> {
    let mut db = services.db().await?;
    let tx = db.transaction().await.map_err(StoreError::from)?;
    let check = store::propagation_checks::get(&tx, tenant_id, id)
        .await?
        .ok_or_else(|| no_check(id))?;
    store::lock_key(&tx, CHECK_LOCK, &format!("{tenant_id}:{}", check.app_id)).await?;
    let check = store::propagation_checks::get(&tx, tenant_id, id)
        .await?
        .ok_or_else(|| no_check(id))?;
    if check.is_final() {
        return Err(Error::conflict(format!(
            "propagation check {id} has already ended ({})",
            check.state.as_str()
        )));
    }
    store::propagation_checks::request_cancel(&tx, id).await?;
    let mut done = false;
    if let Some(job) = check.job_id {
        let job_state = queue::cancel(&tx, job).await?;
        // Queued, so no worker holds it; with no probe secret there is nothing to clean up.
        if job_state == Some(JobState::Cancelled)
            && check.probe_key_id.is_none()
            && check.stage == Stage::Configuration
        {
            store::propagation_checks::finish(
                &tx,
                id,
                CheckState::Cancelled,
                Some("cancelled on request"),
            )
            .await?;
            done = true;
        } else if job_state == Some(JobState::Cancelled) {
            // Let the job run once more to take the probe secret back, then end the check.
            queue::requeue_cancelled(&tx, job).await?;
        }
    }
    super::audit::record(
        &tx,
        actor,
        tenant_id,
        "propagation_check.cancelled",
        &format!("propagation_check/{id}"),
        serde_json::json!({"app_id": check.app_id}),
    )
    .await?;
    let current = store::propagation_checks::get(&tx, tenant_id, id)
        .await?
        .ok_or_else(|| no_check(id))?;
    let v = view(&tx, current).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok((v, done))
}

// Probe secrets: the short-lived client secrets the check's live stage adds to an app to read
// through Graph as the app. They are removed when the check ends, when its tenant is deleted, and
// by the sweep for any whose check no longer runs.

/// The display name of a check's probe secret (how leftovers of a crashed run are found).
pub fn probe_secret_name(check_id: Uuid) -> String {
    format!("mailscope propagation probe {check_id}")
}

pub async fn remove_named_secrets(
    handle: &TenantHandle,
    object_id: &str,
    check_id: Uuid,
) -> Result<(), Error> {
    let graph = handle.graph();
    let Some(app) = graph.get_application(object_id).await? else {
        return Ok(());
    };
    let name = probe_secret_name(check_id);
    for c in app.password_credentials {
        if c.display_name.as_deref() == Some(name.as_str())
            && let Some(k) = c.key_id
        {
            remove_key(handle, object_id, &k).await?;
        }
    }
    Ok(())
}

async fn remove_key(handle: &TenantHandle, object_id: &str, key_id: &str) -> Result<(), Error> {
    match handle.graph().remove_password(object_id, key_id).await {
        Ok(()) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Remove the check's probe secret from the app (idempotent), then forget it. A connection is
/// taken for the read before Graph is called and again for the write after, none held between.
pub async fn remove_probe_secret(
    services: &Services,
    handle: &TenantHandle,
    check: &CheckRecord,
) -> Result<(), Error> {
    // Only a check that reached the live stage can have added one.
    if check.probe_key_id.is_none() && check.stage == Stage::Configuration {
        return Ok(());
    }
    let object_id = {
        let db = services.db().await?;
        match store::applications::key_of_app(&db, check.tenant_id, check.app_id).await? {
            Some(key) => store::applications::get(&db, check.tenant_id, &key)
                .await?
                .and_then(|a| a.application_object_id),
            None => None,
        }
    };
    if let Some(object_id) = object_id.map(|o| o.to_string()) {
        if let Some(k) = check.probe_key_id {
            remove_key(handle, &object_id, &k.to_string()).await?;
        }
        remove_named_secrets(handle, &object_id, check.id).await?;
    }
    let db = services.db().await?;
    Ok(store::propagation_checks::clear_probe(&db, check.id).await?)
}

/// Before a tenant is forgotten: remove every probe secret its checks may have added (afterwards
/// mailscope would hold no credential to reach the apps).
pub async fn remove_tenant_probe_secrets(
    services: &Services,
    handle: &TenantHandle,
    tenant_id: Uuid,
) -> Result<usize, Error> {
    let holding =
        store::propagation_checks::holding_probes(&services.db().await?, tenant_id).await?;
    for check in &holding {
        remove_probe_secret(services, handle, check).await?;
    }
    Ok(holding.len())
}

/// Remove probe secrets left on apps mailscope manages whose check no longer runs (deleted, or
/// ended without its clean-up). Tenant by tenant; a tenant that cannot be reached is skipped and
/// tried again at the next sweep. Returns how many secrets were removed. Like the checks, it holds
/// no pooled connection while Graph is called: each read takes one briefly.
pub async fn sweep_probe_secrets(services: &Services) -> Result<usize, Error> {
    let tenants = services
        .db()
        .await?
        .query(
            "SELECT DISTINCT tenant_id FROM applications WHERE application_object_id IS NOT NULL",
            &[],
        )
        .await
        .map_err(StoreError::from)?;
    let mut removed = 0;
    for row in tenants {
        let tenant_id: Uuid = row.get(0);
        match sweep_tenant(services, tenant_id).await {
            Ok(n) => removed += n,
            Err(e) => tracing::warn!(%tenant_id, error = %e, "probe-secret sweep skipped a tenant"),
        }
    }
    Ok(removed)
}

async fn sweep_tenant(services: &Services, tenant_id: Uuid) -> Result<usize, Error> {
    let (record, apps) = {
        let db = services.db().await?;
        let Some(record) = store::tenants::get(&db, tenant_id).await? else {
            return Ok(0);
        };
        let apps = db
            .query(
                "SELECT application_object_id FROM applications
                 WHERE tenant_id = $1 AND application_object_id IS NOT NULL",
                &[&tenant_id],
            )
            .await
            .map_err(StoreError::from)?;
        (record, apps)
    };
    let handle = super::tenants::handle_for(services, &record)?;
    let graph = handle.graph();
    let prefix = probe_secret_name(Uuid::nil());
    let prefix = prefix.trim_end_matches(&Uuid::nil().to_string());
    let mut removed = 0;
    for row in apps {
        let object_id: Uuid = row.get(0);
        let object_id = object_id.to_string();
        let Some(app) = graph.get_application(&object_id).await? else {
            continue;
        };
        for c in app.password_credentials {
            let (Some(name), Some(key_id)) = (c.display_name.as_deref(), c.key_id.as_deref())
            else {
                continue;
            };
            let Some(check_id) = name
                .strip_prefix(prefix)
                .and_then(|id| id.parse::<Uuid>().ok())
            else {
                continue;
            };
            let running =
                store::propagation_checks::get(&services.db().await?, tenant_id, check_id)
                    .await?
                    .is_some_and(|c| !c.state.is_final());
            if !running {
                remove_key(&handle, &object_id, key_id).await?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}
