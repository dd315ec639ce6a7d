//! `/v1/tenants/{id}/applications` against the sandbox: creating a registration with consent (and
//! signing in as it), adopting, the unscoped-permission guard, fifty concurrent PUTs, recovery after
//! a crash between Microsoft's create and mailscope's write, DELETE of created vs adopted apps, and
//! client secrets whose text is shown once and stored nowhere.
use base64::Engine;
use serde_json::{Value, json};

use crate::helpers::*;

const CRM_APP_ID: &str = "b9701c1e-1364-464d-93e4-01ae925e8d6c";
const CRM_SECRET: &str = "sandbox-crm-secret-not-for-production";
const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";

fn create_body(perms: &[&str]) -> Value {
    json!({"display_name": "Contoso CRM connector", "permissions": perms, "grant_admin_consent": true})
}

async fn put(env: &WithSandbox, key: &str, body: &Value, expect: impl Into<Expect<'_>>) -> Value {
    let path = format!("/applications/{key}");
    env.api().put(&path, body, expect).await
}

async fn add_secret(
    env: &WithSandbox,
    key: &str,
    body: Value,
    expect: impl Into<Expect<'_>>,
) -> Value {
    let path = format!("/applications/{key}/secrets");
    env.api().post(&path, &body, expect).await
}

fn count(c: &Value, endpoint: &str) -> u64 {
    c[endpoint].as_u64().unwrap_or(0)
}

/// Graph calls that change the tenant.
fn writes(c: &Value) -> u64 {
    c.as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| {
            k.starts_with("graph:POST")
                || k.starts_with("graph:PATCH")
                || k.starts_with("graph:DELETE")
        })
        .map(|(_, v)| v.as_u64().unwrap_or(0))
        .sum()
}

/// The sandbox's token endpoint, as the third party's app would call it.
async fn token(env: &WithSandbox, client_id: &str, secret: &str) -> reqwest::Response {
    env.app
        .http
        .post(format!(
            "{}/{}/oauth2/v2.0/token",
            env.sandbox.base_url, env.tenant
        ))
        .form(&[
            ("client_id", client_id),
            ("client_secret", secret),
            ("scope", GRAPH_SCOPE),
            ("grant_type", "client_credentials"),
        ])
        .send()
        .await
        .unwrap()
}

async fn roles_of(env: &WithSandbox, client_id: &str, secret: &str) -> Vec<String> {
    let res = token(env, client_id, secret).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let v: Value = res.json().await.unwrap();
    let jwt = v["access_token"].as_str().unwrap();
    let payload = jwt.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    let mut roles: Vec<String> = claims["roles"]
        .as_array()
        .map(|a| a.iter().map(|r| r.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    roles.sort();
    roles
}

async fn audit_actions(env: &WithSandbox) -> Vec<Value> {
    let v = env.api().get("/audit-events", 200).await;
    v["items"].as_array().unwrap().clone()
}

fn perm<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["permissions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {view:#}"))
}

/// Concurrent identical PUTs: one created the registration (201), the others found it (200), and
/// the tenant holds one registration and one service principal.
async fn assert_one_registration(env: &WithSandbox, responses: &[reqwest::Response]) {
    let statuses: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 201),
        "{statuses:?}"
    );
    let c = env.counters().await;
    assert_eq!(count(&c, "graph:POST /applications"), 1, "{c:#}");
    assert_eq!(count(&c, "graph:POST /servicePrincipals"), 1, "{c:#}");
}

