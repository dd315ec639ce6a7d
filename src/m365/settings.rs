//! Tunables of the Microsoft 365 connector (`[m365]` in the TOML config).
//!
//! Every default is chosen for a service that shares each tenant's Microsoft budget with the
//! tenant's other tools: stay well under Microsoft's limits, retry what is safe, give up early
//! enough that a background job can reschedule instead of holding a worker. Anything the protocol
//! reference marks *unverified* (anchor mailbox form, assertion algorithm, replication lag) is a
//! setting here rather than a constant.
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Signing algorithm for the certificate client assertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum AssertionAlgorithm {
    /// RSASSA-PSS with SHA-256: what Microsoft's current certificate-credentials page shows.
    #[default]
    PS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256: the older documented form, still widely used by MSAL.
    RS256,
}

/// How the tenant is named in the InvokeCommand URL path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExchangeTenantForm {
    /// The tenant GUID (from the tenant id, or the token's `tid`): the form seen in production.
    #[default]
    Guid,
    /// The tenant id exactly as configured (GUID or `<name>.onmicrosoft.com`).
    AsConfigured,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct M365Settings {
    /// TCP+TLS connect timeout. 10 s: Microsoft front doors connect in well under a second; longer
    /// means a network problem that retrying elsewhere handles better.
    pub connect_timeout_ms: u64,
    /// Whole-request timeout for the token endpoint. 20 s: token requests are small and fast.
    pub login_timeout_ms: u64,
    /// Whole-request timeout for Graph. 30 s: Graph's own gateway gives up around 30-60 s.
    pub graph_timeout_ms: u64,
    /// Whole-request timeout for one InvokeCommand page. 90 s: directory-writing cmdlets
    /// (New-DistributionGroup, New-ManagementRoleAssignment) and 1000-item pages routinely take
    /// tens of seconds; cutting them short turns a slow success into an unknown outcome.
    pub exchange_timeout_ms: u64,
    /// Attempts per call including the first. 5: with the backoff below this spans ~15-30 s of
    /// transient trouble, after which the job layer reschedules rather than holding a worker.
    pub max_attempts: u32,
    /// Base of the exponential backoff (full jitter). 500 ms.
    pub backoff_base_ms: u64,
    /// Cap of one backoff sleep. 30 s.
    pub backoff_max_ms: u64,
    /// Longest `Retry-After` honoured by sleeping in-process. 120 s: longer waits are returned as
    /// `Throttled{retry_after}` so the caller reschedules without pinning a task (and without
    /// ever calling before the time Microsoft gave).
    pub max_retry_after_ms: u64,
    /// Refresh a cached token this long before it expires. 300 s: Entra tokens live 60-90 min; five
    /// minutes covers clock skew and a slow refresh, and a failed early refresh falls back to the
    /// still-valid token.
    pub token_refresh_skew_secs: u64,
    /// Concurrent Graph requests per tenant. 8: Graph mail APIs allow 4 concurrent requests per
    /// mailbox per app and the directory APIs far more; 8 keeps one tenant from monopolising the
    /// connection pool.
    pub graph_concurrency_per_tenant: usize,
    /// Concurrent InvokeCommand requests per tenant. 3: Exchange answers "maximum number of
    /// concurrent requests per tenant" well before Graph-like concurrency, and the budget is shared
    /// with the tenant's own admin scripts.
    pub exchange_concurrency_per_tenant: usize,
    /// Sustained Graph request rate per tenant (requests/s). 20/s is a small fraction of Graph's
    /// per-tenant identity limits, which other apps in the tenant also draw from.
    pub graph_rate_per_sec: f64,
    /// Graph burst size per tenant. 40.
    pub graph_burst: u32,
    /// Sustained InvokeCommand rate per tenant (requests/s). 5/s: Exchange's admin budget is
    /// much smaller than Graph's and each cmdlet is expensive server-side.
    pub exchange_rate_per_sec: f64,
    /// InvokeCommand burst size per tenant. 10.
    pub exchange_burst: u32,
    /// How long 404s are retried after a `New-*` when the caller asks for it. 300 s: the reference
    /// reports replication lag of seconds to minutes and retries up to about 300 s (unverified).
    pub replication_window_secs: u64,
    /// Cap of one sleep between replication retries. 15 s.
    pub replication_poll_max_ms: u64,
    /// How long answers explained by Entra's eventual consistency are retried right after
    /// mailscope wrote the object (docs/microsoft-365.md §8.4): a new application read as 404,
    /// `NoBackingApplicationObject` when creating its service principal, a new client secret
    /// refused with AADSTS7000215, a new app role missing from the app's token. 120 s: Microsoft
    /// gives no figure ("typically seconds"); past it the step fails as `replication_pending`
    /// and the job layer retries it later.
    pub entra_consistency_window_secs: u64,
    /// Client assertion signing algorithm (docs/microsoft-365.md §5.1: current docs PS256, older docs RS256).
    pub client_assertion_algorithm: AssertionAlgorithm,
    /// Lifetime of a client assertion (exp - nbf). 600 s: Microsoft asks for 5-10 minutes.
    pub client_assertion_lifetime_secs: u64,
    /// `X-AnchorMailbox` template for app-only InvokeCommand. `{tenant_guid}` and `{tenant}` are
    /// substituted. Which anchor the current module uses is unverified (docs/microsoft-365.md §1.3).
    pub exchange_anchor_mailbox: String,
    /// How the tenant is named in the InvokeCommand path.
    pub exchange_tenant_form: ExchangeTenantForm,
    /// Path of InvokeCommand under the Exchange host; `{tenant}` is substituted.
    pub exchange_invoke_path: String,
    /// `Prefer: odata.maxpagesize` for InvokeCommand. 1000, the honoured maximum.
    pub exchange_page_size: u32,
    /// Add `"Confirm": false` to Remove-* cmdlets. Off: whether REST needs it is unverified and the
    /// service has no interactive host to prompt.
    pub exchange_confirm_false_on_remove: bool,
    /// Requests per Graph `$batch`. 20, Graph's maximum.
    pub graph_batch_size: usize,
    /// How long resolved app role ids and resource service principals are cached. 1 h.
    pub app_role_cache_ttl_secs: u64,
    /// User-Agent sent on every request. It matters: EWS access policies match on it (docs/microsoft-365.md §6.7).
    pub user_agent: String,
}

