//! The simulated Microsoft identity platform: the v2.0 token endpoint for client credentials
//! (client secret, HTTP Basic or certificate client assertion), OpenID configuration, JWKS and
//! instance discovery, with errors in the `AADSTS…` shape (docs/microsoft-365.md §5.1).
use actix_web::{HttpRequest, HttpResponse, web};
use std::collections::BTreeSet;

use base64::Engine;
use serde_json::json;

use super::model::{
    DEFAULT_APP_WID, EXCHANGE_APP_ID, EXCHANGE_RESOURCE, GRAPH_APP_ID, GRAPH_RESOURCE, guid,
};
use super::settings::Api;
use super::state::{Shared, World};
use super::tokens::{AccessClaims, AssertionProblem, verify_client_assertion};
use super::wire::{Reply, aadsts};
use super::{CallNote, Incoming, Interrupt, base_url, guarded};

/// Why a requested scope names no single resource.
#[derive(Debug, PartialEq)]
enum ScopeProblem {
    /// Not of the `{resource}/.default` form client credentials need.
    Invalid,
    /// Scopes of more than one resource (AADSTS700022).
    SeveralResources,
    /// A resource the tenant does not know.
    Unknown(String),
}

/// The resource a scope or resource value names: `(resource app id, token audience)`.
fn resource_named(base: &str) -> Result<(&'static str, &'static str), ScopeProblem> {
    match base.to_ascii_lowercase().as_str() {
        "https://graph.microsoft.com" | GRAPH_APP_ID => Ok((GRAPH_APP_ID, GRAPH_RESOURCE)),
        "https://outlook.office365.com" | "https://outlook.office.com" | EXCHANGE_APP_ID => {
            Ok((EXCHANGE_APP_ID, EXCHANGE_RESOURCE))
        }
        _ => Err(ScopeProblem::Unknown(base.to_string())),
    }
}

/// Map a requested scope (v2) or resource (v1) to (resource app id, token audience).
fn resource_of(
    scope_or_resource: &str,
    v2: bool,
) -> Result<(&'static str, &'static str), ScopeProblem> {
    let parts: Vec<&str> = scope_or_resource.split_whitespace().collect();
    if v2 && parts.len() > 1 {
        // Several scopes: one token has one audience, so they must all name one resource.
        let bases: BTreeSet<String> = parts
            .iter()
            .map(|p| match p.strip_suffix("/.default") {
                Some(b) => b.trim_end_matches('/').to_ascii_lowercase(),
                None => p
                    .rsplit_once('/')
                    .map(|(b, _)| b.to_ascii_lowercase())
                    .unwrap_or_default(),
            })
            .collect();
        let resources: BTreeSet<&str> = bases
            .iter()
            .filter_map(|b| resource_named(b).ok().map(|r| r.0))
            .collect();
        if bases.len() > 1 && (resources.len() > 1 || resources.len() < bases.len()) {
            return Err(ScopeProblem::SeveralResources);
        }
        return Err(ScopeProblem::Invalid);
    }
    let [one] = parts.as_slice() else {
        return Err(ScopeProblem::Invalid);
    };
    let base = if v2 {
        match one.strip_suffix("/.default") {
            Some(b) => b.trim_end_matches('/'),
            None => return Err(ScopeProblem::Invalid),
        }
    } else {
        one.trim_end_matches('/')
    };
    resource_named(base)
}

/// The caller's `client-request-id`, which Entra echoes as the correlation id.
fn client_request_id(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
}

/// Authority segments that name no tenant (docs/microsoft-365.md §8.5: client credentials there
/// is AADSTS9001023).
fn is_multi_tenant_authority(name: &str) -> bool {
    ["common", "consumers", "organizations"]
        .iter()
        .any(|a| a.eq_ignore_ascii_case(name))
}

/// `GET` on the token endpoint: AADSTS900561 (docs/microsoft-365.md §8.5).
pub async fn token_get(req: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    let trace = uuid::Uuid::new_v4().to_string();
    let correlation = client_request_id(&req).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    aadsts(
        "invalid_request",
        900561,
        "The endpoint only accepts POST requests. Received a GET request.",
        shared.clock.wall(),
        &trace,
        &correlation,
    )
    .into_response()
}

