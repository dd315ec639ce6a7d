//! Scope groups: the mail-enabled security groups whose members an app may reach, and the
//! recipient rules shared by scope groups, access policies and sync.
use std::collections::BTreeSet;

use uuid::Uuid;

use super::Error;
use crate::m365::exchange::{DistributionGroup, ExchangeClient, Recipient, Replication};
use crate::m365::{ErrorKind, M365Error};
use crate::store;

/// Advisory-lock namespace shared by every writer of one tenant's access policies; scope-group
/// deletion and `/sync` take it too, always before any scope-group lock (one lock order).
pub const POLICY_LOCK: &str = "access_policies";

/// Serialise writers of one scope group (natural key: tenant and alias).
pub async fn lock_group(
    c: &impl deadpool_postgres::GenericClient,
    tenant_id: Uuid,
    alias: &str,
) -> Result<(), Error> {
    store::lock_key(c, "scope_group", &format!("{tenant_id}:{alias}")).await?;
    Ok(())
}

/// The id mailscope keys scopes by: the Entra object id, else Exchange's Guid; lower case.
pub fn recipient_object_id(r: &Recipient) -> Option<String> {
    r.external_directory_object_id
        .as_deref()
        .or(r.guid.as_deref())
        .filter(|s| !s.is_empty())
        .map(str::to_ascii_lowercase)
}

pub fn group_object_id(g: &DistributionGroup) -> Option<String> {
    g.external_directory_object_id
        .as_deref()
        .or(g.guid.as_deref())
        .filter(|s| !s.is_empty())
        .map(str::to_ascii_lowercase)
}

/// Every id a policy's `ScopeIdentityRaw` may name for this object (which one Exchange uses is
/// unverified, reference §2.2).
pub fn ids_of(ext: Option<&str>, guid: Option<&str>) -> Vec<String> {
    [ext, guid]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

pub fn primary_address(r: &Recipient) -> Option<String> {
    r.primary_smtp_address
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(str::to_ascii_lowercase)
}

/// Why a recipient cannot be an application access policy scope (reference §2.4), if it cannot.
pub fn scope_refusal(r: &Recipient) -> Option<String> {
    let t = r.recipient_type_details.as_deref().unwrap_or("unknown");
    // Eligibility is the domain's rule (the sandbox uses it too); only the wording is here.
    if crate::domain::access::policy_scope_allowed(t) {
        return (r.is_valid_security_principal == Some(false)).then(|| format!(
            "this {t} is not a valid security principal (IsValidSecurityPrincipal is false), so Exchange cannot use it as a policy scope"
        ));
    }
    let reason = match t {
        "SharedMailbox" | "RoomMailbox" | "EquipmentMailbox" => format!(
            "a {t} cannot be a policy scope on its own; put it in a scope group (PUT /scope-groups/{{alias}}) and use the group as the scope"
        ),
        "GroupMailbox" => "a Microsoft 365 group cannot be a policy scope; use a mail-enabled security group (a scope group)".into(),
        "MailUniversalDistributionGroup" | "DynamicDistributionGroup" => format!(
            "a distribution group ({t}) cannot be a policy scope; only mail-enabled security groups can (create one with PUT /scope-groups/{{alias}})"
        ),
        other => format!(
            "a recipient of type {other} cannot be a policy scope; only a user mailbox, a mail user or a mail-enabled security group can"
        ),
    };
    Some(reason)
}

pub async fn current_members(
    exo: &ExchangeClient,
    object_id: &str,
) -> Result<BTreeSet<String>, Error> {
    Ok(exo
        .get_distribution_group_members(object_id, Replication::Ignore)
        .await?
        .iter()
        .filter_map(primary_address)
        .collect())
}

/// Current members (primary SMTP addresses, lower case, sorted) as a list.
pub async fn current_members_of(
    exo: &ExchangeClient,
    object_id: &str,
) -> Result<Vec<String>, Error> {
    Ok(current_members(exo, object_id).await?.into_iter().collect())
}

/// Is this Microsoft failure possibly "the object already exists" (a create racing a crashed
/// earlier attempt)? Exchange reports a taken name as a generic task error.
pub fn maybe_exists(e: &M365Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::AlreadyExists | ErrorKind::InvalidParameter
    )
}
