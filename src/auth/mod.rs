//! Bearer-token authentication and authorization for `/v1`.
//!
//! Tokens are verified for signature, `iss`, `aud`, `exp` and `nbf` (with a small leeway) against
//! either a JWKS document (asymmetric algorithms only) or a shared HS256 secret (local use) —
//! never both, so a public key can never be replayed as an HMAC secret. Roles come from `roles`
//! (app tokens) or `scp` (delegated tokens); `Admin` implies `Write` implies `Read`. The tenants a
//! caller may see come from a configurable claim; a tenant outside it answers 404, not 403, so
//! its existence does not leak.
//!
//! Refusals are this module's own [`Denied`]; the API maps them to problems (`api::problem`) and
//! provides the `Caller` extractor, so this module does not depend on the API.
use std::collections::HashSet;
use std::sync::Arc;

use actix_web::HttpRequest;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;
use uuid::Uuid;

use crate::config::AuthSettings;

pub mod jwks;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Read,
    Write,
    Admin,
}

impl Role {
    fn name(self, s: &AuthSettings) -> &str {
        match self {
            Role::Read => &s.role_read,
            Role::Write => &s.role_write,
            Role::Admin => &s.role_admin,
        }
    }
}

/// Which tenants a caller may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantScope {
    All,
    Only(HashSet<Uuid>),
}

/// The claim that limits a token to some access grants (a vendor portal's backend): a list of
/// grant keys and `label:name=value` entries. A limited token sees those grants (their status)
/// and nothing else: every other resource answers 404, as if it did not exist.
pub const GRANTS_CLAIM: &str = "mailscope_grants";

/// Which access grants a caller may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantScope {
    /// Not limited by grant (the tenants claim and the role decide).
    All,
    /// Only these grants, by key or by label.
    Only {
        keys: HashSet<String>,
        labels: Vec<(String, String)>,
    },
}

impl GrantScope {
    /// From the claim's value: absent means not limited; anything present limits (an entry that
    /// does not parse matches nothing, never everything).
    fn from_claim(v: Option<&serde_json::Value>) -> GrantScope {
        let entries: Vec<String> = match v {
            None => return GrantScope::All,
            Some(serde_json::Value::String(one)) => vec![one.clone()],
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|i| i.as_str().map(String::from))
                .collect(),
            Some(_) => Vec::new(),
        };
        let mut keys = HashSet::new();
        let mut labels = Vec::new();
        for e in entries {
            match e.strip_prefix("label:").and_then(|l| l.split_once('=')) {
                Some((k, v)) if !k.is_empty() => labels.push((k.to_string(), v.to_string())),
                Some(_) => {}
                None if !e.starts_with("label:") => {
                    keys.insert(e);
                }
                None => {}
            }
        }
        GrantScope::Only { keys, labels }
    }
}

/// The authenticated caller of a request, available to handlers for decisions and the audit trail.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `oid` if present (stable across apps), else `sub`.
    pub subject: Option<String>,
    /// The client application: `azp` (v2 tokens) or `appid` (v1 tokens).
    pub app: Option<String>,
    /// Highest role held, if any.
    pub role: Option<Role>,
    pub tenants: TenantScope,
    /// Set by the `mailscope_grants` claim ([`GRANTS_CLAIM`]).
    pub grants: GrantScope,
    role_names: Arc<AuthSettings>,
}

impl Caller {
    pub fn require(&self, needed: Role) -> Result<(), Denied> {
        match self.role {
            Some(r) if r >= needed => Ok(()),
            _ => Err(Denied::Forbidden(format!(
                "this operation needs the `{}` role (or a higher one) in the token's roles or scp claim",
                needed.name(&self.role_names)
            ))),
        }
    }

    /// True when the token is limited to some access grants.
    pub fn grant_limited(&self) -> bool {
        self.grants != GrantScope::All
    }

    /// Whether the tenant's resources are visible. A token limited to some grants sees none of
    /// them (whatever its role), only its grants through [`Caller::require_grant_tenant`].
    pub fn can_see(&self, tenant: Uuid) -> bool {
        !self.grant_limited() && self.tenant_in_scope(tenant)
    }

    fn tenant_in_scope(&self, tenant: Uuid) -> bool {
        self.role == Some(Role::Admin)
            || match &self.tenants {
                TenantScope::All => true,
                TenantScope::Only(set) => set.contains(&tenant),
            }
    }

    /// 404 for a tenant the caller may not see, exactly as for one that does not exist.
    pub fn require_tenant(&self, tenant: Uuid) -> Result<(), Denied> {
        if self.can_see(tenant) {
            Ok(())
        } else {
            Err(tenant_not_found(tenant))
        }
    }

    /// 404 for a tenant whose access grants the caller may not see. Unlike [`Self::require_tenant`]
    /// this admits a token limited to some grants; the handler then shows only those
    /// ([`Self::may_see_grant`]).
    pub fn require_grant_tenant(&self, tenant: Uuid) -> Result<(), Denied> {
        if self.tenant_in_scope(tenant) {
            Ok(())
        } else {
            Err(tenant_not_found(tenant))
        }
    }

