//! Scope groups: the mail-enabled security groups whose members an app may reach (reference
//! docs/microsoft-365.md §2.4, §4), their use cases (ensure, add and remove members, read live, delete), and the
//! recipient rules shared by scope groups, access policies and sync.
//!
//! Writes look the group up in Exchange before creating it (so a retry after a crash between
//! Exchange's create and mailscope's write adopts the group instead of failing or duplicating).
//! Members are checked before Exchange is changed, many at once: one filtered `Get-Recipient` per
//! 500 addresses (docs/microsoft-365.md §4.4), then the whole list is set in one call.
//!
//! No pooled connection is held while Microsoft is called. Writers of one group first queue in
//! this process (`Services::key_locks`, so concurrent requests cost neither connections nor
//! Microsoft calls), read the record in one short statement, talk to Microsoft, then write in a
//! short transaction under the group's advisory lock, which serialises them with other replicas
//! and with `/sync`; a record deleted or replaced meanwhile makes the write a conflict to retry.

use std::collections::{BTreeSet, HashMap};

use chrono::Utc;
use futures_util::StreamExt;
use uuid::Uuid;

use super::key_lease::KeyLease;
use super::{Actor, Change, Ensured, Error, Rejection, Services, audit, tenants};
use crate::domain::address::is_address;
use crate::domain::field_error::FieldError;
use crate::m365::exchange::{
    DistributionGroup, ExchangeClient, NewSecurityGroup, Recipient, Replication,
    SetDistributionGroup,
};
use crate::m365::{ErrorKind, M365Error};
use crate::store::{
    self,
    scope_groups::{GroupOrigin, Membership, ScopeGroupRecord},
};

/// The lease namespace of one tenant's access policies (see [`policy_lease`]).
pub const POLICY_LOCK: &str = "access_policies";

/// The lease on the tenant's access policies (`key_lease`; it queues in this process first, so
/// fifty concurrent policy writes on one tenant cost no connections while they wait). Every writer
/// of them takes it, as do sync and scope-group deletion, always before any scope group's turn
/// (one order): no policy is created, replaced or removed, on any replica, while another writer is
/// between reading the tenant and recording what it did there.
pub async fn policy_lease(services: &Services, tenant_id: Uuid) -> Result<KeyLease, Error> {
    KeyLease::take(services, POLICY_LOCK, &tenant_id.to_string()).await
}

/// Queue behind other writers of this group in this process, before taking a pooled connection
/// or calling Microsoft (see `locks`).
pub async fn take_turn(
    services: &Services,
    tenant_id: Uuid,
    alias: &str,
) -> tokio::sync::OwnedMutexGuard<()> {
    services
        .key_locks
        .lock(format!("scope_group:{tenant_id}:{alias}"))
        .await
}

/// Serialise writers of one scope group (natural key: tenant and alias) across replicas.
pub async fn lock_group(
    c: &impl deadpool_postgres::GenericClient,
    tenant_id: Uuid,
    alias: &str,
) -> Result<(), Error> {
    store::lock_key(c, "scope_group", &format!("{tenant_id}:{alias}")).await?;
    Ok(())
}

/// The id mailscope keys scopes by: the Entra object id, else Exchange's Guid; lower case.
pub fn recipient_object_id(r: &Recipient) -> Option<String> {
    r.external_directory_object_id
        .as_deref()
        .or(r.guid.as_deref())
        .filter(|s| !s.is_empty())
        .map(str::to_ascii_lowercase)
}

pub fn group_object_id(g: &DistributionGroup) -> Option<String> {
    g.external_directory_object_id
        .as_deref()
        .or(g.guid.as_deref())
        .filter(|s| !s.is_empty())
        .map(str::to_ascii_lowercase)
}