/// `POST /{tenant}/oauth2/v2.0/token` (and the v1 `/oauth2/token` with `resource`).
pub async fn token(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    shared: web::Data<Shared>,
) -> HttpResponse {
    let tenant_name = path.into_inner();
    let v2 = req.path().contains("/v2.0/");
    let form: Vec<(String, String)> = serde_urlencoded_pairs(&body);
    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let tenant_id = shared.lock().tenant(&tenant_name).map(|t| t.id.clone());
    let endpoint_url = format!("{}{}", base_url(&req), req.path());
    let basic = basic_credentials(&req);
    let inc = Incoming {
        api: Api::Login,
        tenant: tenant_id.clone(),
        method: "POST".into(),
        path: req.path().to_string(),
        note: CallNote {
            endpoint: "login:token".into(),
            app_id: get("client_id").or_else(|| basic.as_ref().map(|b| b.0.clone())),
            ..Default::default()
        },
    };
    let base = base_url(&req);
    let correlation = client_request_id(&req);
    let tid = tenant_id.clone();
    let corr = correlation.clone();
    guarded(
        &shared,
        inc,
        move |w, i| {
            let trace = uuid::Uuid::new_v4().to_string();
            let corr = corr.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            match i {
                // Throttled client credentials: 429 with Retry-After; the body need not be JSON
                // (docs/microsoft-365.md §8.5).
                Interrupt::Throttled(d) => {
                    let json_body = tid
                        .as_deref()
                        .and_then(|t| w.tenant(t))
                        .is_some_and(|t| t.behaviour.login_throttle_json_body);
                    let r = if json_body {
                        aadsts(
                            "temporarily_unavailable",
                            50196,
                            "The server terminated an operation because it encountered a client request loop. Please contact your app vendor.",
                            chrono::Utc::now(),
                            &trace,
                            &corr,
                        )
                        .with_status(429)
                    } else {
                        Reply {
                            status: 429,
                            headers: vec![],
                            body: super::wire::Body::Raw(
                                b"Too Many Requests".to_vec(),
                                "text/plain; charset=utf-8".into(),
                            ),
                        }
                        .header("x-ms-request-id", trace)
                    };
                    r.header("Retry-After", super::wire::retry_after_whole_secs(d))
                }
                _ => aadsts(
                    "temporarily_unavailable",
                    90033,
                    "A transient error has occurred. Please try again.",
                    chrono::Utc::now(),
                    &trace,
                    &corr,
                )
                .with_status(503),
            }
        },
        |w, sh| {
            let note = CallNote {
                endpoint: "login:token".into(),
                app_id: get("client_id").or_else(|| basic.as_ref().map(|b| b.0.clone())),
                ..Default::default()
            };
            let reply = issue(
                w,
                sh,
                &tenant_name,
                v2,
                &get,
                basic.clone(),
                &endpoint_url,
                &base,
                correlation,
            );
            (reply, note)
        },
    )
    .await
}

impl Reply {
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }
}

fn serde_urlencoded_pairs(body: &[u8]) -> Vec<(String, String)> {
    url_decode_form(std::str::from_utf8(body).unwrap_or_default())
}

/// Decode `application/x-www-form-urlencoded`.
pub fn url_decode_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// HTTP Basic client authentication (RFC 6749 §2.3.1): url-encoded id and secret.
fn basic_credentials(req: &HttpRequest) -> Option<(String, String)> {
    let h = req.headers().get("authorization")?.to_str().ok()?;
    let b64 = h
        .strip_prefix("Basic ")
        .or_else(|| h.strip_prefix("basic "))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (id, secret) = s.split_once(':')?;
    Some((percent_decode(id), percent_decode(secret)))
}

