//! Propagation: Test cmdlets see changes at once, Graph front ends adopt them over time and flap
//! in between. Long simulated delays are stepped through with the sandbox clock, so these tests
//! never depend on how fast the machine is.
#![allow(clippy::unwrap_used)]
use std::time::Duration;

use mailscope::sandbox::SandboxSettings;
use mailscope::sandbox::settings::DelayRange;
use serde_json::{Value, json};

use crate::sandbox_helpers::*;

fn slow(min: u64, max: u64) -> SandboxSettings {
    let mut s = SandboxSettings::fast();
    s.seed = 7;
    s.pacing.front_ends = 4;
    s.pacing.propagation_delay =
        DelayRange::between(Duration::from_secs(min), Duration::from_secs(max));
    s.pacing.rbac_propagation_delay =
        DelayRange::between(Duration::from_secs(min * 2), Duration::from_secs(max * 2));
    s
}

/// Status codes of `n` identical Graph calls.
async fn sample(sb: &Sb, token: &str, user: &str, n: usize) -> Vec<u16> {
    let mut out = vec![];
    for _ in 0..n {
        out.push(
            sb.graph(
                token,
                "GET",
                &format!("users/{}/messages?$top=1", upn(user)),
                None,
            )
            .await
            .status,
        );
    }
    out
}

/// Seconds until each front end adopts the pending change (application access policy channel).
async fn pending(sb: &Sb, channel: &str) -> Vec<f64> {
    let v = sb
        .control("GET", &format!("tenants/{}/propagation", sb.tenant), None)
        .await
        .json();
    v[channel]["frontEnds"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| {
            f["pending"]
                .as_array()
                .unwrap()
                .last()
                .map(|p| p["inSeconds"].as_f64().unwrap())
        })
        .collect()
}

#[tokio::test]
async fn policy_change_flaps_in_graph_until_every_front_end_has_it() {
    let sb = Sb::start(slow(600, 1800)).await;
    let x = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let crm = sb.crm_token().await;
    assert!(sample(&sb, &crm, "bob", 8).await.iter().all(|s| *s == 200));
    sb.cmd(&x, "New-ApplicationAccessPolicy", json!({"AppId": CRM_APP_ID, "PolicyScopeGroupId": "Sales Team", "AccessRight": "RestrictAccess"})).await;
    // Exchange's Test cmdlet knows at once…
    let t = sb
        .cmd(
            &x,
            "Test-ApplicationAccessPolicy",
            json!({"Identity": "bob", "AppId": CRM_APP_ID}),
        )
        .await;
    assert_eq!(t[0]["AccessCheckResult"], "Denied");
    // …while Graph still serves the old answer everywhere.
    assert!(sample(&sb, &crm, "bob", 12).await.iter().all(|s| *s == 200));
    let times = pending(&sb, "applicationAccessPolicies").await;
    assert_eq!(times.len(), 4);
    let (first, last) = (
        times.iter().cloned().fold(f64::MAX, f64::min),
        times.iter().cloned().fold(0.0, f64::max),
    );
    assert!(
        first >= 590.0 && last <= 1800.0 && first < last,
        "{times:?}"
    );
    // Just after the first front end adopted it: answers flap between old and new.
    sb.h.advance_clock(Duration::from_secs_f64(first + 1.0));
    let flapping = sample(&sb, &crm, "bob", 40).await;
    assert!(
        flapping.contains(&200) && flapping.contains(&403),
        "{flapping:?}"
    );
    // alice (in scope) is granted throughout.
    assert!(
        sample(&sb, &crm, "alice", 10)
            .await
            .iter()
            .all(|s| *s == 200)
    );
    // Once every front end has it, the answer is stable.
    sb.h.advance_clock(Duration::from_secs_f64(last - first + 1.0));
    assert!(sample(&sb, &crm, "bob", 20).await.iter().all(|s| *s == 403));
    let v = sb
        .control("GET", &format!("tenants/{}/propagation", sb.tenant), None)
        .await
        .json();
    assert_eq!(
        v["applicationAccessPolicies"]["frontEnds"][0]["pending"],
        json!([])
    );
}

