//! Propagation checks as pure rules: what each mailbox is expected to answer, how observations
//! build a streak, when an expectation (and the whole check) is met, and how long to wait before
//! looking again.
//!
//! Microsoft's Graph front ends adopt an authorization change at different times, so while a
//! change propagates consecutive answers flap. An expectation is therefore met only after
//! `required` consecutive matching observations, and a mismatch restarts the streak.
use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::access::{self, AccessPolicy, GroupMembers, NestedGroups};

/// What an app should get when it reads a mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Granted,
    Denied,
}

impl Access {
    pub fn from_granted(granted: bool) -> Access {
        if granted {
            Access::Granted
        } else {
            Access::Denied
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Access::Granted => "granted",
            Access::Denied => "denied",
        }
    }
}

/// One mailbox's expectation and what the check has seen of it so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Expectation {
    /// The mailbox's SMTP address (lower case).
    pub mailbox: String,
    pub expected: Access,
    /// The latest answer seen (Graph in the live stage, else Exchange's Test cmdlet).
    #[serde(default)]
    pub last_observed: Option<Access>,
    #[serde(default)]
    pub last_observed_at: Option<DateTime<Utc>>,
    /// Matching answers in a row; a mismatch resets it.
    #[serde(default)]
    pub consecutive_matches: u32,
    /// When the current streak of matches began: when the change first took effect.
    #[serde(default)]
    pub first_matched_at: Option<DateTime<Utc>>,
    /// When the streak reached the required length.
    #[serde(default)]
    pub met_at: Option<DateTime<Utc>>,
    /// The last observation that did not match (the old behaviour still served): with
    /// `first_matched_at` it brackets when the change took effect for this mailbox.
    #[serde(default)]
    pub last_mismatch_at: Option<DateTime<Utc>>,
}

impl Expectation {
    pub fn new(mailbox: &str, expected: Access) -> Self {
        Expectation {
            mailbox: mailbox.trim().to_ascii_lowercase(),
            expected,
            last_observed: None,
            last_observed_at: None,
            consecutive_matches: 0,
            first_matched_at: None,
            met_at: None,
            last_mismatch_at: None,
        }
    }

    /// When the change took effect for this mailbox, once met: after the last mismatch (or
    /// after `since`, the change, if none was seen) and no later than the first match of the
    /// final streak; in seconds from `since`.
    pub fn propagation(&self, since: DateTime<Utc>) -> Option<Bracket> {
        self.met_at?;
        let first = self.first_matched_at?;
        let secs = |t: DateTime<Utc>| ((t - since).num_milliseconds().max(0) as f64) / 1000.0;
        let at_most = secs(first);
        let at_least = self.last_mismatch_at.map_or(0.0, secs).min(at_most);
        Some(Bracket { at_least, at_most })
    }

    pub fn is_met(&self) -> bool {
        self.met_at.is_some()
    }

    /// Record one observation. Once met, an expectation stays met (its streak was long enough
    /// that every front end was seen agreeing); until then a mismatch restarts the streak.
    pub fn observe(&mut self, observed: Access, at: DateTime<Utc>, required: u32) {
        self.last_observed = Some(observed);
        self.last_observed_at = Some(at);
        if self.is_met() {
            return;
        }
        if observed == self.expected {
            self.consecutive_matches += 1;
            self.first_matched_at.get_or_insert(at);
            if self.consecutive_matches >= required.max(1) {
                self.met_at = Some(at);
            }
        } else {
            self.consecutive_matches = 0;
            self.first_matched_at = None;
            self.last_mismatch_at = Some(at);
        }
    }
}

/// Every expectation met (and there is at least one).
pub fn all_met(expectations: &[Expectation]) -> bool {
    !expectations.is_empty() && expectations.iter().all(Expectation::is_met)
}

/// How long a change took to take effect, in seconds from the change, as observations bound it:
/// a check only sees the moment between two looks, so it reports both ends rather than one
/// number that would read as more precise than it is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"at_least": 20.4, "at_most": 25.6}))]
pub struct Bracket {
    /// Seconds from the change to the last observation that still showed the old behaviour
    /// (0 when the first observation already showed the new one).
    pub at_least: f64,
    /// Seconds from the change to the first observation of the new behaviour that was then
    /// confirmed.
    pub at_most: f64,
}

/// How long the change took to be in force everywhere, from `since` (the change): the latest
/// mailbox decides both ends (the change is everywhere only once it is at the slowest one).
pub fn propagation_seconds(since: DateTime<Utc>, expectations: &[Expectation]) -> Option<Bracket> {
    if !all_met(expectations) {
        return None;
    }
    expectations
        .iter()
        .filter_map(|e| e.propagation(since))
        .reduce(|a, b| Bracket {
            at_least: a.at_least.max(b.at_least),
            at_most: a.at_most.max(b.at_most),
        })
}