#[allow(clippy::too_many_arguments)]
fn issue(
    w: &mut World,
    sh: &Shared,
    tenant_name: &str,
    v2: bool,
    get: &dyn Fn(&str) -> Option<String>,
    basic: Option<(String, String)>,
    endpoint_url: &str,
    base: &str,
    correlation: Option<String>,
) -> Reply {
    let wall = sh.clock.wall();
    let now = sh.clock.now();
    let trace = guid(&mut w.rng.ids);
    let correlation = correlation.unwrap_or_else(|| guid(&mut w.rng.ids));
    let err = |e: &str, code: u32, text: &str| aadsts(e, code, text, wall, &trace, &correlation);
    if is_multi_tenant_authority(tenant_name)
        && get("grant_type").as_deref() == Some("client_credentials")
    {
        return err(
            "invalid_request",
            9001023,
            "The grant type isn't supported over the /common or /consumers endpoints. Please use the /organizations or tenant-specific endpoint.",
        );
    }
    let Some(tenant) = w.tenant(tenant_name).cloned() else {
        return err(
            "invalid_request",
            90002,
            &format!(
                "Tenant '{tenant_name}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."
            ),
        );
    };
    match get("grant_type").as_deref() {
        Some("client_credentials") => {}
        Some(other) => {
            return err(
                "unsupported_grant_type",
                70003,
                &format!("The app requested an unsupported grant type '{other}'."),
            );
        }
        None => {
            return err(
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'grant_type'.",
            );
        }
    }
    let client_id = match get("client_id").or_else(|| basic.as_ref().map(|b| b.0.clone())) {
        Some(c) => c,
        None => {
            return err(
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'client_id'.",
            );
        }
    };
    let requested = if v2 { get("scope") } else { get("resource") };
    let Some(requested) = requested else {
        return err(
            "invalid_request",
            900144,
            &format!(
                "The request body must contain the following parameter: '{}'.",
                if v2 { "scope" } else { "resource" }
            ),
        );
    };
    let (resource_app, audience) = match resource_of(&requested, v2) {
        Ok(r) => r,
        Err(ScopeProblem::Unknown(name)) => {
            return err(
                "invalid_resource",
                500011,
                &format!(
                    "The resource principal named {name} was not found in the tenant named {}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant.",
                    tenant.display_name
                ),
            );
        }
        Err(ScopeProblem::SeveralResources) => {
            return err(
                "invalid_scope",
                700022,
                &format!(
                    "The provided value for the input parameter scope is not valid because it contains more than one resource. Scope {requested} is not valid."
                ),
            );
        }
        Err(ScopeProblem::Invalid) => {
            return err(
                "invalid_scope",
                1002012,
                &format!(
                    "The provided value for scope {requested} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
                ),
            );
        }
    };
    // The app registration may live in another tenant (multi-tenant app); credentials are the
    // registration's, the service principal must exist here.
    let app = w
        .tenants
        .iter()
        .flat_map(|t| t.applications.iter())
        .find(|a| a.app_id.eq_ignore_ascii_case(&client_id))
        .cloned();
    let sp = tenant.service_principal_by_app_id(&client_id).cloned();
    let (Some(app), Some(sp)) = (app.clone(), sp) else {
        if app.is_some()
            && tenant
                .applications
                .iter()
                .any(|a| a.app_id.eq_ignore_ascii_case(&client_id))
        {
            return err(
                "invalid_client",
                7000229,
                &format!(
                    "The client application {client_id} is missing service principal in the tenant {}. See instructions here: https://go.microsoft.com/fwlink/?linkid=2225119",
                    tenant.id
                ),
            );
        }
        return err(
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.",
                tenant.display_name
            ),
        );
    };
    let secret = get("client_secret").or_else(|| basic.map(|b| b.1));
    let assertion = get("client_assertion");
    let appidacr;
    if let Some(assertion) = assertion {
        if get("client_assertion_type").as_deref()
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        {
            return err(
                "invalid_request",
                50027,
                "Invalid JWT token. The client_assertion_type is not supported.",
            );
        }
        let now_unix = wall.timestamp();
        let certs: Vec<Vec<u8>> = app
            .key_credentials
            .iter()
            .filter(|k| k.start <= wall && k.end >= wall)
            .map(|k| k.der.clone())
            .collect();
        let mut auds = vec![endpoint_url.trim_end_matches('/').to_string()];
        for name in [&tenant.id, &tenant.initial_domain] {
            for b in [base, "https://login.microsoftonline.com"] {
                auds.push(format!("{b}/{name}/oauth2/v2.0/token"));
                auds.push(format!("{b}/{name}/oauth2/token"));
            }
        }
        match verify_client_assertion(&assertion, &certs, &client_id, &auds, now_unix) {
            Ok(()) => appidacr = "2",
            Err(AssertionProblem::Malformed(m)) => {
                return err(
                    "invalid_client",
                    50027,
                    &format!("JWT token is invalid or malformed. {m}"),
                );
            }
            Err(AssertionProblem::UnknownKey(t)) => {
                return err(
                    "invalid_client",
                    700027,
                    &format!(
                        "The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Thumbprint of key used by client: '{t}', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '{client_id}'.]"
                    ),
                );
            }
            Err(AssertionProblem::BadSignature) => {
                return err(
                    "invalid_client",
                    700027,
                    "Client assertion failed signature validation.",
                );
            }
            Err(AssertionProblem::ClientMismatch) => {
                return err(
                    "invalid_client",
                    700021,
                    "Client assertion application identifier doesn't match 'client_id' parameter. Review the documentation at https://docs.microsoft.com/en-us/azure/active-directory/develop/active-directory-certificate-credentials .",
                );
            }
            Err(AssertionProblem::WrongAudience(a)) => {
                return err(
                    "invalid_client",
                    700212,
                    &format!(
                        "No matching federated identity record found for presented assertion audience '{a}'."
                    ),
                );
            }
            Err(AssertionProblem::Expired { now, nbf, exp }) => {
                return err(
                    "invalid_client",
                    700024,
                    &format!(
                        "Client assertion is not within its valid time range. Current time: {now}, assertion valid from {}, expiry time of assertion {}.",
                        nbf.unwrap_or_default(),
                        exp.unwrap_or_default()
                    ),
                );
            }
        }
    } else if let Some(secret) = secret {
        // A secret still replicating is refused exactly like a wrong one (docs/microsoft-365.md §8.4).
        let matching = app
            .password_credentials
            .iter()
            .find(|p| p.secret_text == secret && p.usable_at <= now);
        match matching {
            None => {
                return err(
                    "invalid_client",
                    7000215,
                    &format!(
                        "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
                    ),
                );
            }
            Some(p) if p.end < wall => {
                return err(
                    "invalid_client",
                    7000222,
                    &format!(
                        "The provided client secret keys for app '{client_id}' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds."
                    ),
                );
            }
            Some(_) => appidacr = "1",
        }
    } else {
        return err(
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        );
    }
    let roles = tenant.granted_roles(&sp.id, resource_app, now);
    let mut wids: Vec<String> = tenant.directory_roles_of(&sp.id);
    wids.push(DEFAULT_APP_WID.into());
    let lifetime = w.pacing.token_lifetime.as_secs() as i64;
    let iat = wall.timestamp();
    let claims = AccessClaims {
        aud: audience.into(),
        iss: format!("https://sts.windows.net/{}/", tenant.id),
        iat,
        nbf: iat,
        exp: iat + lifetime,
        aio: guid(&mut w.rng.ids),
        app_displayname: app.display_name.clone(),
        appid: app.app_id.clone(),
        appidacr: appidacr.into(),
        idp: format!("https://sts.windows.net/{}/", tenant.id),
        idtyp: "app".into(),
        oid: sp.id.clone(),
        rh: "0.sandbox.".into(),
        roles,
        sub: sp.id.clone(),
        tid: tenant.id.clone(),
        uti: guid(&mut w.rng.ids),
        ver: "1.0".into(),
        wids,
    };
    let token = match sh.keys.sign(&claims) {
        Ok(t) => t,
        Err(_) => return err("server_error", 50000, "There was an error issuing a token."),
    };
    let mut body = json!({"token_type": "Bearer", "expires_in": lifetime, "access_token": token});
    if tenant.behaviour.token_ext_expires_in {
        body["ext_expires_in"] = json!(lifetime);
    }
    Reply::json(200, body)
        .header("Cache-Control", "no-store, no-cache")
        .header("Pragma", "no-cache")
        .header("x-ms-request-id", trace)
        .header("client-request-id", correlation)
}

