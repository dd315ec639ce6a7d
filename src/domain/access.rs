//! Exchange Online's application access rules, as pure functions over plain data.
//!
//! Three mechanisms decide whether an app may touch a mailbox (docs/microsoft-365.md §2–§3, §7):
//! - Application Access Policies (AAP): four ordered rules (docs/microsoft-365.md §2.3) that constrain only
//!   Entra-granted permissions;
//! - RBAC for Applications: role assignments scoped by management scopes, administrative units or
//!   groups (see [`crate::domain::rbac`]);
//! - the union of both: an app reaches a mailbox if an Entra grant survives the AAP rules *or* an
//!   RBAC assignment covers the mailbox ([`authorize_mailbox_call`]).
//!
//! Nested group membership is uncertain in Microsoft's behaviour (docs/microsoft-365.md §2.5, §3.4), so every function
//! that expands groups takes a [`NestedGroups`] mode instead of picking one.
//! Nothing here performs I/O; mailscope reuses these functions for local evaluation and the sandbox
//! uses them to answer as Exchange would.
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

// The `-AccessRight` of an application access policy: the one type for it, in the API, the
// connector and the rules. (A plain comment: a doc comment would become the schema's
// description, and the published spec has none for it.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum AccessRight {
    /// The app reaches only the scope's mailboxes.
    RestrictAccess,
    /// The app reaches every mailbox except the scope's.
    DenyAccess,
}

impl AccessRight {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessRight::RestrictAccess => "RestrictAccess",
            AccessRight::DenyAccess => "DenyAccess",
        }
    }

    /// Exchange binds enum parameters case-insensitively.
    pub fn parse(s: &str) -> Option<AccessRight> {
        if s.eq_ignore_ascii_case("RestrictAccess") {
            Some(AccessRight::RestrictAccess)
        } else if s.eq_ignore_ascii_case("DenyAccess") {
            Some(AccessRight::DenyAccess)
        } else {
            None
        }
    }
}

/// The AppId value that makes a policy apply to every app.
pub const ALL_APPS: &str = "*";

/// One application access policy, reduced to what evaluation needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessPolicy {
    /// The client id (application id) the policy names, or [`ALL_APPS`].
    pub app_id: String,
    /// Object id of the scope: a mail-enabled security group, or a single mailbox / mail user.
    pub scope_id: String,
    pub access_right: AccessRight,
}

impl AccessPolicy {
    /// Client ids are GUIDs; Exchange compares them case-insensitively.
    pub fn applies_to_app(&self, app_id: &str) -> bool {
        self.app_id == ALL_APPS || self.app_id.eq_ignore_ascii_case(app_id)
    }
}

/// Whether membership of nested groups counts (docs/microsoft-365.md §2.5 AAP, §3.4 RBAC: both unverified).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NestedGroups {
    /// Members of member groups count, at any depth.
    #[default]
    Transitive,
    /// Only direct members count.
    DirectOnly,
}

/// Direct members of each group, by group object id. Ids not present as keys are not groups.
pub type GroupMembers = BTreeMap<String, Vec<String>>;

/// Is `recipient_id` inside `scope_id`? A scope that is the recipient itself contains it.
pub fn scope_contains(
    members: &GroupMembers,
    scope_id: &str,
    recipient_id: &str,
    nested: NestedGroups,
) -> bool {
    if scope_id.eq_ignore_ascii_case(recipient_id) {
        return true;
    }
    let Some(direct) = members.get(scope_id) else {
        return false;
    };
    match nested {
        NestedGroups::DirectOnly => direct.iter().any(|m| m.eq_ignore_ascii_case(recipient_id)),
        NestedGroups::Transitive => transitive_members(members, scope_id)
            .iter()
            .any(|m| m.eq_ignore_ascii_case(recipient_id)),
    }
}

/// Every member reachable from `group_id` through nested groups, groups included, the group
/// itself excluded. Cycles (which Exchange allows) terminate.
pub fn transitive_members(members: &GroupMembers, group_id: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut queue: VecDeque<&str> = VecDeque::from([group_id]);
    while let Some(g) = queue.pop_front() {
        for m in members.get(g).into_iter().flatten() {
            if m != group_id && seen.insert(m.clone()) && members.contains_key(m.as_str()) {
                queue.push_back(m);
            }
        }
    }
    seen
}

