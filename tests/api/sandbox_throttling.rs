//! Throttling (429 with Retry-After), Exchange's concurrency limit and injected faults.
#![allow(clippy::unwrap_used)]
use std::time::Duration;

use mailscope::sandbox::SandboxSettings;
use mailscope::sandbox::settings::{Api, Budget, DelayRange};
use serde_json::{Value, json};

use crate::sandbox_helpers::*;

#[tokio::test]
async fn graph_budget_returns_429_with_whole_and_fractional_retry_after() {
    let mut s = SandboxSettings::fast();
    s.pacing.graph_budget = Some(Budget {
        limit: 3,
        window: Duration::from_secs(60),
    });
    let sb = Sb::start(s).await;
    let crm = sb.crm_token().await;
    for _ in 0..3 {
        assert_eq!(
            sb.graph(&crm, "GET", "organization", None).await.status,
            403
        );
    }
    let r = sb
        .graph(
            &crm,
            "GET",
            &format!("users/{}/messages", upn("alice")),
            None,
        )
        .await;
    assert_eq!(r.status, 429);
    let retry: f64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry > 0.0 && retry <= 60.0, "{retry}");
    // Graph sends whole and fractional seconds (docs/microsoft-365.md §8.6): a client meets both.
    let mut forms = vec![r.header("retry-after").unwrap().to_string()];
    for _ in 0..3 {
        let r = sb.graph(&crm, "GET", "organization", None).await;
        assert_eq!(r.status, 429);
        forms.push(r.header("retry-after").unwrap().to_string());
    }
    assert!(forms.iter().any(|f| f.contains('.')), "{forms:?}");
    assert!(forms.iter().any(|f| f.parse::<u64>().is_ok()), "{forms:?}");
    let e = r.json();
    assert_eq!(e["error"]["code"], "TooManyRequests");
    assert_eq!(e["error"]["innerError"]["status"], "429");
    // Budgets are per tenant: the fabrikam tenant is unaffected; and the window resets.
    sb.h.advance_clock(Duration::from_secs(61));
    assert_eq!(
        sb.graph(
            &crm,
            "GET",
            &format!("users/{}/messages", upn("alice")),
            None
        )
        .await
        .status,
        200
    );
    // Whole-second Retry-After is a setting.
    for _ in 0..3 {
        sb.graph(&crm, "GET", "organization", None).await;
    }
    sb.control(
        "PATCH",
        &format!("tenants/{}/settings", sb.tenant),
        Some(json!({"graphFractionalRetryAfter": false})),
    )
    .await;
    let r = sb.graph(&crm, "GET", "organization", None).await;
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").unwrap().parse::<u64>().is_ok());
}

