//! `/v1/tenants/{id}/rbac-migrations` against the sandbox: an app restricted by an access policy
//! is moved to RBAC for Applications and ends with RBAC, no access policy and no Entra mail
//! grant, while a probe reading an out-of-scope canary through Graph as the app (with a token it
//! keeps until it expires, as a real client does) never succeeds; a dry run names what cannot
//! be carried over; a pause stops before the next step; a rollback while the policy exists
//! restores the app as it was; a worker killed (SIGKILL) mid-migration resumes to the same end
//! with no duplicate object in the tenant.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mailscope::config::Settings;
use mailscope::sandbox::SandboxSettings;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::propagation_checks::WorkerProcess;
use crate::scope_groups::{addr, count, create_group};

/// The fixture's "Contoso CRM connector" (Entra: Mail.Read, Mail.Send, Calendars.Read,
/// User.Read.All) and its secret.
const APP: &str = "b9701c1e-1364-464d-93e4-01ae925e8d6c";
const APP_SECRET: &str = "sandbox-crm-secret-not-for-production";
/// Sandbox access tokens live this long; mailscope waits `DRAIN` after removing the consent.
const TOKEN_LIFETIME: Duration = Duration::from_secs(2);
const DRAIN: u64 = 4;

fn sandbox() -> SandboxSettings {
    let mut s = SandboxSettings::fast();
    s.pacing.token_lifetime = TOKEN_LIFETIME;
    s
}

fn quick(s: &mut Settings) {
    s.database.pool_size = 12;
    s.worker.poll_interval_seconds = 1;
    s.propagation.first_delay_ms = 200;
    s.propagation.max_delay_ms = 800;
    s.propagation.required_matches = 2;
    s.propagation.rbac_first_delay_ms = 300;
    s.provisioning.rbac_migration_token_drain_seconds = DRAIN;
}

async fn start(adjust: impl FnOnce(&mut Settings)) -> WithSandbox {
    WithSandbox::start_adjusted(sandbox(), |s| {
        quick(s);
        adjust(s);
    })
    .await
}

/// The CRM app restricted to `crm-scope` (alice) by an access policy, as most tenants have it.
async fn restricted_by_policy(env: &WithSandbox) -> Value {
    create_group(env, "crm-scope", &["alice"]).await;
    let body = json!({"app_id": APP, "scope": "crm-scope", "access_right": "RestrictAccess"});
    env.api().post("/access-policies", &body, 201).await
}

async fn app_token(env: &WithSandbox) -> String {
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
    let v: Value = res.json().await.unwrap();
    v["access_token"].as_str().unwrap().to_string()
}

/// Status of reading `mailbox`'s messages through Graph as the CRM app with `token`.
async fn read_as_app(env: &WithSandbox, token: &str, mailbox: &str) -> u16 {
    env.app
        .http
        .get(format!(
            "{}/v1.0/users/{}/messages",
            env.sandbox.base_url,
            addr(mailbox)
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Reads the canary through Graph as the app until stopped, keeping its token until the sandbox
/// rejects it as expired (a token carries the Entra roles held when it was issued). Returns
/// every status seen.
struct CanaryProbe {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<u16>>,
}

impl CanaryProbe {
    async fn start(env: &WithSandbox, canary: &'static str) -> CanaryProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let (http, base, tenant) = (
            env.app.http.clone(),
            env.sandbox.base_url.clone(),
            env.tenant.clone(),
        );
        let flag = stop.clone();
        let first = app_token(env).await;
        let task = tokio::spawn(async move {
            let mut token = first;
            let mut seen = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let status = http
                    .get(format!("{base}/v1.0/users/{}/messages", addr(canary)))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                if status == 401 {
                    let res = http
                        .post(format!("{base}/{tenant}/oauth2/v2.0/token"))
                        .form(&[
                            ("client_id", APP),
                            ("client_secret", APP_SECRET),
                            ("scope", "https://graph.microsoft.com/.default"),
                            ("grant_type", "client_credentials"),
                        ])
                        .send()
                        .await
                        .unwrap();
                    let v: Value = res.json().await.unwrap();
                    token = v["access_token"].as_str().unwrap().to_string();
                    continue;
                }
                seen.push(status);
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            seen
        });
        CanaryProbe { stop, task }
    }

    async fn finish(self) -> Vec<u16> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

async fn migration(env: &WithSandbox, id: &str) -> Value {
    env.api().get(&format!("/rbac-migrations/{id}"), 200).await
}

fn step<'a>(m: &'a Value, name: &str) -> &'a Value {
    m["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {m:#}"))
}

