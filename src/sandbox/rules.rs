//! The sandbox's own reading of Exchange Online's mailbox access rules.
//!
//! Deliberately written apart from mailscope's `domain::access` and `domain::rbac` (and it must
//! never call them, `tests/api/layers.rs` checks): if the sandbox judged access with mailscope's
//! functions, a rule mailscope misreads would be reproduced here and no test could catch it.
//! Both readings are checked against one table of documented cases,
//! `tests/fixtures/documented-access-cases.json` (test `tests/api/documented_access.rs`).
//!
//! What is implemented, each from Microsoft's pages (docs/microsoft-365.md §2.3, §2.4, §3.2–§3.4,
//! §7, §8.2):
//! - application access policies: a DenyAccess policy covering the mailbox denies; else a
//!   RestrictAccess policy covering it grants; else any RestrictAccess policy of the app denies;
//!   else access is granted. A policy's scope is a mailbox, a mail user or a mail-enabled
//!   security group (members of nested groups count by default, `aapNestedGroups`);
//! - RBAC for Applications: role assignments scoped to the organisation, a management scope
//!   (an OPATH recipient filter; `MemberOfGroup` compares group distinguished names, direct
//!   members only by default, `rbacNestedGroups`) or a group; exclusive scopes behave like
//!   ordinary ones for apps;
//! - the union: an app reaches a mailbox when an Entra grant survives the access policies, or an
//!   in-scope role assignment grants an accepted permission. Policies constrain Entra grants of
//!   mailbox permissions only.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// `-AccessRight` of an application access policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Right {
    RestrictAccess,
    DenyAccess,
}

impl Right {
    pub fn as_str(self) -> &'static str {
        match self {
            Right::RestrictAccess => "RestrictAccess",
            Right::DenyAccess => "DenyAccess",
        }
    }

    /// Exchange binds enum values without regard to case.
    pub fn parse(text: &str) -> Option<Right> {
        match text.trim().to_ascii_lowercase().as_str() {
            "restrictaccess" => Some(Right::RestrictAccess),
            "denyaccess" => Some(Right::DenyAccess),
            _ => None,
        }
    }
}

/// The `-AppId` that makes a policy apply to every app.
pub const EVERY_APP: &str = "*";

/// One policy as the rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFact {
    pub app_id: String,
    /// Object id of the scope recipient (a mailbox, mail user or group).
    pub scope_id: String,
    pub right: Right,
}

/// Whether members of nested groups count as members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Nesting {
    #[default]
    Transitive,
    DirectOnly,
}

/// Direct members of every group, by group object id.
pub type Memberships = BTreeMap<String, Vec<String>>;

fn same(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// The groups (object ids, lower case) a recipient belongs to: directly, or also through the
/// groups it belongs to when nesting is transitive. Walks upwards from the recipient, so cycles
/// end when no new group turns up.
pub fn groups_of(members: &Memberships, recipient_id: &str, nesting: Nesting) -> BTreeSet<String> {
    let parents = |child: &str| -> Vec<String> {
        members
            .iter()
            .filter(|(_, direct)| direct.iter().any(|m| same(m, child)))
            .map(|(g, _)| g.to_ascii_lowercase())
            .collect()
    };
    let mut found: BTreeSet<String> = parents(recipient_id).into_iter().collect();
    if nesting == Nesting::Transitive {
        let mut frontier: Vec<String> = found.iter().cloned().collect();
        while let Some(g) = frontier.pop() {
            for p in parents(&g) {
                if found.insert(p.clone()) {
                    frontier.push(p);
                }
            }
        }
    }
    found.remove(&recipient_id.to_ascii_lowercase());
    found
}

/// Does a policy scope cover the recipient? A scope that is the recipient itself does.
pub fn covers(members: &Memberships, scope_id: &str, recipient_id: &str, nesting: Nesting) -> bool {
    same(scope_id, recipient_id)
        || groups_of(members, recipient_id, nesting).contains(&scope_id.to_ascii_lowercase())
}

/// `RecipientTypeDetails` a policy may be scoped to (docs/microsoft-365.md §2.4): a user
/// mailbox, a mail user, a mail-enabled security group. Shared, room and equipment mailboxes,
/// Microsoft 365 groups and distribution lists are refused.
pub fn may_scope_policy(recipient_type_details: &str) -> bool {
    matches!(
        recipient_type_details.to_ascii_lowercase().as_str(),
        "usermailbox" | "mailuser" | "mailuniversalsecuritygroup"
    )
}

/// Which documented rule decided (docs/microsoft-365.md §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PolicyRule {
    DenyMatch,
    RestrictMatch,
    RestrictMiss,
    NoPolicy,
}