#[tokio::test]
async fn created_app_gets_consent_and_signs_in_with_exactly_those_roles() {
    let env = WithSandbox::start().await;
    let view = put(
        &env,
        "contoso-crm",
        &create_body(&["Mail.Read", "Mail.Send"]),
        201,
    )
    .await;
    assert_eq!(view["key"], "contoso-crm");
    assert_eq!(view["state"], "ready");
    assert_eq!(view["origin"], "created");
    for f in [
        "app_id",
        "application_object_id",
        "service_principal_object_id",
    ] {
        assert!(
            view[f].as_str().unwrap().parse::<uuid::Uuid>().is_ok(),
            "{f}"
        );
    }
    for name in ["Mail.Read", "Mail.Send"] {
        let p = perm(&view, name);
        assert_eq!(p["consent"], "granted");
        assert_eq!(p["requested"], true);
        assert_eq!(p["covered_by_access_policies"], true);
        assert_eq!(p["resource_app_id"], "00000003-0000-0000-c000-000000000000");
    }
    assert_eq!(view["unscoped_permissions"], json!([]));
    assert_eq!(view["policies"], json!([]));

    // The registration carries the crash-recovery marker.
    let app_id = view["app_id"].as_str().unwrap().to_string();
    let t = env.sandbox_tenant().await;
    let app = t["applications"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["appId"] == app_id.as_str())
        .unwrap();
    assert_eq!(app["extra"]["tags"], json!(["mailscope:contoso-crm"]));

    // The third party signs in with a secret from mailscope and holds exactly the granted roles.
    let secret = add_secret(
        &env,
        "contoso-crm",
        json!({"display_name": "s1", "lifetime_days": 90}),
        201,
    )
    .await;
    let text = secret["secret_text"].as_str().unwrap();
    assert_eq!(
        roles_of(&env, &app_id, text).await,
        ["Mail.Read", "Mail.Send"]
    );

    let actions = audit_actions(&env).await;
    let created = actions
        .iter()
        .find(|e| e["action"] == "application.created")
        .unwrap();
    assert_eq!(created["target"], "application/contoso-crm");
    assert_eq!(created["details"]["created_in_tenant"], true);
    assert!(
        actions
            .iter()
            .any(|e| e["action"] == "application.secret_added")
    );
}

#[tokio::test]
async fn repeating_a_put_changes_nothing_and_a_new_permission_set_is_reconciled() {
    let env = WithSandbox::start().await;
    let first = put(&env, "crm", &create_body(&["Mail.Read", "Mail.Send"]), 201).await;
    let before = env.counters().await;
    let again = put(&env, "crm", &create_body(&["Mail.Read", "Mail.Send"]), 200).await;
    assert_eq!(again["app_id"], first["app_id"]);
    assert_eq!(
        writes(&env.counters().await),
        writes(&before),
        "no write the second time"
    );
    let n_audit = audit_actions(&env).await.len();

    // Mail.Send out, Calendars.Read in: requested set replaced, consent granted and revoked.
    let view = put(
        &env,
        "crm",
        &create_body(&["Mail.Read", "Calendars.Read"]),
        200,
    )
    .await;
    assert_eq!(view["app_id"], first["app_id"]);
    let names: Vec<&str> = view["permissions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Calendars.Read", "Mail.Read"]);
    assert!(
        view["permissions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["consent"] == "granted")
    );
    let c = env.counters().await;
    assert_eq!(count(&c, "graph:POST /applications"), 1);
    assert_eq!(
        count(&c, "graph:POST /servicePrincipals/{id}/appRoleAssignedTo"),
        3
    );
    assert_eq!(
        count(
            &c,
            "graph:DELETE /servicePrincipals/{id}/appRoleAssignedTo/{id}"
        ),
        1
    );
    let actions = audit_actions(&env).await;
    assert_eq!(actions.len(), n_audit + 1);
    assert_eq!(actions[0]["action"], "application.updated");
    assert_eq!(actions[0]["details"]["granted"], json!(["Calendars.Read"]));
    assert_eq!(actions[0]["details"]["revoked"], json!(["Mail.Send"]));

    // Without consent, the request is recorded but assignments are left alone.
    let view = put(
        &env,
        "crm",
        &json!({"display_name": "Renamed", "permissions": ["Mail.Read"], "grant_admin_consent": false}),
        200,
    )
    .await;
    assert_eq!(view["display_name"], "Renamed");
    assert_eq!(perm(&view, "Calendars.Read")["requested"], false);
    assert_eq!(perm(&view, "Calendars.Read")["consent"], "granted");
}

