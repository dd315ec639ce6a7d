//! Starting propagation checks: after a change to an app's restriction, or by hand. The check
//! itself runs as a queue job (`propagation`); here it is created or given new expectations in
//! the transaction of the change that calls for it.
use std::collections::BTreeSet;

use chrono::Utc;
use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::{Error, Services};
use crate::domain::access::{self as rules, ALL_APPS, GroupMembers};
use crate::domain::propagation::{self as domain, Expectation};
use crate::queue::{self, NewJob};
use crate::store::{self, propagation_checks::CheckRecord};

/// Advisory-lock namespace: one writer of an app's check at a time.
pub const CHECK_LOCK: &str = "propagation_check";

/// Start the app's check, or give the active one these expectations. In the caller's
/// transaction; returns the check and whether it is new.
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
) -> Result<(CheckRecord, bool), Error> {
    let p = &services.settings.propagation;
    store::lock_key(c, CHECK_LOCK, &format!("{tenant_id}:{app_id}")).await?;
    let deadline = Utc::now()
        + chrono::Duration::seconds(
            i64::try_from(deadline_seconds.unwrap_or(p.deadline_seconds)).unwrap_or(i64::MAX / 2),
        );
    if let Some(active) = store::propagation_checks::active_for_app(c, tenant_id, app_id).await? {
        let updated = store::propagation_checks::replace_expectations(
            c,
            active.id,
            expectations,
            deadline,
            callback_url,
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
        },
    )
    .await?;
    let job = enqueue_job(c, tenant_id, app_id, id).await?;
    store::propagation_checks::set_job(c, id, job).await?;
    rec.job_id = Some(job);
    Ok((rec, true))
}

/// The app's check job (one active per tenant and app), running `check_id`.
async fn enqueue_job(
    c: &impl GenericClient,
    tenant_id: Uuid,
    app_id: Uuid,
    check_id: Uuid,
) -> Result<Uuid, Error> {
    let payload = serde_json::json!({"check_id": check_id});
    let job = NewJob {
        unique_key: Some(app_id.to_string()),
        ..NewJob::new(crate::propagation::JOB_KIND, tenant_id, payload.clone())
    };
    let enqueued = queue::enqueue(c, &job).await?;
    if let queue::Enqueued::Existing(j) = enqueued {
        // A job of an ended check still active: it runs this check from now on.
        queue::update_payload(c, j, &payload).await?;
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
    )
    .await?;
    Ok(Some(check))
}
