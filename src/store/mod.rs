//! PostgreSQL access: the connection pool, migrations, the embedded development cluster, and one
//! file of SQL per resource. This layer's error type separates "the database is unavailable"
//! (answered 503, retried by clients) from everything else.
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

pub mod access_grants;
pub mod access_policies;
pub mod applications;
pub mod audit;
pub mod embedded;
pub mod key_leases;
pub mod liveness;
pub mod local_secrets;
pub mod migrate;
pub mod propagation_checks;
pub mod rbac_migrations;
pub mod rbac_restrictions;
pub mod scope_groups;
pub mod settings;
pub mod step_runs;
pub mod tenants;

pub use settings::DatabaseSettings;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Pool exhausted, connection refused or lost, server shutting down.
    #[error("database unavailable: {0}")]
    Unavailable(anyhow::Error),
    #[error(transparent)]
    Other(anyhow::Error),
}

impl From<PoolError> for StoreError {
    fn from(e: PoolError) -> Self {
        // Any failure to obtain a connection (timeout, refused, rejected login, database not
        // accepting connections) means the database is unavailable to us right now.
        StoreError::Unavailable(anyhow::Error::new(e))
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        if is_unavailable(&e) {
            StoreError::Unavailable(e.into())
        } else {
            StoreError::Other(e.into())
        }
    }
}

/// Connection-level failures (SQLSTATE classes 08 and 57P, too many connections, closed socket),
/// and transactions the server aborted only because of what ran beside them (a deadlock, a
/// serialization failure): the same request succeeds when it is sent again, and every write
/// here is idempotent, so callers are told to retry (503) rather than handed a 500.
fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08")
                || code.starts_with("57P")
                || code == "53300"
                || code == "40P01"
                || code == "40001"
        }
        // No server error attached: an I/O or protocol failure talking to the server.
        None => true,
    }
}

/// Take a transaction-scoped advisory lock on (namespace, key): serialises writers of one
/// logical object even before its row exists.
pub async fn lock_key(
    c: &impl deadpool_postgres::GenericClient,
    namespace: &str,
    key: &str,
) -> Result<(), StoreError> {
    c.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&format!("{namespace}:{key}")],
    )
    .await?;
    Ok(())
}

/// The SQLSTATE of a database error, for mapping constraint violations at the call site.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.as_db_error().map(|d| d.code().code())
}

/// TLS for `sslmode=require`: rustls with the WebPKI roots (plus `database.tls_ca_file`), always
/// verifying the certificate and host name — stricter than libpq's `require`, on purpose.
/// Other modes connect in plain text: `prefer` must not fail against the self-signed
/// certificate a default Debian cluster offers on loopback.
pub fn tls_connector(
    cfg: &tokio_postgres::Config,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<Option<tokio_postgres_rustls::MakeRustlsConnect>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    if cfg.get_ssl_mode() != tokio_postgres::config::SslMode::Require {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(path)
            .map_err(|e| anyhow::anyhow!("database.tls_ca_file {}: {e}", path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("database.tls_ca_file {}: {e}", path.display()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        anyhow::ensure!(
            added > 0,
            "database.tls_ca_file {} holds no usable certificate",
            path.display()
        );
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
}

/// One connection outside the pool (migrations), with the same TLS rules as the pool.
pub async fn connect_one(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
    let cfg: tokio_postgres::Config = url.parse()?;
    Ok(match tls_connector(&cfg, ca_file)? {
        Some(tls) => {
            let (client, conn) = cfg.connect(tls).await?;
            (
                client,
                tokio::spawn(async move {
                    let _ = conn.await;
                }),
            )
        }
        None => {
            let (client, conn) = cfg.connect(NoTls).await?;
            (
                client,
                tokio::spawn(async move {
                    let _ = conn.await;
                }),
            )
        }
    })
}

pub fn create_pool(url: &str, settings: &DatabaseSettings) -> anyhow::Result<Pool> {
    let mut cfg: tokio_postgres::Config = url.parse()?;
    cfg.connect_timeout(Duration::from_secs(settings.connect_timeout_seconds));
    cfg.application_name("mailscope");
    // `Fast` recycling notices sockets closed by a restarted server, so the pool heals by itself.
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let mgr = match tls_connector(&cfg, settings.tls_ca_file.as_deref())? {
        Some(tls) => Manager::from_config(cfg, tls, manager_config),
        None => Manager::from_config(cfg, NoTls, manager_config),
    };
    let wait = Duration::from_secs(settings.acquire_timeout_seconds);
    Ok(Pool::builder(mgr)
        .max_size(settings.pool_size)
        .wait_timeout(Some(wait))
        .create_timeout(Some(Duration::from_secs(settings.connect_timeout_seconds)))
        .recycle_timeout(Some(Duration::from_secs(settings.connect_timeout_seconds)))
        .runtime(Runtime::Tokio1)
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_only_for_sslmode_require() {
        let plain: tokio_postgres::Config = "postgres://u@h/db".parse().unwrap();
        assert!(tls_connector(&plain, None).unwrap().is_none());
        let prefer: tokio_postgres::Config = "postgres://u@h/db?sslmode=prefer".parse().unwrap();
        assert!(tls_connector(&prefer, None).unwrap().is_none());
        let require: tokio_postgres::Config = "postgres://u@h/db?sslmode=require".parse().unwrap();
        assert!(tls_connector(&require, None).unwrap().is_some());
    }

    #[test]
    fn a_ca_file_without_certificates_is_an_error() {
        let require: tokio_postgres::Config = "postgres://u@h/db?sslmode=require".parse().unwrap();
        let f = std::env::temp_dir().join(format!("mailscope-ca-{}.pem", uuid::Uuid::new_v4()));
        std::fs::write(&f, "not a certificate").unwrap();
        assert!(tls_connector(&require, Some(&f)).is_err());
        std::fs::remove_file(f).unwrap();
    }
}
