//! Resilience of the shared transport: throttling storms and every `Retry-After` form, injected
//! 5xx and timeouts, retry only of requests safe to repeat, per-tenant isolation, token refresh on
//! 401, and the metrics that record it all.
use crate::m365_support::*;
use mailscope::m365::exchange::NewSecurityGroup;
use mailscope::m365::graph::NewApplication;
use mailscope::m365::{ErrorKind, M365Settings};
use serde_json::json;
use std::time::{Duration, SystemTime};
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn user(id: &str) -> serde_json::Value {
    json!({"id": id, "userPrincipalName": format!("{id}@contoso.test"), "displayName": id})
}

fn throttled(retry_after: &str) -> (u16, ResponseTemplate) {
    (
        429,
        ResponseTemplate::new(429).insert_header("Retry-After", retry_after).set_body_json(json!({
            "error": {"code": "TooManyRequests", "message": "Please retry again later.",
                      "innerError": {"code": "429", "message": "Please retry after", "status": "429"}}
        })),
    )
}

/// For every path, the request after a 429 must not arrive before that 429's Retry-After.
fn assert_no_early_retry(hits: &[Hit], retry_after: Duration) {
    let mut paths: Vec<&str> = hits.iter().map(|h| h.path.as_str()).collect();
    paths.sort();
    paths.dedup();
    for p in paths {
        let mine: Vec<&Hit> = hits.iter().filter(|h| h.path == p).collect();
        for pair in mine.windows(2) {
            if pair[0].status == 429 {
                let gap = pair[1].at.duration_since(pair[0].at);
                assert!(
                    gap >= retry_after,
                    "{p}: retried after {gap:?}, Retry-After was {retry_after:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn throttling_storm_waits_for_retry_after_and_every_call_finishes() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, Some(1)).await;
    let script = Script::new(|req, n| {
        if n < 2 {
            throttled("1")
        } else {
            json(200, user(req.url.path().rsplit('/').next().unwrap_or("x")))
        }
    });
    Mock::given(method("GET"))
        .and(path_regex("^/v1.0/users/"))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    let (c, registry) = client(fast_settings());
    let t = c.tenant(context(&server, TENANT, secret_credential()));
    let calls = (0..6).map(|i| {
        let g = t.graph();
        tokio::spawn(async move { g.get_user(&format!("u{i}")).await })
    });
    for (i, r) in futures_util::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        let u = r
            .unwrap()
            .expect("finishes despite throttling")
            .expect("user exists");
        assert_eq!(u.id, format!("u{i}"));
    }
    let hits = script.hits();
    assert_eq!(
        hits.len(),
        18,
        "two throttled attempts and one success per caller"
    );
    assert_no_early_retry(&hits, Duration::from_secs(1));
    let labels = [
        ("tenant", TENANT),
        ("service", "graph"),
        ("operation", "users.get"),
    ];
    assert_eq!(counter(&registry, "m365_throttled_total", &labels), 12.0);
    assert_eq!(
        counter(
            &registry,
            "m365_calls_total",
            &[labels[0], labels[1], labels[2], ("outcome", "ok")]
        ),
        6.0
    );
    assert_eq!(
        counter(
            &registry,
            "m365_retries_total",
            &[labels[0], labels[1], ("reason", "throttled")]
        ),
        12.0
    );
}

#[tokio::test]
async fn fractional_retry_after_is_honoured() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let script = Script::new(|_, n| {
        if n == 0 {
            throttled("0.6")
        } else {
            json(200, user("a"))
        }
    });
    Mock::given(method("GET"))
        .and(path("/v1.0/users/a"))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    tenant(&server)
        .graph()
        .get_user("a")
        .await
        .unwrap()
        .unwrap();
    let hits = script.hits();
    assert_eq!(hits.len(), 2);
    assert_no_early_retry(&hits, Duration::from_millis(600));
}

#[tokio::test]
async fn http_date_retry_after_is_honoured() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let not_before = SystemTime::now() + Duration::from_secs(2);
    let date = httpdate::fmt_http_date(not_before);
    let script = Script::new(move |_, n| {
        if n == 0 {
            throttled(&date)
        } else {
            json(200, user("a"))
        }
    });
    Mock::given(method("GET"))
        .and(path("/v1.0/users/a"))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    tenant(&server)
        .graph()
        .get_user("a")
        .await
        .unwrap()
        .unwrap();
    let hits = script.hits();
    assert_eq!(hits.len(), 2);
    // The date has whole seconds: the retry must not come before that second.
    let floor = httpdate::parse_http_date(&httpdate::fmt_http_date(not_before)).unwrap();
    assert!(hits[1].wall >= floor, "retried before the HTTP-date");
}

#[tokio::test]
async fn injected_5xx_then_success() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let script = Script::new(|_, n| match n {
        0 => json(
            503,
            json!({"error": {"code": "serviceNotAvailable", "message": "down"}}),
        ),
        1 => (
            502,
            ResponseTemplate::new(502).set_body_string("<html>bad gateway</html>"),
        ),
        _ => json(200, user("a")),
    });
    Mock::given(method("GET"))
        .and(path("/v1.0/users/a"))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    let u = tenant(&server).graph().get_user("a").await.unwrap();
    assert_eq!(u.unwrap().id, "a");
    assert_eq!(script.hits().len(), 3);
}