    /// Whether the access grant with this key and these labels is visible to the caller.
    pub fn may_see_grant(&self, key: &str, labels: &serde_json::Value) -> bool {
        match &self.grants {
            GrantScope::All => true,
            GrantScope::Only {
                keys,
                labels: wanted,
            } => {
                keys.contains(key)
                    || wanted
                        .iter()
                        .any(|(k, v)| labels.get(k).and_then(|l| l.as_str()) == Some(v.as_str()))
            }
        }
    }

    /// `None` = all tenants; otherwise the visible set.
    pub fn visible_tenants(&self) -> Option<Vec<Uuid>> {
        if self.grant_limited() {
            return Some(Vec::new());
        }
        if self.role == Some(Role::Admin) {
            return None;
        }
        match &self.tenants {
            TenantScope::All => None,
            TenantScope::Only(s) => Some(s.iter().copied().collect()),
        }
    }
}

/// The answer for a tenant that is not registered or not visible (the same, so existence does
/// not leak).
pub fn tenant_not_found(tenant: Uuid) -> Denied {
    Denied::TenantNotFound(tenant)
}

/// Why a request is refused: 401 (with `WWW-Authenticate`), 403, or 404 for a hidden tenant.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    /// No usable token.
    #[error(transparent)]
    Unauthenticated(#[from] AuthError),
    /// Authenticated, but without the role the operation needs.
    #[error("{0}")]
    Forbidden(String),
    #[error("tenant {0} is not registered with mailscope")]
    TenantNotFound(Uuid),
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("{0}")]
    Invalid(String),
    #[error("signing keys are not available: {0}")]
    KeysUnavailable(String),
}

enum KeyMode {
    Hs256(DecodingKey),
    Jwks {
        cache: jwks::JwksCache,
        algorithms: Vec<Algorithm>,
    },
}

/// Verifies tokens; shared by all workers.
pub struct Verifier {
    mode: KeyMode,
    settings: Arc<AuthSettings>,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    oid: Option<String>,
    azp: Option<String>,
    appid: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    scp: Option<String>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

impl Verifier {
    pub fn hs256(settings: AuthSettings, secret: &str) -> Self {
        Verifier {
            mode: KeyMode::Hs256(DecodingKey::from_secret(secret.as_bytes())),
            settings: Arc::new(settings),
        }
    }

