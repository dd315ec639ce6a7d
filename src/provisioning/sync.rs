//! Sync: import the tenant's application access policies (and the security groups they use as
//! scopes) and report drift, what was added, removed or changed outside mailscope. The tenant is
//! the truth: unless it is a dry run, mailscope's records are made to match it.
//!
//! The whole run holds the tenant's policy lease (`key_lease`), so no policy is written on any
//! replica while it reads the tenant: reading Microsoft first and locking afterwards would let a
//! policy created in between be "removed" by a sync that never saw it. It reads the tenant with no
//! pooled connection held, then writes in one short transaction. Scope-group writers do not take
//! the lease (they record under each group's advisory lock): a group one of them wrote while sync
//! was reading makes the sync a conflict to run again instead of a stale overwrite.
use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use serde::Serialize;
use uuid::Uuid;

use super::access_policies::scope_guid;
use super::scope_groups::{
    current_members_of, lock_group, policy_lease, primary_address, recipient_object_id,
};
use super::{Actor, Error, Services, audit, tenants};
use deadpool_postgres::GenericClient;

use crate::m365::exchange::{ApplicationAccessPolicy, ExchangeClient, Recipient, Replication};
use crate::store::access_policies::{AccessPolicyRecord, PolicyOrigin, PolicyState};
use crate::store::{self, scope_groups::ScopeGroupRecord};