/// The access policies' verdict for one app and one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyVerdict {
    pub granted: bool,
    pub rule: PolicyRule,
}

impl PolicyVerdict {
    /// `AccessCheckResult` as `Test-ApplicationAccessPolicy` prints it.
    pub fn check_result(self) -> &'static str {
        if self.granted { "Granted" } else { "Denied" }
    }
}

/// Apply the access-policy rules for `app_id` (a client id) to a recipient.
pub fn policy_verdict(
    app_id: &str,
    recipient_id: &str,
    policies: &[PolicyFact],
    members: &Memberships,
    nesting: Nesting,
) -> PolicyVerdict {
    let mine: Vec<&PolicyFact> = policies
        .iter()
        .filter(|p| p.app_id == EVERY_APP || same(&p.app_id, app_id))
        .collect();
    let covering = |right: Right| {
        mine.iter()
            .any(|p| p.right == right && covers(members, &p.scope_id, recipient_id, nesting))
    };
    let (granted, rule) = if covering(Right::DenyAccess) {
        (false, PolicyRule::DenyMatch)
    } else if covering(Right::RestrictAccess) {
        (true, PolicyRule::RestrictMatch)
    } else if mine.iter().any(|p| p.right == Right::RestrictAccess) {
        (false, PolicyRule::RestrictMiss)
    } else {
        (true, PolicyRule::NoPolicy)
    };
    PolicyVerdict { granted, rule }
}

/// Does an access policy constrain an Entra grant of this permission (docs/microsoft-365.md §7)?
/// Mail, mailbox settings, calendars, contacts and EWS `full_access_as_app`; nothing else.
pub fn policy_constrains(permission: &str) -> bool {
    let p = permission.trim().to_ascii_lowercase();
    p == "full_access_as_app"
        || ["mail.", "mailboxsettings.", "calendars.", "contacts."]
            .iter()
            .any(|prefix| p.starts_with(prefix) && p.len() > prefix.len())
}

/// The permissions an Exchange application role grants (docs/microsoft-365.md §3.2, §8.2), and
/// the role's canonical name. `None` for names that are not application roles.
pub fn role_grants(role: &str) -> Option<(&'static str, &'static [&'static str])> {
    const ROLES: &[(&str, &[&str])] = &[
        ("Application Mail.Read", &["Mail.Read"]),
        ("Application Mail.ReadBasic", &["Mail.ReadBasic"]),
        ("Application Mail.ReadWrite", &["Mail.ReadWrite"]),
        ("Application Mail.Send", &["Mail.Send"]),
        (
            "Application MailboxSettings.Read",
            &["MailboxSettings.Read"],
        ),
        (
            "Application MailboxSettings.ReadWrite",
            &["MailboxSettings.ReadWrite"],
        ),
        ("Application Calendars.Read", &["Calendars.Read"]),
        ("Application Calendars.ReadWrite", &["Calendars.ReadWrite"]),
        ("Application Contacts.Read", &["Contacts.Read"]),
        ("Application Contacts.ReadWrite", &["Contacts.ReadWrite"]),
        ("Application EWS.AccessAsApp", &["EWS.AccessAsApp"]),
        ("Application SMTP.SendAsApp", &["SMTP.SendAsApp"]),
        (
            "Application Mail Full Access",
            &["Mail.ReadWrite", "Mail.Send"],
        ),
        (
            "Application Exchange Full Access",
            &[
                "Mail.ReadWrite",
                "Mail.Send",
                "MailboxSettings.ReadWrite",
                "Calendars.ReadWrite",
                "Contacts.ReadWrite",
            ],
        ),
    ];
    ROLES
        .iter()
        .find(|(name, _)| same(name, role.trim()))
        .map(|(name, perms)| (*name, *perms))
}

/// What a recipient filter sees of one recipient.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    pub id: String,
    /// Single-valued properties (PrimarySmtpAddress, Alias, CustomAttribute1, …).
    pub properties: BTreeMap<String, String>,
    /// Proxy addresses, for `EmailAddresses`.
    pub addresses: Vec<String>,
    /// Distinguished names of the recipient's groups (in the nesting mode the caller chose).
    pub member_of: Vec<String>,
}

