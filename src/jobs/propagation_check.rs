//! The `propagation_check` job: proves that an app's access restriction is in force.
//!
//! Each run does one step and reschedules itself through the queue (`Outcome::Reschedule`), so
//! a crash loses at most one observation and a check never holds a worker while it waits:
//! - stage 1, `configuration`: Exchange's verdict per expectation, `Test-ApplicationAccessPolicy`
//!   for an access policy, `Test-ServicePrincipalAuthorization -Resource` for an RBAC
//!   restriction (it bypasses RBAC's permission cache; an Entra mailbox grant left beside the
//!   restriction, the union trap, is reported here too). Exchange sees changes at once, so a
//!   disagreement here is a misconfiguration, not a delay: the check ends `misconfigured` with
//!   the reason. A RestrictAccess check with no mailbox that must be denied gets one picked here
//!   (a user mailbox outside the app's scopes, per Exchange), since only a denial proves a
//!   restriction; if none is found it ends `exchange_test` with that reason;
//! - stage 2, `live`: for an app mailscope created that holds a harmless read permission, a
//!   short-lived probe secret is added to the app, and each unmet expectation is read through
//!   Graph *as the app* (one `$batch`) until every expectation has `required_matches` matching
//!   answers in a row, or the deadline passes. Other apps end after stage 1 with
//!   `verified_by: exchange_test`. For RBAC the first look waits for the permission cache's
//!   documented minimum (`rbac_first_delay_ms`, 30 minutes; the cache lasts up to 2 hours for an
//!   app in use, docs/microsoft-365.md §3.5), and the default deadline is `rbac_deadline_seconds`.
//!
//! The probe secret is removed when the check ends, whatever the outcome. Removal is idempotent
//! and looks for the secret by its display name too, so a crash between Microsoft's `addPassword`
//! and mailscope's write cannot leak it: the next run (or the final one) removes it.
//!
//! No pooled connection (and no transaction) is held while Microsoft is called: a run takes a
//! connection for each short read or write and gives it back before the next call, so checks
//! waiting on a slow Exchange or Graph never starve the API or other tenants' jobs of the pool.
//! Holding one across the calls never protected anything (each statement committed on its own);
//! the writes that follow the calls are fenced by their own conditions on what may change
//! meanwhile:
//! - new expectations (`revision` moves on): `save_progress`, and so `finish_with`'s single
//!   transaction of verdict, policies in force and callback, writes only for the revision the
//!   run read; otherwise the run's observations are dropped and the check runs again at once;
//! - a cancel (`cancel_requested`): `save_progress` does not keep such a check running, so the
//!   next run removes the probe secret and ends it `cancelled`;
//! - the check ended elsewhere (another worker after a lapsed lease): `save_progress` and
//!   `checks::finish` change only a `queued` or `running` check, so a final state is never
//!   overwritten.
//!
//! The probe-secret bookkeeping (`set_probe`, `clear_probe`) is by check id alone, as it always
//! was: a secret recorded on a check that ended meanwhile is removed by the next run, which finds
//! the check final, or by the sweep.
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use crate::domain::credential::ManagementCredential;
use crate::domain::propagation::{self as rules, Access, Expectation};
use crate::domain::rbac::unscoped_mailbox_grants;
use crate::m365::graph::MailboxProbe;
use crate::m365::graph::batch::BatchRequest;
use crate::m365::{ErrorKind, TenantContext, TenantHandle};
use crate::provisioning::checks::{
    CheckJob, probe_secret_name, remove_named_secrets, remove_probe_secret,
};
use crate::provisioning::rbac::{entra_grants, rows_granting};
use crate::provisioning::tenants::handle_for;
use crate::provisioning::{Error, Services};
use crate::queue::job::Job;
use crate::queue::worker::{JobContext, Outcome};
use crate::store::access_policies::AccessPolicyRecord;
use crate::store::propagation_checks::{
    self as checks, CheckRecord, CheckState, Mechanism, Progress, Stage,
};
use crate::store::rbac_restrictions::RbacRestrictionRecord;
use crate::store::{self};

