//! Token signing and verification for the simulated login endpoint.
//!
//! Access tokens are RS256 JWTs signed with a key generated when the process starts (published
//! as a JWKS). Client assertions are verified against the X.509 certificates registered on the
//! application, found by their `x5t` (SHA-1) or `x5t#S256` (SHA-256) thumbprint.
use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha1::Digest;

/// The process's token signing key.
pub struct SigningKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    pub kid: String,
    n: String,
    e: String,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeys")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

static PROCESS_KEYS: OnceLock<Arc<SigningKeys>> = OnceLock::new();

/// The signing key, generated once per process (RSA generation is slow in debug builds, and
/// in-process test sandboxes can share it).
pub fn process_keys() -> anyhow::Result<Arc<SigningKeys>> {
    if let Some(k) = PROCESS_KEYS.get() {
        return Ok(k.clone());
    }
    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048)?;
    let der = key.to_pkcs1_der()?;
    let n = key.n().to_bytes_be();
    let e = key.e().to_bytes_be();
    let kid = URL_SAFE_NO_PAD.encode(&sha2::Sha256::digest(&n)[..20]);
    let keys = Arc::new(SigningKeys {
        encoding: EncodingKey::from_rsa_der(der.as_bytes()),
        decoding: DecodingKey::from_rsa_raw_components(&n, &e),
        kid,
        n: URL_SAFE_NO_PAD.encode(&n),
        e: URL_SAFE_NO_PAD.encode(&e),
    });
    Ok(PROCESS_KEYS.get_or_init(|| keys).clone())
}

impl SigningKeys {
    /// The JWKS document, shaped like Microsoft's `discovery/v2.0/keys`.
    pub fn jwks(&self, issuer: &str) -> Value {
        json!({"keys": [{"kty": "RSA", "use": "sig", "kid": self.kid, "x5t": self.kid,
            "n": self.n, "e": self.e, "alg": "RS256", "issuer": issuer}]})
    }

    pub fn sign(&self, claims: &AccessClaims) -> anyhow::Result<String> {
        let mut h = Header::new(Algorithm::RS256);
        h.typ = Some("JWT".into());
        h.kid = Some(self.kid.clone());
        h.x5t = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&h, claims, &self.encoding)?)
    }

    /// Verify signature and audience; the caller checks `exp` against the sandbox clock.
    pub fn verify(&self, token: &str, audience: &str) -> Result<AccessClaims, TokenProblem> {
        let mut v = Validation::new(Algorithm::RS256);
        v.validate_exp = false;
        v.validate_nbf = false;
        v.required_spec_claims = HashSet::new();
        v.validate_aud = false;
        let data = jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &v)
            .map_err(|_| TokenProblem::Invalid)?;
        if data.claims.aud != audience {
            return Err(TokenProblem::WrongAudience);
        }
        Ok(data.claims)
    }
}

/// Why an access token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenProblem {
    Missing,
    Invalid,
    WrongAudience,
    Expired,
}

/// The claims of an app-only access token (v1 shape, as Graph and Exchange receive).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessClaims {
    pub aud: String,
    pub iss: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub aio: String,
    pub app_displayname: String,
    pub appid: String,
    /// `1` client secret, `2` certificate.
    pub appidacr: String,
    pub idp: String,
    pub idtyp: String,
    pub oid: String,
    pub rh: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    pub sub: String,
    pub tid: String,
    pub uti: String,
    pub ver: String,
    #[serde(default)]
    pub wids: Vec<String>,
}

/// Decode a PEM block (any label) to DER.
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----") && !l.is_empty())
        .collect();
    STANDARD.decode(body).ok()
}

/// (tag, content, whole element, rest) of one DER element.
type Tlv<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

/// Read one DER TLV.
fn tlv(input: &[u8]) -> Option<Tlv<'_>> {
    let tag = *input.first()?;
    let first = *input.get(1)? as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *input.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    if input.len() < end {
        return None;
    }
    Some((tag, &input[header..end], &input[..end], &input[end..]))
}

/// Extract the RSA public key of an X.509 certificate (DER).
pub fn certificate_public_key(cert_der: &[u8]) -> Option<rsa::RsaPublicKey> {
    let (_, cert, _, _) = tlv(cert_der)?;
    let (_, tbs, _, _) = tlv(cert)?;
    let mut rest = tbs;
    // [0] version is optional.
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.3;
    }
    // serialNumber, signature, issuer, validity, subject.
    for _ in 0..5 {
        rest = tlv(rest)?.3;
    }
    let (_, _, spki, _) = tlv(rest)?;
    rsa::RsaPublicKey::from_public_key_der(spki).ok()
}

/// `x5t`: base64url SHA-1 of the DER certificate.
pub fn thumbprint_sha1(der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(sha1::Sha1::digest(der))
}

/// `x5t#S256`: base64url SHA-256 of the DER certificate.
pub fn thumbprint_sha256(der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(der))
}