#[tokio::test]
async fn removal_and_membership_changes_propagate_too() {
    let sb = Sb::start(slow(300, 900)).await;
    let x = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let crm = sb.crm_token().await;
    let p = sb.cmd(&x, "New-ApplicationAccessPolicy", json!({"AppId": CRM_APP_ID, "PolicyScopeGroupId": "Sales Team", "AccessRight": "RestrictAccess"})).await;
    sb.control(
        "POST",
        &format!("tenants/{}/propagation/settle", sb.tenant),
        None,
    )
    .await;
    assert!(sample(&sb, &crm, "bob", 8).await.iter().all(|s| *s == 403));
    // Membership: bob joins the scope group. Test sees it now, Graph later.
    let r = sb.invoke(&x, "Add-DistributionGroupMember", json!({"Identity": "Sales Team", "Member": "bob", "BypassSecurityGroupManagerCheck": true})).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        sb.cmd(
            &x,
            "Test-ApplicationAccessPolicy",
            json!({"Identity": "bob", "AppId": CRM_APP_ID})
        )
        .await[0]["AccessCheckResult"],
        "Granted"
    );
    assert!(sample(&sb, &crm, "bob", 8).await.iter().all(|s| *s == 403));
    sb.h.advance_clock(Duration::from_secs(901));
    assert!(sample(&sb, &crm, "bob", 8).await.iter().all(|s| *s == 200));
    // Removing the last RestrictAccess policy reopens the tenant, after propagation.
    let id = p[0]["Identity"].as_str().unwrap();
    sb.cmd(
        &x,
        "Remove-ApplicationAccessPolicy",
        json!({"Identity": id}),
    )
    .await;
    assert!(
        sample(&sb, &crm, "carol", 8)
            .await
            .iter()
            .all(|s| *s == 403)
    );
    sb.h.advance_clock(Duration::from_secs(901));
    assert!(
        sample(&sb, &crm, "carol", 8)
            .await
            .iter()
            .all(|s| *s == 200)
    );
}

#[tokio::test]
async fn rbac_changes_use_their_own_delay_and_test_authorization_is_immediate() {
    let sb = Sb::start(slow(100, 200)).await;
    let x = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let (app_id, secret, sp_id) = sb.new_app(json!({"displayName": "rbac"})).await;
    sb.cmd(
        &x,
        "New-ServicePrincipal",
        json!({"AppId": app_id, "ObjectId": sp_id}),
    )
    .await;
    sb.cmd(
        &x,
        "New-ManagementRoleAssignment",
        json!({"Role": "Application Mail.Read", "App": sp_id}),
    )
    .await;
    let rows = sb
        .cmd(
            &x,
            "Test-ServicePrincipalAuthorization",
            json!({"Identity": app_id, "Resource": "bob"}),
        )
        .await;
    assert_eq!(rows[0]["InScope"], true);
    let t = sb.token_for(&app_id, &secret, GRAPH_SCOPE).await;
    assert!(sample(&sb, &t, "bob", 6).await.iter().all(|s| *s == 403));
    // Past the AAP delay but before the (doubled) RBAC delay: still the old answer.
    sb.h.advance_clock(Duration::from_secs(201));
    let rbac = pending(&sb, "rbac").await;
    assert!(rbac.iter().all(|s| *s > 0.0), "{rbac:?}");
    assert!(sample(&sb, &t, "bob", 6).await.iter().all(|s| *s == 403));
    sb.h.advance_clock(Duration::from_secs(200));
    assert!(sample(&sb, &t, "bob", 6).await.iter().all(|s| *s == 200));
}

#[tokio::test]
async fn real_time_propagation_with_second_delays() {
    let mut s = slow(0, 0);
    s.pacing.propagation_delay =
        DelayRange::between(Duration::from_millis(300), Duration::from_millis(1500));
    let sb = Sb::start(s).await;
    let x = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let crm = sb.crm_token().await;
    sb.cmd(&x, "New-ApplicationAccessPolicy", json!({"AppId": CRM_APP_ID, "PolicyScopeGroupId": "Sales Team", "AccessRight": "DenyAccess"})).await;
    // Eventually every answer for alice is the new one (generous deadline; no timing asserted).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if sample(&sb, &crm, "alice", 8)
            .await
            .iter()
            .all(|s| *s == 403)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "propagation never completed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v = sb
        .control("GET", &format!("tenants/{}/propagation", sb.tenant), None)
        .await
        .json();
    assert_eq!(v["settled"], Value::Bool(true));
}

#[tokio::test]
async fn same_seed_same_front_end_sequence() {
    let mut order = vec![];
    for _ in 0..2 {
        let sb = Sb::start(slow(10, 20)).await;
        let crm = sb.crm_token().await;
        let mut fes = vec![];
        for _ in 0..10 {
            let r = sb.graph(&crm, "GET", "organization", None).await;
            fes.push(r.header("x-ms-ags-diagnostic").unwrap());
        }
        order.push(fes);
    }
    assert_eq!(order[0], order[1]);
    assert!(
        order[0]
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 1
    );
}