/// Permission prefix → the harmless read it allows.
const READS: &[(&str, MailboxProbe)] = &[
    ("Mail.Read", MailboxProbe::Messages),
    ("MailboxSettings.Read", MailboxProbe::MailboxSettings),
    ("Calendars.Read", MailboxProbe::Calendars),
    ("Contacts.Read", MailboxProbe::Contacts),
];

/// The harmless read matching an app's permissions, if it has one (a send-only app has none).
pub fn harmless_read(permissions: &[String]) -> Option<MailboxProbe> {
    READS.iter().find_map(|(prefix, probe)| {
        permissions
            .iter()
            .any(|p| p.starts_with(prefix))
            .then_some(*probe)
    })
}

/// The permission prefix whose role a probe's token must carry.
fn probe_role(probe: MailboxProbe) -> &'static str {
    READS
        .iter()
        .find(|(_, p)| *p == probe)
        .map_or("Mail.Read", |(prefix, _)| prefix)
}

type Step<T> = Result<T, Error>;

/// A failure that is mailscope's own (a sealed secret that does not open, a malformed id).
fn internal(e: impl std::fmt::Display) -> Error {
    Error::internal(anyhow::anyhow!("{e}"))
}

impl Job for CheckJob {
    type Context = Services;

    /// Run one step of the check. A failure's outcome comes from [`Error::job_outcome`]:
    /// throttling waits for `Retry-After` without counting a failure.
    async fn run(self, services: &Services, ctx: &JobContext) -> Outcome {
        let check_id = self.check_id;
        let e = match step(services, ctx, check_id).await {
            Ok(o) => return o,
            Err(e) => e,
        };
        let outcome = e.job_outcome();
        let gives_up = match &outcome {
            Outcome::Retry(_) => ctx.job.failures + 1 >= ctx.job.max_failures,
            Outcome::Fail(_) => true,
            _ => false,
        };
        if gives_up {
            // The queue gives up after this: end the check and take the probe secret back.
            let why = e.to_string();
            if let Err(c) = end(services, check_id, CheckState::Failed, Some(&why)).await {
                tracing::warn!(check = %check_id, error = %c, "could not end a failed check cleanly");
            }
            return Outcome::Fail(why);
        }
        outcome
    }
}

/// End a check out of band (failure): remove the probe secret, then record the state.
async fn end(
    services: &Services,
    check_id: Uuid,
    final_state: CheckState,
    reason: Option<&str>,
) -> Step<()> {
    let (check, tenant) = {
        let db = services.db().await?;
        let Some(check) = checks::get_by_id(&db, check_id).await? else {
            return Ok(());
        };
        let tenant = store::tenants::get(&db, check.tenant_id).await?;
        (check, tenant)
    };
    if let Some(tenant) = tenant {
        let handle = handle_for(services, &tenant)?;
        remove_probe_secret(services, &handle, &check).await?;
    }
    let db = services.db().await?;
    Ok(checks::finish(&db, check_id, final_state, reason).await?)
}

fn summary(check: &CheckRecord, state: CheckState) -> serde_json::Value {
    serde_json::json!({"check_id": check.id, "state": state.as_str()})
}

