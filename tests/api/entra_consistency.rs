//! Entra's eventual consistency (docs/microsoft-365.md §8.4): the sandbox makes objects written
//! through Graph unusable for a while (a new application reads as 404 and cannot back a service
//! principal yet, a new secret is refused, a new app role is missing from tokens), and mailscope's
//! connector waits that out within a bound, then says `replication_pending` with Microsoft's
//! request id. The onboarding run with the default delay is in `access_grants.rs`.
use std::time::Duration;

use mailscope::m365::graph::{NO_BACKING_APPLICATION, NewApplication};
use mailscope::m365::{ErrorKind, M365Settings, TokenResource};
use mailscope::sandbox::SandboxSettings;
use mailscope::sandbox::settings::DelayRange;
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::m365_sandbox::{Env, GRAPH_APP_ID, test_settings};
use crate::sandbox_helpers::{GRAPH_SCOPE, Sb};

const MAIL_READ: &str = "810c84a8-4a9e-49e6-bf7d-12d183f40d01";
const CALENDARS_READ: &str = "798ee544-9d2d-430c-a058-570e29e34338";

fn lagging(by: Duration) -> SandboxSettings {
    let mut s = SandboxSettings::fast();
    s.pacing.entra_consistency_delay = DelayRange::fixed(by);
    s
}

fn roles_of(token: &str) -> Vec<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let v: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    v["roles"]
        .as_array()
        .map(|a| a.iter().map(|r| r.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn objects_written_through_graph_are_not_at_once_readable_or_usable() {
    let sb = Sb::start(lagging(Duration::from_secs(30))).await;
    let g = sb.mgmt_token(GRAPH_SCOPE).await;
    let r = sb
        .graph(
            &g,
            "POST",
            "applications",
            Some(json!({"displayName": "lagging app"})),
        )
        .await;
    assert_eq!(r.status, 201);
    let (id, app_id) = (
        r.json()["id"].as_str().unwrap().to_string(),
        r.json()["appId"].as_str().unwrap().to_string(),
    );
    // Written, yet not readable: by id, by client id, in a filtered list.
    assert_eq!(
        sb.graph(&g, "GET", &format!("applications/{id}"), None)
            .await
            .status,
        404
    );
    assert_eq!(
        sb.graph(&g, "GET", &format!("applications(appId='{app_id}')"), None)
            .await
            .status,
        404
    );
    let listed = sb
        .graph(
            &g,
            "GET",
            &format!("applications?$filter=appId eq '{app_id}'"),
            None,
        )
        .await;
    assert_eq!(listed.json()["value"], json!([]));
    // Its service principal cannot be created yet: 400 with the reason in `details`.
    let r = sb
        .graph(
            &g,
            "POST",
            "servicePrincipals",
            Some(json!({ "appId": app_id })),
        )
        .await;
    assert_eq!(r.status, 400);
    let e = &r.json()["error"];
    assert_eq!(e["code"], "Request_BadRequest");
    assert_eq!(e["details"][0]["code"], NO_BACKING_APPLICATION);
    assert_eq!(e["details"][0]["target"], "appId");
    assert!(e["message"].as_str().unwrap().contains(&app_id), "{e}");

    sb.h.advance_clock(Duration::from_secs(31));
    assert_eq!(
        sb.graph(&g, "GET", &format!("applications/{id}"), None)
            .await
            .status,
        200
    );
    let r = sb
        .graph(
            &g,
            "POST",
            "servicePrincipals",
            Some(json!({ "appId": app_id })),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json());
    let sp = r.json()["id"].as_str().unwrap().to_string();
    let graph_sp = sb
        .graph(
            &g,
            "GET",
            &format!("servicePrincipals(appId='{GRAPH_APP_ID}')"),
            None,
        )
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let grant = |role: &'static str| {
        let (sb, g, sp, graph_sp) = (&sb, &g, &sp, &graph_sp);
        async move {
            let r = sb
                .graph(
                    g,
                    "POST",
                    &format!("servicePrincipals/{graph_sp}/appRoleAssignedTo"),
                    Some(json!({"principalId": sp, "resourceId": graph_sp, "appRoleId": role})),
                )
                .await;
            assert_eq!(r.status, 201, "{}", r.json());
        }
    };
    grant(MAIL_READ).await;
    let r = sb
        .graph(
            &g,
            "POST",
            &format!("applications/{id}/addPassword"),
            Some(json!({"passwordCredential": {"displayName": "new"}})),
        )
        .await;
    assert_eq!(r.status, 200);
    let secret = r.json()["secretText"].as_str().unwrap().to_string();
    // A new secret is refused exactly like a wrong one for a while.
    let form = [
        ("client_id", app_id.as_str()),
        ("client_secret", secret.as_str()),
        ("scope", GRAPH_SCOPE),
        ("grant_type", "client_credentials"),
    ];
    let r = sb.token_request(&sb.tenant, &form).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error_codes"], json!([7000215]));

    sb.h.advance_clock(Duration::from_secs(31));
    let r = sb.token_request(&sb.tenant, &form).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        roles_of(r.json()["access_token"].as_str().unwrap()),
        ["Mail.Read"]
    );
    // A role granted now is not in the next token yet, only later.
    grant(CALENDARS_READ).await;
    let r = sb.token_request(&sb.tenant, &form).await;
    assert_eq!(
        roles_of(r.json()["access_token"].as_str().unwrap()),
        ["Mail.Read"]
    );
    sb.h.advance_clock(Duration::from_secs(31));
    let r = sb.token_request(&sb.tenant, &form).await;
    assert_eq!(
        roles_of(r.json()["access_token"].as_str().unwrap()),
        ["Calendars.Read", "Mail.Read"]
    );
}

