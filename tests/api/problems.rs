//! Bad input gets a clear problem+json answer with a stable type, never a 500.
use crate::helpers::*;

const T: &str = "/v1/tenants/0b1c6a36-6b53-4bcb-8e56-0d4f5c7f3a11";

#[tokio::test]
async fn malformed_json_is_400() {
    let app = spawn_app().await;
    let res = app
        .api()
        .send_body(Method::PUT, T, "application/json", "{\"display_name\": ")
        .await;
    let body = assert_problem(res, 400, "malformed_json").await;
    assert_eq!(body["instance"], T);
}

#[tokio::test]
async fn wrong_content_type_is_415() {
    let app = spawn_app().await;
    let body = tenant_body("x").to_string();
    let res = app
        .api()
        .send_body(Method::PUT, T, "text/plain", body)
        .await;
    assert_problem(res, 415, "unsupported_media_type").await;
}

#[tokio::test]
async fn unknown_field_and_wrong_type_are_422() {
    let app = spawn_app().await;
    let mut body = tenant_body("x");
    body["colour"] = serde_json::json!("blue");
    let p = app.api().put(T, &body, (422, "validation_failed")).await;
    assert!(p["detail"].as_str().unwrap().contains("colour"), "{p}");

    let mut body = tenant_body("x");
    body["cloud"] = serde_json::json!("mars");
    app.api().put(T, &body, (422, "validation_failed")).await;
}

#[tokio::test]
async fn field_validation_names_every_bad_field() {
    let app = spawn_app().await;
    let body = serde_json::json!({
        "display_name": "",
        "cloud": "custom",
        "default_domain": "not a domain",
        "endpoints": {"login": "ftp://x"},
        "credentials": {"client_id": "nope", "certificate_pem": "garbage"},
        "canary_mailboxes": ["not-an-address"]
    });
    let p = app.api().put(T, &body, (422, "validation_failed")).await;
    let fields: Vec<&str> = p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    for f in [
        "display_name",
        "default_domain",
        "endpoints",
        "credentials.client_id",
        "credentials",
        "canary_mailboxes[0]",
    ] {
        assert!(fields.contains(&f), "{f} missing from {fields:?}");
    }
}

#[tokio::test]
async fn invalid_uuid_in_path_is_400() {
    let app = spawn_app().await;
    let p = app
        .api()
        .get("/v1/tenants/not-a-uuid", (400, "invalid_path_parameter"))
        .await;
    assert!(p["detail"].as_str().unwrap().contains("UUID"), "{p}");
}

#[tokio::test]
async fn invalid_query_is_400() {
    let app = spawn_app().await;
    for q in [
        "?limit=abc",
        "?limit=0",
        "?limit=100000",
        "?after=xyz",
        "?bogus=1",
    ] {
        app.api()
            .get(&format!("/v1/tenants{q}"), (400, "invalid_query"))
            .await;
    }
}

#[tokio::test]
async fn oversized_body_is_413() {
    let app = spawn_app_with(|s| s.http.body_limit_bytes = 2048).await;
    let mut body = tenant_body("x");
    body["display_name"] = serde_json::json!("x".repeat(4096));
    app.api().put(T, &body, (413, "payload_too_large")).await;
}

#[tokio::test]
async fn unknown_route_is_404_and_wrong_method_is_405() {
    let app = spawn_app().await;
    let anonymous = app.api().anonymous();
    anonymous.get("/v2/nothing", (404, "not_found")).await;
    app.api().post_empty(T, (405, "method_not_allowed")).await;
}

#[tokio::test]
async fn request_id_is_echoed_or_generated() {
    let app = spawn_app().await;
    let anonymous = app.api().anonymous();
    let res = anonymous
        .request(Method::GET, "/healthz")
        .header("x-request-id", "ticket-4711")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers().get("x-request-id").unwrap(), "ticket-4711");
    let res = anonymous
        .request(Method::GET, "/v1/tenants")
        .header("x-request-id", "ticket-4712")
        .send()
        .await
        .unwrap();
    let p = assert_problem(res, 401, "unauthenticated").await;
    assert_eq!(p["request_id"], "ticket-4712");
    // Unprintable or oversized ids are replaced by a generated one.
    let res = anonymous
        .request(Method::GET, "/healthz")
        .header("x-request-id", "x".repeat(500))
        .send()
        .await
        .unwrap();
    let rid = res.headers().get("x-request-id").unwrap().to_str().unwrap();
    assert!(uuid::Uuid::parse_str(rid).is_ok());
}

#[tokio::test]
async fn problem_types_resolve() {
    let app = spawn_app().await;
    let anonymous = app.api().anonymous();
    let t = anonymous.get("/problems/validation_failed", 200).await;
    assert_eq!(t["status"], 422);
    let all = anonymous.get("/problems", 200).await;
    assert!(all.as_array().unwrap().len() >= 10);
}

