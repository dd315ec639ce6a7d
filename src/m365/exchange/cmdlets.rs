//! Typed requests and outputs for the cmdlets mailscope uses (docs/microsoft-365.md §2, §3, §4).
//!
//! Output structs accept missing fields (everything is optional or defaults) because the REST
//! shapes of these objects are third-party observations; multi-valued properties accept a string,
//! an array or null. Retry safety is decided here, per cmdlet: Get-/Test- are always safe;
//! Set-, Remove-, Add-/Remove-…Member and Update-…Member are safe because repeating them is
//! harmless (a repeated Remove/Add answers NotFound/AlreadyExists, which the wrappers treat as
//! done); New-* is never retried on an ambiguous failure; the caller makes creation safe by
//! looking the object up first.
use super::{ExchangeClient, InvokeOptions};
use crate::m365::error::{ErrorKind, M365Error};
use serde::de::{DeserializeOwned, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Whether a lookup should wait out replication lag after a create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Replication {
    /// Report NotFound at once.
    #[default]
    Ignore,
    /// The object was just created: retry NotFound for the replication window.
    AwaitNew,
}

impl Replication {
    fn read_opts(self) -> InvokeOptions {
        InvokeOptions {
            safe_to_retry: true,
            wait_for_replication: self == Replication::AwaitNew,
            select: Vec::new(),
        }
    }
    fn write_opts(self) -> InvokeOptions {
        InvokeOptions {
            wait_for_replication: self == Replication::AwaitNew,
            ..self.read_opts()
        }
    }
}

/// Builder for the `Parameters` object: strings stay strings, lists become arrays (multi-valued
/// parameters), switches become `true`.
#[derive(Debug, Clone, Default)]
pub struct Params(Map<String, Value>);

impl Params {
    pub fn new() -> Self {
        Params::default()
    }
    pub fn str(mut self, name: &str, value: impl Into<String>) -> Self {
        self.0.insert(name.into(), Value::String(value.into()));
        self
    }
    pub fn opt_str(self, name: &str, value: Option<impl Into<String>>) -> Self {
        match value {
            Some(v) => self.str(name, v),
            None => self,
        }
    }
    /// A multi-valued parameter; omitted when empty.
    pub fn list(self, name: &str, values: &[String]) -> Self {
        if values.is_empty() {
            self
        } else {
            self.array(name, values)
        }
    }
    pub fn switch(mut self, name: &str) -> Self {
        self.0.insert(name.into(), Value::Bool(true));
        self
    }
    /// A multi-valued parameter sent even when empty (e.g. to empty a member list).
    fn array(mut self, name: &str, values: &[String]) -> Self {
        self.0.insert(
            name.into(),
            Value::Array(values.iter().cloned().map(Value::String).collect()),
        );
        self
    }
    pub fn bool(mut self, name: &str, value: bool) -> Self {
        self.0.insert(name.into(), Value::Bool(value));
        self
    }
    pub fn into_map(self) -> Map<String, Value> {
        self.0
    }
}

// ---------- lenient deserializers ----------

/// null, a string, or an array (of strings or anything printable).
fn de_strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => Vec::new(),
        Value::String(s) => vec![s],
        Value::Array(a) => a
            .into_iter()
            .filter_map(|v| match v {
                Value::String(s) => Some(s),
                Value::Null => None,
                other => Some(other.to_string()),
            })
            .collect(),
        other => vec![other.to_string()],
    })
}

/// `true`/`false`, `"True"`/`"False"`, or null.
fn de_opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Bool(b) => Some(b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    })
}

/// Any scalar as text (`InScope` is `True` or `Not Run`); null → None.
fn de_loose_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => None,
        Value::String(s) => Some(s),
        Value::Bool(b) => Some(if b { "True".into() } else { "False".into() }),
        other => Some(other.to_string()),
    })
}

// ---------- recipients and groups ----------

/// `Get-DistributionGroup` / `New-DistributionGroup` output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct DistributionGroup {
    pub identity: Option<String>,
    pub name: Option<String>,
    pub display_name: Option<String>,
    pub alias: Option<String>,
    pub primary_smtp_address: Option<String>,
    /// Needed for RBAC `MemberOfGroup` scope filters.
    pub distinguished_name: Option<String>,
    pub guid: Option<String>,
    /// The group's Entra object id.
    pub external_directory_object_id: Option<String>,
    /// `MailUniversalSecurityGroup` for the groups mailscope creates.
    pub recipient_type_details: Option<String>,
    #[serde(deserialize_with = "de_strings")]
    pub managed_by: Vec<String>,
}

/// Parameters of `New-DistributionGroup -Type Security` (a mail-enabled security group).
#[derive(Debug, Clone, Default)]
pub struct NewSecurityGroup {
    /// Unique, at most 64 characters.
    pub name: String,
    pub display_name: Option<String>,
    pub alias: Option<String>,
    pub primary_smtp_address: Option<String>,
    pub managed_by: Vec<String>,
    pub members: Vec<String>,
    pub notes: Option<String>,
}

