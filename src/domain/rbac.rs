//! RBAC for Applications (docs/microsoft-365.md §3): application roles, management scopes with
//! OPATH recipient filters, role assignments and their evaluation against one recipient.
//!
//! Pure functions over plain data. `MemberOfGroup` compares group distinguished names; whether
//! nested members count is unverified (docs/microsoft-365.md §3.4), so the caller passes the recipient's group DNs
//! computed in the mode it wants (direct only by default, see [`RecipientFacts::member_of`]).
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// One Exchange application role and the Graph/EWS permissions it grants (docs/microsoft-365.md §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplicationRole {
    pub name: &'static str,
    pub protocol: &'static str,
    pub permissions: &'static [&'static str],
}

/// The application roles the reference lists. Others exist in Exchange (MailboxFolder, MailTips…);
/// they are not modelled.
pub const APPLICATION_ROLES: &[ApplicationRole] = &[
    ApplicationRole {
        name: "Application Mail.Read",
        protocol: "Graph",
        permissions: &["Mail.Read"],
    },
    ApplicationRole {
        name: "Application Mail.ReadBasic",
        protocol: "Graph",
        permissions: &["Mail.ReadBasic"],
    },
    ApplicationRole {
        name: "Application Mail.ReadWrite",
        protocol: "Graph",
        permissions: &["Mail.ReadWrite"],
    },
    ApplicationRole {
        name: "Application Mail.Send",
        protocol: "Graph",
        permissions: &["Mail.Send"],
    },
    ApplicationRole {
        name: "Application MailboxSettings.Read",
        protocol: "Graph",
        permissions: &["MailboxSettings.Read"],
    },
    ApplicationRole {
        name: "Application MailboxSettings.ReadWrite",
        protocol: "Graph",
        permissions: &["MailboxSettings.ReadWrite"],
    },
    ApplicationRole {
        name: "Application Calendars.Read",
        protocol: "Graph",
        permissions: &["Calendars.Read"],
    },
    ApplicationRole {
        name: "Application Calendars.ReadWrite",
        protocol: "Graph",
        permissions: &["Calendars.ReadWrite"],
    },
    ApplicationRole {
        name: "Application Contacts.Read",
        protocol: "Graph",
        permissions: &["Contacts.Read"],
    },
    ApplicationRole {
        name: "Application Contacts.ReadWrite",
        protocol: "Graph",
        permissions: &["Contacts.ReadWrite"],
    },
    ApplicationRole {
        name: "Application Mail Full Access",
        protocol: "Graph",
        permissions: &["Mail.ReadWrite", "Mail.Send"],
    },
    ApplicationRole {
        name: "Application Exchange Full Access",
        protocol: "Graph",
        permissions: &[
            "Mail.ReadWrite",
            "Mail.Send",
            "MailboxSettings.ReadWrite",
            "Calendars.ReadWrite",
            "Contacts.ReadWrite",
        ],
    },
    ApplicationRole {
        name: "Application EWS.AccessAsApp",
        protocol: "EWS",
        permissions: &["EWS.AccessAsApp"],
    },
    // Only RBAC has it (docs/microsoft-365.md §8.2): SMTP AUTH client submission as the app.
    ApplicationRole {
        name: "Application SMTP.SendAsApp",
        protocol: "SMTP",
        permissions: &["SMTP.SendAsApp"],
    },
];

/// Permissions only RBAC for Applications grants (no Entra app role holds them, docs/microsoft-365.md §8.2): an app
/// needs them as role assignments whatever its Entra consent.
pub const RBAC_ONLY_PERMISSIONS: &[&str] = &["EWS.AccessAsApp", "SMTP.SendAsApp"];

/// The single-permission application role that grants exactly `permission` ("Application
/// Mail.Read" for Mail.Read, docs/microsoft-365.md §3.2); `None` for permissions no role grants (Mail.ReadBasic.All).
pub fn role_for_permission(permission: &str) -> Option<&'static ApplicationRole> {
    APPLICATION_ROLES.iter().find(|r| {
        r.permissions.len() == 1 && r.permissions[0].eq_ignore_ascii_case(permission.trim())
    })
}