/// Every id a policy's `ScopeIdentityRaw` may name for this object (which one Exchange uses is
/// unverified, docs/microsoft-365.md §2.2).
pub fn ids_of(ext: Option<&str>, guid: Option<&str>) -> Vec<String> {
    [ext, guid]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

pub fn primary_address(r: &Recipient) -> Option<String> {
    r.primary_smtp_address
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(str::to_ascii_lowercase)
}

/// Why a recipient cannot be an application access policy scope (docs/microsoft-365.md §2.4), if it cannot.
pub fn scope_refusal(r: &Recipient) -> Option<String> {
    let t = r.recipient_type_details.as_deref().unwrap_or("unknown");
    // Eligibility is the domain's rule (the sandbox uses it too); only the wording is here.
    if crate::domain::access::policy_scope_allowed(t) {
        return (r.is_valid_security_principal == Some(false)).then(|| format!(
            "this {t} is not a valid security principal (IsValidSecurityPrincipal is false), so Exchange cannot use it as a policy scope"
        ));
    }
    let reason = match t {
        "SharedMailbox" | "RoomMailbox" | "EquipmentMailbox" => format!(
            "a {t} cannot be a policy scope on its own; put it in a scope group (PUT /scope-groups/{{alias}}) and use the group as the scope"
        ),
        "GroupMailbox" => "a Microsoft 365 group cannot be a policy scope; use a mail-enabled security group (a scope group)".into(),
        "MailUniversalDistributionGroup" | "DynamicDistributionGroup" => format!(
            "a distribution group ({t}) cannot be a policy scope; only mail-enabled security groups can (create one with PUT /scope-groups/{{alias}})"
        ),
        other => format!(
            "a recipient of type {other} cannot be a policy scope; only a user mailbox, a mail user or a mail-enabled security group can"
        ),
    };
    Some(reason)
}

pub async fn current_members(
    exo: &ExchangeClient,
    object_id: &str,
) -> Result<BTreeSet<String>, Error> {
    Ok(exo
        .get_distribution_group_members(object_id, Replication::Ignore)
        .await?
        .iter()
        .filter_map(primary_address)
        .collect())
}

/// Current members (primary SMTP addresses, lower case, sorted) as a list.
pub async fn current_members_of(
    exo: &ExchangeClient,
    object_id: &str,
) -> Result<Vec<String>, Error> {
    Ok(current_members(exo, object_id).await?.into_iter().collect())
}

/// Is this Microsoft failure possibly "the object already exists" (a create racing a crashed
/// earlier attempt)? Exchange reports a taken name as a generic task error.
pub fn maybe_exists(e: &M365Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::AlreadyExists | ErrorKind::InvalidParameter
    )
}

/// Most members one request may name (Exchange's `-Members` limit).
const MAX_MEMBERS: usize = 10_000;
/// Parallel `Get-Recipient -Identity` look-ups for addresses no filter found (possibly user
/// principal names); the connector's per-tenant limiter still applies.
const LOOKUP_CONCURRENCY: usize = 4;

/// The desired state of a scope group.
pub struct GroupSpec {
    /// Defaults to the alias.
    pub display_name: Option<String>,
    /// Addresses as given (UPN or any SMTP address of the recipient).
    pub members: Vec<String>,
    pub membership: Membership,
}

/// The outcome of adding members.
pub struct MembersAdded {
    /// Newly added (primary SMTP addresses).
    pub added: Vec<String>,
    /// Already members before this request.
    pub already_members: Vec<String>,
    pub group: ScopeGroupRecord,
}

/// An alias in the form mailscope keys groups by (lower case), if it is one: 1 to 64 letters,
/// digits, `-`, `_` or `.` (not at either end).
pub fn normalise_alias(alias: &str) -> Option<String> {
    let a = alias.trim().to_ascii_lowercase();
    let ok = !a.is_empty()
        && a.len() <= 64
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !a.starts_with('.')
        && !a.ends_with('.');
    ok.then_some(a)
}

