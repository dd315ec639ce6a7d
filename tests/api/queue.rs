//! The job queue against a real PostgreSQL: claiming, fencing, retries, cancellation, fairness,
//! wake-ups and shutdown. Workers run in-process with short leases and intervals.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailscope::queue::worker::{Outcome, Worker, WorkerConfig};
use mailscope::queue::{self, Enqueued, JobState, NewJob};
use tokio::sync::watch;
use uuid::Uuid;

use crate::helpers::*;

async fn queue_db() -> (TestDb, deadpool_postgres::Pool) {
    let db = TestDb::create().await;
    mailscope::app::migrate(&db.url).await.unwrap();
    let pool = mailscope::store::create_pool(&db.url, &test_settings(&db.url).database).unwrap();
    (db, pool)
}

fn cfg() -> WorkerConfig {
    WorkerConfig {
        concurrency: 4,
        per_tenant_cap: 4,
        lease: Duration::from_secs(3),
        poll_interval: Duration::from_millis(200),
        reap_interval: Duration::from_millis(200),
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(5),
        ..WorkerConfig::default()
    }
}

fn worker(pool: &deadpool_postgres::Pool, cfg: WorkerConfig, listen: Option<&str>) -> Worker {
    Worker::new(
        pool.clone(),
        cfg,
        &prometheus::Registry::new(),
        listen.map(str::to_string),
    )
    .unwrap()
}

async fn wait_state(
    pool: &deadpool_postgres::Pool,
    id: Uuid,
    want: JobState,
    secs: u64,
) -> queue::JobRecord {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let c = pool.get().await.unwrap();
        let job = queue::get(&c, id).await.unwrap().unwrap();
        if job.state == want {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} stuck in {:?}, wanted {want:?}: {job:?}",
            job.state
        );
        drop(c);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn start(w: Worker) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    (tx, tokio::spawn(w.run(rx)))
}

#[tokio::test]
async fn job_runs_once_and_result_is_stored() {
    let (_db, pool) = queue_db().await;
    let c = pool.get().await.unwrap();
    let id = queue::enqueue(
        &c,
        &NewJob::new("echo", Uuid::nil(), serde_json::json!({"n": 7})),
    )
    .await
    .unwrap()
    .id();
    let mut w = worker(&pool, cfg(), None);
    w.register("echo", |ctx| async move {
        Outcome::Succeeded(ctx.job.payload.clone())
    });
    let (stop, handle) = start(w);
    let job = wait_state(&pool, id, JobState::Succeeded, 10).await;
    assert_eq!(job.result, Some(serde_json::json!({"n": 7})));
    assert_eq!(job.attempt, 1);
    stop.send(true).unwrap();
    handle.await.unwrap();
}

#[tokio::test]
async fn one_active_job_per_unique_key() {
    let (_db, pool) = queue_db().await;
    let c = pool.get().await.unwrap();
    let tenant = Uuid::new_v4();
    let mut job = NewJob::new("check", tenant, serde_json::json!({}));
    job.unique_key = Some("app-1".into());
    let first = queue::enqueue(&c, &job).await.unwrap();
    let second = queue::enqueue(&c, &job).await.unwrap();
    assert!(matches!(first, Enqueued::Created(_)));
    assert_eq!(second, Enqueued::Existing(first.id()));
    // Once the first is final, a new one may start.
    queue::cancel(&c, first.id()).await.unwrap();
    assert!(matches!(
        queue::enqueue(&c, &job).await.unwrap(),
        Enqueued::Created(_)
    ));
}