async fn step(services: &Services, ctx: &JobContext, check_id: Uuid) -> Step<Outcome> {
    let (check, tenant) = {
        let db = services.db().await?;
        let Some(check) = checks::get_by_id(&db, check_id).await? else {
            return Ok(Outcome::Fail(format!("check {check_id} no longer exists")));
        };
        let Some(tenant) = store::tenants::get(&db, check.tenant_id).await? else {
            return Ok(Outcome::Fail("the tenant is no longer registered".into()));
        };
        (check, tenant)
    };
    let handle = handle_for(services, &tenant)?;
    if check.is_final() {
        // Ended elsewhere; make sure nothing is left behind.
        remove_probe_secret(services, &handle, &check).await?;
        return Ok(Outcome::Succeeded(summary(&check, check.state)));
    }
    if check.cancel_requested {
        remove_probe_secret(services, &handle, &check).await?;
        let db = services.db().await?;
        checks::finish(
            &db,
            check.id,
            CheckState::Cancelled,
            Some("cancelled on request"),
        )
        .await?;
        return Ok(if ctx.job.cancel_requested {
            Outcome::Cancelled
        } else {
            Outcome::Succeeded(summary(&check, CheckState::Cancelled))
        });
    }
    let now = Utc::now();
    let mut exps = check.expectations.clone();
    if now >= check.deadline {
        remove_probe_secret(services, &handle, &check).await?;
        let pending: Vec<String> = exps
            .iter()
            .filter(|e| !e.is_met())
            .map(|e| {
                format!(
                    "{} expected {}, last seen {}",
                    e.mailbox,
                    e.expected.as_str(),
                    e.last_observed.map_or("nothing", Access::as_str)
                )
            })
            .collect();
        let reason = format!(
            "the deadline passed before the change was seen in force: {}",
            pending.join("; ")
        );
        return finish_with(
            services,
            &check,
            Progress {
                state: CheckState::TimedOut,
                stage: Stage::Done,
                verified_by: None,
                expectations: &exps,
                rounds: check.rounds,
                reason: Some(&reason),
                result: None,
                propagation_seconds: None,
            },
        )
        .await;
    }

    let live = live_target(services, &check).await?;
    if check.stage == Stage::Configuration {
        let (problems, unproven) = match check.mechanism {
            Mechanism::AccessPolicy => {
                access_policy_verdicts(services, &handle, &check, &mut exps, now).await?
            }
            Mechanism::Rbac => (
                rbac_verdicts(services, &handle, &check, &mut exps, now).await?,
                false,
            ),
        };
        if !problems.is_empty() {
            let reason = problems.join("; ");
            return end_on_exchange_word(
                services,
                &handle,
                &check,
                &exps,
                CheckState::Misconfigured,
                None,
                Some(&reason),
            )
            .await;
        }
        if unproven {
            // Nothing can show the restriction at work (every mailbox is in the app's scopes):
            // say so rather than claim Graph proved it.
            let reason = "the restriction was not verified in Graph: no mailbox outside the app's scopes was found to observe a denial (add a canary mailbox to the tenant or the policy)";
            return end_on_exchange_word(
                services,
                &handle,
                &check,
                &exps,
                CheckState::Succeeded,
                Some("exchange_test"),
                Some(reason),
            )
            .await;
        }
        if live.is_none() {
            return end_on_exchange_word(
                services,
                &handle,
                &check,
                &exps,
                CheckState::Succeeded,
                Some("exchange_test"),
                None,
            )
            .await;
        }
        let settings = &services.settings.propagation;
        let delay = match check.mechanism {
            Mechanism::AccessPolicy => settings.backoff().delay(0),
            // Graph cannot show an RBAC change before the permission cache's documented minimum.
            Mechanism::Rbac => std::time::Duration::from_millis(settings.rbac_first_delay_ms),
        };
        let db = services.db().await?;
        let saved = checks::save_progress(
            &db,
            check.id,
            check.revision,
            &Progress {
                state: CheckState::Running,
                stage: Stage::Live,
                verified_by: None,
                expectations: &exps,
                rounds: 0,
                reason: None,
                result: None,
                propagation_seconds: None,
            },
        )
        .await?;
        return Ok(reschedule(now, delay, &check, saved));
    }

    // Stage 2: live.
    let Some((probe, object_id)) = live else {
        // The app stopped being one mailscope manages with a harmless read.
        return end_on_exchange_word(
            services,
            &handle,
            &check,
            &exps,
            CheckState::Succeeded,
            Some("exchange_test"),
            None,
        )
        .await;
    };
    let secret = ensure_probe_secret(services, &handle, &check, &object_id).await?;
    let as_app = services.m365.tenant(TenantContext {
        tenant_id: check.tenant_id.to_string(),
        endpoints: handle.context().endpoints.clone(),
        credential: ManagementCredential::ClientSecret {
            client_id: check.app_id.to_string(),
            client_secret: secret,
        },
    });
    // Entra's eventual consistency (docs/microsoft-365.md §8.4): the probe secret is ours and
    // was valid when added, so "invalid client secret" means not replicated yet. For an access
    // policy (which constrains the app's Entra grant), a token issued before the consent
    // replicated lacks the read permission and would read as a denial everywhere: it is replaced
    // (bounded) until it carries it. Under RBAC the grant is Exchange's, not in the token.
    as_app.credential_is_new();
    if check.mechanism == Mechanism::AccessPolicy {
        let role = probe_role(probe);
        as_app
            .token_with_role(
                crate::m365::TokenResource::Graph,
                &|r: &str| r.starts_with(role),
                role,
            )
            .await?;
    }
    let pending: Vec<usize> = (0..exps.len()).filter(|i| !exps[*i].is_met()).collect();
    let requests = pending
        .iter()
        .map(|i| BatchRequest::get(i.to_string(), probe.path(&exps[*i].mailbox)))
        .collect();
    let answers = as_app.graph().batch(requests).await?;
    let seen_at = Utc::now();
    let required = u32::try_from(check.required_matches).unwrap_or(1);
    for a in answers {
        let Some(e) = a.id.parse::<usize>().ok().and_then(|i| exps.get_mut(i)) else {
            continue;
        };
        let seen = match a.error(probe.operation()) {
            None => Access::Granted,
            Some(x) if *x.kind() == ErrorKind::MailboxAccessDenied => Access::Denied,
            Some(x) => return Err(x.into()),
        };
        e.observe(seen, seen_at, required);
    }
    let rounds = check.rounds.saturating_add(1);
    if rules::all_met(&exps) {
        remove_probe_secret(services, &handle, &check).await?;
        let seconds = rules::propagation_seconds(check.changed_at, &exps);
        // The verdict, the policies it puts in force and the callback commit together.
        return finish_with(
            services,
            &check,
            Progress {
                state: CheckState::Succeeded,
                stage: Stage::Done,
                verified_by: Some("graph"),
                expectations: &exps,
                rounds,
                reason: None,
                result: None,
                propagation_seconds: seconds,
            },
        )
        .await;
    }
    let settings = &services.settings.propagation;
    let delay = rules::next_delay(
        &settings.backoff(),
        u32::try_from(rounds).unwrap_or(u32::MAX),
        std::time::Duration::from_millis(settings.confirm_interval_ms),
        &exps,
    );
    let db = services.db().await?;
    let saved = checks::save_progress(
        &db,
        check.id,
        check.revision,
        &Progress {
            state: CheckState::Running,
            stage: Stage::Live,
            verified_by: None,
            expectations: &exps,
            rounds,
            reason: None,
            result: None,
            propagation_seconds: None,
        },
    )
    .await?;
    Ok(reschedule(now, delay, &check, saved))
}

