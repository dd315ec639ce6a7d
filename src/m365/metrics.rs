//! Prometheus metrics of the connector, registered into the caller's registry.
//!
//! Labels are low-cardinality by construction: `operation` is a name chosen in code
//! (`applications.get`, `InvokeCommand:Get-Mailbox`), never a URL, and `tenant` is the configured
//! tenant id. The lead owns the process registry; tests pass a fresh one.
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    /// One per HTTP attempt, by outcome (`ok` or the error code).
    pub calls: IntCounterVec,
    /// Latency of one HTTP attempt.
    pub latency: HistogramVec,
    /// Retries scheduled, by reason (error code or `token_refresh`).
    pub retries: IntCounterVec,
    /// Throttling answers (429 or Exchange concurrency limit).
    pub throttles: IntCounterVec,
}

impl Metrics {
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let calls = IntCounterVec::new(
            Opts::new(
                "m365_calls_total",
                "HTTP attempts to Microsoft 365 by outcome",
            ),
            &["tenant", "service", "operation", "outcome"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "m365_call_duration_seconds",
                "Latency of one HTTP attempt to Microsoft 365",
            )
            .buckets(vec![
                0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 90.0,
            ]),
            &["tenant", "service", "operation"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "m365_retries_total",
                "Retries of Microsoft 365 calls by reason",
            ),
            &["tenant", "service", "operation", "reason"],
        )?;
        let throttles = IntCounterVec::new(
            Opts::new(
                "m365_throttled_total",
                "Throttling answers from Microsoft 365",
            ),
            &["tenant", "service", "operation"],
        )?;
        registry.register(Box::new(calls.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(throttles.clone()))?;
        Ok(Metrics {
            calls,
            latency,
            retries,
            throttles,
        })
    }
}
