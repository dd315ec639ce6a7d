//! Per-tenant, per-service admission control shared by every caller in the process.
//!
//! Each (tenant, service) pair gets its own concurrency limit (a semaphore), rate budget (a token
//! bucket) and "paused until" instant set by `Retry-After`. Being per tenant is the point: a busy
//! tenant waits on its own budget and cannot starve the others, and when Microsoft throttles a
//! tenant no caller sends to that tenant again before the time it named.
use super::error::Service;
use super::settings::M365Settings;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Admission for one (tenant, service).
#[derive(Debug)]
pub(crate) struct TenantLimiter {
    permits: Arc<Semaphore>,
    bucket: Mutex<Bucket>,
    rate: f64,
    burst: f64,
    paused_until: Mutex<Option<Instant>>,
}

impl TenantLimiter {
    fn new(concurrency: usize, rate: f64, burst: u32) -> Self {
        TenantLimiter {
            permits: Arc::new(Semaphore::new(concurrency)),
            bucket: Mutex::new(Bucket {
                tokens: f64::from(burst),
                last: Instant::now(),
            }),
            rate,
            burst: f64::from(burst),
            paused_until: Mutex::new(None),
        }
    }

    /// Wait for any pause, a concurrency slot and a rate token, in that order. The permit is held
    /// for the duration of one HTTP attempt (never across a backoff sleep).
    pub(crate) async fn admit(&self) -> OwnedSemaphorePermit {
        loop {
            self.wait_pause().await;
            // The semaphore is never closed, so acquire cannot fail; if it ever did, retry.
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                tokio::task::yield_now().await;
                continue;
            };
            // A throttle may have arrived while we queued for the slot.
            if self.pause_remaining().is_some() {
                drop(permit);
                continue;
            }
            let wait = self.take_token();
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
                // A throttle may have arrived while we waited for the rate budget: sending now
                // would be a call before its Retry-After.
                if self.pause_remaining().is_some() {
                    drop(permit);
                    continue;
                }
            }
            return permit;
        }
    }

    /// Reservation-style token bucket: take a token now, possibly going into debt, and sleep
    /// until the debt is repaid. FIFO-ish and lock-free while sleeping.
    fn take_token(&self) -> Duration {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.last = now;
        b.tokens -= 1.0;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / self.rate)
        }
    }

    fn pause_remaining(&self) -> Option<Duration> {
        let p = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        p.and_then(|t| {
            let now = Instant::now();
            (t > now).then(|| t - now)
        })
    }

    async fn wait_pause(&self) {
        while let Some(d) = self.pause_remaining() {
            tokio::time::sleep(d).await;
        }
    }

    /// Hold every caller of this tenant/service until `until` (only ever extends a pause).
    pub(crate) fn pause_until(&self, until: Instant) {
        let mut p = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if p.is_none_or(|cur| cur < until) {
            *p = Some(until);
        }
    }
}

/// All limiters of the process, created on first use.
#[derive(Debug)]
pub(crate) struct Limiters {
    map: Mutex<HashMap<(String, Service), Arc<TenantLimiter>>>,
    settings: M365Settings,
}

impl Limiters {
    pub(crate) fn new(settings: &M365Settings) -> Self {
        Limiters {
            map: Mutex::new(HashMap::new()),
            settings: settings.clone(),
        }
    }

    pub(crate) fn get(&self, tenant: &str, service: Service) -> Arc<TenantLimiter> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let key = (tenant.to_ascii_lowercase(), service);
        map.entry(key)
            .or_insert_with(|| {
                let s = &self.settings;
                Arc::new(match service {
                    Service::Exchange => TenantLimiter::new(
                        s.exchange_concurrency_per_tenant,
                        s.exchange_rate_per_sec,
                        s.exchange_burst,
                    ),
                    // Token requests share Graph's budget: they are rare and cheap.
                    Service::Graph | Service::Login => TenantLimiter::new(
                        s.graph_concurrency_per_tenant,
                        s.graph_rate_per_sec,
                        s.graph_burst,
                    ),
                })
            })
            .clone()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is fine in tests (developers' guide)
mod tests {
    use super::*;

    #[test]
    fn bucket_goes_into_debt_after_burst() {
        let l = TenantLimiter::new(10, 2.0, 2);
        assert!(l.take_token().is_zero());
        assert!(l.take_token().is_zero());
        let w3 = l.take_token();
        let w4 = l.take_token();
        // At 2/s the third waits about half a second and the fourth about a second.
        assert!(
            w3 > Duration::from_millis(300) && w3 <= Duration::from_millis(500),
            "{w3:?}"
        );
        assert!(w4 > w3, "{w4:?}");
    }

    #[test]
    fn pause_only_extends() {
        let l = TenantLimiter::new(10, 100.0, 100);
        let start = Instant::now();
        l.pause_until(start + Duration::from_secs(30));
        l.pause_until(start + Duration::from_secs(1));
        let left = l.pause_remaining().unwrap();
        assert!(left > Duration::from_secs(20));
    }

    #[tokio::test]
    async fn a_throttle_during_the_rate_wait_holds_the_caller() {
        let l = Arc::new(TenantLimiter::new(10, 10.0, 1));
        drop(l.admit().await);
        let start = Instant::now();
        // The next caller owes ~100 ms of rate budget; a 429 arrives while it waits.
        let waiter = tokio::spawn({
            let l = l.clone();
            async move {
                let _p = l.admit().await;
                Instant::now()
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        l.pause_until(start + Duration::from_millis(400));
        let admitted = waiter.await.unwrap();
        // A lower bound only: never admitted before the pause ends.
        assert!(admitted >= start + Duration::from_millis(400));
    }

    #[tokio::test]
    async fn tenants_do_not_share_budgets() {
        let ls = Limiters::new(&M365Settings {
            exchange_concurrency_per_tenant: 1,
            ..Default::default()
        });
        let a = ls.get("tenant-a", Service::Exchange);
        let _held = a.admit().await;
        // Tenant b is admitted although tenant a's only slot is taken...
        let b = ls.get("TENANT-B", Service::Exchange);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), b.admit())
                .await
                .is_ok()
        );
        // ...while tenant a's next caller waits for the slot.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), a.admit())
                .await
                .is_err()
        );
    }
}
