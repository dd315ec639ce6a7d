//! Sandbox fidelity, round two (issue 13 items 4 and 5): cmdlet behaviour as Microsoft's cmdlet
//! pages document it, and a propagation tail that reaches past an hour by default.
#![allow(clippy::unwrap_used)]
use std::time::Duration;

use mailscope::config::Settings;
use mailscope::sandbox::SandboxSettings;
use mailscope::sandbox::settings::Pacing;
use serde_json::{Value, json};

use crate::sandbox_helpers::*;

fn policies_of(list: &[Value], app: &str) -> usize {
    list.iter()
        .filter(|p| {
            p["AppId"]
                .as_str()
                .is_some_and(|a| a.eq_ignore_ascii_case(app))
        })
        .count()
}

/// `-WhatIf` "simulates the actions of the command" and changes nothing
/// (https://learn.microsoft.com/powershell/module/exchange/new-applicationaccesspolicy and the
/// Set/Remove pages, docs/microsoft-365.md §2.1): still validated, never applied.
#[tokio::test]
async fn whatif_on_the_policy_cmdlets_validates_and_changes_nothing() {
    let sb = Sb::fast().await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let crm = sb.crm_token().await;
    let new = json!({"AppId": CRM_APP_ID, "PolicyScopeGroupId": "Sales Team",
        "AccessRight": "RestrictAccess", "Description": " ", "WhatIf": true});
    let r = sb.invoke(&t, "New-ApplicationAccessPolicy", new).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.bytes));
    let all = sb.cmd(&t, "Get-ApplicationAccessPolicy", Value::Null).await;
    assert_eq!(policies_of(&all, CRM_APP_ID), 0, "WhatIf created a policy");
    let test = |who: &str| json!({"Identity": who, "AppId": CRM_APP_ID});
    assert_eq!(
        sb.cmd(&t, "Test-ApplicationAccessPolicy", test("bob"))
            .await[0]["AccessCheckResult"],
        "Granted"
    );
    let bob = sb
        .graph(&crm, "GET", &format!("users/{}/messages", upn("bob")), None)
        .await;
    assert_eq!(bob.status, 200, "the app still reaches bob");
    // What would fail still fails under WhatIf.
    let shared = json!({"AppId": CRM_APP_ID, "PolicyScopeGroupId": "support",
        "AccessRight": "RestrictAccess", "WhatIf": true});
    assert_eq!(
        sb.invoke(&t, "New-ApplicationAccessPolicy", shared)
            .await
            .status,
        400
    );

    // A real policy; then Set and Remove with WhatIf leave it as it is.
    let p = sb
        .cmd(&t, "New-ApplicationAccessPolicy", json!({"AppId": CRM_APP_ID,
            "PolicyScopeGroupId": "Sales Team", "AccessRight": "RestrictAccess", "Description": "kept"}))
        .await;
    let id = p[0]["Identity"].as_str().unwrap().to_string();
    let r = sb
        .invoke(
            &t,
            "Set-ApplicationAccessPolicy",
            json!({"Identity": id, "Description": "changed", "WhatIf": true}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.bytes));
    let r = sb
        .invoke(
            &t,
            "Remove-ApplicationAccessPolicy",
            json!({"Identity": id, "WhatIf": true, "Confirm": false}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.bytes));
    let got = sb
        .cmd(&t, "Get-ApplicationAccessPolicy", json!({"Identity": id}))
        .await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["Description"], "kept");
    assert_eq!(
        sb.cmd(&t, "Test-ApplicationAccessPolicy", test("bob"))
            .await[0]["AccessCheckResult"],
        "Denied",
        "the policy is still in force"
    );
    // Without WhatIf, Remove removes.
    sb.cmd(
        &t,
        "Remove-ApplicationAccessPolicy",
        json!({"Identity": id, "Confirm": false}),
    )
    .await;
    let all = sb.cmd(&t, "Get-ApplicationAccessPolicy", Value::Null).await;
    assert_eq!(policies_of(&all, CRM_APP_ID), 0);
}

/// Microsoft's example 1 tests a group: `Test-ApplicationAccessPolicy -Identity "Engineering
/// Staff"` (https://learn.microsoft.com/powershell/module/exchange/test-applicationaccesspolicy).
#[tokio::test]
async fn test_application_access_policy_accepts_a_group() {
    let sb = Sb::fast().await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    sb.cmd(
        &t,
        "New-ApplicationAccessPolicy",
        json!({"AppId": CRM_APP_ID,
        "PolicyScopeGroupId": "Sales Team", "AccessRight": "RestrictAccess", "Description": " "}),
    )
    .await;
    let test = |who: &str| json!({"Identity": who, "AppId": CRM_APP_ID});
    let r = sb
        .cmd(&t, "Test-ApplicationAccessPolicy", test("Sales Team"))
        .await;
    assert_eq!(r[0]["Mailbox"], "Sales Team");
    assert_eq!(r[0]["MailboxId"], sb.recipient_id("Sales Team").await);
    assert_eq!(r[0]["AccessCheckResult"], "Granted");
    let r = sb
        .cmd(&t, "Test-ApplicationAccessPolicy", test("Finance Team"))
        .await;
    assert_eq!(r[0]["AccessCheckResult"], "Denied");
    // An Entra-only group is no Exchange recipient: still not found.
    assert_eq!(
        sb.invoke(&t, "Test-ApplicationAccessPolicy", test("Entra Admins"))
            .await
            .status,
        404
    );
}

