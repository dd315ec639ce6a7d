//! A job whose Microsoft call is throttled waits for `Retry-After` without it counting as a
//! failed attempt: the `propagation_check` job is rescheduled at Retry-After (`failures` stays
//! 0), and the check completes once the budget allows it.
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::helpers::*;
use crate::scope_groups::{addr, create_group};

const CRM: &str = "b9701c1e-1364-464d-93e4-01ae925e8d6c";
/// The sandbox's Exchange budget window: its `Retry-After` is what is left of it.
const WINDOW_SECONDS: i64 = 600;

async fn check(env: &WithSandbox, id: &str) -> Value {
    let res = env
        .app
        .http
        .get(env.url(&format!("/propagation-checks/{id}")))
        .bearer_auth(env.app.admin())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

async fn set_exchange_budget(env: &WithSandbox, budget: Value) {
    let res = env
        .app
        .http
        .patch(format!("{}/_sandbox/settings", env.sandbox.base_url))
        .json(&json!({"pacing": {"exchangeBudget": budget}}))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.text().await.unwrap());
}

/// (state, attempt, failures, run_at, last_error) of the check's job.
async fn job_row(
    c: &tokio_postgres::Client,
    check: &str,
) -> (String, i32, i32, DateTime<Utc>, Option<String>) {
    let id: uuid::Uuid = check.parse().unwrap();
    let r = c
        .query_one(
            "SELECT j.state, j.attempt, j.failures, j.run_at, j.last_error
             FROM jobs j JOIN propagation_checks p ON p.job_id = j.id WHERE p.id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

#[tokio::test]
async fn a_throttled_check_waits_for_retry_after_without_counting_a_failure() {
    let env = WithSandbox::start_adjusted(mailscope::sandbox::SandboxSettings::fast(), |s| {
        s.worker.poll_interval_seconds = 1;
        // Microsoft's Retry-After beyond this is the caller's to schedule, not the connector's.
        s.m365.max_retry_after_ms = 1_000;
    })
    .await;
    let res = env
        .app
        .http
        .put(env.url("/applications/crm"))
        .bearer_auth(env.app.admin())
        .json(&json!({"app_id": CRM, "allow_unscoped_permissions": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    create_group(&env, "crm-scope", &["alice"]).await;

    // Exchange's 429 says how long to wait (a sandbox behaviour; off by default).
    let res = env
        .app
        .http
        .patch(format!(
            "{}/_sandbox/tenants/{}/settings",
            env.sandbox.base_url, env.tenant
        ))
        .json(&json!({"exchangeRetryAfter": true}))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.text().await.unwrap());
    // One InvokeCommand per window from now on; the check tests two mailboxes per run.
    set_exchange_budget(&env, json!(format!("1/{WINDOW_SECONDS}s"))).await;
    let res = env
        .app
        .http
        .post(env.url("/propagation-checks"))
        .bearer_auth(env.app.admin())
        .json(&json!({"app_id": CRM, "expectations": [
            {"mailbox": addr("alice"), "expected": "granted"},
            {"mailbox": addr("carol"), "expected": "granted"}
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    let created: Value = res.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();

    // The first run is throttled on its second call: the job goes back to the queue, due at
    // Retry-After, with no failure counted and no error recorded.
    let db = env.app.db.client().await;
    let mut row = job_row(&db, &id).await;
    for _ in 0..200 {
        if row.1 >= 1 && row.0 == "queued" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        row = job_row(&db, &id).await;
    }
    let (state, attempt, failures, run_at, last_error) = row;
    assert_eq!(
        (state.as_str(), attempt),
        ("queued", 1),
        "the job never ran"
    );
    assert_eq!(
        failures, 0,
        "throttling counted as a failure: {last_error:?}"
    );
    assert_eq!(last_error, None);
    let wait = (run_at - Utc::now()).num_seconds();
    assert!(
        (WINDOW_SECONDS - 30..=WINDOW_SECONDS + 5).contains(&wait),
        "due in {wait} s, expected about {WINDOW_SECONDS} s (Retry-After)"
    );
    let waiting = check(&env, &id).await;
    assert!(
        matches!(waiting["state"].as_str(), Some("queued" | "running")),
        "{waiting:#}"
    );
    assert!(waiting["next_run_at"].is_string(), "{waiting:#}");

    // When the window has passed (sandbox clock; the job made due at once), the check completes.
    set_exchange_budget(&env, Value::Null).await;
    env.sandbox
        .advance_clock(Duration::from_secs(WINDOW_SECONDS as u64 + 1));
    db.execute(
        "UPDATE jobs SET run_at = now() FROM propagation_checks p
         WHERE p.id = $1 AND jobs.id = p.job_id AND jobs.state = 'queued'",
        &[&id.parse::<uuid::Uuid>().unwrap()],
    )
    .await
    .unwrap();
    let mut last = Value::Null;
    for _ in 0..200 {
        last = check(&env, &id).await;
        if last["finished_at"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last["state"], "succeeded", "{last:#}");
    // The handler finishes the check before the worker records the job's outcome.
    let mut row = job_row(&db, &id).await;
    for _ in 0..50 {
        if row.0 != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        row = job_row(&db, &id).await;
    }
    let (state, _, failures, _, _) = row;
    assert_eq!((state.as_str(), failures), ("succeeded", 0));
}