#[tokio::test]
async fn unscoped_permissions_are_refused_unless_accepted() {
    let env = WithSandbox::start().await;
    let p = put(
        &env,
        "dir",
        &create_body(&["Mail.Read", "User.Read.All"]),
        (422, "validation_failed"),
    )
    .await;
    assert_eq!(p["errors"][0]["field"], "permissions[1]");
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("allow_unscoped_permissions"),
        "{p}"
    );
    assert_eq!(count(&env.counters().await, "graph:POST /applications"), 0);
    // "a refused PUT records nothing"
    env.api().get("/applications/dir", 404).await;

    // A permission that does not exist is named as such.
    let mut body = create_body(&["Mail.Read", "Nope.Read.All"]);
    body["allow_unscoped_permissions"] = json!(true);
    let p = put(&env, "dir", &body, (422, "validation_failed")).await;
    assert_eq!(p["errors"][0]["field"], "permissions[1]");
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("`Nope.Read.All` is not a Microsoft Graph application permission"),
        "{p}"
    );

    let mut body = create_body(&["Mail.Read", "User.Read.All"]);
    body["allow_unscoped_permissions"] = json!(true);
    let view = put(&env, "dir", &body, 201).await;
    assert_eq!(view["unscoped_permissions"], json!(["User.Read.All"]));
    assert_eq!(
        perm(&view, "User.Read.All")["covered_by_access_policies"],
        false
    );
    assert_eq!(perm(&view, "User.Read.All")["consent"], "granted");
}

#[tokio::test]
async fn a_misspelled_permission_is_named_as_such_with_the_nearest_real_one() {
    let env = WithSandbox::start().await;
    // Not "pass allow_unscoped_permissions": the name does not exist, so say that first.
    let p = put(
        &env,
        "typo",
        &create_body(&["Mail.Send", "Mail.Reed"]),
        (422, "validation_failed"),
    )
    .await;
    assert_eq!(p["errors"].as_array().unwrap().len(), 1, "{p}");
    assert_eq!(p["errors"][0]["field"], "permissions[1]");
    let message = p["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("`Mail.Reed` is not a Microsoft Graph application permission")
            && message.contains("did you mean `Mail.Read`?")
            && !message.contains("allow_unscoped_permissions"),
        "{p}"
    );

    // The nearest name comes from the tenant's own list, across both resources.
    let p = put(
        &env,
        "typo",
        &create_body(&["full_acess_as_app"]),
        (422, "validation_failed"),
    )
    .await;
    assert!(
        p["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("did you mean `full_access_as_app` (Office 365 Exchange Online)?"),
        "{p}"
    );
    assert_eq!(count(&env.counters().await, "graph:POST /applications"), 0);
}

#[tokio::test]
async fn fifty_concurrent_identical_puts_create_one_registration() {
    let env = WithSandbox::start().await;
    let body = create_body(&["Mail.Read", "Mail.Send"]);
    let api = env.api();
    let all = futures_util::future::join_all(
        (0..50).map(|_| api.send(Method::PUT, "/applications/burst", Some(&body))),
    )
    .await;
    assert_one_registration(&env, &all).await;
    let c = env.counters().await;
    assert_eq!(
        count(&c, "graph:POST /servicePrincipals/{id}/appRoleAssignedTo"),
        2,
        "{c:#}"
    );
    let created = audit_actions(&env)
        .await
        .iter()
        .filter(|e| e["action"] == "application.created")
        .count();
    assert_eq!(created, 1);
}

#[tokio::test]
async fn a_crash_between_microsofts_create_and_mailscopes_write_is_recovered_on_retry() {
    let env = WithSandbox::start().await;
    // What a crashed first attempt leaves: the intent row…
    let db = env.app.db.client().await;
    db.execute(
        "INSERT INTO applications (tenant_id, key, state, origin, marker, display_name, permissions, grant_admin_consent)
         VALUES ($1, 'crm', 'creating', 'created', 'mailscope:crm', 'Contoso CRM connector', '{Mail.Read}', true)",
        &[&env.tenant.parse::<uuid::Uuid>().unwrap()],
    )
    .await
    .unwrap();
    let pending = env.api().get("/applications/crm", 200).await;
    assert_eq!(pending["state"], "creating");
    assert_eq!(perm(&pending, "Mail.Read")["consent"], "unknown");
    // …and the registration and service principal Microsoft had already made, with the marker.
    let mgmt: Value = token(
        &env,
        &env.sandbox.management_client_id(),
        secrecy::ExposeSecret::expose_secret(&env.sandbox.management_client_secret()),
    )
    .await
    .json()
    .await
    .unwrap();
    let bearer = mgmt["access_token"].as_str().unwrap();
    let graph = env.sandbox_graph(bearer);
    let body = json!({"displayName": "Contoso CRM connector", "tags": ["mailscope:crm"]});
    let made = graph.post("/applications", &body, 201).await;
    let body = json!({"appId": made["appId"]});
    graph.post("/servicePrincipals", &body, 201).await;

    let view = put(&env, "crm", &create_body(&["Mail.Read"]), 201).await;
    assert_eq!(
        view["app_id"], made["appId"],
        "the registration was adopted, not duplicated"
    );
    assert_eq!(view["origin"], "created");
    assert_eq!(perm(&view, "Mail.Read")["consent"], "granted");
    let c = env.counters().await;
    assert_eq!(
        count(&c, "graph:POST /applications"),
        1,
        "only the crashed attempt's create"
    );
    assert_eq!(count(&c, "graph:POST /servicePrincipals"), 1);
    let created = audit_actions(&env)
        .await
        .into_iter()
        .find(|e| e["action"] == "application.created")
        .unwrap();
    assert_eq!(created["details"]["recovered_by_marker"], true);
    assert_eq!(created["details"]["created_in_tenant"], false);
}

#[tokio::test]
async fn adopting_records_an_existing_app_without_changing_the_tenant() {
    let env = WithSandbox::start().await;
    let before = writes(&env.counters().await);
    // The CRM connector holds User.Read.All: adopting it needs the explicit acceptance.
    let p = put(
        &env,
        "crm",
        &json!({"app_id": CRM_APP_ID}),
        (422, "validation_failed"),
    )
    .await;
    assert!(
        p["detail"].as_str().unwrap().contains("User.Read.All"),
        "{p}"
    );
    let view = put(
        &env,
        "crm",
        &json!({"app_id": CRM_APP_ID, "allow_unscoped_permissions": true}),
        201,
    )
    .await;
    assert_eq!(view["origin"], "adopted");
    assert_eq!(view["app_id"], CRM_APP_ID);
    assert_eq!(view["unscoped_permissions"], json!(["User.Read.All"]));
    for name in ["Calendars.Read", "Mail.Read", "Mail.Send", "User.Read.All"] {
        assert_eq!(perm(&view, name)["consent"], "granted");
    }
    assert_eq!(
        writes(&env.counters().await),
        before,
        "adopting writes nothing to the tenant"
    );
    // Same again: 200; another key for the same app, or a create body on the adopted key: 409.
    put(
        &env,
        "crm",
        &json!({"app_id": CRM_APP_ID, "allow_unscoped_permissions": true}),
        200,
    )
    .await;
    put(
        &env,
        "crm-2",
        &json!({"app_id": CRM_APP_ID, "allow_unscoped_permissions": true}),
        (409, "conflict"),
    )
    .await;
    put(&env, "crm", &create_body(&["Mail.Read"]), (409, "conflict")).await;
    // An app that is not in the tenant.
    let p = put(
        &env,
        "ghost",
        &json!({"app_id": "0e0e0e0e-1111-4222-8333-444444444444"}),
        (422, "validation_failed"),
    )
    .await;
    assert_eq!(p["errors"][0]["field"], "app_id");
    // Both forms at once.
    put(
        &env,
        "x",
        &json!({"app_id": CRM_APP_ID, "display_name": "x"}),
        (422, "validation_failed"),
    )
    .await;

    let list = env.api().get("/applications", 200).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["key"], "crm");
    assert_eq!(list["items"][0]["origin"], "adopted");
}

