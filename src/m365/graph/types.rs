//! Microsoft Graph resource shapes mailscope reads and writes (docs/microsoft-365.md §5).
//!
//! Only the properties mailscope uses; unknown properties are ignored and missing ones default.
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ResourceAccess {
    /// App role id (`type: Role`) or scope id (`type: Scope`).
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RequiredResourceAccess {
    pub resource_app_id: String,
    pub resource_access: Vec<ResourceAccess>,
}

/// Metadata of a secret; Graph returns the secret itself only from addPassword.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PasswordCredentialInfo {
    pub key_id: Option<String>,
    pub display_name: Option<String>,
    pub hint: Option<String>,
    pub start_date_time: Option<String>,
    pub end_date_time: Option<String>,
}

/// An app registration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Application {
    /// Object id.
    pub id: String,
    /// Client id.
    pub app_id: String,
    pub display_name: Option<String>,
    pub sign_in_audience: Option<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub required_resource_access: Vec<RequiredResourceAccess>,
    #[serde(deserialize_with = "null_as_default")]
    pub password_credentials: Vec<PasswordCredentialInfo>,
    /// Free-form labels; mailscope marks the registrations it creates with one (`mailscope:<key>`).
    #[serde(deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
}

/// Body of `POST /applications`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewApplication {
    pub display_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sign_in_audience: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub required_resource_access: Vec<RequiredResourceAccess>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// A secret just created by addPassword. `secret_text` is returned once and never shown by `Debug`.
#[derive(Debug, Clone)]
pub struct NewPassword {
    pub key_id: String,
    pub secret_text: SecretString,
    pub hint: Option<String>,
    pub display_name: Option<String>,
    pub start_date_time: Option<String>,
    pub end_date_time: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AppRole {
    pub id: String,
    /// The permission name, e.g. `Mail.Read`.
    pub value: Option<String>,
    pub display_name: Option<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub allowed_member_types: Vec<String>,
    pub is_enabled: Option<bool>,
}

/// An enterprise app (service principal).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServicePrincipal {
    /// Object id: what Exchange `New-ServicePrincipal -ObjectId` and `appRoleAssignedTo` take.
    pub id: String,
    pub app_id: String,
    pub display_name: Option<String>,
    pub account_enabled: Option<bool>,
    pub service_principal_type: Option<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub app_roles: Vec<AppRole>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AppRoleAssignment {
    pub id: String,
    pub app_role_id: String,
    pub principal_id: String,
    pub principal_type: Option<String>,
    pub principal_display_name: Option<String>,
    pub resource_id: String,
    pub resource_display_name: Option<String>,
    pub created_date_time: Option<String>,
}

/// An Entra administrative unit (`GET /directory/administrativeUnits/{id}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AdministrativeUnit {
    pub id: String,
    pub display_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct User {
    pub id: String,
    pub user_principal_name: Option<String>,
    pub display_name: Option<String>,
    pub mail: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DirectoryRoleAssignment {
    pub id: String,
    pub principal_id: String,
    pub role_definition_id: String,
    pub directory_scope_id: Option<String>,
}

/// Treat JSON `null` like a missing property.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
