//! Signed callbacks: when something a caller waits for ends (a propagation check), mailscope POSTs
//! a JSON event to the caller's URL the way [Standard Webhooks](https://www.standardwebhooks.com/)
//! describes it, so any receiver library for that format verifies it:
//!
//! - headers `webhook-id` (the delivery id, the same on every retry so receivers can dedupe),
//!   `webhook-timestamp` (Unix seconds of this attempt) and `webhook-signature`
//!   (`v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}` keyed by the `whsec_` secret);
//! - body `{"type", "timestamp", "data"}`, stored once so every attempt sends the same bytes.
//!
//! Here: the settings, signing ([`signing`]), callback-URL validation against SSRF ([`url`]) and
//! the `webhook_deliveries` rows. [`enqueue_delivery`] writes a row and a `webhook_delivery` job
//! in the caller's transaction; the job that POSTs and records attempts is
//! `jobs::webhook_delivery`, above the provisioning layer.
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use reqwest::Url;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::queue::{self, job::Payload, worker::Worker};
use crate::store::StoreError;

pub mod settings;
pub mod signing;
pub mod url;

pub use settings::WebhookSettings;
pub use signing::{decode_signing_secret, local_signing_secret, sign};
pub use url::{is_forbidden_ip, validate_callback_url, validate_host_pattern};

/// The job kind that delivers one callback.
pub const JOB_KIND: &str = Delivery::KIND;
/// The data-directory file holding the generated signing secret (embedded mode).
pub const SIGNING_SECRET_FILE: &str = "webhook-signing.secret";

/// The `webhook_delivery` job's payload: the delivery row to send.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub delivery_id: Uuid,
    /// Absent in jobs queued before payloads were typed; only used when queueing.
    #[serde(default)]
    pub tenant_id: Uuid,
}

impl Payload for Delivery {
    const KIND: &'static str = "webhook_delivery";
    /// The job counts attempts on the row against `webhooks.max_attempts`; this is only the
    /// backstop for workers that die mid-attempt (at the setting's upper bound).
    const MAX_FAILURES: i32 = 100;

    fn tenant(&self) -> Uuid {
        self.tenant_id
    }
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

/// Queue a callback, in the caller's transaction (call it in one): the event is sent iff the
/// caller commits.
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
    // The row before its job: the job wakes workers as soon as it commits, and a worker that
    // claims it must find the row even when a caller is not in a transaction.
    tx.execute(
        "INSERT INTO webhook_deliveries (id, tenant_id, subject_id, event_type, url, body)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &id,
            &tenant_id,
            &subject_id,
            &event_type,
            &url.as_str(),
            &body,
        ],
    )
    .await?;
    let job_id = queue::enqueue_job(
        tx,
        &Delivery {
            delivery_id: id,
            tenant_id,
        },
    )
    .await?
    .id();
    tx.execute(
        "UPDATE webhook_deliveries SET job_id = $2 WHERE id = $1",
        &[&id, &job_id],
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

/// Register the delivery job on a worker (for processes and tests that run deliveries only;
/// `jobs::register_all` registers it with every other job). The job's run is
/// `jobs::webhook_delivery`.
pub fn register(worker: &mut Worker, settings: WebhookSettings) {
    worker.register_job::<Delivery>(settings);
}

/// A delivery row as the job sends it.
pub struct PendingDelivery {
    pub url: String,
    pub body: String,
    pub state: String,
}

pub async fn load(c: &impl GenericClient, id: Uuid) -> Result<Option<PendingDelivery>, StoreError> {
    Ok(c.query_opt(
        "SELECT url, body, state FROM webhook_deliveries WHERE id = $1",
        &[&id],
    )
    .await?
    .map(|r| PendingDelivery {
        url: r.get(0),
        body: r.get(1),
        state: r.get(2),
    }))
}

/// Append the attempt to the row; returns how many attempts were made so far.
pub async fn record_attempt(
    c: &impl GenericClient,
    id: Uuid,
    a: &DeliveryAttempt,
) -> Result<i32, StoreError> {
    let json = serde_json::to_value(a).map_err(|e| StoreError::Other(e.into()))?;
    let status = a.status_code.map(i32::from);
    let row = c
        .query_one(
            "UPDATE webhook_deliveries SET attempt_count = attempt_count + 1,
                 attempts = attempts || jsonb_build_array($2::jsonb),
                 last_status_code = $3, last_error = $4, updated_at = now()
             WHERE id = $1 RETURNING attempt_count",
            &[&id, &json, &status, &a.error],
        )
        .await?;
    Ok(row.get(0))
}

/// End a pending delivery as `delivered` or `failed`.
pub async fn finish(
    c: &impl GenericClient,
    id: Uuid,
    state: DeliveryState,
) -> Result<(), StoreError> {
    let state = match state {
        DeliveryState::Pending => return Ok(()),
        DeliveryState::Delivered => "delivered",
        DeliveryState::Failed => "failed",
    };
    c.execute(
        "UPDATE webhook_deliveries SET state = $2, finished_at = now(), updated_at = now()
         WHERE id = $1 AND state = 'pending'",
        &[&id, &state],
    )
    .await?;
    Ok(())
}
