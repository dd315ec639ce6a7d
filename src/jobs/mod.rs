//! The queue's jobs, above the provisioning layer: each is a typed payload (`queue::job`) whose
//! run calls the same use cases and connector as the API. [`register_all`] is the one place a
//! worker learns them.
use crate::provisioning::Services;
use crate::queue::worker::Worker;

pub mod access_grant;
pub mod credential_expiry;
pub mod propagation_check;
pub mod rbac_migration;
pub mod webhook_delivery;

/// Register every job kind on the worker. Each job gets what it needs: the provisioning services,
/// or only the webhook settings for deliveries.
pub fn register_all(worker: &mut Worker, services: &Services) {
    worker.register_job::<crate::provisioning::checks::CheckJob>(services.clone());
    worker.register_job::<crate::provisioning::grants::GrantJob>(services.clone());
    worker.register_job::<crate::provisioning::rbac_migration::MigrationJob>(services.clone());
    worker.register_job::<crate::provisioning::grants::ExpiryScanJob>(services.clone());
    worker.register_job::<crate::webhooks::Delivery>(services.settings.webhooks.clone());
}
