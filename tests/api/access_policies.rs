//! `/v1/tenants/{id}/access-policies`, `/access-tests` and `/sync` against the sandbox: keyed by
//! app and scope, adopted instead of duplicated, replaced create-before-remove, guarded against
//! leaving an app unrestricted, tested both ways, and reconciled with the tenant.
use serde_json::{Value, json};

use crate::helpers::*;
use crate::scope_groups::{addr, break_inserts, count, create_group, repair_inserts};

/// The fixture's "Contoso CRM connector" app.
const APP: &str = "b9701c1e-1364-464d-93e4-01ae925e8d6c";

async fn post_policy(env: &WithSandbox, body: Value, expect: impl Into<Expect<'_>>) -> Value {
    env.api().post("/access-policies", &body, expect).await
}

async fn restrict(env: &WithSandbox, scope: &str) -> Value {
    let body = json!({"app_id": APP, "scope": scope, "access_right": "RestrictAccess"});
    post_policy(env, body, 201).await
}

async fn delete_policy(
    env: &WithSandbox,
    id: &str,
    query: &str,
    expect: impl Into<Expect<'_>>,
) -> Value {
    let path = format!("/access-policies/{id}{query}");
    env.api().delete(&path, expect).await
}

async fn access_test(env: &WithSandbox, mailbox: &str) -> Value {
    let body = json!({"app_id": APP, "mailbox": addr(mailbox)});
    env.api().post("/access-tests", &body, 200).await
}

async fn sync(env: &WithSandbox, query: &str) -> Value {
    env.api().post_empty(&format!("/sync{query}"), 200).await
}

