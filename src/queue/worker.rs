//! The worker: claims jobs, runs their handlers with a heartbeat-renewed lease, records outcomes
//! under the attempt fence, reaps lapsed leases, and releases what it holds when it stops.
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};
use rand::Rng;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use uuid::Uuid;

use super::{COLUMNS, JobRecord, from_row};
use crate::store::StoreError;

/// What a handler decided.
#[derive(Debug, Clone)]
pub enum Outcome {
    Succeeded(serde_json::Value),
    /// Not done yet and not a failure (a poll): run again at `at`, optionally with a new payload.
    Reschedule {
        at: DateTime<Utc>,
        payload: Option<serde_json::Value>,
    },
    /// Failed this time; retried with backoff until `max_failures`.
    Retry(String),
    /// Failed for good.
    Fail(String),
    /// Stopped because a cancel was requested.
    Cancelled,
}

/// Set when the job's cancellation was requested (seen by the heartbeat).
#[derive(Clone)]
pub struct CancelSignal(watch::Receiver<bool>);

impl CancelSignal {
    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when cancellation is requested.
    pub async fn cancelled(&mut self) {
        while !*self.0.borrow() {
            if self.0.changed().await.is_err() {
                // Sender gone: the job is over; never resolve.
                std::future::pending::<()>().await;
            }
        }
    }
}

pub struct JobContext {
    pub job: JobRecord,
    pub pool: Pool,
    pub cancel: CancelSignal,
}

pub type HandlerFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;
pub type Handler = Arc<dyn Fn(JobContext) -> HandlerFuture + Send + Sync>;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Identifies this worker in `lease_owner` (host + random suffix by default).
    pub owner: String,
    pub concurrency: usize,
    /// At most this many running jobs per tenant across all workers (soft: concurrent claimers
    /// may overshoot briefly, never by more than their own batch).
    pub per_tenant_cap: i64,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub reap_interval: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// On shutdown, how long running jobs may finish before they are released to the queue.
    pub shutdown_grace: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            owner: format!("worker-{}", &Uuid::new_v4().simple().to_string()[..8]),
            concurrency: 8,
            per_tenant_cap: 4,
            lease: Duration::from_secs(60),
            poll_interval: Duration::from_secs(5),
            reap_interval: Duration::from_secs(15),
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

#[derive(Clone)]
struct QueueMetrics {
    claim_latency: Histogram,
    job_duration: HistogramVec,
    finished: IntCounterVec,
    retries: IntCounterVec,
    depth: IntGaugeVec,
}

