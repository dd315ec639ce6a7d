//! Test harness: the real application on port 0 against a fresh PostgreSQL database per test.
//!
//! `DATABASE_URL` names the server (default `postgres://postgres@127.0.0.1:5432/postgres`); each
//! test creates `mailscope_test_<uuid>` and drops it (WITH FORCE) when the `TestApp` is dropped.
use std::time::Duration;

pub use reqwest::Method;
use serde_json::Value;

use mailscope::app::{Application, Role};
use mailscope::config::{Secret, Settings};

pub const HS_SECRET: &str = "test-secret-0123456789-0123456789-abcdef";
pub const ENCRYPTION_KEY: &str = "q83vEjRWeJASNFZ4kBI0VniQEjRWeJASNFZ4kBI0Vng=";

static ADMIN_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `DATABASE_URL`, else the local server on 5432, else (a fresh machine) an embedded cluster
/// under `target/`, started once and reused by later runs.
pub fn admin_url() -> String {
    ADMIN_URL
        .get_or_init(|| {
            if let Ok(url) = std::env::var("DATABASE_URL") {
                return url;
            }
            let local: std::net::SocketAddr = ([127, 0, 0, 1], 5432).into();
            if std::net::TcpStream::connect_timeout(&local, Duration::from_secs(1)).is_ok() {
                return "postgres://postgres@127.0.0.1:5432/postgres".to_string();
            }
            std::thread::spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("target/test-postgres");
                    let pg = mailscope::store::embedded::EmbeddedPostgres::start(&dir)
                        .await
                        .expect(
                            "no PostgreSQL answers on 127.0.0.1:5432 and none could be started",
                        );
                    pg.maintenance_url().expose().to_string()
                })
            })
            .join()
            .unwrap()
        })
        .clone()
}

pub async fn admin_client() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL must answer at DATABASE_URL (default 127.0.0.1:5432, user postgres)");
    tokio::spawn(conn);
    client
}

/// A database created for one test and dropped with it.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let name = format!("mailscope_test_{}", uuid::Uuid::new_v4().simple());
        admin_client()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let mut cfg: tokio_postgres::Config = admin_url().parse().unwrap();
        cfg.dbname(&name);
        let url = url_with_db(&admin_url(), &name);
        TestDb { name, url }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }
}

fn url_with_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{base}/{db}{query}")
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async context; use a private runtime on a plain thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((c, conn)) =
                    tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            })
        })
        .join();
    }
}

pub fn test_settings(db_url: &str) -> Settings {
    let mut s = Settings {
        listen: "127.0.0.1:0".into(),
        ..Settings::default()
    };
    s.http.workers = Some(1);
    s.database.url = Some(Secret::new(db_url));
    s.database.pool_size = 4;
    s.database.acquire_timeout_seconds = 2;
    s.database.connect_timeout_seconds = 2;
    s.encryption_key = Some(Secret::new(ENCRYPTION_KEY));
    s.auth.hs256_secret = Some(Secret::new(HS_SECRET));
    s.shutdown_grace_seconds = 1;
    if std::env::var("TEST_LOG").is_ok() {
        mailscope::telemetry::init_logging(s.log_format, "info");
    }
    s
}

pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub settings: Settings,
    handle: actix_web::dev::ServerHandle,
    // Last: the database is dropped after the server handle.
    pub db: TestDb,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A token signed with the test HS256 secret.
    pub fn token(&self, roles: &[&str], tenants: &[&str]) -> String {
        let roles: Vec<String> = roles.iter().map(|s| s.to_string()).collect();
        let tenants: Vec<String> = tenants.iter().map(|s| s.to_string()).collect();
        mailscope::auth::mint_hs256(
            &self.settings.auth,
            HS_SECRET,
            "tester",
            &roles,
            &tenants,
            600,
        )
        .unwrap()
    }

    pub fn admin(&self) -> String {
        self.token(&["MailScope.Admin"], &["*"])
    }

    /// The service's API as an admin of every tenant.
    pub fn api(&self) -> TestClient {
        TestClient {
            base: self.base.clone(),
            http: self.http.clone(),
            token: Some(self.admin()),
        }
    }
}

/// A typed client for one HTTP API in tests (in the style of svix's test utilities): every
/// request carries the client's bearer token (if any), paths are relative to its base, and the
/// verb helpers assert the expected status (showing the body when it differs) and return the JSON
/// body (`null` when there is none).
#[derive(Clone)]
pub struct TestClient {
    pub base: String,
    pub http: reqwest::Client,
    pub token: Option<String>,
}

