//! The lease and fence of a saga's step (access grants, RBAC migrations), so that no pooled
//! connection, transaction or advisory lock is held while a step calls Microsoft.
//!
//! A job run of a saga works in three parts:
//! 1. a short transaction under the saga's advisory lock reads the record, decides the step,
//!    records what safety needs known before Microsoft is asked, and names itself the step's
//!    runner with a fresh token (`store::step_runs`);
//! 2. the step runs with no connection held by the runner (the use cases it calls take their
//!    own, briefly);
//! 3. a second short transaction under the same lock re-reads the record and records the result
//!    only while the record still names the token, then clears it.
//!
//! While a step is under way its runner is the only one: another job of the saga (a newer
//! revision's, a resumed run's) that finds a runner whose job lease is live waits for it (it is
//! woken when the step is recorded, and looks again every few seconds in case the runner died).
//! A runner whose lease is no longer live (killed, or cut off from the database) is taken over
//! with a new token, so its result, should it still arrive, is discarded.
use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::Error;
use crate::queue::JobRecord;
use crate::store::step_runs::StepRun;

/// How often a job waiting for another run's step looks again at the latest (it is woken sooner
/// when that step is recorded).
const WAIT_AT_MOST: Duration = Duration::seconds(2);
const WAIT_AT_LEAST: Duration = Duration::milliseconds(200);

/// The runner record of `job`'s run of `step`, with a fresh token.
pub fn start(job: &JobRecord, step: &str) -> StepRun {
    StepRun {
        token: Uuid::new_v4(),
        job_id: job.id,
        attempt: job.attempt,
        step: step.to_string(),
        started_at: Utc::now(),
    }
}

/// When `job` should look again because another job run holds the saga's step, or `None` when
/// none does (no runner, this run, or a runner whose lease is no longer live).
pub async fn held_elsewhere(
    c: &impl GenericClient,
    current: Option<&StepRun>,
    job: &JobRecord,
) -> Result<Option<DateTime<Utc>>, Error> {
    let Some(run) = current else {
        return Ok(None);
    };
    if run.job_id == job.id && run.attempt == job.attempt {
        return Ok(None);
    }
    let Some(until) = crate::queue::live_lease(c, run.job_id, run.attempt).await? else {
        return Ok(None);
    };
    let now = Utc::now();
    Ok(Some(until.clamp(now + WAIT_AT_LEAST, now + WAIT_AT_MOST)))
}

/// Whether the record still names this run's token: only then may the run record its result.
pub fn still_ours(current: Option<&StepRun>, token: Uuid) -> bool {
    current.is_some_and(|r| r.token == token)
}

/// Let the job that waits for the step just recorded run now, after the recording transaction
/// committed (on its own, so the recording transaction makes no second write to the queue).
/// Best effort: the waiting job looks again within seconds anyway.
pub async fn wake(c: &impl GenericClient, job: Uuid) {
    if let Err(e) = crate::queue::wake(c, job).await {
        tracing::debug!(job = %job, error = %e, "could not wake the job waiting for a step");
    }
}
