//! The one place where requests to Microsoft are sent: admission (per-tenant limits), bearer
//! tokens, per-request timeout, retries with backoff and `Retry-After`, tracing and metrics.
//!
//! Retry rules, in one table:
//!
//! | failure                                  | retried for                         |
//! |------------------------------------------|-------------------------------------|
//! | 429 / Exchange concurrency limit         | every request (it was refused, not run) |
//! | connect error (nothing was sent)         | every request                       |
//! | 5xx, 408, timeout, broken connection     | idempotent requests only            |
//! | 401 with a cached token                  | once, with a freshly fetched token  |
//! | 404 within a caller-given replication window | that request only               |
//! | an answer Entra's eventual consistency explains, within a caller-given window (a new app's 404, `NoBackingApplicationObject`, a new secret's AADSTS7000215) | that request only; past the window it becomes `replication_pending` |
//!
//! Every attempt carries a fresh `client-request-id`; what Microsoft answers is logged with its
//! own `request-id` (Graph, Exchange) or `trace_id` (sign-in), which support cases need.
//!
//! A `Retry-After` is a floor for this tenant and service: it pauses every caller of the tenant,
//! not only the one that saw it. Waits longer than `max_retry_after_ms` are not slept through; the
//! error is returned with `retry_after` so the job layer reschedules.
use super::TenantContext;
use super::error::{ErrorKind, M365Error, Service};
use super::limiter::Limiters;
use super::metrics::Metrics;
use super::retry::{next_delay, parse_retry_after};
use super::settings::M365Settings;
use super::token::{AccessToken, TokenCache, TokenResource};
use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracing::Instrument;

/// Shared state behind every client handle.
pub(crate) struct Core {
    pub http: reqwest::Client,
    pub settings: M365Settings,
    pub metrics: Metrics,
    pub limiters: Limiters,
    pub tokens: TokenCache,
}

/// Which token a call carries.
#[derive(Clone, Copy)]
pub(crate) struct Auth<'a> {
    pub ctx: &'a TenantContext,
    pub resource: TokenResource,
}

/// One logical request (possibly several HTTP attempts).
pub(crate) struct Call<'a> {
    pub tenant: &'a str,
    pub service: Service,
    pub operation: &'a str,
    pub method: Method,
    pub url: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Body bytes and content type. The token request's body holds the secret: it is never logged.
    pub body: Option<(Vec<u8>, &'static str)>,
    /// Safe to send twice (GET, lookups, Test-/Get- cmdlets, token requests).
    pub idempotent: bool,
    pub auth: Option<Auth<'a>>,
    /// Retry 404s until this instant (replication lag after a create).
    pub not_found_until: Option<Instant>,
    /// Retry answers `lag.1` accepts until `lag.0` (Entra's eventual consistency right after a
    /// write, docs/microsoft-365.md §8.4); past it they fail as [`ErrorKind::ReplicationPending`].
    pub lag: Option<(Instant, LagAnswer)>,
}

/// Which answers mean "Entra has not caught up yet" for one call.
pub(crate) type LagAnswer = fn(&M365Error) -> bool;

impl<'a> Call<'a> {
    pub(crate) fn new(
        tenant: &'a str,
        service: Service,
        operation: &'a str,
        method: Method,
        url: String,
    ) -> Self {
        let idempotent = method == Method::GET;
        Call {
            tenant,
            service,
            operation,
            method,
            url,
            headers: Vec::new(),
            body: None,
            idempotent,
            auth: None,
            not_found_until: None,
            lag: None,
        }
    }

    pub(crate) fn json_body(mut self, v: &serde_json::Value) -> Self {
        // Serialising a `Value` cannot fail.
        self.body = Some((
            serde_json::to_vec(v).unwrap_or_default(),
            "application/json; charset=utf-8",
        ));
        self
    }

    pub(crate) fn header(mut self, name: &'static str, value: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.push((HeaderName::from_static(name), v));
        }
        self
    }
}

