//! `/v1/tenants`: the Microsoft 365 tenants mailscope manages and their management credential.
//!
//! Credentials are sealed with the service's encryption key before they reach the database and
//! are never returned; responses show only which kind of credential is stored, for which client.
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::problem::{ApiError, FieldError, Problem};
use super::{AppState, page_limit};
use crate::auth::{Caller, Role, tenant_not_found};
use crate::config::Secret;
use crate::domain::address::is_address;
use crate::domain::cloud::{Cloud, CloudEndpoints, EndpointOverrides};
use crate::provisioning::{self, Change, tenants::Registration, tenants::SealedCredential};
use crate::store::{self, tenants::TenantRecord};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/tenants").route(web::get().to(list_tenants)))
        .service(
            web::resource("/tenants/{tenant_id}")
                .route(web::put().to(put_tenant))
                .route(web::get().to(get_tenant))
                .route(web::delete().to(delete_tenant)),
        )
        .route(
            "/tenants/{tenant_id}/connection-test",
            web::post().to(connection_test),
        );
}

/// The management credential: a client secret, or a certificate with its private key.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CredentialsInput {
    /// Application (client) id of mailscope's management app in this tenant.
    #[schema(value_type = String, format = Uuid, example = "6f1d7c55-2b1e-4d2a-9c65-8f3a1c2b4d5e")]
    pub client_id: String,
    /// A client secret value. Exclusive with the certificate fields.
    #[schema(value_type = Option<String>, format = Password, example = "s3cr3t~value")]
    pub client_secret: Option<Secret>,
    /// PEM of the certificate registered on the app.
    pub certificate_pem: Option<String>,
    /// PEM of the certificate's RSA private key.
    #[schema(value_type = Option<String>, format = Password)]
    pub private_key_pem: Option<Secret>,
}

/// Registration of a tenant (`PUT` replaces it wholly).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "display_name": "Contoso (sandbox)",
    "cloud": "custom",
    "default_domain": "contoso.onmicrosoft.com",
    "endpoints": {"login": "http://127.0.0.1:8090", "graph": "http://127.0.0.1:8090", "exchange": "http://127.0.0.1:8090"},
    "credentials": {"client_id": "6f1d7c55-2b1e-4d2a-9c65-8f3a1c2b4d5e", "client_secret": "s3cr3t~value"},
    "canary_mailboxes": ["ceo@contoso.onmicrosoft.com"]
}))]
pub struct TenantInput {
    pub display_name: String,
    pub cloud: Cloud,
    /// The tenant's default domain, e.g. `contoso.onmicrosoft.com`.
    pub default_domain: String,
    /// Base URLs; required for `custom`, optional overrides otherwise.
    #[serde(default)]
    pub endpoints: EndpointOverrides,
    pub credentials: CredentialsInput,
    /// Mailboxes that must stay out of every app's reach; propagation checks probe them.
    #[serde(default)]
    pub canary_mailboxes: Vec<String>,
}

/// What is stored about the credential (never the secret itself).
#[derive(Serialize, ToSchema)]
pub struct CredentialSummary {
    pub client_id: Uuid,
    /// `client_secret` or `certificate`.
    #[schema(value_type = crate::m365::connection_test::CredentialKind, example = "client_secret")]
    pub kind: String,
}

