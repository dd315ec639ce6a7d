//! Access grants against the sandbox: one PUT takes a vendor from nothing to `ready` with a
//! Graph-verified restriction, a second PUT converges and re-verifies, DELETE takes it to
//! `removed` with nothing left that mailscope created, an adopted vendor app is neither created
//! nor deleted, and a worker killed (SIGKILL) in the middle of each resumes to the same end
//! with no duplicate object in the tenant.
use std::time::Duration;

use mailscope::config::Settings;
use mailscope::sandbox::SandboxSettings;
use mailscope::sandbox::settings::Pacing;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::propagation_checks::WorkerProcess;
use crate::scope_groups::addr;

fn quick(s: &mut Settings) {
    s.database.pool_size = 12;
    s.worker.poll_interval_seconds = 1;
    s.propagation.first_delay_ms = 200;
    s.propagation.max_delay_ms = 800;
    s.propagation.backoff_factor = 1.5;
    s.propagation.required_matches = 2;
    // The sandbox's RBAC cache is instant in `fast`; look through Graph soon after Exchange agreed.
    s.propagation.rbac_first_delay_ms = 200;
}

async fn start(adjust: impl FnOnce(&mut Settings)) -> WithSandbox {
    WithSandbox::start_adjusted(SandboxSettings::fast(), |s| {
        quick(s);
        adjust(s);
    })
    .await
}

