//! The control API: call log, counters, tenants, settings, reset.
#![allow(clippy::unwrap_used)]
use serde_json::{Value, json};

use crate::sandbox_helpers::*;

#[tokio::test]
async fn call_log_keeps_order_and_counters_count_per_endpoint() {
    let sb = Sb::fast().await;
    let x = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let new = |scope: &str| json!({"AppId": CRM_APP_ID, "PolicyScopeGroupId": scope, "AccessRight": "RestrictAccess"});
    let old = sb
        .cmd(&x, "New-ApplicationAccessPolicy", new("Sales Team"))
        .await;
    // Replace the policy the safe way: create the new one first, then remove the old one.
    sb.cmd(&x, "New-ApplicationAccessPolicy", new("Finance Team"))
        .await;
    sb.invoke(
        &x,
        "Remove-ApplicationAccessPolicy",
        json!({"Identity": old[0]["Identity"]}),
    )
    .await;
    let calls = sb.calls("api=exchange").await;
    let cmdlets: Vec<&str> = calls
        .iter()
        .map(|c| c["cmdlet"].as_str().unwrap())
        .collect();
    assert_eq!(
        cmdlets,
        vec![
            "New-ApplicationAccessPolicy",
            "New-ApplicationAccessPolicy",
            "Remove-ApplicationAccessPolicy"
        ]
    );
    let seqs: Vec<u64> = calls.iter().map(|c| c["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(calls[1]["parameters"]["PolicyScopeGroupId"], "Finance Team");
    assert_eq!(calls[0]["status"], 200);
    assert_eq!(calls[0]["appId"], sb.h.management_client_id().as_str());
    let filtered = sb.calls("cmdlet=New-ApplicationAccessPolicy").await;
    assert_eq!(filtered.len(), 2);
    let counters = sb
        .control("GET", &format!("counters?tenant={}", sb.tenant), None)
        .await
        .json();
    assert_eq!(counters["exchange:New-ApplicationAccessPolicy"], 2);
    assert_eq!(counters["exchange:Remove-ApplicationAccessPolicy"], 1);
    assert_eq!(counters["login:token"], 1);
    let since = sb.calls(&format!("since={}", seqs[1])).await;
    assert_eq!(since.len(), 1);
    assert_eq!(sb.control("DELETE", "calls", None).await.status, 204);
    assert!(sb.calls("").await.is_empty());
}

#[tokio::test]
async fn reset_restores_the_fixture_and_keeps_credentials() {
    let sb = Sb::fast().await;
    let x = sb.mgmt_token(EXCHANGE_SCOPE).await;
    sb.cmd(&x, "New-ApplicationAccessPolicy", json!({"AppId": CRM_APP_ID, "PolicyScopeGroupId": "Sales Team", "AccessRight": "RestrictAccess"})).await;
    assert_eq!(sb.control("POST", "reset", None).await.status, 200);
    let x = sb.mgmt_token(EXCHANGE_SCOPE).await;
    assert!(
        sb.cmd(&x, "Get-ApplicationAccessPolicy", Value::Null)
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn tenants_mailboxes_and_groups_can_be_created() {
    let sb = Sb::fast().await;
    let r = sb
        .control(
            "POST",
            "tenants",
            Some(
                json!({"displayName": "Northwind", "domain": "northwind-sandbox.onmicrosoft.com"}),
            ),
        )
        .await;
    assert_eq!(r.status, 201);
    let v = r.json();
    let tid = v["tenant"]["id"].as_str().unwrap().to_string();
    let id = v["management"]["clientId"].as_str().unwrap().to_string();
    let secret = v["management"]["clientSecret"]
        .as_str()
        .unwrap()
        .to_string();
    let mb = sb
        .control(
            "POST",
            &format!("tenants/{tid}/mailboxes"),
            Some(json!({"name": "ivy", "displayName": "Ivy"})),
        )
        .await;
    assert_eq!(mb.status, 201);
    assert_eq!(
        mb.json()["userPrincipalName"],
        "ivy@northwind-sandbox.onmicrosoft.com"
    );
    let shared = sb
        .control(
            "POST",
            &format!("tenants/{tid}/mailboxes"),
            Some(json!({"name": "desk", "kind": "shared"})),
        )
        .await;
    assert_eq!(shared.json()["recipientTypeDetails"], "SharedMailbox");
    let g = sb
        .control(
            "POST",
            &format!("tenants/{tid}/groups"),
            Some(json!({"name": "Pilot", "members": ["ivy"]})),
        )
        .await;
    assert_eq!(
        g.json()["recipientTypeDetails"],
        "MailUniversalSecurityGroup"
    );
    assert_eq!(
        sb.control(
            "POST",
            &format!("tenants/{tid}/groups/Pilot/members"),
            Some(json!({"member": "desk"}))
        )
        .await
        .status,
        200
    );
    // The new tenant's management app works against its own tenant.
    let r = sb
        .token_request(
            &tid,
            &[
                ("client_id", &id),
                ("client_secret", &secret),
                ("scope", EXCHANGE_SCOPE),
                ("grant_type", "client_credentials"),
            ],
        )
        .await;
    let token = r.json()["access_token"].as_str().unwrap().to_string();
    let r = sb
        .c
        .post(sb.url(&format!("/adminapi/beta/{tid}/InvokeCommand")))
        .bearer_auth(&token)
        .json(&json!({"CmdletInput": {"CmdletName": "Get-DistributionGroupMember", "Parameters": {"Identity": "Pilot"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let members: Value = r.json().await.unwrap();
    assert_eq!(members["value"].as_array().unwrap().len(), 2);
    let list = sb.control("GET", "tenants", None).await.json();
    assert_eq!(list["value"].as_array().unwrap().len(), 3);
    assert_eq!(
        sb.control("POST", "tenants", Some(json!({"id": tid})))
            .await
            .status,
        409
    );
}

#[tokio::test]
async fn settings_are_readable_and_validated() {
    let sb = Sb::fast().await;
    let s = sb.control("GET", "settings", None).await.json();
    assert_eq!(s["pacing"]["frontEnds"], 4);
    assert_eq!(s["defaultBehaviour"]["aapNestedGroups"], "transitive");
    assert_eq!(s["defaultBehaviour"]["rbacNestedGroups"], "direct_only");
    let r = sb
        .control(
            "PATCH",
            "settings",
            Some(json!({"propagationDelay": "2s..5s", "frontEnds": 2})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["pacing"]["propagationDelay"], "2s..5s");
    assert_eq!(
        sb.control(
            "PATCH",
            "settings",
            Some(json!({"propagationDelay": "soon"}))
        )
        .await
        .status,
        400
    );
    assert_eq!(
        sb.control("PATCH", "settings", Some(json!({"noSuchThing": 1})))
            .await
            .status,
        400
    );
    assert_eq!(
        sb.control(
            "PATCH",
            &format!("tenants/{}/settings", sb.tenant),
            Some(json!({"anchorMailbox": "sometimes"}))
        )
        .await
        .status,
        400
    );
    let info = sb.control("GET", "info", None).await.json();
    assert_eq!(info["defaultTenantId"], sb.tenant.as_str());
    assert_eq!(
        info["managementApps"][0]["clientId"],
        sb.h.management_client_id().as_str()
    );
    let clock = sb
        .control("POST", "clock/advance", Some(json!({"by": "10m"})))
        .await
        .json();
    assert!(clock["elapsedSeconds"].as_f64().unwrap() >= 600.0);
}
