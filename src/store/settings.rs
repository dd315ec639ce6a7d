//! The database's settings, owned by the layer that uses them (`config` assembles them into
//! `Settings`).
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::domain::secret::Secret;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://…` URL. When absent, `serve` runs an embedded PostgreSQL in `data_dir`.
    pub url: Option<Secret>,
    pub pool_size: usize,
    /// How long a request waits for a pooled connection before answering 503.
    pub acquire_timeout_seconds: u64,
    pub connect_timeout_seconds: u64,
    /// Where the embedded cluster and generated local secrets live.
    pub data_dir: PathBuf,
    /// Apply migrations when `serve` starts.
    pub migrate_on_start: bool,
    /// Extra CA certificates (PEM) trusted for `sslmode=require`, e.g. a cloud provider's RDS CA.
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: None,
            pool_size: 16,
            acquire_timeout_seconds: 5,
            connect_timeout_seconds: 5,
            data_dir: PathBuf::from(".mailscope"),
            migrate_on_start: true,
            tls_ca_file: None,
        }
    }
}
