//! Operating the service: health, readiness, metrics, migrations, outages, the spec, the CLI.
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::*;

#[tokio::test]
async fn health_readiness_and_metrics() {
    let app = spawn_app().await;
    let anonymous = app.api().anonymous();
    anonymous.get("/healthz", 200).await;
    let r = anonymous.get("/readyz", 200).await;
    assert_eq!(r["status"], "ready");
    assert_eq!(
        r["schema_version"],
        mailscope::store::migrate::latest_version()
    );
    // Generate a 401 on a templated route, then read the metrics.
    let tenant = "/v1/tenants/0b1c6a36-6b53-4bcb-8e56-0d4f5c7f3a11";
    anonymous.send(Method::GET, tenant, None).await;
    let m = anonymous.send(Method::GET, "/metrics", None).await;
    let m = m.text().await.unwrap();
    assert!(
        m.contains(r#"mailscope_http_requests_total{method="GET",route="/v1/tenants/{tenant_id}",status="401"} 1"#),
        "{m}"
    );
    assert!(m.contains("mailscope_http_request_duration_seconds_bucket"));
    assert!(m.contains(r#"mailscope_db_pool_connections{state="max"} 4"#));
}

#[tokio::test]
async fn not_ready_until_migrated() {
    let app = spawn_app_with(|s| s.database.migrate_on_start = false).await;
    let anonymous = app.api().anonymous();
    let p = anonymous.get("/readyz", (503, "not_ready")).await;
    assert!(p["detail"].as_str().unwrap().contains("mailscope migrate"));
    mailscope::app::migrate(&app.db.url).await.unwrap();
    anonymous.get("/readyz", 200).await;
}

#[tokio::test]
async fn database_outage_is_503_and_recovers_by_itself() {
    let app = spawn_app().await;
    let admin = admin_client().await;
    // Cut the service off its database: refuse new connections and kill the open ones.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS false",
            app.db.name
        ))
        .await
        .unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            &[&app.db.name],
        )
        .await
        .unwrap();
    let api = app.api();
    let res = api.send(Method::GET, "/v1/tenants", None).await;
    assert_eq!(res.headers().get("retry-after").unwrap(), "5");
    assert_problem(res, 503, "database_unavailable").await;
    api.anonymous().get("/readyz", 503).await;

    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            app.db.name
        ))
        .await
        .unwrap();
    let mut status = 0;
    for _ in 0..20 {
        let res = api.send(Method::GET, "/v1/tenants", None).await;
        status = res.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        status, 200,
        "the service recovers once the database is back"
    );
}

fn mailscope() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mailscope"));
    c.env_remove("DATABASE_URL").stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("MAILSCOPE_") {
            c.env_remove(k);
        }
    }
    c
}

#[tokio::test]
async fn two_processes_migrating_at_once_do_not_race() {
    let db = TestDb::create().await;
    let spawn = || {
        mailscope()
            .arg("migrate")
            .env("DATABASE_URL", &db.url)
            .env("MAILSCOPE_ENCRYPTION_KEY", ENCRYPTION_KEY)
            .env("MAILSCOPE_AUTH__HS256_SECRET", HS_SECRET)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let applied_now: Vec<String> = [a, b]
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .collect();
    let total: usize = applied_now
        .iter()
        .filter_map(|s| {
            s.split('(')
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert_eq!(
        total,
        mailscope::store::migrate::MIGRATIONS.len(),
        "each migration applied exactly once: {applied_now:?}"
    );
    let c = db.client().await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as usize, mailscope::store::migrate::MIGRATIONS.len());
}

#[tokio::test]
async fn edited_migration_is_refused() {
    let db = TestDb::create().await;
    mailscope::app::migrate(&db.url).await.unwrap();
    let c = db.client().await;
    c.execute(
        "UPDATE schema_migrations SET checksum = 'tampered' WHERE version = 1",
        &[],
    )
    .await
    .unwrap();
    let err = mailscope::app::migrate(&db.url)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("changed after it was applied"), "{err}");
}

#[test]
fn committed_openapi_matches_the_code() {
    let generated = mailscope::api::openapi::document_json();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi/openapi.json is stale; regenerate it with:\n    cargo run -q -- openapi > openapi/openapi.json"
    );
}