/// Parameters of `Set-DistributionGroup` (only what mailscope changes).
#[derive(Debug, Clone, Default)]
pub struct SetDistributionGroup {
    pub display_name: Option<String>,
    pub managed_by: Vec<String>,
    pub notes: Option<String>,
}

/// A recipient as returned by `Get-Recipient` and `Get-DistributionGroupMember`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Recipient {
    pub identity: Option<String>,
    pub name: Option<String>,
    pub display_name: Option<String>,
    pub alias: Option<String>,
    pub primary_smtp_address: Option<String>,
    pub distinguished_name: Option<String>,
    pub guid: Option<String>,
    pub external_directory_object_id: Option<String>,
    pub recipient_type: Option<String>,
    pub recipient_type_details: Option<String>,
    /// Must be true for an Application Access Policy scope.
    #[serde(deserialize_with = "de_opt_bool")]
    pub is_valid_security_principal: Option<bool>,
    /// Proxy addresses (`SMTP:` primary, `smtp:` secondary, other prefixes for other types).
    #[serde(deserialize_with = "de_strings")]
    pub email_addresses: Vec<String>,
}

/// Most addresses one `Get-Recipient -Filter` names (see
/// [`ExchangeClient::get_recipients_by_address`]): the filter grows by ~50 characters per
/// address, and Exchange documents no limit for it, so one call stays near 25 KB.
pub const ADDRESSES_PER_FILTER: usize = 500;

/// `EmailAddresses -eq 'smtp:a' -or EmailAddresses -eq 'smtp:b' …` (quotes doubled, as OPATH
/// escapes them).
pub fn email_addresses_filter(addresses: &[String]) -> String {
    addresses
        .iter()
        .map(|a| format!("EmailAddresses -eq 'smtp:{}'", a.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(" -or ")
}

/// `Get-Mailbox` output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Mailbox {
    pub identity: Option<String>,
    pub name: Option<String>,
    pub display_name: Option<String>,
    pub alias: Option<String>,
    pub primary_smtp_address: Option<String>,
    pub user_principal_name: Option<String>,
    pub distinguished_name: Option<String>,
    pub guid: Option<String>,
    pub exchange_guid: Option<String>,
    pub external_directory_object_id: Option<String>,
    /// `UserMailbox`, `SharedMailbox`, `RoomMailbox`, ...
    pub recipient_type_details: Option<String>,
}

/// `Get-CASMailbox` output (diagnostic context only; docs/microsoft-365.md §4.3).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CasMailbox {
    pub identity: Option<String>,
    pub name: Option<String>,
    pub primary_smtp_address: Option<String>,
    /// `None` means "not configured" (`$null`).
    #[serde(deserialize_with = "de_opt_bool")]
    pub ews_enabled: Option<bool>,
    #[serde(deserialize_with = "de_opt_bool")]
    pub mapi_enabled: Option<bool>,
    #[serde(deserialize_with = "de_opt_bool")]
    pub owa_enabled: Option<bool>,
}

// ---------- application access policies ----------

pub use crate::domain::access::AccessRight;

/// `Get-/New-ApplicationAccessPolicy` output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ApplicationAccessPolicy {
    /// `<tenantId>\<AppId>:<ScopeSid>;<ScopeObjectGuid>` (generated; see [`PolicyIdentity`]).
    pub identity: Option<String>,
    pub app_id: Option<String>,
    pub scope_name: Option<String>,
    pub scope_identity: Option<String>,
    /// `<ScopeSid>;<ScopeObjectGuid>`.
    pub scope_identity_raw: Option<String>,
    pub description: Option<String>,
    pub access_right: Option<String>,
    pub shard_type: Option<String>,
    #[serde(deserialize_with = "de_opt_bool")]
    pub is_valid: Option<bool>,
}

impl ApplicationAccessPolicy {
    /// The scope group's GUID: from `ScopeIdentityRaw`, else from the Identity.
    pub fn scope_group_guid(&self) -> Option<String> {
        self.scope_identity_raw
            .as_deref()
            .and_then(|r| r.split_once(';'))
            .map(|(_, g)| g.trim().to_string())
            .filter(|g| !g.is_empty())
            .or_else(|| {
                self.identity
                    .as_deref()
                    .and_then(PolicyIdentity::parse)
                    .map(|p| p.scope_object_guid)
            })
    }

    /// mailscope's key for a policy (docs/microsoft-365.md §2.2, §6.12): (AppId, group GUID, AccessRight).
    pub fn key(&self) -> Option<(String, String, String)> {
        Some((
            self.app_id.clone()?.to_ascii_lowercase(),
            self.scope_group_guid()?.to_ascii_lowercase(),
            self.access_right.clone()?,
        ))
    }
}