#[tokio::test]
async fn timeout_then_success() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let script = Script::new(|_, n| {
        let (s, t) = json(200, user("a"));
        if n == 0 {
            (s, t.set_delay(Duration::from_secs(3)))
        } else {
            (s, t)
        }
    });
    Mock::given(method("GET"))
        .and(path("/v1.0/users/a"))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    let t = tenant_with(
        &server,
        M365Settings {
            graph_timeout_ms: 300,
            ..fast_settings()
        },
    );
    assert_eq!(t.graph().get_user("a").await.unwrap().unwrap().id, "a");
    assert_eq!(script.hits().len(), 2);
}

#[tokio::test]
async fn persistent_timeout_reports_timeout_after_max_attempts() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let script = Script::new(|_, _| {
        let (s, t) = json(200, user("a"));
        (s, t.set_delay(Duration::from_secs(3)))
    });
    Mock::given(method("GET"))
        .and(path("/v1.0/users/a"))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    let t = tenant_with(
        &server,
        M365Settings {
            graph_timeout_ms: 200,
            max_attempts: 2,
            ..fast_settings()
        },
    );
    let err = t.graph().get_user("a").await.unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::Timeout);
    assert_eq!(script.hits().len(), 2);
}

#[tokio::test]
async fn unsafe_posts_are_not_repeated_after_5xx() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    Mock::given(method("POST"))
        .and(path("/v1.0/applications"))
        .respond_with(
            ResponseTemplate::new(503)
                .set_body_json(json!({"error": {"code": "serviceNotAvailable"}})),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .respond_with(ResponseTemplate::new(504))
        .expect(1)
        .mount(&server)
        .await;
    let t = tenant(&server);
    let err = t
        .graph()
        .create_application(&NewApplication {
            display_name: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::Transient);
    let err = t
        .exchange()
        .new_security_group(&NewSecurityGroup {
            name: "g".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::Transient);
}

#[tokio::test]
async fn throttled_posts_are_repeated_because_they_were_refused() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let script = Script::new(|_, n| {
        if n == 0 {
            throttled("0")
        } else {
            json(
                201,
                json!({"id": "obj-1", "appId": "app-1", "displayName": "x"}),
            )
        }
    });
    Mock::given(method("POST"))
        .and(path("/v1.0/applications"))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    let app = tenant(&server)
        .graph()
        .create_application(&NewApplication {
            display_name: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(app.app_id, "app-1");
    assert_eq!(script.hits().len(), 2);
}

#[tokio::test]
async fn retry_after_beyond_the_cap_is_handed_back_to_the_caller() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let script = Script::new(|_, _| throttled("3600"));
    Mock::given(method("GET"))
        .and(path("/v1.0/users/a"))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    let err = tenant(&server).graph().get_user("a").await.unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(3600)));
    assert!(matches!(err.kind(), ErrorKind::Throttled { .. }));
    assert_eq!(err.code(), "throttled");
    assert_eq!(script.hits().len(), 1);
}

