//! The whole onboarding flow of the seed articles, through mailscope's API only, as a vendor
//! portal would drive it: a scope group, an app registration with consent and a secret, a
//! RestrictAccess policy, the access test, and a teardown in the only safe order.
use serde_json::{Value, json};

use crate::helpers::*;
use crate::scope_groups::{addr, create_group};

async fn call(
    env: &WithSandbox,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = env
        .app
        .http
        .request(method, env.url(path))
        .bearer_auth(env.app.admin());
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn onboard_restrict_verify_and_tear_down_a_vendor_app() {
    use reqwest::Method;
    let env = WithSandbox::start().await;

    let group = create_group(&env, "acme-scope", &["alice"]).await;
    assert_eq!(group["members"].as_array().unwrap().len(), 1);

    let (status, app) = call(
        &env,
        Method::PUT,
        "/applications/acme",
        Some(json!({"display_name": "ACME mail sync", "permissions": ["Mail.Read"], "grant_admin_consent": true})),
    )
    .await;
    assert_eq!(status, 201, "{app}");
    let app_id = app["app_id"].as_str().unwrap().to_string();

    let (status, secret) = call(
        &env,
        Method::POST,
        "/applications/acme/secrets",
        Some(json!({"display_name": "acme", "lifetime_days": 30})),
    )
    .await;
    assert_eq!(status, 201, "{secret}");
    assert!(
        secret["secret_text"]
            .as_str()
            .is_some_and(|s| s.len() >= 16)
    );

    let (status, policy) = call(
        &env,
        Method::POST,
        "/access-policies",
        Some(json!({"app_id": app_id, "scope": "acme-scope", "access_right": "RestrictAccess"})),
    )
    .await;
    assert_eq!(status, 201, "{policy}");
    let policy_id = policy["id"].as_str().unwrap().to_string();

    // The app's view lists its policy.
    let (status, view) = call(&env, Method::GET, "/applications/acme", None).await;
    assert_eq!(status, 200);
    assert_eq!(view["policies"][0]["id"], policy_id.as_str());
    assert_eq!(view["policies"][0]["access_right"], "RestrictAccess");

    // Exchange agrees at once: alice in scope, bob out.
    for (who, expected) in [("alice", "Granted"), ("bob", "Denied")] {
        let (status, t) = call(
            &env,
            Method::POST,
            "/access-tests",
            Some(json!({"app_id": app_id, "mailbox": addr(who)})),
        )
        .await;
        assert_eq!(status, 200, "{t}");
        assert_eq!(t["exchange"]["access_check_result"], expected, "{who}: {t}");
        assert_eq!(t["agree"], true, "{t}");
    }

    // Teardown: the app cannot be deleted while it has policies (forgetting it would strand them).
    let (status, p) = call(&env, Method::DELETE, "/applications/acme", None).await;
    assert_eq!(status, 409, "{p}");
    assert_eq!(p["code"], "application_has_policies");
    assert!(p["detail"].as_str().unwrap().contains(&policy_id));
    // Its last RestrictAccess policy needs the explicit acknowledgement.
    let (status, p) = call(
        &env,
        Method::DELETE,
        &format!("/access-policies/{policy_id}"),
        None,
    )
    .await;
    assert_eq!(status, 409, "{p}");
    let (status, _) = call(
        &env,
        Method::DELETE,
        &format!("/access-policies/{policy_id}?allow_unrestricted=true"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = call(&env, Method::DELETE, "/applications/acme", None).await;
    assert_eq!(status, 204);
    let (status, _) = call(&env, Method::DELETE, "/scope-groups/acme-scope", None).await;
    assert_eq!(status, 204);
}