/// The parts of a policy Identity `<tenantId>\<AppId>:<ScopeSid>;<ScopeObjectGuid>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyIdentity {
    pub tenant_id: String,
    pub app_id: String,
    pub scope_sid: String,
    pub scope_object_guid: String,
}

impl PolicyIdentity {
    pub fn parse(s: &str) -> Option<PolicyIdentity> {
        let (tenant, rest) = s.split_once('\\')?;
        let (app, scope) = rest.split_once(':')?;
        let (sid, guid) = scope.split_once(';')?;
        if [tenant, app, sid, guid].iter().any(|p| p.trim().is_empty()) {
            return None;
        }
        Some(PolicyIdentity {
            tenant_id: tenant.into(),
            app_id: app.into(),
            scope_sid: sid.into(),
            scope_object_guid: guid.into(),
        })
    }
}

/// Parameters of `New-ApplicationAccessPolicy`.
#[derive(Debug, Clone)]
pub struct NewApplicationAccessPolicy {
    /// Client id(s) of the restricted app.
    pub app_ids: Vec<String>,
    /// The mail-enabled security group (name, address or GUID).
    pub policy_scope_group_id: String,
    pub access_right: AccessRight,
    /// `None` sends `" "`: the shortest description, which fits the most policies (docs/microsoft-365.md §2.6).
    pub description: Option<String>,
}

/// `Test-ApplicationAccessPolicy` output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AccessCheck {
    pub app_id: Option<String>,
    pub mailbox: Option<String>,
    pub mailbox_id: Option<String>,
    pub mailbox_sid: Option<String>,
    /// `Granted` or `Denied`.
    pub access_check_result: Option<String>,
}

impl AccessCheck {
    /// `Some(true)` for Granted, `Some(false)` for Denied, `None` for anything else.
    pub fn granted(&self) -> Option<bool> {
        match self.access_check_result.as_deref()? {
            r if r.eq_ignore_ascii_case("granted") => Some(true),
            r if r.eq_ignore_ascii_case("denied") => Some(false),
            _ => None,
        }
    }
}

// ---------- RBAC for Applications ----------

/// `Get-/New-ServicePrincipal` output (Exchange's pointer to an Entra service principal).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ExoServicePrincipal {
    pub identity: Option<String>,
    pub name: Option<String>,
    pub display_name: Option<String>,
    pub app_id: Option<String>,
    /// The Enterprise app (service principal) object id.
    pub object_id: Option<String>,
    pub service_id: Option<String>,
}

/// `Get-/New-ManagementScope` output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ManagementScope {
    pub identity: Option<String>,
    pub name: Option<String>,
    /// The filter as `Get-/New-ManagementScope` output names it: `-RecipientRestrictionFilter` is
    /// only the parameter; the object property is `RecipientFilter`. Use [`ManagementScope::filter`].
    pub recipient_filter: Option<String>,
    /// Accepted in case an output ever echoes the parameter name.
    pub recipient_restriction_filter: Option<String>,
    pub recipient_root: Option<String>,
    pub scope_restriction_type: Option<String>,
    #[serde(deserialize_with = "de_opt_bool")]
    pub exclusive: Option<bool>,
}

impl ManagementScope {
    /// The recipient filter. Read back after every write: an empty filter widens the scope to
    /// the organization.
    pub fn filter(&self) -> Option<&str> {
        self.recipient_filter
            .as_deref()
            .or(self.recipient_restriction_filter.as_deref())
            .filter(|f| !f.trim().is_empty())
    }
}

/// Parameters of `New-ManagementRoleAssignment` for an app.
#[derive(Debug, Clone, Default)]
pub struct NewAppRoleAssignment {
    /// At most 64 characters; Exchange generates one when omitted.
    pub name: Option<String>,
    /// e.g. `Application Mail.Read`.
    pub role: String,
    /// The service principal as `Get-ServicePrincipal` shows it (ObjectId / Identity).
    pub app: String,
    pub custom_resource_scope: Option<String>,
    pub recipient_group_scope: Option<String>,
    pub recipient_administrative_unit_scope: Option<String>,
}

/// `Get-/New-ManagementRoleAssignment` output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ManagementRoleAssignment {
    pub identity: Option<String>,
    pub name: Option<String>,
    pub role: Option<String>,
    pub role_assignee: Option<String>,
    pub role_assignee_name: Option<String>,
    pub role_assignee_type: Option<String>,
    pub custom_resource_scope: Option<String>,
    /// The group of `-RecipientGroupScope` (its name as Exchange prints it).
    pub recipient_group_scope: Option<String>,
    pub recipient_administrative_unit_scope: Option<String>,
    pub recipient_write_scope: Option<String>,
    pub assignment_method: Option<String>,
    #[serde(deserialize_with = "de_opt_bool")]
    pub enabled: Option<bool>,
}

/// Filters for `Get-ManagementRoleAssignment`.
#[derive(Debug, Clone, Default)]
pub struct RoleAssignmentQuery {
    pub identity: Option<String>,
    pub role: Option<String>,
    pub role_assignee: Option<String>,
}