impl QueueMetrics {
    fn new(registry: &Registry) -> anyhow::Result<Self> {
        let claim_latency = Histogram::with_opts(
            HistogramOpts::new("queue_claim_seconds", "Time to claim a batch of jobs").buckets(
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                ],
            ),
        )?;
        let job_duration = HistogramVec::new(
            HistogramOpts::new("queue_job_seconds", "Job run time by kind and outcome"),
            &["kind", "outcome"],
        )?;
        let finished = IntCounterVec::new(
            Opts::new("queue_job_runs_total", "Job runs by kind and outcome"),
            &["kind", "outcome"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new("queue_retries_total", "Failed runs that will retry"),
            &["kind"],
        )?;
        let depth = IntGaugeVec::new(
            Opts::new("queue_jobs", "Jobs by kind and state"),
            &["kind", "state"],
        )?;
        registry.register(Box::new(claim_latency.clone()))?;
        registry.register(Box::new(job_duration.clone()))?;
        registry.register(Box::new(finished.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(depth.clone()))?;
        Ok(QueueMetrics {
            claim_latency,
            job_duration,
            finished,
            retries,
            depth,
        })
    }
}

pub struct Worker {
    pool: Pool,
    cfg: WorkerConfig,
    handlers: HashMap<String, Handler>,
    metrics: QueueMetrics,
    listen_url: Option<String>,
    tls_ca_file: Option<std::path::PathBuf>,
    /// The earliest time a job this worker rescheduled is due: the loop wakes then instead of
    /// at the next poll, also without a LISTEN connection (with one, the NOTIFY does it too).
    next_due: Mutex<Option<tokio::time::Instant>>,
}

/// Jobs this worker holds: id → attempt.
type Held = Arc<Mutex<HashMap<Uuid, i32>>>;

/// A run that ended; `outcome` is what is left to write (succeeded or rescheduled), `None` when
/// it was written already or there is nothing to write (the lease was lost).
struct Ended {
    id: Uuid,
    attempt: i32,
    outcome: Option<Outcome>,
}

/// The settle half of `queue_claim`'s parameters (migration 0016), as columns.
#[derive(Default)]
struct Settle {
    ids: Vec<Uuid>,
    attempts: Vec<i32>,
    done: Vec<bool>,
    results: Vec<serde_json::Value>,
    run_ats: Vec<Option<DateTime<Utc>>>,
    payloads: Vec<Option<serde_json::Value>>,
}

impl Settle {
    fn of(ended: &[Ended]) -> Settle {
        let mut s = Settle::default();
        for e in ended {
            let (done, result, run_at, payload) = match &e.outcome {
                Some(Outcome::Succeeded(r)) => (true, r.clone(), None, None),
                Some(Outcome::Reschedule { at, payload }) => {
                    (false, serde_json::Value::Null, Some(*at), payload.clone())
                }
                _ => continue,
            };
            s.ids.push(e.id);
            s.attempts.push(e.attempt);
            s.done.push(done);
            s.results.push(result);
            s.run_ats.push(run_at);
            s.payloads.push(payload);
        }
        s
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 6] {
        [
            &self.ids,
            &self.attempts,
            &self.done,
            &self.results,
            &self.run_ats,
            &self.payloads,
        ]
    }
}

impl Worker {
    pub fn new(
        pool: Pool,
        cfg: WorkerConfig,
        registry: &Registry,
        listen_url: Option<String>,
    ) -> anyhow::Result<Self> {
        Ok(Worker {
            pool,
            cfg,
            handlers: HashMap::new(),
            metrics: QueueMetrics::new(registry)?,
            listen_url,
            tls_ca_file: None,
            next_due: Mutex::new(None),
        })
    }

    /// Extra CA for the LISTEN connection (same rules as the pool).
    pub fn with_tls_ca_file(mut self, ca: Option<std::path::PathBuf>) -> Self {
        self.tls_ca_file = ca;
        self
    }

    pub fn register<F, Fut>(&mut self, kind: &str, f: F)
    where
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        self.handlers
            .insert(kind.to_string(), Arc::new(move |ctx| Box::pin(f(ctx))));
    }

    /// Run until `shutdown` becomes true; then let running jobs finish within the grace period
    /// and release the rest back to the queue.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let wake = Arc::new(Notify::new());
        let mut background = JoinSet::new();
        if let Some(url) = self.listen_url.clone() {
            background.spawn(super::listener::run(
                url,
                self.tls_ca_file.clone(),
                wake.clone(),
                shutdown.clone(),
            ));
        }
        background.spawn(reaper(
            self.pool.clone(),
            self.cfg.reap_interval,
            self.metrics.clone(),
            shutdown.clone(),
        ));

