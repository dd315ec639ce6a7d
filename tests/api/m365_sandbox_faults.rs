//! The Microsoft 365 connector against `mailscope sandbox` when things go wrong: throttling
//! storms (never a call before `Retry-After`, every operation finishes), injected 5xx, dropped
//! connections and timeouts, expired and invalid credentials, missing Exchange grants,
//! replication lag after a create, and tokens the service stops accepting.
use crate::m365_sandbox::{Env, test_settings};
use crate::sandbox_helpers::upn;
use chrono::{DateTime, Utc};
use mailscope::m365::exchange::{NewSecurityGroup, Replication};
use mailscope::m365::graph::NewApplication;
use mailscope::m365::{ErrorKind, M365Settings, TokenResource};
use mailscope::sandbox::SandboxSettings;
use mailscope::sandbox::settings::{Api, Budget, DelayRange};
use serde_json::{Value, json};
use std::time::Duration;

fn at(call: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(call["at"].as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

/// For one API's calls, in arrival order: every call after a 429 arrived no earlier than that
/// 429's `Retry-After` (the sandbox's log records both; its times are truncated to the
/// millisecond, hence 1 ms of slack). Returns the number of 429s checked.
fn assert_nothing_sent_before_retry_after(calls: &[Value]) -> usize {
    let mut throttled = 0;
    for (i, c) in calls.iter().enumerate() {
        if c["status"] != 429 {
            continue;
        }
        throttled += 1;
        let ra: f64 = c["retryAfter"]
            .as_str()
            .unwrap_or_else(|| panic!("429 without Retry-After: {c}"))
            .parse()
            .unwrap();
        let earliest = at(c) + chrono::Duration::microseconds((ra * 1e6) as i64)
            - chrono::Duration::milliseconds(1);
        if let Some(next) = calls.get(i + 1) {
            assert!(
                at(next) >= earliest,
                "call #{} at {} came before the Retry-After ({ra} s) of the 429 at {}",
                next["seq"],
                next["at"],
                c["at"]
            );
            // Waiting as long as asked finds a fresh budget window.
            assert_ne!(next["status"], 429, "a second 429 after honouring {c}");
        }
    }
    throttled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_throttling_storm_never_calls_before_retry_after_and_finishes() {
    let mut s = SandboxSettings::fast();
    s.pacing.graph_budget = Some(Budget {
        limit: 6,
        window: Duration::from_millis(700),
    });
    let env = Env::start(
        s,
        M365Settings {
            // One request in flight per tenant: then the sandbox's arrival log shows exactly
            // what the connector sent after seeing each 429.
            graph_concurrency_per_tenant: 1,
            max_attempts: 20,
            ..test_settings()
        },
    )
    .await;
    let t = env.tenant();
    // The token first, so the storm is Graph calls only.
    t.token(TokenResource::Graph).await.unwrap();
    let people = ["alice", "bob", "carol", "dave", "erin"];
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let g = t.graph();
            let who = upn(people[i % people.len()]);
            tokio::spawn(async move { g.get_user(&who).await })
        })
        .collect();
    for task in tasks {
        assert!(
            task.await.unwrap().unwrap().is_some(),
            "every caller finished"
        );
    }
    let calls = env.calls("graph").await;
    let throttled = assert_nothing_sent_before_retry_after(&calls);
    assert!(throttled >= 2, "the storm was throttled: {throttled}");
    assert_eq!(
        calls.len(),
        24 + throttled,
        "each 429 cost exactly one retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_throttling_storm_with_whole_second_retry_after() {
    let mut s = SandboxSettings::fast();
    s.pacing.exchange_budget = Some(Budget {
        limit: 4,
        window: Duration::from_millis(1500),
    });
    let env = Env::start(
        s,
        M365Settings {
            exchange_concurrency_per_tenant: 1,
            max_attempts: 20,
            ..test_settings()
        },
    )
    .await;
    env.patch_tenant(json!({"exchangeRetryAfter": true})).await;
    let t = env.tenant();
    t.token(TokenResource::Exchange).await.unwrap();
    let people = ["alice", "bob", "carol", "dave", "erin"];
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let x = t.exchange();
            let who = people[i % people.len()];
            tokio::spawn(async move { x.get_mailbox(who).await })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap().unwrap().is_some());
    }
    let calls = env.calls("exchange").await;
    let throttled = assert_nothing_sent_before_retry_after(&calls);
    assert!(throttled >= 1, "{calls:?}");
}

