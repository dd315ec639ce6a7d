//! App role ids resolved by permission name from the resource service principal's `appRoles`
//! (docs/microsoft-365.md §5.5), cached per tenant, with the reference's well-known ids as the fallback.
//!
//! Runtime resolution comes first because public id lists contain mislabelled ids; only roles
//! whose `allowedMemberTypes` contains `Application` count (delegated scopes share names).
use super::types::ServicePrincipal;
use super::{EXCHANGE_APP_ID, GRAPH_APP_ID, GraphClient, odata_str, pct};
use crate::m365::error::{ErrorKind, M365Error, Service};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// (resource app id, permission, app role id), from docs/microsoft-365.md §5.5.
const WELL_KNOWN: &[(&str, &str, &str)] = &[
    (
        GRAPH_APP_ID,
        "Mail.Read",
        "810c84a8-4a9e-49e6-bf7d-12d183f40d01",
    ),
    (
        GRAPH_APP_ID,
        "Mail.ReadBasic",
        "6be147d2-ea4f-4b5a-a3fa-3eab6f3c140a",
    ),
    (
        GRAPH_APP_ID,
        "Mail.ReadBasic.All",
        "693c5e45-0940-467d-9b8a-1022fb9d42ef",
    ),
    (
        GRAPH_APP_ID,
        "Mail.ReadWrite",
        "e2a3a72e-5f79-4c64-b1b1-878b674786c9",
    ),
    (
        GRAPH_APP_ID,
        "Mail.Send",
        "b633e1c5-b582-4048-a93e-9f11b44c7e96",
    ),
    (
        GRAPH_APP_ID,
        "MailboxSettings.Read",
        "40f97065-369a-49f4-947c-6a255697ae91",
    ),
    (
        GRAPH_APP_ID,
        "MailboxSettings.ReadWrite",
        "6931bccd-447a-43d1-b442-00a195474933",
    ),
    (
        GRAPH_APP_ID,
        "Calendars.Read",
        "798ee544-9d2d-430c-a058-570e29e34338",
    ),
    (
        GRAPH_APP_ID,
        "Calendars.ReadWrite",
        "ef54d2bf-783f-4e0f-bca1-3210c0444d99",
    ),
    (
        GRAPH_APP_ID,
        "Contacts.Read",
        "089fe4d0-434a-44c5-8827-41ba8a0b17f5",
    ),
    (
        GRAPH_APP_ID,
        "Contacts.ReadWrite",
        "6918b873-d17a-4dc1-b314-35f528134491",
    ),
    (
        EXCHANGE_APP_ID,
        "full_access_as_app",
        "dc890d15-9560-4a4c-9b7f-a736ec74ec40",
    ),
    (
        EXCHANGE_APP_ID,
        "Exchange.ManageAsApp",
        "dc50a0fb-09a3-484d-be87-e023b12c6440",
    ),
];

/// The documented id of a well-known application permission, if the reference lists it.
pub fn well_known_app_role(resource_app_id: &str, value: &str) -> Option<&'static str> {
    WELL_KNOWN
        .iter()
        .find(|(r, v, _)| r.eq_ignore_ascii_case(resource_app_id) && *v == value)
        .map(|(_, _, id)| *id)
}

/// Where a resolved id came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AppRoleSource {
    /// Read from the tenant's resource service principal.
    Tenant,
    /// The documented id, used because the tenant lookup failed or did not list the role.
    WellKnown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedAppRole {
    pub id: String,
    pub source: AppRoleSource,
}

struct Entry {
    fetched: Instant,
    sp: ServicePrincipal,
}

/// Cache of resource service principals per (tenant, resource app id).
pub(crate) struct AppRoleCache {
    ttl: Duration,
    map: Mutex<HashMap<(String, String), Entry>>,
}

