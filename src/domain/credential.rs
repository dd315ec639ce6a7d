//! The management credential mailscope uses to act in a tenant (its own Entra app).
//!
//! Secret material is wrapped in `SecretString`, so `Debug` and logs never show it.
use secrecy::SecretString;

/// How mailscope's management app proves its identity to Microsoft's login endpoint.
#[derive(Debug, Clone)]
pub enum ManagementCredential {
    ClientSecret {
        client_id: String,
        client_secret: SecretString,
    },
    Certificate {
        client_id: String,
        /// PEM of the X.509 certificate registered on the app (public; used for `x5t`).
        certificate_pem: String,
        /// PEM of the matching private key (PKCS#8 or PKCS#1 RSA).
        private_key_pem: SecretString,
    },
}

impl ManagementCredential {
    pub fn client_id(&self) -> &str {
        match self {
            ManagementCredential::ClientSecret { client_id, .. }
            | ManagementCredential::Certificate { client_id, .. } => client_id,
        }
    }

    /// `client_secret` or `certificate`, for display.
    pub fn kind(&self) -> &'static str {
        match self {
            ManagementCredential::ClientSecret { .. } => "client_secret",
            ManagementCredential::Certificate { .. } => "certificate",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_secret() {
        let c = ManagementCredential::ClientSecret {
            client_id: "abc".into(),
            client_secret: SecretString::from("super-secret-value"),
        };
        assert!(!format!("{c:?}").contains("super-secret-value"));
    }
}