/// Poll until `done(m)`; panics after two minutes with the last state.
async fn wait_until(
    env: &WithSandbox,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    for _ in 0..1200 {
        let m = migration(env, id).await;
        if done(&m) {
            return m;
        }
        last = m;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("migration never reached {what}; last: {last:#}");
}

/// Start migrating the seeded app with bob as the canary; the migration's id.
async fn start_migration(env: &WithSandbox) -> String {
    let m = env
        .api()
        .post(
            "/rbac-migrations",
            &json!({"app_id": APP, "canary_mailboxes": [addr("bob")]}),
            202,
        )
        .await;
    m["id"].as_str().unwrap().to_string()
}

async fn wait_for_state(env: &WithSandbox, id: &str, state: &str) -> Value {
    wait_until(env, id, state, |m| {
        assert!(
            m["state"] == state || m["state"] == "running" || m["state"] == "rolling_back",
            "{m:#}"
        );
        m["state"] == state
    })
    .await
}

/// (RBAC role assignments, access policies of the app, Entra mailbox grants of the app) in the
/// sandbox tenant.
async fn in_tenant(env: &WithSandbox) -> (usize, usize, Vec<String>) {
    let t = env.sandbox_tenant().await;
    let sp = t["servicePrincipals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["appId"] == APP)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let grants: Vec<String> = t["appRoleAssignments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["principalId"] == sp.as_str())
        .map(|g| g["appRoleId"].as_str().unwrap().to_string())
        .collect();
    let policies = t["policies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["appId"].as_str().unwrap().eq_ignore_ascii_case(APP))
        .count();
    (
        t["roleAssignments"].as_array().unwrap().len(),
        policies,
        grants,
    )
}

/// The app's Entra mailbox grants, by name, as mailscope's access test reports them.
async fn entra_mailbox_grants(env: &WithSandbox) -> Value {
    let t = env
        .api()
        .post(
            "/access-tests",
            &json!({"app_id": APP, "mailbox": addr("alice")}),
            200,
        )
        .await;
    t["effective"]["entra_mailbox_permissions"].clone()
}

#[tokio::test]
async fn a_migration_ends_restricted_by_rbac_and_never_lets_the_app_read_the_canary() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hooks/migrations"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&receiver)
        .await;
    let env = start(|s| s.webhooks = crate::webhooks::hook_settings(5)).await;
    restricted_by_policy(&env).await;
    let token = app_token(&env).await;
    assert_eq!(read_as_app(&env, &token, "alice").await, 200);
    assert_eq!(
        read_as_app(&env, &token, "bob").await,
        403,
        "the policy holds"
    );
    let grants_before = in_tenant(&env).await.2;

    let probe = CanaryProbe::start(&env, "bob").await;
    let body = json!({"app_id": APP, "canary_mailboxes": [addr("bob")],
        "callback_url": format!("{}/hooks/migrations", receiver.uri())});
    let res = env
        .api()
        .send(Method::POST, "/rbac-migrations", Some(&body))
        .await;
    assert_eq!(res.status(), 202);
    let location = res.headers()["location"].to_str().unwrap().to_string();
    let m: Value = res.json().await.unwrap();
    let id = m["id"].as_str().unwrap().to_string();
    assert!(location.ends_with(&id));
    assert_eq!(m["state"], "running");
    assert_eq!(m["plan"]["executable"], true);
    assert_eq!(
        m["plan"]["remove_entra_grants"],
        json!(["Calendars.Read", "Mail.Read", "Mail.Send"])
    );
    assert_eq!(m["plan"]["sample_mailboxes"], json!([addr("alice")]));
    // A second migration of the same app while this one runs: 409.
    env.api()
        .post("/rbac-migrations", &body, (409, "rbac_migration_active"))
        .await;

    let done = wait_for_state(&env, &id, "succeeded").await;
    let seen = probe.finish().await;
    assert!(seen.len() > 20, "the probe kept reading: {}", seen.len());
    assert!(
        seen.iter().all(|s| *s == 403),
        "the canary answered other than 403 at some moment: {seen:?}"
    );

    assert_eq!(done["current_step"], "done");
    for s in done["steps"].as_array().unwrap() {
        assert_eq!(s["state"], "done", "{s}");
    }
    assert!(step(&done, "verify_entra_removed")["output"]["tokens_expired_at"].is_string());
    assert!(!done["check_ids"].as_array().unwrap().is_empty());
    assert!(done["finished_at"].is_string());
    assert_eq!(done["rollback_allowed"], false);

    // The end state: RBAC (3 role assignments), no access policy, no Entra mail grant.
    let (role_assignments, policies, grants) = in_tenant(&env).await;
    assert_eq!(role_assignments, 3);
    assert_eq!(policies, 0);
    assert_eq!(
        grants.len(),
        grants_before.len() - 3,
        "only User.Read.All stays"
    );
    assert_eq!(entra_mailbox_grants(&env).await, json!([]));
    let policies = env
        .api()
        .get(&format!("/access-policies?app_id={APP}"), 200)
        .await;
    assert_eq!(policies["items"], json!([]));
    let restrictions = env
        .api()
        .get(&format!("/rbac-restrictions?app_id={APP}"), 200)
        .await;
    let rid = restrictions["items"][0]["id"].as_str().unwrap();
    let r = env
        .api()
        .get(&format!("/rbac-restrictions/{rid}"), 200)
        .await;
    assert_eq!(r["restricted"], true, "{r:#}");
    let token = app_token(&env).await;
    assert_eq!(
        read_as_app(&env, &token, "alice").await,
        200,
        "RBAC grants its scope"
    );
    assert_eq!(read_as_app(&env, &token, "bob").await, 403);

    // Ended: no rollback, no second run; the list shows it.
    env.api()
        .post_empty(
            &format!("/rbac-migrations/{id}/rollback"),
            (409, "conflict"),
        )
        .await;
    let list = env
        .api()
        .get("/rbac-migrations?state=succeeded&limit=1", 200)
        .await;
    assert_eq!(list["items"][0]["id"], id.as_str());
    env.api()
        .get("/rbac-migrations?state=sleeping", (400, "invalid_query"))
        .await;
    // Nothing left to migrate.
    env.api()
        .post(
            "/rbac-migrations",
            &json!({"app_id": APP, "canary_mailboxes": [addr("bob")]}),
            (422, "rbac_migration_not_possible"),
        )
        .await;

    // The signed event.
    let mut types = Vec::new();
    for _ in 0..100 {
        types = receiver
            .received_requests()
            .await
            .unwrap()
            .iter()
            .map(|r| {
                let v: Value = serde_json::from_slice(&r.body).unwrap();
                v["type"].as_str().unwrap().to_string()
            })
            .collect();
        if !types.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(types, ["rbac_migration.succeeded"]);
}

#[tokio::test]
async fn a_dry_run_names_what_cannot_be_carried_over_and_changes_nothing() {
    let env = start(|_| {}).await;
    restricted_by_policy(&env).await;
    // dave reaches crm-scope only through a nested group; board is denied outright.
    let scope = env.api().get("/scope-groups/crm-scope", 200).await;
    let t = format!("/tenants/{}", env.tenant);
    env.control()
        .post(
            &format!("{t}/groups"),
            &json!({"name": "crm-nested", "members": ["dave"]}),
            201,
        )
        .await;
    env.control()
        .post(
            &format!(
                "{t}/groups/{}/members",
                scope["object_id"].as_str().unwrap()
            ),
            &json!({"member": "crm-nested"}),
            200,
        )
        .await;
    create_group(&env, "board", &["carol"]).await;
    env.api()
        .post(
            "/access-policies",
            &json!({"app_id": APP, "scope": "board", "access_right": "DenyAccess"}),
            201,
        )
        .await;
    let calls_before = env.sandbox_calls("exchange").await.len();

    let body = json!({"app_id": APP, "dry_run": true, "canary_mailboxes": [addr("bob")]});
    let d = env.api().post("/rbac-migrations", &body, 200).await;
    assert_eq!(d["dry_run"], true);
    let p = &d["plan"];
    assert_eq!(p["executable"], false, "{p:#}");
    let kinds: Vec<(String, String, bool)> = p["not_carried"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["kind"].as_str().unwrap().to_string(),
                n["subject"].as_str().unwrap().to_string(),
                n["blocks_execution"].as_bool().unwrap(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("deny_access_policy".into(), "board".into(), true)),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("nested_member".into(), addr("dave"), false)),
        "{kinds:?}"
    );
    assert_eq!(
        p["create_assignments"][0],
        json!({"permission": "Calendars.Read", "role": "Application Calendars.Read"})
    );
    assert_eq!(p["steps"][0], "create_rbac");
    assert!(p["expected_max_seconds"].as_u64().unwrap() >= 4 * 3600);
    // Nothing recorded, nothing written to the tenant.
    let list = env.api().get("/rbac-migrations", 200).await;
    assert_eq!(list["items"], json!([]));
    let writes = env.sandbox_calls("exchange").await[calls_before..]
        .iter()
        .filter(|c| {
            let c = c["cmdlet"].as_str().unwrap_or_default();
            !c.starts_with("Get-") && !c.starts_with("Test-")
        })
        .count();
    assert_eq!(writes, 0);

    // Executing it is refused, naming the DenyAccess policy.
    let mut body = body;
    body["dry_run"] = json!(false);
    let p = env
        .api()
        .post(
            "/rbac-migrations",
            &body,
            (422, "rbac_migration_not_possible"),
        )
        .await;
    assert_eq!(p["errors"][0]["field"], "deny_access_policy", "{p}");
    // An app with no policy at all: nothing to migrate.
    let other = json!({"app_id": "00000000-0000-0000-0000-000000000001", "dry_run": true});
    env.api().post("/rbac-migrations", &other, 422).await;

    // A permission no RBAC role grants is named, and blocks.
    let basic = env
        .api()
        .put(
            "/applications/digest",
            &json!({"display_name": "Digest", "permissions": ["Mail.Read", "Mail.ReadBasic.All"],
                "grant_admin_consent": true}),
            201,
        )
        .await;
    let digest = basic["app_id"].as_str().unwrap();
    env.api()
        .post(
            "/access-policies",
            &json!({"app_id": digest, "scope": "crm-scope", "access_right": "RestrictAccess"}),
            201,
        )
        .await;
    let d = env
        .api()
        .post(
            "/rbac-migrations",
            &json!({"app_id": digest, "dry_run": true, "canary_mailboxes": [addr("bob")]}),
            200,
        )
        .await;
    let n = d["plan"]["not_carried"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["kind"] == "permission_without_role")
        .unwrap_or_else(|| panic!("{d:#}"));
    assert_eq!(n["subject"], "Mail.ReadBasic.All");
    assert_eq!(n["blocks_execution"], true);
    assert_eq!(d["plan"]["executable"], false);
    assert_eq!(d["plan"]["remove_entra_grants"], json!(["Mail.Read"]));
}

#[tokio::test]
async fn a_pause_stops_before_the_next_step_and_resume_finishes() {
    // verify_rbac waits 4 s for the permission cache's (shortened) minimum: time to pause.
    let env = start(|s| s.propagation.rbac_first_delay_ms = 4_000).await;
    restricted_by_policy(&env).await;
    let id = start_migration(&env).await;
    wait_until(&env, &id, "verify_rbac waiting", |m| {
        step(m, "verify_rbac")["state"] == "running"
    })
    .await;
    let paused = env
        .api()
        .post_empty(&format!("/rbac-migrations/{id}/pause"), 200)
        .await;
    assert_eq!(paused["state"], "paused");
    assert_eq!(paused["paused_reason"], "requested");
    // Again: the same answer.
    env.api()
        .post_empty(&format!("/rbac-migrations/{id}/pause"), 200)
        .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let m = migration(&env, &id).await;
    assert_eq!(m["state"], "paused");
    assert_eq!(m["current_step"], "verify_rbac");
    assert_eq!(step(&m, "remove_entra_consent")["state"], "pending");
    assert_eq!(
        entra_mailbox_grants(&env).await,
        json!(["Calendars.Read", "Mail.Read", "Mail.Send"]),
        "the consent stays while paused"
    );

    let resumed = env
        .api()
        .post_empty(&format!("/rbac-migrations/{id}/resume"), 202)
        .await;
    assert_eq!(resumed["state"], "running");
    let done = wait_for_state(&env, &id, "succeeded").await;
    assert_eq!(in_tenant(&env).await.1, 0);
    assert!(step(&done, "verify_rbac")["attempts"].as_u64().unwrap() >= 2);
}

#[tokio::test]
async fn a_rollback_while_the_policy_exists_restores_the_app_as_it_was() {
    // Tokens take an hour to drain here, so the migration waits after removing the consent.
    let env = start(|s| s.provisioning.rbac_migration_token_drain_seconds = 3600).await;
    restricted_by_policy(&env).await;
    let (_, _, grants_before) = in_tenant(&env).await;
    let id = start_migration(&env).await;
    let waiting = wait_until(&env, &id, "the token drain", |m| {
        step(m, "verify_entra_removed")["output"]["waiting_for"].is_string()
    })
    .await;
    assert_eq!(waiting["rollback_allowed"], true);
    assert_eq!(entra_mailbox_grants(&env).await, json!([]));
    assert_eq!(in_tenant(&env).await.0, 3);

    let r = env
        .api()
        .post_empty(&format!("/rbac-migrations/{id}/rollback"), 202)
        .await;
    assert_eq!(r["state"], "rolling_back");
    let done = wait_for_state(&env, &id, "rolled_back").await;
    assert_eq!(step(&done, "restore_entra_consent")["state"], "done");
    assert_eq!(step(&done, "remove_rbac")["state"], "done");
    assert_eq!(step(&done, "remove_access_policy")["attempts"], 0);

    // As before: the policy, the same Entra grants, no RBAC.
    let (role_assignments, policies, mut grants) = in_tenant(&env).await;
    let mut before = grants_before.clone();
    before.sort();
    grants.sort();
    assert_eq!((role_assignments, policies), (0, 1));
    assert_eq!(grants, before);
    let restrictions = env
        .api()
        .get(&format!("/rbac-restrictions?app_id={APP}"), 200)
        .await;
    assert_eq!(restrictions["items"], json!([]));
    let token = app_token(&env).await;
    assert_eq!(read_as_app(&env, &token, "alice").await, 200);
    assert_eq!(read_as_app(&env, &token, "bob").await, 403);
    // A new migration may start again; the list pages newest first.
    let second = start_migration(&env).await;
    let page = env.api().get("/rbac-migrations?limit=1", 200).await;
    assert_eq!(page["items"][0]["id"], second.as_str());
    assert_eq!(page["next_after"], second.as_str());
    let next = format!(
        "/rbac-migrations?limit=1&after={}",
        page["next_after"].as_str().unwrap()
    );
    let page = env.api().get(&next, 200).await;
    assert_eq!(page["items"][0]["id"], id.as_str());
    assert_eq!(page["items"][0]["state"], "rolled_back");
    assert_eq!(page["next_after"], Value::Null);
}

#[tokio::test]
async fn a_failed_verification_pauses_for_attention_and_is_rolled_back() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&receiver)
        .await;
    let env = start(|s| s.webhooks = crate::webhooks::hook_settings(5)).await;
    restricted_by_policy(&env).await;
    // alice is in the scope: as a canary the RBAC verification must fail, before any consent goes.
    let m = env
        .api()
        .post(
            "/rbac-migrations",
            &json!({"app_id": APP, "canary_mailboxes": [addr("alice")],
                "callback_url": format!("{}/hooks", receiver.uri())}),
            202,
        )
        .await;
    let id = m["id"].as_str().unwrap().to_string();
    let paused = wait_for_state(&env, &id, "paused").await;
    assert_eq!(paused["paused_reason"], "error");
    let v = step(&paused, "verify_rbac");
    assert_eq!(v["state"], "failed");
    assert_eq!(v["last_error"]["code"], "rbac_verification_failed");
    assert!(v["last_error"]["cause"].as_str().unwrap().contains("alice"));
    assert_eq!(
        entra_mailbox_grants(&env).await,
        json!(["Calendars.Read", "Mail.Read", "Mail.Send"])
    );
    env.api()
        .post_empty(&format!("/rbac-migrations/{id}/rollback"), 202)
        .await;
    wait_for_state(&env, &id, "rolled_back").await;
    assert_eq!(in_tenant(&env).await.0, 0);
    let mut types: Vec<String> = Vec::new();
    for _ in 0..100 {
        types = receiver
            .received_requests()
            .await
            .unwrap()
            .iter()
            .map(|r| {
                let v: Value = serde_json::from_slice(&r.body).unwrap();
                assert!(crate::webhooks::receiver_accepts(r), "signed");
                v["type"].as_str().unwrap().to_string()
            })
            .collect();
        if types.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    types.sort();
    assert_eq!(
        types,
        [
            "rbac_migration.attention_needed",
            "rbac_migration.rolled_back"
        ]
    );
}

