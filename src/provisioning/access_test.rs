//! Access tests: may an app reach a mailbox? Exchange's `Test-ApplicationAccessPolicy` and
//! mailscope's own evaluation of the four rules (docs/microsoft-365.md §2.3), side by side, with the most
//! likely reason when they differ; and, for both mechanisms together, the effective verdict per
//! mailbox permission: the app's Entra grants, the access policies' decision and its RBAC
//! assignments as `Test-ServicePrincipalAuthorization -Resource` reports them (docs/microsoft-365.md §3.1, §3.3).
use std::collections::BTreeSet;

use uuid::Uuid;

use super::access_policies::{check_app_id, same_app, scope_guid};
use super::scope_groups::recipient_object_id;
use super::{Error, Services, tenants};
use crate::domain::access::{self as rules, ALL_APPS, AccessDecision, GroupMembers, NestedGroups};
use crate::domain::rbac as rbac_rules;
use crate::m365::exchange::{AuthorizationRow, ExchangeClient, Recipient, Replication};
use crate::store::{self, access_policies::AccessPolicyRecord};

/// Most groups expanded when evaluating nested membership locally.
const MAX_GROUPS_EXPANDED: usize = 50;

/// Both verdicts for one app and mailbox.
#[derive(Debug, Clone)]
pub struct AccessTest {
    pub app_id: String,
    pub mailbox: String,
    pub mailbox_object_id: String,
    /// `AccessCheckResult` as Exchange reported it.
    pub access_check_result: Option<String>,
    pub exchange_granted: Option<bool>,
    /// mailscope's evaluation, nested groups counted transitively.
    pub local: AccessDecision,
    /// mailscope's ids of the policies that matched the app and the mailbox.
    pub matched_policies: Vec<Uuid>,
    pub agree: bool,
    /// Why the two differ, when they do.
    pub disagreement: Option<String>,
    /// Both mechanisms together.
    pub effective: Effective,
}

/// The effective access of one app to one mailbox, both mechanisms together.
#[derive(Debug, Clone, Default)]
pub struct Effective {
    /// Entra application permissions on mailbox data the app holds (tenant-wide).
    pub entra_mailbox_permissions: Vec<String>,
    /// Exchange has a service principal pointer for the app (without one, no RBAC applies).
    pub rbac_pointer: bool,
    /// `Test-ServicePrincipalAuthorization -Resource <mailbox>` rows.
    pub rbac_rows: Vec<AuthorizationRow>,
    pub permissions: Vec<PermissionVerdict>,
    /// Where mailscope's expectation from its RBAC restrictions differs from Exchange's.
    pub rbac_disagreement: Option<String>,
}

/// The verdict for one permission and what decided it.
#[derive(Debug, Clone)]
pub struct PermissionVerdict {
    pub permission: String,
    pub granted: bool,
    /// `entra_unrestricted` (an Entra grant no access policy restricts here: the union trap),
    /// `access_policy_allows`, `access_policy_denies`, `rbac_in_scope`, or `rbac_out_of_scope`.
    pub decided_by: &'static str,
}