/// Why a recipient should not be a scope-group member, if it should not.
pub fn member_refusal(r: &Recipient) -> Option<String> {
    match r.recipient_type_details.as_deref().unwrap_or("unknown") {
        "UserMailbox" | "SharedMailbox" | "RoomMailbox" | "EquipmentMailbox" | "MailUser" => None,
        "MailContact" => {
            Some("a mail contact has no mailbox in this tenant for an app to reach".into())
        }
        t if t.contains("Group") => Some(format!(
            "a group ({t}) cannot be added: whether policies count members of nested groups is unverified (docs/microsoft-365.md §2.5), so mailscope adds mailboxes directly"
        )),
        t => Some(format!(
            "a recipient of type {t} cannot be a scope-group member"
        )),
    }
}

/// Look up every (label, address) at once: filtered `Get-Recipient` calls by SMTP address
/// (docs/microsoft-365.md §4.4), then `Get-Recipient -Identity` only for the addresses no
/// recipient holds as an SMTP address (a user principal name may differ from all of them).
/// Invalid naming every unknown or unsuitable one. Returns the recipients in input order.
async fn resolve_members(
    exo: &ExchangeClient,
    wanted: Vec<(String, String)>,
) -> Result<Vec<Recipient>, Error> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let addresses: Vec<String> = wanted.iter().map(|(_, a)| a.clone()).collect();
    let found = exo
        .get_recipients_by_address(&addresses, Replication::Ignore)
        .await?;
    // Every SMTP address of every recipient found, lower case (Exchange keeps them unique).
    let mut by_address: HashMap<String, usize> = HashMap::new();
    for (i, r) in found.iter().enumerate() {
        let proxies = r.email_addresses.iter().filter_map(|a| {
            a.split_once(':')
                .filter(|(prefix, _)| prefix.eq_ignore_ascii_case("smtp"))
                .map(|(_, rest)| rest)
        });
        for a in proxies.chain(r.primary_smtp_address.as_deref()) {
            by_address.entry(a.to_ascii_lowercase()).or_insert(i);
        }
    }
    let mut looked_up: Vec<(String, String, Option<Recipient>)> = Vec::new();
    let mut unmatched: Vec<(usize, String)> = Vec::new();
    for (label, address) in wanted {
        let hit = by_address.get(&address).map(|&i| found[i].clone());
        if hit.is_none() {
            unmatched.push((looked_up.len(), address.clone()));
        }
        looked_up.push((label, address, hit));
    }
    let second: Vec<(usize, Result<Option<Recipient>, M365Error>)> =
        futures_util::stream::iter(unmatched)
            .map(|(i, address)| async move {
                (i, exo.get_recipient(&address, Replication::Ignore).await)
            })
            .buffered(LOOKUP_CONCURRENCY)
            .collect()
            .await;
    for (i, r) in second {
        looked_up[i].2 = r?;
    }
    let mut errs = Vec::new();
    let mut out = Vec::new();
    for (label, address, r) in looked_up {
        match r {
            None => errs.push(FieldError::new(
                label,
                format!("no recipient with the address {address} exists in the tenant"),
            )),
            Some(rec) => match member_refusal(&rec) {
                Some(why) => errs.push(FieldError::new(label, format!("{address}: {why}"))),
                None if primary_address(&rec).is_none() => errs.push(FieldError::new(
                    label,
                    format!("{address} has no primary SMTP address"),
                )),
                None => out.push(rec),
            },
        }
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(Error::Invalid(errs))
    }
}

/// Normalise and check addresses: lower case, deduplicated, each an address.
fn check_addresses(
    items: &[(String, String)],
    errs: &mut Vec<FieldError>,
) -> Vec<(String, String)> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    if items.len() > MAX_MEMBERS {
        errs.push(FieldError::new(
            "members",
            format!("at most {MAX_MEMBERS} members"),
        ));
        return out;
    }
    for (label, raw) in items {
        let a = raw.trim().to_ascii_lowercase();
        if !is_address(&a) {
            errs.push(FieldError::new(
                label.clone(),
                format!("`{raw}` is not an email address"),
            ));
        } else if seen.insert(a.clone()) {
            out.push((label.clone(), a));
        }
    }
    out
}

