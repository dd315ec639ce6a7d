//! The lease of a natural key (an application's registration, a tenant's access policies or RBAC
//! restrictions) for a use case that must be its only writer on every replica while it calls
//! Microsoft, without holding a pooled connection, a transaction or an advisory lock meanwhile.
//!
//! [`KeyLease::take`] first queues behind this process's other writers of the key (`locks`, so a
//! burst of requests for one key costs one connection at a time, briefly), then takes the lease in
//! one short statement (`store::key_leases`), waiting while another live process holds it. The use
//! case then reads what it needs in short statements, calls Microsoft, and records its result in
//! one short transaction that starts with [`KeyLease::confirm`]: the lease row locked and still
//! carrying this lease's token, or nothing is written. The lease ends when the guard drops.
//!
//! A holder that dies (its process's liveness lock ends with its connection) is taken over at
//! once; one that is alive but cut off keeps the key until `locked_until`, which its renewal task
//! pushes on every minute while it works.
use std::time::{Duration, Instant};

use deadpool_postgres::{GenericClient, Pool};
use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

use super::{Error, Services};
use crate::store::{StoreError, key_leases};

/// How long a lease lasts without renewal: longer than any one use case's Microsoft calls take
/// between two renewals.
const HOLD_FOR: Duration = Duration::from_secs(600);
/// How often a holder pushes `locked_until` on while it works.
const RENEW_EVERY: Duration = Duration::from_secs(60);
/// How long a request waits for another process's lease before it answers `object_busy`.
const WAIT_AT_MOST: Duration = Duration::from_secs(60);

/// A held lease; dropping it gives the key back (also when the request is cancelled).
pub struct KeyLease {
    name: String,
    token: Uuid,
    pool: Pool,
    renewal: tokio::task::JoinHandle<()>,
    /// This process's turn at the key: the next writer here waits for it, then takes the lease
    /// row over at once (it names this process) whether or not its release has run yet.
    _turn: OwnedMutexGuard<()>,
}

impl KeyLease {
    /// Take the lease of `key` in `namespace` (e.g. `application`, `tenant/key`).
    pub async fn take(services: &Services, namespace: &str, key: &str) -> Result<Self, Error> {
        let name = format!("{namespace}:{key}");
        let turn = services.key_locks.lock(name.clone()).await;
        services.liveness.ensure(&services.pool).await?;
        let token = Uuid::new_v4();
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            let taken = {
                let db = services.db().await?;
                key_leases::try_take(&db, &name, services.liveness.id(), token, HOLD_FOR).await?
            };
            if taken {
                break;
            }
            if started.elapsed() >= WAIT_AT_MOST {
                // Retryable: the other process's work ends, or its lease lapses.
                return Err(Error::Busy(format!(
                    "another mailscope process has been changing `{name}` in the tenant for over \
                     {} s; repeat this request once it has finished",
                    WAIT_AT_MOST.as_secs()
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
        let renewal = {
            let (pool, name) = (services.pool.clone(), name.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(RENEW_EVERY).await;
                    let renewed = match pool.get().await {
                        Ok(c) => key_leases::renew(&c, &name, token, HOLD_FOR).await,
                        Err(e) => Err(StoreError::from(e)),
                    };
                    match renewed {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => {
                            tracing::warn!(lease = %name, error = %e, "could not renew a key lease")
                        }
                    }
                }
            })
        };
        Ok(KeyLease {
            name,
            token,
            pool: services.pool.clone(),
            renewal,
            _turn: turn,
        })
    }

    /// First statement of the transaction that records the use case's result: lock the lease row,
    /// and refuse (nothing written) if another process took the key over meanwhile.
    pub async fn confirm(&self, tx: &impl GenericClient) -> Result<(), Error> {
        if key_leases::still_held(tx, &self.name, self.token).await? {
            return Ok(());
        }
        Err(Error::conflict(format!(
            "another mailscope process took over {} while this request was calling Microsoft \
             (this one was presumed dead); nothing was recorded: repeat the request",
            self.name
        )))
    }
}

impl Drop for KeyLease {
    fn drop(&mut self) {
        self.renewal.abort();
        let (pool, name, token) = (self.pool.clone(), self.name.clone(), self.token);
        // Another writer in this process may take the key over at once (the row names this
        // process); other processes wait for the row to go. Best effort: should this fail, the
        // row lapses at `locked_until`, or as soon as this process ends.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let released = match pool.get().await {
                    Ok(c) => key_leases::release(&c, &name, token).await,
                    Err(e) => Err(StoreError::from(e)),
                };
                if let Err(e) = released {
                    tracing::warn!(lease = %name, error = %e, "could not give a key lease back");
                }
            });
        }
    }
}
