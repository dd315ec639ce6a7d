//! The sandbox's shared state: the clock, the tenants (built from the fixture), propagation
//! channels, seeded random streams, throttling windows, the recorded call log and counters.
//!
//! Everything mutable sits behind one mutex: handlers take it for a short synchronous section and
//! never hold it across an await.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;

use super::rules::{
    Assignment, Facts, Filter, Nesting, Outcome, PolicyRule, PolicyVerdict, ResourceScope,
    groups_of, mailbox_call, policy_verdict, rbac_grants,
};

use super::model::*;
use super::propagation::{AppCaches, AuthzSnapshot, Channel};
use super::settings::{Api, Behaviour, Pacing};
use super::tokens::SigningKeys;

/// Sandbox time: real elapsed time plus whatever the control API advanced.
#[derive(Debug)]
pub struct Clock {
    start: Instant,
    wall_start: DateTime<Utc>,
    offset: Mutex<Duration>,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            start: Instant::now(),
            wall_start: Utc::now(),
            offset: Mutex::new(Duration::ZERO),
        }
    }

    fn offset(&self) -> Duration {
        *self.offset.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Time since the sandbox started.
    pub fn now(&self) -> Duration {
        self.start.elapsed() + self.offset()
    }

    /// Wall-clock time as the simulated tenant sees it.
    pub fn wall(&self) -> DateTime<Utc> {
        self.wall_start + chrono::Duration::from_std(self.now()).unwrap_or_default()
    }

    pub fn advance(&self, by: Duration) {
        *self.offset.lock().unwrap_or_else(|e| e.into_inner()) += by;
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// One recorded request to a simulated API.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallRecord {
    pub seq: u64,
    pub at: String,
    pub api: Api,
    pub tenant: Option<String>,
    pub method: String,
    pub path: String,
    /// Normalised endpoint used for counters, e.g. `exchange:New-ApplicationAccessPolicy` or
    /// `graph:POST /applications/{id}/addPassword`.
    pub endpoint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdlet: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub front_end: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
    /// The `Retry-After` header sent with the answer, so a client's "never call before
    /// `Retry-After`" can be checked from this log alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<String>,
}

/// Credentials of a tenant's management app (printed at start).
#[derive(Clone)]
pub struct ManagementCredentials {
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: String,
}

impl std::fmt::Debug for ManagementCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagementCredentials")
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// Independent seeded streams, so that (for example) a fault draw never shifts propagation delays.
#[derive(Debug)]
pub struct Rngs {
    pub ids: StdRng,
    pub delays: StdRng,
    pub faults: StdRng,
    pub front_ends: StdRng,
}

impl Rngs {
    pub fn new(seed: u64) -> Self {
        Rngs {
            ids: StdRng::seed_from_u64(seed),
            delays: StdRng::seed_from_u64(seed ^ 0x5eed_0001),
            faults: StdRng::seed_from_u64(seed ^ 0x5eed_0002),
            front_ends: StdRng::seed_from_u64(seed ^ 0x5eed_0003),
        }
    }
}

/// Propagation channels of one tenant.
#[derive(Debug)]
pub struct TenantPropagation {
    pub aap: Channel,
    pub rbac: Channel,
    /// RBAC permission cache per app, filled from the `rbac` channel's front ends.
    pub rbac_apps: AppCaches,
}

/// A fault drawn for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    ServerError,
    Drop,
}

/// Mutable state of the whole sandbox.
#[derive(Debug)]
pub struct World {
    pub pacing: Pacing,
    pub default_behaviour: Behaviour,
    pub tenants: Vec<Tenant>,
    pub default_tenant_id: String,
    pub management: Vec<ManagementCredentials>,
    pub propagation: BTreeMap<String, TenantPropagation>,
    pub rng: Rngs,
    pub calls: Vec<CallRecord>,
    pub next_seq: u64,
    pub counters: BTreeMap<String, BTreeMap<String, u64>>,
    /// Fixed throttling windows: (tenant, api) -> (window start, requests in it).
    pub windows: BTreeMap<(String, Api), (Duration, u64)>,
    pub in_flight: BTreeMap<String, usize>,
}