#[tokio::test]
async fn delete_removes_what_mailscope_created_and_forgets_what_it_adopted() {
    let env = WithSandbox::start().await;
    let created = put(&env, "made", &create_body(&["Mail.Read"]), 201).await;
    let made_id = created["app_id"].as_str().unwrap().to_string();
    put(
        &env,
        "crm",
        &json!({"app_id": CRM_APP_ID, "allow_unscoped_permissions": true}),
        201,
    )
    .await;
    let added = add_secret(
        &env,
        "crm",
        json!({"display_name": "from mailscope", "lifetime_days": 30}),
        201,
    )
    .await;
    let added_text = added["secret_text"].as_str().unwrap().to_string();

    for key in ["made", "crm"] {
        let path = format!("/applications/{key}");
        env.api().delete(&path, 204).await;
        env.api().get(&path, 404).await;
    }
    let t = env.sandbox_tenant().await;
    let apps = t["applications"].as_array().unwrap();
    assert!(
        !apps.iter().any(|a| a["appId"] == made_id.as_str()),
        "created app deleted"
    );
    assert!(
        !t["servicePrincipals"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["appId"] == made_id.as_str())
    );
    let crm = apps
        .iter()
        .find(|a| a["appId"] == CRM_APP_ID)
        .expect("adopted app kept");
    assert!(
        !crm["passwordCredentials"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["keyId"] == added["key_id"]),
        "the secret mailscope added is removed"
    );
    // The vendor's own secret still works; mailscope's no longer does.
    assert_eq!(token(&env, CRM_APP_ID, CRM_SECRET).await.status(), 200);
    assert_eq!(token(&env, CRM_APP_ID, &added_text).await.status(), 401);
    let deleted: Vec<Value> = audit_actions(&env)
        .await
        .into_iter()
        .filter(|e| e["action"] == "application.deleted")
        .collect();
    assert_eq!(deleted.len(), 2);
    env.api()
        .delete("/applications/made", (404, "not_found"))
        .await;
}

