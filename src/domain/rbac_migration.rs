//! Migrating one app from application access policies to RBAC for Applications (docs/microsoft-365.md §3.7,
//! docs/microsoft-365.md §3.8): the dry-run plan and the order of the steps, as pure rules.
//!
//! The order never widens the app's access: RBAC is created **beside** the policy (the policy
//! still bounds what Graph serves), the Entra consent goes next (after that only the RBAC
//! assignments grant, and the policy still bounds them), and the policy goes last (removing it
//! first would open every mailbox through the Entra consent, rule 4, docs/microsoft-365.md §2.3). Each change is
//! followed by a verification step. Rolling back is safe while the access policy exists: until
//! then the policy alone bounds the app.
//!
//! What cannot be carried over is named in the plan: DenyAccess policies (RBAC only grants,
//! docs/microsoft-365.md §3.8; a plan with one cannot be executed), members of nested groups (RBAC's `MemberOfGroup`
//! and `-RecipientGroupScope` see direct members only, docs/microsoft-365.md §3.4), and permissions only an access
//! policy covers (no application role grants them, e.g. `Mail.ReadBasic.All`, docs/microsoft-365.md §3.2).
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::rbac::{is_mailbox_permission, role_for_permission};

/// One step of an executing migration, in the only order it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Pointer, scope and role assignments, beside the access policy.
    CreateRbac,
    /// `Test-ServicePrincipalAuthorization`: samples in scope, canaries out of it.
    VerifyRbac,
    /// Remove the app's Entra consent for the permissions the RBAC restriction covers.
    RemoveEntraConsent,
    /// No Entra mailbox grant is left (the union trap is closed).
    VerifyEntraRemoved,
    /// Remove the app's access policies.
    RemoveAccessPolicy,
    /// Exchange no longer lists a policy for the app, and RBAC still scopes it.
    VerifyPolicyRemoved,
    Done,
}

impl Step {
    pub const ORDER: [Step; 7] = [
        Step::CreateRbac,
        Step::VerifyRbac,
        Step::RemoveEntraConsent,
        Step::VerifyEntraRemoved,
        Step::RemoveAccessPolicy,
        Step::VerifyPolicyRemoved,
        Step::Done,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::CreateRbac => "create_rbac",
            Step::VerifyRbac => "verify_rbac",
            Step::RemoveEntraConsent => "remove_entra_consent",
            Step::VerifyEntraRemoved => "verify_entra_removed",
            Step::RemoveAccessPolicy => "remove_access_policy",
            Step::VerifyPolicyRemoved => "verify_policy_removed",
            Step::Done => "done",
        }
    }

    pub fn parse(s: &str) -> Option<Step> {
        Step::ORDER.into_iter().find(|x| x.as_str() == s)
    }

    /// The step after this one (`Done` stays `Done`).
    pub fn next(self) -> Step {
        let i = Step::ORDER.iter().position(|s| *s == self).unwrap_or(6);
        Step::ORDER[(i + 1).min(6)]
    }

    /// Rolling back is allowed while the access policy still exists, i.e. before the step
    /// that removes it has run.
    pub fn can_roll_back(self) -> bool {
        Step::ORDER.iter().position(|s| *s == self)
            <= Step::ORDER
                .iter()
                .position(|s| *s == Step::RemoveAccessPolicy)
    }
}

/// An access policy of the app, as the plan needs it.
#[derive(Debug, Clone)]
pub struct PolicyInput {
    /// The scope group's address (or alias, as the caller knows it).
    pub scope: String,
    pub deny: bool,
    /// Members reached only through a nested group: an access policy covers them, RBAC does not.
    pub nested_members: Vec<String>,
}

/// Something of the current restriction that RBAC will not carry over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotCarried {
    /// `deny_access_policy`, `nested_member` or `permission_without_role`.
    pub kind: String,
    /// The policy's scope, the member's address or the permission.
    pub subject: String,
    pub detail: String,
    /// True when executing anyway would change who the app can reach or what it can do.
    pub blocks_execution: bool,
}

/// The dry-run plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// Role assignments to create: (permission, role), scoped to each RestrictAccess scope.
    pub create_assignments: Vec<(String, String)>,
    pub scopes: Vec<String>,
    /// Entra grants to remove once RBAC is verified.
    pub remove_entra_grants: Vec<String>,
    /// Access policies (their scopes) removed last.
    pub remove_access_policies: Vec<String>,
    pub not_carried: Vec<NotCarried>,
    pub steps: Vec<Step>,
    /// Expected duration: changes in Exchange are immediate, Graph follows through RBAC's
    /// permission cache after each change (30 minutes to 2 hours, docs/microsoft-365.md §3.5).
    pub expected_min_seconds: u64,
    pub expected_max_seconds: u64,
    /// False when something in `not_carried` blocks execution.
    pub executable: bool,
}