#[tokio::test]
async fn failures_retry_with_backoff_then_fail_for_good() {
    let (_db, pool) = queue_db().await;
    let c = pool.get().await.unwrap();
    let mut flaky = NewJob::new("flaky", Uuid::nil(), serde_json::json!({}));
    flaky.max_failures = 5;
    let flaky = queue::enqueue(&c, &flaky).await.unwrap().id();
    let mut doomed = NewJob::new("doomed", Uuid::nil(), serde_json::json!({}));
    doomed.max_failures = 3;
    let doomed = queue::enqueue(&c, &doomed).await.unwrap().id();
    let runs = Arc::new(Mutex::new(0));
    let mut w = worker(&pool, cfg(), None);
    let r = runs.clone();
    w.register("flaky", move |_| {
        let r = r.clone();
        async move {
            let mut n = r.lock().unwrap();
            *n += 1;
            if *n < 3 {
                Outcome::Retry(format!("transient {n}"))
            } else {
                Outcome::Succeeded(serde_json::json!("ok"))
            }
        }
    });
    w.register("doomed", |_| async {
        Outcome::Retry("always broken".into())
    });
    let (stop, handle) = start(w);
    let ok = wait_state(&pool, flaky, JobState::Succeeded, 10).await;
    assert_eq!(ok.attempt, 3);
    let bad = wait_state(&pool, doomed, JobState::Failed, 10).await;
    assert_eq!(bad.failures, 3);
    assert_eq!(bad.last_error.as_deref(), Some("always broken"));
    stop.send(true).unwrap();
    handle.await.unwrap();
}

#[tokio::test]
async fn a_lapsed_lease_is_reclaimed_and_the_late_worker_is_fenced_off() {
    let (_db, pool) = queue_db().await;
    let c = pool.get().await.unwrap();
    let id = queue::enqueue(&c, &NewJob::new("slow", Uuid::nil(), serde_json::json!({})))
        .await
        .unwrap()
        .id();
    // Worker A claims, then "crashes": it never heartbeats (we claim by hand).
    let a = worker(
        &pool,
        WorkerConfig {
            lease: Duration::from_secs(1),
            ..cfg()
        },
        None,
    );
    let claimed = a.claim(&["slow".to_string()], 1).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].attempt, 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(mailscope::queue::worker::reap(&pool).await.unwrap(), 1);

    let mut b = worker(&pool, cfg(), None);
    b.register("slow", |ctx| async move {
        Outcome::Succeeded(serde_json::json!({"attempt": ctx.job.attempt}))
    });
    let (stop, handle) = start(b);
    let done = wait_state(&pool, id, JobState::Succeeded, 10).await;
    assert_eq!(done.attempt, 2);
    assert_eq!(done.failures, 0);
    // A finishes late with its old attempt number: nothing changes.
    let late = a
        .record(id, 1, &Outcome::Fail("late result".into()))
        .await
        .unwrap();
    assert!(!late, "a write fenced by a stale attempt matches no row");
    let after = queue::get(&c, id).await.unwrap().unwrap();
    assert_eq!(after.state, JobState::Succeeded);
    assert_eq!(after.result, Some(serde_json::json!({"attempt": 2})));
    stop.send(true).unwrap();
    handle.await.unwrap();
}