fn group_fields(g: &DistributionGroup, alias: &str) -> Result<(String, String), Error> {
    let oid = group_object_id(g).ok_or_else(|| {
        Error::internal(anyhow::anyhow!(
            "Exchange returned group {alias} without an object id"
        ))
    })?;
    let smtp = g
        .primary_smtp_address
        .clone()
        .unwrap_or_default()
        .to_ascii_lowercase();
    Ok((oid, smtp))
}

/// A group found in the tenant under this alias must be a mail-enabled security group.
fn require_security_group(g: &DistributionGroup, alias: &str) -> Result<(), Error> {
    match g.recipient_type_details.as_deref() {
        Some("MailUniversalSecurityGroup") => Ok(()),
        other => Err(Error::Rejected {
            kind: Rejection::InvalidPolicyScope,
            detail: format!(
                "the tenant already has a group `{alias}` of type {}, which cannot scope an application access policy (only mail-enabled security groups can)",
                other.unwrap_or("unknown")
            ),
            errors: vec![FieldError::new(
                "alias",
                format!(
                    "a {} with this alias already exists in the tenant and cannot be a policy scope; choose another alias",
                    other.unwrap_or("group")
                ),
            )],
        }),
    }
}

fn group_not_found(alias: &str) -> Error {
    Error::not_found(format!(
        "mailscope has no scope group `{alias}` in this tenant"
    ))
}

/// Each address labelled with its place in the request (`members[i]`).
fn labelled(members: &[String]) -> Vec<(String, String)> {
    members
        .iter()
        .enumerate()
        .map(|(i, m)| (format!("members[{i}]"), m.clone()))
        .collect()
}