#[tokio::test]
async fn exchange_429_without_retry_after_and_concurrency_limit_are_backed_off_to_success() {
    // Exchange's default: 429 without Retry-After (unverified), plus its concurrency limit.
    let mut s = SandboxSettings::fast();
    s.pacing.exchange_budget = Some(Budget {
        limit: 3,
        window: Duration::from_millis(400),
    });
    s.pacing.exchange_concurrency = 1;
    s.pacing.latency = DelayRange::fixed(Duration::from_millis(30));
    s.pacing.fault_apis = vec![Api::Exchange];
    let env = Env::start(
        s,
        M365Settings {
            exchange_concurrency_per_tenant: 4,
            max_attempts: 30,
            ..test_settings()
        },
    )
    .await;
    let t = env.tenant();
    let x = t.exchange();
    let who = [
        "alice", "bob", "carol", "dave", "erin", "alice", "bob", "carol",
    ];
    let results = futures_util::future::join_all(who.iter().map(|w| x.get_mailbox(w))).await;
    assert!(
        results.iter().all(|r| matches!(r, Ok(Some(_)))),
        "{results:?}"
    );
    let calls = env.calls("exchange").await;
    let faults: Vec<&str> = calls.iter().filter_map(|c| c["fault"].as_str()).collect();
    assert!(faults.contains(&"throttled") || faults.contains(&"concurrency_limit"));
    assert_eq!(
        calls.iter().filter(|c| c["status"] == 200).count(),
        who.len()
    );
}

#[tokio::test]
async fn batch_members_throttled_inside_a_batch_are_resent_until_done() {
    let mut s = SandboxSettings::fast();
    s.pacing.graph_budget = Some(Budget {
        limit: 12,
        window: Duration::from_millis(500),
    });
    let env = Env::start(
        s,
        M365Settings {
            max_attempts: 20,
            ..test_settings()
        },
    )
    .await;
    let g = env.tenant().graph();
    let reqs: Vec<_> = (0..30)
        .map(|i| {
            mailscope::m365::graph::BatchRequest::get(
                format!("{i}"),
                format!("/users/{}", upn(["alice", "bob", "carol"][i % 3])),
            )
        })
        .collect();
    let out = g.batch(reqs).await.unwrap();
    assert!(out.iter().all(|r| r.status == 200), "{out:?}");
    let inner = env
        .calls("graph")
        .await
        .into_iter()
        .filter(|c| c["batchRequestId"].is_string())
        .collect::<Vec<_>>();
    assert!(
        inner.iter().any(|c| c["status"] == 429),
        "some parts were throttled"
    );
    // Only the failed parts were sent again: 30 successes, each id succeeded once.
    let ok: Vec<&str> = inner
        .iter()
        .filter(|c| c["status"] == 200)
        .map(|c| c["batchRequestId"].as_str().unwrap())
        .collect();
    assert_eq!(ok.len(), 30);
}

// ---------------------------------------------------------------- 5xx, drops, timeouts

fn faulty(rate_5xx: f64, rate_drop: f64) -> SandboxSettings {
    let mut s = SandboxSettings::fast();
    s.seed = 7;
    s.pacing.fault_5xx_rate = rate_5xx;
    s.pacing.fault_drop_rate = rate_drop;
    s.pacing.fault_apis = vec![Api::Graph, Api::Exchange];
    s
}

#[tokio::test]
async fn safe_requests_survive_injected_5xx_and_dropped_connections() {
    let env = Env::start(
        faulty(0.25, 0.1),
        M365Settings {
            max_attempts: 12,
            ..test_settings()
        },
    )
    .await;
    let t = env.tenant();
    // Concurrent, so the 503s' `Retry-After: 2` waits overlap.
    let who = [
        "alice", "bob", "carol", "dave", "erin", "alice", "bob", "carol",
    ];
    let g = t.graph();
    let x = t.exchange();
    let (users, mailboxes) = tokio::join!(
        futures_util::future::join_all(who.iter().map(|w| {
            let g = g.clone();
            async move { g.get_user(&upn(w)).await }
        })),
        futures_util::future::join_all(who.iter().map(|w| x.get_mailbox(w))),
    );
    assert!(users.iter().all(|u| matches!(u, Ok(Some(_)))), "{users:?}");
    assert!(
        mailboxes.iter().all(|m| matches!(m, Ok(Some(_)))),
        "{mailboxes:?}"
    );
    let calls = env.sb.calls("").await;
    let faults: Vec<&str> = calls.iter().filter_map(|c| c["fault"].as_str()).collect();
    assert!(faults.contains(&"server_error"), "{faults:?}");
    assert!(faults.contains(&"dropped"), "{faults:?}");
}