/// Is this an Entra application permission on mailbox data, whose tenant-wide grant defeats any
/// RBAC scope (the union, docs/microsoft-365.md §3.3, docs/microsoft-365.md §6.9)? Mail.*, Calendars.*, Contacts.*, MailboxSettings.*, and
/// EWS `full_access_as_app` (which only an access policy narrows, docs/microsoft-365.md §8.2).
pub fn is_mailbox_permission(permission: &str) -> bool {
    let p = permission.trim();
    ["Mail.", "Calendars.", "Contacts.", "MailboxSettings."]
        .iter()
        .any(|prefix| p.len() > prefix.len() && p[..prefix.len()].eq_ignore_ascii_case(prefix))
        || p.eq_ignore_ascii_case("full_access_as_app")
}

/// The union trap (docs/microsoft-365.md §3.3): which of the app's Entra grants reach every mailbox whatever its RBAC
/// scope. While any remains the app is not restricted by RBAC for that permission.
pub fn unscoped_mailbox_grants(entra_permissions: &[String]) -> Vec<String> {
    let mut v: Vec<String> = entra_permissions
        .iter()
        .filter(|p| is_mailbox_permission(p))
        .cloned()
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Look a role up by name, case-insensitively as Exchange does.
pub fn application_role(name: &str) -> Option<&'static ApplicationRole> {
    APPLICATION_ROLES
        .iter()
        .find(|r| r.name.eq_ignore_ascii_case(name.trim()))
}

/// A parsed OPATH recipient filter (the subset management scopes use).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecipientFilter {
    Compare {
        property: String,
        op: CompareOp,
        value: Option<String>,
    },
    And(Box<RecipientFilter>, Box<RecipientFilter>),
    Or(Box<RecipientFilter>, Box<RecipientFilter>),
    Not(Box<RecipientFilter>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Eq,
    Ne,
    Like,
    NotLike,
}

/// Properties a recipient filter may name (a subset of Exchange's filterable properties).
pub const FILTERABLE_PROPERTIES: &[&str] = &[
    "MemberOfGroup",
    "PrimarySmtpAddress",
    "EmailAddresses",
    "Alias",
    "Name",
    "DisplayName",
    "DistinguishedName",
    "UserPrincipalName",
    "RecipientType",
    "RecipientTypeDetails",
    "Department",
    "Company",
    "City",
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
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("the filter is empty")]
    Empty,
    #[error("invalid filter syntax at position {position}: {reason}")]
    Syntax { position: usize, reason: String },
    #[error("'{0}' isn't a recognized filterable property")]
    UnknownProperty(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Quoted(String),
    Op(String),
    LParen,
    RParen,
}