#[tokio::test]
async fn a_secret_is_shown_once_never_stored_and_listed_with_its_status() {
    let env = WithSandbox::start().await;
    put(&env, "crm", &create_body(&["Mail.Read"]), 201).await;
    let api = env.api();
    let send = |key: &'static str, body: Value| {
        api.request(Method::POST, "/applications/crm/secrets")
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };
    let res = send("k1", json!({"display_name": "long", "lifetime_days": 90}))
        .await
        .unwrap();
    let first = json_body(res, 201, "POST secrets").await;
    let text = first["secret_text"].as_str().unwrap().to_string();
    assert!(text.len() >= 16);
    assert_eq!(first["status"], "current");
    assert_eq!(first["hint"], text[..3]);
    // A replay answers the same metadata, without the text, and adds no second secret.
    let res = send("k1", json!({"display_name": "long", "lifetime_days": 90}))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    let replay: Value = res.json().await.unwrap();
    assert!(replay.get("secret_text").is_none());
    assert_eq!(replay["key_id"], first["key_id"]);
    let c = env.counters().await;
    assert_eq!(count(&c, "graph:POST /applications/{id}/addPassword"), 1);

    let short = add_secret(
        &env,
        "crm",
        json!({"display_name": "short", "lifetime_days": 10}),
        201,
    )
    .await;
    assert_eq!(short["status"], "expiring_soon");
    let p = add_secret(
        &env,
        "crm",
        json!({"display_name": "too long", "lifetime_days": 181}),
        (422, "validation_failed"),
    )
    .await;
    assert_eq!(p["errors"][0]["field"], "lifetime_days");
    let p = add_secret(
        &env,
        "crm",
        json!({"display_name": "", "lifetime_days": 0}),
        (422, "validation_failed"),
    )
    .await;
    assert_eq!(p["errors"].as_array().unwrap().len(), 2);

    let list = env.api().get("/applications/crm/secrets", 200).await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["key_id"], short["key_id"], "soonest-ending first");
    assert_eq!(items[0]["status"], "expiring_soon");
    assert_eq!(items[1]["status"], "current");
    assert!(items.iter().all(|s| s["created_by_mailscope"] == true));
    let view = env.api().get("/applications/crm", 200).await;
    assert_eq!(view["secrets"].as_array().unwrap().len(), 2);
    assert!(!list.to_string().contains(&text) && !view.to_string().contains(&text));

    // Nothing in the database holds the text: every row of every table, as text.
    let db = env.app.db.client().await;
    let tables = db
        .query(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap();
    for t in tables {
        let name: String = t.get(0);
        let rows = db
            .query(&format!("SELECT t::text FROM {name} t"), &[])
            .await
            .unwrap();
        for r in rows {
            let row: String = r.get(0);
            assert!(!row.contains(&text), "{name} holds the secret text");
        }
    }
    // The bytea response bodies too (they are hex in the text form above).
    let bodies = db
        .query("SELECT response_body FROM idempotency_keys", &[])
        .await
        .unwrap();
    assert!(!bodies.is_empty());
    for r in bodies {
        let body: Vec<u8> = r.get::<_, Option<Vec<u8>>>(0).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&body).contains(&text));
    }
}

