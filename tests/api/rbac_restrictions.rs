//! `/v1/tenants/{id}/rbac-restrictions` and `/rbac-findings` against the sandbox: an app
//! restricted by RBAC reads its scope and nothing else through Graph, but only once its Entra
//! grants are gone (the union trap); the restriction is keyed by app and scope, adopted instead
//! of duplicated, replaced create-before-remove, and the pointer's object id is checked.
use serde_json::{Value, json};

use crate::helpers::*;
use crate::scope_groups::{addr, count, create_group};

/// The fixture's "Contoso CRM connector" app and its secret.
const APP: &str = "b9701c1e-1364-464d-93e4-01ae925e8d6c";
const APP_SECRET: &str = "sandbox-crm-secret-not-for-production";

async fn post(env: &WithSandbox, path: &str, body: Value) -> reqwest::Response {
    env.app
        .http
        .post(env.url(path))
        .bearer_auth(env.app.admin())
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn get(env: &WithSandbox, path: &str) -> Value {
    let res = env
        .app
        .http
        .get(env.url(path))
        .bearer_auth(env.app.admin())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    res.json().await.unwrap()
}

/// HTTP status of reading `mailbox`'s messages through Graph as the CRM app, with a fresh token
/// (a token carries the Entra roles held when it was issued).
async fn graph_read(env: &WithSandbox, mailbox: &str) -> u16 {
    let res = env
        .app
        .http
        .post(format!(
            "{}/{}/oauth2/v2.0/token",
            env.sandbox.base_url, env.tenant
        ))
        .form(&[
            ("client_id", APP),
            ("client_secret", APP_SECRET),
            ("scope", "https://graph.microsoft.com/.default"),
            ("grant_type", "client_credentials"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let token: Value = res.json().await.unwrap();
    env.app
        .http
        .get(format!(
            "{}/v1.0/users/{}/messages",
            env.sandbox.base_url,
            addr(mailbox)
        ))
        .bearer_auth(token["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn access_test(env: &WithSandbox, mailbox: &str) -> Value {
    let res = post(
        env,
        "/access-tests",
        json!({"app_id": APP, "mailbox": addr(mailbox)}),
    )
    .await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    res.json().await.unwrap()
}

/// (granted, decided_by) of one permission in an access test's effective verdicts.
fn verdict(t: &Value, permission: &str) -> (bool, String) {
    let v = t["effective"]["permissions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["permission"] == permission)
        .unwrap_or_else(|| panic!("no verdict for {permission}: {t}"));
    (
        v["granted"].as_bool().unwrap(),
        v["decided_by"].as_str().unwrap().to_string(),
    )
}

/// The sandbox tenant as the control API shows it.
async fn tenant_state(env: &WithSandbox) -> Value {
    env.app
        .http
        .get(format!(
            "{}/_sandbox/tenants/{}",
            env.sandbox.base_url, env.tenant
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn rbac_restricts_through_graph_only_once_the_entra_grants_are_gone() {
    let env = WithSandbox::start().await;
    create_group(&env, "crm-scope", &["alice"]).await;
    // Before anything: the CRM app holds Entra Mail.Read for every mailbox.
    assert_eq!(graph_read(&env, "bob").await, 200);
    let scan = get(&env, "/rbac-findings").await;
    let crm = scan["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["app_id"] == APP)
        .unwrap();
    assert_eq!(crm["kind"], "unrestricted", "{scan}");

    let res = post(
        &env,
        "/rbac-restrictions",
        json!({"app_id": APP, "scope": {"scope_group": "crm-scope"}}),
    )
    .await;
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    let r: Value = res.json().await.unwrap();
    let permissions: Vec<&str> = r["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["permission"].as_str().unwrap())
        .collect();
    assert_eq!(permissions, ["Calendars.Read", "Mail.Read", "Mail.Send"]);
    assert!(
        r["assignments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["present"] == true)
    );
    assert_eq!(r["scope"]["kind"], "recipient_group_scope");
    assert_eq!(
        r["pointer_object_id"], r["service_principal_object_id"],
        "the pointer carries the service principal's object id"
    );
    // The union trap: Entra Mail.Read still reaches every mailbox, so NOT restricted.
    assert_eq!(r["restricted"], false);
    assert_eq!(r["findings"][0]["kind"], "union_trap");
    assert!(
        r["unscoped_entra_grants"]
            .as_array()
            .unwrap()
            .contains(&json!("Mail.Read"))
    );
    assert_eq!(graph_read(&env, "bob").await, 200, "out of scope, yet read");
    let t = access_test(&env, "bob").await;
    assert_eq!(
        verdict(&t, "Mail.Read"),
        (true, "entra_unrestricted".into()),
        "{t}"
    );
    assert_eq!(t["effective"]["rbac_pointer"], true);
    assert_eq!(t["effective"]["rbac"][0]["in_scope"], false);
    let scan = get(&env, "/rbac-findings").await;
    let crm = scan["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["app_id"] == APP)
        .unwrap();
    assert_eq!(crm["kind"], "union_trap", "{scan}");
    assert!(crm["fix"].as_str().unwrap().contains("/enforce"));

    // The same restriction again: 200 with the same one, nothing created twice.
    let res = post(
        &env,
        "/rbac-restrictions",
        json!({"app_id": APP.to_uppercase(), "scope": {"scope_group": "crm-scope"}}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let again: Value = res.json().await.unwrap();
    assert_eq!(again["id"], r["id"]);
    assert_eq!(count(&env, "New-ManagementRoleAssignment").await, 3);
    assert_eq!(count(&env, "New-ServicePrincipal").await, 1);
    // Same key, other permissions: 409 listing the difference.
    let res = post(
        &env,
        "/rbac-restrictions",
        json!({"app_id": APP, "scope": {"scope_group": "crm-scope"}, "permissions": ["Mail.Read"]}),
    )
    .await;
    let p = assert_problem(res, 409, "rbac_restriction_conflict").await;
    assert_eq!(p["errors"][0]["field"], "permissions");

    // Enforcing needs a canary outside the scope.
    let id = r["id"].as_str().unwrap();
    let res = post(&env, &format!("/rbac-restrictions/{id}/enforce"), json!({})).await;
    assert_problem(res, 422, "verification_mailboxes_required").await;
    // A canary inside the scope fails verification, and the Entra grants stay.
    let res = post(
        &env,
        &format!("/rbac-restrictions/{id}/enforce"),
        json!({"canary_mailboxes": [addr("alice")]}),
    )
    .await;
    let p = assert_problem(res, 409, "rbac_verification_failed").await;
    assert_eq!(p["errors"][0]["field"], "canary_mailboxes");
    assert_eq!(graph_read(&env, "bob").await, 200);

    let res = post(
        &env,
        &format!("/rbac-restrictions/{id}/enforce"),
        json!({"canary_mailboxes": [addr("bob")]}),
    )
    .await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let r: Value = res.json().await.unwrap();
    assert_eq!(r["restricted"], true, "{r}");
    assert_eq!(
        r["enforcement"]["entra_grants_removed"],
        json!(["Calendars.Read", "Mail.Read", "Mail.Send"])
    );
    assert_eq!(r["enforcement"]["in_scope_checked"], json!([addr("alice")]));
    assert!(
        r["enforcement"]["propagation"]
            .as_str()
            .unwrap()
            .contains("2 hours")
    );
    // Through Graph, as the app: its scope, and nothing else.
    assert_eq!(graph_read(&env, "alice").await, 200);
    assert_eq!(graph_read(&env, "bob").await, 403);
    let t = access_test(&env, "bob").await;
    assert_eq!(
        verdict(&t, "Mail.Read"),
        (false, "rbac_out_of_scope".into()),
        "{t}"
    );
    assert_eq!(t["effective"]["entra_mailbox_permissions"], json!([]));
    assert_eq!(t["effective"]["rbac_disagreement"], Value::Null);
    let t = access_test(&env, "alice").await;
    assert_eq!(
        verdict(&t, "Mail.Read"),
        (true, "rbac_in_scope".into()),
        "{t}"
    );
    assert!(t["agree"].is_boolean(), "the existing fields stay");
    let live = get(&env, &format!("/rbac-restrictions/{id}")).await;
    assert_eq!(live["restricted"], true);
    assert_eq!(live["findings"], json!([]));
    let scan = get(&env, "/rbac-findings").await;
    assert!(
        !scan["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["app_id"] == APP),
        "{scan}"
    );
}

#[tokio::test]
async fn the_app_registrations_object_id_is_refused() {
    let env = WithSandbox::start().await;
    create_group(&env, "crm-scope", &["alice"]).await;
    let t = tenant_state(&env).await;
    let registration = t["applications"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["appId"] == APP)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let res = post(
        &env,
        "/rbac-restrictions",
        json!({"app_id": APP, "service_principal_object_id": registration,
               "scope": {"scope_group": "crm-scope"}}),
    )
    .await;
    let p = assert_problem(res, 422, "app_registration_object_id").await;
    assert!(p["detail"].as_str().unwrap().contains("service principal"));
    assert_eq!(count(&env, "New-ServicePrincipal").await, 0);
}

#[tokio::test]
async fn a_filter_scope_is_validated_read_back_replaced_and_removed() {
    let env = WithSandbox::start().await;
    create_group(&env, "crm-scope", &["alice"]).await;
    let res = post(
        &env,
        "/rbac-restrictions",
        json!({"app_id": APP, "scope": {"recipient_filter": "Department -eq"}, "permissions": ["Mail.Read"]}),
    )
    .await;
    let p = assert_problem(res, 422, "validation_failed").await;
    assert_eq!(p["errors"][0]["field"], "scope.recipient_filter");
    let res = post(
        &env,
        "/rbac-restrictions",
        json!({"app_id": APP, "scope": {"recipient_filter": "Department -eq 'Finance'"},
               "permissions": ["Mail.Read"], "rbac_only_permissions": ["EWS.AccessAsApp"]}),
    )
    .await;
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    let r: Value = res.json().await.unwrap();
    assert_eq!(r["scope"]["kind"], "recipient_filter");
    assert_eq!(
        r["scope"]["recipient_filter_in_tenant"],
        "Department -eq 'Finance'"
    );
    let roles: Vec<&str> = r["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        ["Application EWS.AccessAsApp", "Application Mail.Read"]
    );
    let id = r["id"].as_str().unwrap().to_string();

    // Replace with the scope group: the new assignments exist before the old ones go.
    let res = env
        .app
        .http
        .put(env.url(&format!("/rbac-restrictions/{id}")))
        .bearer_auth(env.app.admin())
        .json(
            &json!({"app_id": APP, "scope": {"scope_group": "crm-scope", "via": "member_of_group"},
                      "permissions": ["Mail.Read"]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let r: Value = res.json().await.unwrap();
    assert_eq!(r["scope"]["kind"], "member_of_group");
    assert!(
        r["scope"]["recipient_filter"]
            .as_str()
            .unwrap()
            .starts_with("MemberOfGroup -eq 'CN=")
    );
    let calls: Vec<String> = env
        .sandbox_calls("exchange")
        .await
        .into_iter()
        .map(|c| c["cmdlet"].as_str().unwrap_or_default().to_string())
        .filter(|c| c.contains("ManagementRoleAssignment") && !c.starts_with("Get"))
        .collect();
    let last_new = calls.iter().rposition(|c| c.starts_with("New")).unwrap();
    let first_removal = calls.iter().position(|c| c.starts_with("Remove")).unwrap();
    assert!(last_new < first_removal, "create before remove: {calls:?}");
    let t = tenant_state(&env).await;
    assert_eq!(t["roleAssignments"].as_array().unwrap().len(), 1);
    assert_eq!(t["managementScopes"].as_array().unwrap().len(), 1);

    let res = env
        .app
        .http
        .delete(env.url(&format!("/rbac-restrictions/{id}")))
        .bearer_auth(env.app.admin())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let t = tenant_state(&env).await;
    assert_eq!(t["roleAssignments"], json!([]));
    assert_eq!(t["managementScopes"], json!([]));
    assert_eq!(t["exchangeServicePrincipals"], json!([]));
    let res = env
        .app
        .http
        .get(env.url(&format!("/rbac-restrictions/{id}")))
        .bearer_auth(env.app.admin())
        .send()
        .await
        .unwrap();
    assert_problem(res, 404, "not_found").await;
}

#[tokio::test]
async fn put_application_refuses_to_grant_back_the_consent_rbac_removed() {
    let env = WithSandbox::start().await;
    create_group(&env, "acme-scope", &["alice"]).await;
    let body = json!({"display_name": "ACME mail sync", "permissions": ["Mail.Read"],
        "grant_admin_consent": true});
    env.api().put("/applications/acme", &body, 201).await;
    let app = env.api().get("/applications/acme", 200).await["app_id"]
        .as_str()
        .unwrap()
        .to_string();
    let res = post(
        &env,
        "/rbac-restrictions",
        json!({"app_id": app, "scope": {"scope_group": "acme-scope"}, "remove_entra_grants": true,
               "canary_mailboxes": [addr("bob")]}),
    )
    .await;
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    let r: Value = res.json().await.unwrap();
    assert_eq!(r["restricted"], true, "{r}");
    let id = r["id"].as_str().unwrap().to_string();

    // The same PUT again would grant Entra Mail.Read back: every mailbox. Refused, nothing granted.
    let p = env
        .api()
        .put("/applications/acme", &body, (409, "rbac_union_trap"))
        .await;
    assert!(p["detail"].as_str().unwrap().contains(&id), "{p}");
    assert_eq!(p["errors"][0]["field"], "grant_admin_consent");
    let live = get(&env, &format!("/rbac-restrictions/{id}")).await;
    assert_eq!(live["restricted"], true, "{live}");
    assert_eq!(live["unscoped_entra_grants"], json!([]));
    // Without consent the application is accepted: RBAC grants Mail.Read in scope.
    let mut without = body.clone();
    without["grant_admin_consent"] = json!(false);
    env.api().put("/applications/acme", &without, 200).await;
}

#[tokio::test]
async fn an_administrative_unit_scopes_the_app_through_graph() {
    let env = WithSandbox::start().await;
    let unit = env
        .control()
        .post(
            &format!("/tenants/{}/administrative-units", env.tenant),
            &json!({"displayName": "Sales AU", "members": ["alice"]}),
            201,
        )
        .await;
    let au = unit["id"].as_str().unwrap().to_string();
    // An unknown unit, or two scopes at once: refused before anything is created.
    let res = post(
        &env,
        "/rbac-restrictions",
        json!({"app_id": APP, "scope": {"administrative_unit": uuid::Uuid::new_v4()}}),
    )
    .await;
    let p = assert_problem(res, 422, "validation_failed").await;
    assert_eq!(p["errors"][0]["field"], "scope.administrative_unit");
    let res = post(
        &env,
        "/rbac-restrictions",
        json!({"app_id": APP, "scope": {"administrative_unit": au, "recipient_filter": "Department -eq 'x'"}}),
    )
    .await;
    assert_problem(res, 422, "validation_failed").await;
    assert_eq!(count(&env, "New-ServicePrincipal").await, 0);

    let body = json!({"app_id": APP, "scope": {"administrative_unit": au},
        "remove_entra_grants": true, "sample_mailboxes": [addr("alice")],
        "canary_mailboxes": [addr("bob")]});
    let res = post(&env, "/rbac-restrictions", body.clone()).await;
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    let r: Value = res.json().await.unwrap();
    assert_eq!(r["scope"]["kind"], "administrative_unit");
    assert_eq!(r["scope"]["object_id"], au.as_str());
    assert_eq!(r["restricted"], true, "{r}");
    assert!(
        r["assignments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["present"] == true)
    );
    let t = tenant_state(&env).await;
    assert_eq!(t["roleAssignments"].as_array().unwrap().len(), 3);
    assert_eq!(t["managementScopes"], json!([]), "no filter needed");
    // Through Graph, as the app: the unit's members, nobody else.
    assert_eq!(graph_read(&env, "alice").await, 200);
    assert_eq!(graph_read(&env, "bob").await, 403);
    // The same restriction again adopts, never duplicates.
    let res = post(&env, "/rbac-restrictions", body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(count(&env, "New-ManagementRoleAssignment").await, 3);
}

/// Exchange shows a role assignment it just made to other calls only after replication. Closing
/// the union trap right after creating the restriction waits that out instead of calling the
/// restriction incomplete (the README walkthrough's grant failed this way with a 1 s replication).
#[tokio::test]
async fn enforcing_right_after_creation_waits_for_exchange_replication() {
    let mut sb = mailscope::sandbox::SandboxSettings::fast();
    sb.pacing.replication_delay =
        mailscope::sandbox::settings::DelayRange::fixed(std::time::Duration::from_millis(1500));
    let env = WithSandbox::start_with(sb).await;
    create_group(&env, "acme-scope", &["alice"]).await;
    let body = json!({"display_name": "ACME mail sync", "permissions": ["Mail.Read"],
        "grant_admin_consent": true});
    env.api().put("/applications/acme", &body, 201).await;
    let app = env.api().get("/applications/acme", 200).await["app_id"]
        .as_str()
        .unwrap()
        .to_string();
    let res = post(
        &env,
        "/rbac-restrictions",
        json!({"app_id": app, "scope": {"scope_group": "acme-scope"}, "remove_entra_grants": true,
               "canary_mailboxes": [addr("bob")]}),
    )
    .await;
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    let r: Value = res.json().await.unwrap();
    assert_eq!(r["restricted"], true, "{r}");
    assert_eq!(r["unscoped_entra_grants"], json!([]), "{r}");
}

/// Issue 15 goal 3: creating an RBAC restriction holds no pooled connection while it waits for
/// Exchange (pointer, management scope, role assignments): with a pool of one connection and
/// every Exchange call slowed to 1.5 s, another tenant's reads keep answering at once.
#[tokio::test]
async fn a_restriction_write_waiting_on_a_slow_exchange_holds_no_connection() {
    let env = WithSandbox::start_adjusted(mailscope::sandbox::SandboxSettings::fast(), |s| {
        s.database.pool_size = 1;
    })
    .await;
    create_group(&env, "crm-scope", &["alice"]).await;
    let other = OtherTenant::register(&env).await;
    let body = json!({"app_id": APP, "scope": {"scope_group": "crm-scope"}});
    let (status, text) = assert_write_leaves_reads_fast(
        &env,
        &other,
        "exchange",
        (Method::POST, "/rbac-restrictions", Some(body)),
        "/rbac-restrictions",
    )
    .await;
    assert_eq!(status, 201, "{text}");
}