impl TestClient {
    /// The same API with another bearer token.
    pub fn with_token(&self, token: impl Into<String>) -> TestClient {
        TestClient {
            token: Some(token.into()),
            ..self.clone()
        }
    }

    /// The same API without a token.
    pub fn anonymous(&self) -> TestClient {
        TestClient {
            token: None,
            ..self.clone()
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request with the token, for what the helpers below do not cover (headers, raw bodies).
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, self.url(path));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Send with an optional JSON body; the response as it came.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> reqwest::Response {
        let mut req = self.request(method, path);
        if let Some(b) = body {
            req = req.json(b);
        }
        req.send().await.unwrap()
    }

    /// Send a body that is not JSON, with its content type; the response as it came.
    pub async fn send_body(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.request(method, path)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// Send, assert the outcome, return the JSON body (`null` when empty).
    pub async fn expect(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        expect: impl Into<Expect<'_>>,
    ) -> Value {
        let what = format!("{method} {path}");
        let res = self.send(method, path, body).await;
        match expect.into() {
            Expect::Status(status) => json_body(res, status, &what).await,
            Expect::Problem(status, code) => assert_problem(res, status, code).await,
        }
    }
}

/// The verbs: `get`, `delete` and `post_empty` send no body, `post`, `put` and `patch` a JSON
/// body; each asserts the outcome and returns the JSON body.
macro_rules! verbs {
    ($($name:ident: $method:ident),*; $($with_body:ident: $body_method:ident),*) => {
        impl TestClient {
            $(pub async fn $name(&self, path: &str, expect: impl Into<Expect<'_>>) -> Value {
                self.expect(Method::$method, path, None, expect).await
            })*
            $(pub async fn $with_body(
                &self,
                path: &str,
                body: &Value,
                expect: impl Into<Expect<'_>>,
            ) -> Value {
                self.expect(Method::$body_method, path, Some(body), expect).await
            })*
        }
    };
}

verbs!(get: GET, delete: DELETE, post_empty: POST; post: POST, put: PUT, patch: PATCH);

/// What a [`TestClient`] call must answer: a status (`200`), or an RFC 9457 problem with its
/// status and code (`(404, "not_found")`, checked by [`assert_problem`]).
#[derive(Debug, Clone, Copy)]
pub enum Expect<'c> {
    Status(u16),
    Problem(u16, &'c str),
}

impl From<u16> for Expect<'_> {
    fn from(status: u16) -> Self {
        Expect::Status(status)
    }
}

impl<'c> From<(u16, &'c str)> for Expect<'c> {
    fn from((status, code): (u16, &'c str)) -> Self {
        Expect::Problem(status, code)
    }
}

/// Assert the status of a response (showing its body when it differs) and return its JSON body
/// (`null` when empty).
pub async fn json_body(res: reqwest::Response, status: u16, what: &str) -> Value {
    let got = res.status().as_u16();
    let text = res.text().await.unwrap();
    assert_eq!(got, status, "{what}: {text}");
    if text.trim().is_empty() {
        return Value::Null;
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"))
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Sends the stop command at once; the worker threads wind down on their own.
        drop(self.handle.stop(false));
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let db = TestDb::create().await;
    let mut settings = test_settings(&db.url);
    adjust(&mut settings);
    let app = Application::build(settings.clone(), Role::All)
        .await
        .expect("application builds");
    let base = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    tokio::spawn(app.run_until_stopped());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    TestApp {
        base,
        http,
        settings,
        handle,
        db,
    }
}

/// A valid tenant registration body.
pub fn tenant_body(secret: &str) -> Value {
    serde_json::json!({
        "display_name": "Contoso",
        "cloud": "custom",
        "default_domain": "contoso.onmicrosoft.com",
        "endpoints": {"login": "http://127.0.0.1:9", "graph": "http://127.0.0.1:9", "exchange": "http://127.0.0.1:9"},
        "credentials": {"client_id": "6f1d7c55-2b1e-4d2a-9c65-8f3a1c2b4d5e", "client_secret": secret},
        "canary_mailboxes": ["ceo@contoso.onmicrosoft.com"]
    })
}

/// Assert an RFC 9457 response and return its body.
pub async fn assert_problem(res: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(res.status().as_u16(), status, "status");
    let ct = res
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(ct, "application/problem+json");
    let rid = res
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["type"], format!("/problems/{code}"), "{body}");
    assert_eq!(body["code"], code);
    assert_eq!(body["status"], status);
    assert_eq!(body["request_id"], rid, "request id in body equals header");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    assert!(body["title"].as_str().is_some());
    body
}