/// Input quoted in a problem (an unknown field's name here) is bounded: a caller cannot make the
/// answer, or the log line carrying it, as large as the request.
#[tokio::test]
async fn quoted_input_is_bounded() {
    let app = spawn_app().await;
    let mut body = tenant_body("x");
    body["z".repeat(20_000)] = serde_json::json!(1);
    let p = app.api().put(T, &body, (422, "validation_failed")).await;
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.chars().count() <= 601, "{} chars", detail.len());
    assert!(detail.ends_with('…'));
    for e in p["errors"].as_array().unwrap() {
        assert!(e["message"].as_str().unwrap().chars().count() <= 601);
    }
}

/// Text with a NUL character (U+0000) cannot be stored; every field that reaches the database
/// refuses it with a field error, never a 500.
#[tokio::test]
async fn nul_characters_are_refused_in_every_field() {
    let env = WithSandbox::start().await;
    let nul = "x\u{0}y";
    let mut tenant = tenant_body("a-secret-value");
    tenant["display_name"] = serde_json::json!(nul);
    let app_id = "b9701c1e-1364-464d-93e4-01ae925e8d6c";
    let cases = [
        (env.app.http.put(env.app.url(T)), tenant, "display_name"),
        (
            env.app.http.put(env.url("/scope-groups/crm")),
            serde_json::json!({"display_name": nul, "members": []}),
            "display_name",
        ),
        (
            env.app.http.put(env.url("/applications/crm")),
            serde_json::json!({"display_name": nul, "permissions": ["Mail.Read"]}),
            "display_name",
        ),
        (
            env.app.http.post(env.url("/access-policies")),
            serde_json::json!({"app_id": app_id, "scope": format!("crm{nul}"), "access_right": "RestrictAccess"}),
            "scope",
        ),
        (
            env.app.http.post(env.url("/access-policies")),
            serde_json::json!({"app_id": app_id, "scope": "crm", "access_right": "RestrictAccess",
                "canary_mailboxes": ["ok@contoso.com", nul]}),
            "canary_mailboxes[1]",
        ),
    ];
    for (req, body, field) in cases {
        let res = req
            .bearer_auth(env.app.admin())
            .json(&body)
            .send()
            .await
            .unwrap();
        let problem = assert_problem(res, 422, "validation_failed").await;
        assert_eq!(problem["errors"][0]["field"], field, "{problem}");
        assert!(
            problem["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("NUL"),
            "{problem}"
        );
    }
    // In the path too: 400, not 500.
    let res = env
        .app
        .http
        .put(env.url("/applications/crm%00x"))
        .bearer_auth(env.app.admin())
        .json(&serde_json::json!({"display_name": "ok", "permissions": ["Mail.Read"]}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 400, "invalid_path_parameter").await;
}

/// Send raw bytes on a fresh connection and read the whole answer (the server closes it).
async fn raw_exchange(app: &TestApp, request: &[u8]) -> (String, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer (and close) before it has read everything we send.
    let _ = conn.write_all(request).await;
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let problem = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"));
    (head.to_ascii_lowercase(), problem)
}

#[tokio::test]
async fn requests_the_http_parser_refuses_get_problem_documents_too() {
    let app = spawn_app().await;

    // More header fields than the parser takes (96): 431, as a problem with a request id.
    let mut req = format!("GET {T} HTTP/1.1\r\nhost: x\r\n");
    for i in 0..120 {
        req.push_str(&format!("x-filler-{i}: {i}\r\n"));
    }
    req.push_str("\r\n");
    let (head, p) = raw_exchange(&app, req.as_bytes()).await;
    assert!(head.starts_with("http/1.1 431 "), "{head}");
    assert!(
        head.contains("content-type: application/problem+json"),
        "{head}"
    );
    assert_eq!(p["code"], "request_headers_too_large");
    assert_eq!(p["status"], 431);
    assert_eq!(p["instance"], T);
    let rid = p["request_id"].as_str().unwrap();
    assert!(head.contains(&format!("x-request-id: {rid}")), "{head}");

    // One oversized header (a bloated token): the same answer.
    let req = format!(
        "GET {T} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let (head, p) = raw_exchange(&app, req.as_bytes()).await;
    assert!(head.starts_with("http/1.1 431 "), "{head}");
    assert_eq!(p["code"], "request_headers_too_large");

    // Not HTTP at all: 400 malformed_request.
    let (head, p) = raw_exchange(&app, b"GET / HTTP/1.1\r\nbad header line\r\n\r\n").await;
    assert!(head.starts_with("http/1.1 400 "), "{head}");
    assert_eq!(p["code"], "malformed_request");

    // The type URIs resolve in the catalogue like every other problem.
    let res = app
        .http
        .get(app.url("/problems/request_headers_too_large"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // And the connection-level rewrite leaves the API's own answers alone.
    app.api().get(T, (404, "not_found")).await;
}
