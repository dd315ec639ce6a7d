//! The OpenAPI document declares what the service answers: every status an operation can return
//! by its shape (path UUIDs, query, body, Idempotency-Key, token), checked in the document and
//! against the running service with malformed requests.
use crate::helpers::*;
use serde_json::{Value, json};

const METHODS: &[&str] = &["get", "put", "post", "delete", "patch"];

/// (method, path template, operation) of every `/v1` operation in the generated document.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/v1/") {
            continue;
        }
        for m in METHODS {
            if let Some(op) = item.get(*m) {
                out.push((m.to_string(), path.clone(), op.clone()));
            }
        }
    }
    assert!(out.len() > 30, "the document lists the API's operations");
    out
}

fn params<'a>(op: &'a Value, location: &str) -> Vec<&'a Value> {
    op["parameters"]
        .as_array()
        .map(|ps| ps.iter().filter(|p| p["in"] == location).collect())
        .unwrap_or_default()
}

fn is_uuid(p: &Value) -> bool {
    p["schema"]["format"] == "uuid"
}

fn document() -> Value {
    serde_json::from_str(&mailscope::api::openapi::document_json()).unwrap()
}

#[test]
fn every_operation_declares_the_statuses_of_its_kind() {
    let doc = document();
    let mut missing = Vec::new();
    for (method, path, op) in operations(&doc) {
        let responses = &op["responses"];
        let mut want = |status: &str, code: &str| {
            let r = &responses[status];
            let problem = r["content"]["application/problem+json"]["schema"]["$ref"]
                == "#/components/schemas/Problem";
            let named = code.is_empty() || r["description"].as_str().unwrap_or("").contains(code);
            if !problem || !named {
                missing.push(format!("{method} {path}: {status} {code}"));
            }
        };
        want("401", "");
        want("403", "");
        want("503", "");
        if params(&op, "path").iter().any(|p| is_uuid(p)) {
            want("400", "invalid_path_parameter");
        }
        if !params(&op, "query").is_empty() {
            want("400", "invalid_query");
        }
        if let Some(content) = op["requestBody"]["content"].as_object() {
            if content.contains_key("application/json") {
                want("400", "malformed_json");
                want("422", "validation_failed");
            }
            want("413", "payload_too_large");
            want("415", "unsupported_media_type");
        }
        if method == "post" || method == "patch" {
            want("400", "invalid_idempotency_key");
            want("409", "idempotency_key_in_use");
            want("422", "idempotency_key_reused");
            if !params(&op, "header")
                .iter()
                .any(|p| p["name"] == "Idempotency-Key")
            {
                missing.push(format!("{method} {path}: the Idempotency-Key header"));
            }
        }
    }
    let put_group = &doc["paths"]["/v1/tenants/{tenant_id}/scope-groups/{alias}"]["put"];
    if !put_group["responses"]["409"]["description"]
        .as_str()
        .unwrap_or("")
        .contains("already_exists")
    {
        missing.push("put scope group: 409 already_exists".into());
    }
    assert!(
        missing.is_empty(),
        "undeclared statuses:\n{}",
        missing.join("\n")
    );
}

/// Malformed requests to every operation get a problem whose status the operation declares.
#[tokio::test]
async fn what_the_service_answers_to_malformed_requests_is_declared() {
    let app = spawn_app().await;
    let admin = app.admin();
    let doc = document();
    let mut undeclared = Vec::new();
    for (method, template, op) in operations(&doc) {
        let path_params = params(&op, "path");
        let fill = |bad: Option<&str>| {
            let mut path = template.clone();
            for p in &path_params {
                let name = p["name"].as_str().unwrap();
                let value = if Some(name) == bad {
                    "not-a-uuid".to_string()
                } else if is_uuid(p) {
                    uuid::Uuid::new_v4().to_string()
                } else {
                    "x".to_string()
                };
                path = path.replace(&format!("{{{name}}}"), &value);
            }
            path
        };
        let body = op["requestBody"]["content"].as_object().cloned();
        let keyed = method == "post" || method == "patch";
        let m = reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
        let send = |path: String, token: Option<&str>| {
            let mut rb = app.http.request(m.clone(), app.url(&path));
            if let Some(t) = token {
                rb = rb.bearer_auth(t);
            }
            rb
        };

        let mut cases: Vec<(String, reqwest::RequestBuilder)> = vec![
            ("no token".into(), send(fill(None), None)),
            ("as is".into(), send(fill(None), Some(&admin))),
        ];
        for p in path_params.iter().filter(|p| is_uuid(p)) {
            let name = p["name"].as_str().unwrap();
            cases.push((
                format!("{name} not a UUID"),
                send(fill(Some(name)), Some(&admin)),
            ));
        }
        for p in params(&op, "query") {
            let name = p["name"].as_str().unwrap();
            let ty = &p["schema"]["type"];
            if p["schema"]["format"] == "uuid" || *ty == "integer" || *ty == "boolean" {
                cases.push((
                    format!("?{name}=nope"),
                    send(format!("{}?{name}=nope", fill(None)), Some(&admin)),
                ));
            }
        }
        if body.is_some() {
            cases.push(("no body".into(), send(fill(None), Some(&admin))));
            cases.push((
                "broken JSON".into(),
                send(fill(None), Some(&admin))
                    .header("content-type", "application/json")
                    .body("{"),
            ));
            cases.push((
                "unknown field".into(),
                send(fill(None), Some(&admin)).json(&json!({"no_such_field": 1})),
            ));
        }
        if keyed {
            cases.push((
                "bad Idempotency-Key".into(),
                send(fill(None), Some(&admin))
                    .header("idempotency-key", "k".repeat(300))
                    .json(&json!({})),
            ));
        }
        for (case, rb) in cases {
            let res = rb.send().await.unwrap();
            let status = res.status().as_u16();
            let ct = res
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            if status >= 400 && ct != "application/problem+json" {
                undeclared.push(format!("{method} {template} ({case}): {status} as `{ct}`"));
            }
            if op["responses"].get(status.to_string()).is_none() {
                undeclared.push(format!("{method} {template} ({case}): {status}"));
            }
        }
    }
    assert!(
        undeclared.is_empty(),
        "answers the document does not declare:\n{}",
        undeclared.join("\n")
    );
}