#[tokio::test]
async fn two_workers_never_run_the_same_job_at_once() {
    let (_db, pool) = queue_db().await;
    let c = pool.get().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..60 {
        let tenant = Uuid::from_u128(1 + (i % 6) as u128);
        ids.push(
            queue::enqueue(&c, &NewJob::new("count", tenant, serde_json::json!({})))
                .await
                .unwrap()
                .id(),
        );
    }
    let runs: Arc<Mutex<HashMap<Uuid, usize>>> = Arc::default();
    let active: Arc<Mutex<std::collections::HashSet<Uuid>>> = Arc::default();
    let mut stops = Vec::new();
    for _ in 0..2 {
        let mut w = worker(&pool, cfg(), None);
        let (runs, active) = (runs.clone(), active.clone());
        w.register("count", move |ctx| {
            let (runs, active) = (runs.clone(), active.clone());
            async move {
                assert!(
                    active.lock().unwrap().insert(ctx.job.id),
                    "job running twice at once"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
                *runs.lock().unwrap().entry(ctx.job.id).or_default() += 1;
                active.lock().unwrap().remove(&ctx.job.id);
                Outcome::Succeeded(serde_json::Value::Null)
            }
        });
        stops.push(start(w));
    }
    for id in &ids {
        wait_state(&pool, *id, JobState::Succeeded, 30).await;
    }
    assert!(
        runs.lock().unwrap().values().all(|n| *n == 1),
        "each job ran exactly once"
    );
    assert_eq!(runs.lock().unwrap().len(), 60);
    for (stop, handle) in stops {
        stop.send(true).unwrap();
        handle.await.unwrap();
    }
}

#[tokio::test]
async fn a_busy_tenant_cannot_starve_the_others() {
    let (_db, pool) = queue_db().await;
    let c = pool.get().await.unwrap();
    let busy = Uuid::from_u128(1);
    let quiet = Uuid::from_u128(2);
    for _ in 0..12 {
        queue::enqueue(&c, &NewJob::new("work", busy, serde_json::json!({})))
            .await
            .unwrap();
    }
    // Enqueued last, so a plain FIFO would run it after all of the busy tenant's jobs.
    let q = queue::enqueue(&c, &NewJob::new("work", quiet, serde_json::json!({})))
        .await
        .unwrap()
        .id();
    let order: Arc<Mutex<Vec<Uuid>>> = Arc::default();
    let max_busy = Arc::new(Mutex::new((0usize, 0usize))); // (current, max) of the busy tenant
    let mut w = worker(
        &pool,
        WorkerConfig {
            concurrency: 4,
            per_tenant_cap: 2,
            ..cfg()
        },
        None,
    );
    let (o, m) = (order.clone(), max_busy.clone());
    w.register("work", move |ctx| {
        let (o, m) = (o.clone(), m.clone());
        async move {
            o.lock().unwrap().push(ctx.job.tenant_id);
            if ctx.job.tenant_id == busy {
                let mut g = m.lock().unwrap();
                g.0 += 1;
                g.1 = g.1.max(g.0);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if ctx.job.tenant_id == busy {
                m.lock().unwrap().0 -= 1;
            }
            Outcome::Succeeded(serde_json::Value::Null)
        }
    });
    let (stop, handle) = start(w);
    wait_state(&pool, q, JobState::Succeeded, 20).await;
    let position = order
        .lock()
        .unwrap()
        .iter()
        .position(|t| *t == quiet)
        .unwrap();
    assert!(
        position <= 2,
        "the quiet tenant ran early (position {position})"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(max_busy.lock().unwrap().1 <= 2, "per-tenant cap respected");
    stop.send(true).unwrap();
    handle.await.unwrap();
}

#[tokio::test]
async fn cancel_stops_queued_and_running_jobs() {
    let (_db, pool) = queue_db().await;
    let c = pool.get().await.unwrap();
    let mut later = NewJob::new("wait", Uuid::nil(), serde_json::json!({}));
    later.run_at = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    let queued = queue::enqueue(&c, &later).await.unwrap().id();
    assert_eq!(
        queue::cancel(&c, queued).await.unwrap(),
        Some(JobState::Cancelled)
    );

    let running = queue::enqueue(&c, &NewJob::new("wait", Uuid::nil(), serde_json::json!({})))
        .await
        .unwrap()
        .id();
    let mut w = worker(
        &pool,
        WorkerConfig {
            lease: Duration::from_millis(600),
            ..cfg()
        },
        None,
    );
    w.register("wait", |mut ctx| async move {
        ctx.cancel.cancelled().await;
        Outcome::Cancelled
    });
    let (stop, handle) = start(w);
    wait_state(&pool, running, JobState::Running, 10).await;
    assert_eq!(
        queue::cancel(&c, running).await.unwrap(),
        Some(JobState::Running)
    );
    wait_state(&pool, running, JobState::Cancelled, 10).await;
    stop.send(true).unwrap();
    handle.await.unwrap();
}

#[tokio::test]
async fn shutdown_releases_jobs_still_running() {
    let (_db, pool) = queue_db().await;
    let c = pool.get().await.unwrap();
    let id = queue::enqueue(
        &c,
        &NewJob::new("forever", Uuid::nil(), serde_json::json!({})),
    )
    .await
    .unwrap()
    .id();
    let mut w = worker(
        &pool,
        WorkerConfig {
            shutdown_grace: Duration::from_millis(200),
            ..cfg()
        },
        None,
    );
    w.register("forever", |_| async {
        std::future::pending::<()>().await;
        Outcome::Succeeded(serde_json::Value::Null)
    });
    let (stop, handle) = start(w);
    wait_state(&pool, id, JobState::Running, 10).await;
    stop.send(true).unwrap();
    handle.await.unwrap();
    let job = queue::get(&c, id).await.unwrap().unwrap();
    assert_eq!(
        job.state,
        JobState::Queued,
        "released, not left to a lapsing lease"
    );
    assert!(job.lease_owner.is_none());
    assert_eq!(job.failures, 0, "a release is not a failure");
}

#[tokio::test]
async fn notify_wakes_an_idle_worker_long_before_its_poll() {
    let (db, pool) = queue_db().await;
    let mut w = worker(
        &pool,
        WorkerConfig {
            poll_interval: Duration::from_secs(120),
            ..cfg()
        },
        Some(&db.url),
    );
    w.register("ping", |_| async {
        Outcome::Succeeded(serde_json::Value::Null)
    });
    let (stop, handle) = start(w);
    tokio::time::sleep(Duration::from_millis(500)).await; // let it go idle and LISTEN
    let c = pool.get().await.unwrap();
    let id = queue::enqueue(&c, &NewJob::new("ping", Uuid::nil(), serde_json::json!({})))
        .await
        .unwrap()
        .id();
    // Far less than the 120 s poll: only a notification can explain it.
    wait_state(&pool, id, JobState::Succeeded, 30).await;
    stop.send(true).unwrap();
    handle.await.unwrap();
}

/// A job another process schedules ahead wakes an idle worker at its `run_at`, not at its poll:
/// the notification carries the delay and the listener keeps a timer (migration 0015).
#[tokio::test]
async fn a_job_scheduled_ahead_elsewhere_runs_at_its_time_not_at_the_poll() {
    let (db, pool) = queue_db().await;
    let mut w = worker(
        &pool,
        WorkerConfig {
            poll_interval: Duration::from_secs(120),
            ..cfg()
        },
        Some(&db.url),
    );
    w.register("later", |_| async {
        Outcome::Succeeded(serde_json::Value::Null)
    });
    let (stop, handle) = start(w);
    tokio::time::sleep(Duration::from_millis(500)).await; // let it go idle and LISTEN
    // Plain SQL on a connection of its own, as another replica or a script would.
    let (other, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let id = Uuid::new_v4();
    other
        .execute(
            "INSERT INTO jobs (id, kind, tenant_id, run_at)
             VALUES ($1, 'later', $2, now() + interval '1.5 seconds')",
            &[&id, &Uuid::nil()],
        )
        .await
        .unwrap();
    // Far less than the 120 s poll, and the worker's own reschedule timer never saw this job.
    let job = wait_state(&pool, id, JobState::Succeeded, 30).await;
    assert!(
        job.started_at.unwrap() >= job.run_at,
        "not before its time: {job:?}"
    );
    stop.send(true).unwrap();
    handle.await.unwrap();
}

#[tokio::test]
async fn enqueue_many_inserts_all_in_order_and_respects_unique_keys() {
    let (_db, pool) = queue_db().await;
    let c = pool.get().await.unwrap();
    let tenant = Uuid::from_u128(7);
    let mut keyed = NewJob::new("check", tenant, serde_json::json!({"k": 1}));
    keyed.unique_key = Some("app-1".into());
    let active = queue::enqueue(&c, &keyed).await.unwrap();
    let mut later = NewJob::new("check", Uuid::from_u128(8), serde_json::json!({"n": 2}));
    later.run_at = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    let mut fresh_key = NewJob::new("check", tenant, serde_json::json!({}));
    fresh_key.unique_key = Some("app-2".into());
    let batch = vec![
        NewJob::new("check", tenant, serde_json::json!({"n": 1})),
        keyed.clone(), // the active job's key: its id comes back
        later,
        fresh_key.clone(),
        fresh_key, // the same key twice in one call: the first wins
    ];
    let out = queue::enqueue_many(&c, &batch).await.unwrap();
    assert_eq!(out.len(), 5);
    assert!(matches!(out[0], Enqueued::Created(_)));
    assert_eq!(out[1], Enqueued::Existing(active.id()));
    assert!(matches!(out[2], Enqueued::Created(_)));
    assert!(matches!(out[3], Enqueued::Created(_)));
    assert_eq!(out[4], Enqueued::Existing(out[3].id()));
    let jobs = queue::get_many(&c, &out.iter().map(|e| e.id()).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(jobs.len(), 4);
    assert_eq!(jobs[&out[0].id()].payload, serde_json::json!({"n": 1}));
    assert!(jobs[&out[2].id()].run_at > chrono::Utc::now());
    assert!(queue::enqueue_many(&c, &[]).await.unwrap().is_empty());

    // The claim's per-tenant summary saw the bulk insert: the earliest queued job of each tenant.
    let rows = c
        .query(
            "SELECT q.next_run_at = (SELECT min(run_at) FROM jobs j
                 WHERE j.tenant_id = q.tenant_id AND j.state = 'queued')
             FROM queue_tenants q ORDER BY q.tenant_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.get::<_, bool>(0)));
}

/// Tenants whose summary claims a queued job earlier than their earliest one, or none when they
/// have one: either would let a job wait unseen.
async fn summary_violations(c: &deadpool_postgres::Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM (SELECT tenant_id, min(run_at) AS first FROM jobs
                               WHERE state = 'queued' GROUP BY tenant_id) j
         LEFT JOIN queue_tenants q USING (tenant_id)
         WHERE q.next_run_at IS NULL OR q.next_run_at > j.first",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn the_per_tenant_summary_follows_claims_outcomes_cancels_and_the_reaper() {
    let (_db, pool) = queue_db().await;
    let c = pool.get().await.unwrap();
    let tenant = Uuid::from_u128(9);
    let jobs: Vec<NewJob> = (0..6)
        .map(|i| NewJob::new("step", tenant, serde_json::json!({ "i": i })))
        .collect();
    let ids: Vec<Uuid> = queue::enqueue_many(&c, &jobs)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id())
        .collect();
    let bound = || async {
        c.query_one(
            "SELECT next_run_at IS NOT NULL FROM queue_tenants WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .unwrap()
        .get::<_, bool>(0)
    };
    let w = worker(
        &pool,
        WorkerConfig {
            per_tenant_cap: 2,
            lease: Duration::from_millis(200),
            ..cfg()
        },
        None,
    );
    let kinds = vec!["step".to_string()];
    // The cap holds within a claim and across claims.
    assert_eq!(w.claim(&kinds, 16).await.unwrap().len(), 2);
    assert_eq!(w.claim(&kinds, 16).await.unwrap().len(), 0);
    assert_eq!(summary_violations(&c).await, 0);
    // Cancelling queued jobs leaves a bound that still covers the earliest queued job.
    for id in &ids[4..] {
        queue::cancel(&c, *id).await.unwrap();
    }
    assert_eq!(summary_violations(&c).await, 0);
    // A lapsed lease returns both to the queue.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        mailscope::queue::worker::reap(&pool).await.unwrap(),
        2,
        "both leases lapsed"
    );
    assert_eq!(summary_violations(&c).await, 0);
    // Claim and finish the four queued jobs, two at a time; a rescheduled one comes back.
    for round in 0..3 {
        let claimed = w.claim(&kinds, 16).await.unwrap();
        assert_eq!(claimed.len(), if round < 2 { 2 } else { 1 });
        for (n, j) in claimed.into_iter().enumerate() {
            let outcome = if round == 0 && n == 0 {
                Outcome::Reschedule {
                    at: chrono::Utc::now(),
                    payload: None,
                }
            } else {
                Outcome::Succeeded(serde_json::Value::Null)
            };
            assert!(w.record(j.id, j.attempt, &outcome).await.unwrap());
            assert_eq!(summary_violations(&c).await, 0);
        }
    }
    // Nothing left: the next claim finds nothing and clears the bound it left behind.
    assert!(w.claim(&kinds, 16).await.unwrap().is_empty());
    assert!(!bound().await, "no queued job, no bound");
}

#[tokio::test]
async fn a_claim_looks_past_tenants_whose_queued_jobs_were_cancelled() {
    let (_db, pool) = queue_db().await;
    let c = pool.get().await.unwrap();
    // Forty tenants' jobs, all cancelled: their bounds are left behind, earlier than the job
    // that waits in the forty-first tenant.
    let past = chrono::Utc::now() - chrono::Duration::minutes(10);
    let mut batch: Vec<NewJob> = (0..40u128)
        .map(|t| {
            let mut j = NewJob::new("step", Uuid::from_u128(100 + t), serde_json::json!({}));
            j.run_at = Some(past);
            j
        })
        .collect();
    let cancelled: Vec<Uuid> = queue::enqueue_many(&c, &batch)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id())
        .collect();
    for id in cancelled {
        queue::cancel(&c, id).await.unwrap();
    }
    batch = vec![NewJob::new(
        "step",
        Uuid::from_u128(999),
        serde_json::json!({}),
    )];
    let waiting = queue::enqueue_many(&c, &batch).await.unwrap()[0].id();
    let w = worker(&pool, cfg(), None);
    let claimed = w.claim(&["step".to_string()], 16).await.unwrap();
    assert_eq!(
        claimed.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![waiting],
        "one claim of 16 reaches the live job behind 40 stale tenants"
    );
    let stale: i64 = c
        .query_one(
            "SELECT count(*) FROM queue_tenants WHERE next_run_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        stale, 0,
        "the tenants it looked at have their bounds set right"
    );
}

#[tokio::test]
async fn a_busy_worker_never_runs_more_jobs_than_its_concurrency_and_runs_each_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (_db, pool) = queue_db().await;
    let c = pool.get().await.unwrap();
    // 300 short jobs over 30 tenants: the worker stays busy, so it claims in half-batches with
    // two calls under way at once.
    let batch: Vec<NewJob> = (0..300u128)
        .map(|i| {
            NewJob::new(
                "short",
                Uuid::from_u128(i % 30),
                serde_json::json!({ "i": i }),
            )
        })
        .collect();
    queue::enqueue_many(&c, &batch).await.unwrap();
    let now_running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let mut w = worker(
        &pool,
        WorkerConfig {
            concurrency: 6,
            per_tenant_cap: 6,
            ..cfg()
        },
        None,
    );
    let (n, m, r) = (now_running.clone(), most.clone(), runs.clone());
    w.register("short", move |_ctx| {
        let (n, m, r) = (n.clone(), m.clone(), r.clone());
        async move {
            let now = n.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            r.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(1 + (now as u64 % 4))).await;
            n.fetch_sub(1, Ordering::SeqCst);
            Outcome::Succeeded(serde_json::Value::Null)
        }
    });
    let (stop, handle) = start(w);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let done: i64 = c
            .query_one("SELECT count(*) FROM jobs WHERE state = 'succeeded'", &[])
            .await
            .unwrap()
            .get(0);
        if done == 300 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {done} of 300 succeeded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    handle.await.unwrap();
    assert!(
        most.load(Ordering::SeqCst) <= 6,
        "ran {} at once",
        most.load(Ordering::SeqCst)
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        300,
        "each job ran exactly once"
    );
    let attempts: i32 = c
        .query_one("SELECT max(attempt) FROM jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 1, "no job was claimed twice");
}