impl AppRoleCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        AppRoleCache {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn invalidate_tenant(&self, tenant: &str) {
        let t = tenant.to_ascii_lowercase();
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(k, _), _| *k != t);
    }

    fn cached(&self, key: &(String, String)) -> Option<ServicePrincipal> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.get(key)
            .filter(|e| e.fetched.elapsed() < self.ttl)
            .map(|e| e.sp.clone())
    }

    pub(crate) async fn resource_sp(
        &self,
        graph: &GraphClient,
        resource_app_id: &str,
    ) -> Result<ServicePrincipal, M365Error> {
        let key = (
            graph.tenant_id().to_ascii_lowercase(),
            resource_app_id.to_ascii_lowercase(),
        );
        if let Some(sp) = self.cached(&key) {
            return Ok(sp);
        }
        let path = format!(
            "/servicePrincipals(appId='{}')?$select=id,appId,displayName,appRoles",
            pct(&odata_str(resource_app_id))
        );
        let op = "service_principals.get_resource";
        let sp = graph
            .get_optional::<ServicePrincipal>(op, &path)
            .await?
            .ok_or_else(|| {
                M365Error::new(ErrorKind::NotFound, Service::Graph, op).with_message(format!(
                    "no service principal for resource app {resource_app_id} in the tenant"
                ))
            })?;
        self.map.lock().unwrap_or_else(|p| p.into_inner()).insert(
            key,
            Entry {
                fetched: Instant::now(),
                sp: sp.clone(),
            },
        );
        Ok(sp)
    }

    pub(crate) async fn resolve(
        &self,
        graph: &GraphClient,
        resource_app_id: &str,
        value: &str,
    ) -> Result<ResolvedAppRole, M365Error> {
        let fallback = || {
            well_known_app_role(resource_app_id, value).map(|id| ResolvedAppRole {
                id: id.to_string(),
                source: AppRoleSource::WellKnown,
            })
        };
        let sp = match self.resource_sp(graph, resource_app_id).await {
            Ok(sp) => sp,
            // A passing failure is not a reason to guess: let the caller retry.
            Err(e) if e.is_retryable() => return Err(e),
            Err(e) => {
                tracing::warn!(resource_app_id, value, error = %e, "app role lookup failed; using the documented id");
                return fallback().ok_or(e);
            }
        };
        let found = sp.app_roles.iter().find(|r| {
            r.value.as_deref() == Some(value)
                && r.allowed_member_types.iter().any(|t| t == "Application")
                && r.is_enabled != Some(false)
        });
        match found {
            Some(r) => Ok(ResolvedAppRole {
                id: r.id.clone(),
                source: AppRoleSource::Tenant,
            }),
            None => fallback()
                .inspect(|_| {
                    tracing::warn!(
                        resource_app_id,
                        value,
                        "app role not listed by the tenant; using the documented id"
                    )
                })
                .ok_or_else(|| {
                    M365Error::new(
                        ErrorKind::InvalidParameter,
                        Service::Graph,
                        "app_roles.resolve",
                    )
                    .with_message(format!(
                        "resource {resource_app_id} has no application permission named {value}"
                    ))
                }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is fine in tests (developers' guide)
mod tests {
    use super::*;

    #[test]
    fn well_known_table_matches_reference() {
        assert_eq!(
            well_known_app_role(GRAPH_APP_ID, "Mail.Read"),
            Some("810c84a8-4a9e-49e6-bf7d-12d183f40d01")
        );
        assert_eq!(
            well_known_app_role(EXCHANGE_APP_ID, "Exchange.ManageAsApp"),
            Some("dc50a0fb-09a3-484d-be87-e023b12c6440")
        );
        // ManageAsAppV2's id is unverified: never guessed.
        assert_eq!(
            well_known_app_role(EXCHANGE_APP_ID, "Exchange.ManageAsAppV2"),
            None
        );
        assert_eq!(well_known_app_role(GRAPH_APP_ID, "mail.read"), None);
    }
}