/// `-Member` is optional in `Add-DistributionGroupMember`'s documented syntax
/// (https://learn.microsoft.com/powershell/module/exchange/add-distributiongroupmember).
#[tokio::test]
async fn add_distribution_group_member_without_member_changes_nothing() {
    let sb = Sb::fast().await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let r = sb
        .invoke(
            &t,
            "Add-DistributionGroupMember",
            json!({"Identity": "Sales Team", "BypassSecurityGroupManagerCheck": true}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.bytes));
    let members = sb
        .cmd(
            &t,
            "Get-DistributionGroupMember",
            json!({"Identity": "Sales Team"}),
        )
        .await;
    let names: Vec<&str> = members.iter().filter_map(|m| m["Name"].as_str()).collect();
    assert_eq!(names, ["alice"]);
    // The group must still exist.
    assert_eq!(
        sb.invoke(
            &t,
            "Add-DistributionGroupMember",
            json!({"Identity": "No Such Group"})
        )
        .await
        .status,
        404
    );
}

/// Microsoft: an access policy change "can take longer than 1 hour" to apply in Graph, even when
/// Test-ApplicationAccessPolicy already shows it (https://learn.microsoft.com/graph/auth-limit-mailbox-access,
/// docs/microsoft-365.md §8.3). With its default pacing the sandbox has front ends that adopt a
/// change only after the first hour, and mailscope's default deadlines outlast that tail.
#[tokio::test]
async fn by_default_a_policy_change_can_take_longer_than_an_hour_and_checks_wait_for_it() {
    // Microsoft's default pacing, but new groups and policies visible at once.
    let mut s = SandboxSettings::default();
    s.pacing.replication_delay = mailscope::sandbox::settings::DelayRange::ZERO;
    let sb = Sb::start(s).await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    sb.cmd(
        &t,
        "New-ApplicationAccessPolicy",
        json!({"AppId": CRM_APP_ID,
        "PolicyScopeGroupId": "Sales Team", "AccessRight": "RestrictAccess", "Description": " "}),
    )
    .await;
    // Exchange knows at once.
    assert_eq!(
        sb.cmd(
            &t,
            "Test-ApplicationAccessPolicy",
            json!({"Identity": "bob", "AppId": CRM_APP_ID})
        )
        .await[0]["AccessCheckResult"],
        "Denied"
    );
    // An hour later some front end still serves the old answer.
    sb.control("POST", "clock/advance", Some(json!({"by": "61m"})))
        .await;
    let status = sb
        .control("GET", &format!("tenants/{}/propagation", sb.tenant), None)
        .await
        .json();
    assert_eq!(status["settled"], false, "{status}");
    let crm = sb.crm_token().await;
    let mut codes = vec![];
    for _ in 0..40 {
        codes.push(
            sb.graph(
                &crm,
                "GET",
                &format!("users/{}/messages?$top=1", upn("bob")),
                None,
            )
            .await
            .status,
        );
    }
    assert!(
        codes.contains(&200),
        "bob still readable somewhere after an hour: {codes:?}"
    );
    // Two hours after the change every front end has it.
    sb.control("POST", "clock/advance", Some(json!({"by": "60m"})))
        .await;
    let crm = sb.crm_token().await;
    for _ in 0..20 {
        let c = sb
            .graph(
                &crm,
                "GET",
                &format!("users/{}/messages?$top=1", upn("bob")),
                None,
            )
            .await
            .status;
        assert_eq!(c, 403);
    }
    // mailscope's default deadlines outlast the tail with room to spare.
    let p = Settings::default().propagation;
    let tail = Pacing::default().propagation_delay.max;
    assert!(tail > Duration::from_secs(3600));
    assert!(
        Duration::from_secs(p.deadline_seconds) >= 4 * tail,
        "access policy deadline {}s vs tail {tail:?}",
        p.deadline_seconds
    );
    let rbac_tail = Pacing::default().rbac_propagation_delay.max;
    assert!(Duration::from_secs(p.rbac_deadline_seconds) >= 2 * rbac_tail);
}

/// `--tls`: https whose certificate a client trusts through the CA file alone (here rustls via
/// reqwest, which also enforces the CA's name constraints; tests/clients/run.sh runs Microsoft's
/// Python clients the same way).
#[tokio::test]
async fn the_tls_sandbox_is_trusted_through_its_ca_file_alone() {
    let dir = std::env::temp_dir().join(format!("mailscope-sb-tls-{}", uuid::Uuid::new_v4()));
    let mut s = SandboxSettings::fast();
    s.tls_dir = Some(dir.clone());
    let h = mailscope::sandbox::spawn(s).await.unwrap();
    assert!(
        h.base_url.starts_with("https://127.0.0.1:"),
        "{}",
        h.base_url
    );
    let ca = std::fs::read(h.ca_file.clone().unwrap()).unwrap();
    let url = format!(
        "{}/{}/v2.0/.well-known/openid-configuration",
        h.base_url,
        h.default_tenant_id()
    );
    // Without the CA the connection is refused; with it, the sandbox advertises https endpoints.
    let plain = reqwest::Client::builder().no_proxy().build().unwrap();
    assert!(plain.get(&url).send().await.is_err());
    let trusting = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let v: Value = trusting
        .get(&url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        v["token_endpoint"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/", h.base_url)),
        "{v}"
    );
    h.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