/// The service and a sandbox tenant registered with it (cloud `custom`, all three base URLs
/// pointing at the sandbox), as a user of the README would set them up.
pub struct WithSandbox {
    pub app: TestApp,
    pub sandbox: mailscope::sandbox::SandboxHandle,
    pub tenant: String,
}

impl WithSandbox {
    pub async fn start() -> WithSandbox {
        Self::start_with(mailscope::sandbox::SandboxSettings::fast()).await
    }

    pub async fn start_with(settings: mailscope::sandbox::SandboxSettings) -> WithSandbox {
        Self::start_adjusted(settings, |_| {}).await
    }

    /// Like `start_with`, with the service's settings adjusted (e.g. a longer database pool wait
    /// for tests that fire many concurrent requests).
    pub async fn start_adjusted(
        settings: mailscope::sandbox::SandboxSettings,
        adjust: impl FnOnce(&mut Settings),
    ) -> WithSandbox {
        use secrecy::ExposeSecret;
        let sandbox = mailscope::sandbox::spawn(settings)
            .await
            .expect("sandbox starts");
        let app = spawn_app_with(adjust).await;
        let tenant = sandbox.default_tenant_id();
        let body = sandbox_tenant_body(
            &sandbox,
            &sandbox.management_client_id(),
            sandbox.management_client_secret().expose_secret(),
        );
        app.api()
            .put(&format!("/v1/tenants/{tenant}"), &body, 201)
            .await;
        WithSandbox {
            app,
            sandbox,
            tenant,
        }
    }

    /// `/v1/tenants/{tenant}{rest}`
    pub fn url(&self, rest: &str) -> String {
        self.app.url(&format!("/v1/tenants/{}{rest}", self.tenant))
    }

    /// The sandbox tenant's part of the API (`/v1/tenants/{tenant}`), as an admin.
    pub fn api(&self) -> TestClient {
        TestClient {
            base: self.url(""),
            ..self.app.api()
        }
    }

    /// The sandbox's control API (`/_sandbox`), which takes no token.
    pub fn control(&self) -> TestClient {
        TestClient {
            base: format!("{}/_sandbox", self.sandbox.base_url),
            http: self.app.http.clone(),
            token: None,
        }
    }

    /// The sandbox's Graph (`/v1.0`) with an access token the sandbox issued.
    pub fn sandbox_graph(&self, token: &str) -> TestClient {
        TestClient {
            base: format!("{}/v1.0", self.sandbox.base_url),
            http: self.app.http.clone(),
            token: Some(token.to_string()),
        }
    }

    /// Calls per endpoint recorded by the sandbox for the tenant.
    pub async fn counters(&self) -> Value {
        let q = format!("/counters?tenant={}", self.tenant);
        self.control().get(&q, 200).await
    }

    /// The sandbox tenant as the control API shows it (directory, applications, policies).
    pub async fn sandbox_tenant(&self) -> Value {
        let q = format!("/tenants/{}", self.tenant);
        self.control().get(&q, 200).await
    }

    /// The tenant's calls the sandbox recorded for `api` (login, graph or exchange), in order.
    pub async fn sandbox_calls(&self, api: &str) -> Vec<Value> {
        let q = format!("/calls?api={api}&tenant={}", self.tenant);
        let v = self.control().get(&q, 200).await;
        v["value"].as_array().unwrap().clone()
    }

    /// Re-register the tenant with another management credential.
    pub async fn use_credential(&self, client_id: &str, secret: &str) {
        let body = sandbox_tenant_body(&self.sandbox, client_id, secret);
        self.api().put("", &body, 200).await;
    }

    /// Register an app in the sandbox tenant (control API) and return (client id, secret).
    pub async fn sandbox_app(&self, body: Value) -> (String, String) {
        let path = format!("/tenants/{}/credentials", self.tenant);
        let v = self.control().post(&path, &body, 201).await;
        (
            v["clientId"].as_str().unwrap().to_string(),
            v["clientSecret"].as_str().unwrap_or_default().to_string(),
        )
    }
}

pub fn sandbox_tenant_body(
    sandbox: &mailscope::sandbox::SandboxHandle,
    client_id: &str,
    secret: &str,
) -> Value {
    let base = &sandbox.base_url;
    serde_json::json!({
        "display_name": "Contoso (sandbox)",
        "cloud": "custom",
        "default_domain": "contoso-sandbox.onmicrosoft.com",
        "endpoints": {"login": base, "graph": base, "exchange": base},
        "credentials": {"client_id": client_id, "client_secret": secret},
    })
}

