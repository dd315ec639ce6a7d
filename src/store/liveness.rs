//! This process's liveness, as other processes can see it: a session-level advisory lock held on
//! one connection taken out of the pool for the life of the process. When the process dies, its
//! connection closes and PostgreSQL releases the lock at once, so work it claimed (an
//! `Idempotency-Key` in progress) can be taken over without waiting for a lease to lapse.
//!
//! Inside the process, the claims that are still running are kept in a set: a claim whose task
//! ended without releasing it (cancelled, panicked) is no longer in the set, so it is dead too.
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use deadpool_postgres::{Object, Pool};

use super::StoreError;

/// The first key of the two-key advisory lock space that holds process leases (the one-key space,
/// which `lock_key` and the migrations use, does not overlap it). "msLv".
pub const LOCK_CLASS: i32 = 0x6d73_4c76;

/// SQL: is the lease of the process whose id is `$n` held by a live session in this database?
pub fn alive_sql(holder: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
                    AND classid = {LOCK_CLASS}::oid AND objid = ({holder})::oid AND objsubid = 2
                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
    )
}

pub struct Liveness {
    /// This process's id among the processes sharing the database (the lock's second key).
    id: i32,
    session: tokio::sync::Mutex<Option<deadpool_postgres::ClientWrapper>>,
    held: Arc<Mutex<HashSet<String>>>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            // Positive, so that its `oid` in pg_locks equals the integer recorded in rows.
            id: (rand::random::<u32>() >> 1) as i32,
            session: tokio::sync::Mutex::new(None),
            held: Default::default(),
        }
    }
}

/// A running claim; dropping it (on completion or cancellation) ends the claim in this process.
pub struct Held {
    key: String,
    held: Arc<Mutex<HashSet<String>>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

impl Liveness {
    pub fn id(&self) -> i32 {
        self.id
    }

    /// Make sure the lease is held (again, after a lost connection) before claiming work under it.
    pub async fn ensure(&self, pool: &Pool) -> Result<(), StoreError> {
        let mut session = self.session.lock().await;
        if session.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        // A connection of its own, out of the pool's accounting: it lives as long as the process.
        let client = Object::take(pool.get().await?);
        let got: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2)",
                &[&LOCK_CLASS, &self.id],
            )
            .await?
            .get(0);
        if !got {
            // Another live process drew the same id (one chance in 2^31): claiming under it would
            // let each take over the other's work. Refuse rather than guess.
            return Err(StoreError::Other(anyhow::anyhow!(
                "process lease {} is held by another process",
                self.id
            )));
        }
        *session = Some(client);
        Ok(())
    }

    /// Claim `key` in this process; `None` while another task of this process runs it.
    pub fn hold(&self, key: String) -> Option<Held> {
        let mut set = self.held.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(key.clone()).then(|| Held {
            key,
            held: self.held.clone(),
        })
    }
}
