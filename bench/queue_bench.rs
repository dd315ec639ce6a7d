//! The queue benchmark driven by `bench/queue.sh`: enqueue rate, no-op drain throughput with
//! 1, 2 and 4 in-process workers, and the scale check (claim latency at 100,000 queued jobs over
//! 1,000 tenants while draining). Every run gets a fresh database, dropped afterwards.
//! Prints Markdown table rows (and the claim plan) on stdout for the script to assemble.
//!
//! Usage: cargo bench --bench queue_bench -- <admin-database-url> <mode> [args]
//!   enqueue <jobs>                     one row per enqueue style
//!   drain <jobs> <workers> <tenants> <per-tenant-cap>
//!   scale [<jobs> <tenants>]           default 100,000 jobs over 1,000 tenants; cap 4, claims of 16
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::future::join_all;
use mailscope::queue::worker::{Outcome, Worker, WorkerConfig};
use mailscope::queue::{self, NewJob};
use tokio::sync::watch;
use uuid::Uuid;

/// Same size as the service's default pool, so a worker here matches one replica.
const POOL_SIZE: usize = 16;
const KIND: &str = "noop";

/// A database created for one run and dropped at the end of it.
struct BenchDb {
    admin_url: String,
    name: String,
    url: String,
}

impl BenchDb {
    async fn create(admin_url: &str) -> anyhow::Result<BenchDb> {
        let name = format!("mailscope_qbench_{}", Uuid::new_v4().simple());
        admin(admin_url)
            .await?
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let url = url_with_db(admin_url, &name);
        mailscope::app::migrate(&url).await?;
        Ok(BenchDb {
            admin_url: admin_url.to_string(),
            name,
            url,
        })
    }

    fn pool(&self, size: usize) -> anyhow::Result<Pool> {
        let cfg: tokio_postgres::Config = self.url.parse()?;
        let mgr = Manager::from_config(
            cfg,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Ok(Pool::builder(mgr).max_size(size).build()?)
    }

    async fn drop_db(self) -> anyhow::Result<()> {
        admin(&self.admin_url)
            .await?
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await?;
        Ok(())
    }
}

async fn admin(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to PostgreSQL")?;
    tokio::spawn(conn);
    Ok(client)
}

fn url_with_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{base}/{db}{query}")
}

/// Tenant number `n` as a UUID; the SQL setup below builds the same ones.
fn tenant(n: usize) -> Uuid {
    Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0000 | n as u128)
}

const SQL_TENANT: &str = "('00000000-0000-4000-8000-' || lpad(to_hex(i % $2), 12, '0'))::uuid";

fn rate(jobs: usize, elapsed: Duration) -> f64 {
    jobs as f64 / elapsed.as_secs_f64()
}

async fn enqueue_bench(admin_url: &str, jobs: usize) -> anyhow::Result<()> {
    for (style, tasks, batch) in [
        (
            "`queue::enqueue`, one INSERT per call, 1 task",
            1usize,
            1usize,
        ),
        (
            "`queue::enqueue`, one INSERT per call, 4 concurrent tasks",
            4,
            1,
        ),
        (
            "`queue::enqueue`, transactions of 100 calls, 1 task",
            1,
            100,
        ),
        (
            "`queue::enqueue_many`, 100 jobs per call (one statement), 1 task",
            1,
            0,
        ),
    ] {
        let db = BenchDb::create(admin_url).await?;
        let pool = db.pool(tasks)?;
        let started = Instant::now();
        let per_task = jobs / tasks;
        let runs = (0..tasks).map(|t| {
            let pool = pool.clone();
            async move {
                let mut c = pool.get().await?;
                let mut i = t * per_task;
                while i < (t + 1) * per_task {
                    // batch 0: `enqueue_many` with 100 jobs per call.
                    let step = if batch == 0 { 100 } else { batch };
                    let end = (i + step).min((t + 1) * per_task);
                    if batch == 0 {
                        let jobs: Vec<NewJob> = (i..end)
                            .map(|j| NewJob::new(KIND, tenant(j % 100), job_payload(j)))
                            .collect();
                        queue::enqueue_many(&c, &jobs).await?;
                    } else if batch == 1 {
                        queue::enqueue(&c, &NewJob::new(KIND, tenant(i % 100), job_payload(i)))
                            .await?;
                    } else {
                        let tx = c.transaction().await?;
                        for j in i..end {
                            let job = NewJob::new(KIND, tenant(j % 100), job_payload(j));
                            queue::enqueue(&tx, &job).await?;
                        }
                        tx.commit().await?;
                    }
                    i = end;
                }
                Ok::<_, anyhow::Error>(())
            }
        });
        for r in join_all(runs).await {
            r?;
        }
        let elapsed = started.elapsed();
        println!(
            "| mailscope {style} | {} | {:.2} s | {:.0} |",
            per_task * tasks,
            elapsed.as_secs_f64(),
            rate(per_task * tasks, elapsed)
        );
        drop(pool);
        db.drop_db().await?;
    }
    Ok(())
}