/// Everything handlers share.
pub struct Shared {
    pub clock: Clock,
    pub keys: Arc<SigningKeys>,
    pub world: Mutex<World>,
    pub fixture: Fixture,
    pub seed: u64,
    /// Generated secrets by client id, kept across resets so printed credentials stay valid.
    pub secrets: Mutex<BTreeMap<String, String>>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, World> {
        // A panic while holding the lock leaves the world usable: the sandbox keeps serving.
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rebuild every tenant from the fixture; settings survive, the call log is cleared.
    pub fn reset(&self) -> anyhow::Result<()> {
        let mut secrets = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        let mut w = self.lock();
        let fresh = World::build(
            &self.fixture,
            w.pacing.clone(),
            w.default_behaviour.clone(),
            self.seed,
            self.clock.wall(),
            self.clock.now(),
            &mut secrets,
        )?;
        *w = fresh;
        Ok(())
    }
}

/// A random client secret in Entra's current shape (`abc8Q~…`, 40 characters).
pub fn new_secret() -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~";
    let mut rng = rand::thread_rng();
    let mut pick = |n: usize, alnum_only: bool| -> String {
        (0..n)
            .map(|_| {
                let max = if alnum_only { 62 } else { CHARS.len() };
                CHARS[rng.gen_range(0..max)] as char
            })
            .collect()
    };
    format!("{}8Q~{}", pick(3, true), pick(34, false))
}

impl World {
    /// Build the world from a fixture. `secrets` supplies (and receives) generated secrets.
    pub fn build(
        fixture: &Fixture,
        pacing: Pacing,
        default_behaviour: Behaviour,
        seed: u64,
        wall: DateTime<Utc>,
        now: Duration,
        secrets: &mut BTreeMap<String, String>,
    ) -> anyhow::Result<World> {
        let mut rng = Rngs::new(seed);
        let mut tenants = vec![];
        let mut management = vec![];
        let mut default_tenant_id = None;
        for ft in &fixture.tenants {
            let mut t = Tenant::new(
                ft.id.clone(),
                ft.domain.clone(),
                ft.display_name.clone(),
                &mut rng.ids,
            );
            t.behaviour = match &ft.behaviour {
                Some(v) => merge_behaviour(&default_behaviour, v)?,
                None => default_behaviour.clone(),
            };
            add_resource_principals(&mut t, wall, &mut rng.ids);
            // Recipients first, then members by name.
            for fr in &ft.recipients {
                let kind = RecipientKind::parse(&fr.kind).ok_or_else(|| {
                    anyhow::anyhow!("fixture: unknown recipient kind `{}`", fr.kind)
                })?;
                let r = build_recipient(
                    &mut t,
                    NewRecipient {
                        kind,
                        name: fr.name.clone(),
                        display_name: fr.display_name.clone(),
                        alias: fr.alias.clone(),
                        primary_smtp_address: None,
                        id: fr.id.clone(),
                        properties: fr.properties.clone(),
                        members: vec![],
                    },
                    wall,
                    Duration::ZERO,
                    &mut rng.ids,
                );
                t.recipients.push(r);
            }
            for fr in &ft.recipients {
                let mut ids = vec![];
                for m in &fr.members {
                    let id = t
                        .recipients
                        .iter()
                        .find(|r| r.name.eq_ignore_ascii_case(m))
                        .map(|r| r.id.clone())
                        .ok_or_else(|| {
                            anyhow::anyhow!("fixture: member `{m}` of `{}` not found", fr.name)
                        })?;
                    ids.push(id);
                }
                let mut roles = vec![];
                for role in &fr.directory_roles {
                    roles.push(
                        directory_role_id(role)
                            .ok_or_else(|| {
                                anyhow::anyhow!("fixture: unknown directory role `{role}`")
                            })?
                            .to_string(),
                    );
                }
                if let Some(r) = t.recipients.iter_mut().find(|r| r.name == fr.name) {
                    r.members = ids;
                    r.directory_roles = roles;
                    r.ews_enabled = fr.ews_enabled;
                }
            }
            let domain = t.initial_domain.clone();
            for r in t.recipients.clone() {
                if r.kind.has_mailbox() {
                    let data = seed_mailbox(&r, &domain, wall, &mut rng.ids);
                    t.mailboxes.insert(r.id.clone(), data);
                }
            }
            for fa in &ft.apps {
                let app_id = fa.app_id.clone().unwrap_or_else(|| guid(&mut rng.ids));
                let secret = match &fa.secret {
                    Some(s) => s.clone(),
                    None => secrets
                        .entry(app_id.clone())
                        .or_insert_with(new_secret)
                        .clone(),
                };
                let created = create_app_with_grants(
                    &mut t,
                    AppSpec {
                        display_name: fa.display_name.clone(),
                        app_id: Some(app_id.clone()),
                        secret: Some(secret.clone()),
                        secret_end: None,
                        graph_permissions: fa.graph_permissions.clone(),
                        exchange_permissions: fa.exchange_permissions.clone(),
                        directory_roles: fa.directory_roles.clone(),
                        certificate_der: None,
                    },
                    wall,
                    &mut rng.ids,
                )?;
                if fa.management {
                    t.management_app_id = Some(created.app_id.clone());
                    management.push(ManagementCredentials {
                        tenant_id: t.id.clone(),
                        client_id: created.app_id,
                        client_secret: secret,
                    });
                }
            }
            if ft.default && default_tenant_id.is_none() {
                default_tenant_id = Some(t.id.clone());
            }
            tenants.push(t);
        }
        let default_tenant_id = default_tenant_id
            .or_else(|| tenants.first().map(|t| t.id.clone()))
            .ok_or_else(|| anyhow::anyhow!("fixture has no tenant"))?;
        let mut w = World {
            pacing,
            default_behaviour,
            tenants,
            default_tenant_id,
            management,
            propagation: BTreeMap::new(),
            rng,
            calls: vec![],
            next_seq: 1,
            counters: BTreeMap::new(),
            windows: BTreeMap::new(),
            in_flight: BTreeMap::new(),
        };
        let ids: Vec<String> = w.tenants.iter().map(|t| t.id.clone()).collect();
        for id in ids {
            w.init_propagation(&id, now);
        }
        Ok(w)
    }

