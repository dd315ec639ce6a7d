//! The `credential_expiry_scan` job: one per tenant with access grants, announcing each
//! credential of a grant's app that ends soon once (`provisioning::grants::scan_expiring`), then
//! rescheduling itself every `provisioning.credential_scan_interval_seconds`.
use crate::provisioning::Services;
use crate::provisioning::grants::{self, ExpiryScanJob};
use crate::queue::job::Job;
use crate::queue::worker::{JobContext, Outcome};

impl Job for ExpiryScanJob {
    type Context = Services;

    async fn run(self, services: &Services, _ctx: &JobContext) -> Outcome {
        match grants::scan_expiring(services, self.tenant_id).await {
            Ok(o) => o,
            Err(e) => e.job_outcome(),
        }
    }
}