/// Stage 1 for application access policies: `Test-ApplicationAccessPolicy` per expectation.
/// Returns the disagreements, explained in the policies' words, and whether the restriction
/// cannot be proven (no mailbox outside the app's scopes).
async fn access_policy_verdicts(
    services: &Services,
    handle: &TenantHandle,
    check: &CheckRecord,
    exps: &mut Vec<Expectation>,
    now: DateTime<Utc>,
) -> Step<(Vec<String>, bool)> {
    // The connection goes back to the pool at the end of this statement, before Exchange is asked.
    let records = app_policies(&services.db().await?, check).await?;
    let exo = handle.exchange();
    let app = check.app_id.to_string();
    let mut problems = Vec::new();
    // A restriction is only proven by a denial: without a mailbox that must be denied (no
    // canary, no out-of-scope mailbox), every answer would be "granted" whether or not the
    // policy is in force. Pick one outside the app's scopes, as Exchange judges it.
    let restricted = records.iter().any(|r| r.access_right == "RestrictAccess");
    let mut unproven = false;
    if restricted && !exps.iter().any(|e| e.expected == Access::Denied) {
        match denied_witness(&exo, &app, exps).await? {
            Some(mailbox) => exps.push(Expectation::new(&mailbox, Access::Denied)),
            None => unproven = true,
        }
    }
    for e in exps.iter_mut() {
        match exo.test_application_access_policy(&e.mailbox, &app).await {
            Err(x) if x.is_not_found() => problems.push(format!(
                "mailbox {} does not exist in the tenant",
                e.mailbox
            )),
            Err(x) => return Err(x.into()),
            Ok(c) => match c.granted() {
                None => problems.push(format!(
                    "Exchange answered neither Granted nor Denied for mailbox {}",
                    e.mailbox
                )),
                Some(g) => {
                    let seen = Access::from_granted(g);
                    e.last_observed = Some(seen);
                    e.last_observed_at = Some(now);
                    if seen != e.expected {
                        problems.push(explain(&app, e, &records));
                    }
                }
            },
        }
    }
    Ok((problems, unproven))
}

