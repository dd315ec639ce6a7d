//! Idempotency-Key semantics over HTTP, with the real middleware stack and PostgreSQL, in front of
//! a counting handler (the provisioning POSTs get the same layer).
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, middleware::from_fn, web};
use mailscope::api::{AppState, idempotency, middleware::request_context};
use mailscope::auth::Verifier;
use serde_json::json;

use crate::helpers::*;

struct Echo {
    base: String,
    calls: Arc<AtomicUsize>,
    db: TestDb,
    settings: mailscope::config::Settings,
    _handle: actix_web::dev::ServerHandle,
}

impl Echo {
    fn token(&self, sub: &str) -> String {
        mailscope::auth::mint_hs256(
            &self.settings.auth,
            HS_SECRET,
            sub,
            &["MailScope.Write".into()],
            &["*".into()],
            600,
        )
        .unwrap()
    }
}

/// POST /v1/echo: counts calls; `{"status": N, "sleep_ms": M}` shapes the answer.
async fn echo_server() -> Echo {
    let db = TestDb::create().await;
    mailscope::app::migrate(&db.url).await.unwrap();
    let settings = test_settings(&db.url);
    let pool = mailscope::store::create_pool(&db.url, &settings.database).unwrap();
    let key = mailscope::config::decode_encryption_key(ENCRYPTION_KEY).unwrap();
    let state = web::Data::new(AppState {
        pool,
        cipher: mailscope::crypto::CredentialCipher::new(&key),
        settings: Arc::new(settings.clone()),
        m365: mailscope::m365::M365Client::new(settings.m365.clone(), &prometheus::Registry::new())
            .unwrap(),
        key_locks: Default::default(),
        liveness: Default::default(),
    });
    let verifier = web::Data::new(Verifier::hs256(settings.auth.clone(), HS_SECRET));
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let server = HttpServer::new(move || {
        let c = c.clone();
        App::new()
            .wrap(from_fn(request_context))
            .app_data(state.clone())
            .app_data(verifier.clone())
            .service(
                web::scope("/v1")
                    .wrap(from_fn(idempotency::middleware))
                    .route(
                        "/echo{rest:(/other)?}",
                        web::post().to(move |body: web::Json<serde_json::Value>| {
                            let c = c.clone();
                            async move {
                                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                                if let Some(ms) = body["sleep_ms"].as_u64() {
                                    tokio::time::sleep(Duration::from_millis(ms)).await;
                                }
                                let status = body["status"].as_u64().unwrap_or(201) as u16;
                                HttpResponse::build(
                                    actix_web::http::StatusCode::from_u16(status).unwrap(),
                                )
                                .insert_header(("Location", format!("/v1/echo/{n}")))
                                .json(json!({"call": n}))
                            }
                        }),
                    ),
            )
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let port = server.addrs()[0].port();
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    Echo {
        base: format!("http://127.0.0.1:{port}"),
        calls,
        db,
        settings,
        _handle: handle,
    }
}

async fn post(
    e: &Echo,
    token: &str,
    key: Option<&str>,
    body: serde_json::Value,
) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(format!("{}/v1/echo", e.base))
        .bearer_auth(token)
        .json(&body);
    if let Some(k) = key {
        r = r.header("Idempotency-Key", k);
    }
    r.send().await.unwrap()
}

#[tokio::test]
async fn same_key_and_body_replays_the_first_response() {
    let e = echo_server().await;
    let t = e.token("alice");
    let first = post(&e, &t, Some("\"k-1\""), json!({"a": 1})).await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let loc = first.headers()["location"].clone();
    let first_body: serde_json::Value = first.json().await.unwrap();

    let again = post(&e, &t, Some("\"k-1\""), json!({"a": 1})).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["location"], loc);
    assert_eq!(again.json::<serde_json::Value>().await.unwrap(), first_body);
    assert_eq!(e.calls.load(Ordering::SeqCst), 1, "the handler ran once");

    // Without a key, nothing is deduplicated.
    post(&e, &t, None, json!({"a": 1})).await;
    assert_eq!(e.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn same_key_with_another_body_is_422() {
    let e = echo_server().await;
    let t = e.token("alice");
    assert_eq!(
        post(&e, &t, Some("k-2"), json!({"a": 1})).await.status(),
        201
    );
    let res = post(&e, &t, Some("k-2"), json!({"a": 2})).await;
    assert_problem(res, 422, "idempotency_key_reused").await;
    assert_eq!(e.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn concurrent_duplicates_run_once_and_the_rest_are_told_to_retry() {
    let e = echo_server().await;
    let t = e.token("alice");
    let body = json!({"sleep_ms": 700});
    let results =
        futures_util::future::join_all((0..10).map(|_| post(&e, &t, Some("k-3"), body.clone())))
            .await;
    let statuses: Vec<u16> = results.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(
        e.calls.load(Ordering::SeqCst),
        1,
        "exactly one execution: {statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    for r in results.into_iter().filter(|r| r.status() == 409) {
        assert_eq!(r.headers()["retry-after"], "1");
        assert_problem(r, 409, "idempotency_key_in_use").await;
    }
    // After the first finishes, the same request replays.
    let later = post(&e, &t, Some("k-3"), body).await;
    assert_eq!(later.headers()["idempotent-replayed"], "true");
    assert_eq!(e.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn client_errors_replay_but_transient_failures_release_the_key() {
    let e = echo_server().await;
    let t = e.token("alice");
    let bad = post(&e, &t, Some("k-4"), json!({"status": 409})).await;
    assert_eq!(bad.status(), 409);
    let bad_again = post(&e, &t, Some("k-4"), json!({"status": 409})).await;
    assert_eq!(bad_again.headers()["idempotent-replayed"], "true");
    assert_eq!(e.calls.load(Ordering::SeqCst), 1);

    let flaky = post(&e, &t, Some("k-5"), json!({"status": 503})).await;
    assert_eq!(flaky.status(), 503);
    let retried = post(&e, &t, Some("k-5"), json!({"status": 503})).await;
    assert!(
        retried.headers().get("idempotent-replayed").is_none(),
        "a 503 is retried, not replayed"
    );
    assert_eq!(e.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn keys_are_scoped_to_the_caller() {
    let e = echo_server().await;
    let body = json!({"x": 1});
    assert_eq!(
        post(&e, &e.token("alice"), Some("shared"), body.clone())
            .await
            .status(),
        201
    );
    let bob = post(&e, &e.token("bob"), Some("shared"), body).await;
    assert_eq!(bob.status(), 201);
    assert!(bob.headers().get("idempotent-replayed").is_none());
    assert_eq!(e.calls.load(Ordering::SeqCst), 2);
}

/// Turn the stored answer of `k` back into a request still in progress, held for an hour.
async fn make_in_progress(e: &Echo, holder: Option<i32>) {
    let db = e.db.client().await;
    db.execute(
        "UPDATE idempotency_keys SET response_status = NULL,
             locked_until = now() + interval '1 hour', holder = coalesce($1, holder)",
        &[&holder],
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_request_whose_task_died_is_taken_over_at_once() {
    let e = echo_server().await;
    let t = e.token("alice");
    let body = json!({"y": 1});
    // Run it once, then make its record look like this process's request that never finished
    // (its task was dropped mid-way): nothing in the process runs it any more.
    assert_eq!(post(&e, &t, Some("k-6"), body.clone()).await.status(), 201);
    let db = e.db.client().await;
    db.execute(
        "UPDATE idempotency_keys SET response_status = NULL,
             locked_until = now() + interval '1 hour'",
        &[],
    )
    .await
    .unwrap();
    let res = post(&e, &t, Some("k-6"), body).await;
    assert_eq!(res.status(), 201, "not 409 for the next five minutes");
    assert!(
        res.headers().get("idempotent-replayed").is_none(),
        "taken over and run again"
    );
    assert_eq!(e.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_request_whose_process_died_is_taken_over_at_once() {
    let e = echo_server().await;
    let t = e.token("alice");
    let body = json!({"z": 1});
    assert_eq!(post(&e, &t, Some("k-7"), body.clone()).await.status(), 201);
    // Another replica: a session holding its lease, and the key in progress under it.
    let other = e.db.client().await;
    other
        .execute(
            "SELECT pg_advisory_lock($1, 4242)",
            &[&mailscope::store::liveness::LOCK_CLASS],
        )
        .await
        .unwrap();
    make_in_progress(&e, Some(4242)).await;
    let res = post(&e, &t, Some("k-7"), body.clone()).await;
    assert_eq!(res.headers()["retry-after"], "1");
    assert_problem(res, 409, "idempotency_key_in_use").await;
    assert_eq!(
        e.calls.load(Ordering::SeqCst),
        1,
        "a live holder keeps its key"
    );

    // The replica dies: its connection closes and the retry runs at once.
    drop(other);
    let mut res = post(&e, &t, Some("k-7"), body.clone()).await;
    for _ in 0..20 {
        // The server notices the closed socket within milliseconds; allow for a slow machine.
        if res.status() != 409 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        res = post(&e, &t, Some("k-7"), body.clone()).await;
    }
    assert_eq!(res.status(), 201);
    assert!(res.headers().get("idempotent-replayed").is_none());
    assert_eq!(e.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_record_without_a_holder_waits_for_its_lease() {
    let e = echo_server().await;
    let t = e.token("alice");
    let body = json!({"w": 1});
    assert_eq!(post(&e, &t, Some("k-8"), body.clone()).await.status(), 201);
    let db = e.db.client().await;
    db.execute(
        "UPDATE idempotency_keys SET response_status = NULL, holder = NULL,
             locked_until = now() + interval '1 hour'",
        &[],
    )
    .await
    .unwrap();
    assert_problem(
        post(&e, &t, Some("k-8"), body.clone()).await,
        409,
        "idempotency_key_in_use",
    )
    .await;
    db.execute(
        "UPDATE idempotency_keys SET locked_until = now() - interval '1 second'",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(post(&e, &t, Some("k-8"), body).await.status(), 201);
    assert_eq!(e.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn callers_without_an_identity_cannot_use_keys() {
    let e = echo_server().await;
    let s = &e.settings.auth;
    let now = chrono::Utc::now().timestamp();
    // Valid, with a role, but naming no caller: no sub, oid, azp or appid.
    let claims = json!({"iss": s.issuer, "aud": s.audience, "exp": now + 600,
        "roles": ["MailScope.Write"], s.tenants_claim.as_str(): ["*"]});
    let anonymous = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(HS_SECRET.as_bytes()),
    )
    .unwrap();
    let body = json!({"v": 1});
    let res = post(&e, &anonymous, Some("k-9"), body.clone()).await;
    let problem = assert_problem(res, 400, "invalid_idempotency_key").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("sub"),
        "{problem}"
    );
    assert_eq!(e.calls.load(Ordering::SeqCst), 0);
    // Without the key the same caller is served.
    assert_eq!(post(&e, &anonymous, None, body).await.status(), 201);
}

#[tokio::test]
async fn the_same_key_on_another_path_is_another_key() {
    let e = echo_server().await;
    let t = e.token("alice");
    let body = json!({"u": 1});
    assert_eq!(post(&e, &t, Some("k-10"), body.clone()).await.status(), 201);
    let other = reqwest::Client::new()
        .post(format!("{}/v1/echo/other", e.base))
        .bearer_auth(&t)
        .header("Idempotency-Key", "k-10")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 201, "not idempotency_key_reused");
    assert!(other.headers().get("idempotent-replayed").is_none());
    assert_eq!(e.calls.load(Ordering::SeqCst), 2);
}

/// The replay must not skip the handler's authorization: a Read token on tenant A with the same
/// `sub` as an Admin gets no replay of the Admin's sync of tenant B.
#[tokio::test]
async fn a_replay_is_authorized_like_the_request() {
    let env = WithSandbox::start().await;
    let sync = |token: String| {
        env.app
            .http
            .post(env.url("/sync"))
            .bearer_auth(token)
            .header("Idempotency-Key", "\"sync-1\"")
            .send()
    };
    let first = sync(env.app.admin()).await.unwrap();
    assert_eq!(first.status(), 200);
    let again = sync(env.app.admin()).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");

    let tenant_a = uuid::Uuid::new_v4().to_string();
    // Same `sub` ("tester"), only Read, only on tenant A.
    let reader = env.app.token(&["MailScope.Read"], &[&tenant_a]);
    let res = sync(reader).await.unwrap();
    assert!(res.headers().get("idempotent-replayed").is_none());
    assert_problem(res, 403, "forbidden").await;
    // Same `sub`, Write, but tenant B is not among its tenants: as if B did not exist.
    let writer_on_a = env.app.token(&["MailScope.Write"], &[&tenant_a]);
    let res = sync(writer_on_a).await.unwrap();
    assert!(res.headers().get("idempotent-replayed").is_none());
    assert_problem(res, 404, "not_found").await;
}

#[tokio::test]
async fn malformed_keys_are_400() {
    let e = echo_server().await;
    let t = e.token("alice");
    for k in ["\"\"", &"x".repeat(300)] {
        assert_problem(
            post(&e, &t, Some(k), json!({})).await,
            400,
            "invalid_idempotency_key",
        )
        .await;
    }
    assert_eq!(e.calls.load(Ordering::SeqCst), 0);
}
