//! Which application permissions an application access policy restricts (docs/microsoft-365.md §7), and
//! which resource (Microsoft Graph or Office 365 Exchange Online) each permission name belongs to.
//!
//! Everything outside the covered list stays tenant-wide whatever policy is in force (pitfall 8),
//! so mailscope refuses to grant it unless the caller accepts that explicitly.

/// Resource app id of Microsoft Graph.
pub const GRAPH_RESOURCE: &str = "00000003-0000-0000-c000-000000000000";
/// Resource app id of Office 365 Exchange Online.
pub const EXCHANGE_RESOURCE: &str = "00000002-0000-0ff1-ce00-000000000000";

/// Graph application permissions that application access policies restrict (docs/microsoft-365.md §7).
const COVERED_GRAPH: &[&str] = &[
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
];

/// Exchange Online application permissions. Only EWS `full_access_as_app` is restricted by a
/// policy; `Exchange.ManageAsApp*` run admin cmdlets tenant-wide.
const EXCHANGE: &[(&str, bool)] = &[
    ("full_access_as_app", true),
    ("Exchange.ManageAsApp", false),
    ("Exchange.ManageAsAppV2", false),
];

/// Where a permission lives and whether a policy restricts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PermissionInfo {
    /// The resource's app id (Graph or Exchange Online).
    pub resource_app_id: &'static str,
    /// True when application access policies restrict it to the policy's mailboxes.
    pub covered_by_access_policies: bool,
}

/// Classify a permission name (case-sensitive, as Microsoft spells app role values). Names not
/// known as Exchange permissions are Graph permissions; whether Graph has them is the tenant's say.
pub fn classify(name: &str) -> PermissionInfo {
    if let Some((_, covered)) = EXCHANGE.iter().find(|(n, _)| *n == name) {
        return PermissionInfo {
            resource_app_id: EXCHANGE_RESOURCE,
            covered_by_access_policies: *covered,
        };
    }
    PermissionInfo {
        resource_app_id: GRAPH_RESOURCE,
        covered_by_access_policies: COVERED_GRAPH.contains(&name),
    }
}

/// The application permissions this module knows by name (covered Graph ones, then Exchange
/// Online): what a misspelled name is compared with when the tenant's own list is not at hand.
pub fn known_names() -> impl Iterator<Item = &'static str> {
    COVERED_GRAPH
        .iter()
        .copied()
        .chain(EXCHANGE.iter().map(|(n, _)| *n))
}

/// The resource's name as the Entra admin center shows it.
pub fn resource_name(resource_app_id: &str) -> &'static str {
    if resource_app_id.eq_ignore_ascii_case(EXCHANGE_RESOURCE) {
        "Office 365 Exchange Online"
    } else {
        "Microsoft Graph"
    }
}

/// A permission name as app role values are written: letters, digits, `.`, `_`, `-`.
pub fn is_permission_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 120
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_calendar_contacts_and_ews_are_covered() {
        for p in [
            "Mail.Read",
            "Mail.Send",
            "Mail.ReadBasic.All",
            "Calendars.ReadWrite",
        ] {
            assert!(classify(p).covered_by_access_policies, "{p}");
            assert_eq!(classify(p).resource_app_id, GRAPH_RESOURCE);
        }
        let ews = classify("full_access_as_app");
        assert!(ews.covered_by_access_policies);
        assert_eq!(ews.resource_app_id, EXCHANGE_RESOURCE);
    }

    #[test]
    fn everything_else_is_tenant_wide() {
        for p in [
            "Files.Read.All",
            "User.Read.All",
            "Sites.Read.All",
            "mail.read",
        ] {
            assert!(!classify(p).covered_by_access_policies, "{p}");
        }
        let manage = classify("Exchange.ManageAsApp");
        assert!(!manage.covered_by_access_policies);
        assert_eq!(manage.resource_app_id, EXCHANGE_RESOURCE);
    }

    #[test]
    fn known_names_cover_both_resources() {
        let known: Vec<_> = known_names().collect();
        assert!(known.contains(&"Mail.Read"));
        assert!(known.contains(&"full_access_as_app"));
        assert_eq!(
            resource_name(EXCHANGE_RESOURCE),
            "Office 365 Exchange Online"
        );
        assert_eq!(resource_name(GRAPH_RESOURCE), "Microsoft Graph");
    }

    #[test]
    fn names() {
        assert!(is_permission_name("Mail.Read"));
        assert!(is_permission_name("full_access_as_app"));
        assert!(!is_permission_name(""));
        assert!(!is_permission_name("Mail Read"));
        assert!(!is_permission_name("Mail.Read'"));
    }
}
