//! App-only access tokens from the Entra ID token endpoint (client credentials grant).
//!
//! * Credentials: a client secret, or a certificate whose key signs a client assertion JWT
//!   (`x5t` = SHA-1 and `x5t#S256` = SHA-256 thumbprints of the DER certificate; PS256 or RS256).
//! * Cache: one token per (tenant, client id, scope), refreshed `token_refresh_skew_secs` before it
//!   expires. Callers of one key queue on one async mutex, so N concurrent callers cause exactly
//!   one token request (single flight). A failed early refresh falls back to the still-valid token.
//! * Errors: `AADSTS` codes from `error_codes` mapped to kinds an admin can act on.
use super::TenantContext;
use super::error::{ErrorKind, M365Error, Service};
use super::settings::{AssertionAlgorithm, M365Settings};
use super::transport::{Call, Core, RawResponse};
use crate::domain::credential::ManagementCredential;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The resource a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenResource {
    Graph,
    Exchange,
}

impl TokenResource {
    pub fn scope(self, ctx: &TenantContext) -> String {
        match self {
            TokenResource::Graph => ctx.endpoints.graph_scope(),
            TokenResource::Exchange => ctx.endpoints.exchange_scope(),
        }
    }

    fn operation(self) -> &'static str {
        match self {
            TokenResource::Graph => "token:graph",
            TokenResource::Exchange => "token:exchange",
        }
    }
}

/// A bearer token. `Debug` never shows it.
#[derive(Clone)]
pub struct AccessToken {
    secret: SecretString,
    /// The tenant GUID (`tid` claim), when the token is a readable JWT.
    tenant_guid: Option<String>,
    /// The app roles the token carries (`roles` claim), when it is a readable JWT.
    roles: Vec<String>,
    expires_at: Instant,
    obtained_at: Instant,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("tenant_guid", &self.tenant_guid)
            .field(
                "expires_in",
                &self.expires_at.saturating_duration_since(Instant::now()),
            )
            .finish_non_exhaustive()
    }
}

impl AccessToken {
    pub(crate) fn expose(&self) -> &str {
        self.secret.expose_secret()
    }

    pub fn tenant_guid(&self) -> Option<&str> {
        self.tenant_guid.as_deref()
    }

    /// The app roles (application permissions) the token carries.
    pub fn roles(&self) -> &[String] {
        &self.roles
    }

    fn same_as(&self, other: &AccessToken) -> bool {
        self.obtained_at == other.obtained_at && self.expose() == other.expose()
    }

    pub fn expires_in(&self) -> Duration {
        self.expires_at.saturating_duration_since(Instant::now())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    tenant: String,
    client_id: String,
    scope: String,
}

type Slot = Arc<tokio::sync::Mutex<Option<AccessToken>>>;

/// Process-wide token cache.
#[derive(Default)]
pub(crate) struct TokenCache {
    slots: Mutex<HashMap<TokenKey, Slot>>,
    /// Credentials created moments ago, by (tenant, client id): until when an AADSTS7000215 for
    /// them means "not replicated yet" rather than "wrong" (docs/microsoft-365.md §8.4).
    new_credentials: Mutex<HashMap<(String, String), Instant>>,
}

impl TokenCache {
    fn slot(&self, key: TokenKey) -> Slot {
        let mut m = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(key).or_default().clone()
    }

    /// Treat `client_id`'s secret in `tenant` as new until `until`: the token endpoint's
    /// "invalid client secret" is retried until then.
    pub(crate) fn mark_new_credential(&self, tenant: &str, client_id: &str, until: Instant) {
        let mut m = self
            .new_credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        m.retain(|_, u| *u > now);
        m.insert(
            (tenant.to_ascii_lowercase(), client_id.to_ascii_lowercase()),
            until,
        );
    }

    fn new_credential_until(&self, tenant: &str, client_id: &str) -> Option<Instant> {
        self.new_credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(tenant.to_ascii_lowercase(), client_id.to_ascii_lowercase()))
            .copied()
            .filter(|u| *u > Instant::now())
    }