fn tokenize(s: &str) -> Result<Vec<(usize, Tok)>, FilterError> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = vec![];
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '(' {
            out.push((i, Tok::LParen));
            i += 1;
        } else if c == ')' {
            out.push((i, Tok::RParen));
            i += 1;
        } else if c == '\'' || c == '"' {
            let start = i;
            let mut v = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => {
                        return Err(FilterError::Syntax {
                            position: start,
                            reason: "unterminated string".into(),
                        });
                    }
                    // A doubled quote is an escaped quote, as in PowerShell.
                    Some(&q) if q == c && chars.get(i + 1) == Some(&c) => {
                        v.push(c);
                        i += 2;
                    }
                    Some(&q) if q == c => {
                        i += 1;
                        break;
                    }
                    Some(&o) => {
                        v.push(o);
                        i += 1;
                    }
                }
            }
            out.push((start, Tok::Quoted(v)));
        } else if c == '-' {
            let start = i;
            i += 1;
            let mut w = String::new();
            while let Some(&n) = chars.get(i) {
                if n.is_ascii_alphabetic() {
                    w.push(n);
                    i += 1;
                } else {
                    break;
                }
            }
            out.push((start, Tok::Op(w.to_ascii_lowercase())));
        } else {
            let start = i;
            let mut w = String::new();
            while let Some(&n) = chars.get(i) {
                if n.is_whitespace() || n == '(' || n == ')' {
                    break;
                }
                w.push(n);
                i += 1;
            }
            out.push((start, Tok::Word(w)));
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    pos: usize,
    len: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(_, t)| t)
    }
    fn at(&self) -> usize {
        self.toks.get(self.pos).map(|(p, _)| *p).unwrap_or(self.len)
    }
    fn err(&self, reason: &str) -> FilterError {
        FilterError::Syntax {
            position: self.at(),
            reason: reason.into(),
        }
    }
    fn or(&mut self) -> Result<RecipientFilter, FilterError> {
        let mut left = self.and()?;
        while self.peek() == Some(&Tok::Op("or".into())) {
            self.pos += 1;
            let right = self.and()?;
            left = RecipientFilter::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }
    fn and(&mut self) -> Result<RecipientFilter, FilterError> {
        let mut left = self.unary()?;
        while self.peek() == Some(&Tok::Op("and".into())) {
            self.pos += 1;
            let right = self.unary()?;
            left = RecipientFilter::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }
    fn unary(&mut self) -> Result<RecipientFilter, FilterError> {
        match self.peek().cloned() {
            Some(Tok::Op(o)) if o == "not" => {
                self.pos += 1;
                Ok(RecipientFilter::Not(Box::new(self.unary()?)))
            }
            Some(Tok::LParen) => {
                self.pos += 1;
                let e = self.or()?;
                if self.peek() != Some(&Tok::RParen) {
                    return Err(self.err("expected ')'"));
                }
                self.pos += 1;
                Ok(e)
            }
            Some(Tok::Word(prop)) => {
                self.pos += 1;
                let property = FILTERABLE_PROPERTIES
                    .iter()
                    .find(|p| p.eq_ignore_ascii_case(&prop))
                    .ok_or_else(|| FilterError::UnknownProperty(prop.clone()))?
                    .to_string();
                let op = match self.peek() {
                    Some(Tok::Op(o)) => match o.as_str() {
                        "eq" => CompareOp::Eq,
                        "ne" => CompareOp::Ne,
                        "like" => CompareOp::Like,
                        "notlike" => CompareOp::NotLike,
                        _ => return Err(self.err("expected -eq, -ne, -like or -notlike")),
                    },
                    _ => return Err(self.err("expected a comparison operator")),
                };
                self.pos += 1;
                let value = match self.peek().cloned() {
                    Some(Tok::Quoted(v)) => Some(v),
                    Some(Tok::Word(w)) if w.eq_ignore_ascii_case("$null") => None,
                    Some(Tok::Word(w)) if !w.starts_with('$') => Some(w),
                    _ => return Err(self.err("expected a value")),
                };
                self.pos += 1;
                Ok(RecipientFilter::Compare {
                    property,
                    op,
                    value,
                })
            }
            _ => Err(self.err("expected a property name, '(' or -not")),
        }
    }
}

impl RecipientFilter {
    /// Parse an OPATH filter such as `MemberOfGroup -eq 'CN=Sales,…'` or
    /// `(CustomAttribute1 -eq 'x') -and -not (Department -like 'Temp*')`. An outer `{ … }`
    /// (the old script-block syntax) is accepted.
    pub fn parse(text: &str) -> Result<RecipientFilter, FilterError> {
        let mut t = text.trim();
        if let Some(inner) = t.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
            t = inner.trim();
        }
        if t.is_empty() {
            return Err(FilterError::Empty);
        }
        let toks = tokenize(t)?;
        let mut p = Parser {
            toks,
            pos: 0,
            len: t.len(),
        };
        let e = p.or()?;
        if p.pos != p.toks.len() {
            return Err(p.err("unexpected trailing input"));
        }
        Ok(e)
    }

    /// Does the recipient match?
    pub fn matches(&self, r: &RecipientFacts) -> bool {
        match self {
            RecipientFilter::And(a, b) => a.matches(r) && b.matches(r),
            RecipientFilter::Or(a, b) => a.matches(r) || b.matches(r),
            RecipientFilter::Not(a) => !a.matches(r),
            RecipientFilter::Compare {
                property,
                op,
                value,
            } => {
                let values = r.values_of(property);
                let hit = |pattern: &Option<String>, like: bool| -> bool {
                    match pattern {
                        None => values.is_empty(),
                        Some(p) => values.iter().any(|v| {
                            if like {
                                wildcard_match(p, v)
                            } else {
                                v.eq_ignore_ascii_case(p)
                            }
                        }),
                    }
                };
                match op {
                    CompareOp::Eq => hit(value, false),
                    CompareOp::Ne => !hit(value, false),
                    CompareOp::Like => hit(value, true),
                    CompareOp::NotLike => !hit(value, true),
                }
            }
        }
    }

    /// Group DNs named by `MemberOfGroup -eq` anywhere in the filter (to check they exist).
    pub fn member_of_group_dns(&self) -> Vec<String> {
        match self {
            RecipientFilter::And(a, b) | RecipientFilter::Or(a, b) => {
                let mut v = a.member_of_group_dns();
                v.extend(b.member_of_group_dns());
                v
            }
            RecipientFilter::Not(a) => a.member_of_group_dns(),
            RecipientFilter::Compare {
                property,
                value: Some(v),
                ..
            } if property == "MemberOfGroup" => {
                vec![v.clone()]
            }
            RecipientFilter::Compare { .. } => vec![],
        }
    }
}

