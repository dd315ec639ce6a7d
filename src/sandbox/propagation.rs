//! Propagation of authorization changes to Graph's front ends (docs/microsoft-365.md §2.7, §3.5, §6.1).
//!
//! Exchange's Test cmdlets read the live directory, but Graph authorizes mailbox calls through
//! caches. The sandbox models `N` front ends; each adopts every change after its own delay drawn
//! from the configured range. A request lands on one front end at random (seeded), so while a
//! change propagates, consecutive answers flap between the old and new behaviour.
//!
//! A front end always sees a consistent snapshot: it adopts versions in order, and a version's
//! adoption time is never earlier than the previous version's on the same front end.
//!
//! On top of the front ends, RBAC for Applications keeps a permission cache per app
//! (docs/microsoft-365.md §3.5, §8.3): an app is judged by the RBAC view it cached, which is
//! refilled from the front end only once the app has been idle for a while or the entry has
//! reached its maximum age. An app in constant use therefore keeps old grants longest.
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::Serialize;

use super::rules::{Assignment, Facts, Memberships, PolicyFact};

use super::settings::DelayRange;

/// What a Graph front end caches about a tenant's Exchange authorization state.
#[derive(Debug, Clone, Default)]
pub struct AuthzSnapshot {
    pub policies: Vec<PolicyFact>,
    pub members: Memberships,
    /// RBAC assignments by Exchange service principal (object id, app id).
    pub rbac: Vec<(String, String, Vec<Assignment>)>,
    /// Recipient facts without `member_of`, which depends on the nested mode and is computed
    /// at evaluation time from `members` and `group_dns`.
    pub recipients: BTreeMap<String, Facts>,
    pub group_dns: BTreeMap<String, String>,
    /// Mailboxes with `EwsEnabled = $false`.
    pub ews_disabled: Vec<String>,
}

/// One propagation channel (AAP and RBAC propagate with different delays).
#[derive(Debug)]
pub struct Channel {
    versions: BTreeMap<u64, Arc<AuthzSnapshot>>,
    /// Per front end, (version, sandbox time it becomes visible), in version order.
    fronts: Vec<VecDeque<(u64, Duration)>>,
    latest: u64,
}

impl Channel {
    pub fn new(initial: AuthzSnapshot, front_ends: usize) -> Self {
        let front_ends = front_ends.max(1);
        Channel {
            versions: BTreeMap::from([(0, Arc::new(initial))]),
            fronts: (0..front_ends)
                .map(|_| VecDeque::from([(0, Duration::ZERO)]))
                .collect(),
            latest: 0,
        }
    }

    pub fn front_ends(&self) -> usize {
        self.fronts.len()
    }

    /// Record a change made at `now`; each front end adopts it after its own delay.
    pub fn publish(
        &mut self,
        snapshot: AuthzSnapshot,
        now: Duration,
        delay: DelayRange,
        rng: &mut impl Rng,
    ) {
        self.latest += 1;
        let v = self.latest;
        self.versions.insert(v, Arc::new(snapshot));
        for f in &mut self.fronts {
            let last = f.back().map(|(_, t)| *t).unwrap_or_default();
            let at = (now + delay.draw(rng)).max(last);
            f.push_back((v, at));
        }
        self.prune(now);
    }

    /// Make every front end adopt everything now (control API "settle").
    pub fn settle(&mut self, now: Duration) {
        for f in &mut self.fronts {
            for e in f.iter_mut() {
                e.1 = e.1.min(now);
            }
        }
        self.prune(now);
    }

    fn adopted(&self, front: usize, now: Duration) -> u64 {
        self.fronts[front % self.fronts.len()]
            .iter()
            .take_while(|(_, t)| *t <= now)
            .last()
            .map(|(v, _)| *v)
            .unwrap_or(0)
    }

    /// The snapshot a front end serves at `now`.
    pub fn view(&self, front: usize, now: Duration) -> Arc<AuthzSnapshot> {
        let v = self.adopted(front, now);
        self.versions
            .range(..=v)
            .next_back()
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    }

