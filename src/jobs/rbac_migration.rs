//! The `rbac_migration` job: one step of an app's migration from access policies to RBAC for
//! Applications per run (`provisioning::rbac_migration::advance`), rescheduling itself until the
//! migration succeeds, pauses or is rolled back. Throttling waits for `Retry-After` without
//! counting as a failure.
use crate::provisioning::Services;
use crate::provisioning::rbac_migration::{self, MigrationJob};
use crate::queue::job::Job;
use crate::queue::worker::{JobContext, Outcome};

impl Job for MigrationJob {
    type Context = Services;

    async fn run(self, services: &Services, ctx: &JobContext) -> Outcome {
        rbac_migration::advance(services, &ctx.job, &self).await
    }
}