/// Case-insensitive `*` / `?` wildcard match, as OPATH `-like`.
pub fn wildcard_match(pattern: &str, value: &str) -> bool {
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let v: Vec<char> = value.to_lowercase().chars().collect();
    let (mut pi, mut vi, mut star, mut mark) = (0usize, 0usize, None::<usize>, 0usize);
    while vi < v.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == v[vi]) {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = vi;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            vi = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// What a recipient filter sees of one recipient.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientFacts {
    /// Object id (the one the caller uses to name recipients).
    pub id: String,
    /// Single-valued properties by name (PrimarySmtpAddress, Alias, CustomAttribute1, …).
    pub properties: BTreeMap<String, String>,
    /// Proxy addresses (`SMTP:…`, `smtp:…`), for `EmailAddresses`.
    pub email_addresses: Vec<String>,
    /// Distinguished names of the groups the recipient belongs to, computed by the caller in the
    /// nested mode it wants.
    pub member_of: Vec<String>,
}

impl RecipientFacts {
    fn values_of(&self, property: &str) -> Vec<String> {
        if property.eq_ignore_ascii_case("MemberOfGroup") {
            return self.member_of.clone();
        }
        if property.eq_ignore_ascii_case("EmailAddresses") {
            return self.email_addresses.clone();
        }
        self.properties
            .iter()
            .filter(|(k, v)| k.eq_ignore_ascii_case(property) && !v.is_empty())
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// A named management scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagementScope {
    pub name: String,
    pub filter: RecipientFilter,
    /// Exclusive scopes do not restrict app access (docs/microsoft-365.md §3.4); kept for display.
    pub exclusive: bool,
}

/// The resource scope of one role assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AssignmentScope {
    /// No resource scope: the whole organization.
    Organization,
    /// `-CustomResourceScope <management scope>`.
    Custom(ManagementScope),
    /// `-RecipientAdministrativeUnitScope`: members of an administrative unit.
    AdministrativeUnit {
        name: String,
        member_ids: Vec<String>,
    },
    /// `-RecipientGroupScope`: members of a group, given by DN (matched like `MemberOfGroup`).
    Group {
        name: String,
        distinguished_name: String,
    },
}

/// `ScopeType` as `Test-ServicePrincipalAuthorization` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScopeType {
    CustomRecipientScope,
    AdministrativeUnit,
    Organization,
    /// The reference does not name the value for `-RecipientGroupScope` (unverified).
    Group,
}