#[tokio::test]
async fn an_expired_secret_of_an_adopted_app_is_reported_expired() {
    let env = WithSandbox::start().await;
    let (client_id, _) = env
        .sandbox_app(json!({"displayName": "old vendor app", "graphPermissions": ["Mail.Read"], "secretExpired": true}))
        .await;
    put(&env, "old", &json!({"app_id": client_id}), 201).await;
    let list = env.api().get("/applications/old/secrets", 200).await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["status"], "expired");
    assert_eq!(items[0]["created_by_mailscope"], false);
}

#[tokio::test]
async fn deleting_a_secret_removes_it_in_the_tenant() {
    let env = WithSandbox::start().await;
    let view = put(&env, "crm", &create_body(&["Mail.Read"]), 201).await;
    let app_id = view["app_id"].as_str().unwrap().to_string();
    let body = json!({"display_name": "s", "lifetime_days": 30});
    let secret = add_secret(&env, "crm", body, 201).await;
    let text = secret["secret_text"].as_str().unwrap().to_string();
    assert_eq!(token(&env, &app_id, &text).await.status(), 200);
    let path = format!(
        "/applications/crm/secrets/{}",
        secret["key_id"].as_str().unwrap()
    );
    env.api().delete(&path, 204).await;
    assert_eq!(token(&env, &app_id, &text).await.status(), 401);
    let list = env.api().get("/applications/crm/secrets", 200).await;
    assert_eq!(list["items"], json!([]));
    env.api().delete(&path, (404, "not_found")).await;
    assert!(
        audit_actions(&env)
            .await
            .iter()
            .any(|e| e["action"] == "application.secret_removed")
    );
}

#[tokio::test]
async fn other_tenants_and_read_only_callers_are_kept_out() {
    let env = WithSandbox::start().await;
    put(&env, "crm", &create_body(&["Mail.Read"]), 201).await;
    let other = "44444444-4444-4444-8444-444444444444";
    let outsider = env
        .api()
        .with_token(env.app.token(&["MailScope.Write"], &[other]));
    let (app, secret) = (
        create_body(&["Mail.Read"]),
        json!({"display_name": "s", "lifetime_days": 1}),
    );
    for (method, path, body) in [
        (Method::GET, "/applications", None),
        (Method::GET, "/applications/crm", None),
        (Method::PUT, "/applications/crm", Some(&app)),
        (Method::DELETE, "/applications/crm", None),
        (Method::GET, "/applications/crm/secrets", None),
        (Method::POST, "/applications/crm/secrets", Some(&secret)),
    ] {
        outsider
            .expect(method, path, body, (404, "not_found"))
            .await;
    }
    let reader = env
        .api()
        .with_token(env.app.token(&["MailScope.Read"], &[&env.tenant]));
    reader
        .put("/applications/crm", &app, (403, "forbidden"))
        .await;
    reader.get("/applications/crm", 200).await;
    let p = put(
        &env,
        "Bad_Key",
        &create_body(&["Mail.Read"]),
        (422, "validation_failed"),
    )
    .await;
    assert_eq!(p["errors"][0]["field"], "key");
}

#[tokio::test]
async fn the_list_pages_by_key() {
    let env = WithSandbox::start().await;
    for key in ["b-app", "a-app"] {
        put(
            &env,
            key,
            &json!({"display_name": key, "permissions": []}),
            201,
        )
        .await;
    }
    let page = env.api().get("/applications?limit=1", 200).await;
    assert_eq!(page["items"][0]["key"], "a-app");
    assert_eq!(page["next_after"], "a-app");
    let page = env
        .api()
        .get("/applications?limit=1&after=a-app", 200)
        .await;
    assert_eq!(page["items"][0]["key"], "b-app");
    assert_eq!(page["items"][0]["state"], "ready");
    assert!(page["next_after"].is_null());
}

