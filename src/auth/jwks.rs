//! A cache of an identity provider's signing keys (JWKS).
//!
//! Keys are fetched at start and kept by `kid`. An unknown `kid` (key rotation) triggers a refetch,
//! but at most once per `min_refresh` so a flood of forged tokens cannot turn the service into a
//! load generator against the IdP. Keys older than `max_age` are refreshed on use; if the IdP is
//! down, the cached keys keep working. Concurrent refreshes collapse into one request.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::{Mutex, RwLock};

use super::AuthError;

#[derive(Default)]
struct State {
    keys: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
}

pub struct JwksCache {
    url: String,
    http: reqwest::Client,
    min_refresh: Duration,
    max_age: Duration,
    state: RwLock<State>,
    refreshing: Mutex<()>,
}

impl JwksCache {
    pub fn new(
        url: String,
        http: reqwest::Client,
        min_refresh: Duration,
        max_age: Duration,
    ) -> Self {
        JwksCache {
            url,
            http,
            min_refresh,
            max_age,
            state: RwLock::new(State::default()),
            refreshing: Mutex::new(()),
        }
    }

    pub async fn key(&self, kid: &str) -> Result<(DecodingKey, Option<Algorithm>), AuthError> {
        {
            let s = self.state.read().await;
            if let Some(k) = s.keys.get(kid) {
                let fresh = s.fetched_at.is_some_and(|t| t.elapsed() < self.max_age);
                if fresh {
                    return Ok(k.clone());
                }
            }
        }
        let attempt_allowed = {
            let s = self.state.read().await;
            s.last_attempt
                .is_none_or(|t| t.elapsed() >= self.min_refresh)
        };
        let mut fetch_error = None;
        if attempt_allowed && let Err(e) = self.refresh().await {
            tracing::warn!(error = %e, "JWKS refresh failed; serving cached keys");
            fetch_error = Some(e);
        }
        let s = self.state.read().await;
        match s.keys.get(kid) {
            Some(k) => Ok(k.clone()),
            None if s.keys.is_empty() => Err(AuthError::KeysUnavailable(
                fetch_error
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "no keys fetched yet".into()),
            )),
            // The kid is the caller's input: not echoed (it may be anything, of any length).
            None => Err(AuthError::Invalid(
                "the token's signing key (its `kid`) is not one the identity provider publishes"
                    .into(),
            )),
        }
    }

    /// Fetch the key set now (single-flight: a caller arriving mid-fetch waits for it instead).
    pub async fn refresh(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let _guard = self.refreshing.lock().await;
        {
            // Someone else refreshed while we waited for the lock.
            let s = self.state.read().await;
            if s.last_attempt.is_some_and(|t| t >= started) {
                return Ok(());
            }
        }
        self.state.write().await.last_attempt = Some(Instant::now());
        let set: JwkSet = self
            .http
            .get(&self.url)
            .timeout(Duration::from_secs(10))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            match DecodingKey::from_jwk(jwk) {
                Ok(k) => {
                    keys.insert(kid, (k, alg));
                }
                Err(e) => tracing::warn!(kid, error = %e, "ignoring an unusable JWKS key"),
            }
        }
        let mut s = self.state.write().await;
        s.keys = keys;
        s.fetched_at = Some(Instant::now());
        tracing::info!(keys = s.keys.len(), "JWKS refreshed");
        Ok(())
    }
}
