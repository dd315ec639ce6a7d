//! The `webhook_delivery` job: sign and POST one stored callback, record the attempt on its
//! `webhook_deliveries` row, and decide what comes next. Network errors, 408, 429 and 5xx retry
//! with the queue's backoff (or at the receiver's `Retry-After`); other answers give up.
//! Signing, settings and the SSRF checks live in `crate::webhooks`.
use std::time::{Duration, Instant};

use chrono::Utc;
use uuid::Uuid;

use crate::provisioning::Error;
use crate::queue::job::Job;
use crate::queue::worker::{JobContext, Outcome};
use crate::store::StoreError;
use crate::webhooks::signing::{sign, signing_keys};
use crate::webhooks::url::{Refusal, resolve_checked, validate_callback_url};
use crate::webhooks::{self, Delivery, DeliveryAttempt, DeliveryState, WebhookSettings};

/// A receiver's `Retry-After` is honoured up to this long; beyond it the queue's backoff applies.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What one attempt came to.
enum Verdict {
    Delivered,
    Retry {
        error: String,
        after: Option<Duration>,
    },
    GiveUp(String),
}

impl Job for Delivery {
    type Context = WebhookSettings;

    async fn run(self, settings: &WebhookSettings, ctx: &JobContext) -> Outcome {
        let id = self.delivery_id;
        let row = match ctx.pool.get().await {
            Ok(c) => webhooks::load(&c, id).await,
            Err(e) => Err(StoreError::from(e)),
        };
        let row = match row {
            Ok(Some(r)) => r,
            Ok(None) => return Outcome::Fail("the delivery no longer exists".into()),
            Err(e) => return store_outcome("reading the delivery", e),
        };
        if row.state != "pending" {
            return Outcome::Succeeded(serde_json::json!({ "state": row.state }));
        }

        let started = Instant::now();
        let at = Utc::now();
        let verdict = attempt(settings, id, &row.url, &row.body).await;
        let (status_code, error) = match &verdict.1 {
            Verdict::Delivered => (verdict.0, None),
            Verdict::Retry { error, .. } | Verdict::GiveUp(error) => {
                (verdict.0, Some(error.clone()))
            }
        };
        let record = DeliveryAttempt {
            at,
            status_code,
            error: error.clone(),
            duration_ms: started.elapsed().as_millis() as u64,
        };
        let recorded = match ctx.pool.get().await {
            Ok(c) => webhooks::record_attempt(&c, id, &record).await,
            Err(e) => Err(StoreError::from(e)),
        };
        let attempts = match recorded {
            Ok(n) => n,
            // The attempt happened but cannot be written: retrying re-sends under the same
            // webhook-id, which receivers dedupe.
            Err(e) => return store_outcome("recording the attempt", e),
        };
        let finish = |state: DeliveryState| {
            let pool = ctx.pool.clone();
            async move {
                if let Ok(c) = pool.get().await
                    && let Err(e) = webhooks::finish(&c, id, state).await
                {
                    tracing::warn!(delivery = %id, error = %e, "could not record the delivery's end");
                }
            }
        };
        match verdict.1 {
            Verdict::Delivered => {
                finish(DeliveryState::Delivered).await;
                tracing::info!(delivery = %id, attempts, "callback delivered");
                Outcome::Succeeded(serde_json::json!({ "delivery_id": id, "attempts": attempts }))
            }
            Verdict::GiveUp(error) => {
                finish(DeliveryState::Failed).await;
                tracing::warn!(delivery = %id, attempts, error = %error, "callback refused; not retried");
                Outcome::Fail(error)
            }
            Verdict::Retry { error, .. } if attempts >= settings.max_attempts => {
                finish(DeliveryState::Failed).await;
                tracing::warn!(delivery = %id, attempts, error = %error, "callback failed; giving up");
                Outcome::Fail(format!("gave up after {attempts} attempts: {error}"))
            }
            Verdict::Retry {
                after: Some(after), ..
            } => Outcome::Reschedule {
                at: Utc::now() + chrono::Duration::from_std(after).unwrap_or_default(),
                payload: None,
            },
            Verdict::Retry { error, after: None } => Outcome::Retry(error),
        }
    }
}