        let kinds: Vec<String> = self.handlers.keys().cloned().collect();
        let slots = Arc::new(Semaphore::new(self.cfg.concurrency));
        let held: Held = Arc::default();
        let mut running = JoinSet::new();
        // Batch calls under way, each with the slots it reserved and the outcomes it writes.
        let mut claims: JoinSet<ClaimDone> = JoinSet::new();
        // Runs that ended: their outcomes are written by the next claim's call.
        let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<Ended>();
        let mut ended: Vec<Ended> = Vec::new();
        // The last claim filled every slot it asked for: more work is probably waiting.
        let mut busy = false;
        // While busy, when the first freed slot stops waiting for others.
        let mut batch_due: Option<tokio::time::Instant> = None;
        // Not busy: whether to look for work (at start, on a wake-up, at the poll).
        let mut look = true;
        // After a failed call (the database unreachable, say), the next waits this long.
        let mut retry_at: Option<tokio::time::Instant> = None;
        let half = self.cfg.concurrency.div_ceil(2).max(1);
        let this = Arc::new(self);
        tracing::info!(owner = %this.cfg.owner, ?kinds, concurrency = this.cfg.concurrency, "worker started");
        loop {
            if *shutdown.borrow() {
                break;
            }
            while let Ok(e) = ended_rx.try_recv() {
                ended.push(e);
            }
            while running.try_join_next().is_some() {}
            let free = if kinds.is_empty() {
                0
            } else {
                slots.available_permits()
            };
            let now = tokio::time::Instant::now();
            // Claim once a batch of slots is free rather than each time one frees (a claim costs
            // about the same for 1 job as for 16). While busy, half the slots make a batch, and a
            // second call may start while one is under way, so that the database works on one
            // while this process runs the jobs of the other.
            let launch = if retry_at.is_some_and(|r| r > now) {
                false
            } else if busy {
                claims.len() < MAX_CLAIMS_IN_FLIGHT
                    && (free >= half || (claims.is_empty() && batch_due.is_some_and(|d| d <= now)))
            } else {
                claims.is_empty() && ((look && free > 0) || !ended.is_empty())
            };
            if launch {
                let want = if busy { free.min(half) } else { free };
                let reserved = match want {
                    0 => None,
                    n => slots.clone().try_acquire_many_owned(n as u32).ok(),
                };
                let asked = reserved.as_ref().map_or(0, |p| p.num_permits());
                let (w, kinds, held, settle) = (
                    this.clone(),
                    kinds.clone(),
                    held.clone(),
                    std::mem::take(&mut ended),
                );
                claims.spawn(async move {
                    let result = w
                        .settle_and_claim(&kinds, asked as i64, &settle, &held)
                        .await
                        .map(|(jobs, _)| jobs);
                    ClaimDone {
                        result,
                        asked,
                        reserved,
                        settle,
                    }
                });
                batch_due = None;
                look = false;
                continue;
            }
            tokio::select! {
                Some(done) = claims.join_next() => {
                    let Ok(done) = done else { continue };
                    match done.result {
                        Ok(jobs) => {
                            busy = done.asked > 0 && jobs.len() == done.asked;
                            let mut reserved = done.reserved;
                            for job in jobs {
                                let Some(permit) = reserved.as_mut().and_then(|r| r.split(1)) else {
                                    break;
                                };
                                this.spawn_run(&mut running, job, permit, &held, &ended_tx);
                            }
                            // Slots asked for but not filled go back now (`reserved` drops).
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "claiming jobs failed");
                            busy = false;
                            retry_at = Some(
                                tokio::time::Instant::now()
                                    + this.cfg.poll_interval.min(Duration::from_secs(1)),
                            );
                            // Written with the next call.
                            ended.extend(done.settle);
                        }
                    }
                }
                Some(e) = ended_rx.recv() => {
                    ended.push(e);
                    if busy && batch_due.is_none() {
                        batch_due = Some(tokio::time::Instant::now() + BATCH_WAIT);
                    }
                }
                _ = tokio::time::sleep_until(batch_due.unwrap_or(now)),
                    if batch_due.is_some() && claims.is_empty() => {}
                _ = tokio::time::sleep_until(retry_at.unwrap_or(now)), if retry_at.is_some() => {
                    retry_at = None;
                    look = true;
                }
                _ = wake.notified(), if !busy => look = true,
                _ = tokio::time::sleep_until(this.wake_at()), if !busy => look = true,
                _ = shutdown.changed() => {}
            }
        }

        // Calls under way finish; jobs they claimed go back to the queue unrun (below).
        while let Some(done) = claims.join_next().await {
            let Ok(done) = done else { continue };
            match done.result {
                Ok(jobs) => {
                    if let Ok(mut h) = held.lock() {
                        h.extend(jobs.iter().map(|j| (j.id, j.attempt)));
                    }
                }
                Err(_) => ended.extend(done.settle),
            }
        }
        tracing::info!(running = running.len(), "worker stopping");
        let deadline = tokio::time::sleep(this.cfg.shutdown_grace);
        tokio::pin!(deadline);
        while !running.is_empty() {
            tokio::select! {
                _ = running.join_next() => {}
                _ = &mut deadline => break,
            }
        }
        running.abort_all();
        // Write what finished before releasing the rest.
        while let Ok(e) = ended_rx.try_recv() {
            ended.push(e);
        }
        if !ended.is_empty()
            && let Err(e) = this.settle_and_claim(&kinds, 0, &ended, &held).await
        {
            tracing::warn!(error = %e, "could not record the last outcomes; their leases will lapse");
        }
        let leftovers: Vec<(Uuid, i32)> = held
            .lock()
            .map(|h| h.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default();
        for (id, attempt) in leftovers {
            match this.release(id, attempt).await {
                Ok(true) => tracing::info!(job = %id, "released job back to the queue"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "could not release job; its lease will lapse")
                }
            }
        }
        background.abort_all();
    }

    /// Run one claimed job in its slot; its outcome reaches the loop through `ended_tx`.
    fn spawn_run(
        self: &Arc<Self>,
        running: &mut JoinSet<()>,
        job: JobRecord,
        permit: tokio::sync::OwnedSemaphorePermit,
        held: &Held,
        ended_tx: &mpsc::UnboundedSender<Ended>,
    ) {
        held.lock().map(|mut h| h.insert(job.id, job.attempt)).ok();
        let (w, held, ended_tx) = (self.clone(), held.clone(), ended_tx.clone());
        running.spawn(async move {
            let (id, attempt) = (job.id, job.attempt);
            let outcome = w.execute(job).await;
            // Rare outcomes are written at once; the common ones wait for the next claim (one
            // statement for all of them).
            let batched = match outcome {
                Some(o @ (Outcome::Succeeded(_) | Outcome::Reschedule { .. })) => Some(o),
                Some(o) => {
                    w.record_logged(id, attempt, &o).await;
                    None
                }
                None => None,
            };
            if batched.is_none() {
                held.lock()
                    .map(|mut h| h.remove(&id).filter(|a| *a == attempt))
                    .ok();
            }
            // Free the slot before saying so: the loop claims for it.
            drop(permit);
            let _ = ended_tx.send(Ended {
                id,
                attempt,
                outcome: batched,
            });
        });
    }

    /// The statement [`Worker::claim`] runs: `queue_claim` (migration 0016), which settles the
    /// runs that ended and claims the next batch. Parameters: `$1` kinds (`text[]`), `$2`
    /// per-tenant cap, `$3` batch limit (both `int8`), `$4` lease owner (`text`), `$5` lease
    /// seconds (`float8`), `$6`–`$11` the runs to settle (see [`Settle`]).
    pub fn claim_sql() -> String {
        format!("SELECT {COLUMNS} FROM queue_claim($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)")
    }

    /// Claim up to `limit` runnable jobs of the given kinds, fairly across tenants.
    pub async fn claim(&self, kinds: &[String], limit: i64) -> Result<Vec<JobRecord>, StoreError> {
        Ok(self
            .settle_and_claim(kinds, limit, &[], &Held::default())
            .await?
            .0)
    }

    /// What the run loop does once per batch: write the outcomes of runs that ended
    /// (`(id, attempt, outcome)`; only succeeded and rescheduled ones) and claim up to `limit`
    /// jobs, in one call. Returns the claimed jobs and the ids whose outcome was written.
    pub async fn settle_and_claim_batch(
        &self,
        kinds: &[String],
        limit: i64,
        ended: Vec<(Uuid, i32, Outcome)>,
    ) -> Result<(Vec<JobRecord>, Vec<Uuid>), StoreError> {
        let ended: Vec<Ended> = ended
            .into_iter()
            .map(|(id, attempt, outcome)| Ended {
                id,
                attempt,
                outcome: Some(outcome),
            })
            .collect();
        let (claimed, written) = self
            .settle_and_claim(kinds, limit, &ended, &Held::default())
            .await?;
        let written = written.into_iter().collect();
        Ok((claimed, written))
    }

    /// Write the outcomes of runs that ended (fenced by attempt) and claim up to `limit` jobs in
    /// one `queue_claim` call, prepared once per connection: one round trip and one commit for a
    /// batch instead of one per job. Returns the claimed jobs and the ids whose outcome was
    /// written.
    async fn settle_and_claim(
        &self,
        kinds: &[String],
        limit: i64,
        ended: &[Ended],
        held: &Held,
    ) -> Result<(Vec<JobRecord>, HashSet<Uuid>), StoreError> {
        let started = Instant::now();
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(&Self::claim_sql()).await?;
        let batch = Settle::of(ended);
        let [ids, attempts, done, results, run_ats, payloads] = batch.params();
        // One statement in its own transaction: one round trip and one commit for the batch.
        let rows = client
            .query(
                &statement,
                &[
                    &kinds,
                    &self.cfg.per_tenant_cap,
                    &limit,
                    &self.cfg.owner,
                    &self.cfg.lease.as_secs_f64(),
                    ids,
                    attempts,
                    done,
                    results,
                    run_ats,
                    payloads,
                ],
            )
            .await?;
        if limit > 0 {
            self.metrics
                .claim_latency
                .observe(started.elapsed().as_secs_f64());
        }
        // Settled runs come back first, as written (no longer running); then the claimed jobs.
        let mut written = HashSet::new();
        let mut claimed = Vec::new();
        for row in &rows {
            let job = from_row(row);
            if job.state == super::JobState::Running {
                claimed.push(job);
            } else {
                written.insert(job.id);
            }
        }
        for e in ended {
            let Some(outcome) = &e.outcome else { continue };
            held.lock()
                .map(|mut h| h.remove(&e.id).filter(|a| *a == e.attempt))
                .ok();
            if !written.contains(&e.id) {
                tracing::warn!(job = %e.id, attempt = e.attempt, "lease lost before the outcome was recorded; discarded");
            } else if let Outcome::Reschedule { at, .. } = outcome {
                self.due_at(*at);
            }
        }
        Ok((claimed, written))
    }

    /// When the idle loop should look again: the next poll, or earlier when a job this worker
    /// rescheduled is due before it. Called after each claim, so a due time already past was
    /// served by that claim and is forgotten.
    fn wake_at(&self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let poll = now + self.cfg.poll_interval;
        let Ok(mut due) = self.next_due.lock() else {
            return poll;
        };
        match *due {
            Some(d) if d <= now => {
                *due = None;
                poll
            }
            Some(d) => d.min(poll),
            None => poll,
        }
    }

    /// Remember that a job is due at `at` (see `wake_at`).
    fn due_at(&self, at: DateTime<Utc>) {
        // A little late rather than early: the claim compares `run_at` with the database's clock.
        let wait = (at - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(20);
        let when = tokio::time::Instant::now() + wait;
        if let Ok(mut due) = self.next_due.lock() {
            *due = Some(due.map_or(when, |d| d.min(when)));
        }
    }

    /// Run the handler under a heartbeat; `None` when the lease was lost (nothing to write).
    async fn execute(&self, job: JobRecord) -> Option<Outcome> {
        let handler = self.handlers.get(&job.kind).cloned()?;
        let (id, attempt, kind) = (job.id, job.attempt, job.kind.clone());
        let span =
            tracing::info_span!("job", job = %id, kind = %kind, attempt, tenant = %job.tenant_id);
        let started = Instant::now();
        let (cancel_tx, cancel_rx) = watch::channel(job.cancel_requested);
        let (lost_tx, mut lost_rx) = watch::channel(false);
        let heartbeat = tokio::spawn(heartbeat(
            self.pool.clone(),
            id,
            attempt,
            self.cfg.lease,
            cancel_tx,
            lost_tx,
        ));
        let ctx = JobContext {
            job,
            pool: self.pool.clone(),
            cancel: CancelSignal(cancel_rx),
        };
        let run = tokio::spawn(tracing::Instrument::instrument(handler(ctx), span.clone()));
        let abort = run.abort_handle();
        let outcome = tokio::select! {
            r = run => match r {
                Ok(o) => Some(o),
                Err(e) if e.is_panic() => Some(Outcome::Retry("the job handler panicked".into())),
                Err(_) => None,
            },
            _ = async { while !*lost_rx.borrow() { if lost_rx.changed().await.is_err() { std::future::pending::<()>().await } } } => {
                abort.abort();
                span.in_scope(|| tracing::warn!("lease lost; stopped the handler"));
                None
            }
        };
        heartbeat.abort();
        let outcome = outcome?;
        let label = match &outcome {
            Outcome::Succeeded(_) => "succeeded",
            Outcome::Reschedule { .. } => "rescheduled",
            Outcome::Retry(_) => "retry",
            Outcome::Fail(_) => "failed",
            Outcome::Cancelled => "cancelled",
        };
        self.metrics
            .job_duration
            .with_label_values(&[&kind, label])
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .finished
            .with_label_values(&[&kind, label])
            .inc();
        if matches!(outcome, Outcome::Retry(_)) {
            self.metrics.retries.with_label_values(&[&kind]).inc();
        }
        Some(outcome)
    }

    /// [`Worker::record`] for one run, logging what went wrong.
    async fn record_logged(&self, id: Uuid, attempt: i32, outcome: &Outcome) {
        match self.record(id, attempt, outcome).await {
            Ok(true) => {
                if let Outcome::Reschedule { at, .. } = outcome {
                    self.due_at(*at);
                }
            }
            Ok(false) => {
                tracing::warn!(job = %id, attempt, "lease lost before the outcome was recorded; discarded")
            }
            Err(e) => {
                tracing::warn!(job = %id, attempt, error = %e, "could not record the outcome; the lease will lapse")
            }
        }
    }

    /// Write the outcome, fenced by attempt. Returns false if this worker no longer owns the job.
    pub async fn record(
        &self,
        id: Uuid,
        attempt: i32,
        outcome: &Outcome,
    ) -> Result<bool, StoreError> {
        let c = self.pool.get().await?;
        const FENCE: &str = "WHERE id = $1 AND attempt = $2 AND state = 'running'";
        const CLEAR: &str = "lease_owner = NULL, lease_expires_at = NULL, updated_at = now()";
        let n = match outcome {
            Outcome::Succeeded(result) => {
                c.execute(
                    &format!("UPDATE jobs SET state = 'succeeded', result = $3, failures = 0, finished_at = now(), {CLEAR} {FENCE}"),
                    &[&id, &attempt, result],
                )
                .await?
            }
            Outcome::Reschedule { at, payload } => {
                c.execute(
                    &format!("UPDATE jobs SET state = 'queued', run_at = $3, payload = coalesce($4, payload), failures = 0, {CLEAR} {FENCE}"),
                    &[&id, &attempt, at, payload],
                )
                .await?
            }
            Outcome::Retry(error) => {
                let row = c
                    .query_opt(
                        &format!("SELECT failures, max_failures FROM jobs {FENCE}"),
                        &[&id, &attempt],
                    )
                    .await?;
                let Some(row) = row else { return Ok(false) };
                let failures: i32 = row.get::<_, i32>(0) + 1;
                let max: i32 = row.get(1);
                if failures >= max {
                    c.execute(
                        &format!("UPDATE jobs SET state = 'failed', failures = $3, last_error = $4, finished_at = now(), {CLEAR} {FENCE}"),
                        &[&id, &attempt, &failures, error],
                    )
                    .await?
                } else {
                    let delay = backoff(failures, self.cfg.backoff_base, self.cfg.backoff_max);
                    let at = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                    c.execute(
                        &format!("UPDATE jobs SET state = 'queued', failures = $3, last_error = $4, run_at = $5, {CLEAR} {FENCE}"),
                        &[&id, &attempt, &failures, error, &at],
                    )
                    .await?
                }
            }
            Outcome::Fail(error) => {
                c.execute(
                    &format!("UPDATE jobs SET state = 'failed', last_error = $3, finished_at = now(), {CLEAR} {FENCE}"),
                    &[&id, &attempt, error],
                )
                .await?
            }
            Outcome::Cancelled => {
                c.execute(
                    &format!("UPDATE jobs SET state = 'cancelled', finished_at = now(), {CLEAR} {FENCE}"),
                    &[&id, &attempt],
                )
                .await?
            }
        };
        Ok(n == 1)
    }

    /// Put a held job back in the queue at once (graceful shutdown). Not a failure.
    async fn release(&self, id: Uuid, attempt: i32) -> Result<bool, StoreError> {
        let c = self.pool.get().await?;
        Ok(c.execute(
            "UPDATE jobs SET state = 'queued', run_at = now(), lease_owner = NULL,
                 lease_expires_at = NULL, updated_at = now()
             WHERE id = $1 AND attempt = $2 AND state = 'running'",
            &[&id, &attempt],
        )
        .await?
            == 1)
    }
}