/// The documented RBAC permission cache (docs/microsoft-365.md §3.5, §8.3).
pub const CACHE_MIN: Duration = Duration::from_secs(30 * 60);
pub const CACHE_MAX: Duration = Duration::from_secs(2 * 3600);

/// Plan the migration of an app holding `entra_permissions` and restricted by `policies`.
pub fn plan(policies: &[PolicyInput], entra_permissions: &[String]) -> Plan {
    let mut not_carried = Vec::new();
    for p in policies.iter().filter(|p| p.deny) {
        not_carried.push(NotCarried {
            kind: "deny_access_policy".into(),
            subject: p.scope.clone(),
            detail: format!(
                "DenyAccess on {} has no RBAC equivalent (RBAC only grants, docs/microsoft-365.md §3.8): keep the policy, or turn it into an allow-list scope first",
                p.scope
            ),
            blocks_execution: true,
        });
    }
    let restrict: Vec<&PolicyInput> = policies.iter().filter(|p| !p.deny).collect();
    for p in &restrict {
        let mut nested = p.nested_members.clone();
        nested.sort();
        nested.dedup();
        for m in nested {
            not_carried.push(NotCarried {
                kind: "nested_member".into(),
                detail: format!(
                    "{m} reaches {} only through a nested group; RBAC scopes see direct members only (docs/microsoft-365.md §3.4), so the app would lose it: add it to the group directly first",
                    p.scope
                ),
                subject: m,
                // Narrows access, never widens it: reported, not blocking.
                blocks_execution: false,
            });
        }
    }
    let mut mailbox: Vec<String> = entra_permissions
        .iter()
        .filter(|p| is_mailbox_permission(p))
        .cloned()
        .collect();
    mailbox.sort();
    mailbox.dedup();
    let mut create = Vec::new();
    for p in &mailbox {
        match role_for_permission(p) {
            Some(r) => create.push((p.clone(), r.name.to_string())),
            None => not_carried.push(NotCarried {
                kind: "permission_without_role".into(),
                subject: p.clone(),
                detail: format!(
                    "{p} is covered by the access policy but no RBAC application role grants it (docs/microsoft-365.md §3.2): removing the Entra grant would remove the permission"
                ),
                blocks_execution: true,
            }),
        }
    }
    let executable = !restrict.is_empty()
        && !create.is_empty()
        && not_carried.iter().all(|n| !n.blocks_execution);
    let mut scopes: Vec<String> = restrict.iter().map(|p| p.scope.clone()).collect();
    scopes.sort();
    scopes.dedup();
    // Two Graph-visible changes wait for the cache: the RBAC grant (before the consent goes)
    // and the consent's removal; the policy's removal changes nothing Graph serves.
    Plan {
        remove_entra_grants: create.iter().map(|(p, _)| p.clone()).collect(),
        create_assignments: create,
        remove_access_policies: policies.iter().map(|p| p.scope.clone()).collect(),
        scopes,
        not_carried,
        steps: Step::ORDER.to_vec(),
        expected_min_seconds: 2 * CACHE_MIN.as_secs(),
        expected_max_seconds: 2 * CACHE_MAX.as_secs(),
        executable,
    }
}

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Steps run one per job run.
    Running,
    /// Stopped before the next step: on request, or on an error that needs a person.
    Paused,
    /// Undoing, while the access policy still bounds the app.
    RollingBack,
    RolledBack,
    Succeeded,
    /// A rollback step failed for good: the app is still bounded by its access policy, but
    /// what the rollback did not undo stays (see the steps).
    Failed,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Running,
        State::Paused,
        State::RollingBack,
        State::RolledBack,
        State::Succeeded,
        State::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::RollingBack => "rolling_back",
            State::RolledBack => "rolled_back",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Nothing more happens to a migration in this state.
    pub fn is_final(self) -> bool {
        matches!(self, State::RolledBack | State::Succeeded | State::Failed)
    }
}

/// The steps of a rollback, in order: the consent comes back first (the policy still bounds
/// it), then the RBAC restrictions the migration created go (RBAC only grants, so removing it
/// narrows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackStep {
    RestoreEntraConsent,
    RemoveRbac,
}

impl RollbackStep {
    pub const ORDER: [RollbackStep; 2] =
        [RollbackStep::RestoreEntraConsent, RollbackStep::RemoveRbac];

    pub fn as_str(self) -> &'static str {
        match self {
            RollbackStep::RestoreEntraConsent => "restore_entra_consent",
            RollbackStep::RemoveRbac => "remove_rbac",
        }
    }
}

