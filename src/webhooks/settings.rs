//! The webhooks' settings and their validation, owned here so that `config` only assembles them.
use serde::{Deserialize, Serialize};

use crate::domain::secret::Secret;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    /// `whsec_` + base64 of 24 to 64 random bytes (the Standard Webhooks format). Generated into
    /// the data directory with the embedded database; with an external database callbacks are
    /// refused until it is set.
    pub signing_secret: Option<Secret>,
    /// Secrets being rotated out: every event is also signed with each of them (space-separated
    /// in `webhook-signature`), so receivers can switch to the new secret without a gap.
    pub previous_signing_secrets: Vec<Secret>,
    /// Hosts callbacks may go to: `hooks.example.com` or `*.example.com`; empty allows any public
    /// host. Private, loopback and link-local addresses are refused unless listed exactly here.
    pub allowed_hosts: Vec<String>,
    /// Allow `http://` callback URLs (development only: the event is signed, not encrypted).
    pub allow_http: bool,
    /// How long one delivery attempt may take.
    pub timeout_seconds: u64,
    /// Attempts before a delivery is given up and marked failed.
    pub max_attempts: i32,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            signing_secret: None,
            previous_signing_secrets: Vec::new(),
            allowed_hosts: Vec::new(),
            allow_http: false,
            // Standard Webhooks recommends 15 to 30 s so receivers have time to acknowledge.
            timeout_seconds: 15,
            max_attempts: 10,
        }
    }
}

impl WebhookSettings {
    /// Every problem with these settings, each naming the setting (empty when valid).
    pub fn validate(&self) -> Vec<String> {
        let w = self;
        let mut errs = Vec::new();
        if let Some(secret) = &w.signing_secret
            && let Err(e) = super::decode_signing_secret(secret.expose())
        {
            errs.push(format!(
                "webhooks.signing_secret (MAILSCOPE_WEBHOOKS__SIGNING_SECRET): {e}"
            ));
        }
        for (i, secret) in w.previous_signing_secrets.iter().enumerate() {
            if let Err(e) = super::decode_signing_secret(secret.expose()) {
                errs.push(format!("webhooks.previous_signing_secrets[{i}]: {e}"));
            }
        }
        for host in &w.allowed_hosts {
            if let Err(e) = super::validate_host_pattern(host) {
                errs.push(format!("webhooks.allowed_hosts: `{host}` {e}"));
            }
        }
        if !(1..=120).contains(&w.timeout_seconds) {
            errs.push("webhooks.timeout_seconds must be between 1 and 120".into());
        }
        // 100 is also the delivery job's own failure limit (`webhooks::JOB_MAX_FAILURES`).
        if !(1..=100).contains(&w.max_attempts) {
            errs.push("webhooks.max_attempts must be between 1 and 100".into());
        }
        errs
    }
}