impl Facts {
    fn values(&self, property: &str) -> Vec<&str> {
        match property.to_ascii_lowercase().as_str() {
            "memberofgroup" => self.member_of.iter().map(String::as_str).collect(),
            "emailaddresses" => self.addresses.iter().map(String::as_str).collect(),
            _ => self
                .properties
                .iter()
                .filter(|(k, v)| same(k, property) && !v.is_empty())
                .map(|(_, v)| v.as_str())
                .collect(),
        }
    }
}

/// Properties a management scope's filter may name (a subset of Exchange's filterable ones).
const FILTER_PROPERTIES: &[&str] = &[
    "Alias",
    "City",
    "Company",
    "CustomAttribute1",
    "CustomAttribute2",
    "CustomAttribute3",
    "CustomAttribute4",
    "CustomAttribute5",
    "CustomAttribute6",
    "CustomAttribute7",
    "CustomAttribute8",
    "CustomAttribute9",
    "CustomAttribute10",
    "CustomAttribute11",
    "CustomAttribute12",
    "CustomAttribute13",
    "CustomAttribute14",
    "CustomAttribute15",
    "Department",
    "DisplayName",
    "DistinguishedName",
    "EmailAddresses",
    "MemberOfGroup",
    "Name",
    "PrimarySmtpAddress",
    "RecipientType",
    "RecipientTypeDetails",
    "UserPrincipalName",
];

/// A parsed OPATH recipient filter: comparisons joined by `-and`, `-or`, `-not` and brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// `Property -eq|-ne|-like|-notlike 'value'`; `value` is `None` for `$null`.
    Test {
        property: String,
        negate: bool,
        wildcard: bool,
        value: Option<String>,
    },
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Not(Box<Filter>),
}

impl Filter {
    /// Parse a filter; the error text says what is wrong and where.
    pub fn parse(text: &str) -> Result<Filter, String> {
        let mut body = text.trim();
        if body.starts_with('{') && body.ends_with('}') && body.len() >= 2 {
            body = body[1..body.len() - 1].trim();
        }
        if body.is_empty() {
            return Err("the filter is empty".into());
        }
        let words = lex(body)?;
        let mut p = FilterParser { words, at: 0 };
        let f = p.any()?;
        match p.words.get(p.at) {
            None => Ok(f),
            Some((pos, _)) => Err(format!("unexpected text at position {pos}")),
        }
    }

