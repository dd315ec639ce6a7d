//! Signed callbacks: when something a caller waits for ends (a propagation check), mailscope POSTs
//! a JSON event to the caller's URL the way [Standard Webhooks](https://www.standardwebhooks.com/)
//! describes it, so any receiver library for that format verifies it:
//!
//! - headers `webhook-id` (the delivery id, the same on every retry so receivers can dedupe),
//!   `webhook-timestamp` (Unix seconds of this attempt) and `webhook-signature`
//!   (`v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}` keyed by the `whsec_` secret);
//! - body `{"type", "timestamp", "data"}`, stored once so every attempt sends the same bytes.
//!
//! Deliveries ride the job queue: [`enqueue_delivery`] writes a `webhook_deliveries` row and a
//! `webhook_delivery` job in the caller's transaction; the handler retries network errors, 408,
//! 429 and 5xx with the queue's backoff (or the receiver's `Retry-After`), gives up on other
//! answers, and records every attempt on the row for [`deliveries_for`].
//!
//! Callback URLs come from API callers, so they are an SSRF vector: [`validate_callback_url`]
//! refuses non-https URLs, credentials in the URL, hosts outside the allow-list, and addresses in
//! private, loopback, link-local, CGNAT, multicast or reserved ranges. At delivery time the host
//! is resolved again, every address checked, and the connection pinned to the checked addresses,
//! so a DNS answer that changes between the check and the connection cannot reach inside.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use hmac::{Hmac, Mac};
use reqwest::Url;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

use crate::config::{Secret, WebhookSettings};
use crate::queue::worker::{JobContext, Outcome, Worker};
use crate::queue::{self, NewJob};
use crate::store::StoreError;

/// The job kind that delivers one callback.
pub const JOB_KIND: &str = "webhook_delivery";
/// The data-directory file holding the generated signing secret (embedded mode).
pub const SIGNING_SECRET_FILE: &str = "webhook-signing.secret";
const SECRET_PREFIX: &str = "whsec_";
/// A receiver's `Retry-After` is honoured up to this long; beyond it the queue's backoff applies.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
const JOB_MAX_FAILURES: i32 = 100;

/// Decode a `whsec_…` secret into the HMAC key (24 to 64 bytes, as the specification asks).
pub fn decode_signing_secret(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret
        .trim()
        .strip_prefix(SECRET_PREFIX)
        .ok_or("must start with `whsec_` (the Standard Webhooks format)")?;
    let key = B64
        .decode(b64)
        .map_err(|_| "must be `whsec_` followed by base64".to_string())?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!(
            "must decode to 24 to 64 bytes, got {}; e.g. `whsec_$(openssl rand -base64 32)`",
            key.len()
        ));
    }
    Ok(key)
}

/// Turn the generated local secret (plain base64 in the data directory) into the `whsec_` form.
pub fn local_signing_secret(raw: &Secret) -> Secret {
    let v = raw.expose();
    if v.starts_with(SECRET_PREFIX) {
        raw.clone()
    } else {
        Secret::new(format!("{SECRET_PREFIX}{v}"))
    }
}

/// The `webhook-signature` value for one attempt: `v1,<base64 HMAC-SHA256>` of
/// `{id}.{timestamp}.{body}`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

/// The current key first, then those being rotated out.
fn signing_keys(settings: &WebhookSettings) -> Result<Vec<Vec<u8>>, String> {
    let current = settings
        .signing_secret
        .as_ref()
        .ok_or("no signing secret is configured")?;
    std::iter::once(current)
        .chain(&settings.previous_signing_secrets)
        .map(|s| {
            decode_signing_secret(s.expose()).map_err(|_| "a signing secret is invalid".into())
        })
        .collect()
}

/// Check an allow-list entry: a host name, `*.suffix`, or an IP address; no scheme, port or path.
pub fn validate_host_pattern(p: &str) -> Result<(), String> {
    let name = p.strip_prefix("*.").unwrap_or(p);
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.parse::<IpAddr>().is_ok() {
        return if p.starts_with("*.") {
            Err("cannot be a wildcard of an IP address".into())
        } else {
            Ok(())
        };
    }
    let ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    });
    if ok {
        Ok(())
    } else {
        Err(
            "must be a host name, `*.example.com` or an IP address (no scheme, port or path)"
                .into(),
        )
    }
}

enum HostMatch {
    /// Not on the list (and the list is not empty).
    No,
    /// Allowed by the list being empty or by a `*.suffix` entry: public addresses only.
    Public,
    /// Named exactly: the operator vouches for it, private addresses included.
    Exact,
}