    /// Forget every token of a tenant (call after its credential changes).
    pub(crate) fn invalidate_tenant(&self, tenant: &str) {
        let t = tenant.to_ascii_lowercase();
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| k.tenant != t);
    }

    /// A valid token for (tenant, client, resource), fetching one if needed. `rejected` is a
    /// token the service just refused (401): it is replaced unless another caller already did.
    pub(crate) async fn get(
        &self,
        core: &Core,
        ctx: &TenantContext,
        resource: TokenResource,
        rejected: Option<&AccessToken>,
    ) -> Result<AccessToken, M365Error> {
        let key = TokenKey {
            tenant: ctx.tenant_id.to_ascii_lowercase(),
            client_id: ctx.credential.client_id().to_string(),
            scope: resource.scope(ctx),
        };
        let slot = self.slot(key);
        // Holding this lock across the fetch is what makes the refresh single-flight.
        let mut cached = slot.lock().await;
        let skew = Duration::from_secs(core.settings.token_refresh_skew_secs);
        if let Some(t) = cached.as_ref() {
            let is_rejected = rejected.is_some_and(|r| r.same_as(t));
            if !is_rejected && t.expires_in() > skew {
                return Ok(t.clone());
            }
        }
        match fetch_token(core, ctx, resource).await {
            Ok(t) => {
                *cached = Some(t.clone());
                Ok(t)
            }
            Err(e) => match cached.as_ref() {
                // Early refresh failed for a passing reason: keep using the token while it lasts.
                Some(old)
                    if e.is_retryable()
                        && old.expires_in() > Duration::from_secs(30)
                        && !rejected.is_some_and(|r| r.same_as(old)) =>
                {
                    tracing::warn!(tenant = %ctx.tenant_id, error = %e, "token refresh failed; using the cached token until it expires");
                    Ok(old.clone())
                }
                _ => Err(e),
            },
        }
    }
}

async fn fetch_token(
    core: &Core,
    ctx: &TenantContext,
    resource: TokenResource,
) -> Result<AccessToken, M365Error> {
    let op = resource.operation();
    let token_url = format!(
        "{}/{}/oauth2/v2.0/token",
        ctx.endpoints.login, ctx.tenant_id
    );
    let scope = resource.scope(ctx);
    let mut form = vec![
        ("client_id", ctx.credential.client_id().to_string()),
        ("scope", scope),
        ("grant_type", "client_credentials".to_string()),
    ];
    match &ctx.credential {
        ManagementCredential::ClientSecret { client_secret, .. } => {
            form.push(("client_secret", client_secret.expose_secret().to_string()));
        }
        ManagementCredential::Certificate {
            client_id,
            certificate_pem,
            private_key_pem,
        } => {
            let assertion = client_assertion(
                client_id,
                certificate_pem,
                private_key_pem,
                &token_url,
                &core.settings,
                op,
            )?;
            form.push((
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
            ));
            form.push(("client_assertion", assertion));
        }
    }
    let mut call = Call::new(&ctx.tenant_id, Service::Login, op, Method::POST, token_url);
    call.body = Some((
        form_encode(&form).into_bytes(),
        "application/x-www-form-urlencoded",
    ));
    // Asking for a token twice is harmless.
    call.idempotent = true;
    // A secret added moments ago is refused as "invalid" until it has replicated.
    if let Some(until) = core
        .tokens
        .new_credential_until(&ctx.tenant_id, ctx.credential.client_id())
    {
        call.lag = Some((until, |e| *e.kind() == ErrorKind::InvalidClientSecret));
    }
    let resp = core.execute(&call, classify_login).await?;
    parse_token_response(&resp, op)
}

fn parse_token_response(resp: &RawResponse, op: &str) -> Result<AccessToken, M365Error> {
    let v: serde_json::Value = resp.json(Service::Login, op)?;
    let protocol =
        |m: &str| M365Error::new(ErrorKind::Protocol, Service::Login, op).with_message(m);
    let secret = v
        .get("access_token")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| protocol("token response has no access_token"))?;
    // `expires_in` is a number from v2.0 endpoints, a string from some older ones.
    let expires_in = match v.get("expires_in") {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| protocol("token response has no expires_in"))?;
    let now = Instant::now();
    Ok(AccessToken {
        tenant_guid: jwt_tenant_id(secret),
        roles: jwt_roles(secret),
        secret: SecretString::from(secret.to_string()),
        expires_at: now + Duration::from_secs(expires_in),
        obtained_at: now,
    })
}

/// The `tid` claim of a JWT access token, read without verification (used only for routing).
pub(crate) fn jwt_tenant_id(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("tid")?.as_str().map(str::to_string)
}