/// The schema a property resolves to (through `$ref` and a nullable `oneOf`).
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        return resolve(doc, &doc["components"]["schemas"][name]);
    }
    if let Some(one_of) = schema["oneOf"].as_array()
        && let Some(s) = one_of.iter().find(|s| s["type"] != "null")
    {
        return resolve(doc, s);
    }
    schema
}

#[test]
fn fixed_value_fields_are_enums_and_client_ids_are_uuids() {
    let doc = document();
    let schemas = &doc["components"]["schemas"];
    let enums: &[(&str, &str, &[&str])] = &[
        (
            "PropagationCheck",
            "state",
            &[
                "queued",
                "running",
                "succeeded",
                "misconfigured",
                "timed_out",
                "cancelled",
                "failed",
            ],
        ),
        (
            "PropagationCheck",
            "stage",
            &["configuration", "live", "done"],
        ),
        (
            "PropagationCheck",
            "verified_by",
            &["graph", "exchange_test"],
        ),
        ("PropagationCheck", "origin", &["manual", "access_policy"]),
        (
            "AccessPolicy",
            "state",
            &["pending_propagation", "in_force", "unverified"],
        ),
        (
            "AccessPolicy",
            "origin",
            &["created", "adopted", "imported"],
        ),
        ("ApplicationView", "state", &["creating", "ready"]),
        ("ApplicationView", "origin", &["created", "adopted"]),
        ("ApplicationSummary", "state", &["creating", "ready"]),
        ("ApplicationSummary", "origin", &["created", "adopted"]),
        ("ScopeGroup", "origin", &["created", "adopted", "imported"]),
        (
            "ConnectionTestStep",
            "step",
            &[
                "graph_token",
                "graph_call",
                "exchange_token",
                "exchange_call",
            ],
        ),
        (
            "ConnectionTestReport",
            "credential_kind",
            &["client_secret", "certificate"],
        ),
        (
            "CredentialSummary",
            "kind",
            &["client_secret", "certificate"],
        ),
        (
            "LocalVerdict",
            "rule",
            &["deny_match", "restrict_match", "restrict_miss", "no_policy"],
        ),
    ];
    let mut wrong = Vec::new();
    for (schema, field, values) in enums {
        let s = resolve(&doc, &schemas[schema]["properties"][field]);
        if s["enum"] != json!(values) {
            wrong.push(format!(
                "{schema}.{field} is {s}, not an enum of {values:?}"
            ));
        }
    }
    // A client id is a UUID wherever it appears, inputs included.
    for (name, schema) in schemas.as_object().unwrap() {
        if let Some(p) = schema["properties"].get("app_id")
            && resolve(&doc, p)["format"] != "uuid"
        {
            wrong.push(format!("{name}.app_id is {p}, not a uuid"));
        }
    }
    let client_id = &schemas["CredentialsInput"]["properties"]["client_id"];
    if client_id["format"] != "uuid" {
        wrong.push(format!(
            "CredentialsInput.client_id is {client_id}, not a uuid"
        ));
    }
    let list = &doc["paths"]["/v1/tenants/{tenant_id}/access-policies"]["get"];
    for p in params(list, "query") {
        if p["name"] == "app_id" && p["schema"]["format"] != "uuid" {
            wrong.push(format!("the list's app_id is {p}"));
        }
    }
    let checks = &doc["paths"]["/v1/tenants/{tenant_id}/propagation-checks"]["get"];
    for p in params(checks, "query") {
        if p["name"] == "state" && resolve(&doc, &p["schema"])["enum"].as_array().is_none() {
            wrong.push(format!("the checks list's state filter is {p}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
