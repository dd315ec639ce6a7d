//! The connection test: every step reported with cause and fix, and nothing secret in the report.
use crate::m365_support::*;
use mailscope::m365::StepStatus;
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

async fn mount_graph_sp(server: &MockServer) {
    Mock::given(method("GET"))
        .and(path(format!(
            "/v1.0/servicePrincipals(appId='{CLIENT_ID}')"
        )))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(
                json!({"id": "sp-1", "appId": CLIENT_ID, "displayName": "mailscope"}),
            ),
        )
        .mount(server)
        .await;
}

fn step<'a>(
    r: &'a mailscope::m365::ConnectionTestReport,
    name: &str,
) -> &'a mailscope::m365::ConnectionTestStep {
    r.steps.iter().find(|s| s.step == name).unwrap()
}

#[tokio::test]
async fn all_steps_pass_against_a_healthy_tenant() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, Some(2)).await;
    mount_graph_sp(&server).await;
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"value": [{"Name": "alice"}]})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let report = tenant(&server).connection_test().await;
    assert!(report.ok, "{report:?}");
    let names: Vec<_> = report.steps.iter().map(|s| s.step.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "graph_token",
            "graph_call",
            "exchange_token",
            "exchange_call"
        ]
    );
    assert!(
        report
            .steps
            .iter()
            .all(|s| s.status == StepStatus::Passed && s.code.is_none())
    );
    assert_eq!(report.credential_kind, "client_secret");
}

#[tokio::test]
async fn missing_manage_as_app_is_named_with_its_fix() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    mount_graph_sp(&server).await;
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    let report = tenant(&server).connection_test().await;
    assert!(!report.ok);
    assert_eq!(step(&report, "graph_call").status, StepStatus::Passed);
    let x = step(&report, "exchange_call");
    assert_eq!(x.status, StepStatus::Failed);
    assert_eq!(x.code.as_deref(), Some("missing_manage_as_app_role"));
    assert!(
        x.cause
            .as_deref()
            .unwrap()
            .contains("lacks the Exchange.ManageAsApp role")
    );
    assert!(x.fix.as_deref().unwrap().contains("Exchange.ManageAsApp"));
    assert_eq!(x.http_status, Some(401));
}

#[tokio::test]
async fn missing_exchange_admin_role_is_named_with_its_fix() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    mount_graph_sp(&server).await;
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .respond_with(
            ResponseTemplate::new(403)
                .insert_header("content-encoding", "gzip")
                .set_body_bytes(vec![0u8; 16]),
        )
        .mount(&server)
        .await;
    let report = tenant(&server).connection_test().await;
    let x = step(&report, "exchange_call");
    assert_eq!(x.code.as_deref(), Some("missing_exchange_admin_role"));
    assert!(
        x.cause
            .as_deref()
            .unwrap()
            .contains("no Exchange Administrator role")
    );
}

#[tokio::test]
async fn wrong_secret_fails_both_tokens_skips_calls_and_never_shows_the_secret() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/{TENANT}/oauth2/v2.0/token")))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"error": "invalid_client",
            "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
            "error_codes": [7000215], "trace_id": "t-1"})))
        .expect(2)
        .mount(&server)
        .await;
    let report = tenant(&server).connection_test().await;
    assert!(!report.ok);
    for s in ["graph_token", "exchange_token"] {
        let st = step(&report, s);
        assert_eq!(st.status, StepStatus::Failed);
        assert_eq!(st.code.as_deref(), Some("invalid_client_secret"));
        assert_eq!(st.microsoft_code.as_deref(), Some("AADSTS7000215"));
    }
    assert_eq!(step(&report, "graph_call").status, StepStatus::Skipped);
    assert_eq!(step(&report, "exchange_call").status, StepStatus::Skipped);
    let body = serde_json::to_string(&report).unwrap();
    assert!(!body.contains(SECRET));
    assert!(body.contains("\"status\":\"skipped\""));
}