/// Run the test for `app_id` (a client id) and `mailbox` (an address).
pub async fn run(
    services: &Services,
    tenant_id: Uuid,
    app_id: &str,
    mailbox: &str,
) -> Result<AccessTest, Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let mut errs = Vec::new();
    let app_id = check_app_id(app_id, &mut errs);
    let mailbox = mailbox.trim().to_ascii_lowercase();
    if mailbox.is_empty() {
        errs.push(crate::domain::field_error::FieldError::new(
            "mailbox",
            "name a mailbox address",
        ));
    }
    if !errs.is_empty() {
        return Err(Error::Invalid(errs));
    }
    let exo = handle.exchange();
    let unknown_mailbox = || {
        Error::invalid(
            "mailbox",
            format!("no mailbox `{mailbox}` exists in the tenant"),
        )
    };
    let recipient = exo
        .get_recipient(&mailbox, Replication::Ignore)
        .await?
        .ok_or_else(unknown_mailbox)?;
    let mailbox_id = recipient_object_id(&recipient).ok_or_else(unknown_mailbox)?;
    let check = match exo.test_application_access_policy(&mailbox, &app_id).await {
        Err(e) if e.is_not_found() => return Err(unknown_mailbox()),
        r => r?,
    };

    let db = services.db().await?;
    let records: Vec<AccessPolicyRecord> = store::access_policies::all(&db, tenant_id)
        .await?
        .into_iter()
        .filter(|r| r.app_id == ALL_APPS || r.app_id.eq_ignore_ascii_case(&app_id))
        .collect();
    drop(db);
    let policies: Vec<rules::AccessPolicy> = records
        .iter()
        .map(|r| rules::AccessPolicy {
            app_id: r.app_id.clone(),
            scope_id: r.scope_object_id.clone(),
            access_right: r.right(),
        })
        .collect();
    let groups = expand_groups(
        &exo,
        records
            .iter()
            .filter(|r| r.scope_type.contains("Group"))
            .map(|r| r.scope_object_id.clone()),
    )
    .await?;
    let eval = |nested| {
        rules::evaluate_application_access(&app_id, &mailbox_id, &policies, &groups, nested)
    };
    let local = eval(NestedGroups::Transitive);
    let exchange_granted = check.granted();
    let agree = exchange_granted == Some(local.granted);
    let disagreement = if agree {
        None
    } else {
        Some(
            explain(
                &exo,
                &app_id,
                &records,
                exchange_granted,
                eval(NestedGroups::DirectOnly).granted,
            )
            .await?,
        )
    };
    let effective = effective(
        services,
        &handle,
        tenant_id,
        &app_id,
        &mailbox,
        &mailbox_id,
        &local,
    )
    .await?;
    let matched_policies = local.matched.iter().map(|i| records[*i].id).collect();
    Ok(AccessTest {
        app_id,
        mailbox,
        mailbox_object_id: mailbox_id,
        access_check_result: check.access_check_result.clone(),
        exchange_granted,
        local,
        matched_policies,
        agree,
        disagreement,
        effective,
    })
}

/// Both mechanisms together for every mailbox permission the app holds either way.
async fn effective(
    services: &Services,
    handle: &crate::m365::TenantHandle,
    tenant_id: Uuid,
    app_id: &str,
    mailbox: &str,
    mailbox_id: &str,
    policy: &AccessDecision,
) -> Result<Effective, Error> {
    let (graph, exo) = (handle.graph(), handle.exchange());
    let Some(sp) = graph.service_principal_by_app_id(app_id).await? else {
        return Ok(Effective::default());
    };
    let entra: Vec<String> = super::rbac::entra_grants(&graph, &sp.id)
        .await?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let entra_mailbox = rbac_rules::unscoped_mailbox_grants(&entra);
    let pointer = exo
        .get_service_principal(app_id, Replication::Ignore)
        .await?
        .and_then(|p| p.object_id)
        .filter(|o| o.eq_ignore_ascii_case(&sp.id));
    let rows = match &pointer {
        Some(oid) => {
            exo.test_service_principal_authorization(oid, Some(mailbox))
                .await?
        }
        None => Vec::new(),
    };
    let rbac_in_scope: BTreeSet<String> = rows
        .iter()
        .filter(|r| r.in_scope() == Some(true))
        .flat_map(|r| r.granted_permissions.iter().map(|p| p.trim().to_string()))
        .collect();
    let rbac_any: BTreeSet<String> = rows
        .iter()
        .flat_map(|r| r.granted_permissions.iter().map(|p| p.trim().to_string()))
        .collect();
    let mut names: BTreeSet<String> = entra_mailbox.iter().cloned().collect();
    names.extend(rbac_any.iter().cloned());
    let permissions = names
        .into_iter()
        .map(|p| {
            let access =
                rules::authorize_mailbox_call(&[p.as_str()], &entra, policy, &rbac_in_scope);
            let (granted, decided_by) = match access {
                rules::MailboxAccess::Granted {
                    via: rules::GrantPath::Rbac,
                    ..
                } => (true, "rbac_in_scope"),
                rules::MailboxAccess::Granted { .. }
                    if rules::policy_restricts(&p)
                        && policy.rule != rules::AccessRule::NoPolicy =>
                {
                    (true, "access_policy_allows")
                }
                rules::MailboxAccess::Granted { .. } => (true, "entra_unrestricted"),
                rules::MailboxAccess::DeniedByPolicy { .. } => (false, "access_policy_denies"),
                rules::MailboxAccess::NoPermission => (false, "rbac_out_of_scope"),
            };
            PermissionVerdict {
                permission: p,
                granted,
                decided_by,
            }
        })
        .collect();
    let rbac_disagreement =
        rbac_disagreement(services, &exo, tenant_id, app_id, mailbox_id, &rows).await?;
    Ok(Effective {
        entra_mailbox_permissions: entra_mailbox,
        rbac_pointer: pointer.is_some(),
        rbac_rows: rows,
        permissions,
        rbac_disagreement,
    })
}

