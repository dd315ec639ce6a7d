//! Standard Webhooks signing: `whsec_` secrets and the `webhook-signature` header value.
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::WebhookSettings;
use crate::domain::secret::Secret;

const SECRET_PREFIX: &str = "whsec_";

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
pub fn signing_keys(settings: &WebhookSettings) -> Result<Vec<Vec<u8>>, String> {
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
}
