//! `mailscope sandbox --tls`: https with a locally generated certificate authority, so that
//! unmodified Microsoft clients (MSAL, azure-identity, the Graph SDK), which insist on https,
//! talk to the sandbox once told to trust one CA file.
//!
//! The CA (`ca.pem`, key `ca.key`, mode 0600) is made once per directory and reused, so a client
//! configured with `ca.pem` keeps working across restarts; the server certificate is issued anew
//! at every start. The CA may only vouch for `localhost` and loopback addresses (X.509 name
//! constraints): were its key ever copied off the machine, it could not impersonate real hosts.
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{Datelike, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints, SanType,
};

pub const CA_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";

/// A server configuration and the CA file clients must trust.
pub struct Tls {
    pub config: rustls::ServerConfig,
    pub ca_file: PathBuf,
}

/// Validity bounds as (year, month, day): from yesterday (a client whose clock is a little
/// behind still accepts the certificate) to `years` later.
fn validity(years: i32) -> [(i32, u8, u8); 2] {
    let d = Utc::now().date_naive();
    let d = d.pred_opt().unwrap_or(d);
    let (m, day) = (d.month() as u8, d.day().min(28) as u8);
    [(d.year(), m, day), (d.year() + years, m, day)]
}

fn set_validity(p: &mut CertificateParams, years: i32) {
    let [(y0, m0, d0), (y1, m1, d1)] = validity(years);
    p.not_before = rcgen::date_time_ymd(y0, m0, d0);
    p.not_after = rcgen::date_time_ymd(y1, m1, d1);
}

/// The CA's parameters: the same every time, so a stored key re-creates the same issuer.
fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(DnType::CommonName, "mailscope sandbox local CA");
    p.distinguished_name
        .push(DnType::OrganizationName, "mailscope sandbox");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![
            GeneralSubtree::DnsName("localhost".into()),
            GeneralSubtree::IpAddress(CidrSubnet::V4([127, 0, 0, 0], [255, 0, 0, 0])),
            GeneralSubtree::IpAddress(CidrSubnet::V6(
                std::net::Ipv6Addr::LOCALHOST.octets(),
                [0xff; 16],
            )),
        ],
        excluded_subtrees: vec![],
    });
    set_validity(&mut p, 10);
    Ok(p)
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Load the CA from `dir`, or create it there.
fn ca(dir: &Path) -> anyhow::Result<(rcgen::Certificate, KeyPair, PathBuf)> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create TLS directory {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let (cert_path, key_path) = (dir.join(CA_FILE), dir.join(CA_KEY_FILE));
    if cert_path.exists() && key_path.exists() {
        let key = KeyPair::from_pem(&std::fs::read_to_string(&key_path)?)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", key_path.display()))?;
        // Same subject and key as the stored ca.pem: what a server certificate's issuer needs.
        let cert = ca_params()?.self_signed(&key)?;
        return Ok((cert, key, cert_path));
    }
    let _ = std::fs::remove_file(&cert_path);
    let _ = std::fs::remove_file(&key_path);
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    write_private(&key_path, &key.serialize_pem())?;
    std::fs::write(&cert_path, cert.pem())?;
    Ok((cert, key, cert_path))
}

/// The CA in `dir` (made if missing) and a fresh server certificate for localhost and the
/// loopback addresses.
pub fn prepare(dir: &Path) -> anyhow::Result<Tls> {
    let (ca_cert, ca_key, ca_file) = ca(dir)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec!["localhost".to_string()])?;
    p.subject_alt_names.extend([
        SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
    ]);
    p.distinguished_name
        .push(DnType::CommonName, "mailscope sandbox");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    set_validity(&mut p, 1);
    let leaf = p.signed_by(&key, &ca_cert, &ca_key)?;
    // The leaf alone: clients hold the CA (the one in ca.pem; the issuer re-created from the
    // stored key has the same subject and key but is not byte-identical).
    let chain = vec![leaf.der().clone()];
    let private = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, private)?;
    let ca_file = std::fs::canonicalize(&ca_file).unwrap_or(ca_file);
    Ok(Tls { config, ca_file })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_made_once_and_reused_with_a_private_key_file() {
        let dir = std::env::temp_dir().join(format!("mailscope-tls-{}", uuid::Uuid::new_v4()));
        let a = prepare(&dir).unwrap();
        let first = std::fs::read_to_string(&a.ca_file).unwrap();
        let b = prepare(&dir).unwrap();
        assert_eq!(first, std::fs::read_to_string(&b.ca_file).unwrap());
        let mode = std::fs::metadata(dir.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