#[tokio::test]
async fn spec_and_offline_swagger_ui_are_served() {
    let app = spawn_app().await;
    let anonymous = app.api().anonymous();
    let spec = anonymous.get("/openapi.json", 200).await;
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    assert!(spec["paths"]["/v1/tenants/{tenant_id}"]["put"].is_object());
    assert!(spec["components"]["securitySchemes"]["bearer"].is_object());
    let page = anonymous.send(Method::GET, "/docs/", None).await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger"), "{html}");
    for cdn in ["unpkg", "jsdelivr", "cdnjs", "https://"] {
        assert!(
            !html.contains(cdn),
            "Swagger UI must not load assets from {cdn}"
        );
    }
    let js = anonymous
        .send(Method::GET, "/docs/swagger-ui-bundle.js", None)
        .await;
    assert_eq!(js.status(), 200, "assets are vendored into the binary");
}

#[test]
fn check_config_names_a_misspelled_variable() {
    let out = mailscope()
        .arg("check-config")
        .env("MAILSCOPE_DATABSE__URL", "postgres://x@y/z")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MAILSCOPE_DATABSE"), "{err}");

    let out = mailscope()
        .arg("check-config")
        .env("DATABASE_URL", "postgres://u:hunter2@db/x")
        .env("MAILSCOPE_ENCRYPTION_KEY", ENCRYPTION_KEY)
        .env("MAILSCOPE_AUTH__HS256_SECRET", HS_SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[redacted]"));
    assert!(
        text.contains("webhooks.signing_secret = \"not set: callbacks are refused"),
        "{text}"
    );
    assert!(
        !text.contains("= null"),
        "unset values are described: {text}"
    );
    assert!(
        !text.contains("hunter2") && !text.contains(HS_SECRET) && !text.contains(ENCRYPTION_KEY)
    );

    // With no configuration: the embedded database and secrets generated in the data directory.
    let out = mailscope().arg("check-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("database.url = \"embedded"), "{text}");
    assert!(
        text.contains("encryption_key = \"generated in ") && text.contains("encryption.key"),
        "{text}"
    );
    assert!(
        text.contains("auth.hs256_secret = \"generated in "),
        "{text}"
    );
    assert!(!text.contains("= null"), "{text}");
}

