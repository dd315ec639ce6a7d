//! The simulated directory of each tenant: recipients (mailboxes, mail users, contacts, groups),
//! Entra applications and service principals with their grants, and Exchange's own objects
//! (application access policies, Exchange service principals, management scopes and role
//! assignments), plus mailbox contents.
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::rules::{Facts, Memberships, Nesting, PolicyFact, Right, groups_of};

use super::settings::Behaviour;

pub const GRAPH_APP_ID: &str = "00000003-0000-0000-c000-000000000000";
pub const EXCHANGE_APP_ID: &str = "00000002-0000-0ff1-ce00-000000000000";
pub const GRAPH_RESOURCE: &str = "https://graph.microsoft.com";
pub const EXCHANGE_RESOURCE: &str = "https://outlook.office365.com";
pub const MANAGE_AS_APP_ROLE_ID: &str = "dc50a0fb-09a3-484d-be87-e023b12c6440";
/// Directory-role template id every app-only token carries in `wids` ("Directory Readers"-like
/// default role of service principals).
pub const DEFAULT_APP_WID: &str = "0997a1d0-0d1d-4acb-b408-d5ca73121e90";

/// Microsoft Graph application permissions the sandbox knows, with their app role ids. The mail
/// ids come from docs/microsoft-365.md §5.5; the directory ones from Microsoft's permissions list.
pub const GRAPH_APP_ROLES: &[(&str, &str)] = &[
    ("Mail.Read", "810c84a8-4a9e-49e6-bf7d-12d183f40d01"),
    ("Mail.ReadBasic", "6be147d2-ea4f-4b5a-a3fa-3eab6f3c140a"),
    ("Mail.ReadBasic.All", "693c5e45-0940-467d-9b8a-1022fb9d42ef"),
    ("Mail.ReadWrite", "e2a3a72e-5f79-4c64-b1b1-878b674786c9"),
    ("Mail.Send", "b633e1c5-b582-4048-a93e-9f11b44c7e96"),
    (
        "MailboxSettings.Read",
        "40f97065-369a-49f4-947c-6a255697ae91",
    ),
    (
        "MailboxSettings.ReadWrite",
        "6931bccd-447a-43d1-b442-00a195474933",
    ),
    ("Calendars.Read", "798ee544-9d2d-430c-a058-570e29e34338"),
    (
        "Calendars.ReadWrite",
        "ef54d2bf-783f-4e0f-bca1-3210c0444d99",
    ),
    ("Contacts.Read", "089fe4d0-434a-44c5-8827-41ba8a0b17f5"),
    ("Contacts.ReadWrite", "6918b873-d17a-4dc1-b314-35f528134491"),
    (
        "Application.Read.All",
        "9a5d68dd-52b0-4cc2-bd40-abcf44ac3a30",
    ),
    (
        "Application.ReadWrite.All",
        "1bfefb4e-e0b5-418b-a88f-73c46d2cc8e9",
    ),
    (
        "Application.ReadWrite.OwnedBy",
        "18a4783c-866b-4cc7-a460-3d5e5662c884",
    ),
    (
        "AppRoleAssignment.ReadWrite.All",
        "06b708a9-e830-4db3-a914-8e69da51d44f",
    ),
    ("Directory.Read.All", "7ab1d382-f21e-4acd-a863-ba3e13f7da61"),
    ("User.Read.All", "df021288-bdef-4463-88db-98f22de89214"),
    ("Group.Read.All", "5b567255-7703-4780-807c-7be8301ae99b"),
    (
        "Organization.Read.All",
        "498476ce-e0fe-48b0-b801-37ba7e2685c6",
    ),
    (
        "RoleManagement.ReadWrite.Directory",
        "9e3f62cf-ca93-4989-b6ce-bf83c28f9fe8",
    ),
];

/// Office 365 Exchange Online application permissions with known ids (docs/microsoft-365.md §5.5).
/// `Exchange.ManageAsAppV2` is added per tenant with a random id, because its real id is unverified
/// and clients must resolve it at run time.
pub const EXCHANGE_APP_ROLES: &[(&str, &str)] = &[
    ("full_access_as_app", "dc890d15-9560-4a4c-9b7f-a736ec74ec40"),
    ("Exchange.ManageAsApp", MANAGE_AS_APP_ROLE_ID),
];

