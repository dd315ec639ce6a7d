//! Configuration: compiled-in defaults, then an optional TOML file, then `MAILSCOPE_*` environment
//! variables (`__` separates nesting levels, e.g. `MAILSCOPE_DATABASE__POOL_SIZE`). `DATABASE_URL`
//! is honoured as a conventional alias of `database.url`.
//!
//! Everything is validated once, at start, and every bad value is reported at the same time.
//! Unknown keys are errors, so a misspelled variable cannot be silently ignored.
//! Secrets are wrapped in [`Secret`], whose `Debug` and `Serialize` never show the value.
use std::net::SocketAddr;
use std::path::Path;

use figment::Figment;
use figment::providers::{Format, Toml};
use serde::{Deserialize, Serialize};

// Each subsystem owns its settings and their validation; this module assembles them.
pub use crate::domain::secret::{Secret, decode_encryption_key};
pub use crate::store::DatabaseSettings;
pub use crate::webhooks::WebhookSettings;

/// Environment variables read besides the `MAILSCOPE_` tree.
pub const DATABASE_URL_ENV: &str = "DATABASE_URL";
/// Variables of the `sandbox` subcommand (its flags), not settings of the service.
pub const SANDBOX_ENV_PREFIX: &str = "MAILSCOPE_SANDBOX_";
/// The variable naming the optional TOML file (also `--config`); not itself a setting.
pub const CONFIG_FILE_ENV: &str = "MAILSCOPE_CONFIG";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address the HTTP API listens on.
    pub listen: String,
    pub log_format: LogFormat,
    /// `tracing` filter directives, e.g. `info,mailscope=debug`.
    pub log_filter: String,
    /// How long a stopping process waits for in-flight requests and jobs.
    pub shutdown_grace_seconds: u64,
    /// base64 of 32 bytes; encrypts tenant credentials at rest (AES-256-GCM).
    pub encryption_key: Option<Secret>,
    pub database: DatabaseSettings,
    pub auth: AuthSettings,
    pub http: HttpSettings,
    pub worker: WorkerSettings,
    pub retention: RetentionSettings,
    /// The Microsoft 365 connector: timeouts, retries, per-tenant limits (see `m365::settings`).
    pub m365: crate::m365::M365Settings,
    /// Limits of what the provisioning API creates in a tenant.
    pub provisioning: ProvisioningSettings,
    /// Propagation checks: how often, how long and how much they look.
    pub propagation: PropagationSettings,
    /// Signed callbacks (Standard Webhooks) sent when a propagation check ends.
    pub webhooks: WebhookSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PropagationSettings {
    /// Consecutive matching observations before an expectation counts as met (K).
    pub required_matches: u32,
    /// Delay before the first live observation, then growing by `backoff_factor`.
    pub first_delay_ms: u64,
    /// Longest delay between two live observations. A change is seen at most this long after it
    /// takes effect, and the verdict follows `required_matches − 1` confirmations later: the
    /// default (15 s, under twice `confirm_interval_ms`) keeps the verdict within
    /// (`required_matches` + 1) × `confirm_interval_ms` of enforcement. Raising it saves Graph
    /// calls (one `$batch` per look) at the cost of a later verdict.
    pub max_delay_ms: u64,
    pub backoff_factor: f64,
    /// Once a mailbox answers as expected, its remaining confirmations come at this interval
    /// instead of the growing backoff (never later than the backoff would have been).
    pub confirm_interval_ms: u64,
    /// A check that has not seen the change in force by then ends `timed_out`. Default 24 hours:
    /// Microsoft says an access policy change can take longer than an hour to reach Graph even
    /// when Exchange's Test cmdlet already shows it (docs/microsoft-365.md §2.7, §8.3), users
    /// report several hours, and the sandbox's default tail is 2 hours.
    pub deadline_seconds: u64,
    /// In-scope members sampled per policy scope for the default expectations.
    pub sample_size: usize,
    /// RBAC for Applications: the first look through Graph after Exchange's verdict. Microsoft
    /// documents a permission cache of 30 minutes to 2 hours (docs/microsoft-365.md §3.5, §8.3), so looking
    /// earlier only spends calls; the default is the documented minimum, 30 minutes. Later looks
    /// follow the backoff above.
    pub rbac_first_delay_ms: u64,
    /// RBAC for Applications: a check's default deadline. The documented maximum of the cache is
    /// 2 hours (an app in use keeps its cached permissions that long); the default, 4 hours,
    /// is twice that.
    pub rbac_deadline_seconds: u64,
}