/// What "flattening" a scope group yields: every non-group recipient reachable from it. mailscope
/// makes these direct members so the result is the same whichever nested mode Exchange applies.
pub fn flatten_group(members: &GroupMembers, group_id: &str) -> BTreeSet<String> {
    transitive_members(members, group_id)
        .into_iter()
        .filter(|m| !members.contains_key(m))
        .collect()
}

/// Groups (by id) that contain `recipient_id` directly, or at any depth when transitive.
pub fn groups_containing(
    members: &GroupMembers,
    recipient_id: &str,
    nested: NestedGroups,
) -> BTreeSet<String> {
    members
        .keys()
        .filter(|g| g.as_str() != recipient_id && scope_contains(members, g, recipient_id, nested))
        .cloned()
        .collect()
}

/// `RecipientTypeDetails` values accepted as `-PolicyScopeGroupId` (docs/microsoft-365.md §2.4). Shared, room and
/// equipment mailboxes, Microsoft 365 groups, distribution groups and the rest are refused.
pub const POLICY_SCOPE_TYPES: &[&str] = &["UserMailbox", "MailUser", "MailUniversalSecurityGroup"];

/// May a recipient of this `RecipientTypeDetails` be an application access policy scope?
pub fn policy_scope_allowed(recipient_type_details: &str) -> bool {
    POLICY_SCOPE_TYPES
        .iter()
        .any(|t| t.eq_ignore_ascii_case(recipient_type_details))
}

/// Rule 4's trap (docs/microsoft-365.md §2.3): would this change leave the app without any RestrictAccess policy, so
/// that it silently reaches every mailbox? `removed` is the access right of the policy going away
/// (`None` when nothing in force goes), `added` that of the policy taking its place (`None` for a
/// plain removal), `others` every other policy in force (`*` policies count).
pub fn leaves_app_unrestricted(
    app_id: &str,
    removed: Option<AccessRight>,
    added: Option<AccessRight>,
    others: &[AccessPolicy],
) -> bool {
    removed == Some(AccessRight::RestrictAccess)
        && added != Some(AccessRight::RestrictAccess)
        && !others
            .iter()
            .any(|p| p.access_right == AccessRight::RestrictAccess && p.applies_to_app(app_id))
}

/// Would removing (or replacing) a policy widen what the app can reach? Only when it leaves the
/// app without a RestrictAccess policy ([`leaves_app_unrestricted`]) *and* the app holds an
/// application permission that policies restrict (`covered_permissions_held`, from its actual
/// grants): an app with no such permission reaches no mailbox with or without a policy, so its
/// last policy can go — which is how an app is wound down (revoke, then remove the policy).
pub fn removal_widens_access(
    app_id: &str,
    removed: Option<AccessRight>,
    added: Option<AccessRight>,
    others: &[AccessPolicy],
    covered_permissions_held: bool,
) -> bool {
    covered_permissions_held && leaves_app_unrestricted(app_id, removed, added, others)
}

/// Which of the four documented rules (docs/microsoft-365.md §2.3) decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AccessRule {
    /// Rule 1: a DenyAccess policy matches the app and the mailbox.
    DenyMatch,
    /// Rule 2: a RestrictAccess policy matches the app and the mailbox.
    RestrictMatch,
    /// Rule 3: the app has RestrictAccess policies, but none covers the mailbox.
    RestrictMiss,
    /// Rule 4: no policy concerns this app and mailbox.
    NoPolicy,
}

/// The outcome of application access policy evaluation for one app and one mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessDecision {
    pub granted: bool,
    pub rule: AccessRule,
    /// Indices (into the given policy slice) of the policies that matched app and mailbox.
    pub matched: Vec<usize>,
}

impl AccessDecision {
    /// `Granted` / `Denied`, as `Test-ApplicationAccessPolicy` reports `AccessCheckResult`.
    pub fn access_check_result(&self) -> &'static str {
        if self.granted { "Granted" } else { "Denied" }
    }
}