/// One field that differs between mailscope's record and the tenant.
#[derive(Debug, Clone, Serialize)]
pub struct FieldDrift {
    pub field: String,
    pub recorded: Option<String>,
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DriftItem {
    /// `app_id/scope_object_id` for a policy, the alias for a scope group.
    pub key: String,
    /// mailscope's id (policies).
    pub id: Option<Uuid>,
    pub changes: Vec<FieldDrift>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct DriftSet {
    pub added: Vec<DriftItem>,
    pub removed: Vec<DriftItem>,
    pub changed: Vec<DriftItem>,
    pub unchanged: usize,
}

impl DriftSet {
    fn drifted(&self) -> usize {
        self.added.len() + self.removed.len() + self.changed.len()
    }
}

/// What sync found (serialised as is into the `tenant.synced` audit event).
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    pub dry_run: bool,
    pub access_policies: DriftSet,
    pub scope_groups: DriftSet,
}

fn drift(field: &str, recorded: &str, tenant: &str) -> Option<FieldDrift> {
    (recorded != tenant).then(|| FieldDrift {
        field: field.into(),
        recorded: Some(recorded.into()),
        tenant: Some(tenant.into()),
    })
}

/// Sync the tenant's policies and their scope groups into mailscope (report only when `dry`).
pub async fn run(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    dry: bool,
) -> Result<SyncReport, Error> {
    let (_, handle) = tenants::load(services, tenant_id).await?;
    let exo = handle.exchange();
    let lease = policy_lease(services, tenant_id).await?;

    // Read the tenant first, with no connection held (the lease keeps policy writers out).
    // Scope groups first, so imported policies can name their group's alias.
    let tenant_policies = exo.list_application_access_policies().await?;
    let mut scope_cache: BTreeMap<String, Option<Recipient>> = BTreeMap::new();
    for g in tenant_policies.iter().filter_map(scope_guid) {
        if let std::collections::btree_map::Entry::Vacant(slot) = scope_cache.entry(g) {
            let r = exo.get_recipient(slot.key(), Replication::Ignore).await?;
            slot.insert(r);
        }
    }
    let seen = observe_scope_groups(services, &exo, tenant_id, &scope_cache).await?;

    // Then make mailscope's records match, in one short transaction.
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    lease.confirm(&tx).await?;
    let groups = sync_scope_groups(&tx, tenant_id, dry, seen).await?;
    let policies = sync_policies(&tx, tenant_id, dry, &tenant_policies, &scope_cache).await?;
    let report = SyncReport {
        dry_run: dry,
        access_policies: policies,
        scope_groups: groups,
    };
    if !dry && report.access_policies.drifted() + report.scope_groups.drifted() > 0 {
        audit::record(
            &tx,
            actor,
            tenant_id,
            "tenant.synced",
            &format!("tenant/{tenant_id}"),
            serde_json::to_value(&report).map_err(Error::internal)?,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(report)
}

/// What the tenant shows of the scope groups: each group mailscope records (with its display
/// name and members, or `None` when it is gone), and the security groups that scope tenant
/// policies but are unknown to mailscope, to import.
struct ObservedGroups {
    known: Vec<(ScopeGroupRecord, Option<LiveGroup>)>,
    unknown: Vec<ScopeGroupRecord>,
}

/// A group as Exchange shows it: display name and members.
struct LiveGroup {
    display_name: String,
    members: Vec<String>,
}

/// Read the scope groups from Exchange, taking a connection only for each short read.
async fn observe_scope_groups(
    services: &Services,
    exo: &ExchangeClient,
    tenant_id: Uuid,
    scope_cache: &BTreeMap<String, Option<Recipient>>,
) -> Result<ObservedGroups, Error> {
    let mut known_groups =
        store::scope_groups::list(&services.db().await?, tenant_id, None, i64::MAX).await?;
    known_groups.sort_by(|a, b| a.alias.cmp(&b.alias));
    let mut known_group_ids: BTreeSet<String> = BTreeSet::new();
    let mut known = Vec::new();
    for g in known_groups {
        known_group_ids.insert(g.object_id.clone());
        let live = match exo
            .get_distribution_group(&g.object_id, Replication::Ignore)
            .await?
        {
            Some(live) => Some(LiveGroup {
                display_name: live.display_name.clone().unwrap_or_default(),
                members: current_members_of(exo, &g.object_id).await?,
            }),
            None => None,
        };
        known.push((g, live));
    }
    let mut unknown = Vec::new();
    for r in scope_cache.values().flatten() {
        let Some(oid) = recipient_object_id(r) else {
            continue;
        };
        if r.recipient_type_details.as_deref() != Some("MailUniversalSecurityGroup")
            || known_group_ids.contains(&oid)
        {
            continue;
        }
        known_group_ids.insert(oid.clone());
        let alias = r.alias.clone().unwrap_or_default().to_ascii_lowercase();
        if alias.is_empty()
            || store::scope_groups::get(&services.db().await?, tenant_id, &alias)
                .await?
                .is_some()
        {
            continue;
        }
        let members = current_members_of(exo, &oid).await?;
        unknown.push(ScopeGroupRecord {
            tenant_id,
            alias: alias.clone(),
            display_name: r.display_name.clone().unwrap_or_else(|| alias.clone()),
            primary_smtp_address: primary_address(r).unwrap_or_default(),
            object_id: oid,
            membership: "exact".into(),
            members,
            origin: "imported".into(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
        });
    }
    Ok(ObservedGroups { known, unknown })
}

/// mailscope's scope groups against what the tenant showed, then the groups to import. Each
/// group is written under its advisory lock, where scope-group writers record too: a group one of
/// them wrote after sync read the tenant makes the sync a conflict to run again, rather than
/// overwrite the newer record with what sync saw before it.
async fn sync_scope_groups(
    tx: &impl GenericClient,
    tenant_id: Uuid,
    dry: bool,
    seen: ObservedGroups,
) -> Result<DriftSet, Error> {
    let mut groups = DriftSet::default();
    for (g, live) in seen.known {
        lock_group(tx, tenant_id, &g.alias).await?;
        if store::scope_groups::get(tx, tenant_id, &g.alias)
            .await?
            .as_ref()
            != Some(&g)
        {
            return Err(Error::conflict(format!(
                "scope group {} was changed while sync read the tenant; run sync again",
                g.alias
            )));
        }
        let Some(LiveGroup {
            display_name: display,
            members,
        }) = live
        else {
            if !dry {
                store::scope_groups::delete(tx, tenant_id, &g.alias).await?;
            }
            groups.removed.push(DriftItem {
                key: g.alias.clone(),
                id: None,
                changes: vec![],
            });
            continue;
        };
        let changes: Vec<FieldDrift> = [
            drift("display_name", &g.display_name, &display),
            drift("members", &g.members.join(","), &members.join(",")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if changes.is_empty() {
            groups.unchanged += 1;
            continue;
        }
        if !dry {
            store::scope_groups::upsert(
                tx,
                &ScopeGroupRecord {
                    display_name: display,
                    members,
                    ..g.clone()
                },
            )
            .await?;
        }
        groups.changed.push(DriftItem {
            key: g.alias,
            id: None,
            changes,
        });
    }
    // Security groups that scope tenant policies but are unknown to mailscope.
    for record in seen.unknown {
        lock_group(tx, tenant_id, &record.alias).await?;
        if store::scope_groups::get(tx, tenant_id, &record.alias)
            .await?
            .is_some()
        {
            // Recorded meanwhile (created or adopted through the API): it is known now.
            continue;
        }
        let alias = record.alias.clone();
        if !dry {
            store::scope_groups::upsert(tx, &record).await?;
        }
        groups.added.push(DriftItem {
            key: alias,
            id: None,
            changes: vec![],
        });
    }
    Ok(groups)
}

/// The tenant's policies against mailscope's records: import, follow changes, forget the gone.
async fn sync_policies(
    tx: &impl GenericClient,
    tenant_id: Uuid,
    dry: bool,
    tenant_policies: &[ApplicationAccessPolicy],
    scope_cache: &BTreeMap<String, Option<Recipient>>,
) -> Result<DriftSet, Error> {
    let mut policies = DriftSet::default();
    let records = store::access_policies::all(tx, tenant_id).await?;
    let mut matched: BTreeSet<Uuid> = BTreeSet::new();
    for p in tenant_policies {
        let (Some(app), Some(guid)) = (p.app_id.clone(), scope_guid(p)) else {
            continue;
        };
        let app = app.to_ascii_lowercase();
        let right = p.access_right.clone().unwrap_or_default();
        let desc = p.description.clone().unwrap_or_default();
        let scope_r = scope_cache.get(&guid).cloned().flatten();
        let scope_oid = scope_r
            .as_ref()
            .and_then(recipient_object_id)
            .unwrap_or(guid.clone());
        let rec = records.iter().find(|r| {
            !matched.contains(&r.id)
                && r.app_id == app
                && (r.scope_object_id == scope_oid || r.scope_object_id == guid)
        });
        match rec {
            Some(r) => {
                matched.insert(r.id);
                let changes: Vec<FieldDrift> = [
                    drift("access_right", &r.access_right, &right),
                    drift("description", &r.description, &desc),
                ]
                .into_iter()
                .flatten()
                .collect();
                if changes.is_empty() {
                    policies.unchanged += 1;
                    continue;
                }
                if !dry {
                    store::access_policies::update(
                        tx,
                        &AccessPolicyRecord {
                            access_right: right,
                            description: desc,
                            exchange_identity: p.identity.clone(),
                            state: PolicyState::Unverified,
                            ..r.clone()
                        },
                    )
                    .await?;
                }
                policies.changed.push(DriftItem {
                    key: format!("{}/{}", r.app_id, r.scope_object_id),
                    id: Some(r.id),
                    changes,
                });
            }
            None => {
                let id = Uuid::new_v4();
                if !dry {
                    let alias = store::scope_groups::get_by_object_id(tx, tenant_id, &scope_oid)
                        .await?
                        .map(|g| g.alias);
                    store::access_policies::insert(
                        tx,
                        &AccessPolicyRecord {
                            id,
                            tenant_id,
                            app_id: app.clone(),
                            scope_object_id: scope_oid.clone(),
                            scope_type: scope_r
                                .as_ref()
                                .and_then(|r| r.recipient_type_details.clone())
                                .unwrap_or_default(),
                            scope_address: scope_r
                                .as_ref()
                                .and_then(primary_address)
                                .unwrap_or_else(|| p.scope_name.clone().unwrap_or_default()),
                            scope_alias: alias,
                            access_right: right.clone(),
                            description: desc,
                            exchange_identity: p.identity.clone(),
                            state: PolicyState::Unverified,
                            origin: PolicyOrigin::Imported,
                            created_at: Utc::now(),
                            updated_at: Utc::now(),
                        },
                    )
                    .await?;
                }
                policies.added.push(DriftItem {
                    key: format!("{app}/{scope_oid}"),
                    id: (!dry).then_some(id),
                    changes: vec![FieldDrift {
                        field: "access_right".into(),
                        recorded: None,
                        tenant: Some(right),
                    }],
                });
            }
        }
    }
    for r in records.iter().filter(|r| !matched.contains(&r.id)) {
        if !dry {
            store::access_policies::delete(tx, tenant_id, r.id).await?;
        }
        policies.removed.push(DriftItem {
            key: format!("{}/{}", r.app_id, r.scope_object_id),
            id: Some(r.id),
            changes: vec![],
        });
    }
    Ok(policies)
}