#[tokio::test]
async fn a_transaction_lost_to_a_deadlock_is_reported_as_retryable_not_as_an_internal_error() {
    let (_db, pool) = queue_db().await;
    let setup = pool.get().await.unwrap();
    setup
        .batch_execute("CREATE TABLE pair (id int PRIMARY KEY); INSERT INTO pair VALUES (1), (2)")
        .await
        .unwrap();
    let (mut a, mut b) = (pool.get().await.unwrap(), pool.get().await.unwrap());
    let (ta, tb) = (
        a.transaction().await.unwrap(),
        b.transaction().await.unwrap(),
    );
    ta.execute("UPDATE pair SET id = id WHERE id = 1", &[])
        .await
        .unwrap();
    tb.execute("UPDATE pair SET id = id WHERE id = 2", &[])
        .await
        .unwrap();
    // Each now waits for the other's row: the server aborts one of them.
    let (ra, rb) = tokio::join!(
        ta.execute("UPDATE pair SET id = id WHERE id = 2", &[]),
        tb.execute("UPDATE pair SET id = id WHERE id = 1", &[]),
    );
    let lost = match (ra, rb) {
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => e,
        other => panic!("expected exactly one deadlock victim: {other:?}"),
    };
    assert_eq!(mailscope::store::sqlstate(&lost), Some("40P01"));
    assert!(
        matches!(
            mailscope::store::StoreError::from(lost),
            mailscope::store::StoreError::Unavailable(_)
        ),
        "a deadlock victim is worth retrying (503 with Retry-After), not a 500"
    );
}