    /// The live (fully propagated) snapshot.
    pub fn latest(&self) -> Arc<AuthzSnapshot> {
        self.versions
            .values()
            .next_back()
            .cloned()
            .unwrap_or_default()
    }

    /// Drop versions no front end can serve any more.
    fn prune(&mut self, now: Duration) {
        for f in &mut self.fronts {
            while f.len() > 1 && f[1].1 <= now {
                f.pop_front();
            }
        }
        let oldest = self
            .fronts
            .iter()
            .filter_map(|f| f.front().map(|(v, _)| *v))
            .min()
            .unwrap_or(0);
        self.versions.retain(|v, _| *v >= oldest);
    }

    pub fn status(&self, now: Duration) -> ChannelStatus {
        ChannelStatus {
            latest_version: self.latest,
            front_ends: (0..self.fronts.len())
                .map(|i| FrontEndStatus {
                    front_end: i,
                    adopted_version: self.adopted(i, now),
                    pending: self.fronts[i]
                        .iter()
                        .filter(|(_, t)| *t > now)
                        .map(|(v, t)| PendingAdoption {
                            version: *v,
                            in_seconds: (*t - now).as_secs_f64(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Is every front end serving the latest version?
    pub fn settled(&self, now: Duration) -> bool {
        (0..self.fronts.len()).all(|i| self.adopted(i, now) == self.latest)
    }
}

/// One app's cached RBAC view.
#[derive(Debug, Clone)]
struct AppCacheEntry {
    /// The snapshot itself, not a version number: versions are pruned once front ends move on.
    snapshot: Arc<AuthzSnapshot>,
    filled_at: Duration,
    last_used: Duration,
}

/// Per-app RBAC permission caches of one tenant, keyed by app id (lower case).
#[derive(Debug, Default)]
pub struct AppCaches {
    entries: BTreeMap<String, AppCacheEntry>,
}

impl AppCaches {
    /// The RBAC view `app_id` is judged by at `now`. `front` is the serving front end's current
    /// view, used when the entry is missing, idle for longer than `idle` or older than
    /// `lifetime`. A zero `idle` or `lifetime` turns the per-app cache off.
    pub fn view(
        &mut self,
        app_id: &str,
        front: Arc<AuthzSnapshot>,
        now: Duration,
        idle: Duration,
        lifetime: Duration,
    ) -> Arc<AuthzSnapshot> {
        if idle.is_zero() || lifetime.is_zero() {
            return front;
        }
        let key = app_id.to_ascii_lowercase();
        let stale = |e: &AppCacheEntry| {
            now.saturating_sub(e.last_used) > idle || now.saturating_sub(e.filled_at) >= lifetime
        };
        match self.entries.get_mut(&key) {
            Some(e) if !stale(e) => {
                e.last_used = now;
                e.snapshot.clone()
            }
            _ => {
                self.entries.insert(
                    key,
                    AppCacheEntry {
                        snapshot: front.clone(),
                        filled_at: now,
                        last_used: now,
                    },
                );
                front
            }
        }
    }

    /// Forget every cached entry (control API "settle").
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelStatus {
    pub latest_version: u64,
    pub front_ends: Vec<FrontEndStatus>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FrontEndStatus {
    pub front_end: usize,
    pub adopted_version: u64,
    pub pending: Vec<PendingAdoption>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingAdoption {
    pub version: u64,
    pub in_seconds: f64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sandbox::rules::Right;
    use rand::SeedableRng;

    fn snap(n: usize) -> AuthzSnapshot {
        AuthzSnapshot {
            policies: (0..n)
                .map(|i| PolicyFact {
                    app_id: format!("app{i}"),
                    scope_id: "g".into(),
                    right: Right::RestrictAccess,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn front_ends_adopt_after_their_own_delay_and_flap() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut c = Channel::new(snap(0), 4);
        let delay = DelayRange::between(Duration::from_secs(10), Duration::from_secs(100));
        c.publish(snap(1), Duration::ZERO, delay, &mut rng);
        // Before the minimum delay nobody has it; after the maximum everyone does.
        assert!((0..4).all(|f| c.view(f, Duration::from_secs(9)).policies.is_empty()));
        assert!((0..4).all(|f| c.view(f, Duration::from_secs(100)).policies.len() == 1));
        // In between, the seeded draws differ, so some front ends have it and some do not.
        let status = c.status(Duration::ZERO);
        let times: Vec<f64> = status
            .front_ends
            .iter()
            .map(|f| f.pending[0].in_seconds)
            .collect();
        let mid = (times.iter().cloned().fold(f64::MAX, f64::min)
            + times.iter().cloned().fold(0.0, f64::max))
            / 2.0;
        let at = Duration::from_secs_f64(mid);
        let seen: Vec<usize> = (0..4).map(|f| c.view(f, at).policies.len()).collect();
        assert!(seen.contains(&0) && seen.contains(&1), "{seen:?} at {mid}");
        assert!(c.settled(Duration::from_secs(100)));
    }

    #[test]
    fn versions_are_adopted_in_order() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let mut c = Channel::new(snap(0), 2);
        c.publish(
            snap(1),
            Duration::ZERO,
            DelayRange::fixed(Duration::from_secs(50)),
            &mut rng,
        );
        // The second change has a shorter delay but must not overtake the first.
        c.publish(
            snap(2),
            Duration::from_secs(1),
            DelayRange::fixed(Duration::from_secs(5)),
            &mut rng,
        );
        assert_eq!(c.view(0, Duration::from_secs(10)).policies.len(), 0);
        assert_eq!(c.view(0, Duration::from_secs(50)).policies.len(), 2);
    }

    #[test]
    fn an_app_in_use_keeps_its_cache_until_the_lifetime_and_an_idle_app_refills() {
        let (idle, life) = (Duration::from_secs(30 * 60), Duration::from_secs(2 * 3600));
        let old = Arc::new(snap(0));
        let new = Arc::new(snap(1));
        let mut c = AppCaches::default();
        let at = |m: u64| Duration::from_secs(m * 60);
        assert_eq!(
            c.view("Busy", old.clone(), at(0), idle, life)
                .policies
                .len(),
            0
        );
        assert_eq!(
            c.view("idle", old.clone(), at(0), idle, life)
                .policies
                .len(),
            0
        );
        // Called every minute: the old view stays until the entry is two hours old.
        for m in 1..120 {
            assert_eq!(
                c.view("busy", new.clone(), at(m), idle, life)
                    .policies
                    .len(),
                0
            );
        }
        assert_eq!(
            c.view("busy", new.clone(), at(120), idle, life)
                .policies
                .len(),
            1
        );
        // Idle for more than 30 minutes: the next call takes the front end's view.
        assert_eq!(
            c.view("idle", new.clone(), at(31), idle, life)
                .policies
                .len(),
            1
        );
        // Zero turns the cache off.
        let mut off = AppCaches::default();
        off.view("a", old.clone(), at(0), Duration::ZERO, life);
        assert_eq!(
            off.view("a", new.clone(), at(1), Duration::ZERO, life)
                .policies
                .len(),
            1
        );
        assert!(off.is_empty());
        c.clear();
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn settle_makes_everything_visible() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut c = Channel::new(snap(0), 3);
        c.publish(
            snap(1),
            Duration::ZERO,
            DelayRange::fixed(Duration::from_secs(3600)),
            &mut rng,
        );
        assert!(!c.settled(Duration::from_secs(1)));
        c.settle(Duration::from_secs(1));
        assert!(c.settled(Duration::from_secs(1)));
        assert_eq!(c.view(2, Duration::from_secs(1)).policies.len(), 1);
    }
}