/// Apply the four rules, in order, for `app_id` (a client id) against `mailbox_id`.
pub fn evaluate_application_access(
    app_id: &str,
    mailbox_id: &str,
    policies: &[AccessPolicy],
    members: &GroupMembers,
    nested: NestedGroups,
) -> AccessDecision {
    let for_app: Vec<(usize, &AccessPolicy)> = policies
        .iter()
        .enumerate()
        .filter(|(_, p)| p.applies_to_app(app_id))
        .collect();
    let matching = |right: AccessRight| -> Vec<usize> {
        for_app
            .iter()
            .filter(|(_, p)| {
                p.access_right == right && scope_contains(members, &p.scope_id, mailbox_id, nested)
            })
            .map(|(i, _)| *i)
            .collect()
    };
    let denies = matching(AccessRight::DenyAccess);
    if !denies.is_empty() {
        return AccessDecision {
            granted: false,
            rule: AccessRule::DenyMatch,
            matched: denies,
        };
    }
    let restricts = matching(AccessRight::RestrictAccess);
    if !restricts.is_empty() {
        return AccessDecision {
            granted: true,
            rule: AccessRule::RestrictMatch,
            matched: restricts,
        };
    }
    if for_app
        .iter()
        .any(|(_, p)| p.access_right == AccessRight::RestrictAccess)
    {
        return AccessDecision {
            granted: false,
            rule: AccessRule::RestrictMiss,
            matched: vec![],
        };
    }
    AccessDecision {
        granted: true,
        rule: AccessRule::NoPolicy,
        matched: vec![],
    }
}

/// Microsoft Graph application permissions that application access policies restrict (docs/microsoft-365.md §7).
/// `full_access_as_app` is the EWS permission on the Exchange resource.
pub const POLICY_RESTRICTED_PERMISSIONS: &[&str] = &[
    "Mail.Read",
    "Mail.ReadBasic",
    "Mail.ReadBasic.All",
    "Mail.ReadWrite",
    "Mail.Send",
    "MailboxSettings.Read",
    "MailboxSettings.ReadWrite",
    "Calendars.Read",
    "Calendars.ReadWrite",
    "Contacts.Read",
    "Contacts.ReadWrite",
    "full_access_as_app",
];

/// Does an application access policy constrain this (application) permission?
pub fn policy_restricts(permission: &str) -> bool {
    POLICY_RESTRICTED_PERMISSIONS
        .iter()
        .any(|p| p.eq_ignore_ascii_case(permission))
}

/// How a mailbox call was (or was not) authorized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MailboxAccess {
    /// Allowed; `permission` is the accepted permission that let it through.
    Granted { permission: String, via: GrantPath },
    /// The app holds an accepted Entra permission, but application access policies deny this
    /// mailbox and no RBAC assignment covers it. Graph answers `ErrorAccessDenied` /
    /// "Access to OData is disabled".
    DeniedByPolicy { rule: AccessRule },
    /// The app holds none of the accepted permissions, from Entra or RBAC.
    NoPermission,
}

/// Where a granted permission came from (docs/microsoft-365.md §3.3: effective rights are the union).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GrantPath {
    /// An Entra app-role grant that the application access policies let through.
    Entra,
    /// A scoped RBAC for Applications assignment that covers the mailbox.
    Rbac,
}