/// A step's state in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    /// Started (at least one attempt), not finished: waiting, or retrying after an error.
    Running,
    Done,
    Failed,
}

/// One line of the step log: forward steps by [`Step::as_str`], rollback steps by
/// [`RollbackStep::as_str`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepEntry {
    pub name: String,
    pub state: StepState,
    /// Runs that did work (polls of a check under way do not count).
    pub attempts: u32,
    /// What the step made or found (ids, verdicts); kept across attempts.
    #[serde(default)]
    pub output: serde_json::Value,
    pub last_error: Option<super::grant::StepError>,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The log of a new migration: every forward step, pending.
pub fn initial_log() -> Vec<StepEntry> {
    Step::ORDER
        .iter()
        .filter(|s| **s != Step::Done)
        .map(|s| StepEntry {
            name: s.as_str().to_string(),
            state: StepState::Pending,
            attempts: 0,
            output: serde_json::Value::Null,
            last_error: None,
            started_at: None,
            finished_at: None,
        })
        .collect()
}

/// Record one run of step `name`: its new state, its output (merged into what earlier attempts
/// recorded) and error. `attempt` counts the run as an attempt.
pub fn record(
    log: &mut Vec<StepEntry>,
    name: &str,
    state: StepState,
    output: Option<serde_json::Value>,
    error: Option<super::grant::StepError>,
    attempt: bool,
    now: chrono::DateTime<chrono::Utc>,
) {
    let i = match log.iter().position(|e| e.name == name) {
        Some(i) => i,
        None => {
            log.push(StepEntry {
                name: name.to_string(),
                state: StepState::Pending,
                attempts: 0,
                output: serde_json::Value::Null,
                last_error: None,
                started_at: None,
                finished_at: None,
            });
            log.len() - 1
        }
    };
    let e = &mut log[i];
    if attempt {
        e.attempts = e.attempts.saturating_add(1);
    }
    e.started_at.get_or_insert(now);
    e.state = state;
    if let Some(serde_json::Value::Object(new)) = output {
        match &mut e.output {
            serde_json::Value::Object(old) => old.extend(new),
            other => *other = serde_json::Value::Object(new),
        }
    }
    if error.is_some() || state == StepState::Done {
        e.last_error = error;
    }
    e.finished_at = matches!(state, StepState::Done | StepState::Failed).then_some(now);
}

/// Mark step `name` started, before a run of it calls Microsoft: a pending step becomes running
/// and gets its `started_at`. Attempts are counted when the run's result is recorded (a throttled
/// run is none); what [`rollback_allowed`] needs is known even if the run never returns.
pub fn mark_started(log: &mut Vec<StepEntry>, name: &str, now: chrono::DateTime<chrono::Utc>) {
    let i = match log.iter().position(|e| e.name == name) {
        Some(i) => i,
        None => {
            log.push(StepEntry {
                name: name.to_string(),
                state: StepState::Pending,
                attempts: 0,
                output: serde_json::Value::Null,
                last_error: None,
                started_at: None,
                finished_at: None,
            });
            log.len() - 1
        }
    };
    let e = &mut log[i];
    if e.state == StepState::Pending {
        e.state = StepState::Running;
    }
    e.started_at.get_or_insert(now);
}

/// The log entry of a step.
pub fn entry<'a>(log: &'a [StepEntry], name: &str) -> Option<&'a StepEntry> {
    log.iter().find(|e| e.name == name)
}

