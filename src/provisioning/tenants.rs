//! Tenants: registering one (its management credential sealed before it reaches the database),
//! forgetting one, and, as the other use cases need them, the stored record and a connector
//! handle acting with the tenant's management credential (decrypted here, never returned).
use chrono::Utc;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Actor, Change, Ensured, Error, Services, audit};
use crate::domain::cloud::{Cloud, CloudEndpoints, EndpointOverrides};
use crate::domain::credential::ManagementCredential;
use crate::m365::TenantHandle;
use crate::store::{self, tenants::TenantRecord};

/// The sealed form of a credential: serialised as JSON, then encrypted.
#[derive(Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SealedCredential {
    ClientSecret {
        client_secret: String,
    },
    Certificate {
        certificate_pem: String,
        private_key_pem: String,
    },
}

impl SealedCredential {
    /// The `credential_kind` stored next to the sealed credential.
    pub fn kind(&self) -> &'static str {
        match self {
            SealedCredential::ClientSecret { .. } => "client_secret",
            SealedCredential::Certificate { .. } => "certificate",
        }
    }
}

/// A tenant's registration, validated; the credential is still in clear and sealed by
/// [`register`].
pub struct Registration {
    pub display_name: String,
    pub cloud: Cloud,
    pub default_domain: String,
    /// Normalised (no trailing slash), only what was given.
    pub endpoints: EndpointOverrides,
    pub client_id: Uuid,
    pub credential: SealedCredential,
    /// Lower case, deduplicated.
    pub canary_mailboxes: Vec<String>,
}

/// Register a tenant or replace its registration. Idempotent: the same registration again
/// changes nothing and writes no audit event.
pub async fn register(
    services: &Services,
    actor: &Actor,
    tenant_id: Uuid,
    reg: Registration,
) -> Result<Ensured<TenantRecord>, Error> {
    let plaintext = serde_json::to_vec(&reg.credential).map_err(Error::internal)?;
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    // Serialise concurrent PUTs of one tenant, including the very first (no row to lock yet), so
    // each later one compares against the stored state instead of blindly overwriting it.
    store::lock_key(&tx, "tenant", &tenant_id.to_string()).await?;
    let existing = store::tenants::get(&tx, tenant_id).await?;

    let record = TenantRecord {
        tenant_id,
        display_name: reg.display_name.trim().to_string(),
        cloud: reg.cloud.as_str().to_string(),
        default_domain: reg.default_domain.to_ascii_lowercase(),
        endpoints: serde_json::to_value(&reg.endpoints).map_err(Error::internal)?,
        client_id: reg.client_id,
        credential_kind: reg.credential.kind().into(),
        credential_ciphertext: Vec::new(),
        credential_key_id: services.cipher.key_id().to_string(),
        canary_mailboxes: reg.canary_mailboxes,
        created_at: Utc::now(),
        updated_at: Utc::now(),
    };
    let mut changed: Vec<&str> = Vec::new();
    if let Some(old) = &existing {
        let same_secret = services
            .cipher
            .open(tenant_id.as_bytes(), &old.credential_ciphertext)
            .ok()
            .and_then(|p| serde_json::from_slice::<SealedCredential>(&p).ok())
            .is_some_and(|s| s == reg.credential);
        changed = changed_fields(old, &record, same_secret);
        if changed.is_empty() {
            tx.commit().await?;
            return Ok(Ensured {
                value: old.clone(),
                change: Change::Unchanged,
            });
        }
    }
    let record = TenantRecord {
        credential_ciphertext: services
            .cipher
            .seal(tenant_id.as_bytes(), &plaintext)
            .map_err(Error::internal)?,
        ..record
    };
    let (stored, created) = store::tenants::upsert(&tx, &record).await?;
    let action = if created {
        "tenant.registered"
    } else {
        "tenant.updated"
    };
    let details =
        serde_json::json!({ "changed": changed, "credential_kind": stored.credential_kind });
    audit::record(
        &tx,
        actor,
        tenant_id,
        action,
        &format!("tenant/{tenant_id}"),
        details,
    )
    .await?;
    tx.commit().await?;
    if existing.is_some()
        && changed
            .iter()
            .any(|f| ["cloud", "endpoints", "credentials"].contains(f))
    {
        // Cached tokens were issued to the old credential or authority.
        services.m365.forget_tenant(&tenant_id.to_string());
    }
    Ok(Ensured {
        value: stored,
        change: if created {
            Change::Created
        } else {
            Change::Updated
        },
    })
}