/// A response as read off the wire.
#[derive(Debug)]
pub(crate) struct RawResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Microsoft's own id for the request (`request-id`, or `x-ms-request-id` on sign-in). Never
    /// the echoed `client-request-id`: that is mailscope's, and support cannot look it up.
    pub(crate) fn request_id(&self) -> Option<String> {
        self.header("request-id")
            .or_else(|| self.header("x-ms-request-id"))
            .map(str::to_string)
    }

    pub(crate) fn retry_after(&self) -> Option<Duration> {
        self.header("retry-after")
            .and_then(|v| parse_retry_after(v, SystemTime::now()))
    }

    /// Parse the body as JSON, or fail with a `Protocol` error naming the operation.
    pub(crate) fn json<T: serde::de::DeserializeOwned>(
        &self,
        service: Service,
        op: &str,
    ) -> Result<T, M365Error> {
        serde_json::from_slice(&self.body).map_err(|e| {
            M365Error::new(ErrorKind::Protocol, service, op)
                .with_status(self.status)
                .with_message(format!("unexpected response body: {e}"))
                .with_request_id(self.request_id())
        })
    }
}

/// Turns a non-2xx response into an error; each service has its own.
pub(crate) type Classifier = fn(&RawResponse, Service, &str) -> M365Error;

/// Whether `kind` may be retried for a request that is (or is not) idempotent.
pub(crate) fn retry_allowed(kind: &ErrorKind, idempotent: bool) -> bool {
    match kind {
        // Refused before running, or never sent: always safe.
        ErrorKind::Throttled { .. } | ErrorKind::Unreachable => true,
        // May have run: only if running twice is harmless.
        ErrorKind::Transient | ErrorKind::Timeout => idempotent,
        _ => false,
    }
}

impl Core {
    fn timeout(&self, service: Service) -> Duration {
        M365Settings::ms(match service {
            Service::Login => self.settings.login_timeout_ms,
            Service::Graph => self.settings.graph_timeout_ms,
            Service::Exchange => self.settings.exchange_timeout_ms,
        })
    }

