//! Signed callbacks against a real PostgreSQL and a local receiver (wiremock): what arrives, how
//! it is signed, and how failures are retried or given up. The receiver is 127.0.0.1, so these
//! settings list it exactly and allow http, as an operator would for an internal receiver.
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use mailscope::config::{Secret, WebhookSettings};
use mailscope::queue::worker::{Worker, WorkerConfig};
use mailscope::queue::{self, JobState};
use mailscope::webhooks::{self, DeliveryState, DeliveryStatus};
use sha2::Sha256;
use tokio::sync::watch;
use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

/// 32 bytes of 0x2a, base64: the receiver's copy of the secret.
const SECRET: &str = "whsec_KioqKioqKioqKioqKioqKioqKioqKioqKioqKio=";

pub fn hook_settings(max_attempts: i32) -> WebhookSettings {
    WebhookSettings {
        signing_secret: Some(Secret::new(SECRET)),
        previous_signing_secrets: vec![],
        allowed_hosts: vec!["127.0.0.1".into()],
        allow_http: true,
        timeout_seconds: 5,
        max_attempts,
    }
}

/// What a receiver does, computed here without mailscope's code: HMAC-SHA256 keyed by the
/// base64 after `whsec_`, over `id.timestamp.body`.
pub fn receiver_accepts(req: &wiremock::Request) -> bool {
    let h = |n: &str| req.headers.get(n).unwrap().to_str().unwrap().to_string();
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", h("webhook-id"), h("webhook-timestamp")).as_bytes());
    mac.update(&req.body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    h("webhook-signature")
        .split(' ')
        .any(|s| s == format!("v1,{expected}"))
}

async fn db() -> (TestDb, deadpool_postgres::Pool) {
    let db = TestDb::create().await;
    mailscope::app::migrate(&db.url).await.unwrap();
    let pool = mailscope::store::create_pool(&db.url, &test_settings(&db.url).database).unwrap();
    (db, pool)
}

fn start_worker(
    pool: &deadpool_postgres::Pool,
    settings: WebhookSettings,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let cfg = WorkerConfig {
        concurrency: 2,
        poll_interval: Duration::from_millis(100),
        reap_interval: Duration::from_millis(500),
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(2),
        ..WorkerConfig::default()
    };
    let mut w = Worker::new(pool.clone(), cfg, &prometheus::Registry::new(), None).unwrap();
    webhooks::register(&mut w, settings);
    let (tx, rx) = watch::channel(false);
    (tx, tokio::spawn(w.run(rx)))
}

async fn enqueue(
    pool: &deadpool_postgres::Pool,
    settings: &WebhookSettings,
    tenant: Uuid,
    subject: Uuid,
    url: &str,
) -> Uuid {
    let url = webhooks::validate_callback_url(url, settings).unwrap();
    let mut c = pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    let id = webhooks::enqueue_delivery(
        &tx,
        tenant,
        subject,
        "propagation_check.completed",
        &url,
        serde_json::json!({"check_id": subject, "state": "succeeded"}),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    id
}

/// Wait until the delivery is no longer pending.
async fn settled(pool: &deadpool_postgres::Pool, tenant: Uuid, subject: Uuid) -> DeliveryStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let c = pool.get().await.unwrap();
        let all = webhooks::deliveries_for(&c, tenant, subject).await.unwrap();
        assert_eq!(all.len(), 1);
        if all[0].state != DeliveryState::Pending {
            return all[0].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivery still pending: {:?}",
            all[0]
        );
        drop(c);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The delivery's job once it has ended (the handler settles the delivery row just before the
/// worker records the job's outcome).
async fn job_ended(pool: &deadpool_postgres::Pool, delivery: Uuid) -> queue::JobRecord {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let job = job_of(pool, delivery).await;
        if job.state.is_final() {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job not ended: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn job_of(pool: &deadpool_postgres::Pool, delivery: Uuid) -> queue::JobRecord {
    let c = pool.get().await.unwrap();
    let row = c
        .query_one(
            "SELECT job_id FROM webhook_deliveries WHERE id = $1",
            &[&delivery],
        )
        .await
        .unwrap();
    queue::get(&c, row.get(0)).await.unwrap().unwrap()
}

#[tokio::test]
async fn the_service_worker_delivers_a_signed_event() {
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hooks/mailscope"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&receiver)
        .await;
    let settings = hook_settings(5);
    let s = settings.clone();
    let app = spawn_app_with(move |cfg| {
        cfg.webhooks = s;
        cfg.worker.poll_interval_seconds = 1;
    })
    .await;
    let pool = mailscope::store::create_pool(&app.db.url, &app.settings.database).unwrap();
    let (tenant, check) = (Uuid::new_v4(), Uuid::new_v4());
    let id = enqueue(
        &pool,
        &settings,
        tenant,
        check,
        &format!("{}/hooks/mailscope", receiver.uri()),
    )
    .await;

    let status = settled(&pool, tenant, check).await;
    assert_eq!(status.state, DeliveryState::Delivered);
    assert_eq!(status.id, id);
    assert_eq!(status.attempt_count, 1);
    assert_eq!(status.attempts[0].status_code, Some(204));
    assert!(status.finished_at.is_some() && status.next_attempt_at.is_none());

    let reqs = receiver.received_requests().await.unwrap();
    assert_eq!(reqs.len(), 1);
    let req = &reqs[0];
    assert_eq!(req.headers["webhook-id"], id.to_string().as_str());
    assert_eq!(req.headers["content-type"], "application/json");
    let ts: i64 = req.headers["webhook-timestamp"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((chrono::Utc::now().timestamp() - ts).abs() < 300);
    assert!(receiver_accepts(req), "the signature does not verify");
    let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(body["type"], "propagation_check.completed");
    assert_eq!(body["data"]["check_id"], check.to_string());
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    // Another tenant asking about the same subject sees nothing.
    let c = pool.get().await.unwrap();
    assert!(
        webhooks::deliveries_for(&c, Uuid::new_v4(), check)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn unavailable_receivers_are_retried_under_the_same_webhook_id() {
    let (_db, pool) = db().await;
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .mount(&receiver)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&receiver)
        .await;
    let settings = hook_settings(5);
    let (stop, worker) = start_worker(&pool, settings.clone());
    let (tenant, check) = (Uuid::new_v4(), Uuid::new_v4());
    let id = enqueue(&pool, &settings, tenant, check, &receiver.uri()).await;

    let status = settled(&pool, tenant, check).await;
    assert_eq!(status.state, DeliveryState::Delivered, "{status:?}");
    assert_eq!(status.attempt_count, 3);
    let codes: Vec<_> = status.attempts.iter().map(|a| a.status_code).collect();
    assert_eq!(codes, vec![Some(503), Some(503), Some(200)]);
    assert!(status.attempts[0].error.as_deref().unwrap().contains("503"));
    let reqs = receiver.received_requests().await.unwrap();
    assert_eq!(reqs.len(), 3);
    for r in &reqs {
        assert_eq!(r.headers["webhook-id"], id.to_string().as_str());
        assert!(receiver_accepts(r));
        assert_eq!(r.body, reqs[0].body, "every attempt sends the same event");
    }
    assert_eq!(job_ended(&pool, id).await.state, JobState::Succeeded);
    stop.send(true).unwrap();
    worker.await.unwrap();
}

#[tokio::test]
async fn a_client_error_fails_the_delivery_without_retrying() {
    let (_db, pool) = db().await;
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400))
        .mount(&receiver)
        .await;
    let settings = hook_settings(5);
    let (stop, worker) = start_worker(&pool, settings.clone());
    let (tenant, check) = (Uuid::new_v4(), Uuid::new_v4());
    let id = enqueue(&pool, &settings, tenant, check, &receiver.uri()).await;

    let status = settled(&pool, tenant, check).await;
    assert_eq!(status.state, DeliveryState::Failed);
    assert_eq!(status.attempt_count, 1);
    assert_eq!(status.attempts[0].status_code, Some(400));
    let job = job_ended(&pool, id).await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(receiver.received_requests().await.unwrap().len(), 1);
    stop.send(true).unwrap();
    worker.await.unwrap();
}

#[tokio::test]
async fn deliveries_give_up_after_max_attempts() {
    let (_db, pool) = db().await;
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&receiver)
        .await;
    let settings = hook_settings(2);
    let (stop, worker) = start_worker(&pool, settings.clone());
    let (tenant, check) = (Uuid::new_v4(), Uuid::new_v4());
    let id = enqueue(&pool, &settings, tenant, check, &receiver.uri()).await;

    let status = settled(&pool, tenant, check).await;
    assert_eq!(status.state, DeliveryState::Failed);
    assert_eq!(status.attempt_count, 2);
    let job = job_ended(&pool, id).await;
    assert_eq!(job.state, JobState::Failed);
    assert!(job.last_error.unwrap().contains("gave up after 2 attempts"));
    assert_eq!(receiver.received_requests().await.unwrap().len(), 2);
    stop.send(true).unwrap();
    worker.await.unwrap();
}

#[tokio::test]
async fn unreachable_receivers_are_retried_and_recorded_without_a_status() {
    let (_db, pool) = db().await;
    // A port nobody listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let settings = hook_settings(2);
    let (stop, worker) = start_worker(&pool, settings.clone());
    let (tenant, check) = (Uuid::new_v4(), Uuid::new_v4());
    enqueue(
        &pool,
        &settings,
        tenant,
        check,
        &format!("http://127.0.0.1:{port}/hook"),
    )
    .await;

    let status = settled(&pool, tenant, check).await;
    assert_eq!(status.state, DeliveryState::Failed);
    assert_eq!(status.attempt_count, 2);
    assert!(status.attempts.iter().all(|a| a.status_code.is_none()));
    assert!(
        status.attempts[0]
            .error
            .as_deref()
            .unwrap()
            .contains("connection failed")
    );
    stop.send(true).unwrap();
    worker.await.unwrap();
}

#[tokio::test]
async fn a_url_no_longer_allowed_is_refused_at_delivery_and_nothing_leaks() {
    let (_db, pool) = db().await;
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&receiver)
        .await;
    let accepted_with = hook_settings(5);
    // The operator has since removed 127.0.0.1 from the allow-list.
    let now = WebhookSettings {
        allowed_hosts: vec![],
        ..hook_settings(5)
    };
    let (stop, worker) = start_worker(&pool, now);
    let (tenant, check) = (Uuid::new_v4(), Uuid::new_v4());
    let url = format!("{}/hook?token=receiver-token", receiver.uri());
    enqueue(&pool, &accepted_with, tenant, check, &url).await;

    let status = settled(&pool, tenant, check).await;
    assert_eq!(status.state, DeliveryState::Failed);
    assert!(
        status.attempts[0]
            .error
            .as_deref()
            .unwrap()
            .contains("127.0.0.1")
    );
    assert!(receiver.received_requests().await.unwrap().is_empty());
    // What the API shows carries neither the signing secret nor the URL (and its token).
    let shown = serde_json::to_string(&status).unwrap();
    assert!(!shown.contains("whsec_") && !shown.contains("KioqKioq"));
    assert!(!shown.contains("receiver-token"));
    // Nor do the settings, however they are printed.
    let printed = format!(
        "{:?} {}",
        hook_settings(1),
        serde_json::to_string(&hook_settings(1)).unwrap()
    );
    assert!(!printed.contains("KioqKioq"), "{printed}");
    stop.send(true).unwrap();
    worker.await.unwrap();
}

#[tokio::test]
async fn during_a_rotation_events_verify_with_the_old_and_the_new_secret() {
    let (_db, pool) = db().await;
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&receiver)
        .await;
    let settings = WebhookSettings {
        // 32 bytes of 0x07: the new secret; the receiver still holds SECRET.
        signing_secret: Some(Secret::new(
            "whsec_BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
        )),
        previous_signing_secrets: vec![Secret::new(SECRET)],
        ..hook_settings(5)
    };
    let (stop, worker) = start_worker(&pool, settings.clone());
    let (tenant, check) = (Uuid::new_v4(), Uuid::new_v4());
    enqueue(&pool, &settings, tenant, check, &receiver.uri()).await;

    assert_eq!(
        settled(&pool, tenant, check).await.state,
        DeliveryState::Delivered
    );
    let reqs = receiver.received_requests().await.unwrap();
    let sig = reqs[0].headers["webhook-signature"].to_str().unwrap();
    assert_eq!(sig.split(' ').count(), 2, "{sig}");
    assert!(receiver_accepts(&reqs[0]));
    stop.send(true).unwrap();
    worker.await.unwrap();
}

#[tokio::test]
async fn a_cancelled_delivery_shows_as_failed() {
    let (_db, pool) = db().await;
    let settings = hook_settings(5);
    let (tenant, check) = (Uuid::new_v4(), Uuid::new_v4());
    // No worker runs: the delivery is still queued when it is cancelled.
    let id = enqueue(&pool, &settings, tenant, check, "http://127.0.0.1:9/hook").await;
    let c = pool.get().await.unwrap();
    let pending = webhooks::deliveries_for(&c, tenant, check).await.unwrap();
    assert_eq!(pending[0].state, DeliveryState::Pending);
    assert!(pending[0].next_attempt_at.is_some());
    queue::cancel(&c, job_of(&pool, id).await.id).await.unwrap();
    let after = webhooks::deliveries_for(&c, tenant, check).await.unwrap();
    assert_eq!(after[0].state, DeliveryState::Failed);
    assert!(after[0].next_attempt_at.is_none() && after[0].finished_at.is_some());
}

#[tokio::test]
async fn a_receivers_retry_after_is_honoured() {
    let (_db, pool) = db().await;
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "2"))
        .up_to_n_times(1)
        .mount(&receiver)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&receiver)
        .await;
    let settings = hook_settings(5);
    let (stop, worker) = start_worker(&pool, settings.clone());
    let (tenant, check) = (Uuid::new_v4(), Uuid::new_v4());
    enqueue(&pool, &settings, tenant, check, &receiver.uri()).await;

    let status = settled(&pool, tenant, check).await;
    assert_eq!(status.state, DeliveryState::Delivered);
    assert_eq!(status.attempt_count, 2);
    // The queue's own backoff here is under 200 ms: a gap of 2 s is the receiver's.
    let gap = status.attempts[1].at - status.attempts[0].at;
    assert!(gap >= chrono::Duration::milliseconds(1900), "{gap}");
    stop.send(true).unwrap();
    worker.await.unwrap();
}