/// `GET /{tenant}/v2.0/.well-known/openid-configuration`.
pub async fn openid_configuration(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Shared>,
) -> HttpResponse {
    let name = path.into_inner();
    let base = base_url(&req);
    let Some(tid) = shared.lock().tenant(&name).map(|t| t.id.clone()) else {
        // Entra answers unknown tenants with 400 and an AADSTS90002 body.
        return aadsts(
            "invalid_tenant",
            90002,
            &format!("Tenant '{name}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."),
            shared.clock.wall(),
            &uuid::Uuid::new_v4().to_string(),
            &uuid::Uuid::new_v4().to_string(),
        )
        .into_response();
    };
    let v2 = req.path().contains("/v2.0/");
    let (ver, issuer) = if v2 {
        ("/v2.0", format!("{base}/{tid}/v2.0"))
    } else {
        ("", format!("https://sts.windows.net/{tid}/"))
    };
    HttpResponse::Ok().json(json!({
        "token_endpoint": format!("{base}/{name}/oauth2{ver}/token"),
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "jwks_uri": format!("{base}/{name}/discovery{ver}/keys"),
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": issuer,
        "request_uri_parameter_supported": false,
        "userinfo_endpoint": format!("{base}/oidc/userinfo"),
        "authorization_endpoint": format!("{base}/{name}/oauth2{ver}/authorize"),
        "device_authorization_endpoint": format!("{base}/{name}/oauth2{ver}/devicecode"),
        "http_logout_supported": true,
        "frontchannel_logout_supported": true,
        "end_session_endpoint": format!("{base}/{name}/oauth2{ver}/logout"),
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "tid", "oid", "roles", "appid"],
        "kerberos_endpoint": format!("{base}/{name}/kerberos"),
        "tenant_region_scope": "NA",
        "cloud_instance_name": "microsoftonline.com",
        "cloud_graph_host_name": "graph.windows.net",
        "msgraph_host": "graph.microsoft.com",
        "rbac_url": "https://pas.windows.net"
    }))
}