/// Stage 1 for RBAC for Applications: `Test-ServicePrincipalAuthorization -Resource` per
/// expectation (it bypasses the permission cache, docs/microsoft-365.md §3.1, docs/microsoft-365.md §3.5): a mailbox is granted
/// when a role assignment for one of the restriction's permissions has it in scope. An Entra
/// mailbox grant left beside the restriction reaches every mailbox whatever the scope (the union
/// trap, docs/microsoft-365.md §3.3), so a check expecting a denial reports it instead of waiting for Graph in vain.
async fn rbac_verdicts(
    services: &Services,
    handle: &TenantHandle,
    check: &CheckRecord,
    exps: &mut [Expectation],
    now: DateTime<Utc>,
) -> Step<Vec<String>> {
    let app = check.app_id.to_string();
    // The connection goes back to the pool at the end of this statement, before Exchange is asked.
    let restrictions: Vec<RbacRestrictionRecord> =
        store::rbac_restrictions::all(&services.db().await?, check.tenant_id)
            .await?
            .into_iter()
            .filter(|r| r.app_id.eq_ignore_ascii_case(&app))
            .collect();
    let Some(first) = restrictions.first() else {
        return Ok(vec![format!(
            "mailscope has no RBAC restriction for app {app}, so nothing restricts it through RBAC (POST /rbac-restrictions)"
        )]);
    };
    let sp = first.service_principal_object_id.clone();
    let mut permissions: Vec<String> = restrictions
        .iter()
        .flat_map(|r| r.permissions.iter().cloned())
        .collect();
    permissions.sort();
    permissions.dedup();
    let exo = handle.exchange();
    let mut problems = Vec::new();
    for e in exps.iter_mut() {
        match exo
            .test_service_principal_authorization(&sp, Some(&e.mailbox))
            .await
        {
            Err(x) if x.is_not_found() => problems.push(format!(
                "Exchange found no mailbox {} (or no service principal pointer {sp} for app {app})",
                e.mailbox
            )),
            Err(x) => return Err(x.into()),
            Ok(rows) => {
                let granted =
                    rows_granting(&rows, &permissions).any(|r| r.in_scope() == Some(true));
                let seen = Access::from_granted(granted);
                e.last_observed = Some(seen);
                e.last_observed_at = Some(now);
                if seen != e.expected {
                    problems.push(explain_rbac(&app, e, &restrictions, &permissions));
                }
            }
        }
    }
    if exps.iter().any(|e| e.expected == Access::Denied) {
        let names: Vec<String> = entra_grants(&handle.graph(), &sp)
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let unscoped = unscoped_mailbox_grants(&names);
        if !unscoped.is_empty() {
            problems.push(format!(
                "app {app} still holds the Entra grants {} that reach every mailbox whatever its RBAC scope (the union trap, docs/microsoft-365.md §3.3): POST /rbac-restrictions/{}/enforce verifies the scope and then removes them",
                unscoped.join(", "),
                first.id
            ));
        }
    }
    Ok(problems)
}