impl ScopeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeType::CustomRecipientScope => "CustomRecipientScope",
            ScopeType::AdministrativeUnit => "AdministrativeUnit",
            ScopeType::Organization => "Organization",
            ScopeType::Group => "Group",
        }
    }
}

impl AssignmentScope {
    pub fn scope_type(&self) -> ScopeType {
        match self {
            AssignmentScope::Organization => ScopeType::Organization,
            AssignmentScope::Custom(_) => ScopeType::CustomRecipientScope,
            AssignmentScope::AdministrativeUnit { .. } => ScopeType::AdministrativeUnit,
            AssignmentScope::Group { .. } => ScopeType::Group,
        }
    }

    /// `AllowedResourceScope`: the scope's name, or `Organization`.
    pub fn display_name(&self) -> String {
        match self {
            AssignmentScope::Organization => "Organization".into(),
            AssignmentScope::Custom(s) => s.name.clone(),
            AssignmentScope::AdministrativeUnit { name, .. } => name.clone(),
            AssignmentScope::Group { name, .. } => name.clone(),
        }
    }

    pub fn contains(&self, r: &RecipientFacts) -> bool {
        match self {
            AssignmentScope::Organization => true,
            AssignmentScope::Custom(s) => s.filter.matches(r),
            AssignmentScope::AdministrativeUnit { member_ids, .. } => {
                member_ids.iter().any(|m| m.eq_ignore_ascii_case(&r.id))
            }
            AssignmentScope::Group {
                distinguished_name, ..
            } => r
                .member_of
                .iter()
                .any(|dn| dn.eq_ignore_ascii_case(distinguished_name)),
        }
    }
}

/// One management role assignment to an app, reduced to what evaluation needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRoleAssignment {
    pub name: String,
    /// An application role name, e.g. `Application Mail.Read`.
    pub role: String,
    pub scope: AssignmentScope,
    pub enabled: bool,
}

/// One row of `Test-ServicePrincipalAuthorization`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizationRow {
    pub role_name: String,
    pub granted_permissions: Vec<String>,
    pub allowed_resource_scope: String,
    pub scope_type: ScopeType,
    /// `None` when no `-Resource` was given (printed `Not Run`).
    pub in_scope: Option<bool>,
}

impl AuthorizationRow {
    pub fn in_scope_text(&self) -> &'static str {
        match self.in_scope {
            None => "Not Run",
            Some(true) => "True",
            Some(false) => "False",
        }
    }
}

/// `Test-ServicePrincipalAuthorization` over an app's assignments: one row per enabled assignment
/// of a known application role. Entra grants are deliberately ignored, as the cmdlet does.
pub fn authorization_rows(
    assignments: &[AppRoleAssignment],
    resource: Option<&RecipientFacts>,
) -> Vec<AuthorizationRow> {
    assignments
        .iter()
        .filter(|a| a.enabled)
        .filter_map(|a| {
            let role = application_role(&a.role)?;
            Some(AuthorizationRow {
                role_name: role.name.to_string(),
                granted_permissions: role.permissions.iter().map(|p| p.to_string()).collect(),
                allowed_resource_scope: a.scope.display_name(),
                scope_type: a.scope.scope_type(),
                in_scope: resource.map(|r| a.scope.contains(r)),
            })
        })
        .collect()
}

