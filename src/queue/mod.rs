//! A PostgreSQL job queue (no other broker).
//!
//! - **Claim** (O(batch), flat in the number of tenants and the queue's depth): one call of the
//!   `queue_claim` function (migration 0016). `queue_tenants` holds, per tenant, a lower bound
//!   on the `run_at` of its earliest queued job: jobs entering the queue lower it (an INSERT
//!   trigger, and an UPDATE trigger whose `WHEN` clause matches only rows entering the queue, so
//!   claims and completions run no trigger code). A claim takes up to `batch` tenants with the
//!   earliest bound from a partial index on `next_run_at`, `FOR UPDATE SKIP LOCKED`, skipping
//!   tenants at their cap (it counts their running jobs in the `jobs_running` index); then, per
//!   tenant, its oldest runnable jobs up to its free slots (`ORDER BY run_at LIMIT n` on
//!   `(tenant_id, run_at) WHERE state = 'queued'`); keeps the oldest `batch` of those, marks
//!   them running, and sets the visited tenants' bounds to their earliest queued job. A stale
//!   bound (its job was claimed, cancelled or purged) costs one visit that finds nothing and
//!   fixes it. Tenants at their cap number at most (running jobs) / cap, so the scan past them
//!   is bounded by the workers' concurrency. Locking the tenant row makes the per-tenant cap
//!   hold across workers and replicas (two claimers never serve one tenant at once), and
//!   oldest-first over tenants keeps one tenant's thousand jobs from starving the others. JIT is
//!   off for the function: its plans are a few index probes, and JIT compilation once cost
//!   650 ms of a claim. An enqueue holds its tenant's summary row locked until its transaction
//!   commits, so a claim skips that tenant meanwhile (its new job is invisible anyway): enqueue
//!   late in long transactions. Known limit: tenants are ordered by their earliest job of any
//!   kind, so a worker that handles only some kinds may be offered tenants whose head job it
//!   cannot run.
//! - **Batches**: a worker whose last claim filled every free slot waits until half its slots are
//!   free (or 5 ms after the first frees) before claiming again, instead of a claim per job. The
//!   outcomes of the runs that ended meanwhile (succeeded or rescheduled, the common ones) are
//!   written by the same `queue_claim` call, fenced by attempt: one statement, one round trip and
//!   one commit per batch, not per job.
//! - **Leases and fencing**: a running job holds a lease renewed by a heartbeat. The reaper returns
//!   jobs whose lease lapsed (a crashed worker) to the queue. Each claim increments `attempt`, and
//!   every write a worker makes names the attempt it claimed, so a late worker's write matches no
//!   row and is discarded.
//! - **Wake-ups**: every statement that queues jobs NOTIFYs once, with the seconds until the
//!   earliest of them is runnable (migration 0015); workers LISTEN on a dedicated connection that
//!   reconnects by itself, wake at once or keep a timer for that time, so a job scheduled ahead
//!   by any process runs at its time; they poll as a fallback (lost notifications).
//! - **Uniqueness**: a partial unique index over active states allows one active job per
//!   (kind, tenant, unique key); enqueueing again returns the active job.
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::store::StoreError;

pub mod job;
pub mod listener;
pub mod worker;

pub use job::enqueue_job;

pub const NOTIFY_CHANNEL: &str = "mailscope_jobs";

/// Job states, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn parse(s: &str) -> JobState {
        match s {
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => JobState::Queued,
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub kind: String,
    /// `Uuid::nil()` for jobs of no tenant.
    pub tenant_id: Uuid,
    pub unique_key: Option<String>,
    pub payload: serde_json::Value,
    pub run_at: Option<DateTime<Utc>>,
    pub max_failures: i32,
}

