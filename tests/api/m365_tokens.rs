//! Token acquisition: caching, single flight, refresh, AADSTS mapping and the certificate
//! client assertion, against a mock token endpoint over real HTTP.
use crate::m365_support::*;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use mailscope::domain::credential::ManagementCredential;
use mailscope::m365::{AssertionAlgorithm, ErrorKind, M365Settings, TokenResource};
use secrecy::SecretString;
use std::time::Duration;
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const CERT: &str = include_str!("fixtures/m365_test_cert.pem");
const KEY_PKCS8: &str = include_str!("fixtures/m365_test_key.pem");
const KEY_PKCS1: &str = include_str!("fixtures/m365_test_key_pkcs1.pem");
const PUBLIC_KEY: &str = include_str!("fixtures/m365_test_pub.pem");

#[tokio::test]
async fn concurrent_callers_share_one_token_request() {
    let server = MockServer::start().await;
    // Slow answer so all callers are waiting while the one request is in flight.
    Mock::given(method("POST"))
        .and(path(format!("/{TENANT}/oauth2/v2.0/token")))
        .and(body_string_contains(
            "scope=https%3A%2F%2Fgraph.microsoft.com%2F.default",
        ))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(token_body(3599))
                .set_delay(Duration::from_millis(300)),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("/{TENANT}/oauth2/v2.0/token")))
        .and(body_string_contains(
            "scope=https%3A%2F%2Foutlook.office365.com%2F.default",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body(3599)))
        .expect(1)
        .mount(&server)
        .await;
    let t = tenant(&server);
    let calls = (0..16).map(|_| {
        let t = t.clone();
        tokio::spawn(async move { t.token(TokenResource::Graph).await })
    });
    for r in futures_util::future::join_all(calls).await {
        let tok = r.unwrap().unwrap();
        assert_eq!(tok.tenant_guid(), Some(TENANT));
    }
    // Cached afterwards; the Exchange resource has its own token.
    t.token(TokenResource::Graph).await.unwrap();
    t.token(TokenResource::Exchange).await.unwrap();
    t.token(TokenResource::Exchange).await.unwrap();
}

#[tokio::test]
async fn client_secret_request_has_the_documented_form() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/{TENANT}/oauth2/v2.0/token")))
        .and(body_string_contains("grant_type=client_credentials"))
        .and(body_string_contains(format!("client_id={CLIENT_ID}")))
        // The secret is form-encoded, not sent raw.
        .and(body_string_contains(
            "client_secret=s3cr3t%7Evalue%2Bwith%2Fodd%3Dchars",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body(3599)))
        .expect(1)
        .mount(&server)
        .await;
    tenant(&server).token(TokenResource::Graph).await.unwrap();
}

#[tokio::test]
async fn token_is_refreshed_before_it_expires() {
    let server = MockServer::start().await;
    // 200 s left is inside the 300 s refresh skew: every call refreshes.
    Mock::given(method("POST"))
        .and(path(format!("/{TENANT}/oauth2/v2.0/token")))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body(200)))
        .expect(2)
        .mount(&server)
        .await;
    let t = tenant(&server);
    t.token(TokenResource::Graph).await.unwrap();
    t.token(TokenResource::Graph).await.unwrap();
}

#[tokio::test]
async fn failed_early_refresh_keeps_the_still_valid_token() {
    let server = MockServer::start().await;
    let script = Script::new(|_, n| {
        if n == 0 {
            json(200, token_body(200))
        } else {
            json(503, serde_json::json!({}))
        }
    });
    Mock::given(method("POST"))
        .and(path(format!("/{TENANT}/oauth2/v2.0/token")))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    let t = tenant_with(
        &server,
        M365Settings {
            max_attempts: 2,
            ..fast_settings()
        },
    );
    let first = t.token(TokenResource::Graph).await.unwrap();
    let second = t
        .token(TokenResource::Graph)
        .await
        .expect("falls back to the cached token");
    assert_eq!(
        format!("{first:?}").contains("tenant_guid"),
        format!("{second:?}").contains("tenant_guid")
    );
    // One initial fetch plus two refresh attempts (max_attempts = 2).
    assert_eq!(script.hits().len(), 3);
}

#[tokio::test]
async fn aadsts_errors_become_actionable_kinds_and_are_not_retried() {
    let cases = [
        (
            401,
            7000215,
            "invalid_client",
            ErrorKind::InvalidClientSecret,
            "Secret ID",
        ),
        (
            401,
            7000222,
            "invalid_client",
            ErrorKind::ClientSecretExpired,
            "new client secret",
        ),
        (
            400,
            700016,
            "unauthorized_client",
            ErrorKind::AppNotFoundInTenant,
            "admin consent",
        ),
        (
            400,
            65001,
            "invalid_grant",
            ErrorKind::ConsentMissing,
            "admin consent",
        ),
        (
            400,
            500011,
            "invalid_resource",
            ErrorKind::ResourceNotInTenant,
            "Exchange Online",
        ),
        (
            400,
            90002,
            "invalid_request",
            ErrorKind::TenantNotFound,
            "cloud setting",
        ),
    ];
    for (status, code, error, kind, fix_words) in cases {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(format!("/{TENANT}/oauth2/v2.0/token")))
            .respond_with(ResponseTemplate::new(status).set_body_json(serde_json::json!({
                "error": error,
                "error_description": format!("AADSTS{code}: something happened.\r\nTrace ID: 1\r\nCorrelation ID: 2"),
                "error_codes": [code],
                "trace_id": "trace-1",
                "correlation_id": "corr-1"
            })))
            .expect(1)
            .mount(&server)
            .await;
        let err = tenant(&server)
            .token(TokenResource::Exchange)
            .await
            .unwrap_err();
        assert_eq!(*err.kind(), kind, "AADSTS{code}");
        assert_eq!(err.remote_code(), Some(format!("AADSTS{code}").as_str()));
        assert!(err.fix().contains(fix_words), "{code}: {}", err.fix());
        let shown = format!("{err} {err:?} {} {}", err.cause(), err.fix());
        assert!(!shown.contains(SECRET), "secret leaked: {shown}");
    }
}

