//! Graph JSON batching (`POST /$batch`, docs/microsoft-365.md §5.6).
//!
//! Requests are split into batches of at most `graph_batch_size` (20). The outer status is 200
//! whenever the batch parses, so every inner status is checked: inner 429s (always) and inner
//! 5xx/408 (GET only) are re-sent, alone, after the longest inner `Retry-After`; everything else
//! is final. Responses arrive in any order and are returned in request order.
use super::{GraphClient, classify_graph};
use crate::m365::error::{ErrorKind, M365Error, Service};
use crate::m365::retry::{next_delay, parse_retry_after};
use crate::m365::settings::M365Settings;
use crate::m365::transport::RawResponse;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// One request inside a batch. `url` is relative to the version root, e.g. `/users/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchRequest {
    pub id: String,
    pub method: String,
    pub url: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

impl BatchRequest {
    pub fn get(id: impl Into<String>, url: impl Into<String>) -> Self {
        BatchRequest {
            id: id.into(),
            method: "GET".into(),
            url: url.into(),
            headers: BTreeMap::new(),
            body: None,
        }
    }

    /// A request with a JSON body (Graph requires a Content-Type with a body).
    pub fn with_json(
        id: impl Into<String>,
        method: &str,
        url: impl Into<String>,
        body: Value,
    ) -> Self {
        let mut headers = BTreeMap::new();
        headers.insert("Content-Type".to_string(), "application/json".to_string());
        BatchRequest {
            id: id.into(),
            method: method.to_ascii_uppercase(),
            url: url.into(),
            headers,
            body: Some(body),
        }
    }

    fn is_get(&self) -> bool {
        self.method.eq_ignore_ascii_case("GET")
    }
}

/// One inner response.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BatchResponse {
    pub id: String,
    pub status: u16,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: Option<Value>,
}

impl BatchResponse {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn retry_after(&self) -> Option<Duration> {
        self.header("retry-after")
            .and_then(|v| parse_retry_after(v, SystemTime::now()))
    }

    /// The inner failure as an [`M365Error`] (same mapping as a direct call), or `None` on success.
    pub fn error(&self, operation: &str) -> Option<M365Error> {
        if self.is_success() {
            return None;
        }
        let mut headers = HeaderMap::new();
        for (k, v) in &self.headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                headers.insert(k, v);
            }
        }
        let body = self
            .body
            .as_ref()
            .map(|b| serde_json::to_vec(b).unwrap_or_default())
            .unwrap_or_default();
        Some(classify_graph(
            &RawResponse {
                status: self.status,
                headers,
                body,
            },
            Service::Graph,
            operation,
        ))
    }
}

#[derive(Deserialize)]
struct BatchAnswer {
    #[serde(default)]
    responses: Vec<BatchResponse>,
}

/// Whether an inner answer should be re-sent.
fn resend(req: &BatchRequest, status: u16) -> bool {
    status == 429 || (req.is_get() && matches!(status, 408 | 500 | 502 | 503 | 504))
}