    pub fn init_propagation(&mut self, tenant_id: &str, _now: Duration) {
        let Some(t) = self.tenant(tenant_id) else {
            return;
        };
        let snap = snapshot(t);
        let n = self.pacing.front_ends;
        self.propagation.insert(
            t.id.clone(),
            TenantPropagation {
                aap: Channel::new(snap.clone(), n),
                rbac: Channel::new(snap, n),
                rbac_apps: AppCaches::default(),
            },
        );
    }

    /// Find a tenant by GUID or initial domain.
    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| t.answers_to(name))
    }

    pub fn tenant_mut(&mut self, name: &str) -> Option<&mut Tenant> {
        self.tenants.iter_mut().find(|t| t.answers_to(name))
    }

    /// Record an authorization-relevant change; Graph front ends adopt it over time.
    pub fn publish(&mut self, tenant_id: &str, now: Duration) {
        let Some(t) = self.tenants.iter().find(|t| t.id == tenant_id) else {
            return;
        };
        let snap = snapshot(t);
        let (aap_delay, rbac_delay) = (
            self.pacing.propagation_delay,
            self.pacing.rbac_propagation_delay,
        );
        if let Some(p) = self.propagation.get_mut(tenant_id) {
            p.aap
                .publish(snap.clone(), now, aap_delay, &mut self.rng.delays);
            p.rbac.publish(snap, now, rbac_delay, &mut self.rng.delays);
        }
    }

    /// Pick the Graph front end that serves a request.
    pub fn pick_front_end(&mut self) -> usize {
        let n = self.pacing.front_ends.max(1);
        self.rng.front_ends.gen_range(0..n)
    }

    /// A replication lag for a newly created Exchange object.
    pub fn replication_lag(&mut self) -> Duration {
        self.pacing.replication_delay.draw(&mut self.rng.delays)
    }

    /// How long a new Entra object written through Graph stays unusable elsewhere.
    pub fn consistency_lag(&mut self) -> Duration {
        self.pacing
            .entra_consistency_delay
            .draw(&mut self.rng.delays)
    }

    pub fn record(&mut self, mut rec: CallRecord) -> u64 {
        rec.seq = self.next_seq;
        self.next_seq += 1;
        let tenant = rec.tenant.clone().unwrap_or_else(|| "-".into());
        *self
            .counters
            .entry(tenant)
            .or_default()
            .entry(rec.endpoint.clone())
            .or_insert(0) += 1;
        let seq = rec.seq;
        self.calls.push(rec);
        // Bound memory in long-running sandboxes.
        if self.calls.len() > 100_000 {
            self.calls.drain(..10_000);
        }
        seq
    }

    /// Draw the fault (if any) and latency for one request to `api`.
    pub fn draw_fault(&mut self, api: Api) -> (Fault, Duration) {
        if !self.pacing.fault_apis.contains(&api) {
            return (Fault::None, Duration::ZERO);
        }
        let latency = self.pacing.latency.draw(&mut self.rng.faults);
        let x: f64 = self.rng.faults.r#gen();
        let fault = if x < self.pacing.fault_drop_rate {
            Fault::Drop
        } else if x < self.pacing.fault_drop_rate + self.pacing.fault_5xx_rate {
            Fault::ServerError
        } else {
            Fault::None
        };
        (fault, latency)
    }

    /// Spend one request of the tenant's budget for `api`. `Err(retry_after)` when exhausted;
    /// `Ok((limit, remaining, reset_in))` otherwise.
    pub fn take_budget(
        &mut self,
        tenant: &str,
        api: Api,
        now: Duration,
    ) -> Result<Option<(u64, u64, Duration)>, Duration> {
        let budget = match api {
            Api::Graph => self.pacing.graph_budget,
            Api::Exchange => self.pacing.exchange_budget,
            Api::Login => self.pacing.login_budget,
        };
        let Some(b) = budget else { return Ok(None) };
        let w = self
            .windows
            .entry((tenant.to_string(), api))
            .or_insert((now, 0));
        if now >= w.0 + b.window {
            // Windows are aligned to their start, so bursts reset predictably.
            let elapsed = now - w.0;
            let windows = elapsed.as_nanos() / b.window.as_nanos().max(1);
            w.0 += b.window * windows as u32;
            w.1 = 0;
        }
        let reset_in = (w.0 + b.window).saturating_sub(now);
        if w.1 >= b.limit {
            return Err(reset_in);
        }
        w.1 += 1;
        Ok(Some((b.limit, b.limit - w.1, reset_in)))
    }

    /// Graph's answer for one mailbox call, through the front end's cached view (and, for RBAC,
    /// the app's own permission cache, which this call refreshes or keeps warm).
    #[allow(clippy::too_many_arguments)]
    pub fn graph_mailbox_access(
        &mut self,
        tenant_id: &str,
        front_end: usize,
        now: Duration,
        app_id: &str,
        sp_object_id: &str,
        roles: &[String],
        mailbox_id: &str,
        accepted: &[&str],
    ) -> (Outcome, PolicyVerdict) {
        let no_access = || {
            (
                Outcome::NoPermission,
                PolicyVerdict {
                    granted: false,
                    rule: PolicyRule::NoPolicy,
                },
            )
        };
        let Some(tenant) = self.tenants.iter().find(|t| t.id == tenant_id) else {
            return no_access();
        };
        let Some(p) = self.propagation.get_mut(&tenant.id) else {
            return no_access();
        };
        let aap = p.aap.view(front_end, now);
        let rbac = p.rbac_apps.view(
            app_id,
            p.rbac.view(front_end, now),
            now,
            self.pacing.rbac_app_cache_idle,
            self.pacing.rbac_app_cache_lifetime,
        );
        evaluate_mailbox(
            &aap,
            &rbac,
            &tenant.behaviour,
            app_id,
            sp_object_id,
            roles,
            mailbox_id,
            accepted,
        )
    }
}