#[tokio::test]
async fn batch_members_are_throttled_separately() {
    let mut s = SandboxSettings::fast();
    s.pacing.graph_budget = Some(Budget {
        limit: 3,
        window: Duration::from_secs(600),
    });
    let sb = Sb::start(s).await;
    let crm = sb.crm_token().await;
    let reqs: Vec<Value> = (0..4).map(|i| json!({"id": i.to_string(), "method": "GET", "url": format!("/users/{}", upn("alice"))})).collect();
    let r = sb
        .graph(&crm, "POST", "$batch", Some(json!({"requests": reqs})))
        .await;
    assert_eq!(r.status, 200, "the outer request passed (1 of 3)");
    let statuses: Vec<u64> = r.json()["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 2);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 2);
    let throttled = r.json()["responses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["status"] == 429)
        .cloned()
        .unwrap();
    assert!(throttled["headers"]["Retry-After"].is_string());
}

#[tokio::test]
async fn exchange_budget_and_rate_headers() {
    let mut s = SandboxSettings::fast();
    s.pacing.exchange_budget = Some(Budget {
        limit: 2,
        window: Duration::from_secs(300),
    });
    let sb = Sb::start(s).await;
    let x = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let r = sb
        .invoke(&x, "Get-Mailbox", json!({"Identity": "alice"}))
        .await;
    assert_eq!(r.header("rate-limit-limit").as_deref(), Some("2"));
    assert_eq!(r.header("rate-limit-remaining").as_deref(), Some("1"));
    assert!(r.header("rate-limit-reset").is_some());
    sb.invoke(&x, "Get-Mailbox", json!({"Identity": "alice"}))
        .await;
    let r = sb
        .invoke(&x, "Get-Mailbox", json!({"Identity": "alice"}))
        .await;
    assert_eq!(r.status, 429);
    assert!(
        r.header("retry-after").is_none(),
        "unverified; off by default"
    );
    sb.control(
        "PATCH",
        &format!("tenants/{}/settings", sb.tenant),
        Some(json!({"exchangeRetryAfter": true})),
    )
    .await;
    let r = sb
        .invoke(&x, "Get-Mailbox", json!({"Identity": "alice"}))
        .await;
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() > 0);
}

#[tokio::test]
async fn exchange_concurrency_limit() {
    let mut s = SandboxSettings::fast();
    s.pacing.exchange_concurrency = 1;
    s.pacing.latency = DelayRange::fixed(Duration::from_millis(600));
    s.pacing.fault_apis = vec![Api::Exchange];
    let sb = Sb::start(s).await;
    let x = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let (a, b, c) = tokio::join!(
        sb.invoke(&x, "Get-Mailbox", json!({"Identity": "alice"})),
        sb.invoke(&x, "Get-Mailbox", json!({"Identity": "bob"})),
        sb.invoke(&x, "Get-Mailbox", json!({"Identity": "carol"})),
    );
    let replies = [a, b, c];
    let limited: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(replies.iter().any(|r| r.status == 200));
    assert!(!limited.is_empty());
    assert!(String::from_utf8_lossy(&limited[0].bytes).contains("You have reached the maximum number of concurrent requests per tenant. Please wait and try again"));
}

#[tokio::test]
async fn injected_5xx_and_dropped_connections() {
    let mut s = SandboxSettings::fast();
    s.pacing.fault_5xx_rate = 1.0;
    s.pacing.fault_apis = vec![Api::Graph];
    let sb = Sb::start(s).await;
    let crm = sb.crm_token().await;
    let r = sb.graph(&crm, "GET", "organization", None).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "serviceNotAvailable");
    sb.control(
        "PATCH",
        "settings",
        Some(json!({"fault5xxRate": 0.0, "faultDropRate": 1.0})),
    )
    .await;
    let err =
        sb.c.get(sb.url("/v1.0/organization"))
            .bearer_auth(&crm)
            .send()
            .await;
    let failed = match err {
        Err(_) => true,
        Ok(resp) => resp.bytes().await.is_err(),
    };
    assert!(failed, "the connection drops before a complete response");
    let calls = sb.calls("api=graph").await;
    assert!(calls.iter().any(|c| c["fault"] == "dropped"));
    assert!(calls.iter().any(|c| c["fault"] == "server_error"));
}

#[tokio::test]
async fn faults_are_deterministic_under_a_seed() {
    let mut runs = vec![];
    for _ in 0..2 {
        let mut s = SandboxSettings::fast();
        s.seed = 1234;
        s.pacing.fault_5xx_rate = 0.5;
        s.pacing.fault_apis = vec![Api::Graph];
        let sb = Sb::start(s).await;
        let crm = sb.crm_token().await;
        let mut statuses = vec![];
        for _ in 0..16 {
            statuses.push(
                sb.graph(&crm, "GET", &format!("users/{}", upn("alice")), None)
                    .await
                    .status,
            );
        }
        runs.push(statuses);
    }
    assert_eq!(runs[0], runs[1]);
    assert!(
        runs[0].contains(&200) && runs[0].contains(&503),
        "{:?}",
        runs[0]
    );
}
