//! A vendor's public X.509 certificate, as uploaded for a certificate credential: decoded from
//! PEM, with the thumbprint and validity Microsoft Graph records for a `keyCredential`
//! (docs/microsoft-365.md §5.4; the credential's start and end are the certificate's own).
//!
//! Only what mailscope needs is read: the DER is walked to `tbsCertificate.validity`.
use chrono::{DateTime, NaiveDateTime, Utc};
use sha1::{Digest, Sha1};

/// A certificate's public facts. Nothing here is secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    pub der: Vec<u8>,
    /// SHA-1 of the DER, upper-case hex (Graph's `customKeyIdentifier`).
    pub thumbprint: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

/// One DER element: (tag, content, rest).
fn element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let mut l = 0usize;
        for &x in &b[..n] {
            l = (l << 8) | usize::from(x);
        }
        b = &b[n..];
        l
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

fn time(tag: u8, content: &[u8]) -> Option<DateTime<Utc>> {
    let s = std::str::from_utf8(content).ok()?;
    let s = s.strip_suffix('Z')?;
    let full = match tag {
        // UTCTime: YYMMDDHHMMSS; years 50–99 are 19xx (RFC 5280 §4.1.2.5.1).
        0x17 if s.len() == 12 => {
            let yy: u32 = s[..2].parse().ok()?;
            format!("{}{s}", if yy >= 50 { "19" } else { "20" })
        }
        0x18 if s.len() == 14 => s.to_string(),
        _ => return None,
    };
    NaiveDateTime::parse_from_str(&full, "%Y%m%d%H%M%S")
        .ok()
        .map(|d| d.and_utc())
}

/// Read a PEM `CERTIFICATE`; the reason when it is not one.
pub fn parse_pem(pem_text: &str) -> Result<CertificateInfo, String> {
    let p = pem::parse(pem_text.trim())
        .map_err(|_| "not a PEM certificate (-----BEGIN CERTIFICATE----- …)".to_string())?;
    if p.tag() != "CERTIFICATE" {
        return Err(format!(
            "a PEM `{}` block, not a CERTIFICATE: upload only the public certificate, never a private key",
            p.tag()
        ));
    }
    let der = p.contents().to_vec();
    let bad = || "the certificate's DER does not parse as X.509".to_string();
    let (tag, cert, _) = element(&der).ok_or_else(bad)?;
    if tag != 0x30 {
        return Err(bad());
    }
    let (_, mut tbs, _) = element(cert).ok_or_else(bad)?;
    // version [0] is optional; then serialNumber, signature, issuer, validity.
    if tbs.first() == Some(&0xa0) {
        tbs = element(tbs).ok_or_else(bad)?.2;
    }
    for _ in 0..3 {
        tbs = element(tbs).ok_or_else(bad)?.2;
    }
    let (_, validity, _) = element(tbs).ok_or_else(bad)?;
    let (t1, nb, rest) = element(validity).ok_or_else(bad)?;
    let (t2, na, _) = element(rest).ok_or_else(bad)?;
    let not_before = time(t1, nb).ok_or_else(bad)?;
    let not_after = time(t2, na).ok_or_else(bad)?;
    let thumbprint = Sha1::digest(&der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    Ok(CertificateInfo {
        der,
        thumbprint,
        not_before,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = include_str!("../../tests/fixtures/rsa1.crt.pem");

    #[test]
    fn reads_the_validity_and_thumbprint_of_a_certificate() {
        let c = parse_pem(CERT).unwrap();
        assert_eq!(c.not_before.to_rfc3339(), "2026-11-22T02:10:53+00:00");
        assert_eq!(c.not_after.to_rfc3339(), "2036-11-19T02:10:53+00:00");
        assert_eq!(c.thumbprint.len(), 40);
    }

    #[test]
    fn refuses_private_keys_and_garbage() {
        let key = include_str!("../../tests/fixtures/rsa1.pem");
        assert!(parse_pem(key).unwrap_err().contains("never a private key"));
        assert!(parse_pem("hello").is_err());
        let truncated =
            "-----BEGIN CERTIFICATE-----\nMIIDEzCCAfugAwIBAgIU\n-----END CERTIFICATE-----";
        assert!(parse_pem(truncated).is_err());
    }
}