impl Default for PropagationSettings {
    fn default() -> Self {
        PropagationSettings {
            required_matches: 3,
            first_delay_ms: 10_000,
            max_delay_ms: 15_000,
            backoff_factor: 2.0,
            confirm_interval_ms: 10_000,
            deadline_seconds: 86_400,
            sample_size: 3,
            rbac_first_delay_ms: 30 * 60 * 1000,
            rbac_deadline_seconds: 4 * 3600,
        }
    }
}

impl PropagationSettings {
    pub fn backoff(&self) -> crate::domain::propagation::Backoff {
        crate::domain::propagation::Backoff {
            first: std::time::Duration::from_millis(self.first_delay_ms),
            max: std::time::Duration::from_millis(self.max_delay_ms),
            factor: self.backoff_factor,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProvisioningSettings {
    /// Longest lifetime a client secret created through the API may have (Microsoft allows two
    /// years; shorter limits the damage of a leaked secret).
    pub max_secret_lifetime_days: u32,
    /// A secret ending within this many days is reported as `expiring_soon`.
    pub secret_expiring_soon_days: u32,
    /// RBAC migration: how long after removing an app's Entra consent its access policy stays.
    /// Access tokens issued before carry the revoked roles until they expire, and only the
    /// policy bounds them; Microsoft gives app tokens a lifetime of 60 to 90 minutes by
    /// default (docs/microsoft-365.md §8.8), so the default is 90 minutes. Raise it for tenants
    /// with a longer configured token lifetime.
    pub rbac_migration_token_drain_seconds: u64,
    /// How often each tenant's access grants are scanned for credentials that end within
    /// `secret_expiring_soon_days` (each is announced once by an `access_grant.expiring_soon`
    /// event).
    pub credential_scan_interval_seconds: u64,
}

impl Default for ProvisioningSettings {
    fn default() -> Self {
        ProvisioningSettings {
            max_secret_lifetime_days: 180,
            secret_expiring_soon_days: 30,
            rbac_migration_token_drain_seconds: 90 * 60,
            credential_scan_interval_seconds: 3600,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSettings {
    /// How long an Idempotency-Key and its stored response are kept (72 h survives a weekend).
    pub idempotency_keys_hours: u64,
    /// How long finished jobs (and their results) are kept.
    pub finished_jobs_days: u64,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        RetentionSettings {
            idempotency_keys_hours: 72,
            finished_jobs_days: 30,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    pub issuer: String,
    pub audience: String,
    /// OIDC JWKS document URL (asymmetric keys). Exclusive with `hs256_secret`.
    pub jwks_url: Option<String>,
    /// Shared HS256 secret for local use. Exclusive with `jwks_url`.
    pub hs256_secret: Option<Secret>,
    /// Algorithms accepted with JWKS keys.
    pub algorithms: Vec<String>,
    pub leeway_seconds: u64,
    /// An unknown `kid` triggers a refetch at most this often.
    pub jwks_min_refresh_seconds: u64,
    /// Keys older than this are refreshed on next use (served stale if the IdP is down).
    pub jwks_max_age_seconds: u64,
    pub role_read: String,
    pub role_write: String,
    pub role_admin: String,
    /// Claim listing the tenant ids a caller may see (`*` for all).
    pub tenants_claim: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    pub body_limit_bytes: usize,
    /// actix worker threads; defaults to the number of cores.
    pub workers: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    /// Jobs one worker process runs at the same time.
    pub concurrency: usize,
    /// Running jobs per tenant across all workers, so one tenant cannot starve the others.
    pub per_tenant_concurrency: i64,
    /// A job's lease; renewed every third of it while the job runs.
    pub lease_seconds: u64,
    /// Polling interval (LISTEN/NOTIFY wakes workers sooner).
    pub poll_interval_seconds: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: "127.0.0.1:8080".into(),
            log_format: LogFormat::Text,
            log_filter: "info".into(),
            shutdown_grace_seconds: 30,
            encryption_key: None,
            database: DatabaseSettings::default(),
            auth: AuthSettings::default(),
            http: HttpSettings::default(),
            worker: WorkerSettings::default(),
            retention: RetentionSettings::default(),
            m365: crate::m365::M365Settings::default(),
            provisioning: ProvisioningSettings::default(),
            propagation: PropagationSettings::default(),
            webhooks: WebhookSettings::default(),
        }
    }
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            issuer: "mailscope-local".into(),
            audience: "mailscope".into(),
            jwks_url: None,
            hs256_secret: None,
            algorithms: vec!["RS256".into(), "ES256".into()],
            leeway_seconds: 30,
            jwks_min_refresh_seconds: 30,
            jwks_max_age_seconds: 3600,
            role_read: "MailScope.Read".into(),
            role_write: "MailScope.Write".into(),
            role_admin: "MailScope.Admin".into(),
            tenants_claim: "mailscope_tenants".into(),
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            body_limit_bytes: 1024 * 1024,
            workers: None,
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            concurrency: 8,
            per_tenant_concurrency: 4,
            lease_seconds: 60,
            poll_interval_seconds: 5,
        }
    }
}

/// Every problem found in the configuration, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

pub const ALLOWED_JWKS_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

impl Settings {
    /// Load defaults → optional file → environment, then validate.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Settings::load`] with an explicit environment (tests, `check-config`).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut fig = Figment::new();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError(vec![format!(
                    "configuration file {} does not exist",
                    path.display()
                )]));
            }
            fig = fig.merge(Toml::file(path));
        }
        let mut prefixed = Vec::new();
        let mut database_url = None;
        for (k, v) in env {
            if k == DATABASE_URL_ENV {
                database_url = Some(v);
            } else if let Some(rest) = k.strip_prefix("MAILSCOPE_")
                && k != CONFIG_FILE_ENV
                && !k.starts_with(SANDBOX_ENV_PREFIX)
            {
                prefixed.push((rest.to_string(), v));
            }
        }
        // Build the env layer from the captured list so tests are not affected by the process env.
        let env_layer = prefixed.into_iter().fold(Figment::new(), |f, (k, v)| {
            let key = k.to_ascii_lowercase().replace("__", ".");
            f.merge((key, parse_env_value(&v)))
        });
        fig = fig.merge(env_layer);
        let mut settings: Settings = fig.extract().map_err(|e| {
            ConfigError(e.into_iter().map(|e| describe_figment_error(&e)).collect())
        })?;
        if settings.database.url.is_none()
            && let Some(url) = database_url.filter(|u| !u.is_empty())
        {
            settings.database.url = Some(Secret::new(url));
        }
        settings.validate()?;
        Ok(settings)
    }

    /// True when no database is configured and `serve` runs its own PostgreSQL.
    pub fn embedded_database(&self) -> bool {
        self.database.url.is_none()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        if self.listen.parse::<SocketAddr>().is_err() {
            errs.push(format!(
                "listen: `{}` is not an address like 127.0.0.1:8080",
                self.listen
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_filter).is_err() {
            errs.push(format!(
                "log_filter: `{}` is not a valid tracing filter",
                self.log_filter
            ));
        }
        if !(1..=1000).contains(&self.database.pool_size) {
            errs.push("database.pool_size must be between 1 and 1000".into());
        }
        if self.database.acquire_timeout_seconds == 0 || self.database.connect_timeout_seconds == 0
        {
            errs.push("database timeouts must be at least 1 second".into());
        }
        if let Some(url) = &self.database.url {
            let u = url.expose();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                // Never echo the URL: it may carry a password.
                errs.push(
                    "database.url (DATABASE_URL) must start with postgres:// or postgresql://"
                        .into(),
                );
            } else if u.parse::<tokio_postgres::Config>().is_err() {
                errs.push("database.url (DATABASE_URL) is not a valid PostgreSQL URL".into());
            }
        }
        if let Some(ca) = &self.database.tls_ca_file
            && !ca.is_file()
        {
            errs.push(format!(
                "database.tls_ca_file: {} does not exist",
                ca.display()
            ));
        }
        if let Some(key) = &self.encryption_key {
            if let Err(e) = decode_encryption_key(key.expose()) {
                errs.push(format!("encryption_key (MAILSCOPE_ENCRYPTION_KEY): {e}"));
            }
        } else if !self.embedded_database() {
            errs.push(
                "encryption_key (MAILSCOPE_ENCRYPTION_KEY) is required with an external database: \
                 base64 of 32 random bytes, e.g. `openssl rand -base64 32`"
                    .into(),
            );
        }
        let p = &self.propagation;
        if !(1..=20).contains(&p.required_matches) {
            errs.push("propagation.required_matches must be between 1 and 20".into());
        }
        if p.confirm_interval_ms == 0 {
            errs.push("propagation.confirm_interval_ms must be at least 1".into());
        }
        if p.first_delay_ms == 0 || p.max_delay_ms < p.first_delay_ms {
            errs.push(
                "propagation.first_delay_ms must be at least 1 and at most propagation.max_delay_ms"
                    .into(),
            );
        }
        if !(1.0..=10.0).contains(&p.backoff_factor) {
            errs.push("propagation.backoff_factor must be between 1 and 10".into());
        }
        if !(1..=30 * 86_400).contains(&p.deadline_seconds) {
            errs.push(
                "propagation.deadline_seconds must be between 1 and 2592000 (30 days)".into(),
            );
        }
        if !(1..=30 * 86_400).contains(&p.rbac_deadline_seconds) {
            errs.push(
                "propagation.rbac_deadline_seconds must be between 1 and 2592000 (30 days)".into(),
            );
        }
        if p.rbac_first_delay_ms == 0 || p.rbac_first_delay_ms / 1000 >= p.rbac_deadline_seconds {
            errs.push(
                "propagation.rbac_first_delay_ms must be at least 1 and end before propagation.rbac_deadline_seconds"
                    .into(),
            );
        }
        if !(1..=50).contains(&p.sample_size) {
            errs.push("propagation.sample_size must be between 1 and 50".into());
        }
        let a = &self.auth;
        match (&a.jwks_url, &a.hs256_secret) {
            (Some(_), Some(_)) => errs.push(
                "auth.jwks_url and auth.hs256_secret are exclusive: asymmetric keys and a shared \
                 secret must never both be accepted"
                    .into(),
            ),
            (None, None) if !self.embedded_database() => errs.push(
                "auth: set auth.jwks_url (MAILSCOPE_AUTH__JWKS_URL) for your identity provider, or \
                 auth.hs256_secret (MAILSCOPE_AUTH__HS256_SECRET) for local use"
                    .into(),
            ),
            _ => {}
        }
        if let Some(u) = &a.jwks_url
            && !(u.starts_with("https://") || u.starts_with("http://"))
        {
            errs.push(format!("auth.jwks_url: `{u}` must be an http(s) URL"));
        }
        if let Some(s) = &a.hs256_secret
            && s.expose().len() < 32
        {
            errs.push("auth.hs256_secret must be at least 32 characters".into());
        }
        if a.algorithms.is_empty() {
            errs.push("auth.algorithms must name at least one algorithm".into());
        }
        for alg in &a.algorithms {
            if !ALLOWED_JWKS_ALGORITHMS.contains(&alg.as_str()) {
                errs.push(format!(
                    "auth.algorithms: `{alg}` is not allowed (choose from {})",
                    ALLOWED_JWKS_ALGORITHMS.join(", ")
                ));
            }
        }
        if a.issuer.is_empty() || a.audience.is_empty() {
            errs.push("auth.issuer and auth.audience must not be empty".into());
        }
        for (name, v) in [
            ("auth.role_read", &a.role_read),
            ("auth.role_write", &a.role_write),
            ("auth.role_admin", &a.role_admin),
            ("auth.tenants_claim", &a.tenants_claim),
        ] {
            if v.is_empty() {
                errs.push(format!("{name} must not be empty"));
            }
        }
        if self.http.body_limit_bytes < 1024 {
            errs.push("http.body_limit_bytes must be at least 1024".into());
        }
        if self.http.workers == Some(0) {
            errs.push("http.workers must be at least 1".into());
        }
        if !(1..=256).contains(&self.worker.concurrency) {
            errs.push("worker.concurrency must be between 1 and 256".into());
        }
        if self.worker.per_tenant_concurrency < 1 {
            errs.push("worker.per_tenant_concurrency must be at least 1".into());
        }
        if !(3..=3600).contains(&self.worker.lease_seconds) {
            errs.push("worker.lease_seconds must be between 3 and 3600".into());
        }
        if !(1..=300).contains(&self.worker.poll_interval_seconds) {
            errs.push("worker.poll_interval_seconds must be between 1 and 300".into());
        }
        let p = &self.provisioning;
        if !(1..=730).contains(&p.max_secret_lifetime_days) {
            errs.push(
                "provisioning.max_secret_lifetime_days must be between 1 and 730 (Microsoft's two-year maximum)"
                    .into(),
            );
        }
        if !(1..=365).contains(&p.secret_expiring_soon_days) {
            errs.push("provisioning.secret_expiring_soon_days must be between 1 and 365".into());
        }
        if !(1..=86_400).contains(&p.rbac_migration_token_drain_seconds) {
            errs.push(
                "provisioning.rbac_migration_token_drain_seconds must be between 1 and 86400 (a day, the longest token lifetime Entra allows)"
                    .into(),
            );
        }
        if !(1..=86_400).contains(&p.credential_scan_interval_seconds) {
            errs.push(
                "provisioning.credential_scan_interval_seconds must be between 1 and 86400 (a day)"
                    .into(),
            );
        }
        errs.extend(self.webhooks.validate());
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(errs))
        }
    }
}