/// Issue 15 goal 3: creating an application calls Graph with no pooled connection held, so a
/// burst of new applications on one tenant while Graph is slow leaves another tenant's reads
/// answering at once (before, each creation held a connection across its Graph calls: a pool of
/// 4 ran dry and the other tenant's reads waited for it, then answered 503).
#[tokio::test]
async fn a_burst_of_new_apps_on_slow_graph_leaves_another_tenants_reads_fast() {
    let env = WithSandbox::start_adjusted(mailscope::sandbox::SandboxSettings::fast(), |s| {
        s.database.pool_size = 4;
    })
    .await;
    let other = OtherTenant::register(&env).await;
    slow_api(&env, "graph", 1_500).await;
    let body = create_body(&["Mail.Read"]);
    let burst = {
        let (api, body) = (env.api(), body.clone());
        tokio::spawn(async move {
            let paths: Vec<String> = (0..10)
                .map(|i| format!("/applications/burst-{i}"))
                .collect();
            let puts = paths.iter().map(|p| api.send(Method::PUT, p, Some(&body)));
            futures_util::future::join_all(puts)
                .await
                .iter()
                .map(|r| r.status().as_u16())
                .collect::<Vec<u16>>()
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let seen = other
        .reads_while(
            &env,
            "/applications",
            &burst,
            std::time::Duration::from_secs(6),
        )
        .await;
    // Far below the pool's 2 s wait and the 1.5 s Graph calls the burst is making.
    assert_reads_fast("a burst of 10 new apps", &seen, 1_000);

    slow_api(&env, "graph", 0).await;
    let statuses = burst.await.unwrap();
    assert!(statuses.iter().all(|s| *s == 201), "{statuses:?}");
    let c = env.counters().await;
    assert_eq!(count(&c, "graph:POST /applications"), 10, "{c:#}");
}

/// Two mailscope processes sharing one database: identical PUTs sent to both at once make one
/// registration in the tenant, because the lease on (tenant, key) admits one writer on every
/// replica while it calls Graph, and the other then finds the registration it made.
#[tokio::test]
async fn identical_puts_to_two_processes_at_once_make_one_registration() {
    let env = WithSandbox::start().await;
    let second =
        mailscope::app::Application::build(env.app.settings.clone(), mailscope::app::Role::All)
            .await
            .expect("a second process builds");
    let second_base = format!(
        "http://127.0.0.1:{}/v1/tenants/{}",
        second.port(),
        env.tenant
    );
    let second_handle = second.handle();
    tokio::spawn(second.run_until_stopped());
    let apis = [
        env.api(),
        TestClient {
            base: second_base,
            ..env.api()
        },
    ];
    let body = create_body(&["Mail.Read", "Mail.Send"]);
    let all = futures_util::future::join_all(
        (0..12).map(|i| apis[i % 2].send(Method::PUT, "/applications/twice", Some(&body))),
    )
    .await;
    assert_one_registration(&env, &all).await;
    // Each request gave its lease back when it ended.
    let db = env.app.db.client().await;
    let mut left = -1i64;
    for _ in 0..100 {
        left = db
            .query_one("SELECT count(*) FROM key_leases", &[])
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(left, 0, "a lease was left behind");
    drop(second_handle.stop(false));
}

/// The lease of an application another live mailscope process is changing makes a request wait
/// (it must not call Graph meanwhile); when that process dies, its liveness lock ends with its
/// connection and the request goes on at once, without waiting for the lease's time to lapse.
#[tokio::test]
async fn a_request_waits_for_a_live_holder_and_takes_over_from_a_dead_one() {
    let env = WithSandbox::start().await;
    // Another process: its liveness lock (store::liveness) and the lease it took.
    let other_process = env.app.db.client().await;
    other_process
        .execute(
            "SELECT pg_advisory_lock($1, $2)",
            &[&0x6d73_4c76_i32, &4242_i32],
        )
        .await
        .unwrap();
    other_process
        .execute(
            "INSERT INTO key_leases (name, holder, token, locked_until)
             VALUES ($1, 4242, gen_random_uuid(), now() + interval '10 minutes')",
            &[&format!("application:{}/held", env.tenant)],
        )
        .await
        .unwrap();
    let put = {
        let api = env.api();
        tokio::spawn(async move {
            let body = create_body(&["Mail.Read"]);
            api.send(Method::PUT, "/applications/held", Some(&body))
                .await
                .status()
                .as_u16()
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    assert!(!put.is_finished(), "the request waits for the live holder");
    let c = env.counters().await;
    assert_eq!(count(&c, "graph:POST /applications"), 0, "{c:#}");

    let died = std::time::Instant::now();
    drop(other_process);
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), put)
        .await
        .expect("taken over within seconds, not at the lease's end")
        .unwrap();
    assert_eq!(status, 201);
    eprintln!(
        "taken over {} ms after the holder died",
        died.elapsed().as_millis()
    );
    let c = env.counters().await;
    assert_eq!(count(&c, "graph:POST /applications"), 1, "{c:#}");
}
