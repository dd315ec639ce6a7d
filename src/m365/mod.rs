//! The Microsoft 365 connector: tokens, a Microsoft Graph client and an Exchange Online admin
//! (InvokeCommand) client, sharing one resilience layer.
//!
//! ```ignore
//! let m365 = M365Client::new(settings, &registry)?;
//! let tenant = m365.tenant(TenantContext { tenant_id, endpoints, credential });
//! let sp = tenant.graph().service_principal_by_app_id(&app_id).await?;
//! let groups = tenant.exchange().get_distribution_group("Scope-Finance").await?;
//! ```
//!
//! Base URLs come only from [`CloudEndpoints`], so the same code reaches Microsoft, the sandbox
//! or a mock server. Every call goes through [`transport`]: per-tenant concurrency and rate
//! limits, timeouts, retries honouring `Retry-After`, a tracing span and Prometheus metrics.
//! Every failure is an [`M365Error`] with a stable code, a cause and a fix.
//!
//! Wiring for the service: deserialize [`M365Settings`] from `[m365]` (all keys optional), build
//! one [`M365Client`] with the process registry, keep it in the app state, and call
//! [`M365Client::forget_tenant`] when a tenant's credential changes. The HTTP layer can use
//! [`M365Error::code`] as the problem `type` suffix, [`M365Error::cause`]/[`M365Error::fix`] as
//! detail text and [`M365Error::suggested_http_status`] as the status.
pub mod connection_test;
pub mod error;
pub mod exchange;
pub mod graph;
mod limiter;
mod metrics;
pub mod retry;
pub mod settings;
pub mod token;
mod transport;

pub use connection_test::{ConnectionTestReport, ConnectionTestStep, StepStatus};
pub use error::{ErrorKind, M365Error, Service};
pub use exchange::ExchangeClient;
pub use graph::GraphClient;
pub use settings::{AssertionAlgorithm, ExchangeTenantForm, M365Settings};
pub use token::{AccessToken, TokenResource};

use crate::domain::cloud::CloudEndpoints;
use crate::domain::credential::ManagementCredential;
use std::sync::Arc;
use std::time::Duration;
use transport::Core;

/// Everything needed to act in one tenant.
#[derive(Debug, Clone)]
pub struct TenantContext {
    /// Tenant GUID (preferred) or verified domain such as `contoso.onmicrosoft.com`.
    pub tenant_id: String,
    pub endpoints: CloudEndpoints,
    pub credential: ManagementCredential,
}

/// Process-wide connector: one HTTP connection pool, token cache and set of tenant limiters.
/// Cheap to clone; create one per process.
#[derive(Clone)]
pub struct M365Client {
    core: Arc<Core>,
    app_roles: Arc<graph::AppRoleCache>,
}

/// Errors building the client.
#[derive(Debug, thiserror::Error)]
pub enum M365InitError {
    #[error("invalid [m365] settings: {0}")]
    Settings(String),
    #[error("could not register m365 metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("could not build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

impl M365Client {
    /// Build the connector; its metrics are registered into `registry`.
    pub fn new(
        settings: M365Settings,
        registry: &prometheus::Registry,
    ) -> Result<Self, M365InitError> {
        settings.validate().map_err(M365InitError::Settings)?;
        let http = reqwest::Client::builder()
            .user_agent(settings.user_agent.clone())
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            // Keep idle connections short-lived: Microsoft front doors rotate, and a dead pooled
            // connection costs a retry.
            .pool_idle_timeout(Duration::from_secs(60))
            // Bearer tokens must never follow a redirect to another host.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let metrics = metrics::Metrics::register(registry)?;
        let core = Core {
            http,
            limiters: limiter::Limiters::new(&settings),
            metrics,
            tokens: token::TokenCache::default(),
            settings,
        };
        let ttl = Duration::from_secs(core.settings.app_role_cache_ttl_secs);
        Ok(M365Client {
            core: Arc::new(core),
            app_roles: Arc::new(graph::AppRoleCache::new(ttl)),
        })
    }

    pub fn settings(&self) -> &M365Settings {
        &self.core.settings
    }

    /// A handle for one tenant. Cheap; make one per operation if convenient.
    pub fn tenant(&self, ctx: TenantContext) -> TenantHandle {
        TenantHandle {
            client: self.clone(),
            ctx: Arc::new(ctx),
        }
    }