async fn send(
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

async fn put_grant(env: &WithSandbox, key: &str, body: Value) -> (u16, Value) {
    send(
        env,
        reqwest::Method::PUT,
        &format!("/access-grants/{key}"),
        Some(body),
    )
    .await
}

/// Long-poll until the grant reaches `condition`; panics on `failed` (unless asked for) or after
/// two minutes, with the last state.
async fn wait_for(env: &WithSandbox, key: &str, condition: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..60 {
        let (status, g) = send(
            env,
            reqwest::Method::GET,
            &format!("/access-grants/{key}?wait=2"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{g}");
        if g["condition"] == condition {
            return g;
        }
        assert!(condition == "failed" || g["condition"] != "failed", "{g:#}");
        last = g;
    }
    panic!("grant never reached {condition}; last: {last:#}");
}

fn step<'a>(g: &'a Value, name: &str) -> &'a Value {
    g["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("step {name} in {g:#}"))
}

async fn tenant(env: &WithSandbox) -> Value {
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

/// What the sandbox tenant holds for the grant: (apps named `name`, groups with `alias`,
/// policies of `app_id`, consented app roles of `app_id`).
async fn in_tenant(
    env: &WithSandbox,
    name: &str,
    alias: &str,
    app_id: &str,
) -> (usize, usize, usize, usize) {
    let t = tenant(env).await;
    let apps = t["applications"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["displayName"] == name)
        .count();
    let groups = t["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["alias"]
                .as_str()
                .is_some_and(|a| a.eq_ignore_ascii_case(alias))
        })
        .count();
    let policies = t["policies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["appId"]
                .as_str()
                .is_some_and(|a| a.eq_ignore_ascii_case(app_id))
        })
        .count();
    let sp = t["servicePrincipals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s["appId"]
                .as_str()
                .is_some_and(|a| a.eq_ignore_ascii_case(app_id))
        })
        .map(|s| s["id"].as_str().unwrap().to_string());
    let roles = match sp {
        Some(sp) => t["appRoleAssignments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["principalId"] == sp.as_str())
            .count(),
        None => 0,
    };
    (apps, groups, policies, roles)
}

/// Exchange's verdict for the app on a mailbox (`Granted` / `Denied`).
async fn exchange_verdict(env: &WithSandbox, app_id: &str, who: &str) -> String {
    let (status, t) = send(
        env,
        reqwest::Method::POST,
        "/access-tests",
        Some(json!({"app_id": app_id, "mailbox": addr(who)})),
    )
    .await;
    assert_eq!(status, 200, "{t}");
    t["exchange"]["access_check_result"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The grant's propagation check, as the API shows it.
async fn check_of(env: &WithSandbox, g: &Value) -> Value {
    let id = step(g, "propagation_check")["output"]["check_id"]
        .as_str()
        .unwrap_or_else(|| panic!("check id in {g:#}"))
        .to_string();
    let (status, c) = send(
        env,
        reqwest::Method::GET,
        &format!("/propagation-checks/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    c
}

fn observed(check: &Value, who: &str) -> Value {
    check["expectations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["mailbox"] == addr(who))
        .map(|e| e["last_observed"].clone())
        .unwrap_or_else(|| panic!("{who} in {check:#}"))
}

fn acme(mailboxes: &[&str]) -> Value {
    let mailboxes: Vec<String> = mailboxes.iter().map(|m| addr(m)).collect();
    json!({
        "display_name": "ACME mail sync",
        "permissions": ["Mail.Read"],
        "mailboxes": mailboxes,
        "canary_mailboxes": [addr("carol")],
        "mechanism": "access_policy",
        "labels": {"vendor": "acme"},
        "external_ref": "CHG-1042",
    })
}

async fn grant_jobs(env: &WithSandbox) -> i64 {
    let db = env.app.db.client().await;
    db.query_one("SELECT count(*) FROM jobs WHERE kind = 'access_grant'", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn one_put_onboards_a_vendor_a_second_converges_and_delete_removes_everything() {
    let env = start(|_| {}).await;
    let (status, g) = put_grant(&env, "acme", acme(&["alice"])).await;
    assert_eq!(status, 202, "{g}");
    assert_eq!(g["revision"], 1);
    assert_eq!(g["mechanism"], "access_policy");
    let names: Vec<&str> = g["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "scope_group",
            "app",
            "restriction",
            "unscoped_grants",
            "consent",
            "propagation_check"
        ]
    );
    // The same body again: nothing new to do.
    let (status, again) = put_grant(&env, "acme", acme(&["alice"])).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["revision"], 1);
    assert_eq!(grant_jobs(&env).await, 1);

    let ready = wait_for(&env, "acme", "ready").await;
    for s in ready["steps"].as_array().unwrap() {
        assert_eq!(s["state"], "done", "{s}");
        assert!(s["last_error"].is_null());
    }
    assert_eq!(step(&ready, "unscoped_grants")["output"]["skipped"], true);
    let app_id = ready["app_id"].as_str().unwrap().to_string();
    // Graph-verified: read as the app, alice readable and the canary carol denied.
    let check = check_of(&env, &ready).await;
    assert_eq!(check["state"], "succeeded", "{check:#}");
    assert_eq!(check["verified_by"], "graph");
    assert_eq!(observed(&check, "alice"), "granted");
    assert_eq!(observed(&check, "carol"), "denied");
    assert_eq!(exchange_verdict(&env, &app_id, "bob").await, "Denied");
    assert_eq!(
        in_tenant(&env, "ACME mail sync", "grant-acme", &app_id).await,
        (1, 1, 1, 1)
    );

    // The list view, filtered by label and condition.
    for (query, n) in [
        ("?label=vendor=acme", 1),
        ("?label=vendor=other", 0),
        ("?condition=ready", 1),
        ("?condition=failed", 0),
        ("?external_ref=CHG-1042", 1),
    ] {
        let (status, l) = send(
            &env,
            reqwest::Method::GET,
            &format!("/access-grants{query}"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{l}");
        assert_eq!(l["items"].as_array().unwrap().len(), n, "{query}: {l}");
    }

    // A second PUT adding bob converges from the current state and verifies again.
    let (status, g2) = put_grant(&env, "acme", acme(&["alice", "bob"])).await;
    assert_eq!(status, 202, "{g2}");
    assert_eq!(g2["revision"], 2);
    assert_ne!(g2["condition"], "ready");
    let ready2 = wait_for(&env, "acme", "ready").await;
    let check2 = check_of(&env, &ready2).await;
    assert_ne!(
        check2["id"], check["id"],
        "a new check for the new membership"
    );
    assert_eq!(check2["state"], "succeeded");
    assert_eq!(observed(&check2, "bob"), "granted");
    assert_eq!(observed(&check2, "carol"), "denied");
    assert_eq!(exchange_verdict(&env, &app_id, "bob").await, "Granted");
    assert_eq!(
        in_tenant(&env, "ACME mail sync", "grant-acme", &app_id).await,
        (1, 1, 1, 1)
    );

    // Offboarding: removed, and nothing mailscope created is left in the tenant.
    let (status, d) = send(&env, reqwest::Method::DELETE, "/access-grants/acme", None).await;
    assert_eq!(status, 202, "{d}");
    assert_eq!(d["condition"], "removing");
    let names: Vec<&str> = d["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "revoke_consent",
            "remove_restriction",
            "remove_app",
            "remove_scope_group"
        ]
    );
    let removed = wait_for(&env, "acme", "removed").await;
    assert_eq!(
        step(&removed, "remove_app")["output"]["deleted_in_tenant"],
        true
    );
    assert_eq!(
        in_tenant(&env, "ACME mail sync", "grant-acme", &app_id).await,
        (0, 0, 0, 0)
    );
    let (status, _) = send(&env, reqwest::Method::DELETE, "/access-grants/acme", None).await;
    assert_eq!(status, 200, "already removed: nothing new to do");
}

/// With Entra's eventual consistency at the served sandbox's default (docs/microsoft-365.md
/// §8.4): the new app cannot back its service principal at first, the probe secret is refused
/// at first and the consent reaches the app's token late; onboarding still ends `ready`, with
/// one app and a Graph-verified restriction.
#[tokio::test]
async fn onboarding_survives_entra_eventual_consistency_at_the_default_delay() {
    let mut sandbox = SandboxSettings::fast();
    sandbox.pacing.entra_consistency_delay = Pacing::default().entra_consistency_delay;
    assert!(!sandbox.pacing.entra_consistency_delay.is_zero());
    let env = WithSandbox::start_adjusted(sandbox, quick).await;
    let (status, g) = put_grant(&env, "acme", acme(&["alice"])).await;
    assert_eq!(status, 202, "{g}");
    let ready = wait_for(&env, "acme", "ready").await;
    for s in ready["steps"].as_array().unwrap() {
        assert_eq!(s["state"], "done", "{s}");
    }
    let app_id = ready["app_id"].as_str().unwrap().to_string();
    let check = check_of(&env, &ready).await;
    assert_eq!(check["state"], "succeeded", "{check:#}");
    assert_eq!(check["verified_by"], "graph");
    assert_eq!(observed(&check, "alice"), "granted");
    assert_eq!(observed(&check, "carol"), "denied");
    assert_eq!(
        in_tenant(&env, "ACME mail sync", "grant-acme", &app_id).await,
        (1, 1, 1, 1)
    );
    // Entra did lag, and mailscope waited rather than failing or duplicating.
    let graph = env.sandbox_calls("graph").await;
    assert!(
        graph
            .iter()
            .any(|c| c["endpoint"] == "graph:POST /servicePrincipals" && c["status"] == 400),
        "the service principal was refused at first"
    );
    let logins = env.sandbox_calls("login").await;
    assert!(
        logins
            .iter()
            .any(|c| c["status"] == 401 && c["appId"].as_str() == Some(app_id.as_str())),
        "the probe secret was refused at first"
    );
}

#[tokio::test]
async fn an_adopted_vendor_app_is_neither_created_nor_deleted() {
    let env = start(|_| {}).await;
    // The vendor's app, consented to in the tenant with more mailboxes than it should reach.
    let (vendor, _) = env
        .sandbox_app(
            json!({"displayName": "Vendor multi-tenant app", "graphPermissions": ["Mail.Read"]}),
        )
        .await;
    assert_eq!(exchange_verdict(&env, &vendor, "bob").await, "Granted");
    let (status, g) = put_grant(
        &env,
        "vendor",
        json!({"app_id": vendor, "permissions": ["Mail.Read"], "mailboxes": [addr("alice")], "mechanism": "access_policy"}),
    )
    .await;
    assert_eq!(status, 202, "{g}");
    assert_eq!(g["app_origin"], "adopted");
    let ready = wait_for(&env, "vendor", "ready").await;
    assert_eq!(step(&ready, "app")["output"]["origin"], "adopted");
    assert_eq!(exchange_verdict(&env, &vendor, "alice").await, "Granted");
    assert_eq!(exchange_verdict(&env, &vendor, "bob").await, "Denied");
    assert_eq!(check_of(&env, &ready).await["state"], "succeeded");

    let (status, _) = send(&env, reqwest::Method::DELETE, "/access-grants/vendor", None).await;
    assert_eq!(status, 202);
    let removed = wait_for(&env, "vendor", "removed").await;
    assert_eq!(
        step(&removed, "remove_app")["output"]["deleted_in_tenant"],
        false
    );
    // The app stays; its consent and restriction are gone, so it reaches no mailbox at all.
    assert_eq!(
        in_tenant(&env, "Vendor multi-tenant app", "grant-vendor", &vendor).await,
        (1, 0, 0, 0)
    );
}

#[tokio::test]
async fn invalid_grants_are_refused_with_problems() {
    let env = start(|_| {}).await;
    let cases = [
        // No RBAC role grants Mail.ReadBasic.All.
        json!({"display_name": "x", "permissions": ["Mail.ReadBasic.All"], "mailboxes": [addr("alice")], "canary_mailboxes": [addr("carol")], "mechanism": "rbac"}),
        // RBAC (the default) needs a mailbox outside the scope to verify before consent goes.
        json!({"display_name": "x", "permissions": ["Mail.Read"], "mailboxes": [addr("alice")]}),
        json!({"display_name": "x", "app_id": "b9701c1e-1364-464d-93e4-01ae925e8d6c", "permissions": ["Mail.Read"], "mailboxes": [addr("alice")]}),
        json!({"display_name": "x", "permissions": ["User.Read.All"], "mailboxes": [addr("alice")]}),
        json!({"display_name": "x", "permissions": ["Mail.Read"], "scope_group": "no-such-group"}),
        json!({"display_name": "x", "permissions": ["Mail.Read"]}),
    ];
    for body in cases {
        let res = env
            .app
            .http
            .put(env.url("/access-grants/bad"))
            .bearer_auth(env.app.admin())
            .json(&body)
            .send()
            .await
            .unwrap();
        let p = assert_problem(res, 422, "validation_failed").await;
        assert!(p["errors"].as_array().is_some_and(|e| !e.is_empty()), "{p}");
        if body.get("mechanism").is_some() {
            assert!(
                p["errors"][0]["message"]
                    .as_str()
                    .unwrap()
                    .contains("no RBAC for Applications role"),
                "{p}"
            );
        }
    }
    let res = env
        .app
        .http
        .get(env.url("/access-grants/nobody"))
        .bearer_auth(env.app.admin())
        .send()
        .await
        .unwrap();
    assert_problem(res, 404, "not_found").await;
    let res = env
        .app
        .http
        .get(env.url("/access-grants?condition=sleeping"))
        .bearer_auth(env.app.admin())
        .send()
        .await
        .unwrap();
    assert_problem(res, 400, "invalid_query").await;
    // Reading is not writing.
    let res = env
        .app
        .http
        .put(env.url("/access-grants/acme"))
        .bearer_auth(env.app.token(&["MailScope.Read"], &["*"]))
        .json(&acme(&["alice"]))
        .send()
        .await
        .unwrap();
    assert_problem(res, 403, "forbidden").await;
    assert_eq!(grant_jobs(&env).await, 0);
}

/// Wait until the grant's step `name` is done in `revision`.
async fn wait_for_step(env: &WithSandbox, key: &str, name: &str, revision: i64) {
    for _ in 0..600 {
        let (_, g) = send(
            env,
            reqwest::Method::GET,
            &format!("/access-grants/{key}"),
            None,
        )
        .await;
        if g["revision"] == revision && step(&g, name)["state"] == "done" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("step {name} never done");
}

#[tokio::test]
async fn a_worker_killed_mid_onboarding_change_and_removal_resumes_to_the_same_end() {
    // Only the spawned processes run jobs.
    let env = start(|s| s.worker.per_tenant_concurrency = 0).await;

    let (status, _) = put_grant(&env, "acme", acme(&["alice"])).await;
    assert_eq!(status, 202);
    let first = WorkerProcess::spawn(&env);
    wait_for_step(&env, "acme", "scope_group", 1).await;
    first.kill_9();
    let second = WorkerProcess::spawn(&env);
    let _third = WorkerProcess::spawn(&env);
    let ready = wait_for(&env, "acme", "ready").await;
    let app_id = ready["app_id"].as_str().unwrap().to_string();
    assert_eq!(
        in_tenant(&env, "ACME mail sync", "grant-acme", &app_id).await,
        (1, 1, 1, 1)
    );

    let (status, _) = put_grant(&env, "acme", acme(&["alice", "bob"])).await;
    assert_eq!(status, 202);
    wait_for_step(&env, "acme", "scope_group", 2).await;
    second.kill_9();
    let fourth = WorkerProcess::spawn(&env);
    let ready2 = wait_for(&env, "acme", "ready").await;
    assert_eq!(observed(&check_of(&env, &ready2).await, "bob"), "granted");
    assert_eq!(
        in_tenant(&env, "ACME mail sync", "grant-acme", &app_id).await,
        (1, 1, 1, 1)
    );

    let (status, _) = send(&env, reqwest::Method::DELETE, "/access-grants/acme", None).await;
    assert_eq!(status, 202);
    wait_for_step(&env, "acme", "revoke_consent", 3).await;
    fourth.kill_9();
    let _fifth = WorkerProcess::spawn(&env);
    wait_for(&env, "acme", "removed").await;
    assert_eq!(
        in_tenant(&env, "ACME mail sync", "grant-acme", &app_id).await,
        (0, 0, 0, 0)
    );
    // One job per revision, never two.
    let db = env.app.db.client().await;
    let per_revision: Vec<(String, i64)> = db
        .query(
            "SELECT unique_key, count(*) FROM jobs WHERE kind = 'access_grant' GROUP BY unique_key ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        per_revision,
        [
            ("acme@1".to_string(), 1),
            ("acme@2".to_string(), 1),
            ("acme@3".to_string(), 1)
        ]
    );
}

#[tokio::test]
async fn ready_and_removed_are_announced_by_signed_events() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hooks/grants"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&receiver)
        .await;
    let env = start(|s| s.webhooks = crate::webhooks::hook_settings(5)).await;
    let mut body = acme(&["alice"]);
    body["callback_url"] = json!(format!("{}/hooks/grants", receiver.uri()));
    let (status, g) = put_grant(&env, "acme", body).await;
    assert_eq!(status, 202, "{g}");
    wait_for(&env, "acme", "ready").await;
    let (status, _) = send(&env, reqwest::Method::DELETE, "/access-grants/acme", None).await;
    assert_eq!(status, 202);
    wait_for(&env, "acme", "removed").await;
    let mut got = Vec::new();
    for _ in 0..100 {
        got = receiver.received_requests().await.unwrap();
        if got.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut types: Vec<String> = Vec::new();
    for r in &got {
        assert!(crate::webhooks::receiver_accepts(r), "signature verifies");
        let event: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(event["data"]["key"], "acme");
        assert_eq!(event["data"]["labels"]["vendor"], "acme");
        types.push(event["type"].as_str().unwrap().to_string());
    }
    types.sort();
    assert_eq!(types, ["access_grant.ready", "access_grant.removed"]);
}

/// A token limited to some grants by the `mailscope_grants` claim.
fn grant_token(env: &WithSandbox, grants: Value) -> String {
    let now = chrono::Utc::now().timestamp();
    let s = &env.app.settings.auth;
    let mut claims = json!({"iss": s.issuer, "aud": s.audience, "sub": "vendor-portal",
        "iat": now, "exp": now + 600, "roles": ["MailScope.Read"], "mailscope_grants": grants});
    claims[s.tenants_claim.as_str()] = json!([env.tenant]);
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(HS_SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn a_token_limited_to_one_grant_sees_that_grant_and_nothing_else() {
    let env = start(|s| s.worker.per_tenant_concurrency = 0).await;
    let mut globex = acme(&["bob"]);
    globex["display_name"] = json!("Globex");
    globex["labels"] = json!({"vendor": "globex"});
    assert_eq!(put_grant(&env, "acme", acme(&["alice"])).await.0, 202);
    assert_eq!(put_grant(&env, "globex", globex).await.0, 202);
    let get = |token: String, path: String| {
        let env = &env;
        async move {
            env.app
                .http
                .get(env.url(&path))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
        }
    };
    for claim in [json!(["acme"]), json!(["label:vendor=acme"])] {
        let token = grant_token(&env, claim);
        let res = get(token.clone(), "/access-grants/acme".into()).await;
        assert_eq!(res.status(), 200);
        assert_problem(
            get(token.clone(), "/access-grants/globex".into()).await,
            404,
            "not_found",
        )
        .await;
        let list: Value = get(token.clone(), "/access-grants".into())
            .await
            .json()
            .await
            .unwrap();
        let keys: Vec<&str> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["acme"]);
        // Everything else in the tenant is absent to it, even what the grant made.
        for other in [
            "/scope-groups",
            "/applications",
            "/access-policies",
            "/propagation-checks",
            "",
        ] {
            assert_problem(
                get(token.clone(), other.to_string()).await,
                404,
                "not_found",
            )
            .await;
        }
        let tenants: Value = env
            .app
            .http
            .get(env.app.url("/v1/tenants"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            tenants["items"].as_array().map(Vec::len),
            Some(0),
            "{tenants}"
        );
    }
    // With the write role, a grant-limited token manages its own grant's credentials only, and
    // still cannot change the grant itself.
    let writer = {
        let now = chrono::Utc::now().timestamp();
        let a = &env.app.settings.auth;
        let mut claims = json!({"iss": a.issuer, "aud": a.audience, "sub": "vendor-portal",
            "iat": now, "exp": now + 600, "roles": ["MailScope.Write"], "mailscope_grants": ["acme"]});
        claims[a.tenants_claim.as_str()] = json!([env.tenant]);
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(HS_SECRET.as_bytes()),
        )
        .unwrap()
    };
    let post = |key: &str| {
        env.app
            .http
            .post(env.url(&format!("/access-grants/{key}/secrets")))
            .bearer_auth(&writer)
            .json(&json!({"display_name": "x", "lifetime_days": 30}))
            .send()
    };
    assert_problem(post("globex").await.unwrap(), 404, "not_found").await;
    // Its own grant's app is not created yet (no worker here): refused for that reason, not hidden.
    assert_problem(post("acme").await.unwrap(), 409, "conflict").await;
    let res = env
        .app
        .http
        .put(env.url("/access-grants/acme"))
        .bearer_auth(&writer)
        .json(&acme(&["alice", "bob"]))
        .send()
        .await
        .unwrap();
    assert_problem(res, 404, "not_found").await;

    // An unrestricted reader sees both.
    let list: Value = get(
        env.app.token(&["MailScope.Read"], &["*"]),
        "/access-grants".into(),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
}

/// A Graph token for the vendor's app, from the sandbox's token endpoint.
async fn vendor_token(env: &WithSandbox, client_id: &str, secret: &str) -> String {
    let res = env
        .app
        .http
        .post(format!(
            "{}/{}/oauth2/v2.0/token",
            env.sandbox.base_url, env.tenant
        ))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", secret),
            ("scope", "https://graph.microsoft.com/.default"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    res.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn read_mail(env: &WithSandbox, token: &str, who: &str) -> u16 {
    env.app
        .http
        .get(format!(
            "{}/v1.0/users/{}/messages",
            env.sandbox.base_url,
            addr(who)
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn the_vendor_gets_a_secret_once_and_a_certificate_credential_with_rotation() {
    let env = start(|_| {}).await;
    assert_eq!(put_grant(&env, "acme", acme(&["alice"])).await.0, 202);
    let ready = wait_for(&env, "acme", "ready").await;
    let app_id = ready["app_id"].as_str().unwrap().to_string();
    assert_eq!(ready["expiring_soon"], false, "no credential ending soon");

    // A client secret, shown once; with it the vendor reads in scope and is refused out of it.
    let (status, s1) = send(
        &env,
        reqwest::Method::POST,
        "/access-grants/acme/secrets",
        Some(json!({"display_name": "acme-1", "lifetime_days": 5})),
    )
    .await;
    assert_eq!(status, 201, "{s1}");
    // Its only credential ends within the warning window: the status says to rotate.
    let (_, g) = send(&env, reqwest::Method::GET, "/access-grants/acme", None).await;
    assert_eq!(g["expiring_soon"], true, "{g}");
    let text = s1["secret_text"].as_str().unwrap().to_string();
    let token = vendor_token(&env, &app_id, &text).await;
    assert_eq!(read_mail(&env, &token, "alice").await, 200);
    assert_eq!(read_mail(&env, &token, "carol").await, 403);

    // Rotation with overlap: a second secret, then the first one goes.
    let (status, s2) = send(
        &env,
        reqwest::Method::POST,
        "/access-grants/acme/secrets",
        Some(json!({"display_name": "acme-2", "lifetime_days": 90})),
    )
    .await;
    assert_eq!(status, 201, "{s2}");
    let (_, creds) = send(
        &env,
        reqwest::Method::GET,
        "/access-grants/acme/credentials",
        None,
    )
    .await;
    assert_eq!(creds["secrets"].as_array().unwrap().len(), 2, "{creds}");
    assert!(
        creds.to_string().find(&text).is_none(),
        "the text is never shown again"
    );
    assert_eq!(creds["expiring_soon"], false);
    let old = s1["key_id"].as_str().unwrap();
    let (status, _) = send(
        &env,
        reqwest::Method::DELETE,
        &format!("/access-grants/acme/secrets/{old}"),
        None,
    )
    .await;
    assert_eq!(status, 204);

    // A certificate: the vendor uploads only its public certificate.
    let pem = include_str!("../fixtures/rsa1.crt.pem");
    let (status, c) = send(
        &env,
        reqwest::Method::POST,
        "/access-grants/acme/certificates",
        Some(json!({"certificate_pem": pem})),
    )
    .await;
    assert_eq!(status, 201, "{c}");
    assert_eq!(c["end_date_time"], "2036-11-19T02:10:53Z");
    let (status, again) = send(
        &env,
        reqwest::Method::POST,
        "/access-grants/acme/certificates",
        Some(json!({"certificate_pem": pem})),
    )
    .await;
    assert_eq!(status, 200, "the same certificate is not added twice");
    assert_eq!(again["key_id"], c["key_id"]);
    let t = tenant(&env).await;
    let app = t["applications"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["appId"] == app_id.as_str())
        .unwrap();
    assert_eq!(app["keyCredentials"].as_array().unwrap().len(), 1, "{app}");
    let (status, p) = send(
        &env,
        reqwest::Method::POST,
        "/access-grants/acme/certificates",
        Some(json!({"certificate_pem": include_str!("../fixtures/rsa1.pem")})),
    )
    .await;
    assert_eq!(status, 422, "a private key is refused: {p}");
    let (_, creds) = send(
        &env,
        reqwest::Method::GET,
        "/access-grants/acme/credentials",
        None,
    )
    .await;
    assert_eq!(creds["certificates"][0]["thumbprint"], c["thumbprint"]);
    let key_id = c["key_id"].as_str().unwrap();
    let (status, _) = send(
        &env,
        reqwest::Method::DELETE,
        &format!("/access-grants/acme/certificates/{key_id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let t = tenant(&env).await;
    let app = t["applications"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["appId"] == app_id.as_str())
        .unwrap();
    assert_eq!(app["keyCredentials"].as_array().unwrap().len(), 0);

    // An adopted vendor app's credentials are its publisher's.
    let (vendor, _) = env
        .sandbox_app(json!({"displayName": "Vendor app", "graphPermissions": ["Mail.Read"]}))
        .await;
    let (status, _) = put_grant(
        &env,
        "vendor",
        json!({"app_id": vendor, "permissions": ["Mail.Read"], "mailboxes": [addr("alice")], "mechanism": "access_policy"}),
    )
    .await;
    assert_eq!(status, 202);
    let res = env
        .app
        .http
        .post(env.url("/access-grants/vendor/secrets"))
        .bearer_auth(env.app.admin())
        .json(&json!({"display_name": "x", "lifetime_days": 30}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 409, "conflict").await;
}

#[tokio::test]
async fn a_failed_step_says_why_and_what_to_do_and_a_corrected_put_converges() {
    let env = start(|_| {}).await;
    let (status, _) = put_grant(&env, "acme", acme(&["alice", "nobody"])).await;
    assert_eq!(status, 202);
    let failed = wait_for(&env, "acme", "failed").await;
    let sg = step(&failed, "scope_group");
    assert_eq!(sg["state"], "failed", "{failed:#}");
    assert_eq!(sg["last_error"]["code"], "validation_failed");
    assert!(
        sg["last_error"]["cause"]
            .as_str()
            .unwrap()
            .contains("nobody"),
        "{sg}"
    );
    assert!(
        sg["last_error"]["fix"].as_str().unwrap().contains("PUT"),
        "{sg}"
    );
    // Nothing after the failed step ran: no app, no consent.
    assert_eq!(step(&failed, "app")["state"], "pending");
    assert_eq!(
        in_tenant(&env, "ACME mail sync", "grant-acme", "-").await.0,
        0
    );
    let (status, _) = put_grant(&env, "acme", acme(&["alice"])).await;
    assert_eq!(status, 202);
    let ready = wait_for(&env, "acme", "ready").await;
    assert_eq!(ready["revision"], 2);
}

#[tokio::test]
async fn switching_to_an_existing_scope_group_keeps_the_app_restricted_and_removal_cleans_up() {
    let env = start(|_| {}).await;
    crate::scope_groups::create_group(&env, "sales", &["alice"]).await;
    assert_eq!(put_grant(&env, "acme", acme(&["bob"])).await.0, 202);
    let ready = wait_for(&env, "acme", "ready").await;
    let app_id = ready["app_id"].as_str().unwrap().to_string();
    let mut body = acme(&[]);
    body.as_object_mut().unwrap().remove("mailboxes");
    body["scope_group"] = json!("sales");
    assert_eq!(put_grant(&env, "acme", body).await.0, 202);
    let ready = wait_for(&env, "acme", "ready").await;
    assert_eq!(ready["scope_group"], "sales");
    assert_eq!(exchange_verdict(&env, &app_id, "alice").await, "Granted");
    assert_eq!(exchange_verdict(&env, &app_id, "bob").await, "Denied");
    // One policy (the old one was replaced, never removed first).
    assert_eq!(
        in_tenant(&env, "ACME mail sync", "grant-acme", &app_id).await,
        (1, 1, 1, 1)
    );
    assert_eq!(
        send(&env, reqwest::Method::DELETE, "/access-grants/acme", None)
            .await
            .0,
        202
    );
    let removed = wait_for(&env, "acme", "removed").await;
    assert_eq!(
        step(&removed, "remove_scope_group")["output"]["deleted_in_tenant"],
        true
    );
    // The grant's own group is gone; the named group stays.
    assert_eq!(
        in_tenant(&env, "ACME mail sync", "grant-acme", &app_id).await,
        (0, 0, 0, 0)
    );
    assert_eq!(in_tenant(&env, "-", "sales", "-").await.1, 1);
}

/// What the sandbox's Exchange holds for an app's RBAC: (service principal pointers, role
/// assignments on the pointer, management scopes mailscope named).
async fn rbac_in_tenant(env: &WithSandbox, app_id: &str) -> (usize, usize, usize) {
    let t = tenant(env).await;
    let pointers: Vec<String> = t["exchangeServicePrincipals"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["appId"]
                .as_str()
                .is_some_and(|a| a.eq_ignore_ascii_case(app_id))
        })
        .map(|p| p["objectId"].as_str().unwrap().to_ascii_lowercase())
        .collect();
    let sp = t["servicePrincipals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s["appId"]
                .as_str()
                .is_some_and(|a| a.eq_ignore_ascii_case(app_id))
        })
        .map(|s| s["id"].as_str().unwrap().to_ascii_lowercase());
    let assignments = t["roleAssignments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| {
            let o = a["appObjectId"]
                .as_str()
                .unwrap_or_default()
                .to_ascii_lowercase();
            pointers.contains(&o) || sp.as_deref() == Some(o.as_str())
        })
        .count();
    let scopes = t["managementScopes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("mailscope-"))
        })
        .count();
    (pointers.len(), assignments, scopes)
}

fn rbac_body(display_name: &str, mailboxes: &[&str]) -> Value {
    let mut b = acme(mailboxes);
    b["display_name"] = json!(display_name);
    // Omitted: a new grant uses RBAC for Applications.
    b.as_object_mut().unwrap().remove("mechanism");
    b
}

#[tokio::test]
async fn an_rbac_grant_goes_from_nothing_to_a_graph_verified_restriction_and_back_to_nothing() {
    let env = start(|_| {}).await;
    let (status, g) = put_grant(&env, "acme", rbac_body("ACME rbac", &["alice"])).await;
    assert_eq!(status, 202, "{g}");
    assert_eq!(g["mechanism"], "rbac", "the default for a new grant");
    let ready = wait_for(&env, "acme", "ready").await;
    for s in ready["steps"].as_array().unwrap() {
        assert_eq!(s["state"], "done", "{s}");
    }
    let app_id = ready["app_id"].as_str().unwrap().to_string();
    let restriction = step(&ready, "restriction");
    assert_eq!(restriction["output"]["scope_kind"], "recipient_group_scope");
    assert_eq!(restriction["output"]["permissions"], json!(["Mail.Read"]));
    let unscoped = step(&ready, "unscoped_grants");
    assert_eq!(
        unscoped["output"]["out_of_scope_checked"],
        json!([addr("carol")]),
        "{unscoped}"
    );
    assert_eq!(
        unscoped["output"]["in_scope_checked"],
        json!([addr("alice")])
    );
    assert_eq!(
        step(&ready, "consent")["output"]["entra_consent"],
        json!([])
    );
    // Verified through Graph as the app: alice readable, the canary carol denied.
    let check = check_of(&env, &ready).await;
    assert_eq!(check["state"], "succeeded", "{check:#}");
    assert_eq!(check["mechanism"], "rbac");
    assert_eq!(check["verified_by"], "graph");
    assert_eq!(observed(&check, "alice"), "granted");
    assert_eq!(observed(&check, "carol"), "denied");
    // And as the vendor would: with its own secret, through Graph.
    let (status, s) = send(
        &env,
        reqwest::Method::POST,
        "/access-grants/acme/secrets",
        Some(json!({"display_name": "acme-1", "lifetime_days": 90})),
    )
    .await;
    assert_eq!(status, 201, "{s}");
    let token = vendor_token(&env, &app_id, s["secret_text"].as_str().unwrap()).await;
    assert_eq!(read_mail(&env, &token, "alice").await, 200);
    assert_eq!(read_mail(&env, &token, "carol").await, 403);
    assert_eq!(read_mail(&env, &token, "bob").await, 403);
    // No Entra consent (it would reach every mailbox), no access policy: RBAC alone.
    assert_eq!(
        in_tenant(&env, "ACME rbac", "grant-acme", &app_id).await,
        (1, 1, 0, 0)
    );
    assert_eq!(rbac_in_tenant(&env, &app_id).await, (1, 1, 0));

    // A second PUT adding bob converges (same scope group, one more member) and verifies again.
    let (status, g2) = put_grant(&env, "acme", rbac_body("ACME rbac", &["alice", "bob"])).await;
    assert_eq!(status, 202, "{g2}");
    assert_eq!(g2["mechanism"], "rbac");
    let ready2 = wait_for(&env, "acme", "ready").await;
    let check2 = check_of(&env, &ready2).await;
    assert_ne!(
        check2["id"], check["id"],
        "a new check for the new membership"
    );
    assert_eq!(observed(&check2, "bob"), "granted");
    assert_eq!(observed(&check2, "carol"), "denied");
    assert_eq!(read_mail(&env, &token, "bob").await, 200);
    assert_eq!(rbac_in_tenant(&env, &app_id).await, (1, 1, 0));

    // A mechanism cannot change while the grant exists.
    let mut other = rbac_body("ACME rbac", &["alice", "bob"]);
    other["mechanism"] = json!("access_policy");
    let (status, p) = put_grant(&env, "acme", other).await;
    assert_eq!(status, 409, "{p}");

    // Offboarding: nothing mailscope created is left: no app, group, role assignment, pointer
    // or management scope.
    let (status, _) = send(&env, reqwest::Method::DELETE, "/access-grants/acme", None).await;
    assert_eq!(status, 202);
    let removed = wait_for(&env, "acme", "removed").await;
    assert_eq!(
        step(&removed, "remove_restriction")["output"]["removed_rbac_restrictions"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{removed:#}"
    );
    assert_eq!(
        in_tenant(&env, "ACME rbac", "grant-acme", &app_id).await,
        (0, 0, 0, 0)
    );
    assert_eq!(rbac_in_tenant(&env, &app_id).await, (0, 0, 0));
    assert_ne!(read_mail(&env, &token, "alice").await, 200);
}

#[tokio::test]
async fn an_rbac_grant_closes_the_union_trap_of_an_adopted_vendor_app_and_leaves_the_app() {
    let env = start(|_| {}).await;
    // The vendor's multi-tenant app, consented to tenant-wide: it reads every mailbox.
    let (vendor, secret) = env
        .sandbox_app(json!({"displayName": "Vendor rbac app", "graphPermissions": ["Mail.Read"]}))
        .await;
    let before = vendor_token(&env, &vendor, &secret).await;
    assert_eq!(read_mail(&env, &before, "bob").await, 200);
    let (status, g) = put_grant(
        &env,
        "vendor",
        json!({"app_id": vendor, "permissions": ["Mail.Read"], "mailboxes": [addr("alice")],
               "canary_mailboxes": [addr("bob")]}),
    )
    .await;
    assert_eq!(status, 202, "{g}");
    let ready = wait_for(&env, "vendor", "ready").await;
    assert_eq!(step(&ready, "app")["output"]["origin"], "adopted");
    // The tenant-wide consent went only after Exchange showed alice in scope and bob out of it.
    assert_eq!(
        step(&ready, "unscoped_grants")["output"]["entra_grants_removed"],
        json!(["Mail.Read"])
    );
    let token = vendor_token(&env, &vendor, &secret).await;
    assert_eq!(read_mail(&env, &token, "alice").await, 200);
    assert_eq!(read_mail(&env, &token, "bob").await, 403);
    assert_eq!(
        in_tenant(&env, "Vendor rbac app", "grant-vendor", &vendor).await,
        (1, 1, 0, 0)
    );

    let (status, _) = send(&env, reqwest::Method::DELETE, "/access-grants/vendor", None).await;
    assert_eq!(status, 202);
    let removed = wait_for(&env, "vendor", "removed").await;
    assert_eq!(
        step(&removed, "remove_app")["output"]["deleted_in_tenant"],
        false
    );
    // The app stays; it holds no consent and no role assignment, so it reaches nothing.
    assert_eq!(
        in_tenant(&env, "Vendor rbac app", "grant-vendor", &vendor).await,
        (1, 0, 0, 0)
    );
    assert_eq!(rbac_in_tenant(&env, &vendor).await, (0, 0, 0));
    let after = vendor_token(&env, &vendor, &secret).await;
    assert_eq!(read_mail(&env, &after, "alice").await, 403);
}

/// The events of `kind` the receiver got, each checked for a valid signature.
async fn events(receiver: &wiremock::MockServer, kind: &str) -> Vec<Value> {
    receiver
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| crate::webhooks::receiver_accepts(r))
        .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap())
        .filter(|e| e["type"] == kind)
        .collect()
}

#[tokio::test]
async fn a_credential_ending_soon_is_announced_once_by_a_signed_event() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hooks/grants"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&receiver)
        .await;
    let env = start(|s| {
        s.webhooks = crate::webhooks::hook_settings(5);
        s.provisioning.credential_scan_interval_seconds = 1;
    })
    .await;
    let mut body = acme(&["alice"]);
    body["callback_url"] = json!(format!("{}/hooks/grants", receiver.uri()));
    assert_eq!(put_grant(&env, "acme", body).await.0, 202);
    wait_for(&env, "acme", "ready").await;
    // A secret that lasts beyond the 30-day window: nothing to announce.
    let (status, long) = send(
        &env,
        reqwest::Method::POST,
        "/access-grants/acme/secrets",
        Some(json!({"display_name": "acme-long", "lifetime_days": 90})),
    )
    .await;
    assert_eq!(status, 201, "{long}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        events(&receiver, "access_grant.expiring_soon")
            .await
            .is_empty()
    );
    // Only a secret ending in 5 days left: announced once, and shown in the status.
    let (status, short) = send(
        &env,
        reqwest::Method::POST,
        "/access-grants/acme/secrets",
        Some(json!({"display_name": "acme-short", "lifetime_days": 5})),
    )
    .await;
    assert_eq!(status, 201, "{short}");
    let long_id = long["key_id"].as_str().unwrap();
    let (status, _) = send(
        &env,
        reqwest::Method::DELETE,
        &format!("/access-grants/acme/secrets/{long_id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (_, g) = send(&env, reqwest::Method::GET, "/access-grants/acme", None).await;
    assert_eq!(g["expiring_soon"], true, "{g}");
    let mut got = Vec::new();
    for _ in 0..100 {
        got = events(&receiver, "access_grant.expiring_soon").await;
        if !got.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got.len(), 1, "{got:?}");
    let data = &got[0]["data"];
    assert_eq!(data["key"], "acme");
    assert_eq!(data["credentials"][0]["key_id"], short["key_id"]);
    assert_eq!(data["credentials"][0]["kind"], "secret");
    // Several scans later: still exactly one.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        events(&receiver, "access_grant.expiring_soon").await.len(),
        1
    );
    let db = env.app.db.client().await;
    let scans: i64 = db
        .query_one(
            "SELECT count(*) FROM jobs WHERE kind = 'credential_expiry_scan'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(scans, 1, "one scan job per tenant");
}

/// Wait for `ready` while reading `canary`'s mail as the vendor (a fresh token each time: a
/// token carries the Entra roles held when it was issued); returns the grant and every status
/// the canary answered with meanwhile.
async fn ready_while_probing(
    env: &WithSandbox,
    key: &str,
    app_id: &str,
    secret: &str,
    canary: &str,
) -> (Value, Vec<u16>) {
    let mut seen = Vec::new();
    for _ in 0..600 {
        let token = vendor_token(env, app_id, secret).await;
        seen.push(read_mail(env, &token, canary).await);
        let (_, g) = send(
            env,
            reqwest::Method::GET,
            &format!("/access-grants/{key}"),
            None,
        )
        .await;
        assert_ne!(g["condition"], "failed", "{g:#}");
        if g["condition"] == "ready" {
            return (g, seen);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("grant {key} never ready");
}

/// What grants the app its permissions in the tenant: RBAC role assignments, or Entra app roles.
async fn held_roles(
    env: &WithSandbox,
    mechanism: &str,
    name: &str,
    key: &str,
    app_id: &str,
) -> usize {
    match mechanism {
        "rbac" => rbac_in_tenant(env, app_id).await.1,
        _ => {
            in_tenant(env, name, &format!("grant-{key}"), app_id)
                .await
                .3
        }
    }
}

#[tokio::test]
async fn a_put_changing_only_the_permissions_converges_and_never_widens() {
    let env = start(|_| {}).await;
    for mechanism in ["rbac", "access_policy"] {
        let key = format!("perm-{}", mechanism.replace('_', "-"));
        let name = format!("Perm {mechanism}");
        let body = |permissions: &[&str]| {
            let mut b = acme(&["alice"]);
            b["display_name"] = json!(name);
            b["mechanism"] = json!(mechanism);
            b["permissions"] = json!(permissions);
            b
        };
        assert_eq!(put_grant(&env, &key, body(&["Mail.Read"])).await.0, 202);
        let ready = wait_for(&env, &key, "ready").await;
        let app_id = ready["app_id"].as_str().unwrap().to_string();
        let first_check = check_of(&env, &ready).await["id"].clone();
        let (status, s) = send(
            &env,
            reqwest::Method::POST,
            &format!("/access-grants/{key}/secrets"),
            Some(json!({"display_name": "v", "lifetime_days": 90})),
        )
        .await;
        assert_eq!(status, 201, "{s}");
        let secret = s["secret_text"].as_str().unwrap().to_string();
        // Entra consent (access policy) or RBAC role assignments, per mechanism.
        let held = || held_roles(&env, mechanism, &name, &key, &app_id);
        assert_eq!(held().await, 1, "{mechanism}");

        // Adding a permission: one more role (or consent), a new check, the canary still denied.
        let (status, g) = put_grant(&env, &key, body(&["Mail.Read", "Calendars.Read"])).await;
        assert_eq!(status, 202, "{g}");
        let (ready, seen) = ready_while_probing(&env, &key, &app_id, &secret, "carol").await;
        assert!(seen.iter().all(|s| *s != 200), "{mechanism}: {seen:?}");
        assert_eq!(held().await, 2, "{mechanism}");
        let check = check_of(&env, &ready).await;
        assert_ne!(check["id"], first_check, "{mechanism}: a new check");
        assert_eq!(check["state"], "succeeded");
        assert_eq!(observed(&check, "carol"), "denied");

        // Removing it again: the role (or consent) goes, and still nothing out of scope.
        let (status, _) = put_grant(&env, &key, body(&["Mail.Read"])).await;
        assert_eq!(status, 202);
        let (ready, seen) = ready_while_probing(&env, &key, &app_id, &secret, "carol").await;
        assert!(seen.iter().all(|s| *s != 200), "{mechanism}: {seen:?}");
        assert_eq!(held().await, 1, "{mechanism}");
        assert_eq!(ready["permissions"], json!(["Mail.Read"]));
        let token = vendor_token(&env, &app_id, &secret).await;
        assert_eq!(read_mail(&env, &token, "alice").await, 200, "{mechanism}");
    }
}

#[tokio::test]
async fn concurrent_puts_with_different_bodies_end_in_the_last_accepted_one() {
    let env = start(|_| {}).await;
    for mechanism in ["rbac", "access_policy"] {
        let key = format!("race-{}", mechanism.replace('_', "-"));
        let name = format!("Race {mechanism}");
        let body = |mailboxes: &[&str]| {
            let mut b = acme(mailboxes);
            b["display_name"] = json!(name);
            b["mechanism"] = json!(mechanism);
            b
        };
        // First PUTs racing to create the grant, then PUTs racing to change it.
        for round in 0..2 {
            let (a, b) = tokio::join!(
                put_grant(&env, &key, body(&["alice"])),
                put_grant(&env, &key, body(&["alice", "bob"]))
            );
            for (status, g) in [&a, &b] {
                assert!(
                    *status == 202 || *status == 200,
                    "{mechanism} round {round}: {status} {g}"
                );
            }
            let last = if a.1["revision"].as_i64() > b.1["revision"].as_i64() {
                &a.1
            } else {
                &b.1
            };
            let ready = wait_for(&env, &key, "ready").await;
            assert_eq!(ready["revision"], last["revision"], "{mechanism}");
            assert_eq!(ready["mailboxes"], last["mailboxes"], "{mechanism}");
            let app_id = ready["app_id"].as_str().unwrap().to_string();
            let (apps, groups, policies, _) =
                in_tenant(&env, &name, &format!("grant-{key}"), &app_id).await;
            assert_eq!((apps, groups), (1, 1), "{mechanism}: no duplicate");
            let t = tenant(&env).await;
            let group = t["recipients"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["alias"] == format!("grant-{key}"))
                .unwrap()
                .clone();
            let want = last["mailboxes"].as_array().unwrap().len();
            assert_eq!(
                group["members"].as_array().map(Vec::len),
                Some(want),
                "{mechanism}: the group holds the last body's mailboxes: {group}"
            );
            if mechanism == "rbac" {
                assert_eq!(policies, 0);
                assert_eq!(rbac_in_tenant(&env, &app_id).await, (1, 1, 0));
            } else {
                assert_eq!(policies, 1, "{mechanism}: one policy");
                let bob = exchange_verdict(&env, &app_id, "bob").await;
                assert_eq!(bob == "Granted", want == 2, "{bob}");
            }
        }
    }
}

#[tokio::test]
async fn a_worker_killed_mid_rbac_onboarding_and_removal_resumes_with_no_duplicate() {
    // Only the spawned processes run jobs.
    let env = start(|s| s.worker.per_tenant_concurrency = 0).await;
    let (status, _) = put_grant(&env, "acme", rbac_body("ACME rbac", &["alice"])).await;
    assert_eq!(status, 202);
    let first = WorkerProcess::spawn(&env);
    wait_for_step(&env, "acme", "restriction", 1).await;
    first.kill_9();
    let second = WorkerProcess::spawn(&env);
    let third = WorkerProcess::spawn(&env);
    let ready = wait_for(&env, "acme", "ready").await;
    let app_id = ready["app_id"].as_str().unwrap().to_string();
    assert_eq!(check_of(&env, &ready).await["state"], "succeeded");
    assert_eq!(
        in_tenant(&env, "ACME rbac", "grant-acme", &app_id).await,
        (1, 1, 0, 0)
    );
    assert_eq!(rbac_in_tenant(&env, &app_id).await, (1, 1, 0));

    let (status, _) = send(&env, reqwest::Method::DELETE, "/access-grants/acme", None).await;
    assert_eq!(status, 202);
    wait_for_step(&env, "acme", "revoke_consent", 2).await;
    third.kill_9();
    second.kill_9();
    let _fourth = WorkerProcess::spawn(&env);
    wait_for(&env, "acme", "removed").await;
    assert_eq!(
        in_tenant(&env, "ACME rbac", "grant-acme", &app_id).await,
        (0, 0, 0, 0)
    );
    assert_eq!(rbac_in_tenant(&env, &app_id).await, (0, 0, 0));
    // One pointer and one role assignment were ever made.
    assert_eq!(
        crate::scope_groups::count(&env, "New-ServicePrincipal").await,
        1
    );
    assert_eq!(
        crate::scope_groups::count(&env, "New-ManagementRoleAssignment").await,
        1
    );
}

/// Issue 12: kill -9 in the middle of an RBAC grant's change (a second PUT adding a mailbox and a
/// permission). Another worker resumes it to `ready`: the new mailbox is readable by the vendor
/// through Graph, the canary never is (probed throughout), and nothing is created twice.
#[tokio::test]
async fn a_worker_killed_mid_rbac_change_resumes_with_the_new_mailbox_and_no_duplicate() {
    // Only the spawned processes run jobs.
    let env = start(|s| s.worker.per_tenant_concurrency = 0).await;
    let first = WorkerProcess::spawn(&env);
    let (status, _) = put_grant(&env, "acme", rbac_body("ACME rbac", &["alice"])).await;
    assert_eq!(status, 202);
    let ready = wait_for(&env, "acme", "ready").await;
    let app_id = ready["app_id"].as_str().unwrap().to_string();
    let (status, s) = send(
        &env,
        reqwest::Method::POST,
        "/access-grants/acme/secrets",
        Some(json!({"display_name": "acme-1", "lifetime_days": 90})),
    )
    .await;
    assert_eq!(status, 201, "{s}");
    let secret = s["secret_text"].as_str().unwrap().to_string();
    let token = vendor_token(&env, &app_id, &secret).await;
    assert_eq!(
        read_mail(&env, &token, "bob").await,
        403,
        "bob not yet granted"
    );

    // The change: bob added, Calendars.Read added. Killed once its restriction step is done
    // (the role assignments for the new permission made, the rest of the revision not yet).
    let mut change = rbac_body("ACME rbac", &["alice", "bob"]);
    change["permissions"] = json!(["Mail.Read", "Calendars.Read"]);
    let (status, g) = put_grant(&env, "acme", change).await;
    assert_eq!(status, 202, "{g}");
    let mut seen = Vec::new();
    for i in 0.. {
        let token = vendor_token(&env, &app_id, &secret).await;
        seen.push(read_mail(&env, &token, "carol").await);
        let (_, g) = send(&env, reqwest::Method::GET, "/access-grants/acme", None).await;
        if g["revision"] == 2 && step(&g, "restriction")["state"] == "done" {
            break;
        }
        assert!(i < 600, "the change's restriction step never done: {g:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.kill_9();
    let _second = WorkerProcess::spawn(&env);
    let (ready2, more) = ready_while_probing(&env, "acme", &app_id, &secret, "carol").await;
    seen.extend(more);
    assert!(seen.iter().all(|s| *s != 200), "canary read: {seen:?}");
    assert_eq!(ready2["revision"], 2, "{ready2:#}");
    let check = check_of(&env, &ready2).await;
    assert_eq!(check["state"], "succeeded", "{check:#}");
    assert_eq!(observed(&check, "bob"), "granted");
    assert_eq!(observed(&check, "carol"), "denied");

    // As the vendor, with its own secret through Graph: the new mailbox reads, the canary never.
    let token = vendor_token(&env, &app_id, &secret).await;
    assert_eq!(read_mail(&env, &token, "bob").await, 200);
    assert_eq!(read_mail(&env, &token, "alice").await, 200);
    assert_eq!(read_mail(&env, &token, "carol").await, 403);

    // Nothing twice: one app and group, one pointer, one role assignment per permission, and
    // exactly as many Exchange creations as that.
    assert_eq!(
        in_tenant(&env, "ACME rbac", "grant-acme", &app_id).await,
        (1, 1, 0, 0)
    );
    assert_eq!(rbac_in_tenant(&env, &app_id).await, (1, 2, 0));
    assert_eq!(
        crate::scope_groups::count(&env, "New-ServicePrincipal").await,
        1
    );
    assert_eq!(
        crate::scope_groups::count(&env, "New-ManagementRoleAssignment").await,
        2
    );
}

/// Slow every Exchange call down by `ms` (0: back to normal), leaving login and Graph as they are.
pub(crate) async fn slow_exchange(env: &WithSandbox, ms: u64) {
    env.control()
        .patch(
            "/settings",
            &json!({"pacing": {"latency": format!("{ms}ms"), "faultApis": ["exchange"]}}),
            200,
        )
        .await;
}

/// Wait until a job of `kind` is running (a step under way).
pub(crate) async fn wait_for_running_job(env: &WithSandbox, kind: &str) {
    let db = env.app.db.client().await;
    for _ in 0..600 {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM jobs WHERE kind = $1 AND state = 'running'",
                &[&kind],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no {kind} job ever ran");
}

/// A timed request: (status, body, milliseconds).
async fn timed(
    env: &WithSandbox,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value, u128) {
    let t = std::time::Instant::now();
    let (status, v) = send(env, method, path, body).await;
    (status, v, t.elapsed().as_millis())
}

/// Issue 15 goal 3: access-grant steps call Microsoft with no pooled connection held, so while
/// several of one tenant's grants wait on a slow Exchange and its users keep sending PUTs and
/// GETs, another tenant's reads answer at once, and a PUT to a grant whose step is under way is
/// accepted at once instead of waiting for the step's Microsoft calls.
#[tokio::test]
async fn slow_grant_steps_and_a_burst_on_one_tenant_leave_another_tenants_reads_fast() {
    // The test's small pool (4, 2 s wait) and the default per-tenant job concurrency (4).
    let env = start(|s| {
        s.database.pool_size = 4;
        s.worker.per_tenant_concurrency = 4;
    })
    .await;
    let other = OtherTenant::register(&env).await;
    let keys: Vec<String> = (0..6).map(|i| format!("burst{i}")).collect();
    for k in &keys {
        let mut body = acme(&["alice"]);
        body["display_name"] = json!(format!("Burst {k}"));
        let (status, g) = put_grant(&env, k, body).await;
        assert_eq!(status, 202, "{g}");
    }
    slow_exchange(&env, 2_000).await;
    wait_for_running_job(&env, "access_grant").await;

    // Tenant A's users keep at it: reads of every grant and repeated PUTs (labels only; burst0
    // gets its own change below).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let burst = {
        let (http, base, token, keys, stop) = (
            env.app.http.clone(),
            env.url(""),
            env.app.admin(),
            keys.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut calls = Vec::new();
                for k in &keys {
                    let url = format!("{base}/access-grants/{k}");
                    calls.push(http.get(&url).bearer_auth(&token).send());
                    if k == "burst0" {
                        continue;
                    }
                    let mut body = acme(&["alice"]);
                    body["display_name"] = json!(format!("Burst {k}"));
                    body["labels"] = json!({"vendor": "acme", "burst": "yes"});
                    calls.push(http.put(&url).bearer_auth(&token).json(&body).send());
                }
                for r in futures_util::future::join_all(calls).await {
                    statuses.push(r.map(|r| r.status().as_u16()).unwrap_or(0));
                }
            }
            statuses
        })
    };

    // Meanwhile: tenant B reads, and a grant of A whose step is under way gets a new revision.
    let change = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut body = acme(&["alice", "bob"]);
        body["display_name"] = json!("Burst burst0");
        timed(
            &env,
            reqwest::Method::PUT,
            "/access-grants/burst0",
            Some(body),
        )
        .await
    };
    let (seen, (status, g, took)) = tokio::join!(
        other.reads_for(&env, "/access-grants", Duration::from_secs(8)),
        change
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let a = burst.await.unwrap();
    eprintln!(
        "tenant A: {} calls, {} not 2xx; PUT during a step: {status} in {took} ms",
        a.len(),
        a.iter().filter(|s| !(200..300).contains(*s)).count(),
    );
    assert_reads_fast("a burst of grant PUTs on slow steps", &seen, 1_000);
    assert!(
        a.iter().all(|s| (200..300).contains(s)),
        "tenant A's own burst: {a:?}"
    );
    assert_eq!((status, g["revision"].clone()), (202, json!(2)), "{g}");
    assert!(took < 1_000, "the PUT waited {took} ms for a step");

    // Microsoft back to normal: every grant converges, burst0 to its second revision.
    slow_exchange(&env, 0).await;
    for k in &keys {
        let g = wait_for(&env, k, "ready").await;
        if k == "burst0" {
            assert_eq!(g["revision"], 2, "{g:#}");
            assert_eq!(g["mailboxes"], json!([addr("alice"), addr("bob")]));
            assert_eq!(
                step(&g, "scope_group")["output"]["members"]
                    .as_array()
                    .map(Vec::len),
                Some(2)
            );
        }
    }
}

/// A step's result is recorded only for the revision it ran for: PUTs accepted while a step
/// waits on Microsoft answer at once, the step's late result never shows as the newest
/// revision's, and the grant converges to the last PUT.
#[tokio::test]
async fn puts_during_a_slow_step_answer_at_once_and_its_late_result_is_not_taken_for_theirs() {
    let env = start(|s| s.database.pool_size = 4).await;
    slow_exchange(&env, 1_500).await;
    let (status, _) = put_grant(&env, "acme", acme(&["alice"])).await;
    assert_eq!(status, 202);
    wait_for_running_job(&env, "access_grant").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let revisions: [&[&str]; 4] = [
        &["alice", "bob"],
        &["alice", "dave"],
        &["bob", "erin"],
        &["bob", "dave"],
    ];
    for (i, mailboxes) in revisions.iter().enumerate() {
        let (status, g, ms) = timed(
            &env,
            reqwest::Method::PUT,
            "/access-grants/acme",
            Some(acme(mailboxes)),
        )
        .await;
        assert_eq!(status, 202, "{g}");
        assert_eq!(g["revision"], i as i64 + 2);
        assert!(ms < 1_000, "PUT {} waited {ms} ms", i + 2);
        let (status, g, ms) = timed(&env, reqwest::Method::GET, "/access-grants/acme", None).await;
        assert_eq!(status, 200, "{g}");
        assert!(ms < 1_000, "GET waited {ms} ms");
    }
    let last: Vec<String> = ["bob", "dave"].iter().map(|m| addr(m)).collect();

    // Whatever the first revision's step records when it returns, the newest revision's steps
    // only ever show the newest revision's work.
    let started = std::time::Instant::now();
    let mut slow = true;
    let ready = loop {
        let (status, g) = send(&env, reqwest::Method::GET, "/access-grants/acme", None).await;
        assert_eq!(status, 200, "{g}");
        assert_eq!(g["revision"], 5, "{g:#}");
        let s = step(&g, "scope_group");
        if s["state"] == "done" {
            assert_eq!(s["output"]["members"], json!(last), "{g:#}");
        }
        if g["condition"] == "ready" {
            break g;
        }
        assert_ne!(g["condition"], "failed", "{g:#}");
        if slow && started.elapsed() > Duration::from_secs(10) {
            slow_exchange(&env, 0).await;
            slow = false;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{g:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ready["mailboxes"], json!(last));
    let app_id = ready["app_id"].as_str().unwrap().to_string();
    assert_eq!(
        in_tenant(&env, "ACME mail sync", "grant-acme", &app_id).await,
        (1, 1, 1, 1)
    );
    let t = tenant(&env).await;
    let group = t["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["alias"] == "grant-acme")
        .unwrap()
        .clone();
    assert_eq!(
        group["members"].as_array().map(Vec::len),
        Some(2),
        "{group}"
    );
    assert_eq!(exchange_verdict(&env, &app_id, "alice").await, "Denied");
    assert_eq!(exchange_verdict(&env, &app_id, "dave").await, "Granted");
}