fn decode_assertion(body: &[u8]) -> (jsonwebtoken::Header, serde_json::Value) {
    let form = String::from_utf8(body.to_vec()).unwrap();
    assert!(form.contains(
        "client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"
    ));
    assert!(!form.contains("client_secret"));
    let jwt = form
        .split('&')
        .find_map(|kv| kv.strip_prefix("client_assertion="))
        .unwrap()
        .to_string();
    let header = jsonwebtoken::decode_header(&jwt).unwrap();
    let mut v = Validation::new(header.alg);
    v.validate_aud = false;
    let key = DecodingKey::from_rsa_pem(PUBLIC_KEY.as_bytes()).unwrap();
    let data = jsonwebtoken::decode::<serde_json::Value>(&jwt, &key, &v)
        .expect("signature verifies with the certificate's key");
    (header, data.claims)
}

async fn assertion_for(
    key_pem: &str,
    alg: AssertionAlgorithm,
) -> (jsonwebtoken::Header, serde_json::Value, String) {
    let server = MockServer::start().await;
    let script = Script::new(|_, _| json(200, token_body(3599)));
    Mock::given(method("POST"))
        .and(path(format!("/{TENANT}/oauth2/v2.0/token")))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    let (c, _) = client(M365Settings {
        client_assertion_algorithm: alg,
        ..fast_settings()
    });
    let cred = ManagementCredential::Certificate {
        client_id: CLIENT_ID.into(),
        certificate_pem: CERT.into(),
        private_key_pem: SecretString::from(key_pem),
    };
    c.tenant(context(&server, TENANT, cred))
        .token(TokenResource::Graph)
        .await
        .unwrap();
    let hits = script.hits();
    assert_eq!(hits.len(), 1);
    let (h, claims) = decode_assertion(&hits[0].body);
    (
        h,
        claims,
        format!("{}/{TENANT}/oauth2/v2.0/token", server.uri()),
    )
}

#[tokio::test]
async fn certificate_assertion_has_thumbprints_claims_and_a_valid_signature() {
    let (h, claims, token_url) = assertion_for(KEY_PKCS8, AssertionAlgorithm::PS256).await;
    assert_eq!(h.alg, Algorithm::PS256);
    assert_eq!(h.typ.as_deref(), Some("JWT"));
    // Computed independently with `openssl x509 -outform DER | openssl dgst` (fixtures/README.txt).
    assert_eq!(h.x5t.as_deref(), Some("pNCpsj65hvfKdSc7pIsweBlRTHo"));
    assert_eq!(
        h.x5t_s256.as_deref(),
        Some("_B1tnKO2J9gVMWBnrOrYvWpXxSz5uectVTrgcLOpW2A")
    );
    assert_eq!(claims["aud"], token_url);
    assert_eq!(claims["iss"], CLIENT_ID);
    assert_eq!(claims["sub"], CLIENT_ID);
    assert!(uuid::Uuid::parse_str(claims["jti"].as_str().unwrap()).is_ok());
    let (nbf, exp) = (
        claims["nbf"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert!((300..=600).contains(&(exp - nbf)), "lifetime {}", exp - nbf);
}

#[tokio::test]
async fn rs256_and_pkcs1_keys_are_supported() {
    let (h, _, _) = assertion_for(KEY_PKCS1, AssertionAlgorithm::RS256).await;
    assert_eq!(h.alg, Algorithm::RS256);
    assert_eq!(h.x5t.as_deref(), Some("pNCpsj65hvfKdSc7pIsweBlRTHo"));
}

#[tokio::test]
async fn unusable_private_key_is_a_configuration_error_without_key_material() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, Some(0)).await;
    let (c, _) = client(fast_settings());
    let bogus = "-----BEGIN PRIVATE KEY-----\nbm90LWEta2V5LXNlY3JldC1tYXRlcmlhbA==\n-----END PRIVATE KEY-----\n";
    let cred = ManagementCredential::Certificate {
        client_id: CLIENT_ID.into(),
        certificate_pem: CERT.into(),
        private_key_pem: SecretString::from(bogus),
    };
    let err = c
        .tenant(context(&server, TENANT, cred))
        .token(TokenResource::Graph)
        .await
        .unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::InvalidConfiguration);
    assert!(!format!("{err} {err:?}").contains("bm90LWEta2V5"));
}