/// Hex SHA-1 thumbprint, as portals show it (`customKeyIdentifier`).
pub fn thumbprint_hex(der: &[u8]) -> String {
    sha1::Sha1::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// Thumbprints may arrive padded or in standard base64; compare canonical forms.
fn canonical_b64(s: &str) -> String {
    s.trim_end_matches('=').replace('+', "-").replace('/', "_")
}

/// Why a client assertion failed (mapped to AADSTS codes by the login handler).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssertionProblem {
    Malformed(String),
    UnknownKey(String),
    BadSignature,
    ClientMismatch,
    WrongAudience(String),
    Expired {
        now: i64,
        nbf: Option<i64>,
        exp: Option<i64>,
    },
}

#[derive(Debug, Deserialize)]
struct AssertionClaims {
    aud: Option<Value>,
    iss: Option<String>,
    sub: Option<String>,
    // NumericDate may be fractional (RFC 7519 §2); MSAL Python sends floats.
    exp: Option<f64>,
    nbf: Option<f64>,
}

/// Verify a client assertion against the app's registered certificates (DER).
/// `accepted_audiences` are the token endpoint URLs of the tenant; `now` is unix seconds.
pub fn verify_client_assertion(
    assertion: &str,
    certificates: &[Vec<u8>],
    client_id: &str,
    accepted_audiences: &[String],
    now: i64,
) -> Result<(), AssertionProblem> {
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|e| AssertionProblem::Malformed(format!("JWT header is invalid: {e}")))?;
    if !matches!(header.alg, Algorithm::RS256 | Algorithm::PS256) {
        return Err(AssertionProblem::Malformed(format!(
            "unsupported client assertion algorithm {:?}",
            header.alg
        )));
    }
    let (given, cert) = if let Some(t) = &header.x5t_s256 {
        let c = canonical_b64(t);
        (
            t.clone(),
            certificates.iter().find(|d| thumbprint_sha256(d) == c),
        )
    } else if let Some(t) = &header.x5t {
        let c = canonical_b64(t);
        (
            t.clone(),
            certificates.iter().find(|d| thumbprint_sha1(d) == c),
        )
    } else {
        return Err(AssertionProblem::Malformed(
            "client assertion header has neither x5t nor x5t#S256".into(),
        ));
    };
    let cert = cert.ok_or(AssertionProblem::UnknownKey(given))?;
    let public = certificate_public_key(cert).ok_or(AssertionProblem::BadSignature)?;
    let key =
        DecodingKey::from_rsa_raw_components(&public.n().to_bytes_be(), &public.e().to_bytes_be());
    let mut v = Validation::new(header.alg);
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.required_spec_claims = HashSet::new();
    let data = jsonwebtoken::decode::<AssertionClaims>(assertion, &key, &v).map_err(|e| match e
        .kind()
    {
        jsonwebtoken::errors::ErrorKind::InvalidSignature => AssertionProblem::BadSignature,
        _ => AssertionProblem::Malformed(format!("client assertion is invalid: {e}")),
    })?;
    let c = data.claims;
    if c.iss.as_deref() != Some(client_id) || c.sub.as_deref() != Some(client_id) {
        return Err(AssertionProblem::ClientMismatch);
    }
    let auds: Vec<String> = match c.aud {
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => vec![],
    };
    if !auds.iter().any(|a| {
        accepted_audiences
            .iter()
            .any(|x| x.eq_ignore_ascii_case(a.trim_end_matches('/')))
    }) {
        return Err(AssertionProblem::WrongAudience(auds.join(",")));
    }
    // Entra allows five minutes of clock skew.
    let skew = 300;
    let late = c.exp.is_none_or(|e| e as i64 + skew < now);
    let early = c.nbf.is_some_and(|n| n as i64 - skew > now);
    if late || early {
        return Err(AssertionProblem::Expired {
            now,
            nbf: c.nbf.map(|n| n as i64),
            exp: c.exp.map(|e| e as i64),
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tlv_reads_long_lengths() {
        let mut v = vec![0x30, 0x82, 0x01, 0x00];
        v.extend(std::iter::repeat_n(7u8, 256));
        v.push(0x05);
        let (tag, content, whole, rest) = tlv(&v).unwrap();
        assert_eq!(
            (tag, content.len(), whole.len(), rest),
            (0x30, 256, 260, &[0x05][..])
        );
        assert!(tlv(&[0x30, 0x05, 0x00]).is_none());
    }

    #[test]
    fn thumbprints_are_base64url() {
        assert_eq!(thumbprint_sha1(b"abc"), "qZk-NkcGgWq6PiVxeFDCbJzQ2J0");
        assert_eq!(
            canonical_b64("qZk+NkcGgWq6PiVxeFDCbJzQ2J0="),
            "qZk-NkcGgWq6PiVxeFDCbJzQ2J0"
        );
        assert_eq!(
            thumbprint_hex(b"abc"),
            "A9993E364706816ABA3E25717850C26C9CD0D89D"
        );
    }
}