/// Evaluate one mailbox call against cached views (pure).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_mailbox(
    aap: &AuthzSnapshot,
    rbac: &AuthzSnapshot,
    behaviour: &Behaviour,
    app_id: &str,
    sp_object_id: &str,
    roles: &[String],
    mailbox_id: &str,
    accepted: &[&str],
) -> (Outcome, PolicyVerdict) {
    let decision = policy_verdict(
        app_id,
        mailbox_id,
        &aap.policies,
        &aap.members,
        behaviour.aap_nested_groups,
    );
    let rbac_permissions = rbac
        .rbac
        .iter()
        .find(|(oid, aid, _)| {
            oid.eq_ignore_ascii_case(sp_object_id) && aid.eq_ignore_ascii_case(app_id)
        })
        .and_then(|(_, _, assignments)| {
            let facts = facts_with_groups(rbac, mailbox_id, behaviour)?;
            Some(rbac_grants(assignments, &facts))
        })
        .unwrap_or_default();
    (
        mailbox_call(accepted, roles, decision, &rbac_permissions),
        decision,
    )
}

/// A recipient's filter facts with `member_of` in the tenant's RBAC nested mode.
pub fn facts_with_groups(
    s: &AuthzSnapshot,
    recipient_id: &str,
    behaviour: &Behaviour,
) -> Option<Facts> {
    let mut f = s.recipients.get(recipient_id)?.clone();
    f.member_of = groups_of(&s.members, recipient_id, behaviour.rbac_nested_groups)
        .iter()
        .filter_map(|g| s.group_dns.get(g).cloned())
        .collect();
    Some(f)
}

