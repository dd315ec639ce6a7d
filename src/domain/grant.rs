//! The access grant's saga as data: which step runs next, decided from the desired state and the
//! log of what each step produced. Pure, so the order that never widens an app's access is
//! stated (and tested) once, here.
//!
//! Onboarding with application access policies runs scope group → app → restriction → removal of
//! unscoped grants → consent → propagation check: the app is granted its mail permissions only
//! once its RestrictAccess policy exists, so at no step does it reach a mailbox the grant does
//! not allow (docs/microsoft-365.md §2.3: an app without a RestrictAccess policy reaches every
//! mailbox its consent covers). Offboarding revokes the consent first, then removes the
//! restriction, then the app and the scope group (only what mailscope created leaves the tenant).
//!
//! With RBAC for Applications the step list is the same, with other contents and one reason for
//! its order: RBAC role assignments grant the permissions inside their scope by themselves, while
//! an Entra consent for a mailbox permission reaches every mailbox whatever the scope (the union,
//! docs/microsoft-365.md §3.3). So the restriction (service principal pointer, role assignment
//! per permission on the scope group) comes first, then it is verified in and out of scope with
//! `Test-ServicePrincipalAuthorization` and only then any unscoped Entra consent goes (an adopted
//! vendor app usually holds one), and the consent step makes sure none is left: an RBAC grant's
//! app never holds an Entra consent for its mailbox permissions, not even for a moment.
//!
//! Every step is idempotent and records the grant revision it completed for. A new desired state
//! is a new revision, so every step runs again and converges from what the tenant has; a step
//! whose work is already done is a no-op in the tenant.
use serde::{Deserialize, Serialize};

/// How the grant restricts the app to its mailboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    /// Exchange application access policies (a RestrictAccess policy scoped to a group).
    AccessPolicy,
    /// RBAC for Applications (role assignments per permission scoped to the scope group; no
    /// Entra consent for the mailbox permissions). The default for new grants.
    Rbac,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::AccessPolicy => "access_policy",
            Mechanism::Rbac => "rbac",
        }
    }
}

/// One step of a grant's flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    ScopeGroup,
    App,
    Restriction,
    UnscopedGrants,
    Consent,
    PropagationCheck,
    RevokeConsent,
    RemoveRestriction,
    RemoveApp,
    RemoveScopeGroup,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::ScopeGroup => "scope_group",
            Step::App => "app",
            Step::Restriction => "restriction",
            Step::UnscopedGrants => "unscoped_grants",
            Step::Consent => "consent",
            Step::PropagationCheck => "propagation_check",
            Step::RevokeConsent => "revoke_consent",
            Step::RemoveRestriction => "remove_restriction",
            Step::RemoveApp => "remove_app",
            Step::RemoveScopeGroup => "remove_scope_group",
        }
    }
}

/// Onboarding with application access policies: the restriction exists before the consent.
pub const ONBOARD_ACCESS_POLICY: [Step; 6] = [
    Step::ScopeGroup,
    Step::App,
    Step::Restriction,
    Step::UnscopedGrants,
    Step::Consent,
    Step::PropagationCheck,
];

/// Onboarding with RBAC for Applications: the scoped role assignments exist and are verified
/// before any unscoped Entra consent is removed, and the consent step leaves none.
pub const ONBOARD_RBAC: [Step; 6] = [
    Step::ScopeGroup,
    Step::App,
    Step::Restriction,
    Step::UnscopedGrants,
    Step::Consent,
    Step::PropagationCheck,
];

/// Offboarding: no mail permission left before the restriction goes.
pub const OFFBOARD: [Step; 4] = [
    Step::RevokeConsent,
    Step::RemoveRestriction,
    Step::RemoveApp,
    Step::RemoveScopeGroup,
];

/// The grant's overall condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// Accepted; no step of this revision has run yet.
    Pending,
    Provisioning,
    /// Everything is written; waiting for the propagation check to prove it in force.
    Propagating,
    Ready,
    Failed,
    Removing,
    Removed,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Pending => "pending",
            Condition::Provisioning => "provisioning",
            Condition::Propagating => "propagating",
            Condition::Ready => "ready",
            Condition::Failed => "failed",
            Condition::Removing => "removing",
            Condition::Removed => "removed",
        }
    }

    pub fn parse(s: &str) -> Option<Condition> {
        [
            Condition::Pending,
            Condition::Provisioning,
            Condition::Propagating,
            Condition::Ready,
            Condition::Failed,
            Condition::Removing,
            Condition::Removed,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }

    /// No job works on the grant in this condition until its desired state changes.
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            Condition::Ready | Condition::Failed | Condition::Removed
        )
    }
}

/// Where one step stands within the revision it last ran for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Started and not finished (a propagation check being waited for, or a retry pending).
    Running,
    Done,
    Failed,
}