    pub fn matches(&self, r: &Facts) -> bool {
        match self {
            Filter::All(v) => v.iter().all(|f| f.matches(r)),
            Filter::Any(v) => v.iter().any(|f| f.matches(r)),
            Filter::Not(f) => !f.matches(r),
            Filter::Test {
                property,
                negate,
                wildcard,
                value,
            } => {
                let values = r.values(property);
                let hit = match value {
                    None => values.is_empty(),
                    Some(want) if *wildcard => values.iter().any(|v| glob(want, v)),
                    Some(want) => values.iter().any(|v| same(v, want)),
                };
                hit != *negate
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Word {
    Bare(String),
    Text(String),
    Dash(String),
    Open,
    Close,
}

fn lex(s: &str) -> Result<Vec<(usize, Word)>, String> {
    let mut out = vec![];
    let mut it = s.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        match c {
            c if c.is_whitespace() => {}
            '(' => out.push((i, Word::Open)),
            ')' => out.push((i, Word::Close)),
            '\'' | '"' => {
                let mut v = String::new();
                loop {
                    match it.next() {
                        None => return Err(format!("unterminated string at position {i}")),
                        // PowerShell escapes a quote by doubling it.
                        Some((_, q)) if q == c && it.peek().is_some_and(|(_, n)| *n == c) => {
                            it.next();
                            v.push(c);
                        }
                        Some((_, q)) if q == c => break,
                        Some((_, o)) => v.push(o),
                    }
                }
                out.push((i, Word::Text(v)));
            }
            '-' => {
                let mut w = String::new();
                while let Some((_, n)) = it.peek().copied().filter(|(_, n)| n.is_ascii_alphabetic())
                {
                    w.push(n.to_ascii_lowercase());
                    it.next();
                }
                out.push((i, Word::Dash(w)));
            }
            _ => {
                let mut w = String::from(c);
                while let Some((_, n)) = it
                    .peek()
                    .copied()
                    .filter(|(_, n)| !n.is_whitespace() && *n != '(' && *n != ')')
                {
                    w.push(n);
                    it.next();
                }
                out.push((i, Word::Bare(w)));
            }
        }
    }
    Ok(out)
}

struct FilterParser {
    words: Vec<(usize, Word)>,
    at: usize,
}

impl FilterParser {
    fn peek(&self) -> Option<&Word> {
        self.words.get(self.at).map(|(_, w)| w)
    }

    fn fail(&self, what: &str) -> String {
        let pos = self.words.get(self.at).map(|(p, _)| *p);
        match pos {
            Some(p) => format!("{what} at position {p}"),
            None => format!("{what} at the end"),
        }
    }

    fn dash(&self, name: &str) -> bool {
        matches!(self.peek(), Some(Word::Dash(w)) if w == name)
    }

    fn any(&mut self) -> Result<Filter, String> {
        let mut parts = vec![self.all()?];
        while self.dash("or") {
            self.at += 1;
            parts.push(self.all()?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Filter::Any(parts)
        })
    }

    fn all(&mut self) -> Result<Filter, String> {
        let mut parts = vec![self.one()?];
        while self.dash("and") {
            self.at += 1;
            parts.push(self.one()?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Filter::All(parts)
        })
    }

    fn one(&mut self) -> Result<Filter, String> {
        match self.peek().cloned() {
            Some(Word::Dash(w)) if w == "not" => {
                self.at += 1;
                Ok(Filter::Not(Box::new(self.one()?)))
            }
            Some(Word::Open) => {
                self.at += 1;
                let f = self.any()?;
                if self.peek() != Some(&Word::Close) {
                    return Err(self.fail("expected ')'"));
                }
                self.at += 1;
                Ok(f)
            }
            Some(Word::Bare(name)) => {
                let property = FILTER_PROPERTIES
                    .iter()
                    .find(|p| same(p, &name))
                    .ok_or_else(|| format!("'{name}' isn't a recognized filterable property"))?
                    .to_string();
                self.at += 1;
                let (negate, wildcard) = match self.peek() {
                    Some(Word::Dash(op)) => match op.as_str() {
                        "eq" => (false, false),
                        "ne" => (true, false),
                        "like" => (false, true),
                        "notlike" => (true, true),
                        _ => return Err(self.fail("expected -eq, -ne, -like or -notlike")),
                    },
                    _ => return Err(self.fail("expected a comparison operator")),
                };
                self.at += 1;
                let value = match self.peek().cloned() {
                    Some(Word::Text(v)) => Some(v),
                    Some(Word::Bare(v)) if same(&v, "$null") => None,
                    Some(Word::Bare(v)) if !v.starts_with('$') => Some(v),
                    _ => return Err(self.fail("expected a value")),
                };
                self.at += 1;
                Ok(Filter::Test {
                    property,
                    negate,
                    wildcard,
                    value,
                })
            }
            _ => Err(self.fail("expected a property name, '(' or -not")),
        }
    }
}

/// `*` matches any run of characters, `?` one character; case-insensitive.
fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|k| go(rest, &t[k..])),
            Some((c, rest)) => t.split_first().is_some_and(|(d, tail)| {
                (*c == '?' || c.to_lowercase().eq(d.to_lowercase())) && go(rest, tail)
            }),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    go(&p, &t)
}

/// The resource scope of one RBAC role assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceScope {
    Organization,
    /// `-CustomResourceScope`: a management scope.
    Custom {
        name: String,
        filter: Filter,
        exclusive: bool,
    },
    /// `-RecipientGroupScope`: members of the group, named by its distinguished name.
    Group {
        name: String,
        dn: String,
    },
    /// `-RecipientAdministrativeUnitScope`: the unit's members (its object ids).
    AdministrativeUnit {
        name: String,
        member_ids: Vec<String>,
    },
}