/// The authorization-relevant state of a tenant, as Graph front ends cache it.
pub fn snapshot(t: &Tenant) -> AuthzSnapshot {
    let members = t.group_members();
    let empty = Default::default();
    let recipients = t
        .recipients
        .iter()
        .filter(|r| r.kind.is_recipient())
        .map(|r| {
            let mut f = t.recipient_facts(r, &empty, Nesting::DirectOnly);
            f.member_of.clear();
            (r.id.clone(), f)
        })
        .collect();
    let group_dns = t
        .recipients
        .iter()
        .filter(|r| r.kind.is_group())
        .map(|r| (r.id.clone(), r.distinguished_name(t)))
        .collect();
    let rbac = t
        .exo_service_principals
        .iter()
        .map(|sp| {
            (
                sp.object_id.clone(),
                sp.app_id.clone(),
                assignments_of(t, &sp.object_id),
            )
        })
        .collect();
    AuthzSnapshot {
        policies: t.access_policies(),
        members,
        rbac,
        recipients,
        group_dns,
        ews_disabled: t
            .recipients
            .iter()
            .filter(|r| r.ews_enabled == Some(false))
            .map(|r| r.id.clone())
            .collect(),
    }
}

/// An Exchange service principal's role assignments in the form the sandbox's rules take.
pub fn assignments_of(t: &Tenant, sp_object_id: &str) -> Vec<Assignment> {
    t.role_assignments
        .iter()
        .filter(|a| a.app_object_id.eq_ignore_ascii_case(sp_object_id))
        .filter_map(|a| {
            let scope = match &a.scope {
                ScopeRef::Organization => ResourceScope::Organization,
                ScopeRef::Custom(name) => {
                    let s = t
                        .management_scopes
                        .iter()
                        .find(|s| s.name.eq_ignore_ascii_case(name))?;
                    ResourceScope::Custom {
                        name: s.name.clone(),
                        filter: Filter::parse(&s.filter).ok()?,
                        exclusive: s.exclusive,
                    }
                }
                ScopeRef::Group(id) => {
                    let g = t.recipient(id)?;
                    ResourceScope::Group {
                        name: g.name.clone(),
                        dn: g.distinguished_name(t),
                    }
                }
                ScopeRef::AdministrativeUnit(id) => {
                    let au = t
                        .administrative_units
                        .iter()
                        .find(|u| u.id.eq_ignore_ascii_case(id))?;
                    ResourceScope::AdministrativeUnit {
                        name: au.display_name.clone(),
                        member_ids: au.members.clone(),
                    }
                }
            };
            Some(Assignment {
                name: a.name.clone(),
                role: a.role.clone(),
                scope,
                enabled: a.enabled,
            })
        })
        .collect()
}

