//! Typed jobs: a payload type names its kind, tenant and unique key once, is enqueued with
//! [`enqueue_job`], and is run by a [`Job`] implementation registered with
//! [`Worker::register_job`].
//!
//! Two traits, because the layers that queue a job are below the one that runs it: provisioning
//! queues a propagation check ([`Payload`]) whose run (a [`Job`]) lives in `jobs/`, above it.
use std::future::Future;
use std::sync::Arc;

use deadpool_postgres::GenericClient;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::worker::{JobContext, Outcome, Worker};
use super::{Enqueued, NewJob};
use crate::store::StoreError;

/// What a job's row carries: the stored `kind` and the JSON payload it (de)serialises to.
pub trait Payload: Serialize + DeserializeOwned + Send + 'static {
    /// The stored `kind`. Never rename one: rows queued by an older version must still run.
    const KIND: &'static str;
    /// How many failed runs the queue allows before it gives up.
    const MAX_FAILURES: i32 = 10;

    /// The tenant the job acts for (`Uuid::nil()` for none); fairness is per tenant.
    fn tenant(&self) -> Uuid;

    /// At most one active job per (kind, tenant, unique key).
    fn unique_key(&self) -> Option<String> {
        None
    }
}

/// How a payload runs. `Context` is what the job needs (e.g. the provisioning services), built
/// once at start-up and shared by every run.
pub trait Job: Payload {
    type Context: Send + Sync + 'static;

    fn run(self, ctx: &Self::Context, job: &JobContext) -> impl Future<Output = Outcome> + Send;
}

/// The row that queues `payload`.
pub fn new_job<P: Payload>(payload: &P) -> Result<NewJob, StoreError> {
    let json = serde_json::to_value(payload)
        .map_err(|e| StoreError::Other(anyhow::anyhow!("job payload for {}: {e}", P::KIND)))?;
    Ok(NewJob {
        unique_key: payload.unique_key(),
        max_failures: P::MAX_FAILURES,
        ..NewJob::new(P::KIND, payload.tenant(), json)
    })
}

/// Queue `payload`, in the caller's transaction if it passes one. With a unique key, an active
/// job with the same key is returned instead of a second one.
pub async fn enqueue_job<P: Payload>(
    c: &impl GenericClient,
    payload: &P,
) -> Result<Enqueued, StoreError> {
    super::enqueue(c, &new_job(payload)?).await
}

/// Replace the payload of an active job (see [`super::update_payload`]).
pub async fn replace_payload<P: Payload>(
    c: &impl GenericClient,
    id: Uuid,
    payload: &P,
) -> Result<bool, StoreError> {
    super::update_payload(c, id, &new_job(payload)?.payload).await
}

impl Worker {
    /// Run jobs of kind `J::KIND` with `J::run`. A payload that does not parse fails the job.
    pub fn register_job<J: Job>(&mut self, ctx: J::Context) {
        let ctx = Arc::new(ctx);
        self.register(J::KIND, move |jc: JobContext| {
            let ctx = ctx.clone();
            async move {
                match serde_json::from_value::<J>(jc.job.payload.clone()) {
                    Ok(job) => job.run(&ctx, &jc).await,
                    Err(e) => {
                        Outcome::Fail(format!("the {} job's payload is invalid: {e}", J::KIND))
                    }
                }
            }
        });
    }
}