/// The `roles` claim of a JWT access token, read without verification (used only to see whether
/// a new app role assignment has reached the token yet).
pub(crate) fn jwt_roles(token: &str) -> Vec<String> {
    let Some(payload) = token.split('.').nth(1) else {
        return Vec::new();
    };
    let Ok(bytes) = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Vec::new();
    };
    v.get("roles")
        .and_then(|r| r.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|r| r.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Map a token endpoint error (`{"error","error_description","error_codes":[…]}`).
pub(crate) fn classify_login(resp: &RawResponse, service: Service, op: &str) -> M365Error {
    let v: Option<serde_json::Value> = serde_json::from_slice(&resp.body).ok();
    let code = v
        .as_ref()
        .and_then(|v| v.get("error_codes"))
        .and_then(|c| c.as_array())
        .and_then(|a| a.first())
        .and_then(|c| c.as_u64())
        .or_else(|| {
            // Fall back to the `AADSTSnnnn:` prefix of the description.
            let d = v.as_ref()?.get("error_description")?.as_str()?;
            let rest = d.strip_prefix("AADSTS")?;
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        });
    // The first line only: the rest is "Trace ID: …", "Correlation ID: …", "Timestamp: …",
    // separated by \r\n (docs/microsoft-365.md §8.5); the trace id is kept as the request id.
    let description = v
        .as_ref()
        .and_then(|v| v.get("error_description").or_else(|| v.get("error")))
        .and_then(|d| d.as_str())
        .map(|d| d.lines().next().unwrap_or(d).trim_end().to_string());
    let kind = match (resp.status, code) {
        (429, _) => ErrorKind::Throttled {
            retry_after: resp.retry_after(),
        },
        (_, Some(c)) => aadsts_kind(c),
        // A 503 without an AADSTS code is the token endpoint being busy: honour its wait.
        (503, None) if resp.retry_after().is_some() => ErrorKind::Throttled {
            retry_after: resp.retry_after(),
        },
        (408 | 500..=599, None) => ErrorKind::Transient,
        _ => ErrorKind::SignInFailed,
    };
    // A 5xx with an AADSTS code other than a known one is still a server problem.
    let kind = if resp.status >= 500 && kind == ErrorKind::SignInFailed {
        ErrorKind::Transient
    } else {
        kind
    };
    let mut e = M365Error::new(kind, service, op)
        .with_status(resp.status)
        .with_request_id(
            v.as_ref()
                .and_then(|v| v.get("trace_id"))
                .and_then(|t| t.as_str())
                .map(str::to_string)
                .or_else(|| resp.request_id()),
        );
    if let Some(c) = code {
        e = e.with_remote_code(format!("AADSTS{c}"));
    }
    if let Some(d) = description {
        e = e.with_message(d);
    }
    e
}

/// AADSTS error number → kind. Numbers from Microsoft's AADSTS error reference.
pub(crate) fn aadsts_kind(code: u64) -> ErrorKind {
    match code {
        7000215 => ErrorKind::InvalidClientSecret,
        7000222 => ErrorKind::ClientSecretExpired,
        // Assertion signature invalid / certificate not registered / assertion expired or not yet
        // valid (clock skew) / key not found / assertion audience wrong.
        700027 | 700024 | 700023 | 7000274 | 7000277 | 700021 | 700025 | 5002726 => {
            ErrorKind::InvalidClientCertificate
        }
        700016 => ErrorKind::AppNotFoundInTenant,
        7000112 | 7000114 => ErrorKind::AppDisabled,
        90002 | 900023 | 90072 | 900022 => ErrorKind::TenantNotFound,
        // Client credentials on /common (or /consumers): the tenant must be named.
        9001023 => ErrorKind::InvalidConfiguration,
        65001 | 650051 | 650052 | 65004 => ErrorKind::ConsentMissing,
        500011 => ErrorKind::ResourceNotInTenant,
        // 700022: a scope naming more than one resource.
        70011 | 1002012 | 700022 => ErrorKind::InvalidScope,
        53003 | 530003 | 530034 | 53000 => ErrorKind::SignInBlocked,
        50196 | 50229 => ErrorKind::Throttled { retry_after: None },
        90033 | 90055 | 500000..=500010 | 50089 => ErrorKind::Transient,
        _ => ErrorKind::SignInFailed,
    }
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    jti: String,
    nbf: i64,
    iat: i64,
    exp: i64,
}

/// SHA-1 and SHA-256 thumbprints (base64url, no padding) of the first certificate in a PEM.
pub fn certificate_thumbprints(certificate_pem: &str) -> Result<(String, String), String> {
    let blocks = pem::parse_many(certificate_pem.as_bytes())
        .map_err(|e| format!("certificate PEM is not valid: {e}"))?;
    let der = blocks
        .iter()
        .find(|b| b.tag() == "CERTIFICATE")
        .ok_or("certificate PEM holds no CERTIFICATE block")?
        .contents();
    Ok((
        URL_SAFE_NO_PAD.encode(Sha1::digest(der)),
        URL_SAFE_NO_PAD.encode(Sha256::digest(der)),
    ))
}

/// Build the signed client assertion for the certificate credential (docs/microsoft-365.md §5.1).
pub(crate) fn client_assertion(
    client_id: &str,
    certificate_pem: &str,
    private_key_pem: &SecretString,
    token_url: &str,
    settings: &M365Settings,
    op: &str,
) -> Result<String, M365Error> {
    let config_err = |m: String| {
        M365Error::new(ErrorKind::InvalidConfiguration, Service::Login, op).with_message(m)
    };
    let (x5t, x5t_s256) = certificate_thumbprints(certificate_pem).map_err(config_err)?;
    let alg = match settings.client_assertion_algorithm {
        AssertionAlgorithm::PS256 => jsonwebtoken::Algorithm::PS256,
        AssertionAlgorithm::RS256 => jsonwebtoken::Algorithm::RS256,
    };
    let mut header = jsonwebtoken::Header::new(alg);
    header.typ = Some("JWT".into());
    header.x5t = Some(x5t);
    header.x5t_s256 = Some(x5t_s256);
    let now = chrono::Utc::now().timestamp();
    let claims = AssertionClaims {
        aud: token_url,
        iss: client_id,
        sub: client_id,
        jti: uuid::Uuid::new_v4().to_string(),
        // Backdate nbf slightly: a server clock a little ahead of Entra's must not be refused.
        nbf: now - 60,
        iat: now,
        exp: now - 60 + settings.client_assertion_lifetime_secs as i64,
    };
    // The key error text never contains key material.
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(private_key_pem.expose_secret().as_bytes())
        .map_err(|e| config_err(format!("private key PEM is not a usable RSA key: {e}")))?;
    jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| config_err(format!("could not sign the client assertion: {e}")))
}

