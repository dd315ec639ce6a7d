//! Helpers for the sandbox tests: start an in-process sandbox on port 0 and talk to it over HTTP
//! exactly as a client would.
#![allow(clippy::unwrap_used)]
use mailscope::sandbox::{SandboxHandle, SandboxSettings, spawn};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";
pub const EXCHANGE_SCOPE: &str = "https://outlook.office365.com/.default";
/// The CRM app of the default fixture (Mail.Read, Mail.Send, Calendars.Read, User.Read.All).
pub const CRM_APP_ID: &str = "b9701c1e-1364-464d-93e4-01ae925e8d6c";
pub const CRM_SECRET: &str = "sandbox-crm-secret-not-for-production";

pub struct Sb {
    pub h: SandboxHandle,
    pub c: reqwest::Client,
    pub tenant: String,
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub bytes: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap_or(Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    }
}

async fn reply(r: reqwest::Response) -> Reply {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let bytes = r.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
    Reply {
        status,
        headers,
        bytes,
    }
}

impl Sb {
    /// A sandbox where everything takes effect at once.
    pub async fn fast() -> Sb {
        Sb::start(SandboxSettings::fast()).await
    }

    pub async fn start(settings: SandboxSettings) -> Sb {
        let h = spawn(settings).await.expect("sandbox starts");
        let tenant = h.default_tenant_id();
        let c = reqwest::Client::builder().no_proxy().build().unwrap();
        Sb { h, c, tenant }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.h.base_url, path)
    }

    pub async fn token_request(&self, tenant: &str, form: &[(&str, &str)]) -> Reply {
        let r = self
            .c
            .post(self.url(&format!("/{tenant}/oauth2/v2.0/token")))
            .form(form)
            .send()
            .await
            .unwrap();
        reply(r).await
    }

    pub async fn token_for(&self, client_id: &str, secret: &str, scope: &str) -> String {
        let r = self
            .token_request(
                &self.tenant,
                &[
                    ("client_id", client_id),
                    ("client_secret", secret),
                    ("scope", scope),
                    ("grant_type", "client_credentials"),
                ],
            )
            .await;
        assert_eq!(
            r.status,
            200,
            "token: {}",
            String::from_utf8_lossy(&r.bytes)
        );
        r.json()["access_token"].as_str().unwrap().to_string()
    }

    pub async fn mgmt_token(&self, scope: &str) -> String {
        let id = self.h.management_client_id();
        let secret = self.h.management_client_secret();
        self.token_for(&id, secret.expose_secret(), scope).await
    }

    pub async fn crm_token(&self) -> String {
        self.token_for(CRM_APP_ID, CRM_SECRET, GRAPH_SCOPE).await
    }

    /// InvokeCommand with the app-only anchor, by tenant GUID.
    pub async fn invoke(&self, token: &str, cmdlet: &str, params: Value) -> Reply {
        self.invoke_on(&self.tenant.clone(), token, cmdlet, params, &[])
            .await
    }

    pub async fn invoke_on(
        &self,
        tenant: &str,
        token: &str,
        cmdlet: &str,
        params: Value,
        extra_headers: &[(&str, &str)],
    ) -> Reply {
        let mut input = json!({"CmdletName": cmdlet});
        if !params.is_null() {
            input["Parameters"] = params;
        }
        let mut req = self
            .c
            .post(self.url(&format!("/adminapi/beta/{tenant}/InvokeCommand")))
            .bearer_auth(token)
            .json(&json!({"CmdletInput": input}));
        if !extra_headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("X-AnchorMailbox"))
        {
            req = req.header(
                "X-AnchorMailbox",
                format!(
                    "APP:SystemMailbox{{bb558c35-97f1-4cb9-8ff7-d53741dc928c}}@{}",
                    self.tenant
                ),
            );
        }
        for (k, v) in extra_headers {
            req = req.header(*k, *v);
        }
        reply(req.send().await.unwrap()).await
    }

    /// InvokeCommand that must succeed; returns `value`.
    pub async fn cmd(&self, token: &str, cmdlet: &str, params: Value) -> Vec<Value> {
        let r = self.invoke(token, cmdlet, params).await;
        assert_eq!(
            r.status,
            200,
            "{cmdlet}: {}",
            String::from_utf8_lossy(&r.bytes)
        );
        r.json()["value"].as_array().cloned().unwrap_or_default()
    }

    pub async fn graph(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> Reply {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .c
            .request(m, self.url(&format!("/v1.0/{path}")))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        reply(req.send().await.unwrap()).await
    }

    pub async fn control(&self, method: &str, path: &str, body: Option<Value>) -> Reply {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.c.request(m, self.url(&format!("/_sandbox/{path}")));
        if let Some(b) = body {
            req = req.json(&b);
        }
        reply(req.send().await.unwrap()).await
    }

    /// Register an app through the control API; returns (client id, secret, service principal id).
    pub async fn new_app(&self, body: Value) -> (String, String, String) {
        let r = self
            .control(
                "POST",
                &format!("tenants/{}/credentials", self.tenant),
                Some(body),
            )
            .await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.bytes));
        let v = r.json();
        (
            v["clientId"].as_str().unwrap().to_string(),
            v["clientSecret"].as_str().unwrap_or_default().to_string(),
            v["servicePrincipalId"].as_str().unwrap().to_string(),
        )
    }

    /// Entra object id of a fixture recipient by name.
    pub async fn recipient_id(&self, name: &str) -> String {
        let v = self
            .control("GET", &format!("tenants/{}", self.tenant), None)
            .await
            .json();
        v["recipients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no recipient {name}"))["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn calls(&self, query: &str) -> Vec<Value> {
        self.control("GET", &format!("calls?{query}"), None)
            .await
            .json()["value"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

pub fn upn(name: &str) -> String {
    format!("{name}@contoso-sandbox.onmicrosoft.com")
}
