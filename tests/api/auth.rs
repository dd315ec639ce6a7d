//! Authentication and authorization as a caller experiences them.
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

fn claims(iss: &str, aud: &str, exp_offset: i64) -> serde_json::Value {
    let now = chrono::Utc::now().timestamp();
    json!({"iss": iss, "aud": aud, "sub": "u1", "exp": now + exp_offset, "nbf": now - 5,
           "roles": ["MailScope.Admin"], "mailscope_tenants": "*"})
}

fn hs(claims: &serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn rs(claims: &serde_json::Value, pem: &str, kid: &str) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(
        &h,
        claims,
        &EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

async fn get_tenants(app: &TestApp, token: Option<&str>) -> reqwest::Response {
    let api = match token {
        Some(t) => app.api().with_token(t),
        None => app.api().anonymous(),
    };
    api.send(Method::GET, "/v1/tenants", None).await
}

#[tokio::test]
async fn valid_token_is_accepted() {
    let app = spawn_app().await;
    let res = get_tenants(&app, Some(&app.admin())).await;
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn missing_and_malformed_tokens_get_401_with_challenge() {
    let app = spawn_app().await;
    for token in [None, Some("not-a-jwt"), Some("")] {
        let res = get_tenants(&app, token).await;
        assert_eq!(
            res.headers().get("www-authenticate").unwrap(),
            "Bearer error=\"invalid_token\""
        );
        assert_problem(res, 401, "unauthenticated").await;
    }
}

#[tokio::test]
async fn expired_wrong_audience_wrong_issuer_bad_signature_and_future_nbf_are_rejected() {
    let app = spawn_app().await;
    let s = &app.settings.auth;
    let mut not_yet = claims(&s.issuer, &s.audience, 600);
    not_yet["nbf"] = json!(chrono::Utc::now().timestamp() + 3600);
    let cases = [
        (
            hs(&claims(&s.issuer, &s.audience, -3600), HS_SECRET),
            "expired",
        ),
        (
            hs(&claims(&s.issuer, "someone-else", 600), HS_SECRET),
            "audience",
        ),
        (
            hs(&claims("https://evil.example", &s.audience, 600), HS_SECRET),
            "issuer",
        ),
        (
            hs(
                &claims(&s.issuer, &s.audience, 600),
                "another-secret-0123456789-0123456789",
            ),
            "signature",
        ),
        (hs(&not_yet, HS_SECRET), "not valid yet"),
    ];
    for (token, why) in cases {
        let body = assert_problem(
            get_tenants(&app, Some(&token)).await,
            401,
            "unauthenticated",
        )
        .await;
        assert!(
            body["detail"].as_str().unwrap().contains(why),
            "{why}: {body}"
        );
    }
}

#[tokio::test]
async fn alg_none_is_rejected() {
    use base64::Engine;
    let app = spawn_app().await;
    let s = &app.settings.auth;
    let enc = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    };
    let token = format!(
        "{}.{}.",
        enc(&json!({"alg": "none", "typ": "JWT"})),
        enc(&claims(&s.issuer, &s.audience, 600))
    );
    assert_problem(
        get_tenants(&app, Some(&token)).await,
        401,
        "unauthenticated",
    )
    .await;
}

#[tokio::test]
async fn rs256_token_is_refused_when_configured_for_hs256() {
    let app = spawn_app().await;
    let s = &app.settings.auth;
    let token = rs(
        &claims(&s.issuer, &s.audience, 600),
        include_str!("../fixtures/rsa1.pem"),
        "key-1",
    );
    assert_problem(
        get_tenants(&app, Some(&token)).await,
        401,
        "unauthenticated",
    )
    .await;
}

#[tokio::test]
async fn missing_role_is_403_and_read_cannot_write() {
    let app = spawn_app().await;
    let none = app.token(&[], &["*"]);
    let body = assert_problem(get_tenants(&app, Some(&none)).await, 403, "forbidden").await;
    assert!(body["detail"].as_str().unwrap().contains("MailScope.Read"));

    let reader = app.token(&["MailScope.Read"], &["*"]);
    app.api()
        .with_token(reader)
        .put(
            "/v1/tenants/0b1c6a36-6b53-4bcb-8e56-0d4f5c7f3a11",
            &tenant_body("x"),
            (403, "forbidden"),
        )
        .await;
}

#[tokio::test]
async fn foreign_tenant_looks_exactly_like_an_unknown_one() {
    let app = spawn_app().await;
    let mine = "11111111-1111-4111-8111-111111111111";
    let theirs = "22222222-2222-4222-8222-222222222222";
    for t in [mine, theirs] {
        app.api()
            .put(&format!("/v1/tenants/{t}"), &tenant_body("x"), 201)
            .await;
    }
    let reader = app
        .api()
        .with_token(app.token(&["MailScope.Read"], &[mine]));
    reader.get(&format!("/v1/tenants/{mine}"), 200).await;
    let not_found = (404, "not_found");
    let foreign = reader
        .get(&format!("/v1/tenants/{theirs}"), not_found)
        .await;
    let unknown_id = "33333333-3333-4333-8333-333333333333";
    let unknown = reader
        .get(&format!("/v1/tenants/{unknown_id}"), not_found)
        .await;
    assert_eq!(
        foreign["detail"].as_str().unwrap().replace(theirs, "X"),
        unknown["detail"].as_str().unwrap().replace(unknown_id, "X")
    );
    // The list shows only the visible tenant, and audit events of the other stay hidden.
    let list = reader.get("/v1/tenants", 200).await;
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tenant_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![mine]);
    let audit = format!("/v1/tenants/{theirs}/audit-events");
    reader.get(&audit, not_found).await;
}

fn jwk(name: &str) -> serde_json::Value {
    let text = match name {
        "rsa1" => include_str!("../fixtures/rsa1.jwk.json"),
        "rsa2" => include_str!("../fixtures/rsa2.jwk.json"),
        _ => include_str!("../fixtures/ec1.jwk.json"),
    };
    serde_json::from_str(text).unwrap()
}

async fn jwks_app(idp: &MockServer, min_refresh: u64) -> TestApp {
    let url = format!("{}/keys", idp.uri());
    spawn_app_with(move |s| {
        s.auth.hs256_secret = None;
        s.auth.jwks_url = Some(url);
        s.auth.issuer = "https://idp.example/".into();
        s.auth.jwks_min_refresh_seconds = min_refresh;
    })
    .await
}

async fn serve_keys(idp: &MockServer, keys: &[&str]) {
    idp.reset().await;
    let set = json!({"keys": keys.iter().map(|k| jwk(k)).collect::<Vec<_>>()});
    Mock::given(method("GET"))
        .and(path("/keys"))
        .respond_with(ResponseTemplate::new(200).set_body_json(set))
        .mount(idp)
        .await;
}

#[tokio::test]
async fn jwks_keys_rs256_and_es256_accepted_and_hs_confusion_refused() {
    let idp = MockServer::start().await;
    serve_keys(&idp, &["rsa1", "ec1"]).await;
    let app = jwks_app(&idp, 0).await;
    let c = claims("https://idp.example/", "mailscope", 600);
    let token = rs(&c, include_str!("../fixtures/rsa1.pem"), "key-1");
    assert_eq!(get_tenants(&app, Some(&token)).await.status(), 200);

    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("ec-1".into());
    let es = jsonwebtoken::encode(
        &h,
        &c,
        &EncodingKey::from_ec_pem(include_bytes!("../fixtures/ec1.p8.pem")).unwrap(),
    )
    .unwrap();
    assert_eq!(get_tenants(&app, Some(&es)).await.status(), 200);

    // The classic confusion attack: HMAC-sign with the public key as the secret.
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("key-1".into());
    let forged = jsonwebtoken::encode(
        &h,
        &c,
        &EncodingKey::from_secret(include_bytes!("../fixtures/rsa1.pub.pem")),
    )
    .unwrap();
    assert_problem(
        get_tenants(&app, Some(&forged)).await,
        401,
        "unauthenticated",
    )
    .await;
}

#[tokio::test]
async fn jwks_rotation_is_picked_up_and_cache_survives_idp_outage() {
    let idp = MockServer::start().await;
    serve_keys(&idp, &["rsa1"]).await;
    let app = jwks_app(&idp, 0).await;
    let c = claims("https://idp.example/", "mailscope", 600);
    let old = rs(&c, include_str!("../fixtures/rsa1.pem"), "key-1");
    let new = rs(&c, include_str!("../fixtures/rsa2.pem"), "key-2");
    assert_eq!(get_tenants(&app, Some(&old)).await.status(), 200);
    assert_eq!(
        get_tenants(&app, Some(&new)).await.status(),
        401,
        "key-2 not published yet"
    );

    // The IdP rotates: key-2 appears; an unknown kid triggers a refetch.
    serve_keys(&idp, &["rsa1", "rsa2"]).await;
    assert_eq!(get_tenants(&app, Some(&new)).await.status(), 200);

    // The IdP goes down: cached keys keep working.
    idp.reset().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&idp)
        .await;
    assert_eq!(get_tenants(&app, Some(&old)).await.status(), 200);
    assert_eq!(get_tenants(&app, Some(&new)).await.status(), 200);
}

#[tokio::test]
async fn unknown_kids_do_not_hammer_the_idp() {
    let idp = MockServer::start().await;
    serve_keys(&idp, &["rsa1"]).await;
    let app = jwks_app(&idp, 3600).await;
    let fetches_at_start = idp.received_requests().await.unwrap().len();
    let c = claims("https://idp.example/", "mailscope", 600);
    let unknown = rs(&c, include_str!("../fixtures/rsa2.pem"), "key-2");
    for _ in 0..5 {
        assert_eq!(get_tenants(&app, Some(&unknown)).await.status(), 401);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fetches = idp.received_requests().await.unwrap().len() - fetches_at_start;
    // The warm-up fetch happened within the refresh interval, so no refetch is allowed.
    assert_eq!(
        fetches, 0,
        "unknown kids must not trigger refetches within the interval"
    );
}