/// Decide one mailbox call.
///
/// - `accepted`: the permissions any of which lets the operation through (e.g. a message read
///   accepts Mail.ReadBasic, Mail.Read and Mail.ReadWrite);
/// - `entra_permissions`: the app's Entra application permissions (the token's `roles`);
/// - `policy_decision`: AAP evaluation for this app and mailbox;
/// - `rbac_permissions`: permissions RBAC grants the app *on this mailbox* (already scoped, see
///   [`crate::domain::rbac::rbac_permissions_on`]).
///
/// AAP constrains only Entra grants of the permissions it covers; RBAC grants are unaffected.
pub fn authorize_mailbox_call(
    accepted: &[&str],
    entra_permissions: &[String],
    policy_decision: &AccessDecision,
    rbac_permissions: &BTreeSet<String>,
) -> MailboxAccess {
    let held = |set: &mut dyn Iterator<Item = &String>| -> Option<String> {
        let held: Vec<&String> = set.collect();
        accepted
            .iter()
            .find(|a| held.iter().any(|h| h.eq_ignore_ascii_case(a)))
            .map(|a| (*a).to_string())
    };
    let entra = held(&mut entra_permissions.iter());
    if let Some(p) = &entra
        && (policy_decision.granted || !policy_restricts(p))
    {
        return MailboxAccess::Granted {
            permission: p.clone(),
            via: GrantPath::Entra,
        };
    }
    // An unrestricted permission among the other accepted ones also passes.
    if let Some(p) = accepted.iter().find(|a| {
        !policy_restricts(a) && entra_permissions.iter().any(|h| h.eq_ignore_ascii_case(a))
    }) {
        return MailboxAccess::Granted {
            permission: (*p).to_string(),
            via: GrantPath::Entra,
        };
    }
    if let Some(p) = held(&mut rbac_permissions.iter()) {
        return MailboxAccess::Granted {
            permission: p,
            via: GrantPath::Rbac,
        };
    }
    match entra {
        Some(_) => MailboxAccess::DeniedByPolicy {
            rule: policy_decision.rule,
        },
        None => MailboxAccess::NoPermission,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const APP: &str = "11111111-1111-1111-1111-111111111111";
    const OTHER_APP: &str = "22222222-2222-2222-2222-222222222222";
    const ALICE: &str = "alice";
    const BOB: &str = "bob";
    const CAROL: &str = "carol";

    fn members() -> GroupMembers {
        let mut m = GroupMembers::new();
        m.insert("g-sales".into(), vec![ALICE.into()]);
        m.insert("g-finance".into(), vec![BOB.into(), "g-sub".into()]);
        m.insert("g-sub".into(), vec![CAROL.into()]);
        m
    }

    fn policy(app: &str, scope: &str, right: AccessRight) -> AccessPolicy {
        AccessPolicy {
            app_id: app.into(),
            scope_id: scope.into(),
            access_right: right,
        }
    }

    fn eval(policies: &[AccessPolicy], mailbox: &str) -> AccessDecision {
        evaluate_application_access(APP, mailbox, policies, &members(), NestedGroups::Transitive)
    }

    #[test]
    fn rule4_no_policy_grants_every_mailbox() {
        let d = eval(&[], ALICE);
        assert_eq!((d.granted, d.rule), (true, AccessRule::NoPolicy));
        assert_eq!(d.access_check_result(), "Granted");
    }

    #[test]
    fn rule2_restrict_match_grants_members() {
        let p = [policy(APP, "g-sales", AccessRight::RestrictAccess)];
        let d = eval(&p, ALICE);
        assert_eq!(
            (d.granted, d.rule, d.matched.clone()),
            (true, AccessRule::RestrictMatch, vec![0])
        );
    }

    #[test]
    fn rule3_restrict_miss_denies_others() {
        let p = [policy(APP, "g-sales", AccessRight::RestrictAccess)];
        let d = eval(&p, BOB);
        assert_eq!((d.granted, d.rule), (false, AccessRule::RestrictMiss));
        assert_eq!(d.access_check_result(), "Denied");
    }

    #[test]
    fn rule1_deny_wins_over_restrict_on_same_mailbox() {
        let p = [
            policy(APP, "g-sales", AccessRight::RestrictAccess),
            policy(APP, "g-sales", AccessRight::DenyAccess),
        ];
        let d = eval(&p, ALICE);
        assert_eq!(
            (d.granted, d.rule, d.matched.clone()),
            (false, AccessRule::DenyMatch, vec![1])
        );
    }

    #[test]
    fn rule1_deny_only_allows_everyone_else() {
        let p = [policy(APP, "g-sales", AccessRight::DenyAccess)];
        assert_eq!(eval(&p, ALICE).rule, AccessRule::DenyMatch);
        let d = eval(&p, BOB);
        assert_eq!((d.granted, d.rule), (true, AccessRule::NoPolicy));
    }

    #[test]
    fn deny_plus_restrict_elsewhere_miss_is_rule3() {
        // Deny on finance, restrict to sales: a mailbox in neither is denied by rule 3.
        let p = [
            policy(APP, "g-finance", AccessRight::DenyAccess),
            policy(APP, "g-sales", AccessRight::RestrictAccess),
        ];
        assert_eq!(eval(&p, "dave").rule, AccessRule::RestrictMiss);
        assert_eq!(eval(&p, BOB).rule, AccessRule::DenyMatch);
        assert_eq!(eval(&p, ALICE).rule, AccessRule::RestrictMatch);
    }

    #[test]
    fn several_restrict_policies_grant_the_union() {
        let p = [
            policy(APP, "g-sales", AccessRight::RestrictAccess),
            policy(APP, "g-finance", AccessRight::RestrictAccess),
        ];
        assert!(eval(&p, ALICE).granted);
        assert!(eval(&p, BOB).granted);
        assert!(!eval(&p, "dave").granted);
    }

    #[test]
    fn policies_of_other_apps_do_not_apply() {
        let p = [policy(OTHER_APP, "g-sales", AccessRight::RestrictAccess)];
        assert_eq!(eval(&p, BOB).rule, AccessRule::NoPolicy);
        let p = [policy(OTHER_APP, "g-sales", AccessRight::DenyAccess)];
        assert_eq!(eval(&p, ALICE).rule, AccessRule::NoPolicy);
    }

    #[test]
    fn star_policy_applies_to_every_app() {
        let p = [policy(ALL_APPS, "g-sales", AccessRight::RestrictAccess)];
        assert_eq!(eval(&p, BOB).rule, AccessRule::RestrictMiss);
        let d =
            evaluate_application_access(OTHER_APP, ALICE, &p, &members(), NestedGroups::DirectOnly);
        assert_eq!(d.rule, AccessRule::RestrictMatch);
    }

    #[test]
    fn app_id_comparison_ignores_case() {
        let p = [policy(
            &APP.to_uppercase(),
            "g-sales",
            AccessRight::RestrictAccess,
        )];
        assert_eq!(eval(&p, ALICE).rule, AccessRule::RestrictMatch);
    }

    #[test]
    fn a_mailbox_can_be_its_own_scope() {
        let p = [policy(APP, ALICE, AccessRight::RestrictAccess)];
        assert!(eval(&p, ALICE).granted);
        assert!(!eval(&p, BOB).granted);
    }

    #[test]
    fn removing_last_restrict_reopens_tenant() {
        let mut p = vec![policy(APP, "g-sales", AccessRight::RestrictAccess)];
        assert!(!eval(&p, BOB).granted);
        p.clear();
        assert!(eval(&p, BOB).granted);
    }

    #[test]
    fn nested_membership_follows_the_mode() {
        let p = [policy(APP, "g-finance", AccessRight::RestrictAccess)];
        let t = evaluate_application_access(APP, CAROL, &p, &members(), NestedGroups::Transitive);
        assert_eq!(t.rule, AccessRule::RestrictMatch);
        let d = evaluate_application_access(APP, CAROL, &p, &members(), NestedGroups::DirectOnly);
        assert_eq!(d.rule, AccessRule::RestrictMiss);
        let deny = [policy(APP, "g-finance", AccessRight::DenyAccess)];
        let d =
            evaluate_application_access(APP, CAROL, &deny, &members(), NestedGroups::DirectOnly);
        assert_eq!(d.rule, AccessRule::NoPolicy);
        let t =
            evaluate_application_access(APP, CAROL, &deny, &members(), NestedGroups::Transitive);
        assert_eq!(t.rule, AccessRule::DenyMatch);
    }

    #[test]
    fn every_rule_combination_matches_the_table() {
        // Exhaustive over: deny policy matches? restrict matches? app has other restrict policy?
        for deny_match in [false, true] {
            for restrict_match in [false, true] {
                for restrict_elsewhere in [false, true] {
                    let mut p = vec![];
                    if deny_match {
                        p.push(policy(APP, "g-sales", AccessRight::DenyAccess));
                    }
                    if restrict_match {
                        p.push(policy(APP, "g-sales", AccessRight::RestrictAccess));
                    }
                    if restrict_elsewhere {
                        p.push(policy(APP, "g-finance", AccessRight::RestrictAccess));
                    }
                    let d = eval(&p, ALICE);
                    let expected = if deny_match {
                        AccessRule::DenyMatch
                    } else if restrict_match {
                        AccessRule::RestrictMatch
                    } else if restrict_elsewhere {
                        AccessRule::RestrictMiss
                    } else {
                        AccessRule::NoPolicy
                    };
                    assert_eq!(
                        d.rule, expected,
                        "{deny_match} {restrict_match} {restrict_elsewhere}"
                    );
                    assert_eq!(
                        d.granted,
                        matches!(expected, AccessRule::RestrictMatch | AccessRule::NoPolicy)
                    );
                }
            }
        }
    }

    #[test]
    fn transitive_members_survive_cycles() {
        let mut m = members();
        m.insert("g-sub".into(), vec![CAROL.into(), "g-finance".into()]);
        let all = transitive_members(&m, "g-finance");
        assert!(all.contains(CAROL) && all.contains("g-sub") && !all.contains("g-finance"));
        assert_eq!(
            flatten_group(&m, "g-finance"),
            BTreeSet::from([BOB.into(), CAROL.into()])
        );
    }

    #[test]
    fn groups_containing_respects_mode() {
        let m = members();
        assert_eq!(
            groups_containing(&m, CAROL, NestedGroups::Transitive),
            BTreeSet::from(["g-finance".into(), "g-sub".into()])
        );
        assert_eq!(
            groups_containing(&m, CAROL, NestedGroups::DirectOnly),
            BTreeSet::from(["g-sub".into()])
        );
    }

    #[test]
    fn scope_types_follow_the_table() {
        for ok in ["UserMailbox", "MailUser", "MailUniversalSecurityGroup"] {
            assert!(policy_scope_allowed(ok), "{ok}");
        }
        for bad in [
            "SharedMailbox",
            "RoomMailbox",
            "EquipmentMailbox",
            "GroupMailbox",
            "MailUniversalDistributionGroup",
            "DynamicDistributionGroup",
            "MailContact",
            "PublicFolder",
            "DiscoveryMailbox",
        ] {
            assert!(!policy_scope_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn only_losing_the_last_restrict_policy_leaves_the_app_unrestricted() {
        use AccessRight::{DenyAccess as Deny, RestrictAccess as Restrict};
        let policy = |app: &str, right| AccessPolicy {
            app_id: app.into(),
            scope_id: "g".into(),
            access_right: right,
        };
        let restrict = Some(Restrict);
        // The last RestrictAccess goes, or turns into DenyAccess: unrestricted.
        assert!(leaves_app_unrestricted(APP, restrict, None, &[]));
        assert!(leaves_app_unrestricted(APP, restrict, Some(Deny), &[]));
        // Another app's RestrictAccess or this app's DenyAccess does not keep it restricted.
        let others = [policy(OTHER_APP, Restrict), policy(APP, Deny)];
        assert!(leaves_app_unrestricted(APP, restrict, None, &others));
        // Another RestrictAccess of this app (any case) or of every app keeps it restricted.
        assert!(!leaves_app_unrestricted(
            APP,
            restrict,
            None,
            &[policy(&APP.to_uppercase(), Restrict)]
        ));
        assert!(!leaves_app_unrestricted(
            APP,
            restrict,
            None,
            &[policy(ALL_APPS, Restrict)]
        ));
        // Replaced by a RestrictAccess, or removing a DenyAccess (or nothing): still as restricted.
        assert!(!leaves_app_unrestricted(APP, restrict, restrict, &[]));
        assert!(!leaves_app_unrestricted(APP, Some(Deny), None, &[]));
        assert!(!leaves_app_unrestricted(APP, None, None, &[]));
        // Without a mail permission the app reaches nothing either way: nothing widens.
        assert!(removal_widens_access(APP, restrict, None, &[], true));
        assert!(!removal_widens_access(APP, restrict, None, &[], false));
        assert!(!removal_widens_access(APP, restrict, restrict, &[], true));
    }

    #[test]
    fn access_right_parses_case_insensitively() {
        assert_eq!(
            AccessRight::parse("restrictaccess"),
            Some(AccessRight::RestrictAccess)
        );
        assert_eq!(
            AccessRight::parse("DENYACCESS"),
            Some(AccessRight::DenyAccess)
        );
        assert_eq!(AccessRight::parse("Allow"), None);
    }

    fn decision(granted: bool, rule: AccessRule) -> AccessDecision {
        AccessDecision {
            granted,
            rule,
            matched: vec![],
        }
    }

    const READ: &[&str] = &["Mail.ReadBasic", "Mail.Read", "Mail.ReadWrite"];

    #[test]
    fn union_entra_allowed_by_policy() {
        let r = authorize_mailbox_call(
            READ,
            &["Mail.Read".into()],
            &decision(true, AccessRule::RestrictMatch),
            &BTreeSet::new(),
        );
        assert_eq!(
            r,
            MailboxAccess::Granted {
                permission: "Mail.Read".into(),
                via: GrantPath::Entra
            }
        );
    }

    #[test]
    fn union_entra_denied_by_policy_without_rbac() {
        let r = authorize_mailbox_call(
            READ,
            &["Mail.Read".into()],
            &decision(false, AccessRule::RestrictMiss),
            &BTreeSet::new(),
        );
        assert_eq!(
            r,
            MailboxAccess::DeniedByPolicy {
                rule: AccessRule::RestrictMiss
            }
        );
    }

    #[test]
    fn union_rbac_grants_despite_policy_denial() {
        // AAP constrains only Entra grants; an in-scope RBAC assignment still reaches the mailbox.
        let r = authorize_mailbox_call(
            READ,
            &["Mail.Read".into()],
            &decision(false, AccessRule::DenyMatch),
            &BTreeSet::from(["Mail.Read".to_string()]),
        );
        assert_eq!(
            r,
            MailboxAccess::Granted {
                permission: "Mail.Read".into(),
                via: GrantPath::Rbac
            }
        );
    }

    #[test]
    fn union_rbac_only() {
        let r = authorize_mailbox_call(
            READ,
            &[],
            &decision(true, AccessRule::NoPolicy),
            &BTreeSet::from(["Mail.ReadWrite".to_string()]),
        );
        assert_eq!(
            r,
            MailboxAccess::Granted {
                permission: "Mail.ReadWrite".into(),
                via: GrantPath::Rbac
            }
        );
    }

    #[test]
    fn union_nothing_held() {
        let r = authorize_mailbox_call(
            READ,
            &["User.Read.All".into()],
            &decision(true, AccessRule::NoPolicy),
            &BTreeSet::from(["Calendars.Read".to_string()]),
        );
        assert_eq!(r, MailboxAccess::NoPermission);
    }

    #[test]
    fn union_trap_entra_grant_defeats_rbac_scope() {
        // docs/microsoft-365.md §6.9: unscoped Entra Mail.Read with no AAP reaches every mailbox whatever RBAC says.
        let r = authorize_mailbox_call(
            READ,
            &["Mail.Read".into()],
            &decision(true, AccessRule::NoPolicy),
            &BTreeSet::new(),
        );
        assert!(matches!(
            r,
            MailboxAccess::Granted {
                via: GrantPath::Entra,
                ..
            }
        ));
    }

    #[test]
    fn permissions_outside_policy_coverage_pass() {
        let r = authorize_mailbox_call(
            &["User.Read.All"],
            &["User.Read.All".into()],
            &decision(false, AccessRule::RestrictMiss),
            &BTreeSet::new(),
        );
        assert!(matches!(
            r,
            MailboxAccess::Granted {
                via: GrantPath::Entra,
                ..
            }
        ));
        assert!(!policy_restricts("Files.Read.All"));
        assert!(policy_restricts("mail.readbasic.all"));
    }
}