fn match_host(host: &str, settings: &WebhookSettings) -> HostMatch {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let mut wildcard = false;
    for entry in &settings.allowed_hosts {
        let entry = entry.to_ascii_lowercase();
        let bare = entry.trim_start_matches('[').trim_end_matches(']');
        if let Some(suffix) = entry.strip_prefix("*.") {
            if host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")) {
                wildcard = true;
            }
        } else if bare == host {
            return HostMatch::Exact;
        }
    }
    if wildcard || settings.allowed_hosts.is_empty() {
        HostMatch::Public
    } else {
        HostMatch::No
    }
}

/// Addresses a callback must never reach unless the operator lists them: this host, private
/// networks, link-local (cloud metadata at 169.254.169.254), CGNAT, multicast and reserved ranges.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4);
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) reaches the embedded IPv4 address.
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let o = v6.octets();
                return forbidden_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0 && s[1..6] == [0, 0, 0, 0, 0]) // IPv4-compatible ::/96
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    a == 0 // "this network"
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64.0.0/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || ip.is_documentation()
        || ip.is_multicast()
        || a >= 240 // reserved and broadcast
}

/// The host as an IP address, when it is one (the URL parser has already normalised spellings
/// such as `2130706433` or `0x7f.1` to dotted IPv4).
fn host_ip(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Validate a callback URL before accepting it (the API calls this on input, 422 on `Err`; the
/// delivery job calls it again, as settings may have changed). The error is for the caller.
pub fn validate_callback_url(raw: &str, settings: &WebhookSettings) -> Result<Url, String> {
    if settings.signing_secret.is_none() {
        return Err(
            "callbacks are not enabled on this server (webhooks.signing_secret is not set)".into(),
        );
    }
    let url = Url::parse(raw.trim()).map_err(|e| format!("not a valid URL: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if settings.allow_http => {}
        "http" => return Err("must use https".into()),
        other => return Err(format!("scheme `{other}` is not allowed; use https")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials (user:password@): receivers authenticate mailscope by the event's signature".into());
    }
    let host = url.host_str().ok_or("must name a host")?;
    let listed = match_host(host, settings);
    if matches!(listed, HostMatch::No) {
        return Err(format!(
            "host `{host}` is not in the allowed callback hosts (webhooks.allowed_hosts)"
        ));
    }
    if let Some(ip) = host_ip(&url)
        && is_forbidden_ip(ip)
        && !matches!(listed, HostMatch::Exact)
    {
        return Err(format!(
            "address {ip} is private, loopback, link-local or reserved"
        ));
    }
    if host.eq_ignore_ascii_case("localhost") && !matches!(listed, HostMatch::Exact) {
        return Err("host `localhost` is not allowed".into());
    }
    Ok(url)
}

/// Resolve the host and refuse if any address is forbidden (unless the host or that address is
/// listed exactly). Returns the addresses to pin the connection to.
async fn resolve_checked(
    url: &Url,
    settings: &WebhookSettings,
) -> Result<Vec<SocketAddr>, Refusal> {
    let host = url
        .host_str()
        .ok_or_else(|| Refusal::Permanent("the URL names no host".into()))?;
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = if let Some(ip) = host_ip(url) {
        vec![SocketAddr::new(ip, port)]
    } else {
        tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Refusal::Transient(format!("cannot resolve {host}: {e}")))?
            .collect()
    };
    if addrs.is_empty() {
        return Err(Refusal::Transient(format!("{host} resolved to no address")));
    }
    let exact_host = matches!(match_host(host, settings), HostMatch::Exact);
    for a in &addrs {
        let listed =
            exact_host || matches!(match_host(&a.ip().to_string(), settings), HostMatch::Exact);
        if is_forbidden_ip(a.ip()) && !listed {
            return Err(Refusal::Permanent(format!(
                "{host} resolves to {}, a private, loopback, link-local or reserved address",
                a.ip()
            )));
        }
    }
    Ok(addrs)
}

enum Refusal {
    Transient(String),
    Permanent(String),
}

/// Delivery states, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Not delivered yet; another attempt is queued.
    Pending,
    Delivered,
    /// Given up: a refusal by the receiver, a refused address, or too many attempts.
    Failed,
}

impl DeliveryState {
    fn parse(s: &str) -> Self {
        match s {
            "delivered" => DeliveryState::Delivered,
            "failed" => DeliveryState::Failed,
            _ => DeliveryState::Pending,
        }
    }
}

/// One attempt to deliver a callback.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryAttempt {
    pub at: DateTime<Utc>,
    /// The receiver's HTTP status, absent when no answer came (timeout, refused connection).
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// A callback delivery as the API shows it (never the signing secret, never the URL: it may carry
/// a token in its query, and the caller knows it).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeliveryStatus {
    /// Also the `webhook-id` header of every attempt.
    pub id: Uuid,
    pub event_type: String,
    pub state: DeliveryState,
    pub attempt_count: i32,
    pub attempts: Vec<DeliveryAttempt>,
    /// When the next attempt is due, while `pending`.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Queue a callback, in the caller's transaction: the event is sent iff the caller commits.
/// `subject_id` is what the event is about (a check id) and how [`deliveries_for`] finds it;
/// `event_type` is dot-separated (`propagation_check.completed`); `payload` becomes `data`.
/// The URL must have passed [`validate_callback_url`] when it was accepted.
pub async fn enqueue_delivery(
    tx: &impl GenericClient,
    tenant_id: Uuid,
    subject_id: Uuid,
    event_type: &str,
    url: &Url,
    payload: serde_json::Value,
) -> Result<Uuid, StoreError> {
    let id = Uuid::new_v4();
    let body = serde_json::json!({
        "type": event_type,
        "timestamp": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "data": payload,
    })
    .to_string();
    let mut job = NewJob::new(
        JOB_KIND,
        tenant_id,
        serde_json::json!({ "delivery_id": id }),
    );
    // The handler counts attempts on the row against `webhooks.max_attempts`; this is only the
    // backstop for workers that die mid-attempt (at the setting's upper bound).
    job.max_failures = JOB_MAX_FAILURES;
    let job_id = queue::enqueue(tx, &job).await?.id();
    tx.execute(
        "INSERT INTO webhook_deliveries (id, tenant_id, subject_id, event_type, url, body, job_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &id,
            &tenant_id,
            &subject_id,
            &event_type,
            &url.as_str(),
            &body,
            &job_id,
        ],
    )
    .await?;
    Ok(id)
}

/// The deliveries about `subject_id` within `tenant_id`, oldest first.
pub async fn deliveries_for(
    c: &impl GenericClient,
    tenant_id: Uuid,
    subject_id: Uuid,
) -> Result<Vec<DeliveryStatus>, StoreError> {
    let rows = c
        .query(
            // A job that ended without the handler recording it (its worker died on the last
            // allowed attempt, or it was cancelled) leaves the row pending: report it as failed.
            "SELECT d.id, d.event_type,
                    CASE WHEN d.state <> 'pending' THEN d.state
                         WHEN j.state = 'succeeded' THEN 'delivered'
                         WHEN j.state IN ('failed', 'cancelled') THEN 'failed'
                         ELSE d.state END,
                    d.attempt_count, d.attempts, d.created_at,
                    coalesce(d.finished_at, CASE WHEN d.state = 'pending' THEN j.finished_at END),
                    CASE WHEN d.state = 'pending' AND j.state = 'queued' THEN j.run_at END
             FROM webhook_deliveries d LEFT JOIN jobs j ON j.id = d.job_id
             WHERE d.tenant_id = $1 AND d.subject_id = $2
             ORDER BY d.created_at, d.id",
            &[&tenant_id, &subject_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| DeliveryStatus {
            id: r.get(0),
            event_type: r.get(1),
            state: DeliveryState::parse(r.get(2)),
            attempt_count: r.get(3),
            attempts: serde_json::from_value(r.get(4)).unwrap_or_default(),
            created_at: r.get(5),
            finished_at: r.get(6),
            next_attempt_at: r.get(7),
        })
        .collect())
}

/// Register the delivery handler on a worker.
pub fn register(worker: &mut Worker, settings: WebhookSettings) {
    let settings = std::sync::Arc::new(settings);
    worker.register(JOB_KIND, move |ctx| deliver(ctx, settings.clone()));
}

/// What one attempt came to.
enum Verdict {
    Delivered,
    Retry {
        error: String,
        after: Option<Duration>,
    },
    GiveUp(String),
}

async fn deliver(ctx: JobContext, settings: std::sync::Arc<WebhookSettings>) -> Outcome {
    let Some(id) = ctx
        .job
        .payload
        .get("delivery_id")
        .and_then(|v| v.as_str())
        .and_then(|s| s.parse::<Uuid>().ok())
    else {
        return Outcome::Fail("the job names no delivery".into());
    };
    let row = match ctx.pool.get().await {
        Ok(c) => c
            .query_opt(
                "SELECT url, body, state FROM webhook_deliveries WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let (url, body, state): (String, String, String) = match row {
        Ok(Some(r)) => (r.get(0), r.get(1), r.get(2)),
        Ok(None) => return Outcome::Fail("the delivery no longer exists".into()),
        Err(e) => return Outcome::Retry(format!("reading the delivery: {e}")),
    };
    if state != "pending" {
        return Outcome::Succeeded(serde_json::json!({ "state": state }));
    }

    let started = Instant::now();
    let at = Utc::now();
    let verdict = attempt(&settings, id, &url, &body).await;
    let (status_code, error) = match &verdict.1 {
        Verdict::Delivered => (verdict.0, None),
        Verdict::Retry { error, .. } | Verdict::GiveUp(error) => (verdict.0, Some(error.clone())),
    };
    let record = DeliveryAttempt {
        at,
        status_code,
        error: error.clone(),
        duration_ms: started.elapsed().as_millis() as u64,
    };
    let attempts = match record_attempt(&ctx, id, &record).await {
        Ok(n) => n,
        // The attempt happened but cannot be written: retrying re-sends under the same
        // webhook-id, which receivers dedupe.
        Err(e) => return Outcome::Retry(format!("recording the attempt: {e}")),
    };
    let finish = |state: &'static str| {
        let pool = ctx.pool.clone();
        async move {
            if let Ok(c) = pool.get().await {
                let _ = c
                    .execute(
                        "UPDATE webhook_deliveries SET state = $2, finished_at = now(), updated_at = now()
                         WHERE id = $1 AND state = 'pending'",
                        &[&id, &state],
                    )
                    .await
                    .map_err(|e| tracing::warn!(delivery = %id, error = %e, "could not record the delivery's end"));
            }
        }
    };
    match verdict.1 {
        Verdict::Delivered => {
            finish("delivered").await;
            tracing::info!(delivery = %id, attempts, "callback delivered");
            Outcome::Succeeded(serde_json::json!({ "delivery_id": id, "attempts": attempts }))
        }
        Verdict::GiveUp(error) => {
            finish("failed").await;
            tracing::warn!(delivery = %id, attempts, error = %error, "callback refused; not retried");
            Outcome::Fail(error)
        }
        Verdict::Retry { error, .. } if attempts >= settings.max_attempts => {
            finish("failed").await;
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

/// Append the attempt to the row; returns how many attempts were made so far.
async fn record_attempt(ctx: &JobContext, id: Uuid, a: &DeliveryAttempt) -> Result<i32, String> {
    let c = ctx.pool.get().await.map_err(|e| e.to_string())?;
    let json = serde_json::to_value(a).map_err(|e| e.to_string())?;
    let status = a.status_code.map(i32::from);
    let row = c
        .query_one(
            "UPDATE webhook_deliveries SET attempt_count = attempt_count + 1,
                 attempts = attempts || jsonb_build_array($2::jsonb),
                 last_status_code = $3, last_error = $4, updated_at = now()
             WHERE id = $1 RETURNING attempt_count",
            &[&id, &json, &status, &a.error],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
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

    fn settings(hosts: &[&str], allow_http: bool) -> WebhookSettings {
        WebhookSettings {
            signing_secret: Some(Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")),
            allowed_hosts: hosts.iter().map(|s| s.to_string()).collect(),
            allow_http,
            ..WebhookSettings::default()
        }
    }

    #[test]
    fn signature_matches_the_standard_webhooks_test_vector() {
        // The vector published with the Standard Webhooks reference libraries: a receiver using
        // any of them accepts what we send.
        let key = decode_signing_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            sign(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn rotation_signs_with_the_new_key_then_the_old() {
        let s = WebhookSettings {
            previous_signing_secrets: vec![Secret::new(format!("whsec_{}", B64.encode([9u8; 32])))],
            ..settings(&[], false)
        };
        let keys = signing_keys(&s).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[1], vec![9u8; 32]);
        assert!(signing_keys(&WebhookSettings::default()).is_err());
    }

    #[test]
    fn secrets_must_be_whsec_base64_of_24_to_64_bytes() {
        assert!(decode_signing_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(decode_signing_secret("whsec_not base64!").is_err());
        assert!(decode_signing_secret(&format!("whsec_{}", B64.encode([1u8; 16]))).is_err());
        assert!(decode_signing_secret(&format!("whsec_{}", B64.encode([1u8; 32]))).is_ok());
        let local = local_signing_secret(&Secret::new(B64.encode([7u8; 32])));
        assert!(decode_signing_secret(local.expose()).is_ok());
    }

    #[test]
    fn https_only_unless_http_is_allowed() {
        let s = settings(&[], false);
        assert!(validate_callback_url("https://hooks.example.com/x", &s).is_ok());
        let e = validate_callback_url("http://hooks.example.com/x", &s).unwrap_err();
        assert!(e.contains("https"), "{e}");
        assert!(validate_callback_url("ftp://hooks.example.com/x", &s).is_err());
        assert!(validate_callback_url("not a url", &s).is_err());
        let s = settings(&[], true);
        assert!(validate_callback_url("http://hooks.example.com/x", &s).is_ok());
    }

    #[test]
    fn credentials_in_the_url_are_refused() {
        let s = settings(&[], false);
        assert!(validate_callback_url("https://user:pw@hooks.example.com/", &s).is_err());
        assert!(validate_callback_url("https://user@hooks.example.com/", &s).is_err());
    }

    #[test]
    fn internal_addresses_are_refused_unless_listed_exactly() {
        let s = settings(&[], true);
        for url in [
            "https://127.0.0.1/",
            "https://10.0.0.5/",
            "https://172.16.3.4/",
            "https://192.168.1.1/",
            "https://169.254.169.254/latest/meta-data/",
            "https://100.64.0.1/",
            "https://0.0.0.0/",
            "https://224.0.0.1/",
            "https://[::1]/",
            "https://[fd00::1]/",
            "https://[fe80::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://[64:ff9b::a9fe:a9fe]/",
            "https://localhost/",
            // The URL parser normalises these spellings of 127.0.0.1.
            "https://2130706433/",
            "https://0x7f.1/",
        ] {
            assert!(validate_callback_url(url, &s).is_err(), "{url} accepted");
        }
        assert!(validate_callback_url("https://8.8.8.8/", &s).is_ok());
        assert!(validate_callback_url("https://[2606:4700::1111]/", &s).is_ok());
        let s = settings(&["127.0.0.1", "[::1]"], true);
        assert!(validate_callback_url("http://127.0.0.1:9000/hook", &s).is_ok());
        assert!(validate_callback_url("http://[::1]:9000/hook", &s).is_ok());
        assert!(validate_callback_url("http://10.0.0.1/hook", &s).is_err());
    }

    #[test]
    fn the_allow_list_is_honoured_exactly_or_by_suffix() {
        let s = settings(&["hooks.example.com", "*.partner.test"], false);
        assert!(validate_callback_url("https://hooks.example.com/a", &s).is_ok());
        assert!(validate_callback_url("https://HOOKS.example.com./a", &s).is_ok());
        assert!(validate_callback_url("https://a.partner.test/a", &s).is_ok());
        assert!(validate_callback_url("https://a.b.partner.test/a", &s).is_ok());
        for url in [
            "https://partner.test/",
            "https://evilpartner.test/",
            "https://example.com/",
            "https://hooks.example.com.evil.test/",
            "https://8.8.8.8/",
        ] {
            assert!(validate_callback_url(url, &s).is_err(), "{url} accepted");
        }
    }

    #[test]
    fn callbacks_are_refused_without_a_signing_secret() {
        let s = WebhookSettings::default();
        let e = validate_callback_url("https://hooks.example.com/", &s).unwrap_err();
        assert!(e.contains("signing_secret"), "{e}");
    }

    #[test]
    fn allow_list_entries_are_checked() {
        assert!(validate_host_pattern("hooks.example.com").is_ok());
        assert!(validate_host_pattern("*.example.com").is_ok());
        assert!(validate_host_pattern("10.1.2.3").is_ok());
        assert!(validate_host_pattern("https://hooks.example.com").is_err());
        assert!(validate_host_pattern("hooks.example.com:443").is_err());
        assert!(validate_host_pattern("*.10.0.0.1").is_err());
        assert!(validate_host_pattern("").is_err());
    }

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

    #[tokio::test]
    async fn a_name_resolving_to_an_internal_address_is_refused_at_delivery() {
        // What DNS rebinding looks like: a name that passed validation resolves inside.
        let url = Url::parse("http://localhost:9/hook").unwrap();
        let Err(Refusal::Permanent(e)) = resolve_checked(&url, &settings(&[], true)).await else {
            panic!("localhost was not refused")
        };
        assert!(e.contains("loopback"), "{e}");
        // Listed exactly, the operator vouches for it.
        assert!(
            resolve_checked(&url, &settings(&["localhost"], true))
                .await
                .is_ok()
        );
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
