//! Per-key async locks inside this process, taken before a handler asks the pool for a connection.
//!
//! The PostgreSQL advisory lock (`store::lock_key`) is what serialises writers of one natural key
//! across replicas; but a request blocked on it holds a pooled connection the whole time, so fifty
//! concurrent requests for one key would exhaust the pool. Queuing them here first means only the
//! one doing the work holds a connection; the advisory lock then costs nothing in the common case.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::OwnedMutexGuard;

#[derive(Default)]
pub struct KeyLocks {
    map: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl KeyLocks {
    /// Wait for the key; released when the guard drops (also when the request is cancelled).
    pub async fn lock(&self, key: String) -> OwnedMutexGuard<()> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            // Forget keys nobody holds or waits for, so the map stays as small as the work.
            map.retain(|_, w| w.strong_count() > 0);
            match map.get(&key).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key, Arc::downgrade(&m));
                    m
                }
            }
        };
        m.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_per_key_and_entries_are_dropped() {
        let locks = Arc::new(KeyLocks::default());
        let g = locks.lock("a".into()).await;
        // Another key is free.
        drop(locks.lock("b".into()).await);
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { drop(l2.lock("a".into()).await) });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(g);
        waiter.await.unwrap();
        drop(locks.lock("c".into()).await);
        assert_eq!(
            locks.map.lock().unwrap().len(),
            1,
            "only the last key is still listed"
        );
    }
}