/// The README's run command: no configuration, a machine with PostgreSQL binaries but no server
/// for mailscope. Runs the real binary in a fresh directory and stops it with SIGTERM.
#[tokio::test]
async fn zero_config_serve_runs_its_own_postgres() {
    if mailscope::store::embedded::find_bin_dir().is_none() {
        panic!(
            "PostgreSQL server binaries are required for this test (apt-get install postgresql)"
        );
    }
    let dir = std::env::temp_dir().join(format!(
        "mailscope-embedded-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = mailscope()
        .arg("serve")
        .current_dir(&dir)
        .env("MAILSCOPE_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..240 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            ready = true;
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("serve exited early with {status}: {err}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(ready, "embedded serve became ready");
    let token = mailscope().arg("token").current_dir(&dir).output().unwrap();
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout).unwrap();
    let res = http
        .get(format!("{base}/v1/tenants"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "graceful exit on SIGTERM: {status}");
    let key = dir.join(".mailscope").join("encryption.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        !dir.join(".mailscope/pg/postmaster.pid").exists(),
        "the cluster was stopped"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sslmode=require` really verifies the server certificate: the local cluster's self-signed
/// (Debian snakeoil) certificate is refused unless its CA is configured.
#[tokio::test]
async fn sslmode_require_verifies_the_server_certificate() {
    let base = admin_url();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}sslmode=require");
    let err = match mailscope::store::connect_one(&url, None).await {
        Ok(_) => panic!("a self-signed server certificate must not be trusted"),
        Err(e) => format!("{e:#}"),
    };
    let ssl_on: String = admin_client()
        .await
        .query_one("SHOW ssl", &[])
        .await
        .unwrap()
        .get(0);
    if ssl_on == "on" {
        assert!(err.to_lowercase().contains("certificate"), "{err}");
    } else {
        assert!(
            err.to_lowercase().contains("tls") || err.to_lowercase().contains("ssl"),
            "{err}"
        );
    }
    // Plain connections (sslmode unset or prefer) keep working against the same server.
    assert!(mailscope::store::connect_one(&base, None).await.is_ok());
}

/// Connector metrics carry the service's prefix once (`mailscope_m365_…`), not twice.
#[tokio::test]
async fn connector_metrics_have_one_prefix() {
    let env = WithSandbox::start().await;
    let res = env
        .app
        .http
        .post(env.url("/connection-test"))
        .bearer_auth(env.app.admin())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let m = env
        .app
        .http
        .get(env.app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("mailscope_m365_calls_total{"), "{m}");
    assert!(m.contains("mailscope_m365_call_duration_seconds_bucket{"));
    assert!(!m.contains("mailscope_mailscope_"), "{m}");
}

/// `mailscope token` where no server has run refuses with the reason instead of inventing a
/// signing secret the server would not know (its tokens would all be refused).
#[test]
fn token_outside_the_server_directory_refuses() {
    let dir = std::env::temp_dir().join(format!("mailscope-token-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = mailscope().arg("token").current_dir(&dir).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mailscope serve"), "{err}");
    assert!(err.contains("MAILSCOPE_AUTH__HS256_SECRET"), "{err}");
    assert!(!dir.join(".mailscope").exists(), "no secret was made up");
    // With the server's secret given explicitly it mints.
    let ok = mailscope()
        .arg("token")
        .current_dir(&dir)
        .env(
            "MAILSCOPE_AUTH__HS256_SECRET",
            "a-shared-secret-of-at-least-32-bytes!!",
        )
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Start `mailscope serve` with no configuration in `dir` on `port`, and wait until it is ready.
async fn serve_in(dir: &std::path::Path, port: u16) -> std::process::Child {
    let mut child = mailscope()
        .arg("serve")
        .current_dir(dir)
        .env("MAILSCOPE_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    for _ in 0..240 {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            && r.status() == 200
        {
            return child;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("serve exited early with {status}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = child.kill();
    panic!("serve did not become ready");
}

fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Ctrl-C drains like SIGTERM: a request whose body is still arriving when SIGINT comes is
/// answered, and the process exits cleanly.
#[tokio::test]
async fn sigint_drains_requests_in_flight() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = std::env::temp_dir().join(format!("mailscope-sigint-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = unused_port();
    let child = serve_in(&dir, port).await;
    let token = mailscope().arg("token").current_dir(&dir).output().unwrap();
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout).unwrap();
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!(
        "PUT /v1/tenants/0b1c6a36-6b53-4bcb-8e56-0d4f5c7f3a11 HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
         Connection: close\r\n\r\n{{",
        token.trim()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The rest of the body arrives after the signal; the handler still answers.
    conn.write_all(b"}").await.unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut answer)).await;
    assert!(
        answer.starts_with("HTTP/1.1 422"),
        "the request in flight was answered: {answer:?}"
    );
    let mut child = child;
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "clean exit after SIGINT: {status}");
    assert!(
        !dir.join(".mailscope/pg/postmaster.pid").exists(),
        "the cluster was stopped"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A port already in use fails the start before anything else starts: no embedded cluster is
/// left running behind the failed process.
#[tokio::test]
async fn failed_start_leaves_no_cluster_running() {
    let dir = std::env::temp_dir().join(format!("mailscope-busy-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || {
            mailscope()
                .arg("serve")
                .current_dir(&dir)
                .env("MAILSCOPE_LISTEN", format!("127.0.0.1:{port}"))
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen"), "{err}");
    assert!(
        !dir.join(".mailscope/pg/postmaster.pid").exists(),
        "no cluster left running: {err}"
    );
    drop(taken);
    let _ = std::fs::remove_dir_all(&dir);
}
