//! The `access_grant` job: brings an access grant one step closer to its desired state per run
//! (`provisioning::grants::advance`), then reschedules itself until the grant is `ready`,
//! `failed` or `removed`. Throttling waits for `Retry-After` without counting as a failure.
use crate::provisioning::Services;
use crate::provisioning::grants::{self, GrantJob};
use crate::queue::job::Job;
use crate::queue::worker::{JobContext, Outcome};

impl Job for GrantJob {
    type Context = Services;

    async fn run(self, services: &Services, ctx: &JobContext) -> Outcome {
        grants::advance(services, &ctx.job, &self).await
    }
}