/// Rolling back is allowed while the step that removes the access policy has not started: once
/// a run of it began (even one that never returned, or was throttled after a first removal),
/// some policy may be gone and only RBAC bounds the app.
pub fn rollback_allowed(log: &[StepEntry]) -> bool {
    entry(log, Step::RemoveAccessPolicy.as_str())
        .is_none_or(|e| e.attempts == 0 && e.started_at.is_none())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn policy(scope: &str, deny: bool, nested: &[&str]) -> PolicyInput {
        PolicyInput {
            scope: scope.into(),
            deny,
            nested_members: nested.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn perms(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_policy_goes_last_and_rollback_ends_with_it() {
        let pos = |s| Step::ORDER.iter().position(|x| *x == s).unwrap();
        assert!(pos(Step::CreateRbac) < pos(Step::RemoveEntraConsent));
        assert!(pos(Step::RemoveEntraConsent) < pos(Step::RemoveAccessPolicy));
        assert_eq!(Step::VerifyRbac.next(), Step::RemoveEntraConsent);
        assert_eq!(Step::Done.next(), Step::Done);
        assert!(Step::VerifyEntraRemoved.can_roll_back());
        assert!(Step::RemoveAccessPolicy.can_roll_back(), "not run yet");
        assert!(!Step::VerifyPolicyRemoved.can_roll_back());
        assert!(!Step::Done.can_roll_back());
        for s in Step::ORDER {
            assert_eq!(Step::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn a_plain_restrict_policy_migrates() {
        let p = plan(
            &[policy("crm@contoso.com", false, &[])],
            &perms(&["Mail.Read", "User.Read.All"]),
        );
        assert!(p.executable, "{p:?}");
        assert_eq!(
            p.create_assignments,
            vec![("Mail.Read".to_string(), "Application Mail.Read".to_string())]
        );
        assert_eq!(p.remove_entra_grants, ["Mail.Read"]);
        assert_eq!(p.remove_access_policies, ["crm@contoso.com"]);
        assert!(p.not_carried.is_empty());
        assert_eq!(p.expected_max_seconds, 4 * 3600);
    }

    #[test]
    fn what_cannot_be_carried_is_named() {
        let p = plan(
            &[
                policy("crm@contoso.com", false, &["dave@contoso.com"]),
                policy("board@contoso.com", true, &[]),
            ],
            &perms(&["Mail.Read", "Mail.ReadBasic.All"]),
        );
        assert!(!p.executable);
        let kinds: Vec<(&str, &str)> = p
            .not_carried
            .iter()
            .map(|n| (n.kind.as_str(), n.subject.as_str()))
            .collect();
        assert!(kinds.contains(&("deny_access_policy", "board@contoso.com")));
        assert!(kinds.contains(&("nested_member", "dave@contoso.com")));
        assert!(kinds.contains(&("permission_without_role", "Mail.ReadBasic.All")));
        // A nested member alone narrows access: reported, executable.
        let p = plan(
            &[policy("crm@contoso.com", false, &["dave@contoso.com"])],
            &perms(&["Mail.Read"]),
        );
        assert!(p.executable);
        assert_eq!(p.not_carried.len(), 1);
    }

    #[test]
    fn nothing_to_migrate_is_not_executable() {
        assert!(!plan(&[], &perms(&["Mail.Read"])).executable);
        assert!(!plan(&[policy("a@b.c", false, &[])], &perms(&["User.Read.All"])).executable);
    }
    #[test]
    fn the_log_counts_attempts_keeps_outputs_and_closes_rollback_once_the_policy_step_ran() {
        let t = chrono::Utc::now();
        let mut log = initial_log();
        assert_eq!(log.len(), 6);
        assert!(log.iter().all(|e| e.state == StepState::Pending));
        record(
            &mut log,
            "create_rbac",
            StepState::Running,
            Some(serde_json::json!({"a": 1})),
            None,
            true,
            t,
        );
        record(
            &mut log,
            "create_rbac",
            StepState::Done,
            Some(serde_json::json!({"b": 2})),
            None,
            false,
            t,
        );
        let e = entry(&log, "create_rbac").unwrap();
        assert_eq!((e.attempts, e.state), (1, StepState::Done));
        assert_eq!(e.output, serde_json::json!({"a": 1, "b": 2}));
        assert!(e.finished_at.is_some());
        assert!(rollback_allowed(&log));
        record(
            &mut log,
            "remove_access_policy",
            StepState::Running,
            None,
            None,
            true,
            t,
        );
        assert!(!rollback_allowed(&log));
        record(
            &mut log,
            "remove_rbac",
            StepState::Done,
            None,
            None,
            true,
            t,
        );
        assert_eq!(log.len(), 7, "rollback steps are appended");
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        assert!(State::RolledBack.is_final() && !State::Paused.is_final());
    }

    #[test]
    fn a_started_policy_removal_closes_rollback_before_its_first_call_returns() {
        let t = chrono::Utc::now();
        let mut log = initial_log();
        mark_started(&mut log, "remove_access_policy", t);
        let e = entry(&log, "remove_access_policy").unwrap();
        assert_eq!((e.state, e.attempts), (StepState::Running, 0));
        assert!(!rollback_allowed(&log), "closed before the run is recorded");
        // Throttled after a first removal: no attempt counted, and rollback stays closed.
        record(
            &mut log,
            "remove_access_policy",
            StepState::Running,
            None,
            None,
            false,
            t,
        );
        assert!(!rollback_allowed(&log));
        // A failed step stays failed when a resumed run starts it again (a check that failed is
        // not looked at again).
        record(
            &mut log,
            "verify_rbac",
            StepState::Failed,
            None,
            None,
            true,
            t,
        );
        mark_started(&mut log, "verify_rbac", t);
        assert_eq!(entry(&log, "verify_rbac").unwrap().state, StepState::Failed);
    }
}