/// Merge expectations for the same mailbox (the last one wins) keeping the input order.
pub fn dedupe(expectations: Vec<Expectation>) -> Vec<Expectation> {
    let mut seen = BTreeSet::new();
    let mut out: Vec<Expectation> = Vec::new();
    for e in expectations.into_iter().rev() {
        if seen.insert(e.mailbox.clone()) {
            out.push(e);
        }
    }
    out.reverse();
    out
}

/// Delay before the next live observation: `first · factor^round`, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub factor: f64,
}

impl Backoff {
    pub fn delay(&self, round: u32) -> Duration {
        let grown = self.first.as_secs_f64() * self.factor.max(1.0).powi(round.min(64) as i32);
        Duration::from_secs_f64(grown.min(self.max.as_secs_f64()).max(0.0))
    }
}

/// Delay before the next live observation after `round` rounds. While some mailbox already
/// answers as expected but has not yet reached its streak, the confirmations come every
/// `confirm` (never later than the backoff): waiting longer only delays the verdict, since the
/// change is already visible there.
pub fn next_delay(
    backoff: &Backoff,
    round: u32,
    confirm: Duration,
    expectations: &[Expectation],
) -> Duration {
    let grown = backoff.delay(round);
    let confirming = expectations
        .iter()
        .any(|e| !e.is_met() && e.consecutive_matches > 0);
    if confirming {
        grown.min(confirm)
    } else {
        grown
    }
}