/// Why `Test-ServicePrincipalAuthorization` differs from the expectation for one mailbox.
fn explain_rbac(
    app: &str,
    e: &Expectation,
    restrictions: &[RbacRestrictionRecord],
    permissions: &[String],
) -> String {
    let scopes: Vec<String> = restrictions
        .iter()
        .map(|r| {
            r.scope_group_alias
                .clone()
                .or_else(|| r.recipient_filter.clone())
                .unwrap_or_else(|| r.scope_key.clone())
        })
        .collect();
    let (m, scopes, perms) = (&e.mailbox, scopes.join(" or "), permissions.join(", "));
    match e.expected {
        Access::Granted => format!(
            "Test-ServicePrincipalAuthorization shows mailbox {m} outside the RBAC scope of app {app} ({scopes}) for {perms}, expected granted: it is not a direct member of the scope (RBAC ignores nested members, docs/microsoft-365.md §3.4) or an assignment is missing"
        ),
        Access::Denied => format!(
            "Test-ServicePrincipalAuthorization shows mailbox {m} inside the RBAC scope of app {app} ({scopes}), expected denied: a role assignment reaches it, so the scope is wider than intended"
        ),
    }
}

/// Run again after `delay`, never past the deadline (so `timed_out` is reported on time); at
/// once when the expectations changed during this run.
fn reschedule(
    now: DateTime<Utc>,
    delay: std::time::Duration,
    check: &CheckRecord,
    saved: bool,
) -> Outcome {
    let at = if saved {
        (now + chrono::Duration::from_std(delay).unwrap_or_default()).min(check.deadline)
    } else {
        Utc::now()
    };
    Outcome::Reschedule { at, payload: None }
}

/// End the check on Exchange's word alone (stage 1, or an app Graph cannot be asked as): take the
/// probe secret back first, then record the final state.
#[allow(clippy::too_many_arguments)]
async fn end_on_exchange_word(
    services: &Services,
    handle: &TenantHandle,
    check: &CheckRecord,
    exps: &[Expectation],
    state: CheckState,
    verified_by: Option<&str>,
    reason: Option<&str>,
) -> Step<Outcome> {
    remove_probe_secret(services, handle, check).await?;
    finish_with(
        services,
        check,
        Progress {
            state,
            stage: Stage::Done,
            verified_by,
            expectations: exps,
            rounds: check.rounds,
            reason,
            result: None,
            propagation_seconds: None,
        },
    )
    .await
}

/// Record the verdict. Its one transaction is opened only now, after every Microsoft call.
async fn finish_with(services: &Services, check: &CheckRecord, p: Progress<'_>) -> Step<Outcome> {
    let result = summary(check, p.state);
    // Only a change seen in Graph puts policies in force (Exchange's word alone does not).
    let in_force = p.state == CheckState::Succeeded && p.verified_by == Some("graph");
    // The verdict, the policies it puts in force and its callback commit together: a callback
    // queued outside the verdict's transaction could be claimed by a worker before its delivery
    // row exists (then failed with no attempt), and a user polling must never see a verdict
    // without the policies it puts in force.
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    let saved = checks::save_progress(
        &tx,
        check.id,
        check.revision,
        &Progress {
            result: Some(&result),
            ..p
        },
    )
    .await?;
    if !saved {
        // The expectations changed while this run looked: look again at once with the new ones.
        return Ok(Outcome::Reschedule {
            at: Utc::now(),
            payload: None,
        });
    }
    notify(services, &tx, check, &result).await?;
    if in_force {
        mark_in_force(&tx, check).await?;
    }
    tx.commit().await?;
    Ok(Outcome::Succeeded(result))
}

