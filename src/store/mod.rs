//! PostgreSQL access: the connection pool, migrations, the embedded development cluster, and one
//! file of SQL per resource. This layer's error type separates "the database is unavailable"
//! (answered 503, retried by clients) from everything else.
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::config::DatabaseSettings;

pub mod access_policies;
pub mod audit;
pub mod embedded;
pub mod local_secrets;
pub mod migrate;
pub mod scope_groups;
pub mod tenants;

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

/// Connection-level failures (SQLSTATE classes 08 and 57P, too many connections, closed socket).
fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08") || code.starts_with("57P") || code == "53300"
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

pub fn create_pool(url: &str, settings: &DatabaseSettings) -> anyhow::Result<Pool> {
    let mut cfg: tokio_postgres::Config = url.parse()?;
    cfg.connect_timeout(Duration::from_secs(settings.connect_timeout_seconds));
    cfg.application_name("mailscope");
    let mgr = Manager::from_config(
        cfg,
        NoTls,
        // `Fast` recycling notices sockets closed by a restarted server, so the pool heals by itself.
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let wait = Duration::from_secs(settings.acquire_timeout_seconds);
    Ok(Pool::builder(mgr)
        .max_size(settings.pool_size)
        .wait_timeout(Some(wait))
        .create_timeout(Some(Duration::from_secs(settings.connect_timeout_seconds)))
        .recycle_timeout(Some(Duration::from_secs(settings.connect_timeout_seconds)))
        .runtime(Runtime::Tokio1)
        .build()?)
}