    /// Drop cached tokens and app role ids of a tenant, e.g. after its credential was replaced.
    pub fn forget_tenant(&self, tenant_id: &str) {
        self.core.tokens.invalidate_tenant(tenant_id);
        self.app_roles.invalidate_tenant(tenant_id);
    }
}

/// The connector bound to one tenant.
#[derive(Clone)]
pub struct TenantHandle {
    client: M365Client,
    ctx: Arc<TenantContext>,
}

impl TenantHandle {
    pub fn context(&self) -> &TenantContext {
        &self.ctx
    }

    pub fn graph(&self) -> GraphClient {
        GraphClient::new(
            self.client.core.clone(),
            self.ctx.clone(),
            self.client.app_roles.clone(),
        )
    }

    pub fn exchange(&self) -> ExchangeClient {
        ExchangeClient::new(self.client.core.clone(), self.ctx.clone())
    }

    /// A token for `resource`, from the cache when fresh.
    pub async fn token(&self, resource: TokenResource) -> Result<AccessToken, M365Error> {
        self.client
            .core
            .tokens
            .get(&self.client.core, &self.ctx, resource, None)
            .await
    }

    /// Say that this handle's client secret was created moments ago: for the next
    /// `entra_consistency_window_secs`, the token endpoint's "invalid client secret"
    /// (AADSTS7000215) is retried as Entra's eventual consistency (docs/microsoft-365.md §8.4)
    /// and, if it outlasts the window, reported as `replication_pending`.
    pub fn credential_is_new(&self) {
        let window = Duration::from_secs(self.client.core.settings.entra_consistency_window_secs);
        self.client.core.tokens.mark_new_credential(
            &self.ctx.tenant_id,
            self.ctx.credential.client_id(),
            tokio::time::Instant::now() + window,
        );
    }

    /// A token for `resource` that carries an app role `wanted` accepts. A role granted moments
    /// ago reaches tokens only after a while (docs/microsoft-365.md §8.4): a token without it is
    /// replaced, with backoff, for up to `entra_consistency_window_secs`; then the answer is
    /// `replication_pending`.
    pub async fn token_with_role(
        &self,
        resource: TokenResource,
        wanted: &(dyn Fn(&str) -> bool + Sync),
        description: &str,
    ) -> Result<AccessToken, M365Error> {
        let core = &self.client.core;
        let s = &core.settings;
        let until =
            tokio::time::Instant::now() + Duration::from_secs(s.entra_consistency_window_secs);
        let base = Duration::from_millis(s.backoff_base_ms);
        let cap = Duration::from_millis(s.replication_poll_max_ms);
        let mut rejected: Option<AccessToken> = None;
        let mut retries = 0u32;
        loop {
            let t = core
                .tokens
                .get(core, &self.ctx, resource, rejected.as_ref())
                .await?;
            if t.roles().iter().any(|r| wanted(r)) {
                return Ok(t);
            }
            let delay = retry::next_delay(
                retries,
                None,
                base,
                Duration::from_millis(s.backoff_max_ms),
                &mut rand::thread_rng(),
            )
            .max(base)
            .min(cap);
            if tokio::time::Instant::now() + delay > until {
                tracing::warn!(
                    tenant = %self.ctx.tenant_id,
                    client_id = self.ctx.credential.client_id(),
                    wanted = description,
                    "the app's token still lacks the role after the consistency window"
                );
                return Err(M365Error::new(
                    ErrorKind::ReplicationPending,
                    Service::Login,
                    "token:roles",
                )
                .with_remote_code("roles")
                .with_message(format!(
                    "the app's token does not carry {description} yet (roles: {})",
                    if t.roles().is_empty() {
                        "none".to_string()
                    } else {
                        t.roles().join(", ")
                    }
                )));
            }
            tracing::info!(
                tenant = %self.ctx.tenant_id,
                client_id = self.ctx.credential.client_id(),
                wanted = description,
                delay_ms = delay.as_millis() as u64,
                "the app's token lacks a role granted moments ago; fetching a new one"
            );
            tokio::time::sleep(delay).await;
            retries += 1;
            rejected = Some(t);
        }
    }

    /// Acquire both tokens and make one harmless Graph and one harmless Exchange call.
    pub async fn connection_test(&self) -> ConnectionTestReport {
        connection_test::run(self).await
    }
}