#[derive(Serialize, ToSchema)]
pub struct Tenant {
    pub tenant_id: Uuid,
    pub display_name: String,
    pub cloud: Cloud,
    pub default_domain: String,
    pub endpoints: EndpointOverrides,
    pub credentials: CredentialSummary,
    pub canary_mailboxes: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct TenantList {
    pub items: Vec<Tenant>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next_after: Option<Uuid>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Page size, 1–500 (default 50).
    pub limit: Option<i64>,
    /// Cursor: the `next_after` of the previous page.
    pub after: Option<Uuid>,
}

fn view(r: TenantRecord) -> Tenant {
    Tenant {
        tenant_id: r.tenant_id,
        display_name: r.display_name,
        cloud: Cloud::parse(&r.cloud).unwrap_or(Cloud::Custom),
        default_domain: r.default_domain,
        endpoints: serde_json::from_value(r.endpoints).unwrap_or_default(),
        credentials: CredentialSummary {
            client_id: r.client_id,
            kind: r.credential_kind,
        },
        canary_mailboxes: r.canary_mailboxes,
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

fn is_domain(s: &str) -> bool {
    s.len() <= 253
        && s.contains('.')
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn pem_body(pem: &str, label: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = pem[start..].find(&end)? + start;
    let b64: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .filter(|d| !d.is_empty())
}

/// Check the input's shape and turn it into the registration the use case stores.
fn validate(input: TenantInput) -> Result<Registration, ApiError> {
    let mut errs = Vec::new();
    let mut err = |field: &str, message: &str| {
        errs.push(FieldError {
            field: field.into(),
            message: message.into(),
        })
    };
    let name = input.display_name.trim();
    if name.is_empty() || name.len() > 256 {
        err("display_name", "must be 1 to 256 characters");
    }
    if !is_domain(&input.default_domain) {
        err(
            "default_domain",
            "must be a domain name such as contoso.onmicrosoft.com",
        );
    }
    let mut endpoints = EndpointOverrides::default();
    match CloudEndpoints::resolve(input.cloud, &input.endpoints) {
        Ok(_) => {
            // Store normalised values (no trailing slash) for what was given.
            let norm = |v: &Option<String>| v.as_ref().map(|s| s.trim_end_matches('/').to_string());
            endpoints.login = norm(&input.endpoints.login);
            endpoints.graph = norm(&input.endpoints.graph);
            endpoints.exchange = norm(&input.endpoints.exchange);
        }
        Err(e) => err("endpoints", &e.to_string()),
    }
    let c = &input.credentials;
    let client_id = c.client_id.parse::<Uuid>();
    if client_id.is_err() {
        err(
            "credentials.client_id",
            "must be the app's client id (a GUID)",
        );
    }
    let sealed = match (&c.client_secret, &c.certificate_pem, &c.private_key_pem) {
        (Some(secret), None, None) => {
            if secret.expose().trim().is_empty() || secret.expose().len() > 1024 {
                err("credentials.client_secret", "must be 1 to 1024 characters");
            }
            Some(SealedCredential::ClientSecret {
                client_secret: secret.expose().to_string(),
            })
        }
        (None, Some(cert), Some(key)) => {
            if pem_body(cert, "CERTIFICATE").is_none() {
                err(
                    "credentials.certificate_pem",
                    "must be a PEM `CERTIFICATE` block",
                );
            }
            if jsonwebtoken::EncodingKey::from_rsa_pem(key.expose().as_bytes()).is_err() {
                err(
                    "credentials.private_key_pem",
                    "must be a PEM RSA private key (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`)",
                );
            }
            Some(SealedCredential::Certificate {
                certificate_pem: cert.clone(),
                private_key_pem: key.expose().to_string(),
            })
        }
        _ => {
            err(
                "credentials",
                "give either `client_secret`, or both `certificate_pem` and `private_key_pem`",
            );
            None
        }
    };
    let mut canaries: Vec<String> = Vec::new();
    if input.canary_mailboxes.len() > 50 {
        err("canary_mailboxes", "at most 50 canary mailboxes");
    }
    for (i, m) in input.canary_mailboxes.iter().enumerate() {
        let m = m.trim().to_ascii_lowercase();
        if !is_address(&m) {
            err(
                &format!("canary_mailboxes[{i}]"),
                "must be an email address",
            );
        } else if !canaries.contains(&m) {
            canaries.push(m);
        }
    }
    match (errs.is_empty(), client_id, sealed) {
        (true, Ok(client_id), Some(credential)) => Ok(Registration {
            display_name: input.display_name,
            cloud: input.cloud,
            default_domain: input.default_domain,
            endpoints,
            client_id,
            credential,
            canary_mailboxes: canaries,
        }),
        _ => Err(ApiError::validation(errs)),
    }
}

/// Register a tenant or replace its registration.
///
/// Idempotent: sending the same body again changes nothing and writes no audit event.
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}", tag = "tenants",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id")),
    request_body = TenantInput,
    responses(
        (status = 201, description = "registered", body = Tenant),
        (status = 200, description = "updated, or unchanged", body = Tenant),
        (status = 400, description = "malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Admin", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid content", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "database unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn put_tenant(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
    body: web::Json<TenantInput>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let tenant_id = path.into_inner();
    let registration = validate(body.into_inner())?;
    let actor = super::actor(&caller, &req);
    let ensured = provisioning::tenants::register(&state, &actor, tenant_id, registration).await?;
    let view = view(ensured.value);
    Ok(if ensured.change == Change::Created {
        HttpResponse::Created().json(view)
    } else {
        HttpResponse::Ok().json(view)
    })
}

/// One tenant's registration (without secrets).
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}", tag = "tenants",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id")),
    responses(
        (status = 200, description = "the tenant", body = Tenant),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown, or not visible to the caller", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get_tenant(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let tenant_id = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let db = state.db().await?;
    let t = store::tenants::get(&db, tenant_id)
        .await?
        .ok_or_else(|| tenant_not_found(tenant_id))?;
    Ok(HttpResponse::Ok().json(view(t)))
}