impl ResourceScope {
    pub fn contains(&self, r: &Facts) -> bool {
        match self {
            ResourceScope::Organization => true,
            // Exclusivity concerns administrators, not apps (docs/microsoft-365.md §3.4).
            ResourceScope::Custom { filter, .. } => filter.matches(r),
            ResourceScope::Group { dn, .. } => r.member_of.iter().any(|g| same(g, dn)),
            ResourceScope::AdministrativeUnit { member_ids, .. } => {
                member_ids.iter().any(|m| same(m, &r.id))
            }
        }
    }

    /// `ScopeType` of `Test-ServicePrincipalAuthorization`.
    pub fn scope_type(&self) -> &'static str {
        match self {
            ResourceScope::Organization => "Organization",
            ResourceScope::Custom { .. } => "CustomRecipientScope",
            ResourceScope::Group { .. } => "Group",
            ResourceScope::AdministrativeUnit { .. } => "AdministrativeUnit",
        }
    }

    /// `AllowedResourceScope`.
    pub fn label(&self) -> String {
        match self {
            ResourceScope::Organization => "Organization".into(),
            ResourceScope::Custom { name, .. }
            | ResourceScope::Group { name, .. }
            | ResourceScope::AdministrativeUnit { name, .. } => name.clone(),
        }
    }
}

/// One role assignment of an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub name: String,
    pub role: String,
    pub scope: ResourceScope,
    pub enabled: bool,
}

/// One row of `Test-ServicePrincipalAuthorization`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationRow {
    pub role: &'static str,
    pub permissions: &'static [&'static str],
    pub scope_label: String,
    pub scope_type: &'static str,
    /// `None` without `-Resource` (printed `Not Run`).
    pub in_scope: Option<bool>,
}

/// `Test-ServicePrincipalAuthorization`: enabled assignments of application roles. Entra grants
/// play no part (docs/microsoft-365.md §3.1).
pub fn authorization_rows(
    assignments: &[Assignment],
    resource: Option<&Facts>,
) -> Vec<AuthorizationRow> {
    let mut rows = vec![];
    for a in assignments.iter().filter(|a| a.enabled) {
        if let Some((role, permissions)) = role_grants(&a.role) {
            rows.push(AuthorizationRow {
                role,
                permissions,
                scope_label: a.scope.label(),
                scope_type: a.scope.scope_type(),
                in_scope: resource.map(|r| a.scope.contains(r)),
            });
        }
    }
    rows
}

/// Permissions the app's role assignments grant on this recipient.
pub fn rbac_grants(assignments: &[Assignment], recipient: &Facts) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for row in authorization_rows(assignments, Some(recipient)) {
        if row.in_scope == Some(true) {
            out.extend(row.permissions.iter().map(|p| p.to_string()));
        }
    }
    out
}

