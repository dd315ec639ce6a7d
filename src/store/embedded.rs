//! The embedded default database: a private PostgreSQL cluster started from the locally installed
//! server binaries when no database URL is configured, so `mailscope serve` works with no setup.
//!
//! - The cluster lives in `<data_dir>/pg`, is created once with a generated password
//!   (scram-sha-256, loopback only, no Unix socket) and reused across runs.
//! - PostgreSQL refuses to run as root, so when mailscope runs as root the cluster runs as an
//!   unprivileged system user (`postgres` if it exists, else `nobody`). If that user cannot reach
//!   the data directory (e.g. under a 0700 `/root`), the cluster moves to `/var/tmp`.
//! - A cluster left running by a crashed process is adopted, and stopped cleanly on exit.
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::domain::secret::Secret;
use crate::store::local_secrets;

pub const DATABASE_NAME: &str = "mailscope";
const SUPERUSER: &str = "mailscope";
const PASSWORD_FILE: &str = "pg-password";

/// A running embedded cluster. Call [`EmbeddedPostgres::stop`] on shutdown.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    bin_dir: PathBuf,
    pg_dir: PathBuf,
    run_as: Option<(u32, u32)>,
    port: u16,
    password: Secret,
}

pub const NOT_FOUND_HELP: &str = "\
no database is configured and no PostgreSQL server binaries (initdb, pg_ctl) were found.
Either install PostgreSQL so mailscope can run its own private cluster
  (Debian/Ubuntu: `apt-get install postgresql`; Fedora: `dnf install postgresql-server`;
   macOS: `brew install postgresql@16`),
or point mailscope at an existing server:
  DATABASE_URL=postgres://user:password@host:5432/mailscope mailscope serve";

impl EmbeddedPostgres {
    /// Start (initialising on first use) the cluster under `data_dir`.
    pub async fn start(data_dir: &Path) -> anyhow::Result<Self> {
        let data_dir = absolute(data_dir)?;
        tokio::task::spawn_blocking(move || Self::start_blocking(&data_dir))
            .await
            .context("embedded PostgreSQL start task failed")?
    }