/// Ensure a scope group exists with the given members. Idempotent by alias (already
/// normalised, see [`normalise_alias`]): a group found in the tenant is adopted, never
/// duplicated; a new group is created with its whole member list in one call; an existing one
/// gets its whole list set in one `Update-DistributionGroupMember` only when it differs.
pub async fn put(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    alias: &str,
    spec: GroupSpec,
) -> Result<Ensured<ScopeGroupRecord>, Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let mut errs = Vec::new();
    let display_name = spec
        .display_name
        .as_deref()
        .map(str::trim)
        .unwrap_or(alias)
        .to_string();
    if display_name.is_empty() || display_name.chars().count() > 256 {
        errs.push(FieldError::new(
            "display_name",
            "must be 1 to 256 characters",
        ));
    }
    let wanted = check_addresses(&labelled(&spec.members), &mut errs);
    if !errs.is_empty() {
        return Err(Error::Invalid(errs));
    }
    let exo = handle.exchange();

    let _turn = take_turn(services, tenant_id, alias).await;
    let existing = read_record(services, tenant_id, alias).await?;

    // Look up before creating: the record's object id when mailscope knows the group, else the
    // alias (a group left by a crashed attempt, or made outside mailscope, is adopted).
    let lookup = existing.as_ref().map_or(alias, |e| e.object_id.as_str());
    // A group recorded within the replication window may not be visible yet (a repeated PUT, or
    // a retry, seconds after the create): wait for it rather than create a second one. An older
    // record that Exchange does not know was removed outside mailscope and is created again.
    let window = services.settings.m365.replication_window();
    let replication = match &existing {
        Some(e) if Utc::now() - e.created_at < window => Replication::AwaitNew,
        _ => Replication::Ignore,
    };
    let found = exo.get_distribution_group(lookup, replication).await?;
    if let Some(g) = &found {
        require_security_group(g, alias)?;
    }
    let current = match &found {
        Some(g) => current_members(&exo, &group_fields(g, alias)?.0).await?,
        None => BTreeSet::new(),
    };
    // Only addresses not already listed as members need checking.
    let to_check: Vec<(String, String)> = wanted
        .iter()
        .filter(|(_, a)| !current.contains(a))
        .cloned()
        .collect();
    let resolved = resolve_members(&exo, to_check).await?;
    let mut requested: BTreeSet<String> = wanted
        .iter()
        .filter(|(_, a)| current.contains(a))
        .map(|(_, a)| a.clone())
        .collect();
    requested.extend(resolved.iter().filter_map(primary_address));
    let desired: BTreeSet<String> = match spec.membership {
        Membership::Exact => requested,
        Membership::Additive => current.union(&requested).cloned().collect(),
    };
    let desired_list: Vec<String> = desired.iter().cloned().collect();

    let mut exchange_changes: Vec<&str> = Vec::new();
    let (group, origin) = match found {
        Some(g) => {
            let origin = match &existing {
                Some(e) => GroupOrigin::parse(&e.origin)?,
                None => GroupOrigin::Adopted,
            };
            (g, origin)
        }
        None => {
            let (g, origin) = create_or_adopt(&exo, alias, &display_name, &desired_list).await?;
            if origin == GroupOrigin::Created {
                exchange_changes.push("created");
            }
            // The group mailscope recorded, found again by alias: it keeps its origin.
            let origin = match &existing {
                Some(e) if group_object_id(&g).as_deref() == Some(e.object_id.as_str()) => {
                    GroupOrigin::parse(&e.origin)?
                }
                _ => origin,
            };
            (g, origin)
        }
    };
    let (object_id, smtp) = group_fields(&group, alias)?;
    if !exchange_changes.contains(&"created") {
        if group.display_name.as_deref() != Some(display_name.as_str()) {
            let set = SetDistributionGroup {
                display_name: Some(display_name.clone()),
                ..Default::default()
            };
            exo.set_distribution_group(&object_id, &set).await?;
            exchange_changes.push("display_name");
        }
        // Re-read when adopting after a failed create: `current` was empty then.
        let now_current =
            if origin == GroupOrigin::Adopted && existing.is_none() && current.is_empty() {
                current_members(&exo, &object_id).await?
            } else {
                current.clone()
            };
        if now_current != desired {
            exo.update_distribution_group_members(&object_id, &desired_list)
                .await?;
            exchange_changes.push("members");
        }
    }
    let added: Vec<&String> = desired.difference(&current).collect();
    let removed: Vec<&String> = current.difference(&desired).collect();

    let record = ScopeGroupRecord {
        tenant_id,
        alias: alias.to_string(),
        display_name,
        primary_smtp_address: smtp,
        object_id,
        membership: spec.membership.as_str().into(),
        members: desired_list,
        origin: origin.as_str().into(),
        created_at: Utc::now(),
        updated_at: Utc::now(),
    };
    let unchanged_record = existing.as_ref().is_some_and(|e| {
        ScopeGroupRecord {
            created_at: e.created_at,
            updated_at: e.updated_at,
            ..record.clone()
        } == *e
    });
    if unchanged_record && exchange_changes.is_empty() {
        return Ok(Ensured {
            value: existing.unwrap_or(record),
            change: Change::Unchanged,
        });
    }
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    lock_group(&tx, tenant_id, alias).await?;
    let now = store::scope_groups::get(&tx, tenant_id, alias).await?;
    still_current(existing.as_ref(), now.as_ref(), &record.object_id, alias)?;
    // Another replica recorded the same group meanwhile: keep its origin (it may have created it).
    let record = match now {
        Some(n) if existing.is_none() => ScopeGroupRecord {
            origin: n.origin,
            ..record
        },
        _ => record,
    };
    let stored = store::scope_groups::upsert(&tx, &record).await?;
    let change = match (&existing, origin) {
        (None, GroupOrigin::Created) => Change::Created,
        (None, _) => Change::Adopted,
        _ => Change::Updated,
    };
    let action = match change {
        Change::Created => "scope_group.created",
        Change::Adopted => "scope_group.adopted",
        _ => "scope_group.updated",
    };
    audit::record(
        &tx,
        actor,
        tenant_id,
        action,
        &format!("scope_group/{alias}"),
        serde_json::json!({
            "exchange_changes": exchange_changes, "members_added": added,
            "members_removed": removed, "membership": spec.membership.as_str(),
            "object_id": stored.object_id,
        }),
    )
    .await?;
    tx.commit().await?;
    Ok(Ensured {
        value: stored,
        change,
    })
}