/// `application/x-www-form-urlencoded` (WHATWG): unreserved bytes kept, space as `+`.
pub(crate) fn form_encode(pairs: &[(&str, String)]) -> String {
    fn enc(s: &str, out: &mut String) {
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                    out.push(b as char)
                }
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
    }
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        enc(k, &mut out);
        out.push('=');
        enc(v, &mut out);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is fine in tests (developers' guide)
mod tests {
    use super::*;

    fn raw(status: u16, body: &str) -> RawResponse {
        RawResponse {
            status,
            headers: Default::default(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn aadsts_codes_map_to_actionable_kinds() {
        let cases = [
            (7000215, ErrorKind::InvalidClientSecret),
            (7000222, ErrorKind::ClientSecretExpired),
            (700016, ErrorKind::AppNotFoundInTenant),
            (65001, ErrorKind::ConsentMissing),
            (500011, ErrorKind::ResourceNotInTenant),
            (90002, ErrorKind::TenantNotFound),
            (700027, ErrorKind::InvalidClientCertificate),
            (70011, ErrorKind::InvalidScope),
            (123, ErrorKind::SignInFailed),
        ];
        for (c, k) in cases {
            assert_eq!(aadsts_kind(c), k, "AADSTS{c}");
        }
    }

    #[test]
    fn login_error_body_is_parsed() {
        let e = classify_login(
            &raw(
                401,
                r#"{"error":"invalid_client","error_description":"AADSTS7000222: The provided client secret keys for app 'x' are expired.\r\nTrace ID: t","error_codes":[7000222],"trace_id":"tr-1"}"#,
            ),
            Service::Login,
            "token:graph",
        );
        assert_eq!(*e.kind(), ErrorKind::ClientSecretExpired);
        assert_eq!(e.remote_code(), Some("AADSTS7000222"));
        assert_eq!(e.request_id(), Some("tr-1"));
        assert!(
            e.remote_message()
                .unwrap()
                .starts_with("AADSTS7000222: The provided")
        );
        assert!(!e.remote_message().unwrap().contains("Trace ID"));
    }

    #[test]
    fn login_code_from_description_when_codes_missing() {
        let e = classify_login(
            &raw(
                400,
                r#"{"error":"invalid_request","error_description":"AADSTS90002: Tenant 'x' not found."}"#,
            ),
            Service::Login,
            "t",
        );
        assert_eq!(*e.kind(), ErrorKind::TenantNotFound);
    }

    #[test]
    fn login_5xx_without_body_is_transient() {
        let e = classify_login(&raw(503, "<html>"), Service::Login, "t");
        assert_eq!(*e.kind(), ErrorKind::Transient);
    }

    #[test]
    fn form_encoding_escapes_secrets_safely() {
        let s = form_encode(&[
            ("client_secret", "a+b/c=d e~".into()),
            ("scope", "https://x/.default".into()),
        ]);
        assert_eq!(
            s,
            "client_secret=a%2Bb%2Fc%3Dd+e%7E&scope=https%3A%2F%2Fx%2F.default"
        );
    }

    #[test]
    fn tid_is_read_from_jwt_payload() {
        let payload =
            URL_SAFE_NO_PAD.encode(br#"{"tid":"11111111-2222-3333-4444-555555555555","aud":"x"}"#);
        let t = format!("eyJhbGciOiJub25lIn0.{payload}.sig");
        assert_eq!(
            jwt_tenant_id(&t).as_deref(),
            Some("11111111-2222-3333-4444-555555555555")
        );
        assert_eq!(jwt_tenant_id("opaque-token"), None);
    }
}