/// Tenants visible to the caller, ordered by id.
#[utoipa::path(get, path = "/v1/tenants", tag = "tenants", params(ListQuery),
    responses(
        (status = 200, description = "a page of tenants", body = TenantList),
        (status = 400, description = "invalid query", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list_tenants(
    caller: Caller,
    state: web::Data<AppState>,
    q: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let limit = page_limit(q.limit)?;
    let visible = caller.visible_tenants();
    let db = state.db().await?;
    let rows = store::tenants::list(&db, visible.as_deref(), q.after, limit + 1).await?;
    let (rows, more) = super::split_page(rows, limit);
    let items: Vec<Tenant> = rows.into_iter().map(view).collect();
    let next_after = super::next_cursor(&items, more, |t| t.tenant_id);
    Ok(HttpResponse::Ok().json(TenantList { items, next_after }))
}

/// Forget a tenant and its stored credential. Its audit trail is kept.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}", tag = "tenants",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete_tenant(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let actor = super::actor(&caller, &req);
    provisioning::tenants::delete(&state, &actor, path.into_inner()).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// The tenant's record and a connector handle, after checking that the caller may see it.
pub async fn tenant_handle(
    state: &AppState,
    caller: &Caller,
    tenant_id: Uuid,
) -> Result<(TenantRecord, crate::m365::TenantHandle), ApiError> {
    caller.require_tenant(tenant_id)?;
    Ok(provisioning::tenants::load(state, tenant_id).await?)
}

/// Check that mailscope can act in the tenant: both tokens, one harmless Graph call and one
/// harmless Exchange call. Always 200: the report says per step what worked and, if not, the
/// cause and the fix.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/connection-test", tag = "tenants",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id")),
    responses(
        (status = 200, description = "the report (see `ok` and each step)", body = crate::m365::ConnectionTestReport),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn connection_test(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let (_, handle) = tenant_handle(&state, &caller, path.into_inner()).await?;
    Ok(HttpResponse::Ok().json(handle.connection_test().await))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_domains() {
        assert!(is_address("a@b.com"));
        assert!(!is_address("a@b"));
        assert!(!is_address("a b@c.com"));
        assert!(is_domain("contoso.onmicrosoft.com"));
        assert!(!is_domain("-x.com"));
        assert!(!is_domain("nodot"));
    }
}