/// Issue 15 goal 3's witness: a second tenant, registered with the service, whose reads are timed
/// while the first tenant's writers call a slowed Microsoft.
pub struct OtherTenant {
    pub id: &'static str,
    token: String,
}

impl OtherTenant {
    pub async fn register(env: &WithSandbox) -> OtherTenant {
        let id = "33333333-3333-4333-8333-333333333333";
        env.app
            .api()
            .put(&format!("/v1/tenants/{id}"), &tenant_body("x"), 201)
            .await;
        OtherTenant {
            id,
            token: env.app.token(&["MailScope.Read"], &[id]),
        }
    }

    /// Read the tenant and `/v1/tenants/{id}{list}` over and over until `busy` has finished or
    /// `at_most` has passed: each answer's status and milliseconds.
    pub async fn reads_while<T>(
        &self,
        env: &WithSandbox,
        list: &str,
        busy: &tokio::task::JoinHandle<T>,
        at_most: Duration,
    ) -> Vec<(u16, u128)> {
        self.reads_until(env, list, at_most, || busy.is_finished())
            .await
    }

    /// The same reads for `how_long`.
    pub async fn reads_for(
        &self,
        env: &WithSandbox,
        list: &str,
        how_long: Duration,
    ) -> Vec<(u16, u128)> {
        self.reads_until(env, list, how_long, || false).await
    }

    async fn reads_until(
        &self,
        env: &WithSandbox,
        list: &str,
        at_most: Duration,
        done: impl Fn() -> bool,
    ) -> Vec<(u16, u128)> {
        let mut seen = Vec::new();
        let started = std::time::Instant::now();
        while !done() && started.elapsed() < at_most {
            for path in [
                format!("/v1/tenants/{}", self.id),
                format!("/v1/tenants/{}{list}", self.id),
            ] {
                let t = std::time::Instant::now();
                let res = env
                    .app
                    .http
                    .get(env.app.url(&path))
                    .bearer_auth(&self.token)
                    .send()
                    .await
                    .unwrap();
                seen.push((res.status().as_u16(), t.elapsed().as_millis()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    }
}

/// Assert that every read answered 200 within `max_ms`, and print the median and the maximum.
pub fn assert_reads_fast(what: &str, seen: &[(u16, u128)], max_ms: u128) {
    assert!(seen.len() >= 4, "too few reads ran during {what}: {seen:?}");
    let mut ms: Vec<u128> = seen.iter().map(|(_, ms)| *ms).collect();
    ms.sort();
    eprintln!(
        "tenant B's reads during {what}: {} answers, median {} ms, max {} ms",
        ms.len(),
        ms[ms.len() / 2],
        ms[ms.len() - 1]
    );
    assert!(
        seen.iter().all(|(s, _)| *s == 200),
        "during {what}: {seen:?}"
    );
    assert!(ms[ms.len() - 1] < max_ms, "during {what}: {seen:?}");
}

/// Slow every call to one of the sandbox's APIs (`graph` or `exchange`) by `ms`; 0 ends it.
pub async fn slow_api(env: &WithSandbox, api: &str, ms: u64) {
    env.control()
        .patch(
            "/settings",
            &serde_json::json!({"pacing": {"latency": format!("{ms}ms"), "faultApis": [api]}}),
            200,
        )
        .await;
}

/// Send one request to the sandbox tenant while every call to `api` (`graph` or `exchange`) is
/// slowed by 1.5 s, assert that `other`'s reads (of `list`) answer 200 within 1 s all along, and
/// return the request's status and body once Microsoft is fast again.
pub async fn assert_write_leaves_reads_fast(
    env: &WithSandbox,
    other: &OtherTenant,
    api: &str,
    (method, path, body): (Method, &str, Option<Value>),
    list: &str,
) -> (u16, String) {
    slow_api(env, api, 1_500).await;
    let write = {
        let (client, path) = (env.api(), path.to_string());
        tokio::spawn(async move {
            let res = client.send(method, &path, body.as_ref()).await;
            (res.status().as_u16(), res.text().await.unwrap())
        })
    };
    let seen = other
        .reads_while(env, list, &write, Duration::from_secs(10))
        .await;
    assert_reads_fast(&format!("{path} on a slow {api}"), &seen, 1_000);
    slow_api(env, api, 0).await;
    write.await.unwrap()
}