    fn start_blocking(data_dir: &Path) -> anyhow::Result<Self> {
        let bin_dir = find_bin_dir().ok_or_else(|| anyhow::anyhow!(NOT_FOUND_HELP))?;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
        let run_as = if running_as_root() {
            Some(unprivileged_user()?)
        } else {
            None
        };
        let mut pg_dir = data_dir.join("pg");
        if let Some((uid, gid)) = run_as {
            // The cluster's user must be able to reach its directory through every ancestor.
            std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o755))?;
            if !reachable_by(data_dir, uid, gid) {
                let alt = PathBuf::from("/var/tmp").join(format!(
                    "mailscope-pg-{}",
                    &hex_digest(data_dir.to_string_lossy().as_bytes())[..12]
                ));
                tracing::warn!(
                    wanted = %pg_dir.display(), using = %alt.display(),
                    "the PostgreSQL user cannot reach the data directory; keeping the cluster elsewhere"
                );
                pg_dir = alt;
            }
        }
        let password = local_secrets::read_or_create(data_dir, PASSWORD_FILE, 24)?;
        let mut pg = EmbeddedPostgres {
            bin_dir,
            pg_dir,
            run_as,
            port: 0,
            password,
        };
        if !pg.pg_dir.join("PG_VERSION").exists() {
            pg.initdb()?;
        }
        match pg.running_port()? {
            Some(port) => {
                tracing::info!(port, "adopting an embedded PostgreSQL left running earlier");
                pg.port = port;
            }
            None => {
                pg.port = free_port()?;
                pg.pg_ctl_start()?;
            }
        }
        Ok(pg)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_directory(&self) -> &Path {
        &self.pg_dir
    }

    /// URL of the maintenance database `postgres`, as the cluster's superuser.
    pub fn maintenance_url(&self) -> Secret {
        self.url_for("postgres")
    }

    /// Connection URL of one database of the cluster.
    fn url_for(&self, db: &str) -> Secret {
        Secret::new(format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/{db}",
            urlencode(self.password.expose()),
            self.port
        ))
    }

    /// Create the application database if needed and return its URL.
    pub async fn ensure_database(&self) -> anyhow::Result<Secret> {
        let (client, conn) =
            tokio_postgres::connect(self.url_for("postgres").expose(), tokio_postgres::NoTls)
                .await
                .context("cannot connect to the embedded PostgreSQL")?;
        let driver = tokio::spawn(conn);
        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_database WHERE datname = $1",
                &[&DATABASE_NAME],
            )
            .await?
            .is_some();
        if !exists
            && let Err(e) = client
                .batch_execute(&format!("CREATE DATABASE {DATABASE_NAME}"))
                .await
        {
            // Another process created it between our check and our create.
            if super::sqlstate(&e) != Some("42P04") {
                return Err(e.into());
            }
        }
        drop(client);
        let _ = driver.await;
        Ok(self.url_for(DATABASE_NAME))
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin_dir.join(program));
        c.current_dir("/").stdin(Stdio::null()).env("LC_ALL", "C");
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c
    }

    fn initdb(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.pg_dir)?;
        std::fs::set_permissions(&self.pg_dir, std::fs::Permissions::from_mode(0o700))?;
        let pwfile = self.pg_dir.with_extension("pwfile");
        std::fs::write(&pwfile, self.password.expose())?;
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600))?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&self.pg_dir, Some(uid), Some(gid))?;
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid))?;
        }
        tracing::info!(dir = %self.pg_dir.display(), "initialising the embedded PostgreSQL cluster");
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(&self.pg_dir)
            .args([
                "-U",
                SUPERUSER,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output();
        let _ = std::fs::remove_file(&pwfile);
        let out = out.context("cannot run initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // Loopback TCP only: no Unix socket whose directory permissions could trip us up.
        let conf = self.pg_dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str(
            "\n# mailscope embedded defaults\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = ''\nmax_connections = 100\n",
        );
        std::fs::write(&conf, text)?;
        Ok(())
    }

    /// If a postmaster is already running on this directory, its port.
    fn running_port(&self) -> anyhow::Result<Option<u16>> {
        let status = self
            .command("pg_ctl")
            .arg("status")
            .arg("-D")
            .arg(&self.pg_dir)
            .output()?;
        if !status.status.success() {
            return Ok(None);
        }
        // postmaster.pid line 4 is the port.
        let pid = std::fs::read_to_string(self.pg_dir.join("postmaster.pid"))?;
        Ok(pid.lines().nth(3).and_then(|l| l.trim().parse().ok()))
    }

    fn pg_ctl_start(&self) -> anyhow::Result<()> {
        let log = self.pg_dir.join("mailscope-server.log");
        let out = self
            .command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&self.pg_dir)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o"])
            .arg(format!("-p {}", self.port))
            .output()
            .context("cannot run pg_ctl")?;
        if !out.status.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            bail!(
                "the embedded PostgreSQL did not start: {} {}",
                String::from_utf8_lossy(&out.stderr).trim(),
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            );
        }
        tracing::info!(port = self.port, dir = %self.pg_dir.display(), "embedded PostgreSQL started");
        Ok(())
    }

    /// Fast shutdown: open sessions are disconnected, committed data is safe.
    pub async fn stop(self) {
        let r = tokio::task::spawn_blocking(move || {
            self.command("pg_ctl")
                .arg("stop")
                .arg("-D")
                .arg(&self.pg_dir)
                .args(["-m", "fast", "-w", "-t", "30"])
                .output()
        })
        .await;
        match r {
            Ok(Ok(o)) if o.status.success() => tracing::info!("embedded PostgreSQL stopped"),
            Ok(Ok(o)) => tracing::warn!(
                stderr = %String::from_utf8_lossy(&o.stderr).trim(),
                "embedded PostgreSQL stop reported an error"
            ),
            other => tracing::warn!(?other, "could not stop the embedded PostgreSQL"),
        }
    }
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// The effective uid, read without `unsafe`: /proc/self belongs to the process's euid.
fn running_as_root() -> bool {
    match std::fs::metadata("/proc/self") {
        Ok(m) => m.uid() == 0,
        Err(_) => Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false),
    }
}

/// `postgres` if the system has it (Debian's packages create it), else `nobody`.
fn unprivileged_user() -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for wanted in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 3
                && f[0] == wanted
                && let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse())
            {
                return Ok((uid, gid));
            }
        }
    }
    bail!(
        "mailscope runs as root and PostgreSQL refuses to; no unprivileged `postgres` or \
         `nobody` user exists to run the embedded cluster. Create one or set DATABASE_URL."
    )
}

/// Can (uid, gid) traverse into `dir`? Asked of the OS by running `test -x` as that user.
fn reachable_by(dir: &Path, uid: u32, gid: u32) -> bool {
    Command::new("test")
        .arg("-x")
        .arg(dir)
        .current_dir("/")
        .uid(uid)
        .gid(gid)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Directory holding initdb and pg_ctl: PATH first, then the usual install locations, newest first.
pub fn find_bin_dir() -> Option<PathBuf> {
    let has_tools = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if has_tools(&d) {
                return Some(d);
            }
        }
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    for root in ["/usr/lib/postgresql", "/usr/local/opt", "/opt/homebrew/opt"] {
        if let Ok(rd) = std::fs::read_dir(root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if root == "/usr/lib/postgresql" || name.starts_with("postgresql") {
                    candidates.push(e.path().join("bin"));
                }
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/usr") {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("pgsql") {
                candidates.push(e.path().join("bin"));
            }
        }
    }
    candidates.push(PathBuf::from("/usr/local/pgsql/bin"));
    candidates.retain(|d| has_tools(d));
    // Highest major version first ("9" < "16" needs numeric comparison).
    candidates.sort_by_key(|d| {
        let v: String = d
            .to_string_lossy()
            .chars()
            .filter(|c| c.is_ascii_digit())
            .collect();
        std::cmp::Reverse(v.parse::<u64>().unwrap_or(0))
    });
    candidates.into_iter().next()
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn hex_digest(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_url_encoded() {
        assert_eq!(urlencode("a+b/c="), "a%2Bb%2Fc%3D");
    }
}