/// One row of `Test-ServicePrincipalAuthorization`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AuthorizationRow {
    pub role_name: Option<String>,
    #[serde(deserialize_with = "de_strings")]
    pub granted_permissions: Vec<String>,
    pub allowed_resource_scope: Option<String>,
    /// `CustomRecipientScope`, `AdministrativeUnit` or `Organization`.
    pub scope_type: Option<String>,
    /// `True`, `False`, or `Not Run` without `-Resource`.
    #[serde(deserialize_with = "de_loose_string")]
    pub in_scope: Option<String>,
}

impl AuthorizationRow {
    pub fn in_scope(&self) -> Option<bool> {
        match self.in_scope.as_deref()? {
            s if s.eq_ignore_ascii_case("true") => Some(true),
            s if s.eq_ignore_ascii_case("false") => Some(false),
            _ => None,
        }
    }
}

// ---------- helpers ----------

fn not_found_is_none<T>(r: Result<Vec<T>, M365Error>) -> Result<Option<T>, M365Error> {
    match r {
        Ok(v) => Ok(v.into_iter().next()),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// `Ok(true)` when done now, `Ok(false)` when it was already so (`absent` kind).
fn done_unless(
    r: Result<super::CmdletOutput, M365Error>,
    already: ErrorKind,
) -> Result<bool, M365Error> {
    match r {
        Ok(_) => Ok(true),
        Err(e) if *e.kind() == already => Ok(false),
        Err(e) => Err(e),
    }
}

fn one<T>(cmdlet: &str, v: Vec<T>) -> Result<T, M365Error> {
    v.into_iter().next().ok_or_else(|| {
        M365Error::new(
            ErrorKind::Protocol,
            crate::m365::Service::Exchange,
            format!("InvokeCommand:{cmdlet}"),
        )
        .with_message("the cmdlet returned no object")
    })
}

/// The shapes of answer the typed wrappers return; `cmdlet_wrappers!` picks one per wrapper.
impl ExchangeClient {
    fn removal(&self, p: Params) -> Params {
        if self.confirm_false_on_remove() {
            p.bool("Confirm", false)
        } else {
            p
        }
    }

    /// The first output object; `None` when Exchange answers NotFound.
    async fn first<T: DeserializeOwned>(
        &self,
        cmdlet: &str,
        p: Params,
        opts: &InvokeOptions,
    ) -> Result<Option<T>, M365Error> {
        not_found_is_none(self.invoke_typed(cmdlet, p.into_map(), opts).await)
    }

    /// The first output object; no object at all is a `Protocol` error.
    async fn single<T: DeserializeOwned>(
        &self,
        cmdlet: &str,
        p: Params,
        opts: &InvokeOptions,
    ) -> Result<T, M365Error> {
        let v = self.invoke_typed(cmdlet, p.into_map(), opts).await?;
        one(cmdlet, v)
    }

    /// Every output object (all pages).
    async fn all<T: DeserializeOwned>(
        &self,
        cmdlet: &str,
        p: Params,
        opts: &InvokeOptions,
    ) -> Result<Vec<T>, M365Error> {
        self.invoke_typed(cmdlet, p.into_map(), opts).await
    }

    /// Every output object; NotFound (e.g. nothing was ever created) is an empty list.
    async fn all_or_empty<T: DeserializeOwned>(
        &self,
        cmdlet: &str,
        p: Params,
        opts: &InvokeOptions,
    ) -> Result<Vec<T>, M365Error> {
        match self.invoke_typed(cmdlet, p.into_map(), opts).await {
            Err(e) if e.is_not_found() => Ok(Vec::new()),
            r => r,
        }
    }

    /// Success without output.
    async fn done(&self, cmdlet: &str, p: Params, opts: &InvokeOptions) -> Result<(), M365Error> {
        self.invoke(cmdlet, p.into_map(), opts).await.map(|_| ())
    }

    /// A `Remove-*` (with [`Self::removal`]'s `-Confirm:$false`): `Ok(false)` when it was already
    /// gone (NotFound).
    async fn removed(
        &self,
        cmdlet: &str,
        p: Params,
        opts: &InvokeOptions,
    ) -> Result<bool, M365Error> {
        let p = self.removal(p);
        done_unless(
            self.invoke(cmdlet, p.into_map(), opts).await,
            ErrorKind::NotFound,
        )
    }

    /// An `Add-*`: `Ok(false)` when it was already there (AlreadyExists).
    async fn added(
        &self,
        cmdlet: &str,
        p: Params,
        opts: &InvokeOptions,
    ) -> Result<bool, M365Error> {
        done_unless(
            self.invoke(cmdlet, p.into_map(), opts).await,
            ErrorKind::AlreadyExists,
        )
    }
}

/// Declares typed wrappers, one a line (or a few): the wrapper's signature, then
/// `= shape("Cmdlet-Name", options, parameters)`, where `shape` is one of the answer shapes above
/// (`first`, `single`, `all`, `all_or_empty`, `done`, `removed`, `added`) and `parameters` a
/// [`Params`] expression over the wrapper's arguments (and `self`).
macro_rules! cmdlet_wrappers {
    ($(
        $(#[$attr:meta])*
        $vis:vis async fn $name:ident(&$self:ident $(, $arg:ident: $ty:ty)*) -> $ret:ty
            = $shape:ident($cmdlet:literal, $opts:expr, $params:expr $(,)?);
    )*) => {
        impl ExchangeClient {
            $(
                $(#[$attr])*
                $vis async fn $name(&$self $(, $arg: $ty)*) -> $ret {
                    $self.$shape($cmdlet, $params, &$opts).await
                }
            )*
        }
    };
}

// ----- distribution groups -----

cmdlet_wrappers! {
    /// `New-DistributionGroup -Type Security`. Not retried on ambiguous failures: look the group
    /// up first (and after a failure) to make creation idempotent.
    pub async fn new_security_group(&self, g: &NewSecurityGroup)
        -> Result<DistributionGroup, M365Error>
        = single("New-DistributionGroup", InvokeOptions::write(), Params::new()
            .str("Name", &g.name)
            .str("Type", "Security")
            .opt_str("DisplayName", g.display_name.clone())
            .opt_str("Alias", g.alias.clone())
            .opt_str("PrimarySmtpAddress", g.primary_smtp_address.clone())
            .list("ManagedBy", &g.managed_by)
            .list("Members", &g.members)
            .opt_str("Notes", g.notes.clone()));

    /// `Get-DistributionGroup -Identity`; `None` when it does not exist.
    pub async fn get_distribution_group(&self, identity: &str, replication: Replication)
        -> Result<Option<DistributionGroup>, M365Error>
        = first("Get-DistributionGroup", replication.read_opts(),
            Params::new().str("Identity", identity));

    /// `Set-DistributionGroup` (repeat-safe).
    pub async fn set_distribution_group(&self, identity: &str, s: &SetDistributionGroup)
        -> Result<(), M365Error>
        = done("Set-DistributionGroup", InvokeOptions::read(), Params::new()
            .str("Identity", identity)
            .opt_str("DisplayName", s.display_name.clone())
            .list("ManagedBy", &s.managed_by)
            .opt_str("Notes", s.notes.clone())
            .switch("BypassSecurityGroupManagerCheck"));

    /// `Remove-DistributionGroup`; `Ok(false)` when it was already gone.
    pub async fn remove_distribution_group(&self, identity: &str) -> Result<bool, M365Error>
        = removed("Remove-DistributionGroup", InvokeOptions::read(), Params::new()
            .str("Identity", identity)
            .switch("BypassSecurityGroupManagerCheck"));

    /// `Add-DistributionGroupMember`; `Ok(false)` when it already was a member.
    pub async fn add_distribution_group_member(
        &self, group: &str, member: &str, replication: Replication
    ) -> Result<bool, M365Error>
        = added("Add-DistributionGroupMember", replication.write_opts(), Params::new()
            .str("Identity", group)
            .str("Member", member)
            .switch("BypassSecurityGroupManagerCheck"));

    /// `Remove-DistributionGroupMember`; `Ok(false)` when it was not a member.
    pub async fn remove_distribution_group_member(&self, group: &str, member: &str)
        -> Result<bool, M365Error>
        = removed("Remove-DistributionGroupMember", InvokeOptions::read(), Params::new()
            .str("Identity", group)
            .str("Member", member)
            .switch("BypassSecurityGroupManagerCheck"));

    /// `Get-DistributionGroupMember -ResultSize Unlimited` (all pages).
    pub async fn get_distribution_group_members(&self, group: &str, replication: Replication)
        -> Result<Vec<Recipient>, M365Error>
        = all("Get-DistributionGroupMember", replication.read_opts(), Params::new()
            .str("Identity", group)
            .str("ResultSize", "Unlimited"));

    /// `Update-DistributionGroupMember`: **replaces** the whole member list.
    pub async fn update_distribution_group_members(&self, group: &str, members: &[String])
        -> Result<(), M365Error>
        = done("Update-DistributionGroupMember", InvokeOptions::read(), self.removal(Params::new()
            .str("Identity", group)
            .switch("BypassSecurityGroupManagerCheck")
            // An empty list must be sent explicitly to empty the group.
            .array("Members", members)));
}

// ----- recipients -----

cmdlet_wrappers! {
    pub async fn get_mailbox(&self, identity: &str) -> Result<Option<Mailbox>, M365Error>
        = first("Get-Mailbox", InvokeOptions::read(), Params::new().str("Identity", identity));

    /// `Get-Mailbox -ResultSize n` (`None` = Unlimited).
    pub async fn list_mailboxes(&self, result_size: Option<u32>)
        -> Result<Vec<Mailbox>, M365Error>
        = all("Get-Mailbox", InvokeOptions::read(), Params::new().str(
            "ResultSize",
            result_size.map_or_else(|| "Unlimited".to_string(), |n| n.to_string()),
        ));

    pub async fn get_recipient(&self, identity: &str, replication: Replication)
        -> Result<Option<Recipient>, M365Error>
        = first("Get-Recipient", replication.read_opts(), Params::new().str("Identity", identity));

    pub async fn get_cas_mailbox(&self, identity: &str) -> Result<Option<CasMailbox>, M365Error>
        = first("Get-CASMailbox", InvokeOptions::read(), Params::new().str("Identity", identity));
}

impl ExchangeClient {
    /// The recipients holding any of these SMTP addresses (primary or secondary): one
    /// `Get-Recipient -Filter "EmailAddresses -eq 'smtp:…' -or …" -ResultSize Unlimited` per
    /// [`ADDRESSES_PER_FILTER`] addresses instead of one call per address
    /// (docs/microsoft-365.md §4.4). Addresses matching nothing are simply absent.
    pub async fn get_recipients_by_address(
        &self,
        addresses: &[String],
        replication: Replication,
    ) -> Result<Vec<Recipient>, M365Error> {
        let mut out: Vec<Recipient> = Vec::new();
        for chunk in addresses.chunks(ADDRESSES_PER_FILTER) {
            let p = Params::new()
                .str("Filter", email_addresses_filter(chunk))
                .str("ResultSize", "Unlimited");
            let found: Vec<Recipient> = self
                .invoke_typed("Get-Recipient", p.into_map(), &replication.read_opts())
                .await?;
            out.extend(found);
        }
        Ok(out)
    }
}

// ----- application access policies -----

cmdlet_wrappers! {
    /// `New-ApplicationAccessPolicy`. Maps the size limit to `PolicyLimitReached`. Not retried on
    /// ambiguous failures: list policies by key first.
    pub async fn new_application_access_policy(&self, n: &NewApplicationAccessPolicy)
        -> Result<Vec<ApplicationAccessPolicy>, M365Error>
        = all("New-ApplicationAccessPolicy", InvokeOptions::write(), Params::new()
            .list("AppId", &n.app_ids)
            .str("PolicyScopeGroupId", &n.policy_scope_group_id)
            .str("AccessRight", n.access_right.as_str())
            .str("Description", n.description.clone().unwrap_or_else(|| " ".into())));

    /// Every policy of the tenant. A tenant that never had one may answer
    /// ManagementObjectNotFound; that is an empty list.
    pub async fn list_application_access_policies(&self)
        -> Result<Vec<ApplicationAccessPolicy>, M365Error>
        = all_or_empty("Get-ApplicationAccessPolicy", InvokeOptions::read(), Params::new());

    /// `Set-ApplicationAccessPolicy -Description` (the only editable property).
    pub async fn set_application_access_policy_description(
        &self, identity: &str, description: &str
    ) -> Result<(), M365Error>
        = done("Set-ApplicationAccessPolicy", InvokeOptions::read(), Params::new()
            .str("Identity", identity)
            .str("Description", description));

    /// `Remove-ApplicationAccessPolicy`; `Ok(false)` when it was already gone.
    pub async fn remove_application_access_policy(&self, identity: &str)
        -> Result<bool, M365Error>
        = removed("Remove-ApplicationAccessPolicy", InvokeOptions::read(),
            Params::new().str("Identity", identity));

    /// `Test-ApplicationAccessPolicy -Identity <mailbox> -AppId <client id>` (one AppId).
    pub async fn test_application_access_policy(&self, mailbox: &str, app_id: &str)
        -> Result<AccessCheck, M365Error>
        = single("Test-ApplicationAccessPolicy", InvokeOptions::read(),
            Params::new().str("Identity", mailbox).str("AppId", app_id));
}

impl ExchangeClient {
    /// The policy with this Identity. Get with an unknown Identity returns **every** policy, so
    /// results are filtered by Identity before anything counts as found.
    pub async fn get_application_access_policy(
        &self,
        identity: &str,
    ) -> Result<Option<ApplicationAccessPolicy>, M365Error> {
        let all: Vec<ApplicationAccessPolicy> = self
            .all_or_empty(
                "Get-ApplicationAccessPolicy",
                Params::new().str("Identity", identity),
                &InvokeOptions::read(),
            )
            .await?;
        Ok(all.into_iter().find(|pol| {
            pol.identity
                .as_deref()
                .is_some_and(|i| i.eq_ignore_ascii_case(identity))
        }))
    }

    /// Policies naming this client id.
    pub async fn application_access_policies_for_app(
        &self,
        app_id: &str,
    ) -> Result<Vec<ApplicationAccessPolicy>, M365Error> {
        Ok(self
            .list_application_access_policies()
            .await?
            .into_iter()
            .filter(|p| {
                p.app_id
                    .as_deref()
                    .is_some_and(|a| a.eq_ignore_ascii_case(app_id))
            })
            .collect())
    }
}

// ----- RBAC for Applications -----

cmdlet_wrappers! {
    /// `New-ServicePrincipal -AppId -ObjectId [-DisplayName]`. `object_id` is the Enterprise app
    /// (service principal) object id, not the app registration's.
    pub async fn new_service_principal(
        &self, app_id: &str, object_id: &str, display_name: Option<&str>
    ) -> Result<ExoServicePrincipal, M365Error>
        = single("New-ServicePrincipal", InvokeOptions::write(), Params::new()
            .str("AppId", app_id)
            .str("ObjectId", object_id)
            .opt_str("DisplayName", display_name));

    pub async fn get_service_principal(&self, identity: &str, replication: Replication)
        -> Result<Option<ExoServicePrincipal>, M365Error>
        = first("Get-ServicePrincipal", replication.read_opts(),
            Params::new().str("Identity", identity));

    pub async fn list_service_principals(&self) -> Result<Vec<ExoServicePrincipal>, M365Error>
        = all("Get-ServicePrincipal", InvokeOptions::read(), Params::new());

    pub async fn remove_service_principal(&self, identity: &str) -> Result<bool, M365Error>
        = removed("Remove-ServicePrincipal", InvokeOptions::read(),
            Params::new().str("Identity", identity));

    /// `New-ManagementScope -Name -RecipientRestrictionFilter`.
    pub async fn new_management_scope(&self, name: &str, recipient_filter: &str)
        -> Result<ManagementScope, M365Error>
        = single("New-ManagementScope", InvokeOptions::write(), Params::new()
            .str("Name", name)
            .str("RecipientRestrictionFilter", recipient_filter));

    pub async fn get_management_scope(&self, identity: &str, replication: Replication)
        -> Result<Option<ManagementScope>, M365Error>
        = first("Get-ManagementScope", replication.read_opts(),
            Params::new().str("Identity", identity));

    /// Every management scope (`Get-ManagementScope` without identity).
    pub async fn list_management_scopes(&self) -> Result<Vec<ManagementScope>, M365Error>
        = all("Get-ManagementScope", InvokeOptions::read(), Params::new());

    /// `Set-ManagementScope -Identity -RecipientRestrictionFilter`: read the scope back afterwards
    /// (docs/microsoft-365.md §3.4: a malformed or empty filter can widen it to the organization).
    pub async fn set_management_scope_filter(&self, identity: &str, recipient_filter: &str)
        -> Result<(), M365Error>
        = done("Set-ManagementScope", InvokeOptions::write(), Params::new()
            .str("Identity", identity)
            .str("RecipientRestrictionFilter", recipient_filter));

    pub async fn remove_management_scope(&self, identity: &str) -> Result<bool, M365Error>
        = removed("Remove-ManagementScope", InvokeOptions::read(),
            Params::new().str("Identity", identity));

    /// `New-ManagementRoleAssignment -App -Role [-CustomResourceScope|…]`.
    pub async fn new_app_role_assignment(&self, a: &NewAppRoleAssignment)
        -> Result<ManagementRoleAssignment, M365Error>
        = single("New-ManagementRoleAssignment", InvokeOptions::write(), Params::new()
            .opt_str("Name", a.name.clone())
            .str("Role", &a.role)
            .str("App", &a.app)
            .opt_str("CustomResourceScope", a.custom_resource_scope.clone())
            .opt_str("RecipientGroupScope", a.recipient_group_scope.clone())
            .opt_str(
                "RecipientAdministrativeUnitScope",
                a.recipient_administrative_unit_scope.clone(),
            ));

    pub async fn get_management_role_assignments(&self, q: &RoleAssignmentQuery)
        -> Result<Vec<ManagementRoleAssignment>, M365Error>
        = all_or_empty("Get-ManagementRoleAssignment", InvokeOptions::read(), Params::new()
            .opt_str("Identity", q.identity.clone())
            .opt_str("Role", q.role.clone())
            .opt_str("RoleAssignee", q.role_assignee.clone()));

    pub async fn remove_management_role_assignment(&self, identity: &str)
        -> Result<bool, M365Error>
        = removed("Remove-ManagementRoleAssignment", InvokeOptions::read(),
            Params::new().str("Identity", identity));

    /// `Test-ServicePrincipalAuthorization -Identity [-Resource]`: bypasses the permission cache
    /// and ignores Entra grants.
    pub async fn test_service_principal_authorization(
        &self, identity: &str, resource: Option<&str>
    ) -> Result<Vec<AuthorizationRow>, M365Error>
        = all("Test-ServicePrincipalAuthorization", InvokeOptions::read(), Params::new()
            .str("Identity", identity)
            .opt_str("Resource", resource));
}

impl ExchangeClient {
    /// `Get-OrganizationConfig` (parameterless), raw.
    pub async fn get_organization_config(&self) -> Result<Option<Map<String, Value>>, M365Error> {
        Ok(self
            .invoke("Get-OrganizationConfig", Map::new(), &InvokeOptions::read())
            .await?
            .items
            .into_iter()
            .next())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is fine in tests (developers' guide)
mod tests {
    use super::*;

    #[test]
    fn policy_identity_parses_documented_example() {
        let id = r"596ade3a-1abe-4c5b-b7d5-a169c4b05d4a\7a774f0c-7a6f-11e0-85ad-07fb4824019b:S-1-5-21-724521725-2336880675-2689004279-1821338;8b6ce428-cca2-459a-ac50-d38bcc932258";
        let p = PolicyIdentity::parse(id).unwrap();
        assert_eq!(p.tenant_id, "596ade3a-1abe-4c5b-b7d5-a169c4b05d4a");
        assert_eq!(p.app_id, "7a774f0c-7a6f-11e0-85ad-07fb4824019b");
        assert_eq!(
            p.scope_sid,
            "S-1-5-21-724521725-2336880675-2689004279-1821338"
        );
        assert_eq!(p.scope_object_guid, "8b6ce428-cca2-459a-ac50-d38bcc932258");
        assert_eq!(PolicyIdentity::parse("no-backslash"), None);
        assert_eq!(PolicyIdentity::parse(r"t\a:sid;"), None);
    }

    #[test]
    fn policy_output_tolerates_shapes_and_yields_key() {
        let p: ApplicationAccessPolicy = serde_json::from_value(serde_json::json!({
            "Identity": r"t\APP:S-1;GUID-From-Identity",
            "AppId": "APP",
            "ScopeIdentityRaw": "S-1-5-21-1;998E9D79-817D-41C9-87D8-D9C07F27F4B2",
            "AccessRight": "RestrictAccess",
            "IsValid": "True",
            "RunspaceId": {"whatever": 1},
            "Unknown": [1, 2]
        }))
        .unwrap();
        assert_eq!(p.is_valid, Some(true));
        assert_eq!(
            p.key(),
            Some((
                "app".into(),
                "998e9d79-817d-41c9-87d8-d9c07f27f4b2".into(),
                "RestrictAccess".into()
            ))
        );
        let no_raw = ApplicationAccessPolicy {
            scope_identity_raw: None,
            ..p
        };
        assert_eq!(
            no_raw.scope_group_guid().as_deref(),
            Some("GUID-From-Identity")
        );
    }

    #[test]
    fn multi_valued_and_loose_fields() {
        let g: DistributionGroup = serde_json::from_value(
            serde_json::json!({"Name":"g","ManagedBy":"one","RunspaceId":"x"}),
        )
        .unwrap();
        assert_eq!(g.managed_by, vec!["one"]);
        let g: DistributionGroup =
            serde_json::from_value(serde_json::json!({"ManagedBy":null})).unwrap();
        assert!(g.managed_by.is_empty());
        let r: AuthorizationRow = serde_json::from_value(serde_json::json!({
            "RoleName":"Application Mail.Read","GrantedPermissions":["Mail.Read"],"InScope":"Not Run"})).unwrap();
        assert_eq!(r.in_scope(), None);
        let r: AuthorizationRow =
            serde_json::from_value(serde_json::json!({"InScope":true})).unwrap();
        assert_eq!(r.in_scope(), Some(true));
        let c: CasMailbox = serde_json::from_value(serde_json::json!({"EwsEnabled":null})).unwrap();
        assert_eq!(c.ews_enabled, None);
        let a: AccessCheck =
            serde_json::from_value(serde_json::json!({"AccessCheckResult":"Denied"})).unwrap();
        assert_eq!(a.granted(), Some(false));
    }

    #[test]
    fn management_scope_filter_is_read_from_recipient_filter() {
        let s: ManagementScope = serde_json::from_value(serde_json::json!({
            "Name": "s", "RecipientFilter": "MemberOfGroup -eq 'CN=x'"}))
        .unwrap();
        assert_eq!(s.filter(), Some("MemberOfGroup -eq 'CN=x'"));
        let s: ManagementScope =
            serde_json::from_value(serde_json::json!({"RecipientFilter": ""})).unwrap();
        assert_eq!(s.filter(), None);
    }

    #[test]
    fn params_map_values_as_invokecommand_expects() {
        let m = Params::new()
            .str("Name", "g")
            .list("Members", &["a".into(), "b".into()])
            .list("Empty", &[])
            .array("Cleared", &[])
            .switch("BypassSecurityGroupManagerCheck")
            .opt_str("Notes", None::<String>)
            .into_map();
        assert_eq!(
            Value::Object(m),
            serde_json::json!({"Name":"g","Members":["a","b"],"Cleared":[],"BypassSecurityGroupManagerCheck":true})
        );
    }
}