#[tokio::test]
async fn a_policy_is_created_once_per_app_and_scope() {
    let env = WithSandbox::start().await;
    let group = create_group(&env, "crm-scope", &["alice"]).await;
    let p = restrict(&env, "crm-scope").await;
    assert_eq!(p["app_id"], APP);
    assert_eq!(p["scope_object_id"], group["object_id"]);
    assert_eq!(p["scope_alias"], "crm-scope");
    assert_eq!(p["scope_type"], "MailUniversalSecurityGroup");
    assert_eq!(p["access_right"], "RestrictAccess");
    assert_eq!(p["description"], " ");
    assert_eq!(p["state"], "pending_propagation");
    assert_eq!(p["origin"], "created");
    assert!(p["exchange_identity"].as_str().unwrap().contains(APP));
    let new_call = env
        .sandbox_calls("exchange")
        .await
        .into_iter()
        .find(|c| c["cmdlet"] == "New-ApplicationAccessPolicy")
        .unwrap();
    assert_eq!(
        new_call["parameters"]["Description"], " ",
        "the smallest description (docs/microsoft-365.md §2.6)"
    );

    // The same policy again (by the group's address this time): 200 with the existing one.
    let body = json!({"app_id": APP.to_uppercase(), "scope": addr("crm-scope"), "access_right": "RestrictAccess"});
    let again = post_policy(&env, body, 200).await;
    assert_eq!(again["id"], p["id"]);

    // Same key, other right: 409 saying what differs.
    let problem = post_policy(
        &env,
        json!({"app_id": APP, "scope": "crm-scope", "access_right": "DenyAccess"}),
        (409, "policy_conflict"),
    )
    .await;
    assert_eq!(problem["errors"][0]["field"], "access_right");
    assert!(
        problem["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("DenyAccess")
    );
    assert_eq!(count(&env, "New-ApplicationAccessPolicy").await, 1);

    let id = p["id"].as_str().unwrap();
    let one: Value = env.api().get(&format!("/access-policies/{id}"), 200).await;
    assert_eq!(one["id"], p["id"]);
    let list: Value = env
        .api()
        .get(&format!("/access-policies?app_id={APP}"), 200)
        .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let none: Value = env
        .api()
        .get(
            &format!("/access-policies?app_id={}", uuid::Uuid::new_v4()),
            200,
        )
        .await;
    assert!(none["items"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn scopes_exchange_refuses_are_named_with_the_reason_before_any_create() {
    let env = WithSandbox::start().await;
    for (scope, code, needle) in [
        (addr("support"), "invalid_policy_scope", "scope group"),
        (addr("room101"), "invalid_policy_scope", "RoomMailbox"),
        (
            addr("allstaff"),
            "invalid_policy_scope",
            "distribution group",
        ),
        (
            addr("projectx"),
            "invalid_policy_scope",
            "Microsoft 365 group",
        ),
        (addr("nobody"), "validation_failed", "no recipient"),
        (
            "no-such-group".to_string(),
            "validation_failed",
            "PUT /scope-groups",
        ),
    ] {
        let p = post_policy(
            &env,
            json!({"app_id": APP, "scope": scope, "access_right": "RestrictAccess"}),
            (422, code),
        )
        .await;
        assert!(
            p["detail"].as_str().unwrap().contains(needle),
            "{scope}: {p}"
        );
    }
    post_policy(
        &env,
        json!({"app_id": "not-a-guid", "scope": addr("dave"), "access_right": "RestrictAccess"}),
        (422, "validation_failed"),
    )
    .await;
    // An app that is not in the tenant.
    let body = json!({"app_id": uuid::Uuid::new_v4(), "scope": addr("dave"), "access_right": "RestrictAccess"});
    let p = post_policy(&env, body, (422, "validation_failed")).await;
    assert_eq!(p["errors"][0]["field"], "app_id");
    assert_eq!(count(&env, "New-ApplicationAccessPolicy").await, 0);

    // A single user mailbox is a valid scope.
    let p = restrict(&env, &addr("dave")).await;
    assert_eq!(p["scope_type"], "UserMailbox");
    assert_eq!(p["scope_alias"], Value::Null);
}

#[tokio::test]
async fn fifty_concurrent_identical_posts_create_one_policy() {
    let env = WithSandbox::start_adjusted(mailscope::sandbox::SandboxSettings::fast(), |s| {
        s.database.acquire_timeout_seconds = 60;
    })
    .await;
    create_group(&env, "crm-scope", &["alice"]).await;
    let body = json!({"app_id": APP, "scope": "crm-scope", "access_right": "RestrictAccess"});
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (api, body) = (env.api(), body.clone());
            tokio::spawn(async move {
                let res = api
                    .send(Method::POST, "/access-policies", Some(&body))
                    .await;
                let status = res.status().as_u16();
                let v: Value = res.json().await.unwrap();
                (status, v["id"].clone())
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let statuses: Vec<u16> = results.iter().map(|r| r.0).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        49,
        "{statuses:?}"
    );
    assert!(
        results.iter().all(|r| r.1 == results[0].1),
        "one id for all"
    );
    assert_eq!(count(&env, "New-ApplicationAccessPolicy").await, 1);
}

/// Writers of one tenant's policies queue in the process, not in the pool: with the test's pool
/// of 4 and its 2 s wait for a connection, 50 concurrent POSTs on tenant A all succeed while
/// another tenant's reads keep answering.
#[tokio::test]
async fn concurrent_policy_writes_on_one_tenant_leave_the_pool_to_others() {
    let env = WithSandbox::start().await;
    assert_eq!(env.app.settings.database.pool_size, 4);
    create_group(&env, "crm-scope", &["alice"]).await;
    let other = "0c0c0c0c-1111-4222-8333-444455556666";
    let res = env
        .app
        .http
        .put(env.app.url(&format!("/v1/tenants/{other}")))
        .bearer_auth(env.app.admin())
        .json(&tenant_body("other-tenant-secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);

    let body = json!({"app_id": APP, "scope": "crm-scope", "access_right": "RestrictAccess"});
    let writers: Vec<_> = (0..50)
        .map(|_| {
            let (http, url, token) = (
                env.app.http.clone(),
                env.url("/access-policies"),
                env.app.admin(),
            );
            let body = body.clone();
            tokio::spawn(async move {
                let res = http
                    .post(url)
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = res.status().as_u16();
                (status, res.text().await.unwrap())
            })
        })
        .collect();
    let reads_url = env.app.url(&format!("/v1/tenants/{other}/access-policies"));
    let mut reads = Vec::new();
    while !writers.iter().all(|w| w.is_finished()) {
        let res = env
            .app
            .http
            .get(&reads_url)
            .bearer_auth(env.app.admin())
            .send()
            .await
            .unwrap();
        reads.push(res.status().as_u16());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut statuses = Vec::new();
    for w in writers {
        let (status, text) = w.await.unwrap();
        assert!(status == 200 || status == 201, "{status}: {text}");
        statuses.push(status);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1);
    assert!(reads.len() > 1, "reads ran during the writes");
    assert!(
        reads.iter().all(|s| *s == 200),
        "tenant B answered {reads:?} while tenant A was busy"
    );
}

#[tokio::test]
async fn a_policy_created_before_a_crash_is_adopted_on_retry() {
    let env = WithSandbox::start().await;
    create_group(&env, "crm-scope", &["alice"]).await;
    break_inserts(&env, "access_policies").await;
    let body = json!({"app_id": APP, "scope": "crm-scope", "access_right": "RestrictAccess"});
    post_policy(&env, body.clone(), (500, "internal")).await;
    assert_eq!(count(&env, "New-ApplicationAccessPolicy").await, 1);
    repair_inserts(&env, "access_policies").await;

    let p = post_policy(&env, body, 200).await;
    assert_eq!(p["origin"], "adopted");
    assert_eq!(p["state"], "unverified");
    assert_eq!(
        count(&env, "New-ApplicationAccessPolicy").await,
        1,
        "not duplicated"
    );
}

#[tokio::test]
async fn put_creates_the_new_policy_before_removing_the_old() {
    let env = WithSandbox::start().await;
    create_group(&env, "sales", &["alice"]).await;
    create_group(&env, "finance", &["bob"]).await;
    let p = restrict(&env, "sales").await;
    let id = p["id"].as_str().unwrap();
    let replaced = env
        .api()
        .put(
            &format!("/access-policies/{id}"),
            &json!({"app_id": APP, "scope": "finance", "access_right": "RestrictAccess"}),
            200,
        )
        .await;
    assert_eq!(
        replaced["id"], p["id"],
        "mailscope's id survives a replacement"
    );
    assert_eq!(replaced["scope_alias"], "finance");

    let calls = env.sandbox_calls("exchange").await;
    let seq = |cmdlet: &str| -> Vec<u64> {
        calls
            .iter()
            .filter(|c| c["cmdlet"] == cmdlet && c["status"] == 200)
            .map(|c| c["seq"].as_u64().unwrap())
            .collect()
    };
    let news = seq("New-ApplicationAccessPolicy");
    let removes = seq("Remove-ApplicationAccessPolicy");
    assert_eq!((news.len(), removes.len()), (2, 1));
    assert!(
        news[1] < removes[0],
        "created {news:?} before removing {removes:?}"
    );

    assert_eq!(access_test(&env, "bob").await["exchange"]["granted"], true);
    assert_eq!(
        access_test(&env, "alice").await["exchange"]["granted"],
        false
    );
    // Moving the scope group out from under the policy is refused while it is in use.
    env.api()
        .delete("/scope-groups/finance", (409, "scope_group_in_use"))
        .await;
    // The old scope is free again.
    env.api().delete("/scope-groups/sales", 204).await;
}

#[tokio::test]
async fn the_last_restrict_policy_is_not_removed_without_consent() {
    let env = WithSandbox::start().await;
    create_group(&env, "sales", &["alice"]).await;
    let a = restrict(&env, "sales").await;
    let b = restrict(&env, &addr("dave")).await;
    let (a, b) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());

    // Two restrict policies: removing one keeps the app restricted.
    delete_policy(&env, b, "", 204).await;
    let p = delete_policy(&env, a, "", (409, "last_restrict_policy")).await;
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("allow_unrestricted=true")
    );
    // Turning it into DenyAccess would open the tenant just the same.
    env.api()
        .put(
            &format!("/access-policies/{a}"),
            &json!({"app_id": APP, "scope": "sales", "access_right": "DenyAccess"}),
            (409, "last_restrict_policy"),
        )
        .await;
    assert_eq!(count(&env, "Remove-ApplicationAccessPolicy").await, 1);
    assert_eq!(access_test(&env, "bob").await["exchange"]["granted"], false);

    delete_policy(&env, a, "?allow_unrestricted=true", 204).await;
    assert_eq!(access_test(&env, "bob").await["exchange"]["granted"], true);
    let events: Value = env.api().get("/audit-events", 200).await;
    let last = &events["items"][0];
    assert_eq!(last["action"], "access_policy.deleted");
    assert_eq!(last["details"]["left_unrestricted"], true);
    delete_policy(&env, a, "", (404, "not_found")).await;
}

#[tokio::test]
async fn patch_changes_the_description_in_place() {
    let env = WithSandbox::start().await;
    let p = restrict(&env, &addr("dave")).await;
    let id = p["id"].as_str().unwrap();
    let v = env
        .api()
        .patch(
            &format!("/access-policies/{id}"),
            &json!({"description": "CRM: Dave only"}),
            200,
        )
        .await;
    assert_eq!(v["description"], "CRM: Dave only");
    assert_eq!(count(&env, "Set-ApplicationAccessPolicy").await, 1);
    assert_eq!(count(&env, "New-ApplicationAccessPolicy").await, 1);
    env.api()
        .patch(
            &format!("/access-policies/{id}"),
            &json!({"access_right": "DenyAccess"}),
            (422, "validation_failed"),
        )
        .await;
}

#[tokio::test]
async fn access_tests_compare_exchange_with_the_local_rules_and_explain_differences() {
    let env = WithSandbox::start().await;
    create_group(&env, "sales", &["alice"]).await;
    let p = restrict(&env, "sales").await;
    let alice = access_test(&env, "alice").await;
    assert_eq!(alice["exchange"]["access_check_result"], "Granted");
    assert_eq!(alice["local"]["granted"], true);
    assert_eq!(alice["local"]["rule"], "restrict_match");
    assert_eq!(alice["local"]["matched_policies"], json!([p["id"]]));
    assert_eq!(alice["agree"], true);
    let bob = access_test(&env, "bob").await;
    assert_eq!(bob["exchange"]["granted"], false);
    assert_eq!(bob["local"]["rule"], "restrict_miss");
    assert_eq!(bob["agree"], true);

    // Exchange counting only direct members of nested groups (docs/microsoft-365.md §2.5) is named as the cause.
    let settings = format!("/tenants/{}/settings", env.tenant);
    let nested = json!({"aapNestedGroups": "direct_only"});
    env.control().patch(&settings, &nested, 200).await;
    restrict(&env, &addr("financeteam")).await;
    let carol = access_test(&env, "carol").await;
    assert_eq!(carol["local"]["granted"], true, "{carol}");
    assert_eq!(carol["exchange"]["granted"], false);
    assert_eq!(carol["agree"], false);
    assert!(
        carol["disagreement"].as_str().unwrap().contains("nested"),
        "{carol}"
    );

    // A policy mailscope does not know about is named, with the fix.
    env.app
        .db
        .client()
        .await
        .execute(
            "DELETE FROM access_policies WHERE scope_alias = 'sales'",
            &[],
        )
        .await
        .unwrap();
    let alice = access_test(&env, "alice").await;
    assert_eq!(alice["agree"], false);
    assert!(
        alice["disagreement"].as_str().unwrap().contains("/sync"),
        "{alice}"
    );
}

#[tokio::test]
async fn sync_imports_the_tenant_and_reports_drift() {
    let env = WithSandbox::start().await;
    let empty = sync(&env, "").await;
    assert_eq!(empty["access_policies"]["unchanged"], 0);
    assert!(
        empty["access_policies"]["added"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    create_group(&env, "sales", &["alice"]).await;
    let forgotten = restrict(&env, "sales").await;
    let changed = restrict(&env, &addr("dave")).await;
    let db = env.app.db.client().await;
    // Drift made outside mailscope: a record lost, a right changed, a policy removed, a member added.
    db.execute(
        "DELETE FROM access_policies WHERE id = $1",
        &[&forgotten["id"]
            .as_str()
            .unwrap()
            .parse::<uuid::Uuid>()
            .unwrap()],
    )
    .await
    .unwrap();
    db.execute(
        "UPDATE access_policies SET access_right = 'DenyAccess' WHERE id = $1",
        &[&changed["id"]
            .as_str()
            .unwrap()
            .parse::<uuid::Uuid>()
            .unwrap()],
    )
    .await
    .unwrap();
    let ghost = uuid::Uuid::new_v4();
    db.execute(
        "INSERT INTO access_policies (id, tenant_id, app_id, scope_object_id, scope_type,
             scope_address, access_right, description, state, origin)
         VALUES ($1, $2, $3, 'gone-scope', 'UserMailbox', 'gone@x.com', 'RestrictAccess', ' ',
             'pending_propagation', 'created')",
        &[&ghost, &env.tenant.parse::<uuid::Uuid>().unwrap(), &APP],
    )
    .await
    .unwrap();
    let members = format!("/tenants/{}/groups/sales/members", env.tenant);
    env.control()
        .post(&members, &json!({"member": "bob"}), 200)
        .await;
    // A security group used by a policy made outside mailscope is imported with it.
    post_policy(
        &env,
        json!({"app_id": APP, "scope": addr("financeteam"), "access_right": "DenyAccess"}),
        201,
    )
    .await;
    db.execute(
        "DELETE FROM access_policies WHERE scope_address = $1",
        &[&addr("financeteam")],
    )
    .await
    .unwrap();

    let dry = sync(&env, "?dry_run=true").await;
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        dry["access_policies"]["added"].as_array().unwrap().len(),
        2,
        "{dry:#}"
    );
    let again = sync(&env, "?dry_run=true").await;
    assert_eq!(
        again["access_policies"], dry["access_policies"],
        "a dry run changes nothing"
    );

    let report = sync(&env, "").await;
    let pol = &report["access_policies"];
    assert_eq!(pol["added"].as_array().unwrap().len(), 2, "{report:#}");
    assert_eq!(pol["removed"].as_array().unwrap().len(), 1);
    assert_eq!(pol["removed"][0]["id"], ghost.to_string());
    assert_eq!(pol["changed"].as_array().unwrap().len(), 1);
    assert_eq!(pol["changed"][0]["id"], changed["id"]);
    assert_eq!(pol["changed"][0]["changes"][0]["field"], "access_right");
    assert_eq!(pol["changed"][0]["changes"][0]["tenant"], "RestrictAccess");
    let groups = &report["scope_groups"];
    assert_eq!(groups["changed"][0]["key"], "sales", "{report:#}");
    assert_eq!(groups["changed"][0]["changes"][0]["field"], "members");
    assert_eq!(groups["added"][0]["key"], "financeteam");

    // The records now match the tenant: a second sync finds no drift.
    let after = sync(&env, "").await;
    assert_eq!(after["access_policies"]["unchanged"], 3, "{after:#}");
    for set in ["access_policies", "scope_groups"] {
        for kind in ["added", "removed", "changed"] {
            assert!(
                after[set][kind].as_array().unwrap().is_empty(),
                "{set}.{kind}: {after:#}"
            );
        }
    }
    let list: Value = env.api().get("/access-policies", 200).await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert!(
        items
            .iter()
            .any(|p| p["origin"] == "imported" && p["scope_alias"] == "sales")
    );
}

#[tokio::test]
async fn callers_of_other_tenants_see_nothing() {
    let env = WithSandbox::start().await;
    let p = restrict(&env, &addr("dave")).await;
    let other = env.api().with_token(env.app.token(
        &["MailScope.Write"],
        &["1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9"],
    ));
    let id = p["id"].as_str().unwrap();
    let policy = json!({"app_id": APP, "scope": addr("alice"), "access_right": "RestrictAccess"});
    let test = json!({"app_id": APP, "mailbox": addr("alice")});
    for (method, path, body) in [
        (Method::GET, format!("/access-policies/{id}"), None),
        (Method::GET, "/access-policies".into(), None),
        (
            Method::DELETE,
            format!("/access-policies/{id}?allow_unrestricted=true"),
            None,
        ),
        (Method::POST, "/access-policies".into(), Some(&policy)),
        (Method::POST, "/access-tests".into(), Some(&test)),
        (Method::POST, "/sync".into(), None),
    ] {
        other.expect(method, &path, body, (404, "not_found")).await;
    }
    assert_eq!(count(&env, "Remove-ApplicationAccessPolicy").await, 0);
    let reader = env
        .api()
        .with_token(env.app.token(&["MailScope.Read"], &[&env.tenant]));
    let path = format!("/access-policies/{id}");
    reader.delete(&path, (403, "forbidden")).await;
}

/// Exchange takes a while to show a group it just created (replication). A policy on a scope group
/// created a moment ago waits for it instead of calling it unknown.
#[tokio::test]
async fn a_policy_on_a_just_created_scope_group_waits_for_replication() {
    let mut sb = mailscope::sandbox::SandboxSettings::fast();
    sb.pacing.replication_delay =
        mailscope::sandbox::settings::DelayRange::fixed(std::time::Duration::from_millis(1500));
    let env = WithSandbox::start_with(sb).await;
    create_group(&env, "fresh-scope", &["alice"]).await;
    post_policy(
        &env,
        json!({"app_id": APP, "scope": "fresh-scope", "access_right": "RestrictAccess"}),
        201,
    )
    .await;
    // An address nobody created still fails fast.
    post_policy(
        &env,
        json!({"app_id": APP, "scope": addr("nobody"), "access_right": "RestrictAccess"}),
        422,
    )
    .await;
}

/// A scope group mailscope just created is recognised by any of its names: by the address
/// `PUT /scope-groups` returned, a policy waits for replication as it does by alias.
#[tokio::test]
async fn a_policy_on_a_just_created_scope_group_named_by_address_waits_for_replication() {
    let mut sb = mailscope::sandbox::SandboxSettings::fast();
    sb.pacing.replication_delay =
        mailscope::sandbox::settings::DelayRange::fixed(std::time::Duration::from_millis(1500));
    let env = WithSandbox::start_with(sb).await;
    let group = create_group(&env, "fresh-scope", &["alice"]).await;
    let address = group["primary_smtp_address"].as_str().unwrap().to_string();
    let body = json!({"app_id": APP, "scope": address, "access_right": "RestrictAccess"});
    let p = post_policy(&env, body, 201).await;
    assert_eq!(p["scope_alias"], "fresh-scope", "{p}");
}

/// The guard's advice works: once the app no longer holds any permission that policies restrict
/// (here revoked with `PUT /applications/{key}`), its last RestrictAccess policy can go, since
/// nothing widens.
#[tokio::test]
async fn the_last_restrict_policy_goes_once_the_app_holds_no_mail_permission() {
    let env = WithSandbox::start().await;
    let app_body = |perms: Value| json!({"display_name": "Reporting", "permissions": perms, "grant_admin_consent": true});
    let app = env
        .api()
        .put(
            "/applications/reporting",
            &app_body(json!(["Mail.Read"])),
            201,
        )
        .await;
    let app_id = app["app_id"].as_str().unwrap().to_string();
    let body = json!({"app_id": app_id, "scope": addr("alice"), "access_right": "RestrictAccess"});
    let id = post_policy(&env, body, 201).await["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Holding Mail.Read, the app would reach every mailbox: refused, naming the permission.
    let p = delete_policy(&env, &id, "", (409, "last_restrict_policy")).await;
    assert!(p["detail"].as_str().unwrap().contains("Mail.Read"), "{p}");

    // Follow the advice: revoke the permissions, then the policy can go without the override.
    env.api()
        .put("/applications/reporting", &app_body(json!([])), 200)
        .await;
    delete_policy(&env, &id, "", 204).await;
    assert_eq!(count(&env, "Remove-ApplicationAccessPolicy").await, 1);
}

/// Issue 15 goal 3: a policy write holds no pooled connection while it waits for Exchange. With a
/// pool of one connection and every Exchange call slowed to 1.5 s, another tenant's reads keep
/// answering at once while a policy is created (before, the creation held the one connection,
/// with its transaction and advisory lock, across `Get-…` and `New-ApplicationAccessPolicy`: the
/// reads waited the pool's 2 s, then answered 503).
#[tokio::test]
async fn a_policy_write_waiting_on_a_slow_exchange_holds_no_connection() {
    let env = WithSandbox::start_adjusted(mailscope::sandbox::SandboxSettings::fast(), |s| {
        s.database.pool_size = 1;
    })
    .await;
    create_group(&env, "crm-scope", &["alice"]).await;
    let other = OtherTenant::register(&env).await;
    let body = json!({"app_id": APP, "scope": "crm-scope", "access_right": "RestrictAccess"});
    let (status, text) = assert_write_leaves_reads_fast(
        &env,
        &other,
        "exchange",
        (Method::POST, "/access-policies", Some(body)),
        "/access-policies",
    )
    .await;
    assert_eq!(status, 201, "{text}");
}

/// Issue 15 goal 3: sync reads the tenant with no pooled connection held, then writes in one
/// short transaction: with a pool of one connection and Exchange slowed to 1.5 s a call, another
/// tenant's reads keep answering while it runs, and the group it imports is recorded.
#[tokio::test]
async fn sync_reading_a_slow_exchange_holds_no_connection() {
    let env = WithSandbox::start_adjusted(mailscope::sandbox::SandboxSettings::fast(), |s| {
        s.database.pool_size = 1;
    })
    .await;
    create_group(&env, "crm-scope", &["alice"]).await;
    restrict(&env, "crm-scope").await;
    let other = OtherTenant::register(&env).await;
    let (status, text) = assert_write_leaves_reads_fast(
        &env,
        &other,
        "exchange",
        (Method::POST, "/sync", None),
        "/access-policies",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let report: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["scope_groups"]["unchanged"], 1, "{report}");
    assert_eq!(report["access_policies"]["unchanged"], 1, "{report}");
}