/// Why a step failed, for a person: what happened and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepError {
    /// A stable code (the problem type's last segment).
    pub code: String,
    pub cause: String,
    pub fix: String,
}

/// The log entry of one step: what it produced for the revision it last ran for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepEntry {
    pub step: Step,
    pub revision: i64,
    pub state: StepState,
    /// Runs within `revision` (a poll of a running check is not a new attempt).
    pub attempts: i32,
    /// What the step produced (ids of the objects it made or found, a note when it had nothing
    /// to do).
    #[serde(default)]
    pub output: serde_json::Value,
    #[serde(default)]
    pub last_error: Option<StepError>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// The desired state as the saga sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub revision: i64,
    pub removing: bool,
    pub mechanism: Mechanism,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Run(Step),
    /// Every step of the revision is done (`Ready` or `Removed`), or one failed (`Failed`).
    Settled(Condition),
}

/// The steps of the plan's flow, in order.
pub fn flow(plan: &Plan) -> &'static [Step] {
    if plan.removing {
        &OFFBOARD
    } else {
        match plan.mechanism {
            Mechanism::AccessPolicy => &ONBOARD_ACCESS_POLICY,
            Mechanism::Rbac => &ONBOARD_RBAC,
        }
    }
}

fn entry(log: &[StepEntry], step: Step) -> Option<&StepEntry> {
    log.iter().find(|e| e.step == step)
}

/// The next step: the first one of the flow not done for the current revision. A step that
/// failed for this revision settles the grant as failed (a new desired state, or the same one
/// PUT again, starts a new revision).
pub fn next(plan: &Plan, log: &[StepEntry]) -> Next {
    for step in flow(plan) {
        match entry(log, *step) {
            Some(e) if e.revision == plan.revision && e.state == StepState::Done => continue,
            Some(e) if e.revision == plan.revision && e.state == StepState::Failed => {
                return Next::Settled(Condition::Failed);
            }
            _ => return Next::Run(*step),
        }
    }
    Next::Settled(if plan.removing {
        Condition::Removed
    } else {
        Condition::Ready
    })
}

/// The overall condition from the plan and the log.
pub fn condition(plan: &Plan, log: &[StepEntry]) -> Condition {
    match next(plan, log) {
        Next::Settled(c) => c,
        Next::Run(_) if plan.removing => Condition::Removing,
        Next::Run(Step::PropagationCheck) => Condition::Propagating,
        Next::Run(_) if log.iter().any(|e| e.revision == plan.revision) => Condition::Provisioning,
        Next::Run(_) => Condition::Pending,
    }
}

/// How a step's entry reads for the current revision: `pending` until it runs in it.
pub fn display_state(plan: &Plan, e: Option<&StepEntry>) -> &'static str {
    match e {
        Some(e) if e.revision == plan.revision => match e.state {
            StepState::Running => "running",
            StepState::Done => "done",
            StepState::Failed => "failed",
        },
        _ => "pending",
    }
}

