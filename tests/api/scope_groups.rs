//! `/v1/tenants/{id}/scope-groups` against the sandbox: groups are created with their members in
//! one Exchange call, validated before Exchange is touched, adopted after a crash, created once
//! under concurrency, and invisible to callers of other tenants.
use serde_json::{Value, json};

use crate::helpers::*;

pub const DOMAIN: &str = "contoso-sandbox.onmicrosoft.com";

pub fn addr(name: &str) -> String {
    format!("{name}@{DOMAIN}")
}

/// Calls of `cmdlet` the sandbox recorded for the tenant.
pub async fn count(env: &WithSandbox, cmdlet: &str) -> u64 {
    env.counters().await[format!("exchange:{cmdlet}")]
        .as_u64()
        .unwrap_or(0)
}

pub async fn create_group(env: &WithSandbox, alias: &str, members: &[&str]) -> Value {
    let members: Vec<String> = members.iter().map(|m| addr(m)).collect();
    let path = format!("/scope-groups/{alias}");
    env.api()
        .put(&path, &json!({"members": members}), 201)
        .await
}

/// Make the next inserts into `table` fail, as a crash between Exchange and the database would.
pub async fn break_inserts(env: &WithSandbox, table: &str) {
    env.app
        .db
        .client()
        .await
        .batch_execute(&format!(
            "CREATE FUNCTION fail_insert() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'simulated crash'; END $$;
             CREATE TRIGGER fail_insert BEFORE INSERT ON {table}
                 FOR EACH ROW EXECUTE FUNCTION fail_insert();"
        ))
        .await
        .unwrap();
}