/// How long a freed slot may wait for others before the worker claims for it.
const BATCH_WAIT: Duration = Duration::from_millis(5);

/// Batch calls a busy worker keeps under way at once.
const MAX_CLAIMS_IN_FLIGHT: usize = 2;

/// A batch call that returned: the jobs it claimed, the slots it reserved for them, and the
/// outcomes it was to write (kept for the next call when it failed).
struct ClaimDone {
    result: Result<Vec<JobRecord>, StoreError>,
    asked: usize,
    reserved: Option<tokio::sync::OwnedSemaphorePermit>,
    settle: Vec<Ended>,
}

/// Exponential backoff with jitter: base·2^(n−1), capped, then a random 50–100 % of it so that
/// jobs failing together do not retry together.
pub fn backoff(failures: i32, base: Duration, max: Duration) -> Duration {
    let exp = base
        .saturating_mul(1u32 << (failures.clamp(1, 20) - 1) as u32)
        .min(max);
    let factor = rand::thread_rng().gen_range(0.5..=1.0);
    exp.mul_f64(factor)
}

/// Renew the lease every third of its length; report cancellation requests and a lost lease.
async fn heartbeat(
    pool: Pool,
    id: Uuid,
    attempt: i32,
    lease: Duration,
    cancel: watch::Sender<bool>,
    lost: watch::Sender<bool>,
) {
    let every = lease / 3;
    loop {
        tokio::time::sleep(every).await;
        let result = async {
            let c = pool.get().await?;
            let row = c
                .query_opt(
                    "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3)
                     WHERE id = $1 AND attempt = $2 AND state = 'running'
                     RETURNING cancel_requested",
                    &[&id, &attempt, &lease.as_secs_f64()],
                )
                .await?;
            Ok::<_, StoreError>(row.map(|r| r.get::<_, bool>(0)))
        }
        .await;
        match result {
            Ok(Some(requested)) => {
                if requested {
                    let _ = cancel.send(true);
                }
            }
            Ok(None) => {
                let _ = lost.send(true);
                return;
            }
            // A blip: keep trying; the lease is long enough to survive a few.
            Err(e) => tracing::warn!(job = %id, error = %e, "heartbeat failed"),
        }
    }
}