/// The fields of a registration that differ from the stored one.
fn changed_fields(old: &TenantRecord, new: &TenantRecord, same_secret: bool) -> Vec<&'static str> {
    let checks = [
        ("display_name", old.display_name == new.display_name),
        ("cloud", old.cloud == new.cloud),
        ("default_domain", old.default_domain == new.default_domain),
        ("endpoints", old.endpoints == new.endpoints),
        ("credentials", old.client_id == new.client_id && same_secret),
        (
            "canary_mailboxes",
            old.canary_mailboxes == new.canary_mailboxes,
        ),
    ];
    checks
        .iter()
        .filter(|(_, same)| !same)
        .map(|(f, _)| *f)
        .collect()
}

/// Forget a tenant and its stored credential; its audit trail is kept.
pub async fn delete(services: &Services, actor: &Actor, tenant_id: Uuid) -> Result<(), Error> {
    // Take back the probe secrets running checks added to the tenant's apps first: once the
    // tenant is forgotten, mailscope has no credential left to remove them with. If Microsoft
    // cannot be reached, the deletion is refused with that cause and can be retried.
    let (_, handle) = load(services, tenant_id).await?;
    let probes = super::checks::remove_tenant_probe_secrets(services, &handle, tenant_id).await?;
    let mut db = services.db().await?;
    let tx = db.transaction().await?;
    if !store::tenants::delete(&tx, tenant_id).await? {
        return Err(tenant_not_found(tenant_id));
    }
    audit::record(
        &tx,
        actor,
        tenant_id,
        "tenant.deleted",
        &format!("tenant/{tenant_id}"),
        serde_json::json!({"probe_secrets_checked": probes}),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The tenant is not registered (the same answer as "not visible", so existence does not leak).
pub fn tenant_not_found(tenant: Uuid) -> Error {
    Error::not_found(format!("tenant {tenant} is not registered with mailscope"))
}

/// The stored record of a registered tenant and a connector handle for it.
pub async fn load(
    services: &Services,
    tenant_id: Uuid,
) -> Result<(TenantRecord, TenantHandle), Error> {
    let db = services.db().await?;
    let record = store::tenants::get(&db, tenant_id)
        .await?
        .ok_or_else(|| tenant_not_found(tenant_id))?;
    drop(db);
    let handle = handle_for(services, &record)?;
    Ok((record, handle))
}

/// The stored endpoints of a tenant, resolved.
pub fn endpoints_of(record: &TenantRecord) -> Result<CloudEndpoints, Error> {
    let cloud = Cloud::parse(&record.cloud).unwrap_or(Cloud::Custom);
    let overrides: EndpointOverrides =
        serde_json::from_value(record.endpoints.clone()).unwrap_or_default();
    CloudEndpoints::resolve(cloud, &overrides)
        .map_err(|e| Error::internal(anyhow::anyhow!("stored endpoints invalid: {e}")))
}

/// A connector handle acting with the tenant's management credential (no caller involved:
/// background jobs use it too).
pub fn handle_for(services: &Services, record: &TenantRecord) -> Result<TenantHandle, Error> {
    let endpoints = endpoints_of(record)?;
    let credential = open_credential(services, record)?;
    Ok(services.m365.tenant(crate::m365::TenantContext {
        tenant_id: record.tenant_id.to_string(),
        endpoints,
        credential,
    }))
}

/// Decrypt the tenant's management credential.
pub fn open_credential(
    services: &Services,
    r: &TenantRecord,
) -> Result<ManagementCredential, Error> {
    let plain = services
        .cipher
        .open(r.tenant_id.as_bytes(), &r.credential_ciphertext)
        .map_err(Error::internal)?;
    let sealed: SealedCredential = serde_json::from_slice(&plain).map_err(Error::internal)?;
    let client_id = r.client_id.to_string();
    Ok(match sealed {
        SealedCredential::ClientSecret { client_secret } => ManagementCredential::ClientSecret {
            client_id,
            client_secret: client_secret.into(),
        },
        SealedCredential::Certificate {
            certificate_pem,
            private_key_pem,
        } => ManagementCredential::Certificate {
            client_id,
            certificate_pem,
            private_key_pem: private_key_pem.into(),
        },
    })
}