/// Entra directory roles (template ids) that let an app run Exchange admin cmdlets (docs/microsoft-365.md §1.2).
pub const DIRECTORY_ROLES: &[(&str, &str)] = &[
    (
        "Global Administrator",
        "62e90394-69f5-4237-9190-012177145e10",
    ),
    (
        "Exchange Administrator",
        "29232cdf-9323-42fd-ade2-1d097af3e4de",
    ),
    (
        "Exchange Recipient Administrator",
        "31392ffb-586c-42d1-9346-e59415a2cc4e",
    ),
    (
        "Compliance Administrator",
        "17315797-102d-40b4-93e0-432062caca18",
    ),
    ("Global Reader", "f2ef992c-3afb-46b9-b7cf-a126ee74c451"),
    (
        "Helpdesk Administrator",
        "729827e3-9c14-49f7-bb1b-9608f156bbb8",
    ),
    (
        "Security Administrator",
        "194ae4cb-b126-40b2-bd5b-6091b380977d",
    ),
    ("Security Reader", "5d6b6bb7-de71-4623-b4af-96380a352509"),
];

pub fn directory_role_id(name_or_id: &str) -> Option<&'static str> {
    DIRECTORY_ROLES
        .iter()
        .find(|(n, id)| n.eq_ignore_ascii_case(name_or_id) || id.eq_ignore_ascii_case(name_or_id))
        .map(|(_, id)| *id)
}

pub fn directory_role_name(id: &str) -> Option<&'static str> {
    DIRECTORY_ROLES
        .iter()
        .find(|(_, i)| i.eq_ignore_ascii_case(id))
        .map(|(n, _)| *n)
}

/// A random GUID from the given generator (seeded, so runs are reproducible).
pub fn guid(rng: &mut impl Rng) -> String {
    uuid::Builder::from_random_bytes(rng.r#gen())
        .into_uuid()
        .to_string()
}

/// The kinds of recipient (and non-recipient directory objects) the sandbox models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RecipientKind {
    UserMailbox,
    SharedMailbox,
    RoomMailbox,
    EquipmentMailbox,
    MailUser,
    MailContact,
    /// Mail-enabled security group (`New-DistributionGroup -Type Security`).
    MailUniversalSecurityGroup,
    /// Distribution group.
    MailUniversalDistributionGroup,
    /// Microsoft 365 group.
    GroupMailbox,
    /// Entra-only security group: not an Exchange recipient.
    SecurityGroup,
    /// Entra user without a mailbox: not an Exchange recipient.
    User,
}

impl RecipientKind {
    pub fn parse(s: &str) -> Option<RecipientKind> {
        use RecipientKind::*;
        Some(
            match s.to_ascii_lowercase().replace(['-', '_', ' '], "").as_str() {
                "usermailbox" | "mailbox" => UserMailbox,
                "sharedmailbox" | "shared" => SharedMailbox,
                "roommailbox" | "room" => RoomMailbox,
                "equipmentmailbox" | "equipment" => EquipmentMailbox,
                "mailuser" => MailUser,
                "mailcontact" | "contact" => MailContact,
                "mailuniversalsecuritygroup" | "security" | "mailenabledsecurity" => {
                    MailUniversalSecurityGroup
                }
                "mailuniversaldistributiongroup" | "distribution" => MailUniversalDistributionGroup,
                "groupmailbox" | "m365" | "microsoft365" | "unified" => GroupMailbox,
                "securitygroup" | "entrasecurity" | "entra" => SecurityGroup,
                "user" | "usernomailbox" | "entrauser" => User,
                _ => return None,
            },
        )
    }

    pub fn is_group(self) -> bool {
        matches!(
            self,
            RecipientKind::MailUniversalSecurityGroup
                | RecipientKind::MailUniversalDistributionGroup
                | RecipientKind::GroupMailbox
                | RecipientKind::SecurityGroup
        )
    }