/// Record a step's result in the log: replaces its entry. Attempts count within a revision.
#[allow(clippy::too_many_arguments)]
pub fn record(
    log: &mut Vec<StepEntry>,
    step: Step,
    revision: i64,
    state: StepState,
    output: Option<serde_json::Value>,
    error: Option<StepError>,
    new_attempt: bool,
    now: chrono::DateTime<chrono::Utc>,
) {
    let previous = log.iter().position(|e| e.step == step);
    let (attempts, old_output) = match previous.map(|i| &log[i]) {
        Some(e) if e.revision == revision => (e.attempts, e.output.clone()),
        Some(e) => (0, e.output.clone()),
        None => (0, serde_json::Value::Null),
    };
    let e = StepEntry {
        step,
        revision,
        state,
        attempts: attempts + i32::from(new_attempt),
        output: output.unwrap_or(old_output),
        last_error: error,
        updated_at: now,
    };
    match previous {
        Some(i) => log[i] = e,
        None => log.push(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(revision: i64, removing: bool) -> Plan {
        Plan {
            revision,
            removing,
            mechanism: Mechanism::AccessPolicy,
        }
    }

    fn done(log: &mut Vec<StepEntry>, step: Step, revision: i64) {
        record(
            log,
            step,
            revision,
            StepState::Done,
            None,
            None,
            true,
            chrono::Utc::now(),
        );
    }

    #[test]
    fn onboarding_restricts_before_it_consents() {
        let p = plan(1, false);
        let mut log = Vec::new();
        let mut order = Vec::new();
        while let Next::Run(s) = next(&p, &log) {
            order.push(s);
            done(&mut log, s, 1);
        }
        assert_eq!(order, ONBOARD_ACCESS_POLICY.to_vec());
        let restriction = order.iter().position(|s| *s == Step::Restriction);
        let consent = order.iter().position(|s| *s == Step::Consent);
        assert!(
            restriction < consent,
            "consent only once the restriction exists"
        );
        assert_eq!(next(&p, &log), Next::Settled(Condition::Ready));
        assert_eq!(condition(&p, &log), Condition::Ready);
    }

    #[test]
    fn offboarding_revokes_consent_before_removing_the_restriction() {
        let p = plan(2, true);
        let mut log = Vec::new();
        for s in ONBOARD_ACCESS_POLICY {
            done(&mut log, s, 1);
        }
        assert_eq!(condition(&p, &log), Condition::Removing);
        let mut order = Vec::new();
        while let Next::Run(s) = next(&p, &log) {
            order.push(s);
            done(&mut log, s, 2);
        }
        assert_eq!(order, OFFBOARD.to_vec());
        assert_eq!(condition(&p, &log), Condition::Removed);
    }

    #[test]
    fn rbac_onboarding_restricts_and_removes_unscoped_grants_before_the_consent_step() {
        let p = Plan {
            revision: 1,
            removing: false,
            mechanism: Mechanism::Rbac,
        };
        let mut log = Vec::new();
        let mut order = Vec::new();
        while let Next::Run(s) = next(&p, &log) {
            order.push(s);
            done(&mut log, s, 1);
        }
        let at = |s: Step| order.iter().position(|x| *x == s).unwrap();
        assert!(at(Step::Restriction) < at(Step::UnscopedGrants));
        assert!(at(Step::UnscopedGrants) < at(Step::Consent));
        assert_eq!(order.last(), Some(&Step::PropagationCheck));
        assert_eq!(condition(&p, &log), Condition::Ready);
        let off = Plan {
            revision: 2,
            removing: true,
            mechanism: Mechanism::Rbac,
        };
        assert_eq!(next(&off, &log), Next::Run(Step::RevokeConsent));
    }

    #[test]
    fn conditions_follow_the_log() {
        let p = plan(1, false);
        let mut log = Vec::new();
        assert_eq!(condition(&p, &log), Condition::Pending);
        done(&mut log, Step::ScopeGroup, 1);
        assert_eq!(condition(&p, &log), Condition::Provisioning);
        for s in [
            Step::App,
            Step::Restriction,
            Step::UnscopedGrants,
            Step::Consent,
        ] {
            done(&mut log, s, 1);
        }
        assert_eq!(condition(&p, &log), Condition::Propagating);
    }

    #[test]
    fn a_new_revision_runs_every_step_again_from_the_first() {
        let mut log = Vec::new();
        for s in ONBOARD_ACCESS_POLICY {
            done(&mut log, s, 1);
        }
        let p2 = plan(2, false);
        assert_eq!(next(&p2, &log), Next::Run(Step::ScopeGroup));
        assert_eq!(display_state(&p2, log.first()), "pending");
        // Work of the old revision is no proof for the new one.
        assert_eq!(condition(&p2, &log), Condition::Pending);
        done(&mut log, Step::ScopeGroup, 2);
        assert_eq!(next(&p2, &log), Next::Run(Step::App));
        assert_eq!(log[0].attempts, 1, "attempts count within a revision");
    }

    #[test]
    fn a_failed_step_settles_the_grant_and_a_resumed_one_continues_where_it_was() {
        let p = plan(1, false);
        let mut log = Vec::new();
        done(&mut log, Step::ScopeGroup, 1);
        // A crash after the app step ran but before it was recorded: the log still says App.
        assert_eq!(next(&p, &log), Next::Run(Step::App));
        record(
            &mut log,
            Step::App,
            1,
            StepState::Running,
            None,
            Some(StepError {
                code: "m365_unavailable".into(),
                cause: "Graph answered 503".into(),
                fix: "mailscope retries".into(),
            }),
            true,
            chrono::Utc::now(),
        );
        assert_eq!(
            next(&p, &log),
            Next::Run(Step::App),
            "a retry runs it again"
        );
        record(
            &mut log,
            Step::App,
            1,
            StepState::Failed,
            None,
            None,
            true,
            chrono::Utc::now(),
        );
        assert_eq!(next(&p, &log), Next::Settled(Condition::Failed));
        assert_eq!(log[1].attempts, 2);
        // Nothing after the failed step runs: in particular no consent.
        assert_eq!(condition(&p, &log), Condition::Failed);
    }

    #[test]
    fn a_poll_keeps_the_output_and_is_not_an_attempt() {
        let mut log = Vec::new();
        let now = chrono::Utc::now();
        let out = serde_json::json!({"check_id": "c"});
        record(
            &mut log,
            Step::PropagationCheck,
            1,
            StepState::Running,
            Some(out.clone()),
            None,
            true,
            now,
        );
        record(
            &mut log,
            Step::PropagationCheck,
            1,
            StepState::Running,
            None,
            None,
            false,
            now,
        );
        assert_eq!(log[0].attempts, 1);
        assert_eq!(log[0].output, out);
    }
}