#[tokio::test]
async fn a_throttled_tenant_does_not_hold_up_another() {
    const OTHER: &str = "0b0b0b0b-3333-4444-5555-666666666666";
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    mount_token(&server, OTHER, None).await;
    let busy = Script::new(|_, n| {
        if n == 0 {
            throttled("3")
        } else {
            json(200, user("busy"))
        }
    });
    Mock::given(method("GET"))
        .and(path("/v1.0/users/busy"))
        .respond_with(busy.clone())
        .mount(&server)
        .await;
    let calm = Script::new(|_, _| json(200, user("calm")));
    Mock::given(method("GET"))
        .and(path("/v1.0/users/calm"))
        .respond_with(calm.clone())
        .mount(&server)
        .await;

    let (c, _) = client(fast_settings());
    let a = c.tenant(context(&server, TENANT, secret_credential()));
    let b = c.tenant(context(&server, OTHER, secret_credential()));
    let busy_call = tokio::spawn(async move { a.graph().get_user("busy").await });
    while busy.hits().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..3 {
        b.graph().get_user("calm").await.unwrap().unwrap();
    }
    busy_call.await.unwrap().unwrap().unwrap();
    let retry_of_busy = busy.hits()[1].at;
    assert!(
        calm.hits().iter().all(|h| h.at < retry_of_busy),
        "the other tenant waited for the throttled one"
    );
}

#[tokio::test]
async fn graph_401_fetches_a_fresh_token_once() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, Some(2)).await;
    let script = Script::new(|_, n| {
        if n == 0 {
            json(
                401,
                json!({"error": {"code": "InvalidAuthenticationToken", "message": "Access token has expired."}}),
            )
        } else {
            json(200, user("a"))
        }
    });
    Mock::given(method("GET"))
        .and(path("/v1.0/users/a"))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    assert_eq!(
        tenant(&server)
            .graph()
            .get_user("a")
            .await
            .unwrap()
            .unwrap()
            .id,
        "a"
    );
    assert_eq!(script.hits().len(), 2);
}

#[tokio::test]
async fn unreachable_host_is_reported_as_such() {
    // A port that was just free: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let (c, _) = client(M365Settings {
        max_attempts: 2,
        ..fast_settings()
    });
    let mut ctx = context(&server, TENANT, secret_credential());
    ctx.endpoints.graph = format!("http://127.0.0.1:{port}");
    let err = c.tenant(ctx).graph().get_user("a").await.unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::Unreachable);
    assert!(err.fix().contains("firewall"));
}

#[tokio::test]
async fn exchange_calls_of_one_tenant_respect_the_concurrency_limit() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let script = Script::new(|_, _| {
        let (s, t) = json(200, json!({"value": []}));
        (s, t.set_delay(Duration::from_millis(150)))
    });
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    let t = tenant_with(
        &server,
        M365Settings {
            exchange_concurrency_per_tenant: 1,
            ..fast_settings()
        },
    );
    let calls = (0..4).map(|_| {
        let x = t.exchange();
        tokio::spawn(async move { x.list_mailboxes(Some(1)).await })
    });
    for r in futures_util::future::join_all(calls).await {
        r.unwrap().unwrap();
    }
    let hits = script.hits();
    assert_eq!(hits.len(), 4);
    // With one slot, a request can only arrive after the previous answer (150 ms later) was read.
    for w in hits.windows(2) {
        assert!(
            w[1].at.duration_since(w[0].at) >= Duration::from_millis(150),
            "two requests overlapped"
        );
    }
}