    pub fn is_distribution_group(self) -> bool {
        matches!(
            self,
            RecipientKind::MailUniversalSecurityGroup
                | RecipientKind::MailUniversalDistributionGroup
        )
    }

    pub fn has_mailbox(self) -> bool {
        matches!(
            self,
            RecipientKind::UserMailbox
                | RecipientKind::SharedMailbox
                | RecipientKind::RoomMailbox
                | RecipientKind::EquipmentMailbox
        )
    }

    /// Is it an Entra user object (listed by Graph `/users`)?
    pub fn is_user(self) -> bool {
        self.has_mailbox() || matches!(self, RecipientKind::MailUser | RecipientKind::User)
    }

    /// Does Exchange know it as a recipient?
    pub fn is_recipient(self) -> bool {
        !matches!(self, RecipientKind::SecurityGroup | RecipientKind::User)
    }

    /// `RecipientType` as Exchange prints it.
    pub fn recipient_type(self) -> &'static str {
        use RecipientKind::*;
        match self {
            UserMailbox | SharedMailbox | RoomMailbox | EquipmentMailbox => "UserMailbox",
            MailUser => "MailUser",
            MailContact => "MailContact",
            MailUniversalSecurityGroup => "MailUniversalSecurityGroup",
            MailUniversalDistributionGroup | GroupMailbox => "MailUniversalDistributionGroup",
            SecurityGroup => "SecurityGroup",
            User => "User",
        }
    }

    /// `RecipientTypeDetails` as Exchange prints it.
    pub fn recipient_type_details(self) -> &'static str {
        use RecipientKind::*;
        match self {
            UserMailbox => "UserMailbox",
            SharedMailbox => "SharedMailbox",
            RoomMailbox => "RoomMailbox",
            EquipmentMailbox => "EquipmentMailbox",
            MailUser => "MailUser",
            MailContact => "MailContact",
            MailUniversalSecurityGroup => "MailUniversalSecurityGroup",
            MailUniversalDistributionGroup => "MailUniversalDistributionGroup",
            GroupMailbox => "GroupMailbox",
            SecurityGroup => "SecurityGroup",
            User => "User",
        }
    }

    /// `IsValidSecurityPrincipal` (Get-Recipient): what can hold permissions.
    pub fn is_valid_security_principal(self) -> bool {
        use RecipientKind::*;
        matches!(
            self,
            UserMailbox | MailUser | MailUniversalSecurityGroup | SecurityGroup | User
        )
    }
}

/// One directory object.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Recipient {
    /// Entra object id (`ExternalDirectoryObjectId` in Exchange).
    pub id: String,
    /// Exchange's own object id (`ExchangeObjectId`, `Guid`): deliberately different.
    pub exchange_object_id: String,
    pub kind: RecipientKind,
    pub name: String,
    pub alias: String,
    pub display_name: String,
    pub primary_smtp_address: String,
    pub email_addresses: Vec<String>,
    pub user_principal_name: Option<String>,
    pub sid: String,
    /// Direct members (object ids), for groups.
    pub members: Vec<String>,
    pub managed_by: Vec<String>,
    /// CustomAttribute1..15, Department, Company, City.
    pub properties: BTreeMap<String, String>,
    pub ews_enabled: Option<bool>,
    pub member_join_restriction: String,
    pub member_depart_restriction: String,
    pub require_sender_authentication_enabled: bool,
    pub notes: String,
    /// Entra directory roles (template ids) held by this user.
    pub directory_roles: Vec<String>,
    pub created: DateTime<Utc>,
    /// Sandbox time from which other calls can see it (replication lag).
    #[serde(skip)]
    pub visible_at: Duration,
}

impl Recipient {
    pub fn distinguished_name(&self, tenant: &Tenant) -> String {
        format!(
            "CN={},OU={},OU=Microsoft Exchange Hosted Organizations,DC=NAMPR03A001,DC=PROD,DC=OUTLOOK,DC=COM",
            self.name.replace(',', "\\,"),
            tenant.initial_domain
        )
    }