/// mailscope's expectation from its scope-group restrictions (direct members are in scope,
/// docs/microsoft-365.md §3.4) against `Test-ServicePrincipalAuthorization`'s `InScope`.
async fn rbac_disagreement(
    services: &Services,
    exo: &ExchangeClient,
    tenant_id: Uuid,
    app_id: &str,
    mailbox_id: &str,
    rows: &[AuthorizationRow],
) -> Result<Option<String>, Error> {
    let db = services.db().await?;
    let restrictions: Vec<_> = store::rbac_restrictions::all(&db, tenant_id)
        .await?
        .into_iter()
        .filter(|r| r.app_id.eq_ignore_ascii_case(app_id))
        .collect();
    drop(db);
    let mut notes = Vec::new();
    for r in restrictions {
        let Some(group) = &r.scope_object_id else {
            continue;
        };
        let expected = exo
            .get_distribution_group_members(group, Replication::Ignore)
            .await?
            .iter()
            .filter_map(recipient_object_id)
            .any(|m| m.eq_ignore_ascii_case(mailbox_id));
        for p in &r.permissions {
            let seen = rows.iter().any(|row| {
                row.in_scope() == Some(true)
                    && row.granted_permissions.iter().any(|g| g.trim() == p)
            });
            if seen != expected {
                notes.push(format!(
                    "{p}: mailscope expects the mailbox {} scope group `{}` (direct members), Exchange says {}",
                    if expected { "in" } else { "outside" },
                    r.scope_group_alias.clone().unwrap_or_default(),
                    if seen { "in scope" } else { "not in scope (a missing assignment or pointer, or a change not yet replicated)" }
                ));
            }
        }
    }
    Ok(if notes.is_empty() {
        None
    } else {
        Some(notes.join("; "))
    })
}

/// Direct members (object ids) of `roots` and of groups nested in them, read from Exchange.
async fn expand_groups(
    exo: &ExchangeClient,
    roots: impl IntoIterator<Item = String>,
) -> Result<GroupMembers, Error> {
    let mut members = GroupMembers::new();
    let mut queue: Vec<String> = roots.into_iter().collect();
    while let Some(g) = queue.pop() {
        if members.contains_key(&g) || members.len() >= MAX_GROUPS_EXPANDED {
            continue;
        }
        let list: Vec<Recipient> = exo
            .get_distribution_group_members(&g, Replication::Ignore)
            .await?;
        let mut ids = Vec::new();
        for r in list {
            let Some(id) = recipient_object_id(&r) else {
                continue;
            };
            if r.recipient_type_details
                .as_deref()
                .is_some_and(|t| t.contains("Group"))
            {
                queue.push(id.clone());
            }
            ids.push(id);
        }
        members.insert(g, ids);
    }
    Ok(members)
}

/// Why Exchange and mailscope's evaluation differ, most likely cause first.
async fn explain(
    exo: &ExchangeClient,
    app_id: &str,
    records: &[AccessPolicyRecord],
    exchange_granted: Option<bool>,
    direct_only_granted: bool,
) -> Result<String, Error> {
    let Some(exchange_granted) = exchange_granted else {
        return Ok(
            "Exchange answered neither Granted nor Denied, so there is nothing to compare".into(),
        );
    };
    let tenant: BTreeSet<(String, String)> = exo
        .list_application_access_policies()
        .await?
        .iter()
        .filter(|p| same_app(p, app_id) || p.app_id.as_deref() == Some(ALL_APPS))
        .filter_map(|p| Some((scope_guid(p)?, p.access_right.clone()?)))
        .collect();
    let known: BTreeSet<(String, String)> = records
        .iter()
        .map(|r| (r.scope_object_id.clone(), r.access_right.clone()))
        .collect();
    if tenant != known {
        let only_tenant = tenant.difference(&known).count();
        let only_known = known.difference(&tenant).count();
        return Ok(format!(
            "the tenant's policies for this app differ from mailscope's records ({only_tenant} only in the tenant, {only_known} only in mailscope); POST /sync to import the tenant's state"
        ));
    }
    if direct_only_granted == exchange_granted {
        return Ok("Exchange appears to count only direct members of nested groups, while mailscope counted nested members (whether nesting counts is unverified, docs/microsoft-365.md §2.5); add the mailboxes to the scope group directly".into());
    }
    Ok("mailscope's policies match the tenant's, yet the verdicts differ: a change made moments ago may not have reached Exchange yet; run the test again in a few minutes".into())
}