/// Default expectations after a change to an app's policies, by the four rules.
///
/// Ids here are lower-case SMTP addresses: `policies` scope by the scope's address, and
/// `members` maps a group's address to its members' addresses. Up to `sample_size` members of
/// each scope in `scopes` (the app's scopes plus any scope the change just removed) are checked,
/// and every canary; each is expected to answer as the rules say.
pub fn default_expectations(
    app_id: &str,
    policies: &[AccessPolicy],
    members: &GroupMembers,
    scopes: &[String],
    canaries: &[String],
    sample_size: usize,
) -> Vec<Expectation> {
    let mut candidates: Vec<String> = Vec::new();
    for scope in scopes {
        let scope = scope.to_ascii_lowercase();
        if members.contains_key(&scope) {
            let flat: BTreeSet<String> = access::flatten_group(members, &scope);
            candidates.extend(flat.into_iter().take(sample_size));
        } else {
            candidates.push(scope);
        }
    }
    candidates.extend(canaries.iter().map(|c| c.trim().to_ascii_lowercase()));
    let expectations = candidates
        .into_iter()
        .filter(|m| !m.is_empty())
        .map(|m| {
            let d = access::evaluate_application_access(
                app_id,
                &m,
                policies,
                members,
                NestedGroups::Transitive,
            );
            Expectation::new(&m, Access::from_granted(d.granted))
        })
        .collect();
    dedupe(expectations)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmations_come_at_the_short_interval_once_a_mailbox_matches() {
        let b = Backoff {
            first: Duration::from_secs(15),
            max: Duration::from_secs(300),
            factor: 2.0,
        };
        let confirm = Duration::from_secs(10);
        let t0 = Utc::now();
        let mut e = Expectation::new("a@x", Access::Denied);
        let mut other = Expectation::new("b@x", Access::Denied);
        e.observe(Access::Granted, t0, 3);
        let exps = [e.clone(), other.clone()];
        assert_eq!(next_delay(&b, 3, confirm, &exps), Duration::from_secs(120));
        e.observe(Access::Denied, t0, 3);
        let exps = [e.clone(), other.clone()];
        assert_eq!(next_delay(&b, 3, confirm, &exps), confirm);
        // Never later than the backoff.
        assert_eq!(
            next_delay(&b, 0, Duration::from_secs(60), &exps),
            Duration::from_secs(15)
        );
        // Met expectations need no confirmation; a streak broken by a mismatch neither.
        e.observe(Access::Denied, t0, 3);
        e.observe(Access::Denied, t0, 3);
        other.observe(Access::Denied, t0, 3);
        other.observe(Access::Granted, t0, 3);
        assert!(e.is_met());
        assert_eq!(
            next_delay(&b, 3, confirm, &[e, other]),
            Duration::from_secs(120)
        );
    }
    use crate::domain::access::AccessRight;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    #[test]
    fn met_after_k_consecutive_matches_and_a_mismatch_restarts() {
        let mut e = Expectation::new("Bob@Contoso.com", Access::Denied);
        assert_eq!(e.mailbox, "bob@contoso.com");
        e.observe(Access::Denied, t(1), 3);
        e.observe(Access::Denied, t(2), 3);
        assert_eq!(e.consecutive_matches, 2);
        assert_eq!(e.first_matched_at, Some(t(1)));
        // A front end that has not adopted the change yet: flapping restarts the streak.
        e.observe(Access::Granted, t(3), 3);
        assert_eq!(e.consecutive_matches, 0);
        assert_eq!(e.first_matched_at, None);
        assert_eq!(e.last_mismatch_at, Some(t(3)));
        assert!(!e.is_met());
        for s in 4..=6 {
            e.observe(Access::Denied, t(s), 3);
        }
        assert!(e.is_met());
        assert_eq!(e.first_matched_at, Some(t(4)));
        assert_eq!(e.met_at, Some(t(6)));
        // Once met, it stays met; the observation is still recorded.
        e.observe(Access::Granted, t(7), 3);
        assert!(e.is_met());
        assert_eq!(
            e.last_mismatch_at,
            Some(t(3)),
            "the bracket stays that of the streak"
        );
        assert_eq!(e.last_observed, Some(Access::Granted));
    }

    #[test]
    fn overall_status_and_propagation_time() {
        let mut a = Expectation::new("a@x.com", Access::Granted);
        let mut b = Expectation::new("b@x.com", Access::Denied);
        assert!(!all_met(&[]));
        a.observe(Access::Granted, t(10), 1);
        assert!(!all_met(&[a.clone(), b.clone()]));
        assert_eq!(propagation_seconds(t(0), &[a.clone(), b.clone()]), None);
        b.observe(Access::Granted, t(20), 1);
        b.observe(Access::Denied, t(30), 1);
        assert!(all_met(&[a.clone(), b.clone()]));
        // b still answered the old way at 20 s and the new way at 30 s; a was never seen wrong.
        assert_eq!(
            a.propagation(t(0)),
            Some(Bracket {
                at_least: 0.0,
                at_most: 10.0
            })
        );
        assert_eq!(
            propagation_seconds(t(0), &[a, b]),
            Some(Bracket {
                at_least: 20.0,
                at_most: 30.0
            })
        );
    }

    #[test]
    fn backoff_grows_to_its_cap() {
        let b = Backoff {
            first: Duration::from_secs(15),
            max: Duration::from_secs(300),
            factor: 2.0,
        };
        assert_eq!(b.delay(0), Duration::from_secs(15));
        assert_eq!(b.delay(1), Duration::from_secs(30));
        assert_eq!(b.delay(3), Duration::from_secs(120));
        assert_eq!(b.delay(10), Duration::from_secs(300));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn defaults_follow_the_four_rules() {
        let app = "b9701c1e-1364-464d-93e4-01ae925e8d6c";
        let members = GroupMembers::from([(
            "sales@x.com".to_string(),
            vec!["a@x.com".into(), "b@x.com".into(), "c@x.com".into()],
        )]);
        let restrict = vec![AccessPolicy {
            app_id: app.into(),
            scope_id: "sales@x.com".into(),
            access_right: AccessRight::RestrictAccess,
        }];
        let e = default_expectations(
            app,
            &restrict,
            &members,
            &["sales@x.com".into()],
            &["CEO@x.com".into(), "a@x.com".into()],
            2,
        );
        let got: Vec<(&str, Access)> = e.iter().map(|e| (e.mailbox.as_str(), e.expected)).collect();
        // Sample of two members granted (rule 2), the canary denied (rule 3); the canary that is
        // in scope is granted, and listed once.
        assert_eq!(
            got,
            vec![
                ("b@x.com", Access::Granted),
                ("ceo@x.com", Access::Denied),
                ("a@x.com", Access::Granted),
            ]
        );

        // DenyAccess: the scope is denied (rule 1), everyone else granted (rule 4).
        let deny = vec![AccessPolicy {
            access_right: AccessRight::DenyAccess,
            ..restrict[0].clone()
        }];
        let e = default_expectations(
            app,
            &deny,
            &members,
            &["sales@x.com".into()],
            &["ceo@x.com".into()],
            1,
        );
        let got: Vec<(&str, Access)> = e.iter().map(|e| (e.mailbox.as_str(), e.expected)).collect();
        assert_eq!(
            got,
            vec![("a@x.com", Access::Denied), ("ceo@x.com", Access::Granted)]
        );

        // The last policy deleted: the removed scope's members are reachable again (rule 4).
        let e = default_expectations(app, &[], &members, &["sales@x.com".into()], &[], 1);
        assert_eq!(e[0].expected, Access::Granted);
    }
}