    /// Send `call` with every resilience rule applied; `classify` maps non-2xx answers.
    pub(crate) async fn execute(
        &self,
        call: &Call<'_>,
        classify: Classifier,
    ) -> Result<RawResponse, M365Error> {
        let limiter = self.limiters.get(call.tenant, call.service);
        let s = &self.settings;
        let base = M365Settings::ms(s.backoff_base_ms);
        let max = M365Settings::ms(s.backoff_max_ms);
        let labels = [call.tenant, call.service.as_str(), call.operation];
        let mut attempt: u32 = 0;
        let mut retries: u32 = 0;
        let mut refreshed_token = false;
        let mut rejected: Option<AccessToken> = None;
        loop {
            attempt += 1;
            let span = tracing::info_span!(
                "m365_call",
                tenant = call.tenant,
                service = call.service.as_str(),
                operation = call.operation,
                attempt
            );
            let mut used_token: Option<AccessToken> = None;
            // Ours, per attempt; Microsoft echoes it, and logs both ids.
            let client_request_id = call
                .headers
                .iter()
                .find(|(k, _)| k.as_str() == "client-request-id")
                .and_then(|(_, v)| v.to_str().ok())
                .map(str::to_string)
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let result = async {
                let token = match call.auth {
                    Some(a) => Some(
                        Box::pin(self.tokens.get(self, a.ctx, a.resource, rejected.as_ref()))
                            .await
                            .map_err(|e| (e, false))?,
                    ),
                    None => None,
                };
                used_token.clone_from(&token);
                let _permit = limiter.admit().await;
                let started = Instant::now();
                let r = self
                    .send_once(call, token.as_ref(), &client_request_id)
                    .await;
                self.metrics
                    .latency
                    .with_label_values(&labels)
                    .observe(started.elapsed().as_secs_f64());
                let r = match r {
                    Ok(resp) if (200..300).contains(&resp.status) => Ok(resp),
                    Ok(resp) => Err((classify(&resp, call.service, call.operation), true)),
                    Err(e) => Err((e, true)),
                };
                // Pause the tenant while this attempt still holds its slot: released first, a
                // caller queued for the slot could be admitted and send before the pause exists.
                if let Err((e, _)) = &r
                    && let ErrorKind::Throttled {
                        retry_after: Some(ra),
                    } = e.kind()
                {
                    // Not for longer than we would sleep ourselves: a very long Retry-After (often
                    // scoped to one mailbox) must not freeze every caller of the tenant; the
                    // caller that saw it gets it back to reschedule.
                    limiter.pause_until(
                        Instant::now() + (*ra).min(M365Settings::ms(s.max_retry_after_ms)),
                    );
                }
                let outcome = match &r {
                    Ok(_) => "ok",
                    Err((e, _)) => e.code(),
                };
                self.metrics
                    .calls
                    .with_label_values(&[labels[0], labels[1], labels[2], outcome])
                    .inc();
                match &r {
                    Ok(resp) => tracing::debug!(
                        status = resp.status,
                        request_id = resp.request_id().as_deref().unwrap_or("-"),
                        client_request_id = client_request_id.as_str(),
                        "m365 call succeeded"
                    ),
                    // A 404 is often the expected answer of a lookup: not worth an info line.
                    Err((e, _)) if e.is_not_found() => tracing::debug!(
                        status = e.status().unwrap_or(0),
                        request_id = e.request_id().unwrap_or("-"),
                        client_request_id = client_request_id.as_str(),
                        "m365 call found nothing"
                    ),
                    Err((e, _)) => tracing::info!(
                        error = %e,
                        status = e.status().unwrap_or(0),
                        request_id = e.request_id().unwrap_or("-"),
                        client_request_id = client_request_id.as_str(),
                        "m365 call failed"
                    ),
                }
                r
            }
            .instrument(span)
            .await;

            let err = match result {
                Ok(resp) => return Ok(resp),
                // Token acquisition failed: it already retried on its own.
                Err((e, false)) => return Err(e),
                Err((e, true)) => e,
            };
            rejected = None;

            // A 401 with a cached token: the token may predate a role grant or be revoked. One
            // more try with a fresh token; the request was refused, so this is always safe.
            if err.status() == Some(401) && call.auth.is_some() && !refreshed_token {
                refreshed_token = true;
                rejected = used_token;
                self.metrics
                    .retries
                    .with_label_values(&[labels[0], labels[1], labels[2], "token_refresh"])
                    .inc();
                continue;
            }

            let kind = err.kind().clone();
            if let ErrorKind::Throttled { .. } = kind {
                self.metrics.throttles.with_label_values(&labels).inc();
            }

            // Entra's eventual consistency right after a write: the caller names the answers
            // that mean "not there yet" and how long to wait for them.
            if let Some((until, explained)) = call.lag
                && explained(&err)
            {
                let cap = M365Settings::ms(s.replication_poll_max_ms);
                let delay = next_delay(retries, None, base, max, &mut rand::thread_rng())
                    .max(base)
                    .min(cap);
                if Instant::now() + delay <= until {
                    retries += 1;
                    self.metrics
                        .retries
                        .with_label_values(&[labels[0], labels[1], labels[2], "consistency"])
                        .inc();
                    tracing::info!(
                        tenant = call.tenant,
                        service = call.service.as_str(),
                        operation = call.operation,
                        answer = err.remote_code().unwrap_or(err.code()),
                        request_id = err.request_id().unwrap_or("-"),
                        client_request_id = client_request_id.as_str(),
                        delay_ms = delay.as_millis() as u64,
                        "Entra not consistent yet, retrying"
                    );
                    tokio::time::sleep(delay).await;
                    continue;
                }
                tracing::warn!(
                    tenant = call.tenant,
                    service = call.service.as_str(),
                    operation = call.operation,
                    answer = err.remote_code().unwrap_or(err.code()),
                    request_id = err.request_id().unwrap_or("-"),
                    retries,
                    "Entra still not consistent after the consistency window"
                );
                return Err(err.with_kind(ErrorKind::ReplicationPending));
            }

            // Replication lag: a just-created object reads as 404 for a while.
            if err.is_not_found()
                && let Some(until) = call.not_found_until
            {
                let cap = M365Settings::ms(s.replication_poll_max_ms);
                let delay = next_delay(retries, None, base, max, &mut rand::thread_rng())
                    .max(base)
                    .min(cap);
                if Instant::now() + delay <= until {
                    retries += 1;
                    self.metrics
                        .retries
                        .with_label_values(&[labels[0], labels[1], labels[2], "not_found"])
                        .inc();
                    tracing::info!(
                        tenant = call.tenant,
                        operation = call.operation,
                        ?delay,
                        "not found yet, waiting for replication"
                    );
                    tokio::time::sleep(delay).await;
                    continue;
                }
                return Err(err);
            }

            if !retry_allowed(&kind, call.idempotent) || attempt >= s.max_attempts {
                return Err(err);
            }
            let retry_after = err.retry_after();
            if retry_after.is_some_and(|ra| ra > M365Settings::ms(s.max_retry_after_ms)) {
                // Too long to hold a task: hand the wait back to the caller.
                return Err(err);
            }
            let delay = next_delay(retries, retry_after, base, max, &mut rand::thread_rng());
            retries += 1;
            self.metrics
                .retries
                .with_label_values(&[labels[0], labels[1], labels[2], kind.code()])
                .inc();
            tracing::warn!(
                tenant = call.tenant,
                service = call.service.as_str(),
                operation = call.operation,
                attempt,
                reason = kind.code(),
                request_id = err.request_id().unwrap_or("-"),
                client_request_id = client_request_id.as_str(),
                delay_ms = delay.as_millis() as u64,
                "retrying Microsoft 365 call"
            );
            tokio::time::sleep(delay).await;
        }
    }

