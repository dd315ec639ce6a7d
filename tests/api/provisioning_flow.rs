//! The whole onboarding flow of the seed articles, through mailscope's API only, as a vendor
//! portal would drive it: a scope group, an app registration with consent and a secret, a
//! RestrictAccess policy, the access test, and a teardown in the only safe order.
use serde_json::json;

use crate::helpers::*;
use crate::scope_groups::{addr, create_group};

#[tokio::test]
async fn onboard_restrict_verify_and_tear_down_a_vendor_app() {
    let env = WithSandbox::start().await;
    let api = env.api();

    let group = create_group(&env, "acme-scope", &["alice"]).await;
    assert_eq!(group["members"].as_array().unwrap().len(), 1);

    let body = json!({"display_name": "ACME mail sync", "permissions": ["Mail.Read"], "grant_admin_consent": true});
    let app = api.put("/applications/acme", &body, 201).await;
    let app_id = app["app_id"].as_str().unwrap().to_string();

    let body = json!({"display_name": "acme", "lifetime_days": 30});
    let secret = api.post("/applications/acme/secrets", &body, 201).await;
    assert!(
        secret["secret_text"]
            .as_str()
            .is_some_and(|s| s.len() >= 16)
    );

    let body = json!({"app_id": app_id, "scope": "acme-scope", "access_right": "RestrictAccess"});
    let policy = api.post("/access-policies", &body, 201).await;
    let policy_id = policy["id"].as_str().unwrap().to_string();

    // The app's view lists its policy.
    let view = api.get("/applications/acme", 200).await;
    assert_eq!(view["policies"][0]["id"], policy_id.as_str());
    assert_eq!(view["policies"][0]["access_right"], "RestrictAccess");

    // Exchange agrees at once: alice in scope, bob out.
    for (who, expected) in [("alice", "Granted"), ("bob", "Denied")] {
        let body = json!({"app_id": app_id, "mailbox": addr(who)});
        let t = api.post("/access-tests", &body, 200).await;
        assert_eq!(t["exchange"]["access_check_result"], expected, "{who}: {t}");
        assert_eq!(t["agree"], true, "{t}");
    }

    // Teardown: the app cannot be deleted while it has policies (forgetting it would strand them).
    let p = api
        .delete("/applications/acme", (409, "application_has_policies"))
        .await;
    assert!(p["detail"].as_str().unwrap().contains(&policy_id));
    // Its last RestrictAccess policy needs the explicit acknowledgement.
    let policy_path = format!("/access-policies/{policy_id}");
    api.delete(&policy_path, 409).await;
    let acknowledged = format!("{policy_path}?allow_unrestricted=true");
    api.delete(&acknowledged, 204).await;
    api.delete("/applications/acme", 204).await;
    api.delete("/scope-groups/acme-scope", 204).await;
}