impl Default for M365Settings {
    fn default() -> Self {
        M365Settings {
            connect_timeout_ms: 10_000,
            login_timeout_ms: 20_000,
            graph_timeout_ms: 30_000,
            exchange_timeout_ms: 90_000,
            max_attempts: 5,
            backoff_base_ms: 500,
            backoff_max_ms: 30_000,
            max_retry_after_ms: 120_000,
            token_refresh_skew_secs: 300,
            graph_concurrency_per_tenant: 8,
            exchange_concurrency_per_tenant: 3,
            graph_rate_per_sec: 20.0,
            graph_burst: 40,
            exchange_rate_per_sec: 5.0,
            exchange_burst: 10,
            replication_window_secs: 300,
            replication_poll_max_ms: 15_000,
            entra_consistency_window_secs: 120,
            client_assertion_algorithm: AssertionAlgorithm::PS256,
            client_assertion_lifetime_secs: 600,
            exchange_anchor_mailbox:
                "APP:SystemMailbox{bb558c35-97f1-4cb9-8ff7-d53741dc928c}@{tenant_guid}".to_string(),
            exchange_tenant_form: ExchangeTenantForm::Guid,
            exchange_invoke_path: "/adminapi/beta/{tenant}/InvokeCommand".to_string(),
            exchange_page_size: 1000,
            exchange_confirm_false_on_remove: false,
            graph_batch_size: 20,
            app_role_cache_ttl_secs: 3600,
            user_agent: concat!("mailscope/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

impl M365Settings {
    /// How long an Exchange object written by mailscope may still be replicating: a lookup that
    /// misses it within this window is lag, not absence.
    pub fn replication_window(&self) -> chrono::Duration {
        chrono::Duration::seconds(
            i64::try_from(self.replication_window_secs).unwrap_or(i64::MAX / 1000),
        )
    }

    /// Reject settings that would make the connector misbehave; called by `M365Client::new`.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("login_timeout_ms", self.login_timeout_ms),
            ("graph_timeout_ms", self.graph_timeout_ms),
            ("exchange_timeout_ms", self.exchange_timeout_ms),
            ("backoff_base_ms", self.backoff_base_ms),
            ("backoff_max_ms", self.backoff_max_ms),
            ("max_attempts", u64::from(self.max_attempts)),
            ("graph_burst", u64::from(self.graph_burst)),
            ("exchange_burst", u64::from(self.exchange_burst)),
            ("exchange_page_size", u64::from(self.exchange_page_size)),
            (
                "graph_concurrency_per_tenant",
                self.graph_concurrency_per_tenant as u64,
            ),
            (
                "exchange_concurrency_per_tenant",
                self.exchange_concurrency_per_tenant as u64,
            ),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("m365.{name} must be greater than 0"));
            }
        }
        for (name, v) in [
            ("graph_rate_per_sec", self.graph_rate_per_sec),
            ("exchange_rate_per_sec", self.exchange_rate_per_sec),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("m365.{name} must be a positive number"));
            }
        }
        if !(1..=20).contains(&self.graph_batch_size) {
            return Err("m365.graph_batch_size must be between 1 and 20 (Graph's limit)".into());
        }
        if !(60..=3600).contains(&self.client_assertion_lifetime_secs) {
            return Err("m365.client_assertion_lifetime_secs must be between 60 and 3600".into());
        }
        if !self.exchange_invoke_path.starts_with('/')
            || !self.exchange_invoke_path.contains("{tenant}")
        {
            return Err(
                "m365.exchange_invoke_path must start with '/' and contain {tenant}".into(),
            );
        }
        if self.exchange_anchor_mailbox.contains(['\r', '\n']) {
            return Err("m365.exchange_anchor_mailbox must be a single line".into());
        }
        Ok(())
    }

    pub(crate) fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is fine in tests (developers' guide)
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        M365Settings::default().validate().unwrap();
    }

    #[test]
    fn partial_toml_keeps_defaults() {
        let s: M365Settings = serde_json::from_value(
            serde_json::json!({"max_attempts": 2, "client_assertion_algorithm": "RS256"}),
        )
        .unwrap();
        assert_eq!(s.max_attempts, 2);
        assert_eq!(s.client_assertion_algorithm, AssertionAlgorithm::RS256);
        assert_eq!(s.exchange_page_size, 1000);
    }

    #[test]
    fn rejects_oversized_batches() {
        let s = M365Settings {
            graph_batch_size: 21,
            ..Default::default()
        };
        assert!(s.validate().is_err());
    }
}
