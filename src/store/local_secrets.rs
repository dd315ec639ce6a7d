//! Secrets generated once for a local, zero-configuration setup: the credential encryption key
//! and the HS256 signing secret for development tokens. They live in the data directory, in files
//! readable by the owner only (0600), and are only used when the operator configured none.
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use rand::RngCore;

use crate::domain::secret::Secret;

pub const ENCRYPTION_KEY_FILE: &str = "encryption.key";
pub const HS256_SECRET_FILE: &str = "jwt-hs256.secret";

/// Read `dir/name`, or create it with `len` random bytes (base64) if missing.
pub fn read_or_create(dir: &Path, name: &str, len: usize) -> anyhow::Result<Secret> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create data directory {}: {e}", dir.display()))?;
    let path: PathBuf = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) => return Ok(Secret::new(s.trim())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    }
    let mut raw = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut raw);
    let value = base64::engine::general_purpose::STANDARD.encode(raw);
    // create_new: if another process won the race, read what it wrote instead.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut f) => {
            f.write_all(value.as_bytes())?;
            f.sync_all()?;
            tracing::info!(file = %path.display(), "generated a local secret (mode 0600)");
            Ok(Secret::new(value))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(Secret::new(std::fs::read_to_string(&path)?.trim()))
        }
        Err(e) => anyhow::bail!("cannot write {}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_with_owner_only_permissions() {
        let dir = std::env::temp_dir().join(format!("mailscope-ls-{}", uuid::Uuid::new_v4()));
        let a = read_or_create(&dir, "k", 32).unwrap();
        let b = read_or_create(&dir, "k", 32).unwrap();
        assert_eq!(a.expose(), b.expose());
        let mode = std::fs::metadata(dir.join("k"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(crate::domain::secret::decode_encryption_key(a.expose()).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