fn job_payload(i: usize) -> serde_json::Value {
    serde_json::json!({ "n": i })
}

/// Queue `jobs` runnable no-op jobs over `tenants` tenants in one statement (setup, not measured).
async fn fill(
    c: &tokio_postgres::Client,
    jobs: usize,
    tenants: usize,
    run_at: &str,
) -> anyhow::Result<()> {
    c.execute(
        &format!(
            "INSERT INTO jobs (id, kind, tenant_id, payload, run_at)
             SELECT gen_random_uuid(), '{KIND}', {SQL_TENANT}, jsonb_build_object('n', i), {run_at}
             FROM generate_series(1, $1::int) AS i"
        ),
        &[&(jobs as i32), &(tenants as i32)],
    )
    .await?;
    c.batch_execute("ANALYZE jobs").await?;
    Ok(())
}

async fn drain_bench(
    admin_url: &str,
    jobs: usize,
    workers: usize,
    tenants: usize,
    cap: i64,
) -> anyhow::Result<()> {
    let db = BenchDb::create(admin_url).await?;
    let watcher = admin(&db.url).await?;
    fill(&watcher, jobs, tenants, "now()").await?;

    let (stop, stopped) = watch::channel(false);
    let mut handles = Vec::new();
    let started = Instant::now();
    for _ in 0..workers {
        let cfg = WorkerConfig {
            concurrency: 16,
            per_tenant_cap: cap,
            poll_interval: Duration::from_millis(100),
            ..WorkerConfig::default()
        };
        let mut w = Worker::new(
            db.pool(POOL_SIZE)?,
            cfg,
            &prometheus::Registry::new(),
            Some(db.url.clone()),
        )?;
        w.register(KIND, |_| async {
            Outcome::Succeeded(serde_json::Value::Null)
        });
        handles.push(tokio::spawn(w.run(stopped.clone())));
    }
    loop {
        let left: i64 = watcher
            .query_one(
                "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')",
                &[],
            )
            .await?
            .get(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    stop.send(true).ok();
    for h in handles {
        h.await?;
    }
    let done: i64 = watcher
        .query_one("SELECT count(*) FROM jobs WHERE state = 'succeeded'", &[])
        .await?
        .get(0);
    anyhow::ensure!(done as usize == jobs, "only {done} of {jobs} succeeded");
    println!(
        "| mailscope | {workers} worker(s) × concurrency 16 | {tenants} | {cap} | {jobs} | {:.2} s | {:.0} |",
        elapsed.as_secs_f64(),
        rate(jobs, elapsed)
    );
    drop(watcher);
    db.drop_db().await
}

/// One job in 200 (one in each of 500 tenants) is scheduled a day ahead: queued but not runnable,
/// as real checks waiting for their next observation are. The rest fell due within the last hour.
const FUTURE_EVERY: usize = 200;
const CLAIM_BATCH: i64 = 16;
/// Claims timed at each depth (the previous claim's jobs are written as succeeded before each).
const WINDOW: usize = 500;

async fn scale_bench(admin_url: &str, jobs: usize, tenants: usize) -> anyhow::Result<()> {
    let db = BenchDb::create(admin_url).await?;
    let c = admin(&db.url).await?;
    fill(
        &c,
        jobs,
        tenants,
        &format!(
            // Job k of tenant t is i = k·1000 + t; the offset by t spreads the future jobs
            // over half the tenants (one each) instead of piling them on a few.
            "CASE WHEN (i / {tenants} + i % {tenants}) % {FUTURE_EVERY} = 0
                  THEN now() + interval '1 day'
                  ELSE now() - random() * interval '1 hour' END"
        ),
    )
    .await?;

    // The plans at full depth: `queue_claim` runs its statements inside PL/pgSQL, so they are
    // logged by auto_explain (sent to this session as notices), in a transaction rolled back so
    // the claim leaves no trace.
    let kinds = vec![KIND.to_string()];
    let plan = explain_claim(&db.url, &kinds).await?;
    // The setup's writes (and an earlier phase's) are flushed before anything is timed.
    c.batch_execute("CHECKPOINT").await?;

    // One connection, as the worker's run loop uses one per batch call; its first call (which
    // prepares the statement and compiles the function in that session) is not timed.
    let pool = db.pool(1)?;
    let w = Arc::new(Worker::new(
        pool,
        WorkerConfig {
            per_tenant_cap: 4,
            ..WorkerConfig::default()
        },
        &prometheus::Registry::new(),
        None,
    )?);
    let succeeded = |jobs: &[queue::JobRecord]| -> Vec<(Uuid, i32, Outcome)> {
        jobs.iter()
            .map(|j| (j.id, j.attempt, Outcome::Succeeded(serde_json::Value::Null)))
            .collect()
    };
    // The machine's floor for the same kind of call: a one-row UPDATE and its commit, timed the
    // same way on a connection of the same kind. A claim's tail cannot beat this one's.
    c.batch_execute("CREATE TABLE bench_floor (id int PRIMARY KEY, n int); INSERT INTO bench_floor VALUES (1, 0)")
        .await?;
    let floor_pool = db.pool(1)?;
    let floor_client = floor_pool.get().await?;
    let bump = floor_client
        .prepare("UPDATE bench_floor SET n = n + 1 WHERE id = 1")
        .await?;
    floor_client.execute(&bump, &[]).await?;
    let mut floor = Vec::with_capacity(WINDOW);
    for _ in 0..WINDOW {
        let t = Instant::now();
        floor_client.execute(&bump, &[]).await?;
        floor.push(t.elapsed());
    }
    drop(floor_client);
    floor.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "FLOOR {:.2} {:.2} {:.2} {:.2}",
        ms(floor[floor.len() / 2]),
        ms(floor[floor.len() * 9 / 10]),
        ms(floor[floor.len() * 99 / 100]),
        ms(floor[floor.len() - 1]),
    );
    let mut previous = w.claim(&kinds, CLAIM_BATCH).await?;
    // Draining 100,000 jobs 16 at a time takes minutes on this machine, so between the sampled
    // depths the queue is fast-forwarded: the oldest runnable jobs are marked succeeded in bulk,
    // as the worker would (same rows, same order), then VACUUMed, as autovacuum would have done
    // during a real drain of that many jobs (its default threshold is a fifth of the table).
    println!("CLAIMS");
    let started = Instant::now();
    let mut depth = jobs;
    for target in [jobs, jobs / 2, jobs / 10, jobs / 100] {
        if depth > target {
            c.execute(
                "UPDATE jobs SET state = 'succeeded', attempt = attempt + 1, result = 'null',
                     started_at = now(), finished_at = now(), updated_at = now()
                 WHERE id IN (SELECT id FROM jobs WHERE state = 'queued' AND run_at <= now()
                              ORDER BY run_at LIMIT $1)",
                &[&((depth - target) as i64)],
            )
            .await?;
            // The bulk write's dirty pages are flushed now rather than during the timed claims.
            c.batch_execute("VACUUM jobs").await?;
            c.batch_execute("CHECKPOINT").await?;
            depth = target;
        }
        let mut window = Vec::new();
        let mut claimed = 0;
        for _ in 0..WINDOW {
            // The last batch's jobs are written as succeeded first (not timed; the worker writes
            // them in its next claim's call), then the claim of 16 is timed on its own.
            let (_, written) = w
                .settle_and_claim_batch(&kinds, 0, succeeded(&previous))
                .await?;
            anyhow::ensure!(
                written.len() == previous.len(),
                "a claimed job's outcome was not written"
            );
            let t = Instant::now();
            let jobs = w.claim(&kinds, CLAIM_BATCH).await?;
            window.push(t.elapsed());
            claimed += jobs.len();
            previous = jobs;
            if previous.is_empty() {
                break;
            }
        }
        let tenants: i64 = c
            .query_one(
                "SELECT count(DISTINCT tenant_id) FROM jobs WHERE state = 'queued'",
                &[],
            )
            .await?
            .get(0);
        let dead: i64 = c
            .query_one(
                "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'jobs'",
                &[],
            )
            .await?
            .get(0);
        window.sort();
        println!(
            "| {target} | {tenants} | {} | {claimed} | {:.2} | {:.2} | {:.2} | {:.2} | {dead} |",
            window.len(),
            ms(window[window.len() / 2]),
            ms(window[window.len() * 9 / 10]),
            ms(window[window.len() * 99 / 100]),
            ms(window[window.len() - 1]),
        );
        depth -= claimed;
    }
    println!("ELAPSED {:.1}", started.elapsed().as_secs_f64());
    println!("PLAN");
    println!("{plan}");
    drop(c);
    db.drop_db().await
}

/// The plans of the statements one claim of [`CLAIM_BATCH`] runs inside `queue_claim`, as
/// auto_explain prints them (ANALYZE, BUFFERS).
async fn explain_claim(url: &str, kinds: &[String]) -> anyhow::Result<String> {
    use futures_util::StreamExt;
    let (client, mut conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notice(n) = m {
                let _ = tx.send(n.message().to_string());
            }
        }
    });
    client
        .batch_execute(
            "LOAD 'auto_explain';
             SET auto_explain.log_min_duration = 0;
             SET auto_explain.log_analyze = on;
             SET auto_explain.log_buffers = on;
             SET auto_explain.log_timing = on;
             SET auto_explain.log_nested_statements = on;
             SET auto_explain.log_level = notice;
             BEGIN",
        )
        .await?;
    let empty: Vec<Uuid> = Vec::new();
    let rows = client
        .query(
            &Worker::claim_sql(),
            &[
                &kinds,
                &4i64,
                &CLAIM_BATCH,
                &"explain",
                &60f64,
                &empty,
                &Vec::<i32>::new(),
                &Vec::<bool>::new(),
                &Vec::<serde_json::Value>::new(),
                &Vec::<Option<chrono::DateTime<chrono::Utc>>>::new(),
                &Vec::<Option<serde_json::Value>>::new(),
            ],
        )
        .await?;
    client.batch_execute("ROLLBACK").await?;
    drop(client);
    let mut out = format!("({} jobs claimed)\n", rows.len());
    while let Some(m) = rx.recv().await {
        out.push_str(&m);
        out.push_str("\n\n");
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`; keep the positional arguments.
    let pos: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    let num = |i: usize| -> anyhow::Result<usize> {
        pos.get(i)
            .context("missing argument")?
            .parse()
            .context("not a number")
    };
    let rt = tokio::runtime::Runtime::new()?;
    match pos.get(1).copied() {
        Some("enqueue") => rt.block_on(enqueue_bench(pos[0], num(2)?)),
        Some("drain") => rt.block_on(drain_bench(
            pos[0],
            num(2)?,
            num(3)?,
            num(4)?,
            num(5)? as i64,
        )),
        Some("scale") => rt.block_on(scale_bench(
            pos[0],
            num(2).unwrap_or(100_000),
            num(3).unwrap_or(1_000),
        )),
        _ => anyhow::bail!(
            "usage: queue_bench <admin-url> enqueue <jobs> | drain <jobs> <workers> <tenants> <cap> | scale [<jobs> <tenants>]"
        ),
    }
}
