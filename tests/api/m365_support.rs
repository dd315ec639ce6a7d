//! Shared helpers for the Microsoft 365 connector tests: a connector pointed at a wiremock
//! server (login, Graph and Exchange on one base URL), fake tokens, and a scripted responder
//! that records when each request arrived.
#![allow(dead_code)]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mailscope::domain::cloud::{Cloud, CloudEndpoints, EndpointOverrides};
use mailscope::domain::credential::ManagementCredential;
use mailscope::m365::{M365Client, M365Settings, TenantContext, TenantHandle};
use secrecy::SecretString;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

pub const TENANT: &str = "6f0c7a3e-1111-4c3b-9e2d-0a1b2c3d4e5f";
pub const CLIENT_ID: &str = "0d9a1c2b-2222-4e5f-8a9b-123456789abc";
pub const SECRET: &str = "s3cr3t~value+with/odd=chars";

/// Settings with short backoffs so retry tests finish quickly; limits stay realistic.
pub fn fast_settings() -> M365Settings {
    M365Settings {
        backoff_base_ms: 10,
        backoff_max_ms: 100,
        replication_poll_max_ms: 50,
        max_retry_after_ms: 5_000,
        graph_timeout_ms: 5_000,
        exchange_timeout_ms: 5_000,
        login_timeout_ms: 5_000,
        ..M365Settings::default()
    }
}

pub fn client(settings: M365Settings) -> (M365Client, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let c = M365Client::new(settings, &registry).expect("client builds");
    (c, registry)
}

pub fn secret_credential() -> ManagementCredential {
    ManagementCredential::ClientSecret {
        client_id: CLIENT_ID.into(),
        client_secret: SecretString::from(SECRET),
    }
}

pub fn endpoints(server: &MockServer) -> CloudEndpoints {
    let u = Some(server.uri());
    CloudEndpoints::resolve(
        Cloud::Custom,
        &EndpointOverrides {
            login: u.clone(),
            graph: u.clone(),
            exchange: u,
        },
    )
    .expect("endpoints")
}

pub fn context(
    server: &MockServer,
    tenant_id: &str,
    credential: ManagementCredential,
) -> TenantContext {
    TenantContext {
        tenant_id: tenant_id.into(),
        endpoints: endpoints(server),
        credential,
    }
}

/// A connector with fast settings and a secret credential for [`TENANT`].
pub fn tenant(server: &MockServer) -> TenantHandle {
    tenant_with(server, fast_settings())
}

pub fn tenant_with(server: &MockServer, settings: M365Settings) -> TenantHandle {
    let (c, _) = client(settings);
    c.tenant(context(server, TENANT, secret_credential()))
}

/// An unsigned JWT-shaped token carrying `tid` (the connector only reads it for routing).
pub fn fake_jwt(tid: &str, aud: &str) -> String {
    let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let p = URL_SAFE_NO_PAD.encode(serde_json::json!({ "tid": tid, "aud": aud }).to_string());
    format!("{h}.{p}.c2ln")
}

pub fn token_body(expires_in: u64) -> serde_json::Value {
    serde_json::json!({
        "token_type": "Bearer",
        "expires_in": expires_in,
        "access_token": fake_jwt(TENANT, "https://graph.microsoft.com")
    })
}

/// Token endpoint for `tenant`, answering any number of times unless `expect` is given.
pub async fn mount_token(server: &MockServer, tenant: &str, expect: Option<u64>) {
    let m = Mock::given(method("POST"))
        .and(path(format!("/{tenant}/oauth2/v2.0/token")))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body(3599)));
    let m = match expect {
        Some(n) => m.expect(n),
        None => m,
    };
    m.mount(server).await;
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Hit {
    pub at: Instant,
    pub wall: SystemTime,
    pub path: String,
    pub status: u16,
    pub body: Vec<u8>,
}

type ScriptFn = dyn Fn(&Request, usize) -> (u16, ResponseTemplate) + Send + Sync;

/// A responder driven by a closure `(request, n-th request on this path) -> (status, response)`,
/// recording arrival times so tests can assert that no request came before a `Retry-After`.
#[derive(Clone)]
pub struct Script {
    pub hits: Arc<Mutex<Vec<Hit>>>,
    f: Arc<ScriptFn>,
}

impl Script {
    pub fn new(
        f: impl Fn(&Request, usize) -> (u16, ResponseTemplate) + Send + Sync + 'static,
    ) -> Self {
        Script {
            hits: Arc::new(Mutex::new(Vec::new())),
            f: Arc::new(f),
        }
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    pub fn hits_on(&self, p: &str) -> Vec<Hit> {
        self.hits().into_iter().filter(|h| h.path == p).collect()
    }
}

impl Respond for Script {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut hits = self.hits.lock().unwrap();
        let p = request.url.path().to_string();
        let n = hits.iter().filter(|h| h.path == p).count();
        let (status, t) = (self.f)(request, n);
        hits.push(Hit {
            at: Instant::now(),
            wall: SystemTime::now(),
            path: p,
            status,
            body: request.body.clone(),
        });
        t
    }
}

pub fn json(status: u16, v: serde_json::Value) -> (u16, ResponseTemplate) {
    (status, ResponseTemplate::new(status).set_body_json(v))
}

/// The Exchange InvokeCommand path for [`TENANT`].
pub fn invoke_path() -> String {
    format!("/adminapi/beta/{TENANT}/InvokeCommand")
}

/// Sum of a counter family's samples whose labels include all `labels`.
pub fn counter(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| m.get_counter().get_value())
        .sum()
}