/// How a mailbox call ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Allowed by `permission`, from Entra (`rbac == false`) or a role assignment.
    Granted { permission: String, rbac: bool },
    /// The app holds an accepted Entra permission that the access policies hold back, and no
    /// role assignment covers the mailbox: Graph's `ErrorAccessDenied`.
    DeniedByPolicy,
    /// Neither Entra nor RBAC gives the app any accepted permission.
    NoPermission,
}

/// The union of Entra grants (constrained by access policies) and in-scope RBAC grants
/// (docs/microsoft-365.md §3.3, §8.2). `accepted`: the permissions any of which allows the
/// call, in order of preference.
pub fn mailbox_call(
    accepted: &[&str],
    entra: &[String],
    policies: PolicyVerdict,
    rbac: &BTreeSet<String>,
) -> Outcome {
    let entra_held: Vec<&str> = accepted
        .iter()
        .copied()
        .filter(|p| entra.iter().any(|h| same(h, p)))
        .collect();
    if let Some(p) = entra_held
        .iter()
        .find(|p| policies.granted || !policy_constrains(p))
    {
        return Outcome::Granted {
            permission: (*p).to_string(),
            rbac: false,
        };
    }
    if let Some(p) = accepted.iter().find(|p| rbac.iter().any(|h| same(h, p))) {
        return Outcome::Granted {
            permission: (*p).to_string(),
            rbac: true,
        };
    }
    if entra_held.is_empty() {
        Outcome::NoPermission
    } else {
        Outcome::DeniedByPolicy
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn members() -> Memberships {
        Memberships::from([
            ("fin".into(), vec!["bob".into(), "sub".into()]),
            ("sub".into(), vec!["carol".into(), "fin".into()]),
        ])
    }

    #[test]
    fn nesting_walks_upwards_and_survives_cycles() {
        let m = members();
        assert_eq!(
            groups_of(&m, "carol", Nesting::Transitive),
            BTreeSet::from(["fin".into(), "sub".into()])
        );
        assert_eq!(
            groups_of(&m, "carol", Nesting::DirectOnly),
            BTreeSet::from(["sub".into()])
        );
        assert!(covers(&m, "FIN", "carol", Nesting::Transitive));
        assert!(!covers(&m, "fin", "carol", Nesting::DirectOnly));
    }

    #[test]
    fn filters_parse_and_match() {
        let r = Facts {
            id: "a".into(),
            properties: BTreeMap::from([
                ("Department".into(), "Sales EMEA".into()),
                ("DisplayName".into(), "O'Brien".into()),
            ]),
            addresses: vec!["smtp:a@x.com".into()],
            member_of: vec!["CN=G,DC=X".into()],
        };
        for (f, want) in [
            ("MemberOfGroup -eq 'cn=g,dc=x'", true),
            ("{ Alias -eq $null }", true),
            ("Department -like 'sales*' -and -not (City -ne $null)", true),
            ("DisplayName -eq 'O''Brien'", true),
            (
                "Department -notlike '*EMEA' -or EmailAddresses -eq \"smtp:b@x.com\"",
                false,
            ),
            ("Department -like 's?les*'", true),
        ] {
            assert_eq!(Filter::parse(f).unwrap().matches(&r), want, "{f}");
        }
        for bad in [
            "",
            "Alias 'x'",
            "Alias -eq 'x",
            "(Alias -eq 'x'",
            "Colour -eq 1",
            "Alias -gt 1",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn roles_expand_and_unknown_roles_grant_nothing() {
        assert_eq!(
            role_grants("application exchange full access").map(|(_, p)| p.len()),
            Some(5)
        );
        assert!(role_grants("Mail Recipients").is_none());
        assert!(policy_constrains("Mail.ReadBasic.All") && !policy_constrains("User.Read.All"));
    }
}