impl NewJob {
    pub fn new(kind: &str, tenant_id: Uuid, payload: serde_json::Value) -> Self {
        NewJob {
            kind: kind.into(),
            tenant_id,
            unique_key: None,
            payload,
            run_at: None,
            max_failures: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    pub id: Uuid,
    pub kind: String,
    pub tenant_id: Uuid,
    pub unique_key: Option<String>,
    pub payload: serde_json::Value,
    pub state: JobState,
    pub attempt: i32,
    pub failures: i32,
    pub max_failures: i32,
    pub run_at: DateTime<Utc>,
    pub lease_owner: Option<String>,
    pub cancel_requested: bool,
    pub last_error: Option<String>,
    pub result: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

pub(crate) const COLUMNS: &str = "id, kind, tenant_id, unique_key, payload, state, attempt, failures, \
    max_failures, run_at, lease_owner, cancel_requested, last_error, result, created_at, updated_at, \
    started_at, finished_at";

pub(crate) fn from_row(r: &Row) -> JobRecord {
    let state: String = r.get(5);
    JobRecord {
        id: r.get(0),
        kind: r.get(1),
        tenant_id: r.get(2),
        unique_key: r.get(3),
        payload: r.get(4),
        state: JobState::parse(&state),
        attempt: r.get(6),
        failures: r.get(7),
        max_failures: r.get(8),
        run_at: r.get(9),
        lease_owner: r.get(10),
        cancel_requested: r.get(11),
        last_error: r.get(12),
        result: r.get(13),
        created_at: r.get(14),
        updated_at: r.get(15),
        started_at: r.get(16),
        finished_at: r.get(17),
    }
}

/// Whether `enqueue` created a job or found the active one with the same unique key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Created(Uuid),
    Existing(Uuid),
}

impl Enqueued {
    pub fn id(self) -> Uuid {
        match self {
            Enqueued::Created(id) | Enqueued::Existing(id) => id,
        }
    }
}

/// Enqueue, in the caller's transaction if it passes one (so the job exists iff the business
/// write commits).
pub async fn enqueue(c: &impl GenericClient, job: &NewJob) -> Result<Enqueued, StoreError> {
    let id = Uuid::new_v4();
    let row = c
        .query_opt(
            "INSERT INTO jobs (id, kind, tenant_id, unique_key, payload, run_at, max_failures)
             VALUES ($1, $2, $3, $4, $5, coalesce($6, now()), $7)
             ON CONFLICT (kind, tenant_id, unique_key)
                 WHERE state IN ('queued', 'running') AND unique_key IS NOT NULL
             DO NOTHING
             RETURNING id",
            &[
                &id,
                &job.kind,
                &job.tenant_id,
                &job.unique_key,
                &job.payload,
                &job.run_at,
                &job.max_failures,
            ],
        )
        .await?;
    if let Some(r) = row {
        return Ok(Enqueued::Created(r.get(0)));
    }
    let existing = c
        .query_opt(
            "SELECT id FROM jobs WHERE kind = $1 AND tenant_id = $2 AND unique_key = $3
               AND state IN ('queued', 'running')",
            &[&job.kind, &job.tenant_id, &job.unique_key],
        )
        .await?;
    match existing {
        Some(r) => Ok(Enqueued::Existing(r.get(0))),
        // The active job finished between our insert and our look-up: try once more.
        None => Box::pin(enqueue(c, job)).await,
    }
}

/// Enqueue many jobs with one INSERT (plus one look-up for those whose unique key already has
/// an active job), for callers that queue many at once. Results are in the order of `jobs`; a
/// job repeating an earlier one's unique key in the same call gets that job's id as `Existing`.
pub async fn enqueue_many(
    c: &impl GenericClient,
    jobs: &[NewJob],
) -> Result<Vec<Enqueued>, StoreError> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = jobs.iter().map(|_| Uuid::new_v4()).collect();
    let kinds: Vec<&str> = jobs.iter().map(|j| j.kind.as_str()).collect();
    let tenants: Vec<Uuid> = jobs.iter().map(|j| j.tenant_id).collect();
    let keys: Vec<Option<&str>> = jobs.iter().map(|j| j.unique_key.as_deref()).collect();
    let payloads: Vec<&serde_json::Value> = jobs.iter().map(|j| &j.payload).collect();
    let run_ats: Vec<Option<DateTime<Utc>>> = jobs.iter().map(|j| j.run_at).collect();
    let max_failures: Vec<i32> = jobs.iter().map(|j| j.max_failures).collect();
    // `WITH ORDINALITY` keeps the callers' order, so of two jobs with one key the first wins.
    let created: std::collections::HashSet<Uuid> = c
        .query(
            "INSERT INTO jobs (id, kind, tenant_id, unique_key, payload, run_at, max_failures)
             SELECT id, kind, tenant_id, unique_key, payload, coalesce(run_at, now()), max_failures
             FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::jsonb[],
                         $6::timestamptz[], $7::int4[])
                  WITH ORDINALITY AS u(id, kind, tenant_id, unique_key, payload, run_at,
                                       max_failures, n)
             ORDER BY n
             ON CONFLICT (kind, tenant_id, unique_key)
                 WHERE state IN ('queued', 'running') AND unique_key IS NOT NULL
             DO NOTHING
             RETURNING id",
            &[
                &ids,
                &kinds,
                &tenants,
                &keys,
                &payloads,
                &run_ats,
                &max_failures,
            ],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut out = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        if created.contains(&ids[i]) {
            out.push(Enqueued::Created(ids[i]));
            continue;
        }
        // Only a keyed job can conflict. Rare enough (a repeated request) for one look-up each;
        // `enqueue` also retries if the active job finished in between.
        out.push(enqueue(c, job).await?);
    }
    Ok(out)
}