/// RBAC for Applications' permission cache per app (docs/microsoft-365.md §3.5, §8.3): once the
/// front ends have a removed role assignment, an idle app is denied at its next call, while an
/// app that keeps calling every minute keeps its cached grant until the entry is two hours old.
#[tokio::test]
async fn an_app_in_constant_use_keeps_a_removed_rbac_grant_until_its_cache_expires() {
    let mut s = slow(0, 0);
    s.pacing.rbac_propagation_delay = DelayRange::fixed(Duration::from_secs(40 * 60));
    s.pacing.rbac_app_cache_idle = Duration::from_secs(30 * 60);
    s.pacing.rbac_app_cache_lifetime = Duration::from_secs(2 * 3600);
    let sb = Sb::start(s).await;
    let x = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let mut apps = vec![];
    for name in ["busy", "idle"] {
        let (app_id, secret, sp_id) = sb.new_app(json!({"displayName": name})).await;
        sb.cmd(
            &x,
            "New-ServicePrincipal",
            json!({"AppId": app_id, "ObjectId": sp_id}),
        )
        .await;
        let a = sb
            .cmd(
                &x,
                "New-ManagementRoleAssignment",
                json!({"Role": "Application Mail.Read", "App": sp_id}),
            )
            .await;
        let identity = a[0]["Identity"].as_str().unwrap().to_string();
        apps.push((app_id, secret, identity));
    }
    sb.control(
        "POST",
        &format!("tenants/{}/propagation/settle", sb.tenant),
        None,
    )
    .await;
    let token = |i: usize| sb.token_for(&apps[i].0, &apps[i].1, GRAPH_SCOPE);
    // Both apps read bob, which fills their caches at minute 0.
    for i in 0..2 {
        let t = token(i).await;
        assert!(sample(&sb, &t, "bob", 2).await.iter().all(|s| *s == 200));
    }
    for (_, _, identity) in &apps {
        sb.cmd(
            &x,
            "Remove-ManagementRoleAssignment",
            json!({"Identity": identity}),
        )
        .await;
    }
    // The busy app calls every minute: past the front ends' 40 minutes it still reads bob.
    for minute in 1..120 {
        sb.h.advance_clock(Duration::from_secs(60));
        let t = token(0).await;
        assert_eq!(
            sample(&sb, &t, "bob", 1).await,
            vec![200],
            "busy app at minute {minute}"
        );
        if minute == 41 {
            // The idle app (silent since minute 0) is denied as soon as the front ends have it.
            let t = token(1).await;
            assert!(sample(&sb, &t, "bob", 4).await.iter().all(|s| *s == 403));
            let v = sb
                .control("GET", &format!("tenants/{}/propagation", sb.tenant), None)
                .await
                .json();
            assert_eq!(v["settled"], true, "{v}");
        }
    }
    // Two hours after it was filled, the busy app's entry expires too.
    sb.h.advance_clock(Duration::from_secs(60));
    let t = token(0).await;
    assert!(sample(&sb, &t, "bob", 4).await.iter().all(|s| *s == 403));
    let status = sb
        .control("GET", &format!("tenants/{}/propagation", sb.tenant), None)
        .await
        .json();
    assert_eq!(status["rbacAppCaches"], 2, "{status}");
}

/// The control API's settle also empties the per-app RBAC caches: an app in use sees the change
/// at once.
#[tokio::test]
async fn settle_clears_the_per_app_rbac_caches() {
    let mut s = slow(0, 0);
    s.pacing.rbac_propagation_delay = DelayRange::fixed(Duration::from_secs(600));
    s.pacing.rbac_app_cache_idle = Duration::from_secs(30 * 60);
    s.pacing.rbac_app_cache_lifetime = Duration::from_secs(2 * 3600);
    let sb = Sb::start(s).await;
    let x = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let (app_id, secret, sp_id) = sb.new_app(json!({"displayName": "busy"})).await;
    sb.cmd(
        &x,
        "New-ServicePrincipal",
        json!({"AppId": app_id, "ObjectId": sp_id}),
    )
    .await;
    let a = sb
        .cmd(
            &x,
            "New-ManagementRoleAssignment",
            json!({"Role": "Application Mail.Read", "App": sp_id}),
        )
        .await;
    let settle_path = format!("tenants/{}/propagation/settle", sb.tenant);
    let settle = || sb.control("POST", &settle_path, None);
    settle().await;
    let t = sb.token_for(&app_id, &secret, GRAPH_SCOPE).await;
    assert!(sample(&sb, &t, "bob", 2).await.iter().all(|s| *s == 200));
    sb.cmd(
        &x,
        "Remove-ManagementRoleAssignment",
        json!({"Identity": a[0]["Identity"]}),
    )
    .await;
    sb.h.advance_clock(Duration::from_secs(601));
    // The front ends have it, the app's cache does not…
    assert!(sample(&sb, &t, "bob", 2).await.iter().all(|s| *s == 200));
    // …until settle.
    settle().await;
    assert!(sample(&sb, &t, "bob", 4).await.iter().all(|s| *s == 403));
}