fn statuses_of(calls: &[Value], endpoint: &str) -> Vec<u64> {
    calls
        .iter()
        .filter(|c| c["endpoint"] == endpoint)
        .map(|c| c["status"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn the_connector_waits_out_entra_lag_on_exactly_those_answers() {
    let env = Env::start(lagging(Duration::from_millis(700)), test_settings()).await;
    let g = env.tenant().graph();
    let app = g
        .create_application(&NewApplication {
            display_name: "onboarded while Entra lags".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // NoBackingApplicationObject first, then the service principal: one logical call.
    let sp = g.create_service_principal(&app.app_id).await.unwrap();
    let sps = statuses_of(&env.calls("graph").await, "graph:POST /servicePrincipals");
    assert!(sps.len() >= 2 && sps[0] == 400, "{sps:?}");
    assert_eq!(sps.last(), Some(&201));
    assert_eq!(sps.iter().filter(|s| **s == 201).count(), 1);

    let graph_sp = g.resource_service_principal(GRAPH_APP_ID).await.unwrap();
    g.grant_app_role(&graph_sp.id, &sp.id, MAIL_READ)
        .await
        .unwrap();
    let pw = g.add_password(&app.id, "new", None).await.unwrap();
    let as_app = env.as_app(&app.app_id, pw.secret_text.expose_secret());
    // Without being told the secret is new, "invalid client secret" is final.
    let err = as_app.token(TokenResource::Graph).await.unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::InvalidClientSecret, "{err}");
    assert_eq!(err.remote_code(), Some("AADSTS7000215"));
    // Told, it waits for it; and for the new role to reach the token.
    as_app.credential_is_new();
    let token = as_app
        .token_with_role(
            TokenResource::Graph,
            &|r: &str| r == "Mail.Read",
            "Mail.Read",
        )
        .await
        .unwrap();
    assert_eq!(token.roles(), ["Mail.Read"]);
    let logins = statuses_of(&env.calls("login").await, "login:token");
    assert!(logins.contains(&401), "{logins:?}");
    assert_eq!(logins.last(), Some(&200));
}

#[tokio::test]
async fn past_its_window_the_connector_says_replication_pending_with_microsofts_request_id() {
    let settings = M365Settings {
        entra_consistency_window_secs: 1,
        ..test_settings()
    };
    let env = Env::start(lagging(Duration::from_secs(60)), settings).await;
    let g = env.tenant().graph();
    let app = g
        .create_application(&NewApplication {
            display_name: "never consistent in time".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = g.create_service_principal(&app.app_id).await.unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::ReplicationPending, "{err}");
    assert_eq!(err.code(), "replication_pending");
    assert_eq!(err.remote_code(), Some(NO_BACKING_APPLICATION));
    assert!(err.is_retryable());
    assert!(err.request_id().is_some_and(|id| !id.is_empty()));
    let sps = statuses_of(&env.calls("graph").await, "graph:POST /servicePrincipals");
    assert!(
        sps.len() >= 2 && sps.iter().all(|s| *s == 400),
        "bounded retries: {sps:?}"
    );
}

#[tokio::test]
async fn an_application_put_during_the_lag_is_a_clear_problem_and_a_retry_converges() {
    let env = WithSandbox::start_adjusted(lagging(Duration::from_secs(60)), |s| {
        s.m365.entra_consistency_window_secs = 1;
    })
    .await;
    let body = json!({"display_name": "Lagging CRM", "permissions": ["Mail.Read"], "grant_admin_consent": true});
    let p = env
        .api()
        .put("/applications/lagging", &body, (503, "replication_pending"))
        .await;
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("NoBackingApplicationObject"), "{detail}");
    assert!(detail.contains("Microsoft request id: "), "{detail}");
    // Once Entra has caught up, the same PUT finishes with the application it already made.
    env.sandbox.advance_clock(Duration::from_secs(61));
    let view = env.api().put("/applications/lagging", &body, 201).await;
    let t = env.sandbox_tenant().await;
    let named: Vec<&Value> = t["applications"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["displayName"] == "Lagging CRM")
        .collect();
    assert_eq!(named.len(), 1, "no second registration: {named:?}");
    assert_eq!(named[0]["appId"], view["app_id"]);
}