    /// Does `text` name this recipient (Name, Alias, DN, display name, address, UPN or GUID)?
    pub fn matches_identity(&self, tenant: &Tenant, text: &str) -> bool {
        let t = text.trim();
        let t = t
            .strip_prefix("SMTP:")
            .or_else(|| t.strip_prefix("smtp:"))
            .unwrap_or(t);
        [
            &self.id,
            &self.exchange_object_id,
            &self.name,
            &self.alias,
            &self.display_name,
        ]
        .iter()
        .any(|v| v.eq_ignore_ascii_case(t))
            || (!self.primary_smtp_address.is_empty()
                && self.primary_smtp_address.eq_ignore_ascii_case(t))
            || self
                .user_principal_name
                .as_deref()
                .is_some_and(|u| u.eq_ignore_ascii_case(t))
            || self.email_addresses.iter().any(|a| {
                a.split_once(':')
                    .map(|(_, x)| x)
                    .unwrap_or(a)
                    .eq_ignore_ascii_case(t)
            })
            || self.distinguished_name(tenant).eq_ignore_ascii_case(t)
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PasswordCredential {
    pub key_id: String,
    pub display_name: Option<String>,
    pub hint: String,
    #[serde(skip)]
    pub secret_text: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// Sandbox time from which the token endpoint accepts it (Entra's eventual consistency).
    #[serde(skip)]
    pub usable_at: Duration,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyCredential {
    pub key_id: String,
    pub display_name: Option<String>,
    /// DER of the X.509 certificate.
    #[serde(skip)]
    pub der: Vec<u8>,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Application {
    pub id: String,
    pub app_id: String,
    pub display_name: String,
    pub sign_in_audience: String,
    pub password_credentials: Vec<PasswordCredential>,
    pub key_credentials: Vec<KeyCredential>,
    pub required_resource_access: Value,
    /// Other properties set with POST/PATCH, echoed back.
    pub extra: serde_json::Map<String, Value>,
    /// Service principal object id of the app that created it (for `Application.ReadWrite.OwnedBy`).
    pub owner_sp: Option<String>,
    pub created: DateTime<Utc>,
    /// Sandbox time from which Graph reads see it and a service principal can be created for it
    /// (Entra's eventual consistency).
    #[serde(skip)]
    pub visible_at: Duration,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AppRoleDef {
    pub id: String,
    pub value: String,
    pub display_name: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePrincipal {
    pub id: String,
    pub app_id: String,
    pub display_name: String,
    pub app_roles: Vec<AppRoleDef>,
    /// Tenant that owns the application (None for Microsoft's first-party resources).
    pub app_owner_organization_id: Option<String>,
    pub created: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AppRoleGrant {
    pub id: String,
    pub principal_id: String,
    pub resource_id: String,
    pub app_role_id: String,
    pub created: DateTime<Utc>,
    /// Sandbox time from which tokens carry the role (Entra's eventual consistency).
    #[serde(skip)]
    pub in_token_at: Duration,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectoryRoleAssignment {
    pub id: String,
    pub principal_id: String,
    pub role_definition_id: String,
    pub directory_scope_id: String,
}

/// An application access policy as Exchange stores it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub app_id: String,
    /// Entra object id of the scope recipient.
    pub scope_id: String,
    pub access_right: Right,
    pub description: String,
    pub created: DateTime<Utc>,
    #[serde(skip)]
    pub visible_at: Duration,
}

/// The Exchange pointer to an Entra service principal (`New-ServicePrincipal`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExoServicePrincipal {
    pub app_id: String,
    pub object_id: String,
    pub display_name: String,
    pub identity: String,
    pub created: DateTime<Utc>,
    #[serde(skip)]
    pub visible_at: Duration,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagementScopeRecord {
    pub name: String,
    pub guid: String,
    pub filter: String,
    pub exclusive: bool,
    pub created: DateTime<Utc>,
    #[serde(skip)]
    pub visible_at: Duration,
}

/// The resource scope of a role assignment, by reference.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase", tag = "type", content = "value")]
pub enum ScopeRef {
    Organization,
    Custom(String),
    Group(String),
    /// `-RecipientAdministrativeUnitScope`: an administrative unit's id.
    AdministrativeUnit(String),
}

/// An Entra administrative unit: a named set of directory objects (here: recipients by id).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdministrativeUnit {
    pub id: String,
    pub display_name: String,
    /// Recipient ids.
    pub members: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoleAssignmentRecord {
    pub name: String,
    pub guid: String,
    pub role: String,
    /// Object id of the Exchange service principal.
    pub app_object_id: String,
    pub scope: ScopeRef,
    pub enabled: bool,
    pub created: DateTime<Utc>,
    #[serde(skip)]
    pub visible_at: Duration,
}

/// Contents of one mailbox. Items are kept as Graph JSON.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MailboxData {
    pub folders: Vec<Value>,
    pub messages: Vec<Value>,
    pub calendars: Vec<Value>,
    pub events: Vec<Value>,
    pub contacts: Vec<Value>,
    pub settings: Value,
}

/// One simulated tenant.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub initial_domain: String,
    pub display_name: String,
    pub sid_base: String,
    pub next_rid: u64,
    pub behaviour: Behaviour,
    pub recipients: Vec<Recipient>,
    pub applications: Vec<Application>,
    pub service_principals: Vec<ServicePrincipal>,
    pub app_role_grants: Vec<AppRoleGrant>,
    pub directory_role_assignments: Vec<DirectoryRoleAssignment>,
    pub policies: Vec<Policy>,
    /// Set once a policy has ever existed (see `Behaviour::policy_get_fails_when_never_used`).
    pub policies_ever_used: bool,
    pub exo_service_principals: Vec<ExoServicePrincipal>,
    pub management_scopes: Vec<ManagementScopeRecord>,
    pub role_assignments: Vec<RoleAssignmentRecord>,
    pub administrative_units: Vec<AdministrativeUnit>,
    pub mailboxes: BTreeMap<String, MailboxData>,
    pub sent_mail: Vec<Value>,
    /// Client id of the management app printed at start (if this tenant has one).
    pub management_app_id: Option<String>,
}

impl Tenant {
    pub fn new(
        id: String,
        initial_domain: String,
        display_name: String,
        rng: &mut impl Rng,
    ) -> Self {
        let sid_base = format!(
            "S-1-5-21-{}-{}-{}",
            rng.gen_range(1_000_000_000u64..4_000_000_000),
            rng.gen_range(1_000_000_000u64..4_000_000_000),
            rng.gen_range(100_000_000u64..999_999_999)
        );
        Tenant {
            id,
            initial_domain,
            display_name,
            sid_base,
            next_rid: 31_400_000,
            behaviour: Behaviour::default(),
            recipients: vec![],
            applications: vec![],
            service_principals: vec![],
            app_role_grants: vec![],
            directory_role_assignments: vec![],
            policies: vec![],
            policies_ever_used: false,
            exo_service_principals: vec![],
            management_scopes: vec![],
            role_assignments: vec![],
            administrative_units: vec![],
            mailboxes: BTreeMap::new(),
            sent_mail: vec![],
            management_app_id: None,
        }
    }

    pub fn next_sid(&mut self) -> String {
        self.next_rid += 1;
        format!("{}-{}", self.sid_base, self.next_rid)
    }

    /// Does `name` (GUID or domain) address this tenant?
    pub fn answers_to(&self, name: &str) -> bool {
        self.id.eq_ignore_ascii_case(name) || self.initial_domain.eq_ignore_ascii_case(name)
    }

    pub fn recipient(&self, id: &str) -> Option<&Recipient> {
        self.recipients
            .iter()
            .find(|r| r.id.eq_ignore_ascii_case(id))
    }

    pub fn recipient_mut(&mut self, id: &str) -> Option<&mut Recipient> {
        self.recipients
            .iter_mut()
            .find(|r| r.id.eq_ignore_ascii_case(id))
    }

    /// Graph `/users/{id | userPrincipalName}` lookup (users only).
    pub fn user_by_key(&self, key: &str) -> Option<&Recipient> {
        self.recipients.iter().find(|r| {
            r.kind.is_user()
                && (r.id.eq_ignore_ascii_case(key)
                    || r.user_principal_name
                        .as_deref()
                        .is_some_and(|u| u.eq_ignore_ascii_case(key)))
        })
    }

    pub fn group_members(&self) -> Memberships {
        self.recipients
            .iter()
            .filter(|r| r.kind.is_group())
            .map(|r| (r.id.clone(), r.members.clone()))
            .collect()
    }

    pub fn service_principal(&self, id: &str) -> Option<&ServicePrincipal> {
        self.service_principals
            .iter()
            .find(|s| s.id.eq_ignore_ascii_case(id))
    }

    pub fn service_principal_by_app_id(&self, app_id: &str) -> Option<&ServicePrincipal> {
        self.service_principals
            .iter()
            .find(|s| s.app_id.eq_ignore_ascii_case(app_id))
    }

    /// App role values the service principal holds on the resource with this app id, as a token
    /// issued at sandbox time `now` carries them (assignments still replicating are missing).
    pub fn granted_roles(
        &self,
        principal_id: &str,
        resource_app_id: &str,
        now: Duration,
    ) -> Vec<String> {
        let Some(resource) = self.service_principal_by_app_id(resource_app_id) else {
            return vec![];
        };
        let mut roles: Vec<String> = self
            .app_role_grants
            .iter()
            .filter(|g| g.principal_id == principal_id && g.resource_id == resource.id)
            .filter(|g| g.in_token_at <= now)
            .filter_map(|g| resource.app_roles.iter().find(|r| r.id == g.app_role_id))
            .map(|r| r.value.clone())
            .collect();
        roles.sort();
        roles.dedup();
        roles
    }

    pub fn directory_roles_of(&self, principal_id: &str) -> Vec<String> {
        self.directory_role_assignments
            .iter()
            .filter(|a| a.principal_id.eq_ignore_ascii_case(principal_id))
            .map(|a| a.role_definition_id.clone())
            .collect()
    }

    /// The application access policies in the form the sandbox's rules take.
    pub fn access_policies(&self) -> Vec<PolicyFact> {
        self.policies
            .iter()
            .map(|p| PolicyFact {
                app_id: p.app_id.clone(),
                scope_id: p.scope_id.clone(),
                right: p.access_right,
            })
            .collect()
    }

    /// What recipient filters see of a recipient, with group DNs in the given nested mode.
    pub fn recipient_facts(&self, r: &Recipient, members: &Memberships, nested: Nesting) -> Facts {
        let mut properties = r.properties.clone();
        properties.insert("PrimarySmtpAddress".into(), r.primary_smtp_address.clone());
        properties.insert("Alias".into(), r.alias.clone());
        properties.insert("Name".into(), r.name.clone());
        properties.insert("DisplayName".into(), r.display_name.clone());
        properties.insert("DistinguishedName".into(), r.distinguished_name(self));
        properties.insert("RecipientType".into(), r.kind.recipient_type().into());
        properties.insert(
            "RecipientTypeDetails".into(),
            r.kind.recipient_type_details().into(),
        );
        if let Some(u) = &r.user_principal_name {
            properties.insert("UserPrincipalName".into(), u.clone());
        }
        let member_of = groups_of(members, &r.id, nested)
            .iter()
            .filter_map(|g| self.recipient(g))
            .map(|g| g.distinguished_name(self))
            .collect();
        Facts {
            id: r.id.clone(),
            properties,
            addresses: r.email_addresses.clone(),
            member_of,
        }
    }

    /// Is any object (other than `except`) already using this name, alias or address?
    pub fn name_taken(&self, value: &str) -> bool {
        self.recipients.iter().any(|r| {
            r.name.eq_ignore_ascii_case(value)
                || r.alias.eq_ignore_ascii_case(value)
                || r.primary_smtp_address.eq_ignore_ascii_case(value)
        })
    }

    /// Entra ids of mailboxes whose users hold admin directory roles.
    pub fn admin_user_ids(&self) -> BTreeSet<String> {
        self.recipients
            .iter()
            .filter(|r| !r.directory_roles.is_empty())
            .map(|r| r.id.clone())
            .collect()
    }
}

/// Build a new recipient with derived names and addresses.
pub struct NewRecipient {
    pub kind: RecipientKind,
    pub name: String,
    pub display_name: Option<String>,
    pub alias: Option<String>,
    pub primary_smtp_address: Option<String>,
    pub id: Option<String>,
    pub properties: BTreeMap<String, String>,
    pub members: Vec<String>,
}

pub fn alias_from(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .collect()
}

pub fn build_recipient(
    tenant: &mut Tenant,
    n: NewRecipient,
    now_wall: DateTime<Utc>,
    visible_at: Duration,
    rng: &mut impl Rng,
) -> Recipient {
    let alias = n
        .alias
        .unwrap_or_else(|| alias_from(&n.name))
        .to_ascii_lowercase();
    let has_address = n.kind.is_recipient();
    let smtp = if has_address {
        n.primary_smtp_address
            .unwrap_or_else(|| format!("{alias}@{}", tenant.initial_domain))
    } else {
        String::new()
    };
    let upn = n
        .kind
        .is_user()
        .then(|| format!("{alias}@{}", tenant.initial_domain));
    let sid = tenant.next_sid();
    Recipient {
        id: n.id.unwrap_or_else(|| guid(rng)),
        exchange_object_id: guid(rng),
        kind: n.kind,
        display_name: n.display_name.unwrap_or_else(|| n.name.clone()),
        name: n.name,
        alias,
        email_addresses: if has_address {
            vec![format!("SMTP:{smtp}")]
        } else {
            vec![]
        },
        primary_smtp_address: smtp,
        user_principal_name: upn,
        sid,
        members: n.members,
        managed_by: vec![],
        properties: n.properties,
        ews_enabled: None,
        member_join_restriction: "Closed".into(),
        member_depart_restriction: if n.kind == RecipientKind::MailUniversalSecurityGroup {
            "Closed".into()
        } else {
            "Open".into()
        },
        require_sender_authentication_enabled: true,
        notes: String::new(),
        directory_roles: vec![],
        created: now_wall,
        visible_at,
    }
}

/// Standard folders and a little content, so mailbox calls return realistic data.
pub fn seed_mailbox(
    r: &Recipient,
    domain: &str,
    now: DateTime<Utc>,
    rng: &mut impl Rng,
) -> MailboxData {
    let folder = |name: &str, wk: &str, rng: &mut dyn rand::RngCore| {
        json!({"id": format!("AAMk{}", guid_like(rng)), "displayName": name, "parentFolderId": null,
               "childFolderCount": 0, "unreadItemCount": 0, "totalItemCount": 0, "isHidden": false,
               "wellKnownName": wk})
    };
    let mut folders = vec![
        folder("Inbox", "inbox", rng),
        folder("Sent Items", "sentitems", rng),
        folder("Drafts", "drafts", rng),
        folder("Deleted Items", "deleteditems", rng),
        folder("Archive", "archive", rng),
    ];
    let inbox_id = folders[0]["id"].clone();
    let mut messages = vec![];
    for (i, subject) in [
        "Welcome to the sandbox",
        "Quarterly numbers",
        "Lunch on Friday?",
    ]
    .iter()
    .enumerate()
    {
        let at = (now - chrono::Duration::hours(24 * (i as i64 + 1)))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        messages.push(json!({
            "id": format!("AAMkAG{}", guid_like(rng)),
            "createdDateTime": at, "receivedDateTime": at, "sentDateTime": at, "lastModifiedDateTime": at,
            "subject": subject, "bodyPreview": format!("{subject} (sandbox message)"),
            "importance": "normal", "isRead": i > 0, "isDraft": false, "hasAttachments": false,
            "parentFolderId": inbox_id,
            "from": {"emailAddress": {"name": "Sandbox Postmaster", "address": format!("postmaster@{domain}")}},
            "sender": {"emailAddress": {"name": "Sandbox Postmaster", "address": format!("postmaster@{domain}")}},
            "toRecipients": [{"emailAddress": {"name": r.display_name, "address": r.primary_smtp_address}}],
            "ccRecipients": [], "bccRecipients": [],
            "body": {"contentType": "text", "content": format!("{subject}\n\nThis message lives in a simulated mailbox.")}
        }));
    }
    folders[0]["totalItemCount"] = json!(messages.len());
    folders[0]["unreadItemCount"] = json!(1);
    let cal_id = format!("AAMkCal{}", guid_like(rng));
    let calendars = vec![
        json!({"id": cal_id, "name": "Calendar", "isDefaultCalendar": true,
        "canEdit": true, "owner": {"name": r.display_name, "address": r.primary_smtp_address}}),
    ];
    let start = (now + chrono::Duration::days(1))
        .format("%Y-%m-%dT10:00:00.0000000")
        .to_string();
    let end = (now + chrono::Duration::days(1))
        .format("%Y-%m-%dT10:30:00.0000000")
        .to_string();
    let events = vec![
        json!({"id": format!("AAMkEv{}", guid_like(rng)), "subject": "Team stand-up",
        "calendarId": cal_id,
        "start": {"dateTime": start, "timeZone": "UTC"}, "end": {"dateTime": end, "timeZone": "UTC"},
        "organizer": {"emailAddress": {"name": r.display_name, "address": r.primary_smtp_address}},
        "isAllDay": false, "showAs": "busy"}),
    ];
    let contacts = vec![
        json!({"id": format!("AAMkCt{}", guid_like(rng)), "displayName": "Sandbox Vendor",
        "givenName": "Sandbox", "surname": "Vendor",
        "emailAddresses": [{"name": "Sandbox Vendor", "address": "vendor@example.com"}]}),
    ];
    let settings = json!({
        "archiveFolder": folders[4]["id"],
        "timeZone": "UTC", "language": {"locale": "en-US", "displayName": "English (United States)"},
        "automaticRepliesSetting": {"status": "disabled", "externalAudience": "all",
            "internalReplyMessage": "", "externalReplyMessage": ""},
        "dateFormat": "yyyy-MM-dd", "timeFormat": "HH:mm", "delegateMeetingMessageDeliveryOptions": "sendToDelegateOnly",
        "userPurpose": match r.kind { RecipientKind::SharedMailbox => "shared", RecipientKind::RoomMailbox => "room",
            RecipientKind::EquipmentMailbox => "equipment", _ => "user" },
        "workingHours": {"daysOfWeek": ["monday","tuesday","wednesday","thursday","friday"],
            "startTime": "08:00:00.0000000", "endTime": "17:00:00.0000000", "timeZone": {"name": "UTC"}}
    });
    MailboxData {
        folders,
        messages,
        calendars,
        events,
        contacts,
        settings,
    }
}

/// An Exchange-style item id fragment.
pub fn guid_like(rng: &mut dyn rand::RngCore) -> String {
    let mut b = [0u8; 24];
    rng.fill_bytes(&mut b);
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Fixture file format (JSON). See `fixtures/default.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fixture {
    pub tenants: Vec<FixtureTenant>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureTenant {
    pub id: String,
    pub domain: String,
    pub display_name: String,
    #[serde(default)]
    pub default: bool,
    #[serde(default)]
    pub behaviour: Option<Value>,
    #[serde(default)]
    pub recipients: Vec<FixtureRecipient>,
    #[serde(default)]
    pub apps: Vec<FixtureApp>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureRecipient {
    pub name: String,
    pub kind: String,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub alias: Option<String>,
    /// Names of members (groups only).
    #[serde(default)]
    pub members: Vec<String>,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    #[serde(default)]
    pub directory_roles: Vec<String>,
    #[serde(default)]
    pub ews_enabled: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureApp {
    pub display_name: String,
    #[serde(default)]
    pub app_id: Option<String>,
    /// A fixed secret; generated at start when absent.
    #[serde(default)]
    pub secret: Option<String>,
    /// Graph application permissions granted (admin-consented).
    #[serde(default)]
    pub graph_permissions: Vec<String>,
    /// Exchange application permissions granted (e.g. `Exchange.ManageAsApp`).
    #[serde(default)]
    pub exchange_permissions: Vec<String>,
    /// Entra directory roles (names or template ids).
    #[serde(default)]
    pub directory_roles: Vec<String>,
    /// The app whose credentials are printed at start.
    #[serde(default)]
    pub management: bool,
}

pub const DEFAULT_FIXTURE: &str = include_str!("fixtures/default.json");