impl GraphClient {
    /// Run `requests` through `$batch`; returns one response per request, in request order.
    pub async fn batch(
        &self,
        requests: Vec<BatchRequest>,
    ) -> Result<Vec<BatchResponse>, M365Error> {
        let op = "batch";
        // Graph compares request ids without case and fails the whole batch on a duplicate
        // (docs/microsoft-365.md §8.6): refuse `A` beside `a` here, before anything is sent.
        let mut seen = HashSet::new();
        if let Some(dup) = requests
            .iter()
            .find(|r| !seen.insert(r.id.to_ascii_lowercase()))
        {
            return Err(
                M365Error::new(ErrorKind::InvalidParameter, Service::Graph, op)
                    .with_message(format!("duplicate batch request id {}", dup.id)),
            );
        }
        let s = &self.core.settings;
        let base = M365Settings::ms(s.backoff_base_ms);
        let max = M365Settings::ms(s.backoff_max_ms);
        let order: Vec<String> = requests.iter().map(|r| r.id.clone()).collect();
        let mut done: HashMap<String, BatchResponse> = HashMap::new();
        let mut pending = requests;
        let mut round = 0u32;
        loop {
            round += 1;
            let last_round = round >= s.max_attempts;
            let mut again = Vec::new();
            let mut wait: Option<Duration> = None;
            for chunk in pending.chunks(s.graph_batch_size) {
                let all_get = chunk.iter().all(BatchRequest::is_get);
                let body = serde_json::json!({ "requests": chunk });
                let answer: BatchAnswer = self.post_json(op, "/$batch", &body, all_get).await?;
                let mut by_id: HashMap<String, BatchResponse> = answer
                    .responses
                    .into_iter()
                    .map(|r| (r.id.clone(), r))
                    .collect();
                for req in chunk {
                    match by_id.remove(&req.id) {
                        Some(resp) if !last_round && resend(req, resp.status) => {
                            if let Some(ra) = resp.retry_after() {
                                wait = Some(wait.map_or(ra, |w| w.max(ra)));
                            }
                            done.insert(req.id.clone(), resp);
                            again.push(req.clone());
                        }
                        Some(resp) => {
                            done.insert(req.id.clone(), resp);
                        }
                        // Graph left it out: re-send if safe, else report it as a gateway failure.
                        None if !last_round && req.is_get() => again.push(req.clone()),
                        None => {
                            done.insert(
                                req.id.clone(),
                                BatchResponse {
                                    id: req.id.clone(),
                                    status: 502,
                                    headers: BTreeMap::new(),
                                    body: None,
                                },
                            );
                        }
                    }
                }
            }
            if again.is_empty() {
                break;
            }
            if let Some(ra) = wait {
                if ra > M365Settings::ms(s.max_retry_after_ms) {
                    break;
                }
                // Inner throttling applies to the tenant: hold every caller, not just this batch.
                self.core
                    .limiters
                    .get(self.tenant_id(), Service::Graph)
                    .pause_until(Instant::now() + ra);
                self.core
                    .metrics
                    .throttles
                    .with_label_values(&[self.tenant_id(), "graph", op])
                    .inc();
            }
            self.core
                .metrics
                .retries
                .with_label_values(&[self.tenant_id(), "graph", op, "batch_part"])
                .inc_by(again.len() as u64);
            let delay = next_delay(round - 1, wait, base, max, &mut rand::thread_rng());
            tracing::warn!(
                tenant = self.tenant_id(),
                parts = again.len(),
                delay_ms = delay.as_millis() as u64,
                "re-sending failed batch parts"
            );
            tokio::time::sleep(delay).await;
            pending = again;
        }
        Ok(order
            .into_iter()
            .filter_map(|id| done.remove(&id))
            .collect())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is fine in tests (developers' guide)
mod tests {
    use super::*;

    #[test]
    fn only_throttled_or_safe_failures_are_resent() {
        let get = BatchRequest::get("1", "/users/a");
        let post = BatchRequest::with_json("2", "post", "/x", serde_json::json!({}));
        assert!(resend(&get, 429) && resend(&post, 429));
        assert!(resend(&get, 503) && !resend(&post, 503));
        assert!(!resend(&get, 404) && !resend(&get, 424) && !resend(&get, 403));
        assert_eq!(post.method, "POST");
    }

    #[test]
    fn inner_error_is_classified_like_a_direct_call() {
        let r = BatchResponse {
            id: "1".into(),
            status: 403,
            headers: BTreeMap::new(),
            body: Some(
                serde_json::json!({"error":{"code":"ErrorAccessDenied","message":"Access to OData is disabled."}}),
            ),
        };
        assert_eq!(
            *r.error("probe").unwrap().kind(),
            ErrorKind::MailboxAccessDenied
        );
    }
}