#[tokio::test]
async fn unsafe_creates_are_not_repeated_after_a_5xx() {
    let env = Env::start(
        faulty(1.0, 0.0),
        M365Settings {
            max_attempts: 3,
            ..test_settings()
        },
    )
    .await;
    let t = env.tenant();
    let e = t
        .graph()
        .create_application(&NewApplication {
            display_name: "maybe created".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(*e.kind(), ErrorKind::Transient, "{e}");
    let e = t
        .exchange()
        .new_security_group(&NewSecurityGroup {
            name: "maybe-created".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(*e.kind(), ErrorKind::Transient, "{e}");
    let graph = env.calls("graph").await;
    assert_eq!(graph.len(), 1, "POST /applications sent once: {graph:?}");
    assert_eq!(env.cmdlet_calls("New-DistributionGroup").await.len(), 1);
    // A safe read is retried up to max_attempts, then reported as transient.
    let e = t.exchange().get_mailbox("alice").await.unwrap_err();
    assert_eq!(*e.kind(), ErrorKind::Transient);
    assert_eq!(env.cmdlet_calls("Get-Mailbox").await.len(), 3);
}

#[tokio::test]
async fn slow_answers_time_out_and_safe_ones_are_retried_to_success() {
    let mut s = SandboxSettings::fast();
    s.seed = 11;
    // Requests take 0-600 ms; the connector waits 300 ms, so about half time out.
    s.pacing.latency = DelayRange {
        min: Duration::ZERO,
        max: Duration::from_millis(600),
    };
    s.pacing.fault_apis = vec![Api::Graph];
    let env = Env::start(
        s,
        M365Settings {
            graph_timeout_ms: 300,
            max_attempts: 12,
            ..test_settings()
        },
    )
    .await;
    let t = env.tenant();
    let g = t.graph();
    let users = futures_util::future::join_all(["alice", "bob", "carol", "dave"].map(|w| {
        let g = g.clone();
        async move { g.get_user(&upn(w)).await }
    }))
    .await;
    assert!(users.iter().all(|u| matches!(u, Ok(Some(_)))), "{users:?}");
    let timeouts = crate::m365_support::counter(
        &env.registry,
        "m365_calls_total",
        &[("operation", "users.get"), ("outcome", "timeout")],
    );
    assert!(timeouts >= 1.0, "some attempts timed out: {timeouts}");

    // A create that times out is not sent again: its outcome is unknown.
    let mut created = None;
    for i in 0..12 {
        match t
            .graph()
            .create_application(&NewApplication {
                display_name: format!("slow {i}"),
                ..Default::default()
            })
            .await
        {
            Err(e) if *e.kind() == ErrorKind::Timeout => {
                created = Some(i);
                break;
            }
            Err(e) => panic!("{e}"),
            Ok(_) => {}
        }
    }
    let i = created.expect("one create timed out");
    let creates = crate::m365_support::counter(
        &env.registry,
        "m365_calls_total",
        &[("operation", "applications.create")],
    );
    assert_eq!(creates, f64::from(i + 1), "one attempt per create");
}

// ---------------------------------------------------------------- credentials and grants

#[tokio::test]
async fn credential_failures_are_named() {
    let env = Env::fast().await;
    // Expired secret: AADSTS7000222.
    let (expired, secret, _) = env
        .sb
        .new_app(json!({"displayName": "expired", "secretExpired": true}))
        .await;
    let e = env
        .as_app(&expired, &secret)
        .token(TokenResource::Graph)
        .await
        .unwrap_err();
    assert_eq!(*e.kind(), ErrorKind::ClientSecretExpired, "{e}");
    assert_eq!(e.code(), "client_secret_expired");
    assert_eq!(e.remote_code(), Some("AADSTS7000222"));
    assert!(!format!("{e} {e:?} {}", e.fix()).contains(&secret));

    // Wrong secret: AADSTS7000215.
    let wrong = "definitely-not-the-secret~value";
    let e = env
        .as_app(&env.sb.h.management_client_id(), wrong)
        .token(TokenResource::Exchange)
        .await
        .unwrap_err();
    assert_eq!(*e.kind(), ErrorKind::InvalidClientSecret, "{e}");
    assert!(!format!("{e} {e:?}").contains(wrong));

    // Unknown app: AADSTS700016.
    let e = env
        .as_app(&uuid::Uuid::new_v4().to_string(), "x")
        .graph()
        .get_user(&upn("alice"))
        .await
        .unwrap_err();
    assert_eq!(*e.kind(), ErrorKind::AppNotFoundInTenant, "{e}");

    // A failed sign-in is not retried (it cannot get better by itself).
    let logins = env.calls("login").await;
    assert_eq!(logins.len(), 3, "{logins:?}");
}

#[tokio::test]
async fn apps_without_exchange_grants_get_named_causes() {
    let env = Env::fast().await;
    let (no_role, s1, _) = env
        .sb
        .new_app(
            json!({"displayName": "no ManageAsApp", "directoryRoles": ["Exchange Administrator"]}),
        )
        .await;
    let e = env
        .as_app(&no_role, &s1)
        .exchange()
        .get_mailbox("alice")
        .await
        .unwrap_err();
    assert_eq!(*e.kind(), ErrorKind::MissingManageAsAppRole, "{e}");
    assert_eq!(e.code(), "missing_manage_as_app_role");

    let (no_admin, s2, _) = env
        .sb
        .new_app(json!({"displayName": "no admin role", "exchangePermissions": ["Exchange.ManageAsApp"]}))
        .await;
    let e = env
        .as_app(&no_admin, &s2)
        .exchange()
        .get_mailbox("alice")
        .await
        .unwrap_err();
    assert_eq!(*e.kind(), ErrorKind::MissingExchangeAdminRole, "{e}");
    assert_eq!(e.code(), "missing_exchange_admin_role");

    // The connection test says the same in words.
    let report = env.as_app(&no_role, &s1).connection_test().await;
    assert!(!report.ok);
    let step = report
        .steps
        .iter()
        .find(|s| s.step == "exchange_call")
        .unwrap();
    assert_eq!(step.code.as_deref(), Some("missing_manage_as_app_role"));
    assert!(report.steps.iter().any(|s| s.step == "graph_token"));
    let healthy = env.tenant().connection_test().await;
    assert!(healthy.ok, "{healthy:?}");
}

#[tokio::test]
async fn a_token_the_service_no_longer_accepts_is_replaced_once() {
    let env = Env::fast().await;
    let t = env.tenant();
    assert!(t.graph().get_user(&upn("alice")).await.unwrap().is_some());
    assert!(t.exchange().get_mailbox("alice").await.unwrap().is_some());
    // Two hours later (sandbox clock) the cached tokens have expired at Microsoft, while the
    // connector's own clock says they are fresh: the 401 makes it fetch new ones.
    env.sb.h.advance_clock(Duration::from_secs(2 * 3600));
    assert!(t.graph().get_user(&upn("bob")).await.unwrap().is_some());
    assert!(t.exchange().get_mailbox("bob").await.unwrap().is_some());
    let logins = env.calls("login").await;
    assert_eq!(logins.len(), 4, "two tokens, each fetched twice");
    let graph = env.sb.calls("api=graph").await;
    assert_eq!(
        graph
            .iter()
            .map(|c| c["status"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![200, 401, 200],
        "{graph:?}"
    );
}

#[tokio::test]
async fn replication_lag_after_new_distribution_group_is_waited_out_on_request() {
    let mut s = SandboxSettings::fast();
    s.pacing.replication_delay = DelayRange::fixed(Duration::from_millis(800));
    let env = Env::start(s, test_settings()).await;
    let x = env.tenant().exchange();
    x.new_security_group(&NewSecurityGroup {
        name: "fresh-group".into(),
        members: vec!["alice".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    // Without asking, a just-created group reads as absent...
    assert_eq!(
        x.get_distribution_group("fresh-group", Replication::Ignore)
            .await
            .unwrap(),
        None
    );
    // ...and with Replication::AwaitNew the 404s are retried until it appears.
    let g = x
        .get_distribution_group("fresh-group", Replication::AwaitNew)
        .await
        .unwrap();
    assert_eq!(g.unwrap().name.as_deref(), Some("fresh-group"));
    let m = x
        .get_distribution_group_members("fresh-group", Replication::AwaitNew)
        .await
        .unwrap();
    assert_eq!(m.len(), 1);
    let gets: Vec<u64> = env
        .cmdlet_calls("Get-DistributionGroup")
        .await
        .iter()
        .map(|c| c["status"].as_u64().unwrap())
        .collect();
    assert!(gets.len() >= 3, "{gets:?}");
    assert_eq!(gets.last(), Some(&200));
    assert!(gets[..gets.len() - 1].iter().all(|s| *s == 404), "{gets:?}");
}
