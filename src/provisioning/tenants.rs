//! Tenants as the other use cases need them: the stored record and a connector handle acting
//! with the tenant's management credential (decrypted here, never returned anywhere).
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Error, Services};
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