/// Environment values are typed like TOML scalars (numbers, booleans), otherwise strings.
fn parse_env_value(v: &str) -> figment::value::Value {
    use figment::value::Value;
    if let Ok(b) = v.parse::<bool>() {
        return Value::from(b);
    }
    if let Ok(n) = v.parse::<u64>() {
        return Value::from(n);
    }
    // Plain decimals too (`MAILSCOPE_PROPAGATION__BACKOFF_FACTOR=2.5`). Only short digit strings
    // with one point: a long digit string (a secret) or `inf`/`1e9` stays a string.
    if v.len() <= 20
        && v.bytes().filter(|b| *b == b'.').count() == 1
        && v.trim_start_matches('-')
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.')
        && let Ok(x) = v.parse::<f64>()
    {
        return Value::from(x);
    }
    if v.starts_with('[')
        && let Ok(list) = serde_json::from_str::<Vec<String>>(v)
    {
        return Value::from(list);
    }
    Value::from(v.to_string())
}

fn describe_figment_error(e: &figment::Error) -> String {
    let path = e.path.join(".");
    let kind = match &e.kind {
        figment::error::Kind::UnknownField(f, expected) => {
            // figment puts the unknown key itself at the end of the path; don't name it twice.
            let parent = e
                .path
                .split_last()
                .filter(|(last, _)| *last == f)
                .map_or(e.path.as_slice(), |(_, rest)| rest)
                .join(".");
            let full = |key: &str| {
                if parent.is_empty() {
                    key.to_string()
                } else {
                    format!("{parent}.{key}")
                }
            };
            let env =
                |key: &str| format!("MAILSCOPE_{}", key.to_ascii_uppercase().replace('.', "__"));
            let unknown = full(f);
            let hint = crate::domain::spelling::nearest(f, expected.iter().copied())
                .map(|k| {
                    let k = full(k);
                    format!("; did you mean `{k}` ({})?", env(&k))
                })
                .unwrap_or_default();
            return format!(
                "unknown setting `{unknown}` (environment variable {}){hint}",
                env(&unknown)
            );
        }
        other => other.to_string(),
    };
    if path.is_empty() {
        kind
    } else {
        format!("{path}: {kind}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::spelling::edit_distance;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    #[test]
    fn a_misspelled_key_is_named_once_with_the_nearest_real_one() {
        let e = Settings::load_from(None, env(&[("MAILSCOPE_LISTN", "x")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown setting `listn` (environment variable MAILSCOPE_LISTN)"),
            "{e}"
        );
        assert!(
            e.contains("did you mean `listen` (MAILSCOPE_LISTEN)?"),
            "{e}"
        );
        let e = Settings::load_from(None, env(&[("MAILSCOPE_PROPAGATION__FIRST_DELY_MS", "5")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown setting `propagation.first_dely_ms`"),
            "{e}"
        );
        assert!(
            e.contains(
                "did you mean `propagation.first_delay_ms` (MAILSCOPE_PROPAGATION__FIRST_DELAY_MS)?"
            ),
            "{e}"
        );
        let e = Settings::load_from(None, env(&[("MAILSCOPE_ZZZZZZZZZZ", "1")]))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("did you mean"), "nothing is close: {e}");
    }

    #[test]
    fn decimals_from_the_environment() {
        let s = Settings::load_from(
            None,
            env(&[("MAILSCOPE_PROPAGATION__BACKOFF_FACTOR", "2.5")]),
        )
        .unwrap();
        assert_eq!(s.propagation.backoff_factor, 2.5);
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("listn", "listen"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn defaults_are_valid_for_embedded_mode() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert!(s.embedded_database());
        assert_eq!(s.listen, "127.0.0.1:8080");
    }

    #[test]
    fn env_overrides_nested_values() {
        let s = Settings::load_from(
            None,
            env(&[
                ("MAILSCOPE_DATABASE__POOL_SIZE", "4"),
                ("MAILSCOPE_LOG_FORMAT", "json"),
                (
                    "MAILSCOPE_AUTH__HS256_SECRET",
                    "0123456789012345678901234567890123",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(s.database.pool_size, 4);
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(
            s.auth.hs256_secret.unwrap().expose(),
            "0123456789012345678901234567890123"
        );
    }

    #[test]
    fn propagation_settings_are_read_and_checked() {
        let s = Settings::load_from(
            None,
            env(&[
                ("MAILSCOPE_PROPAGATION__FIRST_DELAY_MS", "200"),
                ("MAILSCOPE_PROPAGATION__REQUIRED_MATCHES", "2"),
            ]),
        )
        .unwrap();
        assert_eq!(s.propagation.first_delay_ms, 200);
        assert_eq!(s.propagation.required_matches, 2);
        assert_eq!(s.propagation.deadline_seconds, 86_400);
        // RBAC: the documented cache of 30 minutes to 2 hours.
        assert_eq!(s.propagation.rbac_first_delay_ms, 1_800_000);
        assert_eq!(s.propagation.rbac_deadline_seconds, 14_400);
        let e = Settings::load_from(
            None,
            env(&[
                ("MAILSCOPE_PROPAGATION__FIRST_DELAY_MS", "900000"),
                ("MAILSCOPE_PROPAGATION__REQUIRED_MATCHES", "0"),
                ("MAILSCOPE_PROPAGATION__SAMPLE_SIZE", "0"),
                ("MAILSCOPE_PROPAGATION__RBAC_FIRST_DELAY_MS", "20000000"),
            ]),
        )
        .unwrap_err()
        .to_string();
        for part in [
            "propagation.first_delay_ms",
            "propagation.required_matches",
            "propagation.sample_size",
            "propagation.rbac_first_delay_ms",
        ] {
            assert!(e.contains(part), "{e}");
        }
    }

    #[test]
    fn unknown_variable_is_named() {
        let e =
            Settings::load_from(None, env(&[("MAILSCOPE_DATABASE__POOLSIZE", "4")])).unwrap_err();
        assert!(
            e.to_string().contains("MAILSCOPE_DATABASE__POOLSIZE"),
            "{e}"
        );
    }

    #[test]
    fn all_bad_values_reported_at_once_without_secrets() {
        let e = Settings::load_from(
            None,
            env(&[
                ("DATABASE_URL", "mysql://user:hunter2@x/db"),
                ("MAILSCOPE_LISTEN", "nowhere"),
                ("MAILSCOPE_DATABASE__POOL_SIZE", "0"),
            ]),
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("listen"));
        assert!(text.contains("pool_size"));
        assert!(text.contains("encryption_key"));
        assert!(text.contains("auth:"));
        assert!(!text.contains("hunter2"));
    }

    #[test]
    fn external_database_needs_key_and_auth() {
        let s = Settings::load_from(
            None,
            env(&[
                ("DATABASE_URL", "postgres://postgres@127.0.0.1/x"),
                ("MAILSCOPE_ENCRYPTION_KEY", KEY),
                ("MAILSCOPE_AUTH__JWKS_URL", "https://idp.example/keys"),
            ]),
        )
        .unwrap();
        assert!(!s.embedded_database());
    }

    #[test]
    fn jwks_and_hs256_are_exclusive() {
        let e = Settings::load_from(
            None,
            env(&[
                ("MAILSCOPE_AUTH__JWKS_URL", "https://idp.example/keys"),
                (
                    "MAILSCOPE_AUTH__HS256_SECRET",
                    "0123456789012345678901234567890123",
                ),
            ]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("exclusive"));
    }

    #[test]
    fn secrets_are_redacted_in_debug_and_serialization() {
        let s = Settings {
            encryption_key: Some(Secret::new(KEY)),
            ..Settings::default()
        };
        assert!(!format!("{s:?}").contains(KEY));
        assert!(!serde_json::to_string(&s).unwrap().contains(KEY));
    }

    #[test]
    fn file_layer_sits_between_defaults_and_env() {
        let dir = std::env::temp_dir().join(format!("mailscope-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "listen = \"0.0.0.0:9000\"\n[database]\npool_size = 3\n").unwrap();
        let s =
            Settings::load_from(Some(&f), env(&[("MAILSCOPE_DATABASE__POOL_SIZE", "5")])).unwrap();
        assert_eq!(s.listen, "0.0.0.0:9000");
        assert_eq!(s.database.pool_size, 5);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn secret_lifetime_limits_are_validated() {
        let s = Settings::load_from(
            None,
            env(&[("MAILSCOPE_PROVISIONING__MAX_SECRET_LIFETIME_DAYS", "90")]),
        )
        .unwrap();
        assert_eq!(s.provisioning.max_secret_lifetime_days, 90);
        assert_eq!(s.provisioning.secret_expiring_soon_days, 30);
        let err = Settings::load_from(
            None,
            env(&[
                ("MAILSCOPE_PROVISIONING__MAX_SECRET_LIFETIME_DAYS", "731"),
                ("MAILSCOPE_PROVISIONING__SECRET_EXPIRING_SOON_DAYS", "0"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("max_secret_lifetime_days"), "{err}");
        assert!(err.contains("secret_expiring_soon_days"), "{err}");
    }

    #[test]
    fn webhook_settings_load_from_env_and_are_validated_without_echoing_the_secret() {
        let s = Settings::load_from(
            None,
            env(&[
                (
                    "MAILSCOPE_WEBHOOKS__SIGNING_SECRET",
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                ),
                (
                    "MAILSCOPE_WEBHOOKS__ALLOWED_HOSTS",
                    r#"["hooks.example.com","*.partner.test"]"#,
                ),
            ]),
        )
        .unwrap();
        assert_eq!(s.webhooks.allowed_hosts.len(), 2);
        assert!(!s.webhooks.allow_http);
        let err = Settings::load_from(
            None,
            env(&[
                ("MAILSCOPE_WEBHOOKS__SIGNING_SECRET", "hunter2-not-a-whsec"),
                (
                    "MAILSCOPE_WEBHOOKS__ALLOWED_HOSTS",
                    r#"["https://x.test/"]"#,
                ),
                ("MAILSCOPE_WEBHOOKS__MAX_ATTEMPTS", "0"),
                ("MAILSCOPE_WEBHOOKS__TIMEOUT_SECONDS", "0"),
            ]),
        )
        .unwrap_err()
        .to_string();
        for name in [
            "webhooks.signing_secret",
            "webhooks.allowed_hosts",
            "webhooks.max_attempts",
            "webhooks.timeout_seconds",
        ] {
            assert!(err.contains(name), "{name} missing from {err}");
        }
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn encryption_key_length_checked() {
        assert!(decode_encryption_key("AAAA").is_err());
        assert!(decode_encryption_key(KEY).is_ok());
    }
}
