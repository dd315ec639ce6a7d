//! `POST /v1/tenants/{id}/connection-test` against the sandbox: a registered tenant is checked
//! end to end, and each way a management app is commonly misconfigured is named with its fix.
use serde_json::{Value, json};

use crate::helpers::*;

async fn run(env: &WithSandbox) -> Value {
    env.api().post_empty("/connection-test", 200).await
}

fn step<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == name)
        .unwrap()
}

#[tokio::test]
async fn a_correctly_set_up_tenant_passes_every_step() {
    let env = WithSandbox::start().await;
    let report = run(&env).await;
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["steps"].as_array().unwrap().len(), 4);
    assert!(
        report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "passed")
    );
}

#[tokio::test]
async fn a_wrong_secret_is_named_and_nothing_leaks() {
    let env = WithSandbox::start().await;
    env.use_credential(
        &env.sandbox.management_client_id(),
        "definitely-not-the-secret",
    )
    .await;
    let report = run(&env).await;
    assert_eq!(report["ok"], false);
    let token = step(&report, "graph_token");
    assert_eq!(token["status"], "failed");
    assert_eq!(token["code"], "invalid_client_secret", "{report:#}");
    assert!(token["fix"].as_str().unwrap().len() > 10);
    assert_eq!(step(&report, "graph_call")["status"], "skipped");
    assert!(!report.to_string().contains("definitely-not-the-secret"));
}

#[tokio::test]
async fn missing_exchange_grants_are_told_apart() {
    let env = WithSandbox::start().await;
    // The app role but no Exchange admin directory role.
    let (id, secret) = env
        .sandbox_app(
            json!({"displayName": "half-set-up", "graphPermissions": ["Application.ReadWrite.All"],
                            "exchangePermissions": ["Exchange.ManageAsApp"], "directoryRoles": []}),
        )
        .await;
    env.use_credential(&id, &secret).await;
    let report = run(&env).await;
    assert_eq!(
        step(&report, "graph_call")["status"],
        "passed",
        "{report:#}"
    );
    let exo = step(&report, "exchange_call");
    assert_eq!(exo["code"], "missing_exchange_admin_role", "{report:#}");

    // Neither the app role nor the directory role.
    let (id, secret) = env
        .sandbox_app(
            json!({"displayName": "no-exchange", "graphPermissions": ["Application.ReadWrite.All"],
                            "exchangePermissions": [], "directoryRoles": []}),
        )
        .await;
    env.use_credential(&id, &secret).await;
    let report = run(&env).await;
    let exo = step(&report, "exchange_call");
    assert_eq!(exo["code"], "missing_manage_as_app_role", "{report:#}");
    assert!(
        exo["cause"]
            .as_str()
            .unwrap()
            .contains("Exchange.ManageAsApp"),
        "{report:#}"
    );
}

#[tokio::test]
async fn connection_test_of_an_unknown_tenant_is_404() {
    let env = WithSandbox::start().await;
    let path = "/v1/tenants/44444444-4444-4444-8444-444444444444/connection-test";
    env.app.api().post_empty(path, (404, "not_found")).await;
}
