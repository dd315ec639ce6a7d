//! The simulated login endpoint: client secrets, certificate assertions, AADSTS errors, discovery.
#![allow(clippy::unwrap_used)]
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mailscope::sandbox::tokens::{pem_to_der, thumbprint_sha1, thumbprint_sha256};
use serde_json::json;

use crate::sandbox_helpers::*;

const CERT: &str = include_str!("sandbox_fixtures/test-app-cert.pem");
const KEY: &str = include_str!("sandbox_fixtures/test-app-key.pem");
const OTHER_CERT: &str = include_str!("sandbox_fixtures/other-cert.pem");
const OTHER_KEY: &str = include_str!("sandbox_fixtures/other-key.pem");

fn claims_of(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn secret_grant_issues_signed_tokens_per_resource() {
    let sb = Sb::fast().await;
    let id = sb.h.management_client_id();
    let g = sb.mgmt_token(GRAPH_SCOPE).await;
    let x = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let gc = claims_of(&g);
    let xc = claims_of(&x);
    assert_eq!(gc["aud"], "https://graph.microsoft.com");
    assert_eq!(xc["aud"], "https://outlook.office365.com");
    assert_eq!(gc["tid"], sb.tenant.as_str());
    assert_eq!(gc["appid"], id.as_str());
    assert!(
        gc["roles"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "Application.ReadWrite.All")
    );
    assert_eq!(xc["roles"], json!(["Exchange.ManageAsApp"]));
    assert!(gc["exp"].as_i64().unwrap() > gc["iat"].as_i64().unwrap());

    // The token verifies against the published JWKS.
    let jwks: jsonwebtoken::jwk::JwkSet =
        sb.c.get(sb.url(&format!("/{}/discovery/v2.0/keys", sb.tenant)))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let header = jsonwebtoken::decode_header(&g).unwrap();
    let jwk = jwks
        .find(header.kid.as_deref().unwrap())
        .expect("kid published");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(Algorithm::RS256);
    v.set_audience(&["https://graph.microsoft.com"]);
    jsonwebtoken::decode::<serde_json::Value>(&g, &key, &v).expect("signature verifies");
}

#[tokio::test]
async fn token_response_shape_and_domain_tenant() {
    let sb = Sb::fast().await;
    let secret = sb.h.management_client_secret();
    use secrecy::ExposeSecret;
    let id = sb.h.management_client_id();
    let r = sb
        .token_request(
            "contoso-sandbox.onmicrosoft.com",
            &[
                ("client_id", &id),
                ("client_secret", secret.expose_secret()),
                ("scope", GRAPH_SCOPE),
                ("grant_type", "client_credentials"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 3599);
    // HTTP Basic client authentication works too.
    let basic =
        sb.c.post(sb.url(&format!("/{}/oauth2/v2.0/token", sb.tenant)))
            .basic_auth(&id, Some(secret.expose_secret()))
            .form(&[("scope", GRAPH_SCOPE), ("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
    assert_eq!(basic.status(), 200);
}

#[tokio::test]
async fn aadsts_errors_for_bad_secret_unknown_app_expired_secret() {
    let sb = Sb::fast().await;
    let t = sb.tenant.clone();
    let id = sb.h.management_client_id();
    let bad = sb
        .token_request(
            &t,
            &[
                ("client_id", &id),
                ("client_secret", "nope"),
                ("scope", GRAPH_SCOPE),
                ("grant_type", "client_credentials"),
            ],
        )
        .await;
    assert_eq!(bad.status, 401);
    let v = bad.json();
    assert_eq!(v["error"], "invalid_client");
    assert_eq!(v["error_codes"], json!([7000215]));
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS7000215: ")
    );
    for k in ["timestamp", "trace_id", "correlation_id"] {
        assert!(v[k].is_string(), "{k}");
    }

    let unknown = "00000000-1111-2222-3333-444444444444";
    let r = sb
        .token_request(
            &t,
            &[
                ("client_id", unknown),
                ("client_secret", "x"),
                ("scope", GRAPH_SCOPE),
                ("grant_type", "client_credentials"),
            ],
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "unauthorized_client");
    assert_eq!(r.json()["error_codes"], json!([700016]));

    let (expired_id, expired_secret, _) = sb
        .new_app(json!({"displayName": "old", "secretExpired": true}))
        .await;
    let r = sb
        .token_request(
            &t,
            &[
                ("client_id", &expired_id),
                ("client_secret", &expired_secret),
                ("scope", GRAPH_SCOPE),
                ("grant_type", "client_credentials"),
            ],
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error_codes"], json!([7000222]));

    let r = sb
        .token_request(
            &t,
            &[
                ("client_id", &id),
                ("client_secret", "x"),
                ("scope", "https://graph.microsoft.com/Mail.Read"),
                ("grant_type", "client_credentials"),
            ],
        )
        .await;
    assert_eq!(r.json()["error"], "invalid_scope");
    let r = sb
        .token_request(
            &t,
            &[
                ("client_id", &id),
                ("client_secret", "x"),
                ("scope", "https://contoso.example/.default"),
                ("grant_type", "client_credentials"),
            ],
        )
        .await;
    assert_eq!(r.json()["error_codes"], json!([500011]));
    let r = sb
        .token_request(
            "no-such-tenant.onmicrosoft.com",
            &[
                ("client_id", &id),
                ("client_secret", "x"),
                ("scope", GRAPH_SCOPE),
                ("grant_type", "client_credentials"),
            ],
        )
        .await;
    assert_eq!(r.json()["error_codes"], json!([90002]));
    let r = sb
        .token_request(
            &t,
            &[
                ("client_id", &id),
                ("scope", GRAPH_SCOPE),
                ("grant_type", "client_credentials"),
            ],
        )
        .await;
    assert_eq!(r.json()["error_codes"], json!([7000218]));
}

fn assertion(
    key_pem: &str,
    cert_pem: &str,
    client_id: &str,
    aud: &str,
    sha256: bool,
    exp_offset: i64,
) -> String {
    let der = pem_to_der(cert_pem).unwrap();
    let mut h = Header::new(if sha256 {
        Algorithm::PS256
    } else {
        Algorithm::RS256
    });
    if sha256 {
        h.x5t_s256 = Some(thumbprint_sha256(&der));
    } else {
        h.x5t = Some(thumbprint_sha1(&der));
    }
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"aud": aud, "iss": client_id, "sub": client_id, "jti": uuid::Uuid::new_v4().to_string(),
        "nbf": now, "iat": now, "exp": now + exp_offset});
    jsonwebtoken::encode(
        &h,
        &claims,
        &EncodingKey::from_rsa_pem(key_pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn certificate_assertions_are_verified() {
    let sb = Sb::fast().await;
    let t = sb.tenant.clone();
    let r = sb
        .control(
            "POST",
            &format!("tenants/{t}/credentials"),
            Some(json!({"displayName": "cert app", "noSecret": true,
            "graphPermissions": ["User.Read.All"], "certificatePem": CERT})),
        )
        .await;
    assert_eq!(r.status, 201);
    let id = r.json()["clientId"].as_str().unwrap().to_string();
    let aud = sb.url(&format!("/{t}/oauth2/v2.0/token"));
    let post = |a: String| {
        let sb = &sb;
        let id = id.clone();
        let t = t.clone();
        async move {
            sb.token_request(
                &t,
                &[
                    ("client_id", id.as_str()),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", a.as_str()),
                    ("scope", GRAPH_SCOPE),
                    ("grant_type", "client_credentials"),
                ],
            )
            .await
        }
    };
    // PS256 with x5t#S256 (current docs) and RS256 with x5t (older docs) both work.
    let ok = post(assertion(KEY, CERT, &id, &aud, true, 600)).await;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.bytes));
    assert_eq!(
        claims_of(ok.json()["access_token"].as_str().unwrap())["appidacr"],
        "2"
    );
    assert_eq!(
        post(assertion(KEY, CERT, &id, &aud, false, 600))
            .await
            .status,
        200
    );
    // Unregistered certificate, wrong key for the registered thumbprint, wrong audience, expired.
    let r = post(assertion(OTHER_KEY, OTHER_CERT, &id, &aud, true, 600)).await;
    assert_eq!(r.json()["error_codes"], json!([700027]));
    assert!(
        r.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("not registered")
    );
    let forged = {
        let der = pem_to_der(CERT).unwrap();
        let mut h = Header::new(Algorithm::RS256);
        h.x5t = Some(thumbprint_sha1(&der));
        let now = chrono::Utc::now().timestamp();
        jsonwebtoken::encode(
            &h,
            &json!({"aud": aud, "iss": id, "sub": id, "nbf": now, "exp": now + 600}),
            &EncodingKey::from_rsa_pem(OTHER_KEY.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let r = post(forged).await;
    assert_eq!(
        (r.status, r.json()["error_codes"].clone()),
        (401, json!([700027]))
    );
    let r = post(assertion(
        KEY,
        CERT,
        &id,
        "https://example.com/token",
        true,
        600,
    ))
    .await;
    assert_eq!(r.status, 401);
    let r = post(assertion(KEY, CERT, &id, &aud, true, -3600)).await;
    assert_eq!(r.json()["error_codes"], json!([700024]));
    let r = post(assertion(KEY, CERT, CRM_APP_ID, &aud, true, 600)).await;
    assert_eq!(r.json()["error_codes"], json!([700021]));
}

#[tokio::test]
async fn discovery_documents_point_back_at_the_sandbox() {
    let sb = Sb::fast().await;
    let cfg: serde_json::Value =
        sb.c.get(sb.url(&format!(
            "/{}/v2.0/.well-known/openid-configuration",
            sb.tenant
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        cfg["token_endpoint"],
        sb.url(&format!("/{}/oauth2/v2.0/token", sb.tenant))
    );
    assert_eq!(cfg["issuer"], sb.url(&format!("/{}/v2.0", sb.tenant)));
    assert!(
        cfg["jwks_uri"]
            .as_str()
            .unwrap()
            .ends_with("/discovery/v2.0/keys")
    );
    let r =
        sb.c.get(sb.url("/nonexistent.onmicrosoft.com/v2.0/.well-known/openid-configuration"))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 400);
    let disc: serde_json::Value = sb
        .c
        .get(sb.url("/common/discovery/instance?api-version=1.1&authorization_endpoint=https://x/abc/oauth2/v2.0/authorize"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        disc["tenant_discovery_endpoint"]
            .as_str()
            .unwrap()
            .ends_with("/abc/v2.0/.well-known/openid-configuration")
    );
}

#[tokio::test]
async fn tokens_expire_on_the_sandbox_clock() {
    let sb = Sb::fast().await;
    let g = sb.mgmt_token(GRAPH_SCOPE).await;
    assert_eq!(sb.graph(&g, "GET", "organization", None).await.status, 200);
    sb.h.advance_clock(std::time::Duration::from_secs(3600));
    let r = sb.graph(&g, "GET", "organization", None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "InvalidAuthenticationToken");
}

/// The token endpoint's documented error shapes (Microsoft Entra error code reference; client
/// credentials flow; docs/microsoft-365.md §8.5).
#[tokio::test]
async fn token_endpoint_errors_follow_microsofts_error_reference() {
    use secrecy::ExposeSecret;
    let sb = Sb::fast().await;
    let id = sb.h.management_client_id();
    let secret = sb.h.management_client_secret().expose_secret().to_string();
    let form = |scope: &'static str| {
        vec![
            ("client_id".to_string(), id.clone()),
            ("client_secret".to_string(), secret.clone()),
            ("scope".to_string(), scope.to_string()),
            ("grant_type".to_string(), "client_credentials".to_string()),
        ]
    };
    let post = |tenant: String, form: Vec<(String, String)>, request_id: Option<&'static str>| {
        let mut req =
            sb.c.post(sb.url(&format!("/{tenant}/oauth2/v2.0/token")))
                .form(&form);
        if let Some(r) = request_id {
            req = req.header("client-request-id", r);
        }
        async move {
            let r = req.send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    // One scope naming two resources: one token cannot have two audiences.
    let (status, e) = post(
        sb.tenant.clone(),
        form("https://graph.microsoft.com/.default https://outlook.office365.com/.default"),
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(e["error"], "invalid_scope");
    assert_eq!(e["error_codes"], json!([700022]));
    // The description's lines are separated by \r\n and repeat the ids and the time.
    let d = e["error_description"].as_str().unwrap();
    let lines: Vec<&str> = d.split("\r\n").collect();
    assert_eq!(lines.len(), 4, "{d:?}");
    assert!(lines[0].starts_with("AADSTS700022: "), "{d:?}");
    assert_eq!(
        lines[1],
        format!("Trace ID: {}", e["trace_id"].as_str().unwrap())
    );
    assert_eq!(
        lines[2],
        format!("Correlation ID: {}", e["correlation_id"].as_str().unwrap())
    );
    assert_eq!(
        lines[3],
        format!("Timestamp: {}", e["timestamp"].as_str().unwrap())
    );
    // correlation_id echoes the caller's client-request-id; the trace id is Entra's own.
    let mine = "0f3c6e1d-5b2a-4c8e-9d7f-1a2b3c4d5e6f";
    let mut wrong = form("https://graph.microsoft.com/.default");
    wrong[1].1 = "not-the-secret".into();
    let (status, e) = post(sb.tenant.clone(), wrong, Some(mine)).await;
    assert_eq!(status, 401);
    assert_eq!(e["correlation_id"], mine);
    assert_ne!(e["trace_id"], mine);
    // Client credentials need a tenant: /common is AADSTS9001023.
    let (status, e) = post(
        "common".into(),
        form("https://graph.microsoft.com/.default"),
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(e["error_codes"], json!([9001023]));
    // The token endpoint takes POST only.
    let r =
        sb.c.get(sb.url(&format!("/{}/oauth2/v2.0/token", sb.tenant)))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error_codes"], json!([900561]));
}

/// Throttled client-credential requests: 429 with `Retry-After`, and a body that is not JSON
/// (MSAL.NET "Client and server throttling"; docs/microsoft-365.md §8.5).
#[tokio::test]
async fn throttled_token_requests_answer_429_with_retry_after() {
    let mut s = mailscope::sandbox::SandboxSettings::fast();
    s.pacing.login_budget = Some(mailscope::sandbox::settings::Budget {
        limit: 1,
        window: std::time::Duration::from_secs(60),
    });
    let sb = Sb::start(s).await;
    sb.crm_token().await;
    let r = sb
        .token_request(
            &sb.tenant,
            &[
                ("client_id", CRM_APP_ID),
                ("client_secret", CRM_SECRET),
                ("scope", GRAPH_SCOPE),
                ("grant_type", "client_credentials"),
            ],
        )
        .await;
    assert_eq!(r.status, 429);
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert!(serde_json::from_slice::<serde_json::Value>(&r.bytes).is_err());
}