/// Permissions RBAC grants on this recipient: union over in-scope enabled assignments.
pub fn rbac_permissions_on(
    assignments: &[AppRoleAssignment],
    recipient: &RecipientFacts,
) -> BTreeSet<String> {
    authorization_rows(assignments, Some(recipient))
        .into_iter()
        .filter(|r| r.in_scope == Some(true))
        .flat_map(|r| r.granted_permissions)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SALES_DN: &str = "CN=Sales,OU=contoso.onmicrosoft.com,DC=PROD";

    fn alice() -> RecipientFacts {
        RecipientFacts {
            id: "alice-id".into(),
            properties: BTreeMap::from([
                ("PrimarySmtpAddress".into(), "alice@contoso.com".into()),
                ("CustomAttribute1".into(), "012332".into()),
                ("Department".into(), "Sales EMEA".into()),
            ]),
            email_addresses: vec!["SMTP:alice@contoso.com".into(), "smtp:a@contoso.com".into()],
            member_of: vec![SALES_DN.into()],
        }
    }

    fn bob() -> RecipientFacts {
        RecipientFacts {
            id: "bob-id".into(),
            properties: BTreeMap::from([("PrimarySmtpAddress".into(), "bob@contoso.com".into())]),
            ..Default::default()
        }
    }

    fn scope(f: &str) -> AssignmentScope {
        AssignmentScope::Custom(ManagementScope {
            name: "S".into(),
            filter: RecipientFilter::parse(f).unwrap(),
            exclusive: false,
        })
    }

    #[test]
    fn permissions_map_to_their_single_role_and_the_trap_is_the_mailbox_grants() {
        assert_eq!(
            role_for_permission("Mail.Read").map(|r| r.name),
            Some("Application Mail.Read")
        );
        assert_eq!(
            role_for_permission("SMTP.SendAsApp").map(|r| r.name),
            Some("Application SMTP.SendAsApp")
        );
        // No role grants Mail.ReadBasic.All (docs/microsoft-365.md §3.2); bundles are never chosen for one permission.
        assert_eq!(role_for_permission("Mail.ReadBasic.All"), None);
        assert_eq!(
            role_for_permission("Mail.ReadWrite").map(|r| r.name),
            Some("Application Mail.ReadWrite")
        );
        let entra = vec![
            "User.Read.All".to_string(),
            "Mail.Read".to_string(),
            "Calendars.Read".to_string(),
            "full_access_as_app".to_string(),
            "Mail.Read".to_string(),
        ];
        assert_eq!(
            unscoped_mailbox_grants(&entra),
            vec!["Calendars.Read", "Mail.Read", "full_access_as_app"]
        );
        assert!(!is_mailbox_permission("Mail."));
        assert!(!is_mailbox_permission("Files.Read.All"));
    }

    #[test]
    fn member_of_group_filter() {
        let f = RecipientFilter::parse(&format!("MemberOfGroup -eq '{SALES_DN}'")).unwrap();
        assert!(f.matches(&alice()));
        assert!(!f.matches(&bob()));
        assert_eq!(f.member_of_group_dns(), vec![SALES_DN.to_string()]);
    }

    #[test]
    fn documented_filter_examples_parse_and_match() {
        assert!(
            RecipientFilter::parse("CustomAttribute1 -eq '012332'")
                .unwrap()
                .matches(&alice())
        );
        assert!(
            RecipientFilter::parse("PrimarySmtpAddress -eq 'BOB@contoso.com'")
                .unwrap()
                .matches(&bob())
        );
        assert!(
            RecipientFilter::parse("{ Alias -eq $null }")
                .unwrap()
                .matches(&bob())
        );
    }

    #[test]
    fn boolean_operators_and_like() {
        let f = RecipientFilter::parse(
            "(Department -like 'sales*') -and -not (CustomAttribute1 -ne \"012332\")",
        )
        .unwrap();
        assert!(f.matches(&alice()));
        assert!(!f.matches(&bob()));
        let f = RecipientFilter::parse(
            "Department -like 'x*' -or EmailAddresses -eq 'smtp:a@contoso.com'",
        )
        .unwrap();
        assert!(f.matches(&alice()));
        assert!(
            RecipientFilter::parse("Department -notlike '*EMEA'")
                .unwrap()
                .matches(&bob())
        );
    }

    #[test]
    fn escaped_quotes_in_values() {
        let f = RecipientFilter::parse("DisplayName -eq 'O''Brien'").unwrap();
        let r = RecipientFacts {
            properties: BTreeMap::from([("DisplayName".into(), "O'Brien".into())]),
            ..Default::default()
        };
        assert!(f.matches(&r));
    }

    #[test]
    fn malformed_filters_are_rejected() {
        assert_eq!(RecipientFilter::parse("  "), Err(FilterError::Empty));
        assert!(matches!(
            RecipientFilter::parse("MemberOfGroup 'x'"),
            Err(FilterError::Syntax { .. })
        ));
        assert!(matches!(
            RecipientFilter::parse("Alias -eq 'x"),
            Err(FilterError::Syntax { .. })
        ));
        assert!(matches!(
            RecipientFilter::parse("(Alias -eq 'x'"),
            Err(FilterError::Syntax { .. })
        ));
        assert!(matches!(
            RecipientFilter::parse("Alias -eq 'x' y"),
            Err(FilterError::Syntax { .. })
        ));
        assert!(matches!(
            RecipientFilter::parse("Alias -gt 'x'"),
            Err(FilterError::Syntax { .. })
        ));
        assert_eq!(
            RecipientFilter::parse("Colour -eq 'x'"),
            Err(FilterError::UnknownProperty("Colour".into()))
        );
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("a*c", "abbbc"));
        assert!(wildcard_match("A?C", "abc"));
        assert!(!wildcard_match("a*d", "abc"));
        assert!(wildcard_match("*", ""));
    }

    #[test]
    fn roles_are_found_case_insensitively_and_bundles_expand() {
        assert_eq!(
            application_role("application mail.read")
                .unwrap()
                .permissions,
            &["Mail.Read"]
        );
        assert_eq!(
            application_role("Application Exchange Full Access")
                .unwrap()
                .permissions
                .len(),
            5
        );
        assert!(application_role("Mail Recipients").is_none());
    }

    #[test]
    fn test_authorization_rows_with_and_without_resource() {
        let a = vec![
            AppRoleAssignment {
                name: "a1".into(),
                role: "Application Mail.Read".into(),
                scope: scope(&format!("MemberOfGroup -eq '{SALES_DN}'")),
                enabled: true,
            },
            AppRoleAssignment {
                name: "a2".into(),
                role: "Application Calendars.Read".into(),
                scope: AssignmentScope::Organization,
                enabled: true,
            },
        ];
        let rows = authorization_rows(&a, None);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].in_scope_text(), "Not Run");
        assert_eq!(rows[0].scope_type.as_str(), "CustomRecipientScope");
        assert_eq!(rows[1].allowed_resource_scope, "Organization");
        let rows = authorization_rows(&a, Some(&bob()));
        assert_eq!(rows[0].in_scope, Some(false));
        assert_eq!(rows[1].in_scope, Some(true));
        assert_eq!(
            rbac_permissions_on(&a, &bob()),
            BTreeSet::from(["Calendars.Read".to_string()])
        );
        assert_eq!(
            rbac_permissions_on(&a, &alice()),
            BTreeSet::from(["Calendars.Read".to_string(), "Mail.Read".to_string()])
        );
    }

    #[test]
    fn disabled_and_unknown_roles_grant_nothing() {
        let a = vec![
            AppRoleAssignment {
                name: "off".into(),
                role: "Application Mail.Read".into(),
                scope: AssignmentScope::Organization,
                enabled: false,
            },
            AppRoleAssignment {
                name: "weird".into(),
                role: "Mail Recipients".into(),
                scope: AssignmentScope::Organization,
                enabled: true,
            },
        ];
        assert!(rbac_permissions_on(&a, &alice()).is_empty());
    }

    #[test]
    fn administrative_unit_and_group_scopes() {
        let au = AssignmentScope::AdministrativeUnit {
            name: "EU".into(),
            member_ids: vec!["ALICE-ID".into()],
        };
        assert!(au.contains(&alice()) && !au.contains(&bob()));
        assert_eq!(au.scope_type().as_str(), "AdministrativeUnit");
        let g = AssignmentScope::Group {
            name: "Sales".into(),
            distinguished_name: SALES_DN.into(),
        };
        assert!(g.contains(&alice()) && !g.contains(&bob()));
    }
}