/// A worker process with the migration's short waits.
fn worker(env: &WithSandbox) -> WorkerProcess {
    WorkerProcess::spawn_with(
        env,
        &[
            ("MAILSCOPE_PROPAGATION__RBAC_FIRST_DELAY_MS", "300"),
            (
                "MAILSCOPE_PROVISIONING__RBAC_MIGRATION_TOKEN_DRAIN_SECONDS",
                &DRAIN.to_string(),
            ),
        ],
    )
}

#[tokio::test]
async fn a_worker_killed_mid_migration_resumes_to_the_same_end_without_duplicates() {
    // Only the spawned processes run jobs.
    let env = start(|s| s.worker.per_tenant_concurrency = 0).await;
    restricted_by_policy(&env).await;
    let probe = CanaryProbe::start(&env, "bob").await;
    let id = start_migration(&env).await;

    let first = worker(&env);
    // Mid-step: the pointer exists in the tenant, the step is not recorded yet (most runs).
    for _ in 0..3000 {
        if count(&env, "New-ServicePrincipal").await >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(count(&env, "New-ServicePrincipal").await, 1);
    first.kill_9();
    let second = worker(&env);
    wait_until(&env, &id, "the consent removed", |m| {
        step(m, "remove_entra_consent")["state"] == "done"
    })
    .await;
    second.kill_9();
    let third = worker(&env);
    // Mid-step again: Exchange has removed the policy, mailscope may not have recorded it.
    for _ in 0..6000 {
        if count(&env, "Remove-ApplicationAccessPolicy").await >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(count(&env, "Remove-ApplicationAccessPolicy").await, 1);
    third.kill_9();
    let _fourth = worker(&env);
    let _fifth = worker(&env);
    let done = wait_for_state(&env, &id, "succeeded").await;
    let seen = probe.finish().await;
    assert!(seen.iter().all(|s| *s == 403), "{seen:?}");
    assert_eq!(done["current_step"], "done");

    // The same end as without a crash, nothing twice.
    let (role_assignments, policies, _) = in_tenant(&env).await;
    assert_eq!((role_assignments, policies), (3, 0));
    assert_eq!(entra_mailbox_grants(&env).await, json!([]));
    assert_eq!(count(&env, "New-ManagementRoleAssignment").await, 3);
    assert_eq!(count(&env, "New-ServicePrincipal").await, 1);
    assert_eq!(count(&env, "Remove-ApplicationAccessPolicy").await, 1);
    let db = env.app.db.client().await;
    let restrictions: i64 = db
        .query_one("SELECT count(*) FROM rbac_restrictions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(restrictions, 1);
    let jobs: Vec<(String, i64)> = db
        .query(
            "SELECT unique_key, count(*) FROM jobs WHERE kind = 'rbac_migration' GROUP BY unique_key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(jobs, [(format!("{id}@1"), 1)], "one job, never duplicated");
}

#[tokio::test]
async fn a_throttled_step_waits_for_retry_after_without_counting_an_attempt() {
    const WINDOW: u64 = 600;
    let env = start(|s| s.m365.max_retry_after_ms = 1_000).await;
    restricted_by_policy(&env).await;
    let tenant_settings = format!("/tenants/{}/settings", env.tenant);
    env.control()
        .patch(&tenant_settings, &json!({"exchangeRetryAfter": true}), 200)
        .await;
    // The window counts the calls made so far; planning makes two more InvokeCommands, and the
    // job's first step is throttled at its second.
    let made = env.sandbox_calls("exchange").await.len();
    let budget = |b: Value| json!({"pacing": {"exchangeBudget": b}});
    env.control()
        .patch(
            "/settings",
            &budget(json!(format!("{}/{WINDOW}s", made + 3))),
            200,
        )
        .await;
    let id = start_migration(&env).await;
    let waiting = wait_until(&env, &id, "a throttled step", |m| {
        !step(m, "create_rbac")["last_error"].is_null()
    })
    .await;
    let s = step(&waiting, "create_rbac");
    assert_eq!(waiting["state"], "running");
    assert_eq!(s["state"], "running");
    assert_eq!(s["attempts"], 0, "throttling is not an attempt: {s}");
    assert_eq!(s["last_error"]["code"], "throttled", "{s}");
    let db = env.app.db.client().await;
    let row = db
        .query_one(
            "SELECT failures, extract(epoch FROM run_at - now())::float8 FROM jobs
             WHERE kind = 'rbac_migration'",
            &[],
        )
        .await
        .unwrap();
    let (failures, due): (i32, f64) = (row.get(0), row.get(1));
    assert_eq!(failures, 0);
    assert!(
        (WINDOW as f64 - 60.0..=WINDOW as f64 + 5.0).contains(&due),
        "due in {due} s, expected Retry-After"
    );

    // The window passes: the migration goes on to the same end.
    env.control()
        .patch("/settings", &budget(Value::Null), 200)
        .await;
    env.sandbox.advance_clock(Duration::from_secs(WINDOW + 1));
    db.execute(
        "UPDATE jobs SET run_at = now() WHERE kind = 'rbac_migration' AND state = 'queued'",
        &[],
    )
    .await
    .unwrap();
    let done = wait_for_state(&env, &id, "succeeded").await;
    assert_eq!(step(&done, "create_rbac")["attempts"], 1);
    assert_eq!(in_tenant(&env).await.0, 3);
}

#[tokio::test]
async fn an_app_mailscope_created_is_verified_through_graph_and_keeps_no_entra_mail_consent() {
    let env = start(|_| {}).await;
    create_group(&env, "acme-scope", &["alice"]).await;
    let body = json!({"display_name": "ACME mail sync", "permissions": ["Mail.Read"],
        "grant_admin_consent": true});
    let app = env.api().put("/applications/acme", &body, 201).await["app_id"]
        .as_str()
        .unwrap()
        .to_string();
    env.api()
        .post(
            "/access-policies",
            &json!({"app_id": app, "scope": "acme-scope", "access_right": "RestrictAccess"}),
            201,
        )
        .await;
    let m = env
        .api()
        .post(
            "/rbac-migrations",
            &json!({"app_id": app, "canary_mailboxes": [addr("bob")]}),
            202,
        )
        .await;
    let id = m["id"].as_str().unwrap().to_string();
    let done = wait_for_state(&env, &id, "succeeded").await;
    // Each check the migration started read the mailboxes through Graph as the app.
    let checks = done["check_ids"].as_array().unwrap();
    assert_eq!(checks.len(), 2, "{done:#}");
    for c in checks {
        let c = env
            .api()
            .get(&format!("/propagation-checks/{}", c.as_str().unwrap()), 200)
            .await;
        assert_eq!(c["state"], "succeeded", "{c:#}");
        assert_eq!(c["verified_by"], "graph", "{c:#}");
        assert_eq!(c["origin"], "rbac_migration");
        assert_eq!(c["mechanism"], "rbac");
    }
    // Asking for the Entra consent back would undo the migration: refused.
    env.api()
        .put("/applications/acme", &body, (409, "rbac_union_trap"))
        .await;
}

#[tokio::test]
async fn an_app_owned_by_an_access_grant_is_not_migrated_under_it() {
    let env = start(|_| {}).await;
    let body = json!({"display_name": "ACME mail sync", "permissions": ["Mail.Read"],
        "mailboxes": [addr("alice")], "canary_mailboxes": [addr("bob")],
        "mechanism": "access_policy"});
    env.api().put("/access-grants/acme", &body, 202).await;
    let mut grant = Value::Null;
    for _ in 0..60 {
        grant = env.api().get("/access-grants/acme?wait=2", 200).await;
        if grant["condition"] == "ready" {
            break;
        }
    }
    assert_eq!(grant["condition"], "ready", "{grant:#}");
    let app = grant["app_id"].as_str().unwrap();
    let p = env
        .api()
        .post(
            "/rbac-migrations",
            &json!({"app_id": app, "dry_run": true, "canary_mailboxes": [addr("bob")]}),
            (422, "rbac_migration_not_possible"),
        )
        .await;
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("access grant `acme`"),
        "{p}"
    );
}

/// Issue 15 goal 3: a migration step calls Microsoft with no lock held, so a pause answers at
/// once; the step under way still records what it made when it returns (the migration shows it
/// done), and the migration holds before the next step until it is resumed.
#[tokio::test]
async fn a_pause_answers_while_a_step_calls_microsoft_and_holds_after_that_step() {
    let env = start(|_| {}).await;
    restricted_by_policy(&env).await;
    let id = start_migration(&env).await;
    crate::access_grants::slow_exchange(&env, 1_500).await;
    // Mid-step: the pointer exists, the role assignments (one Exchange call each) are to come.
    for _ in 0..3000 {
        if count(&env, "New-ServicePrincipal").await >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(count(&env, "New-ServicePrincipal").await, 1);
    let t = std::time::Instant::now();
    let paused = env
        .api()
        .post_empty(&format!("/rbac-migrations/{id}/pause"), 200)
        .await;
    let took = t.elapsed();
    eprintln!("pause answered in {took:?} while create_rbac called Exchange");
    assert_eq!(paused["state"], "paused");
    assert_eq!(paused["paused_reason"], "requested");
    assert!(
        took < Duration::from_secs(1),
        "the pause waited {took:?} for the step's Microsoft calls"
    );

    // The step returns: its result is recorded, and nothing after it runs.
    let m = wait_until(&env, &id, "create_rbac recorded", |m| {
        step(m, "create_rbac")["state"] == "done"
    })
    .await;
    assert_eq!(m["state"], "paused", "{m:#}");
    assert_eq!(m["current_step"], "verify_rbac");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = migration(&env, &id).await;
    assert_eq!(m["state"], "paused", "{m:#}");
    assert_eq!(m["paused_reason"], "requested");
    assert_eq!(step(&m, "verify_rbac")["state"], "pending", "{m:#}");
    assert_eq!(step(&m, "create_rbac")["attempts"], 1);
    assert_eq!(in_tenant(&env).await.0, 3, "the step's role assignments");
    assert_eq!(
        entra_mailbox_grants(&env).await,
        json!(["Calendars.Read", "Mail.Read", "Mail.Send"]),
        "the consent stays while paused"
    );

    crate::access_grants::slow_exchange(&env, 0).await;
    env.api()
        .post_empty(&format!("/rbac-migrations/{id}/resume"), 202)
        .await;
    let done = wait_for_state(&env, &id, "succeeded").await;
    assert_eq!(step(&done, "create_rbac")["attempts"], 1, "not run again");
    assert_eq!(in_tenant(&env).await.0, 3);
    assert_eq!(in_tenant(&env).await.1, 0);
    assert_eq!(count(&env, "New-ServicePrincipal").await, 1);
    assert_eq!(count(&env, "New-ManagementRoleAssignment").await, 3);
}

/// The rollback closes when the access policy's removal starts, not when it is recorded: while
/// that step waits on Exchange, the migration already shows `rollback_allowed: false` and a
/// rollback is refused at once.
#[tokio::test]
async fn a_rollback_is_refused_at_once_while_the_policy_removal_is_under_way() {
    let env = start(|_| {}).await;
    restricted_by_policy(&env).await;
    let id = start_migration(&env).await;
    wait_until(&env, &id, "the token drain", |m| {
        step(m, "verify_entra_removed")["output"]["waiting_for"].is_string()
    })
    .await;
    crate::access_grants::slow_exchange(&env, 2_000).await;
    let m = wait_until(&env, &id, "the policy's removal", |m| {
        m["current_step"] == "remove_access_policy"
    })
    .await;
    assert_eq!(m["state"], "running");
    // Its run starts at once (the previous step's run rescheduled it for now), and its first
    // Exchange call takes two seconds.
    let m = wait_until(&env, &id, "the policy's removal started", |m| {
        step(m, "remove_access_policy")["state"] != "pending"
    })
    .await;
    assert_eq!(
        step(&m, "remove_access_policy")["state"],
        "running",
        "{m:#}"
    );
    assert_eq!(m["rollback_allowed"], false, "{m:#}");
    let t = std::time::Instant::now();
    env.api()
        .post_empty(
            &format!("/rbac-migrations/{id}/rollback"),
            (409, "rbac_migration_rollback_closed"),
        )
        .await;
    let took = t.elapsed();
    eprintln!("rollback refused in {took:?} while remove_access_policy called Exchange");
    assert!(
        took < Duration::from_secs(1),
        "the rollback waited {took:?} for the step's Microsoft calls"
    );
    crate::access_grants::slow_exchange(&env, 0).await;
    let done = wait_for_state(&env, &id, "succeeded").await;
    assert_eq!(step(&done, "remove_access_policy")["attempts"], 1);
    let (role_assignments, policies, _) = in_tenant(&env).await;
    assert_eq!((role_assignments, policies), (3, 0));
}