/// `GET /{tenant}/discovery/v2.0/keys`.
pub async fn keys(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Shared>,
) -> HttpResponse {
    let name = path.into_inner();
    let issuer = format!("{}/{name}/v2.0", base_url(&req));
    HttpResponse::Ok().json(shared.keys.jwks(&issuer))
}

#[derive(serde::Deserialize)]
pub struct DiscoveryQuery {
    authorization_endpoint: Option<String>,
}

/// `GET /common/discovery/instance`: validates any authority on this host.
pub async fn instance_discovery(req: HttpRequest, q: web::Query<DiscoveryQuery>) -> HttpResponse {
    let base = base_url(&req);
    let host = base.split("://").nth(1).unwrap_or_default().to_string();
    let tenant = q
        .authorization_endpoint
        .as_deref()
        .and_then(|u| u.split("://").nth(1))
        .and_then(|rest| rest.split('/').nth(1))
        .unwrap_or("common")
        .to_string();
    HttpResponse::Ok().json(json!({
        "tenant_discovery_endpoint": format!("{base}/{tenant}/v2.0/.well-known/openid-configuration"),
        "api-version": "1.1",
        "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}]
    }))
}

/// Verify a bearer token for `audience` against the sandbox clock. Shared by Graph and Exchange.
pub fn bearer_claims(
    req: &HttpRequest,
    shared: &Shared,
    audience: &str,
) -> Result<AccessClaims, super::tokens::TokenProblem> {
    use super::tokens::TokenProblem;
    let h = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or(TokenProblem::Missing)?;
    let token = h
        .strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("bearer "))
        .ok_or(TokenProblem::Invalid)?
        .trim();
    if token.is_empty() {
        return Err(TokenProblem::Missing);
    }
    let claims = shared.keys.verify(token, audience)?;
    if claims.exp < shared.clock.wall().timestamp() {
        return Err(TokenProblem::Expired);
    }
    Ok(claims)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn scopes_map_to_resources() {
        assert_eq!(
            resource_of("https://graph.microsoft.com/.default", true)
                .unwrap()
                .1,
            GRAPH_RESOURCE
        );
        assert_eq!(
            resource_of("https://outlook.office365.com/.default", true)
                .unwrap()
                .1,
            EXCHANGE_RESOURCE
        );
        assert_eq!(
            resource_of("00000003-0000-0000-c000-000000000000/.default", true)
                .unwrap()
                .0,
            GRAPH_APP_ID
        );
        assert_eq!(
            resource_of("https://graph.microsoft.com/Mail.Read", true),
            Err(ScopeProblem::Invalid)
        );
        assert_eq!(
            resource_of(
                "https://graph.microsoft.com/.default https://outlook.office365.com/.default",
                true
            ),
            Err(ScopeProblem::SeveralResources)
        );
        assert_eq!(
            resource_of(
                "https://graph.microsoft.com/.default https://graph.microsoft.com/Mail.Read",
                true
            ),
            Err(ScopeProblem::Invalid)
        );
        assert!(matches!(
            resource_of("https://contoso.example/.default", true),
            Err(ScopeProblem::Unknown(_))
        ));
        assert_eq!(
            resource_of("https://graph.microsoft.com", false).unwrap().1,
            GRAPH_RESOURCE
        );
    }

    #[test]
    fn form_decoding() {
        let f = url_decode_form(
            "scope=https%3A%2F%2Fgraph.microsoft.com%2F.default&client_secret=a%2Bb+c&x=%",
        );
        assert_eq!(f[0].1, "https://graph.microsoft.com/.default");
        assert_eq!(f[1].1, "a+b c");
        assert_eq!(f[2].1, "%");
    }
}