/// The record as it stands, read with a connection held only for the one statement.
async fn read_record(
    services: &Services,
    tenant_id: Uuid,
    alias: &str,
) -> Result<Option<ScopeGroupRecord>, Error> {
    let db = services.db().await?;
    Ok(store::scope_groups::get(&db, tenant_id, alias).await?)
}

/// The record this request read before calling Microsoft against the record now, under the
/// advisory lock: a group deleted, replaced, or recorded for another object meanwhile (another
/// replica, `/sync`) makes this write a conflict the caller may retry.
fn still_current(
    read: Option<&ScopeGroupRecord>,
    now: Option<&ScopeGroupRecord>,
    object_id: &str,
    alias: &str,
) -> Result<(), Error> {
    match (read, now) {
        (None, None) => Ok(()),
        (Some(r), Some(n)) if r.object_id == n.object_id => Ok(()),
        (None, Some(n)) if n.object_id == object_id => Ok(()),
        _ => Err(Error::conflict(format!(
            "scope group `{alias}` was changed by another request while this one ran; retry it"
        ))),
    }
}

/// Create the group with its whole member list; when the name turns out to be taken a moment
/// ago by an attempt whose response was lost, adopt the group if it is now visible.
async fn create_or_adopt(
    exo: &ExchangeClient,
    alias: &str,
    display_name: &str,
    members: &[String],
) -> Result<(DistributionGroup, GroupOrigin), Error> {
    let new = NewSecurityGroup {
        name: alias.to_string(),
        display_name: Some(display_name.to_string()),
        alias: Some(alias.to_string()),
        members: members.to_vec(),
        ..Default::default()
    };
    match exo.new_security_group(&new).await {
        Ok(g) => Ok((g, GroupOrigin::Created)),
        // Exchange says the name is taken, so the group exists: if the look-up before the
        // create missed it, it was being replicated (created moments ago, e.g. by an attempt
        // that crashed before recording it). Wait for it and adopt it.
        Err(e) if maybe_exists(&e) => {
            match exo
                .get_distribution_group(alias, Replication::AwaitNew)
                .await?
            {
                Some(g) => {
                    require_security_group(&g, alias)?;
                    Ok((g, GroupOrigin::Adopted))
                }
                None => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// One scope group, with its members read live from Exchange.
pub async fn get_live(
    services: &Services,
    tenant_id: Uuid,
    alias: &str,
) -> Result<ScopeGroupRecord, Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let db = services.db().await?;
    let rec = store::scope_groups::get(&db, tenant_id, alias)
        .await?
        .ok_or_else(|| group_not_found(alias))?;
    drop(db);
    let exo = handle.exchange();
    if exo
        .get_distribution_group(&rec.object_id, Replication::Ignore)
        .await?
        .is_none()
    {
        return Err(Error::not_found(format!(
            "scope group {alias} was removed from the tenant outside mailscope; PUT it to recreate it, or POST /sync to reconcile"
        )));
    }
    let members = current_members_of(&exo, &rec.object_id).await?;
    Ok(ScopeGroupRecord { members, ..rec })
}

/// Delete a scope group: removed from the tenant if mailscope created it, only forgotten if it
/// was adopted or imported. Refused while any access policy (mailscope's or the tenant's) uses
/// it as its scope.
pub async fn delete(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    alias: &str,
) -> Result<(), Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let exo = handle.exchange();
    // The policy lease covers the Microsoft calls (no policy may start using the group
    // meanwhile), with no connection held; then this process's turn at the group.
    let lease = policy_lease(services, tenant_id).await?;
    let _turn = take_turn(services, tenant_id, alias).await;
    let db = services.db().await?;
    let rec = store::scope_groups::get(&db, tenant_id, alias)
        .await?
        .ok_or_else(|| group_not_found(alias))?;
    let in_use = store::access_policies::count_by_scope(&db, tenant_id, &rec.object_id).await?;
    drop(db);
    if in_use > 0 {
        return Err(Error::rejected(
            Rejection::ScopeGroupInUse,
            format!(
                "scope group {alias} is the scope of {in_use} access polic{} in mailscope; delete or replace {} first",
                if in_use == 1 { "y" } else { "ies" },
                if in_use == 1 { "it" } else { "them" }
            ),
        ));
    }
    let group = exo
        .get_distribution_group(&rec.object_id, Replication::Ignore)
        .await?;
    if let Some(g) = &group {
        let ids = ids_of(g.external_directory_object_id.as_deref(), g.guid.as_deref());
        let outside: Vec<String> = exo
            .list_application_access_policies()
            .await?
            .into_iter()
            .filter(|p| {
                p.scope_group_guid()
                    .is_some_and(|s| ids.contains(&s.to_ascii_lowercase()))
            })
            .filter_map(|p| p.identity)
            .collect();
        if !outside.is_empty() {
            return Err(Error::rejected(
                Rejection::ScopeGroupInUse,
                format!(
                    "scope group {alias} is the scope of access policies in the tenant that mailscope does not manage ({}); POST /sync to import them, then delete or replace them",
                    outside.join(", ")
                ),
            ));
        }
    }
    let created = GroupOrigin::parse(&rec.origin)? == GroupOrigin::Created;
    let removed_from_tenant = if created && group.is_some() {
        exo.remove_distribution_group(&rec.object_id).await?
    } else {
        false
    };
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    lease.confirm(&tx).await?;
    // The group's writers record under its advisory lock; one that re-pointed the alias at
    // another group meanwhile (a retried create) is not this deletion's to forget.
    lock_group(&tx, tenant_id, alias).await?;
    let now = store::scope_groups::get(&tx, tenant_id, alias).await?;
    if now.as_ref().is_some_and(|g| g.object_id != rec.object_id) {
        return Err(Error::conflict(format!(
            "scope group {alias} was recorded for another group while it was being deleted; repeat the request"
        )));
    }
    store::scope_groups::delete(&tx, tenant_id, alias).await?;
    audit::record(
        &tx,
        actor,
        tenant_id,
        "scope_group.deleted",
        &format!("scope_group/{alias}"),
        serde_json::json!({"object_id": rec.object_id, "origin": rec.origin,
                           "removed_from_tenant": removed_from_tenant}),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Add members, each labelled with where the request named it (`members[i]`, `csv line n`);
/// `source` (the media type they came in) goes to the audit trail. Every address is checked
/// first; then the whole new list is set in one Exchange call.
pub async fn add_members(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    alias: &str,
    members: Vec<(String, String)>,
    source: &str,
) -> Result<MembersAdded, Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let mut errs = Vec::new();
    if members.is_empty() {
        errs.push(FieldError::new("members", "name at least one member"));
    }
    let wanted = check_addresses(&members, &mut errs);
    if !errs.is_empty() {
        return Err(Error::Invalid(errs));
    }
    let exo = handle.exchange();
    let _turn = take_turn(services, tenant_id, alias).await;
    let rec = read_record(services, tenant_id, alias)
        .await?
        .ok_or_else(|| group_not_found(alias))?;
    let current = current_members(&exo, &rec.object_id).await?;
    let to_check: Vec<(String, String)> = wanted
        .iter()
        .filter(|(_, a)| !current.contains(a))
        .cloned()
        .collect();
    let resolved = resolve_members(&exo, to_check).await?;
    let requested: BTreeSet<String> = wanted
        .iter()
        .filter(|(_, a)| current.contains(a))
        .map(|(_, a)| a.clone())
        .chain(resolved.iter().filter_map(primary_address))
        .collect();
    let added: Vec<String> = requested.difference(&current).cloned().collect();
    let already: Vec<String> = requested.intersection(&current).cloned().collect();
    let all_list: Vec<String> = current.union(&requested).cloned().collect();
    let stored = if added.is_empty() && rec.members == all_list {
        rec
    } else {
        if !added.is_empty() {
            exo.update_distribution_group_members(&rec.object_id, &all_list)
                .await?;
        }
        let mut db = services.db().await?;
        let tx = db.transaction().await?;
        lock_group(&tx, tenant_id, alias).await?;
        let now = store::scope_groups::get(&tx, tenant_id, alias).await?;
        still_current(Some(&rec), now.as_ref(), &rec.object_id, alias)?;
        let stored = store::scope_groups::upsert(
            &tx,
            &ScopeGroupRecord {
                members: all_list,
                ..rec
            },
        )
        .await?;
        audit::record(
            &tx,
            actor,
            tenant_id,
            "scope_group.members_added",
            &format!("scope_group/{alias}"),
            serde_json::json!({"added": added, "source": source}),
        )
        .await?;
        tx.commit().await?;
        stored
    };
    Ok(MembersAdded {
        added,
        already_members: already,
        group: stored,
    })
}

/// Remove one member (an address already checked and in lower case). Idempotent: fine whether
/// or not it was a member.
pub async fn remove_member(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    alias: &str,
    address: &str,
) -> Result<(), Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let exo = handle.exchange();
    let _turn = take_turn(services, tenant_id, alias).await;
    let rec = read_record(services, tenant_id, alias)
        .await?
        .ok_or_else(|| group_not_found(alias))?;
    // Resolve to the primary address so a secondary address or UPN removes the right member.
    let primary = match exo.get_recipient(address, Replication::Ignore).await? {
        Some(r) => primary_address(&r).unwrap_or(address.to_string()),
        None => return Ok(()),
    };
    let removed = exo
        .remove_distribution_group_member(&rec.object_id, &primary)
        .await?;
    if removed || rec.members.contains(&primary) {
        let mut db = services.db().await?;
        let tx = db.transaction().await?;
        lock_group(&tx, tenant_id, alias).await?;
        let now = store::scope_groups::get(&tx, tenant_id, alias).await?;
        still_current(Some(&rec), now.as_ref(), &rec.object_id, alias)?;
        // The members as recorded now (another replica may have changed them meanwhile).
        let rec = now.unwrap_or(rec);
        let members: Vec<String> = rec
            .members
            .iter()
            .filter(|m| **m != primary)
            .cloned()
            .collect();
        store::scope_groups::upsert(&tx, &ScopeGroupRecord { members, ..rec }).await?;
        audit::record(
            &tx,
            actor,
            tenant_id,
            "scope_group.member_removed",
            &format!("scope_group/{alias}"),
            serde_json::json!({"member": primary, "was_member_in_tenant": removed}),
        )
        .await?;
        tx.commit().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_reasons_follow_the_reference() {
        let r = |t: &str| Recipient {
            recipient_type_details: Some(t.into()),
            ..Default::default()
        };
        assert!(scope_refusal(&r("MailUniversalSecurityGroup")).is_none());
        assert!(scope_refusal(&r("UserMailbox")).is_none());
        assert!(
            scope_refusal(&r("SharedMailbox"))
                .unwrap()
                .contains("scope group")
        );
        assert!(
            scope_refusal(&r("GroupMailbox"))
                .unwrap()
                .contains("Microsoft 365 group")
        );
        assert!(
            scope_refusal(&r("MailUniversalDistributionGroup"))
                .unwrap()
                .contains("distribution group")
        );
        assert!(member_refusal(&r("RoomMailbox")).is_none());
        assert!(member_refusal(&r("MailContact")).is_some());
    }

    #[test]
    fn aliases() {
        assert_eq!(normalise_alias("CRM-Scope").as_deref(), Some("crm-scope"));
        assert!(normalise_alias("a b").is_none());
        assert!(normalise_alias(&"x".repeat(65)).is_none());
    }
}