fn merge_behaviour(base: &Behaviour, v: &Value) -> anyhow::Result<Behaviour> {
    let mut b = serde_json::to_value(base)?;
    if let (Some(o), Some(patch)) = (b.as_object_mut(), v.as_object()) {
        for (k, val) in patch {
            o.insert(k.clone(), val.clone());
        }
    }
    Ok(serde_json::from_value(b)?)
}

/// Microsoft's first-party resource service principals with their app roles.
pub fn add_resource_principals(t: &mut Tenant, wall: DateTime<Utc>, rng: &mut impl Rng) {
    let graph_roles = GRAPH_APP_ROLES
        .iter()
        .map(|(v, id)| AppRoleDef {
            id: id.to_string(),
            value: v.to_string(),
            display_name: v.to_string(),
        })
        .collect();
    let mut exo_roles: Vec<AppRoleDef> = EXCHANGE_APP_ROLES
        .iter()
        .map(|(v, id)| AppRoleDef {
            id: id.to_string(),
            value: v.to_string(),
            display_name: v.to_string(),
        })
        .collect();
    // Unverified id (docs/microsoft-365.md §1.2): random per tenant so clients must resolve it at run time.
    exo_roles.push(AppRoleDef {
        id: guid(rng),
        value: "Exchange.ManageAsAppV2".into(),
        display_name: "Manage Exchange As Application V2".into(),
    });
    t.service_principals.push(ServicePrincipal {
        id: guid(rng),
        app_id: GRAPH_APP_ID.into(),
        display_name: "Microsoft Graph".into(),
        app_roles: graph_roles,
        app_owner_organization_id: Some("f8cdef31-a31e-4b4a-93e4-5f571e91255a".into()),
        created: wall,
    });
    t.service_principals.push(ServicePrincipal {
        id: guid(rng),
        app_id: EXCHANGE_APP_ID.into(),
        display_name: "Office 365 Exchange Online".into(),
        app_roles: exo_roles,
        app_owner_organization_id: Some("f8cdef31-a31e-4b4a-93e4-5f571e91255a".into()),
        created: wall,
    });
}

/// What to create with [`create_app_with_grants`].
pub struct AppSpec {
    pub display_name: String,
    pub app_id: Option<String>,
    pub secret: Option<String>,
    pub secret_end: Option<DateTime<Utc>>,
    pub graph_permissions: Vec<String>,
    pub exchange_permissions: Vec<String>,
    pub directory_roles: Vec<String>,
    pub certificate_der: Option<Vec<u8>>,
}

pub struct CreatedApp {
    pub app_id: String,
    pub object_id: String,
    pub service_principal_id: String,
}