/// A database failure around an attempt, through the one mapping to a job outcome.
fn store_outcome(doing: &str, e: StoreError) -> Outcome {
    match Error::from(e).job_outcome() {
        Outcome::Retry(m) => Outcome::Retry(format!("{doing}: {m}")),
        Outcome::Fail(m) => Outcome::Fail(format!("{doing}: {m}")),
        other => other,
    }
}

/// One signed POST. Returns the receiver's status (if any) and what to do next.
async fn attempt(
    settings: &WebhookSettings,
    id: Uuid,
    raw_url: &str,
    body: &str,
) -> (Option<u16>, Verdict) {
    let url = match validate_callback_url(raw_url, settings) {
        Ok(u) => u,
        Err(e) => return (None, Verdict::GiveUp(format!("callback URL refused: {e}"))),
    };
    let keys = match signing_keys(settings) {
        Ok(k) => k,
        // Validated at start; unreachable unless settings were built by hand.
        Err(e) => return (None, Verdict::GiveUp(e)),
    };
    let addrs = match resolve_checked(&url, settings).await {
        Ok(a) => a,
        Err(Refusal::Transient(e)) => {
            return (
                None,
                Verdict::Retry {
                    error: e,
                    after: None,
                },
            );
        }
        Err(Refusal::Permanent(e)) => return (None, Verdict::GiveUp(e)),
    };
    let host = url.host_str().unwrap_or_default().to_string();
    // A client per attempt, pinned to the addresses just checked (no second DNS lookup), with no
    // redirects (a 3xx could point anywhere) and no proxy from the environment.
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(settings.timeout_seconds))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .resolve_to_addrs(&host, &addrs)
        .user_agent(concat!(
            "mailscope/",
            env!("CARGO_PKG_VERSION"),
            " (webhooks)"
        ))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            return (
                None,
                Verdict::Retry {
                    error: format!("cannot build the HTTP client: {e}"),
                    after: None,
                },
            );
        }
    };
    let webhook_id = id.to_string();
    let timestamp = Utc::now().timestamp();
    let signature = keys
        .iter()
        .map(|k| sign(k, &webhook_id, timestamp, body.as_bytes()))
        .collect::<Vec<_>>()
        .join(" ");
    let res = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", &webhook_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body.to_string())
        .send()
        .await;
    let res = match res {
        Ok(r) => r,
        Err(e) => {
            // Without the URL: its query may carry the receiver's token.
            let e = e.without_url();
            let kind = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "connection failed"
            } else {
                "request failed"
            };
            return (
                None,
                Verdict::Retry {
                    error: format!("{kind}: {e}"),
                    after: None,
                },
            );
        }
    };
    let status = res.status();
    let retry_after = res
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
    (
        Some(status.as_u16()),
        classify(status.as_u16(), retry_after),
    )
}

/// What an answer means, after Standard Webhooks' guidance: 2xx delivered; 408, 429 and 5xx are
/// worth retrying; 3xx (redirects are not followed), 410 Gone and other 4xx will not change by
/// retrying.
fn classify(status: u16, retry_after: Option<Duration>) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        408 | 429 | 500..=599 => Verdict::Retry {
            error: format!("the receiver answered {status}"),
            after: retry_after.filter(|d| *d <= MAX_RETRY_AFTER),
        },
        300..=399 => Verdict::GiveUp(format!(
            "the receiver answered {status} (redirects are not followed; update the callback URL)"
        )),
        _ => Verdict::GiveUp(format!("the receiver answered {status}")),
    }
}

/// `Retry-After` as delay-seconds or an HTTP date.
fn parse_retry_after(v: &str, now: std::time::SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_like_standard_webhooks_suggests() {
        assert!(matches!(classify(204, None), Verdict::Delivered));
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(matches!(classify(s, None), Verdict::Retry { .. }), "{s}");
        }
        for s in [301, 400, 401, 404, 410, 422] {
            assert!(matches!(classify(s, None), Verdict::GiveUp(_)), "{s}");
        }
        let Verdict::Retry { after, .. } = classify(503, Some(Duration::from_secs(7))) else {
            panic!()
        };
        assert_eq!(after, Some(Duration::from_secs(7)));
        // An absurd Retry-After falls back to the queue's backoff.
        let Verdict::Retry { after, .. } = classify(429, Some(Duration::from_secs(86400))) else {
            panic!()
        };
        assert_eq!(after, None);
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("30", now), Some(Duration::from_secs(30)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
