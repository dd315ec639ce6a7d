//! Encryption at rest for tenant credentials: AES-256-GCM with a random 96-bit nonce per seal,
//! and the owning row's id as associated data, so a ciphertext copied onto another tenant's row
//! fails to open instead of leaking one tenant's credential into another's calls.
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use sha2::{Digest, Sha256};

const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error(
        "stored credential cannot be decrypted (wrong encryption key, or the row was tampered with)"
    )]
    Open,
    #[error("encryption failed")]
    Seal,
}

#[derive(Clone)]
pub struct CredentialCipher {
    cipher: Aes256Gcm,
    key_id: String,
}

impl std::fmt::Debug for CredentialCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialCipher")
            .field("key_id", &self.key_id)
            .finish()
    }
}

impl CredentialCipher {
    pub fn new(key: &[u8; 32]) -> Self {
        // A fingerprint identifies the key for rotation without revealing it.
        let fp = Sha256::digest([b"mailscope-key-id:".as_slice(), key].concat());
        let key_id = fp[..6].iter().map(|b| format!("{b:02x}")).collect();
        CredentialCipher {
            cipher: Aes256Gcm::new(key.into()),
            key_id,
        }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Returns `nonce || ciphertext+tag`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Seal)?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < NONCE_LEN + 16 {
            return Err(CryptoError::Open);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Open)?;
        self.cipher
            .decrypt(&Nonce::from(nonce), Payload { msg: ct, aad })
            .map_err(|_| CryptoError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let c = CredentialCipher::new(&[7u8; 32]);
        let sealed = c.seal(b"tenant-a", b"s3cret").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"s3cret"));
        assert_eq!(c.open(b"tenant-a", &sealed).unwrap(), b"s3cret");
        assert!(c.open(b"tenant-b", &sealed).is_err(), "bound to its row");
        let other = CredentialCipher::new(&[8u8; 32]);
        assert!(other.open(b"tenant-a", &sealed).is_err(), "wrong key fails");
        assert_ne!(c.key_id(), other.key_id());
    }

    #[test]
    fn nonces_differ() {
        let c = CredentialCipher::new(&[1u8; 32]);
        assert_ne!(c.seal(b"", b"x").unwrap(), c.seal(b"", b"x").unwrap());
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let c = CredentialCipher::new(&[1u8; 32]);
        assert!(c.open(b"", &[1, 2, 3]).is_err());
    }
}