pub async fn repair_inserts(env: &WithSandbox, table: &str) {
    env.app
        .db
        .client()
        .await
        .batch_execute(&format!(
            "DROP TRIGGER fail_insert ON {table}; DROP FUNCTION fail_insert();"
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn put_creates_a_security_group_with_all_members_in_one_call_and_is_idempotent() {
    let env = WithSandbox::start().await;
    let body = json!({"display_name": "CRM scope", "members": [addr("alice"), addr("support").to_uppercase()]});
    let api = env.api();
    let g = api.put("/scope-groups/crm-scope", &body, 201).await;
    assert_eq!(g["alias"], "crm-scope");
    assert_eq!(g["display_name"], "CRM scope");
    assert_eq!(g["primary_smtp_address"], addr("crm-scope"));
    assert_eq!(g["origin"], "created");
    assert_eq!(g["membership"], "exact");
    assert_eq!(g["members"], json!([addr("alice"), addr("support")]));
    assert!(g["object_id"].as_str().unwrap().len() >= 32);

    let new_calls: Vec<Value> = env
        .sandbox_calls("exchange")
        .await
        .into_iter()
        .filter(|c| c["cmdlet"] == "New-DistributionGroup")
        .collect();
    assert_eq!(new_calls.len(), 1);
    assert_eq!(new_calls[0]["parameters"]["Type"], "Security");
    assert_eq!(
        new_calls[0]["parameters"]["Members"],
        json!([addr("alice"), addr("support")])
    );
    assert_eq!(count(&env, "Add-DistributionGroupMember").await, 0);
    assert_eq!(count(&env, "Update-DistributionGroupMember").await, 0);

    // Again: nothing changes in the tenant.
    api.put("/scope-groups/crm-scope", &body, 200).await;
    assert_eq!(count(&env, "New-DistributionGroup").await, 1);
    assert_eq!(count(&env, "Update-DistributionGroupMember").await, 0);

    let live = api.get("/scope-groups/crm-scope", 200).await;
    assert_eq!(live["members"], json!([addr("alice"), addr("support")]));
    let list = api.get("/scope-groups", 200).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["alias"], "crm-scope");
}

#[tokio::test]
async fn exact_replaces_and_additive_adds_with_one_update_call() {
    let env = WithSandbox::start().await;
    create_group(&env, "team", &["alice", "bob"]).await;
    let api = env.api();
    let body = json!({"members": [addr("bob"), addr("carol")]});
    let g = api.put("/scope-groups/team", &body, 200).await;
    assert_eq!(g["members"], json!([addr("bob"), addr("carol")]));
    assert_eq!(count(&env, "Update-DistributionGroupMember").await, 1);

    let body = json!({"members": [addr("dave")], "membership": "additive"});
    let g = api.put("/scope-groups/team", &body, 200).await;
    assert_eq!(
        g["members"],
        json!([addr("bob"), addr("carol"), addr("dave")])
    );
    assert_eq!(g["membership"], "additive");
    assert_eq!(count(&env, "Update-DistributionGroupMember").await, 2);
    let live = api.get("/scope-groups/team", 200).await;
    assert_eq!(live["members"], g["members"]);
}

#[tokio::test]
async fn unknown_or_unsuitable_members_are_named_before_exchange_is_changed() {
    let env = WithSandbox::start().await;
    let api = env.api();
    let body =
        json!({"members": [addr("alice"), addr("nobody"), addr("vendor"), "not-an-address"]});
    let p = api
        .put("/scope-groups/bad", &body, (422, "validation_failed"))
        .await;
    let errors = p["errors"].as_array().unwrap();
    assert!(
        errors.iter().any(|e| e["field"] == "members[3]"
            && e["message"].as_str().unwrap().contains("not an email"))
    );
    let body = json!({"members": [addr("alice"), addr("nobody"), addr("vendor")]});
    let p = api
        .put("/scope-groups/bad", &body, (422, "validation_failed"))
        .await;
    let text = p["errors"].to_string();
    assert!(
        text.contains("members[1]") && text.contains(&addr("nobody")),
        "{p}"
    );
    assert!(
        text.contains("members[2]") && text.contains("contact"),
        "{p}"
    );
    assert_eq!(count(&env, "New-DistributionGroup").await, 0);

    // Shared, room and equipment mailboxes are fine as members.
    let g = create_group(&env, "resources", &["support", "room101", "projector"]).await;
    assert_eq!(g["members"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn an_alias_held_by_a_group_that_cannot_be_a_scope_is_refused_with_the_reason() {
    let env = WithSandbox::start().await;
    // "All Staff" is a distribution group whose alias is AllStaff.
    let body = json!({"members": [addr("alice")]});
    let p = env
        .api()
        .put(
            "/scope-groups/allstaff",
            &body,
            (422, "invalid_policy_scope"),
        )
        .await;
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("MailUniversalDistributionGroup"),
        "{p}"
    );
    assert_eq!(count(&env, "New-DistributionGroup").await, 0);
    assert_eq!(count(&env, "Update-DistributionGroupMember").await, 0);
}

#[tokio::test]
async fn members_are_added_from_json_or_a_csv_export() {
    let env = WithSandbox::start().await;
    create_group(&env, "crm", &["alice"]).await;
    let (api, url) = (env.api(), "/scope-groups/crm/members");
    let v = api.post(url, &json!({"members": [addr("bob")]}), 200).await;
    assert_eq!(v["added"], json!([addr("bob")]));

    let csv = format!(
        "\u{feff}DisplayName,UserPrincipalName,Department\r\n\"Chen, Carol\",{},Finance\r\nAlice,{},Sales\r\n",
        addr("carol"),
        addr("alice")
    );
    let res = api
        .send_body(Method::POST, url, "text/csv; charset=utf-8", csv)
        .await;
    let v = json_body(res, 200, "POST csv").await;
    assert_eq!(v["added"], json!([addr("carol")]));
    assert_eq!(v["already_members"], json!([addr("alice")]));
    assert_eq!(
        v["scope_group"]["members"],
        json!([addr("alice"), addr("bob"), addr("carol")])
    );
    // One whole-list call per request, never one call per member.
    assert_eq!(count(&env, "Update-DistributionGroupMember").await, 2);
    assert_eq!(count(&env, "Add-DistributionGroupMember").await, 0);

    let csv = format!("Mail\n{}\n", addr("dave"));
    let res = api.send_body(Method::POST, url, "text/csv", csv).await;
    let p = assert_problem(res, 422, "validation_failed").await;
    assert!(p["detail"].as_str().unwrap().contains("UserPrincipalName"));
    let csv = format!("UserPrincipalName\n{}\n", addr("ghost"));
    let res = api.send_body(Method::POST, url, "text/csv", csv).await;
    let p = assert_problem(res, 422, "validation_failed").await;
    assert_eq!(p["errors"][0]["field"], "csv line 2");
    let res = api.send_body(Method::POST, url, "text/plain", "x").await;
    assert_problem(res, 415, "unsupported_media_type").await;
}

#[tokio::test]
async fn a_member_and_then_the_group_are_deleted() {
    let env = WithSandbox::start().await;
    create_group(&env, "crm", &["alice", "bob"]).await;
    for _ in 0..2 {
        env.api()
            .delete(&format!("/scope-groups/crm/members/{}", addr("bob")), 204)
            .await;
    }
    let live = env.api().get("/scope-groups/crm", 200).await;
    assert_eq!(live["members"], json!([addr("alice")]));

    env.api().delete("/scope-groups/crm", 204).await;
    assert_eq!(count(&env, "Remove-DistributionGroup").await, 1);
    env.api().get("/scope-groups/crm", (404, "not_found")).await;
    env.api()
        .delete("/scope-groups/crm", (404, "not_found"))
        .await;
}

#[tokio::test]
async fn fifty_concurrent_identical_puts_create_one_group() {
    let env = WithSandbox::start_adjusted(mailscope::sandbox::SandboxSettings::fast(), |s| {
        s.database.acquire_timeout_seconds = 60;
    })
    .await;
    let body = json!({"members": [addr("alice"), addr("bob")]});
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (api, body) = (env.api(), body.clone());
            tokio::spawn(async move {
                let res = api.send(Method::PUT, "/scope-groups/crm", Some(&body));
                res.await.status().as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
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
    assert_eq!(count(&env, "New-DistributionGroup").await, 1);
    assert_eq!(count(&env, "Update-DistributionGroupMember").await, 0);
}

#[tokio::test]
async fn a_group_created_before_a_crash_is_adopted_on_retry() {
    let env = WithSandbox::start().await;
    break_inserts(&env, "scope_groups").await;
    let body = json!({"members": [addr("alice")]});
    let api = env.api();
    api.put("/scope-groups/crm", &body, (500, "internal")).await;
    assert_eq!(count(&env, "New-DistributionGroup").await, 1);
    repair_inserts(&env, "scope_groups").await;

    let g = api.put("/scope-groups/crm", &body, 201).await;
    assert_eq!(g["origin"], "adopted");
    assert_eq!(g["members"], json!([addr("alice")]));
    assert_eq!(
        count(&env, "New-DistributionGroup").await,
        1,
        "no second group"
    );
}

#[tokio::test]
async fn callers_of_other_tenants_and_readers_cannot_change_groups() {
    let env = WithSandbox::start().await;
    create_group(&env, "crm", &["alice"]).await;
    let other = env.api().with_token(env.app.token(
        &["MailScope.Write"],
        &["1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9"],
    ));
    let members = json!({"members": []});
    for (method, path, body) in [
        (Method::GET, "/scope-groups/crm", None),
        (Method::PUT, "/scope-groups/crm", Some(&members)),
        (Method::GET, "/scope-groups", None),
    ] {
        other.expect(method, path, body, (404, "not_found")).await;
    }

    let reader = env
        .api()
        .with_token(env.app.token(&["MailScope.Read"], &[&env.tenant]));
    reader
        .put("/scope-groups/crm", &members, (403, "forbidden"))
        .await;
    reader.get("/scope-groups/crm", 200).await;
}

/// Add mailboxes to the sandbox tenant; their primary SMTP addresses.
pub async fn new_mailboxes(env: &WithSandbox, prefix: &str, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let res = env
            .app
            .http
            .post(format!(
                "{}/_sandbox/tenants/{}/mailboxes",
                env.sandbox.base_url, env.tenant
            ))
            .json(&json!({"name": format!("{prefix}{i:04}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
        let v: Value = res.json().await.unwrap();
        out.push(v["primarySmtpAddress"].as_str().unwrap().to_string());
    }
    out
}

pub async fn clear_counters(env: &WithSandbox) {
    let res = env
        .app
        .http
        .delete(format!("{}/_sandbox/counters", env.sandbox.base_url))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
}

/// `PUT /scope-groups/{alias}`, the raw answer.
async fn put_group(env: &WithSandbox, alias: &str, body: Value) -> reqwest::Response {
    env.app
        .http
        .put(env.url(&format!("/scope-groups/{alias}")))
        .bearer_auth(env.app.admin())
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Exchange calls recorded for the default tenant since the counters were last cleared.
pub async fn exchange_call_count(env: &WithSandbox) -> u64 {
    env.counters()
        .await
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("exchange:"))
        .map(|(_, v)| v.as_u64().unwrap_or(0))
        .sum()
}

#[tokio::test]
async fn many_members_cost_one_lookup_and_one_create_and_an_unchanged_put_only_reads() {
    let env = WithSandbox::start().await;
    let mut members = new_mailboxes(&env, "bulk", 60).await;
    // Named by a secondary form too: upper case, and one address given twice.
    members.push(members[0].to_uppercase());
    clear_counters(&env).await;
    let res = put_group(&env, "bulk", json!({"members": members})).await;
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    let g: Value = res.json().await.unwrap();
    assert_eq!(g["members"].as_array().unwrap().len(), 60);
    assert_eq!(
        count(&env, "Get-Recipient").await,
        1,
        "{}",
        env.counters().await
    );
    assert_eq!(count(&env, "New-DistributionGroup").await, 1);
    assert_eq!(
        exchange_call_count(&env).await,
        3,
        "{}",
        env.counters().await
    );

    // Nothing to change: the group and its members are read, nothing else is asked.
    clear_counters(&env).await;
    let res = put_group(&env, "bulk", json!({"members": members})).await;
    assert_eq!(res.status(), 200);
    assert_eq!(count(&env, "Get-DistributionGroup").await, 1);
    assert_eq!(count(&env, "Get-DistributionGroupMember").await, 1);
    assert_eq!(
        exchange_call_count(&env).await,
        2,
        "{}",
        env.counters().await
    );

    // Ten more: one lookup for the ten, one update for the whole list.
    let more = new_mailboxes(&env, "more", 10).await;
    clear_counters(&env).await;
    let res = put_group(
        &env,
        "bulk",
        json!({"members": more, "membership": "additive"}),
    )
    .await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let g: Value = res.json().await.unwrap();
    assert_eq!(g["members"].as_array().unwrap().len(), 70);
    assert_eq!(count(&env, "Get-Recipient").await, 1);
    assert_eq!(count(&env, "Update-DistributionGroupMember").await, 1);
}

#[tokio::test]
async fn a_burst_of_puts_on_one_tenant_does_not_make_another_tenants_reads_fail() {
    let mut sb = mailscope::sandbox::SandboxSettings::fast();
    // Slow Microsoft, as in production: each PUT spends most of its time waiting on Exchange.
    sb.pacing.latency =
        mailscope::sandbox::settings::DelayRange::fixed(std::time::Duration::from_millis(150));
    let env = WithSandbox::start_adjusted(sb, |s| {
        s.m365.exchange_rate_per_sec = 50.0;
        s.m365.exchange_burst = 50;
    })
    .await;
    let other = "22222222-2222-4222-8222-222222222222";
    let res = env
        .app
        .http
        .put(env.app.url(&format!("/v1/tenants/{other}")))
        .bearer_auth(env.app.admin())
        .json(&tenant_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);

    let burst: Vec<_> = (0..32)
        .map(|i| {
            let http = env.app.http.clone();
            let url = env.url(&format!("/scope-groups/burst{i}"));
            let token = env.app.admin();
            let body = json!({"members": [addr("alice"), addr("bob")]});
            tokio::spawn(async move {
                let res = http
                    .put(url)
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                (res.status().as_u16(), res.text().await.unwrap())
            })
        })
        .collect();
    // Tenant B reads while tenant A's burst runs: each answer must be a success.
    let reader = env.app.token(&["MailScope.Read"], &[other]);
    let mut reads = 0;
    while !burst.iter().all(|t| t.is_finished()) && reads < 400 {
        for path in [
            format!("/v1/tenants/{other}"),
            format!("/v1/tenants/{other}/scope-groups"),
        ] {
            let res = env
                .app
                .http
                .get(env.app.url(&path))
                .bearer_auth(&reader)
                .send()
                .await
                .unwrap();
            let status = res.status().as_u16();
            assert_eq!(status, 200, "{path}: {}", res.text().await.unwrap());
            reads += 1;
        }
    }
    assert!(reads > 0);
    for t in burst {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 201, "{body}");
    }
}

/// A sandbox whose Exchange shows new objects only after `ms` (replication).
fn replicating(ms: u64) -> mailscope::sandbox::SandboxSettings {
    let mut sb = mailscope::sandbox::SandboxSettings::fast();
    sb.pacing.replication_delay =
        mailscope::sandbox::settings::DelayRange::fixed(std::time::Duration::from_millis(ms));
    sb
}

/// Repeating a successful PUT while Exchange still replicates the new group answers as a repeat
/// (the recorded group, found once visible), never `already_exists` and never a second group.
#[tokio::test]
async fn a_repeated_put_during_replication_finds_the_group_it_created() {
    let env = WithSandbox::start_with(replicating(1500)).await;
    let body = json!({"members": [addr("alice")]});
    let first = env.api().put("/scope-groups/fresh", &body, 201).await;
    let again = env.api().put("/scope-groups/fresh", &body, 200).await;
    assert_eq!(again["object_id"], first["object_id"]);
    assert_eq!(again["origin"], "created");
    assert_eq!(count(&env, "New-DistributionGroup").await, 1);
}

/// A PUT that created the group and crashed before recording it is retried at once: the retry
/// adopts the group being replicated instead of failing with `already_exists`.
#[tokio::test]
async fn a_retry_after_a_crash_during_replication_adopts_the_group() {
    let env = WithSandbox::start_with(replicating(1500)).await;
    break_inserts(&env, "scope_groups").await;
    let body = json!({"members": [addr("alice")]});
    env.api()
        .put("/scope-groups/fresh", &body, (500, "internal"))
        .await;
    repair_inserts(&env, "scope_groups").await;
    let retry = env.api().put("/scope-groups/fresh", &body, 201).await;
    assert_eq!(retry["origin"], "adopted");
    // One group: the retry's own create was refused as a duplicate, and it adopted the first.
    env.api().get("/scope-groups/fresh", 200).await;
}