/// Queue the signed `propagation_check.completed` callback, if the check asked for one. The URL
/// is validated again (settings may have changed since the request); a refused URL is logged.
async fn notify(
    services: &Services,
    db: &impl GenericClient,
    check: &CheckRecord,
    result: &serde_json::Value,
) -> Step<()> {
    let Some(raw) = &check.callback_url else {
        return Ok(());
    };
    let url = match crate::webhooks::validate_callback_url(raw, &services.settings.webhooks) {
        Ok(u) => u,
        Err(why) => {
            tracing::warn!(check = %check.id, %why, "callback URL refused; no callback sent");
            return Ok(());
        }
    };
    let payload = serde_json::json!({
        "check_id": check.id,
        "tenant_id": check.tenant_id,
        "app_id": check.app_id,
        "result": result,
    });
    // An error fails the transaction with the verdict (the run retries): a failed statement
    // aborts it, and committing would silently drop the verdict.
    crate::webhooks::enqueue_delivery(
        db,
        check.tenant_id,
        check.id,
        "propagation_check.completed",
        &url,
        payload,
    )
    .await?;
    Ok(())
}

/// Mailboxes sampled when looking for one the app must be denied, and how many are tested.
const WITNESS_SAMPLE: u32 = 50;
const WITNESS_TESTS: usize = 5;