    pub fn jwks(settings: AuthSettings, url: String, http: reqwest::Client) -> Self {
        let algorithms = settings
            .algorithms
            .iter()
            .filter_map(|a| a.parse::<Algorithm>().ok())
            .filter(|a| !matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
            .collect();
        let cache = jwks::JwksCache::new(
            url,
            http,
            std::time::Duration::from_secs(settings.jwks_min_refresh_seconds),
            std::time::Duration::from_secs(settings.jwks_max_age_seconds),
        );
        Verifier {
            mode: KeyMode::Jwks { cache, algorithms },
            settings: Arc::new(settings),
        }
    }

    /// Fetch keys ahead of the first request (failure is logged, not fatal).
    pub async fn warm_up(&self) {
        if let KeyMode::Jwks { cache, .. } = &self.mode
            && let Err(e) = cache.refresh().await
        {
            tracing::warn!(error = %e, "could not fetch the JWKS at start; will retry on demand");
        }
    }

    pub async fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let header = decode_header(token)
            .map_err(|_| AuthError::Invalid("the token is not a well-formed JWT".into()))?;
        let key = match &self.mode {
            KeyMode::Hs256(key) => {
                if header.alg != Algorithm::HS256 {
                    return Err(AuthError::Invalid(format!(
                        "algorithm {:?} is not accepted (this service accepts HS256 tokens)",
                        header.alg
                    )));
                }
                key.clone()
            }
            KeyMode::Jwks { cache, algorithms } => {
                if !algorithms.contains(&header.alg) {
                    return Err(AuthError::Invalid(format!(
                        "algorithm {:?} is not accepted (allowed: {:?})",
                        header.alg, algorithms
                    )));
                }
                let kid = header
                    .kid
                    .as_deref()
                    .ok_or_else(|| AuthError::Invalid("the token has no `kid` header".into()))?;
                let (key, key_alg) = cache.key(kid).await?;
                if key_alg.is_some_and(|a| a != header.alg) {
                    return Err(AuthError::Invalid(
                        "the token's algorithm does not match its signing key".into(),
                    ));
                }
                key
            }
        };
        let s = &self.settings;
        let mut v = Validation::new(header.alg);
        v.leeway = s.leeway_seconds;
        v.validate_nbf = true;
        v.set_issuer(&[&s.issuer]);
        v.set_audience(&[&s.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data =
            decode::<Claims>(token, &key, &v).map_err(|e| AuthError::Invalid(describe(&e)))?;
        Ok(self.caller_from(data.claims))
    }

    fn caller_from(&self, c: Claims) -> Caller {
        let s = &self.settings;
        let mut granted: Vec<&str> = c.roles.iter().map(String::as_str).collect();
        if let Some(scp) = &c.scp {
            granted.extend(scp.split_whitespace());
        }
        let role = [Role::Admin, Role::Write, Role::Read]
            .into_iter()
            .find(|r| granted.contains(&r.name(s)));
        let tenants = match c.rest.get(&s.tenants_claim) {
            Some(serde_json::Value::String(x)) if x == "*" => TenantScope::All,
            Some(serde_json::Value::Array(items)) if items.iter().any(|i| i == "*") => {
                TenantScope::All
            }
            Some(serde_json::Value::Array(items)) => TenantScope::Only(
                items
                    .iter()
                    .filter_map(|i| i.as_str()?.parse().ok())
                    .collect(),
            ),
            Some(serde_json::Value::String(one)) => {
                TenantScope::Only(one.parse().ok().into_iter().collect())
            }
            _ => TenantScope::Only(HashSet::new()),
        };
        Caller {
            subject: c.oid.or(c.sub),
            app: c.azp.or(c.appid),
            role,
            tenants,
            grants: GrantScope::from_claim(c.rest.get(GRANTS_CLAIM)),
            role_names: s.clone(),
        }
    }
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "the token has expired".into(),
        K::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        K::InvalidIssuer => "the token's issuer (iss) is not accepted".into(),
        K::InvalidAudience => "the token's audience (aud) is not this service".into(),
        K::InvalidSignature => "the token's signature is invalid".into(),
        K::InvalidAlgorithm => "the token's algorithm is not accepted".into(),
        K::MissingRequiredClaim(c) => format!("the token lacks the `{c}` claim"),
        K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => {
            "the token is not a well-formed JWT".into()
        }
        _ => "the token could not be verified".into(),
    }
}

/// The request's bearer token, if it sends one.
pub fn bearer_token(req: &HttpRequest) -> Option<String> {
    let h = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = h.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .then(|| token.trim().to_string())
}

/// Mint an HS256 token for local development (`mailscope token`).
pub fn mint_hs256(
    settings: &AuthSettings,
    secret: &str,
    subject: &str,
    roles: &[String],
    tenants: &[String],
    ttl_seconds: i64,
) -> anyhow::Result<String> {
    let now = chrono::Utc::now().timestamp();
    let mut claims = serde_json::json!({
        "iss": settings.issuer,
        "aud": settings.audience,
        "sub": subject,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "roles": roles,
    });
    claims[settings.tenants_claim.as_str()] = serde_json::json!(tenants);
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grants_claim_limits_by_key_and_label_and_never_widens() {
        assert_eq!(GrantScope::from_claim(None), GrantScope::All);
        let s = GrantScope::from_claim(Some(&serde_json::json!([
            "acme",
            "label:vendor=globex",
            "label:"
        ])));
        let GrantScope::Only { keys, labels } = &s else {
            panic!("limited")
        };
        assert!(keys.contains("acme"));
        assert_eq!(labels, &[("vendor".to_string(), "globex".to_string())]);
        // A malformed claim limits to nothing rather than lifting the limit.
        assert_eq!(
            GrantScope::from_claim(Some(&serde_json::json!(42))),
            GrantScope::Only {
                keys: HashSet::new(),
                labels: Vec::new()
            }
        );
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn verifier() -> Verifier {
        Verifier::hs256(AuthSettings::default(), SECRET)
    }

    #[tokio::test]
    async fn role_hierarchy_and_tenant_scope() {
        let s = AuthSettings::default();
        let t = uuid::Uuid::new_v4();
        let tok = mint_hs256(
            &s,
            SECRET,
            "alice",
            &["MailScope.Write".into()],
            &[t.to_string()],
            60,
        )
        .unwrap();
        let c = verifier().verify(&tok).await.unwrap();
        assert!(c.require(Role::Read).is_ok());
        assert!(c.require(Role::Write).is_ok());
        assert!(c.require(Role::Admin).is_err());
        assert!(c.can_see(t));
        assert!(!c.can_see(uuid::Uuid::new_v4()));
        assert_eq!(c.subject.as_deref(), Some("alice"));
    }

    #[tokio::test]
    async fn scp_claim_grants_roles() {
        let s = AuthSettings::default();
        let now = chrono::Utc::now().timestamp();
        let claims = serde_json::json!({"iss": s.issuer, "aud": s.audience, "exp": now + 60,
            "scp": "openid MailScope.Read", "mailscope_tenants": "*"});
        let tok = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        let c = verifier().verify(&tok).await.unwrap();
        assert_eq!(c.role, Some(Role::Read));
        assert_eq!(c.tenants, TenantScope::All);
    }

    #[tokio::test]
    async fn hs384_is_refused_in_hs256_mode() {
        let s = AuthSettings::default();
        let now = chrono::Utc::now().timestamp();
        let claims = serde_json::json!({"iss": s.issuer, "aud": s.audience, "exp": now + 60});
        let tok = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS384),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(verifier().verify(&tok).await.is_err());
    }
}