    async fn send_once(
        &self,
        call: &Call<'_>,
        token: Option<&AccessToken>,
        client_request_id: &str,
    ) -> Result<RawResponse, M365Error> {
        let mut req = self
            .http
            .request(call.method.clone(), &call.url)
            .timeout(self.timeout(call.service));
        for (k, v) in &call.headers {
            req = req.header(k, v);
        }
        if !call
            .headers
            .iter()
            .any(|(k, _)| k.as_str() == "client-request-id")
        {
            req = req.header("client-request-id", client_request_id);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t.expose());
        }
        if let Some((bytes, ct)) = &call.body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, *ct)
                .body(bytes.clone());
        }
        let net_err = |e: reqwest::Error| {
            let kind = if e.is_timeout() {
                ErrorKind::Timeout
            } else if e.is_connect() {
                ErrorKind::Unreachable
            } else {
                ErrorKind::Transient
            };
            // `without_url`: keep query strings (which may name users) out of error text.
            M365Error::new(kind, call.service, call.operation)
                .with_message(e.without_url().to_string())
        };
        let resp = req.send().await.map_err(net_err)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = match resp.bytes().await {
            Ok(b) => b.to_vec(),
            // An error answer whose body cannot be read (Exchange's 403 is NUL bytes labelled
            // gzip) is still classified by its status.
            Err(e) if !(200..300).contains(&status) && !e.is_timeout() => Vec::new(),
            Err(e) => return Err(net_err(e)),
        };
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }
}

/// Resolve a `nextLink` against the configured base so a bearer token is never sent to a host
/// that was not configured (Exchange answers with `outlook.office.com` links while requests go
/// to `outlook.office365.com`; a proxy or the sandbox has its own host).
pub(crate) fn rebase_next_link(base: &str, link: &str) -> String {
    if link.starts_with(base) {
        return link.to_string();
    }
    let path = match link.find("://") {
        Some(i) => {
            let after = &link[i + 3..];
            match after.find('/') {
                Some(j) => &after[j..],
                None => "/",
            }
        }
        None => link,
    };
    if path.starts_with('/') {
        format!("{base}{path}")
    } else {
        format!("{base}/{path}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is fine in tests (developers' guide)
mod tests {
    use super::*;

    #[test]
    fn only_refused_or_unsent_requests_are_retried_when_unsafe() {
        let t = ErrorKind::Throttled { retry_after: None };
        assert!(retry_allowed(&t, false));
        assert!(retry_allowed(&ErrorKind::Unreachable, false));
        assert!(!retry_allowed(&ErrorKind::Transient, false));
        assert!(!retry_allowed(&ErrorKind::Timeout, false));
        assert!(retry_allowed(&ErrorKind::Transient, true));
        assert!(retry_allowed(&ErrorKind::Timeout, true));
        assert!(!retry_allowed(&ErrorKind::NotFound, true));
        assert!(!retry_allowed(&ErrorKind::MissingManageAsAppRole, true));
    }

    #[test]
    fn next_links_stay_on_the_configured_host() {
        let base = "http://127.0.0.1:9000";
        assert_eq!(
            rebase_next_link(
                base,
                "https://outlook.office.com/adminapi/beta/t/InvokeCommand?$skiptoken=x"
            ),
            "http://127.0.0.1:9000/adminapi/beta/t/InvokeCommand?$skiptoken=x"
        );
        assert_eq!(
            rebase_next_link(base, "http://127.0.0.1:9000/v1.0/x?a=b"),
            "http://127.0.0.1:9000/v1.0/x?a=b"
        );
        assert_eq!(
            rebase_next_link("https://p/ms", "https://p/ms/v1.0/x"),
            "https://p/ms/v1.0/x"
        );
        assert_eq!(
            rebase_next_link("https://p/ms", "https://graph.microsoft.com/v1.0/x"),
            "https://p/ms/v1.0/x"
        );
    }
}