/// A user mailbox outside the check's expectations that Exchange says the app is denied (so a
/// restriction in force must show as a denial in Graph too), if one is found among a sample.
async fn denied_witness(
    exo: &crate::m365::exchange::ExchangeClient,
    app: &str,
    exps: &[Expectation],
) -> Step<Option<String>> {
    let mailboxes = exo.list_mailboxes(Some(WITNESS_SAMPLE)).await?;
    let candidates = mailboxes
        .iter()
        .filter(|m| m.recipient_type_details.as_deref() == Some("UserMailbox"))
        .filter_map(|m| m.primary_smtp_address.as_deref())
        .map(str::to_ascii_lowercase)
        .filter(|a| !exps.iter().any(|e| e.mailbox.eq_ignore_ascii_case(a)))
        .take(WITNESS_TESTS);
    for mailbox in candidates {
        match exo.test_application_access_policy(&mailbox, app).await {
            Ok(c) if c.granted() == Some(false) => return Ok(Some(mailbox)),
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// The app's policies known to mailscope (for explaining a misconfiguration).
async fn app_policies(
    db: &deadpool_postgres::Object,
    check: &CheckRecord,
) -> Step<Vec<AccessPolicyRecord>> {
    let app = check.app_id.to_string();
    Ok(store::access_policies::all(db, check.tenant_id)
        .await?
        .into_iter()
        .filter(|r| r.app_id == crate::domain::access::ALL_APPS || r.app_id == app)
        .collect())
}

/// Why Exchange's answer for one mailbox differs from the expectation, in the policies' words.
fn explain(app: &str, e: &Expectation, records: &[AccessPolicyRecord]) -> String {
    let scopes = |right: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r.access_right == right)
            .map(|r| {
                r.scope_alias
                    .clone()
                    .unwrap_or_else(|| r.scope_address.clone())
            })
            .collect()
    };
    let (restrict, deny) = (scopes("RestrictAccess"), scopes("DenyAccess"));
    let m = &e.mailbox;
    match e.expected {
        Access::Granted if !restrict.is_empty() => format!(
            "Exchange denies app {app} mailbox {m}, expected granted: mailbox {m} is not a member of {} (the app's RestrictAccess scope)",
            restrict.join(" or ")
        ),
        Access::Granted if !deny.is_empty() => format!(
            "Exchange denies app {app} mailbox {m}, expected granted: a DenyAccess policy covers it ({})",
            deny.join(", ")
        ),
        Access::Granted => format!(
            "Exchange denies app {app} mailbox {m}, expected granted: a policy mailscope does not know denies it (POST /sync to import the tenant's policies)"
        ),
        Access::Denied if restrict.is_empty() && deny.is_empty() => format!(
            "Exchange grants app {app} mailbox {m}, expected denied: the app has no access policy, so it reaches every mailbox (rule 4)"
        ),
        Access::Denied if restrict.is_empty() => format!(
            "Exchange grants app {app} mailbox {m}, expected denied: mailbox {m} is not in the DenyAccess scope ({})",
            deny.join(", ")
        ),
        Access::Denied => format!(
            "Exchange grants app {app} mailbox {m}, expected denied: mailbox {m} is a member of {} (the app's RestrictAccess scope)",
            restrict.join(" or ")
        ),
    }
}

/// For an app mailscope created with a harmless read: the read and the registration's object id.
async fn live_target(
    services: &Services,
    check: &CheckRecord,
) -> Step<Option<(MailboxProbe, String)>> {
    let db = services.db().await?;
    let Some(key) = store::applications::key_of_app(&db, check.tenant_id, check.app_id).await?
    else {
        return Ok(None);
    };
    let Some(app) = store::applications::get(&db, check.tenant_id, &key).await? else {
        return Ok(None);
    };
    if app.origin != "created" || app.state != "ready" {
        return Ok(None);
    }
    let Some(object_id) = app.application_object_id else {
        return Ok(None);
    };
    Ok(harmless_read(&app.permissions).map(|p| (p, object_id.to_string())))
}

/// The check's probe secret: the stored one, else a new one added to the app (recorded sealed
/// before it is used).
async fn ensure_probe_secret(
    services: &Services,
    handle: &TenantHandle,
    check: &CheckRecord,
    object_id: &str,
) -> Step<SecretString> {
    if let Some(sealed) = &check.probe_secret_sealed {
        let plain = services
            .cipher
            .open(check.id.as_bytes(), sealed)
            .map_err(internal)?;
        let text = String::from_utf8(plain).map_err(internal)?;
        return Ok(SecretString::from(text));
    }
    let graph = handle.graph();
    // Left over by a run that crashed after addPassword and before recording it.
    remove_named_secrets(handle, object_id, check.id).await?;
    // Short-lived: it cannot outlive the check by more than an hour even if every removal fails.
    let end = (check.deadline + chrono::Duration::hours(1)).to_rfc3339();
    let p = graph
        .add_password(object_id, &probe_secret_name(check.id), Some(&end))
        .await?;
    let key_id = p.key_id.parse::<Uuid>().map_err(internal)?;
    let sealed = services
        .cipher
        .seal(
            check.id.as_bytes(),
            p.secret_text.expose_secret().as_bytes(),
        )
        .map_err(internal)?;
    let db = services.db().await?;
    checks::set_probe(&db, check.id, key_id, &sealed, services.cipher.key_id()).await?;
    Ok(p.secret_text)
}

/// A check that saw the change in Graph puts the app's pending policies in force.
async fn mark_in_force(db: &impl GenericClient, check: &CheckRecord) -> Step<()> {
    if check.mechanism == Mechanism::Rbac {
        db.execute(
            "UPDATE rbac_restrictions SET state = 'in_force', updated_at = now()
             WHERE tenant_id = $1 AND app_id = $2 AND state = 'pending_propagation'
               AND updated_at <= $3",
            &[
                &check.tenant_id,
                &check.app_id.to_string(),
                &check.changed_at,
            ],
        )
        .await?;
        return Ok(());
    }
    db.execute(
        "UPDATE access_policies SET state = 'in_force', updated_at = now()
         WHERE tenant_id = $1 AND app_id = $2 AND state = 'pending_propagation'
           AND updated_at <= $3",
        &[
            &check.tenant_id,
            &check.app_id.to_string(),
            &check.changed_at,
        ],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_harmless_read_follows_the_permissions() {
        let p = |v: &[&str]| harmless_read(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(p(&["Mail.ReadBasic.All"]), Some(MailboxProbe::Messages));
        assert_eq!(
            p(&["Mail.Send", "Calendars.ReadWrite"]),
            Some(MailboxProbe::Calendars)
        );
        assert_eq!(p(&["Contacts.Read"]), Some(MailboxProbe::Contacts));
        assert_eq!(
            p(&["MailboxSettings.Read"]),
            Some(MailboxProbe::MailboxSettings)
        );
        // Send-only: no read that would prove anything without side effects.
        assert_eq!(p(&["Mail.Send"]), None);
        assert_eq!(p(&[]), None);
    }
}