pub async fn get(c: &impl GenericClient, id: Uuid) -> Result<Option<JobRecord>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = $1");
    Ok(c.query_opt(&sql, &[&id]).await?.as_ref().map(from_row))
}

/// Replace the payload of an active job (a newer change updates the expectations of the check
/// already queued instead of starting a second one). Returns false if the job is no longer active.
pub async fn update_payload(
    c: &impl GenericClient,
    id: Uuid,
    payload: &serde_json::Value,
) -> Result<bool, StoreError> {
    Ok(c.execute(
        "UPDATE jobs SET payload = $2, updated_at = now()
         WHERE id = $1 AND state IN ('queued', 'running')",
        &[&id, payload],
    )
    .await?
        == 1)
}

/// When the lease of one run of a job (its id and claim attempt) ends, while that run still
/// holds it: `None` once the job finished, was claimed again or its lease lapsed (its worker died
/// or lost the database). Sagas use it to tell a step under way from one a dead runner left.
pub async fn live_lease(
    c: &impl GenericClient,
    id: Uuid,
    attempt: i32,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    Ok(c.query_opt(
        "SELECT lease_expires_at FROM jobs
             WHERE id = $1 AND attempt = $2 AND state = 'running' AND lease_expires_at > now()",
        &[&id, &attempt],
    )
    .await?
    .map(|r| r.get(0)))
}

/// Run an active job as soon as possible (a queued one now; a running one keeps its turn) and
/// withdraw a pending cancel: a newer change needs the job all the same. False if the job is no
/// longer active.
pub async fn wake(c: &impl GenericClient, id: Uuid) -> Result<bool, StoreError> {
    Ok(c.execute(
        "UPDATE jobs SET run_at = CASE WHEN state = 'queued' THEN now() ELSE run_at END,
             cancel_requested = false, updated_at = now()
         WHERE id = $1 AND state IN ('queued', 'running')",
        &[&id],
    )
    .await?
        == 1)
}

/// Cancel: a queued job is cancelled at once; a running one is flagged and its worker stops it
/// at the next heartbeat. Returns the job's state after the request, or `None` if unknown.
pub async fn cancel(c: &impl GenericClient, id: Uuid) -> Result<Option<JobState>, StoreError> {
    let row = c
        .query_opt(
            "UPDATE jobs SET
                 cancel_requested = true,
                 state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END,
                 finished_at = CASE WHEN state = 'queued' THEN now() ELSE finished_at END,
                 updated_at = now()
             WHERE id = $1
             RETURNING state",
            &[&id],
        )
        .await?;
    Ok(row.map(|r| JobState::parse(r.get::<_, &str>(0))))
}

/// The jobs with these ids (a page's jobs in one query), by id.
pub async fn get_many(
    c: &impl GenericClient,
    ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, JobRecord>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ANY($1)");
    Ok(c.query(&sql, &[&ids])
        .await?
        .iter()
        .map(|r| {
            let j = from_row(r);
            (j.id, j)
        })
        .collect())
}

/// Queue a job that a cancel just ended for one more run at once (it has to clean up after
/// itself; its payload sees the cancel elsewhere). False if it was not `cancelled`.
pub async fn requeue_cancelled(c: &impl GenericClient, id: Uuid) -> Result<bool, StoreError> {
    Ok(c.execute(
        "UPDATE jobs SET state = 'queued', run_at = now(), finished_at = NULL,
             updated_at = now() WHERE id = $1 AND state = 'cancelled'",
        &[&id],
    )
    .await?
        == 1)
}

/// Queue depth by (kind, state), for metrics.
pub async fn depth(c: &impl GenericClient) -> Result<Vec<(String, String, i64)>, StoreError> {
    let rows = c
        .query(
            "SELECT kind, state, count(*) FROM jobs GROUP BY kind, state",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Delete finished jobs older than `age` (their outcome has been reported by then).
pub async fn purge_finished(
    pool: &deadpool_postgres::Pool,
    age: std::time::Duration,
) -> Result<u64, StoreError> {
    let c = pool.get().await?;
    Ok(c.execute(
        "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled')
           AND finished_at < now() - make_interval(secs => $1)",
        &[&age.as_secs_f64()],
    )
    .await?)
}
