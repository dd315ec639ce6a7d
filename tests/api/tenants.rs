//! Registering tenants: idempotent PUT, encryption at rest, visibility, deletion, audit trail.
use serde_json::json;

use crate::helpers::*;

const TID: &str = "0b1c6a36-6b53-4bcb-8e56-0d4f5c7f3a11";

async fn put(
    app: &TestApp,
    id: &str,
    body: &serde_json::Value,
    expect: impl Into<Expect<'_>>,
) -> serde_json::Value {
    app.api()
        .put(&format!("/v1/tenants/{id}"), body, expect)
        .await
}

async fn audit(app: &TestApp, id: &str, q: &str) -> serde_json::Value {
    app.api()
        .get(&format!("/v1/tenants/{id}/audit-events{q}"), 200)
        .await
}

#[tokio::test]
async fn put_is_idempotent_and_audited_only_on_change() {
    let app = spawn_app().await;
    let body = tenant_body("first-secret-value");
    let created = put(&app, TID, &body, 201).await;
    assert_eq!(created["credentials"]["kind"], "client_secret");
    assert_eq!(
        created["canary_mailboxes"],
        json!(["ceo@contoso.onmicrosoft.com"])
    );

    let again = put(&app, TID, &body, 200).await;
    assert_eq!(
        again["updated_at"], created["updated_at"],
        "unchanged PUT writes nothing"
    );
    assert_eq!(
        audit(&app, TID, "").await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A new secret is a change, reported by field name only.
    put(&app, TID, &tenant_body("second-secret-value"), 200).await;
    let events = audit(&app, TID, "").await;
    let items = events["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["action"], "tenant.updated");
    assert_eq!(items[0]["details"]["changed"], json!(["credentials"]));
    assert_eq!(items[0]["actor"]["subject"], "tester");
    assert!(!events.to_string().contains("second-secret-value"));
    assert_eq!(items[1]["action"], "tenant.registered");
}

#[tokio::test]
async fn secrets_are_encrypted_at_rest_and_never_returned() {
    let app = spawn_app().await;
    let secret = "Zq8~unmistakable-client-secret-4711";
    put(&app, TID, &tenant_body(secret), 201).await;

    let api = app.api();
    let text = api
        .get(&format!("/v1/tenants/{TID}"), 200)
        .await
        .to_string();
    assert!(!text.contains(secret));
    let list = api.get("/v1/tenants", 200).await.to_string();
    assert!(!list.contains(secret));

    let db = app.db.client().await;
    let row = db
        .query_one("SELECT t::text, credential_ciphertext FROM tenants t", &[])
        .await
        .unwrap();
    let as_text: String = row.get(0);
    let bytes: Vec<u8> = row.get(1);
    assert!(!as_text.contains(secret), "row text has the secret");
    assert!(
        !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "ciphertext has the secret bytes"
    );
    assert!(
        bytes.len() > secret.len(),
        "the credential is stored, sealed"
    );
}

#[tokio::test]
async fn certificate_credentials_are_accepted_and_checked() {
    let app = spawn_app().await;
    let mut body = tenant_body("unused");
    body["credentials"] = json!({
        "client_id": "6f1d7c55-2b1e-4d2a-9c65-8f3a1c2b4d5e",
        "certificate_pem": include_str!("../fixtures/rsa1.crt.pem"),
        "private_key_pem": include_str!("../fixtures/rsa1.pem"),
    });
    let t = put(&app, TID, &body, 201).await;
    assert_eq!(t["credentials"]["kind"], "certificate");
    assert!(!t.to_string().contains("PRIVATE KEY"));

    body["credentials"]["private_key_pem"] =
        json!("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----");
    let p = put(&app, TID, &body, (422, "validation_failed")).await;
    assert_eq!(p["errors"][0]["field"], "credentials.private_key_pem");
}

#[tokio::test]
async fn list_paginates_and_delete_keeps_the_audit_trail() {
    let app = spawn_app().await;
    let ids = [
        "10000000-0000-4000-8000-000000000001",
        "10000000-0000-4000-8000-000000000002",
        "10000000-0000-4000-8000-000000000003",
    ];
    for id in ids {
        put(&app, id, &tenant_body("s"), 201).await;
    }
    let page1: serde_json::Value = app.api().get("/v1/tenants?limit=2", 200).await;
    assert_eq!(page1["items"].as_array().unwrap().len(), 2);
    let cursor = page1["next_after"].as_str().unwrap();
    let page2: serde_json::Value = app
        .api()
        .get(&format!("/v1/tenants?limit=2&after={cursor}"), 200)
        .await;
    assert_eq!(page2["items"][0]["tenant_id"], ids[2]);
    assert!(page2["next_after"].is_null());

    let (api, first) = (app.api(), format!("/v1/tenants/{}", ids[0]));
    api.delete(&first, 204).await;
    api.get(&first, (404, "not_found")).await;
    api.delete(&first, (404, "not_found")).await;

    let events = audit(&app, ids[0], "?limit=1").await;
    assert_eq!(events["items"][0]["action"], "tenant.deleted");
    let before = events["next_before"].as_i64().unwrap();
    let older = audit(&app, ids[0], &format!("?limit=1&before={before}")).await;
    assert_eq!(older["items"][0]["action"], "tenant.registered");
    assert!(older["next_before"].is_null());
    assert!(!older["items"][0]["request_id"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn audit_trail_is_append_only() {
    let app = spawn_app().await;
    put(&app, TID, &tenant_body("s"), 201).await;
    let db = app.db.client().await;
    assert!(
        db.execute("UPDATE audit_events SET action = 'x'", &[])
            .await
            .is_err()
    );
    assert!(db.execute("DELETE FROM audit_events", &[]).await.is_err());
    assert!(db.execute("TRUNCATE audit_events", &[]).await.is_err());
    assert_eq!(
        audit(&app, TID, "").await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn concurrent_first_puts_register_once() {
    let app = spawn_app().await;
    let body = tenant_body("s");
    let (api, path) = (app.api(), format!("/v1/tenants/{TID}"));
    let results =
        futures_util::future::join_all((0..8).map(|_| api.send(Method::PUT, &path, Some(&body))))
            .await;
    let created = results.iter().filter(|r| r.status() == 201).count();
    assert!(
        results
            .iter()
            .all(|r| r.status() == 201 || r.status() == 200)
    );
    assert_eq!(created, 1, "exactly one request registers the tenant");
    let db = app.db.client().await;
    let n: i64 = db
        .query_one("SELECT count(*) FROM tenants", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert_eq!(
        audit(&app, TID, "").await["items"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "one audit event"
    );
}