/// Register an application with its service principal, admin-consented grants and directory roles.
pub fn create_app_with_grants(
    t: &mut Tenant,
    spec: AppSpec,
    wall: DateTime<Utc>,
    rng: &mut impl Rng,
) -> anyhow::Result<CreatedApp> {
    let app_id = spec.app_id.unwrap_or_else(|| guid(rng));
    if t.applications
        .iter()
        .any(|a| a.app_id.eq_ignore_ascii_case(&app_id))
    {
        anyhow::bail!("an application with appId {app_id} already exists");
    }
    let mut passwords = vec![];
    if let Some(secret) = spec.secret {
        passwords.push(PasswordCredential {
            key_id: guid(rng),
            display_name: Some("sandbox".into()),
            hint: secret.chars().take(3).collect(),
            secret_text: secret,
            start: wall - chrono::Duration::days(1),
            end: spec
                .secret_end
                .unwrap_or(wall + chrono::Duration::days(730)),
            usable_at: Duration::ZERO,
        });
    }
    let mut keys = vec![];
    if let Some(der) = spec.certificate_der {
        keys.push(KeyCredential {
            key_id: guid(rng),
            display_name: Some("sandbox certificate".into()),
            der,
            start: wall - chrono::Duration::days(1),
            end: wall + chrono::Duration::days(365),
        });
    }
    let object_id = guid(rng);
    let mut rra = vec![];
    for (resource, perms) in [
        (GRAPH_APP_ID, &spec.graph_permissions),
        (EXCHANGE_APP_ID, &spec.exchange_permissions),
    ] {
        if perms.is_empty() {
            continue;
        }
        let mut access = vec![];
        for p in perms.iter() {
            let resource_sp = t
                .service_principal_by_app_id(resource)
                .ok_or_else(|| anyhow::anyhow!("resource {resource} missing"))?;
            let role = resource_sp
                .app_roles
                .iter()
                .find(|r| r.value.eq_ignore_ascii_case(p))
                .ok_or_else(|| anyhow::anyhow!("unknown permission `{p}` on {resource}"))?;
            access.push(serde_json::json!({"id": role.id, "type": "Role"}));
        }
        rra.push(serde_json::json!({"resourceAppId": resource, "resourceAccess": access}));
    }
    t.applications.push(Application {
        id: object_id.clone(),
        app_id: app_id.clone(),
        display_name: spec.display_name.clone(),
        sign_in_audience: "AzureADMyOrg".into(),
        password_credentials: passwords,
        key_credentials: keys,
        required_resource_access: Value::Array(rra),
        extra: Default::default(),
        owner_sp: None,
        created: wall,
        visible_at: Duration::ZERO,
    });
    let sp_id = guid(rng);
    t.service_principals.push(ServicePrincipal {
        id: sp_id.clone(),
        app_id: app_id.clone(),
        display_name: spec.display_name,
        app_roles: vec![],
        app_owner_organization_id: Some(t.id.clone()),
        created: wall,
    });
    for (resource, perms) in [
        (GRAPH_APP_ID, &spec.graph_permissions),
        (EXCHANGE_APP_ID, &spec.exchange_permissions),
    ] {
        for p in perms.iter() {
            let (resource_id, role_id) = {
                let rsp = t
                    .service_principal_by_app_id(resource)
                    .ok_or_else(|| anyhow::anyhow!("resource missing"))?;
                let role = rsp
                    .app_roles
                    .iter()
                    .find(|r| r.value.eq_ignore_ascii_case(p))
                    .ok_or_else(|| anyhow::anyhow!("unknown permission `{p}`"))?;
                (rsp.id.clone(), role.id.clone())
            };
            t.app_role_grants.push(AppRoleGrant {
                id: grant_id(rng),
                principal_id: sp_id.clone(),
                resource_id,
                app_role_id: role_id,
                created: wall,
                in_token_at: Duration::ZERO,
            });
        }
    }
    let mut seen = BTreeSet::new();
    for role in &spec.directory_roles {
        let id = directory_role_id(role)
            .ok_or_else(|| anyhow::anyhow!("unknown directory role `{role}`"))?;
        if seen.insert(id) {
            t.directory_role_assignments.push(DirectoryRoleAssignment {
                id: grant_id(rng),
                principal_id: sp_id.clone(),
                role_definition_id: id.into(),
                directory_scope_id: "/".into(),
            });
        }
    }
    Ok(CreatedApp {
        app_id,
        object_id,
        service_principal_id: sp_id,
    })
}

/// App role assignment ids look like base64url strings in Graph.
pub fn grant_id(rng: &mut impl Rng) -> String {
    let mut b = [0u8; 32];
    rng.fill(&mut b);
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)[..43].to_string()
}