/// Return jobs whose lease lapsed (their worker died) to the queue, counting it as a failure so a
/// job that kills its worker every time ends up failed instead of looping; refresh depth gauges.
async fn reaper(
    pool: Pool,
    every: Duration,
    metrics: QueueMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        match reap(&pool).await {
            Ok(n) if n > 0 => {
                tracing::warn!(jobs = n, "requeued jobs whose worker stopped heartbeating")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reaping expired leases failed"),
        }
        if let Ok(c) = pool.get().await
            && let Ok(rows) = super::depth(&c).await
        {
            metrics.depth.reset();
            for (kind, state, n) in rows {
                metrics.depth.with_label_values(&[&kind, &state]).set(n);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

pub async fn reap(pool: &Pool) -> Result<u64, StoreError> {
    let mut c = pool.get().await?;
    let tx = c.transaction().await?;
    // The jobs' tenants are told in one call below, in tenant order, rather than by the
    // requeue trigger row by row in no set order: two writers cannot deadlock on them.
    tx.batch_execute("SELECT set_config('mailscope.queue_settling', 'on', true)")
        .await?;
    let rows = tx
        .query(
            "UPDATE jobs SET
                 state = CASE WHEN failures + 1 >= max_failures THEN 'failed' ELSE 'queued' END,
                 finished_at = CASE WHEN failures + 1 >= max_failures THEN now() END,
                 failures = failures + 1,
                 last_error = 'the worker running this job stopped (lease expired)',
                 lease_owner = NULL, lease_expires_at = NULL, run_at = now(), updated_at = now()
             WHERE state = 'running' AND lease_expires_at < now()
             RETURNING tenant_id, run_at, state = 'queued'",
            &[],
        )
        .await?;
    let (tenants, run_ats): (Vec<Uuid>, Vec<DateTime<Utc>>) = rows
        .iter()
        .filter(|r| r.get::<_, bool>(2))
        .map(|r| (r.get::<_, Uuid>(0), r.get::<_, DateTime<Utc>>(1)))
        .unzip();
    if !tenants.is_empty() {
        tx.execute(
            "SELECT queue_tenants_entered($1, $2)",
            &[&tenants, &run_ats],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(rows.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let base = Duration::from_secs(10);
        let max = Duration::from_secs(600);
        for _ in 0..100 {
            let b1 = backoff(1, base, max);
            assert!(b1 >= Duration::from_secs(5) && b1 <= Duration::from_secs(10));
            let b3 = backoff(3, base, max);
            assert!(b3 >= Duration::from_secs(20) && b3 <= Duration::from_secs(40));
            let b30 = backoff(30, base, max);
            assert!(b30 >= Duration::from_secs(300) && b30 <= max);
        }
    }
}
